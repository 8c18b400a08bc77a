"""Actuators: how the autoscaler starts and stops workers.

Every actuator does two things: `start(role)` launches one worker of that role and returns
the worker id it will say Hello with ("" when the platform names it, and the autoscaler then
matches the next new worker of that role); `stop(worker_id, role)` stops one worker that the
autoscaler has already drained through the router. A stopped worker gets SIGTERM, which also
drains it (tideserve/worker.py), so a platform that picks its own victim stays drain-safe.

    local       child processes on this host (`tideserve prefill|decode`); the default
    docker      containers of the compose project, through the Docker SDK
    systemd     `systemctl start|stop tideserve-<role>@N`
    kubernetes  the replica count of one Deployment per role, through the official client
"""

from __future__ import annotations

from typing import Protocol

ACTUATORS = ("local", "docker", "systemd", "kubernetes")


class Actuator(Protocol):
    name: str

    def start(self, role: str) -> str: ...

    def stop(self, worker_id: str, role: str) -> None: ...

    def close(self) -> None: ...


def make_actuator(name: str, **options) -> Actuator:
    """Raises ValueError for an unknown name or option."""
    if name == "local":
        from autoscaler.actuators.local import LocalActuator

        return LocalActuator(**options)
    if name == "docker":
        from autoscaler.actuators.docker import DockerActuator

        return DockerActuator(**options)
    if name == "systemd":
        from autoscaler.actuators.systemd import SystemdActuator

        return SystemdActuator(**options)
    if name == "kubernetes":
        from autoscaler.actuators.kubernetes import KubernetesActuator

        return KubernetesActuator(**options)
    raise ValueError(f"unknown actuator {name!r}; choose one of {', '.join(ACTUATORS)}")
