"""NVIDIA's GR00T N1.6 reference checkpoint served by a real Serve app (as `serve run` serves it): a robot's
B=2 get_action with options["noise"], through a real ZMQ client, gets what the model gives in-process.

NVIDIA's tokenizer is not redistributable, so by default the app is given OUR tokenizer with Eagle's special
token ids (the model's numbers are then checked against NVIDIA's in-process, tests/test_gr00t_n16_parity.py,
where the recorded ids stand in). With FLEETSERVE_EAGLE_TOKENIZER=/path/to/Eagle-Block2A-2B-v2 the app gets the
real tokenizer and the served actions are checked against NVIDIA's own decoded actions.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from ray import serve

from support import gr00t_n16_reference as ref
from clients import PolicyClient, PolicyServerError
from support.net import free_port
from support.serve_apps import app_entry, deploy_config

APP = "fleet-n16-reference"
REAL_TOKENIZER = os.environ.get("FLEETSERVE_EAGLE_TOKENIZER")


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    from policy.make_demo_checkpoint import write_tokenizer_folder

    root = tmp_path_factory.mktemp("n16-served")
    checkpoint = ref.build_checkpoint(root / "checkpoint")
    tokenizer = REAL_TOKENIZER
    if tokenizer is None:
        special = ref.prompts("b2")["tokenizer"]["special_token_ids"]
        write_tokenizer_folder(root / "tokenizer", 151680, special_ids=special)
        tokenizer = str(root / "tokenizer")
    port = free_port()
    embodiment = {"checkpoint": str(checkpoint), "tokenizer": tokenizer, "backbone_config": str(ref.backbone_config()),
                  "device": "cpu", "dtype": "float32"}
    deploy_config([app_entry(APP, checkpoint, {ref.TAG: port}, embodiments={ref.TAG: embodiment})])
    yield port, tokenizer, checkpoint
    serve.delete(APP)


def test_a_batched_request_with_noise_gets_the_models_actions(served):
    port, tokenizer, checkpoint = served
    r = ref.reference("b2")
    with PolicyClient("127.0.0.1", port, timeout_ms=120_000) as robot:
        action, info = robot.get_action(ref.observation("b2"), {"noise": r["noise"]})
        alone, _ = robot.get_action(ref.observation("b1"), {"noise": ref.reference("b1")["noise"]})
    assert info["server"]["embodiment_tag"] == ref.TAG
    if REAL_TOKENIZER:  # NVIDIA's own numbers
        for key in ("arm", "gripper", "base_vel"):
            np.testing.assert_allclose(action[key], r[f"action.{key}"], atol=1e-4, rtol=1e-4)
    else:
        from policy import load_policy

        local = load_policy(checkpoint, ref.TAG, device="cpu", dtype="float32", tokenizer=tokenizer,
                            backbone_config=ref.backbone_config(), warmup=False)
        want, _ = local.get_action(ref.observation("b2"), {"noise": r["noise"]})
        for key in want:
            np.testing.assert_allclose(action[key], want[key], atol=1e-5)
    for key in alone:  # sample 0 alone equals sample 0 in the batch (left padding masked)
        np.testing.assert_allclose(alone[key][0], action[key][0], atol=1e-5)


def test_noise_of_the_wrong_shape_is_a_bad_request_naming_the_shape(served):
    port, _, _ = served
    with PolicyClient("127.0.0.1", port, timeout_ms=120_000) as robot:
        with pytest.raises(PolicyServerError, match=r"options.noise: expected float32 array of shape \(2, 24, 16\)") as err:
            robot.get_action(ref.observation("b2"), {"noise": np.zeros((2, 16, 16), np.float32)})
        assert err.value.kind == "bad_request"
        assert robot.ping()  # and the server goes on serving
