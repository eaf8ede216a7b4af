"""Where a benchmark's CPU time went: cores used by role (ours vs everything else on a shared machine) over a
measured point, and py-spy profiles of chosen processes summarised by category (model, codec, Ray, ...)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.harness import log


class CpuShare:
    """CPU seconds used by this benchmark's process tree (by role) vs everything else on the machine, over a point.

    This box is shared: `foreign_cores` says how many cores other processes took on average meanwhile
    (0 = a clean measurement; 1 = half of a 2-core machine was busy with something else). `by_role` splits
    ours: the fleet client (this process), the serial server, each Serve replica, Ray's own processes.
    """

    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK")
        self._names: dict[int, str] = {}
        self._start = self._snapshot()

    def _role(self, pid: int) -> str:
        if pid not in self._names:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                cmd = ""
            if pid == os.getpid():
                role = "fleet client (bench process)"
            elif "ServeReplica:" in cmd:
                role = "replica " + cmd.split("ServeReplica:", 1)[1].split()[0].split(".")[0].split(":")[-1]
            elif "bench.serial_server" in cmd:
                role = "serial server"
            elif "py-spy" in cmd:
                role = "py-spy (profiler)"
            elif "bench.limit" in cmd:
                role = "limit"
            else:
                role = "Ray system (raylet, gcs, controller, workers)"
            self._names[pid] = role
        return self._names[pid]

    def _snapshot(self) -> tuple[float, float, dict[str, float]]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal (guest time is already inside user and nice)
        busy = sum(fields[:8]) - fields[3] - (fields[4] if len(fields) > 4 else 0)
        stats: dict[int, tuple[int, int]] = {}  # pid -> (ppid, cpu ticks)
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # utime + stime + cutime + cstime: a reaped child's time lives on in its parent's c-times
            stats[int(entry)] = (int(rest[1]), sum(int(x) for x in rest[11:15]))
        ours, frontier = set(), {os.getpid()}
        while frontier:
            ours |= frontier
            frontier = {pid for pid, (ppid, _) in stats.items() if ppid in frontier and pid not in ours}
        roles: dict[str, float] = {}
        for pid in ours:
            if pid in stats:
                role = self._role(pid)
                roles[role] = roles.get(role, 0.0) + stats[pid][1] / self._tick
        return time.monotonic(), busy / self._tick, roles

    def result(self) -> dict[str, Any]:
        t1, busy1, roles1 = self._snapshot()
        t0, busy0, roles0 = self._start
        wall = max(1e-9, t1 - t0)
        by_role = {r: max(0.0, roles1.get(r, 0.0) - roles0.get(r, 0.0)) / wall for r in roles1}
        mine = sum(by_role.values())
        return {"ours_cores": round(mine, 2), "foreign_cores": round(max(0.0, (busy1 - busy0) / wall - mine), 2),
                "by_role": {r: round(v, 2) for r, v in sorted(by_role.items(), key=lambda kv: -kv[1]) if v >= 0.005}}


# ---------------------------------------------------------------------------------------------------------
# profiling (py-spy)


def _py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def start_profile(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    exe = _py_spy()
    if exe is None:
        log("  (py-spy not found: no profile)")
        return None
    cmd = [exe, "record", "-p", str(pid), "-d", str(max(1, int(seconds))), "-r", "50", "-f", "raw", "-o", str(out),
           "--nonblocking"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


# Where a sample's time goes: the category of the innermost frame of its stack that matches one.
PROFILE_CATEGORIES = [
    ("model forward (torch)", ("policy/modeling.py", "FleetGr00tModel")),
    ("tokenizer", ("Processor.tokenize", "transformers/tokenization")),
    ("policy preprocessing (images, states)", ("policy/processor.py",)),
    ("policy validation and decoding", ("policy/",)),
    ("wire codec (clients/codec.py, msgpack)", ("clients/codec.py", "msgpack")),
    ("fleetserve ingress / batcher / replica code", ("serving/", "bench/serial_server.py")),
    ("ZMQ sockets", ("zmq/",)),
    ("Ray object serialization (pickle)", ("ray/_private/serialization", "cloudpickle", "pickle")),
    ("Ray Serve / Ray core (Python side)", ("ray/",)),
    ("asyncio event loop", ("asyncio/",)),
]
# Stacks whose innermost frame is one of these are threads parked in C (Ray's core threads, event loops in
# select(), idle executor workers): py-spy does not always recognise them as idle.
PARKED = ("Thread.run", "Worker.main_loop", "_run_user_code_event_loop", "_run_router_event_loop", "<module>")
PARKED_FRAMES = ("_worker (concurrent/futures/thread.py:81)",)


def _parked(frames: list[str]) -> bool:
    if not frames:
        return True
    name = frames[-1].split(" (")[0]
    return name.split(".")[-1] in {p.split(".")[-1] for p in PARKED} or frames[-1].startswith(PARKED_FRAMES)


def _category(frames: list[str]) -> str:
    """The category of the innermost frame that has one (torch's own frames are attributed to their caller)."""
    for frame in reversed(frames):
        for name, needles in PROFILE_CATEGORIES:
            if any(needle in frame for needle in needles):
                return name
    return "other"


def summarize_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """Share of samples per category, self time by leaf frame, inclusive time, from py-spy's collapsed stacks."""
    if not path.exists():
        return {"error": "no profile written"}
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f.strip()]
        if _parked(frames):
            categories["threads parked in C (not CPU work)"] += n
            continue
        leaf[_short(frames[-1])] += n
        for f in set(_short(f) for f in frames):
            inclusive[f] += n
        categories[_category(frames)] += n
    busy = max(1, total - categories["threads parked in C (not CPU work)"])

    def pct(c: Counter, of: int) -> list[tuple[str, float]]:
        return [(k, round(100.0 * v / of, 1)) for k, v in c.most_common(top)]

    return {"samples": total, "busy_samples": busy, "categories_pct_of_all": pct(categories, max(1, total)),
            "self_pct_of_busy": pct(leaf, busy), "inclusive_pct_of_busy": pct(inclusive, busy)}


def _short(frame: str) -> str:
    # py-spy raw frames: "function (path/to/file.py:line)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file = where.rsplit("/", 1)[-1].split(":")[0] if where else ""
    return f"{name} ({file})" if file else name
