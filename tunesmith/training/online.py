"""`train_online()`: the one online-RL loop behind `recipe: ppo` and `recipe: grpo`.

Each step, in order:
1. draw `prompts_per_step` prompts from the seeded, epoch-shuffled stream (as `fit()` draws micro-batches);
2. sample `samples_per_prompt` responses each with the generation engine, seeded by (seed, step);
3. score them with the reward sources (minus the penalty for responses cut off without ending their turn);
4. one no-grad pass: the rollout policy's token log-probs, values and entropy, and the reference's
   log-probs when there is a KL term;
5. advantages: GAE on per-token rewards (PPO), or one per response from the group's scores (GRPO, RLOO,
   REINFORCE with a baseline), broadcast over its tokens;
6. `epochs` passes over the rollout in `minibatches` optimiser steps: clipped surrogate, plus the clipped
   value loss, the KL term in the loss (GRPO) and the entropy bonus, averaged per token or per response.

Everything random is a pure function of (seed, step), and a checkpoint stores the optimiser, schedule and
KL coefficient, so a resumed run repeats exactly the steps an uninterrupted run would have taken.

Data parallel (`_core.dist`), process r samples and scores prompts r, r + N, ... of each round and runs
micro-batches r, r + N, ... of each pass; every process gets the whole rollout and its tensors, and the
summed gradients, so advantages, statistics and updates are the same in every process.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch

from tunesmith._core import dist
from tunesmith._core.batches import in_batches
from tunesmith._core.errors import TunesmithError
from tunesmith._core.rundir import RunDir, write_jsonl_atomic
from tunesmith.data.render import end_of_turn_ids, render_prompt
from tunesmith.losses.cross_entropy import chunk_rows
from tunesmith.losses.logprobs import linear_token_logprobs
from tunesmith.losses.rl import (aggregate_sum, aggregate_weight, clipped_surrogate, clipped_value_loss,
                                 entropy_from_logits, kl_estimate, masked_mean, token_logprobs)
from tunesmith.models import speed
from tunesmith.models.generate import generate
from tunesmith.rl.advantages import (KLController, gae, group_advantages, reinforce_baseline, rloo, token_rewards,
                                     whiten)
from tunesmith.rl.rollout import Rollout, build_rollout, group_diversity, sample_rows
from tunesmith.training.checkpoint import list_checkpoints, load_checkpoint, processes_state, save_checkpoint
from tunesmith.training.loop import micro_batch
from tunesmith.training.optim import build_optimizer, build_scheduler, param_groups
from tunesmith.training.precision import (AUTOCAST, LossScaling, RunPrecision, precision_autocast,
                                          training_precision)
from tunesmith.training.preference import Reference, narrowed_copy
from tunesmith.training.sinks import MetricSinks
from tunesmith.training.speed import SpeedPlan, applied, before_forward, plan_speed, settle_attention, until_it_fits

# (items, completions) -> (total scores, {source: scores})
Scorer = Callable[[Sequence[Any], Sequence[str]], tuple[list[float], dict[str, list[float]]]]


class ValueHead(torch.nn.Module):
    """V(s_t): a linear map of the policy's last hidden state, zero-initialised (every value starts at 0).
    It reads the hidden state detached, so it is a probe on the policy's features, trained by the value
    loss alone."""

    def __init__(self, hidden_size: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1, dtype=dtype)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1).float()


class ValueModel(torch.nn.Module):
    """V(s_t) from a model of its own (`rl.value_model`, TRL's PPO critic): a reward model's body with a LoRA
    adapter and its scalar head (`models.reward.critic_from_reward_model`), plus a trained offset, reading
    each rollout row in a padded forward apart from the policy's. Its values start as the reward model's
    score of every prefix, a better first guess of the return than a probe starting at 0, and its features
    are its own to learn, where a probe only reads the policy's."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.offset = torch.nn.Parameter(torch.zeros((), device=next(model.parameters()).device))

    def _base(self) -> torch.nn.Module:  # the sequence classifier inside PEFT's wrapper
        return self.model.get_base_model()

    def forward(self, ro: Rollout, rows: torch.Tensor) -> torch.Tensor:
        """(n, R) values before each response token of the rows, 0 where the mask is 0."""
        base = self._base()
        device = self.offset.device
        row, col = ro.response_tokens(rows)
        inputs = {k: v.to(device, non_blocking=True) for k, v in ro.rows(rows).items()}
        hidden = base.model(**inputs, use_cache=False).last_hidden_state
        at = (row.to(device), (col + ro.input_ids.shape[1] - ro.response_width - 1).to(device))
        values = base.score(hidden[at]).squeeze(-1).float() + self.offset
        return torch.zeros(tuple(ro.mask[rows].shape), device=device).index_put(
            (row.to(device), col.to(device)), values)

    def bytes(self) -> int:
        """What it holds on its device in training: its weights, and a gradient and AdamW's two moments for
        each trained one."""
        return sum(p.numel() * p.element_size() * (4 if p.requires_grad else 1) for p in self.parameters())

    def activation_bytes_per_token(self, dtype_bytes: int) -> int:
        """What its blocks keep for backward per token (`speed.activation_bytes_per_token` each)."""
        base = self._base()
        return len(speed.decoder_layers(base)) * speed.activation_bytes_per_token(base.config, dtype_bytes)

    @torch.no_grad()
    def rescale(self, mean: float, std: float) -> None:
        """Put the values in the units of the normalised reward, (score - mean) / std: the head's trained
        weights divided by std, the offset set to -mean / std."""
        for p in self._base().score.parameters():
            if p.requires_grad:
                p.div_(std)
        self.offset.fill_(-mean / std)


class PolicyAndValue(torch.nn.Module):
    """The trained modules together, so one optimiser and one checkpoint cover both."""

    def __init__(self, policy: torch.nn.Module, value_head: ValueHead | ValueModel | None):
        super().__init__()
        self.policy, self.value_head = policy, value_head


@dataclass
class OnlineResult:
    steps: int
    resumed_from: int | None
    last: dict[str, float]
    seconds: float


def _entropy(logits: torch.Tensor, temperature: float, grad: bool) -> torch.Tensor:
    """The entropy of each of the (1, K, V) logits' rows; as a value only (not `grad`), a chunk of rows at a
    time, so its float32 softmax never doubles the logits' memory beside the update's activations."""
    if grad and torch.is_grad_enabled():
        return entropy_from_logits(logits, temperature)[0]
    rows = chunk_rows(logits.size(-1))
    with torch.no_grad():
        return torch.cat([entropy_from_logits(logits[:, s:s + rows], temperature)[0]
                          for s in range(0, logits.size(1), rows)])


def response_forward(model: torch.nn.Module, ro: Rollout, rows: Any, temperature: float,
                     value_head: ValueHead | None = None, entropy: bool = False, *, flat: bool = False,
                     chunked: bool = False, entropy_grad: bool = True, share: bool = False) -> dict[str, torch.Tensor]:
    """{"logps": (n, R)} of the rows' response tokens under softmax(logits / temperature), plus "values"
    (n, R) V(s_t) before each response token when a value head is given, and "entropy" (n, R) if asked
    (with no gradient where `entropy_grad` is False: a metric); 0 where the mask is 0.

    `flat` runs the rows end to end with no padding (the model in `speed.varlen_attention`), with `share`
    each prompt laid out once for all its samples (`Rollout.flat`); `chunked`
    takes the log-probs and entropies from the final hidden states a chunk of tokens at a time, so the
    logits are never held whole. Only response positions reach the output layer. A model whose head is
    more than a linear map (`speed.lm_parts` is None) gets its logits from its own forward."""
    device = next(model.parameters()).device
    row, col = ro.response_tokens(rows)  # on the host: no wait for the device
    targets = ro.response[rows][row, col].to(device, non_blocking=True)
    if flat:
        batch = ro.flat(rows, share)
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        at = (torch.zeros_like(batch["predict"]), batch["predict"])
    else:
        inputs = ro.rows(rows)
        at = (row, col + ro.input_ids.shape[1] - ro.response_width - 1)
    inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    if flat:
        inputs.update(speed.flat_kwargs(batch, device))
    at = tuple(i.to(device, non_blocking=True) for i in at)
    where = (row.to(device, non_blocking=True), col.to(device, non_blocking=True))
    parts = speed.lm_parts(model)
    if parts is not None:
        decoder, head = parts
        hidden = decoder(**inputs, use_cache=False).last_hidden_state[at]  # (K, d)
        if chunked:
            logps, ent = linear_token_logprobs(hidden, head.weight, targets, temperature, entropy,
                                               entropy_grad=entropy_grad)
        else:
            logits = head(hidden)[None]
            logps = token_logprobs(logits, targets[None], temperature)[0]
            ent = _entropy(logits, temperature, entropy_grad) if entropy else None
    else:
        # flat: the predicting positions themselves (increasing); padded: the last R + 1 of each row
        keep = at[1] if flat else ro.response_width + 1
        out = model(**inputs, use_cache=False, output_hidden_states=value_head is not None, logits_to_keep=keep)
        logits = (out.logits[0] if flat else out.logits[where])[None]
        logps = token_logprobs(logits, targets[None], temperature)[0]
        ent = _entropy(logits, temperature, entropy_grad) if entropy else None
        if value_head is not None:
            hidden = out.hidden_states[-1][at]
    shape = tuple(ro.mask[rows].shape)

    def spread(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(shape, dtype=values.dtype, device=device).index_put(where, values)

    result = {"logps": spread(logps)}
    if value_head is not None:
        # Detached: the value loss trains the head alone and never reaches the policy's weights, so a
        # reward on a large scale (a reward model's raw scores) cannot wreck the policy through its critic.
        result["values"] = spread(value_head(hidden.detach()))
    if entropy:
        result["entropy"] = spread(ent)
    return result


def _chunks(index: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [index[i:i + size] for i in range(0, len(index), size)]


def _step_seed(seed: int, step: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + step * 7_919 + salt) % (2 ** 63)


class _Response(NamedTuple):
    """A sampled response with what it was sampled for and what it scored."""
    item: Any
    prompt_ids: list[int]
    generation: Any
    score: float
    parts: dict[str, float]  # the score of each reward source


class _Rounds:
    """One step's prompts, responses and rewards. A round takes the next `rollout.prompts_per_step` prompts of
    the seeded, epoch-shuffled order (the batches fit() draws, over prompt indices: `cursor` counts the
    batches taken so far), samples each `samples_per_prompt` times and scores the responses. Without
    `rollout.filter_groups` a step is one round. With it (DAPO's dynamic sampling), a prompt whose samples
    all scored the same (a group advantage of 0 everywhere: nothing to learn) is set aside, and rounds go on
    until `prompts_per_step` prompts scored differently, or `max_rounds` rounds were taken; a batch still
    short of them is topped up with the set-aside prompts, so every step trains as many responses."""

    def __init__(self, model: Any, tokenizer: Any, items: list, prompt_ids: list[list[int]], ro_cfg: Any,
                 stop_ids: list[int], scorer: Callable, generating: Any, kernels: bool, penalty: float):
        self.model, self.tokenizer, self.items, self.prompt_ids = model, tokenizer, items, prompt_ids
        self.cfg, self.stop_ids, self.scorer, self.generating = ro_cfg, stop_ids, scorer, generating
        self.kernels, self.penalty = kernels, penalty
        self.gen_seconds = 0.0  # generation alone, summed over the rounds

    def _round(self, picked: list[int], seed: int) -> list[list[_Response]]:
        """The prompts `picked`, each as its group of sampled responses. Data parallel, process r samples and
        scores prompts r, r + N, ... of them, and every process gets every group."""
        group = self.cfg.samples_per_prompt
        mine = dist.share(picked)
        rep_items = [self.items[i] for i in mine for _ in range(group)]
        rep_ids = [self.prompt_ids[i] for i in mine for _ in range(group)]
        t0 = time.perf_counter()
        gens: list = []
        if rep_ids:
            with self.generating:
                gens = generate(self.model, self.tokenizer, rep_ids, stop_ids=self.stop_ids,
                                max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                                top_p=self.cfg.top_p, top_k=self.cfg.top_k, seed=seed,
                                batch_size=self.cfg.batch_size, kernels=self.kernels)
        self.gen_seconds += time.perf_counter() - t0
        scores, parts = self.scorer(rep_items, [g.text for g in gens]) if gens else ([], {})
        sampled = [(gen, score, {k: v[j] for k, v in parts.items()})
                   for j, (gen, score) in enumerate(zip(gens, scores))]
        sampled = dist.gather_shares(sampled, len(picked), group)
        rows = [_Response(self.items[i], self.prompt_ids[i], *sampled[j * group + s])
                for j, i in enumerate(picked) for s in range(group)]
        return [rows[k:k + group] for k in range(0, len(rows), group)]

    def varies(self, group: Sequence[_Response]) -> bool:
        """Whether the group's samples scored differently (the missing end-of-turn penalty included)."""
        judged = [r.score - self.penalty * (not r.generation.finished) for r in group]
        return max(judged) - min(judged) > 1e-6

    def step(self, cursor: int, seed: int, step: int) -> tuple[list[_Response], int, int]:
        """(the step's responses, group by group; the cursor after it; the rounds taken)."""
        wanted = self.cfg.prompts_per_step
        kept: list[list[_Response]] = []
        spare: list[list[_Response]] = []
        rounds = 0
        while True:
            picked = micro_batch(range(len(self.items)), cursor, wanted, seed)
            groups = self._round(picked, _step_seed(seed, step, salt=1 + rounds) if rounds else _step_seed(seed, step))
            cursor, rounds = cursor + 1, rounds + 1
            if not self.cfg.filter_groups:
                kept = groups
                break
            for group in groups:
                (kept if self.varies(group) else spare).append(group)
            if len(kept) >= wanted or rounds == self.cfg.max_rounds:
                kept = kept[:wanted] + spare[:max(0, wanted - len(kept))]
                break
        return [row for group in kept for row in group], cursor, rounds


@dataclass
class _Passes:
    """The forward passes over one step's rollout, a micro-batch of rows at a time, through the speed plan:
    flat rows and chunked log-probs when it says so, and the blocks to checkpoint set per micro-batch."""
    policy: torch.nn.Module
    value_head: ValueHead | ValueModel | None
    ro: Rollout
    plan: SpeedPlan
    autocast: Any
    temperature: float
    micro: int
    scaling: LossScaling
    share: bool = False  # flat rows lay each prompt out once for all its samples
    budget: int | None = None  # rollout.max_new_tokens, which rl.loss_aggregation constant divides by

    def forward(self, model: torch.nn.Module, rows: torch.Tensor, values: bool = True,
                entropy: bool = False, entropy_grad: bool = True) -> dict[str, torch.Tensor]:
        ro = self.ro
        tokens = ro.flat(rows, self.share)["n_tokens"] if self.plan.varlen else rows.numel() * ro.input_ids.shape[1]
        before_forward(self.policy, self.plan, tokens)
        head = self.value_head if values and isinstance(self.value_head, ValueHead) else None
        with self.autocast:
            out = response_forward(model, self.ro, rows, self.temperature, head, entropy, flat=self.plan.varlen,
                                   chunked=self.plan.chunked_loss, entropy_grad=entropy_grad, share=self.share)
            if values and isinstance(self.value_head, ValueModel):  # outside the speed plan: padded rows
                out["values"] = self.value_head(ro, rows)
        return out

    @torch.no_grad()
    def score(self, reference: Reference | None,
              policy: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The rollout policy's log-probs, values and entropy (unless `policy` is False: {}), and the
        reference's log-probs (n, R). Data parallel, process r scores micro-batches r, r + N, ... of the
        rows, and sums over the processes (zeros elsewhere) give every process the whole tensors."""
        def run_rows(rows: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
            got = self.forward(self.policy, rows, entropy=True) if policy else {}
            ref = None if reference is None else reference.run(
                self.policy, lambda m: self.forward(m, rows, values=False)["logps"], flat=self.plan.varlen)
            return got, ref

        n = self.ro.input_ids.shape[0]
        if dist.world_size() == 1:
            parts = in_batches(n, self.micro, lambda a, b: run_rows(torch.arange(a, b)), "scoring the rollout")
            old = {k: torch.cat([got[k] for got, _ in parts]) for k in parts[0][0]} if parts else {}
            return old, (torch.cat([ref for _, ref in parts]) if reference is not None else None)
        mine = dist.share(_chunks(torch.arange(n), self.micro))
        local = torch.cat(mine) if mine else torch.zeros(0, dtype=torch.long)
        parts = in_batches(len(local), self.micro, lambda a, b: run_rows(local[a:b]), "scoring the rollout")
        device = next(self.policy.parameters()).device
        keys = (["logps", "entropy"] + (["values"] if self.value_head is not None else [])) if policy else []
        keys += ["ref"] if reference is not None else []
        whole = {}
        for k in keys:
            whole[k] = torch.zeros(tuple(self.ro.mask.shape), device=device)
            pieces = [ref if k == "ref" else got[k] for got, ref in parts]
            if pieces:
                whole[k].index_copy_(0, local.to(device), torch.cat(pieces).float())
            dist.sum_(whole[k])
        return whole, whole.pop("ref", None)


def _advantages(rl: Any, scores: torch.Tensor, mask: torch.Tensor, old_values: torch.Tensor | None,
                kl_tok: torch.Tensor | None, beta: float, group: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(advantages (n, R), returns (n, R) or None): GAE on per-token rewards with a critic, else one
    advantage per response from the group's scores, broadcast over its tokens."""
    if old_values is not None:
        rewards = token_rewards(scores, mask, kl_tok if rl.kl_in == "reward" else None, beta)
        if rl.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, old_values, mask, rl.gamma, rl.lam)
        return (whiten(advantages, mask) if rl.whiten_advantages else advantages), returns
    seq_scores = scores - beta * kl_tok.sum(1) if kl_tok is not None and rl.kl_in == "reward" else scores
    if rl.advantage == "group":
        seq_adv = group_advantages(seq_scores, group, rl.scale_by_group_std)
    elif rl.advantage == "rloo":
        seq_adv = rloo(seq_scores, group)
    else:
        seq_adv = reinforce_baseline(seq_scores)
    return seq_adv.to(mask.device)[:, None] * mask, None


_STATS = ("pg_loss", "value_loss", "kl_loss", "clip", "value_clip", "approx_kl", "tokens")


def _minibatch(passes: _Passes, rl: Any, targets: dict[str, torch.Tensor | None], mask: torch.Tensor, beta: float,
               mb: torch.Tensor, weight: float, stats: dict[str, torch.Tensor],
               seen: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The gradients of one minibatch, a micro-batch at a time, and `stats` with its statistics added. With
    `seen` (on-policy: no rollout log-probs in `targets`), the rows' log-probs and entropy are this pass's,
    detached, and written into it. Data parallel, this process's share of the micro-batches (`weight`
    counts the whole minibatch's)."""
    stats = dict(stats)
    kl_in_loss = targets["ref_logps"] is not None and rl.kl_in == "loss"
    for rows in dist.share(_chunks(mb, passes.micro)):
        m = mask[rows]
        out = passes.forward(passes.policy, rows, entropy=rl.entropy_coef > 0 or seen is not None,
                             entropy_grad=rl.entropy_coef > 0)
        logps = out["logps"]
        if seen is not None:
            old_logps = seen["logps"][rows] = logps.detach()
            seen["entropy"][rows] = out["entropy"].detach()
        else:
            old_logps = targets["old_logps"][rows]
        pg_tok, clipped = clipped_surrogate(logps, old_logps, targets["advantages"][rows], rl.clip_eps,
                                            rl.clip_eps_high)
        loss_tok = pg_tok
        if kl_in_loss:
            kl_new = kl_estimate(logps, targets["ref_logps"][rows], rl.kl_estimator)
            loss_tok = loss_tok + beta * kl_new
            stats["kl_loss"] = stats["kl_loss"] + (kl_new.detach() * m).sum()
        if rl.entropy_coef:
            loss_tok = loss_tok - rl.entropy_coef * out["entropy"]
        total = aggregate_sum(loss_tok, m, rl.loss_aggregation)
        if passes.value_head is not None:
            v_tok, v_clipped = clipped_value_loss(out["values"], targets["old_values"][rows],
                                                  targets["returns"][rows], rl.value_clip)
            total = total + rl.value_coef * aggregate_sum(v_tok, m, rl.loss_aggregation)
            stats["value_loss"] = stats["value_loss"] + (v_tok.detach() * m).sum()
            stats["value_clip"] = stats["value_clip"] + (v_clipped.float() * m).sum()
        passes.scaling.backward(total / max(weight, 1e-8))
        for key, value in (("pg_loss", pg_tok.detach()), ("clip", clipped.float()), ("tokens", 1.0),
                           ("approx_kl", 0.5 * (logps.detach() - old_logps).pow(2))):
            stats[key] = stats[key] + (value * m).sum()
    return stats


def _update(passes: _Passes, rl: Any, targets: dict[str, torch.Tensor | None], mask: torch.Tensor,
            host_mask: torch.Tensor, beta: float, order: list[torch.Tensor], step_optimiser: Callable[[], torch.Tensor],
            fits: Callable[[Callable[[], Any]], Any],
            seen: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """One optimiser step per minibatch of rows in `order`: the clipped surrogate, plus the KL term in the
    loss, the entropy bonus and the clipped value loss, aggregated per token or per response, over the
    tokens `mask` trains (`host_mask`: the host's copy). Returns the
    statistics summed over the passes and each step's gradient norm, left on the device (read once, after
    the update). A minibatch that runs out of GPU memory runs again through `fits` (`until_it_fits`: gradients
    dropped, more blocks checkpointed); its statistics are counted once."""
    stats = dict.fromkeys(_STATS, torch.zeros((), device=mask.device))
    grad_norms = []
    for mb in order:
        # the host's copy: no wait; `constant` divides by the generation budget
        weight = aggregate_weight(host_mask[mb], rl.loss_aggregation, passes.budget)
        stats = fits(lambda: _minibatch(passes, rl, targets, mask, beta, mb, weight, stats, seen))
        grad_norms.append(step_optimiser())
    if dist.world_size() > 1:  # each process's share summed: the statistics and seen log-probs of every row
        summed = dist.sum_(torch.stack([stats[k].float() for k in _STATS]))
        stats = {k: summed[i] for i, k in enumerate(_STATS)}
        for value in (seen or {}).values():
            dist.sum_(value)
    return stats, grad_norms


class RolloutCopy:
    """The policy with its float32 weights in `dtype`, for generating rollouts: a decode step reads every
    weight once per token, so a float32 policy (`full`, or `freeze` on a float32 body) decodes at half
    the speed of a 16-bit one, in float32 arithmetic its training passes never use (they autocast). The
    copy is refreshed from the policy before each rollout, so it always samples from the current weights
    (the frozen ones never change and are copied once). Its own log-probs are never trained on: the
    training passes recompute them from the policy."""

    def __init__(self, policy: torch.nn.Module, dtype: torch.dtype):
        self.model = narrowed_copy(policy, dtype, {id(p) for p in policy.parameters() if p.dtype == torch.float32})
        self.pairs = [(c, p) for c, p in zip(self.model.parameters(), policy.parameters()) if p.requires_grad]
        self.bytes = sum(c.numel() * c.element_size() for c in self.model.parameters())
        self.dtype = dtype

    @torch.no_grad()
    def refresh(self) -> torch.nn.Module:
        """The copy, with the policy's trainable weights as they are now."""
        for c, p in self.pairs:
            c.copy_(p)
        return self.model


def rollout_copy_dtype(policy: torch.nn.Module, autocast: torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """The dtype rollouts generate in from a `RolloutCopy`: training's 16-bit autocast dtype on CUDA when most
    of the policy's weights are float32 and a copy takes at most a quarter of the GPU's free memory; None
    (generate from the policy itself) otherwise: an adapter method's base, `freeze` under `model.dtype:
    auto`, is 16-bit already, and a CPU decodes 16 bits no faster."""
    if device.type != "cuda" or autocast is None:
        return None
    params = list(policy.parameters())
    n = sum(p.numel() for p in params)
    wide = sum(p.numel() for p in params if p.dtype == torch.float32)
    fits = 2 * n <= torch.cuda.mem_get_info(device)[0] / 4
    return autocast if 2 * wide > n and fits else None


def _wait(device: torch.device) -> None:
    """Let the device finish what is queued, so a host clock reads the time the work took."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_online(policy: torch.nn.Module, tokenizer: Any, items: Sequence[Any], scorer: Scorer, cfg: Any,
                 run: RunDir, *, reference: Reference | None, resume: bool = False,
                 on_step: Callable[[int, dict[str, Any]], None] | None = None,
                 value_model: torch.nn.Module | None = None) -> OnlineResult:
    """Train `policy` (method already applied) in place on `items` (PromptItems) with `cfg` (an online
    recipe config: rollout, reward, rl, train, seed). Writes metrics, samples and checkpoints into `run`.
    `value_model` (`models.reward.critic_from_reward_model`, for `rl.value_model`) is the critic, trained
    alongside; without it GAE's critic is a value head on the policy."""
    with training_precision(cfg.train, policy) as precision:
        return _train_online(policy, tokenizer, items, scorer, cfg.model_copy(update={"train": precision.cfg}),
                             run, reference=reference, resume=resume, on_step=on_step, precision=precision,
                             value_model=value_model)


def _on_policy(rl: Any, kl_on: bool) -> bool:
    """Whether the update starts from the weights that sampled the rollout and none of its inputs needs the
    rollout policy's log-probs beforehand: one optimiser step a rollout (`rl.epochs` and `rl.minibatches`
    1, GRPO's defaults), no critic (its values and GAE come first) and no KL in the reward (it enters the
    advantages). Then those log-probs are the update's own, detached: the ratio is exactly 1, and the
    no-gradient pass over the rollout that computed them apart is skipped (one of the step's three forwards
    over it, with the reference's and the update's, whose backward costs about two more)."""
    return (rl.epochs == 1 and rl.minibatches == 1 and rl.advantage != "gae"
            and not (kl_on and rl.kl_in == "reward"))


def _train_online(policy: torch.nn.Module, tokenizer: Any, items: Sequence[Any], scorer: Scorer, cfg: Any,
                  run: RunDir, *, reference: Reference | None, resume: bool,
                  on_step: Callable[[int, dict[str, Any]], None] | None, precision: RunPrecision,
                  value_model: torch.nn.Module | None = None) -> OnlineResult:
    ro_cfg, rl, tcfg = cfg.rollout, cfg.rl, cfg.train
    device = next(policy.parameters()).device
    use_values = rl.advantage == "gae"
    assert use_values or value_model is None, "a value model is GAE's critic"
    kl_on = reference is not None
    on_policy = _on_policy(rl, kl_on)
    value_head: ValueHead | ValueModel | None = None
    if use_values:
        value_head = (ValueModel(value_model) if value_model is not None
                      else ValueHead(policy.config.hidden_size).to(device))
    trained = PolicyAndValue(policy, value_head)
    optimizer = build_optimizer(policy, tcfg, cfg.seed)
    value_params = [p for p in value_head.parameters() if p.requires_grad] if value_head is not None else []
    if value_params:  # its own learning rate (a zero-initialised probe has far to go), no decay; LoRA+ on a
        # critic's adapter as on the policy's: its B matrices at that rate times train.lora_plus_ratio
        critic = tcfg.model_copy(update={"lr": rl.value_lr or tcfg.lr, "weight_decay": 0.0})
        for group in param_groups(value_head, critic):
            optimizer.add_param_group(group)
    policy_params = [p for p in policy.parameters() if p.requires_grad]
    n_steps = cfg.total_steps(len(items))
    updates_per_step = rl.epochs * rl.minibatches
    scheduler = build_scheduler(optimizer, tcfg, n_steps * updates_per_step)
    scaling = LossScaling(tcfg, device)
    kl_ctl = KLController(rl.kl_coef, rl.kl_target, rl.kl_horizon)
    stop_ids = end_of_turn_ids(tokenizer)
    prompt_ids = [render_prompt(tokenizer, item.prompt) for item in items]
    G = ro_cfg.samples_per_prompt
    autocast = precision_autocast(tcfg, device)
    generating = precision.mixed(device)  # rollouts from a model with float32 master weights in it
    # The log-prob and update passes run through the speed plan (flat rows in variable-length attention,
    # chunked log-probs, fused LoRA layers, checkpointing); generation runs outside it, on the model as it is
    # but for the fused LoRA layers, which it takes where the plan does.
    plan = plan_speed(policy, tcfg, device, language_model=True, shared_prefixes=G > 1)
    settle_attention(policy, plan, tcfg, packed=False)  # a rollout's rows hold one sequence each
    # flat rows lay a group's prompt out once, where the attention kernel serves keys longer than queries
    share_prompts = plan.varlen and speed.shares_prefixes(device)
    copy_dtype = rollout_copy_dtype(policy, AUTOCAST.get(tcfg.precision), device)
    rollout_copy = RolloutCopy(policy, copy_dtype) if copy_dtype is not None else None
    if rollout_copy is not None and plan.budget is not None:
        plan.budget.fixed += rollout_copy.bytes  # memory the activations cannot have
    if isinstance(value_head, ValueModel) and plan.budget is not None:
        # nor the critic's state, nor its activations: they wait for backward beside the policy's, never
        # checkpointed
        plan.budget.fixed += value_head.bytes()
        plan.budget.loss_per_token += value_head.activation_bytes_per_token(plan.budget.dtype_bytes)

    used_lr: list[float] = []  # the learning rate of the last update

    def step_optimiser() -> torch.Tensor:
        used_lr[:] = scheduler.get_last_lr()[:1]
        # Clipped apart: a large value loss must not shrink the policy's step through a shared norm.
        max_norm = tcfg.max_grad_norm or math.inf
        dist.reduce_gradients(policy_params + value_params)  # data parallel: summed over the processes
        scaling.unscale(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(policy_params, max_norm)
        if value_params:
            torch.nn.utils.clip_grad_norm_(value_params, max_norm)
        scaling.step(optimizer, scheduler)
        optimizer.zero_grad(set_to_none=True)
        return norm

    if dist.world_size() > 1:  # every process starts from process 0's trainable weights; each its own dropout
        dist.broadcast_(policy_params + value_params)
        if dist.rank():
            torch.manual_seed(_step_seed(cfg.seed, 0, salt=dist.rank()))
    start, resumed_from = 0, None
    reward_norm = None  # (mean, std) of the first rollout's scores when reward.normalize
    cursor = 0  # prompt batches of the order taken so far (one a step, unless rollout.filter_groups)
    if resume and (ckpts := list_checkpoints(run.checkpoints)):
        state = load_checkpoint(ckpts[-1], trained, optimizer, scheduler, scaling)
        if state["total_steps"] != n_steps:
            raise TunesmithError(f"cannot resume from {ckpts[-1]}: it was planned for {state['total_steps']} "
                                 f"steps, this config plans {n_steps} (data or settings changed)")
        kl_ctl.load_state_dict(state["kl_controller"])
        reward_norm = state.get("reward_norm")
        start = resumed_from = state["step"]
        cursor = state.get("prompt_cursor", start)
        run.event("resumed", f"resumed from {ckpts[-1].name}", step=start)
    elif resume:
        run.event("resumed", "no complete checkpoint yet: starting from step 0", step=0)
    run.truncate_metrics(start)

    sinks = MetricSinks(run, tcfg, total=n_steps, initial=start)
    trained.train()
    record: dict[str, Any] = {}
    t_start = time.perf_counter()
    try:
        run.event("speed", plan.describe(), step=start)
        precision.report(run, start, optimizer)
        if rollout_copy is not None:
            name = str(rollout_copy.dtype).removeprefix("torch.")
            run.event("rollout", f"rollouts generate from a {name} copy of the policy "
                      f"({rollout_copy.bytes / 2**30:.2f} GiB), refreshed before each rollout", step=start)
        for step in range(start, n_steps):
            done = step + 1
            t0 = time.perf_counter()
            # 1-3. prompts, responses and their rewards
            sampling = policy if rollout_copy is None else rollout_copy.refresh()
            sampled = _Rounds(sampling, tokenizer, items, prompt_ids, ro_cfg, stop_ids, scorer, generating,
                              plan.fused, cfg.reward.missing_eos_penalty)
            batch, cursor, rounds = sampled.step(cursor, cfg.seed, step)
            rep_items, rep_ids = [r.item for r in batch], [r.prompt_ids for r in batch]
            gens = [r.generation for r in batch]
            scores_list, parts = [r.score for r in batch], {k: [r.parts[k] for r in batch] for k in batch[0].parts}
            gen_seconds = sampled.gen_seconds
            ro = build_rollout(rep_ids, gens, tokenizer.pad_token_id)
            n, mask = len(gens), ro.mask.to(device)
            truncated = torch.tensor([not f for f in ro.finished], device=device)
            raw = torch.tensor(scores_list, device=device, dtype=torch.float32)
            scores = raw
            if cfg.reward.normalize:
                if reward_norm is None:  # fixed from the starting policy's samples (Ziegler et al. 2019)
                    std = float(raw.std()) if n > 1 else 0.0
                    reward_norm = (float(raw.mean()), std if std > 1e-6 else 1.0)
                    if isinstance(value_head, ValueModel):  # a reward model's scores, put on the same scale
                        value_head.rescale(*reward_norm)
                scores = (raw - reward_norm[0]) / reward_norm[1]
            scores = scores - cfg.reward.missing_eos_penalty * truncated.float()
            # the tokens the update trains: with rl.mask_truncated, none of a response the token budget cut off
            # (DAPO's overlong filtering; its score still counts in its group's statistics)
            host_trained = ro.mask * torch.tensor(ro.finished)[:, None] if rl.mask_truncated else ro.mask
            trained_mask = host_trained.to(device) if rl.mask_truncated else mask
            beta = kl_ctl.coef if kl_on else 0.0
            perm_gen = torch.Generator().manual_seed(_step_seed(cfg.seed, step, salt=1))
            order = [mb for _ in range(rl.epochs) for mb in torch.randperm(n, generator=perm_gen).chunk(rl.minibatches)]
            with applied(policy, plan):
                # 4. the reference's log-probs; the rollout policy's log-probs, values and entropy, unless
                # the update's forwards give them (`_on_policy`)
                passes = _Passes(policy, value_head, ro, plan, autocast, ro_cfg.temperature, tcfg.micro_batch_size,
                                 scaling, share=share_prompts, budget=ro_cfg.max_new_tokens)
                t1 = time.perf_counter()
                old, ref_logps = passes.score(reference, policy=not on_policy)
                old_logps = old.get("logps")
                old_values = old["values"] * mask if use_values else None
                kl_tok = None if old_logps is None or not kl_on else kl_estimate(old_logps, ref_logps,
                                                                                 rl.kl_estimator) * mask
                # 5. advantages
                advantages, returns = _advantages(rl, scores, trained_mask, old_values, kl_tok, beta, G)
                _wait(device)
                t2 = time.perf_counter()
                # 6. the update
                targets = {"old_logps": old_logps, "ref_logps": ref_logps, "old_values": old_values,
                           "returns": returns, "advantages": advantages}
                seen = {k: torch.zeros(mask.shape, device=device) for k in ("logps", "entropy")} if on_policy else None
                fits = functools.partial(until_it_fits, model=policy, plan=plan, step=done, optimizer=optimizer,
                                         run=run)
                stats, grad_norms = _update(passes, rl, targets, trained_mask, host_trained, beta, order,
                                            step_optimiser, fits, seen)
                old = old if seen is None else seen  # on-policy: filled by the update's forwards
                old_logps = old["logps"]
            stats = {k: float(v) for k, v in stats.items()}  # the one wait for the update
            norms = [float(v) for v in grad_norms]
            t3 = time.perf_counter()
            # metrics, samples, checkpoint
            # the KL per response, k1 summed over its tokens (unbiased whatever estimator the loss uses)
            seq_kl = float((old_logps - ref_logps).mul(mask).sum(1).mean()) if kl_on else 0.0
            if kl_on:
                kl_ctl.update(seq_kl, n)
            tok = max(stats["tokens"], 1.0)
            lengths = mask.sum(1)
            new_tokens = sum(len(g.token_ids) + (g.stop_id is not None) for g in gens)
            record = {"step": done, "loss": (stats["pg_loss"] + rl.value_coef * stats["value_loss"]) / tok,
                      "lr": used_lr[-1], "grad_norm": sum(norms) / len(norms),
                      "reward": float(scores.mean()), "reward_std": float(scores.std()) if n > 1 else 0.0,
                      **({"reward_raw": float(raw.mean())} if cfg.reward.normalize else {}),
                      **{f"reward/{k}": sum(v) / n for k, v in parts.items()},
                      "kl": seq_kl, "kl_coef": beta, "entropy": float(masked_mean(old["entropy"], mask)),
                      "response_length": float(lengths.mean()), "truncated": float(truncated.float().mean()),
                      "diversity": group_diversity(gens, G), "pg_loss": stats["pg_loss"] / tok,
                      "clip_fraction": stats["clip"] / tok, "approx_kl": stats["approx_kl"] / tok,
                      "gen_tokens_per_s": new_tokens / max(gen_seconds, 1e-9), "gen_seconds": gen_seconds,
                      "logprob_seconds": t2 - t1, "update_seconds": t3 - t2,
                      "step_seconds": time.perf_counter() - t0, "elapsed_s": time.perf_counter() - t_start}
            if G > 1:  # the share of prompts whose samples scored differently: the ones a group baseline learns from
                record["varied_groups"] = sum(sampled.varies(batch[k:k + G]) for k in range(0, n, G)) / (n // G)
            if ro_cfg.filter_groups:
                record["sampling_rounds"] = rounds
            if kl_on and rl.kl_in == "loss":
                record["kl_loss"] = stats["kl_loss"] / tok
            if use_values:
                record["value_loss"] = stats["value_loss"] / tok
                record["value_clip_fraction"] = stats["value_clip"] / tok
                record["explained_variance"] = _explained_variance(old_values, returns, mask)
            if (scale := scaling.scale()) is not None:  # after the step's updates
                record["loss_scale"] = float(scale)
            sinks.step(record, log=done % tcfg.log_every == 0 or done == n_steps)
            for norm in norms:  # after the record is written: it shows an overflow
                scaling.read(norm, done)
            if (done % cfg.sample_every == 0 or done == n_steps) and dist.is_main():
                (run.root / "samples").mkdir(exist_ok=True)
                write_jsonl_atomic(run.root / "samples" / f"step-{done}.jsonl", sample_rows(rep_items, gens, scores.tolist()))
            if tcfg.save_every and (done % tcfg.save_every == 0 or done == n_steps):
                path = save_checkpoint(run.checkpoints, done, trained, optimizer, scheduler,
                                       {"total_steps": n_steps, "kl_controller": kl_ctl.state_dict(),
                                        "reward_norm": reward_norm, "prompt_cursor": cursor,
                                        **processes_state(optimizer)}, tcfg.keep_last, scaling.state_dict())
                run.event("checkpoint", f"saved {path.name}", step=done)
            run.set_status("running", step=done, total_steps=n_steps)
            if on_step is not None:
                on_step(done, record)
    finally:
        sinks.close()
    return OnlineResult(n_steps, resumed_from, record, time.perf_counter() - t_start)


def _explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over response tokens: 1 is a perfect critic, <= 0 a useless one."""
    var_r = float(masked_mean((returns - masked_mean(returns, mask)).pow(2), mask))
    diff = returns - values
    var_d = float(masked_mean((diff - masked_mean(diff, mask)).pow(2), mask))
    return 1.0 - var_d / var_r if var_r > 0 else 0.0

