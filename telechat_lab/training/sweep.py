"""When a sweep ends (a Hydra callback): summary.csv and summary.md in its directory, one row per job with a
column per swept setting (the overrides that differ between jobs), sorted by the objective
(`optimized_metric`, best first and marked), and sweep_loss.png with every job's loss curves."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

METRICS = ("train_loss", "val_loss", "steps", "skipped_steps", "status")


def _overrides(job_dir: Path) -> dict[str, str]:
    """The job's own command-line overrides (run.json records them; .hydra/overrides.yaml for an older run)."""
    record = job_dir / "run.json"
    if record.is_file():
        lines = json.loads(record.read_text()).get("overrides", [])
    else:
        lines = [
            line[2:].strip()
            for line in (job_dir / ".hydra" / "overrides.yaml").read_text().splitlines()
            if line.startswith("- ")
        ]
    return dict(line.lstrip("+~").split("=", 1) for line in lines if "=" in line)


def collect(sweep_dir: Path) -> list[dict]:
    """One dict per job: its number, its overrides and its final metrics ("failed" where it has none)."""
    rows = []
    for job_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
        if not (job_dir / "run.json").is_file() and not (job_dir / ".hydra" / "overrides.yaml").is_file():
            continue
        metrics_file = job_dir / "final_metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {"status": "failed"}
        rows.append({"job": job_dir.name, "overrides": _overrides(job_dir), **metrics})
    return rows


def _sort_key(row: dict, metric: str, direction: str) -> tuple:
    value = row.get(metric)
    if not isinstance(value, (int, float)) or math.isnan(value):
        return (1, 0.0)  # failed or missing: last
    return (0, value if direction == "minimize" else -value)


def write_summary(sweep_dir: Path, metric: str = "val_loss", direction: str = "minimize") -> list[dict]:
    rows = collect(sweep_dir)
    if not rows:
        return rows
    columns = METRICS if metric in METRICS else (*METRICS, metric)  # a validation metric of a stage's: its column
    table, swept, text = write_table(sweep_dir, rows, metric, direction, columns)
    plot = plot_sweep(sweep_dir, rows, swept)
    print(text)
    if plot is not None:
        print(f"loss plot: {plot}")
    return table


def write_table(
    directory: Path, rows: list[dict], metric: str, direction: str, metrics: Sequence[str], name: str = "summary"
) -> tuple[list[dict], list[str], str]:
    """NAME.csv and NAME.md in `directory`: one row per job ({"job", "overrides", metric: value, ...}; `rows` is
    sorted in place, best first), a column per swept override and per metric, the best marked. (the table, the
    swept keys, the text to print)."""
    keys = list(dict.fromkeys(k for row in rows for k in row["overrides"]))
    swept = [k for k in keys if len({row["overrides"].get(k) for row in rows}) > 1]
    rows.sort(key=lambda row: _sort_key(row, metric, direction))
    best = rows[0] if _sort_key(rows[0], metric, direction)[0] == 0 else None
    columns = ["best", "job", *swept, *metrics]
    table = [
        {
            "best": "*" if row is best else "",
            "job": row["job"],
            **{k: row["overrides"].get(k, "") for k in swept},
            **{m: row.get(m) for m in metrics},
        }
        for row in rows
    ]
    with open(directory / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(table)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in table]
    fixed = {k: rows[0]["overrides"][k] for k in keys if k not in swept and k in rows[0]["overrides"]}
    head = f"sorted by {metric} ({direction}); the same in every job: " + (
        " ".join(f"{k}={v}" for k, v in fixed.items()) or "nothing else"
    )
    (directory / f"{name}.md").write_text(head + "\n\n" + "\n".join(lines) + "\n")
    text = f"\nsweep summary ({len(rows)} jobs): {directory / f'{name}.md'}\n{head}\n" + "\n".join(lines)
    return table, swept, text


def plot_sweep(sweep_dir: Path, rows: list[dict], swept: list[str]) -> Path | None:
    """sweep_loss.png: every job's training and validation losses (telechat_lab/training/plots.py); None where no
    job has a loss history (every job failed before its first step, or plot_loss=false)."""
    from .plots import plot_sweep as draw
    from .plots import short_value

    curves = []
    for row in rows:
        history = sweep_dir / row["job"] / "loss_history.csv"
        if not history.is_file():
            continue
        points = list(csv.DictReader(io.StringIO(history.read_text())))
        settings = " ".join(f"{k}={short_value(row['overrides'].get(k, ''))}" for k in swept)
        curves.append(
            (
                f"{row['job']}: {settings or 'job'}",
                [(int(p["step"]), float(p["loss"])) for p in points if p["split"] == "train"],
                [(int(p["step"]), float(p["loss"])) for p in points if p["split"] == "val"],
            )
        )
    if not curves:
        return None
    path = sweep_dir / "sweep_loss.png"
    draw(path, f"{sweep_dir.name}: each job's loss", curves)
    return path


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """The sweep's directory is this sweep's until it ends: a second sweep into it is refused (runlock)."""
        from telechat_lab.errors import reported
        from telechat_lab.training.run_dir_owner import claim_sweep_dir

        with reported():
            claim_sweep_dir(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweeper = config.hydra.get("sweeper") or {}
        direction = config.get("optimized_direction", "minimize")
        if hasattr(sweeper, "get") and sweeper.get("direction"):  # an optimising sweeper's own (by default the same)
            direction = sweeper.get("direction")
        rows = write_summary(Path(config.hydra.sweep.dir), config.get("optimized_metric", "val_loss"), direction)
        failed = [row["job"] for row in rows if row.get("status") == "failed"]
        if failed:  # the sweep's exit code says so (each job's error was printed where it failed)
            print(f"{len(failed)} of {len(rows)} jobs failed: {', '.join(failed)}", file=sys.stderr)
            sys.exit(1)
