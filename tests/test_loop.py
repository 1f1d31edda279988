"""The training loop: token-normalised accumulation, schedules, checkpoints and exact resume."""
import json
import math

import pytest
import torch

from tunesmith._core.errors import TunesmithError
from tunesmith._core.rundir import RunDir, write_jsonl_atomic
from tunesmith.config import MethodConfig, TrainConfig
from tunesmith.data.packing import Example, collate, shift_labels
from tunesmith.data.render import IGNORE
from tunesmith.losses.cross_entropy import token_cross_entropy
from tunesmith.training import fit, list_checkpoints, micro_batch
from tunesmith.training.loop import accumulate_gradients, causal_lm_loss
from tunesmith.training.optim import lr_factor


def rows(n=8, seed=0):
    """Examples of very different lengths, so per-micro-batch averaging would weigh tokens unequally."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 4 + 5 * (i % 4) + i
        ids = torch.randint(5, 1000, (length,), generator=g).tolist()
        out.append([shift_labels(ids, [IGNORE] * 2 + ids[2:])])
    return out


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def quiet(**kw):
    base = dict(progress=False, tensorboard=False, warmup_ratio=0.0, schedule="constant", lr=1e-2,
                max_grad_norm=None, save_every=None)
    return TrainConfig(**{**base, **kw})


def test_cross_entropy_matches_hand_computation():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    s, n = token_cross_entropy(logits, torch.tensor([[0, IGNORE]]))
    assert n == 1 and s.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 2)))


def test_cross_entropy_counts_tokens_where_the_targets_are():
    """Host targets with device logits (a stand-in device here: meta, which has no values to read): the
    count comes from the host, so training never waits on the device for it."""
    logits = torch.empty(2, 3, 5, device="meta")
    s, n = token_cross_entropy(logits, torch.tensor([[1, IGNORE, 2], [IGNORE, IGNORE, 4]]))
    assert n == 3 and s.device.type == "meta"


def test_accumulation_is_normalised_by_the_window_token_count(tokenizer):
    from tunesmith.models.tiny import tiny_model

    data = rows()
    one = tiny_model(tokenizer, seed=0)
    accumulate_gradients(one, [collate(data, 0)], causal_lm_loss)  # batch 8 x accumulation 1
    eight = tiny_model(tokenizer, seed=0)
    accumulate_gradients(eight, [collate([r], 0) for r in data], causal_lm_loss)  # batch 1 x accumulation 8
    assert torch.allclose(grads(one), grads(eight), atol=1e-6, rtol=1e-4)

    # The classic mistake, a mean per micro-batch averaged over the window, gives other gradients.
    naive = tiny_model(tokenizer, seed=0)
    for r in data:
        b = collate([r], 0)
        s, n = causal_lm_loss(naive, b)
        (s / n / len(data)).backward()
    assert not torch.allclose(grads(one), grads(naive), atol=1e-6, rtol=1e-4)


def test_fit_batch8_accum1_equals_batch1_accum8(tokenizer, tmp_path):
    from tunesmith.models.tiny import tiny_model

    losses = []
    params = []
    for mbs, ga in ((8, 1), (1, 8)):
        model = tiny_model(tokenizer, seed=0)
        run = RunDir(tmp_path / f"{mbs}x{ga}").create()
        fit(model, rows(), [], quiet(micro_batch_size=mbs, grad_accum=ga, max_steps=3), run, pad_id=0, seed=0)
        losses.append([r["loss"] for r in run.read_metrics()])
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # Adam divides by sqrt(v): parameters whose gradient is ~0 amplify float rounding, hence 5e-4 (lr is 1e-2).
    assert torch.allclose(params[0], params[1], atol=5e-4)


@pytest.mark.parametrize("kind, step, expect", [
    ("linear", 0, 0.5), ("linear", 1, 1.0), ("linear", 7, 0.5), ("linear", 11, 1 / 10),
    ("cosine", 1, 1.0), ("cosine", 7, 0.5), ("constant", 9, 1.0),
])
def test_schedules_with_warmup(kind, step, expect):
    # 12 steps, 2 warm-up steps: warm-up 1/2, 2/2, then decay over the remaining 10.
    assert lr_factor(step, 12, 2, kind) == pytest.approx(expect)


def test_data_order_is_a_function_of_seed_and_epoch():
    data = [[Example((i,), (IGNORE,))] for i in range(10)]
    first = [micro_batch(data, k, 3, seed=1) for k in range(4)]  # one epoch = 4 micro-batches
    assert sorted(e[0].input_ids[0] for b in first for e in b) == list(range(10))
    assert micro_batch(data, 5, 3, seed=1) == micro_batch(data, 5, 3, seed=1)
    assert micro_batch(data, 4, 3, seed=1) != first[0]  # the next epoch is reshuffled
    assert micro_batch(data, 0, 3, seed=2) != first[0]


def test_loss_falls_when_overfitting(tokenizer, tmp_path):
    from tunesmith.models.tiny import tiny_model

    run = RunDir(tmp_path / "r").create()
    fit(tiny_model(tokenizer, seed=0), rows(4), [], quiet(micro_batch_size=4, max_steps=30, lr=3e-3), run,
        pad_id=0, seed=0)
    losses = [r["loss"] for r in run.read_metrics()]
    assert losses[-1] < 0.5 * losses[0]


def lora_model(tokenizer):
    from tunesmith.models import apply_method
    from tunesmith.models.tiny import tiny_model

    torch.manual_seed(0)
    return apply_method(tiny_model(tokenizer, seed=0),
                        MethodConfig(kind="lora", lora={"r": 4, "alpha": 8, "dropout": 0.1}))


class Crash(Exception):
    pass


@pytest.mark.parametrize("late", [False, True], ids=["read-at-once", "read-a-step-late"])
def test_resume_after_a_crash_matches_an_uninterrupted_run(tokenizer, tmp_path, monkeypatch, late):
    """Same losses, learning rates and weights, with LoRA dropout so the RNG state must be restored too; also
    when steps are read a step late (as on a GPU), where the crash comes while the next step has already run."""
    from tunesmith.training import loop
    monkeypatch.setattr(loop, "reads_late", lambda device: late)
    cfg = quiet(micro_batch_size=2, grad_accum=2, max_steps=10, save_every=3, keep_last=2, schedule="cosine",
                warmup_ratio=0.2, max_grad_norm=1.0)
    data = rows(8)
    full = RunDir(tmp_path / "full").create()
    ref_model = lora_model(tokenizer)
    fit(ref_model, data, [], cfg, full, pad_id=0, seed=0)

    part = RunDir(tmp_path / "part").create()

    def crash(step, record):
        if step == 7:
            raise Crash()

    with pytest.raises(Crash):
        fit(lora_model(tokenizer), data, [], cfg, part, pad_id=0, seed=0, on_step=crash)
    assert [p.name for p in list_checkpoints(part.checkpoints)] == ["step-3", "step-6"]  # keep_last=2
    model = lora_model(tokenizer)
    result = fit(model, data, [], cfg, part, pad_id=0, seed=0, resume=True)
    assert result.resumed_from == 6

    ref, got = full.read_metrics(), part.read_metrics()
    assert [r["step"] for r in got] == list(range(1, 11))  # step 7 logged before the crash is not repeated
    for key in ("loss", "lr", "grad_norm", "tokens"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in ref], rel=1e-6), key
    for (n, a), (_, b) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_a_step_is_read_a_step_late_and_saving_steps_at_once(tokenizer, tmp_path, monkeypatch):
    """On a GPU fit() queues step k+1 before it reads step k's loss and gradient norm, so the host never
    waits for the device to drain; a step that saves, evaluates or ends the run is read before anything
    else runs. The records are the same numbers as when every step is read at once (as on a CPU)."""
    from tunesmith.training import loop
    assert loop.reads_late(torch.device("cuda")) and not loop.reads_late(torch.device("cpu"))
    data, val = rows(12), rows(2, seed=1)
    cfg = quiet(micro_batch_size=2, save_every=3, eval_every=5, max_grad_norm=1.0)

    def trace(late):
        monkeypatch.setattr(loop, "reads_late", lambda device: late)
        events, losses, records = [], [], []

        def loss_fn(model, batch):
            out = causal_lm_loss(model, batch)
            if model.training:
                losses.append(float(out[0].detach()) / out[1])
                events.append(f"forward {len(losses)}")
            return out

        def on_step(step, record):
            events.append(f"read {step}")
            records.append(record)

        run = RunDir(tmp_path / f"late-{late}").create()
        fit(lora_model(tokenizer), data, val, cfg, run, pad_id=0, seed=0, loss_fn=loss_fn, on_step=on_step)
        assert [r["step"] for r in run.read_metrics() if "loss" in r] == list(range(1, 7))
        assert [r["loss"] for r in records] == pytest.approx(losses, rel=1e-6)  # each step's own loss
        return events, records

    events, records = trace(late=True)
    assert events == ["forward 1", "forward 2", "read 1", "forward 3", "read 2", "read 3",  # step 3 saves
                      "forward 4", "forward 5", "read 4", "read 5",  # step 5 evaluates
                      "forward 6", "read 6"]
    at_once, same = trace(late=False)
    assert at_once == [e for k in range(1, 7) for e in (f"forward {k}", f"read {k}")]
    for key in ("loss", "lr", "grad_norm", "tokens", "loss_tokens", "epoch"):
        assert [r[key] for r in records] == pytest.approx([r[key] for r in same], rel=1e-6), key


def test_resume_refuses_a_changed_plan(tokenizer, tmp_path):
    run = RunDir(tmp_path / "r").create()
    fit(lora_model(tokenizer), rows(4), [], quiet(micro_batch_size=2, max_steps=2, save_every=2), run, pad_id=0, seed=0)
    with pytest.raises(TunesmithError, match="planned for 2 steps"):
        fit(lora_model(tokenizer), rows(4), [], quiet(micro_batch_size=2, max_steps=5, save_every=2), run,
            pad_id=0, seed=0, resume=True)


@pytest.mark.parametrize(("changed", "message"), [({"lr": 2e-2}, "peak learning rates"),
                                                   ({"lora_plus_ratio": 4.0}, "parameter groups"),
                                                   ({"weight_decay": 0.5}, r"weight_decay .*train.weight_decay"),
                                                   ({"betas": (0.5, 0.6)}, r"betas .*train.betas changed")])
def test_resume_refuses_changed_learning_rates_before_touching_the_model(tokenizer, tmp_path, changed, message):
    """A checkpoint's optimiser would put its own learning rates back in silence: a resume with a new
    train.lr (or LoRA+ ratio) is refused, naming it, before any weight of the model is overwritten."""
    run = RunDir(tmp_path / "r").create()
    settings = dict(micro_batch_size=2, max_steps=2, save_every=2)
    fit(lora_model(tokenizer), rows(4), [], quiet(**settings), run, pad_id=0, seed=0)
    model = lora_model(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(TunesmithError, match=f"cannot resume from .*step-2: .*{message}"):
        fit(model, rows(4), [], quiet(**settings, **changed), run, pad_id=0, seed=0, resume=True)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    same = fit(lora_model(tokenizer), rows(4), [], quiet(**settings), run, pad_id=0, seed=0, resume=True)
    assert same.resumed_from == 2


def test_a_half_written_checkpoint_is_never_taken_for_a_complete_one(tokenizer, tmp_path):
    run = RunDir(tmp_path / "r").create()
    fit(lora_model(tokenizer), rows(4), [], quiet(micro_batch_size=2, max_steps=2, save_every=2), run, pad_id=0, seed=0)
    partial = run.checkpoints / ".step-4.partial"
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"garbage")
    assert [p.name for p in list_checkpoints(run.checkpoints)] == ["step-2"]
    state = json.loads((run.checkpoints / "step-2" / "state.json").read_text())
    assert state["step"] == 2 and state["total_steps"] == 2


def test_jsonl_files_are_written_whole_or_not_at_all(tmp_path):
    path = tmp_path / "out" / "rows.jsonl"
    write_jsonl_atomic(path, [{"a": "é"}, {"b": [1, 2]}])
    assert path.read_bytes() == '{"a": "é"}\n{"b": [1, 2]}\n'.encode()

    def failing():
        yield {"c": 3}
        raise RuntimeError("the writer's source broke")
    with pytest.raises(RuntimeError):
        write_jsonl_atomic(path, failing())
    assert path.read_bytes() == '{"a": "é"}\n{"b": [1, 2]}\n'.encode()  # the earlier file, untouched
    assert [p.name for p in path.parent.iterdir()] == ["rows.jsonl"]  # no partial file left behind


def test_sigterm_cancels_a_run_as_ctrl_c_does(tmp_path):
    """A scheduler's preemption or `docker stop` sends SIGTERM: the run must not stay marked running."""
    import os
    import signal
    import time

    before = signal.getsignal(signal.SIGTERM)
    run = RunDir(tmp_path / "r").create()
    with pytest.raises(KeyboardInterrupt):
        with run.guard("training"):
            run.set_status("running", step=3)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in here
    status = run.read_status()
    assert (status["state"], status["step"], status["error"]) == ("cancelled", 3, "terminated (SIGTERM)")
    assert json.loads(run.events.read_text().splitlines()[-1])["event"] == "cancelled"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_run_never_starts_in_a_folder_holding_something_else(tmp_path):
    """Without --resume: not over another run's checkpoints (resume would take them as its own), not into a
    folder of other files; a new or empty folder, or one a failed start left (config and status), is fine."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("{}\n")
    with pytest.raises(TunesmithError, match="is not empty and holds no tunesmith run"):
        RunDir(data).prepare("recipe: sft\n", resume=False)
    assert sorted(p.name for p in data.iterdir()) == ["train.jsonl"]
    stray = tmp_path / "stray"
    (stray / "checkpoints" / "step-3").mkdir(parents=True)
    (stray / "status.json").write_text("{}")
    with pytest.raises(TunesmithError, match="already holds a run; pass --resume"):
        RunDir(stray).prepare("recipe: sft\n", resume=False)
    failed = RunDir(tmp_path / "failed").prepare("recipe: sft\n", resume=False)
    failed.set_status("failed", step=0, error="DataError: ...")
    RunDir(tmp_path / "failed").prepare("recipe: sft\n", resume=False)  # retried after the data is fixed
    (tmp_path / "empty").mkdir()
    RunDir(tmp_path / "empty").prepare("recipe: sft\n", resume=False)


def test_validation_loss_is_logged(tokenizer, tmp_path):
    from tunesmith.models.tiny import tiny_model

    run = RunDir(tmp_path / "r").create()
    result = fit(tiny_model(tokenizer, seed=0), rows(6), rows(2, seed=1), quiet(micro_batch_size=2, max_steps=4,
                 eval_every=2), run, pad_id=0, seed=0)
    vals = [r for r in run.read_metrics() if "val_loss" in r]
    assert [r["step"] for r in vals] == [2, 4] and result.val_loss == vals[-1]["val_loss"]


def test_bf16_autocast_trains(tokenizer, tmp_path):
    from tunesmith.models.tiny import tiny_model

    run = RunDir(tmp_path / "r").create()
    result = fit(tiny_model(tokenizer, seed=0), rows(4), [], quiet(micro_batch_size=4, max_steps=6, lr=3e-3,
                 precision="bf16"), run, pad_id=0, seed=0)
    losses = [r["loss"] for r in run.read_metrics()]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] and result.steps == 6


def test_grad_norm_is_the_norm_before_clipping(tokenizer, tmp_path):
    from tunesmith.models.tiny import tiny_model

    data = rows(4)
    probe = tiny_model(tokenizer, seed=0)
    accumulate_gradients(probe, [collate(micro_batch(data, 0, 4, seed=0), 0)], causal_lm_loss)
    expected = float(torch.linalg.vector_norm(grads(probe)))
    run = RunDir(tmp_path / "r").create()
    fit(tiny_model(tokenizer, seed=0), data, [], quiet(micro_batch_size=4, max_steps=1, max_grad_norm=1e-3), run,
        pad_id=0, seed=0)
    assert run.read_metrics()[0]["grad_norm"] == pytest.approx(expected, rel=1e-4)


def test_resume_without_a_checkpoint_restarts_cleanly_and_a_finished_run_is_a_no_op(tokenizer, tmp_path):
    run = RunDir(tmp_path / "r").create()
    cfg = quiet(micro_batch_size=2, max_steps=4, save_every=None)

    def crash(step, record):
        if step == 2:
            raise Crash()

    with pytest.raises(Crash):
        fit(lora_model(tokenizer), rows(4), [], cfg, run, pad_id=0, seed=0, on_step=crash)
    fit(lora_model(tokenizer), rows(4), [], cfg, run, pad_id=0, seed=0, resume=True)
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3, 4]  # no step logged twice

    done = RunDir(tmp_path / "done").create()
    cfg = quiet(micro_batch_size=2, max_steps=2, save_every=2)
    fit(lora_model(tokenizer), rows(4), rows(2, seed=1), cfg, done, pad_id=0, seed=0)
    before = done.read_metrics()
    again = fit(lora_model(tokenizer), rows(4), rows(2, seed=1), cfg, done, pad_id=0, seed=0, resume=True)
    assert done.read_metrics() == before and again.resumed_from == 2 and again.train_loss is None


def test_8bit_adamw_keeps_8bit_moments_and_tracks_torch_adamw(tokenizer):
    """bitsandbytes' AdamW8bit on CPU: uint8 moments for large tensors, steps close to torch's AdamW."""
    from tunesmith.models.tiny import tiny_model
    from tunesmith.training.optim import build_optimizer

    models = [tiny_model(tokenizer, seed=0), tiny_model(tokenizer, seed=0)]
    opts = [build_optimizer(m, quiet(optimizer=o, lr=1e-3)) for m, o in zip(models, ("adamw", "adamw_8bit"))]
    assert type(opts[1]).__name__ == "AdamW8bit"
    start = models[0].model.embed_tokens.weight.detach().clone()
    for _ in range(3):
        for m, opt in zip(models, opts):
            m.zero_grad()
            causal_lm_loss(m, collate(rows(4), 0))[0].backward()
            opt.step()
    state = opts[1].state[models[1].model.embed_tokens.weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8  # 65,536 values
    ref = models[0].model.embed_tokens.weight - start
    got = models[1].model.embed_tokens.weight - start
    assert ref.abs().max() > 1e-3  # it moved
    assert (got - ref).norm() < 0.1 * ref.norm()


def test_resume_with_the_paged_8bit_optimizer_matches_an_uninterrupted_run(tokenizer, tmp_path):
    """The 8-bit moments and their quantisation maps come back from the checkpoint."""
    from tunesmith.models.tiny import tiny_model

    cfg = quiet(micro_batch_size=2, max_steps=6, save_every=2, optimizer="paged_adamw_8bit", lr=1e-3)
    full = RunDir(tmp_path / "full").create()
    ref_model = tiny_model(tokenizer, seed=0)
    fit(ref_model, rows(8), [], cfg, full, pad_id=0, seed=0)
    part = RunDir(tmp_path / "part").create()

    def crash(step, record):
        if step == 5:
            raise Crash()

    with pytest.raises(Crash):
        fit(tiny_model(tokenizer, seed=0), rows(8), [], cfg, part, pad_id=0, seed=0, on_step=crash)
    model = tiny_model(tokenizer, seed=0)
    assert fit(model, rows(8), [], cfg, part, pad_id=0, seed=0, resume=True).resumed_from == 4
    assert [r["loss"] for r in part.read_metrics()] == pytest.approx([r["loss"] for r in full.read_metrics()],
                                                                     rel=1e-6)
    for (n, a), (_, b) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), n


def test_lora_update_norm_equals_the_explicit_product():
    from tunesmith.losses import lora_update_sq_norm

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    assert lora_update_sq_norm(a, b, 0.5).item() == pytest.approx(((0.5 * b @ a) ** 2).sum().item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_weight_anchor_holds_the_run_near_its_start(tokenizer, tmp_path, kind):
    """The same run with λ > 0 ends closer to its start; the logged penalty starts at 0 (W = W_start) and grows."""
    from tunesmith.models import apply_method
    from tunesmith.models.tiny import tiny_model

    def distance_and_log(weight):
        torch.manual_seed(0)
        base = tiny_model(tokenizer, seed=0)
        start = {n: p.detach().clone() for n, p in base.named_parameters()}
        model = apply_method(base, MethodConfig(kind=kind, lora={"r": 4}))
        run = RunDir(tmp_path / f"{kind}-{weight}").create()
        fit(model, rows(8), [], quiet(micro_batch_size=4, max_steps=6, lr=3e-3, weight_anchor=weight), run,
            pad_id=0, seed=0)
        merged = model.merge_and_unload() if kind == "lora" else model
        sq = sum(((p - start[n]) ** 2).sum() for n, p in merged.named_parameters())
        return float(sq), run.read_metrics()

    free, free_log = distance_and_log(0.0)
    held, held_log = distance_and_log(50.0)
    assert held < 0.7 * free
    assert "anchor_penalty" not in free_log[0] and held_log[0]["anchor_penalty"] == 0.0  # at the start, W = W_start
    assert held_log[-1]["anchor_penalty"] > 0


def test_validation_runs_in_eval_mode_and_puts_each_module_mode_back(tokenizer):
    """evaluate() runs every module in eval mode (no dropout), and afterwards each module has the mode it
    had: a part kept in eval mode on purpose inside a training model stays there, also when a batch raises."""
    from tunesmith.models.tiny import tiny_model
    from tunesmith.training.loop import evaluate

    model = tiny_model(tokenizer, seed=0).train()
    model.model.layers[0].eval()
    seen = []

    def loss_fn(m, batch):
        seen.append({mod.training for mod in m.modules()})
        return causal_lm_loss(m, batch)

    assert evaluate(model, rows(4), quiet(micro_batch_size=2), 0, loss_fn)["loss"] > 0
    assert seen == [{False}, {False}]

    def failing(m, batch):
        raise ValueError("a broken batch")

    with pytest.raises(ValueError, match="a broken batch"):
        evaluate(model, rows(4), quiet(micro_batch_size=2), 0, failing)
    assert model.training and model.model.layers[1].training and model.lm_head.training
    assert not model.model.layers[0].training and not model.model.layers[0].mlp.training
