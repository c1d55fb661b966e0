"""Which Python packages the 3D Slicer module must install, and what must stay as it is.

Free of Slicer and of third-party imports, so the Slicer module can call it before anything is
installed and pytest can test it. Installed versions are read from package metadata: nothing is
imported (importing an old torch into Slicer's process would keep it loaded after an upgrade).
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import Iterable, Optional

#: Oldest PyTorch the library works with.
MINIMUM_TORCH = "2.1"
TORCH_REQUIREMENT = f"torch>={MINIMUM_TORCH}"
#: Packages that come with 3D Slicer and must never be replaced by an installation (pinned to the
#: installed version in a pip constraints file).
PINNED_PACKAGES = ("numpy", "SimpleITK")


def load_requirements(path) -> list:
    """Requirement strings of a requirements file (comments, blank lines and options dropped)."""
    lines = [line.split("#", 1)[0].strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("-")]


def installed_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _parse(text: str):
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - packaging comes with pip and with Slicer
        return None
    return Requirement(text)


def _version_tuple(version: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def is_satisfied(requirement: str) -> bool:
    """Whether an installed distribution satisfies ``requirement`` (name, version range, marker)."""
    req = _parse(requirement)
    if req is None:  # without `packaging`: name and a ">=" bound only
        name, _, low = requirement.partition(">=")
        version = installed_version(name.strip())
        return version is not None and (not low or _version_tuple(version) >= _version_tuple(low))
    if req.marker is not None and not req.marker.evaluate():
        return True
    version = installed_version(req.name)
    if version is None:
        return False
    return not req.specifier or req.specifier.contains(version, prereleases=True)


def missing(requirements: Iterable[str]) -> list:
    """The requirements that are not satisfied (missing or too old), in the given order."""
    return [r for r in requirements if not is_satisfied(r)]


def constraints_text(packages: Iterable[str] = PINNED_PACKAGES) -> str:
    """A pip constraints file pinning each installed package of ``packages`` to its version."""
    lines = [f"{name}=={version}" for name in packages if (version := installed_version(name))]
    return "\n".join(lines) + ("\n" if lines else "")
