"""Fine-tune TeleChat2: `python train.py [group=option ...] [key=value ...]` (see conf/train.yaml).

With no arguments: LoRA on a tiny random TeleChat2 with the bundled demo data, on CPU.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from telechat_lab.errors import reported
from telechat_lab.training.run import check_command_line

CONF = str(Path(__file__).resolve().parent / "conf")


@hydra.main(config_path=CONF, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from telechat_lab.training.run import train

    with reported(multirun=HydraConfig.get().mode == RunMode.MULTIRUN):
        metrics = train(cfg)
    return metrics.get(cfg.optimized_metric)  # the value an Optuna sweep minimises


if __name__ == "__main__":
    check_command_line(sys.argv[1:], CONF)  # every problem at once, before Hydra writes anything
    main()
