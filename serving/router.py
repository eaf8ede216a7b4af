"""Embodiment tag -> the handle of that embodiment's policy deployment.

It lives inside whichever ingress uses it (no extra Ray hop); the ZMQ ingress is one such user.
"""

from __future__ import annotations

from typing import Generic, Mapping, TypeVar

from clients.protocol import RequestError, canonical_tag

H = TypeVar("H")


class EmbodimentRouter(Generic[H]):
    def __init__(self, handles: Mapping[str, H]):
        if not handles:
            raise ValueError("EmbodimentRouter: expected at least one embodiment, got none")
        self._handles = {canonical_tag(tag): h for tag, h in handles.items()}

    @property
    def tags(self) -> list[str]:
        return sorted(self._handles)

    def resolve(self, tag: str) -> str:
        """The canonical served tag for `tag`, or a RequestError listing the served tags."""
        try:
            key = canonical_tag(tag)
        except ValueError:
            raise RequestError(
                f"embodiment_tag: {tag!r:.60} is not served here (not a tag name: letters, digits and _ . + -); "
                f"served: {', '.join(self.tags)}"
            ) from None
        if key not in self._handles:
            raise RequestError(f"embodiment_tag: {tag!r:.60} is not served here; served: {', '.join(self.tags)}")
        return key

    def handle(self, tag: str) -> H:
        return self._handles[self.resolve(tag)]

    def items(self):
        return self._handles.items()
