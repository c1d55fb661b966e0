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


# ------------------------------------------------------------------- the Extensions Index entry

CATALOG_ENTRY = REPO / "Resources" / "ExtensionsIndex" / "HiMatchAD.json"
#: Properties of Slicer's catalog entry schema (Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json).
SCHEMA_PROPERTIES = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                     "build_subdirectory", "enabled", "tier"}
SCHEMA_REQUIRED = {"$schema", "category", "scm_url"}
#: sha256 of the standard text of each licence a project here may declare (as published by its steward).
LICENCE_TEXTS = {"Apache-2.0": "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"}


def cmake_settings() -> dict:
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    settings = dict(re.findall(r'^set\((EXTENSION_\w+)\s+"([^"]*)"\)', text, re.M))
    settings["project"] = re.search(r"^project\((\w+)", text, re.M).group(1)
    return settings


def catalog_entry() -> dict:
    import json

    return json.loads(CATALOG_ENTRY.read_text(encoding="utf-8"))


def test_the_catalog_entry_follows_the_index_schema():
    entry = catalog_entry()
    assert CATALOG_ENTRY.stem == cmake_settings()["project"]  # the index names the file after the extension
    assert SCHEMA_REQUIRED <= set(entry) <= SCHEMA_PROPERTIES
    assert re.fullmatch(r"https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
                        r"slicer-extension-catalog-entry-schema-v1\.0\.\d\.json#", entry["$schema"])
    assert b"\r" not in CATALOG_ENTRY.read_bytes()  # the index accepts LF line endings only
    assert entry["scm_url"].startswith("https://") and 1 <= entry.get("tier", 1) <= 5


def test_the_catalog_entry_agrees_with_the_cmake_metadata():
    entry, cmake = catalog_entry(), cmake_settings()
    assert entry["build_dependencies"] == cmake["EXTENSION_DEPENDS"].split()
    assert entry["category"] == cmake["EXTENSION_CATEGORY"]
    assert cmake["EXTENSION_HOMEPAGE"].split("#")[0].rstrip("/") == entry["scm_url"].removesuffix(".git")
    # Icon and screenshots: full URLs (the index reads them from CMakeLists.txt as written) of files
    # of this repository at the revision the index builds.
    owner_repo = entry["scm_url"].removesuffix(".git").split("github.com/", 1)[1]
    raw = f"https://raw.githubusercontent.com/{owner_repo}/{entry['scm_revision']}/"
    for url in [cmake["EXTENSION_ICONURL"]] + cmake["EXTENSION_SCREENSHOTURLS"].split():
        assert url.startswith(raw), url
        assert (REPO / url[len(raw):]).is_file(), url


def test_pytorch_is_the_declared_extension_dependency_and_the_one_the_installer_uses():
    from HiMatchADLib.mrml import install

    assert install.PYTORCH_EXTENSION in cmake_settings()["EXTENSION_DEPENDS"].split()
    assert install.PYTORCH_EXTENSION in catalog_entry()["build_dependencies"]


def test_the_licence_file_is_the_standard_text_of_the_declared_licence():
    import hashlib

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    declared = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["license"]
    declared = declared["text"] if isinstance(declared, dict) else declared
    licence = REPO / "LICENSE.txt"  # a name the Extensions Index looks for, at the repository root
    assert declared in LICENCE_TEXTS, f"no standard text known for {declared}"
    assert hashlib.sha256(licence.read_bytes()).hexdigest() == LICENCE_TEXTS[declared]
