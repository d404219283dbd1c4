"""`telechat-lab train` as a runnable file: what a DDP launcher starts again for each rank (telechat_lab/cli.py)."""

from telechat_lab.cli import run

if __name__ == "__main__":
    run("train")
