"""Dependencies point one way: train -> jax_packmamba -> pallas_kernels.

The import graph is read from the source (every `import` statement, also those inside functions,
which run later but are dependencies all the same), so an upward import fails here even when no
test happens to execute it.
"""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAYERS = ("pallas_kernels", "jax_packmamba", "train")  # each may import only those before it


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for layer in LAYERS for p in sorted((REPO / layer).rglob("*.py"))}


def imports_of(path: pathlib.Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports (the deepest known module each statement names)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one.
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target:
                found.add(target)
                break
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, name, known) - {name} for name, path in mods.items()}


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def test_the_graph_sees_imports_inside_functions():
    # A lazy import, as jax_packmamba.ops.selective_scan makes of the kernels, is an edge too.
    assert "pallas_kernels.selective_scan" in graph()["jax_packmamba.ops.selective_scan"]


def test_no_module_imports_a_higher_layer():
    upward = sorted(
        f"{src} imports {dst}"
        for src, dsts in graph().items()
        for dst in dsts
        if layer(dst) > layer(src)
    )
    assert not upward, (
        "dependencies must point train -> jax_packmamba -> pallas_kernels:\n" + "\n".join(upward)
    )


@pytest.mark.parametrize("top", LAYERS)
def test_no_import_cycles(top):
    g = {
        m: {d for d in ds if d.split(".")[0] == top}
        for m, ds in graph().items()
        if m.split(".")[0] == top
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycle = path[path.index(d) :] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
