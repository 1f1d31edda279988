"""Batching: shift labels per example, pack several examples per row, pad, and build position ids.

Training batches carry no attention mask. Position ids restart at 0 at every example and at the padding
that closes a row, and transformers turns such position ids into a block-diagonal causal mask, so no
token attends across an example boundary. Right padding plus causal attention means real tokens never
see padding either. (The model must be called with use_cache=False for that detection to run.) Models
whose masks skip that detection are found before training (`training.speed.settle_attention`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tunesmith.data.render import IGNORE


@dataclass(frozen=True)
class Example:
    """One tokenised example: `targets[t]` is the id to predict at position t, or IGNORE."""

    input_ids: tuple[int, ...]
    targets: tuple[int, ...]

    @property
    def n_loss_tokens(self) -> int:
        return sum(t != IGNORE for t in self.targets)

    def __len__(self) -> int:
        return len(self.input_ids)


def shift_labels(input_ids: Sequence[int], labels: Sequence[int]) -> Example:
    """Align labels with the position that predicts them. The last position predicts nothing, so the
    shift never reaches into whatever example follows in a packed row."""
    return Example(tuple(input_ids), tuple(labels[1:]) + (IGNORE,))


def pack_examples(examples: Sequence[Example], max_len: int) -> list[list[Example]]:
    """First-fit-decreasing bin packing into rows of at most `max_len` tokens (deterministic)."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    rows: list[list[Example]] = []
    space: list[int] = []
    for i in order:
        ex = examples[i]
        assert len(ex) <= max_len, "examples are truncated before packing"
        for r, free in enumerate(space):
            if len(ex) <= free:
                rows[r].append(ex)
                space[r] -= len(ex)
                break
        else:
            rows.append([ex])
            space.append(max_len - len(ex))
    return rows


def collate(rows: Sequence[Sequence[Example]], pad_id: int) -> dict:
    """Right-pad rows of one or more examples into tensors: input_ids, targets, position_ids (B, T), and
    example_ends (E, 2), where each example's last token sits (what a sequence-level head reads)."""
    import torch

    width = max(sum(len(e) for e in row) for row in rows)
    ids, tgt, pos, ends = [], [], [], []
    for b, row in enumerate(rows):
        r_ids, r_tgt, r_pos = [], [], []
        for ex in row:
            r_ids += ex.input_ids
            r_tgt += ex.targets
            r_pos += range(len(ex))
            ends.append((b, len(r_ids) - 1))
        pad = width - len(r_ids)
        ids.append(r_ids + [pad_id] * pad)
        tgt.append(r_tgt + [IGNORE] * pad)
        pos.append(r_pos + list(range(pad)))
    targets = torch.tensor(tgt)
    return {
        "input_ids": torch.tensor(ids),
        "targets": targets,
        "position_ids": torch.tensor(pos),
        "example_ends": torch.tensor(ends),  # (E, 2): row and position of each example's last token
        "n_loss_tokens": int((targets != IGNORE).sum()),
        "n_tokens": sum(sum(len(e) for e in row) for row in rows),
    }


def collate_flat(rows: Sequence[Sequence[Example]], pad_id: int) -> dict:
    """Padding-free layout: every example of every row end to end in one row (1, N), with `cu_seq_lens`
    (E + 1,) int32, the cumulative example lengths a variable-length attention kernel keeps apart, and
    `max_length`, the longest example. Nothing is padded, so no compute goes to padding. `pad_id` is
    unused (kept for the collate signature)."""
    import torch

    ids, tgt, pos, cu, ends = [], [], [], [0], []
    for row in rows:
        for ex in row:
            ids += ex.input_ids
            tgt += ex.targets
            pos += range(len(ex))
            cu.append(len(ids))
            ends.append((0, len(ids) - 1))
    targets = torch.tensor([tgt])
    return {
        "input_ids": torch.tensor([ids]),
        "targets": targets,
        "position_ids": torch.tensor([pos]),
        "cu_seq_lens": torch.tensor(cu, dtype=torch.int32),
        "max_length": max(b - a for a, b in zip(cu[:-1], cu[1:])),
        "example_ends": torch.tensor(ends),
        "n_loss_tokens": int((targets != IGNORE).sum()),
        "n_tokens": len(ids),
    }


def _common_prefix(seqs: list[Example]) -> int:
    """How many leading tokens all of `seqs` have alike, each keeping at least one token of its own (0 for a
    lone sequence)."""
    if len(seqs) < 2:
        return 0
    n = min(map(len, seqs)) - 1
    first = seqs[0].input_ids
    for s in seqs[1:]:
        n = next((t for t in range(n) if s.input_ids[t] != first[t]), n)
    return n


def collate_shared(sets: list[list[Example]]) -> dict:
    """One padding-free row in which the sequences of each set (the distinct sides of one prompt's pairs, the
    distinct samples of one RL prompt) share their common prefix: [prefix + first rest, second rest, ...],
    each later rest's positions going on from the prefix. Attention needs each sequence's keys apart from
    its queries:

    - queries: the first sequence whole, then each later rest (`cu_seq_lens`);
    - keys: each sequence whole, prefix + its own rest (`cu_seq_lens_k`), gathered from the row by
      `kv_index`; a later rest's query sees the prefix and its own tokens before it;
    - scored tokens: `predict` (K,) the row position that predicts each answer token, `target_ids` (K,)
      and `sequence` (K,), sequences numbered in the order of `sets` flattened. The prefix's last position
      predicts the first own token of every sequence of the set.

    The prefix (the prompt, and any answer tokens the set starts with alike) runs once, which in DPO data
    is most of a short pair, all but one K-th of a K-way ranking's prompt tokens, and all but one G-th of
    the prompt tokens of an RL group of G samples."""
    import torch

    ids, pos, cu, cu_k, kv, predict, target, seq = [], [], [0], [0], [], [], [], []
    n = 0
    for seqs in sets:
        shared, base = _common_prefix(seqs), len(ids)
        for k, ex in enumerate(seqs):
            skip = shared if k else 0  # later sequences lay out their own rest only
            own = len(ids)
            ids += ex.input_ids[skip:]
            pos += range(skip, len(ex))
            cu.append(len(ids))
            kv += range(base, base + skip)
            kv += range(own, len(ids))
            cu_k.append(len(kv))
            for t, y in enumerate(ex.targets):
                if y != IGNORE:
                    predict.append(base + t if t < skip else own + t - skip)
                    target.append(y)
                    seq.append(n)
            n += 1
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos]),
            "cu_seq_lens": torch.tensor(cu, dtype=torch.int32), "cu_seq_lens_k": torch.tensor(cu_k, dtype=torch.int32),
            "kv_index": torch.tensor(kv), "max_length": max(lengths),
            "max_length_k": max(b - a for a, b in zip(cu_k[:-1], cu_k[1:])),
            "predict": torch.tensor(predict), "target_ids": torch.tensor(target), "sequence": torch.tensor(seq),
            "n_sequences": n, "n_tokens": len(ids)}
