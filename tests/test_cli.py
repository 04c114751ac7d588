"""
Tests for the admin command (``proxy.cli``, ``proxy._cliactions``): its
parsing and how each failure becomes one line, without a reactor. The
command run end to end is in ``test_integration_startup``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
from unittest import mock

import requests
from cryptography.fernet import Fernet
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from proxy import __version__, cli
from proxy._cliactions import awaitPickup, checkServerUsesNewest, errorLine, openStore
from proxy.admin import Admin, AdminError
from proxy.encryption import (
    ENV_VAR,
    SecretKeyError,
    keyFingerprint,
    newKey,
    writeKeyFile,
    writeLoadedMarker,
)
from proxy.model import Account, Upstream
from proxy.store import MemoryStore, makeStore
from proxy.tokens import newToken
from tests.test_store import token as storedToken


class TempDirMixin:
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="imapproxy-test-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        saved = os.environ.pop(ENV_VAR, None)
        if saved is not None:
            self.addCleanup(os.environ.__setitem__, ENV_VAR, saved)

    def exits(self, f, *args, **kwargs) -> tuple[object, str]:
        """Run ``f`` to its SystemExit: (exit code, standard error)."""
        err = io.StringIO()
        with mock.patch("sys.stderr", err):
            e = self.assertRaises(SystemExit, f, *args, **kwargs)
        return e.code, err.getvalue()


class ParserTests(TempDirMixin, SynchronousTestCase):
    def test_usageErrorIsOneLine(self):
        """A usage error is one 'imapproxy: …' line and status 2, without the usage text."""
        code, err = self.exits(cli.main, ["tokens", "issue", "--scope", "api"])
        self.assertEqual(code, 2)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertTrue(err.startswith("imapproxy: imapproxy tokens issue: "), err)
        self.assertIn("--description", err)

    def test_unknownCommand(self):
        """An unknown command is one line too."""
        code, err = self.exits(cli.main, ["accounts", "frobnicate"])
        self.assertEqual((code, err.count("\n")), (2, 1), err)

    def test_version(self):
        """--version prints imapproxy's version."""
        out = io.StringIO()
        with mock.patch("sys.stdout", out):
            e = self.assertRaises(SystemExit, cli.main, ["--version"])
        self.assertEqual(e.code, 0)
        self.assertEqual(out.getvalue(), f"imapproxy {__version__}\n")

    def test_storeHelpNamesRedis(self):
        """--store's help names the Redis URLs as well as SQLite's."""
        out = io.StringIO()
        with mock.patch("sys.stdout", out):
            self.assertRaises(SystemExit, cli.main, ["accounts", "list", "--help"])
        text = " ".join(out.getvalue().split())
        self.assertIn("sqlite:///ABSOLUTE/PATH", text)
        self.assertIn("redis://", text)

    def test_readOnlyCommandsCreateNothing(self):
        """Read-only commands never create a store or key: one line saying there is none."""
        url = f"sqlite://{self.dir}/state/imapproxy.sqlite3"
        for argv in (["accounts", "list"], ["tokens", "list"], ["secrets", "add-key"]):
            code, _err = self.exits(cli.main, [*argv, "--store", url])
            self.assertIn("no store at", str(code))
            self.assertTrue(str(code).startswith("imapproxy: "))
        self.assertEqual(os.listdir(self.dir), [])


class OpenStoreTests(TempDirMixin, SynchronousTestCase):
    def test_missingStoreNotCreated(self):
        """create=False: no file, no key, no directory appears."""
        path = os.path.join(self.dir, "s", "x.sqlite3")
        code, _ = self.exits(openStore, f"sqlite://{path}", None, create=False)
        self.assertEqual(code, f"imapproxy: no store at {path} " + str(code).split(path + " ")[1])
        self.assertEqual(os.listdir(self.dir), [])

    def test_twoSlashes(self):
        """sqlite://var/… is refused in one line before anything is created."""
        cwd = os.getcwd()
        os.chdir(self.dir)
        self.addCleanup(os.chdir, cwd)
        code, _ = self.exits(openStore, "sqlite://var/lib/imapproxy/x.sqlite3", None)
        self.assertIn("three slashes", str(code))
        self.assertEqual(os.listdir(self.dir), [])

    def test_unknownScheme(self):
        """An unknown scheme is refused in one line."""
        code, _ = self.exits(openStore, "postgres://db/x", None)
        self.assertIn("unsupported store URL", str(code))

    def test_uncreatableDirectory(self):
        """A state directory that cannot be created is one line naming the file."""
        blocker = os.path.join(self.dir, "file")
        open(blocker, "w").close()
        code, _ = self.exits(openStore, f"sqlite://{blocker}/x.sqlite3", None)
        self.assertEqual(
            code, f"imapproxy: cannot create secret file {blocker}/secret.key: File exists"
        )

    def test_newStoreAndKeyAnnounced(self):
        """Creating a store and its key says so on standard error (back the key up)."""
        err = io.StringIO()
        with mock.patch("sys.stderr", err):
            store = openStore(f"sqlite://{self.dir}/x.sqlite3", None)
        store._closeBlocking()
        self.assertIn(f"created a new store {self.dir}/x.sqlite3", err.getvalue())
        self.assertIn(f"created a new secret key {self.dir}/secret.key: back it up", err.getvalue())


class NewStoreOwnerTests(TempDirMixin, SynchronousTestCase):
    def test_rootGivesNewFilesToTheStateOwner(self):
        """Root creating a store in the service user's directory gives it the new files."""
        if os.geteuid() != 0:
            self.skipTest("needs root")
        state = os.path.join(self.dir, "state")
        os.mkdir(state, 0o700)
        os.chown(state, 65534, 65534)
        with mock.patch("sys.stderr", io.StringIO()):
            store = openStore(f"sqlite://{state}/x.sqlite3", None)
        store._closeBlocking()
        for name in ("x.sqlite3", "secret.key"):
            st = os.stat(os.path.join(state, name))
            self.assertEqual((st.st_uid, st.st_gid), (65534, 65534), name)


class ErrorLineTests(SynchronousTestCase):
    def request(self, url: str) -> requests.PreparedRequest:
        return requests.Request("POST", url).prepare()

    def test_untrustedCertificate(self):
        """An untrusted provider certificate names the host and how to trust a private CA."""
        e = requests.exceptions.SSLError(
            "CERTIFICATE_VERIFY_FAILED",
            request=self.request("https://idp.example:8443/device?client_secret=s3cret"),
        )
        line = errorLine(e)
        self.assertIn("idp.example:8443", line)
        self.assertIn("REQUESTS_CA_BUNDLE", line)
        self.assertNotIn("s3cret", line)

    def test_unreachable(self):
        """A provider that cannot be reached is named, nothing more."""
        e = requests.ConnectionError(
            "Max retries exceeded", request=self.request("http://127.0.0.1:9/x")
        )
        self.assertEqual(errorLine(e), "cannot connect to 127.0.0.1:9")

    def test_timeout(self):
        e = requests.Timeout("read timed out", request=self.request("http://127.0.0.1:9/x"))
        self.assertEqual(errorLine(e), "127.0.0.1:9 did not answer in time")

    def test_oserror(self):
        """An OSError is its reason and the file."""
        e = PermissionError(13, "Permission denied", "/var/lib/imapproxy/secret.key")
        self.assertEqual(errorLine(e), "Permission denied: /var/lib/imapproxy/secret.key")

    def test_ownErrorsShownAsIs(self):
        self.assertEqual(errorLine(AdminError("no such account")), "no such account")

    def test_unexpected(self):
        """Anything else is named by its kind, its text never echoed."""
        self.assertEqual(errorLine(KeyError("secret")), "unexpected KeyError (please report it)")


class KeyFileTests(TempDirMixin, SynchronousTestCase):
    def keyFile(self) -> str:
        path = os.path.join(self.dir, "secret.key")
        with open(path, "wb") as f:
            f.write(newKey() + b"\n")
        os.chmod(path, 0o640)
        return path

    def test_ownerKept(self):
        """Root rewriting the key file keeps its owner, group and mode."""
        if os.geteuid() != 0:
            self.skipTest("needs root to give the file to another user")
        path = self.keyFile()
        os.chown(path, 65534, 65534)
        writeKeyFile(path, [newKey(), newKey()])
        st = os.stat(path)
        self.assertEqual((st.st_uid, st.st_gid, st.st_mode & 0o777), (65534, 65534, 0o640))
        self.assertEqual(len([n for n in os.listdir(self.dir) if n.startswith("secret.key.")]), 0)

    def test_ownerCannotBeKept(self):
        """When the owner cannot be kept the file is left alone and the user is named."""
        path = self.keyFile()
        with open(path, "rb") as f:
            before = f.read()
        # As a user that is not the file's owner (and not root).
        with (
            mock.patch("os.geteuid", return_value=4242),
            mock.patch("os.fchown", side_effect=PermissionError(1, "Operation not permitted")),
        ):
            e = self.assertRaises(SecretKeyError, writeKeyFile, path, [newKey()])
        self.assertIn("run the command as that user", str(e))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertEqual(os.listdir(self.dir), ["secret.key"])


class PickupTests(TempDirMixin, SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.path = os.path.join(self.dir, "secret.key")
        self.old, self.new = newKey(), newKey()
        self.clock = Clock()

    def wait(self):
        return ensureDeferred(awaitPickup(self.path, self.new, self.clock, 12, step=0.5))

    def test_noServerEver(self):
        """No record beside the key: no server used it yet, nothing to wait for."""
        self.assertIn("no server has recorded", self.successResultOf(self.wait()))

    def test_serverGone(self):
        """A record by a process that is gone: said, no waiting."""
        writeLoadedMarker(self.path, [self.old], 2**22 + 12345)
        self.assertIn("no server is running", self.successResultOf(self.wait()))

    def test_pickedUp(self):
        """A running server that records the new key within the wait: said."""
        writeLoadedMarker(self.path, [self.old], os.getpid())
        d = self.wait()
        self.assertNoResult(d)
        writeLoadedMarker(self.path, [self.new, self.old], os.getpid())
        self.clock.advance(0.5)
        self.assertIn(f"pid {os.getpid()}) now uses it", self.successResultOf(d))

    def test_notPickedUp(self):
        """A running server that does not load the key in time is a failure naming the file."""
        writeLoadedMarker(self.path, [self.old], os.getpid())
        d = self.wait()
        for _ in range(30):
            self.clock.advance(0.5)
        e = self.failureResultOf(d, AdminError).value
        self.assertIn("did not load the new key within 12 s", str(e))
        self.assertIn(self.path, str(e))

    def test_rotateRefusedWhileServerUsesOldKey(self):
        """'secrets rotate' refuses while a running server encrypts under an older key."""
        writeLoadedMarker(self.path, [self.old], os.getpid())
        e = self.assertRaises(AdminError, checkServerUsesNewest, self.path, self.new)
        self.assertIn("does not use the newest key", str(e))
        writeLoadedMarker(self.path, [self.new, self.old], os.getpid())
        checkServerUsesNewest(self.path, self.new)
        # A server that is gone does not hold the rotation up.
        writeLoadedMarker(self.path, [self.old], 2**22 + 12345)
        checkServerUsesNewest(self.path, self.new)

    def test_fingerprintIsOneWay(self):
        """The record names keys by a short digest, never the key."""
        writeLoadedMarker(self.path, [self.new], 1)
        with open(self.path + ".loaded") as f:
            text = f.read()
        self.assertNotIn(self.new.decode(), text)
        self.assertIn(keyFingerprint(self.new), text)


class AccountCommandTests(SynchronousTestCase):
    """``accounts add``/``update``/``list``/``show`` over an in-memory store."""

    ADD = [
        "accounts",
        "add",
        "alice",
        "--email",
        "alice@example.com",
        "--imap-host",
        "imap.example.com",
        "--token-url",
        "https://oauth.example.com/token",
        "--client-id",
        "c",
        "--client-secret",
        "cs-cli-unit-4e1d",
        "--refresh-token",
        "rt-cli-unit-8a2f",
    ]

    def setUp(self) -> None:
        self.store = MemoryStore()
        self.store.openBlocking()
        self.admin = Admin(self.store)

    def run_(self, *argv: str) -> tuple[str, str]:
        """One command: (standard output, standard error); a refusal raises it."""
        args = cli._parser().parse_args(list(argv))
        out, err = io.StringIO(), io.StringIO()
        with mock.patch("sys.stderr", err):
            d = Deferred.fromCoroutine(cli._run(args, self.admin, out))
        self.successResultOf(d)
        return out.getvalue(), err.getvalue()

    def refused(self, *argv: str) -> str:
        args = cli._parser().parse_args(list(argv))
        with mock.patch("sys.stderr", io.StringIO()):
            d = Deferred.fromCoroutine(cli._run(args, self.admin, io.StringIO()))
        return str(self.failureResultOf(d, AdminError).value)

    def smtp(self, account: str = "alice") -> Upstream | None:
        return self.successResultOf(self.store.getAccount(account)).smtp

    def account(self, account: str = "alice") -> Account:
        return self.successResultOf(self.store.getAccount(account))

    def test_addWithSMTP(self):
        """--smtp-* flags give the new account its SMTP server, the CA file made absolute."""
        self.run_(*self.ADD, "--smtp-host", "smtp.example.com", "--smtp-ca-file", "ca.pem")
        self.assertEqual(
            self.smtp(),
            Upstream("smtp.example.com", 465, "implicit", os.path.abspath("ca.pem")),
        )

    def test_addWithoutSMTP(self):
        """Without --smtp-host an account has no SMTP server; a port alone is refused."""
        self.run_(*self.ADD)
        self.assertIsNone(self.smtp())
        message = self.refused(*self.ADD, "--replace", "--smtp-port", "465")
        self.assertEqual(message, "smtp.host is required")

    def test_tlsAndPortDefaults(self):
        """The port follows --smtp-tls; 587 and 25 imply starttls, other ports implicit TLS."""
        cases = [
            (["--smtp-tls", "starttls"], (587, "starttls")),
            (["--smtp-tls", "implicit"], (465, "implicit")),
            (["--smtp-port", "587"], (587, "starttls")),
            (["--smtp-port", "25"], (25, "starttls")),
            (["--smtp-port", "2465"], (2465, "implicit")),
            (["--smtp-port", "587", "--smtp-tls", "implicit"], (587, "implicit")),
        ]
        for flags, expected in cases:
            self.run_(*self.ADD, "--replace", "--smtp-host", "smtp.example.com", *flags)
            smtp = self.smtp()
            self.assertEqual((smtp.port, smtp.tls), expected, flags)

    def test_updateChangesOnlySMTP(self):
        """accounts update changes the SMTP server, keeps the rest; --no-smtp removes it."""
        self.run_(*self.ADD)
        self.successResultOf(self.store.setAccountState("alice", "disabled", "by hand"))
        before = self.successResultOf(self.store.getAccount("alice"))
        _, err = self.run_("accounts", "update", "alice", "--smtp-host", "smtp.example.com")
        self.assertEqual(err, "account alice: SMTP server smtp.example.com:465 (implicit)\n")
        self.run_("accounts", "update", "alice", "--smtp-port", "587")
        after = self.successResultOf(self.store.getAccount("alice"))
        self.assertEqual(after.smtp, Upstream("smtp.example.com", 587, "starttls"))
        self.assertEqual(
            (after.oauth2, after.upstream, after.email, after.state, after.stateReason),
            (before.oauth2, before.upstream, before.email, "disabled", "by hand"),
        )
        _, err = self.run_("accounts", "update", "alice", "--no-smtp")
        self.assertEqual(err, "account alice: SMTP server none\n")
        self.assertIsNone(self.smtp())
        self.assertEqual(self.successResultOf(self.store.getAccount("alice")).oauth2, before.oauth2)

    def test_connectionCaps(self):
        """--imap/--smtp-max-connections set a cap on add and update; 'default' clears it."""
        self.run_(*self.ADD, "--imap-max-connections", "4")
        self.assertEqual(self.account().upstream.maxConnections, 4)
        self.run_("accounts", "update", "alice", "--imap-max-connections", "default")
        self.assertIsNone(self.account().upstream.maxConnections)
        self.run_(
            "accounts", "update", "alice", "--smtp-host", "smtp.example.com",
            "--smtp-max-connections", "3",
        )  # fmt: skip
        self.assertEqual(self.smtp().maxConnections, 3)
        self.run_("accounts", "update", "alice", "--imap-max-connections", "0")
        self.assertEqual(
            (self.account().upstream.maxConnections, self.smtp().maxConnections), (0, 3)
        )
        shown = json.loads(self.run_("accounts", "show", "alice")[0])
        self.assertEqual((shown["imap"]["maxConnections"], shown["smtp"]["maxConnections"]), (0, 3))

    def test_updateRefusals(self):
        """update needs something to change, an SMTP host for a first server, a known account."""
        self.run_(*self.ADD)
        self.assertIn("nothing to change", self.refused("accounts", "update", "alice"))
        message = self.refused(
            "accounts", "update", "alice", "--no-smtp", "--smtp-host", "smtp.example.com"
        )
        self.assertIn("--no-smtp removes the SMTP server", message)
        message = self.refused("accounts", "update", "alice", "--smtp-tls", "starttls")
        self.assertEqual(message, "smtp.host is required")
        message = self.refused("accounts", "update", "bob", "--smtp-host", "smtp.example.com")
        self.assertEqual(message, "no account bob")
        self.assertIsNone(self.smtp())

    def test_authorizeCarriesSMTP(self):
        """accounts authorize hands its --smtp-* flags to the consent, kept until the callback."""
        self.successResultOf(
            Deferred.fromCoroutine(
                self.admin.createApp(
                    {
                        "app": "corp",
                        "clientId": "c",
                        "clientSecret": "cs-cli-unit-app",
                        "tokenUrl": "https://idp.example.com/token",
                        "authorizationUrl": "https://idp.example.com/authorize",
                        "redirectUrl": "https://proxy.example.com/oauth2/callback",
                    }
                )
            )
        )
        out, _ = self.run_(
            "accounts",
            "authorize",
            "alice",
            "--app",
            "corp",
            "--imap-host",
            "imap.example.com",
            "--smtp-host",
            "smtp.example.com",
            "--smtp-port",
            "587",
        )
        self.assertTrue(out.startswith("https://idp.example.com/authorize?"), out)
        [pending] = self.store.data.pending.values()
        self.assertEqual(
            json.loads(pending["smtp"]),
            {"host": "smtp.example.com", "port": 587, "tls": "starttls"},
        )

    def test_listAndShowTheSMTPServer(self):
        """list shows the SMTP server (or -) after the state; show has the smtp object."""
        self.run_(*self.ADD)
        self.run_(*self.ADD[:2], "bob", *self.ADD[3:], "--smtp-host", "smtp.example.com")
        out, _ = self.run_("accounts", "list")
        self.assertEqual(
            out.splitlines(),
            [
                "alice\talice@example.com\timap.example.com:993\tok\t-",
                "bob\talice@example.com\timap.example.com:993\tok\tsmtp.example.com:465",
            ],
        )
        shown = json.loads(self.run_("accounts", "show", "bob")[0])
        self.assertEqual(
            shown["smtp"],
            {
                "host": "smtp.example.com",
                "port": 465,
                "tls": "implicit",
                "caFile": None,
                "maxConnections": None,
            },
        )
        self.assertIsNone(json.loads(self.run_("accounts", "show", "alice")[0])["smtp"])


class TokenRequestTests(SynchronousTestCase):
    def test_descriptionRequired(self):
        """A token request without a description says it is required (the reference does)."""
        from proxy.admin import InvalidInput, buildToken

        e = self.assertRaises(InvalidInput, buildToken, {"scopes": ["api"]}, 0.0)
        self.assertEqual(str(e), "description is required")


# --- Regression tests (each docstring says what was wrong; every test
# failed before its fix). ---


class _Store:
    def __init__(self, record):
        self.record = record

    def getToken(self, tid):
        return succeed(self.record if tid == self.record.id else None)

    def removeToken(self, tid):
        return succeed(None)


class _FailingBus:
    def publish(self, account=None, tokenId=None):
        return fail(ConnectionError("redis went away"))


class RevokeDisconnectReportTests(SynchronousTestCase):
    def test_aFailedPublishIsNotReportedAsDone(self):
        """
        proxy/admin.py Admin._close swallows a failed ``bus.publish`` (it only
        logs it) and proxy/cli.py then prints "its sessions closed on every
        instance" and exits 0. The admin command installs no log observer,
        so the logged error is never shown.

        Expected: ``imapproxy tokens revoke --disconnect`` whose close request
        could not be published reports an error (non-zero exit).
        Actual: it claims the sessions were closed everywhere; on the other
        instances they stay open.
        """
        secret, tid = newToken()
        admin = Admin(_Store(storedToken(tid)), bus=_FailingBus())
        args = argparse.Namespace(group="tokens", command="revoke", token=tid, disconnect=True)
        err = io.StringIO()
        old, sys.stderr = sys.stderr, err
        try:
            d = Deferred.fromCoroutine(cli._run(args, admin, io.StringIO()))
            failure = []
            d.addErrback(failure.append)
        finally:
            sys.stderr = old
        self.assertTrue(
            failure or "closed on every instance" not in err.getvalue(),
            f"reported success: {err.getvalue()!r}",
        )


class StoreCopySameStoreTests(SynchronousTestCase):
    def test_twoPrefixesOnOneRedisAreDifferentStores(self):
        """
        proxy/cli.py _openBoth compares ``store.path``, which for Redis is
        ``RedisAddress.describe()``: host, port and db, without the key
        prefix (``?prefix=``) that separates deployments sharing a Redis.

        Expected: copying between two prefixes on one Redis is allowed.
        Actual: refused with "FROM and TO are the same store".
        """
        keyfile = os.path.join(tempfile.mkdtemp(prefix="imapproxy-review-"), "k")
        self.addCleanup(shutil.rmtree, os.path.dirname(keyfile), True)
        with open(keyfile, "wb") as f:
            f.write(Fernet.generate_key() + b"\n")
        os.chmod(keyfile, 0o600)
        opened = []

        def fakeOpen(url, secretFile):
            store = makeStore(url, keyfile)  # not opened: no server needed
            opened.append(store)
            return store

        self.patch(cli, "_open", fakeOpen)
        args = argparse.Namespace(
            source="redis://127.0.0.1:6379/0?prefix=old:",
            target="redis://127.0.0.1:6379/0?prefix=new:",
            from_secret_file=keyfile,
            to_secret_file=keyfile,
        )
        try:
            cli._openBoth(args, "sqlite:///nowhere", None)
        except SystemExit as e:
            self.fail(f"two prefixes refused as one store: {e}")
