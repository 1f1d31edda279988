"""One file per method; each reads top to bottom."""
from __future__ import annotations

from typing import Any

from tunesmith._core import dist


def run_recipe(cfg: Any, *, resume: bool = False, say: Any = print) -> Any:
    """Dispatch a validated config to its recipe. Started by torchrun with several processes, it trains
    data parallel (`tunesmith._core.dist`): process 0 writes the run directory and prints; the result in
    the other processes lacks what process 0 alone measures (a reward model's or classifier's scores)."""
    if dist.launched_world() == 1 or dist.world_size() > 1:  # one process, or a pipeline's stage
        return _dispatch(cfg, resume, say)
    dist.join()
    try:
        result = _dispatch(cfg, resume, say if dist.is_main() else (lambda *a, **k: None))
        dist.barrier()  # every process is through, process 0's result saved and scored
    finally:
        dist.leave()
    return result


def _dispatch(cfg: Any, resume: bool, say: Any) -> Any:
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
