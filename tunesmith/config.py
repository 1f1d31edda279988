"""Typed configuration: one pydantic model per recipe, loaded from YAML with `key.sub=value` overrides.

Defaults live here and only here. Unknown keys are errors that name the key and the nearest valid one.
"""
from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, field_validator, model_validator

from tunesmith._core.errors import TunesmithError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """Which pretrained model to start from."""

    name: str = Field(
        "default",
        description="`default` (bundled SmolLM2-135M-Instruct), `tiny` (random-initialised test Llama), "
        "an HF model folder, a `.gguf` file, or a tunesmith run directory (its `final/`).",
    )
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weight dtype of the loaded model.")
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="Attention kernel.")


class LoraConfig(_Strict):
    """Low-rank adapter settings (used by methods lora, dora and qlora)."""

    r: int = Field(16, gt=0, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="`all-linear` or a list of module names such as [q_proj, v_proj]."
    )


class FreezeConfig(_Strict):
    """Frozen-body settings (method freeze): everything not named here stays frozen."""

    train_last_n_layers: int = Field(2, ge=0, description="Train the last N transformer blocks.")
    train_lm_head: bool = Field(True, description="Train the output layer (unties tied embeddings).")
    train_norm: bool = Field(True, description="Train the final norm.")


class MethodConfig(_Strict):
    """How weights are updated."""

    kind: Literal["full", "freeze", "lora", "dora", "qlora"] = Field(
        "lora", description="full: all weights; freeze: last N blocks and/or head; lora/dora/qlora: adapters."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)


class DataConfig(_Strict):
    """Training data and how it becomes token ids."""

    train: Union[str, list[str]] = Field(..., description="File(s) or HF dataset folder(s): JSONL, Parquet, CSV.")
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


class TrainConfig(_Strict):
    """The optimisation loop."""

    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored if max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Optimiser steps; overrides epochs.")
    micro_batch_size: int = Field(8, gt=0, description="Examples (or packed rows) per forward pass.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimiser step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="Decay after warm-up.")
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="Fraction of steps spent warming up linearly.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to norms and biases).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null disables.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 autocast (slower on CPUs without bf16).")
    log_every: int = Field(1, gt=0, description="Write metrics every N steps.")
    eval_every: int | None = Field(None, gt=0, description="Validation loss every N steps (and at the end).")
    save_every: int | None = Field(50, gt=0, description="Checkpoint every N steps (and at the end).")
    keep_last: int = Field(2, gt=0, description="Checkpoints kept on disk.")
    tensorboard: bool = Field(True, description="Also write TensorBoard logs to <output_dir>/tensorboard.")
    progress: bool = Field(True, description="Show a progress bar.")
    attention: Literal["auto", "varlen", "padded"] = Field(
        "auto", description="varlen: each micro-batch is one flat row, no padding, every example attending "
                            "only to itself (flash varlen kernel on CUDA); padded: rows padded to the longest; "
                            "auto: varlen on CUDA.")
    loss_chunking: Literal["auto", "on", "off"] = Field(
        "auto", description="Cross-entropy from hidden states in chunks, never holding the full logits "
                            "(auto: on CUDA).")
    checkpointing: Literal["auto", "off", "all"] | NonNegativeInt = Field(
        "auto", description="Activation checkpointing: all blocks, off, a number of blocks, or auto (on CUDA: "
                            "per micro-batch, the fewest blocks that fit memory_budget_gib).")
    memory_budget_gib: float | None = Field(
        None, gt=0, description="GPU memory the run may plan for (null: 90% of the device).")
    offload_activations: bool = Field(False, description="Keep un-checkpointed activations in host memory.")
    compile: bool = Field(False, description="torch.compile each transformer block.")
    kernels: Literal["auto", "on", "off"] = Field(
        "auto", description="Fused kernels: LoRA layers without adapter copies, and Liger's RMSNorm/RoPE/SwiGLU "
                            "when liger-kernel is installed (auto: on CUDA).")


class EvalConfig(_Strict):
    """Held-out task evaluation before and after training."""

    task_file: str | None = Field(None, description="Held-out JSONL scored by generation; null skips it.")
    before: bool = Field(True, description="Also score the untuned model.")
    limit: int | None = Field(None, gt=0, description="Score only the first N rows.")
    max_new_tokens: int = Field(64, gt=0, description="Generation budget per prompt.")
    batch_size: int = Field(64, gt=0, description="Prompts generated together.")


class _RecipeConfig(_Strict):
    """What every recipe's config holds: where the run goes, the seed, the model, the method, the loop."""

    recipe: str = Field(..., description="Which recipe runs this config.")
    output_dir: str = Field("runs/run", description="The run directory.")
    seed: int = Field(0, description="Seeds model, head and adapter init, data order, dropout and splits.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("output_dir")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


ADAPTER_METHODS = ("lora", "dora", "qlora")


def _check_adapter_reference(reference: str, kind: str, instead: str) -> None:
    """`reference: adapter` switches the adapter off, so it needs a method that has one."""
    if reference == "adapter" and kind not in ADAPTER_METHODS:
        raise ValueError(f"reference=adapter needs an adapter method (lora, dora, qlora), not "
                         f"method.kind={kind}; use {instead}")


class SFTConfig(_RecipeConfig):
    """Supervised fine-tuning (`recipe: sft`)."""

    recipe: Literal["sft"] = Field("sft", description="Which recipe runs this config.")
    output_dir: str = Field("runs/sft", description="The run directory.")
    data: DataConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)


class PreferenceDataConfig(_Strict):
    """Preference data: pairs (prompt, chosen, rejected), OpenAI DPO rows, or K-way rankings."""

    train: Union[str, list[str]] = Field(..., description="File(s) or HF dataset folder(s): JSONL, Parquet, CSV.")
    validation: Union[str, list[str], None] = Field(None, description="Validation file(s); else split from train.")
    validation_split: float = Field(0.1, ge=0, lt=1, description="Fraction of prompts held out when no file is given.")
    max_seq_len: int = Field(512, gt=1, description="Pairs with a longer side are dropped (and counted).")
    chat_template: Union[Literal["tokenizer", "chatml"], str] = Field(
        "tokenizer", description="`tokenizer` (its own template), `chatml`, or a path to a Jinja template file."
    )


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
    def _no_qlora(cls, v: MethodConfig) -> MethodConfig:
        if v.kind == "qlora":
            raise ValueError("a reward model's new head needs an unquantised body: use lora, dora, freeze or full")
        return v


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


class DPOConfig(_RecipeConfig):
    """Preference optimisation (`recipe: dpo`): DPO and its relatives on preference pairs, KTO on labelled answers.

    `train.micro_batch_size` counts prompts (pairs for DPO, answers for KTO). `reference` says where the
    reference log-probs come from: `adapter` (the base with the adapter switched off: no copy in memory;
    lora/dora/qlora only), `copy` (a frozen copy of the base), `precomputed` (one pass before training,
    cached in the run directory), or `auto` (adapter for adapter methods, else precomputed).
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
        _check_adapter_reference(self.reference, self.method.kind, "copy or precomputed")
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
        return "adapter" if self.method.kind in ADAPTER_METHODS else "precomputed"


class PromptDataConfig(_Strict):
    """Prompts for online RL: chat rows whose last assistant turn, if any, is the reference answer (or an
    `answer` field gives it); a row's `task` names the checkable task that scores it."""

    train: Union[str, list[str]] = Field(..., description="Prompt file(s): JSONL, Parquet, CSV or HF dataset folders.")
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


class RewardSourceConfig(_Strict):
    """One reward source; several are summed with their weights."""

    kind: Literal["task", "function", "model"] = Field(
        ..., description="task: a checkable task's reward; function: a Python function; model: a reward model."
    )
    name: str = Field(..., description="task: a task name or `auto` (each row's own `task`, else exact match "
                      "on its answer); function: `module:function` or `path/to/file.py:function`; model: a "
                      "`recipe: reward` run directory or its `final/` folder.")
    weight: float = Field(1.0, description="Weight of this source in the summed reward.")


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
        "gae", description="gae: a value head and GAE (PPO); group: GRPO's group-normalised scores; rloo: "
        "leave-one-out baseline; reinforce: batch-mean baseline.")
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
    value_coef: float = Field(0.1, ge=0, description="gae: weight of the value loss (the head is trained apart "
                              "from the policy with Adam, so value_lr is the knob that matters).")
    value_lr: float | None = Field(None, gt=0, description="gae: the value head's peak learning rate; null: train.lr.")
    kl_coef: float = Field(0.05, ge=0, description="β of the KL to the reference; 0 skips the reference.")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description="Per-token KL estimator.")
    kl_in: Literal["reward", "loss"] = Field(
        "reward", description="reward: -β KL per token in the reward (PPO-RLHF); loss: β KL added to the loss (GRPO).")
    kl_target: float | None = Field(None, gt=0, description="Adaptive KL: move β so the KL per response tracks this.")
    kl_horizon: int = Field(10000, gt=0, description="Adaptive KL horizon in samples.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight.")
    loss_aggregation: Literal["token", "sequence"] = Field(
        "token", description="token: every response token weighs the same; sequence: every response does.")


class _OnlineConfig(_RecipeConfig):
    data: PromptDataConfig
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: OnlineRewardConfig = Field(default_factory=OnlineRewardConfig)
    rl: RLAlgorithmConfig = Field(default_factory=RLAlgorithmConfig)
    reference: Literal["auto", "adapter", "copy"] = Field(
        "auto", description="The KL reference: `adapter` (the base with the adapter off), `copy` (a frozen copy), "
        "or `auto` (adapter for adapter methods, else copy; none when rl.kl_coef is 0).")
    sample_every: int = Field(10, gt=0, description="Write sample responses to samples/step-N.jsonl every N steps.")
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _fits(self) -> "_OnlineConfig":
        _check_adapter_reference(self.reference, self.method.kind, "copy")
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
        return self

    def reference_source(self) -> str | None:
        """adapter or copy; None when there is no KL term and no reference was asked for (an explicit
        reference with kl_coef 0 measures the KL without penalising it)."""
        if self.reference != "auto":
            return self.reference
        if self.rl.kl_coef == 0 and self.rl.kl_target is None:
            return None
        return "adapter" if self.method.kind in ADAPTER_METHODS else "copy"

    def total_steps(self, n_prompts: int) -> int:
        """RL steps: train.max_steps, else train.epochs passes over the prompts."""
        import math

        per_epoch = math.ceil(n_prompts / self.rollout.prompts_per_step)
        return self.train.max_steps or max(1, math.ceil(self.train.epochs * per_epoch))


class PPOConfig(_OnlineConfig):
    """Online RL with a value head (`recipe: ppo`): sample, score, GAE, several clipped epochs per rollout.

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


RECIPES: dict[str, type[_Strict]] = {"sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig, "ppo": PPOConfig,
                                     "grpo": GRPOConfig}
AnyConfig = Union[SFTConfig, RewardConfig, DPOConfig, PPOConfig, GRPOConfig]


# ---------------------------------------------------------------- loading

def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise TunesmithError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw != "" else ""


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_valid_keys(ann, prefix + name + "."))
    return keys


def _explain(err: ValidationError, model: type[BaseModel], source: str) -> TunesmithError:
    valid = _valid_keys(model)
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            if not near:  # compare the last part alone: `train.lr_rate` -> `train.lr`
                leaf = [k for k in valid if k.rsplit(".", 1)[0] == key.rsplit(".", 1)[0] or "." not in key]
                near = difflib.get_close_matches(key, leaf, n=1, cutoff=0.4)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            lines.append(f"unknown key '{key}'{hint}")
        elif not key:  # a rule across fields (a model validator): its message names them
            lines.append(e["msg"].removeprefix("Value error, "))
        elif e["type"] == "missing":
            lines.append(f"missing required key '{key}'")
        else:
            lines.append(f"'{key}': {e['msg']} (got {e.get('input')!r})")
    return TunesmithError(f"invalid config {source}:\n  " + "\n  ".join(lines))


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None, source: str = "<dict>") -> AnyConfig:
    """Validate a plain dict (plus `key.sub=value` overrides) into the recipe's config model."""
    raw = dict(raw)
    for text in overrides or []:
        path, value = _parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise TunesmithError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
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


def load_config(path: str | Path, overrides: list[str] | None = None) -> AnyConfig:
    """Read a YAML config file. Relative data/model paths stay relative to the working directory."""
    path = Path(path)
    if not path.is_file():
        raise TunesmithError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise TunesmithError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise TunesmithError(f"{path}: the top level must be a mapping of keys")
    return config_from_dict(raw, overrides, source=str(path))


def dump_config(cfg: BaseModel) -> str:
    """The fully resolved config as YAML (what the run directory records)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def reference_markdown() -> str:
    """Markdown tables of every recipe's config keys, types, defaults and descriptions (never drifts)."""
    return "\n".join(f"### `recipe: {name}`\n\n{inspect.cleandoc(model.__doc__ or '')}\n\n{_table(model)}"
                     for name, model in RECIPES.items())


def _table(root: type[BaseModel]) -> str:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, prefix + name + ".")
                continue
            type_name = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            desc = (field.description or "").replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | `{type_name}` | `{default}` | {desc} |")

    walk(root, "")
    return "\n".join(rows) + "\n"
