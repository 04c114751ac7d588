"""
Spare upstream connections with the real service and Dovecot: an account that
logs in often gets its next login on a connection already logged in, which
works like any other; a changed account never gets its old spare.
"""

from __future__ import annotations

from tests.conftest import add_account, register
from tests.imaputil import message, tls

SPARE_READY = "a spare provider connection waits for the next login of {account}"
SPARE_TAKEN = "login of {account} takes a spare provider connection"


def _session(proxy, pki, mb) -> bytes:
    c = tls(proxy.ports["ssl"], pki.ca_cert)
    try:
        assert c.login(mb.account, mb.token)[0] == "OK"
        assert c.select("INBOX")[0] == "OK"
        typ, data = c.fetch("1", "(BODY.PEEK[])")
        assert typ == "OK"
        return data[0][1]
    finally:
        c.logout()


def test_a_frequent_account_logs_in_on_a_spare(proxy, provider, dovecot, pki):
    """The third login within minutes takes the spare made after the second, and works."""
    mb = register(proxy, provider, dovecot, pki)
    body = message(3000, "spare")
    dovecot.seed(mb.email, body)
    assert _session(proxy, pki, mb) == body
    assert SPARE_READY.format(account=mb.account) not in proxy.full_log()
    assert _session(proxy, pki, mb) == body
    proxy.wait_for_log(SPARE_READY.format(account=mb.account))
    assert _session(proxy, pki, mb) == body
    assert SPARE_TAKEN.format(account=mb.account) in proxy.full_log()
    # Taking it made the next one: a client that reconnects keeps finding one.
    proxy.wait_for_log(SPARE_READY.format(account=mb.account), count=2)
    assert _session(proxy, pki, mb) == body
    assert proxy.full_log().count(SPARE_TAKEN.format(account=mb.account)) == 2


def test_a_changed_account_does_not_get_its_old_spare(proxy, provider, dovecot, pki):
    """After the account is moved (another port, same mailbox), its old spare is not used."""
    mb = register(proxy, provider, dovecot, pki)
    body = message(2000, "moved")
    dovecot.seed(mb.email, body)
    _session(proxy, pki, mb)
    _session(proxy, pki, mb)
    proxy.wait_for_log(SPARE_READY.format(account=mb.account))
    add_account(
        proxy,
        provider,
        account=mb.account,
        email=mb.email,
        refresh_token=mb.refresh_token,
        port=dovecot.plain_port,
        ca_file=pki.ca_cert,
        tls="starttls",
        replace=True,
    )
    assert _session(proxy, pki, mb) == body
    assert SPARE_TAKEN.format(account=mb.account) not in proxy.full_log()
