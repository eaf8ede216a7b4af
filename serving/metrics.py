"""Custom Ray Serve metrics of the fleet, exported by Ray's Prometheus endpoint (names gain a `ray_` prefix).

Recorded per batch or per reply, never with a log line. The Grafana dashboard in cluster/ is built on
these names; change them together.
"""

from __future__ import annotations

from ray.serve import metrics

from clients.protocol import Refusal, RequestError

MS_BOUNDARIES = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
RATIO_BOUNDARIES = [0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0]
# How a get_action ended against its deadline: an action in time, refused at once because it was predicted
# late (the robot can resend at once), deadline passed while it waited, or another error.
SLO_OUTCOMES = ("on_time", "refused_early", "expired", "error")
_SLO_OUTCOME_OF = {Refusal.REFUSED_EARLY: "refused_early", Refusal.EXPIRED_WAITING: "expired",
                   Refusal.EXPIRED_ON_REPLICA: "expired"}


def slo_outcome(outcome: str, error: RequestError | None) -> str:
    """How a get_action ended against its deadline (one of SLO_OUTCOMES), from its error's Refusal reason:
    an action is always on time (the scheduler never hands one over after its deadline)."""
    if outcome == "ok":
        return "on_time"
    return _SLO_OUTCOME_OF.get(error.reason, "error") if error is not None and error.reason is not None else "error"


class FleetMetrics:
    """Created once per ingress replica (Serve adds deployment/replica/application tags by itself)."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "fleetserve_requests_total",
            description="Requests answered, by embodiment, endpoint and outcome (ok or the error kind).",
            tag_keys=("embodiment", "endpoint", "outcome"),
        )
        self.errors = metrics.Counter(
            "fleetserve_errors_total",
            description="Error replies by kind (bad_request, unauthorized, policy, overloaded, deadline, internal).",
            tag_keys=("embodiment", "kind"),
        )
        self.batch_size = metrics.Histogram(
            "fleetserve_batch_size",
            description="Samples in the forward pass each get_action rode in.",
            boundaries=BATCH_BOUNDARIES,
            tag_keys=("embodiment",),
        )
        self.queue_ms = metrics.Histogram(
            "fleetserve_queue_ms",
            description="From arrival at the ingress to the start of its forward pass (ms).",
            boundaries=MS_BOUNDARIES,
            tag_keys=("embodiment",),
        )
        self.infer_ms = metrics.Histogram(
            "fleetserve_infer_ms",
            description="Forward pass time of the batch a request rode in (ms).",
            boundaries=MS_BOUNDARIES,
            tag_keys=("embodiment",),
        )
        self.total_ms = metrics.Histogram(
            "fleetserve_total_ms",
            description="From arrival at the ingress to the reply being sent (ms).",
            boundaries=MS_BOUNDARIES,
            tag_keys=("embodiment",),
        )
        self.slo = metrics.Counter(
            "fleetserve_slo_requests_total",
            description=(
                "get_action requests by how they ended against their deadline (on_time, refused_early, expired, "
                "error), per embodiment and port: on-time goodput is the rate of on_time, SLO attainment its share."
            ),
            tag_keys=("embodiment", "port", "outcome"),
        )
        self.predicted_infer_ms = metrics.Histogram(
            "fleetserve_predicted_infer_ms",
            description="The scheduler's predicted forward pass time of the batch a request rode in (ms).",
            boundaries=MS_BOUNDARIES,
            tag_keys=("embodiment",),
        )
        self.infer_prediction_ratio = metrics.Histogram(
            "fleetserve_infer_prediction_ratio",
            description="Actual over predicted forward pass time, per reply (1 = the model was right).",
            boundaries=RATIO_BOUNDARIES,
            tag_keys=("embodiment",),
        )
        self.robots = metrics.Gauge(
            "fleetserve_robots_connected",
            description="Robots (ZMQ peers) connected to an ingress port.",
            tag_keys=("port",),
        )
        self.model_requests = metrics.Counter(
            "fleetserve_model_requests_total",
            description="get_action requests answered, by embodiment, model (fine-tune or 'default') and outcome.",
            tag_keys=("embodiment", "model", "outcome"),
        )
        self.buffer_underruns = metrics.Counter(
            "fleetserve_buffer_underruns_total",
            description=(
                "get_action requests that said how many buffered steps the robot had left (options.buffer_steps) "
                "and got no action before they ran out (or came with none left): the robot idled, per embodiment."
            ),
            tag_keys=("embodiment",),
        )
        self.queue_depth = metrics.Gauge(
            "fleetserve_queue_depth",
            description="get_action requests waiting in the ingress for a batch, per embodiment.",
            tag_keys=("embodiment",),
        )


class ModelMetrics:
    """Fine-tunes on a policy replica: loads, evictions, cold-load time, how many are resident (per replica)."""

    def __init__(self) -> None:
        self.loads = metrics.Counter(
            "fleetserve_model_loads_total",
            description="Fine-tune loads on a policy replica, by embodiment, model and outcome (ok or error).",
            tag_keys=("embodiment", "model", "outcome"),
        )
        self.evictions = metrics.Counter(
            "fleetserve_model_evictions_total",
            description="Fine-tunes evicted from a policy replica (least recently used, past max_models_per_replica).",
            tag_keys=("embodiment", "model"),
        )
        self.load_ms = metrics.Histogram(
            "fleetserve_model_load_ms",
            description="Cold-load time of a fine-tune on a policy replica (ms), by embodiment and demo preset.",
            boundaries=MS_BOUNDARIES,
            tag_keys=("embodiment", "preset"),
        )
        self.resident_models = metrics.Gauge(
            "fleetserve_models_resident",
            description="Fine-tunes loaded on a policy replica now (besides its default model).",
            tag_keys=("embodiment",),
        )

    # Loads and evictions are rare (each costs a checkpoint load): recorded directly, no buffering.
    def load(self, embodiment: str, model: str, outcome: str, load_ms: float | None = None, preset: str = "") -> None:
        self.loads.inc(1, tags={"embodiment": embodiment, "model": model, "outcome": outcome})
        if load_ms is not None:
            self.load_ms.observe(load_ms, tags={"embodiment": embodiment, "preset": preset})

    def evicted(self, embodiment: str, model: str) -> None:
        self.evictions.inc(1, tags={"embodiment": embodiment, "model": model})

    def resident(self, embodiment: str, count: int) -> None:
        self.resident_models.set(count, tags={"embodiment": embodiment})


class MetricsBuffer:
    """Counts on the hot path with dict arithmetic; hands them to Ray's metrics once a second.

    Ray's metric calls cost microseconds each; at thousands of requests a second that is worth keeping off
    the path of every reply. Values still reach Prometheus within one flush interval.
    """

    def __init__(self, sink: FleetMetrics) -> None:
        self.sink = sink
        self._requests: dict[tuple[str, str, str], int] = {}
        self._errors: dict[tuple[str, str], int] = {}
        self._actions: list[tuple[str, int, float, float, float, float | None]] = []
        self._models: dict[tuple[str, str, str], int] = {}
        self._slo: dict[tuple[str, str, str], int] = {}
        self._underruns: dict[str, int] = {}
        self.underruns_total: dict[str, int] = {}  # since start, for the status page

    def underrun(self, embodiment: str) -> None:
        self._underruns[embodiment] = self._underruns.get(embodiment, 0) + 1
        self.underruns_total[embodiment] = self.underruns_total.get(embodiment, 0) + 1

    def request(self, embodiment: str, endpoint: str, outcome: str) -> None:
        key = (embodiment, endpoint, outcome)
        self._requests[key] = self._requests.get(key, 0) + 1
        if outcome != "ok":
            ekey = (embodiment, outcome)
            self._errors[ekey] = self._errors.get(ekey, 0) + 1

    def model_request(self, embodiment: str, model: str, outcome: str) -> None:
        key = (embodiment, model, outcome)
        self._models[key] = self._models.get(key, 0) + 1

    def action(self, embodiment: str, batch_size: int, queue_ms: float, infer_ms: float, total_ms: float,
               predicted_ms: float | None = None) -> None:
        self._actions.append((embodiment, batch_size, queue_ms, infer_ms, total_ms, predicted_ms))

    def slo(self, embodiment: str, port: int, outcome: str) -> None:
        key = (embodiment, str(port), outcome)
        self._slo[key] = self._slo.get(key, 0) + 1

    def flush(self) -> None:
        requests, self._requests = self._requests, {}
        errors, self._errors = self._errors, {}
        actions, self._actions = self._actions, []
        models, self._models = self._models, {}
        for (emb, model, outcome), n in models.items():
            self.sink.model_requests.inc(n, tags={"embodiment": emb, "model": model, "outcome": outcome})
        underruns, self._underruns = self._underruns, {}
        for emb, n in underruns.items():
            self.sink.buffer_underruns.inc(n, tags={"embodiment": emb})
        slo, self._slo = self._slo, {}
        for (emb, port, outcome), n in slo.items():
            self.sink.slo.inc(n, tags={"embodiment": emb, "port": port, "outcome": outcome})
        for (emb, endpoint, outcome), n in requests.items():
            self.sink.requests.inc(n, tags={"embodiment": emb, "endpoint": endpoint, "outcome": outcome})
        for (emb, kind), n in errors.items():
            self.sink.errors.inc(n, tags={"embodiment": emb, "kind": kind})
        for emb, batch, queue_ms, infer_ms, total_ms, predicted_ms in actions:
            tags = {"embodiment": emb}
            self.sink.batch_size.observe(batch, tags=tags)
            self.sink.queue_ms.observe(queue_ms, tags=tags)
            self.sink.infer_ms.observe(infer_ms, tags=tags)
            self.sink.total_ms.observe(total_ms, tags=tags)
            if predicted_ms:
                self.sink.predicted_infer_ms.observe(predicted_ms, tags=tags)
                self.sink.infer_prediction_ratio.observe(infer_ms / predicted_ms, tags=tags)
