"""
How a worker process starts.  The supervisor runs

    python -m tcpgreet.worker OPTIONS

which is C{twistd -n --pidfile= --logger tcpgreet.logs.json_observer
tcpgreet OPTIONS}, preceded by what must happen before Twisted is imported:

  - systemd sockets: Twisted reads C{LISTEN_FDS} and C{LISTEN_FDNAMES} when
    C{twisted.internet.endpoints} is first imported, and only if
    C{LISTEN_PID} names the process.  As systemd does between fork and
    exec, the worker names itself, for the sockets its supervisor laid out
    as systemd did;
  - signals: SIGINT is the supervisor's to act on (Ctrl-C in a terminal
    reaches every process of the group; the supervisor answers it by
    stopping each worker once, with SIGTERM), and a SIGHUP that arrives
    before the greeting service handles it must not end the worker.

The OPTIONS are tcpgreet's, with the internal C{--worker} ones.
"""

import os
import signal
import sys

TWISTD_OPTIONS = ("-n", "--pidfile=", "--logger", "tcpgreet.logs.json_observer")


def main(arguments: list[str] | None = None) -> None:
    """Run twistd as worker of the supervisor that started this process."""
    if "LISTEN_FDS" in os.environ:
        os.environ["LISTEN_PID"] = str(os.getpid())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if arguments is None:
        arguments = sys.argv[1:]
    sys.argv = ["twistd", *TWISTD_OPTIONS, "tcpgreet", *arguments]
    from twisted.scripts.twistd import run

    run()


if __name__ == "__main__":
    main()
