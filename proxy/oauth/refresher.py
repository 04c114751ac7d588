"""
The token endpoint call: the ``refresh_token`` grant through requests-oauthlib,
run in a bounded thread pool (never on the reactor thread), its answers and
errors mapped to a ``Grant`` or to the proxy's fixed errors.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlencode, urlsplit

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from ..errors import AuthenticationFailed, CertificateRejected, GrantInvalid, Unavailable
from ..model import Account


@attrs.frozen
class Grant:
    """What a token endpoint answered. Secrets never reach a repr."""

    accessToken: str = attrs.field(repr=False)
    expiresIn: float | None
    refreshToken: str | None = attrs.field(default=None, repr=False)


class _ServerError(Exception):
    """The token endpoint answered 5xx or 429."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def refreshBlocking(account: Account, timeout: float) -> Grant:
    """
    The ``refresh_token`` grant against the account's token URL. Blocking:
    call only from a worker thread.

    :raises ProxyError: ``GrantInvalid`` on ``invalid_grant``,
        ``AuthenticationFailed`` when the provider refuses the client,
        ``CertificateRejected`` when the endpoint's certificate fails
        verification (retrying would not help), ``Unavailable`` for anything
        transient.
    """
    import requests
    from oauthlib.oauth2 import OAuth2Error
    from oauthlib.oauth2.rfc6749.errors import (
        InsecureTransportError,
        InvalidClientError,
        InvalidGrantError,
        UnauthorizedClientError,
    )
    from requests_oauthlib import OAuth2Session

    grant = account.oauth2
    session = OAuth2Session(client_id=grant.clientId)

    def checkStatus(response):
        if response.status_code >= 500 or response.status_code == 429:
            raise _ServerError(response.status_code)
        return response

    session.register_compliance_hook("refresh_token_response", checkStatus)
    try:
        token = session.refresh_token(
            grant.tokenURL,
            refresh_token=grant.refreshToken,
            client_id=grant.clientId,
            client_secret=grant.clientSecret,
            timeout=timeout,
            # In the body: requests-oauthlib passes its own scope argument,
            # and a session scope would make a changed scope an error.
            body=urlencode({"scope": " ".join(grant.scopes)}) if grant.scopes else "",
        )
    except InvalidGrantError as e:
        raise GrantInvalid(detail=_printable(e.description)) from None
    except (InvalidClientError, UnauthorizedClientError):
        raise AuthenticationFailed(
            "oauth2-client", "The provider refused the proxy's OAuth2 client"
        ) from None
    except InsecureTransportError:
        raise Unavailable("oauth2-insecure-url") from None
    except _ServerError:
        raise Unavailable("oauth2-server-error") from None
    except OAuth2Error:
        raise Unavailable("oauth2-bad-response") from None
    except requests.RequestException as e:
        rejected = certificateRejected(e, grant.tokenURL)
        if rejected is not None:
            raise rejected from None
        raise Unavailable("oauth2-unreachable") from None
    except ValueError:
        raise Unavailable("oauth2-bad-response") from None
    finally:
        session.close()
    access = token.get("access_token")
    if not isinstance(access, str) or not access:
        raise Unavailable("oauth2-bad-response")
    expiresIn = token.get("expires_in")
    try:
        expires = float(expiresIn) if expiresIn is not None else None
    except (TypeError, ValueError):
        expires = None
    rotated = token.get("refresh_token")
    if not isinstance(rotated, str) or rotated == grant.refreshToken:
        rotated = None
    return Grant(accessToken=access, expiresIn=expires, refreshToken=rotated)


# OpenSSL's verification results (X509_V_ERR_*) that have a reason of their own.
_EXPIRED = {9, 10}  # not yet valid, has expired
_NAME_MISMATCH = {62, 63, 64}  # host name, e-mail, IP address


def certificateRejected(error: BaseException, url: str) -> CertificateRejected | None:
    """
    The ``CertificateRejected`` that an HTTPS request to ``url`` failed with,
    or None when ``error`` is not a certificate verification failure (a
    refused connection, a TLS alert: those may pass and stay retried).

    requests wraps the ``ssl`` error two or three levels deep (``SSLError``
    around urllib3's ``MaxRetryError`` around its ``SSLError``): the chain of
    causes and arguments is searched for it.
    """
    found = _verificationError(error)
    if found is None:
        return None
    code = getattr(found, "verify_code", None)
    words = getattr(found, "verify_message", None) or (found.args[0] if found.args else "")
    if code in _NAME_MISMATCH or not isinstance(found, ssl.SSLError):
        # urllib3's own host-name check raises a CertificateError that is a
        # ValueError, not an ssl error.
        reason = "certificate-hostname"
    elif code in _EXPIRED:
        reason = "certificate-expired"
    else:
        reason = "certificate-untrusted"
    detail = f"token endpoint {serverOf(url)}: {_printable(str(words))}"
    return CertificateRejected(reason, detail=detail)


def causes(error: BaseException) -> Iterator[BaseException]:
    """
    ``error`` and what it wraps, as requests and urllib3 nest them
    (``reason``, ``__cause__``, ``__context__``, arguments), each once, at
    most 32.
    """
    seen: set[int] = set()
    todo = [error]
    while todo and len(seen) < 32:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        for inner in (getattr(e, "reason", None), e.__cause__, e.__context__, *e.args):
            if isinstance(inner, BaseException):
                todo.append(inner)


def _verificationError(error: BaseException) -> BaseException | None:
    for e in causes(error):
        if isinstance(e, ssl.SSLCertVerificationError) or type(e).__name__ == "CertificateError":
            return e
    return None


def serverOf(url: str) -> str:
    """``host:port`` of an HTTPS URL, for log lines and account states."""
    try:
        parts = urlsplit(url)
        port = parts.port or 443
    except ValueError:
        return "(unparsable URL)"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return _printable(f"{host}:{port}")


def _printable(text: Any, limit: int = 200) -> str:
    """A provider's error text, safe for a log line and an API answer."""
    if not isinstance(text, str):
        return ""
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:limit]


class ThreadedRefresher:
    """
    Runs ``refreshBlocking`` in its own bounded thread pool.

    :param timeout: seconds for each HTTP request to the token endpoint.
    """

    def __init__(self, reactor: Any, threads: int = 4, timeout: float = 10.0):
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=threads, name="imapproxy-oauth2")
        self._timeout = timeout
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._pool.start()
            self._started = True

    def stop(self) -> None:
        if self._started:
            self._pool.stop()
            self._started = False

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Any other blocking OAuth2 call (code exchange), in the same bounded pool."""
        self.start()
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def refresh(self, account: Account) -> Deferred[Grant]:
        self.start()
        return deferToThreadPool(self._reactor, self._pool, refreshBlocking, account, self._timeout)
