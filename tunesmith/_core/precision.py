"""The dtype a matmul computes in, defined once for the layers, losses and attention that ask."""
from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What a matmul on `x` computes in: the autocast dtype inside autocast, else `x`'s own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
