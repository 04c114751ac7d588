"""
Webhooks (``proxy.alerts``) as the rest of the proxy meets them: the
once-per-cluster rules (the store's answer, the Redis claim), the hooks in
the API's ``Admin``, and the start-up checks of the settings.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from proxy.alerts import AlertingAdmin, Alerts, webhookSecret, webhookURLs
from proxy.store import MemoryStore
from tests.test_admin import NOW, accountBody

SECRET = b"webhook-test-key-0123456789"


class AlertsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.queued: list[Any] = []

    def alerts(self, claim: Any = None) -> Alerts:
        sink = _Sink(self.queued)
        return Alerts([sink], self.clock, claim=claim)  # type: ignore[list-item]

    def test_onlyTheChangingUpdateAlerts(self):
        """Of two updates to the same state (two instances), only the one that changed it alerts."""
        store = MemoryStore(clock=self.clock)
        store.openBlocking()
        admin = AlertingAdmin(store, alerts=Alerts(clock=self.clock))
        ensureDeferred(admin.createAccount(accountBody("alice")))
        alerts = self.alerts()
        olds = []
        for _ in range(2):
            d = store.setAccountState("alice", "reauth-required", "invalid_grant")
            olds.append(
                self.successResultOf(alerts.changed(d, "alice", "reauth-required", "invalid-grant"))
            )
        self.assertEqual(olds, ["ok", "reauth-required"])
        self.assertEqual([e.type for e in self.queued], ["account.reauth-required"])

    def test_claimedElsewhereIsNotSent(self):
        """With a shared store, an event id another instance claimed is not queued here."""
        claims: list[str] = []

        def claim(eventId: str) -> Deferred[bool]:
            claims.append(eventId)
            return succeed(len(claims) == 1)

        alerts = self.alerts(claim)
        alerts.tokenRevoked("tid1", "alice", "revoked", "root")
        alerts.tokenRevoked("tid1", "alice", "revoked", "other")
        self.assertEqual(len(claims), 2)
        self.assertEqual(claims[0], claims[1])
        self.assertEqual(len(self.queued), 1)

    def test_claimFailureStillSends(self):
        """A store that cannot answer the claim does not silence the alert (at least once)."""
        alerts = self.alerts(lambda eventId: fail(RuntimeError("down")))
        alerts.accountState("alice", "ok", "disabled", "operator")
        self.assertEqual([e.type for e in self.queued], ["account.disabled"])
        self.flushLoggedErrors()

    def test_noReceiversNoWork(self):
        """Without --webhook every hook is a no-op (no claim either)."""
        alerts = Alerts(clock=self.clock, claim=lambda eventId: self.fail("claimed"))
        alerts.accountState("alice", "ok", "disabled", "operator")
        alerts.tokenRevoked("tid1", "alice", "revoked", "root")


class SettleTests(SynchronousTestCase):
    """The admin command waits for its deliveries, for a bounded time."""

    def setUp(self) -> None:
        from treq.testing import StubTreq

        from proxy.alerts import Receiver
        from tests.test_alerts import Hook

        self.clock = Clock()
        self.clock.advance(NOW)
        self.hook = Hook()
        self.http = StubTreq(self.hook)
        receiver = Receiver("http://127.0.0.1:9/", SECRET, self.http, self.clock)
        self.alerts = Alerts([receiver], self.clock)

    def test_settlesWhenDelivered(self):
        self.alerts.tokenRevoked("tid1", "alice", "revoked", "cli")
        d = ensureDeferred(self.alerts.settle(30.0))
        self.http.flush()
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(len(self.hook.requests), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_givesUpAtTheDeadline(self):
        self.hook.answers = [503] * 100
        self.alerts.tokenRevoked("tid1", "alice", "revoked", "cli")
        d = ensureDeferred(self.alerts.settle(30.0))
        self.http.flush()
        self.assertNoResult(d)
        for _ in range(3):
            self.clock.advance(10.0)
            self.http.flush()
        self.assertEqual(self.successResultOf(d), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertGreater(len(self.hook.requests), 1)


class _Sink:
    def __init__(self, queued: list[Any]):
        self.queued = queued

    def add(self, event: Any) -> None:
        self.queued.append(event)

    def __len__(self) -> int:
        return 0

    def stop(self) -> None:
        pass


class AdminHookTests(SynchronousTestCase):
    """What the API changes reaches the webhooks through ``AlertingAdmin``."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = MemoryStore(clock=self.clock)
        self.store.openBlocking()
        self.queued: list[Any] = []
        self.admin = AlertingAdmin(
            self.store,
            clock=self.clock,
            alerts=Alerts([_Sink(self.queued)], self.clock),  # type: ignore[list-item]
        )
        self.run_(self.admin.createAccount(accountBody("alice")))

    def run_(self, coroutine: Any) -> Any:
        return self.successResultOf(ensureDeferred(coroutine))

    def issue(self) -> Any:
        data = {"account": "alice", "scopes": ["imap-proxy"], "description": "t"}
        return self.run_(self.admin.issueToken(data))

    def test_revokeSendsTokenRevoked(self):
        token, record = self.issue()
        self.run_(self.admin.revokeToken(token, actor="root-id"))
        [event] = self.queued
        self.assertEqual(event.type, "token.revoked")
        self.assertEqual(
            event.fields,
            {"account": "alice", "tokenId": record.id, "reason": "revoked", "actor": "root-id"},
        )
        self.assertNotIn(token, event.body().decode())

    def test_stateChangeThroughUpdate(self):
        self.run_(self.admin.updateAccount("alice", {"state": "disabled"}))
        self.run_(self.admin.updateAccount("alice", {"state": "disabled"}))
        self.run_(self.admin.updateAccount("alice", {"state": "ok"}))
        self.assertEqual([e.type for e in self.queued], ["account.disabled", "account.recovered"])
        self.assertEqual(self.queued[0].fields["reason"], "operator")

    def test_replacedAccount(self):
        """An account replaced whole (POST with replace) starts ``ok``: recovered."""
        self.run_(self.admin.updateAccount("alice", {"state": "disabled"}))
        self.run_(self.admin.createAccount(accountBody("alice"), replace=True))
        self.run_(self.admin.createAccount(accountBody("bob")))
        self.assertEqual([e.type for e in self.queued], ["account.disabled", "account.recovered"])

    def test_accountDeleteRevokesItsTokens(self):
        ids = {self.issue()[1].id for _ in range(2)}
        self.run_(self.admin.removeAccount("alice", actor="root-id"))
        self.assertEqual({e.fields["tokenId"] for e in self.queued}, ids)
        self.assertEqual({e.fields["reason"] for e in self.queued}, {"account-deleted"})


class SettingsTests(SynchronousTestCase):
    def keyFile(self, content: bytes) -> str:
        fd, path = tempfile.mkstemp()
        os.write(fd, content)
        os.close(fd)
        self.addCleanup(os.unlink, path)
        return path

    def test_urls(self):
        self.assertEqual(
            webhookURLs("http://127.0.0.1:9/a\n https://x.example/b"),
            ("http://127.0.0.1:9/a", "https://x.example/b"),
        )
        for bad in ("ftp://x.example/", "https:///nohost", "x.example/hook"):
            self.assertRaises(ValueError, webhookURLs, bad)

    def test_webhooksNeedASecret(self):
        """Webhooks without a key refuse to start, in one line; the key itself is never quoted."""
        self.assertIsNone(webhookSecret((), None))
        with self.assertRaises(ValueError) as e:
            webhookSecret(("http://127.0.0.1:9/",), None)
        self.assertIn("--webhook-secret-file", str(e.exception))
        self.assertNotIn("\n", str(e.exception))
        short = self.keyFile(b"tiny-secret\n")
        with self.assertRaises(ValueError) as e:
            webhookSecret(("http://127.0.0.1:9/",), short)
        self.assertNotIn("tiny-secret", str(e.exception))
        good = self.keyFile(SECRET + b"\n")
        self.assertEqual(webhookSecret(("http://127.0.0.1:9/",), good), SECRET)

    def test_optionsRefuseWebhookWithoutSecret(self):
        """``twistd imapproxy --webhook URL`` without a key ends with one line."""
        from proxy.options import Options

        with self.assertRaises(SystemExit) as e:
            Options().parseOptions(
                ["--store", "sqlite:////nonexistent/x.sqlite3", "--webhook", "http://127.0.0.1:9/"]
            )
        self.assertEqual(
            str(e.exception),
            "imapproxy: --webhook needs --webhook-secret-file (the key that signs each event)",
        )


class OptionsTests(SynchronousTestCase):
    """``--webhook`` is repeatable; the config file takes one a line."""

    def setUp(self) -> None:
        from cryptography.fernet import Fernet

        self.dir = tempfile.mkdtemp()
        self.storeKey = os.path.join(self.dir, "store.key")
        with open(self.storeKey, "wb") as f:
            f.write(Fernet.generate_key())
        self.hookKey = os.path.join(self.dir, "webhook.key")
        with open(self.hookKey, "wb") as f:
            f.write(SECRET + b"\n")
        self.store = f"sqlite:///{self.dir}/s.sqlite3"

    def tearDown(self) -> None:
        import shutil

        shutil.rmtree(self.dir)

    def parse(self, *args: str) -> Any:
        from proxy.options import Options

        o = Options()
        o.parseOptions(["--store", self.store, "--secret-file", self.storeKey, *args])
        return o

    def test_repeatedOnTheCommandLine(self):
        o = self.parse(
            "--webhook", "http://127.0.0.1:9/a", "--webhook=https://localhost/b",
            "--webhook-secret-file", self.hookKey,
        )  # fmt: skip
        self.assertEqual(o["webhook"], ("http://127.0.0.1:9/a", "https://localhost/b"))
        self.assertEqual(o["_webhookSecret"], SECRET)

    def test_oneALineInTheConfigFile(self):
        config = os.path.join(self.dir, "tap.conf")
        with open(config, "w") as f:
            f.write(
                "[imapproxy]\nwebhook =\n    http://127.0.0.1:9/a\n    https://localhost/b\n"
                f"webhook-secret-file = {self.hookKey}\n"
            )
        o = self.parse("--config", config)
        self.assertEqual(o["webhook"], ("http://127.0.0.1:9/a", "https://localhost/b"))
        self.assertEqual(o["_webhookSecret"], SECRET)

    def test_noWebhookNoSecretNeeded(self):
        o = self.parse()
        self.assertEqual((o["webhook"], o["_webhookSecret"]), ((), None))

    def test_badURLInOneLine(self):
        with self.assertRaises(SystemExit) as e:
            self.parse("--webhook", "ftp://127.0.0.1/", "--webhook-secret-file", self.hookKey)
        self.assertEqual(
            str(e.exception), "imapproxy: --webhook: not a valid value: 'ftp://127.0.0.1/'"
        )
