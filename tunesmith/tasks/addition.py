"""`addition`: the sum of two three-digit numbers, answered with the number only (a verifiable RL task)."""
from __future__ import annotations

import random

from tunesmith.tasks.base import Task


def sample(rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer) pair with both terms uniform in 100..999."""
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return f"What is {a} + {b}? Answer with the number only.", str(a + b)


TASK = Task(name="addition", description="a + b for three-digit numbers -> the sum", sample=sample)
