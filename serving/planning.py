"""Deadline-aware scheduling decisions, free of Ray and asyncio: what the batcher asks before it sends.

A robot needs its next action chunk before the current one runs out, so every get_action carries a deadline
and the useful figure is actions delivered on time. Three decisions follow from a model of how long a
forward pass of n samples takes (fed by the replicas' own `infer_ms`):

- admission: a request whose predicted completion is past its deadline is refused at once (the robot can
  resend a fresh observation) instead of waiting out its budget or being computed too late;
- order: the tighter deadline class first, then the earliest deadline, so the requests that can still make
  it go before the ones with slack (`budget_class`);
- batch size: the largest batch whose predicted completion still meets the earliest deadline inside it.

A request's own batch is judged by its tail time (`ForwardTimeModel.tail_factor`), not the mean: whether
one request makes it depends on one pass, and passes on a shared machine vary.

Everything here is a pure function of its inputs (times in seconds, `now` passed in) so it can be tested
against a fake replica with a known latency curve.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Protocol, Sequence


TAIL_QUANTILE = 0.9
TAIL_WINDOW = 64  # passes
TAIL_MIN_OBSERVATIONS = 8


def budget_class(budget_s: float) -> float:
    """A request's deadline class: its time budget to two significant digits (1.5 s, 4.0 s, 0.25 s).

    The queue serves the tighter class first, then the earliest deadline (deadline-monotonic between
    classes, EDF within one). Pure EDF would let a loose request that has waited most of its budget go
    before a tight one that just came, so any error in predicting the loose backlog lands on the tight
    robots; class first, it lands on the loose ones, who have the slack to absorb it (and admission counts
    the tighter arrivals expected ahead of a loose request)."""
    return float(f"{budget_s:.2g}")


class ForwardTimeModel:
    """Predicted forward-pass time of a batch of n samples: fixed + per_sample * n (ms), fitted online.

    Exponentially weighted least squares over the recent replies (memory ~ 1 / (1 - decay) batches), with a
    weak ridge pull of the slope toward half the mean time per sample: while every batch had the same size
    the slope cannot be told from the data, and the pull keeps the extrapolation to other sizes sane.
    Robust to stalls both ways: an observation over 3x or under 1/3 of the prediction is set aside (a GC
    pause, a descheduled core, a replica's cold first pass); the third such in a row in the same direction
    is a lasting change (another machine, another thread count) and the fit restarts from it. Until it has
    `min_observations` since a (re)start the model is not `ready` and the scheduler refuses nothing on it.
    """

    def __init__(self, decay: float = 0.95, ridge: float = 0.3, min_observations: int = 3):
        self._ratios: deque[float] = deque(maxlen=TAIL_WINDOW)  # observed / predicted, of the recent passes
        self._tail = 1.0  # tail_factor, recomputed when a ratio comes in (read on every planned batch)
        self.decay = decay
        self.ridge = ridge
        self.min_observations = min_observations
        self._reset()
        self.fixed_ms = 0.0
        self.per_sample_ms = 0.0
        self._streak = 0  # consecutive outliers: > 0 high, < 0 low

    def _reset(self) -> None:
        self._s0 = self._s1 = self._s2 = self._t0 = self._t1 = 0.0
        self.observations = 0

    @property
    def ready(self) -> bool:
        return self.observations >= self.min_observations

    def observe(self, samples: int, infer_ms: float) -> None:
        if samples <= 0 or not math.isfinite(infer_ms) or infer_ms <= 0:
            return
        if self.observations > 0:
            ratio = infer_ms / max(self.fixed_ms + self.per_sample_ms * samples, 1e-6)
            direction = 1 if ratio > 3.0 else -1 if ratio < 1 / 3 else 0
            if direction:
                self._streak = self._streak + direction if self._streak * direction > 0 else direction
                if abs(self._streak) < 3:
                    return  # an outlier, until it repeats
                self._reset()  # a lasting change: start over from here
            self._streak = 0
            if self.ready:
                self._ratios.append(ratio)
                if len(self._ratios) >= TAIL_MIN_OBSERVATIONS:
                    ordered = sorted(self._ratios)
                    self._tail = max(1.0, ordered[min(len(ordered) - 1, int(TAIL_QUANTILE * len(ordered)))])
        d = self.decay
        n = float(samples)
        self._s0 = d * self._s0 + 1.0
        self._s1 = d * self._s1 + n
        self._s2 = d * self._s2 + n * n
        self._t0 = d * self._t0 + infer_ms
        self._t1 = d * self._t1 + n * infer_ms
        self.observations += 1
        self._fit()

    def _fit(self) -> None:
        mean_n = self._s1 / self._s0
        mean_y = self._t0 / self._s0
        guess = 0.5 * mean_y / mean_n  # slope prior: half of each sample's mean time is per-sample work
        var = self._s2 - self._s1 * mean_n  # weighted sum of squared deviations of n
        cov = self._t1 - self._s1 * mean_y
        r = self.ridge * self._s0
        slope = (cov + r * guess) / (var + r)
        slope = max(0.0, slope)
        fixed = mean_y - slope * mean_n
        if fixed < 0.0:  # a fit with negative fixed cost: proportional through the origin instead
            slope, fixed = self._t1 / self._s2, 0.0
        self.per_sample_ms, self.fixed_ms = slope, fixed

    def predict(self, samples: int) -> float | None:
        """Predicted forward ms for `samples` samples, None until the model is ready."""
        if not self.ready:
            return None
        return self.fixed_ms + self.per_sample_ms * samples

    @property
    def tail_factor(self) -> float:
        """How much longer than predicted a pass runs at the TAIL_QUANTILE of the recent ones (at least 1).

        A request rides one batch: whether it makes its deadline depends on that batch's time, not on the
        mean, and on a shared CPU one pass in ten runs a third over (another replica's pass, the ingress).
        So the decisions for a request's own batch use the tail; the work queued ahead of it, many passes
        whose errors even out, the mean."""
        return self._tail

    def predict_tail(self, samples: int) -> float | None:
        """Forward ms that `samples` samples stay within but for one pass in ten (see tail_factor)."""
        mean = self.predict(samples)
        return None if mean is None else mean * self.tail_factor

    def snapshot(self) -> dict[str, float]:
        return {"fixed_ms": round(self.fixed_ms, 3), "per_sample_ms": round(self.per_sample_ms, 3),
                "observations": float(self.observations), "tail_factor": round(self.tail_factor, 3)}


class Queued(Protocol):
    deadline: float  # epoch seconds

    @property
    def samples(self) -> int: ...


@dataclass
class Plan:
    """One scheduling decision: the batch to send now (EDF order) and the requests to refuse now."""

    batch: list
    refuse: list
    predicted_ms: float | None  # the batch's predicted service time (overhead + forward), None without a model


def service_ms(model: ForwardTimeModel, samples: int, overhead_ms: float, tail: bool = False) -> float | None:
    """A batch's predicted time from dispatch to reply: the mean, or with `tail` the time one pass in ten
    exceeds (what a request's deadline is judged against for the batch it rides)."""
    forward = model.predict_tail(samples) if tail else model.predict(samples)
    return None if forward is None else forward + overhead_ms


def predicted_late(
    queue: Sequence[Queued],
    free_at: Sequence[float],
    model: ForwardTimeModel,
    overhead_ms: float,
    max_batch_size: int,
) -> list:
    """(request, predicted completion) of the requests of `queue` (in queue order) that would miss their
    deadline if served in that order.

    One pass: the kept requests fill batches of `max_batch_size` handed to whichever replica frees first
    (`free_at`, epoch s); a request is late when the batch it would ride completes past its deadline (that
    batch's tail time, see ForwardTimeModel.tail_factor), and then it is left out (refusing it frees the
    room for the ones behind it).
    """
    full = service_ms(model, max_batch_size, overhead_ms)
    if full is None or not free_at:
        return []
    workers = sorted(free_at)
    late: list = []
    partial = 0  # samples already in the batch being filled
    for item in queue:
        size = min(max_batch_size, partial + item.samples)
        done = workers[0] + service_ms(model, size, overhead_ms, tail=True) / 1000.0
        if done > item.deadline:
            late.append((item, done))
            continue
        partial += item.samples
        if partial >= max_batch_size:
            workers[0] += full / 1000.0
            workers.sort()
            partial = 0
    return late


def plan_batch(
    queue: Sequence[Queued],
    now: float,
    model: ForwardTimeModel,
    overhead_ms: float,
    max_batch_size: int,
    others_free_at: Sequence[float] = (),
    max_starts: int = 8,
) -> Plan:
    """What to send to a free replica now, from `queue` in queue order (tighter class, then earliest deadline).

    A request that cannot make its deadline even alone on a free replica is refused. A batch is a run of
    the queue; it is as large as fits in `max_batch_size` samples with its predicted completion still
    meeting the earliest deadline inside it. Starting the run at the head is plain queue order; but under load a head with little slack would cut every batch small and
    starve everyone behind it, so the run may start a little further down when that leaves fewer requests
    predicted late (on this replica after the batch, and on the others, `others_free_at`), and, with a full
    batch waiting, when the head would cut the batch below half its full size. Ties go to the head. Requests
    are never split. Without a model (no reply yet) the batch is the first
    `max_batch_size` samples.
    """
    refuse: list = []
    live: list = []
    for item in queue:
        alone = service_ms(model, item.samples, overhead_ms, tail=True)
        if alone is not None and now + alone / 1000.0 > item.deadline:
            refuse.append(item)
        else:
            live.append(item)
    if not live:
        return Plan([], refuse, None)

    def run_from(i: int) -> tuple[list, int]:
        batch, samples, due = [], 0, math.inf
        for item in live[i:]:
            n = item.samples
            if samples + n > max_batch_size and batch:
                break
            t = service_ms(model, samples + n, overhead_ms, tail=True)
            if batch and t is not None and now + t / 1000.0 > min(due, item.deadline):
                break
            batch.append(item)
            samples += n
            due = min(due, item.deadline)
            if samples >= max_batch_size:
                break
        return batch, samples

    def lost(batch: list, samples: int) -> int:
        chosen = {id(x) for x in batch}
        rest = [x for x in live if id(x) not in chosen]
        done = now + service_ms(model, samples, overhead_ms) / 1000.0
        return sum(x.samples for x, _ in predicted_late(rest, [done, *others_free_at], model, overhead_ms, max_batch_size))

    best, best_samples = run_from(0)
    if model.ready and len(live) > len(best):
        # Under load (a full batch waiting) a batch below half the full size wastes the replica: such a run
        # only wins when no longer run exists; its head then waits, and is refused if it can no longer make it.
        waiting = sum(x.samples for x in live)
        floor = max_batch_size // 2 if waiting >= max_batch_size else 0
        best_key = (best_samples < floor, lost(best, best_samples))
        for i in range(1, min(len(live), max_starts)):
            if best_key == (False, 0):
                break
            batch, samples = run_from(i)
            key = (samples < floor, lost(batch, samples))
            if key < best_key:
                best, best_samples, best_key = batch, samples, key
    return Plan(best, refuse, service_ms(model, best_samples, overhead_ms))


def predict_completion(
    ahead_samples: int,
    samples: int,
    free_at: Sequence[float],
    now: float,
    model: ForwardTimeModel,
    overhead_ms: float,
    max_batch_size: int,
) -> float | None:
    """When a request of `samples` would complete (epoch s) behind `ahead_samples` queued before it (EDF).

    The work ahead is shared by the replicas (`free_at`: when each one finishes what it runs now) in full
    batches, then ours rides in the next batch with what is left over. An estimate, not a promise: later
    arrivals with earlier deadlines can still pass it, and `plan_batch` checks again at dispatch.
    """
    if not model.ready:
        return None
    workers = sorted(max(now, t) for t in free_at) or [now]
    full = service_ms(model, max_batch_size, overhead_ms) / 1000.0
    remaining = ahead_samples
    # Hand out full batches of the work ahead to whichever replica frees first.
    while remaining >= max_batch_size:
        workers[0] += full
        workers.sort()
        remaining -= max_batch_size
    size = min(max(max_batch_size, samples), remaining + samples)
    return workers[0] + service_ms(model, size, overhead_ms, tail=True) / 1000.0


def capacity_samples_per_s(model: ForwardTimeModel, max_batch_size: int, overhead_ms: float) -> float | None:
    """Samples per second one replica serves at full batches (what autoscaling divides demand by)."""
    full = service_ms(model, max_batch_size, overhead_ms)
    if full is None or full <= 0:
        return None
    return max_batch_size / (full / 1000.0)


def replicas_needed(demand_samples_per_s: float, capacity_per_replica: float | None, utilisation: float) -> float:
    """Replicas that serve `demand` at `utilisation` of their capacity (0 when there is no demand)."""
    if demand_samples_per_s <= 0:
        return 0.0
    if not capacity_per_replica:
        return 1.0
    return demand_samples_per_s / (capacity_per_replica * utilisation)
