"""The import rule: command lines on top, library packages below, nothing importing a command line.

train.py, evaluate.py and scripts/*.py parse arguments, call library functions and print; they may
import the library packages (configs, data, engine, models) and nothing of each other. The library
never imports a command line. Checked by parsing every file's imports, so the rule cannot erode.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = ("configs", "data", "engine", "models")
ENTRY_POINTS = {"train", "evaluate"}
SCRIPTS = {p.stem for p in (REPO / "scripts").glob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (``import a.b`` and ``from a.b import c`` give ``a``...)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def library_files() -> list[Path]:
    return sorted(p for package in LIBRARY for p in (REPO / package).rglob("*.py"))


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_library_imports_no_command_line(path: Path) -> None:
    bad = {m for m in imported_modules(path) if m.split(".")[0] in ENTRY_POINTS | {"scripts"} | SCRIPTS}
    assert not bad, f"{path.relative_to(REPO)} imports command lines {sorted(bad)}"


@pytest.mark.parametrize("path", sorted((REPO / "scripts").glob("*.py")) + [REPO / "train.py", REPO / "evaluate.py"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_command_lines_import_only_the_library(path: Path) -> None:
    modules = imported_modules(path)
    others = {m for m in modules if m.split(".")[0] in (ENTRY_POINTS | SCRIPTS | {"scripts"}) - {path.stem}}
    assert not others, f"{path.relative_to(REPO)} imports other command lines {sorted(others)}"
    text = path.read_text()
    assert "sys.path.insert" not in text and "noqa: E402" not in text, "imports must work without sys.path edits"


def test_no_sys_path_edits_anywhere() -> None:
    for path in library_files() + sorted((REPO / "tests").glob("*.py")):
        if path.name == Path(__file__).name:
            continue
        assert "sys.path.insert" not in path.read_text(), path


def test_the_rule_catches_a_violation(tmp_path: Path) -> None:
    """The checker itself: a library file importing train, or a script importing another script, is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom train import main\nfrom scripts.compare import compare\nimport evaluate as e\n")
    found = imported_modules(bad)
    assert {"train", "scripts.compare", "evaluate"} <= found
