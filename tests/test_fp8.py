"""FP8 frozen base weights under LoRA (`method.lora.fp8_base`): the FP8 product against a hand-built
reference, the input gradient, and a LoRA run on FP8 bases against the same run on full-precision ones."""
import json

import pytest
import torch

from test_speed import assert_grads_close, grouped_lora_model, loss_and_grads, packed_rows, quiet, sft_rows, tiny
from tunesmith._core.errors import TunesmithError
from tunesmith._core.rundir import RunDir
from tunesmith.config import LoraConfig, MethodConfig
from tunesmith.models import apply_method
from tunesmith.data.packing import collate
from tunesmith.models import fused
from tunesmith.models.fp8 import E4M3, FP8Linear, _FP8Matmul, has_fp8, quantise_rows, to_fp8_bases
from tunesmith.models.methods import is_mergeable
from tunesmith.models.tiny import tiny_model
from tunesmith.training import fit
from tunesmith.training.loop import causal_lm_loss


def test_rows_quantise_to_e4m3_within_its_rounding():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(8, 32, generator=g) * torch.logspace(-3, 3, 8)[:, None]  # rows of very different scale
    values, scale = quantise_rows(t)
    assert values.dtype == E4M3 and scale.shape == (8, 1)
    assert torch.equal(values.float().abs().amax(1), torch.full((8,), 448.0))  # each row's largest maps to 448
    back = values.float() * scale
    # e4m3 keeps 3 mantissa bits: a normal value rounds within 2^-4 of itself
    normal = t.abs() >= scale * 2**-6
    assert ((back - t).abs() <= t.abs() * 2**-4 + 1e-30)[normal].all()
    half = torch.zeros(2, 32, dtype=torch.float16)  # a row of zeros; a row float16 cannot scale down to 448
    half[1, 0] = 1e-6
    values, scale = quantise_rows(half)
    assert not values.float().isnan().any() and values[0].float().abs().max() == 0 and (scale > 0).all()


def test_fp8_linear_and_its_input_gradient_are_products_of_the_quantised_operands():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    layer = FP8Linear(linear)
    assert not hasattr(layer, "weight") and not list(layer.parameters(recurse=False))[0].requires_grad
    assert layer.weight8.dtype == E4M3 and layer.weight8.element_size() == 1
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = layer(x)
    xq, xs = quantise_rows(x.detach().reshape(-1, 64))
    want = (xq.float() * xs) @ (layer.weight8.float() * layer.scale[:, None]).T + linear.bias.detach()
    torch.testing.assert_close(y.detach().reshape(-1, 48), want, rtol=1e-5, atol=1e-5)
    assert float((y - linear(x)).detach().norm() / linear(x).detach().norm()) < 0.06  # and near the full-precision layer
    g = torch.randn_like(y)
    y.backward(g)
    # an FP8 product too: the weight's row scales folded into g's columns, g quantised per row
    gq, gs = quantise_rows(g.reshape(-1, 48) * layer.scale)
    want = ((gq.float() * gs) @ layer.weight8.float()).view(3, 5, 64)
    torch.testing.assert_close(x.grad, want, rtol=1e-5, atol=1e-5)
    full = g.reshape(-1, 48) @ linear.weight.detach()
    assert float((x.grad.reshape(-1, 64) - full).norm() / full.norm()) < 0.08  # near the full-precision gradient
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    weight8, scale = layer.weight8.clone(), layer.scale.clone()
    layer.to(torch.bfloat16)  # a dtype cast of the model leaves the FP8 storage alone
    assert torch.equal(layer.weight8.view(torch.uint8), weight8.view(torch.uint8)) and torch.equal(layer.scale, scale)
    assert layer.bias.dtype == torch.bfloat16 and layer.dequantised().dtype == torch.bfloat16


def lora(fp8: bool) -> MethodConfig:
    return MethodConfig(kind="lora", lora=LoraConfig(r=4, alpha=8, fp8_base=fp8))


def test_lora_on_fp8_bases_starts_near_and_trains_like_the_full_precision_run(tokenizer, tmp_path):
    runs = []
    for fp8 in (False, True):
        torch.manual_seed(0)
        model = apply_method(tiny_model(tokenizer), lora(fp8))
        run = RunDir(tmp_path / str(fp8)).create()
        fit(model, sft_rows(), [], quiet(max_steps=12, lr=5e-2, grad_accum=1, micro_batch_size=8), run, pad_id=0,
            seed=0)
        runs.append((model, [m["loss"] for m in run.read_metrics()]))
    (plain, plain_losses), (model, losses) = runs
    assert has_fp8(model) and not has_fp8(plain)
    assert sum(isinstance(m, FP8Linear) for m in model.modules()) == 14  # the 7 projections of 2 blocks
    trainable = lambda m: {n for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert trainable(model) == trainable(plain)
    assert losses[0] == pytest.approx(plain_losses[0], rel=1e-2)  # the step-1 gate
    assert losses[-1] < losses[0] - 0.1  # it learns (the same batch every step)
    assert losses == pytest.approx(plain_losses, rel=1e-2)  # and the way the full-precision run does
    assert not is_mergeable(model)  # merging would write into weights that are not there


def test_fp8_base_is_for_lora_only_and_halves_the_base_weights(tokenizer):
    from tunesmith.models import speed

    with pytest.raises(ValueError, match="fp8_base applies to method lora, not dora"):
        MethodConfig(kind="dora", lora=LoraConfig(fp8_base=True))
    with pytest.raises(TunesmithError, match="fp8_base needs a plain base model"):
        apply_method(apply_method(tiny_model(tokenizer), lora(False)), lora(True))
    plain = apply_method(tiny_model(tokenizer), lora(False))
    fp8 = apply_method(tiny_model(tokenizer), lora(True))
    base_bytes = lambda m: sum(x.numel() * x.element_size() for n, x in  # noqa: E731
                               list(m.named_parameters()) + list(m.named_buffers()) if "base_layer" in n)
    assert base_bytes(fp8) < 0.3 * base_bytes(plain)  # float32 weights here: a quarter, plus the row scales
    budget = lambda m: speed.CheckpointBudget(m, 1.0).fixed  # noqa: E731
    assert budget(fp8) < budget(plain) and budget(fp8) > sum(p.numel() * 16 for p in fp8.parameters()
                                                               if p.requires_grad)


def test_fp8_base_on_a_gpu_without_fp8_matmuls_is_refused_before_the_model_changes(tokenizer, monkeypatch):
    """An A100 (compute capability 8.0) has no FP8 matmuls: the error names the GPU and the setting, before the
    model gets its adapters; an H100 (9.0) passes the check."""
    from tunesmith.models import fp8

    capability = [(8, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(TunesmithError, match=r"compute capability 8.9.*A100-SXM4-80GB is 8.0.*fp8_base false"):
        fp8.check_device(torch.device("cuda"))
    check = fp8.check_device
    monkeypatch.setattr(fp8, "check_device", lambda device: check(torch.device("cuda")))  # as if on that GPU
    model = tiny_model(tokenizer)
    with pytest.raises(TunesmithError, match="fp8_base"):
        apply_method(model, MethodConfig(kind="lora", lora=LoraConfig(r=4, fp8_base=True)))
    assert not hasattr(model, "peft_config") and not any("lora_" in n for n, _ in model.named_parameters())
    capability[0] = (9, 0)
    assert has_fp8(apply_method(model, MethodConfig(kind="lora", lora=LoraConfig(r=4, fp8_base=True))))


def test_an_fp8_run_saves_a_plain_lora_adapter(tokenizer, tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    model = apply_method(tiny_model(tokenizer), lora(True))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA"
    reloaded = PeftModel.from_pretrained(tiny_model(tokenizer), tmp_path).eval()
    ids = torch.tensor([[5, 17, 99, 4, 250, 31]])
    with torch.no_grad():
        a, b = model.eval()(ids).logits, reloaded(ids).logits
    assert float((a - b).norm() / b.norm()) < 0.05  # the same adapter, on the full-precision base


def test_fused_and_grouped_lora_over_fp8_bases_equal_peft_over_fp8_layers(tokenizer, monkeypatch):
    """`train.kernels` over FP8 bases: the fused layers run each base product in FP8, quantising the input
    once per group (q/k/v, gate/up) or layer; loss and every gradient (the input gradient through the
    FP8 weights included) equal PEFT's forward over `FP8Linear`."""
    model = grouped_lora_model(tiny(tokenizer), "all-linear").train()
    assert to_fp8_bases(model) == 14
    batch = collate(packed_rows(), 0)
    ref_loss, _, ref_g = loss_and_grads(model, causal_lm_loss, batch)
    calls = {"quantise": 0, "peft": 0}
    real_q, real_mm = fused.quantise_rows, _FP8Matmul.apply
    monkeypatch.setattr(fused, "quantise_rows", lambda t: calls.__setitem__("quantise", calls["quantise"] + 1) or real_q(t))
    monkeypatch.setattr(_FP8Matmul, "apply", lambda *a: calls.__setitem__("peft", calls["peft"] + 1) or real_mm(*a))
    fused.fuse_lora(model)
    groups = {id(m._tunesmith_group) for m in fused.lora_layers(model) if "_tunesmith_group" in m.__dict__}
    loss, _, grads = loss_and_grads(model, causal_lm_loss, batch)
    fused.unfuse_lora(model)
    assert len(groups) == 4 and calls == {"quantise": 2 * (2 + 2), "peft": 0}  # per block: 2 groups, o and down
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert_grads_close(grads, ref_g, rel=1e-5)
