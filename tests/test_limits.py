"""
Admission control: the total, per-address and rate limits, and the bounds on
the tables behind them.
"""

from twisted.trial.unittest import SynchronousTestCase

from tcpgreet.limits import (
    MAX_CONNECTIONS,
    MAX_PER_IP,
    RATE_PER_IP,
    ConnectionLimits,
    TokenBuckets,
    address_key,
)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class TotalLimitTests(SynchronousTestCase):
    def test_admits_up_to_the_limit_then_refuses(self):
        limits = ConnectionLimits(max_connections=3)
        self.assertEqual([limits.admit(f"10.0.0.{i}") for i in range(4)],
                         [None, None, None, MAX_CONNECTIONS])
        self.assertEqual(limits.open, 3)
        limits.release("10.0.0.1")
        self.assertIsNone(limits.admit("10.0.0.9"))

    def test_connections_without_an_address_count_toward_the_total(self):
        limits = ConnectionLimits(max_connections=1, max_per_ip=5)
        self.assertIsNone(limits.admit(None))
        self.assertEqual(limits.admit(None), MAX_CONNECTIONS)
        limits.release(None)
        self.assertEqual(limits.open, 0)


class PerAddressTests(SynchronousTestCase):
    def test_each_address_has_its_own_limit(self):
        limits = ConnectionLimits(max_per_ip=2)
        self.assertEqual([limits.admit("192.0.2.1") for _ in range(3)],
                         [None, None, MAX_PER_IP])
        self.assertIsNone(limits.admit("192.0.2.2"))
        limits.release("192.0.2.1")
        self.assertIsNone(limits.admit("192.0.2.1"))

    def test_the_table_holds_only_addresses_with_open_connections(self):
        limits = ConnectionLimits(max_per_ip=2)
        for i in range(1000):
            limits.admit(f"10.0.{i // 256}.{i % 256}")
        self.assertEqual(len(limits.per_ip), 1000)
        for i in range(1000):
            limits.release(f"10.0.{i // 256}.{i % 256}")
        self.assertEqual((limits.per_ip, limits.open), ({}, 0))

    def test_a_refused_connection_is_not_counted(self):
        limits = ConnectionLimits(max_per_ip=1)
        limits.admit("192.0.2.1")
        self.assertEqual(limits.admit("192.0.2.1"), MAX_PER_IP)
        self.assertEqual((limits.open, limits.per_ip), (1, {"192.0.2.1": 1}))


class AddressKeyTests(SynchronousTestCase):
    def test_one_ipv6_host_is_its_64(self):
        limits = ConnectionLimits(max_per_ip=2)
        self.assertIsNone(limits.admit("2001:db8:1:2::1"))
        self.assertIsNone(limits.admit("2001:db8:1:2:ffff::9"))
        self.assertEqual(limits.admit("2001:db8:1:2:abcd::1"), MAX_PER_IP)
        self.assertIsNone(limits.admit("2001:db8:1:3::1"))
        self.assertEqual(limits.per_ip, {"2001:db8:1:2::/64": 2, "2001:db8:1:3::/64": 1})
        limits.release("2001:db8:1:2::1")
        self.assertEqual(limits.per_ip["2001:db8:1:2::/64"], 1)

    def test_keys(self):
        self.assertEqual(address_key("192.0.2.1"), "192.0.2.1")
        self.assertEqual(address_key("::ffff:192.0.2.1"), "192.0.2.1")
        self.assertEqual(address_key("fe80::1%eth0"), "fe80::/64")
        self.assertEqual(address_key("not an address"), "not an address")


class ReservationTests(SynchronousTestCase):
    def test_reserve_then_admit_the_address(self):
        limits = ConnectionLimits(max_connections=2, max_per_ip=1)
        self.assertIsNone(limits.reserve())
        self.assertIsNone(limits.reserve())
        self.assertEqual(limits.reserve(), MAX_CONNECTIONS)
        self.assertIsNone(limits.admit_address("192.0.2.1"))
        self.assertEqual(limits.admit_address("192.0.2.1"), MAX_PER_IP)
        limits.cancel()
        self.assertEqual(limits.open, 1)
        limits.release("192.0.2.1")
        self.assertEqual((limits.open, limits.per_ip), (0, {}))


class RateTests(SynchronousTestCase):
    def test_burst_then_rate(self):
        clock = FakeClock()
        limits = ConnectionLimits(rate=TokenBuckets(rate=2, burst=3, clock=clock))
        results = [limits.admit("192.0.2.1") for _ in range(4)]
        self.assertEqual(results, [None, None, None, RATE_PER_IP])
        clock.now += 0.5  # one token back
        self.assertIsNone(limits.admit("192.0.2.1"))
        self.assertEqual(limits.admit("192.0.2.1"), RATE_PER_IP)
        self.assertIsNone(limits.admit("192.0.2.2"))

    def test_refused_connections_do_not_keep_the_bucket_full(self):
        clock = FakeClock()
        buckets = TokenBuckets(rate=1, burst=1, clock=clock)
        self.assertTrue(buckets.take("a"))
        for _ in range(8):
            clock.now += 0.0625  # binary fractions keep the sums exact
            self.assertFalse(buckets.take("a"))
        clock.now += 0.5  # 1 s since the token was taken
        self.assertTrue(buckets.take("a"))

    def test_a_flood_of_distinct_addresses_leaves_a_bounded_table(self):
        clock = FakeClock()
        buckets = TokenBuckets(rate=10, burst=20, clock=clock, max_tracked=5000)
        for i in range(100_000):
            clock.now += 0.0001  # 10,000 new addresses a second
            self.assertTrue(buckets.take(f"2001:db8::{i:x}"))
            self.assertLessEqual(buckets.tracked, 5000)
        # A full bucket is forgotten: about 0.1 s worth of addresses remain.
        self.assertLessEqual(buckets.tracked, 1100)

    def test_the_hard_cap_holds_even_without_time_passing(self):
        clock = FakeClock()
        buckets = TokenBuckets(rate=1, burst=5, clock=clock, max_tracked=1000)
        for i in range(100_000):
            buckets.take(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
        self.assertEqual(buckets.tracked, 1000)

    def test_idle_addresses_are_forgotten(self):
        clock = FakeClock()
        buckets = TokenBuckets(rate=1, burst=2, clock=clock)
        for i in range(100):
            buckets.take(f"192.0.2.{i}")
        clock.now += 10
        for _ in range(60):
            buckets.take("198.51.100.1")
        self.assertEqual(buckets.tracked, 1)

    def test_a_limiter_is_true_before_it_tracks_anyone(self):
        # "if limits.rate:" must not read a limit in force as none.
        buckets = TokenBuckets(rate=2, burst=3)
        self.assertEqual(buckets.tracked, 0)
        self.assertTrue(buckets)

    def test_bad_parameters(self):
        self.assertRaises(ValueError, TokenBuckets, rate=0, burst=1)
        self.assertRaises(ValueError, TokenBuckets, rate=1, burst=0)
