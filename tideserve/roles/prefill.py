"""The prefill worker (FuDG).

Lifecycle of a request: PrefillRequest -> the engine prefills it (chunked, batched with other
prompts; `hold_kv` keeps its blocks) -> during the step that completes the prompt, each
layer's KV goes to the decode worker's receiver as soon as that layer is computed (KVBegin at
layer 0, then KVLayer per layer) -> the first token is sampled and sent to the router at once
(TTFT does not wait for the transfer) -> KVDone carries it to the decode worker; or, if the
request already ends at its first token, KVAbort. The blocks are freed right after (the sender
holds its own copy of the data). A refused or stalled transfer becomes a retryable
RequestFailed for the router.
"""

from __future__ import annotations

import logging
import time

from kv_transfer import KVBackpressure
from tideserve.engine.engine import LLMEngine
from tideserve.engine.sequence import SamplingParams, stop_reason
from tideserve.protocol import (
    AbortRequest,
    KVBegin,
    PrefillRequest,
    RequestFailed,
    TokenChunk,
)
from tideserve.tensor_frames import meta_of
from tideserve.worker import (
    RouterLink,
    WorkerConfig,
    WorkerLoop,
    engine_stats,
    to_sampling_params,
)

log = logging.getLogger(__name__)


class PrefillWorker:
    def __init__(self, cfg: WorkerConfig, engine: LLMEngine, link: RouterLink, senders) -> None:
        self.cfg = cfg
        self.wid = cfg.resolved_id
        self.engine = engine
        self.link = link
        self.senders = senders  # transport name -> KVSender
        self.requests: dict[str, PrefillRequest] = {}
        self.streaming: dict[str, str] = {}  # KVBegin sent, no ack yet: request id -> transport
        socks = [s for snd in senders.values() for s in snd.sockets]
        handlers = {PrefillRequest: self.handle_prefill, AbortRequest: self.handle_abort}
        self.loop = WorkerLoop(
            cfg,
            link,
            handlers,
            self.step,
            self.stats,
            socks,
            self.poll_acks,
            self.drop_all,
            engine,
            lambda: engine.has_unfinished() or bool(self.streaming),
        )

    def handle_prefill(self, msg: PrefillRequest) -> None:
        if msg.kv_transport not in self.senders:
            self._fail(msg.request_id, f"unknown KV transport {msg.kv_transport!r}")
            return
        try:
            p = to_sampling_params(msg.params)
            first = SamplingParams(
                max_tokens=1,
                temperature=p.temperature,
                top_p=p.top_p,
                top_k=p.top_k,
                seed=p.seed,
                ignore_eos=True,
                logprobs=p.logprobs,
            )
            self.engine.add_request(
                msg.request_id, msg.prompt_token_ids, first, msg.priority, hold_kv=True
            )
        except (ValueError, TypeError) as e:
            self._fail(msg.request_id, str(e))
            return
        self.requests[msg.request_id] = msg

    def handle_abort(self, msg: AbortRequest) -> None:
        rid = msg.request_id
        self.requests.pop(rid, None)
        self.engine.abort(rid)
        transport = self.streaming.pop(rid, None)
        if transport is not None:  # before or after its first token: the receiver frees it too
            self.senders[transport].abort(rid, "aborted by the router")

    def drop_all(self) -> None:
        for rid in {*self.requests, *self.streaming}:
            self.handle_abort(AbortRequest(rid))

    # -- the step ------------------------------------------------------------------------------

    def step(self) -> bool:
        if not self.engine.has_unfinished():
            return False
        for out in self.engine.step(self._on_kv_layer, self.loop.heartbeat):
            self._first_token(out)
        return True

    def _on_kv_layer(self, rid: str, layer: int, kv) -> None:
        req = self.requests.get(rid)
        if req is None:
            return
        sender = self.senders[req.kv_transport]
        if layer == 0:
            begin = KVBegin(
                request_id=rid,
                src_worker_id=self.wid,
                reply_address=sender.reply_address,
                prompt_token_ids=req.prompt_token_ids,
                output_token_ids=[],
                num_kv_tokens=kv.shape[2],
                params=req.params,
                priority=req.priority,
                num_layers=self.engine.model_config.num_layers,
                layer=meta_of(kv),
            )
            try:
                sender.begin(req.decode_kv_address, begin)
            except KVBackpressure as e:
                log.warning("request %s: %s", rid, e)
                return
            self.streaming[rid] = req.kv_transport
        if rid in self.streaming:
            sender.send_layer(rid, layer, kv)

    def _first_token(self, out) -> None:
        rid = out.request_id
        req = self.requests.pop(rid, None)
        self.engine.release(rid)
        if req is None:
            return
        token = out.token_ids[0]
        p = to_sampling_params(req.params)
        n = len(req.prompt_token_ids)
        reason = stop_reason(
            p, 1, n + 1, token, self.engine.eos_token_ids, self.engine.max_model_len
        )
        self.link.send(
            TokenChunk(
                request_id=rid,
                worker_id=self.wid,
                token_ids=[token],
                finish_reason=reason.value if reason else None,
                num_prompt_tokens=n,
                logprobs=out.new_logprobs or None,
                is_first=True,
            )
        )
        sender = self.senders[req.kv_transport]
        if rid not in self.streaming:
            if reason is None:
                self._fail(rid, "the KV transfer could not start (backpressure)", retryable=True)
            return
        if reason is None:
            sender.done(rid, [token])
        else:
            self.streaming.pop(rid, None)
            sender.abort(rid, "finished at its first token")

    # -- acks ----------------------------------------------------------------------------------

    def poll_acks(self) -> None:
        now = time.monotonic()
        for sender in self.senders.values():
            for ack in sender.poll_acks():
                self.streaming.pop(ack.request_id, None)
                if not ack.ok:
                    self._fail(ack.request_id, ack.reason or "KV refused", retryable=True)
            for rid in sender.expired(now):
                self.streaming.pop(rid, None)
                self._fail(rid, "KV transfer to the decode worker timed out", retryable=True)

    def _fail(self, rid: str, message: str, retryable: bool = False) -> None:
        log.warning("request %s failed: %s", rid, message)
        self.link.send(RequestFailed(rid, self.wid, message, retryable))

    def stats(self):
        return engine_stats(self.cfg, self.engine, self.loop.state, len(self.streaming))
