"""How many cores a CPU replica may use right now: its own recent use plus what the node leaves idle.

A replica alone on a 2-core machine at one thread leaves a core idle (one robot waits on one core while
the serial server it replaces uses two). Taking every core is as wrong: OpenMP threads that share a core
with another busy process spin at barriers and run several times slower. So the replica measures, over
about a second, the node's idle cores (/proc/stat) and its own CPU use (/proc/self/stat), and sizes its
torch threads to their sum, within its share of the node (cores / busy replicas). Linux only; elsewhere
(or before the first measurement) it answers None and the thread count is left alone.
"""

from __future__ import annotations

import os
import time


def _node_jiffies() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs since boot."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return idle, sum(fields[:8])


def _own_ticks() -> int | None:
    try:
        with open("/proc/self/stat") as f:
            after_name = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(after_name[11]) + int(after_name[12])  # utime + stime (fields 14 and 15 of proc(5))


class FreeCores:
    def __init__(self, cores: int, period_s: float = 1.0):
        self.cores = max(1, cores)
        self.period_s = period_s
        self._tick_hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = (time.monotonic(), _node_jiffies(), _own_ticks())
        self.usable: float | None = None

    def measure(self) -> float | None:
        """Cores usable by this process (idle + its own use), refreshed at most once per period."""
        now = time.monotonic()
        t0, node0, own0 = self._last
        if now - t0 < self.period_s:
            return self.usable
        node1, own1 = _node_jiffies(), _own_ticks()
        self._last = (now, node1, own1)
        if None in (node0, node1, own0, own1) or node1[1] <= node0[1]:
            return self.usable
        idle_cores = (node1[0] - node0[0]) / (node1[1] - node0[1]) * self.cores
        own_cores = (own1 - own0) / self._tick_hz / (now - t0)
        self.usable = idle_cores + own_cores
        return self.usable

    def threads(self, share: int) -> int | None:
        """Torch threads: the usable cores, rounded to the nearest, at most `share`, at least 1. Rounded down,
        a lone replica at one thread (one core of its own, Ray's daemons and the ingress taking a third of
        the other) would read 1.6 cores and never take the second one (measured: 1 thread, p50 1.47x the
        serial server's at 2 threads)."""
        usable = self.measure()
        if usable is None:
            return None
        return max(1, min(share, int(usable + 0.5)))


class ThreadChoice:
    """Torch threads for a pass, chosen by measurement rather than by rule.

    Two threads beat one on a long pass when the second core is free (small, B=1: ~200 vs ~250 ms; tiny, B=8:
    11 vs 15 ms), and lose badly on a short one, or when another process takes that core (tiny, B=1: 3.8 ms at
    one thread, 45-58 ms mean at two while other processes ran): OpenMP threads wait at a barrier per op. So for
    each batch-size bucket (powers of two) it keeps the time per sample at one thread and at the most the free
    cores allow (an EWMA of each), runs the faster, and re-measures the other every `explore_every`-th pass of
    that bucket, because the node's load changes. More threads must win by `margin`: their spinning between
    passes takes the second core from the ingress and Ray, which the pass time does not show (tiny at one robot:
    the call's hops 40% slower with the replica at two threads)."""

    def __init__(self, explore_every: int = 32, weight: float = 0.2, margin: float = 0.85):
        self.explore_every = explore_every
        self.weight = weight
        self.margin = margin
        self._ms_per_sample: dict[int, dict[int, float]] = {}  # bucket -> threads -> EWMA
        self._passes: dict[int, int] = {}

    @staticmethod
    def _bucket(samples: int) -> int:
        return max(1, samples).bit_length()

    def choose(self, samples: int, most: int) -> int:
        """Threads for a pass of `samples`, when the free cores allow up to `most`."""
        if most <= 1:
            return 1
        bucket = self._bucket(samples)
        seen = self._ms_per_sample.setdefault(bucket, {})
        self._passes[bucket] = n = self._passes.get(bucket, 0) + 1
        for threads in (1, most):
            if threads not in seen:
                return threads  # not measured at this width yet
        best, other = (most, 1) if seen[most] < self.margin * seen[1] else (1, most)
        return other if n % self.explore_every == 0 else best

    def observe(self, samples: int, threads: int, infer_ms: float) -> None:
        if samples <= 0 or infer_ms <= 0:
            return
        seen = self._ms_per_sample.setdefault(self._bucket(samples), {})
        per_sample = infer_ms / samples
        old = seen.get(threads)
        seen[threads] = per_sample if old is None else (1 - self.weight) * old + self.weight * per_sample

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {f"<={2 ** b - 1}": {str(t): round(ms, 3) for t, ms in seen.items()}
                for b, seen in sorted(self._ms_per_sample.items())}
