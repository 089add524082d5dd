"""Plain integer/real encodings of a weighted update into ciphertext-sized chunks (no crypto here).

Layout (both schemes): entry 0 is the client's weight, then the update, then zero padding up to a
whole number of ciphertexts of ``spec.slot_values`` entries.

BFV: value ``x`` is clipped to ``[-clip, clip]`` and stochastically rounded to ``q`` in ``[-Q, Q]``
(``E[q * clip / Q] = x``: unbiased). The lane holds ``w * (q + Q)`` (non-negative), and ``lanes``
lanes share one slot: ``slot = sum_j lane_j << (j * lane_bits)``. Sums of up to ``max_weight`` total
weight stay below ``2**lane_bits`` per lane, so lanes never carry into each other. After decryption
``sum_i w_i q_i = lane - Q * W`` exactly. Distributed DP puts one more slot before the update
(``HeSpec.data_start``): the client's noise share in ``DP_SHARE_UNITS``, so the decrypted sum
says how much noise it carries (``check_noise``).

CKKS: the weighted update ``w * clip(x)`` itself, two reals per complex slot.

Bounds: ``clip_update`` applies the optional L2 clip and the per-coordinate clip and counts what
it cut (``ClipStats``). ``check_range`` is the key holder's check that a decrypted aggregate is one
honest clients can produce: every BFV lane in ``[0, 2 Q W]`` (each client's lane is ``w_i (q_i +
Q)`` in ``[0, 2 Q w_i]``), every CKKS value within ``W * clip`` plus the noise margin, padding
empty, ``W <= max_weight``. It detects a client that packed more weight than it declared (or a
lane that wrapped) only when the aggregate leaves these bounds: a malicious client can still bias
the mean *within* them (no range proofs; see RoFL, Burkhalter et al. 2021, and ACORN, Bell et al.
2023, for zero-knowledge bounds on each update).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from hefl.crypto.spec import DP_SHARE_UNITS, HeSpec
from hefl.errors import CryptoError, KeyCustodyError
from hefl.privacy.mechanisms import skellam_noise

#: Relative slack on the CKKS bound ``W * clip`` for float64 rounding of the clients' products.
CKKS_REL_SLACK = 1e-9


@dataclass(frozen=True)
class ClipStats:
    """What clipping did to one update (known only to the client that encoded it).

    Attributes:
        clipped: coordinates outside ``[-clip, clip]`` (after any L2 scaling), cut to ``+-clip``.
        of: coordinates in the update.
        norm: L2 norm of the update as given, before any scaling.
        scaled: the factor the update was multiplied by, ``min(1, clip_norm / norm)``; 1.0
            without an L2 clip or when the norm was within it.
    """

    clipped: int
    of: int
    norm: float
    scaled: float = 1.0

    @property
    def changed(self) -> bool:
        """True when clipping altered the update (some value cut or the norm scaled)."""
        return self.clipped > 0 or self.scaled < 1.0


def l2_norm(x: np.ndarray) -> float:
    """Euclidean norm of finite ``x`` without overflow (rescaled by its largest magnitude)."""
    if not x.size:
        return 0.0
    flat = x.ravel()
    sq = float(np.dot(flat, flat))
    if 1e-290 < sq < 1e290:  # no overflow or underflow in the sum of squares
        return math.sqrt(sq)
    peak = float(np.max(np.abs(x)))
    if peak == 0.0:
        return 0.0
    return peak * float(np.linalg.norm(x / peak))


def clip_update(delta: np.ndarray, spec: HeSpec) -> tuple[np.ndarray, ClipStats]:
    """Scale ``delta`` to L2 norm at most ``spec.clip_norm`` (if set), then clip each value to
    ``[-clip, clip]``; return the result and what was cut.

    Only the encrypted client clips (the bounds are what makes the sum exact and checkable);
    plaintext aggregation (``hefl.aggregation.PlainAggregator``) averages updates as they are.

    Example:
        >>> from hefl.crypto.spec import bfv_spec
        >>> d, st = clip_update(np.array([3.0, 4.0, 0.1]), bfv_spec(3, clip_norm=2.5))
        >>> d.round(3).tolist(), st.clipped, round(st.norm, 3), round(st.scaled, 3)
        ([1.0, 1.0, 0.05], 2, 5.001, 0.5)
    """
    d = np.asarray(delta, dtype=np.float64)
    norm = l2_norm(d)
    scale = 1.0
    # an update already clipped to clip_norm (hefl.privacy) may exceed it by a rounding ulp
    if spec.clip_norm is not None and norm > spec.clip_norm * (1 + 1e-12):
        scale = spec.clip_norm / norm
        d = d * scale
    clipped = _count_outside(d.reshape(-1), spec.clip)
    out = np.clip(d, -spec.clip, spec.clip) if clipped else d  # no copy of an update in bounds
    return out, ClipStats(clipped=clipped, of=int(d.size), norm=norm, scaled=scale)


def _count_outside(x: np.ndarray, bound: float) -> int:
    """How many values of flat ``x`` lie outside ``[-bound, bound]`` (cache-sized chunks, no
    update-sized temporaries)."""
    n = 0
    for lo in range(0, x.size, PACK_CHUNK):
        xk = x[lo : lo + PACK_CHUNK]
        n += int(np.count_nonzero(xk > bound)) + int(np.count_nonzero(xk < -bound))
    return n


def quantize(x: np.ndarray, spec: HeSpec, rng: np.random.Generator) -> np.ndarray:
    """Unbiased stochastic rounding of clipped ``x`` to integers in [-Q, Q]."""
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    out = np.empty(flat.size, dtype=np.int64)
    for lo, y in _rounded_chunks(flat, spec, rng):
        out[lo : lo + y.size] = y
    return out.reshape(np.shape(x))


#: Values per step of ``_rounded_chunks``: two float64 buffers of this many stay in a core's
#: cache.
PACK_CHUNK = 1 << 15


def _rounded_chunks(x: np.ndarray, spec: HeSpec, rng: np.random.Generator
                    ) -> Iterator[tuple[int, np.ndarray]]:
    """``quantize`` of flat float64 ``x`` as float64 integers, one cache-sized chunk at a time
    (the offset, and a buffer reused for the next chunk), rather than passes over update-sized
    temporaries. Chunks draw the generator's uniforms in order, so the values are the
    whole-array computation's, bit for bit."""
    q = spec.quant_max
    n = min(PACK_CHUNK, x.size)
    y, u = np.empty(n), np.empty(n)
    for lo in range(0, x.size, PACK_CHUNK):
        xk = x[lo : lo + PACK_CHUNK]
        yk, uk = y[: xk.size], u[: xk.size]
        np.clip(xk, -spec.clip, spec.clip, out=yk)
        yk *= q / spec.clip
        yk += rng.random(out=uk)
        np.floor(yk, out=yk)
        np.clip(yk, -q, q, out=yk)
        yield lo, yk


def pack(delta: np.ndarray, weight: int | float, spec: HeSpec,
         rng: np.random.Generator, noise_rng: np.random.Generator | None = None,
         plain_modulus: int = 0, dp_units: int = DP_SHARE_UNITS) -> np.ndarray:
    """The weighted update as ``(n_ciphertexts, slot_values)`` slot values.

    Distributed DP (``spec.dp_mu``; weight 1): each lane is ``q + Q + dp_offset + n`` with
    ``n ~ Sk(dp_mu * dp_units / DP_SHARE_UNITS)`` from ``noise_rng`` (required then, with the
    plaintext prime ``plain_modulus``), and slot 1 holds ``dp_units`` (this client's share,
    ``dp_share_units``; at most ``DP_SHARE_UNITS``, the share for ``dp_min`` contributions). One
    client's lane may be negative; its slot is then taken mod ``t``, and the *summed* lanes are
    non-negative (see ``HeSpec.dp_offset``), so decoding is unchanged.
    """
    out = np.zeros(spec.n_ciphertexts * spec.slot_values,
                   dtype=np.uint64 if spec.scheme == "bfv" else np.float64)
    if spec.scheme == "bfv" and spec.dp_mu:
        if noise_rng is None or plain_modulus < 2:
            raise CryptoError("distributed DP packing needs the client's own noise generator "
                              "and the plaintext modulus")
        if not 1 <= dp_units <= DP_SHARE_UNITS:
            raise CryptoError(f"a noise share of {dp_units} units is outside 1..{DP_SHARE_UNITS}: "
                              "more would overflow the lanes sized for dp_min contributions")
        out[0], out[1] = 1, dp_units
        mu = spec.dp_mu * dp_units / DP_SHARE_UNITS
        slots = _noisy_slots(quantize(delta, spec, rng), spec, noise_rng, mu)
        out[2 : spec.n_values] = np.mod(slots, np.int64(plain_modulus)).astype(np.uint64)
    elif spec.scheme == "bfv" and spec.lanes == 1 and spec.lane_bits <= 53:
        # one value per slot, and float64 holds every lane exactly: no lanes to shift
        out[0] = int(weight)
        _pack_lanes(np.asarray(delta, dtype=np.float64), int(weight), spec, rng,
                    out[1 : 1 + spec.size])
    elif spec.scheme == "bfv":
        w = np.uint64(int(weight))
        lanes = (quantize(delta, spec, rng) + spec.quant_max).astype(np.uint64) * w
        pad = (-lanes.size) % spec.lanes
        lanes = np.concatenate([lanes, np.zeros(pad, np.uint64)]).reshape(-1, spec.lanes)
        shifts = (np.arange(spec.lanes, dtype=np.uint64) * np.uint64(spec.lane_bits))
        out[0] = w
        out[1 : 1 + lanes.shape[0]] = np.bitwise_or.reduce(lanes << shifts, axis=1)
    else:
        out[0] = float(weight)
        out[1 : 1 + spec.size] = np.clip(delta, -spec.clip, spec.clip) * float(weight)
    return out.reshape(spec.n_ciphertexts, spec.slot_values)


def _pack_lanes(delta: np.ndarray, weight: int, spec: HeSpec, rng: np.random.Generator,
                out: np.ndarray) -> None:
    """``out[i] = weight * (q_i + Q)`` for one value per slot (``pack``'s common case), each
    chunk of the rounding turned into lanes while it is in cache."""
    for lo, y in _rounded_chunks(delta, spec, rng):
        y += spec.quant_max
        y *= weight
        out[lo : lo + y.size] = y


def _noisy_slots(q: np.ndarray, spec: HeSpec, noise_rng: np.random.Generator,
                 mu: float) -> np.ndarray:
    """Signed int64 slots ``sum_j lane_j 2**(j lane_bits)`` of the noisy lanes (weight 1):
    exact, since ``lanes * lane_bits <= 60`` bits; a negative lane borrows from the one above."""
    lanes = q + (spec.quant_max + spec.dp_offset) + skellam_noise(noise_rng, q.size, mu)
    pad = (-lanes.size) % spec.lanes
    lanes = np.concatenate([lanes, np.zeros(pad, np.int64)]).reshape(-1, spec.lanes)
    weights = np.int64(1) << (np.arange(spec.lanes, dtype=np.int64) * spec.lane_bits)
    return (lanes * weights).sum(axis=1)


def _lanes(flat: np.ndarray, spec: HeSpec) -> np.ndarray:
    """All BFV lanes of the update slots (``data_start .. n_values``), padding included (a new
    array, never a view of ``flat``)."""
    slots = flat[spec.data_start : spec.n_values]
    mask = np.uint64((1 << spec.lane_bits) - 1)
    if spec.lanes == 1:  # one lane per slot: no shifted copy
        return slots & mask
    shifts = np.arange(spec.lanes, dtype=np.uint64) * np.uint64(spec.lane_bits)
    return ((slots[:, None] >> shifts) & mask).reshape(-1)


def unpack(values: np.ndarray, spec: HeSpec) -> tuple[np.ndarray, float]:
    """Decrypted aggregate slots -> (weighted sum of updates, total weight)."""
    flat = np.asarray(values).reshape(-1)
    if spec.scheme == "bfv":
        flat = flat.astype(np.uint64, copy=False)
        weight = int(flat[0])
        # in place where it can be: each temporary of a large model is a fresh, faulted mapping
        ints = _lanes(flat, spec)[: spec.size].view(np.int64)  # a fresh array; lanes < 2**63
        ints -= np.int64(spec.quant_max + spec.dp_offset) * weight
        out = ints.astype(np.float64)
        out *= spec.clip / spec.quant_max
        return out, float(weight)
    return flat[1 : 1 + spec.size].astype(np.float64), float(flat[0])


def check_range(spec: HeSpec, values: np.ndarray) -> None:
    """Refuse decrypted aggregate slots that no set of honest clients within the spec produces.

    BFV: total weight ``W <= max_weight``; every lane ``<= 2 Q W`` (lanes are non-negative by
    construction); padding lanes, unused slots and the bits above the top lane all zero (a lane
    that wrapped past ``2**lane_bits`` carries into the next lane or those bits, and is caught
    when that breaks a bound). CKKS: ``W <= max_weight`` and every ``|value| <= W clip`` (the
    padding ``~0``), each up to the noise margin ``error_bound * max(W, 1) * (1 + clip)``: the
    decrypted sum and weight are each off by at most ``error_bound * max(W, 1)``.

    Raises:
        CryptoError: the aggregate is out of range, with how many coordinates and what it means.
    """
    flat = np.asarray(values).reshape(-1)
    bfv = spec.scheme == "bfv"
    if bfv:
        flat = flat.astype(np.uint64, copy=False)
    weight: float = int(flat[0]) if bfv else float(flat[0])
    margin = 0.0 if bfv else spec.error_bound * max(abs(weight), 1.0) * (1.0 + spec.clip)
    limit = spec.max_weight if bfv else spec.max_weight * (1.0 + CKKS_REL_SLACK) + margin
    if weight > limit:
        raise CryptoError(
            f"total weight {weight:g} exceeds the supported bound {spec.max_weight}; the sum may "
            "have overflowed and is discarded: rebuild with a larger max_weight"
        )
    bad, stray, what = _bfv_outliers(spec, flat) if bfv else _ckks_outliers(spec, flat, margin)
    if bad or stray:
        raise CryptoError(
            f"aggregate out of range: {bad} of {spec.size} coordinates lie outside {what} for "
            f"total weight W={weight:g}"
            + (f", and {stray} padding values are not empty" if stray else "")
            + ". Honest clients cannot produce this: a client packed more weight than it "
            "declared or values beyond clip, or a lane wrapped. The aggregate is discarded; "
            "rerun the round, and if it recurs find the client by leaving contributors out "
            "(updates carry no range proof)"
        )


def check_noise(spec: HeSpec, values: np.ndarray) -> None:
    """Distributed DP: refuse a decrypted sum whose clients' noise shares (slot 1, summed in
    the ciphertext) add up to less than the planned ``Sk(dp_mu * dp_min)``: its clients were
    told of more contributions than it holds. No-op without ``spec.dp_mu``.

    Raises:
        KeyCustodyError: less noise than planned (the sum must not be released).
        CryptoError: more share units than its contributions can write (a malformed client).
    """
    if not spec.dp_mu:
        return
    flat = np.asarray(values).reshape(-1).astype(np.uint64)
    weight, units = int(flat[0]), int(flat[1])
    if units > weight * DP_SHARE_UNITS:
        raise CryptoError(f"the noise-share slot holds {units} units, more than {weight} "
                          f"contributions of at most {DP_SHARE_UNITS} can write; discarded")
    need = DP_SHARE_UNITS * spec.dp_min
    if units < need:
        raise KeyCustodyError(
            f"the decrypted sum carries {units / DP_SHARE_UNITS:.2f} of the {spec.dp_min} "
            f"planned contributions' worth of distributed DP noise ({weight} summed): its "
            "clients were told more would contribute than it holds (a server that announced a "
            "larger round than it summed, or clients lost after the announcement); it is not "
            "released")


def _bfv_outliers(spec: HeSpec, flat: np.ndarray) -> tuple[int, int, str]:
    """(lanes above ``2 Q W``, non-empty padding, the bound in words) for uint64 slots whose
    weight (``flat[0]``) is already known to be at most ``max_weight``."""
    bound = 2 * (spec.quant_max + spec.dp_offset) * int(flat[0])  # < 2**lane_bits (W bounded)
    lanes = _lanes(flat, spec)
    top = np.uint64(spec.lanes * spec.lane_bits)
    bad = int(np.count_nonzero(lanes[: spec.size] > np.uint64(bound)))
    stray = int(np.count_nonzero(lanes[spec.size :]) + np.count_nonzero(flat[spec.n_values :])
                + np.count_nonzero(flat[spec.data_start : spec.n_values] >= np.uint64(1) << top))
    q = f"Q={spec.quant_max}" + (f", DP offset {spec.dp_offset}" if spec.dp_offset else "")
    return bad, stray, f"[0, 2*Q*W] = [0, {bound}] ({q})"


def _ckks_outliers(spec: HeSpec, flat: np.ndarray, margin: float) -> tuple[int, int, str]:
    """(values beyond ``W clip`` + margin, padding beyond the margin, the bound in words)."""
    bound = max(float(flat[0]), 0.0) * spec.clip * (1.0 + CKKS_REL_SLACK) + margin
    bad = int(np.count_nonzero(np.abs(flat[1 : 1 + spec.size]) > bound))
    stray = int(np.count_nonzero(np.abs(flat[1 + spec.size :]) > margin))
    return bad, stray, f"[-W*clip, W*clip] = +-{bound:.6g} (noise margin {margin:.3g})"
