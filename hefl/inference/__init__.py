"""Encrypted batch inference: score a data owner's encrypted records with a model owner's model.

    from hefl.inference import LinearModel, ModelFile, score_encrypted
    model = LinearModel.from_sklearn(est)
    logits, timing = score_encrypted(model, x)     # keys, encryption, evaluation, decryption

Serving over HTTPS (``hefl infer serve`` / ``hefl infer score``) is in ``hefl.inference.service``.
"""

from hefl.inference.engine import Timing, evaluate, new_keyring, params_for, score_encrypted
from hefl.inference.model import LinearModel, ModelFile, PolyMLP, sigmoid

__all__ = [
    "LinearModel",
    "ModelFile",
    "PolyMLP",
    "Timing",
    "evaluate",
    "new_keyring",
    "params_for",
    "score_encrypted",
    "sigmoid",
]
