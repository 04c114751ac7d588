"""
The CPU the drain's boundary tracking (``proxy.relay.boundary``) adds to a
large FETCH, apart from everything else the relay does: a 20 MB response in
64 KiB reads through a bare writer and through the tracked one, best of 20.

    python -m bench.boundary_cost
"""

from __future__ import annotations

import time

from proxy.relay.boundary import ImapBoundaries

SIZE = 20_000_000
READ = 65536


def main() -> None:
    body = (b"x" * 76 + b"\r\n") * (SIZE // 78)
    stream = b"* 1 FETCH (BODY[] {%d}\r\n" % len(body) + body + b")\r\na OK done\r\n"
    reads = [stream[i : i + READ] for i in range(0, len(stream), READ)]

    def sink(data: bytes) -> None:
        pass

    best = {"bare": 1e9, "tracked": 1e9}
    for _ in range(20):
        for name in best:
            write = sink
            if name == "tracked":
                b = ImapBoundaries()
                b.up.skim(b"a FETCH 1 BODY[]\r\n")
                write = b.toClient(sink)
            started = time.perf_counter()
            for r in reads:
                write(r)
            best[name] = min(best[name], time.perf_counter() - started)
    extra = best["tracked"] - best["bare"]
    print(
        f"boundary tracking: {extra * 1e3:.3f} ms per {SIZE / 1e6:g} MB FETCH ({len(reads)} reads)"
    )


if __name__ == "__main__":
    main()
