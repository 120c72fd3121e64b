"""
Greeting texts, files and the template language.
"""

import tempfile

from twisted.trial.unittest import SynchronousTestCase

from tcpgreet import greeting
from tcpgreet.greeting import Clock, Greeting, GreetingError

from .helpers import temporary_file


def values(**given):
    return given.__getitem__


class TemplateTests(SynchronousTestCase):
    def test_plain_text_is_rendered_once_to_bytes(self):
        g = greeting.from_text("Thank you for connecting")
        self.assertEqual(g.static, b"Thank you for connecting\r\n")
        self.assertEqual(g.fields, frozenset())
        self.assertIs(g.render(values()), g.static)

    def test_doubled_braces_are_literal(self):
        g = greeting.from_text("{{peer_host}} costs {{0}}")
        self.assertEqual(g.static, b"{peer_host} costs {0}\r\n")

    def test_placeholders_are_rendered_per_connection(self):
        g = greeting.from_text("hi {peer_host}:{peer_port} #{connection} on {hostname} at {time}")
        self.assertIsNone(g.static)
        self.assertEqual(g.fields, frozenset(greeting.PLACEHOLDERS))
        rendered = g.render(values(peer_host="::1", peer_port=4711, connection=3,
                                   hostname="box", time="2026-01-02T03:04:05Z"))
        self.assertEqual(rendered, b"hi ::1:4711 #3 on box at 2026-01-02T03:04:05Z\r\n")

    def test_only_the_used_values_are_asked_for(self):
        asked = []
        g = greeting.from_text("{peer_port}")
        g.render(lambda name: asked.append(name) or 1)
        self.assertEqual(asked, ["peer_port"])

    def test_unicode_is_sent_as_utf8(self):
        self.assertEqual(greeting.from_text("Grüß dich ☕").static,
                         "Grüß dich ☕\r\n".encode())

    def assertRefused(self, text, *fragments):
        with self.assertRaises(GreetingError) as caught:
            greeting.from_text(text)
        message = str(caught.exception)
        self.assertIn("--greeting", message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_unknown_name_is_refused_by_name(self):
        self.assertRefused("hello {user}", "unknown placeholder {user}", "{peer_host}")

    def test_attribute_access_is_refused(self):
        self.assertRefused("{peer_host.__class__}", "{peer_host.__class__}", "attribute")

    def test_index_access_is_refused(self):
        self.assertRefused("{x[0]}", "{x[0]}", "index")
        self.assertRefused("{peer_host[0]}", "{peer_host[0]}", "index")

    def test_format_spec_is_refused(self):
        self.assertRefused("{peer_port:>10}", "{peer_port:>10}", "format spec")

    def test_conversion_is_refused(self):
        self.assertRefused("{peer_host!r}", "{peer_host!r}", "conversion")

    def test_positional_placeholders_are_refused(self):
        self.assertRefused("{} and {0}", "empty placeholder {}")
        self.assertRefused("{0}", "unknown placeholder {0}")

    def test_unbalanced_braces_are_refused(self):
        self.assertRefused("oops }", "Single '}'", "{{")
        self.assertRefused("oops {", "{{")


class LineEndingTests(SynchronousTestCase):
    def test_every_line_ending_becomes_crlf(self):
        self.assertEqual(greeting.to_crlf("a\nb\r\nc\rd\n"), "a\r\nb\r\nc\r\nd\r\n")

    def test_a_final_line_ending_is_added(self):
        self.assertEqual(greeting.to_crlf("a\nb"), "a\r\nb\r\n")


class FileTests(SynchronousTestCase):
    def write(self, data: bytes) -> str:
        return temporary_file(self, data)

    def test_file_lines_are_sent_with_crlf(self):
        path = self.write(b"Welcome\nto {hostname}\n")
        g = greeting.from_file(path)
        self.assertEqual(g.origin, f"greeting file {path}")
        self.assertEqual(g.render(values(hostname="h")), b"Welcome\r\nto h\r\n")

    def test_byte_order_mark_is_dropped(self):
        path = self.write(b"\xef\xbb\xbfhello\n")
        self.assertEqual(greeting.from_file(path).static, b"hello\r\n")

    def test_missing_file_is_named(self):
        with self.assertRaises(GreetingError) as caught:
            greeting.from_file("/nonexistent/motd")
        self.assertEqual(str(caught.exception),
                         "greeting file /nonexistent/motd: No such file or directory")

    def test_directory_is_named(self):
        with self.assertRaises(GreetingError) as caught:
            greeting.from_file(tempfile.gettempdir())
        self.assertIn("Is a directory", str(caught.exception))

    def test_non_utf8_file_is_named_with_the_offset(self):
        path = self.write(b"caf\xe9\n")
        with self.assertRaises(GreetingError) as caught:
            greeting.from_file(path)
        self.assertEqual(str(caught.exception),
                         f"greeting file {path}: not UTF-8 (invalid byte 0xe9 at offset 3)")

    def test_bad_template_in_a_file_names_the_file(self):
        path = self.write(b"{peer_host.__class__}\n")
        with self.assertRaises(GreetingError) as caught:
            greeting.from_file(path)
        self.assertIn(f"greeting file {path}: placeholder {{peer_host.__class__}}",
                      str(caught.exception))


class ClockTests(SynchronousTestCase):
    def test_time_is_utc_iso8601_to_the_second_and_cached(self):
        now = [1767323045.9]
        clock = Clock(now=lambda: now[0])
        self.assertEqual(clock.utc_iso(), "2026-01-02T03:04:05Z")
        now[0] += 0.05
        self.assertEqual(clock.utc_iso(), "2026-01-02T03:04:05Z")
        now[0] += 1
        self.assertEqual(clock.utc_iso(), "2026-01-02T03:04:06Z")

    def test_repr_and_len(self):
        g = Greeting("abc\r\n")
        self.assertEqual(len(g), 5)
        self.assertIn("abc", repr(g))
