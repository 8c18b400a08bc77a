"""SIGKILL a worker that holds requests, on a real tiny-model cluster (1 router, 2 prefill and 2
decode workers): every request still completes with the offline engine's greedy output, the
router counts the re-dispatches, `tideserve serve` restarts the dead worker, and nothing is
left behind. The victim is SIGSTOPped first, so it certainly holds some of the requests sent
next (the router still believes it is healthy) when it is killed.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import time
import urllib.request

import pytest

from tests.factories import make_tiny_model, make_tiny_tokenizer
from tideserve.launcher import ServeProcess

PROMPTS = ["hello there", "a much longer prompt " * 5, "x y z", "the fourth one", "5", "six"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny-fail"), vocab_size=259 + 5)
    return make_tiny_tokenizer(path)


@pytest.fixture(scope="module")
def expected(tiny_dir):
    from tideserve import LLM, SamplingParams

    llm = LLM(model=str(tiny_dir), dtype="float32", kv_cache_bytes=1 << 24)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return [o.text for o in llm.generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def server(tiny_dir):
    srv = ServeProcess(
        "--model", str(tiny_dir), "--prefill", "2", "--decode", "2", "--dtype", "float32",
        "--kv-cache-bytes", str(1 << 24), "--served-model-name", "tiny",
        "--heartbeat-timeout", "1.5", "--num-threads", "1",
    )  # fmt: skip
    with srv:
        _wait_workers(srv, 4)
        yield srv
    time.sleep(0.3)
    assert not srv.leftover_children()


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def _workers(srv) -> list[dict]:
    return json.loads(_get(srv.url + "/cluster"))["workers"]


def _wait_workers(srv, n: int, timeout_s: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ws = [w for w in _workers(srv) if w["state"] == "ready"]
        except OSError:  # not listening yet
            ws = []
        if len(ws) == n:
            return ws
        time.sleep(0.2)
    raise TimeoutError(f"never saw {n} ready workers:\n{srv.output()}")


def _events(srv) -> dict[str, float]:
    text = _get(srv.url + "/metrics")
    pat = r'tideserve_cluster_events_total\{event="(\w+)"\} ([0-9.e+]+)'
    return {k: float(v) for k, v in re.findall(pat, text)}


def _complete(srv, prompt: str) -> str:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    req = urllib.request.Request(
        srv.url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    text = []
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: {"):
                ev = json.loads(line[6:])
                assert "error" not in ev, ev
                text.append(ev["choices"][0]["text"])
    return "".join(text)


@pytest.mark.parametrize("role", ["decode", "prefill"])
def test_sigkill_of_a_busy_worker_loses_no_request(server, expected, role):
    victim = next(w for w in _workers(server) if w["role"] == role)
    before = _events(server)
    os.kill(victim["pid"], signal.SIGSTOP)  # frozen: it takes requests, answers none
    try:
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            futures = [pool.submit(_complete, server, p) for p in PROMPTS]
            time.sleep(0.5)  # every request dispatched, some to the victim
            os.kill(victim["pid"], signal.SIGKILL)
            texts = [f.result(timeout=120) for f in futures]
    finally:
        try:
            os.kill(victim["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert texts == expected
    after = _events(server)
    assert after.get("worker_dropped", 0) > before.get("worker_dropped", 0)
    assert after.get("redispatched", 0) > before.get("redispatched", 0)  # it did hold some
    assert after.get("failed", 0) == before.get("failed", 0)
    restarted = {w["id"]: w for w in _wait_workers(server, 4)}  # serve restarted the victim
    assert restarted[victim["id"]]["pid"] != victim["pid"]
    assert _complete(server, PROMPTS[0]) == expected[0]
    deadline = time.monotonic() + 10  # the survivors hold nothing of the moved requests
    while time.monotonic() < deadline:
        held = [(w["id"], w["kv_blocks_used"], w["load"]["inflight_kv"]) for w in _workers(server)]
        if all(b == 0 and k == 0 for _, b, k in held):
            break
        time.sleep(0.2)
    assert all(b == 0 and k == 0 for _, b, k in held), held


def test_a_restarted_router_gets_its_workers_back(tiny_dir, expected):
    """The router restarts (as systemd would restart it): the running workers are told to
    rejoin on their next heartbeat, and the new router serves with them, no worker restart."""
    import subprocess
    import sys

    from tideserve.launcher import free_port

    http, zmq_port = free_port(), free_port()
    url = f"http://127.0.0.1:{http}"
    base = [sys.executable, "-m", "tideserve.cli", "--log-level", "INFO"]
    router_cmd = base + [
        "router", "--model", str(tiny_dir), "--served-model-name", "tiny", "--port", str(http),
        "--worker-address", f"tcp://127.0.0.1:{zmq_port}",
    ]  # fmt: skip
    worker_cmd = base + [
        "decode", "--role", "colocated", "--model", str(tiny_dir), "--dtype", "float32",
        "--kv-cache-bytes", str(1 << 24), "--num-threads", "1", "--served-model-name", "tiny",
        "--router-address", f"tcp://127.0.0.1:{zmq_port}", "--worker-id", "w0",
    ]  # fmt: skip
    srv = type("Srv", (), {"url": url, "output": lambda self: ""})()
    procs = [subprocess.Popen(router_cmd), subprocess.Popen(worker_cmd)]
    try:
        _wait_workers(srv, 1)
        worker_pid = _workers(srv)[0]["pid"]
        assert _complete(srv, PROMPTS[0]) == expected[0]
        procs[0].kill()
        procs[0].wait()
        procs[0] = subprocess.Popen(router_cmd)
        _wait_workers(srv, 1)
        assert _workers(srv)[0]["pid"] == worker_pid  # the same process, rejoined
        assert _complete(srv, PROMPTS[1]) == expected[1]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def test_sigterm_drains_the_worker_before_it_stops(tiny_dir, expected):
    """SIGTERM (what systemd, docker and kubernetes send to scale in): the worker takes no new
    work, finishes the request it holds itself (nothing is re-dispatched), then exits 0."""
    import subprocess
    import sys

    from tideserve.launcher import free_port

    http, zmq_port = free_port(), free_port()
    srv = type("Srv", (), {"url": f"http://127.0.0.1:{http}", "output": lambda self: ""})()
    base = [sys.executable, "-m", "tideserve.cli", "--log-level", "INFO"]
    router = subprocess.Popen(base + [
        "router", "--model", str(tiny_dir), "--served-model-name", "tiny", "--port", str(http),
        "--worker-address", f"tcp://127.0.0.1:{zmq_port}",
    ])  # fmt: skip
    worker = subprocess.Popen(base + [
        "decode", "--role", "colocated", "--model", str(tiny_dir), "--dtype", "float32",
        "--kv-cache-bytes", str(1 << 24), "--num-threads", "1", "--served-model-name", "tiny",
        "--router-address", f"tcp://127.0.0.1:{zmq_port}", "--worker-id", "w0",
    ])  # fmt: skip
    try:
        _wait_workers(srv, 1)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            os.kill(worker.pid, signal.SIGSTOP)
            fut = pool.submit(_complete, srv, PROMPTS[2])  # waits in the worker's socket
            time.sleep(0.3)
            os.kill(worker.pid, signal.SIGTERM)  # delivered as soon as it runs again
            os.kill(worker.pid, signal.SIGCONT)
            assert fut.result(timeout=60) == expected[2]
        assert worker.wait(30) == 0
        events = _events(srv)
        assert events.get("redispatched", 0) == 0 and events.get("failed", 0) == 0
    finally:
        for p in (worker, router):
            p.kill()
            p.wait()
