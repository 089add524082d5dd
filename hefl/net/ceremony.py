"""The threshold key ceremony between separate key holders: two signed messages each, no dealer.

The steps are those of ``hefl.crypto.threshold`` (Mouchet et al., PoPETs 2021); this module
carries them between parties that trust no relay. Key holder ``name`` is member ``j``: its
position in ``[aggregation] key_holders``. Whoever relays the files (an operator, the server)
only moves bytes:

    1. ``start``  -> ``NAME.hello`` (public): run id, parameters, member number, the member's
       ceremony nonce and a fresh X25519 key to receive its Shamir shares on.
    2. ``deal(hellos)`` -> ``NAME.deal``: the member's public key share ``p_j`` and, for every
       member ``i``, its Shamir share ``f_j(i)`` sealed to ``i``'s X25519 key.
    3. ``finish(hellos, deals)`` -> ``share.key`` (secret) and ``public.ctx`` (every member
       computes the same; compare the printed key id).

Every message is signed with the member's Ed25519 identity key (``hefl certs``) and each
recipient checks it against its own copy of the registry (the ``sign_key`` of the entry with
``role = "keyholder"``), so a relay can neither substitute a member's nonce, public share or
X25519 key, nor read a Shamir share. A sealed share is ECIES from ``cryptography``'s primitives:
X25519 between a fresh ephemeral key and the recipient's hello key, HKDF-SHA256, AES-256-GCM;
the run, key id, dealer and recipient are bound into the key derivation and the associated data.
The member's state between steps (its key share) stays in its ``--key-dir``, mode 0600, and is
deleted by ``finish``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hefl.crypto import wire
from hefl.crypto.keys import KeyShare, PublicContext
from hefl.crypto.spec import HeSpec
from hefl.crypto.threshold import NONCE_BYTES, Member, Transcript, poly_bytes, poly_from
from hefl.errors import KeyCustodyError
from hefl.net.identity import Identity, verify

MAGIC_HELLO = b"HEFLHLO1"
MAGIC_DEAL = b"HEFLDEA1"
MAGIC_STATE = b"HEFLCST1"
STATE_FILE = "ceremony.state"
_SIGNED = b"hefl threshold ceremony v1\0"


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class Hello:
    """Member ``party``'s first message (public)."""

    run_id: str
    name: str
    party: int
    fingerprint: bytes
    nonce: bytes
    box_key: bytes
    signature: bytes = b""

    def body(self) -> bytes:
        return (MAGIC_HELLO + wire.blob(self.run_id.encode()) + wire.blob(self.name.encode())
                + wire.u32(self.party) + self.fingerprint + self.nonce + self.box_key)

    def to_bytes(self) -> bytes:
        return self.body() + wire.blob(self.signature)

    @classmethod
    def from_bytes(cls, data: bytes) -> Hello:
        r = wire.Reader(data, "ceremony hello", MAGIC_HELLO)
        run_id, name = r.blob(256).decode(), r.blob(256).decode()
        hello = cls(run_id, name, r.u32(), r.take(16), r.take(NONCE_BYTES), r.take(32),
                    r.blob(64))
        r.end()
        return hello


@dataclass(frozen=True)
class Deal:
    """Member ``party``'s second message: its public share and one sealed share per member."""

    run_id: str
    name: str
    party: int
    key_id: bytes
    public_share: bytes
    sealed: tuple[bytes, ...]
    signature: bytes = b""

    def body(self) -> bytes:
        return (MAGIC_DEAL + wire.blob(self.run_id.encode()) + wire.blob(self.name.encode())
                + wire.u32(self.party) + self.key_id + wire.blob(self.public_share)
                + wire.blobs(self.sealed))

    def to_bytes(self) -> bytes:
        return self.body() + wire.blob(self.signature)

    @classmethod
    def from_bytes(cls, data: bytes, parties: int) -> Deal:
        r = wire.Reader(data, "ceremony deal", MAGIC_DEAL)
        run_id, name = r.blob(256).decode(), r.blob(256).decode()
        party, key_id = r.u32(), r.take(16)
        public = r.blob(1 << 22)
        sealed = tuple(r.blobs(parties, 1 << 22))
        deal = cls(run_id, name, party, key_id, public, sealed, r.blob(64))
        r.end()
        return deal


def _box_key(shared: bytes, run_id: str, key_id: bytes, dealer: int, recipient: int) -> bytes:
    info = (b"hefl threshold share v1\0" + run_id.encode() + b"\0" + key_id
            + wire.u32(dealer) + wire.u32(recipient))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def seal_share(share: bytes, to: bytes, run_id: str, key_id: bytes, dealer: int,
               recipient: int) -> bytes:
    """ECIES: ephemeral X25519 with ``to``, HKDF-SHA256, AES-256-GCM (binding in key and AAD)."""
    eph = X25519PrivateKey.generate()
    key = _box_key(eph.exchange(X25519PublicKey.from_public_bytes(to)), run_id, key_id, dealer,
                   recipient)
    nonce = os.urandom(12)
    aad = key_id + wire.u32(dealer) + wire.u32(recipient)
    return _raw(eph.public_key()) + nonce + AESGCM(key).encrypt(nonce, share, aad)


def open_share(sealed: bytes, box: X25519PrivateKey, run_id: str, key_id: bytes, dealer: int,
               recipient: int) -> bytes:
    """Inverse of ``seal_share`` for the holder of ``box``; raises ``KeyCustodyError``."""
    try:
        eph = X25519PublicKey.from_public_bytes(sealed[:32])
        key = _box_key(box.exchange(eph), run_id, key_id, dealer, recipient)
        aad = key_id + wire.u32(dealer) + wire.u32(recipient)
        return AESGCM(key).decrypt(sealed[32:44], sealed[44:], aad)
    except (InvalidTag, ValueError) as e:
        raise KeyCustodyError(f"the share key holder {dealer} sealed for key holder {recipient} "
                              "does not open: altered, or sealed to another key") from e


class CeremonyMember:
    """One key holder's side of the ceremony, resumable from its key directory.

    Args:
        spec: the federation's threshold parameters (``spec.parties`` members).
        run_id: names the run; bound into every message.
        names: the committee in member order (``[aggregation] key_holders``).
        name: this key holder.
        identity: its Ed25519 identity key; ``signers`` the committee's registry ``sign_key``s.
    """

    def __init__(self, spec: HeSpec, run_id: str, names: Sequence[str], name: str,
                 identity: Identity, signers: Mapping[str, str], key_dir: Path) -> None:
        if len(names) != spec.parties or len(set(names)) != len(names):
            raise KeyCustodyError(f"the committee lists {list(names)}; the parameters need "
                                  f"{spec.parties} distinct key holders")
        if name not in names:
            raise KeyCustodyError(f"{name!r} is not a key holder of this committee {list(names)}")
        missing = [n for n in names if n not in signers]
        if missing:
            raise KeyCustodyError(f"the registry lists no sign_key for key holder(s) {missing}; "
                                  "regenerate it with `hefl certs --key-holders ...`")
        self.spec, self.run_id, self.names, self.name = spec, run_id, list(names), name
        self.party = self.names.index(name) + 1
        self.identity, self.signers = identity, dict(signers)
        self.key_dir = Path(key_dir)

    # -- state between steps (secret, 0600) ----------------------------------------------------
    @property
    def _state_path(self) -> Path:
        return self.key_dir / STATE_FILE

    def _save(self, member: Member, box: X25519PrivateKey, dealt: bool) -> None:
        raw = box.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        data = MAGIC_STATE + wire.blob(member.to_bytes()) + raw + bytes([dealt])
        self.key_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._state_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._state_path)

    def _load(self) -> tuple[Member, X25519PrivateKey, bool]:
        try:
            data = self._state_path.read_bytes()
        except OSError as e:
            raise KeyCustodyError(f"no ceremony state in {str(self.key_dir)!r} ({e}); start "
                                  "the ceremony first (hefl keys threshold hello)") from e
        r = wire.Reader(data, "ceremony state", MAGIC_STATE)
        member = Member.from_bytes(r.blob(1 << 24))
        box = X25519PrivateKey.from_private_bytes(r.take(32))
        dealt = r.take(1) == b"\1"
        r.end()
        return member, box, dealt

    # -- the steps ---------------------------------------------------------------------------
    def start(self) -> Hello:
        """Step 1: sample this member's key share; return its signed hello."""
        if self._state_path.exists():
            raise KeyCustodyError(f"{str(self.key_dir)!r} already holds a ceremony in progress; "
                                  "finish it, or remove ceremony.state to start over")
        member, box = Member(self.spec, self.party), X25519PrivateKey.generate()
        self._save(member, box, dealt=False)
        hello = Hello(self.run_id, self.name, self.party, self.spec.fingerprint, member.nonce,
                      _raw(box.public_key()))
        return Hello(**{**hello.__dict__, "signature": self.identity.sign(_SIGNED + hello.body())})

    def transcript(self, hellos: Sequence[bytes]) -> tuple[Transcript, list[Hello]]:
        """Check every member's hello (signature, run, parameters, number) and order them."""
        parsed = {}
        for data in hellos:
            h = Hello.from_bytes(data)
            if h.name not in self.names:
                raise KeyCustodyError(f"a hello from {h.name!r}, who is not on the committee")
            if not verify(self.signers[h.name], _SIGNED + h.body(), h.signature):
                raise KeyCustodyError(f"the hello of {h.name!r} is not signed by its registered "
                                      "identity key: forged or altered in transit")
            if (h.run_id, h.fingerprint, h.party) != (
                    self.run_id, self.spec.fingerprint, self.names.index(h.name) + 1):
                raise KeyCustodyError(f"the hello of {h.name!r} is for another run, other "
                                      "parameters or another member number")
            parsed[h.name] = h
        if sorted(parsed) != sorted(self.names):
            raise KeyCustodyError(f"hellos from {sorted(parsed)}; the ceremony needs one from "
                                  f"each of {self.names}")
        ordered = [parsed[n] for n in self.names]
        return Transcript(self.spec, tuple(h.nonce for h in ordered)), ordered

    def deal(self, hellos: Sequence[bytes]) -> Deal:
        """Step 2: the public share and the sealed Shamir shares (once per ceremony)."""
        member, box, dealt = self._load()
        if dealt:
            raise KeyCustodyError("this key holder has dealt its shares already; dealing twice "
                                  "would give members inconsistent shares")
        transcript, ordered = self.transcript(hellos)
        public = poly_bytes(member.public_share(transcript))
        shares = member.deal()
        sealed = tuple(seal_share(poly_bytes(shares[i]), ordered[i - 1].box_key, self.run_id,
                                  transcript.key_id, self.party, i)
                       for i in range(1, self.spec.parties + 1))
        self._save(member, box, dealt=True)
        deal = Deal(self.run_id, self.name, self.party, transcript.key_id, public, sealed)
        return Deal(**{**deal.__dict__, "signature": self.identity.sign(_SIGNED + deal.body())})

    def finish(self, hellos: Sequence[bytes], deals: Sequence[bytes]
               ) -> tuple[PublicContext, KeyShare]:
        """Step 3: check every deal, open this member's shares; the public context and this
        member's threshold share. Deletes the ceremony state."""
        member, box, dealt = self._load()
        if not dealt:
            raise KeyCustodyError("deal this key holder's shares before finishing")
        transcript, _ = self.transcript(hellos)
        moduli, n = member.moduli, self.spec.poly_degree
        publics: dict[int, np.ndarray] = {}
        mine: dict[int, np.ndarray] = {}
        for data in deals:
            d = Deal.from_bytes(data, self.spec.parties)
            if d.name not in self.names or not verify(
                    self.signers[d.name], _SIGNED + d.body(), d.signature):
                raise KeyCustodyError(f"the deal of {d.name!r} is not signed by a registered "
                                      "key holder: forged or altered in transit")
            if (d.run_id, d.key_id, d.party) != (
                    self.run_id, transcript.key_id, self.names.index(d.name) + 1):
                raise KeyCustodyError(f"the deal of {d.name!r} belongs to another ceremony")
            publics[d.party] = poly_from(d.public_share, moduli, n, f"{d.name}'s public share")
            opened = open_share(d.sealed[self.party - 1], box, self.run_id, transcript.key_id,
                                d.party, self.party)
            mine[d.party] = poly_from(opened, moduli, n, f"the share {d.name} sealed")
        if sorted(publics) != list(range(1, self.spec.parties + 1)):
            raise KeyCustodyError(f"deals from members {sorted(publics)}; the ceremony needs "
                                  f"all {self.spec.parties}")
        result = member.finish(transcript, [publics[j] for j in sorted(publics)], mine)
        self._state_path.unlink()
        return result
