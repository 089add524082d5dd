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

    def figure(self, title: str = "hefl run") -> Any:
        """A matplotlib Figure of the run, one panel per question: accuracy, losses, who took
        part (sampled vs contributed), upload per round, and the epsilon spent in DP runs."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        rounds = [r.round for r in self.records]
        spent = [r.dp_epsilon for r in self.records]
        dp = any(e is not None for e in spent)
        fig, grid = plt.subplots(2, 3 if dp else 2, figsize=(13 if dp else 10, 7), squeeze=False)
        axes = list(grid.flat)
        acc, loss, who, up = axes[:4]
        for name, ax in (("accuracy", acc), ("loss", loss)):
            for prefix in ("test_", "client_"):
                vals = self.metric(prefix + name)
                if any(v is not None for v in vals):
                    ax.plot(rounds, vals, marker="o", label=prefix + name)
        loss.plot(rounds, [r.train_loss for r in self.records], marker=".", label="train_loss")
        who.plot(rounds, [r.selected for r in self.records], marker=".", label="sampled")
        who.plot(rounds, [r.contributors for r in self.records], marker="o", label="contributed")
        up.plot(rounds, [r.upload_bytes / 1e6 for r in self.records], marker="o",
                label="all clients")
        panels = [(acc, "test accuracy", "accuracy"), (loss, "loss", "loss"),
                  (who, "participants", "clients"), (up, "upload per round", "MB")]
        if dp:
            eps = axes[4]
            eps.plot(rounds, spent, color="tab:red", marker=".", label="epsilon spent")
            panels.append((eps, "privacy budget spent", "epsilon"))
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        for ax, name, unit in panels:
            ax.set_title(name)
            ax.set_xlabel("round")
            ax.set_ylabel(unit)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        who.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.suptitle(title)
        fig.tight_layout()
        return fig

    def plot(self, path: str | Path, title: str = "hefl run") -> Path:
        """Write ``figure(title)`` as a PNG."""
        import matplotlib.pyplot as plt

        fig = self.figure(title)
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=100)
        plt.close(fig)
        return p
