"""Embodiment tags: which robot a checkpoint's per-embodiment weights, statistics and modality configs are for.

GR00T N1.6 names its embodiments with an `EmbodimentTag` enum whose *values* are lower-case strings
("gr1", "unitree_g1", ...) and whose *names* are upper-case ("GR1", "UNITREE_G1"). A checkpoint stores the
values. We accept the known tags in any spelling a GR00T user might type (value, enum name, "EmbodimentTag.GR1",
an enum member of ours or of NVIDIA's package) and any custom tag (fine-tuned robots), always resolving to the
lower-case canonical string.
"""

from __future__ import annotations

import enum
from typing import Any

from clients.protocol import canonical_tag


class EmbodimentTag(str, enum.Enum):
    """The GR00T N1.6 tags (plus a few N1.5/N1.7 ones that released checkpoints hold)."""

    # Pretrain embodiment tags
    ROBOCASA_PANDA_OMRON = "robocasa_panda_omron"
    GR1 = "gr1"
    BEHAVIOR_R1_PRO = "behavior_r1_pro"
    # Pre-registered post-train embodiment tags
    UNITREE_G1 = "unitree_g1"
    LIBERO_PANDA = "libero_panda"
    OXE_GOOGLE = "oxe_google"
    OXE_WIDOWX = "oxe_widowx"
    OXE_DROID = "oxe_droid"
    # Other generations' tags that checkpoints in the wild carry
    AGIBOT_GENIE1 = "agibot_genie1"
    LIBERO_SIM = "libero_sim"
    # Any new embodiment during post-training
    NEW_EMBODIMENT = "new_embodiment"


KNOWN_TAGS: tuple[str, ...] = tuple(t.value for t in EmbodimentTag)


def resolve_tag(tag: Any) -> str:
    """Canonical lower-case tag for `tag` (the wire protocol's rule, `clients.protocol.canonical_tag`): a string in
    any case ("gr1", "GR1", "EmbodimentTag.GR1", " Unitree_G1 "), a member of `EmbodimentTag` or of any other enum
    whose value is a string (NVIDIA's `gr00t.data.embodiment_tags`), and custom tags. Raises ValueError otherwise.
    """
    return canonical_tag(tag)


def is_known_tag(tag: Any) -> bool:
    """True for the GR00T tags listed in `EmbodimentTag` (after resolution)."""
    try:
        return resolve_tag(tag) in KNOWN_TAGS
    except ValueError:
        return False
