"""
How the Redis store (``proxy.store.redis``) keeps records
(``proxy.store._records``) in hashes: field values as text (floats that read
back exactly, absent fields for None), and TTLs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Coroutine
from functools import wraps
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred

T = TypeVar("T")

# A record written already expired (by the wall clock) is kept this long: the
# proxy decides expiry with its own clock, which tests replace.
MIN_TTL = 60.0


def _deferred(f: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., Deferred[T]]:
    """Run an ``async def`` method as a Deferred-returning one."""

    @wraps(f)
    def method(*args: Any, **kwargs: Any) -> Deferred[T]:
        return ensureDeferred(f(*args, **kwargs))

    return method


def _hash(pairs: list[Any]) -> dict[str, str]:
    """A flat HGETALL reply as a dict."""
    return dict(zip(pairs[::2], pairs[1::2], strict=True))


def _pairs(fields: dict[str, Any]) -> list[str]:
    """
    Field/value pairs to set, as text; None fields are left out (absent
    means NULL).
    """
    out: list[str] = []
    for name, value in fields.items():
        if value is not None:
            out += [name, _value(value)]
    return out


def _value(value: str | int | float) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"cannot keep {type(value).__name__} in a hash")
    return str(value) if isinstance(value, int) else _text(value)


def _text(value: float) -> str:
    """A float as text that reads back exactly (txredisapi would round it)."""
    return repr(float(value))


def _float(value: str | None) -> float | None:
    return None if value is None else float(value)


def _expireAt(expires: float) -> str:
    """The PEXPIREAT time (ms) for a record that expires at ``expires``."""
    return str(math.ceil(max(expires, time.time() + MIN_TTL) * 1000))
