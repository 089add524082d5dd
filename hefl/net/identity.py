"""Who made a contribution: Ed25519 identity keys and the signed statement of one contribution.

``hefl certs`` gives every registered party an identity key (``clients/NAME.id``, PKCS8 PEM,
mode 0600) and lists its public half in the registry (``sign_key``, 64 hex digits). A data
client signs each update it sends; a key holder, holding its own copy of the registry, decrypts
only sums it recomputed from contributions whose signatures it verified (``hefl.net.decrypt``).
The server relays signatures but cannot make one, so it cannot invent contributors (Sybil
updates), change a count, or pass off an old round's updates as new.

What a signature covers (``statement``): the run id, the round, the task id (one attempt of the
round), the SHA-256 of the global model the client trained on, and the SHA-256 of the exact bytes
it uploaded. Every field is length-prefixed, under a fixed domain tag, so no two different
statements share bytes.

Ed25519 (RFC 8032) from ``cryptography``; nothing here implements a primitive.

Example:
    >>> me = Identity.generate()
    >>> s = statement("run1", 3, "run1/3/1/ab", b"m" * 32, b"p" * 32)
    >>> verify(me.public_hex, s, me.sign(s))
    True
    >>> verify(me.public_hex, statement("run1", 4, "run1/3/1/ab", b"m" * 32, b"p" * 32), me.sign(s))
    False
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hefl.errors import ConfigError

DOMAIN = b"hefl/contribution/v1"


def digest(data: bytes) -> bytes:
    """SHA-256 of ``data`` (model bodies and upload bodies are named by this)."""
    return hashlib.sha256(data).digest()


def statement(run_id: str, round_num: int, task_id: str, model_digest: bytes,
              payload_digest: bytes) -> bytes:
    """The bytes a data client signs for one contribution (length-prefixed fields)."""
    parts = [DOMAIN, run_id.encode(), struct.pack("<Q", round_num), task_id.encode(),
             model_digest, payload_digest]
    return b"".join(struct.pack("<I", len(p)) + p for p in parts)


@dataclass(frozen=True)
class Identity:
    """One party's Ed25519 signing key (secret: it never leaves the party's machine)."""

    key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | Path) -> Identity:
        """Read ``NAME.id`` from ``hefl certs``.

        Raises:
            ConfigError: missing, unreadable, or not an Ed25519 private key.
        """
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read identity key {str(path)!r}: {e}; it is written by "
                              "`hefl certs` as clients/NAME.id") from e
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except ValueError as e:
            raise ConfigError(f"{str(path)!r} is not a PEM private key: {e}") from e
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{str(path)!r} is not an Ed25519 identity key (from `hefl certs`)")
        return cls(key)

    def save(self, path: str | Path) -> None:
        """Write the key as PKCS8 PEM, mode 0600."""
        pem = self.key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
        from hefl.net.files import write_private

        write_private(path, pem)

    @property
    def public_hex(self) -> str:
        """The public key as the registry lists it (``sign_key``)."""
        raw = self.key.public_key().public_bytes(serialization.Encoding.Raw,
                                                 serialization.PublicFormat.Raw)
        return raw.hex()

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)

    def __repr__(self) -> str:  # never show key material
        return f"Identity(public={self.public_hex[:16]}...)"


def public_key(hex_key: str) -> Ed25519PublicKey:
    """Parse a registry ``sign_key``.

    Raises:
        ConfigError: not 64 hex digits of an Ed25519 public key.
    """
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_key))
    except ValueError as e:
        raise ConfigError(f"sign_key {hex_key[:16]!r}... is not an Ed25519 public key (64 hex "
                          "digits from `hefl certs`)") from e


def verify(hex_key: str, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``hex_key``'s signature of ``message``."""
    try:
        public_key(hex_key).verify(signature, message)
    except (InvalidSignature, ConfigError):
        return False
    return True
