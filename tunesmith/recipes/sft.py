"""Supervised fine-tuning, top to bottom: data, model, method, fit, save, evaluate before and after."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tunesmith._core.rundir import RunDir
from tunesmith._core.seed import seed_everything
from tunesmith.config import SFTConfig, dump_config
from tunesmith.data import load_sft_data, set_chat_template
from tunesmith.eval import before_after_markdown, load_eval_items, score_items, write_eval
from tunesmith.models import apply_method, describe_trainable, load_model_and_tokenizer, save_final
from tunesmith.recipes.result import RunResult
from tunesmith.training import fit
from tunesmith.training.plots import plot_loss_curve


def _evaluate(model: Any, tokenizer: Any, cfg: SFTConfig, run: RunDir, name: str, say: Any) -> dict[str, Any]:
    cached = run.eval / f"{name}.json"
    if name == "before" and cached.exists():  # a resumed run keeps the untuned score it measured
        return json.loads(cached.read_text())
    items = load_eval_items(cfg.eval.task_file, limit=cfg.eval.limit)
    say(f"evaluating {name} training on {len(items)} held-out prompts from {cfg.eval.task_file} ...")
    result = score_items(model, tokenizer, items, max_new_tokens=cfg.eval.max_new_tokens,
                         batch_size=cfg.eval.batch_size)
    write_eval(result, run.eval, name)
    run.event("evaluation", f"{name}: exact match {result.metrics['exact_match']:.1%}", **result.metrics)
    return result.metrics


def _model_card(cfg: SFTConfig, stats: dict, before: dict | None, after: dict | None) -> str:
    lines = [f"# Fine-tuned from `{cfg.model.name}` with tunesmith", "",
             f"- recipe: sft, method: {cfg.method.kind}", f"- data: {cfg.data.train} ({stats.get('train_examples')} "
             f"examples, {stats.get('train_loss_tokens')} trained tokens)",
             f"- lr {cfg.train.lr}, schedule {cfg.train.schedule}, micro-batch {cfg.train.micro_batch_size} x "
             f"accumulation {cfg.train.grad_accum}, epochs {cfg.train.epochs}, max_steps {cfg.train.max_steps}"]
    if cfg.method.kind in ("lora", "dora", "qlora"):
        lines.append(f"- LoRA r {cfg.method.lora.r}, alpha {cfg.method.lora.alpha}, targets {cfg.method.lora.target_modules}")
    if before and after:
        lines += ["", f"## Held-out evaluation ({cfg.eval.task_file})", "", before_after_markdown(before, after)]
    return "\n".join(lines) + "\n"


def run_sft(cfg: SFTConfig, *, resume: bool = False, say: Any = print) -> RunResult:
    """Run supervised fine-tuning as configured; returns the run's location and measurements."""
    run = RunDir(Path(cfg.output_dir)).prepare(dump_config(cfg), resume)
    with run.guard(f"sft with {cfg.method.kind} on {cfg.model.name}"):
        seed_everything(cfg.seed)
        say(f"loading model '{cfg.model.name}' ...")
        model, tokenizer = load_model_and_tokenizer(cfg.model, method=cfg.method.kind, seed=cfg.seed)
        set_chat_template(tokenizer, cfg.data.chat_template)
        data = load_sft_data(cfg.data, tokenizer, cfg.seed)
        say(f"data: {data.stats['train_examples']} train / {data.stats['validation_examples']} validation examples, "
            f"{data.stats['train_loss_tokens']} trained tokens" + (f", packed into {data.stats['train_rows']} rows"
                                                                  if cfg.data.packing else ""))
        lost = {k: data.stats[k] for k in ("truncated", "dropped_too_long", "dropped_no_loss_tokens") if data.stats[k]}
        if lost:
            say(f"warning: over data.max_seq_len={cfg.data.max_seq_len}: {lost} (truncation cuts the end of an "
                "example, which is usually its answer)")
        before = None
        if cfg.eval.task_file and cfg.eval.before:
            before = _evaluate(model, tokenizer, cfg, run, "before", say)

        model = apply_method(model, cfg.method)
        say(describe_trainable(model))
        t0 = time.perf_counter()
        result = fit(model, data.train, data.validation, cfg.train, run, pad_id=tokenizer.pad_token_id,
                     seed=cfg.seed, resume=resume)
        ran = result.steps - (result.resumed_from or 0)
        say(f"trained {ran} steps" + (f" (resumed at step {result.resumed_from})" if result.resumed_from else "")
            + f" in {time.perf_counter() - t0:.0f} s"
            + (f", final loss {result.train_loss:.4f}" if result.train_loss is not None else "")
            + (f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""))

        save_final(model, tokenizer, run.final, base_model=cfg.model.name, method=cfg.method.kind,
                   base_seed=cfg.seed, card=_model_card(cfg, data.stats, None, None))
        run.event("saved", f"result saved to {run.final}")
        plot_loss_curve(run.read_metrics(), run.eval / "loss.png")

        after = None
        if cfg.eval.task_file:
            if hasattr(model, "merge_and_unload") and cfg.method.kind != "qlora":
                model = model.merge_and_unload()  # merged LoRA generates 2-3x faster; final/ is already saved
            after = _evaluate(model, tokenizer, cfg, run, "after", say)
            if before:
                (run.eval / "report.md").write_text(before_after_markdown(before, after))
                (run.final / "README.md").write_text(_model_card(cfg, data.stats, before, after))
        run.set_status("succeeded", step=result.steps, total_steps=result.steps,
                       before=before, after=after)
        run.event("finished", "run succeeded")
        return RunResult(run.root, result.steps, result.train_loss, result.val_loss, before, after, data.stats)
