"""The local actuator: workers as child processes on this host.

`start(role)` runs `python -m tideserve.cli prefill|decode ...` with a worker id of its own
(`<role>-a<N>`), its share of threads and the router's address; the child gets SIGTERM if the
autoscaler dies (PR_SET_PDEATHSIG). `stop` sends SIGTERM (the worker drains, then exits) and
SIGKILL after `stop_timeout_s`; `close` stops them all.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import signal
import subprocess
import sys

log = logging.getLogger(__name__)


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class LocalActuator:
    name = "local"

    def __init__(
        self,
        router_address: str,
        worker_args: tuple[str, ...] = (),
        threads: int = 1,
        colocated: bool = False,
        log_level: str = "INFO",
        stop_timeout_s: float = 30.0,
    ) -> None:
        self.router_address = router_address
        self.worker_args = tuple(worker_args)  # engine flags: --model, --dtype, ...
        self.threads = threads
        self.log_level = log_level
        self.stop_timeout_s = stop_timeout_s
        self.procs: dict[str, subprocess.Popen] = {}
        self._ids = itertools.count()

    def command(self, role: str, worker_id: str) -> list[str]:
        cmd = "prefill" if role == "prefill" else "decode"
        extra = ["--role", role] if role in ("colocated", "partial") else []
        return [
            sys.executable, "-m", "tideserve.cli", "--log-level", self.log_level, cmd, *extra,
            "--router-address", self.router_address, "--worker-id", worker_id,
            "--threads", str(self.threads), *self.worker_args,
        ]  # fmt: skip

    def start(self, role: str) -> str:
        wid = f"{role}-a{next(self._ids)}"
        self.procs[wid] = subprocess.Popen(
            self.command(role, wid), preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL
        )
        log.info("started %s (pid %d)", wid, self.procs[wid].pid)
        return wid

    def stop(self, worker_id: str, role: str) -> None:
        p = self.procs.pop(worker_id, None)
        if p is None:
            log.warning("stop %s: not a process this actuator started", worker_id)
            return
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s: killed", worker_id, self.stop_timeout_s)
                p.kill()
                p.wait()
        log.info("stopped %s (exit %s)", worker_id, p.returncode)

    def exited(self) -> list[str]:
        """Workers that exited on their own (crashed); forgotten here."""
        gone = [wid for wid, p in self.procs.items() if p.poll() is not None]
        for wid in gone:
            log.warning("%s exited on its own (code %s)", wid, self.procs.pop(wid).returncode)
        return gone

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)  # shutting down: no drain
        for p in self.procs.values():
            try:
                p.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
