"""On-policy preference pairs: from a checkable task, the model's own wrong answers rejected in favour of
the reference answer (`on_policy_pairs`); or, from any scorer, the model's best answer of several chosen
over its worst (`scored_pairs`: with a judge, AI feedback as RLAIF builds it).

Pairs whose rejected side is something the model never says (a generated wrong digit, canned chatter) teach
DPO to push down text the policy does not produce, and the likelihood of everything, the chosen answer
included, tends to fall with it. Rejecting what the model actually answers puts the preference exactly
where the policy is wrong (the on-policy pairs of iterative / self-rewarding DPO and of rejection sampling).
"""
from __future__ import annotations

from typing import Any

from tunesmith.data.conversation import as_chat
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
        rows.append({"prompt": as_chat(item.prompt),
                     "chosen": item.reference, "rejected": record["completion"], "task": item.task,
                     "answer": item.reference, "rejected_kind": "model", "rejected_finished": record["finished"]})
    return rows, result.metrics


def scored_pairs(model: Any, tokenizer: Any, items: list[EvalItem], reward: Any, *, samples: int = 4,
                 temperature: float = 1.0, seed: int = 0, min_gap: float = 0.0, max_new_tokens: int = 64,
                 batch_size: int = 64) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(pairwise rows, stats) from `samples` sampled answers to each item, scored by `reward` (a
    `rl.CombinedReward`: a judge, a reward model, a task or a function, weighted).

    For each item the best-scored answer that ended its turn is chosen over the worst-scored answer when
    their scores differ by more than `min_gap` and their texts differ (a chosen answer that never stopped
    would teach the model not to stop). A row holds `prompt` (messages), `chosen`, `rejected`,
    `chosen_score`, `rejected_score`, `task`, `answer`, `rejected_kind` ("model") and `rejected_finished`.
    Stats: `prompts`, `pairs`, `mean_score` over every answer, `mean_gap` over the rows."""
    result = score_items(model, tokenizer, items, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         samples=samples, temperature=temperature, seed=seed)
    records = result.records
    scores, _ = reward([item for item in items for _ in range(samples)], [r["completion"] for r in records])
    rows = []
    for i, item in enumerate(items):
        answers = [(scores[i * samples + k], records[i * samples + k]) for k in range(samples)]
        finished = [a for a in answers if a[1]["finished"]]
        if not finished:
            continue
        best = max(finished, key=lambda a: a[0])  # the first of equals: sampling order
        worst = min(answers, key=lambda a: a[0])
        if best[0] - worst[0] <= min_gap or best[1]["completion"].strip() == worst[1]["completion"].strip():
            continue
        rows.append({"prompt": as_chat(item.prompt),
                     "chosen": best[1]["completion"], "rejected": worst[1]["completion"],
                     "chosen_score": best[0], "rejected_score": worst[0], "task": item.task,
                     "answer": item.reference, "rejected_kind": "model", "rejected_finished": worst[1]["finished"]})
        if item.reference is None:  # a question alone: no answer to record
            del rows[-1]["answer"]
    stats = {"prompts": len(items), "pairs": len(rows), "mean_score": sum(scores) / max(len(scores), 1),
             "mean_gap": sum(r["chosen_score"] - r["rejected_score"] for r in rows) / max(len(rows), 1)}
    return rows, stats
