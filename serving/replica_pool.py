"""What the batchers of one embodiment share: its policy deployment's replicas.

The ingress runs one batcher per (embodiment, model), since a batch never mixes models, but every model of
an embodiment runs on the same replicas (Serve multiplexing). So when a replica frees, which batches run
where, how many replicas there are and what demand autoscaling hears are facts about the embodiment, not
about one model: they live here, and each batcher plans against the whole pool. Also shared: how much
work arrives per deadline class (what admission expects to pass a request from behind), and how long a
cold model load takes.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

from serving.scheduler import budget_class, capacity_samples_per_s, replicas_needed

if TYPE_CHECKING:
    from serving.batcher import EmbodimentBatcher

REPLICA_SEEN_S = 10.0
CLEARLY_TIGHTER = 0.75  # a class is tighter than another when its budget is under this share of the other's


class ClassRates:
    """Samples per second arriving per deadline class (budgets rounded to two significant digits), over the
    last `window_s`: what admission expects to pass a request from behind before its deadline."""

    def __init__(self, window_s: float = 5.0):
        self.window_s = window_s
        self._arrivals: dict[float, deque[tuple[float, int]]] = {}  # budget class -> (time, samples)
        self._samples: dict[float, int] = {}  # budget class -> samples in its deque (read on every admission)

    def add(self, budget_s: float, samples: int, now: float) -> None:
        key = budget_class(budget_s)
        self._arrivals.setdefault(key, deque()).append((now, samples))
        self._samples[key] = self._samples.get(key, 0) + samples

    def rates(self, now: float) -> list[tuple[float, float]]:
        """(budget, samples/s) of each class that sent lately."""
        out = []
        for key in list(self._arrivals):
            q = self._arrivals[key]
            while q and q[0][0] < now - self.window_s:
                self._samples[key] -= q.popleft()[1]
            if not q:
                del self._arrivals[key], self._samples[key]
            else:
                out.append((key, self._samples[key] / self.window_s))
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

    def tighter_than(self, budget_s: float, now: float) -> list[tuple[float, float]]:
        """(budget, samples/s) of the classes whose budget is clearly shorter than `budget_s`."""
        return [(b, r) for b, r in self.rates(now) if b < CLEARLY_TIGHTER * budget_s]


class ReplicaPool:
    def __init__(self, tag: str):
        self.tag = tag
        self.batchers: list["EmbodimentBatcher"] = []
        self._replicas_hint = 1
        self._replicas_seen: dict[str, float] = {}  # replica id -> last reply (time.time())
        self.busy_until: dict[Any, float] = {}  # batch in flight (any model) -> its predicted completion (epoch s)
        self._rates = ClassRates()
        self.cold_load_ms = 0.0  # a fine-tune's load on a replica, as replicas measured it (EWMA)
        self.fleet_load: dict[str, float] = {}  # what the ingress knows beyond this embodiment (busy_replicas)

    # --- replicas ---------------------------------------------------------------------------------------

    def set_replicas(self, n: int) -> None:
        """How many replicas serve the deployment (the ingress reads it from Serve)."""
        self._replicas_hint = max(1, int(n))
        self.notify()

    def seen(self, replica: str) -> None:
        self._replicas_seen[replica] = time.time()

    @property
    def replicas(self) -> int:
        """Replicas to keep busy: the hint, or more if more answered lately."""
        now = time.time()
        seen = sum(1 for t in self._replicas_seen.values() if now - t < REPLICA_SEEN_S)
        return max(1, self._replicas_hint, seen)

    @property
    def inflight(self) -> int:
        return len(self.busy_until)

    def free_at(self, now: float) -> list[float]:
        """When each replica finishes what it runs now (predicted), earliest first; `now` for idle ones."""
        free = [now] * self.replicas
        for end in sorted(self.busy_until.values()):  # batches in dispatch order run on the first free replica
            free.sort()
            free[0] = max(free[0], end)
        return sorted(free)

    # --- the batchers -----------------------------------------------------------------------------------

    def join(self, batcher: "EmbodimentBatcher") -> None:
        self.batchers.append(batcher)

    def leave(self, batcher: "EmbodimentBatcher") -> None:
        if batcher in self.batchers:
            self.batchers.remove(batcher)
        self.notify()

    def notify(self) -> None:
        """Something changed that may let a waiting batcher send: every batcher looks again."""
        for b in self.batchers:
            b.wake()

    def first_in_line(self, batcher: "EmbodimentBatcher") -> bool:
        """Whether `batcher` holds the request that goes first (queue order across the embodiment's models)."""
        mine = batcher.head_key()
        if mine is None:
            return False
        return all(o is batcher or (k := o.head_key()) is None or k >= mine for o in self.batchers)

    # --- deadlines and cold loads -----------------------------------------------------------------------

    def note_arrival(self, budget_s: float, samples: int, now: float) -> None:
        self._rates.add(budget_s, samples, now)

    def tightest_class(self, now: float) -> tuple[float, float] | None:
        """(budget s, samples/s) of the tightest deadline class lately, if the robots ask for several."""
        return self._rates.tightest(now)

    def expected_tighter_samples(self, budget_s: float, deadline: float, now: float) -> float:
        """Samples expected to arrive in a tighter class (they go first) while a request of `budget_s` waits:
        those that still need a pass before its `deadline` (arrivals until its deadline less their budget).
        Admission counts them as work ahead, so the loose robots' backlog leaves room for the tight ones."""
        return sum(rate * max(0.0, deadline - budget - now) for budget, rate in self._rates.tighter_than(budget_s, now))

    def observe_cold_load(self, ms: float) -> None:
        if ms > 0:
            self.cold_load_ms = ms if self.cold_load_ms == 0.0 else 0.7 * self.cold_load_ms + 0.3 * ms

    # --- autoscaling --------------------------------------------------------------------------------------

    def load(self) -> dict[str, float]:
        """The embodiment's demand over all its models (sent along with each batch, read by autoscaling)."""
        caps = [capacity_samples_per_s(b.model, b.max_batch_size, b.overhead_ms) for b in self.batchers]
        known = next((c for c in caps if c), None)  # a fine-tune not yet timed runs like its siblings
        demand = needed = queued = 0.0
        for b, cap in zip(self.batchers, caps):
            d = b.demand_samples_per_s()
            demand += d
            needed += replicas_needed(d, cap or known, 0.8)
            queued += b.queued_samples
        return {
            "demand_samples_per_s": round(demand, 3),
            "capacity_samples_per_s": round(known or 0.0, 3),
            "queued_samples": float(queued),
            "replicas_needed": round(needed, 3),
            "replicas": float(self.replicas),
            **self.fleet_load,
        }
