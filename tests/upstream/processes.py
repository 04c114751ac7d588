"""Run the fake OAuth2 provider (:mod:`tests.upstream.provider`) as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from tests.upstream.osutil import stop_process

from .certs import PKI

__all__ = ["Provider", "ProviderError"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

# Never send loopback control traffic through an HTTP proxy from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ProviderError(RuntimeError):
    """The provider did not start, or a control call failed."""


class Provider:
    """The fake provider process: ``start()``, ``stop()``, control helpers.

    ``workdir`` receives ``provider-ports.json`` and ``provider.log`` (the
    process's stdout/stderr, i.e. Twisted's log and access log).
    """

    host = "127.0.0.1"

    def __init__(self, pki: PKI, workdir: str) -> None:
        self.pki = pki
        self.workdir = workdir
        self.ports_file = os.path.join(workdir, "provider-ports.json")
        self.log_path = os.path.join(workdir, "provider.log")
        self.https_port: int | None = None
        self.http_port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- life cycle -----------------------------------------------------------

    def start(self) -> None:
        if self._proc is not None:
            raise ProviderError("already started")
        os.makedirs(self.workdir, exist_ok=True)
        if os.path.exists(self.ports_file):
            os.unlink(self.ports_file)
        cmd = [
            sys.executable,
            "-m",
            "tests.upstream.provider",
            "--tls-cert",
            self.pki.cert,
            "--tls-key",
            self.pki.key,
            "--ports-file",
            self.ports_file,
        ]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while True:
                if os.path.exists(self.ports_file):
                    with open(self.ports_file) as f:
                        ports = json.load(f)
                    self.https_port = int(ports["https"])
                    self.http_port = int(ports["http"])
                    return
                if self._proc.poll() is not None:
                    raise ProviderError(
                        f"provider exited with {self._proc.returncode}: " + self._log_tail()
                    )
                if time.monotonic() > deadline:
                    raise ProviderError(
                        f"provider not listening after {START_TIMEOUT}s: " + self._log_tail()
                    )
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stop_process(proc, STOP_TIMEOUT)

    def __enter__(self) -> Provider:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    # -- addresses --------------------------------------------------------------

    @property
    def token_url(self) -> str:
        """``https://127.0.0.1:N/token``."""
        return f"https://{self.host}:{self._port('https_port')}/token"

    @property
    def authorize_url(self) -> str:
        """``https://127.0.0.1:N/authorize``."""
        return f"https://{self.host}:{self._port('https_port')}/authorize"

    @property
    def device_url(self) -> str:
        """``https://127.0.0.1:N/device``: the device authorization endpoint."""
        return f"https://{self.host}:{self._port('https_port')}/device"

    @property
    def issuer(self) -> str:
        """``https://127.0.0.1:N``: the ``iss`` of the ID tokens."""
        return f"https://{self.host}:{self._port('https_port')}"

    @property
    def introspection_url(self) -> str:
        """``http://127.0.0.1:M/introspect``."""
        return f"http://{self.host}:{self._port('http_port')}/introspect"

    @property
    def control_url(self) -> str:
        return f"http://{self.host}:{self._port('http_port')}/control"

    def _port(self, name: str) -> int:
        port = getattr(self, name)
        if port is None:
            raise ProviderError("provider not started")
        return port

    # -- control endpoints --------------------------------------------------------

    def _control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        url = f"{self.control_url}/{path}"
        if body is None:
            req = urllib.request.Request(url, method="GET")
        else:
            req = urllib.request.Request(
                url,
                data=json.dumps(body).encode(),
                method="POST",
                headers={"Content-Type": "application/json"},
            )
        try:
            with _opener.open(req, timeout=10) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")
            raise ProviderError(f"{path}: HTTP {e.code}: {detail}") from None

    def add_grant(
        self,
        refresh_token: str,
        username: str,
        client_id: str = "app-client",
        client_secret: str = "app-secret",
        expires_in: int = 3600,
        rotate: bool = False,
    ) -> None:
        """Register a refresh token for *username* issued to *client_id*."""
        self._control(
            "grant",
            {
                "refresh_token": refresh_token,
                "username": username,
                "client_id": client_id,
                "client_secret": client_secret,
                "expires_in": expires_in,
                "rotate": rotate,
            },
        )

    def revoke_grant(self, refresh_token: str, revoke_access: bool = False) -> bool:
        """Make *refresh_token* answer ``invalid_grant``; True if it was known.

        With *revoke_access*, the user's issued access tokens die too.
        """
        answer = self._control(
            "revoke-grant",
            {"refresh_token": refresh_token, "revoke_access": revoke_access},
        )
        return bool(answer["found"])

    def expire_access(self, username: str | None = None) -> int:
        """Invalidate all (or *username*'s) access tokens; return how many."""
        body = {} if username is None else {"username": username}
        return int(self._control("expire-access", body)["expired"])

    def fail(self, status: int, count: int) -> None:
        """Answer the next *count* token calls with *status* (-1: all, 0: off)."""
        self._control("fail", {"status": status, "count": count})

    def delay(self, seconds: float) -> None:
        """Delay every token-endpoint answer by *seconds* (0: off)."""
        self._control("delay", {"seconds": seconds})

    def hold_introspection(self, hold: bool) -> None:
        """Hold every introspection answer (Dovecot's logins wait) until called with False."""
        self._control("introspection-hold", {"hold": hold})

    def register_client(
        self, client_id: str, client_secret: str, redirect_uris: Sequence[str] = ()
    ) -> None:
        """Register an OAuth2 client, or add *redirect_uris* to it.

        An empty *client_secret* makes a public client.  Registering a known
        client with another secret is an error.
        """
        self._control(
            "client",
            {
                "client_id": client_id,
                "client_secret": client_secret,
                "redirect_uris": list(redirect_uris),
            },
        )

    def consent(self, username: str | None, deny: bool = False) -> None:
        """Make *username* consent at every ``/authorize`` from now on.

        With *deny*, they decline (``error=access_denied``); with None,
        nobody is there to consent (also ``access_denied``).
        """
        self._control("consent", {"username": username, "deny": deny})

    def approve_device(self, user_code: str, username: str) -> None:
        """Approve the pending device grant shown as *user_code* as *username*."""
        self._control("device/approve", {"user_code": user_code, "username": username})

    def deny_device(self, user_code: str) -> None:
        """Decline the pending device grant shown as *user_code*."""
        self._control("device/deny", {"user_code": user_code})

    def pending_device_codes(self) -> list[str]:
        """User codes of device grants not yet decided or expired, oldest first."""
        return list(self._control("device/pending")["user_codes"])

    def device_interval(self, seconds: int) -> None:
        """Announce and enforce a device polling interval (default 1s)."""
        self._control("device/interval", {"seconds": seconds})

    def stats(self) -> dict[str, Any]:
        """``{"token_calls", "introspect_calls", "authorize_calls",
        "code_exchanges", "device_authorizations", "device_polls",
        "token_calls_by_username"}``."""
        return dict(self._control("stats"))

    def reset_stats(self) -> None:
        self._control("reset-stats", {})
