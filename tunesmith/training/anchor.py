"""`train.weight_anchor`: the penalty λ/2 · Σ ||W − W_start||² (losses.anchor) on the weights a run
changes, with W_start the weights the run started from."""
from __future__ import annotations

import torch

from tunesmith._core.errors import TunesmithError
from tunesmith.losses.anchor import l2_to_start, lora_update_sq_norm

ANCHORED_METHODS = ("full", "freeze", "lora", "qlora")  # where W − W_start is a weight or a plain s·BA


class WeightAnchor:
    """Built when fit() starts, before a resume loads its checkpoint, so W_start is the run's start."""

    def __init__(self, model: torch.nn.Module, weight: float):
        from peft.tuners.lora import LoraLayer

        self.weight = weight
        # the LoRA adapters this run trains (a stack's lower levels are frozen and part of W_start)
        self.lora = [(m, name) for m in model.modules() if isinstance(m, LoraLayer)
                     for name in m.active_adapters if name in m.lora_A and m.lora_A[name].weight.requires_grad]
        if self.lora:
            if any(m.use_dora.get(name) for m, name in self.lora):
                raise TunesmithError("train.weight_anchor does not apply to dora (its update is not B A)")
            self.params, self.start = [], []
        else:
            self.params = [p for p in model.parameters() if p.requires_grad]
            self.start = [p.detach().clone() for p in self.params]

    def __call__(self) -> torch.Tensor:
        """The penalty λ/2 · R, to add once per optimiser step."""
        if self.lora:
            total = sum(lora_update_sq_norm(m.lora_A[name].weight, m.lora_B[name].weight, m.scaling[name])
                        for m, name in self.lora)
        else:
            total = l2_to_start(self.params, self.start)
        return 0.5 * self.weight * total
