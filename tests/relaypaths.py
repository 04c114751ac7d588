"""
Running a unit test under one relay path: the fast paths (probed, as at
start-up) or Twisted's public path, restored afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from proxy.relay import _fast

PATHS = ("fast", "plain")


def useRelay(testcase: Any, mode: str) -> _fast.FastPaths:
    """Configure the relay as ``relay = mode`` would, until ``testcase`` ends."""
    previous = _fast.current()
    testcase.addCleanup(setattr, _fast, "_paths", previous)
    paths = _fast.configure(mode)
    if mode == "fast":
        assert paths.enabled, paths.reason
    return paths


@pytest.fixture(params=PATHS, name="relay")
def relayFixture(request: Any) -> Iterator[str]:
    """Each test that takes it runs under both paths; the value is the mode."""
    previous = _fast.current()
    paths = _fast.configure(request.param)
    assert paths.enabled == (request.param == "fast"), paths.reason
    try:
        yield request.param
    finally:
        _fast._paths = previous
