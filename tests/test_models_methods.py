"""Which weights each method trains, and that gradients reach exactly those (PEFT-style contract tests)."""
from __future__ import annotations

import json

import pytest
import torch

from tunesmith._core.errors import TunesmithError
from tunesmith.config import MethodConfig, ModelConfig
from tunesmith.models import apply_method, count_parameters, describe_trainable, load_model_and_tokenizer
from tunesmith.models.methods import is_quantised

TINY_TOTAL = 205_120  # see test_models_tiny.test_tiny_model_shape_and_size
# (in, out) of every linear layer in one tiny block: hidden 64, 2 KV heads of 16, MLP 128
TINY_LINEARS = {
    "q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
    "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64),
}


def _load(method: str = "full", seed: int = 0):
    return load_model_and_tokenizer(ModelConfig(name="tiny"), method=method, seed=seed)


def _batch(tok):
    return tok(["The date is 2021-03-04.", '{"name": "Bob"}'], return_tensors="pt", padding=True)


def _backward(model, tok) -> set[str]:
    batch = _batch(tok)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _tie(model) -> None:
    """Make the tiny model tied like SmolLM2, to test that freeze unties it."""
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_full_trains_everything():
    model, tok = _load()
    model = apply_method(model, MethodConfig(kind="full"))
    names = {n for n, _ in model.named_parameters()}
    assert _trainable(model) == names
    assert _backward(model, tok) == names
    assert count_parameters(model) == (TINY_TOTAL, TINY_TOTAL)
    assert describe_trainable(model) == "trainable 205,120 of 205,120 parameters (100.00%)"


def test_freeze_last_layer_norm_and_head_unties_embeddings():
    model, tok = _load()
    _tie(model)
    embed_before = model.model.embed_tokens.weight.detach().clone()
    model = apply_method(model, MethodConfig(kind="freeze", freeze={"train_last_n_layers": 1}))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, embed_before)  # the head starts from the tied values
    expected = {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")}
    expected |= {"model.norm.weight", "lm_head.weight"}
    assert _trainable(model) == expected
    assert _backward(model, tok) == expected
    block = sum(p.numel() for p in model.model.layers[1].parameters())
    assert count_parameters(model) == (block + 64 + 1024 * 64, TINY_TOTAL)


def test_freeze_head_only():
    model, tok = _load()
    freeze = {"train_last_n_layers": 0, "train_norm": False, "train_lm_head": True}
    model = apply_method(model, MethodConfig(kind="freeze", freeze=freeze))
    assert _trainable(model) == {"lm_head.weight"}
    assert _backward(model, tok) == {"lm_head.weight"}


def test_freeze_blocks_only_keeps_tied_head_tied():
    model, _ = _load()
    _tie(model)
    model = apply_method(model, MethodConfig(kind="freeze", freeze={"train_last_n_layers": 2, "train_lm_head": False}))
    assert model.lm_head.weight is model.model.embed_tokens.weight and not model.lm_head.weight.requires_grad


def test_freeze_errors_name_the_setting():
    model, _ = _load()
    with pytest.raises(TunesmithError, match="trains nothing"):
        apply_method(model, MethodConfig(kind="freeze", freeze={"train_last_n_layers": 0, "train_norm": False,
                                                                  "train_lm_head": False}))
    with pytest.raises(TunesmithError, match="train_last_n_layers=3"):
        apply_method(model, MethodConfig(kind="freeze", freeze={"train_last_n_layers": 3}))


def _lora_count(r: int, modules: list[str], n_layers: int = 2) -> int:
    return n_layers * sum(r * (TINY_LINEARS[m][0] + TINY_LINEARS[m][1]) for m in modules)


@pytest.mark.parametrize(
    ("target_modules", "modules"),
    [("all-linear", list(TINY_LINEARS)), (["q_proj", "v_proj"], ["q_proj", "v_proj"])],
)
def test_lora_trains_only_adapters_and_starts_at_the_base(target_modules, modules):
    model, tok = _load()
    batch = _batch(tok)
    with torch.no_grad():
        base_logits = model(**batch).logits
    peft_model = apply_method(model, MethodConfig(kind="lora", lora={"r": 8, "target_modules": target_modules}))
    trainable = _trainable(peft_model)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == set(modules)
    assert _backward(peft_model, tok) == trainable
    expected = _lora_count(8, modules)
    assert count_parameters(peft_model) == (expected, TINY_TOTAL + expected)
    with torch.no_grad():  # B = 0 at init: exactly the base function
        assert torch.equal(peft_model(**batch).logits, base_logits)


def test_rslora_scales_by_alpha_over_the_root_of_the_rank_as_peft_does():
    """method.lora.rslora: every adapted layer's scale is alpha / sqrt(r) (16 / sqrt(4) = 8, where plain LoRA
    has 16 / 4 = 4), and with the same adapter weights the model computes what PEFT's own `use_rslora`
    model does, a function unlike plain LoRA's."""
    from peft import LoraConfig, get_peft_model

    settings = {"r": 4, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    ours = apply_method(_load()[0], MethodConfig(kind="lora", lora={**settings, "rslora": True}))
    plain = apply_method(_load()[0], MethodConfig(kind="lora", lora=settings))
    theirs = get_peft_model(_load()[0], LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                   use_rslora=True, task_type="CAUSAL_LM"))
    assert {m.scaling["default"] for m in ours.modules() if hasattr(m, "lora_A")} == {8.0}
    assert {m.scaling["default"] for m in plain.modules() if hasattr(m, "lora_A")} == {4.0}
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(p.shape, generator=g) for n, p in ours.named_parameters() if p.requires_grad}
    for model in (ours, plain, theirs):
        assert not model.load_state_dict(weights, strict=False).unexpected_keys
    batch = _batch(_load()[1])
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=0, atol=0)
        assert not torch.allclose(ours(**batch).logits, plain(**batch).logits, atol=1e-3)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_start_at_the_base_from_its_own_directions(init):
    """method.lora.init pissa / olora: the adapter starts non-zero, from the weight's own directions (PiSSA:
    s B0 A0 is the weight's best rank-r approximation, its top r singular values and no others), and the
    base keeps the residual, so the model computes what the base did. The randomised SVD does not depend on
    the global RNG: two processes, or a resumed run, take the same residual base."""
    model, tok = _load()
    batch = _batch(tok)
    weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    with torch.no_grad():
        base_logits = model(**batch).logits
    method = MethodConfig(kind="lora", lora={"r": 4, "alpha": 8, "init": init, "init_svd_iters": 0})
    adapted = apply_method(model, method)
    with torch.no_grad():
        torch.testing.assert_close(adapted(**batch).logits, base_logits, rtol=0, atol=1e-5)
    layer = adapted.base_model.model.model.layers[0].self_attn.q_proj
    update = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    assert update.abs().max() > 0.3 * weight.abs().max() and _trainable(adapted) == _backward(adapted, tok)
    torch.testing.assert_close(layer.base_layer.weight + update, weight, rtol=0, atol=1e-5)
    if init == "pissa":
        top = torch.linalg.svdvals(weight)
        torch.testing.assert_close(torch.linalg.svdvals(update)[:4], top[:4], rtol=1e-4, atol=1e-5)
        assert torch.linalg.matrix_rank(update) == 4
    fast = MethodConfig(kind="lora", lora={"r": 4, "alpha": 8, "init": init})
    residuals = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        residuals.append(apply_method(_load()[0], fast).base_model.model.model.layers[0].self_attn.q_proj
                         .base_layer.weight.detach())
    assert torch.equal(*residuals)


@pytest.mark.parametrize("init,rslora", [("pissa", False), ("olora", False), ("pissa", True)])
def test_a_pissa_or_olora_adapter_is_saved_as_plain_lora_for_the_original_base(tmp_path, init, rslora):
    """Trained from the residual base, the adapter is saved as plain LoRA of rank 2r whose update
    s (B A - B0 A0) goes on the original base: PEFT loads final/ onto a fresh base (not the residual one)
    and computes what the trained model computes. tunesmith's own loader does too."""
    from peft import PeftModel

    from tunesmith.models.export import save_final

    model, tok = _load()
    adapted = apply_method(model, MethodConfig(kind="lora", lora={"r": 4, "alpha": 8, "init": init,
                                                                  "rslora": rslora}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a stand-in for training: every adapter weight moves
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    batch = _batch(tok)
    with torch.no_grad():
        trained = adapted(**batch).logits
    save_final(adapted, tok, tmp_path / "final", base_model="tiny", method="lora")
    config = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    assert config["lora_alpha"] == pytest.approx(8 * (2 ** 0.5 if rslora else 2))
    theirs = PeftModel.from_pretrained(_load()[0], tmp_path / "final")
    ours, _ = load_model_and_tokenizer(ModelConfig(name=str(tmp_path / "final")))
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, trained, rtol=0, atol=1e-4)
        torch.testing.assert_close(ours(**batch).logits, trained, rtol=0, atol=1e-4)
        assert not torch.allclose(_load()[0](**batch).logits, trained, atol=1e-2)


def test_pissa_and_olora_refuse_what_they_do_not_fit():
    """Not on another adapter (its base must stay as it is), nor with DoRA, a quantised or an FP8 base."""
    stacked = apply_method(_load()[0], MethodConfig(kind="lora", lora={"r": 4}))
    with pytest.raises(TunesmithError, match="init=pissa needs a plain base model"):
        apply_method(stacked, MethodConfig(kind="lora", lora={"r": 4, "init": "pissa"}))
    for bad, named in [({"kind": "dora", "lora": {"init": "pissa"}}, "applies to method lora, not dora"),
                       ({"kind": "qlora", "lora": {"init": "olora"}}, "applies to method lora, not qlora"),
                       ({"kind": "lora", "lora": {"init": "pissa", "fp8_base": True}}, "fp8_base")]:
        with pytest.raises(ValueError, match=named):
            MethodConfig(**bad)


def test_dora_adds_magnitudes_and_starts_at_the_base():
    model, tok = _load()
    batch = _batch(tok)
    with torch.no_grad():
        base_logits = model(**batch).logits
    peft_model = apply_method(model, MethodConfig(kind="dora", lora={"r": 4}))
    trainable = _trainable(peft_model)
    assert any("lora_magnitude_vector" in n for n in trainable)
    assert _backward(peft_model, tok) == trainable
    expected = _lora_count(4, list(TINY_LINEARS)) + 2 * sum(out for _, out in TINY_LINEARS.values())
    assert count_parameters(peft_model) == (expected, TINY_TOTAL + expected)
    with torch.no_grad():  # W * m / ||W|| with m = ||W||: the base up to rounding
        torch.testing.assert_close(peft_model(**batch).logits, base_logits, atol=1e-5, rtol=0)


def test_qlora_quantises_the_base_and_trains_only_adapters():
    import bitsandbytes as bnb

    model, tok = _load("qlora")
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert is_quantised(model)
    assert count_parameters(model)[1] == TINY_TOTAL  # packed 4-bit weights counted at their real size
    peft_model = apply_method(model, MethodConfig(kind="qlora", lora={"r": 8}))
    trainable = _trainable(peft_model)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert _backward(peft_model, tok) == trainable
    expected = _lora_count(8, list(TINY_LINEARS))
    assert count_parameters(peft_model) == (expected, TINY_TOTAL + expected)


def test_method_and_quantisation_must_agree():
    model, _ = _load()
    with pytest.raises(TunesmithError, match="qlora"):
        apply_method(model, MethodConfig(kind="qlora"))
    quantised, _ = _load("qlora")
    with pytest.raises(TunesmithError, match="cannot train a quantised model"):
        apply_method(quantised, MethodConfig(kind="full"))
