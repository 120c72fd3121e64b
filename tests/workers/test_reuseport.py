"""
SO_REUSEPORT groups and the BPF program that steers a client address to
one socket of its group, with real sockets on loopback.
"""

import socket
import struct
from unittest import skipUnless

from twisted.internet.error import CannotListenError
from twisted.trial.unittest import SynchronousTestCase

from tcpgreet.workers.reuseport import bind_group, steering_key, steering_program

from ..helpers import has_ipv6_loopback


def accepted_by(group, source, port, host="127.0.0.1"):
    """Connect from C{source}; the index of the group's socket that got it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as client:
        client.bind((source, 0))
        client.connect((host, port))
        winners = []
        for index, listener in enumerate(group):
            try:
                connection, _ = listener.accept()
            except BlockingIOError:
                continue
            connection.close()
            winners.append(index)
    return winners


class SteeringProgramTests(SynchronousTestCase):
    def test_instructions(self):
        program = steering_program(3)
        instructions = [struct.unpack("=HBBI", program[i:i + 8])
                        for i in range(0, len(program), 8)]
        net = 0x100000000 - 0x100000  # SKF_NET_OFF
        self.assertEqual(instructions, [
            (0x30, 0, 0, net),  # ldb [net + 0]: version and header length
            (0x74, 0, 0, 4),  # rsh #4
            (0x15, 0, 2, 4),  # jeq #4: IPv4, else skip to the IPv6 loads
            (0x20, 0, 0, net + 12),  # ld [net + 12]: IPv4 source
            (0x05, 0, 0, 4),  # ja: over the IPv6 loads
            (0x20, 0, 0, net + 8),  # ld [net + 8]: the IPv6 source's first word
            (0x07, 0, 0, 0),  # tax
            (0x20, 0, 0, net + 12),  # ld [net + 12]: its second; the /64 ends here
            (0xAC, 0, 0, 0),  # xor x
            (0x94, 0, 0, 3),  # mod #3
            (0x16, 0, 0, 0),  # ret a
        ])

    def test_the_key_is_an_ipv4_address_or_an_ipv6_64(self):
        self.assertEqual(steering_key("127.0.0.2"), 0x7F000002)
        self.assertEqual(steering_key("::ffff:127.0.0.2"), 0x7F000002)
        key = 0x20010DB8 ^ 0x00010002
        for host in ("2001:db8:1:2::1", "2001:db8:1:2:ffff:ffff:ffff:ffff",
                     "2001:db8:1:2:a:b:c:d%eth0"):
            self.assertEqual(steering_key(host), key, host)
        self.assertNotEqual(steering_key("2001:db8:1:3::1"), key)

    def test_a_group_has_a_socket(self):
        with self.assertRaises(ValueError):
            steering_program(0)


class GroupTests(SynchronousTestCase):
    def group(self, count, steer, interface="127.0.0.1", port=0):
        group = bind_group(interface, port, 16, count, steer=steer)
        self.addCleanup(lambda: [s.close() for s in group])
        return group

    def test_one_port_many_sockets(self):
        group = self.group(3, steer=False)
        self.assertEqual(len({s.getsockname() for s in group}), 1)
        for s in group:
            self.assertTrue(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))
            self.assertTrue(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
            self.assertFalse(s.getblocking())

    def test_steered_by_client_address(self):
        count = 3
        group = self.group(count, steer=True)
        port = group[0].getsockname()[1]
        for last in range(1, 10):
            expected = (0x7F000000 + last) % count
            for _ in range(3):  # new source ports each time: the hash would vary
                self.assertEqual(accepted_by(group, f"127.0.0.{last}", port), [expected])

    def test_without_steering_one_client_is_spread(self):
        group = self.group(2, steer=False)
        port = group[0].getsockname()[1]
        seen = set()
        for _ in range(200):
            seen.update(accepted_by(group, "127.0.0.1", port))
            if seen == {0, 1}:
                break
        self.assertEqual(seen, {0, 1})

    @skipUnless(has_ipv6_loopback(), "no IPv6 loopback")
    def test_ipv6_and_its_ipv4_clients(self):
        group = self.group(2, steer=True, interface="::")
        port = group[0].getsockname()[1]
        for _ in range(3):
            self.assertEqual(accepted_by(group, "::1", port, "::1"), [0])  # its /64 is 0
            # An IPv4 client of the dual-stack socket: steered by its address.
            self.assertEqual(accepted_by(group, "127.0.0.2", port), [0])
            self.assertEqual(accepted_by(group, "127.0.0.3", port), [1])

    @skipUnless(has_ipv6_loopback(), "no IPv6 loopback")
    def test_an_ipv6_only_group_beside_an_ipv4_group_each_steered(self):
        # The default listener with workers: two groups on one port, one
        # per family, each steering its own clients.
        ipv4 = self.group(2, steer=True, interface="")
        port = ipv4[0].getsockname()[1]
        ipv6 = bind_group("::", port, 16, 2, steer=True, ipv6_only=True)
        self.addCleanup(lambda: [s.close() for s in ipv6])
        for s in ipv6:
            self.assertEqual(s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY), 1)
        both = ipv4 + ipv6  # indexes 0 and 1 are IPv4's, 2 and 3 IPv6's
        # ::1's /64 is ::/64, key 0: the first of the IPv6 group.
        self.assertEqual(steering_key("::1") % 2, 0)
        for _ in range(3):
            self.assertEqual(accepted_by(both, "::1", port, "::1"), [2])
            self.assertEqual(accepted_by(both, "127.0.0.2", port), [0])
            self.assertEqual(accepted_by(both, "127.0.0.3", port), [1])

    def test_port_in_use(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with self.assertRaises(CannotListenError) as caught:
                bind_group("127.0.0.1", port, 16, 2)
        self.assertEqual(caught.exception.socketError.strerror, "Address already in use")

    def test_no_joining_another_group(self):
        # SO_REUSEPORT alone would let a second supervisor of the same user
        # share the first one's port; it must fail as a single process does.
        first = self.group(2, steer=False)
        with self.assertRaises(CannotListenError):
            bind_group("127.0.0.1", first[0].getsockname()[1], 16, 2)
