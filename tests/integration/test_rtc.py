"""Real-time chunking on the server (policy.rtc, the action head's update weights): frozen rows exact, the ramp,
RTC and plain requests in one batch, both request forms, and the errors."""

from __future__ import annotations

import numpy as np
import pytest

from policy import PolicyInputError, load_policy
from policy.rtc import update_weights

H = 16


@pytest.fixture(scope="module")
def gr1(tiny_checkpoint):
    return load_policy(tiny_checkpoint, "gr1", warmup=False)


def noise(pol, b=1, seed=0):
    return np.random.default_rng(seed).standard_normal((b, *pol.noise_shape)).astype(np.float32)


def previous_chunk(pol, obs, seed=1):
    action, _ = pol.get_action(obs, {"noise": noise(pol, len(obs["language"]["annotation.human.task_description"]), seed)})
    return action


def test_update_weights_freeze_then_ramp_then_follow_the_model():
    w = update_weights(H, frozen=3, overlap=8, ramp_rate=6.0).numpy()
    assert (w[:3] == 0).all() and (w[8:] == 1).all()
    np.testing.assert_allclose(w[3:8], [0.634, 0.867, 0.953, 0.984, 0.996], atol=1e-3)
    assert (update_weights(H, 0, 0, 6.0).numpy() == 1).all()


def test_frozen_rows_are_exactly_the_previous_chunk_and_the_rest_moves_on(gr1):
    obs = gr1.dummy_observation(2, seed=3)
    prev = previous_chunk(gr1, obs)
    remaining = {k: v[:, 5:].copy() for k, v in prev.items()}  # 5 steps ran; 11 left, aligned to the new chunk
    rtc = {"prev_actions": remaining, "frozen_steps": 3, "overlap_steps": 8}
    new, _ = gr1.get_action(obs, {"noise": noise(gr1, 2, seed=9), "rtc": rtc})
    plain, _ = gr1.get_action(obs, {"noise": noise(gr1, 2, seed=9)})
    for key in new:  # relative keys (arms, waist) too: re-anchored on the current state, then exact
        np.testing.assert_allclose(new[key][:, :3], remaining[key][:, :3], atol=1e-5)
        assert np.abs(new[key][:, 3:8] - remaining[key][:, 3:8]).max() < np.abs(plain[key][:, 3:8] - remaining[key][:, 3:8]).max()
    jump_rtc = max(np.abs(new[k][:, 3] - remaining[k][:, 2]).max() for k in new)
    jump_plain = max(np.abs(plain[k][:, 3] - remaining[k][:, 2]).max() for k in new)
    assert jump_rtc < jump_plain  # continuing the old chunk, not jumping to a fresh one


def test_rtc_and_plain_requests_share_a_forward_pass_with_unchanged_answers(gr1):
    a, b = gr1.dummy_observation(1, seed=4), gr1.dummy_observation(2, seed=5)
    rtc = {"prev_actions": {k: v[:, 4:] for k, v in previous_chunk(gr1, a).items()}, "frozen_steps": 2}
    alone_rtc, _ = gr1.get_action(a, {"noise": noise(gr1, 1, 6), "rtc": rtc})
    alone_plain, _ = gr1.get_action(b, {"noise": noise(gr1, 2, 7)})
    (both_rtc, _), (both_plain, _) = gr1.get_actions([(a, {"noise": noise(gr1, 1, 6), "rtc": rtc}),
                                                       (b, {"noise": noise(gr1, 2, 7)})])
    for key in alone_rtc:
        np.testing.assert_allclose(both_rtc[key], alone_rtc[key], atol=1e-5)
        np.testing.assert_allclose(both_plain[key], alone_plain[key], atol=1e-5)


def test_upstream_form_takes_the_last_overlap_rows_of_the_observations_action(gr1):
    obs = gr1.dummy_observation(1, seed=8)
    prev = previous_chunk(gr1, obs)
    upstream = {**obs, "action": {k: v[:, 8:].copy() for k, v in prev.items()}}  # 8 rows handed over
    new, _ = gr1.get_action(upstream, {"noise": noise(gr1, 1, 2), "rtc_overlap_steps": 4, "rtc_frozen_steps": 2})
    for key in ("left_hand", "right_hand"):  # absolute keys: the frozen rows decode back to rows 12, 13 given
        np.testing.assert_allclose(new[key][:, :2], prev[key][:, 12:14], atol=1e-4)
    same, _ = gr1.get_action({**obs, "action": prev}, {"noise": noise(gr1, 1, 2)})  # no rtc_* options: ignored
    plain, _ = gr1.get_action(obs, {"noise": noise(gr1, 1, 2)})
    np.testing.assert_array_equal(same["left_hand"], plain["left_hand"])


@pytest.mark.parametrize("rtc, message", [
    ("yes", r"options.rtc: expected a map with prev_actions"),
    ({"prev_actions": {}, "frozen_steps": 1, "speed": 2}, r"options.rtc: unknown key\(s\) 'speed'"),
    ({"prev_actions": {}, "frozen_steps": 1}, r"options.rtc.prev_actions.left_arm: expected float32 array of shape \(1, n, 7\)"),
    ({"prev_actions": "FULL", "frozen_steps": 1}, r"options.rtc.prev_actions: expected a map"),
    ({"prev_actions": "ARMS", "frozen_steps": 5, "overlap_steps": 4}, r"options.rtc.frozen_steps: expected an int in \[0, 4\], got 5"),
    ({"prev_actions": "ARMS", "frozen_steps": 1, "overlap_steps": 9}, r"options.rtc.overlap_steps: expected an int in \[1, 8\], got 9"),
    ({"prev_actions": "ARMS", "frozen_steps": 1, "ramp_rate": -1}, r"options.rtc.ramp_rate: expected a positive number"),
    ({"prev_actions": "NAN", "frozen_steps": 1}, r"options.rtc.prev_actions.left_arm: expected finite values"),
])
def test_bad_rtc_requests_are_refused_naming_the_field(gr1, rtc, message):
    obs = gr1.dummy_observation(1)
    good = {k: np.zeros((1, 8, d), np.float32) for k, d in gr1.action_dims.items()}
    if isinstance(rtc, dict) and rtc.get("prev_actions") == "ARMS":
        rtc = {**rtc, "prev_actions": good}
    elif isinstance(rtc, dict) and rtc.get("prev_actions") == "NAN":
        rtc = {**rtc, "prev_actions": {**good, "left_arm": np.full((1, 8, 7), np.nan, np.float32)}}
    elif isinstance(rtc, dict) and rtc.get("prev_actions") == "FULL":
        rtc = {**rtc, "prev_actions": [1, 2]}
    with pytest.raises(PolicyInputError, match=message):
        gr1.get_action(obs, {"rtc": rtc})
    with pytest.raises(PolicyInputError, match=r"options.rtc_frozen_steps: expected an int in \[0, 3\], got 4"):
        gr1.get_action({**obs, "action": {k: v[:, :3] for k, v in good.items()}},
                       {"rtc_overlap_steps": 3, "rtc_frozen_steps": 4})
