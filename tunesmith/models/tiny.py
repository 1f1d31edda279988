"""A tiny random-initialised Llama and a real byte-level BPE tokenizer, for tests and examples.

The tokenizer is trained in-process on a fixed corpus, so it needs no download and is identical on
every machine; its special tokens and ChatML template mirror SmolLM2's, so code written against the
tiny model behaves the same on the default model.
"""
from __future__ import annotations

import copy
import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

TINY_VOCAB_SIZE = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2

# SmolLM2's template without its default system prompt: one `<|im_start|>{role}\n{content}<|im_end|>\n`
# per message, and `<|im_start|>assistant\n` as the generation prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_PARAGRAPHS = """\
The quick brown fox jumps over the lazy dog. A small model can learn a simple task when the examples
are clear and the answers are short. Training changes the weights a little at every step, and the loss
tells us how surprised the model was by the next token.
You are a helpful assistant. Answer the question in one sentence. What is the capital of France? The
capital of France is Paris. Please write the date in ISO format. Extract the name, age and city from
the sentence and return them as JSON. Add the two numbers and give only the result.
Once upon a time there was a little girl who lived in a village near the forest. Every morning she
walked to the river, listened to the birds and counted the stones on the path. She liked numbers,
stories and long summer evenings with her family and friends.
Good data matters more than a large model. Check every example, keep a held-out set, and measure what
the model gained and what it forgot. If the answer is wrong, look at the prompt, the template and the
labels before you change the learning rate.
The user asked: "Can you help me?" The assistant replied: "Yes, of course. Tell me what you need."
Here is a list: apples, bananas, oranges, bread, milk, cheese, water, coffee and tea.
Thank you! Sorry, I do not know. Maybe. Yes. No. Hello, world. Goodbye.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday are the days of the week. Spring,
summer, autumn and winter are the seasons. The meeting starts at 09:30 and ends at 11:45 on Friday.
Python is a programming language. def add(a, b): return a + b. print("result:", add(2, 3)) # prints 5
The weather today is sunny with a light wind from the west; tomorrow it will rain in the north.
Scientists study the world by asking questions, making observations and testing their ideas with
experiments. Doctors help people who are sick, teachers help students learn to read and write, and
engineers build bridges, roads, computers and machines.
Write a short summary of the following text. Translate the sentence into French. Classify the review
as positive or negative. This product is great and I would buy it again! The service was slow and the
food was cold, so I will not come back. Explain why the sky is blue in simple words for a child.
Step 1: read the question carefully. Step 2: think about what it asks. Step 3: write the answer.
The train leaves the station at half past seven, and the journey takes about three hours. Her phone
number is +1 555 0100, her email is alice@example.com and her website is https://example.org/about.
"""

_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
_NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Maria", "Omar", "Yuki", "Zoe"]
_CITIES = ["Paris", "London", "Berlin", "Madrid", "Rome", "Tokyo", "Lisbon", "Vienna", "Oslo", "Cairo"]


def _structured_lines() -> list[str]:
    """Dates, sums and JSON-like records written out deterministically (no RNG), so task data tokenises well."""
    lines = []
    for i in range(48):
        year, month, day = 1990 + (i * 7) % 40, 1 + i % 12, 1 + (i * 5) % 28
        name, city, age = _NAMES[i % len(_NAMES)], _CITIES[i % len(_CITIES)], 18 + (i * 3) % 60
        lines += [
            f"{year}-{month:02d}-{day:02d}",
            f"{_MONTHS[month - 1]} {day}, {year}",
            f"{day} {_MONTHS[month - 1][:3]} {year}",
            f"{day:02d}/{month:02d}/{year} and {month}/{day}/{year}",
            f'{{"name": "{name}", "age": {age}, "city": "{city}"}}',
            f"{name} is {age} years old and lives in {city}.",
            f"What is {i * 13 % 900 + 100} + {i * 29 % 900 + 100}? {i * 13 % 900 + i * 29 % 900 + 200}",
        ]
    lines.append("0 1 2 3 4 5 6 7 8 9 10 100 1000 ( ) [ ] { } < > : ; , . ! ? ' \" - _ + = * / \\ | @ # $ % & ~")
    return lines


def tiny_corpus() -> list[str]:
    """The fixed training text of the tiny tokenizer."""
    return _PARAGRAPHS.splitlines() + _structured_lines()


def train_tiny_tokenizer() -> "PreTrainedTokenizerFast":
    """Train the byte-level BPE tokenizer from scratch (deterministic; ~0.1 s). Prefer `tiny_tokenizer()`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Individual digits as in SmolLM2, so arithmetic and dates do not depend on which numbers were merged.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        padding_side="right",
        model_max_length=2048,
    )


@functools.lru_cache(maxsize=1)
def _cached_tokenizer() -> "PreTrainedTokenizerFast":
    return train_tiny_tokenizer()


def tiny_tokenizer() -> "PreTrainedTokenizerFast":
    """The tiny tokenizer: ~1k byte-level BPE vocabulary, ChatML template, eos = pad = `<|im_end|>`.

    Returns a fresh copy each call (callers may change padding_side), trained only once per process.
    """
    return copy.deepcopy(_cached_tokenizer())


def tiny_model(tokenizer: "PreTrainedTokenizerFast", seed: int = 0) -> "LlamaForCausalLM":
    """A random-initialised 2-layer Llama (hidden 64, ~200k parameters) sized to `tokenizer`.

    The seed is recorded in the config (`tunesmith_tiny_seed`) so an adapter trained on this base can be
    reloaded on a bit-identical rebuild of it.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.tunesmith_tiny_seed = seed
    # fork_rng: the same seed gives the same weights without disturbing the caller's RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()
