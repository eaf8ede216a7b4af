"""States in, actions out (policy.state_action): GR00T's normalisation rules, relative and end-effector actions,
on a synthetic embodiment. NVIDIA's own numbers are checked in tests/test_gr00t_n16_parity.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clients.modality import ActionConfig, ActionFormat, ActionRepresentation, ActionType, ModalityConfig
from policy.checkpoint import CheckpointError, EmbodimentSpec
from policy.state_action import StateActionCodec, compose_poses, matrix_to_rotvec, rot6d_to_matrix, rotvec_to_matrix

H = 4


def stats(lo, hi, mean=None, std=None, q01=None, q99=None):
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    return {"min": lo.tolist(), "max": hi.tolist(),
            "mean": (np.asarray(mean) if mean is not None else (lo + hi) / 2).tolist(),
            "std": (np.asarray(std) if std is not None else (hi - lo) / 4).tolist(),
            "q01": (np.asarray(q01) if q01 is not None else lo + 0.1 * (hi - lo)).tolist(),
            "q99": (np.asarray(q99) if q99 is not None else hi - 0.1 * (hi - lo)).tolist()}


def spec(action_configs=None, mean_std_actions=None, eef: ActionFormat | None = None) -> EmbodimentSpec:
    pose_dim = 9 if eef == ActionFormat.XYZ_ROT6D else 6
    state_dims = {"arm": 3, "wrist": 2, "leg": 2, **({"ee": pose_dim} if eef else {})}
    action_dims = {"arm": 3, "grip": 1, **({"ee": pose_dim} if eef else {})}
    mcs = {
        "video": ModalityConfig([0], ["cam"]),
        "state": ModalityConfig([0], list(state_dims), sin_cos_embedding_keys=["wrist"], mean_std_embedding_keys=["leg"]),
        "action": ModalityConfig(list(range(H)), list(action_dims), mean_std_embedding_keys=mean_std_actions,
                                 action_configs=action_configs),
        "language": ModalityConfig([0], ["task"]),
    }
    st_ = {"arm": stats([-2, 0, 5], [2, 1, 5]), "wrist": stats([-3, -3], [3, 3]),
           "leg": stats([-1, -1], [1, 1], mean=[0.5, 0.0], std=[2.0, 0.0])}
    act = {"arm": stats([-2, 0, 5], [2, 1, 5]), "grip": stats([0], [1], mean=[0.3], std=[0.2])}
    rel = {"arm": stats(np.full((H, 3), -0.1) * np.arange(1, H + 1)[:, None], np.full((H, 3), 0.1) * np.arange(1, H + 1)[:, None])}
    if eef:
        st_["ee"] = stats(np.full(pose_dim, -1.0), np.full(pose_dim, 1.0))
        act["ee"] = stats(np.full(pose_dim, -1.0), np.full(pose_dim, 1.0))
        rel["ee"] = stats(np.full((H, pose_dim), -0.5), np.full((H, pose_dim), 0.5))
    return EmbodimentSpec("robot", mcs, state_dims, action_dims, {"state": st_, "action": act, "relative_action": rel}, 7)


def codec(s: EmbodimentSpec, **kw) -> StateActionCodec:
    kw.setdefault("apply_sincos_state_encoding", True)
    kw.setdefault("use_relative_action", True)
    return StateActionCodec(s, max_state_dim=32, max_action_dim=16, model_action_horizon=8, **kw)


REL_ARM = [ActionConfig(ActionRepresentation.RELATIVE, ActionType.NON_EEF, state_key="arm"), ActionConfig()]


def states(arm, wrist=(0.0, 0.0), leg=(0.0, 0.0)):
    return {"arm": np.asarray([[arm]], np.float32), "wrist": np.asarray([[wrist]], np.float32),
            "leg": np.asarray([[leg]], np.float32)}


def test_state_rules_order_and_padding():
    c = codec(spec())
    out = c.encode_states(states([2.0, 0.5, 7.0], wrist=[0.0, np.pi / 2], leg=[1.5, 3.0]))
    assert out.shape == (1, 1, 32) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, :3], [1.0, 0.0, 0.0], atol=1e-7)  # min/max; max == min -> 0
    np.testing.assert_allclose(out[0, 0, 3:7], [0.0, 1.0, 1.0, 0.0], atol=1e-7)  # [sin, cos], width doubled
    np.testing.assert_allclose(out[0, 0, 7:9], [0.5, 3.0])  # mean/std; std 0 passes through, never clipped
    assert (out[0, 0, 9:] == 0).all() and c.encoded_state_dim == 9


def test_clip_outliers_percentiles_and_sincos_switch():
    far = states([-10.0, 3.0, 5.0])
    np.testing.assert_array_equal(codec(spec()).encode_states(far)[0, 0, :2], [-1.0, 1.0])
    assert codec(spec(), clip_outliers=False).encode_states(far)[0, 0, 0] == pytest.approx(-5.0)
    # q01/q99 of arm[0] are -1.6 / 1.6: -1.6 -> -1
    assert codec(spec(), use_percentiles=True).encode_states(states([-1.6, 0, 5]))[0, 0, 0] == pytest.approx(-1.0)
    plain = codec(spec(), apply_sincos_state_encoding=False)
    assert plain.encoded_state_dim == 7  # wrist normalised by min/max instead, not doubled


def test_state_too_wide_for_the_model_is_refused():
    with pytest.raises(CheckpointError, match="encodes 9 state features, more than the model's max_state_dim 8"):
        StateActionCodec(spec(), max_state_dim=8, max_action_dim=16, model_action_horizon=8,
                         apply_sincos_state_encoding=True)


def test_decode_absolute_mean_std_and_relative_per_step():
    c = codec(spec(REL_ARM, mean_std_actions=["grip"]))
    y = np.zeros((1, 8, 16), np.float32)
    y[0, :, 0] = 1.5  # clipped to 1
    y[0, :, 3] = 2.0  # mean/std: not clipped
    raw = states([0.3, 0.2, 5.0])
    out = c.decode_actions(y, raw)
    assert set(out) == {"arm", "grip"} and out["arm"].shape == (1, H, 3) and out["grip"].shape == (1, H, 1)
    step = np.arange(1, H + 1) * 0.1
    np.testing.assert_allclose(out["arm"][0, :, 0], 0.3 + step, rtol=1e-6)  # per-step max, plus the state
    np.testing.assert_allclose(out["arm"][0, :, 1], 0.2, atol=1e-6)  # 0 -> the middle of the per-step range
    np.testing.assert_allclose(out["grip"][0, :, 0], 0.3 + 2.0 * 0.2, rtol=1e-6)
    off = codec(spec(REL_ARM), use_relative_action=False).decode_actions(y, raw)
    np.testing.assert_allclose(off["arm"][0, :, 0], 2.0)  # absolute statistics, no state added
    pct = codec(spec(REL_ARM), use_percentiles=True).decode_actions(y, raw)
    np.testing.assert_allclose(pct["arm"], out["arm"], rtol=1e-6)  # relative keys never use percentiles


def test_relative_keys_need_their_statistics_and_a_matching_state():
    s = spec(REL_ARM)
    del s.statistics["relative_action"]["arm"]
    with pytest.raises(CheckpointError, match="'robot.relative_action.arm' is missing"):
        codec(s)
    bad = [ActionConfig(ActionRepresentation.RELATIVE, ActionType.NON_EEF, state_key="leg"), ActionConfig()]
    with pytest.raises(CheckpointError, match="RELATIVE to state 'leg', which has 2 dims"):
        codec(spec(bad))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-0.99, 0.99), min_size=H * 4, max_size=H * 4))
def test_normalize_actions_inverts_decode_inside_the_clip_range(values):
    c = codec(spec(REL_ARM))
    y = np.zeros((1, H, 16), np.float32)
    y[0, :, :4] = np.asarray(values, np.float32).reshape(H, 4)
    y[0, :, 2] = 0.0  # arm[2] has max == min: it normalises to 0 whatever it decoded to
    raw = states([0.3, 0.2, 5.0])
    back = c.normalize_actions(c.decode_actions(y, raw), raw)
    np.testing.assert_allclose(back, y[0:1, :, :4], atol=1e-5)


def _random_rotations(rng, n):
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    x, y, z, w = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)], -2)


def test_rotation_conversions_round_trip():
    rng = np.random.default_rng(0)
    r = _random_rotations(rng, 64)
    np.testing.assert_allclose(rotvec_to_matrix(matrix_to_rotvec(r)), r, atol=1e-9)
    np.testing.assert_allclose(rot6d_to_matrix(r[:, :2, :].reshape(-1, 6)), r, atol=1e-12)
    small = np.array([[1e-9, 0, 0], [0, 0, 0]])
    np.testing.assert_allclose(matrix_to_rotvec(rotvec_to_matrix(small)), small, atol=1e-12)
    near_pi = np.array([[np.pi - 1e-7, 0, 0], [0, np.pi, 0]])
    np.testing.assert_allclose(np.abs(matrix_to_rotvec(rotvec_to_matrix(near_pi))), np.abs(near_pi), atol=1e-6)


@pytest.mark.parametrize("fmt", [ActionFormat.XYZ_ROT6D, ActionFormat.XYZ_ROTVEC])
def test_end_effector_relative_actions_compose_with_the_state_pose(fmt):
    rng = np.random.default_rng(1)
    r_ref, r_rel = _random_rotations(rng, 1)[0], _random_rotations(rng, H)
    t_ref, t_rel = rng.normal(size=3), rng.normal(size=(H, 3))

    def encode(r, t):
        rot = r[..., :2, :].reshape(r.shape[:-2] + (6,)) if fmt == ActionFormat.XYZ_ROT6D else matrix_to_rotvec(r)
        return np.concatenate([t, rot], -1)

    got = compose_poses(encode(r_rel, t_rel)[None], encode(r_ref, t_ref)[None], fmt)[0]
    want = encode(r_ref @ r_rel, (r_ref @ t_rel[..., None])[..., 0] + t_ref)
    np.testing.assert_allclose(got, want, atol=1e-9)
    ee = [ActionConfig(ActionRepresentation.RELATIVE, ActionType.NON_EEF, state_key="arm"), ActionConfig(),
          ActionConfig(ActionRepresentation.RELATIVE, ActionType.EEF, fmt, state_key="ee")]
    c = codec(spec(ee, eef=fmt))
    identity = encode(np.eye(3)[None].repeat(H, 0), np.zeros((H, 3)))
    y = np.zeros((1, 8, 16), np.float32)
    y[0, :H, 4:4 + identity.shape[1]] = identity / 0.5  # relative stats are -0.5..0.5: identity normalised
    raw = dict(states([0, 0, 5]), ee=encode(r_ref, t_ref)[None, None].astype(np.float32))
    out = c.decode_actions(y, raw)["ee"][0]
    np.testing.assert_allclose(out, np.repeat(raw["ee"][0], H, 0), atol=1e-6)  # identity keeps the state's pose


def test_end_effector_default_format_is_refused():
    ee = [ActionConfig(), ActionConfig(), ActionConfig(ActionRepresentation.RELATIVE, ActionType.EEF, ActionFormat.DEFAULT, "ee")]
    with pytest.raises(CheckpointError, match="RELATIVE end-effector action in format DEFAULT"):
        codec(spec(ee, eef=ActionFormat.XYZ_ROTVEC))
