"""
The audit events added after the first set: ``account-state`` exactly once
for every change of an account's state (an operator's, a new grant through
the API, the admin command or onboarding, a replaced account),
``account-authorized`` from both onboarding flows, ``api-login`` for API
and ``/metrics`` requests refused for their token (never the token), and
docs/monitoring.md naming every event the code emits.
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from proxy import auditlog
from proxy.cred import API_SCOPE, TokenChecker, TokenCredentials
from proxy.errors import AccessDenied
from proxy.penalties import LoginPenalties, MemoryPenalties, PenaltyInForce, PenaltyPolicy
from proxy.store import MemoryStore
from tests.test_admin import AdminTestCase
from tests.test_auditlog import audit, capture, fields
from tests.test_onboarding import DEVICE_CODE, FlowTestCase, grantFor

ROOT = os.path.join(os.path.dirname(__file__), "..")


def states(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        fields(e, "account", "old_state", "new_state", "reason")
        for e in audit(events, "account-state")
    ]


class AdminStateTests(AdminTestCase):
    def reauthRequired(self) -> None:
        self.run_(self.store.setAccountState("alice", "reauth-required", "invalid_grant"))

    def test_newGrantRecovers(self):
        """A new refresh token brings reauth-required back to ok: one event, ``reauthorized``."""
        self.addAccount()
        self.reauthRequired()
        events = capture(self)
        account = self.run_(
            self.admin.updateAccount("alice", {"oauth2": {"refreshToken": "rt-new"}})
        )
        self.assertEqual(account.state, "ok")
        self.assertEqual(
            states(events),
            [
                {
                    "account": "alice",
                    "old_state": "reauth-required",
                    "new_state": "ok",
                    "reason": "reauthorized",
                }
            ],
        )
        self.assertNotIn("rt-new", repr(events))

    def test_operatorSetsState(self):
        """A state set by the operator: one event, ``operator``; setting it again: none."""
        self.addAccount()
        events = capture(self)
        self.run_(self.admin.updateAccount("alice", {"state": "disabled"}))
        self.run_(self.admin.updateAccount("alice", {"state": "disabled"}))
        self.run_(self.admin.updateAccount("alice", {"state": "ok"}))
        self.assertEqual(
            [(s["old_state"], s["new_state"], s["reason"]) for s in states(events)],
            [("ok", "disabled", "operator"), ("disabled", "ok", "operator")],
        )

    def test_replacedAccount(self):
        """Creating anew over a reauth-required account is a change of state; a new one is not."""
        events = capture(self)
        self.addAccount()
        self.assertEqual(states(events), [])
        self.reauthRequired()
        self.run_(self.admin.createAccount(self.body(), replace=True))
        self.assertEqual(
            [(s["old_state"], s["new_state"], s["reason"]) for s in states(events)],
            [("reauth-required", "ok", "replaced")],
        )

    def body(self) -> dict[str, Any]:
        from tests.test_admin import accountBody

        return accountBody("alice")


class OnboardingEventTests(FlowTestCase):
    def test_consentRecovers(self):
        """The consent flow: account-authorized, and the recovery as one account-state."""
        self.addAccount(state="reauth-required", stateReason="invalid_grant")
        events = capture(self)
        app = self.store.apps["corp"]
        d = Deferred.fromCoroutine(
            self.onboarding.complete("alice", app, grantFor("alice@example.com"), None, None)
        )
        self.successResultOf(d)
        [authorized] = audit(events, "account-authorized")
        self.assertEqual(
            fields(authorized, "account", "email", "app", "flow"),
            {"account": "alice", "email": "alice@example.com", "app": "corp", "flow": "consent"},
        )
        self.assertEqual(
            states(events),
            [
                {
                    "account": "alice",
                    "old_state": "reauth-required",
                    "new_state": "ok",
                    "reason": "reauthorized",
                }
            ],
        )
        self.assertNotIn("rt-1", repr([auditlog.eventAsLine(e) for e in events]))

    def test_deviceNewAccount(self):
        """The device flow names itself; a new account has no change of state."""
        events = capture(self)
        app = self.store.apps["corp"]
        d = Deferred.fromCoroutine(
            self.onboarding.authorizeDevice(
                app, "alice", "alice@example.com", {"host": "imap.example.com"}, lambda *a: None
            )
        )
        self.run.calls[0][2].callback(
            {
                "device_code": DEVICE_CODE,
                "user_code": "WDJB-MJHT",
                "verification_uri": "https://idp.example.com/device",
                "interval": 5.0,
                "expires_in": 900,
            }
        )
        self.clock.advance(5)
        self.run.calls[1][2].callback(grantFor("alice@example.com"))
        self.successResultOf(d)
        [authorized] = audit(events, "account-authorized")
        self.assertEqual(authorized["flow"], "device")
        self.assertEqual(states(events), [])


class APILoginTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.store = MemoryStore(clock=self.clock)
        self.store.openBlocking()
        penalties = LoginPenalties(
            MemoryPenalties(self.clock), self.clock, PenaltyPolicy(refuseAfter=1)
        )
        self.checker = TokenChecker(self.store, self.clock, API_SCOPE, penalties, refuse=True)

    def check(self, token: str, protocol: str = "api") -> Deferred[Any]:
        creds = TokenCredentials(account=None, token=token, address="192.0.2.7", protocol=protocol)
        return ensureDeferred(self.checker.check(creds))

    def test_refusedTokenThenPenalty(self):
        """An unknown token, then the 429 that follows: two api-login events, no token."""
        token = "f" * 64
        events = capture(self)
        self.failureResultOf(self.check(token), AccessDenied)
        self.failureResultOf(self.check(token), PenaltyInForce)
        got = audit(events, "api-login")
        self.assertEqual(
            [fields(e, "result", "reason", "client", "endpoint") for e in got],
            [
                {
                    "result": "refused",
                    "reason": "unknown-token",
                    "client": "192.0.2.7",
                    "endpoint": "api",
                },
                {
                    "result": "refused",
                    "reason": "penalty",
                    "client": "192.0.2.7",
                    "endpoint": "api",
                },
            ],
        )
        self.assertNotIn(token, "".join(auditlog.eventAsLine(e) for e in events))

    def test_imapRefusalIsNotAnAPILogin(self):
        """IMAP and SMTP refusals have their ``login`` event, not ``api-login``."""
        events = capture(self)
        self.failureResultOf(self.check("f" * 64, protocol="imap"), AccessDenied)
        self.assertEqual(audit(events, "api-login"), [])


class DocumentedEventsTests(SynchronousTestCase):
    def test_everyEventInTheDoc(self):
        """Every event name the code emits has its section in docs/monitoring.md."""
        names: set[str] = set()
        for folder, _dirs, files in os.walk(os.path.join(ROOT, "proxy")):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(folder, name), encoding="utf-8") as f:
                        names |= set(re.findall(r'\bevent="([a-z][a-z-]*)"', f.read()))
        self.assertGreaterEqual(
            names, {"login", "session-end", "change", "account-state", "api-login"}
        )
        with open(os.path.join(ROOT, "docs", "monitoring.md"), encoding="utf-8") as f:
            doc = f.read()
        documented = set(re.findall(r"^### `([a-z][a-z-]*)`", doc, re.M))
        self.assertEqual(names - documented, set())
