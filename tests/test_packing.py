"""Packing and padding: per-example losses do not change when examples share a row or meet padding."""
import torch

from tunesmith.data.packing import Example, collate, pack_examples, shift_labels
from tunesmith.data.render import IGNORE
from tunesmith.losses.cross_entropy import token_cross_entropy


def examples(n=5):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = 6 + 3 * i
        ids = torch.randint(5, 1000, (length,), generator=g).tolist()
        labels = [IGNORE] * 3 + ids[3:]
        out.append(shift_labels(ids, labels))
    return out


def per_example_losses(model, rows):
    """Loss of each example in `rows` (a list of rows of examples), in row order."""
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    losses = []
    for b, row in enumerate(rows):
        start = 0
        for ex in row:
            end = start + len(ex)
            s, n = token_cross_entropy(logits[b:b + 1, start:end], batch["targets"][b:b + 1, start:end])
            losses.append(float(s) / n)
            start = end
    return losses


def test_shift_keeps_each_target_inside_its_example():
    ex = shift_labels([1, 2, 3], [IGNORE, 2, 3])
    assert ex.targets == (2, 3, IGNORE) and ex.n_loss_tokens == 2


def test_pack_is_first_fit_decreasing_and_respects_the_limit():
    exs = [Example(tuple(range(n)), tuple(range(n))) for n in (5, 3, 8, 2, 6)]
    rows = pack_examples(exs, 10)
    assert [[len(e) for e in r] for r in rows] == [[8, 2], [6, 3], [5]]
    assert all(sum(len(e) for e in r) <= 10 for r in rows)


def test_collate_restarts_positions_and_pads_targets():
    a, b = Example((7, 8, 9), (8, 9, IGNORE)), Example((4, 5), (5, IGNORE))
    batch = collate([[a, b], [b]], pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["input_ids"][1].tolist() == [4, 5, 0, 0, 0]
    assert batch["targets"][1].tolist() == [5, IGNORE, IGNORE, IGNORE, IGNORE]
    assert batch["n_loss_tokens"] == 4 and batch["n_tokens"] == 7


def test_packed_losses_equal_unpacked(tiny):
    exs = examples()
    alone = [per_example_losses(tiny, [[e]])[0] for e in exs]
    packed = per_example_losses(tiny, [exs])  # all five in one row
    assert torch.allclose(torch.tensor(packed), torch.tensor(alone), atol=1e-5)


def test_without_position_resets_examples_would_leak(tiny):
    """The check above can fail: one row with continuous positions lets example 2 attend to example 1."""
    exs = examples(2)
    alone = per_example_losses(tiny, [[exs[1]]])[0]
    merged = Example(exs[0].input_ids + exs[1].input_ids, exs[0].targets + exs[1].targets)
    batch = collate([[merged]], pad_id=0)
    with torch.no_grad():
        logits = tiny(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    start = len(exs[0])
    s, n = token_cross_entropy(logits[:, start:], batch["targets"][:, start:])
    assert abs(float(s) / n - alone) > 1e-3


def test_padding_does_not_change_losses(tiny):
    exs = examples(3)
    alone = [per_example_losses(tiny, [[e]])[0] for e in exs]
    padded = per_example_losses(tiny, [[e] for e in exs])  # different lengths in one padded batch
    assert torch.allclose(torch.tensor(padded), torch.tensor(alone), atol=1e-5)
