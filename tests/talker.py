"""
A scripted TCP server in a process of its own, for the client's end-to-end
tests: the servers that greet and then wait (SSH, SMTP), that send a banner
in pieces, or that trickle bytes for ever.

    python talker.py STEP [STEP ...]

It listens on a free loopback port, says where in a line the tests' helpers
read ("listening on tcp (127.0.0.1:PORT)"), and plays the steps to each
connection in turn, one connection at a time, until it is stopped:

    send:TEXT        send TEXT (\\r, \\n and \\xNN decoded)
    pause:SECONDS    say nothing for that long
    trickle:TEXT:S   send TEXT one byte at a time, S seconds apart
    hold             wait until the client closes; log "client closed"

A connection ends when the steps do (the server closes), or as soon as the
client goes away.
"""

from __future__ import annotations

import codecs
import select
import socket
import sys


def decode(text: str) -> bytes:
    return codecs.decode(text, "unicode_escape").encode("latin-1")


def client_left(connection: socket.socket, seconds: float) -> bool:
    """Wait up to C{seconds}; whether the client closed (or reset) meanwhile."""
    readable, _, _ = select.select([connection], [], [], seconds)
    if not readable:
        return False
    try:
        return connection.recv(4096) == b""
    except OSError:
        return True


def play(connection: socket.socket, steps: list[str]) -> str:
    """Play C{steps} to one connection; how it ended."""
    for step in steps:
        kind, _, argument = step.partition(":")
        if kind == "send":
            connection.sendall(decode(argument))
        elif kind == "pause":
            if client_left(connection, float(argument)):
                return "client closed"
        elif kind == "trickle":
            text, _, interval = argument.rpartition(":")
            for byte in decode(text):
                connection.sendall(bytes([byte]))
                if client_left(connection, float(interval)):
                    return "client closed"
        elif kind == "hold":
            while not client_left(connection, 60):
                pass
            return "client closed"
        else:
            raise SystemExit(f"talker: unknown step {step!r}")
    return "server closed"


def main(steps: list[str]) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    host, port = listener.getsockname()
    print(f"listening on tcp ({host}:{port})", flush=True)
    number = 0
    while True:
        connection, _peer = listener.accept()
        number += 1
        with connection:
            try:
                ended = play(connection, steps)
            except OSError as e:
                ended = f"client gone ({e.strerror})"
        print(f"connection {number}: {ended}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
