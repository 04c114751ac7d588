"""
The options of ``twistd imapproxy``: the command line and the config file,
checked and converted (``SETTINGS`` in ``settings.py`` is the table), and the
store they name, opened.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from twisted.logger import Logger
from twisted.python import usage

from . import __version__, selfcheck
from .alerts import webhookSecret
from .certs import (
    CertificateError,
    ReloadingCertificate,
    configuredCertificateEndpoint,
    usesConfiguredCertificate,
)
from .config import ConfigError, readConfig, splitList
from .encryption import SecretKeyError
from .endpoints import serverEndpoint
from .imap import PLAINTEXT_POLICIES
from .relay import MODES as RELAY_MODES
from .settings import LIST_DEFAULTS, LIST_SETTINGS, SETTINGS, ZERO_ALLOWED
from .smtp import validHostname
from .store import (
    SQLiteStore,
    StoreError,
    defaultStoreURL,
    makeStore,
)

log = Logger(namespace="proxy.tap")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "An IMAP proxy for OAuth2-only mailboxes: clients log in with an account "
        "id and an imapproxy token; the proxy logs in to the provider with "
        "XOAUTH2 and relays the session. Settings may also come from --config "
        "(see tap.example.conf); command-line options win."
    )
    optParameters = [
        ["config", "c", None, "INI file with an [imapproxy] section of these settings"],
    ] + [
        [
            name,
            None,
            None,
            f"{help_} [default: {default}]"
            if default is not None and "default" not in help_
            else help_,
        ]
        for name, (default, _conv, help_) in SETTINGS.items()
    ]

    def __init__(self) -> None:
        super().__init__()
        for name in LIST_DEFAULTS:
            self[name] = []

    def parseOptions(self, options: Any = None) -> None:
        """
        As usage.Options, but a bad option or a start-up check that fails ends
        the process with one line (``imapproxy: …``, status 1): twistd would
        print its whole usage text above the reason.
        """
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            raise SystemExit(f"imapproxy: {e}") from None

    def opt_version(self) -> None:
        """Display imapproxy's version (and Twisted's) and exit."""
        from twisted import version as twistedVersion

        print(f"imapproxy {__version__} (Twisted {twistedVersion.short()})")
        sys.exit(0)

    def opt_port(self, description: str) -> None:
        """
        Endpoint to accept IMAP clients on, e.g. ssl:2993 (with --tls-certificate),
        ssl:2993:privateKey=key.pem:certKey=cert.pem or haproxy:tcp:2143 (repeatable)
        [default: tcp:2143:interface=127.0.0.1]
        """
        self["port"].append(description)

    opt_p = opt_port

    def opt_api_port(self, description: str) -> None:
        """
        Endpoint for the HTTP API, e.g. ssl:8443 (with --tls-certificate)
        (repeatable; "none" for no API) [default: tcp:8080:interface=127.0.0.1]
        """
        self["api-port"].append(description)

    def opt_smtp_port(self, description: str) -> None:
        self["smtp-port"].append(description)

    # One line: --help wraps the text as it is, indentation included.
    opt_smtp_port.__doc__ = (
        "Endpoint to accept SMTP submission clients on, e.g. ssl:2465 (implicit TLS "
        "with --tls-certificate) or tcp:2587 (STARTTLS when a certificate is set) "
        '(repeatable; "none" for no SMTP) [default: tcp:2587:interface=127.0.0.1]'
    )

    def opt_metrics_port(self, description: str) -> None:
        """Endpoint serving /metrics only, e.g. tcp:9143 (repeatable) [default: none]"""
        self["metrics-port"].append(description)

    def opt_webhook(self, url: str) -> None:
        """
        URL (http or https) that gets a signed JSON POST when an account changes
        state or a token is revoked (repeatable) [default: none]
        """
        self["webhook"] = f"{self['webhook'] or ''} {url}".strip()

    def postOptions(self) -> None:
        reason = selfcheck.check()
        if reason is not None:
            raise usage.UsageError(reason)
        fromFile: dict[str, str] = {}
        if self["config"]:
            try:
                fromFile = readConfig(self["config"], set(SETTINGS) | LIST_SETTINGS)
            except ConfigError as e:
                raise usage.UsageError(str(e)) from None
        for name, default in LIST_DEFAULTS.items():
            if not self[name]:
                self[name] = splitList(fromFile.get(name, "")) or [default]
            if self[name] == ["none"] and name != "port":
                self[name] = []
        for name, (default, conv, _help) in SETTINGS.items():
            raw = self[name] if self[name] is not None else fromFile.get(name)
            if raw is None:
                self[name] = default
                continue
            try:
                self[name] = conv(raw)
            except ValueError:
                raise usage.UsageError(f"--{name}: not a valid value: {raw!r}") from None
        if self["plaintext-login"] not in PLAINTEXT_POLICIES:
            raise usage.UsageError("--plaintext-login must be allow, loopback or deny")
        if self["smtp-hostname"] is not None and not validHostname(self["smtp-hostname"]):
            raise usage.UsageError("--smtp-hostname must be a host name (letters, digits, . and -)")
        if self["relay"] not in RELAY_MODES:
            raise usage.UsageError("--relay must be fast or plain")
        for name, (_default, conv, _help) in SETTINGS.items():
            if name in ZERO_ALLOWED and self[name] == 0:
                continue
            if conv in (int, float) and not (math.isfinite(self[name]) and self[name] > 0):
                raise usage.UsageError(f"--{name} must be a positive number")
        worst = 2 * (self["oauth2-deadline"] + self["upstream-timeout"])
        if self["login-timeout"] < worst:
            # A login that refreshes, is refused upstream and retries could
            # be cut off by the login deadline: say so, but let it run.
            log.warn(
                "--login-timeout {t}s is shorter than the worst-case login "
                "(2 x (oauth2-deadline + upstream-timeout) = {w}s)",
                t=self["login-timeout"],
                w=worst,
            )
        try:
            self["_webhookSecret"] = webhookSecret(self["webhook"], self["webhook-secret-file"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if bool(self["tls-certificate"]) != bool(self["tls-key"]):
            raise usage.UsageError("--tls-certificate and --tls-key go together")
        self["certificate"] = None
        if self["tls-certificate"]:
            try:
                self["certificate"] = ReloadingCertificate.fromFiles(
                    os.path.abspath(self["tls-certificate"]), os.path.abspath(self["tls-key"])
                )
            except CertificateError as e:
                raise usage.UsageError(str(e)) from None
        # STARTTLS offers the same, reloading, certificate.
        self["starttls"] = self["certificate"]
        from twisted.internet import reactor

        for description in sum((self[name] for name in LIST_DEFAULTS), []):
            self.endpoint(reactor, description)
        self._openStore(reactor)

    def endpoint(self, reactor: Any, description: str) -> Any:
        """
        The endpoint for a ``--port``, ``--api-port`` or ``--smtp-port`` string.

        :raises usage.UsageError: naming the string and what is wrong.
        """
        try:
            if usesConfiguredCertificate(description):
                if self["certificate"] is None:
                    raise ValueError(
                        "names no privateKey=/certKey= and no tls-certificate/tls-key is set"
                    )
                return configuredCertificateEndpoint(reactor, description, self["certificate"])
            return serverEndpoint(reactor, description)
        except Exception as e:
            # Endpoint parsers raise all sorts (a systemd: index without a
            # passed socket is an IndexError): every one is a usage error.
            raise usage.UsageError(f"endpoint {description!r}: {e}") from None

    def _openStore(self, reactor: Any) -> None:
        if self["store"] is None:
            self["store"] = defaultStoreURL()
        try:
            store = makeStore(self["store"], self["secret-file"], reactor)
            fresh = isinstance(store, SQLiteStore) and not os.path.exists(store.path)
            # Opened here to refuse a wrong key or a bad file before anything
            # starts, then closed: twistd may fork to daemonize, and an SQLite
            # connection must not cross a fork. The service opens it again.
            store.openBlocking()
            store._closeBlocking()
        except (StoreError, SecretKeyError) as e:
            raise usage.UsageError(str(e)) from None
        except OSError as e:
            raise usage.UsageError(f"cannot open the store {self['store']}: {e}") from None
        self["_store"] = store
        self["_freshStore"] = fresh
