"""Layers import one way: model <- components <- pipelines (whose ``main`` is the ``atmask`` entry point).

A lower layer never names a higher one: not in an import, not in an ``importlib`` string, not even in a
docstring. The check reads the source (``ast``), so it also sees imports inside functions.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("model", "components", "pipelines")  # low to high
MODULE_STRING = re.compile(r"\b(model|components|pipelines)\.[A-Za-z_]\w*")


def _modules() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))


def _layer(name: str) -> int | None:
    top = name.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else None


def upward_references(path: Path) -> list[str]:
    """``line: name`` for every import or module-name string in ``path`` that names a higher layer."""
    own = LAYERS.index(path.relative_to(ROOT).parts[0])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # "model.backbone" is a params key, not the package: only higher layers' names count here
            names = [m.group(0) for m in MODULE_STRING.finditer(node.value) if m.group(1) != "model"]
        found += [f"{node.lineno}: {n}" for n in names if (_layer(n) or 0) > own]
    return found


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_names_a_higher_layer(path: Path) -> None:
    assert upward_references(path) == [], f"{path.relative_to(ROOT)} names a higher layer"


def test_the_check_sees_imports_strings_and_docstrings(tmp_path: Path, monkeypatch) -> None:
    fake_root = tmp_path
    (fake_root / "components").mkdir()
    bad = fake_root / "components" / "bad.py"
    bad.write_text(
        '"""Uses pipelines.cli."""\n'
        "import importlib\n"
        "def f():\n"
        "    from pipelines import image\n"
        "    return importlib.import_module('pipelines.runtime')\n"
        "KEY = 'model.backbone'\n"
    )
    monkeypatch.setattr(__import__(__name__), "ROOT", fake_root)
    assert upward_references(bad) == ["1: pipelines.cli", "4: pipelines", "5: pipelines.runtime"]


def test_the_atmask_entry_point_is_the_top_layer() -> None:
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["atmask"] == "pipelines.main:main"


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 60  # past these a module or a function is asking to be split


def test_modules_and_functions_stay_small() -> None:
    too_long = []
    for path in _modules():
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(ROOT).as_posix()
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, "split these:\n" + "\n".join(too_long)
