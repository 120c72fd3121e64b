"""
The reactor is passed down, never fetched: only where a program starts may
the code import the global reactor, and everything else receives it as a
parameter (so that a test can hand it a MemoryReactorClock instead).
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import tcpgreet

PACKAGE = Path(tcpgreet.__file__).parent

# Where a program starts, as (module path under tcpgreet/, function).
ALLOWED = frozenset({
    ("tap.py", "makeService"),                 # twistd tcpgreet, and its workers
    ("client/__init__.py", "main"),            # tcpgreet-client
    ("workers/__main__.py", "main"),           # a worker process
})


def _imports_the_reactor(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(alias.name == "twisted.internet.reactor" for alias in node.names)
    if isinstance(node, ast.ImportFrom) and node.level == 0:
        if node.module == "twisted.internet.reactor":
            return True
        return node.module == "twisted.internet" and any(
            alias.name == "reactor" for alias in node.names)
    return False


def reactor_imports(source: str) -> list[tuple[int, str | None]]:
    """Each import of the global reactor in C{source}: its line, and the
    function it is in, named as from the module down to the outermost
    function (C{Class.method}; L{None}: outside any function)."""
    found: list[tuple[int, str | None]] = []

    def visit(node: ast.AST, scope: str | None, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _imports_the_reactor(child):
                found.append((child.lineno, scope if in_function else None))
            inner, function = scope, in_function
            if not in_function and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef
                                              | ast.ClassDef):
                inner = child.name if scope is None else f"{scope}.{child.name}"
                function = not isinstance(child, ast.ClassDef)
            visit(child, inner, function)

    visit(ast.parse(source), None, False)
    return found


class ReactorImportTests(SynchronousTestCase):
    def test_only_where_a_program_starts(self):
        misplaced = []
        for path in sorted(PACKAGE.rglob("*.py")):
            module = path.relative_to(PACKAGE).as_posix()
            for line, function in reactor_imports(path.read_text(encoding="utf-8")):
                if (module, function) not in ALLOWED:
                    misplaced.append(f"tcpgreet/{module}:{line} ({function or 'top level'})")
        self.assertEqual(misplaced, [])

    def test_the_scan_finds_every_spelling(self):
        source = (
            "from twisted.internet import reactor\n"
            "import twisted.internet.reactor\n"
            "def f():\n"
            "    from twisted.internet import defer, reactor as clock\n"
            "class C:\n"
            "    def m(self):\n"
            "        from twisted.internet.reactor import callLater\n"
            "from twisted.internet import defer\n"
        )
        self.assertEqual(reactor_imports(source), [(1, None), (2, None), (4, "f"), (7, "C.m")])

    def test_the_allowed_places_exist(self):
        # A renamed module or function would leave the rule guarding nothing.
        for module, function in ALLOWED:
            tree = ast.parse((PACKAGE / module).read_text(encoding="utf-8"))
            names = {node.name for node in tree.body
                     if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
            self.assertIn(function, names, module)
