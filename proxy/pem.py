"""
PEM files: the one place that splits a chain into its certificates.
"""

from __future__ import annotations

_END = b"-----END CERTIFICATE-----"


def splitCertificates(pem: bytes) -> list[bytes]:
    """
    :return: each ``-----BEGIN CERTIFICATE-----`` block of ``pem``, in file
        order (a leaf first, then its intermediates, in a server's chain).
    """
    return [part + _END for part in pem.split(_END) if b"-----BEGIN" in part]
