"""Which models each replica of one embodiment holds, for the ingress's `info`, limited to replicas still running.

Replicas report what they hold in every batch reply and `models()` table; a replica that went away (scaled
down, crashed, restarted under a new id) just stops reporting. Serve's public status gives a deployment's
RUNNING count but not its replicas' ids, so the ingress keeps, of more reporters than RUNNING replicas, those
heard from most recently. A replica heard from within `fresh_s` is kept whatever the count says: the count is
polled every few seconds and may not yet include a replica autoscaling just added.
"""

from __future__ import annotations

import time
from typing import Callable

FRESH_S = 5.0


class ResidentModels:
    """replica id -> (when it last reported, the models it holds); `resident[replica] = models` records a report."""

    def __init__(self, fresh_s: float = FRESH_S, clock: Callable[[], float] = time.monotonic):
        self._fresh_s = fresh_s
        self._clock = clock
        self._reports: dict[str, tuple[float, list[str]]] = {}

    def __setitem__(self, replica: str, models: list[str]) -> None:
        self._reports[replica] = (self._clock(), list(models))

    def __len__(self) -> int:
        return len(self._reports)

    def prune(self, running: int | None) -> None:
        """Keep at most `running` replicas (the most recently heard from), and any heard from within fresh_s.
        None (Serve's count not known yet): keep all."""
        if running is None or len(self._reports) <= running:
            return
        newest_first = sorted(self._reports, key=lambda r: self._reports[r][0], reverse=True)
        now = self._clock()
        for replica in newest_first[max(0, running):]:
            if now - self._reports[replica][0] > self._fresh_s:
                del self._reports[replica]

    def holding(self, model: str) -> list[str]:
        """The replicas that hold `model`, sorted by id."""
        return sorted(r for r, (_, held) in self._reports.items() if model in held)
