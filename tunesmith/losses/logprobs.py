"""Per-sequence log-probabilities of target tokens: the input every preference loss is built on."""
from __future__ import annotations

import torch

from tunesmith._core.precision import compute_dtype
from tunesmith.losses.cross_entropy import IGNORE, chunk_rows


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over positions t with targets[b, t] != IGNORE of log p(targets[b, t] | x_<=t), per sequence.

        sum_logps[b] = sum_t mask[b, t] * log_softmax(logits[b, t])[targets[b, t]]
        n_tokens[b]  = sum_t mask[b, t]

    logits: (B, T, V); targets: (B, T), already aligned with the position that predicts them (as in
    `token_cross_entropy`). Returns (sum_logps (B,) float32, n_tokens (B,) int64). The length-normalised
    log-probability that SimPO, ORPO and TRL's IPO use is `sum_logps / n_tokens`, left to the caller
    because DPO wants the sum; a row with no target tokens has sum 0 and n 0.

    Memory: the float32 cast and `log_softmax` each materialise a (B, T, V) tensor of 4 bytes per entry
    (B=8, T=2048, V=128k: 8 GiB each, twice the bf16 logits), and autograd keeps the log-softmax for backward.
    Callers near that limit should call this on slices of the batch rather than drop to bf16, whose
    per-token log-probs carry about 3 significant digits: summed over hundreds of tokens that error is
    the size of the chosen-minus-rejected differences the preference losses are driven by.
    """
    mask = targets != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    # Ignored positions gather index 0 (any valid index) and are then zeroed by the mask.
    token_logps = logp.gather(-1, targets.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)



def sum_by_sequence(values: torch.Tensor, sequence: torch.Tensor, n_sequences: int) -> torch.Tensor:
    """(n_sequences,) float32 sums of `values` (K,) by their sequence index `sequence` (K,)."""
    out = torch.zeros(n_sequences, dtype=torch.float32, device=values.device)
    return out.index_add(0, sequence.to(values.device), values.float())


def _scored(targets: torch.Tensor, sequence: torch.Tensor, n_sequences: int, device: torch.device):
    """(positions with a target, their targets, their sequence indices, target tokens per sequence), found
    where the targets are (the host, in training: no wait for the GPU) and returned on `device`."""
    tgt, seq = targets.reshape(-1), sequence.reshape(-1).to(targets.device)
    keep = (tgt != IGNORE).nonzero()[:, 0]
    counts = torch.zeros(n_sequences, dtype=torch.long, device=keep.device).index_add_(
        0, seq[keep], torch.ones_like(keep))
    return tuple(t.to(device, non_blocking=True) for t in (keep, tgt[keep], seq[keep], counts))


def flat_sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, sequence: torch.Tensor,
                           n_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logprobs` of sequences laid end to end: logits (..., V), targets (...) and `sequence`
    (...), each position's sequence index. Returns (sum_logps (S,) float32, n_tokens (S,) int64)."""
    keep, tgt, seq, counts = _scored(targets, sequence, n_sequences, logits.device)
    logp = torch.log_softmax(logits.reshape(-1, logits.size(-1)).index_select(0, keep).float(), dim=-1)
    return sum_by_sequence(logp.gather(-1, tgt[:, None])[:, 0], seq, n_sequences), counts


class _LinearTokenStats(torch.autograd.Function):
    """Per row of z = scale · (hidden @ weight.T): log p(target) = z[target] − logsumexp(z) and, if asked,
    the entropy H = logsumexp(z) − Σ p z, one chunk of rows at a time, so the (K, V) logits are never held
    whole. The incoming gradients g (log-prob) and e (entropy) make
        dz = g·(onehot − p) − e·p·(z − Σ p z),
    linear in g and e per row. With a frozen output layer (LoRA: only the hidden states need a gradient)
    forward therefore computes each row's two input-gradient directions, (onehot − p)·W and
    −p·(z − Σ p z)·W (times scale), while it has the chunk's logits, and backward only scales them by g and
    e: the logits are computed once. Where the output layer trains, forward keeps each row's log-sum-exp
    (and Σ p z) and backward recomputes a chunk's logits, as activation checkpointing would. An entropy
    asked for as a value only (`entropy_grad` False: a metric) is not differentiable and costs no direction."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows, dtype, scale, with_entropy, entropy_grad):  # noqa: D401
        early = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        w = weight.to(dtype)
        n = hidden.size(0)
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        mean_z = torch.empty_like(out) if with_entropy else out.new_empty(0)
        toward_lp = torch.empty(n, w.size(1), dtype=dtype, device=hidden.device) if early else None
        toward_ent = torch.empty_like(toward_lp) if early and with_entropy and entropy_grad else None
        for s in range(0, n, rows):
            z = _chunk_logits(hidden[s:s + rows], w, dtype, scale)
            t = targets[s:s + rows, None]
            logp = torch.log_softmax(z, dim=-1, dtype=torch.float32)  # one float32 pass over the logits
            out[s:s + rows] = logp.gather(1, t)[:, 0]
            lse[s:s + rows] = z.gather(1, t)[:, 0].float() - out[s:s + rows]
            if not (with_entropy or early):
                continue
            p = logp.exp_()
            if with_entropy:
                mean_z[s:s + rows] = (p * z).sum(-1)
            if toward_ent is not None:  # -p·(z - Σpz)
                dz = z.float().sub_(mean_z[s:s + rows, None]).mul_(p).mul_(-scale)
                toward_ent[s:s + rows] = dz.to(dtype) @ w
            if early:  # onehot - p
                dz = p.mul_(-scale)
                dz.scatter_add_(1, t, torch.full(t.shape, scale, dtype=dz.dtype, device=dz.device))
                toward_lp[s:s + rows] = dz.to(dtype) @ w
        if early:
            ctx.save_for_backward(toward_lp, *(() if toward_ent is None else (toward_ent,)))
        else:
            ctx.save_for_backward(hidden, weight, targets, lse, mean_z)
        ctx.meta = (rows, dtype, scale, with_entropy and entropy_grad, early, hidden.dtype)
        entropy = lse - mean_z if with_entropy else out.new_empty(0)
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return out, entropy

    @staticmethod
    def backward(ctx, grad_out, grad_entropy):
        rows, dtype, scale, with_entropy, early, h_dtype = ctx.meta
        if early:
            toward_lp, *toward_ent = ctx.saved_tensors
            grad_h = torch.zeros(toward_lp.shape, dtype=torch.float32, device=toward_lp.device)
            if grad_out is not None:
                grad_h.addcmul_(grad_out.float()[:, None], toward_lp)
            if toward_ent and grad_entropy is not None:
                grad_h.addcmul_(grad_entropy.float()[:, None], toward_ent[0])
            return grad_h.to(h_dtype), None, None, None, None, None, None, None
        hidden, weight, targets, lse, mean_z = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        use_entropy = with_entropy and grad_entropy is not None
        w = weight.to(dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, hidden.size(0), rows):
            h, t = hidden[s:s + rows].to(dtype), targets[s:s + rows]
            g = grad_out[s:s + rows].float() if grad_out is not None else torch.zeros_like(lse[s:s + rows])
            z = _chunk_logits(h, w, dtype, scale)
            p = torch.softmax(z, dim=-1, dtype=torch.float32)
            if use_entropy:  # -g·p - e·p·(z - Σpz), in float32
                e = grad_entropy[s:s + rows].float()
                z = z.float()
                dz = z.sub_(mean_z[s:s + rows, None]).mul_(e[:, None]).add_(g[:, None]).mul_(p).neg_()
            else:
                dz = p.mul_(-g[:, None])
            dz[torch.arange(t.numel(), device=t.device), t] += g
            if scale != 1.0:
                dz.mul_(scale)
            d = dz.to(dtype)
            if need_h:
                grad_h[s:s + rows] = (d @ w).to(hidden.dtype)
            if need_w:
                grad_w += (d.T @ h).float()
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None, None, None


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """A chunk's logits as the matmul gives them (float32 from here on only where they are scaled)."""
    z = h.to(dtype) @ w.T
    return z if scale == 1.0 else z.float().mul_(scale)


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float = 1.0, entropy: bool = False, rows_per_chunk: int | None = None,
                          entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p(targets[k]) (K,), entropy (K,) or None) under softmax((hidden[k] @ weight.T) / temperature),
    without materialising the (K, V) logits: hidden (K, d) the final hidden states of the positions that
    predict `targets` (K,), weight (V, d) the output embedding. Under autocast the matmuls run in the
    autocast dtype; log-sum-exp, log-probs and entropies are float32. Both outputs carry gradients, but for
    an entropy asked for with `entropy_grad=False`: a value to report, whose backward direction (a second
    matmul against `weight` per chunk, where the output layer is frozen) is never computed."""
    dtype = compute_dtype(hidden)
    weight = weight if torch.is_grad_enabled() else weight.detach()  # see linear_cross_entropy
    logps, ent = _LinearTokenStats.apply(hidden, weight, targets, rows_per_chunk or chunk_rows(weight.size(0)),
                                         dtype, 1.0 / temperature, entropy, entropy_grad)
    return logps, (ent if entropy else None)


def linear_sequence_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             sequence: torch.Tensor, n_sequences: int,
                             rows_per_chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`flat_sequence_logprobs(hidden @ weight.T, ...)` without materialising the logits: hidden (..., d)
    final hidden states, weight (V, d) the output embedding, targets and `sequence` (...). Only positions
    with a target go through the output layer. Under autocast the matmuls run in the autocast dtype;
    log-sum-exp and sums are float32."""
    flat = hidden.reshape(-1, hidden.size(-1))
    keep, tgt, seq, counts = _scored(targets, sequence, n_sequences, flat.device)
    token_logps, _ = linear_token_logprobs(flat.index_select(0, keep), weight, tgt, rows_per_chunk=rows_per_chunk)
    return sum_by_sequence(token_logps, seq, n_sequences), counts
