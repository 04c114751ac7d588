"""Real upstream parts for tests: a PKI, the fake OAuth2 provider, Dovecot."""

from .certs import PKI, make_pki
from .dovecot import Dovecot, DovecotError
from .processes import Provider, ProviderError

__all__ = ["PKI", "Dovecot", "DovecotError", "Provider", "ProviderError", "make_pki"]
