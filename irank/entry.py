"""The `irank` command's entry point: signals first, then the CLI.

It imports nothing but the standard library and irank.runtime.signals before it has installed the signal
handlers, so Ctrl-C or SIGTERM at any moment, start-up included (importing torch takes seconds), ends in one
line and a stable exit code, never a traceback.
"""

from __future__ import annotations

import sys

from irank.runtime.signals import install_signal_handlers, interrupt_message


def main() -> None:
    install_signal_handlers()
    try:
        from irank.cli import main as run
    except KeyboardInterrupt as interrupt:
        line, code = interrupt_message(interrupt)
        sys.stderr.write(line + "\n")
        sys.exit(code)
    run()
