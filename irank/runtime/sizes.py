"""Sizes written by people ('512MiB', '2GB', '0'), read as bytes. Standard library only."""

from __future__ import annotations

import re

from irank.runtime.errors import UsageError

DEFAULT_MEMORY_BUDGET = "1GiB"


UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
         "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str, flag: str = "--memory-budget") -> int:
    """'512MiB', '2GB', '1.5g', '0' → bytes; a UsageError naming `flag` otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in UNITS:
        raise UsageError(f"{flag} {text}: not a size (write e.g. 512MiB, 2GB or 0)")
    return int(float(match.group(1)) * UNITS[unit])
