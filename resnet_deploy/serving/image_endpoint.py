"""``<name>_image``: the endpoint that takes photos, its config and the rules Triton and its
Python backend apply to it at load.

One Python-backend model per packaged model (see :mod:`backends.image_backend` for why one
model, not an ensemble): input ``image`` (TYPE_STRING, dims [1], batched like ``<name>``:
one encoded file per row), output ``<name>``'s chosen output with its dtype and dims
(``logits`` with the labels, or ``features`` without), the same instance group and dynamic
batching, and parameter ``onnx_model`` naming the sibling's model file, whose metadata holds
the preprocessing. ``1/`` holds ``model.py`` and the few modules of this package it imports
(:data:`VENDORED`), so a stock Triton needs only Pillow and onnxruntime added to its Python.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..artifact.metadata import load_onnx
from ..artifact.model_file import ModelFile
from ..core.errors import UserError
from .backends import IMAGE_BACKEND, model_py
from .triton import (CONFIG_FILE, LABELS_FILE, MODEL_FILE, VERSION, common_problems, dims_problems,
                     label_problems, model_config_pb2, triton_io)

if TYPE_CHECKING:
    import onnx

SUFFIX = "_image"
IMAGE_INPUT = "image"
BACKEND = "python"
MODEL_PY = "model.py"

# What the image model imports, relative to the package root (every module it reaches).
VENDORED = ("__init__.py", "core/__init__.py", "core/choices.py", "core/errors.py",
            "data/__init__.py", "data/spec.py", "data/images.py", "artifact/__init__.py",
            "artifact/metadata.py", "serving/__init__.py", "serving/backends/__init__.py",
            "serving/backends/common.py", "serving/backends/ort_backend.py",
            "serving/backends/image_backend.py")
PACKAGE = Path(__file__).resolve().parents[1]


def image_name(name: str) -> str:
    return f"{name}{SUFFIX}"


def is_image_config(config: Any) -> bool:
    return bool(config.backend == BACKEND and "onnx_model" in config.parameters)


def build_image_config(base: Any, file: ModelFile) -> Any:
    """``base``'s image endpoint: its batching, instances and parameters, photos in."""
    schema = model_config_pb2()
    config = schema.ModelConfig(name=image_name(base.name), backend=BACKEND,
                                max_batch_size=base.max_batch_size)
    config.input.add(name=IMAGE_INPUT, data_type=schema.TYPE_STRING, dims=[1])
    chosen = next(o for o in base.output if o.name == file.io.output_name)
    output = config.output.add(name=chosen.name, data_type=chosen.data_type,
                               dims=list(chosen.dims))
    if file.kind == "logits" and chosen.label_filename:
        output.label_filename = chosen.label_filename
    config.instance_group.extend(base.instance_group)
    if base.HasField("dynamic_batching"):
        config.dynamic_batching.CopyFrom(base.dynamic_batching)
    for key, value in base.parameters.items():
        config.parameters[key].CopyFrom(value)
    config.parameters["onnx_model"].string_value = f"{base.name}/{VERSION}/{MODEL_FILE}"
    config.parameters["kind"].string_value = file.kind
    return config


def write_image_model(folder: Path, base: Any, file: ModelFile) -> Any:
    """Write ``<name>_image`` beside ``<name>`` (already written) and return its config."""
    from google.protobuf import text_format

    config = build_image_config(base, file)
    (folder / VERSION).mkdir(parents=True)
    (folder / VERSION / MODEL_PY).write_text(model_py(IMAGE_BACKEND), encoding="utf-8")
    for relative in VENDORED:
        target = folder / VERSION / PACKAGE.name / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((PACKAGE / relative).read_bytes())
    if config.output[0].label_filename:
        labels = folder.parent / base.name / LABELS_FILE
        (folder / LABELS_FILE).write_bytes(labels.read_bytes())
    (folder / CONFIG_FILE).write_text(text_format.MessageToString(config), encoding="utf-8")
    return config


def image_problems(config: Any, model_dir: Path,
                   proto: onnx.ModelProto | None = None) -> list[str]:
    """What Triton and the image model would refuse at load, as one line each: besides the
    core rules, ``1/model.py``; one input ``image``, TYPE_STRING, dims [1]; ``onnx_model``
    naming a model file in the repository that carries its preprocessing; one output that
    is that graph's chosen output, with its dtype and its dims under the batch rule; labels
    for logits only, one per class. ``proto``: that model, when the caller has it loaded."""
    schema = model_config_pb2()
    type_name = schema.DataType.Name
    problems = common_problems(config, model_dir)
    if not (model_dir / VERSION / MODEL_PY).is_file():
        problems.append(f"{VERSION}/{MODEL_PY} is missing")
    if [(i.name, type_name(i.data_type), list(i.dims)) for i in config.input] != \
            [(IMAGE_INPUT, "TYPE_STRING", [1])]:
        problems.append(f"an image endpoint takes one input {IMAGE_INPUT!r}, TYPE_STRING, "
                        "dims [1] (one encoded file per row)")
    relative = config.parameters["onnx_model"].string_value
    path = (model_dir.parent / relative).resolve()
    if not path.is_relative_to(model_dir.parent.resolve()) or not path.is_file():
        return [*problems, f"onnx_model {relative!r} is not a model file in the repository"]
    proto = proto if proto is not None else load_onnx(path)
    try:
        file = ModelFile.from_proto(proto, path)
        file.spec()
    except UserError as exc:
        return [*problems, f"onnx_model {relative!r}: {exc}"]
    if len(config.output) != 1 or config.output[0].name != file.io.output_name:
        return [*problems, f"an image endpoint gives one output, {file.io.output_name!r}, the "
                           f"one {relative} is read at"]
    output = config.output[0]
    graph = {io.name: io for io in triton_io(proto)[1]}
    found = graph[output.name]
    if type_name(output.data_type) != found.data_type:
        problems.append(f"output {output.name!r} is {type_name(output.data_type)} but the "
                        f"graph has {found.data_type}")
    problems += dims_problems("output", output.name, list(output.dims), found.shape,
                              config.max_batch_size > 0, config.max_batch_size)
    if file.kind == "features" and output.label_filename:
        problems.append("an embedding (features) has no classes, so no label_filename")
    return problems + label_problems(config, model_dir, graph)
