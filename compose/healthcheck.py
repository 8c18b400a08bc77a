#!/usr/bin/env python3
"""Container healthchecks of the compose services (docker-compose.yml, `healthcheck:`).

    tideserve-healthcheck url URL            healthy when GET URL answers 2xx (the router's
                                             /health: a prefill and a decode path are ready;
                                             the autoscaler's /metrics)
    tideserve-healthcheck worker ROUTER_URL  healthy when the router lists this worker: its
                                             id (TIDESERVE_WORKER_ID, else the hostname, as the
                                             entrypoint sets it) labels a series in /metrics

Exit 0 healthy, 1 not. With TIDESERVE_API_KEY set, requests carry it (for --protect-metrics).
"""

import os
import socket
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 5.0


def fetch(url: str) -> str:
    headers = {}
    if os.environ.get("TIDESERVE_API_KEY"):
        headers["Authorization"] = "Bearer " + os.environ["TIDESERVE_API_KEY"]
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:  # raises on 4xx/5xx
        return r.read().decode("utf-8", errors="replace")


def is_registered(router_url: str) -> bool:
    worker_id = os.environ.get("TIDESERVE_WORKER_ID") or socket.gethostname()
    return f'worker="{worker_id}"' in fetch(router_url.rstrip("/") + "/metrics")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("url", "worker"):
        print(__doc__, file=sys.stderr)
        return 2
    mode, url = argv
    try:
        if mode == "url":
            fetch(url)
            return 0
        if is_registered(url):
            return 0
    except (OSError, urllib.error.URLError, ValueError) as e:
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    print("unhealthy: the router does not list this worker", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
