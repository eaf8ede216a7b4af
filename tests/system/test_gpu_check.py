"""bench/gpu_check.py's CPU smoke run: the script a GPU machine runs, end to end on the tiny presets of both
generations (tiny: N1.6, n17-small: N1.7), in a fresh interpreter (as on a bare PyTorch machine: it must not import
Ray, ZMQ or msgpack)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _qwen3_vl_available() -> bool:
    try:
        import transformers.models.qwen3_vl.modeling_qwen3_vl  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("preset", [
    "tiny",
    pytest.param("n17-small", marks=pytest.mark.skipif(not _qwen3_vl_available(),
                                                       reason="GR00T N1.7 needs transformers >= 4.57 (Qwen3-VL)")),
])
def test_gpu_check_cpu_smoke(tmp_path, preset):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--preset", preset, "--batches", "1,2",
         "--modes", "none,cuda_graphs", "--iters", "2", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"]["device"] == "cpu" and result["preset"] == preset and result["dtype"] == "bfloat16"
    assert {"torch", "transformers", "numpy", "safetensors", "tokenizers"} <= set(result["versions"])
    assert result["load"]["load_s"] > 0 and result["load"]["warmup_s"] > 0 and result["load"]["parameters"] > 0
    # The checkpoint it built holds every parameter the loaded model has, at bfloat16 (2 bytes) or wider.
    assert result["build"]["bytes"] >= 2 * result["load"]["parameters"], (result["build"], result["load"])
    inv = result["batch_invariance"]
    assert inv["dtype"] == "bfloat16" and inv["within"] and inv["max_abs_diff"] <= inv["stated_tolerance"]
    assert [r["batch"] for r in result["latency"]["none"]] == [1, 2]
    assert all(r["median_ms"] > 0 and r["samples_per_s"] > 0 for r in result["latency"]["none"])
    assert result["limit_samples_per_s"]["none"] > 0
    assert "cuda_graphs: needs a CUDA device" in result["skipped"]
    assert result["modules_not_needed_loaded"] == []
