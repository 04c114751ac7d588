"""
The provider side: connecting (verified TLS, STARTTLS, remembered addresses),
logging in with XOAUTH2 or OAUTHBEARER, and spare logged-in connections.
"""

from .imap import (
    AddressCache,
    OAUTHBEARERAuthenticator,
    ResumingTLSOptions,
    TLSOptionsCache,
    UpstreamProtocol,
    XOAUTH2Authenticator,
    connectUpstream,
    hasCapability,
    parseCapabilities,
    responseCode,
    tlsOptionsFor,
)
from .spares import WarmUpstreams

__all__ = [
    "AddressCache",
    "OAUTHBEARERAuthenticator",
    "ResumingTLSOptions",
    "TLSOptionsCache",
    "UpstreamProtocol",
    "WarmUpstreams",
    "XOAUTH2Authenticator",
    "connectUpstream",
    "hasCapability",
    "parseCapabilities",
    "responseCode",
    "tlsOptionsFor",
]
