"""Fine-tune TeleChat2: `python train.py [group=option ...] [key=value ...]` (see conf/train.yaml), the same as
`telechat-lab train ...`. With no arguments: LoRA on a tiny random TeleChat2 with the bundled demo data, on CPU."""

from telechat_lab.cli import run

if __name__ == "__main__":
    run("train")
