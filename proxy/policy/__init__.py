"""
The policy relay: a splice that reads the client's commands and the
provider's responses, for tokens with restrictions (read-only, mailboxes).
Unrestricted tokens keep the plain byte splice.
"""

from .readonly import filterCapabilities
from .relay import PolicySplice

__all__ = ["PolicySplice", "filterCapabilities"]
