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
