"""Masked token cross-entropy, returned as a sum so the caller chooses the normaliser."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tunesmith._core.precision import compute_dtype

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
    # Counted where the targets are: host targets (as training passes them) cost no wait for the device.
    n = int((tgt != IGNORE).sum())
    total = F.cross_entropy(flat, tgt.to(flat.device, non_blocking=True), ignore_index=IGNORE, reduction="sum")
    return total, n


def chunk_rows(vocab: int, chunk_bytes: int = 2**29) -> int:
    """Rows whose float32 logits fit in `chunk_bytes` (512 MiB by default), a multiple of 64."""
    return max(64, (chunk_bytes // (4 * vocab)) // 64 * 64)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, one chunk of rows at a time, so the
    (N, V) logits are never held whole. When gradients are needed they are computed in the same pass
    (d loss / d logits = softmax - one_hot is known once a chunk's log-sum-exp is), which costs no
    recomputation; backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows, dtype):  # noqa: D401 - autograd signature
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, hidden.size(0), rows):
            h = hidden[s:s + rows].to(dtype)
            t = targets[s:s + rows]
            # float32 log-probs straight from the matmul's logits: one pass over them, where a float32 copy
            # and a separate log-sum-exp were two more
            logp = torch.log_softmax(h @ w.T, dim=-1, dtype=torch.float32)
            total -= logp.gather(1, t[:, None]).sum()
            if need_h or need_w:
                probs = logp.exp_()  # softmax, in place
                probs[torch.arange(t.numel(), device=t.device), t] -= 1.0
                g = probs.to(dtype)
                if need_h:
                    grad_h[s:s + rows] = g @ w
                if need_w:
                    grad_w += (g.T @ h).float()
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        ctx.need = (need_h, need_w, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        need_h, need_w, w_dtype = ctx.need
        saved = list(ctx.saved_tensors)
        grad_h = grad_w = None
        if need_h:
            g = saved.pop(0)
            grad_h = g * grad_out.to(g.dtype)
        if need_w:
            grad_w = (saved.pop(0) * grad_out).to(w_dtype)
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         rows_per_chunk: int | None = None) -> tuple[torch.Tensor, int]:
    """`token_cross_entropy(hidden @ weight.T, targets)` without materialising the logits.

    hidden: (..., d) final hidden states; weight: (V, d) output embedding; targets: (...) aligned ids or
    IGNORE. Only positions with a target go through the output layer (prompt tokens cost nothing
    there). Under autocast the matmuls run in the autocast dtype, as the plain path's would; log-sum-exp
    and the sum are float32. Returns (sum in float32, number of loss tokens).
    """
    flat = hidden.reshape(-1, hidden.size(-1))
    # Which positions have a target is found where the targets are (the host, in training): finding it on
    # the GPU would make the host wait there for the whole forward.
    tgt = targets.reshape(-1)
    keep = (tgt != IGNORE).nonzero()[:, 0]
    n = int(keep.numel())
    if n == 0:
        return flat.sum() * 0.0, 0
    keep, tgt = keep.to(flat.device, non_blocking=True), tgt.to(flat.device, non_blocking=True)
    dtype = compute_dtype(flat)
    rows = rows_per_chunk or chunk_rows(weight.size(0))
    # Under no_grad a parameter still reads as needing a gradient inside apply(): detach it there.
    weight = weight if torch.is_grad_enabled() else weight.detach()
    total = _LinearCrossEntropy.apply(flat.index_select(0, keep), weight, tgt.index_select(0, keep), rows, dtype)
    return total, n
