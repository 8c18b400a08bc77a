"""The docker actuator: workers as containers of a Docker Compose project (Docker SDK).

`start(role)` creates and starts one container from `image` on the project's network, labelled
as a replica of the role's compose service so `docker compose ps` lists it, and named the way
compose names replicas, `<project>-<service>-<N>`, with N one above the service's highest. That
name is the worker id (`--worker-id`) and the address other workers reach it at (`--host`:
Docker's DNS resolves container names on the project network). `stop` is `docker stop` (SIGTERM:
the worker drains, then exits; SIGKILL after `stop_timeout_s`) then `docker rm`. `close` only
closes the client: the containers outlive the autoscaler, like any compose service.

Construction checks the daemon, the image and the network, so a wrong setting fails when the
autoscaler starts rather than at its first scale-out.

NOTE: these containers carry no compose config hash, so a later `docker compose up` that names
the worker services recreates them and resets their count; bring up only the other services.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

try:
    import docker
    import requests
except ImportError as e:  # pragma: no cover - the optional extra
    raise ImportError(
        "the docker actuator needs the Docker SDK: pip install 'tideserve[deploy]'"
    ) from e

from autoscaler.actuators._options import as_args, as_list, as_mapping

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "colocated")
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
NUMBER_LABEL = "com.docker.compose.container-number"
ONEOFF_LABEL = "com.docker.compose.oneoff"  # "False": a service replica, which `ps` lists


@contextlib.contextmanager
def _docker_errors(what: str):
    """The SDK's errors as a ValueError (a missing image) or a RuntimeError, saying what failed."""
    try:
        yield
    except docker.errors.ImageNotFound as e:
        raise ValueError(f"{what}: {e.explanation}; build or pull it") from None
    except docker.errors.APIError as e:
        raise RuntimeError(f"{what}: {e.explanation or e}") from None
    except (docker.errors.DockerException, requests.RequestException) as e:
        raise RuntimeError(f"{what}: the Docker daemon did not answer: {e}") from None


class DockerActuator:
    name = "docker"

    def __init__(
        self,
        project: str,
        image: str,
        router_address: str,
        worker_args: str | tuple[str, ...] = (),
        network: str | None = None,
        base_url: str | None = None,
        stop_timeout_s: float = 90.0,
        services: str | dict[str, str] | None = None,
        environment: str | dict[str, str] | None = None,
        volumes: str | list[str] | tuple[str, ...] = (),
        entrypoint: str | tuple[str, ...] = ("tideserve",),
        log_level: str = "INFO",
        timeout_s: float = 60.0,
    ) -> None:
        if not project or not image:
            raise ValueError("the docker actuator needs a compose project and an image")
        self.project = project
        self.image = image
        self.router_address = router_address
        self.worker_args = as_args(worker_args)  # engine flags: --model, --dtype, --threads, ...
        self.network = network or f"{project}_default"  # compose's default network name
        self.stop_timeout_s = stop_timeout_s
        self.services = {r: r for r in ROLES} | as_mapping(services, "services")  # role -> service
        self.environment = as_mapping(environment, "environment")
        self.volumes = as_list(volumes)  # "SOURCE:TARGET[:MODE]", as in compose
        self.entrypoint = list(as_args(entrypoint))
        self.log_level = log_level
        self.client = _connect(base_url, timeout_s)
        with _docker_errors(f"image {image!r}"):
            self.client.images.get(image)
        try:
            self.client.networks.get(self.network)
        except docker.errors.NotFound:
            raise ValueError(
                f"network {self.network!r} does not exist; start the compose project "
                "(docker compose up -d) or pass network="
            ) from None

    def command(self, role: str, worker_id: str) -> list[str]:
        cmd = "prefill" if role == "prefill" else "decode"
        extra = ["--role", role] if role == "colocated" else []
        return [
            "--log-level", self.log_level, cmd, *extra,
            "--router-address", self.router_address, "--worker-id", worker_id,
            "--host", worker_id, *self.worker_args,
        ]  # fmt: skip

    def start(self, role: str) -> str:
        service = self._service(role)
        number = self._next_number(service)
        name = f"{self.project}-{service}-{number}"
        labels = {
            PROJECT_LABEL: self.project,
            SERVICE_LABEL: service,
            NUMBER_LABEL: str(number),
            ONEOFF_LABEL: "False",
        }
        with _docker_errors(f"create container {name}"):
            container = self.client.containers.create(
                self.image,
                self.command(role, name),
                name=name,
                hostname=name,
                labels=labels,
                entrypoint=self.entrypoint,
                environment=self.environment,
                volumes=self.volumes,
                network=self.network,
                stop_signal="SIGTERM",  # NOTE: an image's STOPSIGNAL SIGINT would skip the drain
                restart_policy={"Name": "on-failure"},
                detach=True,
            )
        try:
            with _docker_errors(f"start container {name}"):
                container.start()
        except RuntimeError:
            with contextlib.suppress(docker.errors.DockerException, requests.RequestException):
                container.remove(force=True)
            raise
        log.info("started container %s (%s)", name, container.short_id)
        return name

    def stop(self, worker_id: str, role: str) -> None:
        try:
            container = self.client.containers.get(worker_id)
        except docker.errors.NotFound:
            log.warning("stop %s: no such container", worker_id)
            return
        if container.labels.get(PROJECT_LABEL) != self.project:
            log.warning("stop %s: not a container of project %s", worker_id, self.project)
            return
        with _docker_errors(f"stop container {worker_id}"):
            container.stop(timeout=math.ceil(self.stop_timeout_s))  # SIGTERM: drain
            container.remove()
        log.info("stopped and removed container %s", worker_id)

    def close(self) -> None:
        self.client.close()

    def _service(self, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        return self.services[role]

    def _next_number(self, service: str) -> int:
        """One above the highest replica number of `service`, as `docker compose up` counts."""
        labels = [f"{PROJECT_LABEL}={self.project}", f"{SERVICE_LABEL}={service}"]
        with _docker_errors(f"list the containers of {self.project}/{service}"):
            rows = self.client.api.containers(all=True, filters={"label": labels})
        numbers = [(r.get("Labels") or {}).get(NUMBER_LABEL, "") for r in rows]
        return max((int(n) for n in numbers if n.isdigit()), default=0) + 1


def _connect(base_url: str | None, timeout_s: float) -> docker.DockerClient:
    try:
        if base_url is None:
            return docker.from_env(timeout=timeout_s)
        return docker.DockerClient(base_url=base_url, timeout=timeout_s)
    except docker.errors.DockerException as e:
        where = base_url or os.environ.get("DOCKER_HOST") or "the default socket"
        raise RuntimeError(
            f"cannot reach the Docker daemon at {where}: {e}; start it, or point DOCKER_HOST "
            "(or base_url) at it"
        ) from None
