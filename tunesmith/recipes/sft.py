"""Supervised fine-tuning, top to bottom: data, model, method, fit, save, evaluate before and after."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tunesmith._core.errors import TunesmithError
from tunesmith._core.rundir import RunDir
from tunesmith._core.seed import seed_everything
from tunesmith.config import SFTConfig, dump_config
from tunesmith.data import load_sft_data
from tunesmith.models import apply_method, describe_trainable
from tunesmith.models.methods import has_virtual_tokens
from tunesmith.recipes.common import evaluate_task, load_start, model_card, save_and_score
from tunesmith.recipes.result import RunResult
from tunesmith.training import fit


def _model_card(cfg: SFTConfig, stats: dict, before: dict | None, after: dict | None) -> str:
    return model_card(cfg, "Fine-tuned from", "recipe: sft",
                      f"{cfg.data.train or [t.name for t in cfg.data.mixture or []]} ({stats.get('train_examples')} "
                      f"examples, {stats.get('train_loss_tokens') or 'streamed'} trained tokens)", before, after)


def run_sft(cfg: SFTConfig, *, resume: bool = False, say: Any = print) -> RunResult:
    """Run supervised fine-tuning as configured; returns the run's location and measurements."""
    run = RunDir(Path(cfg.output_dir)).prepare(dump_config(cfg), resume)
    with run.guard(f"sft with {cfg.method.kind} on {cfg.model.name}"):
        seed_everything(cfg.seed)
        model, tokenizer = load_start(cfg.model, cfg.method.kind, cfg.data.chat_template, cfg.seed, say,
                                      quant=cfg.method.quant, optimizer=cfg.train.optimizer,
                                      shard_optimizer=cfg.train.shard_optimizer)
        if has_virtual_tokens(model) and cfg.data.packing:
            # a stack on prefix or prompt tuning (the config alone cannot tell); varlen: see plan_speed
            raise TunesmithError(f"{cfg.model.name} puts virtual tokens before each example: it needs "
                                 "data.packing=false")
        data = load_sft_data(cfg.data, tokenizer, cfg.seed)
        say(f"data: {data.stats['train_examples']} train / {data.stats['validation_examples']} validation examples, "
            f"{data.stats['train_loss_tokens'] or 'streamed'} trained tokens"
            + (f", packed into {data.stats['train_rows']} rows" if cfg.data.packing else ""))
        lost = {k: data.stats[k] for k in ("truncated", "dropped_too_long", "dropped_no_loss_tokens") if data.stats[k]}
        if lost:
            say(f"warning: over data.max_seq_len={cfg.data.max_seq_len}: {lost} (truncation cuts the end of an "
                "example, which is usually its answer)")
        before = None
        if cfg.eval.task_file and cfg.eval.before:
            before = evaluate_task(model, tokenizer, cfg.eval, run, "before", say)

        model = apply_method(model, cfg.method, tokenizer)
        say(describe_trainable(model))
        t0 = time.perf_counter()
        result = fit(model, data.train, data.validation, cfg.train, run, pad_id=tokenizer.pad_token_id,
                     seed=cfg.seed, resume=resume)
        ran = result.steps - (result.resumed_from or 0)
        say(f"trained {ran} steps" + (f" (resumed at step {result.resumed_from})" if result.resumed_from else "")
            + f" in {time.perf_counter() - t0:.0f} s"
            + (f", final loss {result.train_loss:.4f}" if result.train_loss is not None else "")
            + (f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""))
        after = save_and_score(model, tokenizer, cfg, run, before, lambda b, a: _model_card(cfg, data.stats, b, a), say)
        run.set_status("succeeded", step=result.steps, total_steps=result.steps,
                       before=before, after=after)
        run.event("finished", "run succeeded")
        return RunResult(run.root, result.steps, result.train_loss, result.val_loss, before, after, data.stats)
