"""Typed configuration: one pydantic model per recipe, loaded from YAML with `key.sub=value` overrides.

Defaults live here and only here. Unknown keys are errors that name the key and the nearest valid one.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import re
from pathlib import Path
from typing import Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError, field_validator, model_validator

from tunesmith._core.errors import TunesmithError


class _Strict(BaseModel):
    # no inf or nan in any number: `train.lr=nan` would train on nothing but nan
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    """Which pretrained model to start from."""

    name: str = Field(
        "default",
        description="`default` (bundled SmolLM2-135M-Instruct), `tiny` (random-initialised test Llama), "
        "an HF model folder, a `.gguf` file, or a tunesmith run directory (its `final/`).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype of the loaded model (float16 trains under train.precision fp16 or auto). "
                            "auto: bfloat16 on a GPU with bfloat16 arithmetic, for inference and for methods that "
                            "train beside a frozen base (adapters, freeze), and for full where float32 would "
                            "not fit the GPU; else float32 (CPUs).")
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="Attention kernel.")
    adapter: Literal["merge", "stack"] = Field(
        "merge", description="Training from a run that holds an adapter: `merge` it into its base first, or "
        "`stack` a new adapter on top of it (it stays frozen and separate; lora, qlora, ia3 or bottleneck).")


class LoraConfig(_Strict):
    """Low-rank adapter settings (used by methods lora, dora and qlora)."""

    r: int = Field(16, gt=0, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    rslora: bool = Field(False, description="Rank-stabilised LoRA: scale the update by alpha / sqrt(r) instead "
                         "of alpha / r, so a higher rank keeps learning at the same learning rate (Kalajdzievski "
                         "2023). Saved in the adapter's config: PEFT and every loader here read it back.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="`all-linear` or a list of module names such as [q_proj, v_proj]."
    )
    init: Literal["default", "pissa", "olora"] = Field(
        "default", description="method lora: how the adapter starts. default: A random, B zero (the update starts "
                               "at 0); pissa: A and B from the weight's r principal singular vectors, the base "
                               "keeping the residual (Meng et al. 2024); olora: from the weight's QR decomposition "
                               "(Büyükakyüz 2024). pissa and olora leave the model's outputs as they were; the "
                               "saved adapter is plain LoRA of rank 2r for the original base.")
    init_svd_iters: NonNegativeInt = Field(
        16, description="init pissa: iterations of the randomised SVD (fast, as the paper's PiSSA uses); 0: the "
                        "exact SVD.")
    fp8_base: bool = Field(
        False, description="method lora: store the frozen base weight of every adapted layer in FP8 (e4m3, a "
                           "scale per output row; half of bf16's memory) and run its forward product in FP8 "
                           "(Hopper/Ada GPUs; the CPU has a slow reference). The saved adapter is plain LoRA.")


class FreezeConfig(_Strict):
    """Frozen-body settings (method freeze): everything not named here stays frozen."""

    train_last_n_layers: int = Field(2, ge=0, description="Train the last N transformer blocks.")
    train_lm_head: bool = Field(True, description="Train the output layer (unties tied embeddings).")
    train_norm: bool = Field(True, description="Train the final norm.")


class QuantConfig(_Strict):
    """The quantised base under method qlora (bitsandbytes, on CPU or CUDA)."""

    bits: Literal[4, 8] = Field(4, description="4: NF4/FP4 weights (QLoRA); 8: LLM.int8 weights.")
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="4-bit: also quantise the per-block scales (saves ~0.4 bit "
                               "per weight).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="4-bit: dtype the de-quantised weights compute in (auto: model.dtype).")

    @model_validator(mode="after")
    def _four_bit_options(self) -> "QuantConfig":
        if self.bits == 8 and (self.type != "nf4" or not self.double_quant or self.compute_dtype != "auto"):
            raise ValueError("method.quant.type, double_quant and compute_dtype apply to bits 4 only")
        return self


class IA3Config(_Strict):
    """IA3 settings (method ia3): learned per-feature scales on keys, values and the feed-forward input."""

    target_modules: Union[Literal["auto"], list[str]] = Field(
        "auto", description="Layers whose activations are rescaled (auto: PEFT's choice for the architecture, "
                            "k_proj, v_proj, down_proj for Llama).")
    feedforward_modules: Union[Literal["auto"], list[str]] = Field(
        "auto", description="Those of target_modules whose input (not output) is rescaled.")

    @model_validator(mode="after")
    def _feedforward_among_targets(self) -> "IA3Config":
        if (self.feedforward_modules == "auto") != (self.target_modules == "auto"):
            raise ValueError("method.ia3: give both target_modules and feedforward_modules, or neither")
        if isinstance(self.target_modules, list) and not set(self.feedforward_modules) <= set(self.target_modules):
            raise ValueError("method.ia3.feedforward_modules must be a subset of target_modules")
        return self


class PrefixConfig(_Strict):
    """Prefix tuning (method prefix): trained keys and values every layer attends to before the input."""

    num_virtual_tokens: int = Field(16, gt=0, description="Prefix length per layer.")
    projection: bool = Field(False, description="Produce the prefix through a two-layer MLP (steadier training, "
                             "more trained parameters).")
    projection_size: int = Field(256, gt=0, description="Hidden size of that MLP.")


class PromptConfig(_Strict):
    """Prompt tuning (method prompt): trained input embeddings placed before every input."""

    num_virtual_tokens: int = Field(16, gt=0, description="Number of soft-prompt embeddings.")
    init_text: str | None = Field(None, description="Start from the embeddings of this text's tokens (repeated "
                                  "to num_virtual_tokens); null: random.")


class BottleneckConfig(_Strict):
    """Bottleneck adapters (method bottleneck): x + scale * up(act(down(x))) after attention and/or MLP."""

    size: int = Field(64, gt=0, description="Bottleneck width.")
    after: list[Literal["attention", "mlp"]] = Field(
        ["attention", "mlp"], min_length=1, description="Sub-blocks whose output passes through an adapter.")
    activation: Literal["relu", "gelu", "silu"] = Field("relu", description="The nonlinearity.")
    scale: float = Field(1.0, gt=0, description="Multiplies the adapter's output.")


class MethodConfig(_Strict):
    """How weights are updated."""

    kind: Literal["full", "freeze", "lora", "dora", "qlora", "ia3", "prefix", "prompt", "bottleneck"] = Field(
        "lora", description="full: all weights; freeze: last N blocks and/or head; lora/dora: low-rank "
                            "adapters; qlora: LoRA on a 4- or 8-bit base; ia3: learned scales; prefix/prompt: "
                            "trained virtual tokens; bottleneck: small residual MLP adapters.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    ia3: IA3Config = Field(default_factory=IA3Config)
    prefix: PrefixConfig = Field(default_factory=PrefixConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    bottleneck: BottleneckConfig = Field(default_factory=BottleneckConfig)

    @model_validator(mode="after")
    def _fp8_base_is_lora(self) -> "MethodConfig":
        if self.lora.fp8_base and self.kind != "lora":
            raise ValueError(f"method.lora.fp8_base applies to method lora, not {self.kind} (DoRA normalises "
                             "against the base weight; qlora's base is already quantised)")
        if self.lora.init != "default":
            if self.kind != "lora":
                raise ValueError(f"method.lora.init={self.lora.init} applies to method lora, not {self.kind}")
            if self.lora.fp8_base:
                raise ValueError(f"method.lora.init={self.lora.init} does not go with lora.fp8_base (the residual "
                                 "base weight would be rounded to FP8 under the adapter it was taken from)")
        return self


_TEMPLATE_ROLES = ("system", "user", "assistant")


def as_paths(value: str | list[str] | None) -> list[str]:
    """A config's file field (one path, a list, or none) as a list."""
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _some_files(value: str | list[str] | None) -> str | list[str] | None:
    """A `train` field's check: an empty list names no file (it would end as "no example is left")."""
    if isinstance(value, list) and not value:
        raise ValueError("an empty list names no file: give one path or a list of them")
    return value


class MixtureTaskConfig(_Strict):
    """One task of a data mixture: its files, its share of each epoch, and optional prompt templates."""

    name: str = Field(..., min_length=1, description="Names the task in stats and errors; unique in the mixture.")
    train: Union[str, list[str]] = Field(..., description="The task's file(s), in any format data.train reads.")
    _train_names_files = field_validator("train")(_some_files)
    weight: float = Field(1.0, gt=0, description="The task's share of each epoch: weight / sum of the weights.")
    templates: list[dict[str, str]] | None = Field(
        None, min_length=1, description="Each maps role (system, user, assistant) to a Python format string over "
        "the row's fields, e.g. {user: 'Q: {question}', assistant: '{answer}'}; one is picked per row (seeded). "
        "null: the row's own format (data.format).")
    validation: Union[str, list[str], None] = Field(
        None, description="The task's validation file(s); else data.validation_split of its rows is held out.")

    @field_validator("templates")
    @classmethod
    def _templates_parse(cls, templates: list[dict[str, str]] | None) -> list[dict[str, str]] | None:
        import string

        for i, template in enumerate(templates or []):
            unknown = sorted(set(template) - set(_TEMPLATE_ROLES))
            if unknown or not {"user", "assistant"} <= set(template):
                raise ValueError(f"template {i} has roles {sorted(template)}: it needs user and assistant, and "
                                 "may add system")
            for role, text in template.items():
                try:  # a syntax error or a positional field would otherwise show up at the first row
                    names = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
                except ValueError as err:
                    raise ValueError(f"template {i} {role}: {err}") from None
                if any(not n or n[0].isdigit() for n in names):
                    raise ValueError(f"template {i} {role}: name a row field in every {{}} (e.g. {{question}})")
        return templates


class DataConfig(_Strict):
    """Training data and how it becomes token ids."""

    train: Union[str, list[str], None] = Field(
        None, description="File(s) or HF dataset folder(s): JSONL, Parquet, CSV; or give data.mixture instead.")
    _train_names_files = field_validator("train")(_some_files)
    mixture: list[MixtureTaskConfig] | None = Field(
        None, min_length=1, description="Weighted tasks (each with its own files and templates) instead of "
        "data.train; every epoch draws each task's share of data.examples_per_epoch.")
    examples_per_epoch: int | None = Field(
        None, gt=0, description="mixture: examples in one epoch (null: the tasks' training rows summed).")
    streaming: bool = Field(
        False, description="mixture: read JSONL rows from disk when a batch needs them (8 bytes of index per "
        "row) instead of loading every file; no packing, no truncation=drop.")
    validation: Union[str, list[str], None] = Field(None, description="Validation file(s); else split from train.")
    validation_split: float = Field(
        0.05, ge=0, lt=1, description="Fraction of train held out for validation when no file is given."
    )
    format: Literal["auto", "messages", "alpaca", "sharegpt", "prompt_completion", "text"] = Field(
        "auto", description="Row format; `auto` detects it from the fields of each row."
    )
    max_seq_len: int = Field(512, gt=1, description="Longest tokenised example.")
    truncation: Literal["error", "drop", "truncate"] = Field(
        "truncate", description="Examples over max_seq_len: fail, skip them, or cut them at the end."
    )
    packing: bool = Field(False, description="Pack several examples per row with no cross-example attention.")
    chat_template: Union[Literal["tokenizer", "chatml"], str] = Field(
        "tokenizer", description="`tokenizer` (its own template), `chatml`, or a path to a Jinja template file."
    )

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if (self.train is None) == (self.mixture is None):
            raise ValueError("give data.train or data.mixture, not both" if self.train is not None else
                             "data needs train (one dataset) or mixture (weighted tasks)")
        if self.mixture is None:
            if self.streaming or self.examples_per_epoch is not None:
                raise ValueError("data.streaming and data.examples_per_epoch apply to data.mixture (one dataset "
                                 "is a mixture of one task: mixture: [{name: all, train: ...}])")
            return self
        if self.validation is not None:
            raise ValueError("with data.mixture, give validation files per task (data.mixture[].validation)")
        names = [t.name for t in self.mixture]
        if len(set(names)) < len(names):
            raise ValueError(f"data.mixture task names must be unique, got {names}")
        if self.streaming:
            if self.packing:  # first-fit-decreasing packing needs every example's length before the first step
                raise ValueError("data.streaming cannot pack (a packed layout needs every length up front): "
                                 "set data.packing=false")
            if self.truncation == "drop":  # an epoch's slots are fixed up front; a streamed row cannot vanish
                raise ValueError("data.streaming cannot drop long examples lazily: use data.truncation "
                                 "truncate or error")
            for task in self.mixture:
                for path in as_paths(task.train) + as_paths(task.validation):
                    if not path.lower().endswith(".jsonl"):
                        raise ValueError(f"data.streaming reads JSON Lines only: {path} (task {task.name}) is "
                                         "not a .jsonl file")
        return self


SHARD_FROM = 100_000_000  # trainable weights from which `train.shard_optimizer: auto` shards the optimiser state


class TrainConfig(_Strict):
    """The optimisation loop."""

    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored if max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Optimiser steps; overrides epochs.")
    micro_batch_size: int = Field(8, gt=0, description="Examples (or packed rows) per forward pass.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimiser step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="Decay after warm-up.")
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="Fraction of steps spent warming up linearly.")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = Field(
        "adamw", description="adamw (torch's; over bfloat16 weights, one that keeps them and its moments in "
                             "bfloat16 with stochastic rounding); adamw_8bit: moments in 8 bits (bitsandbytes; "
                             "tensors of 4,096+ values); paged_*: moments in CUDA unified memory that pages to the "
                             "host under pressure (as plain memory on a CPU).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to norms and biases).")
    weight_anchor: float = Field(
        0.0, ge=0, description="λ of the penalty λ/2·Σ||W − W_start||² toward the weights the run started from "
                               "(in a pipeline, the previous stage's); for lora/qlora W − W_start is the adapter's "
                               "update. Methods full, freeze, lora, qlora.")
    lora_plus_ratio: float | None = Field(
        None, gt=0, description="LoRA+ (Hayou et al. 2024): the LoRA B matrices learn at lr x this, the A "
                                "matrices and everything else at lr (the paper suggests 16 for lr around 2e-4 "
                                "or below). Methods lora, dora, qlora; null: one learning rate.")
    neftune_alpha: float | None = Field(
        None, gt=0, description="NEFTune (Jain et al. 2023): while training, add noise drawn uniformly from "
                                "[-m, m] to each input embedding, m = alpha / sqrt(L x d), L the token's own "
                                "example's length and d the embedding width (the paper uses 5). recipe sft; "
                                "null: off.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null disables.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="bf16: bfloat16 autocast (slower on CPUs without bf16); fp16: float16 autocast with "
                            "a dynamic loss scale and float32 trainable weights (GPUs without bf16: T4, V100); "
                            "auto: fp16 for float16 weights, bf16 for bfloat16 ones, else bf16 on a GPU with "
                            "bfloat16 arithmetic, fp16 on one without, fp32 on a CPU.")
    log_every: int = Field(1, gt=0, description="Write metrics every N steps.")
    eval_every: int | None = Field(None, gt=0, description="Validation loss every N steps (and at the end).")
    save_every: int | None = Field(50, gt=0, description="Checkpoint every N steps (and at the end).")
    keep_last: int = Field(2, gt=0, description="Checkpoints kept on disk.")
    tensorboard: bool = Field(True, description="Also write TensorBoard logs to <output_dir>/tensorboard.")
    progress: bool = Field(True, description="Show a progress bar.")
    attention: Literal["auto", "varlen", "padded"] = Field(
        "auto", description="varlen: each micro-batch is one flat row, no padding, every example attending "
                            "only to itself (flash varlen kernel on CUDA); padded: rows padded to the longest; "
                            "auto: varlen on CUDA, and on a CPU for DPO pairs and RL with several samples "
                            "per prompt (flat rows hold each prompt once).")
    loss_chunking: Literal["auto", "on", "off"] = Field(
        "auto", description="Cross-entropy from hidden states in chunks, never holding the full logits "
                            "(auto: on, on every device; faster on a CPU too).")
    checkpointing: Literal["auto", "off", "all"] | NonNegativeInt = Field(
        "auto", description="Activation checkpointing: all blocks, off, a number of blocks, or auto (on CUDA: "
                            "per micro-batch, the fewest blocks that fit memory_budget_gib).")
    memory_budget_gib: float | None = Field(
        None, gt=0, description="GPU memory the run may plan for (null: 90% of the device).")
    offload_activations: bool = Field(False, description="Keep what waits for backward in host memory: "
                                      "checkpointed blocks' inputs and the other blocks' activations.")
    mlp_chunk_tokens: PositiveInt | None = Field(
        None, description="Run each block's MLP on at most this many tokens at a time, recomputing it in "
                          "backward, so its activations (4 x intermediate size per token) exist for one chunk: "
                          "for the longest sequences (costs one more MLP forward).")
    compile: bool = Field(False, description="torch.compile each transformer block.")
    kernels: Literal["auto", "on", "off"] = Field(
        "auto", description="Fused kernels: LoRA layers without adapter copies, and Liger's RMSNorm/RoPE/SwiGLU "
                            "when liger-kernel is installed, in training and in RL's rollouts (auto: on CUDA).")
    shard_optimizer: Literal["auto", "on", "off"] = Field(
        "auto", description="Data parallel (torchrun): each process keeps the optimiser state of its share of the "
                            "trainable weights only (ZeRO stage 1), and the updated weights are broadcast. auto: on "
                            f"from {SHARD_FROM:,} trainable weights. Not with precision fp16, nor in ppo and grpo.")
    fsdp: bool = Field(
        False, description="Data parallel (torchrun), fully sharded (FSDP2): each process keeps 1/N of every "
                           "weight, gradient and optimiser moment, and each transformer block's weights are gathered "
                           "for its forward and backward; 16-bit trainable weights train as float32 shards. When "
                           "training ends the model is whole in every process again (it must fit one GPU whole "
                           "for evaluation). Recipes sft, reward, classify and dpo; not with precision fp16, "
                           "weight_anchor, compile, shard_optimizer=on, qlora or lora.fp8_base.")


class EvalConfig(_Strict):
    """Held-out task evaluation before and after training."""

    task_file: str | None = Field(None, description="Held-out JSONL scored by generation; null skips it.")
    before: bool = Field(True, description="Also score the untuned model.")
    limit: int | None = Field(None, gt=0, description="Score only the first N rows.")
    max_new_tokens: int = Field(64, gt=0, description="Generation budget per prompt.")
    batch_size: int = Field(64, gt=0, description="Prompts generated together.")
    samples: int = Field(1, gt=0, description="Answers per prompt: 1 is greedy; more are sampled at "
                         "temperature (seeded), exact_match becomes their mean and pass@k is added (k = 1, 2, "
                         "4, ... samples).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature when samples is above 1.")


class _RecipeConfig(_Strict):
    """What every recipe's config holds: where the run goes, the seed, the model, the method, the loop."""

    recipe: str = Field(..., description="Which recipe runs this config.")
    output_dir: str = Field("runs/run", description="The run directory.")
    seed: int = Field(0, description="Seeds model, head and adapter init, data order, dropout and splits.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _anchor_fits_method(self) -> "_RecipeConfig":
        f = self.method.freeze
        if (self.method.kind == "freeze" and not (f.train_last_n_layers or f.train_norm or f.train_lm_head)
                and self.recipe not in ("reward", "classify")):  # there a new head alone is a real choice
            raise ValueError("method.freeze trains nothing: set train_last_n_layers > 0, train_norm or train_lm_head")
        if self.train.weight_anchor and self.method.kind not in ("full", "freeze", "lora", "qlora"):
            raise ValueError(f"train.weight_anchor applies to methods full, freeze, lora and qlora, not "
                             f"method.kind={self.method.kind}")
        if self.train.weight_anchor and self.method.lora.init != "default":
            raise ValueError(f"train.weight_anchor measures a LoRA update as s B A, which under method.lora.init="
                             f"{self.method.lora.init} starts away from 0")
        if self.train.neftune_alpha is not None and self.recipe != "sft":
            raise ValueError(f"train.neftune_alpha adds noise to supervised fine-tuning's inputs: recipe sft, not "
                             f"{self.recipe}")
        if self.train.shard_optimizer == "on" and self.recipe in ("ppo", "grpo"):
            raise ValueError(f"train.shard_optimizer=on: recipe {self.recipe} keeps the whole optimiser state in each "
                             "process (its critic joins the optimiser as it starts)")
        if self.train.fsdp:
            _check_fsdp(self)
        if self.train.lora_plus_ratio is not None and self.method.kind not in ("lora", "dora", "qlora"):
            raise ValueError(f"train.lora_plus_ratio sets the learning rate of LoRA's B matrices: methods lora, "
                             f"dora and qlora, not method.kind={self.method.kind}")
        return self

    @model_validator(mode="after")
    def _float16_scaled(self) -> "_RecipeConfig":
        # float16 gradients without a loss scale underflow, and AdamW's epsilon rounds to 0 in float16
        if self.model.dtype == "float16" and self.train.precision not in ("fp16", "auto"):
            raise ValueError(f"model.dtype float16 trains under train.precision fp16 (a loss scale, float32 "
                             f"trainable weights), not {self.train.precision}")
        return self

    @model_validator(mode="after")
    def _virtual_tokens_padded(self) -> "_RecipeConfig":
        # Virtual tokens sit before each row; in a flat row only the first example would see them.
        if self.method.kind in VIRTUAL_TOKEN_METHODS and self.train.attention == "varlen":
            raise ValueError(f"method.kind={self.method.kind} puts virtual tokens before each example: "
                             "it needs train.attention auto or padded")
        return self

    @model_validator(mode="after")
    def _stack_fits_method(self) -> "_RecipeConfig":
        if self.model.adapter == "stack":
            if self.recipe not in CHAIN_RECIPES:
                raise ValueError(f"model.adapter=stack applies to language-model recipes ({', '.join(CHAIN_RECIPES)}), "
                                 f"not {self.recipe}")
            if self.method.kind not in STACKABLE_METHODS:
                raise ValueError(f"model.adapter=stack needs a method that stacks ({', '.join(STACKABLE_METHODS)}), "
                                 f"not method.kind={self.method.kind}")
        return self

    @field_validator("output_dir")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


def _check_fsdp(cfg: "_RecipeConfig") -> None:
    """`train.fsdp` refuses what it does not shard: RL's own loop, and what fits its sharded weights ill."""
    t, refusals = cfg.train, []
    if cfg.recipe in ("ppo", "grpo"):
        refusals.append(f"recipe {cfg.recipe} (its rollouts generate with the whole model)")
    if t.precision == "fp16":
        refusals.append("precision fp16 (its loss scale unscales whole gradients)")
    if t.weight_anchor:
        refusals.append("weight_anchor (its penalty reads whole weights)")
    if t.compile:
        refusals.append("compile")
    if t.shard_optimizer == "on":
        refusals.append("shard_optimizer=on (fsdp shards the optimiser state already)")
    if cfg.method.kind == "qlora" or cfg.method.lora.fp8_base:
        refusals.append("a quantised base (qlora, lora.fp8_base)")
    if refusals:
        raise ValueError("train.fsdp does not go with " + "; ".join(refusals))


LORA_METHODS = ("lora", "dora", "qlora")
VIRTUAL_TOKEN_METHODS = ("prefix", "prompt")  # trained tokens before every input: no packed rows
ADAPTER_METHODS = (*LORA_METHODS, "ia3", *VIRTUAL_TOKEN_METHODS, "bottleneck")
UNMERGEABLE_METHODS = (*VIRTUAL_TOKEN_METHODS, "bottleneck")  # no weight update to fold into the base
STACKABLE_METHODS = ("lora", "qlora", "ia3", "bottleneck")  # go on top of another adapter (models.stack)


def _check_adapter_reference(reference: str, method: MethodConfig, instead: str) -> None:
    """`reference: adapter` switches the adapter off, so it needs a method that has one, and one whose
    base alone is the model training started from (not the residual base of PiSSA or OLoRA)."""
    if reference != "adapter":
        return
    if method.kind not in ADAPTER_METHODS:
        raise ValueError(f"reference=adapter needs an adapter method ({', '.join(ADAPTER_METHODS)}), not "
                         f"method.kind={method.kind}; use {instead}")
    if method.lora.init != "default":
        raise ValueError(f"reference=adapter: under method.lora.init={method.lora.init} the base without the adapter "
                         f"is the residual, not the model training started from; use {instead}")


def _adapter_reference(method: MethodConfig) -> bool:
    """Whether `reference: auto` takes the base with the adapter off as the reference (`_check_adapter_reference`)."""
    return method.kind in ADAPTER_METHODS and method.lora.init == "default"


class SFTConfig(_RecipeConfig):
    """Supervised fine-tuning (`recipe: sft`)."""

    recipe: Literal["sft"] = Field("sft", description="Which recipe runs this config.")
    output_dir: str = Field("runs/sft", description="The run directory.")
    data: DataConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _virtual_tokens_unpacked(self) -> "SFTConfig":
        # in a packed row only the first example would see the virtual tokens
        if self.method.kind in VIRTUAL_TOKEN_METHODS and self.data.packing:
            raise ValueError(f"method.kind={self.method.kind} puts virtual tokens before each example: "
                             "it needs data.packing=false")
        return self


class PreferenceDataConfig(_Strict):
    """Preference data: pairs (prompt, chosen, rejected), OpenAI DPO rows, or K-way rankings."""

    train: Union[str, list[str]] = Field(..., description="File(s) or HF dataset folder(s): JSONL, Parquet, CSV.")
    _train_names_files = field_validator("train")(_some_files)
    validation: Union[str, list[str], None] = Field(None, description="Validation file(s); else split from train.")
    validation_split: float = Field(0.1, ge=0, lt=1, description="Fraction of prompts held out when no file is given.")
    max_seq_len: int = Field(512, gt=1, description="Pairs with a longer side are dropped (and counted).")
    chat_template: Union[Literal["tokenizer", "chatml"], str] = Field(
        "tokenizer", description="`tokenizer` (its own template), `chatml`, or a path to a Jinja template file."
    )


def _check_head_method(v: MethodConfig) -> MethodConfig:
    """A new head on the input's last token (reward, classify) needs an unquantised body without virtual tokens."""
    if v.kind == "qlora" or v.kind in VIRTUAL_TOKEN_METHODS:
        raise ValueError(f"method.kind={v.kind} does not fit a new head on the input's last token (it needs an "
                         "unquantised body and no virtual tokens): use freeze, lora, dora, ia3, bottleneck or full")
    return v


class RewardLossConfig(_Strict):
    """The Bradley-Terry objective of `recipe: reward`."""

    use_margin: bool = Field(False, description="Subtract each row's `margin` inside the sigmoid.")
    center_coef: float = Field(0.0, ge=0, description="Weight of the (r_chosen + r_rejected)^2 centering term.")


class RewardConfig(_RecipeConfig):
    """Reward-model training (`recipe: reward`): a scalar head on a causal LM, Bradley-Terry loss.

    `train.micro_batch_size` counts prompts: every pair of one prompt (a ranking gives several) shares a batch.
    """

    recipe: Literal["reward"] = Field("reward", description="Which recipe runs this config.")
    output_dir: str = Field("runs/reward", description="The run directory.")
    data: PreferenceDataConfig
    loss: RewardLossConfig = Field(default_factory=RewardLossConfig)

    @field_validator("method")
    @classmethod
    def _head_on_the_input(cls, v: MethodConfig) -> MethodConfig:
        return _check_head_method(v)


class ClassifyDataConfig(_Strict):
    """Labelled texts: one field holds the text, one the class (a string or an integer)."""

    train: Union[str, list[str]] = Field(..., description="File(s) or HF dataset folder(s): JSONL, Parquet, CSV.")
    _train_names_files = field_validator("train")(_some_files)
    validation: Union[str, list[str], None] = Field(None, description="Validation file(s); else split from train.")
    validation_split: float = Field(0.1, ge=0, lt=1, description="Fraction of train held out when no file is given.")
    text_column: str = Field("text", min_length=1, description="Field of the text, tokenised as it is (no chat "
                             "template); the head reads its last token.")
    label_column: str = Field("label", min_length=1, description="Field of the class: a string or an integer.")
    labels: list[str] | None = Field(None, description="Class names in head order; null: the distinct labels of "
                                     "train, sorted (integers numerically). Any other label is an error.")
    max_seq_len: int = Field(512, gt=1, description="Longer texts are cut to their first max_seq_len tokens.")

    @field_validator("labels", mode="before")
    @classmethod
    def _integer_labels_as_strings(cls, v: Any) -> Any:
        # `labels: [0, 1]` names the classes of a column of integers, which rows compare as strings.
        if isinstance(v, list):
            return [str(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in v]
        return v

    @field_validator("labels")
    @classmethod
    def _distinct_classes(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if len(v) < 2:
                raise ValueError("a classifier needs at least 2 classes")
            if any(not x.strip() for x in v):
                raise ValueError("a class name is empty")
            if len(set(v)) != len(v):
                raise ValueError(f"class names repeat: {sorted({x for x in v if v.count(x) > 1})}")
        return v


_HEAD_ONLY = {"train_last_n_layers": 0, "train_norm": False, "train_lm_head": False}


def _head_only() -> MethodConfig:
    return MethodConfig(kind="freeze", freeze=FreezeConfig(**_HEAD_ONLY))


class ClassifyConfig(_RecipeConfig):
    """Text classification (`recipe: classify`): a new K-way head on a causal LM's last token, cross-entropy.

    By default only the head trains (method freeze with no block, norm or LM head); lora, dora, ia3,
    bottleneck, full, or freeze with `train_last_n_layers`, also train the body. Validation accuracy and
    macro-F1 are measured before and after training.
    """

    recipe: Literal["classify"] = Field("classify", description="Which recipe runs this config.")
    output_dir: str = Field("runs/classify", description="The run directory.")
    method: MethodConfig = Field(default_factory=_head_only)
    data: ClassifyDataConfig

    @model_validator(mode="before")
    @classmethod
    def _head_only_under_partial_method(cls, raw: Any) -> Any:
        # `method: {freeze: {train_last_n_layers: 2}}` adds two blocks to the head: keys not given keep
        # classify's defaults (kind freeze, no norm), not those of the language-model recipes.
        if isinstance(raw, dict) and isinstance(raw.get("method"), dict):
            method = {"kind": "freeze", **raw["method"]}
            if isinstance(method.get("freeze", {}), dict):
                method["freeze"] = {**_HEAD_ONLY, **method.get("freeze", {})}
            raw = {**raw, "method": method}
        return raw

    @field_validator("method")
    @classmethod
    def _head_on_the_input(cls, v: MethodConfig) -> MethodConfig:
        if v.kind == "freeze" and v.freeze.train_lm_head:
            raise ValueError("a classifier has no LM head: set method.freeze.train_lm_head=false (its new head "
                             "always trains)")
        return _check_head_method(v)


class PreferenceLossConfig(_Strict):
    """The objective of `recipe: dpo`, chosen by name (the names follow TRL's `loss_type`)."""

    name: Literal["sigmoid", "ipo", "hinge", "simpo", "orpo", "kto"] = Field(
        "sigmoid", description="sigmoid (DPO; cDPO with label_smoothing), ipo, hinge, simpo and orpo "
        "(reference-free), kto (unpaired desirable/undesirable answers)."
    )
    beta: float = Field(0.1, gt=0, description="β: KL strength of sigmoid/ipo/hinge/kto; SimPO's reward scale "
                        "(its paper uses 2-10).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO: assumed probability that a label is "
                                   "flipped (sigmoid only).")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin γ.")
    orpo_lambda: float = Field(0.1, gt=0, description="ORPO's weight λ of the odds-ratio term beside the SFT loss.")
    sft_weight: float = Field(0.0, ge=0, description="α: add α x the chosen answer's mean token NLL (RPO; TRL's "
                              "rpo_alpha), which stops the chosen answer's likelihood from falling "
                              "(sigmoid/ipo/hinge/simpo).")
    kto_desirable_weight: float = Field(1.0, gt=0, description="KTO's λ_D.")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="KTO's λ_U.")

    @model_validator(mode="after")
    def _knobs_fit_the_loss(self) -> "PreferenceLossConfig":
        """A setting the chosen loss never reads is refused when moved from its default: the run would
        finish as if it had been applied. (sft_weight: DPOConfig, which says why.)"""
        uses = {"beta": ("sigmoid", "ipo", "hinge", "simpo", "kto"), "label_smoothing": ("sigmoid",),
                "simpo_gamma": ("simpo",), "orpo_lambda": ("orpo",),
                "kto_desirable_weight": ("kto",), "kto_undesirable_weight": ("kto",)}
        for knob, losses in uses.items():
            if self.name not in losses and getattr(self, knob) != type(self).model_fields[knob].default:
                hint = " (ORPO's weight is loss.orpo_lambda, TRL's ORPOConfig.beta)" if knob == "beta" else ""
                raise ValueError(f"loss.{knob} does not apply to loss.name={self.name}: only to "
                                 f"{', '.join(losses)}{hint}")
        return self


class DPOConfig(_RecipeConfig):
    """Preference optimisation (`recipe: dpo`): DPO and its relatives on preference pairs, KTO on labelled answers.

    `train.micro_batch_size` counts prompts (pairs for DPO, answers for KTO). `reference` says where the
    reference log-probs come from: `adapter` (the base with the adapter switched off: no copy in memory;
    lora/dora/qlora only), `copy` (a frozen copy of the base), `precomputed` (one pass before training,
    cached in the run directory), or `auto` (adapter for adapter methods, except LoRA started by PiSSA or OLoRA,
    whose base alone is a residual; else precomputed).
    SimPO and ORPO use no reference.
    """

    recipe: Literal["dpo"] = Field("dpo", description="Which recipe runs this config.")
    output_dir: str = Field("runs/dpo", description="The run directory.")
    data: PreferenceDataConfig
    loss: PreferenceLossConfig = Field(default_factory=PreferenceLossConfig)
    reference: Literal["auto", "adapter", "copy", "precomputed"] = Field(
        "auto", description="Source of reference log-probs (see above)."
    )
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _reference_fits_method(self) -> "DPOConfig":
        _check_adapter_reference(self.reference, self.method, "copy or precomputed")
        return self

    @model_validator(mode="after")
    def _sft_weight_fits_loss(self) -> "DPOConfig":
        if self.loss.sft_weight and self.loss.name in ("orpo", "kto"):
            raise ValueError(f"loss.sft_weight does not apply to {self.loss.name}"
                             + (" (ORPO already has its SFT term)" if self.loss.name == "orpo" else ""))
        return self

    def reference_source(self) -> str | None:
        """Where reference log-probs come from for this config: adapter, copy, precomputed, or None."""
        if self.loss.name in ("simpo", "orpo"):
            return None
        if self.reference != "auto":
            return self.reference
        return "adapter" if _adapter_reference(self.method) else "precomputed"


class PromptDataConfig(_Strict):
    """Prompts for online RL: chat rows whose last assistant turn, if any, is the reference answer (or an
    `answer` field gives it); a row's `task` names the checkable task that scores it."""

    train: Union[str, list[str]] = Field(..., description="Prompt file(s): JSONL, Parquet, CSV or HF dataset folders.")
    _train_names_files = field_validator("train")(_some_files)
    max_prompt_len: int = Field(256, gt=1, description="Prompts longer than this (in tokens) are dropped and counted.")
    chat_template: Union[Literal["tokenizer", "chatml"], str] = Field(
        "tokenizer", description="`tokenizer` (its own template), `chatml`, or a path to a Jinja template file."
    )


class RolloutConfig(_Strict):
    """How responses are sampled each step."""

    prompts_per_step: int = Field(8, gt=0, description="Prompts drawn per RL step (in a seeded, epoch-shuffled order).")
    samples_per_prompt: int = Field(1, gt=0, description="Responses sampled per prompt (GRPO's group size G).")
    max_new_tokens: int = Field(64, gt=0, description="Response budget; a response cut off here is truncated.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (the loss uses the same one).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 disables.")
    batch_size: int = Field(64, gt=0, description="Sequences generated together.")
    filter_groups: bool = Field(
        False, description="Dynamic sampling (DAPO): a prompt whose samples all scored the same gives group "
        "advantages of 0, so draw the next prompts of the order and sample again, up to max_rounds rounds a "
        "step, until prompts_per_step prompts have scores that differ; a step still short of them tops up "
        "with the others. rl.advantage group or rloo.")
    max_rounds: int = Field(4, gt=0, description="filter_groups: rounds of sampling a step at most.")


class RewardSourceConfig(_Strict):
    """One reward source; several are summed with their weights."""

    kind: Literal["task", "function", "model", "judge"] = Field(
        ..., description="task: a checkable task's reward; function: a Python function; model: a reward model; "
                         "judge: a chat model asked to rate the response (AI feedback).")
    name: str = Field(..., description="task: a task name or `auto` (each row's own `task`, else exact match "
                      "on its answer); function: `module:function` or `path/to/file.py:function`; model: a "
                      "`recipe: reward` run directory or its `final/` folder; judge: the judging model (as "
                      "model.name).")
    weight: float = Field(1.0, description="Weight of this source in the summed reward.")
    rubric: str | None = Field(
        None, description="judge: what the judge is asked, with {prompt} (the conversation), {response} and "
                          "{reference} (the row's answer) filled in; text or a path to a .txt file. null: rate "
                          "helpfulness and correctness from 1 to 9. The score is the judge's expected rating, "
                          "mapped to 0..1.")

    @model_validator(mode="after")
    def _rubric_is_the_judges(self) -> "RewardSourceConfig":
        if self.rubric is not None and self.kind != "judge":
            raise ValueError(f"rubric applies to kind judge, not {self.kind}")
        return self


class OnlineRewardConfig(_Strict):
    """What a response scores."""

    sources: list[RewardSourceConfig] = Field(
        default_factory=lambda: [RewardSourceConfig(kind="task", name="auto")],
        description="Reward sources, summed with their weights.")
    missing_eos_penalty: float = Field(0.0, ge=0, description="Subtracted from a response that ran out of "
                                       "tokens without ending its turn.")
    normalize: bool = Field(False, description="Standardise scores with the mean and std of the first rollout "
                            "(the starting policy's samples), fixed for the run, so the KL coefficient and the "
                            "critic see a reward of unit scale whatever the source's (a reward model's raw "
                            "scores); `reward_raw` logs the unscaled mean.")
    batch_size: int = Field(16, gt=0, description="Responses a reward model scores together.")


class RLAlgorithmConfig(_Strict):
    """The update: advantages, clipping, the KL to the reference, and how per-token terms are averaged."""

    advantage: Literal["gae", "group", "rloo", "reinforce"] = Field(
        "gae", description="gae: a critic (a value head, or rl.value_model) and GAE (PPO); group: GRPO's "
        "group-normalised scores; rloo: leave-one-out baseline; reinforce: batch-mean baseline.")
    scale_by_group_std: bool = Field(True, description="group: divide by the group's std (false: Dr. GRPO).")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ.")
    whiten_rewards: bool = Field(False, description="gae: whiten the per-token rewards over the batch first.")
    whiten_advantages: bool = Field(True, description="gae: whiten the advantages over the batch.")
    epochs: int = Field(4, gt=0, description="Passes over each rollout batch.")
    minibatches: int = Field(1, gt=0, description="Optimiser steps per pass (the rollout is split this many ways).")
    clip_eps: float = Field(0.2, gt=0, description="PPO clip ε of the policy ratio.")
    clip_eps_high: float | None = Field(None, gt=0, description="Upper clip (DAPO's clip-higher); null: clip_eps.")
    value_clip: float | None = Field(0.2, gt=0, description="gae: clip the value update; null disables.")
    value_coef: float = Field(0.1, ge=0, description="gae: weight of the value loss (the critic is trained "
                              "apart from the policy with Adam, so value_lr is the knob that matters).")
    value_lr: float | None = Field(None, gt=0, description="gae: the critic's peak learning rate; null: train.lr.")
    value_model: str | None = Field(
        None, description="gae: a `recipe: reward` run directory (or its `final/`) whose model becomes the critic, "
        "as in TRL's PPO: its body reads the policy's tokens in a forward of its own, with a LoRA adapter of its own "
        "(`method.lora`'s settings) and its scalar head trained at value_lr; its values start as the reward model's "
        "score of each prefix (in units of reward.normalize's std when that is on). It needs the policy's "
        "tokenizer. null: a linear value head on the policy's last hidden state.")
    kl_coef: float = Field(0.05, ge=0, description="β of the KL to the reference; 0 skips the reference.")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description="Per-token KL estimator.")
    kl_in: Literal["reward", "loss"] = Field(
        "reward", description="reward: -β KL per token in the reward (PPO-RLHF); loss: β KL added to the loss (GRPO).")
    kl_target: float | None = Field(None, gt=0, description="Adaptive KL: move β so the KL per response tracks this.")
    kl_horizon: int = Field(10000, gt=0, description="Adaptive KL horizon in samples.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight.")
    loss_aggregation: Literal["token", "sequence", "constant"] = Field(
        "token", description="token: every response token of the batch weighs the same (DAPO); sequence: every "
        "response does (the original GRPO); constant: every token weighs 1 / (responses x "
        "rollout.max_new_tokens), whatever the lengths (Dr. GRPO).")
    mask_truncated: bool = Field(False, description="Train nothing on a response that ran out of tokens "
                                 "without ending its turn (DAPO's overlong filtering): a cut-off answer is not "
                                 "judged by its unfinished text. Its score still counts in its group's baseline.")


class _OnlineConfig(_RecipeConfig):
    data: PromptDataConfig
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: OnlineRewardConfig = Field(default_factory=OnlineRewardConfig)
    rl: RLAlgorithmConfig = Field(default_factory=RLAlgorithmConfig)
    reference: Literal["auto", "adapter", "copy"] = Field(
        "auto", description="The KL reference: `adapter` (the base with the adapter off), `copy` (a frozen copy), "
        "or `auto` (adapter for adapter methods except LoRA started by PiSSA or OLoRA, else copy; none when "
        "rl.kl_coef is 0).")
    sample_every: int = Field(10, gt=0, description="Write sample responses to samples/step-N.jsonl every N steps.")
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _fits(self) -> "_OnlineConfig":
        _check_adapter_reference(self.reference, self.method, "copy")
        if self.rl.value_model is not None and self.rl.advantage != "gae":
            raise ValueError(f"rl.value_model is the critic of rl.advantage=gae; rl.advantage={self.rl.advantage} "
                             "has none")
        if self.rollout.filter_groups and self.rl.advantage not in ("group", "rloo"):
            raise ValueError(f"rollout.filter_groups keeps prompts whose samples' scores differ, which only "
                             f"rl.advantage group or rloo compares; rl.advantage={self.rl.advantage}")
        if self.rl.advantage in ("group", "rloo") and self.rollout.samples_per_prompt < 2:
            raise ValueError(f"rl.advantage={self.rl.advantage} compares samples of one prompt: set "
                             "rollout.samples_per_prompt to 2 or more")
        n = self.rollout.prompts_per_step * self.rollout.samples_per_prompt
        if n % self.rl.minibatches:
            raise ValueError(f"rl.minibatches={self.rl.minibatches} does not divide the {n} responses of a step "
                             "(rollout.prompts_per_step x rollout.samples_per_prompt)")
        if self.train.grad_accum != 1:
            raise ValueError("train.grad_accum does not apply to online RL: a minibatch (rl.minibatches) is one "
                             "optimiser step, run in micro-batches of train.micro_batch_size")
        if self.method.lora.dropout:
            raise ValueError(f"method.lora.dropout={self.method.lora.dropout}: online RL's importance ratios "
                             "compare the policy's log-probs before and during the update, and dropout would draw a "
                             "new mask for each, so they differ with no update at all; set it to 0")
        if self.rl.kl_target is not None and self.rl.kl_coef == 0:
            raise ValueError("rl.kl_target adapts rl.kl_coef by multiplying it, so from 0 it stays 0 and the KL is "
                             "never held: set rl.kl_coef to the coefficient to start from (e.g. 0.05)")
        return self

    def reference_source(self) -> str | None:
        """adapter or copy; None when there is no KL term and no reference was asked for (an explicit
        reference with kl_coef 0 measures the KL without penalising it)."""
        if self.reference != "auto":
            return self.reference
        if self.rl.kl_coef == 0 and self.rl.kl_target is None:
            return None
        return "adapter" if _adapter_reference(self.method) else "copy"

    def total_steps(self, n_prompts: int) -> int:
        """RL steps: train.max_steps, else train.epochs passes over the prompts."""
        import math

        per_epoch = math.ceil(n_prompts / self.rollout.prompts_per_step)
        return self.train.max_steps or max(1, math.ceil(self.train.epochs * per_epoch))


class PPOConfig(_OnlineConfig):
    """Online RL with a critic (`recipe: ppo`): sample, score, GAE, several clipped epochs per rollout.

    One step samples `rollout.prompts_per_step x rollout.samples_per_prompt` responses, scores them with
    `reward.sources`, and runs `rl.epochs x rl.minibatches` optimiser steps on them; `train.max_steps` (or
    `train.epochs` over the prompts) counts RL steps. `train.micro_batch_size` counts responses per forward.
    """

    recipe: Literal["ppo"] = Field("ppo", description="Which recipe runs this config.")
    output_dir: str = Field("runs/ppo", description="The run directory.")


_GRPO_DEFAULTS: dict[str, dict[str, Any]] = {
    "rollout": {"prompts_per_step": 4, "samples_per_prompt": 8},
    "rl": {"advantage": "group", "epochs": 1, "kl_coef": 0.04, "kl_estimator": "k3", "kl_in": "loss",
           "value_clip": None, "value_coef": 0.0, "whiten_advantages": False},
}


def _grpo_rollout() -> RolloutConfig:
    return RolloutConfig(**_GRPO_DEFAULTS["rollout"])


def _grpo_algorithm() -> RLAlgorithmConfig:
    return RLAlgorithmConfig(**_GRPO_DEFAULTS["rl"])


class GRPOConfig(_OnlineConfig):
    """Group-relative online RL (`recipe: grpo`): G samples per prompt, advantages from the group's scores,
    no value head; RLOO and REINFORCE-with-baseline are the other `rl.advantage` choices.

    Same loop as `recipe: ppo`, with GRPO's defaults: 8 samples per prompt, one epoch per rollout, the k3
    KL estimate added to the loss.
    """

    recipe: Literal["grpo"] = Field("grpo", description="Which recipe runs this config.")
    output_dir: str = Field("runs/grpo", description="The run directory.")
    rollout: RolloutConfig = Field(default_factory=_grpo_rollout)
    rl: RLAlgorithmConfig = Field(default_factory=_grpo_algorithm)

    @model_validator(mode="before")
    @classmethod
    def _grpo_defaults_under_partial_sections(cls, raw: Any) -> Any:
        # `rl: {kl_coef: 0}` changes one key; the section's other keys keep GRPO's defaults, not PPO's.
        if isinstance(raw, dict):
            raw = dict(raw)
            for section, defaults in _GRPO_DEFAULTS.items():
                if isinstance(raw.get(section), dict):
                    raw[section] = {**defaults, **raw[section]}
        return raw


class SuiteTaskConfig(_Strict):
    """A held-out task of a pipeline's evaluation suite, scored by greedy generation."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="Name in the forgetting report.")
    task_file: str = Field(..., description="Held-out JSONL of prompts with reference answers.")
    limit: int | None = Field(None, gt=0, description="Score only the first N rows.")
    max_new_tokens: int = Field(32, gt=0, description="Generation budget per prompt.")


class SuitePerplexityConfig(_Strict):
    """Held-out text of a pipeline's evaluation suite, scored by perplexity (general-capability retention)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="Name in the forgetting report.")
    file: str = Field(..., description="JSONL rows in any SFT format (`text` rows: every token is scored).")
    limit: int | None = Field(None, gt=0, description="Score only the first N rows.")
    max_seq_len: int = Field(512, gt=1, description="Longer rows are cut.")


class PipelineEvalConfig(_Strict):
    """What a pipeline measures on the base model and after every stage."""

    tasks: list[SuiteTaskConfig] = Field(default_factory=list, description="Held-out tasks (exact match).")
    perplexity: list[SuitePerplexityConfig] = Field(default_factory=list, description="Held-out texts.")
    batch_size: int = Field(64, gt=0, description="Prompts generated (or texts scored) together.")


class ReplayConfig(_Strict):
    """Replay: earlier stages' training rows mixed into a stage's own."""

    ratio: float = Field(..., gt=0, lt=1, description="Share of the stage's training rows that are replayed.")
    stages: Union[Literal["all"], list[str]] = Field("all", description="Earlier sft stages to draw from.")


class StageConfig(_Strict):
    """One stage of a pipeline: a recipe config, started from the chain's current model."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]+$", description="Stage name (its run directory's name).")
    config: Union[str, dict[str, Any]] = Field(
        ..., description="A recipe config file (its model, output_dir and seed are replaced) or a mapping "
                         "without them. "
                         "`${stages.NAME}` in a value becomes that earlier stage's run directory.")
    overrides: list[str] = Field(default_factory=list, description="`key.sub=value` changes to the stage config "
                                 "(`${stages.NAME}` works here too).")
    replay: ReplayConfig | None = Field(None, description="Mix earlier sft stages' rows in (sft stages only).")
    adapter: Literal["merge", "stack"] = Field(
        "merge", description="How the stage starts from the previous language-model stage's adapter: `merge` it "
        "into its base, or `stack` a new adapter on it (kept frozen; lora, qlora, ia3 or bottleneck).")


CHAIN_RECIPES = ("sft", "dpo", "ppo", "grpo")  # their result is the model the next stage starts from


class PipelineConfig(_Strict):
    """Sequential fine-tuning (`recipe: pipeline`): ordered stages, each any recipe, with an evaluation
    suite on the base model and after every stage, and a forgetting report.

    A language-model stage (sft, dpo, ppo, grpo) starts from the previous one's result, with its adapter
    merged into the base or (`adapter: stack`) kept frozen beneath a new one, and its result is what the
    next stage starts from. A reward or classify stage starts from the current model merged, but leaves the
    chain where it was: later stages can use its result through `${stages.NAME}` (e.g. as a reward model).
    """

    recipe: Literal["pipeline"] = Field("pipeline", description="Which recipe runs this config.")
    output_dir: str = Field("runs/pipeline", description="The run directory; stages go under stages/.")
    seed: int = Field(0, description="Every stage's seed.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    stages: list[StageConfig] = Field(..., min_length=1, description="The stages, in order.")
    eval: PipelineEvalConfig = Field(default_factory=PipelineEvalConfig)

    @model_validator(mode="after")
    def _stages_are_valid(self) -> "PipelineConfig":
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        if self.model.adapter != "merge":
            raise ValueError("model.adapter: set stages[i].adapter for each stage that stacks instead")
        chain: list[tuple[str, Any]] = []  # (name, config) of the language-model stages so far
        for i, stage in enumerate(self.stages):
            cfg = self.stage_config(i, previous_run=self.model.name)
            self._check_start(stage, cfg, chain)
            if cfg.recipe in CHAIN_RECIPES:
                chain.append((stage.name, cfg))
            if stage.replay is not None:
                if cfg.recipe != "sft":
                    raise ValueError(f"stage '{stage.name}': replay mixes rows into sft stages, not {cfg.recipe}")
                if cfg.data.train is None:
                    raise ValueError(f"stage '{stage.name}': replay adds rows to data.train files, not to a mixture "
                                     "(add the earlier tasks to the mixture instead)")
                sources = self.replay_sources(i)
                if not sources:
                    raise ValueError(f"stage '{stage.name}': replay needs an earlier sft stage to draw from")
        return self

    @staticmethod
    def _check_start(stage: StageConfig, cfg: Any, chain: list[tuple[str, Any]]) -> None:
        """The stage can start from the chain's current model as its `adapter` setting says."""
        if not chain:
            if stage.adapter == "stack":
                raise ValueError(f"stage '{stage.name}': adapter=stack needs an earlier language-model stage that "
                                 "trained an adapter to stack on")
            return
        stack = [chain[-1]]  # the levels the chain's model is made of, top first
        while stack[-1][1].model.adapter == "stack":
            stack.append(chain[len(chain) - len(stack) - 1])
        top, kinds = stack[0][0], [c.method.kind for _, c in stack]
        if stage.adapter == "merge":
            if any(k in UNMERGEABLE_METHODS for k in kinds):
                kind = next(k for k in kinds if k in UNMERGEABLE_METHODS)
                raise ValueError(f"stage '{stage.name}' starts from stage '{top}' merged into its base, but a "
                                 f"{kind} adapter is no weight update and cannot be merged; set adapter: stack on "
                                 f"'{stage.name}' (or train '{top}' with a mergeable method)")
            return
        if kinds[0] not in ADAPTER_METHODS:
            raise ValueError(f"stage '{stage.name}': adapter=stack, but stage '{top}' trained method.kind="
                             f"{kinds[0]}, which leaves no adapter to stack on; use adapter: merge")
        if (kinds[-1] == "qlora") != (cfg.method.kind == "qlora"):
            raise ValueError(f"stage '{stage.name}': a stacked adapter keeps the base as the stack below has it "
                             f"({'quantised' if kinds[-1] == 'qlora' else 'unquantised'}): use method.kind="
                             + ("qlora" if kinds[-1] == "qlora" else f"lora, not {cfg.method.kind}"))
        packed = cfg.recipe == "sft" and cfg.data.packing
        if any(k in VIRTUAL_TOKEN_METHODS for k in kinds) and (packed or cfg.train.attention == "varlen"):
            raise ValueError(f"stage '{stage.name}': the stack below has virtual tokens before each example: it "
                             "needs train.attention auto or padded" + (" and data.packing=false" if packed else ""))

    def raw_stage(self, i: int) -> dict[str, Any]:
        """Stage i's config mapping as written (a file is read), before the pipeline's keys are set."""
        stage = self.stages[i]
        if isinstance(stage.config, str):  # a config file of its own: the pipeline's keys replace its ones
            raw = _read_yaml(Path(stage.config))
            return {k: v for k, v in raw.items() if k not in ("model", "output_dir", "seed")}
        for key in ("model", "output_dir", "seed"):
            if key in stage.config:
                raise ValueError(f"stage '{stage.name}': `{key}` is set by the pipeline, not the stage config")
        return stage.config

    def stage_config(self, i: int, previous_run: str) -> "AnyConfig":
        """Stage i's validated recipe config, started from `previous_run` and written under stages/."""
        stage = self.stages[i]
        dirs = {s.name: str(self.stage_dir(j)) for j, s in enumerate(self.stages[:i])}
        raw = _substitute(self.raw_stage(i), dirs, stage.name)
        raw = {**raw, "seed": self.seed, "output_dir": str(self.stage_dir(i)),
               "model": {**self.model.model_dump(), "name": previous_run, "adapter": stage.adapter}}
        if raw.get("recipe") == "pipeline":
            raise ValueError(f"stage '{stage.name}': a pipeline cannot be a stage")
        try:
            overrides = _substitute(stage.overrides, dirs, stage.name)
            return config_from_dict(raw, overrides, source=f"stage '{stage.name}'")
        except TunesmithError as err:  # one message per problem, each naming the stage
            problems = str(err).split(":\n", 1)[-1].splitlines()
            raise ValueError("\n  ".join(f"stage '{stage.name}': {p.strip()}" for p in problems)) from None

    def stage_dir(self, i: int) -> Path:
        """stages/NN-name under the pipeline's run directory."""
        return Path(self.output_dir) / "stages" / f"{i + 1:02d}-{self.stages[i].name}"

    def replay_sources(self, i: int) -> list[int]:
        """The earlier sft stages stage i replays from."""
        replay = self.stages[i].replay
        assert replay is not None
        wanted = [s.name for s in self.stages[:i]] if replay.stages == "all" else replay.stages
        unknown = set(wanted) - {s.name for s in self.stages[:i]}
        if unknown:
            raise ValueError(f"stage '{self.stages[i].name}': replay.stages names no earlier stage: {sorted(unknown)}")
        return [j for j, s in enumerate(self.stages[:i])
                if s.name in wanted and self.stage_config(j, self.model.name).recipe == "sft"]


def _substitute(value: Any, dirs: dict[str, str], stage: str) -> Any:
    """`${stages.NAME}` -> that earlier stage's run directory, anywhere in a config mapping."""
    if isinstance(value, dict):
        return {k: _substitute(v, dirs, stage) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, dirs, stage) for v in value]
    if isinstance(value, str) and "${stages." in value:
        for name in re.findall(r"\$\{stages\.([^}]*)\}", value):
            if name not in dirs:
                raise ValueError(f"stage '{stage}': ${{stages.{name}}} names no earlier stage")
            value = value.replace(f"${{stages.{name}}}", dirs[name])
    return value


RECIPES: dict[str, type[_Strict]] = {"sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig, "ppo": PPOConfig,
                                     "grpo": GRPOConfig, "classify": ClassifyConfig, "pipeline": PipelineConfig}
AnyConfig = Union[SFTConfig, RewardConfig, DPOConfig, PPOConfig, GRPOConfig, ClassifyConfig, PipelineConfig]


# ---------------------------------------------------------------- loading

class _Loader(yaml.SafeLoader):
    """YAML with only `true` and `false` as booleans (YAML 1.2's rule). PyYAML follows YAML 1.1, which also
    reads on, off, yes and no as booleans, so `kernels: off` would reach the config as False and fail as not
    one of 'auto', 'on' or 'off'. Kept as strings, they still validate where a field is a boolean.

    A key given twice in one mapping is an error: PyYAML keeps the last, so a second `data:` section would
    silently replace the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden; that is its point
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if seen is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping (first on line "
                    f"{seen.start_mark.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _yaml(text: str, name: str | None = None) -> Any:
    """Parse with `_Loader`; `name` (the file) replaces "<unicode string>" in the marks of YAML's errors."""
    loader = _Loader(text)
    if name:
        loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _parse_override(text: str) -> tuple[list[str], Any]:
    """(key path, value). The value is read as YAML (numbers, lists, null); one YAML cannot read, such as
    `*.jsonl` (an alias) or `[a`, stays the text it is, and the config's validation judges it."""
    if "=" not in text:
        raise TunesmithError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = _yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_valid_keys(ann, prefix + name + "."))
    return keys


def _section(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds: itself, or the one inside `list[...]`, `X | None` or a Union."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_section, get_args(annotation))), None)


def _fields_at(model: type[BaseModel], loc: list[Any]) -> list[str]:
    """Field names of the section at `loc` (list indexes looked through), so a key in a list item
    (`data.mixture.0.wieght`) is matched against that item's fields, which `_valid_keys` does not list."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        nested = _section(field.annotation) if field else None
        if nested is None:
            return []
        model = nested
    return list(model.model_fields)


def _explain(err: ValidationError, model: type[BaseModel], source: str) -> TunesmithError:
    valid = _valid_keys(model)
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parent = list(e["loc"][:-1])
            siblings = [".".join(str(p) for p in [*parent, name]) for name in _fields_at(model, parent)]
            near = (difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)  # the same section first,
                    or difflib.get_close_matches(key, valid, n=1, cutoff=0.6)  # then another one,
                    # then the last part alone: `train.lr_rate` -> `train.lr`
                    or difflib.get_close_matches(key, siblings if parent else valid, n=1, cutoff=0.4))
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            lines.append(f"unknown key '{key}'{hint}")
        elif not key:  # a rule across fields (a model validator): its message names them
            lines.append(e["msg"].removeprefix("Value error, "))
        elif e["type"] == "value_error":  # a section's own rule: its message says it all
            lines.append(f"'{key}': {e['msg'].removeprefix('Value error, ')}")
        elif e["type"] == "missing":
            lines.append(f"missing required key '{key}'")
        else:
            lines.append(f"'{key}': {e['msg']} (got {e.get('input')!r})")
    return TunesmithError(f"invalid config {source}:\n  " + "\n  ".join(lines))


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None, source: str = "<dict>") -> AnyConfig:
    """Validate a plain dict (plus `key.sub=value` overrides) into the recipe's config model."""
    raw = copy.deepcopy(raw)  # overrides must not change the caller's mapping
    for text in overrides or []:
        path, value = _parse_override(text)
        node: Any = raw
        for part, after in zip(path, path[1:] + [None]):
            if isinstance(node, list):  # `stages.1.replay.ratio`: a list item by its index
                if not (part.isdigit() and int(part) < len(node)):
                    raise TunesmithError(f"override '{text}': '{part}' is not an index of that list "
                                         f"(0..{len(node) - 1})")
                part = int(part)
            elif not isinstance(node, dict):
                raise TunesmithError(f"override '{text}': '{part}' is inside a value, not a section")
            if after is None:
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    recipe = raw.get("recipe", "sft")
    if recipe not in RECIPES:
        near = difflib.get_close_matches(str(recipe), RECIPES, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise TunesmithError(f"invalid config {source}: unknown recipe '{recipe}'{hint}; known: {sorted(RECIPES)}")
    model = RECIPES[recipe]
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise _explain(err, model, source) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TunesmithError(f"config file not found: {path}")
    try:
        raw = _yaml(path.read_text(), name=str(path)) or {}
    except yaml.YAMLError as err:
        raise TunesmithError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise TunesmithError(f"{path}: the top level must be a mapping of keys")
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> AnyConfig:
    """Read a YAML config file. Relative data/model paths stay relative to the working directory."""
    return config_from_dict(_read_yaml(Path(path)), overrides, source=str(path))


def dump_config(cfg: BaseModel) -> str:
    """The fully resolved config as YAML (what the run directory records)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def reference_markdown() -> str:
    """Markdown tables of every recipe's config keys, types, defaults and descriptions (never drifts)."""
    return "\n".join(f"### `recipe: {name}`\n\n{inspect.cleandoc(model.__doc__ or '')}\n\n{_table(model)}"
                     for name, model in RECIPES.items())


def _table(root: type[BaseModel]) -> str:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str, section: BaseModel | None) -> None:
        # `section`: the recipe's own default of this section (GRPO's rollout, classify's method), whose
        # values are the defaults shown; None at the top and under a required section.
        for name, field in model.model_fields.items():
            ann = field.annotation
            required = section is None and field.is_required()
            value = getattr(section, name) if section is not None else (
                None if required else field.get_default(call_default_factory=True))
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, prefix + name + ".", value)
                continue
            type_name = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
            default = "required" if required else repr(value)
            desc = (field.description or "").replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | `{type_name}` | `{default}` | {desc} |")

    walk(root, "", None)
    return "\n".join(rows) + "\n"
