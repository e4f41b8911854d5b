"""The package's shape: layers without import cycles, a core that imports no backend, small
modules and functions, and a torch-only kernel.

Read from the source with ``ast`` (nothing is imported), counting every import: top-level,
deferred inside functions and under ``TYPE_CHECKING``. ``from saebridge import X`` is an
edge to the package root (``saebridge/__init__.py``), ``from saebridge.sae import SAE`` one
to ``saebridge/sae/__init__.py``: import from the module that defines what you need. The
rules are those of the project's ``structure.py`` tool, copied here so CI needs nothing else.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROOTS = (("saebridge", "saebridge"), ("adapters", "saebridge.adapters"))
"""Source folder → the package it installs as (``adapters/`` is ``saebridge.adapters``)."""
BACKENDS = ("transformers", "transformer_lens", "nnsight")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
KERNEL = "saebridge.kernel"
KERNEL_MAY_IMPORT = ("torch", KERNEL, "saebridge.errors")
"""Besides the standard library."""


@dataclass
class Module:
    name: str
    path: Path
    lines: int
    imports: list[tuple[str, bool]] = field(default_factory=list)
    """Every imported name (``pkg.mod`` and ``pkg.mod.attr`` for a from-import), and
    whether it runs at import time (a statement of the module body)."""
    statements: list[str] = field(default_factory=list)
    """The module each import statement names (``from saebridge import X``: ``saebridge``)."""
    functions: list[tuple[str, int]] = field(default_factory=list)
    """(name, lines) of every function and method, nested ones included."""


def _modules() -> dict[str, Module]:
    mods: dict[str, Module] = {}
    for base, pkg in ROOTS:
        for path in sorted((ROOT / base).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / base).with_suffix("").parts
                     if p != "__init__"]
            name = ".".join([pkg, *parts])
            text = path.read_text(encoding="utf-8")
            mods[name] = _read(name, path, text)
    return mods


def _read(name: str, path: Path, text: str) -> Module:
    tree = ast.parse(text)
    module = Module(name, path, len(text.splitlines()))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            module.imports += [(a.name, id(node) in top) for a in node.names]
            module.statements += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            mod = ".".join(x for x in (base, node.module or "") if x)
            names = [f"{mod}.{a.name}" for a in node.names] + [mod]
            module.imports += [(n, id(node) in top) for n in names]
            module.statements.append(mod)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno is not None
            module.functions.append((node.name, node.end_lineno - node.lineno + 1))
    return module


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module an imported name lives in (its longest prefix that is one of ours)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for m, module in MODULES.items():
        for name, _ in module.imports:
            target = _resolve(name)
            if target and target != m:
                edges[m].add(target)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), less a package
    that only re-exports its own child (``pkg <-> pkg.child``)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            comp.sort()
            if len(comp) > 2 or (len(comp) == 2 and not comp[1].startswith(comp[0] + ".")):
                found.append(comp)

    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old_limit, 10000))
    try:
        for v in edges:
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(old_limit)
    return found


def _is_core(name: str) -> bool:
    return name.startswith("saebridge.") and not name.startswith("saebridge.adapters")


def _witnesses(comp: list[str], edges: dict[str, set[str]]) -> str:
    """The edges inside a cycle, so the message says which imports to change."""
    inside = set(comp)
    return "; ".join(f"{a} -> {b}" for a in comp for b in sorted(edges[a] & inside))


def _report(offenders: list[str]) -> str:
    return "\n  " + "\n  ".join(offenders)


def test_sources_are_found():
    assert "saebridge" in MODULES and "saebridge.backends" in MODULES
    assert any(m.startswith("saebridge.adapters.") for m in MODULES)


def test_no_import_cycles():
    edges = _edges()
    cycles = _cycles(edges)
    offenders = [f"{' <-> '.join(c)}  (edges: {_witnesses(c, edges)})" for c in cycles]
    assert not offenders, ("import cycles (count every import, deferred ones too; import "
                           "from the defining module, not a package):" + _report(offenders))


def test_core_imports_no_backend_at_import_time():
    offenders = sorted({f"{m} imports {name}" for m, module in MODULES.items() if _is_core(m)
                        for name, at_top in module.imports
                        if at_top and name.split(".")[0] in BACKENDS})
    assert not offenders, ("core modules importing a backend package at import time (defer "
                           "it into the function, or move it to adapters/):" + _report(offenders))


def test_core_never_imports_the_adapters():
    offenders = sorted({f"{m} imports {name}" for m, module in MODULES.items() if _is_core(m)
                        for name, _ in module.imports
                        if name == "saebridge.adapters" or name.startswith("saebridge.adapters.")})
    assert not offenders, ("core modules importing saebridge.adapters (reach adapters through "
                           "saebridge.backends.entry):" + _report(offenders))


def test_nothing_inside_imports_the_package_root():
    offenders = sorted({f"{m} imports from saebridge" for m, module in MODULES.items()
                        if m != "saebridge" and "saebridge" in module.statements})
    assert not offenders, ("modules importing the package root saebridge/__init__.py (import "
                           "from the defining module):" + _report(offenders))


def test_modules_are_small():
    offenders = [f"{m}: {module.lines} lines ({module.path.relative_to(ROOT)})"
                 for m, module in MODULES.items() if module.lines > MAX_MODULE_LINES]
    assert not offenders, f"modules over {MAX_MODULE_LINES} lines:" + _report(offenders)


def test_functions_are_short():
    offenders = [f"{m}.{fn}: {size} lines" for m, module in MODULES.items()
                 for fn, size in module.functions if size > MAX_FUNCTION_LINES]
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines:" + _report(offenders)


def _kernel_may_import(name: str) -> bool:
    top = name.split(".")[0]
    if top in sys.stdlib_module_names or top == "__future__":
        return True
    return any(name == ok or name.startswith(ok + ".") for ok in KERNEL_MAY_IMPORT)


def test_kernel_imports_only_torch_and_the_standard_library():
    offenders = sorted({f"{m} imports {name}" for m, module in MODULES.items()
                        if m == KERNEL or m.startswith(KERNEL + ".")
                        for name, _ in module.imports if not _kernel_may_import(name)})
    assert not offenders, ("saebridge.kernel may import only torch, the standard library, "
                           "saebridge.kernel and saebridge.errors:" + _report(offenders))
