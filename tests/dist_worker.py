"""One process of a data-parallel `fit()` run on the tiny model, for tests/test_distributed.py.

    python tests/dist_worker.py OUT RUN_DIR '{"micro_batch_size": 2, ...}' [--resume] [--crash-at K]
        [--dropout P] [--per-process-normaliser] [--anchor W]

Started with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in the environment (or alone, a world of one).
Writes OUT/rank-N.pt: the trainable weights, the `on_step` records and the FitResult's numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from tunesmith._core import dist
from tunesmith._core.rundir import RunDir
from tunesmith.config import MethodConfig, TrainConfig
from tunesmith.data.packing import shift_labels
from tunesmith.data.render import IGNORE
from tunesmith.models import apply_method
from tunesmith.models.tiny import tiny_model, tiny_tokenizer
from tunesmith.training import fit, loop


def rows(n: int = 12) -> list:
    """Examples of very different lengths: a share normalised by its own tokens would weigh them unequally."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = 4 + 7 * (i % 5) + i
        ids = torch.randint(5, 1000, (length,), generator=g).tolist()
        out.append([shift_labels(ids, [IGNORE] * 2 + ids[2:])])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("run")
    ap.add_argument("train")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--crash-at", type=int, default=0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--per-process-normaliser", action="store_true")
    args = ap.parse_args()
    if args.per_process_normaliser:  # the classic mistake, for the test to catch: each share by its own tokens
        real = dist.sum_host
        dist.sum_host = lambda values: [float(v) for v in values] if len(values) == 2 else real(values)
    dist.join()
    torch.manual_seed(dist.rank() + 1)  # a different draw in every process: fit() must start them alike
    tokenizer = tiny_tokenizer()
    model = apply_method(tiny_model(tokenizer, seed=0),
                         MethodConfig(kind="lora", lora={"r": 4, "alpha": 8, "dropout": args.dropout}))
    cfg = TrainConfig(**{"progress": False, "tensorboard": False, "warmup_ratio": 0.0, "lr": 1e-2,
                         "save_every": None, **json.loads(args.train)})
    records: list = []

    def on_step(step: int, record: dict) -> None:
        records.append(record)
        if step == args.crash_at:
            raise SystemExit(3)

    run = RunDir(Path(args.run)).create()
    data = rows()
    result = fit(model, data, data[:5], cfg, run, pad_id=0, seed=0, resume=args.resume, on_step=on_step)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"weights": weights, "records": records, "steps": result.steps, "val_loss": result.val_loss,
                "tokens": result.tokens, "world": dist.world_size(),
                "micro_batches": [list(loop.window_indices(s, cfg.grad_accum, dist.world_size(), dist.rank()))
                                  for s in range(result.steps)]},
               Path(args.out) / f"rank-{dist.rank()}.pt")
    dist.leave()


if __name__ == "__main__":
    sys.exit(main())
