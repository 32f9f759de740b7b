"""How this process was started, read from the environment alone (no torch: the CLI asks before importing it)."""

from __future__ import annotations

import os


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another launcher that sets WORLD_SIZE) started more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
