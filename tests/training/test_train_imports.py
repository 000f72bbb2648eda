"""The training package's module graph: no import cycles, also through imports inside functions."""
import ast
from pathlib import Path

from lvd_train_testutils import REPO


def _imports(path: Path, module: str) -> set[str]:
    """The ``training.*`` modules ``path`` imports anywhere in its body (absolute names)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}  # `from . import high_res` imports a module
    return {m for m in out if m.startswith("training")}


def test_training_modules_import_no_cycle():
    root = REPO / "training"
    graph = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[module] = path
    edges = {m: sorted(_imports(p, m) & graph.keys()) for m, p in graph.items()}
    assert "training.checkpoint" in edges["training.distill"]  # the walk sees imports inside functions

    cycles, done = [], set()

    def visit(m, stack):
        if m in stack:
            cycles.append(" -> ".join(stack[stack.index(m):] + [m]))
            return
        if m in done:
            return
        for d in edges[m]:
            visit(d, stack + [m])
        done.add(m)

    for m in sorted(edges):
        visit(m, [])
    assert not cycles, cycles
