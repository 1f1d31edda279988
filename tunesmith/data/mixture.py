"""Weighted task mixtures (FLAN style): each epoch holds every task's share of examples, drawn with a seed.

`MixtureRows` is the lazy `Sequence` of rows that `fit()` trains on. Slot i belongs to a task by
contiguous segments (fit's seeded shuffle interleaves them); within a task, slot j is row `perm_p[j % n]`
of pass p = j // n, with a seeded permutation per pass, so a small task shows every row before it repeats
one. Every row is a pure function of (seed, i), which is what lets a run resume exactly.

In streaming mode a task's rows stay on disk: one byte offset per JSONL row, read, parsed and tokenised
when a batch asks for it (a small LRU cache keeps recent ones).
"""
from __future__ import annotations

import bisect
import codecs
import functools
import json
import math
import string
import zlib
from array import array
from itertools import accumulate
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from tunesmith._core.errors import DataError, DataIssue, TunesmithError
from tunesmith.config import DataConfig, MixtureTaskConfig, as_paths
from tunesmith.data.conversation import ROLES, Conversation, Message, Source
from tunesmith.data.dataset import SFTData, read_conversations, tokenize_all, tokenize_example
from tunesmith.data.formats import RowError, to_conversation, to_issue
from tunesmith.data.packing import Example, pack_examples
from tunesmith.data.readers import not_utf8

STREAM_CHECK_ROWS = 1000  # rows per file that streaming checks before training (and `validate` reports)
Convert = Callable[[Any, Source, int], Conversation]


def _key(*parts: Any) -> list[int]:
    """Entropy for numpy's seeding from ints and strings (crc32, not `hash`, which changes per process)."""
    return [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) % 2**64 for p in parts]


def largest_remainder(weights: Sequence[float], total: int) -> list[int]:
    """Split `total` slots in proportion to `weights`: each gets the floor of its quota, and the slots left
    go to the largest fractional parts (ties: the earlier task), so the counts sum to `total` exactly."""
    quotas = [w / sum(weights) * total for w in weights]
    slots = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda t: (slots[t] - quotas[t], t))
    for t in by_remainder[: total - sum(slots)]:
        slots[t] += 1
    return slots


class _RowFormatter(string.Formatter):
    """`str.format` over a row whose filled-in values must be text or numbers: a null (a missing Parquet
    cell) would be trained as the word "None", and a list or object as its Python repr."""

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> tuple[Any, str]:
        value, first = super().get_field(field_name, args, kwargs)
        if value is None:
            raise RowError(field_name, "is null")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise RowError(field_name, f"must be text or a number, got {type(value).__name__} (index into it: "
                                       f"{{{field_name}[0]}} or {{{field_name}[key]}})")
        return value, first


_FORMATTER = _RowFormatter()


def render_template(template: dict[str, str], row: Any, source: Source) -> Conversation:
    """The template's system/user/assistant messages filled in from the row's fields (`str.format`, so
    `{field}`, `{field[0]}` and `{field[key]}` work); raises RowError naming a missing, null or non-text
    field."""
    if not isinstance(row, dict):
        raise RowError(None, f"each row must be a JSON object, got {type(row).__name__}")
    messages = []
    for role in (r for r in ROLES if r in template):
        try:
            messages.append(Message(role, _FORMATTER.vformat(template[role], (), row)))
        except RowError as err:
            raise RowError(err.field, f"{err.message} (the template's {role} message uses it)") from None
        except KeyError as err:
            raise RowError(str(err.args[0]), f"is missing (the template's {role} message uses it)") from None
        except (IndexError, AttributeError, TypeError, ValueError) as err:
            raise RowError(None, f"the template's {role} message cannot be filled in: {err}") from None
    return Conversation(messages=tuple(messages), source=source)


def task_converter(task: MixtureTaskConfig, fmt: str, seed: int, split: str) -> Convert:
    """Row -> Conversation for one task: a template picked by (seed, task, split, row number), or the
    row's own format. The pick is fixed per row, so a row seen in two passes reads the same both times."""
    templates = task.templates

    def convert(row: Any, source: Source, k: int) -> Conversation:
        if not templates:
            return to_conversation(row, fmt, source)
        pick = zlib.crc32(f"{seed}:{task.name}:{split}:{k}".encode()) % len(templates)
        return render_template(templates[pick], row, source)
    return convert


def _index_lines(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(byte offset of each non-blank line, rows before each blank line): one pass, 8 bytes per row."""
    offsets, blanks = array("q"), array("q")
    pos = 0
    with open(path, "rb") as f:
        for n, line in enumerate(f):
            if n == 0 and line.startswith(codecs.BOM_UTF8):  # the offset skips it, as the JSONL reader does
                line, pos = line[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
            if line.strip():
                offsets.append(pos)
            else:  # skipped like the JSONL reader does; remembered only to name file lines in errors
                blanks.append(len(offsets))
            pos += len(line)
    return np.frombuffer(offsets, dtype=np.int64), np.frombuffer(blanks, dtype=np.int64)


def _read_line(path: str, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.readline()


class StreamedExamples(Sequence[Example]):
    """A task's rows in JSONL files, read and tokenised when asked for. Per row it holds one int64 offset;
    a file's blank lines (only their positions) turn a row number back into its file line for errors."""

    def __init__(self, files: list[tuple[str, np.ndarray, np.ndarray]],
                 to_example: Callable[[Any, Source, int], Example], cache: int = 1024):
        self.paths = [path for path, _, _ in files]
        self.offsets = [offsets for _, offsets, _ in files]
        self._blanks = [blanks for _, _, blanks in files]
        self._starts = list(accumulate((len(o) for o in self.offsets), initial=0))
        self._to_example = to_example
        self._cached = functools.lru_cache(maxsize=cache)(self._load)

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, k: int) -> Example:  # type: ignore[override]  # no slices: rows are read one by one
        if not 0 <= k < len(self):
            raise IndexError(k)
        return self._cached(k)

    def _load(self, k: int) -> Example:
        f = bisect.bisect_right(self._starts, k) - 1
        i = k - self._starts[f]
        line = i + 1 + int(np.searchsorted(self._blanks[f], i, side="right"))
        source = Source(self.paths[f], line)
        try:
            raw = _read_line(self.paths[f], int(self.offsets[f][i]))
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise RowError(None, not_utf8(raw, err.start)) from None
            except json.JSONDecodeError as err:
                raise RowError(None, f"malformed JSON: {err.msg} at column {err.colno}") from None
            return self._to_example(row, source, k)
        except RowError as err:  # mid-training there is no list to collect into: stop, naming the row
            raise DataError([to_issue(err, source)]) from None

    def check(self, limit: int) -> tuple[int, list[DataIssue]]:
        """Read the first `limit` rows of each file: (rows read, issues found)."""
        issues, n = [], 0
        for start, end in zip(self._starts, self._starts[1:]):
            for k in range(start, min(end, start + limit)):
                n += 1
                try:
                    self[k]
                except DataError as err:
                    issues += err.issues
        return n, issues


def stream_files(paths: list[str], to_example: Callable[[Any, Source, int], Example],
                 issues: list[DataIssue]) -> StreamedExamples:
    """Index the JSONL files that exist and have rows; the others become issues."""
    files = []
    for path in paths:
        if not Path(path).is_file():
            issues.append(DataIssue(path, None, None, "file not found"))
            continue
        offsets, blanks = _index_lines(path)
        if not len(offsets):
            issues.append(DataIssue(path, None, None, "has no rows" if len(blanks) else "file is empty"))
            continue
        files.append((path, offsets, blanks))
    return StreamedExamples(files, to_example)


class Selection(Sequence[Example]):
    """The rows of `source` numbered in sorted `held` (keep=False), or all the others (keep=True),
    without copying the others' numbers: the i-th kept row is i plus the held rows before it."""

    def __init__(self, source: Sequence[Example], held: np.ndarray, keep: bool):
        self.source, self.held, self.keep = source, held, keep
        self._gaps = held - np.arange(len(held))  # kept rows before each held one

    def __len__(self) -> int:
        return len(self.source) - len(self.held) if self.keep else len(self.held)

    def __getitem__(self, i: int) -> Example:  # type: ignore[override]
        if not 0 <= i < len(self):
            raise IndexError(i)
        if not self.keep:
            return self.source[int(self.held[i])]
        return self.source[i + int(np.searchsorted(self._gaps, i, side="right"))]


def held_out(n: int, fraction: float, seed: int, task: str) -> np.ndarray:
    """Sorted row numbers of a seeded `fraction` of n rows (at least one; none of fewer than two)."""
    if fraction <= 0 or n < 2:
        return np.empty(0, dtype=np.int64)
    rng = np.random.default_rng(_key(seed, task, "validation"))
    return np.sort(rng.choice(n, size=max(1, round(fraction * n)), replace=False))


class _LazyRows(Sequence[list[Example]]):
    """Rows of one example each, built on demand by `_row`; indexing accepts negatives and slices."""

    def _row(self, i: int) -> list[Example]:
        raise NotImplementedError

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):  # evaluate() batches validation rows by slicing
            return [self._row(j) for j in range(len(self))[i]]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._row(i)


class MixtureRows(_LazyRows):
    """One epoch of a weighted mixture: task t holds `slots[t]` of `length` rows (largest remainder)."""

    def __init__(self, tasks: Sequence[tuple[str, float, Sequence[Example]]], length: int, seed: int):
        self.names = [name for name, _, _ in tasks]
        self.weights = [w for _, w, _ in tasks]
        self.sources = [rows for _, _, rows in tasks]
        assert all(len(rows) for rows in self.sources), "every task needs rows"
        self.slots = largest_remainder(self.weights, length)
        self._starts = list(accumulate(self.slots, initial=0))
        self._seed = seed
        # a seeded order of the task's rows for each (task, pass) in use: 8 bytes per row of the task
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self._starts[-1]

    def locate(self, i: int) -> tuple[int, int]:
        """(task, row number within the task) of slot i."""
        t = bisect.bisect_right(self._starts, i) - 1
        p, r = divmod(i - self._starts[t], len(self.sources[t]))
        if (t, p) not in self._orders:
            rng = np.random.default_rng(_key(self._seed, self.names[t], p))
            self._orders[t, p] = rng.permutation(len(self.sources[t]))
        return t, int(self._orders[t, p][r])

    def _row(self, i: int) -> list[Example]:
        t, r = self.locate(i)
        return [self.sources[t][r]]

    def describe(self) -> dict[str, dict[str, Any]]:
        """Per task: training rows, weight, slots per epoch and passes over its rows per epoch."""
        return {name: {"rows": len(rows), "weight": w, "slots": s, "passes": round(s / len(rows), 3)}
                for name, w, rows, s in zip(self.names, self.weights, self.sources, self.slots)}


class ConcatRows(_LazyRows):
    """Several tasks' examples one after another (the validation rows of a mixture)."""

    def __init__(self, parts: Sequence[Sequence[Example]]):
        self.parts = parts
        self._starts = list(accumulate((len(p) for p in parts), initial=0))

    def __len__(self) -> int:
        return self._starts[-1]

    def _row(self, i: int) -> list[Example]:
        t = bisect.bisect_right(self._starts, i) - 1
        return [self.parts[t][i - self._starts[t]]]


def load_mixture(cfg: DataConfig, tokenizer: Any, seed: int) -> SFTData:
    """Train and validation rows of `data.mixture`. Without streaming every row is read and tokenised now
    and every bad row is reported at once; with streaming only the first STREAM_CHECK_ROWS rows of each
    file are, and a bad row further on stops training with a DataError naming it."""
    assert cfg.mixture
    issues: list[DataIssue] = []
    lost: dict[str, int | None] = {"truncated": 0, "dropped_too_long": 0, "dropped_no_loss_tokens": 0}

    def rows(task: MixtureTaskConfig, split: str) -> Sequence[Example]:
        convert = task_converter(task, cfg.format, seed, split)
        paths = as_paths(task.train if split == "train" else task.validation)
        if cfg.streaming:  # an example cut to no trained tokens keeps its slot and adds nothing to the loss
            return stream_files(paths, lambda row, src, k: tokenize_example(convert(row, src, k), tokenizer, cfg)[0],
                                issues)
        examples, stats = tokenize_all(read_conversations(paths, cfg.format, issues, convert), tokenizer, cfg, issues)
        if split == "train":
            for key, n in stats.items():
                lost[key] = (lost[key] or 0) + n
        return examples

    trains, vals, checked = [], [], 0
    for task in cfg.mixture:
        train, val = rows(task, "train"), rows(task, "validation")
        if cfg.streaming:
            for streamed in (train, val):
                n, found = streamed.check(STREAM_CHECK_ROWS)  # type: ignore[union-attr]
                checked += n
                issues.extend(found)
        held = held_out(len(train), 0 if task.validation else cfg.validation_split, seed, task.name)
        if len(held):
            train, val = Selection(train, held, keep=True), Selection(train, held, keep=False)
        trains.append(train)
        vals.append(val)
    DataError.raise_if_any(issues)
    empty = [t.name for t, rows in zip(cfg.mixture, trains) if not len(rows)]
    if empty:
        raise DataError([DataIssue(str(as_paths(t.train)), None, None, f"task {t.name}: no example is left to "
                                   f"train on after truncation ({lost})") for t in cfg.mixture if t.name in empty])
    length = cfg.examples_per_epoch or sum(len(rows) for rows in trains)
    train_rows = MixtureRows([(t.name, t.weight, rows) for t, rows in zip(cfg.mixture, trains)], length, seed)
    starved = [name for name, s in zip(train_rows.names, train_rows.slots) if s == 0]
    if starved:
        raise TunesmithError(f"data.mixture: tasks {starved} get 0 of the {length} examples of an epoch; raise "
                             "their weight or data.examples_per_epoch")
    tasks = train_rows.describe()
    for name, val in zip(train_rows.names, vals):
        tasks[name]["validation"] = len(val)
    if cfg.streaming:  # counting tokens would read the whole corpus; so would the truncation counts
        lost = dict.fromkeys(lost)
        tokens = loss_tokens = None
    else:
        tokens = sum(len(row[0]) for row in train_rows)
        loss_tokens = sum(row[0].n_loss_tokens for row in train_rows)
    stats: dict[str, Any] = {**lost, "train_examples": len(train_rows), "validation_examples": sum(map(len, vals)),
                             "train_tokens": tokens, "train_loss_tokens": loss_tokens, "train_rows": len(train_rows),
                             "tasks": tasks}
    if cfg.streaming:
        stats["checked"] = f"first {STREAM_CHECK_ROWS} rows of each file ({checked} rows)"
    if cfg.packing:  # the config refuses it with streaming: packing needs the whole epoch's lengths up front
        packed = pack_examples([row[0] for row in train_rows], cfg.max_seq_len)
        stats["train_rows"] = len(packed)
        return SFTData(packed, pack_examples([row[0] for row in ConcatRows(vals)], cfg.max_seq_len), stats)
    return SFTData(train_rows, ConcatRows(vals), stats)
