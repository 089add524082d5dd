"""Vectorized clients: one cohort's local training as one batched computation.

Each round, the sampled clients' parameters are stacked into one ``(K, P)`` tensor and every local
SGD step of all K clients is one batched computation: the K clients' losses under
``torch.func.vmap`` over ``functional_call`` of the shared module, differentiated by autograd as
one sum (the approach of pfl-research and FedJAX: clients as batched work on an accelerator). The result is the same as ``TorchModel.fit`` run client by
client (within float rounding):

- every client sees exactly its own examples, in the batch order of ``TorchModel.fit``
  (``torch.randperm(n, generator=Generator().manual_seed(config.seed))`` each epoch, last partial
  batch kept);
- a batch is padded to ``batch_size`` with a mask: padded rows contribute zero gradient and the
  loss is the mean over the real rows (tokens equal to ``ignore_index`` left out, as in
  ``TorchModel``);
- clients are sorted by their number of local steps, so step ``t`` runs only on the clients that
  still have a batch (a prefix of the stack): a client with fewer steps is simply finished, never
  moved by padding (this matters for FedProx, whose proximal term has a gradient without data);
- plain SGD ``w <- w - lr * grad``, with FedProx's ``prox_mu/2 * ||w - w_global||^2`` added.

All clients' training data are concatenated on the device once, when the runner is built; a round
costs one ``randperm`` per client and epoch (to reproduce the sequential batch order), one gather
per step and one device-to-host copy of the ``(K, P)`` result. Each client's ``FitRes.params`` is
its row of that result: the trained values in the model's dtype (float32 unless the model was
built in float64), not converted (the aggregation boundary computes the float64 delta from them).

A plain ``nn.Sequential`` of ``nn.Linear`` layers and elementwise activations (an MLP on feature
vectors, as in W1) skips vmap: its K losses are computed with one batched matrix product per
layer, which costs about half as much per step (W1 config c: ~0.5 ms instead of ~1 ms) and
yields weight gradients in the stacked weights' layout (vmap's come out transposed, which makes
the SGD update over them ~4x slower). Same losses, same gradients up to float rounding; any
other module goes through vmap.

What cannot be vectorized falls back to ``SequentialRunner`` with a ``RuntimeWarning`` saying why:
models that are not ``TorchModel`` (e.g. ``LogisticRegressionModel``), what a model's own
``cannot_vectorize()`` reports (``KerasModel`` names the Keras layer), modules with buffers
(BatchNorm running statistics) or active dropout (their sequential result depends on hidden
state or the global RNG), recurrent modules (``nn.LSTM``/``GRU``/``RNN``: torch has no vmap
batching rule for their fused kernels; with ``torch.func.grad`` vmap loops over clients inside
them, measured 6x slower than sequential on W3), client data whose shapes cannot be stacked, and
modules that ``torch.func`` cannot transform or can only loop over (checked with one probe step).
On a CPU, convolutions under vmap become grouped convolutions, slower than the sequential
backend (W2's CNN: about 2x); the vectorized backend pays off there on a GPU, and on a CPU for
small models and many small clients.

References:
    Horváth et al., "FedJAX: Federated learning simulation with JAX", 2021.
    Granqvist et al., "pfl-research: simulation framework for accelerating research in private
        federated learning", 2024.
    FedProx: Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020.

Example:
    >>> import numpy as np, torch
    >>> from hefl.data import FederatedData
    >>> from hefl.models import TorchModel
    >>> from hefl.client import FitConfig
    >>> model = TorchModel(lambda: torch.nn.Linear(2, 2))
    >>> data = FederatedData.from_indices(
    ...     np.ones((4, 2), np.float32), np.array([0, 1, 0, 1]), [[0, 1], [2, 3]])
    >>> runner = VectorizedRunner(model, data)
    >>> cfg = FitConfig(round=1, lr=0.1, epochs=1, batch_size=2)
    >>> out = runner.fit([0, 1], model.init_vector(), {0: cfg, 1: cfg})
    >>> out[0].num_examples, out[0].params.shape
    (2, (6,))
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from hefl.backends.sequential import SequentialRunner
from hefl.client import FitConfig, FitRes
from hefl.data.federated import FederatedData
from hefl.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")
_NO_BATCH_RULE = "not yet implemented the batching rule"


def resolve_device(device: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a torch device; ``"auto"``: CUDA when torch sees
    a GPU, else the CPU. ConfigError if unusable here."""
    kind = device.split(":", 1)[0]
    if kind not in DEVICES:
        raise ConfigError(f"unknown device {device!r}; choose 'auto', 'cpu' or 'cuda'")
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} requested but torch sees no CUDA GPU on this machine; "
            "use device='cpu' or install a CUDA build of torch"
        )
    return torch.device(device)


def _default_cohort(num_params: int, device: torch.device, itemsize: int = 4) -> int:
    """Clients stacked at once: each costs about 3 copies of the parameters (stacked
    parameters, gradients, autograd's saved tensors) of ``itemsize`` bytes per value."""
    budget = 1 << 30
    if device.type == "cuda":
        budget = max(budget, torch.cuda.mem_get_info(device)[0] // 4)
    return max(1, budget // (3 * itemsize * max(num_params, 1)))


def cannot_vectorize(model: Any) -> str | None:
    """Why ``model`` cannot be trained by ``VectorizedRunner``, or None if it can."""
    module = getattr(model, "module", None)
    if not isinstance(module, nn.Module) or not hasattr(model, "spec"):
        return f"{type(model).__name__} is not a TorchModel (only torch modules are vectorized)"
    own = getattr(model, "cannot_vectorize", None)  # an adapter that knows its layers (Keras)
    reason = own() if callable(own) else None
    if reason:
        return str(reason)
    if any(True for _ in module.buffers()):
        return "the module has buffers (e.g. BatchNorm statistics), which vmap cannot update"
    dropout = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
    if any(isinstance(m, dropout) and m.p > 0 for m in module.modules()):
        return "the module uses dropout, whose random masks depend on the global RNG"
    if any(isinstance(m, nn.RNNBase) for m in module.modules()):
        return (
            "torch has no vmap batching rule for the fused RNN/LSTM kernels (under autograd vmap "
            "cannot run them; under torch.func.grad it loops over clients, 6x slower than the "
            "sequential backend on W3)"
        )
    names = tuple(n for n, _ in module.named_parameters())
    if names != tuple(model.spec.names):
        return "the module's parameters do not match the model's ParamSpec"
    return None


# Parameter-free elementwise modules: applied to K clients' stacked activations they act on
# each client's own, as under vmap.
_ELEMENTWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Identity,
)


def _mlp_layers(module: nn.Module) -> list[tuple[str | None, nn.Module]] | None:
    """The layers of a plain ``nn.Sequential`` of ``nn.Linear`` and elementwise activations,
    each with its parameter-name prefix (None for an activation), or None for any other module
    (subclasses and hooked modules included: their forward may differ from the layers')."""
    if type(module) is not nn.Sequential:
        return None
    layers: list[tuple[str | None, nn.Module]] = []
    for name, m in module._modules.items():  # as forward runs them (named_children skips repeats)
        if m is None or m._forward_hooks or m._forward_pre_hooks:
            return None
        if type(m) is nn.Linear:
            if any(m is other for _, other in layers):
                return None  # a Linear applied twice: its parameters have one name only
            layers.append((name, m))
        elif type(m) in _ELEMENTWISE:
            layers.append((None, m))
        else:
            return None
    if module._forward_hooks or module._forward_pre_hooks or not any(p for p, _ in layers):
        return None
    return layers


def _batch_plan(
    sizes: Sequence[int], seeds: Sequence[int], offsets: Sequence[int], batch: int, epochs: int
) -> tuple[torch.Tensor, torch.Tensor, list[int], list[tuple[int, int]]]:
    """Gather indices and masks for every local step of K clients (already sorted by steps,
    descending): ``idx[t, k, :]`` are rows of the pooled data, ``mask`` marks the real ones
    (padding points at the client's own first row); also each client's number of steps and,
    per step, how many clients are still training and the widest real batch among them."""
    k_all = len(sizes)
    per_epoch = np.array([-(-n // batch) for n in sizes], dtype=np.int64)
    steps = (per_epoch * epochs).tolist()
    total = steps[0] if steps else 0
    gen = torch.Generator()
    perms = []
    for n, seed in zip(sizes, seeds, strict=True):
        if n == 1:  # the one permutation of one row (no generator needed)
            perms.extend([torch.zeros(1, dtype=torch.int64)] * epochs)
            continue
        gen.manual_seed(seed)  # same draws, in the same order, as TorchModel.fit
        perms.extend(torch.randperm(n, generator=gen) for _ in range(epochs))
    offs = np.asarray(offsets, dtype=np.int64)
    idx = np.empty((total, k_all, batch), dtype=np.int64)
    idx[...] = offs[None, :, None]
    mask = np.zeros((total, k_all, batch), dtype=bool)
    if perms:
        # element j of client k's epoch e goes to step e * per_epoch[k] + j // batch, slot j % batch
        lengths = np.repeat(np.asarray(sizes, dtype=np.int64), epochs)
        segment = np.repeat(np.arange(len(lengths)), lengths)
        j = np.arange(len(segment)) - (np.cumsum(lengths) - lengths)[segment]
        k, epoch = np.divmod(segment, epochs)
        t = epoch * per_epoch[k] + j // batch
        idx[t, k, j % batch] = torch.cat(perms).numpy() + offs[k]
        mask[t, k, j % batch] = True
    active = (np.asarray(steps)[None, :] > np.arange(total)[:, None]).sum(axis=1).tolist()
    # real rows come first in every padded batch: step t needs only its widest real batch
    width = mask.sum(axis=2).max(axis=1).tolist() if total else []
    return (
        torch.from_numpy(idx),
        torch.from_numpy(mask),
        steps,
        list(zip(active, width, strict=True)),
    )


class VectorizedRunner:
    """Trains a cohort of clients at once with ``torch.func`` (see the module docstring).

    Args:
        model: a ``TorchModel`` (its module's architecture; its parameters are not used).
        data: the clients' training data (and optional test splits, used by ``evaluate``).
        device: ``"auto"`` (a GPU when there is one), ``"cpu"`` or ``"cuda"`` (``"cuda:N"``)
            for the cohort's training.
        max_cohort: at most this many clients are stacked at once (bounds memory: each stacked
            client costs about 3 copies of the parameters); larger cohorts run in chunks.
            Default: as many as fit in 1 GiB of stacked parameters and gradients on the CPU, in
            a quarter of the free memory on a GPU.

    Raises:
        ConfigError: the model cannot be vectorized (``vectorized_runner`` falls back instead),
            or the device is not available.
    """

    def __init__(
        self,
        model: Any,
        data: FederatedData,
        device: str = "auto",
        max_cohort: int | None = None,
    ) -> None:
        reason = cannot_vectorize(model)
        if reason:
            raise ConfigError(f"cannot vectorize: {reason}")
        if max_cohort is not None and max_cohort < 1:
            raise ConfigError(f"max_cohort must be >= 1, got {max_cohort}")
        self.device = resolve_device(device)
        self.model = model
        self.ids = list(data.ids)
        self.spec = model.spec
        self.ignore_index = int(getattr(model, "ignore_index", -100))
        self.dtype = getattr(model, "dtype", torch.float32)
        self.module = copy.deepcopy(model.module).to(self.device).train()
        self.max_cohort = max_cohort or _default_cohort(
            self.spec.size, self.device, self.dtype.itemsize
        )
        self.sequential = SequentialRunner.over(model, data)
        self._sizes = {cid: len(d) for cid, d in data.train.items()}
        offsets = np.cumsum([0, *self._sizes.values()])
        self._offsets = dict(zip(self.ids, (int(o) for o in offsets[:-1]), strict=True))
        filled = [d for d in data.train.values() if len(d)]
        try:
            x = torch.as_tensor(np.concatenate([d.x for d in filled])).to(self.device)
            self._x = x.to(self.dtype) if x.is_floating_point() else x
            self._y = torch.as_tensor(np.concatenate([d.y for d in filled])).to(self.device)
        except ValueError as e:
            raise ConfigError(f"cannot vectorize: client data shapes differ ({e})") from e
        self._losses = vmap(self._loss, in_dims=(0, 0, 0, 0, 0, None, None))
        # an MLP on feature vectors: the same losses with batched matrix products (no vmap)
        self._mlp = _mlp_layers(self.module) if self._x.ndim == 2 and self._y.ndim == 1 else None
        self._probe()

    def _loss(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor,
        count: torch.Tensor,
        anchor: dict[str, torch.Tensor] | None,
        mu: float,
    ) -> torch.Tensor:
        """One client's batch loss: mean over its ``count`` real rows (and non-ignored tokens);
        ``y`` and ``mask`` come prepared by ``_step`` (labels left out are 0 and masked)."""
        logits = functional_call(self.module, params, (x,))
        if logits.ndim == 3:  # (batch, seq, classes) -> tokens
            logits, y, mask = logits.reshape(-1, logits.shape[-1]), y.reshape(-1), mask.reshape(-1)
        per = nn.functional.cross_entropy(logits, y, reduction="none")
        loss = (per * mask).sum() / count
        if anchor is not None:
            prox = sum(((params[k] - anchor[k]) ** 2).sum() for k in params)
            loss = loss + 0.5 * mu * prox
        return loss

    def _mlp_losses(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor,
        count: torch.Tensor,
        anchor: dict[str, torch.Tensor] | None,
        mu: float,
    ) -> torch.Tensor:
        """``vmap(_loss)`` for an MLP (``_mlp_layers``): K clients' losses with one batched
        matrix product per layer. A layer computes ``W @ h^T`` (K clients' ``(out, in)``
        weights times their ``(in, batch)`` inputs), so that autograd returns the weight
        gradients in the stacked weights' own layout (vmap returns them transposed, which
        makes the SGD update several times slower)."""
        h = x
        for prefix, layer in self._mlp or ():
            if prefix is None:
                h = layer(h)
                continue
            w, b = params[f"{prefix}.weight"], params.get(f"{prefix}.bias")
            ht = h.transpose(1, 2)
            h = (torch.bmm(w, ht) if b is None else torch.baddbmm(b[..., None], w, ht)).transpose(
                1, 2
            )
        k, width, classes = h.shape
        per = nn.functional.cross_entropy(h.reshape(-1, classes), y.reshape(-1), reduction="none")
        loss = (per.view(k, width) * mask).sum(1) / count
        if anchor is not None:
            prox = sum(((params[n] - anchor[n]) ** 2).reshape(k, -1).sum(1) for n in params)
            loss = loss + 0.5 * mu * prox
        return loss

    def _step(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor,
        anchor: dict[str, torch.Tensor] | None,
        mu: float,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-client gradients of K clients' losses, and the losses.

        The clients' losses are computed under ``vmap`` and differentiated by ordinary autograd
        as one sum: client i's loss depends only on client i's slice of the stacked parameters,
        so the gradient of the sum is, slice by slice, each client's own gradient. (The same
        cost per step as ``vmap(torch.func.grad(...))``, without the 1.6 s, 160 MiB import of
        ``torch._dynamo`` that ``torch.func.grad`` triggers on first use.) What does not depend
        on the parameters (which labels count, how many) is computed once for all K clients,
        outside ``vmap``."""
        if y.ndim > mask.ndim:  # (K, batch, seq) tokens: a padded row masks all its tokens
            mask = mask.view(*mask.shape, *([1] * (y.ndim - mask.ndim))).expand(y.shape)
        mask = mask & (y != self.ignore_index)
        safe_y = torch.where(mask, y, torch.zeros_like(y))
        count = mask.reshape(len(mask), -1).sum(1).clamp(min=1)
        leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
        batched = self._mlp_losses if self._mlp else self._losses
        losses = batched(leaves, x, safe_y, mask, count, anchor, mu)
        grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
        return list(grads), losses.detach()

    def _probe(self) -> None:
        """One step on one example: fail early if torch.func cannot transform the module, or if
        one of its ops has no batching rule (vmap would loop over clients: slower than
        sequential)."""
        if len(self._y) == 0:
            return
        p = {k: v.detach().unsqueeze(0) for k, v in self.module.named_parameters()}
        x, y = self._x[:1].unsqueeze(0), self._y[:1].unsqueeze(0)
        m = torch.ones((1, 1), dtype=torch.bool, device=self.device)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self._step(p, x, y, m, None, 0.0)
        except Exception as e:  # any failure means: not vectorizable (re-raised as ConfigError)
            raise ConfigError(f"cannot vectorize: torch.func failed on the module ({e})") from e
        slow = [str(w.message) for w in caught if _NO_BATCH_RULE in str(w.message)]
        if slow:
            raise ConfigError(f"cannot vectorize efficiently: {slow[0]}")

    def fit(
        self, ids: Sequence[Hashable], params: np.ndarray, configs: Mapping[Hashable, FitConfig]
    ) -> dict[Hashable, FitRes | Exception]:
        out: dict[Hashable, FitRes | Exception] = {}
        groups: dict[tuple, list[Hashable]] = {}
        for cid in ids:
            c = configs[cid]
            if self._sizes.get(cid, 0) == 0:
                if cid in self._sizes:
                    out[cid] = FitRes(params, 0, {})
                else:
                    out.update(self.sequential.fit([cid], params, configs))  # reports unknown id
                continue
            groups.setdefault((c.lr, c.epochs, c.batch_size, c.prox_mu), []).append(cid)
        for group in groups.values():
            group.sort(key=lambda cid: -self._sizes[cid])  # most local steps first
            for start in range(0, len(group), self.max_cohort):
                chunk = group[start : start + self.max_cohort]
                try:
                    out.update(self._fit_cohort(chunk, params, configs))
                except Exception as e:  # noqa: BLE001 - redo client by client, errors reported
                    warnings.warn(
                        f"vectorized step failed ({type(e).__name__}: {e}); running these "
                        f"{len(chunk)} clients sequentially",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    out.update(self.sequential.fit(chunk, params, configs))
        return {cid: out[cid] for cid in ids}

    def _fit_cohort(
        self, cids: list[Hashable], params: np.ndarray, configs: Mapping[Hashable, FitConfig]
    ) -> dict[Hashable, FitRes]:
        cfg = configs[cids[0]]
        sizes = [self._sizes[c] for c in cids]
        idx, mask, steps, active = _batch_plan(
            sizes,
            [configs[c].seed for c in cids],
            [self._offsets[c] for c in cids],
            cfg.batch_size,
            cfg.epochs,
        )
        idx, mask = idx.to(self.device), mask.to(self.device)
        k_all = len(cids)
        vec = self.spec.check_vector(params)
        glob = torch.as_tensor(vec, dtype=self.dtype, device=self.device)
        flat = glob.expand(k_all, -1).clone()  # (K, P): every client starts at the global model
        stacked, anchor, off = {}, {}, 0
        for name, shape, size in zip(
            self.spec.names, self.spec.shapes, self.spec.sizes, strict=True
        ):
            stacked[name] = flat[:, off : off + size].view(k_all, *shape)
            anchor[name] = glob[off : off + size].view(shape)
            off += size
        prox = anchor if cfg.prox_mu > 0 else None
        loss_sum = torch.zeros(k_all, dtype=torch.float64, device=self.device)
        names = list(stacked)
        for t, (k, width) in enumerate(active):
            rows = idx[t, :k, :width]
            live = {n: stacked[n][:k] for n in names}
            grads, loss = self._step(
                live, self._x[rows], self._y[rows], mask[t, :k, :width], prox, cfg.prox_mu
            )
            torch._foreach_add_([live[n] for n in names], grads, alpha=-cfg.lr)
            loss_sum[:k] += loss
        # the trained parameters in the model's dtype, as they are: a float64 copy of a float32
        # (K, P) costs more (in fresh memory) than the rest of a small model's round; the delta
        # is float64 anyway
        new = flat.cpu().numpy()
        losses = (loss_sum.cpu() / torch.tensor(steps, dtype=torch.float64)).tolist()
        return {cid: FitRes(new[i], sizes[i], {"loss": losses[i]}) for i, cid in enumerate(cids)}

    def evaluate(self, ids, params):
        """Each client's own test split (or its training data), client by client."""
        return self.sequential.evaluate(ids, params)


def vectorized_runner(
    model: Any, data: FederatedData, device: str = "auto", max_cohort: int | None = None
) -> VectorizedRunner | SequentialRunner:
    """A ``VectorizedRunner``, or a ``SequentialRunner`` with a RuntimeWarning saying why the
    model cannot be vectorized. An unavailable device is an error, not a fallback."""
    resolve_device(device)
    try:
        return VectorizedRunner(model, data, device=device, max_cohort=max_cohort)
    except ConfigError as e:
        warnings.warn(
            f"vectorized backend unavailable, running clients sequentially: {e}",
            RuntimeWarning,
            stacklevel=2,
        )
        return SequentialRunner.over(model, data)
