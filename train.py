"""Fine-tune TeleChat2: `python train.py [group=option ...] [key=value ...]` (see conf/train.yaml).

With no arguments: LoRA on a tiny random TeleChat2 with the bundled demo data, on CPU.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF = str(Path(__file__).resolve().parent / "conf")


@hydra.main(config_path=CONF, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from telechat_lab.training.run import train

    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric", "val_loss"))  # the value an Optuna sweep minimises


if __name__ == "__main__":
    from telechat_lab.config import exit_on_unknown_overrides

    exit_on_unknown_overrides(sys.argv[1:], CONF, "train")  # all unknown keys at once, not Hydra's first
    main()
