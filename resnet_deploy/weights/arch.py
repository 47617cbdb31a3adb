"""Which torchvision ResNet a state_dict is, told from its keys and shapes alone.

The ten members of torchvision's ResNet family differ only in the block (BasicBlock or
Bottleneck), the number of blocks per stage and, for Bottlenecks, the width and groups of
the 3x3 conv. All of that is visible in a state_dict's key names and tensor shapes, so a
checkpoint can be identified, and checked key by key, before any network is built.

This module never imports torch: a value is only ever asked for its ``.shape``, so it works
on tensors, on safetensors' metadata, or on any mapping of objects with a ``.shape`` tuple.
:mod:`.resnet` builds the networks from the same table (:data:`ARCHITECTURES`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

BlockKind = Literal["basic", "bottleneck"]
Shape = tuple[int, ...]

V = TypeVar("V")

#: Output channels of the four stages before the block's expansion (torchvision's ``planes``).
STAGE_PLANES = (64, 128, 256, 512)
STEM_CHANNELS = 64  # conv1 of the stem; also the first stage's input width
HEAD = "fc."
#: BatchNorm fills a missing ``num_batches_tracked`` when it loads a state_dict without
#: version metadata (as torch.load of a plain dict, or a pre-0.4 checkpoint, gives), so its
#: absence never stops a load and is not counted as a difference.
OPTIONAL_SUFFIX = ".num_batches_tracked"
DATA_PARALLEL_PREFIX = "module."
EXAMPLES = 3  # keys named per kind of difference: enough to act on, short enough for a line
BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var")
_BLOCK_KEY = re.compile(r"layer([1-4])\.(\d+)\.")


@dataclass(frozen=True)
class Architecture:
    """One member of torchvision's ResNet family and its published ImageNet weights.

    ``weights_url``, ``top1`` (acc@1 as a fraction) and ``resize_size`` are torchvision's
    ``IMAGENET1K_V1`` entry for the member (its ``*_Weights`` enum), V1 for every member so
    that they were all trained alike. The file name and sha256 prefix are read off the URL,
    as ``torch.hub`` does when it checks a download, so they cannot disagree with it.
    """

    name: str
    block: BlockKind
    layers: tuple[int, int, int, int]
    weights_url: str
    top1: float
    groups: int = 1
    width_per_group: int = 64
    input_size: int = 224  # centre crop of the published evaluation transform
    resize_size: int = 256  # shorter side before the crop

    @property
    def expansion(self) -> int:
        """Output channels of a block per ``planes``: 1 for BasicBlock, 4 for Bottleneck."""
        return 1 if self.block == "basic" else 4

    @property
    def feature_dim(self) -> int:
        """Length of the pooled embedding that ``fc`` reads (512 or 2048)."""
        return STAGE_PLANES[-1] * self.expansion

    @property
    def weights_filename(self) -> str:
        return self.weights_url.rsplit("/", 1)[-1]

    @property
    def sha256_prefix(self) -> str:
        return self.weights_filename.removesuffix(".pth").rsplit("-", 1)[-1]


def _v1(name: str, block: BlockKind, layers: tuple[int, int, int, int], url_hash: str,
        top1: float, **shape: int) -> Architecture:
    url = f"https://download.pytorch.org/models/{name}-{url_hash}.pth"
    return Architecture(name, block, layers, url, top1, **shape)


#: torchvision's ten ResNets, in its own order (smallest first within each kind).
ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    _v1("resnet18", "basic", (2, 2, 2, 2), "f37072fd", 0.69758),
    _v1("resnet34", "basic", (3, 4, 6, 3), "b627a593", 0.73314),
    _v1("resnet50", "bottleneck", (3, 4, 6, 3), "0676ba61", 0.7613),
    _v1("resnet101", "bottleneck", (3, 4, 23, 3), "63fe2227", 0.77374),
    _v1("resnet152", "bottleneck", (3, 8, 36, 3), "394f9c45", 0.78312),
    _v1("resnext50_32x4d", "bottleneck", (3, 4, 6, 3), "7cdf4587", 0.77618,
        groups=32, width_per_group=4),
    _v1("resnext101_32x8d", "bottleneck", (3, 4, 23, 3), "8ba56ff5", 0.79312,
        groups=32, width_per_group=8),
    # torchvision has only one set of weights for this member, trained with its newer
    # recipe and evaluated at resize 232, so its V1 is not comparable with the others' V1.
    _v1("resnext101_64x4d", "bottleneck", (3, 4, 23, 3), "173b62eb", 0.83246,
        groups=64, width_per_group=4, resize_size=232),
    _v1("wide_resnet50_2", "bottleneck", (3, 4, 6, 3), "95faca4d", 0.78468,
        width_per_group=128),
    _v1("wide_resnet101_2", "bottleneck", (3, 4, 23, 3), "32ee1156", 0.78848,
        width_per_group=128),
)}


def architecture(name: str) -> Architecture:
    """The member called ``name``; a one-line ValueError naming the closest one otherwise."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    close = difflib.get_close_matches(name, ARCHITECTURES, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ValueError(f"unknown architecture {name!r}; {hint}choose one of "
                     f"{', '.join(ARCHITECTURES)}")


class UnknownArchitecture(ValueError):
    """A state_dict that is none of the ten members, or not the one asked for.

    ``nearest`` is the closest member (fewest differing keys, then fewest differing values);
    ``compared_to`` is the member that ``differences`` describe: the one asked for with
    ``arch=``, else ``nearest``. The message is one line, meant to be shown as it is
    (prefixed with the checkpoint's path by whoever knows it).
    """

    def __init__(self, message: str, *, nearest: str, compared_to: str,
                 differences: list[str]) -> None:
        super().__init__(message)
        self.nearest = nearest
        self.compared_to = compared_to
        self.differences = differences


def _conv_shapes(arch: Architecture, inplanes: int, planes: int) -> Iterator[tuple[str, Shape]]:
    """The convs of one block, each followed by its BatchNorm's width, as torchvision builds
    them: the stride sits on the 3x3 conv, and a Bottleneck's inner width is
    ``int(planes * width_per_group / 64) * groups``."""
    if arch.block == "basic":
        yield "conv1", (planes, inplanes, 3, 3)
        yield "conv2", (planes, planes, 3, 3)
        return
    width = int(planes * (arch.width_per_group / 64.0)) * arch.groups
    yield "conv1", (width, inplanes, 1, 1)
    yield "conv2", (width, width // arch.groups, 3, 3)
    yield "conv3", (planes * arch.expansion, width, 1, 1)


def _batchnorm(prefix: str, channels: int) -> Iterator[tuple[str, Shape]]:
    for suffix in BN_SUFFIXES:
        yield f"{prefix}.{suffix}", (channels,)
    yield f"{prefix}.num_batches_tracked", ()


def _blocks(arch: Architecture) -> Iterator[tuple[str, int, int, bool]]:
    """``(prefix, inplanes, planes, has_downsample)`` of every block, as ``_make_layer``
    lays them out: only a stage's first block changes stride or width, and it gets a 1x1
    projection shortcut (``downsample``) exactly when it does."""
    inplanes = STEM_CHANNELS
    for stage, (planes, count) in enumerate(zip(STAGE_PLANES, arch.layers, strict=True), 1):
        out = planes * arch.expansion
        for index in range(count):
            first = index == 0
            yield f"layer{stage}.{index}", inplanes, planes, first and (
                stage > 1 or inplanes != out)
            inplanes = out


def expected_shapes(arch: Architecture, num_classes: int | None) -> dict[str, Shape]:
    """Every key of the member's ``state_dict()`` with its shape, in torchvision's order.

    ``num_classes=None`` is the backbone alone (no ``fc.*``), as saved by a features-only
    model or a training script that kept the trunk.
    """
    shapes: dict[str, Shape] = {"conv1.weight": (STEM_CHANNELS, 3, 7, 7)}
    shapes.update(_batchnorm("bn1", STEM_CHANNELS))
    for prefix, inplanes, planes, has_downsample in _blocks(arch):
        for index, (conv, shape) in enumerate(_conv_shapes(arch, inplanes, planes), 1):
            shapes[f"{prefix}.{conv}.weight"] = shape
            shapes.update(_batchnorm(f"{prefix}.bn{index}", shape[0]))
        if has_downsample:
            out = planes * arch.expansion
            shapes[f"{prefix}.downsample.0.weight"] = (out, inplanes, 1, 1)
            shapes.update(_batchnorm(f"{prefix}.downsample.1", out))
    if num_classes is not None:
        shapes["fc.weight"] = (num_classes, arch.feature_dim)
        shapes["fc.bias"] = (num_classes,)
    return shapes


def _shape(value: Any) -> Shape | None:
    """A value's shape as a tuple of ints, or None for something that has none."""
    try:
        return tuple(int(d) for d in value.shape)
    except (AttributeError, TypeError, ValueError):
        return None


def _show(key: str) -> str:
    """A key as it can stand in a one-line message (odd characters escaped)."""
    return key if key.isprintable() else ascii(key)


def _listed(keys: list[str]) -> str:
    more = ", ..." if len(keys) > EXAMPLES else ""
    return ", ".join(_show(k) for k in keys[:EXAMPLES]) + more


def _plural(count: int, noun: str, plural: str = "") -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {plural or noun + 's'}"


def num_classes(state: Mapping[str, Any]) -> int | None:
    """Classes of the head (rows of ``fc.weight``); None for a backbone saved without one."""
    if "fc.weight" not in state:
        return None
    shape = _shape(state["fc.weight"])
    if shape is None or len(shape) != 2:
        raise ValueError(f"fc.weight has shape {shape}; a classifier head's weight is "
                         "(classes, features)")
    return shape[0]


def without_head(state: Mapping[str, V]) -> dict[str, V]:
    """The state_dict less ``fc.*``: what a features-only model loads, whatever the head was
    (another class count, or another in-feature count: a head on a different trunk)."""
    return {k: v for k, v in state.items() if not k.startswith(HEAD)}


@dataclass(frozen=True)
class _Comparison:
    """How a state_dict differs from one member, key by key."""

    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, Shape | None, Shape]]  # key, found, expected
    value_gap: int  # how many values the differing tensors are off by, to break ties

    @property
    def count(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.mismatched)


def _numel(shape: Shape | None) -> int:
    total = 1
    for dim in shape or ():
        total *= dim
    return total


def _compare(found: Mapping[str, Shape | None], expected: Mapping[str, Shape]) -> _Comparison:
    missing = [k for k in expected if k not in found and not k.endswith(OPTIONAL_SUFFIX)]
    unexpected = [k for k in found if k not in expected]
    mismatched = [(k, found[k], shape) for k, shape in expected.items()
                  if k in found and found[k] != shape]
    gap = (sum(_numel(expected[k]) for k in missing) + sum(_numel(found[k]) for k in unexpected)
           + sum(abs(_numel(f) - _numel(e)) for _, f, e in mismatched))
    return _Comparison(missing, unexpected, mismatched, gap)


def _head_classes(found: Mapping[str, Shape | None]) -> int | None:
    """Classes to expect a head for: None when there is no usable ``fc.weight``, so that a
    malformed one shows up as unexpected keys rather than as a guess."""
    shape = found.get("fc.weight")
    return shape[0] if shape is not None and len(shape) == 2 else None


def _stage_blocks(found: Mapping[str, Shape | None]) -> list[set[int]]:
    """The block indices present in each of the four stages."""
    stages: list[set[int]] = [set() for _ in STAGE_PLANES]
    for key in found:
        match = _BLOCK_KEY.match(key)
        if match:
            stages[int(match.group(1)) - 1].add(int(match.group(2)))
    return stages


def _block_lines(found: Mapping[str, Shape | None], arch: Architecture) -> list[str]:
    """Block type (a Bottleneck has conv3) and blocks per stage."""
    lines = []
    conv3 = [k for k in found if _BLOCK_KEY.match(k) and ".conv3." in k]
    if arch.block == "basic" and conv3:
        lines.append(f"has Bottleneck keys ({_listed(conv3)}), {arch.name} is built of "
                     "BasicBlocks")
    elif arch.block == "bottleneck" and not conv3 and any(_BLOCK_KEY.match(k) for k in found):
        lines.append(f"has no conv3 keys (BasicBlocks), {arch.name} is built of Bottlenecks")
    for stage, (indices, count) in enumerate(zip(_stage_blocks(found), arch.layers,
                                                 strict=True), 1):
        if len(indices) != count:
            lines.append(f"layer{stage} has {_plural(len(indices), 'block')}, {arch.name} "
                         f"has {count}")
    return lines


def _groups_lines(arch: Architecture, result: _Comparison) -> list[str]:
    """3x3 convs of the right width but another group count: ``(width, width / groups, 3,
    3)`` gives the groups away."""
    groups: dict[int, list[str]] = {}
    for key, got, want in result.mismatched:
        if key.endswith(".conv2.weight") and got and len(got) == 4 and got[0] == want[0] \
                and got[1] and got[0] % got[1] == 0:
            groups.setdefault(got[0] // got[1], []).append(key)
    return [f"{_plural(len(keys), 'conv2')} with groups={count}, {arch.name} has "
            f"groups={arch.groups} ({_listed(keys)})" for count, keys in groups.items()]


def _shortcut_lines(found: Mapping[str, Shape | None], arch: Architecture) -> list[str]:
    lines = []
    for prefix, _, _, has_downsample in _blocks(arch):
        present = any(k.startswith(f"{prefix}.downsample.") for k in found)
        if has_downsample and not present:
            lines.append(f"{prefix} has no downsample, {arch.name} has one")
        elif present and not has_downsample:
            lines.append(f"{prefix} has a downsample, {arch.name} has none")
    return lines


def _head_lines(found: Mapping[str, Shape | None], arch: Architecture) -> list[str]:
    if "fc.weight" not in found:
        return []
    fc = found["fc.weight"]
    if fc is None or len(fc) != 2:
        return [f"fc.weight has shape {fc}, not (classes, features)"]
    if fc[1] != arch.feature_dim:
        return [f"fc.weight takes {fc[1]} features, {arch.name} gives {arch.feature_dim} "
                "(a head from another network: drop fc.* to use the backbone alone)"]
    return []


def _structure(found: Mapping[str, Shape | None], arch: Architecture,
               result: _Comparison) -> list[str]:
    """What a person would say differs (blocks, groups, shortcuts, head), before the keys."""
    return (_block_lines(found, arch) + _groups_lines(arch, result)
            + _shortcut_lines(found, arch) + _head_lines(found, arch))


def _keys(result: _Comparison) -> list[str]:
    lines = []
    if result.missing:
        lines.append(f"{_plural(len(result.missing), 'missing key')} "
                     f"({_listed(result.missing)})")
    if result.unexpected:
        lines.append(f"{_plural(len(result.unexpected), 'unexpected key')} "
                     f"({_listed(result.unexpected)})")
        if all(k.startswith(DATA_PARALLEL_PREFIX) for k in result.unexpected):
            lines.append("its keys start with 'module.' (saved from DataParallel): strip it")
    if result.mismatched:
        shown = "; ".join(f"{_show(k)} {got} != {want}"
                          for k, got, want in result.mismatched[:EXAMPLES])
        more = "; ..." if len(result.mismatched) > EXAMPLES else ""
        lines.append(f"{_plural(len(result.mismatched), 'shape mismatch', 'shape mismatches')}"
                     f" ({shown}{more})")
    return lines


def infer_architecture(state: Mapping[str, Any], arch: str | None = None) -> Architecture:
    """The member whose ``state_dict()`` this is, exactly: every key and shape must match.

    A state without ``fc.*`` (a backbone saved alone) is recognised from the rest; its
    :func:`num_classes` is None. With ``arch``, the state must be that member. Anything
    else raises :class:`UnknownArchitecture`, whose one-line message names the nearest
    member (or the one asked for) and what differs, e.g. ``nearest is resnet50: layer3 has
    5 blocks, resnet50 has 6; 15 missing keys (layer3.5.conv1.weight, ...)``.
    A missing ``*.num_batches_tracked`` is accepted: BatchNorm fills it in when loading.
    """
    asked = architecture(arch) if arch is not None else None
    found = {key: _shape(value) for key, value in state.items()}
    classes = _head_classes(found)
    results = {a.name: _compare(found, expected_shapes(a, classes))
               for a in ARCHITECTURES.values()}
    nearest = min(results, key=lambda n: (results[n].count, results[n].value_gap))
    target = asked.name if asked is not None else nearest
    if results[target].count == 0:
        return ARCHITECTURES[target]
    compared = ARCHITECTURES[target]
    differences = _structure(found, compared, results[target]) + _keys(results[target])
    if asked is None:
        message = f"fits none of the torchvision ResNets: nearest is {nearest}: "
        tail = ""
    else:
        message = f"not {asked.name}: "
        tail = ("" if nearest == asked.name else
                f"; it is {nearest}" if results[nearest].count == 0 else
                f"; nearest is {nearest}")
    raise UnknownArchitecture(message + "; ".join(differences) + tail, nearest=nearest,
                              compared_to=target, differences=differences)
