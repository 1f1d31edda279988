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

from tunesmith._core import dist
from tunesmith._core.errors import DataError, DataIssue
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


def score_completion(item: EvalItem, completion: str) -> float | None:
    """The item's task metric when it names a known task, else exact match after stripping whitespace;
    None for a question given alone (no reference to check against)."""
    if item.reference is None:
        return None
    task = TASKS.get(item.task) if item.task is not None else None
    if task is None:
        return exact_match(item.reference, completion)
    # The reference may come from the assistant message when the row has no `answer`; tasks read `answer`.
    return task.evaluate({**item.row, "answer": item.reference}, completion)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k samples drawn without replacement from n, c of them right, is
    right: 1 - C(n - c, k) / C(n, k) (the unbiased estimator of Chen et al. 2021, "Evaluating Large
    Language Models Trained on Code"), as a running product so no binomial overflows."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 < k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):  # C(n - c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
        miss *= 1.0 - k / i
    return 1.0 - miss


def sampling_problem(samples: int, temperature: float) -> str | None:
    """What is wrong with asking for `samples` answers a prompt at `temperature`, or None."""
    if samples < 1 or (samples > 1 and temperature <= 0):
        return (f"samples must be >= 1, and several samples need temperature > 0; got samples={samples}, "
                f"temperature={temperature}")
    return None


def rendered_prompts(tokenizer: Any, items: list[PromptItem]) -> list[list[int]]:
    """Every item's prompt ids (`render_prompt`); prompts the chat template refuses are one DataError naming
    each file and line (every process renders them all, so all raise alike)."""
    prompts, issues = [], []
    for item in items:
        try:
            prompts.append(render_prompt(tokenizer, item.prompt))
        except ValueError as err:
            issues.append(DataIssue(item.source.file, item.source.line, "prompt", str(err)))
    DataError.raise_if_any(issues)
    return prompts


def score_items(model: Any, tokenizer: Any, items: list[EvalItem], *, max_new_tokens: int = 64,
                batch_size: int = 64, samples: int = 1, temperature: float = 1.0, seed: int = 0,
                shared: bool = False) -> EvalResult:
    """Generate for every item and score it: greedily, or with `samples` > 1, that many completions per
    item at `temperature` (seeded by `seed`).

    metrics: exact_match (mean score, 0..1, over every completion), stops_cleanly (fraction that ended their
    turn within max_new_tokens), n (items), mean_new_tokens (completion length without the stop token),
    seconds. With samples > 1 also `samples`, `temperature` and pass@k for k = 1, 2, 4, ... up to `samples`
    (and `samples` itself): the share of items that k samples would answer right at least once, a
    completion counting as right when it scores 1. Records: one per completion (`sample` numbers them).

    `shared` (data parallel; every process calls it): process r generates for items r, r + N, ... only,
    and every process gets every answer, so the result is the whole one in each.
    """
    if not items:
        raise ValueError("no items to evaluate")
    if (problem := sampling_problem(samples, temperature)) is not None:
        raise ValueError(problem)
    start = time.perf_counter()
    prompts = dist.share(rendered_prompts(tokenizer, items)) if shared else rendered_prompts(tokenizer, items)
    generations = generate(model, tokenizer, [p for p in prompts for _ in range(samples)],
                           stop_ids=end_of_turn_ids(tokenizer), max_new_tokens=max_new_tokens, batch_size=batch_size,
                           **({"temperature": temperature, "seed": seed} if samples > 1 else {})) if prompts else []
    if shared:  # every process's answers, in the items' order
        generations = dist.gather_shares(generations, len(items), samples)
    records = []
    for j, gen in enumerate(generations):
        item = items[j // samples]
        records.append({
            "file": item.source.file, "line": item.source.line, "task": item.task,
            "prompt": item.prompt[-1].content, "reference": item.reference, "completion": gen.text,
            "score": score_completion(item, gen.text), "finished": gen.finished,
            **({"sample": j % samples} if samples > 1 else {}),
        })
    n, m = len(items), len(records)
    scored = [r["score"] for r in records if r["score"] is not None]  # questions given alone have none
    metrics = {
        "exact_match": sum(scored) / len(scored) if scored else None,
        "stops_cleanly": sum(r["finished"] for r in records) / m,
        "n": n,
        "mean_new_tokens": sum(len(g.token_ids) for g in generations) / m,
    }
    if samples > 1:
        right = [sum(r["score"] >= 1.0 for r in records[i * samples:(i + 1) * samples])
                 for i in range(n) if items[i].reference is not None]
        ks = sorted({2 ** e for e in range(samples.bit_length()) if 2 ** e <= samples} | {samples})
        metrics.update({"samples": samples, "temperature": temperature,
                        **{f"pass@{k}": sum(pass_at_k(samples, c, k) for c in right) / max(len(right), 1)
                           for k in ks}})
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    return EvalResult(metrics, records)
