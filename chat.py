"""Chat with TeleChat2 in the terminal, or answer a file of prompts:
`python chat.py model.path=DIR [adapter_path=ADAPTER] [infer_backend=vllm] [input=FILE output=OUT]`."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from telechat_lab.config import check_command_line
from telechat_lab.errors import reported

CONF = str(Path(__file__).resolve().parent / "conf")


@hydra.main(config_path=CONF, config_name="chat", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from telechat_lab.chat import run_chat

    with reported():
        run_chat(OmegaConf.to_object(cfg))


if __name__ == "__main__":
    check_command_line(sys.argv[1:], CONF, "chat")  # every problem at once
    main()
