"""The ingress's endpoint handlers: a request's body in, its reply's bytes out.

Decode (`clients.codec`, with the port's size limits), check the api_token, pick the embodiment (`embodiment_tag`,
else the port's) and the model (`options["model_id"]` or a top-level `model_id`, else the port's, else the
embodiment's default), then answer the endpoint: get_action through the embodiment's scheduler (one Ray call per
batch), the rare ones (reset, get_modality_config, info) straight to a replica; ping and kill here. Every request
is answered, the failing ones with `{"error": message, "kind": kind}` (+ `"reason"`), and every reply goes back in
the array encoding its request came in (N1.6 `.npy` or msgpack-numpy), since clients built on msgpack-numpy read
nothing else. A port declared `protocol: n1.5` answers as upstream's N1.5 server did (`clients.protocol`).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections import deque
from typing import Any, Awaitable, Callable, Mapping

from clients.codec import CodecError, DecodeLimits, packb, unpackb_with_encoding
from clients.protocol import (
    UNAUTHORIZED,
    ArrayEncoding,
    ErrorKind,
    PortProtocol,
    Refusal,
    RequestError,
    error_reply,
    format_action_reply,
    modality_config_n15,
    parse_action_request,
    parse_envelope,
    parse_options,
)
from serving.config import AdmissionConfig, IngressConfig, PortConfig
from serving.messages import InferenceRequest
from serving.metrics import MetricsBuffer, slo_outcome
from serving.models import ModelRegistry
from serving.robot_sessions import RobotSessions
from serving.scheduler import EmbodimentScheduler

logger = logging.getLogger("ray.serve")

KILL_REFUSED = "kill: refused; this server is shared by a fleet, its operator stops it (serve shutdown)"
DELIVERY_MARGIN_S = 0.015  # at most; 10% of a short deadline


RTC_OPTIONS = ("rtc", "rtc_frozen_steps", "rtc_overlap_steps")
MAX_ROBOT_ID = 128


def _pop_loop_options(options: dict[str, Any]) -> tuple[str | None, float | None, int | None]:
    """(robot_id, control_hz, buffer_steps) of a get_action, checked and taken out: the fleet loop's, not the
    policy's."""
    robot, hz, buffer = options.pop("robot_id", None), options.pop("control_hz", None), options.pop("buffer_steps", None)
    if robot is not None and (not isinstance(robot, str) or not 1 <= len(robot) <= MAX_ROBOT_ID):
        raise RequestError(f"options.robot_id: expected a string of 1 to {MAX_ROBOT_ID} characters, got {robot!r:.40}")
    if hz is not None and (isinstance(hz, bool) or not isinstance(hz, (int, float)) or not 0 < hz <= 10_000):
        raise RequestError(f"options.control_hz: expected a control rate in Hz (0 < hz <= 10000), got {hz!r:.40}")
    if buffer is not None and (isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 0):
        raise RequestError(f"options.buffer_steps: expected a non-negative int (steps the robot has left), got {buffer!r:.40}")
    return robot, (float(hz) if hz is not None else None), buffer


def _pop_model_id(options: dict[str, Any] | None, top_level: str | None) -> Any:
    """The model a request names: options["model_id"] (taken out: ours, not the policy's), else the top level."""
    if options is not None and "model_id" in options:
        return options.pop("model_id")
    return top_level


class ReplyHops:
    """Encode and send times of the last traced replies: the hops a reply's own trace cannot carry."""

    def __init__(self, size: int = 512):
        self._encode: deque[float] = deque(maxlen=size)
        self._send: deque[float] = deque(maxlen=size)

    def add(self, encode_s: float, send_s: float) -> None:
        self._encode.append(encode_s * 1000.0)
        self._send.append(send_s * 1000.0)

    def status(self) -> dict[str, float | None]:
        def p50(xs: deque[float]) -> float | None:
            return round(sorted(xs)[len(xs) // 2], 4) if xs else None

        return {"encode_ms_p50": p50(self._encode), "send_ms_p50": p50(self._send), "replies": len(self._encode)}


class _Call:
    """What the metrics need to know about one request, filled in as it is parsed."""

    __slots__ = ("embodiment", "endpoint", "outcome", "encoding", "model", "traced", "error")

    def __init__(self, embodiment: str):
        self.embodiment, self.endpoint, self.outcome, self.model = embodiment, "unknown", "ok", None
        self.traced = False
        self.error: RequestError | None = None
        self.encoding: ArrayEncoding | None = None  # of the request's arrays: the reply's goes the same way


class Endpoints:
    def __init__(self, config: IngressConfig, admission: Mapping[str, AdmissionConfig], registry: ModelRegistry,
                 schedulers: Mapping[str, EmbodimentScheduler], metrics: MetricsBuffer,
                 info: Callable[[PortConfig], Awaitable[dict[str, Any]]]):
        self.config = config
        self._admission = admission
        self._registry = registry
        self._schedulers = schedulers
        self._metrics = metrics
        self._info = info
        self.sessions = RobotSessions(config.robot_sessions, config.robot_session_ttl_s, clock=time.time)
        self._limits = DecodeLimits(max_message_bytes=config.max_message_bytes, max_array_bytes=config.max_message_bytes)
        self._tokens = {p.port: (p.api_token if p.api_token is not None else config.api_token) for p in config.ports}
        self.hops = ReplyHops()
        self._answer = {"get_action": self._get_action, "ping": self._ping, "get_modality_config": self._modality,
                        "reset": self._reset, "info": self._info_endpoint, "kill": self._kill}

    def underruns(self) -> dict[str, int]:
        """Buffer underruns per embodiment since start."""
        return dict(self._metrics.underruns_total)

    async def handle(self, port: PortConfig, body: memoryview, received: float) -> tuple[bytes, Callable[[float], None] | None]:
        """The reply to one request, encoded; with a callback for the send's duration when the request is traced."""
        call = _Call(port.embodiment)
        try:
            reply = await self._respond(call, port, body, received)
        except RequestError as exc:
            reply, call.outcome, call.error = error_reply(str(exc), exc.kind, exc.reason), exc.kind.value, exc
        except Exception as exc:  # a bug of ours must still reach the robot as an answer
            logger.exception("Unexpected error answering a request on port %d", port.port)
            reply = error_reply(f"internal error: {type(exc).__name__}: {exc}", ErrorKind.INTERNAL)
            call.outcome = ErrorKind.INTERNAL.value
        encoding = time.perf_counter()
        try:
            payload = packb(reply, call.encoding or ArrayEncoding.NPY)
        except Exception as exc:
            payload = packb(error_reply(f"internal error: reply could not be encoded: {exc}", ErrorKind.INTERNAL))
            call.outcome = ErrorKind.INTERNAL.value
        encode_s = time.perf_counter() - encoding
        self._metrics.request(call.embodiment, call.endpoint, call.outcome)
        if call.model is not None:
            self._metrics.model_request(call.embodiment, call.model, call.outcome)
        if call.endpoint == "get_action":
            self._metrics.slo(call.embodiment, port.port, slo_outcome(call.outcome, call.error))
        if not call.traced:
            return payload, None
        return payload, lambda send_s: self.hops.add(encode_s, send_s)

    async def _respond(self, call: _Call, port: PortConfig, body: memoryview, received: float) -> Any:
        try:
            msg, call.encoding = unpackb_with_encoding(body, self._limits)
        except CodecError as exc:
            raise RequestError(f"request: {exc}") from None
        env = parse_envelope(msg)
        call.endpoint = env.endpoint
        token = self._tokens[port.port]
        if token is not None and not hmac.compare_digest((env.api_token or "").encode(), token.encode()):
            raise RequestError(UNAUTHORIZED, ErrorKind.UNAUTHORIZED)
        tag = self._registry.resolve(env.embodiment_tag or port.embodiment)
        call.embodiment = tag
        return await self._answer[env.endpoint](call, port, tag, env, received)  # parse_envelope lets only these through

    def _port_model(self, port: PortConfig, tag: str) -> str | None:
        return port.model if port.embodiment == tag else None

    async def _get_action(self, call: _Call, port: PortConfig, tag: str, env, received: float) -> Any:
        req = parse_action_request(env.data, port.port_protocol)
        decoded = time.time()
        if not 1 <= req.samples <= self.config.max_batch_per_request:
            raise RequestError(
                f"observation: expected a batch size B from 1 to {self.config.max_batch_per_request}, got {req.samples}"
            )
        options, asked = (dict(req.options) if req.options is not None else None), None
        model = await self._registry.choose(tag, _pop_model_id(options, env.model_id), self._port_model(port, tag))
        call.model = model
        robot = hz = buffer = due_ms = None
        if options is not None:  # ours, not the policy's: popped before the policy sees them
            call.traced = bool(options.pop("trace", False))  # bench.hops asks for the hops
            if "deadline_ms" in options:
                asked = options.pop("deadline_ms")
                if isinstance(asked, bool) or not isinstance(asked, (int, float)) or not asked > 0:
                    raise RequestError(f"options.deadline_ms: expected a positive number of milliseconds, got {asked!r:.40}")
            robot, hz, buffer = _pop_loop_options(options)
        hz = hz or self._admission[tag].control_hz
        if buffer is not None:
            if hz is None:
                raise RequestError("options.buffer_steps: needs the robot's control rate, options.control_hz (or the "
                                   "embodiment's control_hz)")
            if buffer > 0:  # due when the buffer runs dry: served before robots with more left
                due_ms = buffer / hz * 1000.0
            else:  # already dry: the robot stands still until this answer, whatever its deadline
                self._metrics.underrun(tag)
        if robot is not None and hz is not None and req.samples == 1 and self.config.robot_sessions \
                and not any(k in options for k in RTC_OPTIONS):
            rtc = self.sessions.rtc_for(robot, (tag, model), hz)
            if rtc is not None:  # the robot's last chunk continues into this one (policy.rtc)
                options["rtc"] = rtc
        budget_ms = self._admission[tag].deadline_ms(asked, port.slo_ms)
        if due_ms is not None:
            due_ms = min(due_ms, budget_ms)
        # The robot's clock started before ours and stops after the reply crosses the network: the scheduler
        # aims a little before the deadline, so an action it delivers is still on time where the robot is.
        margin_s = min(DELIVERY_MARGIN_S, 0.1 * budget_ms / 1000.0)
        delivered = await self._schedulers[tag].submit(
            InferenceRequest(req.observation, options, req.samples), model, received,
            received + budget_ms / 1000.0 - margin_s,
            None if due_ms is None else received + due_ms / 1000.0 - margin_s)
        outcome = delivered.outcome
        if outcome.error is not None:
            if buffer:  # the robot's buffer ran dry without this action
                self._metrics.underrun(tag)
            raise RequestError(outcome.error, outcome.error_kind or ErrorKind.POLICY,
                               Refusal(outcome.reason) if outcome.reason else None)
        if robot is not None and req.samples == 1 and self.config.robot_sessions:
            self.sessions.delivered(robot, (tag, model), outcome.action, received)
        total_ms = (time.time() - received) * 1000.0
        if due_ms is not None and total_ms > due_ms:  # answered, after the robot's buffer ran dry
            self._metrics.underrun(tag)
        self._metrics.action(tag, delivered.batch_size, delivered.queue_ms, delivered.infer_ms, total_ms,
                             delivered.predicted_ms)
        info = dict(outcome.info)
        info["server"] = {
            "batch_size": delivered.batch_size,
            "embodiment_tag": tag,
            "model_id": model,
            "replica": delivered.replica,
            "queue_ms": round(delivered.queue_ms, 3),
            "infer_ms": round(delivered.infer_ms, 3),
            "deadline_ms": round(budget_ms, 3),
            **({} if due_ms is None else {"due_ms": round(due_ms, 3)}),
            "total_ms": round(total_ms, 3),
        }
        if call.traced:
            info["server"]["trace"] = {"recv": received, "decoded": decoded, **delivered.trace(), "reply": time.time()}
        return format_action_reply(req, outcome.action, info)

    async def _ping(self, call: _Call, port: PortConfig, tag: str, env, received: float) -> Any:
        return {"status": "ok", "message": "Server is running", "embodiment_tag": tag}

    async def _modality(self, call: _Call, port: PortConfig, tag: str, env, received: float) -> Any:
        model = await self._registry.choose(tag, env.model_id, self._port_model(port, tag))
        configs = await self._registry.modality_config(tag, model)
        return modality_config_n15(configs) if port.port_protocol is PortProtocol.N15 else configs

    async def _reset(self, call: _Call, port: PortConfig, tag: str, env, received: float) -> Any:
        options = parse_options(env.data.get("options"))
        if options is not None and options.get("robot_id") is not None:  # the robot's next chunk starts fresh
            options = dict(options)
            self.sessions.reset(str(options.pop("robot_id")))
        model = await self._registry.choose(tag, _pop_model_id(options, env.model_id), self._port_model(port, tag))
        return await self._registry.handle(tag, model).reset.remote(options)

    async def _info_endpoint(self, call: _Call, port: PortConfig, tag: str, env, received: float) -> Any:
        return await self._info(port)

    async def _kill(self, call: _Call, port: PortConfig, tag: str, env, received: float) -> Any:
        raise RequestError(KILL_REFUSED, ErrorKind.REFUSED)
