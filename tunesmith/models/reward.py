"""Sequence-level heads on a causal LM body: a reward model's scalar score, a classifier's K logits, both
read at each example's last real token; and a reward model made into PPO's critic.

The head reads positions the data layer reports (`example_ends`), never inferred from the pad token:
transformers' sequence-classification pooling reads the rightmost token that is not the pad token, so
with pad == eos, as in SmolLM2, a sequence ending in `<|im_end|>` is scored one token early. Packed rows
score every example they hold.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from tunesmith._core.errors import TunesmithError
from tunesmith.models.methods import is_quantised


def to_sequence_classifier(causal_lm: Any, labels: Sequence[str]) -> Any:
    """An `AutoModelForSequenceClassification` with one output per label (`config.id2label` names them),
    sharing `causal_lm`'s body weights, with a new score head initialised N(0, 1/sqrt(hidden+1)) so
    initial outputs are small."""
    import torch
    from transformers import AutoModelForSequenceClassification

    if is_quantised(causal_lm):
        raise TunesmithError("a sequence head is built on an unquantised model; load it without qlora")
    config = causal_lm.config.__class__.from_dict(causal_lm.config.to_dict())
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    config.pad_token_id = causal_lm.config.pad_token_id
    model = AutoModelForSequenceClassification.from_config(config, dtype=causal_lm.dtype)
    model.model.load_state_dict(causal_lm.model.state_dict(), strict=True)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0 / math.sqrt(config.hidden_size + 1))
    return model.to(next(causal_lm.parameters()).device)


def to_reward_model(causal_lm: Any) -> Any:
    """A scalar-head reward model: a one-output sequence classifier (transformers' own name for it)."""
    return to_sequence_classifier(causal_lm, ["LABEL_0"])


def sequence_logits(model: Any, batch: dict) -> "torch.Tensor":
    """The head's outputs for every example in a collated batch, shape (E, K), read at `example_ends`.

    Works for a plain model and for one wrapped by PEFT (LoRA layers live inside the body).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(base.parameters()).device
    hidden = base.model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                        use_cache=False).last_hidden_state
    ends = batch["example_ends"].to(device)
    last = hidden[ends[:, 0], ends[:, 1]]  # (E, H)
    return base.score(last).float()


def sequence_scores(model: Any, batch: dict) -> "torch.Tensor":
    """A reward model's scalar score of every example in a collated batch, shape (E,)."""
    return sequence_logits(model, batch).squeeze(-1)


def critic_from_reward_model(path: str, lora: Any, tokenizer: Any) -> Any:
    """A trainable copy of the `recipe: reward` model at `path`, to serve as PPO's critic (`rl.value_model`):
    its adapter, if it has one, merged into its body, and a new LoRA adapter (`lora`, a LoraConfig) on that
    body, its scalar head trained beside it. The critic reads the policy's token ids, so the reward model's
    vocabulary must be `tokenizer`'s."""
    from tunesmith.config import MethodConfig, ModelConfig
    from tunesmith.models.load import load_model_and_tokenizer
    from tunesmith.models.methods import apply_method, is_sequence_classifier

    model, own = load_model_and_tokenizer(ModelConfig(name=path), method="lora", for_training=True)
    if not is_sequence_classifier(model) or model.config.num_labels != 1:
        raise TunesmithError(f"rl.value_model '{path}' is not a reward model (train one with recipe: reward)")
    if own.get_vocab() != tokenizer.get_vocab():
        raise TunesmithError(f"rl.value_model '{path}': its tokenizer is not the policy's; the critic reads the "
                             "policy's token ids, so it must be a reward model trained on the policy's base")
    return apply_method(model, MethodConfig(kind="lora", lora=lora))
