"""
Which relay a logged-in IMAP session gets: the plain byte ``Splice`` for an
unrestricted token (untouched, at full speed), the policy relay
(``proxy.policy.PolicySplice``) for a token with restrictions, whose
refusals are counted (``SessionRegistry.refused``, set by the metrics) and
logged as ``command-refused`` audit events. The login's capability list is
filtered the same way, so a restricted client is never told of what the
proxy cannot police.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

# The module, not its names: proxy.policy reads proxy.imap.syntax, so
# whichever package is imported first finds the other half-made.
from .. import auditlog, policy
from ..relay import Splice
from ..restrictions import commandLabel

log = Logger(namespace="proxy.imap")


def loginCapabilities(session: Any) -> list[bytes]:
    """The capabilities the login's ``OK [CAPABILITY …]`` names."""
    restrictions = getattr(session, "restrictions", None)
    if not restrictions:
        return list(session.capabilities)
    return policy.filterCapabilities(list(session.capabilities), restrictions)


def relayFor(
    session: Any,
    sessions: Any,
    client: Any,
    label: str,
    onEnd: Any,
    callLater: Any,
    audit: dict[str, Any],
    seconds: Any,
) -> Splice:
    """
    The splice for ``session`` (an ``IUpstreamSession``).

    :param sessions: the ``SessionRegistry`` (or None), whose ``refused``
        hook, when set, counts each refusal.
    """
    args = (client, session.protocol, label, onEnd, callLater, audit, seconds)
    restrictions = getattr(session, "restrictions", None)
    if not restrictions:
        return Splice(*args)

    def onRefused(command: str) -> None:
        # The name only, bounded (a client chooses it): never arguments.
        name = commandLabel(command)
        auditlog.commandRefused(audit, name)
        count = getattr(sessions, "refused", None)
        if count is not None:
            try:
                count(name)
            except Exception:
                log.failure("counting a refused command failed")

    return policy.PolicySplice(*args, restrictions=restrictions, onRefused=onRefused)
