"""A user who edits serve_config.yaml wrongly gets an error that says what is wrong, where they look for it: the
typed args, without Ray (the deployments that fail on a real app: tests/integration/test_config_errors_deploy.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serving.config import FleetArgs


@pytest.mark.parametrize(
    "args, message",
    [
        ({"ingress": {"ports": [{"port": 5555, "embodiment": "gr1"}, {"port": 5555, "embodiment": "unitree_g1"}]}},
         "port 5555 is listed twice (for 'gr1' and 'unitree_g1')"),
        ({"ingress": {"ports": [{"port": 5555, "embodiment": "franka"}]}},
         "port 5555 defaults to embodiment 'franka', which is not configured; configured: ['gr1', 'unitree_g1']"),
        ({"embodiments": {"gr1": {}}}, "checkpoint: expected a checkpoint directory (or demo_preset to build one)"),
        ({"embodiments": {"gr1": {"demo_preset": "tiny"}, "GR1": {"demo_preset": "tiny"}},
          "ingress": {"ports": [{"port": 5555, "embodiment": "gr1"}]}}, "are the same tag 'gr1'"),
        ({"ingress": {"ports": []}}, "expected at least one port"),
        ({"ingress": {"prots": []}}, "prots"),  # a typo is an error, not a silently ignored key
        ({"embodiments": {"gr1": {"demo_preset": "tiny", "models": {"default": {"demo_preset": "tiny"}}}},
          "ingress": {"ports": [{"port": 5555, "embodiment": "gr1"}]}}, "'default' is the embodiment's own"),
        ({"embodiments": {"gr1": {"demo_preset": "tiny", "models": {"ft": {"demo_seed": 3}}}},
          "ingress": {"ports": [{"port": 5555, "embodiment": "gr1"}]}}, "expected `checkpoint` (a directory) or `demo_preset`"),
        ({"embodiments": {"gr1": {"demo_preset": "tiny", "models": {"ft": {"demo_preset": "tiny"}}}},
          "ingress": {"ports": [{"port": 5555, "embodiment": "gr1", "model": "ft2"}]}},
         "port 5555 defaults to model 'ft2', which embodiment 'gr1' does not serve; its models: default, ft"),
    ],
)
def test_invalid_args_name_the_field(args, message):
    with pytest.raises(ValidationError) as err:
        FleetArgs.model_validate(args)
    assert message in str(err.value)


def test_every_demo_preset_is_a_valid_demo_preset():
    import typing

    from policy.make_demo_checkpoint import PRESETS
    from serving.config import DemoPreset, PolicyConfig

    assert set(typing.get_args(DemoPreset)) == set(PRESETS)
    for preset in ("n17-small", "n17-3b"):
        assert PolicyConfig(demo_preset=preset).demo_preset == preset
    with pytest.raises(ValidationError, match="n18-3b"):
        PolicyConfig(demo_preset="n18-3b")
