"""
Tests for ``proxy.tokens``: issuing tokens and the pure access check.
"""

from __future__ import annotations

import hashlib

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from proxy.admin import Admin, Forbidden
from proxy.errors import AccessDenied
from proxy.model import Token
from proxy.tokens import (
    addressAllowed,
    checkToken,
    hasScope,
    looksLikeToken,
    newToken,
    parseNetworks,
    parseScopes,
    tokenId,
    withinLimits,
)
from tests.test_api import MemoryStore

NOW = 1_700_000_000.0


def record(presented: str, **kw) -> Token:
    """A stored token record for ``presented``, overridable field by field."""
    fields = dict(
        id=tokenId(presented),
        account="alice",
        scopes=("imap-proxy",),
        description="test",
        addresses=(),
        created=NOW - 100,
        expires=None,
    )
    fields.update(kw)
    return Token(**fields)


class NewTokenTests(SynchronousTestCase):
    def test_shape(self):
        """A new token is 64 lower-case hex characters and its id is its SHA-256."""
        token, tid = newToken()
        self.assertEqual(len(token), 64)
        self.assertTrue(all(c in "0123456789abcdef" for c in token))
        self.assertEqual(tid, hashlib.sha256(token.encode()).hexdigest())
        self.assertNotEqual(tid, token)

    def test_unique(self):
        """Two new tokens differ."""
        self.assertNotEqual(newToken()[0], newToken()[0])

    def test_tokenIdIsHash(self):
        """tokenId is the hex SHA-256 of the UTF-8 token."""
        self.assertEqual(tokenId("abc"), hashlib.sha256(b"abc").hexdigest())

    def test_tokenIdSurrogates(self):
        """tokenId accepts text that came from undecodable bytes instead of raising."""
        self.assertEqual(len(tokenId("a\udcff")), 64)

    def test_looksLikeToken(self):
        """looksLikeToken accepts issued tokens and rejects other strings."""
        self.assertTrue(looksLikeToken(newToken()[0]))
        self.assertFalse(looksLikeToken("A" * 64))
        self.assertFalse(looksLikeToken("a" * 63))
        self.assertFalse(looksLikeToken("password"))


class ParseNetworksTests(SynchronousTestCase):
    def test_ipv4(self):
        """An IPv4 CIDR is kept, normalized with host bits cleared."""
        self.assertEqual(parseNetworks(["10.1.2.3/8"]), ("10.0.0.0/8",))

    def test_ipv6(self):
        """An IPv6 CIDR is normalized."""
        self.assertEqual(parseNetworks(["2001:DB8::1/32"]), ("2001:db8::/32",))

    def test_bareAddress(self):
        """A bare address means the single host."""
        self.assertEqual(parseNetworks([" 192.0.2.7 ", "::1"]), ("192.0.2.7/32", "::1/128"))

    def test_ipv4MappedNetworks(self):
        """
        An IPv4-mapped network (``::ffff:10.0.0.0/104``, as a dual-stack
        server's logs show IPv4 clients) is stored as the IPv4 network it
        means: the checks see such clients as IPv4, so the mapped form would
        match no one, and minting would not see it inside ``10.0.0.0/8``.
        """
        self.assertEqual(
            parseNetworks(["::ffff:10.0.0.0/104", "::ffff:192.0.2.7"]),
            ("10.0.0.0/8", "192.0.2.7/32"),
        )
        (network,) = parseNetworks(["::ffff:10.0.0.0/104"])
        self.assertTrue(addressAllowed("::ffff:10.1.2.3", [network]))
        self.assertTrue(addressAllowed("10.1.2.3", [network]))
        # Wider than the mapped range: an IPv6 network, kept as it is.
        self.assertEqual(parseNetworks(["::/80"]), ("::/80",))

    def test_garbage(self):
        """A bad entry raises ValueError naming it."""
        e = self.assertRaises(ValueError, parseNetworks, ["10.0.0.0/8", "nonsense"])
        self.assertIn("nonsense", str(e))

    def test_badPrefix(self):
        """A prefix length out of range is refused."""
        self.assertRaises(ValueError, parseNetworks, ["10.0.0.0/33"])

    def test_empty(self):
        """No networks is an empty tuple (no restriction)."""
        self.assertEqual(parseNetworks([]), ())


class ParseScopesTests(SynchronousTestCase):
    def test_known(self):
        """Known scopes are kept in order, duplicates dropped."""
        self.assertEqual(parseScopes(["imap-proxy", "api", "imap-proxy"]), ("imap-proxy", "api"))

    def test_star(self):
        """'*' is a valid scope."""
        self.assertEqual(parseScopes(["*"]), ("*",))

    def test_unknown(self):
        """An unknown scope raises ValueError naming it."""
        e = self.assertRaises(ValueError, parseScopes, ["imap-proxy", "pop3"])
        self.assertIn("pop3", str(e))

    def test_empty(self):
        """At least one scope is required."""
        self.assertRaises(ValueError, parseScopes, [])


class AddressAllowedTests(SynchronousTestCase):
    def test_inNetwork(self):
        """An IPv4 address inside a listed network is allowed."""
        self.assertTrue(addressAllowed("10.1.2.3", ["192.0.2.0/24", "10.0.0.0/8"]))

    def test_outsideNetwork(self):
        """An IPv4 address outside every listed network is refused."""
        self.assertFalse(addressAllowed("11.1.2.3", ["10.0.0.0/8"]))

    def test_ipv4Mapped(self):
        """An IPv4-mapped IPv6 peer is checked as the IPv4 address it carries."""
        self.assertTrue(addressAllowed("::ffff:127.0.0.1", ["127.0.0.0/8"]))
        self.assertFalse(addressAllowed("::ffff:192.0.2.1", ["127.0.0.0/8"]))

    def test_ipv6(self):
        """IPv6 addresses match IPv6 networks."""
        self.assertTrue(addressAllowed("2001:db8::5", ["2001:db8::/32"]))
        self.assertFalse(addressAllowed("2001:db9::5", ["2001:db8::/32"]))

    def test_ipv6ScopeId(self):
        """A zone index (fe80::1%eth0) is ignored for the check."""
        self.assertTrue(addressAllowed("fe80::1%eth0", ["fe80::/10"]))

    def test_versionMismatch(self):
        """An IPv4 address never matches an IPv6 network, nor the reverse."""
        self.assertFalse(addressAllowed("10.0.0.1", ["::/0"]))
        self.assertFalse(addressAllowed("::1", ["0.0.0.0/0"]))

    def test_garbageAddress(self):
        """A peer that is not an IP address (a UNIX socket, 'unknown') is refused."""
        self.assertFalse(addressAllowed("unknown", ["0.0.0.0/0"]))


class CheckTokenTests(SynchronousTestCase):
    token = "a" * 64

    def check(self, rec, presented=None, **kw):
        args = dict(account="alice", scope="imap-proxy", address="10.0.0.1", now=NOW)
        args.update(kw)
        return checkToken(rec, self.token if presented is None else presented, **args)

    def reason(self, rec, presented=None, **kw) -> str:
        e = self.assertRaises(AccessDenied, self.check, rec, presented, **kw)
        return e.reason

    def test_ok(self):
        """A matching, unexpired, in-scope token for the account is returned."""
        rec = record(self.token)
        self.assertIs(self.check(rec), rec)

    def test_unknown(self):
        """No stored record is unknown-token."""
        self.assertEqual(self.reason(None), "unknown-token")

    def test_hashMismatch(self):
        """A record whose id is not the hash of the presented token is unknown-token."""
        self.assertEqual(self.reason(record("b" * 64)), "unknown-token")

    def test_expired(self):
        """A token at or past its expiry is expired."""
        self.assertEqual(self.reason(record(self.token, expires=NOW)), "expired")
        self.assertEqual(self.reason(record(self.token, expires=NOW - 1)), "expired")

    def test_notYetExpired(self):
        """A token before its expiry passes."""
        rec = record(self.token, expires=NOW + 1)
        self.assertIs(self.check(rec), rec)

    def test_scope(self):
        """A token without the needed scope is refused with scope."""
        self.assertEqual(self.reason(record(self.token, scopes=("api",))), "scope")

    def test_starScope(self):
        """The '*' scope grants every scope."""
        rec = record(self.token, scopes=("*",))
        self.assertIs(self.check(rec, scope="smtp"), rec)
        self.assertTrue(hasScope(rec, "api"))

    def test_username(self):
        """A token of another account is refused with username."""
        self.assertEqual(self.reason(record(self.token), account="bob"), "username")

    def test_rootTokenUsername(self):
        """A root token (no account) cannot log in as an account."""
        self.assertEqual(self.reason(record(self.token, account=None)), "username")

    def test_accountNone(self):
        """account=None skips the account check."""
        rec = record(self.token, account="bob")
        self.assertIs(self.check(rec, account=None), rec)

    def test_address(self):
        """A token restricted to networks refuses other addresses."""
        rec = record(self.token, addresses=("192.0.2.0/24",))
        self.assertEqual(self.reason(rec), "address")
        self.assertIs(self.check(rec, address="192.0.2.9"), rec)

    def test_addressIPv4Mapped(self):
        """The address restriction understands IPv4-mapped IPv6 peers."""
        rec = record(self.token, addresses=("127.0.0.0/8",))
        self.assertIs(self.check(rec, address="::ffff:127.0.0.1"), rec)

    def test_orderExpiredBeforeScope(self):
        """Expiry is checked before scope."""
        rec = record(self.token, expires=NOW - 1, scopes=("api",))
        self.assertEqual(self.reason(rec), "expired")

    def test_orderScopeBeforeUsername(self):
        """Scope is checked before the account."""
        rec = record(self.token, scopes=("api",), account="bob")
        self.assertEqual(self.reason(rec), "scope")

    def test_orderUsernameBeforeAddress(self):
        """The account is checked before the address."""
        rec = record(self.token, account="bob", addresses=("192.0.2.0/24",))
        self.assertEqual(self.reason(rec), "username")

    def test_orderUnknownFirst(self):
        """A hash mismatch wins over every other failure."""
        rec = record(
            "b" * 64, expires=NOW - 1, scopes=("api",), account="bob", addresses=("1.2.3.4",)
        )
        self.assertEqual(self.reason(rec), "unknown-token")

    def test_deniedTextsFixed(self):
        """AccessDenied's IMAP response is the fixed text and never the token."""
        e = self.assertRaises(AccessDenied, self.check, None)
        self.assertEqual(
            e.imapResponse(),
            b"NO [AUTHENTICATIONFAILED] Access denied, failed to authenticate user",
        )
        self.assertNotIn(self.token.encode(), e.imapResponse())


# -- minting bounded by the minter ---------------------------------------------------------


def minted(**kw) -> Token:
    fields = dict(id="", account="alice", scopes=("imap-proxy",), description="new", created=NOW)
    fields.update(kw)
    return Token(**fields)


def minter(**kw) -> Token:
    fields = dict(id="m" * 64, account=None, scopes=("api",), description="minter", created=NOW)
    fields.update(kw)
    return Token(**fields)


class WithinLimitsTests(SynchronousTestCase):
    def test_scopes(self):
        """api grants api and the mail scopes; * only from *; a mail token grants nothing."""
        self.assertIsNone(withinLimits(minter(), minted(scopes=("imap-proxy", "smtp", "api"))))
        self.assertIn("scope *", withinLimits(minter(), minted(scopes=("*",))))
        self.assertIsNone(withinLimits(minter(scopes=("*",)), minted(scopes=("*",))))
        self.assertIn("imap-proxy", withinLimits(minter(scopes=("smtp",)), minted()))

    def test_account(self):
        """An account token mints for its own account only, never a root token."""
        own = minter(account="alice")
        self.assertIsNone(withinLimits(own, minted(account="alice")))
        self.assertIn("own account", withinLimits(own, minted(account="bob")))
        self.assertIn("own account", withinLimits(own, minted(account=None)))
        self.assertIsNone(withinLimits(minter(), minted(account=None)))

    def test_expiry(self):
        """An expiring minter: nothing later, nothing that never expires."""
        m = minter(expires=NOW + 120)
        self.assertIsNone(withinLimits(m, minted(expires=NOW + 120)))
        self.assertIn("outlives", withinLimits(m, minted(expires=NOW + 121)))
        self.assertIn("never", withinLimits(m, minted(expires=None)))
        self.assertIsNone(withinLimits(minter(), minted(expires=None)))

    def test_addresses(self):
        """A restricted minter: each network inside one of its own; never unrestricted."""
        m = minter(addresses=("127.0.0.0/8", "2001:db8::/32"))
        self.assertIsNone(withinLimits(m, minted(addresses=("127.0.0.1/32", "2001:db8:1::/48"))))
        self.assertIn("unrestricted", withinLimits(m, minted(addresses=())))
        self.assertIn("0.0.0.0/0", withinLimits(m, minted(addresses=("0.0.0.0/0",))))
        self.assertIn("::/0", withinLimits(m, minted(addresses=("127.0.0.1/32", "::/0"))))
        # An IPv4 network never lies inside an IPv6 one, nor the reverse.
        v6 = minter(addresses=("::/0",))
        self.assertIn("10.0.0.0/8", withinLimits(v6, minted(addresses=("10.0.0.0/8",))))


class AdminMintingTests(SynchronousTestCase):
    """``Admin.issueToken``, the path of both the API and the admin command."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.store = MemoryStore(self.clock)
        self.admin = Admin(self.store, clock=self.clock)

    def issue(self, data, caller=None):
        return ensureDeferred(self.admin.issueToken(data, caller))

    def test_callerBounds(self):
        """A minting token's limits are enforced (Forbidden) and inherited where left out."""
        m = minter(expires=NOW + 120, addresses=("127.0.0.1/32",))
        wide = {"scopes": ["imap-proxy"], "description": "x", "expiresIn": 3600}
        self.failureResultOf(self.issue(wide, m), Forbidden)
        self.assertEqual(self.store.tokens, {})
        _, record = self.successResultOf(self.issue({"scopes": ["smtp"], "description": "x"}, m))
        self.assertEqual((record.expires, record.addresses), (NOW + 120, ("127.0.0.1/32",)))

    def test_operatorUnbounded(self):
        """The admin command (no caller) issues any token: it holds the store itself."""
        data = {"scopes": ["*"], "description": "ops", "restrictions": {"addresses": []}}
        _, record = self.successResultOf(self.issue(data))
        self.assertEqual((record.scopes, record.expires, record.addresses), (("*",), None, ()))
