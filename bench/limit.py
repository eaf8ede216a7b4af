"""The limit: the policy's own batched forward pass, in-process, no network, no serving.

`policy.get_actions` on a list of B single-sample observations (exactly what a replica gets from B robots:
validation, preprocessing, one forward pass, decoding), at each batch size; samples/s = B / seconds per
call. No server can beat this on the same machine with the same thread count; the served run is compared
with it at the mean batch size it reached.

    python -m bench.limit --checkpoint checkpoints/bench-small --embodiment gr1 --batch-sizes 1,4,16,64 --torch-threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence


def measure(policy: Any, batch_sizes: Sequence[int], min_time_s: float = 3.0, min_calls: int = 3,
            image_size: tuple[int, int] | None = None) -> list[dict[str, float]]:
    """samples/s of `policy.get_actions` at each batch size (one warm-up call each, not timed)."""
    from clients.observations import random_observation
    import numpy as np

    desc = policy.describe()
    rng = np.random.default_rng(0)
    rows = []
    for b in batch_sizes:
        requests = [(random_observation(desc, 1, image_size=image_size, rng=rng), None) for _ in range(b)]
        policy.get_actions(requests)  # warm-up: allocator, kernels, lazily built buffers
        times = []
        t_end = time.perf_counter() + min_time_s
        while len(times) < min_calls or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            policy.get_actions(requests)
            times.append(time.perf_counter() - t0)
        mean_s = sum(times) / len(times)
        rows.append({
            "batch_size": b,
            "calls": len(times),
            "ms_per_call": round(mean_s * 1000, 3),
            "ms_per_call_min": round(min(times) * 1000, 3),
            "samples_per_s": round(b / mean_s, 3),
        })
    return rows


def interpolate(rows: Sequence[dict[str, float]], batch_size: float) -> float | None:
    """samples/s at a (fractional) batch size: linear in log2(B) between the measured sizes, flat outside."""
    pts = sorted((r["batch_size"], r["samples_per_s"]) for r in rows)
    if not pts or batch_size is None:
        return None
    if batch_size <= pts[0][0]:
        return pts[0][1]
    if batch_size >= pts[-1][0]:
        return pts[-1][1]
    for (b0, s0), (b1, s1) in zip(pts, pts[1:]):
        if b0 <= batch_size <= b1:
            f = (math.log2(batch_size) - math.log2(b0)) / (math.log2(b1) - math.log2(b0))
            return s0 + f * (s1 - s0)
    return None


def run_subprocess(checkpoint: str, tag: str, batch_sizes: Sequence[int], *, torch_threads: int | None, device: str = "cpu",
                   min_time_s: float = 3.0, timeout_s: float = 900.0) -> dict[str, Any]:
    """Measure in a fresh process (its own torch thread settings, nothing else loaded)."""
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "bench.limit", "--checkpoint", str(checkpoint), "--embodiment", tag,
           "--batch-sizes", ",".join(map(str, batch_sizes)), "--device", device, "--min-time", str(min_time_s)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if torch_threads:
        cmd += ["--torch-threads", str(torch_threads)]
        env["OMP_NUM_THREADS"] = str(torch_threads)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(root), timeout=timeout_s)
    if out.returncode != 0:
        raise RuntimeError(f"bench.limit failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.limit", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--embodiment", default="gr1")
    p.add_argument("--batch-sizes", default="1,4,16,64")
    p.add_argument("--device", default="cpu")
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--min-time", type=float, default=3.0, help="seconds per batch size (at least 3 calls)")
    args = p.parse_args(argv)

    import torch

    import policy

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    pol = policy.load_policy(args.checkpoint, args.embodiment, device=args.device)
    sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    rows = measure(pol, sizes, args.min_time)
    print(json.dumps({"torch_threads": torch.get_num_threads(), "device": args.device, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
