"""Classification data: rows of (text, label), read, checked, tokenised and batched for a sequence head.

A text is tokenised as it is, with the tokenizer's defaults (its BOS, if it adds one) and no chat
template, as transformers' sequence classifiers read text; the head reads its last token. A label is a
string or an integer; integers are compared by their decimal form, so `1` in a row matches class "1".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from tunesmith._core.errors import DataError, DataIssue
from tunesmith.config import ClassifyDataConfig, as_paths
from tunesmith.data.conversation import Source
from tunesmith.data.dataset import hold_out
from tunesmith.data.formats import RowError
from tunesmith.data.packing import Example, collate
from tunesmith.data.preference import read_grouped
from tunesmith.data.render import IGNORE


@dataclass(frozen=True)
class LabelledText:
    """One row as read: the text and its label as a string."""

    text: str
    label: str
    source: Source


@dataclass(frozen=True)
class LabelledExample:
    """A tokenised text and its class index; one is one training row."""

    input_ids: tuple[int, ...]
    label: int

    def __len__(self) -> int:
        return len(self.input_ids)


def row_to_labelled(row: Any, text_column: str, label_column: str, source: Source) -> LabelledText:
    """Check one row; raises RowError naming the field at fault."""
    if not isinstance(row, dict):
        raise RowError(None, f"each row must be an object with fields '{text_column}' and '{label_column}', "
                             f"got {type(row).__name__}")
    text, label = row.get(text_column), row.get(label_column)
    if text is None:
        raise RowError(text_column, f"is missing (fields: {sorted(row)}; set data.text_column)")
    if not isinstance(text, str):
        raise RowError(text_column, f"must be a string, got {type(text).__name__}")
    if not text.strip():
        raise RowError(text_column, "is empty")
    if label is None:
        raise RowError(label_column, f"is missing (fields: {sorted(row)}; set data.label_column)")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise RowError(label_column, f"must be a string or an integer, got {type(label).__name__} {label!r}")
    if not str(label).strip():
        raise RowError(label_column, "is empty")
    return LabelledText(text, str(label), source)


def class_order(found: set[str]) -> list[str]:
    """The default class order: integers numerically, then the other names alphabetically."""
    def key(name: str) -> tuple[int, int, str]:
        try:
            return (0, int(name), name)  # the name breaks ties ("7", "07"), so the order never follows the set's
        except ValueError:
            return (1, 0, name)
    return sorted(found, key=key)


@dataclass
class ClassificationData:
    """Training-ready rows (one example each), the class names in head order, and counts."""

    train: list[LabelledExample]
    validation: list[LabelledExample]
    labels: list[str]
    stats: dict[str, Any]


def load_classification_data(cfg: ClassifyDataConfig, tokenizer: Any, seed: int) -> ClassificationData:
    """Read, check and tokenise; raises DataError listing every bad row (file, line, field) before training."""
    issues: list[DataIssue] = []

    def parse(row: Any, group: int, source: Source) -> list[LabelledText]:
        return [row_to_labelled(row, cfg.text_column, cfg.label_column, source)]

    train_rows = read_grouped(as_paths(cfg.train), issues, parse)  # one issue per bad row, all reported
    val_rows = read_grouped(as_paths(cfg.validation), issues, parse)
    labels = list(cfg.labels) if cfg.labels is not None else class_order({r.label for r in train_rows})
    known = set(labels)
    where = "data.labels" if cfg.labels is not None else "the labels of the training data"
    for r in train_rows + val_rows:
        if r.label not in known:
            issues.append(DataIssue(r.source.file, r.source.line, cfg.label_column,
                                    f"unknown label {r.label!r}; {where} are {labels}"))
    DataError.raise_if_any(issues)
    if len(labels) < 2:
        raise DataError([DataIssue(str(cfg.train), None, cfg.label_column,
                                   f"a classifier needs at least 2 classes, the training data has {labels}")])

    stats = {"truncated": 0}
    index = {name: i for i, name in enumerate(labels)}

    def tokenize(rows: list[LabelledText]) -> list[LabelledExample]:
        out = []
        for r, ids in zip(rows, tokenizer([r.text for r in rows])["input_ids"] if rows else []):
            if len(ids) > cfg.max_seq_len:
                ids = ids[:cfg.max_seq_len]
                stats["truncated"] += 1
            out.append(LabelledExample(tuple(ids), index[r.label]))
        return out

    train, val = tokenize(train_rows), tokenize(val_rows)
    if not cfg.validation:
        train, val = hold_out(train, cfg.validation_split, seed)
    stats.update(train_examples=len(train), validation_examples=len(val), classes=len(labels))
    return ClassificationData(train, val, labels, stats)


def collate_labelled(rows: Sequence[LabelledExample], pad_id: int) -> dict:
    """A padded batch (`packing.collate`, one example per row) plus `labels` (E,); `n_loss_tokens` counts
    examples, the unit the classification loss is averaged over."""
    import torch

    batch = collate([[Example(r.input_ids, (IGNORE,) * len(r))] for r in rows], pad_id)
    batch["labels"] = torch.tensor([r.label for r in rows])
    batch["n_loss_tokens"] = len(rows)
    return batch
