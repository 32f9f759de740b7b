"""review.csv as annotators' spreadsheets see it: cells that would run as formulas are marked, and the file
is read back in whatever form a spreadsheet saved it.

Marking (OWASP's CSV-injection advice): a text cell that a spreadsheet would evaluate — its first
character `=`, `+`, `-` or `@` (after any spaces), or a tab, carriage return or line feed — gets one
apostrophe in front, and so does every cell that already starts with an apostrophe. A number such as
`-3` or `+1.5e-3` is left alone (a spreadsheet reads it as that number, which runs nothing). Unmarking
removes one leading apostrophe, if there is one: since every cell that started with one was marked,
that gives back exactly the value irank wrote.

Reading: Excel, LibreOffice and Numbers save a CSV with `,`, `;` or tab between fields, in UTF-8 (with or
without a byte-order mark), UTF-16 or their Windows code page, sometimes after a `sep=;` line. `read_sheet`
takes any of these.
"""

from __future__ import annotations

import codecs
import csv
import io
import re

import pandas as pd

MARK = "'"
FORMULA_STARTS = ("=", "+", "-", "@")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
SEPARATORS = (",", ";", "\t", "|")


def needs_mark(text: str) -> bool:
    if not text:
        return False
    if text[0] in (MARK, "\t", "\r", "\n"):
        return True
    return text.lstrip()[:1] in FORMULA_STARTS and not _NUMBER.fullmatch(text.strip())


def mark(text: str) -> str:
    """The cell as review.csv holds it."""
    return MARK + text if needs_mark(text) else text


def unmark(text: str) -> str:
    """The value irank marked as `text` (see the module's docstring)."""
    return text[1:] if text.startswith(MARK) else text


def mark_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table with every text cell and column name marked (numbers, empty cells and NaN left alone)."""
    marked = table.copy()
    for place in range(marked.shape[1]):
        column = marked.iloc[:, place]
        if column.dtype == object or pd.api.types.is_string_dtype(column):
            marked.isetitem(place, pd.Series([mark(value) if isinstance(value, str) else value for value in column],
                                             index=column.index, dtype=object))
    marked.columns = [mark(str(name)) for name in marked.columns]
    return marked


def decode(data: bytes) -> tuple[str, str]:
    """The text of a spreadsheet's CSV and the encoding it was read in: a byte-order mark decides, else
    UTF-16 when every other byte is zero, else UTF-8, else Windows-1252, else Latin-1 (which reads any bytes)."""
    for bom, encoding in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                          (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            try:
                return data.decode(encoding), encoding
            except UnicodeDecodeError:
                break
    head = data[:4096]
    guesses = ["utf-8", "cp1252", "latin-1"]
    if len(head) >= 2 and head[1::2].count(0) > len(head) // 4:
        guesses.insert(0, "utf-16-le")
    elif len(head) >= 2 and head[0::2].count(0) > len(head) // 4:
        guesses.insert(0, "utf-16-be")
    for encoding in guesses:
        try:
            return data.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes any bytes")  # unreachable


def _first_record(text: str, separator: str) -> list[str]:
    try:
        return next(csv.reader(io.StringIO(text, newline=""), delimiter=separator), [])
    except csv.Error:
        return []


def separator_of(text: str, wanted: tuple[str, ...]) -> str:
    """The separator under which the header holds the most of the `wanted` names (case and spaces aside), then
    the most fields."""
    def fit(separator: str) -> tuple[int, int]:
        names = [name.strip().lower() for name in _first_record(text, separator)]
        return sum(name in names for name in wanted), len(names)

    return max(SEPARATORS, key=fit)


def read_sheet(data: bytes, wanted: tuple[str, ...] = ("id", "decision", "new_label")) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the rows of a spreadsheet's CSV, as (record number from 1, fields padded to the header's
    length). Blank rows are left out. ValueError names the record where the fields cannot be parsed or
    outnumber the header's."""
    text, _ = decode(data)
    separator = None
    hint = re.match(r"\A\"?sep=(.)\"?[^\S\n]*\r?\n", text)  # Excel's line naming the separator
    if hint:
        separator, text = hint.group(1), text[hint.end():]
    separator = separator or separator_of(text, wanted)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=separator)
    header: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    number = 0
    try:
        for fields in reader:
            if header is None:
                header = fields or None
                continue
            number += 1
            if not any(field.strip() for field in fields):
                continue
            if len(fields) > len(header) and any(field.strip() for field in fields[len(header):]):
                raise ValueError(f"row {number} has {len(fields)} fields, the header {len(header)}")
            fields = fields[:len(header)]
            rows.append((number, fields + [""] * (len(header) - len(fields))))
    except csv.Error as exc:
        raise ValueError(f"line {reader.line_num}: {exc}") from None
    return header or [], rows


def column_places(header: list[str], wanted: tuple[str, ...]) -> dict[str, int]:
    """Where each of the `wanted` columns is in a spreadsheet's header: the column of exactly that name, else the
    first whose name matches it but for case, spaces and irank's mark."""
    loose = [unmark(name).strip().lower() for name in header]
    return {name: header.index(name) if name in header else loose.index(name)
            for name in wanted if name in header or name in loose}
