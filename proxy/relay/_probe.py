"""
An in-memory TLS pair built from Twisted's own TLS layer, with a throw-away
key: what the start-up probes of the fast paths run on, never a socket.
"""

from __future__ import annotations

import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl, task
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory


class App(Protocol):
    """The protocol above a TLS layer: keeps what it reads, or hands it to ``sink``."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.sink: Any = None

    def dataReceived(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink(data)
        else:
            self.received.append(data)


class TLSPair:
    """A TLS client and server, each over a ``StringTransport``; :meth:`pump` moves the bytes."""

    def __init__(self, serverOptions: Any, clientOptions: Any):
        # Twisted's aggregation of small writes waits for this clock.
        self.clock = task.Clock()
        self.serverApp, self.clientApp = App(), App()
        server = TLSMemoryBIOFactory(
            serverOptions, False, Factory.forProtocol(lambda: self.serverApp), self.clock
        )
        client = TLSMemoryBIOFactory(
            clientOptions, True, Factory.forProtocol(lambda: self.clientApp), self.clock
        )
        self.server: Any = server.buildProtocol(None)
        self.client: Any = client.buildProtocol(None)
        self.serverWire, self.clientWire = StringTransport(), StringTransport()
        self.server.makeConnection(self.serverWire)
        self.client.makeConnection(self.clientWire)
        self.pump()

    def pump(self) -> None:
        """Run the clock and deliver what each side wrote, each batch in one read, until quiet."""
        for _ in range(20):
            self.clock.advance(0)
            toServer, toClient = self.clientWire.value(), self.serverWire.value()
            if not toServer and not toClient:
                return
            self.clientWire.clear()
            self.serverWire.clear()
            if toServer:
                self.server.dataReceived(toServer)
            if toClient:
                self.client.dataReceived(toClient)
        raise AssertionError("the TLS pair did not settle")

    def serverReceived(self) -> bytes:
        data = b"".join(self.serverApp.received)
        self.serverApp.received.clear()
        return data


def selfSigned() -> Any:
    """Server TLS options with a fresh EC key and a self-signed certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "imapproxy probe")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ) + cert.public_bytes(serialization.Encoding.PEM)
    # Twisted's own way from PEM to server options.
    return ssl.PrivateCertificate.loadPEM(pem).options()


def tlsPair() -> TLSPair:
    """A connected pair; the client does not verify (the probe's data is its own)."""
    return TLSPair(selfSigned(), ssl.CertificateOptions())
