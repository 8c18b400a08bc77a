"""docs/deploy.md's cluster of several hosts, run as the page says: network namespaces stand for
the router host, two GPU hosts and a client (tests/chaos/netns.py), and each host gets only
what the page gives it: its `/etc/tideserve/tideserve.toml` (the page's block, with this
machine's addresses and paths), `tideserve.env` (compose/systemd/tideserve.env; the API key on
the router host), CURVE keys made by the page's `tideserve keys generate` and installed as it
says, and its nftables rules (where `nft` is installed). Each process is the unit's
(compose/systemd/, with the multi-host drop-ins on the GPU hosts) as systemd would start it:
ExecStart, Environment=, the EnvironmentFile. Every host has its own /dev/shm where it can be
mounted, as real hosts do.

What a user would notice: greedy completions through the cluster equal the offline engine's,
the workers advertise their hosts' addresses (so KV goes by tcp), the API needs the key, the
firewall is in force, and a GPU host leaves as the page says (drain, then SIGTERM). Skips where
namespaces cannot be made (not root, no `ip`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.chaos.netns import NetnsUnavailable, Topology
from tests.deploy.support import (
    MULTI_HOST,
    ROOT,
    UNIT_BINARY,
    UNITS,
    dotenv,
    read_unit,
    unit_command,
)
from tests.factories import make_tiny_model, make_tiny_tokenizer

DOC = ROOT / "docs" / "deploy.md"
DOC_ADDRESSES = {"gpu1": "10.0.0.11", "gpu2": "10.0.0.12", "router": "10.0.0.1"}
DOC_MODEL = "/srv/models/Llama-3.1-8B-Instruct"
RUNS = {  # host -> (unit, instance): what each host runs in the page's table
    "router": ("tideserve-router.service", ""),
    "gpu1": ("tideserve-prefill@.service", "0"),
    "gpu2": ("tideserve-decode@.service", "0"),
}
TEST_ONLY = {"TIDESERVE_KV_CACHE_BYTES": str(1 << 24), "TIDESERVE_NUM_THREADS": "1"}
API_KEY = "a-long-random-string-0123456789"  # "set TIDESERVE_API_KEY=..." on the router host
PROMPTS = ["hello there", "the tide comes in", "route me, please", "a longer prompt " * 3]
MAX_TOKENS = 12


def doc_block(title: str) -> str:
    """The one fenced block of docs/deploy.md whose first line names `title`."""
    blocks = re.findall(r"```[\w-]*\n(.*?)```", DOC.read_text(), re.S)
    found = [b for b in blocks if title in b.splitlines()[0]]
    assert len(found) == 1, f"docs/deploy.md should have one block titled {title!r}"
    return found[0]


def doc_command(prefix: str) -> list[str]:
    (line,) = [ln for ln in DOC.read_text().splitlines() if ln.startswith(prefix)]
    return shlex.split(line.split("#")[0])


class Cluster:
    """The hosts' files and processes; `url` is the API as the client host reaches it."""

    def __init__(self, topo: Topology, tmp: Path, model: Path) -> None:
        self.topo, self.tmp, self.model = topo, tmp, model
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.url = f"http://{topo.hosts['router'].ip}:8000"

    def etc(self, host: str) -> Path:
        return self.tmp / host / "conf"  # /etc/tideserve there

    def localize(self, text: str, host: str) -> str:
        """The page's addresses and paths -> this machine's."""
        for name, doc_ip in DOC_ADDRESSES.items():
            text = re.sub(re.escape(doc_ip) + r"(?![\d])", self.topo.hosts[name].ip, text)
        text = text.replace("/etc/tideserve", str(self.etc(host)))
        text = text.replace("/var/lib/tideserve", str(self.tmp / host / "state"))
        return text.replace(DOC_MODEL, str(self.model))

    def install(self, keys: Path) -> None:
        for host in RUNS:
            etc = self.etc(host)
            etc.mkdir(parents=True)
            if host == "router":
                toml = doc_block("tideserve.toml on the router host")
            else:  # "On gpu2 the same, with host = ..."
                toml = doc_block("tideserve.toml on the GPU host gpu1")
                toml = toml.replace(DOC_ADDRESSES["gpu1"], DOC_ADDRESSES[host])
            (etc / "tideserve.toml").write_text(self.localize(toml, host))
            env = (UNITS / "tideserve.env").read_text()
            if host == "router":
                env += f"TIDESERVE_API_KEY={API_KEY}\n"
            env += "".join(f"{k}={v}\n" for k, v in TEST_ONLY.items())
            (etc / "tideserve.env").write_text(self.localize(env, host))
            # the keys: the directory without clients/; a GPU host's own client identity
            shutil.copytree(keys, etc / "keys", ignore=shutil.ignore_patterns("clients"))
            if host != "router":
                shutil.copy(keys / "clients" / f"{host}.key_secret", etc / "keys/client.key_secret")
            os.chmod(etc / "keys", 0o700)

    def firewall(self) -> None:
        for host in RUNS:
            kind = "the router host" if host == "router" else "every GPU host"
            rules = self.localize(doc_block(f"tideserve.nft on {kind}"), host)
            ns = self.topo.hosts[host].ns
            lo, hi = _run(["ip", "netns", "exec", ns, "sysctl", "-n",
                           "net.ipv4.ip_local_port_range"]).split()  # fmt: skip
            rules = rules.replace("32768-60999", f"{lo}-{hi}")  # the page: the host's range
            _run(["ip", "netns", "exec", ns, "nft", "-f", "-"], stdin=rules)

    def start(self, host: str) -> None:
        unit, instance = RUNS[host]
        entries = read_unit(UNITS / unit, _dropins(unit) if host != "router" else ())
        env_file = dotenv(self.etc(host) / "tideserve.env")
        argv, env = unit_command(entries, instance, host, env_file)
        env = {k: self.localize(v, host) for k, v in env.items()}
        assert argv[0] == UNIT_BINARY
        argv = [sys.executable, "-m", "tideserve.cli", *argv[1:]]
        base = {k: v for k, v in os.environ.items() if not k.startswith("TIDESERVE_")}
        shm = 'mount -t tmpfs -o size=256m tmpfs /dev/shm 2>/dev/null; exec "$@"'
        cmd = ["env", "-i", *(f"{k}={v}" for k, v in {**base, **env}.items())]
        cmd += ["sh", "-c", shm, "sh", *argv]
        self.logs[host] = self.tmp / f"{host}.log"
        with open(self.logs[host], "w") as log:
            self.procs[host] = self.topo.popen(host, cmd, log)

    def stop(self) -> None:
        for p in self.procs.values():
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait()

    def log_tails(self, n: int = 2500) -> str:
        return "\n".join(f"--- {h}\n{p.read_text()[-n:]}" for h, p in self.logs.items())


def _dropins(unit: str) -> tuple[Path, ...]:
    return tuple(sorted((MULTI_HOST / f"{unit}.d").glob("*.conf")))


def _run(argv: list[str], stdin: str | None = None) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr}"
    return proc.stdout


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_tokenizer(
        make_tiny_model(tmp_path_factory.mktemp("mh") / "model", vocab_size=259 + 5)
    )


@pytest.fixture(scope="module")
def expected(tiny_dir) -> dict[str, str]:
    from tideserve import LLM, SamplingParams

    llm = LLM(model=str(tiny_dir), dtype="float32", kv_cache_bytes=1 << 24)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return {p: o.text for p, o in zip(PROMPTS, llm.generate(PROMPTS, params))}


@pytest.fixture(scope="module")
def cluster(tiny_dir, tmp_path_factory):
    topo = Topology([*RUNS, "client"])
    try:
        topo.start()
    except NetnsUnavailable as e:
        pytest.skip(f"no network namespaces here: {e}")
    tmp = tmp_path_factory.mktemp("multihost")
    c = Cluster(topo, tmp, tiny_dir)
    try:
        keygen = doc_command("tideserve keys generate")
        keys = tmp / "keys"
        keygen[keygen.index("generate") + 1] = str(keys)
        _run([sys.executable, "-m", "tideserve.cli", *keygen[1:]])
        c.install(keys)
        if topo.has_nft:
            c.firewall()
        for host in RUNS:
            c.start(host)
        yield c
    finally:
        c.stop()
        left = {h: topo.pids(h) for h in topo.hosts}
        topo.close()
        assert not any(left.values()), f"processes left in the namespaces: {left}"


# -- a client on its own host --------------------------------------------------------------------


def call(url: str, body: dict | None = None, key: str | None = API_KEY, timeout: float = 30):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=timeout) as r:
        return r.status, r.read().decode()


def wait_ready(url: str, timeout_s: float, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise TimeoutError("a service exited")
        try:
            if call(url + "/health", key=None, timeout=2)[0] == 200:
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url}/health not 200 in {timeout_s:.0f} s")


def wait_idle(url: str, timeout_s: float) -> list[tuple]:
    """Waits until no worker holds KV blocks or transfers; returns what each held last."""
    deadline = time.monotonic() + timeout_s
    while True:
        held = [(w["id"], w["kv_blocks_used"], w["load"]["inflight_kv"])
                for w in json.loads(call(url + "/cluster")[1])["workers"]]  # fmt: skip
        if all(b == 0 and k == 0 for _, b, k in held) or time.monotonic() > deadline:
            return held
        time.sleep(0.2)


def wait_gone(url: str, worker_id: str, timeout_s: float) -> list[str]:
    """The ids in /cluster once `worker_id` has left it (its Goodbye), or after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        ids = [w["id"] for w in json.loads(call(url + "/cluster")[1])["workers"]]
        if worker_id not in ids or time.monotonic() > deadline:
            return ids
        time.sleep(0.1)


def complete(url: str, model: str, prompt: str, stream: bool) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": stream}  # fmt: skip
    _, text = call(url + "/v1/completions", body, timeout=60)
    if not stream:
        return json.loads(text)["choices"][0]["text"]
    events = [json.loads(ln[6:]) for ln in text.splitlines() if ln.startswith("data: {")]
    return "".join(e["choices"][0]["text"] for e in events)


def is_reachable(ip: str, port: int) -> bool:
    try:
        socket.create_connection((ip, port), timeout=1).close()
        return True
    except OSError:
        return False


def stop(cluster: Cluster, host: str, timeout_s: float = 10) -> int:
    """SIGTERM to the host's service, as `systemctl stop` sends it; its exit code."""
    proc = cluster.procs[host]
    os.kill(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"{host} did not stop in {timeout_s:g} s\n{cluster.log_tails()}"
        ) from None


# -- the test ------------------------------------------------------------------------------------


def test_a_cluster_of_hosts_set_up_as_docs_deploy_md_says(cluster, expected):
    from tideserve.policy.routing import choose_kv_transport

    topo, url = cluster.topo, cluster.url
    with topo.host_threads("client", len(PROMPTS)) as client:
        try:
            client.submit(wait_ready, url, 60, list(cluster.procs.values())).result()
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{cluster.log_tails()}") from None
        workers = {
            w["id"]: w
            for w in json.loads(client.submit(call, url + "/cluster").result()[1])["workers"]
        }
        assert set(workers) == {"gpu1-prefill-0", "gpu2-decode-0"}  # the drop-ins' ids
        prefill, decode = workers["gpu1-prefill-0"], workers["gpu2-decode-0"]
        gpu1, gpu2 = topo.hosts["gpu1"].ip, topo.hosts["gpu2"].ip
        assert (prefill["host"], decode["host"]) == (gpu1, gpu2)  # advertised, from the TOML
        assert decode["address"] == f"tcp://{gpu2}:7600"  # the unit's port for GPU 0
        assert choose_kv_transport(prefill["host"], decode["host"], ("shm", "tcp")) == "tcp"

        with pytest.raises(urllib.error.HTTPError) as no_key:
            client.submit(call, url + "/v1/models", None, None).result()
        assert no_key.value.code == 401
        model = json.loads(client.submit(call, url + "/v1/models").result()[1])["data"][0]["id"]
        futures = {
            p: client.submit(complete, url, model, p, i % 2 == 0) for i, p in enumerate(PROMPTS)
        }
        got = {p: f.result(timeout=120) for p, f in futures.items()}
        assert got == expected, cluster.log_tails()
        held = client.submit(wait_idle, url, 10).result()  # nothing left holding KV
        assert all(b == 0 and k == 0 for _, b, k in held), f"{held}\n{cluster.log_tails()}"

        if topo.has_nft:  # the GPU hosts take KV from each other only
            assert not client.submit(is_reachable, gpu2, 7600).result()
            with topo.host_threads("gpu1", 1) as gpu1_host:
                assert gpu1_host.submit(is_reachable, gpu2, 7600).result()

        # removing a GPU host: drain its worker, then stop it (systemctl stop: SIGTERM)
        status, body = client.submit(call, f"{url}/admin/workers/gpu2-decode-0/drain", {}).result()
        assert (status, json.loads(body)["state"]) == (200, "draining")
        assert stop(cluster, "gpu2") == 0
        assert client.submit(wait_gone, url, "gpu2-decode-0", 5).result() == ["gpu1-prefill-0"]
    # the rest stops cleanly and at once: no transfer is left waiting for its acknowledgement
    assert (stop(cluster, "gpu1"), stop(cluster, "router")) == (0, 0)
    logs = {h: p.read_text() for h, p in cluster.logs.items()}
    assert all("CURVE on" in text for text in logs.values()), cluster.log_tails()
