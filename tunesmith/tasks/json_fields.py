"""`json_fields`: a sentence about a person -> compact JSON `{"name":...,"age":...,"city":...}`.

Scored by parsing: any JSON spelling of the right object counts (spaces, key order), anything that does
not parse scores 0. The RL reward gives partial credit per correct field.
"""
from __future__ import annotations

import json
import random
from typing import Any

from tunesmith.tasks.base import Task

NAMES = ("Maria", "Omar", "Yuki", "Liam", "Sofia", "Noah", "Aisha", "Lucas", "Chen", "Emma", "Mateo", "Priya",
         "Hugo", "Zoe", "Ivan", "Leila", "Kofi", "Ingrid", "Diego", "Hana", "Tom", "Amara", "Felix", "Nina")
CITIES = ("Lyon", "Berlin", "Osaka", "Toronto", "Lisbon", "Cairo", "Lima", "Oslo", "Madrid", "Seoul", "Dublin",
          "Nairobi", "Vienna", "Quito", "Porto", "Hanoi", "Austin", "Kyoto", "Milan", "Accra")
SENTENCES = (
    "{name} is {age} years old and lives in {city}.",
    "{name}, aged {age}, lives in {city}.",
    "At {age}, {name} calls {city} home.",
    "{name} lives in {city} and is {age}.",
    "Meet {name}: {age} years old, living in {city}.",
)
INSTRUCTION = ('Extract the name, age and city from the sentence as compact JSON: '
               '{"name":...,"age":...,"city":...} with age as a number. Answer with the JSON only.')


def sample(rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer) pair; the answer is compact JSON with keys in the order name, age, city."""
    person = {"name": rng.choice(NAMES), "age": rng.randint(18, 90), "city": rng.choice(CITIES)}
    sentence = rng.choice(SENTENCES).format(**person)
    return f"{INSTRUCTION}\nSentence: {sentence}", json.dumps(person, separators=(",", ":"))


def _parse_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def same_object(answer: str, completion: str) -> float:
    """1.0 when the completion parses to the same JSON object as the answer, else 0.0."""
    return float(_parse_object(completion) == json.loads(answer))


def field_credit(answer: str, completion: str) -> float:
    """Correct fields / all keys named by either side: 1.0 only for the exact object, extra keys cost credit."""
    got, want = _parse_object(completion), json.loads(answer)
    if got is None:
        return 0.0
    right = sum(1 for k, v in want.items() if k in got and got[k] == v)
    return right / len(set(want) | set(got))


TASK = Task(name="json_fields", description="a sentence about a person -> compact JSON name/age/city",
            sample=sample, score=same_object, partial=field_credit)
