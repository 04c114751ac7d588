"""The API's access log (``proxy.web._http.redactingLogFormatter``) writes no secret."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase

from proxy.tokens import newToken
from proxy.web._http import redactingLogFormatter


class FakeRequest:
    """What the combined log format reads from a request."""

    method = b"DELETE"
    clientproto = b"HTTP/1.1"
    code = 200
    sentLength = 16

    def __init__(self, uri: bytes):
        self.uri = uri

    def getClientAddress(self):
        return IPv4Address("TCP", "192.0.2.7", 40000)

    def getHeader(self, name):
        return None


def logged(uri: bytes) -> str:
    return redactingLogFormatter("[30/Nov/2026:14:00:00 +0000]", FakeRequest(uri))


class RedactingLogFormatterTests(SynchronousTestCase):
    def test_tokenInThePath(self):
        """A token (or its id) in the path is replaced, in either case."""
        token, _ = newToken()
        for shown in (token, token.upper()):
            line = logged(b"/v1/token/" + shown.encode())
            self.assertNotIn(shown, line)
            self.assertIn("DELETE /v1/token/[token-or-id] HTTP/1.1", line)

    def test_percentEncodedToken(self):
        """
        The route decodes the path, so a token sent percent-encoded (all of
        it or some characters) works, and must be hidden all the same.
        """
        token, _ = newToken()
        for encoded in (
            "".join(f"%{ord(c):02X}" for c in token),
            "".join(f"%{ord(c):02x}" if i % 3 == 0 else c for i, c in enumerate(token)),
        ):
            line = logged(b"/v1/token/" + encoded.encode())
            self.assertNotIn(encoded, line)
            self.assertIn("DELETE /v1/token/[token-or-id] HTTP/1.1", line)

    def test_callbackSecrets(self):
        """The OAuth2 callback's code and state are hidden; other parameters stay."""
        line = logged(b"/oauth2/callback?state=s3cret&code=c0de&scope=mail")
        self.assertNotIn("s3cret", line)
        self.assertNotIn("c0de", line)
        self.assertIn("/oauth2/callback?state=[redacted]&code=[redacted]&scope=mail", line)
