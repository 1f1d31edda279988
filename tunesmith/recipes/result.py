"""What every recipe returns."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunResult:
    """What `tunesmith.train()` returns: where the run is and what it measured."""

    path: Path
    steps: int
    train_loss: float | None
    val_loss: float | None
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    data_stats: dict[str, Any] = field(default_factory=dict)
