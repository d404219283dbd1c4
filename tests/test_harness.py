"""Benchmarks through lm-evaluation-harness (telechat_lab/eval/harness.py) on the tiny model, fully offline: the
harness's log-likelihood of every choice of the project's own task (telechat_lab/eval/tasks/) equals our own
computation with the model, on the same tokens, with and without the chat template, base model and adapter; the
accuracy it reports equals the accuracy recomputed from our log-likelihoods; with the chat template the prompt's
ids are those the training encoder builds for that conversation. Bad input: one clear message."""

from __future__ import annotations

import configparser
import fnmatch
import json
import socket

import pytest
import torch
from helpers import REPO, make_adapter

pytest.importorskip("lm_eval", reason="the eval extra (lm-evaluation-harness) is not installed")

from telechat_lab.data.encoder import ChatEncoder, TemplateOptions  # noqa: E402
from telechat_lab.data.formats import Conversation  # noqa: E402
from telechat_lab.errors import ConfigError, reported  # noqa: E402
from telechat_lab.eval.harness import BUNDLED_TASKS, bundled_tasks, check_tasks, run_tasks  # noqa: E402
from telechat_lab.tokenizer import DEFAULT_SYSTEM_PROMPT, EOS_ID, PAD_ID, load_tokenizer  # noqa: E402

# float32 on the CPU: the harness scores a batch (right-padded, several sequences at once), we score each sequence
# alone; the two differ by rounding only (about 1e-6 here)
TOLERANCE = 1e-4
LETTERS = ["A", "B", "C", "D"]


def docs(split: str) -> list[dict]:
    lines = (BUNDLED_TASKS / f"telechat_mc_{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


# the prompts as the task YAMLs describe them, written out here independently
def letter_prompt(doc: dict) -> str:
    options = [f"{letter}. {choice}" for letter, choice in zip(LETTERS, doc["choices"])]
    return "\n".join([doc["question"], *options, "答案：" if doc["lang"] == "zh" else "Answer:"])


def text_prompt(doc: dict) -> str:
    zh = doc["lang"] == "zh"
    return ("问题：" if zh else "Question: ") + doc["question"] + "\n" + ("答案：" if zh else "Answer:")


def description(doc: dict) -> str:
    """telechat_mc's description, put before its questions (ceval-valid, cmmlu and mmlu have one too)."""
    zh = "以下是单项选择题，请选出正确答案。"
    return (
        zh if doc["lang"] == "zh" else "The following is a multiple choice question. Choose the correct answer."
    ) + "\n\n"


TASKS = {  # task -> (its description, its prompt, its choices, the answer of a few-shot example)
    "telechat_mc": (description, letter_prompt, lambda doc: LETTERS, lambda doc: LETTERS[doc["answer"]]),
    "telechat_mc_text": (
        lambda doc: "",
        text_prompt,
        lambda doc: doc["choices"],
        lambda doc: doc["choices"][doc["answer"]],
    ),
}


def system_turn(system: str, described: str) -> str:
    """The system message lm-eval writes with the chat template: the system prompt, then the task's description
    (after a blank line)."""
    return system + "\n\n" + described if system and described else system or described


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """No network (any connection attempt is recorded and refused, so nothing can hang), and the datasets cache of
    this test session instead of the user's."""
    import datasets

    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"a test tried to reach {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets"))
    yield
    assert attempts == [], f"network access attempted: {attempts}"


@pytest.fixture(scope="module")
def base(tiny_dir):
    from telechat_lab.model import Telechat2ForCausalLM

    return Telechat2ForCausalLM.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def with_adapter(tiny_dir, tmp_path_factory):
    from peft import PeftModel

    from telechat_lab.model import Telechat2ForCausalLM

    adapter = make_adapter(tiny_dir, tmp_path_factory.mktemp("adapter") / "lora")
    return PeftModel.from_pretrained(Telechat2ForCausalLM.from_pretrained(tiny_dir), str(adapter)).eval()


@pytest.fixture
def scored(monkeypatch):
    """Every (context, continuation) the harness scores: its token ids and its log-likelihood, by the strings."""
    from lm_eval.models.huggingface import HFLM

    seen: dict[tuple[str, str], tuple[list[int], list[int], float]] = {}
    original = HFLM._loglikelihood_tokens

    def spy(self, requests, **kwargs):
        results = original(self, requests, **kwargs)  # in the order of `requests`
        for (strings, context_ids, continuation_ids), (loglikelihood, _greedy) in zip(requests, results):
            seen[strings] = (list(context_ids), list(continuation_ids), loglikelihood)
        return results

    monkeypatch.setattr(HFLM, "_loglikelihood_tokens", spy)
    return seen


def our_loglikelihood(model, context_ids: list[int], continuation_ids: list[int]) -> float:
    """log P(continuation | context) from the model's logits for the one sequence, unpadded."""
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    start = len(context_ids)
    return sum(float(logprobs[start - 1 + i, token]) for i, token in enumerate(continuation_ids))


def check_accuracy(result: dict, task: str, ours: list[list[float]], answers: list[int], choices: list[list[str]]):
    """The reported accuracy (and length-normalised accuracy where reported) from our log-likelihoods."""
    metrics = result["results"][task]
    acc = sum(max(range(len(ll)), key=ll.__getitem__) == gold for ll, gold in zip(ours, answers)) / len(ours)
    assert metrics["acc"] == pytest.approx(acc, abs=1e-12)
    if "acc_norm" in metrics:
        norm = [[v / len(c) for v, c in zip(ll, cs)] for ll, cs in zip(ours, choices)]
        acc_norm = sum(max(range(len(n)), key=n.__getitem__) == gold for n, gold in zip(norm, answers)) / len(ours)
        assert metrics["acc_norm"] == pytest.approx(acc_norm, abs=1e-12)
    assert result["num_docs"][task] == len(ours)


def test_plain_prompts_score_as_our_own_computation(base, tokenizer, tiny_dir, scored):
    """No chat template, zero-shot: the harness's prompt and the answer after a space, as lm-eval writes them for
    a base model (no system prompt: a plain prompt has no system turn); the answer's tokens are the whole text's
    tokens after the prompt's (SentencePiece's own)."""
    limit = 8
    result = run_tasks(
        base,
        tokenizer,
        list(TASKS),
        limit=limit,
        batch_size=4,
        log_samples=True,
        system_prompt="Not in a plain prompt.",
    )
    sp = ChatEncoder(tiny_dir)
    for task, (described, prompt, choices_of, _) in TASKS.items():
        ours, answers, choices = [], [], []
        samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
        for doc, sample in zip(docs("test")[:limit], samples, strict=True):
            context = described(doc) + prompt(doc)  # a plain prompt: the description, then the question
            lls = []
            for choice, (ll, _greedy) in zip(choices_of(doc), sample["filtered_resps"], strict=True):
                context_ids = sp.encode_text(context)
                whole = sp.encode_text(context + " " + choice)
                assert whole[: len(context_ids)] == context_ids  # the answer's tokens are exactly the answer's
                continuation_ids = whole[len(context_ids) :]
                assert scored[(context, " " + choice)][:2] == (context_ids, continuation_ids)
                mine = our_loglikelihood(base, context_ids, continuation_ids)
                assert ll == scored[(context, " " + choice)][2]
                assert abs(ll - mine) < TOLERANCE, (task, doc["id"], choice, ll, mine)
                lls.append(mine)
            ours.append(lls)
            answers.append(doc["answer"])
            choices.append(choices_of(doc))
        check_accuracy(result, task, ours, answers, choices)
    assert "telechat_mc_text" in result["table"] and "acc_norm" in result["table"]


def check_chat_scores(model, model_dir, result, scored, limit, shots, base=None) -> bool:
    """Each context's ids are ChatEncoder's for the conversation (TeleChat's default system prompt and the task's
    description, the dev split's first `shots` questions answered as earlier turns, then the question), each
    answer is scored as the reply
    (training's ids for it; only <_end> follows it in training), with the log-likelihood we compute with `model`;
    the accuracies follow from ours. Returns whether any score differs from `base`'s (where given)."""
    encoder = ChatEncoder(model_dir, TemplateOptions(default_system=None))
    by_ids = {(tuple(c), tuple(r)): ll for c, r, ll in scored.values()}
    assert len(by_ids) == len(scored) == sum(limit * 4 for _ in TASKS)
    differs = False
    for task, (described, prompt, choices_of, answer_of) in TASKS.items():
        ours, answers, choices = [], [], []
        examples = [(prompt(d), answer_of(d)) for d in docs("dev")[:shots]]
        for doc in docs("test")[:limit]:
            system = system_turn(DEFAULT_SYSTEM_PROMPT, described(doc))
            context_ids = encoder.prompt_ids(Conversation(system=system, turns=[*examples, (prompt(doc), None)]))
            lls = []
            for choice in choices_of(doc):
                reply_ids = encoder.encode_text(choice)
                trained = encoder.encode(Conversation(system=system, turns=[*examples, (prompt(doc), choice)]))
                assert trained.input_ids == context_ids + reply_ids + [EOS_ID]
                ll = by_ids[(tuple(context_ids), tuple(reply_ids))]
                mine = our_loglikelihood(model, context_ids, reply_ids)
                assert abs(ll - mine) < TOLERANCE, (task, doc["id"], choice, ll, mine)
                if base is not None:
                    differs |= abs(mine - our_loglikelihood(base, context_ids, reply_ids)) > 1e-3
                lls.append(mine)
            ours.append(lls)
            answers.append(doc["answer"])
            choices.append(choices_of(doc))
        check_accuracy(result, task, ours, answers, choices)
    assert all(context.startswith("<_system>" + DEFAULT_SYSTEM_PROMPT + "\n") for context, _ in scored)
    return differs


def test_the_chat_template_scores_the_conversation_training_encodes(with_adapter, base, tokenizer, tiny_dir, scored):
    """Chat template, one-shot (two would pass the tiny model's 256 tokens), an adapter applied: see
    check_chat_scores."""
    limit, shots = 4, 1
    result = run_tasks(
        with_adapter, tokenizer, list(TASKS), num_fewshot=shots, apply_chat_template=True, limit=limit, batch_size=2
    )
    assert check_chat_scores(with_adapter, tiny_dir, result, scored, limit, shots, base=base)  # the adapter's
    assert "|     1|" in result["table"]  # the n-shot column


def test_the_chat_template_with_the_real_vocabulary(tiny_real_vocab_dir, scored):
    """The same with TeleChat2's own 131072-piece tokenizer (a tiny model on it; skips without ../shared)."""
    from telechat_lab.model import Telechat2ForCausalLM

    model = Telechat2ForCausalLM.from_pretrained(tiny_real_vocab_dir).eval()
    limit, shots = 2, 1
    result = run_tasks(
        model,
        load_tokenizer(tiny_real_vocab_dir),
        list(TASKS),
        num_fewshot=shots,
        apply_chat_template=True,
        limit=limit,
        batch_size=4,
    )
    check_chat_scores(model, tiny_real_vocab_dir, result, scored, limit, shots)


@pytest.mark.parametrize("system_prompt", ["", "You answer quiz questions."])
def test_the_system_prompt_is_the_one_given(base, tokenizer, tiny_dir, scored, system_prompt):
    """system_prompt "" gives no system block (as data.default_system "" does) where the task has no description,
    the description alone where it has one; another system prompt is the system turn, the description after it."""
    run_tasks(base, tokenizer, list(TASKS), apply_chat_template=True, system_prompt=system_prompt, limit=2)
    encoder = ChatEncoder(tiny_dir, TemplateOptions(default_system=""))
    expected = {
        tuple(
            encoder.prompt_ids(Conversation(system=system_turn(system_prompt, described(d)), turns=[(prompt(d), None)]))
        )
        for described, prompt, _, _ in TASKS.values()
        for d in docs("test")[:2]
    }
    assert {tuple(context) for context, _, _ in scored.values()} == expected
    plain = [
        context
        for (text, _), (context, _, _) in scored.items()
        if "Choose the correct" not in text and "选出" not in text
    ]
    assert len(plain) == 8 and all((context[0] == 6) == bool(system_prompt) for context in plain)  # <_system>


GENERATION_TASK = """task: quiz_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def test_a_generation_task_of_ones_own_in_include_path(base, tokenizer, tiny_dir, tmp_path):
    """include_path adds a folder of the user's task YAMLs (data files by absolute path, as lm-eval reads them),
    the bundled tasks still beside it. A generation task (as gsm8k is) with the chat template: each answer is the
    model's greedy reply to ChatEncoder's prompt ids, cut at the task's stop sequence; exact match from them."""
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "quiz_gen.yaml").write_text(GENERATION_TASK.format(data=BUNDLED_TASKS / "telechat_mc_test.jsonl"))
    (tasks_dir / "quiz_group.yaml").write_text("group: quiz_group\ntask:\n  - quiz_gen\n")
    limit = 3
    result = run_tasks(
        base,
        tokenizer,
        ["quiz_gen", "telechat_mc"],
        apply_chat_template=True,
        limit=limit,
        include_path=str(tasks_dir),
        log_samples=True,
    )
    assert result["num_docs"] == {"quiz_gen": limit, "telechat_mc": limit}
    encoder = ChatEncoder(tiny_dir, TemplateOptions(default_system=None))
    samples = sorted(result["samples"]["quiz_gen"], key=lambda s: s["doc_id"])
    replies, targets = [], []
    for doc, sample in zip(docs("test")[:limit], samples, strict=True):
        prompt = torch.tensor([encoder.prompt_ids(Conversation(system=None, turns=[(doc["question"], None)]))])
        with torch.no_grad():
            out = base.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=EOS_ID,
                pad_token_id=PAD_ID,
            )
        reply = encoder.sp.decode(out[0, prompt.shape[1] :].tolist()).split("\n")[0]  # control pieces: no text
        assert sample["filtered_resps"] == [reply]
        replies.append(reply)
        targets.append(doc["choices"][doc["answer"]])
    exact = sum(r == t for r, t in zip(replies, targets)) / limit
    assert result["results"]["quiz_gen"]["exact_match"] == pytest.approx(exact, abs=1e-12)
    with pytest.raises(ConfigError, match="eval.tasks: Duplicate task 'quiz_gen'.*: name either the group or its task"):
        run_tasks(base, tokenizer, ["quiz_group", "quiz_gen"], limit=1, include_path=str(tasks_dir))


def test_an_unknown_task_is_one_clear_message(base, tokenizer, capsys, tmp_path):
    with pytest.raises(ConfigError) as err:
        run_tasks(base, tokenizer, ["telechat_mc", "telechat_mcq", "no_such_benchmark"])
    text = str(err.value)
    assert err.value.problems[0].startswith("eval.tasks: unknown task 'telechat_mcq' (did you mean 'telechat_mc'")
    assert "'no_such_benchmark'" in err.value.problems[1] and len(err.value.problems) == 2
    assert "lm-eval ls tasks" in text and "eval.include_path" in text
    with pytest.raises(SystemExit) as stopped, reported():  # as a command reports it: exit 2, no traceback
        check_tasks(["no_such_benchmark"])
    assert stopped.value.code == 2
    stderr = capsys.readouterr().err
    assert "no_such_benchmark" in stderr and "Traceback" not in stderr
    assert [c["task"] for c in check_tasks(["telechat_mc*", "telechat_mc"])] == ["telechat_mc", "telechat_mc_text"]
    with pytest.raises(ConfigError, match="unknown task 'telechat_xy[*]'"):  # a pattern that matches nothing
        check_tasks(["telechat_xy*"])
    task_file = tmp_path / "a_task.yaml"
    task_file.write_text("task: a_task\n")
    assert check_tasks([str(task_file)]) == [str(task_file)]  # a task YAML by its path, as lm-eval takes it
    with pytest.raises(ConfigError, match="unknown task"):
        check_tasks([str(tmp_path / "missing.yaml")])


def test_a_hub_task_without_its_data_says_how_to_download_it(base, tokenizer, capsys):
    """Offline, a hub task whose data is not cached: one message naming the dataset and how to fetch it, no
    traceback, and no connection attempted (the offline fixture refuses and records any)."""
    with pytest.raises(SystemExit) as stopped, reported():
        run_tasks(base, tokenizer, ["telechat_mc", "gsm8k"], limit=1)
    assert stopped.value.code == 2
    stderr = capsys.readouterr().err
    assert "openai/gsm8k" in stderr and "lm-eval run --model dummy --tasks gsm8k --limit 1" in stderr, stderr
    assert "HF_DATASETS_OFFLINE=1" in stderr and "Traceback" not in stderr


def test_a_benchmark_prints_no_git_error_and_no_lm_eval_info_lines(
    base, tokenizer, tmp_path, monkeypatch, capfd, caplog
):
    """Outside a git repository (lm-eval records the working directory's commit) and with INFO lines on, as a
    command's console has them: no "fatal: not a git repository" from git, and none of lm-eval's INFO lines."""
    import logging

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # not inside one above it either
    caplog.set_level(logging.INFO)
    run_tasks(base, tokenizer, ["telechat_mc_text"], limit=1)
    assert "fatal:" not in capfd.readouterr().err
    assert [
        r.getMessage() for r in caplog.records if r.name.startswith("lm_eval") and r.levelno < logging.WARNING
    ] == []
    assert logging.getLogger("lm_eval").level == logging.NOTSET  # as it was


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="eval.include_path: /no/such/folder is not a directory"):
        check_tasks(["telechat_mc"], include_path="/no/such/folder")
    with pytest.raises(ConfigError, match="eval.tasks: no task named"):
        check_tasks([])
    for key, kwargs in (
        ("num_fewshot", {"num_fewshot": -1}),
        ("batch_size", {"batch_size": 0}),
        ("limit", {"limit": 0}),
    ):
        with pytest.raises(ConfigError, match=f"eval.{key}: "):
            run_tasks(None, None, ["telechat_mc"], **kwargs)


def test_the_bundled_tasks_are_package_data():
    """Every file of telechat_lab/eval/tasks/ is in setup.cfg's package data (an installed package has them)."""
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    globs = setup["options.package_data"]["telechat_lab"].split()
    files = [p.relative_to(REPO / "telechat_lab").as_posix() for p in BUNDLED_TASKS.iterdir() if p.is_file()]
    assert bundled_tasks() == ["telechat_mc", "telechat_mc_text"] and len(files) == 4
    assert [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)] == []
    assert len(docs("test")) == 36 and len(docs("dev")) == 4
    assert {d["lang"] for d in docs("test")} == {"zh", "en"}


def test_a_bf16_model_is_scored_in_float32(tiny_dir, tokenizer, scored):
    """The softmax runs in float32 on a bf16 model's logits: the log-likelihoods equal ours (float64 on the same
    logits) as closely as a float32 model's do, not rounded to bf16."""
    from telechat_lab.model import Telechat2ForCausalLM

    model = Telechat2ForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).eval()
    run_tasks(model, tokenizer, ["telechat_mc_text"], limit=2)
    lls = [ll for _, _, ll in scored.values()]
    ours = [our_loglikelihood(model, context, continuation) for context, continuation, _ in scored.values()]
    assert not all(ll == float(torch.tensor(ll).bfloat16()) for ll in lls)
    assert max(abs(a - b) for a, b in zip(lls, ours)) < TOLERANCE  # bf16's softmax would be ~1e-2 off
