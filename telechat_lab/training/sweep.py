"""A Hydra callback that writes a summary table of every job's final metrics to the sweep directory
(summary.csv and summary.md) when a multirun ends."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def collect(sweep_dir: Path) -> list[dict]:
    rows = []
    for job_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        metrics_file = job_dir / "final_metrics.json"
        if not overrides_file.exists():
            continue
        overrides = [line[2:].strip() for line in overrides_file.read_text().splitlines() if line.startswith("- ")]
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {"status": "failed"}
        rows.append({"job": job_dir.name, "overrides": " ".join(overrides), **metrics})
    return rows


def write_summary(sweep_dir: Path) -> list[dict]:
    rows = collect(sweep_dir)
    if not rows:
        return rows
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    print(f"\nsweep summary ({len(rows)} jobs): {sweep_dir / 'summary.md'}\n" + "\n".join(lines))
    return rows


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        write_summary(Path(config.hydra.sweep.dir))
