"""
Tests for ``proxy.oauth``: the access-token cache (time from ``task.Clock``,
refreshes from a fake with Deferreds the test fires) and the error mapping of
``refreshBlocking`` (requests-oauthlib patched, no network).
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import tempfile
from urllib.parse import parse_qs

import attrs
import requests
import urllib3
from oauthlib.oauth2 import OAuth2Error
from oauthlib.oauth2.rfc6749.errors import (
    InsecureTransportError,
    InvalidClientError,
    InvalidGrantError,
    UnauthorizedClientError,
)
from requests_oauthlib import OAuth2Session
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from proxy.errors import (
    AuthenticationFailed,
    CertificateRejected,
    GrantInvalid,
    ProxyError,
    Unavailable,
)
from proxy.model import Account, OAuth2Grant, Upstream
from proxy.oauth import (
    AccessToken,
    AccessTokens,
    Grant,
    RetryPolicy,
    ThreadedRefresher,
    TokenCache,
    needsRefresh,
)
from proxy.oauth import refresher as oauth
from tests.upstream.certs import make_pki

TOKEN_URL = "https://oauth.example.com/token"


def account(aid: str = "alice", scopes: tuple[str, ...] = (), url: str = TOKEN_URL) -> Account:
    return Account(
        id=aid,
        email=f"{aid}@example.com",
        upstream=Upstream(host="imap.example.com"),
        oauth2=OAuth2Grant(
            tokenURL=url,
            clientId="client-1",
            clientSecret="client-secret",
            refreshToken="rt-1",
            scopes=scopes,
        ),
    )


class FakeRefresher:
    """``refresh``: records each call and returns a Deferred the test fires."""

    def __init__(self) -> None:
        self.calls: list[tuple[Account, Deferred[Grant]]] = []

    def __call__(self, account: Account) -> Deferred[Grant]:
        d: Deferred[Grant] = Deferred()
        self.calls.append((account, d))
        return d

    def answer(self, grant: Grant, index: int = -1) -> None:
        self.calls[index][1].callback(grant)


class FakeSaver:
    """``saveRefreshToken``: records each call; answers at once unless told not to."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.pending: list[Deferred[None]] = []
        self.hold = False

    def __call__(self, accountId: str, refreshToken: str) -> Deferred[None]:
        self.calls.append((accountId, refreshToken))
        if not self.hold:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.pending.append(d)
        return d


class AccessTokensTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.refresh = FakeRefresher()
        self.save = FakeSaver()
        self.tokens = AccessTokens(
            self.refresh, self.save, self.clock, cache=TokenCache(self.clock, margin=300.0)
        )
        self.account = account()

    def tearDown(self):
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def fetch(self, value: str = "at-1", expiresIn: float | None = 3600.0, **kw) -> AccessToken:
        """A get() that needs a refresh, answered with ``value``."""
        before = len(self.refresh.calls)
        d = self.tokens.get(self.account, **kw)
        self.assertEqual(len(self.refresh.calls), before + 1, "expected a refresh")
        self.refresh.answer(Grant(value, expiresIn))
        return self.successResultOf(d)

    def cached(self, **kw) -> AccessToken:
        """A get() that must be answered from the cache."""
        before = len(self.refresh.calls)
        d = self.tokens.get(self.account, **kw)
        self.assertEqual(len(self.refresh.calls), before, "expected no refresh")
        return self.successResultOf(d)

    def test_firstGetRefreshes(self):
        """The first get() refreshes and gives a fresh token expiring after expires_in."""
        self.clock.advance(100)
        t = self.fetch("at-1", 3600)
        self.assertEqual(t, AccessToken("at-1", 3700.0, fresh=True))
        self.assertIs(self.refresh.calls[0][0], self.account)

    def test_cachedReused(self):
        """A later get() reuses the cached token, marked not fresh."""
        self.fetch("at-1")
        self.clock.advance(1000)
        t = self.cached()
        self.assertEqual((t.value, t.expires, t.fresh), ("at-1", 3600.0, False))

    def test_refreshAheadOfExpiry(self):
        """Within the margin before expiry the token is refreshed, not used up."""
        self.fetch("at-1", 3600)
        self.clock.advance(3600 - 300 - 1)
        self.assertEqual(self.cached().value, "at-1")
        self.clock.advance(2)  # 299 s left, inside the 300 s margin
        t = self.fetch("at-2", 3600)
        self.assertEqual((t.value, t.fresh), ("at-2", True))

    def test_shortLivedTokenNotRefreshedEveryTime(self):
        """A token living less than the margin is reused for a while, then refreshed early."""
        self.fetch("at-1", 60)
        self.clock.advance(10)
        self.assertEqual(self.cached().value, "at-1")
        self.clock.advance(40)  # 10 s left of 60: past half its life
        self.assertEqual(self.fetch("at-2", 60).value, "at-2")

    def test_expiredRefreshed(self):
        """A token past its expiry is refreshed."""
        self.fetch("at-1", 3600)
        self.clock.advance(3600)
        self.assertEqual(self.fetch("at-2").value, "at-2")

    def test_unknownLifetime(self):
        """Without expires_in a token is trusted for UNKNOWN_LIFETIME."""
        t = self.fetch("at-1", None)
        self.assertEqual(t.expires, AccessTokens.UNKNOWN_LIFETIME)
        self.clock.advance(60)
        self.assertEqual(self.cached().value, "at-1")

    def test_expiryFromRequestStart(self):
        """The lifetime counts from when the refresh started, not when it answered."""
        d = self.tokens.get(self.account)
        self.clock.advance(10)
        self.refresh.answer(Grant("at-1", 3600))
        self.assertEqual(self.successResultOf(d).expires, 3600.0)

    def test_force(self):
        """force=True refreshes although a cached token is valid."""
        self.fetch("at-1")
        t = self.fetch("at-2", force=True)
        self.assertEqual((t.value, t.fresh), ("at-2", True))
        self.assertEqual(self.cached().value, "at-2")

    def test_forget(self):
        """forget() drops the cached token."""
        self.fetch("at-1")
        self.tokens.forget("alice")
        self.assertEqual(self.fetch("at-2").value, "at-2")

    def test_accountsSeparate(self):
        """Each account has its own cache entry."""
        self.fetch("at-alice")
        d = self.tokens.get(account("bob"))
        self.assertEqual(len(self.refresh.calls), 2)
        self.refresh.answer(Grant("at-bob", 3600))
        self.assertEqual(self.successResultOf(d).value, "at-bob")
        self.assertEqual(self.cached().value, "at-alice")

    def test_concurrentOneRefresh(self):
        """Concurrent get() calls for one account share a single refresh and its result."""
        ds = [self.tokens.get(self.account) for _ in range(3)]
        ds.append(self.tokens.get(self.account, force=True))
        self.assertEqual(len(self.refresh.calls), 1)
        for d in ds:
            self.assertNoResult(d)
        self.refresh.answer(Grant("at-1", 3600))
        results = [self.successResultOf(d) for d in ds]
        self.assertEqual({r.value for r in results}, {"at-1"})
        self.assertTrue(all(r.fresh for r in results))

    def test_failureErrbacksAll(self):
        """A failed refresh errbacks every waiter with the same ProxyError."""
        ds = [self.tokens.get(self.account) for _ in range(2)]
        self.refresh.calls[0][1].errback(GrantInvalid())
        for d in ds:
            self.failureResultOf(d, GrantInvalid)

    def test_failureNotCached(self):
        """After a refresh that failed for good, the next get() tries again."""
        d = self.tokens.get(self.account)
        self.refresh.calls[0][1].errback(AuthenticationFailed("oauth2-client"))
        self.failureResultOf(d, AuthenticationFailed)
        self.assertEqual(self.fetch("at-1").value, "at-1")

    def test_transientFailureRetriedWithBackoff(self):
        """An Unavailable refresh is retried after the backoff delays, then succeeds."""
        d = self.tokens.get(self.account)
        self.refresh.calls[0][1].errback(Unavailable("oauth2-server-error"))
        self.assertNoResult(d)
        self.clock.advance(0.49)
        self.assertEqual(len(self.refresh.calls), 1)
        self.clock.advance(0.01)
        self.assertEqual(len(self.refresh.calls), 2)
        self.refresh.calls[1][1].errback(Unavailable("oauth2-server-error"))
        self.clock.advance(1.0)
        self.assertEqual(len(self.refresh.calls), 3)
        self.refresh.answer(Grant("at-1", 3600))
        self.assertEqual(self.successResultOf(d).value, "at-1")

    def test_outageEndsAtDeadline(self):
        """Retries stop before the deadline: the waiter gets Unavailable within it."""
        tokens = AccessTokens(self.refresh, self.save, self.clock, policy=RetryPolicy(deadline=3.0))
        d = tokens.get(self.account)
        for wait in (0.5, 1.0):  # attempts at 0, 0.5 and 1.5 s
            self.refresh.calls[-1][1].errback(Unavailable("oauth2-server-error"))
            self.assertNoResult(d)
            self.clock.advance(wait)
        # The next delay (2 s) would end at 3.5 s, past the deadline: give up now.
        self.refresh.calls[-1][1].errback(Unavailable("oauth2-server-error"))
        self.failureResultOf(d, Unavailable)
        self.assertEqual(len(self.refresh.calls), 3)
        self.assertEqual(self.clock.seconds(), 1.5)

    def test_slowRefreshTimesOutButLateAnswerIsKept(self):
        """A refresh slower than the deadline fails the login, yet its rotated token is kept."""
        tokens = AccessTokens(
            self.refresh, self.save, self.clock, policy=RetryPolicy(deadline=2.0, backoff=(5.0,))
        )
        d = tokens.get(self.account)
        self.clock.advance(2.0)
        self.failureResultOf(d, Unavailable)
        self.refresh.calls[0][1].callback(Grant("at-late", 3600, refreshToken="rt-rotated"))
        self.assertEqual(self.save.calls, [("alice", "rt-rotated")])
        self.assertEqual(self.successResultOf(tokens.get(self.account)).value, "at-late")

    def test_invalidGrantMarksReauthOnce(self):
        """invalid_grant is not retried and records reauth-required with the provider's words."""
        marked = []
        tokens = AccessTokens(
            self.refresh,
            self.save,
            self.clock,
            markReauth=lambda a, r: succeed(marked.append((a, r))),
        )
        d = tokens.get(self.account)
        self.refresh.calls[0][1].errback(GrantInvalid(detail="Token has been revoked."))
        self.failureResultOf(d, GrantInvalid)
        self.assertEqual(len(self.refresh.calls), 1)
        self.assertEqual(marked, [("alice", "invalid_grant: Token has been revoked.")])

    def test_certificateRejectedIsNotRetried(self):
        """A refused certificate fails the login at once: no retry, no backoff, no reauth."""
        marked = []
        tokens = AccessTokens(
            self.refresh,
            self.save,
            self.clock,
            markReauth=lambda a, r: succeed(marked.append((a, r))),
        )
        d = tokens.get(self.account)
        self.refresh.calls[0][1].errback(
            CertificateRejected("certificate-untrusted", detail="token endpoint x:443: why")
        )
        f = self.failureResultOf(d, CertificateRejected)
        self.assertEqual(f.value.reason, "certificate-untrusted")
        self.assertEqual(len(self.refresh.calls), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(marked, [])

    def test_failureForgetsCachedToken(self):
        """A failed forced refresh also drops the old cached token."""
        self.fetch("at-1")
        d = self.tokens.get(self.account, force=True)
        self.refresh.calls[-1][1].errback(GrantInvalid())
        self.failureResultOf(d, GrantInvalid)
        self.assertEqual(self.fetch("at-2").value, "at-2")

    def test_unexpectedErrorWrapped(self):
        """A non-ProxyError from the refresher reaches waiters as Unavailable and is logged."""
        d = self.tokens.get(self.account)
        self.refresh.calls[0][1].errback(RuntimeError("boom client-secret"))
        f = self.failureResultOf(d, Unavailable)
        self.assertEqual(f.value.reason, "oauth2-internal")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_rotatedRefreshTokenSavedFirst(self):
        """A rotated refresh token is saved before the access token is delivered."""
        self.save.hold = True
        d = self.tokens.get(self.account)
        self.refresh.answer(Grant("at-1", 3600, refreshToken="rt-2"))
        self.assertEqual(self.save.calls, [("alice", "rt-2")])
        self.assertNoResult(d)
        self.save.pending[0].callback(None)
        self.assertEqual(self.successResultOf(d).value, "at-1")

    def test_noRotationNoSave(self):
        """Without a new refresh token nothing is saved."""
        self.fetch("at-1")
        self.assertEqual(self.save.calls, [])

    def test_saveFailure(self):
        """A failed save of a rotated refresh token loses nothing: it is used and saved later."""
        self.save.hold = True
        d = self.tokens.get(self.account)
        self.refresh.answer(Grant("at-1", 3600, refreshToken="rt-2"))
        self.save.pending[0].errback(OSError("disk full"))
        self.assertEqual(self.successResultOf(d).value, "at-1")
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.save.hold = False
        d = self.tokens.get(self.account, force=True)
        used, _ = self.refresh.calls[-1]
        self.assertEqual(used.oauth2.refreshToken, "rt-2")
        self.refresh.answer(Grant("at-2", 3600))
        self.assertEqual(self.successResultOf(d).value, "at-2")
        self.assertEqual(self.save.calls[-1], ("alice", "rt-2"))
        self.tokens.get(self.account, force=True)
        self.refresh.answer(Grant("at-3", 3600))
        self.assertEqual(len(self.save.calls), 2)

    def test_needsRefresh(self):
        """needsRefresh is true for unknown expiry and from expires - margin on."""
        self.assertTrue(needsRefresh(None, 0, 10))
        self.assertFalse(needsRefresh(100, 89, 10))
        self.assertTrue(needsRefresh(100, 90, 10))

    def test_secretsNotInRepr(self):
        """Grant and AccessToken reprs never show token values."""
        text = repr(Grant("at-secret", 1, "rt-secret")) + repr(AccessToken("at-secret", 1, True))
        self.assertNotIn("secret", text)


class FakeResponse:
    """Enough of ``requests.Response`` for the compliance hook."""

    def __init__(self, status: int):
        self.status_code = status
        self.text = "{}"


class RefreshBlockingErrorTests(SynchronousTestCase):
    """refreshBlocking with ``OAuth2Session.refresh_token`` replaced."""

    def setUp(self):
        self.calls: list[tuple[tuple, dict]] = []

    def answer(self, result=None, raises: Exception | None = None, status: int | None = None):
        def refresh_token(session, url, **kw):
            self.calls.append(((url,), kw))
            if status is not None:
                for hook in session.compliance_hook["refresh_token_response"]:
                    hook(FakeResponse(status))
            if raises is not None:
                raise raises
            return result

        self.patch(OAuth2Session, "refresh_token", refresh_token)

    def refused(self, error: Exception, kind: type[ProxyError], reason: str) -> ProxyError:
        self.answer(raises=error)
        e = self.assertRaises(kind, oauth.refreshBlocking, account(), 5.0)
        self.assertEqual(e.reason, reason)
        return e

    def test_invalidGrant(self):
        """invalid_grant becomes GrantInvalid (re-authorization needed)."""
        e = self.refused(InvalidGrantError(), GrantInvalid, "invalid-grant")
        self.assertEqual(
            e.imapResponse(), b"NO [AUTHENTICATIONFAILED] Account needs re-authorization"
        )

    def test_invalidClient(self):
        """invalid_client becomes AuthenticationFailed for the OAuth2 client."""
        self.refused(InvalidClientError(), AuthenticationFailed, "oauth2-client")

    def test_unauthorizedClient(self):
        """unauthorized_client becomes AuthenticationFailed for the OAuth2 client."""
        self.refused(UnauthorizedClientError(), AuthenticationFailed, "oauth2-client")

    def test_insecureTransport(self):
        """A non-HTTPS token URL becomes Unavailable."""
        self.refused(InsecureTransportError(), Unavailable, "oauth2-insecure-url")

    def test_otherOAuth2Error(self):
        """Any other OAuth2 error becomes Unavailable, not an authentication failure."""
        e = self.refused(OAuth2Error("server_error"), Unavailable, "oauth2-bad-response")
        self.assertNotIsInstance(e, AuthenticationFailed)

    def test_connectionError(self):
        """A connection error becomes Unavailable."""
        self.refused(requests.ConnectionError("refused"), Unavailable, "oauth2-unreachable")

    def test_timeout(self):
        """A timeout becomes Unavailable."""
        self.refused(requests.Timeout("slow"), Unavailable, "oauth2-unreachable")

    def test_valueError(self):
        """A response that cannot be parsed (ValueError) becomes Unavailable."""
        self.refused(ValueError("not json"), Unavailable, "oauth2-bad-response")

    def test_serverError(self):
        """A 5xx from the token endpoint becomes Unavailable via the compliance hook."""
        self.answer(result={"access_token": "at"}, status=503)
        e = self.assertRaises(Unavailable, oauth.refreshBlocking, account(), 5.0)
        self.assertEqual(e.reason, "oauth2-server-error")

    def test_tooManyRequests(self):
        """A 429 from the token endpoint becomes Unavailable."""
        self.answer(result={"access_token": "at"}, status=429)
        e = self.assertRaises(Unavailable, oauth.refreshBlocking, account(), 5.0)
        self.assertEqual(e.reason, "oauth2-server-error")

    def test_requestArguments(self):
        """The grant's URL, refresh token, client credentials and timeout are used."""
        self.answer(result={"access_token": "at", "refresh_token": "rt-1"})
        oauth.refreshBlocking(account(), 7.0)
        (args, kw) = self.calls[0]
        self.assertEqual(args, (TOKEN_URL,))
        self.assertEqual(kw["refresh_token"], "rt-1")
        self.assertEqual(kw["client_id"], "client-1")
        self.assertEqual(kw["client_secret"], "client-secret")
        self.assertEqual(kw["timeout"], 7.0)

    def test_successRotated(self):
        """A successful answer with a new refresh token gives a Grant carrying it."""
        self.answer(result={"access_token": "at-1", "expires_in": 3599, "refresh_token": "rt-2"})
        self.assertEqual(oauth.refreshBlocking(account(), 5.0), Grant("at-1", 3599.0, "rt-2"))

    def test_successSameRefreshToken(self):
        """The old refresh token echoed back is not a rotation."""
        self.answer(result={"access_token": "at-1", "expires_in": "60", "refresh_token": "rt-1"})
        self.assertEqual(oauth.refreshBlocking(account(), 5.0), Grant("at-1", 60.0, None))

    def test_badExpiresIn(self):
        """An unparseable expires_in is treated as unknown."""
        self.answer(result={"access_token": "at-1", "expires_in": "soon"})
        self.assertIsNone(oauth.refreshBlocking(account(), 5.0).expiresIn)

    def test_noAccessToken(self):
        """An answer without an access token becomes Unavailable."""
        self.answer(result={"token_type": "Bearer"})
        e = self.assertRaises(Unavailable, oauth.refreshBlocking, account(), 5.0)
        self.assertEqual(e.reason, "oauth2-bad-response")


class RefreshBlockingHTTPTests(SynchronousTestCase):
    """
    refreshBlocking through the real requests-oauthlib code, with the HTTP
    adapter replaced by a canned answer (no socket).
    """

    def setUp(self):
        self.requests: list[requests.PreparedRequest] = []
        insecure = os.environ.pop("OAUTHLIB_INSECURE_TRANSPORT", None)
        if insecure is not None:
            self.addCleanup(os.environ.__setitem__, "OAUTHLIB_INSECURE_TRANSPORT", insecure)

    def respond(self, status: int, body: dict) -> None:
        def send(adapter, request, **kw):
            self.requests.append(request)
            r = requests.Response()
            r.status_code = status
            r._content = json.dumps(body).encode()
            r.headers["Content-Type"] = "application/json"
            r.url = request.url
            r.request = request
            r.encoding = "utf-8"
            return r

        self.patch(requests.adapters.HTTPAdapter, "send", send)

    def form(self) -> dict[str, list[str]]:
        return parse_qs(self.requests[0].body)

    def test_success(self):
        """A 200 token answer gives the access token and the rotated refresh token."""
        self.respond(
            200,
            {
                "access_token": "at-1",
                "token_type": "Bearer",
                "expires_in": 3599,
                "refresh_token": "rt-2",
            },
        )
        grant = oauth.refreshBlocking(account(), 5.0)
        self.assertEqual(grant, Grant("at-1", 3599.0, "rt-2"))
        form = self.form()
        self.assertEqual(form["grant_type"], ["refresh_token"])
        self.assertEqual(form["refresh_token"], ["rt-1"])
        self.assertEqual(self.requests[0].url, TOKEN_URL)

    def test_noRotation(self):
        """An answer without a refresh token is not a rotation."""
        self.respond(200, {"access_token": "at-1", "token_type": "Bearer", "expires_in": 60})
        self.assertIsNone(oauth.refreshBlocking(account(), 5.0).refreshToken)

    def test_scopesSent(self):
        """An account's OAuth2 scopes are sent with the refresh request."""
        self.respond(200, {"access_token": "at-1", "token_type": "Bearer", "expires_in": 60})
        grant = oauth.refreshBlocking(account(scopes=("https://mail.example.com/", "email")), 5.0)
        self.assertEqual(grant.accessToken, "at-1")
        self.assertEqual(self.form()["scope"], ["https://mail.example.com/ email"])

    def test_invalidGrant(self):
        """A 400 invalid_grant answer becomes GrantInvalid."""
        self.respond(400, {"error": "invalid_grant", "error_description": "revoked"})
        self.assertRaises(GrantInvalid, oauth.refreshBlocking, account(), 5.0)

    def test_invalidClient(self):
        """A 401 invalid_client answer becomes AuthenticationFailed."""
        self.respond(401, {"error": "invalid_client"})
        e = self.assertRaises(AuthenticationFailed, oauth.refreshBlocking, account(), 5.0)
        self.assertEqual(e.reason, "oauth2-client")

    def test_serverError(self):
        """A 503 answer becomes Unavailable, whatever its body says."""
        self.respond(503, {"error": "invalid_grant"})
        e = self.assertRaises(Unavailable, oauth.refreshBlocking, account(), 5.0)
        self.assertEqual(e.reason, "oauth2-server-error")

    def test_insecureURL(self):
        """An http:// token URL is refused before any request."""
        self.respond(200, {"access_token": "at-1", "token_type": "Bearer"})
        e = self.assertRaises(
            Unavailable, oauth.refreshBlocking, account(url="http://oauth.example.com/t"), 5.0
        )
        self.assertEqual(e.reason, "oauth2-insecure-url")
        self.assertEqual(self.requests, [])


def verificationError(code: int, words: str) -> requests.exceptions.SSLError:
    """A certificate verification failure wrapped as requests wraps it."""
    e = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {words}")
    e.verify_code = code
    e.verify_message = words
    inner = urllib3.exceptions.SSLError(e)
    outer = urllib3.exceptions.MaxRetryError(None, "/token", reason=inner)  # type: ignore[arg-type]
    return requests.exceptions.SSLError(outer)


class TokenEndpointCertificateTests(SynchronousTestCase):
    """
    refreshBlocking when the token endpoint's certificate fails verification:
    a reason of its own per failure, the server and the verifier's words in
    ``detail``, never ``oauth2-unreachable`` (which is retried).
    """

    def refused(self, error: Exception, url: str = TOKEN_URL) -> CertificateRejected:
        def refresh_token(session, url, **kw):
            raise error

        self.patch(OAuth2Session, "refresh_token", refresh_token)
        return self.assertRaises(CertificateRejected, oauth.refreshBlocking, account(url=url), 5.0)

    def test_untrusted(self):
        """An unknown CA is certificate-untrusted, with the host:port and the verifier's words."""
        e = self.refused(verificationError(19, "self-signed certificate in certificate chain"))
        self.assertEqual(e.reason, "certificate-untrusted")
        self.assertEqual(
            e.detail,
            "token endpoint oauth.example.com:443: self-signed certificate in certificate chain",
        )
        self.assertEqual(
            e.imapResponse(),
            b"NO [UNAVAILABLE] The provider's certificate was refused, the operator must act",
        )

    def test_hostname(self):
        """A certificate for another name is certificate-hostname."""
        e = self.refused(
            verificationError(62, "Hostname mismatch, certificate is not valid for 'x'."),
            url="https://login.example.net:8443/oauth2/token",
        )
        self.assertEqual(e.reason, "certificate-hostname")
        self.assertIn("token endpoint login.example.net:8443: Hostname mismatch", e.detail)

    def test_ipAddress(self):
        """A certificate for another IP address is certificate-hostname too."""
        e = self.refused(verificationError(64, "IP address mismatch"))
        self.assertEqual(e.reason, "certificate-hostname")

    def test_urllib3HostnameCheck(self):
        """urllib3's own host-name check (a ValueError) is certificate-hostname."""
        from urllib3.util.ssl_match_hostname import CertificateError

        inner = urllib3.exceptions.SSLError(CertificateError("hostname 'a' doesn't match 'b'"))
        e = self.refused(requests.exceptions.SSLError(inner))
        self.assertEqual(e.reason, "certificate-hostname")
        self.assertIn("hostname 'a' doesn't match 'b'", e.detail)

    def test_expired(self):
        """An expired (or not yet valid) certificate is certificate-expired."""
        self.assertEqual(
            self.refused(verificationError(10, "certificate has expired")).reason,
            "certificate-expired",
        )
        self.assertEqual(
            self.refused(verificationError(9, "certificate is not yet valid")).reason,
            "certificate-expired",
        )

    def test_ipv6Server(self):
        """An IPv6 token URL is named with brackets."""
        e = self.refused(
            verificationError(20, "unable to get local issuer certificate"), "https://[::1]:9443/t"
        )
        self.assertIn("token endpoint [::1]:9443: unable to get local issuer", e.detail)

    def test_otherTLSFailureStaysTransient(self):
        """A TLS failure that is not a verification failure stays oauth2-unreachable."""
        self.patch(
            OAuth2Session,
            "refresh_token",
            lambda *a, **kw: (_ for _ in ()).throw(
                requests.exceptions.SSLError(ssl.SSLEOFError(8, "EOF occurred"))
            ),
        )
        e = self.assertRaises(Unavailable, oauth.refreshBlocking, account(), 5.0)
        self.assertNotIsInstance(e, CertificateRejected)
        self.assertEqual(e.reason, "oauth2-unreachable")

    def test_noSecretInDetail(self):
        """The detail holds no secret of the grant."""
        e = self.refused(verificationError(19, "self-signed certificate in certificate chain"))
        for secret in ("rt-1", "client-secret"):
            self.assertNotIn(secret, e.detail)


class TokenEndpointHandshakeTests(TestCase):
    """
    refreshBlocking against a real TLS listener on loopback (in this
    reactor, the request in a thread): the mapping holds for what requests
    really raises.
    """

    def setUp(self):
        directory = tempfile.mkdtemp(prefix="imapproxy-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.pki = make_pki(directory)
        for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
            old = os.environ.pop(name, None)
            if old is not None:
                self.addCleanup(os.environ.__setitem__, name, old)

    def refresh(self, interface: str) -> Deferred:
        """refreshBlocking against a listener on ``interface`` showing the PKI's certificate."""
        from twisted.internet import reactor, threads
        from twisted.internet import ssl as tls

        with open(self.pki.cert, "rb") as c, open(self.pki.key, "rb") as k:
            options = tls.PrivateCertificate.loadPEM(c.read() + b"\n" + k.read()).options()
        port = reactor.listenSSL(0, Site(Resource()), options, interface=interface)
        self.addCleanup(port.stopListening)
        self.server = f"{interface}:{port.getHost().port}"
        url = f"https://{self.server}/token"
        return threads.deferToThread(oauth.refreshBlocking, account(url=url), 10.0)

    def refused(self, d: Deferred, reason: str, words: str) -> Deferred:
        """``words``: the verifier's words, or a part of them (they vary by urllib3)."""

        def check(f):
            f.trap(CertificateRejected)
            self.assertEqual(f.value.reason, reason)
            self.assertTrue(f.value.detail.startswith(f"token endpoint {self.server}: "))
            self.assertIn(words, f.value.detail)

        return d.addCallbacks(lambda _: self.fail("no error"), check)

    def test_untrustedCA(self):
        """A certificate from a CA nobody trusts is certificate-untrusted, naming the server."""
        d = self.refresh("127.0.0.1")
        return self.refused(d, "certificate-untrusted", "unable to get local issuer certificate")

    def test_wrongAddress(self):
        """A trusted certificate for another address is certificate-hostname."""
        os.environ["REQUESTS_CA_BUNDLE"] = self.pki.ca_cert
        self.addCleanup(os.environ.pop, "REQUESTS_CA_BUNDLE", None)
        d = self.refresh("127.0.0.2")
        return self.refused(
            d,
            "certificate-hostname",
            "'127.0.0.2'",
        )


class ThreadedRefresherTests(TestCase):
    def test_refreshInThread(self):
        """refresh() runs refreshBlocking in the pool and delivers its result; stop() ends it."""
        seen = []

        def fake(acct, timeout):
            seen.append((acct.id, timeout))
            return Grant("at-1", 60.0)

        self.patch(oauth, "refreshBlocking", fake)
        from twisted.internet import reactor

        refresher = ThreadedRefresher(reactor, threads=1, timeout=3.0)
        self.addCleanup(refresher.stop)

        def check(grant):
            self.assertEqual(grant, Grant("at-1", 60.0))
            self.assertEqual(seen, [("alice", 3.0)])
            refresher.stop()
            self.assertFalse(refresher._pool.started)

        return refresher.refresh(account()).addCallback(check)


class StaleTokenTests(SynchronousTestCase):
    def test_staleRefreshedOnceNewerReused(self):
        """A refusal of an old token after a refresh gets the newer token, not another refresh."""
        clock = task.Clock()
        refresh = FakeRefresher()
        tokens = AccessTokens(refresh, FakeSaver(), clock)
        a = account()
        d = tokens.get(a)
        refresh.answer(Grant("at-1", 3600))
        self.successResultOf(d)
        d = tokens.get(a, stale="at-1")
        self.assertEqual(len(refresh.calls), 2)
        refresh.answer(Grant("at-2", 3600))
        self.assertEqual(self.successResultOf(d).value, "at-2")
        late = tokens.get(a, stale="at-1")
        self.assertEqual(self.successResultOf(late).value, "at-2")
        self.assertEqual(len(refresh.calls), 2)


class SafetyTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.refresh = FakeRefresher()
        self.save = FakeSaver()

    def test_tokenDoesNotFollowAccountElsewhere(self):
        """A cached token is dropped when the account now names another server or mailbox."""
        tokens = AccessTokens(self.refresh, self.save, self.clock)
        a = account()
        d = tokens.get(a)
        self.refresh.answer(Grant("at-1", 3600))
        self.successResultOf(d)
        moved = attrs.evolve(a, upstream=Upstream(host="evil.example.net"))
        tokens.get(moved)
        self.assertEqual(len(self.refresh.calls), 2)
        self.refresh.answer(Grant("at-2", 3600))

    def test_noSecondRefreshWhileOneIsStillOut(self):
        """After a deadline passes, a new login waits for the refresh still out; never two."""
        tokens = AccessTokens(
            self.refresh, self.save, self.clock, policy=RetryPolicy(deadline=2.0, backoff=(5.0,))
        )
        a = account()
        first = tokens.get(a)
        self.clock.advance(2.0)
        self.failureResultOf(first, Unavailable)
        second = tokens.get(a)
        self.assertEqual(len(self.refresh.calls), 1)
        self.refresh.answer(Grant("at-late", 3600, refreshToken="rt-2"))
        self.assertEqual(self.successResultOf(second).value, "at-late")
        self.assertEqual(len(self.refresh.calls), 1)

    def test_sillyLifetimesClamped(self):
        """expires_in of 0 still caches for a minute; years are cut to a day."""
        tokens = AccessTokens(self.refresh, self.save, self.clock)
        a = account()
        d = tokens.get(a)
        self.refresh.answer(Grant("at-1", 0))
        self.assertEqual(self.successResultOf(d).expires, AccessTokens.MIN_LIFETIME)
        self.assertEqual(self.successResultOf(tokens.get(a)).value, "at-1")
        d = tokens.get(a, force=True)
        self.refresh.answer(Grant("at-2", 10**9))
        self.assertEqual(self.successResultOf(d).expires, AccessTokens.MAX_LIFETIME)


class ReviewRegressionTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.refresh = FakeRefresher()
        self.save = FakeSaver()

    def test_slowSaveDoesNotCauseSecondRefresh(self):
        """A late answer whose save is still pending already serves the waiting login."""
        self.save.hold = True
        tokens = AccessTokens(
            self.refresh, self.save, self.clock, policy=RetryPolicy(deadline=2.0, backoff=(5.0,))
        )
        a = account()
        first = tokens.get(a)
        self.clock.advance(2.0)
        self.failureResultOf(first, Unavailable)
        second = tokens.get(a)
        self.refresh.answer(Grant("at-late", 3600, refreshToken="rt-2"))
        self.assertEqual(self.successResultOf(second).value, "at-late")
        self.assertEqual([c[0].oauth2.refreshToken for c in self.refresh.calls], ["rt-1"])
        self.save.pending[0].callback(None)

    def test_movedAccountNeverGetsTheOldToken(self):
        """A login for an account moved elsewhere does not join the fetch for its old settings."""
        tokens = AccessTokens(self.refresh, self.save, self.clock)
        a = account()
        old = tokens.get(a)
        moved = attrs.evolve(a, upstream=Upstream(host="other.example.net"))
        new = tokens.get(moved)
        # One refresh per account at a time: the moved one waits, then asks anew.
        self.assertEqual(len(self.refresh.calls), 1)
        self.refresh.answer(Grant("at-old", 3600), index=0)
        self.assertEqual(self.successResultOf(old).value, "at-old")
        self.assertNoResult(new)
        self.assertEqual(len(self.refresh.calls), 2)
        self.refresh.answer(Grant("at-new", 3600), index=1)
        self.assertEqual(self.successResultOf(new).value, "at-new")
        self.assertEqual(self.successResultOf(tokens.get(moved)).value, "at-new")

    def test_unsavedRotationDroppedAfterReauthorization(self):
        """A rotated token that could not be saved is not used once a new grant is stored."""
        self.save.hold = True
        tokens = AccessTokens(self.refresh, self.save, self.clock)
        a = account()
        d = tokens.get(a)
        self.refresh.answer(Grant("at-1", 3600, refreshToken="rt-rotated"))
        self.save.pending[0].errback(OSError("disk full"))
        self.successResultOf(d)
        self.flushLoggedErrors(OSError)
        self.save.hold = False
        reauthorized = attrs.evolve(a, oauth2=attrs.evolve(a.oauth2, refreshToken="rt-new"))
        tokens.get(reauthorized, force=True)
        self.assertEqual(self.refresh.calls[-1][0].oauth2.refreshToken, "rt-new")
        self.refresh.answer(Grant("at-2", 3600))
