"""
The webhook settings (``--webhook``, ``--webhook-secret-file``), checked at
start-up, and the objects ``makeService`` builds from them.
"""

from __future__ import annotations

import sys
from typing import Any
from urllib.parse import urlsplit

from ..admin import Admin, AdminError
from ._alerts import Alerts, AlertsService, redisClaim
from ._deliver import OUTCOMES, RESULTS, Counters, Receiver
from ._event import EVENT_TYPES

# Shorter keys are refused: the HMAC is only as strong as its key.
MIN_SECRET = 16


def webhookURLs(value: str) -> tuple[str, ...]:
    """
    The ``webhook`` setting: URLs separated by white space (the option is
    repeatable, the config file takes one a line), each http or https.
    """
    urls = tuple(value.split())
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(url)
    return urls


def receiverLabel(url: str) -> str:
    """How logs name a receiver: its path or query may hold a credential."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


def webhookSecret(urls: tuple[str, ...], path: str | None) -> bytes | None:
    """
    The HMAC key, read once at start-up (None without webhooks).

    :raises ValueError: in one line naming the file, never its content.
    """
    if not urls:
        return None
    if not path:
        raise ValueError("--webhook needs --webhook-secret-file (the key that signs each event)")
    try:
        with open(path, "rb") as f:
            secret = f.read(4096).strip()
    except OSError as e:
        raise ValueError(f"--webhook-secret-file {path}: {e.strerror}") from None
    if len(secret) < MIN_SECRET:
        raise ValueError(f"--webhook-secret-file {path}: at least {MIN_SECRET} bytes, please")
    return secret


class AlertingAdmin(Admin):
    """
    ``Admin`` that tells the webhooks about what the API changes: tokens
    revoked (one by one, or with their account), account states set.

    :param alerts: the ``Alerts``.
    """

    def __init__(self, *args: Any, alerts: Alerts, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.alerts = alerts

    async def revokeToken(
        self, tokenOrId: str, disconnect: bool = False, actor: str = "cli"
    ) -> int:
        record = await self.findToken(tokenOrId)
        closed = await super().revokeToken(tokenOrId, disconnect=disconnect, actor=actor)
        self.alerts.tokenRevoked(record.id, record.account, "revoked", actor)
        return closed

    async def updateAccount(self, accountId: str, data: Any, actor: str = "cli") -> Any:
        before = await self.store.getAccount(accountId)
        account = await super().updateAccount(accountId, data, actor=actor)
        if before is not None:
            self.alerts.accountState(accountId, before.state, account.state, "operator")
        return account

    async def createAccount(self, data: Any, replace: bool = False, actor: str = "cli") -> Any:
        accountId = data.get("account") if isinstance(data, dict) else None
        before = await self.store.getAccount(accountId) if isinstance(accountId, str) else None
        account = await super().createAccount(data, replace=replace, actor=actor)
        if before is not None:
            self.alerts.accountState(account.id, before.state, account.state, "operator")
        return account

    async def removeAccount(self, accountId: str, actor: str = "cli") -> int:
        tokens = await self.store.listTokens(accountId) if self.alerts else []
        closed = await super().removeAccount(accountId, actor=actor)
        for token in tokens:
            self.alerts.tokenRevoked(token.id, accountId, "account-deleted", actor)
        return closed


# Seconds the admin command waits for its webhook deliveries before it exits.
COMMAND_DEADLINE = 30.0


class WebhookSettingsError(AdminError):
    """The config file's webhook settings are wrong (the admin command's line)."""


def commandAdmin(store: Any, settings: dict[str, str], **kwargs: Any) -> AlertingAdmin:
    """
    The admin command's ``Admin``: it sends the webhooks the server would
    when its config file (``--config``) names them. ``delivered`` waits.

    :raises WebhookSettingsError: in one line.
    """
    from twisted.internet import reactor

    try:
        urls = webhookURLs(settings.get("webhook", ""))
    except ValueError as e:
        raise WebhookSettingsError(f"webhook: not a valid value: {e}") from None
    try:
        secret = webhookSecret(urls, settings.get("webhook-secret-file"))
    except ValueError as e:
        raise WebhookSettingsError(str(e)) from None
    alerts, _ = buildAlerts(urls, secret, reactor, store, None)
    return AlertingAdmin(store, alerts=alerts, **kwargs)


async def delivered(admin: AlertingAdmin, timeout: float = COMMAND_DEADLINE) -> None:
    """Before the admin command exits: its events delivered (or said not to be)."""
    if admin.alerts:
        left = await admin.alerts.settle(timeout)
        if left:
            print(f"imapproxy: {left} webhook event(s) not delivered", file=sys.stderr)


def buildAlerts(
    urls: tuple[str, ...], secret: bytes | None, reactor: Any, store: Any, metrics: Any
) -> tuple[Alerts, AlertsService]:
    """
    The ``Alerts`` of ``makeService`` and the service that stops them.

    :param store: the store; with Redis (``IRedisAccess``) event ids are
        claimed there, so instances sharing it send each event once.
    """
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    from ..store import IRedisAccess

    if not urls or secret is None:
        quiet = Alerts(clock=reactor)
        return quiet, AlertsService(quiet)
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 1
    # Agent's default TLS policy checks the certificate and the host name.
    http = HTTPClient(Agent(reactor, pool=pool))
    alerts = Alerts(
        clock=reactor, claim=redisClaim(store) if IRedisAccess.providedBy(store) else None
    )
    alerts.counters = _counters(metrics, alerts)
    for url in urls:
        alerts.receivers.append(
            Receiver(url, secret, http, reactor, alerts.counters, label=receiverLabel(url))
        )
    return alerts, AlertsService(alerts, pool)


def _counters(metrics: Any, alerts: Alerts) -> Any:
    """The metrics' webhook series, every fixed label value shown from the start."""
    if metrics is None:
        return None
    counters = Counters(*metrics.webhookCounters(alerts.depth))
    for kind in EVENT_TYPES:
        counters.events.labels(kind)
    for result in RESULTS:
        counters.deliveries.labels(result)
    for outcome in OUTCOMES:
        counters.attempts.labels(outcome)
    return counters
