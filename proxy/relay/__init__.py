"""
The relay that both front doors share: after a login, bytes go both ways
untouched, with flow control.
"""

from .splice import Splice, eagerWrites, tuneSocket

__all__ = ["Splice", "eagerWrites", "tuneSocket"]
