"""Malformed and hostile ZMQ messages, for fuzzing every socket tideserve reads.

`junk(rng, samples, n)` yields `n` multipart messages (lists of frames) built from real
protocol messages (`samples`: (message, tensors) pairs the target would accept): random bytes,
valid msgpack of the wrong shape, real messages truncated or with bytes flipped, unknown or
swapped tags, fields of the wrong type or value, strings that are not UTF-8, huge arrays, extra,
missing or too many frames, tensor frames of the wrong size, and a few frames past the
protocol's size limit. Everything
comes from the seeded `rng`, so a run is the same every time.
"""

from __future__ import annotations

import random

import msgspec

from tideserve.protocol import MAX_FRAMES, MAX_HEADER_BYTES, encode

_pack = msgspec.msgpack.encode
_unpack = msgspec.msgpack.decode
BOGUS_TAGS = ["", "hell0", "tokens2", "kv_layerz", "\x00", "a" * 300]
ODD_INTS = [-1, 0, 1, -(2**63), 2**63 - 1, 2**64 - 1, 2**31, -(2**31) - 1]
ODD_FLOATS = [float("nan"), float("inf"), -float("inf"), -0.0, 1e308, -1e-308]
ODD_STRINGS = ["", "\x00", "é" * 40, "x" * 10_000, "tcp://127.0.0.1:1"]


def odd_value(rng: random.Random, depth: int = 0):
    """Any msgpack value, biased to what breaks parsers: edges, NaN, empties, nesting."""
    kind = rng.randrange(10 if depth < 3 else 6)
    if kind == 0:
        return rng.choice(ODD_INTS)
    if kind == 1:
        return rng.choice(ODD_FLOATS)
    if kind == 2:
        return rng.choice(ODD_STRINGS)
    if kind == 3:
        return rng.randbytes(rng.randrange(0, 64))
    if kind == 4:
        return rng.choice([None, True, False])
    if kind == 5:
        return rng.randrange(-1000, 1000)
    if kind in (6, 7):
        return [odd_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    if kind == 8:
        return {str(rng.randrange(100)): odd_value(rng, depth + 1) for _ in range(rng.randrange(3))}
    return (odd_value(rng, depth + 1), odd_value(rng, depth + 1))


def _header(msg) -> bytes:
    return bytes(encode(msg)[0])


def _frames(msg, tensors) -> list[bytes]:
    return [bytes(f) for f in encode(msg, *tensors)]


def random_bytes(rng, samples) -> list[bytes]:
    return [rng.randbytes(rng.randrange(0, 256))]


def wrong_shape(rng, samples) -> list[bytes]:
    return [_pack(odd_value(rng))]


def truncated(rng, samples) -> list[bytes]:
    h = _header(rng.choice(samples)[0])
    return [h[: rng.randrange(0, len(h))]]


def flipped(rng, samples) -> list[bytes]:
    h = bytearray(_header(rng.choice(samples)[0]))
    for _ in range(rng.randrange(1, 4)):
        h[rng.randrange(len(h))] = rng.randrange(256)
    return [bytes(h)]


def _fields(msg) -> list:
    return list(_unpack(_header(msg)))  # [tag, field, field, ...] (array_like structs)


def wrong_tag(rng, samples) -> list[bytes]:
    fields = _fields(rng.choice(samples)[0])
    other = _fields(rng.choice(samples)[0])[0]
    fields[0] = rng.choice([*BOGUS_TAGS, other, 7, None])
    return [_pack(fields)]


def wrong_field(rng, samples) -> list[bytes]:
    """A real message with one field replaced, dropped or appended (often still decodable:
    then it is a well-formed message with a hostile value)."""
    fields = _fields(rng.choice(samples)[0])
    op = rng.randrange(4)
    if op < 2 and len(fields) > 1:
        fields[rng.randrange(1, len(fields))] = odd_value(rng)
    elif op == 2 and len(fields) > 1:
        fields.pop(rng.randrange(1, len(fields)))
    else:
        fields.append(odd_value(rng))
    return [_pack(fields)]


def bad_utf8(rng, samples) -> list[bytes]:
    """A string field whose bytes are not UTF-8."""
    fields = _fields(rng.choice(samples)[0])
    strs = [i for i, f in enumerate(fields) if isinstance(f, str)] or [0]
    fields[rng.choice(strs)] = "\x00MARK\x00"
    return [_pack(fields).replace(b"\x00MARK\x00", b"\xff\xfe\xc0\x80\xed\xa0")]


def huge_array(rng, samples) -> list[bytes]:
    fields = _fields(rng.choice(samples)[0])
    if rng.random() < 0.5:  # an array header that claims 2**32 - 1 items, then stops
        return [b"\xdd\xff\xff\xff\xff" + _pack(fields[0])]
    i = rng.randrange(1, len(fields)) if len(fields) > 1 else 0
    fields[i] = [rng.choice(ODD_INTS)] * 50_000
    return [_pack(fields)]


def frame_count(rng, samples) -> list[bytes]:
    msg, tensors = rng.choice(samples)
    frames = _frames(msg, tensors)
    op = rng.randrange(3)
    if op == 0:
        return frames + [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(1, 4))]
    if op == 1 and len(frames) > 1:
        return frames[:1]  # the tensor frame is missing
    return frames[:1] + [b""] * MAX_FRAMES  # more frames than the protocol allows


def tensor_size(rng, samples) -> list[bytes]:
    with_tensors = [s for s in samples if s[1]] or samples
    frames = _frames(*rng.choice(with_tensors))
    if len(frames) == 1:
        return frames + [rng.randbytes(16)]
    raw = frames[1]
    cut = rng.choice([0, 1, len(raw) - 1, len(raw) + 1, 2 * len(raw)])
    return [frames[0], (raw * 3)[:cut]]


MUTATORS = [
    random_bytes,
    wrong_shape,
    truncated,
    flipped,
    wrong_tag,
    wrong_field,
    wrong_field,
    bad_utf8,
    huge_array,
    frame_count,
    tensor_size,
]


def oversized(samples) -> list[list[bytes]]:
    """Frames just past the protocol's limits (expensive: send a handful)."""
    msg, tensors = samples[0]
    big = _pack(["tokens", "r", "w", [2**63 - 1] * (MAX_HEADER_BYTES // 9 + 1)])
    assert len(big) > MAX_HEADER_BYTES
    return [[big], [_header(msg) + b"\x00" * MAX_HEADER_BYTES]]


def junk(rng: random.Random, samples: list, n: int):
    """`n` malformed or hostile messages built from `samples` ((message, tensors) pairs)."""
    for _ in range(n):
        yield rng.choice(MUTATORS)(rng, samples)
