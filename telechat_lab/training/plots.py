"""The loss pictures: a run's training_loss.png / validation_loss.png and a sweep's sweep_loss.png.

Each is built as a matplotlib Figure (what the tests inspect) and then saved. Every picture has whole-number step
ticks, its legend beside the axes (never over a curve) and validation losses as points with a legend entry."""

from __future__ import annotations

import math
import os
from itertools import cycle
from pathlib import Path

# a sweep's jobs: colour, line style and marker all change from one job to the next, so that curves lying on each
# other (jobs that differ only in a setting with no effect yet) stay apart
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
VALIDATION = dict(linestyle="none", marker="o", markersize=7, markeredgecolor="black", zorder=3)


def pyplot():
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Exponential moving average; the weight grows with the series' length (as TensorBoard's)."""
    if weight is None:
        weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)
    out, last = [], values[0] if values else 0.0
    for v in values:
        last = last * weight + (1 - weight) * v
        out.append(last)
    return out


def short_value(value: str) -> str:
    """A setting's value for a legend: a fraction to 3 significant digits (0.000123), anything else as it is."""
    try:
        int(value)
        return value
    except ValueError:
        pass
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.3g}" if math.isfinite(number) else value


def _finish(fig, ax, title: str):
    """Whole-number step ticks, the legend to the right of the axes, the title."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))  # 0, 100, 200: not 0, 80, 160
    first, last = ax.dataLim.intervalx
    if last - first < 2:  # a step or two: the locator would fall back to fractions of a step
        ax.set_xlim(first - 1, last + 1)
    ax.set(xlabel="optimizer step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small")
    fig.tight_layout()
    return fig


def loss_figure(name: str, train: list, val: list):
    """A run's training loss (raw, and smoothed) with its validation losses as points."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    steps, losses = zip(*train)
    few = len(steps) < 30  # a short run: each step's loss as a dot too
    ax.plot(steps, losses, color="#6baed6", alpha=0.5, linewidth=1, marker="." if few else None, label="raw")
    ax.plot(steps, smooth(list(losses)), color="#08519c", linewidth=2, label="smoothed")
    if val:
        ax.plot(*zip(*val), color="#d94801", label="validation", **VALIDATION)
    return _finish(fig, ax, f"training loss of {name}")


def validation_figure(name: str, val: list):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(*zip(*val), color="#d94801", linestyle="-", marker="o", label="validation")
    return _finish(fig, ax, f"validation loss of {name}")


def plot_losses(output_dir: Path, train: list, val: list) -> None:
    """training_loss.png and, with validation losses, validation_loss.png in output_dir."""
    plt = pyplot()
    fig = loss_figure(output_dir.name, train, val)
    fig.savefig(output_dir / "training_loss.png", dpi=100)
    plt.close(fig)
    if val:
        fig = validation_figure(output_dir.name, val)
        fig.savefig(output_dir / "validation_loss.png", dpi=100)
        plt.close(fig)


def sweep_figure(title: str, curves: list[tuple[str, list, list]]):
    """Each job's training loss (a line: its own colour, line style and marker) and validation loss (points of
    the same colour and marker); `curves`: (label, train points, validation points) per job."""
    from matplotlib.lines import Line2D

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 5))
    styles = zip(cycle(f"C{n}" for n in range(10)), cycle(LINESTYLES), cycle(MARKERS))
    any_val = False
    for (label, train, val), (colour, linestyle, marker) in zip(curves, styles):
        if train:
            every = max(1, len(train) // 8)  # a few markers on a long curve, every point on a short one
            ax.plot(
                *zip(*train),
                color=colour,
                linestyle=linestyle,
                marker=marker,
                markerfacecolor="none",  # hollow: markers lying on each other all show
                markersize=8,
                markevery=every,
                label=label,
            )
        if val:
            ax.plot(*zip(*val), color=colour, **{**VALIDATION, "marker": marker})
            any_val = True
    if any_val:
        ax.add_line(Line2D([], [], color="grey", label="validation (points, the job's colour)", **VALIDATION))
    return _finish(fig, ax, title)


def plot_sweep(path: Path, title: str, curves: list[tuple[str, list, list]]) -> None:
    plt = pyplot()
    fig = sweep_figure(title, curves)
    fig.savefig(path, dpi=100)
    plt.close(fig)
