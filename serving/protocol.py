"""The wire protocol as the serving side imports it; it is written once, in `clients.protocol` (the robot's package)."""

from clients.protocol import (  # noqa: F401 - re-exported for the serving modules
    ENDPOINTS,
    UNAUTHORIZED,
    ActionRequest,
    ArrayEncoding,
    Envelope,
    ErrorKind,
    ObservationForm,
    PortProtocol,
    RequestError,
    error_reply,
    format_action_reply,
    modality_config_n15,
    parse_action_request,
    parse_envelope,
    parse_options,
)
