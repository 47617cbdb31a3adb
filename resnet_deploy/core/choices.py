"""The choices and defaults that both the library and the CLI spell: one definition each.

Kept free of heavy imports (no numpy, onnx or torch) so that the CLI can build its
``click.Choice`` lists and defaults from them without slowing ``resnet-deploy --help``.
"""

from __future__ import annotations

from typing import Literal, get_args

Method = Literal["minmax", "entropy", "percentile"]
QuantType = Literal["uint8", "int8"]
Target = Literal["cpu", "cpu-vnni", "tensorrt"]

METHODS: tuple[Method, ...] = get_args(Method)
QUANT_TYPES: tuple[QuantType, ...] = get_args(QuantType)
TARGETS: tuple[Target, ...] = get_args(Target)

# The preprocessing's resampling filters (Pillow's names) and ImageNet's normalisation.
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Exporter = Literal["dynamo", "torchscript"]
EXPORTERS: tuple[Exporter, ...] = get_args(Exporter)
Simplifier = Literal["onnxsim", "onnxslim", "none"]
SIMPLIFIERS: tuple[Simplifier, ...] = get_args(Simplifier)
DEFAULT_OPSET = 18  # what both exporters write for ResNet-18 without down-conversion

# Triton model repositories: where instances run, and the TensorRT accelerator's precision.
Device = Literal["cpu", "gpu"]
TrtPrecision = Literal["fp16", "int8"]
DEVICES: tuple[Device, ...] = get_args(Device)
TRT_PRECISIONS: tuple[TrtPrecision, ...] = get_args(TrtPrecision)

# The ONNX opsets each PyTorch exporter writes ResNet-18 at, checked on torch 2.13 (its
# torch.onnx._constants: ONNX_MAX_OPSET 23, ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET 20) and
# onnxruntime 1.32, which runs them all. Dynamo implements opset 18 and up; asked for
# less, it writes 18 after its down-conversion fails on the model's ReduceMean.
OPSETS: dict[str, tuple[int, int]] = {"dynamo": (18, 23), "torchscript": (13, 20)}
