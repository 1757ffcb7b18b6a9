"""The shape of the code (docs/DESIGN.md, "Layout"): no import cycle, training and inference apart, small
functions, the design in the repository. Read from the source with ast, so a violation fails here at once."""

from __future__ import annotations

import ast
import os
import re

import pytest

from helpers import ROOT

MLM = os.path.join(ROOT, "mlm")
# Used by training and inference alike, importing nothing else of the project.
NEUTRAL = {"mlm.cli", "mlm.files", "mlm.heads", "mlm.hub", "mlm.text"}
# `python -m mlm.app` / `python -m mlm.export_onnx`: the README's commands, aliases of the inference modules.
ALIASES = {"mlm.app", "mlm.export_onnx"}
MAX_PARAMETERS = 6


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
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
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


def kind(module: str) -> str:
    if module in NEUTRAL:
        return "neutral"
    if module in ALIASES or module == "mlm.inference" or module.startswith("mlm.inference."):
        return "inference"
    if module in ("train_ddp", "predict"):
        return module
    return "training"


def test_no_import_cycles(graph):
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_training_and_inference_import_only_their_side_and_the_neutral_modules(graph):
    allowed = {"neutral": {"neutral"}, "training": {"training", "neutral"}, "inference": {"inference", "neutral"},
               "predict": {"inference", "neutral"}, "train_ddp": {"training", "inference", "neutral"}}
    wrong = [f"{m} ({kind(m)}) imports {n} ({kind(n)})" for m, deps in graph.items() for n in deps
             if kind(n) not in allowed[kind(m)]]
    assert not wrong, "\n".join(wrong)
    assert "mlm.config" not in graph["predict"] and not any("mlm.config" in graph[m] for m in ALIASES)


def test_the_checker_sees_a_cycle_and_a_wrong_direction(tmp_path):
    """Negative control: the walk finds imports inside functions and relative ones."""
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n")
    found = project_imports("mlm.a", str(tmp_path / "a.py"), {"mlm.a", "mlm.b"})
    assert found == {"mlm.b"}
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import g\n")
    assert project_imports("mlm.c", str(tmp_path / "c.py"), {"mlm.c", "mlm.b"}) == set()
    assert kind("mlm.inference.fill_mask") == "inference" and kind("mlm.data") == "training"


def test_no_function_takes_more_than_six_parameters():
    too_many = []
    for module, path in module_files().items():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
                if len(names) > MAX_PARAMETERS:
                    too_many.append(f"{module}.{node.name}: {len(names)} ({', '.join(names)})")
    assert not too_many, "\n".join(too_many)


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
    assert set(shared) <= {"README.md", os.path.join("docs", "DESIGN.md"), os.path.join("docs", "BENCHMARKS.md")}, \
        shared
