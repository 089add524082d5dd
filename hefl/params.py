"""Named arrays <-> one flat float vector.

Every aggregator, plain or encrypted, works on the flat vector; models convert at the edge. The
contract (as in pfl-research's "statistics as vectors"): ``unflatten(flatten(p)) == p`` exactly, and
summing flat vectors then unflattening equals summing the named arrays.

Example:
    >>> import numpy as np
    >>> p = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    >>> spec = ParamSpec.of(p)
    >>> v = spec.flatten(p)
    >>> v.shape
    (9,)
    >>> bool(all(np.array_equal(spec.unflatten(v)[k], p[k]) for k in p))
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from hefl.errors import ParamsError


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and dtypes of a model's parameters, in a fixed order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, params: Mapping[str, np.ndarray]) -> ParamSpec:
        """Spec of a mapping of named arrays, in the mapping's order."""
        arrays = {k: np.asarray(v) for k, v in params.items()}
        return cls(
            names=tuple(arrays),
            shapes=tuple(tuple(int(d) for d in a.shape) for a in arrays.values()),
            dtypes=tuple(str(a.dtype) for a in arrays.values()),
        )

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def size(self) -> int:
        """Length of the flat vector."""
        return int(sum(self.sizes))

    def flatten(self, params: Mapping[str, np.ndarray]) -> np.ndarray:
        """Concatenate the named arrays into one float64 vector (spec order)."""
        missing = [n for n in self.names if n not in params]
        extra = [n for n in params if n not in self.names]
        if missing or extra:
            raise ParamsError(
                f"parameter names do not match the spec: missing {missing}, unexpected {extra}; "
                "build the model from the same factory as the server"
            )
        parts = []
        for name, shape in zip(self.names, self.shapes):
            a = np.asarray(params[name])
            if tuple(a.shape) != shape:
                raise ParamsError(
                    f"parameter {name!r} has shape {tuple(a.shape)}, the spec says {shape}; "
                    "client and server must use the same model architecture"
                )
            parts.append(a.reshape(-1).astype(np.float64, copy=False))
        return np.concatenate(parts) if parts else np.zeros(0)

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """Split a flat vector back into named arrays with the spec's shapes and dtypes."""
        v = self.check_vector(vector)
        out: dict[str, np.ndarray] = {}
        offset = 0
        for name, shape, dtype, size in zip(self.names, self.shapes, self.dtypes, self.sizes):
            out[name] = v[offset : offset + size].reshape(shape).astype(dtype)
            offset += size
        return out

    def check_vector(self, vector: np.ndarray) -> np.ndarray:
        """Return ``vector`` as a 1-D array, or raise ParamsError if its length is wrong."""
        v = np.asarray(vector)
        if v.ndim != 1 or v.shape[0] != self.size:
            raise ParamsError(
                f"flat parameter vector has shape {v.shape}, expected ({self.size},) for this "
                "model; the update was made for a different model"
            )
        return v
