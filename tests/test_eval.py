"""`telechat-lab eval`: BLEU / ROUGE as LLaMA-Factory computes them, the prompts eval generates from (== chat's ==
the training encoder's), batched generation, resumable predictions, every kind of model, bad input, sweeps, and the
samples callback during training."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import lightning as L
import pytest
from conftest import shared_path
from helpers import make_adapter, run_train, tree_snapshot

from telechat_lab.config.schema import (
    ChatModelConfig,
    EvalConfig,
    EvalDataConfig,
    EvalSettings,
    GenerationConfig,
)
from telechat_lab.eval.metrics import score, similarity

GREEDY = GenerationConfig(max_new_tokens=4, do_sample=False, repetition_penalty=1.0)


def settings(**kw) -> EvalConfig:
    kw.setdefault("generation", GREEDY)
    return EvalConfig(**kw)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


QUALITY = ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match", "gen_len", "examples")


# ------------------------------------------------------------------------------------------------ metrics


# (prediction, reference, the reference's and the prediction's segmentation by hand)
PAIRS = [
    ("我爱北京", "我爱北京天安门", ["我", "爱", "北京"], ["我", "爱", "北京", "天安门"]),
    ("the cat sat on the mat", "the cat sat", "the cat sat on the mat".split(), "the cat sat".split()),
    ("北京欢迎你", "北京欢迎你", ["北京", "欢迎", "你"], ["北京", "欢迎", "你"]),
    ("完全不同", "the dog", None, None),
]


def test_bleu_and_rouge_equal_the_reference_libraries_on_hand_segmented_text():
    """ROUGE from rouge-chinese on the hand segmentation, BLEU-4 from NLTK on characters with smoothing method3
    (LLaMA-Factory's recipe), each x100 and averaged; and values worked out by hand."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    expected = {"bleu-4": [], "rouge-1": [], "rouge-2": [], "rouge-l": []}
    for prediction, reference, hyp_words, ref_words in PAIRS:
        if hyp_words is None:
            found = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
        else:
            found = Rouge().get_scores(" ".join(hyp_words), " ".join(ref_words))[0]
        for key in ("rouge-1", "rouge-2", "rouge-l"):
            expected[key].append(found[key]["f"] * 100)
        bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
        expected["bleu-4"].append(bleu * 100)
    rows = [{"prediction": p, "reference": r, "generated_tokens": 3, "seconds": 0.5} for p, r, _, _ in PAIRS]
    metrics = score(rows)
    for key, values in expected.items():
        assert metrics[key] == pytest.approx(sum(values) / len(values), abs=1e-4), key
    # by hand: "the cat sat" against "the cat sat on the mat": rouge-chinese counts distinct unigrams (the, cat,
    # sat, on, mat: 5 in the reference, 3 shared): P=3/3, R=3/5, F=2PR/(P+R)=0.75
    assert similarity("the cat sat", "the cat sat on the mat")["rouge-1"] == pytest.approx(75.0)
    assert similarity("北京欢迎你", "北京欢迎你") == {
        "bleu-4": 100.0,
        "rouge-1": 100.0,
        "rouge-2": 100.0,
        "rouge-l": 100.0,
    }
    assert similarity("", "北京")["rouge-l"] == 0.0
    assert metrics["exact_match"] == 25.0 and metrics["gen_len"] == 3.0 and metrics["examples"] == 4
    assert metrics["tokens_per_second"] == pytest.approx(12 / 2.0)


# ------------------------------------------------------------------------------------------------ prompts


def test_eval_prompts_equal_chats_and_the_training_encoders_on_the_golden_cases(tmp_path, tiny_real_vocab_dir):
    from telechat_lab.chat.session import ChatSession
    from telechat_lab.data.formats import to_conversation
    from telechat_lab.data.registry import load_dataset_info
    from telechat_lab.eval.run import build_examples, resolve_target

    cases_file = shared_path("golden", "template", "cases.jsonl")
    cases = [json.loads(line) for line in cases_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    root = tmp_path / "data"
    root.mkdir()
    info = {}
    for case in cases:
        (root / f"{case['id']}.json").write_text(json.dumps([case["record"]], ensure_ascii=False))
        info[case["id"]] = {"file_name": f"{case['id']}.json", **case["dataset_info"]}
    (root / "dataset_info.json").write_text(json.dumps(info, ensure_ascii=False))
    config = settings(
        model=ChatModelConfig(path=str(tiny_real_vocab_dir)),
        data=EvalDataConfig(dataset_dir=str(root), datasets=[c["id"] for c in cases], cache_dir=str(tmp_path / "c")),
    )
    examples, _ = build_examples(config, resolve_target(config))
    assert len(examples) == len(cases) >= 11
    specs = load_dataset_info(root)
    chat = ChatSession(None, tiny_real_vocab_dir)
    compared_with_chat = 0
    for case, example in zip(cases, examples, strict=True):
        ids = case["expected"]["input_ids"]
        last_bot = len(ids) - 1 - ids[::-1].index(5)  # <_bot>
        assert example.prompt_ids == ids[: last_bot + 1] == case["expected"]["generation_prompt_ids"], case["id"]
        assert example.source == f"{case['id']}:0"
        conv = to_conversation(specs[case["id"]], case["record"], case["id"])
        if conv.tools:  # chat takes no tool definitions
            continue
        prompt, _ = chat.prompt_ids(conv.turns[-1][0], turns=conv.turns[:-1], system=conv.system)
        assert example.prompt_ids == prompt, case["id"]
        compared_with_chat += 1
    assert compared_with_chat >= len(cases) - 2


# ------------------------------------------------------------------------------------------------ generation


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tiny_dir):
    from telechat_lab.chat.engines import HuggingFaceEngine
    from telechat_lab.eval.predict import generate_hf

    engine = HuggingFaceEngine(tiny_dir, [], "float32", "sdpa", "cpu")
    prompts = [[6, 30, 31, 32, 4, 40, 41, 5], [4, 50, 5], [6, 7, 8, 4, 60, 61, 62, 63, 64, 5]]
    generation = {"max_new_tokens": 6, "do_sample": False, "repetition_penalty": 1.0}
    together = generate_hf(engine, prompts, generation)
    alone = [generate_hf(engine, [p], generation)[0] for p in prompts]
    assert together == alone and all(len(ids) == 6 or ids[-1] == 2 for ids in together)


# ------------------------------------------------------------------------------------------------ a run


class RecordValSplit(L.Callback):
    """Writes the validation examples training holds (each as dataset:record, in order) to `path`."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        val = trainer.datamodule.val_set
        sources = [f"{val.names[val.source[j, 0]]}:{val.source[j, 1]}" for j in val.index]
        Path(self.path).write_text(json.dumps(sources))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-step tiny run on 24 identity examples, 6 held out (which ones: val_split.json beside the run)."""
    out = tmp_path_factory.mktemp("eval-run") / "run"
    record = out.parent / "val_split.json"
    run_train(
        out,
        "trainer.max_steps=1",
        "data.max_samples=24",
        "data.val_size=6",
        "+callbacks.val._target_=test_eval.RecordValSplit",
        f"+callbacks.val.path={record}",
    )
    return out


def test_a_runs_validation_split_is_scored_and_an_interrupted_eval_resumes_to_the_same_metrics(
    trained, tmp_path, monkeypatch
):
    from telechat_lab.errors import Interrupted
    from telechat_lab.eval import predict
    from telechat_lab.eval.run import run_eval

    whole = run_eval(
        settings(run_dir=str(trained), eval=EvalSettings(split="val", batch_size=2), output_dir=str(tmp_path / "a"))
    )
    rows = rows_of(tmp_path / "a" / "predictions.jsonl")
    # the examples training validated on, in its order
    assert [r["source"] for r in rows] == json.loads((trained.parent / "val_split.json").read_text())
    assert len(rows) == 6 and whole["metrics"]["examples"] == 6
    assert json.loads((tmp_path / "a" / "metrics.json").read_text()) == whole["metrics"]

    calls, generate = [], predict.generate_hf

    def stops_after_two_batches(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return generate(*args)

    monkeypatch.setattr(predict, "generate_hf", stops_after_two_batches)
    again = settings(run_dir=str(trained), eval=EvalSettings(split="val", batch_size=2), output_dir=str(tmp_path / "b"))
    with pytest.raises(Interrupted) as stopped:
        run_eval(again)
    out = tmp_path / "b" / "predictions.jsonl"
    assert f"4 of 6 predicted in {out}; the same command continues" in str(stopped.value)
    assert stopped.value.exit_code == 130
    assert len(rows_of(out)) == 4 and not (tmp_path / "b" / "metrics.json").exists()
    with open(out, "a") as f:
        f.write('{"index": 4, "source": "ident')  # a line cut off mid-write
    monkeypatch.setattr(predict, "generate_hf", generate)
    first_lines = out.read_bytes()[: out.read_bytes().rfind(b"\n") + 1]
    resumed = run_eval(again)
    assert out.read_bytes().startswith(first_lines)  # appended, never rewritten
    assert [r["prediction"] for r in rows_of(out)] == [r["prediction"] for r in rows]
    assert {k: resumed["metrics"][k] for k in QUALITY} == {k: whole["metrics"][k] for k in QUALITY}


def test_scoring_a_dataset_the_run_trained_on_warns(trained, tmp_path, capsys):
    from telechat_lab.eval.run import run_eval

    run_eval(
        settings(
            run_dir=str(trained),
            data=EvalDataConfig(datasets=["identity"], max_samples=2),
            output_dir=str(tmp_path / "o"),
        )
    )
    err = capsys.readouterr().err
    assert f"scoring on {trained.name}'s training split" in err and "'identity'" in err
    assert len(rows_of(tmp_path / "o" / "predictions.jsonl")) == 2


def test_an_adapter_a_merged_export_and_a_base_model_all_evaluate(tiny_dir, tmp_path):
    from telechat_lab.config.schema import MergeConfig
    from telechat_lab.eval.run import run_eval
    from telechat_lab.export import merge_and_export

    adapter = make_adapter(tiny_dir, tmp_path / "adapter", seed=3)
    merged = merge_and_export(MergeConfig(adapter_path=str(adapter), export_dir=str(tmp_path / "m"), dtype="float32"))
    data = EvalDataConfig(datasets=["identity"], max_samples=3, cache_dir=str(tmp_path / "c"))
    found = {}
    for name, target in {
        "adapter": {"adapter_path": str(adapter)},
        "merged": {"model": ChatModelConfig(path=str(merged), dtype="float32")},
        "base": {"model": ChatModelConfig(path=str(tiny_dir), dtype="float32")},
    }.items():
        result = run_eval(settings(data=data, output_dir=str(tmp_path / f"eval_{name}"), **target))
        assert result["metrics"]["examples"] == 3, name
        found[name] = [r["prediction"] for r in rows_of(tmp_path / f"eval_{name}" / "predictions.jsonl")]
    assert found["adapter"] == found["merged"]  # the same weights, applied or merged
    assert found["adapter"] != found["base"]


# ------------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def own_logging():
    """The root logger as it was: an in-process command's Hydra sets its handlers on this test's captured stderr,
    which later tests would log into after it is closed."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _eval_cli(args: list[str], capsys) -> tuple[int, str]:
    from telechat_lab.cli import main

    with pytest.raises(SystemExit) as ended:
        main(["eval", *args])
    return ended.value.code, capsys.readouterr().err


def test_bad_input_is_one_message_exit_2_and_nothing_written(
    tiny_dir, trained, tmp_path, capsys, monkeypatch, own_logging
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "noreply.json").write_text(json.dumps([{"instruction": "hi", "output": ""}]))
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"noreply": {"file_name": "noreply.json"}}))
    (tmp_path / "notarun").mkdir()
    before = tree_snapshot(tmp_path)
    run_before = tree_snapshot(trained)
    model = f"model.path={tiny_dir}"
    cases = {
        "unknown dataset": ([model, "data.datasets=[nosuch]"], "nosuch"),
        "no replies": ([model, "data.datasets=[noreply]", "data.dataset_dir=data"], "empty reply"),
        "not a run": ([f"run_dir={tmp_path / 'notarun'}", "eval.split=val"], "not a training run's output_dir"),
        "nothing to do": ([model], "nothing to evaluate"),
        "val without a run": ([model, "eval.split=val"], "give run_dir=RUN"),
        "val and datasets": ([f"run_dir={trained}", "eval.split=val", "data.datasets=[identity]"], "(give one)"),
    }
    for name, (args, said) in cases.items():
        code, err = _eval_cli(args, capsys)
        assert code == 2 and said in err and "Traceback" not in err, (name, err)
        assert err.count("error:") == 1, (name, err)
    assert tree_snapshot(tmp_path) == before and tree_snapshot(trained) == run_before


def test_an_output_dir_of_another_eval_is_refused_unless_overwrite(tiny_dir, tmp_path):
    from telechat_lab.errors import ConfigError
    from telechat_lab.eval.run import run_eval

    base = {"model": ChatModelConfig(path=str(tiny_dir)), "output_dir": str(tmp_path / "o")}
    data = EvalDataConfig(datasets=["identity"], max_samples=2, cache_dir=str(tmp_path / "c"))
    run_eval(settings(data=data, **base))
    other = EvalDataConfig(datasets=["identity"], max_samples=3, cache_dir=str(tmp_path / "c"))
    before = tree_snapshot(tmp_path / "o")
    with pytest.raises(ConfigError, match="holds an eval of other settings"):
        run_eval(settings(data=other, **base))
    assert tree_snapshot(tmp_path / "o") == before
    assert run_eval(settings(data=other, overwrite=True, **base))["metrics"]["examples"] == 3
    assert len(rows_of(tmp_path / "o" / "predictions.jsonl")) == 3


# ------------------------------------------------------------------------------------------------ sweeps


def _fake_sweep(trained: Path, sweep: Path) -> list[Path]:
    """Two jobs of a training sweep: copies of one run whose run.json records different learning rates."""
    jobs = []
    for n, lr in enumerate(["1e-3", "2e-3"]):
        job = sweep / str(n)
        shutil.copytree(trained, job, ignore=shutil.ignore_patterns("eval", "checkpoints", "logs"))
        record = json.loads((job / "run.json").read_text())
        record["overrides"] = [*record.get("overrides", []), f"optim.lr={lr}"]
        (job / "run.json").write_text(json.dumps(record))
        jobs.append(job)
    return jobs


def test_sweep_dir_evaluates_every_job_into_one_table(trained, tmp_path):
    from telechat_lab.eval.run import run_eval

    sweep = tmp_path / "sweep"
    _fake_sweep(trained, sweep)
    result = run_eval(settings(sweep_dir=str(sweep), eval=EvalSettings(split="val", batch_size=3)))
    rows = list(csv.DictReader(open(sweep / "eval_summary_val.csv")))
    assert sorted(r["job"] for r in rows) == ["0", "1"] and [r["optim.lr"] for r in rows] != ["", ""]
    assert [r["best"] for r in rows] == ["*", ""] and float(rows[0]["rouge-l"]) >= float(rows[1]["rouge-l"])
    assert {r["status"] for r in rows} == {"completed"} and all(r["examples"] == "6" for r in rows)
    assert (sweep / "0" / "eval" / "val" / "metrics.json").is_file() and result["summary"].endswith(".md")


def test_eval_multirun_writes_one_summary_row_per_run(trained, tmp_path, capsys, monkeypatch, own_logging):
    from telechat_lab.cli import main

    monkeypatch.chdir(tmp_path)
    jobs = _fake_sweep(trained, tmp_path / "train_sweep")
    out = tmp_path / "eval_sweep"
    main(
        [
            "eval",
            "-m",
            f"run_dir={jobs[0]},{jobs[1]}",
            "eval.split=val",
            "generation.max_new_tokens=3",
            f"hydra.sweep.dir={out}",
        ]
    )
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert sorted(r["run_dir"] for r in rows) == sorted(str(j) for j in jobs)
    assert sorted(r["optim.lr"] for r in rows) == ["1e-3", "2e-3"] and [r["best"] for r in rows].count("*") == 1
    assert "sweep summary (2 jobs)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ during training


def test_the_samples_callback_logs_the_replies_eval_generates(tmp_path):
    from telechat_lab.eval.run import run_eval

    out = tmp_path / "run"
    run_train(
        out,
        "trainer.max_steps=2",
        "trainer.val_check_interval=1",
        "data.max_samples=24",
        "data.val_size=4",
        "callbacks=samples",
        "callbacks.samples.num_prompts=2",
        "callbacks.samples.max_new_tokens=3",
    )
    rows = list(csv.DictReader(open(out / "samples.csv", encoding="utf-8")))
    assert [r["step"] for r in rows] == ["1", "1", "2", "2"]
    table = (out / "samples.md").read_text(encoding="utf-8").splitlines()
    assert len(table) == 2 + 4 and table[0].startswith("| step | example |")  # the header once, then the rows
    run_eval(
        settings(
            run_dir=str(out),
            eval=EvalSettings(split="val"),
            generation=GenerationConfig(max_new_tokens=3, do_sample=False, repetition_penalty=1.0),
        )
    )
    predicted = rows_of(out / "eval" / "val" / "predictions.jsonl")[:2]
    assert [(r["example"], r["reply"]) for r in rows[2:]] == [(p["source"], p["prediction"]) for p in predicted]


def test_the_samples_callback_logs_a_wandb_table_to_a_wandb_logger(tmp_path):
    from types import SimpleNamespace

    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from telechat_lab.eval.samples import COLUMNS, SampleReplies

    class Recording(WandbLogger):
        def __init__(self):  # no wandb run
            self.tables = []

        def log_table(self, key, columns=None, data=None, **kwargs):
            self.tables.append((key, columns, data))

    callback = SampleReplies(str(tmp_path))
    callback.rows = [[1, "d:0", "p", "r", "a"]]
    wandb = Recording()
    callback.log_wandb(SimpleNamespace(loggers=[CSVLogger(str(tmp_path)), wandb]))
    assert wandb.tables == [("samples", list(COLUMNS), [[1, "d:0", "p", "r", "a"]])]


# ------------------------------------------------------------------------------------------------ the command


def test_eval_help_and_completion_show_its_own_keys_without_torch():
    import os
    import subprocess
    import sys

    from helpers import REPO

    program = (
        "import sys; sys.argv[0] = 'telechat-lab'; from telechat_lab.cli import main; main(); "
        "print('TORCH', 'torch' in sys.modules)"
    )

    def run(args, line=None):
        env = {**os.environ, "PYTHONPATH": str(REPO), **({"COMP_LINE": line} if line else {})}
        proc = subprocess.run([sys.executable, "-c", program, *args], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    shown = run(["eval", "--help"])
    assert shown.startswith("eval: ") and "run_dir:" in shown and "summary_metric:" in shown
    assert "Option groups" not in shown and "TORCH False" in shown
    words = run(["-sc", "query=bash"], "telechat-lab eval ").split()
    assert {"run_dir=", "sweep_dir=", "eval.", "generation.", "data.", "model."} <= set(words)
    assert not {"adapter=", "trainer.", "data=", "model="} & set(words)
    assert "TORCH" in words and words[words.index("TORCH") + 1] == "False"
    assert "eval" in run(["-sc", "query=bash"], "telechat-lab ").split()


# ------------------------------------------------------------------------------------------------ harness tasks


def _fake_harness(monkeypatch, calls: list):
    """telechat_lab/eval/harness.py (another part of the project) stood in for: its run_tasks records its call."""
    import sys
    import types

    from telechat_lab.errors import ConfigError

    def run_tasks(model, tokenizer, tasks, **options):
        if "nosuch" in tasks:
            raise ConfigError("eval.tasks: unknown task 'nosuch'")
        calls.append((model, tokenizer, tasks, options))
        return {"results": {t: {"acc": 0.25} for t in tasks}, "table": "| task | acc |"}

    def check_tasks(tasks, include_path=None):
        if "nosuch" in tasks:
            raise ConfigError("eval.tasks: unknown task 'nosuch'")

    module = types.ModuleType("telechat_lab.eval.harness")
    module.run_tasks, module.check_tasks = run_tasks, check_tasks
    monkeypatch.setitem(sys.modules, "telechat_lab.eval.harness", module)


def test_harness_tasks_get_the_model_with_its_adapter_and_go_into_metrics(trained, tmp_path, monkeypatch, capsys):
    from peft import PeftModel

    from telechat_lab.eval.run import run_eval

    calls = []
    _fake_harness(monkeypatch, calls)
    tasks = EvalSettings(tasks=["local_mc"], num_fewshot=2, apply_chat_template=True, limit=5)
    result = run_eval(settings(run_dir=str(trained), eval=tasks, output_dir=str(tmp_path / "t")))
    ((model, tokenizer, names, options),) = calls
    assert isinstance(model, PeftModel) and names == ["local_mc"] and tokenizer is not None
    assert options == {
        "num_fewshot": 2,
        "apply_chat_template": True,
        "system_prompt": None,
        "batch_size": 8,
        "limit": 5,
        "include_path": None,
    }
    assert json.loads((tmp_path / "t" / "metrics.json").read_text()) == {"tasks": {"local_mc": {"acc": 0.25}}}
    assert result["metrics"]["tasks"]["local_mc"]["acc"] == 0.25 and "| task | acc |" in capsys.readouterr().out


def test_an_unknown_task_stops_the_eval_before_anything_is_written(trained, tmp_path, monkeypatch):
    from telechat_lab.errors import ConfigError
    from telechat_lab.eval.run import run_eval

    _fake_harness(monkeypatch, [])
    both = settings(
        run_dir=str(trained),
        eval=EvalSettings(split="val", tasks=["nosuch"]),
        output_dir=str(tmp_path / "t"),
    )
    with pytest.raises(ConfigError, match="unknown task 'nosuch'"):
        run_eval(both)
    assert not (tmp_path / "t").exists()


def test_the_bundled_harness_task_runs_through_the_eval_command(trained, tmp_path, monkeypatch):
    """The real harness (no stand-in): the run's adapter scores the bundled multiple-choice task, offline."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from telechat_lab.eval.run import run_eval

    tasks = EvalSettings(tasks=["telechat_mc"], limit=4, batch_size=4)
    result = run_eval(settings(run_dir=str(trained), eval=tasks, output_dir=str(tmp_path / "t")))
    acc = result["metrics"]["tasks"]["telechat_mc"]["acc"]
    assert acc in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 questions
    assert json.loads((tmp_path / "t" / "metrics.json").read_text())["tasks"]["telechat_mc"]["acc"] == acc


def test_harness_tasks_with_vllm_are_refused_before_loading(tmp_path):
    from telechat_lab.errors import ConfigError
    from telechat_lab.eval.run import run_eval

    with pytest.raises(ConfigError, match="eval.tasks with engine=vllm"):
        run_eval(settings(engine="vllm", eval=EvalSettings(tasks=["telechat_mc"]), output_dir=str(tmp_path / "t")))
    assert not (tmp_path / "t").exists()


def test_api_evaluate_is_the_command(trained, tmp_path):
    from telechat_lab import api

    out = tmp_path / "api"
    result = api.evaluate([f"run_dir={trained}", "eval.split=val", "generation.max_new_tokens=2", f"output_dir={out}"])
    assert result["metrics"] == json.loads((out / "metrics.json").read_text()) and result["metrics"]["examples"] == 6
    assert {r["generated_tokens"] for r in rows_of(out / "predictions.jsonl")} <= {1, 2}


def test_the_vllm_path_hands_the_batch_to_vllm_and_reads_its_tokens(monkeypatch):
    """engine=vllm cannot run here (no vLLM on CPU): its glue, against a stand-in vllm package."""
    import sys
    import types
    from types import SimpleNamespace

    from telechat_lab.eval.predict import generate_vllm

    made = {}

    class LLM:
        def generate(self, prompts, params, lora_request=None):
            made.update(prompts=prompts, params=params, lora=lora_request)
            return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[7, 8, 2])]) for _ in prompts]

    modules = {
        "vllm": types.ModuleType("vllm"),
        "vllm.inputs": types.ModuleType("vllm.inputs"),
        "vllm.lora": types.ModuleType("vllm.lora"),
        "vllm.lora.request": types.ModuleType("vllm.lora.request"),
    }
    modules["vllm"].SamplingParams = lambda **kw: kw
    modules["vllm.inputs"].TokensPrompt = lambda prompt_token_ids: {"ids": prompt_token_ids}
    modules["vllm.lora.request"].LoRARequest = lambda name, n, path: (name, n, path)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    from telechat_lab.chat.engines import VLLMEngine

    engine = VLLMEngine.__new__(VLLMEngine)  # chat's engine, without loading a model into vLLM
    engine.llm, engine.adapters = LLM(), ["/a/converted"]
    out = generate_vllm(engine, [[1, 2], [3]], {"max_new_tokens": 5, "do_sample": False, "repetition_penalty": 1.0})
    assert out == [[7, 8, 2], [7, 8, 2]]
    assert made["prompts"] == [{"ids": [1, 2]}, {"ids": [3]}] and made["lora"] == ("adapter", 1, "/a/converted")
    assert made["params"]["max_tokens"] == 5 and made["params"]["temperature"] == 0.0
    assert made["params"]["stop_token_ids"] == [2]


def test_prompts_longer_than_the_model_takes_are_left_out_and_counted(tiny_dir, tmp_path, capsys):
    from telechat_lab.errors import ConfigError
    from telechat_lab.eval.run import build_examples, resolve_target, run_eval

    data = EvalDataConfig(datasets=["identity"], max_samples=4, cache_dir=str(tmp_path / "c"))
    config = settings(model=ChatModelConfig(path=str(tiny_dir)), data=data, output_dir=str(tmp_path / "o"))
    lengths = sorted({len(ex.prompt_ids) for ex in build_examples(config, resolve_target(config))[0]})
    assert len(lengths) >= 2 and json.loads((tiny_dir / "config.json").read_text())["training_seqlen"] == 256
    room = lengths[0]  # only the shortest prompts fit
    long = GenerationConfig(max_new_tokens=256 - room, do_sample=False, repetition_penalty=1.0)
    result = run_eval(settings(model=config.model, data=data, output_dir=str(tmp_path / "o"), generation=long))
    rows = rows_of(tmp_path / "o" / "predictions.jsonl")
    assert (
        rows and all(r["prompt_tokens"] == room for r in rows) and [r["index"] for r in rows] == list(range(len(rows)))
    )
    assert result["metrics"]["left_out_too_long"] == 4 - len(rows)
    assert f"{4 - len(rows)} of 4 prompts are longer than the {room} tokens" in capsys.readouterr().err
    too_long = GenerationConfig(max_new_tokens=256 - room + 1, do_sample=False, repetition_penalty=1.0)
    with pytest.raises(ConfigError, match="every prompt is too long"):
        run_eval(settings(model=config.model, data=data, output_dir=str(tmp_path / "p"), generation=too_long))
    assert not (tmp_path / "p").exists()


def test_bad_samples_settings_are_a_config_error_and_nothing_is_kept(tmp_path):
    from telechat_lab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"callbacks.samples.every_n_val=0: must be at least 1"):
        run_train(tmp_path / "run", "trainer.max_steps=1", "callbacks=samples", "callbacks.samples.every_n_val=0")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"callbacks=samples replies to validation prompts: set data.val_size"):
        run_train(tmp_path / "run", "trainer.max_steps=1", "callbacks=samples")  # QUICK: data.val_size=0
    assert not (tmp_path / "run").exists()


def test_an_eval_sweep_with_a_failing_job_goes_on_and_exits_1(trained, tmp_path):
    from helpers import run_script

    (tmp_path / "notarun").mkdir()
    out = tmp_path / "eval_sweep"
    args = [f"run_dir={trained},{tmp_path / 'notarun'}", "eval.split=val", "generation.max_new_tokens=2"]
    proc = run_script("eval.py", ["-m", *args, f"output_dir={tmp_path / 'o'}", f"hydra.sweep.dir={out}"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "not a training run's output_dir" in proc.stderr and "1 of 2 jobs failed: 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [(r["job"], r["status"], r["best"]) for r in rows] == [("0", "completed", "*"), ("1", "failed", "")]
    assert [r["run_dir"] for r in rows] == [str(trained), str(tmp_path / "notarun")]


def test_harness_prompts_take_the_runs_system_prompt_unless_given(monkeypatch):
    from types import SimpleNamespace

    from telechat_lab.eval.run import Target, _run_tasks

    calls = []
    _fake_harness(monkeypatch, calls)
    engine = SimpleNamespace(model="model", tokenizer="tokenizer")
    target = Target(Path("base"), [], default_system="You are X.")
    _run_tasks(settings(eval=EvalSettings(tasks=["t"], apply_chat_template=True)), engine, target)
    _run_tasks(settings(eval=EvalSettings(tasks=["t"], system_prompt="You are Y.")), engine, target)
    assert [options["system_prompt"] for *_, options in calls] == ["You are X.", "You are Y."]
