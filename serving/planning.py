"""What the embodiment scheduler computes before it sends: pure arithmetic, free of Ray and asyncio.

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

Besides those: how far a tight request can wait for a replica (`reach_s`) and so how long a batch may run
(`batch_cap`), how many batches may travel at once (`inflight_slots`), when each replica frees (`free_at`),
how much arrives per deadline class (`ClassRates`) and in all (`DemandMeter`), what one replica serves
(`capacity_samples_per_s`) and how many replicas a demand needs (`replicas_needed`).

Everything here is a function of its inputs (times in seconds, `now` passed in), so it is tested with
numbers, without a clock, a loop or a replica (tests/unit/test_planning.py).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence


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


# --- replicas: when they free, how many batches may travel ---------------------------------------------------

REACH_MARGIN = 0.1  # of the tight budget: kept free of the reach, for the predictions' error
CLEARLY_TIGHTER = 0.75  # a class is tighter than another when its budget is under this share of the other's


def free_at(now: float, replicas: int, inflight: Iterable[tuple[float, float]]) -> list[float]:
    """When each of `replicas` finishes what it runs now (predicted), earliest first; `now` for idle ones.

    `inflight`: (sent, predicted service s) of each batch still on its way, in dispatch order; each runs on the
    first replica to free, from when it was sent. Recomputed from the batches still out, never from ends
    predicted at dispatch: a batch sent behind one predicted long would otherwise keep that stale end after
    the long one came back early, and each batch sent behind it would add its own on top (a tiny model under a
    stall once predicted 19 s to a lone request on an idle replica and refused every robot)."""
    free = [-math.inf] * max(1, replicas)
    for sent, service_s in inflight:
        free.sort()
        free[0] = max(free[0], sent) + service_s
    return sorted(max(now, f) for f in free)


def inflight_slots(model: ForwardTimeModel, max_batch_size: int, overhead_ms: float, replicas: int,
                   max_inflight: int) -> int:
    """Batches in flight at once: one per replica, plus one waiting behind each when the round trip to the
    replica is a noticeable share of a forward pass (a small model), so a replica that finishes starts the next at
    once. Not more: a batch sent ahead is a commitment that a later, more urgent request cannot pass. At most
    `max_inflight`; `max_inflight` itself until the model knows the forward time."""
    full = model.predict(max_batch_size)
    if full is None:
        return max_inflight
    depth = 1 + max(0, math.ceil(overhead_ms / max(full, 1e-3) - 0.1))
    return max(1, min(max_inflight, replicas * min(depth, 2)))


# --- the tight class's reach and the batch cap that keeps it ---------------------------------------------------


def reach_s(model: ForwardTimeModel, tightest: tuple[float, float] | None, overhead_ms: float) -> float | None:
    """How long a request of the tightest class can wait for a free replica and still make its deadline: its
    budget less its own batch (itself and the tight requests arriving while it waits) and a margin.
    `tightest`: (budget s, samples/s) of the tightest class (`ClassRates.tightest`). None when no class is
    tighter than the others, or when even a free replica could not serve it."""
    alone = service_ms(model, 1, overhead_ms, tail=True)
    if tightest is None or alone is None:
        return None
    budget, rate = tightest
    per_sample_s = model.per_sample_ms / 1000.0
    reach = (budget * (1.0 - REACH_MARGIN) - alone / 1000.0) / (1.0 + per_sample_s * rate)
    return reach if reach > 0 else None


def largest_batch_within(model: ForwardTimeModel, seconds: float, overhead_ms: float, max_batch_size: int) -> int:
    """The most samples (at least 1, at most max_batch_size) whose predicted service fits in `seconds`."""
    fixed = model.fixed_ms + overhead_ms
    per = max(model.per_sample_ms, 1e-6)
    return max(1, min(max_batch_size, int((seconds * 1000.0 - fixed) / per)))


def batch_cap(model: ForwardTimeModel, start: float, others: Sequence[float], reach: float | None,
              overhead_ms: float, max_batch_size: int) -> int:
    """Samples the batch starting at `start` may carry, the other replicas freeing at `others`.

    Without preemption, a tight request is served when the next replica frees: so while the robots ask for a
    tight class, no gap between two replicas freeing may outgrow its reach. This batch ends after the last of
    the others, so it must end within the reach of that one; the replicas fall into step, each freeing about
    reach / replicas after the previous, and a batch lasts up to replicas x reach: small enough to keep the
    tight class, long enough to keep the throughput of batching."""
    if reach is None:
        return max_batch_size
    end_by = max([start, *others]) + reach
    return largest_batch_within(model, end_by - start, overhead_ms, max_batch_size)


def steady_batch_size(model: ForwardTimeModel, replicas: int, reach: float | None, overhead_ms: float,
                      max_batch_size: int) -> int:
    """The batch size the replicas settle at under load (what admission plans the queue ahead with)."""
    if reach is None:
        return max_batch_size
    return largest_batch_within(model, replicas * reach, overhead_ms, max_batch_size)


def call_overhead_ms(current: float, call_ms: float, forward_ms: float, cold_load_ms: float) -> float:
    """The EWMA of a batch call's time beyond its forward pass (Ray hops, (de)serialisation), after one more
    call: robust to a call that stalled (a cold replica, a retry), which moves it only a little."""
    extra = max(0.0, call_ms - forward_ms - cold_load_ms)
    if current == 0.0:
        return min(extra, OVERHEAD_FIRST_CAP_MS)
    return 0.9 * current + 0.1 * min(extra, 2 * current + 5.0)


OVERHEAD_FIRST_CAP_MS = 50.0  # a Ray call's own cost is a few ms; the first call can include a cold start


# --- what arrives ----------------------------------------------------------------------------------------------


class ClassRates:
    """Samples per second arriving per deadline class (budgets rounded to two significant digits), over the
    last `window_s`: what admission expects to pass a request from behind before its deadline."""

    REUSE_S = 0.001  # the rates of a moment ago, unless something arrived since: several decisions read them at once

    def __init__(self, window_s: float = 5.0):
        self.window_s = window_s
        self._arrivals: dict[float, deque[tuple[float, int]]] = {}  # budget class -> (time, samples)
        self._samples: dict[float, int] = {}  # budget class -> samples in its deque (read on every admission)
        self._last: tuple[float, list[tuple[float, float]]] | None = None

    def add(self, budget_s: float, samples: int, now: float) -> None:
        key = budget_class(budget_s)
        self._arrivals.setdefault(key, deque()).append((now, samples))
        self._samples[key] = self._samples.get(key, 0) + samples
        self._last = None

    def rates(self, now: float) -> list[tuple[float, float]]:
        """(budget, samples/s) of each class that sent lately."""
        if self._last is not None and 0.0 <= now - self._last[0] < self.REUSE_S:
            return self._last[1]
        out = []
        for key in list(self._arrivals):
            q = self._arrivals[key]
            while q and q[0][0] < now - self.window_s:
                self._samples[key] -= q.popleft()[1]
            if not q:
                del self._arrivals[key], self._samples[key]
            else:
                out.append((key, self._samples[key] / self.window_s))
        self._last = (now, out)
        return out

    def tightest(self, now: float) -> tuple[float, float] | None:
        """(budget, samples/s) of the tightest class, when the robots ask for clearly different deadlines
        (its budget under 3/4 of the loosest); None when there is one class only: then no class is traded
        against another and batches need no cap beyond their own earliest deadline."""
        rates = self.rates(now)
        if not rates:
            return None
        tight = min(rates)
        return tight if tight[0] < CLEARLY_TIGHTER * max(rates)[0] else None

    def expected_tighter_samples(self, budget_s: float, deadline: float, now: float) -> float:
        """Samples expected to arrive in a tighter class (they go first) while a request of `budget_s` waits:
        those that still need a pass before its `deadline` (arrivals until its deadline less their budget).
        Admission counts them as work ahead, so the loose robots' backlog leaves room for the tight ones."""
        return sum(rate * max(0.0, deadline - budget - now)
                   for budget, rate in self.rates(now) if budget < CLEARLY_TIGHTER * budget_s)


class DemandMeter:
    """Samples per second arriving (refused or not: refused demand is demand), over a sliding pair of
    windows: what autoscaling hears."""

    WINDOW_S = 2.0

    def __init__(self, now: float):
        self._start = now
        self._samples = 0
        self._last_rate = 0.0

    def add(self, samples: int, now: float) -> None:
        self._samples += samples
        elapsed = now - self._start
        if elapsed >= self.WINDOW_S:
            self._last_rate = self._samples / elapsed
            self._start, self._samples = now, 0

    def rate(self, now: float) -> float:
        elapsed = now - self._start
        if elapsed >= 2 * self.WINDOW_S:  # nothing arrived for two windows: no demand
            return self._samples / elapsed
        current = self._samples / max(elapsed, 0.5)  # the first half second alone would overshoot
        return max(self._last_rate, current)
