"""Choose which weights train: all (full), the last blocks and/or head (freeze), or PEFT adapters
(lora, dora, qlora)."""
from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any, Callable

from tunesmith._core.errors import TunesmithError
from tunesmith.config import MethodConfig

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


def is_quantised(model: "torch.nn.Module") -> bool:
    """True when any parameter is a bitsandbytes 4-bit parameter."""
    return any(_is_params4bit(p) for p in model.parameters())


def _is_params4bit(p: "torch.Tensor") -> bool:
    # bitsandbytes is only imported by quantised loading; without it no Params4bit can exist.
    if "bitsandbytes" not in sys.modules:
        return False
    import bitsandbytes as bnb

    return isinstance(p, bnb.nn.Params4bit)


def is_reward_model(model: Any) -> bool:
    """A scalar-head model from `models.reward.to_reward_model`."""
    return type(model).__name__.endswith("ForSequenceClassification")


def _apply_full(model: "PreTrainedModel", method: MethodConfig) -> "PreTrainedModel":
    model.requires_grad_(True)
    return model


def untie_output_embeddings(model: "PreTrainedModel") -> None:
    """Give lm_head its own copy of the tied input embedding, so training the head leaves embeddings alone."""
    import torch

    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is embed.weight:
        head.weight = torch.nn.Parameter(embed.weight.detach().clone())
    # Recorded so save/reload and later tie_weights() calls keep them apart.
    model.config.tie_word_embeddings = False
    assert head.weight is not embed.weight


def _apply_freeze(model: "PreTrainedModel", method: MethodConfig) -> "PreTrainedModel":
    f = method.freeze
    layers = model.model.layers
    if f.train_last_n_layers > len(layers):
        raise TunesmithError(
            f"method.freeze.train_last_n_layers={f.train_last_n_layers} but the model has {len(layers)} layers"
        )
    if f.train_last_n_layers == 0 and not f.train_norm and not f.train_lm_head:
        raise TunesmithError(
            "method.freeze trains nothing: set train_last_n_layers > 0, train_norm or train_lm_head"
        )
    model.requires_grad_(False)
    if is_reward_model(model):
        model.score.requires_grad_(True)  # a new head always trains; there is no lm_head to untie
    elif f.train_lm_head:
        untie_output_embeddings(model)
        model.get_output_embeddings().requires_grad_(True)
    if f.train_last_n_layers:  # layers[-0:] would be every layer
        for block in layers[-f.train_last_n_layers:]:
            block.requires_grad_(True)
    if f.train_norm:
        model.model.norm.requires_grad_(True)
    return model


def _apply_lora(model: "PreTrainedModel", method: MethodConfig) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method.kind == "qlora":
        # Casts norms and other non-quantised weights to fp32 and enables input grads for the adapters.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = method.lora
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_dora=method.kind == "dora",
        # SEQ_CLS makes PEFT train and save the new score head beside the adapters.
        task_type="SEQ_CLS" if is_reward_model(model) else "CAUSAL_LM",
    )
    return get_peft_model(model, config)


_METHODS: dict[str, Callable[["PreTrainedModel", MethodConfig], Any]] = {
    "full": _apply_full,
    "freeze": _apply_freeze,
    "lora": _apply_lora,
    "dora": _apply_lora,
    "qlora": _apply_lora,
}


def apply_method(model: "PreTrainedModel", method: MethodConfig) -> Any:
    """Mark the weights `method.kind` trains; lora/dora/qlora return a PeftModel wrapping `model`."""
    quantised = is_quantised(model)
    if quantised and method.kind != "qlora":
        raise TunesmithError(f"method.kind={method.kind} cannot train a 4-bit model; load it with method qlora")
    if method.kind == "qlora" and not quantised:
        raise TunesmithError("method.kind=qlora needs a 4-bit base: load the model with method='qlora'")
    return _METHODS[method.kind](model, method)


def _real_numel(p: "torch.Tensor") -> int:
    if _is_params4bit(p):
        # A 4-bit weight is stored packed (two values per byte); its quant_state keeps the true shape.
        assert p.quant_state is not None, "Params4bit before quantisation"
        return math.prod(p.quant_state.shape)
    return p.numel()


def count_parameters(model: "torch.nn.Module") -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count by their unpacked size, tied weights once."""
    trainable = total = 0
    for p in model.parameters():
        n = _real_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def describe_trainable(model: "torch.nn.Module") -> str:
    """E.g. 'trainable 1,234,567 of 135,000,000 parameters (0.91%)'."""
    trainable, total = count_parameters(model)
    return f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"
