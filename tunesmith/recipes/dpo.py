"""Preference optimisation, top to bottom: preference data, the reference, one objective through `fit()`,
save, and the held-out task scored before and after."""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

from tunesmith._core import dist
from tunesmith._core.rundir import RunDir
from tunesmith._core.seed import seed_everything
from tunesmith.config import DPOConfig, dump_config
from tunesmith.data import collate_pairs, load_preference_data
from tunesmith.data.unpaired import collate_unpaired, load_unpaired_data
from tunesmith.models import apply_method, describe_trainable
from tunesmith.models.load import model_fingerprint
from tunesmith.models.speed import shares_prefixes
from tunesmith.recipes.common import data_line, evaluate_task, load_start, model_card, save_and_score
from tunesmith.recipes.result import RunResult
from tunesmith.training import fit, precision_autocast, resolve_precision
from tunesmith.training.preference import (Reference, copy_reference, pair_objective, precompute_reference,
                                           unpaired_objective)
from tunesmith.training.speed import chunked_loss, plan_speed


def _model_card(cfg: DPOConfig, stats: dict, before: dict | None, after: dict | None) -> str:
    weight = f"lambda {cfg.loss.orpo_lambda}" if cfg.loss.name == "orpo" else f"beta {cfg.loss.beta}"
    return model_card(cfg, "Preference-tuned from", f"recipe: dpo, loss: {cfg.loss.name} ({weight}), "
                      f"reference: {cfg.reference_source() or 'none'}",
                      data_line(cfg.data.train, stats), before, after)


def run_dpo(cfg: DPOConfig, *, resume: bool = False, say: Any = print) -> RunResult:
    """Run preference optimisation as configured; `before`/`after` hold the held-out task's metrics."""
    run = RunDir(Path(cfg.output_dir)).prepare(dump_config(cfg), resume)
    with run.guard(f"dpo ({cfg.loss.name}) with {cfg.method.kind} on {cfg.model.name}"):
        seed_everything(cfg.seed)
        model, tokenizer = load_start(cfg.model, cfg.method.kind, cfg.data.chat_template, cfg.seed, say,
                                      quant=cfg.method.quant, optimizer=cfg.train.optimizer,
                                      shard_optimizer=cfg.train.shard_optimizer)
        unpaired = cfg.loss.name == "kto"
        if unpaired:
            data = load_unpaired_data(cfg.data, tokenizer, cfg.seed)
            collate_fn = collate_unpaired
            ratio = (cfg.loss.kto_desirable_weight * data.stats["train_desirable"]
                     / max(cfg.loss.kto_undesirable_weight * data.stats["train_undesirable"], 1e-9))
            if not 1.0 <= ratio <= 4 / 3:
                say(f"warning: KTO's desirable:undesirable weight ratio is {ratio:.2f}; its authors advise "
                    "1 to 4/3 (set loss.kto_desirable_weight / kto_undesirable_weight)")
        else:
            data = load_preference_data(cfg.data, tokenizer, cfg.seed)
            collate_fn = collate_pairs
        say("data: " + ", ".join(f"{k} {v}" for k, v in data.stats.items()))
        pad = tokenizer.pad_token_id

        before = None
        if cfg.eval.task_file and cfg.eval.before:
            before = evaluate_task(model, tokenizer, cfg.eval, run, "before", say)

        device = next(model.parameters()).device
        # both sides in one forward: padded rows, or one padding-free row where the speed plan picks varlen
        # attention; flat pairs share their prompt (one copy of it in the row) where the attention kernel serves that
        flat_collate = functools.partial(collate_fn, flat=True)
        shared = not unpaired and shares_prefixes(device)
        if shared:
            flat_collate = functools.partial(collate_fn, flat=True, shared=True)
        source = cfg.reference_source()
        reference = None
        if source == "precomputed":
            train_cfg = resolve_precision(cfg.train, model)[0]  # as fit() will train
            # in the layout training takes, so that the policy at its first step scores what the reference did
            flat = plan_speed(model, train_cfg, device, language_model=True, shared_prefixes=shared).varlen
            # the weights (not the name) in the dtype they loaded in, and the precision they are scored under
            model_id = (f"{cfg.model.name}:{model_fingerprint(cfg.model, cfg.seed)}:{next(model.parameters()).dtype}:"
                        f"{'flat' if flat else 'padded'}:{train_cfg.precision}")
            with dist.main_first():  # data parallel: process 0 writes the file, the others reuse it
                splits, reused = precompute_reference(
                    model, {"train": data.train, "validation": data.validation}, flat_collate if flat else collate_fn,
                    pad, run.root / "reference_logps.json", model_id=model_id,
                    batch_size=cfg.train.micro_batch_size, autocast=precision_autocast(train_cfg, device), flat=flat)
            data.train, data.validation = splits["train"], splits["validation"]
            say("reference log-probs " + ("reused from the run directory" if reused else "precomputed"))
            reference = Reference("precomputed")
        elif source == "copy":
            reference = copy_reference(model, cfg.train)
        elif source == "adapter":
            reference = Reference("adapter")

        model = apply_method(model, cfg.method, tokenizer)
        say(describe_trainable(model))
        # log-probs from hidden states chunk by chunk where the speed plan picks chunking (no full logits)
        chunked = chunked_loss(cfg.train)
        loss_fn = (unpaired_objective(cfg.loss, reference, chunked) if unpaired
                   else pair_objective(cfg.loss, reference, chunked))
        t0 = time.perf_counter()
        result = fit(model, data.train, data.validation, cfg.train, run, pad_id=pad, seed=cfg.seed,
                     resume=resume, loss_fn=loss_fn, collate_fn=collate_fn, flat_collate_fn=flat_collate,
                     shared_prefixes=shared)
        records = run.read_metrics()
        last = records[-1] if records else {}
        say(f"trained {result.steps - (result.resumed_from or 0)} steps in {time.perf_counter() - t0:.0f} s"
            + (f", final loss {result.train_loss:.4f}" if result.train_loss is not None else "")
            + (f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else "")
            + (f", validation reward accuracy {last['val_rewards/accuracy']:.1%}"
               if "val_rewards/accuracy" in last else ""))
        after = save_and_score(model, tokenizer, cfg, run, before, lambda b, a: _model_card(cfg, data.stats, b, a), say)
        run.set_status("succeeded", step=result.steps, total_steps=result.steps, before=before, after=after)
        run.event("finished", "run succeeded")
        return RunResult(run.root, result.steps, result.train_loss, result.val_loss, before, after, data.stats)
