"""
The provider calls of onboarding (the authorization code exchange, the device
authorization and its polls), blocking, for worker threads only, and the
errors they end in.

Every way such a call can fail (refused connection, timeout, a refused
certificate, an answer that is not JSON, an HTTP error, an OAuth2 ``error``)
becomes an ``OnboardingError`` whose message is one fixed line naming the
provider's server and the reason: the admin command prints it as
``imapproxy: <message>`` and the API shows it, with no traceback. A message
never holds the code, the verifier, the device code, the client secret or a
token: it is built from fixed words, the server's ``host:port``, the HTTP
status, the provider's ``error`` code (checked against RFC 6749's alphabet)
and, for a certificate, the verifier's words.
"""

from __future__ import annotations

import json
import re
import socket
from typing import Any

from ..admin import AdminError
from ..model import OAuth2App
from .refresher import _printable, causes, certificateRejected, serverOf

# An answer larger than this is not a token endpoint's: stop reading.
MAX_ANSWER = 64 * 1024
# RFC 6749's ``error`` codes are short words; anything else is not shown.
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


class OnboardingError(AdminError):
    """A consent that cannot be completed; the message is safe to show."""

    status = 400


class ProviderError(OnboardingError):
    """
    The provider could not be asked, or gave no usable answer.

    :ivar reason: a short machine-readable reason: ``insecure-url``,
        ``connection-refused``, ``host-not-found``, ``timeout``,
        ``tls-failed``, ``unreachable``, ``bad-response``, ``http-error``,
        ``refused`` (an OAuth2 ``error``), or a ``certificate-*`` reason.
    """

    status = 502

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class ProviderCertificateRejected(ProviderError):
    """
    The provider's certificate failed verification. ``reason`` is the
    ``CertificateRejected`` reason (``certificate-untrusted``,
    ``certificate-hostname``, ``certificate-expired``); the message names the
    server and carries the verifier's words.
    """


class DevicePending(Exception):
    """The device grant is not decided yet (``authorization_pending``)."""


class DeviceSlowDown(DevicePending):
    """The provider asks to poll less often (``slow_down``)."""


def exchangeCodeBlocking(app: OAuth2App, code: str, verifier: str, timeout: float) -> dict:
    """The authorization code grant's token request, with the PKCE verifier (RFC 7636, 4.5)."""
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": app.redirectURL or "",
        "client_id": app.clientId,
        "client_secret": app.clientSecret,
        "code_verifier": verifier,
    }
    status, body = _post(app.tokenURL, data, timeout)
    if status == 200 and _text(body.get("access_token")):
        return body
    raise _refused(app.tokenURL, status, body, "the authorization code")


def deviceStartBlocking(app: OAuth2App, timeout: float) -> dict:
    """
    Ask for a device code (RFC 8628, 3.1).

    :return: the provider's answer, its ``user_code`` and
        ``verification_uri`` printable, ``interval`` and ``expires_in``
        numbers within bounds.
    """
    url = app.deviceURL
    if not url:
        raise OnboardingError(f"OAuth2 app {app.id} has no deviceAuthorizationUrl")
    status, body = _post(url, {"client_id": app.clientId, "scope": " ".join(app.scopes)}, timeout)
    uri = body.get("verification_uri") or body.get("verification_url")
    if status == 200 and _text(body.get("device_code")) and _text(body.get("user_code")):
        if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
            raise ProviderError(
                f"the provider at {serverOf(url)} sent no verification URI", "bad-response"
            )
        return {
            **body,
            "user_code": _printable(body["user_code"], 64),
            "verification_uri": _printable(uri, 512),
            "interval": _number(body.get("interval"), 5.0, 1.0, 60.0),
            "expires_in": _number(body.get("expires_in"), 900.0, 1.0, 3600.0),
        }
    raise _refused(url, status, body, "the device authorization")


def devicePollBlocking(app: OAuth2App, deviceCode: str, timeout: float) -> dict:
    """
    One poll of the token endpoint (RFC 8628, 3.4).

    :raises DevicePending: not decided yet (``DeviceSlowDown`` to back off).
    :raises OnboardingError: refused, expired, or the provider failed.
    """
    data = {
        "grant_type": _DEVICE_GRANT,
        "device_code": deviceCode,
        "client_id": app.clientId,
        "client_secret": app.clientSecret,
    }
    status, body = _post(app.tokenURL, data, timeout)
    if status == 200 and _text(body.get("access_token")):
        return body
    error = body.get("error")
    if error == "authorization_pending":
        raise DevicePending()
    if error == "slow_down":
        raise DeviceSlowDown()
    if error == "access_denied":
        raise OnboardingError("the mailbox owner declined the authorization")
    if error == "expired_token":
        raise OnboardingError("the code expired before it was used; start again")
    raise _refused(app.tokenURL, status, body, "the device grant")


# -- one request, its failures mapped -----------------------------------------


def _post(url: str, data: dict[str, str], timeout: float) -> tuple[int, dict[str, Any]]:
    """
    POST a form to the provider: its HTTP status and its JSON object.

    Redirects are not followed (the form holds the client secret), and no
    more than ``MAX_ANSWER`` bytes are read.

    :raises ProviderError: for every failure but an HTTP status.
    """
    import requests

    server = serverOf(url)
    if not url.startswith("https://"):
        raise ProviderError(f"the provider's URL for {server} is not https", "insecure-url")
    try:
        with requests.post(
            url,
            data=data,
            timeout=timeout,
            headers={"Accept": "application/json"},
            allow_redirects=False,
            stream=True,
        ) as r:
            content = b""
            for chunk in r.iter_content(8192):
                content += chunk
                if len(content) > MAX_ANSWER:
                    raise ProviderError(
                        f"the provider at {server} sent an answer over "
                        f"{MAX_ANSWER // 1024} KiB (HTTP {r.status_code})",
                        "bad-response",
                    )
            status = r.status_code
    except requests.RequestException as e:
        raise _unreachable(e, url, timeout) from None
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    if isinstance(body, dict):
        return status, body
    if status >= 300:
        raise ProviderError(f"the provider at {server} answered HTTP {status}", "http-error")
    raise ProviderError(
        f"the provider at {server} answered something other than a JSON object (HTTP {status})",
        "bad-response",
    )


def _unreachable(error: Exception, url: str, timeout: float) -> ProviderError:
    """The ``ProviderError`` for a request that got no HTTP answer."""
    import requests

    server = serverOf(url)
    rejected = certificateRejected(error, url)
    if rejected is not None:
        # The detail is "token endpoint HOST:PORT: WORDS"; this may be another endpoint.
        words = rejected.detail.removeprefix(f"token endpoint {server}: ")
        hint = ""
        if rejected.reason == "certificate-untrusted":
            hint = "; a private CA? set REQUESTS_CA_BUNDLE to its PEM file"
        return ProviderCertificateRejected(
            f"the provider's certificate at {server} was refused "
            f"({rejected.reason}: {words}){hint}",
            rejected.reason,
        )
    if isinstance(error, requests.Timeout):
        return ProviderError(
            f"the provider at {server} did not answer within {timeout:g} s", "timeout"
        )
    if isinstance(error, requests.exceptions.SSLError):
        return ProviderError(
            f"the TLS handshake with the provider at {server} failed", "tls-failed"
        )
    if _caused(error, ConnectionRefusedError):
        return ProviderError(
            f"cannot reach the provider at {server} (connection refused)", "connection-refused"
        )
    if _caused(error, socket.gaierror):
        return ProviderError(
            f"cannot reach the provider at {server} (host name not found)", "host-not-found"
        )
    return ProviderError(
        f"cannot reach the provider at {server} (connection failed)", "unreachable"
    )


def _refused(url: str, status: int, body: dict[str, Any], what: str) -> ProviderError:
    """An answer that is not what was asked for: an OAuth2 error, an HTTP error, or incomplete."""
    server = serverOf(url)
    error = body.get("error")
    if isinstance(error, str) and _ERROR_CODE.fullmatch(error):
        return ProviderError(f"the provider at {server} refused {what} ({error})", "refused")
    if status >= 300:
        return ProviderError(f"the provider at {server} answered HTTP {status}", "http-error")
    return ProviderError(
        f"the provider at {server} answered {what} without the expected fields", "bad-response"
    )


def _caused(error: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``kind`` is in the chain of causes that requests and urllib3 wrap."""
    return any(isinstance(e, kind) for e in causes(error))


def _text(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _number(value: Any, default: float, low: float, high: float) -> float:
    """A provider's number of seconds, within bounds; ``default`` when absent or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return min(max(float(value), low), high)
