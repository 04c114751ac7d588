"""
Provider access tokens: the cache, one refresh at a time (across instances
with a lease), retries within a deadline, rotated refresh tokens, the token
endpoint call, and onboarding of new grants.
"""

from .access import AccessTokens
from .cache import AccessToken, TokenCache, fingerprint, needsRefresh
from .leases import RefreshLeases
from .onboarding import Onboarding
from .refresher import Grant, ThreadedRefresher, certificateRejected
from .retry import RetryPolicy
from .singleflight import SingleFlight

__all__ = [
    "AccessToken",
    "AccessTokens",
    "Grant",
    "Onboarding",
    "RefreshLeases",
    "RetryPolicy",
    "SingleFlight",
    "ThreadedRefresher",
    "TokenCache",
    "certificateRejected",
    "fingerprint",
    "needsRefresh",
]
