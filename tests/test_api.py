"""
Tests for ``proxy.api``: every route through treq's ``StubTreq`` against the
real Klein resource (no sockets), over an in-memory store whose Deferreds have
already fired, so each request completes within the call. The body limit,
which only the real ``Site`` installs, is tested through ``TokenAPI.site()``
over a ``StringTransport``. Every answer below 500 is also checked against
the OpenAPI description it is documented by.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any
from urllib.parse import urlsplit

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from openapi_schema_validator import (
    OAS30ReadValidator,
    OAS30WriteValidator,
    oas30_format_checker,
)
from openapi_spec_validator import validate as validateSpec
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from proxy.admin import Admin, buildAccount, buildApp
from proxy.cred import API_SCOPE, TokenChecker
from proxy.imap import SessionRegistry
from proxy.model import Account, OAuth2App, Token, Upstream
from proxy.penalties import LoginPenalties, MemoryPenalties, PenaltyPolicy
from proxy.store import IAccountStore, ITokenStore, StoreError
from proxy.tokens import newToken, parseNetworks, tokenId
from proxy.web.api import MAX_BODY, OPENAPI_PATH, TokenAPI

NOW = 1_750_000_000.0
CLIENT_SECRET = "cs-api-unit-5b1f0e9d2c77"
REFRESH_TOKEN = "rt-api-unit-7c3a9e1f4b88"
ROOT = object()
NOBODY = object()
HERE = os.path.dirname(os.path.abspath(__file__))
DOCS_OPENAPI = os.path.join(os.path.dirname(HERE), "docs", "openapi.json")

with open(OPENAPI_PATH, encoding="utf-8") as _f:
    SPEC: dict[str, Any] = json.load(_f)


# -- fakes ------------------------------------------------------------------


@implementer(IAccountStore, ITokenStore)
class MemoryStore:
    """The store contract in memory; every Deferred it returns has fired."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.accounts: dict[str, Account] = {}
        self.tokens: dict[str, Token] = {}
        self.apps: dict[str, OAuth2App] = {}

    def getAccount(self, accountId):
        return succeed(self.accounts.get(accountId))

    def listAccounts(self):
        return succeed([self.accounts[k] for k in sorted(self.accounts)])

    def putAccount(self, account):
        now = self.clock.seconds()
        self.accounts[account.id] = attrs.evolve(
            account, created=account.created or now, updated=now
        )
        return succeed(None)

    def removeAccount(self, accountId):
        existed = self.accounts.pop(accountId, None) is not None
        for tid in [t.id for t in self.tokens.values() if t.account == accountId]:
            del self.tokens[tid]
        return succeed(existed)

    def setRefreshToken(self, accountId, refreshToken):
        a = self.accounts[accountId]
        self.accounts[accountId] = attrs.evolve(
            a, oauth2=attrs.evolve(a.oauth2, refreshToken=refreshToken)
        )
        return succeed(None)

    def setAccountState(self, accountId, state, reason):
        if accountId in self.accounts:
            self.accounts[accountId] = attrs.evolve(
                self.accounts[accountId], state=state, stateReason=reason
            )
        return succeed(None)

    def addToken(self, token):
        self.tokens[token.id] = token
        return succeed(None)

    def getToken(self, tokenId):
        return succeed(self.tokens.get(tokenId))

    def listTokens(self, account=None):
        found = [t for t in self.tokens.values() if account is None or t.account == account]
        return succeed(sorted(found, key=lambda t: (-t.created, t.id)))

    def removeToken(self, tokenId):
        return succeed(self.tokens.pop(tokenId, None) is not None)

    def touchToken(self, tokenId, when, address):
        if tokenId in self.tokens:
            self.tokens[tokenId] = attrs.evolve(
                self.tokens[tokenId], lastUseTime=when, lastUseAddress=address
            )
        return succeed(None)

    def getApp(self, appId):
        return succeed(self.apps.get(appId))

    def listApps(self):
        return succeed([self.apps[k] for k in sorted(self.apps)])

    def putApp(self, app):
        now = self.clock.seconds()
        self.apps[app.id] = attrs.evolve(app, created=app.created or now, updated=now)
        return succeed(None)

    def removeApp(self, appId):
        used = sum(1 for a in self.accounts.values() if a.oauth2.app == appId)
        if used:
            return fail(StoreError(f"{used} account(s) use this app"))
        return succeed(self.apps.pop(appId, None) is not None)

    def snapshot(self) -> tuple[dict, dict, dict]:
        """What a refused request must leave unchanged (last use aside)."""
        tokens = {
            k: attrs.evolve(t, lastUseTime=None, lastUseAddress=None)
            for k, t in self.tokens.items()
        }
        return dict(self.accounts), tokens, dict(self.apps)


class FakeSessions:
    """The live-session registry: records what it was asked to close."""

    def __init__(self, closes: int = 2):
        self.calls: list[dict[str, Any]] = []
        self.closes = closes

    def close(self, account=None, tokenId=None) -> int:
        self.calls.append({"account": account, "tokenId": tokenId})
        return self.closes


# -- data -------------------------------------------------------------------


def accountBody(account: str = "alice", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "account": account,
        "email": f"{account}@example.com",
        "imap": {"host": "imap.example.com", "port": 993, "tls": "implicit"},
        "oauth2": {
            "tokenUrl": "https://oauth.example.com/token",
            "clientId": "client-1",
            "clientSecret": CLIENT_SECRET,
            "refreshToken": REFRESH_TOKEN,
            "scopes": ["https://mail.example.com/"],
        },
    }
    body.update(over)
    return body


def tokenBody(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"scopes": ["imap-proxy"], "description": "laptop"}
    body.update(over)
    return body


@attrs.frozen
class Reply:
    status: int
    headers: Any
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)

    @property
    def text(self) -> str:
        return self.raw.decode("utf-8", "replace")


# -- the OpenAPI description as a test oracle ---------------------------------


def findOperation(method: str, path: str) -> tuple[str, dict[str, Any]] | None:
    """The documented operation a request goes to, by path template and method."""
    segments = urlsplit(path).path.split("/")
    for template, item in SPEC["paths"].items():
        parts = template.split("/")
        if len(parts) != len(segments):
            continue
        if all(p == s or (p.startswith("{") and s) for p, s in zip(parts, segments, strict=True)):
            op = item.get(method.lower())
            if op is not None:
                return template, op
    return None


def _resolve(obj: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in obj:
        node: Any = SPEC
        for part in obj["$ref"].lstrip("#/").split("/"):
            node = node[part]
        obj = node
    return obj


def schemaErrors(schema: dict[str, Any], instance: Any, *, write: bool) -> list[str]:
    cls = OAS30WriteValidator if write else OAS30ReadValidator
    validator = cls(
        {**schema, "components": SPEC["components"]}, format_checker=oas30_format_checker
    )
    return [e.message for e in validator.iter_errors(instance)]


def requestSchema(method: str, template: str) -> dict[str, Any]:
    op = SPEC["paths"][template][method.lower()]
    return op["requestBody"]["content"]["application/json"]["schema"]


# -- the harness --------------------------------------------------------------


class APITestCase(SynchronousTestCase):
    """A TokenAPI over a MemoryStore, a root token with every scope, and StubTreq."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = MemoryStore(self.clock)
        self.sessions = FakeSessions()
        self.api = TokenAPI(Admin(self.store, self.sessions, self.clock), self.clock)
        self.stub = StubTreq(self.api.app.resource())
        self.root = self.addToken(None, ("*",))

    def addToken(
        self,
        account: str | None = "alice",
        scopes: tuple[str, ...] = ("api",),
        addresses: tuple[str, ...] = (),
        expires: float | None = None,
    ) -> str:
        token, tid = newToken()
        self.store.tokens[tid] = Token(
            id=tid,
            account=account,
            scopes=scopes,
            description="fixture",
            addresses=addresses,
            created=self.clock.seconds(),
            expires=expires,
        )
        return token

    def addAccount(self, aid: str = "alice", **over: Any) -> Account:
        account = attrs.evolve(buildAccount(accountBody(aid)), created=NOW, **over)
        self.store.accounts[aid] = account
        return account

    def call(
        self,
        method: str,
        path: str,
        body: Any = NOBODY,
        *,
        data: bytes | None = None,
        token: Any = ROOT,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """One request; answers below 500 must match what the description says."""
        h = {}
        if token is ROOT:
            token = self.root
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        h.update(headers or {})
        if body is not NOBODY:
            data = json.dumps(body).encode("utf-8")
            h.setdefault("Content-Type", "application/json")
        d = self.stub.request(method, "http://api.example" + path, headers=h, data=data)
        self.stub.flush()
        response = self.successResultOf(d)
        reply = Reply(response.code, response.headers, self.successResultOf(response.content()))
        if reply.status < 500:
            self.assertDocumented(method, path, reply)
        return reply

    def assertDocumented(self, method: str, path: str, reply: Reply) -> None:
        found = findOperation(method, path)
        if found is None:
            return  # unknown route or method: checked by the tests for those
        template, op = found
        self.assertIn(
            str(reply.status), op["responses"], f"{method} {template} answered {reply.status}"
        )
        response = _resolve(op["responses"][str(reply.status)])
        [(mediaType, content)] = response["content"].items()
        [sent] = reply.headers.getRawHeaders(b"content-type")
        self.assertEqual(sent.decode().split(";")[0], mediaType, f"{method} {template}")
        if mediaType != "application/json":
            return
        errors = schemaErrors(content["schema"], reply.json, write=False)
        self.assertEqual(errors, [], f"{method} {template} {reply.status}: {reply.text}")

    def assertError(self, reply: Reply, status: int) -> None:
        """A JSON error with this status, saying the same status in its body."""
        self.assertEqual(reply.status, status, reply.text)
        self.assertEqual(reply.headers.getRawHeaders(b"content-type"), [b"application/json"])
        body = reply.json
        self.assertEqual(set(body), {"error", "statusCode"})
        self.assertEqual(body["statusCode"], status)
        self.assertIsInstance(body["error"], str)
        self.assertNotIn("Traceback", reply.text)

    def assertOK(self, reply: Reply) -> Any:
        self.assertEqual(reply.status, 200, reply.text)
        self.assertEqual(reply.headers.getRawHeaders(b"content-type"), [b"application/json"])
        return reply.json


# -- the fake itself ----------------------------------------------------------


class MemoryStoreTests(SynchronousTestCase):
    def test_interfaces(self):
        """The in-memory store the API tests use provides both store interfaces."""
        store = MemoryStore(Clock())
        self.assertTrue(verifyObject(IAccountStore, store))
        self.assertTrue(verifyObject(ITokenStore, store))


# -- authentication and authorization -------------------------------------------


class AccessTests(APITestCase):
    def test_missingToken(self):
        """A /v1 request without Authorization is refused with 401."""
        self.assertError(self.call("GET", "/v1/accounts", token=None), 401)

    def test_notBearer(self):
        """An Authorization header of another scheme is refused with 401."""
        reply = self.call("GET", "/v1/accounts", token=None, headers={"Authorization": "Basic x"})
        self.assertError(reply, 401)

    def test_emptyBearer(self):
        """'Bearer' with no token is refused with 401."""
        reply = self.call("GET", "/v1/accounts", token=None, headers={"Authorization": "Bearer "})
        self.assertError(reply, 401)

    def test_unknownToken(self):
        """A well-formed token the store does not know is refused with 401."""
        self.assertError(self.call("GET", "/v1/accounts", token=newToken()[0]), 401)

    def test_tokenIdIsNotAToken(self):
        """Presenting a token's id instead of the token is refused with 401."""
        self.assertError(self.call("GET", "/v1/accounts", token=tokenId(self.root)), 401)

    def test_expiredToken(self):
        """An API token works until its expiry and gets 401 from then on."""
        token = self.addToken(None, expires=NOW + 60)
        self.assertOK(self.call("GET", "/v1/accounts", token=token))
        self.clock.advance(60)
        self.assertError(self.call("GET", "/v1/accounts", token=token), 401)

    def test_wrongScope(self):
        """A token without the api scope is refused with 403 on every /v1 route."""
        self.addAccount()
        token = self.addToken(None, ("imap-proxy", "smtp"))
        for method, path in [
            ("GET", "/v1/accounts"),
            ("GET", "/v1/account/alice"),
            ("GET", "/v1/tokens"),
            ("GET", "/v1/tokens/account/alice"),
            ("DELETE", f"/v1/token/{tokenId(self.root)}"),
            ("DELETE", "/v1/account/alice"),
        ]:
            self.assertError(self.call(method, path, token=token), 403)
        before = self.store.snapshot()
        self.assertError(self.call("POST", "/v1/token", tokenBody(), token=token), 403)
        self.assertError(self.call("POST", "/v1/account", accountBody("bob"), token=token), 403)
        self.assertError(
            self.call("PUT", "/v1/account/alice", {"state": "disabled"}, token=token), 403
        )
        self.assertEqual(self.store.snapshot(), before)

    def test_apiScope(self):
        """A root token with only the api scope may use the API."""
        token = self.addToken(None, ("api",))
        self.assertOK(self.call("GET", "/v1/accounts", token=token))
        self.assertOK(self.call("GET", "/v1/tokens", token=token))

    def test_ipRestrictionRefuses(self):
        """A token restricted to 10.0.0.0/8 is refused with 403 from 127.0.0.1."""
        token = self.addToken(None, addresses=("10.0.0.0/8",))
        self.assertError(self.call("GET", "/v1/accounts", token=token), 403)

    def test_ipRestrictionAllows(self):
        """A token restricted to 127.0.0.0/8 works from 127.0.0.1 (StubTreq's client)."""
        token = self.addToken(None, addresses=("127.0.0.0/8",))
        self.assertOK(self.call("GET", "/v1/accounts", token=token))

    def test_ipv6RestrictionDoesNotAdmitIPv4(self):
        """A token restricted to an IPv6 network is refused from an IPv4 client."""
        token = self.addToken(None, addresses=("::1/128",))
        self.assertError(self.call("GET", "/v1/accounts", token=token), 403)

    def test_useRecorded(self):
        """A successful API call records the token's last use (time and address)."""
        self.clock.advance(5)
        self.assertOK(self.call("GET", "/v1/accounts"))
        record = self.store.tokens[tokenId(self.root)]
        self.assertEqual(record.lastUseTime, NOW + 5)
        self.assertEqual(record.lastUseAddress, "127.0.0.1")
        tokens = self.assertOK(self.call("GET", "/v1/tokens"))["tokens"]
        self.assertEqual(
            tokens[0]["lastUse"], {"time": "2025-06-15T15:06:45Z", "address": "127.0.0.1"}
        )

    def test_serviceRoutesOpen(self):
        """/health and /openapi.json answer without a token."""
        self.assertEqual(self.assertOK(self.call("GET", "/health", token=None)), {"status": "ok"})
        self.assertOK(self.call("GET", "/openapi.json", token=None))

    def test_healthStoreDown(self):
        """/health answers 503 in JSON when the store fails, and says nothing of why."""
        self.store.getToken = lambda tokenId: fail(StoreError("disk on fire at /var/lib/x"))
        reply = self.call("GET", "/health", token=None)
        self.assertEqual(reply.status, 503)
        self.assertEqual(reply.json, {"status": "unavailable", "statusCode": 503})
        self.assertNotIn("disk", reply.text)


class AccountTokenTests(APITestCase):
    """What an account's API token may and may not do."""

    def setUp(self) -> None:
        super().setUp()
        self.addAccount("alice")
        self.addAccount("bob")
        self.alice = self.addToken("alice", ("api", "imap-proxy"))
        self.bobToken = self.addToken("bob", ("imap-proxy",))

    def test_ownAccount(self):
        """An account token reads its own account and lists only it."""
        self.assertEqual(
            self.assertOK(self.call("GET", "/v1/account/alice", token=self.alice))["account"],
            "alice",
        )
        accounts = self.assertOK(self.call("GET", "/v1/accounts", token=self.alice))["accounts"]
        self.assertEqual([a["account"] for a in accounts], ["alice"])

    def test_otherAccount(self):
        """An account token gets 403 on another account's routes and changes nothing."""
        before = self.store.snapshot()
        for method, path, body in [
            ("GET", "/v1/account/bob", NOBODY),
            ("PUT", "/v1/account/bob", {"state": "disabled"}),
            ("DELETE", "/v1/account/bob", NOBODY),
            ("GET", "/v1/tokens/account/bob", NOBODY),
            ("GET", "/v1/tokens?account=bob", NOBODY),
            ("POST", "/v1/token", tokenBody(account="bob")),
        ]:
            self.assertError(self.call(method, path, body, token=self.alice), 403)
        self.assertEqual(self.store.snapshot(), before)
        self.assertEqual(self.sessions.calls, [])

    def test_noRootTokens(self):
        """An account token may not issue a root token (403)."""
        before = self.store.snapshot()
        self.assertError(self.call("POST", "/v1/token", tokenBody(), token=self.alice), 403)
        self.assertEqual(self.store.snapshot(), before)

    def test_noAccountCreation(self):
        """Only root tokens create accounts: an account token gets 403."""
        reply = self.call("POST", "/v1/account", accountBody("carol"), token=self.alice)
        self.assertError(reply, 403)
        self.assertNotIn("carol", self.store.accounts)

    def test_issueOwn(self):
        """An account token issues tokens for its own account."""
        body = self.assertOK(
            self.call("POST", "/v1/token", tokenBody(account="alice"), token=self.alice)
        )
        self.assertEqual(self.store.tokens[body["id"]].account, "alice")

    def test_listOwnTokens(self):
        """An account token lists its own account's tokens, with or without naming it."""
        mine = {tokenId(self.alice)}
        for path in ["/v1/tokens", "/v1/tokens?account=alice", "/v1/tokens/account/alice"]:
            tokens = self.assertOK(self.call("GET", path, token=self.alice))["tokens"]
            self.assertEqual({t["id"] for t in tokens}, mine, path)

    def test_deleteOtherAccountsToken(self):
        """An account token cannot revoke another account's token (404, as if unknown)."""
        self.assertError(
            self.call("DELETE", f"/v1/token/{tokenId(self.bobToken)}", token=self.alice), 404
        )
        self.assertError(self.call("DELETE", f"/v1/token/{self.bobToken}", token=self.alice), 404)
        self.assertIn(tokenId(self.bobToken), self.store.tokens)

    def test_deleteRootToken(self):
        """An account token cannot revoke a root token."""
        self.assertError(
            self.call("DELETE", f"/v1/token/{tokenId(self.root)}", token=self.alice), 404
        )
        self.assertIn(tokenId(self.root), self.store.tokens)

    def test_renewGrantOnly(self):
        """An account token may hand in a new refresh token for its account, and nothing else."""
        before = self.store.snapshot()
        for body in [
            {"email": "x@example.com"},
            {"imap": {"host": "evil.example.com"}},
            {"oauth2": {"tokenUrl": "https://evil.example.com/token"}},
            {"state": "ok"},
        ]:
            reply = self.call("PUT", "/v1/account/alice", body, token=self.alice)
            self.assertError(reply, 403)
        self.assertEqual(self.store.snapshot(), before)
        reply = self.call(
            "PUT", "/v1/account/alice", {"oauth2": {"refreshToken": "rt-new"}}, token=self.alice
        )
        self.assertOK(reply)
        self.assertEqual(self.store.accounts["alice"].oauth2.refreshToken, "rt-new")

    def test_deleteOwnToken(self):
        """An account token revokes a token of its own account."""
        other = self.addToken("alice", ("imap-proxy",))
        body = self.assertOK(self.call("DELETE", f"/v1/token/{tokenId(other)}", token=self.alice))
        self.assertEqual(body, {"deleted": True})
        self.assertNotIn(tokenId(other), self.store.tokens)


# -- tokens -------------------------------------------------------------------


class TokenTests(APITestCase):
    def setUp(self) -> None:
        super().setUp()
        self.addAccount("alice")

    def issue(self, path: str = "/v1/token", **over: Any) -> dict[str, Any]:
        body = tokenBody(**over)
        self.assertEqual(
            schemaErrors(requestSchema("POST", path), body, write=True), [], "spec rejects it"
        )
        return self.assertOK(self.call("POST", path, body))  # type: ignore[no-any-return]

    def test_issue(self):
        """POST /v1/token answers a 64-hex token and its id (its SHA-256) and stores the record."""
        body = self.issue(
            account="alice",
            scopes=["imap-proxy", "smtp", "imap-proxy"],
            description="  laptop  ",
            restrictions={"addresses": ["10.1.2.3/8", "192.0.2.7", "2001:db8::1/32"]},
        )
        self.assertEqual(set(body), {"token", "id"})
        self.assertRegex(body["token"], r"\A[0-9a-f]{64}\Z")
        self.assertEqual(body["id"], hashlib.sha256(body["token"].encode()).hexdigest())
        record = self.store.tokens[body["id"]]
        self.assertEqual(record.account, "alice")
        self.assertEqual(record.scopes, ("imap-proxy", "smtp"))
        self.assertEqual(record.description, "laptop")
        self.assertEqual(record.addresses, ("10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"))
        self.assertEqual(record.created, NOW)
        self.assertIsNone(record.expires)

    def test_issueAlias(self):
        """POST /v1/tokens issues a token like POST /v1/token."""
        body = self.issue("/v1/tokens", account="alice")
        self.assertEqual(self.store.tokens[body["id"]].account, "alice")

    def test_rootToken(self):
        """A token request without account issues a root token that may use the API."""
        body = self.issue(scopes=["api"], description="automation")
        self.assertIsNone(self.store.tokens[body["id"]].account)
        self.assertOK(self.call("GET", "/v1/accounts", token=body["token"]))

    def test_nullAccountIsRoot(self):
        """account: null issues a root token."""
        body = self.issue(account=None)
        self.assertIsNone(self.store.tokens[body["id"]].account)

    def test_expires(self):
        """expires (ISO 8601) is stored as that time and listed back in UTC."""
        body = self.issue(account="alice", expires="2030-01-01T01:00:00+01:00")
        self.assertEqual(self.store.tokens[body["id"]].expires, 1893456000.0)
        listed = self.assertOK(self.call("GET", "/v1/tokens/account/alice"))["tokens"]
        self.assertEqual(listed[0]["expires"], "2030-01-01T00:00:00Z")

    def test_expiresIn(self):
        """expiresIn is seconds from now; the token stops working then."""
        body = self.issue(scopes=["api"], expiresIn=3600)
        self.assertEqual(self.store.tokens[body["id"]].expires, NOW + 3600)
        self.assertOK(self.call("GET", "/v1/accounts", token=body["token"]))
        self.clock.advance(3600)
        self.assertError(self.call("GET", "/v1/accounts", token=body["token"]), 401)

    def test_farFutureExpiryKeepsListing(self):
        """A token expiring at the edge of the calendar does not break token listings."""
        reply = self.call("POST", "/v1/token", tokenBody(expires="9999-12-31T23:59:59-14:00"))
        if reply.status == 200:
            self.assertOK(self.call("GET", "/v1/tokens"))
        else:
            self.assertError(reply, 400)

    def test_list(self):
        """Listing an account's tokens shows each record's fields and never a token value."""
        issued = self.issue(
            account="alice",
            expiresIn=60,
            restrictions={"addresses": ["10.0.0.0/8"]},
        )
        other = self.addToken("alice", ("imap-proxy",))
        for path in ["/v1/tokens/account/alice", "/v1/tokens?account=alice"]:
            reply = self.call("GET", path)
            tokens = self.assertOK(reply)["tokens"]
            self.assertEqual({t["id"] for t in tokens}, {issued["id"], tokenId(other)})
            mine = next(t for t in tokens if t["id"] == issued["id"])
            self.assertEqual(
                mine,
                {
                    "id": issued["id"],
                    "account": "alice",
                    "description": "laptop",
                    "scopes": ["imap-proxy"],
                    "restrictions": {"addresses": ["10.0.0.0/8"]},
                    "created": "2025-06-15T15:06:40Z",
                    "expires": "2025-06-15T15:07:40Z",
                    "lastUse": None,
                },
            )
            self.assertNotIn(issued["token"], reply.text)
            self.assertNotIn(other, reply.text)
            self.assertNotIn(self.root, reply.text)

    def test_listAllForRoot(self):
        """A root token without ?account= lists every token, root tokens included."""
        alice = self.addToken("alice")
        tokens = self.assertOK(self.call("GET", "/v1/tokens"))["tokens"]
        self.assertEqual({t["id"] for t in tokens}, {tokenId(alice), tokenId(self.root)})

    def test_listUnknownAccount(self):
        """Listing the tokens of an unknown account is a 404."""
        self.assertError(self.call("GET", "/v1/tokens/account/nobody"), 404)
        self.assertError(self.call("GET", "/v1/tokens?account=nobody"), 404)

    def test_deleteById(self):
        """DELETE /v1/token/{id} revokes the token: it no longer authenticates."""
        token = self.addToken(None)
        body = self.assertOK(self.call("DELETE", f"/v1/token/{tokenId(token)}"))
        self.assertEqual(body, {"deleted": True})
        self.assertNotIn(tokenId(token), self.store.tokens)
        self.assertError(self.call("GET", "/v1/accounts", token=token), 401)
        self.assertEqual(self.sessions.calls, [])

    def test_deleteByToken(self):
        """DELETE /v1/tokens/{token} (the alias) revokes by the token value itself."""
        token = self.addToken("alice")
        self.assertOK(self.call("DELETE", f"/v1/tokens/{token}"))
        self.assertNotIn(tokenId(token), self.store.tokens)

    def test_deleteUpperCase(self):
        """A token id in upper case is found."""
        token = self.addToken("alice")
        self.assertOK(self.call("DELETE", f"/v1/token/{tokenId(token).upper()}"))
        self.assertNotIn(tokenId(token), self.store.tokens)

    def test_deleteUnknown(self):
        """Revoking an unknown or malformed token is a 404 and changes nothing."""
        before = self.store.snapshot()
        for value in [newToken()[1], "not-a-token", "0" * 63, "g" * 64]:
            self.assertError(self.call("DELETE", f"/v1/token/{value}"), 404)
            self.assertError(self.call("DELETE", f"/v1/tokens/{value}"), 404)
        self.assertEqual(self.store.snapshot(), before)

    def test_deleteDisconnect(self):
        """?disconnect=true also closes the token's live sessions and says how many."""
        token = self.addToken("alice", ("imap-proxy",))
        body = self.assertOK(self.call("DELETE", f"/v1/token/{tokenId(token)}?disconnect=true"))
        self.assertEqual(body, {"deleted": True, "disconnected": 2})
        self.assertEqual(self.sessions.calls, [{"account": None, "tokenId": tokenId(token)}])

    def test_deleteDisconnectFalse(self):
        """?disconnect=false revokes without closing sessions."""
        token = self.addToken("alice", ("imap-proxy",))
        body = self.assertOK(self.call("DELETE", f"/v1/token/{token}?disconnect=false"))
        self.assertEqual(body, {"deleted": True})
        self.assertEqual(self.sessions.calls, [])

    def test_deleteBadFlag(self):
        """A disconnect value that is not a boolean is a 400 and revokes nothing."""
        token = self.addToken("alice")
        self.assertError(self.call("DELETE", f"/v1/token/{token}?disconnect=maybe"), 400)
        self.assertIn(tokenId(token), self.store.tokens)

    def test_grantScopes(self):
        """An api token issues imap-proxy and api tokens, but only a * token grants * (403)."""
        token = self.addToken(None, ("api",))
        before = self.store.snapshot()
        reply = self.call("POST", "/v1/token", tokenBody(scopes=["api", "*"]), token=token)
        self.assertError(reply, 403)
        self.assertEqual(self.store.snapshot(), before)
        for scopes in (["imap-proxy"], ["api"]):
            self.assertOK(self.call("POST", "/v1/token", tokenBody(scopes=scopes), token=token))
        self.assertOK(self.call("POST", "/v1/token", tokenBody(scopes=["*"])))

    def test_mintNoLongerLived(self):
        """A token mints none that outlives it or never expires; left out, the expiry is its own."""
        token = self.addToken(None, ("api",), expires=NOW + 120)
        before = self.store.snapshot()
        for scopes in (["api"], ["imap-proxy"], ["smtp"]):
            late = tokenBody(scopes=scopes, expiresIn=121)
            self.assertError(self.call("POST", "/v1/token", late, token=token), 403)
        self.assertEqual(self.store.snapshot(), before)
        body = self.assertOK(self.call("POST", "/v1/token", tokenBody(), token=token))
        self.assertEqual(self.store.tokens[body["id"]].expires, NOW + 120)
        mail = tokenBody(scopes=["imap-proxy"], expiresIn=60)
        body = self.assertOK(self.call("POST", "/v1/token", mail, token=token))
        self.assertEqual(self.store.tokens[body["id"]].expires, NOW + 60)

    def test_mintNoWiderAddresses(self):
        """A restricted token mints only within its networks (inherited when none are asked)."""
        token = self.addToken(None, ("*",), addresses=("127.0.0.0/8",))
        before = self.store.snapshot()
        for scopes in (["api"], ["imap-proxy"]):
            wide = tokenBody(scopes=scopes, restrictions={"addresses": ["10.0.0.0/8"]})
            self.assertError(self.call("POST", "/v1/token", wide, token=token), 403)
            wider = tokenBody(scopes=scopes, restrictions={"addresses": ["0.0.0.0/0"]})
            self.assertError(self.call("POST", "/v1/token", wider, token=token), 403)
        self.assertEqual(self.store.snapshot(), before)
        body = self.assertOK(self.call("POST", "/v1/token", tokenBody(), token=token))
        self.assertEqual(self.store.tokens[body["id"]].addresses, ("127.0.0.0/8",))
        narrow = tokenBody(restrictions={"addresses": ["127.0.0.1"]})
        body = self.assertOK(self.call("POST", "/v1/token", narrow, token=token))
        self.assertEqual(self.store.tokens[body["id"]].addresses, ("127.0.0.1/32",))

    def test_mintTheReportedEscape(self):
        """A 120 s API token for 127.0.0.1 cannot mint an eternal, unrestricted IMAP token."""
        token = self.addToken(None, ("api",), addresses=("127.0.0.1/32",), expires=NOW + 120)
        escape = tokenBody(account="alice", restrictions={"addresses": ["0.0.0.0/0", "::/0"]})
        self.addAccount("alice")
        self.assertError(self.call("POST", "/v1/token", escape, token=token), 403)
        body = self.assertOK(
            self.call("POST", "/v1/token", tokenBody(account="alice"), token=token)
        )
        minted = self.store.tokens[body["id"]]
        self.assertEqual((minted.expires, minted.addresses), (NOW + 120, ("127.0.0.1/32",)))

    def test_unknownAccount(self):
        """A token for an unknown account is a 404 and stores nothing."""
        before = self.store.snapshot()
        self.assertError(self.call("POST", "/v1/token", tokenBody(account="nobody")), 404)
        self.assertEqual(self.store.snapshot(), before)

    # Bodies the API must refuse with 400; True where the OpenAPI schema can
    # say so too (and must).
    BAD_TOKEN_BODIES: list[tuple[str, Any, bool]] = [
        ("array", [], True),
        ("string", "token please", True),
        ("null", None, True),
        ("unknown field", tokenBody(admin=True), True),
        ("scopes missing", {"description": "x"}, True),
        ("scopes not a list", tokenBody(scopes="api"), True),
        ("scopes empty", tokenBody(scopes=[]), True),
        ("scope not a string", tokenBody(scopes=[1]), True),
        ("unknown scope", tokenBody(scopes=["imap-proxy", "root"]), True),
        ("description missing", {"scopes": ["api"]}, True),
        ("description empty", tokenBody(description=""), True),
        ("description blank", tokenBody(description="   "), True),
        ("description not a string", tokenBody(description=5), True),
        ("description control char", tokenBody(description="a\nb"), True),
        ("description too long", tokenBody(description="x" * 1025), True),
        ("restrictions not an object", tokenBody(restrictions=["10.0.0.0/8"]), True),
        ("restrictions unknown field", tokenBody(restrictions={"hosts": []}), True),
        ("addresses not a list", tokenBody(restrictions={"addresses": "10.0.0.0/8"}), True),
        ("address not a string", tokenBody(restrictions={"addresses": [10]}), True),
        ("prefix too long", tokenBody(restrictions={"addresses": ["10.0.0.0/33"]}), True),
        ("octet too big", tokenBody(restrictions={"addresses": ["300.1.1.1"]}), True),
        ("not an address", tokenBody(restrictions={"addresses": ["example.com"]}), True),
        ("IPv6 prefix too long", tokenBody(restrictions={"addresses": ["::1/129"]}), True),
        ("bad IPv6", tokenBody(restrictions={"addresses": ["2001:db8:::1"]}), True),
        ("too many addresses", tokenBody(restrictions={"addresses": ["10.0.0.1"] * 257}), True),
        ("expires malformed", tokenBody(expires="next tuesday"), True),
        ("expires without zone", tokenBody(expires="2030-01-01T00:00:00"), True),
        ("expires not a string", tokenBody(expires=1893456000), True),
        ("expires in the past", tokenBody(expires="2020-01-01T00:00:00Z"), False),
        ("expiresIn zero", tokenBody(expiresIn=0), True),
        ("expiresIn negative", tokenBody(expiresIn=-5), True),
        ("expiresIn fraction", tokenBody(expiresIn=1.5), True),
        ("expiresIn string", tokenBody(expiresIn="3600"), True),
        ("expiresIn boolean", tokenBody(expiresIn=True), True),
        ("expiresIn over ten years", tokenBody(expiresIn=10 * 365 * 86400 + 1), True),
        ("both expiries", tokenBody(expires="2030-01-01T00:00:00Z", expiresIn=60), True),
        ("account not a string", tokenBody(account=7), True),
        ("account empty", tokenBody(account=""), True),
    ]

    def test_badBodies(self):
        """Each invalid token request gets a 400 JSON error, stores nothing, and the spec agrees."""
        before = self.store.snapshot()
        for name, body, expressible in self.BAD_TOKEN_BODIES:
            for path in ["/v1/token", "/v1/tokens"]:
                reply = self.call("POST", path, body)
                self.assertEqual(reply.status, 400, f"{name}: {reply.text}")
                self.assertError(reply, 400)
            if expressible:
                errors = schemaErrors(requestSchema("POST", "/v1/token"), body, write=True)
                self.assertNotEqual(errors, [], f"the OpenAPI schema accepts {name}")
        self.assertEqual(self.store.snapshot(), before)

    def test_malformedBodies(self):
        """A body that is not JSON (or not UTF-8, or empty) gets a 400 JSON error."""
        before = self.store.snapshot()
        for data in [b"", b"   ", b"{", b"{'scopes': []}", b"\xff\xfe{}", b"[1,]", b"NaN garbage"]:
            self.assertError(self.call("POST", "/v1/token", data=data), 400)
        self.assertEqual(self.store.snapshot(), before)

    def test_deeplyNestedBody(self):
        """A small but deeply nested JSON body is a 400, not a server error."""
        reply = self.call("POST", "/v1/token", data=b"[" * 50_000)
        self.assertError(reply, 400)


# -- accounts -----------------------------------------------------------------


class AccountTests(APITestCase):
    def create(self, body: dict[str, Any], path: str = "/v1/account") -> dict[str, Any]:
        self.assertEqual(
            schemaErrors(requestSchema("POST", path), body, write=True), [], "spec rejects it"
        )
        reply = self.call("POST", path, body)
        self.assertNotIn(CLIENT_SECRET, reply.text)
        self.assertNotIn(REFRESH_TOKEN, reply.text)
        return self.assertOK(reply)  # type: ignore[no-any-return]

    def test_create(self):
        """POST /v1/account stores the account and answers its view, secrets only as set."""
        body = self.create(
            accountBody(
                "alice",
                imap={
                    "host": "mail.example.net",
                    "port": 143,
                    "tls": "starttls",
                    "caFile": "/etc/ca.pem",
                },
            )
        )
        self.assertEqual(
            body,
            {
                "account": "alice",
                "email": "alice@example.com",
                "imap": {
                    "host": "mail.example.net",
                    "port": 143,
                    "tls": "starttls",
                    "caFile": "/etc/ca.pem",
                    "maxConnections": None,
                },
                "smtp": None,
                "oauth2": {
                    "app": None,
                    "tokenUrl": "https://oauth.example.com/token",
                    "clientId": "client-1",
                    "clientSecretSet": True,
                    "refreshTokenSet": True,
                    "scopes": ["https://mail.example.com/"],
                },
                "state": "ok",
                "stateReason": None,
                "created": "2025-06-15T15:06:40Z",
                "updated": "2025-06-15T15:06:40Z",
            },
        )
        stored = self.store.accounts["alice"]
        self.assertEqual(stored.oauth2.clientSecret, CLIENT_SECRET)
        self.assertEqual(stored.oauth2.refreshToken, REFRESH_TOKEN)

    def test_createAlias(self):
        """POST /v1/accounts creates an account like POST /v1/account."""
        self.create(accountBody("bob"), "/v1/accounts")
        self.assertIn("bob", self.store.accounts)

    def test_createDuplicate(self):
        """Creating an account that exists is a 409 and keeps the stored one."""
        self.addAccount("alice")
        before = self.store.snapshot()
        self.assertError(self.call("POST", "/v1/account", accountBody("alice", email="x@y")), 409)
        self.assertEqual(self.store.snapshot(), before)

    def test_gmailPreset(self):
        """provider gmail fills in Gmail's IMAP host, port, TLS, token URL and scope."""
        body = self.create(
            {
                "account": "g",
                "email": "g@gmail.com",
                "provider": "gmail",
                "oauth2": {"clientId": "c", "clientSecret": "s", "refreshToken": "r"},
            }
        )
        self.assertEqual(
            body["imap"],
            {
                "host": "imap.gmail.com",
                "port": 993,
                "tls": "implicit",
                "caFile": None,
                "maxConnections": None,
            },
        )
        self.assertEqual(body["oauth2"]["tokenUrl"], "https://oauth2.googleapis.com/token")
        self.assertEqual(body["oauth2"]["scopes"], ["https://mail.google.com/"])
        self.assertEqual(
            body["smtp"],
            {
                "host": "smtp.gmail.com",
                "port": 465,
                "tls": "implicit",
                "caFile": None,
                "maxConnections": None,
            },
        )

    def test_outlookPreset(self):
        """provider outlook fills in Microsoft's IMAP host and the tenant's token URL."""
        body = self.create(
            {
                "account": "o",
                "email": "o@contoso.com",
                "provider": "outlook",
                "tenant": "contoso.onmicrosoft.com",
                "oauth2": {"clientId": "c", "clientSecret": "s", "refreshToken": "r"},
            }
        )
        self.assertEqual(body["imap"]["host"], "outlook.office365.com")
        self.assertEqual(body["imap"]["port"], 993)
        self.assertEqual(
            body["oauth2"]["tokenUrl"],
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token",
        )
        self.assertIn("offline_access", body["oauth2"]["scopes"])
        # One grant reads and sends: the SMTP scope is asked for beside IMAP's.
        self.assertIn("https://outlook.office.com/IMAP.AccessAsUser.All", body["oauth2"]["scopes"])
        self.assertIn("https://outlook.office.com/SMTP.Send", body["oauth2"]["scopes"])
        self.assertEqual(
            body["smtp"],
            {
                "host": "smtp.office365.com",
                "port": 587,
                "tls": "starttls",
                "caFile": None,
                "maxConnections": None,
            },
        )

    def test_outlookDefaultTenant(self):
        """Without a tenant the outlook preset uses the common endpoint."""
        body = self.create(
            {
                "account": "o2",
                "email": "o2@outlook.com",
                "provider": "outlook",
                "oauth2": {"clientId": "c", "clientSecret": "s", "refreshToken": "r"},
            }
        )
        self.assertEqual(
            body["oauth2"]["tokenUrl"],
            "https://login.microsoftonline.com/common/oauth2/v2.0/token",
        )

    def test_presetOverridden(self):
        """Fields given explicitly win over the preset's."""
        body = self.create(
            {
                "account": "g2",
                "email": "g2@gmail.com",
                "provider": "gmail",
                "imap": {"port": 1993},
                "oauth2": {"clientId": "c", "clientSecret": "s", "refreshToken": "r"},
            }
        )
        self.assertEqual(body["imap"]["host"], "imap.gmail.com")
        self.assertEqual(body["imap"]["port"], 1993)

    def test_createWithSMTP(self):
        """An account's smtp object is stored; a port left out follows its TLS mode."""
        smtp = {
            "host": "smtp.example.net",
            "tls": "starttls",
            "caFile": "/etc/smtp-ca.pem",
            "maxConnections": 3,
        }
        body = self.create(accountBody("alice", smtp=smtp))
        self.assertEqual(body["smtp"], {**smtp, "port": 587})
        self.assertEqual(
            self.store.accounts["alice"].smtp,
            Upstream(
                host="smtp.example.net",
                port=587,
                tls="starttls",
                caFile="/etc/smtp-ca.pem",
                maxConnections=3,
            ),
        )
        body = self.create(accountBody("bob", smtp={"host": "smtp.example.net"}))
        self.assertEqual(
            body["smtp"],
            {
                "host": "smtp.example.net",
                "port": 465,
                "tls": "implicit",
                "caFile": None,
                "maxConnections": None,
            },
        )
        body = self.create(accountBody("carol", smtp={"host": "localhost", "port": 2525}))
        self.assertEqual((body["smtp"]["port"], body["smtp"]["tls"]), (2525, "implicit"))

    def test_createWithoutSMTP(self):
        """Without smtp (or with null, even under a preset) an account has no SMTP server."""
        self.assertIsNone(self.create(accountBody("alice"))["smtp"])
        body = self.create(
            {
                "account": "g",
                "email": "g@gmail.com",
                "provider": "gmail",
                "smtp": None,
                "oauth2": {"clientId": "c", "clientSecret": "s", "refreshToken": "r"},
            }
        )
        self.assertIsNone(body["smtp"])
        self.assertIsNone(self.store.accounts["g"].smtp)

    def test_presetSMTPOverridden(self):
        """smtp fields given win over the preset's; the rest come from it."""
        body = self.create(
            {
                "account": "o",
                "email": "o@contoso.com",
                "provider": "outlook",
                "smtp": {"port": 25},
                "oauth2": {"clientId": "c", "clientSecret": "s", "refreshToken": "r"},
            }
        )
        self.assertEqual(
            body["smtp"],
            {
                "host": "smtp.office365.com",
                "port": 25,
                "tls": "starttls",
                "caFile": None,
                "maxConnections": None,
            },
        )

    def test_putSetsChangesAndRemovesSMTP(self):
        """PUT smtp adds a server, changes the fields it names, null removes it; the rest stays."""
        self.addAccount("alice")
        before = self.store.accounts["alice"]
        put = "/v1/account/alice"
        body = self.assertOK(self.call("PUT", put, {"smtp": {"host": "smtp.example.com"}}))
        self.assertEqual(
            body["smtp"],
            {
                "host": "smtp.example.com",
                "port": 465,
                "tls": "implicit",
                "caFile": None,
                "maxConnections": None,
            },
        )
        stored = self.store.accounts["alice"]
        self.assertEqual(
            (stored.oauth2, stored.upstream, stored.email, stored.state),
            (before.oauth2, before.upstream, before.email, before.state),
        )
        body = self.assertOK(self.call("PUT", put, {"smtp": {"port": 2465}}))
        self.assertEqual((body["smtp"]["host"], body["smtp"]["port"]), ("smtp.example.com", 2465))
        # A new TLS mode without a port takes that mode's port.
        body = self.assertOK(self.call("PUT", put, {"smtp": {"tls": "starttls"}}))
        self.assertEqual((body["smtp"]["tls"], body["smtp"]["port"]), ("starttls", 587))
        # A change elsewhere keeps it.
        body = self.assertOK(self.call("PUT", put, {"email": "a2@example.com"}))
        self.assertEqual(body["smtp"]["host"], "smtp.example.com")
        body = self.assertOK(self.call("PUT", put, {"smtp": None}))
        self.assertIsNone(body["smtp"])
        self.assertIsNone(self.store.accounts["alice"].smtp)
        self.assertEqual(self.store.accounts["alice"].oauth2, before.oauth2)

    def test_putProviderAgainSetsItsSMTP(self):
        """Naming a provider again in a PUT brings its SMTP server, as it does its IMAP one."""
        self.addAccount("alice")
        body = self.assertOK(self.call("PUT", "/v1/account/alice", {"provider": "gmail"}))
        self.assertEqual((body["smtp"]["host"], body["smtp"]["port"]), ("smtp.gmail.com", 465))

    def test_accountTokenMayNotChangeSMTP(self):
        """An account's own token may not set its servers (403), nor start a consent that does."""
        self.addAccount("alice")
        token = self.addToken("alice")
        before = self.store.snapshot()
        reply = self.call("PUT", "/v1/account/alice", {"smtp": {"host": "evil"}}, token=token)
        self.assertError(reply, 403)
        for servers in ({"smtp": {"host": "evil"}}, {"imap": {"host": "evil"}}):
            reply = self.call(
                "POST",
                "/v1/oauth2/authorize",
                {"app": "x", "account": "alice", **servers},
                token=token,
            )
            self.assertError(reply, 403)
            self.assertIn("may not set imap or smtp", reply.json["error"])
        self.assertEqual(self.store.snapshot(), before)

    def test_get(self):
        """GET /v1/account/{id} shows the account without its secrets."""
        self.addAccount("alice")
        reply = self.call("GET", "/v1/account/alice")
        body = self.assertOK(reply)
        self.assertEqual(body["account"], "alice")
        self.assertTrue(body["oauth2"]["clientSecretSet"])
        self.assertNotIn(CLIENT_SECRET, reply.text)
        self.assertNotIn(REFRESH_TOKEN, reply.text)

    def test_getUnknown(self):
        """An unknown account is a 404 on GET, PUT and DELETE."""
        self.assertError(self.call("GET", "/v1/account/nobody"), 404)
        self.assertError(self.call("PUT", "/v1/account/nobody", {"state": "disabled"}), 404)
        self.assertError(self.call("DELETE", "/v1/account/nobody"), 404)
        self.assertEqual(self.store.accounts, {})
        self.assertEqual(self.sessions.calls, [])

    def test_list(self):
        """GET /v1/accounts lists every account by id for a root token, without secrets."""
        self.addAccount("bob")
        self.addAccount("alice")
        reply = self.call("GET", "/v1/accounts")
        body = self.assertOK(reply)
        self.assertEqual([a["account"] for a in body["accounts"]], ["alice", "bob"])
        self.assertNotIn(CLIENT_SECRET, reply.text)
        self.assertNotIn(REFRESH_TOKEN, reply.text)

    def test_listEmpty(self):
        """With no accounts the list is empty."""
        self.assertEqual(self.assertOK(self.call("GET", "/v1/accounts")), {"accounts": []})

    def test_putKeepsSecrets(self):
        """PUT changes the fields it names and keeps the secrets it does not."""
        self.addAccount("alice")
        reply = self.call("PUT", "/v1/account/alice", {"email": "new@example.com"})
        body = self.assertOK(reply)
        self.assertEqual(body["email"], "new@example.com")
        self.assertEqual(body["imap"]["host"], "imap.example.com")
        self.assertTrue(body["oauth2"]["refreshTokenSet"])
        stored = self.store.accounts["alice"]
        self.assertEqual(stored.email, "new@example.com")
        self.assertEqual(stored.oauth2.clientSecret, CLIENT_SECRET)
        self.assertEqual(stored.oauth2.refreshToken, REFRESH_TOKEN)
        self.assertEqual(stored.created, NOW)

    def test_putReplacesSecret(self):
        """A secret given in a PUT replaces the stored one and is not echoed."""
        self.addAccount("alice")
        reply = self.call("PUT", "/v1/account/alice", {"oauth2": {"refreshToken": "rt-new-9f8e"}})
        self.assertOK(reply)
        self.assertNotIn("rt-new-9f8e", reply.text)
        stored = self.store.accounts["alice"]
        self.assertEqual(stored.oauth2.refreshToken, "rt-new-9f8e")
        self.assertEqual(stored.oauth2.clientSecret, CLIENT_SECRET)

    def test_putDisable(self):
        """PUT state disabled disables the account; ok enables it again."""
        self.addAccount("alice")
        self.assertEqual(
            self.assertOK(self.call("PUT", "/v1/account/alice", {"state": "disabled"}))["state"],
            "disabled",
        )
        self.assertEqual(
            self.assertOK(self.call("PUT", "/v1/account/alice", {"state": "ok"}))["state"], "ok"
        )

    def test_putReauthRequired(self):
        """A new refresh token ends reauth-required: the account is ok again, reason cleared."""
        self.addAccount("alice", state="reauth-required", stateReason="invalid-grant")
        reply = self.call("PUT", "/v1/account/alice", {"oauth2": {"refreshToken": "rt-fresh"}})
        body = self.assertOK(reply)
        self.assertEqual((body["state"], body["stateReason"]), ("ok", None))
        self.assertEqual(self.store.accounts["alice"].oauth2.refreshToken, "rt-fresh")

    def test_putKeepsReauthRequired(self):
        """A PUT without a new grant (or state) leaves reauth-required and its reason."""
        self.addAccount("alice", state="reauth-required", stateReason="invalid-grant")
        body = self.assertOK(self.call("PUT", "/v1/account/alice", {"email": "a@example.org"}))
        self.assertEqual((body["state"], body["stateReason"]), ("reauth-required", "invalid-grant"))

    def test_putAccountMismatch(self):
        """A PUT whose body names another account is a 400 and changes nothing."""
        self.addAccount("alice")
        before = self.store.snapshot()
        self.assertError(self.call("PUT", "/v1/account/alice", {"account": "bob"}), 400)
        self.assertEqual(self.store.snapshot(), before)

    def test_putSameAccount(self):
        """A PUT whose body repeats the account id is accepted."""
        self.addAccount("alice")
        self.assertOK(self.call("PUT", "/v1/account/alice", {"account": "alice", "tenant": "x"}))

    def test_delete(self):
        """DELETE removes the account and its tokens and closes its sessions."""
        self.addAccount("alice")
        self.addAccount("bob")
        aliceToken = self.addToken("alice", ("imap-proxy",))
        bobToken = self.addToken("bob", ("imap-proxy",))
        body = self.assertOK(self.call("DELETE", "/v1/account/alice"))
        self.assertEqual(body, {"deleted": True, "disconnected": 2})
        self.assertEqual(self.sessions.calls, [{"account": "alice", "tokenId": None}])
        self.assertNotIn("alice", self.store.accounts)
        self.assertNotIn(tokenId(aliceToken), self.store.tokens)
        self.assertIn(tokenId(bobToken), self.store.tokens)
        self.assertError(self.call("GET", "/v1/account/alice"), 404)

    def test_deleteOwnRefused(self):
        """An account token may not delete its own account (403); nothing is removed."""
        self.addAccount("alice")
        token = self.addToken("alice")
        before = self.store.snapshot()
        self.assertError(self.call("DELETE", "/v1/account/alice", token=token), 403)
        self.assertEqual(self.store.snapshot(), before)
        self.assertEqual(self.sessions.calls, [])

    def test_secretsNeverShown(self):
        """No answer of any route shows a client secret or refresh token that was sent."""
        seen = []
        seen.append(self.call("POST", "/v1/account", accountBody("alice")))
        seen.append(self.call("POST", "/v1/account", accountBody("alice")))  # 409
        seen.append(self.call("GET", "/v1/account/alice"))
        seen.append(self.call("GET", "/v1/accounts"))
        seen.append(self.call("PUT", "/v1/account/alice", {"email": "a2@example.com"}))
        seen.append(
            self.call("PUT", "/v1/account/alice", {"oauth2": {"clientSecret": CLIENT_SECRET}})
        )
        seen.append(
            self.call(
                "PUT",
                "/v1/account/alice",
                {"oauth2": {"clientSecret": CLIENT_SECRET, "tokenUrl": "http://x"}},
            )
        )
        seen.append(self.call("POST", "/v1/token", tokenBody(account="alice")))
        seen.append(self.call("GET", "/v1/tokens"))
        seen.append(self.call("DELETE", "/v1/account/alice"))
        self.assertEqual(
            [r.status for r in seen], [200, 409, 200, 200, 200, 200, 400, 200, 200, 200]
        )
        for reply in seen:
            self.assertNotIn(CLIENT_SECRET, reply.text)
            self.assertNotIn(REFRESH_TOKEN, reply.text)
            self.assertNotIn(self.root, reply.text)

    BAD_ACCOUNT_BODIES: list[tuple[str, Any, bool]] = [
        ("array", [accountBody()], True),
        ("unknown field", accountBody(password="x"), True),
        ("unknown imap field", accountBody(imap={"host": "h", "user": "u"}), True),
        ("unknown oauth2 field", accountBody(oauth2={**accountBody()["oauth2"], "x": 1}), True),
        ("imap not an object", accountBody(imap="imap.example.com"), True),
        ("oauth2 not an object", accountBody(oauth2=[]), True),
        ("account missing", {k: v for k, v in accountBody().items() if k != "account"}, True),
        ("account empty", accountBody(""), True),
        ("account with slash", accountBody("a/b"), True),
        ("account path trick", accountBody("../etc"), True),
        ("account leading dash", accountBody("-alice"), True),
        ("account with space", accountBody("al ice"), True),
        ("account too long", accountBody("a" * 129), True),
        ("account not a string", accountBody(12), True),
        ("email missing", {k: v for k, v in accountBody().items() if k != "email"}, True),
        ("email without @", accountBody(email="alice.example.com"), True),
        ("email with space", accountBody(email="al ice@example.com"), True),
        ("host missing", accountBody(imap={"port": 993}), True),
        ("host with slash", accountBody(imap={"host": "a/b"}), True),
        ("host not a string", accountBody(imap={"host": 1}), True),
        ("port zero", accountBody(imap={"host": "h", "port": 0}), True),
        ("port too big", accountBody(imap={"host": "h", "port": 65536}), True),
        ("port string", accountBody(imap={"host": "h", "port": "993"}), True),
        ("port boolean", accountBody(imap={"host": "h", "port": True}), True),
        ("tls unknown", accountBody(imap={"host": "h", "tls": "ssl"}), True),
        ("caFile relative", accountBody(imap={"host": "h", "caFile": "ca.pem"}), True),
        ("smtp not an object", accountBody(smtp="smtp.example.com"), True),
        ("unknown smtp field", accountBody(smtp={"host": "h", "user": "u"}), True),
        ("smtp host missing", accountBody(smtp={"port": 465}), False),
        ("smtp host with slash", accountBody(smtp={"host": "a/b"}), True),
        ("smtp port zero", accountBody(smtp={"host": "h", "port": 0}), True),
        ("smtp port too big", accountBody(smtp={"host": "h", "port": 65536}), True),
        ("smtp port string", accountBody(smtp={"host": "h", "port": "465"}), True),
        ("smtp tls unknown", accountBody(smtp={"host": "h", "tls": "ssl"}), True),
        ("smtp plain elsewhere", accountBody(smtp={"host": "h", "tls": "plain"}), False),
        ("smtp caFile relative", accountBody(smtp={"host": "h", "caFile": "ca.pem"}), True),
        (
            "tokenUrl http",
            accountBody(oauth2={**accountBody()["oauth2"], "tokenUrl": "http://x"}),
            True,
        ),
        (
            "tokenUrl missing",
            accountBody(oauth2={"clientId": "c", "clientSecret": "s", "refreshToken": "r"}),
            True,
        ),
        (
            "clientId missing",
            accountBody(oauth2={"tokenUrl": "https://t", "clientSecret": "s", "refreshToken": "r"}),
            True,
        ),
        (
            "clientSecret missing",
            accountBody(oauth2={"tokenUrl": "https://t", "clientId": "c", "refreshToken": "r"}),
            True,
        ),
        (
            "refreshToken missing",
            accountBody(oauth2={"tokenUrl": "https://t", "clientId": "c", "clientSecret": "s"}),
            True,
        ),
        (
            "refreshToken empty",
            accountBody(oauth2={**accountBody()["oauth2"], "refreshToken": ""}),
            True,
        ),
        (
            "clientSecret not a string",
            accountBody(oauth2={**accountBody()["oauth2"], "clientSecret": 5}),
            True,
        ),
        (
            "oauth2 scope with space",
            accountBody(oauth2={**accountBody()["oauth2"], "scopes": ["a b"]}),
            True,
        ),
        (
            "oauth2 scopes not a list",
            accountBody(oauth2={**accountBody()["oauth2"], "scopes": "mail"}),
            True,
        ),
        ("provider unknown", accountBody(provider="yahoo"), True),
        ("tenant bad", accountBody(provider="outlook", tenant="a/b"), True),
        ("tenant not a string", accountBody(provider="outlook", tenant=1), True),
        ("state unknown", accountBody(state="reauth-required"), True),
    ]

    def test_badBodies(self):
        """Each invalid account gets a 4xx JSON error, stores nothing, and the spec agrees."""
        for name, body, expressible in self.BAD_ACCOUNT_BODIES:
            for path in ["/v1/account", "/v1/accounts"]:
                reply = self.call("POST", path, body)
                self.assertEqual(reply.status, 400, f"{name}: {reply.text}")
                self.assertError(reply, 400)
            if expressible:
                errors = schemaErrors(requestSchema("POST", "/v1/account"), body, write=True)
                self.assertNotEqual(errors, [], f"the OpenAPI schema accepts {name}")
        self.assertEqual(self.store.accounts, {})

    def test_badUpdates(self):
        """Each invalid update gets a 400 JSON error and leaves the account as it was."""
        self.addAccount("alice")
        before = self.store.snapshot()
        for name, body in [
            ("not an object", "disabled"),
            ("unknown field", {"secret": "x"}),
            ("port string", {"imap": {"port": "1"}}),
            ("tokenUrl http", {"oauth2": {"tokenUrl": "http://t"}}),
            ("state unknown", {"state": "gone"}),
            ("empty secret", {"oauth2": {"refreshToken": ""}}),
            ("smtp without a host", {"smtp": {"tls": "starttls"}}),
            ("smtp port string", {"smtp": {"host": "h", "port": "1"}}),
            ("smtp plain elsewhere", {"smtp": {"host": "smtp.example.com", "tls": "plain"}}),
        ]:
            reply = self.call("PUT", "/v1/account/alice", body)
            self.assertEqual(reply.status, 400, f"{name}: {reply.text}")
            self.assertError(reply, 400)
        self.assertEqual(self.store.snapshot(), before)

    def test_providerNotAString(self):
        """A provider that is not a string is a 400 on create and update, not a server error."""
        self.addAccount("alice")
        before = self.store.snapshot()
        self.assertError(self.call("POST", "/v1/account", accountBody("bob", provider=[])), 400)
        self.assertError(self.call("PUT", "/v1/account/alice", {"provider": {}}), 400)
        self.assertEqual(self.store.snapshot(), before)

    def test_malformedBodies(self):
        """A POST or PUT body that is not JSON gets a 400 JSON error."""
        self.addAccount("alice")
        before = self.store.snapshot()
        for data in [b"", b"{", b"\x00", b'{"account": "bob",}']:
            self.assertError(self.call("POST", "/v1/account", data=data), 400)
            self.assertError(self.call("PUT", "/v1/account/alice", data=data), 400)
        self.assertEqual(self.store.snapshot(), before)


# -- shared OAuth2 apps and onboarding ----------------------------------------------


def appBody(app: str = "corp", **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "app": app,
        "provider": "outlook",
        "tenant": "contoso.onmicrosoft.com",
        "clientId": "app-client",
        "clientSecret": CLIENT_SECRET,
        "redirectUrl": "https://proxy.example.com/oauth2/callback",
    }
    body.update(over)
    return body


class AppTests(APITestCase):
    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        self.assertEqual(
            schemaErrors(requestSchema("POST", "/v1/oauth2"), body, write=True), [], "spec"
        )
        reply = self.call("POST", "/v1/oauth2", body)
        self.assertNotIn(CLIENT_SECRET, reply.text)
        return self.assertOK(reply)  # type: ignore[no-any-return]

    def test_create(self):
        """POST /v1/oauth2 registers an app, the preset filling its URLs, the secret hidden."""
        body = self.create(appBody())
        base = "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/"
        self.assertEqual(body["app"], "corp")
        self.assertEqual(body["tokenUrl"], base + "token")
        self.assertEqual(body["authorizationUrl"], base + "authorize")
        self.assertEqual(body["deviceAuthorizationUrl"], base + "devicecode")
        self.assertTrue(body["clientSecretSet"])
        self.assertNotIn("clientSecret", body)
        self.assertEqual(self.store.apps["corp"].clientSecret, CLIENT_SECRET)

    def test_genericNeedsTokenUrl(self):
        """A generic app without tokenUrl is a 400 and nothing is stored."""
        body = appBody(provider="generic")
        del body["tenant"]
        self.assertError(self.call("POST", "/v1/oauth2", body), 400)
        self.assertNotEqual(schemaErrors(requestSchema("POST", "/v1/oauth2"), body, write=True), [])
        self.assertEqual(self.store.apps, {})

    def test_oddUrlsForPresets(self):
        """A preset app's own URL with braces is kept or refused (400); a non-string is a 400."""
        for n, url in enumerate(["https://idp.example.com/{0}", "https://idp.example.com/{x}"]):
            reply = self.call("POST", "/v1/oauth2", appBody(f"a{n}", tokenUrl=url))
            self.assertIn(reply.status, (200, 400), reply.text)
            if reply.status == 200:
                self.assertEqual(reply.json["tokenUrl"], url)
        self.assertError(self.call("POST", "/v1/oauth2", appBody("b", tokenUrl=5)), 400)
        self.assertNotIn("b", self.store.apps)

    def test_duplicate(self):
        """Registering an app id twice is a 409."""
        self.create(appBody())
        before = self.store.snapshot()
        self.assertError(self.call("POST", "/v1/oauth2", appBody(clientId="other")), 409)
        self.assertEqual(self.store.snapshot(), before)

    def test_readAndDelete(self):
        """Apps are listed, shown and removed; an unknown app is a 404."""
        self.create(appBody("b"))
        self.create(appBody("a"))
        apps = self.assertOK(self.call("GET", "/v1/oauth2"))["apps"]
        self.assertEqual([a["app"] for a in apps], ["a", "b"])
        self.assertEqual(self.assertOK(self.call("GET", "/v1/oauth2/a"))["app"], "a")
        self.assertEqual(self.assertOK(self.call("DELETE", "/v1/oauth2/a")), {"deleted": True})
        self.assertNotIn("a", self.store.apps)
        self.assertError(self.call("GET", "/v1/oauth2/a"), 404)
        self.assertError(self.call("DELETE", "/v1/oauth2/a"), 404)

    def test_rootOnly(self):
        """Account tokens get 403 on every app route and change nothing."""
        self.addAccount("alice")
        self.create(appBody())
        token = self.addToken("alice")
        before = self.store.snapshot()
        self.assertError(self.call("POST", "/v1/oauth2", appBody("x"), token=token), 403)
        self.assertError(self.call("GET", "/v1/oauth2", token=token), 403)
        self.assertError(self.call("GET", "/v1/oauth2/corp", token=token), 403)
        self.assertError(self.call("DELETE", "/v1/oauth2/corp", token=token), 403)
        self.assertEqual(self.store.snapshot(), before)

    def test_accountOfApp(self):
        """An account of an app gives only its refresh token; the client side is the app's."""
        self.create(appBody())
        body = {
            "account": "alice",
            "email": "alice@contoso.com",
            "oauth2": {"app": "corp", "refreshToken": REFRESH_TOKEN},
        }
        self.assertEqual(schemaErrors(requestSchema("POST", "/v1/account"), body, write=True), [])
        reply = self.call("POST", "/v1/account", body)
        view = self.assertOK(reply)
        self.assertEqual(view["imap"]["host"], "outlook.office365.com")
        self.assertEqual(view["oauth2"]["clientId"], "app-client")
        self.assertNotIn(REFRESH_TOKEN, reply.text)
        self.assertNotIn(CLIENT_SECRET, reply.text)
        self.assertEqual(view["oauth2"]["app"], "corp")
        self.assertEqual(self.store.accounts["alice"].oauth2.app, "corp")
        # ... and the app cannot go while the account uses it.
        self.assertError(self.call("DELETE", "/v1/oauth2/corp"), 409)
        self.assertIn("corp", self.store.apps)

    def test_accountOfUnknownApp(self):
        """An account naming an unknown app is a 404 and is not stored."""
        body = {"account": "alice", "email": "a@x", "oauth2": {"app": "nope", "refreshToken": "r"}}
        self.assertError(self.call("POST", "/v1/account", body), 404)
        self.assertEqual(self.store.accounts, {})

    def test_accountOfAppWithClient(self):
        """An account of an app may not bring its own client fields (400)."""
        self.create(appBody())
        body = {
            "account": "alice",
            "email": "a@x",
            "oauth2": {"app": "corp", "refreshToken": "r", "clientId": "mine"},
        }
        self.assertError(self.call("POST", "/v1/account", body), 400)
        self.assertNotEqual(
            schemaErrors(requestSchema("POST", "/v1/account"), body, write=True), []
        )
        self.assertEqual(self.store.accounts, {})

    def test_authorizeWithoutOnboarding(self):
        """Starting a consent where onboarding is not configured is a JSON 503."""
        self.create(appBody())
        reply = self.call("POST", "/v1/oauth2/authorize", {"app": "corp", "account": "alice"})
        self.assertError(reply, 503)

    def test_authorizeOtherAccount(self):
        """An account token may not start a consent for another account (403)."""
        self.addAccount("alice")
        token = self.addToken("alice")
        reply = self.call(
            "POST", "/v1/oauth2/authorize", {"app": "x", "account": "bob"}, token=token
        )
        self.assertError(reply, 403)

    def test_callbackWithoutOnboarding(self):
        """The provider's redirect needs no token and answers an HTML page, never a token."""
        reply = self.call("GET", "/oauth2/callback?state=x&code=y", token=None)
        self.assertEqual(reply.status, 503)
        self.assertEqual(
            reply.headers.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"]
        )


# -- errors, routing, the description -----------------------------------------------


class RoutingTests(APITestCase):
    def test_unknownRoute(self):
        """An unknown path is a JSON 404."""
        for path in ["/", "/v1", "/v2/tokens", "/v1/accounts/alice", "/v1/token/a/b", "/nope"]:
            self.assertError(self.call("GET", path), 404)

    def test_wrongMethod(self):
        """A known path with a method it does not take is a JSON 405."""
        for method, path in [
            ("PUT", "/v1/tokens"),
            ("GET", "/v1/token"),
            ("POST", "/v1/account/alice"),
            ("PATCH", "/v1/account/alice"),
            ("DELETE", "/v1/accounts"),
            ("POST", "/health"),
        ]:
            self.assertError(self.call(method, path), 405)

    def test_pathTricks(self):
        """Encoded slashes, dot segments and odd ids reach no other account; nothing changes."""
        self.addAccount("alice")
        before = self.store.snapshot()
        for path in [
            "/v1/account/alice%2F..%2Fbob",
            "/v1/account/..%2Falice",
            "/v1/account/%2e%2e",
            "/v1/account/alice%00",
            "/v1/account/alice/",
            "/v1/account/ALICE",
        ]:
            for method in ["GET", "DELETE"]:
                reply = self.call(method, path)
                self.assertIn(reply.status, (400, 404), f"{method} {path}: {reply.text}")
                self.assertError(reply, reply.status)
        self.assertEqual(self.store.snapshot(), before)
        self.assertEqual(self.sessions.calls, [])

    def test_jsonHeaders(self):
        """Answers are JSON and not to be cached (they may describe tokens)."""
        reply = self.call("GET", "/v1/tokens")
        self.assertEqual(reply.headers.getRawHeaders(b"cache-control"), [b"no-store"])
        self.assertError(self.call("GET", "/v1/tokens", token=None), 401)

    def test_openapiServed(self):
        """/openapi.json serves the packaged description byte for byte."""
        reply = self.call("GET", "/openapi.json", token=None)
        self.assertOK(reply)
        with open(OPENAPI_PATH, "rb") as f:
            self.assertEqual(reply.raw, f.read())


class OpenAPITests(SynchronousTestCase):
    def test_docsIsTheSameFile(self):
        """docs/openapi.json is the packaged description (one source)."""
        self.assertEqual(os.path.realpath(DOCS_OPENAPI), os.path.realpath(OPENAPI_PATH))

    def test_validOpenAPI3(self):
        """The description is a valid OpenAPI 3.0 document."""
        self.assertEqual(SPEC["openapi"], "3.0.3")
        validateSpec(SPEC)

    def test_routesAgree(self):
        """Every Klein route and method is described, and every description is a route."""
        routes = set()
        for rule in TokenAPI.app.url_map.iter_rules():
            path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
            for method in rule.methods - {"HEAD", "OPTIONS"}:
                routes.add((method.lower(), path))
        described = {
            (method, path)
            for path, item in SPEC["paths"].items()
            for method in item
            if method in {"get", "put", "post", "delete", "patch", "head", "options"}
        }
        self.assertEqual(routes - described, set(), "routes missing from the description")
        self.assertEqual(described - routes, set(), "described operations with no route")

    def test_securityDescribed(self):
        """/v1 operations need the bearer token, /metrics may; /health, /openapi.json not."""
        self.assertEqual(SPEC["security"], [{"bearerAuth": []}])
        scheme = SPEC["components"]["securitySchemes"]["bearerAuth"]
        self.assertEqual((scheme["type"], scheme["scheme"]), ("http", "bearer"))
        for path, item in SPEC["paths"].items():
            for method, op in item.items():
                if method == "parameters":
                    continue
                if path.startswith("/v1/"):
                    self.assertNotIn("security", op, f"{method} {path}")
                    self.assertIn("401", op["responses"], f"{method} {path}")
                    self.assertIn("403", op["responses"], f"{method} {path}")
                elif path == "/metrics":
                    # A token (scope metrics), or none from loopback.
                    self.assertEqual(op["security"], [{}, {"bearerAuth": []}])
                else:
                    self.assertEqual(op["security"], [], f"{method} {path}")

    @settings(max_examples=200, deadline=None, database=None)
    @given(
        st.one_of(
            *[
                st.from_regex(p["pattern"], fullmatch=True)
                for p in SPEC["components"]["schemas"]["Network"]["anyOf"]
            ]
        )
    )
    def test_networkPatternAccepted(self, address):
        """Every address the description's Network pattern admits, the API accepts."""
        self.assertEqual(len(parseNetworks([address])), 1)


# -- the body limit (only the real Site installs it) ----------------------------------


class BodyLimitTests(APITestCase):
    """Requests through ``TokenAPI.site()`` over a StringTransport."""

    def raw(self, request: bytes, peer: Any = None) -> tuple[int, bytes]:
        site = self.api.site()
        site.reactor = self.clock  # timeouts go to the fake clock
        peer = peer or IPv4Address("TCP", "127.0.0.1", 40000)
        protocol = site.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        protocol.makeConnection(transport)
        protocol.dataReceived(request)
        out = transport.value()
        protocol.connectionLost(Failure(ConnectionDone()))
        head, _, body = out.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        self.assertIn(b"content-type: application/json", head.lower())
        return status, body

    def post(self, body: bytes, token: str | None = None, chunked: bool = False) -> bytes:
        lines = [
            b"POST /v1/token HTTP/1.0",
            b"Host: api.example",
            b"Authorization: Bearer " + (token or self.root).encode(),
            b"Content-Type: application/json",
        ]
        if chunked:
            lines[0] = b"POST /v1/token HTTP/1.1"
            lines.append(b"Transfer-Encoding: chunked")
            lines.append(b"Connection: close")
            step = 8192
            pieces = [body[i : i + step] for i in range(0, len(body), step)]
            payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        else:
            lines.append(b"Content-Length: %d" % len(body))
            payload = body
        return b"\r\n".join(lines) + b"\r\n\r\n" + payload

    def test_underLimit(self):
        """A body under the limit is read and the token issued."""
        status, body = self.raw(self.post(json.dumps(tokenBody()).encode()))
        self.assertEqual(status, 200, body)
        self.assertIn(json.loads(body)["id"], self.store.tokens)

    def test_contentLengthTooLarge(self):
        """A Content-Length over the limit is refused with a JSON 413 and nothing stored."""
        before = self.store.snapshot()
        padded = json.dumps(tokenBody(description="x" * 1000, pad="y" * MAX_BODY)).encode()
        status, body = self.raw(self.post(padded))
        self.assertEqual(status, 413, body)
        self.assertEqual(json.loads(body)["statusCode"], 413)
        self.assertEqual(self.store.snapshot(), before)

    def test_chunkedTooLarge(self):
        """A chunked body that grows over the limit is refused with a JSON 413."""
        before = self.store.snapshot()
        padded = json.dumps(tokenBody(pad="y" * (MAX_BODY + 10))).encode()
        status, body = self.raw(self.post(padded, chunked=True))
        self.assertEqual(status, 413, body)
        self.assertEqual(self.store.snapshot(), before)

    def test_unauthenticatedTooLarge(self):
        """An oversize body without a valid token is refused for the token first (401)."""
        status, body = self.raw(self.post(b"x" * (MAX_BODY + 1), token=newToken()[0]))
        self.assertEqual(status, 401, body)

    def test_clientAddressFromTransport(self):
        """IP restrictions see the connection's peer: 10.1.2.3 passes a 10.0.0.0/8 token."""
        token = self.addToken(None, ("*",), addresses=("10.0.0.0/8",))
        request = self.post(json.dumps(tokenBody()).encode(), token=token)
        status, body = self.raw(request, IPv4Address("TCP", "10.1.2.3", 40000))
        self.assertEqual(status, 200, body)
        status, body = self.raw(request, IPv4Address("TCP", "11.1.2.3", 40000))
        self.assertEqual(status, 403, body)

    def test_ipv6Client(self):
        """An IPv6 peer passes a token restricted to its network."""
        token = self.addToken(None, ("*",), addresses=("2001:db8::/32",))
        request = self.post(json.dumps(tokenBody()).encode(), token=token)
        status, body = self.raw(request, IPv6Address("TCP", "2001:db8::5", 40000))
        self.assertEqual(status, 200, body)


# -- login penalties: the same checker as IMAP, 429 past the threshold ------------------


class PenaltyTests(APITestCase):
    """Bearer tokens go through ``TokenChecker`` with penalties; requests wait on the Clock."""

    def setUp(self) -> None:
        super().setUp()
        self.backend = MemoryPenalties(self.clock)
        penalties = LoginPenalties(self.backend, self.clock, PenaltyPolicy(refuseAfter=5))
        checker = TokenChecker(self.store, self.clock, API_SCOPE, penalties, refuse=True)
        self.api = TokenAPI(Admin(self.store, self.sessions, self.clock), self.clock, None, checker)
        self.stub = StubTreq(self.api.app.resource())

    def request(self, token: str, path: str = "/v1/accounts") -> Any:
        d = self.stub.request(
            "GET", "http://api.example" + path, headers={"Authorization": f"Bearer {token}"}
        )
        self.stub.flush()
        return d

    def answer(self, d: Any) -> tuple[Reply, int]:
        """Advance the clock a second at a time until ``d`` fires: the reply and seconds waited."""
        waited, fired = 0, []
        d.addBoth(fired.append)
        while not fired:
            self.clock.advance(1)
            self.stub.flush()
            waited += 1
            self.assertLess(waited, 60)
        [response] = fired
        content = self.successResultOf(response.content())
        return Reply(response.code, response.headers, content), waited

    def test_randomTokensThen429(self):
        """Random tokens: 401s slowed 0, 2, 4, 8, 15 s, then 429 with Retry-After, unlooked-at."""
        waits = []
        for _ in range(5):
            reply, waited = self.answer(self.request(newToken()[0]))
            self.assertError(reply, 401)
            waits.append(waited)
        self.assertEqual(waits, [0, 2, 4, 8, 15])
        reply, waited = self.answer(self.request(newToken()[0]))
        self.assertEqual(waited, 0)
        self.assertError(reply, 429)
        self.assertEqual(reply.headers.getRawHeaders(b"retry-after"), [b"15"])
        self.assertDocumented("GET", "/v1/accounts", reply)
        # A 429 is not a failure: the count stays where it was.
        self.assertEqual(self.successResultOf(self.backend.get("127.0.0.1"))[0], 5)

    def test_validTokenAfterRetryAfter(self):
        """A valid token from the penalised address is refused until Retry-After, then works."""
        for _ in range(5):
            self.answer(self.request(newToken()[0]))
        reply, _ = self.answer(self.request(self.root))
        self.assertError(reply, 429)
        self.clock.advance(int(reply.headers.getRawHeaders(b"retry-after")[0]))
        reply, waited = self.answer(self.request(self.root))
        self.assertEqual((reply.status, waited), (200, 0))
        self.assertIsNone(self.successResultOf(self.backend.get("127.0.0.1")))

    def test_otherAddressNotSlowed(self):
        """Another address's penalty does not slow this one's requests."""
        for _ in range(10):
            self.backend.fail("127.0.0.2", self.clock.seconds(), 600)
        reply, waited = self.answer(self.request(self.root))
        self.assertEqual((reply.status, waited), (200, 0))
        reply, waited = self.answer(self.request(newToken()[0]))
        self.assertEqual((reply.status, waited), (401, 0))

    def test_scopeRefusalCounts(self):
        """A real token without the api scope is a failure too (403), and counts."""
        mail = self.addToken("alice", ("imap-proxy",))
        reply, _ = self.answer(self.request(mail))
        self.assertError(reply, 403)
        self.assertEqual(self.successResultOf(self.backend.get("127.0.0.1"))[0], 1)

    def test_nonAsciiTokenCounts(self):
        """A Bearer value that is not ASCII is an unknown token (401), counted, never a 500."""
        d = self.stub.request(
            "GET", "http://api.example/v1/accounts", headers={b"Authorization": b"Bearer \xff" * 2}
        )
        self.stub.flush()
        reply, _ = self.answer(d)
        self.assertError(reply, 401)
        self.assertEqual(self.successResultOf(self.backend.get("127.0.0.1"))[0], 1)


# -- the access table of docs/api.md, walked ---------------------------------------------

DOCS_API = os.path.join(os.path.dirname(HERE), "docs", "api.md")
KINDS = ("root *", "root api", "own", "other", "mail")


def accessTable() -> dict[str, dict[str, str]]:
    """docs/api.md's access table: operation -> kind of token -> cell."""
    with open(DOCS_API, encoding="utf-8") as f:
        text = f.read()
    start = text.index("<!-- access-table")
    end = text.index("<!-- end of access-table -->")
    rows = [ln for ln in text[start:end].splitlines() if ln.startswith("| ")][1:]
    table = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        table[cells[0]] = dict(zip(KINDS, cells[1:], strict=True))
    return table


def liveSessions(admin: Admin, clock: Clock) -> dict[str, str]:
    """A real registry holding one live session of alice and one of bob: their ids."""
    from tests.test_sessions import imap, splice

    admin.sessions = SessionRegistry(clock=clock)
    return {a: admin.sessions.add(imap(a), splice(clock)).id for a in ("alice", "bob")}


@attrs.frozen
class FakeOnboarding:
    def start(self, data: Any) -> Any:
        return succeed({"url": "https://consent.example/x", "expires": "2026-01-01T00:00:00Z"})


class AccessTableTests(APITestCase):
    """Each cell of the docs' access table against the real routes, on a fresh store."""

    def fresh(self, kind: str) -> tuple[str, str]:
        """A fresh API and store; :return: a token of ``kind`` and the account it acts on."""
        self.setUp()
        self.api.onboarding = FakeOnboarding()  # type: ignore[assignment]
        self.store.apps["corp"] = buildApp(appBody("corp"))
        self.store.apps["spare"] = buildApp(appBody("spare"))
        alice = self.addAccount("alice")
        self.store.accounts["alice"] = attrs.evolve(
            alice, oauth2=attrs.evolve(alice.oauth2, app="corp")
        )
        self.addAccount("bob")
        self.liveIds = liveSessions(self.api.admin, self.clock)
        tokens = {
            "root *": (None, ("*",)),
            "root api": (None, ("api",)),
            "own": ("alice", ("api",)),
            "other": ("alice", ("api",)),
            "mail": ("alice", ("imap-proxy", "smtp")),
        }
        account, scopes = tokens[kind]
        return self.addToken(account, scopes), "bob" if kind == "other" else "alice"

    def perform(self, operation: str, token: str, acct: str) -> Reply:
        issue = {"description": "walk", "account": acct}
        victim = self.addToken(acct, ("imap-proxy",))
        requests: dict[str, tuple[str, str, Any]] = {
            "`POST /v1/token` an `imap-proxy` or `smtp` token": (
                "POST", "/v1/token", {**issue, "scopes": ["imap-proxy", "smtp"]}),
            "`POST /v1/token` an `api` token": ("POST", "/v1/token", {**issue, "scopes": ["api"]}),
            "`POST /v1/token` a `*` token": ("POST", "/v1/token", {**issue, "scopes": ["*"]}),
            "`POST /v1/token` a root token (no account)": (
                "POST", "/v1/token", {"description": "walk", "scopes": ["imap-proxy"]}),
            "`GET /v1/tokens?account=`": ("GET", f"/v1/tokens?account={acct}", NOBODY),
            "`GET /v1/tokens/account/{account}`": ("GET", f"/v1/tokens/account/{acct}", NOBODY),
            "`DELETE /v1/token/{token-or-id}`": ("DELETE", f"/v1/token/{tokenId(victim)}", NOBODY),
            "`DELETE /v1/token/{token-or-id}` a `*` token": (
                "DELETE", f"/v1/token/{tokenId(self.addToken(None, ('*',)))}", NOBODY),
            "`POST /v1/account`": ("POST", "/v1/account", accountBody("carol")),
            "`GET /v1/accounts`": ("GET", "/v1/accounts", NOBODY),
            "`GET /v1/account/{id}`": ("GET", f"/v1/account/{acct}", NOBODY),
            "`PUT /v1/account/{id}` a new `oauth2.refreshToken`": (
                "PUT", f"/v1/account/{acct}", {"oauth2": {"refreshToken": REFRESH_TOKEN}}),
            "`PUT /v1/account/{id}` any other field": (
                "PUT", f"/v1/account/{acct}", {"email": "new@example.com"}),
            "`DELETE /v1/account/{id}`": ("DELETE", f"/v1/account/{acct}", NOBODY),
            "`POST /v1/oauth2`": ("POST", "/v1/oauth2", appBody("third")),
            "`GET /v1/oauth2`": ("GET", "/v1/oauth2", NOBODY),
            "`GET /v1/oauth2/{app}`": ("GET", "/v1/oauth2/corp", NOBODY),
            "`DELETE /v1/oauth2/{app}`": ("DELETE", "/v1/oauth2/spare", NOBODY),
            "`POST /v1/oauth2/authorize`": (
                "POST", "/v1/oauth2/authorize", {"app": "corp", "account": acct}),
            "`GET /v1/sessions?account=`": ("GET", f"/v1/sessions?account={acct}", NOBODY),
            "`DELETE /v1/session/{id}`": ("DELETE", f"/v1/session/{self.liveIds[acct]}", NOBODY),
        }  # fmt: skip
        self.assertIn(operation, requests, "a row of docs/api.md the walk does not know")
        method, path, body = requests[operation]
        return self.call(method, path, body, token=token)

    def test_tableCoversEveryRoute(self):
        """Every /v1 route of the API description has a row (aliases aside)."""
        aliases = {"POST /v1/tokens", "DELETE /v1/tokens/{token}", "POST /v1/accounts"}
        names = {
            "{appId}": "{app}",
            "{token}": "{token-or-id}",
            "{sessionId}": "{id}",
            "/v1/account/{account}": "",
        }
        routes = set()
        for path, ops in SPEC["paths"].items():
            for method in set(ops) & {"get", "post", "put", "delete"}:
                route = f"{method.upper()} {path}"
                if path.startswith("/v1/") and route not in aliases:
                    route = route.replace("/v1/account/{account}", "/v1/account/{id}")
                    for old, new in names.items():
                        if old.startswith("{"):
                            route = route.replace(old, new)
                    routes.add(route)
        documented = {op.split("`")[1].split("?")[0] for op in accessTable()}
        self.assertEqual(routes, documented)

    def test_walkTheTable(self):
        """Each kind of token gets exactly what the table says, route by route."""
        table = accessTable()
        self.assertEqual(len(table), 21)
        seen = []
        for operation, cells in table.items():
            for kind, cell in cells.items():
                if cell == "—":
                    continue
                token, acct = self.fresh(kind)
                reply = self.perform(operation, token, acct)
                want = 200 if cell.startswith("yes") else int(cell.split()[0])
                self.assertEqual(reply.status, want, f"{operation} / {kind}: {reply.text}")
                seen.append((operation, kind))
        self.assertGreater(len(seen), 80)

    def test_ownAccountOnlyInListing(self):
        """'its own only': an account token's listing holds its account alone."""
        token, _ = self.fresh("own")
        body = self.assertOK(self.call("GET", "/v1/accounts", token=token))
        self.assertEqual([a["account"] for a in body["accounts"]], ["alice"])


# -- the absolute request deadline ------------------------------------------------------


class DeadlineTests(APITestCase):
    """The API's channels cut a request that has not arrived whole within the deadline."""

    def connect(self, deadline: float = 30.0) -> tuple[Any, StringTransport]:
        site = self.api.site(deadline)
        peer = IPv4Address("TCP", "127.0.0.1", 40000)
        protocol = site.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        protocol.makeConnection(transport)
        self.addCleanup(lambda: protocol.connectionLost(Failure(ConnectionDone())))
        return protocol, transport

    def request(self) -> bytes:
        return (
            b"GET /v1/accounts HTTP/1.1\r\nHost: api.example\r\n"
            b"Authorization: Bearer " + self.root.encode() + b"\r\n\r\n"
        )

    def test_tricklingHeadersCut(self):
        """A header byte a second is cut at 30 s with a JSON 408, whatever the idle timer."""
        protocol, transport = self.connect()
        data = self.request()
        for i in range(29):
            protocol.dataReceived(data[i : i + 1])
            self.clock.advance(1)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(data[29:30])
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 408 "), head)
        self.assertEqual(json.loads(body), {"error": "request timeout", "statusCode": 408})

    def test_tricklingBodyCut(self):
        """Headers in time, then a body trickled: cut at the deadline too."""
        protocol, transport = self.connect()
        body = json.dumps(tokenBody()).encode()
        protocol.dataReceived(
            b"POST /v1/token HTTP/1.1\r\nHost: api.example\r\nAuthorization: Bearer "
            + self.root.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        for i in range(30):
            self.clock.advance(1)
            protocol.dataReceived(body[i : i + 1])
        self.assertTrue(transport.disconnecting)
        self.assertIn(b" 408 ", transport.value())
        self.assertEqual(self.store.snapshot()[1].keys(), {tokenId(self.root)})

    def test_promptRequestsNotCut(self):
        """Whole requests in time are answered; the deadline starts again for the next one."""
        protocol, transport = self.connect()
        for _ in range(3):
            self.clock.advance(29)
            protocol.dataReceived(self.request())
            self.assertFalse(transport.disconnecting)
            self.assertIn(b"HTTP/1.1 200 ", transport.value())
            transport.clear()
        # Idle after an answer: closed at the deadline, quietly (no 408).
        self.clock.advance(30)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_configuredDeadline(self):
        """site(deadline) sets it."""
        protocol, transport = self.connect(5)
        protocol.dataReceived(b"GET / HTTP/1.1\r\n")
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertIn(b" 408 ", transport.value())
