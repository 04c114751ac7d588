"""
The settings of ``twistd imapproxy``: one table for the command-line options,
the config file and ``tap.example.conf`` (a test checks all three agree).
"""

from __future__ import annotations

from typing import Any

DEFAULT_PORT = "tcp:2143:interface=127.0.0.1"
DEFAULT_API_PORT = "tcp:8080:interface=127.0.0.1"
DEFAULT_SMTP_PORT = "tcp:2587:interface=127.0.0.1"


def yesNo(value: str) -> bool:
    """A yes/no setting: yes, true, on, 1 or no, false, off, 0."""
    v = value.strip().lower()
    if v in ("yes", "true", "on", "1"):
        return True
    if v in ("no", "false", "off", "0"):
        return False
    raise ValueError(value)


def logFormat(value: str) -> str:
    """The log's format: text (twistd's lines) or json (one JSON object a line)."""
    if value not in ("text", "json"):
        raise ValueError(value)
    return value


def webhookURLs(value: str) -> tuple[str, ...]:
    """Webhook URLs, separated by white space (or lines); each http or https."""
    from .alerts import webhookURLs as parse

    return parse(value)


# name -> (default, converter, help). One table for the options, the config
# file and tap.example.conf.
SETTINGS: dict[str, tuple[Any, Any, str]] = {
    "store": (
        None,
        str,
        "Where accounts and tokens live: sqlite:///ABSOLUTE/PATH (three slashes), "
        "redis://[:PASSWORD@]HOST[:PORT][/DB] or unix:///PATH/redis.sock?db=N (Redis), "
        "redis+sentinel://[:PASSWORD@]HOST:PORT,HOST:PORT/SERVICE[/DB] (Redis Sentinel) "
        "[default: an SQLite file in the state directory]",
    ),
    "secret-file": (
        None,
        str,
        "File holding the key(s) that encrypt provider secrets "
        "[default: $IMAPPROXY_SECRET_KEY, else secret.key beside the "
        "SQLite file, created on first run]",
    ),
    "plaintext-login": (
        "loopback",
        str,
        "Logins without TLS: allow, loopback (only from loopback clients) or deny",
    ),
    "tls-certificate": (
        None,
        str,
        "PEM certificate (chain) offered with STARTTLS on plain ports and on ssl: "
        "ports that name no privateKey=; reloaded when the file changes or on SIGHUP",
    ),
    "tls-key": (None, str, "PEM private key for --tls-certificate"),
    "smtp-hostname": (
        None,
        str,
        "The name the SMTP front door gives in its greeting and EHLO "
        "[default: this machine's fully qualified name, looked up once at start-up]",
    ),
    "login-timeout": (60.0, float, "Seconds a client has from connecting to logging in"),
    "upstream-timeout": (
        15.0,
        float,
        "Seconds to connect and log in to the provider's IMAP server",
    ),
    "warm-upstream": (
        300.0,
        float,
        "Seconds a spare provider connection, already logged in, waits for the next "
        "login of an account that logged in twice within that time (0: no spares)",
    ),
    "max-warm": (500, int, "Spare provider connections kept at most, all accounts together"),
    "oauth2-timeout": (10.0, float, "Seconds for one request to a token endpoint"),
    "oauth2-deadline": (
        10.0,
        float,
        "Seconds a token refresh may take in all, retries with backoff included; "
        "past it the login gets NO [UNAVAILABLE]",
    ),
    "max-bad-commands": (10, int, "Invalid commands before login, then * BYE"),
    "max-commands": (100, int, "Commands of any kind before login, then * BYE"),
    "max-failed-logins": (3, int, "Refused logins on one connection, then * BYE"),
    "max-line-length": (8192, int, "Longest command line accepted before login"),
    "max-literal": (4096, int, "Largest literal accepted before login"),
    "oauth2-threads": (4, int, "Threads for requests to token endpoints"),
    "login-penalty": (
        15.0,
        float,
        "Most seconds a source address that keeps failing to log in waits for its next "
        "answer (2 s after the first failure, doubling; 0: no penalties)",
    ),
    "login-penalty-forget": (
        600.0,
        float,
        "Seconds without a failed login after which an address's penalty is forgotten",
    ),
    "api-refuse-after": (
        5,
        int,
        "Failed logins from an address after which the API answers 429 while its penalty lasts",
    ),
    "api-request-timeout": (
        30.0,
        float,
        "Seconds an HTTP API client has to send a whole request, headers and body",
    ),
    "max-preauth": (
        1000,
        int,
        "IMAP connections not yet logged in, all clients together (and as many SMTP "
        "ones); when full, the oldest is dropped to admit a new one",
    ),
    "max-preauth-per-address": (
        50,
        int,
        "IMAP connections not yet logged in from one client address (IPv6: one /64), "
        "and as many SMTP and API connections; more are refused",
    ),
    "max-handshakes": (200, int, "TLS handshakes under way at once; when full the oldest goes"),
    "handshake-timeout": (10.0, float, "Seconds a TLS handshake (implicit or STARTTLS) may take"),
    "max-api-connections": (100, int, "API connections at once; when full the oldest goes"),
    "relay": (
        "fast",
        str,
        "How sessions are relayed: fast (Twisted's public path plus fast paths, "
        "when their start-up probes pass) or plain (Twisted's public path only)",
    ),
    "log-format": (
        "text",
        logFormat,
        "The log's format: text (twistd's lines) or json (one JSON object a line, "
        "with the audit events; see docs/operations.md)",
    ),
    "metrics-per-account": (
        False,
        yesNo,
        "yes: /metrics also has series per account (sessions open, state); "
        "one series each, so leave it off with thousands of accounts [default: no]",
    ),
    # Per-account connection caps (docs/limits.md).
    "connection-wait": (
        5.0,
        float,
        "Seconds a login waits for a slot when its account is at its connection cap; "
        "then NO [LIMIT] (IMAP) or 421 4.7.0 (SMTP)",
    ),
    "max-account-connections": (
        0,
        int,
        "Connections per account and protocol to a provider without a preset "
        "(gmail and outlook have theirs), every instance and spare counted, where the "
        "account sets no maxConnections (0: no cap)",
    ),
    # Alerts by webhook (proxy.alerts; docs/monitoring.md, "Webhooks").
    "webhook": (
        (),
        webhookURLs,
        "URL (http or https, certificate checked) that gets a signed JSON POST when an "
        "account changes state or a token is revoked (repeatable; one a line in the "
        "config file) [default: none]",
    ),
    "webhook-secret-file": (
        None,
        str,
        "File holding the key (16 bytes or more) that signs each webhook request "
        "(HMAC-SHA256); required with --webhook",
    ),
    # Graceful stop (docs/operations.md, "Stopping and draining").
    "drain-timeout": (
        30.0,
        float,
        "Seconds a stop (SIGTERM) gives sessions in the middle of a transfer to "
        "reach a clean point for their * BYE / 421 before they are cut; "
        "0: cut them at once [default: 30]",
    ),
    # Provider throttling and token endpoint trouble (docs/limits.md).
    "throttle-backoff": (
        60.0,
        float,
        "Seconds an account's logins back off after its provider throttled one, "
        "when the provider suggests no time",
    ),
    "throttle-backoff-max": (
        900.0,
        float,
        "The longest back-off after a provider's throttling, whatever it suggests",
    ),
    "oauth2-early-wait": (
        1.0,
        float,
        "Seconds a login waits for the early refresh of an access token still valid; "
        "then it uses the valid one and the refresh goes on in the background",
    ),
}


# Numeric settings for which 0 means "none".
ZERO_ALLOWED = {"warm-upstream", "login-penalty", "max-account-connections", "drain-timeout"}

# Settings that may be given several times (one a line in the config file),
# with their defaults; "none" turns the API and SMTP listeners off.
LIST_DEFAULTS = {
    "port": DEFAULT_PORT,
    "api-port": DEFAULT_API_PORT,
    "smtp-port": DEFAULT_SMTP_PORT,
    "metrics-port": "none",
}
LIST_SETTINGS = set(LIST_DEFAULTS)
