"""The package's import graph, read from the source with ``ast``: no cycles, and the tracer's own layering.

Edges: every ``import`` / ``from … import`` in a module under ``dexar/``, at module level or inside a
function (a lazy import still ties the two modules together), except under ``if TYPE_CHECKING:``
(never executed). ``from P import name`` is an edge to ``P.name`` when that is a module, else to ``P``;
the parent packages Python initialises on the way are not edges (as in pydeps or import-linter).
"""

from __future__ import annotations

import ast
import graphlib
import sys
from pathlib import Path

import pytest

from dexar.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def _modules(root: Path, package: str) -> dict[str, Path]:
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if _type_checking_only(node):
            stack.extend(node.orelse)  # only the ``else`` branch runs
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph(root: Path = ROOT, package: str = "dexar") -> dict[str, set[str]]:
    """Module → the modules of ``package`` (a folder under ``root``) it imports."""
    modules = _modules(root, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the package ``level - 1`` above this module's own
                    anchor = here[: len(here) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def test_the_reader_sees_lazy_relative_and_type_only_imports(tmp_path):
    """The graph reader itself: a lazy import is an edge, a ``TYPE_CHECKING`` one is not, relative ones resolve."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from . import b\n")
    (package / "a.py").write_text("def f():\n    from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\nelse:\n    from ..c import X\n"
    )
    (package / "c.py").write_text("X = 1\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph == {
        "pkg": set(),
        "pkg.sub": {"pkg.sub.b"},
        "pkg.a": {"pkg.sub.b"},
        "pkg.sub.b": {"pkg.c"},
        "pkg.c": set(),
    }
    (package / "c.py").write_text("import pkg.a\n")
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter(import_graph(tmp_path, "pkg")).prepare()


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert "dexar.trace.decoder" in graph and graph["dexar.trace.decoder"]  # the reader found the package
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        pytest.fail(f"import cycle: {' -> '.join(err.args[1])}")


def test_the_tracer_knows_no_methods_and_its_runners_not_each_other():
    """Methods declare needs; the tracer imports no method and holds no method name; decoder and cross are apart."""
    graph = import_graph()
    names = set(METHODS)
    for path in sorted((ROOT / "dexar" / "trace").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not strings & names, f"{path.name} names methods {sorted(strings & names)}"
    trace = {name: deps for name, deps in graph.items() if name.startswith("dexar.trace")}
    assert {"dexar.trace", "dexar.trace.decoder", "dexar.trace.cross", "dexar.trace.plan"} <= set(trace)
    for name, deps in trace.items():
        assert not any(dep.startswith("dexar.methods") for dep in deps), f"{name} imports a method"
    assert "dexar.trace.cross" not in graph["dexar.trace.decoder"]
    assert "dexar.trace.decoder" not in graph["dexar.trace.cross"]
    shared = {name for name in trace if name not in ("dexar.trace", "dexar.trace.decoder", "dexar.trace.cross")}
    for name in shared:  # the shared modules import neither runner
        assert not {"dexar.trace", "dexar.trace.decoder", "dexar.trace.cross"} & graph[name], name


# The library (everything under dexar/ but the pipeline) runs without Lightning and without the experiment packages.
FORBIDDEN_IN_LIBRARY = ("lightning", "pytorch_lightning", "callbacks", "datamodules", "metrics", "train_eval")


def imported_names(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports (lazy ones included, ``TYPE_CHECKING`` ones not)."""
    names = set()
    for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif not node.level and node.module:
            names.add(node.module)
    return names


def layering_violations(root: Path = ROOT) -> list[str]:
    """``module imports name`` for each forbidden edge: library → pipeline/experiment packages, testing → pipeline."""
    found = []
    for name, path in _modules(root, "dexar").items():
        if name == "dexar.pipeline" or name.startswith("dexar.pipeline."):
            continue
        banned = FORBIDDEN_IN_LIBRARY + ("dexar.pipeline",)
        for imported in sorted(imported_names(path)):
            if any(imported == b or imported.startswith(b + ".") for b in banned):
                found.append(f"{name} imports {imported}")
    return found


def test_the_layering_reader_catches_a_forbidden_import(tmp_path):
    """The rule itself: a lazy ``lightning`` import in the library and a testing → pipeline edge are both caught."""
    (tmp_path / "dexar" / "testing").mkdir(parents=True)
    (tmp_path / "dexar" / "pipeline").mkdir()
    (tmp_path / "dexar" / "explain.py").write_text("def f():\n    import lightning.pytorch as pl\n")
    (tmp_path / "dexar" / "testing" / "kit.py").write_text("from dexar.pipeline.module import ExplainerModule\n")
    (tmp_path / "dexar" / "pipeline" / "module.py").write_text("import lightning\nimport datamodules.common\n")
    (tmp_path / "dexar" / "typed.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from callbacks import Timing\n"
    )
    assert layering_violations(tmp_path) == [
        "dexar.explain imports lightning.pytorch",
        "dexar.testing.kit imports dexar.pipeline.module",
    ]


def test_the_library_never_imports_the_pipeline():
    """dexar/ minus dexar/pipeline/ (dexar/testing/ included) imports no Lightning, callbacks, datamodules,
    metrics, train_eval or dexar.pipeline: ``import dexar`` works without the experiment stack."""
    assert layering_violations() == []


def test_the_library_imports_with_lightning_blocked():
    """The static rule, run: every library module imports in a fresh interpreter where ``lightning`` cannot load."""
    import subprocess
    import sys

    modules = sorted(n for n in _modules(ROOT, "dexar") if not n.startswith("dexar.pipeline"))
    code = (
        "import importlib, sys\n"
        "for banned in ('lightning', 'pytorch_lightning', 'callbacks', 'datamodules', 'train_eval'):\n"
        "    sys.modules[banned] = None\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "assert 'lightning' not in sys.modules or sys.modules['lightning'] is None\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_shapes_dataset_imports_the_shapes_vocabulary_a_leaf():
    """``datamodules/shapes.py`` takes the Shapes language from ``dexar.shapes.vocabulary``, which imports the
    standard library only (no torch, no transformers, no model), and not from the model or its tokenizer."""
    vocabulary = imported_names(ROOT / "dexar" / "shapes" / "vocabulary.py")
    assert vocabulary and all(name.split(".")[0] in sys.stdlib_module_names for name in vocabulary), vocabulary
    dataset = imported_names(ROOT / "datamodules" / "shapes.py")
    assert "dexar.shapes.vocabulary" in dataset
    assert not dataset & {"dexar.shapes.model", "dexar.shapes.tokenizer", "transformers", "tokenizers"}, dataset
