"""backend="gr00t" against a STAND-IN `gr00t` package.

NVIDIA's Isaac-GR00T package cannot be installed here (no network, no GPU), so these tests inject a mock of the
few names the backend uses (`gr00t.policy.gr00t_policy.Gr00tPolicy`, `gr00t.data.embodiment_tags.EmbodimentTag`)
into `sys.modules` with monkeypatch. The mock mimics upstream N1.6's interface: constructor keywords, nested
observations with [[str]] language, enum-valued ModalityConfig / ActionConfig objects, and an action head (in a
module of its own, as upstream's) that draws its noise with one `torch.randn((B, horizon, max_action_dim))`. It
checks our adapter, not NVIDIA's model.
"""

from __future__ import annotations

import enum
import json
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


HEAD_MODULE = types.ModuleType("gr00t.model.fake_action_head")
HEAD_MODULE.torch = torch
exec(  # the stand-in action head lives in a module of its own, as upstream's does
    "class ActionHead:\n"
    "    def draw(self, b):\n"
    "        return torch.randn(size=(b, 4, 4), dtype=torch.float32, device='cpu')\n",
    HEAD_MODULE.__dict__,
)


class FakeGr00tPolicy:
    instances: list["FakeGr00tPolicy"] = []

    def __init__(self, embodiment_tag, model_path, *, device, strict=True):
        _ = embodiment_tag.value  # what upstream reads of the tag (an AttributeError on a plain str)
        if embodiment_tag.value not in ("gr1", "my_arm"):
            raise ValueError(f"Embodiment tag '{embodiment_tag.name}' is not supported by this checkpoint. Supported: GR1")
        self.kwargs = dict(embodiment_tag=embodiment_tag, model_path=model_path, device=device, strict=strict)
        self.calls: list[int] = []
        self.model = torch.nn.Linear(3, 2)
        self.model.config = types.SimpleNamespace(model_type="Gr00tN1d6", action_horizon=4, max_action_dim=4)
        self.model.action_head = HEAD_MODULE.ActionHead()
        self.processor = types.SimpleNamespace(
            state_action_processor=types.SimpleNamespace(
                norm_params={"gr1": {"state": {"arm": {"dim": np.array(3)}}, "action": {"arm": {"dim": np.array(3)},
                                                                                      "grip": {"dim": np.array(1)}}}}
            ),
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
        noise = self.model.action_head.draw(b).numpy()
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
                      ("gr00t.data", data), ("gr00t.data.embodiment_tags", tags), (HEAD_MODULE.__name__, HEAD_MODULE)):
        monkeypatch.setitem(sys.modules, name, mod)
    return FakeGr00tPolicy


@pytest.fixture
def upstream_dir(tmp_path):
    d = tmp_path / "GR00T-N1.6-gr1"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "Gr00tN1d6"}')
    (d / "model.safetensors").write_bytes(b"")
    kwargs = {"modality_configs": {"gr1": {}, "my_arm": {}}, "use_albumentations": True, "shortest_image_edge": 256,
              "crop_fraction": 0.95}
    (d / "processor_config.json").write_text(json.dumps({"processor_class": "Gr00tN1d6Processor", "processor_kwargs": kwargs}))
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
    assert d["image_size"] == [252, 252] and d["action_horizon"] == 4 and d["model"]["parameters"] == 8  # N1.6's
    assert d["noise_shape"] == [4, 4]
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


def test_seeded_requests_are_reproducible_alone_or_batched_in_one_call(stand_in_gr00t, upstream_dir):
    p = load_policy(upstream_dir, "gr1", backend="gr00t")
    inner = stand_in_gr00t.instances[-1]
    o = obs(2, seed=4)
    alone, _ = p.get_action(o, {"seed": 5})
    inner.calls.clear()
    res = p.get_actions([(obs(1), None), (o, {"seed": 5}), (obs(2), {"seed": 6})])
    assert inner.calls == [5]  # seeded and unseeded requests share one upstream call
    for k in alone:
        np.testing.assert_array_equal(res[1][0][k], alone[k])
    assert not np.allclose(res[2][0]["grip"], alone["grip"])
    state = torch.random.get_rng_state()  # the global RNG is neither seeded nor read
    p.get_actions([(o, {"seed": 5}), (obs(1), None)])
    assert torch.equal(state, torch.random.get_rng_state())


def test_options_noise_reaches_upstreams_action_head(stand_in_gr00t, upstream_dir):
    p = load_policy(upstream_dir, "gr1", backend="gr00t")
    noise = np.random.default_rng(0).normal(size=(2, 4, 4)).astype(np.float32)
    action, _ = p.get_action(obs(2, seed=7), {"noise": noise})
    np.testing.assert_array_equal(action["grip"], noise[:, :, 3:])  # the stand-in returns noise[..., 3:] as grip
    with pytest.raises(PolicyInputError, match=r"options.noise: expected float32 array of shape \(2, 4, 4\)"):
        p.get_action(obs(2), {"noise": noise[:, :3]})


def test_an_upstream_that_draws_no_noise_is_reported(stand_in_gr00t, upstream_dir, monkeypatch):
    p = load_policy(upstream_dir, "gr1", backend="gr00t")
    monkeypatch.setattr(HEAD_MODULE.ActionHead, "draw", lambda self, b: torch.zeros(b, 4, 4))
    with pytest.raises(RuntimeError, match=r"drew no noise of shape \(1, 4, 4\) through torch.randn"):
        p.get_action(obs(1), {"seed": 1})


def test_a_tag_upstream_lacks_but_the_checkpoint_holds_is_served(stand_in_gr00t, upstream_dir):
    from policy.gr00t_backend import CustomTag

    load_policy(upstream_dir, "My_Arm", backend="gr00t")
    tag = stand_in_gr00t.instances[-1].kwargs["embodiment_tag"]
    assert tag == CustomTag("my_arm") and (tag.value, tag.name) == ("my_arm", "MY_ARM")


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


def test_a_tag_the_checkpoint_lacks_is_refused_naming_the_ones_it_holds(stand_in_gr00t, upstream_dir):
    with pytest.raises(ValueError, match=r"'unitree_g1' is not in checkpoint's processor_config.json \(it holds: gr1, my_arm\)"):
        load_policy(upstream_dir, "unitree_g1", backend="gr00t")


def test_missing_package_gives_a_clear_error(monkeypatch, upstream_dir):
    monkeypatch.setitem(sys.modules, "gr00t", None)  # makes `import gr00t...` fail
    with pytest.raises(ImportError, match=r"backend='gr00t' needs NVIDIA's Isaac-GR00T package \(import gr00t failed"):
        load_policy(upstream_dir, "gr1", backend="gr00t")


def test_auto_backend_picks_gr00t_where_native_does_not_implement_the_model(stand_in_gr00t, upstream_dir, tmp_path):
    (upstream_dir / "config.json").write_text('{"model_type": "Gr00tN1d5"}')
    assert isinstance(load_policy(upstream_dir, "gr1", backend="auto"), Gr00tBackendPolicy)
    from policy.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_policy(tmp_path / "missing", "gr1", backend="gr00t")


def test_dtype_other_than_bf16_is_refused(stand_in_gr00t, upstream_dir):
    with pytest.raises(ValueError, match="bfloat16"):
        load_policy(upstream_dir, "gr1", backend="gr00t", dtype="float32")
    assert isinstance(load_policy(upstream_dir, "gr1", backend="gr00t", dtype="bf16"), Gr00tBackendPolicy)
