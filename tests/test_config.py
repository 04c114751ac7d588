"""
Tests for ``proxy.config``: reading the ``[imapproxy]`` INI file.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from proxy.config import ConfigError, readConfig, splitList

KNOWN = {"port", "store", "login-timeout"}


class ReadConfigTests(SynchronousTestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="imapproxy-test-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def write(self, text: str) -> str:
        path = os.path.join(self.dir, "imapproxy.conf")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_values(self):
        """Known settings are returned by name, as strings."""
        path = self.write("[imapproxy]\nstore = sqlite:///x.db\nlogin-timeout = 30\n")
        self.assertEqual(
            readConfig(path, KNOWN), {"store": "sqlite:///x.db", "login-timeout": "30"}
        )

    def test_multiLine(self):
        """A multi-line value (several ports) is kept whole for splitList."""
        path = self.write("[imapproxy]\nport =\n  tcp:2143\n  ssl:2993:privateKey=k.pem\n")
        self.assertEqual(
            splitList(readConfig(path, KNOWN)["port"]), ["tcp:2143", "ssl:2993:privateKey=k.pem"]
        )

    def test_noInterpolation(self):
        """'%' in a value is taken literally (no interpolation)."""
        path = self.write("[imapproxy]\nstore = sqlite:///a%20b.db\n")
        self.assertEqual(readConfig(path, KNOWN)["store"], "sqlite:///a%20b.db")

    def test_unknownKey(self):
        """An unknown setting is an error naming it, not silently ignored."""
        path = self.write("[imapproxy]\nstore = x\nlogin-timout = 30\n")
        e = self.assertRaises(ConfigError, readConfig, path, KNOWN)
        self.assertIn("login-timout", str(e))

    def test_missingSection(self):
        """A file without an [imapproxy] section is an error."""
        path = self.write("[other]\nstore = x\n")
        e = self.assertRaises(ConfigError, readConfig, path, KNOWN)
        self.assertIn("[imapproxy]", str(e))

    def test_otherSectionsIgnored(self):
        """Other sections beside [imapproxy] are ignored."""
        path = self.write("[imapproxy]\nstore = x\n[other]\nanything = y\n")
        self.assertEqual(readConfig(path, KNOWN), {"store": "x"})

    def test_missingFile(self):
        """An unreadable file is a ConfigError, not an OSError."""
        self.assertRaises(ConfigError, readConfig, os.path.join(self.dir, "nope.conf"), KNOWN)

    def test_malformed(self):
        """A file that is not INI is a ConfigError."""
        path = self.write("store = x\n")
        self.assertRaises(ConfigError, readConfig, path, KNOWN)

    def test_duplicateKey(self):
        """A setting given twice is a ConfigError."""
        path = self.write("[imapproxy]\nstore = a\nstore = b\n")
        self.assertRaises(ConfigError, readConfig, path, KNOWN)

    def test_splitList(self):
        """splitList drops blank lines and surrounding spaces."""
        self.assertEqual(splitList("\n a \n\n b\n"), ["a", "b"])
        self.assertEqual(splitList(""), [])

    def test_inlineComments(self):
        """A comment after a value (after white space) is not part of it, on any line."""
        path = self.write(
            "[imapproxy]\nport = tcp:2143:interface=127.0.0.1 ; IMAP\n"
            "  ssl:2993  # TLS\nlogin-timeout = 30 # seconds\n"
        )
        values = readConfig(path, KNOWN)
        self.assertEqual(splitList(values["port"]), ["tcp:2143:interface=127.0.0.1", "ssl:2993"])
        self.assertEqual(values["login-timeout"], "30")

    def test_hashInsideValueKept(self):
        """'#' or ';' not after white space stays part of the value (a path may hold one)."""
        path = self.write("[imapproxy]\nstore = sqlite:///var/lib/a#b;c.db\n")
        self.assertEqual(readConfig(path, KNOWN)["store"], "sqlite:///var/lib/a#b;c.db")
