"""Correctness gates for the fast path, on the benchmark shapes:

1. step-1 loss: the same init, seed and batch give a loss within 1e-2 relative between plain HF + PEFT
   (padded rows, full logits) and tunesmith's fast path (flat varlen batch, chunked loss, checkpointing);
2. packed == unpacked: each document's summed loss in one flat packed row equals its loss run alone
   (no attention across documents), within bf16 tolerance;
3. gradients: LoRA gradients of the two paths agree (relative norm of the difference).

    python -m benchmarks.gates [--shape llama-1b]
"""
from __future__ import annotations

import argparse
import json

import torch

from benchmarks.arms import CUDA, DEVICE, _peft_lora
from benchmarks.shapes import build_model, token_rows
from tunesmith.data.packing import collate, collate_flat, shift_labels
from tunesmith.models.speed import set_checkpointing, varlen_attention
from tunesmith.training.loop import causal_lm_loss, lm_loss


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-1b" if CUDA else "tiny")
    a = ap.parse_args()
    model = _peft_lora(build_model(a.shape, DEVICE))
    vocab = model.config.vocab_size
    lens = [700, 1300, 90, 1900, 400, 1000] if CUDA else [30, 50, 9, 64]
    examples = [shift_labels(ids, ids) for ids in token_rows(lens, vocab, seed=7)]
    rows = [[e] for e in examples]
    autocast = torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA)

    with autocast:  # plain: padded rows, full logits, the model's own attention
        plain, n_plain = causal_lm_loss(model, collate(rows, 0))
    (plain / n_plain).backward()
    g_plain = _grads(model)
    model.zero_grad(set_to_none=True)

    with varlen_attention(model):  # fast: one flat row, chunked loss, every block checkpointed
        set_checkpointing(model, 10**6)
        with autocast:
            fast, n_fast = lm_loss(chunked=True)(model, collate_flat(rows, 0))
        (fast / n_fast).backward()
        set_checkpointing(model, 0)
        g_fast = _grads(model)
        model.zero_grad(set_to_none=True)
        with torch.no_grad(), autocast:
            alone = [float(lm_loss(chunked=True)(model, collate_flat([r], 0))[0]) for r in rows]
            packed = []
            batch = collate_flat(rows, 0)
            for i in range(len(rows)):  # per-document sums out of the one packed forward
                only = batch["targets"].clone()
                cu = batch["cu_seq_lens"].tolist()
                keep = torch.zeros_like(only, dtype=torch.bool)
                keep[0, cu[i]:cu[i + 1]] = True
                only[~keep] = -100
                packed.append(float(lm_loss(chunked=True)(model, {**batch, "targets": only})[0]))

    rel = abs(float(plain) - float(fast)) / abs(float(plain))
    doc = max(abs(p - q) / abs(q) for p, q in zip(packed, alone))
    grad = float((g_plain - g_fast).norm() / g_plain.norm())
    result = {"shape": a.shape, "device": DEVICE, "plain_loss": float(plain) / n_plain, "fast_loss": float(fast) / n_fast,
              "step1_rel": rel, "step1_ok": rel < 1e-2, "packed_vs_alone_max_rel": doc, "packed_ok": doc < 1e-2,
              "grad_rel": grad, "grad_ok": grad < 5e-2}
    print("RESULT " + json.dumps(result), flush=True)
    if not (result["step1_ok"] and result["packed_ok"] and result["grad_ok"]):
        raise SystemExit("a correctness gate failed")


if __name__ == "__main__":
    main()
