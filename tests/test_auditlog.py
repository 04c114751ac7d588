"""
The JSON log observer and the audit events: each event caught as
``twisted.logger`` publishes it, from the real front doors, splice and
admin operations driven with string transports and a task clock.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tempfile
from types import SimpleNamespace
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import ensureDeferred
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger, LogLevel, formatEventAsClassicLogText, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from proxy import auditlog
from proxy.errors import AccessDenied, GrantInvalid, Unavailable
from proxy.oauth.access import AccessTokens
from proxy.tokens import tokenId
from tests.test_admin import AdminTestCase, accountBody
from tests.test_imap import TOKEN, FakeUpstream, ProxyServerTestCase
from tests.test_smtp import SMTPTestCase


def capture(case: SynchronousTestCase) -> list[dict[str, Any]]:
    """Every event published from now on, for the rest of ``case``."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    case.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def audit(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The audit events called ``name``, as their JSON lines hold them."""
    return [json.loads(auditlog.eventAsLine(e)) for e in events if e.get("event") == name]


def fields(event: dict[str, Any], *names: str) -> dict[str, Any]:
    return {n: event[n] for n in names}


class JSONObserverTests(SynchronousTestCase):
    def test_oneObjectPerLine(self):
        """Each event is one line of JSON: fixed keys, its fields, no record separator."""
        out = io.StringIO()
        log = Logger(namespace="proxy.test", observer=auditlog.jsonLineObserver(out))
        log.info("session {label} spliced", label="alice@127.0.0.1")
        log.warn("two\nlines {n}", n=2, obj=object(), many=[1, "a"])
        text = out.getvalue()
        self.assertNotIn("\x1e", text)
        lines = text.splitlines()
        self.assertEqual(len(lines), 2)
        first, second = (json.loads(line) for line in lines)
        self.assertEqual(
            fields(first, "level", "namespace", "message", "label"),
            {
                "level": "info",
                "namespace": "proxy.test",
                "message": "session alice@127.0.0.1 spliced",
                "label": "alice@127.0.0.1",
            },
        )
        self.assertRegex(first["time"], r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00\Z")
        self.assertEqual(second["message"], "two\nlines 2")
        self.assertEqual(second["level"], "warn")
        self.assertEqual(second["many"], [1, "a"])
        self.assertIsInstance(second["obj"], str)
        self.assertFalse([k for k in first if k.startswith("log_")])

    def test_failureKeepsOnlyTheType(self):
        """A failure's text and traceback (which might carry a token) stay out."""
        out = io.StringIO()
        log = Logger(namespace="proxy.test", observer=auditlog.jsonLineObserver(out))
        try:
            raise RuntimeError("boom " + TOKEN)
        except RuntimeError:
            log.failure("it broke")
        line = json.loads(out.getvalue())
        self.assertEqual(line["error_type"], "RuntimeError")
        self.assertEqual(line["message"], "it broke")
        self.assertNotIn(TOKEN, out.getvalue())

    def test_fixedKeysWin(self):
        """A format field named like a fixed key does not replace it."""
        line = auditlog.eventAsLine(
            {"log_format": "x", "log_level": LogLevel.error, "log_time": 0.0, "level": "no"}
        )
        self.assertEqual(json.loads(line)["level"], "error")

    def test_auditEventHasNoText(self):
        """An audit event writes nothing to a text log; in JSON its message is its name."""
        events = capture(self)
        auditlog.change("account.create", "alice", "cli")
        [event] = [e for e in events if e.get("event") == "change"]
        self.assertIsNone(formatEventAsClassicLogText(event))
        self.assertEqual(json.loads(auditlog.eventAsLine(event))["message"], "change")

    def test_twistdObserverWhere(self):
        """``--logfile -`` (or none, with -n) is stdout; a name is that file."""
        for name in ("-", None):
            out = io.StringIO()
            self.patch(sys, "stdout", out)
            observer = auditlog.twistdObserver(name, True)
            Logger(namespace="proxy.test", observer=observer).info("hi {who}", who="me")
            self.assertEqual(json.loads(out.getvalue())["who"], "me")
        where = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, where)
        path = os.path.join(where, "twistd.log")
        observer = auditlog.twistdObserver(path, False)
        Logger(namespace="proxy.test", observer=observer).info("hello {who}", who="you")
        with open(path, encoding="utf-8") as f:
            self.assertEqual(json.loads(f.read())["who"], "you")


class IMAPLoginTests(ProxyServerTestCase):
    def connect(self, *args: Any, **kw: Any) -> Any:
        server = super().connect(*args, **kw)
        server.factory = SimpleNamespace(clock=self.clock)
        return server

    def login(self, user: bytes = b"alice") -> Any:
        self.greeted()
        self.events = capture(self)
        self.send(b"a LOGIN " + user + b" " + TOKEN.encode() + b"\r\n")
        self.clock.advance(2.5)
        return self.lastLogin()[1]

    def test_ok(self):
        """A login: ok, its account, token id, client and duration by the clock."""
        session = self.succeed(self.login())
        [event] = audit(self.events, "login")
        self.assertEqual(
            fields(event, "protocol", "result", "reason", "account", "token_id", "client"),
            {
                "protocol": "imap",
                "result": "ok",
                "reason": "-",
                "account": "alice",
                "token_id": session.tokenId,
                "client": "127.0.0.1",
            },
        )
        self.assertEqual(event["duration"], 2.5)

    def test_refused(self):
        """Refusals carry the fixed reason; no token id, no secret."""
        for error, reason in (
            (AccessDenied("scope"), "scope"),
            (UnauthorizedLogin(), "unknown-token"),
        ):
            self.login().errback(error)
            [event] = audit(self.events, "login")
            self.assertEqual(
                fields(event, "result", "reason", "account", "token_id"),
                {"result": "refused", "reason": reason, "account": "alice", "token_id": "-"},
            )
            self.assertNotIn(TOKEN, repr(self.events))
            self.disconnect()

    def test_failed(self):
        """A provider or store failure is ``failed`` with its reason code, not its text."""
        self.login().errback(Unavailable())
        [event] = audit(self.events, "login")
        self.assertEqual(
            fields(event, "result", "reason"), {"result": "failed", "reason": "unavailable"}
        )

    def test_tokenAsUserName(self):
        """A user name that is not an account id (a pasted token) is ``-``."""
        self.login(TOKEN.encode()).errback(UnauthorizedLogin())
        [event] = audit(self.events, "login")
        self.assertEqual(event["account"], "-")
        self.assertNotIn(TOKEN, repr(self.events))

    def test_privacyRequired(self):
        """A login refused before it starts is one event too."""
        self.greeted(address="192.0.2.1")
        events = capture(self)
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\n")
        [event] = audit(events, "login")
        self.assertEqual(
            fields(event, "result", "reason", "account", "client"),
            {
                "result": "refused",
                "reason": "privacy-required",
                "account": "-",
                "client": "192.0.2.1",
            },
        )

    def test_sessionEndByClient(self):
        """The session's end: bytes each way, duration, and that the client closed it."""
        upstream = FakeUpstream()
        session = self.succeed(self.login(), upstream)
        self.send(b"b NOOP\r\n")
        upstream.bytesReceived += 40
        self.clock.advance(10)
        self.server.connectionLost(Failure(ConnectionDone()))
        self.server.connected = False
        [event] = audit(self.events, "session-end")
        self.assertEqual(
            fields(event, "protocol", "account", "token_id", "client", "bytes_up", "bytes_down"),
            {
                "protocol": "imap",
                "account": "alice",
                "token_id": session.tokenId,
                "client": "127.0.0.1",
                "bytes_up": len(b"b NOOP\r\n"),
                "bytes_down": 40,
            },
        )
        self.assertEqual((event["closed_by"], event["duration"]), ("client", 10.0))

    def test_sessionEndByProviderAndOperator(self):
        """The provider closing, or an operator's close (shutdown named as such)."""
        upstream = FakeUpstream()
        self.succeed(self.login(), upstream)
        upstream.transport.loseConnection()
        self.assertEqual([e["closed_by"] for e in audit(self.events, "session-end")], ["provider"])
        self.disconnect()
        self.succeed(self.login())
        splice = self.server.splice
        assert splice is not None
        splice.close("shutdown")
        self.server.connectionLost(Failure(ConnectionDone()))
        self.server.connected = False
        self.assertEqual([e["closed_by"] for e in audit(self.events, "session-end")], ["shutdown"])


class SMTPLoginTests(SMTPTestCase):
    def test_okAndRefused(self):
        """The SMTP front door: one event a login, protocol smtp."""
        self.greeted()
        events = capture(self)
        self.authPlain().errback(AccessDenied("address"))
        self.authPlain()
        self.clock.advance(1.5)
        self.succeed(self.lastLogin()[1])
        logins = audit(events, "login")
        self.assertEqual(
            [fields(e, "protocol", "result", "reason", "account") for e in logins],
            [
                {"protocol": "smtp", "result": "refused", "reason": "address", "account": "alice"},
                {"protocol": "smtp", "result": "ok", "reason": "-", "account": "alice"},
            ],
        )
        self.assertEqual(logins[1]["duration"], 1.5)
        self.assertNotIn(TOKEN, repr(events))


class ChangeTests(AdminTestCase):
    def test_changesNameTheirActor(self):
        """Each admin operation logs its operation, target and actor (``cli`` by default)."""
        events = capture(self)
        self.addAccount()
        self.run_(self.admin.updateAccount("alice", {"state": "disabled"}, actor="t" * 64))
        token, record = self.run_(
            self.admin.issueToken(
                {"account": "alice", "scopes": ["imap-proxy"], "description": "x"}
            )
        )
        self.run_(self.admin.revokeToken(record.id, actor="a" * 64))
        self.run_(self.admin.removeAccount("alice"))
        self.assertEqual(
            [fields(e, "operation", "target", "actor") for e in audit(events, "change")],
            [
                {"operation": "account.create", "target": "alice", "actor": "cli"},
                {"operation": "account.update", "target": "alice", "actor": "t" * 64},
                {"operation": "token.issue", "target": tokenId(token), "actor": "cli"},
                {"operation": "token.revoke", "target": record.id, "actor": "a" * 64},
                {"operation": "account.delete", "target": "alice", "actor": "cli"},
            ],
        )
        self.assertNotIn(token, repr(events))
        [state] = audit(events, "account-state")
        self.assertEqual(
            fields(state, "account", "old_state", "new_state", "reason"),
            {"account": "alice", "old_state": "ok", "new_state": "disabled", "reason": "operator"},
        )

    def test_apiCallerIsTheActor(self):
        """A token issued over the API names its caller's token id."""
        root, caller = self.run_(self.admin.issueToken({"scopes": ["api"], "description": "r"}))
        events = capture(self)
        self.run_(self.admin.issueToken({"scopes": ["api"], "description": "c"}, caller))
        [event] = audit(events, "change")
        self.assertEqual(event["actor"], tokenId(root))

    def test_noStateEventWithoutChange(self):
        """An update that keeps the state logs no account-state event."""
        self.addAccount()
        events = capture(self)
        self.run_(self.admin.updateAccount("alice", {"email": "new@example.com"}))
        self.assertEqual(audit(events, "account-state"), [])


class ReauthStateTests(SynchronousTestCase):
    def test_invalidGrant(self):
        """invalid_grant's warning is also the account-state event, its text unchanged."""
        events = capture(self)
        marked: list[tuple[str, str]] = []

        async def markReauth(account: str, reason: str) -> None:
            marked.append((account, reason))

        tokens = AccessTokens(
            None, None, SimpleNamespace(seconds=lambda: 0.0), markReauth=markReauth
        )
        account = SimpleNamespace(id="alice", state="ok")
        self.successResultOf(
            ensureDeferred(tokens.refused(account, GrantInvalid(detail="revoked")))
        )
        [event] = audit(events, "account-state")
        self.assertEqual(
            fields(event, "account", "old_state", "new_state", "reason", "message"),
            {
                "account": "alice",
                "old_state": "ok",
                "new_state": "reauth-required",
                "reason": "invalid-grant",
                "message": "account alice needs re-authorization: "
                "the provider answered invalid_grant: revoked",
            },
        )
        self.assertEqual(marked, [("alice", "invalid_grant: revoked")])


# accountBody is imported for AdminTestCase's helpers.
__all__ = ["accountBody"]


class RegistryCloseTests(SynchronousTestCase):
    def test_shutdownOrOperator(self):
        """
        Closing every session (only a shutdown does) is recorded as
        ``shutdown``; closing an account's or a token's as ``operator``.
        """
        from proxy.imap.sessions import SessionRegistry

        class FakeSplice:
            def __init__(self) -> None:
                self.by: list[str] = []
                self.client = SimpleNamespace(address="127.0.0.1", bytesReceived=0)
                self.upstream = SimpleNamespace(bytesReceived=0)

            def close(self, by: str = "operator") -> None:
                self.by.append(by)

        registry = SessionRegistry()
        splice = FakeSplice()
        session = SimpleNamespace(account="a1", tokenId="t1", protocol="imap", server="h:993")
        registry.add(session, splice)  # type: ignore[arg-type]
        registry.close(account="a1")
        registry.close(tokenId="t1")
        registry.close()
        self.assertEqual(splice.by, ["operator", "operator", "shutdown"])
