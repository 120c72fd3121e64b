"""
Daemon mode (twistd without -n): a start-up error reaches the command that
launched the daemon, and a good start still ends it with 0.

These run the real twistd, each in a temporary directory whose path is in
the daemon's command line (--pidfile=, --logfile=): a daemon leaves the
test's process group, so the cleanup finds it, and its workers, by that.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from .helpers import (
    fetch,
    kill_processes_with_argument,
    processes_with_argument,
    twistd,
    wait_until,
)

# A launcher that waits longer than this for its daemon is hanging: a start
# takes well under a second here, a few on a busy machine.
LAUNCH_TIMEOUT = 20.0
LOCAL = "tcp:0:interface=127.0.0.1"


class DaemonTestCase(SynchronousTestCase):
    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="tcpgreet-daemon-")
        self.pidfile = os.path.join(self.directory, "tcpgreet.pid")
        self.logfile = os.path.join(self.directory, "tcpgreet.log")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.addCleanup(kill_processes_with_argument, self.directory)

    def launch(self, *args: str) -> subprocess.CompletedProcess:
        """Run C{twistd --pidfile= --logfile= tcpgreet ARGS}, without -n."""
        return twistd(f"--pidfile={self.pidfile}", f"--logfile={self.logfile}", "tcpgreet",
                      *args, timeout=LAUNCH_TIMEOUT, cwd=self.directory)

    def log(self) -> str:
        with open(self.logfile) as f:
            return f.read()

    def portInUse(self) -> tuple[socket.socket, str]:
        """A socket listening on a loopback port, and the --listen string for it."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        return taken, f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"


class DaemonStartupErrorTests(DaemonTestCase):
    def assertLaunchFails(self, *args: str, line: str) -> None:
        result = self.launch(*args)
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (1, "", line + "\n"))
        self.assertFalse(os.path.exists(self.pidfile), "the pid file was left behind")
        wait_until(lambda: not processes_with_argument(self.directory), 10,
                   "the daemon to be gone")
        # The log has the line too, as a critical event, and no traceback.
        self.assertIn(f"[tcpgreet.service#critical] {line.removeprefix('tcpgreet: ')}",
                      self.log())
        self.assertNotIn("Traceback", self.log())

    def test_port_in_use(self):
        _, listen = self.portInUse()
        self.assertLaunchFails("--listen", listen, line=in_use(listen))

    def test_port_in_use_with_workers(self):
        _, listen = self.portInUse()
        self.assertLaunchFails("--workers", "2", "--listen", listen, line=in_use(listen))

    def test_metrics_port_in_use(self):
        _, metrics = self.portInUse()
        self.assertLaunchFails("--listen", LOCAL, "--workers", "2", "--metrics", metrics,
                               line=in_use(metrics))

    def test_a_long_line_arrives_whole(self):
        # Longer than the 100 bytes twistd's own status pipe carries.
        path = os.path.join(self.directory, "a-socket-path-that-makes-the-line-long.sock")
        with open(path, "w"):
            pass
        listen = f"unix:{path}"
        self.assertGreater(len(in_use(listen)), 100)
        self.assertLaunchFails("--listen", listen, line=in_use(listen))

    def test_error_found_before_the_fork(self):
        # Found while the service is built, before twistd writes a pid file.
        result = self.launch("--listen", "tpc:80")
        self.assertEqual((result.returncode, result.stdout), (1, ""))
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertRegex(result.stderr, r"^tcpgreet: .*'tpc:80'")
        self.assertFalse(os.path.exists(self.pidfile))


class DaemonStartTests(DaemonTestCase):
    def test_a_good_start_ends_the_launcher_with_0(self):
        for extra in ((), ("--workers", "2")):
            result = self.launch("--listen", LOCAL, "--quiet", *extra)
            self.assertEqual((result.returncode, result.stdout, result.stderr), (0, "", ""))
            with open(self.pidfile) as f:
                pid = int(f.read())
            port = int(wait_until(lambda: _listening_port(self.log()), 10, "the start-up line"))
            if extra:
                wait_until(lambda: self.log().count(" ready") == 2, 10, "both workers")
            self.assertEqual(fetch("127.0.0.1", port), b"Thank you for connecting\r\n")
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: not processes_with_argument(self.directory), 15,
                       "the daemon to stop")
            self.assertFalse(os.path.exists(self.pidfile))
            os.remove(self.logfile)


class ForegroundPidFileTests(DaemonTestCase):
    def test_start_up_error_removes_the_pid_file(self):
        _, listen = self.portInUse()
        for extra in ((), ("--workers", "2")):
            result = twistd("-n", f"--pidfile={self.pidfile}", "tcpgreet", "--listen", listen,
                            *extra, timeout=LAUNCH_TIMEOUT, cwd=self.directory)
            self.assertEqual((result.returncode, result.stderr), (1, in_use(listen) + "\n"))
            self.assertFalse(os.path.exists(self.pidfile), "the pid file was left behind")


class LauncherTests(SynchronousTestCase):
    """
    L{tcpgreet.startup.Launcher} on its own, in a process of its own (its
    fork hook must not stay in the test's process): each word the daemon
    can give, and none.
    """

    def fork(self, daemon: str) -> subprocess.CompletedProcess:
        script = textwrap.dedent(f"""
            import os, sys
            from tcpgreet import startup
            launcher = startup.expect_daemon()
            if os.fork() == 0:
                {daemon}
                os._exit(0)
            print("launcher goes on")
        """)
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=LAUNCH_TIMEOUT, stdin=subprocess.DEVNULL)

    def test_started(self):
        result = self.fork("launcher.started()")
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (0, "launcher goes on\n", ""))

    def test_failed(self):
        result = self.fork("raise startup.fail('cannot listen on: whatever')")
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (1, "", "tcpgreet: cannot listen on: whatever\n"))

    def test_gone_without_a_word(self):
        result = self.fork("os._exit(3)")
        self.assertEqual((result.returncode, result.stdout), (1, ""))
        self.assertEqual(result.stderr.splitlines(), [
            "tcpgreet: the daemon exited while starting, without saying why; "
            "its log (--logfile) may tell"])


def in_use(listen: str) -> str:
    return f"tcpgreet: cannot listen on {listen!r}: address already in use"


def _listening_port(log: str) -> str | None:
    match = re.search(r"listening on .*?\(127\.0\.0\.1:(\d+)\)", log)
    return match.group(1) if match else None
