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
import platform
import struct

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_MDWE = 65
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
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


# The socket(2) system call, by the architecture seccomp names
# (<linux/audit.h>, the kernel's system call tables).
_SOCKET_CALL = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
# struct seccomp_data: nr, arch, instruction_pointer, args[6]
_NR, _ARCH, _FIRST_ARGUMENT = 0, 4, 16


def can_deny_ipv6() -> bool:
    """Whether L{without_ipv6} knows this machine's system calls."""
    return platform.machine() in _SOCKET_CALL


def without_ipv6() -> None:
    """
    C{RestrictAddressFamilies=~AF_INET6}, as systemd does it: a seccomp
    filter that fails every C{socket(AF_INET6, ...)} with EAFNOSUPPORT,
    which is also what a kernel without IPv6 answers.  (Sets
    C{NoNewPrivileges=yes}, which a filter needs.)
    """
    arch, socket_call = _SOCKET_CALL[platform.machine()]
    load, jump_if_equal, give = 0x20, 0x15, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_RET|K
    program = [
        (load, 0, 0, _ARCH),
        (jump_if_equal, 0, 5, arch),  # another architecture: allowed
        (load, 0, 0, _NR),
        (jump_if_equal, 0, 3, socket_call),
        (load, 0, 0, _FIRST_ARGUMENT),  # the family; little-endian: its low half
        (jump_if_equal, 0, 1, 10),  # AF_INET6
        (give, 0, 0, _SECCOMP_RET_ERRNO | errno.EAFNOSUPPORT),
        (give, 0, 0, _SECCOMP_RET_ALLOW),
    ]
    code = b"".join(struct.pack("=HBBI", *instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = ctypes.create_string_buffer(
        struct.pack("@HP", len(program), ctypes.addressof(buffer)))
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "PR_SET_NO_NEW_PRIVS")
    if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.c_void_p(ctypes.addressof(fprog)),
                   0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")
