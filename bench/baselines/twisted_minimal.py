"""
The baseline: the shortest Twisted greeting server, on the epoll reactor.

usage: python twisted_minimal.py PORT

Protocol.connectionMade writes the greeting and calls loseConnection, as a
Twisted tutorial would.  It listens on 127.0.0.1 with a backlog of 1024,
tcpgreet's default, so that at high concurrency both queue the same number
of connections instead of this one stalling clients in SYN retransmits
behind Twisted's default backlog of 50.
"""

import sys

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import protocol, reactor  # noqa: E402

GREETING = b"Thank you for connecting\r\n"
BACKLOG = 1024


class Greeter(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(GREETING)
        self.transport.loseConnection()


class GreeterFactory(protocol.Factory):
    protocol = Greeter
    noisy = False


reactor.listenTCP(int(sys.argv[1]), GreeterFactory(), backlog=BACKLOG, interface="127.0.0.1")
reactor.run()
