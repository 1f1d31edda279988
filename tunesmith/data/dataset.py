"""From config to training rows: read every file, normalise, tokenise, check, split, pack.

Every bad row is collected (file, line, field) before anything trains, and reported together.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

from tunesmith._core.errors import DataError, DataIssue
from tunesmith.config import DataConfig, as_paths
from tunesmith.data.conversation import Conversation, Source
from tunesmith.data.conversation import Message
from tunesmith.data.formats import RowError, parse_messages, to_conversation, to_issue
from tunesmith.data.packing import Example, pack_examples, shift_labels
from tunesmith.data.readers import read_rows
from tunesmith.data.render import IGNORE, tokenize_conversation

T = TypeVar("T")


@dataclass
class SFTData:
    """Training-ready data: rows of one example, or of several when packed (lazy for a mixture)."""

    train: Sequence[list[Example]]
    validation: Sequence[list[Example]]
    stats: dict[str, Any] = field(default_factory=dict)


def read_conversations(paths: list[str], fmt: str, issues: list[DataIssue],
                       convert: Callable[[Any, Source, int], Conversation] | None = None) -> list[Conversation]:
    """Read and normalise every row of every file, appending one issue per bad row. `convert(row, source,
    k)` (k: the row's number over all `paths`, from 0) replaces the `fmt` parser, e.g. for templates."""
    convs, k = [], 0
    for path in paths:
        n_rows = 0
        n_issues = len(issues)
        for line, row in read_rows(path, issues):
            n_rows += 1
            source = Source(str(path), line)
            try:
                convs.append(convert(row, source, k) if convert else to_conversation(row, fmt, source))
            except RowError as err:
                issues.append(to_issue(err, source))
            k += 1
        if n_rows == 0 and len(issues) == n_issues:
            issues.append(DataIssue(str(path), None, None, "has no rows"))
    return convs


def tokenize_example(conv: Conversation, tokenizer: Any, cfg: DataConfig) -> tuple[Example, bool]:
    """(the example cut to data.max_seq_len, whether it was longer). Raises RowError when the chat template
    fails on it, or when it is too long under `truncation: error`."""
    try:
        ids, labels = tokenize_conversation(tokenizer, conv)
    except ValueError as err:
        raise RowError("messages", str(err)) from None
    over = len(ids) > cfg.max_seq_len
    if over and cfg.truncation == "error":
        raise RowError(None, f"{len(ids)} tokens is over data.max_seq_len={cfg.max_seq_len} "
                             "(or set data.truncation to truncate or drop)")
    return shift_labels(ids[: cfg.max_seq_len], labels[: cfg.max_seq_len]), over


def tokenize_all(convs: list[Conversation], tokenizer: Any, cfg: DataConfig,
                 issues: list[DataIssue]) -> tuple[list[Example], dict[str, int]]:
    """Tokenise with the chat template and apply the truncation policy."""
    examples, stats = [], {"truncated": 0, "dropped_too_long": 0, "dropped_no_loss_tokens": 0}
    for conv in convs:
        try:
            ex, over = tokenize_example(conv, tokenizer, cfg)
        except RowError as err:
            issues.append(to_issue(err, conv.source))
            continue
        if over and cfg.truncation == "drop":
            stats["dropped_too_long"] += 1
            continue
        stats["truncated"] += over
        if ex.n_loss_tokens == 0:
            stats["dropped_no_loss_tokens"] += 1
            continue
        examples.append(ex)
    return examples, stats


def hold_out(rows: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """(kept, held out): a seeded `fraction` of `rows` (at least one) set aside for validation, both in
    their original order; of fewer than two rows nothing is held out."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(rows)))
    return [rows[i] for i in sorted(order[n_val:])], [rows[i] for i in sorted(order[:n_val])]


def load_sft_data(cfg: DataConfig, tokenizer: Any, seed: int) -> SFTData:
    """Build train and validation rows; raises DataError listing every bad row before training starts."""
    if cfg.mixture:
        from tunesmith.data.mixture import load_mixture  # it builds on this module

        return load_mixture(cfg, tokenizer, seed)
    issues: list[DataIssue] = []
    train_convs = read_conversations(as_paths(cfg.train), cfg.format, issues)
    val_convs = read_conversations(as_paths(cfg.validation), cfg.format, issues)
    train, stats = tokenize_all(train_convs, tokenizer, cfg, issues)
    val, _ = tokenize_all(val_convs, tokenizer, cfg, issues)
    DataError.raise_if_any(issues)
    if not train:
        raise DataError([DataIssue(str(cfg.train), None, None, "no example is left to train on "
                                   f"after truncation ({stats})")])
    if not cfg.validation:
        train, val = hold_out(train, cfg.validation_split, seed)

    def rows(examples: list[Example]) -> list[list[Example]]:
        return pack_examples(examples, cfg.max_seq_len) if cfg.packing else [[e] for e in examples]

    stats.update(
        train_examples=len(train), validation_examples=len(val),
        train_tokens=sum(len(e) for e in train), train_loss_tokens=sum(e.n_loss_tokens for e in train),
    )
    train_rows, val_rows = rows(train), rows(val)
    stats.update(train_rows=len(train_rows))
    return SFTData(train_rows, val_rows, stats)


def read_prompts(path: str, output: str = "completion") -> list[tuple[dict, list[Message], Source]]:
    """Rows to complete: `prompt` (a string or messages) or `messages`, whose trailing assistant turns (a
    reference answer) are dropped. A row that already has the `output` field the completion will be written
    to is refused (its value would be lost). Raises DataError listing every bad row."""
    issues: list[DataIssue] = []
    out = []
    for line, row in read_rows(path, issues):
        try:
            if not isinstance(row, dict) or not ({"prompt", "messages"} & set(row)):
                raise RowError("prompt", "each row needs a 'prompt' (string or messages) or 'messages'")
            if output in row:
                raise RowError(output, f"is already in the row, and the generated '{output}' would replace it: "
                                       "drop it (to score answers against it, use tunesmith eval)")
            key = "prompt" if "prompt" in row else "messages"
            value = row[key]
            msgs = [Message("user", value)] if isinstance(value, str) else parse_messages(value, key)
            while msgs and msgs[-1].role == "assistant":
                msgs.pop()
            if not msgs:
                raise RowError(key, "has nothing before the assistant turn")
            out.append((row, msgs, Source(str(path), line)))
        except RowError as err:
            issues.append(to_issue(err, Source(str(path), line)))
    DataError.raise_if_any(issues)
    return out


def validate_data(cfg: DataConfig, tokenizer: Any, seed: int) -> dict[str, Any]:
    """Check every row (streaming: the first rows of each file); returns stats or raises DataError with all
    issues (capped in the message)."""
    return load_sft_data(cfg, tokenizer, seed).stats


__all__ = ["SFTData", "load_sft_data", "validate_data", "read_conversations", "tokenize_all", "IGNORE"]
