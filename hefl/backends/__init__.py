"""Client runners beyond the in-process sequential one (see ``hefl.simulation.ClientRunner``).

- ``hefl.backends.vectorized``: the local training of a whole cohort as one batched computation
  (``torch.func.vmap`` over stacked client parameters), on CPU or CUDA.
- ``hefl.backends.ray``: client steps as Ray actor calls, for more than one machine.

Nothing is imported here: ``import hefl.backends`` costs nothing; each runner imports torch or ray
when it is built (``hefl.simulation.make_runner(model, data, "vectorized" | "ray", ...)``).
"""

__all__: list[str] = []
