"""Reward-model metrics on held-out preference pairs: how often the chosen answer scores higher."""
from __future__ import annotations

from typing import Any

from tunesmith.data.preference import PairExample, collate_pairs
from tunesmith.models.reward import sequence_scores


def pairwise_metrics(model: Any, groups: list[list[PairExample]], pad_id: int,
                     batch_size: int = 16) -> dict[str, float]:
    """accuracy: share of pairs with r_chosen > r_rejected (ties count half); mean_margin: mean of
    r_chosen - r_rejected; plus the mean scores of each side."""
    import torch

    was_training = model.training
    model.eval()
    margins, chosen = [], []
    with torch.no_grad():
        for i in range(0, len(groups), batch_size):
            scores = sequence_scores(model, collate_pairs(groups[i:i + batch_size], pad_id))
            c, r = scores.chunk(2)
            margins.append(c - r)
            chosen.append(c)
    model.train(was_training)
    m, c = torch.cat(margins), torch.cat(chosen)
    accuracy = ((m > 0).float() + 0.5 * (m == 0).float()).mean()
    return {"accuracy": float(accuracy), "mean_margin": float(m.mean()), "mean_chosen": float(c.mean()),
            "mean_rejected": float((c - m).mean()), "n_pairs": int(m.numel())}
