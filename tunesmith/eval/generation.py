"""Task metrics from generation: read held-out chat rows, complete their prompts greedily, score the answers.

Rows are read like training data (any format `tunesmith.data` accepts), and prompts are rendered with the
same `render_prompt` training uses, so a tuned model is measured on exactly the prompts it learned from.
A row scores with its task's `evaluate` when it names a known task (`tunesmith.tasks`), otherwise by
exact match after stripping whitespace.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tunesmith.data.prompts import PromptItem, load_prompt_items
from tunesmith.data.render import end_of_turn_ids, render_prompt
from tunesmith.models.generate import generate
from tunesmith.tasks import TASKS, exact_match


# Evaluation reads prompts exactly as RL does: one reader, in tunesmith.data.prompts.
EvalItem = PromptItem
load_eval_items = load_prompt_items


@dataclass
class EvalResult:
    """Aggregate `metrics` and one `records` entry per item (what was asked, expected, answered, scored)."""

    metrics: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)


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
