"""
The parts of Twisted that tcpgreet uses although Twisted does not promise
them: private modules, private attributes, and public-looking attributes of
implementation classes.  Each is named here with the reason it is used, and
checked against the installed Twisted, so that an upgrade that drops one
breaks this test with the name in the message, not a server in production.

A second test reads tcpgreet's source and fails when the code reaches for a
private name of Twisted's that is not in the list, so the list stays whole.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import pkgutil
import textwrap
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import tcpgreet

# "module:Object.attribute" -> why tcpgreet uses it.  An attribute that
# Twisted sets on instances only (in __init__ or later) is checked in the
# class's source, since the class itself does not have it.
INTERNALS = {
    # The fast accept path (tcpgreet/_port.py).
    "socket:socket._accept":
        "accept without building a socket object per connection",
    "_socket:socket":
        "a directly served connection's socket, without the Python-level "
        "__init__ and close of socket.socket",
    "twisted.internet.tcp:Port._buildAddr":
        "the peer address object Twisted would build",
    "twisted.internet.tcp:Port._fromListeningDescriptor":
        "adopt an inherited listening socket as a GreetPort",
    "twisted.internet.tcp:Port.numberAccepts":
        "how many connections one accept pass takes",
    "twisted.internet.tcp:Port._realPortNumber":
        "set as Twisted's startListening sets it, by GreetPort's own, which "
        "starts without Twisted's log line",
    "twisted.internet.tcp:Port._preexistingSocket":
        "an adopted socket, taken over by SharedUNIXPort.startListening",
    "twisted.internet.unix:Port._shouldShutdown":
        "an adopted UNIX port must not shut the socket down for the others",
    "twisted.internet.abstract:FileDescriptor._writeDisconnecting":
        "hand a half-closed direct connection to tcp.Server",
    "twisted.internet.abstract:FileDescriptor._writeDisconnected":
        "hand a half-closed direct connection to tcp.Server",
    "twisted.internet.abstract:FileDescriptor.dataBuffer":
        "greeting bytes still unsent when a connection ends",
    "twisted.internet.abstract:FileDescriptor.offset":
        "greeting bytes still unsent when a connection ends",
    "twisted.internet.abstract:FileDescriptor._tempDataLen":
        "greeting bytes still unsent when a connection ends",
    "twisted.internet.tcp:Port._type":
        "the name a TLS listener's log lines give it",
    "twisted.internet.tcp:Port._logConnectionLostMsg":
        "overridden: the service logs when a listener stops",
    "twisted.internet.tcp:Port.transport":
        "the connection class a GreetPort builds for the slow path",
    "twisted.internet.tcp:Port.sessionno":
        "numbered as Twisted numbers the connections it builds",
    "twisted.internet.abstract:FileDescriptor._getLogPrefix":
        "a held connection's log prefix, made as tcp.Server makes it, when asked",
    "twisted.internet.tcp:Server.logstr":
        "set by tcp.Server.__init__; a HeldServer makes it when asked instead",
    "twisted.internet.tcp:Server.repstr":
        "set by tcp.Server.__init__; a HeldServer makes it when asked instead",
    "twisted.internet.tcp:Server.hostname":
        "what a held connection's log prefix is made of",
    # The control channel (tcpgreet/workers/control.py) skips AMP's log line for
    # every connection by calling the protocol below it.
    "twisted.protocols.amp:BinaryBoxProtocol.makeConnection":
        "AMP without a log line per control channel",
    "twisted.protocols.amp:BinaryBoxProtocol.connectionLost":
        "AMP without a log line per control channel",
    # The log file (tcpgreet/logs.py).
    "twisted.python.logfile:BaseLogFile._file":
        "PatientLogFile writes it without the lock LogFile.write takes; Twisted "
        "opens it unbuffered, so what is written is on disk",
    # The PROXY header reader (tcpgreet/proxy.py).
    "twisted.protocols.haproxy._v1parser:V1Parser":
        "parse a PROXY v1 header without Twisted's wrapper, which greets early",
    "twisted.protocols.haproxy._v2parser:V2Parser":
        "parse a PROXY v2 header without Twisted's wrapper, which greets early",
    "twisted.protocols.haproxy._info:ProxyInfo":
        "the type of a parsed header, in annotations only",
}


def resolve(spec: str) -> None:
    """Raise AssertionError, naming C{spec}, unless the installed Python or
    Twisted has it."""
    module_name, _, path = spec.partition(":")
    try:
        target = importlib.import_module(module_name)
    except ImportError as e:
        raise AssertionError(f"{spec}: module {module_name} is gone ({e})") from None
    *owners, attribute = path.split(".")
    for owner in owners:
        if not hasattr(target, owner):
            raise AssertionError(f"{spec}: {module_name} has no {owner}")
        target = getattr(target, owner)
    if hasattr(target, attribute):
        return
    if inspect.isclass(target) and _assigned_by(target, attribute):
        return
    raise AssertionError(f"{spec}: {path} is gone from the installed Twisted; "
                         f"tcpgreet uses it: {INTERNALS[spec]}")


def _assigned_by(cls: type, attribute: str) -> bool:
    """Whether a class in C{cls}'s MRO assigns C{self.attribute}."""
    return any(attribute in _self_stores(klass) for klass in inspect.getmro(cls))


@functools.cache
def _self_stores(cls: type) -> frozenset[str]:
    """The names C{cls}'s own code stores as C{self.NAME} (tuple targets too)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return frozenset()
    return frozenset(node.attr for node in ast.walk(tree)
                     if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                     and isinstance(node.value, ast.Name) and node.value.id == "self")


class InternalsTests(SynchronousTestCase):
    def test_every_internal_tcpgreet_uses_is_there(self):
        missing = []
        for spec in INTERNALS:
            try:
                resolve(spec)
            except AssertionError as e:
                missing.append(str(e))
        self.assertEqual(missing, [], "\n".join(missing))

    def test_a_missing_internal_is_reported_by_name(self):
        INTERNALS["twisted.internet.tcp:Port._noSuchThing"] = "a test of this test"
        self.addCleanup(INTERNALS.pop, "twisted.internet.tcp:Port._noSuchThing")
        with self.assertRaisesRegex(AssertionError, r"Port\._noSuchThing is gone"):
            resolve("twisted.internet.tcp:Port._noSuchThing")

    def test_the_list_names_every_private_name_the_code_uses(self):
        listed = {spec.rpartition(".")[2] for spec in INTERNALS} | {
            spec.partition(":")[0] for spec in INTERNALS}
        unlisted = {name: places for name, places in private_uses().items()
                    if name not in listed}
        self.assertEqual(unlisted, {},
                         "tcpgreet uses private names of Twisted's that "
                         "tests/test_twisted_internals.py does not list")


def tcpgreet_modules():
    package = Path(tcpgreet.__file__).parent
    yield "tcpgreet", package / "__init__.py"
    for info in pkgutil.walk_packages([str(package)], "tcpgreet."):
        if info.name.rpartition(".")[2] == "__main__":
            continue  # importing a program's __main__ would run it
        module = importlib.import_module(info.name)
        yield info.name, Path(module.__file__)


def private_uses() -> dict[str, list[str]]:
    """
    Twisted's private names that tcpgreet's source reaches for: private
    modules it imports, and private attributes it reads or sets, by name or
    through C{getattr}/C{hasattr}/C{setattr} with a constant, which are
    either set on an object Twisted made or belong to a Twisted class that
    a tcpgreet class inherits from.
    """
    found: dict[str, list[str]] = {}
    for module_name, path in tcpgreet_modules():
        module = importlib.import_module(module_name)
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("twisted.") and _private_module(node.module):
                found.setdefault(node.module, []).append(where)
        for owner, name, where in _private_attributes(tree, path):
            if _twistedOwned(module, owner, name):
                found.setdefault(name, []).append(where)
    return found


def _private_module(dotted: str) -> bool:
    return any(part.startswith("_") for part in dotted.split("."))


def _private_attributes(tree: ast.AST, path: Path):
    """(enclosing class or None, private name, place) for each use."""
    modules = {alias.asname or alias.name for node in ast.walk(tree)
               if isinstance(node, ast.Import) for alias in node.names
               if not alias.name.startswith("twisted")}

    def _of_another_module(receiver) -> bool:
        # os._exit, sys._getframe: the standard library's, not Twisted's.
        return isinstance(receiver, ast.Name) and receiver.id in modules

    def visit(node, owner):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.ClassDef) else owner
            name = None
            if isinstance(child, ast.Attribute):
                if not _of_another_module(child.value):
                    name = child.attr
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    isinstance(node, ast.ClassDef):
                name = child.name  # perhaps an override of a private hook
            elif isinstance(child, ast.Call) and isinstance(child.func, ast.Name) and \
                    child.func.id in ("getattr", "hasattr", "setattr") and \
                    len(child.args) >= 2 and isinstance(child.args[1], ast.Constant) and \
                    isinstance(child.args[1].value, str):
                name = child.args[1].value
            if name and name.startswith("_") and not name.startswith("__"):
                yield inner, name, f"{path.name}:{child.lineno}"
            yield from visit(child, inner)
    yield from visit(tree, None)


def _twistedOwned(module, owner: str | None, name: str) -> bool:
    """
    Whether C{name} is Twisted's rather than tcpgreet's: not defined by
    any tcpgreet class (or module) but defined or assigned by a Twisted
    class, either one the enclosing class inherits from or any at all.
    """
    ours = [klass for _, klass in inspect.getmembers(module, inspect.isclass)
            if klass.__module__.startswith("tcpgreet")]
    if owner is not None and hasattr(module, owner):
        mro = inspect.getmro(getattr(module, owner))
        theirs = [k for k in mro if k.__module__.startswith("twisted.")]
        if any(name in vars(k) for k in theirs) or \
                any(_assigned_by(k, name) for k in theirs):
            return True
    ours_too = hasattr(module, name) or any(name in vars(k) for k in ours) or \
        any(_assigned_in_own_source(k, name) for k in ours)
    return not ours_too


def _assigned_in_own_source(cls: type, name: str) -> bool:
    """Whether C{cls}'s own code stores C{self.name}."""
    return name in _self_stores(cls)
