"""
Tests for ``proxy.oauth.onboarding``: the signed single-use state, PKCE, the
ID token's address, the device grant's loop (the blocking calls replaced by
Deferreds the test fires, time from ``task.Clock``), and the blocking provider
calls against a real HTTPS server on loopback (in this reactor, the request in
a thread), every failure mapped to a one-line ``OnboardingError`` that holds no
secret.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import tempfile
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
from twisted.internet import reactor, threads
from twisted.internet import ssl as tls
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from proxy.admin import Admin, InvalidInput, buildAccount, buildApp
from proxy.encryption import Secrets, newKey
from proxy.model import Account, OAuth2App, Upstream
from proxy.oauth import _onboardhttp, onboarding
from proxy.oauth.onboarding import (
    DevicePending,
    DeviceSlowDown,
    Onboarding,
    OnboardingError,
    ProviderCertificateRejected,
    ProviderError,
    devicePollBlocking,
    deviceStartBlocking,
    emailFromIdToken,
    exchangeCodeBlocking,
    pkcePair,
)
from tests.upstream.certs import make_pki

NOW = 1_750_000_000.0
CODE = "code-3f9a61c2"
CLIENT_SECRET = "cs-onboard-8d41e7"
DEVICE_CODE = "dc-5be2093a"
VERIFIER = "verifier-0c7d55e1"
# None of these may appear in an error message or a log line.
SECRETS = (CODE, CLIENT_SECRET, DEVICE_CODE, VERIFIER, "at-1", "rt-1")
IMAP = {"host": "imap.example.com"}


def makeApp(token: str = "https://idp.example.com/token", **over: Any) -> OAuth2App:
    fields: dict[str, Any] = {
        "id": "corp",
        "provider": "generic",
        "clientId": "client-1",
        "clientSecret": CLIENT_SECRET,
        "redirectURL": "https://proxy.example.com/oauth2/callback",
        "authorizationURL": "https://idp.example.com/authorize",
        "tokenURL": token,
        "deviceURL": "https://idp.example.com/device",
        "scopes": ("imap", "openid", "email"),
    }
    fields.update(over)
    return OAuth2App(**fields)


def idToken(claims: Any) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")

    return f"{b64(b'{}')}.{b64(json.dumps(claims).encode())}.sig"


def grantFor(email: str | None) -> dict[str, Any]:
    token: dict[str, Any] = {"access_token": "at-1", "refresh_token": "rt-1"}
    if email is not None:
        token["id_token"] = idToken({"email": email})
    return token


class Store:
    """The part of the store contract onboarding uses, in memory; every Deferred has fired."""

    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}
        self.apps: dict[str, OAuth2App] = {}
        self.pending: dict[str, Any] = {}

    def getAccount(self, accountId):
        return succeed(self.accounts.get(accountId))

    def putAccount(self, account):
        self.accounts[account.id] = account
        return succeed(None)

    def getApp(self, appId):
        return succeed(self.apps.get(appId))

    def addPending(self, pending):
        self.pending[pending.state] = pending
        return succeed(None)

    def takePending(self, state):
        return succeed(self.pending.pop(state, None))


class FakeRun:
    """Stands for the thread pool: records each blocking call; the test fires its Deferred."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f, *args):
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d


class LogCapture:
    def __init__(self, case: SynchronousTestCase) -> None:
        self.lines: list[str] = []
        globalLogPublisher.addObserver(self.observe)
        case.addCleanup(globalLogPublisher.removeObserver, self.observe)

    def observe(self, event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "proxy.oauth":
            self.lines.append(formatEvent(event))


class SafeMessages:
    def assertSafe(self, text: str) -> None:
        """One line, and not one of the secrets."""
        self.assertNotIn("\n", text)  # type: ignore[attr-defined]
        for secret in SECRETS:
            self.assertNotIn(secret, text)  # type: ignore[attr-defined]


# -- pure functions ------------------------------------------------------------------


class PKCETests(SynchronousTestCase):
    def test_pair(self):
        """The verifier is RFC 7636's 43-128 unreserved characters; the challenge its S256."""
        verifier, challenge = pkcePair()
        self.assertTrue(43 <= len(verifier) <= 128)
        self.assertTrue(
            set(verifier)
            <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
        )
        digest = hashlib.sha256(verifier.encode()).digest()
        self.assertEqual(challenge, base64.urlsafe_b64encode(digest).rstrip(b"=").decode())
        self.assertNotEqual(pkcePair()[0], verifier)


class EmailFromIdTokenTests(SynchronousTestCase):
    def test_claims(self):
        """email first, then preferred_username, then upn; only values with an @."""
        self.assertEqual(emailFromIdToken(idToken({"email": "a@x.org"})), "a@x.org")
        self.assertEqual(
            emailFromIdToken(idToken({"email": "nope", "preferred_username": "b@x.org"})),
            "b@x.org",
        )
        self.assertEqual(emailFromIdToken(idToken({"upn": "c@x.org"})), "c@x.org")
        self.assertIsNone(emailFromIdToken(idToken({"email": 5, "sub": "d@x.org"})))

    def test_notAnIdToken(self):
        """Anything else is None, never an exception."""
        for value in (None, 5, "", "a.b", "a.!!!.c", "a." + "e30" * 3 + "x.c"):
            self.assertIsNone(emailFromIdToken(value), value)
        self.assertIsNone(emailFromIdToken(idToken(["a@x.org"])))
        self.assertIsNone(emailFromIdToken(idToken("a@x.org")))


# -- the browser flow: state and consent ------------------------------------------


class FlowTestCase(SynchronousTestCase, SafeMessages):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = Store()
        self.store.apps["corp"] = makeApp()
        self.secrets = Secrets([newKey()])
        self.run = FakeRun()
        self.onboarding = Onboarding(
            Admin(self.store, None, self.clock), self.secrets, self.run, self.clock, timeout=7.0
        )
        self.log = LogCapture(self)

    def addAccount(self, aid: str = "alice", email: str = "alice@example.com", **over) -> Account:
        account = buildAccount(
            {
                "account": aid,
                "email": email,
                "imap": IMAP,
                "oauth2": {"app": "corp", "refreshToken": "rt-old"},
            },
            app=self.store.apps["corp"],
        )
        account = attrs.evolve(account, **over)
        self.store.accounts[aid] = account
        return account

    def start(self, **data: Any) -> dict[str, str]:
        """Start a consent; the query of the URL the owner is sent to."""
        data.setdefault("app", "corp")
        data.setdefault("account", "alice")
        answer = self.successResultOf(Deferred.fromCoroutine(self.onboarding.start(data)))
        query = parse_qs(urlsplit(answer["url"]).query)
        return {k: v[0] for k, v in query.items()}

    def finish(self, args: dict[str, str]) -> Deferred[Account]:
        return Deferred.fromCoroutine(self.onboarding.finish(args))

    def refused(self, d: Deferred[Any], kind: type[Exception] = OnboardingError) -> Any:
        error = self.failureResultOf(d, kind).value
        self.assertSafe(error.message)
        return error


class StartTests(FlowTestCase):
    def test_url(self):
        """The URL carries the client, a signed state, the S256 challenge of the stored verifier."""
        query = self.start(email="alice@example.com", imap=IMAP)
        self.assertEqual(query["client_id"], "client-1")
        self.assertEqual(query["redirect_uri"], "https://proxy.example.com/oauth2/callback")
        self.assertEqual(query["scope"], "imap openid email")
        self.assertEqual(query["login_hint"], "alice@example.com")
        self.assertEqual(query["code_challenge_method"], "S256")
        stateId, _, signature = query["state"].partition(".")
        self.assertTrue(self.secrets.verify(stateId, signature))
        pending = self.store.pending[stateId]
        self.assertEqual((pending.account, pending.app), ("alice", "corp"))
        self.assertEqual(pending.expires, NOW + onboarding.STATE_LIFETIME)
        self.assertEqual(json.loads(pending.imap), IMAP)
        digest = hashlib.sha256(pending.verifier.encode()).digest()
        self.assertEqual(
            query["code_challenge"], base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        )
        self.assertNotIn("access_type", query)
        self.assertSafe(" ".join(self.log.lines))

    def test_gmailAsksForOfflineAccess(self):
        """Google's apps ask for a refresh token with access_type=offline."""
        self.store.apps["corp"] = makeApp(provider="gmail")
        self.assertEqual(self.start()["access_type"], "offline")

    def test_invalidInput(self):
        """Mistakes are refused before the owner is asked to consent."""
        self.store.apps["bare"] = makeApp(id="bare", authorizationURL=None)
        cases = [
            {"account": "alice"},
            {"app": "bare", "account": "alice"},
            {"app": "corp", "account": "al ice", "imap": IMAP},
            {"app": "corp", "account": "alice", "email": "nope", "imap": IMAP},
            {"app": "corp", "account": "alice", "imap": {"host": 5}},
            {"app": "corp", "account": "alice", "imap": IMAP, "smtp": "smtp.example.com"},
            {"app": "corp", "account": "alice", "imap": IMAP, "smtp": None},
            {"app": "corp", "account": "alice", "imap": IMAP, "smtp": {"host": "h", "port": 0}},
            {"app": "corp", "account": "alice", "imap": IMAP, "smtp": {"host": "h", "x": 1}},
            {"app": "corp", "account": "alice", "imap": IMAP, "smtp": {"port": 465}},
            {"app": "corp", "account": "alice"},  # a new account of a generic app needs imap
        ]
        for data in cases:
            d = Deferred.fromCoroutine(self.onboarding.start(data))
            self.failureResultOf(d, InvalidInput)
        self.assertEqual(self.store.pending, {})

    def test_outlookAsksForSending(self):
        """An outlook app's consent asks for IMAP and SMTP in one grant."""
        self.store.apps["ms"] = buildApp(
            {
                "app": "ms",
                "provider": "outlook",
                "clientId": "c",
                "clientSecret": CLIENT_SECRET,
                "redirectUrl": "https://proxy.example.com/oauth2/callback",
            }
        )
        scopes = self.start(app="ms")["scope"].split()
        self.assertIn("https://outlook.office.com/IMAP.AccessAsUser.All", scopes)
        self.assertIn("https://outlook.office.com/SMTP.Send", scopes)

    def test_existingAccountNeedsNoImap(self):
        """Re-authorizing an existing account of a generic app needs no imap settings."""
        self.addAccount()
        self.assertIn("state", self.start())


class FinishTests(FlowTestCase):
    def test_consent(self):
        """A signed, fresh state and a code: code and verifier exchanged, the account saved."""
        query = self.start(email="alice@example.com", imap=IMAP)
        d = self.finish({"state": query["state"], "code": CODE})
        [(f, args, exchange)] = self.run.calls
        pending = args[2]
        self.assertEqual(f, onboarding.exchangeCodeBlocking)
        self.assertEqual(args[1:], (CODE, pending, 7.0))
        exchange.callback(grantFor("Alice@Example.com"))
        account = self.successResultOf(d)
        self.assertEqual((account.id, account.email), ("alice", "Alice@Example.com"))
        self.assertEqual(account.oauth2.refreshToken, "rt-1")
        self.assertEqual(account.upstream.host, "imap.example.com")
        self.assertSafe(" ".join(self.log.lines))

    def test_consentWithSMTP(self):
        """SMTP settings given at the start are kept with the consent and end in the account."""
        smtp = {"host": "smtp.example.com", "tls": "starttls"}
        query = self.start(email="alice@example.com", imap=IMAP, smtp=smtp)
        stateId = query["state"].partition(".")[0]
        self.assertEqual(json.loads(self.store.pending[stateId].smtp), smtp)
        d = self.finish({"state": query["state"], "code": CODE})
        self.run.calls[0][2].callback(grantFor("alice@example.com"))
        account = self.successResultOf(d)
        self.assertEqual(account.smtp, Upstream(host="smtp.example.com", port=587, tls="starttls"))

    def test_presetAppGivesSMTP(self):
        """A new account of a gmail app gets Gmail's SMTP server; a generic app's gets none."""
        self.store.apps["g"] = makeApp(id="g", provider="gmail")
        query = self.start(app="g", account="gmailer", email="g@gmail.com")
        d = self.finish({"state": query["state"], "code": CODE})
        self.run.calls[0][2].callback(grantFor("g@gmail.com"))
        self.assertEqual(
            self.successResultOf(d).smtp, Upstream(host="smtp.gmail.com", port=465, tls="implicit")
        )
        query = self.start(email="alice@example.com", imap=IMAP)
        d = self.finish({"state": query["state"], "code": CODE})
        self.run.calls[1][2].callback(grantFor("alice@example.com"))
        self.assertIsNone(self.successResultOf(d).smtp)

    def test_forged(self):
        """A state not signed with the store's keys is refused, before the store is asked."""
        query = self.start(imap=IMAP)
        stateId = query["state"].partition(".")[0]
        other = Secrets([newKey()])
        for state in ("", stateId, stateId + ".", stateId + "." + other.sign(stateId), "x.ü"):
            error = self.refused(self.finish({"state": state, "code": CODE}))
            self.assertEqual(error.message, "this link is not valid")
        self.assertIn(stateId, self.store.pending)
        self.assertEqual(self.run.calls, [])

    def test_expired(self):
        """A state older than its lifetime is refused and used up."""
        query = self.start(imap=IMAP)
        self.clock.advance(onboarding.STATE_LIFETIME + 1)
        error = self.refused(self.finish({"state": query["state"], "code": CODE}))
        self.assertIn("expired", error.message)
        self.assertEqual((self.store.pending, self.run.calls), ({}, []))

    def test_reused(self):
        """A state is single use: the second redirect with it is refused."""
        query = self.start(imap=IMAP)
        d = self.finish({"state": query["state"], "code": CODE})
        self.run.calls[0][2].callback(grantFor("alice@example.com"))
        self.successResultOf(d)
        error = self.refused(self.finish({"state": query["state"], "code": CODE}))
        self.assertIn("already used", error.message)
        self.assertEqual(len(self.run.calls), 1)

    def test_declinedAtProvider(self):
        """error= in the redirect is a decline; its text reaches the log printable only."""
        query = self.start(imap=IMAP)
        error = self.refused(self.finish({"state": query["state"], "error": "access_denied\n\x1b"}))
        self.assertEqual(error.message, "the authorization was declined at the provider")
        self.assertIn("declined at the provider: access_denied??", self.log.lines[-1])

    def test_noCode(self):
        query = self.start(imap=IMAP)
        error = self.refused(self.finish({"state": query["state"]}))
        self.assertEqual(error.message, "the provider sent no authorization code")

    def test_providerFailure(self):
        """The exchange's OnboardingError reaches the caller as it is, logged in one line."""
        query = self.start(imap=IMAP)
        d = self.finish({"state": query["state"], "code": CODE})
        failure = ProviderError("cannot reach the provider at idp:443 (connection refused)", "x")
        self.run.calls[0][2].errback(failure)
        self.assertIs(self.refused(d, ProviderError), failure)
        self.assertEqual(
            self.log.lines[-1],
            "code exchange for alice failed: cannot reach the provider at idp:443 "
            "(connection refused)",
        )
        self.assertEqual(self.store.accounts, {})

    def test_unexpectedFailure(self):
        """Any other exception becomes a fixed message; its text is neither shown nor logged."""
        query = self.start(imap=IMAP)
        d = self.finish({"state": query["state"], "code": CODE})
        self.run.calls[0][2].errback(RuntimeError(f"boom {CLIENT_SECRET} {CODE}"))
        error = self.refused(d)
        self.assertEqual(error.message, "the code exchange with the provider failed")
        self.assertEqual(self.log.lines[-1], "code exchange for alice failed: RuntimeError")
        self.assertSafe(" ".join(self.log.lines))


class CompleteTests(FlowTestCase):
    def complete(self, token: dict, email: str | None = None, imap: Any = None) -> Deferred:
        app = self.store.apps["corp"]
        return Deferred.fromCoroutine(self.onboarding.complete("alice", app, token, email, imap))

    def test_anotherMailboxRefused(self):
        """A consent from another mailbox does not rebind an existing account."""
        before = self.addAccount()
        error = self.refused(self.complete(grantFor("mallory@example.com")))
        self.assertIn("not for alice@example.com", error.message)
        self.assertEqual(self.store.accounts["alice"], before)
        self.assertIn("consent came from another mailbox", self.log.lines[-1])

    def test_anotherMailboxThanAskedFor(self):
        """A new account's email hint must match who consented."""
        d = self.complete(grantFor("mallory@example.com"), "alice@example.com", IMAP)
        self.refused(d)
        self.assertEqual(self.store.accounts, {})

    def test_existingNeedsProof(self):
        """Replacing a working grant without an ID token is refused."""
        before = self.addAccount()
        error = self.refused(self.complete(grantFor(None)))
        self.assertIn("did not say which mailbox", error.message)
        self.assertEqual(self.store.accounts["alice"], before)

    def test_noRefreshToken(self):
        error = self.refused(self.complete({"access_token": "at-1"}, "alice@example.com", IMAP))
        self.assertIn("no refresh token", error.message)

    def test_noAddress(self):
        error = self.refused(self.complete(grantFor(None), None, IMAP))
        self.assertIn("did not say which mailbox was authorized", error.message)

    def test_newGenericNeedsImap(self):
        error = self.refused(self.complete(grantFor("alice@example.com")))
        self.assertIn("needs imap settings", error.message)

    def test_reauthorizingKeepsOrChangesSMTP(self):
        """Re-authorizing keeps the SMTP server unless new settings are given."""
        smtp = Upstream(host="smtp.example.com", port=465)
        self.addAccount(smtp=smtp)
        app = self.store.apps["corp"]
        account = self.successResultOf(self.complete(grantFor("alice@example.com")))
        self.assertEqual(account.smtp, smtp)
        d = Deferred.fromCoroutine(
            self.onboarding.complete(
                "alice", app, grantFor("alice@example.com"), None, None, {"port": 2465}
            )
        )
        self.assertEqual(self.successResultOf(d).smtp, attrs.evolve(smtp, port=2465))

    def test_reauthorizes(self):
        """A new grant clears reauth-required, but a disabled account stays disabled."""
        self.addAccount(state="reauth-required", stateReason="invalid_grant")
        account = self.successResultOf(self.complete(grantFor("alice@example.com")))
        self.assertEqual((account.state, account.stateReason), ("ok", None))
        self.assertEqual(account.oauth2.refreshToken, "rt-1")
        self.addAccount(state="disabled", stateReason="by the operator")
        account = self.successResultOf(self.complete(grantFor("alice@example.com")))
        self.assertEqual((account.state, account.stateReason), ("disabled", "by the operator"))


# -- the device grant's loop ----------------------------------------------------------


class DeviceFlowTests(FlowTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.shown: list[tuple[str, str]] = []

    def authorize(self, expiresIn: float = 900.0) -> Deferred[Account]:
        app = self.store.apps["corp"]
        d = Deferred.fromCoroutine(
            self.onboarding.authorizeDevice(
                app, "alice", "alice@example.com", IMAP, lambda *a: self.shown.append(a)
            )
        )
        [(f, args, start)] = self.run.calls
        self.assertEqual((f, args), (onboarding.deviceStartBlocking, (app, 7.0)))
        start.callback(
            {
                "device_code": DEVICE_CODE,
                "user_code": "WDJB-MJHT",
                "verification_uri": "https://idp.example.com/device",
                "interval": 5.0,
                "expires_in": expiresIn,
            }
        )
        self.assertEqual(self.shown, [("https://idp.example.com/device", "WDJB-MJHT")])
        return d

    def pollAfter(self, seconds: float) -> Deferred[Any]:
        """Advance the clock: no poll before ``seconds``, one at it."""
        before = len(self.run.calls)
        self.clock.advance(seconds - 0.01)
        self.assertEqual(len(self.run.calls), before)
        self.clock.advance(0.01)
        self.assertEqual(len(self.run.calls), before + 1)
        f, args, d = self.run.calls[-1]
        self.assertEqual((f, args[1:]), (onboarding.devicePollBlocking, (DEVICE_CODE, 7.0)))
        return d

    def test_pendingThenGranted(self):
        """authorization_pending polls again after the interval; a grant saves the account."""
        d = self.authorize()
        self.pollAfter(5).errback(DevicePending())
        self.pollAfter(5).errback(DevicePending())
        self.pollAfter(5).callback(grantFor("alice@example.com"))
        account = self.successResultOf(d)
        self.assertEqual((account.id, account.oauth2.refreshToken), ("alice", "rt-1"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_slowDown(self):
        """slow_down adds 5 s to the interval, each time (RFC 8628, 3.5)."""
        d = self.authorize()
        self.pollAfter(5).errback(DeviceSlowDown())
        self.pollAfter(10).errback(DeviceSlowDown())
        self.pollAfter(15).errback(DevicePending())
        self.pollAfter(15).callback(grantFor("alice@example.com"))
        self.successResultOf(d)

    def test_expired(self):
        """No poll after the code's lifetime: the command ends with a clear line."""
        d = self.authorize(expiresIn=12.0)
        self.pollAfter(5).errback(DevicePending())
        self.pollAfter(5).errback(DevicePending())
        self.clock.advance(5)
        self.assertEqual(len(self.run.calls), 3)
        error = self.refused(d)
        self.assertEqual(error.message, "the code expired before it was used; start again")
        self.assertEqual(self.store.accounts, {})

    def test_deniedOrFailed(self):
        """A decline or a provider failure during the polls ends the loop with its message."""
        for failure in (
            OnboardingError("the mailbox owner declined the authorization"),
            ProviderError("the provider at idp:443 answered HTTP 500", "http-error"),
        ):
            self.run.calls.clear()
            self.shown.clear()
            d = self.authorize()
            self.pollAfter(5).errback(failure)
            self.assertIs(self.refused(d), failure)
            self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.store.accounts, {})

    def test_startFails(self):
        """When the device authorization fails, nothing is shown and nothing polled."""
        d = Deferred.fromCoroutine(
            self.onboarding.authorizeDevice(
                self.store.apps["corp"], "alice", None, IMAP, self.shown.append
            )
        )
        failure = ProviderError("cannot reach the provider at idp:443 (connection refused)", "x")
        self.run.calls[0][2].errback(failure)
        self.assertIs(self.refused(d), failure)
        self.assertEqual((self.shown, len(self.run.calls)), ([], 1))


# -- the blocking calls against a real HTTPS server on loopback ----------------------


class FakeProvider(Resource):
    """Answers each POST with the next of ``answers``; records the forms."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.answers: list[tuple[int, str, bytes]] = []
        self.forms: list[tuple[str, dict[str, str]]] = []

    def answer(self, status: int, body: Any, contentType: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.answers.append((status, contentType, data))

    def render_POST(self, request):
        form = {k.decode(): v[-1].decode() for k, v in request.args.items()}
        self.forms.append((request.path.decode(), form))
        status, contentType, data = self.answers.pop(0)
        request.setResponseCode(status)
        request.setHeader(b"content-type", contentType.encode())
        if 300 <= status < 400:
            request.setHeader(b"location", b"/elsewhere")
        return data


class PlainHTTPError(Protocol):
    """A server that speaks no TLS: it answers the ClientHello with plain HTTP."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        self.transport.loseConnection()


class TrackingFactory(WrappingFactory):
    """Keeps the connections, so that no test leaves one open."""

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self.waiting: list[Deferred[None]] = []

    def unregisterProtocol(self, p):
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self.waiting = self.waiting, []
            for d in waiting:
                d.callback(None)

    def closeAll(self) -> Deferred[None]:
        """Abort every connection; fires when all are gone."""
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.waiting.append(d)
        for p in list(self.protocols):
            p.transport.abortConnection()
        return d


class BlockingCallsTests(TestCase, SafeMessages):
    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="imapproxy-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.pki = make_pki(directory)
        with open(self.pki.cert, "rb") as c, open(self.pki.key, "rb") as k:
            self.tlsOptions = tls.PrivateCertificate.loadPEM(c.read() + b"\n" + k.read()).options()
        for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTPS_PROXY", "https_proxy"):
            old = os.environ.pop(name, None)
            if old is not None:
                self.addCleanup(os.environ.__setitem__, name, old)
        self.trust()
        self.provider = FakeProvider()
        self.server = self.listen()
        self.app = makeApp(f"https://{self.server}/token", deviceURL=f"https://{self.server}/dev")

    def trust(self) -> None:
        os.environ["REQUESTS_CA_BUNDLE"] = self.pki.ca_cert
        self.addCleanup(os.environ.pop, "REQUESTS_CA_BUNDLE", None)

    def listen(self, interface: str = "127.0.0.1", useTLS: bool = True) -> str:
        """
        A listener for the fake provider, or without TLS one that answers
        any bytes with a plain HTTP error; its ``host:port``.
        """
        site: Any = Site(self.provider) if useTLS else Factory.forProtocol(PlainHTTPError)
        if useTLS:
            site = TLSMemoryBIOFactory(self.tlsOptions, False, site)
        factory = TrackingFactory(site)
        port = reactor.listenTCP(0, factory, interface=interface)
        self.addCleanup(factory.closeAll)
        self.addCleanup(port.stopListening)
        return f"{interface}:{port.getHost().port}"

    def call(self, f, *args) -> Deferred[Any]:
        return threads.deferToThread(f, *args)

    @inlineCallbacks
    def refused(self, d: Deferred[Any], kind: type[Exception], message: str, reason=None):
        error = yield self.assertFailure(d, kind)
        self.assertEqual(error.message, message)
        if reason is not None:
            self.assertEqual(error.reason, reason)
        self.assertSafe(error.message)
        return error

    def exchange(self) -> Deferred[Any]:
        return self.call(exchangeCodeBlocking, self.app, CODE, VERIFIER, 10.0)

    def poll(self) -> Deferred[Any]:
        return self.call(devicePollBlocking, self.app, DEVICE_CODE, 10.0)

    # -- answers

    @inlineCallbacks
    def test_exchange(self):
        """The code, the verifier, the redirect URI and the client go in one form."""
        self.provider.answer(200, grantFor("alice@example.com"))
        token = yield self.exchange()
        self.assertEqual(token["refresh_token"], "rt-1")
        self.assertEqual(
            self.provider.forms,
            [
                (
                    "/token",
                    {
                        "grant_type": "authorization_code",
                        "code": CODE,
                        "redirect_uri": "https://proxy.example.com/oauth2/callback",
                        "client_id": "client-1",
                        "client_secret": CLIENT_SECRET,
                        "code_verifier": VERIFIER,
                    },
                )
            ],
        )

    @inlineCallbacks
    def test_exchangeRefused(self):
        """The provider's error code is named; its description (which may echo) is not."""
        self.provider.answer(400, {"error": "invalid_grant", "error_description": CODE})
        yield self.refused(
            self.exchange(),
            ProviderError,
            f"the provider at {self.server} refused the authorization code (invalid_grant)",
            "refused",
        )

    @inlineCallbacks
    def test_errorCodeNotAWord(self):
        """An error field that is not an RFC 6749 code is not shown."""
        self.provider.answer(400, {"error": f"bad {CLIENT_SECRET}\n"})
        yield self.refused(
            self.exchange(), ProviderError, f"the provider at {self.server} answered HTTP 400"
        )

    @inlineCallbacks
    def test_exchangeIncomplete(self):
        self.provider.answer(200, {"token_type": "Bearer"})
        yield self.refused(
            self.exchange(),
            ProviderError,
            f"the provider at {self.server} answered the authorization code without the "
            "expected fields",
            "bad-response",
        )

    @inlineCallbacks
    def test_deviceStart(self):
        """The device code's answer, made printable and bounded."""
        self.provider.answer(
            200,
            {
                "device_code": DEVICE_CODE,
                "user_code": "WDJB\x1b[2J",
                "verification_url": "https://idp.example.com/device",
                "interval": 0,
                "expires_in": "soon",
            },
        )
        grant = yield self.call(deviceStartBlocking, self.app, 10.0)
        self.assertEqual(grant["user_code"], "WDJB?[2J")
        self.assertEqual(grant["verification_uri"], "https://idp.example.com/device")
        self.assertEqual((grant["interval"], grant["expires_in"]), (1.0, 900.0))
        self.assertEqual(grant["device_code"], DEVICE_CODE)
        self.assertEqual(
            self.provider.forms, [("/dev", {"client_id": "client-1", "scope": "imap openid email"})]
        )

    @inlineCallbacks
    def test_deviceStartFailures(self):
        """Refused, no verification URI, or no device URL at all."""
        self.provider.answer(400, {"error": "invalid_client"})
        self.provider.answer(200, {"device_code": DEVICE_CODE, "user_code": "U", "interval": 5})
        yield self.refused(
            self.call(deviceStartBlocking, self.app, 10.0),
            ProviderError,
            f"the provider at {self.server} refused the device authorization (invalid_client)",
        )
        yield self.refused(
            self.call(deviceStartBlocking, self.app, 10.0),
            ProviderError,
            f"the provider at {self.server} sent no verification URI",
            "bad-response",
        )
        yield self.refused(
            self.call(deviceStartBlocking, attrs.evolve(self.app, deviceURL=None), 10.0),
            OnboardingError,
            "OAuth2 app corp has no deviceAuthorizationUrl",
        )

    @inlineCallbacks
    def test_devicePoll(self):
        """pending, slow_down, denied, expired, another error, and the grant."""
        for body in (
            {"error": "authorization_pending"},
            {"error": "slow_down"},
            {"error": "access_denied"},
            {"error": "expired_token"},
            {"error": "invalid_client"},
        ):
            self.provider.answer(400, body)
        self.provider.answer(200, grantFor("alice@example.com"))
        pending = yield self.assertFailure(self.poll(), DevicePending)
        self.assertNotIsInstance(pending, DeviceSlowDown)
        yield self.assertFailure(self.poll(), DeviceSlowDown)
        for message in (
            "the mailbox owner declined the authorization",
            "the code expired before it was used; start again",
            f"the provider at {self.server} refused the device grant (invalid_client)",
        ):
            yield self.refused(self.poll(), OnboardingError, message)
        token = yield self.poll()
        self.assertEqual(token["access_token"], "at-1")
        path, form = self.provider.forms[0]
        self.assertEqual(
            (path, form["grant_type"], form["device_code"], form["client_secret"]),
            ("/token", "urn:ietf:params:oauth:grant-type:device_code", DEVICE_CODE, CLIENT_SECRET),
        )

    @inlineCallbacks
    def test_notJSON(self):
        """An HTML page, a JSON list, bytes that are not UTF-8: one line each."""
        self.provider.answer(200, f"<html>{CODE}</html>".encode(), "text/html")
        self.provider.answer(200, [1, 2])
        self.provider.answer(200, b"\xff\xfe{", "application/json")
        for _ in range(3):
            yield self.refused(
                self.poll(),
                ProviderError,
                f"the provider at {self.server} answered something other than a JSON object "
                "(HTTP 200)",
                "bad-response",
            )

    @inlineCallbacks
    def test_httpErrors(self):
        """A 5xx page and a redirect (not followed: the form holds the secret) name the status."""
        self.provider.answer(503, b"<html>down</html>", "text/html")
        self.provider.answer(302, b"", "text/html")
        self.provider.answer(500, {"detail": "oops"})
        for status in (503, 302, 500):
            yield self.refused(
                self.exchange(),
                ProviderError,
                f"the provider at {self.server} answered HTTP {status}",
                "http-error",
            )
        self.assertEqual([path for path, _ in self.provider.forms], ["/token"] * 3)

    @inlineCallbacks
    def test_oversized(self):
        """No more than MAX_ANSWER bytes are read."""
        self.provider.answer(200, b" " * (_onboardhttp.MAX_ANSWER + 1))
        yield self.refused(
            self.exchange(),
            ProviderError,
            f"the provider at {self.server} sent an answer over 64 KiB (HTTP 200)",
            "bad-response",
        )

    # -- no answer

    @inlineCallbacks
    def test_insecureURL(self):
        """A plain http:// URL is refused before anything is sent."""
        app = makeApp(f"http://{self.server}/token")
        yield self.refused(
            self.call(exchangeCodeBlocking, app, CODE, VERIFIER, 10.0),
            ProviderError,
            f"the provider's URL for {self.server} is not https",
            "insecure-url",
        )
        self.assertEqual(self.provider.forms, [])

    @inlineCallbacks
    def test_connectionRefused(self):
        """A port where nothing listens."""
        s = socket.socket()
        self.addCleanup(s.close)
        s.bind(("127.0.0.1", 0))  # held, not listening: connections are refused
        server = f"127.0.0.1:{s.getsockname()[1]}"
        app = makeApp(f"https://{server}/token", deviceURL=f"https://{server}/dev")
        message = f"cannot reach the provider at {server} (connection refused)"
        for d in (
            self.call(exchangeCodeBlocking, app, CODE, VERIFIER, 10.0),
            self.call(deviceStartBlocking, app, 10.0),
            self.call(devicePollBlocking, app, DEVICE_CODE, 10.0),
        ):
            yield self.refused(d, ProviderError, message, "connection-refused")

    @inlineCallbacks
    def test_timeout(self):
        """A server that accepts and never answers: the timeout is named."""
        s = socket.socket()
        self.addCleanup(s.close)
        s.bind(("127.0.0.1", 0))
        s.listen(4)  # never accepted: the handshake never gets an answer
        server = f"127.0.0.1:{s.getsockname()[1]}"
        app = makeApp(f"https://{server}/token")
        yield self.refused(
            self.call(devicePollBlocking, app, DEVICE_CODE, 0.2),
            ProviderError,
            f"the provider at {server} did not answer within 0.2 s",
            "timeout",
        )

    @inlineCallbacks
    def test_notTLS(self):
        """A plain HTTP server behind an https:// URL: the handshake fails, not a certificate."""
        server = self.listen(useTLS=False)
        app = makeApp(f"https://{server}/token")
        yield self.refused(
            self.call(devicePollBlocking, app, DEVICE_CODE, 10.0),
            ProviderError,
            f"the TLS handshake with the provider at {server} failed",
            "tls-failed",
        )

    @inlineCallbacks
    def test_untrustedCertificate(self):
        """A certificate from a CA nobody trusts: the reason code and the verifier's words."""
        os.environ.pop("REQUESTS_CA_BUNDLE")
        message = (
            f"the provider's certificate at {self.server} was refused "
            "(certificate-untrusted: unable to get local issuer certificate); "
            "a private CA? set REQUESTS_CA_BUNDLE to its PEM file"
        )
        for d in (self.exchange(), self.call(deviceStartBlocking, self.app, 10.0), self.poll()):
            yield self.refused(d, ProviderCertificateRejected, message, "certificate-untrusted")
        self.assertEqual(self.provider.forms, [])

    @inlineCallbacks
    def test_wrongName(self):
        """A trusted certificate for another address: certificate-hostname."""
        server = self.listen("127.0.0.2")
        app = makeApp(f"https://{server}/token", deviceURL=f"https://{server}/dev")
        error = yield self.assertFailure(
            self.call(deviceStartBlocking, app, 10.0), ProviderCertificateRejected
        )
        self.assertEqual(error.reason, "certificate-hostname")
        # The verifier's words differ between urllib3 lines; they name the address.
        self.assertTrue(
            error.message.startswith(
                f"the provider's certificate at {server} was refused (certificate-hostname: "
            )
        )
        self.assertIn("'127.0.0.2'", error.message)
        self.assertSafe(error.message)
        self.assertEqual(self.provider.forms, [])
