"""How many device operations one training micro-batch queues: `python -m benchmarks.launches [key=value ...]`.

On a GPU each operation is a kernel launch that the host pays for in Python and driver time. With short
micro-batches (chat data) the host can fall behind the GPU, and then fewer launches is more speed. This
counts them on any machine, the same way every time: the blocks and layers of `shape` at a hollow width
(hidden 64, so the count runs in seconds on a CPU), weights in bf16 as a GPU run has them (`dtype=float32`
for the other case), one micro-batch of `bs` examples of `seq` tokens, forward
and backward, once through `fit()`'s fast path (flat rows, chunked loss, fused LoRA layers; the flash
kernel stood in for by one attention call per block, as on a GPU) and once through the plain path (padded
rows, full logits, PEFT's layers). Operators that only make views of a tensor launch nothing and are left
out. On a GPU, Liger's kernels (when installed) further turn each RMSNorm, RoPE and SwiGLU into one
launch; this count has them as the operators PyTorch runs.

Prints, for each path, the forward and backward counts and the most frequent operators.

`python -m benchmarks.launches decode [shape=llama-1b bs=64 prompt=32]` counts one decode step of
generation instead (`count_decode`), with the LoRA layers fused and with PEFT's own.
"""
from __future__ import annotations

import collections
import contextlib
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.shapes import LORA_TARGETS, SHAPES


# operators that allocate or relabel memory without running a kernel (beyond those aten marks as views)
NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "_unsafe_view"}


class CountOps(TorchDispatchMode):
    """Counts the aten operators dispatched inside it, by name, views left out."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in NO_LAUNCH:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _one_call_attention(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False, enable_gqa=False, scale=None):
    """Stands in for the flash varlen kernel (PyTorch's signature): one attention call over the row (the
    count is what matters; the examples' boundaries are ignored)."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         is_causal=True, enable_gqa=enable_gqa, scale=scale)
    return out.squeeze(0).transpose(0, 1)


@contextlib.contextmanager
def _flash_stand_in():
    from tunesmith.models import speed
    saved = speed._torch_varlen, speed.varlen_kernel, speed._half_dtype
    speed._torch_varlen = lambda: _one_call_attention
    speed.varlen_kernel = lambda device: "flash varlen"
    speed._half_dtype = lambda x: x.dtype
    try:
        yield
    finally:
        speed._torch_varlen, speed.varlen_kernel, speed._half_dtype = saved


def hollow_model(shape: str, dtype: torch.dtype = torch.bfloat16):
    """`shape`'s blocks, heads and layers with hidden 64 (heads of 8) and a vocabulary of 1,000, weights in
    `dtype`, LoRA r16 on every linear projection (its adapters in float32, as PEFT keeps them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.config import LoraConfig, MethodConfig
    from tunesmith.models.methods import apply_method

    s = SHAPES[shape]
    heads = 8
    kv = max(1, heads * s["num_key_value_heads"] // s["num_attention_heads"])
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=s["num_hidden_layers"],
                         num_attention_heads=heads, num_key_value_heads=kv, head_dim=8, vocab_size=1000,
                         tie_word_embeddings=s["tie_word_embeddings"], attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    return apply_method(model, MethodConfig(kind="lora", lora=LoraConfig(r=16, alpha=32, dropout=0.0,
                                                                         target_modules=LORA_TARGETS)))


def count(shape: str = "llama-1b", bs: int = 8, seq: int = 64, fast: bool = True,
          dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Operators of one micro-batch's forward and backward on the fast or the plain path, weights in
    `dtype`."""
    from tunesmith.config import TrainConfig
    from tunesmith.data.packing import collate, collate_flat, shift_labels
    from tunesmith.data.render import IGNORE
    from tunesmith.training.loop import lm_loss
    from tunesmith.training.speed import applied, before_forward, plan_speed

    model = hollow_model(shape, dtype).train()
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(bs):
        n = max(4, seq - 3 * i)  # unequal lengths, so padded rows really pad
        ids = torch.randint(5, 1000, (n,), generator=g).tolist()
        rows.append([shift_labels(ids, [IGNORE] * (n // 3) + ids[n // 3:])])
    cfg = (TrainConfig(attention="varlen", loss_chunking="on", checkpointing=0, kernels="on") if fast else
           TrainConfig(attention="padded", loss_chunking="off", checkpointing=0, kernels="off"))
    plan = plan_speed(model, cfg, torch.device("cpu"), language_model=True)
    batch = (collate_flat if fast else collate)(rows, 0)
    loss_fn = lm_loss(chunked=fast)
    with _flash_stand_in() if fast else contextlib.nullcontext(), applied(model, plan):
        before_forward(model, plan, batch["n_tokens"])
        for _ in range(2):  # the second pass is counted: nothing of a first call's setup in it
            model.zero_grad(set_to_none=True)
            with CountOps() as forward:
                total, n = loss_fn(model, batch)
            with CountOps() as backward:
                (total / n).backward()
    return dict(path="fast" if fast else "plain", shape=shape, tokens=batch["n_tokens"],
                forward=sum(forward.ops.values()), backward=sum(backward.ops.values()),
                top_forward=forward.ops.most_common(8), top_backward=backward.ops.most_common(8))


def count_decode(shape: str = "llama-1b", bs: int = 64, prompt: int = 32, kernels: bool = True,
                 dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Operators of one decode step as `generate` captures it in a CUDA graph on a GPU (the forward over the
    static cache, the draw, the stop check and the next step's inputs), for a batch of `bs` prompts of
    `prompt` tokens, with the LoRA layers fused (`kernels`) or PEFT's own. Each operator is a kernel the
    graph replays at every token: the graph removes the host's cost of launching them, not the device's
    cost of running each one, which at batch 64 is a few microseconds for most of them."""
    from tunesmith._core.modes import evaluating
    from tunesmith.models import generate as engine
    from tunesmith.models.fused import fused_for_inference

    model = hollow_model(shape, dtype)
    steps: list[collections.Counter] = []

    def capture(feed, choose, sampler, pool=None):
        def replay() -> None:
            with CountOps() as step:
                choose(feed())
            steps.append(step.ops)
        return replay

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 1000, (prompt,), generator=g).tolist() for _ in range(bs)]
    saved = engine._capture
    engine._capture = capture
    try:
        # no_grad where generate runs inference_mode: the same kernels, but in inference mode a dtype cast
        # (`aten._to_copy`) does not reach a dispatch mode, so it would not be counted
        with evaluating(model), torch.no_grad(), engine._grouped_decode(model), \
                fused_for_inference(model, kernels):
            engine._decode_static(model, prompts, 0, [1000], 4, engine._Sampler(1.0, 1.0, 0, g),
                                  torch.device("cpu"), graph=True)
    finally:
        engine._capture = saved
    ops = steps[-1]  # the steps after the first are the captured ones
    return dict(path="fused LoRA" if kernels else "PEFT LoRA", shape=shape, step=sum(ops.values()),
                top=ops.most_common(8))


def main(argv: list[str]) -> None:
    if argv[:1] == ["decode"]:
        kwargs = dict(a.split("=", 1) for a in argv[1:])
        shape, bs = kwargs.get("shape", "llama-1b"), int(kwargs.get("bs", 64))
        dtype = getattr(torch, kwargs.get("dtype", "bfloat16"))
        for kernels in (True, False):
            r = count_decode(shape, bs, int(kwargs.get("prompt", 32)), kernels, dtype)
            print(f"{r['path']:>10}, {shape} blocks, batch {bs}: {r['step']:,} operators per decode step")
            print("   " + ", ".join(f"{k} {v}" for k, v in r["top"]))
        return
    kwargs = dict(a.split("=", 1) for a in argv)
    shape, bs, seq = kwargs.get("shape", "llama-1b"), int(kwargs.get("bs", 8)), int(kwargs.get("seq", 64))
    dtype = getattr(torch, kwargs.get("dtype", "bfloat16"))
    for fast in (True, False):
        r = count(shape, bs, seq, fast, dtype)
        print(f"{r['path']:>5} path, {shape} blocks, {r['tokens']} tokens: {r['forward']:,} operators forward, "
              f"{r['backward']:,} backward")
        print("   forward:  " + ", ".join(f"{k} {v}" for k, v in r["top_forward"]))
        print("   backward: " + ", ".join(f"{k} {v}" for k, v in r["top_backward"]))


if __name__ == "__main__":
    main(sys.argv[1:])
