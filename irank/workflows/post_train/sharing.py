"""Under torchrun, post-train's processes work in folders of their own (rank 0 in --out-dir, the others in
private temporary ones): what a resumed run needs from rank 0's folder is copied into the others'."""

from __future__ import annotations

from pathlib import Path

from irank.formats.files import atomic_path
from irank.formats.manifest import read_table, rebase_paths, write_table
from irank.formats.summary import Summary
from irank.runtime.distributed import active, all_or_none, broadcast_object, is_main


def share_rounds(out: Path, state: Summary) -> None:
    """Rank 0's last finished round (kept manifest and model) into every other process's private folder, where
    the next round reads them; and once the rounds are done, the final round's too (--val may have chosen an
    earlier one), which --rejudge's judgement reads."""
    if not active() or not state.rounds:
        return
    folders = {state.rounds[-1].folder}
    if state.final_round is not None:
        folders |= {record.folder for record in state.rounds if record.round == state.final_round}
    for folder in sorted(folders):
        share_round(out, folder)


def share_round(out: Path, folder: str) -> None:
    payload = None
    with all_or_none():  # no collective inside: a process that fails here must reach the agreement
        if is_main():
            payload = (str((out / folder).resolve()), read_table(out / folder / "kept.csv"))
    source, kept = broadcast_object(payload)
    with all_or_none():
        if not is_main():
            (out / folder).mkdir(parents=True, exist_ok=True)
            write_table(rebase_paths(kept, Path(source), out / folder / "kept.csv"), out / folder / "kept.csv")
    share_file(out, f"{folder}/model.safetensors")


def share_file(out: Path, name: str) -> None:
    """Rank 0's `out/name` into every other process's private folder (whose folders for it exist)."""
    payload = None
    with all_or_none():
        if is_main():
            payload = (out / name).read_bytes()
    data = broadcast_object(payload)
    with all_or_none():
        if not is_main():
            with atomic_path(out / name) as tmp:
                Path(tmp).write_bytes(data)
