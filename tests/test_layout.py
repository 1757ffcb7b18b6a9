"""The shape of the code (docs/DESIGN.md, "Layout"): no import cycle, training and inference apart, small
functions, the design in the repository. Read from the source with ast, so a violation fails here at once."""

from __future__ import annotations

import ast
import os
import re

import pytest
from helpers import ROOT

MLM = os.path.join(ROOT, "mlm")
# The packages of mlm/, lowest first (docs/DESIGN.md opens with them in this order): a module imports its own
# package and those below it. train and inference stand side by side and never import each other; the scripts
# stand on top (predict.py on inference alone).
LAYERS = (("common",), ("config",), ("data",), ("model",), ("report",), ("train", "inference"))


def module_files() -> dict[str, str]:
    found = {}
    for dirpath, _, names in os.walk(MLM):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    found["train_ddp"] = os.path.join(ROOT, "train_ddp.py")
    found["predict"] = os.path.join(ROOT, "predict.py")
    return found


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def project_imports(module: str, path: str, known: set[str]) -> set[str]:
    """The project modules this file imports, at any depth of the file (function bodies included), except
    under `if TYPE_CHECKING:` (never executed)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = module if os.path.basename(path) == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != module:
                found.add(t)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = module_files()
    return {m: project_imports(m, p, set(files)) - {"mlm"} for m, p in files.items()}


def package(module: str) -> str:
    """mlm.data.cached -> data; mlm.config -> config; the scripts are their own."""
    return module.split(".")[1] if module.startswith("mlm.") else module


def layer(module: str) -> int:
    if module in ("train_ddp", "predict"):
        return len(LAYERS)
    return next(i for i, names in enumerate(LAYERS) if package(module) in names)


def test_no_import_cycles(graph):
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n) :] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_every_package_has_a_layer():
    """A new package (or a module loose in mlm/) must be placed in LAYERS and in docs/DESIGN.md's tree."""
    placed = {name for names in LAYERS for name in names}
    found = {
        n.removesuffix(".py")
        for n in os.listdir(MLM)
        if n != "__init__.py"
        and not n.startswith(("_", "."))
        and (n.endswith(".py") or os.path.isfile(os.path.join(MLM, n, "__init__.py")))
    }
    assert found == placed


def test_imports_go_only_downward(graph):
    wrong = [
        f"{m} imports {n}"
        for m, deps in graph.items()
        for n in deps
        if layer(n) > layer(m) or (layer(n) == layer(m) and package(n) != package(m))
    ]
    assert not wrong, "\n".join(wrong)
    assert not any(package(n) in ("train", "config") for n in graph["predict"])  # predict.py is inference only


def test_the_design_opens_with_the_packages_in_layer_order():
    design = open(os.path.join(ROOT, "docs", "DESIGN.md"), encoding="utf-8").read()
    tree = design[: design.index("## ", design.index("## ") + 1)]
    positions = [tree.index(f"mlm/{name}") for names in LAYERS for name in names]
    assert positions == sorted(positions), "docs/DESIGN.md's tree lists the packages lowest first"


def test_no_alias_modules():
    """A module that only re-exports another (`from x import main` and a __main__ guard) is a second name for
    one thing: the README names the real module."""
    aliases = []
    for module, path in module_files().items():
        body = [
            n
            for n in ast.parse(open(path, encoding="utf-8").read()).body
            if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
        ]  # docstrings
        if body and all(isinstance(n, (ast.Import, ast.ImportFrom, ast.If)) for n in body):
            aliases.append(module)
    assert not aliases, aliases


def test_the_checker_sees_a_cycle_and_a_wrong_direction(tmp_path):
    """Negative control: the walk finds imports inside functions and relative ones; the layers order them."""
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n")
    found = project_imports("mlm.a", str(tmp_path / "a.py"), {"mlm.a", "mlm.b"})
    assert found == {"mlm.b"}
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import g\n")
    assert project_imports("mlm.c", str(tmp_path / "c.py"), {"mlm.c", "mlm.b"}) == set()
    assert layer("mlm.data.cached") < layer("mlm.train.loop") == layer("mlm.inference.fill_mask") < layer("predict")
    assert layer("mlm.common.cli") < layer("mlm.config") < layer("mlm.data.text")


def test_the_design_lives_in_the_repository():
    """docs/DESIGN.md holds the invariants; the product cites it, never the shared note beside a checkout."""
    design = open(os.path.join(ROOT, "docs", "DESIGN.md"), encoding="utf-8").read()
    for n in range(1, 12):
        assert re.search(rf"^{n}\. \*\*", design, re.M), f"invariant {n} missing from docs/DESIGN.md"
    shared, architecture = [], []
    for dirpath, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "outputs")]
        for name in names:
            if name.endswith((".py", ".md", ".sh", ".yaml", ".txt", ".sbatch")) and name != "test_layout.py":
                path = os.path.join(dirpath, name)
                text = open(path, encoding="utf-8", errors="replace").read()
                rel = os.path.relpath(path, ROOT)
                if "ARCHITECTURE.md" in text:
                    architecture.append(rel)
                if "../shared" in text and not rel.startswith(("tests", "bench")):
                    shared.append(rel)
    assert not architecture, f"cite docs/DESIGN.md instead: {architecture}"
    # Only where the tests' and benchmarks' WikiText-2 data is described.
    assert set(shared) <= {"README.md", os.path.join("docs", "DESIGN.md"), os.path.join("docs", "BENCHMARKS.md")}, (
        shared
    )
