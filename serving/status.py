"""The ingress's HTTP status page (`curl http://127.0.0.1:8000/fleet`): where robots connect and how the queues look.

Per embodiment its scheduler's state: queue, batches in flight, replicas, forward-time model, call overhead, the
requests by outcome (on time, and each `clients.protocol.Refusal` reason) and the robots' buffer underruns. Per model its requests and the cold
loads they waited on. Read-only: it asks each part for its own summary.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from serving.config import IngressConfig
from serving.endpoints import Endpoints
from serving.models import ModelRegistry
from serving.scheduler import EmbodimentScheduler
from serving.transport import ZmqTransport


def rss_mb() -> float:
    """Resident memory of this process (Linux), for the status page: a leak shows as a climb here."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return -1.0


def status_page(config: IngressConfig, schedulers: Mapping[str, EmbodimentScheduler], registry: ModelRegistry,
                transport: ZmqTransport, endpoints: Endpoints, version: str) -> dict[str, Any]:
    underruns = endpoints.underruns()
    return {
        "ports": [{"address": f"tcp://{config.host}:{p.port}", "embodiment": p.embodiment, "protocol": p.protocol}
                  for p in config.ports],
        "embodiments": {tag: {**s.stats(), "buffer_underruns": underruns.get(tag, 0)} for tag, s in schedulers.items()},
        "robot_sessions": len(endpoints.sessions),
        "models": registry.status(),
        "open_requests": transport.open_requests,
        "robots_connected": {str(p): n for p, n in transport.robots.items()},
        "reply_hops": endpoints.hops.status(),
        "rss_mb": rss_mb(),
        "version": version,
    }
