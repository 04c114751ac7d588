"""
The provider side: connecting (verified TLS, STARTTLS, remembered addresses),
logging in with XOAUTH2 or OAUTHBEARER, and spare logged-in connections.

- ``auth``: the SASL mechanisms, as ``IClientAuthentication``.
- ``responses``: response codes and capability lists.
- ``login``: the login as an Automat state machine, no socket.
- ``imap``: the protocol that feeds it, then holds the connection as a spare
  or hands it to the splice.
- ``tls``: TLS options (system CAs or the account's CA file), their cache,
  session resumption.
- ``verify``: a refused certificate reported as ``CertificateRejected``.
- ``connect``: remembered addresses and ``connectUpstream``.
- ``spares``: ``WarmUpstreams``, the pool of spare connections.
"""

from .auth import OAUTHBEARERAuthenticator, XOAUTH2Authenticator
from .connect import AddressCache, connectUpstream
from .imap import UpstreamProtocol
from .responses import hasCapability, parseCapabilities, responseCode
from .spares import WarmUpstreams
from .tls import ResumingTLSOptions, TLSOptionsCache, tlsOptionsFor
from .verify import ReportingTLSOptions

__all__ = [
    "AddressCache",
    "OAUTHBEARERAuthenticator",
    "ReportingTLSOptions",
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
