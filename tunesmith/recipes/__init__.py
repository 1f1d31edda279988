"""One file per method; each reads top to bottom."""
from __future__ import annotations

from typing import Any


def run_recipe(cfg: Any, *, resume: bool = False, say: Any = print) -> Any:
    """Dispatch a validated config to its recipe."""
    if cfg.recipe == "sft":
        from tunesmith.recipes.sft import run_sft

        return run_sft(cfg, resume=resume, say=say)
    if cfg.recipe == "reward":
        from tunesmith.recipes.reward import run_reward

        return run_reward(cfg, resume=resume, say=say)
    if cfg.recipe == "dpo":
        from tunesmith.recipes.dpo import run_dpo

        return run_dpo(cfg, resume=resume, say=say)
    if cfg.recipe == "classify":
        from tunesmith.recipes.classify import run_classify

        return run_classify(cfg, resume=resume, say=say)
    if cfg.recipe in ("ppo", "grpo"):
        from tunesmith.recipes.rl import run_online

        return run_online(cfg, resume=resume, say=say)
    if cfg.recipe == "pipeline":
        from tunesmith.recipes.pipeline import run_pipeline

        return run_pipeline(cfg, resume=resume, say=say)
    raise AssertionError(f"no recipe for {cfg.recipe!r}")
