"""What layer-by-layer KV streaming adds to a prefill step, without CPU sharing in the way.

    python benchmarks/kv_streaming_overhead.py [--dtype bfloat16] [--prompt 128] [--repeats 8]

One process runs the prefill engine and a KV receiver (shm or tcp): each repeat times a plain
prefill step, then the same prompt's prefill step with every layer exported and sent as soon
as it is computed (the prefill worker's path). The difference is the TTFT cost of
disaggregation when each worker has its own device; on a 2-core CPU the workers also share
the cores, which benchmarks/serving.py latency shows.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import zmq

from kv_transfer import KVDoneEvent, make_receiver, make_sender
from tideserve.config import EngineConfig
from tideserve.engine.default_model import prepare_default_model
from tideserve.engine.engine import LLMEngine
from tideserve.engine.sequence import SamplingParams
from tideserve.protocol import KVBegin, Params
from tideserve.tensor_frames import meta_of


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--transport", default="shm", choices=["shm", "tcp"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = EngineConfig(model=str(prepare_default_model()), dtype=args.dtype)
    engine = LLMEngine.from_config(cfg)
    ctx = zmq.Context()
    receiver = make_receiver(args.transport, ctx)
    sender = make_sender(args.transport, ctx)
    greedy = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    rng = random.Random(0)
    plain, streamed = [], []
    try:
        for i in range(args.repeats + 1):
            prompt = [rng.randrange(100, 40000) for _ in range(args.prompt)]

            def hook(rid, layer, kv, prompt=prompt):
                if layer == 0:
                    begin = KVBegin(
                        rid,
                        "bench",
                        sender.reply_address,
                        prompt,
                        [],
                        kv.shape[2],
                        Params(max_tokens=8),
                        0,
                        engine.model_config.num_layers,
                        meta_of(kv),
                    )
                    sender.begin(receiver.address, begin)
                sender.send_layer(rid, layer, kv)

            engine.add_request(f"a{i}", prompt, greedy, hold_kv=True)
            t0 = time.perf_counter()
            engine.step()
            t1 = time.perf_counter()
            engine.add_request(f"b{i}", prompt, greedy, hold_kv=True)
            engine.step(on_kv_layer=hook)
            t2 = time.perf_counter()
            sender.done(f"b{i}", [1])
            engine.release(f"a{i}")
            engine.release(f"b{i}")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if any(isinstance(ev, KVDoneEvent) for ev in receiver.poll()):
                    receiver.ack(f"b{i}", True)
                    break
                time.sleep(0.001)
            sender.poll_acks()
            if i:  # the first repeat warms up
                plain.append(t1 - t0)
                streamed.append(t2 - t1)
    finally:
        sender.close()
        receiver.close()
        ctx.destroy(linger=0)
    p, s = statistics.median(plain), statistics.median(streamed)
    print(
        f"prefill step, {args.prompt}-token prompt, {args.dtype}, {args.threads} threads, "
        f"{args.transport}: plain {p * 1e3:.1f} ms, with KV streaming {s * 1e3:.1f} ms "
        f"(+{100 * (s / p - 1):.1f}%)"
    )


if __name__ == "__main__":
    main()
