"""What a worker process does in each role, and the host that runs one role after another.

`prefill.PrefillWorker` (FuDG prefill: first token + KV streaming), `decode.DecodeWorker`
(FuDG decode, or `colocated`: the whole request) and `host.run_worker`, the process: one engine
(weights loaded once), one link to the router, the KV endpoints each role needs (made when a
role first needs them), and a loop that switches roles when a drained worker is told to. The
`prefill_worker` and `decode_worker` services start a host in their role.
"""
