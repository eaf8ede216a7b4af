"""How scenarios show what they measured: a live progress line, number formatting for tables, and plots
(matplotlib, imported only when a plot is drawn; the measurements themselves never need it)."""

from __future__ import annotations

import math
import sys
from typing import Any, Sequence

import numpy as np


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: the number at `digits` decimals, `-` for a missing one."""
    return "-" if value is None else f"{value:.{digits}f}"



def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("plots need matplotlib (pip install matplotlib); the run itself does not") from exc
    return plt


def plot_report(report: Any, path: str, title: str | None = None) -> str:
    """Latency distribution (histogram and CDF) of one or more runs (FleetReports: `latencies`, `label`,
    `robots`), to a PNG."""
    plt = pyplot()
    reports = list(report) if isinstance(report, (list, tuple)) else [report]
    fig, (ax_h, ax_c) = plt.subplots(1, 2, figsize=(12, 4.5))
    every = [x for r in reports for x in r.latencies if x > 0]
    wide = bool(every) and max(every) / max(min(every), 1e-3) > 20  # decades apart: log axes
    bins: Any = 60
    if wide:
        bins = np.geomspace(max(min(every), 1e-3), max(every), 80)
    for r in reports:
        if not r.latencies:
            continue
        name = r.label or f"{r.robots} robots"
        lat = np.sort(np.asarray(r.latencies))
        ax_h.hist(lat, bins=bins, alpha=0.5, label=f"{name} (p50 {np.median(lat):.1f} ms)")
        ax_c.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=name)
    if wide:
        ax_h.set_xscale("log")
        ax_c.set_xscale("log")
    ax_h.set_xlabel("latency (ms)")
    ax_h.set_ylabel("replies")
    ax_h.set_title("latency histogram")
    ax_c.set_xlabel("latency (ms)")
    ax_c.set_ylabel("fraction of replies")
    ax_c.set_title("latency CDF")
    ax_c.grid(alpha=0.3)
    for ax in (ax_h, ax_c):
        if any(r.latencies for r in reports):
            ax.legend(fontsize=8)
    fig.suptitle(title or "fleet latency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(series: dict[str, Sequence[Any]] | Sequence[Any], path: str, title: str | None = None,
               limits: dict[str, float] | None = None) -> str:
    """Throughput and p99 latency against the number of robots (FleetReports), one line per labelled series.

    `limits`: horizontal reference lines on the throughput panel (e.g. {"in-process limit, B=16": 21.3}).
    """
    plt = pyplot()
    if not isinstance(series, dict):
        series = {"fleet": list(series)}
    fig, (ax_t, ax_p) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, reports in series.items():
        reports = sorted(reports, key=lambda r: r.robots)
        xs = [r.robots for r in reports]
        ax_t.plot(xs, [r.samples_per_s for r in reports], marker="o", label=name)
        ax_p.plot(xs, [r.latency_ms.get("p99") or float("nan") for r in reports], marker="o", label=f"{name} p99")
        ax_p.plot(xs, [r.latency_ms.get("p50") or float("nan") for r in reports], marker=".", linestyle=":",
                  label=f"{name} p50")
    for name, value in (limits or {}).items():
        ax_t.axhline(value, linestyle="--", linewidth=1, color="gray")
        ax_t.text(0.01, value, name, transform=ax_t.get_yaxis_transform(), fontsize=7, va="bottom", color="gray")
    for ax in (ax_t, ax_p):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("robots")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    ax_t.set_ylabel("throughput (samples/s)")
    ax_t.set_title("throughput")
    ax_p.set_yscale("log")
    ax_p.set_ylabel("latency (ms)")
    ax_p.set_title("latency")
    fig.suptitle(title or "fleet sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class Progress:
    """One line refreshed in place on a TTY; a line every few seconds otherwise."""

    def __init__(self, stream=sys.stderr, every_s: float = 5.0, prefix: str = ""):
        self.stream = stream
        self.tty = stream.isatty()
        self.every_s = every_s
        self.prefix = prefix
        self._last_line = -math.inf
        self._last = (0.0, 0)
        self.dirty = False

    def __call__(self, elapsed, sent, answered, errors, in_flight, p50) -> None:
        if not self.tty and elapsed - self._last_line < self.every_s:
            return
        t_prev, n_prev = self._last  # req/s since the previous line shown
        rate = (answered - n_prev) / (elapsed - t_prev) if elapsed > t_prev else 0.0
        self._last = (elapsed, answered)
        p50_text = "-" if p50 != p50 else f"{p50:.1f} ms"
        line = (f"{self.prefix}{elapsed:6.1f}s sent {sent} answered {answered} ({rate:.1f} req/s) "
                f"p50 {p50_text} errors {errors} in flight {in_flight}")
        if self.tty:
            self.stream.write("\r\033[K" + line)
            self.dirty = True
        else:
            self._last_line = elapsed
            self.stream.write(line + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.dirty:
            self.stream.write("\n")
            self.stream.flush()
            self.dirty = False
        self._last = (0.0, 0)
        self._last_line = -math.inf
