"""NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"): uniform noise
on the input embeddings while training."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def example_lengths(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids -> (B, T): the length of the example each token belongs to. An example starts
    where its positions start at 0, in a padded row, a packed one or a flat one alike; a padded row's padding
    counts as an example of its own."""
    starts = (position_ids == 0).flatten().long()
    starts[0] = 1  # every row begins an example, so the first token does
    example = starts.cumsum(0) - 1
    return torch.bincount(example)[example].view_as(position_ids)


@contextlib.contextmanager
def noisy_embeddings(model: torch.nn.Module, position_ids: torch.Tensor, alpha: float) -> Iterator[None]:
    """For the forwards inside: each input embedding gets noise drawn uniformly from [-m, m] per element,
    m = alpha / sqrt(L · d), with L the length of the token's own example and d the embedding width.

    The paper scales by the sequence's length. Taking the length of the whole (padded or packed) row
    instead, as trainers that pad do, would give a short example padded beside a long one less noise than
    the same example alone. The draws come from torch's generator, which checkpoints save and a resume
    restores."""
    embedding = model.get_input_embeddings()
    width = embedding.weight.shape[-1]
    magnitude = alpha / torch.sqrt(example_lengths(position_ids).double() * width)

    def add_noise(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if output.shape[:2] != magnitude.shape:
            raise AssertionError(f"NEFTune: embeddings of shape {tuple(output.shape)} for position ids of "
                                 f"shape {tuple(magnitude.shape)}")
        scale = magnitude.to(output.device, torch.float32).unsqueeze(-1)
        noise = torch.empty(output.shape, device=output.device, dtype=torch.float32).uniform_(-1.0, 1.0)
        return output + (noise * scale).to(output.dtype)

    handle = embedding.register_forward_hook(add_noise)
    try:
        yield
    finally:
        handle.remove()

