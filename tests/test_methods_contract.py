"""The contract every method joins, on the tiny model (PEFT-style matrix):

- only the method's own parameters receive gradients, through the real training loss;
- an adapter starts as the base model where the method says it does, and switched off it is the base;
- save_final then load gives identical outputs;
- merged equals unmerged where the method is mergeable, and a clear refusal where it is not;
- padded rows equal the same examples alone (no leakage through virtual tokens or adapters), and the
  cached decode loop gives what a cache-free forward gives.
"""
from __future__ import annotations

import pytest
import torch

from tunesmith._core.errors import TunesmithError
from tunesmith.config import MethodConfig, ModelConfig
from tunesmith.data.packing import Example, collate, shift_labels
from tunesmith.models import apply_method, load_model_and_tokenizer, merge_adapter, save_final
from tunesmith.models.generate import generate
from tunesmith.models.methods import count_parameters, is_mergeable, is_quantised
from tunesmith.training.loop import causal_lm_loss

# name -> (method settings, which parameter names train, mergeable, starts equal to the base)
METHODS: dict[str, tuple[dict, str, bool, bool]] = {
    "full": ({"kind": "full"}, "", False, True),
    "freeze": ({"kind": "freeze", "freeze": {"train_last_n_layers": 1}}, "layers.1.|lm_head|model.norm", False, True),
    "head-only": ({"kind": "freeze", "freeze": {"train_last_n_layers": 0, "train_norm": False}}, "lm_head",
                  False, True),
    "lora": ({"kind": "lora", "lora": {"r": 4}}, "lora_", True, True),
    "lora-rslora": ({"kind": "lora", "lora": {"r": 4, "rslora": True}}, "lora_", True, True),
    "dora": ({"kind": "dora", "lora": {"r": 4}}, "lora_", True, True),
    "qlora": ({"kind": "qlora", "lora": {"r": 4}}, "lora_", False, True),
    "qlora-fp4": ({"kind": "qlora", "lora": {"r": 4},
                   "quant": {"type": "fp4", "double_quant": False, "compute_dtype": "float32"}}, "lora_", False, True),
    "qlora-8bit": ({"kind": "qlora", "lora": {"r": 4}, "quant": {"bits": 8}}, "lora_", False, True),
    "ia3": ({"kind": "ia3"}, "ia3_l", True, True),
    "prefix": ({"kind": "prefix", "prefix": {"num_virtual_tokens": 4}}, "prompt_encoder", False, False),
    "prefix-mlp": ({"kind": "prefix", "prefix": {"num_virtual_tokens": 4, "projection": True,
                                                 "projection_size": 32}}, "prompt_encoder", False, False),
    "prompt": ({"kind": "prompt", "prompt": {"num_virtual_tokens": 4, "init_text": "The date is"}},
               "prompt_encoder", False, False),
    "bottleneck": ({"kind": "bottleneck", "bottleneck": {"size": 8}}, ".adapter.", False, True),
    "bottleneck-mlp": ({"kind": "bottleneck", "bottleneck": {"size": 8, "after": ["mlp"], "activation": "gelu"}},
                       "mlp.adapter.", False, True),
}
ADAPTERS = [n for n, (m, *_) in METHODS.items() if m["kind"] not in ("full", "freeze")]
TEXTS = ["The date is 2021-03-04.", '{"name": "Bob", "age": 41}', "ok"]


@pytest.fixture(autouse=True)
def _seeded():
    """PEFT draws LoRA's A (and more) from torch's global generator: every test starts from the same state,
    so a tolerance checked once holds in any test order."""
    torch.manual_seed(0)


def _method(name: str) -> MethodConfig:
    return MethodConfig(**METHODS[name][0])


def _base(name: str, seed: int = 2):
    m = _method(name)
    return load_model_and_tokenizer(ModelConfig(name="tiny"), method=m.kind, seed=seed, quant=m.quant)


def _perturb(model, seed: int = 1) -> None:
    """Move trained weights off their init (LoRA's B = 0, IA3's ones), so equalities mean something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p.dtype))


def _rows(tok) -> list[list[Example]]:
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    return [[shift_labels(i, i)] for i in ids]


def _logits(model, tok) -> torch.Tensor:
    """Logits of the padded batch (right padding, attention mask) at real positions, as one flat tensor."""
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
    return logits[batch["attention_mask"].bool()]


def _adapted(name: str, tok_seed: int = 2):
    model, tok = _base(name, tok_seed)
    model = apply_method(model, _method(name), tok)
    _perturb(model)
    return model, tok


@pytest.mark.parametrize("name", list(METHODS))
def test_only_the_method_parameters_get_gradients(name):
    model, tok = _adapted(name)  # perturbed: at init LoRA's A gets no gradient (B = 0)
    pattern = METHODS[name][1]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(any(part in n for part in pattern.split("|")) for n in trainable), sorted(trainable)[:5]
    loss, count = causal_lm_loss(model, collate(_rows(tok), tok.pad_token_id))
    (loss / count).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == trainable, sorted(trainable ^ with_grad)[:5]
    n_trainable, _ = count_parameters(model)
    assert n_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapter_switched_off_is_the_base_and_starts_there_where_it_should(name):
    base, tok = _base(name)
    expected = _logits(base, tok)
    model = apply_method(base, _method(name), tok)
    start = _logits(model, tok)
    assert torch.allclose(start, expected, atol=1e-5) == METHODS[name][3]
    _perturb(model)
    assert not torch.allclose(_logits(model, tok), expected, atol=1e-3)
    with model.disable_adapter():
        assert torch.allclose(_logits(model, tok), expected, atol=1e-5)
    assert not torch.allclose(_logits(model, tok), expected, atol=1e-3)  # and back on after


@pytest.mark.parametrize("name", ADAPTERS + ["full", "freeze"])
def test_save_then_load_gives_identical_outputs(tmp_path, name):
    model, tok = _adapted(name)
    expected = _logits(model, tok)
    m = _method(name)
    save_final(model, tok, tmp_path / "final", base_model="tiny", method=m.kind, quant=m.quant)
    loaded, loaded_tok = load_model_and_tokenizer(ModelConfig(name=str(tmp_path / "final")), for_training=False)
    assert is_quantised(loaded) == (m.kind == "qlora")
    assert torch.equal(_logits(loaded, loaded_tok), expected)


@pytest.mark.parametrize("name", [n for n in ADAPTERS if METHODS[n][2]])
def test_merged_equals_unmerged(tmp_path, name):
    model, tok = _adapted(name)
    expected = _logits(model, tok)
    assert is_mergeable(model)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    # float32 rounding of W + s·BA against W·x + s·B(A·x): rsLoRA's doubled scale reaches 1.4e-5
    torch.testing.assert_close(_logits(merged, tok), expected, atol=3e-5, rtol=1e-5)


def _lora_updates(model) -> dict[str, torch.Tensor]:
    """Each adapted linear layer's summed update s·B·A over its active LoRA adapters, by the layer's name in
    the transformers model (model.layers.0.self_attn.q_proj, ...)."""
    from peft.tuners.lora import LoraLayer

    updates = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            key = name[name.index("model.layers"):]
            updates[key] = sum(m.scaling[a] * m.lora_B[a].weight.float() @ m.lora_A[a].weight.float()
                               for a in m.active_adapters if a in m.lora_A)
    return updates


def _assert_merged_into_the_unquantised_base(merged, quantised_model) -> None:
    """Every merged weight is the full-precision `tiny` base weight plus the adapters' update, exactly (the
    4/8-bit weights are not what gets merged)."""
    base, _ = load_model_and_tokenizer(ModelConfig(name="tiny"), seed=2)
    updates = _lora_updates(quantised_model)
    assert updates and not is_quantised(merged)
    for key, update in updates.items():
        want = base.get_submodule(key).weight + update
        torch.testing.assert_close(merged.get_submodule(key).weight, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["qlora", "qlora-8bit"])
def test_a_quantised_adapter_merges_into_the_unquantised_base(tmp_path, name):
    """`tunesmith merge` folds a qlora adapter into the full-precision base, not into its 4/8-bit copy."""
    model, tok = _adapted(name)
    m = _method(name)
    save_final(model, tok, tmp_path / "final", base_model="tiny", method="qlora", quant=m.quant)
    merged, _ = load_model_and_tokenizer(ModelConfig(name=str(merge_adapter(tmp_path / "final", tmp_path / "m"))))
    _assert_merged_into_the_unquantised_base(merged, model)


@pytest.mark.parametrize("name", ["prefix", "prompt", "bottleneck"])
def test_unmergeable_adapters_are_refused_by_merge_and_kept_by_load(tmp_path, name):
    model, tok = _adapted(name)
    assert not is_mergeable(model)
    save_final(model, tok, tmp_path / "final", base_model="tiny", method=_method(name).kind)
    with pytest.raises(TunesmithError, match=f"a {name} adapter is no weight update"):
        merge_adapter(tmp_path / "final", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("name", ["ia3", "prefix", "prompt", "bottleneck"])
def test_padded_rows_equal_each_example_alone(name):
    model, tok = _adapted(name)
    rows = _rows(tok)
    together, count = causal_lm_loss(model, collate(rows, tok.pad_token_id))
    alone = sum(causal_lm_loss(model, collate([r], tok.pad_token_id))[0] for r in rows)
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", ["prefix", "prompt", "bottleneck"])
def test_cached_generation_equals_a_cache_free_greedy_loop(name):
    model, tok = _adapted(name)
    model.eval()
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:2]]
    stop = tok.eos_token_id
    got = generate(model, tok, prompts, stop_ids=[stop], max_new_tokens=6)
    for prompt, g in zip(prompts, got):
        ids = list(prompt)
        with torch.no_grad():
            while len(ids) < len(prompt) + 6 and (len(ids) == len(prompt) or ids[-1] != stop):
                ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
        assert g.token_ids + ([stop] if g.finished else []) == ids[len(prompt):]


def test_virtual_tokens_refuse_packed_rows_and_reward_heads():
    from tunesmith.config import config_from_dict

    base = {"recipe": "sft", "model": {"name": "tiny"}, "data": {"train": "x.jsonl"}}
    with pytest.raises(TunesmithError, match="data.packing=false"):
        config_from_dict({**base, "method": {"kind": "prefix"}, "data": {"train": "x.jsonl", "packing": True}})
    with pytest.raises(TunesmithError, match="train.attention"):
        config_from_dict({**base, "method": {"kind": "prompt"}, "train": {"attention": "varlen"}})
    for recipe in ("dpo", "grpo", "ppo"):  # flat rows in every language-model recipe
        raw = {"recipe": recipe, "model": {"name": "tiny"}, "method": {"kind": "prefix"},
               "train": {"attention": "varlen"}, "data": {"train": "x.jsonl"}}
        with pytest.raises(TunesmithError, match="virtual tokens before each example.*train.attention"):
            config_from_dict(raw)
    with pytest.raises(TunesmithError, match="does not fit a new head on the input.s last token"):
        config_from_dict({"recipe": "reward", "model": {"name": "tiny"}, "method": {"kind": "prompt"},
                          "data": {"train": "x.jsonl"}})


def test_quant_options_apply_to_four_bits_only():
    from tunesmith.config import config_from_dict

    with pytest.raises(TunesmithError, match="apply to bits 4 only"):
        config_from_dict({"recipe": "sft", "method": {"kind": "qlora", "quant": {"bits": 8, "type": "fp4"}},
                          "data": {"train": "x.jsonl"}})


def test_quant_settings_reach_bitsandbytes():
    import bitsandbytes as bnb

    model, _ = _base("qlora-fp4")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    state = layer.weight.quant_state
    assert state.quant_type == "fp4" and not state.nested and layer.compute_dtype == torch.float32
    model, _ = _base("qlora")
    state = model.model.layers[0].self_attn.q_proj.weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # double quantisation: the scales are quantised too
    model, _ = _base("qlora-8bit")
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.int8


@pytest.mark.parametrize("kind", ["ia3", "bottleneck"])
def test_adapters_on_a_scoring_head_train_with_it_and_reload(tmp_path, kind):
    """A classifier (or reward model) with an adapter body: adapters and the new head get gradients, the
    adapter switched off leaves the head on the base body, and final/ reloads to identical logits."""
    from tunesmith.data.packing import collate
    from tunesmith.models.reward import sequence_logits, to_sequence_classifier

    lm, tok = load_model_and_tokenizer(ModelConfig(name="tiny"), seed=2)
    labels = ["a", "b", "c"]
    model = apply_method(to_sequence_classifier(lm, labels), MethodConfig(kind=kind), tok)
    _perturb(model)
    batch = collate(_rows(tok), tok.pad_token_id)
    sequence_logits(model, batch).square().sum().backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trained
    assert any("score" in n for n in trained) and any(("ia3_l" in n or ".adapter." in n) for n in trained)
    model.eval()
    with torch.no_grad():
        expected = sequence_logits(model, batch)
        with model.disable_adapter():
            off = sequence_logits(model, batch)
    assert not torch.allclose(off, expected, atol=1e-4)
    save_final(model, tok, tmp_path / "final", base_model="tiny", method=kind, head="classify", labels=labels)
    loaded, _ = load_model_and_tokenizer(ModelConfig(name=str(tmp_path / "final")), for_training=False)
    with torch.no_grad():
        assert torch.equal(sequence_logits(loaded, batch), expected)


def test_a_merged_classifier_adapter_stays_a_classifier(tmp_path):
    from tunesmith.data.packing import collate
    from tunesmith.models.reward import sequence_logits, to_sequence_classifier

    lm, tok = load_model_and_tokenizer(ModelConfig(name="tiny"), seed=2)
    model = apply_method(to_sequence_classifier(lm, ["x", "y"]), MethodConfig(kind="lora", lora={"r": 4}), tok)
    _perturb(model)
    batch = collate(_rows(tok), tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        expected = sequence_logits(model, batch)
    save_final(model, tok, tmp_path / "final", base_model="tiny", method="lora", head="classify", labels=["x", "y"])
    merged, _ = load_model_and_tokenizer(ModelConfig(name=str(merge_adapter(tmp_path / "final", tmp_path / "m"))),
                                         for_training=False)
    assert merged.config.id2label == {0: "x", 1: "y"}
    with torch.no_grad():
        torch.testing.assert_close(sequence_logits(merged, batch), expected, atol=1e-5, rtol=1e-5)


def test_a_soft_prompt_starts_at_its_init_texts_embeddings():
    base, tok = _base("prompt")
    model = apply_method(base, _method("prompt"), tok)  # 4 virtual tokens from "The date is"
    ids = tok("The date is", add_special_tokens=False)["input_ids"]
    want = model.word_embeddings.weight[torch.tensor((ids * 4)[:4])]
    assert torch.equal(model.prompt_encoder["default"].embedding.weight, want)
    with pytest.raises(TunesmithError, match="needs the tokenizer"):
        apply_method(_base("prompt")[0], _method("prompt"))


# --- stacking: a new adapter on top of a frozen adapter model (models.stack) ------------------------------

# (below, top): the first adapter trained on the base, then a second one stacked on top of it
STACKS = [("lora", "lora"), ("lora", "ia3"), ("dora", "lora"), ("ia3", "lora"), ("prefix", "lora"),
          ("prompt", "bottleneck"), ("bottleneck", "lora"), ("bottleneck", "bottleneck"), ("qlora", "qlora")]
STACK_IDS = [f"{b}+{t}" for b, t in STACKS]


def _stack(tmp_path, below: str, top: str):
    """(stacked model, tokenizer, below's run directory): `below` trained (perturbed) and saved as a run,
    reloaded to stack on as training does, then `top` applied."""
    model, tok = _adapted(below)
    m = _method(below)
    save_final(model, tok, tmp_path / "below" / "final", base_model="tiny", method=m.kind, quant=m.quant)
    start, tok = load_model_and_tokenizer(ModelConfig(name=str(tmp_path / "below"), adapter="stack"))
    assert not any(p.requires_grad for p in start.parameters())
    return apply_method(start, _method(top), tok), tok, tmp_path / "below"


@pytest.mark.parametrize(("below", "top"), STACKS, ids=STACK_IDS)
def test_a_stacked_adapter_starts_at_the_model_below_and_switches_off_to_it(tmp_path, below, top):
    stacked, tok, below_dir = _stack(tmp_path, below, top)
    reference, _ = load_model_and_tokenizer(ModelConfig(name=str(below_dir)), for_training=False)
    expected = _logits(reference, tok)
    assert torch.allclose(_logits(stacked, tok), expected, atol=1e-5)
    _perturb(stacked, seed=3)
    assert not torch.allclose(_logits(stacked, tok), expected, atol=1e-3)
    with stacked.disable_adapter():  # only the new level: the model the stage started from (a DPO reference)
        assert torch.allclose(_logits(stacked, tok), expected, atol=1e-5)
    assert not torch.allclose(_logits(stacked, tok), expected, atol=1e-3)


@pytest.mark.parametrize(("below", "top"), STACKS, ids=STACK_IDS)
def test_only_the_top_adapter_of_a_stack_gets_gradients(tmp_path, below, top):
    stacked, tok, _ = _stack(tmp_path, below, top)
    _perturb(stacked, seed=3)
    own = {n for n, p in stacked.named_parameters() if p.requires_grad}
    assert own and all("stack1" in n or ".adapter." in n or "ia3_l" in n for n in own), sorted(own)[:4]
    assert len(own) == len(stacked.own)
    if top != "bottleneck":  # all-linear means the model's layers, not the linear layers inside adapters below
        assert not any(".adapter." in n.split("stack1")[0] for n in own), sorted(own)[:4]
    loss, count = causal_lm_loss(stacked, collate(_rows(tok), tok.pad_token_id))
    (loss / count).backward()
    assert {n for n, p in stacked.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0} == own


@pytest.mark.parametrize(("below", "top"), STACKS, ids=STACK_IDS)
def test_a_saved_stack_reloads_to_identical_outputs_and_merges_only_if_every_level_can(tmp_path, below, top):
    stacked, tok, below_dir = _stack(tmp_path, below, top)
    _perturb(stacked, seed=3)
    expected = _logits(stacked, tok)
    save_final(stacked, tok, tmp_path / "top" / "final", base_model=str(below_dir), method=top,
               quant=_method(top).quant)
    assert (tmp_path / "top" / "final" / "stacked_adapter.safetensors").is_file()
    loaded, _ = load_model_and_tokenizer(ModelConfig(name=str(tmp_path / "top")), for_training=False)
    assert is_quantised(loaded) == (top == "qlora")
    assert torch.equal(_logits(loaded, tok), expected)
    mergeable = below in ("lora", "dora", "ia3") and top in ("lora", "ia3")
    assert is_mergeable(loaded) == mergeable
    if mergeable:  # innermost level first: IA3 over LoRA is (W + BA) scaled, not W scaled + BA
        merged = loaded.merge_and_unload()
        assert type(merged).__name__ == "LlamaForCausalLM"
        assert not any("lora" in n or "ia3" in n for n, _ in merged.named_modules())
        # float32 rounding only (DoRA's norms add ~1e-5); a wrong order is off by 1e-2 and more
        torch.testing.assert_close(_logits(merged, tok), expected, atol=1e-4, rtol=1e-4)
        # training on it with adapter=merge (the default) starts from the same merged model
        start, _ = load_model_and_tokenizer(ModelConfig(name=str(tmp_path / "top")))
        torch.testing.assert_close(_logits(start, tok), expected, atol=1e-4, rtol=1e-4)
    elif top == "qlora":  # merged for training: both LoRA levels folded into the unquantised base
        start, _ = load_model_and_tokenizer(ModelConfig(name=str(tmp_path / "top")))
        assert type(start).__name__ == "LlamaForCausalLM"
        _assert_merged_into_the_unquantised_base(start, loaded)
    else:
        with pytest.raises(TunesmithError, match="a stack holding an adapter that is no weight update"):
            load_model_and_tokenizer(ModelConfig(name=str(tmp_path / "top")))


def test_stacks_go_deeper_and_each_level_switches_off_alone(tmp_path):
    """lora, then lora stacked, then a bottleneck on both: three levels, saved and reloaded as a chain."""
    two, tok, below_dir = _stack(tmp_path, "lora", "lora")
    _perturb(two, seed=3)
    save_final(two, tok, tmp_path / "two" / "final", base_model=str(below_dir), method="lora")
    start, _ = load_model_and_tokenizer(ModelConfig(name=str(tmp_path / "two"), adapter="stack"))
    three = apply_method(start, _method("bottleneck"), tok)
    assert three.depth == 2 and len(three.levels()) == 3
    expected_two = _logits(two, tok)
    _perturb(three, seed=4)
    with three.disable_adapter():
        assert torch.allclose(_logits(three, tok), expected_two, atol=1e-5)
    save_final(three, tok, tmp_path / "three" / "final", base_model=str(tmp_path / "two"), method="bottleneck")
    loaded, _ = load_model_and_tokenizer(ModelConfig(name=str(tmp_path / "three")), for_training=False)
    assert torch.equal(_logits(loaded, tok), _logits(three, tok))
    from tunesmith.models.export import export_model

    with pytest.raises(TunesmithError, match="not one PEFT adapter"):
        export_model(tmp_path / "three", tmp_path / "peft", format="peft")


def test_stacking_refuses_what_it_cannot_do(tmp_path):
    from tunesmith.config import config_from_dict

    with pytest.raises(TunesmithError, match="holds no adapter to stack on"):
        load_model_and_tokenizer(ModelConfig(name="tiny", adapter="stack"))
    base = {"recipe": "sft", "model": {"name": "tiny", "adapter": "stack"}, "data": {"train": "x.jsonl"}}
    with pytest.raises(TunesmithError, match="needs a method that stacks"):
        config_from_dict({**base, "method": {"kind": "dora"}})
    with pytest.raises(TunesmithError, match="applies to language-model recipes"):
        config_from_dict({**base, "recipe": "reward", "method": {"kind": "lora"}})
    stacked, tok, below_dir = _stack(tmp_path, "lora", "lora")
    start, _ = load_model_and_tokenizer(ModelConfig(name=str(below_dir), adapter="stack"))
    with pytest.raises(TunesmithError, match="on an unquantised one it is not"):
        apply_method(start, _method("qlora"))


def test_the_weight_anchor_of_a_stacked_stage_pulls_toward_the_stage_start(tmp_path):
    """W_start is the model below (its adapters included): at the start the penalty is 0, and it grows
    with the new level only."""
    from tunesmith.losses.anchor import lora_update_sq_norm
    from tunesmith.training.anchor import WeightAnchor

    stacked, _, _ = _stack(tmp_path, "lora", "lora")
    anchor = WeightAnchor(stacked, weight=2.0)
    assert float(anchor()) == 0.0
    _perturb(stacked, seed=3)
    layers = [m for m in stacked.modules() if hasattr(m, "lora_A") and "stack1" in m.lora_A]
    want = sum(lora_update_sq_norm(m.lora_A["stack1"].weight, m.lora_B["stack1"].weight, m.scaling["stack1"])
               for m in layers)
    torch.testing.assert_close(anchor(), 0.5 * 2.0 * want)
