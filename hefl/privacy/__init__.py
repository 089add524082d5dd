"""Client-level differential privacy for federated rounds (DP-FedAvg; McMahan, Ramage, Talwar &
Zhang, ICLR 2018), central or distributed under BFV, accounted with ``dp-accounting``.

    hefl.dp(epsilon=8, delta=1e-5, clip=1.0, mode="central" | "distributed")   -> DpConfig
    config.plan(num_clients, clients_per_round, rounds, size)                  -> DpPlan

``accounting`` computes epsilon, ``mechanisms`` draws the noise, ``roles`` wraps a scheme's
encoder and decoder. This package imports no HE code (``hefl.crypto`` imports it).
"""

from hefl.privacy.plan import MODES, DpConfig, DpPlan, dp

__all__ = ["MODES", "DpConfig", "DpPlan", "dp"]
