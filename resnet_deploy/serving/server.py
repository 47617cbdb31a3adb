"""A real Triton Inference Server on a model repository: started, waited on until every
model is READY, and stopped leaving no process, shared-memory segment or temp folder.

The server is the nvidia-pytriton wheel's ``tritonserver`` with the stub env's backends
(:mod:`stub_env`), or a full Triton's (``triton_bin``, ``backend_directory``: an NGC
container's, with Triton's C++ onnxruntime backend). Facts that shaped the code, each seen
with Triton 2.51:

* with ``--model-control-mode=none`` the HTTP port opens only after the initial load, so
  "connection refused" is normal while loading; a stub that cannot start (a missing
  library) leaves Triton waiting forever, so the log is watched for it;
* an HTTP client left connected makes Triton wait ``--exit-timeout-secs`` and exit leaving
  its shared-memory segment and ``/tmp/python_env_*`` folders (the path is compiled in);
  an idle TCP connection to the gRPC port can make it ignore SIGTERM. So: a short exit
  timeout, SIGKILL for the whole process group after it, and the leftovers removed by name
  (the segments carry a prefix unique to this server);
* ``PR_SET_PDEATHSIG`` stops Triton when this process dies, even by SIGKILL.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from ..core.errors import UserError
from ..core.progress import Progress, to_log
from .stub_env import StubEnv, stub_env
from .triton import check_repository

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
EXIT_TIMEOUT_S = 3  # Triton's own wait for open connections; the whole stop stays < 20 s
KILL_AFTER_S = EXIT_TIMEOUT_S + 3
PYTHON_ENV_TMP = Path("/tmp")  # libtriton_python.so makes /tmp/python_env_XXXXXX there
PYTHON_ENV_PREFIX = "python_env_"
# A log line after which loading never ends: the stub cannot start.
STUCK = re.compile(r"(error while loading shared libraries: .*|triton_python_backend_stub: .*"
                   r"(not found|No such file).*)")
# A service (HTTP, gRPC, metrics) that cannot start: Triton exits after its models loaded.
NO_SERVICE = re.compile(r"failed to start \w+ service: [^\"]*")
_PR_SET_PDEATHSIG = 1


class ServerFailed(UserError):
    """The server could not start, or a model did not load (Triton's reason in one line)."""


@dataclass(frozen=True)
class ServerOptions:
    """Where a server listens and which Triton runs. Ports None: a free one (metrics None:
    off). ``host`` is loopback unless the caller opens it up."""

    host: str = LOOPBACK
    http_port: int | None = None
    grpc_port: int | None = None
    metrics_port: int | None = None
    triton_bin: Path | None = None
    backend_directory: Path | None = None
    ready_timeout_s: float = 120.0
    log_path: Path | None = None

    def __post_init__(self) -> None:
        ports: dict[int, str] = {}
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if port is not None and not 1 <= port <= 65535:
                raise UserError(f"`{name}` {port}: a port is 1-65535")
            if port is not None and port in ports:  # Triton dies on it with an empty line
                raise UserError(f"`{ports[port]}` and `{name}` are both {port}; give each its "
                                "own port (0: a free one)")
            ports.setdefault(port, name)
        if self.ready_timeout_s <= 0:
            raise UserError("`ready_timeout_s` takes a positive number of seconds")
        try:
            socket.getaddrinfo(self.host, None)
        except (socket.gaierror, UnicodeError) as exc:
            raise UserError(f"`host` {self.host!r}: no such address ({exc}); give an address "
                            f"of this machine: {LOOPBACK} (this machine only) or 0.0.0.0 "
                            "(every interface)") from None
        if self.log_path is not None and not Path(self.log_path).parent.is_dir():
            # Triton's log is appended by a thread, where a failure would go unseen.
            raise UserError(f"{self.log_path}: its folder does not exist; create it or pass "
                            "another `log_path`")


@dataclass(frozen=True)
class ServedModel:
    name: str
    precision: str
    inputs: str  # "input FP32 [3, 64, 64]"
    max_batch_size: int
    backend: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def free_port(host: str, port: int = 0, name: str = "port") -> int:
    """``port`` checked free on ``host`` (0: a free one, chosen by the system). A port in
    use would let Triton load every model and then die, or worse, answer the readiness
    checks from the server that holds it."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As Triton binds: a port whose last connections are in TIME_WAIT is free to
            # listen on; only a listening socket holds it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            return int(sock.getsockname()[1])
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use (`{name}`); stop what holds it "
                            "or pass another port (0: a free one)") from None
        raise UserError(f"`host` {host!r}: cannot listen there ({exc.strerror}); give an "
                        f"address of this machine: {LOOPBACK} or 0.0.0.0") from None


def repository_models(repository: Path) -> list[str]:
    return sorted(p.parent.name for p in repository.glob("*/config.pbtxt"))


def _die_with_parent() -> None:  # in the child, between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (its Python stubs), from /proc."""
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """A second Ctrl-C while stopping must not cut the clean-up short: SIGINT and SIGTERM
    are held and re-raised after it (main thread only, where handlers live)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if held:
            signal.raise_signal(held[0])


class TritonServer:
    """One tritonserver process on ``repository``, as a context manager: ``with`` starts it
    and waits until every model is READY (a model that fails to load: ServerFailed with
    Triton's reason), and stops it on the way out."""

    def __init__(self, repository: str | Path, options: ServerOptions = ServerOptions(), *,
                 env: StubEnv | None = None, progress: Progress | None = None) -> None:
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir() or not repository_models(self.repository):
            raise UserError(f"{repository}: holds no <model>/config.pbtxt; build a repository "
                            "with 'resnet-deploy package'")
        self.options = options
        self.say = progress or to_log
        self.env = env
        host = options.host
        self.http_port = options.http_port or free_port(host)
        self.grpc_port = options.grpc_port or free_port(host)
        self.metrics_port = options.metrics_port
        self.shm_prefix = f"rdtriton{os.getpid()}x{uuid.uuid4().hex[:8]}_"
        self.proc: subprocess.Popen[str] | None = None
        self.log: collections.deque[str] = collections.deque(maxlen=4000)
        self.startup_s = 0.0
        self._pump: threading.Thread | None = None
        self._started = 0.0
        self._tmp_before: set[Path] = set()
        self._tmp_ours: set[Path] | None = None
        self._pycache_before: set[Path] = set()

    # --- what runs ---------------------------------------------------------------------

    def _binary_and_backends(self) -> tuple[Path, Path, dict[str, str], list[str]]:
        """tritonserver, its backend directory, its environment and extra flags."""
        options = self.options
        if options.triton_bin is not None:
            if not options.triton_bin.is_file() or not os.access(options.triton_bin, os.X_OK):
                raise UserError(f"{options.triton_bin}: no tritonserver binary there; pass "
                                "`triton_bin` of a full Triton (an NGC container's "
                                "/opt/tritonserver/bin/tritonserver)")
            backends = options.backend_directory or \
                options.triton_bin.resolve().parent.parent / "backends"
            if not backends.is_dir():
                raise UserError(f"{backends}: no such backend directory; pass "
                                "`backend_directory`")
            return options.triton_bin, backends, dict(os.environ), []
        if options.backend_directory is not None:
            raise UserError("`backend_directory` belongs to the Triton of `triton_bin`; give "
                            "both, or neither to run the nvidia-pytriton wheel's")
        if self.env is None:
            self.env = stub_env(build=True, progress=self.say)
        wheel = self.env.wheel
        return wheel.tritonserver, self.env.backend_directory, self.env.environ(), [
            f"--cache-directory={wheel.cache_dir}"]

    def command(self, binary: Path, backends: Path) -> list[str]:
        host, metrics = self.options.host, self.metrics_port is not None
        command = [str(binary), f"--model-repository={self.repository}",
                   f"--backend-directory={backends}",
                   f"--http-address={host}", f"--http-port={self.http_port}",
                   f"--grpc-address={host}", f"--grpc-port={self.grpc_port}",
                   f"--allow-metrics={str(metrics).lower()}", "--allow-gpu-metrics=false",
                   "--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0",
                   f"--exit-timeout-secs={EXIT_TIMEOUT_S}", "--exit-on-error=false",
                   "--strict-readiness=true", "--model-control-mode=none", "--log-verbose=0"]
        if metrics:
            command += [f"--metrics-address={host}", f"--metrics-port={self.metrics_port}"]
        # Each Python-based backend gets this server's own shm prefix: stop() finds its
        # segments by it, and never touches another server's.
        for backend in ("python", "onnxruntime"):
            command.append(f"--backend-config={backend},shm-region-prefix-name="
                           f"{self.shm_prefix}")
        return command

    def onnxruntime_backend(self) -> str:
        """Which onnxruntime backend runs ``onnxruntime_onnx`` models on this server."""
        binary, backends, _, _ = self._binary_and_backends()
        if (backends / "onnxruntime" / "libtriton_onnxruntime.so").is_file():
            return "Triton's C++ onnxruntime backend"
        version = self.env.versions()["onnxruntime"] if self.env is not None else "?"
        return (f"resnet-deploy's Python onnxruntime backend (onnxruntime {version} in the "
                "stub env; runs model.onnx with the config's instance kind, count and batching)")

    # --- life cycle --------------------------------------------------------------------

    def start(self) -> Self:
        check_repository(self.repository)  # what Triton would refuse, said before it runs
        binary, backends, environ, extra = self._binary_and_backends()
        for name in ("http_port", "grpc_port", "metrics_port"):
            if getattr(self.options, name) is not None:  # given, not chosen free here
                free_port(self.options.host, getattr(self, name), name)
        self._tmp_before = set(self._python_env_dirs())
        self._pycache_before = self._pycaches()
        self._started = time.time()
        begun = time.perf_counter()
        self.say(f"starting Triton on {self.repository}")
        self.proc = subprocess.Popen(
            self.command(binary, backends) + extra, env=environ, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
            start_new_session=True, preexec_fn=_die_with_parent, cwd="/")
        self._pump = threading.Thread(target=self._read_log, daemon=True)
        self._pump.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - begun
        self._tmp_ours = set(self._python_env_dirs()) - self._tmp_before
        return self

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        path = self.options.log_path
        with open(path, "a", encoding="utf-8") if path else contextlib.nullcontext() as handle:
            for line in self.proc.stdout:
                self.log.append(line.rstrip("\n"))
                if handle is not None:
                    handle.write(line)
                    handle.flush()

    def wait_ready(self) -> None:
        """Until every model of the repository is READY; a load failure, a stub that cannot
        start, an exit or the timeout is ServerFailed naming the model and Triton's reason."""
        deadline = time.monotonic() + self.options.ready_timeout_s
        wanted = repository_models(self.repository)
        states: dict[str, dict[str, Any]] = {}
        while True:
            self._check_alive()
            try:
                states = {m["name"]: m for m in self.request("POST", "/v2/repository/index",
                                                             {})}
            except (OSError, ValueError):
                pass  # the HTTP port opens when the first load is over
            failed = [f"model {n!r} failed to load: {self._reason(n, states.get(n, {}))}"
                      for n in wanted if states.get(n, {}).get("state") == "UNAVAILABLE"
                      or (n in states and not states[n].get("state") and self._poll_failed(n))]
            if failed:
                raise ServerFailed(f"{self.repository}: {failed[0]}"
                                   + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""))
            if states and all(states.get(n, {}).get("state") == "READY" for n in wanted):
                self._check_alive()  # READY, but a service may have failed to start
                return
            if time.monotonic() > deadline:
                pending = sorted(n for n in wanted if states.get(n, {}).get("state") != "READY")
                raise ServerFailed(f"{self.repository}: not ready after "
                                   f"{self.options.ready_timeout_s:g} s (waiting for "
                                   f"{', '.join(pending)}); raise `ready_timeout_s`")
            time.sleep(0.1)

    def _check_alive(self) -> None:
        for line in list(self.log):
            if STUCK.search(line):
                raise ServerFailed(f"Triton's Python stub cannot start: "
                                   f"{STUCK.search(line).group(0)}")  # type: ignore[union-attr]
            if NO_SERVICE.search(line):
                raise ServerFailed(f"Triton could not serve: "
                                   f"{NO_SERVICE.search(line).group(0)}")  # type: ignore[union-attr]
        if self.proc is None or self.proc.poll() is not None:
            errors = [ln for ln in self.log if ln.startswith("E") and "CudaDriver" not in ln]
            last = (errors or list(self.log) or ["no output"])[-1]
            raise ServerFailed(f"tritonserver exited ({self.proc.returncode if self.proc else '?'}"
                               f"): {last.strip()[:300]}")

    def _reason(self, name: str, state: dict[str, Any]) -> str:
        """Triton's reason in one line: its first (the Python traceback follows 'At:')."""
        reason = state.get("reason") or self._poll_failed(name) or "unavailable"
        lines = [ln.strip() for ln in str(reason).splitlines() if ln.strip()]
        return lines[0] if lines else "unavailable"

    def _poll_failed(self, name: str) -> str | None:
        """A config Triton cannot parse is listed with no state; the reason is in its log."""
        pattern = re.compile(rf"Poll failed for model directory '{re.escape(name)}': (.*)$")
        for line in reversed(self.log):
            match = pattern.search(line)
            if match:
                return match.group(1).rstrip('"')
        return None

    def request(self, method: str, path: str, body: Any = None, timeout: float = 5.0) -> Any:
        """One JSON request to Triton's HTTP endpoint."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://{self.client_host}:{self.http_port}{path}",
                                     data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise ValueError(f"{method} {path}: HTTP {exc.code}") from None

    @property
    def client_host(self) -> str:
        """Where a local client reaches the server (0.0.0.0 is no address to connect to)."""
        return LOOPBACK if self.options.host in ("0.0.0.0", "") else self.options.host

    @property
    def http_url(self) -> str:
        return f"{self.client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.client_host}:{self.grpc_port}"

    def pids(self) -> list[int]:
        """tritonserver and its stubs."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [self.proc.pid, *descendants(self.proc.pid)]

    def _pycaches(self) -> set[Path]:
        return set(self.repository.glob("*/*/**/__pycache__"))

    def _python_env_dirs(self) -> list[Path]:
        return list(PYTHON_ENV_TMP.glob(f"{PYTHON_ENV_PREFIX}*"))

    def _new_tmp(self) -> set[Path]:
        """A start that never got ready: the python_env folders made since it began."""
        found = set()
        for path in set(self._python_env_dirs()) - self._tmp_before:
            with contextlib.suppress(OSError):
                if path.stat().st_ctime >= self._started - 1:
                    found.add(path)
        return found

    def models(self) -> list[ServedModel]:
        """What each model serves, as Triton loaded it (its config over HTTP)."""
        found = []
        for name in repository_models(self.repository):
            config = self.request("GET", f"/v2/models/{name}/config")
            inputs = ", ".join(f"{i['name']} {i['data_type'].removeprefix('TYPE_')} "
                               f"{[int(d) for d in i['dims']]}" for i in config["input"])
            precision = config.get("parameters", {}).get("precision", {}).get("string_value")
            found.append(ServedModel(name, precision or "-", inputs,
                                     int(config.get("max_batch_size", 0)),
                                     config.get("backend") or config.get("platform") or "?"))
        return found

    def metadata(self) -> dict[str, Any]:
        """Triton's own name, version and extensions (``GET /v2``)."""
        return dict(self.request("GET", "/v2"))

    def stop(self) -> float:
        """SIGTERM, then SIGKILL for the whole group after :data:`KILL_AFTER_S`; remove this
        server's shm segments and the empty python_env folders it made. Returns seconds."""
        if self.proc is None:
            return 0.0
        begun = time.perf_counter()
        with _signals_deferred():
            proc = self.proc
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(KILL_AFTER_S)
                except subprocess.TimeoutExpired:
                    log.info("tritonserver ignored SIGTERM for %d s: killed", KILL_AFTER_S)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # stubs left behind, or a hung server
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            for segment in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
                segment.unlink(missing_ok=True)
            for folder in self._tmp_ours if self._tmp_ours is not None else self._new_tmp():
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only ever empty: never anyone's data
            # The stub runs Python isolated (PYTHONDONTWRITEBYTECODE is ignored), so importing
            # model.py writes bytecode into the repository: what serving it added goes.
            for folder in self._pycaches() - self._pycache_before:
                shutil.rmtree(folder, ignore_errors=True)
            if self._pump is not None:
                self._pump.join(2)
            self.proc = None
        return time.perf_counter() - begun

    def __enter__(self) -> Self:
        return self.start() if self.proc is None else self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()
