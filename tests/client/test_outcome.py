"""
The meaning of a probe's outcome: expectations, thresholds, certificate
expiry, chosen states, and the running summary over many probes.
"""

import math
import re
import statistics
from datetime import datetime, timezone

from twisted.trial.unittest import SynchronousTestCase

from tcpgreet.client.outcome import (
    CRITICAL,
    OK,
    UNKNOWN,
    WARNING,
    Checks,
    ProbeResult,
    RunningStats,
    Summary,
    TLSInfo,
    Verdict,
    banner_text,
    judge,
)

NOW = 1_800_000_000.0
DAY = 86400.0


def read(banner=b"220 mail.example ESMTP\r\n", total=0.010, **facts):
    """A probe that read a banner."""
    return ProbeResult(host="mail.example", port=25, started=NOW, total=total,
                       address="192.0.2.1", connect=0.002, banner=banner, **facts)


def failed(error="connection refused", refused=True, tried=("192.0.2.1",)):
    return ProbeResult(host="mail.example", port=25, started=NOW, total=0.001,
                       address=tried[-1] if tried else None, tried=tried, error=error,
                       refused=refused)


def empty():
    """A probe whose server closed without a byte."""
    return ProbeResult(host="mail.example", port=25, started=NOW, total=0.003,
                       address="192.0.2.1", tried=("192.0.2.1",), connect=0.002,
                       error="closed without a banner", empty=True)


def tls_expiring_in(days):
    not_after = datetime.fromtimestamp(NOW + days * DAY, timezone.utc)
    return TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", not_after)


class JudgeTests(SynchronousTestCase):
    def test_a_banner_is_ok(self):
        self.assertEqual(judge(read(), Checks(), NOW), Verdict(OK, True))

    def test_a_failure_is_critical(self):
        self.assertEqual(judge(failed("timed out", refused=False), Checks(), NOW),
                         Verdict(CRITICAL, False, "timed out", "timed out", "connect"))

    def test_refused_state_is_chosen(self):
        for state in (OK, WARNING, CRITICAL):
            verdict = judge(failed(), Checks(refused_state=state), NOW)
            self.assertEqual((verdict.state, verdict.ok, verdict.error),
                             (state, False, "connection refused"))
            self.assertEqual(verdict.reason, None if state == OK else "connection refused")

    def test_refused_state_leaves_other_failures_critical(self):
        verdict = judge(failed("timed out", refused=False), Checks(refused_state=OK), NOW)
        self.assertEqual(verdict.state, CRITICAL)

    def test_an_empty_reply_is_critical(self):
        self.assertEqual(judge(empty(), Checks(), NOW),
                         Verdict(CRITICAL, False, "closed without a banner",
                                 "closed without a banner", "read"))

    def test_empty_state_is_chosen(self):
        for state in (OK, WARNING, CRITICAL):
            verdict = judge(empty(), Checks(empty_state=state, refused_state=OK), NOW)
            self.assertEqual((verdict.state, verdict.ok, verdict.error),
                             (state, False, "closed without a banner"),
                             "ok stays false: no banner was read")
            self.assertEqual(verdict.reason,
                             None if state == OK else "closed without a banner")
        self.assertEqual(judge(failed(), Checks(empty_state=OK), NOW).state, CRITICAL)

    def test_expect_searches_the_decoded_banner(self):
        self.assertTrue(judge(read(), Checks(expect=re.compile("ESMTP$")), NOW).ok)
        self.assertTrue(judge(read(b"caf\xc3\xa9\r\n"), Checks(expect=re.compile("café")),
                              NOW).ok)

    def test_mismatch(self):
        verdict = judge(read(), Checks(expect=re.compile("^SSH-")), NOW)
        self.assertEqual(verdict, Verdict(CRITICAL, False, "banner does not match '^SSH-'",
                                          "banner does not match '^SSH-'", "expect"))

    def test_mismatch_state_is_chosen(self):
        verdict = judge(read(), Checks(expect=re.compile("^SSH-"), mismatch_state=WARNING), NOW)
        self.assertEqual((verdict.state, verdict.ok), (WARNING, False))
        verdict = judge(read(), Checks(expect=re.compile("^SSH-"), mismatch_state=OK), NOW)
        self.assertEqual((verdict.state, verdict.ok, verdict.reason), (OK, False, None))

    def test_thresholds_on_the_time_without_the_name(self):
        checks = Checks(warning=0.5, critical=1.0)
        self.assertEqual(judge(read(total=0.5), checks, NOW).state, OK)
        verdict = judge(read(total=0.75), checks, NOW)
        self.assertEqual(verdict, Verdict(WARNING, True, None,
                                          "response time 0.750 s over --warning 0.5 s"))
        verdict = judge(read(total=1.25), checks, NOW)
        self.assertEqual(verdict, Verdict(CRITICAL, True, None,
                                          "response time 1.250 s over --critical 1 s"))
        # A slow name service is not a slow server.
        self.assertEqual(judge(read(total=1.25, resolve=1.0), checks, NOW).state, OK)

    def test_critical_alone(self):
        self.assertEqual(judge(read(total=2.0), Checks(critical=1.0), NOW).state, CRITICAL)
        self.assertEqual(judge(read(total=0.9), Checks(critical=1.0), NOW).state, OK)

    def test_certificate_expiry(self):
        checks = Checks(cert_warning_days=30, cert_critical_days=7)
        self.assertEqual(judge(read(tls=tls_expiring_in(31)), checks, NOW).state, OK)
        verdict = judge(read(tls=tls_expiring_in(20)), checks, NOW)
        self.assertEqual(verdict.state, WARNING)
        self.assertRegex(verdict.reason, r"^certificate expires in 20\.0 days \(\d{4}-")
        self.assertEqual(judge(read(tls=tls_expiring_in(3)), checks, NOW).state, CRITICAL)
        verdict = judge(read(tls=tls_expiring_in(-2)), checks, NOW)
        self.assertEqual(verdict.state, CRITICAL)
        self.assertIn("expired 2.0 days ago", verdict.reason)

    def test_expiry_not_checked_unless_asked(self):
        self.assertEqual(judge(read(tls=tls_expiring_in(-2)), Checks(), NOW).state, OK)

    def test_every_problem_is_named_and_the_worst_decides(self):
        checks = Checks(expect=re.compile("^SSH-"), mismatch_state=WARNING, critical=0.001)
        verdict = judge(read(total=0.5), checks, NOW)
        self.assertEqual(verdict.state, CRITICAL)
        self.assertEqual(verdict.reason, "banner does not match '^SSH-'; "
                                         "response time 0.500 s over --critical 0.001 s")

    def test_banner_text(self):
        self.assertEqual(banner_text(b"a\r\nb\xff\n"), "a\nb\\xff\n")


class RunningStatsTests(SynchronousTestCase):
    def test_matches_statistics_module(self):
        values = [0.003, 0.001, 0.0125, 0.002, 0.002, 0.25]
        stats = RunningStats()
        for value in values:
            stats.add(value)
        self.assertEqual((stats.count, stats.min, stats.max), (6, 0.001, 0.25))
        self.assertAlmostEqual(stats.mean, statistics.fmean(values))
        self.assertAlmostEqual(stats.stdev, statistics.pstdev(values))

    def test_empty(self):
        stats = RunningStats()
        self.assertEqual((stats.count, stats.stdev), (0, 0.0))
        self.assertEqual(stats.min, math.inf)


class SummaryTests(SynchronousTestCase):
    def test_tally(self):
        summary = Summary("mail.example", 25)
        checks = Checks(warning=0.5)
        for result in (read(total=0.1), failed(), read(total=0.7), read(total=0.2)):
            summary.add(result, judge(result, checks, NOW))
        self.assertEqual((summary.probes, summary.ok, summary.failed, summary.loss),
                         (4, 3, 1, 25.0))
        self.assertEqual((summary.total.count, summary.total.max), (3, 0.7))
        self.assertEqual(summary.connect.count, 3)
        self.assertEqual(summary.state, CRITICAL)
        self.assertEqual(summary.exit_status, CRITICAL)
        self.assertEqual(summary.worst[0].error, "connection refused")

    def test_an_empty_reply_is_a_loss(self):
        summary = Summary("mail.example", 25)
        for result in (read(), empty(), empty()):
            summary.add(result, judge(result, Checks(empty_state=WARNING), NOW))
        self.assertEqual((summary.probes, summary.ok, summary.failed, summary.exit_status),
                         (3, 1, 2, WARNING))
        self.assertEqual(summary.total.count, 3, "the empty replies connected and are timed")

    def test_name_failed(self):
        unresolved = failed("name not resolved", refused=False, tried=())
        self.assertTrue(unresolved.name_failed)
        self.assertFalse(empty().name_failed)
        self.assertFalse(read().name_failed)
        self.assertEqual([result.failed_at for result in (unresolved, failed(), empty(), read())],
                         ["resolve", "connect", "read", None])

    def test_worst_probe_decides(self):
        summary = Summary("mail.example", 25)
        checks = Checks(warning=0.5, critical=1.0)
        for total in (0.1, 0.7, 0.2):
            summary.add(read(total=total), judge(read(total=total), checks, NOW))
        self.assertEqual(summary.exit_status, WARNING)
        self.assertEqual(summary.worst[0].total, 0.7)
        self.assertEqual(summary.loss, 0.0)

    def test_nothing_completed_is_unknown(self):
        summary = Summary("mail.example", 25)
        self.assertEqual((summary.exit_status, summary.loss, summary.worst), (UNKNOWN, 0.0, None))
