"""The dtype a matmul computes in, defined once for the layers, losses and attention that ask, and what
float16 can hold."""
from __future__ import annotations

from typing import Iterable

import torch

from tunesmith._core.errors import TunesmithError


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What a matmul on `x` computes in: the autocast dtype inside autocast, else `x`'s own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


# float16's largest finite value is 65,504; anything from 65,520 on (halfway to the next power, ties to even)
# rounds to inf.
FLOAT16_MAX = 65504.0
_FLOAT16_ROUNDS_TO_INF = 65520.0


def beyond_float16(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, float] | None:
    """The first (name, tensor) whose values float16 cannot hold (any of magnitude 65,520 or more, which
    becomes inf, or one that is not finite), with its largest magnitude; None when every tensor fits.
    Quantised storage (integers, FP8) is not float16's concern and is skipped."""
    for name, tensor in named:
        if tensor.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16) or not tensor.numel():
            continue
        top = float(tensor.detach().abs().amax())
        if not top < _FLOAT16_ROUNDS_TO_INF:
            return name, top
    return None


def check_float16(named: Iterable[tuple[str, torch.Tensor]], what: str, instead: str) -> None:
    """Refuse, before anything is written, tensors a float16 copy would turn into inf: `what` is being done,
    `instead` is what to do rather."""
    if found := beyond_float16(named):
        name, top = found
        raise TunesmithError(f"{what}: {name} holds values up to {top:g}, beyond float16's range "
                             f"(±{FLOAT16_MAX:,.0f}); {instead}")
