"""The Slicer extension packages exactly the library files it needs at run time.

``CMakeLists.txt`` lists the library modules one by one; a module that the Slicer module, the
command line or the worker process imports (at module level or inside a function) but that is not
listed would be missing from an installed extension, and the worker would fail in the user's hands.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "HiMatchADLib"
#: Imported by the command line only inside ``try/except ImportError`` (evaluation tools).
OPTIONAL = {"evaluate", "synth"}


def packaged_modules() -> set:
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    block = re.search(r"set\(HIMATCHADLIB_PYTHON_SCRIPTS(.*?)\)", text, re.S)
    assert block, "CMakeLists.txt has no HIMATCHADLIB_PYTHON_SCRIPTS list"
    return {Path(line.strip()).stem for line in block.group(1).split() if line.strip().startswith("HiMatchADLib/")}


def library_imports(path: Path) -> set:
    """Names of HiMatchADLib modules imported anywhere in ``path`` (relative and absolute imports)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y / from . import x
                names |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.module and node.module.split(".")[0] == "HiMatchADLib":
                parts = node.module.split(".")
                names |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("HiMatchADLib.")}
    return {n for n in names if (LIB / f"{n}.py").exists()}


def test_every_module_needed_at_run_time_is_packaged():
    packaged = packaged_modules()
    assert all((LIB / f"{m}.py").exists() for m in packaged), "CMakeLists.txt lists a file that does not exist"
    needed, todo = set(), [REPO / "HiMatchAD.py", LIB / "__init__.py", LIB / "__main__.py", LIB / "worker.py"]
    while todo:
        path = todo.pop()
        for name in library_imports(path) - needed - OPTIONAL:
            needed.add(name)
            todo.append(LIB / f"{name}.py")
    needed |= {"__init__", "__main__"}
    assert needed - packaged == set(), f"imported at run time but not packaged: {sorted(needed - packaged)}"
    # Nothing is packaged that the module, the worker and the command line never use.
    assert packaged - needed == set(), f"packaged but never imported: {sorted(packaged - needed)}"


def test_the_build_follows_the_current_extension_template():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    low, high = re.search(r"cmake_minimum_required\(VERSION ([\d.]+)\.\.\.([\d.]+)", text).groups()
    assert tuple(map(int, low.split("."))) >= (3, 20, 6)  # Slicer 5.10 and later
    assert "file(GLOB" not in text


def test_the_python_package_installs_every_sub_package():
    """``pip install .`` installs only the packages pyproject.toml names: a sub-package left out would
    vanish from an installed copy (the command line skips an evaluate module it cannot import)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    names = set(tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in LIB.rglob("__init__.py")}
    assert found == names
