"""``hefl status``: what a state directory says about its runs (read-only, safe while serving)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hefl.history import History
from hefl.net.store import Store, write_atomic


def summarize(state: Path, plot: Path | None = None, metrics: Path | None = None) -> dict[str, Any]:
    """Runs (latest first) with rounds, participants and final metrics; optionally write the
    latest run's PNG plot and metrics JSON lines."""
    store = Store(state, readonly=True)
    try:
        runs = []
        for info in store.runs():
            records = store.records(info.run_id)
            last = records[-1] if records else None
            runs.append({
                "run_id": info.run_id,
                "status": info.status,
                "rounds_completed": len(records),
                "rounds": info.rounds,
                "clients": store.clients(info.run_id),
                "last_round": last.to_dict() if last else None,
                "per_round": [
                    {"round": r.round, "selected": r.selected, "contributors": r.contributors,
                     "train_loss": r.train_loss, "skipped": r.skipped,
                     "left_out": dict(r.rejected), "dp_epsilon": r.dp_epsilon,
                     "wall_s": r.wall_s, "aggregate_s": r.aggregate_s, "decode_s": r.decode_s,
                     **r.metrics}
                    for r in records
                ],
            })
            if len(runs) == 1:  # the latest run
                history = History(records)
                if plot is not None and records:
                    history.plot(plot, title=run_title(info.config))
                if metrics is not None:
                    import json

                    write_atomic(metrics, "".join(json.dumps(r.to_dict()) + "\n"
                                                  for r in records))
    finally:
        store.close()
    return {"state": str(state), "runs": runs}


def run_title(config: dict[str, Any]) -> str:
    """A plot title a person can read: the run's name, algorithm, aggregation and DP mode (its
    run id is a hash, and stays in the status text)."""
    agg = config.get("aggregation") or {}
    kind = agg.get("kind", "plain")
    how = f"{kind}, custody {agg['custody']}" if kind != "plain" and "custody" in agg else kind
    dp = config.get("privacy") or {}
    privacy = f", DP {dp.get('mode', 'central')}" if dp else ""
    return (f"hefl run {config.get('name', 'run')}: {(config.get('algorithm') or {}).get('name', '')}"
            f", {how}{privacy}, {config.get('clients_per_round', '?')} clients per round")


def render(info: dict[str, Any]) -> str:
    lines = [f"state {info['state']}"]
    if not info["runs"]:
        lines.append("  no runs yet")
    for run in info["runs"]:
        spent = [r["dp_epsilon"] for r in run["per_round"] if r["dp_epsilon"] is not None]
        dp = f", privacy spent epsilon {spent[-1]:.4g}" if spent else ""
        lines.append(f"run {run['run_id']}: {run['status']}, "
                     f"{run['rounds_completed']}/{run['rounds']} rounds{dp}")
        lines.append("  clients:")
        for c in run["clients"]:
            when = (time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(c["last_seen"])) + " UTC"
                    if c["last_seen"] else "never seen")
            revoked = " (revoked)" if c["revoked"] else ""
            lines.append(f"    {c['name']}{revoked}: {c['last_event'] or '-'}, {when}")
        for r in run["per_round"]:
            extra = "".join(f" {k}={v:.4f}" for k, v in r.items()
                            if k.startswith("test_") and v is not None)
            loss = "" if r["train_loss"] is None else f" train_loss={r['train_loss']:.4f}"
            left = "".join(f"; {k}: {v}" for k, v in r["left_out"].items())
            skipped = " (skipped: model kept)" if r["skipped"] else ""
            if r["dp_epsilon"] is not None:
                extra += f" epsilon={r['dp_epsilon']:.4g}"
            phases = "".join(f" {k}={r[k]:.3f}s" for k in ("wall_s", "aggregate_s", "decode_s")
                             if r.get(k))  # not measured (None) or not recorded (0): left out
            lines.append(f"  round {r['round']}: {r['contributors']}/{r['selected']} clients"
                         f"{loss}{extra}{phases}{skipped}{left}")
    return "\n".join(lines)
