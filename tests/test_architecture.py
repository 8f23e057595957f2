"""The import map of stereo/ and jobs/ (read with `ast`, lazy imports inside functions included): no module imports
itself back through others, and every import goes down the layers of docs/architecture.md, save the few named and
explained there."""

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Bottom first. A module belongs to the layer of its package; commands (`cli`, `*_cli`, the root-level tools) and
# jobs/ are the top layer whatever their package.
LAYERS = (
    ("stereo", "stereo.config", "stereo.progress", "stereo.exitcodes", "stereo.pictures"),
    ("stereo.model", "stereo.data"),
    ("stereo.plan",),
    ("stereo.train",),
    ("stereo.eval", "stereo.deploy"),
    ("stereo.sweep",),
)
TOP = len(LAYERS)
ROOT_COMMANDS = ("stereo.__main__", "stereo.cli", "stereo.compare_cli", "stereo.infer", "stereo.bench",
                 "stereo.gpu_check")
# (importer, imported): each is named and explained in docs/architecture.md ("Upward imports that stay").
ALLOWED_UPWARD = {
    ("stereo.config.schema", "stereo.plan.gpus"),
    ("stereo.plan.simulate", "stereo.train.loss"),
    ("stereo.train.validation", "stereo.eval.runner"),
}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted([*REPO.glob("stereo/**/*.py"), *REPO.glob("jobs/**/*.py")]):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def import_map() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package's __init__ stands for `from package import name`)."""
    known = modules()
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        edges[name] = {t for t in targets if t in known and t != name}
    return edges


def layer(name: str) -> int:
    last = name.rpartition(".")[2]
    if name.startswith("jobs") or name in ROOT_COMMANDS or last == "cli" or last.endswith("_cli"):
        return TOP
    best = max((prefix for level in LAYERS for prefix in level if name == prefix or name.startswith(prefix + ".")),
               key=len)
    return next(index for index, level in enumerate(LAYERS) if best in level)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def upward(edges: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, targets in edges.items() for b in targets if layer(b) > layer(a)}


def test_no_import_circles():
    assert cycles(import_map()) == []


def test_imports_go_down_the_layers():
    assert upward(import_map()) - ALLOWED_UPWARD == set()


def test_every_allowed_upward_import_exists_and_is_documented():
    assert ALLOWED_UPWARD <= upward(import_map())  # a fixed one leaves the list
    doc = (REPO / "docs" / "architecture.md").read_text()
    section = doc.split("## Upward imports that stay", 1)[1].split("\n## ", 1)[0]
    for importer, imported in ALLOWED_UPWARD:
        assert re.search(rf"`{re.escape(importer)}`[^\n]*`{re.escape(imported)}`", section), (importer, imported)


def test_the_check_sees_circles_and_upward_imports():
    """The checks themselves: a made-up circle and a made-up upward import are found."""
    edges = {"stereo.train.a": {"stereo.train.b"}, "stereo.train.b": {"stereo.train.a", "stereo.eval.metrics"},
             "stereo.eval.metrics": set()}
    assert cycles(edges) == [["stereo.train.a", "stereo.train.b"]]
    assert upward(edges) == {("stereo.train.b", "stereo.eval.metrics")}
    assert layer("stereo.eval.cli") == TOP and layer("jobs.submit") == TOP and layer("stereo.pictures") == 0


def test_every_module_has_a_layer():
    for name in modules():
        assert 0 <= layer(name) <= TOP, name
