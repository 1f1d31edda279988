"""On-policy preference pairs from a checkable task: the model's own wrong answers, rejected in favour of
the reference answer.

Pairs whose rejected side is something the model never says (a generated wrong digit, canned chatter) teach
DPO to push down text the policy does not produce, and the likelihood of everything, the chosen answer
included, tends to fall with it. Rejecting what the model actually answers puts the preference exactly
where the policy is wrong (the on-policy pairs of iterative / self-rewarding DPO and of rejection sampling).
"""
from __future__ import annotations

from typing import Any

from tunesmith.eval.generation import EvalItem, score_items


def on_policy_pairs(model: Any, tokenizer: Any, items: list[EvalItem], *, max_new_tokens: int = 64,
                    batch_size: int = 64) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(pairwise rows, the model's task metrics) from greedy answers to `items`.

    A row is made for every item the model gets wrong (task score < 1) with a non-empty answer that differs
    from the reference: `prompt` (messages), `chosen` = the reference, `rejected` = the model's answer, plus
    `task`, `answer`, `rejected_kind` ("model") and `rejected_finished` (whether the answer ended its turn
    within max_new_tokens). Items it gets right give no row."""
    result = score_items(model, tokenizer, items, max_new_tokens=max_new_tokens, batch_size=batch_size)
    rows = []
    for item, record in zip(items, result.records):
        answer = record["completion"].strip()
        if record["score"] >= 1 or not answer or answer == item.reference.strip():
            continue
        rows.append({"prompt": [{"role": m.role, "content": m.content} for m in item.prompt],
                     "chosen": item.reference, "rejected": record["completion"], "task": item.task,
                     "answer": item.reference, "rejected_kind": "model", "rejected_finished": record["finished"]})
    return rows, result.metrics
