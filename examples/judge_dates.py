"""How well a model judges: its `kind: judge` ratings of right and wrong answers to the dates task.

    python examples/judge_dates.py [JUDGE] [RUBRIC]

JUDGE is any model name (default: the bundled model); RUBRIC a rubric text or .txt file (default: the
built-in one). Prints the mean rating (0..1) of the right dates, of random wrong ones and of "I don't
know.", and how often the right date is rated above the wrong one.
"""
import random
import sys
import time

from tunesmith.data.prompts import load_prompt_items
from tunesmith.rl.rewards import judge_reward


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "default"
    rubric = sys.argv[2] if len(sys.argv) > 2 else None
    items = load_prompt_items("examples/data/dates/test.jsonl")
    rng = random.Random(0)
    wrong = [f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}" for _ in items]
    start = time.perf_counter()
    judge = judge_reward(name, rubric)
    right_scores = judge(items, [item.reference for item in items])
    wrong_scores = judge(items, wrong)
    unsure = judge(items, ["I don't know."] * len(items))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    above = sum(a > b for a, b in zip(right_scores, wrong_scores)) / len(items)
    print(f"{len(items)} prompts: right {mean(right_scores):.3f}, wrong {mean(wrong_scores):.3f}, "
          f"\"I don't know.\" {mean(unsure):.3f}; right above wrong for {above:.0%} of prompts "
          f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
