"""Preference pairs from a task: the correct, terse answer is preferred to a wrong or rambling one.

Half the rejected answers are wrong (one digit changed, so they look right), half are right but wrapped
in chatter, so a reward model must learn both "correct" and "concise", and the preference is checkable.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from tunesmith.tasks.base import Task, write_split_rows

_CHATTER = ("Sure! Here is the answer you asked for: {a}. Let me know if there is anything else I can do!",
            "Great question. After thinking about it carefully, I believe the answer is {a}, I hope this helps.",
            "{a} (this is my best attempt; please double-check it before relying on it)")


def _wrong(answer: str, rng: random.Random) -> str:
    digits = [i for i, ch in enumerate(answer) if ch.isdigit()]
    if not digits:
        return answer[::-1] if answer[::-1] != answer else answer + "?"
    i = rng.choice(digits)
    new = rng.choice([d for d in "0123456789" if d != answer[i]])
    return answer[:i] + new + answer[i + 1:]


def preference_row(row: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """A pairwise row (prompt messages, chosen, rejected) from one task row."""
    answer = row["answer"]
    kind = rng.choice(("wrong", "chatter"))
    rejected = _wrong(answer, rng) if kind == "wrong" else rng.choice(_CHATTER).format(a=answer)
    return {"prompt": row["messages"][:-1], "chosen": answer, "rejected": rejected, "task": row["task"],
            "answer": answer, "rejected_kind": kind}


def write_preference_files(task: Task, out_dir: str | Path, n_train: int, n_test: int,
                           seed: int) -> tuple[Path, Path]:
    """`train.jsonl` and `test.jsonl` of preference pairs, prompts disjoint between the splits."""
    rows = task.make(n_test + n_train, seed)
    rng = random.Random(seed + 1)
    return write_split_rows([preference_row(r, rng) for r in rows], out_dir, n_test)
