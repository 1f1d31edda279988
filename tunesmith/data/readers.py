"""Read rows from JSONL, JSON, Parquet, CSV files and HF `datasets` folders, each with its line number.

JSONL is read line by line here (not through `datasets`) so a malformed line is reported by number;
the columnar formats go through the `datasets` library (memory-mapped Arrow).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from tunesmith._core.errors import DataIssue

Row = tuple[int, Any]  # (1-based line or row number, parsed row)


def _read_jsonl(path: Path, issues: list[DataIssue]) -> Iterator[Row]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                issues.append(DataIssue(str(path), n, None, f"malformed JSON: {err.msg} at column {err.colno}"))


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
        builder = {".parquet": "parquet", ".csv": "csv"}[path.suffix.lower()]
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    # Row numbers: CSV rows are counted after the header line, so line = row + 2 points at the file line.
    offset = 2 if path.suffix.lower() == ".csv" else 1
    for i, row in enumerate(ds):
        yield i + offset, row


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
    if path.is_file() and suffix in (".jsonl", ".json"):
        if suffix == ".json":
            text = path.read_text(encoding="utf-8").lstrip()
            if text.startswith("["):
                try:
                    rows = json.loads(text)
                except json.JSONDecodeError as err:
                    issues.append(DataIssue(str(path), err.lineno, None, f"malformed JSON: {err.msg}"))
                    return
                yield from enumerate(rows, start=1)
                return
        yield from _read_jsonl(path, issues)
    elif path.is_dir() or suffix in (".parquet", ".csv"):
        try:
            yield from _read_with_datasets(path)
        except Exception as err:  # datasets raises many types; report them against the file
            issues.append(DataIssue(str(path), None, None, f"cannot read: {err}"))
    else:
        issues.append(DataIssue(str(path), None, None, f"unsupported file type '{suffix}' (use .jsonl, .json, "
                                                       ".parquet, .csv or a saved HF dataset folder)"))
