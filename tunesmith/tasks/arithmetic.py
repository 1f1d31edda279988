"""`arithmetic`: small sums, differences and products, answered with the number only (a verifiable RL task).

The metric is exact match. The RL reward also gives partial credit, 0.5, when the completion's last number
is the right one but it says more than the number ("The answer is 7."), so a policy that computes right
but answers wordily sees a gradient toward the bare answer, and one that computes wrong sees none.
"""
from __future__ import annotations

import random
import re

from tunesmith.tasks.base import Task, exact_match

_NUMBER = re.compile(r"-?\d+")


def sample(rng: random.Random) -> tuple[str, str]:
    """a + b and a - b (a >= b) with terms in 1..30, a x b with factors in 2..9."""
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"What is {a} times {b}? Answer with the number only.", str(a * b)
    a, b = rng.randint(1, 30), rng.randint(1, 30)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"What is {a} - {b}? Answer with the number only.", str(a - b)
    return f"What is {a} + {b}? Answer with the number only.", str(a + b)


def partial(answer: str, completion: str) -> float:
    """1.0 for exactly the answer; 0.5 when the last number in the completion is the answer; else 0."""
    if exact_match(answer, completion):
        return 1.0
    numbers = _NUMBER.findall(completion)
    return 0.5 if numbers and numbers[-1] == answer.strip() else 0.0


TASK = Task(name="arithmetic", description="small a + b, a - b, a x b -> the number", sample=sample,
            partial=partial)
