"""The speed features on CUDA: PyTorch's flash varlen kernel against the per-example reference, the flat
chunked bf16 loss against the padded full-logits loss, and chunked cross-entropy under bf16 autocast.
Every test is skipped without a GPU (CI has none)."""
import contextlib
import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from tunesmith._core.rundir import RunDir
from tunesmith.config import TrainConfig
from tunesmith.data.packing import collate, collate_flat, shift_labels
from tunesmith.data.render import IGNORE
from tunesmith.losses.cross_entropy import linear_cross_entropy
from tunesmith.models import speed
from tunesmith.training import fit
from tunesmith.training.loop import causal_lm_loss, lm_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda")


def needs_flash_varlen():
    if speed._torch_varlen() is None and speed._flash_attn_varlen() is None:
        pytest.skip("this PyTorch build has no torch.nn.attention.varlen, and flash-attn is not installed")
    # on a GPU the kernels run on (Ampere and newer), the once-per-kernel check must find so
    assert speed.varlen_available(CUDA), "a flash kernel is installed, but its check on this GPU failed"


def rel_err(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def example(length, g, prompt=2):
    ids = torch.randint(5, 1000, (length,), generator=g).tolist()
    return shift_labels(ids, [IGNORE] * prompt + ids[prompt:])


def packed_rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[example(37, g), example(70, g), example(12, g)], [example(128, g)],
            [example(5, g, prompt=1), example(90, g)], [example(64, g), example(33, g)]]


def gpu_model(tokenizer, dtype=torch.bfloat16, layers=2, seed=0):
    """The tiny Llama, widened to flash-friendly shapes: hidden 256, 4 heads of 64, 2 KV heads (GQA)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, intermediate_size=512, max_position_embeddings=2048,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(CUDA, dtype)


@pytest.fixture
def count_flash(monkeypatch):
    """Counts calls into PyTorch's varlen kernel, so a test knows the flash path really ran."""
    calls = []
    real = speed._torch_varlen()
    if real is None:
        pytest.skip("this PyTorch build has no torch.nn.attention.varlen")

    @functools.wraps(real)  # same signature: speed reads it to choose its keyword arguments
    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(speed, "_torch_varlen", lambda: counted)
    speed.check_flash(CUDA)  # the kernel's once-per-kernel checks, which call it, run here and are not counted
    calls.clear()
    return calls


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2)])
def test_flash_varlen_kernel_matches_reference(heads, kv_heads, count_flash):
    g = torch.Generator(device=CUDA).manual_seed(0)
    cu = [0, 17, 18, 83, 211, 256]
    n, d = cu[-1], 64
    q = torch.randn(heads, n, d, generator=g, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(kv_heads, n, d, generator=g, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(kv_heads, n, d, generator=g, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=CUDA)
    module = torch.nn.Module()
    out, _ = speed.varlen_attention_forward(module, q[None], k[None], v[None], None, scaling=d ** -0.5,
                                            cu_seq_lens_q=cu_t, cu_seq_lens_k=cu_t, max_length_q=128,
                                            max_length_k=128)
    assert count_flash == [1] and out.shape == (1, n, heads, d)
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = speed.varlen_reference(qf, kf, vf, cu, d ** -0.5)
    assert rel_err(out[0], ref) < 1e-2

    grad = torch.randn(out.shape, generator=g, device=CUDA, dtype=torch.bfloat16)
    out.backward(grad)
    ref.backward(grad[0].float())
    for a, b in ((q, qf), (k, kf), (v, vf)):
        assert rel_err(a.grad, b.grad) < 2e-2


def test_model_with_flash_varlen_matches_reference_path(tokenizer, count_flash, monkeypatch):
    model = gpu_model(tokenizer)
    batch = collate_flat(packed_rows(), 0)
    inputs = dict(input_ids=batch["input_ids"].to(CUDA), position_ids=batch["position_ids"].to(CUDA), use_cache=False,
                  **speed.flat_kwargs(batch, CUDA))
    with torch.no_grad(), speed.varlen_attention(model):
        flash = model(**inputs).logits
    assert len(count_flash) == model.config.num_hidden_layers
    monkeypatch.setattr(speed, "_torch_varlen", lambda: None)  # the per-example SDPA reference instead
    monkeypatch.setattr(speed, "_flash_attn_varlen", lambda: None)
    with torch.no_grad(), speed.varlen_attention(model):
        ref = model(**inputs).logits
    assert len(count_flash) == model.config.num_hidden_layers
    assert rel_err(flash, ref) < 1e-2

    # and each example equals the example run alone through the model's own attention
    with torch.no_grad():
        cu = batch["cu_seq_lens"].tolist()
        for s, e in zip(cu[:-1], cu[1:]):
            alone = model(input_ids=batch["input_ids"][:, s:e].to(CUDA), use_cache=False).logits[0]
            assert rel_err(flash[0, s:e], alone) < 2e-2


def test_flat_chunked_bf16_loss_matches_padded_loss(tokenizer, count_flash):
    model = gpu_model(tokenizer).train()
    data = packed_rows(1)
    padded_loss, n = causal_lm_loss(model, collate(data, 0))
    (padded_loss / n).backward()
    ref = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    speed.set_checkpointing(model, 1)
    try:
        with speed.varlen_attention(model):
            flat_loss, n_flat = lm_loss(chunked=True)(model, collate_flat(data, 0))
            (flat_loss / n_flat).backward()  # the checkpointed block recomputes inside varlen mode
    finally:
        speed.set_checkpointing(model, 0)
    assert count_flash and n_flat == n
    assert flat_loss.dtype == torch.float32
    assert float(flat_loss.detach()) == pytest.approx(float(padded_loss.detach()), rel=1e-2)
    errors = {name: rel_err(p.grad, ref[name]) for name, p in model.named_parameters()}
    assert max(errors.values()) < 5e-2, errors


def test_linear_cross_entropy_under_bf16_autocast_matches_plain():
    g = torch.Generator(device=CUDA).manual_seed(0)
    n, d, vocab = 300, 256, 5000
    hidden = torch.randn(n, d, generator=g, device=CUDA)
    weight = torch.randn(vocab, d, generator=g, device=CUDA) / math.sqrt(d) * 2
    targets = torch.randint(0, vocab, (n,), generator=g, device=CUDA)
    targets[::4] = IGNORE

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, count = linear_cross_entropy(h1, w1, targets, rows_per_chunk=64)
    loss.backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = F.cross_entropy(h2 @ w2.T, targets, ignore_index=IGNORE, reduction="sum")
    ref.backward()

    assert count == int((targets != IGNORE).sum())
    assert loss.dtype == torch.float32 and h1.grad.dtype == torch.float32 and w1.grad.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-2)
    assert rel_err(h1.grad, h2.grad) < 2e-2 and rel_err(w1.grad, w2.grad) < 2e-2


def test_compiled_blocks_match_eager(tokenizer, count_flash):
    model = gpu_model(tokenizer).train()
    batch = collate_flat(packed_rows(2), 0)

    def loss_and_grad():
        model.zero_grad(set_to_none=True)
        with speed.varlen_attention(model):
            total, n = lm_loss(chunked=True)(model, batch)
            (total / n).backward()
        return float(total.detach()), {name: p.grad.clone() for name, p in model.named_parameters()}

    eager_loss, eager = loss_and_grad()
    assert speed.compile_blocks(model) == 2
    try:
        compiled_loss, compiled = loss_and_grad()
    finally:
        speed.uncompile_blocks(model)
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-2)
    assert max(rel_err(compiled[k], eager[k]) for k in eager) < 5e-2


@pytest.mark.parametrize("autocast", [False, True])
def test_flat_loss_with_float32_weights(tokenizer, autocast):
    """float32 weights, as `model.dtype: float32` loads them, alone (precision fp32) or under bf16 autocast
    (precision bf16): the flat batch must not hand float32 q/k/v to the flash kernel, which takes only
    fp16/bf16 (under autocast RoPE's float32 cos/sin promote q and k back to float32)."""
    model = gpu_model(tokenizer, dtype=torch.float32).train()
    data = packed_rows(3)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with ctx:
        padded_loss, n = causal_lm_loss(model, collate(data, 0))
        with speed.varlen_attention(model):
            flat_loss, n_flat = lm_loss(chunked=True)(model, collate_flat(data, 0))
            (flat_loss / n_flat).backward()
    assert n_flat == n
    assert float(flat_loss.detach()) == pytest.approx(float(padded_loss.detach()), rel=1e-2)


def test_fit_auto_plan_on_cuda_matches_plain_fit(tokenizer, tmp_path):
    needs_flash_varlen()
    data = [[example(20 + 7 * i, g), example(9 + i, g)] for i, g in
            enumerate([torch.Generator().manual_seed(i) for i in range(8)])]
    results = {}
    for name, kw in (("plain", dict(attention="padded", loss_chunking="off", checkpointing="off")),
                     ("auto", dict(memory_budget_gib=1e-3))):  # a tiny budget: every block checkpointed
        cfg = TrainConfig(progress=False, tensorboard=False, warmup_ratio=0.0, schedule="constant", lr=1e-3,
                          save_every=None, micro_batch_size=4, grad_accum=2, max_steps=2, precision="bf16", **kw)
        model = gpu_model(tokenizer, dtype=torch.float32)
        run = RunDir(tmp_path / name).create()
        fit(model, data, [], cfg, run, pad_id=0, seed=0)
        events = [json.loads(line) for line in run.events.read_text().splitlines()]
        results[name] = (run.read_metrics(), next(e["message"] for e in events if e["event"] == "speed"))
    (plain, plain_msg), (auto, auto_msg) = results["plain"], results["auto"]
    assert "flash varlen" in auto_msg and "chunked" in auto_msg and "2-2 of 2 blocks" in auto_msg, auto_msg
    assert "padded" in plain_msg
    assert auto[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-2)
    assert all(math.isfinite(r["loss"]) and "peak_mem_gib" in r for r in auto)


def test_freeze_on_a_bfloat16_body_trains_on_the_auto_plan_like_the_plain_path(tokenizer, tmp_path):
    """What `model.dtype: auto` gives `freeze` on a GPU: a bfloat16 body whose last block trains as float32
    master weights. The auto plan (flash varlen, chunked loss, Liger's kernels where installed, mixed
    dtypes in one block stack) starts at the plain path's loss, trains, and hands back a bfloat16 model."""
    from tunesmith.config import MethodConfig
    from tunesmith.models import apply_method

    needs_flash_varlen()
    data = [[example(20 + 7 * i, g), example(9 + i, g)] for i, g in
            enumerate([torch.Generator().manual_seed(i) for i in range(8)])]
    results = {}
    for name, kw in (("plain", dict(attention="padded", loss_chunking="off", checkpointing="off", kernels="off")),
                     ("auto", {})):
        cfg = TrainConfig(progress=False, tensorboard=False, warmup_ratio=0.0, schedule="constant", lr=1e-3,
                          save_every=None, micro_batch_size=4, max_steps=4, **kw)
        model = apply_method(gpu_model(tokenizer), MethodConfig(kind="freeze", freeze={"train_last_n_layers": 1}))
        run = RunDir(tmp_path / name).create()
        fit(model, data, [], cfg, run, pad_id=0, seed=0)
        events = [json.loads(line) for line in run.events.read_text().splitlines()]
        said = " | ".join(e["message"] for e in events if e["event"] in ("speed", "precision"))
        results[name] = (run.read_metrics(), said)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    (plain, _), (auto, auto_said) = results["plain"], results["auto"]
    assert "flash varlen" in auto_said and "bfloat16 trainable tensors train in float32" in auto_said, auto_said
    assert auto[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-2)
    assert auto[-1]["loss"] < auto[0]["loss"]


def test_bfloat16_adamw_on_cuda_is_torchs_on_float32_and_keeps_small_updates_on_bfloat16():
    """On the GPU too: float32 weights step exactly as torch's (single-tensor) AdamW, and bfloat16 weights
    that nearest rounding would never move follow the float32 run in expectation, through the compiled
    update (it compiles on this GPU), whose results are the eager update's but for the odd last bit of the
    GPU's division and square root."""
    from tunesmith.training import optim
    from tunesmith.training.optim import BFloat16AdamW

    g = torch.Generator(device=CUDA).manual_seed(0)
    tensors = [torch.randn(300, 200, device=CUDA, generator=g).to(torch.bfloat16) for _ in range(4)]
    tensors[2] = tensors[2].abs()
    twin = [t.clone() for t in tensors]
    h = torch.tensor([1 - 1e-5, 0.1, 0.999, 0.001, 0.3, 1e-8, 1e-2], device=CUDA)
    optim._update_kernel(CUDA)(*tensors, h, (1, 2, 3), 0)  # raises where compiling fails on this GPU
    optim._bfloat16_update(*twin, h, (1, 2, 3), 0)
    assert optim._UPDATE["cuda"] is not optim._bfloat16_update
    for a, b in zip(tensors[:3], twin[:3]):
        assert (a != b).float().mean() < 1e-3 and torch.allclose(a.float(), b.float(), rtol=1e-2)

    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(64, 64, device=CUDA))
    theirs = torch.nn.Parameter(ours.detach().clone())
    a = BFloat16AdamW([ours], lr=1e-2, weight_decay=0.1)
    b = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(4):
        ours.grad = torch.randn_like(ours)
        theirs.grad = ours.grad.clone()
        a.step()
        b.step()
    assert torch.equal(ours, theirs)
    w = torch.nn.Parameter(torch.ones(1 << 16, device=CUDA, dtype=torch.bfloat16))
    opt = BFloat16AdamW([w], lr=1e-4)
    for _ in range(300):
        w.grad = torch.full_like(w, 0.5)
        opt.step()
    assert float(w.detach().float().mean()) == pytest.approx(0.97, abs=2e-4)


def test_graphed_generation_matches_the_eager_loop():
    """On CUDA generation replays a captured graph over a static cache; greedy tokens equal the eager loop,
    also with an extent of 4 columns (a graph per extent, all in one memory pool)."""
    import functools

    from tunesmith.models import generate as engine
    from tunesmith.models.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model(tok).cuda().eval()
    batch = [tok.encode("hello world how are"), tok.encode("the quick brown fox jumps over the lazy"), tok.encode("a")]
    runs = []
    for decode in (engine._decode, engine._decode_static, functools.partial(engine._decode_static, bucket=4)):
        with torch.inference_mode(), engine._grouped_decode(model):
            runs.append(decode(model, batch, 0, [len(tok) + 5], 24, engine._Sampler(0.0, 1.0, 0, None),
                               torch.device("cuda")))
    assert runs[0][0] == runs[1][0] == runs[2][0]


def test_offloaded_checkpoints_and_mlp_chunks_on_cuda_keep_gradients_and_save_memory(tokenizer):
    """Every block checkpointed with its input in host memory and MLPs in chunks: the gradients of plain
    non-reentrant checkpointing (bf16 rounding), and a lower peak on a long flat row."""
    from peft import LoraConfig, get_peft_model

    needs_flash_varlen()
    g = torch.Generator().manual_seed(0)
    batch = collate_flat([[example(4096, g, prompt=16)], [example(3000, g)]], 0)

    def run(offload: bool, chunk: int | None):
        torch.manual_seed(0)
        model = get_peft_model(gpu_model(tokenizer, layers=4), LoraConfig(r=8, target_modules="all-linear"))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.02, generator=torch.Generator(device="cuda").manual_seed(1))
        model.train()
        speed.set_checkpointing(model, 99, offload=offload)
        speed.set_mlp_chunks(model, chunk)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        with speed.varlen_attention(model):  # backward too: checkpointed blocks recompute in varlen mode
            with torch.autocast("cuda", dtype=torch.bfloat16):
                total, n = lm_loss(chunked=True)(model, batch)
            (total / n).backward()
        peak = torch.cuda.max_memory_allocated() - start
        return {k: p.grad for k, p in model.named_parameters() if p.requires_grad}, peak

    ref, ref_peak = run(False, None)
    grads, peak = run(True, 1024)
    assert max(rel_err(grads[k], ref[k]) for k in ref) < 5e-2
    assert peak < ref_peak, (peak, ref_peak)


def test_dpo_flat_chunked_on_cuda_matches_padded(tokenizer):
    """DPO's pairs in one flat row through flash varlen, log-probs without full logits: the padded loss."""
    from peft import LoraConfig, get_peft_model

    from tunesmith.config import PreferenceLossConfig
    from tunesmith.data.preference import PairExample, collate_pairs
    from tunesmith.training.preference import Reference, pair_objective

    needs_flash_varlen()
    g = torch.Generator().manual_seed(0)
    pairs = [[PairExample(example(40 + 9 * i, g, prompt=20), example(30 + 5 * i, g, prompt=20), None, i)]
             for i in range(6)]
    torch.manual_seed(0)
    model = get_peft_model(gpu_model(tokenizer), LoraConfig(r=8, target_modules="all-linear")).train()
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.02)
    losses = {}
    for flat, chunked in ((False, False), (True, True)):
        batch = collate_pairs(pairs, 0, flat=flat)
        with speed.varlen_attention(model) if flat else contextlib.nullcontext(), \
                torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _, _ = pair_objective(PreferenceLossConfig(beta=0.5), Reference("adapter"), chunked)(model, batch)
        losses[flat] = float(loss)
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)


def test_pinned_batches_and_one_wait_per_step_train_on_cuda(tokenizer, tmp_path):
    """fit() on CUDA with pinned, non-blocking batches: grad accumulation over two micro-batches gives the
    loss the CPU computes for the same model and data (float32 weights, no autocast)."""
    data = [[example(20 + 7 * i, g)] for i, g in enumerate([torch.Generator().manual_seed(i) for i in range(8)])]
    losses = {}
    for device in ("cpu", "cuda"):
        cfg = TrainConfig(progress=False, tensorboard=False, warmup_ratio=0.0, schedule="constant", lr=1e-3,
                          save_every=None, micro_batch_size=2, grad_accum=2, max_steps=2, attention="padded",
                          loss_chunking="off", checkpointing="off", kernels="off")
        model = gpu_model(tokenizer, dtype=torch.float32).to(device)
        run = RunDir(tmp_path / device).create()
        fit(model, data, [], cfg, run, pad_id=0, seed=0)
        losses[device] = [r["loss"] for r in run.read_metrics()]
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-3)


def test_graphed_generation_checks_stops_every_few_tokens():
    """The graphed static path asks whether every row stopped only every k tokens: same tokens for k 1 and 8."""
    from tunesmith.models import generate as engine
    from tunesmith.models.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model(tok).cuda().eval()
    batch = [tok.encode("hello world how are"), tok.encode("the quick brown fox"), tok.encode("a")]
    with torch.inference_mode():
        free = engine._decode(model, batch, 0, [len(tok) + 5], 24, engine._Sampler(0.0, 1.0, 0, None), CUDA)[0]
        stop = [max(set(sum(free, [])), key=sum(free, []).count)]
        runs = [engine._decode_static(model, batch, 0, stop, 24, engine._Sampler(0.0, 1.0, 0, None), CUDA,
                                      check_every=k) for k in (1, 8)]
    assert runs[0][0] == runs[1][0] and any(runs[0][2])


def test_graphed_generation_from_a_shared_prefill():
    """Rows that repeat a prompt prefill it once; the graphs captured after the cache is copied out to the
    rows decode the greedy tokens of the eager loop with every row prefilled apart."""
    from tunesmith.models import generate as engine
    from tunesmith.models.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model(tok).cuda().eval()
    one, two = tok.encode("hello world how are"), tok.encode("a")
    batch = [one, two, one, one, two]
    with torch.inference_mode():
        graphed = engine._decode_static(model, batch, 0, [len(tok) + 5], 24, engine._Sampler(0.0, 1.0, 0, None), CUDA)
        real = engine._distinct
        engine._distinct = lambda b, device: (b, None)
        try:
            apart = engine._decode(model, batch, 0, [len(tok) + 5], 24, engine._Sampler(0.0, 1.0, 0, None), CUDA)
        finally:
            engine._distinct = real
    assert graphed[0] == apart[0] and graphed[0][0] == graphed[0][2] == graphed[0][3]


def test_graphed_generation_draws_inside_the_graph_reproducibly():
    """Sampling goes inside the captured step: the same seed gives the same tokens, another seed others,
    and a top-1 draw gives the greedy tokens of the eager loop."""
    from tunesmith.models import generate as engine
    from tunesmith.models.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model(tok).cuda().eval()
    batch = [tok.encode("hello world how are"), tok.encode("the quick brown fox"), tok.encode("a")]
    replays = []
    real = engine._capture

    def capture(*a):
        replays.append(real(*a))
        return replays[-1]

    def run(seed, top_k=0, decode=engine._decode_static):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        with torch.inference_mode():
            return decode(model, batch, 0, [len(tok) + 5], 24, engine._Sampler(1.0, 1.0, top_k, gen), CUDA)[0]

    engine._capture = capture
    try:
        a, b, c, top1 = run(3), run(3), run(4), run(3, top_k=1)
    finally:
        engine._capture = real
    assert all(r.draws_inside for r in replays)
    assert a == b and a != c
    with torch.inference_mode():
        greedy = engine._decode(model, batch, 0, [len(tok) + 5], 24, engine._Sampler(0.0, 1.0, 0, None), CUDA)[0]
    assert top1 == greedy


def gpu_lora(tokenizer, base=None):
    """`gpu_model` (or `base`) with PEFT's LoRA r8 on every linear layer (its adapters in float32, B drawn
    away from zero), and a function running a packed batch through it: (mean loss, the LoRA gradients)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = gpu_model(tokenizer) if base is None else base
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    batch = {k: v.to(CUDA) if torch.is_tensor(v) else v for k, v in collate(packed_rows(), 0).items()}

    def run():
        model.zero_grad(set_to_none=True)
        total, n = causal_lm_loss(model, batch)
        (total / n).backward()
        return total.detach().float() / n, {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    return model, run


@pytest.mark.parametrize("adapters", [torch.bfloat16, torch.float32])
def test_grouped_lora_on_cuda_matches_peft(tokenizer, adapters):
    """q/k/v and gate/up as grouped nodes on CUDA over bf16 weights, with bf16 adapters or float32 ones
    (PEFT's own layout on a bf16 base: the fused layers cast them once per step and write their gradients
    in float32 from the GEMM, `out_dtype`, where this build has it): PEFT's loss and LoRA gradients to bf16
    rounding, and a step later too (the cast copies made anew)."""
    from tunesmith.models import fused

    model, run = gpu_lora(tokenizer)
    model = model.to(adapters) if adapters == torch.bfloat16 else model  # PEFT made the adapters float32
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {adapters}
    ref_loss, ref_g = run()
    fused.fuse_lora(model)
    try:
        loss, grads = run()
        assert {g.dtype for g in grads.values()} == {adapters}
        assert rel_err(loss, ref_loss) < 1e-2
        assert max(rel_err(grads[k], ref_g[k]) for k in ref_g) < 0.1
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
        stepped, _ = run()
    finally:
        fused.unfuse_lora(model)
    plain, _ = run()
    assert rel_err(stepped, plain) < 1e-2 and rel_err(stepped, loss) > 1e-3


def test_lora_generation_with_decode_kernels_on_cuda_matches_peft(tokenizer):
    """Generation on CUDA (static cache, captured graph) through the fused LoRA layers and, where installed,
    Liger's RMSNorm, RoPE and SwiGLU: the greedy tokens of PEFT's own layers, float32 weights so no rounding tie
    decides a token; the layers and the modeling module are transformers' and PEFT's again afterwards."""
    import importlib.util
    import sys

    from tunesmith.models import fused
    from tunesmith.models import generate as engine

    model, _ = gpu_lora(tokenizer)
    model = model.float()
    modeling = sys.modules[type(model.get_base_model()).__module__]
    rope = modeling.apply_rotary_pos_emb
    prompts = [tokenizer.encode("hello world how are"), tokenizer.encode("the quick brown fox jumps over the lazy"),
               tokenizer.encode("a")]
    unreachable = [len(tokenizer) + 5]
    calls, liger = [], []
    real, real_static = fused.adapter_copies, engine._decode_static
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, "adapter_copies", lambda owner, *a: calls.append(1) or real(owner, *a))
        mp.setattr(engine, "_decode_static",
                   lambda *a, **k: liger.append(modeling.apply_rotary_pos_emb is not rope) or real_static(*a, **k))
        fast = engine.generate(model, tokenizer, prompts, stop_ids=unreachable, max_new_tokens=24)
        assert calls
        plain = engine.generate(model, tokenizer, prompts, stop_ids=unreachable, max_new_tokens=24, kernels=False)
    assert liger == [importlib.util.find_spec("liger_kernel") is not None, False]
    assert [g.token_ids for g in fast] == [g.token_ids for g in plain]
    assert max(abs(a - b) for g, h in zip(fast, plain) for a, b in zip(g.logprobs, h.logprobs)) < 1e-3
    assert modeling.apply_rotary_pos_emb is rope and not fused.lora_fused(model)


def test_rollouts_come_from_a_16_bit_copy_of_a_float32_policy_only(tokenizer):
    """On CUDA a float32 policy (full fine-tuning) generates its rollouts from a copy in training's autocast
    dtype; a 16-bit one, or LoRA on a 16-bit base, generates from itself; so does a float32 run with no autocast."""
    from peft import LoraConfig, get_peft_model

    from tunesmith.training.online import RolloutCopy, rollout_copy_dtype

    wide = gpu_model(tokenizer, torch.float32)
    assert rollout_copy_dtype(wide, torch.bfloat16, CUDA) == torch.bfloat16
    assert rollout_copy_dtype(wide, None, CUDA) is None
    assert rollout_copy_dtype(gpu_model(tokenizer), torch.bfloat16, CUDA) is None
    lora = get_peft_model(gpu_model(tokenizer), LoraConfig(r=8, target_modules="all-linear"))
    assert rollout_copy_dtype(lora, torch.bfloat16, CUDA) is None
    rollout = RolloutCopy(wide, torch.bfloat16)
    with torch.no_grad():
        next(wide.parameters()).add_(1.0)
    narrow = rollout.refresh()
    assert all(torch.equal(c, p.to(torch.bfloat16)) for c, p in zip(narrow.parameters(), wide.parameters()))
    assert rollout.bytes == sum(p.numel() for p in wide.parameters()) * 2


def tiny_phi3(tokenizer):
    """A Phi-3 of `gpu_model`'s widths: its MLP makes gate and up as the two halves of one projection's output."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    return Phi3ForCausalLM(Phi3Config(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      pad_token_id=0)).to(CUDA, torch.bfloat16)


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_mlp_products_recomputed_on_cuda_match_peft_and_keep_less(tokenizer, arch):
    """The MLPs keeping gate and up rather than their product (Liger's kernels where installed, forward and
    backward, else PyTorch's operators; PyTorch's on Phi-3's halves of one output, which Liger's kernels, reading
    whole rows, cannot take), over bf16 weights and float32 adapters, with Liger's kernels on the rest of the
    model: PEFT's loss and LoRA gradients to bf16 rounding, and per token a Llama block keeps one tensor of the
    intermediate width fewer than Liger's MLP (two fewer than PyTorch's)."""
    from tunesmith.models import fused

    model, run = gpu_lora(tokenizer, tiny_phi3(tokenizer) if arch == "phi3" else None)
    mlps = speed.decoder_mlps(model)
    ref_loss, ref_g = run()
    fused.fuse_lora(model)
    undo = speed.apply_liger(model)
    try:
        assert fused.fuse_mlps(model) == len(mlps)
        kept = speed.saved_bytes_per_token(model, flat=False)
        fused.recompute_products(mlps, len(mlps))
        loss, grads = run()
        lean = speed.saved_bytes_per_token(model, flat=False)
    finally:
        fused.unfuse_mlps(model)
        if undo is not None:
            undo()
        fused.unfuse_lora(model)
    assert rel_err(loss, ref_loss) < 1e-2
    assert max(rel_err(grads[k], ref_g[k]) for k in ref_g) < 0.1
    if arch == "llama":
        base = model.get_base_model()
        per_element = next(base.parameters()).element_size()
        f = base.config.intermediate_size
        assert kept - lean == pytest.approx((1 if undo is not None else 2) * f * per_element, rel=0.02)


def test_fp8_bases_on_cuda_stay_near_bf16_and_train(tokenizer):
    """LoRA on FP8 base weights (Hopper/Ada): the step-1 loss within 1e-2 of the bf16 run's, and steps
    that lower it."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmuls need compute capability 8.9 or newer")
    from tunesmith.config import LoraConfig, MethodConfig
    from tunesmith.models import apply_method

    batch = {k: v.to(CUDA) if torch.is_tensor(v) else v for k, v in collate(packed_rows(), 0).items()}
    losses = []
    for fp8 in (False, True):
        torch.manual_seed(0)
        model = apply_method(gpu_model(tokenizer), MethodConfig(kind="lora", lora=LoraConfig(r=8, fp8_base=fp8)))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        run = []
        for _ in range(5):
            total, n = causal_lm_loss(model, batch)
            (total / n).backward()
            opt.step()
            opt.zero_grad()
            run.append(float(total) / n)
        losses.append(run)
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-2)
    assert losses[1][-1] < losses[1][0]


def test_fp8_input_gradient_on_cuda_is_the_product_of_the_quantised_operands():
    """The FP8 input gradient through the CUDA kernel (a column-major transposed weight, an odd number of
    token rows): the product built by hand from the quantised gradient and weight, and near bf16's."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmuls need compute capability 8.9 or newer")
    from tunesmith.models.fp8 import FP8Linear, quantise_rows

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 512, bias=False).to(CUDA, torch.bfloat16)
    layer = FP8Linear(linear)
    x = torch.randn(37, 256, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(37, 512, device=CUDA, dtype=torch.bfloat16)
    layer(x).backward(g)
    gq, gs = quantise_rows(g * layer.scale.to(torch.bfloat16))
    want = (gq.float() * gs) @ layer.weight8.float()
    assert rel_err(x.grad.float(), want) < 1e-2
    assert rel_err(x.grad.float(), (g @ linear.weight.detach()).float()) < 0.1


def test_rl_passes_flat_chunked_on_cuda_match_padded(tokenizer, count_flash):
    """The RL log-prob pass over a rollout of uneven prompts and responses, as one flat row through flash
    varlen with log-probs and entropies from the hidden states (bf16): the padded full-logits pass."""
    from tunesmith.models.generate import Generation
    from tunesmith.rl.rollout import build_rollout
    from tunesmith.training.online import ValueHead, response_forward

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 1000, (n,), generator=g).tolist() for n in (17, 40, 9, 64)]
    gens = [Generation(torch.randint(5, 1000, (n,), generator=g).tolist(), "", n < 30, stop_id=4 if n < 30 else None)
            for n in (12, 48, 3, 30)]
    ro = build_rollout(prompts, gens, 0)
    model = gpu_model(tokenizer)
    head = ValueHead(model.config.hidden_size).to(CUDA)
    torch.nn.init.normal_(head.linear.weight)
    rows, mask = torch.tensor([3, 0, 2, 1]), ro.mask[[3, 0, 2, 1]].to(CUDA)
    out = {}
    for flat in (False, True):
        with speed.varlen_attention(model) if flat else contextlib.nullcontext(), \
                torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
            out[flat] = response_forward(model, ro, rows, 0.8, head, entropy=True, flat=flat, chunked=flat)
    assert count_flash
    for key in ("logps", "entropy", "values"):
        assert rel_err(out[True][key] * mask, out[False][key] * mask) < 2e-2, key


def test_a_flat_chunked_step_on_cuda_never_waits_for_the_device(tokenizer, count_flash):
    """A flat micro-batch's forward, chunked loss and backward queue without one host-device sync, so the
    host can run ahead of the GPU (transformers' packed-row scan of the position ids is skipped)."""
    model = gpu_model(tokenizer).train()
    speed.set_checkpointing(model, 1)
    batch = collate_flat(packed_rows(2), 0)
    batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    loss_fn = lm_loss(chunked=True)
    try:
        with speed.varlen_attention(model):
            loss_fn(model, batch)[0].backward()  # warm-up: kernels chosen, allocator primed
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                total, n = loss_fn(model, batch)
                (total / n).backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        speed.set_checkpointing(model, 0)
    assert count_flash and math.isfinite(float(total))


def test_dpo_pairs_sharing_their_prompt_on_cuda_match_padded(tokenizer, count_flash):
    """Each pair's prompt once in the row, the rejected side's keys gathered around it: the padded rows'
    log-probs in bf16, through the flash kernel where it aligns a longer key range as the reference does
    (checked once per kernel; otherwise through the per-example path)."""
    from tunesmith.data.preference import PairExample, collate_pairs
    from tunesmith.training.preference import batch_logps

    g = torch.Generator().manual_seed(0)

    def side(prompt, n):
        answer = torch.randint(5, 1000, (n,), generator=g).tolist()
        return shift_labels(prompt + answer, [IGNORE] * len(prompt) + answer)

    pairs = []
    for i in range(6):
        prompt = torch.randint(5, 1000, (30 + 7 * i,), generator=g).tolist()
        pairs.append([PairExample(side(prompt, 20 + 3 * i), side(prompt, 41 - 2 * i), None, i)])
    model = gpu_model(tokenizer).eval()
    fast = speed.shares_prefixes(CUDA)  # the once-per-kernel check runs the kernel itself
    count_flash.clear()
    with torch.no_grad():
        want, n_want = batch_logps(model, collate_pairs(pairs, 0))
        shared = collate_pairs(pairs, 0, flat=True, shared=True)
        with speed.varlen_attention(model):
            got, n_got = batch_logps(model, shared, chunked=True)
    assert torch.equal(n_got.cpu(), n_want.cpu())
    assert rel_err(got, want) < 2e-2
    assert bool(count_flash) == fast


def qlora_tiny(dtype: str):
    """The tiny model quantised to NF4 on the GPU by the loader (bitsandbytes), with LoRA r8 on every linear
    layer, its B matrices drawn away from zero so the adapters change every output."""
    bnb = pytest.importorskip("bitsandbytes")
    from tunesmith.config import MethodConfig, ModelConfig
    from tunesmith.models import apply_method
    from tunesmith.models.load import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ModelConfig(name="tiny", dtype=dtype), method="qlora")
    quantised = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantised and all(m.weight.device == CUDA for m in quantised)
    torch.manual_seed(0)
    model = apply_method(model, MethodConfig(kind="qlora", lora={"r": 8, "target_modules": "all-linear"}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, tok


def test_qlora_on_cuda_trains_on_the_auto_plan_like_the_plain_path(tmp_path):
    """QLoRA on the GPU: NF4 bases from bitsandbytes under bf16, trained on the plan `auto` picks (flat rows
    through flash varlen, chunked loss, checkpointing; the 4-bit layers take PEFT's forward): the plain
    path's step-1 loss, and steps that lower it."""
    needs_flash_varlen()
    data = [[example(20 + 7 * i, g), example(9 + i, g)] for i, g in
            enumerate([torch.Generator().manual_seed(i) for i in range(8)])]
    results = {}
    for name, kw in (("plain", dict(attention="padded", loss_chunking="off", checkpointing="off", kernels="off")),
                     ("auto", dict(memory_budget_gib=1e-3))):
        model, tok = qlora_tiny("bfloat16")
        cfg = TrainConfig(progress=False, tensorboard=False, warmup_ratio=0.0, schedule="constant", lr=1e-2,
                          save_every=None, micro_batch_size=4, grad_accum=2, max_steps=4, precision="bf16", **kw)
        run = RunDir(tmp_path / name).create()
        fit(model, data, [], cfg, run, pad_id=tok.pad_token_id, seed=0)
        events = [json.loads(line) for line in run.events.read_text().splitlines()]
        results[name] = ([r["loss"] for r in run.read_metrics()],
                         next(e["message"] for e in events if e["event"] == "speed"))
    (plain, _), (auto, auto_msg) = results["plain"], results["auto"]
    assert "flash varlen" in auto_msg and "chunked" in auto_msg, auto_msg
    assert auto[0] == pytest.approx(plain[0], rel=1e-2)
    assert auto[-1] < auto[0] - 0.05 and plain[-1] < plain[0] - 0.05


def test_qlora_generation_on_cuda_matches_the_eager_loop():
    """Generation over NF4 bases with their adapters (the static cache, and the captured graph where
    bitsandbytes' kernels let the step be captured; else the warned eager fallback): the greedy tokens of
    the eager dynamic-cache loop, in float32 so no rounding tie decides a token."""
    from tunesmith.models import generate as engine

    model, tok = qlora_tiny("float32")
    prompts = [tok.encode("hello world how are"), tok.encode("the quick brown fox jumps over the lazy"),
               tok.encode("a")]
    unreachable = [len(tok) + 5]  # every row runs the whole budget
    gens = engine.generate(model, tok, prompts, stop_ids=unreachable, max_new_tokens=24)
    with torch.inference_mode(), engine._grouped_decode(model):
        eager = engine._decode(model, prompts, tok.pad_token_id, unreachable, 24, engine._Sampler(0.0, 1.0, 0, None),
                               CUDA)[0]
    assert [g.token_ids for g in gens] == eager
    assert all(len(ids) == 24 for ids in eager)
