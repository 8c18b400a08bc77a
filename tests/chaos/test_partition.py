"""Chaos across hosts: the router, a prefill worker and a decode worker each on a "host" of its
own (a network namespace), all over TCP through a WAN with 20 ms latency and 1% loss, and the
decode host cut off for 5 s while requests stream. Outcome a user notices: no request is lost
(every one ends with the offline engine's greedy text, streaming or not; the client retries
only the 429/503 it gets before admission, as Retry-After says; no stream carries an error)
and, once the partition heals, the same decode worker is back in /cluster and serves.

How each fault is made on this machine (netem, or emulated where the kernel lacks it) is in
tests/chaos/netns.py and in the summary line the test prints (`pytest -s` shows it). Skips
when it cannot build namespaces (not root, no `ip`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import pytest

from tests.chaos.netns import ImpairmentUnavailable, NetnsUnavailable, Topology
from tests.factories import make_tiny_model, make_tiny_tokenizer

DELAY_MS, LOSS_PCT, PARTITION_S = 20, 1.0, 5.0
HEARTBEAT_TIMEOUT_S = 2.0
ROUTER_PORT, WORKER_PORT = 8000, 7100  # each host has its own ports: fixed ones are fine
PROMPTS = [
    "hello there",
    "the tide comes in",
    "a much longer prompt " * 2,
    "x y z",
    "route me, please",
    "5",
    "six sixty six",
    "partitions happen",
]


@dataclass(frozen=True)
class Ask:
    prompt: str
    max_tokens: int
    stream: bool


@dataclass
class Outcome:
    text: str | None = None  # None: lost
    error: str = ""  # why it was lost
    refusals: list[str] = field(default_factory=list)  # the 429/503 messages it was retried on


def _asks(n: int, max_tokens: int, offset: int = 0) -> list[Ask]:
    return [
        Ask(PROMPTS[(offset + i) % len(PROMPTS)], max_tokens + 8 * (i % 3), i % 2 == 0)
        for i in range(n)
    ]


BEFORE, CAUGHT, DURING, AFTER = _asks(8, 24), _asks(8, 96, 3), _asks(8, 32, 5), _asks(8, 24, 1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny-chaos"), vocab_size=259 + 5)
    return make_tiny_tokenizer(path)


@pytest.fixture(scope="module")
def expected(tiny_dir) -> dict[tuple[str, int], str]:
    from tideserve import LLM, SamplingParams

    llm = LLM(model=str(tiny_dir), dtype="float32", kv_cache_bytes=1 << 24)
    keys = sorted({(a.prompt, a.max_tokens) for a in BEFORE + CAUGHT + DURING + AFTER})
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for _, m in keys]
    outs = llm.generate([p for p, _ in keys], params)
    return {k: o.text for k, o in zip(keys, outs)}


@pytest.fixture(scope="module")
def topo():
    t = Topology(["router", "prefill", "decode"])
    try:
        t.start()
    except NetnsUnavailable as e:
        pytest.skip(f"no network namespaces here: {e}")
    try:
        t.impair(DELAY_MS, LOSS_PCT)  # from the start: the workers join over the faulty WAN
    except ImpairmentUnavailable as e:
        t.close()
        pytest.skip(f"cannot add latency and loss here: {e}")
    try:
        yield t
    finally:
        t.close()


@pytest.fixture(scope="module")
def cluster(topo, tiny_dir, tmp_path_factory):
    """The router, prefill and decode processes, each on its host; yields their logs' folder.
    Stops them all (SIGTERM to each process group, then SIGKILL) and checks none is left."""
    logs = tmp_path_factory.mktemp("chaos-logs")
    router_ip = topo.hosts["router"].ip
    base = [sys.executable, "-m", "tideserve.cli", "--log-level", "INFO"]
    engine = ["--model", str(tiny_dir), "--served-model-name", "tiny", "--dtype", "float32",
              "--kv-cache-bytes", str(1 << 24), "--num-threads", "1"]  # fmt: skip
    worker = ["--router-address", f"tcp://{router_ip}:{WORKER_PORT}", *engine]
    argvs = {
        "router": [*base, "router", "--model", str(tiny_dir), "--served-model-name", "tiny",
                   "--host", "127.0.0.1", "--port", str(ROUTER_PORT),
                   "--worker-address", f"tcp://{router_ip}:{WORKER_PORT}",
                   "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S)],
        "prefill": [*base, "prefill", "--worker-id", "prefill-0",
                    "--host", topo.hosts["prefill"].ip, *worker],
        "decode": [*base, "decode", "--worker-id", "decode-0",
                   "--host", topo.hosts["decode"].ip, *worker],
    }  # fmt: skip
    procs, files = {}, []
    try:
        for host, argv in argvs.items():
            files.append(open(logs / f"{host}.log", "w"))
            procs[host] = topo.popen(host, argv, files[-1])
        yield logs
    finally:
        for p in procs.values():
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait()
        for f in files:
            f.close()
        left = {h: topo.pids(h) for h in topo.hosts}
        assert not any(left.values()), f"processes left in the namespaces: {left}"


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


# -- a client, as a real one behaves ------------------------------------------------------------

URL = f"http://127.0.0.1:{ROUTER_PORT}"


def _get(path: str):
    with urllib.request.urlopen(URL + path, timeout=10) as r:
        body = r.read().decode()
    return json.loads(body) if path != "/metrics" else body


def complete(ask: Ask, on_token=lambda: None, max_retries: int = 60) -> Outcome:
    """One completion; a 429/503 with Retry-After is retried after that many seconds."""
    out = Outcome()
    body = {"model": "tiny", "prompt": ask.prompt, "max_tokens": ask.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": ask.stream}  # fmt: skip
    for _ in range(max_retries + 1):
        req = urllib.request.Request(
            URL + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return _read_stream(r, out, on_token) if ask.stream else _read_whole(r, out)
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            if e.code not in (429, 503) or e.headers.get("Retry-After") is None:
                out.error = f"HTTP {e.code}: {detail}"
                return out
            out.refusals.append(json.loads(detail)["error"]["message"])
            time.sleep(float(e.headers["Retry-After"]))
        except OSError as e:
            out.error = f"{type(e).__name__}: {e}"
            return out
    out.error = f"still refused after {max_retries} retries"
    return out


def _read_whole(r, out: Outcome) -> Outcome:
    choice = json.load(r)["choices"][0]
    if choice["finish_reason"] != "length":
        out.error = f"finish_reason {choice['finish_reason']!r}"
        return out
    out.text = choice["text"]
    return out


def _read_stream(r, out: Outcome, on_token) -> Outcome:
    parts, finish, done = [], None, False
    for line in r:
        line = line.decode().strip()
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: {"):
            ev = json.loads(line[6:])
            if "error" in ev:
                out.error = f"error event mid-stream: {ev['error']}"
                return out
            parts.append(ev["choices"][0]["text"])
            finish = ev["choices"][0]["finish_reason"] or finish
            on_token()
    if not done or finish != "length":
        out.error = f"stream ended early (finish_reason {finish!r}, [DONE] {done})"
        return out
    out.text = "".join(parts)
    return out


def _events() -> dict[str, float]:
    pat = r'tideserve_cluster_events_total\{event="(\w+)"\} ([0-9.e+]+)'
    return {k: float(v) for k, v in re.findall(pat, _get("/metrics"))}


def _wait_ready(timeout_s: float) -> list[dict]:
    """Waits until a prefill and a decode worker are ready in /cluster; returns the workers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ws = _get("/cluster")["workers"]
        except OSError:  # the router is still starting
            ws = []
        if {w["role"] for w in ws if w["state"] == "ready"} >= {"prefill", "decode"}:
            return ws
        time.sleep(0.1)
    raise TimeoutError(f"no ready prefill and decode worker in {timeout_s:.0f} s")


def _wait_idle(timeout_s: float) -> list[tuple]:
    """Waits until no worker holds KV blocks or transfers; returns what each held last."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = [(w["id"], w["kv_blocks_used"], w["load"]["inflight_kv"])
                for w in _get("/cluster")["workers"]]  # fmt: skip
        if all(b == 0 and k == 0 for _, b, k in held) or time.monotonic() > deadline:
            return held
        time.sleep(0.2)


def _log_tails(logs, n: int = 3000) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-n:]}" for p in sorted(logs.glob("*.log")))


# -- the test -------------------------------------------------------------------------------------


def test_partition_of_the_decode_host_loses_no_request(topo, cluster, expected):
    t_start = time.monotonic()
    rtt_ms = topo.rtt_ms("prefill", "decode")
    assert rtt_ms >= 2 * DELAY_MS * 0.9, f"the latency is not in effect: rtt {rtt_ms:.1f} ms"
    results: list[tuple[Ask, Outcome]] = []
    with topo.host_threads("router", 1) as ctl, topo.host_threads("router", 16) as clients:
        try:
            workers = ctl.submit(_wait_ready, 120).result()
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{_log_tails(cluster)}") from None
        decode = next(w for w in workers if w["role"] == "decode")
        before = ctl.submit(_events).result()

        def run(asks: list[Ask], **kw) -> list:
            return [clients.submit(complete, a, **kw) for a in asks]

        def collect(asks: list[Ask], futures: list) -> None:
            results.extend(zip(asks, (f.result(timeout=300) for f in futures)))

        collect(BEFORE, run(BEFORE[:4]) + run(BEFORE[4:]))
        first_token = threading.Event()
        caught = run(CAUGHT, on_token=first_token.set)
        assert first_token.wait(60), "no token came back before the partition"
        topo.partition("decode")
        t_cut = time.monotonic()
        during = []
        for a in DURING:  # new requests while the decode host is cut off
            during += run([a])
            time.sleep(PARTITION_S / len(DURING))
        time.sleep(max(0.0, t_cut + PARTITION_S - time.monotonic()))
        topo.heal("decode")
        t_heal = time.monotonic()
        back = ctl.submit(_wait_ready, 60).result()
        recovery_s = time.monotonic() - t_heal
        collect(CAUGHT, caught)
        collect(DURING, during)
        collect(AFTER, run(AFTER))
        after = ctl.submit(_events).result()
        held = ctl.submit(_wait_idle, 40).result()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    lost = [(a, o.error) for a, o in results if o.text is None]
    wrong = [(a, o.text, expected[a.prompt, a.max_tokens]) for a, o in results
             if o.text is not None and o.text != expected[a.prompt, a.max_tokens]]  # fmt: skip
    refusals = [m for _, o in results for m in o.refusals]
    correct = len(results) - len(lost) - len(wrong)
    drops = topo.dropped_packets()
    print(
        f"\nchaos summary: {len(results)} requests sent, {correct} completed with the offline "
        f"engine's greedy text, {len(lost)} lost, {len(wrong)} wrong, {len(refusals)} client "
        f"retries (429/503 + Retry-After); faults: latency {topo.faults['latency']} (rtt "
        f"{rtt_ms:.0f} ms), loss {topo.faults['loss']} ({drops.get('loss', 0)} packets dropped), "
        f"partition of the decode host for {PARTITION_S:g} s ({topo.faults['partition']}; "
        f"{topo.partition_drops} packets dropped); router: {delta.get('worker_dropped', 0):g} "
        f"worker drops, {delta.get('parked', 0):g} requests parked, "
        f"{delta.get('redispatched', 0):g} re-dispatched, {delta.get('failed', 0):g} failed; "
        f"decode back {recovery_s:.1f} s after the heal; {time.monotonic() - t_start:.0f} s"
    )
    logs = _log_tails(cluster)
    assert not lost, f"lost requests: {lost}\n{logs}"
    assert not wrong, f"wrong outputs: {wrong}"
    assert all(m.startswith(("no worker is ready", "too many")) for m in refusals), refusals
    assert delta.get("failed", 0) == 0, delta  # the router failed no request it had admitted
    assert delta.get("worker_dropped", 0) >= 1, delta  # the partition was noticed...
    assert delta.get("parked", 0) + delta.get("redispatched", 0) >= 1, delta  # ...and held some
    again = next(w for w in back if w["role"] == "decode")
    assert (again["id"], again["pid"]) == (decode["id"], decode["pid"])  # rejoined, not replaced
    assert all(b == 0 and k == 0 for _, b, k in held), f"KV still held: {held}\n{logs}"
    assert topo.delay_line is None or topo.delay_line.poll() is None, "the delay line died"
