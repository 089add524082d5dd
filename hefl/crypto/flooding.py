"""Noise flooding for CKKS decryption: what stops a decryption from revealing the secret key.

A CKKS decryption is ``c0 + c1*s = m + e``. Whoever knows the ciphertext and the decoded result
can solve for ``s`` (Li & Micciancio, "On the security of homomorphic encryption on approximate
numbers", EUROCRYPT 2021; ``tests/test_attack_ckks_key_recovery.py`` plays it). The fix, from Li,
Micciancio, Schultz & Sorrell, "Securing approximate homomorphic encryption using differential
privacy" (CRYPTO 2022), is a randomized decryption: sample ``z`` from a Gaussian over the ring in
coefficient form and return ``c0 + c1*s + z``. With ``s`` bits of statistical security, ``tau``
decryptions and ciphertext noise bound ``t``, the deviation is ``sqrt(12 tau) 2**(s/2) t``
(OpenFHE's ``NOISE_FLOODING_DECRYPT`` uses the same formula; ``HeSpec.flood_std``).

Steps, per ciphertext of the aggregate (``flood``):
1. ``z``: N independent normals of deviation ``spec.flood_std``, rounded to integers
   (``gaussian``). Randomness comes from the operating system's CSPRNG (``os.urandom``), turned
   into normals by the Box-Muller transform in float64. Rounding a continuous Gaussian is post-
   processing, so the shift divergence of the continuous Gaussian bounds it; the deviation is
   capped at ``MAX_FLOOD_STD = 2**48`` so that float64 products keep sub-unit granularity
   (no "holes" in the support, Mironov CCS 2012).
2. ``c0 += z`` in SEAL's NTT domain (``Seal.add_to_decryption``), then SEAL decrypts as usual.

The noise is fresh per decryption, so each decryption of the same ciphertext spends one query:
the key holder's ledger answers a repeated request with the stored result (the same noise), and
refuses to decrypt beyond ``flood_queries`` ciphertexts under one key (``FloodBudget``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from hefl.crypto.seal import Seal
from hefl.crypto.spec import MAX_FLOOD_STD, HeSpec
from hefl.errors import FloodBudgetSpent


def gaussian(shape: tuple[int, ...], std: float) -> np.ndarray:
    """Integers ``round(std * g)``, ``g`` standard normal from ``os.urandom`` (Box-Muller)."""
    if not 0 < std <= MAX_FLOOD_STD:
        raise ValueError(f"flooding deviation must be in (0, 2**48], got {std!r}")
    n = int(np.prod(shape))
    half = (n + 1) // 2
    u = np.frombuffer(os.urandom(16 * half), dtype=np.uint64).reshape(2, half) >> np.uint64(11)
    u1 = (u[0].astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]: log is finite
    u2 = u[1].astype(np.float64) * 2.0**-53
    r = np.sqrt(-2.0 * np.log(u1))
    g = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]
    return np.rint(g * std).astype(np.int64).reshape(shape)


def flood(seal: Seal, ciphertexts: Sequence[Any]) -> None:
    """Add fresh flooding noise to what each ciphertext decrypts to (in place; CKKS only)."""
    spec: HeSpec = seal.spec
    if spec.scheme != "ckks" or not ciphertexts:
        return
    z = gaussian((len(ciphertexts), spec.poly_degree), spec.flood_std)
    seal.add_to_decryption(list(ciphertexts), z)


class FloodBudget:
    """Counts the ciphertext decryptions one key has answered, against ``spec.flood_queries``."""

    def __init__(self, spec: HeSpec, used: int = 0) -> None:
        self.spec = spec
        self.used = used

    def spend(self, n: int) -> None:
        """Count ``n`` more decryptions, or raise ``FloodBudgetSpent`` (nothing counted)."""
        if not self.spec.flooded:
            return
        limit = self.spec.flood_queries
        if self.used + n > limit:
            raise FloodBudgetSpent(
                f"this key has answered {self.used} ciphertext decryptions; {n} more would "
                f"exceed flood_queries={limit}, the most its noise flooding is sized for. "
                "Generate a new key set (hefl keys) to continue"
            )
        self.used += n
