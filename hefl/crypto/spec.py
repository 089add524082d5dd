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
    ``lanes`` such integers into one plaintext slot, each lane ``lane_bits`` wide, so that the sum
    of up to ``max_weight`` total weight never carries from one lane into the next. Integer sums
    are exact: the only error is the rounding, ``< clip / Q`` per coordinate of the weighted mean.

``ckks``
    Cheon-Kim-Kim-Song (ASIACRYPT 2017) with both the real and the imaginary part of each slot used,
    so a ring of degree N carries N real values, like BFV with one lane. Approximate: error of the
    order of ``2**-(scale_bits - 12)`` relative to the values.

Ciphertext cost per value is about ``coeff_bits + 4`` bits when clients hold the key (SEAL's seeded
symmetric ciphertexts: the second polynomial is replaced by a 64-byte seed) and twice that with
public-key encryption (separate key holder), divided by ``lanes``. The solver therefore picks the
*smallest* modulus that holds the noise of ``max_clients`` summed fresh ciphertexts above the
plaintext, and the most lanes that fit.

Security: the total coefficient modulus stays within the HomomorphicEncryption.org standard bound
for 128-bit classical security (N=2048: 54 bits, N=4096: 109 bits; one prime of at most 60 bits is
used), and SEAL itself re-checks this (``sec_level_type.tc128``) whenever a context is built.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

from hefl.errors import ConfigError

SCHEMES = ("bfv", "ckks")
CUSTODY = ("clients", "keyholder")

#: HomomorphicEncryption.org 128-bit classical bound on log2(q), by ring degree N.
MAX_COEFF_BITS_128 = {2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
#: SEAL primes are at most 60 bits; we use exactly one (aggregation needs no key switching).
MAX_PRIME_BITS = 60
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
            Left out of the canonical bytes when None, so specs made before this field existed
            keep their fingerprint.
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

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown HE scheme {self.scheme!r}; choose one of {SCHEMES}")
        bound = MAX_COEFF_BITS_128.get(self.poly_degree)
        if bound is None or self.coeff_bits > min(bound, MAX_PRIME_BITS):
            raise ConfigError(
                f"coeff_bits={self.coeff_bits} at N={self.poly_degree} is not a single prime "
                "within the 128-bit security bound; lower max_clients, max_weight or bits"
            )
        if self.size < 1:
            raise ConfigError(f"size must be >= 1, got {self.size}")
        _check_clip_norm(self.clip_norm)

    # -- geometry --------------------------------------------------------------------------
    @property
    def slot_values(self) -> int:
        """Real values one ciphertext carries (N for BFV's N slots and CKKS's N/2 complex)."""
        return self.poly_degree

    @property
    def n_values(self) -> int:
        """Entries of the packed vector: the weight first, then the update."""
        if self.scheme == "bfv":
            return 1 + math.ceil(self.size / self.lanes)
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
        ciphertexts divided by the scale (measured errors are far smaller).
        """
        if self.scheme == "bfv":
            return self.clip / self.quant_max
        return self.max_clients * self.poly_degree * 2.0**6 / 2.0**self.scale_bits

    # -- wire ------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Canonical JSON (public; never pickle). ``clip_norm`` is omitted when None."""
        fields = asdict(self)
        if fields["clip_norm"] is None:
            del fields["clip_norm"]
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> HeSpec:
        try:
            fields = json.loads(bytes(data).decode())
            return cls(**fields)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"not a valid HE parameter set: {e}") from e

    @property
    def fingerprint(self) -> bytes:
        """16 bytes naming these parameters; stamped on every message."""
        return hashlib.sha256(self.to_bytes()).digest()[:16]


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
) -> HeSpec:
    """The cheapest BFV parameters for these bounds.

    Lane width is ``bits + ceil(log2(max_weight))`` (a lane holds ``sum_i w_i (q_i + Q)`` <
    ``2**bits * max_weight``). The plaintext prime has ``lanes * lane_bits + 1`` bits; the
    ciphertext prime adds the noise of ``max_clients`` fresh ciphertexts. The most lanes that fit
    in one <= 60-bit prime are used (or exactly ``lanes`` if given). ``clip_norm`` (None: off)
    bounds the L2 norm of each client's update before the per-coordinate clip (see ``HeSpec``).

    Example:
        >>> s = bfv_spec(1000, bits=12, max_weight=2**9, max_clients=64)
        >>> (s.poly_degree, s.lanes, s.lane_bits, s.plain_bits, s.coeff_bits)
        (4096, 2, 21, 43, 57)
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
    lane_bits = bits + math.ceil(math.log2(int(max_weight)))
    # the weight slot must not wrap even when every client sends max_weight (so the key holder
    # can always tell that the bound was exceeded), and t = 1 mod 2N needs at least 18 bits
    min_plain = max(18, math.ceil(math.log2(int(max_weight) * max_clients)) + 2)
    noise = NOISE_BITS[symmetric] + math.ceil(math.log2(max_clients))
    choices = [lanes] if lanes else range(MAX_PRIME_BITS // lane_bits, 0, -1)
    for k in choices:
        plain_bits = max(k * lane_bits + 1, min_plain)
        coeff_bits = plain_bits + noise
        n = _ring_for(coeff_bits)
        if n is not None and k >= 1:
            return HeSpec("bfv", int(size), n, coeff_bits, plain_bits, symmetric, bits, k,
                          lane_bits, 0, float(clip), int(max_weight), int(max_clients),
                          _as_float(clip_norm))
    raise ConfigError(
        f"no BFV parameters at 128-bit security hold {bits}-bit values with total weight "
        f"{max_weight} over {max_clients} clients; lower bits, max_weight or max_clients"
    )


def ckks_spec(
    size: int,
    *,
    symmetric: bool = True,
    clip: float = 1.0,
    max_weight: float = 2**16,
    max_clients: int = 128,
    coeff_bits: int = 54,
    clip_norm: float | None = None,
) -> HeSpec:
    """CKKS with one prime and complex packing (two reals per slot).

    The scale leaves room for sums up to ``max_weight * max(clip, 1)`` (the weight slot too) plus
    one sign bit and one bit of margin. ``clip_norm`` as in ``bfv_spec``.

    Example:
        >>> s = ckks_spec(1000)
        >>> (s.poly_degree, s.coeff_bits, s.scale_bits)
        (2048, 54, 36)
    """
    if not (clip > 0 and math.isfinite(clip)):
        raise ConfigError(f"clip must be a positive number, got {clip}")
    if not (max_weight > 0 and math.isfinite(max_weight)):
        raise ConfigError(f"max_weight must be a positive number, got {max_weight}")
    _check_clip_norm(clip_norm)
    n = _ring_for(coeff_bits)
    if n is None:
        raise ConfigError(f"coeff_bits={coeff_bits} exceeds one 60-bit prime at 128-bit security")
    scale_bits = coeff_bits - 2 - math.ceil(math.log2(max_weight * max(clip, 1.0)))
    if scale_bits < 20:
        raise ConfigError(
            f"CKKS scale 2^{scale_bits} is too small for total weight {max_weight}; "
            "lower max_weight or raise coeff_bits"
        )
    return HeSpec("ckks", int(size), n, coeff_bits, 0, symmetric, 0, 2, 0, scale_bits,
                  float(clip), int(math.ceil(max_weight)), int(max_clients), _as_float(clip_norm))
