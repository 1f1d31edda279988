"""`arithmetic`: small sums, differences and products with an exact answer (a verifiable RL task).

Scored the way math benchmarks such as GSM8K score free-form answers: the last number in the completion
must equal the answer, so "7", "3 + 4 = 7" and "The answer is 7." are all right and "7 is wrong, 8" is
not. The prompt asks for the number only; an answer that says more is still right, because what this
task checks is the arithmetic.
"""
from __future__ import annotations

import random
import re

from tunesmith.tasks.base import Task

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


def final_number(answer: str, completion: str) -> float:
    """1.0 when the last integer in the completion equals the answer, else 0.0."""
    numbers = _NUMBER.findall(completion)
    return float(bool(numbers) and numbers[-1] == answer.strip())


TASK = Task(name="arithmetic", description="small a + b, a - b, a x b -> the number (its last number is checked)",
            sample=sample, score=final_number)
