"""
Tests for ``proxy.encryption``: Fernet secrets, key rotation and key loading.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

from cryptography.fernet import Fernet
from twisted.trial.unittest import SynchronousTestCase

from proxy.encryption import ENV_VAR, SecretKeyError, Secrets, loadSecrets, parseKeys


class SecretsTests(SynchronousTestCase):
    def test_roundTrip(self):
        """What is encrypted decrypts to the same text, and the ciphertext hides it."""
        s = Secrets([Fernet.generate_key()])
        ct = s.encrypt("refresh-token-ü")
        self.assertIsInstance(ct, str)
        self.assertNotIn("refresh-token", ct)
        self.assertEqual(s.decrypt(ct), "refresh-token-ü")

    def test_rotation(self):
        """Data encrypted with the old key is readable with keys [new, old]."""
        old, new = Fernet.generate_key(), Fernet.generate_key()
        ct = Secrets([old]).encrypt("secret")
        rotated = Secrets([new, old])
        self.assertEqual(rotated.decrypt(ct), "secret")

    def test_rotationEncryptsWithNewest(self):
        """After rotation new data is encrypted with the first (newest) key."""
        old, new = Fernet.generate_key(), Fernet.generate_key()
        ct = Secrets([new, old]).encrypt("secret")
        self.assertEqual(Secrets([new]).decrypt(ct), "secret")
        self.assertRaises(SecretKeyError, Secrets([old]).decrypt, ct)

    def test_wrongKey(self):
        """Decrypting with a key that did not encrypt raises SecretKeyError."""
        ct = Secrets([Fernet.generate_key()]).encrypt("hunter2")
        e = self.assertRaises(SecretKeyError, Secrets([Fernet.generate_key()]).decrypt, ct)
        self.assertNotIn("hunter2", str(e))

    def test_garbageCiphertext(self):
        """Ciphertext that is not a Fernet token raises SecretKeyError."""
        self.assertRaises(SecretKeyError, Secrets([Fernet.generate_key()]).decrypt, "xyz")

    def test_noKeys(self):
        """No key at all raises SecretKeyError."""
        self.assertRaises(SecretKeyError, Secrets, [])

    def test_badKey(self):
        """A key that is not 32 url-safe base64 bytes raises SecretKeyError."""
        self.assertRaises(SecretKeyError, Secrets, [b"not a key"])
        self.assertRaises(SecretKeyError, Secrets, [Fernet.generate_key(), b"short"])


class ParseKeysTests(SynchronousTestCase):
    def test_linesCommasComments(self):
        """Keys come one a line or comma-separated; '#' comments and blanks are ignored."""
        text = "# keys\nk1  # newest\n\nk2, k3\n"
        self.assertEqual(parseKeys(text), [b"k1", b"k2", b"k3"])


class LoadSecretsTests(SynchronousTestCase):
    def setUp(self):
        # Not self.mktemp(): under pytest that writes into the working tree.
        self.dir = tempfile.mkdtemp(prefix="imapproxy-test-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def writeKey(self, name: str, key: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(key + b"\n")
        return path

    def test_createsDefaultFile(self):
        """With no key configured the default file is created, mode 0600, with a usable key."""
        path = os.path.join(self.dir, "sub", "secret.key")
        s = loadSecrets(None, path, environ={})
        self.assertTrue(os.path.exists(path))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path, "rb") as f:
            key = f.read().strip()
        self.assertEqual(Secrets([key]).decrypt(s.encrypt("x")), "x")

    def test_defaultFileReused(self):
        """An existing default file is read, not replaced."""
        key = Fernet.generate_key()
        path = self.writeKey("secret.key", key)
        s = loadSecrets(None, path, environ={})
        self.assertEqual(Secrets([key]).decrypt(s.encrypt("x")), "x")

    def test_envWinsOverDefaultFile(self):
        """The environment variable wins over the default file."""
        fileKey, envKey = Fernet.generate_key(), Fernet.generate_key()
        path = self.writeKey("secret.key", fileKey)
        s = loadSecrets(None, path, environ={ENV_VAR: envKey.decode()})
        ct = s.encrypt("x")
        self.assertEqual(Secrets([envKey]).decrypt(ct), "x")
        self.assertRaises(SecretKeyError, Secrets([fileKey]).decrypt, ct)

    def test_envDoesNotCreateDefault(self):
        """With the environment variable set, no default file is created."""
        path = os.path.join(self.dir, "secret.key")
        loadSecrets(None, path, environ={ENV_VAR: Fernet.generate_key().decode()})
        self.assertFalse(os.path.exists(path))

    def test_secretFileWinsOverEnv(self):
        """--secret-file wins over the environment variable."""
        fileKey, envKey = Fernet.generate_key(), Fernet.generate_key()
        path = self.writeKey("given.key", fileKey)
        s = loadSecrets(path, None, environ={ENV_VAR: envKey.decode()})
        self.assertEqual(Secrets([fileKey]).decrypt(s.encrypt("x")), "x")

    def test_envBadKey(self):
        """Bad key text in the environment raises SecretKeyError."""
        self.assertRaises(SecretKeyError, loadSecrets, None, None, environ={ENV_VAR: "nope"})

    def test_fileBadKey(self):
        """Bad key text in a file raises SecretKeyError."""
        path = self.writeKey("bad.key", b"not-a-fernet-key")
        self.assertRaises(SecretKeyError, loadSecrets, path, None, environ={})

    def test_emptyFile(self):
        """A key file holding only comments raises SecretKeyError."""
        path = self.writeKey("empty.key", b"# nothing")
        self.assertRaises(SecretKeyError, loadSecrets, path, None, environ={})

    def test_missingSecretFile(self):
        """A --secret-file that cannot be read raises SecretKeyError (not OSError)."""
        path = os.path.join(self.dir, "missing.key")
        self.assertRaises(SecretKeyError, loadSecrets, path, None, environ={})
        self.assertFalse(os.path.exists(path))

    def test_nothingConfigured(self):
        """No file, no environment variable and no default raises SecretKeyError."""
        self.assertRaises(SecretKeyError, loadSecrets, None, None, environ={})


class KeyFileTests(SynchronousTestCase):
    def test_commentsMayHoldCommas(self):
        """A comment with a comma is a comment, not a key (the file add-key writes has one)."""
        a, b = Fernet.generate_key(), Fernet.generate_key()
        text = f"# keys, newest first\n{a.decode()}  # new, since today\n{b.decode()},\n"
        self.assertEqual(parseKeys(text), [a, b])

    def test_writeThenLoadRoundTrip(self):
        """writeKeyFile writes a 0600 file that loadSecrets reads back, newest first."""
        from proxy.encryption import newKey, writeKeyFile

        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "k")
        keys = [newKey(), newKey()]
        writeKeyFile(path, keys)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        s = loadSecrets(path, None)
        self.assertEqual(s.keys, keys)
        self.assertEqual(s.path, path)


class ReloadTests(SynchronousTestCase):
    def test_badKeyFileKeepsKeysAndReportsOnce(self):
        """A broken key file is reported once and the keys in use stay; a fixed one loads."""
        from proxy.encryption import newKey, writeKeyFile

        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "k")
        first = newKey()
        writeKeyFile(path, [first])
        s = loadSecrets(path, None)
        with open(path, "w") as f:
            f.write("not-a-key\n")
        self.assertRaises(SecretKeyError, s.reloadBlocking)
        self.assertFalse(s.reloadBlocking())  # said once
        self.assertEqual(s.keys, [first])
        second = newKey()
        writeKeyFile(path, [second, first])
        self.assertTrue(s.reloadBlocking())
        self.assertEqual(s.keys, [second, first])
