"""Task metrics from generation: read held-out chat rows, complete their prompts greedily, score the answers.

Rows are read like training data (any format `tunesmith.data` accepts), and prompts are rendered with the
same `render_prompt` training uses, so a tuned model is measured on exactly the prompts it learned from.
A row scores with its task's `evaluate` when it names a known task (`tunesmith.tasks`), otherwise by
exact match after stripping whitespace.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith._core.errors import DataError, DataIssue
from tunesmith.data.conversation import Message, Source
from tunesmith.data.formats import RowError, to_conversation, to_issue
from tunesmith.data.readers import read_rows
from tunesmith.data.render import end_of_turn_ids, render_prompt
from tunesmith.models.generate import generate
from tunesmith.tasks import TASKS, exact_match


@dataclass
class EvalItem:
    """One question: the chat so far, the answer to check against, and where the row came from."""

    prompt: list[Message]
    reference: str
    task: str | None
    row: dict[str, Any]
    source: Source


@dataclass
class EvalResult:
    """Aggregate `metrics` and one `records` entry per item (what was asked, expected, answered, scored)."""

    metrics: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)


def load_eval_items(path: str | Path, limit: int | None = None) -> list[EvalItem]:
    """Read `path` into eval items; raises DataError naming file, line and field of every bad row.

    The prompt is everything before the last assistant message; the reference is that message, unless
    the row has an `answer` field (task files do), which then wins. A row may also leave the assistant
    turn out entirely when it has an `answer`.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    issues: list[DataIssue] = []
    items: list[EvalItem] = []
    n_rows = 0
    for line, row in read_rows(path, issues):
        if limit is not None and len(items) >= limit:
            break
        n_rows += 1
        source = Source(str(path), line)
        try:
            items.append(_to_item(row, source))
        except RowError as err:
            issues.append(to_issue(err, source))
    if n_rows == 0 and not issues:
        issues.append(DataIssue(str(path), None, None, "has no rows"))
    if issues:
        DataError.raise_if_any(issues)
    return items


def _to_item(row: Any, source: Source) -> EvalItem:
    answer = row.get("answer") if isinstance(row, dict) else None
    if answer is not None and not isinstance(answer, str):
        raise RowError("answer", f"must be a string, got {type(answer).__name__}")
    task = row.get("task") if isinstance(row, dict) else None
    if task is not None and not isinstance(task, str):
        raise RowError("task", f"must be a string, got {type(task).__name__}")
    conv = to_conversation(_with_answer_turn(row, answer), "auto", source)
    if conv.is_text:
        raise RowError("text", "raw text has no question to answer; evaluation needs chat rows")
    last = max(i for i, m in enumerate(conv.messages) if m.role == "assistant")
    if last == 0:
        raise RowError(None, "nothing comes before the last assistant message, so there is no prompt")
    reference = answer if answer is not None else conv.messages[last].content
    return EvalItem(list(conv.messages[:last]), reference, task, row, source)


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


def score_completion(item: EvalItem, completion: str) -> float:
    """The item's task metric when it names a known task, else exact match after stripping whitespace."""
    task = TASKS.get(item.task) if item.task is not None else None
    if task is None:
        return exact_match(item.reference, completion)
    # The reference may come from the assistant message when the row has no `answer`; tasks read `answer`.
    return task.evaluate({**item.row, "answer": item.reference}, completion)


def score_items(model: Any, tokenizer: Any, items: list[EvalItem], *, max_new_tokens: int = 64,
                batch_size: int = 64) -> EvalResult:
    """Generate greedily for every item and score it.

    metrics: exact_match (mean score, 0..1), stops_cleanly (fraction that ended their turn within
    max_new_tokens), n, mean_new_tokens (completion length without the stop token), seconds.
    """
    if not items:
        raise ValueError("no items to evaluate")
    start = time.perf_counter()
    prompts = [render_prompt(tokenizer, item.prompt) for item in items]
    generations = generate(model, tokenizer, prompts, stop_ids=end_of_turn_ids(tokenizer),
                           max_new_tokens=max_new_tokens, batch_size=batch_size)
    records = []
    for item, gen in zip(items, generations):
        records.append({
            "file": item.source.file, "line": item.source.line, "task": item.task,
            "prompt": item.prompt[-1].content, "reference": item.reference, "completion": gen.text,
            "score": score_completion(item, gen.text), "finished": gen.finished,
        })
    n = len(records)
    metrics = {
        "exact_match": sum(r["score"] for r in records) / n,
        "stops_cleanly": sum(r["finished"] for r in records) / n,
        "n": n,
        "mean_new_tokens": sum(len(g.token_ids) for g in generations) / n,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return EvalResult(metrics, records)
