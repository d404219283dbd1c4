"""Fine-tune TeleChat2: `python train.py [group=option ...] [key=value ...]` (see conf/train.yaml).

With no arguments: LoRA on a tiny random TeleChat2 with the bundled demo data, on CPU.
"""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from telechat_lab.training.run import train

    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric", "val_loss"))  # the value an Optuna sweep minimises


if __name__ == "__main__":
    main()
