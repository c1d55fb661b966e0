"""What the Slicer module installs, from where, and when it must not: PyTorch only through the PyTorch
extension (offered through the Extensions Manager when missing), the other packages with Slicer's
installer and a progress callback, optional packages as packages, nothing under CTest, and the
constraints that keep Slicer's own numpy and SimpleITK in place.

``slicer``, ``slicer.packaging``, ``PyTorchUtils`` and the extensions manager are stand-ins that
record what they are asked; installed versions come from a table that the stand-in installers fill.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import sys
import types
from pathlib import Path

import pytest

from HiMatchADLib.mrml import install as dependencies

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "Resources" / "requirements.txt"
LISTED = dependencies.load_requirements(REQUIREMENTS)


def _name(requirement: str) -> str:
    return requirement.split(";")[0].split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower()


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


class FakeManager:
    """``slicer.app.extensionsManagerModel()``: records installations and the interactive flag."""

    def __init__(self, installed=(), succeeds=True):
        self.installed = set(installed)
        self.succeeds = succeeds
        self.interactive = True
        self.calls = []

    def isExtensionInstalled(self, name):
        return name in self.installed

    def installExtensionFromServer(self, name, restart=True, update=False):
        self.calls.append((name, restart, self.interactive))
        if self.succeeds:
            self.installed.add(name)
        return self.succeeds


class FakeSlicer:
    """The parts of ``slicer`` the installer uses; ``answers`` are the user's replies, in order."""

    def __init__(self, monkeypatch, versions, testing=False, manager=None, answers=(), packaging=None, pytorch=None):
        self.versions = versions
        self.testing = testing
        self.manager = manager
        self.answers = list(answers)
        self.dialogs = []
        self.pip_calls = []
        self.restarts = 0
        module = types.ModuleType("slicer")
        app = types.SimpleNamespace(testingEnabled=lambda: self.testing)
        if manager is not None:
            app.extensionsManagerModel = lambda: manager
        module.app = app
        module.util = types.SimpleNamespace(
            confirmOkCancelDisplay=self._confirm,
            pip_install=self._util_pip_install,
            restart=self._restart,
            WaitCursor=contextlib.nullcontext,
        )
        self.module = module
        monkeypatch.setitem(sys.modules, "slicer", module)
        monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)  # None: Slicer 5.10 (ImportError)
        monkeypatch.setitem(sys.modules, "PyTorchUtils", pytorch)  # None: no PyTorch extension
        monkeypatch.setattr(dependencies, "sys", types.SimpleNamespace(platform="linux"))

    def _confirm(self, text, title=None, **kwargs):
        self.dialogs.append((title, text))
        return self.answers.pop(0) if self.answers else True

    def install(self, requirements):
        """Mark ``requirements`` as installed at the lowest version they allow (or 99)."""
        for req in requirements:
            low = req.partition(">=")[2].split(",")[0].strip() or "99"
            self.versions[_name(req)] = low

    def _util_pip_install(self, args):
        self.pip_calls.append(("slicer.util.pip_install", list(args), {}))
        self.install([a for a in args if not a.startswith("-") and not a.endswith(".txt")])

    def _restart(self):
        self.restarts += 1


def fake_pytorch_utils(slicer_stub_holder, returns_module=True, raises=None):
    """A ``PyTorchUtils`` module whose ``installTorch`` records its arguments."""
    module = types.ModuleType("PyTorchUtils")
    module.calls = []

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                         torchvisionVersionRequirement=None):
            module.calls.append({"askConfirmation": askConfirmation, "forceComputationBackend": forceComputationBackend,
                                 "torchVersionRequirement": torchVersionRequirement})
            if raises is not None:
                raise raises
            if not returns_module:
                return None
            slicer_stub_holder["slicer"].install(["torch" + torchVersionRequirement])
            return types.ModuleType("torch")

    module.PyTorchUtilsLogic = PyTorchUtilsLogic
    return module


def fake_packaging(holder, with_requester=True):
    """``slicer.packaging`` of Slicer 5.12 (``pip_install(requirements, constraints=..., requester=..., ...)``)."""
    module = types.ModuleType("slicer.packaging")

    if with_requester:
        def pip_install(requirements, constraints=None, no_deps_requirements=None, skip_packages=None, blocking=False,
                        show_progress=False, requester=None, parent=None, logCallback=None, completedCallback=None):
            holder["slicer"].pip_calls.append(("slicer.packaging.pip_install", list(requirements), {
                "constraints": constraints, "requester": requester, "show_progress": show_progress, "blocking": blocking}))
            holder["slicer"].install(requirements)
    else:  # an early 5.11 preview: constraints, no requester
        def pip_install(requirements, constraints=None, blocking=True, logCallback=None, completedCallback=None):
            holder["slicer"].pip_calls.append(("slicer.packaging.pip_install", list(requirements), {
                "constraints": constraints, "blocking": blocking}))
            holder["slicer"].install(requirements)

    module.pip_install = pip_install
    return module


@pytest.fixture
def env(monkeypatch, versions):
    """``env(**options)``: a stand-in Slicer; ``pytorch=True`` gives it the PyTorch extension,
    ``packaging=True`` Slicer 5.12's ``slicer.packaging``."""
    holder = {}

    def make(pytorch=False, packaging=False, **options):
        pt = fake_pytorch_utils(holder, **(pytorch if isinstance(pytorch, dict) else {})) if pytorch else None
        pk = fake_packaging(holder, **(packaging if isinstance(packaging, dict) else {})) if packaging else None
        holder["slicer"] = FakeSlicer(monkeypatch, versions, packaging=pk, pytorch=pt, **options)
        holder["slicer"].pytorch = pt
        return holder["slicer"]

    return make


def manager_calls(fake) -> list:
    return fake.manager.calls if fake.manager is not None else []


def installed_by_pip(fake) -> list:
    return [r for _, args, _ in fake.pip_calls for r in args if not r.startswith("-") and not r.endswith(".txt")]


# ---------------------------------------------------------------------------------------------- reading


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


def test_the_module_requirements_file_never_lists_slicer_packages_torch_or_extras():
    names = {_name(r) for r in LISTED}
    assert names and not names & {"numpy", "simpleitk", "torch", "himatchad", "highdicom"}
    assert not any("[" in r for r in LISTED)
    # Everything the library imports at run time is either listed, pinned, or torch.
    assert {"transformers", "faiss-cpu", "scikit-learn", "scipy"} <= names


# ---------------------------------------------------------------------------------------------- PyTorch


def test_torch_comes_from_the_pytorch_extension_installer_and_never_from_pypi(env, versions):
    fake = env(pytorch=True)
    dependencies.ensure_requirements(REQUIREMENTS, interactive=True)
    assert fake.pytorch.calls == [{"askConfirmation": False, "forceComputationBackend": None, "torchVersionRequirement": ">=2.1"}]
    assert "torch" not in {_name(r) for r in installed_by_pip(fake)}
    assert len(fake.dialogs) == 1 and "torch>=2.1" in fake.dialogs[0][1]  # one confirmation for everything


def test_without_the_extension_it_is_offered_from_the_extensions_manager_then_a_restart(env):
    manager = FakeManager()
    fake = env(manager=manager, answers=[True, True])
    with pytest.raises(dependencies.MissingRequirements, match="restart Slicer") as caught:
        dependencies.ensure_requirements(REQUIREMENTS, interactive=True)
    assert caught.value.restart_required and "torch>=2.1" in caught.value.missing
    # Installed without the manager's own popups (asked first, restart asked after), flag restored.
    assert manager.calls == [("PyTorch", False, False)] and manager.interactive is True
    assert [title for title, _ in fake.dialogs] == ["Install the PyTorch extension", "Restart Slicer"]
    assert fake.restarts == 1
    assert fake.pip_calls == []  # no PyPI torch, and nothing else before the restart


def test_a_declined_restart_leaves_slicer_running_and_says_to_restart(env):
    fake = env(manager=FakeManager(), answers=[True, False])
    with pytest.raises(dependencies.MissingRequirements, match="restart Slicer") as caught:
        dependencies.ensure_requirements(REQUIREMENTS, interactive=True)
    assert caught.value.restart_required and fake.restarts == 0


def test_a_declined_extension_stops_with_the_manual_path(env):
    manager = FakeManager()
    fake = env(manager=manager, answers=[False])
    with pytest.raises(dependencies.MissingRequirements, match="PyTorch extension") as caught:
        dependencies.ensure_requirements(REQUIREMENTS, interactive=True)
    assert "Additional module paths" in str(caught.value) and not caught.value.restart_required
    assert manager.calls == [] and fake.pip_calls == [] and fake.restarts == 0


@pytest.mark.parametrize("manager", [FakeManager(), None], ids=["not-interactive", "no-extensions-manager"])
def test_without_a_way_to_ask_it_names_the_extension_and_the_manual_path(env, manager):
    fake = env(manager=manager)
    with pytest.raises(dependencies.MissingRequirements) as caught:
        dependencies.ensure_requirements(REQUIREMENTS, interactive=manager is None)
    message = str(caught.value)
    assert "PyTorch extension" in message and "Extensions Manager" in message and "PyTorchUtils" in message
    assert dependencies.PYTORCH_EXTENSION_SOURCE in message
    assert fake.dialogs == [] and fake.pip_calls == [] and (manager is None or manager.calls == [])


def test_an_installed_but_not_loaded_extension_asks_for_a_restart_not_a_reinstall(env):
    manager = FakeManager(installed={"PyTorch"})
    fake = env(manager=manager)
    with pytest.raises(dependencies.MissingRequirements, match="installed but not loaded") as caught:
        dependencies.ensure_requirements(REQUIREMENTS, interactive=True)
    assert caught.value.restart_required and manager.calls == [] and fake.dialogs == []


def test_a_failed_extension_installation_gives_the_manual_path(env):
    manager = FakeManager(succeeds=False)
    fake = env(manager=manager, answers=[True])
    with pytest.raises(dependencies.MissingRequirements, match="could not be installed") as caught:
        dependencies.ensure_requirements(REQUIREMENTS, interactive=True)
    assert "Additional module paths" in str(caught.value) and fake.restarts == 0 and fake.pip_calls == []


def test_a_satisfied_torch_needs_no_extension(env, versions):
    versions["torch"] = "2.13.0+cu128"  # e.g. installed by hand
    fake = env(manager=FakeManager())
    dependencies.ensure_requirements(REQUIREMENTS, interactive=False)
    assert fake.dialogs == [] and manager_calls(fake) == []
    assert installed_by_pip(fake) == [r for r in LISTED if _name(r) != "transformers"]  # 5.2 is there already


@pytest.mark.parametrize("result", ["none", "error"])
def test_a_failed_torch_installation_is_reported(env, result):
    options = {"returns_module": False} if result == "none" else {"raises": RuntimeError("ltt failed")}
    env(pytorch=options)
    with pytest.raises(dependencies.MissingRequirements, match="PyTorch could not be installed") as caught:
        dependencies.ensure_requirements(REQUIREMENTS, interactive=False)
    assert caught.value.missing == ["torch>=2.1"]


def test_intel_macs_stop_before_installing_a_torch_built_for_numpy_1(env, versions, monkeypatch):
    fake = env(pytorch=True, manager=FakeManager())
    monkeypatch.setattr(dependencies, "sys", types.SimpleNamespace(platform="darwin"))
    monkeypatch.setattr(dependencies, "platform", types.SimpleNamespace(machine=lambda: "x86_64"))
    versions["numpy"] = "2.0.2"
    with pytest.raises(dependencies.MissingRequirements, match="Intel Macs"):
        dependencies.ensure_requirements(REQUIREMENTS, interactive=True)
    assert fake.pytorch.calls == [] and fake.pip_calls == [] and fake.dialogs == []
    versions["numpy"] = "1.26.4"
    assert dependencies.torch_platform_problem() is None
    versions["numpy"] = "2.0.2"
    monkeypatch.setattr(dependencies, "platform", types.SimpleNamespace(machine=lambda: "arm64"))
    assert dependencies.torch_platform_problem() is None


# ---------------------------------------------------------------------------------------------- progress


def test_slicer_5_12_installs_with_its_progress_dialog_and_reports_each_step(env):
    fake = env(pytorch=True, packaging=True)
    messages = []
    dependencies.ensure_requirements(REQUIREMENTS, interactive=False, progress=messages.append)
    ((installer, reqs, options),) = fake.pip_calls
    assert installer == "slicer.packaging.pip_install"
    assert reqs == [r for r in LISTED if _name(r) != "transformers"]  # transformers 5.2 is there already
    assert options["requester"] == "HiMatch-AD" and options["show_progress"] and options["blocking"]
    assert Path(options["constraints"]).name.endswith("-constraints.txt")
    assert [m.split(" ")[0:2] for m in messages] == [["Installing", "PyTorch"], ["Installing", "Python"], ["Python", "packages"]]
    assert "faiss-cpu>=1.8" in messages[1] and messages[-1] == "Python packages installed."


def test_slicer_5_10_falls_back_to_util_pip_install_with_the_constraints(env):
    fake = env(pytorch=True, packaging=None)
    seen = {}
    original = fake.module.util.pip_install

    def pip_install(args):
        seen["constraints"] = Path(args[1]).read_text(encoding="utf-8")
        original(args)

    fake.module.util.pip_install = pip_install
    dependencies.ensure_requirements(REQUIREMENTS, interactive=False)
    ((installer, args, _),) = fake.pip_calls
    assert installer == "slicer.util.pip_install" and args[0] == "-c"
    assert seen["constraints"].splitlines() == ["numpy==1.26.4", "SimpleITK==2.4.0"]
    assert not Path(args[1]).exists()  # the constraints file is removed afterwards


def test_an_early_packaging_module_gets_only_the_options_it_accepts(env):
    fake = env(pytorch=True, packaging={"with_requester": False})
    dependencies.ensure_requirements(REQUIREMENTS, interactive=False)
    ((installer, _, options),) = fake.pip_calls
    assert installer == "slicer.packaging.pip_install" and set(options) == {"constraints", "blocking"}


def test_packages_still_missing_after_installation_are_named(env):
    fake = env(pytorch=True)
    fake.install = lambda requirements: None  # pip "succeeds" but installs nothing
    with pytest.raises(dependencies.MissingRequirements, match="still missing") as caught:
        dependencies.ensure_requirements(REQUIREMENTS, interactive=False)
    assert "faiss-cpu>=1.8" in caught.value.missing


def test_declining_installs_nothing(env):
    fake = env(pytorch=True, answers=[False])
    with pytest.raises(dependencies.MissingRequirements, match="declined"):
        dependencies.ensure_requirements(REQUIREMENTS, interactive=True)
    assert fake.pytorch.calls == [] and fake.pip_calls == []


# ---------------------------------------------------------------------------------------------- optional


def test_optional_dicom_outputs_install_highdicom_as_a_package_not_an_extra(env, versions):
    versions.update({"torch": "2.13.0", **{_name(r): "99" for r in LISTED}})
    fake = env(packaging=True)
    dependencies.ensure_requirements(REQUIREMENTS, interactive=False, optional=["dicom"])
    assert installed_by_pip(fake) == ["highdicom>=0.22"]
    assert not any("himatchad" in r.lower() or "[" in r for r in installed_by_pip(fake))
    fake.pip_calls.clear()
    dependencies.ensure_requirements(REQUIREMENTS, interactive=False)  # without the feature: not needed
    assert fake.pip_calls == []
    with pytest.raises(ValueError, match="unknown optional feature"):
        dependencies.ensure_requirements(REQUIREMENTS, interactive=False, optional=["dicom_seg"])


def test_optional_requirements_are_the_extras_of_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    for feature, requirements in dependencies.OPTIONAL_REQUIREMENTS.items():
        assert list(requirements) == extras[feature], feature


# ---------------------------------------------------------------------------------------------- CTest


@pytest.mark.parametrize("install_in_testing", [False, True], ids=["default", "the-self-test's-earlier-call"])
def test_testing_mode_never_installs(env, install_in_testing):
    manager = FakeManager()
    fake = env(testing=True, manager=manager)
    with pytest.raises(dependencies.MissingRequirements, match="testing enabled") as caught:
        dependencies.ensure_requirements(REQUIREMENTS, interactive=True, install_in_testing=install_in_testing)
    assert "torch>=2.1" in caught.value.missing
    assert fake.dialogs == [] and fake.pip_calls == [] and manager.calls == [] and fake.restarts == 0
    fake2 = env(testing=True, pytorch=True, packaging=True)
    with pytest.raises(dependencies.MissingRequirements):
        dependencies.ensure_requirements(REQUIREMENTS, interactive=False, optional=["dicom"], install_in_testing=install_in_testing)
    assert fake2.pytorch.calls == [] and fake2.pip_calls == []


def test_testing_mode_with_everything_installed_is_not_an_error(env, versions):
    versions.update({"torch": "2.13.0", **{_name(r): "99" for r in LISTED}})
    fake = env(testing=True)
    dependencies.ensure_requirements(REQUIREMENTS, interactive=False)
    assert fake.pip_calls == []


def test_the_installer_imports_no_third_party_package_at_module_level():
    import ast

    tree = ast.parse((REPO / "HiMatchADLib" / "mrml" / "install.py").read_text(encoding="utf-8"))
    top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    assert top <= set(sys.stdlib_module_names) | {"__future__"}, top
    source = (REPO / "HiMatchADLib" / "mrml" / "install.py").read_text(encoding="utf-8")
    assert "import torch" not in source
