"""Demo checkpoints are built off the serving path: by the app builder (the driver) for the args, by the tool for
the ones a user_config adds live; a replica never builds one, it says which is missing and how to build it."""

from __future__ import annotations

from pathlib import Path

import yaml

from serving import demo_checkpoints
from serving.app import build_app
from serving.config import FleetArgs, ModelSource, missing_demo_checkpoint


def _args(root: Path) -> dict:
    return {"checkpoint_root": str(root), "ingress": {"ports": [{"port": 5555, "embodiment": "gr1"}]},
            "embodiments": {"gr1": {"demo_preset": "tiny", "device": "cpu",
                                    "models": {"a": {"demo_preset": "tiny", "demo_seed": 7}}}}}


def test_the_app_builder_builds_the_demo_checkpoints_of_its_args_before_any_replica_starts(tmp_path):
    args = FleetArgs.model_validate(_args(tmp_path))
    assert [missing_demo_checkpoint(tag, src) is not None for tag, src in demo_checkpoints.demo_sources(args)] == [True, True]
    build_app(args)  # binds the deployments; starts nothing
    assert (tmp_path / "tiny-gr1" / "config.json").is_file()
    assert (tmp_path / "tiny-gr1-seed7" / "config.json").is_file()
    assert all(missing_demo_checkpoint(tag, src) is None for tag, src in demo_checkpoints.demo_sources(args))


def test_the_tool_builds_what_a_serve_config_names_live_ones_included(tmp_path, capsys):
    config = {"applications": [
        {"name": "fleet", "import_path": "serving.app:build_app", "args": _args(tmp_path),
         "deployments": [{"name": "gr1", "user_config": {"models": {"b": {"demo_preset": "tiny", "demo_seed": 8}}}}]},
        {"name": "other", "import_path": "somewhere.else:app"},
    ]}
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert demo_checkpoints.main([str(path)]) == 0
    for name in ("tiny-gr1", "tiny-gr1-seed7", "tiny-gr1-seed8"):
        assert (tmp_path / name / "config.json").is_file(), name
    assert "3 demo checkpoint(s) in place" in capsys.readouterr().out


def test_a_missing_demo_checkpoint_is_named_with_the_command_that_builds_it(tmp_path):
    source = ModelSource(checkpoint=str(tmp_path / "tiny-gr1-seed3"), demo_preset="tiny", demo_seed=3)
    message = missing_demo_checkpoint("gr1", source)
    assert "not built at" in message and "python -m serving.demo_checkpoints" in message and "seed 3" in message
    assert missing_demo_checkpoint("gr1", ModelSource(checkpoint=str(tmp_path))) is None  # not a demo: the loader says
