"""
The SASL mechanisms the proxy logs in to a provider with, as Twisted mail's
``IClientAuthentication`` (``PLAINAuthenticator`` is the model): the bearer
token goes in the initial response, and each mechanism answers the server's
error challenge its own way before the server sends its tagged NO.
"""

from __future__ import annotations

from twisted.mail.interfaces import IClientAuthentication
from zope.interface import implementer


@implementer(IClientAuthentication)
class XOAUTH2Authenticator:
    """
    Google's XOAUTH2 SASL mechanism. After a refusal the server sends an error
    challenge (base64 JSON); the client must answer it with an empty response.
    """

    def __init__(self, user: bytes):
        self.user = user

    def getName(self) -> bytes:
        return b"XOAUTH2"

    def challengeResponse(self, secret: bytes, chal: bytes) -> bytes:
        if chal:
            return b""
        return b"user=" + self.user + b"\x01auth=Bearer " + secret + b"\x01\x01"


@implementer(IClientAuthentication)
class OAUTHBEARERAuthenticator:
    """RFC 7628 OAUTHBEARER; the error challenge is answered with ``%x01``."""

    def __init__(self, user: bytes):
        self.user = user

    def getName(self) -> bytes:
        return b"OAUTHBEARER"

    def challengeResponse(self, secret: bytes, chal: bytes) -> bytes:
        if chal:
            return b"\x01"
        user = self.user.replace(b"=", b"=3D").replace(b",", b"=2C")
        return b"n,a=" + user + b",\x01auth=Bearer " + secret + b"\x01\x01"
