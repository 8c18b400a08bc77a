"""The kubernetes actuator: one Deployment per role, scaled through its scale subresource.

`start(role)` raises the role's Deployment by one replica and returns "": Kubernetes names the
pod, and the autoscaler takes the next new worker of that role that registers. `stop(worker_id,
role)` comes after the autoscaler drained that worker: it gives the pod named `worker_id` a low
`controller.kubernetes.io/pod-deletion-cost`, so the ReplicaSet removes that pod first, then
lowers the replicas by one. That needs the worker id to be the pod name: the pod spec passes
`--worker-id $(POD_NAME)`, with POD_NAME from the downward API (metadata.name). When no such
pod exists, it only scales down; the pod the ReplicaSet picks gets SIGTERM and drains.

A count changed by someone else between the read and the write fails the write (the patch
carries the resourceVersion it read) and is read again. Every call has a timeout.
"""

from __future__ import annotations

import logging
import os

try:
    import urllib3
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config
    from kubernetes.client.exceptions import ApiException
except ImportError as e:  # pragma: no cover - the optional extra
    raise ImportError(
        "the kubernetes actuator needs the Kubernetes client: pip install 'tideserve[deploy]'"
    ) from e

from autoscaler.actuators._options import as_mapping

log = logging.getLogger(__name__)

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
DEFAULT_DEPLOYMENTS = {
    "prefill": "tideserve-prefill",
    "decode": "tideserve-decode",
    "colocated": "tideserve-colocated",
}


class _NotFound(Exception):
    pass


class _Conflict(Exception):
    pass


class KubernetesActuator:
    name = "kubernetes"

    def __init__(
        self,
        namespace: str = "default",
        deployments: str | dict[str, str] | None = None,
        in_cluster: bool | None = None,
        api_client: k8s.ApiClient | None = None,
        deletion_cost: int = -1000,
        timeout_s: float = 10.0,
        max_conflicts: int = 3,
    ) -> None:
        self.namespace = namespace
        # role -> Deployment name
        self.deployments = DEFAULT_DEPLOYMENTS | as_mapping(deployments, "deployments")
        self.deletion_cost = deletion_cost  # NOTE: other pods have 0; the lowest goes first
        self.timeout_s = timeout_s  # per API call
        self.max_conflicts = max_conflicts  # concurrent writers tolerated per change
        self._owns_client = api_client is None
        self.api_client = api_client or _load_client(in_cluster)
        self.apps = k8s.AppsV1Api(self.api_client)
        self.core = k8s.CoreV1Api(self.api_client)

    def start(self, role: str) -> str:
        self._scale_by(role, +1)
        return ""

    def stop(self, worker_id: str, role: str) -> None:
        if worker_id:
            self._mark_for_deletion(worker_id)
        self._scale_by(role, -1)

    def close(self) -> None:
        if self._owns_client:
            self.api_client.close()

    def _deployment(self, role: str) -> str:
        if role not in self.deployments:
            raise ValueError(f"no Deployment for role {role!r}; pass deployments={{{role!r}: ...}}")
        return self.deployments[role]

    def _mark_for_deletion(self, pod: str) -> None:
        body = {"metadata": {"annotations": {DELETION_COST: str(self.deletion_cost)}}}
        try:
            what = f"annotate pod {self.namespace}/{pod}"
            self._call(what, self.core.patch_namespaced_pod, pod, self.namespace, body)
        except _NotFound:
            log.warning("pod %s/%s not found: the ReplicaSet picks the pod", self.namespace, pod)

    def _scale_by(self, role: str, delta: int) -> int:
        name = self._deployment(role)
        where = f"deployment {self.namespace}/{name}"
        for _ in range(self.max_conflicts):
            try:
                read = self.apps.read_namespaced_deployment_scale
                scale = self._call(f"read the scale of {where}", read, name, self.namespace)
            except _NotFound:
                raise ValueError(
                    f"{where} not found; create it, or map the role with deployments="
                ) from None
            current = scale.spec.replicas or 0
            target = max(0, current + delta)
            if target == current:
                return current
            body = {"spec": {"replicas": target}}
            if scale.metadata and scale.metadata.resource_version:
                body["metadata"] = {"resourceVersion": scale.metadata.resource_version}
            try:
                patch = self.apps.patch_namespaced_deployment_scale
                self._call(f"scale {where}", patch, name, self.namespace, body)
            except _Conflict:  # someone else changed it since the read: read it again
                continue
            log.info("scaled %s %d -> %d", where, current, target)
            return target
        raise RuntimeError(
            f"{where}: replicas changed under every one of {self.max_conflicts} tries; "
            "is something else (an HPA, kubectl) scaling it too?"
        )

    def _call(self, what: str, fn, *args):
        """One API call with a timeout; _NotFound, _Conflict, or a RuntimeError saying what
        failed and why."""
        try:
            return fn(*args, _request_timeout=self.timeout_s)
        except ApiException as e:
            if e.status == 404:
                raise _NotFound(what) from None
            if e.status == 409:
                raise _Conflict(what) from None
            hint = (
                "; let the autoscaler's service account get and patch deployments/scale and "
                "patch pods"
                if e.status in (401, 403)
                else ""
            )
            raise RuntimeError(f"{what}: HTTP {e.status} {e.reason}{hint}") from None
        except urllib3.exceptions.HTTPError as e:
            host = self.api_client.configuration.host
            raise RuntimeError(f"{what}: cannot reach the Kubernetes API at {host}: {e}") from None


def _load_client(in_cluster: bool | None) -> k8s.ApiClient:
    """The pod's service account in a cluster, the kubeconfig (KUBECONFIG) elsewhere."""
    if in_cluster is None:
        in_cluster = "KUBERNETES_SERVICE_HOST" in os.environ
    cfg = k8s.Configuration()
    try:
        if in_cluster:
            k8s_config.load_incluster_config(client_configuration=cfg)
        else:
            k8s_config.load_kube_config(client_configuration=cfg)
    except (k8s_config.ConfigException, OSError) as e:
        source = "the in-cluster service account" if in_cluster else "the kubeconfig"
        raise ValueError(f"cannot configure the Kubernetes client from {source}: {e}") from None
    return k8s.ApiClient(cfg)
