"""Processor: normalisation math, batched preprocessing (images, text, states) and action decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.modality import ActionConfig, ActionRepresentation, ModalityConfig
from policy.checkpoint import CheckpointError, EmbodimentSpec
from policy.make_demo_checkpoint import build_tokenizer
from policy.processor import (
    MEAN_STD,
    MIN_MAX,
    PERCENTILES,
    Processor,
    normalize,
    sin_cos_encode,
    unnormalize,
)

STATS = {
    "min": [-2.0, 0.0, 1.0, 5.0],
    "max": [2.0, 1.7, 3.0, 5.0],  # last dim: max == min
    "mean": [0.1, 0.8, 2.0, 5.0],
    "std": [0.5, 0.3, 0.0, 1.0],  # third dim: std == 0
    "q01": [-1.8, 0.05, 1.1, 5.0],
    "q99": [1.9, 1.6, 2.9, 5.0],
}

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


# ------------------------------------------------------------------------------------------------------------------
# normalize / unnormalize
# ------------------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(finite, finite, finite, finite), min_size=1, max_size=8), st.sampled_from([MIN_MAX, PERCENTILES]))
def test_range_round_trip_inside_bounds(rows, method):
    lo, hi = (STATS["min"], STATS["max"]) if method == MIN_MAX else (STATS["q01"], STATS["q99"])
    x = np.clip(np.asarray(rows, dtype=np.float64), lo, hi)  # inside [lo, hi] the map is invertible
    n = normalize(x, STATS, method)
    assert n.dtype == np.float32 and n.shape == x.shape
    assert (n >= -1).all() and (n <= 1).all()
    back = unnormalize(n, STATS, method)
    np.testing.assert_allclose(back, x, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(finite, finite, finite, finite), min_size=1, max_size=8))
def test_mean_std_round_trip(rows):
    x = np.asarray(rows, dtype=np.float64)
    n = normalize(x, STATS, MEAN_STD)
    np.testing.assert_allclose(unnormalize(n, STATS, MEAN_STD), x, rtol=1e-5, atol=1e-3)
    # std == 0 passes the value through; mean/std is never clipped
    np.testing.assert_allclose(n[:, 2], x[:, 2].astype(np.float32))


def test_min_max_maps_bounds_clips_and_guards_degenerate_dims():
    x = np.array([[-2.0, 0.0, 1.0, 5.0], [2.0, 1.7, 3.0, 5.0], [0.0, 0.85, 2.0, 7.0], [-10, 9, 0, -3]])
    n = normalize(x, STATS, MIN_MAX)
    np.testing.assert_allclose(n[0, :3], -1.0)
    np.testing.assert_allclose(n[1, :3], 1.0)
    np.testing.assert_allclose(n[2, :3], 0.0, atol=1e-6)
    np.testing.assert_array_equal(n[:, 3], 0.0)  # max == min -> 0 whatever the value
    np.testing.assert_array_equal(n[3, :3], [-1.0, 1.0, -1.0])  # clipped
    assert normalize(x, STATS, MIN_MAX, clip=False)[3, 0] == pytest.approx(-5.0)
    # un-normalisation clips to [-1, 1] first and maps a degenerate dim back to its value
    back = unnormalize(np.array([[-3.0, 3.0, 0.0, 0.7]]), STATS, MIN_MAX)
    np.testing.assert_allclose(back, [[-2.0, 1.7, 2.0, 5.0]], rtol=1e-6)


def test_percentiles_use_q01_q99():
    x = np.array([[-1.8, 0.05, 1.1, 5.0], [1.9, 1.6, 2.9, 5.0]])
    n = normalize(x, STATS, PERCENTILES)
    np.testing.assert_allclose(n[:, :3], [[-1, -1, -1], [1, 1, 1]], atol=1e-6)
    assert normalize(np.array([[-2.0, 0, 1, 5]]), STATS, PERCENTILES)[0, 0] == -1.0  # min is beyond q01: clipped


def test_sin_cos_doubles_the_dimension():
    x = np.array([[[0.0, np.pi / 2]]])
    enc = sin_cos_encode(x)
    assert enc.shape == (1, 1, 4)
    np.testing.assert_allclose(enc[0, 0], [0.0, 1.0, 1.0, 0.0], atol=1e-7)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="normalisation method"):
        normalize(np.zeros((1, 4)), STATS, "zscore")


# ------------------------------------------------------------------------------------------------------------------
# A synthetic embodiment: 2 cameras x 2 frames, states with every normalisation, relative / delta / absolute actions
# ------------------------------------------------------------------------------------------------------------------


def _stats(lo, hi):
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    return {"min": lo.tolist(), "max": hi.tolist(), "mean": ((lo + hi) / 2).tolist(), "std": ((hi - lo) / 4).tolist(),
            "q01": (lo + 0.1).tolist(), "q99": (hi - 0.1).tolist()}


def make_spec(action_horizon: int = 8) -> EmbodimentSpec:
    mc = {
        "video": ModalityConfig(delta_indices=[-1, 0], modality_keys=["cam_a", "cam_b"]),
        "state": ModalityConfig(
            delta_indices=[-1, 0],
            modality_keys=["arm", "wrist", "base"],
            sin_cos_embedding_keys=["wrist"],
            mean_std_embedding_keys=["base"],
        ),
        "action": ModalityConfig(
            delta_indices=list(range(action_horizon)),
            modality_keys=["arm", "base", "gripper"],
            mean_std_embedding_keys=["gripper"],
            action_configs=[
                ActionConfig(rep=ActionRepresentation.RELATIVE, state_key="arm"),
                ActionConfig(rep=ActionRepresentation.DELTA, state_key="base"),
                ActionConfig(rep=ActionRepresentation.ABSOLUTE),
            ],
        ),
        "language": ModalityConfig(delta_indices=[0], modality_keys=["task", "task_paraphrase"]),
    }
    stats = {
        "state": {"arm": _stats([-3, -3, -3], [3, 3, 3]), "wrist": _stats([-1, -1], [1, 1]), "base": _stats([0, 0], [4, 8])},
        "action": {"arm": _stats([-3, -3, -3], [3, 3, 3]), "base": _stats([0, 0], [4, 8]), "gripper": _stats([0], [1])},
        "relative_action": {"arm": _stats([-0.5, -0.5, -0.5], [0.5, 0.5, 0.5])},
    }
    return EmbodimentSpec(
        tag="synthetic",
        modality_configs=mc,
        state_dims={"arm": 3, "wrist": 2, "base": 2},
        action_dims={"arm": 3, "base": 2, "gripper": 1},
        statistics=stats,
        embodiment_id=3,
    )


@pytest.fixture(scope="module")
def proc() -> Processor:
    return Processor(
        make_spec(), build_tokenizer(512, 16), image_size=16, max_state_dim=12, max_action_dim=8,
        model_action_horizon=16, max_text_length=16,
    )


def _obs(b, h, w, rng, text="pick the pear"):
    return {
        "video": {c: rng.integers(0, 256, (b, 2, h, w, 3), dtype=np.uint8) for c in ("cam_a", "cam_b")},
        "state": {"arm": rng.uniform(-2, 2, (b, 2, 3)).astype(np.float32),
                  "wrist": rng.uniform(-1, 1, (b, 2, 2)).astype(np.float32),
                  "base": rng.uniform(0, 4, (b, 2, 2)).astype(np.float32)},
        "language": {"task": [[text]] * b, "task_paraphrase": [["ignored"]] * b},
    }


def test_preprocess_shapes_and_dtypes(proc):
    rng = np.random.default_rng(0)
    obs = [_obs(2, 16, 16, rng), _obs(1, 40, 30, rng, "place the cup on the plate please")]
    out = proc.preprocess(obs)
    assert out["pixel_values"].shape == (3, 4, 3, 16, 16) and out["pixel_values"].dtype == torch.float32
    assert out["pixel_values"].min() >= -1 and out["pixel_values"].max() <= 1
    assert out["state"].shape == (3, 2, 12) and out["state"].dtype == torch.float32
    assert out["embodiment_id"] == 3  # one embodiment per batch: an int, the model's gather-free path
    assert out["input_ids"].shape == out["attention_mask"].shape and out["input_ids"].dtype == torch.long
    # right padding: the short prompts are padded at the end, the mask marks real tokens
    mask = out["attention_mask"]
    assert mask[2].all() and not mask[0].all()
    assert (out["input_ids"][0][mask[0] == 0] == proc.tokenizer.pad_token_id).all()
    assert mask[0].tolist() == sorted(mask[0].tolist(), reverse=True)
    bf = proc.preprocess(obs, dtype=torch.bfloat16)
    assert bf["pixel_values"].dtype == torch.bfloat16 and bf["state"].dtype == torch.bfloat16


def test_views_are_cameras_in_key_order_times_frames(proc):
    b, h, w = 1, 20, 24
    obs = {
        "video": {"cam_a": np.zeros((b, 2, h, w, 3), np.uint8), "cam_b": np.full((b, 2, h, w, 3), 255, np.uint8)},
        "state": _obs(b, h, w, np.random.default_rng(1))["state"],
        "language": {"task": ["go"], "task_paraphrase": ["go"]},
    }
    obs["video"]["cam_a"][:, 1] = 51  # second frame of cam_a: 51 -> 51/127.5 - 1 = -0.6
    pv = proc.preprocess([obs])["pixel_values"][0]
    np.testing.assert_allclose(pv[0].numpy(), -1.0, atol=1e-6)  # cam_a frame 0
    np.testing.assert_allclose(pv[1].numpy(), -0.6, atol=1e-5)  # cam_a frame 1
    np.testing.assert_allclose(pv[2:].numpy(), 1.0, atol=1e-6)  # cam_b frames


def test_grouped_resize_equals_per_image_resize(proc):
    rng = np.random.default_rng(2)
    obs = [_obs(2, 40, 30, rng), _obs(1, 16, 16, rng), _obs(3, 40, 30, rng), _obs(1, 9, 70, rng)]
    pv = proc.preprocess(obs)["pixel_values"]
    row = 0
    for o in obs:
        for i in range(o["video"]["cam_a"].shape[0]):
            for ci, cam in enumerate(("cam_a", "cam_b")):
                for t in range(2):
                    img = torch.from_numpy(o["video"][cam][i, t]).permute(2, 0, 1)[None].float()
                    if img.shape[-2:] != (16, 16):
                        img = F.interpolate(img, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
                    want = img[0] / 255.0 * 2 - 1
                    torch.testing.assert_close(pv[row, ci * 2 + t], want, rtol=0, atol=1e-5)
            row += 1


def test_language_uses_first_key_and_truncates(proc):
    rng = np.random.default_rng(3)
    long_text = " ".join(["pick"] * 50)
    obs = [_obs(1, 16, 16, rng, long_text), _obs(1, 16, 16, rng, "pick")]
    out = proc.preprocess(obs)
    assert out["input_ids"].shape[1] == 16  # max_text_length
    ids = proc.tokenizer(["pick"])["input_ids"][0]
    assert out["input_ids"][1, : len(ids)].tolist() == ids
    assert ids[0] == proc.tokenizer.bos_token_id and ids[-1] == proc.tokenizer.eos_token_id


def test_state_encoding_order_methods_and_padding(proc):
    rng = np.random.default_rng(4)
    obs = _obs(2, 16, 16, rng)
    st = proc.preprocess([obs])["state"].numpy()
    s = obs["state"]
    spec = proc.spec
    np.testing.assert_allclose(st[..., 0:3], normalize(s["arm"], spec.statistics["state"]["arm"], MIN_MAX), atol=1e-6)
    np.testing.assert_allclose(st[..., 3:7], sin_cos_encode(s["wrist"]), atol=1e-6)  # sin/cos: 2 -> 4 features
    np.testing.assert_allclose(st[..., 7:9], normalize(s["base"], spec.statistics["state"]["base"], MEAN_STD), atol=1e-6)
    np.testing.assert_array_equal(st[..., 9:], 0.0)  # zero padding to max_state_dim


def test_decode_actions_slices_horizon_and_adds_state_for_relative_and_delta(proc):
    rng = np.random.default_rng(5)
    n = 3
    norm = rng.uniform(-1, 1, (n, 16, 8)).astype(np.float32)
    states = {"arm": rng.uniform(-2, 2, (n, 2, 3)).astype(np.float32),
              "wrist": np.zeros((n, 2, 2), np.float32),
              "base": rng.uniform(0, 4, (n, 2, 2)).astype(np.float32)}
    out = proc.decode_actions(torch.from_numpy(norm), states)
    assert list(out) == ["arm", "base", "gripper"]
    assert out["arm"].shape == (n, 8, 3) and out["base"].shape == (n, 8, 2) and out["gripper"].shape == (n, 8, 1)
    assert all(v.dtype == np.float32 for v in out.values())
    st = proc.spec.statistics
    # RELATIVE: relative_action statistics + the last state step
    want_arm = unnormalize(norm[:, :8, 0:3], st["relative_action"]["arm"]) + states["arm"][:, -1:, :]
    np.testing.assert_allclose(out["arm"], want_arm, atol=1e-5)
    # DELTA: action statistics (no relative_action entry) + the last state step
    want_base = unnormalize(norm[:, :8, 3:5], st["action"]["base"]) + states["base"][:, -1:, :]
    np.testing.assert_allclose(out["base"], want_base, atol=1e-5)
    # ABSOLUTE, mean/std
    np.testing.assert_allclose(out["gripper"], unnormalize(norm[:, :8, 5:6], st["action"]["gripper"], MEAN_STD), atol=1e-6)
    # shifting the state shifts relative actions by exactly that much and leaves absolute ones alone
    shifted = dict(states, arm=states["arm"] + 0.25)
    out2 = proc.decode_actions(norm, shifted)
    np.testing.assert_allclose(out2["arm"] - out["arm"], 0.25, atol=1e-5)
    np.testing.assert_array_equal(out2["gripper"], out["gripper"])


def test_decode_actions_refuses_wrong_shape(proc):
    with pytest.raises(ValueError, match="decode_actions"):
        proc.decode_actions(np.zeros((1, 4, 8), np.float32), {})


def test_processor_refuses_what_the_model_cannot_hold():
    tok = build_tokenizer(512, 16)
    with pytest.raises(CheckpointError, match="max_state_dim"):
        Processor(make_spec(), tok, image_size=16, max_state_dim=8, max_action_dim=8, model_action_horizon=16)
    with pytest.raises(CheckpointError, match="max_action_dim"):
        Processor(make_spec(), tok, image_size=16, max_state_dim=12, max_action_dim=4, model_action_horizon=16)
    with pytest.raises(CheckpointError, match="action steps"):
        Processor(make_spec(action_horizon=20), tok, image_size=16, max_state_dim=12, max_action_dim=8,
                  model_action_horizon=16)
