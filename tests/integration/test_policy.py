"""NativePolicy end to end on the tiny demo checkpoint (real torch model): shapes, seeds, batching, strict checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import msgpack
import numpy as np
import pytest

from policy import PolicyInputError, load_policy
from policy.base import validate_options
from policy.checkpoint import CheckpointError
from policy.loading import resolve_device
from policy.native import NativePolicy

GR1_CAM = "ego_view_bg_crop_pad_res256_freq20"
LANG = "annotation.human.task_description"


@pytest.fixture(scope="module")
def gr1(tiny_checkpoint) -> NativePolicy:
    return load_policy(tiny_checkpoint, "gr1")


@pytest.fixture(scope="module")
def g1(tiny_checkpoint) -> NativePolicy:
    return load_policy(tiny_checkpoint, "EmbodimentTag.UNITREE_G1")


def gr1_obs(b=1, h=256, w=256, seed=0, text="pick the pear from the counter and place it in the plate"):
    rng = np.random.default_rng(seed)
    dims = {"left_arm": 7, "right_arm": 7, "left_hand": 6, "right_hand": 6, "waist": 3}
    return {
        "video": {GR1_CAM: rng.integers(0, 256, (b, 1, h, w, 3), dtype=np.uint8)},
        "state": {k: rng.uniform(-0.5, 0.5, (b, 1, d)).astype(np.float32) for k, d in dims.items()},
        "language": {LANG: [[text]] * b},
    }


# ------------------------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------------------------


def test_gr1_action_shapes_and_dtypes(gr1):
    action, info = gr1.get_action(gr1_obs(b=2), {"seed": 0})
    assert info == {}
    assert list(action) == ["left_arm", "right_arm", "left_hand", "right_hand", "waist"]
    dims = {"left_arm": 7, "right_arm": 7, "left_hand": 6, "right_hand": 6, "waist": 3}
    for k, d in dims.items():
        assert action[k].shape == (2, 16, d) and action[k].dtype == np.float32
        assert np.isfinite(action[k]).all()


def test_unitree_g1_action_shapes_and_dtypes(g1):
    assert g1.embodiment_tag == "unitree_g1"
    obs = g1.dummy_observation(3, height=120, width=160)
    assert list(obs["video"]) == ["ego_view", "wrist_view"]
    action, _ = g1.get_action(obs)
    want = {"left_arm": 7, "right_arm": 7, "left_hand": 7, "right_hand": 7, "waist": 3, "base_height_command": 1}
    assert {k: v.shape for k, v in action.items()} == {k: (3, 16, d) for k, d in want.items()}
    assert all(v.dtype == np.float32 for v in action.values())


def test_actions_are_physical_and_relative_to_state(gr1, tiny_checkpoint):
    """Hands (ABSOLUTE) stay inside their statistics; arms (RELATIVE) stay within the relative range of the state."""
    stats = json.loads((Path(tiny_checkpoint) / "statistics.json").read_text())["gr1"]
    obs = gr1_obs(b=2, seed=5)
    action, _ = gr1.get_action(obs, {"seed": 1})
    lo, hi = np.array(stats["action"]["left_hand"]["min"]), np.array(stats["action"]["left_hand"]["max"])
    assert (action["left_hand"] >= lo - 1e-5).all() and (action["left_hand"] <= hi + 1e-5).all()
    rel = stats["relative_action"]["left_arm"]
    delta = action["left_arm"] - obs["state"]["left_arm"][:, -1:, :]
    assert (delta >= np.array(rel["min"]) - 1e-5).all() and (delta <= np.array(rel["max"]) + 1e-5).all()


def test_describe_is_plain_data(gr1, tiny_checkpoint):
    d = gr1.describe()
    assert msgpack.unpackb(msgpack.packb(d)) == d
    assert d["state_dims"] == {"left_arm": 7, "right_arm": 7, "left_hand": 6, "right_hand": 6, "waist": 3}
    assert d["action_dims"] == d["state_dims"]
    assert d["action_horizon"] == 16 and d["video_keys"] == [GR1_CAM] and d["language_keys"] == [LANG]
    assert d["image_size"] == [56, 56]  # the tiny preset's square side (shortest_image_edge 56, a multiple of 28)
    m = d["model"]
    assert m["backend"] == "native" and m["path"] == str(Path(tiny_checkpoint)) and m["preset"] == "tiny"
    assert m["parameters"] > 0 and m["device"] == "cpu" and m["dtype"] == "float32"
    assert set(d["modality_config"]) == {"video", "state", "action", "language"}
    assert d["modality_config"]["action"]["action_configs"][0] == {
        "rep": "RELATIVE", "type": "NON_EEF", "format": "DEFAULT", "state_key": "left_arm"}


def test_modality_config_and_reset(gr1):
    mc = gr1.get_modality_config()
    assert set(mc) == {"video", "state", "action", "language"}
    assert mc["video"].modality_keys == [GR1_CAM]
    assert len(mc["action"].delta_indices) == 16
    assert gr1.reset() == {} and gr1.reset({"episode": 1}) == {}
    with pytest.raises(PolicyInputError, match="options"):
        gr1.reset([1])


# ------------------------------------------------------------------------------------------------------------------
# Seeds and batching
# ------------------------------------------------------------------------------------------------------------------


def test_same_seed_same_actions_different_seed_different(gr1):
    obs = gr1_obs(b=2)
    a1, _ = gr1.get_action(obs, {"seed": 7})
    a2, _ = gr1.get_action(obs, {"seed": 7})
    a3, _ = gr1.get_action(obs, {"seed": 8})
    for k in a1:
        np.testing.assert_array_equal(a1[k], a2[k])
    assert any(not np.allclose(a1[k], a3[k]) for k in a1)
    u1, _ = gr1.get_action(obs)
    u2, _ = gr1.get_action(obs)
    assert any(not np.allclose(u1[k], u2[k]) for k in u1)  # unseeded: fresh noise


def test_get_actions_equals_separate_calls_with_mixed_batch_sizes_and_resolutions(gr1):
    requests = [
        (gr1_obs(b=1, h=256, w=256, seed=1), {"seed": 11}),
        (gr1_obs(b=3, h=32, w=32, seed=2, text="open the drawer"), {"seed": 12}),
        (gr1_obs(b=2, h=48, w=64, seed=3, text="Put the red cube in the basket, then wave!"), {"seed": 13}),
        (gr1_obs(b=1, h=256, w=256, seed=4, text="x"), {"seed": 14}),
    ]
    batched = gr1.get_actions(requests)
    assert len(batched) == 4
    for (obs, opts), (action, info) in zip(requests, batched):
        alone, _ = gr1.get_action(obs, opts)
        assert info == {}
        for k in alone:
            assert action[k].shape == alone[k].shape
            np.testing.assert_allclose(action[k], alone[k], atol=1e-5, rtol=0)


def test_get_actions_two_cameras_with_different_resolutions(g1):
    r1 = (g1.dummy_observation(2, height=64, width=80, seed=1), {"seed": 1})
    obs = g1.dummy_observation(1, seed=2)
    obs["video"]["wrist_view"] = np.random.default_rng(3).integers(0, 256, (1, 1, 24, 40, 3), dtype=np.uint8)
    r2 = (obs, {"seed": 2})
    batched = g1.get_actions([r1, r2])
    for (o, opts), (action, _) in zip([r1, r2], batched):
        alone, _ = g1.get_action(o, opts)
        for k in alone:
            np.testing.assert_allclose(action[k], alone[k], atol=1e-5, rtol=0)


def test_return_exceptions_isolates_a_bad_request(gr1):
    good1 = (gr1_obs(b=2, seed=1), {"seed": 3})
    bad = gr1_obs(b=1, seed=2)
    bad["state"]["waist"] = bad["state"]["waist"].astype(np.float64)
    good2 = (gr1_obs(b=1, seed=3), {"seed": 4})
    res = gr1.get_actions([good1, (bad, None), good2, (gr1_obs(), {"seed": "x"})], return_exceptions=True)
    assert isinstance(res[1], PolicyInputError) and "state.waist" in str(res[1])
    assert isinstance(res[3], PolicyInputError) and "options.seed" in str(res[3])
    for (obs, opts), r in ((good1, res[0]), (good2, res[2])):
        alone, _ = gr1.get_action(obs, opts)
        for k in alone:
            np.testing.assert_allclose(r[0][k], alone[k], atol=1e-5, rtol=0)
    with pytest.raises(PolicyInputError, match="state.waist"):
        gr1.get_actions([good1, (bad, None)])
    assert gr1.get_actions([(bad, None)], return_exceptions=True)[0].__class__ is PolicyInputError
    assert gr1.get_actions([]) == []


def test_bare_observations_are_accepted_as_requests(gr1):
    (action, info), = gr1.get_actions([gr1_obs()])
    assert action["waist"].shape == (1, 16, 3)


# ------------------------------------------------------------------------------------------------------------------
# Strict checks: each names the key, what was expected and what came
# ------------------------------------------------------------------------------------------------------------------


def _refused(policy, obs, *fragments):
    with pytest.raises(PolicyInputError) as ei:
        policy.validate_observation(obs)
    msg = str(ei.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    with pytest.raises(PolicyInputError):
        policy.get_action(obs)
    return msg


def test_valid_observation_returns_batch_size(gr1):
    assert gr1.validate_observation(gr1_obs(b=3)) == 3
    obs = gr1_obs(b=2)
    obs["action"] = {"left_arm": np.zeros((2, 16, 7), np.float32)}  # as the N1.6 tutorial sends: ignored
    obs["language"][LANG] = ["a", "b"]  # list of B strings
    assert gr1.validate_observation(obs) == 2
    obs["language"][LANG] = ("a", "b")  # tuple (the sim wrapper's form)
    assert gr1.validate_observation(obs) == 2


def test_missing_camera(g1):
    obs = g1.dummy_observation(1)
    del obs["video"]["wrist_view"]
    _refused(g1, obs, "video.wrist_view", "expected uint8 array of shape (B, 1, H, W, 3)", "missing")


def test_missing_state_key_and_modality(gr1):
    obs = gr1_obs()
    del obs["state"]["waist"]
    _refused(gr1, obs, "state.waist", "(B, 1, 3)", "missing")
    obs = gr1_obs()
    del obs["language"]
    _refused(gr1, obs, "language", LANG, "got nothing")


def test_wrong_state_dtype(gr1):
    obs = gr1_obs()
    obs["state"]["left_arm"] = obs["state"]["left_arm"].astype(np.float64)
    msg = _refused(gr1, obs, "state.left_arm")
    assert msg == "state.left_arm: expected float32 array of shape (B, 1, 7), got float64 (1, 1, 7)"


def test_wrong_video_dtype_shape_and_channels(gr1):
    obs = gr1_obs()
    obs["video"][GR1_CAM] = obs["video"][GR1_CAM].astype(np.float32)
    _refused(gr1, obs, f"video.{GR1_CAM}", "uint8", "got float32 (1, 1, 256, 256, 3)")
    obs = gr1_obs()
    obs["video"][GR1_CAM] = obs["video"][GR1_CAM][:, 0]
    _refused(gr1, obs, f"video.{GR1_CAM}", "(B, 1, H, W, 3)", "got uint8 (1, 256, 256, 3)")
    obs = gr1_obs()
    obs["video"][GR1_CAM] = np.zeros((1, 1, 8, 8, 4), np.uint8)
    _refused(gr1, obs, "got uint8 (1, 1, 8, 8, 4)", "channels")
    obs = gr1_obs()
    obs["video"][GR1_CAM] = obs["video"][GR1_CAM].tolist()
    _refused(gr1, obs, f"video.{GR1_CAM}", "got list")


def test_wrong_T(gr1):
    obs = gr1_obs()
    obs["state"]["left_arm"] = np.zeros((1, 2, 7), np.float32)
    _refused(gr1, obs, "state.left_arm", "(B, 1, 7)", "got float32 (1, 2, 7)", "T must be 1")
    obs = gr1_obs()
    obs["video"][GR1_CAM] = np.zeros((1, 2, 8, 8, 3), np.uint8)
    _refused(gr1, obs, f"video.{GR1_CAM}", "(B, 1, H, W, 3)", "got uint8 (1, 2, 8, 8, 3)")


def test_wrong_D(gr1):
    obs = gr1_obs()
    obs["state"]["right_hand"] = np.zeros((1, 1, 7), np.float32)
    _refused(gr1, obs, "state.right_hand", "(B, 1, 6)", "got float32 (1, 1, 7)")


def test_batch_sizes_disagree(gr1):
    obs = gr1_obs(b=2)
    obs["state"]["left_arm"] = np.zeros((3, 1, 7), np.float32)
    msg = _refused(gr1, obs)
    assert msg == f"batch sizes disagree: video.{GR1_CAM} has B=2, state.left_arm has B=3"
    obs = gr1_obs(b=2)
    obs["language"][LANG] = [["a"]]
    _refused(gr1, obs, "batch sizes disagree", f"language.{LANG} has B=1")


@pytest.mark.parametrize(
    "value, got",
    [
        ("pick the pear", "got str"),
        ([["a", "b"]], "got list of length 2 at [0]"),
        ([[1]], "got list of length 1 at [0]"),
        ([None], "got null at [0]"),
        ({"text": "a"}, "got dict"),
        ([], "B=0"),
    ],
)
def test_bad_language(gr1, value, got):
    obs = gr1_obs(b=1)
    obs["language"][LANG] = value
    if value == []:
        obs = gr1_obs(b=1)
        obs = {"video": {GR1_CAM: obs["video"][GR1_CAM][:0]}, "state": {k: v[:0] for k, v in obs["state"].items()},
               "language": {LANG: []}}
        _refused(gr1, obs, got, "at least 1")
    else:
        _refused(gr1, obs, f"language.{LANG}", "expected a list of B lists of 1 string", got)


@pytest.mark.parametrize("bad, kind", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_non_finite_state(gr1, bad, kind):
    obs = gr1_obs(b=2)
    obs["state"]["waist"][1, 0, 2] = bad
    _refused(gr1, obs, "state.waist", "expected finite values", f"got {kind} at index [1, 0, 2]")


def test_options_are_checked(gr1):
    for bad, got in (("7", "got str '7'"), (1.5, "got float"), (True, "got bool"), ([1], "got list")):
        with pytest.raises(PolicyInputError, match="options.seed: expected an int") as ei:
            gr1.get_action(gr1_obs(), {"seed": bad})
        assert got in str(ei.value)
    with pytest.raises(PolicyInputError, match="options: expected a map or null, got list"):
        gr1.get_action(gr1_obs(), [("seed", 1)])
    assert validate_options({"seed": np.int64(3), "other": 1}) == {"seed": 3, "other": 1}
    assert validate_options({"seed": -1})["seed"] == 2**64 - 1
    assert validate_options(None) == {}


def test_batch_limit(tiny_checkpoint):
    policy = load_policy(tiny_checkpoint, "gr1", max_batch_per_request=2)
    _refused(policy, gr1_obs(b=3, h=32, w=32), "at most 2 samples per request", "B=3")


def test_unknown_keys_strict_vs_lenient(gr1, tiny_checkpoint):
    obs = gr1_obs()
    obs["state"]["tail"] = np.zeros((1, 1, 1), np.float32)
    _refused(gr1, obs, "state", "'tail'", "strict")
    obs2 = gr1_obs()
    obs2["proprio"] = {}
    _refused(gr1, obs2, "observation", "'proprio'")
    lenient = load_policy(tiny_checkpoint, "gr1", strict=False)
    assert lenient.validate_observation(obs) == 1 and lenient.validate_observation(obs2) == 1


def test_lenient_mode_casts_but_refuses_what_cannot_run(tiny_checkpoint, gr1):
    lenient = load_policy(tiny_checkpoint, "gr1", strict=False)
    obs = gr1_obs(b=2, seed=9)
    cast = {**obs, "state": {k: v.astype(np.float64) for k, v in obs["state"].items()}}
    cast["video"] = {GR1_CAM: obs["video"][GR1_CAM].astype(np.int64)}
    a, _ = lenient.get_action(cast, {"seed": 5})
    b, _ = gr1.get_action(obs, {"seed": 5})
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5)
    wrong_d = gr1_obs()
    wrong_d["state"]["waist"] = np.zeros((1, 1, 4))
    _refused(lenient, wrong_d, "state.waist", "(B, 1, 3)")
    missing = gr1_obs()
    del missing["state"]["waist"]
    _refused(lenient, missing, "state.waist", "missing")
    floats = gr1_obs()
    floats["video"][GR1_CAM] = floats["video"][GR1_CAM].astype(np.float32)
    _refused(lenient, floats, f"video.{GR1_CAM}", "uint8")


def test_observation_not_a_map(gr1):
    with pytest.raises(PolicyInputError, match="observation: expected a map"):
        gr1.validate_observation([1, 2])
    with pytest.raises(PolicyInputError, match="request 0: expected an"):
        gr1.get_actions([(1, 2, 3)])


# ------------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------------


def test_unknown_tag_lists_the_checkpoint_tags(tiny_checkpoint):
    with pytest.raises(CheckpointError) as ei:
        load_policy(tiny_checkpoint, "oxe_widowx")
    msg = str(ei.value)
    assert "'oxe_widowx'" in msg and "gr1, unitree_g1" in msg and "processor_config.json" in msg


def test_tags_resolve_case_insensitively(tiny_checkpoint):
    for tag in ("GR1", "EmbodimentTag.GR1", " gr1 "):
        assert load_policy(tiny_checkpoint, tag).embodiment_tag == "gr1"


def _copy(src, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_broken_checkpoints_name_the_file(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match=r"not a checkpoint directory: .*nowhere \(does not exist\)"):
        load_policy(tmp_path / "nowhere", "gr1")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"not a checkpoint directory: .*empty \(no config.json\)"):
        load_policy(empty, "gr1")

    c = _copy(tiny_checkpoint, tmp_path / "no_stats_key")
    stats = json.loads((c / "statistics.json").read_text())
    del stats["gr1"]
    (c / "statistics.json").write_text(json.dumps(stats))
    with pytest.raises(CheckpointError, match=r"checkpoint .*no_stats_key/statistics.json: missing key 'gr1'"):
        load_policy(c, "gr1")

    c = _copy(tiny_checkpoint, tmp_path / "short_stats")
    stats = json.loads((c / "statistics.json").read_text())
    stats["gr1"]["state"]["waist"]["max"] = [1.0]
    (c / "statistics.json").write_text(json.dumps(stats))
    with pytest.raises(CheckpointError, match=r"statistics.json: gr1.state.waist.max: 1 values, the other statistics of 'waist' have 3 values"):
        load_policy(c, "gr1")

    c = _copy(tiny_checkpoint, tmp_path / "bad_json")
    (c / "processor_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"bad_json/processor_config.json: not valid JSON"):
        load_policy(c, "gr1")

    c = _copy(tiny_checkpoint, tmp_path / "no_ids")
    (c / "embodiment_id.json").write_text("{}")
    assert load_policy(c, "gr1", warmup=False).describe()["model"]["embodiment_id"] == 20  # NVIDIA's row for gr1
    pc = json.loads((c / "processor_config.json").read_text())
    pc["processor_kwargs"]["modality_configs"]["my_arm"] = pc["processor_kwargs"]["modality_configs"]["gr1"]
    (c / "processor_config.json").write_text(json.dumps(pc))
    stats = json.loads((c / "statistics.json").read_text())
    stats["my_arm"] = stats["gr1"]
    (c / "statistics.json").write_text(json.dumps(stats))
    with pytest.raises(CheckpointError, match=r"no_ids/embodiment_id.json: missing key 'my_arm'"):
        load_policy(c, "my_arm")

    c = _copy(tiny_checkpoint, tmp_path / "no_weights")
    (c / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no_weights/model.safetensors: file is missing"):
        load_policy(c, "gr1")

    c = _copy(tiny_checkpoint, tmp_path / "bad_weights")
    (c / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"checkpoint .*bad_weights/model.safetensors: cannot load the weights"):
        load_policy(c, "gr1")

    c = _copy(tiny_checkpoint, tmp_path / "no_tokenizer")
    (c / "backbone" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"do not carry their tokenizer; point `tokenizer:` at the backbone's"):
        load_policy(c, "gr1")

    c = _copy(tiny_checkpoint, tmp_path / "bad_modality")
    pc = json.loads((c / "processor_config.json").read_text())
    del pc["processor_kwargs"]["modality_configs"]["gr1"]["state"]
    (c / "processor_config.json").write_text(json.dumps(pc))
    with pytest.raises(CheckpointError, match=r"processor_config.json: missing key 'processor_kwargs.modality_configs.gr1.state'"):
        load_policy(c, "gr1")


def test_save_load_round_trip_gives_identical_actions(gr1, tiny_checkpoint, tmp_path):
    from policy.make_demo_checkpoint import save_weights

    out = _copy(tiny_checkpoint, tmp_path / "resaved")
    save_weights(gr1.model, out / "model.safetensors")
    again = load_policy(out, "gr1")
    obs = gr1_obs(b=2, seed=3)
    a, _ = gr1.get_action(obs, {"seed": 42})
    b, _ = again.get_action(obs, {"seed": 42})
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_device_and_backend_arguments(tiny_checkpoint):
    assert resolve_device("auto") in ("cpu", "cuda")
    assert resolve_device("CPU") == "cpu"
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device(0)
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:1")
    with pytest.raises(ValueError, match="device: expected"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="backend: expected one of native, gr00t, auto"):
        load_policy(tiny_checkpoint, "gr1", backend="onnx")
    assert load_policy(tiny_checkpoint, "gr1", backend="auto", device="auto").describe()["model"]["backend"] == "native"


def test_bfloat16_on_cpu(tiny_checkpoint):
    policy = load_policy(tiny_checkpoint, "gr1", dtype="bf16")
    assert policy.describe()["model"]["dtype"] == "bfloat16"
    action, _ = policy.get_action(gr1_obs(b=2, h=32, w=32), {"seed": 0})
    assert action["waist"].dtype == np.float32 and np.isfinite(action["waist"]).all()
    with pytest.raises(ValueError, match="dtype: expected"):
        load_policy(tiny_checkpoint, "gr1", dtype="int8")


def test_wire_arrays_read_only_and_byte_swapped_are_accepted(gr1):
    """Decoded messages give read-only views of the bytes, possibly in the other byte order."""
    obs = gr1_obs(b=2, seed=8)
    wire = {"video": {}, "state": {}, "language": obs["language"]}
    for m in ("video", "state"):
        for k, v in obs[m].items():
            dt = v.dtype.newbyteorder(">") if v.dtype == np.float32 else v.dtype
            wire[m][k] = np.frombuffer(v.astype(dt).tobytes(), dtype=dt).reshape(v.shape)
            assert not wire[m][k].flags.writeable
    a, _ = gr1.get_action(wire, {"seed": 2})
    b, _ = gr1.get_action(obs, {"seed": 2})
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_concurrent_callers_from_threads(gr1):
    """Replicas may call from worker threads: results stay per-request and seeded results stay exact."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(gr1_obs(b=1 + i % 2, h=32 + 8 * i, w=32, seed=i, text=f"task {i}"), {"seed": i}) for i in range(6)]
    want = [gr1.get_action(o, opts)[0] for o, opts in jobs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda job: gr1.get_actions([job])[0][0], jobs))
    for w, g in zip(want, got):
        for k in w:
            np.testing.assert_allclose(g[k], w[k], atol=1e-5, rtol=0)
