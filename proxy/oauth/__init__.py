"""
Provider access tokens: the cache, one refresh at a time (across instances
with a lease), retries within a deadline, and onboarding of new grants.
"""

from .cache import (
    AccessToken,
    AccessTokens,
    Grant,
    ThreadedRefresher,
    fingerprint,
    needsRefresh,
)
from .leases import RefreshLeases
from .onboarding import Onboarding

__all__ = [
    "AccessToken",
    "AccessTokens",
    "Grant",
    "Onboarding",
    "RefreshLeases",
    "ThreadedRefresher",
    "fingerprint",
    "needsRefresh",
]
