"""
The twistd plugin's half that knows about options: C{twistd tcpgreet --help}.

Data flows one way: L{Options} parses and validates the command line,
L{makeService} turns the result into a factory and a service, and nothing
here touches a socket.
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from tcpgreet import greeting
from tcpgreet.endpoints import DEFAULT_BACKLOG, EndpointError, server_endpoint
from tcpgreet.server import GreetFactory
from tcpgreet.service import GreetService, fail

DEFAULT_LISTEN = "tcp:27679"
DEFAULT_GREETING = "Thank you for connecting"


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
        "(UTC, ISO 8601) and {connection} (1, 2, 3, ... per process); write {{ "
        "and }} for literal braces. SIGHUP re-reads --greeting-file. Listen "
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
        self.greeting: greeting.Greeting | None = None

    def opt_listen(self, description: str) -> None:
        """Listen on this Twisted server endpoint; repeatable. [default: tcp:27679]"""
        self["listen"].append(description)

    opt_l = opt_listen

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
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
    tests can pass a fake one.
    """
    if reactor is None:
        from twisted.internet import reactor
    try:
        endpoints = [(description, server_endpoint(reactor, description))
                     for description in options["listen"]]
    except EndpointError as e:
        raise fail(str(e)) from None
    factory = GreetFactory(options.greeting, quiet=options["quiet"])
    return GreetService(factory, endpoints, greeting_file=options["greeting-file"],
                        reactor=reactor)


__all__ = ["DEFAULT_BACKLOG", "Options", "makeService"]
