"""Preparing a graph for QDQ: a model from elsewhere converted to opset 13, onnxruntime's
shape inference and cleanup, the layer names, and --exclude resolved to nodes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import logging.handlers
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ...artifact import layers
from ...artifact.model_file import ModelFile
from ...core.errors import UserError
from ...runtime.providers import create_session
from .recipe import QuantizeOptions

log = logging.getLogger(__name__)

SENSITIVE_OPS = ("Conv", "Gemm", "MatMul")


@contextlib.contextmanager
def quiet_ort() -> Iterator[None]:
    """onnxruntime's quantization tools print progress to stdout and log what they recover
    from (a traceback included) at error level; both go to our debug log instead, and our
    own errors say what failed."""
    buffer = io.StringIO()
    ort_log = logging.getLogger("onnxruntime.quantization")
    held = logging.handlers.MemoryHandler(capacity=1 << 16, flushLevel=logging.CRITICAL + 1)
    propagate = ort_log.propagate
    ort_log.addHandler(held)
    ort_log.propagate = False
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        ort_log.removeHandler(held)
        ort_log.propagate = propagate
        said = [buffer.getvalue().strip(), *(r.getMessage() for r in held.buffer)]
        if any(said):
            log.debug("onnxruntime.quantization:\n%s", "\n".join(filter(None, said)))


# QDQ with per-channel weight scales needs opset 13 (QuantizeLinear's axis attribute).
MIN_OPSET = 13


def scrubbed(exc: BaseException, workdir: Path | None, shown_as: Path) -> str:
    """An exception's first line with any internal temp path replaced by the user's file."""
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    if workdir is not None:
        text = re.sub(re.escape(str(workdir)) + r"/\S*", str(shown_as), text)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def convert_opset(model: Path, output: Path) -> None:
    """A model made elsewhere below opset 13, converted with onnx's version converter."""
    import onnx
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(onnx.load(str(model)), MIN_OPSET)
        onnx.checker.check_model(converted)
    except Exception as exc:
        raise UserError(f"{model}: its opset is below {MIN_OPSET}, which INT8 QDQ needs, and "
                        f"onnx cannot convert it ({scrubbed(exc, output.parent, model)}); "
                        f"export it again at opset {MIN_OPSET} or later") from None
    onnx.save(converted, str(output))


def preprocess_for_quantization(model: Path, output: Path, *, shown_as: Path | None = None,
                                ) -> None:
    """onnxruntime's quant_pre_process: shape inference and graph cleanup before QDQ.
    ``shown_as``: the user's file, named in errors in place of a temp copy."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    shown = shown_as or model
    try:
        with quiet_ort():
            quant_pre_process(str(model), str(output))
    except Exception as exc:
        raise UserError(f"{shown}: onnxruntime cannot prepare it for quantization "
                        f"({scrubbed(exc, output.parent, shown)})") from None


@dataclass(frozen=True)
class Prepared:
    """The FP32 graph made ready for QDQ: where it is, its nodes and their layer names."""

    path: Path
    op_types: dict[str, str]
    names: dict[str, str]


def prepare(model: Path, file: ModelFile, options: QuantizeOptions, workdir: Path,
             ) -> tuple[Prepared, tuple[str, ...]]:
    """Shape inference and cleanup (a model below opset 13 is converted first), the layer
    names, and --exclude resolved to nodes."""
    import onnx

    create_session(model, "cpu")  # onnxruntime must run it: else say so, naming this file
    source = model
    if file.opset < MIN_OPSET:
        source = workdir / "opset13.onnx"
        convert_opset(model, source)
    pre = workdir / "pre.onnx"
    preprocess_for_quantization(source, pre, shown_as=model)
    proto = onnx.load(str(pre), load_external_data=False)
    op_types = {n.name: n.op_type for n in proto.graph.node}
    names = layers.for_model(proto, file.meta)
    excluded, unknown = layers.resolve(options.exclude, op_types, names)
    if unknown:
        convs = [n for n, t in op_types.items() if t in SENSITIVE_OPS]
        raise UserError(f"`exclude` {unknown[0]}: no such node or PyTorch module in {model}; "
                        + layers.closest(unknown[0], convs, names, "Conv/Gemm layers"))
    return Prepared(pre, op_types, names), tuple(excluded)
