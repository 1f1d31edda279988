"""The tiny tokenizer and model: real BPE, SmolLM2-shaped chat template, seeded weights."""
from __future__ import annotations


import torch

from tunesmith.models import tiny_model, tiny_tokenizer
from tunesmith.models.tiny import train_tiny_tokenizer

TEXTS = [
    "Hello, world! The date is 2021-03-04.",
    '{"name": "Alice", "age": 30, "city": "Paris"}',
    "March 4, 2021 -> 04/03/2021; 123 + 456 = 579",
    "ünïcødé, emoji 🙂, tabs\tand\nnewlines  double  spaces",
]


def test_tokenizer_round_trips_text():
    tok = tiny_tokenizer()
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # a real BPE: common words are single tokens, digits are split one by one
    assert len(tok("the", add_special_tokens=False)["input_ids"]) == 1
    assert tok.convert_ids_to_tokens(tok("2021", add_special_tokens=False)["input_ids"]) == ["2", "0", "2", "1"]


def test_tokenizer_has_vocab_of_about_a_thousand():
    assert 900 <= len(tiny_tokenizer()) <= 1100


def test_special_tokens_like_smollm2():
    tok = tiny_tokenizer()
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert tok.eos_token_id == tok.pad_token_id
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok.padding_side == "right"
    # special tokens are atomic in running text
    assert tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"][0] == 1
    assert tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"][-1] == 2


def test_chatml_template_without_default_system_prompt():
    tok = tiny_tokenizer()
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert tok.apply_chat_template(chat, tokenize=False) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    system = [{"role": "system", "content": "Be brief."}] + chat[:1]
    assert tok.apply_chat_template(system, tokenize=False).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_tokenizer_training_is_deterministic():
    a, b = train_tiny_tokenizer(), train_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_tiny_tokenizer_returns_independent_copies():
    a = tiny_tokenizer()
    a.padding_side = "left"
    assert tiny_tokenizer().padding_side == "right"


def test_tiny_model_shape_and_size():
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.intermediate_size == 128 and cfg.vocab_size == len(tok)
    assert cfg.eos_token_id == cfg.pad_token_id == tok.eos_token_id and cfg.bos_token_id == tok.bos_token_id
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    n = sum(p.numel() for p in model.parameters())
    # 2 * 1024 * 64 embeddings + 2 * (12,288 attention + 24,576 MLP + 128 norms) + 64 final norm
    assert n == 2 * len(tok) * 64 + 2 * (12288 + 24576 + 128) + 64
    assert 100_000 < n < 500_000


def test_same_seed_same_weights_different_seed_different():
    tok = tiny_tokenizer()
    a, b, c = tiny_model(tok, seed=0), tiny_model(tok, seed=0), tiny_model(tok, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


def test_building_does_not_disturb_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model(tiny_tokenizer(), seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_the_tokenizer_is_trained_once_and_each_caller_gets_its_own_copy(monkeypatch):
    from tunesmith.models import tiny

    tiny_model(tiny_tokenizer())

    def never():
        raise AssertionError("the tiny tokenizer was trained again")
    monkeypatch.setattr(tiny, "train_tiny_tokenizer", never)
    first, second = tiny_tokenizer(), tiny_tokenizer()
    first.padding_side = "left"
    assert first is not second and second.padding_side == "right"
    model = tiny_model(tiny_tokenizer(), seed=5)
    ids = tiny_tokenizer()("hello world", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)
