"""
Tests for ``proxy.selfcheck``: the start-up check that refuses, in one line,
installed versions that cannot work, read against fake metadata; and its two
call sites (twistd options, the admin command).
"""

from __future__ import annotations

import io
import sys

from packaging.utils import canonicalize_name
from twisted.trial.unittest import SynchronousTestCase

from proxy import cli, selfcheck, tap
from proxy.selfcheck import Installed, check

OURS = [
    "twisted[tls]<27,>=25.5",
    "pyOpenSSL<27,>=24.0",
    "cryptography<51,>=42.0",
    "werkzeug<3.2,>=2.2",
    'pytest<10,>=9.2; extra == "test"',
]

GOOD = {
    "imapproxy": "1.0",
    "twisted": "26.10.0",
    "pyopenssl": "26.4.0",
    "cryptography": "50.0.2",
    "werkzeug": "3.1.9",
    "attrs": "26.1.0",
    "idna": "3.20",
}


def fake(versions: dict[str, str], requires: dict[str, list[str]] | None = None) -> Installed:
    """An environment with these versions; our requirements are ``OURS``."""
    needs = {
        "imapproxy": OURS,
        "twisted": [
            "attrs>=22.2.0",
            'pyopenssl>=21.0.0; extra == "tls"',
            'idna>=2.4; extra == "tls"',
        ],
        "pyopenssl": ["cryptography<51,>=49.0.0"],
        "cryptography": [],
        "werkzeug": [],
        **(requires or {}),
    }
    return Installed(
        version=lambda name: versions.get(canonicalize_name(name)),
        requires=lambda name: (
            needs.get(canonicalize_name(name), []) if canonicalize_name(name) in versions else None
        ),
    )


class CheckTests(SynchronousTestCase):
    def test_versionsWithinTheBoundsPass(self):
        """Everything installed within its bounds: nothing to say."""
        self.assertIsNone(check(fake(GOOD)))

    def test_theKnownBadPairIsRefusedWithItsReason(self):
        """cryptography 41.0.7 with pyOpenSSL 23.3.0 is refused, saying what it breaks."""
        versions = {**GOOD, "cryptography": "41.0.7", "pyopenssl": "23.3.0"}
        reason = check(fake(versions, {"pyopenssl": ["cryptography<42,>=41.0.5"]}))
        assert reason is not None
        self.assertNotIn("\n", reason)
        self.assertIn("cryptography 41.0.7", reason)
        self.assertIn("session-reuse", reason)
        self.assertIn("pyopenssl 23.3.0 is installed, imapproxy needs pyopenssl<27,>=24.0", reason)

    def test_aReleaseAboveTheBoundIsRefused(self):
        """A release line nobody tested (Twisted 27) is refused with the bound it breaks."""
        reason = check(fake({**GOOD, "twisted": "27.1.0"}))
        self.assertEqual(
            reason,
            "the installed packages cannot work: twisted 27.1.0 is installed, imapproxy "
            "needs twisted<27,>=25.5 (reinstall with -c constraints.txt, "
            "see docs/development.md)",
        )

    def test_aMissingDependencyIsNamed(self):
        """A runtime dependency that is not installed (werkzeug) is named."""
        versions = dict(GOOD)
        del versions["werkzeug"]
        reason = check(fake(versions))
        assert reason is not None
        self.assertIn("werkzeug is not installed (imapproxy needs werkzeug<3.2,>=2.2)", reason)

    def test_aMismatchBetweenDependenciesIsRefused(self):
        """pyOpenSSL with a cryptography outside its own pin (both within ours) is refused."""
        versions = {**GOOD, "pyopenssl": "24.0.0", "cryptography": "46.0.0"}
        reason = check(fake(versions, {"pyopenssl": ["cryptography<43,>=41.0.5"]}))
        assert reason is not None
        self.assertIn(
            "cryptography 46.0.0 is installed, pyopenssl needs cryptography<43,>=41.0.5", reason
        )

    def test_anExtraWeAskForIsChecked(self):
        """What twisted[tls] brings (idna) counts; test extras do not."""
        versions = dict(GOOD)
        del versions["idna"]
        reason = check(fake(versions))
        assert reason is not None
        self.assertIn("idna is not installed (twisted needs idna>=2.4)", reason)
        self.assertNotIn("pytest", reason)

    def test_anUnparsableVersionIsOutside(self):
        """A version that is not a version cannot be shown to fit."""
        reason = check(fake({**GOOD, "werkzeug": "dev-build"}))
        assert reason is not None
        self.assertIn("werkzeug dev-build is installed", reason)

    def test_notInstalledNothingToCompare(self):
        """Run from a source tree that was never installed, there are no bounds to read."""
        versions = dict(GOOD)
        del versions["imapproxy"]
        self.assertIsNone(check(fake(versions)))

    def test_thisEnvironmentFits(self):
        """The interpreter running the tests has what the bounds ask for."""
        self.assertIsNone(check())


class CallSiteTests(SynchronousTestCase):
    REASON = "the installed packages cannot work: twisted 27.1.0 is installed"

    def test_twistdRefusesWithOneLine(self):
        """twistd imapproxy stops at option parsing with the reason, in one line."""
        self.patch(selfcheck, "check", lambda: self.REASON)
        with self.assertRaises(SystemExit) as e:
            tap.Options().parseOptions([])
        self.assertEqual(str(e.exception), "imapproxy: " + self.REASON)

    def test_adminCommandRefusesWithOneLine(self):
        """The admin command prints one line and exits 2 before it opens any store."""
        self.patch(selfcheck, "check", lambda: self.REASON)
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        with self.assertRaises(SystemExit) as e:
            cli.main(["accounts", "list", "--store", "sqlite:///nonexistent/x.sqlite3"])
        self.assertEqual(e.exception.code, 2)
        self.assertEqual(err.getvalue(), f"imapproxy: {self.REASON}\n")
