"""
A provider's IMAP server whose certificate the account does not trust, with
the real service and a real Dovecot: the client gets the fixed
``NO [UNAVAILABLE]`` for a refused certificate, and the log names the reason
code (``certificate-untrusted``), not ``upstream-closed``.
"""

from __future__ import annotations

import imaplib
import os
import re

import pytest

from tests.conftest import CLIENT_ID, CLIENT_SECRET, add_account, register
from tests.imaputil import plain
from tests.upstream import make_pki

REFUSED = "[UNAVAILABLE] The provider's certificate was refused, the operator must act"


def _refusal(proxy, mb) -> str:
    c = plain(proxy.port)
    try:
        with pytest.raises(imaplib.IMAP4.error) as e:
            c.login(mb.account, mb.token)
        return str(e.value)
    finally:
        c.shutdown()


def _failures(proxy, account: str) -> list[str]:
    """The reasons logged for ``account``'s failed logins upstream."""
    pattern = rf"login of {re.escape(account)} from \S+ failed upstream: (\S+)"
    return re.findall(pattern, proxy.full_log())


def test_a_ca_file_that_does_not_sign_the_servers_certificate(
    proxy, provider, dovecot, pki, tmp_path
):
    """Implicit TLS, the account's CA file is another CA: certificate-untrusted, once."""
    mb = register(proxy, provider, dovecot, pki)
    other = make_pki(os.path.join(tmp_path, "other"))
    add_account(
        proxy,
        provider,
        account=mb.account,
        email=mb.email,
        refresh_token=mb.refresh_token,
        port=dovecot.tls_port,
        ca_file=other.ca_cert,
        replace=True,
    )
    assert REFUSED in _refusal(proxy, mb)
    proxy.wait_for_log(f"login of {mb.account} from")
    assert _failures(proxy, mb.account) == ["certificate-untrusted"]


def test_no_ca_file_and_a_private_ca_after_starttls(proxy, provider, dovecot, pki):
    """STARTTLS, no CA file (the system's CAs do not know the test CA): certificate-untrusted."""
    mb = register(proxy, provider, dovecot, pki, tls="starttls")
    proxy.cli(
        "accounts",
        "add",
        mb.account,
        "--replace",
        "--email",
        mb.email,
        "--imap-host",
        "localhost",
        "--imap-port",
        str(dovecot.plain_port),
        "--imap-tls",
        "starttls",
        "--token-url",
        provider.token_url,
        "--client-id",
        CLIENT_ID,
        "--client-secret",
        CLIENT_SECRET,
        "--refresh-token",
        "-",
        input=mb.refresh_token + "\n",
    )
    assert REFUSED in _refusal(proxy, mb)
    proxy.wait_for_log(f"login of {mb.account} from")
    assert _failures(proxy, mb.account) == ["certificate-untrusted"]


def test_the_right_ca_file_logs_in(proxy, provider, dovecot, pki):
    """The control: the same account with the CA that signed Dovecot's certificate works."""
    mb = register(proxy, provider, dovecot, pki)
    c = plain(proxy.port)
    try:
        assert c.login(mb.account, mb.token)[0] == "OK"
    finally:
        c.logout()
    assert _failures(proxy, mb.account) == []
