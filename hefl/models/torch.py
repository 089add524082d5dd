"""PyTorch adapter: flat vector <-> module parameters, local SGD training, evaluation.

One module instance is reused for every client (parameters are loaded from the flat vector at the
start of each fit), so simulating many clients costs no model construction.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from hefl.client import FitConfig
from hefl.data.federated import ClientData
from hefl.errors import ConfigError
from hefl.params import ParamSpec


class TorchModel:
    """Adapter around a ``torch.nn.Module`` factory.

    Args:
        factory: builds the module. Called once, after ``torch.manual_seed(seed)``, so the initial
            global model is reproducible.
        seed: seed for the initial parameters.
        ignore_index: label value left out of loss and accuracy (e.g. padding in sequences).
        device: where the module lives and trains.
        dtype: floating-point type of the parameters and of floating inputs (``torch.float32``
            by default; ``torch.float64`` to prove two code paths equal independently of the
            CPU's float32 kernels, which differ between AVX2 and AVX-512 machines).

    Example:
        >>> import torch
        >>> m = TorchModel(lambda: torch.nn.Linear(4, 3))
        >>> m.spec.size
        15
    """

    def __init__(
        self,
        factory: Callable[[], nn.Module],
        seed: int = 0,
        ignore_index: int = -100,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not dtype.is_floating_point:
            raise ConfigError(f"dtype must be a floating-point torch dtype, got {dtype}")
        torch.manual_seed(seed)
        self.factory = factory
        self.module = factory().to(device=device, dtype=dtype)
        self.device = device
        self.dtype = dtype
        self.ignore_index = ignore_index
        self._params: list[torch.Tensor] = list(self.module.parameters())
        self.spec = ParamSpec.of(
            {n: p.detach().cpu().numpy() for n, p in self.module.named_parameters()}
        )
        self._init = self.get_vector()

    def astype(self, dtype: torch.dtype) -> TorchModel:
        """This model with its parameters in ``dtype``: the same architecture and the same
        initial values (a float32 model's initial vector is exact in float64).

        Example:
            >>> m = TorchModel(lambda: torch.nn.Linear(4, 3)).astype(torch.float64)
            >>> next(m.module.parameters()).dtype
            torch.float64
        """
        if not dtype.is_floating_point:
            raise ConfigError(f"dtype must be a floating-point torch dtype, got {dtype}")
        new = copy.copy(self)
        new.module = copy.deepcopy(self.module).to(dtype=dtype)
        new.dtype = dtype
        new._params = list(new.module.parameters())
        return new

    def init_vector(self) -> np.ndarray:
        """The initial global parameters as a flat float64 vector."""
        return self._init.copy()

    def _vector_tensors(self) -> list[torch.Tensor]:
        """The tensors the flat vector holds, in its order (here: the module's parameters)."""
        return self._params

    def get_vector(self) -> np.ndarray:
        with torch.no_grad():
            flat = torch.nn.utils.parameters_to_vector(self._vector_tensors())
        return flat.detach().cpu().numpy().astype(np.float64)

    def set_vector(self, vector: np.ndarray) -> None:
        v = self.spec.check_vector(vector)
        # a copy: vector_to_parameters makes the parameters views of ``t``, and as_tensor of a
        # float64 array in float64 would share the caller's memory (training would write into it)
        t = torch.tensor(v, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(t, self._vector_tensors())

    def as_input(self, x: np.ndarray) -> torch.Tensor:
        """Features as a tensor on the model's device; floating features in the model's dtype."""
        t = torch.as_tensor(x, device=self.device)
        return t.to(self.dtype) if t.is_floating_point() else t

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the labels not equal to ``ignore_index``; 0 (and no
        gradient) for a batch whose labels are all ignored, where torch's mean would be NaN
        (0/0) and the client's reported loss with it."""
        if logits.ndim == 3:  # (batch, seq, classes) -> tokens
            logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        total = nn.functional.cross_entropy(
            logits, y, ignore_index=self.ignore_index, reduction="sum"
        )
        return total / (y != self.ignore_index).sum().clamp(min=1)

    def fit(
        self, vector: np.ndarray, data: ClientData, config: FitConfig
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Local training: ``config.epochs`` epochs of minibatch SGD, batches in the order of
        ``torch.randperm(n, generator=Generator().manual_seed(config.seed))`` each epoch (the
        last partial batch kept). FedProx adds ``prox_mu/2 * ||w - w_global||^2``."""
        self.set_vector(vector)
        x = self.as_input(data.x)
        y = torch.as_tensor(data.y, device=self.device)
        n = len(y)
        gen = torch.Generator().manual_seed(config.seed)
        params = self._params
        anchor = [p.detach().clone() for p in params] if config.prox_mu > 0 else None
        self.module.train()
        total, batches = 0.0, 0
        for _ in range(config.epochs):
            perm = torch.randperm(n, generator=gen).to(self.device)
            for start in range(0, n, config.batch_size):
                idx = perm[start : start + config.batch_size]
                for p in params:
                    p.grad = None
                loss = self._loss(self.module(x[idx]), y[idx])
                if anchor is not None:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
                    loss = loss + 0.5 * config.prox_mu * prox
                loss.backward()
                with torch.no_grad():
                    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                    torch._foreach_add_(params, grads, alpha=-config.lr)
                total += float(loss.detach())
                batches += 1
        return self.get_vector(), {"loss": total / max(batches, 1)}

    @torch.no_grad()
    def evaluate(self, vector: np.ndarray, data: ClientData, batch_size: int = 2048) -> dict:
        """Mean loss and accuracy over ``data`` (tokens equal to ``ignore_index`` left out)."""
        self.set_vector(vector)
        self.module.eval()
        loss_sum, correct, count = 0.0, 0, 0
        for start in range(0, len(data), batch_size):
            x = self.as_input(data.x[start : start + batch_size])
            y = torch.as_tensor(data.y[start : start + batch_size], device=self.device)
            logits = self.module(x)
            if logits.ndim == 3:
                logits, y = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
            mask = y != self.ignore_index
            k = int(mask.sum())
            if k == 0:
                continue
            if k < len(y):  # leave the ignored labels out (copies: only when there are some)
                logits, y = logits[mask], y[mask]
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            count += k
        return {
            "loss": loss_sum / max(count, 1),
            "accuracy": correct / max(count, 1),
            "n": count,
        }
