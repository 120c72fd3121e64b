"""
The twistd plugin's half that knows about options: C{twistd tcpgreet --help}.

Data flows one way: L{Options} parses and validates the command line,
L{makeService} turns the result into a factory and a service, and nothing
here touches a socket.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar, cast

from twisted.application.service import IService, IServiceCollection
from twisted.copyright import version as twisted_version
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import ILogObserver, Logger
from twisted.python import usage
from twisted.python.components import Componentized

from tcpgreet import __version__, greeting, logs, startup
from tcpgreet.endpoints import (
    DEFAULT_BACKLOG,
    EndpointError,
    EndpointReactor,
    Listener,
    ipv6_unavailable,
    proxied,
    server_endpoint,
)
from tcpgreet.health import MetricsLast, greeter_unready, serve_health, supervisor_unready
from tcpgreet.limits import ConnectionLimits, TokenBuckets
from tcpgreet.logs import IObserverReactor
from tcpgreet.proxy import Network, TrustedProxies
from tcpgreet.server import DEFAULT_TIMEOUT, GreetFactory
from tcpgreet.service import DEFAULT_DRAIN_TIMEOUT, GreetService
from tcpgreet.startup import fail
from tcpgreet.stats import Stats
from tcpgreet.workers.arguments import WorkerRole, worker_arguments
from tcpgreet.workers.control import ControlService, IChannelReactor
from tcpgreet.workers.handover import InheritedReactor, WorkerSocketBinder
from tcpgreet.workers.supervisor import ISupervisorReactor, WorkerSupervisor

if TYPE_CHECKING:
    from tcpgreet import metrics

log = Logger()

DEFAULT_PORT = 27679
DEFAULT_GREETING = "Thank you for connecting"
DEFAULT_MAX_CONNECTIONS = 10000

_Number = TypeVar("_Number", int, float)
_Method = TypeVar("_Method", bound=Callable[..., object])


def default_listen(port: int) -> list[str]:
    """
    What listens when no --listen is given: C{port} on every address, IPv4
    and IPv6, as two listeners.  The IPv6 one takes IPv6 clients only (see
    L{listeners}), so that every client reaches the socket of its own
    family and is seen, logged and limited as its own address, with
    nothing to translate for each connection.
    """
    return [f"tcp:{port}", f"tcp6:{port}"]


def _number(option: str, text: str, kind: type[_Number], minimum: float = 0,
            alternative: str = "") -> _Number:
    """C{text} as a number of C{kind} no smaller than C{minimum}, or a
    UsageError naming the option."""
    try:
        value = kind(text)
    except ValueError:
        noun = "a whole number" if kind is int else "a number"
        raise usage.UsageError(f"{option}: {text!r} is not {noun}{alternative}") from None
    if not math.isfinite(value):
        raise usage.UsageError(f"{option}: {text!r} is not a finite number")
    if value < minimum:
        raise usage.UsageError(f"{option}: {text!r} must be at least {minimum:g}")
    return value


def parse_rate(text: str) -> tuple[float, int]:
    """C{R[/BURST]}: R new connections a second, bursts of BURST (default: R, at least 1)."""

    def bad(reason: str) -> usage.UsageError:
        return usage.UsageError(f"--rate-per-ip {text!r}: {reason}")

    rate_text, slash, burst_text = text.partition("/")
    try:
        rate = float(rate_text)
    except ValueError:
        raise bad("R is not a number") from None
    if not math.isfinite(rate):
        raise bad("R is not a finite number")
    if rate <= 0:
        raise bad("R must be more than 0")
    if not slash:
        return rate, max(1, math.ceil(rate))
    try:
        burst = int(burst_text)
    except ValueError:
        raise bad("BURST is not a whole number" if burst_text
                  else "BURST is missing after the /") from None
    if burst < 1:
        raise bad("BURST must be at least 1")
    return rate, burst


def parse_network(text: str) -> Network:
    """C{--trusted-proxy}: an IP network in CIDR notation, or one address."""
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        pass
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise usage.UsageError(
            f"--trusted-proxy: {text!r} is not an IP address or network "
            "(such as 10.0.0.0/8, 2001:db8::/32 or 127.0.0.1)") from None
    # 10.0.0.1/8: a typing slip, or a network meant?  Ask rather than guess.
    raise usage.UsageError(f"--trusted-proxy: {text!r} has host bits set "
                           f"(the network would be {network})")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def parse_workers(text: str) -> int:
    """C{N} worker processes, or C{auto}: one for each CPU this process may use."""
    if text == "auto":
        return usable_cpus()
    return _number("--workers", text, int, 1, alternative=" or auto")


def _help(method: _Method) -> _Method:
    """Fold an option method's docstring into one paragraph: usage.Options
    wraps the text but keeps the source's indentation inside it."""
    method.__doc__ = " ".join((method.__doc__ or "").split())
    return method


class Options(usage.Options):
    """
    Options of C{twistd tcpgreet}.  After L{parseOptions}, C{self.greeting}
    holds the validated L{greeting.Greeting}.
    """

    synopsis = "[options]"
    longdesc = (
        "Send a greeting (a banner) to every client that connects, then close "
        "the connection. Anything the client sends is discarded. A greeting may "
        "use the placeholders {peer_host}, {peer_port}, {hostname}, {time} "
        "(UTC, ISO 8601) and {connection} (1, 2, 3, ... per process: with "
        "--workers, per worker); write {{ "
        "and }} for literal braces. SIGHUP re-reads --greeting-file. Listen "
        "endpoints are Twisted endpoint strings, e.g. tcp:27679, "
        "tcp6:27679:interface=\\:\\:1, ssl:443:privateKey=key.pem:certKey=cert.pem, "
        "unix:/run/tcpgreet.sock, systemd:domain=INET:name=tcpgreet, haproxy:tcp:27679."
    )

    optFlags = [
        ["quiet", "q", "Do not log a line per connection."],
    ]
    optParameters = [
        ["greeting", "g", None,
         f"The greeting; CRLF is appended. [default: {DEFAULT_GREETING}]"],
        ["greeting-file", "f", None,
         "Read the greeting from this UTF-8 file; line endings are sent as "
         "CRLF. Re-read on SIGHUP."],
    ]
    compData = usage.Completions(optActions={"greeting-file": usage.CompleteFiles()})

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["max-connections"] = DEFAULT_MAX_CONNECTIONS
        self["max-per-ip"] = 0
        self["rate-per-ip"] = None
        self["timeout"] = DEFAULT_TIMEOUT
        self["drain-timeout"] = DEFAULT_DRAIN_TIMEOUT
        self["metrics"] = None
        self["trusted-proxy"] = []
        self["workers"] = 1
        self.greeting: greeting.Greeting | None = None
        self.listen_is_default = False
        # A worker's role, set by tcpgreet.workers.__main__ in the worker processes of
        # --workers, never from the command line.
        self.worker: WorkerRole | None = None

    @_help
    def opt_listen(self, description: str) -> None:
        """Listen on this Twisted server endpoint; repeatable. [default: port
        27679 on every IPv4 and IPv6 address: tcp:27679 and tcp6:27679, the
        latter IPv6 only]"""
        self["listen"].append(description)

    opt_l = opt_listen

    @_help
    def opt_max_connections(self, value: str) -> None:
        """Most connections open at once, over all listeners; a connection
        beyond it is closed at once, without a greeting. [default: 10000]"""
        self["max-connections"] = _number("--max-connections", value, int, 1)

    @_help
    def opt_max_per_ip(self, value: str) -> None:
        """Most connections open at once from one client address; 0 is no
        limit. [default: 0]"""
        self["max-per-ip"] = _number("--max-per-ip", value, int, 0)

    @_help
    def opt_rate_per_ip(self, value: str) -> None:
        """R[/BURST]: at most R new connections a second from one client
        address, in bursts of up to BURST (default R). [default: off]"""
        self["rate-per-ip"] = parse_rate(value)

    @_help
    def opt_timeout(self, value: str) -> None:
        """Seconds a connection may take to receive its greeting before it
        is aborted. [default: 10]"""
        self["timeout"] = _number("--timeout", value, float, 0.001)

    @_help
    def opt_drain_timeout(self, value: str) -> None:
        """On SIGTERM or SIGINT, seconds to let greetings in progress finish
        before aborting them. [default: 5]"""
        self["drain-timeout"] = _number("--drain-timeout", value, float, 0)

    @_help
    def opt_metrics(self, description: str) -> None:
        """Serve Prometheus metrics at /metrics on this Twisted server endpoint,
        e.g. tcp:9127:interface=127.0.0.1 (needs prometheus_client, tcpgreet's
        metrics extra). [default: off]"""
        self["metrics"] = description

    @_help
    def opt_trusted_proxy(self, value: str) -> None:
        """CIDR: on haproxy: listeners, take PROXY headers only from
        connections from this network (or address), such as the proxy's
        10.0.0.10; repeatable. A connection from elsewhere is refused
        without a greeting. [default: from any address]"""
        self["trusted-proxy"].append(parse_network(value))

    @_help
    def opt_workers(self, value: str) -> None:
        """N|auto: serve with N worker processes, each accepting on the same
        listeners, supervised by this one; auto is one per CPU.
        --max-connections is shared out among them. [default: 1]"""
        self["workers"] = parse_workers(value)

    def opt_version(self) -> None:
        """Print tcpgreet's version and Twisted's, and exit."""
        print(f"tcpgreet {__version__} (Twisted {twisted_version})")
        raise SystemExit(0)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = default_listen(DEFAULT_PORT)
            self.listen_is_default = True
        if self["workers"] > self["max-connections"]:
            raise usage.UsageError(
                f"--workers {self['workers']} is more than --max-connections "
                f"{self['max-connections']}: each worker needs at least one connection")
        if self["trusted-proxy"] and not any(proxied(d) for d in self["listen"]):
            raise usage.UsageError("--trusted-proxy applies to haproxy: listeners, and no "
                                   "--listen is one")
        text, path = self["greeting"], self["greeting-file"]
        if path == "":
            raise usage.UsageError("--greeting-file: the file name is empty")
        if text is not None and path is not None:
            raise usage.UsageError("--greeting and --greeting-file exclude each other; "
                                   "give one")
        try:
            if path is not None:
                self.greeting = greeting.from_file(path)
            else:
                self.greeting = greeting.from_text(DEFAULT_GREETING if text is None
                                                   else text)
        except greeting.GreetingError as e:
            raise usage.UsageError(str(e)) from None

    def parseArgs(self, *arguments: str) -> None:
        if arguments:
            raise usage.UsageError(
                f"unexpected argument {arguments[0]!r}: options start with -, and a "
                "value that holds spaces needs quotes")

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """
        Under twistd, report a bad command line in one line rather than the
        whole help text twistd would print before it; C{--help} shows that.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if getattr(self, "parent", None) is None:
                raise
            raise SystemExit(f"tcpgreet: {e} (see: twistd tcpgreet --help)") from None


class IServingReactor(IObserverReactor, ISupervisorReactor, IChannelReactor):
    """
    What the services L{makeService} builds need of the reactor, as far as
    their types say: timers, calls from signal handlers and other threads,
    and shutdown triggers.  The endpoints ask for what their types listen
    with (C{listenTCP}, C{listenUNIX}, C{adoptStreamPort}, ...), untyped in
    Twisted's endpoint parser.
    """


def makeService(options: Options, reactor: IServingReactor | None = None) -> IService:
    """
    Build the service for parsed L{Options}; the reactor is a parameter so
    tests can pass a fake one.  With C{--workers} above 1 it is a supervisor
    (L{tcpgreet.workers.supervisor}); a worker it starts builds the ordinary greeting
    service on the listening sockets it was handed.
    """
    if reactor is None:
        # Where the program starts: the one place the server takes the
        # global reactor, to pass it down to everything it builds.
        from twisted.internet import reactor as installed

        reactor = cast(IServingReactor, installed)
    top = (_supervisor if options["workers"] > 1 else _greeter)(options, reactor)
    if startup.daemonizing(getattr(options, "parent", None)):
        # Last, so that it reports once every other service has started.
        startup.ReportStarted(startup.expect_daemon()).setServiceParent(top)
    return top


def _greeter(options: Options, reactor: IServingReactor) -> IService:
    role = options.worker
    worker = role is not None
    wanted = listeners(options)
    facades: list[EndpointReactor] = (
        [InheritedReactor(reactor, fd) for fd in role.listen_fds] if role is not None
        else [reactor] * len(wanted))
    endpoints = _endpoints(options, wanted, facades)
    factory = _factory(options, reactor)
    top = TwistdService(options, reactor)
    greeter = GreetService(factory, endpoints, greeting_file=options["greeting-file"],
                           reactor=reactor, drain_timeout=options["drain-timeout"],
                           announce=not worker)
    greeter.setServiceParent(top)
    if role is not None:
        # After the greeter: it reports ready once the greeter serves.
        ControlService(role.control_fd, factory, reactor).setServiceParent(top)
    if options["metrics"] is not None:
        served = _metrics_service(options["metrics"], reactor, lambda: greeter.factory.stats,
                                  lambda: {"open": greeter.factory.limits.open,
                                           "listeners": len(greeter.ports)})
        serve_health(served.site, lambda: greeter_unready(greeter))
        served.setServiceParent(top)
    return top


def listeners(options: Options) -> list[Listener]:
    """
    What the service listens on: each --listen string as it is, or with
    none given the default (L{default_listen}), its IPv6 half IPv6-only;
    on a machine without IPv6, its IPv4 half alone, as the log says.
    """
    if not options.listen_is_default:
        return [Listener(description) for description in options["listen"]]
    ipv4, ipv6 = options["listen"]
    missing = ipv6_unavailable()
    if missing is not None:
        log.warn("no IPv6 here ({reason}): the default listens on IPv4 alone, {listen}",
                 reason=missing, listen=ipv4)
        return [Listener(ipv4)]
    return [Listener(ipv4), Listener(ipv6, ipv6_only=True)]


class TwistdService(MetricsLast):
    """
    The service twistd runs, which also chooses its log observer (and, as
    a L{MetricsLast}, stops the metrics endpoint last).

    twistd hands this service its application before it starts logging,
    and takes the application's L{ILogObserver} component (what a C{.tac}
    file sets) when its command line names no observer: there goes
    tcpgreet's, with twistd's destination, lines and rotation, but a
    fraction of the cost (L{logs.twistd_default}).  C{--logger} and
    C{--syslog} keep their meaning.
    """

    def __init__(self, options: Options, reactor: IServingReactor) -> None:
        super().__init__()
        # Set on a plugin's options by twistd's own (its ServerOptions).
        self._twistd_options = getattr(options, "parent", None)
        self._reactor = reactor

    def setServiceParent(self, parent: IServiceCollection) -> None:
        twistd_options = self._twistd_options
        if twistd_options is not None:
            if twistd_options.get("logger"):
                # twistd builds that observer with no argument, next.
                logs.serve_on(self._reactor)
            elif (isinstance(parent, Componentized)
                    and parent.getComponent(ILogObserver) is None):
                observer = logs.twistd_default(twistd_options, self._reactor)
                if observer is not None:
                    parent.setComponent(ILogObserver, observer)
        super().setServiceParent(parent)


def _endpoints(options: Options, wanted: list[Listener],
               facades: Sequence[EndpointReactor]) -> list[tuple[str, IStreamServerEndpoint]]:
    """Each listen string and its endpoint, parsed on its reactor facade."""
    trusted = TrustedProxies(options["trusted-proxy"]) if options["trusted-proxy"] else None
    try:
        return [(listener.description,
                 server_endpoint(facade, listener.description, trusted, listener.ipv6_only))
                for listener, facade in zip(wanted, facades, strict=True)]
    except EndpointError as e:
        raise fail(str(e)) from None


def _factory(options: Options, reactor: IServingReactor) -> GreetFactory:
    rate = options["rate-per-ip"]
    limits = ConnectionLimits(
        max_connections=options["max-connections"], max_per_ip=options["max-per-ip"],
        rate=TokenBuckets(*rate) if rate is not None else None)
    if options.greeting is None:
        raise TypeError("makeService takes parsed Options (postOptions sets the greeting)")
    return GreetFactory(options.greeting, quiet=options["quiet"], limits=limits,
                        timeout=options["timeout"], reactor=reactor)


def _supervisor(options: Options, reactor: IServingReactor) -> IService:
    count = options["workers"]
    # Per-address limits are exact only if every connection from one
    # address reaches the same worker: steer them there.  Not behind a
    # proxy, where the address the kernel sees is the proxy's: steered, all
    # its connections would go to one worker.
    per_address = bool(options["max-per-ip"] or options["rate-per-ip"])
    wanted = listeners(options)
    endpoints = _endpoints(options, wanted, [
        WorkerSocketBinder(reactor, count,
                           steer=per_address and not proxied(listener.description),
                           ipv6_only=listener.ipv6_only)
        for listener in wanted])
    supervisor = WorkerSupervisor(
        _factory(options, reactor), endpoints, count,
        worker_arguments(options, [listener.description for listener in wanted]),
        greeting_file=options["greeting-file"], reactor=reactor,
        drain_timeout=options["drain-timeout"])
    top = TwistdService(options, reactor)
    supervisor.setServiceParent(top)
    if options["metrics"] is not None:
        served = _metrics_service(
            options["metrics"], reactor, lambda: supervisor.totals,
            lambda: {"open": supervisor.open_connections, "listeners": len(supervisor.ports),
                     "workers": len(supervisor.workers),
                     "worker_restarts": supervisor.restarts},
            refresh=supervisor.gather)
        serve_health(served.site, lambda: supervisor_unready(supervisor))
        served.setServiceParent(top)
    return top


def _metrics_service(description: str, reactor: IServingReactor, stats: Callable[[], Stats],
                     gauges: Callable[[], dict[str, int]],
                     refresh: Callable[[], Deferred[object]] | None = None,
                     ) -> metrics.MetricsService:
    # Imported here: twisted.web and prometheus_client are loaded only
    # when metrics are served.
    from tcpgreet import metrics

    collector = metrics.GreetCollector(stats, gauges)
    try:
        site = metrics.metrics_site(collector, refresh=refresh)
        endpoint = server_endpoint(reactor, description, option="--metrics")
    except (metrics.MetricsUnavailableError, EndpointError) as e:
        raise fail(str(e)) from None
    return metrics.MetricsService(description, endpoint, site)


__all__ = ["DEFAULT_BACKLOG", "Options", "makeService"]
