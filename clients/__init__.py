"""What a robot installs (`pip install ./clients`; numpy, pyzmq, msgpack only): the GR00T-compatible policy client,
the chunk executor (`clients.ChunkExecutor`: a control loop that asks for the next chunk in time, with real-time
chunking), the wire protocol (`clients.protocol`) and its codec (`clients.codec`).

The client and codec load on first use (PEP 562), so that ``clients.modality`` and ``clients.protocol`` -- which the
server's policy package shares -- import without pyzmq or msgpack (bench/gpu_check.py runs on a bare PyTorch machine).
"""

from .modality import ActionConfig, ActionFormat, ActionRepresentation, ActionType, ModalityConfig
from .protocol import ArrayEncoding, ErrorKind, ObservationForm, PortProtocol, Refusal, RequestError, to_flat, to_nested

_LAZY = {
    "ChunkExecutor": "chunk_executor",
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
    "ArrayEncoding",
    "ChunkExecutor",
    "CodecError",
    "DecodeLimits",
    "ErrorKind",
    "ModalityConfig",
    "ObservationForm",
    "PolicyClient",
    "PolicyServerError",
    "PolicyTimeoutError",
    "PortProtocol",
    "Refusal",
    "RequestError",
    "check_observation",
    "packb",
    "to_flat",
    "to_nested",
    "unpackb",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'clients' has no attribute {name!r}")
