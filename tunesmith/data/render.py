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
    from jinja2 import TemplateSyntaxError

    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    except TemplateSyntaxError as err:
        raise TunesmithError(f"data.chat_template: {path}:{err.lineno}: not a valid Jinja template: "
                             f"{err.message}") from None


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
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):  # one error for the model, not one per row
        raise TunesmithError("the model's tokenizer has no chat template, so chats have no prompt format: give "
                             "one with --chat-template chatml or a Jinja file (training: data.chat_template)")
    try:
        return tokenizer.apply_chat_template(as_chat(messages), tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except TemplateError as err:  # the template's own check (`raise_exception`): roles that must alternate, ...
        raise ValueError(f"the chat template refused this conversation: {err}") from None


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
    if messages and messages[0].trained:
        raise ValueError("the first message is a trained assistant turn, with no prompt before it; give it "
                         "weight 0 to keep it as context, or start with a user turn")
    text = _template_text(tokenizer, messages, generation_prompt=False)
    turns = []  # (the text before the turn's content, the text through its end) of every trained turn
    for i, msg in enumerate(messages):
        if msg.trained:
            prompt = _template_text(tokenizer, messages[:i], generation_prompt=True)
            upto = _template_text(tokenizer, messages[: i + 1], generation_prompt=False)
            if not (upto.startswith(prompt) and text.startswith(upto)):
                raise ValueError("the chat template does not render this conversation as a prefix of itself, so "
                                 "training and inference prompts would differ; use data.chat_template=chatml")
            turns.append((len(prompt), len(upto)))
    full, spans = _token_spans(tokenizer, text, turns)
    labels = [IGNORE] * len(full)
    eot = set(end_of_turn_ids(tokenizer))
    for start, end in spans:
        ends = [j for j in range(start, end) if full[j] in eot]
        if not ends:
            raise ValueError("the chat template ends an assistant turn without an end-of-turn token; "
                             "the model could never learn to stop")
        labels[start:ends[-1] + 1] = full[start:ends[-1] + 1]
    return full, labels


def _token_spans(tokenizer: Any, text: str, turns: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
    """(the conversation's ids, each trained turn's (first, end) id index) from its text and the turns'
    character offsets. The ids before a trained turn are those its prompt tokenises to alone, the ids
    inference feeds (`render_prompt`), but for the case below."""
    full = _ids(tokenizer, text)
    spans = []
    for a, b in turns:
        prompt, upto = _ids(tokenizer, text[:a]), _ids(tokenizer, text[:b])
        if full[:len(prompt)] != prompt or full[:len(upto)] != upto:
            break
        spans.append((len(prompt), len(upto)))
    else:
        return full, spans
    # A turn's first characters merged into one token with its prompt's last ones (an answer that starts with
    # whitespace, after the header's newline, in a byte-level BPE). Inference feeds the prompt's own ids and
    # the model goes on from there, so the text is tokenised in pieces cut at every turn's edges: the first
    # trained turn's prompt is exactly its ids alone, and an earlier answer stays in the ids it was trained as
    # inside a later turn's prompt (where re-tokenising the history as text would merge it again).
    full, at = _ids_in_pieces(tokenizer, text, sorted({c for turn in turns for c in turn}))
    return full, [(at[a], at[b]) for a, b in turns]


def _ids_in_pieces(tokenizer: Any, text: str, cuts: list[int]) -> tuple[list[int], dict[int, int]]:
    """(ids of `text` tokenised piece by piece between the character offsets `cuts`, the id index each cut
    falls at). Refused where the pieces' ids do not spell the text again."""
    ids, at = [], {}
    for a, b in zip([0, *cuts], [*cuts, len(text)]):
        at[a] = len(ids)
        ids += _ids(tokenizer, text[a:b])
    at[len(text)] = len(ids)
    if tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) != text:
        raise ValueError("a trained turn's first token merges with its prompt's last one, and this tokenizer "
                         "does not spell the text back when the two are tokenised apart, so no cut gives "
                         "training the prompt inference feeds")
    return ids, at
