"""One process of a data-parallel online-RL run on the tiny model, for tests/test_distributed.py.

    python tests/dist_rl_worker.py OUT RUN_DIR '{"recipe": "grpo", ...}'

A stand-in engine answers each prompt's k-th sample the same way in any process (real sampling draws
from one generator per batch, so it depends on which rows share a batch), so a run of N processes can be
held against one process exactly. Writes OUT/rank-N.pt: the trainable weights and the step records.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tunesmith._core import dist
from tunesmith._core.rundir import RunDir
from tunesmith.config import config_from_dict
from tunesmith.data.prompts import load_prompts
from tunesmith.data.render import end_of_turn_ids
from tunesmith.models import apply_method
from tunesmith.models.generate import Generation
from tunesmith.models.tiny import tiny_model, tiny_tokenizer
from tunesmith.training import online
from tunesmith.training.preference import Reference, frozen_copy
from dist_worker import done

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    out, run_dir, raw = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    dist.join()
    tok = tiny_tokenizer()
    eot = end_of_turn_ids(tok)[0]
    group = raw["rollout"]["samples_per_prompt"]

    def generate(model, tokenizer, prompts, *, seed, **kw):
        answers = []
        for k, p in enumerate(prompts):
            s = k % group  # the sample's place in its group: prompts come whole groups at a time
            ids = [5 + (p[-1] * 7 + s * 13) % 400, 5 + (p[-2] * 3 + s * 29) % 400, 5 + (sum(p) + s) % 400][:2 + s % 2]
            answers.append(Generation(token_ids=ids, text=" ".join(map(str, ids)), finished=True,
                                      logprobs=[0.0] * len(ids), stop_id=eot))
        return answers

    def scorer(items, texts):
        scores = [(sum(map(int, t.split())) % 17) / 17 for t in texts]
        return scores, {"stand-in": scores}

    online.generate = generate
    cfg = config_from_dict({"model": {"name": "tiny"}, "data": {"train": str(ROOT / "examples/data/dates/train.jsonl")},
                            # the stand-in scorer below replaces it
                            "reward": {"sources": [{"kind": "function", "name": str(ROOT / "examples/rewards.py") + ":vowel_fraction"}]}, **raw})
    torch.manual_seed(dist.rank() + 1)  # a different draw in every process: train_online must start them alike
    model = tiny_model(tok, seed=0)
    reference = Reference("copy", frozen_copy(model))
    model = apply_method(model, cfg.method)
    items, _ = load_prompts(cfg.data, tok)
    records: list = []
    online.train_online(model, tok, items[:24], scorer, cfg, RunDir(run_dir).create(), reference=reference,
                        on_step=lambda step, record: records.append(record))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"weights": weights, "records": records}, out / f"rank-{dist.rank()}.pt")
    done()


if __name__ == "__main__":
    main()
