"""Reward-model metrics on preference pairs: how often the chosen answer scores higher."""
from __future__ import annotations

from typing import Any

from tunesmith._core import dist
from tunesmith._core.batches import in_batches
from tunesmith._core.modes import evaluating
from tunesmith.data.preference import PairExample, chosen_rejected, collate_pairs
from tunesmith.models.reward import sequence_scores


def score_pairs(model: Any, groups: list[list[PairExample]], pad_id: int, batch_size: int = 16,
                shared: bool = False) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(chosen scores, rejected scores), one per pair in group order, in eval mode without gradients.
    `shared` (data parallel): each process scores groups r, r + N, ..., and every process gets every score."""
    import torch

    mine = dist.share(groups) if shared else groups

    def run(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch = collate_pairs(mine[start:stop], pad_id)
        return chosen_rejected(sequence_scores(model, batch), batch)

    with evaluating(model), torch.no_grad():
        parts = in_batches(len(mine), batch_size, run, "scoring pairs")
    chosen = torch.cat([c for c, _ in parts]) if parts else torch.zeros(0)
    rejected = torch.cat([r for _, r in parts]) if parts else torch.zeros(0)
    if not shared or dist.world_size() == 1:
        return chosen, rejected
    sizes = [len(g) for g in mine]  # a group's pairs, in order
    per_group = list(zip(chosen.float().cpu().split(sizes), rejected.float().cpu().split(sizes)))
    every = dist.gather_shares(per_group, len(groups))
    return torch.cat([c for c, _ in every]), torch.cat([r for _, r in every])


def pairwise_metrics(model: Any, groups: list[list[PairExample]], pad_id: int,
                     batch_size: int = 16, shared: bool = False) -> dict[str, float]:
    """accuracy: share of pairs with r_chosen > r_rejected (ties count half); mean_margin: mean of
    r_chosen - r_rejected; plus the mean scores of each side. `shared`: as in `score_pairs`."""
    c, r = score_pairs(model, groups, pad_id, batch_size, shared)
    m = c - r
    accuracy = ((m > 0).float() + 0.5 * (m == 0).float()).mean()
    return {"accuracy": float(accuracy), "mean_margin": float(m.mean()), "mean_chosen": float(c.mean()),
            "mean_rejected": float(r.mean()), "n_pairs": int(m.numel())}
