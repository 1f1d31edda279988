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
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from tunesmith._core.errors import TunesmithError
from tunesmith._core.rundir import RunDir
from tunesmith.data.render import end_of_turn_ids, render_prompt
from tunesmith.losses.rl import (aggregate_sum, aggregate_weight, clipped_surrogate, clipped_value_loss,
                                 entropy_from_logits, kl_estimate, masked_mean, token_logprobs)
from tunesmith.models.generate import generate
from tunesmith.rl.advantages import (KLController, gae, group_advantages, reinforce_baseline, rloo, token_rewards,
                                     whiten)
from tunesmith.rl.rollout import Rollout, build_rollout, group_diversity, sample_rows
from tunesmith.training.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from tunesmith.training.loop import micro_batch, precision_autocast
from tunesmith.training.optim import build_optimizer, build_scheduler
from tunesmith.training.preference import Reference
from tunesmith.training.sinks import MetricSinks
from tunesmith.training.speed import applied, before_forward, plan_speed

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


class PolicyAndValue(torch.nn.Module):
    """The trained modules together, so one optimiser and one checkpoint cover both."""

    def __init__(self, policy: torch.nn.Module, value_head: ValueHead | None):
        super().__init__()
        self.policy, self.value_head = policy, value_head


@dataclass
class OnlineResult:
    steps: int
    resumed_from: int | None
    last: dict[str, float]
    seconds: float


def response_forward(model: torch.nn.Module, ro: Rollout, rows: Any, temperature: float,
                     value_head: ValueHead | None = None, entropy: bool = False) -> dict[str, torch.Tensor]:
    """{"logps": (n, R)} of the rows' response tokens under softmax(logits / temperature), plus "values"
    (n, R) V(s_t) before each response token when a value head is given, and "entropy" (n, R) if asked."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in ro.rows(rows).items()}
    width = ro.response_width
    out = model(**inputs, use_cache=False, output_hidden_states=value_head is not None, logits_to_keep=width + 1)
    logits = out.logits[:, :-1]  # the positions that predict response tokens 0 .. R-1
    result = {"logps": token_logprobs(logits, ro.response[rows].to(device), temperature)}
    if value_head is not None:
        q = ro.input_ids.shape[1] - width
        # Detached: the value loss trains the head alone and never reaches the policy's weights, so a
        # reward on a large scale (a reward model's raw scores) cannot wreck the policy through its critic.
        result["values"] = value_head(out.hidden_states[-1][:, q - 1:q + width - 1].detach())
    if entropy:
        result["entropy"] = entropy_from_logits(logits, temperature)
    return result


def _chunks(index: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [index[i:i + size] for i in range(0, len(index), size)]


def _step_seed(seed: int, step: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + step * 7_919 + salt) % (2 ** 63)


def train_online(policy: torch.nn.Module, tokenizer: Any, items: Sequence[Any], scorer: Scorer, cfg: Any,
                 run: RunDir, *, reference: Reference | None, resume: bool = False,
                 on_step: Callable[[int, dict[str, Any]], None] | None = None) -> OnlineResult:
    """Train `policy` (method already applied) in place on `items` (PromptItems) with `cfg` (an online
    recipe config: rollout, reward, rl, train, seed). Writes metrics, samples and checkpoints into `run`."""
    ro_cfg, rl, tcfg = cfg.rollout, cfg.rl, cfg.train
    device = next(policy.parameters()).device
    use_values = rl.advantage == "gae"
    kl_on = reference is not None
    value_head = ValueHead(policy.config.hidden_size).to(device) if use_values else None
    trained = PolicyAndValue(policy, value_head)
    optimizer = build_optimizer(policy, tcfg)
    if value_head is not None:  # its own learning rate: a zero-initialised probe has far to go
        optimizer.add_param_group({"params": list(value_head.parameters()), "weight_decay": 0.0,
                                   "lr": rl.value_lr or tcfg.lr})
    policy_params = [p for p in policy.parameters() if p.requires_grad]
    n_steps = cfg.total_steps(len(items))
    updates_per_step = rl.epochs * rl.minibatches
    scheduler = build_scheduler(optimizer, tcfg, n_steps * updates_per_step)
    kl_ctl = KLController(rl.kl_coef, rl.kl_target, rl.kl_horizon)
    stop_ids = end_of_turn_ids(tokenizer)
    prompt_ids = [render_prompt(tokenizer, item.prompt) for item in items]
    G = ro_cfg.samples_per_prompt
    autocast = precision_autocast(tcfg, device)
    # The log-prob and update passes run padded rows through the speed plan (fused LoRA layers,
    # checkpointing); generation runs outside it, on the model as it is.
    plan = plan_speed(policy, tcfg, device, language_model=False)

    start, resumed_from = 0, None
    reward_norm = None  # (mean, std) of the first rollout's scores when reward.normalize
    if resume and (ckpts := list_checkpoints(run.checkpoints)):
        state = load_checkpoint(ckpts[-1], trained, optimizer, scheduler)
        if state["total_steps"] != n_steps:
            raise TunesmithError(f"cannot resume from {ckpts[-1]}: it was planned for {state['total_steps']} "
                                 f"steps, this config plans {n_steps} (data or settings changed)")
        kl_ctl.load_state_dict(state["kl_controller"])
        reward_norm = state.get("reward_norm")
        start = resumed_from = state["step"]
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
        for step in range(start, n_steps):
            done = step + 1
            t0 = time.perf_counter()
            # 1-2. prompts and responses
            # the same seeded epoch-shuffled order fit() draws from, over prompt indices
            picked = micro_batch(range(len(items)), step, ro_cfg.prompts_per_step, cfg.seed)
            rep_items = [items[i] for i in picked for _ in range(G)]
            rep_ids = [prompt_ids[i] for i in picked for _ in range(G)]
            gens = generate(policy, tokenizer, rep_ids, stop_ids=stop_ids, max_new_tokens=ro_cfg.max_new_tokens,
                            temperature=ro_cfg.temperature, top_p=ro_cfg.top_p, top_k=ro_cfg.top_k,
                            seed=_step_seed(cfg.seed, step), batch_size=ro_cfg.batch_size)
            gen_seconds = time.perf_counter() - t0
            ro = build_rollout(rep_ids, gens, tokenizer.pad_token_id)
            n, mask = len(gens), ro.mask.to(device)
            # 3. rewards
            scores_list, parts = scorer(rep_items, ro.texts)
            truncated = torch.tensor([not f for f in ro.finished], device=device)
            raw = torch.tensor(scores_list, device=device, dtype=torch.float32)
            scores = raw
            if cfg.reward.normalize:
                if reward_norm is None:  # fixed from the starting policy's samples (Ziegler et al. 2019)
                    std = float(raw.std()) if n > 1 else 0.0
                    reward_norm = (float(raw.mean()), std if std > 1e-6 else 1.0)
                scores = (raw - reward_norm[0]) / reward_norm[1]
            scores = scores - cfg.reward.missing_eos_penalty * truncated.float()
            with applied(policy, plan):
                # 4. the rollout policy's log-probs, values, entropy; the reference's log-probs
                old = {"logps": [], "values": [], "entropy": []}
                ref_chunks = []
                with torch.no_grad(), autocast:
                    for rows in _chunks(torch.arange(n), tcfg.micro_batch_size):
                        before_forward(policy, plan, rows.numel() * ro.input_ids.shape[1])  # checkpointed blocks
                        out = response_forward(policy, ro, rows, ro_cfg.temperature, value_head, entropy=True)
                        for k, v in out.items():
                            old[k].append(v)
                        if kl_on:
                            ref_chunks.append(reference.run(policy, lambda m, rows=rows: response_forward(
                                m, ro, rows, ro_cfg.temperature)["logps"]))
                old_logps = torch.cat(old["logps"])
                old_values = torch.cat(old["values"]) * mask if use_values else None
                ref_logps = torch.cat(ref_chunks) if kl_on else None
                kl_tok = kl_estimate(old_logps, ref_logps, rl.kl_estimator) * mask if kl_on else None
                beta = kl_ctl.coef if kl_on else 0.0
                # 5. advantages
                returns = None
                if use_values:
                    rewards = token_rewards(scores, mask, kl_tok if rl.kl_in == "reward" else None, beta)
                    if rl.whiten_rewards:
                        rewards = whiten(rewards, mask, shift_mean=False)
                    advantages, returns = gae(rewards, old_values, mask, rl.gamma, rl.lam)
                    if rl.whiten_advantages:
                        advantages = whiten(advantages, mask)
                else:
                    seq_scores = scores - beta * kl_tok.sum(1) if kl_on and rl.kl_in == "reward" else scores
                    if rl.advantage == "group":
                        seq_adv = group_advantages(seq_scores, G, rl.scale_by_group_std)
                    elif rl.advantage == "rloo":
                        seq_adv = rloo(seq_scores, G)
                    else:
                        seq_adv = reinforce_baseline(seq_scores)
                    advantages = seq_adv.to(device)[:, None] * mask
                # 6. the update
                # summed on the device and read once, after the update: the host never waits inside it
                stats = dict.fromkeys(("pg_loss", "value_loss", "kl_loss", "clip", "value_clip", "approx_kl", "tokens"),
                                      torch.zeros((), device=device))
                grad_norms = []
                perm_gen = torch.Generator().manual_seed(_step_seed(cfg.seed, step, salt=1))
                for _ in range(rl.epochs):
                    for mb in torch.randperm(n, generator=perm_gen).chunk(rl.minibatches):
                        weight = aggregate_weight(ro.mask[mb], rl.loss_aggregation)  # the host's copy: no wait
                        for rows in _chunks(mb, tcfg.micro_batch_size):
                            m = mask[rows]
                            before_forward(policy, plan, rows.numel() * ro.input_ids.shape[1])
                            with autocast:
                                out = response_forward(policy, ro, rows, ro_cfg.temperature, value_head,
                                                       entropy=rl.entropy_coef > 0)
                            logps = out["logps"]
                            pg_tok, clipped = clipped_surrogate(logps, old_logps[rows], advantages[rows],
                                                                rl.clip_eps, rl.clip_eps_high)
                            loss_tok = pg_tok
                            if kl_on and rl.kl_in == "loss":
                                kl_new = kl_estimate(logps, ref_logps[rows], rl.kl_estimator)
                                loss_tok = loss_tok + beta * kl_new
                                stats["kl_loss"] = stats["kl_loss"] + (kl_new.detach() * m).sum()
                            if rl.entropy_coef:
                                loss_tok = loss_tok - rl.entropy_coef * out["entropy"]
                            total = aggregate_sum(loss_tok, m, rl.loss_aggregation)
                            if use_values:
                                v_tok, v_clipped = clipped_value_loss(out["values"], old_values[rows], returns[rows],
                                                                      rl.value_clip)
                                v_sum = aggregate_sum(v_tok, m, rl.loss_aggregation)
                                total = total + rl.value_coef * v_sum
                                stats["value_loss"] = stats["value_loss"] + (v_tok.detach() * m).sum()
                                stats["value_clip"] = stats["value_clip"] + (v_clipped.float() * m).sum()
                            (total / max(weight, 1e-8)).backward()
                            for key, value in (("pg_loss", pg_tok.detach()), ("clip", clipped.float()), ("tokens", 1.0),
                                               ("approx_kl", 0.5 * (logps.detach() - old_logps[rows]).pow(2))):
                                stats[key] = stats[key] + (value * m).sum()
                        # Clipped apart: a large value loss must not shrink the policy's step through a shared norm.
                        max_norm = tcfg.max_grad_norm or math.inf
                        grad_norms.append(torch.nn.utils.clip_grad_norm_(policy_params, max_norm))
                        if value_head is not None:
                            torch.nn.utils.clip_grad_norm_(list(value_head.parameters()), max_norm)
                        lr = scheduler.get_last_lr()[0]
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
            # metrics, samples, checkpoint
            stats = {k: float(v) for k, v in stats.items()}
            # the KL per response, k1 summed over its tokens (unbiased whatever estimator the loss uses)
            seq_kl = float((old_logps - ref_logps).mul(mask).sum(1).mean()) if kl_on else 0.0
            if kl_on:
                kl_ctl.update(seq_kl, n)
            tok = max(stats["tokens"], 1.0)
            lengths = mask.sum(1)
            new_tokens = sum(len(g.token_ids) + (g.stop_id is not None) for g in gens)
            record = {"step": done, "loss": (stats["pg_loss"] + rl.value_coef * stats["value_loss"]) / tok,
                      "lr": lr, "grad_norm": float(torch.stack(grad_norms).mean()),
                      "reward": float(scores.mean()), "reward_std": float(scores.std()) if n > 1 else 0.0,
                      **({"reward_raw": float(raw.mean())} if cfg.reward.normalize else {}),
                      **{f"reward/{k}": sum(v) / n for k, v in parts.items()},
                      "kl": seq_kl, "kl_coef": beta, "entropy": float(masked_mean(torch.cat(old["entropy"]), mask)),
                      "response_length": float(lengths.mean()), "truncated": float(truncated.float().mean()),
                      "diversity": group_diversity(gens, G), "pg_loss": stats["pg_loss"] / tok,
                      "clip_fraction": stats["clip"] / tok, "approx_kl": stats["approx_kl"] / tok,
                      "gen_tokens_per_s": new_tokens / max(gen_seconds, 1e-9),
                      "step_seconds": time.perf_counter() - t0, "elapsed_s": time.perf_counter() - t_start}
            if kl_on and rl.kl_in == "loss":
                record["kl_loss"] = stats["kl_loss"] / tok
            if use_values:
                record["value_loss"] = stats["value_loss"] / tok
                record["value_clip_fraction"] = stats["value_clip"] / tok
                record["explained_variance"] = _explained_variance(old_values, returns, mask)
            sinks.step(record, log=done % tcfg.log_every == 0 or done == n_steps)
            if done % cfg.sample_every == 0 or done == n_steps:
                (run.root / "samples").mkdir(exist_ok=True)
                write_jsonl_atomic(run.root / "samples" / f"step-{done}.jsonl", sample_rows(rep_items, gens, scores.tolist()))
            if tcfg.save_every and (done % tcfg.save_every == 0 or done == n_steps):
                path = save_checkpoint(run.checkpoints, done, trained, optimizer, scheduler,
                                       {"total_steps": n_steps, "kl_controller": kl_ctl.state_dict(),
                                        "reward_norm": reward_norm}, tcfg.keep_last)
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


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".partial")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.replace(path)
