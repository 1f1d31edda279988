"""final/ folders reload to the same function; merged adapters equal unmerged ones; bad paths are named."""
from __future__ import annotations

import json

import pytest
import torch

from tunesmith._core.errors import TunesmithError
from tunesmith.config import MethodConfig, ModelConfig
from tunesmith.models import apply_method, load_model_and_tokenizer, merge_adapter, save_final


def _batch(tok):
    return tok(["The date is 2021-03-04.", '{"name": "Bob", "age": 41}'], return_tensors="pt", padding=True)


def _logits(model, tok) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**_batch(tok)).logits


def _perturb(model, only: str | None = None, seed: int = 1) -> None:
    """Move the trained weights away from their init, so equality checks mean something (B=0 otherwise)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (only is None or only in name):
                p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))


def _trained_adapter(kind: str, seed: int):
    model, tok = load_model_and_tokenizer(ModelConfig(name="tiny"), method=kind, seed=seed)
    model = apply_method(model, MethodConfig(kind=kind, lora={"r": 4}))
    _perturb(model)
    return model, tok


@pytest.mark.parametrize("kind", ["lora", "dora", "qlora"])
def test_adapter_final_reloads_to_identical_logits(tmp_path, kind):
    model, tok = _trained_adapter(kind, seed=3)  # seed != 0: the base must be rebuilt from the recorded seed
    expected = _logits(model, tok)
    save_final(model, tok, tmp_path / "run" / "final", base_model="tiny", method=kind)
    final = tmp_path / "run" / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= {
        p.name for p in final.iterdir()
    }
    quant = {"quant": {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "auto"}} if kind == "qlora" else {}
    assert json.loads((final / "tunesmith.json").read_text()) == {
        "kind": "adapter", "base_model": "tiny", "method": kind, "head": "lm", "base_seed": 3, **quant
    }
    for name in (final, tmp_path / "run"):  # the final/ folder or its run directory
        loaded, loaded_tok = load_model_and_tokenizer(ModelConfig(name=str(name)), for_training=False)
        assert type(loaded).__name__.startswith("PeftModel")
        assert torch.equal(_logits(loaded, loaded_tok), expected)
        assert loaded_tok.get_vocab() == tok.get_vocab() and loaded_tok.chat_template == tok.chat_template


@pytest.mark.parametrize("kind", ["full", "freeze"])
def test_full_final_reloads_to_identical_logits(tmp_path, kind):
    model, tok = load_model_and_tokenizer(ModelConfig(name="tiny"), method=kind, seed=2)
    model = apply_method(model, MethodConfig(kind=kind))
    _perturb(model)
    expected = _logits(model, tok)
    save_final(model, tok, tmp_path / "final", base_model="tiny", method=kind, card="# my card\n")
    assert (tmp_path / "final" / "README.md").read_text() == "# my card\n"
    assert json.loads((tmp_path / "final" / "tunesmith.json").read_text())["kind"] == "full"
    loaded, loaded_tok = load_model_and_tokenizer(ModelConfig(name=str(tmp_path / "final")), for_training=False)
    assert torch.equal(_logits(loaded, loaded_tok), expected)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merged_adapter_equals_unmerged(tmp_path, kind):
    model, tok = _trained_adapter(kind, seed=0)
    expected = _logits(model, tok)
    save_final(model, tok, tmp_path / "run" / "final", base_model="tiny", method=kind)
    out = merge_adapter(tmp_path / "run", tmp_path / "merged")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    assert json.loads((out / "tunesmith.json").read_text())["kind"] == "full"
    merged, merged_tok = load_model_and_tokenizer(ModelConfig(name=str(out)), for_training=False)
    assert not type(merged).__name__.startswith("PeftModel")
    torch.testing.assert_close(_logits(merged, merged_tok), expected, atol=1e-5, rtol=0)


def test_a_bf16_merge_is_the_float32_merge_rounded_once(tmp_path):
    """Merging in bf16 would round the base and the update apart before adding them."""
    model, tok = _trained_adapter("lora", seed=0)
    save_final(model, tok, tmp_path / "final", base_model="tiny", method="lora")
    wide = load_model_and_tokenizer(ModelConfig(name=str(merge_adapter(tmp_path / "final", tmp_path / "f32"))))[0]
    narrow = load_model_and_tokenizer(ModelConfig(name=str(merge_adapter(tmp_path / "final", tmp_path / "bf16",
                                                                         dtype="bfloat16")), dtype="bfloat16"))[0]
    for (name, a), (_, b) in zip(wide.named_parameters(), narrow.named_parameters()):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), name


def test_qlora_merges_into_the_unquantised_base(tmp_path):
    model, tok = _trained_adapter("qlora", seed=0)
    save_final(model, tok, tmp_path / "final", base_model="tiny", method="qlora")
    merged, _ = load_model_and_tokenizer(ModelConfig(name=str(merge_adapter(tmp_path / "final", tmp_path / "m"))))
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    # the merged weight is the float base plus the adapter delta
    base, _ = load_model_and_tokenizer(ModelConfig(name="tiny"))
    adapter = model.base_model.model.model.layers[0].self_attn.q_proj
    delta = adapter.lora_B["default"].weight @ adapter.lora_A["default"].weight * adapter.scaling["default"]
    torch.testing.assert_close(
        merged.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight + delta
    )


def test_training_on_top_of_an_adapter_run_starts_from_the_merged_model(tmp_path):
    model, tok = _trained_adapter("lora", seed=0)
    expected = _logits(model, tok)
    save_final(model, tok, tmp_path / "final", base_model="tiny", method="lora")
    plain, plain_tok = load_model_and_tokenizer(ModelConfig(name=str(tmp_path / "final")), for_training=True)
    assert not type(plain).__name__.startswith("PeftModel") and plain.training
    torch.testing.assert_close(_logits(plain, plain_tok), expected, atol=1e-5, rtol=0)


def test_save_final_replaces_an_existing_folder_atomically(tmp_path):
    model, tok = load_model_and_tokenizer(ModelConfig(name="tiny"))
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "stale.txt").write_text("old")
    save_final(model, tok, tmp_path / "final", base_model="tiny", method="full")
    assert not (tmp_path / "final" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no temp or old siblings left


def test_base_model_path_is_recorded_absolute(tmp_path, monkeypatch):
    model, tok = load_model_and_tokenizer(ModelConfig(name="tiny"))
    save_final(model, tok, tmp_path / "base", base_model="tiny", method="full")
    monkeypatch.chdir(tmp_path)
    base, tok = load_model_and_tokenizer(ModelConfig(name="base"), method="lora")
    peft_model = apply_method(base, MethodConfig(kind="lora", lora={"r": 2}))
    save_final(peft_model, tok, tmp_path / "final", base_model="base", method="lora")
    marker = json.loads((tmp_path / "final" / "tunesmith.json").read_text())
    assert marker["base_model"] == str(tmp_path / "base") and "base_seed" not in marker


def test_dtype_and_padding_side(tmp_path):
    model, tok = load_model_and_tokenizer(ModelConfig(name="tiny", dtype="bfloat16"))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert tok.padding_side == "right" and tok.pad_token == "<|im_end|>"


def test_wrong_paths_are_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(TunesmithError, match="no-such-model.*does not exist.*HF model folder"):
        load_model_and_tokenizer(ModelConfig(name=str(missing)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TunesmithError, match="empty' is not a model"):
        load_model_and_tokenizer(ModelConfig(name=str(tmp_path / "empty")))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(TunesmithError, match="weights.bin"):
        load_model_and_tokenizer(ModelConfig(name=str(tmp_path / "weights.bin")))
    run = tmp_path / "unfinished-run"
    run.mkdir()
    (run / "status.json").write_text('{"state": "running"}')
    with pytest.raises(TunesmithError, match="unfinished-run.*without a finished final"):
        load_model_and_tokenizer(ModelConfig(name=str(run)))
    model, _ = load_model_and_tokenizer(ModelConfig(name="tiny"))
    model.config.save_pretrained(tmp_path / "config-only")  # the weights never copied over
    with pytest.raises(TunesmithError, match="cannot load model '.*config-only': OSError: .*model.safetensors"):
        load_model_and_tokenizer(ModelConfig(name=str(tmp_path / "config-only")))
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00")  # a download that stopped
    with pytest.raises(TunesmithError, match="cannot load model '.*cut.gguf'"):
        load_model_and_tokenizer(ModelConfig(name=str(tmp_path / "cut.gguf")))


def test_merge_needs_an_adapter(tmp_path):
    model, tok = load_model_and_tokenizer(ModelConfig(name="tiny"))
    save_final(model, tok, tmp_path / "final", base_model="tiny", method="full")
    with pytest.raises(TunesmithError, match="no adapter"):
        merge_adapter(tmp_path / "final", tmp_path / "merged")


def test_recipe_may_pass_the_tiny_seed_explicitly(tmp_path):
    model, tok = _trained_adapter("lora", seed=4)
    save_final(model, tok, tmp_path / "final", base_model="tiny", method="lora", base_seed=4)
    assert json.loads((tmp_path / "final" / "tunesmith.json").read_text())["base_seed"] == 4
    with pytest.raises(AssertionError):
        save_final(model, tok, tmp_path / "final2", base_model="tiny", method="lora", base_seed=5)


def test_load_tokenizer_alone(tmp_path):
    from tunesmith.models import load_tokenizer

    model, tok = load_model_and_tokenizer(ModelConfig(name="tiny"))
    save_final(model, tok, tmp_path / "final", base_model="tiny", method="full")
    for name in ("tiny", str(tmp_path / "final"), str(tmp_path)):
        loaded = load_tokenizer(ModelConfig(name=name))
        assert loaded.get_vocab() == tok.get_vocab() and loaded.pad_token == "<|im_end|>"
        assert loaded.padding_side == "right"


def test_a_pipeline_stage_finds_its_base_stage_after_the_run_is_moved(tmp_path):
    """A stage's base is an earlier stage of the same run: the run must load wherever it is moved."""
    import shutil

    root = tmp_path / "pipe"
    for run in (root, root / "stages" / "01", root / "stages" / "02"):
        run.mkdir(parents=True)
        (run / "status.json").write_text("{}")
    base, tok = load_model_and_tokenizer(ModelConfig(name="tiny"))
    save_final(base, tok, root / "stages" / "01" / "final", base_model="tiny", method="full")
    model, tok = load_model_and_tokenizer(ModelConfig(name=str(root / "stages" / "01")), method="lora")
    model = apply_method(model, MethodConfig(kind="lora", lora={"r": 2}))
    _perturb(model)
    expected = _logits(model, tok)
    save_final(model, tok, root / "stages" / "02" / "final", base_model=str(root / "stages" / "01"), method="lora")
    shutil.copytree(root / "stages" / "02" / "final", root / "final")  # the pipeline's final/ is the last stage's
    marker = json.loads((root / "final" / "tunesmith.json").read_text())
    assert marker["base_in_run"] == "stages/01"
    shutil.move(root, tmp_path / "moved")
    for name in ("moved/stages/02", "moved"):
        loaded, tok = load_model_and_tokenizer(ModelConfig(name=str(tmp_path / name)), for_training=False)
        assert torch.allclose(_logits(loaded, tok), expected, atol=1e-6), name
