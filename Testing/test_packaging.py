"""The Slicer extension packages every file of the library, and pip installs every sub-package.

``CMakeLists.txt`` lists the library's files one by one (the extension template has no globbing);
a file missing from the list would be missing from an installed extension, and the worker process
(which runs the same library and command line as outside Slicer) would fail in the user's hands.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "HiMatchADLib"


def packaged_files() -> list:
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    block = re.search(r"set\(HIMATCHADLIB_PYTHON_SCRIPTS(.*?)\)", text, re.S)
    assert block, "CMakeLists.txt has no HIMATCHADLIB_PYTHON_SCRIPTS list"
    return [line.strip() for line in block.group(1).split() if line.strip().startswith("HiMatchADLib/")]


def test_every_library_file_is_packaged_once():
    listed = packaged_files()
    assert len(listed) == len(set(listed)), "CMakeLists.txt lists a file twice"
    tree = {p.relative_to(REPO).as_posix() for p in LIB.rglob("*.py") if "__pycache__" not in p.parts}
    assert set(listed) - tree == set(), f"listed but not in the tree: {sorted(set(listed) - tree)}"
    assert tree - set(listed) == set(), f"in the tree but not packaged: {sorted(tree - set(listed))}"


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
