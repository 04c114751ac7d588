"""
Two ``twistd imapproxy`` instances on a ``redis+sentinel://`` store (a real
Sentinel set on 127.0.0.1: one master, one replica, three sentinels), logins
running in a loop through the real Dovecot, and the master killed (SIGKILL):
logins are refused with ``NO [UNAVAILABLE]`` (promptly, no hang) for a few
seconds and then work again, no account or token is lost, a refresh token
the provider rotated just before the kill still works after it, a session
spliced before the kill still answers, and the session bus and the session
list work across the instances after the new master is promoted.
"""

from __future__ import annotations

import os
import threading
import time

import attrs
import pytest
from cryptography.fernet import Fernet

from tests.conftest import ISSUED_SECRETS, OAUTH2_DEADLINE, register
from tests.test_integration_instances import _imap_token, _login, _noop, _spliced, api
from tests.upstream.osutil import wait_until
from tests.upstream.proxyproc import ProxyProcess
from tests.upstream.redissentinel import SentinelSet

# Logins work again within this many seconds of the kill (measured: 2-4 s).
RECOVERY = 15.0
# No login waits longer than this, outage or not: the store's deadline
# (2 s and a half) and the login's own work, on a busy machine.
LONGEST_LOGIN = 8.0


@attrs.frozen
class Deployment:
    a: ProxyProcess
    b: ProxyProcess
    sentinels: SentinelSet
    root: str = attrs.field(repr=False)


@pytest.fixture(scope="module")
def deployment(pki, workdir, dovecot):
    sentinels = SentinelSet()
    sentinels.start()
    keyfile = os.path.join(workdir, "sentinel-secret.key")
    with open(keyfile, "wb") as f:
        f.write(Fernet.generate_key() + b"\n")
    os.chmod(keyfile, 0o600)
    procs: list[ProxyProcess] = []
    try:
        for name in ("a", "b"):
            p = ProxyProcess(
                os.path.join(workdir, f"proxy-sentinel-{name}"),
                store=sentinels.url,
                secret_file=keyfile,
                env={"REQUESTS_CA_BUNDLE": pki.ca_cert},
            )
            procs.append(p)
            p.start("--oauth2-deadline", str(OAUTH2_DEADLINE))
        a, b = procs
        root = a.cli("tokens", "issue", "--scope", "api", "--description", "root").stdout.strip()
        ISSUED_SECRETS.append(root)
        yield Deployment(a, b, sentinels, root)
    finally:
        for p in procs:
            p.stop()
        sentinels.cleanup()


class LoginLoop:
    """Logs in again and again in a thread; keeps (start, end, result) of each."""

    def __init__(self, port: int, account: str, token: str):
        self.args = (port, account, token)
        self.results: list[tuple[float, float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LoginLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            result = _login(*self.args)
            self.results.append((started, time.monotonic(), result))

    def since(self, moment: float) -> list[tuple[float, float, str]]:
        return [r for r in list(self.results) if r[0] >= moment]


def _settled(loop: LoginLoop, moment: float, n: int = 5) -> bool:
    """Whether ``n`` logins in a row that started after ``moment`` succeeded."""
    after = loop.since(moment)
    return len(after) >= n and all(r[2] == "OK" for r in after[-n:])


def _longest_gap(loop: LoginLoop, killed: float) -> float:
    """The longest time between successful logins, from the last one before ``killed``."""
    ends = [end for _start, end, result in list(loop.results) if result == "OK"]
    before = [e for e in ends if e <= killed]
    after = [e for e in ends if e > killed]
    points = [before[-1] if before else killed, *after]
    return max(b - a for a, b in zip(points, points[1:], strict=False))


def _counts(d: Deployment) -> tuple[list[str], list[str]]:
    accounts = api(d.a, "GET", "/v1/accounts", d.root).json()["accounts"]
    tokens = api(d.a, "GET", "/v1/tokens", d.root).json()["tokens"]
    return sorted(a["account"] for a in accounts), sorted(t["id"] for t in tokens)


def test_the_master_killed_under_load(deployment, provider, dovecot, pki):
    d = deployment
    rotating = register(d.a, provider, dovecot, pki, rotate=True)
    steady = register(d.a, provider, dovecot, pki)
    elsewhere = register(d.a, provider, dovecot, pki)  # its session is on B only
    token = _imap_token(d.a, d.root, steady.account)
    onA = _spliced(d.a, steady.account, token)
    onB = _spliced(d.b, elsewhere.account, elsewhere.token)
    try:
        before = _counts(d)
        assert rotating.account in before[0] and len(before[1]) >= 4
        with (
            LoginLoop(d.a.port, steady.account, steady.token) as onLoopA,
            LoginLoop(d.b.port, steady.account, steady.token) as onLoopB,
        ):
            loops = {"A": onLoopA, "B": onLoopB}
            for loop in loops.values():
                wait_until(lambda loop=loop: loop.since(0), what="a first login")
                assert all(r[2] == "OK" for r in loop.results), loop.results
            # The provider rotates the refresh token just before the kill.
            calls = provider.stats()["token_calls_by_username"].get(rotating.email, 0)
            provider.expire_access(rotating.email)
            assert _login(d.a.port, rotating.account, rotating.token) == "OK"
            assert provider.stats()["token_calls_by_username"][rotating.email] == calls + 1

            killed = time.monotonic()
            old = d.sentinels.kill_master()
            assert old.port is not None
            d.sentinels.wait_failover(old.port)
            promoted = time.monotonic()
            for name, loop in loops.items():
                wait_until(
                    lambda loop=loop: _settled(loop, promoted),
                    RECOVERY,
                    f"logins through {name} working after the failover",
                )
            during = [r for loop in loops.values() for r in loop.since(killed)]
        print(
            f"\nfailover: the sentinels named the new master {promoted - killed:.2f}s "
            "after the kill"
        )
        for name, loop in loops.items():
            refusals = [r for r in loop.since(killed) if r[2] != "OK"]
            outage = _longest_gap(loop, killed)
            first = f"{refusals[0][1] - killed:.2f}s" if refusals else "none"
            print(
                f"failover, instance {name}: {len(refusals)} logins refused (the first after "
                f"{first}); the longest time without a successful login {outage:.2f}s"
            )
            assert outage < RECOVERY
        refused = {r[2] for r in during if r[2] != "OK"}
        assert all("[UNAVAILABLE]" in text for text in refused), refused
        assert max(r[1] - r[0] for r in during) < LONGEST_LOGIN

        # Nothing lost: every account and token, the rotated refresh token.
        assert _counts(d) == before
        provider.expire_access(rotating.email)
        assert _login(d.a.port, rotating.account, rotating.token) == "OK"  # takes a lease too
        assert provider.stats()["token_calls_by_username"][rotating.email] == calls + 2
        assert "needs re-authorization" not in d.a.log()
        assert _login(d.b.port, steady.account, token) == "OK"

        # Spliced sessions never needed the store.
        assert _noop(onA).startswith(b"n OK")
        assert _noop(onB).startswith(b"n OK")

        # The session list and the session bus, across instances, on the new master.
        path = f"/v1/sessions?account={elsewhere.account}"

        def listedOnA() -> list[dict]:
            r = api(d.a, "GET", path, d.root)
            return r.json()["sessions"] if r.status_code == 200 else []

        [ofB] = wait_until(listedOnA, what="B's session listed by A")
        r = api(d.a, "DELETE", f"/v1/session/{ofB['id']}", d.root)
        assert r.status_code == 200 and r.json() == {"ended": True}
        assert onB.line() == b"* BYE Session ended by the operator"
        assert onB.closed()
    finally:
        onA.close()
        onB.close()
