"""Read rows from JSONL, JSON, Parquet, CSV files and HF `datasets` folders, each with its line number.

JSONL is read line by line here (not through `datasets`) so a malformed line is reported by number. CSV
is read by the `csv` module, not `datasets`: pandas' type inference would turn a cell `2` into an int,
`NA` into a missing value and an integer column with a gap into floats, and it loses count of lines after
a quoted newline; here every cell stays the text it is and a row is numbered by the line it starts on.
Parquet and dataset folders go through the `datasets` library (memory-mapped Arrow). A UTF-8 byte-order
mark at the start of a text file is skipped.
"""
from __future__ import annotations

import codecs
import csv
import json
from pathlib import Path
from typing import Any, Iterator

from tunesmith._core.errors import DataIssue

Row = tuple[int, Any]  # (1-based line or row number, parsed row)


def not_utf8(line: bytes, start: int) -> str:
    """The issue for a line that is not UTF-8 (often Latin-1 or cp1252): its first bad byte, at `start`."""
    column = len(line[:start].decode("utf-8")) + 1  # what precedes the first bad byte decodes
    return f"is not valid UTF-8 (byte 0x{line[start]:02x} at column {column}); save the file as UTF-8"


def _read_jsonl(path: Path, issues: list[DataIssue]) -> Iterator[Row]:
    # bytes, decoded per line: a line that is not UTF-8 becomes one issue and the lines after it are read
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            if n == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                issues.append(DataIssue(str(path), n, None, not_utf8(raw, err.start)))
                continue
            if not line.strip():
                continue
            try:
                yield n, json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                issues.append(DataIssue(str(path), n, None, f"malformed JSON: {err.msg} at column {err.colno}"))


def _read_json_array(path: Path, raw: bytes, issues: list[DataIssue]) -> Iterator[Row]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = raw.rfind(b"\n", 0, err.start) + 1
        issues.append(DataIssue(str(path), raw.count(b"\n", 0, err.start) + 1, None,
                                not_utf8(raw[line_start:err.start + 1], err.start - line_start)))
        return
    try:
        rows = json.loads(text)  # not stripped, so the error's line is the file's
    except json.JSONDecodeError as err:
        issues.append(DataIssue(str(path), err.lineno, None, f"malformed JSON: {err.msg}"))
        return
    yield from enumerate(rows, start=1)


def _read_csv(path: Path, issues: list[DataIssue]) -> Iterator[Row]:
    """Rows as {header: cell}, every cell a string ("" when empty). A byte that is not UTF-8 is kept by
    surrogateescape, so the row holding it is named instead of the decoder failing on a whole 8 KB chunk."""
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                return
            twice = sorted({name for name in header if header.count(name) > 1})
            if twice:
                issues.append(DataIssue(str(path), 1, None, f"the header names columns {twice} more than once"))
                return
            if bad := _not_utf8_cell(header, header):
                issues.append(DataIssue(str(path), 1, None, f"the header {bad[1]}"))
                return
            start = reader.line_num + 1
            for cells in reader:
                line, start = start, reader.line_num + 1  # a quoted newline makes a row span several lines
                if not cells:  # a blank line
                    continue
                if len(cells) > len(header):  # a cell without a column: an unquoted comma, most likely
                    issues.append(DataIssue(str(path), line, None,
                                            f"has {len(cells)} cells, the header has {len(header)}"))
                elif bad := _not_utf8_cell(header, cells):
                    issues.append(DataIssue(str(path), line, *bad))
                else:  # a short row's missing cells are missing (None), so the field at fault is named
                    yield line, {name: cells[i] if i < len(cells) else None for i, name in enumerate(header)}
        except csv.Error as err:  # e.g. a NUL byte, or a quote left open at the end of the file
            issues.append(DataIssue(str(path), reader.line_num or None, None, f"malformed CSV: {err}"))


def _not_utf8_cell(header: list[str], cells: list[str]) -> tuple[str, str] | None:
    """(column name, issue) of the first cell holding a byte that surrogateescape kept (U+DC80..U+DCFF)."""
    for name, cell in zip(header, cells):
        first = next((i for i, ch in enumerate(cell) if "\udc80" <= ch <= "\udcff"), None)
        if first is not None:
            raw = cell.encode("utf-8", "surrogateescape")
            return name, not_utf8(raw, len(cell[:first].encode("utf-8")))
    return None


def _read_with_datasets(path: Path) -> Iterator[Row]:
    import datasets

    datasets.disable_progress_bars()
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"dataset folder has splits {list(ds)}; name one folder or provide 'train'")
            ds = ds["train"]
    else:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    yield from enumerate(ds, start=1)


def read_rows(path: str | Path, issues: list[DataIssue]) -> Iterator[Row]:
    """Yield (line, row) pairs. Unreadable lines are appended to `issues`, not raised, so all are seen."""
    path = Path(path)
    if not path.exists():
        issues.append(DataIssue(str(path), None, None, "file not found"))
        return
    if path.is_file() and path.stat().st_size == 0:
        issues.append(DataIssue(str(path), None, None, "file is empty"))
        return
    suffix = path.suffix.lower()
    if path.is_file() and suffix == ".json":
        raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
        if raw.lstrip().startswith(b"["):
            yield from _read_json_array(path, raw, issues)
            return
    if path.is_file() and suffix in (".jsonl", ".json"):
        yield from _read_jsonl(path, issues)
    elif path.is_file() and suffix == ".csv":
        yield from _read_csv(path, issues)
    elif path.is_dir() or suffix == ".parquet":
        try:
            yield from _read_with_datasets(path)
        except Exception as err:  # datasets raises many types; report them against the file
            issues.append(DataIssue(str(path), None, None, f"cannot read: {err}"))
    else:
        issues.append(DataIssue(str(path), None, None, f"unsupported file type '{suffix}' (use .jsonl, .json, "
                                                       ".parquet, .csv or a saved HF dataset folder)"))
