"""Runners: one interface ("feed a batch, get logits") over PyTorch and ONNX
Runtime sessions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..core.errors import ProviderUnavailable, UserError
from ..artifact.model_file import ModelFile
from .providers import SessionConfig, create_session, provider_name, short_provider

if TYPE_CHECKING:
    from torch import nn


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

    @classmethod
    def for_file(cls, file: ModelFile, provider: str = "cpu",
                 config: SessionConfig = SessionConfig()) -> OrtBackend:
        """A backend that reads an opened model at its chosen output."""
        return cls(file.path, provider, config, output=file.io.output_name)

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
