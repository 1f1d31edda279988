"""The one normalised example type every reader produces and every renderer consumes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One chat turn. `weight` 1 trains an assistant turn, 0 keeps it as context only."""

    role: str
    content: str
    weight: int | None = None

    @property
    def trained(self) -> bool:
        return self.role == "assistant" and self.weight != 0


@dataclass(frozen=True)
class Source:
    """Where an example came from, for error messages."""

    file: str
    line: int


@dataclass(frozen=True)
class Conversation:
    """A chat to train on (`messages`), or raw text for continued pretraining (`text`)."""

    messages: tuple[Message, ...] = ()
    text: str | None = None
    source: Source = field(default_factory=lambda: Source("<memory>", 0))

    @property
    def is_text(self) -> bool:
        return self.text is not None


def as_chat(messages: Sequence[Message | dict]) -> list[dict]:
    """Messages as the plain `{"role", "content"}` dicts chat templates, files and user functions take."""
    return [{"role": m.role, "content": m.content} if isinstance(m, Message) else
            {"role": m["role"], "content": m["content"]} for m in messages]
