"""Inspect the encoded data: `python -m telechat_lab.data.inspect <overrides> output=FILE.jsonl`.

Takes the same `stage`, `model` and `data` overrides as train.py (for example `model.path=DIR
data.dataset_dir=DIR data.datasets=[name] data.cutoff_len=100000 data.mask_history=true`), writes one
JSON line `{"input_ids": [...], "labels": [...]}` per encoded example in dataset order (before
packing, mixing, splitting or shuffling), and shows a few examples with their trained tokens
highlighted, with the counts. With `stage=dpo` an example is a pair: its line holds `chosen_input_ids`,
`chosen_labels`, `rejected_input_ids`, `rejected_labels` and `prompt_len`, and both sequences are shown; with
`stage=kto` a line also holds `prompt_len` and `kto_tag` (desirable: true).
"""

from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf

from telechat_lab.stages import stage_of
from telechat_lab.tokenizer import IGNORE_INDEX

SEQUENCES = {"pairwise": ("chosen_", "rejected_")}  # the sequences of an example, by key prefix


def highlighted(tokenizer, input_ids, labels):
    """A rich Text of the example: trained tokens green on black, the rest dim."""
    from rich.text import Text

    text = Text()
    run, trained = [], None
    for tok, lab in zip(list(input_ids) + [None], list(labels) + [None]):
        is_trained = lab is not None and lab != IGNORE_INDEX
        if tok is None or (trained is not None and is_trained != trained):
            text.append(tokenizer.decode(run, skip_special_tokens=False), style="bold green" if trained else "dim")
            run = []
        if tok is not None:
            run.append(int(tok))
            trained = is_trained
    return text


def _line_order(key: str) -> tuple:
    """input_ids before labels, chosen before rejected, the rest after."""
    order = ["input_ids", "labels", "chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"]
    return (order.index(key) if key in order else len(order), key)


def run(cfg: DictConfig) -> dict:
    from rich.console import Console

    from telechat_lab.data import build_datasets, format_report
    from telechat_lab.files import atomic_open, check_new_output
    from telechat_lab.resolve import tokenizer_dir
    from telechat_lab.tokenizer import load_tokenizer

    settings = OmegaConf.to_object(cfg)
    if settings.output:
        check_new_output("output", settings.output, settings.overwrite)
    model_dir = tokenizer_dir(settings.model.path)
    data_cfg = settings.data
    data_cfg.val_size = 0  # every encoded example once, in dataset order (no mixing, sampling or split)
    kind = stage_of(settings.stage.name).data
    dataset, _, report = build_datasets(data_cfg, model_dir, shuffle_order=False, sample=False, kind=kind)
    prefixes = SEQUENCES.get(kind, ("",))

    if cfg.output:
        with atomic_open(cfg.output) as f:
            for i in range(len(dataset)):
                line = {key: value.tolist() for key, value in dataset[i].items()}
                f.write(json.dumps({key: line[key] for key in sorted(line, key=_line_order)}) + "\n")

    console = Console()
    tokenizer = load_tokenizer(model_dir)
    for i in range(min(int(cfg.show), len(dataset))):
        ex = dataset[i]
        name = dataset.names[dataset.source[dataset.index[i], 0]]
        tag = "" if "kto_tag" not in ex else (" (desirable)" if ex["kto_tag"] else " (undesirable)")
        for prefix in prefixes:
            what = f" {prefix.rstrip('_')}" if prefix else ""
            console.rule(
                f"{name} record {dataset.source[dataset.index[i], 1]}{what}{tag}: "
                f"{len(ex[prefix + 'input_ids'])} tokens"
            )
            console.print(highlighted(tokenizer, ex[prefix + "input_ids"], ex[prefix + "labels"]))
    console.print(format_report(report), highlight=False, soft_wrap=True)  # a table: never wrapped
    if cfg.output:
        console.print(f"wrote {len(dataset)} examples to {cfg.output}")
    return report
