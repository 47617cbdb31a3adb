"""Runners: one family over PyTorch and ONNX Runtime, shaped like Polygraphy's.

A runner is a thing you feed an NCHW float32 batch and get the model's output from. It is
a context manager: the session (or the module on its device) exists only between
``__enter__`` and ``__exit__``, so whoever opens one also releases it, and nothing touches
a provider at construction. ``infer`` checks its input and calls the backend's
``_infer_impl``, which times only the inference itself (``last_inference_ns``): preparing
the input (a copy to the GPU, an IO binding) happens once per batch, outside the timing.
Parity, evaluate, quantize's check and bench all run models through this family; bench only
adds options (IO binding, CUDA graphs) and reads the timings.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from ..artifact.model_file import ModelFile
from ..core.errors import ProviderUnavailable, UserError
from .providers import SessionConfig, create_session, node_placement, provider_name, short_provider

if TYPE_CHECKING:
    import onnxruntime as ort
    from torch import nn


class Runner(ABC):
    """Feed a batch, get an output. Use it in a ``with`` block (or activate/deactivate)."""

    name: str
    provider: str
    model: str | None = None

    def __init__(self) -> None:
        self.active = False
        self.last_inference_ns = 0
        self.activation_s = 0.0  # how long activating took (session creation, weights)

    def __enter__(self) -> Self:
        self.activate()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.deactivate()

    def activate(self) -> None:
        start = time.perf_counter()
        self._activate_impl()
        self.activation_s = time.perf_counter() - start
        self.active = True

    def deactivate(self) -> None:
        if self.active:
            self._deactivate_impl()
            self.active = False

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self._check(batch)
        return self._infer_impl(batch)

    def _check(self, batch: np.ndarray) -> None:
        if not self.active:
            raise RuntimeError(f"{self.name}: infer() outside its with-block")
        if batch.ndim != 4 or batch.dtype != np.float32:
            raise UserError(f"{self.name}: expected an NCHW float32 batch, got "
                            f"{batch.dtype} {batch.shape}")

    @abstractmethod
    def _activate_impl(self) -> None:
        """Build the session (or move the module to its device)."""

    @abstractmethod
    def _deactivate_impl(self) -> None:
        """Release what ``_activate_impl`` built."""

    @abstractmethod
    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch (shape and dtype already checked); set ``last_inference_ns``."""


def fill_batch(batch: np.ndarray, size: int) -> np.ndarray:
    """``batch`` repeated up to ``size`` rows (a static-batch model takes no short batch)."""
    return batch if len(batch) == size else np.resize(batch, (size, *batch.shape[1:]))


class OrtRunner(Runner):
    """An ONNX Runtime session on one provider, read at one output.

    ``model`` is a path or an opened :class:`ModelFile` (whose chosen output is read);
    ``output`` names the output otherwise (None: the first). ``label`` names the model in
    errors when the path is an internal temporary copy. ``graph`` is the model serialized
    after an edit in memory (layerwise's extra outputs), run instead of the file at the
    path, which still names it. With ``io_binding``, inputs and
    outputs live on the device (``run_with_iobinding``); with ``config.cuda_graph`` a graph
    is captured per batch shape, so a new shape gets a new session.
    """

    def __init__(self, model: str | Path | ModelFile, provider: str = "cpu",
                 config: SessionConfig = SessionConfig(), *, label: str | None = None,
                 output: str | None = None, io_binding: bool = False,
                 graph: bytes | None = None) -> None:
        super().__init__()
        if isinstance(model, ModelFile):
            output = output or model.io.output_name
            model = model.path
        self.path = Path(model)
        self.model = str(model)
        self.config = config
        self.label = label
        self.graph = graph
        self.output = output or None
        self.io_binding = io_binding or config.cuda_graph
        self.full_provider = provider_name(provider)
        self.provider = short_provider(self.full_provider)
        self.name = f"{self.path.name}@{self.provider}"
        self.session: ort.InferenceSession | None = None
        self._bound: tuple[int, _Binding] | None = None  # (id of the batch, its binding)

    def _activate_impl(self) -> None:
        self.session = create_session(self.path if self.graph is None else self.graph,
                                      self.full_provider, self.config,
                                      label=self.label or str(self.path))
        declared = self.session.get_inputs()[0]
        self.input_name = declared.name
        self.static_batch = declared.shape[0] if isinstance(declared.shape[0], int) else None
        self.output = self.output or self.session.get_outputs()[0].name
        self._profiling = self.config.profile

    def _deactivate_impl(self) -> None:
        if self.session is not None and self._profiling:  # no trace left in $TMPDIR
            Path(self.session.end_profiling()).unlink(missing_ok=True)
        self._bound = None
        self.session = None  # onnxruntime frees the session (and its device memory) here

    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        return self._by_static_batch(batch, lambda rows: [self._run(rows)])[0]

    def infer_outputs(self, batch: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
        """The graph's outputs ``names`` for one batch, as float32 (a plain run: no IO
        binding, no timing)."""
        self._check(batch)
        assert self.session is not None
        session = self.session
        return self._by_static_batch(batch, lambda rows: [
            np.asarray(out, dtype=np.float32)
            for out in session.run(list(names), {self.input_name: rows})])

    def _by_static_batch(self, batch: np.ndarray,
                         run: Callable[[np.ndarray], list[np.ndarray]]) -> list[np.ndarray]:
        if self.static_batch is None or len(batch) == self.static_batch:
            return run(batch)
        # A static-batch model takes exactly its batch: feed it chunks of that size, the last
        # one filled up by repeating images, and keep only the rows that were asked for.
        step = self.static_batch
        chunks = [[out[:len(batch[i:i + step])] for out in run(fill_batch(batch[i:i + step],
                                                                          step))]
                  for i in range(0, len(batch), step)]
        return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]

    def _run(self, batch: np.ndarray) -> np.ndarray:
        assert self.session is not None
        if self.io_binding:
            return self._run_bound(batch)
        start = time.perf_counter_ns()
        out = self.session.run([self.output], {self.input_name: batch})[0]
        self.last_inference_ns = time.perf_counter_ns() - start
        return np.asarray(out, dtype=np.float32)

    def _run_bound(self, batch: np.ndarray) -> np.ndarray:
        """``run_with_iobinding`` on device buffers bound once per batch; the timing covers
        the run and the output synchronisation, so asynchronous GPU work is inside it."""
        assert self.session is not None
        if self._bound is None or self._bound[0] != id(batch):
            if self.config.cuda_graph and self._bound is not None \
                    and self._bound[1].rows != len(batch):
                # A captured graph replays one shape at fixed addresses: a new session.
                self._bound = None
                self.session = None
                self.activate()
                assert self.session is not None
            self._bound = (id(batch), _Binding(self.session, batch, self.device,
                                               fixed=self.config.cuda_graph))
        binding = self._bound[1]
        start = time.perf_counter_ns()
        self.session.run_with_iobinding(binding.binding)
        binding.binding.synchronize_outputs()
        self.last_inference_ns = time.perf_counter_ns() - start
        return binding.output(self.output or "")

    @property
    def device(self) -> str:
        return "cpu" if self.provider == "cpu" else "cuda"

    def placement(self) -> dict[str, int]:
        """Nodes per provider from this runner's profile (``config.profile``; after one
        ``infer``). Ends profiling and removes the trace."""
        assert self.session is not None and self.config.profile
        self._profiling = False
        return node_placement(self.session)


class _Binding:
    """An input and its outputs bound on the device. The input OrtValue is created once, so
    its address is fixed (what CUDA graphs need), and outputs are preallocated on the device
    when their shape is known (required with ``fixed``)."""

    def __init__(self, session: ort.InferenceSession, batch: np.ndarray, device: str, *,
                 fixed: bool) -> None:
        import onnxruntime as ort

        self.rows = len(batch)
        self.binding = session.io_binding()
        self.input = ort.OrtValue.ortvalue_from_numpy(batch, device, 0)
        self.binding.bind_ortvalue_input(session.get_inputs()[0].name, self.input)
        self.values: dict[str, Any] = {}
        for out in session.get_outputs():
            shape = [len(batch) if i == 0 else d for i, d in enumerate(out.shape)]
            if all(isinstance(d, int) and d > 0 for d in shape):
                value = ort.OrtValue.ortvalue_from_shape_and_type(
                    shape, _numpy_dtype(out.type), device, 0)
                self.binding.bind_ortvalue_output(out.name, value)
                self.values[out.name] = value  # kept alive: the binding holds its address
            elif fixed:
                raise UserError(f"output {out.name!r} has shape {out.shape}; a CUDA graph needs "
                                "outputs of known shape; run without `cuda_graph`")
            else:
                self.binding.bind_output(out.name, device, 0)
        self.names = [o.name for o in session.get_outputs()]
        self.binding.synchronize_inputs()

    def output(self, name: str) -> np.ndarray:
        index = self.names.index(name) if name in self.names else 0
        return np.asarray(self.binding.get_outputs()[index].numpy(), dtype=np.float32)


def _numpy_dtype(ort_type: str) -> Any:
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16,
            "tensor(double)": np.float64}.get(ort_type, np.float32)


class TorchRunner(Runner):
    """PyTorch eager under ``inference_mode`` on ``device``. ``channels_last`` is the layout
    torch's own convs prefer (bench's baseline); the input moves to the device once per
    batch, outside the timing, which includes the device's synchronisation."""

    def __init__(self, module: nn.Module, device: str = "cpu", label: str = "torch", *,
                 channels_last: bool = False) -> None:
        super().__init__()
        self.module = module
        self.device = device
        self.provider = device
        self.name = f"{label}@{device}"
        self.channels_last = channels_last
        self._input: tuple[int, Any] | None = None

    def _activate_impl(self) -> None:
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise ProviderUnavailable("torch sees no CUDA device; install a CUDA build of "
                                      "torch on a machine with an NVIDIA GPU")
        self.module = self.module.eval().to(self.device)
        if self.channels_last:
            # the stubs omit the keyword that to() takes here
            self.module = self.module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def _deactivate_impl(self) -> None:
        self._input = None
        if self.device != "cpu":
            self.module = self.module.to("cpu")

    def _infer_impl(self, batch: np.ndarray) -> np.ndarray:
        import torch

        if self._input is None or self._input[0] != id(batch):
            tensor = torch.from_numpy(batch).to(self.device)
            if self.channels_last:
                tensor = tensor.contiguous(memory_format=torch.channels_last)
            self._input = (id(batch), tensor)
        with torch.inference_mode():
            start = time.perf_counter_ns()
            out = self.module(self._input[1])
            if self.device == "cuda":
                torch.cuda.synchronize()
            self.last_inference_ns = time.perf_counter_ns() - start
        return out.float().cpu().numpy()


def torch_devices() -> list[str]:
    """Devices a PyTorch reference can run on here: CPU, plus CUDA when torch sees a GPU."""
    import torch

    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def run_batched(runner: Runner, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """Run ``inputs`` through an active ``runner`` in chunks of ``batch_size``."""
    if len(inputs) == 0:
        raise UserError("no inputs to run")
    return np.concatenate([runner.infer(inputs[i:i + batch_size])
                           for i in range(0, len(inputs), batch_size)])


def run_model(model: str | Path | ModelFile, inputs: np.ndarray, batch_size: int, *,
              provider: str = "cpu", config: SessionConfig = SessionConfig(),
              label: str | None = None, output: str | None = None) -> np.ndarray:
    """Open a runner on ``model``, run ``inputs`` through it in batches, release it."""
    with OrtRunner(model, provider, config, label=label, output=output) as runner:
        return run_batched(runner, inputs, batch_size)
