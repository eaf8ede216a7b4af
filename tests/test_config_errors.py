"""A user who edits serve_config.yaml wrongly gets an error that says what is wrong, where they look for it."""

from __future__ import annotations

import socket

import pytest
from pydantic import ValidationError
from ray import serve

from conftest import app_entry, deploy_config, free_port, wait_for
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


def test_port_in_use_and_unknown_tag_fail_their_deployments_visibly(ray_session, tiny_checkpoint):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    app = app_entry("config-errors", tiny_checkpoint, {"gr1": busy_port, "unitree_g1": free_port()},
                    embodiments={"unitree_g1": {"checkpoint": str(tiny_checkpoint)}})
    app["args"]["embodiments"]["oxe_widowx"] = {"checkpoint": str(tiny_checkpoint), "device": "cpu"}
    app["deployments"].append({"name": "oxe_widowx", "ray_actor_options": {"num_cpus": 0.1}})
    try:
        with pytest.raises(RuntimeError):
            deploy_config([app], timeout_s=240)

        def failures():
            deployments = serve.status().applications["config-errors"].deployments
            done = {name: d for name, d in deployments.items() if d.status == "DEPLOY_FAILED"}
            return done if {"ZmqIngress", "oxe_widowx"} <= set(done) else None

        failed = wait_for(failures, 240, "both broken deployments to report DEPLOY_FAILED")
        ingress_msg = failed["ZmqIngress"].message
        assert f"cannot bind tcp://127.0.0.1:{busy_port}" in ingress_msg and "already in use" in ingress_msg
        tag_msg = failed["oxe_widowx"].message
        assert "oxe_widowx" in tag_msg and "gr1, unitree_g1" in tag_msg, tag_msg  # it lists the tags it holds
    finally:
        busy.close()
        serve.delete("config-errors")
