"""Mixed precision for the training loops: the autocast a run computes under and, for float16, the loss scale.

bf16 has float32's exponent range, so its gradients need no help. float16 tops out at 65,504 and loses
everything below about 6e-8, where many gradients of a language model lie. `precision: fp16` therefore
multiplies the loss by a scale before backward (so small gradients stay representable), divides the
gradients by it before clipping and the update, and skips any step whose gradients overflowed, halving the
scale (`torch.amp.GradScaler`'s dynamic policy: 2,000 clean steps in a row double it again). The trainable
weights and the optimiser's moments stay float32 (master weights); only the frozen weights may be float16.
Trained blocks beside a frozen 16-bit body (`freeze`) get float32 master weights under bf16 too.

`precision: auto` (the default) is made concrete once per run by `resolve_precision`, from the weights and the
device; everything below it reads a concrete setting.
"""
from __future__ import annotations

import collections
import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from tunesmith._core.errors import TunesmithError
from tunesmith._core.rundir import RunDir
from tunesmith.config import TrainConfig
from tunesmith.training import fsdp
from tunesmith.training.optim import BFloat16AdamW

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Overflowing steps in a row after which a run stops: by then the scale has fallen from 65,536 to 2^-8, so
# it is the loss itself (a forward beyond float16's range, or a diverged run) that is not finite.
MAX_SKIPPED = 24


def resolve_precision(cfg: TrainConfig, model: torch.nn.Module) -> tuple[TrainConfig, str | None]:
    """`train.precision: auto` made concrete for the model's weights and device: float16 weights train under
    fp16 (they need its loss scale) and bfloat16 ones under bf16; float32 weights on a GPU with bfloat16
    arithmetic under bf16, on one without it (a T4, a V100) under fp16, and on a CPU under fp32 (few CPUs
    compute bfloat16 faster). Returns the config to train with and what `auto` chose and why (None when the
    config named a precision)."""
    if cfg.precision != "auto":
        return cfg, None
    chosen, why = _choose({p.dtype for p in model.parameters()}, next(model.parameters()).device)
    return cfg.model_copy(update={"precision": chosen}), f"auto: {chosen} ({why})"


def training_autocast(cfg: TrainConfig, model: torch.nn.Module) -> torch.dtype | None:
    """The dtype training will autocast `model` to under `cfg` (`resolve_precision`), None for fp32."""
    return AUTOCAST.get(resolve_precision(cfg, model)[0].precision)


def _choose(dtypes: set[torch.dtype], device: torch.device) -> tuple[str, str]:
    if torch.float16 in dtypes:
        return "fp16", "float16 weights"
    if torch.bfloat16 in dtypes:
        return "bf16", "bfloat16 weights"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", f"{name} has bfloat16 arithmetic"
        return "fp16", f"{name} has no bfloat16 arithmetic"
    return "fp32", f"{device.type}, float32 weights"


def _concrete(cfg: TrainConfig) -> str:
    if cfg.precision == "auto":
        raise ValueError("train.precision auto reached the training loop unresolved: call resolve_precision first")
    return cfg.precision


def autocast_to(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device_type`, or nothing where `dtype` is None (float32)."""
    return torch.autocast(device_type=device_type, dtype=dtype) if dtype else contextlib.nullcontext()


def precision_autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 or fp16 autocast as `train.precision` asks (resolved), else nothing."""
    return autocast_to(device.type, AUTOCAST.get(_concrete(cfg)))


def check_precision(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse bf16 on a GPU that only emulates it (a T4 or a V100), where it is far slower than fp16."""
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(
            including_emulation=False):
        name = torch.cuda.get_device_name(device)
        raise TunesmithError(f"train.precision bf16: {name} has no bfloat16 arithmetic; set train.precision "
                             "fp16 (float16 autocast with loss scaling) or fp32")


def _trains_wide(p: torch.nn.Parameter, precision: str, whole: bool) -> bool:
    """Whether a trainable tensor trains in float32 while its stored dtype is 16-bit: a float16 one under fp16
    always (loss scaling cannot unscale float16 gradients, and AdamW's epsilon is 0 in float16); any 16-bit
    one under 16-bit autocast when part of the model stays frozen (the blocks `freeze` trains, on a body
    that stays bfloat16). A model trained whole in 16 bits trains in them: it asked for half the memory of
    float32 weights. Under fp32 nothing runs the mixed model, so nothing widens."""
    if precision == "fp16" and p.dtype == torch.float16:
        return True
    return p.dtype in (torch.bfloat16, torch.float16) and precision in AUTOCAST and not whole


@contextlib.contextmanager
def master_weights(params: Sequence[torch.nn.Parameter], cfg: TrainConfig, device: torch.device,
                   whole: bool = False) -> Iterator[dict[torch.dtype, int]]:
    """Training's precision checked for the device, and the 16-bit trainable weights `_trains_wide` picks
    in float32 while training runs (`whole`: `params` are every weight of the model); they return to their
    dtype afterwards, their float32 values rounded. Yields how many tensors of each dtype it widened. LoRA's
    adapters are float32 already."""
    check_precision(cfg, device)
    narrow = [(p, p.dtype) for p in params if _trains_wide(p, _concrete(cfg), whole)]
    for p, _ in narrow:
        p.data = p.data.float()
    try:
        yield dict(collections.Counter(dtype for _, dtype in narrow))
    finally:
        for p, dtype in narrow:
            p.data = p.data.to(dtype)


@dataclass
class RunPrecision:
    """A training run's precision, settled: the train settings with `precision` resolved, what `auto` chose
    and why (None where the config named it), and how many 16-bit tensors of each dtype train in float32."""
    cfg: TrainConfig
    chosen: str | None
    widened: dict[torch.dtype, int]

    def report(self, run: RunDir, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """The `precision` event, where there is something to say."""
        parts = [self.chosen] if self.chosen else []
        for dtype, n in self.widened.items():
            name = str(dtype).removeprefix("torch.")
            parts.append(f"{n} {name} trainable tensors train in float32 (master weights); they are {name} "
                         "again when training ends")
        n = sum(p.dtype == torch.bfloat16 for g in getattr(optimizer, "param_groups", ()) for p in g["params"])
        if isinstance(optimizer, BFloat16AdamW):
            parts.append(f"{n} bfloat16 trainable tensors train in bfloat16: AdamW computes each update in "
                         "float32 and stores it, and its moments, in bfloat16 by stochastic rounding")
        elif n and type(optimizer).__module__.startswith("bitsandbytes"):
            lost = (f"{n} bfloat16 trainable tensors train in bfloat16 under bitsandbytes' {type(optimizer).__name__}, "
                    "which rounds each update to the nearest bfloat16: an update smaller than about 0.2% of a "
                    "weight is lost (train.optimizer adamw rounds them stochastically, at 2 more bytes a weight)")
            warnings.warn(lost, RuntimeWarning, stacklevel=2)
            parts.append(lost)
        if parts:
            run.event("precision", "; ".join(parts), step=step)

    def mixed(self, device: torch.device) -> contextlib.AbstractContextManager:
        """What runs the model outside the training passes while it is mixed (float32 trained tensors beside
        16-bit frozen ones, which only autocast runs together): the run's autocast, with its cache of cast
        weights off (a CUDA graph must not capture casts made outside it). Nothing where nothing widened."""
        if not self.widened:
            return contextlib.nullcontext()
        return torch.autocast(device.type, AUTOCAST[_concrete(self.cfg)], cache_enabled=False)


@contextlib.contextmanager
def training_precision(cfg: TrainConfig, model: torch.nn.Module) -> Iterator[RunPrecision]:
    """What `fit()` and the online loop train `model` under: `resolve_precision`, then `master_weights` over
    its trainable parameters for the length of the block (before the optimiser and a resume see them)."""
    cfg, chosen = resolve_precision(cfg, model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # fully sharded, 16-bit weights train as float32 shards: torch's AdamW steps the shards
    whole = len(trainable) == sum(1 for _ in model.parameters()) and not fsdp.enabled(cfg)
    with master_weights(trainable, cfg, next(model.parameters()).device, whole) as widened:
        yield RunPrecision(cfg, chosen, widened)


class LossScaling:
    """The loss scale of an fp16 run (a plain backward and step otherwise).

    `backward` scales the loss; `unscale` divides the gradients back before clipping; `step` updates unless
    the gradients overflowed, then moves the scale. The learning-rate schedule advances on a skipped step
    too: steps, data order and schedule stay one count, so a resumed run is the uninterrupted one."""

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.scaler = torch.amp.GradScaler(device.type) if _concrete(cfg) == "fp16" else None
        self.skipped = 0  # overflowing steps in a row, counted as their records are read

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def scale(self) -> torch.Tensor | None:
        """The scale this step's backward used, copied on the device (read with the step's record)."""
        if self.scaler is None:
            return None
        current = self.scaler._get_scale_async()  # the scale tensor, without waiting for the device
        return None if current is None else current.detach().clone()

    def step(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)  # skipped when a gradient is inf or nan
            self.scaler.update()
        with warnings.catch_warnings():  # a first step that overflowed has not called optimizer.step()
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            scheduler.step()

    def read(self, grad_norm: float, step: int) -> None:
        """Count a step whose gradients overflowed (its norm is not finite); too many in a row stop the run."""
        if self.scaler is None:
            return
        self.skipped = 0 if math.isfinite(grad_norm) else self.skipped + 1
        if self.skipped >= MAX_SKIPPED:
            raise TunesmithError(
                f"train.precision fp16: steps {step - self.skipped + 1}..{step} all overflowed float16, down to "
                f"a loss scale of {self.scaler.get_scale():g}: the loss itself is not finite (a forward beyond "
                "float16's range, or a diverged run); use bf16 where the GPU has it, fp32, or a lower train.lr")

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
