"""What a robot installs: the GR00T-compatible policy client and wire codec (numpy, pyzmq, msgpack only)."""

from .client import PolicyClient, PolicyServerError, PolicyTimeoutError, check_observation
from .codec import CodecError, DecodeLimits, packb, unpackb
from .modality import ActionConfig, ActionFormat, ActionRepresentation, ActionType, ModalityConfig

__all__ = [
    "ActionConfig",
    "ActionFormat",
    "ActionRepresentation",
    "ActionType",
    "CodecError",
    "DecodeLimits",
    "ModalityConfig",
    "PolicyClient",
    "PolicyServerError",
    "PolicyTimeoutError",
    "check_observation",
    "packb",
    "unpackb",
]
