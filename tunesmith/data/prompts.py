"""Prompt rows: questions to complete, with the answer to check against, read by evaluation and RL alike.

Rows are read like training data (any format `tunesmith.data` accepts): the prompt is everything before
the last assistant message, and the reference answer is that message unless the row has an `answer`.
Where no answer is needed (RL prompts, judged pairs), a row may be the question alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith._core.errors import DataError, DataIssue, TunesmithError
from tunesmith.data.conversation import Message, Source
from tunesmith.data.formats import RowError, to_conversation, to_issue
from tunesmith.data.readers import read_rows


@dataclass
class PromptItem:
    """One question: the chat so far, the answer to check against (its task, when it names one), the raw
    row and where it came from."""

    prompt: list[Message]
    reference: str | None  # None: the row gives no answer (allowed where none is needed)
    task: str | None
    row: dict[str, Any]
    source: Source


def load_prompt_items(path: str | Path, limit: int | None = None,
                      answers: bool = True) -> list[PromptItem]:
    """Read `path` into prompt items (for evaluation and RL rollouts); raises DataError naming file, line
    and field of every bad row.

    The prompt is everything before the last assistant message; the reference is that message, unless
    the row has an `answer` field (task files do), which then wins. A row may also leave the assistant
    turn out entirely when it has an `answer`, or, unless `answers` (a reference is needed), when it has
    none: a `messages` list or a `prompt` alone is then the question, with reference None.
    """
    if limit is not None and limit < 1:
        raise TunesmithError(f"limit must be >= 1 or None, got {limit}")
    issues: list[DataIssue] = []
    items: list[PromptItem] = []
    n_rows = 0
    for line, row in read_rows(path, issues):
        if limit is not None and len(items) >= limit:
            break
        n_rows += 1
        source = Source(str(path), line)
        try:
            items.append(_to_item(row, source, answers))
        except RowError as err:
            issues.append(to_issue(err, source))
    if n_rows == 0 and not issues:
        issues.append(DataIssue(str(path), None, None, "has no rows"))
    if issues:
        DataError.raise_if_any(issues)
    return items


def _to_item(row: Any, source: Source, answers: bool = True) -> PromptItem:
    answer = row.get("answer") if isinstance(row, dict) else None
    if answer is not None and not isinstance(answer, str):
        raise RowError("answer", f"must be a string, got {type(answer).__name__}")
    task = row.get("task") if isinstance(row, dict) else None
    if task is not None and not isinstance(task, str):
        raise RowError("task", f"must be a string, got {type(task).__name__}")
    # the question alone, where no answer is needed: an empty stand-in plays the assistant turn
    read = _with_answer_turn(row, answer if answer is not None or answers else "")
    conv = to_conversation(read, "auto", source)
    if conv.is_text:
        raise RowError("text", "raw text has no question to answer; evaluation needs chat rows")
    last = max(i for i, m in enumerate(conv.messages) if m.role == "assistant")
    if last == 0:
        raise RowError(None, "nothing comes before the last assistant message, so there is no prompt")
    if answer is not None:
        reference: str | None = answer
    else:  # the assistant message, unless it is the stand-in for a question given alone
        reference = conv.messages[last].content if read is row else None
    return PromptItem(list(conv.messages[:last]), reference, task, row, source)


def _with_answer_turn(row: Any, answer: str | None) -> Any:
    """A row that gives only the question plus `answer` gets the answer as its assistant turn.

    The readers require an assistant turn; here the answer plays that part, so the whole row is the prompt.
    """
    if answer is None or not isinstance(row, dict):
        return row
    messages = row.get("messages")
    if isinstance(messages, list) and not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        return {**row, "messages": [*messages, {"role": "assistant", "content": answer}]}
    if "prompt" in row and "completion" not in row:
        return {**row, "completion": answer}
    return row


def load_prompts(cfg: Any, tokenizer: Any) -> tuple[list[PromptItem], dict[str, int]]:
    """Every prompt of `cfg.train` (a `PromptDataConfig`) whose rendered prompt fits `cfg.max_prompt_len`;
    returns (items, stats). Every bad row of every file is reported together, before anything runs."""
    from tunesmith.data.render import render_prompt

    issues: list[DataIssue] = []
    items: list[PromptItem] = []
    for path in ([cfg.train] if isinstance(cfg.train, str) else list(cfg.train)):
        try:
            items += load_prompt_items(path, answers=False)  # a reward that needs answers checks them
        except DataError as err:
            issues += err.issues
    DataError.raise_if_any(issues)
    kept = []
    for item in items:
        try:
            if len(render_prompt(tokenizer, item.prompt)) <= cfg.max_prompt_len:
                kept.append(item)
        except ValueError as err:  # the chat template refused it
            issues.append(DataIssue(item.source.file, item.source.line, "prompt", str(err)))
    DataError.raise_if_any(issues)
    if not kept:
        raise DataError([DataIssue(str(cfg.train), None, None,
                                   f"no prompt fits data.max_prompt_len={cfg.max_prompt_len} tokens")])
    return kept, {"prompts": len(kept), "dropped_too_long": len(items) - len(kept)}
