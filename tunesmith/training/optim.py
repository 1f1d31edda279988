"""AdamW with decay only on matrices (torch's; bitsandbytes' 8-bit or paged ones; or, for bfloat16
weights, one that keeps them in bfloat16 with stochastic rounding), and learning-rate schedules with
linear warm-up."""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable

import torch

from tunesmith._core import dist
from tunesmith._core.errors import TunesmithError
from tunesmith.config import SHARD_FROM, TrainConfig


_BITSANDBYTES = {"adamw_8bit": "AdamW8bit", "paged_adamw": "PagedAdamW", "paged_adamw_8bit": "PagedAdamW8bit"}


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, seed: int = 0, shards: int = 1) -> torch.optim.Optimizer:
    """AdamW (`cfg.optimizer`: torch's, or bitsandbytes' 8-bit / paged one) over trainable parameters, in
    `param_groups`. Where some trainable weights are bfloat16 (a model trained whole in bfloat16:
    `training.precision` widens any other), `adamw` is `BFloat16AdamW`, whose stochastic rounding draws from
    `seed`. `shards` > 1 (the processes of a data-parallel run): a `ShardedOptimizer`."""
    groups = param_groups(model, cfg)
    params = [p for g in groups for p in g["params"]]
    bfloat16, fused = any(p.dtype == torch.bfloat16 for p in params), all(p.is_cuda for p in params)
    places = {id(p): i for i, p in enumerate(params)}  # BFloat16AdamW's draws: a tensor's place among them all

    def adamw(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        if cfg.optimizer != "adamw":
            import bitsandbytes as bnb

            return getattr(bnb.optim, _BITSANDBYTES[cfg.optimizer])(groups, lr=cfg.lr, betas=cfg.betas)
        if bfloat16:
            return BFloat16AdamW(groups, lr=cfg.lr, betas=cfg.betas, seed=seed, places=places)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)

    if shards == 1:
        return adamw(groups)
    owners = shard_owners([p.numel() for p in params], shards)
    mine = {id(p) for p, owner in zip(params, owners) if owner == dist.rank()}
    return ShardedOptimizer(adamw([{**g, "params": [p for p in g["params"] if id(p) in mine]} for g in groups]),
                            params, owners)


def optimizer_shards(cfg: TrainConfig, trainable: list[torch.nn.Parameter]) -> int:
    """Over how many processes the optimiser state is sharded (`cfg.shard_optimizer`): 1 in one process;
    under `auto` the processes of a data-parallel run from `SHARD_FROM` trainable weights (below it the
    moments are small, and sharding would add a broadcast of the weights to every step). fp16's loss scale
    unscales only the gradients of the optimiser's own weights, so it shards nothing."""
    world = dist.world_size()
    if world == 1 or cfg.shard_optimizer == "off" or cfg.fsdp:  # fsdp: the optimiser's weights are shards already
        return 1
    if cfg.precision == "fp16":
        if cfg.shard_optimizer == "on":
            raise TunesmithError("train.shard_optimizer=on needs precision bf16 or fp32: fp16's loss scale "
                                 "unscales only the gradients of the optimiser's own weights")
        return 1
    if cfg.shard_optimizer == "auto" and sum(p.numel() for p in trainable) < SHARD_FROM:
        return 1
    return world


def shard_owners(sizes: list[int], shards: int) -> list[int]:
    """The process that keeps each parameter's optimiser state: largest first, each to the process holding the
    fewest elements so far (the lowest on a tie), so the processes hold about as much, and every process
    computes the same answer."""
    load, owners = [0] * shards, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owners[i] = min(range(shards), key=lambda r: (load[r], r))
        load[owners[i]] += sizes[i]
    return owners


class ShardedOptimizer(torch.optim.Optimizer):
    """ZeRO stage 1 over the processes of a data-parallel run (`train.shard_optimizer`): each process's
    `inner` optimiser holds only the parameters `owners` gives it, and so the moments of about 1/N of the
    weights. Every process has every (summed) gradient; each updates its own parameters, and `step` then
    broadcasts every parameter from its owner, so all processes end the step with the same weights. Its
    `param_groups` are the inner optimiser's: the same groups and learning rates in every process, with this
    process's parameters in them, so the schedule drives it unchanged. `zero_grad` clears every parameter's
    gradient, owned or not."""

    def __init__(self, inner: torch.optim.Optimizer, params: list[torch.nn.Parameter], owners: list[int]):
        super().__init__([torch.zeros(0, requires_grad=True)], {})  # the hooks and flags torch expects
        self.inner, self.params, self.owners = inner, params, owners
        self.param_groups, self.state, self.defaults = inner.param_groups, inner.state, inner.defaults

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = self.inner.step(closure)
        dist.broadcast_from_owners(self.params, self.owners)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)
        # torch's load makes the inner optimiser new group dicts: the schedule must set the rates of those
        self.param_groups, self.state = self.inner.param_groups, self.inner.state


def is_lora_b(name: str) -> bool:
    """Whether the parameter `name` is a LoRA B matrix (PEFT's `lora_B` of a linear layer, `lora_embedding_B`
    of an embedding), the factor LoRA+ gives the larger learning rate."""
    return ".lora_B." in name or ".lora_embedding_B." in name


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The trainable parameters in optimiser groups: matrices with `cfg.weight_decay`, biases and norm weights
    (1-D) and IA3's scales with none; under `cfg.lora_plus_ratio` (LoRA+), LoRA's B matrices in groups of
    their own at `cfg.lr` times the ratio. Groups keep that order; empty ones are left out."""
    ratio = cfg.lora_plus_ratio
    kinds: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            # IA3's scales are stored (d, 1) or (1, d) but act as a norm's weights do, starting at 1: decay
            # would pull every one towards 0 whatever its gradient
            decay = p.ndim >= 2 and ".ia3_l." not in name
            kinds.setdefault((decay, ratio is not None and is_lora_b(name)), []).append(p)
    return [{"params": kinds[decay, b], "weight_decay": cfg.weight_decay if decay else 0.0,
             "lr": cfg.lr * ratio if b else cfg.lr}
            for b in (False, True) for decay in (True, False) if kinds.get((decay, b))]


_MASK32 = 0xFFFFFFFF


def _mul32(x: Any, c: int) -> Any:
    """x * c mod 2**32 for 0 <= x < 2**32, in 16-bit halves so no product passes 2**49 (int64 tensors or ints)."""
    return ((x & 0xFFFF) * c + (((x >> 16) * (c & 0xFFFF)) << 16)) & _MASK32


def mix32(x: Any) -> Any:
    """murmur3's 32-bit finaliser, elementwise (int64 tensors or Python ints below 2**32): a bijection in which
    every output bit depends on every input bit. Over consecutive inputs its low 16 bits pass for independent
    uniform draws, which makes them counter-based: the draw for an element is a function of its index."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def draw_key(seed: int, step: int, tensor: int) -> int:
    """The key of the draws for the `tensor`-th tensor rounded in optimiser step `step` of a run seeded `seed`."""
    return mix32((mix32((seed * 1_000_003 + step) & _MASK32) + 0x9E3779B9 * (tensor + 1)) & _MASK32)


def mixed_positions(x: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """`mix32` of each element's row-major position in `x`, counted from `offset` (int64, x's shape)."""
    index = torch.arange(x.numel(), device=x.device, dtype=torch.int64).view(x.shape)
    return mix32((index + offset) & _MASK32)


def stochastic_round(x: torch.Tensor, key: int, offset: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
    """float32 `x` to bfloat16, rounded up or down at random in proportion to how close it lies to each
    neighbour, so that the rounding is right on average: bfloat16 keeps the top 16 bits of a float32, and a
    uniform draw added to the 16 bits below before they are cut off carries into the kept ones with
    probability equal to their fraction of a unit. (Adding to the bit pattern moves the magnitude, so it
    works alike for both signs.) Nearest rounding would drop every change smaller than half a unit, about
    0.2% of the value: most of a fine-tuning update.

    The draw for the element at row-major position i is the low 16 bits of `mix32(mix32(offset + i) ^ key)`:
    no generator state, so a slice of a tensor draws what it would as part of the whole (`offset`: the
    slice's first position), and compiled code computes the draws inside the kernel that uses them. The key
    enters after a first mixing: added to the position, two keys would give the same draws shifted.
    `positions`: `mixed_positions(x, offset)`, where several roundings of one slice share it."""
    positions = mixed_positions(x, offset) if positions is None else positions
    noise = (mix32(positions ^ key) & 0xFFFF).to(torch.int32)
    return ((x.view(torch.int32) + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def _bfloat16_update(w: torch.Tensor, m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, h: torch.Tensor,
                     keys: tuple[int, int, int], offset: int) -> None:
    """One AdamW update of a slice of bfloat16 weights `w` and moments `m`, `v` with gradient `g`, in float32,
    stored back stochastically rounded. `h` holds, in float32 on the weights' device: the decay factor
    1 - lr·wd, 1 - β1, β2, 1 - β2, √(1 - β2^t), ε and the step size lr / (1 - β1^t) (tensors, so that one
    compiled kernel serves every step). Compiled on CUDA (`_UPDATE`): the whole update is then one pass
    reading 8 bytes a weight and writing 6, where these operations one at a time make some 30 passes over
    float32 copies."""
    wf, mf, vf, gf = w.float(), m.float(), v.float(), g.float()
    wf = wf * h[0]
    mf = mf + (gf - mf) * h[1]
    vf = vf * h[2] + gf * gf * h[3]
    wf = wf - h[6] * mf / (vf.sqrt() / h[4] + h[5])
    positions = mixed_positions(wf, offset)
    for target, value, key in zip((w, m, v), (wf, mf, vf), keys):
        target.copy_(stochastic_round(value, key, positions=positions))


_UPDATE: dict[str, Callable[..., None]] = {}  # the compiled update, once made (or the eager one, after it failed)


def _update_kernel(device: torch.device) -> Callable[..., None]:
    """`_bfloat16_update` compiled (dynamic shapes: one kernel for every slice) on CUDA, eager elsewhere."""
    if device.type != "cuda" or torch.compiler.is_compiling():
        return _bfloat16_update
    if "cuda" not in _UPDATE:
        _UPDATE["cuda"] = torch.compile(_bfloat16_update, dynamic=True)
    return _UPDATE["cuda"]


class BFloat16AdamW(torch.optim.Optimizer):
    """AdamW for bfloat16 weights that keeps the weights and both moments in bfloat16: 8 bytes a weight
    with its gradient and moments, where float32 weights under torch's AdamW take 16. Each update is
    AdamW's arithmetic in float32, over float32 values of a slice of the weight at a time, and its results
    are stored back by `stochastic_round`. With nearest rounding a bfloat16 weight ignores any update
    smaller than about 0.2% of itself, which at fine-tuning learning rates is most of them; stochastically
    rounded, each update counts in expectation. float32 weights among them are updated exactly as torch's
    AdamW would (the same operations in the same order).

    The draws are a function of the run's seed, the step, the tensor's place among the parameters and each
    element's position (`draw_key`), so a resumed run draws what the uninterrupted one did. On CUDA the
    update of a slice is one compiled kernel; where compiling fails it runs eagerly, with a warning."""

    SLICE = 1 << 24  # elements updated at a time (whole rows): 4 float32 copies of a slice are 256 MiB

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, seed: int = 0, places: dict[int, int] | None = None):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.seed = seed
        self.places = places  # each tensor's place for its draws (by id; default: its place among these)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        places = self.places or {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        hyper: dict[tuple, torch.Tensor] = {}  # this step's `h` per group, step count and device
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
                if p.dtype == torch.bfloat16:
                    self._update_bfloat16(p, state, group, step, places[id(p)], hyper)
                else:
                    self._update(p, state, group, step)
        return loss

    @staticmethod
    def _spans(p: torch.Tensor) -> list[tuple[Any, int]]:
        """Slices of whole rows of `p` (views, whatever the strides), each with its first row-major position."""
        if not p.ndim:
            return [(..., 0)]
        rows = max(1, BFloat16AdamW.SLICE * max(1, p.shape[0]) // max(1, p.numel()))
        width = p.numel() // max(1, p.shape[0])
        return [(slice(s, s + rows), s * width) for s in range(0, p.shape[0], rows)]

    def _update(self, p: torch.Tensor, state: dict, group: dict, step: int) -> None:
        """torch's single-tensor AdamW, operation for operation (a float32 weight)."""
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        step_size = lr / (1 - beta1 ** step)
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        w, m, v, g = p, state["exp_avg"], state["exp_avg_sq"], p.grad.float()
        w.mul_(1 - lr * wd)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        w.addcdiv_(m, denom, value=-step_size)

    def _update_bfloat16(self, p: torch.Tensor, state: dict, group: dict, step: int, place: int,
                         hyper: dict[tuple, torch.Tensor]) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        at = (id(group), step, p.device)
        if at not in hyper:
            hyper[at] = torch.tensor([1 - lr * wd, 1 - beta1, beta2, 1 - beta2, (1 - beta2 ** step) ** 0.5, eps,
                                      lr / (1 - beta1 ** step)], dtype=torch.float32).to(p.device)
        h = hyper[at]
        keys = tuple(draw_key(self.seed, step, 3 * place + k) for k in range(3))
        tensors = (p, state["exp_avg"], state["exp_avg_sq"], p.grad)
        for span, offset in self._spans(p):
            update = _update_kernel(p.device)
            try:
                update(*(t[span] for t in tensors), h, keys, offset)
            except Exception as err:  # noqa: BLE001 - a compiler failure; the eager update is the same function
                from torch._dynamo.exc import TorchDynamoException
                if update is _bfloat16_update or not isinstance(err, TorchDynamoException):
                    raise
                warnings.warn(f"BFloat16AdamW: compiling its update failed ({type(err).__name__}: "
                              f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}); "
                              "it runs eagerly", RuntimeWarning, stacklevel=2)
                _UPDATE["cuda"] = _bfloat16_update
                _bfloat16_update(*(t[span] for t in tensors), h, keys, offset)


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
