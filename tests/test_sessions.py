"""
Tests for the live sessions an operator lists and ends: the registry's
records (``proxy.imap.sessions``), ``Splice.closeWith``, and the routes
``GET /v1/sessions`` and ``DELETE /v1/session/{id}`` through ``StubTreq``
against the real Klein resource (answers checked against the OpenAPI
description by ``APITestCase``).
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from proxy.admin import Admin
from proxy.imap import SessionRegistry
from proxy.metrics import Metrics
from proxy.model import Restrictions
from proxy.realm import SubmissionSession, UpstreamSession
from proxy.relay import Splice
from proxy.tokens import newToken, tokenId
from proxy.web.api import TokenAPI
from tests.test_api import NOW, APITestCase

PROVIDER = IPv4Address("TCP", "127.0.0.7", 993)


@attrs.define
class Leg:
    """One side of a splice, as the front door and the upstream protocol show it."""

    transport: StringTransport
    address: str = "unknown"
    hostname: bytes = b"mx.proxy.example"
    bytesReceived: int = 0


def splice(clock: Clock, address: str = "192.0.2.10") -> Splice:
    client = Leg(StringTransport(), address=address)
    upstream = Leg(StringTransport(peerAddress=PROVIDER))
    return Splice(client, upstream, "label", callLater=clock.callLater)


def imap(account: str = "alice", tid: str = "t" * 64) -> Any:
    return UpstreamSession(protocol=None, account=account, tokenId=tid)  # type: ignore[arg-type]


def smtp(account: str = "alice", tid: str = "t" * 64) -> Any:
    return SubmissionSession(
        protocol=None,  # type: ignore[arg-type]
        account=account,
        tokenId=tid,
        server="smtp.provider.example:587",
    )


class RegistryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.registry = SessionRegistry(clock=self.clock)

    def test_fields(self):
        """Each session's record: random id, protocol, client and provider addresses, times."""
        sp = splice(self.clock, "203.0.113.9")
        live = self.registry.add(imap(), sp)
        view = live.view()
        self.assertRegex(view["id"], "^[0-9a-f]{24}$")
        self.assertEqual(
            {k: v for k, v in view.items() if k != "id"},
            {
                "protocol": "imap",
                "account": "alice",
                "tokenId": "t" * 64,
                "address": "203.0.113.9",
                "upstream": "127.0.0.7:993",
                "started": "2025-06-15T15:06:40Z",
                "bytesToProvider": 0,
                "bytesToClient": 0,
                "lastActivity": "2025-06-15T15:06:40Z",
                "restrictions": None,
            },
        )
        smtpView = self.registry.add(smtp(), splice(self.clock)).view()
        self.assertEqual(smtpView["protocol"], "smtp")
        self.assertEqual(smtpView["upstream"], "smtp.provider.example:587")

    def test_restrictionsShown(self):
        """A restricted token's session shows its restrictions as the token view does."""
        session = attrs.evolve(
            imap(), restrictions=Restrictions(readOnly=True, mailboxes=("INBOX", "Archive/*"))
        )
        view = self.registry.add(session, splice(self.clock)).view()
        self.assertEqual(
            view["restrictions"], {"readOnly": True, "mailboxes": ["INBOX", "Archive/*"]}
        )

    def test_idsRandom(self):
        """Two sessions of one token get different ids, neither taken from the token."""
        a = self.registry.add(imap(), splice(self.clock))
        b = self.registry.add(imap(), splice(self.clock))
        self.assertNotEqual(a.id, b.id)
        self.assertNotIn(a.id, "t" * 64)

    def test_filters(self):
        """Every filter given must match."""
        a = self.registry.add(imap("alice", "a" * 64), splice(self.clock))
        b = self.registry.add(smtp("alice", "b" * 64), splice(self.clock))
        c = self.registry.add(imap("bob", "c" * 64), splice(self.clock))
        ids = lambda **kw: [s.id for s in self.registry.sessions(**kw)]  # noqa: E731
        self.assertEqual(ids(), [a.id, b.id, c.id])
        self.assertEqual(ids(account="alice"), [a.id, b.id])
        self.assertEqual(ids(protocol="imap"), [a.id, c.id])
        self.assertEqual(ids(account="alice", protocol="smtp"), [b.id])
        self.assertEqual(ids(tokenId="c" * 64), [c.id])
        self.assertEqual(ids(account="bob", tokenId="a" * 64), [])

    def test_lastActivity(self):
        """Last activity: when a look (listing or the timer) saw the counters move."""
        sp = splice(self.clock)
        live = self.registry.add(imap(), sp)
        self.clock.advance(30)
        self.registry.sample()
        self.assertEqual(live.lastActivity, NOW)  # nothing moved
        sp.upstream.bytesReceived = 120
        self.clock.advance(5)
        [seen] = self.registry.sessions()
        self.assertEqual(seen.lastActivity, NOW + 35)
        self.assertEqual(seen.view()["bytesToClient"], 120)
        self.clock.advance(60)
        self.registry.sample()
        self.assertEqual(live.lastActivity, NOW + 35)

    def test_endIMAP(self):
        """Ending an IMAP session: the provider is cut, the client reads BYE, then close."""
        sp = splice(self.clock)
        live = self.registry.add(imap(), sp)
        self.assertTrue(self.registry.end(live.id))
        self.assertTrue(sp.upstream.transport.disconnecting)
        self.assertEqual(sp.client.transport.value(), b"* BYE Session ended by the operator\r\n")
        self.assertTrue(sp.client.transport.disconnecting)

    def test_endSMTP(self):
        """Ending an SMTP session: 421 with the proxy's host name, then close."""
        sp = splice(self.clock)
        live = self.registry.add(smtp(), sp)
        self.registry.end(live.id)
        self.assertEqual(
            sp.client.transport.value(),
            b"421 4.7.0 mx.proxy.example Session ended by the operator\r\n",
        )
        self.assertTrue(sp.client.transport.disconnecting)

    def test_endUnknown(self):
        self.assertFalse(self.registry.end("0" * 24))

    def test_discardForgets(self):
        """An ended session leaves the list, and the metrics still see it end."""
        ended = []
        self.registry.ended = lambda s, sp: ended.append(s)
        session, sp = imap(), splice(self.clock)
        live = self.registry.add(session, sp)
        self.assertEqual(list(self.registry), [(session, sp)])
        self.registry.discard(session, sp)
        self.assertEqual(self.registry.sessions(), [])
        self.assertIsNone(self.registry.get(live.id))
        self.assertEqual(ended, [session])

    def test_metricsStillRead(self):
        """The metrics read the registry as before (sessions open by protocol)."""
        metrics = Metrics(self.clock, process=False)
        metrics.watch(self.registry)
        self.registry.add(imap(), splice(self.clock))
        self.registry.add(smtp(), splice(self.clock))
        families = {f.name: f for f in metrics.collectLive()}
        counts = {s.labels["protocol"]: s.value for s in families["imapproxy_sessions"].samples}
        self.assertEqual(counts, {"imap": 1, "smtp": 1})


class RouteTests(APITestCase):
    """The routes over a real registry."""

    def setUp(self) -> None:
        super().setUp()
        self.registry = SessionRegistry(clock=self.clock)
        self.api = TokenAPI(Admin(self.store, self.registry, self.clock), self.clock)
        self.stub = self.stubFor(self.api)
        self.alice = self.addToken("alice", ("imap-proxy",))
        self.aliceSplice = splice(self.clock)
        self.a = self.registry.add(imap("alice", tokenId(self.alice)), self.aliceSplice)
        self.b = self.registry.add(smtp("bob", "b" * 64), splice(self.clock))

    @staticmethod
    def stubFor(api: TokenAPI) -> Any:
        from treq.testing import StubTreq

        return StubTreq(api.app.resource())

    def ids(self, query: str = "", token: Any = None) -> list[str]:
        kw = {} if token is None else {"token": token}
        body = self.assertOK(self.call("GET", "/v1/sessions" + query, **kw))
        return [s["id"] for s in body["sessions"]]

    def test_listAll(self):
        """A root token sees every session, with its fields."""
        body = self.assertOK(self.call("GET", "/v1/sessions"))
        self.assertEqual([s["id"] for s in body["sessions"]], [self.a.id, self.b.id])
        self.assertEqual(body["sessions"][0]["address"], "192.0.2.10")

    def test_filters(self):
        self.assertEqual(self.ids("?account=bob"), [self.b.id])
        self.assertEqual(self.ids("?protocol=imap"), [self.a.id])
        self.assertEqual(self.ids(f"?token={self.alice}"), [self.a.id])
        self.assertEqual(self.ids(f"?token={tokenId(self.alice)}"), [self.a.id])
        self.assertError(self.call("GET", "/v1/sessions?protocol=pop3"), 400)

    def test_accountTokenSeesItsOwn(self):
        """An account token lists its account's sessions only; another account is 403."""
        own = self.addToken("alice", ("api",))
        self.assertEqual(self.ids(token=own), [self.a.id])
        self.assertError(self.call("GET", "/v1/sessions?account=bob", token=own), 403)

    def test_mailTokenRefused(self):
        self.assertError(self.call("GET", "/v1/sessions", token=self.alice), 403)
        self.assertError(self.call("DELETE", f"/v1/session/{self.a.id}", token=self.alice), 403)

    def test_noToken(self):
        self.assertError(self.call("GET", "/v1/sessions", token=None), 401)

    def test_end(self):
        """DELETE ends the session: BYE to its client, and it leaves the list."""
        self.assertEqual(
            self.assertOK(self.call("DELETE", f"/v1/session/{self.a.id}")), {"ended": True}
        )
        self.assertEqual(
            self.aliceSplice.client.transport.value(), b"* BYE Session ended by the operator\r\n"
        )
        self.registry.discard(None, self.aliceSplice)  # as its front door does, once closed
        self.assertEqual(self.ids(), [self.b.id])

    def test_endUnknown(self):
        self.assertError(self.call("DELETE", "/v1/session/" + "0" * 24), 404)

    def test_endOtherAccount(self):
        """Another account's session is as unknown to an account token as a missing one."""
        own = self.addToken("alice", ("api",))
        self.assertError(self.call("DELETE", f"/v1/session/{self.b.id}", token=own), 404)
        self.assertEqual(self.ids(), [self.a.id, self.b.id])
        self.assertOK(self.call("DELETE", f"/v1/session/{self.a.id}", token=own))


def test_tokenNotInIds():
    """No session id is a prefix of or equal to its token id (ids are random)."""
    registry = SessionRegistry(clock=Clock())
    token, tid = newToken()
    live = registry.add(imap("alice", tid), splice(Clock()))
    assert live.id not in tid and live.id not in token


class CommandTests(SynchronousTestCase):
    """``imapproxy sessions list|end`` on SQLite: one honest line and status 2."""

    def test_sqlitePointsToTheAPI(self):
        import io
        from unittest import mock

        from proxy import cli

        # No store is opened (nor created) for these: the URL says SQLite.
        url = "sqlite:///nonexistent/imapproxy-test/s.sqlite3"
        for argv in (["sessions", "list", "--account", "alice"], ["sessions", "end", "ab" * 12]):
            err = io.StringIO()
            with mock.patch("sys.stderr", err):
                e = self.assertRaises(SystemExit, cli.main, [*argv, "--store", url])
            self.assertEqual(e.code, 2)
            self.assertEqual(err.getvalue().count("\n"), 1, err.getvalue())
            self.assertIn("GET /v1/sessions", err.getvalue())


class CloseWithTests(SynchronousTestCase):
    def test_clientAlreadyLost(self):
        """A client already gone is not written to."""
        clock = Clock()
        sp = splice(clock)
        sp.clientLost()
        sp.closeWith(b"* BYE x")
        self.assertEqual(sp.client.transport.value(), b"")
