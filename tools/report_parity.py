"""Print how far our native GR00T N1.6 is from NVIDIA's own numbers, stage by stage (the README's table).

    .venv/bin/python -m tools.report_parity [--json out.json]

float32 stages are compared with NVIDIA's float32 run; our bfloat16 run's stages with NVIDIA's float32 stages
(NVIDIA recorded only its bf16 actions) and its actions with NVIDIA's bf16 actions. The tests assert the bars
(tests/integration/test_gr00t_n16_parity.py); this prints the measured figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

# The repository (policy) and tests/ (the support package holding NVIDIA's reference), whether this runs as
# `python -m tools.report_parity` or as a script from anywhere.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from support import gr00t_n16_reference as ref  # noqa: E402
from policy import load_policy  # noqa: E402

STAGES = [
    ("vision tower", "vision.tower_out", None),
    ("unshuffle + mlp1", "vision.mlp1_out", None),
    ("backbone features (valid rows)", "backbone.backbone_features", "valid"),
    ("vlln", "action_head.vl_embeds", "valid"),
    ("state encoder", "action_head.state_features", "state_features"),
    ("Euler step velocities", "velocity", None),
    ("action_pred", "action_pred", None),
]


def _stages(policy, batch: str) -> dict[str, float]:
    r = ref.reference(batch)
    obs = ref.observation(batch)
    lang = {k: [t[0] for t in v] for k, v in obs["language"].items()}
    inputs = policy.processor.collate([{**obs, "language": lang}], obs["state"], device=torch.device("cpu"),
                                      dtype=policy.dtype)
    trace: dict = {}
    with torch.inference_mode():
        trace["action_pred"] = policy.model(**inputs, noise=torch.from_numpy(r["noise"]), trace=trace)
    valid = r["inputs.attention_mask"].astype(bool)
    out = {
        "pixels (uint8)": max(int(np.abs(f.astype(int) - ref.reference("b2")[f"pixels.eagle_u8.{i}"]).max())
                              for i, f in enumerate(policy.processor.images([ref.observation("b2")]))),
        "input_ids": int((inputs["input_ids"].numpy() != r["inputs.input_ids"]).sum()),
        "normalised state": float(np.abs(inputs["state"].float().numpy() - r["inputs.state"]).max()),
    }
    for name, key, mask in STAGES:
        if key == "velocity":
            ours = torch.stack([trace[f"step{k}.velocity"] for k in range(4)])
            theirs = np.stack([r[f"denoise.step{k}.velocity"][:, 1:] for k in range(4)])
        else:
            ours = trace["state_features" if mask == "state_features" else key]
            theirs = r[key]
        a = ours.float().numpy().reshape(theirs.shape)
        if mask == "valid":
            a, theirs = a[valid], theirs[valid]
        out[name] = float(np.abs(a - theirs).max())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = ref.build_checkpoint(Path(tmp) / "checkpoint")
        for dtype in ("float32", "bfloat16"):
            pol = load_policy(ckpt, ref.TAG, device="cpu", dtype=dtype, tokenizer=ref.RecordedTokenizer(),
                              backbone_config=ref.backbone_config(), warmup=False)
            result[dtype] = {}
            for batch in ("b1", "b2"):
                stages = _stages(pol, batch)
                r = ref.reference(batch)
                action, _ = pol.get_action(ref.observation(batch), {"noise": r["noise"]})
                prefix = "" if dtype == "float32" else "bf16_injected."
                stages["decoded actions"] = max(float(np.abs(action[k] - r[f"{prefix}action.{k}"]).max()) for k in action)
                result[dtype][batch] = stages
    names = list(result["float32"]["b2"])
    print(f"{'stage':34s} {'fp32 B=1':>10s} {'fp32 B=2':>10s} {'bf16 B=1':>10s} {'bf16 B=2':>10s}")
    for name in names:
        row = [result[d][b][name] for d in ("float32", "bfloat16") for b in ("b1", "b2")]
        print(f"{name:34s} " + " ".join(f"{v:10.2g}" for v in row))
    print("(bf16 stages vs NVIDIA's fp32 stages; bf16 decoded actions vs NVIDIA's bf16 actions)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
