"""resnet-deploy: ResNet-18 from PyTorch to ONNX, INT8, and verified ONNX Runtime backends.

Submodules hold the API (``model``, ``preprocess``, ``export``, ``quantize``, ``parity``,
``evaluate``, ``bench``); this package root stays import-light so the CLI starts instantly.
"""

__version__ = "0.1.0"
