"""Wire format of a scoring batch: length-prefixed SEAL ciphertexts, never a pickle.

    magic "HEFLBAT1" | key id (32 ASCII hex) | u32 records | u32 count | count x (u32 len | bytes)

All integers little-endian. The same frame carries the result (one ciphertext) back.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from hefl.errors import TransportError

MAGIC = b"HEFLBAT1"
_HEAD = struct.Struct("<32sII")
_LEN = struct.Struct("<I")


@dataclass(frozen=True)
class Batch:
    """A batch on the wire: whose key made it, how many records, and the ciphertexts."""

    key_id: str
    records: int
    blobs: tuple[bytes, ...]

    def dumps(self) -> bytes:
        key = self.key_id.encode("ascii")
        if len(key) != 32:
            raise TransportError(f"key id must be 32 hex characters, got {len(key)}")
        parts = [MAGIC, _HEAD.pack(key, self.records, len(self.blobs))]
        for b in self.blobs:
            parts += [_LEN.pack(len(b)), b]
        return b"".join(parts)

    @classmethod
    def loads(cls, data: bytes) -> Batch:
        """Parse a frame.

        Raises:
            TransportError: bad magic, truncated, or trailing bytes.
        """
        view = memoryview(data)
        if bytes(view[: len(MAGIC)]) != MAGIC or len(view) < len(MAGIC) + _HEAD.size:
            raise TransportError("not a hefl batch frame (bad magic or too short); send "
                                 "Batch(...).dumps() bytes")
        key, records, count = _HEAD.unpack_from(view, len(MAGIC))
        pos = len(MAGIC) + _HEAD.size
        blobs = []
        for i in range(count):
            if pos + _LEN.size > len(view):
                raise TransportError(f"batch frame truncated at ciphertext {i} of {count}")
            (n,) = _LEN.unpack_from(view, pos)
            pos += _LEN.size
            if pos + n > len(view):
                raise TransportError(f"batch frame truncated inside ciphertext {i} of {count}")
            blobs.append(bytes(view[pos : pos + n]))
            pos += n
        if pos != len(view):
            raise TransportError(f"batch frame has {len(view) - pos} trailing bytes")
        try:
            key_id = key.decode("ascii")
        except UnicodeDecodeError as e:
            raise TransportError("batch key id is not ASCII") from e
        return cls(key_id, records, tuple(blobs))


def batch(key_id: str, records: int, blobs: Sequence[bytes]) -> bytes:
    """Shorthand for ``Batch(key_id, records, tuple(blobs)).dumps()``."""
    return Batch(key_id, records, tuple(blobs)).dumps()
