"""
The client's command line: targets, every option's conversion, the whole
parsed result, and one clear message for each mistake.
"""

import io
import re
import socket
import sys

from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tcpgreet.client.options import ClientOptions, escaped, parse_target
from tcpgreet.client.outcome import CRITICAL, OK, WARNING, Checks

from ..certificates import make_certificate
from ..helpers import temporary_file


def parse(*args):
    options = ClientOptions()
    options.parseOptions(list(args))
    return options


class TargetTests(SynchronousTestCase):
    def test_forms(self):
        cases = {
            (): ("localhost", 27679),
            ("example.org",): ("example.org", 27679),
            ("example.org", "25"): ("example.org", 25),
            ("example.org:2525",): ("example.org", 2525),
            ("[::1]:7",): ("::1", 7),
            ("[::1]",): ("::1", 27679),
            ("[::1]", "8"): ("::1", 8),
            ("::1",): ("::1", 27679),
            ("::1", "9"): ("::1", 9),
            ("unix:/run/greet.sock",): ("unix:/run/greet.sock", None),
            ("unix:relative/a:b.sock",): ("unix:relative/a:b.sock", None),
        }
        for args, expected in cases.items():
            self.assertEqual(parse_target(list(args)), expected, args)

    def test_service_names(self):
        try:
            ssh, smtp = socket.getservbyname("ssh", "tcp"), socket.getservbyname("smtp", "tcp")
        except OSError:
            raise SkipTest("no services database (/etc/services)") from None
        self.assertEqual((ssh, smtp), (22, 25))
        self.assertEqual(parse_target(["127.0.0.1", "ssh"]), ("127.0.0.1", 22))
        self.assertEqual(parse_target(["localhost:smtp"]), ("localhost", 25))
        self.assertEqual(parse_target(["[::1]:smtp"]), ("::1", 25))
        self.assertEqual(parse("-p", "ssh")["port"], 22)

    def test_mistakes(self):
        for args, fragment in [
            (["a", "b", "c"], "too many arguments"),
            (["host", "port"], "bad port 'port'"),
            (["host", "0"], "not in 1..65535"),
            (["host", "65536"], "not in 1..65535"),
            (["host:1", "2"], "port given twice"),
            (["[::1"], "unclosed bracket"),
            (["[::1]x"], "[IPv6]:PORT"),
            ([":80"], "empty host"),
            (["host", "no-such-service"],
             "bad port 'no-such-service': not a number or a known TCP service name"),
            (["unix:/run/greet.sock", "25"],
             "unix:/run/greet.sock is a UNIX socket, which has no port: '25'"),
            (["unix:"], "no path in 'unix:'; use unix:PATH"),
        ]:
            with self.assertRaises(usage.UsageError) as caught:
                parse_target(args)
            self.assertIn(fragment, str(caught.exception))


class DefaultsTests(SynchronousTestCase):
    def test_no_options_is_the_tutorial_client(self):
        options = parse()
        self.assertEqual(
            {key: options[key] for key in (
                "host", "port", "mode", "count", "interval", "timeout", "max-bytes", "send",
                "first-line", "raw", "tls", "ca", "insecure", "family", "source", "timestamp",
                "idle")},
            {"host": "localhost", "port": 27679, "mode": "banner", "count": 1,
             "interval": 1.0, "timeout": 5.0, "max-bytes": 65536, "send": b"", "idle": 1.0,
             "first-line": False, "raw": False, "tls": False, "ca": None, "insecure": False,
             "family": socket.AF_UNSPEC, "source": None, "timestamp": False})
        self.assertEqual(options.checks, Checks())
        self.assertIsNone(options["unix"])


class AnywhereTests(SynchronousTestCase):
    """Options before, between and after HOST and PORT, as GNU tools take them."""

    def test_options_after_the_target(self):
        options = parse("mail.example.net", "25", "--first-line", "-t", "2")
        self.assertEqual((options["host"], options["port"], options["first-line"],
                          options["timeout"]), ("mail.example.net", 25, True, 2.0))

    def test_options_between_host_and_port(self):
        options = parse("--json", "mail.example.net", "-c", "3", "25", "--send", "-x")
        self.assertEqual((options["host"], options["port"], options["mode"], options["count"],
                          options["send"]), ("mail.example.net", 25, "json", 3, b"-x"))

    def test_empty_value(self):
        options = parse("mail.example.net", "--expect", "", "25")
        self.assertEqual((options["port"], options.checks.expect), (25, (re.compile(""),)))

    def test_double_dash_ends_the_options(self):
        options = parse("--first-line", "--", "-c", "25")
        self.assertEqual((options["host"], options["port"], options["count"],
                          options["first-line"]), ("-c", 25, 1, True))
        with self.assertRaises(usage.UsageError) as caught:
            parse("localhost", "--", "--first-line")
        self.assertEqual(str(caught.exception),
                         "bad port '--first-line': not a number or a known TCP service name")

    def test_mistakes_after_the_target(self):
        for args, message in [
            (["localhost", "--bogus"], "option --bogus not recognized"),
            (["localhost", "-t"], "option -t requires argument"),
            (["localhost", "25", "-t", "soon"], "--timeout 'soon': not a number of seconds"),
            # Several targets are several HOSTs or HOST:PORTs; a port alone is none.
            (["localhost", "25", "26", "--json"], "too many arguments: localhost 25 26 (with "
                                                  "several targets, write each as HOST:PORT, "
                                                  "or give -p PORT)"),
        ]:
            with self.assertRaises(usage.UsageError) as caught:
                parse(*args)
            self.assertEqual(str(caught.exception), message, args)


class HostAndPortOptionTests(SynchronousTestCase):
    """check_tcp's -H HOST -p PORT, with or without the positional forms."""

    def test_forms(self):
        for args, expected in [
            (["-H", "mail.example", "-p", "25"], ("mail.example", 25)),
            (["-H", "mail.example"], ("mail.example", 27679)),
            (["-p", "25"], ("localhost", 25)),
            (["-p", "25", "mail.example"], ("mail.example", 25)),
            (["mail.example", "-p", "25"], ("mail.example", 25)),
            (["--host=mail.example:2525"], ("mail.example", 2525)),
            (["-H", "::1", "-p", "7"], ("::1", 7)),
            (["-H", "[::1]:7"], ("::1", 7)),
            (["-H", "unix:/run/greet.sock"], ("unix:/run/greet.sock", None)),
        ]:
            options = parse(*args)
            self.assertEqual((options["host"], options["port"]), expected, args)

    def test_given_twice(self):
        for args, message in [
            (["-H", "mail.example", "other.example"],
             "host given twice: --host 'mail.example' and 'other.example'"),
            (["-H", "mail.example", "25"], "host given twice: --host 'mail.example' and '25'"),
            (["-H", "mail.example:25", "-p", "26"], "port given twice: --port 26 and '25'"),
            (["-p", "26", "mail.example", "25"], "port given twice: --port 26 and '25'"),
            (["-p", "26", "unix:/run/greet.sock"],
             "--port 26: unix:/run/greet.sock is a UNIX socket, which has no port"),
            (["-p", "0"], "--port '0': not in 1..65535"),
            (["-p", "no-such-service"],
             "--port 'no-such-service': not a number or a known TCP service name"),
        ]:
            with self.assertRaises(usage.UsageError) as caught:
                parse(*args)
            self.assertEqual(str(caught.exception), message, args)

    def test_h_is_help(self):
        helps = []
        for flag in ("-h", "--help"):
            out = io.StringIO()
            self.patch(sys, "stdout", out)
            with self.assertRaises(SystemExit) as caught:
                parse(flag)
            self.assertEqual(caught.exception.code, 0)
            helps.append(out.getvalue())
        self.assertEqual(helps[0], helps[1])
        for line in ("-h, --help", "-H, --host=", "-p, --port="):
            self.assertIn(line, helps[0])


class UnixTargetTests(SynchronousTestCase):
    def test_path(self):
        options = parse("unix:/run/greet.sock", "--first-line")
        self.assertEqual((options["host"], options["port"], options["unix"],
                          options["first-line"]),
                         ("unix:/run/greet.sock", None, "/run/greet.sock", True))

    def test_what_does_not_apply(self):
        for args, option in [(["--tls"], "tls"), (["-4"], "ipv4"), (["-6"], "ipv6"),
                             (["-s", "127.0.0.1"], "source")]:
            with self.assertRaises(usage.UsageError) as caught:
                parse(*args, "unix:/run/greet.sock")
            self.assertEqual(str(caught.exception),
                             f"--{option} does not apply to a UNIX socket "
                             "(unix:/run/greet.sock)")


class OptionTests(SynchronousTestCase):
    def test_everything_converted(self):
        options = parse("-c", "0", "-i", "0.25", "-t", "2", "-e", "^220 ", "-w", "0.5",
                        "--critical", "1.5", "--refused-state", "warn",
                        "--mismatch-state", "OK", "--max-bytes", "512", "--first-line",
                        "--send", "QUIT\\r\\n", "-4", "-s", "127.0.0.1", "-D", "--raw",
                        "mail.example:25")
        self.assertEqual((options["count"], options["interval"], options["timeout"],
                          options["max-bytes"], options["send"], options["family"],
                          options["source"], options["mode"], options["host"],
                          options["port"]),
                         (0, 0.25, 2.0, 512, b"QUIT\r\n", socket.AF_INET, "127.0.0.1",
                          "lines", "mail.example", 25))
        self.assertEqual(options.checks, Checks(
            expect=re.compile("^220 "), warning=0.5, critical=1.5, refused_state=WARNING,
            mismatch_state=OK))

    def test_modes(self):
        self.assertEqual(parse("-c", "1")["mode"], "lines")
        self.assertEqual(parse("-i", "2")["mode"], "lines")
        self.assertEqual(parse("-D")["mode"], "lines")
        self.assertEqual(parse("--json", "-c", "3")["mode"], "json")
        self.assertEqual(parse("--plugin", "-c", "3")["mode"], "plugin")

    def test_families(self):
        self.assertEqual(parse("-6")["family"], socket.AF_INET6)
        self.assertEqual(parse("-s", "::1")["family"], socket.AF_INET6)
        self.assertEqual(parse("-s", "0:0::1")["source"], "::1")

    def test_tls(self):
        self.assertEqual((parse("--tls")["tls"], parse("--tls", "--insecure")["insecure"]),
                         (True, True))
        options = parse("--tls", "--cert-days", "30,7")
        self.assertEqual((options.checks.cert_warning_days, options.checks.cert_critical_days),
                         (30.0, 7.0))
        self.assertEqual(parse("--tls", "--cert-days", "14").checks.cert_critical_days, 0.0)

    def test_states(self):
        for text, state in [("ok", OK), ("warn", WARNING), ("warning", WARNING),
                            ("crit", CRITICAL), ("CRITICAL", CRITICAL)]:
            self.assertEqual(parse("--refused-state", text).checks.refused_state, state)

    def test_empty_state(self):
        self.assertEqual(parse().checks.empty_state, CRITICAL)
        self.assertEqual(parse("--empty-state", "warn").checks.empty_state, WARNING)
        self.assertEqual(parse("--empty-state", "ok").checks.empty_state, OK)

    def test_idle(self):
        self.assertEqual(parse("--idle", "2.5", "-t", "10")["idle"], 2.5)
        self.assertEqual(parse("--idle", "0")["idle"], 0.0)
        self.assertEqual(parse("--idle", "0", "-t", "0.5")["idle"], 0.0)
        # A short timeout leaves the banner half of it to end in silence.
        self.assertEqual(parse("-t", "1")["idle"], 0.5)
        self.assertEqual(parse("-t", "30")["idle"], 1.0)

    def test_send_escapes(self):
        self.assertEqual(escaped("HELO x\\r\\n\\t\\0\\\\\\x7f\\xFFé"),
                         b"HELO x\r\n\t\0\\\x7f\xff\xc3\xa9")
        self.assertEqual(escaped("plain"), b"plain")


class MistakeTests(SynchronousTestCase):
    """Each mistake: a UsageError whose one line names the option and the reason."""

    def assertMistake(self, args, message):
        with self.assertRaises(usage.UsageError) as caught:
            parse(*args)
        self.assertEqual(str(caught.exception), message)

    def test_values(self):
        for args, message in [
            (["-t", "soon"], "--timeout 'soon': not a number of seconds"),
            (["-t", "0"], "--timeout '0': not a positive number of seconds"),
            (["-t", "inf"], "--timeout 'inf': not a positive number of seconds"),
            (["-t", "nan"], "--timeout 'nan': not a positive number of seconds"),
            (["-i", "-1"], "--interval '-1': not a positive number of seconds"),
            (["-c", "-1"], "--count '-1': not 0 (until interrupted) or more"),
            (["-c", "many"], "--count 'many': not a whole number"),
            (["--max-bytes", "0"], "--max-bytes '0': not 1 or more"),
            (["-e", "(220"], "--expect '(220': not a valid regular expression: missing ), "
                             "unterminated subpattern at position 0"),
            (["--refused-state", "maybe"], "--refused-state 'maybe': not one of ok, warn, crit"),
            (["--empty-state", "fine"], "--empty-state 'fine': not one of ok, warn, crit"),
            (["--idle", "-1"], "--idle '-1': not 0 (off) or a positive number of seconds"),
            (["--idle", "inf"], "--idle 'inf': not 0 (off) or a positive number of seconds"),
            (["--idle", "soon"], "--idle 'soon': not a number of seconds"),
            (["--tls", "--cert-days", "7,30"],
             "--cert-days '7,30': days must be finite with WARN >= CRIT >= 0"),
            (["--tls", "--cert-days", "soon"], "--cert-days 'soon': not WARN[,CRIT] in days"),
            (["-s", "myhost"], "--source 'myhost': not an IPv4 or IPv6 address"),
            (["--send", "\\q"], "--send '\\\\q': unknown escape \\q; use \\r, \\n, \\t, \\0, "
                                "\\\\ or \\xNN"),
            (["--send", "\\x4"], "--send '\\\\x4': unknown escape \\x; use \\r, \\n, \\t, "
                                 "\\0, \\\\ or \\xNN"),
        ]:
            self.assertMistake(args, message)

    def test_conflicts(self):
        for args, message in [
            (["--json", "--plugin"], "--json and --plugin exclude each other"),
            (["-4", "-6"], "--ipv4 and --ipv6 exclude each other"),
            (["--ca", self.ca_file(), "--tls", "--insecure"],
             "--ca and --insecure exclude each other"),
            (["--insecure"], "--insecure needs --tls"),
            (["--cert-days", "30"], "--cert-days needs --tls"),
            (["-w", "2", "--critical", "1"], "--warning 2 is above --critical 1"),
            (["--idle", "5"], "--idle 5 is not below --timeout 5: no silence could end the "
                              "banner (--idle 0 waits for the close)"),
            (["--idle", "3", "-t", "2"], "--idle 3 is not below --timeout 2: no silence could "
                                         "end the banner (--idle 0 waits for the close)"),
            (["--plugin", "-c", "0"], "--plugin needs a --count of 1 or more: a check must end"),
            (["-6", "-s", "127.0.0.1"], "--source 127.0.0.1 is not an IPv6 address"),
            (["-4", "-s", "::1"], "--source ::1 is not an IPv4 address"),
        ]:
            self.assertMistake(args, message)

    def test_address_of_the_other_family(self):
        for args, message in [
            (["-4", "::1"], "-4: ::1 is an IPv6 address"),
            (["-4", "[::1]:25"], "-4: ::1 is an IPv6 address"),
            (["::1", "-4"], "-4: ::1 is an IPv6 address"),
            (["-6", "127.0.0.1", "25"], "-6: 127.0.0.1 is an IPv4 address"),
            (["-s", "127.0.0.1", "::1"], "--source 127.0.0.1 cannot reach ::1, an IPv6 address"),
            (["-s", "::1", "-H", "127.0.0.1"],
             "--source ::1 cannot reach 127.0.0.1, an IPv4 address"),
        ]:
            self.assertMistake(args, message)

    def test_a_name_is_not_judged_here(self):
        # Whether a name has an address of the family asked for is known
        # only once it is resolved: a probe's result, not a usage mistake.
        self.assertEqual(parse("-4", "ip6-only.example")["family"], socket.AF_INET)
        self.assertEqual(parse("-6", "-s", "::1", "mail.example")["family"], socket.AF_INET6)

    def test_unreadable_ca(self):
        self.assertMistake(["--tls", "--ca", "/no/such/ca.pem"],
                           "--ca '/no/such/ca.pem': cannot read: No such file or directory")
        path = self.ca_file(b"not a certificate\n")
        self.assertMistake(["--tls", "--ca", path], f"--ca {path!r}: no PEM certificate in it")
        path = self.ca_file(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        self.assertMistake(["--tls", "--ca", path],
                           f"--ca {path!r}: holds a certificate that cannot be parsed")

    def ca_file(self, data=None):
        if data is None:
            data = make_certificate(["localhost"]).certificate_pem
        return temporary_file(self, data, ".pem")


class FleetOptionTests(SynchronousTestCase):
    """Several targets, a targets file, and the options that go with them."""

    def test_several_targets(self):
        options = parse("a.example", "b.example:25", "[::1]:7", "unix:/run/g.sock", "-p", "2525")
        self.assertEqual([(t.host, t.port, t.unix) for t in options.targets],
                         [("a.example", 2525, None), ("b.example", 25, None), ("::1", 7, None),
                          ("unix:/run/g.sock", None, "/run/g.sock")])
        self.assertEqual((options["fleet"], options["mode"]), (True, "lines"))
        # Two arguments are still HOST PORT when the second is a port.
        options = parse("mail.example", "smtp")
        self.assertEqual((options["fleet"], options["port"]), (False, 25))
        self.assertEqual(len(parse("mail.example", "10.0.0.1").targets), 2)

    def test_each_target_is_checked(self):
        with self.assertRaises(usage.UsageError) as caught:
            parse("-4", "a.example", "::1")
        self.assertEqual(str(caught.exception), "-4: ::1 is an IPv6 address")

    def test_targets_file_lines(self):
        options = parse("--targets-file", temporary_file(self), "-p", "26")
        lines = ["# comment", "", "a.example", "b.example 25", "c.example:24  # trailing",
                 "unix:/run/a b.sock", "d.example nope", "e.example 1 2"]
        found = list(options.targets_in(iter(line + "\n" for line in lines), "F"))
        self.assertEqual([(t.host, t.port) if not isinstance(t, str) else t for t in found], [
            ("a.example", 26), ("b.example", 25), ("c.example", 24), ("unix:/run/a b.sock", None),
            "F line 7: bad port 'nope': not a number or a known TCP service name",
            "F line 8: too many arguments: e.example 1 2"])
        self.assertEqual((options.targets, options["fleet"]), ([], True))

    def test_new_checks(self):
        options = parse("--reject", "^5", "--reject", "^4", "-e", "^2", "--expect", "ESMTP",
                        "--expect-any")
        self.assertEqual(options.checks.reject, (re.compile("^5"), re.compile("^4")))
        self.assertEqual((options.checks.expect, options.checks.expect_any),
                         ((re.compile("^2"), re.compile("ESMTP")), True))

    def test_addresses_and_proxy(self):
        options = parse("--any-address", "--proxy-protocol", "v2", "--proxy-source",
                        "[2001:db8::7]:4242")
        self.assertEqual((options["all-addresses"], options["any-address"],
                          options["proxy-protocol"], options["proxy-source"]),
                         (True, True, "v2", ("2001:db8::7", 4242)))

    def test_mistakes(self):
        for args, message in [
            (["--proxy-protocol", "v3"], "--proxy-protocol 'v3': not v1, v2 or v2-local"),
            (["--proxy-protocol", "v1", "--proxy-source", "192.0.2.1"],
             "--proxy-source '192.0.2.1': not ADDR:PORT"),
            (["--proxy-protocol", "v1", "--proxy-source", "::1:4"],
             "--proxy-source '::1:4': not ADDR:PORT; write an IPv6 address as [ADDR]:PORT"),
            (["--proxy-protocol", "v2-local", "--proxy-source", "192.0.2.1:4"],
             "--proxy-source needs --proxy-protocol v1 or v2 (a LOCAL header names no client)"),
            (["--proxy-protocol", "v1", "unix:/run/g.sock"],
             "--proxy-protocol v1 does not apply to a UNIX socket (unix:/run/g.sock); "
             "v2-local does"),
            (["--expect-any"], "--expect-any needs --expect"),
            (["--reject", "("], "--reject '(': not a valid regular expression: missing ), "
                                "unterminated subpattern at position 0"),
        ]:
            with self.assertRaises(usage.UsageError) as caught:
                parse(*args)
            self.assertEqual(str(caught.exception), message, args)
