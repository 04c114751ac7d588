"""
The login's choice of relay (``proxy.imap.restricted``): a token with
restrictions gets the policy relay, its capabilities filtered, its refusals
counted and logged; an unrestricted token keeps the plain splice.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any
from unittest import mock

import attrs
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from proxy.cred import IUpstreamSession
from proxy.metrics import Metrics
from proxy.model import Restrictions
from proxy.policy import PolicySplice, filterCapabilities
from proxy.relay import Splice
from tests.test_imap import TOKEN, FakeSession, FakeUpstream, ProxyServerTestCase

LIMITED = Restrictions(readOnly=True, mailboxes=("INBOX",))
CAPS = (b"IMAP4rev1", b"IDLE", b"COMPRESS=DEFLATE", b"NOTIFY", b"X-UNKNOWN")


@attrs.define(eq=False)
class RestrictedSession(FakeSession):
    restrictions: Restrictions | None = None


class RestrictedLoginTests(ProxyServerTestCase):
    def login(self, restrictions: Restrictions | None) -> tuple[Any, FakeUpstream]:
        self.greeted()
        self.send(b"a LOGIN alice " + TOKEN.encode() + b"\r\n")
        _, d = self.lastLogin()
        upstream = FakeUpstream(capabilities=CAPS)
        session = RestrictedSession(upstream, restrictions=restrictions)
        d.callback((IUpstreamSession, session, session.logout))
        return session, upstream

    def events(self) -> list[dict[str, Any]]:
        seen: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        return seen

    def test_unrestrictedKeepsSplice(self):
        """An unrestricted token's session is the plain Splice, told every capability."""
        self.login(None)
        self.assertIs(type(self.server.splice), Splice)
        self.assertEqual(
            self.output(), b"a OK [CAPABILITY " + b" ".join(CAPS) + b"] alice authenticated\r\n"
        )
        [live] = self.sessions.sessions()
        self.assertIsNone(live.view()["restrictions"])

    def test_restrictedGetsPolicySplice(self):
        """A restricted token's session is a PolicySplice with its restrictions."""
        self.login(LIMITED)
        splice = self.server.splice
        self.assertIsInstance(splice, PolicySplice)
        assert isinstance(splice, PolicySplice)
        self.assertEqual(splice.restrictions, LIMITED)
        [live] = self.sessions.sessions()
        self.assertEqual(live.view()["restrictions"], {"readOnly": True, "mailboxes": ["INBOX"]})

    def test_loginCapabilitiesFiltered(self):
        """The login's OK names the capabilities filterCapabilities leaves."""
        self.login(LIMITED)
        told = b" ".join(filterCapabilities(list(CAPS), LIMITED))
        self.assertEqual(self.output(), b"a OK [CAPABILITY " + told + b"] alice authenticated\r\n")

    def test_filterApplied(self):
        """What the filter removes is not in the login's OK (whatever the filter keeps)."""
        calls = []

        def fake(caps: list[bytes], r: Restrictions) -> list[bytes]:
            calls.append((caps, r))
            return [c for c in caps if c != b"NOTIFY"]

        with mock.patch("proxy.policy.filterCapabilities", fake):
            self.login(LIMITED)
        self.assertEqual(calls, [(list(CAPS), LIMITED)])
        self.assertNotIn(b"NOTIFY", self.output())

    def test_refusedCountedAndLogged(self):
        """Each refusal: a command-refused event (name, never arguments) and a metric."""
        events = self.events()
        self.login(LIMITED)
        metrics = Metrics(Clock(), process=False)
        metrics.watch(self.sessions)
        splice = self.server.splice
        assert isinstance(splice, PolicySplice)
        splice.onRefused("uid store")
        splice.onRefused("XSECRET-COMMAND")
        refused = [e for e in events if e.get("event") == "command-refused"]
        self.assertEqual([e["command"] for e in refused], ["UID STORE", "other"])
        self.assertEqual(
            {(e["account"], e["token_id"], e["client"]) for e in refused},
            {("alice", "tid-1", "127.0.0.1")},
        )
        value = metrics.registry.get_sample_value
        name = "imapproxy_commands_refused_total"
        self.assertEqual(value(name, {"command": "UID STORE"}), 1)
        self.assertEqual(value(name, {"command": "other"}), 1)

    def test_refusedWithoutMetrics(self):
        """Without metrics watching, a refusal is still logged and breaks nothing."""
        events = self.events()
        self.login(LIMITED)
        splice = self.server.splice
        assert isinstance(splice, PolicySplice)
        splice.onRefused("EXPUNGE")
        self.assertEqual(
            [e["command"] for e in events if e.get("event") == "command-refused"], ["EXPUNGE"]
        )


class ImportOrderTests(SynchronousTestCase):
    def test_policyFirst(self):
        """proxy.policy imported before proxy.imap (which imports it back) loads."""
        for first in ("proxy.policy", "proxy.imap"):
            done = subprocess.run(
                [sys.executable, "-c", f"import {first}, proxy.imap.restricted"],
                capture_output=True,
                text=True,
                cwd=os.path.dirname(os.path.abspath(__file__)),
                timeout=60,
            )
            self.assertEqual(done.returncode, 0, done.stderr)
