"""
Where greetings come from: a literal text or a UTF-8 file, rendered through a
deliberately tiny template language.

A greeting may name a handful of per-connection values (``{peer_host}``,
``{peer_port}``, ``{hostname}``, ``{time}``, ``{connection}``) and nothing
else: no attribute or index access and no format specs, because a greeting
is operator input that ends up evaluated once per connection, and
``str.format`` would otherwise hand it the internals of every object it can
reach.  A greeting that names none of them is rendered once, to bytes, so the
common case costs nothing per connection.
"""

from __future__ import annotations

import re
import socket
import string
import time
from collections.abc import Callable

PLACEHOLDERS = ("peer_host", "peer_port", "hostname", "time", "connection")

_LINE_ENDINGS = re.compile(r"\r\n|\r|\n")


class GreetingError(ValueError):
    """
    A greeting that cannot be used.  The message names the culprit (the file,
    the placeholder) and the reason, fit to be shown to the operator as is.
    """


def to_crlf(text: str) -> str:
    """
    Give every line of C{text} a CRLF ending, the line ending of the
    line-based protocols whose banners a greeting stands beside.
    """
    text = _LINE_ENDINGS.sub("\r\n", text)
    if not text.endswith("\r\n"):
        text += "\r\n"
    return text


def _check_fields(text: str, origin: str) -> frozenset[str]:
    """
    Return the placeholder names C{text} uses, or raise L{GreetingError}
    naming the first placeholder that is not one of L{PLACEHOLDERS} used
    plainly.
    """
    used = set()
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise GreetingError(
            f"{origin}: {e} (write {{{{ and }}}} for literal braces)") from None
    for _literal, field, spec, conversion in parsed:
        if field is None:
            continue
        shown = "{" + field + ("!" + conversion if conversion else "") + (
            ":" + spec if spec else "") + "}"
        if field == "":
            raise GreetingError(
                f"{origin}: empty placeholder {shown}; "
                f"use one of {_known()} (or {{{{ and }}}} for literal braces)")
        if "." in field or "[" in field:
            raise GreetingError(
                f"{origin}: placeholder {shown} uses attribute or index access, "
                f"which greetings do not allow; use one of {_known()}")
        if field not in PLACEHOLDERS:
            raise GreetingError(
                f"{origin}: unknown placeholder {shown}; use one of {_known()}")
        if spec or conversion:
            raise GreetingError(
                f"{origin}: placeholder {shown} has a format spec or conversion, "
                f"which greetings do not allow; write {{{field}}}")
        used.add(field)
    return frozenset(used)


def _known() -> str:
    return ", ".join("{" + name + "}" for name in PLACEHOLDERS)


class Greeting:
    """
    One validated greeting, ready to render.

    @ivar origin: where the text came from, for messages (C{--greeting} or
        the file's path).
    @ivar static: the rendered bytes when the greeting uses no placeholder,
        else L{None}.
    @ivar fields: the placeholder names the greeting uses.
    """

    def __init__(self, text: str, origin: str = "--greeting") -> None:
        self.origin = origin
        self.fields = _check_fields(text, origin)
        self._text = text
        self.static: bytes | None = None
        if not self.fields:
            # No placeholder: undo the brace escapes once and keep the bytes.
            self.static = text.format().encode("utf-8")

    def render(self, values: Callable[[str], object]) -> bytes:
        """
        Render for one connection; C{values(name)} supplies each placeholder
        the greeting uses, so unused ones cost nothing.
        """
        if self.static is not None:
            return self.static
        return self._text.format_map({name: values(name) for name in self.fields}).encode(
            "utf-8")

    def __len__(self) -> int:
        """The length in bytes when static; a template's length varies."""
        return len(self.static) if self.static is not None else len(self._text)

    def __repr__(self) -> str:
        return f"<Greeting from {self.origin}: {self._text[:40]!r}>"


def from_text(text: str) -> Greeting:
    """The greeting given on the command line; CRLF is appended."""
    return Greeting(text + "\r\n", "--greeting")


def from_file(path: str) -> Greeting:
    """
    The greeting in a UTF-8 file, line endings sent as CRLF (a final one is
    added if missing, a leading byte-order mark dropped).  Raises
    L{GreetingError} naming the file when it cannot be used.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise GreetingError(f"greeting file {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise GreetingError(
            f"greeting file {path}: not UTF-8 (invalid byte 0x{data[e.start]:02x} "
            f"at offset {e.start})") from None
    return Greeting(to_crlf(text), f"greeting file {path}")


class Clock:
    """
    The slow-changing template values, cached so a template that names them
    does not pay a system call or a strftime per connection.
    """

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self._now = now
        self._second = -1
        self._text = ""
        self.hostname = socket.gethostname()

    def utc_iso(self) -> str:
        """The current UTC time, ISO 8601 to the second."""
        now = int(self._now())
        if now != self._second:
            self._second = now
            self._text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return self._text
