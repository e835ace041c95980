"""Imports go one way — modeling_spn4cir <- datasets_scripts <- trainers <- examples (which may import every layer;
no package imports an example) — with no cycle between or inside the packages, and every family folder is
self-contained (what `save_pretrained` ships must import alone)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["modeling_spn4cir", "datasets_scripts", "trainers", "examples"]  # bottom to top


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """In-house modules imported at module level or inside functions (absolute names)."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return {m for m in found if m.split(".")[0] in LAYERS}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules} - {name} for name, path in modules.items()}


def test_imports_only_go_down_the_layers():
    upward = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if LAYERS.index(target.split(".")[0]) > LAYERS.index(module.split(".")[0])
    ]
    assert not upward, upward


def test_no_import_cycle():
    graph = _graph()
    # A package's __init__ re-exporting its own submodules is not a cycle of logic: drop package -> child edges.
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target] if target in stack else [node, target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_family_folders_ship_only_single_dot_imports():
    """`save_pretrained` copies a family's modeling/config/processing files and their `from .x` imports into one
    flat directory; `from ..x` or an in-house absolute import would break `trust_remote_code` loading."""
    bad = []
    for folder in (ROOT / "modeling_spn4cir").iterdir():
        if not list(folder.glob("modeling_*.py")):  # not a family folder (e.g. storage/)
            continue
        for path in folder.glob("*.py"):
            if path.name.startswith(("convert_", "__init__")):
                continue  # converters and the package init are not shipped with checkpoints
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.level > 1 or (node.level == 0 and node.module and
                                                                            node.module.split(".")[0] in LAYERS)):
                    bad.append(f"{path.relative_to(ROOT)}: from {'.' * node.level}{node.module or ''}")
        assert (folder / "cir_contract.py").resolve() == (ROOT / "modeling_spn4cir" / "cir_contract.py").resolve(), folder
    assert not bad, bad
