"""fleetserve policies: GR00T-style vision-language-action policies behind one interface.

    from policy import load_policy
    policy = load_policy("checkpoints/demo-tiny", "gr1", device="auto")
    action, info = policy.get_action(observation, {"seed": 0})
    results = policy.get_actions([(obs1, None), (obs2, {"seed": 3})], return_exceptions=True)
"""

from clients.modality import ActionConfig, ActionFormat, ActionRepresentation, ActionType, ModalityConfig

from .base import BasePolicy, PolicyInputError, PolicyOutputError
from .checkpoint import CheckpointError
from .embodiment import KNOWN_TAGS, EmbodimentTag, resolve_tag
from .loading import load_policy, resolve_device

__all__ = [
    "load_policy",
    "resolve_device",
    "BasePolicy",
    "PolicyInputError",
    "PolicyOutputError",
    "CheckpointError",
    "ModalityConfig",
    "ActionConfig",
    "ActionRepresentation",
    "ActionType",
    "ActionFormat",
    "EmbodimentTag",
    "KNOWN_TAGS",
    "resolve_tag",
    "build_demo_checkpoint",
    "ensure_demo_checkpoint",
]


def __getattr__(name: str):
    # Lazy: `python -m policy.make_demo_checkpoint` must not find the module imported by the package already.
    if name in ("build_demo_checkpoint", "ensure_demo_checkpoint"):
        from . import make_demo_checkpoint

        return getattr(make_demo_checkpoint, name)
    raise AttributeError(f"module 'policy' has no attribute {name!r}")
