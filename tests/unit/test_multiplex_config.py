"""Fine-tunes in the config and the replicas' residency bookkeeping, without Ray: layouts checked when the args
are read, the live model set in user_config, demo fine-tunes' paths, and which replicas hold which fine-tune
(the served app: tests/integration/test_multiplex.py)."""

from __future__ import annotations

import shutil

import pytest
from pydantic import ValidationError

from serving.config import FleetArgs


def test_model_of_another_layout_is_a_config_error(tiny_checkpoint, tmp_path):
    from policy import build_demo_checkpoint

    other = build_demo_checkpoint(tmp_path / "g1", preset="tiny", embodiments=("unitree_g1",))
    args = {"ingress": {"ports": [{"port": 5555, "embodiment": "gr1"}]},
            "embodiments": {"gr1": {"checkpoint": str(tiny_checkpoint), "models": {"ft": {"checkpoint": str(other)}}}}}
    with pytest.raises(ValidationError, match=r"embodiments.gr1.models.ft: checkpoint .* does not hold embodiment 'gr1'; it holds: unitree_g1"):
        FleetArgs.model_validate(args)
    # Same tag, another layout: a processor_config.json whose gr1 entry lists other state keys.
    import json

    shutil.copytree(tiny_checkpoint, tmp_path / "relayout")
    pc_path = tmp_path / "relayout" / "processor_config.json"
    pc = json.loads(pc_path.read_text())
    pc["processor_kwargs"]["modality_configs"]["gr1"]["state"]["modality_keys"] = ["joints"]
    pc_path.write_text(json.dumps(pc))
    args["embodiments"]["gr1"]["models"] = {"ft": {"checkpoint": str(tmp_path / "relayout")}}
    with pytest.raises(ValidationError, match=r"embodiments.gr1.models.ft: its 'state' modality layout differs"):
        FleetArgs.model_validate(args)


def test_user_config_carries_the_live_model_set():
    from serving.config import PolicyUserConfig

    cfg = PolicyUserConfig(max_batch_size=8, models={"ft": {"demo_preset": "tiny", "demo_seed": 5}})
    assert cfg.batching().max_batch_size == 8 and cfg.models["ft"].demo_seed == 5
    assert PolicyUserConfig(max_batch_size=8).models is None  # the args' models stay in force
    with pytest.raises(ValidationError, match="'default' is the embodiment's own"):
        PolicyUserConfig(models={"default": {"demo_preset": "tiny"}})


def test_demo_fine_tunes_live_beside_the_default_under_checkpoint_root(tmp_path):
    args = FleetArgs.model_validate({
        "checkpoint_root": str(tmp_path), "ingress": {"ports": [{"port": 5555, "embodiment": "gr1"}]},
        "embodiments": {"gr1": {"demo_preset": "tiny", "models": {"a": {"demo_preset": "tiny", "demo_seed": 7}}}}})
    sources = args.model_sources("gr1")
    assert list(sources) == ["default", "a"]
    assert sources["default"].checkpoint == str(tmp_path / "tiny-gr1")
    assert sources["a"].checkpoint == str(tmp_path / "tiny-gr1-seed7")


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_info_lists_only_replicas_still_running():
    from serving.residency import ResidentModels

    clock = _Clock()
    resident = ResidentModels(fresh_s=5.0, clock=clock)
    resident["a"] = ["default", "ft1"]
    clock.now += 1
    resident["b"] = ["default", "ft1", "ft2"]
    clock.now += 1
    resident["c"] = ["default", "ft2"]
    resident.prune(None)  # Serve's count not known yet: nothing goes
    assert resident.holding("ft1") == ["a", "b"] and len(resident) == 3
    resident.prune(1)  # all three heard from within fresh_s: a count that may lag drops no one yet
    assert len(resident) == 3
    clock.now += 10
    resident["b"] = ["default", "ft1"]  # b answered again; a and c went quiet (scaled down, restarted)
    resident.prune(2)  # two run: the stalest reporter (a) goes
    assert resident.holding("ft1") == ["b"] and resident.holding("ft2") == ["c"]
    resident.prune(1)
    assert resident.holding("default") == ["b"] and resident.holding("ft2") == []
    clock.now += 10
    resident.prune(0)  # none running: none holds anything
    assert resident.holding("default") == [] and len(resident) == 0
