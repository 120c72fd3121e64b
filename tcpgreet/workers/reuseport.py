"""
SO_REUSEPORT groups: several listening sockets on one address, one per
worker, and the kernel program that chooses among them.

Each socket of a group has a queue of its own, and the kernel puts every new
connection in one of them.  By default it chooses by a hash of the
connection's addresses and ports, which spreads even the connections of a
single client evenly.  Per-address limits need the opposite: every
connection from one client must reach the one worker that counts that
client: an IPv4 address, or an IPv6 /64 (as L{tcpgreet.limits.address_key}
counts them).  For them a classic BPF program is attached to the group
(C{SO_ATTACH_REUSEPORT_CBPF}); it returns the index of the socket to use,
the client's key modulo the size of the group.  A socket's index is its
place in the order the group's sockets started listening, so socket I of
L{bind_group} is index I.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct

from twisted.internet.error import CannotListenError

from tcpgreet._port import bind_address

# From <asm-generic/socket.h>; Python's socket module does not name it.
SO_ATTACH_REUSEPORT_CBPF = 51

# Classic BPF opcodes (<linux/bpf_common.h>, <linux/filter.h>).
_LD_B_ABS = 0x30  # A = byte at k
_LD_W_ABS = 0x20  # A = 32-bit word at k, in network byte order
_TAX = 0x07  # X = A
_ALU_RSH_K = 0x74  # A >>= k
_ALU_XOR_X = 0xAC  # A ^= X
_ALU_MOD_K = 0x94  # A %= k
_JEQ_K = 0x15  # if A == k: skip jt, else skip jf
_JA = 0x05  # skip k
_RET_A = 0x16  # return A

# Offsets from SKF_NET_OFF (-0x100000) count from the start of the IP header,
# wherever the packet's data pointer is (past the TCP header, here).
_NET = 0x100000000 - 0x100000
_IPV4_SOURCE = 12  # the IPv4 source address
_IPV6_SOURCE = 8  # the IPv6 source address: its /64 is the two words here


def steering_key(host: str) -> int:
    """
    The number L{steering_program} steers a client by: its IPv4 address;
    for IPv6, the two 32-bit words of its /64 XORed (the rest of the
    address is the client's to choose, so it must not count).
    """
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # an IPv4 client of a dual-stack socket
            return int(address.ipv4_mapped)
        prefix = int(address) >> 64
        return (prefix >> 32) ^ (prefix & 0xFFFFFFFF)
    return int(address)


def steering_program(count: int) -> bytes:
    """
    The classic BPF program that picks socket I{steering_key(source) mod
    count}.  The IP version is read from the packet, so a dual-stack IPv6
    listener steers its IPv4 clients by their IPv4 address too.
    """
    if count < 1:
        raise ValueError("a group has at least one socket")
    instructions = [
        (_LD_B_ABS, 0, 0, _NET),  # A = version and header length
        (_ALU_RSH_K, 0, 0, 4),  # A = IP version
        (_JEQ_K, 0, 2, 4),  # IPv4? next instruction, else the IPv6 loads
        (_LD_W_ABS, 0, 0, _NET + _IPV4_SOURCE),
        (_JA, 0, 0, 4),  # over the IPv6 loads
        (_LD_W_ABS, 0, 0, _NET + _IPV6_SOURCE),  # the /64's first word
        (_TAX, 0, 0, 0),
        (_LD_W_ABS, 0, 0, _NET + _IPV6_SOURCE + 4),  # and its second
        (_ALU_XOR_X, 0, 0, 0),
        (_ALU_MOD_K, 0, 0, count),
        (_RET_A, 0, 0, 0),
    ]
    # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in instructions)


def attach_steering(skt: socket.socket, count: int) -> None:
    """Attach L{steering_program} to the reuseport group of C{skt}."""
    program = steering_program(count)
    # struct sock_fprog: the number of instructions and a pointer to them;
    # ctypes holds the instructions at an address the kernel can read.
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("@HP", len(program) // 8, ctypes.addressof(buffer))
    skt.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def _socket(family: socket.AddressFamily, reuse_port: bool,
            ipv6_only: bool = False) -> socket.socket:
    skt = socket.socket(family, socket.SOCK_STREAM)
    skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted's ports do
    if reuse_port:
        skt.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if ipv6_only and family == socket.AF_INET6:
        skt.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return skt


def bind_group(interface: str, port: int, backlog: int, count: int,
               steer: bool = False, ipv6_only: bool = False) -> list[socket.socket]:
    """
    C{count} non-blocking sockets listening on C{interface} and C{port}
    (port 0: the port the first one gets), in one reuseport group, steered
    by L{steering_program} when C{steer} is true; IPv6 sockets take IPv6
    clients only when C{ipv6_only} is (see L{tcpgreet._port.GreetPort.ipv6Only}).

    @raise CannotListenError: as Twisted's own TCP port raises it, so that
        a port in use or a privileged port reads the same as without workers.
    """
    family, address = bind_address(interface, port)
    # With SO_REUSEPORT, a bind succeeds where another process of the same
    # user already listens with it, and the two would share connections.
    # A plain socket bound first fails as a single process would.
    try:
        with _socket(family, reuse_port=False, ipv6_only=ipv6_only) as probe:
            probe.bind(address)
            address = (address[0], probe.getsockname()[1], *address[2:])
    except OSError as e:
        raise CannotListenError(interface, port, e) from None
    group: list[socket.socket] = []
    try:
        for index in range(count):
            skt = _socket(family, reuse_port=True, ipv6_only=ipv6_only)
            group.append(skt)
            if index == 0 and steer:
                # Before the group takes its first connection.
                attach_steering(skt, count)
            skt.bind(address)
            skt.setblocking(False)
            skt.listen(backlog)
    except OSError as e:
        for skt in group:
            skt.close()
        raise CannotListenError(interface, port, e) from None
    return group
