"""
The four report forms, written to memory: the banner, a line per probe with
a summary, JSON Lines, the monitoring-plugin line; and terminal safety.
"""

import io
import json
import re
from datetime import datetime, timezone

from twisted.trial.unittest import SynchronousTestCase

from tcpgreet.client.outcome import Checks, ProbeResult, Summary, TLSInfo, judge
from tcpgreet.client.report import (
    BannerReport,
    JsonReport,
    LinesReport,
    Output,
    PluginReport,
    iso_time,
    percent,
    render_banner,
    render_line,
)

STARTED = 1_800_000_000.25  # 2027-01-15T08:00:00.250Z
NO_CHECKS = Checks()
HOSTILE = b"\x1b]0;pwned\x07\x1b[2J caf\xe9 \xc3\xa9\r\nsecond line\r\n"


def read(banner=b"Thank you for connecting\r\n", total=0.0021, **facts):
    facts.setdefault("connect", 0.0004)
    facts.setdefault("ended_by", "close")
    return ProbeResult(host="localhost", port=27679, started=STARTED, total=total,
                       address="127.0.0.1", tried=("127.0.0.1",), banner=banner, **facts)


def refused():
    return ProbeResult(host="localhost", port=9, started=STARTED, total=0.0003,
                       address="127.0.0.1", tried=("127.0.0.1",),
                       error="connection refused", refused=True)


def empty():
    return ProbeResult(host="localhost", port=27679, started=STARTED, total=0.0005,
                       address="127.0.0.1", tried=("127.0.0.1",), connect=0.0002,
                       error="closed without a banner", empty=True)


def partial():
    """A timeout after the first bytes of a banner."""
    return ProbeResult(host="localhost", port=25, started=STARTED, total=5.0,
                       address="127.0.0.1", tried=("127.0.0.1",), connect=0.0004,
                       banner=b"220-partial", error="timed out after 11 bytes")


def unresolved():
    return ProbeResult(host="nosuchhost.invalid", port=25, started=STARTED, total=0.0031,
                       error="name not resolved")


class Run:
    """Feed results through a report, keeping what it wrote."""

    def __init__(self, report_class, rules=NO_CHECKS, **options):
        self.out, self.err = io.BytesIO(), io.BytesIO()
        self.rules = rules
        self.report = report_class(self.out, self.err, **options)
        self.summary = None

    def __call__(self, *results, interrupted=False):
        self.summary = Summary(results[0].host if results else "localhost",
                               results[0].port if results else 27679)
        for seq, result in enumerate(results, 1):
            verdict = judge(result, self.rules, STARTED)
            self.summary.add(result, verdict)
            self.report.probe(seq, result, verdict)
        self.report.finish(self.summary, interrupted)
        return self.out.getvalue(), self.err.getvalue()


class RenderTests(SynchronousTestCase):
    def test_crlf_becomes_newline(self):
        self.assertEqual(render_banner(b"a\r\nb\r\n"), "a\nb\n")

    def test_control_characters_are_escaped(self):
        rendered = render_banner(b"\x1b]0;pwned\x07\x1b[2J\tok\rx\x7f\n")
        self.assertEqual(rendered, "\\x1b]0;pwned\\x07\\x1b[2J\tok\\x0dx\\x7f\n")

    def test_invalid_utf8_is_escaped(self):
        self.assertEqual(render_banner(b"caf\xe9 \xc3\xa9"), "caf\\xe9 é")

    def test_unicode_controls_are_escaped(self):
        self.assertEqual(render_banner("a\u202eb\u0085\U000e0001".encode()),
                         "a\\u202eb\\x85\\U000e0001")

    def test_first_line(self):
        self.assertEqual(render_line(b"220 hi\r\nmore\r\n"), "220 hi")
        self.assertEqual(render_line(b"a\tb\x1b[31m\rc"), "a\tb\\x1b[31m\\x0dc")
        self.assertEqual(render_line(b""), "")

    def test_first_line_raw_keeps_bytes(self):
        line = render_line(HOSTILE, raw=True)
        self.assertEqual(line.encode("utf-8", "surrogateescape"), HOSTILE.split(b"\r\n")[0])

    def test_helpers(self):
        self.assertEqual(iso_time(STARTED), "2027-01-15T08:00:00.250Z")
        self.assertEqual([percent(v) for v in (0.0, 40.0, 100 / 3, 100.0)],
                         ["0", "40", "33.3", "100"])


class BannerReportTests(SynchronousTestCase):
    def test_banner_on_stdout_only(self):
        out, err = Run(BannerReport)(read())
        self.assertEqual((out, err), (b"Thank you for connecting\n", b""))

    def test_a_final_newline_is_added_for_the_terminal(self):
        out, _ = Run(BannerReport)(read(b"no newline"))
        self.assertEqual(out, b"no newline\n")

    def test_failure_is_one_line_on_stderr(self):
        out, err = Run(BannerReport)(refused())
        self.assertEqual((out, err), (b"", b"tcpgreet-client: localhost port 9: "
                                           b"failed at connect: connection refused\n"))

    def test_empty_reply(self):
        out, err = Run(BannerReport)(empty())
        self.assertEqual((out, err), (b"", b"tcpgreet-client: localhost port 27679: "
                                           b"failed at read: closed without a banner\n"))
        out, err = Run(BannerReport, Checks(empty_state=0))(empty())
        self.assertEqual(err, b"tcpgreet-client: localhost port 27679: failed at read: "
                              b"closed without a banner\n",
                         "still said, as a refusal with --refused-state ok")

    def test_what_came_before_a_timeout_is_shown(self):
        out, err = Run(BannerReport)(partial())
        self.assertEqual((out, err), (b"220-partial\n", b"tcpgreet-client: localhost port 25: "
                                                         b"failed at read: "
                                                         b"timed out after 11 bytes\n"))

    def test_a_name_that_does_not_resolve_is_the_culprit(self):
        out, err = Run(BannerReport)(unresolved())
        self.assertEqual((out, err), (b"", b"tcpgreet-client: nosuchhost.invalid: "
                                           b"failed at resolve: name not resolved\n"))

    def test_mismatch_shows_what_came(self):
        out, err = Run(BannerReport, Checks(expect=re.compile("^220")))(read())
        self.assertEqual(out, b"Thank you for connecting\n")
        self.assertEqual(err, b"tcpgreet-client: localhost port 27679: failed at expect: "
                              b"banner does not match '^220': got \"Thank you for connecting\"\n")

    def test_escaped_by_default(self):
        out, err = Run(BannerReport)(read(HOSTILE))
        self.assertEqual(err, b"")
        self.assertNotIn(b"\x1b", out)
        self.assertNotIn(b"\x07", out)
        self.assertEqual(out, b"\\x1b]0;pwned\\x07\\x1b[2J caf\\xe9 \xc3\xa9\nsecond line\n")

    def test_raw_writes_the_bytes(self):
        out, _ = Run(BannerReport, raw=True)(read(HOSTILE))
        self.assertEqual(out, HOSTILE)

    def test_truncation_is_noted(self):
        out, err = Run(BannerReport)(read(b"x" * 10, truncated=True))
        self.assertEqual(out, b"xxxxxxxxxx\n")
        self.assertEqual(err, b"tcpgreet-client: localhost port 27679: banner truncated "
                              b"at 10 bytes (--max-bytes)\n")

    def test_interrupted_before_a_result(self):
        out, err = Run(BannerReport)(interrupted=True)
        self.assertEqual((out, err), (b"", b"tcpgreet-client: localhost port 27679: "
                                           b"interrupted\n"))


class LinesReportTests(SynchronousTestCase):
    def test_probe_lines_and_summary(self):
        out, err = Run(LinesReport)(read(), refused(), read(total=0.0041, connect=0.0006))
        self.assertEqual(err, b"")
        self.assertEqual(out.decode().splitlines(), [
            "localhost port 27679 (127.0.0.1) seq=1: OK connect 0.400 ms, total 2.100 ms, "
            "26 bytes: Thank you for connecting",
            "localhost port 9 (127.0.0.1) seq=2: CRITICAL failed at connect: connection refused "
            "after 0.300 ms",
            "localhost port 27679 (127.0.0.1) seq=3: OK connect 0.600 ms, total 4.100 ms, "
            "26 bytes: Thank you for connecting",
            "",
            "--- localhost port 27679 probe statistics ---",
            "3 probes, 2 ok, 1 failed, 33.3% loss, state CRITICAL",
            "connect min/avg/max/mdev = 0.400/0.500/0.600/0.100 ms",
            "time min/avg/max/mdev = 2.100/3.100/4.100/1.000 ms",
        ])

    def test_problems_and_details(self):
        tls = TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256",
                      datetime(2027, 1, 20, tzinfo=timezone.utc))
        run = Run(LinesReport, Checks(expect=re.compile("^220"), warning=0.001),
                  timestamps=True)
        out, _ = run(read(HOSTILE, handshake=0.0015, tls=tls, truncated=True))
        self.assertEqual(out.decode().splitlines()[0],
                         "[2027-01-15T08:00:00.250Z] localhost port 27679 (127.0.0.1) seq=1: "
                         "CRITICAL connect 0.400 ms, TLS 1.500 ms, total 2.100 ms, "
                         "37 bytes (truncated); failed at expect: banner does not match "
                         "'^220'; response time "
                         "0.002 s over --warning 0.001 s: \\x1b]0;pwned\\x07\\x1b[2J "
                         "caf\\xe9 é")

    def test_empty_partial_and_unresolved(self):
        out, _ = Run(LinesReport)(empty(), partial(), unresolved())
        self.assertEqual(out.decode().splitlines()[:6], [
            "localhost port 27679 (127.0.0.1) seq=1: CRITICAL failed at read: closed without a "
            "banner after 0.500 ms",
            "localhost port 25 (127.0.0.1) seq=2: CRITICAL connect 0.400 ms, total 5000.000 ms, "
            "11 bytes; failed at read: timed out after 11 bytes: 220-partial",
            "nosuchhost.invalid port 25 seq=3: CRITICAL failed at resolve: name not resolved "
            "after 3.100 ms",
            "",
            "--- localhost port 27679 probe statistics ---",
            "3 probes, 0 ok, 3 failed, 100% loss, state CRITICAL",
        ])

    def test_only_probes_completed_count(self):
        out, _ = Run(LinesReport)(interrupted=True)
        self.assertEqual(out.decode().splitlines()[1:],
                         ["--- localhost port 27679 probe statistics ---",
                          "0 probes, 0 ok, 0 failed, 0% loss, state UNKNOWN"])


class JsonReportTests(SynchronousTestCase):
    def records(self, *results, checks=NO_CHECKS, interrupted=False):
        out, err = Run(JsonReport, checks)(*results, interrupted=interrupted)
        self.assertEqual(err, b"")
        return [json.loads(line) for line in out.decode("ascii").splitlines()]

    def test_probe_and_summary(self):
        probe, summary = self.records(read())
        self.assertEqual(probe, {
            "type": "probe", "seq": 1, "time": "2027-01-15T08:00:00.250Z",
            "target": "localhost", "port": 27679, "address": "127.0.0.1",
            "tried": ["127.0.0.1"], "ok": True, "state": "OK", "error": None,
            "stage": None, "reason": None, "dns_ms": None, "connect_ms": 0.4, "tls_ms": None,
            "firstbyte_ms": None, "time_ms": 2.1, "total_ms": 2.1,
            "bytes": 26, "banner": "Thank you for connecting\r\n", "truncated": False,
            "ended_by": "close", "tls_version": None, "tls_cipher": None, "cert_not_after": None,
            "cert_days_left": None,
        })
        self.assertEqual(summary, {
            "type": "summary", "target": "localhost", "port": 27679, "probes": 1, "ok": 1,
            "failed": 0, "loss_pct": 0.0,
            "dns_ms": None,
            "connect_ms": {"min": 0.4, "avg": 0.4, "max": 0.4, "stdev": 0.0, "mdev": 0.0},
            "time_ms": {"min": 2.1, "avg": 2.1, "max": 2.1, "stdev": 0.0, "mdev": 0.0},
            "total_ms": {"min": 2.1, "avg": 2.1, "max": 2.1, "stdev": 0.0, "mdev": 0.0},
            "addresses": None,
            "state": "OK", "exit_status": 0, "interrupted": False,
        })

    def test_failure_and_tls(self):
        tls = TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256",
                      datetime(2027, 1, 20, 8, 0, 0, 250000, tzinfo=timezone.utc))
        first, second, summary = self.records(refused(), read(tls=tls, handshake=0.0012),
                                              checks=Checks(cert_warning_days=10))
        self.assertEqual((first["ok"], first["state"], first["error"], first["connect_ms"],
                          first["banner"], first["bytes"]),
                         (False, "CRITICAL", "connection refused", None, None, 0))
        self.assertEqual((second["tls_version"], second["tls_ms"], second["cert_not_after"],
                          second["cert_days_left"], second["state"]),
                         ("TLSv1.3", 1.2, "2027-01-20T08:00:00.250Z", 5.0, "WARNING"))
        self.assertEqual((summary["probes"], summary["failed"], summary["loss_pct"],
                          summary["state"], summary["exit_status"]),
                         (2, 1, 50.0, "CRITICAL", 2))

    def test_empty_reply(self):
        fields = ("ok", "state", "error", "reason", "bytes", "banner", "ended_by")
        probe, summary = self.records(empty())
        self.assertEqual({key: probe[key] for key in fields},
                         {"ok": False, "state": "CRITICAL", "error": "closed without a banner",
                          "reason": "closed without a banner", "bytes": 0, "banner": None,
                          "ended_by": None})
        self.assertEqual((summary["ok"], summary["failed"]), (0, 1))
        probe, _ = self.records(empty(), checks=Checks(empty_state=0))
        self.assertEqual({key: probe[key] for key in fields},
                         {"ok": False, "state": "OK", "error": "closed without a banner",
                          "reason": None, "bytes": 0, "banner": None, "ended_by": None})

    def test_partial_banner(self):
        probe, _ = self.records(partial())
        self.assertEqual(
            {key: probe[key] for key in ("ok", "state", "error", "bytes", "banner", "total_ms")},
            {"ok": False, "state": "CRITICAL", "error": "timed out after 11 bytes",
             "bytes": 11, "banner": "220-partial", "total_ms": 5000.0})

    def test_hostile_banner_is_plain_ascii_json(self):
        out, _ = Run(JsonReport)(read(HOSTILE))
        self.assertTrue(out.isascii())
        self.assertNotIn(b"\x1b", out)
        probe = json.loads(out.splitlines()[0])
        self.assertEqual(probe["banner"],
                         "\x1b]0;pwned\x07\x1b[2J caf\\xe9 é\r\nsecond line\r\n")

    def test_nothing_completed(self):
        [summary] = self.records(interrupted=True)
        self.assertEqual((summary["probes"], summary["connect_ms"], summary["state"],
                          summary["exit_status"], summary["interrupted"]),
                         (0, None, "UNKNOWN", 3, True))


class PluginReportTests(SynchronousTestCase):
    def line(self, *results, checks=NO_CHECKS, timeout=10.0, **options):
        out, err = Run(PluginReport, checks, checks=checks, timeout=timeout, **options)(*results)
        self.assertEqual(err, b"")
        self.assertTrue(out.endswith(b"\n") and out.count(b"\n") == 1, out)
        return out.decode().rstrip("\n")

    def test_as_check_tcp(self):
        self.assertEqual(self.line(read()),
                         "TCP OK - 0.002 second response time on localhost port 27679 "
                         "[Thank you for connecting]|time=0.002100s;;;0.000000;10.000000 "
                         "connect=0.000400s;;;0.000000;10.000000")

    def test_thresholds_in_performance_data(self):
        line = self.line(read(total=1.5), checks=Checks(warning=1, critical=2), timeout=5)
        self.assertEqual(line, "TCP WARNING - response time 1.500 s over --warning 1 s; 1.500 "
                               "second response time on localhost port 27679 [Thank you for "
                               "connecting]|time=1.500000s;1.000000;2.000000;0.000000;5.000000 "
                               "connect=0.000400s;;;0.000000;5.000000")

    def test_failure(self):
        self.assertEqual(self.line(refused()), "TCP CRITICAL - connection refused on "
                                               "localhost port 9")
        self.assertEqual(self.line(refused(), checks=Checks(refused_state=0)),
                         "TCP OK - connection refused on localhost port 9")

    def test_empty_reply(self):
        self.assertEqual(self.line(empty()),
                         "TCP CRITICAL - closed without a banner on localhost port 27679"
                         "|time=0.000500s;;;0.000000;10.000000 "
                         "connect=0.000200s;;;0.000000;10.000000")
        self.assertTrue(self.line(empty(), checks=Checks(empty_state=1)).startswith(
            "TCP WARNING - closed without a banner on localhost port 27679|"))

    def test_partial_banner(self):
        self.assertEqual(self.line(partial()),
                         "TCP CRITICAL - timed out after 11 bytes on localhost port 25 "
                         "[220-partial]|time=5.000000s;;;0.000000;10.000000 "
                         "connect=0.000400s;;;0.000000;10.000000")

    def test_name_not_resolved(self):
        self.assertEqual(self.line(unresolved()),
                         "TCP CRITICAL - nosuchhost.invalid: name not resolved")

    def test_several_probes(self):
        line = self.line(read(), refused(), read(total=0.0035))
        self.assertEqual(line, "TCP CRITICAL - connection refused; 2 of 3 probes ok, 33.3% "
                               "loss, max 0.004 second response time on localhost port 27679"
                               "|time=0.003500s;;;0.000000;10.000000 "
                               "connect=0.000400s;;;0.000000;10.000000 loss=33.3%;;;0;100")

    def test_nothing_can_break_the_format(self):
        line = self.line(read(b"220 a|b \x1b[2J\r\nmore\r\n"),
                         checks=Checks(expect=re.compile("^(SSH|FTP)")))
        self.assertEqual(line.count("|"), 1)
        self.assertNotIn("\x1b", line)
        self.assertTrue(line.startswith("TCP CRITICAL - banner does not match "
                                        "'^(SSH\\x7cFTP)'; 0.002 second response time on "
                                        "localhost port 27679 [220 a\\x7cb \\x1b[2J]|time="))


class OutputTests(SynchronousTestCase):
    def test_a_reader_that_goes_away_ends_writing_quietly(self):
        class Closed(io.BytesIO):
            def write(self, data):
                raise BrokenPipeError(32, "Broken pipe")

        output = Output(Closed())
        output.write("first\n")
        output.write("second\n")
        self.assertTrue(output.closed)
