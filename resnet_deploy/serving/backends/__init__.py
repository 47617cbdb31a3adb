"""Python-backend models that run inside Triton's Python stub (numpy<2, onnxruntime, Pillow).

``ort_backend``: resnet-deploy's Python onnxruntime backend, for a Triton without the C++
one (the nvidia-pytriton wheel's). ``image_backend``: the ``<name>_image`` endpoint. Triton
loads each from a ``model.py`` that only re-exports its ``TritonPythonModel`` (written by
:func:`model_py`), so the code itself is this package's, typed and tested like the rest.
"""

from __future__ import annotations

ONNXRUNTIME_BACKEND = "resnet_deploy.serving.backends.ort_backend"
IMAGE_BACKEND = "resnet_deploy.serving.backends.image_backend"


def model_py(module: str) -> str:
    """The ``model.py`` Triton's Python backend loads: ``module``'s model, re-exported."""
    return (f'"""Triton Python-backend model: {module}.TritonPythonModel (resnet-deploy)."""\n\n'
            f"from {module} import TritonPythonModel\n\n"
            '__all__ = ["TritonPythonModel"]\n')
