"""
A token's IMAP restrictions outside the wire (``proxy.restrictions``): read
from a request, stored, shown by the API and the admin command, never widened
by a token that mints one, and no mail sent by a read-only token. The relay
that enforces them is ``proxy.policy``'s (its own tests); choosing it at login
is ``tests/test_imap_restricted.py``'s.
"""

from __future__ import annotations

import io
from typing import Any
from unittest import mock

import attrs
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from proxy import cli
from proxy.admin import Admin, AdminError
from proxy.errors import AccessDenied
from proxy.model import Restrictions, Token
from proxy.restrictions import (
    MAX_MAILBOXES,
    MAX_PATTERN_LENGTH,
    commandLabel,
    decodeRestrictions,
    encodeRestrictions,
    parseRestrictions,
    restrictionRefusal,
)
from proxy.store import MemoryStore
from proxy.tokens import checkToken
from tests.test_api import APITestCase, requestSchema, schemaErrors, tokenBody
from tests.test_tokens import NOW, record

LIMITED = Restrictions(readOnly=True, mailboxes=("INBOX", "Archive/*"))


class ParseTests(SynchronousTestCase):
    def test_parsed(self):
        """readOnly and mailboxes are read; duplicates go, order stays."""
        got = parseRestrictions({"readOnly": True, "mailboxes": ["INBOX", "A/*", "INBOX"]})
        self.assertEqual(got, Restrictions(readOnly=True, mailboxes=("INBOX", "A/*")))

    def test_nothingRestricted(self):
        """Absent, null, false and empty all mean unrestricted (None)."""
        for data in (None, {}, {"readOnly": False}, {"mailboxes": []}, {"addresses": ["::1"]}):
            self.assertIsNone(parseRestrictions(data), data)
        self.assertIsNone(parseRestrictions({"readOnly": None, "mailboxes": None}))

    def test_refused(self):
        """Bad patterns and a non-boolean readOnly are refused, naming the field."""
        for data in (
            {"readOnly": "yes"},
            {"readOnly": 1},
            {"mailboxes": "INBOX"},
            {"mailboxes": [""]},
            {"mailboxes": [7]},
            {"mailboxes": ["a\x00b"]},
            {"mailboxes": ["a\rb"]},
            {"mailboxes": ["a\nb"]},
            {"mailboxes": ["x" * (MAX_PATTERN_LENGTH + 1)]},
            {"mailboxes": [f"m{i}" for i in range(MAX_MAILBOXES + 1)]},
        ):
            e = self.assertRaises(ValueError, parseRestrictions, data)
            self.assertTrue(str(e).startswith("restrictions."), str(e))

    def test_bounds(self):
        """The longest pattern and the most patterns allowed are accepted."""
        long = parseRestrictions({"mailboxes": ["x" * MAX_PATTERN_LENGTH]})
        self.assertEqual(long, Restrictions(mailboxes=("x" * MAX_PATTERN_LENGTH,)))
        many = parseRestrictions({"mailboxes": [f"m{i}" for i in range(MAX_MAILBOXES)]})
        assert many is not None
        self.assertEqual(len(many.mailboxes), MAX_MAILBOXES)

    def test_column(self):
        """The store column round-trips; unrestricted is no column at all."""
        for r in (LIMITED, Restrictions(mailboxes=("&AOQ-/*",)), Restrictions(readOnly=True)):
            self.assertEqual(decodeRestrictions(encodeRestrictions(r)), r)
        self.assertIsNone(encodeRestrictions(None))
        self.assertIsNone(encodeRestrictions(Restrictions()))
        self.assertIsNone(decodeRestrictions(None))

    def test_commandLabel(self):
        """A refused command's metric label is a known name upper-cased, else other."""
        self.assertEqual(commandLabel("store"), "STORE")
        self.assertEqual(commandLabel("uid expunge"), "UID EXPUNGE")
        for junk in ("", "XFOO", "UID XFOO", "STORE STORE", "a b c", "st\x00ore"):
            self.assertEqual(commandLabel(junk), "other", junk)

    def test_policyNamesLabelled(self):
        """Every name the policy relay reports keeps its own label (none lumped in other)."""
        from proxy.policy.commandfilter import KNOWN

        for name in sorted(KNOWN):
            self.assertEqual(commandLabel(name.decode()), name.decode())
        self.assertEqual(commandLabel("OTHER"), "other")


def minter(r: Restrictions | None) -> Token:
    return Token(id="m", account="alice", scopes=("api",), description="m", restrictions=r)


class LeastPrivilegeTests(SynchronousTestCase):
    def test_unrestrictedMinterAnything(self):
        """An unrestricted minter may issue any restrictions, or none."""
        for r in (None, LIMITED):
            self.assertIsNone(restrictionRefusal(minter(None), attrs.evolve(minter(r), id="n")))

    def test_readOnlyStays(self):
        """A read-only minter cannot issue a token that may write."""
        m = minter(Restrictions(readOnly=True))
        self.assertIsNotNone(restrictionRefusal(m, minter(None)))
        self.assertIsNotNone(restrictionRefusal(m, minter(Restrictions(mailboxes=("INBOX",)))))
        self.assertIsNone(restrictionRefusal(m, minter(Restrictions(readOnly=True))))

    def test_mailboxesSubset(self):
        """Each pattern must be one of the minter's, compared as written."""
        m = minter(LIMITED)
        ok = Restrictions(readOnly=True, mailboxes=("Archive/*",))
        self.assertIsNone(restrictionRefusal(m, minter(ok)))
        for wider in (("*",), ("INBOX", "Sent"), ("Archive/%",), ("Archive*",)):
            asked = minter(Restrictions(readOnly=True, mailboxes=wider))
            self.assertIsNotNone(restrictionRefusal(m, asked), wider)
        self.assertIsNotNone(restrictionRefusal(m, minter(Restrictions(readOnly=True))))


class SMTPTests(SynchronousTestCase):
    token = "a" * 64

    def test_readOnlySendsNoMail(self):
        """A read-only token holding * may log in to IMAP but not SMTP (scope)."""
        rec = attrs.evolve(record(self.token, scopes=("*",)), restrictions=LIMITED)
        args = dict(account="alice", address="10.0.0.1", now=NOW)
        self.assertIs(checkToken(rec, self.token, scope="imap-proxy", **args), rec)
        e = self.assertRaises(AccessDenied, checkToken, rec, self.token, scope="smtp", **args)
        self.assertEqual(e.reason, "scope")

    def test_mailboxOnlySendsMail(self):
        """Mailbox patterns restrict IMAP only: such a token with smtp may send."""
        rec = attrs.evolve(
            record(self.token, scopes=("smtp",)), restrictions=Restrictions(mailboxes=("INBOX",))
        )
        got = checkToken(rec, self.token, account="alice", scope="smtp", address="::1", now=NOW)
        self.assertIs(got, rec)


class APITests(APITestCase):
    def setUp(self) -> None:
        super().setUp()
        self.addAccount("alice")

    def restrictedCaller(self, r: Restrictions, scopes: tuple[str, ...] = ("api",)) -> str:
        token = self.addToken("alice", scopes)
        tid = next(t for t in self.store.tokens if self.store.tokens[t].scopes == scopes)
        self.store.tokens[tid] = attrs.evolve(self.store.tokens[tid], restrictions=r)
        return token

    def issue(self, body: dict[str, Any], token: Any = None) -> Token:
        self.assertEqual(schemaErrors(requestSchema("POST", "/v1/tokens"), body, write=True), [])
        kw = {} if token is None else {"token": token}
        reply = self.assertOK(self.call("POST", "/v1/tokens", body, **kw))
        return self.store.tokens[reply["id"]]  # type: ignore[no-any-return]

    def test_issueAndShow(self):
        """POST stores readOnly and mailboxes; the token view and listings show them."""
        body = tokenBody(
            account="alice",
            restrictions={"readOnly": True, "mailboxes": ["INBOX", "Archive/*"]},
        )
        rec = self.issue(body)
        self.assertEqual(rec.restrictions, LIMITED)
        for path in ("/v1/tokens?account=alice", "/v1/tokens/account/alice"):
            [view] = [
                t for t in self.assertOK(self.call("GET", path))["tokens"] if t["id"] == rec.id
            ]
            self.assertEqual(
                view["restrictions"], {"readOnly": True, "mailboxes": ["INBOX", "Archive/*"]}
            )

    def test_unrestrictedShowsNone(self):
        """An unrestricted token's view has no readOnly or mailboxes (networks only when set)."""
        rec = self.issue(tokenBody(account="alice", restrictions={"addresses": ["10.0.0.0/8"]}))
        self.assertIsNone(rec.restrictions)
        [view] = [
            t
            for t in self.assertOK(self.call("GET", "/v1/tokens?account=alice"))["tokens"]
            if t["id"] == rec.id
        ]
        self.assertEqual(view["restrictions"], {"addresses": ["10.0.0.0/8"]})

    BAD = [
        ("readOnly not a boolean", {"readOnly": "true"}),
        ("mailboxes not a list", {"mailboxes": "INBOX"}),
        ("empty pattern", {"mailboxes": [""]}),
        ("pattern not a string", {"mailboxes": [1]}),
        ("NUL", {"mailboxes": ["a\x00"]}),
        ("CR", {"mailboxes": ["a\r"]}),
        ("LF", {"mailboxes": ["\nb"]}),
        ("too long", {"mailboxes": ["x" * (MAX_PATTERN_LENGTH + 1)]}),
        ("too many", {"mailboxes": [f"m{i}" for i in range(MAX_MAILBOXES + 1)]}),
    ]

    def test_badRestrictions(self):
        """Each bad restriction is a 400 that stores nothing, and the schema says so too."""
        before = self.store.snapshot()
        for name, restrictions in self.BAD:
            body = tokenBody(account="alice", restrictions=restrictions)
            self.assertError(self.call("POST", "/v1/tokens", body), 400)
            errors = schemaErrors(requestSchema("POST", "/v1/tokens"), body, write=True)
            self.assertNotEqual(errors, [], f"the OpenAPI schema accepts {name}")
        self.assertEqual(self.store.snapshot(), before)

    def test_readOnlyNoSMTPScope(self):
        """Asking for scope smtp with readOnly is a 400 naming why."""
        before = self.store.snapshot()
        body = tokenBody(
            account="alice", scopes=["imap-proxy", "smtp"], restrictions={"readOnly": True}
        )
        reply = self.call("POST", "/v1/tokens", body)
        self.assertError(reply, 400)
        self.assertIn("smtp", reply.json["error"])
        self.assertEqual(self.store.snapshot(), before)

    def test_restrictedMinterInherits(self):
        """A restricted api token's new token takes its restrictions when none are asked."""
        caller = self.restrictedCaller(LIMITED)
        rec = self.issue(tokenBody(account="alice"), caller)
        self.assertEqual(rec.restrictions, LIMITED)
        narrower = {"mailboxes": ["INBOX"]}
        rec = self.issue(tokenBody(account="alice", restrictions=narrower), caller)
        self.assertEqual(rec.restrictions, Restrictions(readOnly=True, mailboxes=("INBOX",)))

    def test_restrictedMinterNoWider(self):
        """A restricted api token cannot mint a token that writes or sees more (403)."""
        caller = self.restrictedCaller(LIMITED)
        before = self.store.snapshot()
        for restrictions in (
            {"readOnly": False},
            {"mailboxes": ["*"]},
            {"mailboxes": []},
            {"mailboxes": ["INBOX", "Sent"]},
            {"readOnly": False, "mailboxes": ["INBOX"]},
        ):
            body = tokenBody(account="alice", restrictions=restrictions)
            reply = self.call("POST", "/v1/tokens", body, token=caller)
            self.assertError(reply, 403)
        self.assertEqual(self.store.snapshot(), before)

    def test_readOnlyMinterNoSMTP(self):
        """A read-only api token cannot mint a token that sends mail (its read-only inherited)."""
        caller = self.restrictedCaller(Restrictions(readOnly=True))
        body = tokenBody(account="alice", scopes=["smtp"])
        before = self.store.snapshot()
        reply = self.call("POST", "/v1/tokens", body, token=caller)
        self.assertError(reply, 403)
        self.assertIn("smtp", reply.json["error"])
        self.assertEqual(self.store.snapshot(), before)

    def test_restrictedRevokesOnlyNarrower(self):
        """A restricted api token revokes tokens as restricted as itself, no wider ones (403)."""
        caller = self.restrictedCaller(LIMITED)
        wide = self.issue(tokenBody(account="alice"))  # by root: unrestricted
        narrow = self.issue(tokenBody(account="alice"), caller)  # inherits LIMITED
        reply = self.call("DELETE", f"/v1/tokens/{wide.id}", token=caller)
        self.assertError(reply, 403)
        self.assertIn(wide.id, self.store.tokens)
        self.assertOK(self.call("DELETE", f"/v1/tokens/{narrow.id}", token=caller))
        self.assertNotIn(narrow.id, self.store.tokens)


class CLITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = MemoryStore()
        self.store.openBlocking()
        self.admin = Admin(self.store)

    def tokens(self) -> list[Token]:
        return self.successResultOf(self.store.listTokens(None))  # type: ignore[no-any-return]

    def run_(self, *argv: str) -> str:
        args = cli._parser().parse_args(list(argv))
        out = io.StringIO()
        with mock.patch("sys.stderr", io.StringIO()):
            d = Deferred.fromCoroutine(cli._run(args, self.admin, out))
        self.successResultOf(d)
        return out.getvalue()

    def test_issueRestricted(self):
        """--read-only and repeated --mailbox make a restricted token; the listing shows it."""
        self.run_("tokens", "issue", "--scope", "*", "--description", "root")
        self.run_(
            "tokens", "issue", "--scope", "imap-proxy", "--description", "backup",
            "--read-only", "--mailbox", "INBOX", "--mailbox", "Archive/*",
        )  # fmt: skip
        [rec] = [t for t in self.tokens() if t.description == "backup"]
        self.assertEqual(rec.restrictions, LIMITED)
        lines = self.run_("tokens", "list").splitlines()
        [line] = [x for x in lines if x.startswith(rec.id)]
        self.assertTrue(line.endswith("\tread-only mailboxes=INBOX,Archive/*"), line)
        [other] = [x for x in lines if not x.startswith(rec.id)]
        self.assertTrue(other.endswith("\t-"), other)
        self.assertIn('"readOnly": true', self.run_("tokens", "list", "--json"))

    def test_readOnlySMTPRefused(self):
        """--read-only with --scope smtp is refused; nothing is stored."""
        args = cli._parser().parse_args(
            ["tokens", "issue", "--scope", "smtp", "--description", "x", "--read-only"]
        )
        with mock.patch("sys.stderr", io.StringIO()):
            d = Deferred.fromCoroutine(cli._run(args, self.admin, io.StringIO()))
        self.assertIn("smtp", str(self.failureResultOf(d, AdminError).value))
        self.assertEqual(self.tokens(), [])

    def test_helpRenders(self):
        """The issue command's help (with its % wildcard) renders."""
        out = io.StringIO()
        with mock.patch("sys.stdout", out):
            self.assertRaises(SystemExit, cli.main, ["tokens", "issue", "--help"])
        self.assertIn("--mailbox PATTERN", out.getvalue())
