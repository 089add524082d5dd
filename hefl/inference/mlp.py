"""Train the polynomial-activation MLP that encrypted scoring evaluates (PyTorch, plaintext).

The activation is fixed before training (``f(z) = c2 z^2 + c1 z + c0``, softplus's Taylor
expansion by default), so the network is trained for exactly the function CKKS evaluates: there is
no approximation step and no accuracy lost to it. One hidden layer keeps the depth at three
rescales (layer 1, square, output layer). CryptoNets (Gilad-Bachrach et al., ICML 2016) used the
same idea with ``z^2``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hefl.errors import ConfigError
from hefl.inference.model import SOFTPLUS2, PolyMLP


class QuadraticActivation(nn.Module):
    """``c2 z^2 + c1 z + c0`` (fixed coefficients)."""

    def __init__(self, coeffs: tuple[float, float, float] = SOFTPLUS2) -> None:
        super().__init__()
        c2, c1, c0 = (float(c) for c in coeffs)
        self.coeffs: tuple[float, float, float] = (c2, c1, c0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c2, c1, c0 = self.coeffs
        return c2 * z * z + c1 * z + c0


def poly_mlp_module(n_in: int, hidden: int = 16,
                    coeffs: tuple[float, float, float] = SOFTPLUS2) -> nn.Sequential:
    """``Linear(n_in, hidden) -> QuadraticActivation -> Linear(hidden, 1)``."""
    return nn.Sequential(nn.Linear(n_in, hidden), QuadraticActivation(coeffs), nn.Linear(hidden, 1))


def poly_mlp_classifier(n_in: int, hidden: int = 16,
                        coeffs: tuple[float, float, float] = SOFTPLUS2) -> nn.Sequential:
    """``poly_mlp_module`` with two outputs, for training with cross-entropy over class indices
    (what ``hefl.models.TorchModel`` does): ``softmax(z0, z1)[1] = sigmoid(z1 - z0)``, so
    ``from_torch`` exports it exactly as the one-logit ``PolyMLP`` encrypted scoring evaluates."""
    return nn.Sequential(nn.Linear(n_in, hidden), QuadraticActivation(coeffs), nn.Linear(hidden, 2))


def from_torch(module: nn.Sequential) -> PolyMLP:
    """Weights of a ``poly_mlp_module`` (one logit) or ``poly_mlp_classifier`` (two: the
    difference of the class-1 and class-0 rows is the logit) as a ``PolyMLP``."""
    first, act, last = module[0], module[1], module[2]
    assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
    assert isinstance(act, QuadraticActivation)
    w2 = last.weight.detach().double().numpy()
    b2 = last.bias.detach().double().numpy()
    if w2.shape[0] == 2:
        w2, b2 = w2[1:] - w2[:1], b2[1:] - b2[:1]
    elif w2.shape[0] != 1:
        raise ConfigError(f"encrypted scoring takes binary models; this one has {w2.shape[0]} "
                          "outputs")
    return PolyMLP(
        first.weight.detach().double().numpy().copy(),
        first.bias.detach().double().numpy().copy(),
        w2.reshape(-1).copy(),
        float(b2[0]),
        act.coeffs,
    )


def train_poly_mlp(
    x: np.ndarray,
    y: np.ndarray,
    hidden: int = 16,
    epochs: int = 10,
    lr: float = 1e-2,
    batch_size: int = 256,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> PolyMLP:
    """Train a polynomial MLP with Adam on binary cross-entropy (logits), deterministically."""
    torch.manual_seed(seed)
    module = poly_mlp_module(x.shape[1], hidden)
    with torch.no_grad():  # small first layer keeps z near 0, where f is well-behaved
        first = module[0]
        assert isinstance(first, nn.Linear)
        first.weight.mul_(0.5)
    opt = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=weight_decay)
    xt = torch.as_tensor(np.asarray(x, np.float32))
    yt = torch.as_tensor(np.asarray(y, np.float32))
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for s in range(0, len(xt), batch_size):
            idx = perm[s : s + batch_size]
            opt.zero_grad()
            loss = loss_fn(module(xt[idx]).reshape(-1), yt[idx])
            loss.backward()
            opt.step()
    return from_torch(module)
