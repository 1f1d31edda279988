"""Example reward functions for `reward.sources: [{kind: function, name: examples/rewards.py:<name>}]`.

A reward function takes the prompts (lists of {role, content} messages), the completions (strings) and the
raw data rows, and returns one number per completion.
"""
from __future__ import annotations


def digit_fraction(prompts: list[list[dict]], completions: list[str], rows: list[dict]) -> list[float]:
    """The fraction of a completion's non-space characters that are digits (a trivially learnable target)."""
    out = []
    for text in completions:
        chars = [c for c in text if not c.isspace()]
        out.append(sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0)
    return out


def brevity(prompts: list[list[dict]], completions: list[str], rows: list[dict]) -> list[float]:
    """1 for an empty answer, falling by 0.01 per character: a gentle push toward short answers."""
    return [max(0.0, 1.0 - 0.01 * len(text)) for text in completions]


def vowel_fraction(prompts: list[list[dict]], completions: list[str], rows: list[dict]) -> list[float]:
    """The fraction of a completion's characters that are the letters a, e, i, o or u (dense: even random
    text scores some, so a tiny random model has a signal to climb)."""
    return [sum(c in "aeiou" for c in text) / len(text) if text else 0.0 for text in completions]
