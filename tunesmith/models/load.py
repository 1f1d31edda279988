"""Load a model and tokenizer from any source a config may name: `default`, `tiny`, an HF folder, a GGUF
file, or a tunesmith run directory (its `final/`).

Quantisation (QLoRA) is decided here because bitsandbytes quantises while loading weights.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith._core import dist
from tunesmith._core.errors import TunesmithError
from tunesmith.config import SHARD_FROM, ModelConfig, QuantConfig

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MARKER = "tunesmith.json"  # written by export.save_final into every final/ folder
ACCEPTED = (
    "`default`, `tiny`, an HF model folder (with config.json), a `.gguf` file, "
    "or a tunesmith run directory (or its final/ folder)"
)


@dataclass(frozen=True)
class ModelSource:
    """What `ModelConfig.name` points at. kind: default | tiny | hf | gguf | adapter."""

    kind: str
    path: Path | None = None
    marker: dict[str, Any] | None = None  # the tunesmith.json of a final/ folder


def resolve_device() -> "torch.device":
    """CUDA when available, else CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Methods that train every weight of the model: under `model.dtype: auto` they load in float32 where that
# fits the GPU, so that AdamW updates float32 weights. The others keep what trains in float32 on a 16-bit
# base: the adapter methods their adapters, `freeze` its trained blocks as master weights
# (`training.precision`).
_OWN_WEIGHTS = ("full",)
# The share of the GPU's memory budget that float32 full fine-tuning's weights, gradients and AdamW
# moments (16 bytes a weight) may take under `auto`; the rest is for activations and the loss.
FULL_FLOAT32_SHARE = 0.75


def resolve_dtype(cfg: ModelConfig, method: str = "full", for_training: bool = True) -> str:
    """`cfg.dtype`, with `auto` made concrete (`choose_dtype`)."""
    return choose_dtype(cfg, method, for_training)[0]


def choose_dtype(cfg: ModelConfig, method: str = "full", for_training: bool = True,
                 optimizer: str = "adamw", shard_optimizer: str = "off") -> tuple[str, str | None]:
    """(`cfg.dtype` with `auto` made concrete, why; None where the config named it). On a GPU with bfloat16
    arithmetic (Ampere and newer): bfloat16 for inference and for training beside a frozen base (adapters,
    or `freeze`'s last blocks), half the memory of float32 and the fast kernels' dtype; for `full`,
    float32 where its weights, gradients and AdamW moments (16 bytes a weight; 10 with `optimizer`'s moments
    in 8 bits) fit `FULL_FLOAT32_SHARE` of the GPU's budget, else bfloat16, which
    `training.optim.BFloat16AdamW` trains in 8 bytes a weight. In a data-parallel run whose optimiser state
    is sharded (`shard_optimizer`, as `training.optim.optimizer_shards` decides it) each GPU holds 1/N of the
    moments, and that is what is counted. float32 on a GPU without bfloat16 and on a CPU."""
    if cfg.dtype != "auto":
        return cfg.dtype, None
    import torch

    device = resolve_device()
    if device.type != "cuda":
        return "float32", f"on a {device.type.upper()}"
    name = torch.cuda.get_device_name(device)
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        return "float32", f"{name} has no bfloat16 arithmetic"
    if not for_training:
        return "bfloat16", f"inference on {name}"
    if method not in _OWN_WEIGHTS:
        return "bfloat16", f"{method} on {name}: the weights that train stay float32"
    from tunesmith.models.speed import device_budget_bytes

    n = stored_parameters(cfg.name)
    if n is None:
        return "float32", f"{method} fine-tuning of a small model"
    budget = device_budget_bytes(device, None)
    eight_bit = optimizer.endswith("8bit")
    world = dist.world_size()
    shards = world if world > 1 and (shard_optimizer == "on" or (shard_optimizer == "auto" and n >= SHARD_FROM)) else 1
    per_weight = 8 + (2 if eight_bit else 8) / shards
    adamw = ("8-bit AdamW" if eight_bit else "AdamW") + (f" (moments sharded over {shards} GPUs)" if shards > 1 else "")
    if per_weight * n <= FULL_FLOAT32_SHARE * budget:
        return "float32", (f"{method} fine-tuning of {n / 1e9:.2f}B weights: float32 with {adamw} takes "
                           f"{per_weight * n / 2**30:.1f} GiB of {name}'s {budget / 2**30:.0f}")
    then = (f"bfloat16 with 8-bit AdamW takes {(4 + 2 / shards) * n / 2**30:.1f}, each update rounded to the "
            "nearest bfloat16" if eight_bit else
            f"bfloat16 with stochastically rounded AdamW takes {(4 + 4 / shards) * n / 2**30:.1f}")
    return "bfloat16", (f"{method} fine-tuning of {n / 1e9:.2f}B weights: float32 with {adamw} would take "
                        f"{per_weight * n / 2**30:.1f} GiB of {name}'s {budget / 2**30:.0f}; {then}")


def stored_parameters(name: str) -> int | None:
    """How many weights the model `name` stores, read from its files' headers (safetensors, GGUF) without
    loading them; a tied weight counts once. None where they cannot be read so: `tiny` and `default` (small
    models), and weights in pickle files."""
    source = resolve_source(name)
    if source.kind == "adapter":  # trained further, it is merged into its base first
        return stored_parameters(source.marker["base_model"])
    if source.kind == "gguf":
        from gguf import GGUFReader

        return sum(int(t.n_elements) for t in GGUFReader(source.path).tensors)
    if source.kind != "hf":
        return None
    files = sorted(source.path.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(math.prod(t["shape"]) for key, t in header.items() if key != "__metadata__")
    return total


def _torch_dtype(name: str) -> "torch.dtype":
    import torch

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise TunesmithError(f"dtype '{name}' is not one of {sorted(dtypes)}")
    return dtypes[name]


def read_marker(folder: Path) -> dict[str, Any]:
    """The `tunesmith.json` of a final/ folder."""
    path = folder / MARKER
    try:
        marker = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TunesmithError(f"{path}: cannot read the tunesmith model marker: {err}") from None
    if marker.get("kind") not in ("adapter", "full") or "base_model" not in marker:
        raise TunesmithError(f"{path}: expected keys kind (adapter|full) and base_model, got {marker}")
    if inside := marker.get("base_in_run"):  # the base inside this run (a pipeline's earlier stage) goes first,
        # wherever the run now is; `base_model` is where it was when saved
        for root in folder.resolve().parents:
            if (root / "status.json").is_file() and (root / inside).exists():
                marker["base_model"] = str(root / inside)
                break
    return marker


def resolve_source(name: str) -> ModelSource:
    """Classify `name`; a path that is none of the accepted kinds is a TunesmithError naming it."""
    if name in ("default", "tiny"):
        return ModelSource(name)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", path)
    if path.is_dir():
        # A run directory is recognised by its final/ folder (or the files every run writes).
        if not (path / MARKER).is_file() and (path / "final" / MARKER).is_file():
            path = path / "final"
        if (path / MARKER).is_file():
            marker = read_marker(path)
            return ModelSource("adapter" if marker["kind"] == "adapter" else "hf", path, marker)
        if (path / "status.json").is_file() or (path / "config.yaml").is_file():
            raise TunesmithError(f"{path} is a run directory without a finished final/ model (did the run finish?)")
        if (path / "config.json").is_file():
            return ModelSource("hf", path)
    what = "does not exist" if not path.exists() else "is not a model"
    raise TunesmithError(f"model '{name}' {what}; expected {ACCEPTED}")


def _bnb_config(dtype: "torch.dtype", quant: QuantConfig) -> Any:
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_compute_dtype=dtype if quant.compute_dtype == "auto" else _torch_dtype(quant.compute_dtype),
        bnb_4bit_use_double_quant=quant.double_quant,
    )


def _hf_folder(source: ModelSource) -> Path:
    """The folder of an on-disk HF model; `default` is converted into the cache on first use."""
    if source.kind == "default":
        from tunesmith.models.default import default_model_dir

        return default_model_dir()
    assert source.kind == "hf" and source.path is not None, source
    return source.path


def _is_reward(source: ModelSource) -> bool:
    """A final/ folder of `recipe: reward` or `recipe: classify` (a sequence head instead of the LM head)."""
    return bool(source.marker) and source.marker.get("head") in ("reward", "classify")


def _load_hf_folder(path: Path, dtype: "torch.dtype", attn: str, quant: QuantConfig | None,
                    reward: bool = False) -> "PreTrainedModel":
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn}
    if quant is not None:
        kwargs["quantization_config"] = _bnb_config(dtype, quant)
        # the current GPU: data parallel, each process's own (`_core.dist.join`)
        kwargs["device_map"] = {"": torch.cuda.current_device()} if resolve_device().type == "cuda" else "cpu"
    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    return auto.from_pretrained(path, **kwargs)


def _quantise_in_memory(model: "PreTrainedModel", dtype: "torch.dtype", attn: str,
                        quant: QuantConfig) -> "PreTrainedModel":
    """Quantise a model that exists only in memory by saving it and reloading with bitsandbytes, the one
    path where transformers swaps in `Linear4bit` / `Linear8bitLt` layers and quantises the weights."""
    tmp = Path(tempfile.mkdtemp(prefix="tunesmith-quantise-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        quantised = _load_hf_folder(tmp, dtype, attn, quant)
        quantised.config._name_or_path = model.config._name_or_path  # not the temp folder deleted below
        return quantised
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_base(source: ModelSource, cfg: ModelConfig, seed: int) -> tuple["PreTrainedModel", Any]:
    """An unquantised plain model in cfg.dtype (on CPU) and its tokenizer; adapters are merged."""
    from transformers import AutoTokenizer

    dtype = _torch_dtype(cfg.dtype)
    if source.kind == "tiny":
        from tunesmith.models.tiny import tiny_model, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        model = tiny_model(tokenizer, seed=seed).to(dtype)
        model.set_attn_implementation(cfg.attn_implementation)
        return model, tokenizer
    if source.kind == "gguf":
        from tunesmith.models.default import load_gguf

        model, tokenizer = load_gguf(source.path, dtype=dtype)
        model.set_attn_implementation(cfg.attn_implementation)
        return model.to(dtype), tokenizer
    if source.kind == "adapter":
        from tunesmith.models.methods import is_mergeable

        adapted, tokenizer = _load_adapter(source, cfg, quantise=False)
        if not is_mergeable(adapted):
            what = ("a stack holding an adapter that" if source.marker.get("stacked")
                    else f"a {source.marker['method']} adapter")
            raise TunesmithError(f"{source.path}: {what} is no weight update, so it cannot be merged into its "
                                 "base; to train on it, stack a new adapter (model.adapter=stack)")
        # Training on top of an adapter run starts from the merged model, as its outputs are the same.
        return adapted.merge_and_unload(), tokenizer
    path = _hf_folder(source)
    model = _load_hf_folder(path, dtype, cfg.attn_implementation, None, reward=_is_reward(source))
    return model, AutoTokenizer.from_pretrained(path)


def _load_quantised(source: ModelSource, cfg: ModelConfig, seed: int,
                    quant: QuantConfig) -> tuple["PreTrainedModel", Any]:
    """The base in 4 or 8 bits: straight from disk where it is an HF folder, else via an in-memory copy."""
    from transformers import AutoTokenizer

    dtype = _torch_dtype(cfg.dtype)
    if source.kind in ("default", "hf"):
        path = _hf_folder(source)
        return _load_hf_folder(path, dtype, cfg.attn_implementation, quant), AutoTokenizer.from_pretrained(path)
    model, tokenizer = _load_base(source, cfg, seed)
    return _quantise_in_memory(model, dtype, cfg.attn_implementation, quant), tokenizer


def _load_adapter(source: ModelSource, cfg: ModelConfig, *, quantise: bool) -> tuple[Any, Any]:
    """Rebuild the recorded base (bit-identically for `tiny` via its seed; quantised as it was trained, with
    `quantise`) and attach the adapter."""
    from transformers import AutoTokenizer

    from tunesmith.models.methods import load_adapter

    marker = source.marker
    assert marker is not None and marker["kind"] == "adapter", source
    base_cfg = cfg.model_copy(update={"name": marker["base_model"]})
    base_source = resolve_source(marker["base_model"])
    if marker.get("stacked"):  # on the adapter model it was trained on, rebuilt the same way
        if base_source.kind != "adapter":
            raise TunesmithError(f"{source.path / MARKER}: a stacked adapter's base_model must be an adapter run, "
                                 f"got {marker['base_model']}")
        below, _ = _load_adapter(base_source, base_cfg, quantise=quantise)
        stacked = load_adapter(below, source.path, marker["method"], stacked=True)
        return stacked, AutoTokenizer.from_pretrained(source.path)
    if base_source.kind == "tiny" and "base_seed" not in marker:
        raise TunesmithError(f"{source.path / MARKER}: a tiny-based adapter must record base_seed")
    base_seed = int(marker.get("base_seed", 0))  # only `tiny` is built from a seed
    if quantise:
        base, _ = _load_quantised(base_source, base_cfg, base_seed, QuantConfig(**marker.get("quant", {})))
    else:
        base, _ = _load_base(base_source, base_cfg, base_seed)
    if _is_reward(source):
        from tunesmith.models.reward import to_reward_model, to_sequence_classifier

        # Its fresh head is replaced by the saved one (PEFT modules_to_save); a classifier's has K outputs.
        labels = marker.get("labels")
        base = to_sequence_classifier(base, labels) if labels else to_reward_model(base)
    model = load_adapter(base, source.path, marker["method"])
    # The tokenizer saved with the adapter is the one training used (pad token and all).
    return model, AutoTokenizer.from_pretrained(source.path)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".json")


def model_fingerprint(cfg: ModelConfig, seed: int = 0) -> str:
    """What the weights `cfg.name` loads are, as a short hex digest: for files, a hash of their contents
    (weights, configs and the tunesmith marker, with an adapter's base and a stack's levels below
    included), so a cache keyed by it is never reused for other weights behind the same path; `tiny` is
    its seed; `default` is the bundled model. The dtype is part of it."""
    import hashlib

    h = hashlib.sha256(f"{cfg.dtype}".encode())

    def add(name: str) -> None:
        source = resolve_source(name)
        if source.kind in ("default", "tiny"):
            h.update(f"{source.kind}:{seed if source.kind == 'tiny' else ''}".encode())
            return
        files = [source.path] if source.path.is_file() else sorted(
            f for f in source.path.iterdir() if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES))
        for f in files:
            h.update(f.name.encode())
            with f.open("rb") as stream:
                for block in iter(lambda: stream.read(1 << 24), b""):
                    h.update(block)
        if source.kind == "adapter":  # its base (for a stack: the level below), rebuilt at load
            base_seed = int(source.marker.get("base_seed", seed))
            if source.marker["base_model"] == "tiny":
                h.update(f"tiny:{base_seed}".encode())
            else:
                add(source.marker["base_model"])

    add(cfg.name)
    return h.hexdigest()[:16]


def _prepare_tokenizer(tokenizer: "PreTrainedTokenizerBase", name: str) -> "PreTrainedTokenizerBase":
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise TunesmithError(f"the tokenizer of model '{name}' has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    # Training pads on the right; the generation engine switches to left padding itself.
    tokenizer.padding_side = "right"
    return tokenizer


def load_tokenizer(cfg: ModelConfig) -> "PreTrainedTokenizerBase":
    """Only the tokenizer of `cfg.name` (what validation needs), without loading weights where avoidable."""
    from transformers import AutoTokenizer

    source = resolve_source(cfg.name)
    if source.kind == "tiny":
        from tunesmith.models.tiny import tiny_tokenizer

        tokenizer = tiny_tokenizer()
    elif source.kind == "gguf":
        tokenizer = AutoTokenizer.from_pretrained(source.path.parent, gguf_file=source.path.name)
    elif source.kind == "adapter":  # a final/ folder always holds the tokenizer training used
        tokenizer = AutoTokenizer.from_pretrained(source.path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(_hf_folder(source))
    return _prepare_tokenizer(tokenizer, cfg.name)


def load_model_and_tokenizer(
    cfg: ModelConfig, *, method: str = "full", seed: int = 0, for_training: bool = True,
    quant: QuantConfig | None = None,
) -> tuple[Any, "PreTrainedTokenizerBase"]:
    """Load `cfg.name` in `cfg.dtype` (`resolve_dtype`); quantised as `quant` says (default 4-bit NF4) when
    `method == "qlora"`; on CUDA when available.

    `seed` initialises `tiny`. An adapter run loads as base + adapter for inference (`for_training=False`,
    quantised base if it was trained with qlora). To train further it is merged into its base first (only
    weight-update adapters can be) and `method` then applies to the merged model, or, with
    `cfg.adapter == "stack"`, it loads as for inference, frozen, and `apply_method` stacks the new adapter.
    """
    cfg = cfg.model_copy(update={"dtype": resolve_dtype(cfg, method, for_training)})
    source = resolve_source(cfg.name)
    stack = for_training and cfg.adapter == "stack"
    if stack and source.kind != "adapter":
        raise TunesmithError(f"model.adapter=stack: model '{cfg.name}' holds no adapter to stack on (it is a "
                             "full model); use model.adapter=merge")
    try:
        if source.kind == "adapter" and (stack or not for_training):
            # as saved (quantised base if it was trained with qlora); to stack on, frozen: apply_method stacks
            model, tokenizer = _load_adapter(source, cfg, quantise=source.marker["method"] == "qlora")
            quantised = source.marker["method"] == "qlora"
            model.requires_grad_(False)
        elif method == "qlora":
            model, tokenizer = _load_quantised(source, cfg, seed, quant or QuantConfig())
            quantised = True
        else:
            model, tokenizer = _load_base(source, cfg, seed)
            quantised = False
    except (OSError, ValueError, KeyError, struct.error) as err:  # a folder missing its weights, a damaged file
        raise TunesmithError(f"cannot load model '{cfg.name}': {type(err).__name__}: {err}") from err
    if cfg.dtype == "float16":  # weights beyond its range load as inf, and every output they touch follows
        from tunesmith._core.precision import check_float16

        check_float16(model.named_parameters(), f"model '{cfg.name}' in model.dtype float16",
                      "use model.dtype bfloat16 or float32")
    if not quantised:  # bitsandbytes placed quantised models already (device_map)
        model = model.to(resolve_device())
    _prepare_tokenizer(tokenizer, cfg.name)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.train(for_training)
    return model, tokenizer
