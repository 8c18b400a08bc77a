"""The docker, systemd and kubernetes actuators against their real client libraries, with only
the outermost external call faked: a fake Docker Engine API and a fake Kubernetes API server
(HTTP on 127.0.0.1, just the endpoints the clients call), and a fake `systemctl` executable.
Each test checks what the platform was asked to do, and ends with no server or client left."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from autoscaler.actuators import make_actuator
from autoscaler.actuators.systemd import SystemdActuator
from tideserve.cli import build_parser

# -- a JSON HTTP server whose routes are one function ------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def _handle(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n)) if n else None
        url = urlsplit(self.path)
        status, reply = self.server.app(
            self.command, url.path, parse_qs(url.query), body, self.headers
        )
        data = b"" if reply is None else json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_DELETE = _handle

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def http_app(app):
    """Serves `app(method, path, query, body, headers) -> (status, json)`; yields host:port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.app = app
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        assert not thread.is_alive()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_cli(argv: list[str]):
    """The worker command as the real `tideserve` CLI parses it."""
    return build_parser().parse_args(argv)


def test_unknown_actuator_names_the_choices():
    with pytest.raises(ValueError, match="local, docker, systemd, kubernetes"):
        make_actuator("nope")


# -- docker ------------------------------------------------------------------------------------


class FakeDockerd:
    """The Engine API endpoints the SDK calls: version, image and network inspect, container
    list/create/inspect/start/stop/remove. Records every call as (method, path, query)."""

    def __init__(self, images=("tideserve:test",), networks=("tp_default",)) -> None:
        self.images = set(images)
        self.networks = set(networks)
        self.containers: dict[str, dict] = {}  # id -> {"name", "body" (the create body), "state"}
        self.calls: list[tuple[str, str, dict]] = []

    def add(self, name: str, labels: dict) -> None:
        """A container that is already there (say, a replica `docker compose up` made)."""
        self.containers[f"c{len(self.containers):063d}"] = {
            "name": name,
            "body": {"Image": "tideserve:test", "Labels": labels},
            "state": "running",
        }

    def find(self, ref: str) -> tuple[str, dict] | None:
        for cid, c in self.containers.items():
            if ref in (cid, c["name"]):
                return cid, c
        return None

    def inspect(self, cid: str) -> dict:
        c = self.containers[cid]
        return {
            "Id": cid,
            "Name": "/" + c["name"],
            "Config": {k: v for k, v in c["body"].items() if k != "HostConfig"},
            "HostConfig": c["body"].get("HostConfig", {}),
            "State": {"Status": c["state"]},
        }

    def __call__(self, method, path, query, body, headers):
        path = re.sub(r"^/v[\d.]+", "", path)
        self.calls.append((method, path, query))
        if path == "/version":
            return 200, {"ApiVersion": "1.44", "MinAPIVersion": "1.24", "Version": "fake"}
        if m := re.fullmatch(r"/images/(.+)/json", path):
            if m[1] not in self.images:
                return 404, {"message": f"No such image: {m[1]}"}
            return 200, {"Id": "sha256:" + "0" * 64, "RepoTags": [m[1]]}
        if m := re.fullmatch(r"/networks/([^/]+)", path):
            if m[1] not in self.networks:
                return 404, {"message": f"network {m[1]} not found"}
            return 200, {"Name": m[1], "Id": "n" * 64, "Driver": "bridge"}
        if path == "/containers/json":
            want = dict(w.split("=", 1) for w in json.loads(query["filters"][0])["label"])
            return 200, [
                {"Id": cid, "Names": ["/" + c["name"]], "Labels": c["body"]["Labels"]}
                for cid, c in self.containers.items()
                if want.items() <= c["body"]["Labels"].items()
            ]
        if path == "/containers/create":
            name = query["name"][0]
            if self.find(name):
                return 409, {"message": f'Conflict. The container name "/{name}" is in use'}
            if body["Image"] not in self.images:
                return 404, {"message": f"No such image: {body['Image']}"}
            cid = f"c{len(self.containers):063d}"
            self.containers[cid] = {"name": name, "body": body, "state": "created"}
            return 201, {"Id": cid, "Warnings": []}
        if m := re.fullmatch(r"/containers/([^/]+)(/json|/start|/stop)?", path):
            found = self.find(m[1])
            if found is None:
                return 404, {"message": f"No such container: {m[1]}"}
            cid, c = found
            if m[2] == "/json":
                return 200, self.inspect(cid)
            if m[2] == "/start":
                c["state"] = "running"
            elif m[2] == "/stop":
                c["state"] = "exited"
            elif method == "DELETE":
                del self.containers[cid]
            return 204, None
        return 404, {"message": f"page not found: {method} {path}"}


@pytest.fixture
def dockerd():
    pytest.importorskip("docker")
    fake = FakeDockerd()
    with http_app(fake) as addr:
        yield fake, f"tcp://{addr}"


def _docker_actuator(base_url: str, **options):
    from autoscaler.actuators.docker import DockerActuator

    defaults = dict(
        project="tp",
        image="tideserve:test",
        router_address="tcp://tp-router-1:7100",
        worker_args="--model /models/m --threads 2",
        base_url=base_url,
        environment="TIDESERVE_CURVE_KEYS=/keys",
        volumes="models:/models:ro",
    )
    return DockerActuator(**(defaults | options))


def test_docker_start_runs_a_compose_replica_that_names_itself(dockerd):
    fake, base_url = dockerd
    fake.add(
        "tp-decode-1",  # the replica `docker compose up` made
        {
            "com.docker.compose.project": "tp",
            "com.docker.compose.service": "decode",
            "com.docker.compose.container-number": "1",
        },
    )
    act = _docker_actuator(base_url)
    try:
        assert act.start("decode") == "tp-decode-2"
        assert act.start("prefill") == "tp-prefill-1"
        assert act.start("colocated") == "tp-colocated-1"
    finally:
        act.close()

    made = {c["name"]: c for c in fake.containers.values()}
    assert {n: c["state"] for n, c in made.items()} == {
        "tp-decode-1": "running",
        "tp-decode-2": "running",
        "tp-prefill-1": "running",
        "tp-colocated-1": "running",
    }
    body = made["tp-decode-2"]["body"]
    assert body["Image"] == "tideserve:test"
    assert body["Labels"] == {
        "com.docker.compose.project": "tp",
        "com.docker.compose.service": "decode",
        "com.docker.compose.container-number": "2",
        "com.docker.compose.oneoff": "False",
    }
    assert body["HostConfig"]["NetworkMode"] == "tp_default"
    assert body["HostConfig"]["RestartPolicy"]["Name"] == "on-failure"
    assert body["HostConfig"]["Binds"] == ["models:/models:ro"]
    assert body["Hostname"] == "tp-decode-2"
    assert body["StopSignal"] == "SIGTERM"
    assert body["Env"] == ["TIDESERVE_CURVE_KEYS=/keys"]
    assert body["Entrypoint"] == ["tideserve"]
    args = worker_cli(body["Cmd"])
    assert (args.command, args.role) == ("decode", "decode")
    assert args.worker_id == args.host == "tp-decode-2"
    assert args.router_address == "tcp://tp-router-1:7100"
    assert (args.model, args.num_threads) == ("/models/m", 2)
    colocated = worker_cli(made["tp-colocated-1"]["body"]["Cmd"])
    assert (colocated.command, colocated.role) == ("decode", "colocated")
    assert worker_cli(made["tp-prefill-1"]["body"]["Cmd"]).command == "prefill"


def test_docker_stop_sends_sigterm_with_the_timeout_then_removes(dockerd, caplog):
    fake, base_url = dockerd
    fake.add("other-decode-1", {"com.docker.compose.project": "other"})
    act = _docker_actuator(base_url, stop_timeout_s=75)
    try:
        wid = act.start("decode")
        cid, _ = fake.find(wid)
        fake.calls.clear()
        act.stop(wid, "decode")
        writes = [(m, p, q.get("t")) for m, p, q in fake.calls if m != "GET"]
        assert writes == [
            ("POST", f"/containers/{cid}/stop", ["75"]),  # SIGTERM, SIGKILL after 75 s
            ("DELETE", f"/containers/{cid}", None),
        ]
        assert fake.find(wid) is None
        with caplog.at_level(logging.WARNING):
            act.stop(wid, "decode")  # gone already
            act.stop("other-decode-1", "decode")  # not this project's: left alone
        assert "no such container" in caplog.text
        assert "not a container of project tp" in caplog.text
        assert fake.find("other-decode-1")[1]["state"] == "running"
    finally:
        act.close()


def test_docker_errors_say_what_to_fix(dockerd, tmp_path):
    fake, base_url = dockerd
    with pytest.raises(
        RuntimeError, match="cannot reach the Docker daemon at unix://.*DOCKER_HOST"
    ):
        _docker_actuator(f"unix://{tmp_path}/docker.sock")
    with pytest.raises(ValueError, match="No such image: missing:1; build or pull it"):
        _docker_actuator(base_url, image="missing:1")
    with pytest.raises(ValueError, match="network 'elsewhere' does not exist.*docker compose up"):
        _docker_actuator(base_url, network="elsewhere")
    act = _docker_actuator(base_url)
    try:
        fake.images.clear()  # deleted after the autoscaler started
        with pytest.raises(ValueError, match="create container tp-decode-1: No such image"):
            act.start("decode")
        with pytest.raises(ValueError, match="unknown role 'router'"):
            act.start("router")
    finally:
        act.close()
    assert fake.containers == {}


# -- systemd -----------------------------------------------------------------------------------

FAKE_SYSTEMCTL = """#!/bin/sh
here=$(dirname "$0")
printf '%s\\n' "$*" >> "$here/calls"
case "$*" in
  *list-units*) cat "$here/units" 2>/dev/null; exit 0 ;;
esac
if [ -f "$here/fail" ]; then cat "$here/fail" >&2; exit 1; fi
exit 0
"""


@pytest.fixture
def systemctl(tmp_path):
    """A fake systemctl: appends its argv to calls; list-units prints the file units."""
    exe = tmp_path / "systemctl"
    exe.write_text(FAKE_SYSTEMCTL)
    exe.chmod(0o755)
    return exe


def _calls(systemctl) -> list[str]:
    path = systemctl.parent / "calls"
    lines = path.read_text().splitlines() if path.exists() else []
    path.unlink(missing_ok=True)
    return [x for x in lines if "list-units" not in x]


def test_systemd_start_takes_the_lowest_free_instance(systemctl):
    (systemctl.parent / "units").write_text(
        "tideserve-decode@1.service loaded active running tideserve decode worker 1\n"
        "● tideserve-decode@3.service loaded failed failed tideserve decode worker 3\n"
    )
    act = SystemdActuator(systemctl=str(systemctl), timeout_s=10)
    assert act.start("decode") == "decode-0"
    assert act.start("decode") == "decode-2"  # 1 is systemd's, 0 this actuator's
    assert act.start("decode") == "decode-3"  # failed: free again
    assert act.start("prefill") == "prefill-0"
    assert act.start("colocated") == "colocated-0"
    assert _calls(systemctl) == [
        "--no-ask-password start tideserve-decode@0.service",
        "--no-ask-password start tideserve-decode@2.service",
        "--no-ask-password start tideserve-decode@3.service",
        "--no-ask-password start tideserve-prefill@0.service",
        "--no-ask-password start tideserve-colocated@0.service",
    ]
    act.stop("decode-2", "decode")
    assert _calls(systemctl) == ["--no-ask-password stop tideserve-decode@2.service"]
    assert act.start("decode") == "decode-2"
    act.stop("decode-a7", "decode")  # not a unit's worker: nothing to stop
    act.close()
    assert _calls(systemctl) == ["--no-ask-password start tideserve-decode@2.service"]


def test_systemd_user_units_and_prefix(systemctl):
    act = SystemdActuator(unit_prefix="ts", systemctl=str(systemctl), user=True, timeout_s=10)
    assert act.start("prefill") == "prefill-0"
    act.stop("prefill-0", "prefill")
    assert _calls(systemctl) == [
        "--user --no-ask-password start ts-prefill@0.service",
        "--user --no-ask-password stop ts-prefill@0.service",
    ]


def test_systemd_errors_carry_systemctl_stderr(systemctl, tmp_path):
    act = SystemdActuator(systemctl=str(systemctl), max_instances=1, timeout_s=10)
    (systemctl.parent / "fail").write_text(
        "Failed to start tideserve-decode@0.service: Unit tideserve-decode@.service not found.\n"
    )
    why = r"start tideserve-decode@0.service failed \(exit 1\): Failed to start .*not found"
    with pytest.raises(RuntimeError, match=why):
        act.start("decode")
    (systemctl.parent / "fail").unlink()
    assert act.start("decode") == "decode-0"
    with pytest.raises(RuntimeError, match="all 1 instances .* raise max_instances"):
        act.start("decode")
    with pytest.raises(ValueError, match="unknown role 'router'"):
        act.start("router")
    missing = SystemdActuator(systemctl=str(tmp_path / "nowhere" / "systemctl"))
    with pytest.raises(RuntimeError, match="not found; .* pass systemctl="):
        missing.start("decode")
    with pytest.raises(ValueError, match="max_instances"):
        SystemdActuator(max_instances=0)


UNITS = Path(__file__).resolve().parents[2] / "compose" / "systemd"


def _exec_start(unit: str, instance: str) -> list[str]:
    """The unit's ExecStart as systemd runs it: %i and $VARS of the example env file filled."""
    env = dict(
        line.split("=", 1)
        for line in (UNITS / "tideserve.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    text = (UNITS / unit).read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", text, re.M)[1].replace("%i", instance)
    words = []
    for word in exec_start.split()[1:]:  # the CLI's arguments
        words += env[word[1:]].split() if word.startswith("$") else [word]
    return words


@pytest.mark.parametrize("role", ["prefill", "decode", "colocated"])
def test_systemd_example_units_give_the_worker_the_id_the_actuator_returns(role, systemctl):
    unit = f"tideserve-{role}@.service"
    text = (UNITS / unit).read_text()
    args = worker_cli(_exec_start(unit, "3"))
    assert (args.command, getattr(args, "role", "prefill")) == (
        "prefill" if role == "prefill" else "decode",
        role,
    )
    assert args.router_address == "tcp://127.0.0.1:7100"
    assert "KillSignal=SIGTERM" in text and "Restart=on-failure" in text
    assert "EnvironmentFile=/etc/tideserve/tideserve.env" in text
    stop_s = int(re.search(r"^TimeoutStopSec=(\d+)$", text, re.M)[1])
    assert stop_s > args.drain_timeout  # systemd's SIGKILL comes after the drain
    act = SystemdActuator(systemctl=str(systemctl), max_instances=4, timeout_s=10)
    (systemctl.parent / "units").write_text(
        "".join(f"tideserve-{role}@{n}.service loaded active running x\n" for n in range(3))
    )
    assert act.start(role) == args.worker_id == f"{role}-3"


def test_systemd_example_router_and_autoscaler_units_parse():
    assert worker_cli(_exec_start("tideserve-router.service", "")).command == "router"
    args = worker_cli(_exec_start("tideserve-autoscaler.service", ""))
    assert (args.command, args.actuator) == ("autoscaler", "systemd")


# -- kubernetes --------------------------------------------------------------------------------


class FakeKubeApi:
    """The API server's scale subresource of Deployments and PATCH of pods. `interference`
    makes the next N scale PATCHes find the count changed by someone else since the read."""

    def __init__(self, replicas: dict[str, int], pods=()) -> None:
        self.replicas = dict(replicas)
        self.version = 1  # resourceVersion of every Deployment, bumped on each write
        self.pods = {p: {} for p in pods}  # name -> annotations
        self.interference = 0
        self.calls: list[tuple[str, str, str, dict | None]] = []

    def scale(self, ns: str, name: str) -> dict:
        n = self.replicas[name]
        return {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {"name": name, "namespace": ns, "resourceVersion": str(self.version)},
            "spec": {"replicas": n},
            "status": {"replicas": n},
        }

    def __call__(self, method, path, query, body, headers):
        self.calls.append((method, path, headers.get("Content-Type", ""), body))
        if m := re.fullmatch(r"/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)/scale", path):
            ns, name = m.groups()
            if name not in self.replicas:
                return 404, _status(404, "NotFound", f'deployments.apps "{name}" not found')
            if method == "PATCH":
                if self.interference:
                    self.interference -= 1
                    self.replicas[name] += 2
                    self.version += 1
                if body.get("metadata", {}).get("resourceVersion", str(self.version)) != str(
                    self.version
                ):
                    return 409, _status(409, "Conflict", "the object has been modified")
                self.replicas[name] = body["spec"]["replicas"]
                self.version += 1
            return 200, self.scale(ns, name)
        if m := re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)", path):
            ns, name = m.groups()
            if method != "PATCH" or name not in self.pods:
                return 404, _status(404, "NotFound", f'pods "{name}" not found')
            self.pods[name].update(body["metadata"]["annotations"])
            meta = {"name": name, "namespace": ns, "annotations": self.pods[name]}
            return 200, {"apiVersion": "v1", "kind": "Pod", "metadata": meta}
        return 404, _status(404, "NotFound", "the server could not find the requested resource")


def _status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


@contextlib.contextmanager
def kube_actuator(host: str, **options):
    pytest.importorskip("kubernetes")
    from kubernetes import client as k8s

    from autoscaler.actuators.kubernetes import KubernetesActuator

    api = k8s.ApiClient(k8s.Configuration(host=host))
    act = KubernetesActuator(namespace="serving", api_client=api, timeout_s=5, **options)
    try:
        yield act
    finally:
        act.close()
        api.close()


@pytest.fixture
def kube():
    pytest.importorskip("kubernetes")
    fake = FakeKubeApi({"tideserve-decode": 1, "tideserve-prefill": 0}, pods=["decode-7f9c-x2"])
    with http_app(fake) as addr, kube_actuator(f"http://{addr}") as act:
        yield fake, act


def test_kubernetes_start_adds_a_replica_and_lets_kubernetes_name_the_pod(kube):
    fake, act = kube
    assert act.start("decode") == ""
    assert act.start("prefill") == ""
    assert fake.replicas == {"tideserve-decode": 2, "tideserve-prefill": 1}
    patches = [(p, b) for m, p, _, b in fake.calls if m == "PATCH"]
    assert patches[0] == (
        "/apis/apps/v1/namespaces/serving/deployments/tideserve-decode/scale",
        {"metadata": {"resourceVersion": "1"}, "spec": {"replicas": 2}},
    )


def test_kubernetes_stop_marks_the_drained_pod_then_scales_down(kube):
    fake, act = kube
    act.start("decode")
    fake.calls.clear()
    act.stop("decode-7f9c-x2", "decode")
    assert fake.pods["decode-7f9c-x2"] == {"controller.kubernetes.io/pod-deletion-cost": "-1000"}
    assert fake.replicas["tideserve-decode"] == 1
    patches = [(p, ctype) for m, p, ctype, _ in fake.calls if m == "PATCH"]
    assert [p for p, _ in patches] == [
        "/api/v1/namespaces/serving/pods/decode-7f9c-x2",  # first the victim, then the count
        "/apis/apps/v1/namespaces/serving/deployments/tideserve-decode/scale",
    ]
    assert all(ctype.endswith("merge-patch+json") for _, ctype in patches)


def test_kubernetes_stop_of_an_unknown_pod_still_scales_down(kube, caplog):
    fake, act = kube
    with caplog.at_level(logging.WARNING):
        act.stop("decode-gone", "decode")
    assert "pod serving/decode-gone not found" in caplog.text
    assert fake.replicas["tideserve-decode"] == 0
    act.stop("", "decode")  # at zero already: nothing to write
    assert fake.replicas["tideserve-decode"] == 0
    assert [m for m, *_ in fake.calls].count("PATCH") == 2  # the pod, then 1 -> 0


def test_kubernetes_reads_again_when_someone_else_scaled(kube):
    fake, act = kube
    fake.interference = 1  # an HPA moves decode 1 -> 3 between our read and our write
    act.start("decode")
    assert fake.replicas["tideserve-decode"] == 4
    fake.interference = 3
    with pytest.raises(RuntimeError, match="changed under every one of 3 tries"):
        act.start("decode")


def test_kubernetes_errors_say_what_to_fix(monkeypatch):
    pytest.importorskip("kubernetes")
    from autoscaler.actuators.kubernetes import KubernetesActuator

    fake = FakeKubeApi({"tideserve-decode": 1})
    with http_app(fake) as addr, kube_actuator(f"http://{addr}", deployments="decode=gpu") as act:
        with pytest.raises(ValueError, match="deployment serving/gpu not found; create it"):
            act.start("decode")
        with pytest.raises(ValueError, match="no Deployment for role 'router'"):
            act.start("router")
    with kube_actuator(f"http://127.0.0.1:{closed_port()}") as act:
        with pytest.raises(RuntimeError, match="cannot reach the Kubernetes API at http://"):
            act.start("decode")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ValueError, match="in-cluster service account"):
        KubernetesActuator(in_cluster=True)
