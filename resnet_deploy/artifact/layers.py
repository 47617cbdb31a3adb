"""Which PyTorch module each ONNX node came from, read from the graph itself.

Node names such as ``node_Conv_292`` mean nothing to the person who wrote the model; the
module path (``layer3.1.conv2``) does. Three sources, most reliable first, none of them
specific to ResNet:

* a weight initializer named after its parameter (``conv1.weight``, ``fc.weight``): the
  dynamo exporter keeps parameter names, and its BatchNorm folding keeps the conv's;
* the dynamo exporter's ``pkg.torch.onnx.name_scopes`` node metadata (present before
  simplification), whose last module scope is the module that emitted the node;
* the torchscript exporter's scoped node names (``/layer2/layer2.0/downsample/downsample.0/Conv``).

Export records the result in the model's metadata (``extra["layers"]``), so it survives
quantization and FP16 conversion; models exported elsewhere get it derived on the spot.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

    from .metadata import ModelMetadata

METADATA_KEY = "layers"
SCOPES_KEY = "pkg.torch.onnx.name_scopes"
WEIGHT_SUFFIX = ".weight"


def _from_weight(node: onnx.NodeProto, initializers: set[str]) -> str | None:
    for name in node.input[1:]:
        if name in initializers and name.endswith(WEIGHT_SUFFIX):
            return name.removesuffix(WEIGHT_SUFFIX)
    return None


def _from_scopes(node: onnx.NodeProto) -> str | None:
    """The dynamo exporter's scope list ends with the op; the entry before it is the module."""
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            if isinstance(scopes, list) and len(scopes) >= 2 and scopes[-2]:
                return str(scopes[-2])
    return None


def _from_node_name(name: str) -> str | None:
    """``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1`` (torchscript's scope names,
    where a child inside a container is written ``container.index``)."""
    parts = [p for p in name.split("/") if p]
    if not name.startswith("/") or len(parts) < 2:
        return None
    path = ""
    for part in parts[:-1]:
        last = path.rsplit(".", 1)[-1] if path else ""
        if last and part.startswith(last + "."):
            path += part[len(last):]
        else:
            path = f"{path}.{part}" if path else part
    return path or None


def derive(model: onnx.ModelProto) -> dict[str, str]:
    """node name -> module path, for every node the graph lets us name."""
    initializers = {init.name for init in model.graph.initializer}
    names = {}
    for node in model.graph.node:
        module = (_from_weight(node, initializers) or _from_scopes(node)
                  or _from_node_name(node.name))
        if module and node.name:
            names[node.name] = module
    return names


def for_model(model: onnx.ModelProto, meta: ModelMetadata | None) -> dict[str, str]:
    """The recorded mapping where the metadata has one, completed from the graph."""
    recorded = (meta.extra.get(METADATA_KEY) if meta is not None else None) or {}
    present = {node.name for node in model.graph.node}
    return {**derive(model), **{k: v for k, v in recorded.items() if k in present}}


def display(node: str, names: Mapping[str, str]) -> str:
    """``conv1 (node_Conv_292)``, or the node name alone when its module is unknown."""
    module = names.get(node)
    return f"{module} ({node})" if module and module != node else node


def resolve(requested: Iterable[str], nodes: Iterable[str],
            names: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """Node names for a list of node or module names: (resolved nodes, names not found).

    A module that emitted several nodes (a ReLU used twice) resolves to all of them.
    """
    nodes = list(nodes)
    known = set(nodes)
    found: list[str] = []
    missing: list[str] = []
    for name in requested:
        matches = [name] if name in known else [n for n in nodes if names.get(n) == name]
        if matches:
            found.extend(m for m in matches if m not in found)
        else:
            missing.append(name)
    return found, missing


def closest(requested: str, nodes: Sequence[str], names: Mapping[str, str], what: str,
            shown: int = 8) -> str:
    """``it has 21 Conv/Gemm layers; closest first: layer3.1.conv2 (node_Conv_40), ...``:
    a long list says how long it is and starts with the names nearest to the request."""
    import difflib

    labels = {display(n, names): max(difflib.SequenceMatcher(None, requested, key).ratio()
                                     for key in (n, names.get(n, n)))
              for n in nodes}
    ranked = sorted(labels, key=lambda label: -labels[label])
    more = f", and {len(ranked) - shown} more" if len(ranked) > shown else ""
    return f"it has {len(ranked)} {what}; closest first: {', '.join(ranked[:shown])}{more}"
