"""Seals: how irank knows a manifest is one it wrote, so that its rows may point outside its own folder.

A manifest's rows must resolve inside its folder (`manifest.check_inside_root`): a manifest handed over by someone
else cannot make irank read files from the rest of the machine. A manifest irank writes elsewhere (`prune -o
other/clean.csv`, `irank manifest ../images -o train.csv`) points back into the data's folder, and is read by
every irank command all the same: its sidecar records that folder (`data_root`) and a seal, an HMAC-SHA256 over
the manifest's bytes and that folder under a key of this user's that irank keeps (`IRANK_HOME`, else
`$XDG_DATA_HOME/irank`, else `~/.local/share/irank`; created on first use, readable by the user alone). A manifest
whose seal checks was written by irank, on this account, unchanged since: its rows are checked against the
recorded folder instead. Anything else (a forged or copied sidecar, an edited manifest, another machine's) is
checked against its own folder, as before. Where no key can be kept, irank writes no seal.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_BYTES = 32


def key_folder() -> Path:
    if os.environ.get("IRANK_HOME"):
        return Path(os.environ["IRANK_HOME"])
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data_home) / "irank"


def _key(create: bool) -> bytes | None:
    """This user's sealing key; created (mode 0600) when `create` and there is none; None when there is none."""
    path = key_folder() / "seal.key"
    try:
        key = path.read_bytes()
        return key if len(key) == KEY_BYTES else None
    except OSError:
        pass
    if not create:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _key(create=False)  # another process made it first
    except OSError:
        return None
    with os.fdopen(handle, "wb") as out:
        out.write(secrets.token_bytes(KEY_BYTES))
    return _key(create=False)


def _mac(key: bytes, manifest_sha256: str, data_root: str) -> str:
    return hmac.new(key, f"{manifest_sha256}\0{data_root}".encode(), hashlib.sha256).hexdigest()


def seal(manifest_sha256: str, data_root: str | os.PathLike) -> dict:
    """What a sidecar records of a manifest irank wrote whose rows live under `data_root` ({} with no key)."""
    key = _key(create=True)
    root = os.path.realpath(data_root)
    return {} if key is None else {"data_root": root, "data_root_seal": _mac(key, manifest_sha256, root)}


def sealed_root(sidecar: dict, manifest_sha256: str) -> str | None:
    """The data root a sidecar records, when its seal checks for these manifest bytes; else None."""
    root, mark = sidecar.get("data_root"), sidecar.get("data_root_seal")
    key = _key(create=False)
    if not isinstance(root, str) or not isinstance(mark, str) or key is None:
        return None
    return root if hmac.compare_digest(mark, _mac(key, manifest_sha256, root)) else None


def seal_written(outputs, manifest: str | os.PathLike, data_root: str | os.PathLike) -> dict:
    """`seal` of a manifest that `outputs` (an irank.formats.files.OutputSet) holds, complete, to publish."""
    from irank.formats.files import sha256_file

    return seal(sha256_file(outputs.built(manifest)), data_root)
