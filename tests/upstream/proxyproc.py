"""
Run the real product as the tests' subject: ``twistd -n imapproxy`` and the
``imapproxy`` admin command, as installed in the test environment (the
scripts beside ``sys.executable``), from a work directory outside the source
tree so that the installed package, plugin included, is what runs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

BIN = os.path.dirname(sys.executable)
START_TIMEOUT = 20.0

_LISTENING = re.compile(r"IMAP listening on (\S+):(\d+) \(([\w+]+)\)")
_API_LISTENING = re.compile(r"API listening on (\S+):(\d+) \((\w+)\)")
_SMTP_LISTENING = re.compile(r"SMTP listening on (\S+):(\d+) \(([\w+]+)\)")


class ProxyError(RuntimeError):
    """The proxy did not start, or an admin command failed."""


def _script(name: str) -> str:
    path = os.path.join(BIN, name)
    if not os.path.exists(path):
        raise ProxyError(f"{path} is missing: install the package (pip install .) first")
    return path


def _smtpPorts(extra: tuple[str, ...]) -> list[str]:
    """The ``--smtp-port`` values among ``extra``."""
    args = list(extra)
    given = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--smtp-port"]
    return given + [a.split("=", 1)[1] for a in args if a.startswith("--smtp-port=")]


class ProxyProcess:
    """
    :param workdir: holds the store, the secret key and ``twistd.log``.
    :param env: extra environment (e.g. ``REQUESTS_CA_BUNDLE`` for the fake
        provider's HTTPS token endpoint).
    """

    def __init__(
        self,
        workdir: str,
        env: dict[str, str] | None = None,
        store: str | None = None,
        secret_file: str | None = None,
        server_prefix: list[str] | None = None,
    ):
        self.workdir = workdir
        # e.g. setpriv …: the server runs as another user than the admin command.
        self.server_prefix = list(server_prefix or [])
        os.makedirs(workdir, exist_ok=True)
        self.store = store or f"sqlite:///{workdir}/state/imapproxy.sqlite3"
        self.secret_file = secret_file
        self.env = {**os.environ, **(env or {})}
        self.env.pop("PYTHONPATH", None)
        self.log_path = os.path.join(workdir, "twistd.log")
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.ports: dict[str, int] = {}
        self.api_port: int | None = None
        # The SMTP listeners, by kind (tcp, ssl, ...); smtp_port is the tcp one.
        self.smtp_port: int | None = None
        self.smtp_ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._logOffset = 0

    def _storeArgs(self) -> list[str]:
        args = ["--store", self.store]
        if self.secret_file:
            args += ["--secret-file", self.secret_file]
        return args

    # -- the admin command --------------------------------------------------

    def cli(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd = [_script("imapproxy"), *args[:2], *self._storeArgs(), *args[2:]]
        result = subprocess.run(
            cmd,
            cwd=self.workdir,
            env=self.env,
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise ProxyError(f"imapproxy {' '.join(args[:2])} failed: {result.stderr}")
        return result

    # -- the server ---------------------------------------------------------

    def start(self, *extra: str) -> None:
        """
        :param extra: more ``twistd imapproxy`` options; each ``--port`` in
            them adds a listener to wait for, and so does each ``--smtp-port``
            (without one, an SMTP listener on a free loopback port is
            added; ``--smtp-port none`` has none). Login penalties are off unless
            ``extra`` sets ``--login-penalty``: the suite's own refused logins
            from 127.0.0.1 must not slow the tests that follow them (a test
            that depends on another's leftovers depends on run order);
            ``test_integration_penalties`` runs them for real.
        """
        if self._proc is not None:
            raise ProxyError("already started")
        if os.path.exists(self.log_path):
            self._logOffset = os.path.getsize(self.log_path)
        smtpGiven = _smtpPorts(extra)
        # SMTP listeners to wait for: the one added here, or those given.
        smtpWanted = 0 if smtpGiven == ["none"] else max(len(smtpGiven), 1)
        cmd = [
            *self.server_prefix,
            _script("twistd"),
            "-n",
            "--pidfile=",
            "--logfile",
            self.log_path,
            "imapproxy",
            *self._storeArgs(),
            "--port",
            "tcp:0:interface=127.0.0.1",
            "--api-port",
            "tcp:0:interface=127.0.0.1",
            *([] if "--login-penalty" in extra else ["--login-penalty", "0"]),
            *([] if smtpGiven else ["--smtp-port", "tcp:0:interface=127.0.0.1"]),
            *extra,
        ]
        self._proc = subprocess.Popen(
            cmd, cwd=self.workdir, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            log = self.log()
            found = _LISTENING.findall(log)
            api = _API_LISTENING.search(log)
            smtp = _SMTP_LISTENING.findall(log)
            if len(found) >= 1 + list(extra).count("--port") and api and len(smtp) >= smtpWanted:
                self.ports = {kind: int(port) for _host, port, kind in found}
                self.port = self.ports["tcp"]
                self.api_port = int(api.group(2))
                self.smtp_ports = {kind: int(port) for _host, port, kind in smtp}
                self.smtp_port = self.smtp_ports.get("tcp")
                return
            if self._proc.poll() is not None:
                out = self._proc.stdout.read().decode(errors="replace") if self._proc.stdout else ""
                self._proc = None
                raise ProxyError(f"twistd exited: {out}\n{self.log()[-3000:]}")
            time.sleep(0.05)
        self.stop()
        raise ProxyError("twistd did not start listening in time:\n" + self.log()[-3000:])

    def log(self) -> str:
        """This run's log (what was written since ``start``)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                f.seek(self._logOffset)
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 10.0) -> None:
        """Until the whole log holds ``text`` ``count`` times; ProxyError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.full_log().count(text) < count:
            if time.monotonic() > deadline:
                raise ProxyError(f"no log line {text!r} within {timeout}s")
            time.sleep(0.02)

    def full_log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()

    def wait(self, timeout: float) -> int | None:
        """
        Until the server exits by itself (after a signal sent to ``pid()``);
        killed after ``timeout``. :return: its exit status, None when killed.
        """
        proc, self._proc = self._proc, None
        assert proc is not None
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None
        finally:
            if proc.stdout:
                proc.stdout.close()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
