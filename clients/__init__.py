"""What a robot installs (`pip install ./clients`; numpy, pyzmq, msgpack only): the GR00T-compatible policy client,
the wire protocol (`clients.protocol`) and its codec (`clients.codec`)."""

from .client import PolicyClient, PolicyServerError, PolicyTimeoutError, check_observation
from .codec import CodecError, DecodeLimits, packb, unpackb
from .modality import ActionConfig, ActionFormat, ActionRepresentation, ActionType, ModalityConfig
from .protocol import ArrayEncoding, ErrorKind, ObservationForm, PortProtocol, RequestError, to_flat, to_nested

__all__ = [
    "ActionConfig",
    "ActionFormat",
    "ActionRepresentation",
    "ActionType",
    "ArrayEncoding",
    "CodecError",
    "DecodeLimits",
    "ErrorKind",
    "ModalityConfig",
    "ObservationForm",
    "PolicyClient",
    "PolicyServerError",
    "PolicyTimeoutError",
    "PortProtocol",
    "RequestError",
    "check_observation",
    "packb",
    "to_flat",
    "to_nested",
    "unpackb",
]
