"""PyTorch -> ONNX: export, check, simplify, stamp the metadata, verify parity, then publish.

The file appears at the output path only after every step has passed: work happens in a
temporary file in the same folder, renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Iterator

import numpy as np

from .errors import CheckFailed, UserError
from .files import atomic_output
from .machine import package_versions
from .metrics import TOLERANCES, compare
from .model import LoadedWeights
from .preprocess import (ModelMetadata, PreprocessSpec, image_inputs, list_images,
                         random_inputs, write_metadata)
from .runtime import OrtBackend, TorchBackend

if TYPE_CHECKING:
    import onnx
    from torch import nn

log = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "torchscript")
SIMPLIFIERS = ("onnxsim", "onnxslim", "none")
DEFAULT_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"


@dataclass(frozen=True)
class ExportOptions:
    exporter: str = "dynamo"
    opset: int = DEFAULT_OPSET
    dynamic_batch: bool = True
    simplify: str = "onnxsim"
    parity_images: Path | None = None
    parity_samples: int = 16
    seed: int = 0


@dataclass
class ExportResult:
    output: str
    exporter: str
    opset: int
    simplifier: str
    nodes_before: int
    nodes_after: int
    size_bytes: int
    weights: str
    parity: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporters print progress and deprecation chatter; send it to the log instead."""
    buffer = io.StringIO()
    torch_onnx_log = logging.getLogger("torch.onnx")
    old_level = torch_onnx_log.level
    torch_onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buffer):
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_onnx_log.setLevel(old_level)
        if buffer.getvalue().strip():
            log.debug("exporter output:\n%s", buffer.getvalue())


def torch_to_onnx(model: nn.Module, spec: PreprocessSpec, path: Path,
                  options: ExportOptions) -> onnx.ModelProto:
    """Run the chosen exporter and return the checked, shape-inferred graph."""
    import onnx
    import torch

    if options.exporter not in EXPORTERS:
        raise UserError(f"--exporter {options.exporter!r}: choose from {', '.join(EXPORTERS)}")
    dummy = torch.zeros(2 if options.dynamic_batch else 1, 3, spec.input_size, spec.input_size)
    try:
        with _quiet_exporter(), torch.inference_mode(False):
            if options.exporter == "dynamo":
                shapes = ({0: torch.export.Dim.DYNAMIC},) if options.dynamic_batch else None
                program = torch.onnx.export(model, (dummy,), dynamo=True,
                                            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                            dynamic_shapes=shapes, opset_version=options.opset,
                                            verbose=False)
                program.save(str(path), external_data=False)
            else:
                axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
                torch.onnx.export(model, (dummy,), str(path), dynamo=False,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_axes=axes if options.dynamic_batch else None,
                                  opset_version=options.opset, do_constant_folding=True)
    except Exception as exc:
        raise UserError(f"the {options.exporter} exporter failed at opset {options.opset} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); try "
                        f"--exporter {'torchscript' if options.exporter == 'dynamo' else 'dynamo'}"
                        " or another --opset") from None
    proto = onnx.load(str(path))
    _name_batch_axis(proto, options.dynamic_batch)
    onnx.checker.check_model(proto, full_check=True)
    return onnx.shape_inference.infer_shapes(proto, strict_mode=True)


def _name_batch_axis(proto: onnx.ModelProto, dynamic: bool) -> None:
    """Both exporters agree on one symbolic name ("batch") for the batch dimension."""
    for value in (*proto.graph.input, *proto.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        if dynamic:
            dim.dim_param = "batch"
        else:
            dim.dim_value = 1


def simplify(proto: onnx.ModelProto, simplifier: str) -> tuple[onnx.ModelProto, str]:
    """Fold constants and fuse with onnxsim (default) or onnxslim; returns the one used."""
    if simplifier not in SIMPLIFIERS:
        raise UserError(f"--simplify {simplifier!r}: choose from {', '.join(SIMPLIFIERS)}")
    if simplifier == "none":
        return proto, "none"
    if simplifier == "onnxsim":
        try:
            import onnxsim
        except ImportError:
            log.warning("onnxsim cannot be imported; simplifying with onnxslim instead")
            simplifier = "onnxslim"
        else:
            simplified, ok = onnxsim.simplify(proto)
            if not ok:
                raise UserError("onnxsim could not validate the simplified model; "
                                "retry with --simplify onnxslim or --simplify none")
            return simplified, "onnxsim"
    try:
        import onnxslim
    except ImportError:
        raise UserError("onnxslim is not installed; pip install onnxslim, "
                        "or pass --simplify none") from None
    return onnxslim.slim(proto), "onnxslim"


def parity_inputs(spec: PreprocessSpec, folder: Path | None, count: int,
                  seed: int) -> tuple[np.ndarray, str]:
    """Real images from ``folder`` when it holds any, else seeded random inputs."""
    if folder is not None and folder.is_dir() and list_images(folder):
        batch, used = image_inputs(folder, spec, count, seed)
        return batch, f"{len(used)} images from {folder}"
    return random_inputs(spec, count, seed), f"{count} seeded random inputs"


def check_parity(model: nn.Module, onnx_path: Path, inputs: np.ndarray,
                 dynamic_batch: bool) -> dict[str, Any]:
    """PyTorch vs ORT CPU at batch 1 and, for a dynamic model, a larger batch."""
    reference = TorchBackend(model).infer(inputs)
    ort_backend = OrtBackend(onnx_path, "cpu")
    tolerance = TOLERANCES["fp32"]
    sizes = [1] + ([min(8, len(inputs))] if dynamic_batch and len(inputs) > 1 else [])
    rows = []
    for size in sizes:
        outputs = np.concatenate([ort_backend.infer(inputs[i:i + size])
                                  for i in range(0, len(inputs) - len(inputs) % size, size)])
        cmp = compare(reference[:len(outputs)], outputs)
        rows.append({"batch_size": size, **cmp.to_dict(), "failures": tolerance.failures(cmp)})
    return {
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
        "cosine_min": min(r["cosine_min"] for r in rows),
        "top1_agreement": min(r["top1_agreement"] for r in rows),
        "batch_sizes": sizes,
        "tolerance": tolerance.describe(),
        "rows": rows,
        "passed": not any(r["failures"] for r in rows),
    }


def export(model: nn.Module, weights: LoadedWeights, spec: PreprocessSpec, output: Path, *,
           labels: list[str] | None = None,
           options: ExportOptions = ExportOptions()) -> ExportResult:
    """Export ``model`` to a single verified ONNX file at ``output``.

    Raises UserError for bad input and CheckFailed (leaving no file) when the exported
    model's logits differ from PyTorch's beyond the FP32 tolerance.
    """
    import onnx

    labels = labels if labels is not None else weights.labels
    if labels is not None and len(labels) != weights.num_classes:
        raise UserError(f"{len(labels)} labels given for a model with {weights.num_classes} "
                        "classes; pass a --labels file with one line per class")
    output = Path(output)
    seconds: dict[str, float] = {}
    with atomic_output(output) as tmp:
        start = time.perf_counter()
        proto = torch_to_onnx(model, spec, tmp, options)
        seconds["export"] = time.perf_counter() - start
        nodes_before = len(proto.graph.node)
        start = time.perf_counter()
        proto, simplifier = simplify(proto, options.simplify)
        seconds["simplify"] = time.perf_counter() - start
        write_metadata(proto, ModelMetadata(
            preprocess=spec, labels=labels,
            weights={"source": weights.source, "sha256": weights.sha256,
                     "random": weights.is_random, "seed": weights.seed,
                     "num_classes": weights.num_classes},
            exporter=options.exporter, opset=options.opset, versions=package_versions()))
        onnx.save(proto, str(tmp), save_as_external_data=False)
        start = time.perf_counter()
        inputs, source = parity_inputs(spec, options.parity_images, options.parity_samples,
                                       options.seed)
        parity = {"inputs": source, **check_parity(model, tmp, inputs, options.dynamic_batch)}
        seconds["parity"] = time.perf_counter() - start
        result = ExportResult(
            output=str(output), exporter=options.exporter, opset=options.opset,
            simplifier=simplifier, nodes_before=nodes_before, nodes_after=len(proto.graph.node),
            size_bytes=tmp.stat().st_size, weights=weights.describe(), parity=parity,
            seconds={k: round(v, 3) for k, v in seconds.items()})
        if not parity["passed"]:
            failures = "; ".join(f for row in parity["rows"] for f in row["failures"])
            raise CheckFailed(f"exported model does not match PyTorch ({failures}); "
                              f"{output} was not written", report=result)
    return result
