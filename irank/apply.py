"""`irank apply`: annotators' decisions (review.csv or a Label Studio export) + the manifest → the fixed manifest.

Per reviewed row: relabel → the label becomes `new_label`; remove → the row is dropped; keep or an
empty decision → unchanged. Every `new_label` must be in the class list; every id must be in the
manifest. Nothing is written unless every row is valid.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ._version import __version__
from .errors import ManifestError, UsageError
from .files import check_outputs_clear_of_inputs, check_overwrite, is_stdio, output_set, sha256_bytes, write_json_atomic
from .columns import distinct
from .jsontext import kind
from .manifest import (Manifest, blocks_quoting, column_as_text, iter_table, path_rebaser, read_classes_file,
                       read_manifest, shown_names, table_format, table_input, write_blocks, write_table)
from .review import (DECISIONS, LABEL_STUDIO_DECISION, LABEL_STUDIO_LABEL, LABEL_STUDIO_REMOVE, class_names,
                     parse_json_bytes, read_json_file)
from .sheet import column_places, read_sheet, unmark

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


def reviewed_bytes(path: str) -> bytes:
    if is_stdio(path):
        return sys.stdin.buffer.read()
    try:
        return Path(table_input(path, "reviewed")).read_bytes()
    except OSError as exc:
        raise ManifestError(f"reviewed {path}: cannot read: {exc.strerror or exc}") from None


def read_review_sheet(path: str, data: bytes) -> pd.DataFrame:
    """A review.csv (`data`: its bytes) in any form a spreadsheet saves (`sheet.read_sheet`), as id, decision,
    new_label and the row: column names matched without regard to case or spaces, irank's marks on formula-like
    cells removed."""
    try:
        header, rows = read_sheet(data)
    except ValueError as exc:
        raise ManifestError(f"reviewed {path}: cannot parse as a table: {exc}") from None
    at = column_places(header, ("id", "decision", "new_label"))
    missing = [column for column in ("id", "decision") if column not in at]
    if missing:
        raise ManifestError(f"reviewed {path}: missing column {' and '.join(repr(m) for m in missing)}; "
                            "is this the review.csv irank review wrote?")
    return pd.DataFrame({
        "row": [number for number, _ in rows],
        "id": [unmark(fields[at["id"]]) for _, fields in rows],
        "decision": [unmark(fields[at["decision"]]).strip().lower() for _, fields in rows],
        "new_label": [unmark(fields[at["new_label"]]) if "new_label" in at else "" for _, fields in rows],
    }, columns=["row", "id", "decision", "new_label"])


def read_decisions(path: str, data: bytes | None = None) -> pd.DataFrame:
    """The reviewed rows as id, decision, new_label (text) plus `row` (1-based, for messages): from a Label Studio
    export (.json), a review.csv as irank wrote it or as a spreadsheet saved it (.csv, .tsv, stdin), or a table
    of those columns in JSON Lines or Parquet. `data`: the file's bytes, read once (default: read here)."""
    data = reviewed_bytes(path) if data is None else data
    if not is_stdio(path) and Path(path).suffix.lower() == ".json":
        return read_label_studio_export(path, data)
    fmt = table_format(path)
    if fmt in ("csv", "tsv"):
        return read_review_sheet(path, data)
    table = pd.concat(list(iter_table(io.BytesIO(data), fmt, what="reviewed", name=path, chunk_rows=1 << 62)),
                      ignore_index=True)
    missing = [column for column in ("id", "decision") if column not in table.columns]
    if missing:
        raise ManifestError(f"reviewed {path}: missing column {' and '.join(repr(m) for m in missing)}; "
                            "is this the review.csv irank review wrote?")
    return pd.DataFrame({
        "row": range(1, len(table) + 1),
        "id": column_as_text(table, "id"),
        "decision": [value.strip().lower() for value in column_as_text(table, "decision")],
        "new_label": column_as_text(table, "new_label") if "new_label" in table.columns else "",
    })


def typed(container: dict, key: str, types: tuple[type, ...], where: str, default=None):
    """container[key] when it has one of `types` (bool never counts as a number), `default` when absent or
    null; ManifestError naming `where` and the key otherwise."""
    value = container.get(key)
    if value is None:
        return default
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        wanted = " or ".join(kind(t()) for t in types)
        raise ManifestError(f"{where}: {key} is {kind(value)}, not {wanted}")
    return value


def choices_of(annotation: dict, from_name: str, where: str) -> list[str]:
    for number, result in enumerate(typed(annotation, "result", (list,), where, []), start=1):
        if not isinstance(result, dict):
            raise ManifestError(f"{where}: result {number} is {kind(result)}, not an object")
        if result.get("from_name") == from_name:
            value = typed(result, "value", (dict,), f"{where}, result {number}", {})
            choices = typed(value, "choices", (list,), f"{where}, result {number}, value", [])
            if not all(isinstance(choice, str) for choice in choices):
                raise ManifestError(f"{where}, result {number}: value.choices must be a list of strings")
            return choices
    return []


def task_decision(task, number: int, path: str) -> dict:
    """One task of a Label Studio export → its row of decisions (the last non-cancelled annotation decides)."""
    where = f"reviewed {path}: task {number}"
    if not isinstance(task, dict):
        raise ManifestError(f"{where} is {kind(task)}, not an object")
    data = typed(task, "data", (dict,), where, {})
    if "irank_id" not in data or "given_label" not in data:
        raise ManifestError(f"{where} has no data.irank_id/data.given_label; "
                            "was it imported from irank review's label-studio.json?")
    sample_id = typed(data, "irank_id", (str,), f"{where}, data")
    given = typed(data, "given_label", (str,), f"{where}, data")
    annotations = typed(task, "annotations", (list,), where, [])
    for place, annotation in enumerate(annotations, start=1):
        if not isinstance(annotation, dict):
            raise ManifestError(f"{where}: annotation {place} is {kind(annotation)}, not an object")
    live = [(place, a) for place, a in enumerate(annotations, start=1) if not a.get("was_cancelled")]
    decision, new_label = "", ""
    if live:
        place, latest = live[-1]
        chosen = choices_of(latest, LABEL_STUDIO_LABEL, f"{where}, annotation {place}")
        if LABEL_STUDIO_REMOVE in choices_of(latest, LABEL_STUDIO_DECISION, f"{where}, annotation {place}"):
            decision = "remove"
        elif chosen and chosen[0] != given:
            decision, new_label = "relabel", chosen[0]
        elif chosen:
            decision = "keep"
    return {"row": number, "id": sample_id, "decision": decision, "new_label": new_label}


def read_label_studio_export(path: str, data: bytes) -> pd.DataFrame:
    """A Label Studio JSON export (`data`: its bytes) of the tasks irank review wrote → decisions (the last
    non-cancelled annotation wins). Strict JSON; every value irank reads is checked for its type, naming the task."""
    tasks = parse_json_bytes(data, f"reviewed {path}", allow_nan=False)
    if not isinstance(tasks, list):
        raise ManifestError(f"reviewed {path}: holds {kind(tasks)}; a Label Studio export is a JSON list of tasks")
    rows = [task_decision(task, number, path) for number, task in enumerate(tasks, start=1)]
    return pd.DataFrame(rows, columns=["row", "id", "decision", "new_label"])


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
    with output_set(overwrite):  # the fixed manifest, its sidecar and the audit change together
        if output is not None:
            rebase = path_rebaser(samples.paths_at(keep), samples.root, output)
            write_blocks(result.fixed_blocks(rebase), output, quoting=blocks_quoting(result.fixed_blocks, samples, keep))
            if not is_stdio(output):
                write_json_atomic(output + ".json", summary)
        if audit_output is not None:
            write_table(audit, audit_output)
    return result
