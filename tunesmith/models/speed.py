"""What makes a training step fast and small: padding-free attention, partial activation checkpointing,
compiled blocks, and the `auto` choice between them.

Padding-free ("varlen") attention: a micro-batch is one flat row of every example end to end, with
cumulative example lengths `cu_seq_lens`; each example attends causally to itself only, no compute goes
to padding and nothing attends across examples. On CUDA it runs PyTorch's variable-length flash kernel
(`torch.nn.attention.varlen`); elsewhere one causal SDPA call per example computes the same function, so
the CPU test suite checks the layout the GPU runs.

The implementation is registered with transformers under `VARLEN` and switched on only around a training
forward (`varlen_attention`), so generation and evaluation keep the model's own attention.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import sys
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from tunesmith._core.found import found_once
from tunesmith._core.precision import compute_dtype
from tunesmith.models.methods import has_virtual_tokens

VARLEN = "tunesmith_varlen"


def _torch_varlen():
    """PyTorch's variable-length flash attention, or None where this build has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn

# What the flash kernels take and do is found once per kernel and device (`found_once`).


def _varlen_kwargs() -> tuple[dict, bool, bool]:
    """How this PyTorch asks varlen_attn for causal attention, and whether it takes a flag for grouped KV
    heads (`enable_gqa`) and a softmax scale."""
    fn = _torch_varlen()

    def find() -> tuple[dict, bool, bool]:
        params = inspect.signature(fn).parameters
        causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        return causal, "enable_gqa" in params, "scale" in params
    return found_once(("kwargs", fn), find)


@functools.lru_cache(maxsize=None)
def _flash_attn_varlen():
    """The flash-attn package's variable-length kernel, or None where it is not installed or does not load
    (a build for another PyTorch fails on import)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # noqa: BLE001 - any failure to load means: not available
        return None
    return flash_attn_varlen_func


def varlen_kernel(device: torch.device) -> str | None:
    """Which flash kernel runs a flat batch's 16-bit attention on `device`: PyTorch's own varlen kernel,
    else the flash-attn package's, else None (one SDPA call per example); each only where it runs on this
    GPU (`_runs`)."""
    if device.type != "cuda":
        return None
    if _torch_varlen() is not None and _runs("flash varlen", device):
        return "flash varlen"
    return "flash-attn varlen" if _flash_attn_varlen() is not None and _runs("flash-attn varlen", device) else None


def _runs(kernel: str, device: torch.device) -> bool:
    """Whether `kernel` computes a small causal case on `device` as `varlen_reference` does: a GPU older than
    the kernel (PyTorch's flash kernel needs an Ampere GPU or newer, so not a T4 or a V100) raises instead, and
    its runs take the per-example path."""
    return _kernel_agrees("runs", kernel, device.type, [0, 3, 5])


def varlen_available(device: torch.device) -> bool:
    return varlen_kernel(device) is not None


def flash_attn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                      max_q: int, max_k: int, scale: float | None, window: int | None = None,
                      softcap: float | None = None) -> torch.Tensor | None:
    """Causal attention of each example over itself through the flash-attn package: q (H, Nq, D), k and v
    (Hkv, Nk, D) with Hkv dividing H (its kernel groups the heads itself). Returns (Nq, H, D), or None where
    this version cannot apply the soft cap asked for."""
    fn = _flash_attn_varlen()
    kw: dict[str, Any] = {}
    if window is not None:
        kw["window_size"] = (window - 1, 0)
    if softcap is not None:
        if not _takes_softcap(fn):
            return None
        kw["softcap"] = softcap
    return fn(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), cu_q, cu_k, max_q, max_k, dropout_p=0.0,
              softmax_scale=scale, causal=True, **kw)


def _takes_softcap(fn: Callable) -> bool:
    """Whether the flash-attn package's kernel soft-caps scores (version 2.6 and later)."""
    return found_once(("softcap", fn), lambda: "softcap" in inspect.signature(fn).parameters)


def sliding_window(config: Any) -> int | None:
    """The sliding window some or all of this model's attention layers apply (each query sees its last
    `window` keys, itself included), or None."""
    config = getattr(config, "get_text_config", lambda: config)()
    window = getattr(config, "sliding_window", None)
    used = "sliding_attention" in (getattr(config, "layer_types", None) or ()) or (
        window is not None and getattr(config, "use_sliding_window", True))
    return window if used else None


def attention_softcap(config: Any) -> float | None:
    """The soft cap this model's attention puts on its scores (`cap · tanh(scores / cap)`, Gemma 2), or None."""
    config = getattr(config, "get_text_config", lambda: config)()
    return getattr(config, "attn_logit_softcapping", None) or None


def _half_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The 16-bit dtype the flash kernel runs this in (the autocast dtype, else x's own), or None for
    float32 without autocast (then the per-example SDPA path runs)."""
    dtype = compute_dtype(x)
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def _repeat_kv(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
            softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """One example's attention, (1, H, n, D) over (1, H, m, D): SDPA under `mask` (None: causal), or as
    transformers' eager attention computes soft-capped scores (softmax in float32) or a learnt sink per head
    (gpt-oss: one more logit in each softmax, whose share of the weight goes to no value)."""
    if softcap is None and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    if mask is None:
        mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
    scores = (q @ k.transpose(-1, -2)) * (q.size(-1) ** -0.5 if scale is None else scale)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
    sink = sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1).to(scores.dtype)
    weights = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return weights.to(v.dtype) @ v


def varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: list[int],
                     scale: float | None, cu_k: list[int] | None = None, window: int | None = None,
                     softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """(H, Nq, D) queries and (Hkv, Nk, D) keys/values, each example causal over itself: one SDPA call per
    example. Returns (Nq, H, D). With `cu_k` an example's keys may outnumber its queries (a prefix it shares
    with another sequence, laid out once among the queries): its queries are its last ones, so query i
    sees keys up to i + (keys - queries), the flash kernels' bottom-right alignment. With a sliding `window`
    each query sees only its last `window` keys, itself included; with `softcap` the scores are soft-capped;
    `sinks` (H,) are attention sinks (transformers' semantics for all three)."""
    groups = q.size(0) // k.size(0)
    cu_k = cu if cu_k is None else cu_k
    outs = []
    for s, e, a, b in zip(cu[:-1], cu[1:], cu_k[:-1], cu_k[1:]):
        kq, kk = e - s, b - a
        mask = None
        if kq != kk or (window is not None and window < kk):
            rows = torch.arange(kk - kq, kk, device=q.device)[:, None]  # each query's own position among the keys
            cols = torch.arange(kk, device=q.device)[None]
            mask = (cols <= rows) & (cols > rows - window) if window is not None else cols <= rows
        outs.append(_attend(q[None, :, s:e], _repeat_kv(k[None, :, a:b], groups, 1),
                            _repeat_kv(v[None, :, a:b], groups, 1), mask, scale, softcap, sinks)[0])
    return torch.cat(outs, dim=1).transpose(0, 1)


def _flash(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
           max_q: int, max_k: int, scaling: float | None, half: torch.dtype, window: int | None = None,
           softcap: float | None = None) -> torch.Tensor | None:
    """(Nq, H, D) from `kernel`, or None where it cannot run this call: PyTorch's kernel has no soft cap, and
    one without a scale argument uses 1/sqrt(head dim) (another scale takes the per-example path), or without
    a window size no sliding window (one no example outgrows needs none)."""
    q, k, v = q.to(half), k.to(half), v.to(half)
    if window is not None and window >= max_k:
        window = None
    if kernel == "flash-attn varlen":
        return flash_attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scaling, window, softcap)
    kw, gqa_flag, takes_scale = _varlen_kwargs()
    if softcap is not None or (window is not None and "window_size" not in kw):
        return None
    if not (takes_scale or scaling is None or math.isclose(scaling, q.size(-1) ** -0.5)):
        return None
    if window is not None:
        kw = {**kw, "window_size": (window - 1, 0)}
    if takes_scale:
        kw = {**kw, "scale": scaling}
    groups = q.size(0) // k.size(0)
    if groups > 1 and gqa_flag:
        kw = {**kw, "enable_gqa": True}
    elif groups > 1 and not _reads_grouped_kv(q.device.type):
        k, v = _repeat_kv(k, groups, 0), _repeat_kv(v, groups, 0)
    return _torch_varlen()(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), cu_q, cu_k, max_q, max_k, **kw)


def _agrees(attend: Callable[..., torch.Tensor | None], device_type: str, heads: int, kv_heads: int, cu: list[int],
            cu_k: list[int]) -> bool:
    """Whether `attend(q, k, v, cu_q, cu_k, max_q, max_k)` (bf16 in, (Nq, H, D) out) computes
    `varlen_reference`'s attention and its gradients on a small random case, without raising."""
    lengths = [max(b - a for a, b in zip(c[:-1], c[1:])) for c in (cu, cu_k)]
    # whatever mode the caller is in (evaluation runs under inference mode, training under autocast)
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device_type, enabled=False):
        try:  # a device this build cannot reach, or a kernel that refuses the case, does not serve it
            g = torch.Generator(device=device_type).manual_seed(0)
            q, k, v = (torch.randn(h, n, 64, generator=g, device=device_type)
                       for h, n in ((heads, cu[-1]), (kv_heads, cu_k[-1]), (kv_heads, cu_k[-1])))
            offsets = [torch.tensor(c, dtype=torch.int32, device=device_type) for c in (cu, cu_k)]
            half = [x.to(torch.bfloat16).requires_grad_() for x in (q, k, v)]
            full = [x.clone().requires_grad_() for x in (q, k, v)]
            out = attend(*half, *offsets, *lengths)
            if out is None:
                return False
            out.float().square().sum().backward()
        except Exception:  # noqa: BLE001 - see above
            return False
        ref = varlen_reference(*full, cu, None, cu_k)
        ref.square().sum().backward()
        pairs = [(out, ref)] + [(a.grad, b.grad) for a, b in zip(half, full)]
        return all(a is not None and a.shape == b.shape and torch.allclose(a.float(), b, atol=5e-2, rtol=5e-2)
                   for a, b in pairs)


def _aligns_bottom_right(kernel: str, device_type: str) -> bool:
    """Whether `kernel`, given more keys than queries for an example, lines its causal mask up with the last
    keys (as `varlen_reference` does)."""
    return _kernel_agrees("bottom right", kernel, device_type, [0, 5, 9])


def _kernel_agrees(check: str, kernel: str, device_type: str, cu_k: list[int]) -> bool:
    """`_agrees` for `kernel` through `_flash`: two examples of 3 and 2 queries over the keys `cu_k` bounds,
    checked once per kernel and device (`check` names what it shows)."""
    fn = _torch_varlen() if kernel == "flash varlen" else _flash_attn_varlen()
    return found_once((check, kernel, fn, device_type), lambda: _agrees(
        lambda *a: _flash(kernel, *a, None, torch.bfloat16), device_type, 2, 2, [0, 3, 5], cu_k))


def _reads_grouped_kv(device_type: str) -> bool:
    """Whether PyTorch's varlen kernel, in a build whose signature has no `enable_gqa`, takes fewer key/value
    heads than query heads all the same (its flash kernel reads each group's key/value head itself, as in
    torch 2.11): then k and v are not copied out to every query head, in forward, in what waits for
    backward, and in the sum that backward makes of the copies. Checked once per kernel and device."""
    fn = _torch_varlen()
    causal, _, _ = _varlen_kwargs()

    def attend(q, k, v, cu_q, cu_k, max_q, max_k):
        return fn(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), cu_q, cu_k, max_q, max_k, **causal)
    return found_once(("grouped kv", fn, device_type), lambda: _agrees(attend, device_type, 4, 2, [0, 3, 8], [0, 3, 8]))


def per_example_parts(model: torch.nn.Module, kernel: str | None) -> str | None:
    """What of a model's attention (`sliding_window`, `attention_softcap`, attention sinks) the flash `kernel`
    cannot apply, so that those layers take the per-example path, or None when it applies all of it."""
    if kernel is None:
        return None
    config = getattr(getattr(model, "get_base_model", lambda: model)(), "config", None)
    window, softcap = sliding_window(config), attention_softcap(config)
    parts = ["attention sinks"] if any(isinstance(getattr(m, "sinks", None), torch.nn.Parameter)
                                       for m in model.modules()) else []
    if softcap is not None and (kernel == "flash varlen" or not _takes_softcap(_flash_attn_varlen())):
        parts.append("soft-capped scores")
    if window is not None and kernel == "flash varlen" and "window_size" not in _varlen_kwargs()[0]:
        parts.append(f"examples longer than the {window}-token sliding window")
    return " and ".join(parts) or None


def check_flash(device: torch.device) -> None:
    """Find, outside any compiled code, what `device`'s flash kernel takes and does (nothing on a CPU)."""
    kernel = varlen_kernel(device)
    if kernel is None:
        return
    if kernel == "flash varlen" and not _varlen_kwargs()[1]:
        _reads_grouped_kv(device.type)
    _aligns_bottom_right(kernel, device.type)


def shares_prefixes(device: torch.device) -> bool:
    """Whether a flat batch whose sequences share a prefix (laid out once, keys gathered per sequence) runs
    at full speed on `device`: always on a CPU (one SDPA call per example either way), on CUDA where the
    flash kernel aligns a longer key range as `varlen_reference` does."""
    kernel = varlen_kernel(device)
    return device.type != "cuda" or (kernel is not None and _aligns_bottom_right(kernel, device.type))


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: Any, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention interface: query (1, H, N, D), key/value (1, Hkv, N, D) -> (1, N, H, D).

    With `kv_index` the keys and values of each example are gathered apart from its queries (a prefix
    that two sequences share sits once in the row): `cu_seq_lens_k` and `max_length_k` describe them. A
    layer's `sliding_window` and `softcap` (Mistral, Qwen2, Gemma 2 and 3) apply as in the model's own
    attention: through the flash kernel where it takes them, else on the per-example path, which also
    applies attention sinks (`s_aux`, gpt-oss)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:  # a forward without the flat layout: plain causal attention
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    assert query.size(0) == 1, "varlen attention takes one flat row per micro-batch"
    assert dropout == 0.0, "varlen attention has no attention dropout"
    # squeeze, not [0]: a view whose backward is a view too, where indexing's backward fills a zero tensor
    # and copies the gradient into it (two more kernels for each of q, k and v in every block)
    q, k, v = query.squeeze(0), key.squeeze(0), value.squeeze(0)
    max_q = int(kwargs["max_length_q"])
    index = kwargs.get("kv_index")
    if index is None:
        cu_k, max_k = cu, max_q
    else:
        k, v = k.index_select(1, index), v.index_select(1, index)
        cu_k, max_k = kwargs["cu_seq_lens_k"], int(kwargs["max_length_k"])
    window, softcap, sinks = kwargs.get("sliding_window"), kwargs.get("softcap"), kwargs.get("s_aux")
    half = _half_dtype(q)
    kernel = varlen_kernel(q.device) if half is not None and sinks is None else None
    out = None
    if kernel is not None and (index is None or _aligns_bottom_right(kernel, q.device.type)):
        out = _flash(kernel, q, k, v, cu, cu_k, max_q, max_k, scaling, half, window, softcap)
    if out is None:  # the boundaries from the host's copy where the batch brought one (no device read)
        def host(name: str, offsets: torch.Tensor) -> list[int]:
            return kwargs[name] if kwargs.get(name) is not None else offsets.tolist()
        out = varlen_reference(q, k, v, host("cu_seq_lens_host", cu), scaling,
                               None if index is None else host("cu_seq_lens_k_host", cu_k), window, softcap, sinks)
    return out[None], None


def _varlen_mask(*args, **kwargs):
    """Mask function for `VARLEN`: a flat training batch carries its example boundaries as `cu_seq_lens`
    and needs no dense mask (None); a padded call (generation, evaluation with an attention mask) gets
    the SDPA mask its fallback needs."""
    if kwargs.get("attention_mask") is None:
        return None
    from transformers.masking_utils import sdpa_mask
    return sdpa_mask(*args, **kwargs)


def register_varlen_attention() -> None:
    """Make `VARLEN` a valid `config._attn_implementation` (idempotent)."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)


def _configs(model: torch.nn.Module) -> list:
    """The model configs its attention reads `_attn_implementation` from: those of the modules around
    the blocks (the model and its wrappers), and those the blocks' own parts (their attention) hold."""
    outside, blocks = _walk(model)
    parts = [m for block in blocks for m in block.children()]
    return [m.config for m in outside + blocks + parts if hasattr(getattr(m, "config", None), "_attn_implementation")]


def in_varlen_mode(model: torch.nn.Module) -> bool:
    return all(c._attn_implementation == VARLEN for c in _configs(model))


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, name: str, replaces: set[str] | None = None) -> Iterator[None]:
    """Run the model's attention through the registered implementation `name` inside the block (only where
    it is one of `replaces`, when given), and its own attention after."""
    configs = [c for c in {id(c): c for c in _configs(model)}.values()
               if replaces is None or c._attn_implementation in replaces]
    before = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = name
    try:
        yield
    finally:
        for c, impl in zip(configs, before):
            c._attn_implementation = impl


def varlen_attention(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Run the model's attention through `VARLEN` inside the block, and its own attention after. The
    backward of a flat batch must run inside it too: checkpointed blocks recompute their forward there."""
    register_varlen_attention()
    param = next(model.parameters(), None)
    if param is not None:
        check_flash(param.device)
    return attention_implementation(model, VARLEN)


def flat_kwargs(batch: dict, device: torch.device) -> dict:
    """The keyword arguments that carry a flat batch's example boundaries down to every attention call.

    `attention_mask` is a 4-D placeholder that varlen attention ignores: transformers passes a 4-D mask
    through as it is, where with no mask it would scan the position ids for packed rows and read the
    answer back (a device sync at every forward on a GPU, which stops the host queueing ahead). The
    boundaries also travel as a host list (`cu_seq_lens_host`) for the per-example fallback."""
    cu = batch["cu_seq_lens"]
    cu_k = batch.get("cu_seq_lens_k", cu)
    kwargs = {"cu_seq_lens_q": cu.to(device, non_blocking=True), "cu_seq_lens_k": cu_k.to(device, non_blocking=True),
              "max_length_q": batch["max_length"], "max_length_k": batch.get("max_length_k", batch["max_length"]),
              "attention_mask": torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)}
    if "kv_index" in batch:  # shared prefixes: each sequence's keys gathered from the row
        kwargs["kv_index"] = batch["kv_index"].to(device, non_blocking=True)
    if cu.device.type == "cpu":
        kwargs["cu_seq_lens_host"] = cu.tolist()
        kwargs["cu_seq_lens_k_host"] = cu_k.tolist()
    return kwargs


def lm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(decoder, output layer) of a causal LM (adapter-wrapped or not) whose logits are exactly
    `output_layer(decoder(...).last_hidden_state)`, or None for one whose head does more (a bias,
    soft-capped or scaled logits, an adapter or a trainable copy on the head, virtual tokens)."""
    if has_virtual_tokens(model):  # its forward adds the virtual tokens; the decoder alone would not
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    config = getattr(base, "config", None)
    if type(head) is not torch.nn.Linear or head.bias is not None or config is None:
        return None
    if getattr(config, "final_logit_softcapping", None) or any(
            getattr(config, name, None) not in (None, 1, 1.0) for name in ("logit_scale", "logits_scaling")):
        return None
    return base.get_decoder(), head


# --- activation checkpointing -------------------------------------------------------------------------

def _walk(model: torch.nn.Module) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """(the modules outside the transformer blocks, the blocks in order), without walking into the blocks:
    a block holds most of a model's modules (each adapted projection is several), and these are looked up
    for every micro-batch."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    outside, blocks, todo, seen = [], [], [model], set()
    while todo:
        m = todo.pop()
        if id(m) in seen:  # a module held in two places counts once, as in `Module.modules()`
            continue
        seen.add(id(m))
        if isinstance(m, GradientCheckpointingLayer):
            blocks.append(m)
            continue
        outside.append(m)
        todo.extend(reversed([c for c in m._modules.values() if c is not None]))
    return outside, blocks


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks, in order (transformers' checkpointable layers)."""
    return _walk(model)[1]


def decoder_mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Each transformer block's MLP (`block.mlp`), in order, for the blocks that have one."""
    return [m for layer in decoder_layers(model) if isinstance(m := getattr(layer, "mlp", None), torch.nn.Module)]


def set_checkpointing(model: torch.nn.Module, n_layers: int, offload: bool = False) -> int:
    """Recompute the activations of the first `n_layers` blocks in backward instead of keeping them;
    the rest keep theirs. With `offload`, what waits for backward waits in pinned host memory: the
    checkpointed blocks' inputs (`offloaded_checkpoint`) and the other blocks' saved activations.
    Returns how many blocks are checkpointed. `set_checkpointing(model, 0)` restores the plain model."""
    from torch.utils.checkpoint import checkpoint

    layers = decoder_layers(model)
    n = max(0, min(n_layers, len(layers)))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < n
        if i < n:
            layer._gradient_checkpointing_func = (offloaded_checkpoint if offload
                                                  else functools.partial(checkpoint, use_reentrant=False))
        _set_offload(layer, offload and i >= n)
    return n


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """`t` copied to (pinned, on CUDA) host memory without waiting for the copy."""
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
    return host.copy_(t, non_blocking=True)


class _Recompute:
    """What a recomputation in backward must reproduce of its forward: autocast and the RNG states (for
    dropout)."""

    def __init__(self, device: torch.device):
        self.device = device
        kind = device.type
        self.autocast = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        devices = [self.device] if self.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
                torch.autocast(self.device.type, dtype=self.autocast[1], enabled=self.autocast[0]):
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
            yield


class _OffloadedBlock(torch.autograd.Function):
    """A block run without keeping anything on the device for backward: its input waits in host memory,
    and backward brings it back, recomputes the block with gradients and backpropagates through it.
    `anchor` (an empty tensor that requires grad) makes the output need a gradient even when the input
    does not (the first block's, from frozen embeddings), so the block's adapters still get theirs."""

    @staticmethod
    def forward(ctx, run, anchor, hidden):  # noqa: D401 - autograd signature
        ctx.run, ctx.recompute, ctx.host = run, _Recompute(hidden.device), _host_copy(hidden)
        ctx.input_grad = hidden.requires_grad
        with torch.no_grad():
            return run(hidden)

    @staticmethod
    def backward(ctx, grad):
        hidden = ctx.host.to(ctx.recompute.device, non_blocking=True).requires_grad_(ctx.input_grad)
        with ctx.recompute.replay():
            out = ctx.run(hidden)
        if out.requires_grad:  # not for a frozen block on a frozen input (a partly frozen model)
            torch.autograd.backward(out, grad)
        return None, None, hidden.grad if ctx.input_grad else None


def offloaded_checkpoint(fn: Callable[..., torch.Tensor], hidden: torch.Tensor, *args: Any) -> torch.Tensor:
    """Activation checkpointing whose one kept tensor, the block's input, waits in host memory: for
    sequences so long that the inputs of every block no longer fit on the GPU. Called as transformers
    calls `_gradient_checkpointing_func(forward, hidden_states, ...)`; the backward runs inside `fit()`,
    in the same attention mode as the forward."""
    anchor = torch.empty(0, device=hidden.device, requires_grad=True)
    return _OffloadedBlock.apply(lambda h: fn(h, *args), anchor, hidden)


class _ChunkedMLP(torch.autograd.Function):
    """A position-wise MLP run `chunk` tokens at a time: forward keeps only its input; backward recomputes
    one chunk at a time with gradients. The (tokens x 4 x intermediate) activations exist for one chunk."""

    @staticmethod
    def forward(ctx, run, chunk, anchor, x):  # noqa: D401 - autograd signature
        ctx.run, ctx.chunk, ctx.recompute = run, chunk, _Recompute(x.device)
        ctx.input_grad = x.requires_grad
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([run(part) for part in x.split(chunk, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        grad_x = torch.empty_like(x) if ctx.input_grad else None
        with ctx.recompute.replay():
            for i, (part, g) in enumerate(zip(x.split(ctx.chunk, dim=-2), grad.split(ctx.chunk, dim=-2))):
                part = part.detach().requires_grad_(ctx.input_grad)
                out = ctx.run(part)
                if out.requires_grad:
                    torch.autograd.backward(out, g)
                if grad_x is not None:
                    grad_x.narrow(-2, i * ctx.chunk, part.size(-2)).copy_(part.grad)
        return None, None, None, grad_x


def _chunked_mlp_forward(self, x):
    chunk, plain, _ = self._tunesmith_mlp_chunk

    if x.size(-2) <= chunk:
        return plain(x)
    if not torch.is_grad_enabled():  # a checkpointed block's first pass: chunked too, nothing kept
        return torch.cat([plain(part) for part in x.split(chunk, dim=-2)], dim=-2)
    anchor = torch.empty(0, device=x.device, requires_grad=True)
    return _ChunkedMLP.apply(plain, chunk, anchor, x)


def set_mlp_chunks(model: torch.nn.Module, tokens: int | None) -> int:
    """Run every block's MLP (`block.mlp`) on at most `tokens` tokens at a time when training on longer
    inputs, recomputing it in backward (one more MLP forward); None restores the plain MLPs. Returns
    how many MLPs are chunked."""
    mlps = decoder_mlps(model)
    for mlp in mlps:
        state = mlp.__dict__.pop("_tunesmith_mlp_chunk", None)
        if state is not None:  # back to the forward it had (its class's, or a kernel library's)
            previous = state[2]
            if previous is None:
                mlp.__dict__.pop("forward", None)
            else:
                mlp.forward = previous
        if tokens:
            previous = mlp.__dict__.get("forward")
            mlp._tunesmith_mlp_chunk = (tokens, mlp.forward, previous)
            mlp.forward = _chunked_mlp_forward.__get__(mlp)
    return len(mlps) if tokens else 0


def _offload_enter(module: torch.nn.Module, args: Any) -> None:
    if module.training and torch.is_grad_enabled():
        module._tunesmith_saved = torch.autograd.graph.save_on_cpu(pin_memory=True)
        module._tunesmith_saved.__enter__()


def _offload_exit(module: torch.nn.Module, args: Any, output: Any) -> None:
    saved = module.__dict__.pop("_tunesmith_saved", None)
    if saved is not None:
        saved.__exit__(None, None, None)


def _set_offload(layer: torch.nn.Module, on: bool) -> None:
    """Keep (or stop keeping) this block's saved activations in pinned host memory between its forward
    and backward, through forward hooks that are removed when switched off."""
    handles = layer.__dict__.pop("_tunesmith_offload", None)
    if handles:
        for h in handles:
            h.remove()
    if on:
        layer._tunesmith_offload = (layer.register_forward_pre_hook(_offload_enter),
                                    layer.register_forward_hook(_offload_exit, always_call=True))


def activation_bytes_per_token(config: Any, dtype_bytes: int = 2, lora: bool = True, mlp_kept: int = 4) -> int:
    """Activation memory one block keeps per token for backward: the norms' inputs and outputs, q, k, v,
    the attention output, the MLP's gate, up, act(gate) and product, and the residuals. LoRA adds the
    rank-r intermediates (small) and keeps the same inputs; full fine-tuning keeps the same set. An MLP
    whose product is recomputed in backward (`fused.fuse_mlps`) keeps gate and up only (`mlp_kept=2`)."""
    d = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    elements = 6 * d + 2 * heads * head_dim + 2 * kv
    return (int(elements * dtype_bytes * (1.1 if lora else 1.0))
            + mlp_bytes_per_token(config, dtype_bytes, lora, kept=mlp_kept))


def mlp_bytes_per_token(config: Any, dtype_bytes: int = 2, lora: bool = True, kept: int = 4) -> int:
    """The MLP's share of `activation_bytes_per_token`: `kept` tensors of the intermediate width (gate, up,
    act(gate) and their product)."""
    f = getattr(config, "intermediate_size", 4 * config.hidden_size)
    return int(kept * f * dtype_bytes * (1.1 if lora else 1.0))


def saved_bytes_per_token(model: torch.nn.Module, flat: bool, tokens: tuple[int, int] = (64, 128)) -> float:
    """What one transformer block keeps for backward per token (the most of any block), measured rather
    than estimated: the storages autograd saves inside each block during forwards of two lengths, each
    storage counted once, the difference over the difference in tokens (what does not grow with the
    length, such as weights a layer saves, drops out). Runs the model as it is set up now (fused layers,
    kernels, `flat`: one flat row through variable-length attention); a checkpointed block or one whose
    activations wait in host memory keeps nothing it is seen saving here."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    vocab = getattr(model, "get_base_model", lambda: model)().config.vocab_size
    per_block = []
    for n in tokens:
        sizes, seen, current = [0] * len(layers), set(), [None]

        def pack(t: torch.Tensor) -> torch.Tensor:
            if current[0] is not None and (key := t.untyped_storage().data_ptr()) not in seen:
                seen.add(key)
                sizes[current[0]] += t.untyped_storage().nbytes()
            return t

        hooks = [h for i, layer in enumerate(layers) for h in (
            layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)),
            layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, None), always_call=True))]
        batch = {"cu_seq_lens": torch.tensor([0, n], dtype=torch.int32), "max_length": n}
        try:
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(input_ids=torch.arange(n, device=device)[None] % vocab,  # no draw: the RNG stays as it was
                      position_ids=torch.arange(n, device=device)[None], use_cache=False,
                      **(flat_kwargs(batch, device) if flat else {}))
        finally:
            for h in hooks:
                h.remove()
        per_block.append(max(sizes))
    return (per_block[1] - per_block[0]) / (tokens[1] - tokens[0])


LONG_MLP_CHUNK = 8192  # tokens an MLP runs at a time in long mode


class CheckpointBudget:
    """Checkpoint only as many blocks as the memory budget needs for a micro-batch of a given size, the
    first blocks first (the rest keep their activations and skip the recomputation).

    Activations are `dtype_bytes` an element: 2 in 16-bit runs (bf16 weights or autocast), 4 in float32.
    Peak ~ weights + trainable state (each trainable weight's gradient and two AdamW moments, in its own
    dtype, or the moments in a byte each with `eight_bit_moments`) + the loss's working memory
    + the kept activations of un-checkpointed blocks + the checkpointed blocks' inputs + one block's
    recomputation.

    Where the MLPs can recompute their product in backward (`fused.fuse_mlps`, counted by `allow_products`),
    that comes first: it saves a block about a fifth of its activations for one elementwise pass, where
    checkpointing a block costs its whole forward again. A micro-batch's plan (`plan_for`) is the fewest
    checkpointed blocks, and with them the fewest of the other blocks recomputing their MLP's product.

    A micro-batch that does not fit even with every block checkpointed runs in long mode: every block
    checkpointed with its input in host memory (`offloaded_checkpoint`) and MLPs `LONG_MLP_CHUNK` tokens
    at a time (`set_mlp_chunks`), which leaves one block's recomputation, its MLP chunked.

    With `offload` (the user's `offload_activations`) whatever waits for backward is in host memory,
    checkpointed or not: the GPU holds one block's activations at a time whatever the count, so no block
    needs recomputing for memory's sake."""

    def __init__(self, model: torch.nn.Module, budget_bytes: float, loss_bytes: float = 0.0,
                 loss_bytes_per_token: float = 0.0, offload: bool = False, dtype_bytes: int = 2,
                 eight_bit_moments: bool = False, moment_share: float = 1.0):
        config = getattr(model, "get_base_model", lambda: model)().config
        self.blocks = len(decoder_layers(model))
        lora = any("lora_" in n for n, _ in model.named_parameters())
        self.estimated = activation_bytes_per_token(config, dtype_bytes, lora=lora)  # the formula's
        self.per_token = self.estimated  # what the plan counts: the formula, or more once measured (`observe`)
        # the same for a block whose MLP recomputes its product, and how many blocks can (`allow_products`)
        self.estimated_lean = activation_bytes_per_token(config, dtype_bytes, lora=lora, mlp_kept=2)
        self.per_token_lean = self.estimated_lean
        self.products = 0
        self.mlp_per_token = mlp_bytes_per_token(config, dtype_bytes, lora=lora)
        self.boundary = config.hidden_size * dtype_bytes
        self.dtype_bytes = dtype_bytes
        self.fixed = (sum(p.numel() * p.element_size() for p in model.parameters())
                      + sum(b.numel() * b.element_size() for b in model.buffers())  # FP8 weights are buffers
                      + sum(p.numel() * (p.element_size()
                                         + moment_share * (2 if eight_bit_moments else 2 * p.element_size()))
                            for p in model.parameters() if p.requires_grad)
                      + loss_bytes)
        self.loss_per_token = loss_bytes_per_token
        self.budget = budget_bytes
        self.offload = offload
        self.scale = 1.0  # on the per-token terms: grows each time a micro-batch runs out of memory
        self.measured: float | None = None  # what a block was measured to keep per token (`observe`)
        self.measured_lean: float | None = None  # the same with its MLP's product recomputed

    def observe(self, measured: float, lean: float | None = None) -> None:
        """A block was measured to keep `measured` bytes per token (`saved_bytes_per_token`) on the path that
        trains, and `lean` with its MLP's product recomputed: the estimate never counts less than that (a
        path that keeps more than the formula, such as PEFT's own LoRA layers, would otherwise be planned
        short)."""
        self.measured = measured
        self.per_token = max(self.estimated, int(math.ceil(measured)))
        if lean is not None:
            self.measured_lean = lean
            self.per_token_lean = max(self.estimated_lean, int(math.ceil(lean)))

    def allow_products(self, blocks: int) -> None:
        """`blocks` blocks can recompute their MLP's product (all or none: a model's MLPs are alike)."""
        self.products = self.blocks if blocks >= self.blocks else 0

    @property
    def lean_saving(self) -> float:
        """Bytes per token a block saves by recomputing its MLP's product."""
        return max(0, self.per_token - self.per_token_lean) if self.products else 0

    def estimate(self, tokens: int, layers: int, long: bool = False, products: int = 0) -> float:
        if long:  # inputs on the host; of the one block recomputed, the MLP's part for one chunk only
            mlp = self.mlp_per_token * (1 - min(1.0, LONG_MLP_CHUNK / max(tokens, 1)))
            per_token = self.per_token - mlp + self.loss_per_token
        elif self.offload:  # everything kept for backward waits on the host; one block works on the GPU
            per_token = self.per_token + self.loss_per_token
        else:
            per_token = ((self.blocks - layers + 1) * self.per_token - products * self.lean_saving
                         + layers * self.boundary + self.loss_per_token)
        return self.fixed + tokens * per_token * self.scale

    def tighten(self, tokens: int) -> bool:
        """After a micro-batch of `tokens` ran out of memory within the estimate: count every token's
        activations a quarter larger from now on, so that it and its like checkpoint more blocks (or run in
        long mode). False when it ran in long mode already: nothing is left to give."""
        if self.long_for(tokens):
            return False
        self.scale *= 1.25
        return True

    def long_for(self, tokens: int) -> bool:
        """Whether a micro-batch of `tokens` needs long mode: it does not fit with every block checkpointed."""
        return self.estimate(tokens, self.blocks) > self.budget

    def plan_for(self, tokens: int) -> tuple[int, int]:
        """(checkpointed blocks, the first ones; blocks recomputing their MLP's product, the last ones of the
        others): the fewest checkpointed blocks whose estimated peak fits the budget, and with them the
        fewest products recomputed (all blocks checkpointed, if nothing fits)."""
        saving = 0.0 if self.offload else tokens * self.lean_saving * self.scale
        for k in range(self.blocks + 1):
            over = self.estimate(tokens, k) - self.budget
            if over <= 0:
                return k, 0
            if saving > 0 and (n := math.ceil(over / saving)) <= self.blocks - k:
                return k, n
        return self.blocks, 0

    def layers_for(self, tokens: int) -> int:
        """The fewest checkpointed blocks whose estimated peak fits the budget (all, if none does)."""
        return self.plan_for(tokens)[0]


def device_budget_bytes(device: torch.device, budget_gib: float | None) -> float:
    """The memory a run may plan for: `budget_gib` when set, else 90% of the device's memory."""
    if budget_gib is not None:
        return budget_gib * 2**30
    if device.type == "cuda":
        return 0.9 * torch.cuda.get_device_properties(device).total_memory
    return math.inf


def compile_blocks(model: torch.nn.Module) -> int:
    """torch.compile each transformer block (one compiled graph reused by every block of a model);
    shapes are marked dynamic so flat batches of varying length do not recompile. Returns the count."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def uncompile_blocks(model: torch.nn.Module) -> None:
    """Undo `compile_blocks` (generation after training runs the eager blocks)."""
    for layer in decoder_layers(model):
        layer._compiled_call_impl = None


# what Liger binds on a module instance (its forward, and how the module prints)
_LIGER_BOUND = ("forward", "extra_repr", "_get_name")


def undoable_patch(base: torch.nn.Module, patch: Callable[[], Any]) -> Callable[[], None]:
    """Run `patch()`, which may rebind names in `base`'s modeling module and methods on its submodules'
    instances, and return a function that puts back every such name and method as it was. Liger's
    patches rebind `apply_rotary_pos_emb`, the norm and MLP classes of the whole transformers module:
    left in place, every later model of that architecture in the process would run Triton kernels, on
    a CPU too. A patch that raises is undone before the error propagates."""
    modeling = sys.modules[type(base).__module__]
    names = dict(vars(modeling))
    bound = [(m, {k: m.__dict__[k] for k in _LIGER_BOUND if k in m.__dict__}) for m in base.modules()]

    def undo() -> None:
        for key in set(vars(modeling)) - set(names):
            delattr(modeling, key)
        for key, value in names.items():
            if vars(modeling).get(key) is not value:
                setattr(modeling, key, value)
        for m, saved in bound:
            for key in _LIGER_BOUND:
                if key in saved:
                    m.__dict__[key] = saved[key]
                else:
                    m.__dict__.pop(key, None)

    try:
        patch()
    except BaseException:
        undo()
        raise
    return undo


def apply_liger(model: torch.nn.Module) -> Callable[[], None] | None:
    """Liger's fused RMSNorm, RoPE and SwiGLU on this model when liger-kernel is installed and the model is
    on CUDA (its cross-entropy is left alone: the chunked loss covers it). Returns the function that takes
    them off again (`undoable_patch`), or None when they were not applied."""
    if not next(model.parameters()).is_cuda:
        return None
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return undoable_patch(base, lambda: _apply_liger_kernel_to_instance(
            model=base, cross_entropy=False, fused_linear_cross_entropy=False))
    except Exception:  # noqa: BLE001 - an architecture liger does not know keeps its own kernels
        return None