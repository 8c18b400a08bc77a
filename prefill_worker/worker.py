"""The prefill worker service (FuDG): a worker process that starts in the prefill role.

What the role does is in `tideserve/roles/prefill.py`; the process (engine, router link, KV
endpoints, role switches) in `tideserve/roles/host.py`.
"""

from __future__ import annotations

from tideserve.roles.host import run_worker
from tideserve.worker import WorkerConfig


def run(cfg: WorkerConfig) -> None:
    run_worker(cfg)
