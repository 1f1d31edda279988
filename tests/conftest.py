"""Shared fixtures: the tiny Llama and its real BPE tokenizer, and small data files."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tokenizer():
    from tunesmith.models.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture
def tiny(tokenizer):
    """A fresh tiny model (seed 0) per test."""
    from tunesmith.models.tiny import tiny_model

    return tiny_model(tokenizer, seed=0)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}
