"""
What both front doors (IMAP's ``ProxyServer`` and SMTP's
``SubmissionServer``) ask of a client connection before its login: does it
run over TLS, and may a login go over it when it does not.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import INegotiated

from ..relay import transportChain
from ..tokens import clientAddress


def isLoopback(address: str) -> bool:
    ip = clientAddress(address)
    return ip is not None and ip.is_loopback


class SecureMixin:
    """
    Provided by the server: ``startedTLS`` (STARTTLS was begun), ``transport``,
    ``policy`` (a ``ServerPolicy``) and ``address`` (the client's).
    """

    startedTLS: bool
    transport: Any
    policy: Any
    address: str

    def secure(self) -> bool:
        """Whether this connection runs over TLS (implicit or STARTTLS)."""
        if self.startedTLS:
            return True
        for t in transportChain(self.transport):
            if INegotiated.providedBy(t) or getattr(t, "TLS", False):
                return True
        return False

    def plaintextAllowed(self) -> bool:
        """Whether a login is taken here: over TLS, or as ``plaintextLogin`` allows."""
        if self.secure() or self.policy.plaintextLogin == "allow":
            return True
        return self.policy.plaintextLogin == "loopback" and isLoopback(self.address)
