"""`python -m telechat_lab.data.inspect ...`, the same as `telechat-lab inspect ...`: a program of its own (the
top layer), so the data layer imports nothing of the commands."""

from telechat_lab.cli import run

run("inspect")
