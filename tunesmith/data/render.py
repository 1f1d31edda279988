"""Chat-template rendering: the single place where messages become token ids, for training and inference.

Training (`tokenize_conversation`) and inference (`render_prompt`) both call the tokenizer's template
through `_template_text`, and training checks that each assistant turn's prompt tokenises to exactly the
ids inference will feed, so the model is never trained on a prompt it will not see.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from tunesmith._core.errors import TunesmithError
from tunesmith.data.conversation import Conversation, Message, as_chat

IGNORE = -100

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Tokens that end an assistant turn in the common templates; only those in the vocabulary are used.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|eot|>", "<|end_of_turn|>")


def set_chat_template(tokenizer: Any, choice: str) -> None:
    """Apply the config's `data.chat_template` choice to the tokenizer (saved with the result)."""
    if choice == "tokenizer":
        if not tokenizer.chat_template:
            raise TunesmithError("the tokenizer has no chat template; set data.chat_template=chatml "
                                 "or a path to a Jinja template file (or use data.format=text)")
        return
    if choice == "chatml":
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
        if missing:
            raise TunesmithError(f"data.chat_template=chatml needs tokens {missing} in the vocabulary")
        tokenizer.chat_template = CHATML_TEMPLATE
        return
    path = Path(choice)
    if not path.is_file():
        raise TunesmithError(f"data.chat_template: '{choice}' is not 'tokenizer', 'chatml' or an existing file")
    tokenizer.chat_template = path.read_text()


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Ids that end an assistant turn: the eos plus any known end-of-turn token in the vocabulary.

    Training unmasks the turn's end token and generation stops on any of these, so both agree.
    """
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in _END_OF_TURN_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _template_text(tokenizer: Any, messages: Sequence[Message | dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(as_chat(messages), tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _ids(tokenizer: Any, text: str) -> list[int]:
    # The template already holds every special token it wants; adding them again would double the BOS.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_prompt(tokenizer: Any, messages: Sequence[Message | dict]) -> list[int]:
    """Token ids that ask the model for the next assistant turn. Used by chat, generate, eval and RL."""
    return _ids(tokenizer, _template_text(tokenizer, messages, generation_prompt=True))


def tokenize_conversation(tokenizer: Any, conv: Conversation) -> tuple[list[int], list[int]]:
    """Return (input_ids, labels) with IGNORE on every token that is not trained.

    Trained: each assistant turn with weight != 0, from its first content token through its end-of-turn
    token (so the model learns to stop), not the template's header or what follows the end token.
    Raw text trains every token and ends with the eos token.
    """
    if conv.is_text:
        ids = _ids(tokenizer, conv.text)
        if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
            ids = [tokenizer.bos_token_id] + ids
        ids = ids + [tokenizer.eos_token_id]
        return ids, list(ids)

    messages = conv.messages
    full = _ids(tokenizer, _template_text(tokenizer, messages, generation_prompt=False))
    labels = [IGNORE] * len(full)
    eot = set(end_of_turn_ids(tokenizer))
    for i, msg in enumerate(messages):
        if not msg.trained:
            continue
        prompt = render_prompt(tokenizer, messages[:i])
        upto = _ids(tokenizer, _template_text(tokenizer, messages[: i + 1], generation_prompt=False))
        if full[: len(prompt)] != prompt or full[: len(upto)] != upto:
            raise ValueError("the chat template does not render this conversation as a prefix of itself, so "
                             "training and inference prompts would differ; use data.chat_template=chatml")
        ends = [j for j in range(len(prompt), len(upto)) if full[j] in eot]
        if not ends:
            raise ValueError("the chat template ends an assistant turn without an end-of-turn token; "
                             "the model could never learn to stop")
        stop = ends[-1] + 1
        labels[len(prompt):stop] = full[len(prompt):stop]
    return full, labels
