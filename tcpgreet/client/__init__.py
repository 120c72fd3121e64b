"""
The probe client: connect, read what the server says, judge it, report it.

    python -m tcpgreet.client [options] [HOST [PORT] | unix:PATH]
    tcpgreet-client [options] [HOST [PORT] | TARGET... | --targets-file FILE]

This module is the command: options in, a probe run, an exit status out.
The probe itself (a L{ClientFactory} on the reactor) is in
L{tcpgreet.client.probe}, the command line in L{tcpgreet.client.options},
the meaning of a result in L{tcpgreet.client.outcome}, its forms in
L{tcpgreet.client.report}, TLS in L{tcpgreet.client.tls}, many targets at
once in L{tcpgreet.client.fleet}, the PROXY header in
L{tcpgreet.client.proxyheader}; the last three are imported only when used.

Exit status follows the monitoring-plugin convention: 0 OK, 1 WARNING,
2 CRITICAL, 3 UNKNOWN.
"""

from __future__ import annotations

import errno
import socket
import sys
from typing import TYPE_CHECKING, BinaryIO

from twisted.internet import task
from twisted.python import usage

from tcpgreet.client.options import BANNER, JSON, LINES, ClientOptions, Target
from tcpgreet.client.outcome import UNKNOWN
from tcpgreet.client.probe import ProbeRun, ProbeSettings
from tcpgreet.client.report import (
    BannerReport,
    JsonReport,
    LinesReport,
    PluginReport,
    Report,
    discard_the_rest,
)

if TYPE_CHECKING:
    from tcpgreet.client.probe import IProbeReactor


def settings_from(options: ClientOptions, target: Target | None = None) -> ProbeSettings:
    """
    The L{ProbeSettings} parsed options ask for, for C{target} (by default
    the one target of the command line).  Raises C{ValueError} for a host
    name TLS cannot use.
    """
    host, port = (options["host"], options["port"]) if target is None else (target.host,
                                                                            target.port)
    family = options["family"] if target is None else target.family
    unix = options["unix"] if target is None else target.unix
    if options["tls"]:
        from tcpgreet.client.tls import TLSClient  # OpenSSL only for the probes that speak TLS
    tls = TLSClient(host, options["ca"], options["insecure"]) if options["tls"] else None
    return ProbeSettings(
        host=host, port=port, timeout=options["timeout"],
        max_bytes=options["max-bytes"], first_line=options["first-line"],
        send=options["send"], family=family, source=options["source"], tls=tls,
        idle=options["idle"] or None, unix=unix, proxy=options["proxy-protocol"],
        proxy_source=options["proxy-source"], all_addresses=options["all-addresses"],
        best_address=options["any-address"])


def source_problem(source: str) -> str | None:
    """
    Why C{--source} cannot be bound, or C{None}.  Checked once, before any
    probe: an address that is not this machine's is a mistake on the
    command line (UNKNOWN), not a failure of the server (CRITICAL), which
    is what a bind refused at connect time would look like.
    """
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as trial:
        try:
            trial.bind((source, 0))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                return "not an address of this machine"
            reason = e.strerror or str(e)
            return f"cannot bind to it: {reason[:1].lower()}{reason[1:]}"
    return None


def report_for(options: ClientOptions, out: BinaryIO, err: BinaryIO) -> Report:
    """The report form parsed options ask for."""
    style = {"raw": options["raw"], "timestamps": options["timestamp"]}
    mode = options["mode"]
    if mode == BANNER:
        return BannerReport(out, err, addresses=options["all-addresses"], **style)
    if mode == LINES:
        # A fleet probed once each is a line a target; a summary follows
        # each target's probes when there are several.
        summaries = not options["fleet"] or options["count"] != 1
        return LinesReport(out, err, summaries=summaries, **style)
    if mode == JSON:
        return JsonReport(out, err, **style)
    return PluginReport(out, err, checks=options.checks, timeout=options["timeout"], **style)


async def run(reactor: IProbeReactor, options: ClientOptions, out: BinaryIO | None = None,
              err: BinaryIO | None = None) -> int:
    """Probe as C{options} say; the exit status."""
    err = err if err is not None else sys.stderr.buffer
    if options["source"] is not None:
        problem = source_problem(options["source"])
        if problem is not None:
            err.write(f"tcpgreet-client: --source {options['source']}: {problem}\n".encode())
            return UNKNOWN
    if options["fleet"]:
        from tcpgreet.client.fleet import run_fleet  # only when there are several targets

        return await run_fleet(reactor, options, report_for(
            options, out if out is not None else sys.stdout.buffer, err), settings_from)
    try:
        settings = settings_from(options)
    except ValueError as e:  # a host name TLS cannot use, as "bad_name"
        err.write(f"tcpgreet-client: {options['host']}: cannot use TLS: {e}\n".encode())
        return UNKNOWN
    report = report_for(options, out if out is not None else sys.stdout.buffer, err)
    probes = ProbeRun(reactor, settings, options.checks, report,
                      options["count"], options["interval"])
    # Ctrl-C and SIGTERM stop the reactor; its shutdown waits for the summary.
    reactor.addSystemEventTrigger("before", "shutdown", probes.interrupt)
    return await probes.run()


def main(argv: list[str] | None = None) -> None:
    options = ClientOptions()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        print(f"tcpgreet-client: {e} (see --help)", file=sys.stderr)
        sys.exit(UNKNOWN)
    except BrokenPipeError:  # --help | head
        discard_the_rest(sys.stdout)
        sys.exit(0)
    task.react(_react, [options])


async def _react(reactor: IProbeReactor, options: ClientOptions) -> None:
    # task.react exits with the code of a SystemExit raised from main.
    raise SystemExit(await run(reactor, options))
