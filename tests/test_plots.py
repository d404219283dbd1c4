"""The loss pictures, checked through matplotlib's own objects (no pixel comparison): whole-number step ticks,
legend texts, the legend beside the axes, one style a job, validation losses as points with a legend entry."""

from __future__ import annotations

import json

import pytest

from telechat_lab.training import plots
from telechat_lab.training.sweep import write_summary

LR = 0.000123456789


def _job(sweep, n: int, overrides: list[str], train: list[float], val: dict[int, float]) -> None:
    job = sweep / str(n)
    job.mkdir(parents=True)
    (job / "run.json").write_text(json.dumps({"overrides": overrides}))
    rows = ["step,split,loss"] + [f"{s},train,{v}" for s, v in enumerate(train, 1)]
    rows += [f"{s},val,{v}" for s, v in val.items()]
    (job / "loss_history.csv").write_text("\n".join(rows) + "\n")
    (job / "final_metrics.json").write_text(json.dumps({"train_loss": train[-1], "val_loss": val[max(val)]}))


@pytest.fixture
def sweep(tmp_path):
    """Three jobs of 5 steps; jobs 0 and 1 have the very same losses (their curves coincide)."""
    sweep = tmp_path / "sweep"
    same = [3.0, 2.5, 2.2, 2.0, 1.9]
    _job(sweep, 0, [f"optim.lr={LR}", "adapter.rank=8"], same, {5: 2.1})
    _job(sweep, 1, [f"optim.lr={LR * 2}", "adapter.rank=16"], same, {5: 2.1})
    _job(sweep, 2, ["optim.lr=0.001", "adapter.rank=8"], [3.0, 2.0, 1.5, 1.2, 1.1], {3: 1.6, 5: 1.4})
    return sweep


@pytest.fixture
def drawn(monkeypatch):
    """The figures the code saves, kept open for inspection."""
    figures = []

    def keep(path, title, curves):
        figures.append(plots.sweep_figure(title, curves))

    monkeypatch.setattr(plots, "plot_sweep", keep)
    return figures


def assert_readable(fig) -> None:
    """Whole-number step ticks; a legend that lies outside the axes."""
    fig.canvas.draw()
    (ax,) = fig.axes
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    renderer = fig.canvas.get_renderer()
    legend, box = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend.x0 >= box.x1 or legend.y0 >= box.y1, (legend, box)
    assert legend.x1 <= fig.bbox.x1 + 1  # and inside the picture


def test_sweep_plot_labels_styles_and_validation_points(sweep, drawn, capsys):
    write_summary(sweep)
    assert f"loss plot: {sweep / 'sweep_loss.png'}" in capsys.readouterr().out  # the sweep's end says where it is
    (fig,) = drawn
    assert_readable(fig)
    (ax,) = fig.axes
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    # sorted by val_loss; values to 3 significant digits, integers as they are
    assert texts[:3] == [
        "2: optim.lr=0.001 adapter.rank=8",
        "0: optim.lr=0.000123 adapter.rank=8",
        "1: optim.lr=0.000247 adapter.rank=16",
    ]
    assert texts[3].startswith("validation")
    lines = {line.get_label(): line for line in ax.get_lines()}
    trains = [lines[t] for t in texts[:3]]
    styles = {(line.get_color(), line.get_linestyle(), line.get_marker()) for line in trains}
    assert len(styles) == 3 and len({s[1] for s in styles}) == 3 and len({s[2] for s in styles}) == 3
    points = [line for line in ax.get_lines() if line.get_linestyle() == "None" and len(line.get_xdata())]
    assert sorted(len(line.get_xdata()) for line in points) == [1, 1, 2]  # each job's validations, as points
    assert (sweep / "summary.md").is_file()


def test_sweep_plot_is_written(sweep):
    write_summary(sweep)
    assert (sweep / "sweep_loss.png").stat().st_size > 10_000


def test_training_loss_plot_has_integer_steps_validation_points_and_an_outside_legend(tmp_path):
    train = [(s, 4.0 / s) for s in range(1, 8)]
    val = [(4, 1.2), (7, 0.9)]
    fig = plots.loss_figure("run", train, val)
    assert_readable(fig)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["raw", "smoothed", "validation"]
    (points,) = [line for line in ax.get_lines() if line.get_label() == "validation"]
    assert points.get_linestyle() == "None" and points.get_marker() == "o"
    assert list(points.get_xdata()) == [4, 7]
    plots.plot_losses(tmp_path, train, val)
    assert (tmp_path / "training_loss.png").is_file() and (tmp_path / "validation_loss.png").is_file()


def test_a_one_step_sweep_still_has_whole_step_ticks():
    fig = plots.sweep_figure("one step", [("0: adapter=lora", [(1, 8.6)], []), ("1: adapter=dora", [(1, 8.6)], [])])
    assert_readable(fig)


@pytest.mark.parametrize(
    "value,shown", [("0.000123456789", "0.000123"), ("8", "8"), ("3e-4", "0.0003"), ("lora", "lora"), ("1.5", "1.5")]
)
def test_legend_values_are_rounded_to_three_significant_digits(value, shown):
    assert plots.short_value(value) == shown
