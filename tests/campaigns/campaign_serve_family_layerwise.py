#!/usr/bin/env python
"""Hostile-input campaign against `resnet-deploy`: serve, photo endpoint, family, layerwise.

Black-box: designed from README.md, ../shared/CLI.md and each command's --help only.
Every fixture (exports, INT8/FP16 models, Triton repositories, corrupted files, crafted
checkpoints) is rebuilt from scratch in a fresh temporary folder.

Run:  .venv/bin/python tests/campaigns/campaign_serve_family_layerwise.py [--area NAME]... [--list]
      areas: family, layerwise, serve, photo   (default: all)

Each case is a CLI invocation or a client request to a server this script started. It prints
one line per case `area  case-id  OK|MISHANDLED  reason`, per-area counts, and as its very
last line `N passed, M failed` (passed = handled correctly). Exit 1 if any case is mishandled.

Rules: a case is MISHANDLED when it gives
  * a Python traceback ("Traceback (most recent call last)") on stdout or stderr;
  * an exit code other than CLI.md's for the situation (0 done and checks pass, 1 a check
    failed, 2 bad input/usage, 130/143 on SIGINT/SIGTERM);
  * exit 0 on a wrong or unverifiable result (each case verifies what a 0 claims: the file
    written, its outputs, the JSON it reports, the answer a server gave);
  * an input file changed (every input is sha256-hashed before and after);
  * an internal temp path in a message: a /tmp/... path the user never gave (anything under
    the per-case TMPDIR, or a /tmp path outside this campaign's work folder);
  * more than one error line on stderr for a failing command (click's usage errors
    excepted): the last non-empty stderr line must be the one `Error: ...` line, no other
    line may look like an error, and no warning line may repeat;
  * a process (tagged by an environment variable, or any tritonserver / python backend stub),
    a /dev/shm segment, or a temp file (each case gets a fresh, empty TMPDIR that must be
    empty again afterwards) left behind;
  * a server that stops answering good requests after a bad one (every bad request is
    followed by a good one), or a request that hangs past its timeout.
Servers bind 127.0.0.1 only, are stopped through their process group in try/finally, and
every request has a timeout.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=DeprecationWarning)

ROOT = Path(__file__).resolve().parents[2]
RD = str(ROOT / ".venv" / "bin" / "resnet-deploy")
PY = str(ROOT / ".venv" / "bin" / "python")
DATA = (ROOT / ".." / "shared" / "data").resolve()
CKPT = DATA / "cifar10-resnet18" / "resnet18_cifar10_64.pth"
SIZE = ["--input-size", "64", "--resize-size", "73"]
AREAS = ["family", "layerwise", "serve", "photo"]
TAG = "RD_CAMPAIGN_CASE"

RESULTS: list[tuple[str, str, bool, str]] = []
AREA_TIME: dict[str, float] = {}
WORK: Path = Path()  # set in main
_counter = [0]


def log(msg: str) -> None:
    print(msg, flush=True)


def record(area: str, cid: str, ok: bool, reason: str) -> None:
    RESULTS.append((area, cid, ok, reason))
    reason = reason.replace("\n", " | ")
    if len(reason) > 400:
        reason = reason[:400] + "..."
    log(f"{area:9s}  {cid:40s}  {'OK' if ok else 'MISHANDLED'}  {reason}")


# --------------------------------------------------------------------------- observation
def sha(path: Path) -> str:
    h = hashlib.sha256()
    p = Path(path)
    if p.is_dir():
        for f in sorted(p.rglob("*")):
            if f.is_file():
                h.update(str(f.relative_to(p)).encode())
                h.update(sha(f).encode())
        return h.hexdigest()
    if not p.exists():
        return "absent"
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def proc_snapshot() -> dict[int, str]:
    """pid -> cmdline for processes that are ours (tagged) or Triton's."""
    out = {}
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            cmd = (
                open(f"/proc/{d}/cmdline", "rb")
                .read()
                .replace(b"\0", b" ")
                .decode(errors="replace")
            )
            try:
                env = open(f"/proc/{d}/environ", "rb").read()
            except OSError:
                env = b""
            stat = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        if ") Z " in stat:  # zombie
            continue
        # only ever this run's: tagged with this run's id, or naming this run's work folder (another
        # run of this script, or anyone else's Triton, is never touched)
        if f"{TAG}={WORK.name}:".encode() in env or (str(WORK) != "." and str(WORK) + "/" in cmd):
            out[int(d)] = cmd.strip()
    return out


def shm_snapshot() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


class Observer:
    """Before/after snapshots of processes, /dev/shm, input hashes and a fresh TMPDIR."""

    def __init__(self, cid: str, inputs=()):
        _counter[0] += 1
        self.cid = cid
        self.tmpdir = WORK / "t" / f"{_counter[0]:03d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', cid)}"
        self.tmpdir.mkdir(parents=True)
        self.inputs = [Path(p) for p in inputs]
        self.hashes = {p: sha(p) for p in self.inputs}
        self.procs = proc_snapshot()
        self.shm = shm_snapshot()
        self.pids: set[int] = set()

    def saw(self, *pids):
        self.pids |= {p for p in pids if p}
        self.pids |= set(proc_snapshot()) - set(self.procs)

    def env(self, extra=None) -> dict:
        env = dict(os.environ)
        env["TMPDIR"] = str(self.tmpdir)
        env[TAG] = f"{WORK.name}:{self.cid}"
        env.pop("PYTHONWARNINGS", None)
        if extra:
            env.update(extra)
        return env

    def ours(self, names):
        """/dev/shm names that carry the pid of a process of this case (others' are not ours)."""
        return {n for n in names if any(re.search(rf"(?<!\d){p}(?!\d)", n) for p in self.pids)}

    def leftovers(self, wait: float = 5.0) -> list[str]:
        problems = []
        deadline = time.time() + wait
        while True:
            now = proc_snapshot()
            self.pids |= set(now)
            new_procs = {p: c for p, c in now.items() if p not in self.procs}
            new_shm = self.ours(shm_snapshot() - self.shm)
            tmp_left = sorted(
                str(p.relative_to(self.tmpdir)) for p in self.tmpdir.rglob("*") if p.name != ORT_SES
            )
            if (not new_procs and not new_shm and not tmp_left) or time.time() > deadline:
                break
            time.sleep(0.5)
        for p, c in new_procs.items():
            problems.append(f"process left: pid {p} {c[:120]}")
            try:  # clean up after it so the next cases start clean
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        if new_shm:
            problems.append(f"/dev/shm left: {sorted(new_shm)[:5]}")
            for n in new_shm:
                try:
                    os.unlink(f"/dev/shm/{n}")
                except OSError:
                    pass
        if tmp_left:
            problems.append(f"temp files left in TMPDIR: {tmp_left[:5]}")
        if (self.tmpdir / ORT_SES).exists():
            text = (self.tmpdir / ORT_SES).read_text(errors="replace")
            if not ORT_SES_TEXT.fullmatch(text.strip()):
                problems.append(f"$TMPDIR/{ORT_SES} is not onnxruntime's session id: {text!r}")
            SES_SEEN.append(self.cid)
            try:
                (self.tmpdir / ORT_SES).unlink()
            except OSError:
                pass
        for p, h in self.hashes.items():
            if sha(p) != h:
                problems.append(f"input changed: {p.name}")
        return problems


# `import onnxruntime` (1.32, its telemetry) writes $TMPDIR/.ses: one fixed name, a time stamp
# and a UUID, rewritten by every process that imports it, whatever the command does. It is
# onnxruntime's own file, not a temp file a command left (tests/test_hostile.py allows it
# too): each case checks that it holds only that, and the dedicated case below counts it.
ORT_SES = ".ses"
ORT_SES_TEXT = re.compile(r"\d+\s+[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SES_SEEN: list[str] = []
TB = "Traceback (most recent call last)"
ERRLINE = re.compile(
    r"^\s*(Error\b|FAILED\b|error:|ERROR\b|E\d{4} |\[?error\]?|.*\bException\b:|.*Error: )", re.I
)


def message_problems(rc: int, out: str, err: str, tmpdir: Path) -> list[str]:
    problems = []
    both = out + "\n" + err
    if TB in both:
        tail = [ln for ln in both.splitlines() if ln.strip()]
        last = ""
        for i, ln in enumerate(tail):
            if ln.startswith(TB):
                j = i + 1
                while j < len(tail) and tail[j].startswith((" ", "\t")):
                    j += 1
                last = tail[j] if j < len(tail) else ""
        problems.append(f"traceback: {last[:200]}")
    for m in re.finditer(r"(/tmp/[^\s'\"():,;\]]*)", both):
        p = m.group(1)
        if p.startswith(str(tmpdir)) or not p.startswith(str(WORK)):
            if p.startswith("/tmp/triton_trt_cache"):
                continue  # package --trt-cache's documented default
            problems.append(f"internal temp path in a message: {p}")
            break
    if rc not in (0,) and rc is not None:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        click_usage = any(ln.startswith("Usage: ") for ln in lines) and any(
            ln.startswith("Error: ") for ln in lines
        )
        if not click_usage:
            if not lines:
                problems.append("failing command with an empty stderr")
            else:
                errs = [ln for ln in lines if ERRLINE.match(ln)]
                if not ERRLINE.match(lines[-1]):
                    problems.append(f"last stderr line is not an error line: {lines[-1][:160]!r}")
                if len(errs) > 1:
                    problems.append(
                        f"{len(errs)} error lines on stderr: {[e[:100] for e in errs[:3]]}"
                    )
        warn = [ln for ln in lines if re.match(r"^\s*(warning|\w*Warning)\b", ln, re.I)]
        if len(warn) != len(set(warn)):
            problems.append("a warning line repeats")
    return problems


def first_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


class Res:
    def __init__(self, rc, out, err, wall):
        self.rc, self.out, self.err, self.wall = rc, out, err, wall

    def json(self):
        return json.loads(self.out)


def cli(
    area,
    cid,
    args,
    expect=(0,),
    inputs=(),
    check=None,
    timeout=900,
    cwd=None,
    env=None,
    stdin=None,
    signal_after=None,
    expect_rc_msg=None,
):
    """Run one CLI case and judge it by the rules.

    expect: exit codes that are right for the situation. check(res) -> None or a problem
    string; it is called for every exit code (so it can verify what a 0 claims).
    signal_after: (seconds, signum) to interrupt the command.
    """
    obs = Observer(cid, inputs)
    cwd = Path(cwd) if cwd else obs.tmpdir.parent.parent / "cwd" / obs.tmpdir.name
    cwd.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    proc = subprocess.Popen(
        [RD] + [str(a) for a in args],
        cwd=cwd,
        env=obs.env(env),
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    obs.saw(proc.pid)
    problems = []
    try:
        if signal_after:
            time.sleep(signal_after[0])
            try:
                os.killpg(proc.pid, signal_after[1])
            except OSError:
                pass
        out, err = proc.communicate(input=stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        problems.append(f"hung: no exit within {timeout}s")
    rc = proc.returncode
    if rc is not None and rc < 0:  # killed by a signal: what a shell shows as 128+N
        problems.append(f"killed by signal {-rc} without handling it")
        rc = 128 - rc
    out, err = out.decode(errors="replace"), err.decode(errors="replace")
    res = Res(rc, out, err, time.time() - t0)
    if rc not in expect:
        problems.append(
            f"exit {rc}, expected {'/'.join(map(str, expect))}"
            + (f" ({first_error(err)})" if rc else "")
        )
    problems += message_problems(rc, out, err, obs.tmpdir)
    if check is not None and not any(p.startswith("hung") for p in problems):
        try:
            c = check(res)
        except Exception as exc:  # the check itself could not verify the result
            c = f"result unverifiable: {type(exc).__name__}: {exc}"
        if c:
            problems.append(c)
    problems += obs.leftovers()
    ok = not problems
    reason = (
        "; ".join(problems)
        if problems
        else f"exit {rc}" + (f": {first_error(err)}" if rc else "") + f" ({res.wall:.0f}s)"
    )
    record(area, cid, ok, reason)
    return res


# --------------------------------------------------------------------------- model helpers
def onnx_io(path):
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def dims(v):
        return [
            d.dim_value if d.dim_value else (d.dim_param or "?")
            for d in v.type.tensor_type.shape.dim
        ]

    return ({i.name: dims(i) for i in m.graph.input}, {o.name: dims(o) for o in m.graph.output})


def run_onnx(path, x):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def expect_output(path, name, width):
    def check(res):
        if res.rc != 0:
            return None
        if not Path(path).exists():
            return f"exit 0 but {Path(path).name} was not written"
        _, outs = onnx_io(path)
        if name not in outs:
            return f"exit 0 but the model's outputs are {list(outs)}, expected {name!r}"
        if outs[name][-1] != width:
            return f"exit 0 but output {name} is {outs[name]}, expected width {width}"
        return None

    return check


def no_file(path):
    def check(res):
        if res.rc != 0 and Path(path).exists():
            return f"failed (exit {res.rc}) but left {Path(path).name} behind"
        return None

    return check


def all_of(*checks):
    def check(res):
        for c in checks:
            r = c(res)
            if r:
                return r
        return None

    return check


# torchvision-compatible ResNet state_dicts (torchvision itself is not importable here)
SPECS = {
    "resnet18": ("basic", [2, 2, 2, 2], 1, 64),
    "resnet34": ("basic", [3, 4, 6, 3], 1, 64),
    "resnet50": ("bottle", [3, 4, 6, 3], 1, 64),
    "resnet101": ("bottle", [3, 4, 23, 3], 1, 64),
    "resnet152": ("bottle", [3, 8, 36, 3], 1, 64),
    "resnext50_32x4d": ("bottle", [3, 4, 6, 3], 32, 4),
    "wide_resnet50_2": ("bottle", [3, 4, 6, 3], 1, 128),
}


def make_state_dict(arch, num_classes=10, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    kind, layers, groups, wpg = SPECS[arch]
    sd = {}

    def conv(name, cout, cin, k):
        fan = cin * k * k
        sd[name + ".weight"] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / fan) ** 0.5

    def bn(name, c, gamma=1.0):
        sd[name + ".weight"] = torch.full((c,), gamma)
        sd[name + ".bias"] = torch.randn(c, generator=g) * 0.05
        sd[name + ".running_mean"] = torch.randn(c, generator=g) * 0.05
        sd[name + ".running_var"] = torch.rand(c, generator=g) * 0.5 + 0.75
        sd[name + ".num_batches_tracked"] = torch.tensor(0)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inplanes = 64
    exp = 1 if kind == "basic" else 4
    for li, (planes, n) in enumerate(zip([64, 128, 256, 512], layers, strict=True), start=1):
        for b in range(n):
            p = f"layer{li}.{b}"
            stride = 2 if (b == 0 and li > 1) else 1
            if kind == "basic":
                conv(p + ".conv1", planes, inplanes, 3)
                bn(p + ".bn1", planes)
                conv(p + ".conv2", planes, planes, 3)
                bn(p + ".bn2", planes, 0.3)
            else:
                width = int(planes * (wpg / 64.0)) * groups
                conv(p + ".conv1", width, inplanes, 1)
                bn(p + ".bn1", width)
                conv(p + ".conv2", width, width // groups, 3)
                bn(p + ".bn2", width)
                conv(p + ".conv3", planes * exp, width, 1)
                bn(p + ".bn3", planes * exp, 0.3)
            if b == 0 and (stride != 1 or inplanes != planes * exp):
                conv(p + ".downsample.0", planes * exp, inplanes, 1)
                bn(p + ".downsample.1", planes * exp)
            inplanes = planes * exp
    sd["fc.weight"] = torch.randn(num_classes, 512 * exp, generator=g) * (1.0 / (512 * exp)) ** 0.5
    sd["fc.bias"] = torch.zeros(num_classes)
    return sd


def load_ckpt():
    import torch

    return torch.load(str(CKPT), weights_only=True)


def save(sd, path):
    import torch

    torch.save(sd, str(path))
    return path


def fixdir(name) -> Path:
    d = WORK / "fx" / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def image_folder(name, src, n, per_class=True):
    """A small copy of an ImageFolder (or flat folder) of photos."""
    d = fixdir(name)
    if any(d.iterdir()):
        return d
    src = Path(src)
    if per_class:
        for cls in sorted(p for p in src.iterdir() if p.is_dir()):
            (d / cls.name).mkdir()
            for f in sorted(cls.iterdir())[:n]:
                shutil.copy(f, d / cls.name / f.name)
    else:  # flat: round-robin over the class folders
        classes = [sorted(c.iterdir()) for c in sorted(p for p in src.iterdir() if p.is_dir())]
        i = 0
        while i < n:
            f = classes[i % len(classes)][i // len(classes)]
            shutil.copy(f, d / f.name)
            i += 1
    return d


_export_cache: dict = {}


def build_export(name, args, ckpt=None):
    """An export made for fixtures (not a case); raises when it fails."""
    if name in _export_cache:
        return _export_cache[name]
    out = fixdir("models") / f"{name}.onnx"
    cmd = [RD, "export"] + [str(a) for a in args] + ["-o", str(out)]
    r = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=fixdir("cwd"),
        timeout=900,
        env=dict(os.environ, TMPDIR=str(fixdir("tmp"))),
    )
    if r.returncode != 0 or not out.exists():
        raise RuntimeError(f"fixture export {name} failed: {r.stderr[-600:]}")
    _export_cache[name] = out
    return out


def photos10():
    return image_folder("photos10", DATA / "cifar10-calib", 10, per_class=False)


def r18_onnx():
    return build_export("r18", ["--weights", CKPT, *SIZE, "--parity-images", photos10()])


# =========================================================================== area: family
class Evil:
    """Pickles to a call of os.system: a checkpoint must never run it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def area_family():
    import torch

    A = "family"
    ck = fixdir("ckpts")
    out = fixdir("family_out")
    photos = photos10()
    base = load_ckpt()

    def variant(name, fn):
        sd = {k: v.clone() for k, v in base.items()}
        r = fn(sd)
        return save(r if r is not None else sd, ck / f"{name}.pth")

    def drop(prefix):
        return lambda sd: {k: v for k, v in sd.items() if not k.startswith(prefix)}

    good = variant("r18", lambda sd: None)
    fc7 = variant(
        "fc7",
        lambda sd: sd.update(
            {"fc.weight": sd["fc.weight"][:7].clone(), "fc.bias": sd["fc.bias"][:7].clone()}
        ),
    )
    fc_incons = variant(
        "fc_inconsistent", lambda sd: sd.update({"fc.weight": sd["fc.weight"][:7].clone()})
    )
    fc_1d = variant("fc_1d", lambda sd: sd.update({"fc.weight": sd["fc.weight"].flatten().clone()}))
    fc_wrong_in = variant("fc_wrong_in", lambda sd: sd.update({"fc.weight": torch.randn(10, 2048)}))
    nofc = variant("nofc", drop("fc."))
    seqfc = variant(
        "seqfc",
        lambda sd: {
            **{k: v for k, v in sd.items() if not k.startswith("fc.")},
            "fc.0.weight": torch.randn(256, 512),
            "fc.0.bias": torch.zeros(256),
            "fc.2.weight": torch.randn(10, 256),
            "fc.2.bias": torch.zeros(10),
        },
    )
    no_ds = variant("no_downsample", drop("layer2.0.downsample."))
    no_rv = variant(
        "no_running_var",
        lambda sd: {k: v for k, v in sd.items() if k != "layer1.0.bn1.running_var"},
    )
    extra = variant("extra_key", lambda sd: sd.update({"aux_head.weight": torch.randn(10, 512)}))
    module_pfx = variant("module_prefix", lambda sd: {"module." + k: v for k, v in sd.items()})
    wrapped = variant("wrapped", lambda sd: {"state_dict": sd, "epoch": 6})
    nan = variant(
        "nan", lambda sd: sd["layer2.0.conv1.weight"].__setitem__((0, 0, 0, 0), float("nan"))
    )
    bad_bn = variant(
        "bn_renamed",
        lambda sd: {k.replace("layer3.1.bn2", "layer3.1.bnX"): v for k, v in sd.items()},
    )
    transposed = variant(
        "conv_transposed",
        lambda sd: sd.update(
            {"layer2.0.conv1.weight": sd["layer2.0.conv1.weight"].transpose(0, 1).contiguous()}
        ),
    )
    scaled = variant(
        "scaled", lambda sd: sd.update({"layer3.0.conv2.weight": sd["layer3.0.conv2.weight"] * 1.3})
    )
    tensor_only = save(torch.randn(3, 3), ck / "tensor.pth")
    empty = ck / "empty.pth"
    empty.write_bytes(b"")
    garbage = ck / "garbage.pth"
    garbage.write_bytes(os.urandom(4096))
    trunc = ck / "truncated.pth"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    marker = WORK / "fx" / "PWNED"
    evil = ck / "evil.pth"
    torch.save({"conv1.weight": Evil(marker)}, str(evil))
    r34 = save(make_state_dict("resnet34"), ck / "resnet34.pth")
    from safetensors.torch import save_file

    st = ck / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in base.items()}, str(st))
    st_bad = ck / "broken.safetensors"
    st_bad.write_bytes(st.read_bytes()[:5000])

    def E(cid, args, expect, check=None, inputs=()):
        o = out / f"{cid}.onnx"
        chk = all_of(no_file(o), check) if check else no_file(o)
        return cli(
            A,
            cid,
            ["export", *args, *SIZE, "--parity-images", photos, "-o", o],
            expect,
            inputs=[photos, *inputs],
            check=chk,
        )

    def o(cid):
        return out / f"{cid}.onnx"

    # ---- head
    E(
        "export-r18-ckpt",
        ["--weights", good],
        (0,),
        expect_output(o("export-r18-ckpt"), "logits", 10),
        [good],
    )
    E(
        "export-fc7-head",
        ["--weights", fc7],
        (0, 2),
        expect_output(o("export-fc7-head"), "logits", 7),
        [fc7],
    )
    E("export-fc-weight-bias-disagree", ["--weights", fc_incons], (2,), inputs=[fc_incons])
    E("export-fc-weight-1d", ["--weights", fc_1d], (2,), inputs=[fc_1d])
    E("export-fc-wrong-in-features", ["--weights", fc_wrong_in], (2,), inputs=[fc_wrong_in])
    E("export-no-fc", ["--weights", nofc], (2,), inputs=[nofc])
    E(
        "export-no-fc-features",
        ["--weights", nofc, "--features"],
        (0,),
        expect_output(o("export-no-fc-features"), "features", 512),
        [nofc],
    )
    E(
        "export-fc-features",
        ["--weights", good, "--features"],
        (0,),
        expect_output(o("export-fc-features"), "features", 512),
        [good],
    )
    E("export-seq-head", ["--weights", seqfc], (2,), inputs=[seqfc])
    E(
        "export-seq-head-features",
        ["--weights", seqfc, "--features"],
        (0,),
        expect_output(o("export-seq-head-features"), "features", 512),
        [seqfc],
    )
    E(
        "export-num-classes-contradicts-fc",
        ["--weights", good, "--num-classes", "5"],
        (2,),
        inputs=[good],
    )
    # ---- body
    E("export-missing-downsample", ["--weights", no_ds], (2,), inputs=[no_ds])
    E("export-missing-running-var", ["--weights", no_rv], (2,), inputs=[no_rv])
    E("export-bn-renamed", ["--weights", bad_bn], (2,), inputs=[bad_bn])
    E("export-conv-transposed", ["--weights", transposed], (2,), inputs=[transposed])

    def extra_check(res):
        if res.rc == 0 and "aux_head" not in res.err + res.out:
            return "exit 0 and the unexpected key aux_head.weight was silently ignored"
        return None

    E("export-extra-key", ["--weights", extra], (0, 2), extra_check, [extra])
    E(
        "export-module-prefix",
        ["--weights", module_pfx],
        (0, 2),
        expect_output(o("export-module-prefix"), "logits", 10),
        [module_pfx],
    )
    E(
        "export-wrapped-state-dict",
        ["--weights", wrapped],
        (0, 2),
        expect_output(o("export-wrapped-state-dict"), "logits", 10),
        [wrapped],
    )
    E("export-nan-weight", ["--weights", nan], (1, 2), inputs=[nan])
    # ---- broken files
    E("export-tensor-not-dict", ["--weights", tensor_only], (2,), inputs=[tensor_only])
    E("export-empty-ckpt", ["--weights", empty], (2,), inputs=[empty])
    E("export-garbage-ckpt", ["--weights", garbage], (2,), inputs=[garbage])
    E("export-truncated-ckpt", ["--weights", trunc], (2,), inputs=[trunc])

    def no_marker(res):
        return (
            "the checkpoint's pickled code ran (marker file created)" if marker.exists() else None
        )

    E("export-pickle-exploit", ["--weights", evil], (2,), no_marker, [evil])
    cli(
        A,
        "export-output-is-checkpoint",
        ["export", "--weights", good, *SIZE, "--parity-images", photos, "-o", good],
        (2,),
        inputs=[good],
    )
    E(
        "export-safetensors",
        ["--weights", st],
        (0,),
        expect_output(o("export-safetensors"), "logits", 10),
        [st],
    )
    E("export-safetensors-truncated", ["--weights", st_bad], (2,), inputs=[st_bad])
    # ---- arch
    E("export-r18-as-resnet34", ["--weights", good, "--arch", "resnet34"], (2,), inputs=[good])
    E("export-r18-as-resnet50", ["--weights", good, "--arch", "resnet50"], (2,), inputs=[good])
    E("export-r34-as-resnet18", ["--weights", r34, "--arch", "resnet18"], (2,), inputs=[r34])
    E(
        "export-r34-auto",
        ["--weights", r34],
        (0,),
        expect_output(o("export-r34-auto"), "logits", 10),
        [r34],
    )
    # big members: made once each, removed after use
    r50 = save(make_state_dict("resnet50"), ck / "resnet50.pth")
    E(
        "export-r50-as-resnext50",
        ["--weights", r50, "--arch", "resnext50_32x4d"],
        (2,),
        inputs=[r50],
    )
    E("export-r50-as-wide50", ["--weights", r50, "--arch", "wide_resnet50_2"], (2,), inputs=[r50])
    E("export-r50-as-resnet101", ["--weights", r50, "--arch", "resnet101"], (2,), inputs=[r50])
    E(
        "export-r50-no-fc-features",
        ["--weights", r50, "--features", "--simplify", "none"],
        (0,),
        expect_output(o("export-r50-no-fc-features"), "features", 2048),
        [r50],
    )
    r50.unlink()
    rx = make_state_dict("resnext50_32x4d")
    rx_bad = dict(rx)
    rx_bad["layer1.0.conv2.weight"] = torch.randn(128, 128, 3, 3) * 0.03  # groups=1 shape
    rx_bad_p = save(rx_bad, ck / "resnext50_wrong_groups.pth")
    del rx_bad
    E("export-resnext-wrong-groups", ["--weights", rx_bad_p], (2,), inputs=[rx_bad_p])
    E(
        "export-resnext-wrong-groups-arch",
        ["--weights", rx_bad_p, "--arch", "resnext50_32x4d"],
        (2,),
        inputs=[rx_bad_p],
    )
    rx_bad_p.unlink()
    rx_p = save(rx, ck / "resnext50.pth")
    del rx
    E("export-resnext-as-resnet50", ["--weights", rx_p, "--arch", "resnet50"], (2,), inputs=[rx_p])
    rx_p.unlink()
    w = make_state_dict("wide_resnet50_2")
    w_p = save(w, ck / "wide50.pth")
    del w
    E("export-wide50-as-resnet50", ["--weights", w_p, "--arch", "resnet50"], (2,), inputs=[w_p])
    w_p.unlink()
    r101 = make_state_dict("resnet101")
    r101_p = save(r101, ck / "resnet101.pth")
    del r101
    E(
        "export-r101-as-resnet152",
        ["--weights", r101_p, "--arch", "resnet152"],
        (2,),
        inputs=[r101_p],
    )
    E("export-r101-as-resnet50", ["--weights", r101_p, "--arch", "resnet50"], (2,), inputs=[r101_p])
    r101_p.unlink()

    # ---- parity with checkpoints
    r18 = r18_onnx()
    feats = o("export-fc-features")
    def P(cid, args, expect, check=None, inputs=()):
        return cli(
            A, cid, ["parity", *args, "--images", photos], expect, inputs=[photos, *inputs],
            check=check,
        )

    def passed_json(res):
        if res.rc == 0:
            d = json.loads(res.out)
            if d.get("passed") is not True:
                return "exit 0 but the JSON says passed != true"
        return None

    P(
        "parity-r18-ckpt",
        ["--weights", good, "--model", r18, "--json", "-"],
        (0,),
        passed_json,
        [good, r18],
    )
    P("parity-fc7-vs-10-class-model", ["--weights", fc7, "--model", r18], (2,), inputs=[fc7, r18])
    P("parity-r34-ckpt-vs-r18-model", ["--weights", r34, "--model", r18], (1, 2), inputs=[r34, r18])
    P("parity-no-fc-vs-logits-model", ["--weights", nofc, "--model", r18], (2,), inputs=[nofc, r18])
    if feats.exists():
        P(
            "parity-no-fc-vs-features-model",
            ["--weights", nofc, "--model", feats],
            (0,),
            inputs=[nofc, feats],
        )
        P(
            "parity-fc-ckpt-vs-features-model",
            ["--weights", good, "--model", feats],
            (0, 2),
            inputs=[good, feats],
        )
    P("parity-garbage-ckpt", ["--weights", garbage, "--model", r18], (2,), inputs=[garbage, r18])
    P("parity-pickle-exploit", ["--weights", evil, "--model", r18], (2,), no_marker, [evil, r18])
    P("parity-scaled-ckpt", ["--weights", scaled, "--model", r18], (1,), inputs=[scaled, r18])
    r34_onnx = o("export-r34-auto")
    if r34_onnx.exists():
        P(
            "parity-r18-ckpt-vs-r34-model",
            ["--weights", good, "--model", r34_onnx],
            (1, 2),
            inputs=[good, r34_onnx],
        )
    # ---- evaluate
    dev = image_folder("dev5", DATA / "cifar10-dev", 5)

    def top1_ok(res):
        if res.rc == 0:
            txt = res.out
            m = re.findall(r'"top1"\s*:\s*([0-9.]+)', txt)
            if not m:
                return "exit 0 but no top1 in the JSON"
            if float(m[0]) < 0.4:
                return f"exit 0 with top-1 {m[0]} for the trained CIFAR-10 model"
        return None

    cli(
        A,
        "evaluate-r18",
        ["evaluate", "--model", r18, "--images", dev, "--json", "-"],
        (0,),
        [dev, r18],
        top1_ok,
    )
    fc7_onnx = o("export-fc7-head")
    if fc7_onnx.exists():
        cli(
            A,
            "evaluate-7-class-model-10-folders",
            ["evaluate", "--model", fc7_onnx, "--images", dev],
            (2,),
            [dev, fc7_onnx],
        )
    if feats.exists():
        cli(
            A,
            "evaluate-features-model",
            ["evaluate", "--model", feats, "--images", dev],
            (2,),
            [dev, feats],
        )
    cli(
        A,
        "evaluate-checkpoint-as-model",
        ["evaluate", "--model", good, "--images", dev],
        (2,),
        [dev, good],
    )
    # ---- quantize
    calib = image_folder("calib48", DATA / "cifar10-calib", 48, per_class=False)
    q = out / "q.int8.onnx"

    def q_check(res):
        if res.rc == 0 and not q.exists():
            return "exit 0 but no INT8 model written"
        return None

    cli(
        A,
        "quantize-r18",
        ["quantize", "--model", r18, "--calibration", calib, "--num-samples", "32", "-o", q],
        (0, 1),
        [calib, r18],
        q_check,
    )
    if feats.exists():
        cli(
            A,
            "quantize-features-model",
            [
                "quantize",
                "--model",
                feats,
                "--calibration",
                calib,
                "--num-samples",
                "32",
                "-o",
                out / "feat.int8.onnx",
            ],
            (0, 1),
            [calib, feats],
        )
    cli(
        A,
        "quantize-output-is-input",
        ["quantize", "--model", r18, "--calibration", calib, "--num-samples", "32", "-o", r18],
        (2,),
        [calib, r18],
    )
    cli(
        A,
        "quantize-checkpoint-as-model",
        [
            "quantize",
            "--model",
            good,
            "--calibration",
            calib,
            "--num-samples",
            "8",
            "-o",
            out / "ck.int8.onnx",
        ],
        (2,),
        [calib, good],
    )
    emptydir = fixdir("empty_dir")
    cli(
        A,
        "quantize-empty-calibration",
        ["quantize", "--model", r18, "--calibration", emptydir, "-o", out / "e.int8.onnx"],
        (2,),
        [r18],
    )


# =========================================================================== area: layerwise
def torch_resnet18(sd):
    """A torchvision-like ResNet-18 module (own code, same module names), loaded with sd."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x):
            idt = x if self.downsample is None else self.downsample(x)
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return self.relu(y + idt)

    class Net(nn.Module):
        def __init__(self, classes):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            cin = 64
            for i, c in enumerate([64, 128, 256, 512], start=1):
                st = 1 if i == 1 else 2
                setattr(self, f"layer{i}", nn.Sequential(Block(cin, c, st), Block(c, c, 1)))
                cin = c
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(512, classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    net = Net(sd["fc.weight"].shape[0])
    net.load_state_dict(sd)
    return net.eval()


def foreign_onnx(path, strip=True):
    """torch.onnx.export of our own module: no resnet-deploy metadata, node names stripped."""
    import onnx
    import torch

    net = torch_resnet18(load_ckpt())
    x = torch.randn(1, 3, 64, 64)
    tmp = Path(str(path) + ".raw.onnx")
    with torch.no_grad():
        torch.onnx.export(
            net,
            (x,),
            str(tmp),
            dynamo=False,
            input_names=["x"],
            output_names=["out"],
            dynamic_axes={"x": {0: "n"}, "out": {0: "n"}},
            opset_version=17,
        )
    m = onnx.load(str(tmp))
    tmp.unlink()
    if strip:
        for n in m.graph.node:
            n.name = ""
            n.doc_string = ""
        del m.metadata_props[:]
        m.doc_string = ""
    onnx.save(m, str(path))
    return Path(path)


def lw_of(d):
    """The layerwise blocks of a parity JSON, one per result."""
    return [r.get("layerwise") for r in d.get("results", [])]


def fd_name(fd):
    if fd is None:
        return None
    if isinstance(fd, dict):
        return fd.get("layer") or fd.get("name")
    return str(fd)


def lw_consistency(lw):
    """first_divergence must be the first failing layer, with every layer before it passing."""
    if lw is None:
        return "no layerwise block in the JSON"
    if not isinstance(lw, dict):
        return f"layerwise is {type(lw).__name__}"
    if "unavailable" in lw:
        return (
            None if str(lw["unavailable"]).strip() else "layerwise unavailable with an empty reason"
        )
    layers = lw.get("layers")
    if not isinstance(layers, list) or not layers:
        return "layerwise has no layers"
    first_fail = next((ln for ln in layers if not ln.get("passes")), None)
    fd = fd_name(lw.get("first_divergence"))
    if first_fail is None and fd is not None:
        return f"first_divergence {fd} although every layer passes"
    if first_fail is not None and fd != first_fail.get("layer"):
        return f"first_divergence {fd} but the first failing layer is {first_fail.get('layer')}"
    return None


def area_layerwise():
    import onnx

    A = "layerwise"
    photos = photos10()
    r18 = r18_onnx()
    md = fixdir("lw_models")
    out = fixdir("lw_out")
    base = load_ckpt()
    sd = dict(base)
    sd["layer3.0.conv2.weight"] = base["layer3.0.conv2.weight"] * 1.3
    scaled_ck = save(sd, fixdir("ckpts") / "lw_scaled.pth")
    sd = dict(base)
    sd["layer1.0.conv1.weight"] = base["layer1.0.conv1.weight"] * 1.3
    scaled1_ck = save(sd, fixdir("ckpts") / "lw_scaled_l1.pth")
    scaled = build_export("r18_scaled", ["--weights", scaled_ck, *SIZE, "--parity-images", photos])
    scaled1 = build_export(
        "r18_scaled_l1", ["--weights", scaled1_ck, *SIZE, "--parity-images", photos]
    )
    static = build_export(
        "r18_static", ["--weights", CKPT, *SIZE, "--parity-images", photos, "--static-batch"]
    )
    env = dict(os.environ, TMPDIR=str(fixdir("tmp")))
    fp16 = md / "r18.fp16.onnx"
    subprocess.run(
        [RD, "convert-fp16", "--model", r18, "-o", fp16, "--check-images", photos],
        env=env,
        capture_output=True,
        timeout=600,
    )
    int8 = md / "r18.int8.onnx"
    calib = image_folder("calib48", DATA / "cifar10-calib", 48, per_class=False)
    subprocess.run(
        [
            RD,
            "quantize",
            "--model",
            r18,
            "--calibration",
            calib,
            "--num-samples",
            "32",
            "--no-check",
            "-o",
            int8,
        ],
        env=env,
        capture_output=True,
        timeout=900,
    )
    for f in (fp16, int8):
        if not f.exists():
            raise RuntimeError(f"fixture {f.name} was not made")
    foreign = foreign_onnx(md / "foreign.onnx")
    ext = md / "external.onnx"
    m = onnx.load(str(r18))
    onnx.save(
        m,
        str(ext),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="external.onnx.data",
    )
    ext_data = md / "external.onnx.data"
    m = onnx.load(str(r18))
    ext0 = (
        md / "external0.onnx"
    )  # every tensor outside, even ReduceMean's axes (onnxruntime cannot load that)
    onnx.save(
        m,
        str(ext0),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="external0.onnx.data",
        size_threshold=0,
    )
    golden = md / "golden.npz"
    subprocess.run(
        [RD, "parity", "--model", r18, "--random", "4", "--save-outputs", golden],
        env=env,
        capture_output=True,
        timeout=600,
    )
    W = ["--weights", CKPT]
    IM = ["--images", photos]

    def jpath(cid):
        return out / f"{cid}.json"

    def LW(cid, args, expect, checks=(), inputs=(), json_to_file=True, **kw):
        j = jpath(cid)
        extra = ["--json", j] if json_to_file else []

        def check(res):
            if res.rc not in (0, 1):
                return None
            d = json.loads(j.read_text()) if json_to_file else json.loads(res.out)
            for c in checks:
                r = c(d, res)
                if r:
                    return r
            return None

        return cli(
            A, cid, ["parity", *args, *extra], expect, inputs=[photos, *inputs], check=check, **kw
        )

    def consistent(d, res):
        for i, r0 in enumerate(d.get("results", [])):
            if r0.get("skipped"):
                continue
            r = lw_consistency(r0.get("layerwise"))
            if r:
                return f"result {i}: {r}"
        return None

    def first_is(name):
        def c(d, res):
            lws = lw_of(d)
            if not lws or not isinstance(lws[0], dict) or "layers" not in lws[0]:
                return f"no layers to name {name}: {str(lws)[:150]}"
            fd = fd_name(lws[0].get("first_divergence"))
            if fd != name:
                return f"first divergence {fd}, expected {name}"
            layers = lws[0]["layers"]
            idx = (
                [ln.get("layer") for ln in layers].index(name)
                if name in [ln.get("layer") for ln in layers]
                else -1
            )
            if idx < 0:
                return f"{name} not among the layers"
            if any(not ln.get("passes") for ln in layers[:idx]):
                return "a layer before the first divergence fails"
            if name != layers[0].get("layer") and idx == 0:
                return "no layer before it was compared"
            return None

        return c

    def has_layers(n_results=1):
        def c(d, res):
            lws = lw_of(d)
            if len(lws) < n_results:
                return f"{len(lws)} results, expected {n_results}"
            for i, lw in enumerate(lws):
                if not isinstance(lw, dict) or not lw.get("layers"):
                    return f"result {i} has no compared layers: {str(lw)[:160]}"
            return None

        return c

    def images_at_most(n):
        def c(d, res):
            for lw in lw_of(d):
                if isinstance(lw, dict) and "images" in lw and not (1 <= int(lw["images"]) <= n):
                    return f"layerwise reports {lw['images']} images, but only {n} inputs exist"
            return None

        return c

    def healthy(d, res):
        for lw in lw_of(d):
            if isinstance(lw, dict) and lw.get("first_divergence") is not None:
                return f"healthy model but first divergence {fd_name(lw['first_divergence'])}"
        return None

    def no_layerwise(d, res):
        if any("layerwise" in r for r in d.get("results", [])):
            return "a run without --layerwise has a layerwise block"
        return None

    def same_rc_as_plain(args):
        """The exit code of the same parity run without --layerwise."""
        plain = [a for a in args if a != "--layerwise"]
        r = subprocess.run(
            [RD, "parity", *map(str, plain)], capture_output=True, env=env, timeout=900
        )
        return r.returncode

    # ---- healthy and scaled
    LW(
        "healthy-fp32",
        [*W, "--model", r18, *IM, "--layerwise"],
        (0,),
        [consistent, has_layers(), healthy],
        [r18],
    )
    LW(
        "healthy-json-stdout",
        [*W, "--model", r18, *IM, "--layerwise", "--json", "-"],
        (0,),
        [consistent, has_layers(), healthy],
        [r18],
        json_to_file=False,
    )
    LW(
        "scaled-layer3.0.conv2",
        [*W, "--model", scaled, *IM, "--layerwise"],
        (1,),
        [consistent, first_is("layer3.0.conv2")],
        [scaled],
    )
    LW(
        "scaled-layer1.0.conv1",
        [*W, "--model", scaled1, *IM, "--layerwise"],
        (1,),
        [consistent, first_is("layer1.0.conv1")],
        [scaled1],
    )
    LW(
        "scaled-vs-reference-model",
        ["--reference", f"{r18}@cpu", "--model", scaled, *IM, "--layerwise"],
        (1,),
        [consistent, first_is("layer3.0.conv2")],
        [scaled, r18],
    )
    LW("scaled-without-layerwise", [*W, "--model", scaled, *IM], (1,), [no_layerwise], [scaled])
    LW("healthy-without-layerwise", [*W, "--model", r18, *IM], (0,), [no_layerwise], [r18])
    LW(
        "atol0-rtol0-every-layer",
        [*W, "--model", r18, *IM, "--layerwise", "--atol", "0", "--rtol", "0"],
        (1,),
        [consistent],
        [r18],
    )
    # ---- usage errors
    cli(
        A,
        "images-without-layerwise",
        ["parity", *W, "--model", r18, *IM, "--layerwise-images", "4"],
        (2,),
        [r18],
    )
    cli(
        A,
        "layerwise-with-load-outputs",
        ["parity", "--model", r18, "--random", "4", "--load-outputs", golden, "--layerwise"],
        (2,),
        [r18, golden],
    )
    cli(
        A,
        "layerwise-images-0",
        ["parity", *W, "--model", r18, *IM, "--layerwise", "--layerwise-images", "0"],
        (2,),
        [r18],
    )
    cli(
        A,
        "layerwise-images-negative",
        ["parity", *W, "--model", r18, *IM, "--layerwise", "--layerwise-images", "-5"],
        (2,),
        [r18],
    )
    cli(
        A,
        "layerwise-images-text",
        ["parity", *W, "--model", r18, *IM, "--layerwise", "--layerwise-images", "all"],
        (2,),
        [r18],
    )
    cli(
        A,
        "layerwise-reference-torch-no-weights",
        ["parity", "--model", r18, *IM, "--reference", "torch", "--layerwise"],
        (2,),
        [r18],
    )
    cli(
        A,
        "layerwise-reference-missing-file",
        ["parity", "--model", r18, *IM, "--reference", f"{out}/nope.onnx@cpu", "--layerwise"],
        (2,),
        [r18],
    )
    cli(
        A,
        "layerwise-reference-cuda",
        ["parity", "--model", r18, *IM, "--reference", f"{r18}@cuda", "--layerwise"],
        (2,),
        [r18],
    )
    cli(
        A,
        "layerwise-provider-tensorrt",
        ["parity", *W, "--model", r18, *IM, "--provider", "tensorrt", "--layerwise"],
        (2,),
        [r18],
    )
    cli(
        A,
        "layerwise-provider-cpu-cuda",
        ["parity", *W, "--model", r18, *IM, "--provider", "cpu,cuda", "--layerwise"],
        (2,),
        [r18],
    )
    # ---- counts
    LW(
        "layerwise-images-100000",
        [*W, "--model", r18, *IM, "--layerwise", "--layerwise-images", "100000"],
        (0,),
        [consistent, has_layers(), images_at_most(10)],
        [r18],
        timeout=900,
    )
    LW(
        "layerwise-images-1",
        [*W, "--model", r18, *IM, "--layerwise", "--layerwise-images", "1"],
        (0,),
        [consistent, has_layers(), images_at_most(1)],
        [r18],
    )
    LW(
        "layerwise-limit-3",
        [*W, "--model", r18, *IM, "--limit", "3", "--layerwise"],
        (0,),
        [consistent, has_layers(), images_at_most(3)],
        [r18],
    )
    LW(
        "layerwise-random-4-huge",
        [*W, "--model", r18, "--random", "4", "--layerwise", "--layerwise-images", "100000"],
        (0,),
        [consistent, has_layers(), images_at_most(4)],
        [r18],
    )
    LW(
        "layerwise-batch-size-1",
        [*W, "--model", r18, *IM, "--batch-size", "1", "--layerwise"],
        (0,),
        [consistent, has_layers()],
        [r18],
    )
    # ---- kinds of models
    LW(
        "static-batch",
        [*W, "--model", static, *IM, "--layerwise"],
        (0,),
        [consistent, has_layers(), healthy],
        [static],
    )
    LW(
        "static-batch-batch-size-3",
        [*W, "--model", static, *IM, "--batch-size", "3", "--layerwise"],
        (0, 2),
        [consistent, has_layers()],
        [static],
    )
    LW(
        "fp16",
        [*W, "--model", fp16, *IM, "--layerwise"],
        (0,),
        [consistent, has_layers(), healthy],
        [fp16],
    )
    LW(
        "fp16-min-cosine-1",
        [*W, "--model", fp16, *IM, "--layerwise", "--min-cosine", "1"],
        (1,),
        [consistent],
        [fp16],
    )
    int8_args = [*W, "--model", int8, *IM, "--layerwise"]
    int8_rc = same_rc_as_plain(int8_args + ["--json", out / "int8-plain.json"])
    LW("int8-exit-code-is-parity's", int8_args, (int8_rc,), [consistent, has_layers()], [int8])
    plain8 = json.loads((out / "int8-plain.json").read_text())

    def same_verdicts_as_plain(d, res):
        a = [
            (r.get("backend"), r.get("passed"), r.get("max_abs_diff")) for r in d.get("results", [])
        ]
        b = [
            (r.get("backend"), r.get("passed"), r.get("max_abs_diff"))
            for r in plain8.get("results", [])
        ]
        return None if a == b else f"verdicts differ from the run without --layerwise: {a} vs {b}"

    LW("int8-same-verdicts-as-plain", int8_args, (int8_rc,), [same_verdicts_as_plain], [int8])
    LW(
        "reference-is-the-model",
        ["--reference", f"{r18}@cpu", "--model", r18, *IM, "--layerwise"],
        (0, 2),
        [consistent, has_layers(), healthy],
        [r18],
    )
    cli(
        A,
        "json-path-is-the-model",
        ["parity", *W, "--model", r18, *IM, "--layerwise", "--json", r18],
        (2,),
        [r18],
    )
    cli(
        A,
        "save-outputs-path-is-the-model",
        ["parity", *W, "--model", r18, *IM, "--layerwise", "--save-outputs", r18],
        (2,),
        [r18],
    )
    cli(
        A,
        "layerwise-output-name-missing",
        ["parity", *W, "--model", r18, *IM, "--layerwise", "--output-name", "nope"],
        (2,),
        [r18],
    )
    cli(
        A,
        "layerwise-input-size-mismatch",
        ["parity", *W, "--model", r18, *IM, "--layerwise", "--input-size", "32"],
        (2,),
        [r18],
    )
    r34ck = save(make_state_dict("resnet34"), fixdir("ckpts") / "lw_r34.pth")
    LW(
        "layerwise-other-arch-weights",
        ["--weights", r34ck, "--model", r18, *IM, "--layerwise"],
        (1, 2),
        [consistent],
        [r18, r34ck],
    )
    ts = build_export(
        "r18_ts13",
        [
            "--weights",
            CKPT,
            *SIZE,
            "--parity-images",
            photos,
            "--exporter",
            "torchscript",
            "--opset",
            "13",
        ],
    )
    LW(
        "torchscript-opset13-export",
        [*W, "--model", ts, *IM, "--layerwise"],
        (0,),
        [consistent, has_layers(), healthy],
        [ts],
    )

    def names_are_pytorch(d, res):
        lw = lw_of(d)[0]
        if isinstance(lw, dict) and lw.get("layers"):
            bad = [
                ln.get("layer")
                for ln in lw["layers"]
                if not re.match(
                    r"^(conv1|maxpool|avgpool|fc|layer[1-4](\.\d+)?(\.(conv\d|downsample\.0))?)$",
                    str(ln.get("layer")),
                )
            ]
            if bad:
                return f"layers not named by PyTorch module: {bad[:4]}"
        return None

    LW(
        "foreign-stripped-vs-torch",
        [*W, "--model", foreign, *IM, *SIZE, "--layerwise"],
        (0,),
        [consistent, names_are_pytorch],
        [foreign],
    )
    LW(
        "healthy-layer-names",
        [*W, "--model", r18, *IM, "--layerwise"],
        (0,),
        [names_are_pytorch],
        [r18],
    )
    LW(
        "foreign-stripped-vs-reference",
        ["--reference", f"{r18}@cpu", "--model", foreign, *IM, *SIZE, "--layerwise"],
        (0,),
        [consistent],
        [foreign, r18],
    )
    LW(
        "external-data",
        [*W, "--model", ext, *IM, "--layerwise"],
        (0,),
        [consistent, has_layers(), healthy],
        [ext, ext_data],
    )
    LW(
        "external-data-all-tensors",
        [*W, "--model", ext0, *IM, "--layerwise"],
        (0, 2),
        [consistent, has_layers(), healthy],
        [ext0, md / "external0.onnx.data"],
    )
    noext = md / "noext.onnx"
    onnx.save(
        onnx.load(str(r18)),
        str(noext),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="noext.onnx.data",
    )
    (md / "noext.onnx.data").unlink()
    cli(
        A,
        "external-data-file-missing",
        ["parity", *W, "--model", noext, *IM, "--layerwise"],
        (2,),
        [noext],
    )
    LW(
        "several-models",
        [*W, "--model", r18, "--model", fp16, "--model", int8, *IM, "--layerwise"],
        (0, 1),
        [consistent, has_layers(3)],
        [r18, fp16, int8],
    )
    multi_args = [*W, "--model", r18, "--model", fp16, "--model", int8, *IM, "--layerwise"]
    multi_rc = same_rc_as_plain(multi_args)
    LW(
        "several-models-exit-code-is-parity's",
        multi_args,
        (multi_rc,),
        [consistent],
        [r18, fp16, int8],
    )

    def cuda_skipped(d, res):
        for r in d.get("results", []):
            if r.get("provider") == "cuda" and not r.get("skipped"):
                return "the cuda pair is not reported as skipped"
        return None

    LW(
        "providers-skip-unavailable",
        [*W, "--model", r18, *IM, "--provider", "cpu,cuda", "--skip-unavailable", "--layerwise"],
        (0,),
        [consistent, cuda_skipped],
        [r18],
    )
    LW(
        "reference-fp16-model",
        ["--reference", f"{fp16}@cpu", "--model", r18, *IM, "--layerwise"],
        (0, 1),
        [consistent, has_layers()],
        [r18, fp16],
    )
    LW(
        "save-outputs-with-layerwise",
        [*W, "--model", r18, *IM, "--layerwise", "--save-outputs", out / "g2.npz"],
        (0,),
        [consistent, has_layers()],
        [r18],
    )
    # ---- interrupted
    long = [
        "parity",
        *W,
        "--model",
        r18,
        "--random",
        "1500",
        "--layerwise",
        "--layerwise-images",
        "100000",
    ]
    for name, sig, code in (("sigint", signal.SIGINT, 130), ("sigterm", signal.SIGTERM, 143)):
        for when in (1.5, 9):
            j = out / f"{name}-{when}.json"
            cli(
                A,
                f"{name}-at-{when}s-during-layerwise",
                [*long, "--json", j],
                (code,),
                [r18],
                check=no_file(j),
                signal_after=(when, sig),
            )


# =========================================================================== servers
READY_LINE = "Ctrl-C or SIGTERM stops it"


class Server:
    """`resnet-deploy serve REPO` started by this script (127.0.0.1, free ports), stopped by PID."""

    def __init__(self, cid, repo, args=(), inputs=()):
        self.cid = cid
        self.repo = Path(repo)
        self.obs = Observer(cid, inputs)
        self.outf = self.obs.tmpdir.parent / f"{self.obs.tmpdir.name}.stdout"
        self.errf = self.obs.tmpdir.parent / f"{self.obs.tmpdir.name}.stderr"
        self.args = list(args) or ["--http-port", "0", "--grpc-port", "0", "--no-metrics"]
        self.proc = None
        self.http = self.grpc = None
        self.seen = 0  # how much of stdout+stderr has been checked for tracebacks

    def start(self, timeout=150):
        self.t0 = time.time()
        self.proc = subprocess.Popen(
            [RD, "serve", str(self.repo), *map(str, self.args)],
            cwd=self.obs.tmpdir.parent,
            env=self.obs.env(),
            stdin=subprocess.DEVNULL,
            stdout=open(self.outf, "wb"),
            stderr=open(self.errf, "wb"),
            start_new_session=True,
        )
        self.obs.saw(self.proc.pid)
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.out()
            if READY_LINE in out:
                m = re.search(r"http\s+http://127\.0\.0\.1:(\d+)", out)
                g = re.search(r"grpc\s+127\.0\.0\.1:(\d+)", out)
                self.http = int(m.group(1)) if m else None
                self.grpc = int(g.group(1)) if g else None
                self.obs.saw()
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.3)
        return False

    def out(self):
        return self.outf.read_text(errors="replace")

    def err(self):
        return self.errf.read_text(errors="replace")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def new_output(self):
        both = self.out() + self.err()
        new = both[self.seen :]
        self.seen = len(both)
        return new

    def stop(self, sig=signal.SIGTERM, wait=25.0):
        """Signal the process group; returns (rc, seconds, problems)."""
        problems = []
        if self.proc is None:
            return None, 0, problems
        self.obs.saw()
        t = time.time()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except OSError:
                pass
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                problems.append(f"still running {wait:.0f}s after {signal.Signals(sig).name}")
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        rc = self.proc.returncode
        if rc is not None and rc < 0:
            problems.append(f"killed by signal {-rc} without handling it")
            rc = 128 - rc
        return rc, time.time() - t, problems

    def finish(self, area, cid, sig=signal.SIGTERM, expect=None, extra=()):
        """Stop it and record a case for how it stopped and what it left."""
        if expect is None:
            expect = (143,) if sig == signal.SIGTERM else (130,) if sig == signal.SIGINT else (0,)
        was_alive = self.alive()
        rc, secs, problems = self.stop(sig)
        if was_alive and rc not in expect:
            problems.append(f"exit {rc}, expected {'/'.join(map(str, expect))}")
        problems += message_problems(rc, self.out(), self.err(), self.obs.tmpdir) if rc else []
        problems += list(extra)
        problems += self.obs.leftovers(wait=8)
        record(
            area,
            cid,
            not problems,
            "; ".join(problems) if problems else f"exit {rc} in {secs:.1f}s",
        )
        return rc

    def kill_quietly(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=25)
            except Exception:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except OSError:
                    pass
        self.obs.leftovers(wait=8)  # kills and unlinks what is ours


def http_call(port, method, path, body=b"", headers=None, timeout=20):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def raw_send(port, data: bytes, read=True, timeout=10, close_after=0.0):
    """Send raw bytes; returns what came back before the server closed or the timeout."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    got = b""
    try:
        s.sendall(data)
        if close_after:
            time.sleep(close_after)
            return b""
        if read:
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
                    if b"\r\n\r\n" in got:
                        head, _, rest = got.partition(b"\r\n\r\n")
                        m = re.search(rb"content-length:\s*(\d+)", head, re.I)
                        if m and len(rest) >= int(m.group(1)):
                            break
            except TimeoutError:
                pass
    finally:
        s.close()
    return got


def infer_json(name, shape, datatype, data, extra=None):
    d = {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}
    if extra:
        d.update(extra)
    return json.dumps(d).encode()


def is_error(status, body, want=None):
    """A bad request must get an error status and a message (and must not be a 200)."""
    if status < 400:
        return f"answered {status} to a bad request: {body[:120]!r}"
    try:
        msg = json.loads(body).get("error", "")
    except Exception:
        msg = ""
    if not msg:
        return f"error status {status} without an error message: {body[:120]!r}"
    if want and not re.search(want, msg, re.I):
        return f"error message does not say {want!r}: {msg[:150]}"
    return None


class Ref:
    """A fixed input and the logits onnxruntime gives in this process."""

    def __init__(self, model):
        import numpy as np

        self.x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype("float32")
        self.y = run_onnx(model, self.x)


def good_http(srv, ref, model="r18"):
    import numpy as np

    body = infer_json("input", list(ref.x.shape), "FP32", ref.x.flatten().tolist())
    try:
        st, b = http_call(
            srv.http,
            "POST",
            f"/v2/models/{model}/infer",
            body,
            {"Content-Type": "application/json"},
            timeout=30,
        )
    except Exception as exc:
        return f"good request failed: {type(exc).__name__}: {exc}"
    if st != 200:
        return f"good request answered {st}: {b[:150]!r}"
    out = json.loads(b)["outputs"][0]
    y = np.array(out["data"], dtype="float32").reshape(out["shape"])
    if y.shape != ref.y.shape or float(np.abs(y - ref.y).max()) > 1e-4 * max(
        1.0, float(np.abs(ref.y).max())
    ):
        diff = float(np.abs(y - ref.y).max()) if y.shape == ref.y.shape else y.shape
        return f"good request gave other logits (max diff {diff})"
    return None


def req(area, cid, srv, fn, ref, good=None):
    """One bad (or odd) request, then a good one; judged by the rules."""
    t0 = time.time()
    problems = []
    try:
        r = fn()
        if r:
            problems.append(r)
    except TimeoutError:
        problems.append("no answer before the client timeout")
    except Exception as exc:
        problems.append(f"request raised {type(exc).__name__}: {str(exc)[:160]}")
    time.sleep(0.2)
    if not srv.alive():
        problems.append(f"server died (exit {srv.proc.returncode})")
    else:
        g = (good or (lambda: good_http(srv, ref)))()
        if g:
            problems.append(f"after it: {g}")
    new = srv.new_output()
    if TB in new:
        problems.append(
            "traceback in the server's output: "
            + [ln for ln in new.splitlines() if ln.strip()][-1][:160]
        )
    record(
        area,
        cid,
        not problems,
        "; ".join(problems) if problems else f"handled ({time.time() - t0:.1f}s)",
    )
    return not problems


def copy_repo(src, name):
    dst = WORK / "fx" / "repos" / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def make_repo(name, models):
    out = WORK / "fx" / "repos" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    args = [RD, "package", "--format", "triton"]
    for m in models:
        args += ["--model", str(m)]
    r = subprocess.run(
        args + ["-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TMPDIR=str(fixdir("tmp"))),
    )
    if r.returncode != 0:
        raise RuntimeError(f"package failed: {r.stderr[-400:]}")
    return out


def int8_model():
    p = fixdir("models") / "r18.int8.onnx"
    if not p.exists():
        calib = image_folder("calib48", DATA / "cifar10-calib", 48, per_class=False)
        subprocess.run(
            [
                RD,
                "quantize",
                "--model",
                r18_onnx(),
                "--calibration",
                calib,
                "--num-samples",
                "32",
                "--no-check",
                "-o",
                p,
            ],
            capture_output=True,
            timeout=900,
            env=dict(os.environ, TMPDIR=str(fixdir("tmp"))),
        )
    if not p.exists():
        raise RuntimeError("fixture INT8 model was not made")
    return p


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


# =========================================================================== area: serve
def serve_fail(
    area,
    cid,
    repo,
    args=(),
    expect=(2,),
    mention=None,
    inputs=(),
    timeout=180,
    metrics=False,
    probe=None,
    ready_ok=None,
):
    """A `serve` that must not come up: exit `expect`, one error line, nothing left.

    ready_ok(srv) -> None when coming up is acceptable after all (then it must stop with 143);
    probe(srv) -> text added to the reason when it came up although it should not have."""
    srv = Server(
        cid,
        repo,
        [
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            *([] if metrics else ["--no-metrics"]),
            "--ready-timeout",
            "60",
            *args,
        ],
        inputs=inputs,
    )
    problems = []
    rc = None
    try:
        if srv.start(timeout=timeout):
            verdict = (
                ready_ok(srv)
                if ready_ok
                else "came up READY on a repository/options it should refuse"
            )
            if verdict and not ready_ok:
                try:  # does it notice by itself, after announcing it serves?
                    srv.proc.wait(timeout=12)
                    verdict = (
                        "printed the READY banner and endpoints, then exited "
                        f"{srv.proc.returncode} by itself "
                        f"({first_error(srv.err())[:160]})"
                    )
                except subprocess.TimeoutExpired:
                    pass
            if verdict:
                first = srv.out().splitlines()[0] if srv.out() else ""
                problems.append(
                    f"{verdict} (it printed {first[:120]!r})" + (f"; {probe(srv)}" if probe else "")
                )
            rc, _, p = srv.stop(signal.SIGTERM)
            problems += p
            if not verdict and rc != 143:
                problems.append(f"exit {rc} on SIGTERM, expected 143")
        else:
            try:
                srv.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                problems.append(f"neither ready nor exited within {timeout}s")
            rc, _, p = srv.stop(signal.SIGTERM)
            problems += p
            if rc not in expect:
                problems.append(
                    f"exit {rc}, expected {'/'.join(map(str, expect))} ({first_error(srv.err())})"
                )
            problems += message_problems(rc, srv.out(), srv.err(), srv.obs.tmpdir)
            if mention and rc in expect and not re.search(mention, first_error(srv.err()), re.I):
                problems.append(f"error line does not name {mention!r}: {first_error(srv.err())}")
    finally:
        srv.kill_quietly() if srv.alive() else None
    problems += srv.obs.leftovers(wait=8)
    record(
        area,
        cid,
        not problems,
        "; ".join(problems) if problems else f"exit {rc}: {first_error(srv.err())}",
    )


def grpc_client(srv):
    import tritonclient.grpc as grpcclient

    return grpcclient, grpcclient.InferenceServerClient(f"127.0.0.1:{srv.grpc}")


def area_serve():
    import numpy as np

    A = "serve"
    photos = photos10()
    r18 = r18_onnx()
    i8 = int8_model()
    base = make_repo("base", [r18, i8])
    one = make_repo("one", [r18])
    ref = Ref(r18)
    ref8 = Ref(i8)
    url = "/v2/models/r18/infer"

    # ---------------------------------------------------------------- main server, bad requests
    srv = Server("main-server", base, inputs=[base])
    try:
        ok = srv.start()
        record(
            A,
            "start-good-repo",
            ok and srv.http is not None and srv.grpc is not None,
            f"ready, http {srv.http} grpc {srv.grpc}"
            if ok
            else f"did not come up: {first_error(srv.err())}",
        )
        if not ok:
            return
        record(
            A,
            "good-http-fp32",
            not good_http(srv, ref),
            good_http(srv, ref) or "logits as onnxruntime",
        )
        g8 = good_http(srv, ref8, "r18_int8")
        record(A, "good-http-int8", not g8, g8 or "logits as onnxruntime")
        H = {"Content-Type": "application/json"}
        url = "/v2/models/r18/infer"
        x1 = ref.x[:1]

        def post(body, path=url, headers=H, want=None, timeout=30):
            return lambda: is_error(
                *http_call(srv.http, "POST", path, body, headers, timeout=timeout), want=want
            )

        req(
            A,
            "http-wrong-shape",
            srv,
            post(infer_json("input", [1, 3, 32, 32], "FP32", [0.0] * 3072)),
            ref,
        )
        req(
            A,
            "http-wrong-rank",
            srv,
            post(infer_json("input", [3, 64, 64], "FP32", [0.0] * 12288)),
            ref,
        )
        req(
            A,
            "http-wrong-dtype-int32",
            srv,
            post(infer_json("input", [1, 3, 64, 64], "INT32", [0] * 12288)),
            ref,
        )
        req(
            A,
            "http-wrong-dtype-fp16",
            srv,
            post(infer_json("input", [1, 3, 64, 64], "FP16", [0.0] * 12288)),
            ref,
        )
        req(
            A,
            "http-bytes-to-tensor-model",
            srv,
            post(infer_json("input", [1, 1], "BYTES", ["abc"])),
            ref,
        )
        req(A, "http-missing-inputs", srv, post(json.dumps({"inputs": []}).encode()), ref)
        req(A, "http-no-inputs-key", srv, post(b"{}"), ref)
        req(
            A,
            "http-wrong-input-name",
            srv,
            post(infer_json("pixels", [1, 3, 64, 64], "FP32", [0.0] * 12288)),
            ref,
        )
        two = json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 3, 64, 64],
                        "datatype": "FP32",
                        "data": [0.0] * 12288,
                    },
                    {"name": "extra", "shape": [1], "datatype": "FP32", "data": [1.0]},
                ]
            }
        ).encode()
        req(A, "http-extra-input", srv, post(two), ref)
        req(
            A,
            "http-batch-above-max",
            srv,
            post(infer_json("input", [33, 3, 64, 64], "FP32", [0.0] * (33 * 12288))),
            ref,
        )

        def batch0():
            st, b = http_call(
                srv.http, "POST", url, infer_json("input", [0, 3, 64, 64], "FP32", []), H
            )
            if st == 200:
                sh = json.loads(b)["outputs"][0]["shape"]
                return None if sh[0] == 0 else f"batch 0 answered with shape {sh}"
            return is_error(st, b)

        req(A, "http-batch-zero", srv, batch0, ref)
        req(
            A,
            "http-data-count-mismatch",
            srv,
            post(infer_json("input", [1, 3, 64, 64], "FP32", [0.0] * 100)),
            ref,
        )
        req(
            A,
            "http-nan-literal",
            srv,
            post(
                b'{"inputs":[{"name":"input","shape":[1,3,64,64],"datatype":"FP32","data":[NaN]}]}'
            ),
            ref,
        )
        req(
            A,
            "http-string-data",
            srv,
            post(infer_json("input", [1, 3, 64, 64], "FP32", ["a"] * 12288)),
            ref,
        )
        req(A, "http-not-json", srv, post(b"this is not json at all"), ref)
        req(A, "http-json-list", srv, post(b"[1,2,3]"), ref)
        req(A, "http-empty-body", srv, post(b""), ref)
        req(
            A,
            "http-truncated-json",
            srv,
            post(infer_json("input", [1, 3, 64, 64], "FP32", [0.0] * 12288)[:5000]),
            ref,
        )
        req(
            A,
            "http-unknown-output",
            srv,
            post(
                infer_json(
                    "input",
                    [1, 3, 64, 64],
                    "FP32",
                    x1.flatten().tolist(),
                    {"outputs": [{"name": "nope"}]},
                )
            ),
            ref,
        )
        req(
            A,
            "http-unknown-model",
            srv,
            post(
                infer_json("input", [1, 3, 64, 64], "FP32", [0.0] * 12288),
                path="/v2/models/resnet999/infer",
                want="resnet999",
            ),
            ref,
        )
        req(
            A,
            "http-unknown-version",
            srv,
            post(
                infer_json("input", [1, 3, 64, 64], "FP32", [0.0] * 12288),
                path="/v2/models/r18/versions/7/infer",
            ),
            ref,
        )
        req(
            A,
            "http-path-traversal-model",
            srv,
            post(
                infer_json("input", [1, 3, 64, 64], "FP32", [0.0] * 12288),
                path="/v2/models/..%2F..%2Fetc%2Fpasswd/infer",
            ),
            ref,
        )

        # binary tensor extension with lying headers
        raw = x1.tobytes()

        def binary(header_len_delta=0, size_param=None, data=raw, hdr_value=None):
            hdr = json.dumps(
                {
                    "inputs": [
                        {
                            "name": "input",
                            "shape": [1, 3, 64, 64],
                            "datatype": "FP32",
                            "parameters": {
                                "binary_data_size": len(data) if size_param is None else size_param
                            },
                        }
                    ]
                }
            ).encode()
            hv = str(len(hdr) + header_len_delta) if hdr_value is None else hdr_value
            return post(
                hdr + data,
                headers={
                    "Content-Type": "application/octet-stream",
                    "Inference-Header-Content-Length": hv,
                },
            )

        req(A, "http-binary-header-length-too-big", srv, binary(header_len_delta=1000), ref)
        req(A, "http-binary-header-length-beyond-body", srv, binary(header_len_delta=10**7), ref)
        req(A, "http-binary-header-length-negative", srv, binary(hdr_value="-5"), ref)
        req(A, "http-binary-header-length-text", srv, binary(hdr_value="lots"), ref)
        req(A, "http-binary-size-larger-than-data", srv, binary(size_param=len(raw) * 4), ref)
        req(
            A,
            "http-binary-size-smaller-than-tensor",
            srv,
            binary(size_param=100, data=raw[:100]),
            ref,
        )
        req(A, "http-binary-size-huge", srv, binary(size_param=2**62), ref)

        # oversize and broken transport
        def huge_content_length():
            raw_send(
                srv.http,
                (
                    f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {10**12}\r\n\r\n"
                ).encode()
                + b'{"inputs": [',
                timeout=5,
            )
            return None  # any answer or a close is fine; the server must go on

        req(A, "http-huge-content-length", srv, huge_content_length, ref)

        def big_body():
            arr = np.zeros((300, 3, 64, 64), dtype="float32").tobytes()  # 14.7 MB, batch 300 > 32
            hdr = json.dumps(
                {
                    "inputs": [
                        {
                            "name": "input",
                            "shape": [300, 3, 64, 64],
                            "datatype": "FP32",
                            "parameters": {"binary_data_size": len(arr)},
                        }
                    ]
                }
            ).encode()
            return is_error(
                *http_call(
                    srv.http,
                    "POST",
                    url,
                    hdr + arr,
                    {"Inference-Header-Content-Length": str(len(hdr))},
                    timeout=60,
                )
            )

        req(A, "http-oversize-binary-batch-300", srv, big_body, ref)

        def partial_then_close():
            body = infer_json("input", [1, 3, 64, 64], "FP32", x1.flatten().tolist())
            raw_send(
                srv.http,
                (
                    f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode()
                + body[: len(body) // 2],
                close_after=0.3,
            )
            return None

        req(A, "http-client-disconnects-mid-body", srv, partial_then_close, ref)

        def full_then_close():
            body = infer_json(
                "input", [8, 3, 64, 64], "FP32", np.zeros(8 * 12288, "float32").tolist()
            )
            raw_send(
                srv.http,
                (
                    f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode()
                + body,
                close_after=0.05,
            )
            return None

        req(A, "http-client-disconnects-before-answer", srv, full_then_close, ref)

        def many_disconnects():
            body = infer_json("input", [1, 3, 64, 64], "FP32", [0.0] * 12288)
            for i in range(20):
                raw_send(
                    srv.http,
                    (
                        f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
                    ).encode()
                    + body[: (i * 997) % len(body)],
                    close_after=0.01,
                )
            return None

        req(A, "http-20-disconnects", srv, many_disconnects, ref)

        def garbage_http():
            raw_send(srv.http, os.urandom(4096), timeout=5)
            return None

        req(A, "http-random-bytes", srv, garbage_http, ref)

        def bad_chunked():
            raw_send(
                srv.http,
                (
                    f"POST {url} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    "zz\r\nhello\r\n0\r\n\r\n"
                ).encode(),
                timeout=5,
            )
            return None

        req(A, "http-bad-chunked", srv, bad_chunked, ref)

        def long_url():
            try:
                st, b = http_call(
                    srv.http, "POST", "/v2/models/" + "a" * 65536 + "/infer", b"{}", H
                )
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                return None  # refusing the connection is a fine answer to a 64 KB URL
            return None if st >= 400 else f"answered {st}"

        req(A, "http-64k-url", srv, long_url, ref)

        def huge_header():
            try:
                raw_send(
                    srv.http,
                    (
                        "GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n"
                        f"X-Big: {'b' * (1 << 20)}\r\n\r\n"
                    ).encode(),
                    timeout=10,
                )
            except (ConnectionResetError, BrokenPipeError):
                pass  # a reset is a fine answer to a 1 MB header
            return None

        req(A, "http-1mb-header", srv, huge_header, ref)

        def unload():
            st, b = http_call(srv.http, "POST", "/v2/repository/models/r18/unload", b"{}", H)
            return None  # refused or not: the good request that follows must still be answered

        req(A, "http-repository-unload-r18", srv, unload, ref)

        def load_other():
            st, b = http_call(srv.http, "POST", "/v2/repository/models/../../etc/load", b"{}", H)
            return None if st >= 400 else f"answered {st}"

        req(A, "http-repository-load-traversal", srv, load_other, ref)

        # gRPC
        def g_infer(model, arr, dtype="FP32", name="input", shape=None, timeout=30):
            gc, cl = grpc_client(srv)
            inp = gc.InferInput(name, list(arr.shape), dtype)
            inp.set_data_from_numpy(arr)
            if shape is not None:
                del inp._input.shape[:]
                inp._input.shape.extend(shape)
            try:
                return cl.infer(model, [inp], client_timeout=timeout)
            finally:
                cl.close()

        def good_grpc():
            try:
                r = g_infer("r18", ref.x)
            except Exception as exc:
                return f"good gRPC request failed: {str(exc)[:150]}"
            y = r.as_numpy("logits")
            if (
                y is None
                or y.shape != ref.y.shape
                or float(np.abs(y - ref.y).max()) > 1e-4 * float(np.abs(ref.y).max())
            ):
                return "good gRPC request gave other logits"
            return None

        gg = good_grpc()
        record(A, "good-grpc-fp32", not gg, gg or "logits as onnxruntime")

        def g_bad(fn, want=None):
            def run():
                from tritonclient.utils import InferenceServerException

                try:
                    fn()
                except InferenceServerException as exc:
                    if want and not re.search(want, str(exc), re.I):
                        return f"error does not say {want!r}: {str(exc)[:150]}"
                    return None
                return "a bad gRPC request was answered"

            return run

        req(
            A,
            "grpc-wrong-shape",
            srv,
            g_bad(lambda: g_infer("r18", np.zeros((1, 3, 32, 32), "float32"))),
            ref,
            good_grpc,
        )
        req(
            A,
            "grpc-lying-shape",
            srv,
            g_bad(
                lambda: g_infer("r18", np.zeros((1, 3, 64, 64), "float32"), shape=[2, 3, 64, 64])
            ),
            ref,
            good_grpc,
        )
        req(
            A,
            "grpc-wrong-dtype",
            srv,
            g_bad(lambda: g_infer("r18", np.zeros((1, 3, 64, 64), "float64"), "FP64")),
            ref,
            good_grpc,
        )
        req(
            A,
            "grpc-wrong-input-name",
            srv,
            g_bad(lambda: g_infer("r18", np.zeros((1, 3, 64, 64), "float32"), name="x")),
            ref,
            good_grpc,
        )
        req(
            A,
            "grpc-batch-above-max",
            srv,
            g_bad(lambda: g_infer("r18", np.zeros((40, 3, 64, 64), "float32"))),
            ref,
            good_grpc,
        )
        req(
            A,
            "grpc-unknown-model",
            srv,
            g_bad(lambda: g_infer("nope", np.zeros((1, 3, 64, 64), "float32")), "nope"),
            ref,
            good_grpc,
        )
        req(
            A,
            "grpc-bytes-to-tensor-model",
            srv,
            g_bad(lambda: g_infer("r18", np.array([[b"x"]], dtype=object), "BYTES")),
            ref,
            good_grpc,
        )
        req(
            A,
            "grpc-oversize-batch-600",
            srv,
            g_bad(lambda: g_infer("r18", np.zeros((600, 3, 64, 64), "float32"), timeout=60)),
            ref,
            good_grpc,
        )

        def g_cancel():
            from tritonclient.utils import InferenceServerException

            try:
                g_infer("r18", np.zeros((32, 3, 64, 64), "float32"), timeout=0.001)
            except InferenceServerException:
                pass
            return None

        req(A, "grpc-client-deadline-mid-request", srv, g_cancel, ref, good_grpc)

        def g_http_on_grpc_port():
            raw_send(srv.grpc, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout=5)
            raw_send(srv.grpc, os.urandom(2048), timeout=5)
            return None

        req(A, "grpc-port-garbage", srv, g_http_on_grpc_port, ref, good_grpc)

        # ------------------------------------------------ things beside the running server
        p_http = srv.http
        serve_fail(
            A, "port-in-use-by-our-server", one, ["--http-port", str(p_http)], mention=str(p_http)
        )
        B = Server("second-server-same-repo", base, inputs=[])
        try:
            okb = B.start()
            if okb:
                gb = good_http(B, ref)
                ga = good_http(srv, ref)
                B.finish(
                    A,
                    "second-server-same-repo",
                    extra=[
                        x
                        for x in (gb and f"second server: {gb}", ga and f"first server: {ga}")
                        if x
                    ],
                )
            else:
                rc, _, p = B.stop()
                probs = (
                    p
                    + ([] if rc == 2 else [f"exit {rc}, expected 2 (or serving)"])
                    + message_problems(rc, B.out(), B.err(), B.obs.tmpdir)
                )
                ga = good_http(srv, ref)
                probs += [f"first server: {ga}"] if ga else []
                probs += B.obs.leftovers(wait=8)
                record(
                    A,
                    "second-server-same-repo",
                    not probs,
                    "; ".join(probs) or f"refused: {first_error(B.err())}",
                )
        finally:
            B.kill_quietly()

        # SIGTERM with clients connected
        socks = []
        body = infer_json("input", [1, 3, 64, 64], "FP32", [0.0] * 12288)
        for _ in range(3):
            s_ = socket.create_connection(("127.0.0.1", srv.http), timeout=5)
            s_.sendall(
                (f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                + body[:1000]
            )
            socks.append(s_)
        s_ = socket.create_connection(("127.0.0.1", srv.http), timeout=5)
        s_.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        socks.append(s_)
        gs = socket.create_connection(("127.0.0.1", srv.grpc), timeout=5)
        socks.append(gs)
        try:
            srv.finish(A, "sigterm-with-clients-connected", signal.SIGTERM)
        finally:
            for s_ in socks:
                s_.close()
    finally:
        srv.kill_quietly()

    # -------------------------------------------------- repository changes while serving
    mut = copy_repo(base, "mut")
    srv = Server("mutating-repo", mut)
    try:
        if not srv.start():
            record(A, "mutating-repo-start", False, f"did not come up: {first_error(srv.err())}")
        else:

            def change(fn):
                def run():
                    fn()
                    time.sleep(2)
                    return None

                return run

            req(
                A,
                "model-onnx-replaced-by-garbage",
                srv,
                change(lambda: (mut / "r18/1/model.onnx").write_bytes(os.urandom(10000))),
                ref,
            )
            req(
                A,
                "model-onnx-deleted",
                srv,
                change(lambda: (mut / "r18/1/model.onnx").unlink()),
                ref,
            )
            req(
                A,
                "config-pbtxt-edited-to-garbage",
                srv,
                change(lambda: (mut / "r18/config.pbtxt").write_text("max_batch_size: banana {{{")),
                ref,
            )
            req(
                A,
                "int8-config-edited-dims",
                srv,
                change(
                    lambda: (mut / "r18_int8/config.pbtxt").write_text(
                        (mut / "r18_int8/config.pbtxt").read_text().replace("dims: 64", "dims: 32")
                    )
                ),
                ref8,
                lambda: good_http(srv, ref8, "r18_int8"),
            )
            req(
                A,
                "version-folder-added",
                srv,
                change(lambda: shutil.copytree(mut / "r18/1", mut / "r18/2")),
                ref,
            )
            req(A, "repository-deleted", srv, change(lambda: shutil.rmtree(mut)), ref)
            srv.finish(A, "sigterm-after-repository-deleted", signal.SIGTERM)
    finally:
        srv.kill_quietly()

    # -------------------------------------------------- SIGINT with clients, signals at start
    srv = Server("sigint-server", one)
    try:
        if srv.start():
            socks = []
            for _ in range(2):
                s_ = socket.create_connection(("127.0.0.1", srv.http), timeout=5)
                s_.sendall(
                    f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Length: 99999\r\n\r\n{{".encode()
                )
                socks.append(s_)
            try:
                srv.finish(A, "sigint-with-clients-connected", signal.SIGINT)
            finally:
                for s_ in socks:
                    s_.close()
        else:
            record(
                A,
                "sigint-with-clients-connected",
                False,
                f"did not come up: {first_error(srv.err())}",
            )
    finally:
        srv.kill_quietly()
    for name, sig, when in (
        ("sigterm-during-startup", signal.SIGTERM, 1.0),
        ("sigint-during-startup", signal.SIGINT, 2.5),
        ("sigterm-twice", signal.SIGTERM, None),
    ):
        srv = Server(name, base)
        try:
            if when is None:
                srv.start()
                os.killpg(srv.proc.pid, sig)
                time.sleep(0.2)
            else:
                srv.proc = subprocess.Popen(
                    [RD, "serve", str(base), *srv.args],
                    cwd=srv.obs.tmpdir.parent,
                    env=srv.obs.env(),
                    stdin=subprocess.DEVNULL,
                    stdout=open(srv.outf, "wb"),
                    stderr=open(srv.errf, "wb"),
                    start_new_session=True,
                )
                srv.obs.saw(srv.proc.pid)
                time.sleep(when)
                srv.obs.saw()
            srv.finish(A, name, sig)
        finally:
            srv.kill_quietly()

    # triton dies under the server
    srv = Server("triton-killed", one)
    try:
        if srv.start():
            tri = [p for p, c in proc_snapshot().items() if "tritonserver" in c and str(one) in c]
            for p in tri:
                os.kill(p, signal.SIGKILL)
            try:
                srv.proc.wait(timeout=40)
                rc = srv.proc.returncode
                probs = [] if rc in (1, 2) else [f"exit {rc} after Triton died, expected 1/2"]
                probs += message_problems(rc, srv.out(), srv.err(), srv.obs.tmpdir)
            except subprocess.TimeoutExpired:
                probs = ["serve still runs 40s after its Triton was killed (serves nothing)"]
            srv.kill_quietly()
            probs += srv.obs.leftovers(wait=8)
            record(
                A,
                "triton-killed-under-serve",
                not probs,
                "; ".join(probs) or f"exit {rc}: {first_error(srv.err())}",
            )
        else:
            record(
                A, "triton-killed-under-serve", False, f"did not come up: {first_error(srv.err())}"
            )
    finally:
        srv.kill_quietly()

    # -------------------------------------------------- repositories or options it must refuse
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    bp = busy.getsockname()[1]
    try:
        serve_fail(A, "http-port-in-use", one, ["--http-port", str(bp)], mention=str(bp))
        serve_fail(A, "grpc-port-in-use", one, ["--grpc-port", str(bp)], mention=str(bp))
        fp = free_port()
        serve_fail(
            A,
            "metrics-port-in-use",
            one,
            ["--metrics-port", str(bp)],
            mention=str(bp),
            metrics=True,
        )
    finally:
        busy.close()
    fp = free_port()
    serve_fail(
        A,
        "http-and-grpc-same-port",
        one,
        ["--http-port", str(fp), "--grpc-port", str(fp)],
        mention=str(fp),
    )
    bad = copy_repo(one, "corrupt_model")
    (bad / "r18/1/model.onnx").write_bytes(os.urandom(5000))
    serve_fail(A, "corrupt-model-onnx", bad, mention="r18", inputs=[bad])
    bad = copy_repo(one, "bad_config")
    (bad / "r18/config.pbtxt").write_text(
        'name: "r18"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {{{ oops\n'
    )
    serve_fail(A, "bad-config-pbtxt", bad, mention="r18", inputs=[bad])
    bad = copy_repo(one, "wrong_dims")
    (bad / "r18/config.pbtxt").write_text(
        (bad / "r18/config.pbtxt").read_text().replace("dims: 10", "dims: 1000")
    )

    def probe_dims(srv):
        st, b = http_call(
            srv.http,
            "POST",
            url,
            infer_json("input", [1, 3, 64, 64], "FP32", ref.x[:1].flatten().tolist()),
            {"Content-Type": "application/json"},
        )
        return f"a request then got {st} {b[:150]!r}"

    serve_fail(A, "config-output-dims-disagree", bad, mention="r18", inputs=[bad], probe=probe_dims)
    bad = copy_repo(one, "wrong_name")
    (bad / "r18/config.pbtxt").write_text(
        (bad / "r18/config.pbtxt").read_text().replace('name: "r18"', 'name: "other"')
    )
    serve_fail(A, "config-name-not-folder", bad, mention="r18|other", inputs=[bad])
    bad = copy_repo(one, "no_model_file")
    (bad / "r18/1/model.onnx").unlink()
    serve_fail(A, "model-onnx-missing", bad, mention="r18", inputs=[bad])
    bad = copy_repo(one, "no_model_py")
    (bad / "r18_image/1/model.py").unlink()
    serve_fail(A, "image-model-py-missing", bad, mention=r"model\.py|fail", inputs=[bad])
    bad = copy_repo(one, "swapped_model")
    shutil.copy(
        build_export(
            "r18_feat", ["--weights", CKPT, *SIZE, "--parity-images", photos, "--features"]
        ),
        bad / "r18/1/model.onnx",
    )
    serve_fail(A, "model-swapped-for-features-model", bad, mention="r18", inputs=[bad])
    bad = copy_repo(base, "one_of_two_corrupt")
    (bad / "r18_int8/1/model.onnx").write_bytes(b"\x08\x07" + os.urandom(3000))
    serve_fail(A, "second-model-corrupt", bad, mention="r18_int8", inputs=[bad])
    bad = copy_repo(one, "no_labels")
    (bad / "r18/labels.txt").unlink()
    serve_fail(A, "labels-txt-missing", bad, mention="labels|r18", inputs=[bad])
    bad = copy_repo(one, "zero_instances")
    (bad / "r18/config.pbtxt").write_text(
        (bad / "r18/config.pbtxt").read_text().replace("count: 1", "count: 0")
    )
    # count 0 reads as protobuf's unset, which Triton fills with its default: refusing, or
    # serving right, are both fine
    serve_fail(
        A,
        "instance-count-zero",
        bad,
        mention="r18",
        inputs=[bad],
        ready_ok=lambda srv: good_http(srv, ref),
    )
    bad = copy_repo(one, "mbs_zero")
    (bad / "r18/config.pbtxt").write_text(
        (bad / "r18/config.pbtxt").read_text().replace("max_batch_size: 32", "max_batch_size: 0")
    )
    serve_fail(A, "max-batch-size-zero-on-dynamic", bad, mention="r18", inputs=[bad])
    emptyrepo = fixdir("empty_repo")
    serve_fail(A, "empty-repository", emptyrepo, inputs=[emptyrepo])
    serve_fail(A, "repository-missing", WORK / "fx" / "no_such_repo")
    serve_fail(A, "repository-is-a-file", r18, inputs=[r18])
    serve_fail(
        A,
        "ready-timeout-tiny",
        one,
        ["--ready-timeout", "0.001"],
        expect=(1, 2),
        mention="--ready-timeout",
    )
    serve_fail(A, "ready-timeout-zero", one, ["--ready-timeout", "0"])
    serve_fail(A, "http-port-70000", one, ["--http-port", "70000"])
    serve_fail(A, "host-not-an-address", one, ["--host", "999.1.1.1"])
    serve_fail(A, "triton-bin-false", one, ["--triton-bin", "/bin/false"])
    txt = fixdir("misc") / "notabinary"
    txt.write_text("hello\n")
    serve_fail(A, "triton-bin-text-file", one, ["--triton-bin", txt], inputs=[txt])
    logf = WORK / "fx" / "nodir" / "t.log"
    serve_fail(
        A,
        "log-in-missing-folder",
        one,
        ["--log", logf],
        ready_ok=lambda srv: (
            None
            if logf.exists()
            else f"came up READY but the --log file {logf.name} was never created"
        ),
    )
    serve_fail(A, "log-is-a-folder", one, ["--log", fixdir("misc")])
    serve_fail(A, "prepare-with-repository", one, ["--prepare"])
    cli(A, "no-repository", ["serve"], (2,))

    # ---------------------------------------------------------------- --check-images
    def ck(cid, args, expect, check=None, inputs=()):
        cli(
            A,
            cid,
            ["serve", one, "--http-port", "0", "--grpc-port", "0", "--no-metrics", *args],
            expect,
            inputs=[one, *inputs],
            check=check,
            timeout=400,
        )

    def json_ok(res):
        if res.rc == 0:
            d = json.loads(res.out)
            if d.get("passed") is False:
                return "exit 0 but the JSON says it did not pass"
        return None

    ck(
        "check-images-good",
        ["--check-images", photos, "--limit", "4", "--json", "-"],
        (0,),
        json_ok,
        [photos],
    )
    ck("check-images-missing-folder", ["--check-images", WORK / "fx" / "nothing_here"], (2,))
    ck("check-images-empty-folder", ["--check-images", fixdir("empty_dir")], (2,))
    junk = fixdir("junk_imgs")
    for i in range(3):
        (junk / f"j{i}.jpg").write_bytes(os.urandom(300))
    ck("check-images-only-junk", ["--check-images", junk], (2,), inputs=[junk])
    mixed = fixdir("mixed_imgs")
    for f in sorted(photos.iterdir())[:3]:
        shutil.copy(f, mixed / f.name)
    (mixed / "broken.jpg").write_bytes(sorted(photos.iterdir())[0].read_bytes()[:200])
    ck("check-images-one-broken", ["--check-images", mixed], (0, 2), inputs=[mixed])
    ck("check-images-limit-0", ["--check-images", photos, "--limit", "0"], (2,), inputs=[photos])
    ck(
        "check-images-a-file",
        ["--check-images", sorted(photos.iterdir())[0]],
        (2,),
        inputs=[photos],
    )
    bad = copy_repo(one, "corrupt_for_check")
    (bad / "r18/1/model.onnx").write_bytes(os.urandom(5000))
    cli(
        A,
        "check-images-corrupt-model",
        [
            "serve",
            bad,
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--no-metrics",
            "--check-images",
            photos,
            "--limit",
            "2",
        ],
        (2,),
        inputs=[bad, photos],
        timeout=400,
    )


# =========================================================================== area: photo
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def prep(img, size=64, resize=73):
    """The documented eval transform, written here from the README (for a tolerance check)."""
    import numpy as np
    from PIL import Image

    img = img.convert("RGB")
    w, h = img.size
    sc = resize / min(w, h)
    img = img.resize((max(1, round(w * sc)), max(1, round(h * sc))), Image.BILINEAR)
    w, h = img.size
    ln, t = (w - size) // 2, (h - size) // 2
    img = img.crop((ln, t, ln + size, t + size))
    a = np.asarray(img, dtype="float32") / 255.0
    a = (a - np.array(MEAN, "float32")) / np.array(STD, "float32")
    return a.transpose(2, 0, 1)[None].copy()


def enc(img, fmt, **kw):
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def png_bomb(w=30000, h=30000):
    """A small PNG declaring w x h pixels (1-bit grey, all zero): a decompression bomb."""
    import struct
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    co = zlib.compressobj(9)
    row = b"\0" * (1 + (w + 7) // 8)
    data = b"".join(co.compress(row) for _ in range(h)) + co.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", data)
        + chunk(b"IEND", b"")
    )


def jpeg_huge_header(w=60000, h=60000):
    """The start of a JPEG whose SOF0 declares w x h, then nothing."""
    import struct

    sof = (
        b"\xff\xc0"
        + struct.pack(">HBHHB", 17, 8, h, w, 3)
        + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    )
    return b"\xff\xd8" + sof + b"\xff\xd9"


def _pnginfo_bomb():
    """A zTXt chunk that inflates to 64 MB of text."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "A" * (64 << 20), zip=True)
    return info


def area_photo():
    import numpy as np
    import tritonclient.http as thttp
    from PIL import Image, ImageOps
    from tritonclient.utils import InferenceServerException

    A = "photo"
    photos = photos10()
    r18 = r18_onnx()
    feat = build_export(
        "r18_feat", ["--weights", CKPT, *SIZE, "--parity-images", photos, "--features"]
    )
    repo = make_repo("photo", [r18, feat])
    ref = Ref(r18)
    src = sorted((DATA / "imagenet-samples").iterdir())[0]
    base = Image.open(src).convert("RGB")
    base.thumbnail((200, 200))
    big = Image.open(sorted((DATA / "imagenet-samples").iterdir())[1])
    cifar = sorted(photos.iterdir())[0]
    labels = [ln.strip() for ln in (repo / "r18" / "labels.txt").read_text().splitlines()]

    def expected(img, model=r18):
        return run_onnx(model, prep(img))[0]

    srv = Server("photo-server", repo, inputs=[repo])
    try:
        if not srv.start():
            record(A, "photo-server-start", False, f"did not come up: {first_error(srv.err())}")
            return

        def client():
            return thttp.InferenceServerClient(
                f"127.0.0.1:{srv.http}", network_timeout=60, connection_timeout=10
            )

        def photo(blobs, model="r18_image", out="logits", shape=None, class_count=0):
            arr = np.array([[b] for b in blobs], dtype=object)
            inp = thttp.InferInput("image", list(shape or arr.shape), "BYTES")
            inp.set_data_from_numpy(arr)
            outs = [thttp.InferRequestedOutput(out, class_count=class_count)]
            cl = client()
            try:
                return cl.infer(model, [inp], outputs=outs).as_numpy(out)
            finally:
                cl.close()

        png_base = enc(base, "PNG")
        ref_png = None

        def good():
            try:
                y = photo([png_base])
            except Exception as exc:
                return f"good photo request failed: {str(exc)[:150]}"
            if ref_png is not None and float(np.abs(y[0] - ref_png).max()) > 1e-4 * float(
                np.abs(ref_png).max()
            ):
                return "good photo request gave other logits than before"
            return good_http(srv, ref)

        def close_to(y, want, what, tol=1e-4):
            y = np.asarray(y, dtype="float32").reshape(-1)
            want = np.asarray(want, dtype="float32").reshape(-1)
            if y.shape != want.shape:
                return f"shape {y.shape}, expected {want.shape}"
            d = float(np.abs(y - want).max())
            if not np.isfinite(y).all() or d > tol * max(1.0, float(np.abs(want).max())):
                return f"logits differ from {what} (max diff {d:.3g})"
            return None

        def near(y, want, what):
            y = np.asarray(y, dtype="float64").reshape(-1)
            want = np.asarray(want, dtype="float64").reshape(-1)
            cos = float(y @ want / (np.linalg.norm(y) * np.linalg.norm(want) + 1e-12))
            if cos < 0.995 or int(y.argmax()) != int(want.argmax()):
                return (f"logits far from {what} (cosine {cos:.4f}, top-1 {int(y.argmax())} "
                        f"vs {int(want.argmax())})")
            return None

        # ---- the baseline and every format
        def c_base():
            nonlocal ref_png
            y = photo([png_base])[0]
            ref_png = y
            return near(y, expected(base), "the README's preprocessing done here")

        req(A, "png-rgb-vs-readme-preprocessing", srv, c_base, ref, good)

        def same_as(blob, img_equiv, what, model="r18_image"):
            def run():
                y = photo([blob], model=model)[0]
                want = photo([enc(img_equiv.convert("RGB"), "PNG")], model=model)[0]
                return close_to(y, want, what) or near(
                    y, expected(img_equiv), "the README's preprocessing done here"
                )

            return run

        def succeeds(blob, what=""):
            def run():
                y = photo([blob])
                if y is None or y.shape != (1, 10) or not np.isfinite(y.astype("float32")).all():
                    return f"answer {None if y is None else y.shape} is not 10 finite logits"
                return None

            return run

        def either(blob):
            """An answer (10 finite logits) or an error response are both right."""

            def run():
                try:
                    y = photo([blob])
                except InferenceServerException:
                    return None
                if y is None or y.shape != (1, 10) or not np.isfinite(y.astype("float32")).all():
                    return f"answer {None if y is None else y.shape} is not 10 finite logits"
                return None

            return run

        def fails(blobs, index=None, shape=None, model="r18_image", out="logits"):
            def run():
                t = time.time()
                try:
                    photo(blobs, shape=shape, model=model, out=out)
                except InferenceServerException as exc:
                    msg = str(exc)
                    if index is not None and not re.search(rf"image {index}\b", msg):
                        return f"error does not name image {index}: {msg[:160]}"
                    if time.time() - t > 30:
                        return f"error took {time.time() - t:.0f}s"
                    return None
                return "a bad photo request was answered"

            return run

        jpg = enc(base, "JPEG", quality=92)
        req(
            A,
            "jpeg-rgb",
            srv,
            same_as(jpg, Image.open(io.BytesIO(jpg)), "the PNG of its decoded pixels"),
            ref,
            good,
        )
        req(
            A,
            "jpeg-cifar-32px",
            srv,
            lambda: near(
                photo([cifar.read_bytes()])[0],
                expected(Image.open(cifar)),
                "the README's preprocessing",
            ),
            ref,
            good,
        )
        req(
            A,
            "jpeg-big-imagenet",
            srv,
            lambda: near(
                photo([enc(big.convert("RGB"), "JPEG")])[0],
                expected(Image.open(io.BytesIO(enc(big.convert("RGB"), "JPEG")))),
                "the README's preprocessing",
            ),
            ref,
            good,
        )
        grey = base.convert("L")
        req(
            A,
            "png-greyscale",
            srv,
            same_as(enc(grey, "PNG"), grey, "its RGB conversion"),
            ref,
            good,
        )
        req(
            A,
            "jpeg-greyscale",
            srv,
            same_as(
                enc(grey, "JPEG"), Image.open(io.BytesIO(enc(grey, "JPEG"))), "its RGB conversion"
            ),
            ref,
            good,
        )
        la = base.convert("LA")
        req(
            A,
            "png-grey-alpha-opaque",
            srv,
            same_as(enc(la, "PNG"), grey, "the greyscale image"),
            ref,
            good,
        )
        rgba = base.convert("RGBA")
        req(A, "png-rgba-opaque", srv, same_as(enc(rgba, "PNG"), base, "the RGB image"), ref, good)
        rgba_t = base.convert("RGBA")
        rgba_t.putalpha(Image.linear_gradient("L").resize(base.size))
        req(A, "png-rgba-transparent", srv, succeeds(enc(rgba_t, "PNG")), ref, good)
        pal = base.convert("P", palette=Image.ADAPTIVE, colors=64)
        req(A, "png-palette", srv, same_as(enc(pal, "PNG"), pal, "its RGB conversion"), ref, good)
        pal_t = pal.copy()
        pal_t.info["transparency"] = 0
        req(
            A,
            "png-palette-transparency",
            srv,
            succeeds(enc(pal_t, "PNG", transparency=0)),
            ref,
            good,
        )
        bilevel = base.convert("1")
        req(
            A,
            "png-1-bit",
            srv,
            same_as(enc(bilevel, "PNG"), bilevel, "its RGB conversion"),
            ref,
            good,
        )
        g16 = Image.fromarray((np.asarray(grey, dtype="uint16") * 257).astype("uint16"))
        req(
            A,
            "png-16-bit-grey",
            srv,
            same_as(enc(g16, "PNG"), grey, "the 8-bit greyscale image it scales"),
            ref,
            good,
        )
        cmyk_jpg = enc(base.convert("CMYK"), "JPEG", quality=95)
        req(
            A,
            "jpeg-cmyk",
            srv,
            same_as(cmyk_jpg, Image.open(io.BytesIO(cmyk_jpg)), "Pillow's RGB conversion"),
            ref,
            good,
        )
        req(A, "bmp", srv, same_as(enc(base, "BMP"), base, "the PNG"), ref, good)
        req(
            A,
            "webp-lossless",
            srv,
            same_as(
                enc(base, "WEBP", lossless=True),
                Image.open(io.BytesIO(enc(base, "WEBP", lossless=True))),
                "the PNG",
            ),
            ref,
            good,
        )
        req(
            A,
            "webp-lossy",
            srv,
            same_as(
                enc(base, "WEBP", quality=80),
                Image.open(io.BytesIO(enc(base, "WEBP", quality=80))),
                "the PNG of its pixels",
            ),
            ref,
            good,
        )
        gif = enc(base, "GIF")
        req(
            A,
            "gif",
            srv,
            same_as(gif, Image.open(io.BytesIO(gif)), "its first frame's RGB conversion"),
            ref,
            good,
        )
        frames = [base, base.transpose(Image.FLIP_LEFT_RIGHT)]
        agif = io.BytesIO()
        frames[0].save(agif, "GIF", save_all=True, append_images=frames[1:], duration=100)
        req(
            A,
            "gif-animated",
            srv,
            same_as(agif.getvalue(), Image.open(io.BytesIO(agif.getvalue())), "its first frame"),
            ref,
            good,
        )
        req(A, "tiff", srv, same_as(enc(base, "TIFF"), base, "the PNG"), ref, good)
        req(
            A,
            "tiff-lzw",
            srv,
            same_as(enc(base, "TIFF", compression="tiff_lzw"), base, "the PNG"),
            ref,
            good,
        )
        ftiff = Image.fromarray(np.asarray(grey, dtype="float32") / 255.0, mode="F")
        req(A, "tiff-float", srv, either(enc(ftiff, "TIFF")), ref, good)
        exif = Image.Exif()
        exif[0x0112] = 6
        rot = enc(base, "JPEG", quality=95, exif=exif.tobytes())
        req(
            A,
            "jpeg-exif-rotated",
            srv,
            same_as(rot, ImageOps.exif_transpose(Image.open(io.BytesIO(rot))), "the upright image"),
            ref,
            good,
        )
        req(
            A,
            "png-1x1",
            srv,
            either(enc(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG")),
            ref,
            good,
        )
        req(
            A,
            "png-5000x2",
            srv,
            either(enc(Image.new("RGB", (5000, 2), (10, 200, 10)), "PNG")),
            ref,
            good,
        )

        ztxt = enc(base, "PNG", pnginfo=_pnginfo_bomb())
        req(A, "png-ztxt-metadata-bomb", srv, either(ztxt), ref, good)
        badexif = Image.Exif()
        badexif[0x0112] = 99
        req(
            A,
            "jpeg-exif-orientation-99",
            srv,
            either(enc(base, "JPEG", exif=badexif.tobytes())),
            ref,
            good,
        )
        mp = io.BytesIO()
        base.save(mp, "TIFF", save_all=True, append_images=[grey.convert("RGB")])
        req(A, "tiff-multipage", srv, either(mp.getvalue()), ref, good)

        # ---- broken bytes
        req(A, "jpeg-truncated", srv, fails([jpg[: len(jpg) * 6 // 10]], 0), ref, good)
        req(A, "png-truncated", srv, fails([png_base[: len(png_base) // 2]], 0), ref, good)
        req(A, "png-bomb-30000x30000", srv, fails([png_bomb()], 0), ref, good)
        req(A, "jpeg-header-60000x60000", srv, fails([jpeg_huge_header()], 0), ref, good)
        req(A, "empty-bytes", srv, fails([b""], 0), ref, good)
        req(A, "text-bytes", srv, fails([b"hello, this is not an image"], 0), ref, good)
        req(
            A,
            "pdf-bytes",
            srv,
            fails([b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF"], 0),
            ref,
            good,
        )
        req(
            A,
            "svg-bytes",
            srv,
            fails([b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'], 0),
            ref,
            good,
        )
        req(
            A,
            "heic-like-bytes",
            srv,
            fails([b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + os.urandom(200)], 0),
            ref,
            good,
        )
        req(A, "random-50mb", srv, fails([os.urandom(50 << 20)], 0), ref, good)
        # ---- batches
        req(A, "batch-good-bad-good", srv, fails([png_base, b"garbage", png_base], 1), ref, good)
        req(A, "batch-good-good-empty", srv, fails([png_base, jpg, b""], 2), ref, good)
        req(A, "batch-33-above-max", srv, fails([png_base] * 33), ref, good)

        def batch32():
            y = photo([png_base] * 32)
            if y.shape != (32, 10):
                return f"answer shape {y.shape}"
            return close_to(y[31], ref_png, "the single request")

        req(A, "batch-32-max", srv, batch32, ref, good)
        req(A, "shape-without-batch-dim", srv, fails([png_base], shape=[1]), ref, good)

        def tensor_to_photo():
            inp = thttp.InferInput("image", [1, 1], "FP32")
            inp.set_data_from_numpy(np.zeros((1, 1), "float32"))
            cl = client()
            try:
                cl.infer("r18_image", [inp])
            except InferenceServerException:
                return None
            finally:
                cl.close()
            return "FP32 sent to the photo endpoint was answered"

        req(A, "fp32-to-photo-endpoint", srv, tensor_to_photo, ref, good)

        def lying_bytes_prefix():
            import struct

            data = struct.pack("<I", 10**9) + png_base
            hdr = json.dumps(
                {
                    "inputs": [
                        {
                            "name": "image",
                            "shape": [1, 1],
                            "datatype": "BYTES",
                            "parameters": {"binary_data_size": len(data)},
                        }
                    ]
                }
            ).encode()
            return is_error(
                *http_call(
                    srv.http,
                    "POST",
                    "/v2/models/r18_image/infer",
                    hdr + data,
                    {"Inference-Header-Content-Length": str(len(hdr))},
                )
            )

        req(A, "bytes-length-prefix-lies", srv, lying_bytes_prefix, ref, good)

        def top5():
            y = photo([png_base], class_count=5)
            items = [v.decode() if isinstance(v, bytes) else str(v) for v in y.reshape(-1)]
            if len(items) != 5:
                return f"{len(items)} entries for class_count=5"
            want = labels[int(np.argmax(ref_png))]
            if want not in items[0]:
                return f"top entry {items[0]!r}, expected the label {want!r}"
            return None

        req(A, "class-count-5-labels", srv, top5, ref, good)

        def features():
            y = photo([png_base], model="r18_feat_image", out="features")
            want = run_onnx(feat, prep(base))
            if y.shape != (1, 512):
                return f"features shape {y.shape}"
            return near(y, want, "onnxruntime's features here")

        req(A, "features-model-photo", srv, features, ref, good)
        req(
            A,
            "features-model-broken-photo",
            srv,
            fails([b"nope"], 0, model="r18_feat_image", out="features"),
            ref,
            good,
        )

        def grpc_photo():
            import tritonclient.grpc as g

            cl = g.InferenceServerClient(f"127.0.0.1:{srv.grpc}")
            try:
                inp = g.InferInput("image", [1, 1], "BYTES")
                inp.set_data_from_numpy(np.array([[png_base]], dtype=object))
                y = cl.infer("r18_image", [inp], client_timeout=30).as_numpy("logits")
            finally:
                cl.close()
            return close_to(y[0], ref_png, "the HTTP answer")

        req(A, "grpc-photo", srv, grpc_photo, ref, good)

        def grpc_bad_photo():
            import tritonclient.grpc as g

            cl = g.InferenceServerClient(f"127.0.0.1:{srv.grpc}")
            try:
                inp = g.InferInput("image", [2, 1], "BYTES")
                inp.set_data_from_numpy(
                    np.array([[png_base], [png_bomb(20000, 20000)]], dtype=object)
                )
                cl.infer("r18_image", [inp], client_timeout=60)
            except InferenceServerException as exc:
                return (
                    None
                    if re.search(r"image 1\b", str(exc))
                    else f"error does not name image 1: {str(exc)[:150]}"
                )
            finally:
                cl.close()
            return "a bomb over gRPC was answered"

        req(A, "grpc-batch-with-bomb", srv, grpc_bad_photo, ref, good)

        def concurrent():
            import concurrent.futures as cf

            blobs = [png_base] * 7 + [b"broken"]

            def one(b):
                try:
                    photo([b])
                    return True
                except InferenceServerException:
                    return False

            with cf.ThreadPoolExecutor(8) as ex:
                res = list(ex.map(one, blobs, timeout=120))
            if res != [True] * 7 + [False]:
                return f"8 concurrent requests, one broken: answered {res}"
            return None

        req(A, "concurrent-8-one-broken", srv, concurrent, ref, good)
        srv.finish(A, "photo-server-sigterm", signal.SIGTERM)
    finally:
        srv.kill_quietly()


# =========================================================================== main
AREA_FUNCS = {
    "family": "area_family",
    "layerwise": "area_layerwise",
    "serve": "area_serve",
    "photo": "area_photo",
}


def main(argv=None) -> int:
    global WORK
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--area", action="append", choices=AREAS, help="run only this area (repeatable)"
    )
    ap.add_argument("--list", action="store_true", help="list the areas and exit")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (for debugging)")
    a = ap.parse_args(argv)
    if a.list:
        for n in AREAS:
            print(
                n,
                "(implemented)"
                if n in globals() or AREA_FUNCS[n] in globals()
                else "(not implemented)",
            )
        return 0
    if not DATA.exists():
        print(f"skipped: {DATA} is absent")
        return 0
    areas = a.area or AREAS
    WORK = Path(tempfile.mkdtemp(prefix="rdcampaign-"))
    for sub in ("t", "fx", "cwd"):
        (WORK / sub).mkdir()
    try:
        for area in areas:
            fn = globals().get(AREA_FUNCS[area])
            if fn is None:
                log(f"{area}: not implemented")
                continue
            t0 = time.time()
            try:
                fn()
            except Exception as exc:  # a fixture or the script broke: count it, go on
                record(
                    area,
                    "campaign-script-error",
                    False,
                    f"{type(exc).__name__}: {exc} :: "
                    + traceback.format_exc().splitlines()[-3].strip(),
                )
            if area == areas[0]:
                record(
                    area,
                    "tmpdir-ort-ses-file",
                    True,
                    f"{len(SES_SEEN)} commands imported onnxruntime, which keeps its session id "
                    "in $TMPDIR/.ses (checked to hold only that in each case)",
                )
            AREA_TIME[area] = time.time() - t0
    finally:
        if not a.keep:
            shutil.rmtree(WORK, ignore_errors=True)
        else:
            log(f"work folder kept: {WORK}")
    log("")
    for area in areas:
        rs = [r for r in RESULTS if r[0] == area]
        bad = sum(1 for r in rs if not r[2])
        log(f"{area:9s}  {len(rs)} cases, {bad} mishandled, {AREA_TIME.get(area, 0):.0f}s")
    passed = sum(1 for r in RESULTS if r[2])
    failed = len(RESULTS) - passed
    log(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
