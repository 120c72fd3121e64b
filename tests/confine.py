"""
Part of what deploy/tcpgreet.service does to tcpgreet, done to a test's
child process just before it execs: the unit's restrictions, with the
kernel's own switches, so tests can show that tcpgreet runs under them
without a systemd to start it.

These are meant for C{preexec_fn}: they run in the child between fork and
exec, and what they set survives the exec.
"""

from __future__ import annotations

import ctypes
import errno
import os

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, argument: int, what: str) -> None:
    if _libc.prctl(option, argument, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({what})")


def drop_capabilities(capabilities) -> None:
    """
    Remove C{capabilities} from the bounding set.  A root process keeps
    them until it execs; what it execs (twistd) never has them, as under
    C{CapabilityBoundingSet=}.  Other users have none to drop.
    """
    if os.geteuid() != 0:
        return
    for capability in capabilities:
        _prctl(PR_CAPBSET_DROP, capability, "PR_CAPBSET_DROP")


def all_capabilities() -> range:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return range(int(f.read()) + 1)


def respect_file_permissions() -> None:
    """Make even root subject to file permissions, as the unit's service is."""
    drop_capabilities((CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH))


def without_privileges() -> None:
    """C{NoNewPrivileges=yes} and C{CapabilityBoundingSet=} (empty)."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")
    drop_capabilities(all_capabilities())


def like_the_unit() -> None:
    """
    L{without_privileges} and, where the kernel has the switch (Linux 6.3
    and later), C{MemoryDenyWriteExecute=yes}.
    """
    without_privileges()
    refused = _libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0
    # EINVAL: a kernel without the switch, which is left alone.
    if refused and ctypes.get_errno() != errno.EINVAL:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")
