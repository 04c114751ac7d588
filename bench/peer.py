"""
The peer product the benchmarks compare against: Email OAuth 2.0 Proxy
(``emailproxy`` on PyPI, https://github.com/simonrob/email-oauth2-proxy),
pinned to version :data:`PEER_VERSION`, run headless in a venv of its own.

Installation (:func:`ensure_installed`)
    ``python3 -m venv VENV`` and ``pip install emailproxy==PEER_VERSION``: its
    core requirements only (cryptography, pyjwt, prompt_toolkit, and
    pyasyncore on Python >= 3.12), none of the ``[gui]`` extra.  A marker file
    in the venv makes later calls return at once.

Topology (:class:`Peer`), the same as the one our proxy is measured in
    client --TLS--> emailproxy (127.0.0.1:port) --TLS--> Dovecot's implicit-TLS
    port, authenticating upstream with ``AUTHENTICATE XOAUTH2`` and an access
    token from the fake provider's token endpoint.

    * Client side: the ``[IMAP-<port>]`` server section sets
      ``local_certificate_path``/``local_key_path`` to the test PKI's leaf
      certificate and key, so emailproxy serves implicit TLS; clients verify it
      with :attr:`Peer.cafile` (the test CA).
    * Upstream: ``server_address = localhost``, ``server_port =
      dovecot.tls_port``.  emailproxy wraps the socket with
      ``ssl.create_default_context()`` (hostname and chain checked), so its
      environment has ``SSL_CERT_FILE`` set to the test CA, which Python's
      default verify paths honour.  The same variable makes its token requests
      (``urllib.request`` with the default context) trust the provider's HTTPS.
      Proxy variables (``http_proxy`` etc.) and ``PYTHON*`` variables are
      removed from its environment.
    * Each account is a ``[user@domain]`` section with ``token_url`` (the
      provider's), ``oauth2_scope``, ``client_id`` and ``client_secret``: the
      configuration emailproxy documents for a provider, less
      ``permission_url``/``redirect_uri`` (see bootstrap below).
    * Everything else is emailproxy's default: no ``[emailproxy]`` global
      options, INFO logging (no ``--debug``), its own connection handling.
      Command line: ``python -m emailproxy --no-gui --config-file CONF
      --log-file LOG``.  ``--log-file`` only sends its (default-level) log to a
      file in the work directory instead of stderr; it also prints each log
      line to stdout, which goes to /dev/null.

Bootstrap: pre-authorised tokens, encrypted by emailproxy's own code
    emailproxy keeps each account's OAuth2 state in the config file, encrypted
    with a Fernet key derived (PBKDF2-HMAC-SHA256, 1,200,000 iterations) from
    the password the IMAP client logs in with and a per-account
    ``token_salt``.  After a successful interactive authorisation it stores
    ``token_salt``, ``token_iterations``, ``access_token``,
    ``access_token_expiry`` and ``refresh_token``.  We have a refresh token
    already (the same grant our proxy uses), so before starting emailproxy,
    :mod:`bench.peer_seed` runs in the peer venv, imports ``emailproxy`` and
    uses its ``Cryptographer`` class to produce ``token_salt``,
    ``token_iterations`` and the encrypted ``refresh_token`` for a random
    per-account password, which :class:`Peer` writes into the account's
    section.  No access token is stored: on an account's first LOGIN
    emailproxy decrypts the refresh token, calls the token endpoint itself
    (``grant_type=refresh_token``), encrypts and caches the access token and
    its expiry, and rewrites the config file, exactly as it does whenever a
    cached access token is missing or close to expiry.  ``permission_url`` is
    left out because nobody is there to authorise interactively: were the
    refresh ever refused, a LOGIN fails at once with ``NO`` instead of waiting
    up to 600 s for a human.

The caller registers the grants with the provider
(``provider.add_grant(refresh_token, email, client_id, client_secret)``, as
:func:`tests.conftest.register` does) before clients log in.  Clients log in
with the ``(username, password)`` that :meth:`Peer.add_account` returns: the
email address and the random password.

What emailproxy does per connection and per LOGIN (for reading results)
    * One thread per client connection (asyncore loop per connection); the
      listening socket has a backlog of 5.
    * A connection is opened to Dovecot (TLS handshake) as soon as the client
      connects; pre-login CAPABILITY answers are rewritten to AUTH=PLAIN.
    * Every LOGIN derives the account's key again: PBKDF2 with 1,200,000
      iterations plus 100,000 for its legacy fallback key, then decrypts the
      cached access token (it keeps no derived keys in memory), then sends
      ``AUTHENTICATE XOAUTH2`` upstream.  After Dovecot's OK it only relays
      bytes.
    * The access token is refreshed (one token call, one rewrite of the
      config file) when missing or within 600 s of expiry.
"""

from __future__ import annotations

import atexit
import configparser
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from typing import Any

from tests.upstream.osutil import free_port, stop_process

__all__ = ["PEER_VERSION", "Peer", "PeerError", "ensure_installed"]

PEER_PACKAGE = "emailproxy"
PEER_VERSION = "2026.7.3"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_seed.py")
# The scope of the fake provider's grants (tests.upstream.provider.DEFAULT_SCOPE);
# emailproxy requires one, though a refresh does not send it.
OAUTH2_SCOPE = "https://mail.google.com/"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
START_ATTEMPTS = 5
INSTALL_TIMEOUT = 600.0
_MARKER = ".bench-peer-installed"
_READY = "listening for authentication requests"
_PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "ftp_proxy", "no_proxy"}


class PeerError(RuntimeError):
    """emailproxy could not be installed, seeded or started."""


def ensure_installed(venv: str = ".bench-peer-venv") -> str:
    """Install emailproxy (headless) in *venv*; return the venv's python.

    A relative *venv* is taken from the repository root.  Idempotent: once a
    marker file records the installed version, this returns at once.
    """
    if not os.path.isabs(venv):
        venv = os.path.join(REPO_ROOT, venv)
    python = os.path.join(venv, "bin", "python")
    marker = os.path.join(venv, _MARKER)
    if os.path.exists(python) and _read(marker) == PEER_VERSION:
        return python
    if not os.path.exists(python):
        base = shutil.which("python3") or sys.executable
        _run([base, "-m", "venv", venv], "creating the peer venv")
    _run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            f"{PEER_PACKAGE}=={PEER_VERSION}",
        ],
        "installing emailproxy",
    )
    # It must import and parse its arguments without any GUI requirement.
    version = _run([python, "-m", PEER_PACKAGE, "--no-gui", "--version"], "running emailproxy")
    if not version.strip():
        raise PeerError("emailproxy --version printed nothing")
    with open(marker, "w") as f:
        f.write(PEER_VERSION)
    return python


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _run(cmd: list[str], what: str) -> str:
    try:
        result = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise PeerError(f"{what}: timed out after {INSTALL_TIMEOUT}s") from e
    if result.returncode != 0:
        raise PeerError(f"{what} failed ({result.returncode}): {result.stderr[-4000:]}")
    return result.stdout


class Peer:
    """One emailproxy process in *workdir*: ``add_account()``s, then ``start()``.

    *pki* (``tests.upstream.certs.PKI``), *provider* (started
    ``tests.upstream.Provider``) and *dovecot* (started
    ``tests.upstream.Dovecot``) are the shared test upstream; *python* is
    :func:`ensure_installed`'s answer.  After :meth:`start`: ``host``,
    ``port`` (implicit TLS), ``cafile`` and ``pid``.

    With *smtp* (Dovecot submission's implicit-TLS host and port) it also
    serves SMTP, implicit TLS on both legs (``[SMTP-<port>]``, no
    ``local_starttls``, ``server_starttls = False``), on ``smtp_port``:
    ``AUTH PLAIN`` with the IMAP username and password becomes ``AUTH
    XOAUTH2`` upstream, then it relays bytes.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        workdir: str,
        pki: Any,
        provider: Any,
        dovecot: Any,
        python: str,
        smtp: tuple[str, int] | None = None,
    ) -> None:
        self.smtp_server: tuple[str, int] | None = smtp
        self.smtp_port: int | None = None
        self.workdir = os.path.abspath(workdir)
        self.pki = pki
        self.provider = provider
        self.dovecot = dovecot
        self.python = python
        self.cafile: str = pki.ca_cert
        self.port: int | None = None
        self.config_path = os.path.join(self.workdir, "emailproxy.config")
        self.log_path = os.path.join(self.workdir, "emailproxy.log")
        self.stderr_path = os.path.join(self.workdir, "emailproxy.stderr")
        self._accounts: dict[str, dict[str, str]] = {}
        self._seeded: dict[str, dict[str, str]] = {}
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise PeerError("emailproxy is not running")
        return self._proc.pid

    # -- accounts ---------------------------------------------------------------

    def add_account(
        self, email: str, refresh_token: str, client_id: str, client_secret: str
    ) -> tuple[str, str]:
        """Configure *email*; return the ``(username, password)`` to LOGIN with.

        emailproxy's account names are email addresses, so the username is
        *email*; the password is random, and encrypts the account's tokens.
        """
        if self._proc is not None:
            raise PeerError("add accounts before start()")
        if "@" not in email or email in self._accounts:
            raise PeerError(f"not a new email address: {email!r}")
        password = secrets.token_urlsafe(18)
        self._accounts[email] = {
            "password": password,
            "refresh_token": refresh_token,
            "client_id": client_id,
            "client_secret": client_secret,
        }
        return email, password

    # -- config -------------------------------------------------------------------

    def _write_config(self, port: int | None, smtp_port: int | None = None) -> None:
        config = configparser.ConfigParser(interpolation=None)
        if port is not None:
            config[f"IMAP-{port}"] = {
                "local_address": self.host,
                "server_address": "localhost",
                "server_port": str(self.dovecot.tls_port),
                "local_certificate_path": self.pki.cert,
                "local_key_path": self.pki.key,
            }
        if smtp_port is not None and self.smtp_server is not None:
            config[f"SMTP-{smtp_port}"] = {
                "local_address": self.host,
                "server_address": self.smtp_server[0],
                "server_port": str(self.smtp_server[1]),
                "server_starttls": "False",
                "local_certificate_path": self.pki.cert,
                "local_key_path": self.pki.key,
            }
        for email, account in self._accounts.items():
            config[email] = {
                "token_url": self.provider.token_url,
                "oauth2_scope": OAUTH2_SCOPE,
                "client_id": account["client_id"],
                "client_secret": account["client_secret"],
                **self._seeded.get(email, {}),
            }
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            config.write(f)

    def _seed(self) -> None:
        """Encrypt each new account's refresh token with emailproxy's Cryptographer.

        The key derivation is deliberately slow (1.3M PBKDF2 iterations per
        account), so the accounts are split across one process per core.
        """
        todo = [e for e in self._accounts if e not in self._seeded]
        if not todo:
            return
        self._write_config(None)  # the seed reads the accounts' sections
        n = min(len(todo), os.cpu_count() or 1)
        chunks = [todo[i::n] for i in range(n)]
        procs = []
        try:
            for chunk in chunks:
                request = {
                    "config": self.config_path,
                    "accounts": [
                        {
                            "email": e,
                            "password": self._accounts[e]["password"],
                            "refresh_token": self._accounts[e]["refresh_token"],
                        }
                        for e in chunk
                    ],
                }
                proc = subprocess.Popen(
                    [self.python, "-I", SEED_SCRIPT, "--no-gui"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=self.workdir,
                    env=self._env(),
                )
                procs.append((proc, json.dumps(request).encode()))
            timeout = 60.0 + 5.0 * len(chunks[0])
            for proc, request_bytes in procs:
                out, err = proc.communicate(request_bytes, timeout=timeout)
                if proc.returncode != 0:
                    raise PeerError(
                        f"seeding tokens failed ({proc.returncode}): "
                        + err.decode("utf-8", "replace")[-4000:]
                    )
                self._seeded.update(json.loads(out))
        finally:
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k.lower() not in _PROXY_VARS and not k.startswith("PYTHON")
        }
        # Python's default verify paths (Dovecot's TLS, the token endpoint's HTTPS).
        env["SSL_CERT_FILE"] = self.pki.ca_cert
        return env

    # -- life cycle -----------------------------------------------------------------

    def start(self) -> None:
        """Seed the accounts, start emailproxy, wait until it listens."""
        if self._proc is not None:
            raise PeerError("already started")
        if not self._accounts:
            raise PeerError("no accounts: add_account() first")
        os.makedirs(self.workdir, exist_ok=True)
        try:
            self._seed()
            last = ""
            for _ in range(START_ATTEMPTS):
                port = free_port()
                smtp_port = free_port() if self.smtp_server is not None else None
                if self._start_once(port, smtp_port):
                    self.port, self.smtp_port = port, smtp_port
                    atexit.register(self.stop)
                    return
                last = self._log_tail()
            raise PeerError(f"emailproxy did not start in {START_ATTEMPTS} attempts: {last}")
        except BaseException:
            self.stop()
            raise

    def _start_once(self, port: int, smtp_port: int | None = None) -> bool:
        """True once listening on *port* (and *smtp_port*); False if a port was taken."""
        self._write_config(port, smtp_port)
        offset = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        cmd = [
            self.python,
            "-m",
            PEER_PACKAGE,
            "--no-gui",
            "--config-file",
            self.config_path,
            "--log-file",
            self.log_path,
        ]
        with open(self.stderr_path, "ab") as err:
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.workdir,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            log = self._log_since(offset)
            if _READY in log:
                return True
            if self._proc.poll() is not None:
                self._proc = None
                if "Address already in use" in log:  # a lost port race
                    return False
                raise PeerError(f"emailproxy exited at start: {self._log_tail()}")
            if time.monotonic() > deadline:
                raise PeerError(f"emailproxy not listening after {START_TIMEOUT}s")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop emailproxy (SIGTERM, then SIGKILL); safe to call at any time."""
        atexit.unregister(self.stop)
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stop_process(proc, STOP_TIMEOUT)

    def __enter__(self) -> Peer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- logs -----------------------------------------------------------------------

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _log_tail(self, n: int = 4000) -> str:
        out = []
        for path in (self.log_path, self.stderr_path):
            try:
                with open(path, "rb") as f:
                    out.append(f.read()[-n:].decode("utf-8", "replace"))
            except OSError:
                pass
        return "\n".join(out) or "(no log)"
