"""Preference objectives for `fit()`: DPO and its relatives over pairs, KTO over labelled answers.

A batch holds the sequences of N pairs (`collate_pairs`: each distinct side once, so a K-way ranking's
K(K-1)/2 pairs cost K sequences; `collate_unpaired`: N answers then their N mismatched partners), so the
policy scores both halves in one forward. They are
padded rows, or with `flat=True` one padding-free row run through variable-length attention (fit()
picks the layout from the speed plan). With `chunked`, log-probs come from the final hidden states one
chunk at a time and the full logits never exist. Reference log-probs come from a `Reference`:

- "adapter": the policy itself with its adapter switched off (LoRA's base is frozen, so this is exactly the
  starting model, and nothing is copied);
- "copy": a frozen copy of the starting model, made before the method is applied, sharing no tensor with
  the policy;
- "precomputed": `batch["ref_logps"]`, filled once before training by `precompute_reference` and cached
  in the run directory.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from tunesmith._core.batches import in_batches
from tunesmith._core.modes import evaluating
from tunesmith.config import PreferenceLossConfig, TrainConfig
from tunesmith.data.preference import by_side
from tunesmith.losses import PAIRWISE_LOSSES, implicit_rewards, kto, orpo, sequence_logprobs, simpo
from tunesmith.losses.logprobs import flat_sequence_logprobs, linear_sequence_logprobs
from tunesmith.models import speed
from tunesmith.training.precision import training_autocast


def _flat_part(batch: dict, rows: slice) -> dict:
    """Sequences `rows` of a flat batch as a flat batch of their own (a slice of the one row)."""
    cu = batch["cu_seq_lens"].long()
    first, last = range(len(cu) - 1)[rows][0], range(len(cu) - 1)[rows][-1] + 1
    a, b = int(cu[first]), int(cu[last])
    part_cu = cu[first:last + 1] - a
    return {"input_ids": batch["input_ids"][:, a:b], "position_ids": batch["position_ids"][:, a:b],
            "targets": batch["targets"][:, a:b], "cu_seq_lens": part_cu.to(torch.int32),
            "max_length": int(part_cu.diff().max())}


def batch_logps(model: torch.nn.Module, batch: dict, rows: slice = slice(None),
                chunked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs (R,), answer token counts (R,)) of the batch's sequences `rows` under `model`,
    from padded rows or a flat batch (the model then in `speed.varlen_attention`); `chunked` computes
    them from the final hidden states without full logits where the model's head is a plain linear map.
    A `collate_pairs` batch is scored whole and gives one value per side (chosen sides, then rejected)."""
    if "sides" in batch:  # distinct sequences, each scored once, then handed to every side that is it
        assert rows == slice(None), "a batch of pairs is scored whole"
        return tuple(by_side(v, batch) for v in _sequence_logps(model, batch, rows, chunked))
    return _sequence_logps(model, batch, rows, chunked)


def _sequence_logps(model: torch.nn.Module, batch: dict, rows: slice,
                    chunked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    if "kv_index" in batch:  # sequences sharing their prefix (collate_shared): every sequence at once
        return _shared_logps(model, batch, device, chunked)
    if "cu_seq_lens" in batch:
        part = _flat_part(batch, rows)
        inputs = {"input_ids": part["input_ids"].to(device, non_blocking=True),
                  "position_ids": part["position_ids"].to(device, non_blocking=True),
                  **speed.flat_kwargs(part, device)}
        lengths = part["cu_seq_lens"].long().diff()
        n = lengths.numel()
        sequence = torch.repeat_interleave(torch.arange(n), lengths)
        targets = part["targets"]
    else:
        inputs = {"input_ids": batch["input_ids"][rows].to(device, non_blocking=True),
                  "position_ids": batch["position_ids"][rows].to(device, non_blocking=True)}
        targets = batch["targets"][rows]
        n = targets.size(0)
        sequence = torch.arange(n)[:, None].expand_as(targets)
    parts = speed.lm_parts(model) if chunked else None
    if parts is not None:
        decoder, head = parts
        hidden = decoder(**inputs, use_cache=False).last_hidden_state
        return linear_sequence_logprobs(hidden, head.weight, targets, sequence, n)
    logits = model(**inputs, use_cache=False).logits
    if "cu_seq_lens" in batch:
        return flat_sequence_logprobs(logits, targets, sequence, n)
    return sequence_logprobs(logits, targets.to(device, non_blocking=True))


def _shared_logps(model: torch.nn.Module, batch: dict, device: torch.device,
                  chunked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_logps` of a `collate_shared` batch: the output layer reads the `predict` positions only."""
    inputs = {"input_ids": batch["input_ids"].to(device, non_blocking=True),
              "position_ids": batch["position_ids"].to(device, non_blocking=True), **speed.flat_kwargs(batch, device)}
    predict = batch["predict"].to(device, non_blocking=True)
    n = batch["n_sequences"]
    parts = speed.lm_parts(model) if chunked else None
    if parts is not None:
        decoder, head = parts
        hidden = decoder(**inputs, use_cache=False).last_hidden_state.squeeze(0).index_select(0, predict)
        return linear_sequence_logprobs(hidden, head.weight, batch["target_ids"], batch["sequence"], n)
    logits = model(**inputs, use_cache=False).logits.squeeze(0).index_select(0, predict)
    return flat_sequence_logprobs(logits, batch["target_ids"], batch["sequence"], n)


class Reference:
    """The frozen reference policy's log-probs for a batch (see the module docstring for the kinds)."""

    def __init__(self, kind: str, model: torch.nn.Module | None = None):
        if kind not in ("adapter", "copy", "precomputed"):
            raise ValueError(f"unknown reference kind {kind!r}")
        if kind == "copy" and model is None:
            raise ValueError("a copy reference needs its model (see frozen_copy)")
        self.kind, self.model = kind, model

    @torch.no_grad()
    def logps(self, policy: torch.nn.Module, batch: dict, rows: slice = slice(None),
              chunked: bool = False) -> torch.Tensor:
        if self.kind == "precomputed":
            if "ref_logps" not in batch:
                raise RuntimeError("reference=precomputed but the batch carries no ref_logps")
            return batch["ref_logps"][rows].to(next(policy.parameters()).device)
        return self.run(policy, lambda model: batch_logps(model, batch, rows, chunked)[0],
                        flat="cu_seq_lens" in batch)

    @torch.no_grad()
    def run(self, policy: torch.nn.Module, fn: Callable[[torch.nn.Module], Any], flat: bool = False) -> Any:
        """`fn(reference model)` without gradients: the frozen copy, or the policy with its adapter off.
        With `flat` (a flat batch) the copy runs in variable-length attention, as the policy does."""
        if self.kind == "precomputed":
            raise RuntimeError("a precomputed reference has no model to run")
        if self.kind == "copy":
            with speed.varlen_attention(self.model) if flat else contextlib.nullcontext():
                return fn(self.model)
        with evaluating(policy), policy.disable_adapter():  # no adapter dropout: the reference is deterministic
            return fn(policy)


def narrowed_copy(model: torch.nn.Module, dtype: torch.dtype | None, narrow: set[int]) -> torch.nn.Module:
    """A deep copy in eval mode with every parameter frozen and no storage shared, the parameters whose ids
    are in `narrow` stored in `dtype`. Made parameter by parameter, so no whole copy at the original width
    is ever held; tied parameters stay tied."""
    memo: dict[int, Any] = {
        id(p): torch.nn.Parameter(p.detach().to(dtype, copy=True) if id(p) in narrow else p.detach().clone(),
                                  requires_grad=False)
        for p in model.parameters()}
    return copy.deepcopy(model, memo).eval()


def frozen_copy(model: torch.nn.Module, autocast: torch.dtype | None = None) -> torch.nn.Module:
    """A deep copy in eval mode with every parameter frozen: trains with no optimiser, shares no storage.

    `autocast`: the 16-bit dtype training's autocast computes in, which is all the copy then runs under.
    Its linear layers' float32 weights and biases are stored in that dtype: autocast casts them so at every
    call, so nothing the copy computes changes, while they take half the memory and no cast per forward
    (on a float32 `full` model that is most of the copy). A weight that another module shares (an output
    layer tied to the input embedding, which is looked up, not cast) stays as it is."""
    narrow: set[int] = set()
    if autocast is not None:
        uses = collections.Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
        for m in model.modules():
            own = list(m.parameters(recurse=False))
            if isinstance(m, torch.nn.Linear) and all(p.dtype == torch.float32 and uses[id(p)] == 1 for p in own):
                narrow.update(id(p) for p in own)
    return narrowed_copy(model, autocast, narrow)


def copy_reference(model: torch.nn.Module, cfg: TrainConfig) -> Reference:
    """A `copy` reference of `model` for a run training under `cfg`: `frozen_copy` made for the dtype that
    training autocasts to (`training_autocast`)."""
    return Reference("copy", frozen_copy(model, training_autocast(cfg, model)))


def _accuracy(margin: torch.Tensor) -> torch.Tensor:
    """Ties count half, so an untrained policy (all rewards 0) scores 0.5, as chance does."""
    return (margin > 0).float() + 0.5 * (margin == 0).float()


def pair_objective(cfg: PreferenceLossConfig, reference: Reference | None,
                   chunked: bool = False) -> Callable[[torch.nn.Module, dict], tuple]:
    """A `fit()` loss function for a pairwise loss: (summed loss, pairs, summed per-pair metrics).

    Metrics (means over pairs once `fit` divides): rewards/chosen, rewards/rejected, rewards/margin,
    rewards/accuracy (reward of chosen > rejected), logps/chosen, logps/rejected (summed answer log-probs).
    Rewards are DPO's implicit β·(log π - log π_ref) with a reference; for SimPO β times, and for ORPO λ
    times, the mean answer log-prob. `sft_weight` α adds α times the chosen answer's mean token NLL to
    each pair's loss (RPO), anchoring the chosen likelihood that DPO alone lets fall.
    """
    name = cfg.name
    if name == "kto":
        raise ValueError("kto is unpaired: use unpaired_objective")
    if (reference is None) != (name in ("simpo", "orpo")):
        raise ValueError(f"loss {name} {'needs' if reference is None else 'takes no'} reference")

    def loss_fn(model: torch.nn.Module, batch: dict) -> tuple:
        logps, n_tok = batch_logps(model, batch, chunked=chunked)
        pc, pr = logps.chunk(2)
        nc, nr = n_tok.chunk(2)
        if name in PAIRWISE_LOSSES:
            rc, rr = reference.logps(model, batch, chunked=chunked).chunk(2)
            extra = {"label_smoothing": cfg.label_smoothing} if name == "sigmoid" else {}
            losses = PAIRWISE_LOSSES[name](pc, pr, rc, rr, cfg.beta, **extra)
            rew_c, rew_r = implicit_rewards(pc, rc, cfg.beta), implicit_rewards(pr, rr, cfg.beta)
        else:
            mc, mr = pc / nc.clamp(min=1), pr / nr.clamp(min=1)
            if name == "simpo":
                losses = simpo(mc, mr, cfg.beta, cfg.simpo_gamma)
                rew_c, rew_r = cfg.beta * mc, cfg.beta * mr
            else:  # orpo: the SFT term is the chosen answer's mean token NLL
                losses = orpo(mc, mr, -mc, cfg.orpo_lambda)
                rew_c, rew_r = cfg.orpo_lambda * mc, cfg.orpo_lambda * mr
        if cfg.sft_weight:  # RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization")
            losses = losses + cfg.sft_weight * (-pc / nc.clamp(min=1))
        rew_c, rew_r = rew_c.detach(), rew_r.detach()
        metrics = {"rewards/chosen": rew_c.sum(), "rewards/rejected": rew_r.sum(),
                   "rewards/margin": (rew_c - rew_r).sum(), "rewards/accuracy": _accuracy(rew_c - rew_r).sum(),
                   "logps/chosen": pc.detach().sum(), "logps/rejected": pr.detach().sum()}
        return losses.sum(), batch["n_loss_tokens"], metrics

    return loss_fn


def unpaired_objective(cfg: PreferenceLossConfig, reference: Reference,
                       chunked: bool = False) -> Callable[[torch.nn.Module, dict], tuple]:
    """A `fit()` loss function for KTO on `collate_unpaired` batches: (summed loss, answers, metrics).

    The reference point z0 is the micro-batch's mean log-ratio on the mismatched partners, computed
    without gradients (the KTO paper's estimate, as TRL's KTOTrainer makes it). Metrics: kl, and per
    kind of answer rewards/desirable, rewards/undesirable and logps/desirable, logps/undesirable (each
    a mean over answers of that kind, given as (sum, count))."""
    if cfg.name != "kto":
        raise ValueError(f"{cfg.name} is pairwise: use pair_objective")

    def loss_fn(model: torch.nn.Module, batch: dict) -> tuple:
        n = batch["n_loss_tokens"]
        answers, partners = slice(0, n), slice(n, 2 * n)
        logps, _ = batch_logps(model, batch, answers, chunked)
        with torch.no_grad():
            kl_policy, _ = batch_logps(model, batch, partners, chunked)
        ref = reference.logps(model, batch, chunked=chunked)
        ref_answers, ref_partners = ref[:n], ref[n:]
        kl = (kl_policy - ref_partners).mean().clamp(min=0)
        good = batch["desirable"].to(logps.device)
        losses = kto(logps, ref_answers, good, kl, cfg.beta, cfg.kto_desirable_weight, cfg.kto_undesirable_weight)
        rewards = implicit_rewards(logps.detach(), ref_answers, cfg.beta)
        n_good, n_bad = int(good.sum()), int((~good).sum())
        metrics = {"kl": kl * n,
                   "rewards/desirable": (rewards[good].sum(), n_good), "rewards/undesirable": (rewards[~good].sum(), n_bad),
                   "logps/desirable": (logps.detach()[good].sum(), n_good),
                   "logps/undesirable": (logps.detach()[~good].sum(), n_bad)}
        return losses.sum(), n, metrics

    return loss_fn


# ---------------------------------------------------------------- precomputed reference log-probs

def _fingerprint(splits: dict[str, Sequence[Sequence[Any]]], model_id: str) -> str:
    h = hashlib.sha256(model_id.encode())
    for name, rows in splits.items():
        h.update(name.encode())
        for item in (x for row in rows for x in row):
            sides = (item.chosen, item.rejected) if hasattr(item, "chosen") else (item.example, item.mismatched)
            for ex in sides:
                h.update(json.dumps([ex.input_ids, ex.targets]).encode())
    return h.hexdigest()


@torch.no_grad()
def _logps_of(model: torch.nn.Module, rows: Sequence[Sequence[Any]], collate_fn: Callable, pad_id: int,
              batch_size: int, autocast: Any, flat: bool) -> list[tuple[float, float]]:
    def run(start: int, stop: int) -> list[tuple[float, float]]:
        with autocast, speed.varlen_attention(model) if flat else contextlib.nullcontext():
            first, second = batch_logps(model, collate_fn(rows[start:stop], pad_id))[0].chunk(2)
        return list(zip(first.tolist(), second.tolist()))

    return [pair for part in in_batches(len(rows), batch_size, run, "reference log-probs") for pair in part]


def precompute_reference(model: torch.nn.Module, splits: dict[str, Sequence[Sequence[Any]]], collate_fn: Callable,
                         pad_id: int, cache: Path, model_id: str, batch_size: int = 8,
                         autocast: Any = None, flat: bool = False) -> tuple[dict[str, list[list[Any]]], bool]:
    """Every item of every split with `ref` filled by `model`'s log-probs; returns (splits, reused cache).

    `model` must be the starting policy, before any method changes it. The values are cached in `cache`
    (JSON) under a fingerprint of the token ids and `model_id`, so a resumed run reuses them and a run
    whose data or model changed recomputes them. `flat`: `collate_fn` makes flat batches, scored in
    variable-length attention (the layout training takes, so the first step's policy matches them)."""
    key = _fingerprint(splits, model_id)
    cached = json.loads(cache.read_text()) if cache.is_file() else None
    reused = cached is not None and cached.get("fingerprint") == key
    if not reused:
        with evaluating(model):
            values = {name: _logps_of(model, rows, collate_fn, pad_id, batch_size, autocast or contextlib.nullcontext(),
                                      flat)
                      for name, rows in splits.items()}
        tmp = cache.with_suffix(".partial")
        tmp.write_text(json.dumps({"fingerprint": key, "model": model_id, "logps": values}))
        tmp.replace(cache)
    else:
        values = cached["logps"]
    out = {}
    for name, rows in splits.items():
        it = iter(values[name])
        out[name] = [[replace(item, ref=tuple(next(it))) for item in row] for row in rows]
    return out, reused
