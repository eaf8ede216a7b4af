"""Observations shaped for a served embodiment, built from the server's `info` reply.

A robot has its cameras and joints; a demo, a load test or a soak run has this instead: random images and
states of exactly the shapes the policy expects (numpy only, so it runs wherever the client runs).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .protocol import to_flat  # noqa: F401 - the flat form, where demos look for it


def _horizon(embodiment: dict[str, Any], modality: str) -> int:
    return len(embodiment["modality_config"][modality]["delta_indices"])


def random_observation(
    embodiment: dict[str, Any],
    batch_size: int = 1,
    *,
    image_size: tuple[int, int] | None = None,
    rng: np.random.Generator | None = None,
    task: str = "pick the pear from the counter and place it in the plate",
) -> dict[str, Any]:
    """A nested observation for `embodiment` (one entry of `PolicyClient.info()["embodiments"]`).

    Images default to the model's own size; any H x W is accepted by the server, which resizes.
    """
    rng = rng if rng is not None else np.random.default_rng()
    h, w = image_size if image_size is not None else tuple(embodiment["image_size"])
    t_video, t_state = _horizon(embodiment, "video"), _horizon(embodiment, "state")
    return {
        "video": {
            cam: rng.integers(0, 256, size=(batch_size, t_video, h, w, 3), dtype=np.uint8)
            for cam in embodiment["video_keys"]
        },
        "state": {
            key: rng.uniform(-1.0, 1.0, size=(batch_size, t_state, dim)).astype(np.float32)
            for key, dim in embodiment["state_dims"].items()
        },
        "language": {key: [[task]] * batch_size for key in embodiment["modality_config"]["language"]["modality_keys"]},
    }
