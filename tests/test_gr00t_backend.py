"""backend="gr00t" against a STAND-IN `gr00t` package.

NVIDIA's Isaac-GR00T package cannot be installed here (no network, no GPU), so these tests inject a mock of the
few names the backend uses (`gr00t.policy.gr00t_policy.Gr00tPolicy`, `gr00t.data.embodiment_tags.EmbodimentTag`)
into `sys.modules` with monkeypatch. The mock mimics upstream N1.6's interface: constructor keywords, nested
observations with [[str]] language, enum-valued ModalityConfig / ActionConfig objects, actions drawn with torch's
global RNG. It checks our adapter, not NVIDIA's model.
"""

from __future__ import annotations

import enum
import sys
import types
from dataclasses import dataclass

import msgpack
import numpy as np
import pytest
import torch

from policy import PolicyInputError, load_policy
from policy.gr00t_backend import Gr00tBackendPolicy


class FakeTag(enum.Enum):
    GR1 = "gr1"
    UNITREE_G1 = "unitree_g1"
    NEW_EMBODIMENT = "new_embodiment"


class Rep(enum.Enum):
    RELATIVE = "relative"
    ABSOLUTE = "absolute"


class Typ(enum.Enum):
    NON_EEF = "non_eef"


class Fmt(enum.Enum):
    DEFAULT = "default"


@dataclass
class FakeActionConfig:
    rep: Rep
    type: Typ
    format: Fmt
    state_key: str | None = None


@dataclass
class FakeModalityConfig:  # upstream's dataclass: enum members, no to_json
    delta_indices: list
    modality_keys: list
    sin_cos_embedding_keys: list | None = None
    mean_std_embedding_keys: list | None = None
    action_configs: list | None = None


class FakeGr00tPolicy:
    instances: list["FakeGr00tPolicy"] = []

    def __init__(self, embodiment_tag, model_path, *, device, strict=True):
        if not isinstance(embodiment_tag, FakeTag):
            raise TypeError("the stand-in expects an EmbodimentTag member")
        if embodiment_tag.value != "gr1":
            raise ValueError(f"Embodiment tag '{embodiment_tag.name}' is not supported by this checkpoint. Supported: GR1")
        self.kwargs = dict(embodiment_tag=embodiment_tag, model_path=model_path, device=device, strict=strict)
        self.calls: list[int] = []
        self.model = torch.nn.Linear(3, 2)
        self.model.config = types.SimpleNamespace(model_type="Gr00tN1d6")
        self.processor = types.SimpleNamespace(
            state_action_processor=types.SimpleNamespace(
                norm_params={"gr1": {"state": {"arm": {"dim": np.array(3)}}, "action": {"arm": {"dim": np.array(3)},
                                                                                      "grip": {"dim": np.array(1)}}}}
            ),
            image_target_size=[224, 224],
        )
        FakeGr00tPolicy.instances.append(self)

    def get_modality_config(self):
        return {
            "video": FakeModalityConfig([0], ["front"]),
            "state": FakeModalityConfig([0], ["arm"]),
            "action": FakeModalityConfig(
                list(range(4)), ["arm", "grip"],
                action_configs=[FakeActionConfig(Rep.RELATIVE, Typ.NON_EEF, Fmt.DEFAULT, "arm"),
                                FakeActionConfig(Rep.ABSOLUTE, Typ.NON_EEF, Fmt.DEFAULT)],
            ),
            "language": FakeModalityConfig([0], ["task"]),
            "rl_info": "ignored",
        }

    def get_action(self, observation, options=None):
        b = observation["video"]["front"].shape[0]
        assert all(isinstance(x, list) and len(x) == 1 and isinstance(x[0], str) for x in observation["language"]["task"])
        self.calls.append(b)
        noise = torch.randn(b, 4, 4).numpy()
        state = observation["state"]["arm"][:, -1:, :]
        return {"arm": (state + noise[:, :, :3]).astype(np.float32), "grip": noise[:, :, 3:].astype(np.float32)}, {}

    def reset(self, options=None):
        return {"reset": True}


@pytest.fixture
def stand_in_gr00t(monkeypatch):
    """Inject the stand-in modules (a mock: NVIDIA's package is not installable here)."""
    FakeGr00tPolicy.instances.clear()
    pkg = types.ModuleType("gr00t")
    pol = types.ModuleType("gr00t.policy")
    gp = types.ModuleType("gr00t.policy.gr00t_policy")
    gp.Gr00tPolicy = FakeGr00tPolicy
    data = types.ModuleType("gr00t.data")
    tags = types.ModuleType("gr00t.data.embodiment_tags")
    tags.EmbodimentTag = FakeTag
    for name, mod in (("gr00t", pkg), ("gr00t.policy", pol), ("gr00t.policy.gr00t_policy", gp),
                      ("gr00t.data", data), ("gr00t.data.embodiment_tags", tags)):
        monkeypatch.setitem(sys.modules, name, mod)
    return FakeGr00tPolicy


@pytest.fixture
def upstream_dir(tmp_path):
    d = tmp_path / "GR00T-N1.6-gr1"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "Gr00tN1d6"}')
    (d / "model.safetensors").write_bytes(b"")
    return d


def obs(b=1, h=64, w=64, seed=0):
    rng = np.random.default_rng(seed)
    return {"video": {"front": rng.integers(0, 256, (b, 1, h, w, 3), dtype=np.uint8)},
            "state": {"arm": rng.uniform(-1, 1, (b, 1, 3)).astype(np.float32)},
            "language": {"task": [["stack the cups"]] * b}}


def test_wraps_upstream_policy(stand_in_gr00t, upstream_dir):
    p = load_policy(upstream_dir, "GR1", backend="gr00t", device="cpu")
    assert isinstance(p, Gr00tBackendPolicy)
    inner = stand_in_gr00t.instances[-1]
    assert inner.kwargs == {"embodiment_tag": FakeTag.GR1, "model_path": str(upstream_dir), "device": "cpu",
                            "strict": True}
    mc = p.get_modality_config()
    assert set(mc) == {"video", "state", "action", "language"}
    assert mc["action"].action_configs[0].rep.name == "RELATIVE" and mc["action"].action_configs[0].state_key == "arm"
    assert p.state_dims == {"arm": 3} and p.action_dims == {"arm": 3, "grip": 1}
    d = p.describe()
    assert msgpack.unpackb(msgpack.packb(d)) == d
    assert d["model"]["backend"] == "gr00t" and d["model"]["model_type"] == "Gr00tN1d6"
    assert d["image_size"] == [224, 224] and d["action_horizon"] == 4 and d["model"]["parameters"] == 8
    assert p.reset() == {"reset": True}


def test_one_upstream_call_for_all_unseeded_requests(stand_in_gr00t, upstream_dir):
    p = load_policy(upstream_dir, "gr1", backend="gr00t")
    inner = stand_in_gr00t.instances[-1]
    reqs = [(obs(2, seed=1), None), (obs(1, seed=2), {}), (obs(3, seed=3), None)]
    res = p.get_actions(reqs)
    assert inner.calls == [6]  # concatenated along B into ONE observation
    for (o, _), (action, info) in zip(reqs, res):
        b = o["state"]["arm"].shape[0]
        assert action["arm"].shape == (b, 4, 3) and action["grip"].shape == (b, 4, 1) and info == {}
        assert action["arm"].dtype == np.float32
        # the split follows the requests: each gets its own state back (arm = state + noise)
        assert np.abs(action["arm"] - o["state"]["arm"]).max() < 6


def test_seeded_requests_are_reproducible_alone_or_batched(stand_in_gr00t, upstream_dir):
    p = load_policy(upstream_dir, "gr1", backend="gr00t")
    o = obs(2, seed=4)
    alone, _ = p.get_action(o, {"seed": 5})
    res = p.get_actions([(obs(1), None), (o, {"seed": 5}), (obs(2, h=32, w=48), None)])
    for k in alone:
        np.testing.assert_array_equal(res[1][0][k], alone[k])
    other, _ = p.get_action(o, {"seed": 6})
    assert not np.allclose(other["grip"], alone["grip"])
    # seeding does not leave torch's global RNG seeded
    state = torch.random.get_rng_state()
    p.get_action(o, {"seed": 5})
    assert torch.equal(state, torch.random.get_rng_state())


def test_different_image_sizes_go_in_one_call_per_size(stand_in_gr00t, upstream_dir):
    p = load_policy(upstream_dir, "gr1", backend="gr00t")
    inner = stand_in_gr00t.instances[-1]
    res = p.get_actions([(obs(1, 64, 64), None), (obs(2, 32, 48), None), (obs(1, 64, 64), None)])
    assert sorted(inner.calls) == [2, 2] and [r[0]["arm"].shape[0] for r in res] == [1, 2, 1]


def test_our_checks_run_before_upstream(stand_in_gr00t, upstream_dir):
    p = load_policy(upstream_dir, "gr1", backend="gr00t")
    bad = obs(1)
    bad["state"]["arm"] = np.zeros((1, 1, 4), np.float32)
    res = p.get_actions([(bad, None), (obs(1), None)], return_exceptions=True)
    assert isinstance(res[0], PolicyInputError) and "state.arm: expected float32 array of shape (B, 1, 3)" in str(res[0])
    assert res[1][0]["arm"].shape == (1, 4, 3)


def test_unknown_tag_error_comes_from_upstream(stand_in_gr00t, upstream_dir):
    with pytest.raises(ValueError, match="not supported by this checkpoint"):
        load_policy(upstream_dir, "unitree_g1", backend="gr00t")


def test_missing_package_gives_a_clear_error(monkeypatch, upstream_dir):
    monkeypatch.setitem(sys.modules, "gr00t", None)  # makes `import gr00t...` fail
    with pytest.raises(ImportError, match=r"backend='gr00t' needs NVIDIA's Isaac-GR00T package \(import gr00t failed"):
        load_policy(upstream_dir, "gr1", backend="gr00t")


def test_auto_backend_picks_gr00t_for_upstream_checkpoints(stand_in_gr00t, upstream_dir, tmp_path):
    assert isinstance(load_policy(upstream_dir, "gr1", backend="auto"), Gr00tBackendPolicy)
    from policy.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_policy(tmp_path / "missing", "gr1", backend="gr00t")


def test_dtype_other_than_bf16_is_refused(stand_in_gr00t, upstream_dir):
    with pytest.raises(ValueError, match="bfloat16"):
        load_policy(upstream_dir, "gr1", backend="gr00t", dtype="float32")
    assert isinstance(load_policy(upstream_dir, "gr1", backend="gr00t", dtype="bf16"), Gr00tBackendPolicy)
