"""Merge LoRA / DoRA adapters into their base and export a HF + vLLM ready directory:
`python merge.py adapter_path=DIR export_dir=OUT` (see conf/merge.yaml)."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from telechat_lab.config import check_command_line
from telechat_lab.errors import reported

CONF = str(Path(__file__).resolve().parent / "conf")


@hydra.main(config_path=CONF, config_name="merge", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from telechat_lab.export import merge_and_export

    with reported():
        merge_and_export(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    check_command_line(sys.argv[1:], CONF, "merge")  # every problem at once
    main()
