"""The stages on the real pipeline, end to end: each stage's own demo data through the stage data module, the
preference losses and the run's report; a sweep ranked on a validation metric of a preference stage."""

from __future__ import annotations

import csv
import json
import math

import pytest
from helpers import CONF, QUICK, compose_train
from hydra import compose, initialize_config_dir

from telechat_lab.config.validate import config_problems
from telechat_lab.training.sweep import write_summary

DEMO = ["data.max_samples=12", "data.val_size=4", "data.batch_size=4"]


def run_stage(tmp_path, *overrides):
    """train() as train.py runs it, on the stage's own demo datasets (QUICK's but for data.datasets)."""
    from telechat_lab.training.run import train

    quick = [o for o in QUICK if not o.startswith("data.datasets=")]
    overrides = [*quick, *overrides, f"output_dir={tmp_path}", f"data.cache_dir={tmp_path}/cache"]
    return train(compose_train(overrides), overrides)


def rows_of(out) -> list[dict]:
    with open(out / "logs" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(rows, name) -> list[float]:
    return [float(r[name]) for r in rows if r.get(name) not in (None, "")]


@pytest.mark.parametrize("stage", ["pt", "dpo", "kto"])
def test_each_stage_trains_on_its_demo_data_and_reports_its_validation_metrics(tmp_path, stage, capsys):
    """No synthetic batches: `stage=X` composes X's demo datasets, the stage data module encodes and batches them,
    the module trains on them, and final_metrics.json holds every validation metric the stage logged."""
    metrics = run_stage(tmp_path, f"stage={stage}", *DEMO, "trainer.max_steps=2")
    assert (
        compose_train([f"stage={stage}"]).data.datasets
        == {
            "pt": ["pt_demo", "pt_jsonl_demo"],
            "dpo": ["dpo_demo", "dpo_sharegpt_demo"],
            "kto": ["kto_demo"],
        }[stage]
    )
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final["steps"] == 2 and final["status"] == "completed" and math.isfinite(final["val_loss"])
    if stage == "pt":
        assert not any(k.startswith("val/") for k in final)
        return
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert math.isfinite(final[f"val/{name}"]), name
        assert final[f"val/{name}"] == metrics[f"val/{name}"]
        assert column(rows_of(tmp_path), f"train/{name}"), name
    said = capsys.readouterr().out
    if stage == "dpo":
        accuracy = final["val/rewards/accuracies"]
        assert f"validation loss {final['val_loss']:.4f}, val/rewards/accuracies {accuracy:.4f}, " in said
    if stage == "dpo":  # the LoRA adapter starts as zero: the policy is the reference at the first step
        assert column(rows_of(tmp_path), "train/loss")[0] == pytest.approx(math.log(2), abs=1e-5)


def test_optimized_metric_takes_a_logged_validation_metric():
    assert config_problems(compose_train(["optimized_metric=val/rewards/accuracies"]), cuda_available=False) == []
    (problem,) = config_problems(compose_train(["optimized_metric=accuracy"]), cuda_available=False)
    assert problem.startswith("optimized_metric=accuracy: val_loss, train_loss or a logged validation metric")


def test_a_sweep_summary_ranks_on_a_validation_metric_highest_first(tmp_path):
    sweep = tmp_path / "sweep"
    for job, (beta, accuracy) in enumerate([(0.05, 0.5), (0.1, 0.75), (0.3, 0.25)]):
        d = sweep / str(job)
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"overrides": ["stage=dpo", f"stage.beta={beta}"]}))
        final = {"train_loss": 0.6, "val_loss": 0.6, "steps": 2, "skipped_steps": 0, "status": "completed"}
        (d / "final_metrics.json").write_text(json.dumps({**final, "val/rewards/accuracies": accuracy}))
    rows = write_summary(sweep, "val/rewards/accuracies", "maximize")
    assert [(r["job"], r["best"], r["val/rewards/accuracies"]) for r in rows] == [
        ("1", "*", 0.75),
        ("0", "", 0.5),
        ("2", "", 0.25),
    ]
    assert "val/rewards/accuracies" in (sweep / "summary.md").read_text()


def test_the_optuna_sweeper_follows_optimized_direction():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        overrides = ["hparams_search=lora_optuna", "optimized_direction=maximize"]
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.sweeper.direction == "maximize"


@pytest.mark.slow
def test_dpo_on_the_demo_pairs_learns_to_prefer_the_chosen_replies(tmp_path):
    """After a few epochs of LoRA DPO on the demo pairs, the pairs' reward accuracy (chosen rewarded above
    rejected) over the last epoch's steps is above 0.5; at the first step it is 0 (every reward is 0)."""
    run_stage(
        tmp_path,
        "stage=dpo",
        "data.max_samples=null",  # every demo pair: 48 + 12
        "data.val_size=0",
        "data.batch_size=8",
        "trainer.max_epochs=4",
        "optim.lr=5e-3",
        "stage.beta=0.5",
    )
    rows = rows_of(tmp_path)
    accuracies = column(rows, "train/rewards/accuracies")
    per_epoch = math.ceil(60 / 8)
    assert accuracies[0] == 0.0 and len(accuracies) == 4 * per_epoch
    assert sum(accuracies[-per_epoch:]) / per_epoch > 0.5, accuracies


@pytest.mark.parametrize("stage", ["dpo", "kto", "pt"])
def test_eval_scores_a_preference_runs_validation_split_on_its_wanted_replies(tmp_path, stage):
    """eval.split=val of a dpo run scores each held-out pair's chosen reply, of a kto run its desirable replies; a
    pt run's split is raw text, with no reply: one clear message."""
    from telechat_lab.config.schema import EvalConfig, EvalSettings, GenerationConfig
    from telechat_lab.errors import ConfigError
    from telechat_lab.eval.run import run_eval

    run = tmp_path / "run"
    run_stage(run, f"stage={stage}", "data.max_samples=12", "data.val_size=6", "trainer.max_steps=1")
    settings = EvalConfig(
        run_dir=str(run),
        eval=EvalSettings(split="val"),
        generation=GenerationConfig(max_new_tokens=2, do_sample=False, repetition_penalty=1.0),
        output_dir=str(tmp_path / "eval"),
    )
    if stage == "pt":
        with pytest.raises(ConfigError, match="is a stage=pt run: its validation split is raw text"):
            run_eval(settings)
        return
    result = run_eval(settings)
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    from telechat_lab.data.pipeline import resolved_dataset_dir

    demo = resolved_dataset_dir("data")  # the bundled demo data the stage's run trained on
    records = {name: json.loads((demo / f"{name}.json").read_text()) for name in ("dpo_demo", "dpo_sharegpt_demo")}
    records["kto_demo"] = json.loads((demo / "kto_demo.json").read_text())
    assert predictions and result["metrics"]["examples"] == len(predictions)
    for row in predictions:
        name, number = row["source"].rsplit(":", 1)
        record = records[name][int(number)]
        if stage == "dpo":
            chosen = record["chosen"] if isinstance(record["chosen"], str) else record["chosen"]["value"]
            assert row["reference"] == chosen
        else:
            assert record["kto_tag"] is True and row["reference"] == record["conversations"][-1]["value"]
    if stage == "dpo":
        assert len(predictions) == 6  # every held-out pair
