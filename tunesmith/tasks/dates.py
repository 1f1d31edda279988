"""`dates`: a date written one of six unambiguous ways -> the ISO form `YYYY-MM-DD`.

The quickstart task: the untuned SmolLM2-135M-Instruct gets about 6% of these right, a few minutes of
LoRA on a 2-core CPU takes it above 90% (README). The numeric forms say which number is the day, so every prompt
has exactly one right answer.
"""
from __future__ import annotations

import datetime
import random

from tunesmith.tasks.base import Task

# English names spelled out, not `calendar.month_name`, which follows the machine's locale.
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
FIRST, LAST = datetime.date(1950, 1, 1), datetime.date(2049, 12, 31)

INSTRUCTION = "Rewrite the date in ISO format (YYYY-MM-DD). Answer with the date only."


def ordinal(day: int) -> str:
    """1 -> '1st', 2 -> '2nd', 11 -> '11th', 23 -> '23rd'."""
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


# The six ways a date is written in the prompts; each names the day unambiguously.
WRITINGS = (
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",  # March 4, 2021
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",  # 4 March 2021
    lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",  # the 4th of March, 2021
    lambda d: f"{d.day:02d}/{d.month:02d}/{d.year} (day/month/year)",  # 04/03/2021 (day/month/year)
    lambda d: f"{d.month:02d}/{d.day:02d}/{d.year} (month/day/year)",  # 03/04/2021 (month/day/year)
    lambda d: f"{WEEKDAYS[d.weekday()][:3]}, {d.day} {MONTHS[d.month - 1][:3]} {d.year}",  # Thu, 4 Mar 2021
)


def sample(rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer) pair: a uniform day in 1950-2049, written a uniformly chosen way."""
    day = datetime.date.fromordinal(rng.randint(FIRST.toordinal(), LAST.toordinal()))
    written = WRITINGS[rng.randrange(len(WRITINGS))](day)
    return f"{INSTRUCTION}\nDate: {written}", day.isoformat()


TASK = Task(name="dates", description="a date written one of six ways -> YYYY-MM-DD", sample=sample)


# A narrower sub-task of `dates` for sequential fine-tuning: only the spelled-out writings, and a different
# answer form. Trained after `dates`, it competes for the same prompts' answers, which is what makes
# forgetting (and replay's remedy) measurable.
US_INSTRUCTION = "Rewrite the date in US format (MM/DD/YYYY). Answer with the date only."


def sample_us(rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer): a uniform day in 1950-2049 with its month spelled out -> MM/DD/YYYY."""
    day = datetime.date.fromordinal(rng.randint(FIRST.toordinal(), LAST.toordinal()))
    written = WRITINGS[rng.randrange(3)](day)  # the three writings that spell the month out
    return f"{US_INSTRUCTION}\nDate: {written}", f"{day.month:02d}/{day.day:02d}/{day.year}"


US_TASK = Task(name="dates_us", description="a date with its month spelled out -> MM/DD/YYYY", sample=sample_us)
