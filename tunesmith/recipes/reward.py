"""Reward-model training, top to bottom: preference pairs, a scalar head, Bradley-Terry, pairwise accuracy."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunesmith._core import dist
from tunesmith._core.rundir import RunDir
from tunesmith._core.seed import seed_everything
from tunesmith.config import RewardConfig, dump_config
from tunesmith.data import collate_pairs, load_preference_data
from tunesmith.data.preference import chosen_rejected
from tunesmith.eval.preference import pairwise_metrics
from tunesmith.losses import bradley_terry
from tunesmith.models import apply_method, describe_trainable, save_final
from tunesmith.recipes.common import load_start
from tunesmith.models.reward import sequence_scores, to_reward_model
from tunesmith.recipes.result import RunResult
from tunesmith.training import fit
from tunesmith.training.plots import plot_loss_curve


def run_reward(cfg: RewardConfig, *, resume: bool = False, say: Any = print) -> RunResult:
    """Train a reward model as configured; `before`/`after` hold validation pairwise accuracy."""
    run = RunDir(Path(cfg.output_dir)).prepare(dump_config(cfg), resume)
    with run.guard(f"reward with {cfg.method.kind} on {cfg.model.name}"):
        seed_everything(cfg.seed)
        lm, tokenizer = load_start(cfg.model, cfg.method.kind, cfg.data.chat_template, cfg.seed, say,
                                   optimizer=cfg.train.optimizer, shard_optimizer=cfg.train.shard_optimizer)
        data = load_preference_data(cfg.data, tokenizer, cfg.seed)
        say("data: " + ", ".join(f"{k} {v}" for k, v in data.stats.items()))

        model = apply_method(to_reward_model(lm), cfg.method)
        say(describe_trainable(model))
        pad = tokenizer.pad_token_id

        def loss_fn(m: Any, batch: dict) -> tuple[Any, int]:
            chosen, rejected = chosen_rejected(sequence_scores(m, batch), batch)
            margin = batch["margin"].to(chosen.device) if cfg.loss.use_margin else None
            return bradley_terry(chosen, rejected, margin, cfg.loss.center_coef).sum(), batch["n_loss_tokens"]

        # data parallel: each process scores its share of the pairs, and every process gets them all
        before = pairwise_metrics(model, data.validation, pad, shared=True) if data.validation else None
        result = fit(model, data.train, data.validation, cfg.train, run, pad_id=pad, seed=cfg.seed,
                     resume=resume, loss_fn=loss_fn, collate_fn=collate_pairs)
        after = pairwise_metrics(model, data.validation, pad, shared=True) if data.validation else None
        if not dist.is_main():  # data parallel: process 0 writes the scores and saves the result
            return RunResult(run.root, result.steps, result.train_loss, result.val_loss, before, after, data.stats)
        if before and after:
            (run.eval / "pairwise.json").write_text(json.dumps({"before": before, "after": after}, indent=2))
            run.event("evaluation", f"validation pairwise accuracy {before['accuracy']:.1%} -> "
                                    f"{after['accuracy']:.1%}", **after)
            say(f"validation pairwise accuracy {before['accuracy']:.1%} -> {after['accuracy']:.1%}, "
                f"mean margin {after['mean_margin']:.3f}")

        save_final(model, tokenizer, run.final, base_model=cfg.model.name, method=cfg.method.kind,
                   base_seed=cfg.seed, head="reward",
                   card=f"# Reward model from `{cfg.model.name}` ({cfg.method.kind})\n\n"
                        f"Validation pairwise accuracy: {after and after['accuracy']}\n")
        plot_loss_curve(run.read_metrics(), run.eval / "loss.png")
        run.set_status("succeeded", step=result.steps, total_steps=result.steps, before=before, after=after)
        run.event("finished", "run succeeded")
        return RunResult(run.root, result.steps, result.train_loss, result.val_loss, before, after, data.stats)
