"""The import graph of leaml_ray is a DAG, between modules and between packages (imports inside functions count)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "leaml_ray"


def import_graph() -> dict[str, set[str]]:
    """Module -> the leaml_ray modules it imports."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, or None."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [node, nxt] if nxt in path else [node, nxt]
            if not state.get(nxt) and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if not state.get(node) and (found := visit(node, [])):
            return found
    return None


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_modules_and_packages_import_each_other_without_cycles():
    graph = import_graph()
    assert {"leaml_ray.zoo", "leaml_ray.models.chat", "leaml_ray.stages.generator"} <= set(graph)
    assert "leaml_ray.formats" in graph["leaml_ray.data.examples"]  # the walker sees real edges
    assert cycle(graph) is None, cycle(graph)
    packages: dict[str, set[str]] = {}
    for module, imported in graph.items():
        packages.setdefault(package_of(module), set()).update(package_of(m) for m in imported)
    packages = {p: deps - {p} for p, deps in packages.items()}
    assert cycle(packages) is None, cycle(packages)
    assert graph["leaml_ray.formats"] == set()  # the bottom module every layer may import


def test_the_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
