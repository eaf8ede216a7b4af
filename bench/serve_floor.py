"""The floor of a Serve call on this machine: what one batch's round trip from the ingress to a replica costs
with nothing in it, next to the same bytes over a plain ZMQ socket.

The per-hop breakdown (bench.hops) shows where a served request's time goes beyond the forward pass; most of
it at one robot is the Ray Serve call out and the reply back. This measures that call alone, the way the
ingress makes it (serving/models.py, ModelRegistry.batch_handle): a deployment awaiting another's handle on
its own event loop, with the app's runtime_env (serving/config.py LOW_LATENCY_ENV_VARS), to a replica method
that returns at once. Two payloads: nothing, and one robot's 224x224 RGB frame (150 KB). Two handle kinds:
Serve's gRPC transport with pickle (how batches go) and the default actor call (how the other endpoints go).
Beside them, a ZMQ DEALER/ROUTER round trip of the same frame between two processes: what a transport
outside Ray would cost.

    python -m bench.serve_floor                 # 300 calls per variant, ~1 min with Ray's start
    python -m bench.serve_floor --calls 1000

Prints the median and p90 of each and writes bench/results/serve-floor-<stamp>.json (+ serve-floor-latest.json).
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from typing import Any, Sequence

import numpy as np

from bench.harness import log, results_header, write_results
from bench.stats import summarize

FRAME_SHAPE = (224, 224, 3)


def _frame() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, FRAME_SHAPE, dtype=np.uint8)


def _serve_variants(calls: int) -> dict[str, list[float]]:
    import ray
    from ray import serve

    from serving.config import LOW_LATENCY_ENV_VARS

    @serve.deployment(max_ongoing_requests=64)
    class Replica:
        async def run(self, batch: Any) -> dict[str, float]:
            return {"ok": 1.0}

    @serve.deployment
    class Ingress:
        def __init__(self, replica):
            self.replica = replica
            self.grpc = replica.options(_by_reference=False, request_serialization="pickle",
                                        response_serialization="pickle")

        async def measure(self, calls: int) -> dict[str, list[float]]:
            frame = _frame()
            out: dict[str, list[float]] = {}
            for handle_name, handle in (("grpc+pickle", self.grpc), ("actor call", self.replica)):
                for payload_name, payload in (("empty", None), ("150 KB frame", [{"video": frame}])):
                    times = []
                    for i in range(calls + 20):  # the first 20 warm the path up
                        t0 = time.perf_counter()
                        await handle.run.remote(payload)
                        if i >= 20:
                            times.append((time.perf_counter() - t0) * 1000.0)
                    out[f"serve {handle_name}, {payload_name}"] = times
            return out

    ray.init(runtime_env={"env_vars": dict(LOW_LATENCY_ENV_VARS)}, include_dashboard=False,
             logging_level="WARNING", log_to_driver=False)
    try:
        handle = serve.run(Ingress.bind(Replica.bind()), name="serve-floor", route_prefix=None)
        return handle.measure.remote(calls).result(timeout_s=600)
    finally:
        serve.shutdown()
        ray.shutdown()


def _zmq_echo(address_queue) -> None:
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    address_queue.put(port)
    while True:
        frames = sock.recv_multipart(copy=False)
        if frames[-1].bytes == b"stop":
            sock.send_multipart([frames[0], b"bye"])
            break
        sock.send_multipart([frames[0], b"ok"])
    sock.close(0)
    ctx.term()


def _zmq_variant(calls: int) -> dict[str, list[float]]:
    import zmq

    spawn = multiprocessing.get_context("spawn")
    ports = spawn.Queue()
    server = spawn.Process(target=_zmq_echo, args=(ports,), daemon=True)
    server.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{ports.get(timeout=60)}")
    frame = _frame()
    times = []
    try:
        for i in range(calls + 20):
            t0 = time.perf_counter()
            sock.send(frame, copy=False)
            sock.recv()
            if i >= 20:
                times.append((time.perf_counter() - t0) * 1000.0)
        sock.send(b"stop")
        sock.recv()
    finally:
        sock.close(0)
        ctx.term()
        server.join(timeout=10)
    return {"zmq between two processes, 150 KB frame": times}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.serve_floor", description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=300, help="round trips per variant (after 20 warm-up calls)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log(f"serve floor: {args.calls} sequential round trips per variant")
    measured = {**_serve_variants(args.calls), **_zmq_variant(args.calls)}
    rows = {name: summarize(times) for name, times in measured.items()}
    print(f"\n{'round trip':<44} {'p50 ms':>8} {'p90 ms':>8}")
    for name, s in rows.items():
        print(f"{name:<44} {s['p50']:8.2f} {s['p90']:8.2f}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = write_results("serve-floor", stamp, {**results_header("bench.serve_floor", argv, "cpu"),
                                                "calls": args.calls, "round_trips_ms": rows})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
