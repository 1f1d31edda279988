"""A judge's question and answer, shared by the `judge` reward source (`rl.rewards.judge_reward`) and the
judge-training rows a task writes (`write_judge_files`): a model trained on these rows is asked exactly
what it answers when it judges.

A judge row asks the default rubric about one answer to a task prompt and answers "Rating: N": 9 for the
right, terse answer, 5 for the right answer wrapped in chatter, 1 for a wrong one (one digit changed, so
it looks right). The rating is checkable, so a judge's training is measured like any task.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterable

from tunesmith.tasks.base import Task, write_split_rows

DEFAULT_RUBRIC = """Rate the assistant's response to the conversation below for helpfulness and correctness, \
from 1 (useless or wrong) to 9 (fully correct and helpful).

Conversation:
{prompt}

Response:
{response}

Answer with a single digit from 1 to 9."""
JUDGE_ANSWER = "Rating:"  # the start of the judge's turn: its next token is the rating
RATINGS = range(1, 10)
RATING_OF = {"right": 9, "chatter": 5, "wrong": 1}


def judge_question(rubric: str, messages: Iterable[tuple[str, str]], response: str, reference: str = "") -> str:
    """`rubric` with its fields filled: {prompt} the conversation (a `role: content` line per message),
    {response} and {reference}."""
    chat = "\n".join(f"{role}: {content}" for role, content in messages)
    return rubric.format(prompt=chat, response=response, reference=reference)


def judge_rows(row: dict[str, Any], rng: random.Random) -> list[dict[str, Any]]:
    """Two judge rows from one task row: its right answer rated 9, and a wrong (1) or chatty (5) one."""
    from tunesmith.tasks.preferences import preference_row

    pair = preference_row(row, rng)
    asked = [(m["role"], m["content"]) for m in pair["prompt"]]
    out = []
    for response, kind in ((pair["chosen"], "right"), (pair["rejected"], pair["rejected_kind"])):
        rating = f"{JUDGE_ANSWER} {RATING_OF[kind]}"
        out.append({"messages": [{"role": "user", "content": judge_question(DEFAULT_RUBRIC, asked, response)},
                                 {"role": "assistant", "content": rating}],
                    "answer": rating, "task": "judge", "judged_kind": kind})
    return out


def write_judge_files(task: Task, out_dir: str | Path, n_train: int, n_test: int, seed: int) -> tuple[Path, Path]:
    """`train.jsonl` and `test.jsonl` of judge rows, two per task prompt, prompts disjoint between splits."""
    rows = task.make(n_test + n_train, seed)
    rng = random.Random(seed + 2)
    judged = [judge_rows(r, rng) for r in rows]
    return write_split_rows([j for pair in judged for j in pair], out_dir, 2 * n_test)
