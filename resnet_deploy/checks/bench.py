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

import contextlib
import dataclasses
import logging
import platform
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact.metadata import ModelMetadata
from ..artifact.model_file import ModelFile
from ..core.errors import UserError
from ..core.machine import machine_info
from ..core.progress import Progress, eta, to_log
from ..runtime.providers import (PROVIDERS, SessionConfig, available_providers, provider_name,
                                 require_provider, short_provider)
from ..runtime.runners import OrtRunner, Runner, TorchRunner

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
    reset first where Linux allows); ``ratio_p50`` is p50 over the first model's p50.
    ``spread`` is p90/p10: near 1 on a quiet machine, above :data:`BUSY_SPREAD` on a busy one."""

    model: str
    provider: str
    batch_size: int
    p10_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    spread: float
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


# p90/p10 above this in any row: other work shared the cores while timing, so absolute
# figures are not comparable between runs (FP32 batch 1 read 4.85 ms in one run and 16.06 ms
# minutes later on a shared 2-core machine); the interleaved ratios still are.
BUSY_SPREAD = 1.5


def busy_warning(results: Sequence[BenchResult]) -> str | None:
    """One line when any row's p90/p10 exceeds :data:`BUSY_SPREAD`, naming the worst row."""
    busy = [r for r in results if r.spread > BUSY_SPREAD]
    if not busy:
        return None
    worst = max(busy, key=lambda r: r.spread)
    return (f"machine busy: compare ratios only (p90/p10 {worst.spread:.2f} for "
            f"{Path(worst.model).name} at batch {worst.batch_size}, {len(busy)} of "
            f"{len(results)} rows above {BUSY_SPREAD:g})")


@dataclass(frozen=True)
class BenchReport:
    machine: dict[str, Any]
    results: tuple[BenchResult, ...]
    options: BenchOptions
    notes: tuple[str, ...] = ()

    @property
    def busy(self) -> str | None:
        return busy_warning(self.results)

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "results": [r.to_dict() for r in self.results],
                "options": self.options.to_dict(), "notes": list(self.notes),
                "busy": self.busy}


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


# --- what is benchmarked -----------------------------------------------------------------

@dataclass
class Target:
    """One column of the comparison: an ONNX model or the torch baseline, and its runner
    (active for the whole measurement)."""

    label: str
    provider: str
    precision: str
    input_size: int
    static_batch: int | None
    runner: Runner
    placement: dict[str, int] | None = None
    file: ModelFile | None = None  # the ONNX model (None for the torch baseline)
    creation_rss_mb: float = 0.0  # peak RSS while the target was built

    @property
    def meta(self) -> ModelMetadata | None:
        return self.file.meta if self.file is not None else None


def session_config(options: BenchOptions, provider: str, precision: str, *,
                   profile: bool = False) -> SessionConfig:
    """How bench builds a session: its threads, CUDA graphs, TensorRT precisions and cache."""
    trt = provider == PROVIDERS["tensorrt"]
    return SessionConfig(threads=options.threads, profile=profile,
                         cuda_graph=options.cuda_graph and not profile,
                         trt_fp16=trt and precision in ("fp16", "int8"),
                         trt_int8=trt and precision == "int8",
                         trt_cache_dir=options.trt_cache_dir)


def _onnx_target(path: Path, options: BenchOptions, provider: str) -> Target:
    file = ModelFile.read(path)
    file.warn_if_wrong_cpu(provider)
    if file.io.height is None and file.meta is None:
        raise UserError(f"{path}: has a dynamic input size and no resnet-deploy metadata; "
                        "export it with 'resnet-deploy export'")
    runner = OrtRunner(file, provider, session_config(options, provider, file.precision),
                       io_binding=options.io_binding)
    return Target(label=str(path), provider=short_provider(provider), precision=file.precision,
                  input_size=file.io.height or file.spec().input_size,
                  static_batch=file.io.batch, runner=runner, file=file)


def _placement(target: Target, options: BenchOptions, provider: str,
               batch: np.ndarray) -> dict[str, int]:
    """Run one batch in a separate profiled session and count nodes per provider."""
    assert target.file is not None
    config = session_config(options, provider, target.precision, profile=True)
    with OrtRunner(target.file, provider, config) as profiled:
        profiled.infer(batch)
        return profiled.placement()


def _torch_target(meta: ModelMetadata | None, size: int, options: BenchOptions,
                  provider: str) -> tuple[Target, str | None]:
    import torch

    from ..weights.checkpoints import load_for

    device = "cuda" if provider != PROVIDERS["cpu"] and torch.cuda.is_available() else "cpu"
    if options.threads:
        torch.set_num_threads(options.threads)
    module, _, note = load_for(meta.weights if meta is not None else None,
                               options.torch_weights)
    runner = TorchRunner(module, device, TORCH_MODEL, channels_last=True)
    target = Target(label=TORCH_MODEL, provider=f"torch-{device}", precision="fp32",
                    input_size=size, static_batch=None, runner=runner)
    return target, note


# --- the measurement ---------------------------------------------------------------------

def _summary(samples_ns: Sequence[int], batch: int) -> dict[str, float]:
    ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    p10, p50, p90, p99 = np.percentile(ms, [10, 50, 90, 99])
    return {"p10_ms": round(float(p10), 4), "p50_ms": round(float(p50), 4),
            "p90_ms": round(float(p90), 4),
            "p99_ms": round(float(p99), 4), "mean_ms": round(float(ms.mean()), 4),
            "min_ms": round(float(ms.min()), 4), "spread": round(float(p90 / p10), 3),
            # images per second at the median latency: robust to the noisy tail.
            "throughput_ips": round(batch * 1000.0 / float(p50), 2)}


def _inputs(target: Target, batch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + batch)
    shape = (batch, 3, target.input_size, target.input_size)
    return rng.standard_normal(shape, dtype=np.float32)  # ModelFile.read checked: float32


def _check_options(options: BenchOptions, provider: str) -> None:
    if not options.batch_sizes or min(options.batch_sizes) < 1:
        raise UserError("`batch_sizes` takes positive integers, e.g. 1,8,32")
    if options.warmup < 0 or options.iterations < 1 or options.block < 1:
        raise UserError("`warmup` must be >= 0, `iterations` and `block` >= 1")
    if options.duration_s is not None and options.duration_s <= 0:
        raise UserError("`duration_s` takes a positive number of seconds")
    if options.cuda_graph and provider == PROVIDERS["cpu"]:
        raise UserError("`cuda_graph` needs `provider` cuda or tensorrt")
    if options.cuda_graph and not options.io_binding:
        raise UserError("`cuda_graph` needs `io_binding`: a captured graph replays fixed "
                        "input/output addresses, which only IO binding provides")


def run_bench(models: Sequence[str | Path], options: BenchOptions = BenchOptions(), *,
              progress: Progress | None = None) -> BenchReport:
    """Benchmark ``models`` (and the torch baseline) at each batch size, interleaved.

    Raises ProviderUnavailable (exit 2) when the provider cannot really be used, exactly as
    :func:`runtime.create_session` decides, and UserError for bad models or options.
    """
    if not models:
        raise UserError("give at least one `models`")
    provider = require_provider(options.provider)
    settle = options.settle_s
    if settle is None:
        settle = 0.05 if provider == PROVIDERS["cpu"] else 0.0
    options = dataclasses.replace(options, provider=short_provider(provider_name(provider)),
                                  settle_s=settle)
    _check_options(options, provider)
    say = progress or to_log
    with contextlib.ExitStack() as stack:
        targets, notes = _targets(models, options, provider, say, stack)
        results = [result for step, batch in enumerate(options.batch_sizes, 1)
                   for result in _measure(targets, batch, options, say,
                                          f" ({step} of {len(options.batch_sizes)})"
                                          if len(options.batch_sizes) > 1 else "")]
    return BenchReport(machine=bench_machine(), results=tuple(_with_ratios(results)),
                       options=options, notes=tuple(notes))


def _targets(models: Sequence[str | Path], options: BenchOptions, provider: str,
             say: Progress, stack: contextlib.ExitStack) -> tuple[list[Target], list[str]]:
    """Every model (and the torch baseline) with its runner active on ``stack``, its peak
    memory while loading, and its node placement; plus the notes they call for."""
    targets: list[Target] = []
    notes: list[str] = []
    for path in map(Path, models):
        say(f"loading {path}")
        target = _onnx_target(path, options, provider)
        if target.static_batch is not None and set(options.batch_sizes) != {target.static_batch}:
            raise UserError(f"{path}: has a static batch of {target.static_batch}; use "
                            f"`batch_sizes` {target.static_batch} or export with "
                            "`dynamic_batch`")
        targets.append(target)
    if options.torch_baseline:
        say("building the torch baseline")
        torch_target, note = _torch_target(targets[0].meta, targets[0].input_size, options,
                                           provider)
        targets.append(torch_target)
        if note:
            notes.append(note)
            log.warning("%s", note)
    for target in targets:
        _reset_peak_rss()
        stack.enter_context(target.runner)
        target.creation_rss_mb = peak_rss_mb()
    if options.placement:
        first = min(options.batch_sizes)
        for target in (t for t in targets if t.file is not None):
            target.placement = _placement(target, options, provider,
                                          _inputs(target, first, options.seed))
            others = {k: v for k, v in target.placement.items() if k != options.provider}
            if options.provider != "cpu" and others:
                note = (f"{target.label}: {sum(others.values())} nodes did not run on "
                        f"{options.provider}: {others}")
                notes.append(note)
                log.warning("%s", note)
    note = fp16_on_cpu_note(targets, options.provider)
    if note:
        notes.append(note)
    return targets, notes


def _measure(targets: Sequence[Target], batch: int, options: BenchOptions, say: Progress,
             which: str) -> list[BenchResult]:
    """Warm every target up at this batch size, then time them interleaved."""
    say(f"batch {batch}: warm-up")
    inputs, rss = [], []
    for target in targets:
        _reset_peak_rss()
        data = _inputs(target, batch, options.seed)
        for _ in range(max(options.warmup, 1)):  # one untimed run at least: it checks the
            rows = len(target.runner.infer(data))  # batch and builds lazy TensorRT engines
        if rows != batch:
            raise UserError(f"{target.label}: returned {rows} rows for a batch of {batch}")
        # The peak covers this batch's warm-up, plus session creation where it happened.
        rss.append(max(target.creation_rss_mb, peak_rss_mb()))
        target.creation_rss_mb = 0.0  # counted once, in the first batch
        inputs.append(data)
    samples = _interleave([t.runner for t in targets], inputs, options, say, batch, which)
    return [BenchResult(
        model=target.label, provider=target.provider, batch_size=batch,
        **_summary(timed, batch), session_s=round(target.runner.activation_s, 3),
        peak_rss_mb=peak, placement=target.placement, precision=target.precision,
        iterations=len(timed),
        io_binding=options.io_binding and target.file is not None,
        cuda_graph=options.cuda_graph and target.file is not None)
        for target, timed, peak in zip(targets, samples, rss, strict=True)]


def fp16_on_cpu_note(targets: Sequence[Target], provider: str) -> str | None:
    """FP16 is a GPU format: on CPU, ONNX Runtime has few FP16 kernels, so it wraps most
    nodes in Casts (79 nodes against FP32's 25 for ResNet-18) and runs no faster."""
    half = [t for t in targets if t.precision == "fp16"]
    if provider != "cpu" or not half:
        return None
    counts = [f"{Path(t.label).name} {sum(t.placement.values())} nodes" for t in half
              if t.placement]
    full = [t.placement for t in targets if t.precision == "fp32" and t.placement]
    if counts and full:
        counts.append(f"FP32 {sum(full[0].values())}")
    return ("FP16 is a GPU format: ONNX Runtime's CPU provider runs it through Casts"
            f"{' (' + ', '.join(counts) + ')' if counts else ''}, so expect no gain over "
            "FP32 on CPU; time it with `provider` cuda or tensorrt")


def _interleave(runners: Sequence[Runner], inputs: Sequence[np.ndarray], options: BenchOptions,
                say: Progress, batch: int, which: str = "") -> list[list[int]]:
    """Round-robin: each round gives every runner ``block`` iterations, order rotated.

    Every runner gets the same number of iterations; with ``duration_s`` rounds continue
    until the timed total reaches ``duration_s`` per runner on average. After each block,
    ``say`` gets a transient line with the count so far and the time left.
    """
    samples: list[list[int]] = [[] for _ in runners]
    count = len(runners)
    budget_ns = None if options.duration_s is None else options.duration_s * 1e9 * count
    settle = options.settle_s or 0.0
    spent = 0
    rounds = 0
    started = time.monotonic()
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
            runner, data = runners[index], inputs[index]
            for _ in range(block):
                runner.infer(data)
                elapsed = runner.last_inference_ns
                samples[index].append(elapsed)
                spent += elapsed
            done = sum(map(len, samples))
            fraction = (done / (options.iterations * count) if budget_ns is None
                        else min(spent / budget_ns, 1.0))
            say(f"batch {batch}{which}: {done}"
                f"{f'/{options.iterations * count}' if budget_ns is None else ''} timed runs "
                f"of {count} models, {eta(time.monotonic() - started, fraction)}",
                transient=True)
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
