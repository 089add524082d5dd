"""Threshold keys: any ``t`` of ``n`` key holders decrypt together; no party holds the key.

The protocol is that of Mouchet, Troncoso-Pastoriza, Bossuat & Hubaux, "Multiparty Homomorphic
Encryption from Ring-Learning-with-Errors" (PoPETs 2021; Lattigo's ``multiparty`` package), with
t-out-of-n access by Shamir-sharing each party's key share (Asharov, Jain, Lopez-Alt, Tromer,
Vaikuntanathan & Wichs, EUROCRYPT 2012; Lattigo ``multiparty/threshold.go``). Ring elements are
kept in SEAL's NTT form, residue by residue (``Seal.polys``); SEAL samples every key, error and
common polynomial and does every transform and product of the hot path. What is written here is
the protocol's own arithmetic: additions, Shamir evaluations and Lagrange weights mod each prime.

Key generation (no dealer; members are numbered 1..n; ``threshold_ceremony`` runs it in-process)
    1. ``Member(spec, j)``: SEAL's ``KeyGenerator`` samples member j's ternary share ``s_j`` and,
       with its own public key ``(-a_j s_j + e_j, a_j)``, an error ``e_j``. It draws a 32-byte
       ``nonce``.
    2. ``Transcript(spec, nonces)``: public. The common reference polynomial ``a`` is drawn by
       SEAL's SHAKE-256 PRNG seeded with SHA-512 of the parameters and every nonce
       (``Seal.uniform_polynomial``), so no single party (nor the relaying server) chooses it;
       each member checks that its own nonce is in the transcript.
    3. ``Member.public_share``: ``p_j = -a s_j + e_j``, computed as
       ``(-a_j s_j + e_j) + (a_j - a) s_j`` (Mouchet et al., Protocol 1, "CKG").
       ``collective_public_key``: ``pk = (sum_j p_j, a)``, a public key for ``s = sum_j s_j``.
    4. ``Member.deal``: ``f_j(X) = s_j + r_1 X + ... + r_{t-1} X^{t-1}`` with uniform ``r_k``
       (from ``os.urandom``); member i receives ``f_j(i)``, secretly. ``Member.finish`` sums what
       it received into its threshold share ``sigma_i = sum_j f_j(i)``, a point of
       ``F(X) = sum_j f_j(X)`` with ``F(0) = s``; ``s_j`` and the ``f_j`` are then dropped.

Decryption of ``ct = (c0, c1)`` by a set ``T`` of ``t`` members (``partial_decrypt``, ``fuse``)
    Member i in ``T`` returns ``h_i = c1 * lambda_i sigma_i + z_i`` with the Lagrange weight
    ``lambda_i = prod_{m in T, m != i} m / (m - i)`` (mod each prime) and fresh Gaussian flooding
    noise ``z_i`` of deviation ``spec.flood_std`` (``hefl.crypto.flooding``: it hides the
    ciphertext noise, which carries terms in ``s``; Mouchet et al.'s "smudging"). One honest
    member's noise suffices, so each partial carries all of it. Then ``c0 + sum_T h_i =
    Delta m + e + sum z_i`` and SEAL decodes it (``Seal.decrypt_shifted``; BFV rounds it
    exactly while ``spec.decryption_noise_bound < Delta/2``, which ``bfv_spec`` guarantees).

What this does not give: members' partials are not proven correct (no zero-knowledge proofs), so
a member can spoil a decryption. Garbage fails the range checks and the committee names it by
trying other subsets (``hefl.crypto.secure_sum.Committee``); a small, in-range shift cannot be
detected. Shamir shares are not verifiable either: a member that deals inconsistent shares makes
decryption fail (a denial of service, not a leak).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hefl.crypto import wire
from hefl.crypto.flooding import gaussian
from hefl.crypto.keys import Ceremony, KeyShare, PublicContext
from hefl.crypto.seal import Seal
from hefl.crypto.spec import HeSpec
from hefl.errors import ConfigError, ContextMismatch, KeyCustodyError

NONCE_BYTES = 32
MAGIC_PARTIAL = b"HEFLPAR1"
MAGIC_MEMBER = b"HEFLMEM1"


def poly_bytes(x: np.ndarray) -> bytes:
    """Residues as little-endian uint64 (the wire form of polynomials here)."""
    return np.ascontiguousarray(x, dtype="<u8").tobytes()


def poly_from(data: bytes, moduli: Sequence[int], n: int, what: str) -> np.ndarray:
    """Inverse of ``poly_bytes`` for one polynomial (primes, N); checks size and range.

    Raises:
        ContextMismatch: the wrong size, or residues beyond the modulus.
    """
    if len(data) != 8 * len(moduli) * n:
        raise ContextMismatch(f"{what} has {len(data)} bytes, expected {8 * len(moduli) * n}")
    x = np.frombuffer(data, dtype="<u8").reshape(len(moduli), n).astype(np.uint64)
    if (x >= _col(moduli)).any():
        raise ContextMismatch(f"{what} holds residues beyond the modulus")
    return x


# -- arithmetic mod each prime (arrays of shape (primes, N), residues as uint64) -------------
def _col(moduli: Sequence[int]) -> np.ndarray:
    return np.array(moduli, dtype=np.uint64)[:, None]


def _add(x: np.ndarray, y: np.ndarray, moduli: Sequence[int]) -> np.ndarray:
    return (x + y) % _col(moduli)  # residues < 2**60: the sum fits in 64 bits


def _sub(x: np.ndarray, y: np.ndarray, moduli: Sequence[int]) -> np.ndarray:
    q = _col(moduli)
    return (x + (q - y)) % q


def _mul(x: np.ndarray, y: np.ndarray | Sequence[int], moduli: Sequence[int]) -> np.ndarray:
    """Pointwise product mod each prime (``y`` an array, or one integer per prime), exact in
    Python integers: used once per key or per decrypting set, never per ciphertext."""
    q = np.array([[int(m)] for m in moduli], dtype=object)
    yy = np.array(y, dtype=object).reshape(len(moduli), -1) if not isinstance(y, np.ndarray) \
        else y.astype(object)
    return ((x.astype(object) * yy) % q).astype(np.uint64)


def _uniform(moduli: Sequence[int], n: int) -> np.ndarray:
    """Uniform residues (primes, n) from the OS CSPRNG: 128 random bits reduced mod each prime
    (bias below 2**-68)."""
    words = np.frombuffer(os.urandom(16 * len(moduli) * n), dtype=np.uint64)
    hi = words[0::2].reshape(len(moduli), n).astype(object)
    lo = words[1::2].reshape(len(moduli), n).astype(object)
    q = np.array([[int(m)] for m in moduli], dtype=object)
    return ((hi * 2**64 + lo) % q).astype(np.uint64)


def lagrange(party: int, members: Sequence[int], moduli: Sequence[int]) -> list[int]:
    """``lambda_party = prod_{m != party} m / (m - party)`` for interpolating at 0, mod each
    prime (all primes exceed the member numbers, so every difference is invertible)."""
    out = []
    for q in moduli:
        num, den = 1, 1
        for m in members:
            if m != party:
                num = num * m % q
                den = den * (m - party) % q
        out.append(num * pow(den, -1, q) % q)
    return out


# -- key generation ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Transcript:
    """The public record of a key ceremony: parameters and every member's nonce (member j's
    at index j-1). It fixes the common polynomial and the key id."""

    spec: HeSpec
    nonces: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if len(self.nonces) != self.spec.parties or any(
            len(n) != NONCE_BYTES for n in self.nonces
        ):
            raise KeyCustodyError(
                f"a ceremony transcript needs one {NONCE_BYTES}-byte nonce per key holder "
                f"({self.spec.parties}), got {len(self.nonces)}"
            )
        if len(set(self.nonces)) != len(self.nonces):
            raise KeyCustodyError("two key holders sent the same nonce; restart the ceremony")

    def _digest(self, label: bytes) -> bytes:
        h = hashlib.sha512(label + self.spec.to_bytes())
        for n in self.nonces:
            h.update(n)
        return h.digest()

    @property
    def seed(self) -> bytes:
        """64 bytes seeding SEAL's PRNG for the common polynomial."""
        return self._digest(b"hefl threshold crs v1\0")

    @property
    def key_id(self) -> bytes:
        return self._digest(b"hefl threshold key id v1\0")[:16]


class Member:
    """One key holder during the ceremony (secret state: its share ``s_j`` of the key)."""

    def __init__(self, spec: HeSpec, party: int) -> None:
        if not spec.parties:
            raise ConfigError("these HE parameters name no threshold committee (parties=0)")
        if not 1 <= party <= spec.parties:
            raise KeyCustodyError(f"key holder number {party} is not in 1..{spec.parties}")
        self.spec = spec
        self.party = party
        self.seal = Seal.of(spec)
        self.moduli = self.seal.key_moduli
        sk, pk = self.seal.keygen()
        own = self.seal.polys(pk.data(), 2)  # (-a_j s_j + e_j, a_j): SEAL's error e_j
        self._s = self.seal.secret_key_polys(sk)
        self._own = own
        self.nonce = secrets.token_bytes(NONCE_BYTES)

    def to_bytes(self) -> bytes:
        """Secret: this member's ceremony state (its key share), to resume a later step."""
        return (MAGIC_MEMBER + wire.blob(self.spec.to_bytes()) + wire.u32(self.party)
                + self.nonce + wire.blob(poly_bytes(self._s)) + wire.blob(poly_bytes(self._own)))

    @classmethod
    def from_bytes(cls, data: bytes) -> Member:
        r = wire.Reader(data, "ceremony state", MAGIC_MEMBER)
        spec = HeSpec.from_bytes(r.blob(1 << 16))
        member = cls.__new__(cls)
        member.spec, member.party = spec, r.u32()
        member.nonce = r.take(NONCE_BYTES)
        member.seal = Seal.of(spec)
        member.moduli = member.seal.key_moduli
        k, n = len(member.moduli), spec.poly_degree
        member._s = poly_from(r.blob(8 * k * n), member.moduli, n, "ceremony state")
        own = np.frombuffer(r.blob(16 * k * n), dtype="<u8").reshape(2, k, n)
        member._own = own.astype(np.uint64)
        r.end()
        return member

    def __repr__(self) -> str:
        return f"Member(party={self.party} of {self.spec.parties})"

    def _check(self, transcript: Transcript) -> None:
        if transcript.spec != self.spec:
            raise KeyCustodyError("the ceremony transcript names other HE parameters")
        if transcript.nonces[self.party - 1] != self.nonce:
            raise KeyCustodyError(
                f"the ceremony transcript does not hold key holder {self.party}'s nonce: the "
                "common polynomial was not derived from its contribution; refuse this key"
            )

    def public_share(self, transcript: Transcript) -> np.ndarray:
        """``p_j = -a s_j + e_j`` (NTT form, key level): public, sent to everyone."""
        self._check(transcript)
        a = self.seal.uniform_polynomial(transcript.seed)
        p0, a_own = self._own
        return _add(p0, _mul(_sub(a_own, a, self.moduli), self._s, self.moduli), self.moduli)

    def deal(self) -> dict[int, np.ndarray]:
        """Shamir shares ``f_j(i)`` of ``s_j`` for every member i (secret: member i's only)."""
        n, t = self.spec.parties, self.spec.threshold
        size = self.spec.poly_degree
        coeffs = [_uniform(self.moduli, size) for _ in range(t - 1)]
        out = {}
        for i in range(1, n + 1):
            acc = self._s.copy()
            for k, r in enumerate(coeffs, start=1):
                acc = _add(acc, _mul(r, [pow(i, k, q) for q in self.moduli], self.moduli),
                           self.moduli)
            out[i] = acc
        return out

    def finish(
        self,
        transcript: Transcript,
        public_shares: Sequence[np.ndarray],
        dealt: Mapping[int, np.ndarray],
    ) -> tuple[PublicContext, KeyShare]:
        """The collective public context and this member's threshold share; forgets ``s_j``.

        Args:
            public_shares: every member's ``public_share``, member j's at index j-1.
            dealt: ``f_j(self.party)`` from every member j (its own included).
        """
        self._check(transcript)
        n = self.spec.parties
        if len(public_shares) != n or sorted(dealt) != list(range(1, n + 1)):
            raise KeyCustodyError(
                f"key holder {self.party} needs a public share and a dealt share from all {n} "
                f"key holders, got {len(public_shares)} and {len(dealt)}"
            )
        public = collective_public_key(transcript, public_shares)
        sigma = np.zeros_like(self._s)
        for share in dealt.values():
            sigma = _add(sigma, np.asarray(share, dtype=np.uint64), self.moduli)
        key = KeyShare(self.spec, public.key_id, self.seal.secret_key_from(sigma),
                       party=self.party, parties=n)
        del self._s, self._own
        return public, key


def collective_public_key(
    transcript: Transcript, public_shares: Sequence[np.ndarray]
) -> PublicContext:
    """``pk = (sum_j p_j, a)``: anyone can compute it from the public transcript and shares."""
    spec = transcript.spec
    seal = Seal.of(spec)
    moduli = seal.key_moduli
    p0 = np.zeros((len(moduli), spec.poly_degree), dtype=np.uint64)
    for p in public_shares:
        p0 = _add(p0, np.asarray(p, dtype=np.uint64), moduli)
    pk = seal.public_key_from(p0, seal.uniform_polynomial(transcript.seed))
    return PublicContext(spec, transcript.key_id, pk)


def threshold_ceremony(spec: HeSpec) -> Ceremony:
    """Run the whole ceremony in one process (simulation and tests): every member's messages
    go straight to the others. ``shares[j-1]`` is member j's; no object holds the key."""
    members = [Member(spec, j) for j in range(1, spec.parties + 1)]
    transcript = Transcript(spec, tuple(m.nonce for m in members))
    publics = [m.public_share(transcript) for m in members]
    dealt = [m.deal() for m in members]
    results = [m.finish(transcript, publics, {d_from: dealt[d_from - 1][m.party]
                                              for d_from in range(1, spec.parties + 1)})
               for m in members]
    return Ceremony(results[0][0], tuple(share for _, share in results))


# -- decryption ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ThresholdPartial:
    """Member ``party``'s partial decryption of an aggregate for the decrypting set
    ``members``: one polynomial ``c1 * lambda sigma + z`` per ciphertext (NTT form, data
    level). It reveals nothing without the other members' partials."""

    party: int
    key_id: bytes
    members: tuple[int, ...]
    values: np.ndarray = field(repr=False)

    def to_bytes(self) -> bytes:
        """Public wire form: framing, then the residues as little-endian uint64 (no pickle)."""
        return (MAGIC_PARTIAL + self.key_id + wire.u32(self.party) + wire.u32(len(self.members))
                + b"".join(wire.u32(m) for m in self.members) + wire.u32(len(self.values))
                + np.ascontiguousarray(self.values, dtype="<u8").tobytes())

    @classmethod
    def from_bytes(cls, spec: HeSpec, data: bytes) -> ThresholdPartial:
        """Parse and check a partial decryption for ``spec`` (shape, set, residues < q).

        Raises:
            UpdateRejected: not a partial decryption, truncated or oversized.
            ContextMismatch: another number of ciphertexts, or residues beyond the modulus.
            KeyCustodyError: a decrypting set that ``spec`` does not allow.
        """
        r = wire.Reader(data, "partial decryption", MAGIC_PARTIAL)
        key_id, party = r.take(16), r.u32()
        members = check_members(spec, [r.u32() for _ in range(min(r.u32(), spec.parties + 1))])
        count = r.u32()
        moduli = Seal.of(spec).coeff_moduli
        if count != spec.n_ciphertexts:
            raise ContextMismatch(f"a partial decryption of {count} ciphertexts; this "
                                  f"federation's aggregates have {spec.n_ciphertexts}")
        shape = (count, len(moduli), spec.poly_degree)
        values = np.frombuffer(r.take(8 * int(np.prod(shape))), dtype="<u8").reshape(shape)
        r.end()
        if (values >= _col(moduli)).any():
            raise ContextMismatch("a partial decryption holds residues beyond the modulus")
        if party not in members:
            raise KeyCustodyError(f"key holder {party} sent a partial for a set without it")
        return cls(party, key_id, members, values.astype(np.uint64))


def check_members(spec: HeSpec, members: Sequence[int]) -> tuple[int, ...]:
    """The decrypting set, sorted; refuses one of the wrong size or with unknown members."""
    ms = tuple(sorted(int(m) for m in members))
    if len(ms) != spec.threshold or len(set(ms)) != len(ms) or not all(
        1 <= m <= spec.parties for m in ms
    ):
        raise KeyCustodyError(
            f"a threshold decryption needs exactly {spec.threshold} distinct key holders of "
            f"1..{spec.parties}, got {list(members)}"
        )
    return ms


def partial_decrypt(
    share: KeyShare, ciphertexts: Sequence[Any], members: Sequence[int]
) -> ThresholdPartial:
    """Member step: ``c1 * lambda sigma + z`` for each ciphertext, with fresh flooding noise."""
    ms = check_members(share.spec, members)
    return ThresholdPartial(share.party, share.key_id, ms,
                            partial_values(share, partial_key(share, ms), ciphertexts))


def partial_key(share: KeyShare, members: Sequence[int]) -> Any:
    """This member's ``lambda sigma`` for the decrypting set ``members`` (an NTT-form SEAL
    plaintext; it never leaves the member)."""
    ms = check_members(share.spec, members)
    if share.party not in ms:
        raise KeyCustodyError(f"key holder {share.party} is not in the decrypting set {ms}")
    seal = share.seal
    moduli = seal.coeff_moduli
    sigma = seal.secret_key_polys(share.seal_key())[: len(moduli)]
    return seal.ntt_plaintext(_mul(sigma, lagrange(share.party, ms, moduli), moduli))


def partial_values(share: KeyShare, key: Any, ciphertexts: Sequence[Any]) -> np.ndarray:
    """``c1 * key + z`` for each ciphertext (``key`` from ``partial_key``), each with fresh
    flooding noise ``z``: the residues of a ``ThresholdPartial``."""
    seal, spec = share.seal, share.spec
    moduli = seal.coeff_moduli
    k, n = len(moduli), spec.poly_degree
    noise = gaussian((len(ciphertexts), n), spec.flood_std)
    out = np.empty((len(ciphertexts), k, n), dtype=np.uint64)
    for i, ct in enumerate(ciphertexts):
        x = seal.ntt_copy(ct)
        seal.evaluator.multiply_plain_inplace(x, key)  # (c0 lambda sigma, c1 lambda sigma)
        z = np.concatenate([np.mod(noise[i], q).astype(np.uint64) for q in moduli])
        seal.evaluator.add_inplace(x, seal._coefficient_ciphertext(x.scale, z, z))  # + (z, z)
        out[i] = seal.polys(x, 2)[1]  # only c1 lambda sigma + z leaves
    return out


def fuse(spec: HeSpec, partials: Sequence[ThresholdPartial], ciphertexts: Sequence[Any]
         ) -> np.ndarray:
    """Combine the partials of one decrypting set into the aggregate's plaintext slots.

    Raises:
        KeyCustodyError: partials of another key or set, a member missing or repeated.
        CryptoError: BFV: the fused polynomial is outside the noise budget (a garbled partial).
    """
    check_partials(spec, partials, len(ciphertexts))
    return fuse_values(Seal.of(spec), [p.values for p in partials], ciphertexts)


def check_partials(spec: HeSpec, partials: Sequence[ThresholdPartial], count: int) -> None:
    """``fuse``'s checks: the partials of one decrypting set, one key, ``count`` ciphertexts.

    Raises:
        KeyCustodyError: as ``fuse``.
    """
    if not partials:
        raise KeyCustodyError("no partial decryptions to fuse")
    ms = check_members(spec, partials[0].members)
    got = sorted(p.party for p in partials)
    key_ids = {p.key_id for p in partials}
    if got != list(ms) or any(p.members != ms for p in partials) or len(key_ids) != 1:
        raise KeyCustodyError(
            f"the partial decryptions do not form one decrypting set: members {got} for set "
            f"{list(ms)}, {len(key_ids)} key id(s)"
        )
    shape = (count, len(Seal.of(spec).coeff_moduli), spec.poly_degree)
    if any(p.values.shape != shape for p in partials):
        raise KeyCustodyError(f"a partial decryption does not have the shape {shape}")


def fuse_values(seal: Seal, values: Sequence[np.ndarray], ciphertexts: Sequence[Any]
                ) -> np.ndarray:
    """The plaintext slots of ``ciphertexts`` from the members' partial residues ``values``
    (checked by ``check_partials``): ``c0 + sum`` of the partials, decoded by SEAL.

    Raises:
        CryptoError: BFV: the fused polynomial is outside the noise budget (a garbled partial).
    """
    moduli = seal.coeff_moduli
    col = _col(moduli)
    slots = []
    for i, ct in enumerate(ciphertexts):
        h = values[0][i] % col
        for v in values[1:]:
            h = _add(h, v[i] % col, moduli)
        slots.append(seal.decrypt_shifted(seal.ntt_copy(ct), h))  # c0 + sum of the partials
    return np.stack(slots)
