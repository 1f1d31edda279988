"""`topics`: a checkable text-classification task: which of three topics a templated sentence is about.

Each sentence holds exactly one topic keyword among shared filler (names, cities, days), so the label is
a fact of the text, not an opinion: a classifier that reads the keyword is right every time. Rows are
`{"text", "label"}`, what `recipe: classify` reads by default.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from tunesmith._core.errors import TunesmithError
from tunesmith.tasks.base import write_split_rows

KEYWORDS: dict[str, tuple[str, ...]] = {
    "animals": ("fox", "dog", "birds", "horse", "fish"),
    "food": ("bread", "cheese", "apples", "coffee", "milk"),
    "weather": ("rain", "wind", "snow", "sunshine", "clouds"),
}
LABELS = tuple(sorted(KEYWORDS))
_NAMES = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Maria", "Omar", "Yuki", "Zoe")
_CITIES = ("Paris", "London", "Berlin", "Madrid", "Rome", "Tokyo", "Lisbon", "Vienna", "Oslo", "Cairo")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_TEMPLATES = (
    "On {day} {name} talked about the {kw} in {city}.",
    "{name} wrote a short story about the {kw} last {day}.",
    "In {city}, the {kw} was all anyone could discuss on {day}.",
    "{name} from {city} asked a question about the {kw}.",
    "The news in {city} on {day} was about the {kw}, said {name}.",
)


def sample(rng: random.Random) -> tuple[str, str]:
    """One (sentence, topic): a uniform topic, one of its keywords, a uniform template and filler."""
    label = rng.choice(LABELS)
    text = rng.choice(_TEMPLATES).format(kw=rng.choice(KEYWORDS[label]), name=rng.choice(_NAMES),
                                         city=rng.choice(_CITIES), day=rng.choice(_DAYS))
    return text, label


def make(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` rows with distinct sentences, drawn only from `random.Random(seed)`; the first k rows do not
    depend on n."""
    if n < 0:
        raise TunesmithError(f"task 'topics': the number of examples must be >= 0, got {n}")
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _ in range(50 * n + 100):  # tens of thousands of distinct sentences: collisions are rare
        if len(rows) == n:
            break
        text, label = sample(rng)
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": label})
    if len(rows) < n:
        raise TunesmithError(f"task 'topics' could only produce {len(rows)} distinct sentences, {n} were asked for")
    return rows


def write_files(out_dir: str | Path, n_train: int, n_test: int, seed: int) -> tuple[Path, Path]:
    """`train.jsonl` and `test.jsonl` with no sentence in both; the test split is the first `n_test` rows,
    so it stays the same when only `n_train` changes."""
    return write_split_rows(make(n_test + n_train, seed), out_dir, n_test)
