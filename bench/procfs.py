"""
CPU time of a process and all its descendants, from /proc (Linux only).

A server may fork workers, and a worker may die and be replaced during a
measurement, so "the server's CPU time" is summed over the whole process
tree: utime + stime of every live member, plus cutime + cstime, which hold
the time of members that have already exited and been reaped.  Each second
of CPU is then counted exactly once, whether its process is alive or not.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PROC = Path("/proc")
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
# Kernels built without CONFIG_PROC_CHILDREN have no task/*/children files;
# there the tree is found by reading every process's parent instead.
HAS_CHILDREN_FILES = (PROC / "self" / "task" / str(os.getpid()) / "children").exists()


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name, or None if gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name, in parentheses, may itself hold spaces and ')'.
    return text[text.rindex(")") + 2:].split()


def _children_from_task_files(pid: int) -> list[int]:
    """The children the kernel lists for each thread of C{pid}."""
    children: list[int] = []
    try:
        tasks = list((PROC / str(pid) / "task").iterdir())
    except FileNotFoundError:
        return children  # the process ended meanwhile
    for task in tasks:
        with contextlib.suppress(FileNotFoundError):  # the thread ended meanwhile
            children.extend(int(child) for child in (task / "children").read_text().split())
    return children


def _children_by_scanning() -> dict[int, list[int]]:
    """Every process's children, from the parent pid in each /proc/PID/stat."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def process_tree(root: int) -> list[int]:
    """C{root} and every descendant still in /proc (zombies included)."""
    scanned = None if HAS_CHILDREN_FILES else _children_by_scanning()
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        if scanned is None:
            pending.extend(_children_from_task_files(pid))
        else:
            pending.extend(scanned.get(pid, ()))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds used so far by C{root} and its descendants."""
    ticks = 0
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is not None:
            # stat fields 14-17 (utime, stime, cutime, cstime), counted from
            # field 3 here, the first after the command name.
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / TICKS_PER_SECOND
