"""DP-FedAvg as a wrapper around any aggregation scheme's roles (``hefl.roles``).

    DpEncoder   client: clip the update to L2 norm C, weight 1, then the scheme's own encoding
                (BFV with ``spec.dp_mu`` adds the client's Skellam noise inside it)
    DpDecoder   decrypting party: the scheme's decoding, then (central) Gaussian noise on the
                sum before it leaves, and the fixed denominator: sum / expected count

The server's ``Summer`` is not wrapped: it adds what it is given and sees nothing more.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import numpy as np

from hefl.errors import ConfigError
from hefl.privacy.mechanisms import clip_l2, gaussian_noise
from hefl.roles import Decoder, Encoder, Scheme

if TYPE_CHECKING:
    from hefl.aggregation import Aggregate
    from hefl.privacy.plan import DpPlan


class DpEncoder:
    """Client role: ``inner.encode(id, clip_l2(delta, C), 1)``."""

    def __init__(self, inner: Encoder, clip: float) -> None:
        self.inner = inner
        self.clip = clip

    def encode(self, client_id: Hashable, delta: np.ndarray, weight: float) -> Any:
        d = np.asarray(delta, dtype=np.float64)
        if np.all(np.isfinite(d)):  # a malformed delta is the inner encoder's to refuse
            d = clip_l2(d, self.clip)
        return self.inner.encode(client_id, d, 1.0)

    def begin_round(self, count: int) -> None:
        """Distributed DP: the round's announced number of contributions; the inner BFV
        client sizes its noise share for it (``EncryptingClient.expect``), so that this many
        carry exactly the planned noise whatever the Poisson sample's size."""
        expect = getattr(self.inner, "expect", None)
        if expect is not None:
            expect(count)

    def dumps(self, payload: Any) -> bytes:
        return self.inner.dumps(payload)

    def flush(self) -> None:
        """Finish the inner encoder's pending encryption (``hefl.crypto.pooled``), if any."""
        flush = getattr(self.inner, "flush", None)
        if flush is not None:
            flush()

    def abandon(self) -> None:
        abandon = getattr(self.inner, "abandon", None)
        if abandon is not None:
            abandon()

    def reseed(self, seed: int) -> None:
        self.inner.reseed(seed)


class DpDecoder:
    """Decrypting role: the mean over the *expected* count, with central noise if planned.

    Args:
        inner: the scheme's decoder (plaintext, key holder, committee).
        expected: the expected number of contributions (``clients_per_round``).
        sum_std: central: deviation of the Gaussian noise added to the decoded sum; 0 for
            distributed DP (the clients' noise is already in it).
        rng: the noise generator (default: OS entropy).
    """

    def __init__(self, inner: Decoder, expected: int, sum_std: float,
                 rng: np.random.Generator | None = None) -> None:
        self.inner = inner
        self.expected = expected
        self.sum_std = sum_std
        self.rng = rng if rng is not None else np.random.default_rng()

    def decode(self, aggregate: Aggregate) -> tuple[np.ndarray, float]:
        mean, weight = self.inner.decode(aggregate)
        total = np.asarray(mean, dtype=np.float64) * weight
        total = total + gaussian_noise(self.rng, total.size, self.sum_std)
        return total / self.expected, weight


def privatize(scheme: Scheme, plan: DpPlan, quant_step: float = 0.0,
              rng: np.random.Generator | None = None, noise: bool = True) -> Scheme:
    """``scheme`` with DP-FedAvg's client and decoder halves (``quant_step``: BFV's
    ``clip / Q``, which widens the central sensitivity by the rounding; ``noise`` False: the
    decoder inside adds the central noise itself, a key holder whose keys carry ``dp_std``)."""
    if scheme.decoder is None:
        raise ConfigError("DP needs the scheme's decoder in this process (a simulation)")
    std = plan.sum_std(quant_step) if plan.mode == "central" and noise else 0.0
    return Scheme(f"{scheme.name}+dp-{plan.mode}", DpEncoder(scheme.encoder, plan.config.clip),
                  scheme.summer, DpDecoder(scheme.decoder, plan.clients_per_round, std, rng))
