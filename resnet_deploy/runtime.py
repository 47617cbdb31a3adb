"""Backends: one interface ("feed a batch, get logits") over PyTorch and ONNX Runtime sessions.

Providers are strict: a provider that ONNX Runtime does not list, or that it drops while
creating the session (it silently falls back to CPU when CUDA libraries are missing), is a
:class:`ProviderUnavailable` error, never a quiet CPU run.
"""

from __future__ import annotations

import json
import logging
import os
import re
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ProviderUnavailable, UserError
from .machine import cpu_info, saturates
from .preprocess import ModelMetadata, PreprocessSpec, load_onnx, metadata_from_proto, resolve_spec

if TYPE_CHECKING:
    import onnx
    import onnxruntime as ort
    from torch import nn

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
                            f"cache ({exc.strerror}); pass --trt-cache DIR") from None
        return [(full, trt), (PROVIDERS["cuda"], {}), cpu]
    return [cpu]


def create_session(model: str | Path, provider: str = "cpu",
                   config: SessionConfig = SessionConfig(), *,
                   label: str | None = None) -> ort.InferenceSession:
    """An InferenceSession that really runs on ``provider``, or a ProviderUnavailable error.

    ``label`` names the model in errors when ``model`` is an internal temporary copy."""
    import onnxruntime as ort

    full = require_provider(provider)
    shown = label or model
    if not Path(model).is_file():
        raise UserError(f"{shown}: no such model file; run 'resnet-deploy export' first")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if config.threads:
        opts.intra_op_num_threads = config.threads
        opts.inter_op_num_threads = 1
    if config.simulate_int8:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    if config.profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(os.environ.get("TMPDIR", "/tmp")) / "rd_profile")
    source: str | bytes = str(model)
    try:
        str(model).encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not UTF-8: ORT takes only UTF-8 paths
        source = Path(model).read_bytes()
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
                            "--output-name NAME")
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

    def backend(self, provider: str = "cpu", config: SessionConfig = SessionConfig(),
                ) -> OrtBackend:
        """A backend that reads this model at its chosen output."""
        return OrtBackend(self.path, provider, config, output=self.io.output_name)

    def spec(self, override: PreprocessSpec | None = None) -> PreprocessSpec:
        """The preprocessing to feed it (``override`` wins), checked against the graph."""
        spec = resolve_spec(self.meta, override, self.path)
        size = (self.io.height, self.io.width)
        if any(d is not None and d != spec.input_size for d in size):
            where = "--input-size" if override is not None else "its metadata"
            raise UserError(f"{self.path}: the graph takes {size[0] or '?'}x{size[1] or '?'} "
                            f"images but {where} says {spec.input_size}; pass --input-size "
                            f"{size[0] or size[1]} or re-export the model")
        if self.meta is not None and self.meta.labels is not None and self.io.classes \
                and len(self.meta.labels) != self.io.classes:
            raise UserError(f"{self.path}: its metadata has {len(self.meta.labels)} labels but "
                            f"the graph gives {self.io.classes} logits; re-export it with "
                            "matching --labels")
        return spec

    @property
    def target(self) -> str | None:
        """The quantize target recorded in the metadata (None for FP32 or foreign models)."""
        quantization = self.meta.quantization if self.meta else None
        return quantization.get("target") if quantization else None

    def cpu_warning(self, provider: str) -> str | None:
        """A one-line warning when this CPU would saturate this model's 8-bit weights."""
        if provider not in ("cpu", PROVIDERS["cpu"]):
            return None
        if (self.int8_peak or 0) <= SATURATION_FREE_MAX:
            return None
        cpu = cpu_info()
        if not saturates(cpu["int8_path"]):
            return None
        target = f"target {self.target}" if self.target else "8-bit weights"
        return (f"{self.path}: {target} needs VNNI or AMX, but this CPU ({cpu['cpu']}, int8 "
                f"path {cpu['int8_path']}) sums in int16 and saturates: its figures here are "
                "worse than on the target; re-quantize with --target cpu to run on this CPU")

    def warn_if_wrong_cpu(self, provider: str) -> None:
        warning = self.cpu_warning(provider)
        if warning:
            log.warning(warning)


class Backend(ABC):
    """A thing you feed an NCHW float32 batch and get logits from."""

    name: str
    provider: str
    model: str | None = None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if batch.ndim != 4 or batch.dtype != np.float32:
            raise UserError(f"{self.name}: expected an NCHW float32 batch, got "
                            f"{batch.dtype} {batch.shape}")
        return self._infer_impl(batch)

    @abstractmethod
    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch; ``infer`` has already checked its shape and dtype."""


class OrtBackend(Backend):
    """``output``: the graph output read (None: the first, for a single-output model)."""

    def __init__(self, model: str | Path, provider: str = "cpu",
                 config: SessionConfig = SessionConfig(), *, label: str | None = None,
                 output: str | None = None) -> None:
        self.session = create_session(model, provider, config, label=label)
        self.outputs = [output] if output else None
        self.model = str(model)
        self.provider = short_provider(provider_name(provider))
        self.name = f"{Path(model).name}@{self.provider}"
        declared = self.session.get_inputs()[0]
        self.input_name = declared.name
        self.static_batch = declared.shape[0] if isinstance(declared.shape[0], int) else None

    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        if self.static_batch is None or len(batch) == self.static_batch:
            return self._run(batch)
        # A static-batch model takes exactly its batch: feed it chunks of that size, the last
        # one filled up by repeating images, and keep only the rows that were asked for.
        step = self.static_batch
        outputs = [self._run(fill_batch(batch[i:i + step], step))[:len(batch[i:i + step])]
                   for i in range(0, len(batch), step)]
        return np.concatenate(outputs)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(self.outputs, {self.input_name: batch})[0].astype(np.float32)


def fill_batch(batch: np.ndarray, size: int) -> np.ndarray:
    """``batch`` repeated up to ``size`` rows (a static-batch model takes no short batch)."""
    return batch if len(batch) == size else np.resize(batch, (size, *batch.shape[1:]))


class TorchBackend(Backend):
    def __init__(self, module: nn.Module, device: str = "cpu", label: str = "torch") -> None:
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise ProviderUnavailable("torch sees no CUDA device; install a CUDA build of "
                                      "torch on a machine with an NVIDIA GPU")
        self.module = module.eval().to(device)
        self.device = device
        self.provider = device
        self.name = f"{label}@{device}"

    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.module(torch.from_numpy(batch).to(self.device))
        return out.float().cpu().numpy()


def torch_devices() -> list[str]:
    """Devices a PyTorch reference can run on here: CPU, plus CUDA when torch sees a GPU."""
    import torch

    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def run_batched(backend: Backend, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """Run ``inputs`` through ``backend`` in chunks of ``batch_size`` (last chunk may be short)."""
    if len(inputs) == 0:
        raise UserError("no inputs to run")
    return np.concatenate([backend.infer(inputs[i:i + batch_size])
                           for i in range(0, len(inputs), batch_size)])
