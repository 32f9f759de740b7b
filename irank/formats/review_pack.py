"""The review pack, irank's files for annotators: its one owner. `irank review` writes it (review.csv, the Label
Studio tasks and config, review.json with every file's sha256), `irank apply` reads the decisions back (review.csv
as a spreadsheet saved it, or a Label Studio export), and a pack is replaceable only while it is unchanged.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from urllib.parse import quote

import pandas as pd

from irank._version import __version__
from irank.formats.files import (
    is_stdio,
    sha256_bytes,
    sha256_file,
)
from irank.formats.jsontext import JsonError, kind, parse
from irank.formats.manifest import (
    column_as_text,
    csv_quoting,
    iter_table,
    table_format,
    table_input,
)
from irank.formats.sheet import column_places, mark_table, read_sheet, unmark
from irank.runtime.errors import ManifestError, UsageError

REVIEW_COLUMNS = ("decision", "new_label")
DECISIONS = ("keep", "relabel", "remove")
LABEL_STUDIO_LABEL = "label"  # from_name of the class choice in label-studio.xml
LABEL_STUDIO_DECISION = "irank_decision"  # from_name of the optional "remove" choice
LABEL_STUDIO_REMOVE = "remove from the data set"
PACK_FILES = ("index.html", "review.csv", "label-studio.json", "label-studio.xml")  # and review.json, which records them
SELF_HASH = "review_json_sha256"  # review.json's key for the sha256 of its own canonical text without that key


def read_json_file(path: Path, what: str, *, allow_nan: bool = True):
    """The JSON value of a file, strict (`jsontext.parse`): ManifestError naming the file and the position.
    `allow_nan`: read NaN and Infinity, which Python's json writes into irank's own files (a sidecar, review.json)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{what} {path}: cannot read: {exc.strerror or exc}") from None
    return parse_json_bytes(data, f"{what} {path}", allow_nan=allow_nan)


def parse_json_bytes(data: bytes, where: str, *, allow_nan: bool = True):
    """The JSON value of a file's bytes (UTF-8, a BOM allowed), strict: ManifestError starting with `where`."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{where}: not valid UTF-8 text (byte {exc.start})") from None
    try:
        return parse(text, allow_nan=allow_nan)
    except JsonError as exc:
        raise ManifestError(f"{where}: {exc.where()}: not JSON: {exc.message}") from None


def json_field(document: dict, keys: tuple[str, ...], types: tuple[type, ...], where: str):
    """document[k1][k2]...: None where a key is absent; ManifestError naming the key where a value has the wrong type."""
    value = document
    for depth, key in enumerate(keys):
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ManifestError(f"{where}: {'.'.join(keys[:depth]) or 'the file'} is {kind(value)}, not an object")
        value = value.get(key)
    if value is not None and not isinstance(value, types):
        raise ManifestError(f"{where}: {'.'.join(keys)} is {kind(value)}, not {kind(types[0]())}")
    return value


def class_names(value, where: str, key: str = "classes") -> list[str] | None:
    """A JSON list of class names (strings) as a list, None when absent; ManifestError for anything else."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        bad = value if not isinstance(value, list) else next(name for name in value if not isinstance(name, str))
        raise ManifestError(f"{where}: {key} must be a list of class names (strings); found {kind(bad)}")
    return value


def review_table(flagged: pd.DataFrame) -> pd.DataFrame:
    """The flagged rows with empty decision and new_label columns right after id, for spreadsheets."""
    table = flagged.copy()
    clashes = [column for column in REVIEW_COLUMNS if column in table.columns]
    table = table.rename(columns={column: f"{column}_input" for column in clashes})
    at = list(table.columns).index("id") + 1
    for offset, column in enumerate(REVIEW_COLUMNS):
        table.insert(at + offset, column, "")
    return table


def label_studio_url(image_path: Path, document_root: Path) -> str | None:
    """Label Studio's local-files URL for an image under its document root; None when it lies outside."""
    try:
        relative = image_path.resolve().relative_to(document_root.resolve())
    except ValueError:
        return None
    return "/data/local-files/?d=" + quote(relative.as_posix())


def check_url_prefix(prefix: str) -> str:
    """An --image-url-prefix as given, once it is a URL a browser can fetch images by: http://, https:// or /,
    with no space or control character. UsageError otherwise."""
    if not prefix.lower().startswith(("http://", "https://", "/")):
        raise UsageError(f"--image-url-prefix {prefix!r}: must start with http://, https:// or / "
                         "(an image's path under the image folder is appended to it)")
    if any(character.isspace() or ord(character) < 32 or ord(character) == 127 for character in prefix):
        raise UsageError(f"--image-url-prefix {prefix!r}: holds a space or control character; URL-encode it")
    return prefix


def prefixed_url(image_path: Path, image_root: Path, prefix: str) -> str | None:
    """prefix + the image's path under the image folder, each segment URL-quoted (the path as the manifest
    names it, symlinks not followed, else as resolved); None when it lies outside."""
    for path, root in ((Path(os.path.abspath(image_path)), Path(os.path.abspath(image_root))),
                       (image_path.resolve(), image_root.resolve())):
        relative = os.path.relpath(path, root)
        if relative != os.pardir and not relative.startswith(os.pardir + os.sep) and not os.path.isabs(relative):
            return prefix + "/".join(quote(part, safe="") for part in Path(relative).parts)
    return None


def task_image_url(image_path: Path, root: Path, prefix: str | None) -> tuple[str, bool]:
    """A task's image URL, and whether the image lies outside `root` (then its URL holds its absolute path)."""
    url = label_studio_url(image_path, root) if prefix is None else prefixed_url(image_path, root, prefix)
    if url is not None:
        return url, False
    segments = image_path.resolve().as_posix().lstrip("/")
    if prefix is None:
        return "/data/local-files/?d=" + quote(segments), True
    return prefix + "/".join(quote(part, safe="") for part in segments.split("/")), True


def label_studio_tasks(flagged: pd.DataFrame, image_paths: list[Path], document_root: Path,
                       url_prefix: str | None = None) -> tuple[list[dict], int]:
    """Image-classification tasks with irank's suggestion as a prediction; also how many images lie outside the
    root. Image URLs: Label Studio's local-files URLs under `document_root`, or with `url_prefix` that prefix and
    the image's path under `document_root` (the image folder)."""
    tasks, outside = [], 0
    for (_, row), image_path in zip(flagged.iterrows(), image_paths):
        url, out = task_image_url(image_path, document_root, url_prefix)
        outside += out
        tasks.append({
            "data": {
                "image": url, "irank_id": str(row["id"]), "given_label": str(row["label"]),
                "rank": int(row["rank"]), "score": float(row["score"]),
            },
            "predictions": [{
                "model_version": f"irank {__version__}",
                "score": float(row["predicted_prob"]),
                "result": [{
                    "from_name": LABEL_STUDIO_LABEL, "to_name": "image", "type": "choices",
                    "value": {"choices": [str(row["predicted"])]},
                }],
            }],
        })
    return tasks, outside


def label_studio_config(classes: list[str]) -> str:
    from xml.sax.saxutils import quoteattr

    choices = "\n".join(f"    <Choice value={quoteattr(name)}/>" for name in classes)
    return (
        "<View>\n"
        '  <Image name="image" value="$image"/>\n'
        '  <Header value="Given label: $given_label (irank rank $rank)"/>\n'
        f'  <Choices name="{LABEL_STUDIO_LABEL}" toName="image" choice="single" showInLine="true">\n{choices}\n  </Choices>\n'
        f'  <Choices name="{LABEL_STUDIO_DECISION}" toName="image" choice="single">\n'
        f'    <Choice value="{LABEL_STUDIO_REMOVE}"/>\n  </Choices>\n'
        "</View>\n"
    )


def filled_decisions(review_csv: Path) -> int | None:
    """How many rows of a review.csv an annotator has filled in, read in any form a spreadsheet saves (separator,
    encoding, quoting, column order; see `sheet.read_sheet`); None when it cannot be read as a table or has no
    decision column."""
    try:
        header, rows = read_sheet(review_csv.read_bytes())
    except (OSError, ValueError):
        return None
    at = column_places(header, REVIEW_COLUMNS)
    if "decision" not in at:
        return None
    return sum(1 for _, fields in rows if any(unmark(fields[place]).strip() for place in at.values()))


def canonical_json(document: dict) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def pack_record(folder: Path) -> tuple[dict | None, str | None]:
    """(review.json of a pack, None), or (None, why it is not one irank wrote untouched)."""
    path = folder / "review.json"
    if path.is_symlink() or not path.is_file():
        return None, "its review.json is not a file irank wrote"
    try:
        text = path.read_text(encoding="utf-8")
        document = parse(text, allow_nan=True)
    except (OSError, UnicodeDecodeError, JsonError) as exc:
        return None, f"its review.json cannot be read ({getattr(exc, 'message', exc)})"
    if not isinstance(document, dict) or document.get("command") != "review":
        return None, "its review.json is not one irank review wrote"
    if SELF_HASH not in document:
        return document, None  # written before irank recorded the pack's files
    own = dict(document)
    stored = own.pop(SELF_HASH)
    files = own.get("files")
    if (canonical_json(document) != text or stored != sha256_bytes(canonical_json(own).encode("utf-8"))
            or not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values())):
        return None, "its review.json was changed since irank wrote it"
    return document, None


def changed_file(folder: Path, name: str) -> str:
    """Why a pack's file that differs from what irank wrote makes the pack not replaceable."""
    if name != "review.csv":
        return f"its {name} was changed since irank wrote it"
    filled = filled_decisions(folder / name)
    if filled:
        return f"its review.csv has {filled} rows filled in by an annotator"
    return "its review.csv was changed since irank wrote it (saved again by a spreadsheet?)"


def legacy_pack_changes(folder: Path, entries: list[str]) -> str | None:
    """A pack from before irank recorded its files' hashes: replaceable only when it holds just its five files
    and its review.csv, read in any form, has a decision column and no decision filled in."""
    others = sorted(set(entries) - {*PACK_FILES, "review.json"})
    if others:
        return f"it holds files irank did not write ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''})"
    if "review.csv" not in entries:
        return "its review.csv is missing"
    filled = filled_decisions(folder / "review.csv")
    if filled is None:
        return "its review.csv cannot be read as a table with a decision column, so its decisions cannot be ruled out"
    return f"its review.csv has {filled} rows filled in by an annotator" if filled else None


def pack_changes(folder: Path) -> str | None:
    """None when `folder` holds exactly the files irank review wrote there, each unchanged (its sha256 as
    review.json records it); else why not, in words. Nothing in the folder is written or removed."""
    entries = sorted(os.listdir(folder))
    if "review.json" not in entries:
        return "a folder that is not empty and not an irank review pack"
    record, problem = pack_record(folder)
    if problem:
        return problem
    if SELF_HASH not in record:
        return legacy_pack_changes(folder, entries)
    files = record["files"]
    others = sorted(set(entries) - {*files, "review.json"})
    if others:
        return f"it holds files irank did not write ({', '.join(others[:5])}{', ...' if len(others) > 5 else ''})"
    for name, digest in sorted(files.items()):
        if name not in entries:
            return f"its {name} is missing"
        path = folder / name
        if path.is_symlink() or not path.is_file():
            return f"its {name} is not the file irank wrote"
        if sha256_file(path) != digest:
            return changed_file(folder, name)
    return None


def review_csv_text(reviewed: pd.DataFrame) -> str:
    """review.csv: every text cell marked where a spreadsheet would run it (`sheet.mark`), every field quoted
    when a value holds a carriage return (which a reader would otherwise take for the end of the row)."""
    return marked_csv(reviewed)[0]


def marked_csv(reviewed: pd.DataFrame) -> tuple[str, int]:
    """review.csv's text (see `review_csv_text`) and the csv module's quoting it was written with."""
    marked = mark_table(reviewed)
    quoting = csv_quoting(marked)
    return marked.to_csv(index=False, quoting=quoting), quoting


def sheet_field(value: str, quote_all: bool, alone: bool = False) -> str:
    """A cell as the csv module writes it with minimal quoting (or every field quoted), as the review page's
    script writes it too: quoted when it holds a comma, a quote, a carriage return or a line feed, or is a row's
    only field and empty."""
    if quote_all or any(character in value for character in ',"\r\n') or (alone and value == ""):
        return '"' + value.replace('"', '""') + '"'
    return value


def sheet_text(header: list[str], rows: list[list[str]], quote_all: bool, newline: str) -> str:
    """A CSV text from cells, written as `sheet_field` writes each (the page's export, in Python)."""
    return "".join(",".join(sheet_field(value, quote_all, len(fields) == 1) for value in fields) + newline
                   for fields in [header, *rows])


def review_sheet(flagged: pd.DataFrame) -> tuple[str, dict]:
    """review.csv's text, and what the review page needs to write it again with decisions filled in: `header` and
    `rows` as cells (as written: marked), `decision_at` (the decision column; new_label follows), `quote_all`,
    `newline`, and `exact`: whether these give back the text byte for byte (the page offers no export if not)."""
    table = review_table(flagged)
    text, quoting = marked_csv(table)
    quote_all = quoting == csv.QUOTE_ALL
    newline = "\r\n" if text.endswith("\r\n") else "\n"
    try:
        records = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error:  # a cell over the csv module's field size limit: the page then sends people to review.csv
        records = [[]]
    header, rows = records[0], records[1:]
    exact = sheet_text(header, rows, quote_all, newline) == text
    if not exact:
        header, rows = [], []
    return text, {"header": header, "rows": rows, "decision_at": list(table.columns).index("decision"),
                  "quote_all": quote_all, "newline": newline, "exact": exact}


def pack_contents(flagged: pd.DataFrame, page: str, tasks: list[dict], classes: list[str],
                  summary: dict, sheet: str | None = None) -> dict[str, bytes]:
    """Every file of the pack, by name (`sheet`: review.csv's text, when already written by `review_sheet`);
    review.json records the sha256 of the others and of itself."""
    contents = {
        "index.html": page.encode("utf-8"),
        "review.csv": (review_csv_text(review_table(flagged)) if sheet is None else sheet).encode("utf-8"),
        "label-studio.json": (json.dumps(tasks, indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
        "label-studio.xml": label_studio_config(classes).encode("utf-8"),
    }
    record = {**summary, "files": {name: sha256_bytes(data) for name, data in contents.items()}}
    record[SELF_HASH] = sha256_bytes(canonical_json(record).encode("utf-8"))
    contents["review.json"] = canonical_json(record).encode("utf-8")
    return contents


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
