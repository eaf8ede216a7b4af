"""The application builder: `import_path: serving.app:build_app` in serve_config.yaml.

One policy deployment per embodiment, named after its tag, so serve_config.yaml sets each one's replicas,
autoscaling and resources on its own; one ZMQ ingress in front of them. Demo checkpoints the args name are
built here, in the driver, before any replica starts: replicas only load.
"""

from __future__ import annotations

from pathlib import Path

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from serving import demo_checkpoints
from serving.config import DEFAULT_MODEL, FleetArgs
from serving.ingress import ZmqIngress
from serving.policy_deployment import PolicyDeployment

INGRESS_NAME = "ZmqIngress"
# Per-request access logs cost more than a tiny model's forward pass; serve_config.yaml can turn them on.
QUIET = {"enable_access_log": False}
# Batches go to the replica predicted to be free first (its batches' passes at its time per sample), not the
# one with the fewest calls; replicas report their speed every half second (serving/routing.py).
SAMPLE_BALANCED = RequestRouterConfig(
    request_router_class="serving.routing:SampleBalancedRouter", request_routing_stats_period_s=0.5
)


def build_app(args: FleetArgs) -> Application:
    if isinstance(args, dict):  # called from Python rather than through Serve's typed-args path
        args = FleetArgs.model_validate(args)
    demo_checkpoints.build(demo_checkpoints.demo_sources(args))
    policies = {}
    for tag, emb in args.embodiments.items():
        # Batching goes in user_config only: changing it reconfigures replicas live instead of restarting them.
        policies[tag] = PolicyDeployment.options(
            name=tag,
            user_config=emb.batching.model_dump(),
            logging_config=QUIET,
            request_router_config=SAMPLE_BALANCED,
            # A checkpoint that cannot load will not load on the 20th try either: fail the deployment soon,
            # with the loader's error (path and cause) in `serve status`.
            max_constructor_retry_count=2,
        ).bind(
            tag, str(args.checkpoint_path(tag)), emb.policy_config(),
            models={name: src.model_dump() for name, src in args.model_sources(tag).items() if name != DEFAULT_MODEL},
            max_models_per_replica=emb.max_models_per_replica,
            checkpoint_root=str(Path(args.checkpoint_root).expanduser().resolve()),  # replicas' cwd may differ
        )
    admission = {tag: emb.admission(args.ingress) for tag, emb in args.embodiments.items()}
    models = {tag: list(emb.models) for tag, emb in args.embodiments.items()}
    return ZmqIngress.options(name=INGRESS_NAME, logging_config=QUIET, max_constructor_retry_count=2).bind(
        args.ingress, policies, admission, models
    )
