"""The native model's GPU-bound inference path, checked on the CPU: dtypes after loading, seeded noise, the
tolerance per dtype, the gather-free per-embodiment layers, constant step embeddings, warm-up at load, fixed
shape buckets with a traced forward, device reporting. bf16 runs on the CPU, so these catch on a CPU what
would otherwise show only on a GPU."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import policy
from policy import hot_path, loading
from policy.native import BATCH_INVARIANCE_ATOL, NativePolicy

TAG = "gr1"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return policy.build_demo_checkpoint(tmp_path_factory.mktemp("inference") / "tiny", "tiny", (TAG,), seed=0)


@pytest.fixture(scope="module")
def fp32(ckpt):
    return NativePolicy(ckpt, TAG, dtype="float32")


@pytest.fixture(scope="module")
def bf16(ckpt):
    return NativePolicy(ckpt, TAG, dtype="bfloat16")


def _inputs(pol: NativePolicy, obs, length_multiple: int = 1) -> dict:
    lang = {k: [t[0] for t in v] for k, v in obs["language"].items()}
    return pol.processor.collate([{**obs, "language": lang}], obs["state"], device=pol.device, dtype=pol.dtype,
                                 length_multiple=length_multiple)


def _normalised(pol: NativePolicy, obs, seed: int) -> torch.Tensor:
    """The model's normalised actions (N, H, A) float32 for one observation (what the tolerances are about)."""
    return pol.normalized_actions(obs, pol._noise(len(next(iter(obs["language"].values()))), {"seed": seed}))


# ---- RoPE -----------------------------------------------------------------------------------------------------
def test_rope_angles_are_computed_in_float32_then_rounded_once(bf16):
    from policy.modeling_gr00t_n1d6 import rope_tables

    assert bf16.model.dtype == torch.bfloat16
    cfg = bf16.model.backbone_config.text
    positions = torch.arange(256)
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, torch.bfloat16)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    angles = positions.double()[:, None] * inv[None]
    want = torch.cat([angles, angles], -1).cos()
    # one bf16 rounding of an exact cosine (a bf16 angle would be off by up to ~0.5 rad at position 192)
    assert cos.dtype == torch.bfloat16 and (cos.double() - want).abs().max() < 4e-3


# ---- seeded noise and precision -------------------------------------------------------------------------------
def test_seeded_noise_is_fp32_and_the_same_for_every_dtype(fp32, bf16):
    a, b = fp32._noise(3, {"seed": 11}), bf16._noise(3, {"seed": 11})
    assert a.dtype == b.dtype == torch.float32
    assert torch.equal(a, b)
    # the model integrates from that fp32 noise and returns fp32, whatever its own dtype
    obs = fp32.dummy_observation(1, seed=1)
    assert _normalised(bf16, obs, 11).dtype == torch.float32


def test_bf16_stays_close_to_fp32(fp32, bf16):
    obs = fp32.dummy_observation(2, seed=2)
    diff = (_normalised(bf16, obs, 5) - _normalised(fp32, obs, 5)).abs().max().item()
    # same weights and noise, bf16 activations: differences of bf16 rounding, not of different noise (which
    # would be O(1) on normalised actions)
    assert diff < 5e-2, diff  # measured 1.9e-2 (tiny demo weights, CPU)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_invariance_within_the_stated_tolerance(request, dtype):
    pol = request.getfixturevalue("fp32" if dtype == "float32" else "bf16")
    alone = pol.dummy_observation(1, seed=3)
    others = pol.dummy_observation(6, seed=4)
    batched = {
        "video": {k: np.concatenate([others["video"][k][:3], alone["video"][k], others["video"][k][3:]])
                  for k in alone["video"]},
        "state": {k: np.concatenate([others["state"][k][:3], alone["state"][k], others["state"][k][3:]])
                  for k in alone["state"]},
        "language": {k: others["language"][k][:3] + alone["language"][k] + others["language"][k][3:]
                     for k in alone["language"]},
    }
    single = _normalised(pol, alone, 9)[0]
    noise = pol._noise(7, {"seed": 123})
    noise[3] = pol._noise(1, {"seed": 9})[0]
    in_batch = pol.normalized_actions(batched, noise)[3]
    diff = (in_batch - single).abs().max().item()
    assert diff <= BATCH_INVARIANCE_ATOL[pol.dtype], (dtype, diff)


# ---- per-embodiment layers: one plain linear per batch ---------------------------------------------------------
_GATHERS = ("index", "index_select", "gather", "embedding", "take")


class _TableGathers(TorchDispatchMode):
    """Counts the gather ops that read one of the given tensors (the per-embodiment weight tables)."""

    def __init__(self, tables):
        super().__init__()
        self.tables = {t.untyped_storage().data_ptr() for t in tables}
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        src = args[0] if args else None
        if name in _GATHERS and isinstance(src, torch.Tensor) and src.untyped_storage().data_ptr() in self.tables:
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _embodiment_tables(model):
    from policy.flow_matching import CategorySpecificLinear

    return [t for m in model.modules() if isinstance(m, CategorySpecificLinear) for t in (m.W, m.b)]


def test_one_embodiment_batch_runs_without_per_sample_gathers(fp32):
    obs = fp32.dummy_observation(4, seed=5)
    inputs = _inputs(fp32, obs)
    with torch.inference_mode():
        assert isinstance(inputs["embodiment_id"], int)
        noise = fp32._noise(4, {"seed": 1})
        tables = _embodiment_tables(fp32.model)
        with _TableGathers(tables) as counter:
            fast = fp32.model.get_action(noise=noise, **inputs)
        # the GR00T form: a (N,) id tensor, one gathered weight matrix per sample and step
        ids = torch.full((4,), inputs["embodiment_id"], dtype=torch.long)
        with _TableGathers(tables) as gathering:
            head = fp32.model.action_head
            for layer in (head.action_encoder.W1, head.action_decoder.layer1):
                layer(torch.randn(4, 16, layer.W.shape[1]), ids)
    assert not counter.ops, f"per-sample weight gathers in a one-embodiment batch: {counter.ops}"
    assert gathering.ops.get("index", 0) == 4  # the counter does see the general form's gathers (weight + bias)
    # same result as the general per-sample form (a tensor of differing ids keeps it)
    mixed = torch.tensor([inputs["embodiment_id"]] * 3 + [7])
    with torch.inference_mode():
        general = fp32.model.get_action(noise=noise, **{**inputs, "embodiment_id": mixed})
    torch.testing.assert_close(general[:3], fast[:3], atol=1e-5, rtol=0)


def test_category_linear_int_and_tensor_forms_agree(fp32):
    layer = fp32.model.action_head.state_encoder.layer1
    x = torch.randn(3, 2, layer.W.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(layer(x, 7), layer(x, torch.tensor([7, 7, 7])), atol=1e-5, rtol=1e-5)


# ---- constant step conditioning -------------------------------------------------------------------------------
def test_step_constants_are_cached_and_equal_a_fresh_computation(fp32):
    from policy.flow_matching import action_time_encoding

    head = fp32.model.action_head
    cfg = fp32.model.config
    cached = head.step_constants(torch.float32, fp32.device)
    assert head.step_constants(torch.float32, fp32.device) is cached and len(cached) == cfg.num_inference_timesteps
    with torch.no_grad():
        for step, (tau, (blocks, (shift, scale))) in enumerate(cached):
            t = torch.tensor([float(int(step / cfg.num_inference_timesteps * cfg.num_timestep_buckets))])
            torch.testing.assert_close(tau, action_time_encoding(t, cfg.input_embedding_dim))
            temb = head.model.timestep_encoder(t, torch.float32)
            fresh_blocks, (fresh_shift, fresh_scale) = head.model.conditioning(temb)
            torch.testing.assert_close(shift, fresh_shift)
            for (a, b), (c, d) in zip(blocks, fresh_blocks):
                torch.testing.assert_close(a, c)
                torch.testing.assert_close(b, d)


# ---- warm-up --------------------------------------------------------------------------------------------------
def test_warmup_runs_at_load_and_is_reported(ckpt, fp32):
    assert fp32.warmup_seconds is not None and fp32.warmup_seconds > 0
    model = fp32.describe()["model"]
    assert model["warmup_seconds"] is not None and model["device"] == "cpu" and model["compile"] == "none"
    cold = policy.load_policy(ckpt, TAG, warmup=False)
    assert cold.warmup_seconds is None and cold.describe()["model"]["warmup_seconds"] is None


# ---- fixed shapes: buckets, fixed text length, a forward without host syncs -----------------------------------
def test_buckets_and_padding():
    b = hot_path.check_buckets([8, 1, 2, 4, 4])
    assert b == (1, 2, 4, 8)
    assert [hot_path.bucket_for(n, b) for n in (1, 2, 3, 5, 8, 9, 17)] == [1, 2, 4, 8, 8, 16, 24]
    t = torch.arange(6.0).reshape(3, 2)
    padded = hot_path.pad_rows(t, 5)
    assert padded.shape == (5, 2) and torch.equal(padded[:3], t) and torch.equal(padded[3:], t[-1:].expand(2, 2))
    with pytest.raises(ValueError, match="batch_buckets"):
        hot_path.check_buckets([0, 2])


def test_compile_mode_errors_name_the_field_and_choices(ckpt):
    with pytest.raises(ValueError, match="compile: expected one of none, torch_compile, cuda_graphs, got 'fast'"):
        NativePolicy(ckpt, TAG, compile="fast", warmup=False)
    with pytest.raises(ValueError, match="compile: 'cuda_graphs' needs a CUDA device"):
        NativePolicy(ckpt, TAG, compile="cuda_graphs", warmup=False)


def test_forward_traces_as_one_graph_without_host_syncs(fp32):
    """torch.compile(fullgraph=True) refuses a graph break, and every .item() / data-dependent branch / boolean
    index in the forward is one: so the forward has no device-to-host sync (what CUDA graphs require)."""
    obs = fp32.dummy_observation(2, seed=6)
    traced = torch.compile(fp32.model.forward, fullgraph=True, backend="eager", dynamic=False)
    with torch.inference_mode():
        inputs = _inputs(fp32, obs, length_multiple=64)
        noise = fp32._noise(2, {"seed": 2})
        torch.testing.assert_close(traced(noise=noise, **inputs), fp32.model.get_action(noise=noise, **inputs),
                                   atol=1e-6, rtol=0)


def test_compiled_policy_pads_to_buckets_and_fixed_text_length(ckpt, fp32, monkeypatch):
    """The compile path's shapes (bucketed batch, prompts padded to a multiple of 64 tokens) and results (equal
    to eager). The compiler backend is Dynamo's "eager" here: the inductor build of C++ kernels is too slow for
    CI."""
    shapes: list[tuple[int, int]] = []

    def recording_forward(model, mode):
        traced = torch.compile(model.forward, fullgraph=True, backend="eager", dynamic=False)

        def run(**inputs):
            shapes.append(tuple(inputs["input_ids"].shape))
            return traced(**inputs)

        return run

    monkeypatch.setattr("policy.native.compiled_forward", recording_forward)
    pol = NativePolicy(ckpt, TAG, compile="torch_compile", batch_buckets=(1, 4), warmup=True)
    assert len(shapes) == 1 and shapes[0][0] == 1 and shapes[0][1] % 64 == 0  # the warm-up, at B=1
    reqs = [(pol.dummy_observation(b, seed=10 + b), {"seed": b}) for b in (1, 2)]
    got = pol.get_actions(reqs)
    assert shapes[-1] == (4, shapes[0][1])  # 3 samples ran in the bucket of 4
    want = fp32.get_actions(reqs)
    for (g, _), (w, _) in zip(got, want):
        for key in w:
            assert g[key].shape == w[key].shape
            np.testing.assert_allclose(g[key], w[key], atol=1e-4, rtol=0)


# ---- devices --------------------------------------------------------------------------------------------------
def test_auto_device_warns_when_a_gpu_is_there_but_torch_cannot_use_it(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loading.glob, "glob", lambda pattern: ["/dev/nvidia0"])
    with caplog.at_level(logging.WARNING, logger=loading.__name__):
        assert loading.resolve_device("auto") == "cpu"
    assert "NVIDIA GPU but torch" in caplog.text and "CUDA build" in caplog.text
    monkeypatch.setattr(loading.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(loading.shutil, "which", lambda name: None)
    assert loading.gpu_present_without_cuda() is None


def test_cuda_index_error_explains_what_the_index_counts(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert loading.resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(ValueError, match=r"sees 1 CUDA device\(s\) \(under Ray, only the replica's assigned GPUs"):
        loading.resolve_device("cuda:1")
