"""Small process and port helpers the fixtures and benchmarks share."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; waits for the end either way."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until(check: Callable[[], T], seconds: float = 10.0, what: str = "condition") -> T:
    """
    Poll ``check()`` until it returns something truthy; that result.

    For integration tests that wait on another process (a session closing on
    the provider, a log line, a background rewrite), which can only be
    observed by asking again: the deadline is generous so that a busy machine
    passes, and a condition that never comes fails with ``what`` named.

    :raises AssertionError: when ``seconds`` pass first.
    """
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {seconds}s")
        time.sleep(0.05)
