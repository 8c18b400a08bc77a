"""The decode worker service (FuDG decode, or NoDG with `--role colocated`): a worker process
that starts in that role.

What the roles do is in `tideserve/roles/decode.py`; the process (engine, router link, KV
endpoints, role switches) in `tideserve/roles/host.py`.
"""

from __future__ import annotations

from tideserve.roles.host import run_worker
from tideserve.worker import WorkerConfig


def run(cfg: WorkerConfig) -> None:
    run_worker(cfg)
