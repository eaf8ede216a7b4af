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
