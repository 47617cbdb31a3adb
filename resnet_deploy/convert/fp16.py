"""FP32 -> FP16 ONNX conversion that keeps FP32 inputs and outputs and the model's metadata.

Half-precision weights halve the file and let CUDA/TensorRT use tensor cores, but callers
(parity, bench, the preprocessing) keep feeding and reading float32: the converter inserts a
Cast at each graph input and output, so an FP16 model is a drop-in replacement. The result
is checked against the FP32 model on ONNX Runtime CPU with the FP16 tolerance (the same one
parity uses) before it is published, like export does.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..artifact.metadata import load_onnx, write_metadata
from ..artifact.model_file import ModelFile, model_precision
from ..core.errors import CheckFailed, UserError
from ..core.files import atomic_output, beside, file_sha256
from ..core.metrics import CheckResult, tolerance
from ..data.spec import PreprocessSpec
from ..runtime.runners import run_model
from .export import parity_inputs

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

CONVERTER = "onnxruntime.transformers.float16"


def default_output(model: str | Path) -> Path:
    """``A.onnx`` -> ``A.fp16.onnx`` beside it."""
    return beside(model, "fp16")


@dataclass(frozen=True)
class Fp16Options:
    """``check_images``: folder for the built-in check (seeded random inputs if it has none)."""

    check_images: Path | None = Path("calibration")
    check_samples: int = 16
    seed: int = 0
    op_block_list: tuple[str, ...] | None = None
    output_name: str | None = None  # the output to check, in models with several


@dataclass(frozen=True)
class Fp16Result:
    source: str
    output: str
    nodes: int
    casts_added: int
    size_bytes: int
    source_size_bytes: int
    io_dtype: str
    check: CheckResult  # FP32 vs FP16 on ORT CPU
    inputs: str  # what the check ran on, in words
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "check"}
        return {**data, "check": {"inputs": self.inputs, **self.check.to_dict()}}


def _converter() -> Any:
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:  # an onnxruntime build without the transformers tools
        raise UserError(f"FP16 conversion needs {CONVERTER} from the onnxruntime package, "
                        f"which cannot be imported here ({exc}); pip install onnxruntime") from None
    return convert_float_to_float16


def to_fp16(proto: onnx.ModelProto, *,
            op_block_list: tuple[str, ...] | None = None) -> onnx.ModelProto:
    """The FP16 graph with FP32 graph inputs/outputs (Casts inserted at the boundary)."""
    import onnx

    convert = _converter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # keep_io_types: the model still takes and returns float32, so the preprocessing
        # and every consumer stay unchanged. Weights beyond the FP16 range are clamped by
        # the converter, which warns; those warnings go to the log.
        half = convert(proto, keep_io_types=True,
                       op_block_list=list(op_block_list) if op_block_list else None)
    for warning in caught:
        log.warning("fp16 converter: %s", warning.message)
    _topological_sort(half.graph)
    for value in (*half.graph.input, *half.graph.output):
        if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise UserError(f"the FP16 converter changed the type of {value.name!r}; "
                            "inputs and outputs must stay float32")
    onnx.checker.check_model(half)
    return half


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after its producers.

    The converter appends the input Casts at the end of the node list; ONNX Runtime copes,
    but the ONNX checker (and some tools) require a topologically sorted graph.
    """
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise UserError("the FP16 graph has a cycle or a dangling input "
                            f"({pending[0].name}); it cannot be sorted")
        for node in ready:
            available.update(node.output)
        ordered.extend(ready)
        done = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in done]
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def convert_fp16(model: str | Path, output: str | Path | None = None, *,
                 options: Fp16Options = Fp16Options()) -> Fp16Result:
    """Write an FP16 copy of ``model`` to ``output`` (default ``A.fp16.onnx``), atomically.

    Raises UserError for an INT8 or already-FP16 input, and CheckFailed (leaving no file)
    when the FP16 logits fall outside the FP16 tolerance of the FP32 ones on ORT CPU.
    """
    import onnx

    source = Path(model)
    output = Path(output) if output is not None else default_output(source)
    if output.resolve() == source.resolve():
        raise UserError(f"{output}: the output would overwrite the input; choose another -o")
    proto = load_onnx(source)
    file = ModelFile.from_proto(proto, source, options.output_name)
    if file.precision != "fp32":
        raise UserError(f"{source}: is already {file.precision.upper()}; convert the FP32 "
                        "export")
    meta = file.meta
    if meta is None and file.io.height is None:
        raise UserError(f"{source}: has no resnet-deploy metadata and a dynamic input size; "
                        "export it with 'resnet-deploy export'")
    spec = file.spec() if meta is not None else PreprocessSpec.create(file.io.height or 0)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    half = to_fp16(proto, op_block_list=options.op_block_list)
    seconds["convert"] = time.perf_counter() - start
    if meta is not None:
        extra = {**meta.extra, "fp16": {"source": str(source), "source_sha256":
                                        file_sha256(source), "converter": CONVERTER,
                                        "keep_io_types": True}}
        write_metadata(half, dataclasses.replace(meta, extra=extra))
    casts = (sum(n.op_type == "Cast" for n in half.graph.node)
             - sum(n.op_type == "Cast" for n in proto.graph.node))
    if model_precision(half) != "fp16":  # parity picks its tolerance from this
        raise UserError(f"{source}: the converted model is not detected as FP16; "
                        "the converter left most weights in float32")
    with atomic_output(output) as tmp:
        onnx.save(half, str(tmp), save_as_external_data=False)
        start = time.perf_counter()
        check, described = check_fp16(source, tmp, spec, options, output=file.io.output_name,
                                      kind=file.kind)
        seconds["check"] = time.perf_counter() - start
        result = Fp16Result(
            source=str(source), output=str(output), nodes=len(half.graph.node),
            casts_added=casts, size_bytes=tmp.stat().st_size,
            source_size_bytes=source.stat().st_size, io_dtype="float32", check=check,
            inputs=described,
            seconds={k: round(v, 3) for k, v in seconds.items()})
        if not check:
            raise CheckFailed(f"FP16 model does not match FP32 ({check.reason}); "
                              f"{output} was not written", report=result)
    return result


def check_fp16(fp32: Path, fp16: Path, spec: PreprocessSpec, options: Fp16Options, *,
               output: str | None = None, kind: str = "logits") -> tuple[CheckResult, str]:
    """FP32 vs FP16 logits on ORT CPU, judged by parity's FP16 tolerance; and the inputs."""
    inputs, described = parity_inputs(spec, options.check_images, options.check_samples,
                                      options.seed)
    reference = run_model(fp32, inputs, len(inputs), output=output)
    candidate = run_model(fp16, inputs, len(inputs), output=output)
    check = CheckResult.judge(f"FP32 vs FP16 on ORT CPU on {described}", reference, candidate,
                              tolerance("fp16", kind))
    return check, described
