"""Installing the module's Python requirements into Slicer's Python: which packages, from where, and
what must stay as it is.

- **PyTorch** comes only from the PyTorch extension (SlicerPyTorch, module ``PyTorchUtils``), as for
  Slicer's other AI extensions: its installer picks the build that matches the computer (CUDA build
  for the NVIDIA driver, CPU build without one). Without that extension the module offers to install
  it through the Extensions Manager (Slicer restarts afterwards) and otherwise stops with a message
  naming it; there is no fallback to PyPI's torch inside Slicer (CPU-only on Windows, gigabytes of
  CUDA wheels on Linux without a GPU).
- The other packages (``Resources/requirements.txt``, and optional ones such as highdicom for DICOM
  outputs, installed as packages, never as extras of ``himatchad``) come from PyPI through
  ``slicer.packaging.pip_install`` (Slicer 5.12 and later, with its progress dialog) or
  ``slicer.util.pip_install``; a constraints file keeps Slicer's own numpy and SimpleITK.
- With testing enabled (CTest runs Slicer with ``--testing``) nothing is ever installed.

Free of third-party imports at module level (``slicer`` is imported by the functions that install),
so the Slicer module can call it before anything is installed and pytest can test it. Installed
versions are read from package metadata: this module never imports torch (importing an old torch
into Slicer's process would keep it loaded after an upgrade; the worker process uses the packages).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import os
import platform
import re
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional

#: Oldest PyTorch the library works with.
MINIMUM_TORCH = "2.1"

TORCH_REQUIREMENT = f"torch>={MINIMUM_TORCH}"

#: The Extensions Index name of the extension that installs PyTorch (SlicerPyTorch), the Python module
#: it provides, and its source (for installing it by hand). ``CMakeLists.txt`` (``EXTENSION_DEPENDS``)
#: and the catalog entry (``build_dependencies``) name the same extension.
PYTORCH_EXTENSION = "PyTorch"
PYTORCH_UTILS_MODULE = "PyTorchUtils"
PYTORCH_EXTENSION_SOURCE = "https://github.com/fepegar/SlicerPyTorch"

#: Optional features and the packages they need in Slicer's Python (the same as the extras of
#: ``pyproject.toml``, as plain requirements: ``himatchad`` itself is never installed into Slicer).
OPTIONAL_REQUIREMENTS = {
    "dicom": ("highdicom>=0.22",),  # --dicom-seg / --dicom-heatmap: DICOM SEG and parametric map outputs
}

#: Packages that come with 3D Slicer and must never be replaced by an installation (pinned to the
#: installed version in a pip constraints file).
PINNED_PACKAGES = ("numpy", "SimpleITK")

#: Name shown by Slicer's installation dialogs.
REQUESTER = "HiMatch-AD"

MANUAL_PYTORCH_STEPS = (
    "To install it by hand: open View > Extensions Manager, install 'PyTorch' (or 'Install from file' "
    "with a downloaded extension package) and restart Slicer; or clone {source} and add its PyTorchUtils "
    "folder under Edit > Application Settings > Modules > Additional module paths; or install torch>={minimum} "
    "into Slicer's Python yourself (see the HiMatch-AD Slicer documentation)."
).format(source=PYTORCH_EXTENSION_SOURCE, minimum=MINIMUM_TORCH)


class MissingRequirements(RuntimeError):
    """Required Python packages are missing and were not installed.

    ``missing``: the requirements still missing; ``restart_required``: Slicer must be restarted before
    they can be installed or used (e.g. the PyTorch extension was just installed).
    """

    def __init__(self, message: str, missing: Iterable[str] = (), restart_required: bool = False):
        super().__init__(message)
        self.missing = list(missing)
        self.restart_required = restart_required


def load_requirements(path) -> list:
    """Requirement strings of a requirements file (comments, blank lines and options dropped)."""
    lines = [line.split("#", 1)[0].strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("-")]


def optional_requirements(features: Iterable[str]) -> list:
    """The requirements of optional ``features`` (keys of :data:`OPTIONAL_REQUIREMENTS`), in order."""
    out = []
    for feature in features:
        if feature not in OPTIONAL_REQUIREMENTS:
            raise ValueError(f"unknown optional feature {feature!r}; known: {', '.join(sorted(OPTIONAL_REQUIREMENTS))}")
        out += [r for r in OPTIONAL_REQUIREMENTS[feature] if r not in out]
    return out


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


def torch_platform_problem() -> Optional[str]:
    """Why no PyTorch build can work in this Slicer (``None`` when one can).

    The last PyTorch for Intel macOS (2.2) is built for NumPy 1; Slicer 5.10 and later ship NumPy 2,
    with which such a torch cannot exchange arrays.
    """
    if sys.platform != "darwin" or platform.machine() != "x86_64":
        return None
    numpy = installed_version("numpy")
    if numpy is None or _version_tuple(numpy)[:1] < (2,):
        return None
    return (
        f"PyTorch has no build for Intel Macs that works with Slicer's NumPy {numpy} (the last one, 2.2, was "
        "built for NumPy 1). Use HiMatch-AD in Slicer on an Apple silicon Mac, Windows or Linux, or outside "
        "Slicer (pip install himatchad in a Python environment with numpy<2)."
    )


def ensure_requirements(
    requirements_file,
    interactive: bool = True,
    progress: Optional[Callable[[str], None]] = None,
    optional: Iterable[str] = (),
    install_in_testing: bool = False,
) -> None:
    """Install missing or too old Python packages into Slicer's Python: PyTorch (through the PyTorch
    extension), those of ``requirements_file`` (``Resources/requirements.txt``) and those of the
    ``optional`` features (keys of :data:`OPTIONAL_REQUIREMENTS`, e.g. ``("dicom",)``).

    Without the PyTorch extension (when torch must be installed) it offers, when ``interactive``, to
    install the extension through the Extensions Manager and restart Slicer; otherwise it stops with a
    message naming the extension and how to install it by hand. Then one confirmation lists every
    package (when ``interactive``); without ``interactive`` nothing is asked. ``progress(message)`` is
    called at each step (for the module's status line); Slicer 5.12 also shows its own progress
    dialog with pip's output. Slicer's own numpy and SimpleITK are pinned by a constraints file.
    This module imports none of the packages (PyTorchUtils' installer imports the torch it has just
    installed).

    With testing enabled (``slicer.app.testingEnabled()``, as under CTest) nothing is installed:
    missing packages raise :class:`MissingRequirements`. ``install_in_testing`` is accepted for
    callers written for the earlier signature and changes nothing: a test run never installs.

    Raises :class:`MissingRequirements` (a ``RuntimeError``) when packages are missing and are not
    installed: testing mode, declined, no PyTorch extension, restart needed, or a failed installation.
    """
    import slicer

    report = progress or (lambda message: None)
    requirements = [TORCH_REQUIREMENT] + load_requirements(requirements_file)
    requirements += [r for r in optional_requirements(optional) if r not in requirements]
    todo = missing(requirements)
    if not todo:
        return
    if slicer.app.testingEnabled():
        raise MissingRequirements(
            "These Python packages are required but not installed: " + ", ".join(todo)
            + ". Nothing is installed while Slicer runs with testing enabled (as under CTest).",
            todo,
        )
    torch_needed = TORCH_REQUIREMENT in todo
    pytorch_utils = None
    if torch_needed:
        problem = torch_platform_problem()
        if problem:
            raise MissingRequirements(problem, todo)
        pytorch_utils = import_pytorch_utils()
        if pytorch_utils is None:
            offer_pytorch_extension(interactive, report, todo)  # always raises: a restart comes first
    if interactive and not slicer.util.confirmOkCancelDisplay(
        "HiMatch-AD needs these Python packages, which will be downloaded and installed into Slicer's Python "
        "environment (this can take several minutes):\n\n{packages}\n\n{torch}Slicer's own numpy and SimpleITK "
        "are kept as they are.".format(
            packages="\n".join(todo),
            torch="PyTorch is installed by the PyTorch extension, in the build that matches this computer. "
            if torch_needed else "",
        ),
        "Install Python packages",
    ):
        raise MissingRequirements("Installation of the required Python packages was declined", todo)
    import tempfile

    others = [r for r in todo if r != TORCH_REQUIREMENT]
    constraints = tempfile.NamedTemporaryFile("w", suffix="-constraints.txt", prefix="himatchad-", delete=False)
    try:
        constraints.write(constraints_text())
        constraints.close()
        if torch_needed:
            report("Installing PyTorch with the PyTorch extension (this can take several minutes)...")
            install_torch(pytorch_utils)
        if others:
            report("Installing Python packages: {packages} (this can take several minutes)...".format(packages=", ".join(others)))
            pip_install(others, constraints.name)
    finally:
        os.unlink(constraints.name)
    still = missing(requirements)
    if still:
        raise MissingRequirements(
            "These Python packages are still missing or too old: " + ", ".join(still)
            + ". Install them into Slicer's Python (for example with slicer.util.pip_install) and restart Slicer.",
            still,
        )
    report("Python packages installed.")


def import_pytorch_utils():
    """The PyTorch extension's ``PyTorchUtils`` module, or ``None`` when that extension is not loaded."""
    try:
        return importlib.import_module(PYTORCH_UTILS_MODULE)
    except ModuleNotFoundError:
        return None


def extensions_manager():
    """Slicer's extensions manager model, or ``None`` (a Slicer built without the Extensions Manager)."""
    import slicer

    get = getattr(slicer.app, "extensionsManagerModel", None)
    return get() if get is not None else None


def offer_pytorch_extension(interactive: bool, progress: Callable[[str], None] = lambda message: None, todo=()) -> None:
    """Install the PyTorch extension through the Extensions Manager (after asking), then offer the
    restart Slicer needs before the extension can be used. Always raises :class:`MissingRequirements`:
    PyTorch can be installed only after the restart (``restart_required`` says whether one is due).
    """
    import slicer

    todo = list(todo) or [TORCH_REQUIREMENT]
    manager = extensions_manager()
    if manager is not None and manager.isExtensionInstalled(PYTORCH_EXTENSION):
        raise MissingRequirements(
            f"The {PYTORCH_EXTENSION} extension is installed but not loaded: restart Slicer (and if the extension "
            "is disabled, enable it in View > Extensions Manager).",
            todo, restart_required=True,
        )
    needs = (
        f"HiMatch-AD needs PyTorch, which Slicer installs with the {PYTORCH_EXTENSION} extension (module "
        f"{PYTORCH_UTILS_MODULE}); that extension is not installed."
    )
    if manager is None or not interactive:
        raise MissingRequirements(f"{needs} {MANUAL_PYTORCH_STEPS}", todo)
    if not slicer.util.confirmOkCancelDisplay(
        f"{needs}\n\nInstall the {PYTORCH_EXTENSION} extension now from the Extensions Manager? Slicer must be "
        "restarted afterwards; PyTorch and the other packages are installed on the next run.",
        f"Install the {PYTORCH_EXTENSION} extension",
    ):
        raise MissingRequirements(f"{needs} {MANUAL_PYTORCH_STEPS}", todo)
    progress(f"Installing the {PYTORCH_EXTENSION} extension...")
    was_interactive = manager.interactive
    manager.interactive = False  # asked above; the restart is asked below
    try:
        installed = manager.installExtensionFromServer(PYTORCH_EXTENSION, False)
    finally:
        manager.interactive = was_interactive
    if not installed:
        raise MissingRequirements(
            f"The {PYTORCH_EXTENSION} extension could not be installed from the extensions server (see the "
            f"application log). {MANUAL_PYTORCH_STEPS}",
            todo,
        )
    progress(f"The {PYTORCH_EXTENSION} extension is installed; restart Slicer to use it.")
    if slicer.util.confirmOkCancelDisplay(
        f"The {PYTORCH_EXTENSION} extension is installed. Slicer must be restarted before it can be used.\n\n"
        "Restart Slicer now? (Choose Cancel to save your work first and restart later.)",
        "Restart Slicer",
    ):
        slicer.util.restart()
    raise MissingRequirements(
        f"The {PYTORCH_EXTENSION} extension is installed: restart Slicer, then run HiMatch-AD again to install "
        "PyTorch and the other packages.",
        todo, restart_required=True,
    )


def install_torch(pytorch_utils) -> None:
    """PyTorch through the PyTorch extension's installer (``PyTorchUtilsLogic.installTorch``).

    ``installTorch`` returns the ``torch`` module, or ``None`` when it did not install it.
    """
    logging.info("HiMatch-AD: installing PyTorch with the PyTorch extension (this can take several minutes)")
    logic = pytorch_utils.PyTorchUtilsLogic()
    try:
        torch = logic.installTorch(askConfirmation=False, torchVersionRequirement=">=" + MINIMUM_TORCH)
    except Exception as exc:  # the installer's pip/light-the-torch run failed
        raise MissingRequirements(
            f"PyTorch could not be installed by the {PYTORCH_EXTENSION} extension ({exc}). Install it with the "
            "PyTorch Utils module (version requirement >=" + MINIMUM_TORCH + ") and try again.",
            [TORCH_REQUIREMENT],
        ) from exc
    if torch is None:
        raise MissingRequirements(
            "PyTorch could not be installed. Install it with the PyTorch Utils module (version requirement >="
            + MINIMUM_TORCH + ") and try again.",
            [TORCH_REQUIREMENT],
        )


def _slicer_packaging():
    """``slicer.packaging`` (Slicer 5.12 and later), or ``None``."""
    try:
        module = importlib.import_module("slicer.packaging")
    except ImportError:
        return None
    return module if callable(getattr(module, "pip_install", None)) else None


def pip_install(requirements: list, constraints_path: str) -> None:
    """``slicer.packaging.pip_install`` (Slicer 5.12 and later: progress dialog with pip's output),
    else ``slicer.util.pip_install`` (Slicer 5.10: a wait cursor)."""
    import slicer

    packaging = _slicer_packaging()
    if packaging is not None:
        options = {"constraints": constraints_path, "requester": REQUESTER, "show_progress": True, "blocking": True}
        try:
            accepted = inspect.signature(packaging.pip_install).parameters
        except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
            accepted = options
        if "constraints" in accepted:
            packaging.pip_install(list(requirements), **{k: v for k, v in options.items() if k in accepted})
            return
    with slicer.util.WaitCursor():
        slicer.util.pip_install(["-c", constraints_path] + list(requirements))
