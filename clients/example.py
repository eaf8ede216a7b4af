"""A robot's control loop against a fleetserve (or upstream GR00T) policy server.

    python -m clients.example --port 5555            # gr1 on the default config
    python -m clients.example --port 5556 --steps 5  # unitree_g1

It connects, prints what the policy expects, then runs action chunking: one get_action returns a chunk of
`horizon` future actions, the robot executes them one control tick at a time and asks again. Cameras and
joints are random here; a real robot fills the same arrays from its sensors.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from clients import PolicyClient
from clients.observations import random_observation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5555)
    parser.add_argument("--embodiment", default=None, help="embodiment tag, when not the port's default")
    parser.add_argument("--api-token", default=None)
    parser.add_argument("--steps", type=int, default=3, help="action chunks to request")
    parser.add_argument("--execute", type=int, default=8, help="actions of each chunk to execute before asking again")
    parser.add_argument("--hz", type=float, default=0.0, help="control rate while executing a chunk (0: no waiting)")
    parser.add_argument("--timeout-ms", type=int, default=15000)
    args = parser.parse_args(argv)

    with PolicyClient(args.host, args.port, timeout_ms=args.timeout_ms, api_token=args.api_token,
                      embodiment_tag=args.embodiment) as policy:
        if not policy.ping():
            print(f"No policy server answers at tcp://{args.host}:{args.port} (is `make serve` running?)")
            return 1
        modality = policy.get_modality_config()
        print(f"Connected to tcp://{args.host}:{args.port}")
        for name, cfg in modality.items():
            print(f"  {name:8s} keys={cfg.modality_keys} delta_indices={cfg.delta_indices}")
        info = policy.info()  # fleetserve only; an upstream server has no `info`: build observations from `modality`
        tag = args.embodiment or info["default_embodiment"]
        embodiment = info["embodiments"][tag.lower()]
        rng = np.random.default_rng(0)
        for step in range(args.steps):
            observation = random_observation(embodiment, rng=rng)
            t0 = time.perf_counter()
            action, action_info = policy.get_action(observation)
            latency_ms = (time.perf_counter() - t0) * 1000
            server = action_info.get("server", {})
            shapes = {k: v.shape for k, v in action.items()}
            print(f"chunk {step}: {latency_ms:.1f} ms (server batch {server.get('batch_size')}, "
                  f"infer {server.get('infer_ms')} ms) {shapes}")
            horizon = next(iter(action.values())).shape[1]
            for t in range(min(args.execute, horizon)):
                command = {k: v[0, t] for k, v in action.items()}  # one control tick: send `command` to the motors
                if args.hz > 0:
                    time.sleep(1.0 / args.hz)
            first_key = next(iter(command))
            print(f"  executed {min(args.execute, horizon)} of {horizon} actions; last {first_key} = "
                  f"{np.array2string(command[first_key], precision=3)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
