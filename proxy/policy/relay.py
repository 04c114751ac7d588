"""The policy relay (stub: relays untouched until the policy lands)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..model import Restrictions
from ..relay import Splice


def filterCapabilities(caps: list[bytes], restrictions: Restrictions | None) -> list[bytes]:
    """The capabilities a client of a restricted token is told (stub: all)."""
    return list(caps)


class PolicySplice(Splice):
    """A ``Splice`` that enforces ``restrictions`` on the wire (stub: relays untouched)."""

    def __init__(
        self,
        client: Any,
        upstream: Any,
        label: str,
        onEnd: Any = None,
        callLater: Any = None,
        audit: dict[str, Any] | None = None,
        seconds: Any = None,
        *,
        restrictions: Restrictions,
        onRefused: Callable[[str], None],
    ):
        super().__init__(client, upstream, label, onEnd, callLater, audit, seconds)
        self.restrictions = restrictions
        self.onRefused = onRefused
