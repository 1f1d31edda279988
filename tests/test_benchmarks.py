"""The benchmark arms run (tiny shape, CPU) and report what the tables print."""
import math

import pytest

from benchmarks import arms
from benchmarks.run import table
from benchmarks.shapes import flops_per_token, lengths


def test_tunesmith_arm_reports_a_sane_first_loss_and_the_plan():
    r = arms.ts_train(shape="tiny", dataset="D1", rows=8, bs=4, scale=0.05, prompt_frac=0.3, attention="varlen",
                      loss_chunking="on", checkpointing=1)
    assert r["first_loss"] == pytest.approx(math.log(1000), abs=0.3)  # random init: about ln(vocab)
    assert "varlen" in r["plan"] and "checkpointing: 1 blocks" in r["plan"]
    assert r["real_tok_s"] > 0 and r["loss_tok_s"] < r["real_tok_s"]  # 30% of each row is prompt
    assert r["steps"] == 2
    assert r["act_kib"] > 0 and r["act_kib_formula"] is None  # measured always; the formula is the budget's
    budgeted = arms.ts_train(shape="tiny", dataset="D0", bs=2, seq=64, steps=2, warm=1, budget=1)
    assert budgeted["first_step_s"] > 0 and budgeted["step_s"] > 0
    # a budget plan reports its own measurement beside the formula (a tiny float32 LoRA model keeps less)
    assert 0 < budgeted["act_kib"] < budgeted["act_kib_formula"] and budgeted["act_kib_lean"] is None
    fused = arms.ts_train(shape="tiny", dataset="D0", bs=2, seq=64, steps=1, warm=0, budget=1, kernels="on")
    assert 0 < fused["act_kib_lean"] < fused["act_kib"]  # fused MLPs that recompute their product keep less


def test_hf_arm_and_the_table():
    r = arms.hf_fixed(shape="tiny", bs=2, seq=32, steps=1, warm=1)
    assert r["first_loss"] == pytest.approx(math.log(1000), abs=0.3)
    assert r["first_step_s"] > 0
    md = table([r, {"arm": "x", "error": "boom"}])
    assert md.splitlines()[0].startswith("| arm |") and "boom" in md and "hf_fixed" in md


def test_flops_and_lengths():
    # 6N plus the attention term 12 L d (sum l^2 / sum l): two rows of 2 and 4 tokens give 20/6
    assert flops_per_token(10, 2, 3, [2, 4]) == pytest.approx(60 + 12 * 2 * 3 * 20 / 6)
    d1 = lengths("D1", 2000)
    assert d1.min() >= 16 and d1.max() <= 4096 and 300 < sorted(d1)[1000] < 500


def test_dpo_arms_run_and_tunesmith_starts_at_ln2_on_the_flat_chunked_path():
    ts = arms.ts_dpo(shape="tiny", pairs=16, scale=0.05, attention="varlen", loss_chunking="on")
    assert ts["first_loss"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA starts at the reference
    assert "varlen" in ts["plan"] and "chunked" in ts["plan"] and ts["pairs_s"] > 0
    assert "pairs share their prompt" in ts["plan"]  # on a CPU the shared layout is always served
    pre = arms.ts_dpo(shape="tiny", pairs=16, scale=0.05, reference="precomputed")
    assert pre["first_loss"] == pytest.approx(math.log(2), abs=1e-6) and pre["arm"] == "tunesmith_dpo_precomputed"
    trl = arms.trl_dpo(shape="tiny", pairs=16, scale=0.05)
    assert trl["arm"] == "trl_dpo" and trl["pairs_s"] > 0 and trl["real_tokens"] == ts["real_tokens"]
    for r in (ts, pre, trl):  # two steps of 8 pairs: the first ends inside the timed call, before its end
        assert 0 < r["first_step_s"] < r["seconds"]


def test_trl_sft_arm_times_its_first_step_as_tunesmiths_arm_does():
    r = arms.trl_sft(shape="tiny", rows=24, scale=0.05)
    assert r["arm"] == "trl_sft" and r["real_tokens"] > 0
    assert 0 < r["first_step_s"] < r["seconds"]  # three steps of 8 rows


def test_grpo_arm_splits_the_step_time_and_takes_the_flat_chunked_path():
    r = arms.ts_grpo(shape="tiny", prompts=2, group=2, prompt=8, new=6, steps=2, micro=2, attention="varlen",
                     loss_chunking="on")
    assert "varlen" in r["plan"] and "chunked" in r["plan"]
    assert min(r["gen_s"], r["logprob_s"], r["update_s"]) > 0
    assert r["gen_s"] + r["logprob_s"] + r["update_s"] <= r["step_s"] + 1e-3
    assert r["gen_tok_s"] > 0 and r["update_tok_s"] > 0


def test_profile_records_the_steps_after_the_first_and_sorts_the_time(tmp_path):
    from benchmarks import profile
    path = profile.main(["ts_train", "shape=tiny", "dataset=D0", "bs=2", "seq=32", "steps=2", "warm=1",
                         "--out", str(tmp_path), "--top", "5"])
    text = path.read_text()
    assert path.name == "profile-ts_train.md" and "Recorded 2 steps after the first 1" in text
    assert "| matmul |" in text and "`aten::mm`" in text and '"arm": "tunesmith"' in text
    assert arms.PROFILE is None  # the arm's hooks are off again
    assert profile.category("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert profile.category("flash_fwd_kernel") == "attention"
    assert profile.category("_rms_norm_forward_kernel") == "fused (triton)"
    assert profile.category("void at::native::vectorized_elementwise_kernel<4>") == "elementwise / reduction"
    assert profile.category("multi_tensor_apply_kernel") == "optimizer"


def test_gates_hold_on_the_fast_path_and_fail_when_documents_leak(monkeypatch):
    from benchmarks import gates
    r = gates.gates("tiny")
    assert "padding-free varlen" in r["fast_path"] and "fused kernels: on" in r["fast_path"]
    assert r["step1_ok"] and r["packed_ok"] and r["grad_ok"] and r["fp8_step1_ok"]
    assert 0 < r["fp8_step1_rel"] < 1e-2  # the e4m3 bases change the loss, a little
    real = gates.collate_flat

    def leaky(rows, pad_id):  # one document boundary for the whole flat row: every token sees the ones before
        batch = real(rows, pad_id)
        return {**batch, "cu_seq_lens": batch["cu_seq_lens"][[0, -1]], "max_length": batch["n_tokens"]}

    monkeypatch.setattr(gates, "collate_flat", leaky)
    assert not gates.gates("tiny")["packed_ok"]


def test_a_run_split_over_calls_reuses_finished_arms_and_keeps_its_deadline(tmp_path, monkeypatch):
    """A first call is cut by its deadline; a second call given the first's results.jsonl runs only what did
    not finish there, and its table holds every arm."""
    from benchmarks import run

    arms_ = run.plan_arms(["smoke"], only="ts_")
    assert len(arms_) >= 4 and all(name.startswith("ts_") for _, name, _ in arms_)
    clock, calls = [0.0], []

    def runner(name, kwargs, out, timeout):
        calls.append((name, kwargs, timeout))
        clock[0] += 100.0  # each arm takes 100 s
        return {"arm": name, "seconds": 100.0} if len(calls) != 2 else {"arm": name, "error": "boom"}

    monkeypatch.setattr(run.time, "perf_counter", lambda: clock[0])
    first = tmp_path / "first"
    first.mkdir()
    results = run.run_all(arms_, first, timeout=600, deadline=250, runner=runner)
    assert [t for _, _, t in calls] == [235, 135, 35]  # each arm's timeout ends before the deadline
    assert [bool(r.get("error")) for r in results] == [False, True, False] + [True] * (len(arms_) - 3)
    assert all(r["error"] == "not run: the deadline came first" for r in results[3:])
    assert len((first / "results.jsonl").read_text().splitlines()) == 3

    calls.clear()
    second = tmp_path / "second"
    second.mkdir()
    results = run.run_all(arms_, second, timeout=600, done=run.finished([str(first / "results.jsonl")]),
                          runner=runner)
    assert [(n, k) for n, k, _ in calls] == [(arms_[1][1], arms_[1][2])] + [(n, k) for _, n, k in arms_[3:]]
    assert [r.get("reused", False) for r in results] == [True, False, True] + [False] * (len(arms_) - 3)
    assert [r["suite"] for r in results] == ["smoke"] * len(arms_)
    assert "| arm |" in run.table(results)

    # --resume: the same command again reads its own folder's results
    assert run.earlier([], first, resume=False) == [] and run.earlier([], tmp_path, resume=True) == []
    assert run.earlier([], first, resume=True) == [str(first / "results.jsonl")]
    again = run.run_all(arms_, first, timeout=600, done=run.finished(run.earlier([], first, resume=True)),
                        runner=runner)
    assert [r.get("reused", False) for r in again] == [True, False, True] + [False] * (len(arms_) - 3)


def test_the_targets_suite_holds_every_arm_once_with_each_targets_arm_and_baseline_first():
    """`targets` is the other suites' arms reordered, none lost or repeated, and every target is read (tunesmith's
    arm and the baseline it is held against) before the minutes-long and the explanatory arms start."""
    from benchmarks import run

    keys = [run._key(name, kw) for name, kw in run.SUITES["targets"]]
    others = [run._key(name, kw) for suite in ("fixed", "chat", "gen", "dpo", "maxlen", "rl")
              for name, kw in run.SUITES[suite]]
    assert sorted(keys) == sorted(others)
    names = [name for name, _ in run.SUITES["targets"]]
    first = names[:names.index("ts_maxlen")]
    assert set(first) >= {"ts_train", "ts_generate", "hf_generate", "ts_dpo", "trl_dpo", "trl_sft", "hf_fixed"}
    kwargs = [kw for _, kw in run.SUITES["targets"]][:len(first)]
    assert {"shape": "llama-8b", "dataset": "D0", "bs": 4, "seq": 2048, "budget": 20} in kwargs
    assert {"dataset": "D1", "rows": 600, "bs": 8, "prompt_frac": 0.3, "budget": 16} in kwargs
    assert names[-1] == "ts_train" and run.SUITES["targets"][-1][1].get("compile") == 1


def test_each_arm_records_how_long_its_process_ran(tmp_path, monkeypatch):
    """`arm_s`: the arm's whole process (model build and set-up included), finished or failed, so a later
    call on the same machine can plan which arms its time holds."""
    import subprocess

    from benchmarks import run

    clock = [0.0]

    def fake_run(args, **kw):
        clock[0] += 42.25 if args[3] == "ts_train" else 7.0
        out = 'noise\nRESULT {"arm": "tunesmith", "seconds": 30.0}\n' if args[3] == "ts_train" else ""
        return subprocess.CompletedProcess(args, 0 if out else 1, out, "Traceback:\nValueError: bad\n")

    monkeypatch.setattr(run.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(run.subprocess, "run", fake_run)
    ok = run.run_arm("ts_train", {"bs": 2}, tmp_path, timeout=60)
    died = run.run_arm("hf_fixed", {"bs": 2}, tmp_path, timeout=60)
    assert ok == {"arm": "tunesmith", "seconds": 30.0, "arm_s": 42.2}
    assert died["error"] == "ValueError: bad" and died["arm_s"] == 7.0
    assert "rc=0 42.2s" in (tmp_path / "arms.log").read_text()


def test_an_arm_that_dies_is_recorded_by_its_exception_not_the_hint_after_it():
    from benchmarks.run import error_line
    dynamo = ("Traceback (most recent call last):\n  File \"x.py\", line 3, in <module>\n"
              "torch._dynamo.exc.InternalTorchDynamoError: AssertionError: speculate_subgraph\n\n"
              "from user code:\n   File \"fused.py\", line 60\n\n"
              "Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace (please do this especially if you're ...)\n")
    assert error_line(dynamo) == "torch._dynamo.exc.InternalTorchDynamoError: AssertionError: speculate_subgraph"
    assert error_line("Traceback:\ntorch.OutOfMemoryError: CUDA out of memory.\n") == \
        "torch.OutOfMemoryError: CUDA out of memory."
    assert error_line("Traceback:\nKeyboardInterrupt\n") == "KeyboardInterrupt"
    assert error_line("warning: something\nkilled\n") == "killed"
    assert error_line("") == "no output"


def test_launch_count_sees_the_fused_path_queue_fewer_operators_and_no_views():
    """`benchmarks.launches` counts the operators one micro-batch queues (the launches a GPU would get):
    the same count every time, no view among them, and fewer on the fast path than on the plain one."""
    from benchmarks.launches import count

    fast, again, plain = count("tiny", bs=4, seq=16), count("tiny", bs=4, seq=16), count("tiny", bs=4, seq=16,
                                                                                      fast=False)
    assert (fast["forward"], fast["backward"]) == (again["forward"], again["backward"])
    names = {name for r in (fast, plain) for name, _ in r["top_forward"] + r["top_backward"]}
    assert names and not names & {"view", "t", "transpose", "slice", "select", "expand", "_unsafe_view", "empty"}
    assert fast["forward"] + fast["backward"] < 0.8 * (plain["forward"] + plain["backward"])


def test_maxlen_starts_at_the_given_length_and_begins_no_step_the_time_cannot_hold(monkeypatch):
    """Lengths from `start_len` up; a step's time is foreseen from the last (square of the length), and a
    step that would run past the limit is not begun; out of memory ends the search at the last length that
    trained. A fake clock: a step of T tokens takes (T / 1000)^2 seconds."""
    import torch

    clock = [0.0]
    monkeypatch.setattr(arms.time, "perf_counter", lambda: clock[0])
    tried = []

    def step(T, oom_at=None):
        tried.append(T)
        if T == oom_at:
            raise torch.OutOfMemoryError("out of memory")
        clock[0] += (T / 1000) ** 2

    best, trace = arms._try_lengths(step, [1000, 2000, 4000, 8000, 16000], limit_s=30, start_len=2000)
    # 2000: 4 s; 4000 foreseen 16 s (20 in all, runs); 8000 foreseen 64 s > 10 left: not begun
    assert tried == [2000, 4000] and best == 4000
    assert trace[-1]["T"] == 8000 and trace[-1]["ok"] is None and "64 s foreseen, 10 s left" in trace[-1]["note"]
    tried.clear()
    best, trace = arms._try_lengths(lambda T: step(T, oom_at=4000), [1000, 2000, 4000, 8000], limit_s=1e9)
    assert tried == [1000, 2000, 4000] and best == 2000 and trace[-1] == dict(T=4000, ok=False)


def test_the_calibration_arm_counts_the_measured_activations_and_leaves_the_budget_as_it_was():
    """`act_scale`: the budget counts what a block was measured to keep, times the scale, instead of the
    larger of that and the formula (the plan reports what it counted), and only inside that arm."""
    import re

    from tunesmith.models.speed import CheckpointBudget

    usual = CheckpointBudget.observe
    r = arms.ts_train(shape="tiny", dataset="D0", bs=2, seq=64, steps=2, warm=1, budget=1, act_scale=1.5)
    measured, counted = map(float, re.search(r"activations ([\d.]+) KiB per token per block measured, "
                                             r"([\d.]+) KiB counted", r["plan"]).groups())
    assert counted == pytest.approx(1.5 * measured, abs=0.06) and counted != pytest.approx(r["act_kib_formula"])
    assert CheckpointBudget.observe is usual


def test_decode_count_sees_the_fused_lora_layers_queue_fewer_operators():
    """`benchmarks.launches decode` counts one captured decode step: the same every time, the dtype casts of
    PEFT's float32 adapters on bf16 weights among them, and fewer with the fused LoRA layers."""
    from benchmarks.launches import count_decode

    fused, again, peft = (count_decode("tiny", bs=4, prompt=8), count_decode("tiny", bs=4, prompt=8),
                          count_decode("tiny", bs=4, prompt=8, kernels=False))
    assert fused["step"] == again["step"] < 0.8 * peft["step"]
    assert dict(peft["top"]).get("_to_copy", 0) > dict(fused["top"]).get("_to_copy", 0) > 0


def test_optimiser_arm_times_a_step_of_each_kind():
    from benchmarks.arms import ts_optim

    for impl in ("ours", "eager", "torch"):
        r = ts_optim("tiny", impl=impl, steps=1, warm=1)
        assert r["arm"] == f"optimiser step: {impl}" and r["step_ms"] > 0


def test_sampling_benchmark_times_both_draws_in_turns():
    """`benchmarks.sampling` times the engine's draw and torch.multinomial, a repetition each in turn."""
    from benchmarks.sampling import draws
    times = draws(rows=4, vocab=64, steps=2, reps=3)
    assert sorted(times) == ["draw", "multinomial"] and all(len(t) == 3 and min(t) > 0 for t in times.values())
