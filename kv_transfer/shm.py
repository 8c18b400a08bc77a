"""The shm transport (same host): KV bytes in POSIX shared memory, notices over the tcp link.

Lifecycle of a segment: at `begin` the sender takes a segment sized for every layer (num_layers
x layer bytes) from its idle pool, or creates one; `send_layer` copies the layer to
`layer * layer_bytes` and sends a KVLayer notice (shm_name, shm_offset) over the same ZMQ
channel as tcp. The receiver maps the segment by name on the request's first notice and hands
out tensor views over it. The transfer settles: with an ok ack the segment goes back to the
sender's pool (the receiver has copied everything out); refused, aborted, expired, it is
unlinked at once. The SENDER alone unlinks, and `close` unlinks the pool too. (If the sender
process dies, Python's resource tracker, which the creator registers with, unlinks its
segments.) Nothing else is ever left in /dev/shm.

NOTE: the receiver maps segments with `shm_open` + `mmap` directly rather than `SharedMemory`:
that never registers them with the receiver's resource tracker (which would unlink or warn
about segments it does not own), and a mapping lives exactly as long as the last tensor view
over it, so handing out views never makes closing fail.
"""

from __future__ import annotations

import _posixshmem
import itertools
import logging
import mmap
import os
import re
import secrets
from collections import OrderedDict
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import torch

from kv_transfer.base import KVBackpressure, transfer_nbytes
from tideserve.protocol import KVBegin, KVLayer, ProtocolError, TensorMeta, meta_nbytes
from tideserve.tensor_frames import from_frame

log = logging.getLogger(__name__)

SHM_PREFIX = "tskv_"  # every segment name starts with it (find leftovers: ls /dev/shm/tskv_*)
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_counter = itertools.count()


class Segment:
    """One shared-memory segment and a flat byte view over it (kept mapped while it lives)."""

    def __init__(self, name: str, nbytes: int) -> None:
        self.shm = SharedMemory(name=name, create=True, size=nbytes)
        self.name = self.shm.name
        self.nbytes = nbytes
        self.flat = torch.frombuffer(self.shm.buf, dtype=torch.uint8)  # [nbytes]

    def destroy(self) -> None:
        self.flat = None  # the only view over shm.buf: close() needs it gone
        try:
            self.shm.close()
        except BufferError:
            log.warning("shm %s still has views; unlinked anyway", self.name)
        try:
            self.shm.unlink()
        except FileNotFoundError:
            pass


class ShmSegments:
    """Sender side: a segment per transfer, from begin until it settles.

    A segment that comes back with an ok ack (the receiver has copied everything out) joins an
    idle pool, up to `pool_bytes`, and serves a later transfer: a fresh tmpfs segment costs a
    page fault per 4 KiB on first write, which costs more than the copy itself. A segment of a
    transfer that was refused, aborted or timed out is unlinked at once (its receiver may still
    look at it). `close` unlinks everything. `pool_bytes=0` unlinks every segment on release.
    """

    def __init__(self, prefix: str = SHM_PREFIX, pool_bytes: int = 256 << 20) -> None:
        if not _NAME.fullmatch(prefix + "x"):
            raise ValueError(f"shm prefix {prefix!r} must be letters, digits, '_', '.', '-'")
        if pool_bytes < 0:
            raise ValueError(f"pool_bytes must be >= 0, got {pool_bytes}")
        self.prefix = prefix
        self.pool_bytes = pool_bytes
        self._busy: dict[str, Segment] = {}  # request id -> its segment
        self._idle: list[Segment] = []  # oldest first
        remove_orphans(prefix)

    def open(self, msg: KVBegin) -> None:
        nbytes = transfer_nbytes(msg)
        if nbytes == 0:
            return  # empty layers travel inline
        fits = [s for s in self._idle if s.nbytes >= nbytes]
        if fits:
            seg = min(fits, key=lambda s: s.nbytes)
            self._idle.remove(seg)
        else:
            _check_room(msg.request_id, nbytes)
            name = f"{self.prefix}{os.getpid()}_{next(_counter)}_{secrets.token_hex(3)}"
            seg = Segment(name, _round_up(nbytes))
        self._busy[msg.request_id] = seg
        log.debug("request %s: shm segment %s for %d bytes", msg.request_id, seg.name, nbytes)

    def layer(
        self, msg: KVBegin, layer: int, meta: TensorMeta, array: np.ndarray
    ) -> tuple[KVLayer, list[np.ndarray]]:
        seg = self._busy.get(msg.request_id)
        n = array.nbytes
        if seg is None or n == 0:
            return KVLayer(msg.request_id, layer, meta), [array.reshape(-1)]
        offset = layer * n
        seg.flat[offset : offset + n].copy_(torch.from_numpy(array.reshape(-1).view(np.uint8)))
        return KVLayer(msg.request_id, layer, meta, seg.name, offset), []

    def release(self, request_id: str, reuse: bool = False) -> None:
        seg = self._busy.pop(request_id, None)
        if seg is None:
            return
        if not reuse or seg.nbytes > self.pool_bytes:
            seg.destroy()
            return
        self._idle.append(seg)
        while sum(s.nbytes for s in self._idle) > self.pool_bytes:
            self._idle.pop(0).destroy()

    def close(self) -> None:
        for seg in [*self._busy.values(), *self._idle]:
            seg.destroy()
        self._busy.clear()
        self._idle.clear()


def remove_orphans(prefix: str = SHM_PREFIX, shm_dir: str = "/dev/shm") -> list[str]:
    """Unlinks segments left by senders that died (SIGKILL skips `close`): their names carry
    the pid of a process that no longer exists. Returns the names removed."""
    removed = []
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix) :].split("_", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            os.unlink(os.path.join(shm_dir, name))
            removed.append(name)
        except OSError:
            pass
    if removed:
        log.info("removed %d shared-memory segments of dead senders", len(removed))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _round_up(nbytes: int) -> int:
    """The next power of two from 1 MiB, so pooled segments fit varied prompt lengths. Pages
    never written cost no memory in tmpfs."""
    return max(1 << 20, 1 << (nbytes - 1).bit_length())


class Mapping:
    """A receiver's mapping of one segment, with the fd kept to see when it is unlinked."""

    def __init__(self, name: str) -> None:
        try:
            self.fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"shm segment {name} is gone: its sender freed it (aborted or timed out)"
            ) from None
        self.name = name
        self.mm = mmap.mmap(self.fd, os.fstat(self.fd).st_size)

    def is_linked(self) -> bool:
        return self.fd >= 0 and os.fstat(self.fd).st_nlink > 0

    def close(self) -> None:
        """Lets go of the segment; the memory goes when the last view over it does."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ShmAttachments:
    """Receiver side: maps segments by name and hands out views over them.

    A request's mapping is made on its first notice and dropped on release. Senders reuse
    pooled segments, and mapping one again costs a page fault per 4 KiB, so a mapping also
    stays cached (the `max_cached` most recent) while its segment is still linked; `sweep`
    drops those whose sender has unlinked them, so a cached mapping never holds memory its
    sender has given up.
    """

    def __init__(self, max_cached: int = 16) -> None:
        self.max_cached = max_cached
        self._by_request: dict[str, Mapping] = {}
        self._cache: OrderedDict[str, Mapping] = OrderedDict()  # least recently used first

    @property
    def num_mapped(self) -> int:
        return len(self._cache)

    def view(self, msg: KVLayer) -> torch.Tensor:
        """A tensor over the notice's bytes in the segment (no copy)."""
        n = meta_nbytes(msg.tensor)
        m = self._by_request.get(msg.request_id)
        if m is None:
            m = self._by_request[msg.request_id] = self._map(msg.shm_name)
        if msg.shm_name != m.name:
            raise ProtocolError(f"layer {msg.layer} is in segment {msg.shm_name}, not {m.name}")
        if msg.shm_offset < 0 or msg.shm_offset + n > len(m.mm):
            raise ProtocolError(
                f"layer {msg.layer} at [{msg.shm_offset}, +{n}) lies outside segment {m.name} "
                f"of {len(m.mm)} bytes"
            )
        return from_frame(msg.tensor, memoryview(m.mm)[msg.shm_offset : msg.shm_offset + n])

    def _map(self, name: str) -> Mapping:
        m = self._cache.pop(name, None)
        if m is None or not m.is_linked():
            if not _NAME.fullmatch(name):
                raise ProtocolError(f"bad shm segment name {name!r}")
            m = Mapping(name)
        self._cache[name] = m
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)[1].close()
        return m

    def release(self, request_id: str) -> None:
        self._by_request.pop(request_id, None)

    def sweep(self) -> None:
        for name, m in list(self._cache.items()):
            if not m.is_linked():
                m.close()
                del self._cache[name]

    def close(self) -> None:
        for m in self._cache.values():
            m.close()
        self._cache.clear()
        self._by_request.clear()


def _check_room(request_id: str, nbytes: int) -> None:
    """NOTE: tmpfs allocates pages on first write, and writing past a full /dev/shm kills the
    process with SIGBUS; refusing up front turns that into backpressure."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise KVBackpressure(
            f"request {request_id}: {nbytes} KV bytes do not fit in /dev/shm ({free} free); "
            "retry later, or give the container a larger /dev/shm (--shm-size)"
        )
