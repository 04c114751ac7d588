"""
Tests for ``proxy.metrics`` and ``proxy.metricshooks``: the registry after
scripted events, read back through Prometheus' own text parser; the login
path's wrappers around a real ``Portal``; the accounts read from a store
that answers, and from one that does not.
"""

from __future__ import annotations

import os
import re
from typing import Any

import attrs
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from proxy.cred import ISubmissionSession, IUpstreamSession, TokenCredentials
from proxy.errors import AccessDenied, GrantInvalid
from proxy.metrics import ACCOUNTS_CACHE, MAX_REASONS, STORE_DEADLINE, Metrics, providerOf
from proxy.metricshooks import (
    MeteredAccessTokens,
    MeteredConnector,
    meteredRefresh,
    meterPortal,
    resultOf,
)
from proxy.store import StoreUnavailable
from proxy.upstream import WarmUpstreams


def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    text = generate_latest(metrics.registry).decode("utf-8")
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@attrs.define
class Side:
    bytesReceived: int = 0


@attrs.define
class FakeSplice:
    client: Side
    upstream: Side


@attrs.define
class ImapSession:
    account: str
    tokenId: str = "t" * 64


@implementer(ISubmissionSession)
@attrs.define
class SmtpSession:
    account: str
    tokenId: str = "t" * 64


class Registry:
    """What ``Metrics`` reads of a ``SessionRegistry``: iteration, and ``ended``."""

    def __init__(self) -> None:
        self.live: list[tuple[Any, Any]] = []
        self.ended: Any = None

    def __iter__(self):
        return iter(list(self.live))

    def end(self, pair: tuple[Any, Any]) -> None:
        self.live.remove(pair)
        self.ended(*pair)


@attrs.define
class Acct:
    id: str
    state: str


class Store:
    def __init__(self, accounts: list[Acct]):
        self.accounts = accounts
        self.reads = 0
        self.down = False

    def listAccounts(self) -> Deferred[list[Acct]]:
        self.reads += 1
        if self.down:
            return fail(StoreUnavailable("down"))
        return succeed(list(self.accounts))


class EventTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.metrics = Metrics(self.clock, process=False)

    def test_loginsCountedByProtocolAndResult(self):
        """Each login is one count under its protocol and result, and one observation."""
        self.metrics.login("imap", "ok", 0.2)
        self.metrics.login("imap", "ok", 0.3)
        self.metrics.login("imap", "address", 0.01)
        self.metrics.login("smtp", "smtp-not-configured", 0.01)
        s = scrape(self.metrics)
        self.assertEqual(value(s, "imapproxy_logins_total", protocol="imap", result="ok"), 2)
        self.assertEqual(value(s, "imapproxy_logins_total", protocol="imap", result="address"), 1)
        self.assertEqual(
            value(s, "imapproxy_logins_total", protocol="smtp", result="smtp-not-configured"), 1
        )
        self.assertEqual(value(s, "imapproxy_login_seconds_count", protocol="imap"), 3)
        self.assertAlmostEqual(value(s, "imapproxy_login_seconds_sum", protocol="imap"), 0.51)
        self.assertEqual(value(s, "imapproxy_login_seconds_bucket", protocol="imap", le="0.25"), 2)

    def test_reasonsBounded(self):
        """A reason that is not a reason code, and reasons past the bound, become other."""
        self.assertEqual(self.metrics.reason("Bad Reason with spaces"), "other")
        self.assertEqual(self.metrics.reason("x" * 41), "other")
        self.assertEqual(self.metrics.reason(None), "other")
        for n in range(MAX_REASONS + 5):
            self.metrics.reason(f"r{n}")
        self.assertEqual(self.metrics.reason(f"r{MAX_REASONS + 1}"), "other")
        self.assertEqual(self.metrics.reason("r0"), "r0")

    def test_refreshesByProviderAndResult(self):
        """Refreshes are counted by provider and result, and timed by provider."""
        self.metrics.refreshed("gmail", "ok", 0.5)
        self.metrics.refreshed("gmail", "invalid-grant", 0.1)
        s = scrape(self.metrics)
        self.assertEqual(
            value(s, "imapproxy_token_refreshes_total", provider="gmail", result="ok"), 1
        )
        self.assertEqual(
            value(s, "imapproxy_token_refreshes_total", provider="gmail", result="invalid-grant"), 1
        )
        self.assertEqual(value(s, "imapproxy_token_refresh_seconds_count", provider="gmail"), 2)

    def test_providerOf(self):
        """The provider label is a preset name by the token URL's host, else generic."""
        self.assertEqual(providerOf("https://oauth2.googleapis.com/token"), "gmail")
        self.assertEqual(
            providerOf("https://login.microsoftonline.com/tenant-x/oauth2/v2.0/token"), "outlook"
        )
        self.assertEqual(providerOf("https://127.0.0.1:8443/token"), "generic")
        self.assertEqual(providerOf(None), "generic")


class LiveTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.metrics = Metrics(self.clock, process=False)
        self.sessions = Registry()
        self.metrics.watch(sessions=self.sessions)

    def test_sessionsAndBytes(self):
        """
        Open sessions by protocol, and bytes relayed: the live sessions'
        counters read at scrape time plus those of ended sessions, so the
        counter never goes down when a session ends.
        """
        imap = (ImapSession("a"), FakeSplice(Side(100), Side(2000)))
        smtp = (SmtpSession("a"), FakeSplice(Side(5000), Side(70)))
        self.sessions.live += [imap, smtp]
        s = scrape(self.metrics)
        self.assertEqual(value(s, "imapproxy_sessions", protocol="imap"), 1)
        self.assertEqual(value(s, "imapproxy_sessions", protocol="smtp"), 1)
        relayed = "imapproxy_relayed_bytes_total"
        self.assertEqual(value(s, relayed, protocol="imap", direction="to_provider"), 100)
        self.assertEqual(value(s, relayed, protocol="imap", direction="to_client"), 2000)
        self.assertEqual(value(s, relayed, protocol="smtp", direction="to_provider"), 5000)
        imap[1].client.bytesReceived = 300
        self.sessions.end(imap)
        s = scrape(self.metrics)
        self.assertEqual(value(s, "imapproxy_sessions", protocol="imap"), 0)
        self.assertEqual(value(s, relayed, protocol="imap", direction="to_provider"), 300)
        self.assertEqual(value(s, relayed, protocol="imap", direction="to_client"), 2000)
        self.assertIsNone(value(s, "imapproxy_account_sessions", account="a"))

    def test_perAccount(self):
        """With perAccount, sessions open are also counted by account."""
        self.metrics.perAccount = True
        self.sessions.live += [(ImapSession("a"), FakeSplice(Side(), Side()))] * 2
        s = scrape(self.metrics)
        self.assertEqual(value(s, "imapproxy_account_sessions", account="a"), 2)

    def test_spares(self):
        """Spares waiting, handed out and discarded come from WarmUpstreams."""
        warm = WarmUpstreams(lambda a: Deferred(), self.clock)
        warm.handedOut, warm.discarded = 3, 4
        self.metrics.watch(spares=warm)
        s = scrape(self.metrics)
        self.assertEqual(value(s, "imapproxy_spare_connections"), 0)
        self.assertEqual(value(s, "imapproxy_spare_connections_handed_out_total"), 3)
        self.assertEqual(value(s, "imapproxy_spare_connections_discarded_total"), 4)


class AccountsTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.metrics = Metrics(self.clock, process=False)
        self.store = Store([Acct("a", "ok"), Acct("b", "reauth-required"), Acct("c", "ok")])
        self.metrics.watch(store=self.store)

    def refresh(self) -> None:
        self.successResultOf(ensureDeferred(self.metrics.refresh()))

    def test_byState(self):
        """Accounts are counted by state, every state present, from one store read."""
        self.refresh()
        s = scrape(self.metrics)
        self.assertEqual(value(s, "imapproxy_accounts", state="ok"), 2)
        self.assertEqual(value(s, "imapproxy_accounts", state="reauth-required"), 1)
        self.assertEqual(value(s, "imapproxy_accounts", state="disabled"), 0)
        self.assertEqual(value(s, "imapproxy_store_up"), 1)
        self.assertIsNone(value(s, "imapproxy_account_state", account="b", state="reauth-required"))

    def test_cached(self):
        """The store is read at most once per ACCOUNTS_CACHE seconds."""
        self.refresh()
        self.store.accounts.append(Acct("d", "disabled"))
        self.clock.advance(ACCOUNTS_CACHE - 1)
        self.refresh()
        self.assertEqual(self.store.reads, 1)
        self.clock.advance(1)
        self.refresh()
        self.assertEqual(self.store.reads, 2)
        self.assertEqual(value(scrape(self.metrics), "imapproxy_accounts", state="disabled"), 1)

    def test_storeDown(self):
        """A store that does not answer: store_up 0, a failure counted, no accounts series."""
        self.refresh()
        self.store.down = True
        self.clock.advance(ACCOUNTS_CACHE)
        self.refresh()
        s = scrape(self.metrics)
        self.assertEqual(value(s, "imapproxy_store_up"), 0)
        self.assertEqual(value(s, "imapproxy_store_errors_total", operation="metrics"), 1)
        self.assertIsNone(value(s, "imapproxy_accounts", state="ok"))
        self.flushLoggedErrors()

    def test_storeSilent(self):
        """A store that never answers: the scrape goes on after STORE_DEADLINE, store_up 0."""
        self.store.listAccounts = lambda: Deferred()  # type: ignore[method-assign]
        d = ensureDeferred(self.metrics.refresh())
        self.assertNoResult(d)
        self.clock.advance(STORE_DEADLINE)
        self.successResultOf(d)
        self.assertEqual(value(scrape(self.metrics), "imapproxy_store_up"), 0)

    def test_perAccountState(self):
        """With perAccount, each account's state is a series of its own."""
        self.metrics.perAccount = True
        self.refresh()
        s = scrape(self.metrics)
        self.assertEqual(
            value(s, "imapproxy_account_state", account="b", state="reauth-required"), 1
        )


@implementer(ISubmissionSession)
@attrs.define
class Avatar:
    account: str


class Checker:
    """
    A checker that refuses tokens named ``bad``; with ``later``, it waits
    for a Deferred the test fires, as the real one waits for its store.
    """

    credentialInterfaces = TokenCredentials.__implemented__.declared  # type: ignore[attr-defined]

    def __init__(self) -> None:
        self.later: Deferred[None] | None = None

    def requestAvatarId(self, c: TokenCredentials) -> Deferred[Any]:
        async def check() -> Any:
            if self.later is not None:
                await self.later
            if c.token == "bad":
                raise AccessDenied("address")
            return (c.account, "id")

        return ensureDeferred(check())


class Realm:
    """Gets an access token through ``access``, as ``UpstreamRealm`` does."""

    def __init__(self, access: Any):
        self.access = access

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Deferred[Any]:
        async def login() -> Any:
            await self.access.get(avatarId[0])
            return (interfaces[0], Avatar(avatarId[0]), lambda: None)

        return ensureDeferred(login())


class Access:
    def get(self, account: Any, stale: Any = None) -> Deferred[str]:
        return succeed("access-token")


class HookTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.metrics = Metrics(self.clock, process=False)
        realm = Realm(MeteredAccessTokens(Access(), self.metrics))
        self.checker = Checker()
        self.portal = meterPortal(Portal(realm, [self.checker]), self.metrics)

    def login(self, token: str, protocol: str) -> Any:
        creds = TokenCredentials("acct", token, "192.0.2.1", protocol)
        iface = ISubmissionSession if protocol == "smtp" else IUpstreamSession
        return self.portal.login(creds, None, iface)

    def test_portalCountsAndPassesOn(self):
        """
        The metered portal passes results and errors on unchanged, counting
        each by protocol and result, the token check and the access token
        timed under the login's protocol.
        """
        _i, avatar, _l = self.successResultOf(self.login("good", "smtp"))
        self.assertEqual(avatar.account, "acct")
        self.failureResultOf(self.login("bad", "imap"), AccessDenied)
        s = scrape(self.metrics)
        self.assertEqual(value(s, "imapproxy_logins_total", protocol="smtp", result="ok"), 1)
        self.assertEqual(value(s, "imapproxy_logins_total", protocol="imap", result="address"), 1)
        self.assertEqual(value(s, "imapproxy_login_token_check_seconds_count", protocol="imap"), 1)
        self.assertEqual(value(s, "imapproxy_login_token_check_seconds_count", protocol="smtp"), 1)
        self.assertEqual(value(s, "imapproxy_login_access_token_seconds_count", protocol="smtp"), 1)
        self.assertIsNone(value(s, "imapproxy_login_access_token_seconds_count", protocol="imap"))
        # No label holds the address or the token.
        for _name, labels in s:
            for _k, v in labels:
                self.assertNotIn(v, ("192.0.2.1", "good", "bad", "acct"))

    def test_protocolFollowsTheLogin(self):
        """
        The access-token step learns the protocol of its login even when
        the token check completes later, from the reactor, after an IMAP
        login has started meanwhile.
        """
        self.checker.later = Deferred()
        smtp = self.login("good", "smtp")
        self.checker.later, later = None, self.checker.later
        self.successResultOf(self.login("good", "imap"))
        later.callback(None)
        self.successResultOf(smtp)
        s = scrape(self.metrics)
        name = "imapproxy_login_access_token_seconds_count"
        self.assertEqual(value(s, name, protocol="smtp"), 1)
        self.assertEqual(value(s, name, protocol="imap"), 1)

    def test_connectorTimedByProtocol(self):
        """connect is IMAP, connect.smtp SMTP; results pass through."""

        class Connect:
            def __call__(self, *a: Any) -> Deferred[str]:
                return succeed("imap-conn")

            def smtp(self, *a: Any) -> Deferred[str]:
                return fail(GrantInvalid())

        c = MeteredConnector(Connect(), self.metrics)
        self.assertEqual(self.successResultOf(c("u", "e", "t")), "imap-conn")
        self.failureResultOf(c.smtp("u", "e", "t", "ehlo"), GrantInvalid)
        s = scrape(self.metrics)
        self.assertEqual(value(s, "imapproxy_login_upstream_seconds_count", protocol="imap"), 1)
        self.assertEqual(value(s, "imapproxy_login_upstream_seconds_count", protocol="smtp"), 1)

    def test_refreshCounted(self):
        """Each token endpoint call is counted by the account's provider and its result."""

        @attrs.frozen
        class Grant:
            tokenURL: str

        @attrs.frozen
        class Account:
            oauth2: Grant

        answers = [succeed("grant"), fail(GrantInvalid())]
        refresh = meteredRefresh(lambda account: answers.pop(0), self.metrics)
        gmail = Account(Grant("https://oauth2.googleapis.com/token"))
        self.assertEqual(self.successResultOf(refresh(gmail)), "grant")
        self.failureResultOf(refresh(gmail), GrantInvalid)
        s = scrape(self.metrics)
        name = "imapproxy_token_refreshes_total"
        self.assertEqual(value(s, name, provider="gmail", result="ok"), 1)
        self.assertEqual(value(s, name, provider="gmail", result="invalid-grant"), 1)

    def test_resultOf(self):
        """Errors map to their reason codes; what is not the proxy's is internal."""
        self.assertEqual(resultOf(None), "ok")
        self.assertEqual(resultOf(AccessDenied("expired")), "expired")
        self.assertEqual(resultOf(StoreUnavailable("x")), "store-unavailable")
        self.assertEqual(resultOf(ValueError("secret text")), "internal")


class ProcessTests(SynchronousTestCase):
    def test_processMetrics(self):
        """The process collector is on the service's own registry, prefixed."""
        s = scrape(Metrics(Clock()))
        self.assertIsNotNone(value(s, "imapproxy_process_cpu_seconds_total"))


RULES = os.path.join(os.path.dirname(__file__), "..", "docs", "prometheus", "imapproxy-rules.yml")


class RulesFileTests(SynchronousTestCase):
    def test_rulesUseMetricsThatExist(self):
        """
        The example alert rules parse (as YAML when PyYAML is there) and
        every metric they name is in a scrape of a fully wired registry.
        """
        with open(RULES, encoding="utf-8") as f:
            text = f.read()
        try:
            import yaml
        except ImportError:  # pragma: no cover - PyYAML comes with the test extras
            exprs = re.findall(r"expr:(.*?)(?:\n\s+for:)", text, re.S)
        else:
            rules = [r for g in yaml.safe_load(text)["groups"] for r in g["rules"]]
            self.assertTrue(
                all({"alert", "expr", "labels", "annotations"} <= set(r) for r in rules)
            )
            exprs = [r["expr"] for r in rules]
        self.assertGreaterEqual(len(exprs), 4)
        clock = Clock()
        metrics = Metrics(clock, perAccount=True)
        metrics.watch(Registry(), WarmUpstreams(lambda a: Deferred(), clock), [], Store([]))
        self.successResultOf(ensureDeferred(metrics.refresh()))
        metrics.login("imap", "ok", 0.1)
        metrics.refreshed("generic", "ok", 0.1)
        metrics.storeFailed("login")
        names = {name for name, _labels in scrape(metrics)}
        used = set(re.findall(r"\bimapproxy_[a-z_]+", " ".join(exprs)))
        self.assertTrue(used)
        self.assertEqual(used - names, set())
