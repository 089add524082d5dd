"""Plain integer/real encodings of a weighted update into ciphertext-sized chunks (no crypto here).

Layout (both schemes): entry 0 is the client's weight, then the update, then zero padding up to a
whole number of ciphertexts of ``spec.slot_values`` entries.

BFV: value ``x`` is clipped to ``[-clip, clip]`` and stochastically rounded to ``q`` in ``[-Q, Q]``
(``E[q * clip / Q] = x``: unbiased). The lane holds ``w * (q + Q)`` (non-negative), and ``lanes``
lanes share one slot: ``slot = sum_j lane_j << (j * lane_bits)``. Sums of up to ``max_weight`` total
weight stay below ``2**lane_bits`` per lane, so lanes never carry into each other. After decryption
``sum_i w_i q_i = lane - Q * W`` exactly.

CKKS: the weighted update ``w * clip(x)`` itself, two reals per complex slot.
"""

from __future__ import annotations

import numpy as np

from hefl.crypto.spec import HeSpec


def quantize(x: np.ndarray, spec: HeSpec, rng: np.random.Generator) -> np.ndarray:
    """Unbiased stochastic rounding of clipped ``x`` to integers in [-Q, Q]."""
    q = spec.quant_max
    y = np.clip(x, -spec.clip, spec.clip) * (q / spec.clip)
    return np.clip(np.floor(y + rng.random(y.shape)), -q, q).astype(np.int64)


def pack(delta: np.ndarray, weight: int | float, spec: HeSpec,
         rng: np.random.Generator) -> np.ndarray:
    """The weighted update as ``(n_ciphertexts, slot_values)`` slot values."""
    out = np.zeros(spec.n_ciphertexts * spec.slot_values,
                   dtype=np.uint64 if spec.scheme == "bfv" else np.float64)
    if spec.scheme == "bfv":
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


def unpack(values: np.ndarray, spec: HeSpec) -> tuple[np.ndarray, float]:
    """Decrypted aggregate slots -> (weighted sum of updates, total weight)."""
    flat = np.asarray(values).reshape(-1)
    if spec.scheme == "bfv":
        flat = flat.astype(np.uint64)
        weight = int(flat[0])
        slots = flat[1 : spec.n_values]
        mask = np.uint64((1 << spec.lane_bits) - 1)
        shifts = np.arange(spec.lanes, dtype=np.uint64) * np.uint64(spec.lane_bits)
        lanes = ((slots[:, None] >> shifts) & mask).reshape(-1)[: spec.size]
        ints = lanes.astype(np.int64) - np.int64(spec.quant_max) * weight
        return ints.astype(np.float64) * (spec.clip / spec.quant_max), float(weight)
    return flat[1 : 1 + spec.size].astype(np.float64), float(flat[0])
