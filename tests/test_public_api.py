"""The public surface (docs/design.md sec. 7): every public name imports, the loss
defaults are written once (options.LOSS_DEFAULTS), and the package's import graph
has no cycle (sec. 8)."""
from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

import dft_kernels as dk
from dft_kernels.options import LOSS_DEFAULTS

PACKAGE = Path(dk.__file__).resolve().parent


def test_every_public_name_imports():
    for obj in (dk.dft_loss, dk.fused_linear_dft_loss, dk.DFTLoss, dk.FusedLinearDFTLoss, dk.SparseTargets,
                dk.blend, dk.DFTLossOutput, dk.reference.dft_loss, dk.reference.fused_linear_dft_loss,
                dk.targets.build, dk.targets.inspect, dk.targets.read_shard, dk.targets.read_manifest,
                dk.data.DFTTargetsDataset, dk.distributed.VocabParallel):
        assert callable(obj)
    for name in dk.__all__:
        assert hasattr(dk, name), name
    from dft_kernels.cli import main
    assert callable(main)


def test_hf_names_import():
    pytest.importorskip("transformers")
    for obj in (dk.hf.patch, dk.hf.unpatch, dk.hf.DFTConfig, dk.hf.DFTDataCollator, dk.hf.DFTTrainer):
        assert callable(obj)


def _keyword_defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if k in LOSS_DEFAULTS}


@pytest.mark.parametrize("fn", [dk.dft_loss, dk.fused_linear_dft_loss], ids=["dft_loss", "fused_linear_dft_loss"])
def test_signature_defaults_are_the_loss_defaults(fn):
    assert _keyword_defaults(fn) == LOSS_DEFAULTS


@pytest.mark.parametrize("cls", [dk.DFTLoss, dk.FusedLinearDFTLoss], ids=["DFTLoss", "FusedLinearDFTLoss"])
def test_module_defaults_are_the_loss_defaults(cls):
    kwargs = cls().kwargs
    assert {k: kwargs[k] for k in LOSS_DEFAULTS} == LOSS_DEFAULTS


def test_dftconfig_defaults_are_the_loss_defaults():
    from dft_kernels.hf.config import DFTConfig
    fields = {f.name: f.default for f in dataclasses.fields(DFTConfig) if f.name in LOSS_DEFAULTS}
    assert fields, "DFTConfig has no loss fields"
    assert fields == {k: LOSS_DEFAULTS[k] for k in fields}


def test_no_deterministic_keyword():
    assert "deterministic" not in inspect.signature(dk.fused_linear_dft_loss).parameters
    with pytest.raises(TypeError, match="deterministic"):
        dk.FusedLinearDFTLoss(deterministic=True)
    from dft_kernels.hf.config import DFTConfig
    assert "deterministic" not in {f.name for f in dataclasses.fields(DFTConfig)}


# --------------------------------------------------------------------------- import graph


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _from_module(node: ast.ImportFrom, package: str) -> str:
    """The absolute module of ``from X import ...`` inside ``package`` (relative ones resolved)."""
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (anywhere in the file, lazy imports too)."""
    files = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                mod = _from_module(node, package)
                # `from pkg import submodule` imports pkg.submodule; any other name resolves to pkg below
                targets.update(f"{mod}.{a.name}" for a in node.names)
        edges = set()
        for t in targets:
            while t and t not in files:          # `import a.b.c` / attributes: the nearest package module
                t = t.rpartition(".")[0]
            if not t or t == name:
                continue
            if is_pkg and t.startswith(name + "."):   # a package's __init__ importing its own submodules
                continue
            edges.add(t)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_import_graph_has_no_cycle():
    graph = _import_graph()
    assert "dft_kernels.losses" in graph and "dft_kernels.options" in graph["dft_kernels.losses"]
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# --------------------------------------------------------------------------- layering

#: what the kernels' package may import from the rest of the library: leaf modules only
OPS_MAY_IMPORT = {"dft_kernels.memory", "dft_kernels.validation", "dft_kernels.doctor", "dft_kernels.doctor.cache"}


def _imported_names(path: Path, package: str):
    """(module, name) of every ``from X import name`` in the file (relative ones resolved)."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                yield _from_module(node, package), a.name


def _op_folder(module: str) -> str | None:
    """The op folder (``ops/<folder>/``) a module or name lives in; None for the shared modules."""
    parts = module.split(".")
    if len(parts) > 3 and parts[:2] == ["dft_kernels", "ops"] and (PACKAGE / "ops" / parts[2]).is_dir():
        return parts[2]
    return None


def test_layering():
    """ops imports nothing of losses / hf / targets (only the leaf modules above); targets
    nothing of hf; no private name crosses an op folder (docs/design.md sec. 8)."""
    graph = _import_graph()
    bad = []
    for mod, edges in graph.items():
        for t in edges:
            if mod.startswith("dft_kernels.ops") and not (t.startswith("dft_kernels.ops") or t in OPS_MAY_IMPORT):
                bad.append(f"{mod} -> {t}")
            if mod.startswith("dft_kernels.targets") and t.startswith("dft_kernels.hf"):
                bad.append(f"{mod} -> {t}")
    for path in sorted((PACKAGE / "ops").rglob("*.py")):
        mod = _module_name(path)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for src, name in _imported_names(path, package):
            other = _op_folder(src) or _op_folder(f"{src}.{name}")
            if name.startswith("_") and other is not None and other != _op_folder(mod):
                bad.append(f"{mod} imports the private {src}.{name}")
    assert bad == []


def test_benchmarks_import_no_private_name():
    """The benchmarks use the library's public names only (no ``_module`` or ``_name`` of
    dft_kernels): what they measure is what a user calls."""
    bad = []
    for path in sorted((PACKAGE.parent / "benchmarks").glob("*.py")):
        for src, name in _imported_names(path, "benchmarks"):
            if src.startswith("dft_kernels") and (name.startswith("_") or any(
                    part.startswith("_") for part in src.split(".")[1:])):
                bad.append(f"benchmarks/{path.name} imports {src}.{name}")
    assert bad == []


def test_layering_check_sees_a_violation(tmp_path):
    names = list(_imported_names(Path(__file__), "tests"))
    assert ("dft_kernels.hf.config", "DFTConfig") in names
    assert _op_folder("dft_kernels.ops.linear.triton") == "linear" and _op_folder("dft_kernels.ops._common") is None


# --------------------------------------------------------------------------- docs name every module

def _modules() -> list[Path]:
    return [p.relative_to(PACKAGE) for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts]


def test_readme_and_design_layout_name_every_module():
    """README's "Where things live" names every module (its folder for an op folder's
    files), docs/design.md sec. 8 every file name under its folder."""
    root = PACKAGE.parent
    readme = (root / "README.md").read_text()
    where = readme[readme.index("### Where things live"):readme.index("The design -- the math")]
    design = (root / "docs" / "design.md").read_text()
    layout = design[design.index("## 8. Layout"):design.index("## 9. Style")]
    missing = []
    for rel in _modules():
        path = f"dft_kernels/{rel.as_posix()}"
        # named by its path, or a grouped line names its folder and its file name
        named = path in where or (len(rel.parts) > 1 and f"dft_kernels/{rel.parent.as_posix()}/" in where
                                  and f"`{rel.name}`" in where)
        if not named:
            missing.append(f"README: {path}")
        if rel.name not in layout or (len(rel.parts) > 1 and f"{rel.parts[-2]}/" not in layout):
            missing.append(f"design.md sec. 8: {path}")
    assert missing == [], missing
