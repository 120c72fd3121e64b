"""
Start-up errors: one line on the standard error of the command the user
typed, exit status 1, no traceback and no pid file left behind, whether
twistd runs in the foreground (C{-n}) or as a daemon.

In daemon mode twistd forks twice after it has built the service: the
command the user typed (the launcher) waits for a word from the daemon,
whose standard error is /dev/null by then.  twistd's own word, its status
pipe, carries only exceptions (a C{SystemExit} never reaches it, so the
launcher waits for ever), its launcher prints them on two lines, quoted and
cut at 100 bytes, and it waits for ever for a daemon that dies without a
word.  So tcpgreet keeps a pipe of its own (L{Launcher}): the daemon writes
either that it started or its one line, and the launcher prints that line
and exits 1, or, when the daemon died without a word, says so and exits 1.
"""

from __future__ import annotations

import contextlib
import os
import sys

from twisted.application import service
from twisted.python import usage

# The daemon's word that every service started; anything else is the line
# to print.
STARTED = b"started\n"
DIED = ("tcpgreet: the daemon exited while starting, without saying why; "
        "its log (--logfile) may tell")


class StartupError(SystemExit, Exception):
    """
    The end of a process whose start failed, the one line already written.
    A L{SystemExit}, so that it ends the process with its status and no
    traceback; an L{Exception} too, so that twistd, which catches exceptions
    raised while the service starts, removes its pid file on the way out.
    """


class Launcher:
    """
    The command that started twistd in daemon mode, waiting for a word from
    the daemon on a pipe of its own.

    Made in that command's process before twistd forks; after the fork,
    the launcher side waits in an C{os.register_at_fork} hook (the only
    code of ours the launcher runs before twistd's own wait), and the
    daemon side writes through L{started} or L{failed}.
    """

    def __init__(self) -> None:
        self._launcher = os.getpid()
        self._read, self._write = os.pipe()
        self._waited = False
        self.waiting = True  # in the daemon: until it said it started
        os.register_at_fork(after_in_parent=self._after_fork)

    def in_daemon(self) -> bool:
        """Whether this is the daemon (a process forked from the launcher)."""
        return os.getpid() != self._launcher

    def _after_fork(self) -> None:
        # A fork in a process forked from this one runs this hook too
        # (twistd's second fork, the daemon's workers): only the launcher's
        # own first fork waits here.
        if os.getpid() != self._launcher or self._waited:
            return
        self._waited = True
        os.close(self._write)  # so that a daemon gone without a word is EOF
        try:
            word = _read_to_end(self._read)
        except KeyboardInterrupt:
            os._exit(130)
        os.close(self._read)
        if word == STARTED:
            return  # twistd's own wait follows, and ends this process with 0
        line = word.decode("utf-8", "backslashreplace").strip() or DIED
        with contextlib.suppress(OSError):  # even with no standard error, exit 1
            _write_all(2, (line + "\n").encode("utf-8", "backslashreplace"))
        os._exit(1)

    def started(self) -> None:
        """In the daemon: every service started; the launcher may exit 0."""
        self.waiting = False
        _write_all(self._write, STARTED)
        os.close(self._write)
        os.close(self._read)

    def failed(self, line: str) -> None:
        """
        In the daemon: the start failed, for the reason in C{line}.  The
        pipe stays open until this process exits, so that the launcher
        exits after twistd has removed its pid file, not before.
        """
        _write_all(self._write, (line + "\n").encode("utf-8", "backslashreplace"))


_launcher: Launcher | None = None


def daemonizing(twistd_options: usage.Options | None) -> bool:
    """
    Whether twistd, whose options are C{twistd_options} (a plugin's
    options' C{parent}; L{None} when not run by twistd), will fork a daemon.
    """
    if twistd_options is None or "nodaemon" not in twistd_options:
        return False  # not twistd, or not on a system where it daemonizes
    return not (twistd_options["nodaemon"] or twistd_options.get("debug"))


def expect_daemon() -> Launcher:
    """
    Before twistd forks a daemon: have the launcher wait for the daemon's
    word, and L{fail} write to it; the launcher this process will be.
    """
    global _launcher
    if _launcher is None:
        _launcher = Launcher()
    return _launcher


def fail(message: str) -> StartupError:
    """
    Report a start-up failure the operator caused: one line on standard
    error and a non-zero exit status, no traceback.  (Standard error itself,
    not twistd's redirected C{sys.stderr}, which would bury it in the log;
    in the daemon, the launcher's standard error.)
    """
    line = f"tcpgreet: {message}"
    if _launcher is not None and _launcher.in_daemon() and _launcher.waiting:
        _launcher.failed(line)
    else:
        print(line, file=sys.__stderr__, flush=True)
    return StartupError(1)


class ReportStarted(service.Service):
    """
    The last service under the top one: once it starts, every service
    before it has, and the launcher can end.
    """

    name = "report-started"

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher

    def startService(self) -> None:
        super().startService()
        if self.launcher.in_daemon():
            self.launcher.started()


def _read_to_end(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]
