"""
Per-account connection caps end to end: real ``twistd imapproxy`` instances
on one real Redis, in front of a real Dovecot that plays Gmail's limit
(``mail_max_userip_connections`` 3: a fourth connection of a user from the
proxy's address is refused by Dovecot itself). An account capped at 3 never
gets a fourth connection to Dovecot, whatever its clients do: the logins
past the cap wait, then get ``NO [LIMIT]``; a slot freed by a LOGOUT goes
to a waiting login; the cap holds across two instances; the slots of an
instance killed with SIGKILL come back within their expiry. SMTP through a
real Dovecot submission server gets ``421 4.7.0`` at its cap.
"""

from __future__ import annotations

import base64
import concurrent.futures
import imaplib
import os
import signal
import socket
import time
import uuid

import pytest
import requests
from cryptography.fernet import Fernet

from proxy.store._redisslots import EXPIRY
from tests.conftest import CLIENT_ID, CLIENT_SECRET, ISSUED_SECRETS, OAUTH2_DEADLINE, issue_token
from tests.imaputil import plain
from tests.upstream.dovecot import Dovecot
from tests.upstream.osutil import wait_until
from tests.upstream.proxyproc import ProxyProcess
from tests.upstream.redisserver import RedisServer

CAP = 3
WAIT = 3.0
LIMIT = "[LIMIT] Too many connections for this account, close another client"
# What Dovecot logs when a user passes mail_max_userip_connections.
DOVECOT_REFUSAL = "Maximum number of connections from user+IP exceeded"
TIMEOUT = 30


# -- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def capdovecot(pki, provider):
    d = Dovecot(pki, provider.introspection_url, max_userip_connections=CAP)
    d.start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def credis():
    r = RedisServer()
    r.start()
    try:
        yield r
    finally:
        r.cleanup()


@pytest.fixture(scope="module")
def keyfile(workdir):
    path = os.path.join(workdir, "caps-secret.key")
    with open(path, "wb") as f:
        f.write(Fernet.generate_key() + b"\n")
    os.chmod(path, 0o600)
    return path


def instance(pki, workdir, credis, keyfile, name: str, spares: bool = False) -> ProxyProcess:
    p = ProxyProcess(
        os.path.join(workdir, f"proxy-caps-{name}"),
        store=credis.url,
        secret_file=keyfile,
        env={"REQUESTS_CA_BUNDLE": pki.ca_cert},
    )
    p.start(
        "--connection-wait",
        str(WAIT),
        "--warm-upstream",
        "300" if spares else "0",
        "--oauth2-deadline",
        str(OAUTH2_DEADLINE),
    )
    return p


@pytest.fixture(scope="module")
def pair(pki, workdir, credis, keyfile, capdovecot):
    procs: list[ProxyProcess] = []
    try:
        for name in ("a", "b"):
            procs.append(instance(pki, workdir, credis, keyfile, name))
        yield procs
    finally:
        for p in procs:
            p.stop()


def capped(proxy: ProxyProcess, provider, dovecot, pki, *extra: str) -> tuple[str, str, str]:
    """A fresh account on ``dovecot`` capped at CAP IMAP connections: (account, email, token)."""
    tag = uuid.uuid4().hex[:8]
    account, email = f"cap-{tag}", f"cap-{tag}@example.com"
    refresh = "rt-" + uuid.uuid4().hex
    provider.add_grant(refresh, email, CLIENT_ID, CLIENT_SECRET)
    proxy.cli(
        "accounts", "add", account, "--email", email,
        "--imap-host", "localhost", "--imap-port", str(dovecot.tls_port),
        "--imap-ca-file", pki.ca_cert, "--imap-max-connections", str(CAP), *extra,
        "--token-url", provider.token_url, "--client-id", CLIENT_ID,
        "--client-secret", CLIENT_SECRET, "--refresh-token", "-",
        input=refresh + "\n",
    )  # fmt: skip
    token = issue_token(proxy, account, "caps", "--scope", "smtp")
    ISSUED_SECRETS.extend([refresh, token])
    return account, email, token


# -- helpers --------------------------------------------------------------------------


def login(proxy: ProxyProcess, account: str, token: str) -> imaplib.IMAP4:
    c = plain(proxy.port)
    c.login(account, token)
    return c


def attempt(proxy: ProxyProcess, account: str, token: str) -> tuple[str, float, object]:
    """One login: ("OK", seconds, the session) or (the refusal's text, seconds, None)."""
    started = time.monotonic()
    c = plain(proxy.port)
    try:
        c.login(account, token)
    except imaplib.IMAP4.error as e:
        c.shutdown()
        text = e.args[0]
        text = text.decode() if isinstance(text, bytes) else str(text)
        return text, time.monotonic() - started, None
    return "OK", time.monotonic() - started, c


def upstream(dovecot: Dovecot, email: str) -> int:
    """The user's connections Dovecot holds now (``doveadm who``)."""
    out = dovecot.doveadm("who", "-1", email).stdout.decode()
    return sum(1 for line in out.splitlines() if line.split()[:1] == [email])


def metric(proxy: ProxyProcess, name: str, protocol: str | None = "imap") -> float:
    text = requests.get(proxy.api_url + "/metrics", timeout=TIMEOUT).text
    labels = f'{{protocol="{protocol}"}}' if protocol else ""
    for line in text.splitlines():
        if line.startswith(f"{name}{labels} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def waiting(proxy: ProxyProcess, n: int) -> None:
    wait_until(
        lambda: metric(proxy, "imapproxy_account_connections_waiting") == n,
        what=f"{n} logins waiting",
    )


def dovecotRefused(dovecot: Dovecot) -> bool:
    with open(dovecot.log_path, errors="replace") as f:
        return DOVECOT_REFUSAL in f.read()


def logout(session: imaplib.IMAP4) -> None:
    session.logout()


# -- IMAP -------------------------------------------------------------------------------


def test_cap_waits_refuses_and_hands_over(pair, provider, capdovecot, pki):
    """N+5 logins at a cap of N: N upstream, 5 wait then get NO [LIMIT]; a LOGOUT frees one."""
    a = pair[0]
    account, email, token = capped(a, provider, capdovecot, pki)
    held = [login(a, account, token) for _ in range(CAP)]
    assert upstream(capdovecot, email) == CAP
    refusedBefore = metric(a, "imapproxy_account_connections_refused_total")
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        extra = [pool.submit(attempt, a, account, token) for _ in range(5)]
        waiting(a, 5)
        assert upstream(capdovecot, email) == CAP
        results = [f.result(TIMEOUT) for f in extra]
    assert [r[0] for r in results] == [LIMIT] * 5, results
    assert all(seconds >= WAIT - 0.2 for _, seconds, _ in results), results
    assert metric(a, "imapproxy_account_connections_refused_total") == refusedBefore + 5
    assert metric(a, "imapproxy_account_connections") >= CAP
    # A slot freed by LOGOUT goes to the login that waits for it.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        late = pool.submit(attempt, a, account, token)
        waiting(a, 1)
        logout(held.pop())
        result, _, session = late.result(TIMEOUT)
    assert result == "OK"
    held.append(session)
    assert upstream(capdovecot, email) == CAP
    for s in held:
        logout(s)
    wait_until(lambda: upstream(capdovecot, email) == 0, what="sessions closed upstream")
    assert not dovecotRefused(capdovecot)


def test_cap_across_instances(pair, provider, capdovecot, pki):
    """Two instances on one Redis share the cap; a slot freed on one wakes a waiter on the other."""
    a, b = pair
    account, email, token = capped(a, provider, capdovecot, pki)
    held = [login(a, account, token), login(a, account, token), login(b, account, token)]
    assert attempt(b, account, token)[0] == LIMIT
    assert attempt(a, account, token)[0] == LIMIT
    assert upstream(capdovecot, email) == CAP
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        late = pool.submit(attempt, b, account, token)
        waiting(b, 1)
        logout(held.pop(0))  # on A
        result, seconds, session = late.result(TIMEOUT)
    assert result == "OK", result
    held.append(session)
    assert upstream(capdovecot, email) == CAP
    for s in held:
        logout(s)
    assert not dovecotRefused(capdovecot)


def test_killed_instance_slots_come_back(pair, pki, workdir, credis, keyfile, provider, capdovecot):
    """
    The slots of an instance killed with SIGKILL are free again within their
    expiry, while a live instance holds (and renews) a slot of the same account.
    """
    a = pair[0]
    c = instance(pki, workdir, credis, keyfile, "killed")
    try:
        account, email, token = capped(c, provider, capdovecot, pki)
        live = login(a, account, token)
        held = [login(c, account, token) for _ in range(CAP - 1)]
        os.kill(c.pid(), signal.SIGKILL)
        killed = time.monotonic()
        # Its sessions die with it, but its slots stay until they expire.
        wait_until(lambda: upstream(capdovecot, email) == 1, what="killed sessions gone")
        assert attempt(a, account, token)[0] == LIMIT

        def loggedIn():
            result, _, session = attempt(a, account, token)
            return session if result == "OK" else None

        session = wait_until(loggedIn, seconds=EXPIRY + 20, what="slots back after SIGKILL")
        back = time.monotonic() - killed
        assert back <= EXPIRY + 2 * WAIT + 5, back
        logout(session)
        logout(live)
        for s in held:
            s.shutdown()
    finally:
        c.stop()
    assert not dovecotRefused(capdovecot)


def test_spare_elsewhere_given_up(pki, workdir, credis, keyfile, provider, capdovecot):
    """A login waiting at the cap on one instance makes another give up its spare."""
    a = instance(pki, workdir, credis, keyfile, "spare-a", spares=True)
    b = instance(pki, workdir, credis, keyfile, "spare-b", spares=True)
    try:
        account, email, token = capped(a, provider, capdovecot, pki)
        logout(login(a, account, token))
        held = [login(a, account, token)]  # the second login: A makes a spare
        wait_until(lambda: metric(a, "imapproxy_spare_connections", None) == 1, what="a spare")
        held.append(login(b, account, token))
        assert upstream(capdovecot, email) == CAP
        result, seconds, session = attempt(b, account, token)
        assert result == "OK" and seconds < WAIT, (result, seconds)
        held.append(session)
        assert metric(a, "imapproxy_spare_connections", None) == 0
        assert upstream(capdovecot, email) == CAP
        for s in held:
            logout(s)
    finally:
        a.stop()
        b.stop()
    assert not dovecotRefused(capdovecot)


# -- SMTP --------------------------------------------------------------------------------


class RawSMTP:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), TIMEOUT)
        self.buf = b""
        self.reply()

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> bytes:
        while True:
            line = self.line()
            if line[3:4] != b"-":
                return line

    def send(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def auth(self, account: str, token: str) -> bytes:
        self.send(b"EHLO client.example")
        creds = base64.b64encode(f"\0{account}\0{token}".encode())
        return self.send(b"AUTH PLAIN " + creds)

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True


def test_smtp_cap(pair, provider, capdovecot, submission, pki):
    """At its SMTP cap a login waits, then gets 421 4.7.0 and is closed; QUIT frees the slot."""
    a = pair[0]
    account, _email, token = capped(
        a, provider, capdovecot, pki,
        "--smtp-host", submission.host, "--smtp-port", str(submission.port),
        "--smtp-tls", "starttls", "--smtp-ca-file", submission.ca_cert,
        "--smtp-max-connections", "1",
    )  # fmt: skip
    first = RawSMTP(a.smtp_port)
    assert first.auth(account, token).startswith(b"235 ")
    second = RawSMTP(a.smtp_port)
    started = time.monotonic()
    refused = second.auth(account, token)
    assert refused == b"421 4.7.0 Too many connections for this account, close another client"
    assert time.monotonic() - started >= WAIT - 0.2
    assert second.closed()
    assert metric(a, "imapproxy_account_connections_refused_total", "smtp") >= 1
    assert first.send(b"QUIT").startswith(b"221")

    def third() -> bool:
        c = RawSMTP(a.smtp_port)
        ok = c.auth(account, token).startswith(b"235 ")
        c.send(b"QUIT")
        return ok

    wait_until(third, what="SMTP slot back after QUIT")
