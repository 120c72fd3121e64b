"""
The probe client's command line: C{python -m tcpgreet.client --help}.

Every value is converted and checked here, and every mistake is one
L{usage.UsageError} naming the option and what is wrong with it; nothing
here touches a socket.
"""

from __future__ import annotations

import getopt
import re
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import ip_address
from typing import TYPE_CHECKING, TextIO

from twisted.python import usage

from tcpgreet.client.outcome import CRITICAL, OK, WARNING, Checks

if TYPE_CHECKING:  # OpenSSL only when asked for
    from twisted.internet.ssl import Certificate

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 27679
DEFAULT_TIMEOUT = 5.0
DEFAULT_MAX_BYTES = 65536
# The silence after the first bytes that ends a banner: far longer than the
# gaps inside one (a retransmission waits 200 ms at least), short enough to
# keep a probe of a server that greets and waits brisk.
DEFAULT_IDLE = 1.0
# Probes in flight at once when there are many targets.
DEFAULT_PARALLEL = 100
PROXY_VERSIONS = ("v1", "v2", "v2-local")

# The report forms; see tcpgreet.client.report.
BANNER, LINES, JSON, PLUGIN = "banner", "lines", "json", "plugin"


# A target of this form is a UNIX socket, as in the server's --listen.
UNIX = "unix:"


def parse_target(args: list[str], host: str | None = None,
                 port: int | None = None) -> tuple[str, int | None]:
    """
    C{[HOST [PORT]]}, C{HOST:PORT}, C{[IPv6]:PORT} or C{unix:PATH} as a
    (host, port) pair, where C{host} and C{port} are what C{--host} and
    C{--port} gave; a UNIX socket is C{("unix:PATH", None)}.  Raises
    C{usage.UsageError} naming what is wrong.
    """
    if len(args) > 2:
        raise usage.UsageError(f"too many arguments: {' '.join(args)}")
    if host is not None:
        if args:
            raise usage.UsageError(f"host given twice: --host {host!r} and {args[0]!r}")
        args = [host]
    target_host, port_text = _split_target(args)
    if target_host.startswith(UNIX):
        if port is not None:
            raise usage.UsageError(f"--port {port}: {target_host} is a UNIX socket, "
                                   "which has no port")
        return target_host, None
    if port is not None:
        if port_text is not None:
            raise usage.UsageError(f"port given twice: --port {port} and {port_text!r}")
        return target_host, port
    return target_host, DEFAULT_PORT if port_text is None else parse_port(port_text)


def _split_target(args: list[str]) -> tuple[str, str | None]:
    """The host and the port as given, before the port is looked up."""
    if len(args) > 2:
        raise usage.UsageError(f"too many arguments: {' '.join(args)}")
    if not args:
        return DEFAULT_HOST, None
    host, port_text = args[0], (args[1] if len(args) == 2 else None)
    if host.startswith(UNIX):
        # Whatever follows is the path, colons and all.
        if port_text is not None:
            raise usage.UsageError(f"{host} is a UNIX socket, which has no port: "
                                   f"{port_text!r}")
        if host == UNIX:
            raise usage.UsageError(f"no path in {host!r}; use unix:PATH")
        return host, None
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise usage.UsageError(f"unclosed bracket in host {host!r}")
        rest = host[end + 1:]
        host = host[1:end]
        if rest:
            if not rest.startswith(":") or port_text is not None:
                raise usage.UsageError(f"bad target {args[0]!r}; use [IPv6]:PORT")
            port_text = rest[1:]
    elif host.count(":") == 1:
        if port_text is not None:
            raise usage.UsageError(f"port given twice: {args[0]!r} and {port_text!r}")
        host, port_text = host.split(":")
    if not host:
        raise usage.UsageError(f"empty host in {args[0]!r}")
    return host, port_text


def _port_like(text: str) -> bool:
    """
    Whether the second of two arguments is meant as a PORT (C{smtp}, C{25},
    C{no-such-service}) rather than a second target (an address, a name
    with a dot, C{HOST:PORT}, C{unix:PATH}).
    """
    return not any(mark in text for mark in ".:[/")


def parse_port(text: str) -> int:
    try:
        return port_number(text)
    except ValueError as e:
        raise usage.UsageError(f"bad port {text!r}: {e}") from None


def port_number(text: str) -> int:
    """A port number, or the name of a TCP service (C{smtp}, C{ssh}) in /etc/services."""
    try:
        port = int(text)
    except ValueError:
        try:
            return socket.getservbyname(text, "tcp")
        except OSError:
            raise ValueError("not a number or a known TCP service name") from None
    if not 0 < port < 65536:
        raise ValueError("not in 1..65535")
    return port


def seconds(text: str) -> float:
    """A positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise ValueError("not a positive number of seconds")
    return value


def idle(text: str) -> float:
    """Seconds of silence that end a banner; 0 turns the rule off."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise ValueError("not 0 (off) or a positive number of seconds")
    return value


def count(text: str) -> int:
    """A number of probes; 0 means until interrupted."""
    value = _integer(text)
    if value < 0:
        raise ValueError("not 0 (until interrupted) or more")
    return value


def positive(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise ValueError("not 1 or more")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError("not a whole number") from None


def pattern(text: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as e:
        raise ValueError(f"not a valid regular expression: {e}") from None


_STATES = {"ok": OK, "warn": WARNING, "warning": WARNING, "crit": CRITICAL,
           "critical": CRITICAL}


def state(text: str) -> int:
    try:
        return _STATES[text.lower()]
    except KeyError:
        raise ValueError("not one of ok, warn, crit") from None


def days(text: str) -> tuple[float, float]:
    """C{WARN[,CRIT]} days; CRIT defaults to 0, so an expired certificate is critical."""
    warning_text, _, critical_text = text.partition(",")
    try:
        warning, critical = float(warning_text), float(critical_text or 0)
    except ValueError:
        raise ValueError("not WARN[,CRIT] in days") from None
    if not 0 <= critical <= warning < float("inf"):
        raise ValueError("days must be finite with WARN >= CRIT >= 0")
    return warning, critical


_SEND_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|.?)", re.DOTALL)
_SEND_ESCAPES = {b"r": b"\r", b"n": b"\n", b"t": b"\t", b"0": b"\0", b"\\": b"\\"}


def escaped(text: str) -> bytes:
    r"""The bytes of C{text} with C{\r}, C{\n}, C{\t}, C{\0}, C{\\} and C{\xNN} decoded."""

    def decode(match: re.Match[bytes]) -> bytes:
        code = match.group(1)
        if len(code) == 3:
            return bytes([int(code[1:], 16)])
        if code in _SEND_ESCAPES:
            return _SEND_ESCAPES[code]
        raise ValueError(f"unknown escape \\{code.decode(errors='replace')}; use "
                         "\\r, \\n, \\t, \\0, \\\\ or \\xNN")

    # Python decodes arguments with surrogateescape: this gives back their bytes.
    return _SEND_ESCAPE.sub(decode, text.encode("utf-8", "surrogateescape"))


def proxy_version(text: str) -> str:
    if text not in PROXY_VERSIONS:
        raise ValueError("not v1, v2 or v2-local")
    return text


def proxy_source(text: str) -> tuple[str, int]:
    """C{ADDR:PORT} or C{[IPv6]:PORT}: the client a PROXY header names."""
    host, port_text = text.rsplit(":", 1) if ":" in text else (text, "")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("not ADDR:PORT; write an IPv6 address as [ADDR]:PORT")
    if not port_text:
        raise ValueError("not ADDR:PORT")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad port {port_text!r}") from None
    if not 0 <= port < 65536:
        raise ValueError(f"port {port} not in 0..65535")
    return address(host), port


def load_ca(path: str) -> tuple[Certificate, ...]:
    """C{--ca}: the certificates in a PEM file (L{tcpgreet.client.tls.load_ca})."""
    from tcpgreet.client.tls import load_ca as load  # OpenSSL only when asked for

    return load(path)


def address(text: str) -> str:
    try:
        return str(ip_address(text))
    except ValueError:
        raise ValueError("not an IPv4 or IPv6 address") from None


def is_address(host: str) -> bool:
    """Whether C{host} is an IPv4 or IPv6 address, not a name."""
    try:
        ip_address(host)
    except ValueError:
        return False
    return True


def _named(parameters: list[list]) -> list[list]:
    """
    C{optParameters} whose conversion errors name the option and the value
    (C{--timeout 'soon': not a number of seconds}), where plain
    C{usage.Options} says only "Parameter type enforcement failed".
    """
    named = []
    for long, short, default, doc, convert in parameters:
        named.append([long, short, default, doc, _naming(long, convert)])
    return named


def _naming(option: str, convert: Callable[[str], object]) -> Callable[[str], object]:
    def coerce(text: str) -> object:
        try:
            return convert(text)
        except ValueError as e:
            raise usage.UsageError(f"--{option} {text!r}: {e}") from None
    return coerce


_FAMILY_NAMES: dict[int, str] = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}


def _address_family(host: str) -> int | None:
    """The family of C{host} if it is an address, C{None} if it is a name."""
    try:
        return socket.AF_INET6 if ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


@dataclass(frozen=True)
class Target:
    """
    One target, checked against the options: C{port} is C{None} and
    C{unix} the path for a UNIX socket; C{family} is what to resolve to.
    """

    host: str
    port: int | None
    unix: str | None
    family: int


_COMMENT = re.compile(r"(^|\s)#.*")


class ClientOptions(usage.Options):
    """
    The client's options.  After L{parseOptions}: C{self["host"]} and
    C{self["port"]} are the target (C{"unix:PATH"} and C{None} for a UNIX
    socket, whose path is then C{self["unix"]}), C{self["mode"]} the report
    form, C{self["family"]} the address family to resolve, and
    C{self.checks} the L{Checks} every probe must pass.
    """

    synopsis = ("Usage: tcpgreet-client [options] [HOST [PORT] | TARGET...]  (a TARGET: HOST, "
                "HOST:PORT, [IPv6]:PORT, unix:PATH)")
    longdesc = (
        "Connect to a TCP banner server and print what it sends until it closes "
        "the connection, or falls silent for --idle seconds after its first bytes. "
        "With --count, --interval or --timestamp: a line per probe and a summary; "
        "--json: JSON Lines; --plugin: one monitoring-plugin line. Exit status: "
        "0 OK, 1 WARNING, 2 CRITICAL (refused, closed without a banner, timed out, "
        "reset, not resolved, certificate, expectation or threshold not met), "
        "3 UNKNOWN (bad usage). Options may come before or after HOST and PORT; "
        "-- ends them. Several targets, or --targets-file, are probed at once "
        "(--parallel), each reported as it ends; the exit status is the worst."
    )
    optFlags = [
        ["json", None, "One JSON object per probe and one for the summary (JSON Lines)."],
        ["plugin", None, "One monitoring-plugin line with performance data, as check_tcp."],
        ["tls", None, "Speak TLS; verify the certificate against the system's trust "
                      "store, SNI = HOST."],
        ["insecure", None, "With --tls: accept any certificate."],
        ["ipv4", "4", "Use IPv4 addresses only."],
        ["ipv6", "6", "Use IPv6 addresses only."],
        ["first-line", None, "Stop reading at the first newline, without waiting for "
                             "--idle silence (SMTP, SSH, FTP, POP3)."],
        ["raw", None, "Write the banner's bytes unchanged, escape sequences and all."],
        ["timestamp", "D", "Start each probe line with the time (UTC, ISO 8601)."],
        ["expect-any", None, "One --expect matching is enough (by default every one must)."],
        ["all-addresses", None, "Probe every address the name has, each reported; the "
                                "name's state is the worst of theirs."],
        ["any-address", None, "As --all-addresses, but the name's state is the best of "
                              "theirs: one working address is enough."],
    ]
    optParameters = _named([
        ["host", "H", None, "The server to probe, as HOST (check_tcp's -H).", str],
        ["port", "p", None, "The port: a number or a TCP service name (smtp), as "
                            "PORT.", port_number],
        ["count", "c", None, "Probes to make; 0 = until interrupted. [default: 1]", count],
        ["interval", "i", None, "Seconds from the start of a probe to the start of the "
                                "next. [default: 1]", seconds],
        ["timeout", "t", DEFAULT_TIMEOUT, "Seconds allowed for each probe: resolving, "
                                          "connecting, TLS, reading.", seconds],
        ["warning", "w", None, "WARNING when a probe takes longer than this many "
                               "seconds, not counting name resolution.", seconds],
        ["critical", None, None, "CRITICAL when a probe takes longer than this many "
                                 "seconds, not counting name resolution.", seconds],
        ["refused-state", None, None, "State when the connection is refused: "
                                          "ok, warn, crit. [default: crit]", state],
        ["empty-state", None, None, "State when the server closes without a banner: "
                                        "ok, warn, crit. [default: crit]", state],
        ["mismatch-state", None, None, "State when --expect does not match: "
                                           "ok, warn, crit. [default: crit]", state],
        ["idle", None, None, "Seconds of silence, once the server has sent something, "
                             "that end the banner; 0 = wait for the server to close. "
                             "[default: 1, or half of --timeout if less]", idle],
        ["max-bytes", None, DEFAULT_MAX_BYTES, "Stop reading after this many bytes; the "
                                               "banner is reported truncated.", positive],
        ["send", None, None, "Send this after connecting; \\r \\n \\t \\0 \\\\ \\xNN "
                            "are decoded.", escaped],
        ["ca", None, None, "With --tls: trust the certificates in this PEM file instead "
                           "of the system's.", load_ca],
        ["cert-days", None, None, "With --tls: WARNING/CRITICAL when the certificate "
                                  "expires within WARN[,CRIT] days.", days],
        ["source", "s", None, "Connect from this local address.", address],
        ["targets-file", None, None, "Probe the targets in this file, one a line (HOST, HOST "
                                     "PORT, HOST:PORT, unix:PATH; # comments); - for "
                                     "standard input.", str],
        ["parallel", None, DEFAULT_PARALLEL, "Probes in flight at once, with several "
                                             "targets.", positive],
        ["proxy-protocol", None, None, "Send a PROXY protocol header first: v1, v2, or "
                                       "v2-local (the LOCAL command, as a health check).",
         proxy_version],
        ["proxy-source", None, None, "With --proxy-protocol v1 or v2: the client the header "
                                     "names, ADDR:PORT. [default: the probe's own]",
         proxy_source],
    ])
    compData = usage.Completions(optActions={"ca": usage.CompleteFiles("*.pem")})

    # -h as well as --help; usage.Options leaves -h free for a host option.
    opt_h = usage.Options.opt_help
    _many: list | None = None
    _default_port = DEFAULT_PORT

    def __init__(self) -> None:
        super().__init__()
        self["expect"] = []
        self["reject"] = []
        self.targets: list[Target] = []

    # --expect and --reject are repeatable, so they are methods; their help
    # is one string, as --help shows it.
    def opt_expect(self, regex: str) -> None:
        self["expect"].append(_naming("expect", pattern)(regex))

    opt_expect.__doc__ = ("CRITICAL unless the banner matches this regular expression "
                          "(Python re.search); repeatable: every one must match (see "
                          "--expect-any).")
    opt_e = opt_expect

    def opt_reject(self, regex: str) -> None:
        self["reject"].append(_naming("reject", pattern)(regex))

    opt_reject.__doc__ = ("CRITICAL when the banner matches this regular expression "
                          "(--reject '^5'), checked before --expect; repeatable.")

    def parseOptions(self, options: list[str] | None = None) -> None:
        """
        Parse options wherever they are (C{HOST PORT --first-line}), as GNU
        tools, curl and nc do: C{usage.Options} stops at the first argument
        that is not an option, so put the options first and the arguments
        after a C{--}.  A C{--} given still ends the options.
        """
        arguments = sys.argv[1:] if options is None else list(options)
        if len(arguments) > 1 and arguments[-2] == "--_shell-completion":
            super().parseOptions(arguments)  # usage.Options' own completion
            return
        try:
            given, positional = getopt.gnu_getopt(arguments, self.shortOpt, self.longOpt)
        except getopt.GetoptError as e:
            raise usage.UsageError(str(e)) from None
        options_first: list[str] = []
        for option, value in given:
            options_first.append(option)
            if self._takes_value(option):
                options_first.append(value)
        super().parseOptions([*options_first, "--", *positional])

    def _takes_value(self, option: str) -> bool:
        if option.startswith("--"):
            return f"{option[2:]}=" in self.longOpt
        return f"{option[1]}:" in self.shortOpt

    def parseArgs(self, *args: str) -> None:
        # --host and --port have filled self["host"] and self["port"], if given.
        # -p is the port of every target of several that names none.
        self._default_port = self["port"] or DEFAULT_PORT
        if self["host"] is None and not args and self["targets-file"] is not None:
            self._many = []  # the file's targets alone
        elif self["host"] is not None or len(args) < 2 or (len(args) == 2
                                                           and _port_like(args[1])):
            self._many = None
            self["host"], self["port"] = parse_target(list(args), self["host"], self["port"])
        else:
            self._many = [self._one_of_many(arg, args) for arg in args]

    def _one_of_many(self, arg: str, args: tuple[str, ...]) -> tuple[str, int | None]:
        host, port_text = _split_target([arg])
        if host.startswith(UNIX):
            return host, None
        if port_text is None and arg.isdigit():
            raise usage.UsageError(f"too many arguments: {' '.join(args)} (with several "
                                   "targets, write each as HOST:PORT, or give -p PORT)")
        return host, parse_port(port_text) if port_text is not None else self._default_port

    def postOptions(self) -> None:
        self._refuse_conflicts()
        first: Target | None
        if self._many is None:
            first = self.target(self["host"], self["port"])
            self.targets = [first]
        else:
            self.targets = [self.target(host, port) for host, port in self._many]
            first = self.targets[0] if self.targets else None
            self["host"], self["port"] = (first.host, first.port) if first else (None, None)
        self["unix"] = first.unix if first else None
        self["family"] = first.family if first else self._family(None)
        self["fleet"] = self["targets-file"] is not None or len(self.targets) > 1
        if self["any-address"]:
            self["all-addresses"] = True
        if self["json"]:
            self["mode"] = JSON
        elif self["plugin"]:
            self["mode"] = PLUGIN
        elif (any(self[name] is not None for name in ("count", "interval")) or self["timestamp"]
              or self["fleet"]):
            self["mode"] = LINES
        else:
            self["mode"] = BANNER
        # Defaults are filled in here, not in optParameters, so --help shows
        # them as they are typed ("crit", not 2) and a given --count or
        # --interval can be told from the default.
        for name, default in (("count", 1), ("interval", 1.0), ("send", b""),
                              ("refused-state", CRITICAL), ("empty-state", CRITICAL),
                              ("mismatch-state", CRITICAL),
                              # Half the timeout at most, so that a short
                              # --timeout still leaves a banner time to end.
                              ("idle", min(DEFAULT_IDLE, self["timeout"] / 2))):
            if self[name] is None:
                self[name] = default
        if self["mode"] == PLUGIN and self["count"] == 0:
            raise usage.UsageError("--plugin needs a --count of 1 or more: a check must end")
        warning_days, critical_days = self["cert-days"] or (None, None)
        self.checks = Checks(
            expect=tuple(self["expect"]), warning=self["warning"], critical=self["critical"],
            refused_state=self["refused-state"], empty_state=self["empty-state"],
            mismatch_state=self["mismatch-state"],
            cert_warning_days=warning_days, cert_critical_days=critical_days,
            reject=tuple(self["reject"]), expect_any=self["expect-any"])

    def target(self, host: str, port: int | None) -> Target:
        """C{host} and C{port} as a L{Target}, or a C{usage.UsageError} saying why not."""
        unix = host[len(UNIX):] if port is None else None
        if unix is not None:
            self._refuse_for_unix(host)
        return Target(host, port, unix, self._family(host))

    def targets_in(self, lines: TextIO, name: str) -> Iterator[Target | str]:
        """
        The targets of a C{--targets-file}, read as they are needed: a
        L{Target} for each line that names one, or the line's mistake in
        words (C{FILE line 3: bad port 'x': ...}), so that one bad line does
        not stop the rest.
        """
        for number, line in enumerate(lines, start=1):
            text = _COMMENT.sub("", line).strip()
            if not text:
                continue
            try:
                if text.startswith(UNIX):
                    # Whatever follows is the path, spaces and all.
                    host, port = parse_target([text])
                else:
                    host, port_text = _split_target(text.split())
                    port = (parse_port(port_text) if port_text is not None
                            else self._default_port)
                yield self.target(host, port)
            except usage.UsageError as e:
                yield f"{name} line {number}: {e}"

    def _refuse_conflicts(self) -> None:
        for first, second in (("json", "plugin"), ("ipv4", "ipv6"), ("ca", "insecure")):
            if self[first] and self[second]:
                raise usage.UsageError(f"--{first} and --{second} exclude each other")
        for needs_tls in ("ca", "insecure", "cert-days"):
            if self[needs_tls] and not self["tls"]:
                raise usage.UsageError(f"--{needs_tls} needs --tls")
        warning, critical = self["warning"], self["critical"]
        if warning is not None and critical is not None and warning > critical:
            raise usage.UsageError(f"--warning {warning:g} is above --critical {critical:g}")
        if self["proxy-source"] is not None and self["proxy-protocol"] in (None, "v2-local"):
            raise usage.UsageError("--proxy-source needs --proxy-protocol v1 or v2 "
                                   "(a LOCAL header names no client)")
        if self["expect-any"] and not self["expect"]:
            raise usage.UsageError("--expect-any needs --expect")
        if self["targets-file"] not in (None, "-"):
            try:
                with open(self["targets-file"], "rb"):
                    pass
            except OSError as e:
                raise usage.UsageError(f"--targets-file {self['targets-file']}: cannot read: "
                                       f"{e.strerror}") from None
        idle, timeout = self["idle"], self["timeout"]
        if idle and idle >= timeout:
            raise usage.UsageError(f"--idle {idle:g} is not below --timeout {timeout:g}: no "
                                   "silence could end the banner (--idle 0 waits for the close)")

    def _refuse_for_unix(self, host: str) -> None:
        # TLS too: the server cannot listen for it on a UNIX socket, and
        # there would be no name to check the certificate against.
        for option in ("tls", "ipv4", "ipv6", "source"):
            if self[option]:
                raise usage.UsageError(f"--{option} does not apply to a UNIX socket "
                                       f"({host})")
        if self["proxy-protocol"] in ("v1", "v2"):
            # Its addresses are TCP ones; a LOCAL header names none.
            raise usage.UsageError(f"--proxy-protocol {self['proxy-protocol']} does not apply "
                                   f"to a UNIX socket ({host}); v2-local does")

    def _family(self, host: str | None) -> int:
        """
        The address family to resolve HOST to: -4, -6, or the family of
        --source, since a socket bound to one family cannot reach the other.
        An address given as HOST must be of that family: that is a mistake
        on the command line, where a name without such an address is the
        name's business, found when resolving it.
        """
        family = (socket.AF_INET if self["ipv4"] else
                  socket.AF_INET6 if self["ipv6"] else socket.AF_UNSPEC)
        host_family = None if host is None else _address_family(host)
        if host_family is not None and family not in (socket.AF_UNSPEC, host_family):
            raise usage.UsageError(f"-{'4' if self['ipv4'] else '6'}: {host} is an "
                                   f"{_FAMILY_NAMES[host_family]} address")
        if self["source"] is not None:
            source_family = socket.AF_INET6 if ":" in self["source"] else socket.AF_INET
            if family not in (socket.AF_UNSPEC, source_family):
                raise usage.UsageError(
                    f"--source {self['source']} is not an {_FAMILY_NAMES[family]} address")
            if host_family not in (None, source_family):
                raise usage.UsageError(f"--source {self['source']} cannot reach "
                                       f"{host}, an {_FAMILY_NAMES[host_family]} "
                                       "address")
            family = source_family
        return family

    def opt_version(self) -> None:
        """Print the version and exit."""
        from tcpgreet import __version__
        print(f"tcpgreet-client {__version__}")
        sys.exit(0)
