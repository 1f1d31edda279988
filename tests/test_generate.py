"""The generation engine on the tiny model: batching is invisible, stopping is exact, sampling is seeded."""
from __future__ import annotations

import functools
import warnings

import pytest
import torch

from test_speed import lora_model
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


def test_generations_from_several_threads_take_turns(model, tok, prompts, monkeypatch):
    """A generation puts layers and kernels in place on the model for its duration, so two threads generating
    at once run one after the other, each with the completions it gets alone."""
    import threading
    import time

    from tunesmith.models import generate as engine
    stop = [_unused_id(tok)]
    alone = [generate(model, tok, [p], stop_ids=stop, max_new_tokens=6, temperature=1.0, seed=i)
             for i, p in enumerate(prompts[:2])]
    active, most = [0], [0]
    real = engine._decode

    def decode(*a, **k):
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.2)  # long enough for the other thread to reach its decode, were it let in
        try:
            return real(*a, **k)
        finally:
            active[0] -= 1
    monkeypatch.setattr(engine, "_decode", decode)
    got = [None, None]

    def work(i):
        got[i] = generate(model, tok, [prompts[i]], stop_ids=stop, max_new_tokens=6, temperature=1.0, seed=i)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1
    assert [g[0].token_ids for g in got] == [g[0].token_ids for g in alone]


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
    assert len(out) == 1 and isinstance(out[0], Generation) and not out[0].finished
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


def test_a_draw_follows_each_rows_probabilities_down_to_the_least_likely_entries():
    from tunesmith.models.generate import draw
    n = 60_000
    g = torch.Generator().manual_seed(0)
    # unnormalised rows; entries of probability 0 among them, the last one included
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0], [3.5, 1.0, 0.0, 0.5, 0.0]])
    picked = draw(probs.repeat_interleave(n, 0), g).view(2, n)
    for row, p in zip(picked, probs):
        counts = torch.bincount(row, minlength=5).double()
        expected = n * p.double() / p.sum()
        assert torch.all((counts - expected).abs() <= 5 * expected.clamp(min=1).sqrt()), (counts, expected)
        assert torch.all(counts[p == 0] == 0)
    # 200,000 entries of 5e-8 after one of 1 (a vocabulary's long tail): 1% of the mass, each entry under half
    # a float32 unit of the sum before it, drawn at its share (the sums add in float64)
    tail = torch.cat([torch.ones(1), torch.full((200_000,), 5e-8)]).expand(250, -1)
    hits = sum(int((draw(tail, g) > 0).sum()) for _ in range(4))
    assert 3 <= hits <= 25, hits  # 1,000 draws: about 10
    # one uniform number per row: a seeded generator gives the same draws again
    assert torch.equal(draw(probs, torch.Generator().manual_seed(4)), draw(probs, torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("end, expected", [("0", [1, 0]), ("below 1", [2, 1])])
def test_a_draw_at_either_end_of_the_unit_interval_takes_no_entry_of_probability_zero(end, expected, monkeypatch):
    from tunesmith.models.generate import draw
    real = torch.rand

    def rand(*a, **k):  # the least or the greatest number torch.rand can give, in the draw's dtype
        u = real(*a, **k)
        return u.fill_(0.0 if end == "0" else 1 - torch.finfo(u.dtype).eps / 2)
    monkeypatch.setattr(torch, "rand", rand)
    assert draw(torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.3, 0.7, 0.0, 0.0]])).tolist() == expected


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


def test_greedy_equals_transformers_generate(model, tok, prompts):
    """The engine's own KV-cache loop against HF `generate` as the oracle, batched with left padding."""
    stop = [_unused_id(tok)]
    ours = generate(model, tok, prompts, stop_ids=stop, max_new_tokens=10, batch_size=len(prompts))
    ids, mask = left_pad(prompts, tok.pad_token_id, "cpu")
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                             eos_token_id=stop, pad_token_id=tok.pad_token_id)
    assert [g.token_ids for g in ours] == ref[:, ids.shape[1]:].tolist()


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_equal_a_full_forward(model, tok, prompts, temperature):
    """Each returned log-prob is log softmax(logits / T) of the chosen token, recomputed without a cache."""
    out = generate(model, tok, prompts, stop_ids=[_unused_id(tok)], max_new_tokens=6, temperature=temperature,
                   seed=3, batch_size=2)
    for prompt, gen in zip(prompts, out):
        full = torch.tensor([prompt + gen.token_ids])
        with torch.no_grad():
            logits = model(input_ids=full).logits[0, len(prompt) - 1:-1].float()
        logits = logits / (temperature or 1.0)
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(gen.token_ids)[:, None]).squeeze(-1)
        assert len(gen.logprobs) == len(gen.token_ids) == 6
        torch.testing.assert_close(torch.tensor(gen.logprobs), expected, atol=1e-4, rtol=1e-4)


def test_logprobs_cover_the_stop_token_boundary(model, tok, prompts):
    """A stopped row returns log-probs only for its kept tokens (the stop id is dropped with its log-prob)."""
    free = generate(model, tok, prompts[:1], stop_ids=[_unused_id(tok)], max_new_tokens=6)[0]
    stopped = generate(model, tok, prompts[:1], stop_ids=[free.token_ids[3]], max_new_tokens=6)[0]
    k = free.token_ids.index(free.token_ids[3])
    assert stopped.finished and stopped.token_ids == free.token_ids[:k]
    assert stopped.logprobs == pytest.approx(free.logprobs[:k], abs=1e-5)


def test_tiny_top_p_is_greedy(model, tok, prompts):
    stop = [_unused_id(tok)]
    sampled = generate(model, tok, prompts, stop_ids=stop, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=9)
    greedy = generate(model, tok, prompts, stop_ids=stop, max_new_tokens=8)
    assert [g.token_ids for g in sampled] == [g.token_ids for g in greedy]


def test_top_k_limits_the_choice(model, tok, prompts):
    """With top_k=2 every sampled token is one of the two most likely at its position."""
    out = generate(model, tok, prompts[:2], stop_ids=[_unused_id(tok)], max_new_tokens=6, temperature=5.0,
                   top_k=2, seed=1)
    for prompt, gen in zip(prompts, out):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + gen.token_ids])).logits[0, len(prompt) - 1:-1]
        top2 = logits.topk(2, -1).indices
        assert all(t in top2[i].tolist() for i, t in enumerate(gen.token_ids))


def test_stop_strings_cut_the_text(model, tok, prompts):
    free = generate(model, tok, prompts[:1], stop_ids=[_unused_id(tok)], max_new_tokens=8)[0]
    word = tok.decode(free.token_ids[2:3], skip_special_tokens=True).strip()
    assert word, "the third token decodes to text"
    out = generate(model, tok, prompts[:1], stop_ids=[_unused_id(tok)], max_new_tokens=8, stop_strings=[word])[0]
    assert out.finished and word not in out.text
    assert free.text.startswith(out.text) and len(out.token_ids) <= 3


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_static_cache_path_matches_the_dynamic_one(model, tok, prompts, temperature):
    """The CUDA path (static cache, explicit boolean masks, graph replay) run eagerly on CPU: same tokens,
    log-probs and stops as the dynamic-cache loop, left padding included."""
    from tunesmith.models import generate as engine

    batch = [p for p in prompts] + [prompts[0][:3]]
    with torch.inference_mode():  # a random model rarely ends a turn: stop on what it says most instead
        free, _, _ = engine._decode(model, batch, tok.pad_token_id, [_unused_id(tok)], 16,
                                    engine._Sampler(temperature, 1.0, 0, torch.Generator().manual_seed(5)),
                                    torch.device("cpu"))
    stop = [max(set(sum(free, [])), key=sum(free, []).count)]
    runs = []
    decoders = [engine._decode] + [functools.partial(engine._decode_static, check_every=k) for k in (1, 3, 8)]
    # and attends over the cache's first columns, up to the next multiple of `bucket` past the fed token
    decoders += [functools.partial(engine._decode_static, bucket=b) for b in (1, 5)]
    for decode in decoders:  # the static path asks whether all rows stopped every k tokens only
        sampler = engine._Sampler(temperature, 1.0, 0, torch.Generator().manual_seed(5))
        with torch.inference_mode():
            runs.append(decode(model, batch, tok.pad_token_id, stop, 16, sampler, torch.device("cpu")))
    ids, logps, done = runs[0]
    for ids2, logps2, done2 in runs[1:]:
        assert ids == ids2 and done == done2
        assert max(abs(a - b) for r, q in zip(logps, logps2) for a, b in zip(r, q)) < 1e-4
    assert len({len(p) for p in batch}) > 1  # the batch really is left-padded
    assert any(done) and not all(len(r) == 16 for r in ids)  # rows stop early, so the checks matter


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_graphed_decode_loop_takes_every_token_once(model, tok, prompts, temperature, monkeypatch):
    """The loop around the captured step (stand-in here: the step run eagerly at every replay): capturing
    takes no token and loses none, with stop checks every 1 or 8 tokens."""
    from tunesmith.models import generate as engine

    captures = []

    def capture(feed, choose, sampler, pool=None):
        captures.append(1)
        return lambda: choose(feed())

    batch = list(prompts) + [prompts[0][:3]]
    with torch.inference_mode():
        free = engine._decode(model, batch, tok.pad_token_id, [_unused_id(tok)], 16,
                              engine._Sampler(temperature, 1.0, 0, torch.Generator().manual_seed(5)), torch.device("cpu"))[0]
    stop = [max(set(sum(free, [])), key=sum(free, []).count)]
    monkeypatch.setattr(engine, "_capture", capture)
    for k in (1, 8):
        for s in (stop, [_unused_id(tok)]):
            runs = []
            for graph in (False, True):
                sampler = engine._Sampler(temperature, 1.0, 0, torch.Generator().manual_seed(5))
                with torch.inference_mode():
                    runs.append(engine._decode_static(model, batch, tok.pad_token_id, s, 16, sampler,
                                                      torch.device("cpu"), graph=graph, check_every=k))
            assert runs[0] == runs[1]
            if s != stop:
                assert runs[1][0] == free and all(len(r) == 16 for r in runs[1][0])
    # one capture per extent the decode reaches after its first step (two here: it crosses 64 columns)
    extents = set(_extents(max(map(len, batch)), 16, engine.column_bucket(max(map(len, batch)) + 16))[1:])
    assert len(captures) == 4 * len(extents) and len(extents) == 2


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_failed_capture_decodes_the_rest_eagerly(model, tok, prompts, temperature, monkeypatch):
    """A decode step the graph cannot hold makes capture raise before anything runs: the call warns once and
    goes on eagerly, with the tokens, log-probs and stops of the eager loop."""
    from tunesmith.models import generate as engine

    attempts = []

    def capture(feed, choose, sampler, pool=None):
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    batch = list(prompts) + [prompts[0][:3]]
    runs = []
    for graph in (False, True):
        monkeypatch.setattr(engine, "_capture", capture)
        sampler = engine._Sampler(temperature, 1.0, 0, torch.Generator().manual_seed(5))
        with torch.inference_mode(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs.append(engine._decode_static(model, batch, tok.pad_token_id, [_unused_id(tok)], 12, sampler,
                                              torch.device("cpu"), graph=graph))
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert messages == ([] if not graph else
                            ["decoding without a CUDA graph: capturing the decode step failed "
                             "(operation not permitted when stream is capturing)"])
    assert attempts == [1]  # tried once, then eager for the rest of the call
    assert runs[0] == runs[1] and all(len(r) == 12 for r in runs[1][0])


@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_grouped_decode_attention_equals_sdpa_over_repeated_heads(mask_kind):
    """A decode step's query heads grouped per key/value head give SDPA's output over keys and values
    copied out to every head (transformers' repeat_kv order); other calls are SDPA's own."""
    import types

    import torch.nn.functional as F

    from tunesmith.models.generate import grouped_decode_attention

    g = torch.Generator().manual_seed(0)
    b, heads, kv, t, d = 3, 8, 2, 11, 16
    q = torch.randn(b, heads, 1, d, generator=g)
    k, v = torch.randn(b, kv, t, d, generator=g), torch.randn(b, kv, t, d, generator=g)
    allowed = torch.rand(b, 1, 1, t, generator=g) > 0.3
    allowed[..., 0] = True
    mask = {"bool": allowed, "float": torch.zeros(b, 1, 1, t).masked_fill(~allowed, float("-inf")),
            "none": None}[mask_kind]
    reps = heads // kv
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(reps, 1), v.repeat_interleave(reps, 1),
                                              attn_mask=mask, scale=0.3).transpose(1, 2)
    module = types.SimpleNamespace(num_key_value_groups=heads // kv, is_causal=True)
    out, _ = grouped_decode_attention(module, q, k, v, mask, scaling=0.3)
    assert out.shape == (b, 1, heads, d)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # the head order matters: head 1 reads key/value head 0, head 7 reads head 1
    assert not torch.allclose(out[:, :, 1], out[:, :, 7])

    prefill = torch.randn(b, heads, 4, d, generator=g)  # more than one query: SDPA's own path
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    torch.testing.assert_close(grouped_decode_attention(module, prefill, k, v, None)[0],
                               sdpa_attention_forward(module, prefill, k, v, None)[0])


def test_generation_runs_grouped_decode_steps_and_gives_the_same_completions(model, tok, prompts, monkeypatch):
    """The dynamic and static loops run their decode steps through grouped_decode_attention (the tiny model
    has 2 query heads per key/value head), with the completions of SDPA's own attention, and the model's
    attention implementation is its own again afterwards."""
    import contextlib

    from tunesmith.models import generate as engine

    steps = []
    real = engine.grouped_decode_attention
    monkeypatch.setattr(engine, "grouped_decode_attention",
                        lambda m, q, *a, **k: steps.append(q.shape[2]) or real(m, q, *a, **k))
    assert model.config.num_attention_heads // model.config.num_key_value_heads == 2
    batch = list(prompts) + [prompts[0][:3]]
    runs = {}
    for name, grouped in (("grouped", True), ("sdpa", False)):
        if not grouped:
            monkeypatch.setattr(engine, "_grouped_decode", lambda m: contextlib.nullcontext())
        for decode in (engine._decode, engine._decode_static):
            sampler = engine._Sampler(0.8, 1.0, 0, torch.Generator().manual_seed(5))
            with torch.inference_mode(), engine._grouped_decode(model):
                runs[name, decode.__name__] = decode(model, batch, tok.pad_token_id, [_unused_id(tok)], 8,
                                                     sampler, torch.device("cpu"))
        if grouped:
            assert steps.count(1) == 2 * 7 * model.config.num_hidden_layers  # 7 decode steps per loop
    for decode in ("_decode", "_decode_static"):
        ids, logps, done = runs["grouped", decode]
        ids2, logps2, done2 = runs["sdpa", decode]
        assert ids == ids2 and done == done2
        assert max(abs(a - b) for r, q in zip(logps, logps2) for a, b in zip(r, q)) < 1e-5
    assert model.config._attn_implementation == "sdpa"


def _extents(p: int, new: int, bucket: int) -> list[int]:
    """The cache columns each static decode step after the prefill attends over, by hand: the step that
    feeds the t-th new token writes column p + t - 1 and needs every column up to it."""
    return [min(p + new, -(-(p + t) // bucket) * bucket) for t in range(1, new)]


def test_static_decode_steps_read_the_cache_only_up_to_their_extent(model, tok, prompts, monkeypatch):
    """Each decode step's attention gets the cache's keys and values up to its extent, not the whole cache
    (the columns past it are masked out); the tokens are those of the whole-cache steps."""
    import torch.nn.functional as F

    from tunesmith.models import generate as engine

    lengths, real = [], F.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        lengths.append((query.shape[-2], key.shape[-2]))
        return real(query, key, value, **kwargs)

    batch = list(prompts[:3])
    p = max(map(len, batch))
    runs = {}
    for bucket in (4, 10**6):
        lengths.clear()
        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
        with torch.inference_mode(), engine._grouped_decode(model):
            runs[bucket] = engine._decode_static(model, batch, tok.pad_token_id, [_unused_id(tok)], 12,
                                                 engine._Sampler(0.0, 1.0, 0, None), torch.device("cpu"), bucket=bucket)
        monkeypatch.undo()
        decode_steps = [k for q, k in lengths if q == 2]  # a grouped step: the 2 query heads of a key/value head
        layers = model.config.num_hidden_layers
        assert decode_steps == [e for e in _extents(p, 12, bucket) for _ in range(layers)]
    assert _extents(p, 12, 4) != _extents(p, 12, 10**6)  # the extents do grow, and are not the whole cache
    (ids, logps, done), (ids2, logps2, done2) = runs[4], runs[10**6]
    assert ids == ids2 and done == done2
    assert max(abs(a - b) for r, q in zip(logps, logps2) for a, b in zip(r, q)) < 1e-5


def test_each_extent_replays_a_graph_of_its_own(model, tok, prompts, monkeypatch):
    """A graph holds the extent it was captured at: the decode captures one per extent it reaches (after
    the eager first step), and replays each only while the fed token lies inside it."""
    from tunesmith.models import generate as engine

    captured = []

    def capture(feed, choose, sampler, pool=None):
        columns = engine._COLUMNS.get()  # fixed at capture, as a CUDA graph fixes its shapes
        captured.append(columns)

        def replay():
            with engine._attending_over(columns):
                choose(feed())
        return replay

    batch = list(prompts[:3])
    p = max(map(len, batch))
    monkeypatch.setattr(engine, "_capture", capture)
    runs = []
    for graph in (False, True):
        with torch.inference_mode(), engine._grouped_decode(model):
            runs.append(engine._decode_static(model, batch, tok.pad_token_id, [_unused_id(tok)], 14,
                                              engine._Sampler(0.8, 1.0, 0, torch.Generator().manual_seed(3)),
                                              torch.device("cpu"), graph=graph, bucket=3))
    assert captured == sorted(set(_extents(p, 14, 3)[1:])) and len(captured) > 2
    assert runs[0] == runs[1]
    assert engine.column_bucket(384) == 64 and engine.column_bucket(4096) == 512 and engine.column_bucket(10) == 64


def test_static_decoding_serves_only_models_whose_step_a_graph_can_hold():
    """Sliding-window layers shorter than the decode (their cache would not span the step's mask) and
    dynamic RoPE scaling (a host-side length check each step) decode with the dynamic cache."""
    from transformers import Gemma2Config, LlamaConfig, MistralConfig, Qwen2Config

    from tunesmith.models.generate import static_decoding_fits
    assert static_decoding_fits(LlamaConfig(), 10**5)
    for windowed in (MistralConfig(sliding_window=64), Gemma2Config(sliding_window=64)):
        assert static_decoding_fits(windowed, 64) and not static_decoding_fits(windowed, 65)
    assert static_decoding_fits(Qwen2Config(sliding_window=64), 10**4)  # Qwen2 does not use its window by default
    assert not static_decoding_fits(LlamaConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), 10)


def _counting_copies(monkeypatch) -> list[int]:
    """Counts the fused layers' calls: each forward (single or grouped) asks `adapter_copies` once."""
    from tunesmith.models import fused

    calls = []
    real = fused.adapter_copies
    monkeypatch.setattr(fused, "adapter_copies", lambda owner, *a: calls.append(len(a[1])) or real(owner, *a))
    return calls


def test_lora_generation_through_the_fused_layers_equals_peft(tok, prompts, monkeypatch):
    """`kernels=True` decodes a LoRA model (dropout in its adapters: in evaluation it drops nothing) through
    the fused layers, q/k/v and gate/up as groups, on the dynamic and the static loop, with PEFT's tokens and
    log-probs; the model's layers are PEFT's own again afterwards."""
    from tunesmith.models import fused
    from tunesmith.models import generate as engine

    model = lora_model(tok, dropout=0.1)  # LoRA on every projection, B drawn away from zero
    calls = _counting_copies(monkeypatch)
    base = generate(model.get_base_model(), tok, prompts, stop_ids=[_unused_id(tok)], max_new_tokens=8)
    runs = {}
    for kernels in (False, True):
        n_calls = len(calls)
        runs[kernels, "dynamic"] = generate(model, tok, prompts, stop_ids=[_unused_id(tok)], max_new_tokens=8,
                                            temperature=0.8, seed=4, kernels=kernels)
        assert (len(calls) > n_calls) == kernels
        n_calls = len(calls)
        with engine.evaluating(model), engine._grouped_decode(model), fused.fused_for_inference(model, kernels), \
                torch.inference_mode():
            runs[kernels, "static"] = engine._decode_static(
                model, list(prompts), tok.pad_token_id, [_unused_id(tok)], 8,
                engine._Sampler(0.0, 1.0, 0, torch.Generator().manual_seed(5)), torch.device("cpu"))
        assert (len(calls) > n_calls) == kernels
        assert not fused.lora_fused(model) and model.training
        assert not any("_tunesmith_copies" in m.__dict__ for m in fused.lora_layers(model))
    layers = model.config.num_hidden_layers
    # per forward and block: q/k/v and gate/up as groups (3 and 2 adapters), o and down alone (1 each)
    assert sorted(set(calls)) == [1, 2, 3] and calls[:4] == [3, 1, 2, 1] and calls.count(3) % layers == 0
    assert [g.token_ids for g in runs[True, "dynamic"]] == [g.token_ids for g in runs[False, "dynamic"]]
    assert max(abs(a - b) for g, h in zip(runs[True, "dynamic"], runs[False, "dynamic"])
               for a, b in zip(g.logprobs, h.logprobs)) < 1e-5
    assert runs[True, "static"][0] == runs[False, "static"][0]
    assert [g.token_ids for g in runs[True, "dynamic"]] != [g.token_ids for g in base]  # the adapters matter


def test_generation_inside_training_keeps_the_fused_layers_and_drops_its_copies(tok, prompts, monkeypatch):
    """A generation on a model that training's plan has fused (an evaluation hook, say) leaves it fused, and
    leaves no adapter copies made in inference mode for the next training backward to trip on."""
    from tunesmith.models import fused

    model = lora_model(tok)
    ids = torch.tensor([prompts[1]])
    fused.fuse_lora(model)
    try:
        generate(model, tok, prompts[:2], stop_ids=[_unused_id(tok)], max_new_tokens=3, kernels=False)
        assert fused.lora_fused(model)
        model(ids, labels=ids).loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    finally:
        fused.unfuse_lora(model)


def _each_row_prefilled(monkeypatch, engine):
    """The engine as it would run with no prompt shared: every row its own prefill."""
    monkeypatch.setattr(engine, "_distinct", lambda batch, device: (batch, None))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_rows_with_one_prompt_share_its_prefill(model, tok, prompts, temperature, monkeypatch):
    """An RL group's rows repeat a prompt: both loops prefill each distinct prompt once and copy its cache to
    its rows (here 3 prompts over 7 rows, not adjacent), and every row gets the tokens, log-probs and stops
    it gets when every row is prefilled on its own, its own draws included."""
    from tunesmith.models import generate as engine

    batch = [prompts[1], prompts[0], prompts[1], prompts[3], prompts[0], prompts[1], prompts[3]]
    prefills = []
    hook = model.register_forward_pre_hook(
        lambda m, a, k: prefills.append(k["input_ids"].shape) if k["input_ids"].shape[1] > 1 else None,
        with_kwargs=True)
    try:
        runs = {}
        for shared in (True, False):
            if not shared:
                _each_row_prefilled(monkeypatch, engine)
            for decode in (engine._decode, engine._decode_static):
                sampler = engine._Sampler(temperature, 1.0, 0, torch.Generator().manual_seed(5))
                with torch.inference_mode():
                    runs[shared, decode.__name__] = decode(model, batch, tok.pad_token_id, [_unused_id(tok)], 10,
                                                           sampler, torch.device("cpu"))
    finally:
        hook.remove()
    width = max(len(p) for p in batch)
    assert prefills == [(3, width), (3, width), (7, width), (7, width)]
    for decode in ("_decode", "_decode_static"):
        ids, logps, done = runs[True, decode]
        ids2, logps2, done2 = runs[False, decode]
        assert ids == ids2 and done == done2
        assert max(abs(a - b) for r, q in zip(logps, logps2) for a, b in zip(r, q)) < 1e-5
    ids = runs[True, "_decode"][0]
    if temperature:  # the rows of one prompt draw apart
        assert ids[0] != ids[2] or ids[0] != ids[5]
    else:
        assert ids[0] == ids[2] == ids[5] and ids[1] == ids[4]


@pytest.mark.parametrize("kind", ["lora", "prefix", "prompt"])
def test_shared_prefill_serves_adapters_and_virtual_tokens(tok, prompts, kind, monkeypatch):
    """Through `generate`, for a LoRA model and for prefix and prompt tuning (whose virtual tokens enter the
    cache at the prefill and must be copied with it): a group of samples of each prompt is what it is with
    every row prefilled on its own."""
    from tunesmith.config import MethodConfig
    from tunesmith.models import apply_method
    from tunesmith.models import generate as engine

    torch.manual_seed(0)
    method = {"lora": MethodConfig(kind="lora", lora={"r": 4, "alpha": 8, "dropout": 0.0}),
              "prefix": MethodConfig(kind="prefix", prefix={"num_virtual_tokens": 3}),
              "prompt": MethodConfig(kind="prompt", prompt={"num_virtual_tokens": 3})}[kind]
    model = apply_method(tiny_model(tok, seed=0), method)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the adapter something to add
                p.normal_(0, 0.05)
    group = [p for p in prompts[:3] for _ in range(4)]
    runs = []
    for shared in (True, False):
        if not shared:
            _each_row_prefilled(monkeypatch, engine)
        runs.append(generate(model, tok, group, stop_ids=[_unused_id(tok)], max_new_tokens=8, temperature=1.0,
                             seed=3, batch_size=12))
    assert [g.token_ids for g in runs[0]] == [g.token_ids for g in runs[1]]
    assert max(abs(a - b) for g, h in zip(*runs) for a, b in zip(g.logprobs, h.logprobs)) < 1e-5
    assert len({tuple(g.token_ids) for g in runs[0][:4]}) > 1  # a group's samples differ


def test_a_reward_model_is_refused_by_name_not_with_an_index_error(tok, prompts, tiny):
    from tunesmith._core.errors import TunesmithError
    from tunesmith.models.reward import to_reward_model

    with pytest.raises(TunesmithError, match="reward model or classifier .* cannot generate; .*tunesmith score"):
        generate(to_reward_model(tiny), tok, prompts, stop_ids=end_of_turn_ids(tok), max_new_tokens=2)


def test_arguments_a_generation_cannot_honour_are_refused(model, tok, prompts):
    """A temperature whose division overflows would make every probability nan (and every draw the last id);
    a prompt past the model's positions would index out of its position table or run past its RoPE range."""
    stop = end_of_turn_ids(tok)
    for temperature in (float("nan"), float("inf"), 1e-40, -1.0):
        with pytest.raises(ValueError, match="temperature 0 .greedy. or from 1e-6 up"):
            generate(model, tok, prompts, stop_ids=stop, temperature=temperature)
    from tunesmith._core.errors import TunesmithError

    context = model.config.max_position_embeddings
    try:
        model.config.max_position_embeddings = len(prompts[0]) - 1
        with pytest.raises(TunesmithError, match=f"a prompt of {len(prompts[0])} tokens is longer than the model's "
                                                 f"context of {len(prompts[0]) - 1}"):
            generate(model, tok, prompts[:1], stop_ids=stop)
    finally:
        model.config.max_position_embeddings = context


def test_a_stop_string_ends_the_completion_before_any_stop_id(model, tok, prompts):
    """The text is cut at the string; a stop id sampled after it did not end this completion."""
    stop = end_of_turn_ids(tok)
    [full] = generate(model, tok, prompts[:1], stop_ids=stop, max_new_tokens=12)
    assert len(full.token_ids) >= 3
    cut = tok.decode(full.token_ids[:2], skip_special_tokens=True)[-2:]
    [short] = generate(model, tok, prompts[:1], stop_ids=[*stop, full.token_ids[2]], max_new_tokens=12,
                       stop_strings=[cut])
    assert short.finished and short.stop_id is None and cut not in short.text
