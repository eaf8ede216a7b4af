"""Demo checkpoints, built off the serving path: by the app builder (`serving.app`, the driver) before any replica
starts, or by hand for the ones a deployment's user_config adds live. Replicas only load them.

    python -m serving.demo_checkpoints serve_config.yaml    # every demo checkpoint the config names

Building is offline (random weights, nothing downloaded) and race-safe (`policy.ensure_demo_checkpoint`: two
builders of one directory wait for the first). On a cluster, run the command on every node that hosts
replicas, or give `checkpoint_root` a directory every node shares.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from serving.config import FleetArgs, ModelSource, PolicyUserConfig, resolve_model_source


def demo_sources(args: FleetArgs) -> list[tuple[str, ModelSource]]:
    """(tag, source) of every demo checkpoint `args` names: each embodiment's own and its demo fine-tunes."""
    return [(tag, src) for tag in args.embodiments for src in args.model_sources(tag).values()
            if src.demo_preset is not None]


def live_demo_sources(args: FleetArgs, deployments: Sequence[dict[str, Any]]) -> list[tuple[str, ModelSource]]:
    """(tag, source) of the demo fine-tunes the deployments' user_config names (the live model set)."""
    out = []
    for dep in deployments:
        tag = dep.get("name")
        models = (dep.get("user_config") or {}).get("models")
        if tag in args.embodiments and models:
            for src in PolicyUserConfig(models=models).models.values():
                if src.demo_preset is not None:
                    out.append((tag, resolve_model_source(src, tag, args.checkpoint_root)))
    return out


def build(sources: Sequence[tuple[str, ModelSource]], log: Callable[[str], None] = print) -> list[Path]:
    """Build the demo checkpoints of `sources` that are not there yet; the paths of all of them."""
    paths = []
    for tag, src in sources:
        path = Path(src.checkpoint or "")
        if not (path / "config.json").is_file():
            import policy  # torch loads here, and only when there is something to build

            log(f"Building the {src.demo_preset!r} demo checkpoint of {tag} (seed {src.demo_seed}) at {path} (offline, once)")
            path = Path(policy.ensure_demo_checkpoint(path, src.demo_preset, embodiments=(tag,), seed=src.demo_seed))
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    import yaml

    p = argparse.ArgumentParser(prog="python -m serving.demo_checkpoints", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a serve config (serve_config.yaml): its fleet applications' demo checkpoints")
    a = p.parse_args(argv)
    config = yaml.safe_load(Path(a.config).read_text())
    built = 0
    for app in config.get("applications", []):
        if app.get("import_path") != "serving.app:build_app":
            continue
        args = FleetArgs.model_validate(app.get("args") or {})
        built += len(build(demo_sources(args) + live_demo_sources(args, app.get("deployments", []))))
    print(f"{built} demo checkpoint(s) in place")
    return 0


if __name__ == "__main__":
    sys.exit(main())
