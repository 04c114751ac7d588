"""
Issuing access tokens and deciding whether one may be used. Pure functions:
no store, no reactor, the time is passed in.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Iterable

from .errors import AccessDenied
from .model import SCOPES, Token
from .restrictions import readOnly, restrictionRefusal

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def newToken() -> tuple[str, str]:
    """
    :return: ``(token, id)``: 32 random bytes as 64 hex characters, shown once,
        and the SHA-256 of it, which is all the store keeps.
    """
    token = secrets.token_hex(32)
    return token, tokenId(token)


def tokenId(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def looksLikeToken(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def parseNetworks(addresses: Iterable[str]) -> tuple[str, ...]:
    """
    Validate CIDR restrictions (a bare address means a single host) and return
    them normalized.

    :raises ValueError: with a message naming the bad entry.
    """
    out = []
    for a in addresses:
        try:
            net = ipaddress.ip_network(a.strip(), strict=False)
        except ValueError:
            raise ValueError(f"not an IP address or CIDR network: {a!r}") from None
        out.append(str(_unmapped(net)))
    return tuple(out)


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _unmapped(net: Network) -> Network:
    """
    An IPv4-mapped IPv6 network as the IPv4 network it carries: the checks
    see an IPv4-mapped client as IPv4 (``clientAddress``), so the mapped
    form would match no one.
    """
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED):
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


def parseScopes(scopes: Iterable[str]) -> tuple[str, ...]:
    out = []
    for s in scopes:
        if s not in SCOPES:
            raise ValueError(f"unknown scope {s!r} (known: {', '.join(SCOPES)})")
        if s not in out:
            out.append(s)
    if not out:
        raise ValueError("at least one scope is required")
    return tuple(out)


# Parsed once per address, not at every login (addresses are immutable).
@functools.lru_cache(maxsize=4096)
def clientAddress(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """
    A peer's address as the checks see it: an IPv4-mapped IPv6 address
    (``::ffff:10.1.2.3``, as a dual-stack listener reports IPv4 peers) is the
    IPv4 address it carries; a zone (``%eth0``) is dropped; junk is None.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def addressAllowed(address: str, networks: Iterable[str]) -> bool:
    """
    Whether ``address`` lies in one of ``networks``. An IPv4-mapped IPv6
    address (``::ffff:10.1.2.3``, as a dual-stack listener reports IPv4 peers)
    is checked as the IPv4 address it carries.
    """
    ip = clientAddress(address)
    if ip is None:
        return False
    for n in networks:
        net = _network(n)
        if ip.version == net.version and ip in net:
            return True
    return False


@functools.lru_cache(maxsize=4096)
def _network(network: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(network, strict=False)


def hasScope(token: Token, scope: str) -> bool:
    return scope in token.scopes or "*" in token.scopes


def checkToken(
    token: Token | None,
    presented: str,
    *,
    account: str | None,
    scope: str,
    address: str,
    now: float,
) -> Token:
    """
    Decide whether ``presented`` may be used for ``scope`` on ``account`` from
    ``address``. The checks run in a fixed order, so a refusal names the first
    one that failed.

    :param token: the stored record found under the hash of ``presented``.
    :param account: the account the client asks for; None skips the check
        (the API checks account access per route).
    :raises AccessDenied: with the reason of the first failed check.
    """
    if token is None or not hmac.compare_digest(token.id, tokenId(presented)):
        raise AccessDenied("unknown-token")
    if token.expires is not None and now >= token.expires:
        raise AccessDenied("expired")
    if not hasScope(token, scope) or (scope == "smtp" and readOnly(token)):
        # A read-only token sends no mail, even with scope *.
        raise AccessDenied("scope")
    if account is not None and token.account != account:
        raise AccessDenied("username")
    if token.addresses and not addressAllowed(address, token.addresses):
        raise AccessDenied("address")
    return token


# What the api scope may hand out besides itself: issuing mail tokens (and
# tokens that read /metrics) is what it is for. Only * grants *.
_GRANTED_BY_API = {"api", "imap-proxy", "smtp", "metrics"}


def grantableScopes(minter: Token) -> set[str]:
    """The scopes a token may put on the tokens it mints."""
    if "*" in minter.scopes:
        return set(SCOPES)
    if "api" in minter.scopes:
        return _GRANTED_BY_API | set(minter.scopes)
    return set()


def mayRevoke(caller: Token, target: Token) -> bool:
    """
    Whether ``caller`` may revoke ``target`` (another token of an account it
    may act on): only one it could have issued, by scopes and IMAP
    restrictions, so that a leaked narrow token cannot lock out the wider
    tokens above it.
    """
    return set(target.scopes) <= grantableScopes(caller) and (
        restrictionRefusal(caller, target) is None
    )


def withinLimits(minter: Token, requested: Token) -> str | None:
    """
    Whether ``minter`` may issue ``requested``: a token mints only tokens
    within its own limits, so that no chain of tokens ends wider than its
    first. Scopes: what ``grantableScopes`` allows (``*`` only from ``*``);
    account: the minter's own when it has one; expiry: no later than the
    minter's (an expiring token cannot mint one that never expires);
    addresses: every requested network inside one of the minter's (a
    restricted token cannot mint an unrestricted one); IMAP restrictions:
    at least the minter's (``proxy.restrictions.restrictionRefusal``).

    :return: None when it may, else why not (safe to show).
    """
    allowed = grantableScopes(minter)
    for scope in requested.scopes:
        if scope not in allowed:
            if scope == "*":
                return "only a token with scope * can grant scope *"
            return f"this token cannot grant scope {scope}"
    if minter.account is not None and requested.account != minter.account:
        return "this token can only issue tokens for its own account"
    if minter.expires is not None:
        if requested.expires is None:
            return "this token expires, so it cannot issue a token that never does"
        if requested.expires > minter.expires:
            return "this token cannot issue a token that outlives it"
    if minter.addresses:
        if not requested.addresses:
            return "this token is restricted to networks, so it cannot issue an unrestricted one"
        outer = [ipaddress.ip_network(n) for n in minter.addresses]
        for n in requested.addresses:
            net = ipaddress.ip_network(n)
            if not any(
                net.version == o.version and net.subnet_of(o)  # type: ignore[arg-type]
                for o in outer
            ):
                return f"this token cannot issue a token usable from {n}"
    return restrictionRefusal(minter, requested)
