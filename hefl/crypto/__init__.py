"""Homomorphically encrypted aggregation (the only package that imports TenSEAL).

    make_aggregator(scheme, size, custody=..., min_clients=...)   simulation bundle (Aggregator)
    EncryptingClient / SummingServer / KeyHolder                   the three party halves
    key_ceremony, PublicContext, KeyShare, partial_decrypt, fuse   key custody steps
    HeSpec, bfv_spec, ckks_spec                                     public parameters
"""

from hefl.crypto.keys import (
    Ceremony,
    KeyShare,
    PartialDecryption,
    PublicContext,
    fuse,
    key_ceremony,
    partial_decrypt,
)
from hefl.crypto.secure_sum import (
    PRESETS,
    EncryptedAggregator,
    EncryptedSum,
    EncryptedUpdate,
    EncryptingClient,
    KeyHolder,
    SummingServer,
    make_aggregator,
    make_spec,
)
from hefl.crypto.spec import CUSTODY, SCHEMES, HeSpec, bfv_spec, ckks_spec

__all__ = [
    "CUSTODY",
    "PRESETS",
    "SCHEMES",
    "Ceremony",
    "EncryptedAggregator",
    "EncryptedSum",
    "EncryptedUpdate",
    "EncryptingClient",
    "HeSpec",
    "KeyHolder",
    "KeyShare",
    "PartialDecryption",
    "PublicContext",
    "SummingServer",
    "bfv_spec",
    "ckks_spec",
    "fuse",
    "key_ceremony",
    "make_aggregator",
    "make_spec",
    "partial_decrypt",
]
