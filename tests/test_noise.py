"""NEFTune: noise on the input embeddings, scaled by each example's own length, in training only."""
import math

import pytest
import torch

from test_loop import Crash, quiet, rows
from tunesmith._core.rundir import RunDir
from tunesmith.data.packing import collate, collate_flat, shift_labels
from tunesmith.training import fit
from tunesmith.training.loop import lm_loss
from tunesmith.training.noise import example_lengths, noisy_embeddings


def test_example_lengths_in_padded_packed_and_flat_rows():
    """Padded rows (padding counts as its own run), a packed row of two examples, and the flat row."""
    a, b, c = shift_labels([5, 6, 7, 8], [5, 6, 7, 8]), shift_labels([9, 10], [9, 10]), shift_labels([11] * 3, [11] * 3)
    padded = collate([[a], [b]], pad_id=0)["position_ids"]
    assert example_lengths(padded).tolist() == [[4, 4, 4, 4], [2, 2, 2, 2]]
    packed = collate([[a, b], [c]], pad_id=0)["position_ids"]
    assert example_lengths(packed).tolist() == [[4, 4, 4, 4, 2, 2], [3, 3, 3, 3, 3, 3]]
    flat = collate_flat([[a, b], [c]], pad_id=0)["position_ids"]
    assert example_lengths(flat).tolist() == [[4, 4, 4, 4, 2, 2, 3, 3, 3]]


def test_each_token_gets_uniform_noise_bounded_by_its_own_examples_length(tokenizer):
    """With alpha 5 on width-64 embeddings, a token of a 40-token example gets noise uniform on
    [-m, m], m = 5 / sqrt(40 x 64), and a token of a 10-token example twice that: whether the short example
    is padded to 40 beside the long one, packed behind it, or laid flat. A trainer that scales by the
    row's length would give the short one m in the padded row (and less still when packed)."""
    from tunesmith.models.tiny import tiny_model

    model = tiny_model(tokenizer, seed=0)
    width = model.get_input_embeddings().weight.shape[1]
    g = torch.Generator().manual_seed(0)
    long, short = (shift_labels(ids, ids) for ids in (torch.randint(5, 900, (n,), generator=g).tolist()
                                                        for n in (40, 10)))
    layouts = {"padded": collate([[long], [short]], 0), "packed": collate([[long, short]], 0),
               "flat": collate_flat([[long], [short]], 0)}
    for name, batch in layouts.items():
        captured = []
        emb = model.get_input_embeddings()
        with noisy_embeddings(model, batch["position_ids"], 5.0):
            # registered inside, after NEFTune's hook: it sees the noisy embeddings
            handle = emb.register_forward_hook(lambda m, a, out: captured.append(out.detach()))
            model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
            handle.remove()
        noise = captured[0] - emb(batch["input_ids"]).detach()
        lengths = example_lengths(batch["position_ids"])
        for n in (40, 10):
            m = 5.0 / math.sqrt(n * width)
            part = noise[lengths == n]
            assert part.abs().max() <= m * (1 + 1e-5), name
            assert part.abs().max() > 0.95 * m, name  # the bound is reached: uniform, not smaller
            assert part.std() == pytest.approx(m / math.sqrt(3), rel=0.1), name  # uniform's std


def test_noise_only_in_training_forwards_and_only_when_asked(tokenizer):
    """The loss of a training forward changes with NEFTune; in eval mode (validation, generation) and
    without it the forward is the plain one."""
    from tunesmith.models.tiny import tiny_model

    model = tiny_model(tokenizer, seed=0)
    batch = collate(rows(4), 0)
    plain, noisy = lm_loss(), lm_loss(neftune=5.0)
    model.train()
    with torch.no_grad():
        base = plain(model, batch)[0]
        assert not torch.allclose(noisy(model, batch)[0], base, rtol=1e-4)
        model.eval()
        assert torch.equal(noisy(model, batch)[0], plain(model, batch)[0])
    assert not model.get_input_embeddings()._forward_hooks  # nothing left behind


def test_a_run_with_neftune_trains_and_resumes_exactly(tokenizer, tmp_path):
    """fit() with neftune_alpha: the loss falls, the run differs from one without it, and a run resumed
    from its step-4 checkpoint draws the same noise as the uninterrupted one (torch's generator state is in
    the checkpoint)."""
    from test_loop import lora_model

    data = rows(2)  # every step the same micro-batch: the loss has to fall
    cfg = quiet(micro_batch_size=2, max_steps=6, save_every=2, neftune_alpha=1.0, lr=1e-2)
    whole = RunDir(tmp_path / "whole").create()
    fit(lora_model(tokenizer), data, [], cfg, whole, pad_id=0, seed=0)
    losses = [r["loss"] for r in whole.read_metrics()]
    off = RunDir(tmp_path / "off").create()
    fit(lora_model(tokenizer), data, [], quiet(micro_batch_size=2, max_steps=6, lr=1e-2), off, pad_id=0, seed=0)
    assert losses != pytest.approx([r["loss"] for r in off.read_metrics()], rel=1e-6)
    part = RunDir(tmp_path / "part").create()

    def crash(step, record):
        if step == 5:
            raise Crash()

    with pytest.raises(Crash):
        fit(lora_model(tokenizer), data, [], cfg, part, pad_id=0, seed=0, on_step=crash)
    fit(lora_model(tokenizer), data, [], cfg, part, pad_id=0, seed=0, resume=True)
    assert [r["loss"] for r in part.read_metrics()] == pytest.approx(losses, rel=1e-6)
    assert losses[-1] < losses[0]


def test_neftune_is_for_supervised_fine_tuning():
    from tunesmith.config import RewardConfig, SFTConfig

    with pytest.raises(ValueError, match="neftune_alpha .*recipe sft, not reward"):
        RewardConfig(data={"train": "x.jsonl"}, train={"neftune_alpha": 5})
    assert SFTConfig(data={"train": "x.jsonl"}, train={"neftune_alpha": 5}).train.neftune_alpha == 5
