"""
Setting up for :mod:`bench.concurrency`: the child processes it starts (and
kills), the light upstream (``bench/lightupstream.py``), the second proxy in
front of it, and the accounts (provider grant + imap-proxy token) the
clients log in as.
"""

from __future__ import annotations

import concurrent.futures
import os
import resource
import secrets
import signal
import subprocess
import sys
from typing import Any

from tests.conftest import CLIENT_ID, CLIENT_SECRET, add_account, issue_token

HERE = os.path.dirname(os.path.abspath(__file__))
LIGHTUPSTREAM = os.path.join(HERE, "lightupstream.py")

LIGHT_DOMAIN = "light.example"
OAUTH2_DEADLINE = 10.0


def say(*args: Any) -> None:
    print("[concurrency]", *args, file=sys.stderr, flush=True)


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- accounts ------------------------------------------------------------------


def add_accounts(
    proxy: Any,
    provider: Any,
    n: int,
    *,
    port: int,
    ca_file: str,
    domain: str,
    prefix: str,
    parallel: int = 4,
) -> list[tuple[str, str]]:
    """
    ``n`` accounts on ``localhost:port`` (implicit TLS, trusting ``ca_file``), each
    with its own provider grant and one imap-proxy token, through the admin
    command as ``tests.conftest.register`` does; ``parallel`` commands at once.
    """

    def one(i: int) -> tuple[str, str]:
        tag = secrets.token_hex(3)
        account = f"{prefix}{i}-{tag}"
        email = f"{prefix}{i}-{tag}@{domain}"
        refresh_token = "rt-" + secrets.token_urlsafe(24)
        provider.add_grant(refresh_token, email, CLIENT_ID, CLIENT_SECRET, expires_in=7200)
        add_account(
            proxy,
            provider,
            account=account,
            email=email,
            refresh_token=refresh_token,
            port=port,
            ca_file=ca_file,
        )
        token = issue_token(proxy, account, f"concurrency bench {i}")
        return account, token

    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        return list(pool.map(one, range(n)))


# -- child processes -------------------------------------------------------------


class Children:
    """Every process the benchmark starts, killed (and reaped) on the way out."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(cmd, **kw)
        self.procs.append(p)
        return p

    def kill(self, p: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for stream in (p.stdin, p.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        if p in self.procs:
            self.procs.remove(p)

    def close(self) -> None:
        for p in list(self.procs):
            self.kill(p)


class LightUpstream:
    """``bench/lightupstream.py`` in its own process(es) on 127.0.0.1."""

    def __init__(self, pki: Any, children: Children, procs: int = 1):
        self.pki = pki
        self.children = children
        self.procs = procs
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, LIGHTUPSTREAM, "--cert", self.pki.cert, "--key", self.pki.key]
        cmd += ["--procs", str(self.procs), "--user-suffix", "@" + LIGHT_DOMAIN]
        self._proc = self.children.spawn(cmd, stdout=subprocess.PIPE)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().decode()
        if not line.startswith("listening "):
            raise RuntimeError(f"lightupstream did not start: {line!r}")
        self.port = int(line.split()[2])

    def pids(self) -> list[int]:
        """The serving processes (the workers when forked)."""
        assert self._proc is not None
        if self.procs <= 1:
            return [self._proc.pid]
        try:
            with open(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children") as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return [self._proc.pid]

    def stop(self) -> None:
        if self._proc is not None:
            self.children.kill(self._proc)
            self._proc = None


# -- the proxies -------------------------------------------------------------


def fresh_proxy(pki: Any, workdir: str, name: str) -> Any:
    """A proxy of this benchmark's own, started, its files in ``workdir/name``."""
    from bench.tree import ProxyProcess

    p = ProxyProcess(os.path.join(workdir, name), env={"REQUESTS_CA_BUNDLE": pki.ca_cert})
    p.start(*proxy_args(pki))
    return p


def proxy_args(pki: Any) -> list[str]:
    """The proxy's options here: an IMAPS port with a listen backlog past Twisted's 50."""
    return [
        "--port",
        f"ssl:0:interface=127.0.0.1:backlog=1024:privateKey={pki.key}:certKey={pki.cert}",
        "--oauth2-deadline",
        str(OAUTH2_DEADLINE),
        # The default, which the tests' fixture turns off: measure what ships.
        "--login-penalty",
        "15",
    ]
