"""
A real Dovecot 2.3 submission server whose only login is XOAUTH2/OAUTHBEARER.

It is the SMTP upstream of the tests: tokens are checked by introspection
against the fake provider, as for the IMAP :class:`~tests.upstream.Dovecot`,
and every transaction is relayed, live, to an :class:`SMTPSink`. It runs as
its own master beside the IMAP one (own ``instance_name``, ``base_dir``,
ports and log).

It behaves like Gmail and Microsoft 365, so a proxy that forgets STARTTLS is
caught: it listens on 127.0.0.2 (clients connect from 127.0.0.1, so Dovecot
does not count them as "secured" loopback clients) with ``ssl = required``
and ``disable_plaintext_auth = yes``: before TLS the EHLO offers no AUTH,
and AUTH or MAIL get ``530 5.7.0 TLS required.`` Its certificate must name
127.0.0.2: give it a PKI of its own (``make_pki(DIR, extra_ips=("127.0.0.2",))``),
so that the shared one can stay wrong for that address.
/work/shared/reference/dovecot-submission-upstream.md has the replies and
the gotchas encoded here. Must run as root.
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
from .dovecot import _OAUTH2_CONF, DovecotError, _gid, _uid
from .smtpsink import SMTPSink

__all__ = ["Submission", "strip_received"]

START_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
START_ATTEMPTS = 5
# Gmail's limit, advertised as SIZE and enforced.
MAX_MAIL_SIZE = 35882577

_CONF = """\
instance_name = subfx-{name}
base_dir = {dir}/run
state_dir = {dir}/state
log_path = {dir}/log/submission.log
protocols = submission
listen = {host}
hostname = localhost
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
disable_plaintext_auth = yes
login_trusted_networks =
auth_mechanisms = xoauth2 oauthbearer
auth_failure_delay = 0
auth_cache_size = 0
mail_location = maildir:~/Maildir
mail_temp_dir = {dir}/tmp
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {dir}/dovecot-oauth2.conf.ext
}}
userdb {{
  driver = static
  args = allow_all_users=yes uid=nobody gid=nogroup home={dir}/mail/%d/%n
}}
submission_relay_host = {sink_host}
submission_relay_port = {sink_port}
submission_relay_ssl = no
submission_relay_trusted = no
submission_max_mail_size = {max_size}
protocol submission {{
  mail_max_userip_connections = 2100
}}
default_client_limit = 5000
service submission-login {{
  inet_listener submission {{
    address = {host}
    port = {plain_port}
  }}
  inet_listener submissions {{
    address = {host}
    port = {tls_port}
    ssl = yes
  }}
  service_count = 0
  process_min_avail = 2
}}
service submission {{
  process_limit = 2100
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""


def strip_received(data: bytes) -> bytes:
    """*data* without the one ``Received:`` header Dovecot prepends.

    The header is its first line and the tab-indented lines after it.
    """
    if not data.startswith(b"Received: "):
        raise ValueError("no Received header first")
    pos = data.index(b"\r\n") + 2
    while data.startswith(b"\t", pos):
        pos = data.index(b"\r\n", pos) + 2
    return data[pos:]


def _free_ports(host: str, n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Submission:
    """
    One private Dovecot submission instance on 127.0.0.2.

    After :meth:`start`: ``host``, ``port`` (submission, STARTTLS
    required), ``tls_port`` (submissions, implicit TLS), ``dir`` and
    ``log_path``. :meth:`stop` stops the master but keeps the directory and
    the ports, so :meth:`start` brings the same server back (for "provider
    down" tests); :meth:`close` stops it and deletes the directory.

    :param pki: its certificate, which must name 127.0.0.2; clients (and
        the proxy's ``--smtp-ca-file``) trust :attr:`ca_cert`.
    :param sink: the relay host; start it first.
    :param max_mail_size: ``submission_max_mail_size``, advertised as
        ``SIZE``: a smaller one makes a server that offers less.
    """

    host = "127.0.0.2"

    def __init__(
        self,
        pki: PKI,
        introspection_url: str,
        sink: SMTPSink,
        max_mail_size: int = MAX_MAIL_SIZE,
    ) -> None:
        self.pki = pki
        self.max_mail_size = max_mail_size
        self.introspection_url = introspection_url
        self.sink = sink
        self.dir: str | None = None
        self.conf_path: str | None = None
        self.log_path: str | None = None
        self.port: int | None = None
        self.tls_port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- life cycle -----------------------------------------------------------

    def start(self) -> None:
        if self._proc is not None:
            raise DovecotError("already started")
        if os.geteuid() != 0:
            raise DovecotError("this fixture runs Dovecot as root")
        if self.sink.port is None:
            raise DovecotError("start the sink first")
        restart = self.dir is not None
        if not restart:
            self.dir = tempfile.mkdtemp(prefix="sm", dir="/tmp")
        try:
            if not restart:
                self._prepare_dir()
            last_error: Exception | None = None
            for _ in range(START_ATTEMPTS):
                try:
                    # A restart keeps the ports the accounts point at.
                    self._start_once(new_ports=not restart)
                    return
                except DovecotError as e:  # most likely a lost port race
                    last_error = e
                    self._stop_process()
            raise DovecotError(
                f"submission did not start in {START_ATTEMPTS} attempts: {last_error}"
            )
        except BaseException:
            if not restart:
                self.close()
            raise

    def _prepare_dir(self) -> None:
        assert self.dir is not None
        # The submission processes run as nobody: every parent must be
        # traversable, and mail_temp_dir (DATA over 128 KiB) writable.
        os.chmod(self.dir, 0o755)
        for sub in ("run", "state", "log"):
            os.mkdir(os.path.join(self.dir, sub), 0o755)
        for sub in ("mail", "tmp"):
            path = os.path.join(self.dir, sub)
            os.mkdir(path, 0o700)
            os.chown(path, _uid("nobody"), _gid("nogroup"))
        self.conf_path = os.path.join(self.dir, "submission.conf")
        self.log_path = os.path.join(self.dir, "log", "submission.log")
        with open(os.path.join(self.dir, "dovecot-oauth2.conf.ext"), "w") as f:
            f.write(_OAUTH2_CONF.format(introspection_url=self.introspection_url))

    def _write_conf(self) -> None:
        assert self.dir is not None and self.conf_path is not None
        assert self.sink.port is not None
        self.port, self.tls_port = _free_ports(self.host, 2)
        with open(self.conf_path, "w") as f:
            f.write(
                _CONF.format(
                    name=os.path.basename(self.dir),
                    dir=self.dir,
                    host=self.host,
                    cert=self.pki.cert,
                    key=self.pki.key,
                    sink_host=self.sink.host,
                    sink_port=self.sink.port,
                    max_size=self.max_mail_size,
                    plain_port=self.port,
                    tls_port=self.tls_port,
                )
            )

    def _start_once(self, new_ports: bool) -> None:
        assert self.dir is not None and self.conf_path is not None
        if new_ports:
            self._write_conf()
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
                raise DovecotError(f"dovecot exited with {self._proc.returncode}: {self._tail()}")
            if self._greets():
                return
            if time.monotonic() > deadline:
                raise DovecotError(f"no SMTP greeting after {START_TIMEOUT}s: {self._tail()}")
            time.sleep(0.05)

    def _greets(self) -> bool:
        assert self.port is not None
        try:
            with socket.create_connection((self.host, self.port), 1) as s:
                s.settimeout(2)
                line = b""
                while not line.endswith(b"\n") and len(line) < 4096:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    line += chunk
                return line.startswith(b"220 ")
        except OSError:
            return False

    def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, STOP_TIMEOUT)

    @property
    def ca_cert(self) -> str:
        """The CA file that verifies this server's certificate."""
        return self.pki.ca_cert

    @property
    def running(self) -> bool:
        return self._proc is not None

    def stop(self) -> None:
        """Stop the master and wait for it; keep the directory and ports."""
        self._stop_process()

    def close(self) -> None:
        """Stop, and delete the directory."""
        self._stop_process()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> Submission:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- logs -------------------------------------------------------------------

    def log(self) -> str:
        """The whole submission log (logins, relayed messages, errors)."""
        try:
            with open(self.log_path or "", "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _tail(self, n: int = 4000) -> str:
        out = []
        for path in (os.path.join(self.dir or "", "log", "master.out"), self.log_path):
            try:
                with open(path or "", "rb") as f:
                    out.append(f.read()[-n:].decode("utf-8", "replace"))
            except OSError:
                pass
        return "\n".join(out) or "(no log)"
