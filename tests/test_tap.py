"""
Options parsing, the help text, and what makeService builds.
"""

import io
import ipaddress
import os
import re
import signal
import socket
import sys
from pathlib import Path

from twisted.application.service import MultiService
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web.server import Site

from tcpgreet import startup, tap
from tcpgreet.endpoints import Listener
from tcpgreet.proxy import ProxyHeaderFactory
from tcpgreet.server import GreetFactory
from tcpgreet.service import GreetService
from tcpgreet.workers.arguments import (
    WorkerRole,
    role_arguments,
    split_arguments,
    worker_arguments,
)
from tcpgreet.workers.handover import HeldListener, InheritedReactor
from tcpgreet.workers.supervisor import WorkerSupervisor

from .certificates import make_certificate
from .helpers import has_ipv6_loopback, temporary_file, unused_dual_port


def parse(*args):
    options = tap.Options()
    options.parseOptions(list(args))
    return options


class OptionsTests(SynchronousTestCase):
    def test_defaults(self):
        options = parse()
        self.assertEqual(dict(options), {
            "listen": ["tcp:27679", "tcp6:27679"], "greeting": None, "greeting-file": None,
            "quiet": 0, "max-connections": 10000, "max-per-ip": 0, "rate-per-ip": None,
            "timeout": 10.0, "drain-timeout": 5.0, "metrics": None, "trusted-proxy": [],
            "workers": 1,
        })
        self.assertEqual(options.greeting.static, b"Thank you for connecting\r\n")
        self.assertIsNone(options.worker)

    def test_everything_given(self):
        path = temporary_file(self, b"motd\n")
        options = parse("-l", "tcp:1", "--listen", "tcp6:2", "-f", path, "-q",
                        "--max-connections", "5", "--max-per-ip", "2", "--rate-per-ip",
                        "0.5/3", "--timeout", "2.5", "--drain-timeout", "0", "--workers", "3")
        self.assertEqual(dict(options), {
            "listen": ["tcp:1", "tcp6:2"], "greeting": None, "greeting-file": path,
            "quiet": 1, "max-connections": 5, "max-per-ip": 2, "rate-per-ip": (0.5, 3),
            "timeout": 2.5, "drain-timeout": 0.0, "metrics": None, "trusted-proxy": [],
            "workers": 3,
        })
        self.assertEqual(options.greeting.static, b"motd\r\n")

    def test_rate_burst_defaults_to_the_rate(self):
        self.assertEqual(parse("--rate-per-ip", "5")["rate-per-ip"], (5.0, 5))
        self.assertEqual(parse("--rate-per-ip", "0.2")["rate-per-ip"], (0.2, 1))

    def test_bad_numbers_name_the_option(self):
        for args, message in [
            (["--max-connections", "many"], "--max-connections: 'many' is not a whole number"),
            (["--max-connections", "0"], "--max-connections: '0' must be at least 1"),
            (["--max-per-ip", "-1"], "--max-per-ip: '-1' must be at least 0"),
            (["--rate-per-ip", "0"], "--rate-per-ip '0': R must be more than 0"),
            (["--rate-per-ip", "-1/3"], "--rate-per-ip '-1/3': R must be more than 0"),
            (["--rate-per-ip", "nan"], "--rate-per-ip 'nan': R is not a finite number"),
            (["--rate-per-ip", "5/0"], "--rate-per-ip '5/0': BURST must be at least 1"),
            (["--rate-per-ip", "5/"], "--rate-per-ip '5/': BURST is missing after the /"),
            (["--rate-per-ip", "5/2.5"], "--rate-per-ip '5/2.5': BURST is not a whole number"),
            (["--rate-per-ip", "fast"], "--rate-per-ip 'fast': R is not a number"),
            (["--rate-per-ip", "/3"], "--rate-per-ip '/3': R is not a number"),
            (["--timeout", "nan"], "--timeout: 'nan' is not a finite number"),
            (["--timeout", "0"], "--timeout: '0' must be at least 0.001"),
            (["--drain-timeout", "inf"], "--drain-timeout: 'inf' is not a finite number"),
            (["--workers", "0"], "--workers: '0' must be at least 1"),
            (["--workers", "two"], "--workers: 'two' is not a whole number or auto"),
            (["--greeting-file", ""], "--greeting-file: the file name is empty"),
            (["--quiet", "extra"], "unexpected argument 'extra': options start with -, "
                                   "and a value that holds spaces needs quotes"),
            (["--workers", "3", "--max-connections", "2"],
             "--workers 3 is more than --max-connections 2: each worker needs at least "
             "one connection"),
        ]:
            with self.assertRaises(usage.UsageError) as caught:
                parse(*args)
            self.assertEqual(str(caught.exception), message)

    def test_workers_auto_is_the_usable_cpus(self):
        self.assertEqual(parse("--workers", "auto")["workers"], len(os.sched_getaffinity(0)))
        self.assertEqual(parse("--workers", "2")["workers"], 2)

    def test_a_worker_role_is_no_option(self):
        # (--worker itself is an abbreviation of --workers, as getopt goes.)
        for option in ("--worker-control", "--worker-fds"):
            with self.assertRaises(usage.UsageError) as caught:
                parse(option, "1")
            self.assertEqual(str(caught.exception), f"option {option} not recognized")

    def test_worker_arguments_reproduce_the_options(self):
        path = temporary_file(self)
        supervisor = parse("-l", "tcp:1", "-l", r"tcp6:2:interface=\:\:1", "-f", path, "-q",
                           "--max-connections", "9", "--max-per-ip", "2", "--rate-per-ip",
                           "0.1/3", "--timeout", "2.5", "--drain-timeout", "0.25",
                           "--workers", "4", "--metrics", "tcp:9127")
        arguments = worker_arguments(supervisor, supervisor["listen"])
        self.assertNotIn("--metrics", " ".join(arguments))
        worker = parse(*arguments)
        expected = dict(supervisor, **{"max-connections": 2, "workers": 1, "metrics": None,
                                       "greeting-file": os.path.abspath(path)})
        self.assertEqual(dict(worker), expected)
        role = WorkerRole(number=3, control_fd=7, listen_fds=(8, 9))
        self.assertEqual(split_arguments([*arguments, *role_arguments(role)]), (role, arguments))
        greeted = parse(*worker_arguments(parse("-g", "-{{x}}- ", "--workers", "2"), ["tcp:1"]))
        self.assertEqual(greeted["greeting"], "-{{x}}- ")

    def test_trusted_proxies_are_networks(self):
        options = parse("-l", "haproxy:tcp:1", "--trusted-proxy", "127.0.0.1",
                        "--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "2001:db8::/32")
        self.assertEqual(options["trusted-proxy"], [
            ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("2001:db8::/32")])

    def test_a_bad_trusted_proxy_is_named(self):
        for value, message in [
            ("10.0.0.300", "--trusted-proxy: '10.0.0.300' is not an IP address or network "
                           "(such as 10.0.0.0/8, 2001:db8::/32 or 127.0.0.1)"),
            ("proxy.example", "--trusted-proxy: 'proxy.example' is not an IP address"),
            ("10.0.0.0/33", "--trusted-proxy: '10.0.0.0/33' is not an IP address"),
            ("", "--trusted-proxy: '' is not an IP address"),
            ("10.0.0.1/8", "--trusted-proxy: '10.0.0.1/8' has host bits set "
                           "(the network would be 10.0.0.0/8)"),
        ]:
            with self.assertRaises(usage.UsageError) as caught:
                parse("-l", "haproxy:tcp:1", "--trusted-proxy", value)
            self.assertTrue(str(caught.exception).startswith(message), str(caught.exception))

    def test_trusted_proxy_needs_a_proxy_listener(self):
        with self.assertRaises(usage.UsageError) as caught:
            parse("-l", "tcp:1", "--trusted-proxy", "127.0.0.1")
        self.assertEqual(str(caught.exception), "--trusted-proxy applies to haproxy: "
                                                "listeners, and no --listen is one")
        parse("-l", "tcp:1", "-l", "haproxy:unix:/run/greet.sock", "--trusted-proxy", "::1")

    def test_worker_arguments_carry_the_trusted_proxies(self):
        supervisor = parse("-l", "haproxy:tcp:1", "--trusted-proxy", "127.0.0.1",
                           "--trusted-proxy", "fd00::/8", "--workers", "2")
        arguments = worker_arguments(supervisor, supervisor["listen"])
        self.assertIn("--trusted-proxy=127.0.0.1/32", arguments)
        worker = parse(*arguments)
        self.assertEqual(worker["trusted-proxy"], supervisor["trusted-proxy"])

    def test_greeting_text(self):
        self.assertEqual(parse("-g", "hello").greeting.static, b"hello\r\n")

    def test_greeting_and_file_exclude_each_other(self):
        with self.assertRaises(usage.UsageError) as caught:
            parse("-g", "x", "-f", "/etc/motd")
        self.assertIn("--greeting and --greeting-file", str(caught.exception))

    def test_bad_template_names_the_placeholder(self):
        with self.assertRaises(usage.UsageError) as caught:
            parse("--greeting", "{peer_host.__class__}")
        self.assertIn("{peer_host.__class__}", str(caught.exception))

    def test_unreadable_file_names_the_file(self):
        with self.assertRaises(usage.UsageError) as caught:
            parse("--greeting-file", "/nonexistent/motd")
        self.assertIn("/nonexistent/motd", str(caught.exception))

    def test_unknown_option(self):
        with self.assertRaises(usage.UsageError):
            parse("--bogus")

    def test_under_twistd_a_usage_error_is_one_line(self):
        options = tap.Options()
        options.parent = object()
        with self.assertRaises(SystemExit) as caught:
            options.parseOptions(["--greeting", "{nope}"])
        message = str(caught.exception.code)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith("tcpgreet: --greeting: unknown placeholder {nope}"))

    def test_help_shows_every_option(self):
        text = " ".join(str(tap.Options()).split())
        for option in ("--listen", "-l", "--greeting", "-g", "--greeting-file", "-f",
                       "--quiet", "-q", "tcp:27679", "Thank you for connecting",
                       "{peer_host}", "SIGHUP", "--max-connections", "[default: 10000]",
                       "--max-per-ip", "--rate-per-ip", "R[/BURST]", "--timeout",
                       "[default: 10]", "--drain-timeout", "[default: 5]", "--workers",
                       "N|auto", "per worker", "--trusted-proxy=",
                       "[default: from any address]"):
            self.assertIn(option, text)
        for internal in ("--worker=", "--worker-control=", "--worker-fds=", "Internal"):
            self.assertNotIn(internal, text)
        self.assertIn("systemd:domain=INET:name=tcpgreet", text)
        self.assertNotIn("index=", text)

    def test_readme_has_a_row_for_every_option_help_shows(self):
        shown = set(re.findall(r"^ +(?:-\w, )?(--[a-z-]+)", str(tap.Options()), re.MULTILINE))
        readme = (Path(__file__).parent.parent / "README.rst").read_text()
        server = readme[readme.index("\nThe server\n"):readme.index("\nExamples::\n")]
        rows = set(re.findall(r"^   \* - ``(?:-\w, )?(--[a-z-]+)", server, re.MULTILINE))
        self.assertIn("--metrics", shown)
        self.assertEqual(rows, shown)

    def test_version_is_tcpgreet_s_and_twisted_s(self):
        from twisted.copyright import version

        from tcpgreet import __version__

        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        with self.assertRaises(SystemExit) as caught:
            parse("--version")
        self.assertEqual(caught.exception.code, 0)
        self.assertEqual(stdout.getvalue(),
                         f"tcpgreet {__version__} (Twisted {version})\n")


class MakeServiceTests(SynchronousTestCase):
    def make(self, *args):
        """The greeting service makeService built, under the service it returns."""
        reactor = MemoryReactorClock()
        self.top = tap.makeService(parse(*args), reactor=reactor)
        return reactor, self.top.getServiceNamed("greeter")

    def start(self, service):
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)

    def test_default_listens_on_27679_ipv4_and_ipv6_with_a_large_backlog(self):
        self.patch(tap, "ipv6_unavailable", lambda: None)
        reactor, service = self.make()
        self.assertIsInstance(self.top, MultiService)
        self.assertEqual([s.name for s in self.top], ["greeter"])
        self.assertIsInstance(service, GreetService)
        self.assertIsInstance(service.factory, GreetFactory)
        self.start(service)
        self.assertEqual([(port, backlog, interface)
                          for port, _, backlog, interface in reactor.tcpServers],
                         [(27679, 1024, ""), (27679, 1024, "::")])
        self.assertEqual({id(factory) for _, factory, _, _ in reactor.tcpServers},
                         {id(service.factory)})
        self.assertEqual([description for description, _ in service.endpoints],
                         ["tcp:27679", "tcp6:27679"])

    def test_the_default_ipv6_half_alone_is_ipv6_only(self):
        self.patch(tap, "ipv6_unavailable", lambda: None)
        self.assertEqual(tap.listeners(parse()), [Listener("tcp:27679"),
                                                  Listener("tcp6:27679", ipv6_only=True)])
        # Given by hand, a string keeps its meaning: tcp6 takes IPv4
        # clients too (as ::ffff: addresses), as Twisted's does.
        self.assertEqual(tap.listeners(parse("-l", "tcp:27679", "-l", "tcp6:27680")),
                         [Listener("tcp:27679"), Listener("tcp6:27680")])

    def test_given_by_hand_tcp_27679_is_ipv4_alone(self):
        self.patch(tap, "ipv6_unavailable", lambda: None)
        reactor, service = self.make("--listen", "tcp:27679")
        self.start(service)
        self.assertEqual([(port, interface) for port, _, _, interface in reactor.tcpServers],
                         [(27679, "")])

    def test_without_ipv6_the_default_is_ipv4_alone_and_says_so(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.patch(tap, "ipv6_unavailable", lambda: "address family not supported by protocol")
        reactor, service = self.make()
        self.start(service)
        self.assertEqual([(port, interface) for port, _, _, interface in reactor.tcpServers],
                         [(27679, "")])
        [warning] = [formatEvent(e) for e in events if e.get("log_namespace") == "tcpgreet.tap"]
        self.assertEqual(warning, "no IPv6 here (address family not supported by protocol): "
                                  "the default listens on IPv4 alone, tcp:27679")
        # With --listen given, nothing is probed and nothing dropped.
        self.patch(tap, "ipv6_unavailable", lambda: self.fail("probed"))
        self.assertEqual(tap.listeners(parse("-l", "tcp6:1")), [Listener("tcp6:1")])

    def test_every_listener_shares_one_factory(self):
        reactor, service = self.make("-l", "tcp:1:interface=127.0.0.1",
                                     "-l", r"tcp6:2:interface=\:\:1:backlog=7")
        self.start(service)
        self.assertEqual([(p, b, i) for p, _, b, i in reactor.tcpServers],
                         [(1, 1024, "127.0.0.1"), (2, 7, "::1")])
        self.assertEqual({id(f) for _, f, _, _ in reactor.tcpServers},
                         {id(service.factory)})

    def test_limits_reach_the_factory_and_service(self):
        _, service = self.make("--max-connections", "7", "--max-per-ip", "3",
                               "--rate-per-ip", "2/4", "--timeout", "1.5",
                               "--drain-timeout", "0.5")
        limits = service.factory.limits
        self.assertEqual((limits.max_connections, limits.max_per_ip,
                          limits.rate.rate, limits.rate.burst),
                         (7, 3, 2.0, 4))
        self.assertEqual((service.factory.timeout, service.drain_timeout), (1.5, 0.5))

    def test_the_startup_line_names_the_rate_limit_before_any_client_came(self):
        _, service = self.make("--rate-per-ip", "2/3", "--max-per-ip", "4")
        self.start(service)
        fields = service.startup_fields()
        self.assertEqual((fields["rate_per_ip"], fields["max_per_ip"]), ("2/3", 4))
        _, unlimited = self.make()
        self.start(unlimited)
        self.assertEqual(unlimited.startup_fields()["rate_per_ip"], "off")

    def test_no_rate_limit_by_default(self):
        limits = self.make()[1].factory.limits
        self.assertEqual((limits.max_connections, limits.max_per_ip, limits.rate),
                         (10000, 0, None))

    def test_quiet_reaches_the_factory(self):
        self.assertTrue(self.make("--quiet")[1].factory.quiet)
        self.assertFalse(self.make()[1].factory.quiet)

    def test_bad_endpoint_is_one_line_naming_it(self):
        stderr = io.StringIO()
        self.patch(sys, "__stderr__", stderr)
        with self.assertRaises(SystemExit) as caught:
            self.make("--listen", "tcp:http")
        self.assertEqual(caught.exception.code, 1)
        self.assertEqual(stderr.getvalue(),
                         "tcpgreet: --listen 'tcp:http': port 'http' is not a number\n")

    def test_metrics_listen_on_their_own_endpoint(self):
        reactor, _ = self.make("--listen", "tcp:1", "--metrics", "tcp:9127:interface=127.0.0.1")
        self.assertEqual([s.name for s in self.top], ["greeter", "metrics"])
        self.start(self.top)
        [(greetings, *_), (metrics, site, _, interface)] = reactor.tcpServers
        self.assertEqual((greetings, metrics, interface), (1, 9127, "127.0.0.1"))
        self.assertIsInstance(site, Site)

    def test_bad_metrics_endpoint_is_one_line(self):
        stderr = io.StringIO()
        self.patch(sys, "__stderr__", stderr)
        with self.assertRaises(SystemExit):
            self.make("--metrics", "9127")
        self.assertEqual(stderr.getvalue(),
                         "tcpgreet: --metrics '9127': unknown endpoint type '9127'; "
                         "use tcp, tcp6, ssl, unix, systemd or haproxy\n")

    def test_metrics_without_prometheus_client(self):
        from tcpgreet import metrics

        stderr = io.StringIO()
        self.patch(sys, "__stderr__", stderr)
        self.patch(metrics, "generate_latest", None)
        with self.assertRaises(SystemExit):
            self.make("--metrics", "tcp:9127")
        self.assertEqual(stderr.getvalue(), f"tcpgreet: {metrics.MISSING}\n")
        # The extra as README names it: tcpgreet is not on the package index.
        self.assertIn("pip install '.[metrics]'", metrics.MISSING)
        self.assertNotIn("tcpgreet[metrics]", metrics.MISSING)

    def started_line(self, *args):
        """The start-up line of the service makeService builds for C{args}."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        _, service = self.make(*args)
        self.start(service)
        [line] = [formatEvent(e) for e in events if "listening on" in e.get("log_format", "")]
        return line

    def test_the_startup_line_says_whom_proxy_headers_come_from(self):
        self.assertIn("rate-per-ip off, proxy headers trusted from any address, timeout",
                      self.started_line("-l", "haproxy:tcp:1", "-l", "tcp:2"))
        self.assertIn("proxy headers trusted from 127.0.0.1/32, 10.0.0.0/8, timeout",
                      self.started_line("-l", "haproxy:tcp:1", "--trusted-proxy", "127.0.0.1",
                                        "--trusted-proxy", "10.0.0.0/8"))
        self.assertNotIn("proxy headers", self.started_line("-l", "tcp:1"))

    def test_trusted_proxies_reach_the_proxy_listeners(self):
        reactor, service = self.make("-l", "haproxy:tcp:1", "--trusted-proxy", "127.0.0.1")
        self.start(service)
        [(_, factory, _, _)] = reactor.tcpServers
        self.assertIsInstance(factory, ProxyHeaderFactory)
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "127.0.0.2", 1)))
        self.assertIsNotNone(factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)))
        self.assertEqual(service.factory.stats.rejected, {"untrusted-proxy": 1})

    def test_haproxy_ssl_listens_on_tcp_and_speaks_tls_after_the_header(self):
        key, cert = make_certificate(["localhost"]).write(self)
        reactor, service = self.make("-l", f"haproxy:ssl:1:privateKey={key}:certKey={cert}")
        self.start(service)
        self.assertEqual(reactor.sslServers, [])
        [(port, factory, _, _)] = reactor.tcpServers
        self.assertEqual(port, 1)
        self.assertIsInstance(factory, ProxyHeaderFactory)
        self.assertIsNotNone(factory._tls)

    def test_workers_make_a_supervisor_of_held_sockets(self):
        self.top = tap.makeService(parse("--workers", "3", "--listen", "tcp:0:interface=127.0.0.1",
                                         "--max-per-ip", "2", "--metrics", "tcp:9127"),
                                   reactor=MemoryReactorClock())
        self.assertEqual([s.name for s in self.top], ["supervisor", "metrics"])
        supervisor = self.top.getServiceNamed("supervisor")
        self.assertIsInstance(supervisor, WorkerSupervisor)
        self.assertEqual(supervisor.count, 3)
        self.assertIn("--max-connections=3333", supervisor.arguments)
        supervisor.privilegedStartService()
        [held] = supervisor.ports
        self.addCleanup(held.stopListening)
        self.assertIsInstance(held, HeldListener)
        self.assertEqual(len(held.sockets), 3)

    def test_workers_hold_both_halves_of_the_default_each_steered(self):
        if not has_ipv6_loopback():
            raise SkipTest("no IPv6 loopback")
        port = unused_dual_port()
        self.patch(tap, "DEFAULT_PORT", port)
        top = tap.makeService(parse("--workers", "2", "--max-per-ip", "1"),
                              reactor=MemoryReactorClock())
        supervisor = top.getServiceNamed("supervisor")
        self.assertEqual([a for a in supervisor.arguments if a.startswith("--listen")],
                         [f"--listen=tcp:{port}", f"--listen=tcp6:{port}"])
        facades = [endpoint._reactor for _, endpoint in supervisor.endpoints]
        self.assertEqual([(f.steer, f.ipv6_only) for f in facades], [(True, False), (True, True)])
        supervisor.privilegedStartService()
        for held in supervisor.ports:
            self.addCleanup(held.stopListening)
        ipv4, ipv6 = supervisor.ports
        self.assertEqual([s.getsockname()[:2] for s in ipv4.sockets + ipv6.sockets],
                         [("0.0.0.0", port)] * 2 + [("::", port)] * 2)
        self.assertEqual({s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
                          for s in ipv6.sockets}, {1})
        self.assertIn(f"tcp6:{port} ([::]:{port}, IPv6 only)",
                      supervisor.startup_fields()["listeners"])

    def test_steering_only_where_the_kernel_sees_the_client(self):
        def steered(*args):
            top = tap.makeService(parse("--workers", "2", *args), reactor=MemoryReactorClock())
            return [endpoint._wrapped._reactor.steer if hasattr(endpoint, "_wrapped")
                    else endpoint._reactor.steer
                    for _, endpoint in top.getServiceNamed("supervisor").endpoints]

        both = ("--listen", "tcp:1", "--listen", "haproxy:tcp:2")
        self.assertEqual(steered(*both), [False, False])
        self.assertEqual(steered(*both, "--max-per-ip", "3"), [True, False])
        self.assertEqual(steered(*both, "--rate-per-ip", "3"), [True, False])

    def test_a_worker_greets_on_what_it_inherited_and_reports_to_its_supervisor(self):
        options = parse("--listen", "tcp:1")
        options.worker = WorkerRole(number=2, control_fd=7, listen_fds=(8,))
        top = tap.makeService(options, reactor=MemoryReactorClock())
        self.assertEqual([s.name for s in top], ["greeter", "control"])
        greeter, control = top.getServiceNamed("greeter"), top.getServiceNamed("control")
        self.assertFalse(greeter.announce)  # the supervisor's line says it all
        self.assertEqual(control.fileDescriptor, 7)
        [(_, endpoint)] = greeter.endpoints
        self.assertIsInstance(endpoint._reactor, InheritedReactor)
        self.assertEqual(endpoint._reactor._fd, 8)

    def test_under_daemon_mode_the_last_service_tells_the_launcher(self):
        launcher = object()  # a real one would wait in this process's next fork
        self.patch(startup, "expect_daemon", lambda: launcher)
        for workers, first in (("1", "greeter"), ("2", "supervisor")):
            options = parse("--listen", "tcp:1", "--workers", workers)
            options.parent = {"nodaemon": False, "debug": False}
            top = tap.makeService(options, reactor=MemoryReactorClock())
            self.assertEqual([s.name for s in top], [first, "report-started"])
            self.assertIs(top.getServiceNamed("report-started").launcher, launcher)

    def test_who_daemonizes(self):
        self.assertEqual([startup.daemonizing(parent) for parent in (
            {"nodaemon": False, "debug": False}, {"nodaemon": True, "debug": False},
            {"nodaemon": False, "debug": True}, None, {})],
            [True, False, False, False, False])

    def test_stop_restores_the_signal_handlers_once_drained(self):
        before = {signum: signal.getsignal(signum)
                  for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
        _, service = self.make()
        service.privilegedStartService()
        service.startService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), service._sighup)
        service.stopService()
        self.assertEqual({signum: signal.getsignal(signum) for signum in before}, before)
