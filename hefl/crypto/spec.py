"""Public parameters of encrypted aggregation, and the layout solver that picks them.

A ``HeSpec`` is everything every party must agree on (scheme, ring degree, moduli, packing, bounds).
It is public: it is serialized as canonical JSON (never pickle) and its SHA-256 fingerprint is
stamped on every ciphertext message, so a message made under other parameters is refused on load.

Two schemes, both on Microsoft SEAL (through TenSEAL's ``sealapi`` bindings), both aggregation-only
(clients pre-multiply by their weight; the server only adds ciphertexts, so one ciphertext modulus
prime and no evaluation keys are needed):

``bfv`` (default)
    Brakerski/Fan-Vercauteren (Fan & Vercauteren, ePrint 2012/144) on *quantized* updates. Each
    value is clipped to ``[-clip, clip]`` and stochastically rounded (unbiased) to an integer in
    ``[-Q, Q]``, ``Q = 2**(bits-1) - 1``. The client multiplies it by its integer weight and packs
    ``lanes`` such integers into one plaintext value, each lane ``lane_bits`` wide, so that the sum
    of up to ``max_weight`` total weight never carries from one lane into the next. Integer sums
    are exact: the only error is the rounding, ``< clip / Q`` per coordinate of the weighted mean.
    The values are the plaintext polynomial's coefficients (``coefficients``): summing needs no
    batching slots. Large updates use N = 4096, where SEAL encrypts and decrypts more values per
    second (``LARGE_UPDATE_CIPHERTEXTS``).

``ckks``
    Cheon-Kim-Kim-Song (ASIACRYPT 2017) with both the real and the imaginary part of each slot used,
    so a ring of degree N carries N real values, like BFV with one lane. A raw CKKS decryption
    ``c0 + c1*s`` reveals the secret key to whoever holds the ciphertext (Li & Micciancio,
    EUROCRYPT 2021), so the key holder *floods* every decryption with fresh Gaussian noise sized
    for ``flood_security`` bits of statistical security over ``flood_queries`` decryptions (Li,
    Micciancio, Schultz & Sorrell, CRYPTO 2022; ``hefl.crypto.flooding``). That noise needs a large
    scale, hence N = 4096 with two data primes (92 bits) plus SEAL's 17-bit special prime: 109 bits,
    the 128-bit bound. Error: Gaussian, ``flood_std`` per value of the sum (about 1e-6).

Ciphertext cost per value is about ``coeff_bits + 4`` bits when clients hold the key (SEAL's seeded
symmetric ciphertexts: the second polynomial is replaced by a 64-byte seed) and twice that with
public-key encryption (separate key holder), divided by ``lanes``. The solver therefore picks the
*smallest* modulus that holds the noise of ``max_clients`` summed fresh ciphertexts above the
plaintext, and the most lanes that fit.

Security: the total coefficient modulus stays within the HomomorphicEncryption.org standard bound
for 128-bit classical security (N=2048: 54 bits, N=4096: 109 bits; BFV uses one prime of at most 60
bits, CKKS two data primes and a special prime), and SEAL itself re-checks this
(``sec_level_type.tc128``) whenever a context is built.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from typing import Any

from hefl.errors import ConfigError
from hefl.privacy.mechanisms import skellam_tail

SCHEMES = ("bfv", "ckks")
CUSTODY = ("clients", "keyholder", "threshold")
#: Largest threshold committee (key holders) a spec may name.
MAX_PARTIES = 32

#: HomomorphicEncryption.org 128-bit classical bound on log2(q), by ring degree N.
MAX_COEFF_BITS_128 = {2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
#: SEAL primes are at most 60 bits; BFV uses exactly one (aggregation needs no key switching),
#: CKKS as many as its flooded scale needs.
MAX_PRIME_BITS = 60
#: SEAL drops the last prime of a multi-prime modulus from the data level (its key-switching
#: "special prime"); aggregation switches no keys, so it is the smallest prime = 1 mod 2N.
SPECIAL_PRIME_BITS = 17
#: SEAL's encryption noise: a normal of standard deviation 3.2 clipped at 6 sigma (19.2); secret
#: key and public-key randomness u are ternary.
SEAL_NOISE_STD, SEAL_NOISE_MAX = 3.2, 19.2
#: Tail factor of the ciphertext-noise bound: a sub-Gaussian of parameter v exceeds 11 v with
#: probability below 2 exp(-60.5) < 2**-86 per coefficient.
NOISE_TAIL = 11.0
#: Largest flooding deviation the sampler draws exactly (rounded float64 normals keep unit
#: granularity below 2**51; see ``hefl.crypto.flooding``).
MAX_FLOOD_STD = 2.0**48
#: Bits of q above t taken by one fresh ciphertext's noise (measured with SEAL's invariant noise
#: budget at N = 2048 and 4096: symmetric ~5 bits, public-key ~11 bits) plus a 3-bit safety margin.
NOISE_BITS = {True: 8, False: 14}


@dataclass(frozen=True)
class HeSpec:
    """Public parameters shared by all parties.

    Attributes:
        scheme: ``"bfv"`` or ``"ckks"``.
        size: length of the flat update vector (number of model parameters).
        poly_degree: ring degree N.
        coeff_bits: bits of the single ciphertext-modulus prime q.
        plain_bits: bits of the BFV plaintext prime t (0 for CKKS).
        symmetric: True when clients hold the secret key and send seeded symmetric ciphertexts.
        bits: BFV quantization bits per value (values become integers in [-Q, Q]).
        lanes: values per slot (BFV lanes; 2 for CKKS: real and imaginary part).
        lane_bits: width of one BFV lane (0 for CKKS).
        scale_bits: log2 of the CKKS scale (0 for BFV).
        clip: values are clipped to [-clip, clip] before encryption.
        max_weight: largest supported total weight of one aggregate (integer for BFV).
        max_clients: largest number of contributions one aggregate may hold.
        clip_norm: when set, each client scales its update by ``min(1, clip_norm / ||delta||_2)``
            before the per-coordinate clip (the clipping DP-FedAvg needs); None: no L2 clip.
        flood_security: CKKS: statistical security s (bits) of the noise flooding that every
            decryption gets; 0 for BFV (its decryption rounds to the exact integers: no leak).
        flood_queries: CKKS: the most ciphertext decryptions one key may answer (tau); the key
            holder refuses more. The flooding deviation grows as sqrt(tau).
            Threshold keys (both schemes) flood every partial decryption with these two too.
        parties: threshold custody: the number n of key holders sharing the key (0: one key).
        threshold: threshold custody: how many of them decrypt together (t, 2 <= t <= n).
        dp_mu: distributed DP (BFV): every client adds Skellam noise ``Sk(dp_mu)`` (variance
            ``2 dp_mu``, integer units) to each quantized value; 0: none (``hefl.privacy``).
        dp_min: distributed DP: the fewest contributions the noise is sized for; an aggregate
            of fewer is never decrypted (its noise would be below plan). The planned noise of a
            sum is ``Sk(dp_mu * dp_min)``; a client told that ``m >= dp_min`` contribute adds
            its share ``m``-th of it and writes that share into the ciphertext
            (``dp_share_slot``), so whoever decrypts sees how much noise the sum carries.
        dp_std: central DP (key-holder custody, either scheme): the key holder adds Gaussian
            noise N(0, dp_std^2) (update units) to every coordinate of the decrypted sum before
            it leaves; weights must be 1 and ``clip_norm`` set. 0: none.
        coefficients: BFV: the packed values are the *coefficients* of the plaintext
            polynomial, not its batching slots. Aggregation only adds, and adding ciphertexts
            adds coefficients mod t just as it adds slots, so no batching transform is needed:
            a plaintext is loaded straight from the packed row (about 20 us at N = 2048, against
            70 us for SEAL's ``BatchEncoder`` fed a Python list) and read straight back after
            decryption. ``bfv_spec`` sets it; False (slots) only in specs made before it
            existed, which keep their fingerprint and are still decoded as they were made.

    Fields added after the first release (``clip_norm``, ``flood_*``, ...) are left out of the canonical
    bytes when unset, so specs made before they existed keep their fingerprint.
    """

    scheme: str
    size: int
    poly_degree: int
    coeff_bits: int
    plain_bits: int
    symmetric: bool
    bits: int
    lanes: int
    lane_bits: int
    scale_bits: int
    clip: float
    max_weight: int
    max_clients: int
    clip_norm: float | None = None
    flood_security: int = 0
    flood_queries: int = 0
    parties: int = 0
    threshold: int = 0
    dp_mu: float = 0.0
    dp_min: int = 0
    dp_std: float = 0.0
    coefficients: bool = False

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown HE scheme {self.scheme!r}; choose one of {SCHEMES}")
        bound = MAX_COEFF_BITS_128.get(self.poly_degree)
        if bound is None or sum(self.coeff_primes) > bound:
            raise ConfigError(
                f"coeff_bits={self.coeff_bits} at N={self.poly_degree} is not within the 128-bit "
                "security bound; lower max_clients, max_weight or bits"
            )
        if self.size < 1:
            raise ConfigError(f"size must be >= 1, got {self.size}")
        if self.coefficients and self.scheme != "bfv":
            raise ConfigError("coefficient encoding is BFV's; CKKS packs complex slots")
        _check_clip_norm(self.clip_norm)
        if self.flooded and (self.flood_security < 1 or self.flood_queries < 1):
            raise ConfigError(
                "CKKS (and any threshold key) needs noise flooding: flood_security >= 1 bits and "
                "flood_queries >= 1 (without it a decryption reveals the secret key)"
            )
        if self.parties or self.threshold:
            if not 2 <= self.threshold <= self.parties <= MAX_PARTIES:
                raise ConfigError(
                    f"threshold keys need 2 <= threshold <= key_holders <= {MAX_PARTIES}, got "
                    f"threshold={self.threshold}, key_holders={self.parties}"
                )
            if self.symmetric:
                raise ConfigError("threshold keys are public-key: clients encrypt with the "
                                  "collective public key (symmetric=False)")
        if self.dp_mu or self.dp_min:
            if self.scheme != "bfv" or self.clip_norm is None:
                raise ConfigError("distributed DP noise needs BFV's exact integer sums and an L2 "
                                  "clip (clip_norm): use scheme 'bfv' with clip_norm set")
            dp_offset(self.dp_mu, self.dp_min)
        if self.dp_std:
            if not (self.dp_std > 0 and math.isfinite(self.dp_std)) or self.clip_norm is None:
                raise ConfigError(f"central DP needs dp_std > 0 and an L2 clip (clip_norm), got "
                                  f"dp_std={self.dp_std}, clip_norm={self.clip_norm}")
            if self.symmetric or self.parties:
                raise ConfigError(
                    "central DP noise is added by the one key holder that decrypts the sum; in "
                    f"custody {'clients' if self.symmetric else 'threshold'} nobody plays that "
                    "part: use custody 'keyholder', or distributed DP (dp_mu) with BFV")

    @property
    def dp_offset(self) -> int:
        """Distributed DP: what each client adds to every lane on top of ``Q`` so that the
        summed lanes stay non-negative: ``skellam_tail(dp_min * dp_mu) / dp_min``, rounded up.
        ``W >= dp_min`` contributions carry noise ``Sk(W dp_mu)``, whose tail bound grows more
        slowly than ``W * dp_offset``, so no lane wraps except with probability below 2**-64."""
        return dp_offset(self.dp_mu, self.dp_min) if self.dp_mu else 0

    @property
    def flooded(self) -> bool:
        """Decryptions get flooding noise: CKKS (any custody) and threshold keys (any scheme)."""
        return self.scheme == "ckks" or self.parties > 0

    @property
    def coeff_primes(self) -> tuple[int, ...]:
        """Bit sizes of the primes given to SEAL: the data primes (product ``2**coeff_bits``),
        then SEAL's special prime when there is more than one."""
        k = self.n_primes
        if k == 1:
            return (self.coeff_bits,)
        base, extra = divmod(self.coeff_bits, k)
        return tuple(base + (i < extra) for i in range(k)) + (SPECIAL_PRIME_BITS,)

    @property
    def n_primes(self) -> int:
        """Primes of a ciphertext at the data level."""
        return math.ceil(self.coeff_bits / MAX_PRIME_BITS)

    # -- CKKS noise flooding -----------------------------------------------------------------
    @property
    def noise_bound(self) -> float:
        """Bound on each coefficient of the decryption error of ``max_clients`` summed fresh
        ciphertexts (the ``ct.t`` that flooding must hide).

        Symmetric: each error is SEAL's clipped normal, so at most ``19.2 * clients`` (or the
        sub-Gaussian bound if smaller). Public key: ``e1 - e_pk*u + e2*s`` sums ``2N + 1`` clipped
        normals times ternary coefficients, a sub-Gaussian of parameter ``3.2 sqrt(2N+1)`` per
        ciphertext; ``NOISE_TAIL`` times that over ``clients`` ciphertexts.

        Threshold keys: the collective key is ``s = sum s_i`` over n parties and the public key's
        error ``sum e_i``; given ``s`` and ``u``, ``e_pk*u`` is sub-Gaussian of parameter
        ``3.2 sqrt(n) ||u|| <= 3.2 sqrt(nN)`` and ``e2*s`` of ``3.2 ||s|| <= 3.2 sqrt(nN)``
        (``||s||^2`` concentrates at ``2nN/3``), so the per-ciphertext parameter is at most
        ``3.2 sqrt(n (2N+1))``. SEAL encrypts at the key level and divides by the special prime,
        which only shrinks this (plus a rounding term far below it).
        """
        c = self.max_clients
        per = 1 if self.symmetric else max(self.parties, 1) * (2 * self.poly_degree + 1)
        tail = NOISE_TAIL * SEAL_NOISE_STD * math.sqrt(c * per)
        return min(tail, SEAL_NOISE_MAX * c * per)

    @property
    def flood_std(self) -> float:
        """Deviation of the flooding noise added to each coefficient of ``c0 + c1 s`` (0: none).

        ``sqrt(12 tau) 2**(s/2) t`` for ``tau`` decryptions, ``s`` bits of statistical security
        and ciphertext noise bound ``t`` (Li, Micciancio, Schultz & Sorrell, CRYPTO 2022, as
        implemented by OpenFHE's ``NOISE_FLOODING_DECRYPT``).
        """
        if not self.flooded:
            return 0.0
        return (math.sqrt(12.0 * self.flood_queries) * 2.0 ** (self.flood_security / 2)
                * self.noise_bound)

    @property
    def value_std(self) -> float:
        """Deviation of the flooding noise on each decrypted real value (sum domain): the
        canonical embedding maps i.i.d. coefficients of deviation ``flood_std`` to real and
        imaginary slot parts of deviation ``flood_std * sqrt(N/2)``, divided by the scale."""
        return self.flood_std * math.sqrt(self.poly_degree / 2) / 2.0**self.scale_bits

    # -- geometry --------------------------------------------------------------------------
    @property
    def slot_values(self) -> int:
        """Real values one ciphertext carries (N for BFV's N slots and CKKS's N/2 complex)."""
        return self.poly_degree

    @property
    def data_start(self) -> int:
        """Index of the first update slot: after the weight and, under distributed DP, the
        slot that sums the clients' noise shares (``DP_SHARE_UNITS`` per planned client)."""
        return 2 if self.dp_mu else 1

    @property
    def n_values(self) -> int:
        """Entries of the packed vector: the weight first, then the update."""
        if self.scheme == "bfv":
            return self.data_start + math.ceil(self.size / self.lanes)
        return 1 + self.size

    @property
    def n_ciphertexts(self) -> int:
        return math.ceil(self.n_values / self.slot_values)

    @property
    def quant_max(self) -> int:
        """Q: BFV values are integers in [-Q, Q]."""
        return 2 ** (self.bits - 1) - 1

    @property
    def error_bound(self) -> float:
        """Max abs error of the weighted mean vs plaintext, for values within [-clip, clip].

        BFV: exact integer sums, so only stochastic rounding: strictly below ``clip / Q``.
        CKKS: a conservative bound on the encoding and encryption noise of ``max_clients``
        ciphertexts divided by the scale, plus 8 deviations of the flooding noise (exceeded with
        probability about 1e-15 per value); threshold keys fuse ``threshold`` flooded partials.
        """
        if self.scheme == "bfv":
            return self.clip / self.quant_max
        return (self.max_clients * self.poly_degree * 2.0**6 / 2.0**self.scale_bits
                + 8.0 * self.value_std * math.sqrt(max(self.threshold, 1)))

    @property
    def decryption_noise_bound(self) -> float:
        """Bound on each coefficient of the noise a (fused) decryption sees: the ciphertexts'
        ``noise_bound`` plus ``NOISE_TAIL`` deviations of the sum of the flooding noises."""
        floods = max(self.threshold, 1) if self.flooded else 0
        return self.noise_bound + NOISE_TAIL * math.sqrt(floods) * self.flood_std

    # -- wire ------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Canonical JSON (public; never pickle). Unset later fields are omitted."""
        fields = asdict(self)
        for name, unset in (("clip_norm", None), ("flood_security", 0), ("flood_queries", 0),
                            ("parties", 0), ("threshold", 0), ("dp_mu", 0.0), ("dp_min", 0),
                            ("dp_std", 0.0), ("coefficients", False)):
            if fields[name] == unset:
                del fields[name]
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> HeSpec:
        try:
            fields = json.loads(bytes(data).decode())
            return cls(**fields)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"not a valid HE parameter set: {e}") from e

    @cached_property
    def fingerprint(self) -> bytes:
        """16 bytes naming these parameters; stamped on every message (computed once: every
        message and every decryption checks it)."""
        return hashlib.sha256(self.to_bytes()).digest()[:16]


#: Distributed DP: a client whose share is the whole planned noise of ``dp_min`` clients' worth
#: ``1 / dp_min`` writes this many units into the share slot; a sum whose slot is below
#: ``DP_SHARE_UNITS * dp_min`` carries less noise than planned and is not released.
DP_SHARE_UNITS = 1 << 12


def dp_share_units(dp_min: int, announced: int) -> int:
    """Units of one client's noise share when ``announced >= dp_min`` clients contribute:
    ``ceil(DP_SHARE_UNITS * dp_min / announced)`` (rounded up: never less noise than planned).
    Its Skellam parameter is ``dp_mu * units / DP_SHARE_UNITS``.

    Example:
        >>> dp_share_units(72, 72), dp_share_units(72, 100), dp_share_units(72, 100) * 100 >= 4096 * 72
        (4096, 2950, True)
    """
    if announced < dp_min:
        raise ConfigError(f"distributed DP noise is sized for at least dp_min={dp_min} "
                          f"contributions, {announced} announced")
    return -(-DP_SHARE_UNITS * dp_min // announced)


def dp_offset(dp_mu: float, dp_min: int) -> int:
    """``HeSpec.dp_offset`` for these DP fields.

    Raises:
        ConfigError: ``dp_mu`` is not a positive number or ``dp_min`` < 1.
    """
    if not (dp_mu > 0 and math.isfinite(dp_mu) and int(dp_min) == dp_min and dp_min >= 1):
        raise ConfigError(f"distributed DP needs dp_mu > 0 and dp_min >= 1, got dp_mu={dp_mu}, "
                          f"dp_min={dp_min}")
    return math.ceil(skellam_tail(dp_min * dp_mu) / dp_min)


def _check_clip_norm(clip_norm: float | None) -> None:
    """Raise ``ConfigError`` unless ``clip_norm`` is None or a positive finite number."""
    if clip_norm is None:
        return
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float)) or not (
        clip_norm > 0 and math.isfinite(clip_norm)
    ):
        raise ConfigError(
            f"clip_norm must be a positive number (the largest L2 norm of one client's update) "
            f"or unset, got {clip_norm!r}"
        )


def _as_float(x: float | None) -> float | None:
    return None if x is None else float(x)


#: SEAL handles more values per second at N = 4096 than at 2048: its fixed cost per call is
#: shared by twice the coefficients (measured on 2 cores, coefficient encoding, per 2048 values:
#: seeded encryption 192 against 231 us, public-key 298 against 304 us, loading and decrypting
#: 328 against 391 us; half the objects to sum). An update of at least this many N = 2048
#: ciphertexts gets the larger ring (for fewer, a half-empty last ciphertext costs more than
#: that saves). The modulus stays the one prime the noise needs, far below N = 4096's bound.
LARGE_UPDATE_CIPHERTEXTS = 64


def _ring_for(coeff_bits: int) -> int | None:
    """Smallest ring degree whose 128-bit bound holds a single prime of ``coeff_bits``."""
    for n in (2048, 4096):
        if coeff_bits <= min(MAX_COEFF_BITS_128[n], MAX_PRIME_BITS):
            return n
    return None


def bfv_spec(
    size: int,
    *,
    symmetric: bool = True,
    bits: int = 16,
    clip: float = 1.0,
    max_weight: int = 2**16,
    max_clients: int = 128,
    lanes: int | None = None,
    clip_norm: float | None = None,
    parties: int = 0,
    threshold: int = 0,
    flood_security: int = 40,
    flood_queries: int = 2**20,
    dp_mu: float = 0.0,
    dp_min: int = 0,
) -> HeSpec:
    """The cheapest BFV parameters for these bounds.

    Lane width is ``bits + ceil(log2(max_weight))`` (a lane holds ``sum_i w_i (q_i + Q)`` <
    ``2**bits * max_weight``). The plaintext prime has ``lanes * lane_bits + 1`` bits; the
    ciphertext prime adds the noise of ``max_clients`` fresh ciphertexts. The most lanes that fit
    in one <= 60-bit prime are used (or exactly ``lanes`` if given). ``clip_norm`` (None: off)
    bounds the L2 norm of each client's update before the per-coordinate clip (see ``HeSpec``).

    Threshold keys (``parties`` key holders, any ``threshold`` of whom decrypt; public-key
    encryption only) flood every partial decryption (``flood_security``, ``flood_queries``, as
    ``ckks_spec``): the fused noise must stay below half of ``q/t``, so the ring is N = 4096 with
    two 46-bit data primes and the plaintext prime takes what the noise leaves.

    Distributed DP (``dp_mu``, ``dp_min``; weights 1) widens each lane to hold
    ``2 (Q + dp_offset)`` per contribution: the clients' Skellam noise never wraps a lane.

    Example:
        >>> s = bfv_spec(1000, bits=12, max_weight=2**9, max_clients=64)
        >>> (s.poly_degree, s.lanes, s.lane_bits, s.plain_bits, s.coeff_bits)
        (4096, 2, 21, 43, 57)
        >>> t = bfv_spec(1000, symmetric=False, parties=3, threshold=2)
        >>> (t.poly_degree, t.coeff_primes, t.lanes, t.plain_bits)
        (4096, (46, 46, 17), 1, 33)
    """
    if not 2 <= bits <= 30:
        raise ConfigError(f"bits must be in 2..30, got {bits}")
    if not (clip > 0 and math.isfinite(clip)):
        raise ConfigError(f"clip must be a positive number, got {clip}")
    if int(max_weight) != max_weight or max_weight < 1:
        raise ConfigError(f"BFV max_weight must be a positive integer, got {max_weight}")
    if max_clients < 1:
        raise ConfigError(f"max_clients must be >= 1, got {max_clients}")
    _check_clip_norm(clip_norm)
    dp: dict[str, Any] = ({"dp_mu": float(dp_mu), "dp_min": int(dp_min)} if dp_mu or dp_min
                          else {})
    offset = dp_offset(dp_mu, dp_min) if dp else 0
    lane_bits = (bits + math.ceil(math.log2(int(max_weight))) if not offset else
                 math.ceil(math.log2(2 * (2 ** (bits - 1) - 1 + offset) + 1))
                 + math.ceil(math.log2(int(max_weight))))
    # the weight slot must not wrap even when every client sends max_weight (so the key holder
    # can always tell that the bound was exceeded), and t = 1 mod 2N needs at least 18 bits
    min_plain = max(18, math.ceil(math.log2(int(max_weight) * max_clients)) + 2)
    if dp:  # nor the noise-share slot (each client writes at most DP_SHARE_UNITS)
        min_plain = max(min_plain, math.ceil(math.log2(DP_SHARE_UNITS * max_clients)) + 2)
    if parties or threshold:
        return _threshold_bfv(size, symmetric, bits, clip, max_weight, max_clients, lanes,
                              clip_norm, lane_bits, min_plain, parties, threshold,
                              flood_security, flood_queries, dp)
    noise = NOISE_BITS[symmetric] + math.ceil(math.log2(max_clients))
    choices = [lanes] if lanes else range(MAX_PRIME_BITS // lane_bits, 0, -1)
    for k in choices:
        plain_bits = max(k * lane_bits + 1, min_plain)
        coeff_bits = plain_bits + noise
        n = _ring_for(coeff_bits)
        if n is not None and k >= 1:
            spec = HeSpec("bfv", int(size), n, coeff_bits, plain_bits, symmetric, bits, k,
                          lane_bits, 0, float(clip), int(max_weight), int(max_clients),
                          _as_float(clip_norm), **dp, coefficients=True)
            if n == 2048 and spec.n_values >= LARGE_UPDATE_CIPHERTEXTS * spec.slot_values:
                spec = replace(spec, poly_degree=4096)
            return spec
    raise ConfigError(
        f"no BFV parameters at 128-bit security hold {bits}-bit values with total weight "
        f"{max_weight} over {max_clients} clients; lower bits, max_weight or max_clients"
    )


#: Threshold BFV: two data primes at N = 4096 (92 bits + SEAL's 17-bit special prime = 109).
THRESHOLD_BFV_COEFF_BITS = 92


def _threshold_bfv(size: int, symmetric: bool, bits: int, clip: float, max_weight: int,
                   max_clients: int, lanes: int | None, clip_norm: float | None, lane_bits: int,
                   min_plain: int, parties: int, threshold: int, flood_security: int,
                   flood_queries: int, dp: dict[str, Any]) -> HeSpec:
    """``bfv_spec`` for threshold keys: the most lanes whose plaintext prime leaves room for
    the fused noise (``decryption_noise_bound`` < q / 2t with a one-bit margin)."""
    q_bits = THRESHOLD_BFV_COEFF_BITS
    choices = [lanes] if lanes else range(MAX_PRIME_BITS // lane_bits, 0, -1)
    spec = None
    for k in choices:
        plain_bits = max(k * lane_bits + 1, min_plain)
        spec = HeSpec("bfv", int(size), 4096, q_bits, plain_bits, symmetric, bits, k, lane_bits,
                      0, float(clip), int(max_weight), int(max_clients), _as_float(clip_norm),
                      int(flood_security), int(flood_queries), int(parties), int(threshold),
                      **dp, coefficients=True)
        _check_flood(spec)
        if plain_bits <= MAX_PRIME_BITS and (
            plain_bits + math.log2(spec.decryption_noise_bound) + 2 <= q_bits
        ):
            return spec
    noise = math.log2(spec.decryption_noise_bound) if spec else 0.0
    raise ConfigError(
        f"threshold decryption noise 2^{noise:.1f} leaves no room in a {q_bits}-bit modulus for "
        f"{bits}-bit values with total weight {max_weight}; lower bits, max_weight, "
        "max_clients or flood_queries"
    )


def _check_flood(spec: HeSpec) -> None:
    """Refuse flooding that the sampler cannot draw or CKKS values cannot absorb."""
    too_wide = spec.flood_std > MAX_FLOOD_STD
    if too_wide or (spec.scheme == "ckks" and spec.value_std > 2.0**-12):
        raise ConfigError(
            f"noise flooding for {spec.flood_security}-bit security over {spec.flood_queries} "
            f"decryptions, {spec.max_clients} clients and {max(spec.parties, 1)} key holder(s) "
            f"needs deviation 2^{math.log2(spec.flood_std):.1f} (error {spec.value_std:.2g} per "
            "value); lower max_clients, max_weight, key_holders or flood_queries"
            + ("" if spec.scheme == "bfv" else ", or use BFV")
        )


def ckks_spec(
    size: int,
    *,
    symmetric: bool = True,
    clip: float = 1.0,
    max_weight: float = 2**16,
    max_clients: int = 128,
    coeff_bits: int = 92,
    clip_norm: float | None = None,
    flood_security: int = 40,
    flood_queries: int = 2**20,
    parties: int = 0,
    threshold: int = 0,
) -> HeSpec:
    """CKKS with complex packing (two reals per slot) and flooded decryption.

    The scale leaves room for sums up to ``max_weight * max(clip, 1)`` (the weight slot too) plus
    one sign bit and one bit of margin. ``clip_norm`` as in ``bfv_spec``. ``flood_security`` and
    ``flood_queries`` size the noise flooding (see ``HeSpec``); a key answers at most
    ``flood_queries`` ciphertext decryptions (2**20: 4,280 rounds of a 1M-parameter model).

    Example:
        >>> s = ckks_spec(1000)
        >>> (s.poly_degree, s.coeff_primes, s.scale_bits)
        (4096, (46, 46, 17), 74)
    """
    if not (clip > 0 and math.isfinite(clip)):
        raise ConfigError(f"clip must be a positive number, got {clip}")
    if not (max_weight > 0 and math.isfinite(max_weight)):
        raise ConfigError(f"max_weight must be a positive number, got {max_weight}")
    _check_clip_norm(clip_norm)
    if max_clients < 1:
        raise ConfigError(f"max_clients must be >= 1, got {max_clients}")
    n = 4096 if coeff_bits > MAX_PRIME_BITS else _ring_for(coeff_bits)
    if n is None:
        raise ConfigError(f"coeff_bits={coeff_bits} is beyond 128-bit security at N <= 4096")
    scale_bits = coeff_bits - 2 - math.ceil(math.log2(max_weight * max(clip, 1.0)))
    if scale_bits < 20:
        raise ConfigError(
            f"CKKS scale 2^{scale_bits} is too small for total weight {max_weight}; "
            "lower max_weight or raise coeff_bits"
        )
    spec = HeSpec("ckks", int(size), n, coeff_bits, 0, symmetric, 0, 2, 0, scale_bits,
                  float(clip), int(math.ceil(max_weight)), int(max_clients), _as_float(clip_norm),
                  int(flood_security), int(flood_queries), int(parties), int(threshold))
    _check_flood(spec)
    return spec
