"""
The CPU the drain's boundary tracking (``proxy.relay.boundary``) adds to the
relay, apart from everything else the relay does: a 20 MB FETCH response (one
literal) and 100,000 small FETCH FLAGS responses (5 MB of lines: the worst
case, a line costs more than a literal byte), in 64 KiB reads, through a bare
writer and through the tracked one, best of 20.

    python -m bench.boundary_cost
"""

from __future__ import annotations

import time

from proxy.relay.boundary import ImapBoundaries

READ = 65536


def cost(stream: bytes) -> float:
    """Seconds the tracking adds to relaying ``stream`` (best of 20)."""
    reads = [stream[i : i + READ] for i in range(0, len(stream), READ)]

    def sink(data: bytes) -> None:
        pass

    best = {"bare": 1e9, "tracked": 1e9}
    for _ in range(20):
        for name in best:
            write = sink
            if name == "tracked":
                b = ImapBoundaries()
                b.up.skim(b"a FETCH 1:* BODY[]\r\n")
                write = b.toClient(sink)
            started = time.perf_counter()
            for r in reads:
                write(r)
            best[name] = min(best[name], time.perf_counter() - started)
    return best["tracked"] - best["bare"]


def main() -> None:
    body = (b"x" * 76 + b"\r\n") * (20_000_000 // 78)
    fetch = b"* 1 FETCH (BODY[] {%d}\r\n" % len(body) + body + b")\r\na OK done\r\n"
    flags = b"".join(
        b"* %d FETCH (UID %d FLAGS (\\Seen \\Answered))\r\n" % (i, i) for i in range(1, 100001)
    )
    for name, stream in (("one 20 MB FETCH", fetch), ("100,000 FETCH FLAGS", flags)):
        extra = cost(stream)
        print(
            f"boundary tracking, {name} ({len(stream) / 1e6:.1f} MB): {extra * 1e3:.3f} ms, "
            f"{extra / len(stream) * 1e9:.3f} ns/byte"
        )


if __name__ == "__main__":
    main()
