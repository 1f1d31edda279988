"""Supervised fine-tuning, top to bottom: data, model, method, fit, save, evaluate before and after."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tunesmith._core.rundir import RunDir
from tunesmith._core.seed import seed_everything
from tunesmith.config import SFTConfig, dump_config
from tunesmith.data import load_sft_data
from tunesmith.eval import before_after_markdown
from tunesmith.models import apply_method, describe_trainable, save_final
from tunesmith.recipes.common import evaluate_task, for_generation, load_start
from tunesmith.recipes.result import RunResult
from tunesmith.training import fit
from tunesmith.training.plots import plot_loss_curve


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
        model, tokenizer = load_start(cfg.model, cfg.method.kind, cfg.data.chat_template, cfg.seed, say)
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
            before = evaluate_task(model, tokenizer, cfg.eval, run, "before", say)

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
            after = evaluate_task(for_generation(model, cfg.method.kind), tokenizer, cfg.eval, run, "after", say)
            if before:
                (run.eval / "report.md").write_text(before_after_markdown(before, after))
                (run.final / "README.md").write_text(_model_card(cfg, data.stats, before, after))
        run.set_status("succeeded", step=result.steps, total_steps=result.steps,
                       before=before, after=after)
        run.event("finished", "run succeeded")
        return RunResult(run.root, result.steps, result.train_loss, result.val_loss, before, after, data.stats)
