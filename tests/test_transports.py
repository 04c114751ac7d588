"""
Tests for ``proxy.relay.transports``: walking down a stack of transports
(TLS over a wrapper over TCP) to the innermost one, with a bound on depth.
"""

from __future__ import annotations

from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import SynchronousTestCase

from proxy.relay.transports import MAX_DEPTH, transportChain


class Loop:
    """A transport that (by mistake) is its own transport."""

    def __init__(self) -> None:
        self.transport = self


class TransportChainTests(SynchronousTestCase):
    def wrapped(self):
        """A protocol under two wrappers (as TLS over the PROXY protocol's) over TCP."""
        tcp = StringTransport()
        inner = ProtocolWrapper(WrappingFactory(None), Protocol())
        inner.makeConnection(tcp)
        outer = ProtocolWrapper(WrappingFactory(None), Protocol())
        outer.makeConnection(inner)
        return outer, inner, tcp

    def test_theChainGoesDownToTheSocket(self):
        """Each layer is followed by what it writes to, ending at the innermost."""
        tls, wrapper, tcp = self.wrapped()
        self.assertEqual(list(transportChain(tls)), [tls, wrapper, tcp])
        self.assertIs(list(transportChain(tls))[-1], tcp)

    def test_aBareTransportIsItsOwnInnermost(self):
        """A transport that wraps nothing is the whole chain."""
        tcp = StringTransport()
        self.assertEqual(list(transportChain(tcp)), [tcp])
        self.assertIs(list(transportChain(tcp))[-1], tcp)

    def test_none(self):
        """No transport (a protocol not connected yet): nothing to walk."""
        self.assertEqual(list(transportChain(None)), [])
        self.assertEqual(list(transportChain(None)), [])

    def test_aCycleIsNotFollowedForever(self):
        """A transport stack that loops stops after MAX_DEPTH steps."""
        loop = Loop()
        self.assertEqual(len(list(transportChain(loop))), MAX_DEPTH)
        self.assertIs(list(transportChain(loop))[-1], loop)
