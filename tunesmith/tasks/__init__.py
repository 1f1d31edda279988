"""Checkable tasks shared by the demos, `tunesmith eval` and verifiable RL rewards (standard library only)."""
from __future__ import annotations

from pathlib import Path

from tunesmith._core.errors import TunesmithError
from tunesmith.tasks import addition, arithmetic, dates, json_fields, prose, topics
from tunesmith.tasks.base import Task, exact_match, make_row, write_splits

TASKS: dict[str, Task] = {t.name: t for t in (dates.TASK, dates.US_TASK, json_fields.TASK, addition.TASK,
                                              arithmetic.TASK)}
# Classification tasks write {"text", "label"} rows for `recipe: classify`, not chat rows.
CLASSIFICATION_TASKS = {"topics": topics.write_files}
# Text corpora write {"text"} rows: held-out general text for perplexity.
TEXT_CORPORA = {"prose": prose.write_files}


def get_task(name: str) -> Task:
    """The registered task called `name`; a TunesmithError lists the known names otherwise."""
    if name not in TASKS:
        raise TunesmithError(f"unknown task '{name}'; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def write_task_files(name: str, out_dir: str | Path, n_train: int, n_test: int, seed: int,
                     preferences: bool = False, judge: bool = False) -> tuple[Path, Path]:
    """Write `train.jsonl` and `test.jsonl` for task `name` into `out_dir`; returns (train_path, test_path).

    With `preferences`, rows are pairs: the right terse answer chosen over a wrong or rambling one. With
    `judge`, rows teach a judge to rate answers (`tasks.judge`): two per prompt. A classification task
    (`topics`) writes labelled texts."""
    if preferences and judge:
        raise TunesmithError("--preferences and --judge write different rows: choose one")
    if name not in {**TASKS, **CLASSIFICATION_TASKS, **TEXT_CORPORA}:
        raise TunesmithError(f"unknown task '{name}'; known tasks: {', '.join(sorted(TASKS))} (chat rows), "
                             f"{', '.join(sorted(CLASSIFICATION_TASKS))} (labelled texts), "
                             f"{', '.join(sorted(TEXT_CORPORA))} (plain text)")
    if name in CLASSIFICATION_TASKS or name in TEXT_CORPORA:
        if preferences or judge:
            raise TunesmithError(f"task '{name}' has no answers to prefer or judge")
        return {**CLASSIFICATION_TASKS, **TEXT_CORPORA}[name](out_dir, n_train, n_test, seed)
    if judge:
        from tunesmith.tasks.judge import write_judge_files

        return write_judge_files(get_task(name), out_dir, n_train, n_test, seed)
    if preferences:
        from tunesmith.tasks.preferences import write_preference_files

        return write_preference_files(get_task(name), out_dir, n_train, n_test, seed)
    return write_splits(get_task(name), out_dir, n_train, n_test, seed)


__all__ = ["TASKS", "Task", "exact_match", "get_task", "make_row", "write_task_files"]
