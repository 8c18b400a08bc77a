"""PNG plots of bench runs (matplotlib, imported only here and only when plotting).

``plot_run`` draws a run's TTFT and TPOT CDFs and a timeline of offered rate, latency and
worker count; ``plot_compare`` overlays several runs' CDFs. Both read request rows as
``requests.jsonl`` holds them, so a fresh run and a reloaded one plot the same way. Without
matplotlib (``pip install 'tideserve[bench]'``) they raise ``PlotsUnavailable``.
"""

from __future__ import annotations

from pathlib import Path


class PlotsUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotsUnavailable(
            "matplotlib is not installed, so no plots were drawn (pip install 'tideserve[bench]')"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, values: list[float], label: str | None = None) -> None:
    xs = sorted(values)
    ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)


def _cdf_figure(plt, path: Path, runs: list[tuple[str, list[float]]], title: str, slo_ms):
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in runs:
        if values:
            _cdf(ax, values, name)
    if slo_ms is not None:
        ax.axvline(slo_ms, color="grey", linestyle="--", label=f"SLO {slo_ms:g} ms")
    ax.set_xlabel(f"{title} (ms)")
    ax.set_ylabel("share of requests")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{title} CDF")
    ax.grid(alpha=0.3)
    if len(runs) > 1 or slo_ms is not None:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _values(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if r.get(key) is not None]


def plot_run(out_dir: Path, summary: dict, rows: list[dict]) -> list[Path]:
    """``ttft_cdf.png``, ``tpot_cdf.png`` and ``timeline.png`` in ``out_dir``."""
    plt = _pyplot()
    slo = summary.get("slo") or {}
    paths = [
        _cdf_figure(
            plt,
            out_dir / "ttft_cdf.png",
            [("", _values(rows, "ttft_ms"))],
            "TTFT",
            slo.get("ttft_ms"),
        ),
        _cdf_figure(
            plt,
            out_dir / "tpot_cdf.png",
            [("", _values(rows, "tpot_ms"))],
            "TPOT",
            slo.get("tpot_ms"),
        ),
    ]
    paths.append(_timeline(plt, out_dir / "timeline.png", summary, rows))
    return paths


def _timeline(plt, path: Path, summary: dict, rows: list[dict]) -> Path:
    fig, (rate_ax, lat_ax, work_ax) = plt.subplots(3, 1, figsize=(8, 7), sharex=True)
    end = max([r["scheduled_s"] for r in rows] + [r["end_s"] or 0 for r in rows] + [1.0])
    width = max(0.2, end / 60)  # seconds per rate bin
    bins = [i * width for i in range(int(end / width) + 2)]
    offered = [r["scheduled_s"] for r in rows]
    done = [r["end_s"] for r in rows if r.get("ok")]
    for values, label in ((offered, "offered"), (done, "completed")):
        counts = [0] * (len(bins) - 1)
        for t in values:
            counts[min(int(t / width), len(counts) - 1)] += 1
        rate_ax.step(bins[:-1], [c / width for c in counts], where="post", label=label)
    rate_ax.set_ylabel("requests/s")
    rate_ax.legend()
    ok = [r for r in rows if r.get("ok")]
    lat_ax.scatter([r["send_s"] for r in ok], [r["ttft_ms"] for r in ok], s=4, label="TTFT")
    lat_ax.scatter([r["send_s"] for r in ok], [r["e2e_ms"] for r in ok], s=4, label="E2E")
    failed = [r for r in rows if r.get("send_s") is not None and not r.get("ok")]
    if failed:
        lat_ax.scatter(
            [r["send_s"] for r in failed], [1.0] * len(failed), marker="x", c="red", label="failed"
        )
    if ok:
        lat_ax.set_yscale("log")
    lat_ax.set_ylabel("latency (ms)")
    lat_ax.legend()
    samples = summary.get("worker_samples") or []
    if samples:
        work_ax.step([t for t, _ in samples], [n for _, n in samples], where="post")
        work_ax.set_ylim(0, max(n for _, n in samples) + 1)
        work_ax.yaxis.get_major_locator().set_params(integer=True)
    else:
        work_ax.text(
            0.5,
            0.5,
            "worker count not reported by the server",
            ha="center",
            transform=work_ax.transAxes,
        )
    work_ax.set_ylabel("workers")
    work_ax.set_xlabel("time since start (s)")
    for ax in (rate_ax, lat_ax, work_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_compare(out_dir: Path, runs: list[tuple[str, dict, list[dict]]]) -> list[Path]:
    """``compare_ttft_cdf.png`` and ``compare_tpot_cdf.png``: every run's CDF on one plot."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        _cdf_figure(
            plt,
            out_dir / f"compare_{key}_cdf.png",
            [(name, _values(rows, f"{key}_ms")) for name, _, rows in runs],
            key.upper(),
            None,
        )
        for key in ("ttft", "tpot")
    ]
