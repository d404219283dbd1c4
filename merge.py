"""Merge LoRA / DoRA adapters into their base and export a HF + vLLM ready directory:
`python merge.py adapter_path=DIR export_dir=OUT` (see conf/merge.yaml), the same as `telechat-lab merge ...`."""

from telechat_lab.cli import run

if __name__ == "__main__":
    run("merge")
