"""`predicted N/M`: a rich bar on a terminal (as chat's batch mode shows it), a plain line per batch on a log."""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, total: int, done: int, what: str):
        self.total, self.what, self.bar = total, what, None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=Console(stderr=True)
            )
            self.task = self.bar.add_task(what, total=total, completed=done)

    def __enter__(self) -> Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done)
        else:
            print(f"{self.what} {done}/{self.total}", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
