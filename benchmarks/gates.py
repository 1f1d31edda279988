"""Correctness gates for the fast path, on the benchmark shapes:

1. step-1 loss: the same init, seed and batch give a loss within 1e-2 relative between plain HF + PEFT
   (padded rows, full logits) and the fast path `fit()` runs (`training.speed.applied`: flat varlen
   batch, chunked loss, every block checkpointed, fused LoRA layers and Liger's kernels when installed);
2. packed == unpacked: each document's summed loss in one flat packed row equals its loss run alone
   (no attention across documents) within 1e-3 relative: bf16 noise passes, a leak does not;
3. gradients: LoRA gradients of the two paths agree (relative norm of the difference);
4. FP8 bases (`method.lora.fp8_base`, where FP8 matmuls run: a CPU, or a GPU of capability 8.9+): the
   fast path over e4m3 base weights gives a step-1 loss within 1e-2 relative of the plain path.

    python -m benchmarks.gates [--shape llama-1b]
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

from benchmarks.arms import CUDA, DEVICE, _peft_lora
from benchmarks.shapes import build_model, token_rows
from tunesmith.config import TrainConfig
from tunesmith.data.packing import collate, collate_flat, shift_labels
from tunesmith.models.fp8 import to_fp8_bases
from tunesmith.training.loop import causal_lm_loss, lm_loss
from tunesmith.training.speed import SpeedPlan, applied, plan_speed

# packed: bf16 kernels over a different layout differ by ~1e-4 (6.1e-5 on an H100); a document seeing the
# one before it moves the tiny model's loss by ~4e-3
TOLERANCE = {"step1": 1e-2, "packed": 1e-3, "grad": 5e-2, "fp8_step1": 1e-2}


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])


def _fast_plan(model) -> SpeedPlan:
    """The plan fit() runs with every fast-path setting on (what `auto` picks on a GPU, all blocks
    checkpointed)."""
    cfg = TrainConfig(attention="varlen", loss_chunking="on", checkpointing="all", kernels="on",
                      precision="bf16" if CUDA else "fp32", progress=False, tensorboard=False)
    return plan_speed(model, cfg, torch.device(DEVICE), language_model=True)


def fp8_runs_here() -> bool:
    return not CUDA or torch.cuda.get_device_capability() >= (8, 9)


def gates(shape: str) -> dict:
    """Every gate's measured value and verdict."""
    model = _peft_lora(build_model(shape, DEVICE))
    vocab = model.config.vocab_size
    lens = [700, 1300, 90, 1900, 400, 1000] if CUDA else [30, 50, 9, 64]
    examples = [shift_labels(ids, ids) for ids in token_rows(lens, vocab, seed=7)]
    rows = [[e] for e in examples]
    autocast = torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA)
    chunked = lm_loss(chunked=True)

    with autocast:  # plain: padded rows, full logits, the model's own attention, PEFT's layers
        plain, n_plain = causal_lm_loss(model, collate(rows, 0))
    (plain / n_plain).backward()
    g_plain = _grads(model)
    model.zero_grad(set_to_none=True)

    plan = _fast_plan(model)
    with applied(model, plan):
        with autocast:
            fast, n_fast = chunked(model, collate_flat(rows, 0))
        (fast / n_fast).backward()
        g_fast = _grads(model)
        model.zero_grad(set_to_none=True)
        with torch.no_grad(), autocast:
            alone = [float(chunked(model, collate_flat([r], 0))[0]) for r in rows]
            packed = []
            batch = collate_flat(rows, 0)
            cu = [0] + list(itertools.accumulate(len(e) for e in examples))  # where each document sits
            for i in range(len(rows)):  # per-document sums out of the one packed forward
                only = torch.full_like(batch["targets"], -100)
                only[0, cu[i]:cu[i + 1]] = batch["targets"][0, cu[i]:cu[i + 1]]
                packed.append(float(chunked(model, {**batch, "targets": only})[0]))

    plain, fast = float(plain.detach()), float(fast.detach())
    result = {"shape": shape, "device": DEVICE, "fast_path": plan.describe(), "plain_loss": plain / n_plain,
              "fast_loss": fast / n_fast, "step1_rel": abs(plain - fast) / abs(plain),
              "packed_rel": max(abs(p - q) / abs(q) for p, q in zip(packed, alone)),
              "grad_rel": float((g_plain - g_fast).norm() / g_plain.norm())}
    if fp8_runs_here():
        to_fp8_bases(model)
        with applied(model, _fast_plan(model)), torch.no_grad(), autocast:
            fp8, n_fp8 = chunked(model, collate_flat(rows, 0))
        result.update(fp8_loss=float(fp8) / n_fp8, fp8_step1_rel=abs(plain - float(fp8)) / abs(plain))
    for gate, limit in TOLERANCE.items():
        if f"{gate}_rel" in result:
            result[f"{gate}_ok"] = result[f"{gate}_rel"] < limit
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-1b" if CUDA else "tiny")
    result = gates(ap.parse_args(argv).shape)
    print("RESULT " + json.dumps(result), flush=True)
    if not all(v for k, v in result.items() if k.endswith("_ok")):
        raise SystemExit("a correctness gate failed")
    return result


if __name__ == "__main__":
    main()
