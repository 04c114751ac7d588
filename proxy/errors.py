"""
The errors a login can end in, each with the fixed text a client is shown:
with an IMAP response code (``imapResponse``), or with an SMTP reply code and
enhanced status code (``smtpResponse``, RFC 4954 and RFC 3463).

Nothing here carries a token, a provider secret or an exception's text: the
``message`` of every error is chosen from fixed strings, so it is safe to send
to a client and to log.
"""

from __future__ import annotations

from twisted.cred.error import UnauthorizedLogin


class ProxyError(Exception):
    """
    A login failure the client is told about as ``tag NO [code] message``.

    :ivar code: the IMAP response code (RFC 5530), as bytes.
    :ivar smtpCode: the SMTP reply code and enhanced status code, as bytes:
        ``454 4.7.0`` (temporary: the client tries again later) unless the
        provider refused the account itself.
    :ivar message: a fixed human-readable text, as str.
    :ivar reason: a short machine-readable reason, for logs and metrics.
    """

    code = b"UNAVAILABLE"
    smtpCode = b"454 4.7.0"
    message = "Service temporarily unavailable, try again later"
    reason = "unavailable"

    def __init__(self, reason: str | None = None, message: str | None = None):
        if reason is not None:
            self.reason = reason
        if message is not None:
            self.message = message
        super().__init__(self.reason)

    def imapResponse(self) -> bytes:
        return b"NO [" + self.code + b"] " + self.message.encode("ascii")

    def smtpResponse(self) -> bytes:
        """The SMTP reply line, without its CRLF."""
        return self.smtpCode + b" " + self.message.encode("ascii")


class Unavailable(ProxyError):
    """The provider (its IMAP server or its token endpoint) cannot be used now."""


class LimitReached(Unavailable):
    """The provider refused the connection because of a connection limit."""

    code = b"LIMIT"
    message = "The provider refused: too many connections for this account"
    reason = "upstream-limit"


class TooManyConnections(LimitReached):
    """
    The account is at its own connection cap (``Upstream.maxConnections``,
    every instance and spare counted) and no slot came free within the
    wait: refused here, before the provider sees one connection too many
    and locks the account out. SMTP's 421 closes the connection.
    """

    smtpCode = b"421 4.7.0"
    message = "Too many connections for this account, close another client"
    reason = "account-connection-limit"


class ProviderThrottled(Unavailable):
    """
    The provider is throttling the account (Gmail's simultaneous-connection
    or bandwidth limits, Microsoft's suggested back-off, an SMTP server's
    sender thread limit), or the proxy is still backing off after it did.
    ``reason`` is a fixed code from ``proxy.upstream.throttling``;
    ``suggested`` the provider's own back-off in seconds, when it gave one;
    ``retryAfter`` the whole seconds the client is told to wait.
    """

    smtpCode = b"454 4.7.0"
    reason = "throttled"

    def __init__(
        self, reason: str | None = None, suggested: float | None = None, retryAfter: int = 0
    ):
        super().__init__(reason)
        self.suggested = suggested
        self.retryAfter = retryAfter

    @property
    def retryAfter(self) -> int:
        return self._retryAfter

    @retryAfter.setter
    def retryAfter(self, seconds: int) -> None:
        # The text the client reads says it: a number, never provider words.
        self._retryAfter = max(int(seconds), 0)
        if self._retryAfter <= 0:
            self.message = "The provider is throttling this account, try again later"
        else:
            self.message = (
                f"The provider is throttling this account, try again in {self._retryAfter} seconds"
            )


class CertificateRejected(Unavailable):
    """
    A provider's server (IMAP, SMTP or token endpoint) showed a certificate
    that failed verification. Not retried: the same certificate would be
    refused again. ``reason`` is ``certificate-untrusted`` (chain or CA),
    ``certificate-hostname`` (name mismatch) or ``certificate-expired``;
    ``detail`` names the server and the certificate (subject, issuer, the
    verifier's words), for the log and the account's state, never for a client.
    """

    message = "The provider's certificate was refused, the operator must act"
    reason = "certificate-untrusted"
    REASONS = ("certificate-untrusted", "certificate-hostname", "certificate-expired")

    def __init__(self, reason: str | None = None, message: str | None = None, detail: str = ""):
        assert reason is None or reason in self.REASONS, reason
        super().__init__(reason, message)
        self.detail = detail


class AuthenticationFailed(ProxyError):
    """The provider refused the account's credentials."""

    code = b"AUTHENTICATIONFAILED"
    smtpCode = b"535 5.7.8"
    message = "Authentication with the provider failed"
    reason = "upstream-auth"


class UpstreamRejectedToken(AuthenticationFailed):
    """
    The provider's IMAP or SMTP server refused an access token: it may be
    stale, so the realm refreshes it once and tries again.
    """

    reason = "upstream-token-rejected"


class SMTPAuthDisabled(AuthenticationFailed):
    """
    The provider's SMTP server refused AUTH because its administrator turned
    SMTP AUTH off for the mailbox (Microsoft 365: ``535 5.7.139``). Not a
    token problem: refreshing would not help, the operator must act.
    """

    smtpCode = b"535 5.7.139"
    message = "SMTP AUTH is disabled for this mailbox by its administrator"
    reason = "smtp-auth-disabled"


class NoSMTPServer(ProxyError):
    """An SMTP login for an account that has no SMTP server configured."""

    code = b"CONTACTADMIN"
    smtpCode = b"535 5.7.8"
    message = "Sending is not set up for this account"
    reason = "smtp-not-configured"


class GrantInvalid(AuthenticationFailed):
    """
    The provider answered ``invalid_grant``: the mailbox owner must consent
    again. ``detail`` is the provider's description (printable, short), for
    the account's state; it is never sent to an IMAP client.
    """

    message = "Account needs re-authorization"
    reason = "invalid-grant"

    def __init__(self, reason: str | None = None, message: str | None = None, detail: str = ""):
        super().__init__(reason, message)
        self.detail = detail


class AccessDenied(UnauthorizedLogin):
    """
    The proxy's own token check refused a login. ``reason`` is one of the keys
    of ``TEXTS``; the client is shown the matching fixed text.
    """

    TEXTS = {
        "unknown-token": "Access denied, failed to authenticate user",
        "expired": "Access denied, token expired",
        "scope": "Access denied, invalid scope",
        "username": "Access denied, invalid username",
        "address": "Access denied, traffic not accepted from this IP",
        "account-disabled": "Access denied, account disabled",
    }
    code = b"AUTHENTICATIONFAILED"
    smtpCode = b"535 5.7.8"

    def __init__(self, reason: str):
        assert reason in self.TEXTS, reason
        self.reason = reason
        self.message = self.TEXTS[reason]
        super().__init__(reason)

    def imapResponse(self) -> bytes:
        return b"NO [" + self.code + b"] " + self.message.encode("ascii")

    def smtpResponse(self) -> bytes:
        """The SMTP reply line, without its CRLF."""
        return self.smtpCode + b" " + self.message.encode("ascii")
