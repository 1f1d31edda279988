"""Run benchmark arms side by side, each in its own process, and print and save the table.

    python -m benchmarks.run [SUITE ...] [--out DIR] [--only SUBSTRING] [--timeout S] [--deadline S]
                             [--done FILE ...]

Suites: fixed (1B and 8B fixed length, HF + PEFT with and without Liger, tunesmith), chat (D1 variable
length: TRL SFTTrainer arms and tunesmith), long (D2), dpo (TRL DPOTrainer against tunesmith, 256 pairs,
pairs/s), gen (generation at batch 64), rl (GRPO steps on the 1B shape, their time split into generation,
log-prob passes and update; flat and chunked against padded rows and full logits), maxlen (longest
sequence at batch 1, 8B), full (every weight trained in bfloat16, 1B and 8B), targets (every arm of fixed,
chat, gen, dpo, maxlen and rl: tunesmith's arm for each target and its baseline first), methods (QLoRA
4/8-bit against LoRA on the default model: parameters and memory; runs on a CPU too), smoke (every arm on a
tiny shape, CPU). Results go to DIR/results.jsonl, DIR/results.json (with package versions and GPU) and
DIR/table.md.

A run may be split over several calls on the same machine: `--deadline S` starts no arm after S seconds
and cuts each arm's timeout to what is left, so the table is written in time, and `--done FILE` (an
earlier call's results.jsonl) skips the arms that finished there and puts their results in this table;
`--resume` does so from --out's own results.jsonl, so the same command, run again, goes on where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.shapes import versions

SUITES: dict[str, list[tuple[str, dict]]] = {
    "fixed": [
        ("hf_fixed", dict(shape="llama-1b", bs=8, seq=2048, ckpt=0)),
        ("hf_fixed", dict(shape="llama-1b", bs=8, seq=2048, ckpt=0, liger=1)),
        ("ts_train", dict(shape="llama-1b", dataset="D0", bs=8, seq=2048)),
        ("ts_train", dict(shape="llama-1b", dataset="D0", bs=8, seq=2048, kernels="off")),
        ("hf_fixed", dict(shape="llama-8b", bs=4, seq=2048, ckpt=1, liger=1)),
        ("ts_train", dict(shape="llama-8b", dataset="D0", bs=4, seq=2048, budget=20)),
        ("ts_train", dict(shape="llama-8b", dataset="D0", bs=4, seq=2048, budget=20, fp8=1)),
        ("ts_train", dict(shape="llama-1b", dataset="D0", bs=8, seq=2048, fp8=1)),
        # last: compiling the blocks takes minutes before the first step
        ("ts_train", dict(shape="llama-1b", dataset="D0", bs=8, seq=2048, compile=1)),
    ],
    "chat": [
        ("trl_sft", dict(rows=600)),
        ("trl_sft", dict(rows=600, liger=1)),
        ("trl_sft", dict(rows=600, ckpt=0)),
        ("ts_train", dict(dataset="D1", rows=600, bs=8, prompt_frac=0.3, budget=16)),
        # the budget counting the measured activations (x 1.1) rather than its formula: fewer blocks recomputed,
        # the data to calibrate it down (an out-of-memory retry shows in the plan)
        ("ts_train", dict(dataset="D1", rows=600, bs=8, prompt_frac=0.3, budget=16, act_scale=1.1)),
    ],
    "long": [
        ("ts_train", dict(dataset="D2", rows=96, bs=2, budget=16)),
    ],
    "dpo": [
        ("trl_dpo", dict(pairs=256)),
        ("trl_dpo", dict(pairs=256, ckpt=0)),
        ("ts_dpo", dict(pairs=256, budget=16)),
        ("ts_dpo", dict(pairs=256, budget=16, reference="precomputed")),
        ("ts_dpo", dict(pairs=256, budget=16, shared=0)),
    ],
    "gen": [
        ("hf_generate", dict(batch=64, prompt=128, new=256)),
        ("ts_generate", dict(batch=64, prompt=128, new=256)),
    ],
    "rl": [
        ("ts_grpo", dict(prompts=8, group=8, prompt=128, new=256, steps=3, budget=16)),
        ("ts_grpo", dict(prompts=8, group=8, prompt=128, new=256, steps=3, budget=16, attention="padded",
                         loss_chunking="off")),
    ],
    "maxlen": [
        # one step at the target length first: at 196k tokens a step takes minutes (attention grows with
        # the square of the length), so the ascending steps from 8k would spend the time before reaching it
        ("ts_maxlen", dict(shape="llama-8b", start=196608, limit_s=360)),
    ],
    "full": [
        # every weight trained, in bfloat16 with stochastically rounded AdamW (8 bytes a weight): the 8B
        # shape's 64 GB of weights, gradients and moments fit one 80 GB GPU, every block checkpointed
        ("ts_train", dict(shape="llama-1b", dataset="D0", bs=8, seq=2048, method="full")),
        ("ts_train", dict(shape="llama-8b", dataset="D0", bs=4, seq=2048, method="full")),
        # its optimiser step alone: compiled, eager, and torch's fused AdamW (nearest rounding) as the floor
        ("ts_optim", dict(shape="llama-8b", impl="ours")),
        ("ts_optim", dict(shape="llama-8b", impl="eager")),
        ("ts_optim", dict(shape="llama-8b", impl="torch")),
    ],
    "methods": [
        ("ts_method", dict(kind="lora", dtype="bfloat16")),
        ("ts_method", dict(kind="lora", dtype="float32")),
        ("ts_method", dict(kind="qlora", bits=4, dtype="bfloat16")),
        ("ts_method", dict(kind="qlora", bits=8, dtype="bfloat16")),
        ("ts_method", dict(kind="qlora", bits=4, dtype="bfloat16", optimizer="paged_adamw_8bit")),
    ],
    "smoke": [
        ("hf_fixed", dict(shape="tiny", bs=2, seq=64, steps=2, warm=1)),
        ("ts_train", dict(shape="tiny", dataset="D0", bs=2, seq=64, steps=2, warm=1)),
        ("ts_train", dict(shape="tiny", dataset="D0", bs=2, seq=64, steps=2, warm=1, fp8=1)),
        ("ts_train", dict(shape="tiny", dataset="D1", rows=16, bs=4, prompt_frac=0.3, scale=0.05,
                          attention="varlen", loss_chunking="on", checkpointing=1)),
        ("trl_sft", dict(shape="tiny", rows=16, scale=0.05)),
        ("trl_dpo", dict(shape="tiny", pairs=16, scale=0.05)),
        ("ts_dpo", dict(shape="tiny", pairs=16, scale=0.05, attention="varlen", loss_chunking="on")),
        ("hf_generate", dict(shape="tiny", batch=4, prompt=8, new=8)),
        ("ts_generate", dict(shape="tiny", batch=4, prompt=8, new=8)),
        ("ts_optim", dict(shape="tiny", steps=2, warm=1)),
        ("ts_grpo", dict(shape="tiny", prompts=2, group=2, prompt=8, new=8, steps=2, micro=2, attention="varlen",
                         loss_chunking="on")),
        ("ts_maxlen", dict(shape="tiny", limit_s=5, offload=0)),
    ],
}

# Every arm the performance targets (docs/performance.md) are read from, in order of need: tunesmith's arm for
# each target first, then the baseline it is held against, then the variants that explain the figures. Split
# over calls with `--deadline` and `--resume`, a run that cannot hold every suite covers the targets first.
_TARGET_ORDER = [
    ("chat", 3), ("fixed", 2), ("fixed", 5), ("gen", 1), ("gen", 0), ("dpo", 2),  # tunesmith, one per target
    ("fixed", 1), ("chat", 0), ("chat", 1), ("fixed", 4), ("dpo", 0),  # the baselines they are held against
    ("maxlen", 0),  # minutes: the 8B shape at 196,608 tokens
    ("fixed", 6), ("fixed", 0), ("chat", 2), ("dpo", 1), ("dpo", 3), ("dpo", 4), ("fixed", 3), ("fixed", 7),
    ("chat", 4), ("rl", 0), ("rl", 1),
    ("fixed", 8),  # compiling the blocks takes minutes before the first step
]
SUITES["targets"] = [SUITES[suite][i] for suite, i in _TARGET_ORDER]

COLUMNS = ["arm", "shape", "data", "trainable", "total", "weights_gib", "mem_before_gib", "real_tok_s", "loss_tok_s",
           "gen_tok_s", "pairs_s", "gen_s", "logprob_s", "update_s", "update_tok_s", "mfu", "peak_gib", "reserved_gib",
           "step_s", "step_ms", "gb_s", "seconds", "first_step_s", "arm_s", "max_len", "first_loss",
           "graph_matches_eager", "eager_gen_tok_s", "plan", "error"]


def run_arm(name: str, kwargs: dict, out: Path, timeout: float) -> dict:
    args = [sys.executable, "-m", "benchmarks.arms", name] + [f"{k}={v}" for k, v in kwargs.items()]
    log = out / "arms.log"
    t = time.perf_counter()
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        with log.open("a") as f:
            f.write(f"=== {name} {kwargs}: timeout after {timeout}s\n{(e.stdout or b'')[-3000:]!r}\n")
        return dict(arm=name, args=kwargs, error=f"timeout after {timeout:.0f} s", arm_s=round(timeout, 1))
    took = round(time.perf_counter() - t, 1)  # the whole process, set-up included: what a call has to plan for
    with log.open("a") as f:
        f.write(f"=== {name} {kwargs} rc={proc.returncode} {took}s\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}\n")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]), arm_s=took)
    return dict(arm=name, args=kwargs, error=error_line(proc.stderr)[:300], arm_s=took)


_EXCEPTION = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Exit|Interrupt|Failed)\b(?::|$)")


def error_line(stderr: str) -> str:
    """The line naming the exception an arm died of (its last such line), not the hint some libraries
    print after it (dynamo's "Set TORCHDYNAMO_VERBOSE=1 ..."); the last line where none names one."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()] or ["no output"]
    named = [ln for ln in lines if _EXCEPTION.match(ln)]
    return named[-1] if named else lines[-1]


def table(results: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(r.get(c) is not None for r in results)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("" if v is None else f"{v:,}" if isinstance(v, int) and not isinstance(v, bool)
                         else f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _key(name: str, kwargs: dict) -> str:
    return json.dumps([name, kwargs], sort_keys=True)


def finished(paths: list[str]) -> dict[str, dict]:
    """The arms that finished without an error in earlier results.jsonl files, by (name, settings)."""
    done = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            if line.strip() and not r.get("error") and "name" in r:
                done[_key(r["name"], r["args"])] = r
    return done


def earlier(done: list[str], out: Path, resume: bool) -> list[str]:
    """The results.jsonl files whose finished arms a call reuses: `--done`'s, and --out's own with `--resume`."""
    own = out / "results.jsonl"
    return done + ([str(own)] if resume and own.exists() and str(own) not in done else [])


def plan_arms(suites: list[str], only: str = "") -> list[tuple[str, str, dict]]:
    return [(suite, name, kwargs) for suite in suites for name, kwargs in SUITES[suite]
            if not only or only in f"{name} {kwargs}"]


def run_all(arms: list[tuple[str, str, dict]], out: Path, timeout: float, deadline: float | None = None,
            done: dict[str, dict] | None = None, runner=run_arm) -> list[dict]:
    """Each arm in its own process, in order; results are appended to out/results.jsonl as they come."""
    start, results = time.perf_counter(), []
    for suite, name, kwargs in arms:
        earlier = (done or {}).get(_key(name, kwargs))
        left = None if deadline is None else deadline - (time.perf_counter() - start)
        if earlier is not None:
            r = dict(earlier, reused=True)
        elif left is not None and left < 30:
            r = dict(arm=name, args=kwargs, error="not run: the deadline came first")
        else:
            r = runner(name, kwargs, out, timeout if left is None else min(timeout, left - 15))
            r.update(name=name, args=kwargs)
            with (out / "results.jsonl").open("a") as f:
                f.write(json.dumps({**r, "suite": suite}) + "\n")
        r["suite"] = suite
        results.append(r)
        print(json.dumps(r), flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suites", nargs="*", default=["fixed", "chat", "gen"])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--only", default="", help="run only arms whose name or settings contain this")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per arm")
    ap.add_argument("--deadline", type=float, default=None, help="start no arm after this many seconds")
    ap.add_argument("--done", nargs="*", default=[], help="earlier results.jsonl files: their finished arms are "
                                                          "not run again, and their results join this table")
    ap.add_argument("--resume", action="store_true", help="go on from --out's own results.jsonl: the same command "
                                                               "again runs only what has not finished")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_all(plan_arms(a.suites, a.only), out, a.timeout, a.deadline, finished(earlier(a.done, out, a.resume)))
    meta = {"versions": versions(), "commit": os.environ.get("TUNESMITH_COMMIT"), "suites": a.suites,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    md = table(results)
    (out / "table.md").write_text(md + "\n")
    print(json.dumps(meta))
    print(md)


if __name__ == "__main__":
    main()
