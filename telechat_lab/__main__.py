"""`python -m telechat_lab COMMAND ...`: the same as the `telechat-lab` console script."""

from telechat_lab.cli import main

main()
