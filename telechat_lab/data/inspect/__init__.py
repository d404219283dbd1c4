"""Inspect the encoded data: `python -m telechat_lab.data.inspect <overrides> output=FILE.jsonl`.

Takes the same `model` and `data` overrides as train.py (for example `model.path=DIR
data.dataset_dir=DIR data.datasets=[name] data.cutoff_len=100000 data.mask_history=true`), writes one
JSON line `{"input_ids": [...], "labels": [...]}` per encoded example in dataset order (before
packing, mixing, splitting or shuffling), and shows a few examples with their trained tokens
highlighted, with the counts.
"""

from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf

from telechat_lab.tokenizer import IGNORE_INDEX


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
    dataset, _, report = build_datasets(data_cfg, model_dir, shuffle_order=False, sample=False)

    if cfg.output:
        with atomic_open(cfg.output) as f:
            for i in range(len(dataset)):
                ex = dataset[i]
                f.write(json.dumps({"input_ids": ex["input_ids"].tolist(), "labels": ex["labels"].tolist()}) + "\n")

    console = Console()
    tokenizer = load_tokenizer(model_dir)
    for i in range(min(int(cfg.show), len(dataset))):
        ex = dataset[i]
        name = dataset.names[dataset.source[dataset.index[i], 0]]
        console.rule(f"{name} record {dataset.source[dataset.index[i], 1]}: {len(ex['input_ids'])} tokens")
        console.print(highlighted(tokenizer, ex["input_ids"], ex["labels"]))
    console.print(format_report(report), highlight=False, soft_wrap=True)  # a table: never wrapped
    if cfg.output:
        console.print(f"wrote {len(dataset)} examples to {cfg.output}")
    return report
