"""What a robot installs: the GR00T-compatible policy client and wire codec (numpy, pyzmq, msgpack only).

The client and codec load on first use (PEP 562), so that ``clients.modality`` -- which the server's policy
package shares -- imports without pyzmq or msgpack (bench/gpu_check.py runs on a bare PyTorch machine).
"""

from .modality import ActionConfig, ActionFormat, ActionRepresentation, ActionType, ModalityConfig

_LAZY = {
    "PolicyClient": "client",
    "PolicyServerError": "client",
    "PolicyTimeoutError": "client",
    "check_observation": "client",
    "CodecError": "codec",
    "DecodeLimits": "codec",
    "packb": "codec",
    "unpackb": "codec",
}

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


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'clients' has no attribute {name!r}")
