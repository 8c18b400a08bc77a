"""A worker the router dropped (a partition, a stall) and asks to Rejoin, once per heartbeat
it heard meanwhile: it drops its requests and says Hello once, not once per ask, so asks that
were already on their way cannot drop the requests it is given after its Welcome."""

from __future__ import annotations

import time

import zmq

from tideserve.protocol import Rejoin, Welcome
from tideserve.worker import WorkerConfig, WorkerLoop


class FakeLink:
    def __init__(self, ctx: zmq.Context) -> None:
        self.sock = ctx.socket(zmq.DEALER)  # only polled, never connected
        self.hello = "hello"
        self.inbox: list = []
        self.sent: list = []

    def recv_all(self) -> list:
        out, self.inbox = self.inbox, []
        return out

    def send(self, msg) -> None:
        self.sent.append(msg)


def _loop(connect_timeout_s: float = 30.0):
    ctx = zmq.Context()
    link = FakeLink(ctx)
    drops = []
    loop = WorkerLoop(
        WorkerConfig("decode", connect_timeout_s=connect_timeout_s, heartbeat_interval_s=60),
        link,
        {},
        step=lambda: False,
        stats=lambda: "heartbeat",
        drop_all=lambda: drops.append(len(link.sent)),
    )

    def deliver(*msgs) -> None:
        link.inbox += msgs
        loop.step = lambda: setattr(loop, "stopping", True) or False  # one turn of the loop
        loop.stopping = False
        loop.run()

    return ctx, link, drops, deliver


def test_asks_queued_while_dropped_make_one_rejoin():
    ctx, link, drops, deliver = _loop()
    try:
        deliver(*[Rejoin("dropped")] * 5)  # five heartbeats heard while it was dropped
        assert len(drops) == 1 and link.sent.count("hello") == 1
        deliver(Rejoin("dropped"))  # sent before the router had our Hello: an echo
        assert len(drops) == 1 and link.sent.count("hello") == 1
        deliver(Welcome(True))
        deliver(Rejoin("dropped again"))  # after the Welcome: a new drop
        assert len(drops) == 2 and link.sent.count("hello") == 2
    finally:
        link.sock.close(0)
        ctx.term()


def test_a_hello_with_no_welcome_is_said_again_when_asked_later():
    ctx, link, drops, deliver = _loop(connect_timeout_s=0.05)
    try:
        deliver(Rejoin("dropped"))
        time.sleep(0.1)  # the Hello was lost (a broken connection): no Welcome
        deliver(Rejoin("dropped"))
        assert len(drops) == 2 and link.sent.count("hello") == 2
    finally:
        link.sock.close(0)
        ctx.term()
