"""What both Python-backend models share: the onnxruntime session a config asks for, and
running the requests of one dynamic batch as one call.

Free of Triton's ``triton_python_backend_utils`` (only the stub has it), so it is tested
in-process; the models turn its ``BackendError`` into Triton's errors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


class BackendError(Exception):
    """A model that cannot load as configured (Triton reports it as the load failure)."""


def parameter(config: Mapping[str, Any], key: str) -> str | None:
    """A config ``parameters`` entry's string value; None when absent or empty."""
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return value if value not in (None, "") else None


def thread_count(config: Mapping[str, Any], key: str) -> int:
    """``intra_op_thread_count`` or ``inter_op_thread_count`` (the C++ backend's names);
    0 when absent: onnxruntime's own default."""
    value = parameter(config, key)
    try:
        count = int(value) if value is not None else 0
    except ValueError:
        raise BackendError(f"parameter {key} {value!r} is not an integer") from None
    if count < 0:
        raise BackendError(f"parameter {key} {count} is negative")
    return count


def open_session(path: str, config: Mapping[str, Any], kind: str, device_id: int,
                 label: str) -> Any:
    """An onnxruntime session as the config's instance group and parameters ask: KIND_CPU
    on the CPU provider; KIND_GPU on CUDA, refused when this onnxruntime has none (never a
    quiet CPU run); the thread counts from ``parameters``."""
    import onnxruntime as ort

    if kind == "GPU":
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise BackendError(f"{label}: a KIND_GPU instance needs onnxruntime's CUDA provider, "
                               f"which onnxruntime {ort.__version__} here lacks (it has "
                               f"{', '.join(available)}); serve it on KIND_CPU instances")
        providers: list[Any] = [("CUDAExecutionProvider", {"device_id": device_id})]
    else:
        providers = ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    intra = thread_count(config, "intra_op_thread_count")
    inter = thread_count(config, "inter_op_thread_count")
    if intra:
        options.intra_op_num_threads = intra
    if inter:
        options.inter_op_num_threads = inter
    try:
        return ort.InferenceSession(path, options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own types, one per failure
        raise BackendError(f"{label}: onnxruntime cannot load {path}: "
                           f"{first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def run_together(arrays: Sequence[np.ndarray], batching: bool,
                 run: Callable[[np.ndarray], Sequence[np.ndarray]]) -> list[list[np.ndarray]]:
    """Run each request's rows and return each request its own rows of every output. With
    ``batching``, the requests of one dynamic batch are stacked on dim 0 and run once
    (onnxruntime's rows do not depend on their batch: the outputs are equal bit for bit);
    without it (a static batch graph), each runs alone with its full shape."""
    if not batching or len(arrays) == 1:
        return [list(run(array)) for array in arrays]
    outputs = run(np.concatenate(arrays, axis=0))
    bounds = np.cumsum([0, *(len(a) for a in arrays)])
    return [[np.ascontiguousarray(output[start:stop]) for output in outputs]
            for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]
