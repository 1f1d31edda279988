"""What every recipe does the same way: load the starting model with its chat template, and score a
held-out task by generation before and after training."""
from __future__ import annotations

import json
from typing import Any

from tunesmith._core.rundir import RunDir
from tunesmith.config import EvalConfig, ModelConfig
from tunesmith.data import set_chat_template
from tunesmith.eval import load_eval_items, score_items, write_eval
from tunesmith.models import load_model_and_tokenizer


def load_start(model_cfg: ModelConfig, method: str, chat_template: str, seed: int, say: Any) -> tuple[Any, Any]:
    """(model, tokenizer) a recipe starts from, the tokenizer carrying the configured chat template, which
    `save_final` stores, so training, evaluation and every later use render prompts alike."""
    say(f"loading model '{model_cfg.name}' ...")
    model, tokenizer = load_model_and_tokenizer(model_cfg, method=method, seed=seed)
    set_chat_template(tokenizer, chat_template)
    return model, tokenizer


def evaluate_task(model: Any, tokenizer: Any, cfg: EvalConfig, run: RunDir, name: str, say: Any) -> dict[str, Any]:
    """Score `cfg.task_file` by greedy generation; writes eval/<name>.json and .jsonl. A resumed run keeps
    the `before` score it measured the first time (the untuned model is gone by then)."""
    cached = run.eval / f"{name}.json"
    if name == "before" and cached.exists():
        return json.loads(cached.read_text())
    items = load_eval_items(cfg.task_file, limit=cfg.limit)
    say(f"evaluating {name} training on {len(items)} held-out prompts from {cfg.task_file} ...")
    result = score_items(model, tokenizer, items, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    write_eval(result, run.eval, name)
    run.event("evaluation", f"{name}: exact match {result.metrics['exact_match']:.1%}", **result.metrics)
    return result.metrics


def for_generation(model: Any, method: str) -> Any:
    """The trained model ready to generate: a LoRA/DoRA adapter merged into its base (2-3x faster; call
    only after `final/` is saved), a quantised base's adapter left unmerged."""
    if hasattr(model, "merge_and_unload") and method != "qlora":
        return model.merge_and_unload()
    return model
