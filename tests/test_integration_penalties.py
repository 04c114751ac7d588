"""
Login penalties in the real service: failed logins from 127.0.0.2 are
answered after 0, 2, 4, 4 s (the documented doubling, here capped at 4 s with
--login-penalty 4 to keep the suite short; the 15 s default schedule is
checked with a clock in test_penalties) and a valid login from there then
waits out the cap, while a valid login from 127.0.0.1 meanwhile is not slowed;
the refusal lines in the real log are what the fail2ban filter counts.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from tests.conftest import register
from tests.test_penalties import failedHosts
from tests.upstream.proxyproc import ProxyProcess

ATTACKER = "127.0.0.2"
USER = "127.0.0.1"
# The documented penalties (docs/operations.md) after 0, 1, 2, 3, 4 failures,
# capped at the --login-penalty this test runs with.
CAP = 4
PENALTIES = [0, 2, 4, 4, 4]
# What a loaded machine may add to an answer.
SLACK = 4.0


def timedLogin(port: int, source: str, account: str, token: str) -> tuple[bytes, float]:
    """One LOGIN on a fresh connection from ``source``: the tagged answer and its delay."""
    with socket.create_connection(("127.0.0.1", port), timeout=40, source_address=(source, 0)) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"* OK")
        started = time.monotonic()
        s.sendall(f"a LOGIN {account} {token}\r\n".encode())
        while True:
            line = f.readline()
            if not line or line.startswith(b"a "):
                return line.rstrip(b"\r\n"), time.monotonic() - started


@pytest.fixture
def penalised(pki, workdir, dovecot, provider):
    p = ProxyProcess(
        os.path.join(workdir, "proxy-penalties"), env={"REQUESTS_CA_BUNDLE": pki.ca_cert}
    )
    p.start("--login-penalty", str(CAP))
    try:
        yield p
    finally:
        p.stop()


def test_failed_logins_slowed_valid_elsewhere_not(penalised, provider, dovecot, pki):
    """Failures from .2 wait 0, 2, 4, 4 s, a valid .2 login the cap; a .1 login is not slowed."""
    mb = register(penalised, provider, dovecot, pki)
    # Warm the account (token refresh, upstream address) so timings below are the penalty's.
    answer, _ = timedLogin(penalised.port, USER, mb.account, mb.token)
    assert answer.startswith(b"a OK"), answer

    waits = []
    for _ in range(4):
        answer, took = timedLogin(penalised.port, ATTACKER, mb.account, "f" * 64)
        assert answer.startswith(b"a NO [AUTHENTICATIONFAILED]"), answer
        waits.append(took)
    for took, penalty in zip(waits, PENALTIES, strict=False):
        assert penalty - 0.1 <= took < penalty + SLACK, waits

    # .2 now has the capped penalty ahead; .1 is answered as fast as ever.
    answer, took = timedLogin(penalised.port, USER, mb.account, mb.token)
    assert answer.startswith(b"a OK"), answer
    assert took < SLACK, took

    # A valid login from .2 waits the penalty out, then succeeds.
    answer, took = timedLogin(penalised.port, ATTACKER, mb.account, mb.token)
    assert answer.startswith(b"a OK"), answer
    assert PENALTIES[4] - 1.5 <= took < PENALTIES[4] + SLACK, took

    # ...and clears it: the next failure from .2 is answered at once.
    answer, took = timedLogin(penalised.port, ATTACKER, mb.account, "f" * 64)
    assert answer.startswith(b"a NO"), answer
    assert took < SLACK, took

    # fail2ban, reading the real log, counts the five refusals, all from .2.
    assert failedHosts(penalised.log()) == [ATTACKER] * 5
