"""
What the pre-auth EHLO offers: only the service extensions every provider
SMTP server known so far has.

A client logs in after EHLO and then sends its MAIL, RCPT and message with
the extensions it was offered, untouched, to its account's provider. The
account is unknown at EHLO time, so an extension is offered only when every
provider server learned so far has it (the intersection), SIZE with the
smallest limit, and only from an allow-list of extensions that change how
the client writes its transaction, never AUTH, STARTTLS, BURL or vendor
ones. A server is learned from each login's own EHLO (``session.extensions``)
and, before any login, from a probe at start-up (``prime.py``).

Before anything is learned, none are offered: the client then sends a plain
``MAIL FROM:<...>`` / ``RCPT TO:<...>`` / ``DATA`` transaction, 7-bit or as
it must, one command at a time, which every submission server accepts. That
costs some speed, never a message.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

# In the order they are offered. BINARYMIME only ever with CHUNKING (RFC 3030).
ALLOWED = (
    b"SIZE",
    b"8BITMIME",
    b"PIPELINING",
    b"ENHANCEDSTATUSCODES",
    b"CHUNKING",
    b"BINARYMIME",
    b"SMTPUTF8",
    b"DSN",
)
MAX_HOSTS = 256
_MAX_SIZE_DIGITS = 20


@attrs.frozen
class Features:
    """
    The allowed extensions of one server, or what several have in common.

    :ivar keywords: the allowed EHLO keywords, upper-case.
    :ivar size: with ``SIZE``, its limit (0: none stated, RFC 1870).
    """

    keywords: frozenset[bytes]
    size: int = 0

    @classmethod
    def parse(cls, extensions: Iterable[bytes]) -> Features:
        """
        :param extensions: EHLO lines without the ``250-`` prefix, e.g.
            ``b"SIZE 35882577"``; anything not allowed or malformed is left out.
        """
        keywords: set[bytes] = set()
        size = 0
        for line in extensions:
            if not isinstance(line, bytes):
                continue
            parts = line.split()
            if not parts:
                continue
            keyword = parts[0].upper()
            if keyword not in ALLOWED:
                continue
            if keyword == b"SIZE" and len(parts) > 1:
                value = parts[1]
                if not value.isdigit() or len(value) > _MAX_SIZE_DIGITS:
                    # A limit we cannot read: promise no SIZE rather than a wrong one.
                    continue
                size = int(value)
            keywords.add(keyword)
        if b"CHUNKING" not in keywords:
            keywords.discard(b"BINARYMIME")
        if b"SIZE" not in keywords:
            size = 0
        return cls(frozenset(keywords), size)

    def common(self, other: Features) -> Features:
        """What both have; SIZE with the smaller stated limit."""
        keywords = self.keywords & other.keywords
        if b"SIZE" not in keywords:
            return Features(keywords)
        limits = [n for n in (self.size, other.size) if n > 0]
        return Features(keywords, min(limits, default=0))

    def within(self, other: Features) -> bool:
        """
        Whether an EHLO offering these promises nothing ``other`` lacks:
        no keyword it has not, and no SIZE above its stated limit.
        """
        if not self.keywords <= other.keywords:
            return False
        if b"SIZE" not in self.keywords or other.size == 0:
            return True
        return 0 < self.size <= other.size

    def lines(self) -> list[bytes]:
        """The EHLO lines, without ``250-``, in ``ALLOWED`` order."""
        out = []
        for keyword in ALLOWED:
            if keyword in self.keywords:
                if keyword == b"SIZE" and self.size > 0:
                    out.append(b"SIZE %d" % self.size)
                else:
                    out.append(keyword)
        return out


NOTHING = Features(frozenset())


class ProviderExtensions:
    """
    The provider servers learned, by ``host:port`` (``session.server``),
    and the servers of stored accounts still unknown.

    While a stored account's server is unknown and its probe has not failed
    (at start-up, for a few seconds), nothing is offered: its clients too
    get the EHLO, and nothing is known of what their provider takes. A
    server that did not answer its probe stops holding the offer back: its
    clients cannot send through it anyway, and the first login that reaches
    it teaches it. The cache is bounded: past
    ``maxHosts`` the server learned longest ago is folded into ``retired``,
    what the forgotten ones had in common, which still limits the offer;
    forgetting a server never widens it.
    """

    def __init__(self, maxHosts: int = MAX_HOSTS):
        self.maxHosts = maxHosts
        self._hosts: dict[str, Features] = {}
        self._retired: Features | None = None
        self._unknown: set[str] = set()
        self._unreachable: set[str] = set()
        self._offer: list[bytes] = []

    def __len__(self) -> int:
        return len(self._hosts)

    def knows(self, server: str) -> bool:
        return server in self._hosts

    @property
    def pending(self) -> frozenset[str]:
        """Servers of stored accounts not learned yet, and not known to be unreachable."""
        return frozenset(self._unknown - self._unreachable)

    def learn(self, server: str, extensions: Iterable[bytes]) -> None:
        """Record what ``server`` offered in its EHLO (replacing what it offered before)."""
        features = Features.parse(extensions)
        self._hosts.pop(server, None)
        self._hosts[server] = features
        self._unknown.discard(server)
        self._unreachable.discard(server)
        while len(self._hosts) > self.maxHosts:
            oldest = next(iter(self._hosts))
            old = self._hosts.pop(oldest)
            self._retired = old if self._retired is None else self._retired.common(old)
        self._update()

    def expect(self, servers: Iterable[str]) -> frozenset[str]:
        """
        :param servers: the SMTP servers of the stored accounts, as ``host:port``.
        :return: those not learned yet (to probe); until they are, or their
            probe fails (``unreachable``), nothing is offered.
        """
        self._unknown = {s for s in servers if s not in self._hosts}
        self._unreachable &= self._unknown
        self._update()
        return frozenset(self._unknown)

    def unreachable(self, server: str) -> None:
        """A stored account's server did not answer its probe: stop waiting for it."""
        if server in self._unknown:
            self._unreachable.add(server)
            self._update()

    def offered(self) -> list[bytes]:
        """The extension lines of the pre-auth EHLO (a copy)."""
        return list(self._offer)

    def _update(self) -> None:
        if self.pending or (not self._hosts and self._retired is None):
            self._offer = []
            return
        common = self._retired
        for features in self._hosts.values():
            common = features if common is None else common.common(features)
        self._offer = (common or NOTHING).lines()
