"""`irank apply`: annotators' decisions (review.csv or a Label Studio export) + the manifest → the fixed manifest.

Per reviewed row: relabel → the label becomes `new_label`; remove → the row is dropped; keep or an
empty decision → unchanged. Every `new_label` must be in the class list; every id must be in the
manifest. Nothing is written unless every row is valid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from irank._version import __version__
from irank.formats.columns import distinct
from irank.formats.files import (
    check_outputs_clear_of_inputs,
    check_overwrite,
    is_stdio,
    output_set,
    sha256_bytes,
    write_json_atomic,
)
from irank.formats.jsontext import kind
from irank.formats.manifest import (
    Manifest,
    blocks_quoting,
    column_as_text,
    containment_root,
    path_rebaser,
    read_classes_file,
    read_manifest,
    shown_names,
    table_format,
    write_blocks,
    write_table,
)
from irank.formats.review_pack import (
    DECISIONS,
    class_names,
    read_decisions,
    read_json_file,
    reviewed_bytes,
)
from irank.formats.seal import seal_written
from irank.runtime.errors import ManifestError, UsageError

AUDIT_COLUMNS = ["id", "old_label", "new_label", "decision"]


class ApplyResult:
    """`audit`: one row per reviewed row (id, old_label, new_label, decision). `fixed`: the manifest's rows and
    columns, relabeled rows changed and removed rows dropped, read from the manifest's file when asked
    (`apply_review` writes it a block of rows at a time)."""

    def __init__(self, samples: Manifest, keep: np.ndarray, new_labels: dict[int, str], audit: pd.DataFrame,
                 summary: dict):
        self.samples, self.keep, self.new_labels, self.audit, self.summary = samples, keep, new_labels, audit, summary

    @property
    def fixed(self) -> pd.DataFrame:
        return pd.concat(list(self.fixed_blocks()), ignore_index=False)

    def fixed_blocks(self, rebase=None):
        """The fixed table a block of the manifest at a time (labels as text, as the manifest wrote them)."""
        for start, chunk in self.samples.chunks():
            block = chunk.copy()
            block.index = pd.RangeIndex(start, start + len(chunk))
            labels = column_as_text(block, "label")
            for row in (row for row in self.new_labels if start <= row < start + len(chunk)):
                labels[row - start] = self.new_labels[row]
            block["label"] = labels
            block = block[self.keep[start:start + len(chunk)]]
            yield block if rebase is None else rebase(block)


def apply_class_list(reviewed: str, manifest_labels: list[str], classes_file: str | None) -> tuple[list[str], str]:
    """The classes a new_label may take, and where they came from: --classes, the review pack, else the manifest."""
    if classes_file:
        return read_classes_file(classes_file), f"--classes {classes_file}"
    if not is_stdio(reviewed):
        pack = Path(reviewed).resolve().parent / "review.json"
        if pack.is_file():
            document = read_json_file(pack, "review pack")
            if not isinstance(document, dict):
                raise ManifestError(f"review pack {pack}: holds {kind(document)}, not the JSON object irank review writes")
            classes = class_names(document.get("classes"), f"review pack {pack}")
            if classes:
                return classes, f"the review pack ({pack})"
    return sorted(set(manifest_labels)), "the labels found in the manifest"


def written_label(new_label: str, classes: list[str], manifest_labels: list[str]) -> str:
    """The value to store: a class name, or its index when the manifest writes labels as indices into named classes."""
    names_are_indices = all(name.isdigit() for name in classes)
    labels_are_indices = all(label.strip().lstrip("-").isdigit() for label in manifest_labels)
    if labels_are_indices and not names_are_indices:
        return str(classes.index(new_label))
    return new_label


def class_of(new_label: str, classes: list[str]) -> str:
    """A new_label as written when it is a class (a class name may start or end with spaces), else without the
    spaces a spreadsheet adds around it."""
    return new_label if new_label in classes else new_label.strip()


def validate_decisions(decisions: pd.DataFrame, reviewed: str, label_of: dict[str, str], classes: list[str],
                       class_source: str) -> None:
    """Refuse the first row that cannot be applied, naming the file and the row. `label_of`: the manifest's id → label."""
    seen: dict[str, int] = {}
    shown = shown_names(classes)
    for row in decisions.itertuples(index=False):
        where = f"reviewed {reviewed}: row {row.row} (id {row.id!r})"
        if row.id in seen:
            raise ManifestError(f"{where}: the id was already reviewed in row {seen[row.id]}")
        seen[row.id] = row.row
        if row.id not in label_of:
            raise ManifestError(f"{where}: the id is not in the manifest")
        if row.decision not in ("", *DECISIONS):
            raise ManifestError(f"{where}: decision {row.decision!r} is not one of {', '.join(DECISIONS)} (or empty)")
        if row.decision == "relabel" and not row.new_label:
            raise ManifestError(f"{where}: decision relabel needs a new_label")
        if row.new_label and row.new_label not in classes:
            raise ManifestError(f"{where}: new_label {row.new_label!r} is not a class ({shown}); classes from "
                                f"{class_source}; pass --classes FILE to name others")
        unchanged = row.decision == "keep" and row.new_label == label_of[row.id]
        if row.new_label and row.decision in ("", "keep", "remove") and not unchanged:
            raise ManifestError(f"{where}: new_label {row.new_label!r} is filled in but the decision is "
                                f"{row.decision or 'empty'}; set the decision to relabel or clear new_label")


def decide(decisions: pd.DataFrame, samples: Manifest, position: dict[str, int], classes: list[str],
           label_values: list[str]) -> tuple[dict[int, str], np.ndarray, pd.DataFrame]:
    """The validated decisions as the manifest rows' new labels (only the relabeled rows), which rows to keep, and
    the audit table (one row per reviewed row)."""
    new_labels: dict[int, str] = {}  # manifest row → its new label
    keep = np.ones(len(samples), dtype=bool)
    audit: dict[str, list[str]] = {column: [] for column in AUDIT_COLUMNS}  # a list per column: a dict per row took 4×
    for row in decisions.itertuples(index=False):
        at = position[row.id]
        old = samples.labels[at]
        if row.decision == "relabel":
            new_labels[at] = written_label(row.new_label, classes, label_values)
        elif row.decision == "remove":
            keep[at] = False
        for column, value in zip(AUDIT_COLUMNS, (row.id, old, new_labels.get(at, old) if keep[at] else "",
                                                 row.decision or "keep")):
            audit[column].append(value)
    return new_labels, keep, pd.DataFrame(audit, columns=AUDIT_COLUMNS)


def check_apply_outputs(reviewed: str, manifest: str, output: str | None, audit_output: str | None,
                        classes_file: str | None, overwrite: bool) -> None:
    """Refuse outputs of an unknown format, both on stdout, one that is an input, or one that exists (unless `overwrite`)."""
    for path in (output, audit_output):
        if path is not None:
            table_format(path)
    if is_stdio(output) and is_stdio(audit_output):
        raise UsageError("-o and --audit cannot both go to stdout")
    outputs = {"-o": output, "--audit": audit_output,
               "the sidecar": output + ".json" if output and not is_stdio(output) else None}
    check_outputs_clear_of_inputs(outputs, {"reviewed file": reviewed, "manifest": manifest, "--classes file": classes_file})
    check_overwrite(outputs, overwrite)


def apply_review(
    reviewed: str,
    manifest: str,
    *,
    output: str | None = None,
    audit_output: str | None = None,
    classes_file: str | None = None,
    overwrite: bool = False,
) -> ApplyResult:
    """Apply the decisions in `reviewed` (review.csv, or a Label Studio JSON export) to `manifest`.

    The fixed manifest keeps the manifest's columns and row order (written to another folder, its
    relative paths are rebased as `irank prune` does). `audit_output` gets one row per reviewed row.
    """
    check_apply_outputs(reviewed, manifest, output, audit_output, classes_file, overwrite)
    data = reviewed_bytes(reviewed)  # read once: a pipe gives its bytes once
    decisions = read_decisions(reviewed, data)
    samples = read_manifest(manifest)
    label_values = distinct(samples.labels)
    classes, class_source = apply_class_list(reviewed, label_values, classes_file)
    decisions["new_label"] = [class_of(label, classes) for label in decisions["new_label"]]
    # the reviewed ids' manifest rows, found in one pass over the ids (made one at a time): an index of every id
    # of a million-row manifest held its million strings, and a review covers a few of them
    wanted = set(decisions["id"])
    position = {sample_id: row for row, sample_id in enumerate(samples.ids) if sample_id in wanted}
    validate_decisions(decisions, reviewed, {sample_id: samples.labels[row] for sample_id, row in position.items()},
                       classes, class_source)
    new_labels, keep, audit = decide(decisions, samples, position, classes, label_values)
    changed = int(((audit["decision"] == "relabel") & (audit["old_label"] != audit["new_label"])).sum())
    counts = decisions["decision"].replace("", "keep").value_counts()
    summary = {
        "irank_version": __version__,
        "command": "apply",
        "class_source": class_source,
        "reviewed_rows": len(decisions),
        "kept": int(counts.get("keep", 0)),
        "relabeled": int(counts.get("relabel", 0)),
        "labels_changed": changed,
        "removed": int(counts.get("remove", 0)),
        "input_rows": len(samples),
        "output_rows": int(keep.sum()),
        "inputs": {
            "reviewed": {"path": reviewed, "sha256": None if is_stdio(reviewed) else sha256_bytes(data)},
            "manifest": {"path": manifest, "sha256": samples.table_source.sha256()},
        },
    }
    result = ApplyResult(samples, keep, new_labels, audit, summary)
    with output_set(overwrite) as outputs:  # the fixed manifest, its sidecar and the audit change together
        if output is not None:
            rebase = path_rebaser(samples.paths_at(keep), samples.root, output)
            write_blocks(result.fixed_blocks(rebase), output, quoting=blocks_quoting(result.fixed_blocks, samples, keep))
            if not is_stdio(output):
                if rebase is not None:  # written elsewhere: its rows point back into the data's folder
                    summary.update(seal_written(outputs, output, containment_root(samples)))
                write_json_atomic(output + ".json", summary)
        if audit_output is not None:
            write_table(audit, audit_output)
    return result
