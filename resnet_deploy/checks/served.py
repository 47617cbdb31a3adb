"""Served models measured: a Triton client, and throughput and latency under concurrent
clients beside in-process onnxruntime at the same batch, with Triton's own statistics.

Every run is bounded in requests and in time and stops by itself. Each client thread has a
connection of its own (tritonclient's clients are not shared across threads). The figures
that say what the server did (executions against requests, queue and compute times) come
from Triton's statistics (``/v2/models/NAME/stats``), read before and after each level.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from ..artifact.model_file import ModelFile
from ..core.errors import UserError
from ..core.machine import machine_info
from ..core.progress import Progress, to_log
from ..data.images import list_images, load_image, seeded_subset, to_tensor
from ..runtime.runners import OrtRunner

INSTALL_HINT = "pip install 'resnet-deploy[serve]'"
REQUEST_TIMEOUT_S = 60.0  # no request of a bounded run may hang it
NUMPY_TO_TRITON = {np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16",
                   np.dtype(np.float64): "FP64", np.dtype(np.int64): "INT64",
                   np.dtype(np.uint8): "UINT8", np.dtype(np.object_): "BYTES"}


def parse_url(url: str) -> tuple[str, str]:
    """``http://host:port`` or ``grpc://host:port`` (bare ``host:port``: HTTP) ->
    (protocol, host:port)."""
    protocol, _, rest = url.rpartition("://")
    protocol = (protocol or "http").lower()
    if protocol not in ("http", "grpc") or not rest or ":" not in rest:
        raise UserError(f"`url` {url!r}: give http://HOST:PORT or grpc://HOST:PORT")
    return protocol, rest.rstrip("/")


def _modules(protocol: str) -> Any:
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
    except ImportError:
        raise UserError(f"tritonclient[{protocol}] is not installed; {INSTALL_HINT}") from None
    return module


class ServedClient:
    """One connection to a Triton server, speaking HTTP or gRPC (from ``url``)."""

    def __init__(self, url: str) -> None:
        self.protocol, self.address = parse_url(url)
        self.module = _modules(self.protocol)
        if self.protocol == "grpc":
            self.client = self.module.InferenceServerClient(self.address)
        else:
            self.client = self.module.InferenceServerClient(
                self.address, connection_timeout=REQUEST_TIMEOUT_S,
                network_timeout=REQUEST_TIMEOUT_S)

    def infer(self, model: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
        """``inputs`` (name -> array; dtype object: encoded files) in, ``output`` out.
        Triton's refusal is a UserError with its message."""
        tensors = []
        for name, array in inputs.items():
            tensor = self.module.InferInput(name, list(array.shape),
                                            NUMPY_TO_TRITON.get(array.dtype, "FP32"))
            tensors.append(tensor.set_data_from_numpy(array))
        wanted = [self.module.InferRequestedOutput(output)]
        extra = {"client_timeout": REQUEST_TIMEOUT_S} if self.protocol == "grpc" else {}
        from tritonclient.utils import InferenceServerException

        try:
            result = self.client.infer(model, tensors, outputs=wanted, **extra)
        except InferenceServerException as exc:
            raise UserError(f"{model}: {exc.message() or exc}") from None
        return np.asarray(result.as_numpy(output))

    def config(self, model: str) -> dict[str, Any]:
        from tritonclient.utils import InferenceServerException

        try:
            if self.protocol == "grpc":
                return dict(self.client.get_model_config(model, as_json=True)["config"])
            return dict(self.client.get_model_config(model))
        except InferenceServerException as exc:
            raise UserError(f"{self.address}: no model {model!r} served there "
                            f"({exc.message() or exc})") from None

    def statistics(self, model: str) -> dict[str, Any]:
        kwargs = {"as_json": True} if self.protocol == "grpc" else {}
        return dict(self.client.get_inference_statistics(model, **kwargs)["model_stats"][0])

    def close(self) -> None:
        self.client.close()


def stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Requests, executions and the per-request queue and compute times (ms) between two
    statistics snapshots."""
    out: dict[str, float] = {
        "inferences": int(after.get("inference_count", 0)) - int(before.get("inference_count", 0)),
        "executions": int(after.get("execution_count", 0)) - int(before.get("execution_count", 0))}
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        one, two = before["inference_stats"].get(key, {}), after["inference_stats"].get(key, {})
        count = int(two.get("count", 0)) - int(one.get("count", 0))
        nanos = int(two.get("ns", 0)) - int(one.get("ns", 0))
        out[f"{key}_count" if key == "success" else f"{key}_ms"] = \
            count if key == "success" else (nanos / count / 1e6 if count else 0.0)
    return out


@dataclass(frozen=True)
class ServedBenchOptions:
    """A sweep: each ``concurrency`` level runs until ``max_requests`` or ``duration_s``,
    requests of ``batch_size`` rows, after ``warmup`` requests per client."""

    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16)
    batch_size: int = 1
    max_requests: int = 400
    duration_s: float = 10.0
    warmup: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1 or max(self.concurrency) > 256:
            raise UserError("`concurrency` takes integers from 1 to 256, e.g. 1,2,4,8,16")
        if self.batch_size < 1 or self.max_requests < 1 or self.duration_s <= 0:
            raise UserError("`batch_size`, `max_requests` and `duration_s` must be positive")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ServedLevel:
    """One concurrency level: what clients saw, what Triton did, and in-process at the batch
    the level's concurrent requests make (concurrency x request batch)."""

    concurrency: int
    requests: int
    errors: int
    seconds: float
    throughput_ips: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    server: dict[str, float]
    avg_batch: float
    inprocess_batch: int | None = None
    inprocess_ips: float | None = None
    ratio: float | None = None  # served / in-process throughput
    first_error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ServedBenchReport:
    machine: dict[str, Any]
    url: str
    model: str
    input: str
    local_model: str | None
    options: ServedBenchOptions
    levels: tuple[ServedLevel, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "url": self.url, "model": self.model,
                "input": self.input, "local_model": self.local_model,
                "options": self.options.to_dict(), "levels": [x.to_dict() for x in self.levels]}


@dataclass(frozen=True)
class _Endpoint:
    """What a served model takes: its input's name and row shape, whether it batches."""

    input: str
    output: str
    dims: tuple[int, ...]
    batching: bool
    photos: bool  # TYPE_STRING: encoded image files

    @classmethod
    def read(cls, config: dict[str, Any]) -> _Endpoint:
        if len(config.get("input", [])) != 1:
            raise UserError(f"{config.get('name')}: bench feeds models with one input")
        spec = config["input"][0]
        return cls(spec["name"], config["output"][0]["name"],
                   tuple(int(d) for d in spec["dims"]), int(config.get("max_batch_size", 0)) > 0,
                   spec["data_type"] in ("TYPE_STRING", "BYTES"))

    def rows(self, batch: int) -> int:
        return batch if self.batching else (self.dims[0] if self.dims else 1)


def run_served_bench(url: str, model: str, *, local_model: str | Path | None = None,
                     images: str | Path | None = None,
                     options: ServedBenchOptions = ServedBenchOptions(),
                     progress: Progress | None = None) -> ServedBenchReport:
    """Sweep ``options.concurrency`` against ``model`` at ``url``; with ``local_model``
    (the ONNX file it serves), each level is paired with in-process onnxruntime at the
    level's batch, run right after it. A photos endpoint gets the files in ``images``
    (and in-process, the same decoding and preprocessing); a tensor one seeded inputs."""
    say = progress or to_log
    probe = ServedClient(url)
    try:
        endpoint = _Endpoint.read(probe.config(model))
    finally:
        probe.close()
    file = ModelFile.read(local_model) if local_model is not None else None
    photos = _photos(images) if endpoint.photos else []
    if endpoint.photos and not photos:
        raise UserError(f"{model} takes encoded images; pass `images`, a folder of photos")
    levels = []
    for concurrency in options.concurrency:
        say(f"{model}: {concurrency} concurrent client(s)")
        payloads = _payloads(endpoint, endpoint.rows(options.batch_size), photos, options.seed)
        level = _load(url, model, endpoint, payloads, concurrency, options)
        if file is not None:
            batch = endpoint.rows(options.batch_size) * (concurrency if endpoint.batching else 1)
            ips = _inprocess(file, batch, photos, options, max(3, options.max_requests //
                                                                concurrency))
            level = dataclasses.replace(level, inprocess_batch=batch, inprocess_ips=ips,
                                        ratio=level.throughput_ips / ips if ips else None)
        levels.append(level)
    return ServedBenchReport(machine_info(), url, model,
                             "photos" if endpoint.photos else f"{list(endpoint.dims)}",
                             str(local_model) if local_model is not None else None,
                             options, tuple(levels))


def _photos(folder: str | Path | None) -> list[bytes]:
    if folder is None:
        return []
    return [p.read_bytes() for p in seeded_subset(list_images(folder), 64)]


def _payloads(endpoint: _Endpoint, rows: int, photos: Sequence[bytes],
              seed: int) -> list[np.ndarray]:
    """Eight requests' worth of inputs, cycled through."""
    if endpoint.photos:
        shape: tuple[int, ...] = (rows, 1) if endpoint.batching else (1,)
        return [np.array([photos[(i * rows + r) % len(photos)] for r in range(rows)],
                         dtype=object).reshape(shape) for i in range(8)]
    shape = (rows, *endpoint.dims) if endpoint.batching else endpoint.dims
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(8)]


def _load(url: str, model: str, endpoint: _Endpoint, payloads: Sequence[np.ndarray],
          concurrency: int, options: ServedBenchOptions) -> ServedLevel:
    """``concurrency`` threads send requests back to back until the level's bounds."""
    lock = threading.Lock()
    state = _Tally()
    latencies: list[float] = []
    barrier = threading.Barrier(concurrency + 1)  # every client warmed up
    go = threading.Event()  # set once Triton's statistics are read
    stop_at = [time.perf_counter() + 3600.0]

    def send(client: ServedClient, index: int) -> int:
        array = payloads[index % len(payloads)]
        client.infer(model, {endpoint.input: array}, endpoint.output)
        return len(array) if endpoint.batching else endpoint.rows(1)

    def worker(number: int) -> None:
        client = ServedClient(url)
        try:
            try:
                for i in range(options.warmup):
                    send(client, number + i)
            except UserError as exc:
                state.first = state.first or str(exc)
                barrier.abort()
                return
            try:
                barrier.wait()
            except threading.BrokenBarrierError:
                return
            go.wait()
            _drive(client, send, state, latencies, lock, options.max_requests, stop_at)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(n,), daemon=True)
               for n in range(concurrency)]
    for thread in threads:
        thread.start()
    stats = ServedClient(url)
    try:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            raise UserError(f"{model}: a client failed before the run: {state.first}") from None
        before = stats.statistics(model)
        started = time.perf_counter()
        stop_at[0] = started + options.duration_s
        go.set()
        for thread in threads:
            thread.join(options.duration_s + REQUEST_TIMEOUT_S + 5)
        seconds = time.perf_counter() - started
        server = stats_delta(before, stats.statistics(model))
    except BaseException:  # Ctrl-C, a server gone: the clients stop at their next request
        stop_at[0] = 0.0
        go.set()
        raise
    finally:
        stats.close()
    ms = np.asarray(latencies) * 1e3 if latencies else np.asarray([np.nan])
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    executions = server["executions"]
    return ServedLevel(concurrency, len(latencies), state.errors, round(seconds, 3),
                       round(state.rows / seconds, 2), round(p50, 3), round(p90, 3),
                       round(p99, 3), {k: round(v, 4) for k, v in server.items()},
                       round(server["inferences"] / executions, 3) if executions else 0.0,
                       first_error=state.first)


@dataclass
class _Tally:
    """What the clients of one level share, under its lock."""

    next: int = 0
    errors: int = 0
    rows: int = 0
    first: str = ""


def _drive(client: ServedClient, send: Callable[[ServedClient, int], int], state: _Tally,
           latencies: list[float], lock: threading.Lock, max_requests: int,
           stop_at: list[float]) -> None:
    while True:
        with lock:
            index = state.next
            if index >= max_requests or time.perf_counter() > stop_at[0]:
                return
            state.next += 1
        begun = time.perf_counter()
        try:
            rows = send(client, index)
        except UserError as exc:
            with lock:
                state.errors += 1
                state.first = state.first or str(exc)
            continue
        elapsed = time.perf_counter() - begun
        with lock:
            latencies.append(elapsed)
            state.rows += rows


def _inprocess(file: ModelFile, batch: int, photos: Sequence[bytes],
               options: ServedBenchOptions, runs: int) -> float:
    """Images/s of onnxruntime in this process at ``batch`` (median call; for photos, the
    decoding and preprocessing counted in), bounded like a level."""
    import io

    spec = file.spec()
    rng = np.random.default_rng(options.seed)
    tensor = rng.standard_normal((batch, 3, spec.input_size, spec.input_size), dtype=np.float32)
    times: list[float] = []
    deadline = time.perf_counter() + options.duration_s
    with OrtRunner(file) as runner:
        for _ in range(3):  # warm-up: the first runs allocate
            runner.infer(tensor)
        while len(times) < runs and time.perf_counter() < deadline:
            begun = time.perf_counter()
            if photos:  # load_image opens what Image.open takes: a file object too
                tensor = np.stack([to_tensor(load_image(cast(Any, io.BytesIO(
                    photos[i % len(photos)]))), spec) for i in range(batch)])
            runner.infer(tensor)
            times.append(time.perf_counter() - begun)
    return round(batch / float(np.median(times)), 2)
