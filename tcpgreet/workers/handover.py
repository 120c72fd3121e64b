"""
Listening sockets handed from the supervisor to its workers.

Both sides parse every C{--listen} string with the ordinary machinery
(L{tcpgreet.endpoints.server_endpoint}), each through a reactor facade of
its own, so every endpoint type, its options, TLS contexts and the PROXY
wrapper come out exactly as in a single process:

  - in the supervisor, L{WorkerSocketBinder} binds: a reuseport group of one
    socket per worker for a TCP listener (C{tcp}, C{tcp6}, C{ssl}, and
    those under C{haproxy:}), one socket for a UNIX listener, and a copy of
    the socket systemd passed for a C{systemd} listener.  It serves no
    connection; it keeps the sockets open, and while a worker is down it
    accepts from that worker's sockets itself and hands each connection to
    another worker (L{tcpgreet.workers.supervisor.StandIn}), so that none waits for
    the restart;
  - in a worker, L{InheritedReactor} adopts the descriptor the supervisor
    handed it for that listener instead of binding.

A worker sees each systemd socket under the descriptor number the
supervisor got it under, with C{LISTEN_FDS} and C{LISTEN_FDNAMES} to match,
so that C{systemd:...:name=...} and C{index=} find it there too.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any

from twisted.internet import address, fdesc, tcp, unix
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from twisted.python.lockfile import FilesystemLock
from zope.interface import implementer

from tcpgreet._port import GreetReactor, ListeningReactor, PortReactor, socket_family
from tcpgreet.endpoints import split_description
from tcpgreet.workers.reuseport import bind_group

# Where systemd puts the first socket it passes (sd_listen_fds(3)).
SYSTEMD_FIRST_FD = 3

# The socket class, under a name HeldListener's socket property cannot hide.
Socket = socket.socket


@implementer(IListeningPort)
class HeldListener:
    """
    Sockets the supervisor listens on for its workers, never accepting.

    @ivar sockets: one per worker, or a single one all workers share.
    @ivar steered: whether the kernel steers each client to one of the
        sockets by its address (L{tcpgreet.workers.reuseport.steering_program}).
    @ivar systemd_fd: for a socket systemd passed, the descriptor number
        it came under, which the workers must see it under too.
    """

    def __init__(self, sockets: list[socket.socket], systemd_fd: int | None = None,
                 unix_path: bytes | None = None, lock: FilesystemLock | None = None,
                 steered: bool = False) -> None:
        self.sockets = sockets
        self.steered = steered
        self.systemd_fd = systemd_fd
        self._unix_path = unix_path
        self._lock = lock

    @property
    def socket(self) -> socket.socket:
        """The first socket: its address and options are every one's."""
        return self.sockets[0]

    @property
    def shared(self) -> bool:
        """Whether every worker accepts from the same socket."""
        return len(self.sockets) == 1

    def socket_for(self, index: int) -> Socket:
        """The socket worker C{index} (from 0) accepts from."""
        return self.sockets[0 if self.shared else index]

    def startListening(self) -> None:
        """Bound and listening from the start."""

    def getHost(self) -> IAddress:
        skt = self.sockets[0]
        name = skt.getsockname()
        if skt.family == socket.AF_UNIX:
            return address.UNIXAddress(name)
        kind = address.IPv6Address if skt.family == socket.AF_INET6 else address.IPv4Address
        return kind("TCP", name[0], name[1])

    def stopListening(self) -> Deferred[None]:
        """
        Close the supervisor's copies.  A socket lives on in the workers
        still holding it, which serve their queue before they close it, as
        a single process does; a UNIX socket's path goes at once, so no new
        client finds it.
        """
        if self._unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._unix_path)
            self._unix_path = None
        if self._lock is not None:
            self._lock.unlock()
            self._lock = None
        for skt in self.sockets:
            skt.close()
        return succeed(None)

    loseConnection = stopListening


def _in_filesystem(path: bytes) -> bool:
    return not path.startswith(b"\0")  # Linux's abstract namespace has no file


def bind_unix(path: str | bytes, backlog: int, mode: int, want_pid: bool) -> HeldListener:
    """
    A listening UNIX socket, as C{reactor.listenUNIX} would bind it (a lock
    file when asked, a stale socket file replaced, C{mode} set).  Twisted's
    own UNIX port is not used: closing it shuts the socket down, which would
    stop the workers that share it.
    """
    path = os.fsencode(path)
    lock = None
    if want_pid:
        lock = FilesystemLock(path + b".lock")
        if not lock.lock():
            raise CannotListenError(None, path, "Cannot acquire lock")
        if not lock.clean:  # the previous owner died: its socket file is stale
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    os.remove(path)
    skt = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        skt.bind(path)
        if _in_filesystem(path):
            os.chmod(path, mode)
        skt.setblocking(False)
        skt.listen(backlog)
    except OSError as e:
        skt.close()
        if lock is not None:
            lock.unlock()
        raise CannotListenError(None, path, e) from None
    return HeldListener([skt], unix_path=path if _in_filesystem(path) else None, lock=lock)


class WorkerSocketBinder:
    """
    What the supervisor's endpoints listen through, in the reactor's
    place: listening binds the sockets the workers will accept from, and
    nothing more; it is no reactor, and runs nothing.  The factory an
    endpoint passes is never used: the workers build their own.

    @ivar steer: whether a TCP listener's group steers each client address
        to one worker (L{tcpgreet.workers.reuseport.steering_program}).
    @ivar ipv6_only: whether an IPv6 TCP listener's sockets take IPv6
        clients only (for the default listener's IPv6 half).
    """

    def __init__(self, reactor: IReactorTime, workers: int, steer: bool,
                 ipv6_only: bool = False) -> None:
        # Endpoints ask nothing else of it but listening, which this does,
        # and a clock (the PROXY header reader's), which it passes through.
        self._reactor = reactor
        self._workers = workers
        self.steer = steer
        self.ipv6_only = ipv6_only

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def listenTCP(self, portNumber: int, factory: IProtocolFactory, backlog: int = 50,
                  interface: str = "") -> HeldListener:
        return HeldListener(bind_group(interface, portNumber, backlog, self._workers,
                                       steer=self.steer, ipv6_only=self.ipv6_only),
                            steered=self.steer)

    def listenSSL(self, portNumber: int, factory: IProtocolFactory,
                  contextFactory: IOpenSSLServerConnectionCreator, backlog: int = 50,
                  interface: str = "") -> HeldListener:
        # Parsing the string has proved the key and certificate usable; each
        # worker builds its TLS context from them again.
        return self.listenTCP(portNumber, factory, backlog, interface)

    def listenUNIX(self, address: str, factory: IProtocolFactory, backlog: int = 50,
                   mode: int = 0o666, wantPID: int = 0) -> HeldListener:
        return bind_unix(address, backlog, mode, bool(wantPID))

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: int,
                        factory: IProtocolFactory) -> HeldListener:
        # The endpoint closes fileDescriptor once this returns: keep a copy.
        copy = socket.socket(fileno=os.dup(fileDescriptor))
        copy.setblocking(False)  # shared by every worker: accept must never block
        return HeldListener([copy], systemd_fd=fileDescriptor)


def systemd_name(description: str) -> str | None:
    """The C{name=} of a C{systemd:} listen string (under C{haproxy:} too)."""
    for part in split_description(description):
        if part.startswith("name="):
            return part[len("name="):]
    return None


@dataclass(frozen=True)
class Handover:
    """
    What one worker is given: C{child_fds} maps its descriptors to the
    supervisor's (for C{spawnProcess}); C{listen_fds} is its descriptor for
    each listener, in order; C{environment} describes its systemd sockets.
    """

    child_fds: dict[int, int]
    listen_fds: list[int]
    control_fd: int
    environment: dict[str, str]


def handover(listeners: list[tuple[str, HeldListener]], index: int,
             control: int) -> Handover:
    """
    Lay out the descriptors of worker C{index} (from 0), given each listen
    string and what the supervisor holds for it: the systemd sockets where
    systemd put them, then the control channel (the supervisor's
    C{control}), then one socket for each other listener.
    """
    child_fds: dict[int, int] = {}
    names: list[str] = []
    for description, held in listeners:
        if held.systemd_fd is not None:
            position = held.systemd_fd - SYSTEMD_FIRST_FD
            names += ["unknown"] * (position + 1 - len(names))  # systemd's own default
            names[position] = systemd_name(description) or names[position]
            child_fds[held.systemd_fd] = held.socket_for(index).fileno()
    control_fd = SYSTEMD_FIRST_FD + len(names)
    child_fds[control_fd] = control
    listen_fds = []
    for _, held in listeners:
        if held.systemd_fd is not None:
            listen_fds.append(held.systemd_fd)
        else:
            fd = max(child_fds) + 1
            child_fds[fd] = held.socket_for(index).fileno()
            listen_fds.append(fd)
    environment = {"LISTEN_FDS": str(len(names)), "LISTEN_FDNAMES": ":".join(names)} \
        if names else {}
    return Handover(child_fds, listen_fds, control_fd, environment)


class SharedUNIXPort(unix.Port):
    """
    A UNIX listening socket inherited from the supervisor, which other
    workers accept from too.  Twisted's adopted UNIX port acts as the
    socket's owner: it sets the mode of its path when it starts, and when
    it stops it removes the path and shuts the socket down, for every
    process sharing it.  The supervisor owns the path; this port only
    accepts.
    """

    # Made with one; tcp.Port declares it optional, as a class default.
    factory: Factory[Any]

    @classmethod
    def adopt(cls, reactor: PortReactor, fileDescriptor: int,
              factory: IProtocolFactory) -> SharedUNIXPort:
        listening = cls._fromListeningDescriptor(reactor, fileDescriptor, factory)
        listening.startListening()
        return listening

    def startListening(self) -> None:
        skt, self._preexistingSocket = self._preexistingSocket, None
        assert skt is not None  # made by adopt, from the descriptor
        self._shouldShutdown = False
        self.factory.doStart()
        self.connected = True
        self.socket = skt
        self.fileno = skt.fileno  # type: ignore[method-assign]  # as tcp.Port: the socket's own
        self.numberAccepts = 100
        self.startReading()

    def connectionLost(self, reason: Failure) -> None:
        # tcp.Port's clean-up only: the path and its lock are not ours.
        tcp.Port.connectionLost(self, reason)


class InheritedReactor(GreetReactor):
    """
    The reactor as a worker's endpoint for one listener sees it: whatever
    the string says to listen on, it adopts C{fileDescriptor}, the socket
    the supervisor handed over for that listener.  A systemd endpoint names
    its descriptor itself, under the number the supervisor gave it.
    """

    def __init__(self, reactor: ListeningReactor, fileDescriptor: int) -> None:
        super().__init__(reactor)
        self._fd = fileDescriptor

    def listenTCP(self, portNumber: int, factory: IProtocolFactory, backlog: int = 50,
                  interface: str = "") -> IListeningPort:
        return self._adopt(factory)

    # listenSSL is GreetReactor's: TLS over self.listenTCP.

    def listenUNIX(self, address: str, factory: IProtocolFactory, backlog: int = 50,
                   mode: int = 0o666, wantPID: int = 0) -> IListeningPort:
        return self._adopt(factory)

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: int,
                        factory: IProtocolFactory) -> IListeningPort:
        if addressFamily == socket.AF_UNIX:
            return SharedUNIXPort.adopt(self._reactor, fileDescriptor, factory)
        return super().adoptStreamPort(fileDescriptor, addressFamily, factory)

    def _adopt(self, factory: IProtocolFactory) -> IListeningPort:
        fd = self._fd
        fdesc.setNonBlocking(fd)
        try:
            return self.adoptStreamPort(fd, socket_family(fd), factory)
        finally:
            os.close(fd)  # the port holds a copy of its own
