"""Generation metrics of predictions against references, as LLaMA-Factory's predict reports them
(src/llamafactory/train/sft/metric.py, ComputeSimilarity), so that numbers compare with its published ones:

- ROUGE-1/2/L: both texts segmented with jieba (`jieba.cut`: Chinese into words, English into words, spaces
  and punctuation as tokens of their own), the segments joined by spaces and scored by `rouge-chinese`'s
  `Rouge().get_scores` (which splits on whitespace); the F score of each example x 100, rounded to 4 decimals;
  an example whose prediction or reference has no segment scores 0.
- BLEU-4: NLTK's `sentence_bleu` on characters (the reference's and the prediction's `list(text)`), with
  `SmoothingFunction().method3`, x 100, rounded to 4 decimals.
- each metric the mean over examples; besides: exact match (prediction == reference after stripping
  surrounding whitespace, in % of examples), the mean generated length (tokens) and tokens per second.

The libraries are the `eval` extra (pip install "telechat-lab[eval]").
"""

from __future__ import annotations

import logging

SIMILARITY = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")
REPORTED = (*SIMILARITY, "exact_match", "gen_len", "tokens_per_second", "examples", "left_out_too_long")


def _libraries():
    try:
        import jieba
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_chinese import Rouge
    except ImportError as err:
        from telechat_lab.errors import ConfigError

        raise ConfigError(
            f'eval: BLEU and ROUGE need {err.name}, which is not installed: pip install "telechat-lab[eval]"'
        ) from None
    jieba.setLogLevel(logging.WARNING)  # its dictionary-loading notes are not the user's business
    return jieba, Rouge, sentence_bleu, SmoothingFunction().method3


def similarity(prediction: str, reference: str) -> dict[str, float]:
    """One example's BLEU-4 and ROUGE-1/2/L (each x 100, rounded to 4 decimals)."""
    jieba, Rouge, sentence_bleu, method3 = _libraries()
    hypothesis, target = " ".join(jieba.cut(prediction)), " ".join(jieba.cut(reference))
    scores = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    if hypothesis.split() and target.split():
        found = Rouge().get_scores(hypothesis, target)[0]
        scores = {key: round(found[key]["f"] * 100, 4) for key in scores}
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=method3)
    return {"bleu-4": round(bleu * 100, 4), **scores}


def score(rows: list[dict]) -> dict[str, float | int]:
    """The metrics of predictions.jsonl's rows ({prediction, reference, generated_tokens, seconds})."""
    if not rows:
        return {"examples": 0}
    per_example = [similarity(r["prediction"], r["reference"]) for r in rows]
    metrics: dict[str, float | int] = {key: sum(s[key] for s in per_example) / len(rows) for key in SIMILARITY}
    metrics["exact_match"] = 100 * sum(r["prediction"].strip() == r["reference"].strip() for r in rows) / len(rows)
    generated = sum(r["generated_tokens"] for r in rows)
    metrics["gen_len"] = generated / len(rows)
    seconds = sum(r["seconds"] for r in rows)
    metrics["tokens_per_second"] = generated / seconds if seconds > 0 else None
    metrics["examples"] = len(rows)
    return metrics


def format_metrics(metrics: dict) -> str:
    """The metrics as `name value` lines, in REPORTED's order."""
    shown = [k for k in REPORTED if k in metrics]
    width = max(len(k) for k in shown)
    scale = "BLEU-4 and ROUGE as LLaMA-Factory reports them: percentages (x100), the mean over examples\n"
    return scale + "\n".join(
        f"{k:<{width}}  {metrics[k]:.4f}" if isinstance(metrics[k], float) else f"{k:<{width}}  {metrics[k]}"
        for k in shown
        if metrics[k] is not None
    )
