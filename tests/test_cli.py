"""The CLI surface: every command documented with an example; the module flow kept one-way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from click.testing import CliRunner

from resnet_deploy.cli import main

PACKAGE = Path(__file__).resolve().parents[1] / "resnet_deploy"
# Each module may import only modules earlier in this list (data flows one way).
FLOW = ["choices", "errors", "machine", "files", "resnet", "preprocess", "card", "model", "layers",
        "runtime", "metrics", "report", "export", "fp16", "calibration", "quantize", "parity",
        "evaluate", "bench", "package", "manifest", "pipeline", "verify", "cli", "__main__"]


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


def _imports(path: Path, level: int) -> set[str]:
    """The package modules ``path`` imports (``level`` dots reach the package root)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == level:
            found.add((node.module or "").split(".")[0])
    return found - {""}


@pytest.mark.parametrize("module", sorted(p.stem for p in PACKAGE.glob("*.py")
                                          if p.stem != "__init__"))
def test_imports_flow_one_way(module: str) -> None:
    assert module in FLOW, f"add {module} to FLOW in {__file__}"
    allowed = set(FLOW[:FLOW.index(module)])
    upward = _imports(PACKAGE / f"{module}.py", 1) - allowed
    assert not upward, f"{module} imports {upward}, which come later in the flow"


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("cli/*.py")), ids=lambda p: p.stem)
def test_cli_modules_stay_thin(path: Path) -> None:
    """The CLI may import any library module; no library module may import the CLI."""
    assert len(path.read_text().splitlines()) <= 350, f"{path.name} is over 350 lines"
    assert "cli" not in _imports(path, 2)
    for module in PACKAGE.glob("*.py"):
        if module.stem != "__main__":  # the console script's entry point starts the CLI
            assert "cli" not in _imports(module, 1), f"{module.name} imports the CLI"
