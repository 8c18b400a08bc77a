"""CURVE on the internal ZMQ sockets, with keys made in a temporary directory.

What an operator notices: a worker holding the cluster's client key registers with a CURVE
router; one with another key, or with no CURVE at all, never does; a CURVE KV receiver takes
frames (and its acks reach the sender) from an authorized sender only; a CURVE socket whose
context runs no authenticator admits no one; `tideserve keys generate` writes the files
(secrets 0600) and will not overwrite them; a missing or incomplete key directory is a clear
error. Waits are bounded (~1-2 s).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import stat
import time

import pytest
import zmq
import zmq.auth

from kv_transfer import KVBeginEvent, make_receiver, make_sender
from router.cluster import Cluster
from tideserve.cli import main
from tideserve.launcher import free_port
from tideserve.protocol import PROTOCOL_VERSION, Hello, KVBegin, Params, TensorMeta
from tideserve.security import (
    CurveKeys,
    generate_keys,
    is_loopback,
    load_curve_keys,
    start_authenticator,
    warn_if_exposed,
    zmq_host,
)
from tideserve.worker import RouterLink

WAIT_S = 1.0


@pytest.fixture
def keys(tmp_path) -> CurveKeys:
    generate_keys(tmp_path / "keys", names=("alice",))
    return CurveKeys.load(tmp_path / "keys")


@pytest.fixture
def stranger(tmp_path, keys) -> CurveKeys:
    """The cluster's server key, but a client key nobody authorized."""
    generate_keys(tmp_path / "other")
    other = CurveKeys.load(tmp_path / "other")
    return dataclasses.replace(
        keys, client_public=other.client_public, client_secret=other.client_secret
    )


def named_client(keys: CurveKeys, key_dir, name: str) -> CurveKeys:
    public, secret = zmq.auth.load_certificate(key_dir / "clients" / f"{name}.key_secret")
    return dataclasses.replace(keys, client_public=public, client_secret=secret)


@pytest.fixture
def ctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


# -- the router's worker socket ------------------------------------------------------------------


def hello(wid: str) -> Hello:
    return Hello(PROTOCOL_VERSION, wid, "colocated", "127.0.0.1", "", "tiny", 100, 16, 64, "cpu", 1)


async def try_join(cluster: Cluster, wid: str, curve: CurveKeys | None) -> bool:
    """Whether a RouterLink with `curve` completes Hello/Welcome within WAIT_S."""
    ctx = zmq.Context()
    link = RouterLink(ctx, cluster.address, wid, curve)
    link.sock.setsockopt(zmq.LINGER, 0)
    try:
        await asyncio.to_thread(link.handshake, hello(wid), WAIT_S)
        return True
    except RuntimeError:
        return False
    finally:
        ctx.destroy(linger=0)


async def test_only_authorized_workers_join_a_curve_router(tmp_path, keys, stranger):
    address = f"tcp://127.0.0.1:{free_port()}"
    cluster = Cluster(
        address=address,
        heartbeat_timeout_s=5.0,
        max_redispatch=2,
        kv_transports=("tcp",),
        curve=keys,
    )
    await cluster.start()
    try:
        assert cluster.sock.getsockopt(zmq.CURVE_SERVER) == 1
        assert await try_join(cluster, "w-ok", keys)
        assert await try_join(cluster, "w-alice", named_client(keys, tmp_path / "keys", "alice"))
        assert not await try_join(cluster, "w-stranger", stranger)
        assert not await try_join(cluster, "w-plain", None)
        await asyncio.sleep(0.2)
        assert set(cluster.workers) == {"w-ok", "w-alice"}
    finally:
        await cluster.close()


# -- KV transfer ---------------------------------------------------------------------------------


def kv_begin(rid: str, reply: str) -> KVBegin:
    return KVBegin(
        rid,
        "prefill-0",
        reply,
        [1, 2, 3],
        [],
        3,
        Params(8),
        0,
        1,
        TensorMeta("float32", (2, 1, 3, 4)),
    )


def first_begin(receiver, wait_s: float) -> KVBeginEvent | None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        for ev in receiver.poll():
            if isinstance(ev, KVBeginEvent):
                return ev
        time.sleep(0.02)
    return None


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_kv_flows_between_authorized_workers(ctx, keys, transport):
    auth = start_authenticator(ctx, keys)
    receiver = make_receiver(transport, ctx, timeout_s=2.0, curve=keys)
    sender = make_sender(
        transport, ctx, timeout_s=2.0, curve=keys, shm_prefix=f"tscurve{os.getpid()}_"
    )
    try:
        assert receiver.link.inbox.getsockopt(zmq.CURVE_SERVER) == 1
        assert sender.link.inbox.getsockopt(zmq.CURVE_SERVER) == 1
        sender.begin(receiver.address, kv_begin("r1", sender.reply_address))
        ev = first_begin(receiver, 2.0)
        assert ev is not None and ev.msg.request_id == "r1"
        receiver.ack("r1", False, "test refuses it")  # the ack rides the receiver's outbox
        deadline = time.monotonic() + 2.0
        acks = []
        while not acks and time.monotonic() < deadline:
            acks = sender.poll_acks()
            time.sleep(0.02)
        assert [(a.request_id, a.ok) for a in acks] == [("r1", False)]
    finally:
        sender.close()
        receiver.close()
        auth.stop()


@pytest.mark.parametrize("who", ["stranger", "plaintext"])
def test_kv_receiver_ignores_unauthorized_senders(ctx, keys, stranger, who):
    auth = start_authenticator(ctx, keys)
    receiver = make_receiver("tcp", ctx, timeout_s=2.0, curve=keys)
    other = zmq.Context()  # a process of its own
    sender = make_sender("tcp", other, curve=stranger if who == "stranger" else None)
    try:
        sender.begin(receiver.address, kv_begin("r1", sender.reply_address))
        assert first_begin(receiver, WAIT_S) is None
    finally:
        sender.link.linger_ms = 0
        sender.close()
        other.destroy(linger=0)
        receiver.close()
        auth.stop()


def test_curve_socket_without_an_authenticator_admits_no_one(ctx, keys):
    receiver = make_receiver("tcp", ctx, curve=keys)  # no start_authenticator(ctx, ...)
    sender = make_sender("tcp", ctx, curve=keys)
    try:
        sender.begin(receiver.address, kv_begin("r1", sender.reply_address))
        assert first_begin(receiver, WAIT_S) is None
    finally:
        sender.link.linger_ms = 0
        sender.close()
        receiver.close()


# -- keys on disk --------------------------------------------------------------------------------


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_keys_generate_cli_writes_and_refuses_to_overwrite(tmp_path, capsys):
    d = tmp_path / "k"
    assert main(["keys", "generate", str(d), "--name", "bob"]) == 0
    names = ["server.key", "server.key_secret", "client.key", "client.key_secret"]
    for name in names:
        assert (d / name).is_file()
    for path in [d / "server.key_secret", d / "client.key_secret", d / "clients/bob.key_secret"]:
        assert mode(path) == 0o600
    assert sorted(p.name for p in (d / "authorized").iterdir()) == ["bob.key", "client.key"]
    assert (d / "authorized/client.key").read_bytes() == (d / "client.key").read_bytes()
    assert not list(d.glob(".keys-*"))  # the staging directory is gone
    before = (d / "server.key_secret").read_bytes()
    capsys.readouterr()

    assert main(["keys", "generate", str(d)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (d / "server.key_secret").read_bytes() == before

    assert main(["keys", "generate", str(d), "--force"]) == 0
    assert (d / "server.key_secret").read_bytes() != before
    assert [p.name for p in (d / "authorized").iterdir()] == ["client.key"]  # bob is revoked
    assert not list((d / "clients").iterdir())
    assert main(["keys", "generate", str(tmp_path / "x"), "--name", "../evil"]) == 2
    keys = CurveKeys.load(d)
    assert keys.server_secret.decode() not in repr(keys)


def test_missing_or_incomplete_keys_are_clear_errors(tmp_path, keys):
    with pytest.raises(ValueError, match=r"does not exist.*tideserve keys generate"):
        CurveKeys.load(tmp_path / "nope")
    assert load_curve_keys("") is None
    d = tmp_path / "keys"
    (d / "client.key_secret").unlink()
    with pytest.raises(ValueError, match=r"client\.key_secret is missing"):
        CurveKeys.load(d)
    generate_keys(d, force=True)
    for f in (d / "authorized").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match="no client public keys"):
        CurveKeys.load(d)


def test_router_config_with_missing_keys_fails_before_serving(tmp_path):
    from router.app import build
    from router.config import RouterConfig
    from tests.factories import make_tiny_tokenizer

    tok = make_tiny_tokenizer(tmp_path / "tok")
    with pytest.raises(ValueError, match="does not exist"):
        build(RouterConfig(model_path=str(tok), curve_keys=str(tmp_path / "nope")))


def test_binding_beyond_loopback_without_protection_warns(caplog):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("*") and not is_loopback("10.1.2.3")
    assert zmq_host("tcp://127.0.0.1:7100") == "127.0.0.1"
    assert zmq_host("tcp://*:7100") == "*" and zmq_host("tcp://[::1]:7100") == "[::1]"
    caplog.set_level(logging.WARNING)
    warn_if_exposed("the worker socket", "127.0.0.1", False, "CURVE")
    warn_if_exposed("the worker socket", "0.0.0.0", True, "CURVE")
    assert not caplog.records
    warn_if_exposed("the worker socket", "0.0.0.0", False, "CURVE")
    assert "without CURVE" in caplog.text
