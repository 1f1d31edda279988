"""float16 training: the loss scale, skipped overflowing steps, float32 master weights, and resume."""
import json
import math

import pytest
import torch

from test_loop import Crash, lora_model, quiet, rows
from tunesmith._core.errors import TunesmithError
from tunesmith._core.rundir import RunDir
from tunesmith.config import MethodConfig, SFTConfig
from tunesmith.training import fit, list_checkpoints
from tunesmith.training import precision
from tunesmith.training.loop import lm_loss
from tunesmith.training.precision import LossScaling, master_weights

CPU = torch.device("cpu")


def events(run):
    return [json.loads(line) for line in run.events.read_text().splitlines()]


def test_the_loss_scale_keeps_gradients_that_float16_would_flush_to_zero():
    """A loss of 1e-9 per output: its gradient, 1e-9, is below float16's smallest subnormal (6e-8), so an
    unscaled backward through a float16 matmul gives zeros; scaled by 65,536 it survives, and unscaled
    again it is the float32 gradient."""
    torch.manual_seed(0)
    x = torch.randn(16, 8)

    def weight_grad(scaling):
        layer = torch.nn.Linear(8, 4)
        torch.nn.init.normal_(layer.weight, generator=torch.Generator().manual_seed(1))
        opt = torch.optim.AdamW(layer.parameters())
        with torch.autocast("cpu", torch.float16):
            loss = layer(x).float().sum() * 1e-9
        if scaling is None:
            loss.backward()
        else:
            scaling.backward(loss)
            scaling.unscale(opt)
        return layer.weight.grad

    exact = 1e-9 * x.sum(0).expand(4, 8)
    assert torch.count_nonzero(weight_grad(None)) == 0
    assert torch.allclose(weight_grad(LossScaling(quiet(precision="fp16"), CPU)), exact, rtol=1e-2)
    assert LossScaling(quiet(precision="bf16"), CPU).scaler is None


def poisoned(steps):
    """The language-model loss, made infinite on the given (1-based) steps."""
    base, calls = lm_loss(), [0]

    def loss(model, batch):
        calls[0] += 1
        total, n = base(model, batch)
        return (total * math.inf if calls[0] in steps else total), n
    return loss


def test_an_overflowing_step_is_skipped_halves_the_scale_and_keeps_the_schedule(tokenizer, tmp_path):
    cfg = quiet(micro_batch_size=4, max_steps=5, precision="fp16", schedule="linear", lr=1e-2)
    weights = {}

    def snapshot(step, record):
        weights[step] = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    model = lora_model(tokenizer)
    run = RunDir(tmp_path / "r").create()
    fit(model, rows(8), [], cfg, run, pad_id=0, seed=0, loss_fn=poisoned({3}), on_step=snapshot)
    got = run.read_metrics()
    assert [r["loss_scale"] for r in got] == [65536.0, 65536.0, 65536.0, 32768.0, 32768.0]
    assert not math.isfinite(got[2]["grad_norm"]) and all(math.isfinite(r["grad_norm"]) for i, r in
                                                           enumerate(got) if i != 2)
    assert all(torch.equal(a, b) for a, b in zip(weights[2], weights[3]))  # step 3 left the weights alone
    assert not all(torch.equal(a, b) for a, b in zip(weights[3], weights[4]))
    assert [r["lr"] for r in got] == pytest.approx([1e-2 * (1 - s / 5) for s in range(5)])  # the schedule went on


def test_a_run_whose_loss_is_never_finite_stops_and_names_the_steps(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "MAX_SKIPPED", 3)
    run = RunDir(tmp_path / "r").create()
    with pytest.raises(TunesmithError, match=r"steps 2\.\.4 all overflowed float16.*loss scale of 8192"):
        fit(lora_model(tokenizer), rows(8), [], quiet(micro_batch_size=4, max_steps=8, precision="fp16"), run,
            pad_id=0, seed=0, loss_fn=poisoned({2, 3, 4, 5, 6}))
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3, 4]  # the overflowing steps are on record


def test_resume_of_an_fp16_run_restores_the_loss_scale(tokenizer, tmp_path):
    """An overflow before the checkpoint halves the scale; the resumed run goes on from the halved scale, and
    its losses, scales and weights are the uninterrupted run's."""
    cfg = quiet(micro_batch_size=2, grad_accum=2, max_steps=8, save_every=3, precision="fp16", schedule="cosine",
                max_grad_norm=1.0)
    data = rows(8)
    full = RunDir(tmp_path / "full").create()
    ref_model = lora_model(tokenizer)
    fit(ref_model, data, [], cfg, full, pad_id=0, seed=0, loss_fn=poisoned({3, 4}))  # micro-batches 3, 4: step 2

    def crash(step, record):
        if step == 5:
            raise Crash()

    part = RunDir(tmp_path / "part").create()
    with pytest.raises(Crash):
        fit(lora_model(tokenizer), data, [], cfg, part, pad_id=0, seed=0, loss_fn=poisoned({3, 4}), on_step=crash)
    assert list_checkpoints(part.checkpoints)[-1].name == "step-3"
    model = lora_model(tokenizer)
    fit(model, data, [], cfg, part, pad_id=0, seed=0, resume=True, loss_fn=lm_loss())
    ref, got = full.read_metrics(), part.read_metrics()
    assert [r["loss_scale"] for r in got] == [r["loss_scale"] for r in ref] == [65536.0] * 2 + [32768.0] * 6
    for key in ("loss", "lr", "grad_norm"):
        assert [r[key] for r in got[3:]] == pytest.approx([r[key] for r in ref[3:]], rel=1e-6), key
    for (n, a), (_, b) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_float16_weights_train_as_float32_master_weights_and_come_back_float16(tokenizer, tmp_path):
    """A float16 model trained in full under fp16 takes the steps of a float32 copy of the same weights
    (autocast computes both in float16; the updates land on float32 weights in both), and is float16 again
    afterwards, its weights the float32 run's rounded."""
    from tunesmith.models.tiny import tiny_model

    cfg = quiet(micro_batch_size=4, max_steps=4, precision="fp16", lr=3e-3)
    half = tiny_model(tokenizer, seed=0).half()
    wide = tiny_model(tokenizer, seed=0).half().float()
    seen = []
    runs = [RunDir(tmp_path / n).create() for n in ("half", "wide")]
    fit(half, rows(4), [], cfg, runs[0], pad_id=0, seed=0,
        on_step=lambda s, r: seen.append({p.dtype for p in half.parameters()}))
    fit(wide, rows(4), [], cfg, runs[1], pad_id=0, seed=0)
    assert seen == [{torch.float32}] * 4 and {p.dtype for p in half.parameters()} == {torch.float16}
    a, b = runs[0].read_metrics(), runs[1].read_metrics()
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)
    assert a[-1]["loss"] < a[0]["loss"]
    for (n, p), (_, q) in zip(half.named_parameters(), wide.named_parameters()):
        assert torch.equal(p, q.half()), n
    assert any(e["event"] == "precision" and "21 float16 trainable tensors" in e["message"]
               for e in events(runs[0]))


def _freeze_last_block(model):
    from tunesmith.models import apply_method

    return apply_method(model, MethodConfig(kind="freeze", freeze={"train_last_n_layers": 1, "train_lm_head": False}))


def test_freeze_on_a_bfloat16_body_trains_its_blocks_as_float32_master_weights(tokenizer, tmp_path):
    """`freeze` on a bfloat16 model under bf16: the trained block takes the steps of the same model whose
    block was made float32 beforehand (bf16 autocast computes both alike; the updates land on float32
    weights in both), the frozen body stays bfloat16 throughout, and the block is bfloat16 again afterwards,
    the float32 run's weights rounded. A pure bfloat16 block would take other steps: AdamW's updates round."""
    from tunesmith.models.tiny import tiny_model

    cfg = quiet(micro_batch_size=4, max_steps=4, precision="bf16", lr=1e-3)
    half = _freeze_last_block(tiny_model(tokenizer, seed=0).to(torch.bfloat16))
    wide = _freeze_last_block(tiny_model(tokenizer, seed=0).to(torch.bfloat16))
    for p in wide.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    seen = []
    runs = [RunDir(tmp_path / n).create() for n in ("half", "wide")]
    fit(half, rows(4), [], cfg, runs[0], pad_id=0, seed=0, on_step=lambda s, r: seen.append(
        ({p.dtype for p in half.parameters() if p.requires_grad}, {p.dtype for p in half.parameters()
                                                                     if not p.requires_grad})))
    fit(wide, rows(4), [], cfg, runs[1], pad_id=0, seed=0)
    assert seen == [({torch.float32}, {torch.bfloat16})] * 4
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    a, b = runs[0].read_metrics(), runs[1].read_metrics()
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and a[-1]["loss"] < a[0]["loss"]
    trained = 0
    for (n, p), (_, q) in zip(half.named_parameters(), wide.named_parameters()):
        assert torch.equal(p, q.to(torch.bfloat16)), n
        trained += p.requires_grad
    assert trained == 10  # the block's 7 projections and 2 norms, and the final norm (train_norm)
    said = [e["message"] for e in events(runs[0]) if e["event"] == "precision"]
    assert said == ["10 bfloat16 trainable tensors train in float32 (master weights); they are bfloat16 again "
                    "when training ends"]
    assert not any(e["event"] == "precision" for e in events(runs[1]))


def test_a_model_trained_whole_in_bfloat16_trains_in_bfloat16(tokenizer, tmp_path):
    """`full` on a bfloat16 model keeps bfloat16 weights (and moments, stochastically rounded) while it
    trains: it asked for half the memory of float32 weights. Under fp32 nothing is widened either: no
    autocast would run the mix."""
    from tunesmith.models.tiny import tiny_model

    for method, precision_ in (("full", "bf16"), ("freeze", "fp32")):
        model = tiny_model(tokenizer, seed=0).to(torch.bfloat16)
        model = _freeze_last_block(model) if method == "freeze" else model
        seen = []
        run = RunDir(tmp_path / method).create()
        fit(model, rows(4), [], quiet(micro_batch_size=4, max_steps=2, precision=precision_, lr=1e-2), run,
            pad_id=0, seed=0, on_step=lambda s, r: seen.append({p.dtype for p in model.parameters()}))
        assert seen == [{torch.bfloat16}] * 2, method
        said = [e["message"] for e in events(run) if e["event"] == "precision"]
        assert len(said) == 1 and "master weights" not in said[0], said
        assert "trainable tensors train in bfloat16" in said[0] and "stochastic rounding" in said[0]


def test_a_float16_model_trains_only_under_fp16():
    for other in ("bf16", "fp32"):
        with pytest.raises(ValueError, match="model.dtype float16 trains under train.precision fp16"):
            SFTConfig(model={"name": "tiny", "dtype": "float16"}, data={"train": "x.jsonl"}, train={"precision": other})
    for fine in ("fp16", "auto"):
        SFTConfig(model={"name": "tiny", "dtype": "float16"}, data={"train": "x.jsonl"}, train={"precision": fine})
    assert SFTConfig(data={"train": "x.jsonl"}).train.precision == "auto"


class _Weights(torch.nn.Module):
    """Parameters of the given dtypes, as a model whose frozen and trained tensors differ in width."""

    def __init__(self, *dtypes):
        super().__init__()
        self.ws = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(2, dtype=d)) for d in dtypes])


@pytest.mark.parametrize("dtypes, chosen", [
    ((torch.float32,), "fp32"),
    ((torch.float16,), "fp16"),
    ((torch.bfloat16,), "bf16"),
    ((torch.bfloat16, torch.float32), "bf16"),   # LoRA's float32 adapters on a bfloat16 base
    ((torch.float16, torch.float32), "fp16"),    # a float16 base: it needs the loss scale
])
def test_auto_precision_follows_the_weights_on_a_cpu(dtypes, chosen):
    cfg, why = precision.resolve_precision(quiet(), _Weights(*dtypes))
    assert cfg.precision == chosen and why.startswith(f"auto: {chosen} (")
    assert quiet().precision == "auto"  # the caller's config is left as it was
    for named in ("fp32", "bf16", "fp16"):  # a precision the config names is kept, whatever the weights
        kept, why = precision.resolve_precision(quiet(precision=named), _Weights(*dtypes))
        assert kept.precision == named and why is None


def test_auto_precision_on_a_gpu_is_bf16_where_it_has_bfloat16_arithmetic_and_fp16_where_not(monkeypatch):
    native = {"NVIDIA H100 80GB HBM3": True, "Tesla T4": False}
    for name, has in native.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: including_emulation or has)
        cuda = torch.device("cuda")
        assert precision._choose({torch.float32}, cuda) == (
            ("bf16", f"{name} has bfloat16 arithmetic") if has else ("fp16", f"{name} has no bfloat16 arithmetic"))
        assert precision._choose({torch.float16, torch.float32}, cuda)[0] == "fp16"
        assert precision._choose({torch.bfloat16, torch.float32}, cuda)[0] == "bf16"


def test_the_loop_refuses_a_precision_left_unresolved():
    for use in (lambda cfg: precision.precision_autocast(cfg, CPU), lambda cfg: LossScaling(cfg, CPU)):
        with pytest.raises(ValueError, match="unresolved"):
            use(quiet())


@pytest.mark.parametrize("dtype, chosen, scaled", [(torch.float32, "fp32", False), (torch.float16, "fp16", True)])
def test_fit_under_auto_trains_as_the_chosen_precision_and_says_so(tokenizer, tmp_path, dtype, chosen, scaled):
    """`auto` on a float16 model is fp16: loss scaling on, every record with its scale, and the same run as
    one that named fp16; on a float32 model on the CPU it is fp32, with no scale."""
    from tunesmith.models.tiny import tiny_model

    def run_with(name, **kw):
        model = tiny_model(tokenizer, seed=0).to(dtype)
        run = RunDir(tmp_path / name).create()
        fit(model, rows(4), [], quiet(micro_batch_size=2, max_steps=3, lr=1e-2, **kw), run, pad_id=0, seed=0)
        return run

    auto, named = run_with("auto"), run_with("named", precision=chosen)
    got = auto.read_metrics()
    assert all(("loss_scale" in r) == scaled for r in got)
    assert [r["loss"] for r in got] == [r["loss"] for r in named.read_metrics()]
    said = [e["message"] for e in events(auto) if e["event"] == "precision"]
    assert said and said[0].startswith(f"auto: {chosen} (")
    assert not any(e["event"] == "precision" and "auto" in e["message"] for e in events(named))


def test_bf16_is_refused_on_a_gpu_without_bfloat16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(TunesmithError, match="Tesla T4 has no bfloat16.*set train.precision fp16"):
        with master_weights([], quiet(precision="bf16"), torch.device("cuda")):
            pass
    with master_weights([], quiet(precision="fp16"), torch.device("cuda")):
        pass


def test_lora_on_a_float16_base_keeps_its_adapters_float32(tokenizer, tmp_path):
    """PEFT's adapters are float32 on a 16-bit base: nothing is widened, and the frozen base stays float16."""
    from tunesmith.models import apply_method
    from tunesmith.models.tiny import tiny_model

    model = apply_method(tiny_model(tokenizer, seed=0).half(), MethodConfig(kind="lora", lora={"r": 4}))
    run = RunDir(tmp_path / "r").create()
    fit(model, rows(4), [], quiet(micro_batch_size=4, max_steps=5, precision="fp16", lr=1e-2), run, pad_id=0,
        seed=0)
    losses = [r["loss"] for r in run.read_metrics()]
    assert losses[-1] < losses[0] and not any(e["event"] == "precision" for e in events(run))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.float16}


@pytest.mark.parametrize("dtype, precision_", [("float16", "fp16"), ("bfloat16", "bf16")])
def test_online_rl_trains_a_16_bit_model_whose_trained_layers_sit_beside_frozen_16_bit_ones(tmp_path, dtype,
                                                                                             precision_):
    """PPO on a 16-bit model with its last block trained: that block (and the value head) train in float32
    while the rest stays 16-bit, and the rollouts between updates are sampled from that mixed model."""
    from test_rl import _cfg
    from tunesmith.data.prompts import load_prompts
    from tunesmith.models import apply_method
    from tunesmith.models.tiny import tiny_model, tiny_tokenizer
    from tunesmith.rl import build_reward
    from tunesmith.training.online import train_online
    from tunesmith.training.preference import Reference, frozen_copy

    cfg = _cfg("ppo", model={"name": "tiny", "dtype": dtype}, train={"precision": precision_, "max_steps": 3},
               method={"kind": "freeze", "freeze": {"train_last_n_layers": 1, "train_lm_head": False}})
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_model(tok, seed=0).to(getattr(torch, dtype))
    reference = Reference("copy", frozen_copy(model))
    model = apply_method(model, cfg.method)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    items, _ = load_prompts(cfg.data, tok)
    run = RunDir(tmp_path / "r").create()
    train_online(model, tok, items[:16], build_reward(cfg.reward.sources), cfg, run, reference=reference)
    got = run.read_metrics()
    assert [r["step"] for r in got] == [1, 2, 3] and all(r["response_length"] > 0 for r in got)
    assert all(r.get("loss_scale", 1) > 0 and math.isfinite(r["grad_norm"]) for r in got)
    assert all(("loss_scale" in r) == (dtype == "float16") for r in got)
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    assert any(e["event"] == "precision" and f"{dtype} trainable tensors train in float32" in e["message"]
               for e in events(run))
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_the_row_layout_check_runs_a_mixed_model_under_training_autocast(tokenizer):
    """The check that packed examples stay apart runs the model as training will: a float16 model whose last
    block trains in float32 fails a plain forward, and the check must not read that failure as examples that
    see each other (which stops a packed run, or takes flat rows away from it on a GPU)."""
    from tunesmith.models.tiny import tiny_model
    from tunesmith.training.speed import keeps_examples_apart, plan_speed, settle_attention

    model = tiny_model(tokenizer, seed=0).half()
    for p in model.model.layers[-1].parameters():
        p.data = p.data.float()
    assert not keeps_examples_apart(model, flat=False)  # float16 activations into float32 weights: it raises
    assert keeps_examples_apart(model, flat=False, autocast=torch.float16)
    cfg = quiet(precision="fp16")
    plan = plan_speed(model, cfg, CPU, language_model=True)
    settle_attention(model, plan, cfg, packed=True)
    assert not plan.varlen


@pytest.mark.parametrize("cuda, native, method, for_training, want", [
    (False, False, "lora", True, "float32"),       # a CPU
    (True, True, "lora", True, "bfloat16"),        # adapters on a frozen base: the base in bfloat16
    (True, True, "qlora", True, "bfloat16"),       # (QLoRA's compute dtype follows it)
    (True, True, "bottleneck", True, "bfloat16"),
    (True, True, "full", True, "float32"),         # every weight trains: float32
    (True, True, "freeze", True, "bfloat16"),      # its trained blocks: float32 master weights
    (True, True, "full", False, "bfloat16"),       # inference
    (True, False, "lora", True, "float32"),        # a GPU without bfloat16 arithmetic
])
def test_auto_dtype_is_bfloat16_on_a_bf16_gpu_except_for_weights_that_train(monkeypatch, cuda, native, method,
                                                                              for_training, want):
    from tunesmith.config import ModelConfig
    from tunesmith.models import load

    monkeypatch.setattr(load, "resolve_device", lambda: torch.device("cuda" if cuda else "cpu"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    assert ModelConfig().dtype == "auto"
    assert load.resolve_dtype(ModelConfig(), method, for_training) == want
    for named in ("float32", "bfloat16", "float16"):
        assert load.resolve_dtype(ModelConfig(dtype=named), method, for_training) == named
        assert load.choose_dtype(ModelConfig(dtype=named), method, for_training) == (named, None)


@pytest.mark.parametrize("billions, gib, want", [
    (1.24, 80, "float32"),    # Llama-3.2-1B on an H100: 18.5 GiB of float32 weights, gradients and moments
    (1.24, 24, "bfloat16"),   # on a 24 GB GPU it would take 86% of the 21.6 GiB budget
    (8.03, 80, "bfloat16"),   # Llama-3.1-8B: 120 GiB in float32, 60 in bfloat16
    (3.21, 80, "float32"),    # Llama-3.2-3B: 48 GiB of a 72 GiB budget
])
def test_auto_dtype_for_full_fine_tuning_is_float32_where_it_fits_the_gpu(monkeypatch, billions, gib, want):
    """`full` under `auto` on a bf16 GPU loads float32 where 16 bytes a weight (weights, gradients, AdamW's
    two moments) fit three quarters of the GPU's budget (90% of its memory), and bfloat16 (8 bytes a weight
    with `BFloat16AdamW`) where they do not; the reason names the figures."""
    from tunesmith.config import ModelConfig
    from tunesmith.models import load, speed

    n = int(billions * 1e9)
    monkeypatch.setattr(load, "resolve_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "the GPU")
    monkeypatch.setattr(speed, "device_budget_bytes", lambda device, budget: 0.9 * gib * 2**30)
    monkeypatch.setattr(load, "stored_parameters", lambda name: n)
    dtype, why = load.choose_dtype(ModelConfig(name="/some/model"), "full")
    assert dtype == want, why
    assert why.startswith(f"full fine-tuning of {billions:.2f}B weights: float32 with AdamW ")
    assert f"{16 * n / 2**30:.1f} GiB of the GPU's {0.9 * gib:.0f}" in why
    assert ("bfloat16 with stochastically rounded AdamW takes" in why) == (want == "bfloat16")
    assert load.choose_dtype(ModelConfig(name="/some/model"), "lora")[0] == "bfloat16"  # adapters: not counted


@pytest.mark.parametrize("billions, want", [(4.0, "float32"), (8.03, "bfloat16")])
def test_auto_dtype_for_full_fine_tuning_counts_8_bit_moments(monkeypatch, billions, want):
    """With 8-bit AdamW moments a float32 weight takes 10 bytes, not 16: a 4B model trains in float32 on an
    80 GB GPU (40 GB of its 72 GiB budget; with AdamW it would be bfloat16), an 8B one still in bfloat16, and
    the reason says its updates are rounded to nearest there."""
    from tunesmith.config import ModelConfig
    from tunesmith.models import load, speed

    n = int(billions * 1e9)
    monkeypatch.setattr(load, "resolve_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "the GPU")
    monkeypatch.setattr(speed, "device_budget_bytes", lambda device, budget: 0.9 * 80 * 2**30)
    monkeypatch.setattr(load, "stored_parameters", lambda name: n)
    dtype, why = load.choose_dtype(ModelConfig(name="/some/model"), "full", optimizer="paged_adamw_8bit")
    assert dtype == want and f"float32 with 8-bit AdamW {'takes' if want == 'float32' else 'would take'} " \
        f"{10 * n / 2**30:.1f} GiB" in why
    assert ("each update rounded to the nearest bfloat16" in why) == (want == "bfloat16")
    assert load.choose_dtype(ModelConfig(name="/some/model"), "full")[0] == "bfloat16"


def test_a_bitsandbytes_optimizer_on_bfloat16_weights_is_said_to_round_to_nearest(tokenizer, tmp_path):
    """bitsandbytes' optimizers round a bfloat16 weight's update to nearest: the run warns and its `precision`
    event says so; over float32 weights they say nothing of it."""
    import warnings

    from tunesmith.models.tiny import tiny_model

    for dtype in (torch.bfloat16, torch.float32):
        run = RunDir(tmp_path / str(dtype)).create()
        cfg = quiet(micro_batch_size=2, max_steps=1, optimizer="adamw_8bit",
                    precision="bf16" if dtype == torch.bfloat16 else "fp32")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(tiny_model(tokenizer, seed=0).to(dtype), rows(2), [], cfg, run, pad_id=0, seed=0)
        said = [json.loads(line)["message"] for line in run.events.read_text().splitlines()
                if json.loads(line)["event"] == "precision"]
        lost = "train in bfloat16 under bitsandbytes' AdamW8bit, which rounds each update to the nearest bfloat16"
        assert any(lost in m for m in said) == (dtype == torch.bfloat16)
        assert any(lost in str(w.message) for w in caught) == (dtype == torch.bfloat16)


def test_stored_parameters_reads_the_weights_files_headers(tokenizer, tmp_path):
    """The count of a saved model's weights from its safetensors headers (a tied weight once) and from a
    GGUF file's tensor table, equal to the model's own count; a run directory holding an adapter counts its
    base; `tiny` and `default` are not counted."""
    from tunesmith.models import load
    from tunesmith.models.gguf import export_gguf
    from tunesmith.models.tiny import tiny_model

    model = tiny_model(tokenizer, seed=0)
    want = sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    assert load.stored_parameters(str(tmp_path / "hf")) == want
    tied = tiny_model(tokenizer, seed=0)
    tied.lm_head.weight = tied.model.embed_tokens.weight
    tied.config.tie_word_embeddings = True
    tied.save_pretrained(tmp_path / "tied")
    assert load.stored_parameters(str(tmp_path / "tied")) == sum(p.numel() for p in tied.parameters()) < want
    gguf = export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f32")
    assert load.stored_parameters(str(gguf)) == want
    assert load.stored_parameters("tiny") is None and load.stored_parameters("default") is None


def test_bottleneck_adapters_train_in_float32_on_a_bfloat16_base(tokenizer, tmp_path):
    """The adapters are float32 (bfloat16 would round most of AdamW's updates away) while the base stays
    bfloat16; the adapted model starts at its base and, after training, runs without autocast (generation)
    in the base's dtype."""
    from tunesmith.models import apply_method
    from tunesmith.models.tiny import tiny_model

    ids = torch.tensor([[5, 6, 7, 8]])
    base = tiny_model(tokenizer, seed=0).to(torch.bfloat16)
    with torch.no_grad():
        before = base(ids).logits
    model = apply_method(tiny_model(tokenizer, seed=0).to(torch.bfloat16), MethodConfig(kind="bottleneck"), tokenizer)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    run = RunDir(tmp_path / "r").create()
    fit(model, rows(4), [], quiet(micro_batch_size=4, max_steps=5, lr=1e-2), run, pad_id=0, seed=0)
    losses = [r["loss"] for r in run.read_metrics()]
    assert losses[-1] < losses[0]
    assert any(e["event"] == "precision" and e["message"].startswith("auto: bf16 (bfloat16 weights)")
               for e in events(run))
    with torch.no_grad():
        after = model(ids).logits
    assert after.dtype == torch.bfloat16 and not torch.equal(after, before)


@pytest.mark.parametrize("kind", ["lora", "bottleneck"])
def test_a_new_scoring_head_on_a_bfloat16_base_trains_in_float32(tokenizer, kind):
    """A reward head on a bfloat16 base trains in float32 beside its float32 adapters: an AdamW step of
    1e-5, far below bfloat16's spacing at most of the head's weights (about 1e-4 to 1e-3), moves it, where a
    bfloat16 head rounds the step away for nearly every weight (all but 2 of 64 on a plain bfloat16 head).
    Scores come out float32 without autocast, and the frozen copy of the head (what the adapters switched
    off score with) stays bfloat16."""
    from tunesmith.models import apply_method
    from tunesmith.models.reward import sequence_scores, to_reward_model
    from tunesmith.models.tiny import tiny_model

    base = to_reward_model(tiny_model(tokenizer, seed=0).to(torch.bfloat16))
    model = apply_method(base, MethodConfig(kind=kind), tokenizer)
    head = [p for n, p in model.named_parameters() if p.requires_grad and "score" in n]
    assert head and {p.dtype for p in head} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "position_ids": torch.arange(4)[None],
             "example_ends": torch.tensor([[0, 3]])}
    scores = sequence_scores(model, batch)
    with torch.no_grad():  # the head reads bfloat16 hidden states without autocast
        assert model(input_ids=batch["input_ids"]).logits.dtype == torch.float32
    start = [p.detach().clone() for p in head]
    opt = torch.optim.AdamW(head, lr=1e-5, weight_decay=0.0)
    scores.sum().backward()
    opt.step()
    assert all(not torch.equal(p, s) for p, s in zip(head, start))
    assert all((p - s).abs().max() < 2e-5 for p, s in zip(head, start))


@pytest.mark.parametrize("setting, world, want", [("auto", 1, "bfloat16"), ("auto", 8, "float32"),
                                                  ("off", 8, "bfloat16"), ("on", 8, "float32")])
def test_auto_dtype_counts_a_sharded_optimisers_share(monkeypatch, setting, world, want):
    """Data parallel with the optimiser state sharded over 8 GPUs, a float32 weight takes 4 + 4 + 8/8 = 9
    bytes on each: a 5B model trains in float32 on 80 GB GPUs (42 GiB of a 72 GiB budget), where in one
    process (80 GiB at 16 bytes) or unsharded it loads in bfloat16; the reason names the sharding."""
    from tunesmith._core import dist
    from tunesmith.config import ModelConfig
    from tunesmith.models import load, speed

    n = 5_000_000_000
    monkeypatch.setattr(load, "resolve_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "the GPU")
    monkeypatch.setattr(speed, "device_budget_bytes", lambda device, budget: 0.9 * 80 * 2**30)
    monkeypatch.setattr(load, "stored_parameters", lambda name: n)
    monkeypatch.setattr(dist, "world_size", lambda: world)
    dtype, why = load.choose_dtype(ModelConfig(name="/some/model"), "full", shard_optimizer=setting)
    assert dtype == want, why
    sharded = world > 1 and setting != "off"
    assert ("moments sharded over 8 GPUs" in why) == sharded
    assert f"{(9 if sharded else 16) * n / 2**30:.1f} GiB" in why
