"""`irank apply`: annotators' decisions (review.csv or a Label Studio export) + the manifest → the fixed manifest.

Per reviewed row: relabel → the label becomes `new_label`; remove → the row is dropped; keep or an
empty decision → unchanged. Every `new_label` must be in the class list; every id must be in the
manifest. Nothing is written unless every row is valid.
"""

from __future__ import annotations

import json
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
    sha256_file,
    write_json_atomic,
)
from irank.formats.manifest import (
    Manifest,
    blocks_quoting,
    column_as_text,
    path_rebaser,
    read_classes_file,
    read_manifest,
    read_table,
    table_format,
    write_blocks,
    write_table,
)
from irank.runtime.errors import ManifestError, UsageError
from irank.stages.review import DECISIONS, LABEL_STUDIO_DECISION, LABEL_STUDIO_LABEL, LABEL_STUDIO_REMOVE

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


def read_decisions(path: str) -> pd.DataFrame:
    """The reviewed rows as id, decision, new_label (text) plus `row` (1-based, for messages)."""
    if not is_stdio(path) and Path(path).suffix.lower() == ".json":
        return read_label_studio_export(path)
    table = read_table(path, what="reviewed")
    missing = [column for column in ("id", "decision") if column not in table.columns]
    if missing:
        raise ManifestError(f"reviewed {path}: missing column {' and '.join(repr(m) for m in missing)}; "
                            "is this the review.csv irank review wrote?")
    return pd.DataFrame({
        "row": range(1, len(table) + 1),
        "id": column_as_text(table, "id"),
        "decision": [value.strip().lower() for value in column_as_text(table, "decision")],
        "new_label": [value.strip() for value in column_as_text(table, "new_label")] if "new_label" in table.columns else "",
    })


def choices_of(annotation: dict, from_name: str) -> list[str]:
    for result in annotation.get("result", []):
        if result.get("from_name") == from_name:
            return [str(choice) for choice in result.get("value", {}).get("choices", [])]
    return []


def read_label_studio_export(path: str) -> pd.DataFrame:
    """A Label Studio JSON export of the tasks irank review wrote → decisions (the last non-cancelled annotation wins)."""
    try:
        tasks = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"reviewed {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"reviewed {path}: cannot read it as a Label Studio JSON export: {exc}") from None
    if not isinstance(tasks, list):
        raise ManifestError(f"reviewed {path}: a Label Studio export is a JSON list of tasks")
    rows = []
    for number, task in enumerate(tasks, start=1):
        data = task.get("data", {}) if isinstance(task, dict) else {}
        if "irank_id" not in data or "given_label" not in data:
            raise ManifestError(f"reviewed {path}: task {number} has no data.irank_id/data.given_label; "
                                "was it imported from irank review's label-studio.json?")
        annotations = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
        decision, new_label = "", ""
        if annotations:
            latest = annotations[-1]
            chosen = choices_of(latest, LABEL_STUDIO_LABEL)
            if LABEL_STUDIO_REMOVE in choices_of(latest, LABEL_STUDIO_DECISION):
                decision = "remove"
            elif chosen and chosen[0] != str(data["given_label"]):
                decision, new_label = "relabel", chosen[0]
            elif chosen:
                decision = "keep"
        rows.append({"row": number, "id": str(data["irank_id"]), "decision": decision, "new_label": new_label})
    return pd.DataFrame(rows, columns=["row", "id", "decision", "new_label"])


def apply_class_list(reviewed: str, manifest_labels: list[str], classes_file: str | None) -> tuple[list[str], str]:
    """The classes a new_label may take, and where they came from: --classes, the review pack, else the manifest."""
    if classes_file:
        return read_classes_file(classes_file), f"--classes {classes_file}"
    if not is_stdio(reviewed):
        pack = Path(reviewed).resolve().parent / "review.json"
        if pack.is_file():
            try:
                classes = json.loads(pack.read_text(encoding="utf-8")).get("classes")
            except (OSError, ValueError) as exc:
                raise ManifestError(f"review pack {pack}: cannot read it as JSON: {exc}") from None
            if classes:
                return [str(name) for name in classes], f"the review pack ({pack})"
    return sorted(set(manifest_labels)), "the labels found in the manifest"


def written_label(new_label: str, classes: list[str], manifest_labels: list[str]) -> str:
    """The value to store: a class name, or its index when the manifest writes labels as indices into named classes."""
    names_are_indices = all(name.isdigit() for name in classes)
    labels_are_indices = all(label.strip().lstrip("-").isdigit() for label in manifest_labels)
    if labels_are_indices and not names_are_indices:
        return str(classes.index(new_label))
    return new_label


def validate_decisions(decisions: pd.DataFrame, reviewed: str, label_of: dict[str, str], classes: list[str],
                       class_source: str) -> None:
    """Refuse the first row that cannot be applied, naming the file and the row. `label_of`: the manifest's id → label."""
    seen: dict[str, int] = {}
    shown = ", ".join(classes[:12]) + (", ..." if len(classes) > 12 else "")
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
    for _flag, path in (("-o", output), ("--audit", audit_output)):
        if path is not None:
            table_format(path)
    if is_stdio(output) and is_stdio(audit_output):
        raise UsageError("-o and --audit cannot both go to stdout")
    outputs = {"-o": output, "--audit": audit_output,
               "the sidecar": output + ".json" if output and not is_stdio(output) else None}
    check_outputs_clear_of_inputs(outputs, {"reviewed file": reviewed, "manifest": manifest, "--classes file": classes_file})
    check_overwrite(outputs, overwrite)
    decisions = read_decisions(reviewed)
    samples = read_manifest(manifest)
    label_values = distinct(samples.labels)
    classes, class_source = apply_class_list(reviewed, label_values, classes_file)
    # the reviewed ids' manifest rows, found in one pass over the ids (made one at a time): an index of every id
    # of a million-row manifest held its million strings, and a review covers a few of them
    wanted = set(decisions["id"])
    position = {sample_id: row for row, sample_id in enumerate(samples.ids) if sample_id in wanted}
    validate_decisions(decisions, reviewed, {sample_id: samples.labels[row] for sample_id, row in position.items()},
                       classes, class_source)
    new_labels: dict[int, str] = {}  # manifest row → its new label (only the relabeled rows)
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
    changed = sum(1 for old, new, decision in zip(audit["old_label"], audit["new_label"], audit["decision"])
                  if decision == "relabel" and old != new)
    audit = pd.DataFrame(audit, columns=AUDIT_COLUMNS)
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
            "reviewed": {"path": reviewed, "sha256": None if is_stdio(reviewed) else sha256_file(reviewed)},
            "manifest": {"path": manifest, "sha256": sha256_file(manifest)},
        },
    }
    result = ApplyResult(samples, keep, new_labels, audit, summary)
    with output_set(overwrite):  # the fixed manifest, its sidecar and the audit change together
        if output is not None:
            rebase = path_rebaser(samples.paths_at(keep), samples.root, output)
            write_blocks(result.fixed_blocks(rebase), output, quoting=blocks_quoting(result.fixed_blocks, samples, keep))
            if not is_stdio(output):
                write_json_atomic(output + ".json", summary)
        if audit_output is not None:
            write_table(audit, audit_output)
    return result
