"""Latency and throughput of ONNX models (and a PyTorch eager baseline), measured fairly.

Fairness rules, because the machines are shared and drift by tens of percent within minutes:

* inputs are generated (and, with IO binding, copied to the device) before any timing;
* only the inference call is timed (``perf_counter_ns`` around ``session.run`` or
  ``run_with_iobinding`` plus the output synchronisation), warm-up excluded;
* models run round-robin, a small block of iterations per model per round, with the order
  rotated every round, so drift and thermal state hit every model equally;
* node placement comes from a separate short profiled session, so profiling does not
  distort the timings but a silent fallback to CPU is still visible.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import resource
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Callable, Sequence

import numpy as np

from .errors import UserError
from .machine import machine_info
from .preprocess import ModelMetadata
from .runtime import (PROVIDERS, ModelFile, SessionConfig, available_providers,
                      create_session, node_placement, provider_name, require_provider,
                      short_provider)

if TYPE_CHECKING:
    import onnxruntime as ort
    from torch import nn

log = logging.getLogger(__name__)

TORCH_MODEL = "torch"


@dataclass(frozen=True)
class BenchOptions:
    """How to measure. ``duration_s`` (seconds per model and batch size) overrides
    ``iterations``; ``block`` is how many back-to-back iterations a model gets per round.

    ``settle_s`` is an untimed pause before each block (default 50 ms on CPU, 0 on GPU):
    ORT's and torch's thread pools spin-wait for a while after a run, and without the pause
    the previous model's spinning threads steal cores from the next model's first iterations.
    Measured on 2 cores with three ResNet-18 sessions: INT8 b1 p50 read 9.6 ms with 10 ms
    pauses and 5.8 ms with 50 ms (5.5 ms when run alone).
    """

    provider: str = "cpu"
    batch_sizes: tuple[int, ...] = (1,)
    warmup: int = 10
    iterations: int = 100
    duration_s: float | None = None
    block: int = 5
    settle_s: float | None = None
    threads: int | None = None
    io_binding: bool = False
    cuda_graph: bool = False
    torch_baseline: bool = False
    torch_weights: str | None = None
    placement: bool = True
    trt_cache_dir: str | None = None  # None: runtime.DEFAULT_TRT_CACHE
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BenchResult:
    """One model at one batch size. ``peak_rss_mb`` is the process's peak resident memory
    while that session was created and warmed up at this batch size (the high-water mark is
    reset first where Linux allows); ``ratio_p50`` is p50 over the first model's p50."""

    model: str
    provider: str
    batch_size: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput_ips: float
    session_s: float
    peak_rss_mb: float
    placement: dict[str, int] | None
    precision: str
    iterations: int
    io_binding: bool
    cuda_graph: bool
    ratio_p50: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BenchReport:
    machine: dict[str, Any]
    results: tuple[BenchResult, ...]
    options: BenchOptions
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "results": [r.to_dict() for r in self.results],
                "options": self.options.to_dict(), "notes": list(self.notes)}


# --- memory and machine ----------------------------------------------------------------

def _reset_peak_rss() -> None:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass  # not Linux or not permitted: the peak then covers the whole process life


def peak_rss_mb() -> float:
    """The process's peak resident set size in MB (VmHWM, else getrusage)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if platform.system() == "Darwin" else 1024), 1)


def bench_machine() -> dict[str, Any]:
    """:func:`machine.machine_info` plus the providers this onnxruntime build offers."""
    return {**machine_info(), "providers": available_providers()}


# --- runners: one timed call each --------------------------------------------------------

class Runner(ABC):
    """Owns a ready input; ``timed_ns`` runs one inference and returns its duration."""

    @abstractmethod
    def timed_ns(self) -> int:
        """One inference, timed with perf_counter_ns around the call (and its sync)."""

    def output_rows(self) -> int | None:
        """Rows in the last output, to check the model really ran at this batch size."""
        return None


class OrtRunner(Runner):
    """Plain ``session.run`` with a host numpy feed (what most CPU users do)."""

    def __init__(self, session: ort.InferenceSession, batch: np.ndarray) -> None:
        self.session = session
        self.feed = {session.get_inputs()[0].name: batch}
        self._rows: int | None = None

    def timed_ns(self) -> int:
        start = time.perf_counter_ns()
        out = self.session.run(None, self.feed)
        elapsed = time.perf_counter_ns() - start
        self._rows = len(out[0])
        return elapsed

    def output_rows(self) -> int | None:
        return self._rows


class IoBindingRunner(Runner):
    """``run_with_iobinding`` with the input and output already on the device.

    The input OrtValue is created once, so its address is fixed (what CUDA graphs need), and
    outputs are preallocated on the device when their shape is known. The timed region ends
    after ``synchronize_outputs``, so asynchronous GPU work is inside it.
    """

    def __init__(self, session: ort.InferenceSession, batch: np.ndarray, device: str,
                 *, need_fixed_outputs: bool = False) -> None:
        import onnxruntime as ort

        self.session = session
        self.binding = session.io_binding()
        self.input = ort.OrtValue.ortvalue_from_numpy(batch, device, 0)
        self.binding.bind_ortvalue_input(session.get_inputs()[0].name, self.input)
        self.outputs = []
        for out in session.get_outputs():
            shape = [len(batch) if i == 0 else d for i, d in enumerate(out.shape)]
            if all(isinstance(d, int) and d > 0 for d in shape):
                value = ort.OrtValue.ortvalue_from_shape_and_type(
                    shape, _numpy_dtype(out.type), device, 0)
                self.binding.bind_ortvalue_output(out.name, value)
                self.outputs.append(value)  # keep it alive: the binding holds its address
            elif need_fixed_outputs:
                raise UserError(f"output {out.name!r} has shape {out.shape}; a CUDA graph needs "
                                "outputs of known shape; run without --cuda-graph")
            else:
                self.binding.bind_output(out.name, device, 0)
        self.binding.synchronize_inputs()

    def timed_ns(self) -> int:
        start = time.perf_counter_ns()
        self.session.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()
        return time.perf_counter_ns() - start

    def output_rows(self) -> int | None:
        return int(self.binding.get_outputs()[0].shape()[0])


class TorchRunner(Runner):
    """PyTorch eager under ``inference_mode`` with a channels_last input already on device."""

    def __init__(self, module: nn.Module, batch: np.ndarray, device: str) -> None:
        import torch

        self.torch = torch
        self.module = module
        self.device = device
        self.input = torch.from_numpy(batch).to(device).contiguous(
            memory_format=torch.channels_last)
        self._rows: int | None = None

    def timed_ns(self) -> int:
        torch = self.torch
        with torch.inference_mode():
            start = time.perf_counter_ns()
            out = self.module(self.input)
            if self.device == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter_ns() - start
        self._rows = int(out.shape[0])
        return elapsed

    def output_rows(self) -> int | None:
        return self._rows


def _numpy_dtype(ort_type: str) -> Any:
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16,
            "tensor(double)": np.float64}.get(ort_type, np.float32)


# --- what is benchmarked -----------------------------------------------------------------

@dataclass
class Target:
    """One column of the comparison: an ONNX model or the torch baseline.

    Mutable on purpose: the session is built lazily (once per model, or once per batch size
    under CUDA graphs, whose captured graph is tied to one input shape).
    """

    label: str
    provider: str
    precision: str
    input_size: int
    input_dtype: Any
    static_batch: int | None
    make_runner: Callable[[np.ndarray], Runner]
    session_s: float = 0.0
    placement: dict[str, int] | None = None
    state: dict[str, Any] = field(default_factory=dict)


def _model_shape(path: Path, meta: ModelMetadata | None,
                 session: ort.InferenceSession) -> tuple[int, int | None, Any]:
    """Input size, static batch (None when dynamic) and input dtype of a model."""
    inp = session.get_inputs()[0]
    shape = list(inp.shape)
    if len(shape) != 4:
        raise UserError(f"{path}: input {inp.name!r} has shape {shape}; bench needs NCHW")
    if isinstance(shape[2], int) and isinstance(shape[3], int):
        size = int(shape[2])
    elif meta is not None:
        size = meta.preprocess.input_size
    else:
        raise UserError(f"{path}: has a dynamic input size and no resnet-deploy metadata; "
                        "export it with 'resnet-deploy export'")
    static = int(shape[0]) if isinstance(shape[0], int) else None
    return size, static, _numpy_dtype(inp.type)


class _Sessions:
    """Creates sessions with the shared strict-provider logic and measures their cost."""

    def __init__(self, options: BenchOptions, provider: str) -> None:
        self.options = options
        self.provider = provider

    def config(self, precision: str, *, profile: bool = False,
               cuda_graph: bool = False) -> SessionConfig:
        trt = self.provider == PROVIDERS["tensorrt"]
        return SessionConfig(threads=self.options.threads, profile=profile,
                             cuda_graph=cuda_graph,
                             trt_fp16=trt and precision in ("fp16", "int8"),
                             trt_int8=trt and precision == "int8",
                             trt_cache_dir=self.options.trt_cache_dir)

    def create(self, path: Path, precision: str) -> tuple[ort.InferenceSession, float]:
        start = time.perf_counter()
        session = create_session(path, self.provider,
                                 self.config(precision, cuda_graph=self.options.cuda_graph))
        return session, time.perf_counter() - start


def _onnx_target(path: Path, options: BenchOptions, sessions: _Sessions) -> Target:
    file = ModelFile.read(path)
    file.warn_if_wrong_cpu(sessions.provider)
    meta, precision = file.meta, file.precision
    session, seconds = sessions.create(path, precision)
    size, static, dtype = _model_shape(path, meta, session)
    device = "cpu" if sessions.provider == PROVIDERS["cpu"] else "cuda"

    def make_runner(batch: np.ndarray) -> Runner:
        current = target.state["session"]
        if options.cuda_graph:
            # A captured graph replays one shape at fixed addresses: one session per batch.
            if target.state.get("graph_batch") not in (None, len(batch)):
                target.state["session"] = current = None  # free the old graph first
                current, target.session_s = sessions.create(path, precision)
                target.state["session"] = current
            target.state["graph_batch"] = len(batch)
        if options.io_binding:
            return IoBindingRunner(current, batch, device, need_fixed_outputs=options.cuda_graph)
        return OrtRunner(current, batch)

    target = Target(label=str(path), provider=short_provider(sessions.provider),
                    precision=precision, input_size=size, input_dtype=dtype,
                    static_batch=static, make_runner=make_runner, session_s=seconds)
    target.state.update(session=session, meta=meta, path=path)
    return target


def _placement(target: Target, sessions: _Sessions, batch: np.ndarray) -> dict[str, int]:
    """Run one batch in a separate profiled session and count nodes per provider."""
    path = target.state["path"]
    session = create_session(path, sessions.provider,
                             sessions.config(target.precision, profile=True))
    session.run(None, {session.get_inputs()[0].name: batch})
    return node_placement(session)


def torch_weights_for(meta: ModelMetadata | None, requested: str | None) -> tuple[str, str | None]:
    """The weights for the torch baseline, and a note when they are not the model's own.

    Default: the first model's recorded source when it is ``imagenet`` or an existing file;
    ``random`` (same class count) otherwise, which is fine for timing but said out loud.
    """
    if requested:
        return requested, None
    weights = (meta.weights if meta is not None else {}) or {}
    source = str(weights.get("source") or "")
    if source == "imagenet" or (source and source != "random" and Path(source).is_file()):
        return source, None
    if source == "random":
        return "random", (f"torch baseline: random weights (seed {weights.get('seed', 0)}), "
                          "as recorded in the first model; same architecture, timing only")
    why = f"its weights file {source} is not here" if source else "it records no weights"
    return "random", (f"torch baseline: random weights, because the first model's metadata "
                      f"has no usable weights source ({why}); same architecture, timing only")


def _torch_target(meta: ModelMetadata | None, size: int, options: BenchOptions,
                  provider: str) -> tuple[Target, str | None]:
    import torch

    from .model import load_model

    weights, note = torch_weights_for(meta, options.torch_weights)
    num_classes = None
    seed = 0
    if weights == "random" and meta is not None:
        num_classes = meta.weights.get("num_classes")
        seed = int(meta.weights.get("seed") or 0)
    device = "cuda" if provider != PROVIDERS["cpu"] and torch.cuda.is_available() else "cpu"
    if options.threads:
        torch.set_num_threads(options.threads)
    start = time.perf_counter()
    module, _ = load_model(weights, num_classes=num_classes, seed=seed)
    module = module.eval().to(device).to(memory_format=torch.channels_last)
    seconds = time.perf_counter() - start
    target = Target(label=TORCH_MODEL, provider=f"torch-{device}", precision="fp32",
                    input_size=size, input_dtype=np.float32, static_batch=None,
                    make_runner=lambda batch: TorchRunner(module, batch, device),
                    session_s=seconds)
    return target, note


# --- the measurement ---------------------------------------------------------------------

def _summary(samples_ns: Sequence[int], batch: int) -> dict[str, float]:
    ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50_ms": round(float(p50), 4), "p90_ms": round(float(p90), 4),
            "p99_ms": round(float(p99), 4), "mean_ms": round(float(ms.mean()), 4),
            "min_ms": round(float(ms.min()), 4),
            # images per second at the median latency: robust to the noisy tail.
            "throughput_ips": round(batch * 1000.0 / float(p50), 2)}


def _inputs(target: Target, batch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + batch)
    shape = (batch, 3, target.input_size, target.input_size)
    return rng.standard_normal(shape, dtype=np.float32).astype(target.input_dtype)


def _check_options(options: BenchOptions, provider: str) -> None:
    if not options.batch_sizes or min(options.batch_sizes) < 1:
        raise UserError("--batch-size takes positive integers, e.g. 1,8,32")
    if options.warmup < 0 or options.iterations < 1 or options.block < 1:
        raise UserError("--warmup must be >= 0, --iterations and --block >= 1")
    if options.duration_s is not None and options.duration_s <= 0:
        raise UserError("--duration takes a positive number of seconds")
    if options.cuda_graph and provider == PROVIDERS["cpu"]:
        raise UserError("--cuda-graph needs --provider cuda or tensorrt")
    if options.cuda_graph and not options.io_binding:
        raise UserError("--cuda-graph needs --io-binding: a captured graph replays fixed "
                        "input/output addresses, which only IO binding provides")


def run_bench(models: Sequence[str | Path], options: BenchOptions = BenchOptions(), *,
              progress: Callable[[str], None] | None = None) -> BenchReport:
    """Benchmark ``models`` (and the torch baseline) at each batch size, interleaved.

    Raises ProviderUnavailable (exit 2) when the provider cannot really be used, exactly as
    :func:`runtime.create_session` decides, and UserError for bad models or options.
    """
    if not models:
        raise UserError("give at least one --model")
    provider = require_provider(options.provider)
    settle = options.settle_s
    if settle is None:
        settle = 0.05 if provider == PROVIDERS["cpu"] else 0.0
    options = dataclasses.replace(options, provider=short_provider(provider_name(provider)),
                                  settle_s=settle)
    _check_options(options, provider)
    sessions = _Sessions(options, provider)
    say = progress or (lambda message: log.info("%s", message))
    notes: list[str] = []

    targets: list[Target] = []
    rss: dict[tuple[int, int], float] = {}
    first_batch = min(options.batch_sizes)
    for path in map(Path, models):
        say(f"loading {path}")
        _reset_peak_rss()
        target = _onnx_target(path, options, sessions)
        target.state["creation_rss_mb"] = peak_rss_mb()
        if target.static_batch is not None and set(options.batch_sizes) != {target.static_batch}:
            raise UserError(f"{path}: has a static batch of {target.static_batch}; use "
                            f"--batch-size {target.static_batch} or export with "
                            "--dynamic-batch")
        targets.append(target)
    if options.torch_baseline:
        say("building the torch baseline")
        _reset_peak_rss()
        torch_target, note = _torch_target(targets[0].state["meta"], targets[0].input_size,
                                           options, provider)
        torch_target.state["creation_rss_mb"] = peak_rss_mb()
        targets.append(torch_target)
        if note:
            notes.append(note)
            log.warning("%s", note)

    if options.placement:
        for target in targets:
            if "path" not in target.state:
                continue
            target.placement = _placement(target, sessions, _inputs(target, first_batch,
                                                                    options.seed))
            others = {k: v for k, v in target.placement.items() if k != options.provider}
            if options.provider != "cpu" and others:
                note = (f"{target.label}: {sum(others.values())} nodes did not run on "
                        f"{options.provider}: {others}")
                notes.append(note)
                log.warning("%s", note)

    results: list[BenchResult] = []
    for batch in options.batch_sizes:
        say(f"batch {batch}: warm-up")
        runners: list[Runner] = []
        for index, target in enumerate(targets):
            _reset_peak_rss()
            runner = target.make_runner(_inputs(target, batch, options.seed))
            for _ in range(max(options.warmup, 1)):  # one untimed run at least: it checks
                runner.timed_ns()                    # the batch and builds lazy TRT engines
            if runner.output_rows() not in (None, batch):
                raise UserError(f"{target.label}: returned {runner.output_rows()} rows for a "
                                f"batch of {batch}")
            # The peak covers this batch's warm-up, plus session creation where it happened.
            created = target.state.pop("creation_rss_mb", 0.0)
            rss[index, batch] = max(created, peak_rss_mb())
            runners.append(runner)
        samples = _interleave(runners, options, say, batch)
        for index, (target, timed) in enumerate(zip(targets, samples)):
            results.append(BenchResult(
                model=target.label, provider=target.provider, batch_size=batch,
                **_summary(timed, batch), session_s=round(target.session_s, 3),
                peak_rss_mb=rss[index, batch], placement=target.placement,
                precision=target.precision, iterations=len(timed),
                io_binding=options.io_binding and target.label != TORCH_MODEL,
                cuda_graph=options.cuda_graph and target.label != TORCH_MODEL))
        del runners
    return BenchReport(machine=bench_machine(), results=tuple(_with_ratios(results)),
                       options=options, notes=tuple(notes))


def _interleave(runners: Sequence[Runner], options: BenchOptions,
                say: Callable[[str], None], batch: int) -> list[list[int]]:
    """Round-robin: each round gives every runner ``block`` iterations, order rotated.

    Every runner gets the same number of iterations; with ``duration_s`` rounds continue
    until the timed total reaches ``duration_s`` per runner on average.
    """
    samples: list[list[int]] = [[] for _ in runners]
    count = len(runners)
    budget_ns = None if options.duration_s is None else options.duration_s * 1e9 * count
    settle = options.settle_s or 0.0
    spent = 0
    rounds = 0
    say(f"batch {batch}: timing {count} targets round-robin")
    while True:
        if budget_ns is None:
            remaining = options.iterations - len(samples[0])
            if remaining <= 0:
                break
            block = min(options.block, remaining)
        else:
            if spent >= budget_ns:
                break
            block = options.block
        for offset in range(count):
            index = (rounds + offset) % count
            if settle:
                time.sleep(settle)
            for _ in range(block):
                elapsed = runners[index].timed_ns()
                samples[index].append(elapsed)
                spent += elapsed
        rounds += 1
    return samples


def _with_ratios(results: Sequence[BenchResult]) -> list[BenchResult]:
    """p50 relative to the first model at the same batch size (the first row of each)."""
    first: dict[int, float] = {}
    out = []
    for result in results:
        base = first.setdefault(result.batch_size, result.p50_ms)
        out.append(dataclasses.replace(result, ratio_p50=round(result.p50_ms / base, 4)))
    return out


TABLE_COLUMNS = [("model", "model"), ("provider", "provider"), ("precision", "prec"),
                 ("batch_size", "batch"), ("p50_ms", "p50 ms"), ("p90_ms", "p90 ms"),
                 ("p99_ms", "p99 ms"), ("mean_ms", "mean ms"), ("min_ms", "min ms"),
                 ("throughput_ips", "img/s"), ("ratio_p50", "p50 x first"),
                 ("session_s", "session s"), ("peak_rss_mb", "peak RSS MB"),
                 ("placement_text", "placement")]


def table_rows(report: BenchReport) -> list[dict[str, Any]]:
    """Result rows flattened for tables: placement becomes ``cpu:49`` text."""
    rows = []
    for result in report.results:
        row = result.to_dict()
        placement = result.placement
        row["placement_text"] = ("-" if placement is None else
                                 " ".join(f"{k}:{v}" for k, v in sorted(placement.items())))
        rows.append(row)
    return rows
