"""Request traces for `tideserve bench`: read a trace file, or find one by its short name.

Lifecycle of a trace:

1. ``resolve_trace(name_or_path)`` turns ``--trace`` into a file: a path as given, or a short
   name (``azure-conv``, ``azure-code``, ``mooncake-conv``, ``mooncake-synthetic``) looked up in
   the shared traces folder (``$TIDESERVE_TRACES_DIR``, else ``../shared/traces`` beside the
   repository) and, failing that, in the small attributed samples in ``bench/data/``.
2. ``load_trace(path)`` tells the format from the CSV header or the first JSON object, parses
   every line into a ``TraceRequest`` and raises ``TraceError`` naming the file and line of the
   first bad one. Arrivals are sorted and shifted so the first request arrives at 0 s.
3. ``transforms.py`` reshapes the list; the runner sends each request at its ``arrival_s``.

Formats (the column or key names decide):

- Azure LLM inference 2023 CSV: ``TIMESTAMP`` (UTC datetime), ``ContextTokens``,
  ``GeneratedTokens``.
- BurstGPT CSV: ``Timestamp`` (seconds), ``Request tokens``, ``Response tokens`` (the other
  columns, ``Model``, ``Total tokens``, ``Log Type``, are ignored).
- Mooncake JSONL: ``timestamp`` (ms), ``input_length``, ``output_length``. Its timestamps are
  rounded to ~3 s steps, so the requests sharing one timestamp are spread evenly over the step.
- Generic CSV or JSONL: ``timestamp`` (seconds), ``input_tokens``, ``output_tokens``; the Vidur
  names ``arrived_at``, ``num_prefill_tokens``, ``num_decode_tokens`` are read the same way.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
REPO_ROOT = Path(__file__).resolve().parents[2]

# short name -> (path inside the shared traces folder, sample file in DATA_DIR or None)
SHORT_NAMES: dict[str, tuple[str, str | None]] = {
    "azure-conv": ("azure2023/AzureLLMInferenceTrace_conv.csv", "azure_conv_2023_head2000.csv"),
    "azure-code": ("azure2023/AzureLLMInferenceTrace_code.csv", "azure_code_2023_head2000.csv"),
    "mooncake-conv": ("mooncake/conversation_trace.jsonl", "mooncake_conversation_head1000.jsonl"),
    "mooncake-synthetic": ("mooncake/synthetic_trace.jsonl", None),
}


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace: when it arrives and how long its prompt and output are."""

    arrival_s: float  # seconds after the first request of the trace
    input_tokens: int  # prompt length to send
    output_tokens: int  # output length to force


class TraceError(ValueError):
    """A trace that cannot be found or read; the message names the file and line."""


def shared_traces_dir() -> Path:
    """Where the full traces live: ``$TIDESERVE_TRACES_DIR`` or ``../shared/traces``."""
    env = os.environ.get("TIDESERVE_TRACES_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "traces"


def resolve_trace(name_or_path: str, shared_dir: Path | None = None) -> Path:
    """The file that ``--trace NAME|FILE`` means (see the module docstring)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if name_or_path not in SHORT_NAMES:
        names = ", ".join(SHORT_NAMES)
        raise TraceError(f"trace {name_or_path!r} is neither a file nor a known name ({names})")
    shared_rel, sample = SHORT_NAMES[name_or_path]
    full = (shared_dir or shared_traces_dir()) / shared_rel
    if full.is_file():
        return full
    if sample is not None and (DATA_DIR / sample).is_file():
        return DATA_DIR / sample
    raise TraceError(f"trace {name_or_path!r}: {full} does not exist and no sample ships with it")


def load_trace(path: str | Path) -> list[TraceRequest]:
    """Parse a trace file of any supported format, sorted by arrival, first arrival at 0 s."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace file {path} does not exist")
    try:
        with path.open(encoding="utf-8-sig") as f:
            head = f.read(64).lstrip()[:1]
        rows = _jsonl_rows(path) if head == "{" else _csv_rows(path)
        first = next(rows, None)
        if first is None:
            raise TraceError(f"{path}: the trace holds no requests")
        line, record = first
        parse, spread_ties = _pick_format(path, line, record)
        parsed = [_parse_line(path, line, record, parse)]
        parsed += [_parse_line(path, n, rec, parse) for n, rec in rows]
    except UnicodeDecodeError as e:
        raise TraceError(f"{path}: not a UTF-8 text file ({e.reason})") from None
    except csv.Error as e:
        raise TraceError(f"{path}: not a readable CSV file ({e})") from None
    parsed.sort(key=lambda r: r.arrival_s)
    if spread_ties:
        parsed = _spread_ties(parsed)
    t0 = parsed[0].arrival_s
    return [TraceRequest(r.arrival_s - t0, r.input_tokens, r.output_tokens) for r in parsed]


# -- reading lines ------------------------------------------------------------------------------


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise TraceError(
                    f"{path}:{reader.line_num}: expected {len(header)} columns "
                    f"({','.join(header)}), got {len(row)}"
                )
            yield reader.line_num, dict(zip(header, row))


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8-sig") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except ValueError as e:
                raise TraceError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise TraceError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj


# -- formats ------------------------------------------------------------------------------------

Parser = Callable[[dict], TraceRequest]


def _pick_format(path: Path, line: int, record: dict) -> tuple[Parser, bool]:
    """The parser for this file's format, and whether to spread requests with equal times."""
    keys = set(record)
    if {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= keys:
        return _parse_azure, False
    if {"Timestamp", "Request tokens", "Response tokens"} <= keys:
        return _fields("Timestamp", "Request tokens", "Response tokens", 1.0), False
    if {"timestamp", "input_length", "output_length"} <= keys:
        return _fields("timestamp", "input_length", "output_length", 1e-3), True
    if {"timestamp", "input_tokens", "output_tokens"} <= keys:
        return _fields("timestamp", "input_tokens", "output_tokens", 1.0), False
    if {"arrived_at", "num_prefill_tokens", "num_decode_tokens"} <= keys:
        return _fields("arrived_at", "num_prefill_tokens", "num_decode_tokens", 1.0), False
    raise TraceError(
        f"{path}:{line}: unknown trace format with fields {sorted(keys)}; expected Azure "
        "(TIMESTAMP,ContextTokens,GeneratedTokens), BurstGPT (Timestamp,Request tokens,"
        "Response tokens), Mooncake (timestamp,input_length,output_length) or generic "
        "(timestamp,input_tokens,output_tokens)"
    )


def _parse_line(path: Path, line: int, record: dict, parse: Parser) -> TraceRequest:
    try:
        return parse(record)
    except (ValueError, TypeError) as e:
        raise TraceError(f"{path}:{line}: {e}") from None


def _parse_azure(record: dict) -> TraceRequest:
    raw = str(record["TIMESTAMP"]).strip()
    try:
        t = datetime.datetime.fromisoformat(raw[:26])  # 7 fractional digits; keep 6
    except ValueError:
        raise ValueError(f"TIMESTAMP {raw!r} is not a 'YYYY-MM-DD HH:MM:SS.fff' time") from None
    return TraceRequest(
        t.replace(tzinfo=datetime.UTC).timestamp(),
        _count(record, "ContextTokens"),
        _count(record, "GeneratedTokens"),
    )


def _fields(time_key: str, input_key: str, output_key: str, to_seconds: float) -> Parser:
    def parse(record: dict) -> TraceRequest:
        return TraceRequest(
            _number(record, time_key) * to_seconds,
            _count(record, input_key),
            _count(record, output_key),
        )

    return parse


def _number(record: dict, key: str) -> float:
    if key not in record:
        raise ValueError(f"{key} is missing")
    value = record[key]
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} {value!r} is not a number") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise ValueError(f"{key} {value!r} is not a finite number")
    return x


def _count(record: dict, key: str) -> int:
    x = _number(record, key)
    if x < 0 or x != int(x):
        raise ValueError(f"{key} {record[key]!r} is not a token count (an integer >= 0)")
    return int(x)


def _spread_ties(reqs: list[TraceRequest]) -> list[TraceRequest]:
    """Spread each run of equal arrival times evenly up to the next distinct time."""
    times = sorted({r.arrival_s for r in reqs})
    gaps = [b - a for a, b in zip(times, times[1:])]
    last_step = statistics.median(gaps) if gaps else 0.0
    next_time = dict(zip(times, [*times[1:], times[-1] + last_step]))
    out: list[TraceRequest] = []
    i = 0
    while i < len(reqs):
        j = i
        while j < len(reqs) and reqs[j].arrival_s == reqs[i].arrival_s:
            j += 1
        t = reqs[i].arrival_s
        step = (next_time[t] - t) / (j - i)
        out += [
            TraceRequest(t + k * step, r.input_tokens, r.output_tokens)
            for k, r in enumerate(reqs[i:j])
        ]
        i = j
    return out
