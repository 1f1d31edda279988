"""Perplexity on held-out text: how much general language modelling a run kept (or lost)."""
from __future__ import annotations

import math
from typing import Any

import torch

from tunesmith._core import dist
from tunesmith._core.batches import in_batches
from tunesmith._core.errors import DataError
from tunesmith._core.modes import evaluating
from tunesmith.data import collate, read_conversations, shift_labels, tokenize_conversation
from tunesmith.losses import token_cross_entropy


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, path: str, *, limit: int | None = None, max_seq_len: int = 512,
               batch_size: int = 16, shared: bool = False) -> dict[str, float]:
    """exp(mean NLL per scored token) over the rows of `path` (any SFT format: `text` rows score every
    token, chat rows their assistant turns), each row scored alone in a padded batch; rows longer than
    `max_seq_len` are cut. Returns {"perplexity", "nll", "tokens"}. `shared` (data parallel; every process
    calls it): process r scores rows r, r + N, ..., and the sums are combined."""
    issues: list = []
    convs = read_conversations([path], "auto", issues)
    DataError.raise_if_any(issues)
    rows = []
    for conv in convs[:limit]:
        ids, labels = tokenize_conversation(tokenizer, conv)
        rows.append([shift_labels(ids[:max_seq_len], labels[:max_seq_len])])
    device = next(model.parameters()).device

    def run(start: int, stop: int) -> tuple[float, int]:
        batch = collate(rows[start:stop], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                       use_cache=False).logits
        loss, n = token_cross_entropy(logits, batch["targets"].to(device))
        return float(loss), n

    if shared:
        rows = dist.share(rows)
    with evaluating(model):
        parts = in_batches(len(rows), batch_size, run, f"perplexity on {path}")
    total, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
    if shared:
        total, count = dist.sum_host([total, count])
        count = int(count)
    nll = total / max(count, 1)
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count}
