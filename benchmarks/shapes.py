"""Model shapes, synthetic data and the FLOP count every benchmark arm shares.

Throughput does not depend on weight values, so models are random-initialised Llama shapes built in
process; data are random token ids: D0 fixed length, D1 chat-like lognormal lengths (median 400, sigma
1.0, clipped to 16..4096), D2 long (uniform 2048..8192), and preference pairs (`pair_lengths`).
"""
from __future__ import annotations

import math
import platform

import numpy as np

SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, head_dim=64),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, head_dim=128),
    # a CPU-sized shape, for checking that every arm runs
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True, head_dim=16),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_TFLOPS = 989e12  # H100 SXM dense bf16, the MFU denominator of BENCHMARKS.md


def llama_config(shape: str):
    from transformers import LlamaConfig
    return LlamaConfig(**SHAPES[shape], rope_theta=500000.0, max_position_embeddings=262144)


def build_model(shape: str, device: str, attn: str = "sdpa", seed: int = 0):
    """A random-initialised Llama of `shape` in bf16 (float32 on CPU)."""
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(shape)
    config._attn_implementation = attn
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 on a GPU: the 8B shape never exists in float32 (32 GB)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.to(dtype)


def lengths(dataset: str, n: int, seed: int = 1, scale: float = 1.0) -> np.ndarray:
    """D1: lognormal (median 400, sigma 1) clipped to 16..4096; D2: uniform 2048..8192. `scale` shrinks
    them for CPU smoke runs."""
    rng = np.random.default_rng(seed)
    if dataset == "D1":
        raw = np.clip(rng.lognormal(math.log(400 * scale), 1.0, n), 16, 4096 * scale)
    elif dataset == "D2":
        raw = rng.uniform(2048 * scale, 8192 * scale, n)
    else:
        raise ValueError(dataset)
    return np.maximum(raw.astype(int), 2)


def pair_lengths(n: int, seed: int = 3, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prompt, chosen, rejected) lengths of `n` preference pairs: each lognormal with median 256 and
    sigma 0.6, prompts clipped to 32..1024 and answers to 16..1024 (`scale` shrinks them for the CPU)."""
    rng = np.random.default_rng(seed)

    def draw(low: int) -> np.ndarray:
        raw = np.clip(rng.lognormal(math.log(256 * scale), 0.6, n), low * scale, 1024 * scale)
        return np.maximum(raw.astype(int), 2)

    return draw(32), draw(16), draw(16)


def token_rows(lens, vocab: int, seed: int = 2) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, vocab, int(n)).tolist() for n in lens]


def flops_per_token(n_params: int, n_layers: int, hidden: int, lens) -> float:
    """6N + 12 L d (sum l_i^2 / sum l_i): the protocol's training FLOPs per token."""
    lens = np.asarray(lens, dtype=np.float64)
    return 6 * n_params + 12 * n_layers * hidden * float((lens ** 2).sum() / lens.sum())


def versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "trl", "liger-kernel", "tunesmith"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    try:
        import torch
        out["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - reporting only
        out["gpu"] = None
    return out
