"""Evaluate a run, an adapter or a model (see conf/eval.yaml), the same as `telechat-lab eval ...`:
`python eval.py run_dir=RUN eval.split=val`, `python eval.py model.path=DIR data.datasets=[NAME]`."""

from telechat_lab.cli import run

if __name__ == "__main__":
    run("eval")
