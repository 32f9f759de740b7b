"""`irank prune`: a scores table + the manifest → the kept manifest and the removed rows. No model needed."""

from __future__ import annotations

import os
import stat

import numpy as np
import pandas as pd

from irank._version import __version__
from irank.core.selection import removal_mask
from irank.formats.files import (
    check_outputs_clear_of_inputs,
    check_overwrite,
    is_stdio,
    output_set,
    sha256_file,
    write_json_atomic,
)
from irank.formats.manifest import (
    Manifest,
    TableSource,
    blocks_quoting,
    containment_root,
    path_rebaser,
    read_manifest,
    table_format,
    write_blocks,
)
from irank.formats.scores_table import read_score_columns
from irank.formats.seal import seal_written
from irank.runtime.errors import ManifestError, UsageError
from irank.runtime.reorder import in_output_order


def validate_rule(*, fraction: float | None, count: int | None, min_score: float | None, min_per_class: int) -> None:
    """Refuse a pruning rule that cannot work, before any file is read."""
    chosen = [name for name, value in (("--fraction", fraction), ("--count", count), ("--min-score", min_score)) if value is not None]
    if len(chosen) != 1:
        raise UsageError("give exactly one of --fraction, --count or --min-score" + (f" (got {', '.join(chosen)})" if chosen else ""))
    if fraction is not None and not 0 < fraction < 1:
        raise UsageError(f"--fraction {fraction}: must be between 0 and 1 (exclusive)")
    if count is not None and count < 0:
        raise UsageError(f"--count {count}: must be 0 or more")
    if min_per_class < 0:
        raise UsageError(f"--min-per-class {min_per_class}: must be 0 or more")


REMOVED_BLOCK_ROWS = 65_536  # removed rows put into rank order (through temporary files) and written at a time


class PruneResult:
    """What `prune` decided. `kept` (the manifest's table without the removed rows, in its order) and `removed`
    (the removed rows in rank order, with their rank, class_rank and score) are read from the manifest's file
    when asked: `prune` itself writes them a block of rows at a time."""

    def __init__(self, samples: Manifest, keep: np.ndarray, removed_rows: np.ndarray,
                 removed_numbers: dict[str, np.ndarray], summary: dict):
        self.samples, self.keep, self.summary = samples, keep, summary
        self.removed_rows = removed_rows  # the removed rows' manifest rows, in rank order
        self.removed_numbers = removed_numbers  # their rank, class_rank and score, in the same order

    @property
    def kept(self) -> pd.DataFrame:
        return self.samples.table[self.keep]

    @property
    def removed(self) -> pd.DataFrame:
        return pd.concat(list(self.removed_blocks()), ignore_index=True)

    def kept_blocks(self, rebase=None):
        """The kept rows a block of the manifest at a time (the first block carries the header even when empty)."""
        for start, chunk in self.samples.chunks():
            block = chunk[self.keep[start:start + len(chunk)]]
            yield block if rebase is None else rebase(block)

    def removed_blocks(self, rebase=None):
        """The removed rows in rank order, their rank, class_rank and score appended (as rank_irank, ... where
        the manifest has such a column), REMOVED_BLOCK_ROWS at a time, the manifest read once (the first
        block carries the header even when no row is removed)."""
        by_row = np.argsort(self.removed_rows, kind="stable")
        rows = self.removed_rows[by_row]
        header = []

        def pieces():  # (each removed row's place in rank order, its manifest columns), a block of the manifest at a time
            for start, chunk in self.samples.chunks():
                if not header:
                    header.append(chunk.iloc[:0])
                low, high = np.searchsorted(rows, [start, start + len(chunk)])
                yield by_row[low:high], (chunk.iloc[rows[low:high] - start],)

        first = 0
        for (block,) in in_output_order(pieces(), len(rows), REMOVED_BLOCK_ROWS):
            yield self._numbered(block, first, rebase)
            first += len(block)
        if first == 0:
            yield self._numbered(header[0] if header else pd.DataFrame(), 0, rebase)

    def _numbered(self, block: pd.DataFrame, first: int, rebase) -> pd.DataFrame:
        block = block.reset_index(drop=True)
        for column in ("rank", "class_rank", "score"):
            name = column if column not in block.columns else f"{column}_irank"
            block[name] = self.removed_numbers[column][first:first + len(block)]
        return block if rebase is None else rebase(block)


def _check_request(scores: str, manifest: str, output: str | None, removed_output: str | None,
                   overwrite: bool) -> None:
    for path in (output, removed_output):
        if path is not None:
            table_format(path)
    outputs = {"-o": output, "--removed": removed_output,
               "the sidecar": output + ".json" if output and not is_stdio(output) else None}
    check_outputs_clear_of_inputs(outputs, {"scores": scores, "manifest": manifest})
    check_overwrite(outputs, overwrite)
    if is_stdio(output) and is_stdio(removed_output):
        raise UsageError("-o and --removed cannot both go to stdout")


def _piped_scores(scores: str) -> TableSource | None:
    """A named pipe given by path gives its rows once: read through a copy, which can then be hashed (stdin is read
    once, as it comes, and not hashed)."""
    if is_stdio(scores) or not os.path.exists(scores) or stat.S_ISREG(os.stat(scores).st_mode):
        return None
    return TableSource(scores, "scores")


def _summary(scores: str, scores_sha256: str | None, manifest: str, rule: dict, samples, score_table,
             keep: np.ndarray, removed_at: np.ndarray) -> dict:
    """What the kept manifest's sidecar (and --json) says: the rule, the counts, the inputs."""
    removed_codes = np.bincount(score_table.labels.codes[removed_at], minlength=len(score_table.labels.values))
    per_class_removed = sorted((label, int(number)) for label, number in zip(score_table.labels.values, removed_codes)
                               if number)
    return {
        "irank_version": __version__,
        "command": "prune",
        "parameters": rule,
        "input_rows": len(samples),
        "scored_rows": len(score_table),
        "unscored_rows_kept": len(samples) - len(score_table),
        "kept_rows": int(keep.sum()),
        "removed_rows": int((~keep).sum()),
        "removed_per_class": dict(per_class_removed),
        "inputs": {
            "scores": {"path": scores, "sha256": scores_sha256},
            "manifest": {"path": manifest, "sha256": samples.table_source.sha256()},  # a pipe: its copy's
        },
    }


def _write_kept(outputs, result: PruneResult, output: str) -> None:
    """The kept manifest and its sidecar (`result.summary`), into the open output set `outputs`."""
    samples, keep = result.samples, result.keep
    rebase = path_rebaser(samples.paths_at(keep), samples.root, output)
    write_blocks(result.kept_blocks(rebase), output, quoting=blocks_quoting(result.kept_blocks, samples, keep))
    if not is_stdio(output):
        if rebase is not None:  # written elsewhere: its rows point back into the data's folder
            result.summary.update(seal_written(outputs, output, containment_root(samples)))
        write_json_atomic(output + ".json", result.summary)


def write_rows(samples: Manifest, keep: np.ndarray, output: str, summary: dict) -> None:
    """The rows of `samples` where `keep`, in its order and with its columns, to `output` (new or replaced), with
    `summary` as its sidecar: a manifest of part of the rows, readable wherever it is written (as prune's -o)."""
    with output_set(overwrite=True) as outputs:
        _write_kept(outputs, PruneResult(samples, keep, np.flatnonzero(~keep), {}, summary), output)


def _write(result: PruneResult, output: str | None, removed_output: str | None, overwrite: bool) -> None:
    """The kept manifest, its sidecar and the removed rows, as one set of outputs."""
    samples, keep = result.samples, result.keep
    with output_set(overwrite) as outputs:
        if output is not None:
            _write_kept(outputs, result, output)
        if removed_output is not None:
            rebase = path_rebaser(samples.paths_at(~keep), samples.root, removed_output)
            write_blocks(result.removed_blocks(rebase), removed_output,
                         quoting=blocks_quoting(result.removed_blocks, samples, ~keep))


def prune(
    scores: str,
    manifest: str,
    *,
    output: str | None = None,
    removed_output: str | None = None,
    fraction: float | None = None,
    count: int | None = None,
    min_score: float | None = None,
    per_class: bool = False,
    min_per_class: int = 1,
    overwrite: bool = False,
) -> PruneResult:
    """Remove the rows ranked first in `scores` from `manifest` (see `irank.core.selection.removal_mask`).

    The kept manifest has the input's rows, columns and order minus the removed rows; the removed
    rows come sorted by rank, with their rank, class_rank and score appended.
    """
    validate_rule(fraction=fraction, count=count, min_score=min_score, min_per_class=min_per_class)
    _check_request(scores, manifest, output, removed_output, overwrite)
    samples = read_manifest(manifest, require_label=False)
    # each scored id's manifest row, by hash, looked up as the scores are read: neither the manifest's ids
    # nor the table's are held as strings
    source = _piped_scores(scores)
    score_table = read_score_columns(scores, source=source, manifest_ids=samples.ids)
    scores_sha256 = None if is_stdio(scores) else source.sha256() if source else sha256_file(scores)
    if score_table.unknown:
        raise ManifestError(f"scores {scores}: id {score_table.first_unknown!r} is not in manifest {manifest} "
                            f"({score_table.unknown} such ids)")
    rule = {"fraction": fraction, "count": count, "min_score": min_score, "per_class": per_class,
            "min_per_class": min_per_class}
    remove = removal_mask(score_table.score, score_table.rank, score_table.class_rank, score_table.labels.codes, **rule)
    removed_at = np.flatnonzero(remove)  # positions in the scores table, then by rank (stable, as sort_values)
    removed_at = removed_at[np.argsort(score_table.rank[removed_at], kind="mergesort")]
    removed_rows = score_table.manifest_rows[removed_at]
    keep = np.ones(len(samples), dtype=bool)
    keep[removed_rows] = False
    result = PruneResult(samples, keep, removed_rows,
                         {column: getattr(score_table, column)[removed_at] for column in ("rank", "class_rank", "score")},
                         _summary(scores, scores_sha256, manifest, rule, samples, score_table, keep, removed_at))
    _write(result, output, removed_output, overwrite)
    return result
