"""
deploy/kubernetes/: every manifest parses, kustomization.yaml names them
all, the objects refer to one another by names and labels that exist, the
container's arguments are ones C{twistd tcpgreet} accepts (parsed, then run
for real), and its ports and probe paths are those the image exposes and
tcpgreet serves.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import yaml
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

import tcpgreet
from tcpgreet import tap

from .container import containerfile
from .helpers import fetch, start_server
from .test_health import metrics_base, probe

KUBERNETES = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"


def manifests() -> dict[str, list[dict]]:
    """Every YAML file of deploy/kubernetes, by name: its documents."""
    return {path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
            for path in sorted(KUBERNETES.glob("*.yaml"))}


def objects() -> dict[str, dict]:
    """The Kubernetes objects of the manifests, by kind (one of each)."""
    found: dict[str, dict] = {}
    for name, documents in manifests().items():
        if name == "kustomization.yaml":
            continue
        for document in documents:
            key = document["kind"]
            if key == "Service" and document["metadata"]["name"].endswith("-metrics"):
                key = "MetricsService"
            assert key not in found, f"two {key} objects"
            found[key] = document
    return found


def container() -> dict:
    """The tcpgreet container of the Deployment."""
    [spec] = objects()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return spec


def container_ports() -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in container()["ports"]}


def greeting_mount() -> tuple[str, dict[str, str]]:
    """Where the Deployment mounts the greeting ConfigMap, and its files."""
    pod = objects()["Deployment"]["spec"]["template"]["spec"]
    [mount] = container()["volumeMounts"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    configmap = objects()["ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    return mount["mountPath"], configmap["data"]


def materialise_greeting(testcase) -> tuple[str, str]:
    """
    The ConfigMap's files in a directory of the test's own, as the kubelet
    would mount them; (the Deployment's mount path, that directory).
    """
    mount_path, files = greeting_mount()
    directory = tempfile.mkdtemp(prefix="tcpgreet-configmap-")
    testcase.addCleanup(shutil.rmtree, directory, ignore_errors=True)
    for name, text in files.items():
        Path(directory, name).write_text(text)
    return mount_path, directory


def on_loopback(argument: str) -> str:
    """A C{--listen}/C{--metrics} argument moved to a free loopback port."""
    return re.sub(r"^(--(?:listen|metrics)=tcp:)\d+$", r"\g<1>0:interface=127.0.0.1", argument)


def exposed() -> set[int]:
    return {int(port.split("/")[0]) for instruction, rest in containerfile()
            if instruction == "EXPOSE" for port in rest.split()}


class ManifestTests(SynchronousTestCase):
    def test_kustomization_names_every_manifest(self):
        files = manifests()
        [kustomization] = files.pop("kustomization.yaml")
        self.assertEqual(kustomization["kind"], "Kustomization")
        self.assertEqual(sorted(kustomization["resources"]), sorted(files))
        for name, documents in files.items():
            for document in documents:
                for field in ("apiVersion", "kind"):
                    self.assertIn(field, document, name)
                self.assertTrue(document["metadata"]["name"], name)

    def test_the_image_is_this_version(self):
        [kustomization] = manifests()["kustomization.yaml"]
        [rewrite] = kustomization["images"]
        self.assertEqual(rewrite["name"], container()["image"])
        self.assertEqual(rewrite["newTag"], tcpgreet.__version__)

    def test_the_pod_runs_confined(self):
        deployment = objects()["Deployment"]
        pod = deployment["spec"]["template"]["spec"]
        self.assertGreaterEqual(deployment["spec"]["replicas"], 2)
        self.assertTrue(pod["securityContext"]["runAsNonRoot"])
        security = container()["securityContext"]
        self.assertTrue(security["readOnlyRootFilesystem"])
        self.assertFalse(security["allowPrivilegeEscalation"])
        self.assertEqual(security["capabilities"]["drop"], ["ALL"])
        resources = container()["resources"]
        self.assertEqual(set(resources["requests"]), {"cpu", "memory"})
        self.assertIn("memory", resources["limits"])
        # runAsNonRoot needs the image's user to be a number, not root.
        [user] = [rest for instruction, rest in containerfile() if instruction == "USER"]
        self.assertNotEqual(int(user.split(":")[0]), 0)

    def test_the_image_entry_point_runs_the_arguments(self):
        # No "command": the arguments go to the image's twistd ... tcpgreet.
        self.assertNotIn("command", container())
        [entrypoint] = [json.loads(rest) for instruction, rest in containerfile()
                        if instruction == "ENTRYPOINT"]
        self.assertEqual(entrypoint[-1], "tcpgreet")
        self.assertIn("--pidfile=", entrypoint)

    def test_the_services_select_the_pods_by_their_ports(self):
        found = objects()
        pod_labels = found["Deployment"]["spec"]["template"]["metadata"]["labels"]
        self.assertEqual(found["Deployment"]["spec"]["selector"]["matchLabels"].items()
                         - pod_labels.items(), set())
        ports = container_ports()
        greet, metrics = found["Service"], found["MetricsService"]
        # Local: connections keep the client's address (the greeting, the
        # log and --max-per-ip need it).
        self.assertEqual(greet["spec"]["externalTrafficPolicy"], "Local")
        self.assertEqual(greet["spec"]["type"], "LoadBalancer")
        self.assertEqual([p["targetPort"] for p in greet["spec"]["ports"]], ["greet"])
        # Metrics stay inside the cluster.
        self.assertEqual(metrics["spec"]["type"], "ClusterIP")
        self.assertEqual([p["targetPort"] for p in metrics["spec"]["ports"]], ["metrics"])
        for service in (greet, metrics):
            self.assertEqual(service["spec"]["selector"].items() - pod_labels.items(), set())
            for port in service["spec"]["ports"]:
                self.assertIn(port["targetPort"], ports)
        budget = found["PodDisruptionBudget"]["spec"]
        self.assertEqual(budget["selector"]["matchLabels"].items() - pod_labels.items(), set())
        self.assertLess(budget["maxUnavailable"], found["Deployment"]["spec"]["replicas"])

    def test_the_servicemonitor_scrapes_the_metrics_service(self):
        found = objects()
        monitor, metrics = found["ServiceMonitor"]["spec"], found["MetricsService"]
        self.assertEqual(monitor["selector"]["matchLabels"].items()
                         - metrics["metadata"]["labels"].items(), set())
        self.assertNotEqual(monitor["selector"]["matchLabels"].items()
                            - found["Service"]["metadata"]["labels"].items(), set(),
                            "the ServiceMonitor must not select the public Service")
        [endpoint] = monitor["endpoints"]
        self.assertIn(endpoint["port"], [p["name"] for p in metrics["spec"]["ports"]])
        self.assertEqual(endpoint["path"], "/metrics")


class ArgumentTests(SynchronousTestCase):
    """The container's arguments, as tcpgreet's own option parser sees them."""

    def options(self) -> tap.Options:
        mount_path, directory = materialise_greeting(self)
        options = tap.Options()
        options.parseOptions([argument.replace(mount_path, directory)
                              for argument in container()["args"]])
        return options

    def test_they_parse_and_listen_where_the_pod_says(self):
        options = self.options()
        self.assertEqual(options.greeting.static, b"Thank you for connecting\r\n")
        reactor = MemoryReactorClock()
        top = tap.makeService(options, reactor=reactor)
        top.privilegedStartService()
        top.startService()
        self.addCleanup(top.stopService)
        [(greet, *_), (metrics, *_)] = reactor.tcpServers
        ports = container_ports()
        self.assertEqual((greet, metrics), (ports["greet"], ports["metrics"]))
        self.assertLessEqual(set(ports.values()), exposed())

    def test_the_grace_period_outlasts_the_pause_and_the_drain(self):
        pod = objects()["Deployment"]["spec"]["template"]["spec"]
        pause = container()["lifecycle"]["preStop"]["sleep"]["seconds"]
        self.assertGreater(pod["terminationGracePeriodSeconds"],
                           pause + self.options()["drain-timeout"])

    def test_the_probes_ask_the_metrics_port(self):
        spec = container()
        self.assertEqual(spec["readinessProbe"]["httpGet"], {"path": "/readyz", "port": "metrics"})
        self.assertEqual(spec["livenessProbe"]["httpGet"], {"path": "/healthz", "port": "metrics"})

    def test_they_run(self):
        # The same arguments, on loopback ports of the test's own.
        mount_path, directory = materialise_greeting(self)
        arguments = [on_loopback(argument.replace(mount_path, directory))
                     for argument in container()["args"]]
        server = start_server(self, *arguments)
        base = metrics_base(server)
        spec = container()
        self.assertEqual(probe(base + spec["readinessProbe"]["httpGet"]["path"]),
                         (200, "ready\n"))
        self.assertEqual(probe(base + spec["livenessProbe"]["httpGet"]["path"]), (200, "ok\n"))
        self.assertEqual(probe(f"{base}/metrics")[0], 200)
        self.assertEqual(fetch(server.host, server.port), b"Thank you for connecting\r\n")
