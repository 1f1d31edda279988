"""One benchmark arm per call: `python -m benchmarks.arms ARM key=value ...` prints one JSON result line.

Arms:
  hf_fixed     HF transformers + PEFT LoRA, a plain training loop on fixed-length batches (D0)
  ts_train     tunesmith `fit()` on D0 / D1 / D2 (what `tunesmith train` runs, on a random-init shape)
  trl_sft      TRL `SFTTrainer` + PEFT on D1, its defaults unless told otherwise (`liger=1`, `packing=1`, ...)
  trl_dpo      TRL `DPOTrainer` + PEFT on preference pairs (reference: adapter off; `ckpt=0`, `precompute=1`)
  ts_dpo       tunesmith's DPO through `fit()` on the same pairs (reference adapter or precomputed)
  hf_generate  HF `generate`, sampling, fixed new-token count
  ts_generate  tunesmith's generation engine, same setting
  ts_grpo      tunesmith GRPO steps on a random-init shape: generation, log-prob passes and update timed apart
  ts_maxlen    longest sequence tunesmith trains at batch 1 (ascending lengths until out of memory)
  hf_maxlen    the same for HF + PEFT (+ Liger with `liger=1`), checkpointing on
  ts_method    a tunesmith method on a real model (`default`): trainable parameters, weight memory and
               peak memory of a few training steps (QLoRA 4/8-bit against 16-bit LoRA)
  ts_optim     one optimiser step over a shape's bfloat16 weights: BFloat16AdamW compiled or eager, or
               torch's fused AdamW
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.shapes import LORA_TARGETS, PEAK_TFLOPS, build_model, flops_per_token, lengths, llama_config, token_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA = DEVICE == "cuda"


# set by `python -m benchmarks.profile` while it runs an arm: a benchmarks.profile.Profile
PROFILE = None
STEPPED_ARMS = ("hf_fixed", "ts_train", "ts_dpo", "ts_grpo")  # arms that mark their training steps for the profiler


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _region():
    """What an arm times, recorded when it runs under the profiler."""
    import contextlib
    return PROFILE.region() if PROFILE is not None else contextlib.nullcontext()


def _step_done() -> None:
    if PROFILE is not None:
        PROFILE.step()


def _peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else None


def _reset_peak() -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def _peft_lora(model, liger: bool = False):
    from peft import LoraConfig, get_peft_model
    if liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        _apply_liger_kernel_to_instance(model=model)
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS))


def _mfu(tok_s: float, model, lens) -> float:
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    return round(flops_per_token(n, cfg.num_hidden_layers, cfg.hidden_size, lens) * tok_s / PEAK_TFLOPS, 3)


def hf_fixed(shape="llama-1b", bs=8, seq=2048, ckpt=0, liger=0, steps=6, warm=3):
    """HF + PEFT: model(input_ids, labels) -> loss.backward() -> fused AdamW, fixed-length random ids."""
    model = _peft_lora(build_model(shape, DEVICE), bool(liger))
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=CUDA or None)
    x = torch.randint(4, model.config.vocab_size, (bs, seq), device=DEVICE)
    times, losses = [], []
    _reset_peak()
    with _region():
        for _ in range(warm + steps):
            _sync()
            t = time.perf_counter()
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync()
            times.append(time.perf_counter() - t)
            losses.append(float(loss))
            _step_done()
    dt = statistics.median(times[warm:])
    tok_s = bs * seq / dt
    return dict(arm="hf_fixed" + ("_liger" if liger else ""), shape=shape, data=f"D0 {bs}x{seq}", ckpt=bool(ckpt),
                step_s=round(dt, 4), first_step_s=round(times[0], 2), real_tok_s=round(tok_s),
                mfu=_mfu(tok_s, model, [seq] * bs), peak_gib=_peak_gib(), first_loss=losses[0])


def _examples(dataset: str, vocab: int, bs: int, seq: int, n_rows: int, prompt_frac: float, scale: float):
    from tunesmith.data.packing import shift_labels
    from tunesmith.data.render import IGNORE
    lens = [seq] * n_rows if dataset == "D0" else lengths(dataset, n_rows, scale=scale).tolist()
    examples = []
    for ids in token_rows(lens, vocab):
        p = int(len(ids) * prompt_frac)
        examples.append(shift_labels(ids, [IGNORE] * p + ids[p:]))
    return examples, lens


def _plan(run) -> str | None:
    """The speed plan a run reported, with whatever changed it on the way (a retry after running out of
    memory, blocks that failed to compile and ran eagerly)."""
    events = [json.loads(line) for line in run.events.read_text().splitlines()]
    plan = [e["message"] for e in events if e["event"] == "speed"]
    changes = [e["message"] for e in events if e["event"] in ("out_of_memory", "compile_failed")]
    return "; ".join(plan[:1] + changes) if plan else None


def ts_train(shape="llama-1b", dataset="D0", bs=8, seq=2048, rows=0, steps=6, warm=3, attention="auto",
             loss_chunking="auto", checkpointing="auto", budget=0.0, compile=0, offload=0, method="lora",
             prompt_frac=0.0, scale=1.0, grad_accum=1, kernels="auto", fp8=0, act_scale=0.0):
    """tunesmith: the training loop `tunesmith train` runs (fit(): collate, loss, accumulation, clipping,
    fused AdamW, schedule), on a random-init shape. D0 runs warm + steps steps; D1/D2 one epoch of `rows`
    rows (wall time of fit(), as TRL's arms are timed). `act_scale` > 0: the checkpoint budget counts what a
    block was measured to keep times `act_scale`, instead of the larger of that and its formula (an
    experiment for calibrating the budget down; an estimate that falls short retries the step)."""
    from tunesmith._core.rundir import RunDir
    from tunesmith.config import LoraConfig, MethodConfig, TrainConfig
    from tunesmith.models.methods import apply_method
    from tunesmith.training.loop import fit

    model = build_model(shape, DEVICE)
    vocab = model.config.vocab_size
    model = apply_method(model, MethodConfig(kind=method, lora=LoraConfig(r=16, alpha=32, dropout=0.0,
                                                                          target_modules=LORA_TARGETS,
                                                                          fp8_base=bool(fp8))))
    n_rows = rows or bs * grad_accum * (warm + steps)
    examples, lens = _examples(dataset, vocab, bs, seq, n_rows, prompt_frac, scale)
    ckpt = int(checkpointing) if str(checkpointing).isdigit() else checkpointing
    cfg = TrainConfig(epochs=1, micro_batch_size=bs, grad_accum=grad_accum, lr=1e-4, warmup_ratio=0.0,
                      precision="bf16" if CUDA else "fp32", save_every=None, tensorboard=False, progress=False,
                      max_grad_norm=1.0, attention=attention, loss_chunking=loss_chunking, checkpointing=ckpt,
                      memory_budget_gib=float(budget) or None, compile=bool(compile),
                      offload_activations=bool(offload), kernels=kernels)
    marks, records = [], []

    def on_step(step, record):  # fit() reads a step once the GPU has finished it (a step late: no sync here)
        marks.append(time.perf_counter())
        records.append(record)
        _step_done()

    run = RunDir(Path(tempfile.mkdtemp(prefix="ts-bench-"))).create()
    _reset_peak()
    _sync()
    t0 = time.perf_counter()
    with _region(), _count_measured(float(act_scale)):
        result = fit(model, [[e] for e in examples], [], cfg, run, pad_id=0, seed=0, on_step=on_step)
    _sync()
    wall = time.perf_counter() - t0
    step_times = [b - a for a, b in zip([t0] + marks[:-1], marks)]
    steady = step_times[warm:] or step_times
    step_tokens = [r["tokens"] - (records[i - 1]["tokens"] if i else 0) for i, r in enumerate(records)]
    real = sum(len(e) for e in examples)
    out = dict(arm="tunesmith" + ("_fp8" if fp8 else "") + ("" if method == "lora" else f"_{method}"), shape=shape,
               data=f"D0 {bs}x{seq}" if dataset == "D0" else f"{dataset} {n_rows} rows",
               method=method, first_loss=records[0]["loss"], peak_gib=max((r.get("peak_mem_gib", 0) for r in records),
                                                                          default=None),
               plan=_plan(run), steps=result.steps)
    if dataset == "D0":
        tok_s = statistics.median(t / s for t, s in zip(step_tokens[warm:] or step_tokens, steady))
        out.update(step_s=round(statistics.median(steady), 4), real_tok_s=round(tok_s),
                   first_step_s=round(step_times[0], 2))
    else:
        tok_s = real / wall
        loss_tokens = sum(e.n_loss_tokens for e in examples)
        out.update(seconds=round(wall, 2), real_tok_s=round(tok_s), loss_tok_s=round(loss_tokens / wall),
                   real_tokens=real, first_step_s=round(step_times[0], 2))
    out["mfu"] = _mfu(tok_s, model.get_base_model() if hasattr(model, "get_base_model") else model, lens)
    out["peak_gib"] = round(out["peak_gib"], 2) if out["peak_gib"] else None
    out.update(_activation_kib(model, cfg))
    return out


@contextlib.contextmanager
def _count_measured(scale: float):
    """Inside it, the checkpoint budget counts `scale` times what a block was measured to keep (0: as usual)."""
    import math

    from tunesmith.models.speed import CheckpointBudget

    def observe(self, measured: float, lean: float | None = None) -> None:
        self.measured, self.measured_lean = measured, lean
        self.per_token = int(math.ceil(measured * scale))
        if lean is not None:
            self.per_token_lean = int(math.ceil(lean * scale))
    usual = CheckpointBudget.observe
    if scale:
        CheckpointBudget.observe = observe
    try:
        yield
    finally:
        CheckpointBudget.observe = usual


def _activation_kib(model, cfg) -> dict:
    """What one block keeps for backward per token on the arm's path, measured (`saved_bytes_per_token`,
    no block checkpointed) and as the checkpoint budget estimates it: the data to calibrate the budget."""
    from tunesmith.models import speed
    from tunesmith.training.speed import applied, plan_speed

    plan = plan_speed(model, cfg, torch.device(DEVICE), language_model=True)
    with applied(model, plan):  # a budget plan measures as it is applied; a fixed one is measured here
        measured = plan.budget.measured if plan.budget is not None else None
        if measured is None:
            speed.set_checkpointing(model, 0)
            measured = speed.saved_bytes_per_token(model, flat=plan.varlen)
        lean = plan.budget.measured_lean if plan.budget is not None else None
    _sync()
    return dict(act_kib=round(measured / 1024, 1),
                act_kib_formula=round(plan.budget.estimated / 1024, 1) if plan.budget is not None else None,
                act_kib_lean=round(lean / 1024, 1) if lean is not None else None)


def _trl_lora():
    """The PEFT LoRA every TRL arm trains: r 16, alpha 32, no dropout, the 7 linear projections."""
    from peft import LoraConfig
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=LORA_TARGETS)


def _timed_train(trainer) -> tuple[float, float]:
    """Seconds of `trainer.train()`, with the peak memory counter reset before it, and seconds to the end of
    its first optimiser step (set-up and one-off work such as compiling kernels, as tunesmith's arms count
    theirs: `first_step_s`)."""
    from transformers import TrainerCallback

    first: list[float] = []

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if not first:
                _sync()
                first.append(time.perf_counter())

    trainer.add_callback(FirstStep())
    _reset_peak()
    _sync()
    t = time.perf_counter()
    with _region():
        trainer.train()
    _sync()
    end = time.perf_counter()
    return end - t, (first or [end])[0] - t


def trl_sft(shape="llama-1b", rows=600, liger=0, packing=0, ckpt=1, scale=1.0):
    """TRL SFTTrainer + PEFT LoRA on D1 (wall time of train(), real tokens only)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = build_model(shape, DEVICE)
    lens = lengths("D1", rows, scale=scale)
    ds = Dataset.from_dict({"input_ids": token_rows(lens, model.config.vocab_size)})
    kw = dict(use_liger_kernel=bool(liger), packing=bool(packing), gradient_checkpointing=bool(ckpt))
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="trl-"), per_device_train_batch_size=8, num_train_epochs=1,
                     learning_rate=1e-4, logging_steps=1000, save_strategy="no", report_to="none", bf16=CUDA,
                     use_cpu=not CUDA, max_length=int(4096 * scale), dataloader_num_workers=0, seed=0, **kw)
    wall, first = _timed_train(SFTTrainer(model=model, args=args, train_dataset=ds,
                                          processing_class=_word_tokenizer(model.config.vocab_size),
                                          peft_config=_trl_lora()))
    name = "trl_sft" + ("_liger" if liger else "") + ("_packed" if packing else "") + ("" if ckpt else "_nockpt")
    return dict(arm=name, shape=shape, data=f"D1 {rows} rows", seconds=round(wall, 2),
                real_tok_s=round(int(lens.sum()) / wall), peak_gib=_peak_gib(), real_tokens=int(lens.sum()),
                first_step_s=round(first, 2), mfu=_mfu(int(lens.sum()) / wall, model, lens))


def _pairs(shape: str, n_pairs: int, scale: float):
    """The DPO data: `n_pairs` (prompt, chosen, rejected) random id lists and their real token count
    (the prompt counted twice: both sides of a pair run it)."""
    from benchmarks.shapes import pair_lengths, token_rows
    vocab = llama_config(shape).vocab_size
    lp, lc, lr = pair_lengths(n_pairs, scale=scale)
    prompts, chosen, rejected = (token_rows(x, vocab, seed=s) for x, s in ((lp, 4), (lc, 5), (lr, 6)))
    return prompts, chosen, rejected, int(2 * lp.sum() + lc.sum() + lr.sum())


def trl_dpo(shape="llama-1b", pairs=256, ckpt=1, precompute=0, scale=1.0):
    """TRL DPOTrainer + PEFT LoRA (reference: the adapter switched off), sigmoid loss, beta 0.1, batch 8,
    one epoch: wall time of train()."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    prompts, chosen, rejected, real = _pairs(shape, pairs, scale)
    text = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731 - the word tokenizer maps t<i> back to i
    ds = Dataset.from_dict({"prompt": [text(x) for x in prompts], "chosen": [text(x) for x in chosen],
                            "rejected": [text(x) for x in rejected]})
    model = build_model(shape, DEVICE)
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-dpo-"), per_device_train_batch_size=8, num_train_epochs=1,
                     learning_rate=1e-5, logging_steps=1000, save_strategy="no", report_to="none", bf16=CUDA,
                     use_cpu=not CUDA, max_length=int(2048 * scale), beta=0.1, seed=0,
                     gradient_checkpointing=bool(ckpt), precompute_ref_log_probs=bool(precompute),
                     dataloader_num_workers=0)
    wall, first = _timed_train(DPOTrainer(model=model, args=args, train_dataset=ds,
                                          processing_class=_word_tokenizer(model.config.vocab_size),
                                          peft_config=_trl_lora()))
    name = "trl_dpo" + ("" if ckpt else "_nockpt") + ("_precomputed" if precompute else "")
    return dict(arm=name, shape=shape, data=f"{pairs} pairs", seconds=round(wall, 2), pairs_s=round(pairs / wall, 2),
                real_tok_s=round(real / wall), peak_gib=_peak_gib(), real_tokens=real, first_step_s=round(first, 2))


def ts_dpo(shape="llama-1b", pairs=256, bs=8, budget=0.0, attention="auto", loss_chunking="auto",
           checkpointing="auto", reference="adapter", kernels="auto", scale=1.0, shared="auto"):
    """tunesmith's DPO (`fit()` with the sigmoid pair objective), LoRA, beta 0.1, batch 8, one epoch: wall
    time of fit(), plus the reference pass when `reference=precomputed`. Step-1 loss must be ln 2. Flat
    rows hold each pair's prompt once (`shared`: auto as the DPO recipe decides, 1 or 0)."""
    import functools

    from tunesmith._core.rundir import RunDir
    from tunesmith.config import LoraConfig, MethodConfig, PreferenceLossConfig, TrainConfig
    from tunesmith.data.packing import shift_labels
    from tunesmith.data.preference import PairExample, collate_pairs
    from tunesmith.data.render import IGNORE
    from tunesmith.models.methods import apply_method
    from tunesmith.training import fit, precision_autocast
    from tunesmith.training.preference import Reference, pair_objective, precompute_reference
    from tunesmith.training.speed import chunked_loss

    prompts, chosen, rejected, real = _pairs(shape, pairs, scale)
    side = lambda p, a: shift_labels(p + a, [IGNORE] * len(p) + a)  # noqa: E731
    rows = [[PairExample(side(p, c), side(p, r), None, i)]
            for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected))]
    model = build_model(shape, DEVICE)
    ckpt = int(checkpointing) if str(checkpointing).isdigit() else checkpointing
    cfg = TrainConfig(epochs=1, micro_batch_size=bs, lr=1e-5, warmup_ratio=0.0, precision="bf16" if CUDA else "fp32",
                      save_every=None, tensorboard=False, progress=False, max_grad_norm=1.0, attention=attention,
                      loss_chunking=loss_chunking, checkpointing=ckpt, memory_budget_gib=float(budget) or None,
                      kernels=kernels)
    run = RunDir(Path(tempfile.mkdtemp(prefix="ts-dpo-"))).create()
    _reset_peak()
    _sync()
    t0 = time.perf_counter()
    if reference == "precomputed":  # the starting policy's log-probs, once, before the adapter exists
        device = torch.device(DEVICE)
        splits, _ = precompute_reference(model, {"train": rows}, collate_pairs, 0, run.root / "ref.json",
                                         model_id=shape, batch_size=bs, autocast=precision_autocast(cfg, device))
        rows = splits["train"]
    model = apply_method(model, MethodConfig(kind="lora", lora=LoraConfig(r=16, alpha=32, dropout=0.0,
                                                                          target_modules=LORA_TARGETS)))
    records, marks = [], []

    def on_step(step, record):
        marks.append(time.perf_counter())
        records.append(record)
        _step_done()

    loss_fn = pair_objective(PreferenceLossConfig(beta=0.1), Reference(reference),
                             chunked_loss(cfg))
    from tunesmith.models.speed import shares_prefixes
    shared = shares_prefixes(torch.device(DEVICE)) if shared == "auto" else bool(int(shared))
    with _region():
        fit(model, rows, [], cfg, run, pad_id=0, seed=0, loss_fn=loss_fn, collate_fn=collate_pairs,
            flat_collate_fn=functools.partial(collate_pairs, flat=True, shared=shared), on_step=on_step)
    _sync()
    wall = time.perf_counter() - t0
    plan = _plan(run)
    return dict(arm="tunesmith_dpo" + ("_precomputed" if reference == "precomputed" else ""), shape=shape,
                data=f"{pairs} pairs", seconds=round(wall, 2), pairs_s=round(pairs / wall, 2),
                real_tok_s=round(real / wall), real_tokens=real, first_step_s=round(marks[0] - t0, 2),
                first_loss=records[0]["loss"],
                peak_gib=round(max(r.get("peak_mem_gib", 0) for r in records), 2) if CUDA else None,
                plan=(plan + ("; pairs share their prompt" if shared else "")) if plan else None)


def _word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab)}, unk_token="t3"))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="t1", eos_token="t2", pad_token="t0", unk_token="t3")


def hf_generate(shape="llama-1b", batch=64, prompt=128, new=256):
    model = build_model(shape, DEVICE).eval()
    x = torch.randint(4, model.config.vocab_size, (batch, prompt), device=DEVICE)
    with torch.no_grad():
        model.generate(x[:, :8], max_new_tokens=4, do_sample=True, pad_token_id=0)
        _sync()
        t = time.perf_counter()
        with _region():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                           do_sample=True, temperature=1.0, top_p=1.0, pad_token_id=0)
        _sync()
        dt = time.perf_counter() - t
    return dict(arm="hf_generate", shape=shape, data=f"batch {batch}, prompt {prompt}, {new} new",
                seconds=round(dt, 2), gen_tok_s=round(batch * new / dt))


class _IdTokenizer:
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def ts_generate(shape="llama-1b", batch=64, prompt=128, new=256):
    """tunesmith's engine with no stop id reachable (ids >= vocab never sampled), so every row runs `new`."""
    from tunesmith.models.generate import generate
    model = build_model(shape, DEVICE).eval()
    vocab = model.config.vocab_size
    prompts = torch.randint(4, vocab, (batch, prompt)).tolist()
    generate(model, _IdTokenizer(), [p[:8] for p in prompts], stop_ids=[vocab + 1], max_new_tokens=4,
             temperature=1.0, batch_size=batch)
    _sync()
    t = time.perf_counter()
    with _region():
        gens = generate(model, _IdTokenizer(), prompts, stop_ids=[vocab + 1], max_new_tokens=new, temperature=1.0,
                        batch_size=batch)
    _sync()
    dt = time.perf_counter() - t
    n = sum(len(g.token_ids) for g in gens)
    out = dict(arm="ts_generate", shape=shape, data=f"batch {batch}, prompt {prompt}, {new} new",
               seconds=round(dt, 2), gen_tok_s=round(n / dt))
    if CUDA:  # the graphed static-cache path gives the greedy tokens of the eager dynamic-cache path
        from tunesmith.models import generate as engine
        few = [p[:16 + 8 * i] for i, p in enumerate(prompts[:4])]
        # both loops as generate() runs them: decode steps through grouped decode attention
        with torch.inference_mode(), engine._grouped_decode(model):
            eager = engine._decode(model, few, 0, [vocab + 1], 32, engine._Sampler(0.0, 1.0, 0, None), model.device)
            graph = engine._decode_static(model, few, 0, [vocab + 1], 32, engine._Sampler(0.0, 1.0, 0, None),
                                          model.device)
        out["graph_matches_eager"] = sum(a == b for r, q in zip(eager[0], graph[0]) for a, b in zip(r, q)) / (4 * 32)
        t = time.perf_counter()
        with torch.inference_mode(), engine._grouped_decode(model):
            engine._decode(model, prompts, 0, [vocab + 1], new, engine._Sampler(1.0, 1.0, 0, None), model.device)
        _sync()
        out["eager_gen_tok_s"] = round(batch * new / (time.perf_counter() - t))
    return out


def _chat_word_tokenizer(vocab: int):
    """A word-level tokenizer splitting on spaces: `w{i}` is id i, plus specials and a chat template of
    its own (special tokens in `_word_tokenizer`'s `t{i}` form would match inside longer words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<user>", "<assistant>"]
    words = {**{t: i for i, t in enumerate(specials)}, **{f"w{i}": i for i in range(len(specials), vocab)}}
    tk = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=specials[4:])
    tok.chat_template = ("{% for m in messages %}<user> {{ m['content'] }} <eos> {% endfor %}"
                         "{% if add_generation_prompt %}<assistant> {% endif %}")
    return tok


def _even_ids(items, texts):
    """A reward read from the sampled words: the fraction whose id is even."""
    scores = [sum(w[-1] in "02468" for w in t.split()) / max(1, len(t.split())) for t in texts]
    return scores, {"even": scores}


def ts_grpo(shape="llama-1b", prompts=8, group=8, prompt=128, new=256, steps=3, micro=16, budget=0.0,
            attention="auto", loss_chunking="auto", kl=0.04):
    """tunesmith GRPO (`train_online`, what `recipe: grpo` runs): LoRA r16 on a random-init shape, `prompts`
    prompts of `prompt` words × `group` samples of up to `new` tokens per step, a KL term against the
    adapter-off reference. Each step's time splits into generation, log-prob passes (the reference's: under
    GRPO's defaults the update's forwards give the policy's) and update; medians over the steps after the
    first. The model that generates is the one trained, so no weights are copied between them."""
    from tunesmith._core.rundir import RunDir
    from tunesmith.config import config_from_dict
    from tunesmith.data.conversation import Message
    from tunesmith.models.methods import apply_method
    from tunesmith.training.online import train_online
    from tunesmith.training.preference import Reference

    model = build_model(shape, DEVICE)
    vocab = model.config.vocab_size
    cfg = config_from_dict({
        "recipe": "grpo", "data": {"train": "unused.jsonl"}, "reference": "adapter",
        "method": {"kind": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": LORA_TARGETS}},
        "rollout": {"prompts_per_step": prompts, "samples_per_prompt": group, "max_new_tokens": new,
                    "batch_size": prompts * group},
        "reward": {"sources": [{"kind": "function", "name": "benchmarks.arms:_even_ids"}]},
        "rl": {"kl_coef": kl},
        "train": {"max_steps": steps, "micro_batch_size": micro, "lr": 1e-5, "precision": "bf16" if CUDA else "fp32",
                  "attention": attention, "loss_chunking": loss_chunking, "memory_budget_gib": float(budget) or None,
                  "save_every": None, "progress": False, "tensorboard": False}})
    model = apply_method(model, cfg.method)
    rows = token_rows([prompt] * prompts * steps, vocab - 8)
    items = [type("Item", (), {"prompt": [Message("user", " ".join(f"w{i + 8}" for i in ids))], "reference": ""})()
             for ids in rows]
    run = RunDir(Path(tempfile.mkdtemp(prefix="ts-grpo-"))).create()
    records = []
    _reset_peak()
    t0 = time.perf_counter()
    with _region():
        train_online(model, _chat_word_tokenizer(vocab), items, _even_ids, cfg, run,
                     reference=Reference("adapter") if kl else None,
                     on_step=lambda step, r: records.append(r) or _step_done())
    wall = time.perf_counter() - t0
    steady = records[1:] or records
    med = {k: statistics.median(r[k] for r in steady) for k in
           ("step_seconds", "gen_seconds", "logprob_seconds", "update_seconds", "gen_tokens_per_s", "response_length")}
    trained = prompts * group * (prompt + med["response_length"])  # tokens each pass runs over
    return dict(arm="tunesmith_grpo", shape=shape, data=f"{prompts}x{group} samples, prompt {prompt}, {new} new",
                seconds=round(wall, 2), step_s=round(med["step_seconds"], 3), gen_s=round(med["gen_seconds"], 3),
                logprob_s=round(med["logprob_seconds"], 3), update_s=round(med["update_seconds"], 3),
                gen_tok_s=round(med["gen_tokens_per_s"]), update_tok_s=round(trained / med["update_seconds"]),
                peak_gib=_peak_gib(), plan=_plan(run))


def _try_lengths(step, lengths_to_try, limit_s, start_len=0):
    """Train one step at each length from `start_len` up, until one runs out of memory or would run past
    `limit_s` seconds: a step's time is foreseen from the last one's, grown with the square of the length
    (attention's share dominates at these lengths), so a step the time cannot hold is not begun."""
    best, trace, start, last = 0, [], time.perf_counter(), None
    for T in [T for T in lengths_to_try if T >= start_len]:
        elapsed = time.perf_counter() - start
        foreseen = 0.0 if last is None else last[1] * (T / last[0]) ** 2
        if elapsed + foreseen > limit_s:
            trace.append(dict(T=T, ok=None, note=f"time limit: about {foreseen:.0f} s foreseen, "
                                                  f"{max(0.0, limit_s - elapsed):.0f} s left"))
            break
        try:
            _reset_peak()
            t = time.perf_counter()
            step(T)
            _sync()
            last = (T, time.perf_counter() - t)
            trace.append(dict(T=T, ok=True, s=round(last[1], 2), peak_gib=_peak_gib()))
            best = T
        except torch.OutOfMemoryError:
            trace.append(dict(T=T, ok=False))
            break
        finally:
            import gc
            gc.collect()
            torch.cuda.empty_cache() if CUDA else None
    return best, trace


MAXLEN_STEPS = [8192, 16384, 32768, 65536, 98304, 131072, 163840, 196608, 262144]


def ts_maxlen(shape="llama-8b", limit_s=240, offload=1, mlp_chunk=8192, start=0):
    """Batch 1, LoRA r16 all-linear, every block checkpointed (its input in host memory with `offload`),
    MLPs `mlp_chunk` tokens at a time (0: whole), chunked loss, varlen attention; lengths from `start` up."""
    from tunesmith.config import TrainConfig
    from tunesmith.data.packing import collate_flat, shift_labels
    from tunesmith.training.loop import accumulate_gradients, lm_loss
    from tunesmith.training.speed import applied, plan_speed

    model = _peft_lora(build_model(shape, DEVICE))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=CUDA or None)
    cfg = TrainConfig(checkpointing="all", attention="varlen", loss_chunking="on", offload_activations=bool(offload),
                      mlp_chunk_tokens=int(mlp_chunk) or None)
    plan = plan_speed(model, cfg, torch.device(DEVICE), language_model=True)
    loss = lm_loss(chunked=True)

    def step(T):
        ids = torch.randint(4, model.config.vocab_size, (T,)).tolist()
        batch = collate_flat([[shift_labels(ids, ids)]], 0)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=CUDA):
            accumulate_gradients(model, [batch], loss, plan=plan)
        opt.step()
        opt.zero_grad(set_to_none=True)

    with applied(model, plan):
        best, trace = _try_lengths(step, MAXLEN_STEPS, limit_s, int(start))
    return dict(arm="tunesmith_maxlen", shape=shape, max_len=best, trace=trace, offload=bool(offload),
                mlp_chunk=int(mlp_chunk) or None, plan=plan.describe())


def hf_maxlen(shape="llama-8b", liger=0, limit_s=240):
    model = _peft_lora(build_model(shape, DEVICE), bool(liger))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=CUDA or None)

    def step(T):
        x = torch.randint(4, model.config.vocab_size, (1, T), device=DEVICE)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    best, trace = _try_lengths(step, MAXLEN_STEPS, limit_s)
    return dict(arm="hf_maxlen" + ("_liger" if liger else ""), shape=shape, max_len=best, trace=trace)


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


class _RssPeak:
    """The highest resident memory of this process while the block runs, sampled every 5 ms (a CPU has
    no allocator peak counter; ru_maxrss would include the model's load)."""

    def __enter__(self):
        import threading
        self.peak, self._stop = _rss_gib(), threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, _rss_gib())
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def ts_method(model="default", kind="lora", bits=4, dtype="bfloat16", bs=4, seq=256, steps=2, optimizer="adamw"):
    """One tunesmith method on a real model loaded as `tunesmith train` loads it: trainable and total
    parameters, weight memory, and the peak memory of `steps` training steps (the GPU's on CUDA, this
    process's resident memory elsewhere: each arm runs in its own process)."""
    from tunesmith._core.rundir import RunDir
    from tunesmith.config import LoraConfig, MethodConfig, ModelConfig, QuantConfig, TrainConfig
    from tunesmith.models import load_model_and_tokenizer
    from tunesmith.models.methods import apply_method, count_parameters
    from tunesmith.training.loop import fit

    quant = QuantConfig(bits=bits) if kind == "qlora" else QuantConfig()
    method = MethodConfig(kind=kind, lora=LoraConfig(r=16, alpha=32), quant=quant)
    lm, tok = load_model_and_tokenizer(ModelConfig(name=model, dtype=dtype), method=kind, quant=quant)
    weights_gib = lm.get_memory_footprint() / 2**30
    lm = apply_method(lm, method, tok)
    trainable, total = count_parameters(lm)
    examples, _ = _examples("D0", lm.config.vocab_size, bs, seq, bs * steps, 0.0, 1.0)
    cfg = TrainConfig(max_steps=steps, micro_batch_size=bs, lr=1e-4, warmup_ratio=0.0, save_every=None,
                      tensorboard=False, progress=False, optimizer=optimizer)
    run = RunDir(Path(tempfile.mkdtemp(prefix="ts-bench-"))).create()
    _reset_peak()
    before = torch.cuda.memory_allocated() / 2**30 if CUDA else _rss_gib()
    t0 = time.perf_counter()
    with _RssPeak() as host:
        fit(lm, [[e] for e in examples], [], cfg, run, pad_id=tok.pad_token_id, seed=0)
    losses = [r["loss"] for r in run.read_metrics() if "loss" in r]
    name = f"{kind}" + (f" {bits}-bit" if kind == "qlora" else f" {dtype}")
    return dict(arm=f"tunesmith {name}", shape=model, data=f"D0 {bs}x{seq}", trainable=trainable, total=total,
                weights_gib=round(weights_gib, 3), mem_before_gib=round(before, 3),
                peak_gib=_peak_gib() if CUDA else round(host.peak, 3), peak_of="gpu" if CUDA else "host rss",
                step_s=round((time.perf_counter() - t0) / steps, 2),
                first_loss=losses[0], last_loss=losses[-1], optimizer=optimizer)


def ts_optim(shape="llama-1b", impl="ours", steps=6, warm=2):
    """One optimiser step over every weight of `shape` in bfloat16 (the `full` suite's optimiser), median
    over the steps after `warm`: `BFloat16AdamW` as it runs (`ours`: one compiled kernel a slice on CUDA),
    its update eager (`eager`), or torch's fused AdamW on the same bfloat16 weights (`torch`: moments in
    bfloat16 too, every update rounded to nearest), the floor a single fused pass sets. `gb_s`: the bytes
    an ideal pass moves (read weight, gradient and both moments, write weight and moments: 14 a weight)
    over the step's time."""
    from tunesmith.training import optim

    model = build_model(shape, DEVICE).to(torch.bfloat16)
    params = list(model.parameters())
    g = torch.Generator(device=DEVICE).manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, device=DEVICE, generator=g).to(torch.bfloat16).mul_(1e-3)
    if impl == "torch":
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.1, fused=CUDA or None)
    else:
        opt = optim.BFloat16AdamW(params, lr=1e-5, weight_decay=0.1)
    saved = dict(optim._UPDATE)
    if impl == "eager":  # as after a failed compile
        optim._UPDATE["cuda"] = optim._bfloat16_update
    times = []
    try:
        for i in range(warm + steps):
            _sync()
            t = time.perf_counter()
            opt.step()
            _sync()
            times.append(time.perf_counter() - t)
    finally:
        optim._UPDATE.clear()
        optim._UPDATE.update(saved)
    n = sum(p.numel() for p in params)
    step_s = statistics.median(times[warm:])
    size = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    return dict(arm=f"optimiser step: {impl}", shape=shape, data=f"{size} bf16 weights",
                step_ms=round(step_s * 1e3, 1), gb_s=round(14 * n / step_s / 1e9), first_step_s=round(times[0], 2),
                peak_gib=_peak_gib())


ARMS = {f.__name__: f for f in (hf_fixed, ts_train, trl_sft, trl_dpo, ts_dpo, hf_generate, ts_generate, ts_grpo,
                                ts_maxlen, hf_maxlen, ts_method, ts_optim)}


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


if __name__ == "__main__":
    name, kwargs = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
    result = ARMS[name](**{k: _value(v) for k, v in kwargs.items()})
    result["args"] = kwargs
    if CUDA and "reserved_gib" not in result:  # the arm's own process: its peak is the arm's
        result["reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    print("RESULT " + json.dumps(result), flush=True)
    if os.environ.get("BENCH_RESULT"):
        with open(os.environ["BENCH_RESULT"], "a") as f:
            f.write(json.dumps(result) + "\n")
