"""How long-running library functions talk to people: progress bars and messages on stderr.

Library functions take a `Reporter`; the default one is silent, the CLI passes a rich one.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Reporter:
    """Silent: the default for library calls."""

    speaks = False

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        yield lambda advance=1: None

    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass


class RichReporter(Reporter):
    """Progress bars and messages on stderr; bars turn themselves off when stderr is not a terminal.

    Under torchrun only rank 0 speaks: the other processes' reporters stay silent, warnings included.
    """

    def __init__(self, quiet: bool = False):
        from irank.runtime.distributed import is_main

        self.console = Console(stderr=True, highlight=False)
        self.speaks = is_main()
        self.quiet = quiet or not self.speaks

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        if self.quiet or not self.console.is_terminal:
            yield lambda advance=1: None
            return
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, console=self.console, transient=True) as progress:
            task_id = progress.add_task(description, total=total)
            yield lambda advance=1: progress.advance(task_id, advance)

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False)

    def warn(self, message: str) -> None:
        if self.speaks:
            self.console.print(f"irank: warning: {message}", markup=False, style="yellow")
