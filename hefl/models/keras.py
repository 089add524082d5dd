"""Keras 3 adapter: a Keras model on Keras's PyTorch backend, trained by ``TorchModel``'s loop.

With ``KERAS_BACKEND=torch`` a Keras 3 model *is* a ``torch.nn.Module``: its weights are
``keras.Variable`` objects wrapping ``torch.nn.Parameter`` s and its forward pass is torch
operations. ``KerasModel`` exposes that model as a small torch module (``KerasModel.module``)
whose parameters are exactly the Keras weights, in ``model.weights`` order (the order of
``model.get_weights()``), and reuses ``TorchModel``'s local training and evaluation unchanged:
the same SGD and FedProx semantics, batch order and cross-entropy.

- The flat vector is ``model.get_weights()`` flattened and concatenated, in float64. Its
  ``ParamSpec`` names are the Keras weight paths without the model's own name
  (``"conv2d/kernel"``, ``"dense/bias"``; a ``.`` becomes ``_``).
- Local SGD moves the trainable weights only. Non-trainable weights (BatchNormalization's moving
  statistics, frozen layers) are in the vector too: Keras updates the moving statistics itself
  in a training forward pass, frozen weights stay as they are, and the server aggregates them
  like any other entry (FedAvg averages the clients' statistics).
- The forward pass used for training is ``model(x, training=True)``, for evaluation
  ``model(x, training=False)``: the Keras call itself, no re-implementation.
- The model must output logits (as ``TorchModel``'s modules do), or say
  ``outputs="probabilities"`` for a model ending in a softmax (TFF's tutorials): its outputs are
  then turned into log-probabilities, whose cross-entropy is the Keras
  ``SparseCategoricalCrossentropy`` of the probabilities.
- The training loss is that cross-entropy only; a layer with a Keras regularizer is refused
  rather than trained without it.
- float64: Keras 3.15 computes float64 matrix products (``Dense``) in float32 on its torch
  backend (keras-team/keras#23704); a float64 ``KerasModel`` runs its forward pass with Keras's
  float64-to-float32 promotion entry switched off for the duration, so float64 is float64.

Vectorized backend: the module's forward reads its parameters through a
``keras.StatelessScope``, so ``torch.func.functional_call`` and ``vmap`` see a pure function of
the parameters, as for any torch module. ``KerasModel.cannot_vectorize`` names the layer when
that cannot reproduce the sequential result: non-trainable weights, random layers (Dropout,
noise), and 2-D/3-D convolutions in ``channels_last`` layout (Keras's torch convolution asks for
torch's channels-last memory format, which ``vmap`` does not support: build convolutions with
``data_format="channels_first"``, the layout of hefl's image loaders).

The backend: this module imports Keras only when a model is built (``import_keras``), after
setting ``KERAS_BACKEND=torch`` if Keras is not imported yet; Keras already imported with another
backend, or ``KERAS_BACKEND`` naming another, is a ``ConfigError``.

Files: ``load_keras(path)`` reads a ``.keras`` file with ``keras.saving.load_model(...,
safe_mode=True)`` (a zip of JSON config and HDF5 weights; never pickle), ``KerasModel.save``
writes one.

Example:
    >>> import torch
    >>> keras = import_keras()
    >>> m = KerasModel(lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="out")]))
    >>> m.spec.names, m.spec.size
    (('out/kernel', 'out/bias'), 15)
    >>> m.astype(torch.float64).get_vector().dtype
    dtype('float64')
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from hefl.errors import ConfigError
from hefl.models.torch import TorchModel
from hefl.params import ParamSpec

OUTPUTS = ("logits", "probabilities")
KERAS_MIN = (3, 5)


def import_keras() -> Any:
    """The ``keras`` module on its PyTorch backend (``KERAS_BACKEND=torch`` set first if Keras
    is not imported yet).

    Raises:
        ConfigError: Keras 3 is not installed, ``KERAS_BACKEND`` names another backend, or Keras
            was already imported with another backend.
    """
    if "keras" not in sys.modules:
        wanted = os.environ.get("KERAS_BACKEND", "torch")
        if wanted != "torch":
            raise ConfigError(
                f"KERAS_BACKEND={wanted!r}, but hefl runs Keras on its PyTorch backend; set "
                "KERAS_BACKEND=torch (or unset it) before starting Python"
            )
        os.environ["KERAS_BACKEND"] = "torch"
    try:
        import keras
    except ImportError as e:
        raise ConfigError(
            "Keras 3 is not installed; `pip install 'hefl[keras]'` (keras>=3.5) to use KerasModel"
        ) from e
    version = tuple(int(p) for p in keras.__version__.split(".")[:2] if p.isdigit())
    if version < KERAS_MIN:
        raise ConfigError(
            f"keras {keras.__version__} is installed; KerasModel needs Keras 3 (>= 3.5): "
            "`pip install 'keras>=3.5'`"
        )
    backend = keras.backend.backend()
    if backend != "torch":
        raise ConfigError(
            f"keras was imported with the {backend!r} backend before hefl; KerasModel needs its "
            "PyTorch backend: set KERAS_BACKEND=torch in the environment before anything imports "
            "keras"
        )
    return keras



def _dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.float64`` or ``"float64"`` -> ``"float64"`` (ConfigError if not floating)."""
    name = str(dtype).removeprefix("torch.")
    t = getattr(torch, name, None)
    if not isinstance(t, torch.dtype) or not t.is_floating_point:
        raise ConfigError(f"dtype must be a floating-point dtype such as float64, got {dtype}")
    return name


def _sublayers(model: Any) -> Iterator[Any]:
    """Every layer inside ``model`` (nested models' layers included), in order."""
    flatten = getattr(model, "_flatten_layers", None)
    if callable(flatten):
        yield from flatten(include_self=False, recursive=True)
        return
    for layer in getattr(model, "layers", []):  # pragma: no cover - Keras 3 has _flatten_layers
        yield layer
        yield from _sublayers(layer)


def _weight_names(model: Any) -> list[str]:
    """The Keras weight paths without the model's own name, ``.`` -> ``_`` (torch's separator)."""
    prefix = f"{model.name}/"
    names = [w.path.removeprefix(prefix).replace(".", "_") for w in model.weights]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(
            f"the Keras model has several weights named {dupes}; give its layers unique names"
        )
    return names


def _final_softmax(model: Any) -> str | None:
    """The name of the model's last layer if it applies a softmax, else None."""
    layers = getattr(model, "layers", None)
    if not layers:
        return None
    last = layers[-1]
    activation = getattr(last, "activation", None)
    if type(last).__name__ == "Softmax" or getattr(activation, "__name__", "") == "softmax":
        return str(last.name)
    return None


def _check_model(model: Any, outputs: str) -> None:
    """A built Keras model whose output and loss ``KerasModel`` trains as promised."""
    keras = import_keras()
    if not isinstance(model, keras.Model):
        raise ConfigError(
            f"expected a keras.Model (or a function building one), got {type(model).__name__}"
        )
    if not model.built or not model.weights:
        raise ConfigError(
            f"the Keras model {model.name!r} has no weights yet; start it with keras.Input(shape) "
            "or call it once on a batch before passing it to KerasModel"
        )
    if outputs not in OUTPUTS:
        raise ConfigError(f"outputs must be one of {', '.join(OUTPUTS)}, got {outputs!r}")
    softmax = _final_softmax(model)
    if outputs == "logits" and softmax:
        raise ConfigError(
            f"the model's last layer {softmax!r} applies a softmax; pass "
            "outputs='probabilities' (the loss is then the cross-entropy of those "
            "probabilities) or end the model with logits"
        )
    for layer in _sublayers(model):
        for kind in ("kernel_regularizer", "bias_regularizer", "activity_regularizer"):
            if getattr(layer, kind, None) is not None:
                raise ConfigError(
                    f"layer {layer.name!r} has a {kind}; KerasModel trains with the "
                    "cross-entropy only, so remove it (FedProx's prox_mu adds a proximal term)"
                )
    bad = [w.path for w in model.weights if not torch.is_floating_point(w.value)]
    if bad:
        raise ConfigError(f"Keras weights {bad} are not floating point; they cannot be averaged")


def _build(factory: Callable[[], Any], dtype: str | None, seed: int | None = None) -> Any:
    """``factory()`` after ``keras.utils.set_random_seed(seed)`` (unless None: a rebuild whose
    weights are overwritten), under Keras's default dtype policy ``dtype`` (restored afterwards)
    when one is given."""
    keras = import_keras()
    if seed is not None:
        keras.utils.set_random_seed(seed)
    if dtype is None:
        return factory()
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype)
    try:
        return factory()
    finally:
        keras.config.set_dtype_policy(old)


def _clone(model: Any, dtype: str) -> Any:
    """A fresh copy of a Sequential or Functional model's architecture with its layers in
    ``dtype`` (weights not copied)."""
    keras = import_keras()

    def layer_in(layer: Any) -> Any:
        config = layer.get_config()
        if not isinstance(layer, keras.layers.InputLayer) and "dtype" in config:
            config["dtype"] = dtype
        return layer.__class__.from_config(config)

    try:
        return keras.models.clone_model(model, clone_function=layer_in)
    except Exception as e:  # any failure (re-raised): the model cannot be rebuilt this way
        raise ConfigError(
            f"cannot rebuild the Keras model {model.name!r} in {dtype} ({e}); pass a function "
            "that builds it instead, e.g. KerasModel(make_model, dtype=...)"
        ) from e


def _arrays(model: Any) -> list[np.ndarray]:
    """``model.get_weights()``, read from the torch tensors directly."""
    return [w.value.detach().cpu().numpy() for w in model.weights]


def _check_dtype(model: Any, dtype: str) -> None:
    wrong = [f"{w.path} ({w.dtype})" for w in model.weights if w.dtype != dtype]
    if wrong:
        raise ConfigError(
            f"Keras weights {wrong[:3]} are not {dtype}: a layer built with an explicit dtype "
            "keeps it; build the layers without dtype= so that KerasModel can choose"
        )


@contextlib.contextmanager
def _float64_kept() -> Iterator[None]:
    """Keras's type promotion in float64 for the duration (a float64 model's forward pass).

    Keras 3.15 maps float64 to float32 in ``keras.backend.result_type`` on every backend but
    TensorFlow (``BIT64_TO_BIT32_DTYPE``, after JAX's default), so on the torch backend a
    float64 ``Dense`` multiplies in float32 (keras-team/keras#23704): a float64 model would not
    be float64. While this context is open that table maps float64 to itself; the entry is
    restored on exit. Nothing else of Keras is touched; if a later Keras drops the table, this
    does nothing (and tests/test_keras_model.py's float64 proofs say so).
    """
    try:
        from keras.src.backend.common import dtypes
    except ImportError:  # pragma: no cover - another Keras layout
        yield
        return
    table = getattr(dtypes, "BIT64_TO_BIT32_DTYPE", None)
    if not isinstance(table, dict) or table.get("float64", "float64") == "float64":
        yield
        return
    before = table["float64"]
    table["float64"] = "float64"
    try:
        yield
    finally:
        table["float64"] = before


class KerasModule(nn.Module):
    """A Keras model as a torch module whose parameters are the model's weights.

    The parameters are the ``torch.nn.Parameter`` objects inside the Keras variables, registered
    under the ``ParamSpec`` names in ``model.weights`` order (the Keras model itself is not a
    submodule, so nothing is registered twice). ``forward(x)`` is ``model(x, training=...)``
    with ``training`` from ``self.training``; when ``torch.func.functional_call`` has swapped
    other tensors in for the parameters, the call runs in a ``keras.StatelessScope`` mapping each
    Keras variable to its swapped-in tensor, so the Keras model computes with them.

    Args:
        model: a built Keras 3 model on the torch backend.
        names: one parameter name per ``model.weights`` entry.
        rebuild: a fresh model of the same architecture and dtype (weights not used): what
            ``copy.deepcopy`` builds its copy from (Keras models cannot be deep-copied).
        probabilities: the model outputs probabilities; ``forward`` returns their logarithm.
    """

    keras_model: Any

    def __init__(
        self,
        model: Any,
        names: list[str],
        rebuild: Callable[[], Any],
        probabilities: bool = False,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "keras_model", model)  # not a submodule (see the docstring)
        self._names = list(names)
        self._weights = list(model.weights)
        self._rebuild = rebuild
        self.probabilities = probabilities
        for name, w in zip(self._names, self._weights, strict=True):
            self.register_parameter(name, w.value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keras = sys.modules["keras"]
        values = [cast(torch.Tensor, self._parameters[n]) for n in self._names]
        swapped = [(w, v) for w, v in zip(self._weights, values) if v is not w.value]
        # Keras moves inputs to its own device: make that the parameters' (after module.to)
        scope = keras.StatelessScope(state_mapping=swapped) if swapped else contextlib.nullcontext()
        wide = _float64_kept() if values[0].dtype == torch.float64 else contextlib.nullcontext()
        with keras.device(str(values[0].device)), scope, wide:
            out = self.keras_model(x, training=self.training)
        if self.probabilities:
            out = torch.log(out.clamp_min(torch.finfo(out.dtype).tiny))
        return out

    def __deepcopy__(self, memo: dict) -> KerasModule:
        """A new Keras model (``rebuild``) holding copies of this one's weights."""
        clone = self._rebuild()
        clone.set_weights(_arrays(self.keras_model))
        new = KerasModule(clone, self._names, self._rebuild, self.probabilities)
        return new.train(self.training)


class KerasModel(TorchModel):
    """Adapter around a Keras 3 model on Keras's PyTorch backend (see the module docstring).

    Training, evaluation, the batch order and FedProx are ``TorchModel``'s; the flat vector is
    ``model.get_weights()`` flattened (trainable and non-trainable weights, in
    ``model.weights`` order).

    Args:
        model: a built ``keras.Model`` (Sequential, Functional or subclassed; trained in place:
            its current weights are the initial global model), or a function that builds one
            (called after ``keras.utils.set_random_seed(seed)``, so the initial global model is
            reproducible).
        seed: seed for a built-by-function model's initial weights, through
            ``keras.utils.set_random_seed`` (which also seeds Python's, NumPy's and torch's
            global generators); unused for a model.
        dtype: floating-point type of the weights (a torch dtype or its name):
            ``torch.float64`` to prove two code paths equal independently of float32 kernels.
            Default: the model's own (a function builds with Keras's default policy). Otherwise
            the model is initialised in its own dtype, then rebuilt in ``dtype``
            (``keras.models.clone_model`` of a Sequential or Functional model; a function is
            called again under that Keras dtype policy) with its weights converted, so a
            float64 model starts from the float32 model's initial vector, exactly.
        ignore_index: label value left out of loss and accuracy (as in ``TorchModel``).
        outputs: ``"logits"`` (default) or ``"probabilities"`` for a model ending in a softmax.

    Raises:
        ConfigError: not a built Keras model, a final softmax with ``outputs="logits"``, a
            regularizer, non-floating weights, or a dtype the layers do not take.

    Example:
        >>> keras = import_keras()
        >>> m = KerasModel(lambda: keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]))
        >>> bool(np.array_equal(m.get_vector(), np.concatenate(
        ...     [w.ravel() for w in m.keras_model.get_weights()])))
        True
    """

    def __init__(
        self,
        model: Any,
        seed: int = 0,
        dtype: torch.dtype | str | None = None,
        ignore_index: int = -100,
        outputs: str = "logits",
    ) -> None:
        keras = import_keras()
        name = None if dtype is None else _dtype_name(dtype)
        rebuild: Callable[[str], Any]
        if isinstance(model, keras.Model):
            base = model
            rebuild = functools.partial(_clone, model)
        elif callable(model):
            base = _build(model, None, seed)
            rebuild = functools.partial(_build, model, seed=None)
        else:
            raise ConfigError(
                f"expected a keras.Model or a function building one, got {type(model).__name__}"
            )
        _check_model(base, outputs)
        km = base
        if name is not None and any(w.dtype != name for w in base.weights):
            # initialised as the model's own dtype, then converted (as TorchModel.astype)
            km = rebuild(name)
            _check_dtype(km, name)
            km.set_weights(_arrays(base))
        weight_dtype = name or km.weights[0].dtype
        _check_dtype(km, weight_dtype)
        self._setup(km, _weight_names(km), rebuild, weight_dtype, ignore_index, outputs)
        self._init = self.get_vector()

    def _setup(
        self,
        km: Any,
        names: list[str],
        rebuild: Callable[[str], Any],
        dtype: str,
        ignore_index: int,
        outputs: str,
    ) -> None:
        """The ``TorchModel`` state over Keras model ``km`` (weights in ``dtype``), its
        weights named ``names``."""
        self.keras_model = km
        self.outputs = outputs
        self.ignore_index = ignore_index
        self.dtype = getattr(torch, dtype)
        self._rebuild = rebuild
        self.module = KerasModule(
            km, names, lambda: rebuild(dtype), probabilities=outputs == "probabilities"
        )
        self.device = str(km.weights[0].value.device)
        self._all: list[torch.Tensor] = [w.value for w in km.weights]
        # TorchModel.fit trains self._params: the trainable weights only
        self._params = [w.value for w in km.weights if w.trainable]
        self.spec = ParamSpec.of(
            {n: np.asarray(w.value.detach().cpu()) for n, w in zip(names, km.weights)}
        )

    def astype(self, dtype: torch.dtype | str) -> KerasModel:
        """This model with its weights in ``dtype``: the same architecture, the same current
        weights and the same initial vector (a float32 vector is exact in float64).

        Example:
            >>> import torch
            >>> keras = import_keras()
            >>> m = KerasModel(lambda: keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]))
            >>> m.astype(torch.float64).keras_model.weights[0].dtype
            'float64'
        """
        name = _dtype_name(dtype)
        km = self._rebuild(name)
        _check_dtype(km, name)
        km.set_weights([w.astype(name) for w in _arrays(self.keras_model)])
        new = object.__new__(KerasModel)
        new._setup(km, list(self.spec.names), self._rebuild, name, self.ignore_index,
                   self.outputs)
        new._init = self._init.copy()
        return new

    def _vector_tensors(self) -> list[torch.Tensor]:
        """All weights, trainable or not (``model.weights`` order): the flat vector's layout of
        ``get_vector`` / ``set_vector``."""
        return self._all

    def save(self, path: str | Path, vector: np.ndarray | None = None) -> Path:
        """Write the Keras model (with ``vector`` loaded first, if given) to a ``.keras`` file
        (``model.save``: JSON config and HDF5 weights in a zip; ``load_keras`` reads it)."""
        p = Path(path)
        if p.suffix != ".keras":
            raise ConfigError(f"a Keras model file must end in .keras, got {str(p)!r}")
        if vector is not None:
            self.set_vector(vector)
        self.keras_model.save(p)
        return p

    def cannot_vectorize(self) -> str | None:
        """Why the vectorized backend cannot reproduce this model's sequential training (the
        layer named), or None if it may try (it still probes one step)."""
        for name, w in zip(self.spec.names, self.keras_model.weights, strict=True):
            if not w.trainable:
                return (
                    f"Keras weight {name!r} is not trainable (BatchNormalization statistics or "
                    "a frozen layer): Keras updates such weights in place, or never, which the "
                    "vectorized backend (SGD on every parameter of a stacked copy) cannot "
                    "reproduce"
                )
        for layer in _sublayers(self.keras_model):
            kind = type(layer).__name__
            if getattr(layer, "seed_generator", None) is not None and getattr(
                layer, "rate", None) != 0:
                return (
                    f"layer {layer.name!r} ({kind}) draws random numbers in training from "
                    "Keras's seed generator, whose state the sequential result depends on"
                )
            size = getattr(layer, "kernel_size", ())
            if getattr(layer, "data_format", None) == "channels_last" and len(size) >= 2:
                return (
                    f"layer {layer.name!r} ({kind}) uses data_format='channels_last': Keras's "
                    "torch convolution converts its input to torch's channels_last memory "
                    "format, which torch.func.vmap does not support; build convolutions (and "
                    "pooling) with data_format='channels_first' (hefl's image loaders give "
                    "N, C, H, W) to vectorize"
                )
        return None


def load_keras(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    ignore_index: int = -100,
    outputs: str | None = None,
) -> KerasModel:
    """A ``KerasModel`` over the model in a ``.keras`` file (its weights: the initial model).

    Read with ``keras.saving.load_model(path, compile=False, safe_mode=True)``: no pickle, no
    lambda layers; a file with custom layers needs them registered
    (``keras.saving.register_keras_serializable``) before loading.

    Args:
        path: the ``.keras`` file (``KerasModel.save`` or ``model.save`` writes one).
        dtype: as in ``KerasModel`` (default: the file's).
        outputs: ``"logits"`` or ``"probabilities"``; default: ``"probabilities"`` when the
            model's last layer applies a softmax, else ``"logits"``.

    Raises:
        ConfigError: the file is missing or not a Keras model file, or Keras is not installed.

    Example:
        >>> import tempfile, pathlib
        >>> keras = import_keras()
        >>> m = KerasModel(lambda: keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]))
        >>> f = m.save(pathlib.Path(tempfile.mkdtemp()) / "model.keras")
        >>> bool(np.array_equal(load_keras(f).init_vector(), m.init_vector()))
        True
    """
    keras = import_keras()
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(
            f"Keras model file {str(p)!r} not found; write one with model.save('model.keras') "
            "or KerasModel.save"
        )
    if p.suffix != ".keras":
        raise ConfigError(f"{str(p)!r} is not a .keras file; save the model as 'model.keras'")
    try:
        model = keras.saving.load_model(p, compile=False, safe_mode=True)
    except Exception as e:  # Keras raises many types (re-raised): all mean "cannot read"
        raise ConfigError(f"cannot read Keras model file {str(p)!r}: {e}") from e
    if outputs is None:
        outputs = "probabilities" if _final_softmax(model) else "logits"
    return KerasModel(model, dtype=dtype, ignore_index=ignore_index, outputs=outputs)


def torch_layout(model: KerasModel, vector: np.ndarray) -> np.ndarray:
    """``vector`` (``model``'s layout) rearranged for the equivalent torch module: each Dense
    kernel ``(in, out)`` transposed to ``nn.Linear``'s ``(out, in)``, each ConvND kernel
    ``(*spatial, in, out)`` to ``nn.ConvNd``'s ``(out, in, *spatial)``, other weights as they are,
    in the same order (kernel then bias, layer by layer, as ``nn.Sequential`` orders them).

    For comparing against a torch twin of a Dense/Conv stack (``channels_first`` convolutions
    and a plain ``Flatten`` flatten in torch's order); it does not know other layers' layouts.

    Example:
        >>> keras = import_keras()
        >>> m = KerasModel(lambda: keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)]))
        >>> t = torch.nn.Linear(2, 3)
        >>> torch.nn.utils.vector_to_parameters(
        ...     torch.tensor(torch_layout(m, m.init_vector()), dtype=torch.float32), t.parameters())
        >>> x = np.ones((1, 2), np.float32)
        >>> bool(torch.allclose(t(torch.tensor(x)), m.module(torch.tensor(x))))
        True
    """
    parts = model.spec.unflatten(vector)
    out = []
    for name, a in parts.items():
        if name.endswith("kernel") and a.ndim == 2:
            a = a.T
        elif name.endswith("kernel") and a.ndim >= 3:
            a = np.moveaxis(a, (-1, -2), (0, 1))
        out.append(np.ascontiguousarray(a, dtype=np.float64).ravel())
    return np.concatenate(out) if out else np.zeros(0)
