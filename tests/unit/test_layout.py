"""The tree keeps its shape: no import cycles among hvkit's modules (at
import time; imports inside functions and under TYPE_CHECKING are the
sanctioned way to reach back), and device models never import KVM."""
import ast
import pathlib

import hvkit

ROOT = pathlib.Path(hvkit.__file__).parent


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def top_level_imports(path: pathlib.Path, deferred: bool = False) -> set[str]:
    """Imports run when the module is imported; with ``deferred``, also
    those inside functions (run later, but still a dependency)."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names)
            elif deferred and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                ast.ClassDef, ast.With, ast.For, ast.While)):
                visit(node.body)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
    visit(tree.body)
    return out


def graph(deferred: bool = False) -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    g: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = {d for d in top_level_imports(path, deferred) if d in modules}
        # importing a.b.c runs a/__init__ and a/b/__init__ first
        for d in list(deps):
            parts = d.split(".")
            deps.update(".".join(parts[:i]) for i in range(1, len(parts))
                        if ".".join(parts[:i]) in modules)
        deps.discard(name)
        g[name] = deps
    return g


def cycles_of(g: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def dfs(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(g.get(n, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                dfs(d)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            dfs(n)
    # a package importing its own submodules is how packages work
    return [c for c in cycles if not all(x.startswith(c[0] + ".") or x == c[0] for x in c)]


def test_no_import_cycles():
    real = cycles_of(graph())
    assert not real, "import cycles:\n" + "\n".join(" -> ".join(c) for c in real)


def test_no_cycles_through_deferred_imports():
    # An import inside a function that reaches back to its importer is a
    # cycle too, only hidden until the function runs.
    real = cycles_of(graph(deferred=True))
    assert not real, "import cycles:\n" + "\n".join(" -> ".join(c) for c in real)


def test_device_models_know_nothing_of_kvm():
    g = graph()
    bad = {m: sorted(d for d in deps if d.startswith(("hvkit.kvm", "hvkit._native",
                                                       "hvkit.machine", "hvkit.vmm.runtime")))
           for m, deps in g.items() if m.startswith("hvkit.devices")}
    assert not {m: d for m, d in bad.items() if d}
