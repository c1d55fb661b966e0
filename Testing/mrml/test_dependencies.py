"""What the Slicer module installs: missing and too-old packages, and the constraints that keep
Slicer's own numpy and SimpleITK in place."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from HiMatchADLib.mrml import install as dependencies

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def versions(monkeypatch):
    table = {"torch": "2.0.1", "numpy": "1.26.4", "SimpleITK": "2.4.0", "transformers": "5.2.0"}

    def version(name):
        for key, value in table.items():
            if key.lower() == name.lower():
                return value
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(dependencies.importlib.metadata, "version", version)
    return table


def test_an_old_torch_counts_as_missing(versions):
    assert dependencies.missing([dependencies.TORCH_REQUIREMENT]) == ["torch>=2.1"]
    versions["torch"] = "2.13.0+cpu"
    assert dependencies.missing([dependencies.TORCH_REQUIREMENT]) == []


def test_missing_keeps_order_and_reads_versions_and_markers(versions):
    reqs = ["transformers>=5.0", "faiss-cpu>=1.8", "transformers>=6", "scipy>=1.10; python_version < '3.0'"]
    assert dependencies.missing(reqs) == ["faiss-cpu>=1.8", "transformers>=6"]


def test_constraints_pin_the_installed_numpy_and_simpleitk(versions):
    text = dependencies.constraints_text()
    assert text.splitlines() == ["numpy==1.26.4", "SimpleITK==2.4.0"]
    del versions["SimpleITK"]
    assert dependencies.constraints_text().splitlines() == ["numpy==1.26.4"]


def test_the_module_requirements_file_never_lists_slicer_packages():
    reqs = dependencies.load_requirements(REPO / "Resources" / "requirements.txt")
    names = {r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in reqs}
    assert names and not names & {"numpy", "simpleitk", "torch"}
    # Everything the library imports at run time is either listed, pinned, or torch.
    assert {"transformers", "faiss-cpu", "scikit-learn", "scipy"} <= names
