"""From config to training rows: read every file, normalise, tokenise, check, split, pack.

Every bad row is collected (file, line, field) before anything trains, and reported together.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from tunesmith._core.errors import DataError, DataIssue
from tunesmith.config import DataConfig
from tunesmith.data.conversation import Conversation, Source
from tunesmith.data.conversation import Message
from tunesmith.data.formats import RowError, parse_messages, to_conversation, to_issue
from tunesmith.data.packing import Example, pack_examples, shift_labels
from tunesmith.data.readers import read_rows
from tunesmith.data.render import IGNORE, tokenize_conversation


@dataclass
class SFTData:
    """Training-ready data: rows of one example, or of several when packed."""

    train: list[list[Example]]
    validation: list[list[Example]]
    stats: dict[str, Any] = field(default_factory=dict)


def _paths(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def read_conversations(paths: list[str], fmt: str, issues: list[DataIssue]) -> list[Conversation]:
    """Read and normalise every row of every file, appending one issue per bad row."""
    convs = []
    for path in paths:
        n_rows = 0
        n_issues = len(issues)
        for line, row in read_rows(path, issues):
            n_rows += 1
            source = Source(str(path), line)
            try:
                convs.append(to_conversation(row, fmt, source))
            except RowError as err:
                issues.append(to_issue(err, source))
        if n_rows == 0 and len(issues) == n_issues:
            issues.append(DataIssue(str(path), None, None, "has no rows"))
    return convs


def tokenize_all(convs: list[Conversation], tokenizer: Any, cfg: DataConfig,
                 issues: list[DataIssue]) -> tuple[list[Example], dict[str, int]]:
    """Tokenise with the chat template and apply the truncation policy."""
    examples, stats = [], {"truncated": 0, "dropped_too_long": 0, "dropped_no_loss_tokens": 0}
    for conv in convs:
        try:
            ids, labels = tokenize_conversation(tokenizer, conv)
        except ValueError as err:
            issues.append(DataIssue(conv.source.file, conv.source.line, "messages", str(err)))
            continue
        if len(ids) > cfg.max_seq_len:
            if cfg.truncation == "error":
                issues.append(DataIssue(conv.source.file, conv.source.line, None,
                                        f"{len(ids)} tokens is over data.max_seq_len={cfg.max_seq_len} "
                                        "(or set data.truncation to truncate or drop)"))
                continue
            if cfg.truncation == "drop":
                stats["dropped_too_long"] += 1
                continue
            ids, labels = ids[: cfg.max_seq_len], labels[: cfg.max_seq_len]
            stats["truncated"] += 1
        ex = shift_labels(ids, labels)
        if ex.n_loss_tokens == 0:
            stats["dropped_no_loss_tokens"] += 1
            continue
        examples.append(ex)
    return examples, stats


def load_sft_data(cfg: DataConfig, tokenizer: Any, seed: int) -> SFTData:
    """Build train and validation rows; raises DataError listing every bad row before training starts."""
    issues: list[DataIssue] = []
    train_convs = read_conversations(_paths(cfg.train), cfg.format, issues)
    val_convs = read_conversations(_paths(cfg.validation), cfg.format, issues)
    train, stats = tokenize_all(train_convs, tokenizer, cfg, issues)
    val, _ = tokenize_all(val_convs, tokenizer, cfg, issues)
    DataError.raise_if_any(issues)
    if not train:
        raise DataError([DataIssue(str(cfg.train), None, None, "no example is left to train on "
                                   f"after truncation ({stats})")])
    if not cfg.validation and cfg.validation_split > 0 and len(train) > 1:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        n_val = max(1, round(cfg.validation_split * len(train)))
        val = [train[i] for i in sorted(order[:n_val])]
        train = [train[i] for i in sorted(order[n_val:])]

    def rows(examples: list[Example]) -> list[list[Example]]:
        return pack_examples(examples, cfg.max_seq_len) if cfg.packing else [[e] for e in examples]

    stats.update(
        train_examples=len(train), validation_examples=len(val),
        train_tokens=sum(len(e) for e in train), train_loss_tokens=sum(e.n_loss_tokens for e in train),
    )
    train_rows, val_rows = rows(train), rows(val)
    stats.update(train_rows=len(train_rows))
    return SFTData(train_rows, val_rows, stats)


def read_prompts(path: str) -> list[tuple[dict, list[Message]]]:
    """Rows to complete: `prompt` (a string or messages) or `messages`, whose trailing assistant turns (a
    reference answer) are dropped. Raises DataError listing every bad row."""
    issues: list[DataIssue] = []
    out = []
    for line, row in read_rows(path, issues):
        try:
            if not isinstance(row, dict) or not ({"prompt", "messages"} & set(row)):
                raise RowError("prompt", "each row needs a 'prompt' (string or messages) or 'messages'")
            key = "prompt" if "prompt" in row else "messages"
            value = row[key]
            msgs = [Message("user", value)] if isinstance(value, str) else parse_messages(value, key)
            while msgs and msgs[-1].role == "assistant":
                msgs.pop()
            if not msgs:
                raise RowError(key, "has nothing before the assistant turn")
            out.append((row, msgs))
        except RowError as err:
            issues.append(to_issue(err, Source(str(path), line)))
    DataError.raise_if_any(issues)
    return out


def validate_data(cfg: DataConfig, tokenizer: Any, seed: int) -> dict[str, Any]:
    """Check every row; returns stats or raises DataError with all issues (capped in the message)."""
    return load_sft_data(cfg, tokenizer, seed).stats


__all__ = ["SFTData", "load_sft_data", "validate_data", "read_conversations", "tokenize_all", "IGNORE"]
