"""The generation engine on the tiny model: batching is invisible, stopping is exact, sampling is seeded."""
from __future__ import annotations

import pytest
import torch

from tunesmith.data.render import end_of_turn_ids, render_prompt
from tunesmith.models.generate import Generation, generate, left_pad
from tunesmith.models.tiny import tiny_model, tiny_tokenizer

QUESTIONS = ["hi", "What is 347 + 589? Answer with the number only.",
             "Rewrite the date 4 March 2021 in ISO format.",
             "Meet Maria: 34 years old, living in Lyon. Extract the fields as JSON, please, and nothing else.", "Thanks, that is all."]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok, seed=0)


@pytest.fixture(scope="module")
def prompts(tok):
    return [render_prompt(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]


def _unused_id(tok) -> int:
    # A stop id the model is not going to produce: generation runs to the budget.
    return len(tok) - 1


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_equals_one_at_a_time(model, tok, prompts):
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths, so padding is exercised
    stop = [_unused_id(tok)]
    batched = generate(model, tok, prompts, stop_ids=stop, max_new_tokens=12, batch_size=3)
    single = [generate(model, tok, [p], stop_ids=stop, max_new_tokens=12)[0] for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    assert all(len(g.token_ids) == 12 and not g.finished for g in batched)
    assert batched[0].text == tok.decode(batched[0].token_ids, skip_special_tokens=True)


def _first_new_token_position(ids: list[int]) -> int:
    return next(j for j in range(2, len(ids)) if ids[j] not in ids[:j])


def test_stops_on_a_stop_id_and_drops_it(model, tok, prompts):
    free = generate(model, tok, prompts, stop_ids=[_unused_id(tok)], max_new_tokens=12)
    ids = free[1].token_ids
    k = _first_new_token_position(ids)
    # The greedy token at step k becomes the stop id: prompt 1 must stop right before it, in a batch whose
    # other rows keep going (they get padded after their own stop, which must not leak into the results).
    stopped = generate(model, tok, prompts, stop_ids=[ids[k]], max_new_tokens=12)
    assert stopped[1].token_ids == ids[:k]
    assert stopped[1].finished
    assert stopped[1].text == tok.decode(ids[:k], skip_special_tokens=True)
    for got, full in zip(stopped, free):
        assert ids[k] not in got.token_ids
        assert got.token_ids == full.token_ids[:len(got.token_ids)]
        assert got.finished == (ids[k] in full.token_ids)


def test_end_of_turn_after_k_steps(model, tok, prompts):
    eot = end_of_turn_ids(tok)
    k, calls = 3, []

    def force_end_of_turn(module, args, logits):
        # lm_head runs once for the prompt and once per new token; from the (k+1)-th token on, <|im_end|> wins.
        calls.append(1)
        if len(calls) > k:
            logits = logits.clone()
            logits[..., eot[0]] += 1e4
        return logits

    handle = model.lm_head.register_forward_hook(force_end_of_turn)
    try:
        out = generate(model, tok, prompts, stop_ids=eot, max_new_tokens=8, batch_size=len(prompts))
    finally:
        handle.remove()
    free = generate(model, tok, prompts, stop_ids=[_unused_id(tok)], max_new_tokens=8)
    for got, full in zip(out, free):
        assert got.finished and got.token_ids == full.token_ids[:k]
        assert "<|im_end|>" not in got.text


def test_budget_exhaustion_is_not_finished(model, tok, prompts):
    out = generate(model, tok, prompts[:1], stop_ids=[_unused_id(tok)], max_new_tokens=5)
    assert out == [Generation(out[0].token_ids, out[0].text, False)]
    assert len(out[0].token_ids) == 5


def test_sampling_is_seeded_and_leaves_global_rng_alone(model, tok, prompts):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    kwargs = dict(stop_ids=[_unused_id(tok)], max_new_tokens=16, temperature=1.0, top_k=0, top_p=1.0)
    a = generate(model, tok, prompts, seed=1, **kwargs)
    assert torch.equal(torch.get_rng_state(), before)
    b = generate(model, tok, prompts, seed=1, **kwargs)
    c = generate(model, tok, prompts, seed=2, **kwargs)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    greedy = generate(model, tok, prompts, stop_ids=kwargs["stop_ids"], max_new_tokens=16)
    assert [g.token_ids for g in a] != [g.token_ids for g in greedy]
    assert torch.equal(torch.get_rng_state(), before)


def test_top_k_one_is_greedy(model, tok, prompts):
    stop = [_unused_id(tok)]
    sampled = generate(model, tok, prompts, stop_ids=stop, max_new_tokens=8, temperature=0.7, top_k=1, seed=5)
    greedy = generate(model, tok, prompts, stop_ids=stop, max_new_tokens=8)
    assert [g.token_ids for g in sampled] == [g.token_ids for g in greedy]


def test_training_mode_is_restored(tok, prompts):
    model = tiny_model(tok, seed=1)
    model.train()
    model.model.layers[0].eval()  # a deliberately frozen part keeps its own mode
    generate(model, tok, prompts[:2], stop_ids=[_unused_id(tok)], max_new_tokens=2)
    assert model.training and model.model.layers[1].training
    assert not model.model.layers[0].training


def test_peft_model_generates_like_its_base(model, tok, prompts):
    from peft import LoraConfig, get_peft_model

    base_out = generate(model, tok, prompts, stop_ids=[_unused_id(tok)], max_new_tokens=6)
    peft_model = get_peft_model(tiny_model(tok, seed=0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_out = generate(peft_model, tok, prompts, stop_ids=[_unused_id(tok)], max_new_tokens=6)
    # LoRA starts with B = 0, so the adapted model is the base model until it trains.
    assert [g.token_ids for g in peft_out] == [g.token_ids for g in base_out]


def test_rejects_bad_arguments(model, tok, prompts):
    with pytest.raises(ValueError, match="stop_ids"):
        generate(model, tok, prompts, stop_ids=[])
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, tok, [[]], stop_ids=[2])
    assert generate(model, tok, [], stop_ids=[2]) == []
