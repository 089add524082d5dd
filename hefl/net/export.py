"""``hefl export-model``: a deployment's trained model as the file ``hefl infer serve`` loads.

The server's state directory holds every round's global parameters (``hefl.net.store``) and the
run's config (which names the model). A logistic regression trained on CSV parties becomes a
``hefl-model/1`` file with the federation's preprocessing, so the same records a party trained
on can be scored under encryption by the model owner.
"""

from __future__ import annotations

from pathlib import Path

from hefl.data.tabular import Preprocessor
from hefl.errors import ConfigError
from hefl.inference.model import LinearModel, ModelFile
from hefl.net.config import build_model
from hefl.net.store import Store


def export_model(state: str | Path, preprocessing: str | Path, out: str | Path,
                 run_id: str | None = None) -> tuple[str, int, Path]:
    """Write the latest checkpoint of ``run_id`` (default: the latest run) as a model file.

    Returns:
        (run id, the round the parameters are from, the path written).

    Raises:
        ConfigError: no run in ``state``, an unknown run, a model kind encrypted scoring cannot
            evaluate, or preprocessing for another number of features.
    """
    store = Store(state, readonly=True)
    try:
        runs = {r.run_id: r for r in store.runs()}
        if not runs:
            raise ConfigError(f"no run in {str(state)!r}; pass the server's state_dir")
        rid = run_id or next(iter(runs))
        if rid not in runs:
            raise ConfigError(f"no run {rid!r} in {str(state)!r}; runs: {', '.join(runs)}")
        spec = runs[rid].config.get("model", {})
        round_num, params, _ = store.resume_point(rid)
    finally:
        store.close()
    if spec.get("kind") != "logreg":
        raise ConfigError(f"run {rid!r} trained a {spec.get('kind', 'mlp')!r} model; encrypted "
                          "scoring takes [model] kind = \"logreg\" (binary) from a deployment")
    model = build_model(spec)
    written = ModelFile(LinearModel.from_hefl(model, params), Preprocessor.load(preprocessing))
    return rid, round_num, written.save(out)
