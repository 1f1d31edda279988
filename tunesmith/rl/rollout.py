"""Rollouts: sampled responses laid out as tensors the policy, the reference and the value head all read.

Every row is the prompt, left-padded to the batch's widest prompt, followed by the response, right-padded
to the longest response: `input_ids` (N, Q + R). A response that ended its turn keeps its end-of-turn id
(the policy must learn to stop); `mask` (N, R) is 1 on response tokens. Position ids count real tokens
only, so a padded row sees the positions it would see alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from tunesmith.data.packing import Example, collate_shared
from tunesmith.data.render import IGNORE
from tunesmith.models.generate import Generation


@dataclass
class Rollout:
    input_ids: torch.Tensor       # (N, Q + R)
    attention_mask: torch.Tensor  # (N, Q + R)
    position_ids: torch.Tensor    # (N, Q + R)
    response: torch.Tensor        # (N, R) the sampled ids, pad after the end
    mask: torch.Tensor            # (N, R) float, 1 on response tokens
    texts: list[str]
    finished: list[bool]
    _layouts: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # `flat`'s, made once

    @property
    def response_width(self) -> int:
        return self.response.shape[1]

    def rows(self, index: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        """The model inputs of some rows (a slice or an index tensor)."""
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                "position_ids": self.position_ids[index]}

    def response_tokens(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of every response token (mask 1) of some rows, row-major: row counts within them."""
        return self.mask[index].nonzero(as_tuple=True)

    def flat(self, index: torch.Tensor | slice, share: bool = False) -> dict[str, Any]:
        """Some rows with no padding, laid end to end as one row for variable-length attention:
        `input_ids` and `position_ids` (1, T) (positions restart at 0 for each sequence), `cu_seq_lens`
        (n + 1,) int32 and `max_length` (what `speed.flat_kwargs` reads), `predict` (K,): the flat
        position whose hidden state predicts each response token, in `response_tokens` order, and
        `n_tokens`, T.

        With `share`, rows with the same prompt (a group's samples) lay it out once (`collate_shared`:
        each later sample's keys gather the prompt from the row by `kv_index`), and with it any response
        tokens all of them begin with; samples alike token for token are laid out once. A prompt's hidden
        states do not depend on what follows it, so every response token is predicted from the hidden
        state it would have had in a row of its own, and a backward through a shared position sums what
        each sample's row would have sent back through its own copy. A group of G samples of a P-token
        prompt saves (G - 1) P positions. Made once per rows and kind (the passes over a rollout ask for
        the same micro-batches again)."""
        rows = tuple(index.tolist()) if isinstance(index, torch.Tensor) else (index.start, index.stop, index.step)
        key = (rows, share)
        if key not in self._layouts:
            self._layouts[key] = self._shared(index) if share else self._apart(index)
        return self._layouts[key]

    def _apart(self, index: torch.Tensor | slice) -> dict[str, Any]:
        real = self.attention_mask[index].bool()
        lengths = real.sum(1)
        cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        prompt_lengths = real[:, :real.size(1) - self.response_width].sum(1)
        row, col = self.response_tokens(index)
        return {"input_ids": self.input_ids[index][real][None], "position_ids": self.position_ids[index][real][None],
                "cu_seq_lens": cu.to(torch.int32), "max_length": int(lengths.max()),
                "predict": cu[row] + prompt_lengths[row] - 1 + col, "n_tokens": int(lengths.sum())}

    def _shared(self, index: torch.Tensor | slice) -> dict[str, Any]:
        real = self.attention_mask[index].bool()
        prompt_lengths = real[:, :real.size(1) - self.response_width].sum(1).tolist()
        sets: dict[tuple[int, ...], dict[tuple[int, ...], int]] = {}  # prompt -> distinct sequence -> its place
        rows = []  # per row: (its prompt, its sequence)
        for ids, keep, p in zip(self.input_ids[index].tolist(), real.tolist(), prompt_lengths):
            sequence = tuple(t for t, k in zip(ids, keep) if k)
            samples = sets.setdefault(sequence[:p], {})
            samples.setdefault(sequence, len(samples))
            rows.append((sequence[:p], sequence))
        # sequence t predicts sequence[t + 1] where that is a response token
        examples = {prompt: [Example(s, (IGNORE,) * (len(prompt) - 1) + s[len(prompt):] + (IGNORE,)) for s in samples]
                    for prompt, samples in sets.items()}
        batch = collate_shared(list(examples.values()))
        first, n = {}, 0  # each prompt's first sequence's number in the row
        for prompt, seqs in examples.items():
            first[prompt], n = n, n + len(seqs)
        starts = [0] + torch.bincount(batch["sequence"], minlength=n).cumsum(0).tolist()
        spans = [(starts[first[p] + sets[p][s]], starts[first[p] + sets[p][s] + 1]) for p, s in rows]
        predict = torch.cat([batch["predict"][a:b] for a, b in spans])
        keys = ("input_ids", "position_ids", "cu_seq_lens", "cu_seq_lens_k", "kv_index", "max_length", "max_length_k",
                "n_tokens")
        return {**{k: batch[k] for k in keys}, "predict": predict}


def build_rollout(prompts: Sequence[Sequence[int]], generations: Sequence[Generation], pad_id: int) -> Rollout:
    """Lay out `prompts[i]` + `generations[i]` (its ids plus its stop id, if it stopped) as one row each."""
    responses = [list(g.token_ids) + ([g.stop_id] if g.stop_id is not None else []) for g in generations]
    q = max(len(p) for p in prompts)
    r = max(1, max(len(x) for x in responses))
    n = len(prompts)
    ids = torch.full((n, q + r), pad_id, dtype=torch.long)
    attn = torch.zeros((n, q + r), dtype=torch.long)
    for i, (p, resp) in enumerate(zip(prompts, responses)):
        ids[i, q - len(p):q] = torch.tensor(list(p))
        attn[i, q - len(p):q] = 1
        if resp:
            ids[i, q:q + len(resp)] = torch.tensor(resp)
            attn[i, q:q + len(resp)] = 1
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    return Rollout(ids, attn, positions, ids[:, q:].clone(), attn[:, q:].float(),
                   [g.text for g in generations], [g.finished for g in generations])


def distinct_n(token_lists: Sequence[Sequence[int]], n: int = 2) -> float:
    """Distinct n-grams over all n-grams across `token_lists` (1.0: no n-gram repeats; near 0: the samples
    say the same thing). Lists shorter than n count their whole sequence as one n-gram."""
    grams = [tuple(t[i:i + n]) for t in token_lists for i in range(max(1, len(t) - n + 1))]
    return len(set(grams)) / len(grams) if grams else 0.0


def group_diversity(generations: Sequence[Generation], group_size: int, n: int = 2) -> float:
    """Mean distinct-n across each prompt's samples; with one sample per prompt, across the whole batch."""
    ids = [g.token_ids for g in generations]
    if group_size < 2:
        return distinct_n(ids, n)
    groups = [ids[i:i + group_size] for i in range(0, len(ids), group_size)]
    return sum(distinct_n(g, n) for g in groups) / len(groups)


def sample_rows(items: Sequence[Any], generations: Sequence[Generation], scores: Sequence[float]) -> list[dict]:
    """What `samples/step-N.jsonl` holds: the prompt's last message, the response, its reward."""
    return [{"prompt": item.prompt[-1].content, "reference": item.reference, "completion": g.text,
             "finished": g.finished, "reward": s} for item, g, s in zip(items, generations, scores)]
