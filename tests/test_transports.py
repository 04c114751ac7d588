"""
Tests for ``proxy.relay.transports``: walking down a stack of transports
(TLS over a wrapper over TCP) to the innermost one, with a bound on depth;
keeping the interface declarations the layers make at each connection.
"""

from __future__ import annotations

import gc
import weakref

from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import directlyProvides, providedBy
from zope.interface.declarations import Provides

from proxy.relay import transports
from proxy.relay.transports import MAX_DEPTH, keepDeclarations, transportChain


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


def stack(wrapperClass: type) -> tuple[ProtocolWrapper, StringTransport]:
    """A ``wrapperClass`` layer over TCP, connected (it takes on TCP's interfaces)."""
    tcp = StringTransport()
    wrapper = wrapperClass(WrappingFactory(None), Protocol())
    wrapper.makeConnection(tcp)
    return wrapper, tcp


class LoopingWrapper(ProtocolWrapper):
    """Takes on its transport's interfaces one at a time, as Twisted's TLS layer does."""

    def makeConnection(self, transport):
        for interface in providedBy(transport):
            directlyProvides(self, interface)
        ProtocolWrapper.makeConnection(self, transport)


class KeepDeclarationsTests(SynchronousTestCase):
    """
    A layer's declarations outlive its connection once kept, so the next
    connection's layer finds them instead of working them out again. Each
    test makes its own wrapper class: what is kept stays kept.
    """

    def test_aWrappersDeclarationOutlivesItsConnection(self):
        """The declaration a wrapper took on is the next wrapper's, once kept."""

        class Wrapper(ProtocolWrapper):
            pass

        first, _ = stack(Wrapper)
        made = weakref.ref(providedBy(first))
        keepDeclarations(first)
        del first
        gc.collect()
        self.assertIsNotNone(made())
        second, _ = stack(Wrapper)
        self.assertIs(providedBy(second), made())

    def test_withoutKeepingItIsWorkedOutAgain(self):
        """The control: nothing else holds a dropped connection's declaration."""

        class Wrapper(ProtocolWrapper):
            pass

        first, _ = stack(Wrapper)
        made = weakref.ref(providedBy(first))
        del first
        gc.collect()
        self.assertIsNone(made())

    def test_eachInterfaceOfALoopingLayerIsKept(self):
        """
        A layer that declares its transport's interfaces one by one (the TLS
        layer) finds every one of those declarations kept, not only the last.
        """
        first, tcp = stack(LoopingWrapper)
        keepDeclarations(first)
        kept = [weakref.ref(Provides(LoopingWrapper, i)) for i in providedBy(tcp)]
        del first
        gc.collect()
        self.assertTrue(kept)
        self.assertTrue(all(ref() is not None for ref in kept))

    def test_keptOncePerKindOfStack(self):
        """A second stack of the same kind adds nothing; past the bound nothing is added."""

        class Wrapper(ProtocolWrapper):
            pass

        keepDeclarations(stack(Wrapper)[0])
        count = len(transports._KEPT)
        keepDeclarations(stack(Wrapper)[0])
        self.assertEqual(len(transports._KEPT), count)

        class Other(ProtocolWrapper):
            pass

        self.patch(transports, "MAX_KEPT", count)
        keepDeclarations(stack(Other)[0])
        self.assertEqual(len(transports._KEPT), count)
