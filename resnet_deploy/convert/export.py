"""PyTorch -> ONNX: export, check, simplify, stamp the metadata, verify parity, then publish.

The file appears at the output path only after every step has passed: work happens in a
temporary file in the same folder, renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..artifact.metadata import ModelMetadata, write_metadata
from ..core.choices import DEFAULT_OPSET, EXPORTERS, SIMPLIFIERS, Exporter, Simplifier
from ..core.errors import CheckFailed, UserError
from ..core.files import atomic_output
from ..core.machine import package_versions
from ..core.metrics import CheckResult, tolerance
from ..data.images import image_inputs, list_images, random_inputs
from ..data.spec import PreprocessSpec
from ..runtime.runners import OrtRunner, TorchRunner, run_batched
from ..weights.checkpoints import LoadedWeights

if TYPE_CHECKING:
    import onnx
    from torch import nn

log = logging.getLogger(__name__)
INDUCTOR_CACHE = "TORCHINDUCTOR_CACHE_DIR"

INPUT_NAME = "input"
# The output is named after its kind: class scores, or the pooled embedding before fc.
OUTPUT_NAMES = {"logits": "logits", "features": "features"}
# Keys of the metadata's ``extra`` record: where each preprocessing value and the labels
# came from, in words (reports print them).
SOURCES_KEY, LABELS_SOURCE_KEY = "preprocess_sources", "labels_source"


@dataclass(frozen=True)
class ExportOptions:
    exporter: Exporter = "dynamo"
    opset: int = DEFAULT_OPSET
    dynamic_batch: bool = True
    simplify: Simplifier = "onnxsim"
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
    checks: dict[int, CheckResult]  # PyTorch vs ORT CPU, by batch size
    seconds: dict[str, float] = field(default_factory=dict)
    constants_folded: int = 0  # nodes the simplifier computed ahead into initializers
    batchnorm_nodes: int = 0  # BatchNormalization nodes left in the final graph
    labels_source: str = ""  # where the stored class names came from, in words
    parity_inputs: str = ""  # what the checks ran on, in words
    layers: int = 0  # nodes named after the PyTorch module they came from
    preprocess: dict[str, Any] = field(default_factory=dict)  # the spec stored in the model
    preprocess_sources: dict[str, str] = field(default_factory=dict)  # field -> its source
    weights_sha256: str | None = None

    @property
    def passed(self) -> bool:
        return all(self.checks.values())

    @property
    def parity(self) -> dict[str, Any]:
        """The checks summed up: the worst figure of each over every batch size."""
        checks = list(self.checks.values())
        cmps = [c.comparison for c in checks]
        return {"inputs": self.parity_inputs, "batch_sizes": list(self.checks),
                "max_abs_diff": max(c.max_abs_diff for c in cmps),
                "cosine_min": min(c.cosine_min for c in cmps),
                "top1_agreement": min(c.top1_agreement for c in cmps),
                "tolerance": checks[0].tolerance.describe(), "passed": self.passed,
                "rows": [{"batch_size": size, **c.to_dict()} for size, c in self.checks.items()]}

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "checks"}
        return {**data, "parity": self.parity}


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporters print progress and deprecation chatter; send it to the log instead.

    torch.export also fills a compile cache (``torchinductor_<user>``) in $TMPDIR; it is
    pointed at a folder of our own that goes away with the export, interrupted or not.
    """
    buffer = io.StringIO()
    torch_onnx_log = logging.getLogger("torch.onnx")
    old_level = torch_onnx_log.level
    torch_onnx_log.setLevel(logging.ERROR)
    old_cache = os.environ.get(INDUCTOR_CACHE)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buffer), \
                tempfile.TemporaryDirectory(prefix="rd-export-") as cache:
            os.environ[INDUCTOR_CACHE] = cache
            warnings.simplefilter("ignore")
            yield
    finally:
        if old_cache is None:
            os.environ.pop(INDUCTOR_CACHE, None)
        else:
            os.environ[INDUCTOR_CACHE] = old_cache
        torch_onnx_log.setLevel(old_level)
        if buffer.getvalue().strip():
            log.debug("exporter output:\n%s", buffer.getvalue())


def torch_to_onnx(model: nn.Module, spec: PreprocessSpec, path: Path,
                  options: ExportOptions, output: str = OUTPUT_NAMES["logits"],
                  ) -> onnx.ModelProto:
    """Run the chosen exporter and return the checked, shape-inferred graph, its output
    named ``output``."""
    import onnx
    import torch

    if options.exporter not in EXPORTERS:
        raise UserError(f"`exporter` {options.exporter!r}: choose from {', '.join(EXPORTERS)}")
    dummy = torch.zeros(2 if options.dynamic_batch else 1, 3, spec.input_size, spec.input_size)
    try:
        with _quiet_exporter(), torch.inference_mode(False):
            if options.exporter == "dynamo":
                shapes = ({0: torch.export.Dim.DYNAMIC},) if options.dynamic_batch else None
                program = torch.onnx.export(model, (dummy,), dynamo=True,
                                            input_names=[INPUT_NAME], output_names=[output],
                                            dynamic_shapes=shapes, opset_version=options.opset,
                                            verbose=False)
                if program is None:  # only the TorchScript path returns nothing
                    raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
                program.save(str(path), external_data=False)
            else:
                axes = {INPUT_NAME: {0: "batch"}, output: {0: "batch"}}
                torch.onnx.export(model, (dummy,), str(path), dynamo=False,
                                  input_names=[INPUT_NAME], output_names=[output],
                                  dynamic_axes=axes if options.dynamic_batch else None,
                                  opset_version=options.opset, do_constant_folding=True)
    except Exception as exc:
        raise UserError(f"the {options.exporter} exporter failed at opset {options.opset} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); try "
                        f"`exporter` {'torchscript' if options.exporter == 'dynamo' else 'dynamo'}"
                        " or another `opset`") from None
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
        raise UserError(f"`simplify` {simplifier!r}: choose from {', '.join(SIMPLIFIERS)}")
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
                                "retry with `simplify` onnxslim or `simplify` none")
            return simplified, "onnxsim"
    try:
        import onnxslim
    except ImportError:
        raise UserError("onnxslim is not installed; pip install onnxslim, "
                        "or pass `simplify` none") from None
    return onnxslim.slim(proto), "onnxslim"


def parity_inputs(spec: PreprocessSpec, folder: Path | None, count: int,
                  seed: int) -> tuple[np.ndarray, str]:
    """Real images from ``folder`` when it holds any, else seeded random inputs."""
    listed = list_images(folder) if folder is not None and folder.is_dir() else []
    if folder is not None and listed:
        batch, used = image_inputs(folder, spec, count, seed, listed=listed)
        return batch, f"{len(used)} images from {folder}"
    return random_inputs(spec, count, seed), f"{count} seeded random inputs"


def check_parity(model: nn.Module, onnx_path: Path, inputs: np.ndarray, source: str,
                 dynamic_batch: bool, kind: str = "logits") -> dict[int, CheckResult]:
    """PyTorch vs ORT CPU at batch 1 and, for a dynamic model, a larger batch, judged by
    FP32's tolerance for an output of ``kind``."""
    with TorchRunner(model) as torch_runner:
        reference = torch_runner.infer(inputs)
    sizes = [1] + ([min(8, len(inputs))] if dynamic_batch and len(inputs) > 1 else [])
    checks = {}
    with OrtRunner(onnx_path, "cpu") as ort_runner:
        for size in sizes:
            usable = len(inputs) - len(inputs) % size
            outputs = run_batched(ort_runner, inputs[:usable], size)
            checks[size] = CheckResult.judge(f"PyTorch vs ORT CPU at batch {size} on {source}",
                                             reference[:usable], outputs,
                                             tolerance("fp32", kind))
    return checks


def constants_folded(outputs_before: list[list[str]], after: onnx.ModelProto) -> int:
    """Nodes (given by their outputs) whose outputs ``after`` holds as initializers: the
    simplifier computed them ahead of time."""
    initializers = {init.name for init in after.graph.initializer}
    return sum(any(out in initializers for out in outs) for outs in outputs_before)


def export(model: nn.Module, weights: LoadedWeights, spec: PreprocessSpec, output: Path, *,
           labels: list[str] | None = None, labels_source: str | None = None,
           preprocess_sources: Mapping[str, str] | None = None,
           options: ExportOptions = ExportOptions()) -> ExportResult:
    """Export ``model`` to a single verified ONNX file at ``output``.

    ``labels`` (from ``labels_source``, in words) win over the weights' own. The node ->
    PyTorch module mapping (:mod:`layers`), the output's name and kind, and where each
    preprocessing value came from (``preprocess_sources``, :mod:`card`) are recorded in
    the metadata. Raises UserError
    for bad input and CheckFailed (leaving no file) when the exported model's logits
    differ from PyTorch's beyond the FP32 tolerance.
    """
    import onnx

    from ..artifact import layers

    if labels is None:
        labels, labels_source = weights.labels, weights.labels_source
    if weights.features and labels is not None:
        raise UserError(f"{labels_source or 'the labels'}: a features model gives an "
                        "embedding, not classes, so it takes no labels; drop `labels`")
    if labels is not None and len(labels) != weights.num_classes:
        fix = (f"give `num_classes` {len(labels)} for a random model, or a labels file "
               "with one line per class" if weights.is_random else
               "give a labels file with one line per class")
        raise UserError(f"{labels_source or 'the labels'}: {len(labels)} labels for a model "
                        f"with {weights.num_classes} classes; {fix}")
    kind = "features" if weights.features else "logits"
    output = Path(output)
    seconds: dict[str, float] = {}
    with atomic_output(output) as tmp:
        start = time.perf_counter()
        proto = torch_to_onnx(model, spec, tmp, options, OUTPUT_NAMES[kind])
        seconds["export"] = time.perf_counter() - start
        # Read before simplifying (which may edit the graph in place): the node count, what
        # each node outputs, and the exporter's scopes, which may not survive simplification.
        nodes_before = len(proto.graph.node)
        outputs_before = [list(node.output) for node in proto.graph.node]
        names = layers.derive(proto)
        start = time.perf_counter()
        proto, simplifier = simplify(proto, options.simplify)
        seconds["simplify"] = time.perf_counter() - start
        names.update(layers.derive(proto))
        names = {node.name: names[node.name] for node in proto.graph.node if node.name in names}
        # The opset the file declares, which is what gets recorded: the dynamo exporter
        # writes 18 when asked for less and its down-conversion fails.
        opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        if opset != options.opset:
            log.warning("the %s exporter wrote opset %d, not the %d asked for",
                        options.exporter, opset, options.opset)
        write_metadata(proto, ModelMetadata(
            preprocess=spec, labels=labels,
            weights={"source": weights.source, "sha256": weights.sha256,
                     "random": weights.is_random, "seed": weights.seed,
                     "num_classes": weights.num_classes, "arch": weights.arch,
                     "features": weights.features},
            exporter=options.exporter, opset=opset, versions=package_versions(),
            output={"name": OUTPUT_NAMES[kind], "kind": kind},
            extra={layers.METADATA_KEY: names,
                   SOURCES_KEY: dict(preprocess_sources or {}),
                   LABELS_SOURCE_KEY: labels_source}))
        onnx.save(proto, str(tmp), save_as_external_data=False)
        start = time.perf_counter()
        inputs, source = parity_inputs(spec, options.parity_images, options.parity_samples,
                                       options.seed)
        checks = check_parity(model, tmp, inputs, source, options.dynamic_batch, kind)
        seconds["parity"] = time.perf_counter() - start
        result = ExportResult(
            output=str(output), exporter=options.exporter, opset=opset,
            simplifier=simplifier, nodes_before=nodes_before, nodes_after=len(proto.graph.node),
            size_bytes=tmp.stat().st_size, weights=weights.describe(), checks=checks,
            parity_inputs=source,
            seconds={k: round(v, 3) for k, v in seconds.items()},
            constants_folded=constants_folded(outputs_before, proto),
            batchnorm_nodes=sum(n.op_type == "BatchNormalization" for n in proto.graph.node),
            labels_source=(f"{len(labels)} class names from {labels_source or 'the caller'}"
                           if labels is not None else
                           "none: the output is the embedding (features)" if weights.features
                           else "none: outputs are class indices"),
            layers=len(names), preprocess=spec.to_dict(),
            preprocess_sources=dict(preprocess_sources or {}), weights_sha256=weights.sha256)
        if not result.passed:
            failures = "; ".join(c.reason for c in checks.values() if not c)
            raise CheckFailed(f"exported model does not match PyTorch ({failures}); "
                              f"{output} was not written", report=result)
    return result
