"""
Tests for ``proxy.errors``: every error a login can end in has one fixed
IMAP response and one fixed SMTP reply (code, enhanced code, text).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from proxy.errors import (
    AccessDenied,
    AuthenticationFailed,
    CertificateRejected,
    GrantInvalid,
    LimitReached,
    NoSMTPServer,
    ProxyError,
    SMTPAuthDisabled,
    Unavailable,
    UpstreamRejectedToken,
)


class SMTPResponseTests(SynchronousTestCase):
    def test_unavailableIsTemporary(self):
        """The provider cannot be used now (any cause): 454 4.7.0, try again later."""
        for error in (
            ProxyError(),
            Unavailable("upstream-timeout"),
            LimitReached(),
            CertificateRejected("certificate-expired", detail="smtp.example.com:465: secret-ish"),
        ):
            with self.subTest(error=error):
                self.assertEqual(
                    error.smtpResponse(), b"454 4.7.0 " + error.message.encode("ascii")
                )
        self.assertEqual(
            CertificateRejected(detail="smtp.example.com:465: x").smtpResponse(),
            b"454 4.7.0 The provider's certificate was refused, the operator must act",
        )

    def test_refusedCredentialsAre535(self):
        """The provider refused the account: 535 5.7.8 with the fixed text."""
        self.assertEqual(
            AuthenticationFailed().smtpResponse(),
            b"535 5.7.8 Authentication with the provider failed",
        )
        self.assertEqual(
            UpstreamRejectedToken().smtpResponse(),
            b"535 5.7.8 Authentication with the provider failed",
        )
        self.assertEqual(
            GrantInvalid(detail="Token has been expired or revoked.").smtpResponse(),
            b"535 5.7.8 Account needs re-authorization",
        )

    def test_SMTPAuthDisabled(self):
        """SMTP AUTH turned off by the mailbox's administrator: 535 5.7.139, not retried."""
        error = SMTPAuthDisabled()
        self.assertEqual(
            error.smtpResponse(),
            b"535 5.7.139 SMTP AUTH is disabled for this mailbox by its administrator",
        )
        self.assertEqual(error.reason, "smtp-auth-disabled")
        self.assertIsInstance(error, AuthenticationFailed)
        self.assertNotIsInstance(error, UpstreamRejectedToken)

    def test_noSMTPServer(self):
        """An account without an SMTP server: a permanent 5xx saying so."""
        error = NoSMTPServer()
        self.assertEqual(error.smtpResponse(), b"535 5.7.8 Sending is not set up for this account")
        self.assertEqual(error.reason, "smtp-not-configured")

    def test_accessDeniedEveryReason(self):
        """The proxy's own refusals: 535 5.7.8 with each reason's fixed text."""
        for reason, text in AccessDenied.TEXTS.items():
            with self.subTest(reason=reason):
                self.assertEqual(
                    AccessDenied(reason).smtpResponse(), b"535 5.7.8 " + text.encode("ascii")
                )

    def test_noCRLF(self):
        """A reply line, without its CRLF: the front door adds it."""
        for error in (AccessDenied("scope"), Unavailable(), SMTPAuthDisabled(), NoSMTPServer()):
            self.assertNotIn(b"\r", error.smtpResponse())
            self.assertNotIn(b"\n", error.smtpResponse())
