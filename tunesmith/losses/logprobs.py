"""Per-sequence log-probabilities of target tokens: the input every preference loss is built on."""
from __future__ import annotations

import torch

from tunesmith.losses.cross_entropy import IGNORE


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
