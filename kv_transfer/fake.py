"""The fake transport: an in-process link for tests, same interface as tcp and shm.

Each endpoint registers an inbox (a deque) under a made-up address ("fake://N") in a
module-level table; sending copies every frame into bytes and appends it to the peer's inbox,
as a wire would, so the real sender and receiver run unchanged on both ends (encoding,
validation, acks, timeouts). Single-threaded; no sockets to poll (`sockets` is empty).
"""

from __future__ import annotations

import itertools
from collections import deque

from kv_transfer.base import KVTransferError

_inboxes: dict[str, deque] = {}
_ids = itertools.count()


class InProcLink:
    def __init__(self) -> None:
        self.address = f"fake://{next(_ids)}"
        self.sockets: list = []
        self._inbox: deque = deque()
        _inboxes[self.address] = self._inbox

    def send(self, address: str, frames: list) -> None:
        inbox = _inboxes.get(address)
        if inbox is None:
            raise KVTransferError(f"no in-process KV endpoint at {address!r}")
        inbox.append([bytearray(f) for f in frames])  # writable, as ZMQ frames are

    def recv(self, max_messages: int) -> list[list]:
        n = min(max_messages, len(self._inbox))
        return [self._inbox.popleft() for _ in range(n)]

    def drop(self, address: str) -> None:
        pass

    def close(self) -> None:
        _inboxes.pop(self.address, None)
        self._inbox.clear()
