"""Read from the package source with ``ast``: every ``raise`` raises a class of saebridge's
error hierarchy, and every handler that turns a caught error into a new one chains it
(``raise ... from err``); at the file boundaries (loaders, savers, the activation cache) it
also names the file and puts the cause into the message."""

from __future__ import annotations

import ast
import builtins
import functools
import importlib
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from saebridge.errors import SAEBridgeError

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (("saebridge", "saebridge"), ("adapters", "saebridge.adapters"))

ALLOWED = {
    ("saebridge.__main__", "SystemExit"): "the command line's exit status",
    ("saebridge.trace", "_Aborted"): "a BaseException that unwinds the traced forward's own "
                                     "thread; it never leaves the package",
    ("saebridge.stop", "_StopForward"): "ends a forward at stop_at_layer; stop.run catches it",
}
"""Raises of classes outside the hierarchy, each with the reason it is one."""
PROTOCOL = {"__getattr__": AttributeError}
"""Python's own protocols: ``__getattr__`` signals a missing attribute by AttributeError."""

BOUNDARIES = ("saebridge.formats", "saebridge.cache", "saebridge.sae.files")
"""Modules whose handlers wrap errors from reading or writing files."""
PATH_WORDS = ("path", "file", "folder", "source", "out")


@dataclass
class RaiseSite:
    module: str
    path: Path
    node: ast.Raise
    handler: ast.ExceptHandler | None
    """The innermost ``except`` clause the raise sits in (not across a function boundary)."""
    function: str
    """The function the raise is in ("" at module level)."""

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.node.lineno}"


def _sources() -> Iterator[tuple[str, Path]]:
    for folder, package in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts
                     if p != "__init__"]
            yield ".".join([package, *parts]), path


def _raises(node: ast.AST, module: str, path: Path, handler: ast.ExceptHandler | None = None,
            function: str = "") -> Iterator[RaiseSite]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Raise):
            yield RaiseSite(module, path, child, handler, function)
        inner, name = handler, function
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            inner, name = None, getattr(child, "name", function)
        elif isinstance(child, ast.ExceptHandler):
            inner = child
        yield from _raises(child, module, path, inner, name)


RAISES = [site for module, path in _sources()
          for site in _raises(ast.parse(path.read_text(encoding="utf-8")), module, path)]


def _lookup(expr: ast.expr, namespace: dict[str, typing.Any]) -> typing.Any:
    """The object ``expr`` names in a module (None for a local variable)."""
    if isinstance(expr, ast.Name):
        if expr.id in namespace:
            return namespace[expr.id]
        return getattr(builtins, expr.id, None)
    if isinstance(expr, ast.Attribute):
        base = _lookup(expr.value, namespace)
        return getattr(base, expr.attr, None) if base is not None else None
    return None


@functools.cache
def _namespace(module: str, path: Path) -> dict[str, typing.Any]:
    """The module's globals, plus every name it imports inside a function (deferred)."""
    namespace = dict(vars(importlib.import_module(module)))
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            source = importlib.import_module(node.module)
            for alias in node.names:
                if hasattr(source, alias.name):
                    namespace.setdefault(alias.asname or alias.name, getattr(source, alias.name))
    return namespace


def _raised_class(site: RaiseSite) -> tuple[str, type | None]:
    """``(what, class)`` a raise raises: the class itself, the class a helper returns (by
    its annotation), or None for a re-raise of a caught exception held in a variable."""
    exc = site.node.exc
    assert exc is not None
    target = exc.func if isinstance(exc, ast.Call) else exc
    what = ast.unparse(target)
    if (site.module, what) in ALLOWED:  # checked by name: saebridge.__main__ runs on import
        return what, None
    found = _lookup(target, _namespace(site.module, site.path))
    if isinstance(found, type):
        return what, found
    if callable(found):  # a helper building the error: its return annotation says which
        hints = typing.get_type_hints(found)
        assert "return" in hints, f"{site.where()}: {what}() builds the raised error but has " \
                                  "no return annotation naming its class"
        return what, hints["return"]
    return what, None


def test_the_source_was_read():
    assert len(RAISES) > 150
    assert {s.module for s in RAISES} >= {"saebridge.formats.saelens", "saebridge.cache",
                                          "saebridge.kernel.indexing", "saebridge.trace"}


@pytest.mark.parametrize("site", [s for s in RAISES if s.node.exc is not None],
                         ids=lambda s: s.where())
def test_every_raise_is_a_saebridge_error(site: RaiseSite):
    what, cls = _raised_class(site)
    if (site.module, what) in ALLOWED:
        return
    if cls is None:
        # A variable: must be the exception a handler caught (or one handed on from the
        # traced forward's thread), never a freshly built builtin.
        assert not isinstance(site.node.exc, ast.Call), f"{site.where()}: raise {what}(...)"
        return
    if PROTOCOL.get(site.function) is cls:
        return
    assert issubclass(cls, SAEBridgeError), (
        f"{site.where()} raises {cls.__name__}, which is not a saebridge error: raise a class "
        "of saebridge.errors (each is also the natural builtin).")


def _names(expr: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(expr) if isinstance(n, ast.Name)} | \
        {n.attr for n in ast.walk(expr) if isinstance(n, ast.Attribute)}


WRAPPERS = [s for s in RAISES if s.handler is not None and isinstance(s.node.exc, ast.Call)]


def test_there_are_wrappers_to_check():
    assert len([s for s in WRAPPERS if s.module.startswith(BOUNDARIES)]) >= 15


@pytest.mark.parametrize("site", WRAPPERS, ids=lambda s: s.where())
def test_a_wrapped_error_chains_its_cause(site: RaiseSite):
    handler = site.handler
    assert handler is not None and handler.name, (
        f"{site.where()}: an except clause that raises a new error must bind the caught one "
        "(`except X as err:`) and chain it")
    cause = site.node.cause
    assert isinstance(cause, ast.Name) and cause.id == handler.name, (
        f"{site.where()}: raise ... from {handler.name} (the cause stays in the traceback)")
    if not site.module.startswith(BOUNDARIES):
        return
    names = _names(site.node.exc)
    assert handler.name in names, (
        f"{site.where()}: the message of an error wrapped at a file boundary must say the "
        f"cause ({{{handler.name}}})")
    assert any(word in name.lower() for name in names for word in PATH_WORDS), (
        f"{site.where()}: the message of an error wrapped at a file boundary must name the "
        "file")
