"""Inference a batch at a time: a batch that runs out of GPU memory runs again in halves, results unchanged."""
from __future__ import annotations

import pytest
import torch

from tunesmith._core.batches import in_batches
from tunesmith._core.errors import TunesmithError
from tunesmith.data.render import render_prompt
from tunesmith.models.generate import generate
from tunesmith.models.tiny import tiny_model


def oom(message="CUDA out of memory. Tried to allocate 3.00 GiB"):
    return torch.OutOfMemoryError(message + "\nmore detail")


def test_a_batch_out_of_memory_runs_again_in_halves_and_the_rest_at_that_size():
    calls = []

    def run(start, stop):
        calls.append((start, stop))
        if stop - start > 3:
            raise oom()
        return list(range(start, stop))

    with pytest.warns(UserWarning) as seen:
        parts = in_batches(11, 8, run, "scoring")
    assert [x for part in parts for x in part] == list(range(11))
    assert calls == [(0, 8), (0, 4), (0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 11)]
    assert [str(w.message) for w in seen] == [
        "scoring: out of GPU memory on a batch of 8 (CUDA out of memory. Tried to allocate 3.00 GiB); going on "
        "with batches of 4",
        "scoring: out of GPU memory on a batch of 4 (CUDA out of memory. Tried to allocate 3.00 GiB); going on "
        "with batches of 2"]


def test_an_item_alone_out_of_memory_says_what_ran_out():
    def run(start, stop):
        raise oom()

    with pytest.warns(UserWarning), pytest.raises(TunesmithError, match=r"^generation: out of GPU memory on a single "
                                                                        r"item \(CUDA out of memory\. Tried"):
        in_batches(3, 2, run, "generation")
    with pytest.raises(ValueError):  # anything else is not a memory problem: raised as it is
        in_batches(3, 2, lambda start, stop: int("x"), "generation")


def test_generation_out_of_memory_on_large_batches_gives_the_same_completions(tokenizer):
    """Greedy completions with batches of 4 running out of memory (a forward over more than 2 rows raises, as
    a GPU would): the same texts as batches of 2 that fit."""
    model = tiny_model(tokenizer, seed=0)
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in
               ("hi", "What is 3 + 4?", "Name a colour.", "Thanks!", "Count to three.")]

    def refuse_large(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[0] > 2:
            raise oom()
    want = generate(model, tokenizer, prompts, stop_ids=[tokenizer.eos_token_id], max_new_tokens=6, batch_size=2)
    hook = model.register_forward_pre_hook(refuse_large, with_kwargs=True)
    try:
        with pytest.warns(UserWarning, match="generation: out of GPU memory on a batch of 4"):
            got = generate(model, tokenizer, prompts, stop_ids=[tokenizer.eos_token_id], max_new_tokens=6,
                           batch_size=4)
    finally:
        hook.remove()
    assert [g.text for g in got] == [g.text for g in want]
    assert [g.token_ids for g in got] == [g.token_ids for g in want]


def test_validation_out_of_memory_on_large_batches_gives_the_same_loss(tokenizer):
    from tunesmith.config import TrainConfig
    from tunesmith.data.packing import Example, shift_labels
    from tunesmith.training.loop import causal_lm_loss, evaluate

    g = torch.Generator().manual_seed(0)
    rows = []
    for n in (5, 9, 4, 7, 6, 3, 8):
        ids = torch.randint(3, 100, (n,), generator=g).tolist()
        rows.append([shift_labels(ids, ids)])
    assert isinstance(rows[0][0], Example)
    model = tiny_model(tokenizer, seed=0)

    def refuse_large(m, batch):
        if batch["input_ids"].shape[0] > 2:
            raise oom()
        return causal_lm_loss(m, batch)
    want = evaluate(model, rows, TrainConfig(micro_batch_size=2), pad_id=0)
    with pytest.warns(UserWarning, match="validation: out of GPU memory on a batch of 4"):
        got = evaluate(model, rows, TrainConfig(micro_batch_size=4), pad_id=0, loss_fn=refuse_large)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
