"""
The measured set-up: the tests' PKI, fake OAuth2 provider, Dovecot and
``twistd imapproxy`` (TLS listener, as the ``proxy`` fixture starts it),
registered mailboxes, and the three targets a client can log in to: Dovecot
directly (XOAUTH2), imapproxy (LOGIN account token) and the peer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable

import attrs

from bench.client import Login
from bench.tree import ProxyProcess
from tests.conftest import CLIENT_ID, CLIENT_SECRET, OAUTH2_DEADLINE, Mailbox, register
from tests.imaputil import message, provider_access_token
from tests.upstream import PKI, Dovecot, Provider, make_pki
from tests.upstream.osutil import free_port, stop_process

# What imapproxy logs when a spare upstream connection is ready (2fb6afe too).
SPARE_MADE = "a spare provider connection waits for the next login of"

HAPROXY_CONFIG = """\
global
    maxconn 4000
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend imaps
    bind 127.0.0.1:{port} ssl crt {pem}
    default_backend dovecot
backend dovecot
    server dovecot {host}:{upstream} ssl verify required ca-file {ca} verifyhost localhost
"""


SMALL_MESSAGES = 5
SMALL_SIZE = 2000
SINK = "Sink"  # where APPENDs go; emptied after each target's runs


@attrs.define
class Target:
    """Something a client logs in to.

    :param logins: one per small mailbox, in :attr:`Rig.small` order.
    :param big_login: for the mailbox holding the large message.
    :param cold: one per cold run, for an account nobody logged in to yet:
        makes its login (timed: a direct client must fetch an access token
        first; the proxy and the peer refresh one during the login).
    :param pid: the relaying process, for its CPU time.
    """

    name: str
    port: int
    ctx: ssl.SSLContext | None
    logins: list[Login]
    big_login: Login
    cold: list[Callable[[], Login]] = attrs.field(factory=list)
    #: imapproxy only: accounts that will have logged in once (token cached,
    #: no spare upstream connection yet), one per run of the "new upstream
    #: connection" login figure.
    second: list[Login] = attrs.field(factory=list)
    pid: int | None = None
    #: imapproxy only: how many spare upstream connections it has made so
    #: far for the account of ``logins[0]`` (its log lines saying so).
    spares_made: Callable[[], int] | None = None


@attrs.define
class Rig:
    work: str
    stack: contextlib.ExitStack
    pki: PKI | None = None
    provider: Provider | None = None
    dovecot: Dovecot | None = None
    proxy: ProxyProcess | None = None
    small: list[Mailbox] = attrs.field(factory=list)
    big: Mailbox | None = None
    big_uid: int = 1
    big_message: bytes = b""
    targets: dict[str, Target] = attrs.field(factory=dict)
    #: The peer's SMTP logins (email to user and password) and port.
    peer_smtp: dict[str, tuple[str, str]] = attrs.field(factory=dict)
    peer_smtp_port: int | None = None
    #: The class the measured proxy is made with (``bench.login_cpu``'s, say).
    proxy_class: type[ProxyProcess] = ProxyProcess

    @property
    def ctx(self) -> ssl.SSLContext:
        assert self.pki is not None
        return ssl.create_default_context(cafile=self.pki.ca_cert)

    def start(self, smtp: bool = False) -> None:
        """PKI, provider, Dovecot and imapproxy (with *smtp*, an implicit-TLS
        SMTP listener too); each stopped by the stack."""
        # 127.0.0.2 too: Dovecot submission listens there (bench.smtprig),
        # and the proxy verifies its certificate for that address.
        self.pki = make_pki(os.path.join(self.work, "pki"), extra_ips=("127.0.0.2",))
        self.provider = Provider(self.pki, os.path.join(self.work, "provider"))
        self.stack.callback(self.provider.stop)
        self.provider.start()
        self.dovecot = Dovecot(self.pki, self.provider.introspection_url)
        self.stack.callback(self.dovecot.stop)
        self.dovecot.start()
        self.proxy = self.proxy_class(
            os.path.join(self.work, "proxy"), env={"REQUESTS_CA_BUNDLE": self.pki.ca_cert}
        )
        self.stack.callback(self.proxy.stop)
        self.proxy.start(*self.proxy_args(smtp))

    def proxy_args(self, smtp: bool = False) -> list[str]:
        """The ``twistd imapproxy`` options of the measured proxy."""
        assert self.pki is not None
        return [
            "--port",
            # A backlog past Twisted's 50, for the concurrent clients.
            "ssl:0:interface=127.0.0.1:backlog=1024:"
            f"privateKey={self.pki.key}:certKey={self.pki.cert}",
            "--tls-certificate",
            self.pki.cert,
            "--tls-key",
            self.pki.key,
            "--oauth2-deadline",
            str(OAUTH2_DEADLINE),
            # The default, which the tests' fixture turns off: measure what ships.
            "--login-penalty",
            "15",
            *(
                [
                    "--smtp-port",
                    "ssl:0:interface=127.0.0.1:backlog=1024:"
                    f"privateKey={self.pki.key}:certKey={self.pki.cert}",
                ]
                if smtp
                else []
            ),
        ]

    def register(self) -> Mailbox:
        assert self.proxy and self.provider and self.dovecot
        return register(self.proxy, self.provider, self.dovecot, self.pki)

    def populate(self, accounts: int, big_message: bytes) -> None:
        """*accounts* small mailboxes with a few messages; one with a large one."""
        assert self.dovecot is not None
        for _ in range(accounts):
            mb = self.register()
            for i in range(SMALL_MESSAGES):
                self.dovecot.seed(mb.email, message(SMALL_SIZE, f"small {i}"))
            self.dovecot.doveadm("mailbox", "create", "-u", mb.email, SINK)
            self.small.append(mb)
        self.big = self.register()
        self.big_message = big_message
        self.dovecot.seed(self.big.email, big_message)
        self.dovecot.doveadm("mailbox", "create", "-u", self.big.email, SINK)

    def access_token(self, mb: Mailbox) -> str:
        assert self.pki is not None
        return provider_access_token(self.provider, mb.refresh_token, self.pki.ca_cert)

    def make_targets(self, cold_runs: int) -> None:
        """Direct and imapproxy targets, with *cold_runs* fresh accounts each."""
        assert self.dovecot and self.proxy and self.big and self.dovecot.tls_port
        big = self.big

        def direct_cold(mb: Mailbox) -> Callable[[], Login]:
            # Nothing cached: a direct client must get an access token first.
            return lambda: Login.xoauth2(mb.email, self.access_token(mb))

        def proxy_cold(mb: Mailbox) -> Callable[[], Login]:
            # The proxy has no access token cached for a fresh account.
            return lambda: Login.password(mb.account, mb.token)

        self.targets["direct"] = Target(
            "direct",
            self.dovecot.tls_port,
            self.ctx,
            [Login.xoauth2(mb.email, self.access_token(mb)) for mb in self.small],
            Login.xoauth2(big.email, self.access_token(big)),
            cold=[direct_cold(self.register()) for _ in range(cold_runs)],
        )
        self.targets["imapproxy"] = Target(
            "imapproxy",
            self.proxy.ports["ssl"],
            self.ctx,
            [Login.password(mb.account, mb.token) for mb in self.small],
            Login.password(big.account, big.token),
            cold=[proxy_cold(self.register()) for _ in range(cold_runs)],
            second=[
                Login.password(mb.account, mb.token)
                for mb in (self.register() for _ in range(cold_runs))
            ],
            pid=self.proxy.pid(),
            spares_made=self._spares_made(self.small[0].account),
        )

    def _spares_made(self, account: str) -> Callable[[], int]:
        """How many spare connections the proxy has made for ``account`` (log lines)."""
        return _LineCount(self.proxy.log_path if self.proxy else "", f"{SPARE_MADE} {account}\n")

    def add_haproxy(self) -> str:
        """
        The reference: HAProxy (C) relaying to the same Dovecot, terminating
        TLS on both legs as imapproxy does, with the direct clients' XOAUTH2
        logins passed through. What any relay costs on this machine.

        :return: a note for the table.
        """
        assert self.dovecot and self.dovecot.tls_port
        started = start_haproxy(
            self, os.path.join(self.work, "haproxy"), "127.0.0.1", self.dovecot.tls_port
        )
        if isinstance(started, str):
            return started
        port, pid = started
        direct = self.targets["direct"]
        self.targets["haproxy"] = attrs.evolve(direct, name="haproxy", port=port, pid=pid)
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        version = subprocess.run([binary, "-v"], capture_output=True, text=True).stdout
        return "reference relay: " + (version.splitlines() or ["HAProxy"])[0]

    def add_peer(
        self, python: str, cold_runs: int, smtp: tuple[tuple[str, int], list[Mailbox]] | None = None
    ) -> None:
        """Start the peer (:class:`bench.peer.Peer`) on the same mailboxes.

        :param smtp: Dovecot submission's implicit-TLS (host, port) and the SMTP
            accounts: the peer serves SMTP too (``peer_smtp``, ``peer_smtp_port``).
        """
        from bench.peer import Peer

        assert self.big is not None
        peer = Peer(
            os.path.join(self.work, "peer"),
            self.pki,
            self.provider,
            self.dovecot,
            python,
            smtp=smtp[0] if smtp else None,
        )
        self.stack.callback(peer.stop)

        def add(mb: Mailbox) -> Login:
            user, password = peer.add_account(mb.email, mb.refresh_token, CLIENT_ID, CLIENT_SECRET)
            return Login.password(user, password)

        small = [add(mb) for mb in self.small]
        big = add(self.big)
        cold = [add(self.register()) for _ in range(cold_runs)]
        for mb in smtp[1] if smtp else ():
            self.peer_smtp[mb.email] = peer.add_account(
                mb.email, mb.refresh_token, CLIENT_ID, CLIENT_SECRET
            )
        peer.start()
        self.peer_smtp_port = peer.smtp_port
        assert peer.port is not None
        self.targets["peer"] = Target(
            "peer",
            peer.port,
            ssl.create_default_context(cafile=peer.cafile),
            small,
            big,
            cold=[(lambda login: lambda: login)(c) for c in cold],
            pid=peer.pid,
        )


def start_haproxy(rig: Rig, work: str, host: str, upstream: int) -> tuple[int, int] | str:
    """HAProxy terminating TLS in front of *host*:*upstream* (TLS verified
    against the test CA): its (port, pid), or a note saying why not."""
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.path.exists(binary):
        return "reference relay left out: haproxy is not installed"
    assert rig.pki is not None
    os.makedirs(work)
    pem = os.path.join(work, "server.pem")
    with open(pem, "w") as out:
        for part in (rig.pki.cert, rig.pki.key):
            with open(part) as f:
                out.write(f.read())
    port = free_port()
    conf = os.path.join(work, "haproxy.cfg")
    with open(conf, "w") as f:
        f.write(
            HAPROXY_CONFIG.format(
                port=port, pem=pem, host=host, upstream=upstream, ca=rig.pki.ca_cert
            )
        )
    proc = subprocess.Popen(
        [binary, "-db", "-f", conf], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    rig.stack.callback(stop_process, proc)
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            return f"reference relay left out: haproxy exited: {err[-300:]}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return port, proc.pid
        except OSError:
            if time.monotonic() > deadline:
                return "reference relay left out: haproxy did not listen"
            time.sleep(0.05)


class _LineCount:
    """
    How often ``line`` is in the log at ``path`` so far, reading only what
    was added since the last call (a poll must not reread megabytes while the
    proxy is measured). twistd rotates its log at 1 MB: the rest of the
    rotated file (``path.1``) counts too.
    """

    def __init__(self, path: str, line: str):
        self.path, self.line = path, line
        self.found = 0
        self.offset = 0

    def _read(self, path: str) -> str:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                f.seek(self.offset)
                return f.read()
        except FileNotFoundError:
            return ""

    def __call__(self) -> int:
        try:
            size = os.path.getsize(self.path)
        except OSError:
            size = 0
        if size < self.offset:  # rotated: finish the old file first
            self.found += self._read(self.path + ".1").count(self.line)
            self.offset = 0
        new = self._read(self.path)
        # Only whole lines: the one being written is counted next time.
        whole = new[: new.rfind("\n") + 1]
        self.found += whole.count(self.line)
        self.offset += len(whole.encode("utf-8", errors="replace"))
        return self.found
