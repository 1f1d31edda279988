"""`prose`: plain English paragraphs about made-up towns, for measuring general language modelling
(perplexity) before and after fine-tuning. Rows are `{"text": ...}`: every token is scored.

The paragraphs are templated but ordinary English, with varied facts, so a pretrained model finds them
neither trivial nor foreign, and no fine-tuning task in this project trains on anything like them.
"""
from __future__ import annotations

import random
from pathlib import Path

from tunesmith.tasks.base import write_split_rows

_START = ("Ash", "Bram", "Cold", "Dun", "Elm", "Fair", "Glen", "High", "Iron", "Kings", "Lark", "Mill", "North",
          "Oak", "Red", "Stone", "Thorn", "West", "Wind", "York")
_END = ("ford", "bury", "wick", "ton", "field", "mouth", "bridge", "dale", "haven", "moor")
_RIVERS = ("Avon", "Tamar", "Wye", "Ouse", "Trent", "Exe", "Severn", "Tees", "Dee", "Eden")
_TRADES = ("wool", "timber", "salt", "pottery", "fishing", "cider", "tin", "lace", "barley", "shipbuilding")
_SIGHTS = ("an old stone church", "a covered market", "a ruined castle", "a narrow harbour", "a long bridge",
           "a small museum", "a walled garden", "a windmill", "a clock tower", "a railway viaduct")
_SENTENCES = (
    "{town} is a small town on the River {river}, about {miles} miles from the coast.",
    "For centuries its wealth came from {trade}, and many of the older houses were built by {trade} merchants.",
    "Visitors come to see {sight}, which dates from the {century} century.",
    "The town holds a market every {day}, when farmers from the surrounding villages sell their produce.",
    "In {year} a flood damaged much of the lower town, and the council later built a wall along the river.",
    "Today about {people} people live in {town}, and most of them work in the nearby city.",
    "The local school was founded in {year2} and still uses its original building.",
    "In summer the meadows beside the {river} are full of walkers, and in winter the paths are often muddy.",
)
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")


def paragraph(rng: random.Random) -> str:
    """Four to six sentences about one made-up town, the first always naming it."""
    facts = {"town": rng.choice(_START) + rng.choice(_END), "river": rng.choice(_RIVERS),
             "miles": rng.randint(3, 40), "trade": rng.choice(_TRADES), "sight": rng.choice(_SIGHTS),
             "century": rng.choice(("twelfth", "fourteenth", "sixteenth", "eighteenth")),
             "day": rng.choice(_DAYS), "year": rng.randint(1850, 1990), "year2": rng.randint(1700, 1900),
             "people": f"{rng.randint(2, 40) * 500:,}"}
    rest = rng.sample(_SENTENCES[1:], rng.randint(3, 5))
    return " ".join(s.format(**facts) for s in (_SENTENCES[0], *rest))


def write_files(out_dir: str | Path, n_train: int, n_test: int, seed: int) -> tuple[Path, Path]:
    """`train.jsonl` and `test.jsonl` of distinct paragraphs (the test rows first, as for every task)."""
    rng, rows, seen = random.Random(seed), [], set()
    while len(rows) < n_train + n_test:
        text = paragraph(rng)
        if text not in seen:
            seen.add(text)
            rows.append({"text": text})
    return write_split_rows(rows, out_dir, n_test)
