"""
Alerts that reach someone: signed JSON POSTs to ``--webhook`` receivers
when an account changes state or a token is revoked (docs/monitoring.md,
"Webhooks").
"""

from ._alerts import Alerts, AlertsService, redisClaim, stateChanged
from ._deliver import Receiver
from ._event import (
    EVENT_ID_HEADER,
    EVENT_TYPES,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Event,
    signature,
    verify,
)
from ._setup import (
    AlertingAdmin,
    buildAlerts,
    commandAdmin,
    delivered,
    receiverLabel,
    webhookSecret,
    webhookURLs,
)

__all__ = [
    "EVENT_ID_HEADER",
    "EVENT_TYPES",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "AlertingAdmin",
    "Alerts",
    "AlertsService",
    "Event",
    "Receiver",
    "buildAlerts",
    "commandAdmin",
    "delivered",
    "receiverLabel",
    "redisClaim",
    "signature",
    "stateChanged",
    "verify",
    "webhookSecret",
    "webhookURLs",
]
