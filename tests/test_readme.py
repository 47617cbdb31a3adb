"""Every ``resnet-deploy`` command in README.md runs as written, in README order, on a CPU.

The commands run in a fresh working folder that holds what ``make demo`` leaves besides the
models (``calibration/`` and ``artifacts/labelled/``); the README's own first commands then
build the models the later ones use. A line that ends in ``# needs: WHAT`` needs something
CI lacks. For the needs in ``SUBSTITUTES`` the project's fixtures stand in (each says for
what, below) and the line runs with that change only; a ``gpu`` line runs where onnxruntime
has CUDA; any other line with a need is skipped, with the marker as the reason.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from resnet_deploy.cli import main

from .conftest import CALIBRATION, ROOT, running_triton

README = ROOT / "README.md"
IMAGENET_CLASSES = ROOT / "resnet_deploy" / "weights" / "imagenet_classes.txt"
MARKER = re.compile(r"#\s*needs:\s*(?P<need>[^#]+?)\s*$")


def readme_commands(text: str) -> list[tuple[int, str, str | None]]:
    """(line number, command, need) of each ``resnet-deploy`` command in a fenced block,
    with backslash-continued lines joined; ``need`` is the ``# needs:`` marker or None."""
    found: list[tuple[int, str, str | None]] = []
    in_block, pending, start = False, "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        if not pending:
            start = number
        line = f"{pending} {line.strip()}" if pending else line.strip()
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        pending = ""
        if line.startswith("resnet-deploy "):
            marker = MARKER.search(line)
            found.append((start, line, marker.group("need") if marker else None))
    return found


def _replace(args: list[str], table: dict[str, str]) -> list[str]:
    changed = [table.get(a, a) for a in args]
    assert changed != args, f"nothing to substitute in {shlex.join(args)}; update SUBSTITUTES"
    return changed


def offline_imagenet(args: list[str], work: Path) -> list[str]:
    """``--weights imagenet`` (a download) -> the seeded random init, with ImageNet's class
    list (which the ImageNet weights bring along) where the command takes ``--labels``."""
    i = args.index("--weights")
    assert args[i + 1] == "imagenet", args
    args = [*args[:i + 1], "random", *args[i + 2:]]
    return args + (["--labels", str(IMAGENET_CLASSES)] if args[1] in ("export", "pipeline")
                   else [])


def project_files(args: list[str], work: Path) -> list[str]:
    """The user's files -> the project's: ``ft.pth`` a 10-class random checkpoint, ``calib/``
    the shipped photos, ``val/`` and ``dev/`` a 10-class ImageFolder built from them."""
    return _replace(args, {"ft.pth": str(work / "ft.pth"), "calib/": "calibration/",
                           "val/": str(work / "val"), "dev/": str(work / "val")})


SUBSTITUTES: dict[str, Callable[[list[str], Path], list[str]]] = {
    "network": offline_imagenet,
    "your files": project_files,
}
# A line that talks to ``resnet-deploy serve``: it runs against a real Triton that the test
# starts on the repository the README's ``package`` line wrote, at that server's address.
SERVED = "a running server"
SERVED_URL = "127.0.0.1:8000"
COMMANDS = readme_commands(README.read_text("utf-8"))


def _has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _param(number: int, command: str, need: str | None) -> object:
    """A GPU line runs (as a ``gpu`` test) where CUDA is; other needs without a substitute
    always skip."""
    marks: list[pytest.MarkDecorator] = []
    if need == "gpu":
        marks = [pytest.mark.gpu, pytest.mark.skipif(not _has_cuda(), reason="needs: gpu")]
    elif need is not None and need not in SUBSTITUTES and need != SERVED:
        marks = [pytest.mark.skip(reason=f"needs: {need}")]
    return pytest.param(command, need, id=f"L{number}-{command.split()[1]}", marks=marks)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder like a clone after ``make demo``, less the models the README rebuilds."""
    import torch

    from resnet_deploy.weights.checkpoints import load_model

    work = tmp_path_factory.mktemp("readme")
    (work / "calibration").symlink_to(CALIBRATION, target_is_directory=True)
    subprocess.run(["bash", str(ROOT / "scripts" / "labelled_photos.sh"),
                    str(work / "artifacts" / "labelled")], check=True, capture_output=True)
    model, _ = load_model("random", num_classes=10, seed=0)
    torch.save(model.state_dict(), work / "ft.pth")
    photos = sorted(p for p in CALIBRATION.iterdir() if p.suffix != ".md")
    for i, photo in enumerate(photos):
        folder = work / "val" / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, folder)
    return work


@pytest.mark.parametrize("command, need", [_param(*c) for c in COMMANDS])
def test_readme_command_runs(command: str, need: str | None, workdir: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    args = shlex.split(command, comments=True)
    if need in SUBSTITUTES:
        args = SUBSTITUTES[need](args, workdir)
    monkeypatch.chdir(workdir)
    if need == SERVED:
        with running_triton(workdir / "model_repository") as server:
            args = [a.replace(SERVED_URL, server.http_url) for a in args]
            result = CliRunner().invoke(main, args[1:])
    else:
        result = CliRunner().invoke(main, args[1:])
    assert result.exit_code == 0, (f"{shlex.join(args)} exited {result.exit_code} "
                                   f"({result.exception!r}):\n{result.output}")


def test_every_command_has_an_example_that_runs() -> None:
    running = {c.split()[1] for _, c, need in COMMANDS
               if need is None or need in SUBSTITUTES or need == SERVED}
    assert {need for _, _, need in COMMANDS} <= {None, "gpu", SERVED, *SUBSTITUTES}, \
        "a new kind of '# needs:' marker: substitute it, or skip it here on purpose"
    assert set(main.commands) <= running, sorted(set(main.commands) - running)


def test_extracts_joined_commands_and_markers() -> None:
    text = ("```\nresnet-deploy bench --model a.onnx \\\n    --provider cuda   # needs: gpu\n"
            "pip install x\nresnet-deploy verify m.json\n```\nresnet-deploy export\n")
    assert readme_commands(text) == [
        (2, "resnet-deploy bench --model a.onnx --provider cuda   # needs: gpu", "gpu"),
        (5, "resnet-deploy verify m.json", None)]


def python_block(text: str, heading: str) -> str:
    """The first ```python block after ``heading``."""
    return text.split(heading, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_the_python_api_block_runs(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python block, as written, on the stand-in ``ft.pth`` (with a 64 px card
    beside nothing: the block passes its own spec)."""
    block = python_block(README.read_text("utf-8"), "## Python API")
    assert "resnet_deploy" in block
    monkeypatch.chdir(workdir)
    exec(compile(block, "README.md", "exec"), {})  # the project's own README
    assert (workdir / "ft.onnx").is_file()


def test_the_photo_request_block_prints_the_top_5(
        random_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The serving section's three-line client, as written but for the address, against a
    real Triton serving a packaged ``resnet18``, with a real photo."""
    from resnet_deploy.serving.repository import package_triton

    block = python_block(README.read_text("utf-8"), "## Serving at scale")
    assert len(block.strip().splitlines()) == 3
    model = Path(shutil.copy(random_onnx, tmp_path / "resnet18.onnx"))
    package_triton([model], tmp_path / "repo")
    shutil.copy(sorted(CALIBRATION.glob("*.jpg"))[0], tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    with running_triton(tmp_path / "repo") as server:
        exec(compile(block.replace("localhost:8000", server.http_url), "README.md", "exec"), {})
    top5 = capsys.readouterr().out
    assert top5.count(":class") == 5, top5  # score:index:label, five times
