"""The examples eval scores, and their predictions.

An example is an encoded training example (telechat_lab.data.pipeline.build_datasets, with the run's template
settings): its prompt is everything up to and including the last `<_bot>` (what the training encoder built and what
chat.py sends for the same conversation), its reference the last reply, as encoded for training (its tokens decoded
as chat shows text: the tool tags kept, the other control tokens dropped). Only the last reply of a multi-turn
example is scored; the earlier ones are part of its prompt.

Generation is batched and greedy by default; the prompts of a batch are left-padded. `predictions.jsonl` gets one
line per example, appended and flushed a batch at a time (never rewritten): an interrupted eval continues after its
last complete line (a half-written last line is cut off and generated again).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from telechat_lab.errors import DataError
from telechat_lab.tokenizer import BOT_ID, EOS_ID, PAD_ID, visible_ids

PREDICTIONS = "predictions.jsonl"


@dataclass
class Example:
    index: int  # its position in the eval
    source: str  # "dataset:record" (the record's line number, or index in a JSON list)
    prompt_ids: list[int]
    reference_ids: list[int]  # the reply's tokens, without its <_end>


def examples_of(dataset) -> list[Example]:
    """Every example of an EncodedDataset, in its order: a conversation's last reply, a preference pair's chosen
    reply, a KTO example's reply where it is desirable (an undesirable one is no reference: left out)."""
    found = []
    for i in range(len(dataset)):
        item = dataset[i]
        if "kto_tag" in item and not bool(item["kto_tag"]):
            continue
        ids = (item["input_ids"] if "input_ids" in item else item["chosen_input_ids"]).tolist()
        last_bot = len(ids) - 1 - ids[::-1].index(BOT_ID)
        reply = ids[last_bot + 1 :]
        if reply and reply[-1] == EOS_ID:
            reply = reply[:-1]
        j = dataset.index[i]
        name = dataset.names[dataset.source[j, 0]] if dataset.names else "?"
        found.append(Example(len(found), f"{name}:{int(dataset.source[j, 1])}", ids[: last_bot + 1], reply))
    return found


def fingerprint(examples: list[Example]) -> str:
    """What identifies the examples (their prompts and references, in order)."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.prompt_ids, ex.reference_ids]).encode())
    return digest.hexdigest()[:16]


def text_of(tokenizer, ids: list[int]) -> str:
    """Reply tokens as chat shows them: the tool tags kept, the other control tokens dropped."""
    return tokenizer.decode(visible_ids(ids), skip_special_tokens=False)


# ------------------------------------------------------------------------------------------------ generation


def generate_hf(engine, prompts: list[list[int]], generation: dict) -> list[list[int]]:
    """Each prompt's generated tokens (its <_end> included when it stopped there), the batch left-padded."""
    import torch

    from telechat_lab.chat.engines import generation_kwargs

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    with torch.no_grad():
        out = engine.model.generate(
            input_ids=ids.to(engine.device),
            attention_mask=mask.to(engine.device),
            eos_token_id=EOS_ID,
            pad_token_id=PAD_ID,
            **generation_kwargs(generation),
        )
    return [_until_end(row[width:].tolist()) for row in out]


def generate_vllm(engine, prompts: list[list[int]], generation: dict) -> list[list[int]]:
    """The same through chat's VLLMEngine (its LLM and adapter): one generate call for the batch (vLLM batches it
    itself). Not run by the tests here (no vLLM on CPU)."""
    return [_until_end(ids) for ids in engine.generate_ids(prompts, generation)]


def _until_end(ids: list[int]) -> list[int]:
    """Generated ids up to and including the first <_end> (the padding after it dropped)."""
    return ids[: ids.index(EOS_ID) + 1] if EOS_ID in ids else [t for t in ids if t != PAD_ID]


# ------------------------------------------------------------------------------------------------ the file


def read_done(path: Path, examples: list[Example]) -> list[dict]:
    """The complete lines of an earlier, interrupted eval in `path` (each checked against its example); a
    half-written last line is cut off the file."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    rows = []
    for lineno, line in enumerate(complete.splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(
                f"{path} line {lineno}: not a JSON line of eval's; set overwrite=true to start again"
            ) from None
        n = len(rows)
        if n >= len(examples) or row.get("index") != n or row.get("prompt_tokens") != len(examples[n].prompt_ids):
            raise DataError(
                f"{path} line {lineno}: not the prediction of example {n} of this eval; set overwrite=true to "
                "start again"
            )
        rows.append(row)
    if len(complete) < len(data):  # a line cut off mid-write (the process was killed)
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    return rows


def predict(
    generate, tokenizer, examples: list[Example], path: Path, batch_size: int, generation: dict, done: list[dict]
) -> list[dict]:
    """Generate the predictions of the examples after `done`, appending each batch's lines to `path`; every row."""
    from .progress import Progress

    rows = list(done)
    todo = examples[len(done) :]
    if done:
        print(f"eval: resuming: {len(done)} of {len(examples)} predicted in {path}", file=sys.stderr, flush=True)
    with open(path, "a", encoding="utf-8") as f, Progress(len(examples), len(done), "predicted") as bar:
        for batch in _batches(todo, batch_size):
            start = time.perf_counter()
            generated = generate([ex.prompt_ids for ex in batch], generation)
            seconds = (time.perf_counter() - start) / len(batch)  # each example's share of the batch's time
            lines = []
            for ex, ids in zip(batch, generated, strict=True):
                reply = ids[:-1] if ids and ids[-1] == EOS_ID else ids
                row = {
                    "index": ex.index,
                    "source": ex.source,
                    "prompt": tokenizer.decode(ex.prompt_ids, skip_special_tokens=False),
                    "reference": text_of(tokenizer, ex.reference_ids),
                    "prediction": text_of(tokenizer, reply),
                    "prompt_tokens": len(ex.prompt_ids),
                    "reference_tokens": len(ex.reference_ids),
                    "generated_tokens": len(ids),
                    "stopped": bool(ids) and ids[-1] == EOS_ID,  # false: it reached generation.max_new_tokens
                    "seconds": seconds,
                }
                rows.append(row)
                lines.append(json.dumps(row, ensure_ascii=False) + "\n")
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(rows))
    return rows


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
