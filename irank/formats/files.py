"""Atomic writes, input/output clash checks and hashes: everything that touches a file's bytes."""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import errno
import functools
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from irank.runtime.errors import UsageError


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# The set of outputs the running command is writing (see `output_set`); None: each file is published alone.
_CURRENT_SET: contextvars.ContextVar["OutputSet | None"] = contextvars.ContextVar("irank_output_set", default=None)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and publish it as `path`.

    Inside `output_set` the file joins the set and is published with the others when the set commits;
    outside one it is renamed over `path` at once. On any exception (Ctrl-C included) the temporary file is
    removed and `path` is untouched.
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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    pending = _CURRENT_SET.get()
    if pending is not None:
        pending.add(tmp, target)
        return
    try:
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_folder(target.parent)


class OutputSet:
    """The outputs of one command, published together: all of them or none.

    Files (and folders) are complete on disk beside their targets before the first one is renamed into place;
    the renames then run with Ctrl-C, SIGTERM and SIGHUP held back, and a rename that fails undoes the ones
    before it. Without `overwrite` no rename replaces anything: a target that appeared while the command ran
    (another run writing the same output) stops the command with nothing published.
    """

    def __init__(self, overwrite: bool):
        self.overwrite = overwrite
        self.pending: list[tuple[Path, Path]] = []

    def add(self, built: Path, target: Path) -> None:
        """Publish `built` (a file or folder beside `target`) as `target` when the set commits."""
        self.pending.append((Path(built), Path(target)))

    def built(self, target: str | os.PathLike) -> Path:
        """The complete file (or folder) waiting to become `target`."""
        wanted = Path(target)
        for built, pending in self.pending:
            if pending == wanted:
                return built
        raise KeyError(str(target))

    def discard(self) -> None:
        for built, _ in self.pending:
            remove_path(built)
        self.pending.clear()

    def commit(self) -> None:
        published: list[tuple[Path, Path | None]] = []  # (target, its old copy): the renames done, to undo
        with signals_held():
            try:
                for built, target in self.pending:
                    backup = set_aside(target) if self.overwrite else None
                    try:
                        publish(built, target, replace=self.overwrite)
                    except BaseException:
                        restore(target, backup, published=False)
                        raise
                    published.append((target, backup))
            except BaseException:
                for target, backup in reversed(published):
                    restore(target, backup, published=True)
                self.discard()
                raise
            for folder in {target.parent for _, target in self.pending}:
                fsync_folder(folder)
            for _, backup in published:  # still held: a signal now must not leave the old copies behind
                if backup is not None:
                    remove_path(backup)
        self.pending.clear()


def restore(target: Path, backup: Path | None, *, published: bool) -> None:
    """Undo one step of a commit: `target` back to what `backup` holds (nothing, when it did not exist)."""
    if backup is None:
        if published:
            remove_path(target)
        return
    if published and backup.is_dir():
        remove_path(target)
    if published or not os.path.lexists(target):  # replaced, or renamed aside
        os.replace(backup, target)
    else:  # the old file is still in place: its hard-linked copy is not needed
        remove_path(backup)


@contextlib.contextmanager
def output_set(overwrite: bool = False) -> Iterator[OutputSet]:
    """Collect every file that `atomic_path` writes inside the block and publish them together at its end
    (see OutputSet); on any exception nothing is published and no temporary file remains."""
    outputs = OutputSet(overwrite)
    token = _CURRENT_SET.set(outputs)
    try:
        yield outputs
    except BaseException:
        outputs.discard()
        raise
    finally:
        _CURRENT_SET.reset(token)
    outputs.commit()


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def set_aside(target: Path) -> Path | None:
    """Keep an existing `target` under a hidden name beside it until the set is published, so a failed commit
    can put it back. A file stays in place (a hard link keeps its old bytes: readers never find it missing);
    a folder is renamed aside. None when there is nothing to keep."""
    if not os.path.lexists(target):
        return None
    backup = Path(tempfile.mktemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    if target.is_dir() and not target.is_symlink():
        os.rename(target, backup)
        return backup
    try:
        os.link(target, backup, follow_symlinks=False)
    except OSError:  # no hard links here: rename aside instead
        os.rename(target, backup)
    return backup


def publish(built: Path, target: Path, *, replace: bool) -> None:
    """Rename `built` to `target`; without `replace`, only if `target` does not exist at that very moment."""
    if replace:
        if target.is_dir() and not target.is_symlink():  # set aside already; a folder cannot be replaced
            remove_path(target)
        os.replace(built, target)
        return
    try:
        rename_noreplace(built, target)
    except FileExistsError:
        raise UsageError(f"{target} was created by someone else while this command ran; nothing was written "
                         "(pass --overwrite to replace it)") from None


def rename_noreplace(source: Path, target: Path) -> None:
    """Rename that fails with FileExistsError when `target` exists, atomically (Linux renameat2), else by a
    hard link for files (link fails if the name is taken) and a checked rename for folders."""
    call = _renameat2()
    if call is not None:
        if call(-100, os.fsencode(source), -100, os.fsencode(target), 1) == 0:  # AT_FDCWD, RENAME_NOREPLACE
            return
        error = ctypes.get_errno()
        if error == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, os.strerror(error), str(target))
        if error not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(error, os.strerror(error), str(target))
    if source.is_dir():
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "File exists", str(target))
        os.rename(source, target)
        return
    os.link(source, target)  # FileExistsError when the name is taken
    source.unlink()


@functools.lru_cache(maxsize=1)
def _renameat2():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.renameat2
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


HELD_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP back for the duration of the block (a few renames), then deliver them.

    Python runs signal handlers in the main thread only, so elsewhere there is nothing to hold back.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {number: signal.signal(number, lambda number, frame: arrived.append(number)) for number in HELD_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        for number in dict.fromkeys(arrived):
            signal.raise_signal(number)


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


def file_identity(path: str | os.PathLike) -> tuple:
    """What makes two names the same file: its device and inode when it exists (any path, symlink or hard
    link to it), else the path with every symlink resolved."""
    real = os.path.realpath(path)
    try:
        status = os.stat(real)
    except OSError:
        return ("path", real)
    return ("inode", status.st_dev, status.st_ino)


def check_outputs_clear_of_inputs(outputs: dict[str, str | None], inputs: dict[str, str | None]) -> None:
    """Refuse any output (flag name → path) that is one of the inputs (name → path): the same file by any path,
    symlink or hard link. Two outputs that are one file are refused too."""
    input_files = {name: file_identity(path) for name, path in inputs.items() if path and not is_stdio(path)}
    seen: dict[tuple, str] = {}
    for out_name, out_path in outputs.items():
        if not out_path or is_stdio(out_path):
            continue
        identity = file_identity(out_path)
        for in_name, in_identity in input_files.items():
            if identity == in_identity:
                raise UsageError(f"{out_name} {out_path} is the same file as the {in_name}; refusing to overwrite an input")
        if identity in seen:
            raise UsageError(f"{out_name} and {seen[identity]} both point to {out_path}")
        seen[identity] = out_name


def check_overwrite(outputs: dict[str, str | None], overwrite: bool) -> None:
    """Refuse any output (flag name → path) that exists already, unless `overwrite`."""
    if overwrite:
        return
    for flag, path in outputs.items():
        if path and not is_stdio(path) and os.path.lexists(path):
            raise UsageError(f"{flag} {path} already exists; pass --overwrite to replace it")
