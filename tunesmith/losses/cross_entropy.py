"""Masked token cross-entropy, returned as a sum so the caller chooses the normaliser."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of -log p(target_t | x_<=t) over positions whose target is not IGNORE.

    logits: (B, T, V); targets: (B, T), already aligned with the position that predicts them.
    Returns (sum in float32, number of loss tokens). Gradient accumulation divides the sums of a whole
    accumulation window by the window's token count, so every token weighs the same whatever
    micro-batch it fell in (averaging per micro-batch would over-weight short batches).
    """
    flat = logits.reshape(-1, logits.size(-1)).float()
    tgt = targets.reshape(-1)
    total = F.cross_entropy(flat, tgt, ignore_index=IGNORE, reduction="sum")
    return total, int((tgt != IGNORE).sum())
