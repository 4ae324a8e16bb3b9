"""The web view's one credential: ``[web] token``, as a Basic password or a Bearer token.

Browsers send HTTP Basic auth (any user name, the token as the password), the feed's clients
``Authorization: Bearer <token>``; either is accepted on every protected path. Both sides are
hashed before they are compared with :func:`hmac.compare_digest`, so the comparison takes the
same time whatever is sent, its length included.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

__all__ = ["Credential"]


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class Credential:
    """Checks an ``Authorization`` header against the token."""

    def __init__(self, token: str) -> None:
        self._digest = _digest(token.strip().encode())

    def allows(self, header: str | None) -> bool:
        supplied = _supplied(header)
        # Compared even when nothing usable was sent, so that a missing token takes as long.
        match = hmac.compare_digest(_digest(supplied or b""), self._digest)
        return supplied is not None and match


def _supplied(header: str | None) -> bytes | None:
    """The token in a Basic or Bearer ``Authorization`` header; None for anything else."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value.encode() if value else None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
        _user, sep, password = decoded.partition(b":")
        return password if sep and password else None
    return None
