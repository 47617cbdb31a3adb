"""The CLI surface: every command documented with an example; the module flow kept one-way."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from resnet_deploy.cli import main

PACKAGE = Path(__file__).resolve().parents[1] / "resnet_deploy"
# The packages in the order data flows: each may import only those before it (and itself).
LAYERS = ["core", "data", "weights", "artifact", "runtime", "convert", "checks", "serving",
          "pipeline", "cli", "__main__"]


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package below ``root``, by dotted name (``core.errors``)."""
    return {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            .removesuffix("__init__"): p for p in root.rglob("*.py")}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``path`` (module ``name``) imports, in every form:
    ``import resnet_deploy.x``, ``from resnet_deploy.x import y``, ``from . import y``,
    ``from ..x import y``, at any depth of the file (lazy imports in functions count)."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    found: set[str] = set()

    def add(dotted: str, names: list[str]) -> None:
        for candidate in [f"{dotted}.{n}".strip(".") for n in names] + [dotted]:
            if candidate in known:
                found.add(candidate)
                return
        found.add(dotted or "<root>")

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "resnet_deploy":
                    add(alias.name.removeprefix("resnet_deploy").strip("."), [])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if (node.module or "").split(".")[0] != "resnet_deploy":
                    continue
                base = node.module.removeprefix("resnet_deploy").strip(".")
            else:
                up = package[:len(package) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            for alias in node.names:
                add(base, [alias.name])
    return found - {name}


def layer(module: str) -> int:
    top = module.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else -1


def upward_imports(root: Path) -> list[str]:
    """``A imports B`` for every import that runs against the flow, or reaches outside it."""
    mods = modules(root)
    known = set(mods)
    wrong = []
    for name, path in sorted(mods.items()):
        for target in sorted(imported(name, path, known)):
            if target in ("", "<root>"):
                continue  # the package root: its version only
            if layer(name) < 0 or layer(target) < 0 or layer(target) > layer(name):
                wrong.append(f"{name} imports {target}")
    return wrong


def test_every_module_is_in_a_layer_and_the_walk_sees_them_all() -> None:
    mods = modules(PACKAGE)
    assert len(mods) == len(list(PACKAGE.rglob("*.py")))  # none missed
    outside = sorted(m for m in mods if m and layer(m) < 0)
    assert not outside, f"modules outside the layers {LAYERS}: {outside}"


def test_imports_flow_one_way() -> None:
    assert upward_imports(PACKAGE) == []


@pytest.mark.parametrize("planted", [
    "from .. import pipeline", "from ..pipeline import steps", "import resnet_deploy.cli",
    "from resnet_deploy.checks.parity import run_parity",
    "def late() -> None:\n    from ..serving import triton\n"])
def test_the_flow_check_sees_an_upward_import_in_any_form(tmp_path: Path, planted: str) -> None:
    copy = Path(shutil.copytree(PACKAGE, tmp_path / "resnet_deploy"))
    low = copy / "core" / "metrics.py"
    low.write_text(low.read_text() + "\n" + planted + "\n")
    assert any(line.startswith("core.metrics imports ") for line in upward_imports(copy))


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_command_has_help_with_an_example(name: str) -> None:
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output and f"resnet-deploy {name}" in result.output


def test_main_help_lists_the_commands() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for name in ("export", "parity"):
        assert name in result.output


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("cli/*.py")), ids=lambda p: p.stem)
def test_cli_modules_stay_thin(path: Path) -> None:
    """The CLI parses, calls the library and renders: no command module grows past 350
    lines (the layering test already keeps every library module from importing it)."""
    assert len(path.read_text().splitlines()) <= 350, f"{path.name} is over 350 lines"


def _message_strings(path: Path) -> list[str]:
    """Every string literal of a module but its docstrings (f-strings' literal parts too)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings]


def test_the_library_names_parameters_and_the_cli_names_flags() -> None:
    """Library messages name parameters (`input_size`); the CLI turns them into its flags.
    A handful of strings may still spell a flag: a command line for the user to type."""
    ours = {opt for command in main.commands.values() for param in command.params
            for opt in getattr(param, "opts", []) if opt.startswith("--")}
    flagged = [(path.relative_to(PACKAGE).as_posix(), text)
               for path in sorted(PACKAGE.rglob("*.py")) if path.parts[-2] != "cli"
               for text in _message_strings(path)
               if set(re.findall(r"--[a-z][a-z0-9-]+", text)) & ours]
    assert len(flagged) <= 10, "\n".join(f"{p}: {t!r}" for p, t in flagged)


def test_a_library_message_reads_as_flags_at_the_cli(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["parity", "--model", str(tmp_path / "none.onnx"),
                                       "--random", "2", "--images", str(tmp_path)])
    assert result.exit_code == 2 and "--images" in result.stderr and "--random" in result.stderr
    from resnet_deploy.checks.parity import compare_backends
    from resnet_deploy.core.errors import UserError

    with pytest.raises(UserError, match="give either `images` or `random_count`"):
        compare_backends([], images=tmp_path, random_count=2)
