"""The house keeps its floors: the import-linter contracts in pyproject.toml hold, no module imports
a private name from another file, and nothing edits `sys.path` to find the package."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "llm_lightning").rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))


def test_the_import_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.fail("lint-imports is not installed: `pip install -e '.[dev]'` installs import-linter")
    done = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llm_lightning"):
            yield node


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_is_imported_across_files(path):
    private = [
        f"{path.name}:{node.lineno} imports {alias.name} from {node.module}"
        for node in _imports(path)
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert not private


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_edits_sys_path(path):
    tree = ast.parse(path.read_text(), str(path))
    edits = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr == "path"
        and isinstance(node.value, ast.Name)
        and node.value.id == "sys"
    ]
    assert not edits, f"{path.name} touches sys.path at lines {edits}: import the installed package"


def test_the_contract_sees_every_package():
    """A package missing from the layers would be outside every floor (and its imports unchecked)."""
    import tomllib

    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    named = {part.strip() for layer in layers["layers"] for part in layer.split("|")}
    found = {
        f"llm_lightning.{p.stem if p.is_file() else p.name}"
        for p in (ROOT / "llm_lightning").iterdir()
        if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").exists()
    }
    assert found - named == set()
