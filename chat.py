"""Chat with TeleChat2 in the terminal, or answer a file of prompts (see conf/chat.yaml), the same as
`telechat-lab chat ...`: `python chat.py model.path=DIR [adapter_path=ADAPTER] [input=FILE output=OUT]`."""

from telechat_lab.cli import run

if __name__ == "__main__":
    run("chat")
