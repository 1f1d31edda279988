"""Unpaired preference data for KTO: single answers labelled desirable or undesirable.

unpaired   {"prompt": str | [messages], "completion": str | [assistant message], "label": true | false}

Paired rows (pairwise, OpenAI, rankings; see `tunesmith.data.preference`) are accepted too and unpaired:
the preferred answer is desirable and the rejected one undesirable; in a ranking the best-ranked answers
are desirable, the worst-ranked undesirable and the middle is left out.

KTO's reference point is KL(policy || reference) estimated on mismatched prompt/answer pairs. Each example
gets its mismatched partner here, once, from a seeded shuffle (the prompt of example i with the answer of
the next example in that order), so the pairing is fixed, reproducible across a resume, and the
reference log-probs of both can be precomputed. (A split of one example is its own partner.)
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from tunesmith._core.errors import DataError, DataIssue
from tunesmith.config import PreferenceDataConfig, as_paths
from tunesmith.data.conversation import Conversation, Message, Source
from tunesmith.data.formats import RowError
from tunesmith.data.packing import Example, collate, collate_flat, shift_labels
from tunesmith.data.preference import _answer, _prompt, context, read_grouped, row_to_pairs
from tunesmith.data.render import IGNORE, render_prompt, tokenize_conversation


@dataclass(frozen=True)
class LabelledAnswer:
    """`answer` to `prompt` is desirable (True) or undesirable (False)."""

    prompt: tuple[Message, ...]
    answer: Message
    desirable: bool
    group: int
    source: Source
    field: str = "completion"  # the row's field the answer came from, for error messages


def row_to_labelled(row: Any, group: int, source: Source) -> list[LabelledAnswer]:
    """One row as labelled answers; raises RowError naming the field at fault."""
    if isinstance(row, dict) and ("label" in row or "completion" in row):
        if row.get("prompt") is None:
            raise RowError("prompt", "is missing")
        prompt = _prompt(row["prompt"], "prompt")
        answer = _answer(row.get("completion"), "completion")
        if "label" not in row:
            raise RowError("label", "is missing (true for a desirable answer, false for an undesirable one)")
        if not isinstance(row["label"], bool):
            raise RowError("label", f"must be true or false, got {row['label']!r}")
        return [LabelledAnswer(tuple(prompt), answer, row["label"], group, source)]
    pairs = row_to_pairs(row, group, source)
    better = {p.chosen for p in pairs} - {p.rejected for p in pairs}  # never rejected: top rank
    worse = {p.rejected for p in pairs} - {p.chosen for p in pairs}  # never chosen: bottom rank
    seen: list[Message] = []
    out = []
    for p in pairs:
        for answer, good in ((p.chosen, True), (p.rejected, False)):
            if answer in seen or answer not in (better if good else worse):
                continue
            seen.append(answer)
            out.append(LabelledAnswer(p.prompt, answer, good, group, source, "chosen" if good else "rejected"))
    return out


def read_labelled(paths: list[str], issues: list[DataIssue]) -> list[LabelledAnswer]:
    """Every labelled answer of every file; one issue per bad row."""
    return read_grouped(paths, issues, row_to_labelled)


@dataclass(frozen=True)
class UnpairedExample:
    """A tokenised labelled answer and its mismatched partner (own prompt, another example's answer)."""

    example: Example
    mismatched: Example
    desirable: bool
    group: int
    ref: tuple[float, float] | None = None  # reference log-probs (example, mismatched), when precomputed


def _tokenize(tokenizer: Any, item: LabelledAnswer) -> tuple[list[int], list[int], int]:
    """(ids, labels, prompt length): the answer starts at the prompt length, as `tokenize_conversation`
    has checked (the prompt inference renders is a prefix of the training ids)."""
    prompt = context(item.prompt)
    try:
        ids, labels = tokenize_conversation(tokenizer, Conversation(messages=prompt + (item.answer,)))
    except ValueError as err:
        raise RowError(item.field, str(err)) from None
    return ids, labels, len(render_prompt(tokenizer, prompt))


def tokenize_unpaired(tokenizer: Any, items: list[LabelledAnswer], max_seq_len: int | None, seed: int,
                      stats: dict[str, int], issues: list[DataIssue] | None = None) -> list[UnpairedExample]:
    """Examples over `max_seq_len` are dropped (counted in stats["dropped_too_long"]); a mismatched
    partner over it is cut at the limit (it only feeds the KL estimate). Rows the chat template fails on
    go to `issues` (without it, they are raised as one DataError)."""
    failed: list[DataIssue] = [] if issues is None else issues
    tokenized = []
    for item in items:
        try:
            ids, labels, n_prompt = _tokenize(tokenizer, item)
        except RowError as err:
            failed.append(DataIssue(item.source.file, item.source.line, err.field, err.message))
            continue
        if max_seq_len is not None and len(ids) > max_seq_len:
            stats["dropped_too_long"] = stats.get("dropped_too_long", 0) + 1
            continue
        tokenized.append((item, ids, labels, n_prompt))
    order = list(range(len(tokenized)))
    random.Random(seed).shuffle(order)
    partner = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))}
    out = []
    for i, (item, ids, labels, n_prompt) in enumerate(tokenized):
        _, other_ids, other_labels, other_prompt = tokenized[partner[i]]
        kl_ids = ids[:n_prompt] + other_ids[other_prompt:]
        kl_labels = [IGNORE] * n_prompt + other_labels[other_prompt:]
        if max_seq_len is not None:
            kl_ids, kl_labels = kl_ids[:max_seq_len], kl_labels[:max_seq_len]
        out.append(UnpairedExample(shift_labels(ids, labels), shift_labels(kl_ids, kl_labels), item.desirable,
                                   item.group))
    if issues is None:
        DataError.raise_if_any(failed)
    return out


@dataclass
class UnpairedData:
    """Training-ready KTO data: every row is one example."""

    train: list[list[UnpairedExample]]
    validation: list[list[UnpairedExample]]
    stats: dict[str, Any]


def load_unpaired_data(cfg: PreferenceDataConfig, tokenizer: Any, seed: int) -> UnpairedData:
    """Read, check and tokenise; raises DataError listing every bad row before anything trains.
    A validation split holds out whole prompts (both answers of a pair stay on one side)."""
    issues: list[DataIssue] = []
    paths, val_paths = as_paths(cfg.train), as_paths(cfg.validation)
    train_items = read_labelled(paths, issues)
    val_items = read_labelled(val_paths, issues)
    DataError.raise_if_any(issues)
    if not val_paths and cfg.validation_split > 0:
        groups = sorted({it.group for it in train_items})
        if len(groups) > 1:
            random.Random(seed).shuffle(groups)
            held = set(groups[:max(1, round(cfg.validation_split * len(groups)))])
            val_items = [it for it in train_items if it.group in held]
            train_items = [it for it in train_items if it.group not in held]
    stats: dict[str, Any] = {"dropped_too_long": 0}
    train = tokenize_unpaired(tokenizer, train_items, cfg.max_seq_len, seed, stats, issues)
    val = tokenize_unpaired(tokenizer, val_items, cfg.max_seq_len, seed + 1, stats, issues)
    DataError.raise_if_any(issues)  # every row the chat template fails on, before anything trains
    if not train:
        raise DataError([DataIssue(str(cfg.train), None, None, "no example is left to train on "
                                   f"(dropped {stats['dropped_too_long']} over data.max_seq_len)")])
    n_good = sum(e.desirable for e in train)
    stats.update(train_examples=len(train), train_desirable=n_good, train_undesirable=len(train) - n_good,
                 validation_examples=len(val))
    return UnpairedData([[e] for e in train], [[e] for e in val], stats)


def collate_unpaired(rows: list[list[UnpairedExample]], pad_id: int, flat: bool = False) -> dict:
    """One batch of every example followed by every mismatched partner, padded or (`flat`) padding-free;
    `desirable` (E,) bool; `n_loss_tokens` counts examples; `ref_logps` (2E,) in row order when every
    example carries them."""
    import torch

    items = [e for row in rows for e in row]
    batch = (collate_flat if flat else collate)([[e.example] for e in items] + [[e.mismatched] for e in items],
                                                pad_id)
    batch["n_loss_tokens"] = len(items)
    batch["desirable"] = torch.tensor([e.desirable for e in items])
    if all(e.ref is not None for e in items):
        batch["ref_logps"] = torch.tensor([e.ref[0] for e in items] + [e.ref[1] for e in items], dtype=torch.float32)
    return batch
