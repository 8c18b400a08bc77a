"""Hosts as Linux network namespaces on one machine, joined by a WAN whose faults a test sets.

    <tag>-<host1>  10.231.1.2/24 eth0 --veth-- v-<host1> 10.231.1.1 \
    <tag>-<host2>  10.231.2.2/24 eth0 --veth-- v-<host2> 10.231.2.1  >  <tag>-wan forwards
    ...                                                              /   between the /24s

Nothing is added to the root namespace: the veths are made in the wan namespace with their
peer born in the host's, so the machine's own interfaces, routes and sysctls stay untouched,
and deleting the namespaces removes every link. Every packet between two hosts crosses the
wan, which is where the faults are made:

  latency, loss   netem on each wan-side veth (a packet leaves the wan by exactly one) when the
                  kernel has sch_netem. Without it, emulated: the wan routes every packet from
                  a host through a TUN device whose reader, `python -m tests.chaos.netns
                  delay-line`, writes each one back after `delay_ms` (FIFO, so no reordering),
                  and nft drops `loss_pct` of the packets leaving the wan (`numgen random`).
  partition       nft drops everything to and from the host's wan-side veth (without nft the
                  veth goes down); `heal` removes the drop.

Test threads join a host with `host_threads` (setns): a client there reaches a server bound
inside the namespace. `close` kills every process left in the namespaces and deletes them; it
runs at exit too, and `start` first removes namespaces a crashed run (its pid gone) left.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import ctypes
import fcntl
import os
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

PREFIX = "tschaos"  # namespaces are <PREFIX><pid>-<host>
SUBNET = "10.231"
ROOT = Path(__file__).resolve().parents[2]
CLONE_NEWNET = 0x40000000
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
DELAY_DEV = "imp0"  # the delay line's TUN device in the wan namespace
DELAY_TABLE = "100"  # the routing table that sends host traffic into the delay line


class NetnsUnavailable(Exception):
    """This machine cannot build the topology (not root, no `ip`, no namespaces)."""


class ImpairmentUnavailable(Exception):
    """The kernel and the tools here cannot make the asked-for fault."""


@dataclass(frozen=True)
class Host:
    name: str
    ns: str  # its network namespace
    ip: str  # its address on the wan
    wan_dev: str  # its link's end in the wan namespace


def _run(*argv: str, stdin: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=20)
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, argv, proc.stdout, proc.stderr)
    return proc.stdout


def _sysctl(ns: str, *settings: str, check: bool = True) -> None:
    _run("ip", "netns", "exec", ns, "sysctl", "-qw", *settings, check=check)


def enter_netns(ns: str) -> None:
    """Moves the calling thread (only it) into the network namespace `ns`."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/run/netns/{ns}") as f:
        if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")


def netns_pids(ns: str) -> list[int]:
    out = _run("ip", "netns", "pids", ns, check=False)
    return [int(p) for p in out.split()]


def _kill_all_in(ns: str) -> None:
    for pid in netns_pids(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def remove_stale_namespaces() -> list[str]:
    """Deletes the namespaces of runs whose process is gone (a crash or SIGKILL skips
    `close`), killing what they left running; returns their names."""
    removed = []
    for line in _run("ip", "netns", "list", check=False).splitlines():
        name = line.split(" ", 1)[0]
        m = re.fullmatch(rf"{PREFIX}(\d+)-\w+", name)
        if m is None or Path(f"/proc/{m.group(1)}").exists():
            continue
        _kill_all_in(name)
        _run("ip", "netns", "del", name, check=False)
        removed.append(name)
    return removed


class Topology:
    """Hosts (namespaces) around a wan namespace; see the module docstring. Use as a context
    manager, or call `start` and `close`."""

    def __init__(self, hosts: list[str], tag: str | None = None) -> None:
        self.tag = tag or f"{PREFIX}{os.getpid()}"
        self.wan = f"{self.tag}-wan"
        self.hosts = {
            h: Host(h, f"{self.tag}-{h}", f"{SUBNET}.{i}.2", f"v-{h}")
            for i, h in enumerate(hosts, start=1)
        }
        self.has_nft = shutil.which("nft") is not None
        self.faults: dict[str, str] = {}  # fault -> how it is made, for the test's summary
        self.partition_drops = 0  # packets dropped by partitions already healed
        self.delay_line: subprocess.Popen | None = None
        self._made: list[str] = []  # namespaces to delete

    # -- build and tear down ---------------------------------------------------------------------

    def start(self) -> Topology:
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        if shutil.which("ip") is None:
            raise NetnsUnavailable("the `ip` tool (iproute2) is not installed")
        remove_stale_namespaces()
        atexit.register(self.close)
        try:
            self._build()
        except (subprocess.CalledProcessError, OSError) as e:
            self.close()
            err = getattr(e, "stderr", "") or e
            raise NetnsUnavailable(f"cannot build the namespaces: {err}".strip()) from None
        return self

    def _build(self) -> None:
        for ns in [self.wan, *(h.ns for h in self.hosts.values())]:
            _run("ip", "netns", "add", ns)
            self._made.append(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _sysctl(ns, "net.ipv6.conf.all.disable_ipv6=1", check=False)  # no ND/MLD chatter
            _sysctl(ns, "net.ipv6.conf.default.disable_ipv6=1", check=False)
        for h in self.hosts.values():
            gw = h.ip.rsplit(".", 1)[0] + ".1"
            _run("ip", "-n", self.wan, "link", "add", h.wan_dev, "type", "veth",
                 "peer", "name", "eth0", "netns", h.ns)  # fmt: skip
            _run("ip", "-n", self.wan, "addr", "add", f"{gw}/24", "dev", h.wan_dev)
            _run("ip", "-n", self.wan, "link", "set", h.wan_dev, "up")
            _run("ip", "-n", h.ns, "addr", "add", f"{h.ip}/24", "dev", "eth0")
            _run("ip", "-n", h.ns, "link", "set", "eth0", "up")
            _run("ip", "-n", h.ns, "route", "add", "default", "via", gw)
        _sysctl(self.wan, "net.ipv4.ip_forward=1")
        if self.has_nft:
            self._nft("-f", "-", stdin=(
                "table inet tschaos {\n"
                "  chain partition {}\n"
                "  chain forward { type filter hook forward priority 0; jump partition; }\n"
                "}\n"
            ))  # fmt: skip

    def close(self) -> None:
        """Kills whatever still runs in the namespaces and deletes them; idempotent."""
        if self.delay_line is not None:
            if self.delay_line.poll() is None:
                self.delay_line.kill()
            self.delay_line.communicate()  # reaps it and closes its pipes
        for ns in reversed(self._made):
            _kill_all_in(ns)
            _run("ip", "netns", "del", ns, check=False)
        self._made.clear()
        atexit.unregister(self.close)

    def __enter__(self) -> Topology:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _ip(self, *args: str) -> str:
        return _run("ip", "-n", self.wan, *args)

    def _nft(self, *args: str, stdin: str | None = None) -> str:
        return _run("ip", "netns", "exec", self.wan, "nft", *args, stdin=stdin)

    # -- use ---------------------------------------------------------------------------------------

    def popen(self, host: str, argv: list[str], log) -> subprocess.Popen:
        """Starts `argv` inside `host`, in a process group of its own, output to `log`."""
        return subprocess.Popen(
            ["ip", "netns", "exec", self.hosts[host].ns, *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )

    def pids(self, host: str) -> list[int]:
        return netns_pids(self.hosts[host].ns)

    def host_threads(self, host: str, num_threads: int) -> ThreadPoolExecutor:
        """A thread pool whose threads live in `host`'s network namespace (sockets they open
        are that host's). Shut it down before `close`: a thread in a namespace keeps it."""
        return ThreadPoolExecutor(num_threads, f"in-{host}", enter_netns, (self.hosts[host].ns,))

    def rtt_ms(self, src: str, dst: str, samples: int = 7) -> float:
        """Median TCP connect time (SYN -> SYN/ACK) from `src` to `dst`, in milliseconds."""
        with self.host_threads(dst, 1) as there, self.host_threads(src, 1) as here:
            listener = there.submit(_listen, self.hosts[dst].ip, samples).result()
            try:
                addr = listener.getsockname()
                times = here.submit(_connect_times, addr, samples).result()
            finally:
                listener.close()
        return statistics.median(times) * 1000

    # -- faults --------------------------------------------------------------------------------

    def has_netem(self) -> bool:
        """Whether the kernel has sch_netem (tried on the wan namespace's loopback)."""
        if shutil.which("tc") is None:
            return False
        try:
            _run("tc", "-n", self.wan, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms")
        except subprocess.CalledProcessError:
            return False
        _run("tc", "-n", self.wan, "qdisc", "del", "dev", "lo", "root", check=False)
        return True

    def impair(self, delay_ms: float, loss_pct: float) -> dict[str, str]:
        """Every packet between two hosts is held `delay_ms` and lost with probability
        `loss_pct` %; returns how (also in `faults`). Raises ImpairmentUnavailable."""
        if self.has_netem():
            for h in self.hosts.values():
                _run("tc", "-n", self.wan, "qdisc", "replace", "dev", h.wan_dev, "root",
                     "netem", "delay", f"{delay_ms}ms", "loss", f"{loss_pct}%")  # fmt: skip
            self.faults["latency"] = f"{delay_ms:g} ms one way (netem)"
            self.faults["loss"] = f"{loss_pct:g}% of packets (netem)"
            return self.faults
        if not self.has_nft:
            raise ImpairmentUnavailable("no sch_netem in the kernel and no nft to drop packets")
        if not os.path.exists("/dev/net/tun"):
            raise ImpairmentUnavailable("no sch_netem in the kernel and no /dev/net/tun")
        self._start_delay_line(delay_ms)
        per_10k = round(loss_pct * 100)
        self._nft("add", "rule", "inet", "tschaos", "forward", "oifname", "v-*",
                  "numgen", "random", "mod", "10000", "<", str(per_10k),
                  "counter", "drop", "comment", '"loss"')  # fmt: skip
        self.faults["latency"] = f"{delay_ms:g} ms one way (no netem here: TUN delay line)"
        self.faults["loss"] = f"{loss_pct:g}% of packets (no netem here: nft numgen drop)"
        return self.faults

    def _start_delay_line(self, delay_ms: float) -> None:
        cmd = [sys.executable, "-m", "tests.chaos.netns", "delay-line", DELAY_DEV, str(delay_ms)]
        self.delay_line = subprocess.Popen(
            ["ip", "netns", "exec", self.wan, *cmd],
            stdin=subprocess.PIPE,  # it exits when this pipe closes: with us, whatever happens
            stdout=subprocess.PIPE,
            cwd=ROOT,
            start_new_session=True,
        )
        ready, _, _ = select.select([self.delay_line.stdout], [], [], 20)
        if not ready or self.delay_line.stdout.readline().strip() != b"ready":
            raise ImpairmentUnavailable("the TUN delay line did not start")
        self._ip("link", "set", DELAY_DEV, "up")
        dev = f"net.ipv4.conf.{DELAY_DEV}"  # what it writes back arrives from any source
        _sysctl(self.wan, f"{dev}.rp_filter=0", "net.ipv4.conf.all.rp_filter=0")
        _sysctl(self.wan, f"{dev}.forwarding=1")
        self._ip("route", "add", "default", "dev", DELAY_DEV, "table", DELAY_TABLE)
        for h in self.hosts.values():  # from a host: into the delay line; out of it: main table
            self._ip("rule", "add", "iif", h.wan_dev, "lookup", DELAY_TABLE, "pref", "100")

    def partition(self, host: str) -> None:
        """Cuts `host` off: every packet to or from it is dropped until `heal`."""
        dev = self.hosts[host].wan_dev
        if not self.has_nft:
            self._ip("link", "set", dev, "down")
            self.faults["partition"] = "the host's link down (no nft here)"
            return
        for way in ("iifname", "oifname"):
            self._nft("add", "rule", "inet", "tschaos", "partition", way, dev,
                      "counter", "drop", "comment", '"partition"')  # fmt: skip
        self.faults["partition"] = "nft drops all the host's packets"

    def heal(self, host: str) -> None:
        if not self.has_nft:
            self._ip("link", "set", self.hosts[host].wan_dev, "up")
            return
        self.partition_drops += self.dropped_packets().get("partition", 0)
        self._nft("flush", "chain", "inet", "tschaos", "partition")

    def dropped_packets(self) -> dict[str, int]:
        """Packets dropped so far by each fault: "loss" (and "partition" while one is on)."""
        out: dict[str, int] = collections.Counter()
        if self.faults.get("loss", "").endswith("(netem)"):
            for h in self.hosts.values():
                stats = _run("tc", "-s", "-n", self.wan, "qdisc", "show", "dev", h.wan_dev)
                out["loss"] += sum(int(n) for n in re.findall(r"dropped (\d+)", stats))
        elif self.has_nft:
            rules = self._nft("list", "table", "inet", "tschaos")
            for n, what in re.findall(r'counter packets (\d+) .*comment "(\w+)"', rules):
                out[what] += int(n)
        return dict(out)


def _listen(ip: str, backlog: int) -> socket.socket:
    s = socket.socket()
    s.bind((ip, 0))
    s.listen(backlog)  # the kernel completes the handshakes; nobody needs to accept
    return s


def _connect_times(addr: tuple[str, int], samples: int) -> list[float]:
    times = []
    for _ in range(samples):
        t0 = time.monotonic()
        with socket.create_connection(addr, timeout=5):
            times.append(time.monotonic() - t0)
    return times


# -- the delay line (a process of its own in the wan namespace) ----------------------------------


def open_tun(dev: str) -> int:
    """Creates the TUN device `dev` in this namespace; its packets are read from the fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", dev.encode(), IFF_TUN | IFF_NO_PI))
    os.set_blocking(fd, False)
    return fd


def run_delay_line(dev: str, delay_ms: float, max_held: int = 10_000) -> None:
    """Writes every packet read from the TUN device `dev` back into it `delay_ms` later, in
    order; holds at most `max_held` (a full queue drops, as a router's would). Returns when
    stdin closes (the test that started it is gone)."""
    fd = open_tun(dev)
    delay_s = delay_ms / 1000
    held: collections.deque[tuple[float, bytes]] = collections.deque()
    print("ready", flush=True)
    while True:
        now = time.monotonic()
        while held and held[0][0] <= now:
            with contextlib.suppress(OSError):  # the kernel refused it: a drop
                os.write(fd, held.popleft()[1])
        timeout = max(0.0, held[0][0] - now) if held else None
        readable, _, _ = select.select([fd, sys.stdin], [], [], timeout)
        if sys.stdin in readable and not os.read(sys.stdin.fileno(), 1):
            return
        if fd not in readable:
            continue
        while True:
            try:
                packet = os.read(fd, 65536)
            except BlockingIOError:
                break
            if len(held) < max_held:
                held.append((time.monotonic() + delay_s, packet))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "delay-line":
        sys.exit("usage: python -m tests.chaos.netns delay-line DEV DELAY_MS")
    run_delay_line(sys.argv[2], float(sys.argv[3]))
