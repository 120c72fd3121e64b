"""
A real OpenSSH server on loopback, for the client's tests of a server that
greets and then waits: its banner ("SSH-2.0-OpenSSH_9.2p1 ...") is sent at
once, and then it waits for the client's.

L{start_sshd} makes a host key and a configuration of its own in a
temporary directory (never the system's), starts C{sshd -D -e} on a free
loopback port and returns once sshd says it listens; the test's cleanup
stops it.  The configuration lets nobody in.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .helpers import Program, require_tool, unused_port

CONFIG = """\
# The client's tests only read the banner: nobody may log in.
PidFile none
UsePAM no
DenyUsers *
PubkeyAuthentication no
PasswordAuthentication no
KbdInteractiveAuthentication no
"""
# sshd's privilege-separation directory; the package makes it at boot only.
PRIVSEP_DIRECTORY = "/run/sshd"
ATTEMPTS = 5


def start_sshd(testcase) -> Program:
    """
    A running sshd on 127.0.0.1 (its C{host} and C{port} set).  Skips (or,
    under TCPGREET_REQUIRE_SYSTEM_TOOLS=1, fails) without OpenSSH or root.
    """
    sshd = require_tool(testcase, "sshd")
    keygen = require_tool(testcase, "ssh-keygen")
    if os.geteuid() != 0:
        if os.environ.get("TCPGREET_REQUIRE_SYSTEM_TOOLS") == "1":
            testcase.fail("sshd must run as root (TCPGREET_REQUIRE_SYSTEM_TOOLS=1)")
        testcase.skipTest("sshd needs root to start")
    os.makedirs(PRIVSEP_DIRECTORY, mode=0o755, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="tcpgreet-sshd-"))
    testcase.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    key = directory / "host_ed25519"
    subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                   check=True, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    config = directory / "sshd_config"
    config.write_text(CONFIG)
    # sshd cannot listen on port 0 and say which port it got: take a free
    # one, and try another if some other process takes it first.
    for _ in range(ATTEMPTS):
        port = unused_port()
        program = Program([sshd, "-D", "-e", "-f", str(config), "-o", "ListenAddress=127.0.0.1",
                           "-o", f"Port={port}", "-o", f"HostKey={key}"])
        testcase.addCleanup(program.stop)
        match = program.wait_for(rf"Server listening on 127\.0\.0\.1 port {port}\.|"
                                 r"Address already in use|Cannot bind", timeout=15)
        if match.group(0).startswith("Server listening"):
            program.host, program.port = "127.0.0.1", port
            return program
        program.stop()
    raise AssertionError(f"sshd found no free port in {ATTEMPTS} attempts; its log:\n"
                         f"{program.log}")
