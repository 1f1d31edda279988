"""Eval mode for the length of a block, with every module's own mode back afterwards."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator


@contextlib.contextmanager
def evaluating(model: Any) -> Iterator[Any]:
    """`model.eval()` inside the block (no dropout), and afterwards each module's mode exactly as it was,
    also when the block raises. A part kept in eval mode on purpose inside a training model stays in it,
    which `model.train(was_training)` would undo."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
