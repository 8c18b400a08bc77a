"""`tideserve bench`: a trace-replay load generator for any OpenAI-compatible endpoint.

A run flows through these modules in order: ``traces`` (load a trace file or short name) ->
``transforms`` (time/rate/length scaling, synthetic arrivals) -> ``prompts`` (exact-length
prompts) -> ``runner`` (open-loop replay over ``client``, with ``cost`` and ``progress`` beside
it; ``goodput`` repeats it to search a rate) -> ``metrics`` (per-request values, summary) ->
``report`` and ``plots`` (files, tables, PNGs). ``benchmark`` ties them together for ``cli``;
``fake_server`` is a controllable stand-in server for tests. Output schema: ``SCHEMA.md``.
"""
