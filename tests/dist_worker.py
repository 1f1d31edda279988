"""One process of a data-parallel `fit()` run on the tiny model, for tests/test_distributed.py.

    python tests/dist_worker.py OUT RUN_DIR '{"micro_batch_size": 2, ...}' [--resume] [--crash-at K]
        [--dropout P] [--per-process-normaliser]
    python tests/dist_worker.py OUT - '{"samples": 1, ...}' --score    (score_items over the processes)
    python tests/dist_worker.py OUT - '{}' --judge      (a reward model's pair scores, a classifier's classes)
    python tests/dist_worker.py OUT - '{}' --uneven     (fsdp's whole values into shards of uneven sizes)

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
    ap.add_argument("--method", default="lora")
    ap.add_argument("--bf16", action="store_true", help="the model's weights in bfloat16")
    ap.add_argument("--per-process-normaliser", action="store_true")
    ap.add_argument("--score", action="store_true")
    ap.add_argument("--judge", action="store_true")
    ap.add_argument("--uneven", action="store_true")
    args = ap.parse_args()
    if args.score:
        return score(Path(args.out), json.loads(args.train))
    if args.judge:
        return judge(Path(args.out))
    if args.uneven:
        return uneven(Path(args.out))
    if args.per_process_normaliser:  # the classic mistake, for the test to catch: each share by its own tokens
        real = dist.sum_host
        dist.sum_host = lambda values: [float(v) for v in values] if len(values) == 2 else real(values)
    dist.join()
    torch.manual_seed(dist.rank() + 1)  # a different draw in every process: fit() must start them alike
    tokenizer = tiny_tokenizer()
    method = {"kind": args.method, **({"lora": {"r": 4, "alpha": 8, "dropout": args.dropout}}
                                      if args.method == "lora" else {})}
    base = tiny_model(tokenizer, seed=0)
    model = apply_method(base.to(torch.bfloat16) if args.bf16 else base, MethodConfig(**method))
    before = {n: (type(m).__name__, len(m._forward_hooks) + len(m._forward_pre_hooks))
              for n, m in model.named_modules()}
    params = [id(p) for p in model.parameters()]
    cfg = TrainConfig(**{"progress": False, "tensorboard": False, "warmup_ratio": 0.0, "lr": 1e-2,
                         "save_every": None, **json.loads(args.train)})
    records: list = []

    def on_step(step: int, record: dict) -> None:
        records.append(record)
        if step == args.crash_at:  # as abruptly as a killed process: nothing after this step runs
            sys.stdout.flush()
            os._exit(3)

    run = RunDir(Path(args.run)).create()
    data = rows()
    result = fit(model, data, data[:5], cfg, run, pad_id=0, seed=0, resume=args.resume, on_step=on_step)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    after = {n: (type(m).__name__, len(m._forward_hooks) + len(m._forward_pre_hooks))
             for n, m in model.named_modules()}
    # the model as it was: its modules' classes and hooks, its very Parameter objects, no FSDP shards
    plain = after == before and [id(p) for p in model.parameters()] == params and all(
        type(p) is torch.nn.Parameter for p in model.parameters())
    torch.save({"weights": weights, "records": records, "steps": result.steps, "val_loss": result.val_loss,
                "tokens": result.tokens, "world": dist.world_size(), "plain": plain,
                "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                "logits": model(torch.arange(5, 25)[None]).logits.detach(),
                "micro_batches": [list(loop.window_indices(s, cfg.grad_accum, dist.world_size(), dist.rank()))
                                  for s in range(result.steps)]},
               Path(args.out) / f"rank-{dist.rank()}.pt")
    done()


def score(out: Path, settings: dict) -> None:
    """The tiny model's answers to 11 held-out date prompts, generated by the processes in shares."""
    from tunesmith.eval import load_eval_items, score_items

    dist.join()
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, seed=0).eval()
    items = load_eval_items(Path(__file__).resolve().parents[1] / "examples/data/dates/test.jsonl", limit=11)
    result = score_items(model, tokenizer, items, max_new_tokens=6, batch_size=4, shared=True, **settings)
    torch.save({"metrics": result.metrics, "records": result.records}, out / f"rank-{dist.rank()}.pt")
    done()


def judge(out: Path) -> None:
    """A tiny reward model's scores of the date preference pairs, and a tiny classifier's classes of the
    topic rows, each shared out over the processes."""
    from tunesmith.config import load_config
    from tunesmith.data import load_preference_data
    from tunesmith.data.classification import load_classification_data
    from tunesmith.eval.classification import predict
    from tunesmith.eval.preference import score_pairs
    from tunesmith.models.reward import to_reward_model, to_sequence_classifier

    dist.join()
    root = Path(__file__).resolve().parents[1]
    tokenizer = tiny_tokenizer()
    pairs = load_preference_data(load_config(root / "examples/tiny/reward-lora.yaml", []).data, tokenizer, 0)
    flat = [pair for group in pairs.validation[:24] for pair in group]
    sizes = [1, 3, 2] * 4  # groups of several pairs (as K-way rankings make), shared out whole
    groups = [flat[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(len(sizes))]
    rows = load_classification_data(load_config(root / "examples/tiny/classify.yaml", []).data, tokenizer, 0)
    torch.manual_seed(0)  # the heads' initialisation, as the recipes seed it in every process
    chosen, rejected = score_pairs(to_reward_model(tiny_model(tokenizer, seed=0)), groups, 0, batch_size=4,
                                   shared=True)
    torch.manual_seed(0)
    classes = predict(to_sequence_classifier(tiny_model(tokenizer, seed=0), rows.labels), rows.validation[:21], 0,
                      batch_size=4, shared=True)
    torch.save({"chosen": chosen, "rejected": rejected, "classes": classes,
                "pairs": sum(len(g) for g in groups)}, out / f"rank-{dist.rank()}.pt")
    done()


def uneven(out: Path) -> None:
    """Weights of 3 and 7 rows sharded over 2 processes (2 + 1 and 4 + 3 rows): a checkpoint's whole values go
    into each process's share, and an optimiser's per-process state saved and loaded keeps each moment."""
    from torch.distributed.fsdp import fully_shard

    from tunesmith.training import fsdp

    dist.join()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 7))
    whole = {n: torch.randn(p.shape) for n, p in model.named_parameters()}
    fully_shard(model)
    for n, p in model.named_parameters():
        fsdp.copy_whole_(p, whole[n])
    loaded = {n: fsdp.whole(p.detach()) for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 5)).sum().backward()
    optimizer.step()
    saved = fsdp.local_state(optimizer.state_dict())
    again = torch.optim.AdamW(model.parameters(), lr=0.1)
    fsdp.load_optimizer_state(again, saved)
    moments = [(optimizer.state[p][k].full_tensor(), again.state[p][k].full_tensor())
               for p in model.parameters() for k in ("exp_avg", "exp_avg_sq")]
    torch.save({"whole": whole, "loaded": loaded,
                "rows": [p.to_local().shape[0] for p in model.parameters()], "moments": moments,
                "saved": [type(v["exp_avg"]).__name__ for v in saved["state"].values()]},
               out / f"rank-{dist.rank()}.pt")
    done()


def done() -> None:
    """Leave the group once every process has written its results, and exit without the interpreter's
    teardown: gloo's threads have been seen (rarely, on a loaded machine) to abort the process there."""
    dist.barrier()
    dist.leave()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
