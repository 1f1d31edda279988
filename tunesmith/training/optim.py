"""AdamW with decay only on matrices (torch's; bitsandbytes' 8-bit or paged ones; or, for bfloat16
weights, one that keeps them in bfloat16 with stochastic rounding), and learning-rate schedules with
linear warm-up."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from tunesmith.config import TrainConfig


_BITSANDBYTES = {"adamw_8bit": "AdamW8bit", "paged_adamw": "PagedAdamW", "paged_adamw_8bit": "PagedAdamW8bit"}


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, seed: int = 0) -> torch.optim.Optimizer:
    """AdamW (`cfg.optimizer`: torch's, or bitsandbytes' 8-bit / paged one) over trainable parameters;
    biases and norm weights (1-D) get no weight decay. Where some trainable weights are bfloat16 (a model
    trained whole in bfloat16: `training.precision` widens any other), `adamw` is `BFloat16AdamW`, whose
    stochastic rounding draws from `seed`."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if cfg.optimizer != "adamw":
        import bitsandbytes as bnb

        return getattr(bnb.optim, _BITSANDBYTES[cfg.optimizer])(groups, lr=cfg.lr, betas=cfg.betas)
    if any(p.dtype == torch.bfloat16 for p in decay + no_decay):
        return BFloat16AdamW(groups, lr=cfg.lr, betas=cfg.betas, seed=seed)
    fused = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def stochastic_round(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 `x` to bfloat16, rounded up or down at random in proportion to how close it lies to each
    neighbour, so that the rounding is right on average: bfloat16 keeps the top 16 bits of a float32, and a
    uniform draw added to the 16 bits below before they are cut off carries into the kept ones with
    probability equal to their fraction of a unit. (Adding to the bit pattern moves the magnitude, so it
    works alike for both signs.) Nearest rounding would drop every change smaller than half a unit, about
    0.2% of the value: most of a fine-tuning update."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((x.view(torch.int32) + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class BFloat16AdamW(torch.optim.Optimizer):
    """AdamW for bfloat16 weights that keeps the weights and both moments in bfloat16: 8 bytes a weight
    with its gradient and moments, where float32 weights under torch's AdamW take 16. Each update is
    torch's AdamW arithmetic (the same operations in the same order) in float32, over float32 copies of a
    slice of the weight at a time, and its results are stored back by `stochastic_round`. With nearest
    rounding a bfloat16 weight ignores any update smaller than about 0.2% of itself, which at fine-tuning
    learning rates is most of them; stochastically rounded, each update counts in expectation. float32
    weights among them are updated exactly as torch's AdamW would.

    The draws come from a generator seeded by the run's seed and the step, so a resumed run draws what the
    uninterrupted one did."""

    SLICE = 1 << 24  # elements updated at a time (whole rows): 4 float32 copies of a slice are 256 MiB

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, seed: int = 0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.seed = seed

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        generators: dict[tuple[torch.device, int], torch.Generator] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)  # as torch's AdamW keeps it (a resume loads either)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = int(state["step"])
                key = (p.device, step)
                if key not in generators:
                    generators[key] = torch.Generator(p.device).manual_seed((self.seed * 1_000_003 + step) % 2 ** 63)
                self._update(p, state, group, step, generators[key])
        return loss

    def _update(self, p: torch.Tensor, state: dict, group: dict, step: int, generator: torch.Generator) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        step_size = lr / (1 - beta1 ** step)
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        tensors = (p, state["exp_avg"], state["exp_avg_sq"], p.grad)
        # slices of whole rows (views, whatever the strides); a float32 slice's .float() is the slice itself
        rows = max(1, self.SLICE * max(1, p.shape[0]) // max(1, p.numel())) if p.ndim else 0
        for span in [slice(s, s + rows) for s in range(0, p.shape[0], rows)] if p.ndim else [...]:
            w, m, v, g = (t[span].float() for t in tensors)
            w.mul_(1 - lr * wd)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
            w.addcdiv_(m, denom, value=-step_size)
            for target, value in zip(tensors[:3], (w, m, v)):
                part = target[span]
                part.copy_(stochastic_round(value, generator) if part.dtype == torch.bfloat16 else value)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate for the update that ends `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise AssertionError(kind)


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = round(cfg.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, warmup, cfg.schedule))
