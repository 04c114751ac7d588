"""
The SMTP side of the measured set-up: the tests' SMTP sink (in a process of
its own, :mod:`bench.smtpsinkproc`) and Dovecot submission relaying to it
(XOAUTH2 checked against the same fake provider as the IMAP Dovecot), two
accounts whose tokens carry both scopes (``imap-proxy`` and ``smtp``), and the
targets an SMTP client submits through, all with implicit TLS on every leg:

- **direct**: Dovecot submission's implicit-TLS port, ``AUTH XOAUTH2`` with an
  access token from the provider;
- **imapproxy**: its implicit-TLS SMTP listener (``--smtp-port ssl:…``),
  ``AUTH PLAIN account token``; the account's SMTP upstream is Dovecot
  submission's implicit-TLS port;
- **peer**: emailproxy's ``[SMTP-<port>]`` server (implicit TLS on both
  legs), ``AUTH PLAIN email password``;
- **haproxy**: the reference relay, HAProxy terminating TLS on both legs in
  front of the same port, the direct client's XOAUTH2 passed through.
"""

from __future__ import annotations

import os
import ssl

import attrs

from bench.rig import Rig, start_haproxy
from bench.smtpclient import SMTPLogin
from bench.smtpsinkproc import SinkProcess
from tests.conftest import Mailbox, register
from tests.upstream.submission import Submission

RCPT = "rcpt@example.net"


@attrs.define
class SMTPTarget:
    """Something an SMTP client submits through.

    :param login: for the login-time figure (one account, again and again).
    :param sender: logs in the account the messages are sent from.
    :param pid: the relaying process, for its CPU time.
    """

    name: str
    host: str
    port: int
    ctx: ssl.SSLContext
    login: SMTPLogin
    sender: SMTPLogin
    mail_from: str
    pid: int | None = None


@attrs.define
class SMTPRig:
    rig: Rig
    sink: SinkProcess = attrs.field(factory=SinkProcess)
    submission: Submission | None = None
    #: (login-time account, sending account)
    accounts: list[Mailbox] = attrs.field(factory=list)
    targets: dict[str, SMTPTarget] = attrs.field(factory=dict)

    def start(self) -> None:
        """Sink, Dovecot submission, the accounts, the direct target."""
        rig = self.rig
        assert rig.pki and rig.provider and rig.proxy and rig.dovecot
        rig.stack.callback(self.sink.stop)
        self.sink.start()
        sub = Submission(rig.pki, rig.provider.introspection_url, self.sink)  # type: ignore[arg-type]
        self.submission = sub
        rig.stack.callback(sub.close)
        sub.start()
        assert sub.tls_port is not None
        self.accounts = [
            register(rig.proxy, rig.provider, rig.dovecot, rig.pki, token_args=("--scope", "smtp"))
            for _ in range(2)
        ]
        login, sender = self.accounts
        self.targets["direct"] = SMTPTarget(
            "direct",
            sub.host,
            sub.tls_port,
            rig.ctx,
            SMTPLogin.xoauth2(login.email, rig.access_token(login)),
            SMTPLogin.xoauth2(sender.email, rig.access_token(sender)),
            sender.email,
        )

    def add_proxy(self) -> None:
        """imapproxy's target: the accounts' SMTP upstream is Dovecot
        submission's implicit-TLS port (``imapproxy accounts update``)."""
        rig = self.rig
        assert rig.proxy and rig.pki
        host, port = self.upstream
        for mb in self.accounts:
            rig.proxy.cli(
                "accounts",
                "update",
                mb.account,
                "--smtp-host",
                host,
                "--smtp-port",
                str(port),
                "--smtp-tls",
                "implicit",
                "--smtp-ca-file",
                rig.pki.ca_cert,
            )
        ports = getattr(rig.proxy, "smtp_ports", None) or {}
        if "ssl" not in ports:
            raise RuntimeError(f"imapproxy reported no implicit-TLS SMTP listener: {ports}")
        login, sender = self.accounts
        self.targets["imapproxy"] = SMTPTarget(
            "imapproxy",
            rig.proxy.host,
            ports["ssl"],
            rig.ctx,
            SMTPLogin.plain(login.account, login.token),
            SMTPLogin.plain(sender.account, sender.token),
            sender.email,
            pid=rig.proxy.pid(),
        )

    @property
    def upstream(self) -> tuple[str, int]:
        """Dovecot submission's implicit-TLS (host, port)."""
        assert self.submission is not None and self.submission.tls_port is not None
        return self.submission.host, self.submission.tls_port

    def add_peer(self, peer_logins: dict[str, tuple[str, str]], port: int, pid: int) -> None:
        """The peer's SMTP server; *peer_logins* maps email to (user, password)."""
        login, sender = (peer_logins[mb.email] for mb in self.accounts)
        self.targets["peer"] = SMTPTarget(
            "peer",
            "127.0.0.1",
            port,
            self.rig.ctx,
            SMTPLogin.plain(*login),
            SMTPLogin.plain(*sender),
            self.accounts[1].email,
            pid=pid,
        )

    def add_haproxy(self) -> str:
        """The reference relay in front of Dovecot submission; a note for the table."""
        direct = self.targets["direct"]
        started = start_haproxy(
            self.rig, os.path.join(self.rig.work, "haproxy-smtp"), direct.host, direct.port
        )
        if isinstance(started, str):
            return started.replace("reference relay", "SMTP reference relay")
        port, pid = started
        self.targets["haproxy"] = attrs.evolve(
            direct, name="haproxy", host="127.0.0.1", port=port, pid=pid
        )
        return "SMTP reference relay: the same HAProxy, in front of Dovecot submission"
