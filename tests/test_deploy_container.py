"""
deploy/Containerfile: what it declares, and the image it builds, run as
Kubernetes and OpenShift run it: read-only, as an arbitrary user, with the
Deployment's own arguments and greeting mount, then stopped with SIGTERM in
the middle of a greeting.  See tests/container.py for how the image is
built without a registry or a package index.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import tcpgreet
from tcpgreet import tap

from . import container
from .container import Podman, containerfile
from .helpers import Program
from .test_deploy_kubernetes import container as deployment_container
from .test_deploy_kubernetes import container_ports, greeting_mount
from .test_faults import MiB, greeting_file
from .test_health import probe

ROOT = Path(__file__).resolve().parent.parent
LABEL = "org.opencontainers.image."
# The container's own ports, as the image exposes them.
GREET, METRICS = 27679, 9127


def instruction(name: str) -> list[str]:
    return [rest for kind, rest in containerfile() if kind == name]


def exec_form(text: str) -> list[str]:
    """A JSON array (exec form: no shell runs it), or a failure."""
    words = json.loads(text)
    assert isinstance(words, list), text
    assert all(isinstance(word, str) for word in words), text
    return words


class ContainerfileTests(SynchronousTestCase):
    """What the Containerfile says, read without building it."""

    def test_labels_version_and_licence_of_this_checkout(self):
        self.assertIn(f"VERSION={tcpgreet.__version__}", instruction("ARG"))
        config = configparser.ConfigParser()
        config.read(ROOT / "setup.cfg")
        [labels] = instruction("LABEL")
        self.assertIn(f'{LABEL}licenses="{config["metadata"]["license"]}"', labels)
        for name in ("version", "source", "revision"):
            self.assertIn(f"{LABEL}{name}=", labels)

    def test_base_is_an_argument_defaulting_to_slim_python(self):
        self.assertRegex(instruction("ARG")[0], r"^BASE=python:3\.\d+-slim$")
        self.assertEqual(instruction("FROM"), ["${BASE} AS build", "${BASE}"])

    def test_nothing_needs_a_shell_at_run_time(self):
        [entrypoint] = instruction("ENTRYPOINT")
        [cmd] = instruction("CMD")
        [healthcheck] = instruction("HEALTHCHECK")
        entrypoint = exec_form(entrypoint)
        self.assertEqual(entrypoint[-1], "tcpgreet")
        # No pid file on a read-only file system, logs on standard output.
        self.assertIn("--pidfile=", entrypoint)
        self.assertIn("--logfile=-", entrypoint)
        probe_command = exec_form(healthcheck.split(" CMD ", 1)[1])
        self.assertEqual(Path(probe_command[0]).name, "tcpgreet-client")
        self.assertEqual(probe_command[-1], str(GREET))
        options = tap.Options()
        options.parseOptions(exec_form(cmd))
        self.assertEqual(options["metrics"], f"tcp:{METRICS}")

    def test_runs_as_a_user_not_root_and_exposes_both_ports(self):
        [user] = instruction("USER")
        self.assertNotEqual(int(user.split(":")[0]), 0)
        self.assertEqual(instruction("EXPOSE"), [f"{GREET} {METRICS}"])
        self.assertEqual(container_ports(), {"greet": GREET, "metrics": METRICS})


def readable_greeting(testcase, size: int) -> tuple[str, bytes]:
    """
    A directory holding a greeting.txt of about C{size} bytes that any user
    may read (the container's user is not this one); and its CRLF form.
    """
    path, expected = greeting_file(testcase, size)
    directory = tempfile.mkdtemp(prefix="tcpgreet-greeting-")
    testcase.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    target = Path(directory, "greeting.txt")
    shutil.copyfile(path, target)
    os.chmod(directory, 0o755)
    os.chmod(target, 0o644)
    return directory, expected


def uids(pid: int) -> list[int]:
    """The real, effective, saved and file-system user ids of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    return [int(uid) for uid in re.search(r"^Uid:\s+(.*)$", status, re.MULTILINE)[1].split()]


class ImageTests(SynchronousTestCase):
    """The image, built from this checkout and run with podman."""

    def setUp(self):
        self.podman = container.podman(self)
        self.image = container.image(self, self.podman)

    def test_labels_and_health_check(self):
        [inspected] = json.loads(self.podman("image", "inspect", self.image).stdout)
        labels = inspected["Labels"]
        self.assertEqual(labels[f"{LABEL}version"], tcpgreet.__version__)
        self.assertEqual(labels[f"{LABEL}licenses"], "MIT")
        for name, value in container.BUILD_ARGS.items():
            self.assertEqual(labels[f"{LABEL}{name.lower()}"], value)
        self.assertEqual(inspected["Healthcheck"]["Test"][0], "CMD")  # exec form
        self.assertEqual(inspected["Config"]["User"], "10001:0")
        self.assertEqual(set(inspected["Config"]["ExposedPorts"]),
                         {f"{GREET}/tcp", f"{METRICS}/tcp"})

    def test_a_rebuild_with_other_arguments_relabels(self):
        # The same build context, another revision: podman's layer cache
        # must not hand back the labels of the build before.
        revision = "fedcba9876543210"
        self.assertNotEqual(container.BUILD_ARGS["REVISION"], revision)
        rebuilt = container.image(self, self.podman, REVISION=revision)
        [inspected] = json.loads(self.podman("image", "inspect", rebuilt).stdout)
        self.assertEqual(inspected["Labels"][f"{LABEL}revision"], revision)
        self.assertEqual(inspected["Labels"][f"{LABEL}source"], container.BUILD_ARGS["SOURCE"])

    def run_container(self, *args: str, volume: str = "") -> tuple[Program, str]:
        name = f"tcpgreet-test-{uuid.uuid4().hex[:12]}"
        command = self.podman.command(
            "run", "--rm", "--name", name, "--read-only", "--read-only-tmpfs=false",
            "--user", "12345", *Podman.ulimits(),
            "-p", f"127.0.0.1::{GREET}", "-p", f"127.0.0.1::{METRICS}",
            *(["-v", volume] if volume else []), self.image, *args)
        program = Program(command)
        self.addCleanup(self.podman, "rm", "--force", "--ignore", name, check=False)
        self.addCleanup(program.stop)
        return program, name

    def published(self, name: str, port: int) -> int:
        address = self.podman("port", name, f"{port}/tcp").stdout.split()[0]
        return int(address.rsplit(":", 1)[1])

    def test_read_only_as_any_user_with_the_deployment_arguments(self):
        directory, expected = readable_greeting(self, MiB)
        mount_path, _ = greeting_mount()
        spec = deployment_container()
        program, name = self.run_container(*spec["args"],
                                           volume=f"{directory}:{mount_path}:ro")
        program.wait_for(r"listening on tcp:27679", timeout=60)
        program.wait_for(r"metrics at http://")
        greet, metrics = self.published(name, GREET), self.published(name, METRICS)
        base = f"http://127.0.0.1:{metrics}"
        ready, live = (spec[probe_name]["httpGet"]["path"]
                       for probe_name in ("readinessProbe", "livenessProbe"))
        self.assertEqual(probe(base + ready), (200, "ready\n"))
        self.assertEqual(probe(base + live), (200, "ok\n"))

        # The process: twistd itself as process 1, the user asked for.
        [inspected] = json.loads(self.podman("inspect", name).stdout)
        self.assertTrue(inspected["HostConfig"]["ReadonlyRootfs"])
        self.assertEqual(uids(inspected["State"]["Pid"]), [12345] * 4)

        # README's preStop for clusters without the sleep action runs the
        # environment's Python, which has no pip (README: "no pip in that
        # environment").
        python = "/opt/tcpgreet/bin/python3"
        self.podman("exec", name, python, "-c", "import time; time.sleep(0)")
        no_pip = self.podman("exec", name, python, "-c", "import pip", check=False)
        self.assertNotEqual(no_pip.returncode, 0, "pip is in the image's environment")
        self.assertIn("No module named 'pip'", no_pip.stderr)

        # A client that does not read holds its greeting in progress, so
        # SIGTERM finds a drain to do.
        with socket.create_connection(("127.0.0.1", greet), timeout=10) as slow:
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            first = slow.recv(1000)
            self.podman("kill", "--signal", "TERM", name)
            program.wait_for(r"draining 1 connection\(s\) for up to 10 s")
            self.assertEqual(probe(base + ready), (503, "not ready: stopping\n"))
            self.assertEqual(probe(base + live), (200, "ok\n"))
            received = first + b"".join(iter(lambda: slow.recv(MiB), b""))
        self.assertEqual(received, expected)
        # twistd re-raises SIGTERM after its clean stop, but process 1 of a
        # container does not die of a signal it does not handle: it exits 0.
        self.assertEqual(program.exit_status(30), 0)
        self.assertIn("drained 1 connection(s)", program.log)
        self.assertIn("Main loop terminated", program.log)
        self.assertNotIn("Traceback", program.log)
        # Nothing tried to write: no plugin cache to make, no pid file.
        self.assertNotIn("plugin cache", program.log)
        self.assertNotRegex(program.log, r"(?i)read-only file system|permission denied")

    def test_default_command_and_health_check(self):
        program, name = self.run_container()
        program.wait_for(r"listening on tcp:27679", timeout=60)
        program.wait_for(rf"metrics at http://0\.0\.0\.0:{METRICS}/metrics")
        greet = self.published(name, GREET)
        with socket.create_connection(("127.0.0.1", greet), timeout=10) as s:
            self.assertEqual(b"".join(iter(lambda: s.recv(4096), b"")),
                             b"Thank you for connecting\r\n")
        # The image's health check: the probe client, inside the container
        # (podman runs it on a timer only under systemd; here, when asked).
        self.podman("healthcheck", "run", name, timeout=30)
        [inspected] = json.loads(self.podman("inspect", name).stdout)
        self.assertEqual(inspected["State"]["Health"]["Status"], "healthy")
        program.wait_for(r"\b127\.0\.0\.1 port \d+: greeted, 26 bytes")
        self.podman("kill", "--signal", "TERM", name)
        self.assertEqual(program.exit_status(30), 0, shlex.join(program.args))
        self.assertNotIn("Traceback", program.log)
