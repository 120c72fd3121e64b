"""
systemd socket activation with the real C{systemd-socket-activate}: it
binds the listening sockets, waits for the first connection, then execs
twistd with the sockets inherited (C{LISTEN_FDS}, C{LISTEN_PID} and, with
C{--fdname}, C{LISTEN_FDNAMES}), as systemd does for a socket unit.

C{systemd-socket-activate} cannot listen on port 0 and say which port it
got, so the test picks an unused port and retries if another process takes
it first.  The first connection is made before twistd exists: it waits in
the kernel's listen queue and must still be greeted, which is the point of
socket activation.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from unittest import skipUnless

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from . import confine, tls
from .helpers import (
    TWISTD,
    Program,
    fetch,
    has_ipv6_loopback,
    require_tool,
    twistd_command,
    unused_port,
)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"

DEFAULT = b"Thank you for connecting\r\n"
ATTEMPTS = 5
# Long enough for twistd to start on a loaded machine: the first connection
# waits for it.
FIRST_GREETING_TIMEOUT = 30.0


def bracketed(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def socket_activate(testcase, command: list[str], fdnames: list[str] | None = None,
                    sockets: int = 1, host: str = "127.0.0.1",
                    preexec_fn=None, hosts: list[str] | None = None
                    ) -> tuple[Program, list[int]]:
    """
    Run C{systemd-socket-activate [--fdname=...] --listen=HOST:PORT... COMMAND}
    and wait until it listens; the program and its ports.  C{hosts}: a
    host for each socket, instead of C{sockets} on C{host}.
    """
    tool = require_tool(testcase, "systemd-socket-activate")
    options = [f"--fdname={':'.join(fdnames)}"] if fdnames else []
    hosts = hosts or [host] * sockets
    for _ in range(ATTEMPTS):
        ports = [unused_port(host) for host in hosts]
        addresses = [bracketed(host, port) for host, port in zip(hosts, ports, strict=True)]
        program = Program([tool, *options, *(f"--listen={address}" for address in addresses),
                           *command], preexec_fn=preexec_fn)
        testcase.addCleanup(program.stop)
        try:
            for fd, address in enumerate(addresses, start=3):
                program.wait_for(rf"Listening on {re.escape(address)} as {fd}\.")
            return program, ports
        except AssertionError:
            if "Address already in use" not in program.log:
                raise
    testcase.fail(f"no free port for systemd-socket-activate in {ATTEMPTS} attempts")


class SocketActivationTests(SynchronousTestCase):
    def activate(self, *twistd_args: str, **options) -> tuple[Program, list[int]]:
        """Socket-activate C{twistd -n --pidfile= tcpgreet TWISTD_ARGS}."""
        return socket_activate(self, twistd_command(*twistd_args), **options)

    def test_index(self):
        program, [port] = self.activate("--listen", "systemd:domain=INET:index=0",
                                        fdnames=["tcpgreet"])
        self.assertEqual(fetch("127.0.0.1", port, timeout=FIRST_GREETING_TIMEOUT), DEFAULT)
        program.wait_for(rf"listening on systemd:domain=INET:index=0 \(127\.0\.0\.1:{port}\)")
        program.wait_for(r"127\.0\.0\.1 port \d+: greeted, 26 bytes")
        self.assertEqual(fetch("127.0.0.1", port), DEFAULT)

    def test_name_picks_its_socket(self):
        # Two inherited sockets; name= must take the second, which index=0
        # would not.
        program, [_, port] = self.activate(
            "--listen", "systemd:domain=INET:name=tcpgreet", "--greeting", "by name",
            fdnames=["spare", "tcpgreet"], sockets=2)
        self.assertEqual(fetch("127.0.0.1", port, timeout=FIRST_GREETING_TIMEOUT),
                         b"by name\r\n")
        program.wait_for(
            rf"listening on systemd:domain=INET:name=tcpgreet \(127\.0\.0\.1:{port}\)")

    def test_behind_the_proxy_wrapper(self):
        # haproxy:systemd:... is how a socket-activated instance sits behind
        # HAProxy; a v1 header carries the original client.
        program, [port] = self.activate(
            "--listen", "haproxy:systemd:domain=INET:name=tcpgreet",
            fdnames=["tcpgreet"])
        header = f"PROXY TCP4 192.0.2.7 127.0.0.1 40000 {port}\r\n".encode()
        self.assertEqual(
            fetch("127.0.0.1", port, send=header, timeout=FIRST_GREETING_TIMEOUT), DEFAULT)
        line = program.wait_for(r"port \d+: greeted").string
        self.assertRegex(line, r"192\.0\.2\.7 port 40000: greeted")


    def test_without_fdname(self):
        # Twisted adopts inherited sockets only when LISTEN_FDNAMES is set;
        # systemd units always set it, systemd-socket-activate only with
        # --fdname.  Acceptable outcomes: the socket is adopted anyway, or
        # twistd stops with one line that tells the operator what is missing.
        program, [port] = self.activate("--listen", "systemd:domain=INET:index=0")
        try:
            received = fetch("127.0.0.1", port, timeout=FIRST_GREETING_TIMEOUT)
        except OSError:  # reset: twistd exited and the listening socket closed
            received = b""
        if received == DEFAULT:
            return
        self.assertNotEqual(program.exit_status(), 0)
        self.assertNotIn("Traceback", program.log)
        errors = [line for line in program.lines if line.startswith("tcpgreet:")]
        self.assertEqual(len(errors), 1, program.log)
        self.assertRegex(errors[0], r"LISTEN_FDNAMES|--fdname")


    @skipUnless(has_ipv6_loopback(), "no IPv6 loopback")
    def test_domain_must_match_the_socket(self):
        # An IPv6 socket (ListenStream=27679 is one) adopted as domain=INET:
        # acceptable outcomes are the right address or a one-line refusal,
        # never a made-up address.
        program, [port] = self.activate(
            "--listen", "systemd:domain=INET:index=0", "--greeting", "{peer_host}",
            fdnames=["tcpgreet"], host="::1")
        try:
            received = fetch("::1", port, timeout=FIRST_GREETING_TIMEOUT)
        except OSError:
            received = b""
        if received:
            self.assertEqual(received, b"::1\r\n")
            return
        self.assertNotEqual(program.exit_status(), 0)
        self.assertNotIn("Traceback", program.log)
        self.assertRegex(program.log, r"(?m)^tcpgreet: .*(domain|INET6|IPv6)")



# Where a test's copy of the socket unit listens, for each address the
# unit binds: the loopback address of that family.
LOOPBACK = {"0.0.0.0": "127.0.0.1", "[::]": "::1"}


def unit_settings(path: Path) -> dict[str, list[str]]:
    """
    A unit file's settings as C{"Section.Key"} -> its values in order, read
    the way systemd reads them: comments skipped, a line ending in a
    backslash continued on the next.
    """
    settings: dict[str, list[str]] = {}
    section = ""
    for line in re.sub(r"\\\n", " ", path.read_text()).splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


class UnitFileTests(SynchronousTestCase):
    """
    deploy/tcpgreet.socket and deploy/tcpgreet.service.  Without systemd
    running as PID 1, the units cannot be started here; instead systemd's
    own tools check them, and the service's command line runs under
    C{systemd-socket-activate} with the socket unit's descriptor name and
    part of the unit's confinement.
    """

    def setUp(self):
        self.socket = unit_settings(DEPLOY / "tcpgreet.socket")
        self.service = unit_settings(DEPLOY / "tcpgreet.service")
        self.command = shlex.split(self.service["Service.ExecStart"][0])
        directory = tempfile.mkdtemp(prefix="tcpgreet-units-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        self.directory = Path(directory)
        # The socket unit's sockets, as systemd passes them: on loopback
        # here, each under the unit's one name.
        [name] = self.socket["Socket.FileDescriptorName"]
        self.hosts = [LOOPBACK[listen.rsplit(":", 1)[0]]
                      for listen in self.socket["Socket.ListenStream"]]
        self.fdnames = [name] * len(self.hosts)

    def activate_unit(self, command: list[str], preexec_fn, others: tuple[str, ...] = ()
                      ) -> tuple[Program, list[int]]:
        """
        Socket-activate C{command} with the socket unit's sockets (and
        C{others}, names of IPv4 sockets of other units, after them).
        """
        if not has_ipv6_loopback():
            raise SkipTest("no IPv6 loopback, which the socket unit binds")
        return socket_activate(self, command, fdnames=[*self.fdnames, *others],
                               hosts=[*self.hosts, *["127.0.0.1"] * len(others)],
                               preexec_fn=preexec_fn)

    def assertGreetsBothFamilies(self, ports: list[int], greeting: bytes) -> None:
        """The first connection, made before twistd runs, then one on each other socket."""
        for host, port in zip(self.hosts, ports, strict=False):
            self.assertEqual(fetch(host, port, timeout=FIRST_GREETING_TIMEOUT), greeting)

    def local_units(self, drop_ins: bool = False) -> list[Path]:
        """
        Copies of the units (and, with C{drop_ins}, of their drop-ins) that
        run the twistd under test instead of the one the units expect in
        /opt, which systemd-analyze requires to exist.
        """
        sources = [DEPLOY / "tcpgreet.socket", DEPLOY / "tcpgreet.service"]
        if drop_ins:
            sources += sorted((DEPLOY / "tcpgreet.service.d").glob("*.conf"))
        self.assertIn(self.command[0], sources[1].read_text())
        copies = []
        for source in sources:
            copy = self.directory / source.relative_to(DEPLOY)
            copy.parent.mkdir(exist_ok=True)
            copy.write_text(source.read_text().replace(self.command[0], TWISTD))
            copies.append(copy)
        return copies

    def test_systemd_analyze_verify(self):
        # Drop-ins next to a unit given by path are read with it.
        analyze = require_tool(self, "systemd-analyze")
        socket, service, *drop_ins = self.local_units(drop_ins=True)
        self.assertEqual([path.name for path in drop_ins], ["metrics.conf", "tls.conf"])
        metrics_socket = self.directory / "tcpgreet-metrics.socket"
        metrics_socket.write_text((DEPLOY / "tcpgreet-metrics.socket").read_text())
        result = subprocess.run([analyze, "verify", str(socket), str(metrics_socket),
                                 str(service)],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))

    def test_service_exposure_is_safe(self):
        # systemd's own score of the hardening: 0 (confined) to 10 (exposed).
        analyze = require_tool(self, "systemd-analyze")
        _, service = self.local_units()
        result = subprocess.run([analyze, "security", "--offline=yes", str(service)],
                                capture_output=True, text=True, timeout=60)
        match = re.search(r"Overall exposure level for tcpgreet\.service: ([\d.]+) (\w+)",
                          result.stdout)
        self.assertIsNotNone(match, result.stdout + result.stderr)
        self.assertEqual(match.group(2), "SAFE", result.stdout)

    def test_socket_is_what_the_service_adopts(self):
        # As tcpgreet's own default: every IPv4 and every IPv6 address, two
        # sockets (a bare port would be one dual-stack IPv6 socket), adopted
        # by position, each as its family.
        self.assertEqual(self.socket["Socket.ListenStream"], ["0.0.0.0:27679", "[::]:27679"])
        self.assertEqual(self.socket["Socket.BindIPv6Only"], ["ipv6-only"])
        listens = [self.command[i + 1] for i, argument in enumerate(self.command)
                   if argument == "--listen"]
        self.assertEqual(listens, ["systemd:domain=INET:index=0",
                                   "systemd:domain=INET6:index=1"])
        self.assertEqual(self.service["Unit.Requires"], ["tcpgreet.socket"])

    def test_service_command_greets_and_reloads(self):
        greeting = self.directory / "greeting.txt"
        greeting.write_text("first\n")
        command = [TWISTD, *self.command[1:]]
        where = command.index("--greeting-file") + 1
        self.assertTrue(command[where].startswith("/etc/"), command[where])
        command[where] = str(greeting)
        program, ports = self.activate_unit(command, confine.like_the_unit)
        self.assertGreetsBothFamilies(ports, b"first\r\n")
        program.wait_for(rf"listening on systemd:domain=INET:index=0 \(127\.0\.0\.1:{ports[0]}\), "
                         rf"systemd:domain=INET6:index=1 \(\[::1\]:{ports[1]}\); ")
        port = ports[0]

        # What "systemctl reload tcpgreet" runs.
        self.assertEqual(self.service["Service.ExecReload"], ["/bin/kill -HUP $MAINPID"])
        greeting.write_text("second\n")
        program.signal(signal.SIGHUP)
        program.wait_for(r"reloaded greeting from .*greeting\.txt")
        self.assertEqual(fetch("127.0.0.1", port), b"second\r\n")
        program.stop()
        self.assertNotIn("Traceback", program.log)

    def test_tls_drop_in_command_greets_over_tls(self):
        drop_in = unit_settings(DEPLOY / "tcpgreet.service.d" / "tls.conf")
        self.assertEqual(drop_in["Service.MemoryDenyWriteExecute"], ["no"])
        self.assertEqual(drop_in["Service.PrivateNetwork"], ["no"])
        # "ExecStart=" first empties the list the drop-in then replaces.
        reset, exec_start = drop_in["Service.ExecStart"]
        self.assertEqual(reset, "")
        # systemd's copies of the credentials, under the names the drop-in
        # gives them, in what %d stands for.
        credentials = self.directory / "credentials"
        credentials.mkdir()
        files = tls.self_signed(self.directory)
        for setting in drop_in["Service.LoadCredential"]:
            name, _, source = setting.partition(":")
            self.assertTrue(source.startswith("/etc/tcpgreet/"), source)
            kind = "key" if "key" in name else "cert"
            shutil.copy(getattr(files, kind), credentials / name)
        greeting = self.directory / "greeting.txt"
        greeting.write_text("over TLS\n")
        command = [TWISTD]
        for argument in shlex.split(exec_start)[1:]:
            argument = argument.replace("%d", str(credentials))
            argument = re.sub(r"^ssl:\d+:", "ssl:0:interface=127.0.0.1:", argument)
            command.append(str(greeting) if argument.startswith("/etc/") else argument)
        program, ports = self.activate_unit(command, confine.without_privileges)
        self.assertGreetsBothFamilies(ports, b"over TLS\r\n")
        tls_port = int(program.wait_for(r"ssl:0:\S+ \(127\.0\.0\.1:(\d+)\)").group(1))
        result = tls.s_client(self, tls_port, files.trust)
        self.assertEqual((result.returncode, result.stdout), (0, b"over TLS\r\n"),
                         result.stderr)

    def test_metrics_drop_in_serves_metrics_on_its_socket(self):
        metrics_socket = unit_settings(DEPLOY / "tcpgreet-metrics.socket")
        self.assertEqual(metrics_socket["Socket.ListenStream"], ["127.0.0.1:9127"])
        [metrics_name] = metrics_socket["Socket.FileDescriptorName"]
        drop_in = unit_settings(DEPLOY / "tcpgreet.service.d" / "metrics.conf")
        self.assertEqual(drop_in["Service.Sockets"],
                         ["tcpgreet.socket tcpgreet-metrics.socket"])
        reset, exec_start = drop_in["Service.ExecStart"]
        self.assertEqual(reset, "")
        self.assertIn(f"--metrics systemd:domain=INET:name={metrics_name}", exec_start)
        greeting = self.directory / "greeting.txt"
        greeting.write_text("measured\n")
        command = [TWISTD] + [str(greeting) if argument.startswith("/etc/") else argument
                              for argument in shlex.split(exec_start)[1:]]
        # systemd passes the sockets in the order of Sockets=.
        program, [*ports, metrics_port] = self.activate_unit(
            command, confine.like_the_unit, others=(metrics_name,))
        self.assertGreetsBothFamilies(ports, b"measured\r\n")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=10) as response:
            text = response.read().decode()
        self.assertRegex(text, r"(?m)^tcpgreet_connections_greeted_total 2\.0$")
        program.stop()
        self.assertNotIn("Traceback", program.log)
