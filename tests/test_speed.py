"""Speed features checked against plain references: chunked cross-entropy, the padding-free (varlen) layout,
activation checkpointing and offload, the checkpoint budget, and fit() with a speed plan."""
import contextlib
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from tunesmith._core.errors import TunesmithError
from tunesmith._core.rundir import RunDir
from tunesmith.config import MethodConfig, TrainConfig
from tunesmith.data.packing import collate, collate_flat, shift_labels
from tunesmith.data.render import IGNORE
from tunesmith.losses.cross_entropy import linear_cross_entropy
from tunesmith.models import fused, speed
from tunesmith.training import fit
from tunesmith.training import loop as loop_mod
from tunesmith.training import speed as train_speed
from tunesmith.training.loop import causal_lm_loss, lm_loss
from tunesmith.training.speed import plan_speed


# --- helpers ---------------------------------------------------------------------------------------------

def example(length, g, prompt=2):
    ids = torch.randint(5, 1000, (length,), generator=g).tolist()
    return shift_labels(ids, [IGNORE] * prompt + ids[prompt:])


def packed_rows(seed=0):
    """Rows of several examples each, of unequal total length (so the padded layout really pads)."""
    g = torch.Generator().manual_seed(seed)
    return [[example(5, g), example(7, g), example(4, g)], [example(9, g)], [example(3, g, prompt=1), example(6, g)],
            [example(8, g), example(2, g, prompt=0)]]


def sft_rows(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[example(4 + 3 * (i % 4) + i, g), example(3 + i % 3, g)] for i in range(n)]


def tiny(tokenizer, tied=False, seed=0, **overrides):
    """The tiny Llama of tunesmith.models.tiny, optionally with tied input/output embeddings."""
    if not tied and not overrides:
        from tunesmith.models.tiny import tiny_model
        return tiny_model(tokenizer, seed=seed)
    from transformers import LlamaConfig, LlamaForCausalLM
    kw = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=128, max_position_embeddings=2048,
              tie_word_embeddings=tied, attn_implementation="sdpa")
    kw.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**kw))
    return model.eval()


def named_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_grads_close(a, b, rel=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        err = float(torch.linalg.vector_norm(a[name] - b[name]))
        scale = float(torch.linalg.vector_norm(b[name]))
        assert err <= rel * scale + 1e-9, f"{name}: |diff| {err:.3e} vs |grad| {scale:.3e}"


def flat_mode(model, batch):
    """A flat batch's forward and backward run with the model in varlen attention (as fit() does)."""
    return speed.varlen_attention(model) if "cu_seq_lens" in batch else contextlib.nullcontext()


def loss_and_grads(model, loss_fn, batch):
    model.zero_grad(set_to_none=True)
    with flat_mode(model, batch):
        total, n = loss_fn(model, batch)
        (total / n).backward()
    return float(total.detach()), n, named_grads(model)


# --- 1. linear_cross_entropy ----------------------------------------------------------------------------

def ce_inputs(dtype, seed=0, shape=(3, 13), d=16, vocab=50):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, d, generator=g, dtype=dtype)
    weight = torch.randn(vocab, d, generator=g, dtype=dtype) / math.sqrt(d) * 3
    targets = torch.randint(0, vocab, shape, generator=g)
    targets[torch.rand(shape, generator=g) < 0.3] = IGNORE
    targets[0, 0] = IGNORE
    return hidden, weight, targets


def reference_ce(hidden, weight, targets):
    logits = hidden.reshape(-1, hidden.size(-1)) @ weight.T
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=IGNORE, reduction="sum")


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("rows_per_chunk", [4, 7, None])
def test_linear_cross_entropy_matches_full_logits_value_and_grads(dtype, tol, rows_per_chunk):
    hidden, weight, targets = ce_inputs(dtype)
    n_keep = int((targets != IGNORE).sum())
    assert rows_per_chunk is None or n_keep > 3 * rows_per_chunk  # several chunks, the last one partial

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, n = linear_cross_entropy(h1, w1, targets, rows_per_chunk=rows_per_chunk)
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = reference_ce(h2, w2, targets)

    assert n == n_keep
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=tol)
    loss.backward()
    ref.backward()
    assert h1.grad.shape == hidden.shape and h1.grad.dtype == dtype and w1.grad.dtype == dtype
    torch.testing.assert_close(h1.grad, h2.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=tol, atol=tol)
    # ignored positions get exactly no gradient
    assert torch.all(h1.grad[targets == IGNORE] == 0)


def test_linear_cross_entropy_scales_the_incoming_gradient():
    hidden, weight, targets = ce_inputs(torch.float64, seed=1)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = linear_cross_entropy(h1, w1, targets, rows_per_chunk=5)
    (loss * 0.25).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (reference_ce(h2, w2, targets) * 0.25).backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-6, atol=1e-6)

    # the output used twice: gradients add up (0.25 + 0.5), and a second backward accumulates
    h3, w3 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = linear_cross_entropy(h3, w3, targets, rows_per_chunk=5)
    (loss * 0.25 + loss * 0.5).backward(retain_graph=True)
    torch.testing.assert_close(h3.grad, 3 * h2.grad, rtol=1e-6, atol=1e-6)
    (loss * -1.0).backward()
    torch.testing.assert_close(w3.grad, -1 * w2.grad, rtol=1e-6, atol=1e-6)


def test_linear_cross_entropy_with_one_side_frozen():
    hidden, weight, targets = ce_inputs(torch.float64, seed=2)
    ref_h, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    reference_ce(ref_h, ref_w, targets).backward()

    h = hidden.clone().requires_grad_()
    w = weight.clone()  # frozen output layer
    loss, _ = linear_cross_entropy(h, w, targets, rows_per_chunk=6)
    loss.backward()
    assert w.grad is None
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-6, atol=1e-6)

    h = hidden.clone()  # frozen decoder, trainable head
    w = weight.clone().requires_grad_()
    loss, _ = linear_cross_entropy(h, w, targets, rows_per_chunk=6)
    loss.backward()
    assert h.grad is None
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-6, atol=1e-6)


class CountMatmuls(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_linear_cross_entropy_under_no_grad():
    hidden, weight, targets = ce_inputs(torch.float32, seed=3)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()  # parameters that require grad
    with torch.no_grad():
        loss, n = linear_cross_entropy(h, w, targets, rows_per_chunk=4)
    assert loss.grad_fn is None and not loss.requires_grad
    assert float(loss) == pytest.approx(float(reference_ce(hidden, weight, targets)), rel=1e-5)
    assert n == int((targets != IGNORE).sum())


def test_linear_cross_entropy_under_no_grad_does_no_gradient_work():
    hidden, weight, targets = ce_inputs(torch.float32, seed=3)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    chunks = math.ceil(int((targets != IGNORE).sum()) / 4)
    with CountMatmuls() as mm:
        linear_cross_entropy(h, w, targets, rows_per_chunk=4)
    assert mm.count == 3 * chunks  # with grad: logits, d hidden, d weight
    # evaluation needs only the logits: one matmul per chunk, not the gradient matmuls on top
    with torch.no_grad(), CountMatmuls() as mm:
        linear_cross_entropy(h, w, targets, rows_per_chunk=4)
    assert mm.count == chunks


def test_linear_cross_entropy_all_ignored():
    hidden, weight, _ = ce_inputs(torch.float32, seed=4)
    targets = torch.full(hidden.shape[:-1], IGNORE)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, n = linear_cross_entropy(h, w, targets, rows_per_chunk=4)
    assert n == 0 and float(loss.detach()) == 0.0
    loss.backward()
    assert torch.all(h.grad == 0)


def test_linear_cross_entropy_under_bf16_autocast_is_close_to_plain():
    hidden, weight, targets = ce_inputs(torch.float32, seed=5, shape=(4, 32), d=64, vocab=300)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(h1, w1, targets, rows_per_chunk=16)
    loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = reference_ce(h2, w2, targets)
    ref.backward()
    assert loss.dtype == torch.float32 and h1.grad.dtype == torch.float32 and w1.grad.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-2)
    for a, b in ((h1.grad, h2.grad), (w1.grad, w2.grad)):
        assert float(torch.linalg.vector_norm(a - b)) < 2e-2 * float(torch.linalg.vector_norm(b))


# --- 2. flat vs padded, chunked vs full logits --------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_flat_and_chunked_losses_match_padded_loss_and_gradients(tokenizer, tied):
    model = tiny(tokenizer, tied=tied).train()
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    data = packed_rows()
    padded, flat = collate(data, 0), collate_flat(data, 0)
    assert flat["input_ids"].shape == (1, flat["n_tokens"]) and padded["input_ids"].numel() > flat["n_tokens"]
    assert flat["n_loss_tokens"] == padded["n_loss_tokens"]

    ref_loss, ref_n, ref_g = loss_and_grads(model, causal_lm_loss, padded)
    for loss_fn, batch in ((lm_loss(), flat), (lm_loss(chunked=True), flat), (lm_loss(chunked=True), padded)):
        loss, n, g = loss_and_grads(model, loss_fn, batch)
        assert n == ref_n
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert_grads_close(g, ref_g, rel=1e-5)
    assert model.config._attn_implementation == "sdpa"  # restored after the flat forwards


def test_a_flat_batch_needs_varlen_mode(tokenizer):
    model = tiny(tokenizer)
    batch = collate_flat(packed_rows(), 0)
    with pytest.raises(AssertionError, match="varlen_attention"):
        causal_lm_loss(model, batch)
    assert not speed.in_varlen_mode(model)
    with speed.varlen_attention(model):
        assert speed.in_varlen_mode(model)
        total, n = causal_lm_loss(model, batch)
    assert n == batch["n_loss_tokens"] and math.isfinite(float(total.detach()))


def test_collate_flat_layout():
    data = packed_rows()
    flat = collate_flat(data, 0)
    examples = [e for row in data for e in row]
    lengths = [len(e) for e in examples]
    assert flat["cu_seq_lens"].dtype == torch.int32
    assert flat["cu_seq_lens"].tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert flat["max_length"] == max(lengths)
    assert flat["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    assert flat["input_ids"][0].tolist() == [t for e in examples for t in e.input_ids]
    assert flat["targets"][0].tolist() == [t for e in examples for t in e.targets]
    assert flat["example_ends"][:, 1].tolist() == [c - 1 for c in flat["cu_seq_lens"][1:].tolist()]
    assert flat["n_tokens"] == sum(lengths)


def test_lora_chunked_flat_matches_padded(tokenizer):
    from tunesmith.models import apply_method

    torch.manual_seed(0)
    model = apply_method(tiny(tokenizer), MethodConfig(kind="lora", lora={"r": 4, "alpha": 8, "dropout": 0.0}))
    with torch.no_grad():  # LoRA B starts at zero: make the adapters do something
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    parts = speed.lm_parts(model)
    assert parts is not None and parts[1] is model.get_base_model().lm_head
    model.train()
    data = packed_rows(1)
    ref_loss, _, ref_g = loss_and_grads(model, causal_lm_loss, collate(data, 0))
    loss, _, g = loss_and_grads(model, lm_loss(chunked=True), collate_flat(data, 0))
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert_grads_close(g, ref_g, rel=1e-5)


# --- 3. no leakage across examples of a flat row ---------------------------------------------------------

def test_flat_examples_do_not_see_each_other(tokenizer, monkeypatch):
    model = tiny(tokenizer)
    g = torch.Generator().manual_seed(3)
    examples = [example(n, g) for n in (6, 5, 7)]
    other = example(5, g)
    assert other.input_ids != examples[1].input_ids

    calls = []
    real = speed.varlen_reference
    monkeypatch.setattr(speed, "varlen_reference", lambda *a, **k: calls.append(1) or real(*a, **k))

    def logits(exs, boundaries=True):
        batch = collate_flat([exs], 0)
        kwargs = speed.flat_kwargs(batch, torch.device("cpu")) if boundaries else {}
        with torch.no_grad(), speed.varlen_attention(model):
            return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                         **kwargs).logits[0]

    a = logits(examples)
    assert len(calls) == model.config.num_hidden_layers  # the varlen path really ran
    b = logits([examples[0], other, examples[2]])
    assert torch.equal(a[:6], b[:6])
    assert torch.allclose(a[11:], b[11:], atol=1e-6, rtol=0)  # the example after the changed one
    assert not torch.allclose(a[6:11], b[6:11], atol=1e-3)

    # each example's logits are those of the example run alone, through the model's own attention
    with torch.no_grad():
        for e, (s, t) in zip(examples, ((0, 6), (6, 11), (11, 18))):
            alone = model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
            assert torch.allclose(a[s:t], alone, atol=1e-5, rtol=1e-5)

    # Without the boundaries it is one long causal sequence: the third example would see the second.
    c = logits(examples, boundaries=False)
    d = logits([examples[0], other, examples[2]], boundaries=False)
    assert not torch.allclose(c[11:], d[11:], atol=1e-3)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_flat_forward_never_scans_position_ids_for_packed_rows(tokenizer, monkeypatch, arch):
    """transformers finds packed rows by scanning the position ids and reading the answer back to the host
    (a device sync per forward on a GPU). A flat forward carries its boundaries and must skip that scan,
    and the per-example fallback takes the boundaries from the host list, not from the device tensor."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers import masking_utils

    if arch == "llama":
        model = tiny(tokenizer)
    else:  # sliding-window layers build a second mask: it must pass through as well
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = Qwen2ForCausalLM(Qwen2Config(
                vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=128, use_sliding_window=True, sliding_window=64,
                max_window_layers=1, attn_implementation="sdpa")).eval()
    batch = collate_flat(packed_rows(), 0)
    with torch.no_grad(), speed.varlen_attention(model):  # the expected values, scanning allowed
        expected = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                         **speed.flat_kwargs(batch, torch.device("cpu"))).logits

    def scan(*args, **kwargs):
        raise AssertionError("a flat forward scanned its position ids for packed rows")

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", scan)
    offsets = []
    real = speed.varlen_reference
    monkeypatch.setattr(speed, "varlen_reference", lambda q, k, v, cu, *a: offsets.append(cu) or real(q, k, v, cu, *a))
    kwargs = speed.flat_kwargs(batch, torch.device("cpu"))
    assert kwargs["cu_seq_lens_host"] == batch["cu_seq_lens"].tolist()
    with torch.no_grad(), speed.varlen_attention(model):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                       **kwargs).logits
    assert torch.equal(logits, expected)
    assert len(offsets) == 2 and all(cu is kwargs["cu_seq_lens_host"] for cu in offsets)
    # the padded path still scans: the stand-in is really in place
    padded = collate(packed_rows(), 0)
    with pytest.raises(AssertionError, match="scanned"):
        model(input_ids=padded["input_ids"], position_ids=padded["position_ids"], use_cache=False)


def test_a_padded_packed_batch_is_refused_in_varlen_mode(tokenizer):
    """Varlen attention ignores the packed-row boundaries transformers reads from position ids, so a padded
    batch of packed rows would let its examples see each other: the loss refuses it."""
    model = tiny(tokenizer)
    batch = collate(packed_rows(), 0)
    with torch.no_grad():
        causal_lm_loss(model, batch)
        with speed.varlen_attention(model), pytest.raises(AssertionError, match="padded batch"):
            causal_lm_loss(model, batch)


def test_varlen_attention_restores_the_implementation_on_error(tokenizer):
    model = tiny(tokenizer)
    with pytest.raises(RuntimeError):
        with speed.varlen_attention(model):
            assert model.config._attn_implementation == speed.VARLEN
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


# --- 4. varlen_reference vs a dense block-diagonal causal mask --------------------------------------------

def block_causal_mask(cu):
    n = cu[-1]
    seg = torch.zeros(n, dtype=torch.long)
    for i, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        seg[s:e] = i
    pos = torch.arange(n)
    return (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None])


@pytest.mark.parametrize("scale", [None, 0.3])
def test_varlen_reference_matches_dense_masked_attention_with_gqa(scale):
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, d = 6, 2, 8
    cu = [0, 3, 4, 9, 16, 22]
    n = cu[-1]
    q = torch.randn(heads, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(kv_heads, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(kv_heads, n, d, generator=g, dtype=torch.float64)
    out = speed.varlen_reference(q, k, v, cu, scale)
    assert out.shape == (n, heads, d)

    # dense reference, query head h reading kv head h // (heads / kv_heads) as transformers' repeat_kv does
    mask = block_causal_mask(cu)
    kv_of = torch.arange(heads) // (heads // kv_heads)
    dense = F.scaled_dot_product_attention(q[None], k[kv_of][None], v[kv_of][None], attn_mask=mask,
                                           scale=scale)[0].transpose(0, 1)
    torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)

    # and by hand (softmax over the allowed keys only)
    s = scale if scale is not None else 1 / math.sqrt(d)
    scores = torch.einsum("hid,hjd->hij", q, k[kv_of]) * s
    manual = torch.einsum("hij,hjd->ihd", scores.masked_fill(~mask, -math.inf).softmax(-1), v[kv_of])
    torch.testing.assert_close(out, manual, rtol=1e-10, atol=1e-10)

    # the transformers attention interface returns the same, shaped (1, N, H, D)
    module = torch.nn.Module()
    module.is_causal = True
    got, weights = speed.varlen_attention_forward(
        module, q[None], k[None], v[None], None, scaling=scale,
        cu_seq_lens_q=torch.tensor(cu, dtype=torch.int32), cu_seq_lens_k=torch.tensor(cu, dtype=torch.int32),
        max_length_q=7, max_length_k=7)
    assert weights is None and got.shape == (1, n, heads, d)
    torch.testing.assert_close(got[0], dense, rtol=1e-10, atol=1e-10)



def bottom_right_causal_mask(cu_q, cu_k, left=-1):
    """(Nq, Nk): query t of example i sees example i's keys up to t + (its keys - its queries), and with
    `left` >= 0 only the `left` keys before that one (the flash kernels' `window_size=(left, 0)`)."""
    mask = torch.zeros(cu_q[-1], cu_k[-1], dtype=torch.bool)
    for s, e, a, b in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        mask[s:e, a:b] = torch.ones(e - s, b - a, dtype=torch.bool).tril((b - a) - (e - s))
        if left >= 0:
            mask[s:e, a:b] &= ~torch.ones(e - s, b - a, dtype=torch.bool).tril((b - a) - (e - s) - left - 1)
    return mask


def dense_attention(q, k, v, mask, scale=None, softcap=0.0):
    """(T, H, D) queries over (T, H, D) keys under a (T, T) mask, scores soft-capped where `softcap` > 0."""
    wide = torch.promote_types(q.dtype, torch.float32)  # 16-bit inputs in float32, float64 as it is
    scores = torch.einsum("qhd,khd->hqk", q.to(wide), k.to(wide)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", weights, v.to(wide)).to(q.dtype)


def fake_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0):
    """flash-attn's documented contract, checked strictly: q (total_q, H, D), k/v (total_k, Hkv, D), int32
    offsets, query head h reading kv head h // (H / Hkv), a causal mask aligned to the bottom right where
    an example has more keys than queries, a window of `window_size[0]` keys before the diagonal and soft-
    capped scores where asked; computed densely."""
    assert q.dim() == k.dim() == 3 and q.shape[0] == int(cu_seqlens_q[-1]) and k.shape[0] == int(cu_seqlens_k[-1])
    assert q.shape[1] % k.shape[1] == 0
    assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32 and causal and dropout_p == 0.0
    assert max_seqlen_q == int(cu_seqlens_q.diff().max()) and max_seqlen_k == int(cu_seqlens_k.diff().max())
    assert window_size[1] in (-1, 0)  # causal: nothing to the right of the diagonal either way
    kv_of = torch.arange(q.shape[1]) // (q.shape[1] // k.shape[1])
    mask = bottom_right_causal_mask(cu_seqlens_q.tolist(), cu_seqlens_k.tolist(), window_size[0])
    return dense_attention(q, k[:, kv_of], v[:, kv_of], mask, softmax_scale, softcap)


@pytest.mark.parametrize("scale", [None, 0.3])
def test_the_flash_attn_package_kernel_gets_its_layout_and_arguments(scale, monkeypatch):
    """Where PyTorch has no varlen kernel but the flash-attn package is installed, a flat batch's attention
    goes through `flash_attn_varlen_func` (its layout, offsets, scale and causal flag) and equals the
    per-example reference; the plan names that kernel."""
    monkeypatch.setattr(speed, "_flash_attn_varlen", lambda: fake_flash_attn_varlen_func)
    g = torch.Generator().manual_seed(0)
    cu = [0, 3, 4, 9, 16]
    q = torch.randn(6, 16, 8, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, 2, 16, 8, generator=g, dtype=torch.float64)
    cu_t = torch.tensor(cu, dtype=torch.int32)
    out = speed.flash_attn_varlen(q, k, v, cu_t, cu_t, 7, 7, scale)
    torch.testing.assert_close(out, speed.varlen_reference(q, k, v, cu, scale), rtol=1e-10, atol=1e-10)
    # examples with more keys than queries (a shared prefix): the reference's alignment is the package's
    cu_k = [0, 5, 6, 13, 20]
    kk, vv = torch.randn(2, 2, 20, 8, generator=g, dtype=torch.float64)
    out = speed.flash_attn_varlen(q, kk, vv, cu_t, torch.tensor(cu_k, dtype=torch.int32), 7, 7, scale)
    torch.testing.assert_close(out, speed.varlen_reference(q, kk, vv, cu, scale, cu_k), rtol=1e-10, atol=1e-10)
    assert speed._aligns_bottom_right("flash-attn varlen", "cpu")  # what the once-per-kernel check sees

    def top_left(q, k, v, cu_q, cu_k, max_q, max_k, **kw):  # a kernel aligning the mask the other way
        return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                              is_causal=True).transpose(0, 1)
    monkeypatch.setattr(speed, "_flash_attn_varlen", lambda: top_left)
    assert not speed._aligns_bottom_right("flash-attn varlen", "cpu")  # checked anew for another kernel

    cuda = torch.device("cuda")  # only named, never used
    assert speed.varlen_kernel(torch.device("cpu")) is None
    monkeypatch.setattr(speed, "_runs", lambda kernel, device: True)  # as on a GPU the kernels run on
    monkeypatch.setattr(speed, "_torch_varlen", lambda: None)
    assert speed.varlen_kernel(cuda) == "flash-attn varlen"
    monkeypatch.setattr(speed, "_flash_attn_varlen", lambda: None)
    assert speed.varlen_kernel(cuda) is None and not speed.varlen_available(cuda)


def test_a_kernel_that_does_not_run_on_this_gpu_is_passed_over(monkeypatch):
    """PyTorch's flash kernel raises on a GPU older than Ampere (a T4, a V100): checked once on a small case,
    the flat rows then take the flash-attn package's kernel where it runs, else the per-example path."""
    def too_old(*args, **kwargs):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")
    monkeypatch.setattr(speed, "_torch_varlen", lambda: too_old)
    assert not speed._runs("flash varlen", torch.device("cpu"))
    monkeypatch.setattr(speed, "_torch_varlen", lambda: fake_torch_varlen_attn())
    assert speed._runs("flash varlen", torch.device("cpu"))
    monkeypatch.setattr(speed, "_flash_attn_varlen", lambda: fake_flash_attn_varlen_func)
    assert speed._runs("flash-attn varlen", torch.device("cpu"))

    cuda = torch.device("cuda")  # only named, never used
    runs = {"flash varlen": False, "flash-attn varlen": True}
    monkeypatch.setattr(speed, "_runs", lambda kernel, device: runs[kernel])
    assert speed.varlen_kernel(cuda) == "flash-attn varlen"
    runs["flash-attn varlen"] = False
    assert speed.varlen_kernel(cuda) is None

def fake_torch_varlen_attn(reads_grouped_kv=True, gqa_flag=False, calls=None):
    """PyTorch's `varlen_attn` contract, checked strictly: (T, H, D) 16-bit q and (T, Hkv, D) k/v, int32
    offsets, the true longest lengths, causal asked for as `window_size=(-1, 0)`; computed densely with the
    bottom-right causal mask. torch 2.11's signature, whose flash kernel reads grouped key/value heads
    (`reads_grouped_kv`) though nothing says so, or, with `gqa_flag`, newer torch's, which asks for an
    `enable_gqa` flag. Each call's (query heads, key/value heads) goes to `calls`, and the keys it was asked to
    let each query see before its own (`window_size[0]`, -1 for all) to the kernel's `windows`."""
    windows = []

    def attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=None, window_size=(-1, -1),
               enable_gqa=False):
        assert query.dim() == key.dim() == 3 and query.shape[0] == int(cu_seq_q[-1])
        assert key.shape == value.shape and key.shape[0] == int(cu_seq_k[-1])
        assert query.dtype in (torch.float16, torch.bfloat16) and key.dtype == value.dtype == query.dtype
        assert cu_seq_q.dtype == cu_seq_k.dtype == torch.int32 and window_size[1] == 0 and window_size[0] >= -1
        assert max_q == int(cu_seq_q.diff().max()) and max_k == int(cu_seq_k.diff().max())
        heads, kv_heads = query.shape[1], key.shape[1]
        if heads != kv_heads and not (enable_gqa if gqa_flag else reads_grouped_kv):
            raise RuntimeError("number of heads in key/value must equal the query's")
        if calls is not None:
            calls.append((heads, kv_heads))
        windows.append(window_size[0])
        kv_of = torch.arange(heads) // (heads // kv_heads)
        mask = bottom_right_causal_mask(cu_seq_q.tolist(), cu_seq_k.tolist(), window_size[0])
        out = F.scaled_dot_product_attention(query.float().transpose(0, 1), key.float()[:, kv_of].transpose(0, 1),
                                             value.float()[:, kv_of].transpose(0, 1), attn_mask=mask, scale=scale)
        return out.transpose(0, 1).to(query.dtype)

    if gqa_flag:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False):
            return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size, enable_gqa)
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1)):
            return attend(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size)
    varlen_attn.windows = windows
    return varlen_attn


@pytest.fixture
def torch_flash(monkeypatch):
    """Installs a `fake_torch_varlen_attn` as this CPU's flash kernel: `torch_flash(**options)` returns the
    list its calls go to."""
    def install(**options):
        calls = []
        kernel = fake_torch_varlen_attn(calls=calls, **options)
        monkeypatch.setattr(speed, "_torch_varlen", lambda: kernel)
        monkeypatch.setattr(speed, "varlen_kernel", lambda device: "flash varlen")
        return calls
    return install


@pytest.mark.parametrize("reads_grouped_kv, gqa_flag", [(True, False), (False, False), (False, True)])
def test_the_torch_varlen_kernel_reads_grouped_kv_heads_without_copies_where_it_can(reads_grouped_kv, gqa_flag,
                                                                                     tokenizer, torch_flash):
    """A bf16 model with grouped KV heads (4 query heads, 2 key/value heads) through PyTorch's varlen kernel:
    the kernel gets the 2 key/value heads as they are where it reads groups (newer torch's flag, or torch
    2.11's flash kernel, found by a check on the device once, when varlen mode is entered), and copies out
    to 4 heads where it does not. Either way the loss and gradients are the per-example path's."""
    calls = torch_flash(reads_grouped_kv=reads_grouped_kv, gqa_flag=gqa_flag)
    model = tiny(tokenizer, seed=3).to(torch.bfloat16).train()
    batch = collate_flat(packed_rows(4), 0)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with speed.varlen_attention(model):
            calls.clear()  # what the check ran on entering varlen mode
            total, n = lm_loss(chunked=True)(model, batch)
            (total / n).backward()
        return float(total.detach()), named_grads(model)

    loss, grads = loss_and_grads()
    kv_heads = 2 if reads_grouped_kv or gqa_flag else 4
    assert calls == [(4, kv_heads)] * model.config.num_hidden_layers  # no check inside the forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(speed, "varlen_kernel", lambda device: None)  # one SDPA call per example
        ref_loss, ref = loss_and_grads()
    assert not calls
    assert loss == pytest.approx(ref_loss, rel=1e-2)
    assert max(float((grads[k].float() - ref[k].float()).norm() / ref[k].float().norm()) for k in ref) < 5e-2


WINDOW = 8


def windowed_model(arch, seed=0):
    """Tiny models whose attention does more than causal masking: a sliding window of `WINDOW` keys in every
    layer (Mistral; Qwen2 with its window switched on; Phi-3), in the first of two (Gemma 3's local layer), or soft-
    capped scores beside it (Gemma 2), or a learnt attention sink per head (gpt-oss); the last two in their
    eager attention, the one that applies them."""
    import transformers as tf

    common = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
                  initializer_range=0.2)  # scores large enough that the cap bends them
    config = {"mistral": lambda: tf.MistralConfig(**common),
              "qwen2": lambda: tf.Qwen2Config(use_sliding_window=True, max_window_layers=0, **common),
              "gemma2": lambda: tf.Gemma2Config(attn_logit_softcapping=5.0, **common),
              "gemma3": lambda: tf.Gemma3TextConfig(layer_types=["sliding_attention", "full_attention"], **common),
              "gpt_oss": lambda: tf.GptOssConfig(num_local_experts=2, num_experts_per_tok=1, **common),
              "phi3": lambda: tf.Phi3Config(pad_token_id=0, **common),
              }[arch]()
    config._attn_implementation = "eager" if arch in ("gemma2", "gpt_oss") else "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.AutoModelForCausalLM.from_config(config)
        for m in model.modules():  # sinks start at 0; spread them so each head's takes its own share
            if isinstance(getattr(m, "sinks", None), torch.nn.Parameter):
                m.sinks.data.normal_(0, 2.0)
    return model.train()


def windowed_rows(seed=0):
    """Examples longer than the window beside shorter ones."""
    g = torch.Generator().manual_seed(seed)
    return [[example(30, g), example(5, g)], [example(21, g)], [example(3 * WINDOW, g), example(WINDOW, g)]]


def flat_and_padded(model, rows, dtype=None):
    """(loss, gradients) of the rows as flat rows in varlen mode, then of their examples in padded rows of one
    each, in the model's own attention (which for gpt-oss lets the examples packed in one padded row see each
    other: its masks skip transformers' packed-sequence detection)."""
    out = []
    for batch, mode in ((collate_flat(rows, 0), lambda: speed.varlen_attention(model)),
                        (collate([[e] for row in rows for e in row], 0), contextlib.nullcontext)):
        model.zero_grad(set_to_none=True)
        with mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            total, n = lm_loss()(model, batch)
            (total / n).backward()
        out.append((float(total.detach()) / n, named_grads(model)))
    return out


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gemma2", "gemma3", "gpt_oss", "phi3"])
def test_flat_rows_keep_the_models_sliding_window_and_soft_cap(arch):
    """Sliding-window layers, soft-capped scores and attention sinks on the per-example path: the padded rows'
    loss and gradients, through the model's own attention, for examples up to three windows long."""
    model = windowed_model(arch)
    (flat, flat_g), (padded, padded_g) = flat_and_padded(model, windowed_rows())
    assert flat == pytest.approx(padded, rel=1e-5)
    assert max(float((flat_g[k] - padded_g[k]).norm() / padded_g[k].norm()) for k in padded_g) < 1e-4


@pytest.mark.parametrize("arch", ["mistral", "gemma3", "gemma2", "gpt_oss"])
def test_the_flash_kernels_get_the_window_and_leave_soft_caps_to_the_per_example_path(arch, torch_flash):
    """In bf16 through PyTorch's varlen kernel: a sliding-window layer asks it for `window_size=(W - 1, 0)`
    (each query sees its last W keys, itself included), a full layer for (-1, 0), and soft-capped layers,
    which it cannot cap, take the per-example path, as do layers with attention sinks; the padded rows' loss
    either way. The plan says which parts go per example."""
    torch_flash()
    kernel = speed._torch_varlen()
    speed.check_flash(torch.device("cpu"))  # the kernel checks, which call it, before counting
    kernel.windows.clear()
    model = windowed_model(arch).to(torch.bfloat16)
    (flat, _), (padded, _) = flat_and_padded(model, windowed_rows())
    assert kernel.windows == {"mistral": [WINDOW - 1] * 2, "gemma3": [WINDOW - 1, -1]}.get(arch, [])
    assert flat == pytest.approx(padded, rel=1e-2)
    plan = plan_speed(model, quiet(attention="varlen"), torch.device("cpu"), language_model=True)
    slow = {"gemma2": "; per example for soft-capped scores", "gpt_oss": "; per example for attention sinks"}
    assert plan.kernel == "flash varlen" + slow.get(arch, "")


def test_the_flash_attn_package_gets_the_window_and_the_soft_cap(monkeypatch):
    """The flash-attn package's kernel takes both: Gemma 2's soft-capped local and global layers go through it,
    with the padded rows' loss."""
    calls = []

    def kernel(*args, **kwargs):
        calls.append((kwargs.get("window_size", (-1, -1))[0], kwargs.get("softcap")))
        return fake_flash_attn_varlen_func(*args, **kwargs)
    monkeypatch.setattr(speed, "_torch_varlen", lambda: None)
    monkeypatch.setattr(speed, "_flash_attn_varlen", lambda: kernel)
    monkeypatch.setattr(speed, "varlen_kernel", lambda device: "flash-attn varlen")
    monkeypatch.setattr(speed, "_takes_softcap", lambda fn: True)
    speed.check_flash(torch.device("cpu"))  # the kernel checks, which call it, before counting
    calls.clear()
    model = windowed_model("gemma2").to(torch.bfloat16)
    (flat, _), (padded, _) = flat_and_padded(model, windowed_rows())
    assert calls == [(WINDOW - 1, 5.0), (-1, 5.0)]
    assert flat == pytest.approx(padded, rel=1e-2)


def test_a_window_no_example_outgrows_asks_the_kernel_for_none(torch_flash, monkeypatch):
    """A kernel without a window size (an older torch's, causal by `is_causal`) still serves a windowed model's
    micro-batches whose examples all fit the window; those that do not take the per-example path, and the
    plan says so."""
    def no_window(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                  is_causal=False):
        assert is_causal
        return full(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=(-1, 0))
    full = fake_torch_varlen_attn()
    torch_flash()
    monkeypatch.setattr(speed, "_torch_varlen", lambda: no_window)
    speed.check_flash(torch.device("cpu"))
    model = windowed_model("mistral").to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    short = [[example(WINDOW, g), example(5, g)], [example(WINDOW - 1, g)]]
    one_over = [[example(WINDOW + 1, g), example(5, g)]]
    for rows, through_kernel in ((short, [-1, -1]), (one_over, []), (windowed_rows(), [])):
        full.windows.clear()
        (flat, _), (padded, _) = flat_and_padded(model, rows)
        assert full.windows == through_kernel
        assert flat == pytest.approx(padded, rel=1e-2)
    plan = plan_speed(model, quiet(attention="varlen"), torch.device("cpu"), language_model=True)
    assert plan.kernel == f"flash varlen; per example for examples longer than the {WINDOW}-token sliding window"


def other_model(arch):
    """Tiny models of architectures whose attention keeps packed examples apart in neither layout (Falcon, MPT:
    their masks skip the position ids and their attention skips the varlen implementation), or in both
    (GPT-2)."""
    import transformers as tf

    config = {"falcon": lambda: tf.FalconConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4),
              "mpt": lambda: tf.MptConfig(vocab_size=1000, d_model=64, n_layers=2, n_heads=4),
              "gpt2": lambda: tf.GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4)}[arch]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return tf.AutoModelForCausalLM.from_config(config).train()


@pytest.mark.parametrize("arch, flat, padded", [("mistral", True, True), ("gemma3", True, True), ("gpt2", True, True),
                                                ("gpt_oss", True, False), ("falcon", False, False),
                                                ("mpt", False, False)])
def test_the_check_that_examples_in_one_row_stay_apart(arch, flat, padded):
    """Checked on the model: in a flat row through the varlen implementation, and in a padded row whose
    position ids restart at each example; the model's training mode is left as it was."""
    model = windowed_model(arch) if arch in ("mistral", "gemma3", "gpt_oss") else other_model(arch)
    assert train_speed.keeps_examples_apart(model, flat=True) == flat
    assert train_speed.keeps_examples_apart(model, flat=False) == padded
    assert model.training and all(m.training for m in model.modules())


def test_packed_rows_run_flat_where_padded_ones_would_let_their_examples_meet(tmp_path):
    """gpt-oss packs examples into one padded row with a mask that lets them see each other: under `auto` the
    packed rows run flat (the plan says why) and train on the losses of the examples apart; with `padded` asked
    for the run stops before a step, naming data.packing."""
    g = torch.Generator().manual_seed(2)
    rows = [[example(12, g), example(7, g)], [example(9, g), example(5, g)]]
    apart = windowed_model("gpt_oss")
    with torch.no_grad():
        total, n = lm_loss()(apart.eval(), collate([[e] for row in rows for e in row], 0))
    run = RunDir(tmp_path / "auto").create()
    fit(windowed_model("gpt_oss"), rows, [], quiet(max_steps=1, grad_accum=1), run, pad_id=0, seed=0)
    assert "packed rows run flat" in next(e for e in map(json.loads, run.events.read_text().splitlines())
                                          if e["event"] == "speed")["message"]
    assert run.read_metrics()[0]["loss"] == pytest.approx(float(total) / n, rel=1e-5)
    with pytest.raises(TunesmithError, match="data.packing"):
        fit(windowed_model("gpt_oss"), rows, [], quiet(max_steps=1, attention="padded"),
            RunDir(tmp_path / "padded").create(), pad_id=0, seed=0)


@pytest.mark.parametrize("arch", ["falcon", "mpt"])
def test_a_model_whose_attention_skips_the_varlen_implementation_runs_padded_rows(arch, tmp_path):
    """Falcon's and MPT's attention never calls the varlen implementation, so a flat row would let its examples
    meet: `auto` keeps padded rows (the plan says why), `varlen` asked for stops, and packed rows, which they
    cannot keep apart either way, stop with the setting to change."""
    model = other_model(arch)
    plan = plan_speed(model, quiet(), torch.device("cpu"), language_model=True)
    plan.varlen = True  # as `auto` resolves on a GPU
    train_speed.settle_attention(model, plan, quiet(), packed=False)
    assert not plan.varlen and "padded rows (this model's attention does not take flat rows)" in plan.describe()
    with pytest.raises(TunesmithError, match="train.attention=varlen"):
        fit(model, [[e] for e in sft_rows()[0]], [], quiet(attention="varlen"), RunDir(tmp_path / "v").create(),
            pad_id=0, seed=0)
    with pytest.raises(TunesmithError, match="set data.packing false"):
        fit(model, sft_rows(), [], quiet(), RunDir(tmp_path / "p").create(), pad_id=0, seed=0)


def test_kernel_checks_run_once_per_kernel_and_device(torch_flash):
    """What a flash kernel does is checked on its first use and then read back, for the same kernel;
    another kernel (a test's stand-in, a reloaded module) is checked anew."""
    calls = torch_flash(reads_grouped_kv=True)
    cpu = torch.device("cpu")
    speed.check_flash(cpu)
    first = len(calls)
    speed.check_flash(cpu)
    assert first == 2 and len(calls) == first  # one grouped check, one shared-prefix check
    calls = torch_flash(reads_grouped_kv=False)
    speed.check_flash(cpu)
    assert len(calls) == 1  # the grouped case raised before counting; the shared-prefix case ran
    assert not speed._reads_grouped_kv("cpu") and speed._aligns_bottom_right("flash varlen", "cpu")


def _dense_varlen(q, k, v, cu):
    """Each example causal over itself, (T, H, D) q and (T, Hkv, D) k/v, in float32: the output, and the
    pieces backward needs, per example."""
    kv_of = torch.arange(q.shape[1]) // (q.shape[1] // k.shape[1])
    scale = q.shape[-1] ** -0.5
    for s, e in zip(cu[:-1], cu[1:]):
        qe, ke, ve = (x[s:e].transpose(0, 1).float() for x in (q, k[:, kv_of], v[:, kv_of]))
        scores = (qe @ ke.transpose(1, 2) * scale).masked_fill(~torch.ones(e - s, e - s, dtype=torch.bool).tril(),
                                                               float("-inf"))
        yield s, e, qe, ke, ve, scores.softmax(-1), kv_of, scale


@torch.library.custom_op("tunesmith_test::varlen_attn", mutates_args=())
def opaque_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                  max_q: int, max_k: int) -> torch.Tensor:
    out = torch.empty_like(q)
    for s, e, _, _, ve, p, _, _ in _dense_varlen(q, k, v, cu_q.tolist()):
        out[s:e] = (p @ ve).transpose(0, 1).to(q.dtype)
    return out


@opaque_varlen.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k):
    return torch.empty_like(q)


@torch.library.custom_op("tunesmith_test::varlen_attn_backward", mutates_args=())
def opaque_varlen_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gq, gk, gv = (torch.zeros(x.shape, dtype=torch.float32) for x in (q, k, v))
    for s, e, qe, ke, ve, p, kv_of, scale in _dense_varlen(q, k, v, cu_q.tolist()):
        go = grad[s:e].transpose(0, 1).float()
        gp = go @ ve.transpose(1, 2)
        gs = p * (gp - (gp * p).sum(-1, keepdim=True)) * scale
        gq[s:e] = (gs @ ke).transpose(0, 1)
        gk[s:e].index_add_(1, kv_of, (gs.transpose(1, 2) @ qe).transpose(0, 1))
        gv[s:e].index_add_(1, kv_of, (p.transpose(1, 2) @ go).transpose(0, 1))
    return gq.to(q.dtype), gk.to(k.dtype), gv.to(v.dtype)


@opaque_varlen_backward.register_fake
def _(grad, q, k, v, cu_q):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _opaque_varlen_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])


def _opaque_varlen_grad(ctx, grad):
    q, k, v, cu_q = ctx.saved_tensors
    return (*torch.ops.tunesmith_test.varlen_attn_backward(grad, q, k, v, cu_q), None, None, None, None)


opaque_varlen.register_autograd(_opaque_varlen_grad, setup_context=_opaque_varlen_setup)


def test_compiled_blocks_trace_the_flash_path_whole_and_match_eager(tokenizer, monkeypatch):
    """Blocks compiled as `compile: true` compiles them, fused LoRA groups and a flat row through the flash
    path (and one block's MLP recomputing its product), with PyTorch's varlen kernel stood in for by a custom
    operator opaque to the compiler in forward and backward, as torch's is: traced whole (`fullgraph`, no break anywhere in a block, the kernel checks
    read as constants), over micro-batches of several lengths, with the eager run's losses and gradients."""
    from tunesmith.config import LoraConfig
    from tunesmith.models import apply_method

    calls = []

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1)):
        assert window_size == (-1, 0)
        calls.append(1)
        return torch.ops.tunesmith_test.varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)
    monkeypatch.setattr(speed, "_torch_varlen", lambda: varlen_attn)
    monkeypatch.setattr(speed, "varlen_kernel", lambda device: "flash varlen")
    model = apply_method(tiny(tokenizer, seed=5).to(torch.bfloat16),
                         MethodConfig(kind="lora", lora=LoraConfig(r=4, alpha=8, dropout=0.0))).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    batches = [collate_flat(packed_rows(seed), 0) for seed in (5, 6, 7)]
    fused.fuse_lora(model)
    fused.fuse_mlps(model)
    fused.recompute_products([layer.mlp for layer in speed.decoder_layers(model)], 1)  # one block each way
    speed.check_flash(torch.device("cpu"))  # the kernel checks, which call it, before counting
    calls.clear()

    def run():
        out = []
        with speed.varlen_attention(model):
            for batch in batches:
                model.zero_grad(set_to_none=True)
                total, n = lm_loss(chunked=True)(model, batch)
                (total / n).backward()
                out.append((float(total.detach()), named_grads(model)))
        return out

    try:
        eager = run()
        assert len(calls) == 3 * model.config.num_hidden_layers  # the flash path ran
        for layer in speed.decoder_layers(model):
            layer.compile(dynamic=True, fullgraph=True, backend="aot_eager")
        compiled = run()
    finally:
        speed.uncompile_blocks(model)
        fused.unfuse_mlps(model)
        fused.unfuse_lora(model)
    for (loss, grads), (ref_loss, ref) in zip(compiled, eager):
        assert loss == pytest.approx(ref_loss, rel=1e-2)
        assert_grads_close(grads, ref, rel=5e-2)


# --- 5. activation checkpointing and offload --------------------------------------------------------------

def grads_and_saved_bytes(model, batch):
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        total, n = causal_lm_loss(model, batch)
    (total / n).backward()
    return named_grads(model), saved[0]


def test_checkpointing_keeps_gradients_and_saves_memory(tokenizer):
    model = tiny(tokenizer, num_hidden_layers=3).train()
    layers = speed.decoder_layers(model)
    assert len(layers) == 3
    batch = collate(packed_rows(), 0)
    ref, ref_bytes = grads_and_saved_bytes(model, batch)
    previous = ref_bytes
    for n in (1, 2, 3, 99):
        assert speed.set_checkpointing(model, n) == min(n, 3)
        assert [layer.gradient_checkpointing for layer in layers] == [i < n for i in range(3)]
        g, saved = grads_and_saved_bytes(model, batch)
        assert_grads_close(g, ref, rel=1e-6)
        if n <= 3:
            assert saved < previous, (n, saved, previous)
        else:
            assert saved == previous
        previous = saved
    assert speed.set_checkpointing(model, 0) == 0
    g, saved = grads_and_saved_bytes(model, batch)
    assert saved == ref_bytes and not any(layer.gradient_checkpointing for layer in layers)


def test_checkpointing_in_the_flat_chunked_path(tokenizer):
    model = tiny(tokenizer, tied=True).train()
    batch = collate_flat(packed_rows(2), 0)
    _, _, ref = loss_and_grads(model, lm_loss(chunked=True), batch)
    speed.set_checkpointing(model, 2)
    _, _, g = loss_and_grads(model, lm_loss(chunked=True), batch)
    assert_grads_close(g, ref, rel=1e-6)


def test_offloaded_activations_keep_gradients(tokenizer):
    batch = collate(packed_rows(), 0)
    model = tiny(tokenizer, num_hidden_layers=3).train()
    ref, ref_bytes = grads_and_saved_bytes(model, batch)

    model = tiny(tokenizer, num_hidden_layers=3).train()
    speed.set_checkpointing(model, 0, offload=True)
    g, saved = grads_and_saved_bytes(model, batch)
    assert_grads_close(g, ref, rel=1e-6)
    # the blocks' saved tensors went through save_on_cpu's hooks, not the outer ones
    assert saved < ref_bytes

    model = tiny(tokenizer, num_hidden_layers=3).train()
    speed.set_checkpointing(model, 1, offload=True)  # first block recomputed, the others offloaded
    g, _ = grads_and_saved_bytes(model, batch)
    assert_grads_close(g, ref, rel=1e-6)


@pytest.mark.parametrize("flat", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_offloaded_checkpoints_and_mlp_chunks_keep_gradients(tokenizer, flat, dropout):
    """Checkpointed blocks whose inputs wait in host memory, and MLPs run a few tokens at a time: the
    LoRA gradients of the plain model (with dropout too: the recomputation replays the RNG), while the
    blocks keep nothing in autograd's saved tensors."""
    batch = (collate_flat if flat else collate)(packed_rows(), 0)

    def grads(model):
        torch.manual_seed(5)  # the same dropout masks for every variant
        with flat_mode(model, batch):
            return grads_and_saved_bytes(model, batch)

    model = lora_model(tokenizer, dropout=dropout).train()
    ref, ref_bytes = grads(model)
    speed.set_checkpointing(model, 99)
    _, checkpointed_bytes = grads(model)
    mlps = [layer.mlp for layer in speed.decoder_layers(model)]
    for mlp in mlps:  # the MLPs split into 3-token chunks by plain autograd: the same dropout draws as chunking
        mlp.forward = (lambda m: lambda x: torch.cat([type(m).forward(m, c) for c in x.split(3, dim=-2)], -2))(mlp)
    speed.set_checkpointing(model, 0)
    ref_chunked, _ = grads(model)
    for mlp in mlps:
        del mlp.forward
    for layers, offload, chunk in [(99, True, None), (0, False, 3), (99, True, 3), (1, True, 3)]:
        speed.set_checkpointing(model, layers, offload=offload)
        assert speed.set_mlp_chunks(model, chunk) == (2 if chunk else 0)
        g, saved = grads(model)
        assert_grads_close(g, ref_chunked if chunk and dropout else ref, rel=1e-5)
        if layers == 99 and offload:
            assert saved < checkpointed_bytes < ref_bytes  # not even the blocks' inputs stay
    speed.set_mlp_chunks(model, None)
    speed.set_checkpointing(model, 0)
    assert not any("forward" in layer.mlp.__dict__ for layer in speed.decoder_layers(model))
    g, saved = grads(model)
    assert_grads_close(g, ref, rel=1e-6) and saved == ref_bytes


def test_offloaded_checkpoints_and_mlp_chunks_on_a_partly_frozen_model(tokenizer):
    """method freeze: the first block trains nothing and its input needs no gradient; the last trains."""
    from tunesmith.config import MethodConfig
    from tunesmith.models.methods import apply_method

    batch = collate(packed_rows(), 0)
    model = apply_method(tiny(tokenizer, num_hidden_layers=3).train(),
                         MethodConfig(kind="freeze", freeze={"train_last_n_layers": 1}))
    ref, _ = grads_and_saved_bytes(model, batch)
    speed.set_checkpointing(model, 99, offload=True)
    for chunk in (None, 4):
        speed.set_mlp_chunks(model, chunk)
        g, _ = grads_and_saved_bytes(model, batch)
        assert_grads_close(g, ref, rel=1e-5)


def test_mlp_chunks_wrap_the_forward_a_kernel_library_installed(tokenizer):
    model = lora_model(tokenizer).train()
    mlp = speed.decoder_layers(model)[0].mlp
    calls = []

    def kernel_forward(x):  # as Liger binds its SwiGLU to the instance
        calls.append(x.shape[-2])
        return type(mlp).forward(mlp, x)

    mlp.forward = kernel_forward
    speed.set_mlp_chunks(model, 4)
    x = torch.randn(1, 10, 64)
    mlp(x)
    assert calls == [4, 4, 2]  # the library's forward, a chunk at a time
    speed.set_mlp_chunks(model, None)
    assert mlp.forward is kernel_forward


def liger_like(calls: list):
    """A stand-in for Liger's patch: it rebinds names of the transformers modeling module and the MLP
    forwards of the model's blocks, each noting its calls in `calls`."""
    import transformers.models.llama.modeling_llama as modeling
    names = dict(vars(modeling))

    def rope(q, k, *a, **kw):
        calls.append("rope")
        return names["apply_rotary_pos_emb"](q, k, *a, **kw)

    def patch(m):
        base = m.get_base_model() if hasattr(m, "get_base_model") else m
        modeling.apply_rotary_pos_emb = rope
        modeling.LlamaMLP = type("KernelMLP", (torch.nn.Module,), {})
        for layer in base.model.layers:
            mlp = layer.mlp
            layer.mlp.forward = lambda x, mlp=mlp: calls.append("mlp") or type(mlp).forward(mlp, x)
            layer.mlp._get_name = lambda: "KernelMLP"
    return patch


def test_kernel_patches_come_off_with_the_speed_plan(tokenizer, monkeypatch):
    """A Liger-style patch rebinds names of the whole transformers modeling module and forwards on module
    instances; `applied()` takes both off when training ends, so evaluation, generation and every other
    model of the architecture run their own layers (a patch that fails is undone before it raises)."""
    import transformers.models.llama.modeling_llama as modeling

    from tunesmith.training.speed import applied, plan_speed
    names = dict(vars(modeling))
    model = lora_model(tokenizer).train()
    ids = torch.tensor([[5, 17, 99, 4, 250, 31]])
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
    calls = []
    patch = liger_like(calls)

    def fake_apply(m):
        base = m.get_base_model()
        return speed.undoable_patch(base, lambda: patch(base))

    monkeypatch.setattr(speed, "apply_liger", fake_apply)
    plan = plan_speed(model, quiet(kernels="on"), torch.device("cpu"), language_model=True)
    with applied(model, plan):
        assert plan.liger
        with torch.no_grad():
            during = model(ids, use_cache=False).logits
        assert calls.count("rope") == 2 and calls.count("mlp") == 2  # two blocks
    torch.testing.assert_close(during, before)
    assert dict(vars(modeling)) == names  # nothing of the patch is left in the module
    assert not any(k in m.__dict__ for m in model.modules() for k in ("forward", "_get_name"))
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, before)
        tiny(tokenizer)(ids)
    assert calls == []

    def failing(base):
        patch(base)
        raise RuntimeError("unknown architecture")
    base = model.get_base_model()
    with pytest.raises(RuntimeError, match="unknown architecture"):
        speed.undoable_patch(base, lambda: failing(base))
    assert dict(vars(modeling)) == names and not any("forward" in m.__dict__ for m in model.modules())


# --- 6. the checkpoint budget -----------------------------------------------------------------------------

def test_the_budget_counts_each_trainable_weights_gradient_and_moments_in_their_own_width(tokenizer):
    """What a trainable weight costs beside itself: its gradient and AdamW's two moments, in its dtype (12
    bytes for a float32 weight, 6 for a bfloat16 one under `BFloat16AdamW` or torch's AdamW), or with the
    moments in a byte each for the 8-bit optimisers; frozen weights cost only themselves."""
    model = tiny(tokenizer, num_hidden_layers=2)
    n = sum(p.numel() for p in model.parameters())
    extra = sum(b.numel() * b.element_size() for b in model.buffers())
    assert speed.CheckpointBudget(model, math.inf).fixed == n * 4 + extra + n * 12
    assert speed.CheckpointBudget(model, math.inf, eight_bit_moments=True).fixed == n * 4 + extra + n * 6
    model.to(torch.bfloat16)
    assert speed.CheckpointBudget(model, math.inf).fixed - sum(
        b.numel() * b.element_size() for b in model.buffers()) == n * 2 + n * 6
    model.requires_grad_(False)
    head = model.lm_head.weight.requires_grad_(True).numel()
    assert speed.CheckpointBudget(model, math.inf).fixed - sum(
        b.numel() * b.element_size() for b in model.buffers()) == n * 2 + head * 6


def test_checkpoint_budget(tokenizer):
    model = tiny(tokenizer, num_hidden_layers=6)
    probe = speed.CheckpointBudget(model, math.inf)
    assert probe.blocks == 6 and probe.per_token > probe.boundary > 0
    assert [probe.layers_for(t) for t in (1, 10**4, 10**9)] == [0, 0, 0]

    tiny_budget = speed.CheckpointBudget(model, 1.0)
    assert [tiny_budget.layers_for(t) for t in (1, 10**4)] == [6, 6]

    # a budget where the choice moves through every count of blocks as micro-batches grow
    tokens = [2**i for i in range(4, 11)] + list(range(2048, 9000, 128)) + [2**i for i in range(14, 24)]
    budget = speed.CheckpointBudget(model, probe.fixed + 5_000 * probe.per_token * 3)
    ks = [budget.layers_for(t) for t in tokens]
    assert ks == sorted(ks), ks
    assert ks[0] == 0 and ks[-1] == 6 and len(set(ks)) >= 4, ks
    for t, k in zip(tokens, ks):
        for j in range(6):
            assert budget.estimate(t, j + 1) < budget.estimate(t, j)  # each checkpointed block saves memory
        if k < 6:
            assert budget.estimate(t, k) <= budget.budget
        if k > 0:
            assert budget.estimate(t, k - 1) > budget.budget  # the fewest blocks that fit

    # the loss's working memory per token pushes the choice up, never down
    with_loss = speed.CheckpointBudget(model, budget.budget, loss_bytes_per_token=12.0 * 1024)
    assert all(a >= b for a, b in zip([with_loss.layers_for(t) for t in tokens], ks))

    # long mode: only where every block checkpointed does not fit, and it needs less than that
    long = [budget.long_for(t) for t in tokens]
    assert long == sorted(long) and any(long) and not all(long)
    for t, is_long in zip(tokens, long):
        assert is_long == (budget.estimate(t, 6) > budget.budget)
        assert budget.estimate(t, 6, long=True) < budget.estimate(t, 6)
    assert probe.mlp_per_token < probe.per_token
    big = 10**6  # chunks of LONG_MLP_CHUNK tokens: the MLP's share shrinks to chunk/tokens of itself
    saved = probe.estimate(big, 6) - probe.estimate(big, 6, long=True)
    want = big * (6 * probe.boundary + probe.mlp_per_token * (1 - speed.LONG_MLP_CHUNK / big))
    assert saved == pytest.approx(want)

    # offloaded activations: one block on the GPU whatever is checkpointed, so nothing is recomputed
    # until even that does not fit (then long mode chunks the MLP)
    offloaded = speed.CheckpointBudget(model, budget.budget, offload=True)
    assert all(offloaded.estimate(t, 0) == offloaded.estimate(t, 6) == probe.fixed + t * probe.per_token
               for t in tokens)
    assert [offloaded.layers_for(t) for t in tokens if not offloaded.long_for(t)] == [0] * sum(
        not offloaded.long_for(t) for t in tokens)
    assert sum(map(offloaded.long_for, tokens)) <= sum(long) and any(map(offloaded.long_for, tokens))
    assert all(offloaded.estimate(t, 6) < budget.estimate(t, 6) for t in tokens)
    assert any(k > 0 for t, k in zip(tokens, ks) if not offloaded.long_for(t))  # without offload, some were


def test_the_budget_recomputes_mlp_products_before_it_checkpoints_a_block(tokenizer):
    """Where the MLPs can recompute their product, a micro-batch just over the budget gets the fewest such
    MLPs (the last blocks') and no checkpointed block; one over it even with every MLP doing so gets the
    fewest checkpointed blocks and the fewest products beside them. Offloaded activations need neither."""
    model = tiny(tokenizer, num_hidden_layers=6)
    plain = speed.CheckpointBudget(model, math.inf)
    lean = plain.per_token - plain.per_token_lean
    assert lean == speed.mlp_bytes_per_token(model.config, lora=False, kept=2) and plain.lean_saving == 0
    tokens = [2**i for i in range(4, 20)] + list(range(2048, 9000, 256))
    budget = speed.CheckpointBudget(model, plain.fixed + 5_000 * plain.per_token * 3)
    before = [budget.plan_for(t) for t in tokens]
    assert all(n == 0 for _, n in before) and any(k for k, _ in before)
    budget.allow_products(5)
    assert budget.lean_saving == 0  # all blocks or none
    budget.allow_products(6)
    assert budget.lean_saving == lean
    plans = [budget.plan_for(t) for t in tokens]
    assert any(k == 0 and n > 0 for k, n in plans) and any(k > 0 and n > 0 for k, n in plans)
    for t, (k, n), (k0, _) in zip(tokens, plans, before):
        assert k <= k0 and k + n <= 6 and budget.layers_for(t) == k
        if k < 6:
            assert budget.estimate(t, k, products=n) <= budget.budget
        if n > 0:
            assert budget.estimate(t, k, products=n - 1) > budget.budget  # the fewest products
        if k > 0:
            assert budget.estimate(t, k - 1, products=6 - k + 1) > budget.budget  # the fewest blocks
    # a measurement counts where it exceeds the formula, for the lean blocks too
    budget.observe(budget.estimated * 2, budget.estimated_lean * 3)
    assert budget.per_token_lean == budget.estimated_lean * 3 and budget.lean_saving == 0
    offloaded = speed.CheckpointBudget(model, budget.budget, offload=True)
    offloaded.allow_products(6)
    assert all(offloaded.plan_for(t)[1] == 0 for t in tokens)


def test_fit_recomputes_mlp_products_where_the_budget_needs_it_and_matches_plain_fit(tokenizer, tmp_path):
    """fit() with fused kernels and a budget that only the MLPs recomputing their product fit: the largest
    micro-batches take that path in every block, smaller ones in fewer, none is checkpointed, the speed event
    says so, and losses and adapters equal a plain fit's."""
    # full logits: the chunked loss's fixed reserve would dwarf what the MLP products save on a tiny model
    kw = dict(max_steps=3, micro_batch_size=2, grad_accum=2, kernels="on", loss_chunking="off")
    results, sizes = [], []
    for budget in (None, "products"):
        model = grouped_lora_model(tiny(tokenizer), "all-linear")
        settings = {}
        if budget:
            plan = plan_speed(model, quiet(checkpointing="auto", memory_budget_gib=1.0, **kw), torch.device("cpu"),
                              language_model=True)
            with train_speed.applied(model, plan):  # as measured when fit() applies it
                gib = plan.budget.estimate(max(sizes), 0, products=2) * 1.0001 / 2**30
            settings = dict(checkpointing="auto", memory_budget_gib=gib)
        run, calls = RunDir(tmp_path / str(budget)).create(), []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(loop_mod, "before_forward", lambda m, p, n, f=loop_mod.before_forward: sizes.append(n) or
                       calls.append(("tokens", n)) or f(m, p, n))
            mp.setattr(fused._GatedDown, "forward", staticmethod(
                lambda *a, f=fused._GatedDown.forward: calls.append(a[1].shape[-2]) or f(*a)))
            mp.setattr(speed, "set_checkpointing", lambda m, n, offload=False, f=speed.set_checkpointing:
                       calls.append(("checkpointed", n)) or f(m, n, offload))
            mp.setattr(fused, "recompute_products", lambda mlps, n, f=fused.recompute_products:
                       calls.append(("products", n)) or f(mlps, n))
            fit(model, sft_rows(), [], quiet(**kw, **settings), run, pad_id=0, seed=0)
        results.append((model, run.read_metrics(), calls, run.events.read_text()))
    (ref, ref_m, ref_calls, _), (model, m, calls, events) = results
    assert not any(isinstance(c, int) for c in ref_calls)
    assert all(c[1] == 0 for c in calls if isinstance(c, tuple) and c[0] == "checkpointed")
    first = next(i for i, c in enumerate(calls) if isinstance(c, tuple) and c[0] == "tokens")
    calls = calls[first:]  # past the measuring forwards
    on = [c[1] for c in calls if isinstance(c, tuple) and c[0] == "products"]  # per micro-batch
    assert len(on) == len(sizes) // 2 and max(on) == 2 and 0 < sum(on) < 2 * len(on)
    assert sum(isinstance(c, int) for c in calls) == sum(on)  # the forwards that took the recomputing path
    assert "MLP products recomputed in backward: 0-2 of the other blocks" in events, events
    assert re.search(r"KiB counted \([\d.]+ and [\d.]+ with the MLP's product recomputed\)", events), events
    assert [x["loss"] for x in m] == pytest.approx([x["loss"] for x in ref_m], rel=1e-5)
    for (n, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), n
    assert not any("forward" in layer.mlp.__dict__ for layer in speed.decoder_layers(model))


def test_fit_runs_micro_batches_over_the_budget_in_long_mode(tokenizer, tmp_path):
    """A budget nothing fits: every micro-batch in long mode (offloaded inputs, chunked MLPs), reported,
    and the same losses as the plain path."""
    _, ref, _ = run_fit(tokenizer, tmp_path, "plain")
    model, metrics, events = run_fit(tokenizer, tmp_path, "long", memory_budget_gib=1e-6)
    message = next(e["message"] for e in events if e["event"] == "speed")
    assert "long mode for" in message and "MLPs in chunks of 8192 tokens" in message, message
    assert [m["loss"] for m in metrics] == pytest.approx([m["loss"] for m in ref], rel=1e-5)
    assert not any("forward" in layer.mlp.__dict__ for layer in speed.decoder_layers(model))  # undone after


class OutOfMemoryInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def short_of_memory(model, seen, over=None, below=None):
    """The language-model loss on a stand-in GPU: a micro-batch of `over` tokens or more with fewer than
    `below` blocks checkpointed runs out of memory in its backward (the real one would somewhere in it)."""
    inner = lm_loss()

    def loss(m, batch):
        total, n = inner(m, batch)
        checkpointed = sum(layer.gradient_checkpointing for layer in speed.decoder_layers(model))
        seen.append((batch["n_tokens"], checkpointed))
        if over is not None and batch["n_tokens"] >= over and checkpointed < below:
            total = OutOfMemoryInBackward.apply(total)
        return total, n
    return loss


def test_a_step_that_runs_out_of_memory_runs_again_with_more_blocks_checkpointed(tokenizer, tmp_path):
    """The activation estimate was short: the micro-batch that ran out of memory (in its backward, after
    the window's first micro-batch had added its gradients) and its like get more blocks checkpointed, the
    step runs again from zeroed gradients, and the run ends as a plain run does, saying what happened."""
    kw = dict(max_steps=3, micro_batch_size=2, grad_accum=2)
    ref, seen = tiny(tokenizer), []
    fit(ref, sft_rows(), [], quiet(**kw), RunDir(tmp_path / "ref").create(), pad_id=0, seed=0,
        loss_fn=short_of_memory(ref, seen))
    sizes = [t for t, _ in seen]
    big = max(sizes)
    assert sizes.index(big) % 2 == 1  # second in its window: the first one's gradients are in by then
    probe = plan_speed(tiny(tokenizer), quiet(checkpointing="auto", memory_budget_gib=1.0), torch.device("cpu"),
                       language_model=False).budget
    # a budget where, as estimated, every micro-batch fits with no block checkpointed, the largest narrowly
    budget = probe.estimate(big, 0) * 1.01

    model, seen, run = tiny(tokenizer), [], RunDir(tmp_path / "oom").create()
    fit(model, sft_rows(), [], quiet(checkpointing="auto", memory_budget_gib=budget / 2**30, **kw), run,
        pad_id=0, seed=0, loss_fn=short_of_memory(model, seen, over=big, below=2))
    assert seen[:len(sizes)][:sizes.index(big) + 1] == [(t, 0) for t in sizes[:sizes.index(big) + 1]]
    retries = [e for e in map(json.loads, run.events.read_text().splitlines()) if e["event"] == "out_of_memory"]
    assert retries and all(f"a micro-batch of {big} tokens ran out of memory" in e["message"] for e in retries)
    assert "2 of 2 blocks checkpointed" in retries[-1]["message"]
    assert [k for t, k in seen if t == big][-1] == 2 and len(seen) == len(sizes) + 2 * len(retries)
    assert [m["loss"] for m in run.read_metrics()] == pytest.approx([m["loss"] for m in
                                                                    RunDir(tmp_path / "ref").read_metrics()])
    for (name, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name  # no gradient of a failed attempt survives


def test_out_of_memory_with_nothing_left_to_recompute_says_what_to_change(tokenizer, tmp_path):
    from tunesmith._core.errors import TunesmithError

    for settings, fix in ((dict(checkpointing=1), "set train.checkpointing: auto"),
                          (dict(checkpointing="auto", memory_budget_gib=1e-6), "every block's input in host memory")):
        model, seen = tiny(tokenizer), []
        run = RunDir(tmp_path / str(settings["checkpointing"])).create()
        with pytest.raises(TunesmithError, match=rf"step 1: out of GPU memory on a micro-batch of \d+ tokens "
                                                 rf"\(CUDA out of memory. Tried to allocate 2.00 GiB\); .*{fix}"):
            fit(model, sft_rows(), [], quiet(**settings), run, pad_id=0, seed=0,
                loss_fn=short_of_memory(model, seen, over=0, below=3))
        assert len(seen) == 1  # no retry where nothing more can be recomputed


def test_blocks_that_fail_to_compile_run_eagerly_and_the_run_says_so(tokenizer, tmp_path, monkeypatch):
    """torch.compile failing inside a step (here a backend that raises, standing in for a dynamo or
    inductor failure on some torch version): the step runs again with eager blocks, from zeroed gradients,
    and the run ends as a plain run does, with a `compile_failed` event and a warning naming the error.
    An error of the model's own code is not taken for a compile failure."""
    import torch._dynamo

    def failing_backend(gm, example_inputs):
        raise AssertionError("the backend cannot take this graph")

    def compile_blocks(model):
        for layer in speed.decoder_layers(model):
            layer.compile(backend=failing_backend)
        return len(speed.decoder_layers(model))

    import transformers.models.llama.modeling_llama as modeling

    monkeypatch.setattr(speed, "compile_blocks", compile_blocks)

    def own(module) -> dict:  # the module's names but for dynamo's (older transformers compile within it;
        # `torch._dynamo.reset()` drops the compiled functions earlier tests left there)
        return {k: v for k, v in vars(module).items()
                if not k.startswith(("__builtins_dict__", "__import_", "__compiled_fn_"))}

    calls, names = [], own(modeling)
    patch = liger_like(calls)
    monkeypatch.setattr(speed, "apply_liger", lambda m: speed.undoable_patch(m, lambda: patch(m)))
    kw = dict(max_steps=3, micro_batch_size=2, grad_accum=2, kernels="on")
    ref = tiny(tokenizer)
    fit(ref, sft_rows(), [], quiet(**kw), RunDir(tmp_path / "ref").create(), pad_id=0, seed=0)
    assert calls and set(calls) == {"rope", "mlp"}  # Liger's kernels without compile
    model, run = tiny(tokenizer), RunDir(tmp_path / "compiled").create()
    calls.clear()
    real_compile_failure = train_speed.after_compile_failure

    def failure(*a):  # compiled blocks leave Liger's kernels out (the compiler fuses those layers itself)
        assert modeling.apply_rotary_pos_emb is names["apply_rotary_pos_emb"] and calls == []
        return real_compile_failure(*a)
    monkeypatch.setattr(train_speed, "after_compile_failure", failure)
    try:
        with pytest.warns(UserWarning, match="compiling the transformer blocks failed"):
            fit(model, sft_rows(), [], quiet(compile=True, **kw), run, pad_id=0, seed=0)
    finally:
        torch._dynamo.reset()
    assert set(calls) == {"rope", "mlp"}  # ... and the eager blocks take them after the failure
    assert own(modeling) == names and not any("forward" in m.__dict__ for m in model.modules())
    events = [e for e in map(json.loads, run.events.read_text().splitlines())]
    failed = [e for e in events if e["event"] == "compile_failed"]
    assert len(failed) == 1 and "the backend cannot take this graph" in failed[0]["message"], failed
    assert "step 1:" in failed[0]["message"] and "eager blocks" in failed[0]["message"]
    assert all(layer._compiled_call_impl is None for layer in speed.decoder_layers(model))
    assert [m["loss"] for m in run.read_metrics()] == pytest.approx([m["loss"] for m in
                                                                    RunDir(tmp_path / "ref").read_metrics()])
    for (name, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name

    from torch._dynamo.exc import InternalTorchDynamoError

    from tunesmith.training.speed import compile_failure_reason
    traced = InternalTorchDynamoError('AssertionError: speculate_subgraph\n\nfrom user code:\n   File "a.py", line 3, '
                                      'in f\n    g()\n   File "fused.py", line 60, in forward\n    out = x\n\n'
                                      'Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace')
    assert compile_failure_reason(traced) == ('InternalTorchDynamoError: AssertionError: speculate_subgraph at '
                                              'File "fused.py", line 60, in forward')

    def model_error(m, batch):
        raise RuntimeError("shape mismatch in the model's own code")
    with pytest.raises(RuntimeError, match="model's own code"):
        fit(tiny(tokenizer), sft_rows(), [], quiet(compile=True, **kw), RunDir(tmp_path / "own").create(), pad_id=0,
            seed=0, loss_fn=model_error)


def test_a_flat_plan_is_refused_for_virtual_tokens(tokenizer):
    """Prefix / prompt tuning puts virtual tokens before each row: `auto` keeps padded rows, and `varlen`
    asked of such a model (a stack on prompt tuning, which its config cannot tell) is an error, not a
    silent fallback."""
    from tunesmith._core.errors import TunesmithError
    from tunesmith.models import apply_method

    model = apply_method(tiny(tokenizer), MethodConfig(kind="prompt", prompt={"num_virtual_tokens": 2}))
    cuda = torch.device("cuda")
    assert plan_speed(tiny(tokenizer), quiet(checkpointing="off", precision="bf16"), cuda, language_model=True).varlen
    assert not plan_speed(model, quiet(checkpointing="off", precision="bf16"), cuda, language_model=True).varlen
    with pytest.raises(TunesmithError, match="virtual tokens before each example"):
        plan_speed(model, quiet(attention="varlen"), torch.device("cpu"), language_model=True)
    assert plan_speed(tiny(tokenizer), quiet(attention="varlen"), torch.device("cpu"), language_model=True).varlen


def test_plan_speed_resolution_on_cpu(tokenizer):
    model = tiny(tokenizer)
    cpu = torch.device("cpu")
    plan = plan_speed(model, TrainConfig(), cpu, language_model=True)  # chunked: faster on a CPU too
    assert (plan.varlen, plan.chunked_loss, plan.checkpointing, plan.fixed_layers) == (False, True, "fixed", 0)
    assert not plan_speed(model, TrainConfig(loss_chunking="off"), cpu, language_model=True).chunked_loss
    plan = plan_speed(model, TrainConfig(attention="varlen", loss_chunking="on", checkpointing="all"), cpu,
                      language_model=True)
    assert (plan.varlen, plan.chunked_loss, plan.checkpointing, plan.fixed_layers) == (True, True, "all", 2)
    assert plan.kernel == "SDPA per example" and "varlen" in plan.describe()
    plan = plan_speed(model, TrainConfig(attention="varlen", loss_chunking="on"), cpu, language_model=False)
    assert not plan.varlen and not plan.chunked_loss  # custom losses keep their own layout
    plan = plan_speed(model, TrainConfig(memory_budget_gib=1e-6), cpu, language_model=True)
    assert plan.checkpointing == "budget" and plan.layers_for(100) == 2


# --- 7. fit() with a speed plan -----------------------------------------------------------------------------

def test_auto_runs_shared_prefixes_flat_on_a_cpu(tokenizer):
    """A caller that lays out sequences sharing a prefix once (RL groups) gets flat rows from `auto` on a CPU,
    and says why; padded asked for stays padded, virtual tokens keep padded rows, and CUDA plans as before."""
    from tunesmith.models import apply_method

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    plan = plan_speed(tiny(tokenizer), quiet(), cpu, language_model=True, shared_prefixes=True)
    assert plan.varlen and "each prompt laid out once" in plan.describe()
    assert not plan_speed(tiny(tokenizer), quiet(), cpu, language_model=True).varlen
    assert not plan_speed(tiny(tokenizer), quiet(attention="padded"), cpu, language_model=True,
                          shared_prefixes=True).varlen
    prompt = apply_method(tiny(tokenizer), MethodConfig(kind="prompt", prompt={"num_virtual_tokens": 2}))
    assert not plan_speed(prompt, quiet(), cpu, language_model=True, shared_prefixes=True).varlen
    for precision in ("fp32", "bf16"):
        plans = [plan_speed(tiny(tokenizer), quiet(checkpointing="off", precision=precision), cuda, language_model=True,
                            shared_prefixes=shared) for shared in (False, True)]
        assert plans[0].varlen == plans[1].varlen == (precision == "bf16") and plans[1].flat_reason is None


def quiet(**kw):
    base = dict(progress=False, tensorboard=False, warmup_ratio=0.0, schedule="constant", lr=1e-2,
                max_grad_norm=None, save_every=None, micro_batch_size=2, grad_accum=2, max_steps=2)
    return TrainConfig(**{**base, **kw})


def run_fit(tokenizer, tmp_path, name, tied=False, **kw):
    model = tiny(tokenizer, tied=tied)
    run = RunDir(tmp_path / name).create()
    fit(model, sft_rows(), [], quiet(**kw), run, pad_id=0, seed=0)
    events = [json.loads(line) for line in run.events.read_text().splitlines()]
    return model, run.read_metrics(), events


@pytest.mark.parametrize("fast", [
    dict(attention="varlen", loss_chunking="on", checkpointing=1),
    dict(attention="varlen", loss_chunking="on", checkpointing="auto", memory_budget_gib=1e-6,
         offload_activations=True),
    dict(attention="varlen", loss_chunking="on", checkpointing="all", offload_activations=True, mlp_chunk_tokens=8),
])
def test_fit_with_speed_plan_matches_plain_fit(tokenizer, tmp_path, fast):
    ref_model, ref_metrics, ref_events = run_fit(tokenizer, tmp_path, "plain", tied=True)
    model, metrics, events = run_fit(tokenizer, tmp_path, "fast", tied=True, **fast)

    assert metrics[0]["loss"] == pytest.approx(ref_metrics[0]["loss"], rel=1e-5)
    assert metrics[1]["loss"] == pytest.approx(ref_metrics[1]["loss"], rel=1e-4)
    assert [m["loss_tokens"] for m in metrics] == [m["loss_tokens"] for m in ref_metrics]
    # Adam divides by sqrt(v): parameters whose gradient is ~0 amplify float rounding (lr is 1e-2).
    for (n, a), (_, b) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert torch.allclose(a, b, atol=5e-4), n

    speed_events = [e for e in events if e["event"] == "speed"]
    assert len(speed_events) == 1 and "varlen" in speed_events[0]["message"]
    assert "chunked" in speed_events[0]["message"]
    ref_speed = [e for e in ref_events if e["event"] == "speed"]
    assert len(ref_speed) == 1 and "padded" in ref_speed[0]["message"] and "varlen" not in ref_speed[0]["message"]
    # nothing of the plan stays on the model after training
    assert model.config._attn_implementation == "sdpa"
    assert not any(layer.gradient_checkpointing for layer in speed.decoder_layers(model))


def test_a_memory_budget_does_not_read_a_streamed_corpus_whole(tokenizer, tmp_path):
    """The budget plan's report looks at the first micro-batches of lazily read rows, not all of them."""
    from collections.abc import Sequence

    from tunesmith.training.loop import REPORT_BATCHES

    rows = sft_rows()

    class Streamed(Sequence):  # a corpus far larger than what one step reads, counting its reads
        reads = 0

        def __len__(self):
            return 10_000

        def __getitem__(self, i):
            Streamed.reads += 1
            return rows[i % len(rows)]

    run = RunDir(tmp_path / "s").create()
    fit(tiny(tokenizer), Streamed(), [], quiet(memory_budget_gib=1e-6, max_steps=1), run, pad_id=0, seed=0)
    speed_event = next(json.loads(line) for line in run.events.read_text().splitlines() if '"speed"' in line)
    assert "blocks per micro-batch" in speed_event["message"]
    assert 0 < Streamed.reads <= (REPORT_BATCHES + 2) * 2  # the report's batches and one step's 2 x 2 rows


def test_offload_hooks_do_not_outlive_training(tokenizer, tmp_path):
    import copy

    model, _, _ = run_fit(tokenizer, tmp_path, "r", offload_activations=True, max_steps=1)
    ids = torch.tensor([[5, 17, 99, 4, 250, 31]])
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for layer in speed.decoder_layers(twin):
            for p in layer.parameters():
                p.mul_(0.5)
        assert not torch.equal(model(ids, use_cache=False).logits, twin(ids, use_cache=False).logits)


def test_fit_with_varlen_under_bf16_autocast(tokenizer, tmp_path):
    _, ref, _ = run_fit(tokenizer, tmp_path, "plain", precision="bf16", max_steps=1)
    _, got, _ = run_fit(tokenizer, tmp_path, "fast", precision="bf16", max_steps=1, attention="varlen",
                        loss_chunking="on", checkpointing="all")
    assert got[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-3)


def test_fit_event_describes_fixed_checkpointing(tokenizer, tmp_path):
    _, _, events = run_fit(tokenizer, tmp_path, "r", attention="varlen", loss_chunking="off", checkpointing=1,
                           max_steps=1)
    message = next(e["message"] for e in events if e["event"] == "speed")
    assert "checkpointing: 1 blocks" in message and "full logits" in message


# --- 8. heads whose logits are more than a linear map -------------------------------------------------------

def test_lm_parts_and_chunked_fallback(tokenizer, monkeypatch):
    model = tiny(tokenizer)
    decoder, head = speed.lm_parts(model)
    assert decoder is model.model and head is model.lm_head

    calls = []
    real = loop_mod.linear_cross_entropy
    monkeypatch.setattr(loop_mod, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = collate_flat(packed_rows(), 0)
    model.train()
    ref_loss, _, ref_g = loss_and_grads(model, causal_lm_loss, batch)
    loss_and_grads(model, lm_loss(chunked=True), batch)
    assert calls == [1]

    for name, value in (("final_logit_softcapping", 30.0), ("logit_scale", 0.5), ("logits_scaling", 2.0)):
        capped = tiny(tokenizer).train()
        setattr(capped.config, name, value)
        assert speed.lm_parts(capped) is None, name
        calls.clear()
        loss, _, g = loss_and_grads(capped, lm_loss(chunked=True), batch)
        assert calls == []  # fell back to the full logits
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        assert_grads_close(g, ref_g, rel=1e-6)

    biased = tiny(tokenizer)
    biased.lm_head.bias = torch.nn.Parameter(torch.zeros(biased.lm_head.out_features))
    assert speed.lm_parts(biased) is None


# --- 9. fused LoRA layers -------------------------------------------------------------------------------------

def lora_model(tokenizer, dropout=0.0):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(tiny(tokenizer), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                       target_modules="all-linear"))
    g = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapter something to add
            p.data.normal_(0, 0.05, generator=g)
    return model


def test_fused_lora_matches_peft_forward_and_gradients(tokenizer):
    model = lora_model(tokenizer).train()
    batch = collate(packed_rows(), 0)
    ref_loss, _, ref_g = loss_and_grads(model, causal_lm_loss, batch)
    assert fused.fuse_lora(model) == 14  # 7 projections x 2 blocks
    calls = []
    real, real_group = fused._LoRALinear.apply, fused._GroupedLoRA.apply
    fused._LoRALinear.apply = lambda *a: calls.append("one") or real(*a)
    fused._GroupedLoRA.apply = lambda *a: calls.append((len(a) - 3) // 5) or real_group(*a)
    try:
        loss, _, grads = loss_and_grads(model, causal_lm_loss, batch)
    finally:
        fused._LoRALinear.apply, fused._GroupedLoRA.apply = real, real_group
    # per block: q/k/v as one group, gate/up as one, o and down alone
    assert sorted(calls, key=str) == sorted(["one"] * 4 + [3, 2] * 2, key=str)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    for name in ref_g:
        torch.testing.assert_close(grads[name], ref_g[name], rtol=1e-4, atol=1e-7)
    fused.unfuse_lora(model)
    assert all("forward" not in m.__dict__ for m in fused.lora_layers(model))


def grouped_lora_model(model, targets, seed=3, dtype=None):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05, generator=g)
    return model.to(dtype) if dtype else model


@pytest.mark.parametrize("arch, targets", [
    ("llama", ["q_proj", "v_proj", "gate_proj", "up_proj"]),  # a group of two where k has no adapter
    ("qwen2", "all-linear"),  # q/k/v with biases
])
def test_grouped_lora_matches_peft_and_leaves_nothing_pending(tokenizer, arch, targets):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    if arch == "qwen2":
        torch.manual_seed(0)
        base = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                            attn_implementation="sdpa")).eval()
        assert base.model.layers[0].self_attn.q_proj.bias is not None
    else:
        base = tiny(tokenizer)
    model = grouped_lora_model(base, targets).train()
    batch = collate(packed_rows(), 0)
    ref_loss, _, ref_g = loss_and_grads(model, causal_lm_loss, batch)
    fused.fuse_lora(model)
    groups = {id(m._tunesmith_group): m._tunesmith_group for m in fused.lora_layers(model)
              if "_tunesmith_group" in m.__dict__}
    assert len(groups) == 4  # attention and MLP of each block
    loss, _, grads = loss_and_grads(model, causal_lm_loss, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert_grads_close(grads, ref_g, rel=1e-5)
    assert all(not g.pending and g.input is None for g in groups.values())  # every sibling took its output
    fused.unfuse_lora(model)
    assert not any("_tunesmith_group" in m.__dict__ for m in fused.lora_layers(model))


def test_grouped_lora_under_bf16_autocast_and_with_a_frozen_adapter(tokenizer):
    """Autocast: the group computes in bf16 like PEFT does. A-matrices frozen: only B gets gradients."""
    model = grouped_lora_model(tiny(tokenizer), "all-linear").train()
    batch = collate(packed_rows(), 0)
    for name, p in model.named_parameters():
        if "lora_A" in name and ".0." in name:
            p.requires_grad_(False)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss_and_grads(model, causal_lm_loss, batch)
    ref_loss, _, ref_g = run()
    fused.fuse_lora(model)
    loss, _, grads = run()
    fused.unfuse_lora(model)
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    assert_grads_close(grads, ref_g, rel=5e-2)
    assert not any("lora_A" in n and ".0." in n for n in grads)


def tiny_gemma(tokenizer):
    """A tiny Gemma: its MLP gates with tanh-approximated GELU (GeGLU)."""
    from transformers import GemmaConfig, GemmaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GemmaForCausalLM(GemmaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=16, initializer_range=0.3))  # gates of order 1


def tiny_phi3(tokenizer):
    """A tiny Phi-3: one projection makes the gate and up halves of its MLP."""
    from transformers import Phi3Config, Phi3ForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Phi3ForCausalLM(Phi3Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          pad_token_id=0))


@pytest.mark.parametrize("arch, targets, autocast", [("llama", "all-linear", False), ("llama", "all-linear", True),
                                                     ("llama", ["q_proj", "down_proj"], False),
                                                     ("gemma", "all-linear", False), ("gemma", "all-linear", True),
                                                     ("phi3", "all-linear", False), ("phi3", "all-linear", True)])
def test_mlp_products_recomputed_match_peft_and_keep_two_intermediate_tensors(tokenizer, arch, targets, autocast):
    """MLPs that keep gate and up and recompute act(gate) up in backward (SwiGLU, Gemma's tanh-GELU GeGLU, and
    Phi-3's SwiGLU from one projection): PEFT's loss and gradients (with LoRA on the gate and up projections,
    and on the down projection alone), and per token a block keeps 2 tensors of the intermediate width fewer
    than PyTorch's operators (which keep gate, act(gate) and up, and the down layer the product)."""
    base = {"llama": tiny, "gemma": tiny_gemma, "phi3": tiny_phi3}[arch](tokenizer)
    model = grouped_lora_model(base, targets).train()
    batch = collate(packed_rows(), 0)
    mlps = [layer.mlp for layer in speed.decoder_layers(model)]

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            return loss_and_grads(model, causal_lm_loss, batch)
    ref_loss, _, ref_g = run()
    fused.fuse_lora(model)
    assert fused.fuse_mlps(model) == 2 and fused.recompute_products(mlps, 0) == 0
    plain = speed.saved_bytes_per_token(model, flat=False)
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused._GatedDown, "forward", staticmethod(
            lambda *a, f=fused._GatedDown.forward: calls.append(1) or f(*a)))
        assert fused.recompute_products(mlps, 2) == 2
        loss, _, grads = run()
        assert len(calls) == 2  # each block's MLP took the recomputing path
        slim = speed.saved_bytes_per_token(model, flat=False)
    tol = 2e-2 if autocast else 1e-5
    assert loss == pytest.approx(ref_loss, rel=tol)
    assert_grads_close(grads, ref_g, rel=5 * tol)
    if not autocast:
        assert plain - slim == 2 * model.get_base_model().config.intermediate_size * 4
    fused.unfuse_mlps(model)
    fused.unfuse_lora(model)
    assert not any("forward" in m.__dict__ or "_tunesmith_product" in m.__dict__ for m in mlps)


def test_mlp_product_recomputation_wraps_a_kernel_librarys_forward_and_is_set_per_block(tokenizer):
    """Off, or where the down layer takes PEFT's own forward (adapters switched off), the MLP runs the forward
    it had (here a stand-in for Liger's); `recompute_products(n)` turns it on in the last n blocks."""
    model = lora_model(tokenizer).train()
    mlps = [layer.mlp for layer in speed.decoder_layers(model)]
    kernel_calls = []

    def kernel(mlp):
        def forward(x):
            kernel_calls.append(mlp)
            return type(mlp).forward(mlp, x)
        return forward
    for mlp in mlps:
        mlp.forward = kernel(mlp)
    fused.fuse_lora(model)
    assert fused.fuse_mlps(model) == 2 and fused.fuse_mlps(model) == 0  # once only
    x = torch.randn(1, 5, 64)
    assert fused.recompute_products(mlps, 1) == 1
    for mlp in mlps:
        mlp(x)
    assert kernel_calls == [mlps[0]]
    with model.disable_adapter():
        mlps[1](x)
    assert kernel_calls == [mlps[0], mlps[1]]
    fused.unfuse_mlps(model)
    assert all(mlp.forward.__name__ == "forward" and "_tunesmith_product" not in mlp.__dict__ for mlp in mlps)
    fused.unfuse_lora(model)


def test_fit_with_grouped_lora_in_long_mode_matches_plain_fit(tokenizer, tmp_path):
    """fit() with fused kernels, flat rows, every block checkpointed with its input offloaded and MLPs in
    chunks (the recomputation calls each group again): the same losses and adapters as the plain path."""
    results = []
    for fast in ({}, dict(kernels="on", attention="varlen", loss_chunking="on", checkpointing="all",
                          offload_activations=True, mlp_chunk_tokens=8)):
        model = grouped_lora_model(tiny(tokenizer), "all-linear")
        run = RunDir(tmp_path / str(len(results))).create()
        fit(model, sft_rows(), [], quiet(**fast), run, pad_id=0, seed=0)
        results.append((model, run.read_metrics()))
    (ref, ref_m), (model, m) = results
    assert [x["loss"] for x in m] == pytest.approx([x["loss"] for x in ref_m], rel=1e-4)
    for (n, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
        assert torch.allclose(a, b, atol=5e-4), n
    assert not any("forward" in x.__dict__ for x in fused.lora_layers(model))


class DataWritingSGD(torch.optim.Optimizer):
    """An optimiser that writes its update through `.data`, as bitsandbytes' kernels write through raw
    pointers: the weights change and no version counter moves."""

    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr))

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.data.add_(p.grad.sign(), alpha=-group["lr"])


@pytest.mark.parametrize("update", ["adamw", "data-writing optimiser", "in place"])
def test_fused_lora_casts_adapters_once_per_step_and_sees_every_update(tokenizer, update):
    """On a bf16 base PEFT keeps the adapters in float32. The fused layers cast them (and stack a group's A
    matrices) once and reuse the copies for the next micro-batch, and make them anew after any change to the
    weights: a torch optimiser's step, an optimiser writing through `.data` (no version moves), or an
    in-place change outside any step. After the change the loss is the one a fresh fuse gives."""
    model = grouped_lora_model(tiny(tokenizer).to(torch.bfloat16), "all-linear").train()
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    batch = collate(packed_rows(), 0)
    fused.fuse_lora(model)
    attention = model.base_model.model.model.layers[0].self_attn
    group, o_proj = attention.q_proj._tunesmith_group, attention.o_proj

    def copies():
        return group.__dict__["_tunesmith_copies"][1][0], o_proj.__dict__["_tunesmith_copies"][1][0]

    before, _, _ = loss_and_grads(model, causal_lm_loss, batch)
    first = copies()
    assert first[0].dtype == torch.bfloat16 and first[0].shape[0] == 3 * 4  # q/k/v's A matrices, stacked
    again, _, _ = loss_and_grads(model, causal_lm_loss, batch)  # the step's next micro-batch
    assert again == before and all(a is b for a, b in zip(copies(), first))
    params = [p for p in model.parameters() if p.requires_grad]
    if update == "adamw":
        torch.optim.AdamW(params, lr=1e-2).step()
    elif update == "data-writing optimiser":
        DataWritingSGD(params, lr=1e-2).step()
    else:
        with torch.no_grad():
            attention.q_proj.lora_A["default"].weight.mul_(1.5)
            o_proj.lora_A["default"].weight.mul_(1.5)
    after, _, _ = loss_and_grads(model, causal_lm_loss, batch)
    assert after != before and not any(a is b for a, b in zip(copies(), first))
    fused.unfuse_lora(model)
    assert not any("_tunesmith_copies" in m.__dict__ for m in fused.lora_layers(model))
    fused.fuse_lora(model)
    fresh, _, _ = loss_and_grads(model, causal_lm_loss, batch)
    fused.unfuse_lora(model)
    assert after == fresh


def test_float32_adapter_gradients_come_out_of_their_gemm_where_the_device_writes_float32(tokenizer, monkeypatch):
    """Where the GEMM writes float32 from bf16 operands (CUDA's `out_dtype`; here a stand-in that computes
    as it does), the float32 adapters' gradients on a bf16 base come from it with no cast: one GEMM for each
    group's stacked A gradients, one for each B. The gradients are the casting path's, to bf16 rounding."""
    model = grouped_lora_model(tiny(tokenizer).to(torch.bfloat16), "all-linear").train()
    batch = collate(packed_rows(), 0)
    fused.fuse_lora(model)
    _, _, ref = loss_and_grads(model, causal_lm_loss, batch)
    calls = []

    def gemm_float32(a, b, alpha):
        assert a.dtype == b.dtype == torch.bfloat16
        calls.append(tuple(a.shape))
        return alpha * (a.float() @ b.float())
    monkeypatch.setattr(fused, "_writes_float32", lambda device, dtype: True)
    monkeypatch.setattr(fused, "_gemm_float32", gemm_float32)
    _, _, grads = loss_and_grads(model, causal_lm_loss, batch)
    fused.unfuse_lora(model)
    # per block: q/k/v's and gate/up's stacked A (rank 4 x 3, x 2), o's and down's A, and each of the 7 Bs
    assert sorted(calls).count((12, batch["input_ids"].numel())) == 2 and len(calls) == 2 * (4 + 7)
    assert {g.dtype for g in grads.values()} == {torch.float32} and grads.keys() == ref.keys()
    assert_grads_close(grads, ref, rel=2e-2)


def test_fused_lora_leaves_disabled_adapters_and_dropout_to_peft(tokenizer):
    """The adapter-off reference (DPO, RL) and adapters with dropout take PEFT's own forward."""
    model = lora_model(tokenizer).eval()
    ids = torch.tensor([[5, 17, 99, 4, 250, 31]])
    fused.fuse_lora(model)
    with torch.no_grad():
        fused_on = model(ids, use_cache=False).logits
        with model.disable_adapter():
            off = model(ids, use_cache=False).logits
        base = model.get_base_model()
        fused.unfuse_lora(model)
        with model.disable_adapter():
            off_ref = model(ids, use_cache=False).logits
    assert not torch.allclose(fused_on, off)
    torch.testing.assert_close(off, off_ref)
    assert base is model.get_base_model()
    dropped = lora_model(tokenizer, dropout=0.5)
    fused.fuse_lora(dropped)
    assert all(fused.fused_lora_target(m) is None for m in fused.lora_layers(dropped))


def test_plan_keeps_padded_rows_for_float32_on_cuda(tokenizer):
    """The flash kernel is 16-bit only: auto picks varlen on CUDA for bf16 runs, padded rows for float32."""
    from tunesmith.training.speed import plan_speed
    model = tiny(tokenizer)
    cuda = torch.device("cuda")
    fp32 = plan_speed(model, quiet(checkpointing="off"), cuda, language_model=True)
    bf16 = plan_speed(model, quiet(checkpointing="off", precision="bf16"), cuda, language_model=True)
    assert not fp32.varlen and bf16.varlen and bf16.fused and bf16.chunked_loss
    cpu = plan_speed(model, quiet(precision="bf16"), torch.device("cpu"), language_model=True)
    assert not (cpu.varlen or cpu.fused) and cpu.chunked_loss and cpu.layers_for(10**6) == 0


@pytest.mark.parametrize("kind", ["llama", "qwen2-lora"])
def test_blocks_and_configs_are_found_without_walking_into_the_blocks(tokenizer, kind):
    """The per-micro-batch lookups (blocks to checkpoint, configs to switch attention in) find what a walk
    over every module finds, in order, for a plain model and an adapter-wrapped one."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from tunesmith.models import apply_method

    if kind == "llama":
        model = tiny(tokenizer)
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM
        base = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=3,
                                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=128))
        model = apply_method(base, MethodConfig(kind="lora", lora={"r": 4, "alpha": 8}))
    every = list(model.modules())
    assert speed.decoder_layers(model) == [m for m in every if isinstance(m, GradientCheckpointingLayer)]
    assert len(speed.decoder_layers(model)) == (2 if kind == "llama" else 3)
    want = {id(m.config) for m in every if hasattr(getattr(m, "config", None), "_attn_implementation")}
    assert {id(c) for c in speed._configs(model)} == want
    with speed.varlen_attention(model):
        assert all(m.config._attn_implementation == speed.VARLEN for m in every
                   if hasattr(getattr(m, "config", None), "_attn_implementation"))


def test_saved_activations_are_measured_per_token_and_a_checkpointed_block_keeps_none(tokenizer):
    """`saved_bytes_per_token` counts what a block keeps for backward: the same per token from two pairs of
    lengths (it grows linearly), no more than the hand formula allows for these widths in float32, more on
    the fused LoRA layers' flat path than zero, and for a checkpointed block only its input (the
    formula's boundary term: hidden size x 4 bytes)."""
    from tunesmith.models import apply_method

    model = apply_method(tiny(tokenizer), MethodConfig(kind="lora", lora={"r": 4, "alpha": 8})).train()
    config = model.get_base_model().config
    plain = speed.saved_bytes_per_token(model, flat=False)
    assert plain == pytest.approx(speed.saved_bytes_per_token(model, flat=False, tokens=(128, 256)), rel=1e-3)
    assert 0 < plain <= speed.activation_bytes_per_token(config, dtype_bytes=4, lora=True)
    fused.fuse_lora(model)
    try:
        with speed.varlen_attention(model):
            assert speed.saved_bytes_per_token(model, flat=True) > 0
    finally:
        fused.unfuse_lora(model)
    speed.set_checkpointing(model, 2)
    try:
        # its input, where the block's hooks run outside its checkpoint (transformers 5.23: hidden x 4 bytes);
        # nothing, where they run inside it (5.17)
        assert speed.saved_bytes_per_token(model, flat=False) in (0, config.hidden_size * 4)
    finally:
        speed.set_checkpointing(model, 0)


def test_the_checkpoint_budget_counts_activations_at_the_width_the_run_computes_in(tokenizer):
    """float32 runs keep 4-byte activations, bf16 runs (bf16 weights or autocast) 2-byte ones: the budget's
    per-token estimate follows, so a float32 run does not plan for half the memory it uses."""
    model = tiny(tokenizer)
    config = model.config
    fp32 = plan_speed(model, quiet(checkpointing="auto", memory_budget_gib=1.0), torch.device("cpu"),
                      language_model=True).budget
    bf16 = plan_speed(model, quiet(checkpointing="auto", memory_budget_gib=1.0, precision="bf16"),
                      torch.device("cpu"), language_model=True).budget
    assert fp32.per_token == speed.activation_bytes_per_token(config, 4, lora=False)
    assert bf16.per_token == speed.activation_bytes_per_token(config, 2, lora=False)
    assert (fp32.boundary, bf16.boundary) == (config.hidden_size * 4, config.hidden_size * 2)
    # and it is what float32 really keeps, to the small per-token terms it leaves out (RoPE's cos and sin, the
    # norms' scales, attention's log-sum-exp)
    assert speed.saved_bytes_per_token(model.train(), flat=False) == pytest.approx(fp32.per_token, rel=0.05)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_measurement_runs_under_the_autocast_training_runs_under(tokenizer, precision):
    """A float32 model trained under 16-bit autocast keeps 16-bit activations: the measuring forwards run
    under the same autocast and find what training keeps, not the float32 forward's twice as much."""
    from tunesmith.training.speed import applied

    model = tiny(tokenizer).train()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    with torch.autocast("cpu", dtype):
        kept = speed.saved_bytes_per_token(model, flat=False)
    assert kept < 0.75 * speed.saved_bytes_per_token(model, flat=False)
    plan = plan_speed(model, quiet(checkpointing="auto", memory_budget_gib=1.0, precision=precision),
                      torch.device("cpu"), language_model=True)
    with applied(model, plan):
        assert plan.budget.measured == kept


def test_the_budget_never_counts_less_than_a_block_is_measured_to_keep(tokenizer):
    """Entering the plan measures what a block keeps on the path that will train: the budget counts at
    least that, reports both, and draws nothing from the RNG (a run's randomness is the same with or
    without the measurement). On a bf16 model PEFT's own LoRA layers (float32 adapters, so a float32 copy
    of each input) keep more than the formula counts; the fused layers do not."""
    from tunesmith.models import apply_method
    from tunesmith.training.speed import applied

    model = apply_method(tiny(tokenizer).to(torch.bfloat16), MethodConfig(kind="lora", lora={"r": 4, "alpha": 8}))
    model.train()
    formula = speed.activation_bytes_per_token(model.get_base_model().config, 2, lora=True)
    counted = {}
    for kernels in ("off", "on"):
        plan = plan_speed(model, quiet(checkpointing="auto", memory_budget_gib=1.0, kernels=kernels),
                          torch.device("cpu"), language_model=True)
        assert plan.budget.per_token == formula and plan.budget.measured is None
        rng = torch.get_rng_state()
        with applied(model, plan):
            assert torch.equal(torch.get_rng_state(), rng)
            measured = plan.budget.measured
            assert measured > 0 and plan.budget.per_token == max(formula, math.ceil(measured))
            assert plan.budget.estimated == formula  # the formula's own figure is kept beside it
            assert f"activations {measured / 1024:.1f} KiB per token per block measured" in plan.describe([100])
        counted[kernels] = plan.budget.per_token
    assert counted["off"] > formula == counted["on"]  # PEFT's layers keep more than the formula: counted


def test_a_failed_measurement_keeps_the_formula_and_the_plan_says_why(tokenizer, monkeypatch):
    """A model the measuring forwards do not fit keeps the formula's figure, trains all the same, and the
    plan (the run's `speed` event) names the error instead of staying silent."""
    from tunesmith.training.speed import applied

    def needs_more(model, flat, tokens=(64, 128)):
        raise TypeError("forward() missing 1 required positional argument: 'pixel_values'\n(more detail)")
    monkeypatch.setattr(speed, "saved_bytes_per_token", needs_more)
    model = tiny(tokenizer).train()
    plan = plan_speed(model, quiet(checkpointing="auto", memory_budget_gib=1.0), torch.device("cpu"),
                      language_model=True)
    with applied(model, plan):
        pass
    assert plan.budget.measured is None and plan.budget.per_token == plan.budget.estimated
    assert plan.measure_error == "TypeError: forward() missing 1 required positional argument: 'pixel_values'"
    assert (f"activations {plan.budget.estimated / 1024:.1f} KiB per token per block estimated, not measured "
            f"(TypeError: forward() missing") in plan.describe([100])


def test_kernel_checks_run_under_inference_mode_and_autocast(torch_flash):
    """The first varlen call may come from evaluation (inference mode) or under autocast: the checks, which
    take gradients, still find what the kernel does."""
    torch_flash(reads_grouped_kv=True)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        speed.check_flash(torch.device("cpu"))
    assert speed._reads_grouped_kv("cpu") and speed._aligns_bottom_right("flash varlen", "cpu")
