"""The package's layer contract: each sub-package imports only from the layers below it, with no
import circles and no imports of the package's own modules inside functions.

    core < io < features, outputs < bank < methods < detector < batch < worker < mrml, evaluation < cli

Read from the source (AST), so it holds for every module whether or not its optional dependencies
(ray, highdicom, slicer) are installed. Imports under ``if TYPE_CHECKING:`` are not dependencies.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "HiMatchADLib"
LAYERS = {
    "core": 0, "io": 1, "features": 2, "outputs": 2, "bank": 3, "methods": 4, "detector": 5,
    "batch": 6, "worker": 7, "mrml": 8, "evaluation": 8, "cli": 9,
}


def modules() -> dict:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _type_checking_lines(tree: ast.AST) -> set:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, sub.end_lineno + 1))
    return lines


def imports_of(name: str, path: Path) -> list:
    """(imported module of this package, line, at module level) for every runtime import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    is_pkg = path.name == "__init__.py"
    top = {id(n) for n in tree.body}
    for n in tree.body:  # module-level try/if blocks count as module level
        if isinstance(n, (ast.Try, ast.If)):
            top.update(id(s) for s in ast.walk(n))
    found = []
    all_mods = modules()
    for node in ast.walk(tree):
        if node.lineno in skip if hasattr(node, "lineno") else False:
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.split(".")[0] == "HiMatchADLib"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "HiMatchADLib":
                mod = node.module
            else:
                continue
            for a in node.names:  # `from . import x` may import a module
                targets.append(f"{mod}.{a.name}" if f"{mod}.{a.name}" in all_mods else mod)
        for t in targets:
            found.append((t, node.lineno, id(node) in top))
    return found


def layer(module: str):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


ALL = modules()


@pytest.mark.parametrize("name", sorted(ALL))
def test_imports_only_from_lower_layers(name):
    mine = layer(name)
    for target, line, _ in imports_of(name, ALL[name]):
        theirs = layer(target)
        if mine is None or theirs is None or theirs == mine:
            continue
        assert LAYERS[theirs] < LAYERS[mine], f"{name} (layer {mine}) imports {target} (layer {theirs}) at line {line}"


@pytest.mark.parametrize("name", sorted(ALL))
def test_imports_of_the_package_are_at_module_level(name):
    inside = [(t, line) for t, line, top in imports_of(name, ALL[name]) if not top]
    assert not inside, f"{name} imports modules of the package inside functions: {inside}"


def test_every_module_belongs_to_a_layer():
    stray = [n for n in ALL if n.count(".") >= 1 and layer(n) is None and n != "HiMatchADLib.__main__"]
    assert not stray, f"modules outside the layer sub-packages: {stray}"


def test_no_import_circles():
    graph = {n: {t for t, _, top in imports_of(n, p) if top and t in ALL and t != n} for n, p in ALL.items()}
    # a package imports its own modules from __init__ (re-exports); a module importing its package
    # __init__ is the circle to refuse, so __init__ edges to children are kept, child->parent too.
    colour = {}
    stack = []

    def visit(n):
        colour[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if colour.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if m not in colour:
                visit(m)
        stack.pop()
        colour[n] = 2

    for n in sorted(graph):
        if n not in colour:
            visit(n)


def test_the_temporary_names_of_core_keep_every_suffix_io_reads_and_writes():
    """``core.atomic`` cannot import ``io`` (a lower layer), so it lists the suffixes a temporary
    file keeps (writers pick the format by it) itself: the list must be io's."""
    from HiMatchADLib.core.atomic import _KEPT_SUFFIXES
    from HiMatchADLib.io.formats import IMAGE_SUFFIXES, VOLUME_SUFFIXES

    assert set(_KEPT_SUFFIXES) == set(VOLUME_SUFFIXES + IMAGE_SUFFIXES)


@pytest.mark.parametrize("name", sorted(ALL))
def test_no_module_imports_another_modules_private_names(name):
    """A name another module needs is public in its home (``_x`` stays inside its module)."""
    tree = ast.parse(ALL[name].read_text(encoding="utf-8"))
    private = [
        (node.module, a.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level
        for a in node.names if a.name.startswith("_") and not a.name.startswith("__")
    ]
    assert not private, f"{name} imports private names: {private}"


def test_the_tests_mirror_the_sub_packages():
    testing = Path(__file__).resolve().parent
    folders = {p.name for p in testing.iterdir() if p.is_dir() and p.name not in ("Python", "__pycache__")}
    assert folders <= set(LAYERS), f"test folders that are no sub-package: {sorted(folders - set(LAYERS))}"
    assert not [p.name for p in testing.glob("test_*.py") if p.name not in ("test_layers.py", "test_registries.py", "test_packaging.py")], \
        "tests of one sub-package live in its folder"
