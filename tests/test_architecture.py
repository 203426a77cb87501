"""The layering rules of docs/design.md section 1, read from the source with ``ast``: imports point
down the layers (dk_ops <- erf_lab <- analyses <- figures <- cli), no private name is imported
from another package, no module imports itself back through others, and functions stay short.

Imports under ``if TYPE_CHECKING:`` are left out: they never run, they only name types."""
import ast
import collections
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("dk_ops", "erf_lab", "analyses", "figures", "cli")  # each may import only those before it
MAX_LINES = 100
# Functions allowed past MAX_LINES, at most this long (lower a number, never raise it), each with why.
LONG_FUNCTIONS: Dict[str, int] = {
    # One Triton program (@triton.jit): splitting it into jit helpers changes GPU code that has run only
    # under the interpreter, never on a GPU; it stays whole until a GPU run can check a split.
    "dk_ops/triton/kernels.py::image_side_kernel": 107,
}


def _modules() -> Dict[str, Tuple[Path, ast.Module]]:
    files = [p for pkg in LAYERS[:-1] for p in (ROOT / pkg).rglob("*.py")] + [ROOT / "cli.py"]
    out = {}
    for p in files:
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = (p, ast.parse(p.read_text(), str(p)))
    return out


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node except the bodies of ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def _imports(name: str, path: Path, tree: ast.Module) -> Iterator[Tuple[str, List[str], int]]:
    """(absolute module, imported names, line) of each import statement that runs."""
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno


MODULES = _modules()


def _edges() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = collections.defaultdict(set)
    for name, (path, tree) in MODULES.items():
        for module, names, _ in _imports(name, path, tree):
            targets = [f"{module}.{n}" if f"{module}.{n}" in MODULES else module for n in names] or [module]
            graph[name].update(t for t in targets if t in MODULES and t != name)
    return graph


def test_imports_point_down_the_layers():
    bad = []
    for name, (path, tree) in MODULES.items():
        mine = LAYERS.index(name.split(".")[0])
        for module, _, line in _imports(name, path, tree):
            top = module.split(".")[0]
            if top in LAYERS and LAYERS.index(top) > mine:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "imports pointing up the layers:\n" + "\n".join(bad)


def test_no_private_name_is_imported_from_another_package():
    bad = []
    for name, (path, tree) in MODULES.items():
        for module, names, line in _imports(name, path, tree):
            top = module.split(".")[0]
            if top not in LAYERS or top == name.split(".")[0]:
                continue
            parts = module.split(".")[1:] + names
            if any(p.startswith("_") and not p.startswith("__") for p in parts):
                bad.append(f"{path.relative_to(ROOT)}:{line} from {module} import {', '.join(names)}")
    assert not bad, "private names used across packages:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = _edges()
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    cycles: List[List[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in list(MODULES):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checks_see_what_they_check():
    # the rules above are only as good as the graph: it must hold the known edges and skip type-only imports
    graph = _edges()
    assert "erf_lab.io" in graph["erf_lab.train"] and "dk_ops.modules" in graph["dk_ops.convert"]
    assert "analyses.report" in graph["analyses.results"]
    assert "analyses.results" not in graph["analyses.report"]  # imported under TYPE_CHECKING only
    assert len(MODULES) > 60


def test_functions_are_short():
    long = {}
    for name, (path, tree) in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long[f"{path.relative_to(ROOT)}::{node.name}"] = n
    over = {k: v for k, v in long.items() if v > LONG_FUNCTIONS.get(k, MAX_LINES)}
    assert not over, f"functions over {MAX_LINES} lines (split them into named steps): {over}"
