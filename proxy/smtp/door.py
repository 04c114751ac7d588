"""
The SMTP front door as ``twistd imapproxy`` composes it: the same realm,
session registry and bounds as IMAP's, a portal whose checker asks for the
``smtp`` scope, and the EHLO cache with the service that primes it.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred

from ..cred import SMTP_SCOPE, TokenChecker
from ..imap import ServerPolicy, SessionRegistry
from .extensions import ProviderExtensions
from .prime import ExtensionsPrimer
from .server import SubmissionFactory

_HOSTNAME = re.compile(r"\A[A-Za-z0-9]([A-Za-z0-9.-]{0,252}[A-Za-z0-9])?\Z")


def validHostname(name: str) -> bool:
    """Whether ``name`` can stand in the greeting: letters, digits, dots and hyphens."""
    return bool(_HOSTNAME.match(name))


def submissionDoor(
    realm: Any,
    store: Any,
    clock: Any,
    penalties: Any,
    policy: ServerPolicy,
    contextFactory: Any,
    sessions: SessionRegistry,
    probe: Callable[[Any], Deferred[list[bytes]]],
    hostname: str | None = None,
) -> tuple[SubmissionFactory, ExtensionsPrimer]:
    """
    :param probe: ``(upstream) -> Deferred[list[bytes]]``, a server's EHLO keywords.
    :param hostname: the greeting's name (default: the machine's fully
        qualified name, looked up once, now).
    :return: the factory to listen with, and the service priming its EHLO.
    """
    portal = Portal(realm, [TokenChecker(store, clock, SMTP_SCOPE, penalties=penalties)])
    extensions = ProviderExtensions()
    name = hostname or socket.getfqdn()
    factory = SubmissionFactory(portal, policy, contextFactory, sessions, extensions, hostname=name)
    return factory, ExtensionsPrimer(store, extensions, probe, clock)
