"""The weight-space penalty that holds a run near where it started (L2-SP: Li et al. 2018, "Explicit
Inductive Bias for Transfer Learning with Convolutional Networks"):

    R = λ/2 · Σ_W ||W − W_start||²_F

In sequential fine-tuning W_start is the previous stage's result, so R resists forgetting it. For a LoRA
layer W − W_start is the adapter's update s·BA (B: (out, r), A: (r, in)), whose squared norm needs only
r x r products: ||s·BA||² = s² · Σ_ij (BᵀB)_ij (AAᵀ)_ij.
"""
from __future__ import annotations

from typing import Sequence

import torch


def l2_to_start(current: Sequence[torch.Tensor], start: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ ||w − w0||² over paired tensors (w trainable, w0 a detached copy), as a float32 scalar."""
    return sum(((w.float() - w0.float()) ** 2).sum() for w, w0 in zip(current, start, strict=True))


def lora_update_sq_norm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """||scale · B A||²_F without forming B A. a: (r, in), b: (out, r)."""
    a, b = a.float(), b.float()
    return scale ** 2 * ((b.T @ b) * (a @ a.T)).sum()
