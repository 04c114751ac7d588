"""
The SMTP front door of the real ``twistd imapproxy`` (the session's proxy),
before any provider is involved: Python's ``smtplib`` over STARTTLS with the
configured certificate and the token checks with the ``smtp`` scope (the
STARTTLS command injection is in ``test_integration_smtp.py``).
"""

from __future__ import annotations

import smtplib
import ssl

import pytest

from tests.conftest import ISSUED_SECRETS
from tests.imaputil import TIMEOUT


def tls_context(pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=pki.ca_cert)


class Client(smtplib.SMTP):
    """smtplib's client, keeping the greeting (for STARTTLS it must be given the name)."""

    def connect(self, host: str = "localhost", port: int = 0, source_address=None):
        self.greeting = super().connect(host, port, source_address)
        return self.greeting


def client(proxy) -> Client:
    assert proxy.smtp_port is not None
    smtp = Client("localhost", proxy.smtp_port, local_hostname="client.example", timeout=TIMEOUT)
    code, banner = smtp.greeting
    assert code == 220
    assert banner.endswith(b" imapproxy ESMTP ready for requests from 127.0.0.1"), banner
    return smtp


def test_smtplib_starttls_and_scope_refused(proxy, mailbox, pki):
    """smtplib: greeting, STARTTLS, EHLO again, AUTH with an imap-proxy-only token is refused."""
    with client(proxy) as smtp:
        assert smtp.ehlo()[0] == 250
        assert smtp.has_extn("starttls")
        assert smtp.has_extn("auth")  # loopback: AUTH before TLS is allowed by default
        assert smtp.mail("a@example.com") == (530, b"5.7.0 Authentication required")
        smtp.rset()
        smtp.starttls(context=tls_context(pki))
        smtp.ehlo()
        assert not smtp.has_extn("starttls")
        assert smtp.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            smtp.login(mailbox.account, mailbox.token)
        assert (e.value.smtp_code, e.value.smtp_error) == (
            535,
            b"5.7.8 Access denied, invalid scope",
        )
    proxy.wait_for_log(f"smtp login refused for {mailbox.account} from 127.0.0.1: scope")


def test_auth_login_unknown_token(proxy, mailbox, pki):
    """AUTH LOGIN with a token that is not one: 535, and the connection stays usable."""
    bogus = "f" * 64
    ISSUED_SECRETS.append(bogus)
    with client(proxy) as smtp:
        smtp.starttls(context=tls_context(pki))
        smtp.ehlo()
        smtp.user, smtp.password = mailbox.account, bogus
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            smtp.auth("LOGIN", smtp.auth_login)
        assert e.value.smtp_code == 535
        assert e.value.smtp_error == b"5.7.8 Access denied, failed to authenticate user"
        assert smtp.noop() == (250, b"2.0.0 Ok")
