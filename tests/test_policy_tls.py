"""
The policy relay on the splice's real legs (``iosim``, Twisted's TLS layer
with real OpenSSL, or plain TCP), under the fast paths and the public path:
the filters sit where the relay's writers are, a read passes byte-exact and
a write is answered by the proxy.
"""

from __future__ import annotations

from typing import Any

import pytest

from proxy.model import Restrictions
from proxy.policy import PolicySplice
from tests.relaypaths import relayFixture  # noqa: F401  (the relay fixture)
from tests.test_splice import LEGS, pki  # noqa: F401  (the PKI fixture)
from tests.test_splice import Session as SpliceSession


class Session(SpliceSession):
    def splice(self, held: bytes = b"") -> Any:
        self.refused: list[str] = []
        self.spliced = PolicySplice(
            self.clientSide,
            self.upstreamSide,
            "test",
            self.ended.append,
            self.clock.callLater,
            restrictions=Restrictions(readOnly=True),
            onRefused=self.refused.append,
        )
        self.clientSide.onLost = lambda reason: self.spliced.clientLost()
        self.spliced.start(held)
        return self.spliced


@pytest.mark.parametrize("useTLS", LEGS)
def test_reads_pass_byte_exact_and_writes_are_answered(relay, pki, useTLS):  # noqa: F811
    """Held bytes judged too; a 1 MiB body streams through; a STORE never reaches the provider."""
    s = Session(pki, useTLS)
    s.providerWrites(b"* 1 EXISTS\r\n")
    s.settle()
    s.splice(held=b"a1 SELECT INBOX\r\na2 STORE 1 +FLAGS (\\Deleted)\r\n")
    s.settle()
    assert s.provider.received == b"a1 EXAMINE INBOX\r\n"
    payload = bytes(range(256)) * 4096
    s.clientWrites(b"a3 UID FETCH 1 BODY.PEEK[]\r\n")
    s.providerWrites(b"* 1 FETCH (UID 1 BODY[] {%d}\r\n" % len(payload) + payload + b")\r\n")
    s.providerWrites(b"a3 OK done\r\n")
    s.settle()
    s.clientWrites(b"a4 APPEND INBOX {5}\r\n")
    s.settle()
    assert s.provider.received == b"a1 EXAMINE INBOX\r\na3 UID FETCH 1 BODY.PEEK[]\r\n"
    assert s.client.received == (
        b"* 1 EXISTS\r\na2 NO [NOPERM] This token is read-only\r\n"
        b"* 1 FETCH (UID 1 BODY[] {%d}\r\n"
        % len(payload)
        + payload
        + b")\r\na3 OK done\r\na4 NO [NOPERM] This token is read-only\r\n"
    )
    assert s.refused == ["STORE", "APPEND"]
    assert s.ended == []
