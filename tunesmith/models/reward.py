"""Reward models: a causal LM body with a scalar head, scoring a sequence at its last real token.

The score is gathered at positions the data layer reports (`example_ends`), never inferred from the pad
token: transformers' sequence-classification pooling reads the rightmost token that is not the pad
token, so with pad == eos, as in SmolLM2, a sequence ending in `<|im_end|>` is scored one token early.
Packed rows score every example they hold.
"""
from __future__ import annotations

import math
from typing import Any

from tunesmith._core.errors import TunesmithError
from tunesmith.models.methods import is_quantised


def to_reward_model(causal_lm: Any) -> Any:
    """An `AutoModelForSequenceClassification` (num_labels=1) sharing `causal_lm`'s body weights, with a
    new score head initialised N(0, 1/sqrt(hidden+1)) so initial rewards are small."""
    import torch
    from transformers import AutoModelForSequenceClassification

    if is_quantised(causal_lm):
        raise TunesmithError("a reward model is built from an unquantised model; load it without qlora")
    config = causal_lm.config.__class__.from_dict(causal_lm.config.to_dict())
    config.num_labels = 1
    config.pad_token_id = causal_lm.config.pad_token_id
    reward = AutoModelForSequenceClassification.from_config(config, dtype=causal_lm.dtype)
    reward.model.load_state_dict(causal_lm.model.state_dict(), strict=True)
    with torch.no_grad():
        reward.score.weight.normal_(0.0, 1.0 / math.sqrt(config.hidden_size + 1))
    return reward.to(next(causal_lm.parameters()).device)


def sequence_scores(model: Any, batch: dict) -> "torch.Tensor":
    """Scalar score of every example in a collated batch, shape (E,), read at `example_ends`.

    Works for a plain reward model and for one wrapped by PEFT (LoRA layers live inside the body).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(base.parameters()).device
    hidden = base.model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                        use_cache=False).last_hidden_state
    ends = batch["example_ends"].to(device)
    last = hidden[ends[:, 0], ends[:, 1]]  # (E, H)
    return base.score(last).squeeze(-1).float()
