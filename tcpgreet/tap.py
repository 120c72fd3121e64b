"""
The twistd plugin's half that knows about options: C{twistd tcpgreet --help}.

Data flows one way: L{Options} parses and validates the command line,
L{makeService} turns the result into a factory and a service, and nothing
here touches a socket.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

from twisted.application.service import IService
from twisted.python import usage

from tcpgreet import greeting
from tcpgreet.control import ControlService
from tcpgreet.endpoints import DEFAULT_BACKLOG, EndpointError, proxied, server_endpoint
from tcpgreet.handover import HoldingReactor, InheritedReactor
from tcpgreet.health import MetricsLast, greeter_unready, serve_health, supervisor_unready
from tcpgreet.limits import ConnectionLimits, TokenBuckets
from tcpgreet.server import DEFAULT_TIMEOUT, GreetFactory
from tcpgreet.service import DEFAULT_DRAIN_TIMEOUT, GreetService, MetricsService, fail
from tcpgreet.workers import WorkerSupervisor, per_worker

DEFAULT_LISTEN = "tcp:27679"
DEFAULT_GREETING = "Thank you for connecting"
DEFAULT_MAX_CONNECTIONS = 10000


def _number(option: str, text: str, kind=int, minimum: float = 0):
    """C{text} as a number of C{kind} no smaller than C{minimum}, or a
    UsageError naming the option."""
    try:
        value = kind(text)
    except ValueError:
        noun = "a whole number" if kind is int else "a number"
        raise usage.UsageError(f"{option}: {text!r} is not {noun}") from None
    if not math.isfinite(value) or value < minimum:
        raise usage.UsageError(f"{option}: {text!r} must be at least {minimum:g}")
    return value


def parse_rate(text: str) -> tuple[float, int]:
    """C{R[/BURST]}: R new connections a second, bursts of BURST (default: R, at least 1)."""
    rate_text, _, burst_text = text.partition("/")
    rate = _number("--rate-per-ip", rate_text, float)
    if rate <= 0:
        raise usage.UsageError(f"--rate-per-ip: {rate_text!r} must be more than 0")
    burst = (_number("--rate-per-ip", burst_text, int, 1) if burst_text
             else max(1, math.ceil(rate)))
    return rate, burst


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
    return _number("--workers", text, int, 1)


def _help(method):
    """Fold an option method's docstring into one paragraph: usage.Options
    wraps the text but keeps the source's indentation inside it."""
    method.__doc__ = " ".join(method.__doc__.split())
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
        "and }} for literal braces. SIGHUP re-reads --greeting-file. The options "
        "marked 'Internal' are set by tcpgreet itself for its worker processes. Listen "
        "endpoints are Twisted endpoint strings, e.g. tcp:27679, "
        "tcp6:27679:interface=\\:\\:1, ssl:443:privateKey=key.pem:certKey=cert.pem, "
        "unix:/run/tcpgreet.sock, systemd:domain=INET:index=0, haproxy:tcp:27679."
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
        self["workers"] = 1
        self["worker"] = None
        self["worker-control"] = None
        self["worker-fds"] = None
        self.greeting: greeting.Greeting | None = None

    @_help
    def opt_listen(self, description: str) -> None:
        """Listen on this Twisted server endpoint; repeatable. [default: tcp:27679]"""
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
        e.g. tcp:9127:interface=127.0.0.1 (needs tcpgreet[metrics]).
        [default: off]"""
        self["metrics"] = description

    @_help
    def opt_workers(self, value: str) -> None:
        """N|auto: serve with N worker processes, each accepting on the same
        listeners, supervised by this one; auto is one per CPU.
        --max-connections is shared out among them. [default: 1]"""
        self["workers"] = parse_workers(value)

    @_help
    def opt_worker(self, value: str) -> None:
        """Internal, set by --workers for each worker: its number."""
        self["worker"] = _number("--worker", value, int, 1)

    @_help
    def opt_worker_control(self, value: str) -> None:
        """Internal, set by --workers for each worker: the descriptor of its
        control channel."""
        self["worker-control"] = _number("--worker-control", value, int, 0)

    @_help
    def opt_worker_fds(self, value: str) -> None:
        """Internal, set by --workers for each worker: the descriptors of its
        listening sockets, one for each --listen."""
        self["worker-fds"] = [_number("--worker-fds", fd, int, 0) for fd in value.split(",")]

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if self["workers"] > self["max-connections"]:
            raise usage.UsageError(
                f"--workers {self['workers']} is more than --max-connections "
                f"{self['max-connections']}: each worker needs at least one connection")
        self._check_worker()
        text, path = self["greeting"], self["greeting-file"]
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

    def _check_worker(self) -> None:
        internal = (self["worker"], self["worker-control"], self["worker-fds"])
        if internal == (None, None, None):
            return
        if None in internal or len(self["worker-fds"]) != len(self["listen"]) or \
                self["workers"] != 1 or self["metrics"] is not None:
            raise usage.UsageError("--worker, --worker-control and --worker-fds are set by "
                                   "tcpgreet for its workers, not by hand; use --workers")

    def parseOptions(self, options=None) -> None:
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


def makeService(options: Options, reactor=None) -> IService:
    """
    Build the service for parsed L{Options}; the reactor is a parameter so
    tests can pass a fake one.  With C{--workers} above 1 it is a supervisor
    (L{tcpgreet.workers}); a worker it starts builds the ordinary greeting
    service on the listening sockets it was handed.
    """
    if reactor is None:
        from twisted.internet import reactor
    if options["workers"] > 1:
        return _supervisor(options, reactor)
    worker = options["worker"] is not None
    facades = ([InheritedReactor(reactor, fd) for fd in options["worker-fds"]] if worker
               else [reactor] * len(options["listen"]))
    endpoints = _endpoints(options, facades)
    factory = _factory(options, reactor)
    top = MetricsLast()
    greeter = GreetService(factory, endpoints, greeting_file=options["greeting-file"],
                           reactor=reactor, drain_timeout=options["drain-timeout"],
                           announce=not worker)
    greeter.setServiceParent(top)
    if worker:
        # After the greeter: it reports ready once the greeter serves.
        ControlService(options["worker-control"], factory, reactor).setServiceParent(top)
    if options["metrics"] is not None:
        served = _metrics_service(options["metrics"], reactor, lambda: greeter.factory.stats,
                                  lambda: {"open": greeter.factory.limits.open,
                                           "listeners": len(greeter.ports)})
        serve_health(served.site, lambda: greeter_unready(greeter))
        served.setServiceParent(top)
    return top


def _endpoints(options: Options, facades: list) -> list:
    """Each --listen string and its endpoint, parsed on its reactor facade."""
    try:
        return [(description, server_endpoint(facade, description))
                for description, facade in zip(options["listen"], facades, strict=True)]
    except EndpointError as e:
        raise fail(str(e)) from None


def _factory(options: Options, reactor) -> GreetFactory:
    rate = options["rate-per-ip"]
    limits = ConnectionLimits(
        max_connections=options["max-connections"], max_per_ip=options["max-per-ip"],
        rate=TokenBuckets(*rate) if rate else None)
    return GreetFactory(options.greeting, quiet=options["quiet"], limits=limits,
                        timeout=options["timeout"], reactor=reactor)


def _supervisor(options: Options, reactor) -> IService:
    count = options["workers"]
    # Per-address limits are exact only if every connection from one
    # address reaches the same worker: steer them there.  Not behind a
    # proxy, where the address the kernel sees is the proxy's: steered, all
    # its connections would go to one worker.
    per_address = bool(options["max-per-ip"] or options["rate-per-ip"])
    endpoints = _endpoints(options, [
        HoldingReactor(reactor, count, steer=per_address and not proxied(description))
        for description in options["listen"]])
    supervisor = WorkerSupervisor(
        _factory(options, reactor), endpoints, count, worker_arguments(options),
        greeting_file=options["greeting-file"], reactor=reactor,
        drain_timeout=options["drain-timeout"])
    top = MetricsLast()
    supervisor.setServiceParent(top)
    if options["metrics"] is not None:
        served = _metrics_service(
            options["metrics"], reactor, lambda: supervisor.totals,
            lambda: {"open": supervisor.openConnections, "listeners": len(supervisor.ports),
                     "workers": len(supervisor.workers),
                     "worker_restarts": supervisor.restarts},
            refresh=supervisor.gather)
        serve_health(served.site, lambda: supervisor_unready(supervisor))
        served.setServiceParent(top)
    return top


def worker_arguments(options: Options) -> list[str]:
    """
    The options every worker runs with: the supervisor's own, each
    worker's share of --max-connections, and neither --workers nor
    --metrics, which are the supervisor's.
    """
    arguments = [f"--listen={description}" for description in options["listen"]]
    if options["greeting-file"] is not None:
        # twistd may change directory after reading the options.
        arguments.append(f"--greeting-file={os.path.abspath(options['greeting-file'])}")
    elif options["greeting"] is not None:
        arguments.append(f"--greeting={options['greeting']}")
    if options["quiet"]:
        arguments.append("--quiet")
    rate = options["rate-per-ip"]
    arguments += [
        f"--max-connections={per_worker(options['max-connections'], options['workers'])}",
        f"--max-per-ip={options['max-per-ip']}",
        *([f"--rate-per-ip={rate[0]!r}/{rate[1]}"] if rate else []),
        f"--timeout={options['timeout']!r}",
        f"--drain-timeout={options['drain-timeout']!r}",
    ]
    return arguments


def _metrics_service(description: str, reactor, stats: Callable, gauges: Callable,
                     refresh: Callable | None = None) -> MetricsService:
    from tcpgreet import metrics

    collector = metrics.GreetCollector(stats, gauges)
    try:
        site = metrics.metrics_site(collector, refresh=refresh)
        endpoint = server_endpoint(reactor, description)
    except (metrics.MetricsUnavailableError, EndpointError) as e:
        raise fail(str(e).replace("listen endpoint", "--metrics endpoint")) from None
    return MetricsService(description, endpoint, site)


__all__ = ["DEFAULT_BACKLOG", "Options", "makeService", "worker_arguments"]
