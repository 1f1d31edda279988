"""Write a causal LM of the Llama family (Llama, Mistral, Qwen2, Qwen3) and its tokenizer as one GGUF file
(llama.cpp, Ollama, LM Studio).

Tensors go under llama.cpp's names for the model's architecture. llama.cpp's `llama` architecture applies
RoPE to adjacent pairs of a head's dimensions (x0, x1), (x2, x3), ... while transformers rotates the two
halves (x_i, x_{i+d/2}), so for it the rows of the q and k projections are interleaved per head on export;
transformers' GGUF loader undoes exactly this. Qwen2 and Qwen3 rotate halves in llama.cpp too and are
written as they are.

Llama 3.1+'s RoPE scaling (`rope_type: llama3`) goes where llama.cpp reads it: a `rope_freqs` tensor of
one divisor per frequency. transformers' GGUF loader leaves that tensor unread and would run the model with
unscaled RoPE; tunesmith's loader (`models.default.load_gguf`) turns it back into `rope_parameters`.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith._core.errors import TunesmithError
from tunesmith.models.methods import is_quantised

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GGUF_DTYPES = ("f16", "bf16", "q8_0", "f32")


@dataclass(frozen=True)
class Layout:
    """How one transformers model type is written."""

    arch: str                  # llama.cpp's architecture
    model_class: str           # the transformers class whose weights are written
    pairs: bool = True         # llama.cpp rotates adjacent pairs: q/k rows interleaved per head
    qkv_bias: bool = False     # q, k and v projections carry biases (Qwen2)
    qk_norm: bool = False      # RMSNorm over each head of q and k (Qwen3)


LAYOUTS = {
    "llama": Layout("llama", "LlamaForCausalLM"),
    "mistral": Layout("llama", "MistralForCausalLM"),  # llama.cpp runs Mistral (no sliding window) as Llama
    "qwen2": Layout("qwen2", "Qwen2ForCausalLM", pairs=False, qkv_bias=True),
    "qwen3": Layout("qwen3", "Qwen3ForCausalLM", pairs=False, qk_norm=True),
}

# HF module path inside a block -> GGUF tensor name (without `blk.N.` and `.weight`)
_BLOCK_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_QK_NORMS = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}

# llama.cpp's name for a byte-level BPE pre-tokenizer (as steps of tokenizer.json) that splits text the same way.
_WORDS = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}%s| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
_BPE_PRE_TOKENIZERS = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",  # SmolLM2 and the tiny tokenizer
    (("Split", _WORDS % "{1,3}"), ("ByteLevel", False)): "llama-bpe",  # Llama 3: numbers in runs of up to 3 digits
    (("Split", _WORDS % ""), ("ByteLevel", False)): "qwen2",  # Qwen2 and Qwen3: each digit alone
}
# Normalizers a byte-level BPE may have that change no text llama.cpp is given (it normalises nothing):
# Qwen's NFC leaves text that is already composed, which is how text is typed and stored.
_HARMLESS_NORMALIZERS = {"qwen2": ({"type": "NFC"},)}


def check_exportable(model: Any) -> Layout:
    """The model's layout, or a TunesmithError unless `model` is a plain, unquantised causal LM of a type
    in `LAYOUTS` whose computation the GGUF layout expresses."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        raise TunesmithError("the model carries an unmerged PEFT adapter; merge it first (merge_and_unload(), "
                             "or export the run folder, which merges it)")
    if is_quantised(model):
        raise TunesmithError("cannot export a bitsandbytes-quantised model to GGUF; load its base unquantised")
    cfg = model.config
    layout = LAYOUTS.get(cfg.model_type)
    if layout is None:
        raise TunesmithError(f"GGUF export supports model_type {sorted(LAYOUTS)}, not '{cfg.model_type}'")
    if type(model).__name__ != layout.model_class:
        raise TunesmithError(f"GGUF export needs a plain {layout.model_class}, not "
                             f"{type(model).__name__} (a reward head, or an adapter that is not merged?)")
    # These change the computation, and the layout written here cannot express them.
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    window = getattr(cfg, "sliding_window", None)
    unsupported = {
        "rope_type": rope != "default" and not (rope == "llama3" and layout.arch == "llama"),
        "attention_bias": bool(getattr(cfg, "attention_bias", False)),
        "mlp_bias": bool(getattr(cfg, "mlp_bias", False)),
        "hidden_act": cfg.hidden_act != "silu",
        # Qwen keeps a window in its config that only use_sliding_window switches on
        "sliding_window": bool(getattr(cfg, "use_sliding_window", window is not None)) and window is not None
                          and window < cfg.max_position_embeddings,
    }
    if any(unsupported.values()):
        raise TunesmithError(f"GGUF export cannot write a {cfg.model_type} model with "
                             f"{[k for k, v in unsupported.items() if v]} (rope_type {rope}, hidden_act "
                             f"{cfg.hidden_act}, sliding_window {window})")
    return layout


def rope_interleave(weight: "torch.Tensor", n_heads: int) -> "torch.Tensor":
    """Rows of a q/k projection (n_heads * d, in) from transformers' half-split RoPE order to llama.cpp's
    pairwise order: within each head, row 2i <- row i and row 2i+1 <- row i + d/2."""
    out_features = weight.shape[0]
    half = out_features // n_heads // 2
    return weight.reshape(n_heads, 2, half, -1).transpose(1, 2).reshape(out_features, -1)


def _encode_tensor(name: str, weight: "torch.Tensor", dtype: str) -> tuple["np.ndarray", Any]:
    """The array to write and its GGML type: norms (1-D) stay f32; matrices become f16, bf16 or Q8_0 blocks."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    from tunesmith._core.precision import check_float16

    data = weight.detach().float().cpu().numpy()
    if data.ndim == 1 or dtype == "f32":
        return data, GGMLQuantizationType.F32
    if dtype == "bf16":  # float32's range: nothing to check
        return quants.quantize(data, GGMLQuantizationType.BF16), GGMLQuantizationType.BF16
    block_size = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0]
    if dtype == "q8_0" and data.shape[-1] % block_size == 0:  # llama.cpp keeps odd-width rows in f16 too
        return quants.quantize(data, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    check_float16([(name, weight)], f"GGUF tensor {name} in f16",
                  "gguf-bf16, gguf-q8_0 (each block's f16 scale is its largest value / 127) or gguf-f32 hold such "
                  "weights")
    return data.astype(np.float16), GGMLQuantizationType.F16


def _inverse_frequencies(cfg: Any, rope_type: str) -> "torch.Tensor":
    """RoPE's inverse frequencies for `cfg` as transformers computes them under `rope_type` (`default`:
    unscaled, θ^(-2i/d))."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type != "default":
        return ROPE_INIT_FUNCTIONS[rope_type](cfg)[0]
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    theta = float(cfg.rope_parameters["rope_theta"])
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)


def rope_divisors(cfg: Any) -> "torch.Tensor | None":
    """llama.cpp's `rope_freqs` for Llama 3's RoPE scaling: each frequency's divisor, the unscaled inverse
    frequency over the scaled one (1 for the fast ones, `factor` for the slow ones, between for the band
    that is smoothed). None for unscaled RoPE."""
    if (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default") != "llama3":
        return None
    return _inverse_frequencies(cfg, "default") / _inverse_frequencies(cfg, "llama3")


def llama3_rope_parameters(divisors: Any, cfg: Any, source: str) -> dict[str, Any]:
    """The `rope_parameters` of Llama 3's scaling that give `divisors` (a GGUF's `rope_freqs`) on `cfg`.

    A frequency f of the smoothed band is divided by 1 / ((1 - s) / factor + s) with s = (L·f/2π - lf) /
    (hf - lf), which is a·f + b: two such frequencies fix a and b, and lf = 1 picks one of the (L, lf, hf)
    that give them, all of which divide every frequency alike (the band's edges are where s is 0 and 1).
    Llama 3's own values (lf 1, hf 4, L 8192) are tried first. Raises unless the result reproduces
    `divisors`."""
    import copy
    import math

    import numpy as np
    import torch

    d = torch.tensor(np.asarray(divisors), dtype=torch.float64).flatten()
    theta = float(cfg.rope_parameters["rope_theta"])
    factor = float(d.max())
    candidates = [(1.0, 4.0, 8192)]
    band = (d > 1 + 1e-6) & (d < factor * (1 - 1e-6))
    if int(band.sum()) >= 2:
        f = _inverse_frequencies(cfg, "default").double()[band]
        smooth = (1 / d[band] - 1 / factor) / (1 - 1 / factor)
        a, b = torch.linalg.lstsq(torch.stack([f, torch.ones_like(f)], 1), smooth[:, None]).solution[:, 0].tolist()
        if b < 0:
            high = 1 - 1 / b
            candidates.append((1.0, high, -2 * math.pi * a / b))
    for low, high, context in candidates:
        params = {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": low,
                  "high_freq_factor": high, "original_max_position_embeddings": context}
        trial = copy.deepcopy(cfg)
        trial.rope_parameters = params
        if torch.allclose(rope_divisors(trial).double(), d, rtol=1e-4, atol=0):
            return params
    raise TunesmithError(f"{source}: its rope_freqs tensor is not Llama 3's RoPE scaling (divisors "
                         f"{[round(x, 4) for x in d.tolist()]}), which is the only one read from a GGUF file")


def _model_tensors(model: "PreTrainedModel", layout: Layout) -> dict[str, "torch.Tensor"]:
    """GGUF name -> tensor, q/k rows in llama.cpp's RoPE order; no `output` when the head is tied; Llama 3's
    RoPE scaling as `rope_freqs`."""
    cfg = model.config
    body = model.model
    tensors = {"token_embd.weight": body.embed_tokens.weight, "output_norm.weight": body.norm.weight}
    if (divisors := rope_divisors(cfg)) is not None:
        tensors["rope_freqs.weight"] = divisors
    if model.lm_head.weight.data_ptr() != body.embed_tokens.weight.data_ptr():
        tensors["output.weight"] = model.lm_head.weight
    heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}
    for i, layer in enumerate(body.layers):
        for hf_name, gguf_name in _BLOCK_TENSORS.items():
            weight = layer.get_submodule(hf_name).weight
            if layout.pairs and gguf_name in heads:
                weight = rope_interleave(weight, heads[gguf_name])
            tensors[f"blk.{i}.{gguf_name}.weight"] = weight
        if layout.qkv_bias:
            for name in ("q", "k", "v"):
                tensors[f"blk.{i}.attn_{name}.bias"] = layer.get_submodule(f"self_attn.{name}_proj").bias
        if layout.qk_norm:
            for hf_name, gguf_name in _QK_NORMS.items():
                tensors[f"blk.{i}.{gguf_name}.weight"] = layer.get_submodule(hf_name).weight
    return tensors


def _bpe_pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for how a byte-level BPE tokenizer (its tokenizer.json `spec`) splits text."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    key = []
    for step in steps:
        if step.get("type") == "ByteLevel" and not step.get("add_prefix_space"):
            key.append(("ByteLevel", step.get("use_regex", True)))
        elif step.get("type") == "Digits":
            key.append(("Digits", step.get("individual_digits", False)))
        elif (step.get("type") == "Split" and step.get("behavior") == "Isolated" and not step.get("invert")
              and set(step.get("pattern", {})) == {"Regex"}):
            key.append(("Split", step["pattern"]["Regex"]))
        else:
            key.append((json.dumps(step),))
    name = _BPE_PRE_TOKENIZERS.get(tuple(key))
    normalizer = spec.get("normalizer")
    # llama.cpp's byte-level BPE normalises nothing
    if name is None or normalizer is not None and normalizer not in _HARMLESS_NORMALIZERS.get(name, ()):
        raise TunesmithError(f"GGUF export knows no llama.cpp pre-tokenizer that splits text like {json.dumps(pre)} "
                             f"with normalizer {json.dumps(spec.get('normalizer'))}; known: "
                             f"{sorted(_BPE_PRE_TOKENIZERS.values())}, without a normalizer")
    return name


def _add_tokenizer(writer: Any, tokenizer: "PreTrainedTokenizerBase", n_vocab: int) -> None:
    """Tokens, types, merges (and SentencePiece scores), special ids, BOS/EOS flags and the chat template."""
    from gguf import TokenType

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model["type"] != "BPE":
        raise TunesmithError(f"GGUF export supports BPE tokenizers, not {model['type']}")
    sentencepiece = bool(model.get("byte_fallback"))  # Llama 2 style: SentencePiece converted to BPE
    pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]  # both tokenizers formats

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= n_vocab:
        raise TunesmithError(f"the tokenizer has ids up to {max(by_id)} but the model only {n_vocab} embeddings")
    # Rows of the embedding no token uses (vocabularies padded to a round size) get placeholder tokens.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    added = tokenizer.added_tokens_decoder
    types = []
    for i, token in enumerate(tokens):
        if i in added:
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        elif i not in by_id:
            types.append(TokenType.UNUSED)
        elif sentencepiece and token.startswith("<0x") and len(token) == 6:
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)

    writer.add_tokenizer_model("llama" if sentencepiece else "gpt2")
    writer.add_tokenizer_pre("default" if sentencepiece else _bpe_pre_tokenizer(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([" ".join(pair) for pair in pairs])
    if sentencepiece:
        # llama.cpp's SentencePiece tokenizer ignores merges and joins the best-scoring pair first, so a
        # token's score is minus the rank of the first merge that makes it.
        rank: dict[str, int] = {}
        for r, pair in enumerate(pairs):
            rank.setdefault("".join(pair), r)
        writer.add_token_scores([-float(rank.get(t, 0)) for t in tokens])
        first = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))[0]
        writer.add_add_space_prefix(first.startswith("\u2581"))

    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    # What the tokenizer adds around a text, read off its behaviour rather than from config flags.
    plain, full = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a")
    writer.add_add_bos_token(len(full) > len(plain) and full[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(full) > len(plain) and full[-1] == tokenizer.eos_token_id)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def _add_architecture(writer: Any, cfg: Any, n_vocab: int) -> None:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))


def export_gguf(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", path: str | Path, *,
                dtype: str = "f16") -> Path:
    """Write `model` (a plain causal LM of a type in `LAYOUTS`) and `tokenizer` as a GGUF file of llama.cpp's
    architecture for it, atomically.

    `dtype`: f16, bf16 or q8_0 for the weight matrices (norms stay f32), or f32 for everything.
    """
    from gguf import GGML_QUANT_VERSION, GGUFWriter, LlamaFileType

    if dtype not in GGUF_DTYPES:
        raise TunesmithError(f"GGUF dtype '{dtype}' is not one of {list(GGUF_DTYPES)}")
    layout = check_exportable(model)
    path = Path(path)
    n_vocab = model.model.embed_tokens.weight.shape[0]
    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
                 "q8_0": LlamaFileType.MOSTLY_Q8_0}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = GGUFWriter(tmp, layout.arch)
        _add_architecture(writer, model.config, n_vocab)
        writer.add_file_type(file_type[dtype])
        writer.add_quantization_version(GGML_QUANT_VERSION)
        _add_tokenizer(writer, tokenizer, n_vocab)
        for name, weight in _model_tensors(model, layout).items():
            data, ggml_type = _encode_tensor(name, weight, dtype)
            writer.add_tensor(name, data, raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a model file is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
