"""
Which CPUs the server and the load generator run on.

On loopback both ends compete for the same CPUs, and a server that shares
its CPU with the load generator is measured partly by how the scheduler
interleaves them.  So, with two CPUs or more, the load generator gets one
CPU and the server another (as many as it has workers), and each figure
describes one side alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """CPU sets for each side; None means "not pinned"."""

    server: frozenset[int] | None
    load: frozenset[int] | None
    note: str

    def pin_server(self) -> None:
        """Pin the calling process (a server about to exec) to the server CPUs."""
        if self.server is not None:
            os.sched_setaffinity(0, self.server)

    def pin_load(self) -> None:
        """Pin the calling process to the load generator's CPUs."""
        if self.load is not None:
            os.sched_setaffinity(0, self.load)


def plan(server_processes: int | None = 1) -> Placement:
    """
    Place a server of C{server_processes} processes (None: as many as there
    are CPUs) and a load generator on the CPUs this process may use.
    """
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        return Placement(None, None, f"not pinned: CPU {usable[0]} is the only one usable")
    load, rest = usable[0], usable[1:]
    server = rest if server_processes is None else rest[:max(1, server_processes)]
    cpu_list = ", ".join(map(str, server))
    note = f"load generator on CPU {load}, servers on CPU {cpu_list}"
    if server_processes is not None and server_processes > len(rest):
        note += f" (fewer CPUs than the {server_processes} server processes)"
    return Placement(frozenset(server), frozenset({load}), note)
