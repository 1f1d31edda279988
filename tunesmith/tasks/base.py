"""The `Task` type: a seeded generator of checkable examples, defined once for demos, `eval` and RL rewards.

A task is data, not a class hierarchy: a name, a function that draws one (prompt, answer) pair from a
`random.Random`, and a scoring function. `make(n, seed)` turns those into chat rows that every reader in
`tunesmith.data` accepts, and `evaluate` / `reward` score a model's completion against a row's answer.
Only the standard library is used, so tasks load without torch (the server and CLI can list them).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tunesmith._core.errors import TunesmithError
from tunesmith._core.rundir import write_jsonl_atomic

Sampler = Callable[[random.Random], tuple[str, str]]  # rng -> (prompt, answer)
Scorer = Callable[[str, str], float]  # (answer, completion) -> score in [0, 1]

# How many draws `make` may spend per requested row before deciding the task cannot give that many
# distinct prompts; generous, because collisions are rare until a task's space is nearly exhausted.
_DRAWS_PER_ROW = 50


def exact_match(answer: str, completion: str) -> float:
    """1.0 when the completion equals the answer after stripping surrounding whitespace, else 0.0."""
    return float(completion.strip() == answer.strip())


@dataclass(frozen=True)
class Task:
    """A checkable task. `score` decides `evaluate`; `partial` (if given) gives RL partial credit."""

    name: str
    description: str
    sample: Sampler
    score: Scorer = exact_match
    partial: Scorer | None = None

    def make(self, n: int, seed: int) -> list[dict[str, Any]]:
        """`n` rows with distinct prompts, drawn only from `random.Random(seed)` (same seed, same rows).

        The first k rows of `make(n, seed)` do not depend on n, which `write_splits` relies on.
        """
        if n < 0:
            raise TunesmithError(f"task '{self.name}': the number of examples must be >= 0, got {n}")
        rng = random.Random(seed)
        rows: list[dict[str, Any]] = []
        seen: set[str] = set()
        for _ in range(_DRAWS_PER_ROW * n + 100):
            if len(rows) == n:
                break
            prompt, answer = self.sample(rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append(make_row(self.name, prompt, answer))
        if len(rows) < n:
            raise TunesmithError(f"task '{self.name}' could only produce {len(rows)} distinct examples, "
                                 f"{n} were asked for")
        return rows

    def evaluate(self, row: dict[str, Any], completion: str) -> float:
        """The task metric for one completion: 1.0 right, 0.0 wrong (exact match unless `score` says otherwise)."""
        return self.score(_answer(self.name, row), completion)

    def reward(self, row: dict[str, Any], completion: str) -> float:
        """The RL reward: `evaluate`, or the task's partial credit when it defines one."""
        scorer = self.partial or self.score
        return scorer(_answer(self.name, row), completion)


def make_row(task: str, prompt: str, answer: str) -> dict[str, Any]:
    """One example in the OpenAI `messages` format, plus the task name and the answer to check against."""
    return {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        "task": task,
        "answer": answer,
    }


def _answer(task: str, row: dict[str, Any]) -> str:
    if not isinstance(row.get("answer"), str):
        raise TunesmithError(f"task '{task}': the row has no string 'answer' field to check the completion against")
    return row["answer"]


def write_splits(task: Task, out_dir: str | Path, n_train: int, n_test: int, seed: int) -> tuple[Path, Path]:
    """Write `train.jsonl` and `test.jsonl`; no prompt appears in both, so the test set is truly held out.

    Both splits come from one stream of distinct prompts: the first `n_test` rows are the test set, so it
    stays the same when only `n_train` changes.
    """
    return write_split_rows(task.make(n_test + n_train, seed), out_dir, n_test)


def write_split_rows(rows: list[dict[str, Any]], out_dir: str | Path, n_test: int) -> tuple[Path, Path]:
    """The first `n_test` rows to `test.jsonl`, the rest to `train.jsonl`; returns (train_path, test_path)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test_path, train_path = out / "test.jsonl", out / "train.jsonl"
    write_jsonl_atomic(test_path, rows[:n_test])
    write_jsonl_atomic(train_path, rows[n_test:])
    return train_path, test_path

