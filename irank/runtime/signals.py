"""Signals: Ctrl-C, SIGTERM and SIGHUP stop irank the same way, with one line and a stable exit code.

SIGTERM (containers, CI runners, job schedulers) and SIGHUP (a closed terminal) are raised where the program is
as `Terminated`, a KeyboardInterrupt, so every clean-up that runs on Ctrl-C runs on them too. Standard library
only: the entry point installs these before it imports anything else.
"""

from __future__ import annotations

import signal

EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, like Ctrl-C: every clean-up that runs on Ctrl-C runs."""

    def __init__(self, number: int):
        super().__init__(signal.Signals(number).name)
        self.number = number


# The signal that stopped the run (None while none has): an error that a dying DataLoader worker raises after
# it is still reported as the interruption.
stopped_by: list[int] = []


def _terminate(number: int, frame) -> None:
    stopped_by.append(number)
    raise Terminated(number)


def install_signal_handlers() -> None:
    """SIGTERM (containers, CI runners, schedulers) and SIGHUP (a closed terminal) stop irank as Ctrl-C does."""
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name) and signal.getsignal(getattr(signal, name)) in (signal.SIG_DFL, None):
            signal.signal(getattr(signal, name), _terminate)


def interrupt_message(interrupt: BaseException) -> tuple[str, int]:
    """The one line and the exit code for an interruption: 130 for Ctrl-C, 128 + N for signal N."""
    number = interrupt.number if isinstance(interrupt, Terminated) else (stopped_by[0] if stopped_by else None)
    what = "interrupted" if number is None else f"terminated ({signal.Signals(number).name})"
    note = getattr(interrupt, "irank_note", None) or "no partial output was written"
    return f"irank: {what}; {note}", EXIT_INTERRUPTED if number is None else 128 + number
