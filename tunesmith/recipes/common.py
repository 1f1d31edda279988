"""What every recipe does the same way: load the starting model with its chat template, score a held-out
task by generation before and after training, save the result with its model card."""
from __future__ import annotations

import json
from typing import Any, Callable

from tunesmith._core.rundir import RunDir
from tunesmith.config import ADAPTER_METHODS, EvalConfig, ModelConfig
from tunesmith.data import set_chat_template
from tunesmith.eval import before_after_markdown, load_eval_items, score_items, write_eval
from tunesmith.models import load_model_and_tokenizer, save_final
from tunesmith.training.plots import plot_loss_curve


def load_start(model_cfg: ModelConfig, method: str, chat_template: str, seed: int, say: Any) -> tuple[Any, Any]:
    """(model, tokenizer) a recipe starts from, the tokenizer carrying the configured chat template, which
    `save_final` stores, so training, evaluation and every later use render prompts alike."""
    say(f"loading model '{model_cfg.name}' ...")
    model, tokenizer = load_model_and_tokenizer(model_cfg, method=method, seed=seed)
    set_chat_template(tokenizer, chat_template)
    return model, tokenizer


def evaluate_task(model: Any, tokenizer: Any, cfg: EvalConfig, run: RunDir, name: str, say: Any,
                  reward: Callable | None = None) -> dict[str, Any]:
    """Score `cfg.task_file` by greedy generation; writes eval/<name>.json and .jsonl. A resumed run keeps
    the `before` score it measured the first time (the untuned model is gone by then). With `reward`
    ((items, completions) -> (scores, parts)), the metrics also hold the mean `reward` of the answers."""
    cached = run.eval / f"{name}.json"
    if name == "before" and cached.exists():
        return json.loads(cached.read_text())
    items = load_eval_items(cfg.task_file, limit=cfg.limit)
    say(f"evaluating {name} training on {len(items)} held-out prompts from {cfg.task_file} ...")
    result = score_items(model, tokenizer, items, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    if reward is not None:
        scores, parts = reward(items, [r["completion"] for r in result.records])
        for record, score in zip(result.records, scores):
            record["reward"] = score
        result.metrics["reward"] = sum(scores) / len(scores)
        if len(parts) > 1:  # each source's own mean beside the weighted total
            result.metrics.update({f"reward/{k}": sum(v) / len(v) for k, v in parts.items()})
    write_eval(result, run.eval, name)
    run.event("evaluation", f"{name}: exact match {result.metrics['exact_match']:.1%}", **result.metrics)
    return result.metrics


def for_generation(model: Any, method: str) -> Any:
    """The trained model ready to generate: a LoRA/DoRA adapter merged into its base (2-3x faster; call
    only after `final/` is saved), a quantised base's adapter left unmerged."""
    if hasattr(model, "merge_and_unload") and method != "qlora":
        return model.merge_and_unload()
    return model


def data_line(train: Any, stats: dict) -> str:
    """The model card's data line: the files and their counts."""
    return f"{train} ({', '.join(f'{k} {v}' for k, v in stats.items())})"


def model_card(cfg: Any, title: str, recipe_line: str, data_line: str, before: dict | None,
               after: dict | None) -> str:
    """`final/README.md`: what was trained from what, on which data, with which settings, and the held-out
    scores when both exist. `cfg` is any recipe config with `model`, `method`, `train` and `eval`."""
    t, m = cfg.train, cfg.method
    lines = [f"# {title} `{cfg.model.name}` with tunesmith", "", f"- {recipe_line}, method: {m.kind}",
             f"- data: {data_line}",
             f"- lr {t.lr}, schedule {t.schedule}, micro-batch {t.micro_batch_size} x accumulation {t.grad_accum}, "
             f"epochs {t.epochs}, max_steps {t.max_steps}"]
    if m.kind in ADAPTER_METHODS:
        lines.append(f"- LoRA r {m.lora.r}, alpha {m.lora.alpha}, targets {m.lora.target_modules}")
    if before and after:
        lines += ["", f"## Held-out evaluation ({cfg.eval.task_file})", "", before_after_markdown(before, after)]
    return "\n".join(lines) + "\n"


def save_and_score(model: Any, tokenizer: Any, cfg: Any, run: RunDir, before: dict | None,
                   card: Callable[[dict | None, dict | None], str], say: Any,
                   reward: Callable | None = None) -> dict | None:
    """Save `final/` (with `card(None, None)` as its README), plot the loss, then score the held-out task
    on the trained model; with a `before` score, write eval/report.md and the card with both. Returns the
    `after` metrics, or None without `eval.task_file`."""
    save_final(model, tokenizer, run.final, base_model=cfg.model.name, method=cfg.method.kind,
               base_seed=cfg.seed, card=card(None, None))
    run.event("saved", f"result saved to {run.final}")
    plot_loss_curve(run.read_metrics(), run.eval / "loss.png")
    if not cfg.eval.task_file:
        return None
    after = evaluate_task(for_generation(model, cfg.method.kind), tokenizer, cfg.eval, run, "after", say, reward)
    if before:
        (run.eval / "report.md").write_text(before_after_markdown(before, after))
        (run.final / "README.md").write_text(card(before, after))
    return after
