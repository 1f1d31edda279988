"""Choose which weights train: all (full), the last blocks and/or head (freeze), PEFT adapters (lora,
dora, qlora, ia3, prefix, prompt) or bottleneck adapters; and what a trained adapter model can do (merge,
switch off)."""
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
    """True when any parameter is a bitsandbytes 4-bit or 8-bit parameter."""
    if "bitsandbytes" not in sys.modules:
        return False
    import bitsandbytes as bnb

    return any(isinstance(p, (bnb.nn.Params4bit, bnb.nn.Int8Params)) for p in model.parameters())


def _is_params4bit(p: "torch.Tensor") -> bool:
    # bitsandbytes is only imported by quantised loading; without it no Params4bit can exist.
    if "bitsandbytes" not in sys.modules:
        return False
    import bitsandbytes as bnb

    return isinstance(p, bnb.nn.Params4bit)


def is_sequence_classifier(model: Any) -> bool:
    """A model with a new sequence-level head instead of the LM head (`models.reward`): a reward model's
    scalar head or a classifier's K-way head (`config.num_labels` tells them apart), PEFT-wrapped or not."""
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
    if f.train_last_n_layers == 0 and not f.train_norm and not f.train_lm_head and not is_sequence_classifier(model):
        raise TunesmithError(  # a new head alone is a real choice: a classifier on a frozen body
            "method.freeze trains nothing: set train_last_n_layers > 0, train_norm or train_lm_head"
        )
    model.requires_grad_(False)
    if is_sequence_classifier(model):
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


def _task_type(model: "PreTrainedModel") -> str:
    # SEQ_CLS makes PEFT train and save the new score head beside the adapters.
    return "SEQ_CLS" if is_sequence_classifier(model) else "CAUSAL_LM"


def peft_tuner_config(method: MethodConfig, task_type: str | None = None) -> Any:
    """PEFT's config for the weight-level methods (lora, dora, qlora, ia3)."""
    if method.kind == "ia3":
        from peft import IA3Config

        ia3 = method.ia3
        auto = ia3.target_modules == "auto"  # None lets PEFT pick the architecture's modules
        return IA3Config(target_modules=None if auto else ia3.target_modules,
                         feedforward_modules=None if auto else ia3.feedforward_modules, task_type=task_type)
    from peft import LoraConfig

    lora = method.lora
    init: Any = True  # PEFT's default: A random, B zero
    if lora.init == "pissa":
        init = f"pissa_niter_{lora.init_svd_iters}" if lora.init_svd_iters else "pissa"
    elif lora.init == "olora":
        init = "olora"
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_rslora=lora.rslora,
                      target_modules=lora.target_modules, use_dora=method.kind == "dora", task_type=task_type,
                      init_lora_weights=init)


ADAPTER_START = "_tunesmith_adapter_start"  # a PiSSA / OLoRA adapter's initial weights, for saving it as LoRA


def record_adapter_start(model: Any) -> None:
    """Keep the initial weights of an adapter that starts from the base's own directions (PiSSA, OLoRA: the
    base keeps W - s B0 A0), so that it can be saved as the plain LoRA update s (B A - B0 A0) for the
    original base (`adapter_start`)."""
    from peft import get_peft_model_state_dict

    setattr(model, ADAPTER_START, {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()})


def adapter_start(model: Any) -> dict[str, "torch.Tensor"] | None:
    """The initial adapter weights `record_adapter_start` kept, None for an adapter that starts at zero."""
    return model.__dict__.get(ADAPTER_START)


def prepare_quantised(model: "PreTrainedModel") -> "PreTrainedModel":
    """Ready a quantised model for adapters: norms and other unquantised weights in fp32, input grads on."""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _apply_lora(model: "PreTrainedModel", method: MethodConfig) -> Any:
    import torch
    from peft import get_peft_model

    if method.lora.fp8_base:  # before the model is touched
        from tunesmith.models.fp8 import check_device
        check_device(next(model.parameters()).device)
    if method.kind == "qlora":
        model = prepare_quantised(model)
    if method.lora.init == "default":
        adapted = get_peft_model(model, peft_tuner_config(method, _task_type(model)))
    else:
        # The randomised SVD draws from a generator of its own: every process of a data-parallel run, and a
        # resumed run, takes the same residual base, whatever the global RNG's state.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            adapted = get_peft_model(model, peft_tuner_config(method, _task_type(model)))
        record_adapter_start(adapted)
    if method.lora.fp8_base:
        from tunesmith.models.fp8 import to_fp8_bases
        if not to_fp8_bases(adapted):
            raise TunesmithError("method.lora.fp8_base: no adapted layer has the shape FP8 matmuls need (both "
                                 "dimensions multiples of 16)")
    return adapted


def _apply_ia3(model: "PreTrainedModel", method: MethodConfig) -> Any:
    from peft import get_peft_model

    return get_peft_model(model, peft_tuner_config(method, _task_type(model)))


def _apply_prefix(model: "PreTrainedModel", method: MethodConfig) -> Any:
    from peft import PrefixTuningConfig, get_peft_model

    from tunesmith.models.virtual_tokens import align

    p = method.prefix
    config = PrefixTuningConfig(num_virtual_tokens=p.num_virtual_tokens, prefix_projection=p.projection,
                                encoder_hidden_size=p.projection_size, task_type="CAUSAL_LM")
    return align(get_peft_model(model, config))


def _apply_prompt(model: "PreTrainedModel", method: MethodConfig) -> Any:
    from peft import PromptTuningConfig, get_peft_model

    from tunesmith.models.virtual_tokens import align

    config = PromptTuningConfig(num_virtual_tokens=method.prompt.num_virtual_tokens, task_type="CAUSAL_LM")
    return align(get_peft_model(model, config))


def _init_prompt_from_text(peft_model: Any, text: str, tokenizer: Any) -> None:
    """Start the soft prompt at the embeddings of `text`'s tokens, repeated to its length (PEFT's own
    text init loads a tokenizer by name; the ids are at hand here)."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise TunesmithError("method.prompt.init_text tokenises to nothing")
    embedding = peft_model.prompt_encoder[peft_model.active_adapter].embedding
    n = embedding.weight.shape[0]
    with torch.no_grad():
        source = peft_model.word_embeddings.weight[torch.tensor((ids * n)[:n], device=embedding.weight.device)]
        embedding.weight.copy_(source.to(embedding.weight.dtype))


def _apply_bottleneck(model: "PreTrainedModel", method: MethodConfig) -> Any:
    from tunesmith.models.bottleneck import BottleneckModel

    return BottleneckModel(model, method.bottleneck)


def _float32_inputs(module: Any, args: tuple) -> tuple:
    import torch

    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def widen_trained_heads(model: Any) -> int:
    """Train a 16-bit base's new scoring head in float32, as its adapters are: a module whose own weights
    all train and are bfloat16 or float16 (PEFT's trained copy of a reward or classifier head) becomes
    float32 and reads its input in float32, so its output (the scores) is float32 too. In 16 bits most of
    AdamW's small updates to it would round away. Returns how many modules it widened."""
    import torch

    widened = 0
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own and all(p.requires_grad for p in own) and any(p.dtype in (torch.bfloat16, torch.float16) for p in own):
            module.float()
            module.register_forward_pre_hook(_float32_inputs)
            widened += 1
    return widened


_METHODS: dict[str, Callable[["PreTrainedModel", MethodConfig], Any]] = {
    "full": _apply_full,
    "freeze": _apply_freeze,
    "lora": _apply_lora,
    "dora": _apply_lora,
    "qlora": _apply_lora,
    "ia3": _apply_ia3,
    "prefix": _apply_prefix,
    "prompt": _apply_prompt,
    "bottleneck": _apply_bottleneck,
}


def apply_method(model: "PreTrainedModel", method: MethodConfig, tokenizer: Any = None) -> Any:
    """Mark the weights `method.kind` trains; every adapter method returns a model wrapping `model` (a
    PeftModel, or a BottleneckModel). On a model that already carries adapters, the new adapter is stacked
    on top of them, frozen (`models.stack`). `tokenizer` is needed only by `prompt.init_text`."""
    quantised = is_quantised(model)
    if is_adapter_model(model):
        from tunesmith.models.stack import StackedModel

        if method.lora.fp8_base or method.lora.init != "default":
            setting = "fp8_base" if method.lora.fp8_base else f"init={method.lora.init}"
            raise TunesmithError(f"method.lora.{setting} needs a plain base model: a stacked adapter leaves the "
                                 "base weights below it as they are")
        if quantised != (method.kind == "qlora"):
            raise TunesmithError(f"method.kind={method.kind} cannot stack on this model: on a quantised (qlora) "
                                 "stack the new adapter is qlora, on an unquantised one it is not")
        if quantised:
            prepare_quantised(model.get_base_model())
        return StackedModel(model, method)
    if quantised and method.kind != "qlora":
        raise TunesmithError(f"method.kind={method.kind} cannot train a quantised model; load it with method qlora")
    if method.kind == "qlora" and not quantised:
        raise TunesmithError("method.kind=qlora needs a quantised base: load the model with method='qlora'")
    if method.kind in ("prefix", "prompt") and is_sequence_classifier(model):
        raise TunesmithError(f"method.kind={method.kind} is for causal language models, not a scoring head")
    adapted = _METHODS[method.kind](model, method)
    if method.kind not in ("full", "freeze"):
        widen_trained_heads(adapted)
    if method.kind == "prompt" and method.prompt.init_text is not None:
        if tokenizer is None:
            raise TunesmithError("method.prompt.init_text needs the tokenizer: apply_method(..., tokenizer=)")
        _init_prompt_from_text(adapted, method.prompt.init_text, tokenizer)
    return adapted


def is_adapter_model(model: Any) -> bool:
    """A base model carrying separately saved adapters (PEFT's or bottleneck)."""
    from peft import PeftModel

    from tunesmith.models.bottleneck import BottleneckModel
    from tunesmith.models.stack import StackedModel

    return isinstance(model, (PeftModel, BottleneckModel, StackedModel))


def has_virtual_tokens(model: Any) -> bool:
    """Prefix or prompt tuning (at any level of a stack): virtual tokens before every row, so rows stay
    padded and unpacked."""
    from tunesmith.models.stack import StackedModel
    from tunesmith.models.virtual_tokens import VirtualTokenModel

    return isinstance(model.levels()[-1] if isinstance(model, StackedModel) else model, VirtualTokenModel)


def is_mergeable(model: Any) -> bool:
    """An adapter whose update is a weight delta (LoRA, DoRA, IA3; every level of a stack) on an
    unquantised base (neither bitsandbytes nor FP8)."""
    from peft import PeftModel

    from tunesmith.models.stack import StackedModel

    from tunesmith.models.fp8 import has_fp8

    if isinstance(model, StackedModel):
        return model.mergeable()
    return (isinstance(model, PeftModel) and not model.active_peft_config.is_prompt_learning
            and not is_quantised(model) and not has_fp8(model))


def load_adapter(base: Any, folder: Any, method: str, stacked: bool = False) -> Any:
    """Attach the adapter saved in `folder` by a run of `method` to `base` (as built for that run; for a
    `stacked` adapter, the adapter model it was stacked on)."""
    from peft import PeftModel

    if stacked:
        from tunesmith.models.stack import StackedModel

        return StackedModel.from_pretrained(base, folder)

    if method == "bottleneck":
        from tunesmith.models.bottleneck import BottleneckModel

        return BottleneckModel.from_pretrained(base, folder)
    model = PeftModel.from_pretrained(base, folder)
    if method in ("prefix", "prompt"):
        from tunesmith.models.virtual_tokens import align

        model = align(model)
    return model


def _real_numel(p: "torch.Tensor") -> int:  # Int8Params hold one byte per value: numel is right
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
