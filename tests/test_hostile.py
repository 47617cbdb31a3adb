"""Every command against hostile input: the issue's eleven categories, case by case.

Each case runs one command through the CLI and asserts what a user relies on: the exact exit
code; no traceback; a failing run ends with exactly one error line (click's own usage errors
keep click's format); the input files are byte-identical afterwards; and nothing new appears
in the output folder, among the inputs or in the case's own $TMPDIR, except the files the
case is meant to write.

Categories: 1 input tensor does not fit, 2 static batch, 3 corrupt metadata, 4 images,
5 colliding outputs, 6 outputs checked late, 7 silently wrong accuracy, 8 tolerances and
options, 9 signals and noise, 10 the help examples, 11 bounded memory, 12 manifests verify
trusts nothing of, 13 repositories that must serve, 14 models made elsewhere, 15 images by
content, 16 a hostile environment, 17 labels beside a checkpoint that do not apply.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import stat
import struct
import sys
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from resnet_deploy.cli import main

from .conftest import CALIBRATION, cli_command

# Categories whose fixes land separately; their cases are expected to fail until then.
PENDING: set[int] = set()  # categories whose fixes have not landed yet
TRACEBACK = "Traceback (most recent call last)"
ERROR_PREFIXES = ("Error:", "FAILED:", "Aborted", "Interrupted", "Terminated")


# ---------------------------------------------------------------- the inputs, built on demand

def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and holds no pixel data at all."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _photo(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _edit(source: Path, target: Path, change: Callable[[onnx.ModelProto], None]) -> Path:
    model = onnx.load(str(source))
    change(model)
    onnx.save(model, str(target))
    return target


def _input_dims(model: onnx.ModelProto) -> Any:
    return model.graph.input[0].type.tensor_type.shape.dim


def _set_metadata(text: str) -> Callable[[onnx.ModelProto], None]:
    def change(model: onnx.ModelProto) -> None:
        for entry in model.metadata_props:
            if entry.key == "resnet_deploy":
                entry.value = text
    return change


def _edit_metadata(change: Callable[[dict], None]) -> Callable[[onnx.ModelProto], None]:
    def apply(model: onnx.ModelProto) -> None:
        entry = next(e for e in model.metadata_props if e.key == "resnet_deploy")
        data = json.loads(entry.value)
        change(data)
        entry.value = json.dumps(data)
    return apply


class World:
    """A case's folders: ``in`` (inputs), ``out`` (the working directory, where outputs go)
    and ``tmp`` ($TMPDIR). ``{name}`` in a case's arguments builds input ``name`` on first
    use, so each case pays only for what it needs."""

    def __init__(self, root: Path, model: Path, shared: Path) -> None:
        self.root, self.shared = root, shared
        self.inputs, self.out, self.tmp = root / "in", root / "out", root / "tmp"
        for folder in (self.inputs, self.out, self.tmp):
            folder.mkdir()
        self.source = model
        self.built: dict[str, str] = {"out": str(self.out), "in": str(self.inputs),
                                      "missing": str(root / "nowhere")}
        self.spied: dict[str, list[int]] = {}

    def __getitem__(self, name: str) -> str:
        if name not in self.built:
            self.built[name] = str(getattr(self, f"make_{name}")())
        return self.built[name]

    def path(self, name: str) -> Path:
        return Path(self[name])

    # models
    def _link(self, source: Path, name: str | bytes) -> Path:
        """A hard link: big inputs are built once per session; the before/after hashes
        still catch any write to them."""
        target = Path(os.fsdecode(os.path.join(os.fsencode(self.inputs), os.fsencode(name))))
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(source, target)
        return target

    def _shared(self, name: str, build: Callable[[Path], Any]) -> Path:
        built = self.shared / name
        if not built.exists():
            build(built)
        return self._link(built, name)

    def make_model(self) -> Path:
        return self._link(self.source, "model.onnx")

    def _variant(self, name: str, change: Callable[[onnx.ModelProto], None]) -> Path:
        return self._shared(f"{name}.onnx", lambda target: _edit(self.source, target, change))

    def make_fp16(self) -> Path:
        from resnet_deploy.convert.fp16 import to_fp16

        return self._shared("half.onnx", lambda target: onnx.save(
            to_fp16(onnx.load(str(self.source))), str(target)))

    def make_nudged(self) -> Path:
        """The model with one bias nudged: FP32, nearly but not exactly the same logits."""
        def change(model: onnx.ModelProto) -> None:
            from onnx import numpy_helper

            init = next(i for i in model.graph.initializer if i.name.endswith("fc.bias"))
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 1e-5,
                                                  init.name))
        return self._variant("nudged", change)

    def make_twin(self) -> Path:
        return self._link(self.source, "twin.onnx")

    def make_bare(self) -> Path:
        def change(model: onnx.ModelProto) -> None:
            keep = [p for p in model.metadata_props if p.key != "resnet_deploy"]
            del model.metadata_props[:]
            model.metadata_props.extend(keep)
        return self._variant("bare", change)

    def make_rank3(self) -> Path:
        return self._variant("rank3", lambda m: _input_dims(m).pop())

    def make_f64(self) -> Path:
        def change(model: onnx.ModelProto) -> None:
            model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
        return self._variant("f64", change)

    def make_gray(self) -> Path:
        def change(model: onnx.ModelProto) -> None:
            _input_dims(model)[1].dim_value = 1
        return self._variant("gray", change)

    def make_small(self) -> Path:
        """The graph declares 32x32 images; its metadata says 64."""
        def change(model: onnx.ModelProto) -> None:
            _input_dims(model)[2].dim_value = 32
            _input_dims(model)[3].dim_value = 32
        return self._variant("small", change)

    def make_two_inputs(self) -> Path:
        def change(model: onnx.ModelProto) -> None:
            model.graph.input.append(onnx.helper.make_tensor_value_info(
                "mask", onnx.TensorProto.FLOAT, ["batch", 1]))
        return self._variant("two_inputs", change)

    def make_out3d(self) -> Path:
        def change(model: onnx.ModelProto) -> None:
            model.graph.output[0].type.tensor_type.shape.dim.add().dim_value = 1
        return self._variant("out3d", change)

    def make_static(self) -> Path:
        """Batch fixed at 1, as ``export --static-batch`` writes it."""
        def change(model: onnx.ModelProto) -> None:
            for value in (*model.graph.input, *model.graph.output):
                value.type.tensor_type.shape.dim[0].dim_value = 1
        return self._variant("static", change)

    def make_meta_truncated(self) -> Path:
        text = next(p.value for p in onnx.load(self["model"]).metadata_props
                    if p.key == "resnet_deploy")
        return self._variant("meta_truncated", _set_metadata(text[:len(text) // 2]))

    def make_meta_types(self) -> Path:
        def change(data: dict) -> None:
            data["preprocess"]["input_size"] = "64"
        return self._variant("meta_types", _edit_metadata(change))

    def make_meta_missing(self) -> Path:
        return self._variant("meta_missing", _edit_metadata(lambda d: d.pop("preprocess")))

    def make_meta_range(self) -> Path:
        def change(data: dict) -> None:
            data["preprocess"]["std"] = [0.0, 0.2, 0.2]
        return self._variant("meta_range", _edit_metadata(change))

    def make_meta_labels(self) -> Path:
        def change(data: dict) -> None:
            data["labels"] = "class0 class1"
        return self._variant("meta_labels", _edit_metadata(change))

    def make_meta_nan(self) -> Path:
        return self._variant("meta_nan", _set_metadata("[1, 2"))

    def make_meta_layers(self) -> Path:
        return self._variant("meta_layers",
                             _edit_metadata(lambda d: d["extra"].update(layers=[1, 2])))

    def make_meta_target(self) -> Path:
        return self._variant("meta_target",
                             _edit_metadata(lambda d: d.update(quantization={"target": 7})))

    def make_dangling_photos(self) -> Path:
        """Photos plus a symlink named like one that points nowhere."""
        folder = self._noise("dangling_photos", 4)
        (folder / "gone.jpg").symlink_to(self.root / "no" / "such.jpg")
        return folder

    def make_manifest(self) -> Path:
        """A manifest recording one artifact, report.md, beside it."""
        from resnet_deploy.core.files import file_sha256
        from resnet_deploy.pipeline.manifest import FORMAT

        (self.inputs / "report.md").write_text("# report\n")
        output = {"path": "report.md", "bytes": 9, "step": "report",
                  "sha256": file_sha256(self.inputs / "report.md")}
        record = {"step": "report", "status": "built", "key": "0" * 64, "inputs": {},
                  "options": {}, "outputs": [output]}
        path = self.inputs / "manifest.json"
        path.write_text(json.dumps({"format": FORMAT, "steps": {"report": record},
                                    "artifacts": [output]}))
        return path

    def make_nested_manifest(self) -> Path:
        path = self.inputs / "nested" / "manifest.json"
        path.parent.mkdir()
        path.write_text("[" * 100_000 + "]" * 100_000)
        return path

    def make_repo_model(self) -> Path:
        """A model inside the repository folder that package is asked to replace."""
        return self._link(self.source, "repo/m/1/model.onnx")

    def make_repo(self) -> Path:
        return self.inputs / "repo"

    def make_bytes_model(self) -> Path:
        return self._link(self.source, b"named/mod\xe8le.onnx")

    def make_ckpt(self) -> Path:
        import torch

        from resnet_deploy.weights.checkpoints import load_model

        def build(target: Path) -> None:
            model, _ = load_model("random", num_classes=10, seed=0)
            torch.save(model.state_dict(), target)
        return self._shared("weights.pth", build)

    def make_corrupt_ckpt(self) -> Path:
        path = self.inputs / "corrupt.pth"
        path.write_bytes(b"PK\x03\x04" + b"\x00" * 64)
        return path

    def make_golden(self) -> Path:
        def build(target: Path) -> None:
            result = CliRunner().invoke(main, ["parity", "--model", str(self.source),
                                               "--random", "4", "--save-outputs", str(target)])
            assert result.exit_code == 0, result.output
        return self._shared("golden.npz", build)

    # labels files
    def make_labels(self) -> Path:
        path = self.inputs / "labels.txt"
        path.write_text("".join(f"class{i}\n" for i in range(10)), encoding="utf-8")
        return path

    def _labels(self, name: str, data: bytes) -> Path:
        path = self.inputs / name
        path.write_bytes(data)
        return path

    def make_dup_labels(self) -> Path:
        return self._labels("dup.txt", b"cat\ncat\n")

    def make_gap_labels(self) -> Path:
        return self._labels("gap.txt", b"cat\n\ndog\n")

    def make_bom_labels(self) -> Path:
        return self._labels("bom.txt", b"\xef\xbb\xbfcat\r\ndog\r\n")

    def make_latin1_labels(self) -> Path:
        path = self.inputs / "labels_latin1.txt"
        path.write_bytes(b"".join(b"caf\xe9 %d\n" % i for i in range(10)))
        return path

    def make_fifo(self) -> Path:
        path = self.inputs / "report.fifo"
        os.mkfifo(path)
        return path

    # image folders
    def make_photos(self) -> Path:
        """Twelve of the shipped photos: enough to calibrate and hold eight out."""
        folder = self.inputs / "photos"
        folder.mkdir()
        for photo in sorted(p for p in CALIBRATION.iterdir() if p.suffix != ".md")[:12]:
            shutil.copy(photo, folder)
        return folder

    def _noise(self, name: str, count: int) -> Path:
        folder = self.inputs / name
        for i in range(count):
            _photo(folder / f"img{i}.png", i)
        return folder

    def make_few(self) -> Path:
        return self._noise("few", 4)

    def make_bomb_photos(self) -> Path:
        folder = self._noise("bomb_photos", 4)
        (folder / "bomb.png").write_bytes(_png_header(60000, 60000))
        return folder

    def make_bigger_photos(self) -> Path:
        """A header of 100 MP: over Pillow's warning threshold, under its error one."""
        folder = self._noise("bigger_photos", 4)
        (folder / "big.png").write_bytes(_png_header(10000, 10000))
        return folder

    def make_broken_photos(self) -> Path:
        folder = self._noise("broken_photos", 4)
        (folder / "empty.jpg").write_bytes(b"")
        whole = (folder / "img0.png").read_bytes()
        (folder / "cut.png").write_bytes(whole[:len(whole) // 3])
        (folder / "text.jpg").write_text("not an image")
        return folder

    def make_junk(self) -> Path:
        folder = self.inputs / "junk" / "class0"
        folder.mkdir(parents=True)
        (folder / "a.jpg").write_bytes(b"junk")
        (folder / "b.png").write_bytes(_png_header(60000, 60000))
        return folder.parent

    def make_bytes_photos(self) -> Path:
        folder = self.path("photos")
        shutil.copy(folder / sorted(os.listdir(folder))[0],
                    os.fsencode(folder) + b"/caf\xe9-\xff.jpg")
        return folder

    def make_bytes_calib(self) -> Path:
        """Photos, one with a name that is not UTF-8, and a bomb with another such name."""
        folder = self.path("bytes_photos")
        (Path(os.fsdecode(os.fsencode(folder) + b"/bo\xefmb.png"))
         .write_bytes(_png_header(60000, 60000)))
        return folder

    def _classes(self, name: str, classes: list[str], per_class: int = 2) -> Path:
        root = self.inputs / name
        for c, cls in enumerate(classes):
            for i in range(per_class):
                _photo(root / cls / f"{i}.png", 10 * c + i)
        return root

    def make_labelled10(self) -> Path:
        return self._classes("labelled10", [f"class{i}" for i in range(10)])

    def make_abc(self) -> Path:
        return self._classes("abc", ["a", "b", "c"])

    def make_three_labels(self) -> Path:
        return self._classes("three_labels", ["class3", "class5", "class7"], per_class=3)

    def make_typo(self) -> Path:
        return self._classes("typo", ["class1", "class2", "klass3"])

    def make_twelve(self) -> Path:
        return self._classes("twelve", [f"c{i:02d}" for i in range(12)], per_class=1)

    def make_ten_named(self) -> Path:
        return self._classes("ten_named", [f"n{i:02d}" for i in range(10)], per_class=1)

    def make_bytes_labelled(self) -> Path:
        root = self.path("three_labels")
        _photo(Path(os.fsdecode(os.fsencode(root) + b"/class5/\xe9t\xe9.png")), 99)
        return root

    def make_eval_abc(self) -> Path:
        """Held-out photos filed under class folders that are not the model's classes."""
        root = self.inputs / "eval_abc"
        photos = sorted(p for p in CALIBRATION.iterdir() if p.suffix != ".md")[12:]
        for i, photo in enumerate(photos):
            (root / "abc"[i % 3]).mkdir(parents=True, exist_ok=True)
            shutil.copy(photo, root / "abc"[i % 3])
        return root

    def make_eval_labels(self) -> Path:
        root = self.inputs / "eval_labels"
        photos = sorted(p for p in CALIBRATION.iterdir() if p.suffix != ".md")[12:]
        for i, photo in enumerate(photos):
            (root / f"class{i % 3}").mkdir(parents=True, exist_ok=True)
            shutil.copy(photo, root / f"class{i % 3}")
        return root

    # a pipeline's output folder, and manifests tampered with
    def make_pipe(self) -> Path:
        """A copy of one small pipeline run (from a checkpoint), its calibration photos
        copied too and the manifest pointed at them, so a case may change them."""
        from resnet_deploy.pipeline.manifest import digest

        def build(target: Path) -> None:
            photos = Path(shutil.copytree(CALIBRATION, target.parent / "pipe_photos"))
            result = CliRunner().invoke(main, [
                "pipeline", "--weights", self["ckpt"], "--input-size", "32", "--exporter",
                "torchscript", "--calibration", str(photos), "--num-samples", "8",
                "--bench-iterations", "2", "--min-top1", "0", "--min-cosine", "0",
                "-o", str(target)])
            assert result.exit_code == 0, result.output
        if not (self.shared / "pipe").exists():
            build(self.shared / "pipe")
        # Copies, not hard links: a case may change what the manifest records.
        pipe = Path(shutil.copytree(self.shared / "pipe", self.inputs / "pipe"))
        photos = Path(shutil.copytree(self.shared / "pipe_photos",
                                      self.inputs / "photos_of_pipe"))
        manifest = pipe / "manifest.json"
        data = json.loads(manifest.read_text())
        for record in data["steps"].values():
            for entry in record["inputs"].values():
                if entry.get("kind") == "folder":
                    entry["path"] = str(photos)
                    assert digest(entry["files"]) == entry["sha256"]
        manifest.write_text(json.dumps(data))
        return pipe

    def _manifest(self, name: str, change: Callable[[dict], None]) -> Path:
        manifest = self.path("pipe") / "manifest.json"
        data = json.loads(manifest.read_text())
        change(data)
        target = self.path("pipe") / f"{name}.json"
        target.write_text(json.dumps(data))
        return target

    def make_no_steps(self) -> Path:
        return self._manifest("no_steps", lambda d: d.update(steps={}))

    def make_twice_steps(self) -> Path:
        path = self.path("pipe") / "twice.json"
        text = (self.path("pipe") / "manifest.json").read_text()
        path.write_text(text[:-1] + ', "steps": {}}')
        return path

    def make_negative_bytes(self) -> Path:
        return self._manifest("negative", lambda d: d["steps"]["export"]["outputs"][0]
                              .update(bytes=-5))

    def make_string_bytes(self) -> Path:
        return self._manifest("string", lambda d: d["steps"]["export"]["outputs"][0]
                              .update(bytes="big"))

    def make_summary_sha(self) -> Path:
        return self._manifest("summary_sha", lambda d: d["artifacts"][0].update(sha256="a" * 64))

    def make_summary_passwd(self) -> Path:
        return self._manifest("summary_passwd", lambda d: d["artifacts"][0].update(
            path="/etc/passwd"))

    def make_unknown_step(self) -> Path:
        return self._manifest("unknown_step", lambda d: d["steps"].update(
            deploy=d["steps"]["report"] | {"step": "deploy"}))

    def make_zero_photo(self) -> Path:
        def change(data: dict) -> None:
            files = data["steps"]["quantize"]["inputs"]["calibration"]["files"]
            files[sorted(files)[0]] = "0" * 64
        return self._manifest("zero_photo", change)

    def make_zero_photo_rehashed(self) -> Path:
        """The same forgery with the folder's own hash made to match its file list."""
        from resnet_deploy.pipeline.manifest import digest

        def change(data: dict) -> None:
            entry = data["steps"]["quantize"]["inputs"]["calibration"]
            entry["files"][sorted(entry["files"])[0]] = "0" * 64
            entry["sha256"] = digest(entry["files"])
        return self._manifest("zero_rehashed", change)

    def make_gone_checkpoint(self) -> Path:
        return self._manifest("gone_checkpoint", lambda d: d["steps"]["export"]["inputs"][
            "weights"].update(path=str(self.root / "renamed" / "weights.pth")))

    def make_gone_photo(self) -> Path:
        manifest = self.path("pipe") / "manifest.json"
        (self.path("photos_of_pipe") / "coffee.jpg").unlink()
        return manifest

    def make_photos_of_pipe(self) -> Path:
        self["pipe"]
        return self.inputs / "photos_of_pipe"

    # models that serve badly, or were made elsewhere
    def make_external(self) -> Path:
        """The model with its weights in a side file, ``external.onnx.data``."""
        target = self.inputs / "external.onnx"
        onnx.save(onnx.load(self["model"]), str(target), save_as_external_data=True,
                  all_tensors_to_one_file=True, location="external.onnx.data")
        return target

    def make_external_alone(self) -> Path:
        """A model whose side file was left behind."""
        folder = self.inputs / "alone"
        folder.mkdir()
        return Path(shutil.copy(self["external"], folder))

    def make_opset30(self) -> Path:
        def change(model: onnx.ModelProto) -> None:
            next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = 30
        return self._variant("opset30", change)

    def make_custom_op(self) -> Path:
        """A graph with an operator of a domain onnxruntime does not have."""
        def change(model: onnx.ModelProto) -> None:
            model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
            relu = next(n for n in model.graph.node if n.op_type == "Relu")
            relu.op_type, relu.domain = "Sparkle", "com.example"
        return self._variant("custom_op", change)

    def make_opset11(self) -> Path:
        """An opset-11 export with no resnet-deploy metadata, as older tools write it."""
        def build(target: Path) -> None:
            import torch

            from resnet_deploy.weights.checkpoints import load_model

            model, _ = load_model("random", num_classes=10, seed=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation
                torch.onnx.export(model, (torch.zeros(1, 3, 64, 64),), str(target), dynamo=False,
                                  opset_version=11, input_names=["input"],
                                  output_names=["logits"],
                                  dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
        return self._shared("opset11.onnx", build)

    def _two_outputs(self, name: str, keep_metadata: bool) -> Path:
        def change(model: onnx.ModelProto) -> None:
            gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
            features = onnx.helper.make_tensor_value_info(gemm.input[0], onnx.TensorProto.FLOAT,
                                                          ["batch", 512])
            logits = list(model.graph.output)
            del model.graph.output[:]
            model.graph.output.extend([features, *logits])
            if not keep_metadata:
                keep = [p for p in model.metadata_props if p.key != "resnet_deploy"]
                del model.metadata_props[:]
                model.metadata_props.extend(keep)
        return self._variant(name, change)

    def make_two_outputs(self) -> Path:
        return self._two_outputs("two_outputs", keep_metadata=True)

    def make_two_outputs_bare(self) -> Path:
        return self._two_outputs("two_outputs_bare", keep_metadata=False)

    # image folders judged by content
    def make_gif_labelled(self) -> Path:
        root = self._classes("gif_labelled", [f"class{i}" for i in range(10)])
        frames = [Image.fromarray(np.full((40, 50, 3), v, np.uint8)) for v in (30, 200)]
        frames[0].save(root / "class0" / "moving.gif", save_all=True,
                       append_images=frames[1:], duration=100, loop=0)
        return root

    def make_mixed_photos(self) -> Path:
        """Photos, one saved with no extension, one as GIF, and notes that are not images."""
        folder = self._noise("mixed_photos", 10)
        shutil.copy(folder / "img0.png", folder / "no_suffix")
        Image.open(folder / "img1.png").convert("P").save(folder / "frame.gif")
        (folder / "LABELS.md").write_text("| photo | class |\n")
        (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        return folder

    def make_undecodable_gif(self) -> Path:
        folder = self._noise("undecodable_gif", 10)
        (folder / "broken.gif").write_bytes(b"GIF89a" + b"\x00" * 10)
        return folder

    # checkpoints whose labels beside them do not apply
    def make_ckpt_wrong_labels(self) -> Path:
        folder = self.inputs / "wrong_labels"
        folder.mkdir()
        (folder / "labels.txt").write_text("cat\ndog\nbird\n")
        return self._link(self["ckpt"], "wrong_labels/weights.pth")

    def make_ckpt_renamed(self) -> Path:
        folder = self.inputs / "renamed_ckpt"
        folder.mkdir()
        (folder / "model.json").write_text(json.dumps({
            "file": "original.pth", "input_size": 32, "classes": [f"k{i}" for i in range(10)]}))
        return self._link(self["ckpt"], "renamed_ckpt/weights.pth")

    def make_gone_cwd(self) -> Path:
        return self.root / "gone"


# ---------------------------------------------------------------- what a case asserts

@dataclass(frozen=True)
class Case:
    id: str
    category: int
    args: str  # split on spaces, then each word formatted with the World's inputs
    exit: int
    creates: tuple[str, ...] = ()  # paths (formatted) that may appear; all must
    says: tuple[str, ...] = ()  # in the error line (stdout for exit 0); formatted
    interrupt: tuple[str, int] | None = None  # (module.attr, signal) sent when it is called
    spy: tuple[str, ...] = ()  # "module.Class.method" whose batch sizes are recorded
    check: Callable[[World, Result], None] | None = None
    cwd: str = "{out}"  # the working folder (formatted); "{gone_cwd}" is deleted first


_HASHES: dict[tuple[int, ...], str] = {}


def _sha256(path: bytes, st: os.stat_result) -> str:
    """The file's sha256, computed once per state: any write changes its ctime."""
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _HASHES:
        with open(path, "rb") as fh:
            _HASHES[key] = hashlib.file_digest(fh, "sha256").hexdigest()
    return _HASHES[key]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every entry below ``folder``: a hash for files, the kind of anything else."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(folder)):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            mode = st.st_mode
            key = os.fsdecode(os.path.relpath(path, os.fsencode(folder)))
            if stat.S_ISREG(mode):
                found[key] = _sha256(path, st)
            else:
                found[key] = "dir" if stat.S_ISDIR(mode) else oct(stat.S_IFMT(mode))
    return found


def _show_warnings(message: Any, category: Any, filename: str, lineno: int,
                   file: Any = None, line: Any = None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def _as_a_user_sees_it() -> Iterator[None]:
    """Logging and Python warnings reach the command's own stderr, as outside pytest."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers.clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                          ResourceWarning):
                warnings.filterwarnings("ignore", category=quiet)
            warnings.showwarning = _show_warnings
            yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


class _Unhandled(BaseException):
    """SIGTERM reached the test's guard: the command installed no handler of its own."""


def _sender(signum: int) -> Callable[..., Any]:
    def send(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal did not interrupt the command")
    return send


def _resolve(dotted: str) -> tuple[Any, str]:
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:-1]:
            owner = getattr(owner, attr)
        return owner, parts[-1]
    raise AssertionError(f"cannot resolve {dotted}")


def _assert_stderr(case: Case, result: Result, world: World) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    where = lines[-1] if case.exit != 0 else result.stdout
    for text in case.says:
        assert text.format_map(world) in where, f"{text!r} not in {where!r}"
    if case.exit == 2 and "Usage:" in result.stderr:  # click's own format
        assert lines[-1].startswith("Error:"), result.stderr
        return
    errors = [line for line in lines if line.startswith(ERROR_PREFIXES)]
    if case.exit == 0:
        assert not errors, result.stderr
    else:
        assert lines and lines[-1].startswith(ERROR_PREFIXES), result.stderr
        assert len(errors) == 1, f"more than one error line:\n{result.stderr}"
    noise = [line for line in lines if "Warning:" in line or line.startswith("  ")]
    assert not noise, f"library warnings leak to stderr:\n{result.stderr}"
    said = [line for line in lines if not set(line) <= set("! ")]
    assert len(said) == len(set(said)), f"a line repeats:\n{result.stderr}"


def _run_case(case: Case, world: World, monkeypatch: pytest.MonkeyPatch) -> Result:
    args = [word.format_map(world) for word in case.args.split()]
    creates = {os.path.relpath(c.format_map(world), world.root) for c in case.creates}
    cwd = Path(case.cwd.format_map(world))
    if cwd == world.path("gone_cwd"):
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        cwd.rmdir()  # the shell stays in a folder that no longer exists
    else:
        monkeypatch.chdir(cwd)
    monkeypatch.setenv("TMPDIR", str(world.tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # tempfile caches $TMPDIR
    for dotted in case.spy:
        owner, name = _resolve(dotted)
        original, seen = getattr(owner, name), world.spied.setdefault(dotted, [])

        def spy(self: Any, batch: Any, *a: Any, _f: Any = original, _s: Any = seen,
                **k: Any) -> Any:
            _s.append(len(batch))
            return _f(self, batch, *a, **k)
        monkeypatch.setattr(owner, name, spy)
    guard = None
    if case.interrupt is not None:
        target, signum = case.interrupt
        monkeypatch.setattr(*_resolve(target), _sender(signum))
        if signum == signal.SIGTERM:
            def unhandled(*_: Any) -> None:
                raise _Unhandled
            guard = signal.signal(signal.SIGTERM, unhandled)
    before = _snapshot(world.root)
    try:
        with _as_a_user_sees_it():
            result = CliRunner().invoke(main, args)
    finally:
        if guard is not None:
            signal.signal(signal.SIGTERM, guard)
    after = _snapshot(world.root)
    output = result.stdout + result.stderr
    assert TRACEBACK not in output, output
    unexpected = result.exception is not None and not isinstance(result.exception, SystemExit)
    assert not unexpected, f"{type(result.exception).__name__}: {result.exception}\n{output}"
    assert result.exit_code == case.exit, output
    _assert_stderr(case, result, world)
    changed = {k for k in before if before[k] != after.get(k)}
    assert not changed, f"inputs changed or vanished: {sorted(changed)}"
    # "FOLDER/**" in creates: that folder with whatever it holds.
    trees = {c[:-3] for c in creates if c.endswith(os.sep + "**")}
    creates -= {f"{t}{os.sep}**" for t in trees}
    new = {k for k in set(after) - set(before)
           if not any(k == t or k.startswith(t + os.sep) for t in trees)}
    new_files = {k for k in new if after[k] != "dir" or not any(
        c == k or c.startswith(k + os.sep) for c in creates | trees)}
    assert new_files == creates, f"new: {sorted(new_files)}, expected: {sorted(creates)}"
    return result


# ---------------------------------------------------------------- per-case checks

def _json(world: World, name: str) -> dict:
    return json.loads((world.out / name).read_text())


def _opset_recorded(world: World, result: Result) -> None:
    model = onnx.load(str(world.out / "e.onnx"))
    written = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    meta = json.loads(next(p.value for p in model.metadata_props if p.key == "resnet_deploy"))
    assert written == meta["opset"] == 17


def _golden_saved(world: World, result: Result) -> None:
    with np.load(world.out / "golden.npz") as data:
        assert data["logits"].shape == (32, 10) and len(data["input_sha256"]) == 32
    assert "nothing compared" in result.stdout


def _reference_only_json(world: World, result: Result) -> None:
    data = _json(world, "r.json")
    assert data["passed"] is None and data["results"] == [] and data["notes"]


def _mapped_by_labels(world: World, result: Result) -> None:
    data = _json(world, "acc.json")
    assert data["models"][0]["label_mapping"] == "labels"


def _mapped_sorted(world: World, result: Result) -> None:
    assert _json(world, "acc.json")["models"][0]["label_mapping"] == "sorted"


def _names_survive(world: World, result: Result) -> None:
    data = _json(world, "q.json")
    assert data["num_calibration"] == 13 and data["skipped"] == 1, data
    assert len(data["calibration_sha256"]) == 64
    _one_skip_warning(world, result)


def _name_as_bytes(world: World, result: Result) -> None:
    assert b"mod\xe8le.onnx" in (world.out / "b.md").read_bytes()
    assert "mod\udce8le.onnx" in _json(world, "b.json")["results"][0]["model"]


def _one_skip_warning(world: World, result: Result) -> None:
    warned = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert len(warned) == 1, result.stderr


def _int8_agreement_only(world: World, result: Result) -> None:
    assert _json(world, "q.json")["accuracy"] is None
    assert "without top-1" in result.stderr


def _batches_within(limit: int) -> Callable[[World, Result], None]:
    def check(world: World, result: Result) -> None:
        for name, sizes in world.spied.items():
            assert sizes and max(sizes) <= limit, f"{name} saw batches {sizes}"
    return check


TERM, INT = signal.SIGTERM, signal.SIGINT
P = "parity --model {model}"
Q = "quantize --model {model} --calibration {photos}"
Q_LAYERS = "quantize --model {meta_layers} --calibration {photos}"

CASES = [
    # 1 the input tensor does not fit the model: exit 2 naming the file, before any work
    Case("parity-rank3", 1, "parity --model {rank3} --random 2", 2, says=("{rank3}",)),
    Case("evaluate-float64", 1, "evaluate --model {f64} --images {labelled10}", 2,
         says=("{f64}",)),
    Case("bench-one-channel", 1, "bench --model {gray} --iterations 1 --warmup 0", 2,
         says=("{gray}",)),
    Case("quantize-size-vs-metadata", 1,
         "quantize --model {small} --calibration {photos} -o {out}/q.onnx", 2,
         says=("{small}",)),
    Case("fp16-two-inputs", 1, "convert-fp16 {two_inputs} -o {out}/f.onnx", 2,
         says=("{two_inputs}", "2 inputs")),
    Case("parity-two-inputs", 1, "parity --model {two_inputs} --random 2 --weights random", 2,
         says=("{two_inputs}",)),
    Case("parity-3d-output", 1, "parity --model {out3d} --random 2 --weights random", 2,
         says=("{out3d}",)),
    Case("evaluate-3d-output", 1, "evaluate --model {out3d} --images {labelled10}", 2,
         says=("{out3d}",)),
    Case("parity-input-size-contradicts", 1,
         "parity --model {model} --random 2 --input-size 32 --weights random", 2,
         says=("{model}",)),
    Case("quantize-float64", 1, "quantize --model {f64} --calibration {photos} -o {out}/q.onnx",
         2, says=("{f64}",)),
    Case("bench-two-inputs", 1, "bench --model {two_inputs} --iterations 1 --warmup 0", 2,
         says=("{two_inputs}",)),

    # 2 static-batch models are fed the batch they declare
    Case("parity-static", 2, "parity --model {static} --random 5 --weights random", 0),
    Case("evaluate-static", 2, "evaluate --model {static} --images {labelled10}", 0),
    Case("quantize-static", 2, "quantize --model {static} --calibration {photos} "
         "-o {out}/q.onnx", 0, creates=("{out}/q.onnx",)),
    Case("fp16-static", 2, "convert-fp16 {static} -o {out}/f.onnx --check-images {few}", 0,
         creates=("{out}/f.onnx",)),
    Case("bench-static", 2, "bench --model {static} --iterations 2 --warmup 0 "
         "--no-placement", 0),

    # 3 corrupt resnet_deploy metadata: exit 2 naming the file
    Case("parity-meta-truncated", 3, "parity --model {meta_truncated} --random 2", 2,
         says=("{meta_truncated}",)),
    Case("evaluate-meta-types", 3, "evaluate --model {meta_types} --images {labelled10}", 2,
         says=("{meta_types}",)),
    Case("quantize-meta-missing", 3,
         "quantize --model {meta_missing} --calibration {photos} -o {out}/q.onnx", 2,
         says=("{meta_missing}",)),
    Case("bench-meta-truncated", 3, "bench --model {meta_truncated} --iterations 1", 2,
         says=("{meta_truncated}",)),
    Case("fp16-meta-range", 3, "convert-fp16 {meta_range} -o {out}/f.onnx", 2,
         says=("{meta_range}",)),
    Case("evaluate-meta-labels", 3, "evaluate --model {meta_labels} --images {labelled10}", 2,
         says=("{meta_labels}",)),
    Case("parity-meta-not-object", 3, "parity --model {meta_nan} --random 2", 2,
         says=("{meta_nan}",)),

    # 4 images: anything Pillow cannot decode is skipped, counted and warned about once
    Case("parity-bomb-skipped", 4, "parity --model {model} --images {bomb_photos} "
         "--weights random", 0, check=_one_skip_warning),
    Case("evaluate-all-unreadable", 4, "evaluate --model {model} --images {junk}", 2,
         says=("{junk}",)),
    Case("fp16-bomb-skipped", 4, "convert-fp16 {model} -o {out}/f.onnx "
         "--check-images {bomb_photos}", 0, creates=("{out}/f.onnx",),
         check=_one_skip_warning),
    Case("parity-bomb-warning-skipped", 4, "parity --model {model} --images {bigger_photos} "
         "--weights random", 0, check=_one_skip_warning),
    Case("parity-broken-skipped", 4, "parity --model {model} --images {broken_photos} "
         "--weights random", 0, check=_one_skip_warning),
    Case("quantize-bytes-names", 4, "quantize --model {model} --calibration {bytes_calib} "
         "--no-check -o {out}/q.onnx --json {out}/q.json", 0,
         creates=("{out}/q.onnx", "{out}/q.json"), check=_names_survive),
    Case("quantize-strict-bomb", 4, "quantize --model {model} --calibration {bomb_photos} "
         "--strict --no-check -o {out}/q.onnx", 2, says=("bomb.png",)),
    Case("evaluate-bytes-names", 4, "evaluate --model {model} --images {bytes_labelled} "
         "--json {out}/acc.json", 0, creates=("{out}/acc.json",)),
    Case("parity-bytes-names-golden", 4, "parity --model {model} --images {bytes_photos} "
         "--save-outputs {out}/golden.npz", 0, creates=("{out}/golden.npz",)),
    Case("parity-bytes-model", 4, "parity --model {bytes_model} --random 2 --weights random "
         "--json {out}/r.json", 0, creates=("{out}/r.json",)),
    Case("bench-bytes-model", 4, "bench --model {bytes_model} --iterations 1 --warmup 0 "
         "--no-placement --json {out}/b.json --markdown {out}/b.md", 0,
         creates=("{out}/b.json", "{out}/b.md"), says=("mod\\xe8le.onnx",),
         check=_name_as_bytes),
    Case("fp16-bytes-model", 4, "convert-fp16 {bytes_model} -o {out}/f.onnx --check-images "
         "{bytes_photos}", 0, creates=("{out}/f.onnx",)),
    Case("export-latin1-labels", 4, "export --weights random --num-classes 10 --input-size 64 "
         "--labels {latin1_labels} -o {out}/e.onnx", 2, says=("{latin1_labels}", "UTF-8")),

    # 5 outputs that collide with inputs or with each other: exit 2, nothing replaced
    Case("parity-json-is-model", 5, "parity --model {model} --random 2 --weights random "
         "--json {model}", 2, says=("{model}",)),
    Case("parity-save-outputs-is-model", 5, "parity --model {model} --random 2 "
         "--save-outputs {model}", 2, says=("{model}",)),
    Case("evaluate-json-is-model", 5, "evaluate --model {model} --images {labelled10} "
         "--json {model}", 2),
    Case("bench-json-is-model", 5, "bench --model {model} --iterations 1 --json {model}", 2),
    Case("fp16-json-is-model", 5, "convert-fp16 {model} -o {out}/f.onnx --json {model}", 2),
    Case("fp16-output-is-input", 5, "convert-fp16 {model} -o {model}", 2),
    Case("quantize-json-is-output", 5, f"{Q} -o {{out}}/q.onnx --json {{out}}/q.onnx", 2),
    Case("quantize-output-is-calibration-image", 5,
         f"{Q} -o {{photos}}/astronaut.jpg --no-check", 2),
    Case("export-output-is-checkpoint", 5, "export --weights {ckpt} --input-size 64 "
         "-o {ckpt}", 2, says=("{ckpt}",)),
    Case("export-output-is-labels", 5, "export --weights random --num-classes 10 "
         "--input-size 64 --labels {labels} -o {labels}", 2),
    Case("bench-json-is-fifo", 5, "bench --model {model} --iterations 1 --json {fifo}", 2),
    Case("bench-json-is-markdown", 5, "bench --model {model} --iterations 1 "
         "--json {out}/b.md --markdown {out}/b.md", 2),
    Case("parity-save-is-json", 5, "parity --model {model} --random 2 "
         "--save-outputs {out}/g.npz --json {out}/g.npz", 2),

    # 6 output paths are checked before any work
    Case("parity-json-missing-folder", 6, "parity --model {model} --random 2 --weights random "
         "--json {missing}/r.json", 2, says=("{missing}",)),
    Case("evaluate-json-missing-folder", 6, "evaluate --model {model} --images {labelled10} "
         "--json {missing}/a.json", 2),
    Case("bench-markdown-missing-folder", 6, "bench --model {model} --iterations 1 "
         "--markdown {missing}/b.md", 2),
    Case("quantize-json-missing-folder", 6, f"{Q} -o {{out}}/q.onnx --json {{missing}}/q.json",
         2),
    Case("fp16-json-missing-folder", 6, "convert-fp16 {model} -o {out}/f.onnx "
         "--json {missing}/f.json", 2),
    Case("export-json-missing-folder", 6, "export --weights random --num-classes 10 "
         "--input-size 64 --simplify none -o {out}/e.onnx --json {missing}/e.json", 2),
    Case("parity-save-missing-folder", 6, "parity --model {model} --random 2 "
         "--save-outputs {missing}/g.npz", 2),

    # 7 folder classes that do not match the model: an error, or mapped by label name
    Case("evaluate-3-of-10-unnamed", 7, "evaluate --model {model} --images {abc}", 2,
         says=("{abc}", "3 class folders", "10 classes")),
    Case("evaluate-3-of-10-by-label", 7, "evaluate --model {model} --images {three_labels} "
         "--json {out}/acc.json", 0, creates=("{out}/acc.json",), check=_mapped_by_labels),
    Case("evaluate-no-labels-3-folders", 7, "evaluate --model {bare} --images {abc} "
         "--input-size 64", 2, says=("no labels",)),
    Case("evaluate-no-labels-10-folders", 7, "evaluate --model {bare} --images {ten_named} "
         "--input-size 64 --json {out}/acc.json", 0, creates=("{out}/acc.json",),
         check=_mapped_sorted),
    Case("evaluate-12-folders", 7, "evaluate --model {model} --images {twelve}", 2,
         says=("12 class folders",)),
    Case("evaluate-label-typo", 7, "evaluate --model {model} --images {typo}", 2,
         says=("klass3",)),
    Case("quantize-target-unmapped", 7, f"{Q} --eval-images {{eval_abc}} --max-top1-drop 1 "
         "-o {out}/q.onnx", 2, says=("{eval_abc}",)),
    Case("quantize-check-unmapped", 7, f"{Q} --eval-images {{eval_abc}} -o {{out}}/q.onnx "
         "--json {out}/q.json", 0, creates=("{out}/q.onnx", "{out}/q.json"),
         check=_int8_agreement_only),
    Case("quantize-target-by-label", 7, f"{Q} --eval-images {{eval_labels}} "
         "--max-top1-drop 100 -o {out}/q.onnx", 0, creates=("{out}/q.onnx",),
         says=("MET",)),

    # 8 tolerances and options that would defeat the check: usage errors (exit 2)
    Case("parity-atol-nan", 8, f"{P} --random 2 --atol nan", 2),
    Case("parity-atol-negative", 8, f"{P} --random 2 --atol -1", 2),
    Case("parity-rtol-inf", 8, f"{P} --random 2 --rtol inf", 2),
    Case("parity-min-cosine-nan", 8, f"{P} --random 2 --min-cosine nan", 2),
    Case("parity-min-cosine-above-1", 8, f"{P} --random 2 --min-cosine 1.5", 2),
    Case("parity-min-top1-percent", 8, f"{P} --random 2 --min-top1 50", 2),
    Case("parity-min-top1-nan", 8, f"{P} --random 2 --min-top1 nan", 2),
    Case("quantize-max-drop-negative", 8, f"{Q} --max-top1-drop -1", 2),
    Case("quantize-max-drop-nan", 8, f"{Q} --max-top1-drop nan", 2),
    Case("evaluate-std-nan", 8, "evaluate --model {model} --images {labelled10} "
         "--input-size 64 --std nan 1 1", 2),
    Case("evaluate-std-zero", 8, "evaluate --model {model} --images {labelled10} "
         "--input-size 64 --std 0.2 0 0.2", 2),
    Case("parity-mean-inf", 8, f"{P} --random 2 --input-size 64 --mean inf 0 0", 2),
    Case("bench-duration-nan", 8, "bench --model {model} --duration nan", 2),
    Case("bench-duration-inf", 8, "bench --model {model} --duration inf", 2),
    Case("export-seed-negative", 8, "export --weights random --seed -1 -o {out}/e.onnx", 2),
    Case("quantize-seed-negative", 8, f"{Q} --seed -1", 2),
    Case("bench-seed-negative", 8, "bench --model {model} --seed -1", 2),
    Case("parity-input-size-huge", 8, "parity --weights random --random 1 "
         "--input-size 100000", 2),
    Case("export-opset-99", 8, "export --weights random --opset 99 -o {out}/e.onnx", 2),
    Case("export-dynamo-opset-13", 8, "export --weights random --opset 13 -o {out}/e.onnx", 2,
         says=("18-23",)),
    Case("export-opset-recorded", 8, "export --weights random --num-classes 10 "
         "--input-size 64 --exporter torchscript --opset 17 --simplify none "
         "--parity-images {few} -o {out}/e.onnx", 0, creates=("{out}/e.onnx",),
         check=_opset_recorded),
    Case("parity-atol-0-fp16-is-exact", 8, "parity --model {model} --model {fp16} --random 4 "
         "--atol 0", 1, says=("max abs diff",)),
    Case("parity-atol-0-rtol-0-fp32", 8, "parity --model {model} --model {nudged} --random 4 "
         "--atol 0 --rtol 0", 1, says=("max abs diff",)),
    Case("parity-atol-0-keeps-fp32-rtol", 8, "parity --model {model} --model {nudged} "
         "--random 4 --atol 0", 0),
    Case("parity-atol-0-identical", 8, "parity --model {model} --model {twin} --random 4 "
         "--atol 0 --rtol 0", 0),

    # 9 signals remove every temp file (130 / 143); noise stays off stderr
    Case("export-sigterm", 9, "export --weights random --num-classes 10 --input-size 64 "
         "--simplify none -o {out}/e.onnx", 143,
         interrupt=("resnet_deploy.convert.export.check_parity", TERM)),
    Case("export-sigint", 9, "export --weights random --num-classes 10 --input-size 64 "
         "--simplify none -o {out}/e.onnx", 130,
         interrupt=("resnet_deploy.convert.export.torch_to_onnx", INT)),
    Case("quantize-sigterm", 9, f"{Q} -o {{out}}/q.onnx", 143,
         interrupt=("resnet_deploy.convert.quantize.publish.calibrate", TERM)),
    Case("quantize-sigint", 9, f"{Q} -o {{out}}/q.onnx", 130,
         interrupt=("resnet_deploy.convert.quantize.publish.calibrate", INT)),
    Case("fp16-sigterm", 9, "convert-fp16 {model} -o {out}/f.onnx --check-images {few}", 143,
         interrupt=("resnet_deploy.convert.fp16.check_fp16", TERM)),
    Case("parity-sigint", 9, f"{P} --random 4 --weights random --json {{out}}/r.json", 130,
         interrupt=("resnet_deploy.runtime.runners.OrtRunner._infer_impl", INT)),
    Case("evaluate-sigint", 9, "evaluate --model {model} --images {labelled10}", 130,
         interrupt=("resnet_deploy.checks.evaluate.load_batch", INT)),
    Case("bench-sigterm", 9, "bench --model {model} --iterations 2 --json {out}/b.json", 143,
         interrupt=("resnet_deploy.checks.bench._interleave", TERM)),
    Case("export-corrupt-checkpoint", 9, "export --weights {corrupt_ckpt} --input-size 64 "
         "-o {out}/e.onnx", 2, says=("{corrupt_ckpt}",)),
    Case("export-checkpoint-no-warnings", 9, "export --weights {ckpt} --input-size 64 "
         "--simplify none --exporter torchscript --parity-images {few} -o {out}/e.onnx", 0,
         creates=("{out}/e.onnx",)),

    # 10 the --help examples work
    Case("parity-save-golden", 10, "parity --model {model} --random 32 --save-outputs "
         "{out}/golden.npz", 0, creates=("{out}/golden.npz",), check=_golden_saved),
    Case("parity-load-golden", 10, "parity --model {model} --random 4 --load-outputs {golden}",
         0, says=("PASS",)),
    Case("parity-reference-only-json", 10, "parity --model {model} --random 4 --save-outputs "
         "{out}/g.npz --json {out}/r.json", 0, creates=("{out}/g.npz", "{out}/r.json"),
         check=_reference_only_json),
    Case("parity-nothing-to-compare", 10, "parity --model {model} --random 4", 2,
         says=("--save-outputs",)),

    # a second campaign's finds: limits a typo would blow, fields a hand edit breaks
    Case("bench-threads-typo", 8, "bench --model {model} --threads 100000", 2,
         says=("--threads",)),
    Case("package-max-batch-beyond-int32", 8, "package --model {model} --max-batch-size "
         "3000000000 -o {out}/repo", 2, says=("--max-batch-size",)),
    Case("package-queue-delay-beyond-uint64", 8, "package --model {model} --queue-delay-us "
         "99999999999999999999 -o {out}/repo", 2, says=("--queue-delay-us",)),
    Case("quantize-layers-not-an-object", 3, f"{Q_LAYERS} -o {{out}}/q.onnx", 2,
         says=("{meta_layers}", "extra.layers")),
    Case("package-target-not-a-target", 3, "package --model {meta_target} -o {out}/repo", 2,
         says=("{meta_target}", "quantization.target")),
    Case("verify-json-is-the-manifest", 5, "verify {manifest} --json {manifest}", 2,
         says=("{manifest}",)),
    Case("quantize-strict-dangling-symlink", 4, "quantize --model {model} --calibration "
         "{dangling_photos} --strict --no-check -o {out}/q.onnx", 2, says=("gone.jpg",)),
    Case("evaluate-strict-exists", 4, "evaluate --model {model} --images {labelled10} "
         "--strict", 0),
    Case("pipeline-static-batch-bench-sizes", 2, "pipeline --weights random --num-classes 10 "
         "--input-size 64 --static-batch --bench-batch-size 1,8 --calibration {photos} "
         "-o {out}/pipe", 2, says=("--bench-batch-size 1",)),

    # a third campaign's finds: outputs that would destroy what a command reads or manages
    Case("package-output-holds-its-model", 5, "package --model {repo_model} -o {repo}", 2,
         says=("{repo_model}",)),
    Case("verify-json-on-a-recorded-artifact", 5, "verify {manifest} --json {in}/report.md", 2,
         says=("report.md",)),
    Case("quantize-new-file-inside-calibration", 5,
         "quantize --model {model} --calibration {photos} -o {photos}/q.onnx", 2,
         says=("inside the input folder",)),
    Case("export-output-ends-in-slash", 8, "export --weights random --num-classes 10 "
         "--input-size 64 -o {out}/newdir/", 2),
    Case("fp16-name-too-long", 6, "convert-fp16 --model {model} -o {out}/" + "z" * 300
         + ".onnx", 2, says=("longer than the file system allows",)),
    Case("verify-deeply-nested-manifest", 3, "verify {nested_manifest}", 2,
         says=("{nested_manifest}",)),
    Case("export-seed-overflow", 8, "export --weights random --num-classes 10 --input-size 64 "
         "--seed 99999999999999999999999 -o {out}/e.onnx", 2),
    Case("parity-random-count-huge", 8, "parity --model {model} --random 1000000000", 2),
    Case("export-num-classes-huge", 8, "export --weights random --num-classes 1000000000000 "
         "-o {out}/e.onnx", 2),
    Case("bench-empty-batch-item", 8, "bench --model {model} --batch-size 1,,2", 2,
         says=("--batch-size",)),

    # a fourth campaign's finds: labels files that would shift or merge classes silently
    Case("export-labels-repeated", 8, "export --weights random --num-classes 2 --input-size 64 "
         "--labels {dup_labels} -o {out}/e.onnx", 2, says=("{dup_labels}", "'cat'")),
    Case("export-labels-blank-line", 8, "export --weights random --num-classes 2 "
         "--input-size 64 --labels {gap_labels} -o {out}/e.onnx", 2, says=("{gap_labels}",)),
    Case("export-labels-count-names-file", 8, "export --weights random --input-size 64 "
         "--labels {bom_labels} -o {out}/e.onnx", 2, says=("{bom_labels}", "--num-classes 2")),
    Case("export-labels-bom-crlf", 8, "export --weights random --num-classes 2 --input-size 64 "
         "--labels {bom_labels} -o {out}/e.onnx", 0, creates=("{out}/e.onnx",),
         check=lambda world, result: _labels_are(world, ["cat", "dog"])),

    # 12 verify trusts nothing it reads: schema errors are exit 2, forgeries exit 1
    Case("verify-no-steps", 12, "verify {no_steps}", 2, says=("{no_steps}", "no step")),
    Case("verify-steps-twice", 12, "verify {twice_steps}", 2, says=("appears twice",)),
    Case("verify-negative-bytes", 12, "verify {negative_bytes}", 2, says=("non-negative",)),
    Case("verify-string-bytes", 12, "verify {string_bytes}", 2, says=("non-negative",)),
    Case("verify-summary-wrong-sha", 12, "verify {summary_sha}", 1,
         says=("artifacts summary",)),
    Case("verify-summary-etc-passwd", 12, "verify {summary_passwd}", 2,
         says=("'/etc/passwd'",)),
    Case("verify-unknown-step", 12, "verify {unknown_step}", 2, says=("'deploy'",)),
    Case("verify-photo-hash-zeroed", 12, "verify {zero_photo}", 1,
         says=("modified record", "calibration")),
    Case("verify-photo-hash-zeroed-and-rehashed", 12, "verify {zero_photo_rehashed}", 1,
         says=("stale", "calibration changed")),
    Case("verify-checkpoint-renamed-away", 12, "verify {gone_checkpoint}", 1,
         says=("missing input:", "weights.pth (export)")),
    Case("verify-photo-deleted", 12, "verify {gone_photo}", 1,
         says=("missing input:", "coffee.jpg (quantize)")),
    Case("verify-holds", 12, "verify {pipe}/manifest.json --json {out}/v.json", 0,
         creates=("{out}/v.json",), check=lambda world, result: _verified(world)),

    # 13 package writes only what Triton plus onnxruntime can load
    Case("package-external-data-inlined", 13, "package --model {external} -o {out}/repo", 0,
         creates=tuple(f"{{out}}/repo/{f}" for f in (
             "README.md", "external/config.pbtxt", "external/labels.txt",
             "external/1/model.onnx", "external_image/**")),
         check=lambda world, result: _serves(world, "external")),
    Case("package-external-data-missing", 13, "package --model {external_alone} "
         "-o {out}/repo", 2, says=("external.onnx.data",)),
    Case("package-opset-30", 13, "package --model {opset30} -o {out}/repo", 2,
         says=("{opset30}", "opset 30")),
    Case("package-unknown-operator", 13, "package --model {custom_op} -o {out}/repo", 2,
         says=("{custom_op}", "Sparkle")),

    # 14 models made elsewhere: converted, chosen on purpose, named as the user's file
    Case("quantize-opset-11", 14, "quantize --model {opset11} --calibration {photos} "
         "--input-size 64 -o {out}/q.onnx", 0, creates=("{out}/q.onnx",)),
    Case("quantize-opset-30-names-the-file", 14, "quantize --model {opset30} "
         "--calibration {photos} -o {out}/q.onnx", 2, says=("{opset30}", "Opset 30"),
         check=lambda world, result: _no_temp_path(world, result)),
    Case("evaluate-two-outputs-bare", 14, "evaluate --model {two_outputs_bare} --images "
         "{labelled10} --input-size 64", 2, says=("2 outputs", "--output-name")),
    Case("parity-two-outputs-bare", 14, "parity --model {two_outputs_bare} --random 2 "
         "--weights random --input-size 64", 2, says=("--output-name",)),
    Case("evaluate-two-outputs-chosen", 14, "evaluate --model {two_outputs_bare} --images "
         "{labelled10} --input-size 64 --output-name logits", 0),
    Case("evaluate-two-outputs-by-metadata", 14, "evaluate --model {two_outputs} --images "
         "{labelled10}", 0),
    Case("quantize-two-outputs-unknown-name", 14, "quantize --model {two_outputs} "
         "--calibration {photos} --output-name scores -o {out}/q.onnx", 2,
         says=("'scores'", "logits")),

    # 15 images are what Pillow can open, whatever their name
    Case("evaluate-counts-an-animated-gif", 15, "evaluate --model {model} --images "
         "{gif_labelled} --strict --json {out}/acc.json", 0, creates=("{out}/acc.json",),
         check=lambda world, result: _evaluated(world, 21)),
    Case("quantize-counts-by-content", 15, "quantize --model {model} --calibration "
         "{mixed_photos} --no-check -o {out}/q.onnx --json {out}/q.json", 0,
         creates=("{out}/q.onnx", "{out}/q.json"),
         check=lambda world, result: _calibrated(world, 12, result)),
    Case("quantize-strict-undecodable-gif", 15, "quantize --model {model} --calibration "
         "{undecodable_gif} --strict --no-check -o {out}/q.onnx", 2, says=("broken.gif",)),
    Case("quantize-undecodable-gif-warns", 15, "quantize --model {model} --calibration "
         "{undecodable_gif} --no-check -o {out}/q.onnx", 0, creates=("{out}/q.onnx",),
         check=_one_skip_warning),

    # 16 a hostile environment: the working folder deleted under the shell
    Case("export-working-folder-gone", 16, "export --weights random --num-classes 10 "
         "--input-size 64 -o e.onnx", 2, cwd="{gone_cwd}", says=("working folder",)),
    Case("parity-working-folder-gone", 16, "parity --model {model} --random 2", 2,
         cwd="{gone_cwd}", says=("working folder",)),

    # 17 labels beside a checkpoint that do not apply: one warning, saying why
    Case("export-labels-beside-wrong-count", 17, "export --weights {ckpt_wrong_labels} "
         "--input-size 64 --exporter torchscript --simplify none --parity-images {few} "
         "-o {out}/e.onnx", 0, creates=("{out}/e.onnx",),
         check=lambda world, result: _warned_once(result, "lists 3 classes", "ignoring")),
    Case("export-card-of-a-renamed-checkpoint", 17, "export --weights {ckpt_renamed} "
         "--exporter torchscript --simplify none --parity-images {few} -o {out}/e.onnx", 0,
         creates=("{out}/e.onnx",),
         check=lambda world, result: _warned_once(result, 'its "file" names original.pth')),

    # 11 memory does not grow with the image count: every backend sees --batch-size
    Case("parity-torch-streams", 11, "parity --model {model} --images {photos} --weights random "
         "--batch-size 2", 0, spy=("resnet_deploy.runtime.runners.TorchRunner.infer",
                                   "resnet_deploy.runtime.runners.OrtRunner.infer"),
         check=_batches_within(2)),
    Case("evaluate-streams", 11, "evaluate --model {model} --images {labelled10} "
         "--batch-size 3", 0, spy=("resnet_deploy.runtime.runners.OrtRunner.infer",),
         check=_batches_within(3)),
]


def _verified(world: World) -> None:
    data = _json(world, "v.json")
    assert data["passed"] and data["checked"] >= 5 and data["inputs"] >= 17, data


def _serves(world: World, name: str) -> None:
    import onnxruntime as ort

    model = world.out / "repo" / name / "1" / "model.onnx"
    assert sorted(p.name for p in model.parent.iterdir()) == ["model.onnx"]
    onnx.checker.check_model(str(model))
    ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])


def _no_temp_path(world: World, result: Result) -> None:
    assert "rd-quant-" not in result.output and str(world.tmp) not in result.output


def _evaluated(world: World, count: int) -> None:
    assert _json(world, "acc.json")["models"][0]["n"] == count


def _calibrated(world: World, count: int, result: Result) -> None:
    data = _json(world, "q.json")
    assert data["num_calibration"] == count and data["skipped"] == 0, data
    assert "skipped" not in result.stderr


def _warned_once(result: Result, *words: str) -> None:
    lines = [line for line in result.stderr.splitlines() if all(w in line for w in words)]
    assert len(lines) == 1 and lines[0].startswith("warning: "), result.stderr


def _labels_are(world: World, expected: list[str]) -> None:
    from resnet_deploy.artifact.metadata import read_metadata

    assert read_metadata(world.out / "e.onnx").labels == expected


def _param(case: Case) -> Any:
    marks = ([pytest.mark.xfail(strict=False, reason=f"lead: category {case.category}")]
             if case.category in PENDING else [])
    return pytest.param(case, id=f"{case.category}-{case.id}", marks=marks)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Big inputs (model variants, checkpoint) built once, then hard-linked into each case."""
    return tmp_path_factory.mktemp("hostile-shared")


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_hostile(case: Case, random_onnx: Path, shared: Path, tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> None:
    world = World(tmp_path, random_onnx, shared)
    result = _run_case(case, world, monkeypatch)
    if case.check is not None:
        case.check(world, result)


def test_campaign_covers_every_category_and_command() -> None:
    commands = {c.args.split()[0] for c in CASES}
    assert commands == {"export", "quantize", "parity", "evaluate", "bench", "convert-fp16",
                        "pipeline", "package", "verify"}
    assert {c.category for c in CASES} == set(range(1, 18))
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


def test_opset_range_matches_the_installed_exporters() -> None:
    from torch.onnx import _constants

    from resnet_deploy.core.choices import OPSETS

    assert OPSETS["dynamo"][1] <= _constants.ONNX_MAX_OPSET
    assert OPSETS["torchscript"][1] <= _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET


def test_atol_zero_is_exact_and_fp32_keeps_its_rtol() -> None:
    from resnet_deploy.core.metrics import TOLERANCES, Tolerance, compare

    reference = np.array([[1.0, 2.0, 3.0]], np.float32)
    cmp = compare(reference, reference + np.float32(1e-6))
    assert Tolerance(atol=0.0).failures(cmp)
    assert not Tolerance(atol=0.0).failures(compare(reference, reference.copy()))
    assert not Tolerance().failures(cmp)  # no absolute rule at all
    fp32 = TOLERANCES["fp32"].override(atol=0.0)
    assert fp32.allowed_abs(cmp) == pytest.approx(1e-4 * 3.0) and not fp32.failures(cmp)
    assert TOLERANCES["fp16"].override(atol=0.0).failures(cmp)


def test_load_image_refuses_bombs_and_odd_names(tmp_path: Path) -> None:
    from resnet_deploy.core.errors import UserError
    from resnet_deploy.data.images import load_image

    for size in (60000, 10000):
        bomb = tmp_path / f"bomb{size}.png"
        bomb.write_bytes(_png_header(size, size))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(UserError, match=f"bomb{size}.png: "):
                load_image(bomb)
    odd = Path(os.fsdecode(os.fsencode(tmp_path) + b"/\xe9\xff.png"))
    _photo(odd, 1)
    assert load_image(odd).size == (50, 40)


# A signal at any moment: a real process (the installed script), signalled after each delay,
# ends with the signal's code, one error line, no traceback, and nothing left behind.
MOMENTS = [("export", INT, 0.3), ("export", TERM, 1.0), ("export", INT, 2.5),
           ("export", TERM, 4.0), ("export", INT, 6.0), ("pipeline", TERM, 2.0),
           ("pipeline", INT, 5.0)]
COMMANDS = {
    "export": "export --weights random --num-classes 10 --input-size 64 -o {out}/e.onnx",
    "pipeline": "pipeline --weights random --num-classes 10 --input-size 32 --exporter "
                "torchscript --calibration " + str(CALIBRATION) + " --num-samples 8 "
                "--bench-iterations 2 --min-top1 0 --min-cosine 0 -o {out}/pipe",
}


@pytest.mark.parametrize("command, signum, delay", MOMENTS,
                         ids=[f"{c}-{signal.Signals(s).name}-{d}s" for c, s, d in MOMENTS])
def test_a_signal_at_any_moment(command: str, signum: int, delay: float,
                                tmp_path: Path) -> None:
    import subprocess
    import time

    out, tmp = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    tmp.mkdir()
    args = COMMANDS[command].format(out=out).split()
    proc = subprocess.Popen([*cli_command(), *args], cwd=out, text=True,
                            env={**os.environ, "TMPDIR": str(tmp)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(delay)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:  # it finished first: then its output is whole
        assert list(out.iterdir()), stderr
        return
    # 128 + signum: our handler ran; -signum: the signal came while the interpreter was still
    # starting, before any of our code (a shell reports both as 128 + signum).
    assert proc.returncode in (128 + signum, -signum), stderr
    assert TRACEBACK not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith(ERROR_PREFIXES)]
    assert len(errors) <= 1, stderr
    # onnxruntime 1.32 keeps a session-id file, $TMPDIR/.ses (a time stamp and a UUID), that
    # every run reuses: its own state, written by a finished run as well, not a temp file.
    left_in_tmp = [p for p in tmp.iterdir() if p.name != ".ses"]
    assert not left_in_tmp, f"left in $TMPDIR: {left_in_tmp}"
    left = [p for p in out.rglob("*") if p.is_file() and p.name.startswith(".")]
    assert not left, f"temp files left: {left}"
