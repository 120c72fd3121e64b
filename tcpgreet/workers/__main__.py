"""
How a worker process starts.  The supervisor runs

    python -m tcpgreet.workers OPTIONS --worker N --worker-control FD --worker-fds FDS

which is C{twistd -n --pidfile= --logger tcpgreet.logs.json_observer
tcpgreet OPTIONS} for worker N (L{WorkerRole}), preceded by what must
happen before Twisted is imported:

  - systemd sockets: Twisted reads C{LISTEN_FDS} and C{LISTEN_FDNAMES} when
    C{twisted.internet.endpoints} is first imported, and only if
    C{LISTEN_PID} names the process.  As systemd does between fork and
    exec, the worker names itself, for the sockets its supervisor laid out
    as systemd did;
  - signals: SIGINT is the supervisor's to act on (Ctrl-C in a terminal
    reaches every process of the group; the supervisor answers it by
    stopping each worker once, with SIGTERM), and a SIGHUP that arrives
    before the greeting service handles it must not end the worker.

The last six arguments are the worker's role
(L{tcpgreet.workers.arguments}), which this module reads and hands to the
tap as C{Options.worker}: they are not options of C{twistd tcpgreet},
which no user can give.
"""

from __future__ import annotations

import os
import signal
import sys

from tcpgreet.workers.arguments import split_arguments

TWISTD_OPTIONS = ("-n", "--pidfile=", "--logger", "tcpgreet.logs.json_observer")

def main(arguments: list[str] | None = None) -> None:
    """Run twistd as worker of the supervisor that started this process."""
    if "LISTEN_FDS" in os.environ:
        os.environ["LISTEN_PID"] = str(os.getpid())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    role, options = split_arguments(sys.argv[1:] if arguments is None else arguments)
    sys.argv = ["twistd", *TWISTD_OPTIONS, "tcpgreet", *options]
    from twisted.scripts.twistd import ServerOptions, runApp

    config = ServerOptions()
    config.parseOptions(sys.argv[1:])
    config.subOptions.worker = role
    runApp(config)


if __name__ == "__main__":
    main()
