"""The NVIDIA FLARE-style baseline, for benchmarks only: TenSEAL CKKS, N=8192, coeff [60, 40, 60],
scale 2^40, public-key encryption of the raw update, the server multiplies each ciphertext by the
client's (plaintext) weight share and adds.

It implements ``hefl.aggregation.Aggregator`` so the benchmark drives it like ours, but note what it
reveals: the server sees every client's weight. Prefer ``hefl.crypto.make_aggregator``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import struct
import sys
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tenseal as ts

from hefl.aggregation import Aggregate, check_update, mean_from_sum
from hefl.errors import RoundError, UpdateRejected


@contextlib.contextmanager
def _quiet_stdout():
    """Drop what TenSEAL's C++ prints on stdout (a warning per multi-ciphertext vector), so that
    ``--json`` output stays one JSON object. C stdio is flushed before stdout is restored."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


@dataclass(frozen=True)
class BaselinePayload:
    """TenSEAL-serialized CKKS vector and the client's weight (in the clear, as NVFlare)."""

    ciphertext: bytes = field(repr=False)
    weight: float


class NvflareBaseline:
    """TenSEAL CKKS N=8192 [60, 40, 60], scale 2^40; server-side weighting."""

    def __init__(
        self,
        size: int,
        poly_degree: int = 8192,
        coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 60),
        scale_bits: int = 40,
    ) -> None:
        self.size = size
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS, poly_degree, coeff_mod_bit_sizes=list(coeff_mod_bit_sizes),
            n_threads=1,
        )
        ctx.global_scale = 2.0**scale_bits
        self._secret = ctx  # clients / key holder
        self._server = ts.context_from(ctx.serialize(save_secret_key=False), n_threads=1)

    def encode(self, client_id: Hashable, delta: np.ndarray, weight: float) -> BaselinePayload:
        d = check_update(client_id, delta, self.size, weight)
        with _quiet_stdout():  # TenSEAL prints a warning
            v = ts.ckks_vector(self._secret, d.tolist())
        return BaselinePayload(v.serialize(), float(weight))

    def aggregate(self, payloads: Mapping[Hashable, Any]) -> Aggregate:
        total_w = sum(p.weight for p in payloads.values())
        acc = None
        with _quiet_stdout():
            for p in payloads.values():
                v = ts.ckks_vector_from(self._server, p.ciphertext) * (p.weight / total_w)
                acc = v if acc is None else acc + v
            if acc is None:
                raise RoundError("no payloads to aggregate")
            total = acc.serialize()
        return Aggregate(BaselinePayload(total, total_w), tuple(payloads))

    def decode(self, aggregate: Aggregate) -> tuple[np.ndarray, float]:
        p = aggregate.payload
        with _quiet_stdout():
            v = ts.ckks_vector_from(self._secret, p.ciphertext)
        mean = np.asarray(v.decrypt(), dtype=np.float64)
        return mean_from_sum(mean * p.weight, p.weight, aggregate.count)

    def nbytes(self, payload: BaselinePayload) -> int:
        return len(self.dumps(payload))

    def dumps(self, payload: BaselinePayload) -> bytes:
        return struct.pack("<d", payload.weight) + payload.ciphertext

    def loads(self, data: bytes) -> BaselinePayload:
        if len(data) < 9:
            raise UpdateRejected("baseline payload is truncated", stage="decode")
        return BaselinePayload(bytes(data[8:]), struct.unpack("<d", data[:8])[0])
