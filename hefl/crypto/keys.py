"""Key custody as explicit steps over typed per-party state.

    ceremony = key_ceremony(spec)                 dealer: a client (custody "clients") or the
                                                  key holder (custody "keyholder")
    ceremony.public  -> server (and, for "keyholder", clients): PublicContext, no secret
    ceremony.shares  -> key holder(s) (for "clients": every client): KeyShare
    partial = partial_decrypt(share, encrypted_sum)          each key holder
    slots   = fuse(spec, [partial, ...])                     whoever assembles the result

Today there is one share holding the whole secret key, so ``fuse`` of one partial is the
plaintext. A threshold scheme (several key holders, each with a share, partial decryptions fused as
in OpenFHE's multiparty CKKS example) fits the same shapes: ``KeyShare.party/parties``,
``partial_decrypt``, ``fuse``. The aggregation algorithms never see keys, only these steps.

Every state converts to and from bytes (``to_bytes``/``from_bytes``) so that each party can run in
its own process. ``KeyShare`` is secret: it never goes to the server and its repr hides the key.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from hefl.crypto import wire
from hefl.crypto.flooding import flood
from hefl.crypto.seal import Seal, save
from hefl.crypto.spec import HeSpec
from hefl.errors import ConfigError, ContextMismatch, KeyCustodyError

MAGIC_PUBLIC = b"HEFLPUB1"
MAGIC_SHARE = b"HEFLSEC1"
MAX_KEY_BYTES = 1 << 22


def _parse_spec(r: wire.Reader) -> HeSpec:
    try:
        return HeSpec.from_bytes(r.blob(1 << 16))
    except ConfigError as e:
        raise ContextMismatch(f"{r.kind} carries invalid HE parameters: {e}") from e


@dataclass(frozen=True)
class PublicContext:
    """What the server (and, in key-holder custody, the clients) holds: no secret key.

    Attributes:
        spec: the public HE parameters.
        key_id: 16 random bytes naming the key set; stamped on every ciphertext message.
        public_key: SEAL public key bytes (``b""`` when clients hold the key and encrypt with it).
    """

    spec: HeSpec
    key_id: bytes
    public_key: bytes = field(default=b"", repr=False)

    is_private = False  # mirrors TenSEAL's Context.is_private(): no secret key in here

    def to_bytes(self) -> bytes:
        return MAGIC_PUBLIC + wire.blob(self.spec.to_bytes()) + self.key_id + wire.blob(
            self.public_key
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicContext:
        r = wire.Reader(data, "public HE context", MAGIC_PUBLIC)
        spec = _parse_spec(r)
        key_id = r.take(16)
        pk = r.blob(MAX_KEY_BYTES)
        r.end()
        ctx = cls(spec, key_id, pk)
        if pk:
            ctx.seal.load_public_key(pk)  # validates the key against the parameters now
        return ctx

    @cached_property
    def seal(self) -> Seal:
        return Seal.of(self.spec)


@dataclass(frozen=True)
class KeyShare:
    """A secret key share (today: the whole secret key, ``parties == 1``).

    Keep it on clients (custody "clients") or on the key holder (custody "keyholder"); never send
    it to the server and never log it (its repr shows no key material).
    """

    spec: HeSpec
    key_id: bytes
    secret_key: bytes = field(repr=False)
    party: int = 0
    parties: int = 1

    is_private = True

    def to_bytes(self) -> bytes:
        """Secret: send only over an authenticated, encrypted channel to a party entitled to it."""
        return (MAGIC_SHARE + wire.blob(self.spec.to_bytes()) + self.key_id
                + wire.u32(self.party) + wire.u32(self.parties) + wire.blob(self.secret_key))

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyShare:
        r = wire.Reader(data, "HE key share", MAGIC_SHARE)
        spec = _parse_spec(r)
        key_id = r.take(16)
        party, parties = r.u32(), r.u32()
        sk = r.blob(MAX_KEY_BYTES)
        r.end()
        share = cls(spec, key_id, sk, party, parties)
        share.seal_key()  # validates the key against the parameters now
        return share

    @cached_property
    def seal(self) -> Seal:
        return Seal.of(self.spec)

    def seal_key(self) -> Any:
        """The SEAL secret key object (only inside this party's process)."""
        return self.seal.load_secret_key(self.secret_key)

    @cached_property
    def decryptor(self) -> Any:
        """A SEAL decryptor under this share, made once (loading the key costs about as much
        as decrypting a ciphertext at N = 2048)."""
        return self.seal.decryptor(self.seal_key())

    def public(self) -> PublicContext:
        """The public context matching this share (no public key: symmetric custody)."""
        return PublicContext(self.spec, self.key_id)


@dataclass(frozen=True)
class Ceremony:
    """Result of a key ceremony: one public context and the secret shares."""

    public: PublicContext
    shares: tuple[KeyShare, ...] = field(repr=False)


def key_from_bytes(data: bytes) -> KeyShare | PublicContext:
    """A key file's bytes: the secret ``KeyShare`` (``MAGIC_SHARE``) or the ``PublicContext``."""
    return KeyShare.from_bytes(data) if data[:8] == MAGIC_SHARE else PublicContext.from_bytes(data)


def key_ceremony(spec: HeSpec) -> Ceremony:
    """Generate a fresh key set for ``spec`` (single dealer, one share).

    When ``spec.symmetric`` (clients hold the key) the public context carries no public key: clients
    encrypt with the shared secret key (seeded ciphertexts, half the bytes). Otherwise it carries
    the public key, with which clients encrypt for the key holder.

    Example:
        >>> from hefl.crypto.spec import bfv_spec
        >>> c = key_ceremony(bfv_spec(10, symmetric=False))
        >>> c.public.is_private, len(c.shares), c.public.public_key != b""
        (False, 1, True)
    """
    seal = Seal.of(spec)
    sk, pk = seal.keygen()
    key_id = secrets.token_bytes(16)
    public = PublicContext(spec, key_id, b"" if spec.symmetric else save(pk))
    return Ceremony(public, (KeyShare(spec, key_id, save(sk)),))


@dataclass(frozen=True)
class PartialDecryption:
    """One key holder's contribution to decrypting an aggregate (today: the plaintext slots)."""

    party: int
    key_id: bytes
    values: np.ndarray = field(repr=False)


def partial_decrypt(share: KeyShare, ciphertexts: Sequence[Any]) -> PartialDecryption:
    """Key-holder step: decrypt an aggregate's ciphertexts with this share.

    CKKS ciphertexts are flooded first (``hefl.crypto.flooding``; they are changed in place), so
    no raw ``c0 + c1*s`` ever leaves this function.
    """
    seal = share.seal
    flood(seal, ciphertexts)
    dec = share.decryptor
    values = np.stack([seal.decrypt(dec, ct) for ct in ciphertexts])
    return PartialDecryption(share.party, share.key_id, values)


def fuse(spec: HeSpec, partials: Sequence[PartialDecryption]) -> np.ndarray:
    """Combine partial decryptions into the aggregate's plaintext slots.

    Raises:
        KeyCustodyError: missing or mixed partial decryptions.
    """
    if len(partials) != 1 or partials[0].party != 0:
        raise KeyCustodyError(
            f"expected the partial decryption of the single key holder, got {len(partials)}; "
            "threshold decryption is not available for this key set"
        )
    return partials[0].values
