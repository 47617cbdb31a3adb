"""Layer by layer: where two backends part ways, named by the PyTorch module.

Parity says whether two backends agree on the logits; this says where they stop agreeing.
The points compared are the outputs of each Conv, Gemm, pooling and residual Add of the
ONNX graph, taken after the BatchNormalization/Relu that follow them alone (the exporter
folds BatchNorm into the conv, and onnxruntime's QDQ quantizer fuses the Relu into it by
giving the conv the Relu's output name, so the points line up across FP32 and INT8). In a
QDQ graph a point is the DequantizeLinear output standing for that FP32 tensor: what the
next layer really reads. The points become extra outputs of a copy of the graph in memory;
PyTorch gives the same tensors through forward hooks on the modules the layer names point
at (:func:`torch_target`).

Inputs stream ``batch_size`` at a time, and only the statistics of each layer are kept, so
memory holds one batch of intermediates whatever the number of images.

It sits with the runners, below both of its users: parity's report (``--layerwise``) and
quantize's fallback, which keeps in FP32 the layers where this finds most INT8 error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..artifact.layers import for_model
from ..artifact.metadata import load_onnx, metadata_from_proto
from ..core.metrics import Tolerance, ToleranceOverrides, looser, round_sig
from .runners import OrtRunner, Runner, TorchRunner

if TYPE_CHECKING:
    import onnx
    from torch import nn


# The nodes whose outputs are compared, and what may follow one before its point is read.
ANCHORS = frozenset({"Conv", "Gemm", "MaxPool", "GlobalAveragePool", "ReduceMean", "Add"})
_CHAIN = frozenset({"BatchNormalization", "Relu"})
# Ops a tensor passes through unchanged in meaning, walking back from a layer to the point
# that feeds it (the INT8 error budget's "input").
_PASS_THROUGH = frozenset({"QuantizeLinear", "DequantizeLinear", "Relu", "BatchNormalization",
                           "Reshape", "Flatten", "Identity", "Cast"})
INPUT = "<input>"  # the image batch as a side sees it (quantized, in a QDQ graph)
SHOWN = 10  # layers in the printed table; the JSON has them all

INT8_NOTE = ("layerwise INT8 intermediates run unfused (their QDQ tensors are graph outputs, "
             "which stops onnxruntime fusing them), like quantize's simulated check: on an "
             "AVX2 CPU they miss the int16 saturation of the fused int8 kernels, so a layer "
             "can look better here than the model runs")


class Batches(Protocol):
    """Inputs that stream: parity's photos or random draws, quantize's held-out arrays.
    ``names`` holds one entry per input once a pass has ended."""

    names: list[str]

    def batches(self, size: int) -> Iterator[np.ndarray]: ...


@dataclass(frozen=True)
class Point:
    """One compared tensor of a graph: its anchor node, the tensor this graph exposes for
    it, the PyTorch module the node came from, and the points feeding it."""

    node: str
    op: str
    tensor: str
    module: str | None
    sources: tuple[str, ...]  # anchor nodes (or INPUT) of the points it reads


@dataclass(frozen=True)
class GraphPoints:
    points: tuple[Point, ...]
    input_tensor: str | None  # the image's DequantizeLinear output in a QDQ graph

    @property
    def by_node(self) -> dict[str, Point]:
        return {p.node: p for p in self.points}


class _Wiring:
    """Who produces and who consumes each tensor of a graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.outputs = {o.name for o in graph.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.producers: dict[str, onnx.NodeProto] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
            for name in node.output:
                self.producers[name] = node

    def chain_end(self, tensor: str) -> str:
        """Past the BatchNormalization/Relu that alone consume ``tensor``."""
        while tensor not in self.outputs and len(self.consumers.get(tensor, ())) == 1 \
                and self.consumers[tensor][0].op_type in _CHAIN:
            tensor = self.consumers[tensor][0].output[0]
        return tensor

    def dequantized(self, tensor: str) -> str:
        """The DequantizeLinear output standing for ``tensor`` (itself when not quantized)."""
        for quantize in self.consumers.get(tensor, ()):
            if quantize.op_type == "QuantizeLinear":
                for dequantize in self.consumers.get(quantize.output[0], ()):
                    if dequantize.op_type == "DequantizeLinear":
                        return str(dequantize.output[0])
        return tensor

    def source(self, tensor: str, found: Mapping[str, str], image: str) -> str | None:
        """The point (or INPUT) ``tensor`` carries, walking back through pass-through ops;
        None for a weight or anything else."""
        while tensor not in found:
            if tensor == image:
                return INPUT
            producer = self.producers.get(tensor)
            if producer is None or producer.op_type not in _PASS_THROUGH:
                return None
            tensor = producer.input[0]
        return found[tensor]


def _key(node: onnx.NodeProto) -> str:
    """A node's name, or its output's where it has none (a graph made elsewhere may leave
    nodes unnamed; an output name is unique by ONNX's rules)."""
    return node.name or node.output[0]


def graph_points(model: onnx.ModelProto, names: Mapping[str, str]) -> GraphPoints:
    """Every compared point of ``model`` in graph (topological) order."""
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    image = next(i.name for i in graph.input if i.name not in initializers)
    wiring = _Wiring(graph)
    anchors = [n for n in graph.node if n.op_type in ANCHORS]
    found: dict[str, str] = {}  # tensor (FP32 name or its dequantized one) -> anchor node
    exposed: dict[str, str] = {}
    for node in anchors:
        end = wiring.chain_end(node.output[0])
        exposed[_key(node)] = wiring.dequantized(end)
        found[end] = found[exposed[_key(node)]] = _key(node)
    points = []
    for node in anchors:
        feeding = [wiring.source(t, found, image) for t in node.input if t not in initializers]
        points.append(Point(_key(node), node.op_type, exposed[_key(node)], names.get(node.name),
                            tuple(dict.fromkeys(s for s in feeding if s))))
    input_tensor = wiring.dequantized(image)
    return GraphPoints(tuple(points), input_tensor if input_tensor != image else None)


def torch_target(model: nn.Module, point: Point) -> tuple[str, int] | None:
    """The (module path, call) whose output is ``point`` in PyTorch, or None.

    BatchNorm is folded into the conv in the graph, and the ReLUs of a block are one module
    applied once per conv (in place), so: a conv followed by a ReLU in its block (or the
    stem's conv1) is that block's ``relu`` at the call of the conv's rank; a block's last
    conv is its last BatchNorm (before the residual Add); ``downsample.0`` is
    ``downsample.1``; an Add is its block's output (after the block's final ReLU); pooling
    and ``fc`` are their modules."""
    path = point.module
    if not path:
        return None
    modules = dict(model.named_modules())
    if point.op != "Conv":
        return (path, 0) if path in modules else None
    parent, _, leaf = path.rpartition(".")
    if parent.endswith("downsample") and leaf == "0":
        target = f"{parent}.1"
        return (target, 0) if target in modules else None
    owner = modules.get(parent)
    if owner is None:
        return None
    convs = [name for name, _ in owner.named_children() if name.startswith("conv")]
    if leaf not in convs:
        return None
    rank = convs.index(leaf)
    prefix = f"{parent}." if parent else ""
    if hasattr(owner, "last_bn") and rank == len(convs) - 1:
        target = prefix + leaf.replace("conv", "bn", 1)
        return (target, 0) if target in modules else None
    return (f"{prefix}relu", rank) if f"{prefix}relu" in modules else None


class OnnxSide:
    """A model with its points as extra outputs, on a copy in memory; keys are the points'
    nodes (:func:`_key`)."""

    def __init__(self, runner: OrtRunner) -> None:
        import onnx

        proto = load_onnx(runner.path)
        self.names = for_model(proto, metadata_from_proto(proto, runner.path))
        self.graph = graph_points(proto, self.names)
        typed = {v.name: v for v in onnx.shape_inference.infer_shapes(proto).graph.value_info}
        present = {o.name for o in proto.graph.output}
        wanted = [p.tensor for p in self.graph.points]
        if self.graph.input_tensor is not None:
            wanted.append(self.graph.input_tensor)
        for name in dict.fromkeys(wanted):
            if name not in present:
                proto.graph.output.append(
                    typed.get(name) or onnx.helper.make_empty_tensor_value_info(name))
        self.tensors = list(dict.fromkeys(wanted))
        self.runner = OrtRunner(runner.path, runner.provider, runner.config,
                                output=runner.output, graph=proto.SerializeToString())
        self.name = runner.name

    def __enter__(self) -> OnnxSide:
        self.runner.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        self.runner.deactivate()

    def capture(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        values = dict(zip(self.tensors, self.runner.infer_outputs(batch, self.tensors),
                          strict=True))
        out = {p.node: values[p.tensor] for p in self.graph.points}
        out[INPUT] = values[self.graph.input_tensor] if self.graph.input_tensor else batch
        return out


class TorchSide:
    """A PyTorch module with forward hooks on the modules of ``targets``; keys are
    ``module:call``. The hooks copy what they see: a ReLU runs in place, and the next call
    of the same module overwrites its tensor."""

    def __init__(self, runner: TorchRunner, targets: Sequence[tuple[str, int]]) -> None:
        self.runner = runner
        self.wanted: dict[str, set[int]] = {}
        for module, call in targets:
            self.wanted.setdefault(module, set()).add(call)
        self.name = runner.name
        self._seen: dict[str, list[Any]] = {}

    @staticmethod
    def key(target: tuple[str, int]) -> str:
        return f"{target[0]}:{target[1]}"

    def __enter__(self) -> TorchSide:
        self.runner.activate()
        modules = dict(self.runner.module.named_modules())
        self._handles = [modules[name].register_forward_hook(self._hook(name))
                         for name in self.wanted]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self.runner.deactivate()

    def _hook(self, name: str) -> Any:
        def hook(_module: Any, _args: Any, output: Any) -> None:
            calls = self._seen.setdefault(name, [])
            calls.append(output.detach().clone() if len(calls) in self.wanted[name] else None)
        return hook

    def capture(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self._seen = {}
        self.runner.infer(batch)
        out = {f"{name}:{call}": calls[call].float().cpu().numpy()
               for name, calls in self._seen.items()
               for call in self.wanted[name] if call < len(calls)}
        out[INPUT] = batch
        return out


@dataclass
class _Stats:
    """Running figures of one layer over the images seen so far."""

    max_diff: float = 0.0
    max_ref: float = 0.0
    signal: float = 0.0
    noise: float = 0.0
    nonfinite: int = 0
    cosines: list[float] = field(default_factory=list)

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        ref = reference.reshape(len(reference), -1).astype(np.float64)
        cand = candidate.reshape(len(candidate), -1).astype(np.float64)
        self.nonfinite += int((~np.isfinite(cand)).sum())
        cand = np.nan_to_num(cand, nan=0.0, posinf=1e30, neginf=-1e30)
        diff = ref - cand
        self.max_diff = max(self.max_diff, float(np.abs(diff).max(initial=0.0)))
        self.max_ref = max(self.max_ref, float(np.abs(ref).max(initial=0.0)))
        self.signal += float((ref * ref).sum())
        self.noise += float((diff * diff).sum())
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
        same = np.abs(diff).max(axis=1, initial=0.0) == 0  # two zero tensors agree
        cos = np.where(norms > 0, (ref * cand).sum(axis=1) / np.maximum(norms, 1e-300), 0.0)
        self.cosines += np.where(same, 1.0, cos).tolist()

    @property
    def sqnr_db(self) -> float:
        """Signal to error power in dB; infinite when the tensors are equal."""
        if self.noise == 0:
            return math.inf
        return 10 * math.log10(self.signal / self.noise) if self.signal else -math.inf

    def passes(self, tol: Tolerance) -> bool:
        """The pair's rule on this tensor: the absolute rule against its own scale, the
        per-image cosine floor (worst image, or the 1st percentile where that is the rule)."""
        cos = np.asarray(self.cosines)
        if self.nonfinite:
            return False
        if (tol.atol is not None or tol.rtol is not None) \
                and self.max_diff > (tol.atol or 0.0) + (tol.rtol or 0.0) * self.max_ref:
            return False
        if tol.min_cosine is not None and cos.min() < tol.min_cosine:
            return False
        return not (tol.min_cosine_p1 is not None
                    and np.percentile(cos, 1) < tol.min_cosine_p1)


def _db(value: float | None) -> float | None:
    """dB for JSON: None for an exact match (infinite)."""
    return None if value is None or not math.isfinite(value) else round_sig(value)


@dataclass(frozen=True)
class LayerRow:
    layer: str
    node: str
    op: str
    max_abs_rel: float
    worst_cosine: float
    cosine_p1: float
    sqnr_db: float | None
    passes: bool
    added_db: float | None = None

    @property
    def label(self) -> str:
        """``layer3.0.conv2 [node_Conv_314]``: the PyTorch name, the ONNX node beside it."""
        return self.node if self.layer == self.node else f"{self.layer} [{self.node}]"

    def to_dict(self, budget: bool) -> dict[str, Any]:
        data: dict[str, Any] = {"layer": self.layer, "node": self.node, "op": self.op,
                                "max_abs_rel": round_sig(self.max_abs_rel),
                                "worst_cosine": round_sig(self.worst_cosine),
                                "cosine_p1": round_sig(self.cosine_p1),
                                "sqnr_db": _db(self.sqnr_db), "passes": self.passes}
        if budget:
            data["added_db"] = _db(self.added_db)
        return data


@dataclass(frozen=True)
class LayerReport:
    """One pair, layer by layer: the rule applied, every compared layer in graph order, and
    how many points one side has and the other lacks."""

    reference: str
    candidate: str
    images: int
    tolerance: Tolerance
    layers: tuple[LayerRow, ...]
    skipped: int
    budget: bool  # FP32 vs INT8: each row carries the SQNR its layer added

    @property
    def first_divergence(self) -> LayerRow | None:
        """The first layer in graph order that fails; every layer before it passes."""
        return next((row for row in self.layers if not row.passes), None)

    def worst(self, count: int = SHOWN) -> list[LayerRow]:
        """The layers most worth a look: where the most error enters for an INT8 budget,
        else the largest relative error (FP32 rule) or lowest cosine (cosine rules)."""
        if self.budget:
            def key(row: LayerRow) -> float:
                return -(row.added_db if row.added_db is not None else -math.inf)
        elif self.tolerance.rtol is not None or self.tolerance.atol is not None:
            def key(row: LayerRow) -> float:
                return -row.max_abs_rel
        else:
            def key(row: LayerRow) -> float:
                return row.worst_cosine
        return sorted(self.layers, key=lambda row: (row.passes, key(row)))[:count]

    def to_dict(self) -> dict[str, Any]:
        first = self.first_divergence
        return {"images": self.images, "tolerance": self.tolerance.describe(),
                "skipped_points": self.skipped,
                "first_divergence": None if first is None else first.to_dict(self.budget),
                "layers": [row.to_dict(self.budget) for row in self.layers]}


@dataclass
class _Pair:
    """A reference and a candidate, the keys each gives its common points under, and their
    running statistics."""

    reference: Runner
    candidate: OnnxSide | TorchSide
    points: list[tuple[Point, str, str]]  # (the point, its reference key, candidate key)
    skipped: int
    tolerance: Tolerance
    budget: bool
    stats: dict[str, _Stats] = field(default_factory=dict)

    def add(self, reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
            ) -> None:
        for point, ref_key, cand_key in [*self.points, (None, INPUT, INPUT)]:
            node = point.node if point is not None else INPUT
            ref, cand = reference.get(ref_key), candidate.get(cand_key)
            if ref is None or cand is None or ref.size != cand.size:
                continue
            self.stats.setdefault(node, _Stats()).add(ref, cand)

    def report(self, images: int) -> LayerReport:
        rows = []
        for point, _, _ in self.points:
            stats = self.stats.get(point.node)
            if stats is None:  # the sides' tensors did not have the same size
                self.skipped += 1
                continue
            added = None
            if self.budget:
                inputs = [self.stats[s].sqnr_db for s in point.sources if s in self.stats]
                before = min(inputs, default=math.inf)
                added = before - stats.sqnr_db if math.isfinite(before) else None
            cos = np.asarray(stats.cosines)
            rows.append(LayerRow(point.module or point.node, point.node, point.op,
                                 stats.max_diff / stats.max_ref if stats.max_ref else
                                 (0.0 if stats.max_diff == 0 else math.inf),
                                 float(cos.min()), float(np.percentile(cos, 1)),
                                 stats.sqnr_db, stats.passes(self.tolerance), added))
        return LayerReport(self.reference.name, self.candidate.name, images, self.tolerance,
                           tuple(rows), self.skipped, self.budget)


def compare_layers(reference: Runner, candidates: Sequence[tuple[Runner, str]],
                   inputs: Batches,
                   batch_size: int, overrides: ToleranceOverrides,
                   reference_precision: str = "fp32") -> list[LayerReport | str]:
    """Each candidate (a runner and its precision) against ``reference``, layer by layer.

    The runners are recipes, never entered: each side opens its own session (with the
    extra outputs) or hooks, so a run without layerwise is untouched. Returns a report per
    candidate, or the reason it has none (two PyTorch backends have no graph to take the
    points from)."""
    ref_graph = OnnxSide(reference) if isinstance(reference, OrtRunner) else None
    ref_targets: list[tuple[str, int]] = []  # what the hooks of a PyTorch reference copy
    plans: list[_Pair | str] = []
    for runner, precision in candidates:
        side: OnnxSide | TorchSide
        if isinstance(runner, OrtRunner):
            side = OnnxSide(runner)
            if ref_graph is not None:
                points, skipped = _common(side.graph, ref_graph.graph)
            else:
                assert isinstance(reference, TorchRunner)
                hooked, skipped = _in_torch(side.graph, reference.module)
                ref_targets += [target for _, target in hooked]
                points = [(p, TorchSide.key(t), p.node) for p, t in hooked]
        elif ref_graph is not None and isinstance(runner, TorchRunner):
            hooked, skipped = _in_torch(ref_graph.graph, runner.module)
            side = TorchSide(runner, [target for _, target in hooked])
            points = [(p, p.node, TorchSide.key(t)) for p, t in hooked]
        else:
            plans.append("two PyTorch backends: no ONNX graph to take the points from")
            continue
        if not points:
            plans.append(_nothing_shared(reference, runner))
            continue
        pair_precision = looser(precision, reference_precision)
        plans.append(_Pair(reference, side, points, skipped,
                           overrides.for_precision(pair_precision, "features"),
                           budget={precision, reference_precision} == {"fp32", "int8"}))
    pairs = [p for p in plans if isinstance(p, _Pair)]
    images = 0
    if pairs:
        ref_side = ref_graph if ref_graph is not None else \
            TorchSide(_torch(reference), ref_targets)
        images = _stream(ref_side, pairs, inputs, batch_size)
    return [p if isinstance(p, str) else p.report(images) for p in plans]


def _nothing_shared(reference: Runner, candidate: Runner) -> str:
    """Why a pair has no layer in common."""
    if isinstance(reference, TorchRunner) or isinstance(candidate, TorchRunner):
        model = candidate if isinstance(candidate, OrtRunner) else reference
        return (f"no node of {model.name} is named by a PyTorch module (a model made "
                "elsewhere keeps no layer names), so none matches a PyTorch layer; compare "
                "it layer by layer with another model of the same graph (--reference)")
    return (f"{reference.name} and {candidate.name} share no layer (no node of the same "
            "name and op): they are different graphs")


def _torch(runner: Runner) -> TorchRunner:
    assert isinstance(runner, TorchRunner)
    return runner


def _common(graph: GraphPoints, other: GraphPoints) -> tuple[list[tuple[Point, str, str]], int]:
    """The points two graphs share, as (``graph``'s point, ``other``'s key, ``graph``'s
    key): the same anchor node and op, else (nodes left unnamed) the same tensor and op;
    and how many points one graph has and the other lacks."""
    by_node, by_tensor = other.by_node, {p.tensor: p for p in other.points}
    matched = []
    for point in graph.points:
        theirs = by_node.get(point.node) or by_tensor.get(point.tensor)
        if theirs is not None and theirs.op == point.op:  # named by whichever side knows
            named = point if point.module else dataclasses.replace(point, module=theirs.module)
            matched.append((named, theirs.node, point.node))
    return matched, len(graph.points) + len(other.points) - 2 * len(matched)


def _in_torch(graph: GraphPoints, module: nn.Module,
              ) -> tuple[list[tuple[Point, tuple[str, int]]], int]:
    """The graph's points PyTorch has a module output for, and how many it has none for."""
    hooked = [(p, t) for p in graph.points if (t := torch_target(module, p)) is not None]
    return hooked, len(graph.points) - len(hooked)


def _stream(reference: OnnxSide | TorchSide, pairs: Sequence[_Pair], inputs: Batches,
            batch_size: int) -> int:
    """Each batch once through the reference and every candidate, one batch of
    intermediates in memory; returns the number of images."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(reference)
        for pair in pairs:
            stack.enter_context(pair.candidate)
        for batch in inputs.batches(batch_size):
            ref_values = reference.capture(batch)
            for pair in pairs:
                pair.add(ref_values, pair.candidate.capture(batch))
    return len(inputs.names)
