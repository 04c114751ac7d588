"""
Private names of Twisted, pyOpenSSL and cryptography are used in one module
only, ``proxy/relay/_fast.py``, where each is probed at start-up. Every other
module may reach a ``_name`` attribute only when ``proxy`` defines that name
itself (its own objects' attributes), and imports nothing private from those
libraries.
"""

from __future__ import annotations

import ast
import pathlib

import proxy

ROOT = pathlib.Path(proxy.__file__).parent
OWNER = ROOT / "relay" / "_fast.py"
LIBRARIES = ("twisted", "OpenSSL", "cryptography")
# Private names of other libraries, outside the rule: os._exit is documented
# (exit without cleanup); txredisapi's connection handler keeps its factory
# (and so its connection pool) in _factory and offers no public accessor.
ALLOWED = {"_exit", "_factory"}


def _isPrivate(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _modules() -> list[tuple[pathlib.Path, ast.Module]]:
    return [(p, ast.parse(p.read_text(), str(p))) for p in sorted(ROOT.rglob("*.py"))]


def _ownNames(modules: list[tuple[pathlib.Path, ast.Module]]) -> set[str]:
    """Every private name proxy defines: functions, classes, attributes it
    assigns (outside _fast.py, whose stores into library objects are not ours)."""
    names: set[str] = set()
    for path, tree in modules:
        if path == OWNER:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                # setattr(obj, "_name", ...)
                if node.func.id == "setattr" and len(node.args) > 1:
                    arg = node.args[1]
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        names.add(arg.value)
    return {n for n in names if _isPrivate(n)}


def _privateUses(tree: ast.Module) -> list[tuple[int, str]]:
    uses: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] in LIBRARIES and (
                any(_isPrivate(p) for p in parts) or any(_isPrivate(a.name) for a in node.names)
            ):
                uses.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] in LIBRARIES and any(_isPrivate(p) for p in parts):
                    uses.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.Attribute) and _isPrivate(node.attr):
            uses.append((node.lineno, node.attr))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _isPrivate(node.args[1].value)
        ):
            uses.append((node.lineno, node.args[1].value))
    return uses


def test_private_library_names_live_in_one_module() -> None:
    modules = _modules()
    own = _ownNames(modules)
    found = []
    for path, tree in modules:
        if path == OWNER:
            continue
        for line, name in _privateUses(tree):
            if name.startswith(("from ", "import ")) or (name not in own and name not in ALLOWED):
                found.append(f"{path.relative_to(ROOT.parent)}:{line}: {name}")
    where = "\n".join(found)
    assert found == [], f"private names of other libraries outside relay/_fast.py:\n{where}"


def test_the_scan_finds_what_it_looks_for() -> None:
    """The check above can fail: a private Twisted access and import are found."""
    tree = ast.parse(
        "from twisted.internet._sslverify import x\n"
        "import twisted.internet._glibbase\n"
        "def f(t):\n"
        "    t.transport._tlsConnection.send(b'')\n"
        "    getattr(t, '_writeDisconnected')\n"
    )
    uses = _privateUses(tree)
    own = _ownNames(_modules())
    assert (1, "from twisted.internet._sslverify import ...") in uses
    assert (2, "import twisted.internet._glibbase") in uses
    assert "_tlsConnection" not in own and (4, "_tlsConnection") in uses
    assert "_writeDisconnected" not in own and (5, "_writeDisconnected") in uses
    # and _fast.py itself does use private names (else OWNER is stale)
    assert _privateUses(ast.parse(OWNER.read_text())) != []
