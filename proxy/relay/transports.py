"""
Walking down a stack of transports: a TLS layer, a PROXY-protocol wrapper
and a TCP connection are each the ``transport`` of the one above. Every
place that needs a layer below (the socket, the TLS layer) walks the stack
here, one way, with a bound on its depth.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from zope.interface import providedBy
from zope.interface.declarations import Provides

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


# The interface declarations kept, by (layer's class, interfaces of the
# layer below): a handful (one per kind of stack) in a process; the bound is
# against a layer that declares something new per connection.
_KEPT: dict[tuple[type, Any], tuple[Any, list[Any]]] = {}
# The top layers' declarations of the stacks already walked: once kept, a
# stack of the same kind has the same one, and the walk is skipped.
_WALKED: set[Any] = set()
MAX_KEPT = 64


def keepDeclarations(transport: Any) -> None:
    """
    Hold, for good, the interface declarations the layers of ``transport``'s
    stack made for themselves, so that the next connection's layers find them.

    Twisted's wrappers take on their transport's interfaces at every
    connection: a ``ProtocolWrapper`` with one ``directlyProvides``, the TLS
    layer with one per interface, each replacing the last. zope.interface
    keeps each declaration (``Provides``) only while something refers to
    it, so with few connections at a time each one worked them all out
    again (their resolution orders: about 390 Python calls a login). Once
    per kind of stack, this keeps the one each layer holds and one per
    interface of the layer below (what the TLS layer's loop makes).
    """
    top = providedBy(transport)
    if top in _WALKED:
        return
    for layer in transportChain(transport):
        below = getattr(layer, "transport", None)
        if below is None:
            break
        key = (type(layer), providedBy(below))
        if key in _KEPT:
            continue
        if len(_KEPT) >= MAX_KEPT:
            return
        _KEPT[key] = (providedBy(layer), [Provides(type(layer), i) for i in providedBy(below)])
    if len(_WALKED) < MAX_KEPT:
        _WALKED.add(top)
