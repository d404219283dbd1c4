"""Evaluation: `telechat-lab eval` scores the replies a model generates for a dataset (or a run's validation split)
with BLEU / ROUGE / exact match (metrics.py, predict.py, run.py), evaluates every job of a sweep into one table, runs
lm-evaluation-harness tasks (harness.py), and during training the `samples` callback logs the model's replies to a
few validation prompts (samples.py)."""
