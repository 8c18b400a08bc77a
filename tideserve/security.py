"""CURVE for the internal ZMQ sockets: encrypted, and only authorized processes may connect.

A key directory (made by `tideserve keys generate DIR`, with pyzmq's own certificate files):

    DIR/server.key, server.key_secret   the cluster's server identity: every socket that binds
                                        (the router's worker socket, every KV inbox)
    DIR/client.key, client.key_secret   the identity every connecting socket uses (a worker's
                                        link to the router, KV outboxes)
    DIR/authorized/*.key                the client public keys allowed to connect
    DIR/clients/NAME.key_secret         extra client identities (`--name NAME`), authorized too

A process's life with CURVE: `load_curve_keys(dir)` -> `start_authenticator(ctx, keys)` (a
ZAP handler for the context that admits exactly the keys in authorized/) -> `make_server` on
each socket before it binds, `make_client` on each before it connects -> `authenticator.stop()`
before the context is destroyed. Server sockets enforce their ZAP domain, so a context without
a running authenticator refuses every client instead of admitting any.

NOTE: every process holds the server secret (workers bind KV inboxes too), so a host that has
the directory can act as a server; revoking a client key (delete it from authorized/ on every
host, restart) stops it connecting, not impersonating a server.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.asyncio
import zmq.auth

log = logging.getLogger(__name__)

ZAP_DOMAIN = "tideserve"
SERVER = "server"
CLIENT = "client"
AUTHORIZED = "authorized"
CLIENTS = "clients"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class CurveKeys:
    """One process's CURVE keys (z85 bytes), loaded from a key directory."""

    server_public: bytes
    server_secret: bytes = field(repr=False)
    client_public: bytes
    client_secret: bytes = field(repr=False)
    authorized_dir: Path

    @classmethod
    def load(cls, key_dir: str | os.PathLike) -> CurveKeys:
        """Reads DIR/server.key_secret, DIR/client.key_secret and DIR/authorized/; raises
        ValueError naming what is missing or unreadable."""
        check_curve_support()
        d = Path(key_dir)
        hint = f"make one with `tideserve keys generate {d}`"
        if not d.is_dir():
            raise ValueError(f"the CURVE key directory {d} does not exist; {hint}")
        server_public, server_secret = _load_secret(d / f"{SERVER}.key_secret", hint)
        client_public, client_secret = _load_secret(d / f"{CLIENT}.key_secret", hint)
        authorized = d / AUTHORIZED
        if not any(authorized.glob("*.key")):
            raise ValueError(f"{authorized} holds no client public keys (*.key); {hint}")
        return cls(server_public, server_secret, client_public, client_secret, authorized)


def load_curve_keys(key_dir: str) -> CurveKeys | None:
    """The keys in `key_dir`, or None (CURVE off) when it is ""."""
    return CurveKeys.load(key_dir) if key_dir else None


def _load_secret(path: Path, hint: str) -> tuple[bytes, bytes]:
    if not path.is_file():
        raise ValueError(f"the CURVE key file {path} is missing; {hint}")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the CURVE key file {path}: {e}") from None
    if not secret:
        raise ValueError(f"{path} holds no secret key; {hint}")
    if path.stat().st_mode & 0o077:
        log.warning("%s is readable by other users; chmod 600 it", path)
    return public, secret


def check_curve_support() -> None:
    if not zmq.has("curve"):
        raise RuntimeError(
            f"this libzmq ({zmq.zmq_version()}) was built without CURVE; install a pyzmq wheel "
            "(it bundles a libzmq with CURVE) or rebuild libzmq with libsodium"
        )
    if zmq.zmq_version_info() < (4, 3):
        raise RuntimeError(f"CURVE needs libzmq >= 4.3, this is {zmq.zmq_version()}")


def generate_keys(
    key_dir: str | os.PathLike, names: tuple[str, ...] = (), force: bool = False
) -> list[Path]:
    """Writes a key directory (see the module docstring) and returns the files written. Refuses
    to replace existing keys unless `force`, which also drops every other key in authorized/
    and clients/. Secret files are mode 0600."""
    check_curve_support()
    d = Path(key_dir)
    for name in names:
        if not _NAME.fullmatch(name) or name in (SERVER, CLIENT):
            raise ValueError(
                f"client name {name!r}: use letters, digits, '.', '_' or '-' (not server/client)"
            )
    identities = [(SERVER, d), (CLIENT, d)] + [(n, d / CLIENTS) for n in dict.fromkeys(names)]
    targets = [
        where / f"{name}{ext}" for name, where in identities for ext in (".key", ".key_secret")
    ]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} already exists; pass --force to replace the keys")
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    (d / AUTHORIZED).mkdir(mode=0o755, exist_ok=True)
    if force:  # a rotation: no key of the old set stays authorized
        for old in [*(d / AUTHORIZED).glob("*.key"), *(d / CLIENTS).glob("*.key*")]:
            old.unlink()
    if names:
        (d / CLIENTS).mkdir(mode=0o700, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(dir=d, prefix=".keys-") as tmp:  # mode 0700
        for name, where in identities:
            public, secret = zmq.auth.create_certificates(tmp, name)
            os.chmod(secret, 0o600)
            os.chmod(public, 0o644)
            if name != SERVER:
                authorized = d / AUTHORIZED / f"{name}.key"
                authorized.write_bytes(Path(public).read_bytes())
                os.chmod(authorized, 0o644)
                written.append(authorized)
            for src in (public, secret):
                dst = where / Path(src).name
                os.replace(src, dst)
                written.append(dst)
    return sorted(written)


def make_server(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Makes `sock` a CURVE server (call before bind); clients are checked by the context's
    authenticator, and refused when it has none."""
    sock.curve_server = True
    sock.curve_publickey = keys.server_public
    sock.curve_secretkey = keys.server_secret
    sock.zap_domain = ZAP_DOMAIN.encode()
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)


def make_client(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Makes `sock` a CURVE client of the cluster's server key (call before connect)."""
    sock.curve_publickey = keys.client_public
    sock.curve_secretkey = keys.client_secret
    sock.curve_serverkey = keys.server_public


def start_authenticator(ctx: zmq.Context, keys: CurveKeys):
    """Starts the ZAP handler that admits exactly the keys in authorized/ to the CURVE server
    sockets of `ctx`; an asyncio context gets one on the running loop, a sync one a thread.
    Call `.stop()` on the result before the context is destroyed."""
    if isinstance(ctx, zmq.asyncio.Context):
        from zmq.auth.asyncio import AsyncioAuthenticator

        auth = AsyncioAuthenticator(ctx)
    else:
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain=ZAP_DOMAIN, location=str(keys.authorized_dir))
    num = len(auth.certs.get(ZAP_DOMAIN, {}))
    log.info("CURVE on: %d authorized client key(s) in %s", num, keys.authorized_dir)
    return auth


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a socket on this machine ("" and wildcards do not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def zmq_host(address: str) -> str:
    """The host of a ZMQ tcp endpoint: tcp://H:P -> H (ipc://, inproc:// -> "localhost")."""
    if not address.startswith("tcp://"):
        return "localhost"
    return address[len("tcp://") :].rsplit(":", 1)[0]


def warn_if_exposed(what: str, host: str, is_protected: bool, remedy: str) -> None:
    """Logs a warning when `what` binds beyond loopback without protection."""
    if not is_protected and not is_loopback(host):
        log.warning(
            "%s listens on %s without %s; anyone who can reach it may use it", what, host, remedy
        )
