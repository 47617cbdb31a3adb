"""ONNX Runtime sessions on a provider, strictly: a provider that ONNX Runtime
does not list, or drops while creating the session (it silently falls back
to CPU when CUDA libraries are missing), is an error, never a quiet CPU run.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import ProviderUnavailable, UserError

if TYPE_CHECKING:
    import onnxruntime as ort


log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}

DEFAULT_TRT_CACHE = "artifacts/trt_cache"  # TensorRT engines are slow to build: keep them

GPU_INSTALL_HINT = ("pip install 'resnet-deploy[cuda]' (onnxruntime-gpu, which needs CUDA 13 "
                    "and cuDNN 9 on the library path; TensorRT 10 for the tensorrt provider)")


def provider_name(name: str) -> str:
    """Map ``cpu``/``cuda``/``tensorrt`` or a full ORT name, case-insensitively, to ORT's name."""
    key = name.strip().lower()
    for short, full in PROVIDERS.items():
        if key in (short, full.lower(), full.lower().removesuffix("executionprovider")):
            return full
    raise UserError(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")


def short_provider(full: str) -> str:
    return next((s for s, f in PROVIDERS.items() if f == full), full)


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def require_provider(name: str) -> str:
    """Return ORT's name for ``name``, or raise if this onnxruntime build cannot offer it."""
    import onnxruntime as ort

    full = provider_name(name)
    have = available_providers()
    if full not in have:
        hint = "" if full == PROVIDERS["cpu"] else f"; to get it: {GPU_INSTALL_HINT}"
        raise ProviderUnavailable(
            f"provider {short_provider(full)} ({full}) is not available in onnxruntime "
            f"{ort.__version__} (it lists: {', '.join(have)}){hint}")
    return full


@dataclass(frozen=True)
class SessionConfig:
    """How to build an ORT session; the same config serves parity and bench."""

    threads: int | None = None
    profile: bool = False
    cuda_graph: bool = False
    trt_fp16: bool = False
    trt_int8: bool = False
    trt_cache_dir: str | None = None  # None: DEFAULT_TRT_CACHE
    # Run a QDQ model unfused: DequantizeLinear -> float op -> QuantizeLinear computes the
    # quantized model's arithmetic without the CPU's int8 kernels, so a CPU whose kernels
    # saturate (AVX2, AVX-512 without VNNI) can still measure what VNNI, AMX or TensorRT get.
    simulate_int8: bool = False
    # False: ORT's graph optimisations off (no fusions, no constant folding), a reference
    # that tells a fusion's error from the model's.
    optimize: bool = True


def _provider_chain(full: str, cfg: SessionConfig) -> list[Any]:
    cpu = PROVIDERS["cpu"]
    if full == PROVIDERS["cuda"]:
        cuda_opts = {"enable_cuda_graph": "1"} if cfg.cuda_graph else {}
        return [(full, cuda_opts), cpu]
    if full == PROVIDERS["tensorrt"]:
        trt = {"trt_fp16_enable": str(cfg.trt_fp16), "trt_int8_enable": str(cfg.trt_int8),
               "trt_engine_cache_enable": "True",
               "trt_engine_cache_path": cfg.trt_cache_dir or DEFAULT_TRT_CACHE,
               "trt_cuda_graph_enable": str(cfg.cuda_graph)}
        try:
            Path(trt["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{trt['trt_engine_cache_path']}: cannot hold TensorRT's engine "
                            f"cache ({exc.strerror}); pass `trt_cache_dir` DIR") from None
        return [(full, trt), (PROVIDERS["cuda"], {}), cpu]
    return [cpu]


def create_session(model: str | Path | bytes, provider: str = "cpu",
                   config: SessionConfig = SessionConfig(), *,
                   label: str | None = None) -> ort.InferenceSession:
    """An InferenceSession that really runs on ``provider``, or a ProviderUnavailable error.

    ``model`` is a path, or a serialized graph edited in memory (never written over the
    file). ``label`` names the model in errors when ``model`` is an internal temporary copy
    or bytes."""
    import onnxruntime as ort

    full = require_provider(provider)
    shown = label or ("the in-memory model" if isinstance(model, bytes) else model)
    if not isinstance(model, bytes) and not Path(model).is_file():
        raise UserError(f"{shown}: no such model file; run 'resnet-deploy export' first")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if config.threads:
        opts.intra_op_num_threads = config.threads
        opts.inter_op_num_threads = 1
    if not config.optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if config.simulate_int8:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    if config.profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(os.environ.get("TMPDIR", "/tmp")) / "rd_profile")
    source = model if isinstance(model, bytes) else _session_source(Path(model))
    try:
        session = ort.InferenceSession(source, opts, providers=_provider_chain(full, config))
    except Exception as exc:
        raise UserError(f"{shown}: ONNX Runtime cannot load it on {short_provider(full)} "
                        f"({ort_reason(exc)})") from None
    if full not in session.get_providers():
        raise ProviderUnavailable(
            f"onnxruntime dropped {full} while creating the session for {shown} and would "
            f"have run on {', '.join(session.get_providers())}; its CUDA/cuDNN libraries "
            f"probably failed to load; to fix: {GPU_INSTALL_HINT}")
    return session


def _session_source(model: Path) -> str | bytes:
    """The path as ORT takes it: its bytes when the file name is not UTF-8 (ORT takes only
    UTF-8 paths)."""
    try:
        str(model).encode("utf-8")
    except UnicodeEncodeError:
        return model.read_bytes()
    return str(model)


def ort_reason(exc: BaseException, limit: int = 240) -> str:
    """What onnxruntime says went wrong, without its boilerplate: ``[ONNXRuntimeError] : 1 :
    FAIL : Load model from PATH failed:`` and source locations go; the reason stays."""
    text = " ".join(str(exc).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"^Load model from .*? failed:", "", text)
    text = re.sub(r"/onnxruntime_src/\S+ \S+ onnxruntime::\S+\([^)]*\)\s*", "", text)
    text = text.replace("Fatal error: ", "").strip()
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def node_placement(session: ort.InferenceSession) -> dict[str, int]:
    """How many graph nodes each provider ran, read from a profiled session's trace.

    Call after at least one ``run`` on a session made with ``SessionConfig(profile=True)``;
    this ends profiling. A node on CPU in a CUDA run shows up here, not in silence.
    """
    trace = Path(session.end_profiling())
    try:
        events = json.loads(trace.read_text())
    finally:
        trace.unlink(missing_ok=True)
    nodes: dict[str, str] = {}
    for event in events:
        args = event.get("args") or {}
        if event.get("cat") == "Node" and "provider" in args:
            nodes[event["name"].removesuffix("_kernel_time")] = short_provider(args["provider"])
    return dict(Counter(nodes.values()))
