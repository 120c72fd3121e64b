"""
The command line a worker process is started with: the supervisor's own
options, rewritten for one worker (L{worker_arguments}), followed by the
worker's role (L{WorkerRole}), which is no option of C{twistd tcpgreet}:
no user gives it, and C{--help} does not show it.

Nothing here imports Twisted: a worker process reads its role before
Twisted is imported (see L{tcpgreet.workers.__main__}).
"""

from __future__ import annotations

import os
from typing import NamedTuple

from twisted.python import usage

_ROLE = ("--worker", "--worker-control", "--worker-fds")


class WorkerRole(NamedTuple):
    """What makes a process one of the supervisor's workers."""

    number: int  # from 1; a restarted worker keeps its number
    control_fd: int  # its end of the control channel (tcpgreet.workers.control)
    listen_fds: tuple[int, ...]  # its listening sockets, one for each --listen


def role_arguments(role: WorkerRole) -> list[str]:
    """The arguments that give a worker its C{role}, after its options."""
    values = (str(role.number), str(role.control_fd), ",".join(map(str, role.listen_fds)))
    return [item for pair in zip(_ROLE, values, strict=True) for item in pair]


def split_arguments(arguments: list[str]) -> tuple[WorkerRole, list[str]]:
    """The role L{role_arguments} put at the end of C{arguments}, and the options before it."""
    options, role = arguments[:-6], arguments[-6:]
    if len(role) != 6 or tuple(role[0::2]) != _ROLE:
        raise SystemExit("tcpgreet.workers: started by tcpgreet --workers only, with "
                         + " N ".join(_ROLE) + " N last")
    number, control, fds = role[1::2]
    return WorkerRole(int(number), int(control),
                      tuple(int(fd) for fd in fds.split(",") if fd)), options


def per_worker(max_connections: int, workers: int) -> int:
    """Each worker's share of C{--max-connections}: the total never exceeds it."""
    return max(1, max_connections // workers)


def worker_arguments(options: usage.Options, descriptions: list[str]) -> list[str]:
    """
    The options every worker runs with, from the supervisor's parsed
    L{tcpgreet.tap.Options}: its own, with a --listen for each of
    C{descriptions} (what the supervisor listens on: the workers adopt its
    sockets, whatever options it bound them with), each worker's share of
    --max-connections, and neither --workers nor --metrics, which are the
    supervisor's.
    """
    arguments = [f"--listen={description}" for description in descriptions]
    if options["greeting-file"] is not None:
        # twistd may change directory after reading the options.
        arguments.append(f"--greeting-file={os.path.abspath(options['greeting-file'])}")
    elif options["greeting"] is not None:
        arguments.append(f"--greeting={options['greeting']}")
    if options["quiet"]:
        arguments.append("--quiet")
    rate = options["rate-per-ip"]
    arguments += [
        f"--max-connections={per_worker(options['max-connections'], options['workers'])}",
        f"--max-per-ip={options['max-per-ip']}",
        *([f"--rate-per-ip={rate[0]!r}/{rate[1]}"] if rate is not None else []),
        f"--timeout={options['timeout']!r}",
        f"--drain-timeout={options['drain-timeout']!r}",
        *(f"--trusted-proxy={network}" for network in options["trusted-proxy"]),
    ]
    return arguments
