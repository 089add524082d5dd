"""Length-prefixed binary framing for hefl's HE messages (never pickle).

Every message is ``magic (8 bytes) | fields``; byte strings are ``u32 length | bytes``
(little-endian).
``Reader`` raises ``UpdateRejected`` with what was wrong for truncated or oversized input.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from hefl.errors import UpdateRejected

_U32 = struct.Struct("<I")


def u32(n: int) -> bytes:
    return _U32.pack(n)


def blob(b: bytes) -> bytes:
    return _U32.pack(len(b)) + bytes(b)


def blobs(items: Sequence[bytes]) -> bytes:
    return _U32.pack(len(items)) + b"".join(blob(b) for b in items)


class Reader:
    """Reads fields from a message; every failure names the message kind."""

    def __init__(self, data: object, kind: str, magic: bytes) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise UpdateRejected(
                f"{kind} must be bytes, got {type(data).__name__}; an encrypted payload was "
                "expected (is this client running without encryption?)",
                stage="decode",
            )
        self.data = bytes(data)
        self.kind = kind
        self.pos = 0
        head = self.take(len(magic))
        if head != magic:
            raise UpdateRejected(
                f"not a {kind} (bad magic {head!r}); it may be plaintext or another message type",
                stage="decode",
            )

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise UpdateRejected(
                f"{self.kind} is truncated: needs {self.pos + n} bytes, got {len(self.data)}; "
                "resend it",
                stage="decode",
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])

    def blob(self, limit: int) -> bytes:
        n = self.u32()
        if n > limit:
            raise UpdateRejected(
                f"{self.kind} holds a {n}-byte field, more than the {limit} allowed", stage="decode"
            )
        return self.take(n)

    def blobs(self, count: int, limit: int) -> list[bytes]:
        n = self.u32()
        if n != count:
            raise UpdateRejected(
                f"{self.kind} holds {n} ciphertexts, expected {count} for these parameters: the "
                "vector is longer or shorter than the model, or was made for another model",
                stage="decode",
            )
        return [self.blob(limit) for _ in range(n)]

    def end(self) -> None:
        extra = len(self.data) - self.pos
        if extra:
            raise UpdateRejected(
                f"{self.kind} is oversized: {extra} unexpected trailing bytes", stage="decode"
            )
