"""The systemd actuator: workers as instances of template units (compose/systemd/).

`start(role)` runs `systemctl start <unit_prefix>-<role>@N.service` for the lowest N that
neither this actuator nor systemd has running, and returns `<role>-N`: by convention the unit
passes `--worker-id <role>-%i`, so that is the id the worker says Hello with. `stop` runs
`systemctl stop` on the unit named by that id: systemd sends SIGTERM (KillSignal), the worker
drains and exits, and systemd kills it after TimeoutStopSec, which must exceed the worker's
--drain-timeout. `close` stops nothing: the units outlive the autoscaler. Every systemctl call
has a timeout, and a failing one raises a RuntimeError with systemctl's own message.
"""

from __future__ import annotations

import logging
import re
import subprocess

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "colocated")
_RUNNING = ("active", "activating", "deactivating", "reloading", "refreshing")


class SystemdActuator:
    name = "systemd"

    def __init__(
        self,
        unit_prefix: str = "tideserve",
        max_instances: int = 64,
        systemctl: str = "systemctl",
        user: bool = False,
        timeout_s: float = 120.0,
    ) -> None:
        if max_instances < 1:
            raise ValueError(f"max_instances must be >= 1, not {max_instances}")
        self.unit_prefix = unit_prefix
        self.max_instances = max_instances
        # NOTE: --no-ask-password: without a terminal, a missing permission fails at once
        self.systemctl = [systemctl, *(["--user"] if user else []), "--no-ask-password"]
        self.timeout_s = timeout_s  # per systemctl call; `stop` waits out TimeoutStopSec
        self.started: dict[str, str] = {}  # worker id -> unit, started by this actuator

    def unit(self, role: str, instance: int | str) -> str:
        return f"{self.unit_prefix}-{role}@{instance}.service"

    def start(self, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
        taken = self._running(role) | {
            int(wid.rsplit("-", 1)[1]) for wid in self.started if wid.startswith(f"{role}-")
        }
        free = next((n for n in range(self.max_instances) if n not in taken), None)
        if free is None:
            raise RuntimeError(
                f"all {self.max_instances} instances of {self.unit(role, 'N')} are running; "
                "raise max_instances"
            )
        unit = self.unit(role, free)
        self._systemctl("start", unit)
        wid = f"{role}-{free}"
        self.started[wid] = unit
        log.info("started %s (worker %s)", unit, wid)
        return wid

    def stop(self, worker_id: str, role: str) -> None:
        m = re.fullmatch(rf"{re.escape(role)}-(\d+)", worker_id)
        if m is None:
            log.warning("stop %s: not a %s unit's worker id (<role>-<instance>)", worker_id, role)
            return
        unit = self.unit(role, int(m.group(1)))
        self._systemctl("stop", unit)  # SIGTERM: drain; returns once the unit stopped
        self.started.pop(worker_id, None)
        log.info("stopped %s", unit)

    def close(self) -> None:
        self.started.clear()

    def _running(self, role: str) -> set[int]:
        """Instances of the role's template that systemd has running (or starting, stopping)."""
        pattern = self.unit(role, "*")
        out = self._systemctl("list-units", "--all", "--plain", "--no-legend", pattern)
        found = set()
        for line in out.splitlines():
            fields = line.split()
            while fields and not fields[0].startswith(pattern[: -len("*.service")]):
                fields.pop(0)  # a "●" before a failed unit
            if len(fields) < 3 or fields[2] not in _RUNNING:
                continue
            instance = fields[0].removesuffix(".service").rsplit("@", 1)[1]
            if instance.isdigit():
                found.add(int(instance))
        return found

    def _systemctl(self, *args: str) -> str:
        argv = [*self.systemctl, *args]
        shown = " ".join(argv)
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                check=True,
                timeout=self.timeout_s,
                stdin=subprocess.DEVNULL,
            )
        except FileNotFoundError:
            raise RuntimeError(
                f"{argv[0]} not found; run the autoscaler on a systemd host or pass systemctl="
            ) from None
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{shown} did not finish in {self.timeout_s:.0f} s") from None
        except subprocess.CalledProcessError as e:
            why = (e.stderr or e.stdout or "").strip() or "no message"
            raise RuntimeError(f"{shown} failed (exit {e.returncode}): {why}") from None
        return proc.stdout
