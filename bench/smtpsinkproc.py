"""
The tests' SMTP sink (:class:`tests.upstream.smtpsink.SMTPSink`, the relay
host of Dovecot submission) in a process of its own, so that receiving 30 MB
in Python does not compete for the benchmark client's GIL.

Child (``python -m bench.smtpsinkproc``): starts the sink, prints
``{"port": N}``, then answers one JSON line per request on stdin:
``{"op": "take", "n": N, "timeout": T}`` waits until *N* messages arrived,
answers ``{"count": C, "messages": [[mail_from, [rcpt, ...], length,
sha256], ...]}`` (length and SHA-256 of the bytes after the one Received
header Dovecot prepends) and forgets them; end of input stops it.

Parent: :class:`SinkProcess`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from typing import Any

from tests.upstream.osutil import stop_process

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SinkProcess:
    """The sink in a child process: ``host``, ``port``, :meth:`take`, :meth:`stop`."""

    host = "127.0.0.1"

    def __init__(self) -> None:
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.smtpsinkproc"],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.port = int(self._answer()["port"])

    def _answer(self) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError("the sink process ended")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"sink: {answer['error']}")
        return answer

    def take(
        self, n: int, timeout: float = 60.0
    ) -> tuple[int, list[tuple[str, list[str], int, str]]]:
        """Wait for *n* messages; (how many arrived, each one's envelope,
        length and digest); the sink forgets them."""
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"op": "take", "n": n, "timeout": timeout}).encode())
        self._proc.stdin.write(b"\n")
        self._proc.stdin.flush()
        answer = self._answer()
        return answer["count"], [tuple(m) for m in answer["messages"]]  # type: ignore[misc]

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
        stop_process(proc, 5.0)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main() -> None:
    from tests.upstream.smtpsink import SMTPSink
    from tests.upstream.submission import strip_received

    out = sys.stdout
    sink = SMTPSink()
    sink.start()
    try:
        out.write(json.dumps({"port": sink.port}) + "\n")
        out.flush()
        for line in sys.stdin:
            request = json.loads(line)
            try:
                got = sink.wait_for(int(request["n"]), float(request["timeout"]))
            except Exception as e:
                answer: dict[str, Any] = {"error": str(e)}
            else:
                sink.clear()
                messages = []
                for m in got:
                    body = strip_received(m.data)
                    messages.append([m.mail_from, list(m.rcpt_tos), len(body), digest(body)])
                answer = {"count": len(got), "messages": messages}
            out.write(json.dumps(answer) + "\n")
            out.flush()
    finally:
        sink.stop()


if __name__ == "__main__":
    main()
