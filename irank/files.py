"""Atomic writes, input/output clash checks and hashes: everything that touches a file's bytes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UsageError


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    On any exception (Ctrl-C included) the temporary file is removed and `path` is untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, target)
        fsync_folder(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename in `folder` durable; a no-op where folders cannot be opened (Windows)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def is_stdio(path: str | os.PathLike | None) -> bool:
    return str(path) == "-"


def check_outputs_clear_of_inputs(outputs: dict[str, str | None], inputs: dict[str, str | None]) -> None:
    """Refuse any output (flag name → path) that is one of the inputs (name → path)."""
    resolved_inputs = {
        name: os.path.realpath(path) for name, path in inputs.items() if path and not is_stdio(path)
    }
    seen: dict[str, str] = {}
    for out_name, out_path in outputs.items():
        if not out_path or is_stdio(out_path):
            continue
        real = os.path.realpath(out_path)
        for in_name, in_real in resolved_inputs.items():
            if real == in_real:
                raise UsageError(f"{out_name} {out_path} is the same file as the {in_name}; refusing to overwrite an input")
        if real in seen:
            raise UsageError(f"{out_name} and {seen[real]} both point to {out_path}")
        seen[real] = out_name


def check_overwrite(outputs: dict[str, str | None], overwrite: bool) -> None:
    """Refuse any output (flag name → path) that exists already, unless `overwrite`."""
    if overwrite:
        return
    for flag, path in outputs.items():
        if path and not is_stdio(path) and os.path.lexists(path):
            raise UsageError(f"{flag} {path} already exists; pass --overwrite to replace it")
