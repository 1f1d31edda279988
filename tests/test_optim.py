"""AdamW over bfloat16 weights: stochastic rounding, torch's arithmetic, and a whole bfloat16 model trained
and resumed with it."""
import json

import pytest
import torch

from test_loop import Crash, quiet, rows
from tunesmith._core.rundir import RunDir
from tunesmith.training import fit, list_checkpoints
from tunesmith.training.optim import BFloat16AdamW, build_optimizer, stochastic_round


def test_stochastic_rounding_picks_a_neighbour_as_often_as_it_is_near():
    """Each value becomes one of its two bfloat16 neighbours, the nearer one more often, in proportion: on
    average the float32 value comes back, for both signs; a value bfloat16 holds exactly stays as it is."""
    unit = 2.0 ** -7  # bfloat16's spacing in [1, 2)
    values = torch.tensor([1 + 0.25 * unit, -(1 + 0.7 * unit), 1.5, -2.0])
    draws = stochastic_round(values.repeat(200_000, 1), key=12345).float()
    assert set(draws[:, 0].tolist()) == {1.0, 1 + unit} and set(draws[:, 1].tolist()) == {-1.0, -(1 + unit)}
    assert (draws[:, 0] == 1 + unit).float().mean() == pytest.approx(0.25, abs=0.005)
    assert (draws[:, 1] == -(1 + unit)).float().mean() == pytest.approx(0.7, abs=0.005)
    assert draws.mean(0).tolist() == pytest.approx(values.tolist(), abs=2e-5)
    assert (draws[:, 2] == 1.5).all() and (draws[:, 3] == -2.0).all()


def test_on_float32_weights_it_is_torchs_adamw_bit_for_bit():
    """The update is torch's AdamW arithmetic, in the same order: on float32 weights (nothing to round)
    weights and moments equal torch's exactly, with weight decay on one group and not the other."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(5, 7)), torch.nn.Parameter(torch.randn(7))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]

    def groups(ps):
        return [{"params": ps[:1], "weight_decay": 0.1}, {"params": ps[1:], "weight_decay": 0.0}]

    a = BFloat16AdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95))
    b = torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.95), foreach=False)
    for _ in range(5):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a.state[p][key], b.state[q][key]), key


def test_bfloat16_weights_keep_the_updates_nearest_rounding_drops():
    """A bfloat16 weight of 1.0 pushed by a steady gradient at lr 1e-4: each step moves it 1e-4, an eightieth
    of bfloat16's spacing there, so torch's AdamW rounds every step away and it never moves. Stochastically
    rounded it moves by the float32 run's total in expectation (300 steps: 0.03); weights and moments stay
    bfloat16, slices of the weight at a time included."""
    def run(opt_cls, dtype, **kw):
        p = torch.nn.Parameter(torch.ones(64, 64, dtype=dtype).T)  # a transposed view: rows are not contiguous
        opt = opt_cls([p], lr=1e-4, weight_decay=0.0, **kw)
        for _ in range(300):
            p.grad = torch.full_like(p, 0.5)
            opt.step()
        return p.detach(), opt

    nearest, _ = run(torch.optim.AdamW, torch.bfloat16)
    exact, _ = run(torch.optim.AdamW, torch.float32)
    BFloat16AdamW.SLICE, slice_before = 1000, BFloat16AdamW.SLICE  # slices of 15 rows, 5 of them
    try:
        ours, opt = run(BFloat16AdamW, torch.bfloat16)
    finally:
        BFloat16AdamW.SLICE = slice_before
    assert torch.equal(nearest, torch.ones_like(nearest))
    assert float(exact.mean()) == pytest.approx(0.97, abs=1e-4)
    assert float(ours.float().mean()) == pytest.approx(float(exact.mean()), abs=2e-4)
    assert float(ours[60:].float().mean()) == pytest.approx(float(exact.mean()), abs=2e-3)  # the last slice
    state = next(iter(opt.state.values()))
    assert ours.dtype == state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert len(set(ours.float().flatten().tolist())) > 1  # rounded at random: not all alike


def test_build_optimizer_takes_it_for_bfloat16_weights_only(tokenizer):
    from tunesmith.models.tiny import tiny_model

    assert type(build_optimizer(tiny_model(tokenizer, seed=0), quiet())) is torch.optim.AdamW
    assert type(build_optimizer(tiny_model(tokenizer, seed=0).to(torch.bfloat16), quiet())) is BFloat16AdamW


@pytest.mark.parametrize("ratio", [None, 16.0])
def test_lora_plus_gives_the_b_matrices_ratio_times_the_learning_rate(tokenizer, ratio):
    """train.lora_plus_ratio: the tensors at lr x ratio are exactly the B matrices PEFT's own LoRA+ optimiser
    picks; the rest stay at lr. After the first step from B = 0, A has had no gradient and has not moved,
    and every B entry moved by about lr x ratio (Adam's first step is lr x sign(g))."""
    from peft.optimizers import create_loraplus_optimizer

    from test_loop import lora_model

    model = lora_model(tokenizer)
    opt = build_optimizer(model, quiet(lr=1e-3, lora_plus_ratio=ratio))
    fast = {id(p) for g in opt.param_groups if g["lr"] != 1e-3 for p in g["params"]}
    assert {g["lr"] for g in opt.param_groups} == {1e-3} | ({1.6e-2} if ratio else set())
    theirs = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=ratio or 1.0)
    b_matrices = {id(p) for g in theirs.param_groups if g["lr"] == 1.6e-2 for p in g["params"]}
    assert fast == (b_matrices if ratio else set()) and len(fast) == (14 if ratio else 0)

    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.manual_seed(0)
    model(input_ids=torch.randint(5, 100, (2, 12)), labels=torch.randint(5, 100, (2, 12))).loss.backward()
    opt.step()
    moved = {n: float((p.detach() - start[n]).abs().max()) for n, p in model.named_parameters() if p.requires_grad}
    assert all(v == 0 for n, v in moved.items() if ".lora_A." in n)
    assert [v for n, v in moved.items() if ".lora_B." in n] == pytest.approx([1e-3 * (ratio or 1.0)] * 14, rel=0.02)


def test_weight_decay_spares_biases_norms_and_ia3_scales(tokenizer):
    """IA3's scales are (d, 1) matrices in storage, but decaying them pulls each towards 0, not its start 1."""
    from tunesmith.config import MethodConfig, TrainConfig
    from tunesmith.models import apply_method
    from tunesmith.models.tiny import tiny_model
    from tunesmith.training.optim import param_groups

    for kind in ("ia3", "lora"):  # rank 1: LoRA's A matrices are (1, d) too, and decayed
        model = apply_method(tiny_model(tokenizer), MethodConfig(kind=kind, lora={"r": 1}))
        trained = [p for p in model.parameters() if p.requires_grad]
        groups = param_groups(model, TrainConfig(weight_decay=0.1))
        decayed = [p for g in groups if g["weight_decay"] for p in g["params"]]
        assert len(decayed) == (0 if kind == "ia3" else len(trained)) and trained


def test_lora_plus_needs_a_lora_method():
    from tunesmith.config import SFTConfig

    with pytest.raises(ValueError, match="lora_plus_ratio.*not method.kind=full"):
        SFTConfig(data={"train": "x.jsonl"}, method={"kind": "full"}, train={"lora_plus_ratio": 16})
    assert SFTConfig(data={"train": "x.jsonl"}, method={"kind": "dora"}, train={"lora_plus_ratio": 16})


def test_a_whole_bfloat16_model_trains_with_it_and_resumes_as_if_never_stopped(tokenizer, tmp_path):
    """`full` on a bfloat16 model: weights and moments stay bfloat16, the loss falls, the run says how its
    updates are stored, and a run that crashed after its step-2 checkpoint resumes to the uninterrupted
    run's losses and weights exactly (the rounding's draws are a function of the seed and the step)."""
    from tunesmith.models.tiny import tiny_model

    cfg = quiet(micro_batch_size=2, max_steps=5, save_every=2, lr=3e-3, precision="bf16")
    data = rows(8)

    def model():
        return tiny_model(tokenizer, seed=0).to(torch.bfloat16)

    whole = model()
    full = RunDir(tmp_path / "full").create()
    fit(whole, data, [], cfg, full, pad_id=0, seed=0)
    ref = full.read_metrics()
    assert ref[-1]["loss"] < ref[0]["loss"] and {p.dtype for p in whole.parameters()} == {torch.bfloat16}
    said = [json.loads(line)["message"] for line in full.events.read_text().splitlines()
            if json.loads(line)["event"] == "precision"]
    assert said and "bfloat16 trainable tensors train in bfloat16" in said[0] and "stochastic" in said[0]

    def crash(step, record):
        if step == 3:
            raise Crash()

    part = RunDir(tmp_path / "part").create()
    with pytest.raises(Crash):
        fit(model(), data, [], cfg, part, pad_id=0, seed=0, on_step=crash)
    assert list_checkpoints(part.checkpoints)[-1].name == "step-2"
    resumed = model()
    fit(resumed, data, [], cfg, part, pad_id=0, seed=0, resume=True)
    assert [r["loss"] for r in part.read_metrics()] == [r["loss"] for r in ref]
    for (n, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n


def test_a_bfloat16_model_holds_8_bytes_a_weight_with_its_gradient_and_moments(tokenizer):
    """The memory the docs claim, counted on the tensors after a step: weight, gradient and both moments
    take 8 bytes a weight in bfloat16 with `BFloat16AdamW`, 16 in float32 with torch's AdamW."""
    from tunesmith.data.packing import collate
    from tunesmith.models.tiny import tiny_model
    from tunesmith.training.loop import causal_lm_loss

    held = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model(tokenizer, seed=0).to(dtype)
        opt = build_optimizer(model, quiet())
        causal_lm_loss(model, collate(rows(2), 0))[0].backward()
        opt.step()
        tensors = [t for p in model.parameters() for t in (p, p.grad, *(
            v for v in opt.state[p].values() if v.dim()))]  # the step counters are 0-d
        held[dtype] = sum(t.numel() * t.element_size() for t in tensors) / sum(p.numel() for p in model.parameters())
    assert held == {torch.float32: 16, torch.bfloat16: 8}


def _slices(seed=0):
    """Weights, moments and gradients in bfloat16: a matrix, a transposed view of one (rows not contiguous)
    and a vector, each with the row-major position its slice starts at."""
    g = torch.Generator().manual_seed(seed)

    def four(*shape, transpose=False):
        w, m, v, grad = (torch.randn(*shape, generator=g) for _ in range(4))
        out = [t.to(torch.bfloat16) for t in (w, m, v.abs(), grad)]
        return [t.T for t in out] if transpose else out
    return [(four(64, 48), 0), (four(70, 33, transpose=True), 1000), (four(5), 7)]


HYPER = torch.tensor([1 - 1e-3 * 0.1, 0.1, 0.999, 0.001, 0.3, 1e-8, 1e-3 / 0.1])


def test_the_compiled_update_is_the_eager_one():
    """What CUDA runs, compiled into one kernel (here by inductor on the CPU: half a minute, so one slice, of
    rows that are not contiguous, from a position past the first), updates weights and moments in place to
    the eager update's bits, draws included."""
    from tunesmith.training import optim

    compiled = torch.compile(optim._bfloat16_update, dynamic=True)
    for tensors, offset in _slices()[1:2]:
        before = [t.clone() for t in tensors]
        twin = [t.clone() for t in tensors]
        optim._bfloat16_update(*tensors, HYPER, (11, 22, 33), offset)
        compiled(*twin, HYPER, (11, 22, 33), offset)
        for a, b, old in zip(tensors[:3], twin[:3], before):
            assert torch.equal(a, b) and not torch.equal(a, old)


def test_a_slice_draws_what_the_whole_tensor_would():
    """The draws are a function of each element's position, not of the order they are made in: slices of a
    few rows give the bits of one update of the whole weight; another step or another tensor draws anew."""
    from tunesmith.training import optim

    tensors, _ = _slices()[1]
    whole = [t.clone() for t in tensors]
    optim._bfloat16_update(*whole, HYPER, (11, 22, 33), 0)
    for n in (1, 7):
        parts = [t.clone() for t in tensors]
        for start in range(0, parts[0].shape[0], n):
            optim._bfloat16_update(*(t[start:start + n] for t in parts), HYPER, (11, 22, 33),
                                   start * parts[0].shape[1])
        assert all(torch.equal(a, b) for a, b in zip(parts[:3], whole[:3]))
    assert len({optim.draw_key(0, step, k) for step in (1, 2) for k in range(6)}) == 12
    values = torch.full((4096,), 1 + 2.0 ** -9)  # a quarter of a unit above 1: rounds up a quarter of the time
    ups = [float((optim.stochastic_round(values, key) > 1).float().mean()) for key in (1, 2)]
    assert ups == [pytest.approx(0.25, abs=0.03)] * 2


def test_a_failed_compile_warns_and_updates_eagerly(monkeypatch):
    """Where the compiler fails on the update, the step warns and updates eagerly, to the same bits, and the
    rest of the run stays eager; any other error propagates."""
    from torch._dynamo.exc import TorchDynamoException

    from tunesmith.training import optim

    def make():
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(16, 8).to(torch.bfloat16))
        p.grad = torch.randn_like(p)
        return p

    def failing(*args):
        raise TorchDynamoException("inductor could not lower an operator")

    expected = make()
    BFloat16AdamW([expected], lr=1e-2).step()
    monkeypatch.setattr(optim, "_UPDATE", {})
    monkeypatch.setattr(optim, "_update_kernel", lambda device: failing)
    p = make()
    with pytest.warns(RuntimeWarning, match="compiling its update failed .*runs eagerly"):
        BFloat16AdamW([p], lr=1e-2).step()
    assert torch.equal(p, expected) and optim._UPDATE["cuda"] is optim._bfloat16_update

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(optim, "_update_kernel", lambda device: out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        BFloat16AdamW([make()], lr=1e-2).step()


def test_shard_owners_balance_the_elements_the_same_way_in_every_process():
    """Largest first, each to the process holding the fewest elements: 4 processes over these sizes hold
    100, 100, 100 and 100 elements; the answer is a function of the sizes alone."""
    from tunesmith.training.optim import shard_owners

    sizes = [60, 40, 50, 50, 30, 70, 20, 80]
    owners = shard_owners(sizes, 4)
    assert owners == shard_owners(list(sizes), 4)
    assert [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(4)] == [100, 100, 100, 100]
    assert shard_owners([5, 5, 5], 2) == [0, 1, 0]


def test_optimizer_shards_follow_the_setting_the_size_and_the_precision(monkeypatch):
    """auto shards a data-parallel run's optimiser from 100M trainable weights; on shards any; off, one
    process, or fp16 (whose loss scale unscales only the optimiser's own weights) shard nothing, and on
    with fp16 is refused."""
    from tunesmith._core import dist
    from tunesmith._core.errors import TunesmithError
    from tunesmith.training.optim import SHARD_FROM, optimizer_shards

    small, large = [torch.zeros(10)], [torch.zeros(1).expand(SHARD_FROM)]  # no memory for its elements
    assert optimizer_shards(quiet(shard_optimizer="on"), small) == 1  # one process
    monkeypatch.setattr(dist, "world_size", lambda: 4)
    assert optimizer_shards(quiet(shard_optimizer="auto"), small) == 1
    assert optimizer_shards(quiet(shard_optimizer="auto"), large) == 4
    assert optimizer_shards(quiet(shard_optimizer="on"), small) == 4
    assert optimizer_shards(quiet(shard_optimizer="off"), large) == 1
    assert optimizer_shards(quiet(shard_optimizer="auto", precision="fp16"), large) == 1
    with pytest.raises(TunesmithError, match="needs precision bf16 or fp32"):
        optimizer_shards(quiet(shard_optimizer="on", precision="fp16"), small)
    assert optimizer_shards(quiet(fsdp=True), large) == 1  # fully sharded: the optimiser steps shards already


def test_a_share_of_the_tensors_draws_what_the_whole_optimiser_would():
    """A sharded BFloat16AdamW holds some of the tensors; given their places among all of them, its
    stochastic rounding draws what the optimiser over all of them draws, bit for bit (without the places
    a tensor would take another's draws)."""
    g = torch.Generator().manual_seed(0)
    whole = [torch.nn.Parameter(torch.randn(64, 32, generator=g).bfloat16()) for _ in range(3)]
    grads = [torch.randn(64, 32, generator=g).bfloat16() for _ in range(3)]

    def stepped(params, **kw):  # the last len(params) tensors' gradients
        opt = BFloat16AdamW(params, lr=1e-3, seed=7, **kw)
        for _ in range(3):
            for p, gr in zip(params, grads[-len(params):]):
                p.grad = gr.clone()
            opt.step()
        return params

    start = [p.detach().clone() for p in whole]
    stepped(whole)
    mine = [torch.nn.Parameter(start[2].clone())]
    stepped(mine, places={id(mine[0]): 2})
    assert torch.equal(mine[0], whole[2])
    alone = [torch.nn.Parameter(start[2].clone())]
    stepped(alone)
    assert not torch.equal(alone[0], whole[2])
