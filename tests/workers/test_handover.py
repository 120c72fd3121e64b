"""
Listening sockets from the supervisor to its workers: what the supervisor
binds for each kind of listener, how a worker's descriptors are laid out,
and how a worker adopts them.
"""

import os
import shutil
import socket
import ssl
import stat
import tempfile
from pathlib import Path

from twisted.internet import defer, reactor, threads
from twisted.internet.protocol import Factory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tcpgreet import greeting
from tcpgreet.endpoints import server_endpoint
from tcpgreet.server import GreetFactory
from tcpgreet.workers.handover import (
    HeldListener,
    InheritedReactor,
    SharedUNIXPort,
    WorkerSocketBinder,
    bind_unix,
    handover,
    systemd_name,
)

from .. import tls


def held(description, workers=2, steer=False):
    """Listen on C{description} as a supervisor of C{workers} would."""
    endpoint = server_endpoint(WorkerSocketBinder(reactor, workers, steer), description)
    results = []
    factory = GreetFactory(greeting.from_text("x"), quiet=True, reactor=reactor)
    endpoint.listen(factory).addBoth(results.append)
    return results[0]


def socket_path(testcase) -> str:
    """A path for a UNIX socket, in a directory of its own that goes afterwards."""
    directory = tempfile.mkdtemp()
    testcase.addCleanup(shutil.rmtree, directory)
    return os.path.join(directory, "greet.sock")


class HoldingTests(SynchronousTestCase):
    def hold(self, description, workers=2):
        listener = held(description, workers)
        self.assertIsInstance(listener, HeldListener, getattr(listener, "value", None))
        self.addCleanup(listener.stopListening)
        return listener

    def test_tcp_is_a_socket_per_worker(self):
        listener = self.hold("tcp:0:interface=127.0.0.1", workers=3)
        self.assertEqual(len(listener.sockets), 3)
        self.assertFalse(listener.shared)
        self.assertEqual([listener.socket_for(i) for i in range(3)], listener.sockets)
        host = listener.getHost()
        self.assertEqual((host.type, host.host), ("TCP", "127.0.0.1"))
        self.assertEqual(host.port, listener.sockets[2].getsockname()[1])
        # The default backlog applies here too.
        self.assertEqual(listener.sockets[0].getsockopt(socket.SOL_SOCKET,
                                                        socket.SO_ACCEPTCONN), 1)

    def test_proxy_wrapper_is_held_as_its_transport(self):
        listener = self.hold("haproxy:tcp:0:interface=127.0.0.1")
        self.assertEqual(len(listener.sockets), 2)

    def test_port_in_use_fails_as_without_workers(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            failure = held(f"tcp:{port}:interface=127.0.0.1")
        self.assertIn("Address already in use", str(failure.value))

    def test_unix_is_one_shared_socket_whose_path_goes_at_stop(self):
        path = socket_path(self)
        listener = held(f"unix:{path}:mode=600")
        self.assertTrue(listener.shared)
        self.assertEqual(listener.socket_for(1), listener.sockets[0])
        self.assertEqual(listener.getHost().name, path.encode())
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertTrue(os.path.islink(path + ".lock"))  # wantPID, as Twisted's
        listener.stopListening()
        self.assertFalse(os.path.exists(path))
        self.assertFalse(os.path.lexists(path + ".lock"))

    def test_unix_lock_held_by_another(self):
        path = socket_path(self)
        first = bind_unix(path, 5, 0o666, want_pid=True)
        self.addCleanup(first.stopListening)
        failure = held(f"unix:{path}")
        self.assertIn("Cannot acquire lock", str(failure.value))

    def test_an_inherited_socket_is_kept_under_its_number(self):
        with socket.socket() as inherited:
            inherited.bind(("127.0.0.1", 0))
            inherited.listen()
            listener = WorkerSocketBinder(reactor, 2, False).adoptStreamPort(
                inherited.fileno(), socket.AF_INET, Factory())
            self.addCleanup(listener.stopListening)
            self.assertEqual(listener.systemd_fd, inherited.fileno())
            self.assertNotEqual(listener.sockets[0].fileno(), inherited.fileno())
        self.assertTrue(listener.shared)
        self.assertEqual(listener.getHost().host, "127.0.0.1")


class FakeHeld:
    def __init__(self, fds, systemd_fd=None):
        self.fds = fds
        self.systemd_fd = systemd_fd

    def socket_for(self, index):
        fd = self.fds[0 if len(self.fds) == 1 else index]
        return type("Socket", (), {"fileno": lambda self: fd})()


class LayoutTests(SynchronousTestCase):
    def test_without_systemd(self):
        listeners = [("tcp:1", FakeHeld([10, 11])), ("unix:/x", FakeHeld([12]))]
        plan = handover(listeners, 1, control=20)
        self.assertEqual(plan.child_fds, {3: 20, 4: 11, 5: 12})
        self.assertEqual((plan.control_fd, plan.listen_fds, plan.environment),
                         (3, [4, 5], {}))

    def test_systemd_sockets_keep_their_numbers_and_names(self):
        listeners = [
            ("tcp:1", FakeHeld([10, 11])),
            ("haproxy:systemd:domain=INET:name=public", FakeHeld([30], systemd_fd=5)),
            ("systemd:domain=INET:index=0", FakeHeld([31], systemd_fd=3)),
        ]
        plan = handover(listeners, 0, control=20)
        self.assertEqual(plan.child_fds, {5: 30, 3: 31, 6: 20, 7: 10})
        self.assertEqual((plan.control_fd, plan.listen_fds), (6, [7, 5, 3]))
        self.assertEqual(plan.environment,
                         {"LISTEN_FDS": "3", "LISTEN_FDNAMES": "unknown:unknown:public"})

    def test_systemd_name(self):
        self.assertEqual(systemd_name("systemd:domain=INET:name=tcpgreet"), "tcpgreet")
        self.assertEqual(systemd_name("haproxy:systemd:name=a\\:b:domain=INET6"), "a\\:b")
        self.assertIsNone(systemd_name("systemd:domain=INET:index=0"))


class AdoptionTests(TestCase):
    """A worker's side, on the real reactor: adopting what was handed over."""

    def inherit(self, listener, index):
        """A copy of a held socket, as a worker's inherited descriptor."""
        return os.dup(listener.socket_for(index).fileno())

    @defer.inlineCallbacks
    def test_each_worker_adopts_its_socket_of_the_group(self):
        listener = held("tcp:0:interface=127.0.0.1", workers=2, steer=True)
        self.addCleanup(listener.stopListening)
        ports = []
        for index, text in enumerate(["first", "second"]):
            factory = GreetFactory(greeting.from_text(text), quiet=True, reactor=reactor)
            fd = self.inherit(listener, index)
            endpoint = server_endpoint(InheritedReactor(reactor, fd),
                                       "tcp:0:interface=127.0.0.1")
            ports.append((yield endpoint.listen(factory)))
            self.addCleanup(ports[-1].stopListening)
            with self.assertRaises(OSError):  # the inherited copy is closed
                os.fstat(fd)
        port = listener.getHost().port
        for source, expected in (("127.0.0.2", b"first\r\n"), ("127.0.0.3", b"second\r\n")):
            data = yield threads.deferToThread(self.fetch_from, source, port)
            self.assertEqual(data, expected)

    @staticmethod
    def fetch_from(source, port):
        with socket.socket() as s:
            s.settimeout(10)
            s.bind((source, 0))
            s.connect(("127.0.0.1", port))
            return b"".join(iter(lambda: s.recv(4096), b""))

    @defer.inlineCallbacks
    def test_a_worker_stopping_leaves_a_shared_unix_socket_serving(self):
        path = socket_path(self)
        listener = bind_unix(path, 16, 0o640, want_pid=False)
        self.addCleanup(listener.stopListening)
        workers = []
        for text in ("one", "two"):
            endpoint = server_endpoint(InheritedReactor(reactor, self.inherit(listener, 0)),
                                       f"unix:{path}")
            workers.append((yield endpoint.listen(
                GreetFactory(greeting.from_text(text), quiet=True, reactor=reactor))))
        self.assertIsInstance(workers[0], SharedUNIXPort)
        yield workers[0].stopListening()
        # Neither the path, nor its mode, nor the socket went with it.
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o640)
        data = yield threads.deferToThread(self.fetch_unix, path)
        self.assertEqual(data, b"two\r\n")
        yield workers[1].stopListening()

    @staticmethod
    def fetch_unix(path):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(path)
            return b"".join(iter(lambda: s.recv(4096), b""))

    @defer.inlineCallbacks
    def test_tls_is_built_by_the_worker(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        files = tls.self_signed(Path(directory))
        description = (f"ssl:0:interface=127.0.0.1:privateKey={files.key}:"
                       f"certKey={files.cert}")
        listener = held(description, workers=1)
        self.addCleanup(listener.stopListening)
        endpoint = server_endpoint(InheritedReactor(reactor, self.inherit(listener, 0)),
                                   description)
        port = yield endpoint.listen(
            GreetFactory(greeting.from_text("tls"), quiet=True, reactor=reactor))
        self.addCleanup(port.stopListening)
        self.assertEqual(port.getHost().port, listener.getHost().port)
        self.assertEqual(getattr(port, "_type", None), "TLS")
        data = yield threads.deferToThread(self.fetch_tls, port.getHost().port, files.trust)
        self.assertEqual(data, b"tls\r\n")
        # Twisted's ssl: endpoint hands pyOpenSSL the key and certificate
        # objects pyOpenSSL now deprecates: not this test's business.
        self.flushWarnings()

    @staticmethod
    def fetch_tls(port, trust):
        context = ssl.create_default_context(cafile=str(trust))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname=tls.SERVER_NAME) as s:
            chunks = []
            try:
                while data := s.recv(4096):
                    chunks.append(data)
            except ssl.SSLEOFError:  # closed without close_notify: the data is whole
                pass
            return b"".join(chunks)
