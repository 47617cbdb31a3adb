"""Where a local Triton comes from: the nvidia-pytriton wheel's server binary, its Python
backend, and a cached environment of its own for the backend's Python stub.

The wheel (``nvidia-pytriton==0.7.0``, Triton 2.51) is installed ``--no-deps`` beside this
package: its Python code needs numpy<2, which this project does not run. Only three parts of
it are used: ``bin/tritonserver``, ``backends/python/`` and the per-Python stubs.

The stub (one process per model instance) runs Python isolated (PYTHONPATH is ignored) with
the first ``python3`` on PATH, and its pybind11 predates numpy 2: under numpy 2 every output
tensor it returns is empty. So it gets a venv of its own, built once per key and cached:

* numpy 1.26.4 (the last 1.x), and onnxruntime and Pillow at the versions this interpreter
  runs: the same kernels and the same decoder as in-process, so served outputs can equal
  in-process ones bit for bit;
* a copy of this package's modules (the image endpoint's preprocessing), synchronised by
  content every time the env is used, so editing the package never needs a pip run;
* ``backends/``, the ``--backend-directory``: the wheel's Python backend with this Python's
  stub, and ``onnxruntime/model.py``, resnet-deploy's Python onnxruntime backend, which
  Triton picks when no ``libtriton_onnxruntime.so`` is there (the wheel has none).

The key hashes the recipe, the interpreter, the wheel and the pinned versions: any change
builds a new env. It lives in ``$RESNET_DEPLOY_STUB_ENV`` (default
``$XDG_CACHE_HOME/resnet-deploy/triton-stub``, else ``~/.cache/...``); building needs the
package index once, about 10 s and 180 MB.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path

from ..core.errors import UserError
from ..core.progress import Progress, to_log
from .backends import ONNXRUNTIME_BACKEND, model_py

RECIPE = 1
PYTRITON = "nvidia-pytriton==0.7.0"  # tritonserver 2.51 (NGC 24.10)
STUB_NUMPY = "numpy==1.26.4"  # the 2.51 stub cannot read numpy 2 arrays
INSTALL_HINT = ("pip install 'resnet-deploy[serve]' && pip install --no-deps "
                f"{PYTRITON}")
CACHE_VARIABLE = "RESNET_DEPLOY_STUB_ENV"
PREPARE_HINT = "build it with 'resnet-deploy serve --prepare' (needs the package index once)"
COMPLETE = ".complete"


def cache_root() -> Path:
    """Where stub envs are kept: ``$RESNET_DEPLOY_STUB_ENV``, else the user's cache."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "resnet-deploy" / "triton-stub"


@dataclass(frozen=True)
class TritonWheel:
    """The installed nvidia-pytriton wheel's server files."""

    root: Path  # .../site-packages/pytriton/tritonserver
    libs: Path  # .../site-packages/nvidia_pytriton.libs (libcudart and friends)
    version: str

    @property
    def tritonserver(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    @property
    def cache_dir(self) -> Path:
        return self.root / "caches"

    def stub(self, python: str) -> Path:
        return self.root / "python_backend_stubs" / python / "triton_python_backend_stub"


def find_wheel() -> TritonWheel:
    """The wheel beside this package, found without importing it (its code wants numpy<2)."""
    spec = util.find_spec("pytriton")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    root = Path(locations[0]) / "tritonserver" if locations else None
    if root is None or not (root / "bin" / "tritonserver").is_file():
        raise UserError(f"no Triton server binary: the nvidia-pytriton wheel is not installed; "
                        f"{INSTALL_HINT}, or pass `triton_bin` and `backend_directory` of a "
                        "full Triton")
    return TritonWheel(root, root.parent.parent / "nvidia_pytriton.libs",
                       metadata.version("nvidia-pytriton"))


def unavailable() -> str | None:
    """Why nothing can be served here (the wheel or the clients of the serve extra are
    missing), or None; without importing either."""
    try:
        find_wheel()
    except UserError as exc:
        return str(exc)
    for module in ("tritonclient.http", "tritonclient.grpc"):
        try:
            found = util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            return f"{module} is not installed; {INSTALL_HINT}"
    return None


@dataclass(frozen=True)
class Interpreter:
    """The CPython the stub env is made from: it must have a shared libpython, because the
    stub links it and would otherwise pick up another Python's library (the system's)."""

    executable: str
    version: str  # X.Y.Z
    libdir: str

    @property
    def short(self) -> str:
        return ".".join(self.version.split(".")[:2])


def this_interpreter() -> Interpreter:
    import sysconfig

    version = sys.version.split()[0]
    base = getattr(sys, "_base_executable", sys.executable)  # a venv's own Python
    libdir = str(sysconfig.get_config_var("LIBDIR") or "")
    soname = str(sysconfig.get_config_var("INSTSONAME") or "")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not (Path(libdir) / soname).exists():
        raise UserError(f"Python {version} ({base}) has no shared libpython, which "
                        "Triton's Python stub links; run resnet-deploy from a Python built "
                        "with --enable-shared (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared)")
    if sys.version_info >= (3, 13):
        raise UserError(f"Python {version}: Triton 2.51's stub needs numpy<2, which has no "
                        "wheels for Python 3.13 and later; run resnet-deploy from Python 3.11 "
                        "or 3.12")
    return Interpreter(base, version, libdir)


def _installed(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        raise UserError(f"{name} is not installed here, and the stub env pins its version to "
                        f"this one; {INSTALL_HINT}") from None


def requirements() -> list[str]:
    """What the stub's venv installs: numpy 1.26, onnxruntime and Pillow as here."""
    return [STUB_NUMPY, f"onnxruntime=={_installed('onnxruntime')}",
            f"pillow=={_installed('pillow')}"]


@dataclass(frozen=True)
class StubEnv:
    """A built stub env, and how tritonserver must be started to use it."""

    root: Path
    interpreter: Interpreter
    wheel: TritonWheel

    @property
    def python(self) -> Path:
        return self.root / "venv" / "bin" / "python3"

    @property
    def site_packages(self) -> Path:
        return self.root / "venv" / "lib" / f"python{self.interpreter.short}" / "site-packages"

    @property
    def backend_directory(self) -> Path:
        return self.root / "backends"

    def versions(self) -> dict[str, str]:
        stamp = json.loads((self.root / COMPLETE).read_text("utf-8"))
        return dict(stamp["versions"])

    def environ(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """tritonserver's environment: the venv's python3 first on PATH (the stub looks it
        up there), this interpreter's libpython and the wheel's libraries first on
        LD_LIBRARY_PATH (the copied stub lost its RPATH), no PYTHONPATH or PYTHONHOME."""
        env = dict(os.environ if base is None else base)
        for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
            env.pop(name, None)
        env["PATH"] = f"{self.python.parent}:{env.get('PATH', '/usr/bin:/bin')}"
        libraries = [self.interpreter.libdir, str(self.wheel.libs)]
        env["LD_LIBRARY_PATH"] = ":".join(libraries + [p for p in
                                          [env.get("LD_LIBRARY_PATH", "")] if p])
        return env


def env_key(interpreter: Interpreter, wheel: TritonWheel, reqs: list[str]) -> str:
    blob = json.dumps({"recipe": RECIPE, "python": interpreter.version,
                       "executable": interpreter.executable, "libdir": interpreter.libdir,
                       "wheel": [str(wheel.root), wheel.version], "requirements": sorted(reqs)},
                      sort_keys=True)
    return f"py{interpreter.short}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder per key at a time (two test runs, two terminals)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def stub_env(*, build: bool = True, rebuild: bool = False,
             progress: Progress | None = None) -> StubEnv:
    """The stub env for this interpreter and wheel, built when its key is new (``build``
    False: a UserError instead, so a test run never reaches for the network) or when
    ``rebuild``; its package copy and backend files are brought up to date either way."""
    wheel = find_wheel()
    interpreter = this_interpreter()
    reqs = requirements()
    key = env_key(interpreter, wheel, reqs)
    env = StubEnv(cache_root() / key, interpreter, wheel)
    say = progress or to_log
    with _locked(cache_root() / f"{key}.lock"):
        if rebuild or not (env.root / COMPLETE).is_file():
            if not build:
                raise UserError(f"no Triton stub env at {env.root}; {PREPARE_HINT}")
            say(f"building the Triton stub env at {env.root} (numpy<2, onnxruntime, pillow)")
            _build(env, reqs)
        _sync(env)
    return env


def _build(env: StubEnv, reqs: list[str]) -> None:
    started = time.perf_counter()
    if env.root.exists():
        shutil.rmtree(env.root)  # half-built by an interrupted run, or asked to rebuild
    env.root.mkdir(parents=True)
    _run([env.interpreter.executable, "-m", "venv", "--without-pip", str(env.root / "venv")],
         "create the stub venv")
    # The project's pip installs into the new venv: no pip inside it, and the same index.
    _run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
          "--no-warn-script-location", "--target", str(env.site_packages), *reqs],
         "install numpy<2, onnxruntime and pillow into the stub venv")
    stub = env.wheel.stub(env.interpreter.short)
    if not stub.is_file():
        raise UserError(f"{PYTRITON} has no Python backend stub for Python "
                        f"{env.interpreter.short}; run resnet-deploy from Python 3.11 or 3.12")
    python_backend = env.backend_directory / "python"
    python_backend.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(env.wheel.python_backend / name, python_backend / name)
    shutil.copy2(stub, python_backend / stub.name)
    _sync(env)
    check = _run([str(env.python), "-I", "-c",
                  "import json, numpy, onnxruntime, PIL; print(json.dumps({'numpy': "
                  "numpy.__version__, 'onnxruntime': onnxruntime.__version__, 'pillow': "
                  "PIL.__version__}))"], "import numpy, onnxruntime and pillow in the stub venv")
    stamp = {"key": env.root.name, "requirements": reqs, "wheel": env.wheel.version,
             "versions": json.loads(check), "seconds": round(time.perf_counter() - started, 1)}
    (env.root / COMPLETE).write_text(json.dumps(stamp, indent=1), encoding="utf-8")


def _run(command: list[str], what: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise UserError(f"could not {what}: {lines[-1] if lines else f'exit {done.returncode}'}"
                        f"; {PREPARE_HINT}")
    return done.stdout


def _sync_file(data: bytes, target: Path) -> None:
    if target.is_file() and target.read_bytes() == data:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, target)


def _sync(env: StubEnv) -> None:
    """The package's modules mirrored into the venv (stale ones removed), and the
    onnxruntime backend's model.py: a few ms when nothing changed."""
    _sync_file(model_py(ONNXRUNTIME_BACKEND).encode(),
               env.backend_directory / "onnxruntime" / "model.py")
    source = Path(__file__).resolve().parents[1]
    target = env.site_packages / source.name
    wanted = {p.relative_to(source) for p in source.rglob("*")
              if p.suffix in (".py", ".txt") and "__pycache__" not in p.parts and p.is_file()}
    for relative in sorted(wanted):
        _sync_file((source / relative).read_bytes(), target / relative)
    for path in sorted(target.rglob("*"), reverse=True) if target.is_dir() else []:
        relative = path.relative_to(target)
        if path.is_file() and "__pycache__" not in relative.parts and relative not in wanted:
            path.unlink()
