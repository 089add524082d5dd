"""The metrics history of a run: rows of RoundRecord, saved as JSON lines or CSV, and plotted."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hefl.rounds import RoundRecord


@dataclass
class History:
    """Per-round records, in order."""

    records: list[RoundRecord] = field(default_factory=list)

    def append(self, record: RoundRecord) -> None:
        self.records.append(record)

    def __iter__(self) -> Iterator[RoundRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def metric(self, name: str) -> list[float | None]:
        """One metric per round (None where a round did not report it)."""
        return [r.metrics.get(name) for r in self.records]

    @property
    def final(self) -> dict[str, Any]:
        return self.records[-1].to_dict() if self.records else {}

    def _rows(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.records]

    def to_jsonl(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps(row) + "\n" for row in self._rows()))
        return p

    def to_csv(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        for row in self._rows():
            flat = {k: v for k, v in row.items() if k not in ("metrics", "rejected")}
            flat.update({f"metric_{k}": v for k, v in row["metrics"].items()})
            flat["rejected"] = len(row["rejected"])
            rows.append(flat)
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with p.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        return p

    def plot(self, path: str | Path, title: str = "hefl run") -> Path:
        """PNG of test accuracy and losses per round (and the epsilon spent, in DP runs)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r.round for r in self.records]
        fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
        for name, ax in (("accuracy", ax_acc), ("loss", ax_loss)):
            for prefix in ("test_", "client_"):
                vals = self.metric(prefix + name)
                if any(v is not None for v in vals):
                    ax.plot(rounds, vals, marker="o", label=prefix + name)
        ax_loss.plot(rounds, [r.train_loss for r in self.records], marker=".", label="train_loss")
        spent = [r.dp_epsilon for r in self.records]
        if any(e is not None for e in spent):  # DP runs: epsilon spent, on its own axis
            ax_eps = ax_acc.twinx()
            ax_eps.plot(rounds, spent, color="tab:red", linestyle="--", label="epsilon spent")
            ax_eps.set_ylabel("epsilon spent", color="tab:red")
        for ax, label in ((ax_acc, "accuracy"), (ax_loss, "loss")):
            ax.set_xlabel("round")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(title)
        fig.tight_layout()
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=100)
        plt.close(fig)
        return p
