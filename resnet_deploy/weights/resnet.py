"""torchvision's ResNet family as torchvision builds it, with no torchvision installed.

BasicBlock (ResNet-18/34) and Bottleneck (50/101/152, ResNeXt, Wide ResNet), the network
with ``_make_layer``, torchvision's initialisation, and one keyword-only constructor per
member, all driven by :data:`resnet_deploy.weights.arch.ARCHITECTURES`. Parameters are created in
torchvision's order, so the same seed gives the same weights as torchvision.

Attribute names (``conv1``, ``bn1``, ``relu``, ``maxpool``, ``layer1``..``layer4``,
``downsample``, ``avgpool``, ``fc``) are torchvision's on purpose: they are the
``state_dict()`` keys, so torchvision checkpoints load here strictly, and the module paths,
so that forward hooks and ONNX node scopes carry the names people know (``layer3.1.conv2``).

``num_classes=None`` builds the backbone alone (features mode): no ``fc`` module at all, and
``forward`` returns the pooled embedding (the flattened ``avgpool`` output, 512 values for
ResNet-18/34, 2048 for the Bottleneck members), so an exported graph ends at the pooling.
It loads :func:`.arch.without_head` of any checkpoint of the same trunk.

This module imports torch; :mod:`resnet_deploy.model` imports it only when a network is
built, so that commands that never touch PyTorch stay fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol

import torch
from torch import Tensor, nn

from .arch import ARCHITECTURES, STAGE_PLANES, STEM_CHANNELS, Architecture, architecture


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 (keeps the size at stride 1), no bias (a BN follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1,
                     groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias (a BN follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class _Block(nn.Module):
    """What both blocks share: the residual branch plus shortcut, then one ReLU.

    Subclasses register their layers in torchvision's order (it fixes the order of
    ``named_modules()`` and of the random draws at construction) and define the branch.
    ``relu`` is one module applied several times per block, as in torchvision, so a forward
    hook on ``layerN.i.relu`` fires two (BasicBlock) or three (Bottleneck) times per call.
    """

    expansion: ClassVar[int]
    relu: nn.ReLU
    downsample: nn.Module | None

    def _branch(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        """The BatchNorm closing the branch, which ``zero_init_residual`` zeroes."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        out = self._branch(x)
        identity = x if self.downsample is None else self.downsample(x)
        # Not torchvision's in-place ``out += identity`` (same values, same ONNX Add): a
        # forward hook on the last BN keeps the BN's output instead of seeing it overwritten.
        return self.relu(out + identity)


class BasicBlock(_Block):
    """Two 3x3 convs (ResNet-18/34); the first carries the stage's stride."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1,
                 base_width: int = 64) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError(f"BasicBlock only supports groups=1 and base_width=64, got "
                             f"groups={groups}, base_width={base_width}")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def _branch(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2


class Bottleneck(_Block):
    """1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand by 4.

    The stride sits on the 3x3 conv (torchvision's "ResNet V1.5"), not on the first 1x1 as
    in the original paper; the inner width is ``int(planes * base_width / 64) * groups``.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, groups: int = 1,
                 base_width: int = 64) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def _branch(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {
    "basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """7x7/2 stem, 3x3/2 max-pool, four stages of blocks, global average pool, then ``fc``
    (absent when ``num_classes`` is None: see the module docstring)."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int],
                 num_classes: int | None = 1000, zero_init_residual: bool = False,
                 groups: int = 1, width_per_group: int = 64) -> None:
        super().__init__()
        if len(layers) != len(STAGE_PLANES) or any(n < 1 for n in layers):
            raise ValueError(f"layers must be {len(STAGE_PLANES)} positive block counts, "
                             f"got {tuple(layers)}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be positive, or None for features only; "
                             f"got {num_classes}")
        self.inplanes = STEM_CHANNELS
        self.groups = groups
        self.base_width = width_per_group
        self.feature_dim = STAGE_PLANES[-1] * block.expansion
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, STAGE_PLANES[0], layers[0])
        self.layer2 = self._make_layer(block, STAGE_PLANES[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, STAGE_PLANES[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, STAGE_PLANES[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.feature_dim, num_classes) if num_classes is not None else None

        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        # Each block then starts as the identity, which helps training from scratch
        # (https://arxiv.org/abs/1706.02677); off by default, as in torchvision.
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, _Block):
                    nn.init.constant_(m.last_bn.weight, 0)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int,
                    blocks: int, stride: int = 1) -> nn.Sequential:
        # Only the first block of a stage changes resolution or width, so only it gets the
        # stride and a 1x1 projection shortcut (named ``downsample``). It is created before
        # the block, as in torchvision, so that seeded weights come out the same.
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        first = block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)
        self.inplanes = planes * block.expansion
        rest = (block(self.inplanes, planes, groups=self.groups, base_width=self.base_width)
                for _ in range(1, blocks))
        return nn.Sequential(first, *rest)

    def forward_features(self, x: Tensor) -> Tensor:
        """The pooled embedding ``fc`` reads: ``(batch, feature_dim)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        features = self.forward_features(x)
        return features if self.fc is None else self.fc(features)


def build(arch: Architecture | str, *, num_classes: int | None = 1000,
          zero_init_residual: bool = False) -> ResNet:
    """A randomly initialised member (call under a seed for reproducibility); ``arch`` is an
    :class:`~.arch.Architecture` or its name (one-line ValueError if unknown)."""
    spec = architecture(arch) if isinstance(arch, str) else arch
    return ResNet(BLOCKS[spec.block], spec.layers, num_classes=num_classes,
                  zero_init_residual=zero_init_residual, groups=spec.groups,
                  width_per_group=spec.width_per_group)


class Constructor(Protocol):
    """The signature shared by the ten public constructors."""

    __name__: str

    def __call__(self, *, num_classes: int | None = 1000,
                 zero_init_residual: bool = False) -> ResNet: ...


def _constructor(name: str) -> Constructor:
    spec = ARCHITECTURES[name]

    def construct(*, num_classes: int | None = 1000,
                  zero_init_residual: bool = False) -> ResNet:
        return build(spec, num_classes=num_classes, zero_init_residual=zero_init_residual)

    construct.__name__ = construct.__qualname__ = name
    construct.__doc__ = (f"A randomly initialised {name} (call under a seed for "
                         f"reproducibility); num_classes=None for the {spec.feature_dim}-d "
                         "pooled features alone.")
    return construct


resnet18 = _constructor("resnet18")
resnet34 = _constructor("resnet34")
resnet50 = _constructor("resnet50")
resnet101 = _constructor("resnet101")
resnet152 = _constructor("resnet152")
resnext50_32x4d = _constructor("resnext50_32x4d")
resnext101_32x8d = _constructor("resnext101_32x8d")
resnext101_64x4d = _constructor("resnext101_64x4d")
wide_resnet50_2 = _constructor("wide_resnet50_2")
wide_resnet101_2 = _constructor("wide_resnet101_2")
