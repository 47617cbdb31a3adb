"""What a PyTorch model is exported from, as export and pipeline take it: the weights and
architecture, the preprocessing (options, else the checkpoint's model.json, else
ImageNet's) and the labels."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .options import ARCH_NAMES, FilePath, preprocess_options, weights_option

# How each explicitly given preprocessing value was given, for "where it came from" lines.
GIVEN_FLAGS = {"input_size": "--input-size", "resize_size": "--resize-size",
               "interpolation": "--interpolation", "mean": "--mean", "std": "--std"}


def source_preprocessing(weights: str, input_size: int | None, resize_size: int | None,
                         mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> Any:
    """The preprocessing to export ``weights`` with: these options, else the checkpoint's
    model.json, else ImageNet's defaults (a :class:`card.Preprocessing`)."""
    from ..weights.card import card_beside, resolve_preprocess
    from ..weights.published import IMAGENET, RANDOM

    card = None if weights in (IMAGENET, RANDOM) else card_beside(weights)
    given = {"input_size": input_size, "resize_size": resize_size,
             "mean": tuple(mean) if mean else None, "std": tuple(std) if std else None}
    return resolve_preprocess(given, card)


def describe_preprocessing(spec: dict[str, Any], sources: dict[str, str]) -> str:
    """A recorded spec and its sources in one phrase, explicit values named by their flag."""
    from ..data.spec import PreprocessSpec
    from ..weights.card import Preprocessing

    spec_obj = PreprocessSpec.from_dict(spec)
    if not sources:
        return f"{spec_obj.input_size} px crop, resize {spec_obj.resize_size}"
    return Preprocessing(spec_obj, sources).describe(GIVEN_FLAGS)


def warn_if_guessed(preprocessing: Any, weights: str, num_classes: int | None = None) -> None:
    """One warning when a checkpoint that is not an ImageNet classifier gets ImageNet's
    224-pixel defaults because nothing said otherwise: the newcomer's silent chance level.
    ``num_classes`` None: read from the checkpoint, only when the size was defaulted."""
    from ..weights.card import IMAGENET_DEFAULT
    from ..weights.checkpoints import checkpoint_classes
    from ..weights.published import IMAGENET, RANDOM

    if weights in (IMAGENET, RANDOM) or preprocessing.sources["input_size"] != IMAGENET_DEFAULT:
        return
    classes = num_classes if num_classes is not None else checkpoint_classes(Path(weights))
    if classes is not None and classes != 1000:
        click.echo(f"warning: {weights} has {classes} classes, not ImageNet's 1000, but no "
                   f"input size was given or found beside it (model.json); using ImageNet's "
                   f"{preprocessing.spec.input_size} px: pass --input-size (and --resize-size) "
                   "as it was trained, or the model may score at chance", err=True)


def _no_model(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    if value:
        raise click.BadParameter("this command reads a PyTorch checkpoint: pass it with "
                                 "--weights PATH (--model is for the commands that read ONNX "
                                 "models, e.g. quantize)", ctx=ctx, param=param)


def source_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What a PyTorch model is exported from: --weights, --num-classes, the preprocessing
    and --labels (export and pipeline). A --model, which every other command takes, gets
    an error that says what to pass instead."""
    fn = click.option("--model", hidden=True, expose_value=False, callback=_no_model)(fn)
    fn = click.option("--labels", type=FilePath(),
                      default=None, help="Class names: a text file (one per line) or a "
                      "model.json (its \"classes\") [default: a model.json or labels.txt "
                      "beside the checkpoint, or ImageNet's].")(fn)
    fn = preprocess_options(source=True)(fn)
    fn = click.option("--features", is_flag=True,
                      help="Export the pooled embedding before fc (512-d for resnet18/34, "
                           "2048-d for the others), output 'features'; the checkpoint may "
                           "have no fc, or another one.")(fn)
    fn = click.option("--arch", type=click.Choice(ARCH_NAMES), default=None,
                      help="The ResNet [default: read from the checkpoint; resnet18 for "
                           "imagenet and random].")(fn)
    # An fc of 100,000 classes is already 200 MB; a typo of 10**12 would be 2 PB.
    fn = click.option("--num-classes", type=click.IntRange(1, 100_000), default=None,
                      help="Classes of a random model (inferred from fc.weight for "
                           "checkpoints).")(fn)
    return weights_option("imagenet")(fn)
