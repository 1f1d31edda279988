"""Online RL (`recipe: ppo` and `recipe: grpo`), top to bottom: prompts, reward sources, the held-out task
scored before, the reference, the rollout/update loop, the reward-hacking watch, save, and the score after.

PPO and GRPO are one loop (`training.online.train_online`) with different defaults: PPO learns a critic (a
value head, or with `rl.value_model` a reward model of its own) and uses GAE; GRPO samples a group per
prompt and compares the group's scores.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith._core import dist
from tunesmith._core.rundir import RunDir
from tunesmith._core.seed import seed_everything
from tunesmith.config import dump_config
from tunesmith.data.prompts import load_prompts
from tunesmith.eval.rl import plot_rl, report_markdown, watch
from tunesmith.models import apply_method, describe_trainable
from tunesmith.models.reward import critic_from_reward_model
from tunesmith.recipes.common import data_line, evaluate_task, load_start, model_card, save_and_score
from tunesmith.recipes.result import RunResult
from tunesmith.rl import build_reward
from tunesmith.rl.rewards import check_answers
from tunesmith.training.online import train_online
from tunesmith.training.preference import Reference, copy_reference


def _model_card(cfg: Any, stats: dict, before: dict | None, after: dict | None) -> str:
    rl = cfg.rl
    sources = ", ".join(f"{s.kind} {s.name} (x{s.weight})" for s in cfg.reward.sources)
    return model_card(cfg, "RL-tuned from", f"recipe: {cfg.recipe}, advantage: {rl.advantage}, "
                      f"{cfg.rollout.samples_per_prompt} samples per prompt, KL β {rl.kl_coef} ({rl.kl_estimator}, "
                      f"in the {rl.kl_in}), reward: {sources}",
                      data_line(cfg.data.train, stats), before, after)


def run_online(cfg: Any, *, resume: bool = False, say: Any = print) -> RunResult:
    """Run PPO or GRPO as configured; `before`/`after` hold the held-out task's metrics and mean reward."""
    run = RunDir(Path(cfg.output_dir)).prepare(dump_config(cfg), resume)
    with run.guard(f"{cfg.recipe} ({cfg.rl.advantage}) with {cfg.method.kind} on {cfg.model.name}"):
        seed_everything(cfg.seed)
        model, tokenizer = load_start(cfg.model, cfg.method.kind, cfg.data.chat_template, cfg.seed, say,
                                      quant=cfg.method.quant, optimizer=cfg.train.optimizer)
        items, stats = load_prompts(cfg.data, tokenizer)
        check_answers(cfg.reward.sources, items)
        say("prompts: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
        reward = build_reward(cfg.reward.sources, cfg.reward.batch_size)

        before = None
        if cfg.eval.task_file and cfg.eval.before:
            before = evaluate_task(model, tokenizer, cfg.eval, run, "before", say, reward)

        source = cfg.reference_source()
        reference = None
        if source == "copy":
            reference = copy_reference(model, cfg.train)
        elif source == "adapter":
            reference = Reference("adapter")

        model = apply_method(model, cfg.method, tokenizer)
        say(describe_trainable(model))
        critic = None
        if cfg.rl.value_model is not None:
            critic = critic_from_reward_model(cfg.rl.value_model, cfg.method.lora, tokenizer)
            say(f"critic: the reward model {cfg.rl.value_model}, {describe_trainable(critic)}")
        result = train_online(model, tokenizer, items, reward, cfg, run, reference=reference, resume=resume,
                              value_model=critic)
        last = result.last
        if last:
            say(f"trained {result.steps - (result.resumed_from or 0)} steps in {result.seconds:.0f} s; last step: "
                f"reward {last['reward']:.3f}, KL {last['kl']:.3f}, response length {last['response_length']:.1f}")
        if dist.is_main():  # data parallel: process 0 writes the watch's report
            records = run.read_metrics()
            warnings = watch(records, cfg.rollout.max_new_tokens,
                             cfg.rollout.max_rounds if cfg.rollout.filter_groups else None)
            for warning in warnings:
                say(f"warning: {warning}")
                run.event("warning", warning)
            run.eval.mkdir(parents=True, exist_ok=True)
            (run.eval / "rl.md").write_text(report_markdown(records, warnings))
            plot_rl(records, run.eval / "rl.png")

        after = save_and_score(model, tokenizer, cfg, run, before, lambda b, a: _model_card(cfg, stats, b, a), say,
                               reward)
        run.set_status("succeeded", step=result.steps, total_steps=result.steps, before=before, after=after)
        run.event("finished", "run succeeded")
        return RunResult(run.root, result.steps, last.get("loss"), None, before, after, stats)
