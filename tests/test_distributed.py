"""Data parallel training: several processes (gloo on a CPU) train as one process with their accumulation
combined, write one run directory, and resume exactly. Each test starts real processes
(tests/dist_worker.py), as torchrun would."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tunesmith.training.loop import total_steps, window_indices

WORKER = Path(__file__).with_name("dist_worker.py")
RL_WORKER = Path(__file__).with_name("dist_rl_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, out: Path, run: Path, train: dict, *flags: str, expect: int = 0,
           worker: Path = WORKER) -> list[dict]:
    """Run the worker in `world` processes; returns each process's results (rank order)."""
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(worker), str(out), str(run), json.dumps(train), *flags],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        log = p.communicate(timeout=300)[0]
        assert p.returncode == expect, log[-3000:]
    if expect:
        return []
    return [torch.load(out / f"rank-{r}.pt", weights_only=False) for r in range(world)]


def test_each_step_is_shared_out_over_the_processes():
    """Process r of N trains micro-batches r, r + N, ... of each step's A x N: together one process's
    window of accumulation A x N, with none twice."""
    for world, accum in [(1, 3), (2, 1), (2, 3), (4, 2)]:
        for step in range(3):
            got = sorted(k for r in range(world) for k in window_indices(step, accum, world, r))
            assert got == list(window_indices(step, accum * world)), (world, accum, step)
    assert total_steps(12, _cfg(micro_batch_size=2, grad_accum=1, epochs=1), world=2) == 3


def _cfg(**kw):
    from tunesmith.config import TrainConfig
    return TrainConfig(**kw)


@pytest.mark.parametrize("shard", ["off", "on"])
def test_two_processes_train_as_one_with_twice_the_accumulation(tmp_path, shard):
    """2 processes x accumulation 1 give the losses, gradient norms, tokens, validation loss and weights of 1
    process x accumulation 2, over micro-batches of very different token counts: each process divides its
    share of the loss by the loss tokens of the whole step, counted over both. Every process ends with the
    same weights, though each drew its LoRA initialisation differently; only process 0 writes the run. The
    weight anchor's penalty, which every process computes whole, counts once. With the optimiser state
    sharded, each process updates its half of the weights and broadcasts them: the same weights again."""
    train = {"micro_batch_size": 2, "max_steps": 4, "max_grad_norm": 1.0, "schedule": "cosine", "eval_every": 2,
             "weight_anchor": 50.0}
    one = launch(1, tmp_path / "one", tmp_path / "run-one", {**train, "grad_accum": 2})[0]
    two = launch(2, tmp_path / "two", tmp_path / "run-two", {**train, "grad_accum": 1, "shard_optimizer": shard})
    for key in ("loss", "grad_norm", "lr", "tokens", "loss_tokens"):
        ref = [r[key] for r in one["records"] if "loss" in r]
        for rank in range(2):
            assert [r[key] for r in two[rank]["records"] if "loss" in r] == pytest.approx(ref, rel=1e-5), key
    assert [t["val_loss"] for t in two] == pytest.approx([one["val_loss"]] * 2, rel=1e-5)
    for name, w in one["weights"].items():
        for rank in range(2):
            assert torch.allclose(two[rank]["weights"][name], w, atol=1e-6), (name, rank)
    written = [json.loads(line) for line in (tmp_path / "run-two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in written if "loss" in r] == [1, 2, 3, 4]  # once, not once per process
    assert [r["step"] for r in written if "val_loss" in r] == [2, 4]


def test_a_per_process_normaliser_is_caught(tmp_path):
    """The mistake the previous test guards against: each process dividing by its own loss tokens gives
    the processes' micro-batches equal weight, whatever their lengths, and the run drifts from one process's."""
    train = {"micro_batch_size": 2, "max_steps": 2}
    one = launch(1, tmp_path / "one", tmp_path / "run-one", {**train, "grad_accum": 2})[0]
    two = launch(2, tmp_path / "two", tmp_path / "run-two", {**train, "grad_accum": 1}, "--per-process-normaliser")
    drift = max((two[0]["weights"][n] - w).abs().max().item() for n, w in one["weights"].items())
    assert drift > 1e-4


@pytest.mark.parametrize("shard", ["off", "on", "fsdp"])
def test_a_crashed_data_parallel_run_resumes_exactly(tmp_path, shard):
    """Crash both processes after step 5 (checkpoint at 4), resume: the same losses and weights as an
    uninterrupted run, with LoRA dropout, so each process's own RNG state must come back, and with the
    optimiser sharded, each process's own share of the optimiser state (fully sharded: its shard of every
    moment, and the weights gathered whole into the checkpoint and sharded again on resume). A resume with
    another number of processes is refused, and one that would shard where the checkpoint did not (or not
    where it did)."""
    train = {"micro_batch_size": 2, "grad_accum": 1, "max_steps": 6, "save_every": 2, "schedule": "cosine",
             "warmup_ratio": 0.2, **({"fsdp": True} if shard == "fsdp" else {"shard_optimizer": shard})}
    full = launch(2, tmp_path / "full", tmp_path / "run-full", train, "--dropout", "0.2")
    launch(2, tmp_path / "crash", tmp_path / "run", train, "--dropout", "0.2", "--crash-at", "5", expect=3)
    ckpt = tmp_path / "run" / "checkpoints" / "step-4"
    assert (ckpt / "process-1.pt").exists() and not (ckpt / "process-0.pt").exists()
    own = torch.load(ckpt / "process-1.pt", weights_only=False)["optimizer"]
    main = torch.load(ckpt / "training_state.pt", weights_only=False)["optimizer"]
    n_main, n_all = sum(len(g["params"]) for g in main["param_groups"]), len(full[0]["weights"])
    if shard == "on":  # the processes hold the moments of complementary halves of the LoRA tensors
        n_own = sum(len(g["params"]) for g in own["param_groups"])
        assert n_main + n_own == n_all and n_main == n_own == len(main["state"]) == len(own["state"])
    elif shard == "fsdp":  # each process holds its half of every moment; the checkpoint's weights are whole
        assert len(own["state"]) == len(main["state"]) == n_all
        from safetensors.torch import load_file
        weights = load_file(ckpt / "trainable.safetensors")
        halves = sorted((w.shape[0] // 2, *w.shape[1:]) for w in weights.values())
        for state in (main["state"], own["state"]):
            assert sorted(tuple(m["exp_avg"].shape) for m in state.values()) == halves
    else:
        assert own is None and n_main == n_all
    part = launch(2, tmp_path / "part", tmp_path / "run", train, "--dropout", "0.2", "--resume")
    for rank in range(2):
        assert [r["loss"] for r in part[rank]["records"]] == pytest.approx(
            [r["loss"] for r in full[rank]["records"][4:]], rel=1e-6)
        for name, w in full[rank]["weights"].items():
            assert torch.allclose(part[rank]["weights"][name], w, atol=1e-6), name
    written = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in written if "loss" in r] == list(range(1, 7))
    launch(1, tmp_path / "alone", tmp_path / "run", train, "--dropout", "0.2", "--resume", expect=1)
    other = {**train, "shard_optimizer": "off" if shard == "on" else "on", "fsdp": False}
    launch(2, tmp_path / "other", tmp_path / "run", other, "--dropout", "0.2", "--resume", expect=1)


@pytest.mark.parametrize("method,bf16,speed", [
    ("lora", False, {}), ("full", False, {}), ("lora", True, {}), ("full", True, {}),
    # a block checkpointed with its input offloaded, the others' activations offloaded, MLPs in chunks, flat rows
    ("lora", False, {"checkpointing": 1, "offload_activations": True, "mlp_chunk_tokens": 8, "attention": "varlen"}),
])
def test_fully_sharded_processes_train_as_one(tmp_path, method, bf16, speed):
    """`train.fsdp`: 2 processes, each keeping half of every weight, gradient and moment, give the losses,
    gradient norms, validation loss and weights of 1 process with twice the accumulation: backward sums the
    gradients (FSDP's default would average them), and the chunked loss reads the output layer inside the
    model's forward, where it is gathered. When fit() returns, every process holds the whole model again,
    in the Parameter objects it had, without FSDP's hooks or classes, and computes the same logits. A
    bfloat16 base with float32 adapters shards in mixed dtypes, exactly. A model trained whole in bfloat16
    trains in bfloat16 in one process (AdamW with stochastic rounding) but as float32 shards under fsdp, so
    those two agree to bfloat16's precision only; its weights are bfloat16 again at the end. Checkpointed
    and offloaded blocks, chunked MLPs and flat rows recompute inside FSDP's gathered blocks exactly too."""
    train = {"micro_batch_size": 2, "max_steps": 4, "max_grad_norm": 1.0, "schedule": "cosine", "eval_every": 2,
             **({"precision": "bf16"} if bf16 else {}), **speed}
    flags = ["--method", method, *(["--bf16"] if bf16 else [])]
    one = launch(1, tmp_path / "one", tmp_path / "run-one", {**train, "grad_accum": 2}, *flags)[0]
    two = launch(2, tmp_path / "two", tmp_path / "run-two", {**train, "grad_accum": 1, "fsdp": True}, *flags)
    rel, atol = (3e-2, 0.1) if bf16 and method == "full" else (1e-5, 1e-5)
    for key in ("loss", "grad_norm", "lr", "tokens", "loss_tokens"):
        ref = [r[key] for r in one["records"] if "loss" in r]
        for rank in range(2):
            assert [r[key] for r in two[rank]["records"] if "loss" in r] == pytest.approx(ref, rel=rel), key
    assert [t["val_loss"] for t in two] == pytest.approx([one["val_loss"]] * 2, rel=rel)
    for rank in range(2):
        assert two[rank]["plain"] and two[rank]["dtypes"] == one["dtypes"]
        assert torch.allclose(two[rank]["logits"], one["logits"], atol=atol)
        for name, w in one["weights"].items():
            assert torch.allclose(two[rank]["weights"][name], w, atol=atol), (name, rank)
    events = [json.loads(line) for line in (tmp_path / "run-two" / "events.jsonl").read_text().splitlines()]
    assert [e["fsdp"] for e in events if e["event"] == "data_parallel"] == [True]
    written = [json.loads(line) for line in (tmp_path / "run-two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in written if "loss" in r] == [1, 2, 3, 4]


def tunesmith_in_processes(world: int, *args: str) -> list[str]:
    """`python -m tunesmith ARGS` in `world` processes, as torchrun starts them; each one's output."""
    port, procs = _free_port(), []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "tunesmith", *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * world, logs
    return logs


def test_tunesmith_train_in_two_processes_writes_one_run(tmp_path):
    """`tunesmith train` started as torchrun starts it: process 0 scores before and after, saves final/,
    logs each step once and prints the report; process 1 prints nothing."""
    out = tmp_path / "run"
    logs = tunesmith_in_processes(2, "train", "examples/tiny/sft-lora.yaml", f"output_dir={out}",
                                  "train.progress=false", "train.max_steps=4", "train.save_every=2")
    assert "held-out exact match" in logs[0] and "run directory" in logs[0]
    assert "held-out exact match" not in logs[1] and "loading model" not in logs[1]
    written = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in written if "loss" in r] == [1, 2, 3, 4]
    assert (out / "final" / "adapter_config.json").exists() and (out / "eval" / "after.json").exists()
    assert json.loads((out / "status.json").read_text())["state"] == "succeeded"
    events = [json.loads(line)["event"] for line in (out / "events.jsonl").read_text().splitlines()]
    assert events.count("started") == 1 and events.count("finished") == 1 and "data_parallel" in events
    assert json.loads((out / "checkpoints" / "step-4" / "state.json").read_text())["processes"] == 2


@pytest.mark.parametrize("example", ["dpo-sigmoid", "reward-lora"])
def test_fully_sharded_recipes_train_as_plain_data_parallel(tmp_path, example):
    """DPO (sequence log-probs of chosen and rejected, the chunked output layer) and a reward model (a score
    head outside the blocks) under `train.fsdp` log the losses and validation metrics of the same run
    without it, save final/ and score after training."""
    runs = {}
    for fsdp in (False, True):
        out = tmp_path / f"run-{fsdp}"
        tunesmith_in_processes(2, "train", f"examples/tiny/{example}.yaml", f"output_dir={out}",
                               "train.progress=false", "train.max_steps=4", "train.eval_every=2",
                               f"train.fsdp={str(fsdp).lower()}")
        runs[fsdp] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert json.loads((out / "status.json").read_text())["state"] == "succeeded"
        assert any((out / "final").iterdir())
    for plain, sharded in zip(runs[False], runs[True], strict=True):
        assert plain["step"] == sharded["step"]
        for key, value in plain.items():
            if key in ("loss", "grad_norm") or key.startswith("val_"):
                assert sharded[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, plain["step"])


def test_a_pipeline_in_two_processes(tmp_path):
    """Each stage trains data parallel from the stage before it (process 0 saves it first), with its replay
    rows written once; the processes measure the suite in shares after each stage, and process 0 writes
    it and the forgetting report."""
    out = tmp_path / "pipe"
    logs = tunesmith_in_processes(2, "train", "examples/tiny/pipeline.yaml", f"output_dir={out}")
    assert "forgetting report" in logs[0] and not logs[1].strip()
    for stage in ("01-dates", "02-dates_us"):
        written = [json.loads(line) for line in (out / "stages" / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in written if "loss" in r] == list(range(1, 9)), stage
        assert json.loads((out / "stages" / stage / "checkpoints" / "step-8" / "state.json").read_text())[
            "processes"] == 2
    assert [json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [
        "base", "dates", "dates_us"]
    assert (out / "eval" / "forgetting.md").exists() and (out / "final" / "adapter_config.json").exists()
    assert len((out / "replay" / "02-dates_us.jsonl").read_text().splitlines()) == 107
    # the suite was measured in shares: the base model's equals one process's measurement
    from tunesmith._core.rundir import RunDir
    from tunesmith.config import load_config
    from tunesmith.recipes.pipeline import measure

    cfg = load_config(ROOT / "examples/tiny/pipeline.yaml", [])
    alone = measure(cfg, "tiny", RunDir(tmp_path / "alone").create(), "00-base", lambda message: None)
    shared = json.loads((out / "eval" / "suite-00-base.json").read_text())
    assert shared == pytest.approx(alone, rel=1e-6) and set(alone) == {
        "dates/exact_match", "dates_us/exact_match", "prose/perplexity"}


RL_RUNS = {
    # on-policy GRPO: the update's own forwards give the log-probs; KL to a copied reference in the loss
    "grpo": {"recipe": "grpo", "method": {"kind": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
             "rl": {"kl_coef": 0.1}},
    # PPO: a value head, GAE, two epochs of two minibatches over the scored rollout
    "ppo": {"recipe": "ppo", "method": {"kind": "full"}, "rl": {"minibatches": 2, "epochs": 2}},
}


@pytest.mark.parametrize("kind", sorted(RL_RUNS))
def test_online_rl_in_two_processes_trains_as_one(tmp_path, kind):
    """Online RL over 2 processes: each samples and scores half of a step's prompts, scores half of the
    rollout's micro-batches and trains on half of each minibatch's; every process gets the whole rollout and
    the summed gradients. With an engine that answers each sample alike wherever it runs, the step records
    and weights equal one process's."""
    raw = {**RL_RUNS[kind], "rollout": {"prompts_per_step": 3, "samples_per_prompt": 2, "max_new_tokens": 4},
           "train": {"max_steps": 3, "micro_batch_size": 2, "lr": 1e-3, "progress": False, "tensorboard": False,
                     "save_every": None}}
    one = launch(1, tmp_path / "one", tmp_path / "run-one", raw, worker=RL_WORKER)[0]
    two = launch(2, tmp_path / "two", tmp_path / "run-two", raw, worker=RL_WORKER)
    keys = ("loss", "reward", "kl", "entropy", "grad_norm", "pg_loss", "approx_kl", "value_loss")
    for rank in range(2):
        for key in keys:
            if key in one["records"][0]:
                assert [r[key] for r in two[rank]["records"]] == pytest.approx(
                    [r[key] for r in one["records"]], rel=1e-4, abs=1e-6), (key, rank)
        for name, w in one["weights"].items():
            assert torch.allclose(two[rank]["weights"][name], w, atol=1e-5), (name, rank)
    written = [json.loads(line) for line in (tmp_path / "run-two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in written] == [1, 2, 3]


@pytest.mark.parametrize("settings", [{}, {"samples": 3, "temperature": 1.0}], ids=["greedy", "sampled"])
def test_held_out_scoring_is_shared_out(tmp_path, settings):
    """Before/after scoring by generation in 2 processes: each answers its share of the prompts and both
    get every answer in order. Greedy answers and every metric equal one process's; sampled ones come
    from other draws, but each prompt keeps its 3 samples in order, and the metrics are computed over all."""
    one = launch(1, tmp_path / "one", tmp_path / "-", settings, "--score")[0]
    two = launch(2, tmp_path / "two", tmp_path / "-", settings, "--score")
    assert two[0]["records"] == two[1]["records"] and len(two[0]["records"]) == 11 * settings.get("samples", 1)
    fields = ("file", "line", "prompt", "reference") + (("sample",) if settings else ())
    assert [[r[k] for k in fields] for r in two[0]["records"]] == [[r[k] for k in fields] for r in one["records"]]
    if not settings:
        assert two[0]["records"] == one["records"]
        assert {k: v for k, v in two[0]["metrics"].items() if k != "seconds"} == {
            k: v for k, v in one["metrics"].items() if k != "seconds"}
    assert two[0]["metrics"]["n"] == 11


def test_reward_and_classifier_scoring_is_shared_out(tmp_path):
    """A reward model's pair scores and a classifier's classes, before and after training: in 2 processes
    each scores its share of the pairs' groups (or rows), and every process gets all of them, in order,
    equal to one process's."""
    one = launch(1, tmp_path / "one", tmp_path / "-", {}, "--judge")[0]
    two = launch(2, tmp_path / "two", tmp_path / "-", {}, "--judge")
    assert one["chosen"].numel() == one["pairs"] == 24 and len(one["classes"]) == 21
    for rank in range(2):
        torch.testing.assert_close(two[rank]["chosen"], one["chosen"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(two[rank]["rejected"], one["rejected"], rtol=1e-5, atol=1e-5)
        assert two[rank]["classes"] == one["classes"]


def test_fsdp_shares_of_uneven_sizes_take_whole_values_and_keep_their_moments(tmp_path):
    """Under train.fsdp a resume writes each checkpointed whole weight into the process's share of it, and
    gives each process its own saved share of the optimiser's moments back, as sharded tensors: so with
    shares of uneven sizes (3 rows over 2 processes: 2 + 1)."""
    two = launch(2, tmp_path / "two", tmp_path / "-", {}, "--uneven")
    assert [t["rows"] for t in two] == [[2, 2, 4, 4], [1, 1, 3, 3]]  # weights and biases of 3 and 7 rows
    for t in two:
        assert t["saved"] == ["Tensor"] * 4  # saved as plain shares
        for name, w in t["whole"].items():
            assert torch.equal(t["loaded"][name], w), name
        for before, after in t["moments"]:
            assert torch.equal(before, after)
