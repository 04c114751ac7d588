"""
The provider side: connecting (verified TLS, STARTTLS, remembered addresses),
logging in to IMAP and SMTP submission servers with XOAUTH2 or OAUTHBEARER,
and spare logged-in IMAP connections.

- ``auth``: the SASL mechanisms, as ``IClientAuthentication``.
- ``responses``: response codes and capability lists.
- ``login``: the login as an Automat state machine, no socket.
- ``imap``: the protocol that feeds it, then holds the connection as a spare
  or hands it to the splice.
- ``smtpreplies``: SMTP replies (code, enhanced code) and EHLO extensions.
- ``smtplogin``: the SMTP login as an Automat state machine, no socket.
- ``smtp``: the protocol that feeds it, then hands the connection to the
  splice (no spares: see there why).
- ``tls``: TLS options (system CAs or the account's CA file), their cache,
  session resumption.
- ``verify``: a refused certificate reported as ``CertificateRejected``.
- ``connect``: remembered addresses, ``connectWith`` for either protocol,
  ``connectUpstream``, ``connectSMTP``, ``probeSMTP``, ``UpstreamConnector``.
- ``spares``: ``WarmUpstreams``, the pool of spare connections.
"""

from .auth import OAUTHBEARERAuthenticator, XOAUTH2Authenticator
from .connect import (
    AddressCache,
    UpstreamConnector,
    connectSMTP,
    connectUpstream,
    connectWith,
    probeSMTP,
)
from .imap import UpstreamProtocol
from .responses import hasCapability, parseCapabilities, responseCode
from .smtp import SMTPUpstreamProtocol
from .smtpreplies import ehloName
from .spares import WarmUpstreams
from .tls import ResumingTLSOptions, TLSOptionsCache, tlsOptionsFor
from .verify import ReportingTLSOptions

__all__ = [
    "AddressCache",
    "OAUTHBEARERAuthenticator",
    "ReportingTLSOptions",
    "ResumingTLSOptions",
    "SMTPUpstreamProtocol",
    "TLSOptionsCache",
    "UpstreamConnector",
    "UpstreamProtocol",
    "WarmUpstreams",
    "XOAUTH2Authenticator",
    "connectSMTP",
    "connectUpstream",
    "connectWith",
    "ehloName",
    "hasCapability",
    "parseCapabilities",
    "probeSMTP",
    "responseCode",
    "tlsOptionsFor",
]
