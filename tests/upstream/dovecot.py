"""A real Dovecot 2.3 IMAP server whose only login is XOAUTH2/OAUTHBEARER.

Tokens are checked by RFC 7662 introspection against the fake provider (see
:mod:`tests.upstream.provider`).  Must run as root (see
/work/shared/reference/dovecot-oauth2-upstream.md for the gotchas encoded here).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

from tests.upstream.osutil import stop_process

from .certs import PKI

__all__ = ["Dovecot", "DovecotError"]

START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
START_ATTEMPTS = 5

_CONF = """\
instance_name = imapfx-{name}
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/log/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
disable_plaintext_auth = no
auth_mechanisms = xoauth2 oauthbearer
auth_failure_delay = 0
auth_cache_size = 0
mail_location = maildir:~/Maildir
mailbox_idle_check_interval = 1 secs
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {dir}/dovecot-oauth2.conf.ext
}}
userdb {{
  driver = static
  args = allow_all_users=yes uid=nobody gid=nogroup home={dir}/mail/%d/%n
}}
protocol imap {{
  mail_max_userip_connections = {max_userip}
}}
default_client_limit = 5000
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {plain_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port}
    ssl = yes
  }}
  service_count = 0
  process_min_avail = 2
}}
service imap {{
  process_limit = 2100
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""

_OAUTH2_CONF = """\
introspection_url = {introspection_url}
introspection_mode = post
client_id = test-client
client_secret = test-secret
username_attribute = username
active_attribute = active
active_value = true
timeout_msecs = 5000
"""


class DovecotError(RuntimeError):
    """Dovecot did not start, or a doveadm command failed."""


def _free_ports(n: int) -> list[int]:
    """*n* distinct ports that were free on 127.0.0.1 a moment ago."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Dovecot:
    """One private Dovecot instance on 127.0.0.1.

    After :meth:`start`: ``host``, ``plain_port`` (IMAP, STARTTLS possible),
    ``tls_port`` (IMAPS), ``dir`` (its run directory, under /tmp),
    ``conf_path`` and ``log_path``.  Mail of ``user@domain`` lives in
    ``dir/mail/domain/user/Maildir``.
    """

    host = "127.0.0.1"

    def __init__(
        self, pki: PKI, introspection_url: str, max_userip_connections: int = 2100
    ) -> None:
        """
        :param max_userip_connections: IMAP connections a user may hold from
            one address (the proxy's): set low, it plays a provider's limit.
        """
        self.max_userip = max_userip_connections
        self.pki = pki
        self.introspection_url = introspection_url
        self.dir: str | None = None
        self.conf_path: str | None = None
        self.log_path: str | None = None
        self.plain_port: int | None = None
        self.tls_port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- life cycle -----------------------------------------------------------

    def start(self) -> None:
        if self._proc is not None:
            raise DovecotError("already started")
        if os.geteuid() != 0:
            raise DovecotError("this fixture runs Dovecot as root")
        self.dir = tempfile.mkdtemp(prefix="dc", dir="/tmp")
        try:
            self._prepare_dir()
            last_error: Exception | None = None
            for _ in range(START_ATTEMPTS):
                try:
                    self._start_once()
                    return
                except DovecotError as e:  # most likely a lost port race
                    last_error = e
                    self._stop_process()
            raise DovecotError(f"Dovecot did not start in {START_ATTEMPTS} attempts: {last_error}")
        except BaseException:
            self.stop()
            raise

    def _prepare_dir(self) -> None:
        assert self.dir is not None
        # The imap processes run as nobody and must traverse every parent.
        os.chmod(self.dir, 0o755)
        for sub in ("run", "state", "log"):
            os.mkdir(os.path.join(self.dir, sub), 0o755)
        mail = os.path.join(self.dir, "mail")
        os.mkdir(mail, 0o755)
        nobody = _uid("nobody")
        nogroup = _gid("nogroup")
        os.chown(mail, nobody, nogroup)
        self.conf_path = os.path.join(self.dir, "dovecot.conf")
        self.log_path = os.path.join(self.dir, "log", "dovecot.log")
        oauth2 = os.path.join(self.dir, "dovecot-oauth2.conf.ext")
        with open(oauth2, "w") as f:
            f.write(_OAUTH2_CONF.format(introspection_url=self.introspection_url))

    def _write_conf(self) -> None:
        assert self.dir is not None and self.conf_path is not None
        self.plain_port, self.tls_port = _free_ports(2)
        with open(self.conf_path, "w") as f:
            f.write(
                _CONF.format(
                    name=os.path.basename(self.dir),
                    dir=self.dir,
                    cert=self.pki.cert,
                    key=self.pki.key,
                    plain_port=self.plain_port,
                    tls_port=self.tls_port,
                    max_userip=self.max_userip,
                )
            )

    def _start_once(self) -> None:
        assert self.dir is not None and self.conf_path is not None
        self._write_conf()
        # -F: stay in the foreground, so the master is our child and we can
        # wait for it; it still writes run/master.pid for `dovecot stop`.
        with open(os.path.join(self.dir, "log", "master.out"), "ab") as out:
            self._proc = subprocess.Popen(
                ["dovecot", "-F", "-c", self.conf_path],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                raise DovecotError(
                    f"dovecot exited with {self._proc.returncode}: {self._log_tail()}"
                )
            if self._greets():
                return
            if time.monotonic() > deadline:
                raise DovecotError(f"no IMAP greeting after {START_TIMEOUT}s: {self._log_tail()}")
            time.sleep(0.05)

    def _greets(self) -> bool:
        assert self.plain_port is not None
        try:
            with socket.create_connection((self.host, self.plain_port), 1) as s:
                s.settimeout(2)
                line = b""
                while not line.endswith(b"\n") and len(line) < 4096:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    line += chunk
                return line.startswith(b"* OK")
        except OSError:
            return False

    def _stop_process(self) -> None:
        # SIGTERM to the master is what `dovecot -c CONF stop` sends, but that
        # command then polls for the master's exit and takes ~3 s; waiting on
        # our own child takes ~1.1 s (the master's shutdown grace period).
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stop_process(proc, STOP_TIMEOUT)

    def stop(self, remove: bool = True) -> None:
        """Stop the master (waiting for it) and, by default, delete ``dir``."""
        self._stop_process()
        if remove and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> Dovecot:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _log_tail(self, n: int = 4000) -> str:
        out = []
        assert self.dir is not None
        for path in (
            os.path.join(self.dir, "log", "master.out"),
            self.log_path,
        ):
            try:
                with open(path or "", "rb") as f:
                    out.append(f.read()[-n:].decode("utf-8", "replace"))
            except OSError:
                pass
        return "\n".join(out) or "(no log)"

    # -- doveadm --------------------------------------------------------------

    def doveadm(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run ``doveadm -c CONF ARGS...``; raise :class:`DovecotError` on failure."""
        if self._proc is None or self.conf_path is None:
            raise DovecotError("Dovecot is not running")
        result = subprocess.run(
            ["doveadm", "-c", self.conf_path, *args],
            input=input,
            capture_output=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise DovecotError(
                f"doveadm {' '.join(args)} exited with {result.returncode}: "
                + result.stderr.decode("utf-8", "replace")
            )
        return result

    def seed(self, user: str, message_bytes: bytes, mailbox: str = "INBOX") -> None:
        """Deliver *message_bytes* (an RFC 5322 message) to *user*'s *mailbox*."""
        self.doveadm("save", "-u", user, "-m", mailbox, input=message_bytes)

    def kick(self, user: str) -> None:
        """Disconnect all of *user*'s IMAP sessions (they get ``* BYE``)."""
        self.doveadm("kick", user)


def _uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid


def _gid(name: str) -> int:
    import grp

    return grp.getgrnam(name).gr_gid
