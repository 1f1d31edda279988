"""`fit()`: the one supervised training loop, shared by every recipe that trains on fixed data.

Data order is a pure function of (seed, epoch), and a checkpoint stores the optimiser step, so a resumed
run feeds exactly the micro-batches an uninterrupted run would have fed, with the same learning rate.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from tunesmith._core import dist
from tunesmith._core.batches import in_batches
from tunesmith._core.errors import TunesmithError
from tunesmith._core.modes import evaluating
from tunesmith._core.rundir import RunDir
from tunesmith.config import TrainConfig
from tunesmith.data.packing import collate, collate_flat
from tunesmith.losses.cross_entropy import linear_cross_entropy, token_cross_entropy
from tunesmith.models import speed
from tunesmith.training import fsdp
from tunesmith.training.anchor import WeightAnchor
from tunesmith.training.checkpoint import list_checkpoints, load_checkpoint, processes_state, save_checkpoint
from tunesmith.training.noise import noisy_embeddings
from tunesmith.training.optim import build_optimizer, build_scheduler, optimizer_shards
from tunesmith.training.precision import (LossScaling, RunPrecision, precision_autocast, resolve_precision,
                                         training_precision)
from tunesmith.training.sinks import MetricSinks
from tunesmith.training.speed import SpeedPlan, applied, before_forward, plan_speed, settle_attention, until_it_fits

Rows = Sequence[Sequence[Any]]  # a row: examples packed together (SFT), or one prompt's pairs (preferences)
# (model, batch) -> (summed loss, count), or (summed loss, count, {metric: sum over the batch's examples})
LossFn = Callable[[torch.nn.Module, dict], tuple]
CollateFn = Callable[[Sequence[Sequence[Any]], int], dict]


@dataclass
class _Launched:
    """One optimiser step whose loss and gradient norm may still be on the device: `fit()` reads them a
    step later, once the next step's work is queued behind them, so the GPU never waits for the host."""
    done: int
    loss_sum: torch.Tensor
    n_loss: int
    norm: torch.Tensor
    lr: float
    extra: dict[str, list]
    tokens: int  # running total, this step included
    step_tokens: int
    peak_gib: float | None  # the allocator's peak is counted on the host, as the step's work is queued
    loss_scale: torch.Tensor | None = None  # fp16: the scale the step's backward used

    def record(self, epoch: float) -> dict[str, Any]:
        """The step's metrics as numbers (waits for the device to get through this step)."""
        record = {"step": self.done, "epoch": epoch, "loss": float(self.loss_sum) / max(self.n_loss, 1),
                  "lr": self.lr, "grad_norm": float(self.norm), "tokens": self.tokens, "loss_tokens": self.n_loss,
                  **_means(self.extra, self.n_loss)}
        if self.loss_scale is not None:
            record["loss_scale"] = float(self.loss_scale)
        return record if self.peak_gib is None else {**record, "peak_mem_gib": self.peak_gib}


@dataclass
class FitResult:
    steps: int
    train_loss: float | None
    val_loss: float | None
    tokens: int
    seconds: float
    resumed_from: int | None


def lm_loss(*, chunked: bool = False, neftune: float | None = None) -> LossFn:
    """Summed token cross-entropy of one collated batch, padded (`collate`) or flat (`collate_flat`, run
    through variable-length attention). `chunked` computes it from the final hidden states chunk by chunk
    (`linear_cross_entropy`), so the full logits never exist; models whose output layer is not a plain
    linear map (soft-capped or scaled logits, an adapter on the head) take the full-logits path. A flat
    batch's forward and backward run with the model in `speed.varlen_attention` (fit() sees to that).
    use_cache=False matters for padded rows: with a cache transformers skips the packed-sequence detection
    that keeps examples in one row from attending to each other. `neftune`: NEFTune's alpha, noise on the
    input embeddings of training forwards (`training.noise`)."""
    def loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        if neftune and model.training:
            with noisy_embeddings(model, batch["position_ids"], neftune):
                return plain(model, batch)
        return plain(model, batch)

    def plain(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        device = next(model.parameters()).device
        inputs = {"input_ids": batch["input_ids"].to(device, non_blocking=True),
                  "position_ids": batch["position_ids"].to(device, non_blocking=True),
                  "use_cache": False}
        if "cu_seq_lens" in batch:
            assert speed.in_varlen_mode(model), "a flat batch needs the model in speed.varlen_attention(model)"
            inputs.update(speed.flat_kwargs(batch, device))
        else:  # varlen attention ignores the packed-row boundaries transformers reads from position ids
            assert not speed.in_varlen_mode(model), "a padded batch needs the model's own attention"
        parts = speed.lm_parts(model) if chunked else None
        if parts is not None:
            decoder, head = parts
            hidden = decoder(**inputs).last_hidden_state
            return linear_cross_entropy(hidden, head.weight, batch["targets"])
        return token_cross_entropy(model(**inputs).logits, batch["targets"])
    return loss


causal_lm_loss = lm_loss()


REPORT_BATCHES = 64  # micro-batches of lazily read rows that the speed report looks at


def _batch_tokens(rows: Rows) -> int:
    """Real tokens in a micro-batch of `Example` rows (0 for rows of anything else)."""
    try:
        return sum(len(x) for row in rows for x in row)
    except TypeError:
        return 0


def steps_per_epoch(n_rows: int, cfg: TrainConfig, world: int = 1) -> float:
    """Optimiser steps in one pass over `n_rows`: a step takes `grad_accum` micro-batches in each of `world`
    processes."""
    return math.ceil(n_rows / cfg.micro_batch_size) / (cfg.grad_accum * world)


def total_steps(n_rows: int, cfg: TrainConfig, world: int = 1) -> int:
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch(n_rows, cfg, world)))


def window_indices(step: int, grad_accum: int, world: int = 1, rank: int = 0) -> range:
    """The micro-batches (indices into the shuffled stream, `micro_batch`) that process `rank` of `world`
    trains on at optimiser step `step`. The processes share each step's `grad_accum x world` micro-batches
    out in turn, so together they train on what one process with accumulation `grad_accum x world` would."""
    first = step * grad_accum * world
    return range(first + rank, first + grad_accum * world, world)


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch: a pure function of (seed, epoch)."""
    order = list(range(n_rows))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def micro_batch(rows: Rows, k: int, micro_batch_size: int, seed: int) -> list[Sequence[Any]]:
    """The k-th micro-batch of the endless, epoch-by-epoch shuffled stream of rows."""
    per_epoch = math.ceil(len(rows) / micro_batch_size)
    epoch, i = divmod(k, per_epoch)
    order = epoch_order(len(rows), seed, epoch)
    return [rows[j] for j in order[i * micro_batch_size:(i + 1) * micro_batch_size]]


def reads_late(device: torch.device) -> bool:
    """Whether `fit()` reads a step's numbers a step late: on a GPU, which runs behind the host (on a CPU
    each step is done when its last operation returns, and steps are timed as they end)."""
    return device.type == "cuda"


def _add_metrics(total: dict[str, list], out: tuple) -> None:
    """Add a loss function's extra metrics into `total` as [sum, own count or None]. A metric is a sum over
    the batch's units (averaged by the window's count), or a (sum, count) pair with a count of its own."""
    for key, value in (out[2] if len(out) > 2 else {}).items():
        s, c = value if isinstance(value, tuple) else (value, None)
        acc = total.setdefault(key, [0.0, None])
        acc[0] = acc[0] + (s.detach() if torch.is_tensor(s) else s)  # summed on the device: read once, when logged
        if c is not None:
            acc[1] = (acc[1] or 0) + int(c)


def _means(total: dict[str, list], count: int) -> dict[str, float]:
    """Each metric's mean; one with its own count that saw no unit is left out rather than reported as 0."""
    return {k: float(s) / max(c if c is not None else count, 1) for k, (s, c) in total.items() if c != 0}


def _pinned(batch: dict) -> dict:
    """The batch's tensors in page-locked host memory (what a non-blocking copy to the GPU needs)."""
    return {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}


def accumulate_gradients(model: torch.nn.Module, window: list[dict], loss_fn: LossFn,
                         autocast: contextlib.AbstractContextManager | None = None,
                         metrics: dict[str, list] | None = None,
                         plan: SpeedPlan | None = None,
                         scaling: LossScaling | None = None,
                         n_loss: int | None = None) -> tuple[torch.Tensor, int]:
    """Backward over every micro-batch of one optimiser step; returns (summed loss, loss tokens).

    Each micro-batch's summed loss is divided by the token count of the whole window, so the result is
    the per-token mean over the window: batch 8 x accumulation 1 equals batch 1 x accumulation 8.
    Summed extra metrics the loss function reports are added into `metrics` when given; a speed `plan`
    sets each micro-batch's checkpointed blocks from its size; `scaling` multiplies each loss by an fp16
    run's loss scale before backward. The summed loss stays a tensor on the device: the host never waits
    for the GPU inside a window. `n_loss`: the count to divide by where the window is one process's share of
    a step (data parallel: the step's count over every process); by default the window's own.
    """
    n_loss = sum(b["n_loss_tokens"] for b in window) if n_loss is None else n_loss
    loss_sum = None
    for batch in window:
        if plan is not None:
            before_forward(model, plan, batch["n_tokens"])
        with autocast or contextlib.nullcontext():
            out = fsdp.within_root(model, lambda: loss_fn(model, batch))
        loss = out[0] / max(n_loss, 1)
        loss.backward() if scaling is None else scaling.backward(loss)
        part = out[0].detach().float()
        loss_sum = part if loss_sum is None else loss_sum + part
        if metrics is not None:
            _add_metrics(metrics, out)
    return (torch.zeros(()) if loss_sum is None else loss_sum), n_loss


def _window_gradients(model: torch.nn.Module, window: list[dict], loss_fn: LossFn,
                      autocast: contextlib.AbstractContextManager, plan: SpeedPlan,
                      scaling: LossScaling, n_loss: int) -> tuple[torch.Tensor, int, dict[str, list]]:
    """`accumulate_gradients` over one step's window with its metrics: (summed loss, loss tokens, metrics)."""
    extra: dict[str, list] = {}
    loss_sum, n_loss = accumulate_gradients(model, window, loss_fn, autocast, extra, plan, scaling, n_loss)
    return loss_sum, n_loss, extra


def _sum_over_processes(loss_sum: torch.Tensor, extra: dict[str, list]) -> torch.Tensor:
    """The step's summed loss and metrics over every process (data parallel), in place for the metrics:
    the sums in one collective on the device, their own counts in one on the host."""
    if dist.world_size() == 1:
        return loss_sum
    names = sorted(extra)
    sums = torch.stack([loss_sum.float().reshape(())] + [torch.as_tensor(extra[k][0], dtype=torch.float32,
                                                                         device=loss_sum.device).reshape(())
                                                         for k in names])
    dist.sum_(sums)
    counts = dist.sum_host([extra[k][1] or 0 for k in names])
    for i, k in enumerate(names):
        extra[k] = [sums[i + 1], None if extra[k][1] is None else int(counts[i])]
    return sums[0]


@torch.no_grad()
def evaluate(model: torch.nn.Module, rows: Rows, cfg: TrainConfig, pad_id: int,
             loss_fn: LossFn = causal_lm_loss, collate_fn: CollateFn = collate) -> dict[str, float] | None:
    """{"loss": mean loss per count unit over `rows`, and each extra metric's mean over the same unit}."""
    if not rows:
        return None
    total, count, extra = _evaluation_sums(model, rows, cfg, pad_id, loss_fn, collate_fn)
    return {"loss": total / max(count, 1), **_means(extra, count)}


def _evaluation_sums(model: torch.nn.Module, rows: Rows, cfg: TrainConfig, pad_id: int, loss_fn: LossFn,
                     collate_fn: CollateFn) -> tuple[float, int, dict[str, list]]:
    """(summed loss, count, {metric: [sum, own count or None]}) over `rows`, as numbers on the host."""
    device = next(model.parameters()).device
    cfg = resolve_precision(cfg, model)[0]  # called on its own, under `auto`
    total, count, extra = 0.0, 0, {}

    def run(start: int, stop: int) -> tuple:
        with precision_autocast(cfg, device):
            batch = collate_fn(rows[start:stop], pad_id)
            return fsdp.within_root(model, lambda: loss_fn(model, batch))

    with evaluating(model):
        for out in in_batches(len(rows), cfg.micro_batch_size, run, "validation"):
            total, count = total + float(out[0]), count + out[1]
            _add_metrics(extra, out)
    return total, count, {k: [float(s), c] for k, (s, c) in extra.items()}


def evaluate_loss(model: torch.nn.Module, rows: Rows, cfg: TrainConfig, pad_id: int,
                  loss_fn: LossFn = causal_lm_loss, collate_fn: CollateFn = collate) -> float | None:
    """Mean loss per target token over `rows`."""
    result = evaluate(model, rows, cfg, pad_id, loss_fn, collate_fn)
    return None if result is None else result["loss"]


@torch.no_grad()
def _validate(model: torch.nn.Module, rows: Rows, cfg: TrainConfig, pad_id: int, loss_fn: LossFn,
              collate_fn: CollateFn) -> dict[str, float]:
    """`evaluate`; data parallel, each process scores rows r, r + N, ... and the sums are combined, so every
    process gets the means over all of `rows`."""
    if dist.world_size() == 1:
        return evaluate(model, rows, cfg, pad_id, loss_fn, collate_fn)
    share = dist.share(rows)
    sums = _evaluation_sums(model, share, cfg, pad_id, loss_fn, collate_fn) if share else (0.0, 0, {})
    if fsdp.is_sharded(model):  # each forward is a collective: as many in every process, the extra ones discarded
        mine, every = fsdp.validation_forwards(len(rows), cfg.micro_batch_size)
        for _ in range(every - mine):
            _evaluation_sums(model, rows[:1], cfg, pad_id, loss_fn, collate_fn)
    parts = dist.gather_object(sums)
    total, count, extra = sum(p[0] for p in parts), sum(p[1] for p in parts), {}
    for _, _, metrics in parts:
        for key, (s, c) in metrics.items():
            acc = extra.setdefault(key, [0.0, None])
            acc[0] += s
            acc[1] = c if acc[1] is None else acc[1] + (c or 0)
    return {"loss": total / max(count, 1), **_means(extra, count)}


def _packed(rows: Rows) -> bool:
    """Whether some row holds several examples (`data.packing`; a streamed corpus is never packed)."""
    return isinstance(rows, list) and any(len(row) > 1 for row in rows)


def fit(model: torch.nn.Module, train_rows: Rows, val_rows: Rows, cfg: TrainConfig, run: RunDir, *,
        pad_id: int, seed: int, resume: bool = False, loss_fn: LossFn | None = None,
        collate_fn: CollateFn | None = None, flat_collate_fn: CollateFn | None = None,
        shared_prefixes: bool = False, on_step: Callable[[int, dict[str, Any]], None] | None = None) -> FitResult:
    """Train `model` in place. Writes metrics, events and checkpoints into `run`.

    `collate_fn(rows, pad_id)` builds a batch dict holding `n_loss_tokens` (what the loss is normalised
    by: target tokens for language modelling, pairs for preference losses) and `n_tokens` (real tokens);
    `loss_fn(model, batch)` returns (summed loss, count) or (summed loss, count, {name: summed metric}); extra
    metrics are logged as their mean over the window's count (per pair for preference losses), and on
    validation as `val_<name>`. Without `loss_fn` it trains a causal language model on rows of
    `Example`s, flat or padded and with chunked or full-logits loss as the speed plan resolves
    (`train.attention`, `train.loss_chunking`); checkpointing and compiled blocks apply to any loss.
    A caller whose loss also takes flat batches (sequence log-probs, `training.preference`) passes
    `flat_collate_fn` beside `collate_fn`, and the speed plan picks between them as for language models;
    `shared_prefixes` says its flat batches lay a prefix that sequences share out once (a DPO prompt), which
    `auto` takes flat rows for on a CPU too (`plan_speed`)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable, "apply a method before fit(): no parameter requires grad"
    with training_precision(cfg, model) as precision:
        return _fit(model, trainable, train_rows, val_rows, precision.cfg, run, pad_id=pad_id, seed=seed,
                    resume=resume, loss_fn=loss_fn, collate_fn=collate_fn, flat_collate_fn=flat_collate_fn,
                    shared_prefixes=shared_prefixes, on_step=on_step, precision=precision)


def _fit(model: torch.nn.Module, trainable: list[torch.nn.Parameter], train_rows: Rows, val_rows: Rows,
         cfg: TrainConfig, run: RunDir, *, pad_id: int, seed: int, resume: bool, loss_fn: LossFn | None,
         collate_fn: CollateFn | None, flat_collate_fn: CollateFn | None, shared_prefixes: bool,
         on_step: Callable[[int, dict[str, Any]], None] | None, precision: RunPrecision) -> FitResult:
    device = next(model.parameters()).device
    shards = optimizer_shards(cfg, trainable)  # data parallel: each process keeps the moments of 1/shards
    plan = plan_speed(model, cfg, device, language_model=loss_fn is None or flat_collate_fn is not None,
                      shared_prefixes=shared_prefixes and flat_collate_fn is not None,
                      moment_share=1 / (dist.world_size() if fsdp.enabled(cfg) else shards))
    if loss_fn is None:
        loss_fn = lm_loss(chunked=plan.chunked_loss, neftune=cfg.neftune_alpha)
        if collate_fn is None:
            collate_fn, flat_collate_fn = collate, collate_flat
    if collate_fn is not None and flat_collate_fn is None:  # the caller chose padded rows: the model's attention
        plan.varlen = False
    settle_attention(model, plan, cfg, packed=collate_fn is collate and _packed(train_rows),
                     flat_possible=flat_collate_fn is not None)
    collate_fn = (flat_collate_fn if plan.varlen else collate_fn) or collate
    world, me = dist.world_size(), dist.rank()
    if world > 1:  # every process starts from process 0's trainable weights; each draws its own dropout
        dist.broadcast_(trainable)
        if me:
            torch.manual_seed(seed * 1_000_003 + me)
    sharded = fsdp.shard(model, device) if fsdp.enabled(cfg) else None
    if sharded is not None:  # the trainable weights are shards now, and their gradients come summed
        trainable = [p for p in model.parameters() if p.requires_grad]
    anchor = WeightAnchor(model, cfg.weight_anchor) if cfg.weight_anchor else None  # before a resume loads
    optimizer = build_optimizer(model, cfg, seed, shards)
    n_steps = total_steps(len(train_rows), cfg, world)
    scheduler = build_scheduler(optimizer, cfg, n_steps)
    scaling = LossScaling(cfg, device)
    per_epoch = math.ceil(len(train_rows) / cfg.micro_batch_size)

    start, tokens, resumed_from = 0, 0, None
    if resume and (ckpts := list_checkpoints(run.checkpoints)):
        state = load_checkpoint(ckpts[-1], model, optimizer, scheduler, scaling)
        if state["total_steps"] != n_steps:
            raise TunesmithError(f"cannot resume from {ckpts[-1]}: it was planned for {state['total_steps']} "
                                 f"steps, this config plans {n_steps} (data or train settings changed)")
        start, tokens, resumed_from = state["step"], state["tokens"], state["step"]
        run.event("resumed", f"resumed from {ckpts[-1].name}", step=start)
    elif resume:
        run.event("resumed", "no complete checkpoint yet: starting from step 0", step=0)
    run.truncate_metrics(start)  # steps logged after the checkpoint are re-logged, never duplicated
    order, mbs = epoch_order(len(train_rows), seed, 0), cfg.micro_batch_size
    # Only a per-micro-batch plan reports a range. Rows read on demand (a streamed corpus) are not read
    # whole for it: the first REPORT_BATCHES micro-batches stand for the epoch.
    shown = len(order) if isinstance(train_rows, list) else min(len(order), REPORT_BATCHES * mbs)
    first_epoch = ([_batch_tokens([train_rows[j] for j in order[i:i + mbs]]) for i in range(0, shown, mbs)]
                   if plan.checkpointing == "budget" else [])

    sinks = MetricSinks(run, cfg, total=n_steps, initial=start)
    model.train()
    train_loss = val_loss = None
    t_start = time.perf_counter()
    cuda = device.type == "cuda"
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(applied(model, plan))
        run.event("speed", plan.describe([t for t in first_epoch if t]), step=start)
        if world > 1:
            rows = world * cfg.grad_accum * cfg.micro_batch_size
            if sharded is not None:
                state = (f"weights, gradients and optimiser state fully sharded (fsdp), each process keeping 1/{world}"
                         f" of them; {len(sharded.units) - 1} transformer blocks gathered one at a time")
            else:
                state = "optimiser state " + (f"sharded, each process keeping 1/{shards}" if shards > 1
                                              else "whole in each process")
            run.event("data_parallel", f"{world} processes, each training {cfg.grad_accum} micro-batches of "
                      f"{cfg.micro_batch_size} rows a step: {rows} rows a step; {state}",
                      step=start, processes=world, optimizer_shards=shards, fsdp=sharded is not None)
        precision.report(run, start, optimizer)
        def window_of(step: int) -> list[dict]:
            window = [collate_fn(micro_batch(train_rows, k, cfg.micro_batch_size, seed), pad_id)
                      for k in window_indices(step, cfg.grad_accum, world, me)]
            # Copies to the GPU from pageable memory wait for the GPU to finish its queue; from pinned
            # memory they run behind it, so the host goes on preparing the next forward.
            return [_pinned(batch) for batch in window] if cuda else window

        # A step's record is read from the device while the next step runs: the host waits only for work
        # queued a step earlier. Steps that evaluate, save or end the run are read at once.
        pending: _Launched | None = None
        seen, late = time.perf_counter(), reads_late(device)

        def publish(p: _Launched) -> None:
            nonlocal train_loss, seen
            record = p.record(round(p.done * cfg.grad_accum * world / per_epoch, 4))
            now = time.perf_counter()  # the device has finished the step: steps are timed between finishes
            record.update(tokens_per_s=p.step_tokens / max(now - seen, 1e-9), elapsed_s=now - t_start)
            seen, train_loss = now, record["loss"]
            sinks.step(record, log=p.done % cfg.log_every == 0 or p.done == n_steps)
            run.set_status("running", step=p.done, total_steps=n_steps)
            scaling.read(record["grad_norm"], p.done)  # after the record is written: it shows the overflow
            if on_step is not None:
                on_step(p.done, record)

        window = window_of(start) if start < n_steps else []
        for step in range(start, n_steps):
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            # the step's loss tokens and tokens over every process (data parallel: each holds a share)
            n_loss, step_tokens = map(int, dist.sum_host([sum(b["n_loss_tokens"] for b in window),
                                                          sum(b["n_tokens"] for b in window)]))
            def attempt() -> tuple[torch.Tensor, int, dict[str, list]]:
                return _window_gradients(model, window, loss_fn, precision_autocast(cfg, device), plan, scaling,
                                         n_loss)
            # a micro-batch out of memory under a budget plan: the step again, with more blocks checkpointed
            # (not fully sharded: the other processes are inside the step's collectives)
            loss_sum, n_loss, extra = (attempt() if sharded is not None
                                       else until_it_fits(attempt, model, plan, step + 1, optimizer, run))
            if sharded is None:  # fully sharded, backward has summed them already
                dist.reduce_gradients(trainable)  # before the anchor, whose gradient every process has whole
            loss_sum = _sum_over_processes(loss_sum, extra)
            if anchor is not None:  # once per step: the objective is the window's mean loss + λ/2 R
                penalty = anchor()
                scaling.backward(penalty)
                extra["anchor_penalty"] = [penalty.detach(), 1]  # [sum, count]: logged as its value
            scaling.unscale(optimizer)
            norm = fsdp.whole(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or math.inf))
            lr, scale = scheduler.get_last_lr()[0], scaling.scale()
            scaling.step(optimizer, scheduler)
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            tokens += step_tokens
            launched = _Launched(done, loss_sum, n_loss, norm, lr, extra, tokens, step_tokens,
                                 torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None, scale)
            # The next window is collated while the GPU works through this step.
            window = window_of(step + 1) if step + 1 < n_steps else []
            if pending is not None:
                publish(pending)
            pending = launched
            evaluates = bool(cfg.eval_every and (done % cfg.eval_every == 0 or done == n_steps) and val_rows)
            saves = bool(cfg.save_every and (done % cfg.save_every == 0 or done == n_steps))
            if late and not (evaluates or saves or done == n_steps):
                continue
            publish(pending)
            pending = None
            if evaluates:
                val = _validate(model, val_rows, cfg, pad_id, loss_fn, collate_fn)
                val_loss = val["loss"]
                sinks.step({"step": done, **{f"val_{k}": v for k, v in val.items()}}, log=True)
            if saves:
                path = save_checkpoint(run.checkpoints, done, model, optimizer, scheduler,
                                       {"tokens": tokens, "total_steps": n_steps,
                                        "micro_batch": done * cfg.grad_accum * world, **processes_state(optimizer)},
                                       cfg.keep_last, scaling.state_dict())
                run.event("checkpoint", f"saved {path.name}", step=done)
        if val_loss is None and val_rows:  # no eval_every: one validation at the end
            val = _validate(model, val_rows, cfg, pad_id, loss_fn, collate_fn)
            val_loss = val["loss"]
            # a resume of a finished run has logged it already
            sinks.step({"step": n_steps, **{f"val_{k}": v for k, v in val.items()}}, log=start < n_steps)
        if sharded is not None:  # whole again in every process, for what the recipe does next
            sharded.gather()
    finally:
        stack.close()
        sinks.close()
    return FitResult(n_steps, train_loss, val_loss, tokens, time.perf_counter() - t_start, resumed_from)
