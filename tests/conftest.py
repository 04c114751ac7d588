"""
Session fixtures for the integration tests: one PKI, one fake OAuth2
provider, one Dovecot and one ``twistd imapproxy`` shared by the tests, and a
factory that registers a fresh mailbox account with its own grant and token.

Tests in files that start real processes (twistd, Dovecot, redis-server,
HAProxy, mbsync) are marked ``integration`` here, by file name, so that
``pytest -m "not integration"`` runs the unit tests alone; those that need
only a redis-server (the Redis store and its coordination) are marked
``redis`` as well, so the lowest-versions run can exercise txredisapi.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator

import attrs
import pytest

from tests.upstream import Dovecot, Provider, make_pki
from tests.upstream.proxyproc import ProxyProcess
from tests.upstream.smtpsink import SMTPSink
from tests.upstream.submission import Submission

# Files whose tests start real processes; everything else is a unit test.
INTEGRATION_FILES = frozenset(
    {
        "test_api_schemathesis.py",
        "test_clients.py",
        "test_fixtures.py",
        "test_fixtures_smtp.py",
        "test_rediscoord.py",
        "test_store_redis.py",
        "test_store_sentinel.py",
    }
)
# Integration files that need only a redis-server.
REDIS_FILES = frozenset({"test_rediscoord.py", "test_store_redis.py", "test_store_sentinel.py"})


def isIntegrationFile(name: str) -> bool:
    """Whether the test file ``name`` (a base name) starts real processes."""
    return name.startswith("test_integration") or name in INTEGRATION_FILES


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        name = item.path.name
        if isIntegrationFile(name):
            item.add_marker(pytest.mark.integration)
        if name in REDIS_FILES:
            item.add_marker(pytest.mark.redis)


CLIENT_ID = "app-client"
CLIENT_SECRET = "app-secret"
# The session proxy's bound on a token refresh, retries included.
OAUTH2_DEADLINE = 3.0


@pytest.fixture(scope="session")
def workdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="imapproxy-tests-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def pki(workdir):
    return make_pki(os.path.join(workdir, "pki"))


@pytest.fixture(scope="session")
def provider(pki, workdir):
    p = Provider(pki, os.path.join(workdir, "provider"))
    p.start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="session")
def dovecot(pki, provider):
    d = Dovecot(pki, provider.introspection_url)
    d.start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="session")
def smtp_sink() -> Iterator[SMTPSink]:
    """The SMTP sink :func:`submission` relays every message to."""
    sink = SMTPSink()
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()


@pytest.fixture(scope="session")
def submission(workdir, provider, smtp_sink) -> Iterator[Submission]:
    """
    A Dovecot submission server (XOAUTH2 against ``provider``) relaying to
    ``smtp_sink``, with a certificate of its own for 127.0.0.2 (trust
    ``submission.ca_cert``): the shared one stays wrong for that address.
    """
    own = make_pki(os.path.join(workdir, "pki-smtp"), extra_ips=(Submission.host,))
    s = Submission(own, provider.introspection_url, smtp_sink)
    s.start()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="session")
def proxy(pki, workdir, dovecot):
    p = ProxyProcess(os.path.join(workdir, "proxy"), env={"REQUESTS_CA_BUNDLE": pki.ca_cert})
    p.start(
        "--port",
        f"ssl:0:interface=127.0.0.1:privateKey={pki.key}:certKey={pki.cert}",
        "--tls-certificate",
        pki.cert,
        "--tls-key",
        pki.key,
        "--oauth2-deadline",
        str(OAUTH2_DEADLINE),
    )
    try:
        yield p
    finally:
        p.stop()


@attrs.frozen
class Mailbox:
    """A registered account: what a client logs in with, and its secrets."""

    account: str
    email: str
    token: str = attrs.field(repr=False)
    refresh_token: str = attrs.field(repr=False)


_counter = itertools.count(1)

# Every secret the tests hand the proxy; test_integration_logs checks that
# none of them ever reaches its log.
ISSUED_SECRETS: list[str] = [CLIENT_SECRET]


def add_account(
    proxy: ProxyProcess,
    provider: Provider,
    *,
    account: str,
    email: str,
    refresh_token: str,
    port: int,
    ca_file: str,
    tls: str = "implicit",
    host: str = "localhost",
    replace: bool = False,
    smtp_host: str | None = None,
    smtp_port: int | None = None,
    smtp_tls: str | None = None,
    smtp_ca_file: str | None = None,
) -> None:
    """
    Register (or with ``replace``, change) an account with the admin command;
    the ``smtp_*`` arguments given become its ``--smtp-*`` flags.
    """
    smtp = []
    for flag, value in (
        ("--smtp-host", smtp_host),
        ("--smtp-port", smtp_port),
        ("--smtp-tls", smtp_tls),
        ("--smtp-ca-file", smtp_ca_file),
    ):
        if value is not None:
            smtp += [flag, str(value)]
    proxy.cli(
        "accounts",
        "add",
        account,
        *(["--replace"] if replace else []),
        "--email",
        email,
        "--imap-host",
        host,
        "--imap-port",
        str(port),
        "--imap-tls",
        tls,
        "--imap-ca-file",
        ca_file,
        *smtp,
        "--token-url",
        provider.token_url,
        "--client-id",
        CLIENT_ID,
        "--client-secret",
        CLIENT_SECRET,
        "--refresh-token",
        "-",
        input=refresh_token + "\n",
    )


def issue_token(proxy: ProxyProcess, account: str, description: str, *args: str) -> str:
    """An imap-proxy token for ``account``, from the admin command."""
    return proxy.cli(
        "tokens",
        "issue",
        "--account",
        account,
        "--scope",
        "imap-proxy",
        "--description",
        description,
        *args,
    ).stdout.strip()


def register(
    proxy: ProxyProcess,
    provider: Provider,
    dovecot: Dovecot,
    pki,
    *,
    tls: str = "implicit",
    token_args: tuple[str, ...] = (),
    expires_in: int = 3600,
    rotate: bool = False,
) -> Mailbox:
    """A fresh account (own mailbox, own grant) with an imap-proxy token."""
    n = next(_counter)
    account = f"acct{n}-{secrets.token_hex(3)}"
    email = f"user{n}-{secrets.token_hex(3)}@example.com"
    refresh_token = "rt-" + secrets.token_urlsafe(24)
    provider.add_grant(
        refresh_token, email, CLIENT_ID, CLIENT_SECRET, expires_in=expires_in, rotate=rotate
    )
    port = dovecot.tls_port if tls == "implicit" else dovecot.plain_port
    add_account(
        proxy,
        provider,
        account=account,
        email=email,
        refresh_token=refresh_token,
        port=port,
        ca_file=pki.ca_cert,
        tls=tls,
    )
    token = issue_token(proxy, account, f"test token {n}", *token_args)
    ISSUED_SECRETS.extend([token, refresh_token])
    return Mailbox(account, email, token, refresh_token)


@pytest.fixture
def mailbox(proxy, provider, dovecot, pki) -> Mailbox:
    return register(proxy, provider, dovecot, pki)
