"""GGUF export round-trips through transformers' GGUF loader (and tunesmith's), the q/k rows are in
llama.cpp's RoPE order, adapters are merged first, and what cannot be exported is refused by name."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from tunesmith._core.errors import TunesmithError
from tunesmith.config import MethodConfig, ModelConfig
from tunesmith.models import apply_method, load_model_and_tokenizer, save_final, tiny_model
from tunesmith.models import gguf as gguf_export
from tunesmith.models.export import export_model
from tunesmith.models.gguf import export_gguf, rope_interleave

TEXTS = ["The date is 2021-03-04.", '{"name": "Bob", "age": 41} lives in Paris', "Hello, world!\n  spaces"]
CHAT = [{"role": "user", "content": "Write 4 March 2021 as ISO."}, {"role": "assistant", "content": "2021-03-04"}]
# Max |logit diff| / max |logit| after the round trip. f16 keeps 11 significant bits (relative rounding
# <= 2^-12 per weight) and measures ~1e-3 here; q8_0 steps by max|block of 32| / 127 (~0.5% of a weight's
# size) and measures 2-5e-2; a missing RoPE interleave measures 0.6-0.9.
BOUNDS = {"f32": 1e-6, "f16": 5e-3, "bf16": 4e-2, "q8_0": 0.1}


def _moved(model, seed: int):
    """Every parameter moved off its init by noise of std 0.1 (seeded), in place; returns the model."""
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _perturbed(tokenizer, seed: int = 0, tied: bool = False):
    """The tiny Llama moved off its init (std 0.02 weights, norms of exactly 1) so that attention is sharp
    and every head, row and norm differs: a wrong layout then changes the logits."""
    model = tiny_model(tokenizer, seed=seed)
    if tied:
        config = copy.deepcopy(model.config)
        config.tie_word_embeddings = True
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = type(model)(config).eval()
    return _moved(model, seed)


# Beyond Llama: each with the tiny Llama's sizes. Qwen3's head size is set apart from hidden / heads, as
# real Qwen3 models have it.
OTHERS = {"mistral": {"sliding_window": None}, "qwen2": {}, "qwen3": {"head_dim": 8}}


def _tiny_of(model_type: str, tokenizer, seed: int = 0, **overrides):
    """A tiny Mistral, Qwen2 or Qwen3, moved off its init as `_perturbed` does (biases and q/k norms too)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    llama = tiny_model(tokenizer).config
    sizes = {k: getattr(llama, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                            "rms_norm_eps")}
    config = AutoConfig.for_model(model_type, **{**sizes, "tie_word_embeddings": False, **OTHERS[model_type],
                                                 **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).eval()
    return _moved(model, seed)


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _hf_gguf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def _tensor_names(path) -> set[str]:
    from gguf import GGUFReader

    return {t.name for t in GGUFReader(path).tensors}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_round_trip_logits_through_transformers_and_tunesmith(tmp_path, tokenizer, dtype, tied):
    model = _perturbed(tokenizer, seed=1, tied=tied)
    expected = _logits(model, tokenizer)
    path = export_gguf(model, tokenizer, tmp_path / "model.gguf", dtype=dtype)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]  # no temp file left beside it
    assert ("output.weight" in _tensor_names(path)) == (not tied)

    loaded, loaded_tok = _hf_gguf(path)
    assert loaded.config.tie_word_embeddings == tied
    assert _relative_error(_logits(loaded, loaded_tok), expected) < BOUNDS[dtype]
    ours, ours_tok = load_model_and_tokenizer(ModelConfig(name=str(path)), for_training=False)
    assert _relative_error(_logits(ours, ours_tok), expected) < BOUNDS[dtype]


def test_f32_is_exact_and_fails_without_the_rope_interleave(tmp_path, tokenizer, monkeypatch):
    model = _perturbed(tokenizer, seed=2)
    expected = _logits(model, tokenizer)
    exact, tok = _hf_gguf(export_gguf(model, tokenizer, tmp_path / "f32.gguf", dtype="f32"))
    assert _relative_error(_logits(exact, tok), expected) < BOUNDS["f32"]

    monkeypatch.setattr(gguf_export, "rope_interleave", lambda weight, n_heads: weight)
    wrong, tok = _hf_gguf(export_gguf(model, tokenizer, tmp_path / "no-interleave.gguf", dtype="f32"))
    assert _relative_error(_logits(wrong, tok), expected) > 0.2


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize("model_type", sorted(OTHERS))
def test_mistral_and_qwen_round_trip(tmp_path, tokenizer, model_type, dtype):
    """Mistral as llama.cpp's llama (q/k rows interleaved), Qwen2 with its q/k/v biases and Qwen3 with its
    q/k norms (both rotating halves in llama.cpp too): the logits come back through tunesmith's loader."""
    model = _tiny_of(model_type, tokenizer, seed=1)
    expected = _logits(model, tokenizer)
    path = export_gguf(model, tokenizer, tmp_path / f"{model_type}.gguf", dtype=dtype)
    ours, ours_tok = load_model_and_tokenizer(ModelConfig(name=str(path)), for_training=False)
    assert type(ours).__name__ == ("LlamaForCausalLM" if model_type == "mistral" else type(model).__name__)
    assert _relative_error(_logits(ours, ours_tok), expected) < BOUNDS[dtype]
    if model_type != "qwen3":  # transformers alone reads Qwen3's head size as its default (128)
        loaded, loaded_tok = _hf_gguf(path)
        assert _relative_error(_logits(loaded, loaded_tok), expected) < BOUNDS[dtype]


def test_tensor_names_are_llama_cpps_for_each_architecture(tmp_path, tokenizer):
    """Every tensor written has a name llama.cpp's own tensor list (the `gguf` package's) gives the file's
    architecture, and each layout writes what its architecture adds."""
    from gguf import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES, GGUFReader

    models = {"llama": _perturbed(tokenizer), "llama3-rope": _llama3_rope(tokenizer),
              **{t: _tiny_of(t, tokenizer) for t in OTHERS}}
    for name, model in models.items():
        model_type = model.config.model_type
        path = export_gguf(model, tokenizer, tmp_path / f"{name}.gguf", dtype="f16")
        arch_name = GGUFReader(path).fields["general.architecture"].contents()
        arch = next(a for a, name in MODEL_ARCH_NAMES.items() if name == arch_name)
        known = {TENSOR_NAMES[t].format(bid=i) for t in MODEL_TENSORS[arch] for i in range(2)}
        names = _tensor_names(path)
        assert {n.rsplit(".", 1)[0] for n in names} <= known, name
        assert arch_name == {"mistral": "llama"}.get(model_type, model_type)
        assert ("blk.1.attn_k.bias" in names) == (model_type == "qwen2")
        assert ("blk.1.attn_q_norm.weight" in names) == (model_type == "qwen3")
        assert ("rope_freqs.weight" in names) == (name == "llama3-rope")


def test_llama3_and_qwen_tokenizers_name_their_pre_tokenizer(tmp_path, tokenizer):
    """A byte-level BPE that splits text with Llama 3's or Qwen2's expression (numbers in runs of up to 3
    digits, or one digit at a time) is written with llama.cpp's name for it; Qwen's NFC normalizer is
    allowed there only."""
    from gguf import GGUFReader
    from tokenizers import normalizers

    variants = _pre_tokenizer_variants(tokenizer)
    splits = {"llama-bpe": ["in", "Ġ", "202", "14"], "qwen2": ["in", "Ġ", "2", "0", "2", "1", "4"]}
    for name, words in splits.items():
        tok = variants[name]
        assert [w for w, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("in 20214")] == words
        path = export_gguf(_perturbed(tokenizer), tok, tmp_path / f"{name}.gguf", dtype="f16")
        assert GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == name
    llama3 = copy.deepcopy(variants["llama-bpe"])
    llama3.backend_tokenizer.normalizer = normalizers.NFC()
    with pytest.raises(TunesmithError, match="knows no llama.cpp pre-tokenizer .* normalizer"):
        export_gguf(_perturbed(tokenizer), llama3, tmp_path / "nfc.gguf")  # Llama 3 has no normalizer


def _pre_tokenizer_variants(tokenizer) -> dict:
    """The tiny tokenizer as it is (`smollm`), and with Llama 3's (`llama-bpe`) and Qwen2's (`qwen2`, with
    Qwen's NFC normalizer) splits."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    from tunesmith.models.gguf import _WORDS

    variants = {"smollm": tokenizer}
    for digits, name, normalizer in (("{1,3}", "llama-bpe", None), ("", "qwen2", normalizers.NFC())):
        tok = copy.deepcopy(tokenizer)
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_WORDS % digits), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        if normalizer is not None:
            tok.backend_tokenizer.normalizer = normalizer
        variants[name] = tok
    return variants


def _llama3_rope(tokenizer, seed: int = 0, **rope):
    """`_perturbed`'s tiny Llama with Llama 3's RoPE scaling (factor 8, smoothing between low_freq_factor 1
    and high_freq_factor 4); `rope` overrides those parameters."""
    model = _perturbed(tokenizer, seed)
    config = copy.deepcopy(model.config)
    config.rope_parameters = {"rope_type": "llama3", "rope_theta": config.rope_parameters["rope_theta"],
                              "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192, **rope}
    scaled = type(model)(config).eval()
    scaled.load_state_dict(model.state_dict())
    return scaled


@pytest.mark.parametrize("context", [64, 8192], ids=["two-smoothed", "llama3-own"])
def test_llama3_rope_scaling_goes_out_as_rope_freqs_and_comes_back(tmp_path, tokenizer, context):
    """Each frequency's divisor, by Llama 3's definition: 1 for wavelengths under L/4, 8 over L, between
    them 1 / ((1 - s)/8 + s) with s = (L/wavelength - 1) / 3. tunesmith's loader turns them back into
    `rope_parameters` (fitted from two smoothed frequencies where Llama 3's own values do not fit) and
    runs the exported model's logits; transformers alone leaves the tensor unread and runs unscaled RoPE."""
    import math

    from gguf import GGUFReader

    model = _llama3_rope(tokenizer, seed=1, original_max_position_embeddings=context)
    expected = _logits(model, tokenizer)
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", dtype="f32")
    written = next(t.data for t in GGUFReader(path).tensors if t.name == "rope_freqs.weight")
    dim = model.config.hidden_size // model.config.num_attention_heads
    hand = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * 10000.0 ** (i / dim)
        s = (context / wavelength - 1) / 3
        hand.append(1.0 if wavelength < context / 4 else 8.0 if wavelength > context else 1 / ((1 - s) / 8 + s))
    assert written.tolist() == pytest.approx(hand, rel=1e-5)
    assert sum(1 < x < 8 for x in hand) == (2 if context == 64 else 1)
    ours, ours_tok = load_model_and_tokenizer(ModelConfig(name=str(path)), for_training=False)
    got, want = dict(ours.config.rope_parameters), dict(model.config.rope_parameters)
    assert got.pop("rope_type") == want.pop("rope_type") == "llama3"
    assert got == pytest.approx(want, rel=1e-6)
    assert _relative_error(_logits(ours, ours_tok), expected) < BOUNDS["f32"]
    unscaled, tok = _hf_gguf(path)
    assert _relative_error(_logits(unscaled, tok), expected) > (1e-2 if context == 64 else 1e-4)


def test_rope_freqs_that_are_not_llama3s_are_refused_by_name(tokenizer):
    config = _llama3_rope(tokenizer).config
    with pytest.raises(TunesmithError, match="x.gguf: its rope_freqs tensor is not Llama 3's RoPE scaling"):
        gguf_export.llama3_rope_parameters([1.0, 3.0, 1.0, 8.0, 2.0, 8.0, 8.0, 8.0], config, "x.gguf")


def test_llama_cpp_runs_the_exports(tmp_path, tokenizer):
    """llama.cpp itself (through llama-cpp-python, where installed: it is not a dependency) runs every
    layout written here with transformers' logits, and tokenises text as each tokenizer does."""
    import numpy as np

    llama_cpp = pytest.importorskip("llama_cpp")
    models = {"llama": _perturbed(tokenizer, seed=1), "tied": _perturbed(tokenizer, seed=2, tied=True),
              "llama3-rope": _llama3_rope(tokenizer, seed=1, original_max_position_embeddings=64),
              **{t: _tiny_of(t, tokenizer, seed=1) for t in OTHERS}}
    ids = tokenizer.encode(TEXTS[1])
    for name, model in models.items():
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].numpy()
        path = export_gguf(model, tokenizer, tmp_path / f"{name}.gguf", dtype="f32")
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
        llm.eval(ids)
        got = np.asarray(llm.scores[:len(ids)])
        assert np.abs(got - expected).max() / np.abs(expected).max() < BOUNDS["f16"], name  # llama.cpp's own rounding
        assert (got.argmax(-1) == expected.argmax(-1)).all(), name
    with torch.no_grad():  # bf16 matrices, which llama.cpp reads as they are
        expected = models["llama"](torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(export_gguf(models["llama"], tokenizer, tmp_path / "bf16.gguf", dtype="bf16")),
                          n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(ids)
    got = np.asarray(llm.scores[:len(ids)])
    assert np.abs(got - expected).max() / np.abs(expected).max() < BOUNDS["bf16"]
    texts = [*TEXTS, "Café déjà vu 🙂 1234567 x.hello I'M", "<|im_start|>user\nhi<|im_end|>\n"]
    for name, tok in _pre_tokenizer_variants(tokenizer).items():
        path = export_gguf(_perturbed(tokenizer), tok, tmp_path / f"tok-{name}.gguf", dtype="f16")
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        for text in texts:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text, add_special_tokens=False)


def test_rope_interleave_pairs_each_heads_halves():
    # 2 heads of dimension 4: rows (0 1 | 2 3) (4 5 | 6 7) become pairs (0 2 1 3) (4 6 5 7)
    weight = torch.arange(8.0).reshape(8, 1).expand(8, 3)
    assert rope_interleave(weight, n_heads=2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_q8_0_is_smaller_and_quantises_only_matrices(tmp_path, tokenizer):
    from gguf import GGMLQuantizationType, GGUFReader

    model = _perturbed(tokenizer)
    f16 = export_gguf(model, tokenizer, tmp_path / "f16.gguf", dtype="f16")
    q8 = export_gguf(model, tokenizer, tmp_path / "q8.gguf", dtype="q8_0")
    assert q8.stat().st_size < 0.7 * f16.stat().st_size
    types = {t.name: t.tensor_type for t in GGUFReader(q8).tensors}
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == GGMLQuantizationType.F32
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == GGMLQuantizationType.Q8_0


def test_metadata_and_tokenizer_round_trip(tmp_path, tokenizer):
    from gguf import GGUFReader

    path = export_gguf(_perturbed(tokenizer), tokenizer, tmp_path / "m.gguf", dtype="f16")
    fields = GGUFReader(path).fields
    meta = {k: fields[k].contents() for k in fields if k.startswith("llama.") or k.startswith("tokenizer.ggml.")
            and k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")}
    assert meta == {
        "llama.vocab_size": 1024, "llama.context_length": 2048, "llama.embedding_length": 64,
        "llama.block_count": 2, "llama.feed_forward_length": 128, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.attention.key_length": 16, "llama.attention.value_length": 16,
        "llama.rope.dimension_count": 16, "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(1e-6),
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 2, "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,
    }
    assert fields["general.file_type"].contents() == 1  # MOSTLY_F16
    assert fields["tokenizer.ggml.token_type"].contents()[:4] == [3, 3, 3, 1]  # the 3 specials are CONTROL

    _, back = _hf_gguf(path)
    assert back.chat_template == tokenizer.chat_template
    assert (back.bos_token, back.eos_token, back.pad_token) == (tokenizer.bos_token, tokenizer.eos_token,
                                                                 tokenizer.pad_token)
    for text in [*TEXTS, "Café déjà vu 🙂 1234567", "<|im_start|>user\nhi<|im_end|>\n"]:
        assert back(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert back.apply_chat_template(CHAT, tokenize=True) == tokenizer.apply_chat_template(CHAT, tokenize=True)


def _sentencepiece_tokenizer():
    """A Llama-2-style tokenizer (SentencePiece as byte-fallback BPE with `▁`), trained in-process."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    from tunesmith.models.tiny import tiny_corpus

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    bpe.train_from_iterator(tiny_corpus(), trainer=trainers.BpeTrainer(vocab_size=500, show_progress=False))
    spec = json.loads(bpe.to_str())["model"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for token in sorted(spec["vocab"], key=spec["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    return LlamaTokenizer(vocab=vocab, merges=merges, chat_template="{{ messages[0]['content'] }}")


def test_sentencepiece_tokenizer_round_trip(tmp_path, tokenizer):
    from gguf import GGUFReader

    sp = _sentencepiece_tokenizer()
    assert len(sp) < 1024  # the model's extra embedding rows get placeholder tokens
    path = export_gguf(tiny_model(tokenizer), sp, tmp_path / "sp.gguf", dtype="f16")
    fields = GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    assert types[3:5] == [6, 6] and tokens[3] == "<0x00>"  # BYTE
    assert tokens[-1] == "[PAD1023]" and types[-1] == 5  # UNUSED
    # llama.cpp joins the best-scoring pair first, so earlier merges must score higher
    scores = fields["tokenizer.ggml.scores"].contents()
    merges = fields["tokenizer.ggml.merges"].contents()
    first, last = (sp.convert_tokens_to_ids(m.replace(" ", "")) for m in (merges[0], merges[-1]))
    assert scores[first] > scores[last]
    _, back = _hf_gguf(path)
    for text in ["Hello world 2021", " leading space", "Café 🙂 x\ny", "multiple   spaces"]:
        assert back(text)["input_ids"] == sp(text)["input_ids"], text


def _lora_run(tmp_path, base_seed: int = 3):
    """A LoRA result on `tiny` with moved adapter weights, as a run directory; returns (run, model, tok)."""
    model, tok = load_model_and_tokenizer(ModelConfig(name="tiny"), method="lora", seed=base_seed)
    model = apply_method(model, MethodConfig(kind="lora", lora={"r": 4}))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    save_final(model, tok, tmp_path / "run" / "final", base_model="tiny", method="lora")
    return tmp_path / "run", model, tok


def test_a_lora_run_exports_merged(tmp_path):
    run, adapted, tok = _lora_run(tmp_path)
    expected = _logits(adapted, tok)

    hf = export_model(run, tmp_path / "hf", format="hf-fp32")
    assert not (hf / "adapter_config.json").exists() and (hf / "model.safetensors").is_file()
    merged, merged_tok = load_model_and_tokenizer(ModelConfig(name=str(hf)), for_training=False)
    torch.testing.assert_close(_logits(merged, merged_tok), expected, atol=1e-5, rtol=0)

    # The GGUF holds exactly the merged matrices rounded to f16 (norms stay f32).
    loaded, loaded_tok = _hf_gguf(export_model(run, tmp_path / "lora.gguf", format="gguf-f16"))
    with torch.no_grad():
        for p in merged.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
    torch.testing.assert_close(_logits(loaded, loaded_tok), _logits(merged, merged_tok), atol=1e-5, rtol=0)

    bf16 = export_model(run, tmp_path / "hf-bf16", format="hf-bf16")
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"


def test_peft_format_is_the_adapter_alone(tmp_path):
    from peft import PeftModel

    run, adapted, tok = _lora_run(tmp_path)
    out = export_model(run, tmp_path / "adapter", format="peft")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    reloaded = PeftModel.from_pretrained(tiny_model(tok, seed=3), out)
    torch.testing.assert_close(_logits(reloaded, tok), _logits(adapted, tok), atol=0, rtol=0)

    save_final(tiny_model(tok), tok, tmp_path / "full", base_model="tiny", method="full")
    with pytest.raises(TunesmithError, match="holds no PEFT adapter"):
        export_model(tmp_path / "full", tmp_path / "nothing", format="peft")
    assert not (tmp_path / "nothing").exists()


def test_refusals_name_the_reason(tmp_path, tokenizer):
    from tokenizers import normalizers
    from transformers import GPT2Config, GPT2LMHeadModel

    llama = tiny_model(tokenizer)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=1024, n_embd=64, n_layer=1, n_head=4))
    with pytest.raises(TunesmithError, match="model_type \\['llama', 'mistral', 'qwen2', 'qwen3'\\], not 'gpt2'"):
        export_gguf(gpt2, tokenizer, tmp_path / "m.gguf")
    # llama.cpp's llama and qwen2 architectures attend over every position
    with pytest.raises(TunesmithError, match="mistral model with \\['sliding_window'\\].*sliding_window 64"):
        export_gguf(_tiny_of("mistral", tokenizer, sliding_window=64), tokenizer, tmp_path / "m.gguf")
    with pytest.raises(TunesmithError, match="qwen2 model with \\['sliding_window'\\]"):
        export_gguf(_tiny_of("qwen2", tokenizer, use_sliding_window=True, sliding_window=64), tokenizer,
                    tmp_path / "m.gguf")
    export_gguf(_tiny_of("qwen2", tokenizer, sliding_window=64), tokenizer, tmp_path / "off.gguf")  # window off
    (tmp_path / "off.gguf").unlink()
    linear = copy.deepcopy(llama.config)  # llama.cpp has no rope_freqs for it: only Llama 3's scaling goes
    linear.rope_parameters = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(TunesmithError, match="llama model with \\['rope_type'\\] \\(rope_type linear"):
        export_gguf(type(llama)(linear), tokenizer, tmp_path / "m.gguf")
    biased = copy.deepcopy(llama.config)
    biased.attention_bias = True
    with pytest.raises(TunesmithError, match="attention_bias"):
        export_gguf(type(llama)(biased), tokenizer, tmp_path / "m.gguf")
    normalised = copy.deepcopy(tokenizer)  # the fixture is shared: never change it
    normalised.backend_tokenizer.normalizer = normalizers.NFC()
    with pytest.raises(TunesmithError, match="knows no llama.cpp pre-tokenizer .* normalizer"):
        export_gguf(llama, normalised, tmp_path / "m.gguf")  # fails mid-write: the temp file must go too
    peft_model = apply_method(llama, MethodConfig(kind="lora", lora={"r": 2}))
    with pytest.raises(TunesmithError, match="unmerged PEFT adapter"):
        export_gguf(peft_model, tokenizer, tmp_path / "m.gguf")
    quantised, _ = load_model_and_tokenizer(ModelConfig(name="tiny"), method="qlora")
    with pytest.raises(TunesmithError, match="bitsandbytes-quantised"):
        export_gguf(quantised, tokenizer, tmp_path / "m.gguf")
    with pytest.raises(TunesmithError, match="not one of"):
        export_gguf(tiny_model(tokenizer), tokenizer, tmp_path / "m.gguf", dtype="q4_0")
    with pytest.raises(TunesmithError, match="'onnx' is not one of"):
        export_model("tiny", tmp_path / "m.onnx", format="onnx")
    with pytest.raises(TunesmithError, match="ending in .gguf"):
        export_model("tiny", tmp_path / "folder", format="gguf-f16")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")
    calls = []

    def fail_on_the_fifth(name, weight, dtype):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return encode(name, weight, dtype)

    encode = gguf_export._encode_tensor
    monkeypatch.setattr(gguf_export, "_encode_tensor", fail_on_the_fifth)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(tiny_model(tokenizer), tokenizer, path)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_cli_export(tmp_path, monkeypatch, capsys):
    from tunesmith.cli import main

    out = tmp_path / "tiny.gguf"
    monkeypatch.setattr(sys, "argv", ["tunesmith", "export", "tiny", str(out), "--format", "gguf-q8_0"])
    with pytest.raises(SystemExit) as done:
        main()
    assert done.value.code == 0 and f"to {out}" in capsys.readouterr().out
    loaded, tok = _hf_gguf(out)
    base, _ = load_model_and_tokenizer(ModelConfig(name="tiny"), for_training=False)
    assert _relative_error(_logits(loaded, tok), _logits(base, tok)) < BOUNDS["q8_0"]

    monkeypatch.setattr(sys, "argv", ["tunesmith", "export", "tiny", str(tmp_path / "x"), "--format", "peft"])
    with pytest.raises(SystemExit) as failed:
        main()
    assert failed.value.code == 2 and "error: tiny holds no PEFT adapter" in capsys.readouterr().err


@pytest.mark.slow
def test_default_model_round_trips_through_q8_0(tmp_path):
    model, tok = load_model_and_tokenizer(ModelConfig(name="default"), for_training=False)
    expected = _logits(model, tok)
    path = export_gguf(model, tok, tmp_path / "smollm2.gguf", dtype="q8_0")
    loaded, loaded_tok = _hf_gguf(path)
    assert loaded_tok(TEXTS)["input_ids"] == tok(TEXTS)["input_ids"]
    assert _relative_error(_logits(loaded, loaded_tok), expected) < BOUNDS["q8_0"]


def test_beyond_float16_is_what_a_float16_copy_turns_to_inf():
    """The check agrees with torch's own rounding at the edge: 65,504 is float16's largest value, values up to
    just below 65,520 round down to it, and from 65,520 on (and anything not finite) there is no float16."""
    from tunesmith._core.precision import beyond_float16

    edge = torch.tensor([65504.0, 65519.99, 65520.0, -65520.0, 7e4, float("inf"), float("nan"), 1.0])
    for value in edge:
        t = torch.full((3,), 1.0)
        t[1] = value
        overflows = bool(torch.isinf(t.half()).any() or not torch.isfinite(t).all())
        assert (beyond_float16([("w", t)]) is not None) == overflows, float(value)
    assert beyond_float16([("ids", torch.tensor([10**6])), ("ok", torch.ones(2)), ("big", torch.tensor([-7e4]))]) \
        == ("big", 7e4)


def _final_with_a_large_weight(tmp_path, tokenizer, value: float):
    """A full `tiny` model saved as final/ with one weight of the last block's MLP set to `value`."""
    model = tiny_model(tokenizer, seed=1)
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight[0, 0] = value
    save_final(model, tokenizer, tmp_path / "src" / "final", base_model="tiny", method="full")
    return tmp_path / "src", model


def test_hf_fp16_export_is_the_float16_rounding_and_refuses_what_float16_cannot_hold(tmp_path, tokenizer):
    src, model = _final_with_a_large_weight(tmp_path, tokenizer, 6e4)
    out = export_model(src, tmp_path / "hf16", format="hf-fp16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    saved, _ = load_model_and_tokenizer(ModelConfig(name=str(out), dtype="float16"), for_training=False)
    for (name, p), (_, q) in zip(model.named_parameters(), saved.named_parameters()):
        assert q.dtype == torch.float16 and torch.equal(p.half(), q), name

    big, _ = _final_with_a_large_weight(tmp_path / "big", tokenizer, 7e4)
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "old.txt").write_text("old")
    with pytest.raises(TunesmithError, match=r"model\.layers\.1\.mlp\.down_proj\.weight holds values up to 70000.*"
                                             r"float16's range \(±65,504\).*hf-bf16 or hf-fp32"):
        export_model(big, tmp_path / "kept", format="hf-fp16", overwrite=True)
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["old.txt"]
    with pytest.raises(TunesmithError, match=r"model\.dtype float16: model\.layers\.1\.mlp\.down_proj\.weight.*"
                                             r"use model\.dtype bfloat16 or float32"):
        load_model_and_tokenizer(ModelConfig(name=str(big), dtype="float16"))
    load_model_and_tokenizer(ModelConfig(name=str(big), dtype="bfloat16"))  # bfloat16 has float32's range


def test_a_lora_run_exports_merged_in_float16_and_refuses_an_update_beyond_it(tmp_path):
    run, adapted, tok = _lora_run(tmp_path)
    out = export_model(run, tmp_path / "hf16", format="hf-fp16")
    wide = export_model(run, tmp_path / "hf32", format="hf-fp32")
    half, _ = load_model_and_tokenizer(ModelConfig(name=str(out), dtype="float16"), for_training=False)
    full, _ = load_model_and_tokenizer(ModelConfig(name=str(wide)), for_training=False)
    for (name, p), (_, q) in zip(full.named_parameters(), half.named_parameters()):
        assert torch.equal(p.half(), q), name  # the float32 merge, rounded once

    with torch.no_grad():  # an adapter whose update alone leaves float16's range
        next(p for n, p in adapted.named_parameters() if "lora_B" in n).fill_(1e6)
    save_final(adapted, tok, tmp_path / "huge" / "final", base_model="tiny", method="lora")
    with pytest.raises(TunesmithError, match=r"merging .*huge in float16: .*beyond float16's range.*bfloat16"):
        export_model(tmp_path / "huge", tmp_path / "huge16", format="hf-fp16")
    assert not (tmp_path / "huge16").exists()


def test_gguf_f16_refuses_a_weight_float16_cannot_hold_and_keeps_the_old_file(tmp_path, tokenizer):
    src, _ = _final_with_a_large_weight(tmp_path, tokenizer, 7e4)
    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")
    with pytest.raises(TunesmithError, match=r"GGUF tensor blk\.1\.ffn_down\.weight in f16: .*70000.*gguf-bf16"):
        export_model(src, path, format="gguf-f16", overwrite=True)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "src"]
    export_model(src, path, format="gguf-q8_0", overwrite=True)  # Q8_0's blocks carry it: 70,000 / 127 per step
    assert path.read_bytes() != b"old"


def test_gguf_bf16_and_f32_hold_the_weights_as_bfloat16_and_float32_round_them(tmp_path, tokenizer):
    """gguf-bf16 holds each matrix as torch rounds it to bfloat16 (norms stay float32), a weight beyond
    float16's range included; gguf-f32 holds the weights exactly."""
    from gguf import GGMLQuantizationType, GGUFReader, dequantize

    src, model = _final_with_a_large_weight(tmp_path, tokenizer, 7e4)
    for fmt, rounded in (("gguf-bf16", lambda w: w.bfloat16().float()), ("gguf-f32", lambda w: w)):
        path = export_model(src, tmp_path / f"{fmt}.gguf", format=fmt)
        tensors = {t.name: t for t in GGUFReader(path).tensors}
        down = tensors["blk.1.ffn_down.weight"]
        want = GGMLQuantizationType.BF16 if fmt == "gguf-bf16" else GGMLQuantizationType.F32
        assert down.tensor_type == want and tensors["blk.1.ffn_norm.weight"].tensor_type == GGMLQuantizationType.F32
        got = torch.from_numpy(dequantize(down.data, down.tensor_type).copy()).reshape(model.config.hidden_size, -1)
        assert torch.equal(got, rounded(model.model.layers[1].mlp.down_proj.weight.detach()))
        assert got[0, 0] == rounded(torch.tensor(7e4))


def test_a_gguf_load_parses_the_file_once(tmp_path, tokenizer, monkeypatch):
    """Config, weights and tokenizer all read the one parse of the file, and gguf's tensor-name table is built
    once per architecture, where transformers alone would parse the file 4 times and build the table for
    every submodule; afterwards the gguf module is as it was, and another file gets its own parse."""
    import gguf

    from tunesmith.models.default import load_gguf

    path = export_gguf(tiny_model(tokenizer, seed=2), tokenizer, tmp_path / "m.gguf")
    other = export_gguf(tiny_model(tokenizer, seed=3), tokenizer, tmp_path / "other.gguf")
    real, parses, tables = gguf.GGUFReader, [], []

    class Counted(real):
        def __init__(self, file, *args, **kwargs):
            parses.append(Path(file).name)
            super().__init__(file, *args, **kwargs)

    def counted_table(*args):
        tables.append(args)
        return real_table(*args)

    real_table = gguf.get_tensor_name_map
    monkeypatch.setattr(gguf, "GGUFReader", Counted)
    monkeypatch.setattr(gguf, "get_tensor_name_map", counted_table)
    model, _ = load_gguf(path)
    assert parses == ["m.gguf"] and len(tables) == len(set(tables)) == 1
    assert gguf.GGUFReader is Counted and gguf.get_tensor_name_map is counted_table
    assert Counted(other).fields  # outside a load, each call parses
    assert parses == ["m.gguf", "other.gguf"]
    torch.testing.assert_close(model.lm_head.weight, tiny_model(tokenizer, seed=2).lm_head.weight.half().float())


def test_merge_and_export_never_write_over_what_exists_unless_asked(tmp_path):
    from tunesmith.models import merge_adapter

    run, _, _ = _lora_run(tmp_path)
    (tmp_path / "other" / "checkpoints").mkdir(parents=True)  # another run, which a typo could name
    for write in (lambda out, **kw: merge_adapter(run, out, **kw),
                  lambda out, **kw: export_model(run, out, format="hf-fp32", **kw),
                  lambda out, **kw: export_model(run, out, format="peft", **kw)):
        with pytest.raises(TunesmithError, match="already exists; .* --overwrite"):
            write(tmp_path / "other")
        assert (tmp_path / "other" / "checkpoints").is_dir()
        for target in (run, run / "final", tmp_path):  # the source, and folders holding it: even when asked
            with pytest.raises(TunesmithError, match="writing there would delete it"):
                write(target, overwrite=True)
            assert (run / "final" / "adapter_config.json").is_file()
    (tmp_path / "m.gguf").write_bytes(b"old")
    with pytest.raises(TunesmithError, match="already exists"):
        export_model(run, tmp_path / "m.gguf", format="gguf-f32")
    assert (tmp_path / "m.gguf").read_bytes() == b"old"
    (tmp_path / "empty").mkdir()
    assert export_model(run, tmp_path / "empty", format="peft") == tmp_path / "empty"  # an empty folder is taken
    merge_adapter(run, tmp_path / "other", overwrite=True)
    assert not (tmp_path / "other" / "checkpoints").exists() and (tmp_path / "other" / "config.json").is_file()
