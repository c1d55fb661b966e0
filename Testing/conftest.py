"""Shared fixtures: a small random DINOv3 saved and loaded through ``from_pretrained``, and
synthetic phantoms with known lesions. Nothing here needs the network."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

PHANTOM_SHAPE = (16, 64, 64)
RESOLUTION = 128


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random DINOv3 ViT (4 layers, 192-d, patch 16) in Hugging Face format."""
    from HiMatchADLib.features.backbone import build_random_model

    return str(build_random_model(tmp_path_factory.mktemp("model") / "tiny-dinov3", "tiny", seed=0))


@pytest.fixture(scope="session")
def normals_dir(tmp_path_factory) -> Path:
    """Five normal phantom volumes (anatomy varies between them)."""
    from HiMatchADLib.io.writers import write_image
    from HiMatchADLib.evaluation.phantom import make_phantom

    d = tmp_path_factory.mktemp("normals")
    for i in range(5):
        img, _ = make_phantom(PHANTOM_SHAPE, seed=10 + i)
        write_image(img.array, img.geometry, d / f"normal_{i}.nii.gz")
    return d


@pytest.fixture(scope="session")
def lesion_case():
    """A phantom with a bright lesion (intensity alone separates it) and its mask."""
    from HiMatchADLib.evaluation.phantom import make_phantom

    return make_phantom(PHANTOM_SHAPE, seed=1000, lesion=True, lesion_radius=0.35, name="case")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def fitted(tiny_model, normals_dir, cache_dir):
    """One fitted detector per method, shared by the tests (bank built once)."""
    from HiMatchADLib import HiMatchDetector

    dets = {}

    def get(method: str):
        if method not in dets:
            dets[method] = HiMatchDetector(model=tiny_model, method=method, k=4, resolution=RESOLUTION, cache_dir=cache_dir).fit(normals_dir)
        return dets[method]

    return get


def oblique_direction() -> np.ndarray:
    """A proper rotation that is not axis-aligned (about 30 degrees around an oblique axis)."""
    axis = np.array([0.3, -0.5, 0.8])
    axis /= np.linalg.norm(axis)
    a = np.deg2rad(30)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K


def needs_shared_data(*parts):
    path = SHARED_DATA.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not present (development data is not part of the repository)")


def one_error_line(err: str) -> str:
    """The one `error:` line of a command's stderr (asserted to be the only line)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture()
def cli(tiny_model, normals_dir, cache_dir, capsys):
    """Run the command line with the tiny model; returns (status, stdout, stderr)."""

    def _run(*argv, cache=None, normals=None):
        from HiMatchADLib.cli.main import main

        args = list(argv)
        if args[0] in ("detect", "batch"):
            args += ["--normals", str(normals or normals_dir), "--model", tiny_model, "--resolution", str(RESOLUTION),
                     "--cache-dir", str(cache or cache_dir), "--method", "knn"]
        code = main(["--quiet"] + args)
        out = capsys.readouterr()
        assert "Traceback" not in out.err
        return code, out.out, out.err

    return _run



@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m", options: str = ""):
    """A small tmpfs mounted at ``path``; the test is skipped where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (f",{options}" if options else "")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount_read_only(path: Path) -> None:
    p = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot remount read-only here: {p.stderr.strip()}")
