"""
Connection limits on the real ``twistd imapproxy``: one address holding its
maximum of connections and TLS handshakes (with the process held to 256 open
files, fewer than that address tries to open) leaves room for a client from
another address, which is greeted within a second, in the clear and over TLS.

The cap is checked on a process whose handshake deadline is far beyond the test, so
that no held handshake is cut (freeing a place under the cap) while the flood is
still being accepted on a busy machine; a second process with a short deadline
shows that unfinished handshakes are cut.
"""

from __future__ import annotations

import os
import resource
import selectors
import socket
import ssl
import time

import pytest

from tests.upstream.osutil import wait_until
from tests.upstream.proxyproc import ProxyProcess

PER_ADDRESS = 50
#: Longer than the cap test could take, however busy the machine.
LONG_HANDSHAKE = 600.0
SHORT_HANDSHAKE = 1.0
FILES = 256


def startLimited(pki, workdir, name: str, handshakeTimeout: float) -> ProxyProcess:
    p = ProxyProcess(os.path.join(workdir, name))
    p.start(
        "--port",
        f"ssl:0:interface=127.0.0.1:privateKey={pki.key}:certKey={pki.cert}",
        "--max-preauth-per-address",
        str(PER_ADDRESS),
        "--handshake-timeout",
        str(handshakeTimeout),
    )
    # As if the open-files limit were small: the flood below is larger.
    resource.prlimit(p.pid(), resource.RLIMIT_NOFILE, (FILES, FILES))
    return p


@pytest.fixture(scope="module")
def limited(pki, workdir):
    p = startLimited(pki, workdir, "limited", LONG_HANDSHAKE)
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def hasty(pki, workdir):
    p = startLimited(pki, workdir, "hasty", SHORT_HANDSHAKE)
    try:
        yield p
    finally:
        p.stop()


def connect(port: int, source: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    s.setblocking(False)
    return s


def acceptQueue(port: int) -> int | None:
    """
    How many connections wait in the accept queue of the listening socket on
    127.0.0.1:``port`` (``/proc/net/tcp``'s rx_queue of a LISTEN socket), or
    None when there is no such socket.
    """
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[3] == "0A":
                return int(fields[4].split(":")[1], 16)
    return None


def waitAccepted(port: int, seconds: float = 30.0) -> None:
    """
    Wait until the server has accepted every connection made to ``port`` so
    far. The client's ``connect`` returns once the kernel queues the
    connection, not once the server accepts it; connections to two ports are
    accepted in whatever order the reactor gets to them.
    """
    wait_until(lambda: acceptQueue(port) == 0, seconds, f"every connection to {port} accepted")


def firstLines(socks: list[socket.socket], deadline: float) -> dict[socket.socket, bytes]:
    """What each socket received up to its first CRLF (b"" when closed), until ``deadline``."""
    got = {s: b"" for s in socks}
    done: dict[socket.socket, bytes] = {}
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    try:
        while len(done) < len(socks) and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.2):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(4096)
                except ConnectionError:
                    data = b""
                got[s] += data
                if not data or b"\r\n" in got[s]:
                    done[s] = got[s].split(b"\r\n")[0]
                    sel.unregister(s)
    finally:
        sel.close()
    return done


def test_one_address_at_its_cap_leaves_room_for_another(limited, pki):
    """An address at its cap gets BYE; another is greeted within a second, plain and TLS."""
    plain, tls = limited.ports["tcp"], limited.ports["ssl"]
    held: list[socket.socket] = []
    try:
        # 30 idle connections, greeted...
        idle = [connect(plain, "127.0.0.1") for _ in range(30)]
        held += idle
        lines = firstLines(idle, time.monotonic() + 30)
        assert all(v.startswith(b"* OK imapproxy ready") for v in lines.values())
        assert len(lines) == 30
        # ...20 TLS handshakes that never send a ClientHello...
        handshakes = [connect(tls, "127.0.0.1") for _ in range(20)]
        held += handshakes
        # Accepted (and so counted against the cap) before the flood comes in
        # on the other port; else some of the flood may be counted first.
        waitAccepted(tls)
        # ...and 250 more from the same address: past the cap (and past the
        # process's open files, had it no cap).
        flood = [connect(plain, "127.0.0.1") for _ in range(250)]
        held += flood
        lines = firstLines(flood, time.monotonic() + 30)
        assert len(lines) == 250
        assert set(lines.values()) == {b"* BYE Too many connections from your address"}

        for port, wrap in ((plain, False), (tls, True)):
            started = time.monotonic()
            s = socket.create_connection(
                ("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0)
            )
            if wrap:
                ctx = ssl.create_default_context(cafile=pki.ca_cert)
                s = ctx.wrap_socket(s, server_hostname="localhost")
            with s:
                greeting = s.recv(4096)
            elapsed = time.monotonic() - started
            assert greeting.startswith(b"* OK imapproxy ready for requests from 127.0.0.2")
            assert elapsed < 1.0, elapsed

        # None of the held handshakes was cut meanwhile: the cap alone refused.
        assert firstLines(handshakes, time.monotonic() + 0.5) == {}
    finally:
        for s in held:
            s.close()
    assert "Traceback" not in limited.log()


def test_unfinished_handshakes_are_cut(hasty):
    """TLS handshakes that never send a ClientHello are closed at their deadline."""
    handshakes = [connect(hasty.ports["ssl"], "127.0.0.1") for _ in range(20)]
    try:
        cut = firstLines(handshakes, time.monotonic() + SHORT_HANDSHAKE + 30)
        assert len(cut) == 20 and set(cut.values()) == {b""}
    finally:
        for s in handshakes:
            s.close()
    assert "Traceback" not in hasty.log()
