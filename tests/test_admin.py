"""
Tests for ``proxy.admin`` (the operations the API and the admin command
share), ``proxy.validation`` (request bodies checked against the OpenAPI
schemas) and ``proxy.presets``, over the in-memory store: every Deferred has
fired by the time a call returns, and time is a ``task.Clock``.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import ensureDeferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from proxy.admin import (
    APP_PRESETS,
    IMAP_FIELDS,
    PRESETS,
    SMTP_FIELDS,
    Admin,
    Conflict,
    InvalidInput,
    NotFound,
    accountView,
    buildToken,
)
from proxy.model import Account, Upstream
from proxy.presets import PROVIDERS
from proxy.store import MemoryStore, StoreUnavailable
from proxy.tokens import tokenId

NOW = 1_750_000_000.0
SECRET = "cs-admin-unit-1f2e3d4c5b"
REFRESH = "rt-admin-unit-9a8b7c6d5e"


def accountBody(account: str = "alice", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "account": account,
        "email": f"{account}@example.com",
        "imap": {"host": "imap.example.com", "port": 993, "tls": "implicit"},
        "oauth2": {
            "tokenUrl": "https://oauth.example.com/token",
            "clientId": "client-1",
            "clientSecret": SECRET,
            "refreshToken": REFRESH,
            "scopes": ["https://mail.example.com/"],
        },
    }
    body.update(over)
    return body


def appBody(app: str = "corp", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "app": app,
        "provider": "outlook",
        "tenant": "contoso.onmicrosoft.com",
        "clientId": "app-client",
        "clientSecret": "app-secret",
        "redirectUrl": "https://proxy.example.com/oauth2/callback",
    }
    body.update(over)
    return body


class FakeSessions:
    def __init__(self, closes: int = 2):
        self.calls: list[tuple[str | None, str | None]] = []
        self.closes = closes

    def close(self, account: str | None = None, tokenId: str | None = None) -> int:
        self.calls.append((account, tokenId))
        return self.closes


class FakeBus:
    """The session bus: records what it carried; fails the calls named in ``failing``."""

    def __init__(self, events: list[str], failing: tuple[int, ...] = ()):
        self.events = events
        self.failing = failing
        self.calls = 0

    def publish(self, account: str | None = None, tokenId: str | None = None) -> Any:
        self.calls += 1
        self.events.append(f"publish {account} {tokenId}")
        if self.calls in self.failing:
            return fail(StoreUnavailable("the Redis store is unavailable"))
        return succeed(1)


class AdminTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = MemoryStore(clock=self.clock)
        self.store.openBlocking()
        self.sessions = FakeSessions()
        self.admin = Admin(self.store, self.sessions, self.clock)

    def run_(self, coroutine: Any) -> Any:
        return self.successResultOf(ensureDeferred(coroutine))

    def refused(self, coroutine: Any, kind: type = InvalidInput) -> str:
        return str(self.failureResultOf(ensureDeferred(coroutine), kind).value.message)

    def addAccount(self, account: str = "alice", **over: Any) -> Account:
        return self.run_(self.admin.createAccount(accountBody(account, **over)))  # type: ignore[no-any-return]


class TokenTests(AdminTestCase):
    def test_issueStoresOnlyTheHash(self):
        """An issued token is shown once; the store keeps its SHA-256 and the request's limits."""
        self.addAccount()
        body = {"account": "alice", "scopes": ["imap-proxy"], "description": " laptop "}
        token, record = self.run_(self.admin.issueToken({**body, "expiresIn": 3600}))
        self.assertEqual(record.id, tokenId(token))
        stored = self.run_(self.store.getToken(record.id))
        self.assertEqual(stored, record)
        self.assertEqual((stored.description, stored.expires), ("laptop", NOW + 3600))
        self.assertIsNone(self.run_(self.store.getToken(token)))

    def test_issueForUnknownAccount(self):
        """A token for an account that does not exist is NotFound and nothing is stored."""
        body = {"account": "nobody", "scopes": ["imap-proxy"], "description": "x"}
        self.assertEqual(self.refused(self.admin.issueToken(body), NotFound), "no account nobody")
        self.assertEqual(self.run_(self.store.listTokens()), [])

    def test_findByTokenOrId(self):
        """A token is found by its id or by the token itself, in any case; junk is NotFound."""
        token, record = self.run_(self.admin.issueToken({"scopes": ["api"], "description": "x"}))
        self.assertEqual(self.run_(self.admin.findToken(token.upper())).id, record.id)
        self.assertEqual(self.run_(self.admin.findToken(record.id)).id, record.id)
        for junk in ("", "nope", "0" * 64):
            self.refused(self.admin.findToken(junk), NotFound)

    def test_revokeWithDisconnect(self):
        """Revoking with disconnect announces, removes, closes here, then announces again."""
        events: list[str] = []
        self.admin.bus = FakeBus(events)
        token, record = self.run_(self.admin.issueToken({"scopes": ["api"], "description": "x"}))
        self.assertEqual(self.run_(self.admin.revokeToken(token, disconnect=True)), 2)
        self.assertEqual(events, [f"publish None {record.id}"] * 2)
        self.assertEqual(self.sessions.calls, [(None, record.id)])
        self.assertIsNone(self.run_(self.store.getToken(record.id)))

    def test_revokeAnnouncementFails(self):
        """When the first announcement fails nothing is revoked, so that a retry reaches all."""
        self.admin.bus = FakeBus([], failing=(1,))
        token, record = self.run_(self.admin.issueToken({"scopes": ["api"], "description": "x"}))
        self.failureResultOf(
            ensureDeferred(self.admin.revokeToken(token, disconnect=True)), StoreUnavailable
        )
        self.assertIsNotNone(self.run_(self.store.getToken(record.id)))
        self.assertEqual(self.sessions.calls, [])

    def test_revokeSecondAnnouncementFails(self):
        """A failed announcement after the removal is logged; the revocation stands."""
        self.admin.bus = FakeBus([], failing=(2,))
        token, record = self.run_(self.admin.issueToken({"scopes": ["api"], "description": "x"}))
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.assertEqual(self.run_(self.admin.revokeToken(token, disconnect=True)), 2)
        self.assertIsNone(self.run_(self.store.getToken(record.id)))
        logged = [e for e in events if "close sessions failed" in e.get("log_format", "")]
        self.assertEqual(len(logged), 1)

    def test_listTokensOfUnknownAccount(self):
        """Listing the tokens of an account that does not exist is NotFound."""
        self.refused(self.admin.listTokens("nobody"), NotFound)


class AccountTests(AdminTestCase):
    def test_createWithPreset(self):
        """A gmail account gets the preset's server, token URL and scopes."""
        body = {
            "account": "g",
            "email": "g@gmail.com",
            "provider": "gmail",
            "oauth2": {"clientId": "c", "clientSecret": SECRET, "refreshToken": REFRESH},
        }
        a = self.run_(self.admin.createAccount(body))
        self.assertEqual((a.upstream.host, a.upstream.port), ("imap.gmail.com", 993))
        self.assertEqual(a.oauth2.tokenURL, PROVIDERS["gmail"].tokenURL)
        self.assertEqual(a.oauth2.scopes, PROVIDERS["gmail"].scopes)
        self.assertEqual(a.created, NOW)

    def test_outlookTenant(self):
        """An outlook account's token URL names its tenant."""
        body = {
            "account": "o",
            "email": "o@contoso.com",
            "provider": "outlook",
            "tenant": "contoso.onmicrosoft.com",
            "oauth2": {"clientId": "c", "clientSecret": SECRET, "refreshToken": REFRESH},
        }
        a = self.run_(self.admin.createAccount(body))
        self.assertEqual(
            a.oauth2.tokenURL,
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token",
        )

    def test_createConflictAndReplace(self):
        """Creating an existing account is a Conflict; replacing keeps its creation time."""
        self.addAccount()
        self.clock.advance(60)
        self.refused(self.admin.createAccount(accountBody()), Conflict)
        a = self.run_(self.admin.createAccount(accountBody(email="new@example.com"), replace=True))
        self.assertEqual((a.email, a.created, a.updated), ("new@example.com", NOW, NOW + 60))

    def test_updateKeepsWhatIsNotNamed(self):
        """An update replaces what it names; secrets are kept unless given, never shown."""
        self.addAccount()
        a = self.run_(self.admin.updateAccount("alice", {"imap": {"port": 1993}}))
        self.assertEqual((a.upstream.host, a.upstream.port), ("imap.example.com", 1993))
        self.assertEqual((a.oauth2.clientSecret, a.oauth2.refreshToken), (SECRET, REFRESH))
        view = repr(accountView(a))
        self.assertNotIn(SECRET, view)
        self.assertNotIn(REFRESH, view)

    def test_newGrantEndsReauth(self):
        """A new refresh token ends reauth-required (and its reason); other updates keep it."""
        self.addAccount()
        self.run_(self.store.setAccountState("alice", "reauth-required", "invalid-grant"))
        a = self.run_(self.admin.updateAccount("alice", {"email": "a2@example.com"}))
        self.assertEqual((a.state, a.stateReason), ("reauth-required", "invalid-grant"))
        a = self.run_(self.admin.updateAccount("alice", {"oauth2": {"refreshToken": "rt-new"}}))
        self.assertEqual((a.state, a.stateReason), ("ok", None))

    def test_bodyAccountDiffers(self):
        """An update whose body names another account is refused."""
        self.addAccount()
        message = self.refused(self.admin.updateAccount("alice", {"account": "bob"}))
        self.assertEqual(message, "account in the body differs from the URL")

    def test_plainOnlyToThisMachine(self):
        """imap.tls plain is refused to a remote server and allowed to localhost."""
        message = self.refused(
            self.admin.createAccount(accountBody(imap={"host": "imap.example.com", "tls": "plain"}))
        )
        self.assertIn("only to a server on this machine", message)
        a = self.addAccount("local", imap={"host": "127.0.0.1", "port": 143, "tls": "plain"})
        self.assertEqual(a.upstream.tls, "plain")

    def test_smtpPlainOnlyToThisMachine(self):
        """smtp.tls plain follows imap's rule: only to a server on this machine, port 587."""
        a = self.addAccount("local", smtp={"host": "localhost", "tls": "plain"})
        self.assertEqual(a.smtp, Upstream(host="localhost", port=587, tls="plain"))

    def test_smtpUpdateKeepsGrantAndState(self):
        """Changing only the SMTP server keeps the grant, the IMAP server and the state."""
        before = self.addAccount()
        self.run_(self.store.setAccountState("alice", "reauth-required", "invalid-grant"))
        smtp = {"host": "smtp.example.com", "tls": "starttls"}
        a = self.run_(self.admin.updateAccount("alice", {"smtp": smtp}))
        self.assertEqual(a.smtp, Upstream(host="smtp.example.com", port=587, tls="starttls"))
        self.assertEqual((a.oauth2, a.upstream), (before.oauth2, before.upstream))
        self.assertEqual((a.state, a.stateReason), ("reauth-required", "invalid-grant"))
        a = self.run_(self.admin.updateAccount("alice", {"smtp": None}))
        self.assertIsNone(a.smtp)
        self.assertEqual((a.oauth2, a.state), (before.oauth2, "reauth-required"))

    def test_removeAccount(self):
        """Removing an account removes its tokens and closes its sessions; twice is NotFound."""
        self.addAccount()
        _, record = self.run_(
            self.admin.issueToken(
                {"account": "alice", "scopes": ["imap-proxy"], "description": "x"}
            )
        )
        self.assertEqual(self.run_(self.admin.removeAccount("alice")), 2)
        self.assertEqual(self.sessions.calls, [("alice", None)])
        self.assertIsNone(self.run_(self.store.getToken(record.id)))
        self.refused(self.admin.removeAccount("alice"), NotFound)


class AppTests(AdminTestCase):
    def test_outlookAppPreset(self):
        """An outlook app gets the tenant's URLs (device flow too) and the identity scopes."""
        app = self.run_(self.admin.createApp(appBody()))
        base = "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0"
        self.assertEqual(
            (app.authorizationURL, app.tokenURL, app.deviceURL),
            (base + "/authorize", base + "/token", base + "/devicecode"),
        )
        self.assertEqual(app.scopes, (*PROVIDERS["outlook"].scopes, "openid", "email"))

    def test_genericAppNeedsTokenUrl(self):
        """A generic app without a token URL is refused, saying what is missing."""
        message = self.refused(self.admin.createApp(appBody(provider="generic")))
        self.assertEqual(message, "tokenUrl is required for a generic app")

    def test_accountOfApp(self):
        """An account of an app takes its client from the app and may not give its own."""
        self.run_(self.admin.createApp(appBody()))
        body = {"account": "bob", "email": "bob@contoso.com", "oauth2": {"app": "corp"}}
        body["oauth2"]["refreshToken"] = REFRESH
        a = self.run_(self.admin.createAccount(body))
        self.assertEqual((a.oauth2.app, a.oauth2.clientId), ("corp", "app-client"))
        self.assertEqual(a.upstream.host, "outlook.office365.com")
        self.assertEqual(a.smtp, Upstream(host="smtp.office365.com", port=587, tls="starttls"))
        body["oauth2"]["clientId"] = "mine"
        message = self.refused(self.admin.createAccount(body, replace=True))
        self.assertIn("come from the app", message)

    def test_leavingAppNeedsSecrets(self):
        """Leaving a shared app without giving a new secret and grant is refused."""
        self.run_(self.admin.createApp(appBody()))
        body = {"account": "bob", "email": "bob@contoso.com"}
        self.run_(
            self.admin.createAccount({**body, "oauth2": {"app": "corp", "refreshToken": REFRESH}})
        )
        leave = {"oauth2": {"app": None, "clientId": "mine", "tokenUrl": "https://t.example/"}}
        message = self.refused(self.admin.updateAccount("bob", leave))
        self.assertIn("required when leaving an app", message)

    def test_removeAppInUse(self):
        """An app that accounts use cannot be removed (Conflict); an unknown one is NotFound."""
        self.run_(self.admin.createApp(appBody()))
        self.run_(
            self.admin.createAccount(
                {
                    "account": "bob",
                    "email": "b@x.example",
                    "oauth2": {"app": "corp", "refreshToken": "r"},
                }
            )
        )
        message = self.refused(self.admin.removeApp("corp"), Conflict)
        self.assertEqual(message, "OAuth2 app corp is in use: 1 account(s) use this app")
        self.refused(self.admin.removeApp("nope"), NotFound)
        self.run_(self.admin.removeAccount("bob"))
        self.run_(self.admin.removeApp("corp"))
        self.assertEqual(self.run_(self.admin.listApps()), [])


class ValidationTests(AdminTestCase):
    """The OpenAPI schemas decide; the messages name the field in a fixed text."""

    TOKEN_BODIES = [
        ([], "token request must be an object"),
        ({"scopes": ["api"]}, "description is required"),
        ({"scopes": ["api"], "description": 5}, "description must be a string"),
        ({"scopes": ["api"], "description": "  "}, "description must not be empty"),
        (
            {"scopes": ["api"], "description": "a\nb"},
            "description must not contain control characters",
        ),
        (
            {"scopes": ["api"], "description": "x" * 1025},
            "description is too long (at most 1024 characters)",
        ),
        (
            {"scopes": ["api"], "description": "x", "admin": True},
            "token request: unknown field(s): admin",
        ),
        ({"scopes": [], "description": "x"}, "scopes: at least one is required"),
        (
            {"scopes": ["root"], "description": "x"},
            "scopes must be one of imap-proxy, smtp, api, metrics, *",
        ),
        ({"scopes": "api", "description": "x"}, "scopes must be a list of scope strings"),
        (
            {"scopes": ["api"], "description": "x", "restrictions": {"addresses": ["300.1.1.1"]}},
            "restrictions.addresses: not an IP address or CIDR network",
        ),
        (
            {"scopes": ["api"], "description": "x", "expiresIn": True},
            "expiresIn must be a positive whole number of seconds (at most ten years)",
        ),
        (
            {
                "scopes": ["api"],
                "description": "x",
                "expiresIn": 1,
                "expires": "2030-01-01T00:00:00Z",
            },
            "give expires or expiresIn, not both",
        ),
        (
            {"scopes": ["api"], "description": "x", "expires": "2030-01-01T00:00:00"},
            "expires must include a time zone (e.g. Z)",
        ),
        (
            {"scopes": ["api"], "description": "x", "expires": "2020-01-01T00:00:00Z"},
            "expires must be in the future",
        ),
    ]

    def test_tokenMessages(self):
        """Each bad token request is refused with its message."""
        for body, message in self.TOKEN_BODIES:
            with self.assertRaises(InvalidInput, msg=repr(body)) as e:
                buildToken(body, NOW)
            self.assertEqual(e.exception.message, message)

    ACCOUNT_UPDATES = [
        ("disabled", "account must be an object"),
        ({"imap": {"port": "993"}}, "imap.port must be an integer 1-65535"),
        ({"imap": {"port": 1.0}}, "imap.port must be an integer 1-65535"),
        ({"imap": {"host": "a/b"}}, "imap.host is not a host name"),
        ({"imap": {"user": "u"}}, "imap: unknown field(s): user"),
        ({"imap": {"caFile": "ca.pem"}}, "imap.caFile must be an absolute path"),
        (
            {"imap": {"maxConnections": -1}},
            "imap.maxConnections must be an integer 0-10000 or null",
        ),
        (
            {"imap": {"maxConnections": "3"}},
            "imap.maxConnections must be an integer 0-10000 or null",
        ),
        (
            {"smtp": {"host": "h", "maxConnections": 10001}},
            "smtp.maxConnections must be an integer 0-10000 or null",
        ),
        ({"smtp": "smtp.example.com"}, "smtp must be an object"),
        ({"smtp": {"port": 465}}, "smtp.host is required"),
        ({"smtp": {"host": "h", "port": 0}}, "smtp.port must be an integer 1-65535"),
        ({"smtp": {"host": "h", "port": "587"}}, "smtp.port must be an integer 1-65535"),
        ({"smtp": {"host": "a/b"}}, "smtp.host is not a host name"),
        (
            {"smtp": {"host": "h", "tls": "ssl"}},
            "smtp.tls must be one of implicit, starttls, plain",
        ),
        ({"smtp": {"host": "h", "user": "u"}}, "smtp: unknown field(s): user"),
        ({"smtp": {"host": "h", "caFile": "ca.pem"}}, "smtp.caFile must be an absolute path"),
        (
            {"smtp": {"host": "smtp.example.com", "tls": "plain"}},
            "smtp.tls plain (no TLS at all) is allowed only to a server on this machine",
        ),
        ({"oauth2": {"tokenUrl": "http://t"}}, "oauth2.tokenUrl must be an https:// URL"),
        ({"oauth2": {"scopes": ["a b"]}}, "oauth2.scopes must be a list of scope strings"),
        ({"oauth2": {"refreshToken": ""}}, "oauth2.refreshToken must not be empty"),
        ({"state": "gone"}, "state must be one of ok, disabled"),
        ({"provider": []}, "provider must be a string"),
        ({"tenant": "a/b"}, "tenant is not a tenant id"),
        ({"email": "alice.example.com"}, "email is not a mail address"),
        ({"email": "\ud800@example.com"}, "email is not valid Unicode"),
    ]

    def test_accountMessages(self):
        """Each bad account update is refused with its message and changes nothing."""
        before = self.addAccount()
        for body, message in self.ACCOUNT_UPDATES:
            self.assertEqual(self.refused(self.admin.updateAccount("alice", body)), message)
        self.assertEqual(self.run_(self.admin.getAccount("alice")), before)

    def test_imapFieldsFromSchema(self):
        """The imap and smtp fields a consent may give are the schema's."""
        self.assertEqual(IMAP_FIELDS, {"host", "port", "tls", "caFile", "maxConnections"})
        self.assertEqual(SMTP_FIELDS, {"host", "port", "tls", "caFile", "maxConnections"})


class PresetTests(SynchronousTestCase):
    def test_oneTable(self):
        """Account and app presets are views of one provider table: a URL is written once."""
        for name, p in PROVIDERS.items():
            self.assertEqual(PRESETS[name].get("tokenUrl"), p.tokenURL)
            self.assertEqual(APP_PRESETS[name].get("tokenUrl"), p.tokenURL)
            self.assertEqual(PRESETS[name].get("imap"), p.imap)
            self.assertEqual(PRESETS[name].get("smtp"), p.smtp)
        self.assertEqual(APP_PRESETS["gmail"]["deviceAuthorizationUrl"], None)
        self.assertEqual(PRESETS["generic"], {})
        self.assertEqual(APP_PRESETS["generic"], {})

    def test_smtpServers(self):
        """Each provider's SMTP submission server, and one Microsoft grant for IMAP and SMTP."""
        self.assertEqual(
            PROVIDERS["gmail"].smtp, {"host": "smtp.gmail.com", "port": 465, "tls": "implicit"}
        )
        self.assertEqual(
            PROVIDERS["outlook"].smtp,
            {"host": "smtp.office365.com", "port": 587, "tls": "starttls"},
        )
        for scopes in (PRESETS["outlook"]["scopes"], APP_PRESETS["outlook"]["scopes"]):
            self.assertIn("https://outlook.office.com/IMAP.AccessAsUser.All", scopes)
            self.assertIn("https://outlook.office.com/SMTP.Send", scopes)
        # Google's one mail scope covers sending.
        self.assertEqual(PRESETS["gmail"]["scopes"], ["https://mail.google.com/"])
