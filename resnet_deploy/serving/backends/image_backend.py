"""The ``<name>_image`` endpoint: encoded image files in, ``<name>``'s output out.

One Python model decodes, preprocesses and runs the ONNX model in its own onnxruntime
session. The prototype measured it against an ensemble (a preprocessing model feeding the
onnxruntime model) on 2 cores, gRPC, 8 clients: 369 against 329 images/s for the CIFAR model,
107 against 103 for the 224 px INT8 one (138 against 127 with 2 instances of 1 thread each),
and less CPU per image in every quiet pairing: the decoded tensor (600 KB at 224 px) makes
no second trip through Triton's shared memory.

The model file is the sibling's (parameter ``onnx_model``, relative to the repository), and
its preprocessing is the one recorded in that file's ``resnet_deploy`` metadata, applied
with the loader every other step uses (``data.images.load_image`` and ``to_tensor``: EXIF
orientation, every colour mode, the bomb limit). An image that does not decode fails its
request with an error naming its index in the request; the others of the batch still run.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, cast

import numpy as np
import triton_python_backend_utils as pb_utils

from ...artifact.metadata import METADATA_KEY, ModelMetadata
from ...core.errors import UserError
from ...data.images import load_image, to_tensor
from .common import BackendError, first_line, open_session, parameter, run_together
from .ort_backend import error_response

IMAGE_INPUT = "image"


class _Named(io.BytesIO):
    """An image's bytes whose str() names it, so that the loader's messages name it too."""

    def __init__(self, data: bytes, label: str) -> None:
        super().__init__(data)
        self.label = label

    def __str__(self) -> str:
        return self.label

    __repr__ = __str__


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.name = args["model_name"]
        relative = parameter(config, "onnx_model")
        if relative is None:
            raise pb_utils.TritonModelException(f"{self.name}: parameter onnx_model is missing")
        path = os.path.join(os.path.dirname(args["model_repository"]), relative)
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"{self.name}: no ONNX model at {path}")
        try:
            self.session = open_session(path, config, args["model_instance_kind"],
                                        int(args["model_instance_device_id"]), self.name)
            record = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
            if record is None:
                raise BackendError(f"{self.name}: {relative} has no {METADATA_KEY} metadata, "
                                   "so its preprocessing is unknown")
            self.spec = ModelMetadata.from_json(record).preprocess
        except (BackendError, ValueError, UserError) as exc:
            raise pb_utils.TritonModelException(str(exc)) from None
        self.batching = int(config.get("max_batch_size", 0)) > 0
        output = config["output"][0]
        self.output = output["name"]
        self.dtype = pb_utils.triton_string_to_numpy(output["data_type"])
        self.graph_input = self.session.get_inputs()[0].name

    def _decode(self, request: Any) -> np.ndarray | str:
        """The request's images as one NCHW float32 batch, or why one does not decode."""
        tensor = pb_utils.get_input_tensor_by_name(request, IMAGE_INPUT)
        if tensor is None:
            return f"input {IMAGE_INPUT!r} is missing"
        blobs = tensor.as_numpy().reshape(-1)
        arrays = []
        for index, blob in enumerate(blobs):
            named = _Named(bytes(blob), f"image {index} (of {len(blobs)} in the request)")
            try:
                # Image.open, all that load_image does with its argument, takes a file object.
                arrays.append(to_tensor(load_image(cast(Any, named)), self.spec))
            except UserError as exc:
                return str(exc)
        return np.stack(arrays)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        decoded: list[tuple[int, np.ndarray]] = []
        for index, request in enumerate(requests):
            batch = self._decode(request)
            if isinstance(batch, str):
                responses[index] = error_response(f"{self.name}: {batch}")
            else:
                decoded.append((index, batch))
        if not decoded:
            return responses
        try:
            outputs = run_together([b for _, b in decoded], self.batching, lambda batch:
                                   self.session.run([self.output], {self.graph_input: batch}))
        except Exception as exc:  # onnxruntime's own errors: this batch fails, the model lives
            for index, _ in decoded:
                responses[index] = error_response(f"{self.name}: onnxruntime failed: "
                                                  f"{first_line(exc)}", internal=True)
            return responses
        for (index, _), (rows,) in zip(decoded, outputs, strict=True):
            responses[index] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(
                self.output, np.ascontiguousarray(rows.astype(self.dtype, copy=False)))])
        return responses

    def finalize(self) -> None:
        self.session = None
