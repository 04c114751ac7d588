"""
Walking down a stack of transports: a TLS layer, a PROXY-protocol wrapper
and a TCP connection are each the ``transport`` of the one above. Every
place that needs a layer below (the socket, the TLS layer) walks the stack
here, one way, with a bound on its depth.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

# TLS over a PROXY-protocol wrapper over TCP is three; a stack deeper than
# this is a cycle or a mistake, not something to follow.
MAX_DEPTH = 8


def transportChain(transport: Any) -> Iterator[Any]:
    """
    ``transport``, then what it writes to, down to the innermost one (the
    one with no ``transport`` of its own: the TCP connection, a test
    transport).

    :param transport: a protocol's ``transport``, or None (nothing yielded).
    """
    t = transport
    for _ in range(MAX_DEPTH):
        if t is None:
            return
        yield t
        t = getattr(t, "transport", None)
