"""An ONNX model opened once and checked: its image input, the output read,
its precision and int8 weight peak, and its metadata.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core.errors import UserError
from ..core.machine import cpu_info, saturates
from ..data.spec import PreprocessSpec
from .metadata import ModelMetadata, load_onnx, metadata_from_proto, resolve_spec

if TYPE_CHECKING:
    import onnx


log = logging.getLogger(__name__)


def model_precision(model: onnx.ModelProto) -> str:
    """``int8`` for QDQ/QLinear graphs, ``fp16`` when weights are half, else ``fp32``."""
    import onnx

    ops = {node.op_type for node in model.graph.node}
    if ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger"}:
        return "int8"
    types = Counter(init.data_type for init in model.graph.initializer)
    if types and types.most_common(1)[0][0] == onnx.TensorProto.FLOAT16:
        return "fp16"
    return "fp32"


# uint8 activations (<= 255) times int8 weights, summed in pairs: 2 * 255 * 64 = 32640 fits
# int16 (<= 32767), 2 * 255 * 127 does not. Weights within +-64 cannot saturate on any CPU.
SATURATION_FREE_MAX = 64


def int8_weight_peak(model: onnx.ModelProto) -> int | None:
    """The largest |q| over the model's int8 weight tensors; None when it has none.

    Above :data:`SATURATION_FREE_MAX` the model needs VNNI/AMX to run at full accuracy.
    """
    import onnx
    from onnx import numpy_helper

    peaks = [int(np.abs(numpy_helper.to_array(init).astype(np.int16)).max(initial=0))
             for init in model.graph.initializer
             if init.data_type == onnx.TensorProto.INT8 and len(init.dims) >= 2]
    return max(peaks) if peaks else None


@dataclass(frozen=True)
class GraphIO:
    """The image input and the output a graph is read at (None: a dynamic dimension)."""

    input_name: str
    batch: int | None
    height: int | None
    width: int | None
    classes: int | None  # the chosen output's width: classes, or the embedding's size
    output_name: str = ""


def tensor_dims(value_info: onnx.ValueInfoProto) -> list[int | None]:
    """A graph input's or output's dims; None where a dimension is dynamic."""
    return [d.dim_value if d.HasField("dim_value") else None
            for d in value_info.type.tensor_type.shape.dim]


def choose_output(model: onnx.ModelProto, meta: ModelMetadata | None, source: str | Path,
                  requested: str | None = None) -> onnx.ValueInfoProto:
    """The output to read, chosen on purpose: ``requested``, else the one the metadata
    records, else the single 2-D output. Several candidates and no choice is an error
    naming them, never a silent pick of the first."""
    outputs = {o.name: o for o in model.graph.output}
    fix = "export it with 'resnet-deploy export'"
    if not outputs:
        raise UserError(f"{source}: the model has no output; {fix}")
    if requested is not None:
        if requested not in outputs:
            raise UserError(f"{source}: has no output {requested!r}; its outputs are "
                            f"{', '.join(outputs)}")
        chosen = outputs[requested]
    elif meta is not None and meta.output is not None and meta.output["name"] in outputs:
        chosen = outputs[meta.output["name"]]
    else:
        flat = [o for o in outputs.values() if len(tensor_dims(o)) == 2]
        if len(flat) > 1:
            raise UserError(f"{source}: has {len(flat)} outputs that could be the logits "
                            f"({', '.join(o.name for o in flat)}); choose one with "
                            "`output_name` NAME")
        chosen = flat[0] if flat else next(iter(outputs.values()))
    if len(tensor_dims(chosen)) != 2:
        raise UserError(f"{source}: output {chosen.name!r} has {len(tensor_dims(chosen))} "
                        f"dimensions; expected (N, classes) logits; {fix}")
    return chosen


def graph_io(model: onnx.ModelProto, source: str | Path, meta: ModelMetadata | None = None,
             output_name: str | None = None) -> GraphIO:
    """Check that the graph takes one NCHW float32 RGB image batch and gives 2-D logits."""
    import onnx

    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    fix = "export it with 'resnet-deploy export'"
    if len(inputs) != 1:
        raise UserError(f"{source}: the model has {len(inputs)} inputs; resnet-deploy feeds one "
                        f"image batch; {fix}")
    image = inputs[0]
    dtype = image.type.tensor_type.elem_type
    if dtype != onnx.TensorProto.FLOAT:
        raise UserError(f"{source}: input {image.name!r} is "
                        f"{onnx.TensorProto.DataType.Name(dtype).lower()}, not float32; the "
                        f"preprocessing gives float32 images; {fix}")
    dims = tensor_dims(image)
    if len(dims) != 4 or dims[1] not in (None, 3):
        raise UserError(f"{source}: input {image.name!r} has shape "
                        f"{[d if d is not None else '?' for d in dims]}; expected NCHW with 3 "
                        f"channels (N, 3, H, W); {fix}")
    output = choose_output(model, meta, source, output_name)
    return GraphIO(image.name, dims[0] or None, dims[2] or None, dims[3] or None,
                   tensor_dims(output)[1] or None, output.name)


@dataclass(frozen=True)
class ModelFile:
    """An ONNX model, opened once and checked: path, metadata, precision, int8 weight peak,
    and the image input it declares. Every command opens its models through :meth:`read`,
    so a model that does not fit fails here, before any work, with the file named."""

    path: Path
    meta: ModelMetadata | None
    precision: str
    io: GraphIO
    opset: int
    int8_peak: int | None = None

    @classmethod
    def read(cls, path: str | Path, output_name: str | None = None) -> ModelFile:
        """``output_name``: the output to read when the graph has several candidates."""
        return cls.from_proto(load_onnx(path), path, output_name)

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, path: str | Path,
                   output_name: str | None = None) -> ModelFile:
        """The same checks on an already-parsed model (callers that edit it keep the proto)."""
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        meta = metadata_from_proto(proto, path)
        return cls(Path(path), meta, model_precision(proto),
                   graph_io(proto, path, meta, output_name), opset, int8_weight_peak(proto))

    def spec(self, override: PreprocessSpec | None = None) -> PreprocessSpec:
        """The preprocessing to feed it (``override`` wins), checked against the graph."""
        spec = resolve_spec(self.meta, override, self.path)
        size = (self.io.height, self.io.width)
        if any(d is not None and d != spec.input_size for d in size):
            where = "`input_size`" if override is not None else "its metadata"
            raise UserError(f"{self.path}: the graph takes {size[0] or '?'}x{size[1] or '?'} "
                            f"images but {where} says {spec.input_size}; pass `input_size` "
                            f"{size[0] or size[1]} or re-export the model")
        if self.meta is not None and self.meta.labels is not None and self.io.classes \
                and len(self.meta.labels) != self.io.classes:
            raise UserError(f"{self.path}: its metadata has {len(self.meta.labels)} labels but "
                            f"the graph gives {self.io.classes} logits; re-export it with "
                            "matching `labels`")
        return spec

    @property
    def kind(self) -> str:
        """``logits`` (class scores) or ``features`` (an embedding), as export recorded it."""
        return (self.meta.output or {}).get("kind", "logits") if self.meta else "logits"

    @property
    def arch(self) -> str | None:
        """The ResNet it was exported from (None for a model made elsewhere)."""
        return self.meta.weights.get("arch") if self.meta else None

    @property
    def target(self) -> str | None:
        """The quantize target recorded in the metadata (None for FP32 or foreign models)."""
        quantization = self.meta.quantization if self.meta else None
        return quantization.get("target") if quantization else None

    def cpu_warning(self, provider: str) -> str | None:
        """A one-line warning when this CPU would saturate this model's 8-bit weights."""
        if provider.lower() not in ("cpu", "cpuexecutionprovider"):
            return None
        if (self.int8_peak or 0) <= SATURATION_FREE_MAX:
            return None
        cpu = cpu_info()
        if not saturates(cpu["int8_path"]):
            return None
        target = f"target {self.target}" if self.target else "8-bit weights"
        return (f"{self.path}: {target} needs VNNI or AMX, but this CPU ({cpu['cpu']}, int8 "
                f"path {cpu['int8_path']}) sums in int16 and saturates: its figures here are "
                "worse than on the target; re-quantize with `target` cpu to run on this CPU")

    def warn_if_wrong_cpu(self, provider: str) -> None:
        warning = self.cpu_warning(provider)
        if warning:
            log.warning(warning)
