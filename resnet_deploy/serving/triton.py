"""Triton's model configuration, derived from the graph and held to the rules
Triton applies when it loads a model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..artifact.metadata import load_onnx, metadata_from_proto
from ..artifact.model_file import model_precision, tensor_dims
from ..core.choices import DEVICES, TRT_PRECISIONS, Device, TrtPrecision
from ..core.errors import UserError
from ..data.spec import PreprocessSpec

if TYPE_CHECKING:
    import onnx


log = logging.getLogger(__name__)

PLATFORM = "onnxruntime_onnx"

INSTALL_HINT = "pip install 'resnet-deploy[triton]'"

MODEL_FILE = "model.onnx"

CONFIG_FILE = "config.pbtxt"

LABELS_FILE = "labels.txt"

VERSION = "1"

TRT_MODES = ("FP32", "FP16", "INT8")  # the onnxruntime backend's precision_mode values

# ONNX TensorProto element types -> Triton data types (names as in model_config.proto).
ONNX_TO_TRITON = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16",
                  5: "TYPE_INT16", 6: "TYPE_INT32", 7: "TYPE_INT64", 8: "TYPE_STRING",
                  9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
                  13: "TYPE_UINT64", 16: "TYPE_BF16"}


def model_config_pb2() -> Any:
    """Triton's ModelConfig schema, from the optional tritonclient dependency."""
    try:
        from tritonclient.grpc import model_config_pb2 as schema
    except ImportError:
        raise UserError(f"the Triton model repository is validated with tritonclient's "
                        f"model_config_pb2, which is not installed; {INSTALL_HINT}") from None
    return schema


@dataclass(frozen=True)
class TritonOptions:
    """How Triton should serve a model. ``preferred_batch_sizes`` None: 8, 16, 32... up to
    ``max_batch_size``. ``intra_op_threads``: onnxruntime's threads per instance (None:
    onnxruntime's default, every core; with several instances on few cores, 1 each).
    ``tensorrt``: fp16 runs FP32/FP16 models in FP16 under TensorRT;
    int8 also runs INT8 (QDQ) models in INT8 (the others in FP16)."""

    max_batch_size: int = 32
    preferred_batch_sizes: tuple[int, ...] | None = None
    max_queue_delay_us: int = 100
    device: Device = "cpu"
    instance_count: int = 1
    intra_op_threads: int | None = None
    tensorrt: TrtPrecision | None = None
    trt_workspace_bytes: int = 1 << 30
    trt_cache_path: str = "/tmp/triton_trt_cache"
    warmup: bool = True

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise UserError(f"`device` {self.device!r}: choose from {', '.join(DEVICES)}")
        if self.tensorrt is not None and self.tensorrt not in TRT_PRECISIONS:
            raise UserError(f"`tensorrt` {self.tensorrt!r}: choose from "
                            f"{', '.join(TRT_PRECISIONS)}")
        if self.tensorrt is not None and self.device != "gpu":
            raise UserError("`tensorrt` is a GPU accelerator; add `device` gpu or drop it")
        if self.max_batch_size < 1 or self.instance_count < 1 or self.max_queue_delay_us < 0 \
                or (self.intra_op_threads is not None and self.intra_op_threads < 1):
            raise UserError("`max_batch_size`, `instance_count` and `intra_op_threads` take "
                            "positive integers, `max_queue_delay_us` a non-negative one")
        sizes = self.preferred_batch_sizes or ()
        if any(not 1 <= size <= self.max_batch_size for size in sizes):
            raise UserError(f"`preferred_batch_sizes` {','.join(map(str, sizes))}: each must be "
                            f"between 1 and `max_batch_size` {self.max_batch_size}")

    def preferred(self) -> tuple[int, ...]:
        if self.preferred_batch_sizes:
            return tuple(sorted(set(self.preferred_batch_sizes)))
        powers = {b for b in (8, 16, 32, 64, 128, 256) if b < self.max_batch_size}
        return tuple(sorted(powers | {self.max_batch_size}))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TensorIO:
    """One graph input or output as Triton sees it: -1 for a symbolic dimension."""

    name: str
    data_type: str
    shape: tuple[int, ...]


def repository_name(model: str | Path) -> str:
    """``resnet18.int8.onnx`` -> ``resnet18_int8``: Triton names a model by its folder."""
    name = Path(model).name
    name = name[:-len(".onnx")] if name.endswith(".onnx") else name
    return name.replace(".", "_")


def triton_io(proto: onnx.ModelProto) -> tuple[list[TensorIO], list[TensorIO]]:
    """The graph's real inputs (initializers excluded) and its outputs, as Triton names
    their types and dims (-1 where a dimension is dynamic)."""
    initializers = {init.name for init in proto.graph.initializer}

    def io(value: Any) -> TensorIO:
        tensor = value.type.tensor_type
        dtype = ONNX_TO_TRITON.get(tensor.elem_type)
        if dtype is None:
            raise UserError(f"{value.name!r} has ONNX element type {tensor.elem_type}, which "
                            "Triton cannot serve")
        shape = tuple(d or -1 for d in tensor_dims(value))  # 0 or unknown: dynamic
        return TensorIO(value.name, dtype, shape)

    inputs = [io(v) for v in proto.graph.input if v.name not in initializers]
    return inputs, [io(v) for v in proto.graph.output]


def static_batch(inputs: Sequence[TensorIO]) -> bool:
    """A graph whose first input has a fixed batch dimension cannot be batched by Triton."""
    return bool(inputs) and bool(inputs[0].shape) and inputs[0].shape[0] != -1


def trt_mode(precision: str, options: TritonOptions) -> str | None:
    """The TensorRT precision_mode a model gets, None without the accelerator."""
    if options.tensorrt is None:
        return None
    return "INT8" if precision == "int8" and options.tensorrt == "int8" else "FP16"


def _spec_parameters(spec: PreprocessSpec) -> dict[str, str]:
    return {"preprocess_input_size": str(spec.input_size),
            "preprocess_resize_size": str(spec.resize_size),
            "preprocess_interpolation": spec.interpolation,
            "preprocess_mean": ",".join(f"{v:g}" for v in spec.mean),
            "preprocess_std": ",".join(f"{v:g}" for v in spec.std),
            "preprocess_channel_order": spec.channel_order,
            "preprocess_layout": spec.layout, "preprocess_dtype": spec.dtype}


def build_config(name: str, proto: onnx.ModelProto, options: TritonOptions, *,
                 has_labels: bool, source_sha256: str) -> Any:
    """The ModelConfig derived from the graph: nothing here is typed in by hand."""
    schema = model_config_pb2()
    inputs, outputs = triton_io(proto)
    static = static_batch(inputs)
    config = schema.ModelConfig(name=name, platform=PLATFORM,
                                max_batch_size=0 if static else options.max_batch_size)

    def dims(io: TensorIO) -> list[int]:
        return list(io.shape if static else io.shape[1:])  # batching: Triton adds the batch

    for io in inputs:
        config.input.add(name=io.name, data_type=schema.DataType.Value(io.data_type),
                         dims=dims(io))
    for index, io in enumerate(outputs):
        out = config.output.add(name=io.name, data_type=schema.DataType.Value(io.data_type),
                                dims=dims(io))
        if has_labels and index == 0:
            out.label_filename = LABELS_FILE
    if not static:
        config.dynamic_batching.preferred_batch_size.extend(options.preferred())
        config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    kind = "KIND_GPU" if options.device == "gpu" else "KIND_CPU"
    config.instance_group.add(count=options.instance_count,
                              kind=schema.ModelInstanceGroup.Kind.Value(kind))
    mode = trt_mode(model_precision(proto), options)
    if mode is not None:
        trt = config.optimization.execution_accelerators.gpu_execution_accelerator.add(
            name="tensorrt")
        trt.parameters.update({"precision_mode": mode,
                               "max_workspace_size_bytes": str(options.trt_workspace_bytes),
                               "trt_engine_cache_enable": "true",
                               "trt_engine_cache_path": options.trt_cache_path})
    if options.warmup:
        warmup = config.model_warmup.add(name="zero_input", batch_size=1)
        for io in inputs:
            shape = [1 if d == -1 else d for d in dims(io)]
            warmup.inputs[io.name].CopyFrom(schema.ModelWarmup.Input(
                data_type=schema.DataType.Value(io.data_type), dims=shape, zero_data=True))
    meta = metadata_from_proto(proto)
    parameters = {"source_sha256": source_sha256, "precision": model_precision(proto)}
    if options.intra_op_threads is not None:  # the C++ backend's name; the Python one too
        parameters["intra_op_thread_count"] = str(options.intra_op_threads)
    if meta is not None:
        parameters.update(_spec_parameters(meta.preprocess))
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def parse_config(path: Path) -> Any:
    """A config.pbtxt read with Triton's schema; unknown fields or wrong types are errors."""
    from google.protobuf import text_format

    schema = model_config_pb2()
    try:
        return text_format.Parse(path.read_text("utf-8"), schema.ModelConfig())
    except (text_format.ParseError, OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a valid Triton ModelConfig ({exc}); regenerate it with "
                        "'resnet-deploy package'") from None


def common_problems(config: Any, model_dir: Path) -> list[str]:
    """The rules Triton core applies to every model, whatever its backend: the name is the
    folder's; preferred batch sizes need batching and lie in 1..max_batch_size; an instance
    group exists, and a CPU one names no GPUs."""
    schema = model_config_pb2()
    problems: list[str] = []
    if config.name != model_dir.name:
        problems.append(f"name {config.name!r} differs from its folder {model_dir.name!r}")
    if config.max_batch_size < 0:
        problems.append("max_batch_size is negative")
    if config.HasField("dynamic_batching"):
        if config.max_batch_size <= 0:
            problems.append("dynamic_batching needs max_batch_size > 0")
        sizes = list(config.dynamic_batching.preferred_batch_size)
        if any(not 1 <= s <= config.max_batch_size for s in sizes):
            problems.append(f"preferred batch sizes {sizes} must lie in 1..max_batch_size "
                            f"({config.max_batch_size})")
    if not config.instance_group:
        problems.append("no instance_group")
    if any(g.kind == schema.ModelInstanceGroup.KIND_CPU and g.gpus for g in config.instance_group):
        problems.append("KIND_CPU instances cannot name GPUs")
    return problems


def config_problems(config: Any, proto: onnx.ModelProto, model_dir: Path) -> list[str]:
    """What Triton (core and onnxruntime backend) would refuse at load, as one line each.

    Besides :func:`common_problems`: inputs name every graph input and outputs only graph
    outputs, with the graph's dtypes; with max_batch_size > 0 the graph's batch dimension
    must be dynamic and dims leave it out, with 0 dims are the full shape; the TensorRT
    accelerator is a GPU one; warm-up feeds every input with its dtype and concrete dims;
    the label file has one line per class.
    """
    schema = model_config_pb2()
    type_name = schema.DataType.Name
    problems = common_problems(config, model_dir)
    if config.platform != PLATFORM:
        problems.append(f"platform {config.platform!r} is not {PLATFORM!r}")
    if not (model_dir / VERSION / MODEL_FILE).is_file():
        problems.append(f"{VERSION}/{MODEL_FILE} is missing")
    batching = config.max_batch_size > 0
    inputs, outputs = triton_io(proto)
    graph = {io.name: io for io in (*inputs, *outputs)}
    wanted = {io.name for io in inputs}
    configured = {io.name for io in config.input}
    if configured != wanted:
        problems.append(f"inputs {sorted(configured)} differ from the graph's {sorted(wanted)}")
    for kind, entries in (("input", config.input), ("output", config.output)):
        for io in entries:
            found = graph.get(io.name)
            if found is None or (kind == "output" and io.name not in {o.name for o in outputs}):
                problems.append(f"{kind} {io.name!r} is not a graph {kind}")
                continue
            if type_name(io.data_type) != found.data_type:
                problems.append(f"{kind} {io.name!r} is {type_name(io.data_type)} but the "
                                f"graph has {found.data_type}")
            problems += dims_problems(kind, io.name, list(io.dims), found.shape, batching,
                                      config.max_batch_size)
    gpu = any(g.kind == schema.ModelInstanceGroup.KIND_GPU for g in config.instance_group)
    accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
    problems += _accelerator_problems(accelerators, gpu, proto)
    problems += _warmup_problems(config, type_name)
    problems += label_problems(config, model_dir, graph)
    return problems


def dims_problems(kind: str, name: str, dims: list[int], shape: tuple[int, ...],
                   batching: bool, max_batch_size: int) -> list[str]:
    if batching:
        if not shape or shape[0] != -1:
            return [f"{kind} {name!r}: the graph's batch dimension is fixed ({shape}), so "
                    f"max_batch_size must be 0, not {max_batch_size}"]
        shape = shape[1:]
    if len(dims) != len(shape) or any(g != -1 and d != g for d, g in zip(dims, shape, strict=True)):
        return [f"{kind} {name!r}: dims {dims} do not match the graph's "
                f"{list(shape)}{' (batch dimension left out)' if batching else ''}"]
    return []


def _accelerator_problems(accelerators: Any, gpu: bool, proto: onnx.ModelProto) -> list[str]:
    problems = []
    precision = model_precision(proto)
    modes = [acc.parameters.get("precision_mode", "FP32") for acc in accelerators
             if acc.name == "tensorrt"]
    if any(acc.name != "tensorrt" for acc in accelerators):
        problems.append("the only GPU accelerator of the onnxruntime backend is 'tensorrt'")
    if accelerators and not gpu:
        problems.append("a GPU accelerator needs a KIND_GPU instance group")
    if any(mode not in TRT_MODES for mode in modes):
        problems.append(f"TensorRT precision_mode {modes} is not one of {TRT_MODES}")
    if "INT8" in modes and precision != "int8":
        problems.append(f"TensorRT INT8 needs a quantized (QDQ) model; this one is {precision}")
    if gpu and precision == "int8" and "INT8" not in modes:
        problems.append("an INT8 (QDQ) model on GPU needs the TensorRT accelerator in INT8: "
                        "the CUDA provider has no INT8 convolution")
    meta = metadata_from_proto(proto)
    target = (meta.quantization or {}).get("target") if meta else None
    if gpu and "INT8" in modes and target not in (None, "tensorrt"):
        problems.append(f"this INT8 model was quantized for target {target} (asymmetric "
                        "uint8); TensorRT takes only symmetric int8")
    return problems


def _warmup_problems(config: Any, type_name: Any) -> list[str]:
    problems = []
    declared = {io.name: io for io in config.input}
    for warmup in config.model_warmup:
        if not 1 <= warmup.batch_size <= max(config.max_batch_size, 1):
            problems.append(f"warm-up {warmup.name!r}: batch_size {warmup.batch_size} outside "
                            f"1..{max(config.max_batch_size, 1)}")
        if set(warmup.inputs) != set(declared):
            problems.append(f"warm-up {warmup.name!r} feeds {sorted(warmup.inputs)}, not the "
                            f"inputs {sorted(declared)}")
        for name, value in warmup.inputs.items():
            io = declared.get(name)
            if io is None:
                continue
            if value.data_type != io.data_type:
                problems.append(f"warm-up input {name!r} is {type_name(value.data_type)}, the "
                                f"input {type_name(io.data_type)}")
            pairs = list(zip(value.dims, io.dims, strict=False))
            if len(value.dims) != len(io.dims) or any(d < 1 or c not in (-1, d) for d, c in pairs):
                problems.append(f"warm-up input {name!r}: dims {list(value.dims)} do not fit "
                                f"{list(io.dims)}")
    return problems


def label_problems(config: Any, model_dir: Path, graph: Mapping[str, TensorIO]) -> list[str]:
    problems = []
    for io in config.output:
        if not io.label_filename:
            continue
        path = model_dir / io.label_filename
        if not path.is_file():
            problems.append(f"label file {io.label_filename} is missing")
            continue
        count = sum(1 for line in path.read_text("utf-8").splitlines() if line.strip())
        classes = graph[io.name].shape[-1] if io.name in graph else -1
        if classes != -1 and count != classes:
            problems.append(f"{io.label_filename} has {count} labels for {classes} classes")
    return problems


def check_repository(root: str | Path) -> list[str]:
    """Parse every ``*/config.pbtxt`` under ``root`` and check it against its model: an
    onnxruntime model against its ``1/model.onnx``, an image endpoint against the model
    file it runs (:mod:`image_endpoint`).

    Returns the models checked; raises UserError naming the first model Triton would refuse.
    """
    from .image_endpoint import image_problems, is_image_config

    root = Path(root)
    names = []
    for config_path in sorted(root.glob(f"*/{CONFIG_FILE}")):
        model_dir = config_path.parent
        config = parse_config(config_path)
        problems = (image_problems(config, model_dir) if is_image_config(config) else
                    config_problems(config, load_onnx(model_dir / VERSION / MODEL_FILE),
                                    model_dir))
        if problems:
            raise UserError(f"{config_path}: Triton would refuse it: {problems[0]}"
                            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        names.append(model_dir.name)
    if not names:
        raise UserError(f"{root}: holds no <model>/{CONFIG_FILE}; build one with "
                        "'resnet-deploy package'")
    return names
