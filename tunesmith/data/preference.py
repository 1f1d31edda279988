"""Preference data: pairs and K-way rankings, normalised into pairs of one prompt and two answers.

pairwise   {"prompt": str | [messages], "chosen": str | [assistant message], "rejected": ..., "margin"?: float}
openai     {"input": {"messages": [...]}, "preferred_output": [assistant message], "non_preferred_output": [...]}
ranking    {"prompt": ..., "responses": [best, ..., worst], "ranks"?: [1, 2, 2, 3]}  (ties share a rank)

A ranking of K responses becomes every ordered pair (better, worse) whose ranks differ; all pairs of one
row share a `group`, and training batches whole groups, keeping a prompt's comparisons together (as
InstructGPT does: the K(K-1)/2 pairs of one prompt are highly correlated; spread over batches they overfit).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Callable, TypeVar

from tunesmith._core.errors import DataError, DataIssue
from tunesmith.config import PreferenceDataConfig, as_paths
from tunesmith.data.conversation import Conversation, Message, Source
from tunesmith.data.dataset import hold_out
from tunesmith.data.formats import RowError, parse_messages, to_issue
from tunesmith.data.packing import Example, collate, collate_flat, collate_shared, shift_labels
from tunesmith.data.readers import read_rows
from tunesmith.data.render import tokenize_conversation


T = TypeVar("T")


@dataclass(frozen=True)
class PreferencePair:
    """`chosen` is preferred to `rejected` as the next assistant turn after `prompt`."""

    prompt: tuple[Message, ...]
    chosen: Message
    rejected: Message
    margin: float | None
    group: int
    source: Source


def _prompt(value: Any, field: str) -> list[Message]:
    if isinstance(value, str):
        if not value.strip():
            raise RowError(field, "is empty")
        return [Message("user", value)]
    msgs = parse_messages(value, field)
    if msgs[-1].role == "assistant":
        raise RowError(field, "must end with a user (or system) message, not the answer")
    return msgs


def _answer(value: Any, field: str) -> Message:
    if value is None:
        raise RowError(field, "is missing")
    if isinstance(value, str):
        msg = Message("assistant", value)
    else:
        msgs = parse_messages(value, field)
        if len(msgs) != 1 or msgs[0].role != "assistant":
            raise RowError(field, "must be one assistant message (a string, or a list of one message)")
        msg = Message("assistant", msgs[0].content)  # the compared answer is always scored: no weight 0
    if not msg.content.strip():
        raise RowError(field, "is empty")
    return msg


def _margin(row: dict) -> float | None:
    if row.get("margin") is None:
        return None
    if not isinstance(row["margin"], (int, float)) or isinstance(row["margin"], bool) or not math.isfinite(row["margin"]):
        raise RowError("margin", f"must be a finite number, got {row['margin']!r}")
    return float(row["margin"])


def _ranked_pairs(row: dict) -> list[tuple[Message, Message]]:
    responses = row["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise RowError("responses", "must list at least 2 responses, best first")
    answers = [_answer(r, f"responses[{i}]") for i, r in enumerate(responses)]
    ranks = row.get("ranks", list(range(1, len(answers) + 1)))
    if not isinstance(ranks, list) or len(ranks) != len(answers) or not all(
            isinstance(r, int) and not isinstance(r, bool) for r in ranks):
        raise RowError("ranks", f"must be a list of {len(answers)} integers (1 = best; ties share a rank)")
    if len(set(ranks)) == 1:
        raise RowError("ranks", "every response has the same rank, so there is nothing to prefer")
    return [(answers[i], answers[j]) if ranks[i] < ranks[j] else (answers[j], answers[i])
            for i, j in combinations(range(len(answers)), 2) if ranks[i] != ranks[j]]


def detect_preference_format(row: dict) -> str:
    """As `formats.detect_format`: the non-null fields first (a table mixing formats), then every field."""
    for fields in ({k for k, v in row.items() if v is not None}, set(row)):
        if {"preferred_output", "non_preferred_output"} & fields:
            return "openai"
        if "responses" in fields:
            return "ranking"
        if {"chosen", "rejected"} & fields:
            return "pairwise"
    raise RowError(None, f"cannot tell the format from fields {sorted(row)}: expected 'chosen'+'rejected', "
                         "'preferred_output'+'non_preferred_output' (OpenAI) or 'responses' (a ranking)")


def row_to_pairs(row: Any, group: int, source: Source) -> list[PreferencePair]:
    """Normalise one preference row; raises RowError naming the field at fault."""
    if not isinstance(row, dict):
        raise RowError(None, f"each row must be a JSON object, got {type(row).__name__}")
    fmt = detect_preference_format(row)
    if fmt == "openai":
        inp = row.get("input")
        if not isinstance(inp, dict) or "messages" not in inp:
            raise RowError("input.messages", "is missing")
        prompt = _prompt(inp["messages"], "input.messages")
        pairs = [(_answer(row.get("preferred_output"), "preferred_output"),
                  _answer(row.get("non_preferred_output"), "non_preferred_output"))]
    else:
        if row.get("prompt") is None:
            raise RowError("prompt", "is missing")
        prompt = _prompt(row["prompt"], "prompt")
        pairs = (_ranked_pairs(row) if fmt == "ranking" else
                 [(_answer(row.get("chosen"), "chosen"), _answer(row.get("rejected"), "rejected"))])
    for better, worse in pairs:
        if better.content == worse.content:
            field = "responses" if fmt == "ranking" else ("chosen" if fmt == "pairwise" else "preferred_output")
            raise RowError(field, "the preferred and the rejected answer are identical")
    margin = _margin(row)
    return [PreferencePair(tuple(prompt), c, r, margin, group, source) for c, r in pairs]


def read_grouped(paths: list[str], issues: list[DataIssue], parse: Callable[[Any, int, Source], list[T]]) -> list[T]:
    """`parse(row, group, source)` over every row of every file, numbering rows as groups; one issue per
    bad row (a RowError from `parse`), so all can be reported together."""
    out: list[T] = []
    group = 0
    for path in paths:
        n_rows, n_issues = 0, len(issues)
        for line, row in read_rows(path, issues):
            n_rows += 1
            source = Source(str(path), line)
            try:
                out += parse(row, group, source)
                group += 1
            except RowError as err:
                issues.append(to_issue(err, source))
        if n_rows == 0 and len(issues) == n_issues:
            issues.append(DataIssue(str(path), None, None, "has no rows"))
    return out


def read_preferences(paths: list[str], issues: list[DataIssue]) -> list[PreferencePair]:
    """Every pair of every file; one issue per bad row, so all can be reported together."""
    return read_grouped(paths, issues, row_to_pairs)


@dataclass(frozen=True)
class PairExample:
    """A tokenised pair: prompt + answer for each side, targets only on the answer and its end-of-turn."""

    chosen: Example
    rejected: Example
    margin: float | None
    group: int
    ref: tuple[float, float] | None = None  # reference log-probs (chosen, rejected), when precomputed


def context(prompt: tuple[Message, ...]) -> tuple[Message, ...]:
    """The prompt as untrained context: earlier assistant turns of a multi-turn prompt are conditioned on,
    never scored, so a sequence's log-probability covers the compared answer alone."""
    return tuple(Message(m.role, m.content, 0) if m.role == "assistant" else m for m in prompt)


def tokenize_pair(tokenizer: Any, pair: PreferencePair, max_seq_len: int | None) -> PairExample | None:
    """Both sides rendered through the chat template exactly as SFT renders them; None when either side is
    longer than `max_seq_len` (cutting the answer would change what is being compared). None: no limit.
    Raises RowError naming the side the chat template fails on."""
    sides = []
    for name, answer in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        try:
            ids, labels = tokenize_conversation(tokenizer, Conversation(messages=context(pair.prompt) + (answer,)))
        except ValueError as err:
            raise RowError(name, str(err)) from None
        if max_seq_len is not None and len(ids) > max_seq_len:
            return None
        sides.append(shift_labels(ids, labels))
    return PairExample(sides[0], sides[1], pair.margin, pair.group)


@dataclass
class PreferenceData:
    """Training-ready preference data: rows are groups, all pairs of one prompt."""

    train: list[list[PairExample]]
    validation: list[list[PairExample]]
    stats: dict[str, Any]


def _groups(examples: list[PairExample]) -> list[list[PairExample]]:
    groups: dict[int, list[PairExample]] = {}
    for ex in examples:
        groups.setdefault(ex.group, []).append(ex)
    return [groups[g] for g in sorted(groups)]


def load_preference_data(cfg: PreferenceDataConfig, tokenizer: Any, seed: int) -> PreferenceData:
    """Read, check and tokenise; raises DataError listing every bad row before anything trains."""
    issues: list[DataIssue] = []
    paths, val_paths = as_paths(cfg.train), as_paths(cfg.validation)
    train_pairs = read_preferences(paths, issues)
    val_pairs = read_preferences(val_paths, issues)
    DataError.raise_if_any(issues)
    stats = {"dropped_too_long": 0}

    def tokenize(pairs: list[PreferencePair]) -> list[PairExample]:
        out = []
        for pair in pairs:
            try:
                ex = tokenize_pair(tokenizer, pair, cfg.max_seq_len)
            except RowError as err:
                issues.append(to_issue(err, pair.source))
                continue
            if ex is None:
                stats["dropped_too_long"] += 1
            else:
                out.append(ex)
        return out

    train, val = _groups(tokenize(train_pairs)), _groups(tokenize(val_pairs))
    DataError.raise_if_any(issues)  # every row the chat template fails on, before anything trains
    if not train:
        raise DataError([DataIssue(str(cfg.train), None, None, "no pair is left to train on "
                                   f"(dropped {stats['dropped_too_long']} over data.max_seq_len)")])
    if not val_paths:
        train, val = hold_out(train, cfg.validation_split, seed)
    stats.update(train_prompts=len(train), train_pairs=sum(map(len, train)),
                 validation_prompts=len(val), validation_pairs=sum(map(len, val)))
    return PreferenceData(train, val, stats)


def distinct_sides(groups: list[list[PairExample]]) -> tuple[list[list[Example]], list[int]]:
    """Each group's distinct sequences (in the order its sides first come) and, for every side of the
    batch (chosen sides of all pairs, then rejected sides), the number of its sequence among all groups'
    in order. A K-way ranking's K(K-1)/2 pairs have only K distinct sides: each is scored once."""
    sets: list[list[Example]] = []
    chosen: list[int] = []
    rejected: list[int] = []
    first = 0  # the number of the group's first sequence
    for group in groups:
        seen: dict[Example, int] = {}  # equal token ids and targets: one sequence
        for p in group:
            chosen.append(first + seen.setdefault(p.chosen, len(seen)))
            rejected.append(first + seen.setdefault(p.rejected, len(seen)))
        sets.append(list(seen))
        first += len(seen)
    return sets, chosen + rejected


def collate_pairs(groups: list[list[PairExample]], pad_id: int, flat: bool = False, shared: bool = False) -> dict:
    """One batch of the groups' distinct sequences (one forward for both sides of every pair): padded rows,
    or with `flat` one padding-free row (`collate_flat`), or with `shared` as well one row in which the
    sequences of a group share their common prefix (`collate_shared`). `sides` (2P,) maps every side,
    chosen sides of all pairs then rejected sides, to its sequence (`by_side`); `n_loss_tokens` counts
    pairs, the unit preference losses are averaged over; `ref_logps` holds the precomputed reference
    log-probs in side order, when every pair carries them."""
    import torch

    pairs = [p for g in groups for p in g]
    sets, sides = distinct_sides(groups)
    if flat and shared:
        batch = collate_shared(sets)
    else:
        batch = (collate_flat if flat else collate)([[ex] for seqs in sets for ex in seqs], pad_id)
    batch["sides"] = torch.tensor(sides)
    batch["n_loss_tokens"] = len(pairs)
    batch["margin"] = torch.tensor([p.margin or 0.0 for p in pairs])
    if all(p.ref is not None for p in pairs):  # (2P,): chosen sides then rejected, like `sides`
        batch["ref_logps"] = torch.tensor([p.ref[0] for p in pairs] + [p.ref[1] for p in pairs], dtype=torch.float32)
    return batch


def by_side(values: Any, batch: dict) -> Any:
    """Per-sequence values (scores, log-probs) of a `collate_pairs` batch as (2P,) per side: the chosen
    sides of all pairs, then the rejected sides."""
    if "sides" not in batch:
        return values
    return values.index_select(0, batch["sides"].to(values.device))


def chosen_rejected(values: Any, batch: dict) -> tuple[Any, Any]:
    """Per-sequence values of a `collate_pairs` batch as (chosen, rejected), each (P,) in pair order."""
    return tuple(by_side(values, batch).chunk(2))
