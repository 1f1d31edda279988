"""Chat-template rendering: what is trained, and that training and inference see the same prompt."""
import pytest

from tunesmith.data.conversation import Conversation, Message
from tunesmith.data.render import IGNORE, end_of_turn_ids, render_prompt, set_chat_template, tokenize_conversation

CONV = Conversation(messages=(Message("system", "Be brief."), Message("user", "Hi there"),
                              Message("assistant", "Hello!"), Message("user", "And again?"),
                              Message("assistant", "Yes.")))


def trained_text(tok, ids, labels):
    spans, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == i
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


def test_only_assistant_content_and_end_of_turn_are_trained(tokenizer):
    ids, labels = tokenize_conversation(tokenizer, CONV)
    assert trained_text(tokenizer, ids, labels) == ["Hello!<|im_end|>", "Yes.<|im_end|>"]


def test_end_of_turn_token_is_in_the_loss(tokenizer):
    """The classic bug: leave <|im_end|> out of the loss and the model never learns to stop."""
    ids, labels = tokenize_conversation(tokenizer, CONV)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert eos in end_of_turn_ids(tokenizer)
    trained = [lab for lab in labels if lab != IGNORE]
    assert trained.count(eos) == 2 and trained[-1] == eos


def test_weight_zero_turns_are_context_only(tokenizer):
    msgs = list(CONV.messages)
    msgs[2] = Message("assistant", "Hello!", weight=0)
    ids, labels = tokenize_conversation(tokenizer, Conversation(messages=tuple(msgs)))
    assert trained_text(tokenizer, ids, labels) == ["Yes.<|im_end|>"]


def test_training_prompt_equals_inference_prompt(tokenizer):
    """Each trained turn is preceded by exactly the ids the generation engine will be given."""
    ids, labels = tokenize_conversation(tokenizer, CONV)
    starts = [i for i in range(len(labels)) if labels[i] != IGNORE and (i == 0 or labels[i - 1] == IGNORE)]
    assert ids[: starts[0]] == render_prompt(tokenizer, CONV.messages[:2])
    assert ids[: starts[1]] == render_prompt(tokenizer, CONV.messages[:4])


def test_template_with_default_system_prompt_stays_consistent(tokenizer):
    """SmolLM2's template injects a system prompt when none is given; train and inference must agree."""
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path) if tokenizer.name_or_path else None
    tok = tok or __import__("copy").deepcopy(tokenizer)
    tok.chat_template = (
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful bot.<|im_end|>\n' }}"
        "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    conv = Conversation(messages=(Message("user", "Hi"), Message("assistant", "Yo")))
    ids, labels = tokenize_conversation(tok, conv)
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    prompt = render_prompt(tok, conv.messages[:1])
    assert ids[:first] == prompt and "helpful bot" in tok.decode(prompt)


def test_template_without_end_token_is_refused(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '\n' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    with pytest.raises(ValueError, match="never learn to stop"):
        tokenize_conversation(tok, Conversation(messages=(Message("user", "a"), Message("assistant", "b"))))


def test_raw_text_trains_every_token_and_ends_with_eos(tokenizer):
    ids, labels = tokenize_conversation(tokenizer, Conversation(text="Some plain text."))
    assert labels == ids and ids[-1] == tokenizer.eos_token_id


def test_chat_template_choices(tokenizer, tmp_path):
    import copy

    from tunesmith._core.errors import TunesmithError

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(TunesmithError, match="no chat template"):
        set_chat_template(tok, "tokenizer")
    set_chat_template(tok, "chatml")
    assert render_prompt(tok, [{"role": "user", "content": "x"}]) == render_prompt(tokenizer, [{"role": "user", "content": "x"}])
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}")
    set_chat_template(tok, str(tmp_path / "t.jinja"))
    assert "<|im_end|>" in tok.chat_template
    with pytest.raises(TunesmithError, match="not 'tokenizer', 'chatml'"):
        set_chat_template(tok, "nonsense")
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}")
    with pytest.raises(TunesmithError, match=r"broken.jinja:2: not a valid Jinja template"):
        set_chat_template(tok, str(tmp_path / "broken.jinja"))


def _merging_tokenizer(tokenizer):
    """A byte-level BPE that merges newlines into one token, as real ones (SmolLM2's) do: an answer that
    starts with a newline would merge with the header's newline when the whole conversation is tokenised."""
    corpus = ["<|im_start|>assistant\n\n\nParis<|im_end|>\n", "x   Paris\n\n\n", "assistant\n  Paris"] * 50
    tok = tokenizer.train_new_from_iterator(corpus, vocab_size=300)
    tok.chat_template = tokenizer.chat_template
    assert tok.tokenize("assistant\n\n\nParis")[:2] != tok.tokenize("assistant\n")  # the merge happens
    return tok


@pytest.mark.parametrize("answer", ["\n\nParis", "  Paris"])
def test_an_answer_starting_with_whitespace_trains_after_the_exact_inference_prompt(tokenizer, answer):
    tok = _merging_tokenizer(tokenizer)
    conv = Conversation(messages=(Message("user", "q"), Message("assistant", answer), Message("user", "more"),
                                  Message("assistant", "\n ok")))
    ids, labels = tokenize_conversation(tok, conv)
    assert trained_text(tok, ids, labels) == [answer + "<|im_end|>", "\n ok<|im_end|>"]
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    assert ids[:first] == render_prompt(tok, conv.messages[:1])
    assert tok.decode(ids) == tok.apply_chat_template([{"role": m.role, "content": m.content} for m in conv.messages],
                                                      tokenize=False)


def test_a_template_that_refuses_a_conversation_is_a_value_error(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                         + tokenizer.chat_template)
    conv = Conversation(messages=(Message("system", "s"), Message("user", "a"), Message("assistant", "b")))
    with pytest.raises(ValueError, match="refused this conversation: no system role"):
        tokenize_conversation(tok, conv)


def test_a_conversation_opening_with_a_trained_assistant_turn_says_so(tokenizer):
    conv = Conversation(messages=(Message("assistant", "I start"), Message("user", "ok"), Message("assistant", "end")))
    with pytest.raises(ValueError, match="first message is a trained assistant turn"):
        tokenize_conversation(tokenizer, conv)
    ids, labels = tokenize_conversation(tokenizer, Conversation(messages=(Message("assistant", "I start", 0),)
                                                                + conv.messages[1:]))
    assert trained_text(tokenizer, ids, labels) == ["end<|im_end|>"]
