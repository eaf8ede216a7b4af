"""GPU check of the native policy: build, load, memory, get_actions latency eager and compiled, bf16 batch
invariance, the limit in samples/s -- one JSON file.

    python -m bench.gpu_check                               # n16-3b, bf16, cuda, --out gpu_check.json
    python -m bench.gpu_check --preset n17-3b               # GR00T N1.7-3B's real dimensions (transformers >= 4.57)
    python -m bench.gpu_check --checkpoint DIR              # load a checkpoint instead of building one
    python -m bench.gpu_check --device cpu --preset tiny    # the CI smoke tests (tiny, n17-small)

Needs only what a PyTorch machine has: torch, transformers (4.53+), safetensors, tokenizers, numpy (no Ray, no
ZMQ, no network). The demo checkpoint is built directly in bf16 on the device (never a float32 copy), written
to a temporary directory and loaded back the way a replica loads it. Sized to finish in well under 7 minutes
on one H100/H200: a time budget (``--budget-s``) skips what would not fit and says so in the JSON.

Latency is of ``get_actions`` with B requests of one sample each (preprocess, one forward, decode, split), as
a replica runs a batch; median and p90 over ``--iters`` calls after warm-up. Compiled modes are timed after
their compilation (recorded separately): the steady state a warmed-up replica serves.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.stats import summarize

TAG = "gr1"


def _versions() -> dict[str, Any]:
    import safetensors
    import tokenizers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
        "tokenizers": tokenizers.__version__,
    }


def _device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", device_count=torch.cuda.device_count())
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory(device: torch.device) -> dict[str, float] | None:
    if device.type != "cuda":
        return None
    return {"allocated_gib": round(torch.cuda.memory_allocated(device) / 2**30, 2),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "reserved_gib": round(torch.cuda.memory_reserved(device) / 2**30, 2)}


def _requests(pol, batch: int) -> list:
    return [(pol.dummy_observation(1, seed=i), {"seed": i}) for i in range(batch)]


def _latency(pol, batch: int, iters: int, warm: int) -> dict[str, Any]:
    reqs = _requests(pol, batch)
    t0 = time.perf_counter()
    for _ in range(warm):  # first calls of a mode and shape: compilation / graph capture, timed apart
        pol.get_actions(reqs)
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        pol.get_actions(reqs)  # ends in a device-to-host copy of the actions: synchronised
        times.append((time.perf_counter() - t) * 1000.0)
    summary = summarize(times)
    return {"batch": batch, "median_ms": summary["p50"], "p90_ms": summary["p90"],
            "min_ms": summary["min"], "samples_per_s": round(batch / summary["p50"] * 1000.0, 1),
            "warmup_s": round(first_s, 2), "iters": iters}


def _normalised_actions(pol, observations: list, noise: torch.Tensor) -> torch.Tensor:
    """The model's normalised actions for single-sample observations, in one forward pass (as a replica runs a
    batch: the processor's collate, then the model)."""
    clean = [pol._prepare_observation(o)[0] for o in observations]
    states = {k: np.concatenate([c["state"][k] for c in clean], axis=0) for k in pol.spec.state_keys}
    inputs = pol.processor.collate(clean, states, device=pol.device, dtype=pol.dtype)
    with torch.inference_mode():
        return pol.model(**inputs, noise=noise.to(pol.device)).float().cpu()


def _batch_invariance(pol, others: int = 7) -> dict[str, Any]:
    """Max |difference| of normalised actions of one request alone vs inside a batch (same noise). The batch
    mixes prompt lengths, so the request is left padded there (N1.7: its VL self-attention sees pad rows)."""
    alone = pol.dummy_observation(1, seed=1000, text="pick up the cube")
    mixed = [pol.dummy_observation(1, seed=2000 + i, text="pick up the " + "red " * (i + 1) + "cube")
             for i in range(others)]
    single = _normalised_actions(pol, [alone], pol._noise(1, {"seed": 5}))[0]
    big = torch.cat([pol._noise(3, {"seed": 6}), pol._noise(1, {"seed": 5}), pol._noise(others - 3, {"seed": 7})])
    in_batch = _normalised_actions(pol, mixed[:3] + [alone] + mixed[3:], big)[3]
    from policy.native import BATCH_INVARIANCE_ATOL

    diff = float((in_batch - single).abs().max())
    return {"dtype": str(pol.dtype).removeprefix("torch."), "batch": others + 1, "max_abs_diff": diff,
            "stated_tolerance": BATCH_INVARIANCE_ATOL[pol.dtype], "within": diff <= BATCH_INVARIANCE_ATOL[pol.dtype]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from policy.make_demo_checkpoint import build_demo_model, write_demo_checkpoint
    from policy.native import NativePolicy, resolve_dtype

    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} has no CUDA here (use --device cpu)")
    dtype = resolve_dtype(args.dtype, device)
    result: dict[str, Any] = {"device": _device_info(device), "versions": _versions(), "preset": args.preset,
                              "dtype": str(dtype).removeprefix("torch."), "skipped": []}
    batches = [int(b) for b in args.batches.split(",")]
    modes = [m for m in args.modes.split(",") if m]

    def over_budget(what: str) -> bool:
        if time.perf_counter() - started > args.budget_s:
            result["skipped"].append(f"{what}: past the {args.budget_s:.0f} s budget")
            return True
        return False

    tmp = None
    path = Path(args.checkpoint) if args.checkpoint else None
    if path is None:
        tmp = Path(tempfile.mkdtemp(prefix="gpu_check-"))
        path = tmp / args.preset
        t = time.perf_counter()
        model = build_demo_model(args.preset, seed=0, dtype=dtype, device=device)
        _sync(device)
        built = time.perf_counter() - t
        path.mkdir()
        t = time.perf_counter()
        write_demo_checkpoint(path, args.preset, [TAG], 0, model=model)
        written = time.perf_counter() - t
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["build"] = {"build_s": round(built, 2), "write_s": round(written, 2),
                           "bytes": sum(f.stat().st_size for f in path.iterdir())}
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        pol = NativePolicy(path, TAG, device=device, dtype=dtype, warmup=False)
        _sync(device)
        result["load"] = {"load_s": round(time.perf_counter() - t, 2), "parameters": pol._parameters,
                          "warmup_s": round(pol.warmup(), 2), "memory": _memory(device)}
        result["batch_invariance"] = _batch_invariance(pol)
        result["latency"] = {}
        for mode in modes:
            if over_budget(f"compile mode {mode}"):
                break
            if mode == "cuda_graphs" and device.type != "cuda":
                result["skipped"].append("cuda_graphs: needs a CUDA device")
                continue
            pol.set_compile(mode, batch_buckets=tuple(batches))
            rows = []
            try:
                for b in batches:
                    if over_budget(f"{mode} B={b}"):
                        break
                    rows.append(_latency(pol, b, args.iters, warm=2 if mode == "none" else 3))
            except Exception as exc:  # noqa: BLE001 - a mode that fails (a compiler error) must not lose the rest
                result.setdefault("errors", {})[mode] = f"{type(exc).__name__}: {str(exc)[:2000]}"
            result["latency"][mode] = rows
            result.setdefault("memory_after", {})[mode] = _memory(device)
        pol.set_compile("none")
        limits = {m: max((r["samples_per_s"] for r in rows), default=None) for m, rows in result["latency"].items()}
        result["limit_samples_per_s"] = limits
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result["modules_not_needed_loaded"] = sorted(m for m in ("ray", "zmq", "msgpack") if m in sys.modules)
    result["total_s"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    from policy.make_demo_checkpoint import PRESETS

    p.add_argument("--preset", default="n16-3b", choices=PRESETS)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--checkpoint", help="a fleet_gr00t checkpoint holding gr1 (default: build a demo one)")
    p.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes (default 1,8,32)")
    p.add_argument("--modes", default="none,cuda_graphs",
                   help="comma-separated: none, torch_compile, cuda_graphs (default none,cuda_graphs)")
    p.add_argument("--iters", type=int, default=20, help="timed calls per batch size (default 20)")
    p.add_argument("--budget-s", type=float, default=360.0, help="skip what starts after this (default 360 s)")
    p.add_argument("--out", default="gpu_check.json")
    args = p.parse_args(argv)
    result = run(args)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
