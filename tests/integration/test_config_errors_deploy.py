"""A serve config that validates but cannot run fails its deployments visibly on a real app: the message names the
busy port and the tag the checkpoint lacks (the typed args' own errors: tests/unit/test_config_errors.py)."""

from __future__ import annotations

import socket

import pytest
from ray import serve

from support.net import free_port
from support.serve_apps import app_entry, deploy_config
from support.waiting import wait_for


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
