"""Inference over many items a batch at a time, with the batch halved where the GPU runs out of memory."""
from __future__ import annotations

import warnings
from typing import Callable, TypeVar

from tunesmith._core.errors import TunesmithError

R = TypeVar("R")


def in_batches(n: int, batch_size: int, run: Callable[[int, int], R], what: str) -> list[R]:
    """`run(start, stop)` over items 0..n, `batch_size` at a time; returns each batch's result, in order.

    A batch that runs out of GPU memory runs again as its first half, and the items after it go on at that
    size; each halving is a warning. Results are the same as at the first size for anything computed item
    by item (scores, log-probs, greedy completions); sampled completions draw differently after a halving.
    One item alone that does not fit raises an error naming `what`. Where memory ran out, `run` must have
    changed nothing it reads (it runs again over the same items)."""
    import torch

    out: list[R] = []
    start, size = 0, max(1, batch_size)
    while start < n:
        stop = min(n, start + size)
        try:
            out.append(run(start, stop))
        except torch.OutOfMemoryError as err:
            reason = str(err).split("\n")[0]
        else:
            start = stop
            continue
        # past the handler: the failed batch's traceback, and the tensors its frames held, are released
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if stop - start == 1:
            raise TunesmithError(f"{what}: out of GPU memory on a single item ({reason}); shorten the inputs or "
                                 "the generation length, or free GPU memory")
        size = max(1, (stop - start) // 2)
        warnings.warn(f"{what}: out of GPU memory on a batch of {stop - start} ({reason}); going on with batches "
                      f"of {size}", stacklevel=2)
    return out
