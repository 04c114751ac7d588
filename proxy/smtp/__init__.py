"""
The client-facing SMTP submission side: a pre-auth server that greets,
offers STARTTLS, takes AUTH PLAIN or LOGIN (``server``, ``login``, with the
fixed replies and pure parsing of ``syntax``) and splices the session to
the provider; the EHLO it offers (``extensions``), learned from the
providers and primed at start-up (``prime``).
"""

from .door import submissionDoor, validHostname
from .extensions import ALLOWED, Features, ProviderExtensions
from .prime import ExtensionsPrimer, serverKey
from .server import SubmissionFactory, SubmissionServer

__all__ = [
    "ALLOWED",
    "ExtensionsPrimer",
    "Features",
    "ProviderExtensions",
    "SubmissionFactory",
    "SubmissionServer",
    "serverKey",
    "submissionDoor",
    "validHostname",
]
