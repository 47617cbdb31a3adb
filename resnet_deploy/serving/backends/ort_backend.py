"""resnet-deploy's Python onnxruntime backend: Triton's ``onnxruntime_onnx`` platform, run
with the onnxruntime package inside the Python stub.

Triton looks for ``<backend-directory>/onnxruntime/libtriton_onnxruntime.so`` and, failing
that, for a Python-based backend at ``onnxruntime/model.py``; the nvidia-pytriton wheel has
no C++ onnxruntime backend, so this one serves the configs ``package`` writes as they are.
It honours what those configs say:

* ``<version>/<default_model_filename or model.onnx>`` is the model;
* the instance group's kind (KIND_CPU: the CPU provider; KIND_GPU: CUDA or a load error)
  and count (Triton starts one stub, so one session, per instance);
* ``max_batch_size`` > 0: one ``execute`` receives every request of a dynamic batch, run as
  one onnxruntime call; 0 (a static batch graph): each request alone;
* ``intra_op_thread_count`` and ``inter_op_thread_count`` parameters;
* names and dtypes of inputs and outputs; a request that does not fit fails alone.

Triton core already refuses wrong dtypes, shapes and batch sizes before a model sees them;
the checks here keep a BLS caller's mistakes one-line errors too.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from .common import BackendError, first_line, open_session, run_together

MODEL_FILE = "model.onnx"


def error_response(message: str, internal: bool = False) -> Any:
    code = pb_utils.TritonError.INTERNAL if internal else pb_utils.TritonError.INVALID_ARG
    return pb_utils.InferenceResponse(output_tensors=[],
                                      error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.name = args["model_name"]
        filename = config.get("default_model_filename") or MODEL_FILE
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"{self.name}: no model file at {path}")
        try:
            self.session = open_session(path, config, args["model_instance_kind"],
                                        int(args["model_instance_device_id"]), self.name)
        except BackendError as exc:
            raise pb_utils.TritonModelException(str(exc)) from None
        self.max_batch_size = int(config.get("max_batch_size", 0))
        self.inputs = [(io["name"], pb_utils.triton_string_to_numpy(io["data_type"]),
                        [int(d) for d in io["dims"]]) for io in config["input"]]
        self.outputs = [(io["name"], pb_utils.triton_string_to_numpy(io["data_type"]))
                        for io in config["output"]]
        graph = {i.name for i in self.session.get_inputs()} | \
            {o.name for o in self.session.get_outputs()}
        missing = [n for n, *_ in self.inputs + self.outputs if n not in graph]
        if missing:
            raise pb_utils.TritonModelException(f"{self.name}: the config names {missing}, "
                                                f"which {filename} does not have")
        self.output_names = [name for name, _ in self.outputs]

    def _feeds(self, request: Any) -> dict[str, np.ndarray] | str:
        """The request's inputs, or why they do not fit."""
        feeds: dict[str, np.ndarray] = {}
        for name, dtype, dims in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                return f"input {name!r} is missing"
            array = tensor.as_numpy()
            want = ([-1] if self.max_batch_size else []) + dims
            if array.dtype != dtype:
                return f"input {name!r} is {array.dtype}, the model takes {np.dtype(dtype)}"
            if array.ndim != len(want) or any(w not in (-1, s) for s, w in
                                              zip(array.shape, want, strict=True)):
                return f"input {name!r} has shape {list(array.shape)}, the model takes {want}"
            if self.max_batch_size and len(array) > self.max_batch_size:
                return f"batch {len(array)} is above max_batch_size {self.max_batch_size}"
            feeds[name] = array
        if len({len(a) for a in feeds.values()}) > 1 and self.max_batch_size:
            return "the inputs disagree on the batch size"
        return feeds

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        good: list[tuple[int, dict[str, np.ndarray]]] = []
        for index, request in enumerate(requests):
            feeds = self._feeds(request)
            if isinstance(feeds, str):
                responses[index] = error_response(f"{self.name}: {feeds}")
            else:
                good.append((index, feeds))
        if not good:
            return responses
        try:
            outputs = self._run([feeds for _, feeds in good])
        except Exception as exc:  # onnxruntime's own errors: this batch fails, the model lives
            for index, _ in good:
                responses[index] = error_response(f"{self.name}: onnxruntime failed: "
                                                  f"{first_line(exc)}", internal=True)
            return responses
        for (index, _), output in zip(good, outputs, strict=True):
            responses[index] = pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, np.ascontiguousarray(rows.astype(dtype, copy=False)))
                for (name, dtype), rows in zip(self.outputs, output, strict=True)])
        return responses

    def _run(self, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
        if len(self.inputs) > 1:  # several inputs (no graph resnet-deploy writes): each alone
            return [self.session.run(self.output_names, f) for f in feeds]
        name = self.inputs[0][0]
        return run_together([f[name] for f in feeds], self.max_batch_size > 0,
                            lambda batch: self.session.run(self.output_names, {name: batch}))

    def finalize(self) -> None:
        self.session = None
