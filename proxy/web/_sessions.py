"""
The live-session routes of the HTTP API, registered on ``TokenAPI``'s Klein
app (``addRoutes``): list this process's spliced sessions, end one.

Root tokens see and end every session; account tokens only their own
account's (another account's session answers 404, as an unknown one does,
so that ids cannot be probed; asking for another account's list is 403).
"""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.logger import Logger

from ..admin import Forbidden

log = Logger(namespace="proxy.api")


def _json(request: Any, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body).encode("utf-8")


def _arg(request: Any, name: bytes) -> str | None:
    values = request.args.get(name)
    return values[-1].decode("utf-8", "replace") if values else None


async def listSessions(self: Any, request: Any) -> bytes:
    caller = await self._caller(request)
    account = _arg(request, b"account")
    if caller.account is not None:
        if account is not None and account != caller.account:
            raise Forbidden("this token may not act on that account")
        account = caller.account
    sessions = await self.admin.listSessions(
        account=account, token=_arg(request, b"token"), protocol=_arg(request, b"protocol")
    )
    return _json(request, 200, {"sessions": sessions})


async def endSession(self: Any, request: Any, sessionId: str) -> bytes:
    caller = await self._caller(request)
    await self.admin.endSession(sessionId, account=caller.account)
    log.info("session {id} ended by token {caller}", id=sessionId, caller=caller.id[:12])
    return _json(request, 200, {"ended": True})


def addRoutes(app: Klein) -> None:
    """Register the routes; their handlers get the ``TokenAPI`` as ``self``."""
    app.route("/v1/sessions", methods=["GET"])(listSessions)
    app.route("/v1/session/<string:sessionId>", methods=["DELETE"])(endSession)
