"""The record every exported model carries: preprocessing, labels, weights,
exporter, output; written into ``metadata_props`` and validated on read.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.choices import INTERPOLATIONS, QUANT_TYPES, TARGETS
from ..core.errors import UserError
from ..data.spec import PreprocessSpec

if TYPE_CHECKING:
    import onnx


METADATA_KEY = "resnet_deploy"

OUTPUT_KINDS = ("logits", "features")


@dataclass(frozen=True)
class ModelMetadata:
    """What travels inside each exported model: enough to preprocess and to trace its origin."""

    preprocess: PreprocessSpec
    labels: list[str] | None
    weights: dict[str, Any]
    exporter: str
    opset: int
    versions: dict[str, str]
    quantization: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # The graph output that is read: {"name": ..., "kind": "logits" | "features"}.
    output: dict[str, Any] | None = None

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["preprocess"] = self.preprocess.to_dict()
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelMetadata:
        """Parse and validate the record; any flaw is a ValueError saying which field."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg} at character {exc.pos})") from None
        _check_schema(data)
        data["preprocess"] = PreprocessSpec.from_dict(data["preprocess"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


# field -> (required, check, what it must be); checked before any value is used.
_FIELDS: dict[str, tuple[bool, Any, str]] = {
    "preprocess": (True, lambda v: isinstance(v, dict), "an object"),
    "labels": (True, lambda v: v is None or (isinstance(v, list) and
                                               all(isinstance(x, str) for x in v)),
               "a list of strings or null"),
    "weights": (True, lambda v: isinstance(v, dict), "an object"),
    "exporter": (True, lambda v: isinstance(v, str), "a string"),
    "opset": (True, lambda v: isinstance(v, int) and not isinstance(v, bool) and 7 <= v <= 99,
              "an integer opset"),
    "versions": (True, lambda v: isinstance(v, dict), "an object"),
    "quantization": (False, lambda v: v is None or isinstance(v, dict), "an object or null"),
    "extra": (False, lambda v: isinstance(v, dict), "an object"),
    "output": (False, lambda v: v is None or (isinstance(v, dict)
                                               and isinstance(v.get("name"), str)
                                               and v.get("kind") in OUTPUT_KINDS),
               'an object with a "name" and a "kind" (logits or features)'),
}

_SPEC_FIELDS: dict[str, tuple[Any, str]] = {
    "input_size": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "resize_size": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "interpolation": (lambda v: v in INTERPOLATIONS, f"one of {', '.join(INTERPOLATIONS)}"),
    "mean": (lambda v: isinstance(v, list) and len(v) == 3 and all(map(_is_number, v)),
             "three numbers"),
    "std": (lambda v: isinstance(v, list) and len(v) == 3 and all(map(_is_number, v)),
            "three numbers"),
    "channel_order": (lambda v: v == "RGB", '"RGB"'),
    "layout": (lambda v: v == "NCHW", '"NCHW"'),
    "dtype": (lambda v: v == "float32", '"float32"'),
}


def _check_schema(data: Any) -> None:
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    for name, (required, ok, what) in _FIELDS.items():
        if name not in data:
            if required:
                raise ValueError(f"the {name!r} field is missing")
        elif not ok(data[name]):
            raise ValueError(f"{name!r} must be {what}")
    for name, (ok, what) in _SPEC_FIELDS.items():
        if name not in data["preprocess"]:
            raise ValueError(f"'preprocess.{name}' is missing")
        if not ok(data["preprocess"][name]):
            raise ValueError(f"'preprocess.{name}' must be {what}")
    layers = data.get("extra", {}).get("layers", {})
    if not isinstance(layers, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                               for k, v in layers.items()):
        raise ValueError("'extra.layers' must be an object of node name -> module name")
    quantization = data.get("quantization") or {}
    for name, choices in (("target", TARGETS), ("activation_type", QUANT_TYPES),
                          ("weight_type", QUANT_TYPES)):
        if name in quantization and quantization[name] not in choices:
            raise ValueError(f"'quantization.{name}' must be one of {', '.join(choices)}")
    if not isinstance(quantization.get("reduce_range", False), bool):
        raise ValueError("'quantization.reduce_range' must be true or false")


def write_metadata(model: onnx.ModelProto, meta: ModelMetadata) -> None:
    """Store ``meta`` under one ``metadata_props`` key, replacing any earlier record."""
    for i in reversed(range(len(model.metadata_props))):
        if model.metadata_props[i].key == METADATA_KEY:
            del model.metadata_props[i]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta.to_json()


def metadata_from_proto(model: onnx.ModelProto,
                        source: str | Path = "the model") -> ModelMetadata | None:
    """The record written at export, or None; a corrupt record is a UserError naming
    ``source``, never a traceback."""
    for entry in model.metadata_props:
        if entry.key == METADATA_KEY:
            try:
                return ModelMetadata.from_json(entry.value)
            except (ValueError, UserError) as exc:
                raise UserError(f"{source}: its {METADATA_KEY} metadata is corrupt ({exc}); "
                                "export the model again with 'resnet-deploy export'") from None
    return None


def load_onnx(path: str | Path, *, external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX file, turning every way it can be bad into a one-line UserError.

    ``external_data`` False leaves tensors stored in side files (``model.onnx.data``)
    unread, so a caller can see which files the model references."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such model file; run 'resnet-deploy export' first")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the model file is empty; export it again")
    try:
        return onnx.load(str(path), load_external_data=external_data)
    except FileNotFoundError as exc:
        raise UserError(f"{path}: its weights are stored in a side file that is not beside it "
                        f"({Path(exc.filename or '?').name}); copy that file next to the "
                        "model") from None
    except Exception as exc:
        raise UserError(f"{path}: not a readable ONNX model ({type(exc).__name__}); "
                        "export it again with 'resnet-deploy export'") from None


def external_files(model: onnx.ModelProto) -> list[str]:
    """The side files a model loaded without its external data keeps tensors in."""
    from onnx.external_data_helper import uses_external_data

    tensors = [*model.graph.initializer,
               *(a.t for node in model.graph.node for a in node.attribute if a.HasField("t"))]
    found: list[str] = []
    for tensor in tensors:
        if uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if location and location not in found:
                found.append(location)
    return found


def read_metadata(path: str | Path) -> ModelMetadata | None:
    """The record written at export, or None for a model this tool did not export."""
    return metadata_from_proto(load_onnx(path), path)


def resolve_spec(meta: ModelMetadata | None, override: PreprocessSpec | None,
                 model_path: str | Path) -> PreprocessSpec:
    """Explicit CLI preprocessing wins; else the model's own; else a clear error."""
    if override is not None:
        return override
    if meta is None:
        raise UserError(f"{model_path}: has no resnet-deploy preprocessing metadata; export "
                        "it with 'resnet-deploy export', or pass `input_size` (and "
                        "`resize_size`/`mean`/`std`) to say how to preprocess")
    return meta.preprocess
