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


# Files of a family folder that `save_pretrained` never ships: the package init (the family's spec), the converters
# of original checkpoints and the stage-1 objectives (training code). They may import the rest of the package.
NOT_SHIPPED = ("__init__", "convert_", "losses_")


def test_family_folders_ship_only_single_dot_imports():
    """`save_pretrained` copies a family's modeling/config/processing files and their `from .x` imports into one
    flat directory; `from ..x` or an in-house absolute import would break `trust_remote_code` loading."""
    bad = []
    for folder in (ROOT / "modeling_spn4cir").iterdir():
        if not list(folder.glob("modeling_*.py")):  # not a family folder (e.g. storage/)
            continue
        for path in folder.glob("*.py"):
            if path.name.startswith(NOT_SHIPPED):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.level > 1 or (node.level == 0 and node.module and
                                                                            node.module.split(".")[0] in LAYERS)):
                    bad.append(f"{path.relative_to(ROOT)}: from {'.' * node.level}{node.module or ''}")
    assert not bad, bad


def test_the_packages_hold_no_symlink():
    """A checkout without symlinks (Windows, a zip download) must work: shared files are copies, not links."""
    links = [p.relative_to(ROOT) for layer in [*LAYERS, "examples"] for p in (ROOT / layer).rglob("*") if p.is_symlink()]
    assert not links, links


# ----------------------------------------------------------------------------------- family knowledge
def _named_families(path: Path, families: tuple[str, ...]) -> set[str]:
    """The families a module names in code: identifiers and string constants (docstrings aside), compared without
    case and hyphens (`TG-CIR` names `tgcir`)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    words = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.append(node.value)
        elif isinstance(node, ast.Name):
            words.append(node.id)
        elif isinstance(node, ast.Attribute):
            words.append(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            words.append(node.name)
        elif isinstance(node, ast.alias):
            words += [node.name, node.asname or ""]
        elif isinstance(node, ast.arg):
            words.append(node.arg)
    text = " ".join(words).lower().replace("-", "")
    return {family for family in families if family in text}


def test_family_knowledge_lives_in_the_family_folders():
    """What a family is lives in its folder's spec; outside the family folders, at most two modules name three or
    more families in code: the registration lines (`modeling_spn4cir/__init__.py`) and one more."""
    import modeling_spn4cir.families as registry

    families = tuple(registry.FAMILIES)
    assert len(families) >= 4
    naming = {}
    for layer in [*LAYERS, "examples"]:
        for path in (ROOT / layer).rglob("*.py"):
            relative = path.relative_to(ROOT)
            if layer == "modeling_spn4cir" and len(relative.parts) > 2 and relative.parts[1] in families:
                continue
            named = _named_families(path, families)
            if len(named) >= 3:
                naming[relative.as_posix()] = sorted(named)
    assert "modeling_spn4cir/__init__.py" in naming  # the counter sees the registration lines
    assert len(naming) <= 2, naming


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 80


def test_modules_and_functions_stay_short():
    """No module of the packages or the examples is over 450 lines and no function over 80: a module that grows
    past it holds more than one concept, a function past it more than one job (split them)."""
    long_modules, long_functions = [], []
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            source = path.read_text()
            relative = path.relative_to(ROOT).as_posix()
            if len(source.splitlines()) > MAX_MODULE_LINES:
                long_modules.append(f"{relative}: {len(source.splitlines())} lines")
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        long_functions.append(f"{relative}:{node.lineno} {node.name}: {length} lines")
    assert not long_modules, long_modules
    assert not long_functions, long_functions
