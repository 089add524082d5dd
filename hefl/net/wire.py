"""Framing on the wire: bodies in chunks with a declared size and SHA-256, arrays as bytes,
tokens in call metadata. No pickle anywhere.

A body (global parameters, an encoded update, an aggregate) is sent as one header frame, then
chunk frames of at most ``CHUNK_BYTES``; so no gRPC message limit applies to a model of any size.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from hefl.errors import TransportError
from hefl.net.proto import hefl_pb2 as pb

PROTOCOL_VERSION = 2
CHUNK_BYTES = 1 << 20
# Largest single gRPC message either side accepts: one chunk plus header room.
MAX_FRAME_BYTES = CHUNK_BYTES + (64 << 10)
GRPC_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", MAX_FRAME_BYTES),
    ("grpc.max_receive_message_length", MAX_FRAME_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVICE = "hefl.net.v1.Federation"
#: Bytes per parameter no message of hefl needs more than: the largest upload is 27.3 B/param
#: (BFV, threshold custody, BENCHMARKS.md W4), a model travels as 8 B/param (float64).
BODY_BYTES_PER_PARAM = 32
#: Room for headers and a mostly empty last ciphertext (a small model still sends whole ones).
BODY_SLACK = 4 << 20
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


def digest(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


def chunks(body: bytes, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    view = memoryview(body)
    for start in range(0, len(view), size):
        yield bytes(view[start : start + size])


def server_frames(header: pb.TaskHeader, body: bytes = b"") -> Iterator[pb.ServerFrame]:
    """A task: its header (size and hash filled in), then the body in chunks."""
    header.body_size = len(body)
    header.body_sha256 = digest(body)
    yield pb.ServerFrame(header=header)
    for c in chunks(body):
        yield pb.ServerFrame(chunk=c)


def client_frames(header: pb.UpdateHeader, body: bytes = b"") -> Iterator[pb.ClientFrame]:
    """An answer: its header (size and hash filled in), then the body in chunks."""
    header.body_size = len(body)
    header.body_sha256 = digest(body)
    yield pb.ClientFrame(header=header)
    for c in chunks(body):
        yield pb.ClientFrame(chunk=c)


class BodyError(TransportError):
    """A streamed body is truncated, too long, too large or corrupt (``code`` names the gRPC
    status the server answers with)."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.code = code


def body_cap(size: int, messages: int = 1) -> int:
    """The largest body one side accepts for a model of ``size`` parameters: ``messages``
    times what one upload of it can need."""
    return messages * (BODY_BYTES_PER_PARAM * int(size) + BODY_SLACK)


def check_size(size: int, limit: int) -> None:
    """Refuse a declared body size over ``limit`` before reading any of it (BodyError,
    RESOURCE_EXHAUSTED)."""
    if size > limit:
        raise BodyError(
            f"body of {size} bytes exceeds the limit of {limit} bytes for this model; a "
            "message this large is not one hefl sends (a server can raise [server] "
            "max_update_mb)",
            "RESOURCE_EXHAUSTED",
        )


def read_body(pieces: Iterable[bytes], size: int, sha256: bytes, limit: int) -> bytes:
    """Join chunks into exactly ``size`` bytes whose SHA-256 is ``sha256``.

    Raises:
        BodyError: declared size over ``limit`` (RESOURCE_EXHAUSTED), more or fewer bytes than
            declared, or a hash mismatch.
    """
    check_size(size, limit)
    buf = bytearray()
    for piece in pieces:
        buf += piece
        if len(buf) > size:
            raise BodyError(f"body is longer than the {size} bytes its header declared")
    if len(buf) < size:
        raise BodyError(
            f"body truncated: got {len(buf)} of {size} declared bytes; the stream was cut, resend"
        )
    if not hmac.compare_digest(digest(bytes(buf)), sha256):
        raise BodyError("body SHA-256 does not match its header; it was corrupted in transit")
    return bytes(buf)


# ---------------------------------------------------------------- arrays and optimizer state


def vector_bytes(v: np.ndarray) -> bytes:
    """A flat float64 vector as little-endian bytes (exact)."""
    return np.ascontiguousarray(v, dtype="<f8").tobytes()


def vector_from(data: bytes, size: int | None = None) -> np.ndarray:
    if len(data) % 8 or (size is not None and len(data) != 8 * size):
        want = "a multiple of 8" if size is None else f"{8 * size} ({size} float64)"
        raise TransportError(f"vector body has {len(data)} bytes, expected {want}")
    return np.frombuffer(data, dtype="<f8").astype(np.float64)


def pack_state(state: Any) -> bytes:
    """Server-optimizer state (``()``, an array, or a tuple of arrays) as ``.npz`` bytes."""
    if isinstance(state, np.ndarray):
        kind, arrays = "array", [state]
    elif isinstance(state, tuple) and all(isinstance(a, np.ndarray) for a in state):
        kind, arrays = "tuple", list(state)
    else:
        raise TransportError(f"cannot store optimizer state of type {type(state).__name__}")
    buf = io.BytesIO()
    named: dict[str, Any] = {f"a{i}": a for i, a in enumerate(arrays)}
    np.savez(buf, kind=np.array(kind), **named)
    return buf.getvalue()


def unpack_state(data: bytes) -> Any:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        kind = str(z["kind"])
        arrays = [z[f"a{i}"] for i in range(len(z.files) - 1)]
    return arrays[0] if kind == "array" else tuple(arrays)


# ---------------------------------------------------------------- authentication


@dataclass(frozen=True)
class Token:
    """A client credential ``name:secret``; the server keeps only ``sha256(token)``."""

    name: str
    secret: str

    @classmethod
    def parse(cls, text: str) -> Token:
        name, sep, secret = text.strip().partition(":")
        if not sep or not NAME_RE.match(name) or len(secret) < 16:
            raise TransportError(
                "malformed token: expected NAME:SECRET as written by `hefl certs` "
                "(NAME of letters, digits, '-' or '_'; SECRET of 16+ characters)"
            )
        return cls(name, secret)

    def __str__(self) -> str:
        return f"{self.name}:{self.secret}"

    def __repr__(self) -> str:  # never print the secret
        return f"Token(name={self.name!r}, secret=***)"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(str(self).encode()).hexdigest()

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self}"),)


def token_from_metadata(metadata: Iterable[tuple[str, Any]]) -> Token:
    for key, value in metadata:
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            if text.startswith("Bearer "):
                return Token.parse(text[len("Bearer ") :])
    raise TransportError("no credentials: send `authorization: Bearer NAME:SECRET` metadata")
