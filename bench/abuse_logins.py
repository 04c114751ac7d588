"""
Failed logins from one address, with login penalties off (the old
behaviour, ``--login-penalty 0``) and on (the defaults): how many refused
IMAP logins one address gets answered per second over a bounded loopback
loop, and what the HTTP API answers to 1,000 random Bearer tokens. Not a
pass/fail test: it prints figures. Run from the repository root with the
test venv:

    .venv/bin/python -m bench.abuse_logins [--seconds 20] [--connections 20] [--api 1000]

Every connection is on loopback, to a ``twistd imapproxy`` of its own (SQLite
store in a temporary directory); no account is needed, a random token is
refused by the token check.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import secrets
import tempfile
import time

from tests.upstream.proxyproc import ProxyProcess

SOURCE = "127.0.0.2"
# The API's flood comes from an address of its own, not penalised by the IMAP one.
API_SOURCE = "127.0.0.3"


async def _imapAttacker(port: int, until: float, counts: collections.Counter[str]) -> None:
    """Logs in with random tokens until ``until``, reconnecting after each BYE."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(SOURCE, 0)
            )
        except OSError:
            counts["connect-error"] += 1
            await asyncio.sleep(0.05)
            continue
        try:
            await reader.readline()
            while time.monotonic() < until:
                writer.write(f"a LOGIN user {secrets.token_hex(32)}\r\n".encode())
                await writer.drain()
                remaining = until - time.monotonic()
                line = await asyncio.wait_for(reader.readline(), max(remaining, 0.01))
                if line.startswith(b"a NO"):
                    counts["refused"] += 1
                    continue
                if line.startswith(b"* BYE"):
                    break
                counts["other"] += 1
                break
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()


async def imapFlood(port: int, seconds: float, connections: int) -> collections.Counter[str]:
    counts: collections.Counter[str] = collections.Counter()
    until = time.monotonic() + seconds
    await asyncio.gather(*(_imapAttacker(port, until, counts) for _ in range(connections)))
    return counts


async def _apiRequest(port: int, token: str) -> tuple[int, str | None, float]:
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(API_SOURCE, 0))
    try:
        writer.write(
            b"GET /v1/accounts HTTP/1.1\r\nHost: api\r\nConnection: close\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\n\r\n"
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    retry = next(
        (ln.split(":", 1)[1].strip() for ln in lines if ln.lower().startswith("retry-after:")), None
    )
    return status, retry, time.monotonic() - started


async def apiFlood(port: int, requests: int, concurrency: int) -> dict[str, object]:
    statuses: collections.Counter[int] = collections.Counter()
    retryAfter: collections.Counter[str] = collections.Counter()
    slowest = 0.0
    queue = iter(range(requests))
    started = time.monotonic()

    async def worker() -> None:
        nonlocal slowest
        for _ in queue:
            status, retry, took = await _apiRequest(port, secrets.token_hex(32))
            statuses[status] += 1
            slowest = max(slowest, took)
            if retry is not None:
                retryAfter[retry] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {
        "statuses": dict(sorted(statuses.items())),
        "retryAfter": dict(retryAfter),
        "seconds": round(time.monotonic() - started, 1),
        "slowest": round(slowest, 1),
    }


def run(label: str, extra: list[str], args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="imapproxy-abuse-") as d:
        proxy = ProxyProcess(os.path.join(d, "proxy"))
        proxy.start(*extra)
        try:
            assert proxy.port is not None and proxy.api_port is not None
            counts = asyncio.run(imapFlood(proxy.port, args.seconds, args.connections))
            refused = counts["refused"]
            print(
                f"{label}: IMAP {refused} failed logins from {SOURCE} in {args.seconds:g} s "
                f"over {args.connections} connections = {refused / args.seconds:.1f}/s "
                f"{dict(counts)}"
            )
            api = asyncio.run(apiFlood(proxy.api_port, args.api, args.api_concurrency))
            print(f"{label}: API {args.api} random Bearer tokens from {API_SOURCE}: {api}")
            logs = [
                os.path.join(proxy.workdir, n)
                for n in os.listdir(proxy.workdir)
                if n.startswith("twistd.log")
            ]
            size = sum(os.path.getsize(p) for p in logs)
            print(f"{label}: log {size / 1024:.0f} KiB ({len(logs)} file(s), rotation included)")
        finally:
            proxy.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--api", type=int, default=1000, help="random Bearer tokens to send")
    parser.add_argument("--api-concurrency", type=int, default=20)
    args = parser.parse_args()
    run("penalties off", ["--login-penalty", "0"], args)
    # Explicitly: the tests' fixture turns penalties off unless told.
    run("penalties on ", ["--login-penalty", "15"], args)


if __name__ == "__main__":
    main()
