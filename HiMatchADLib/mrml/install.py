"""Installing the module's Python requirements into Slicer's Python: which packages, what must stay as it is.

Free of third-party imports at module level (``slicer`` is imported by the functions that install),
so the Slicer module can call it before anything is installed and pytest can test it. Installed versions are read from package metadata: nothing is
imported (importing an old torch into Slicer's process would keep it loaded after an upgrade).
"""

from __future__ import annotations

import importlib.metadata
import os
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


def ensure_requirements(requirements_file, interactive: bool = True, install_in_testing: bool = False) -> None:
    """Install missing or too old Python packages into Slicer's Python: PyTorch and those of
    ``requirements_file`` (``Resources/requirements.txt``).

    One confirmation lists every package (when ``interactive``). PyTorch comes from the PyTorch
    extension's installer when that extension is present (it picks the build that matches the GPU
    driver). Slicer's own numpy and SimpleITK are pinned by a constraints file, so no installation
    replaces them. Nothing is imported into Slicer's process: the worker process uses the packages.
    Raises ``RuntimeError`` when the user declines or the installation fails.
    """
    import tempfile

    import slicer

    requirements = [TORCH_REQUIREMENT] + load_requirements(requirements_file)
    todo = missing(requirements)
    if not todo:
        return
    if slicer.app.testingEnabled() and not install_in_testing:
        raise RuntimeError("These Python packages are required but not installed: " + ", ".join(todo))
    if interactive and not slicer.util.confirmOkCancelDisplay(
        "HiMatch-AD needs these Python packages, which will be downloaded and installed into Slicer's Python "
        "environment (this can take several minutes):\n\n{packages}\n\nSlicer's own numpy and SimpleITK are "
        "kept as they are.".format(packages="\n".join(todo)),
        "Install Python packages",
    ):
        raise RuntimeError("Installation of the required Python packages was declined")
    constraints = tempfile.NamedTemporaryFile("w", suffix="-constraints.txt", prefix="himatchad-", delete=False)
    try:
        constraints.write(constraints_text())
        constraints.close()
        torch = [r for r in todo if r == TORCH_REQUIREMENT]
        others = [r for r in todo if r != TORCH_REQUIREMENT]
        with slicer.util.WaitCursor():
            if torch:
                install_torch(constraints.name)
            if others:
                pip_install(others, constraints.name)
    finally:
        os.unlink(constraints.name)
    still = missing(requirements)
    if still:
        raise RuntimeError(
            "These Python packages are still missing or too old: " + ", ".join(still)
            + ". Install them (for example with slicer.util.pip_install) and restart Slicer."
        )


def install_torch(constraints_path: str) -> None:
    """PyTorch through the PyTorch extension's ``PyTorchUtils`` when present, else from PyPI."""
    import logging

    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        PyTorchUtils = None
    if PyTorchUtils is not None:
        logging.info("HiMatch-AD: installing PyTorch with the PyTorch extension (this can take several minutes)")
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=">=" + MINIMUM_TORCH) is None:
            raise RuntimeError("PyTorch could not be installed. Install it with the PyTorch Utils module and try again.")
        return
    pip_install([TORCH_REQUIREMENT], constraints_path)


def pip_install(requirements: list, constraints_path: str) -> None:
    """``slicer.packaging.pip_install`` (Slicer 5.12 and later), else ``slicer.util.pip_install``."""
    import slicer

    try:
        from slicer import packaging
    except ImportError:
        packaging = None
    if packaging is not None and hasattr(packaging, "pip_install"):
        packaging.pip_install(requirements, constraints=constraints_path, requester="HiMatch-AD")
    else:
        slicer.util.pip_install(["-c", constraints_path] + list(requirements))
