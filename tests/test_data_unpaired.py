"""Unpaired (KTO) data: labelled answers, paired rows unpaired, mismatched partners; bad rows named by field."""
import dataclasses

import pytest
import torch

from conftest import write_jsonl
from tunesmith._core.errors import DataError
from tunesmith.config import PreferenceDataConfig
from tunesmith.data.conversation import Message
from tunesmith.data.render import IGNORE, render_prompt
from tunesmith.data.unpaired import (collate_unpaired, load_unpaired_data, read_labelled,
                                     tokenize_unpaired)

ASSISTANT = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
USER = lambda text: {"role": "user", "content": text}  # noqa: E731


def labelled_of(tmp_path, rows, name="p.jsonl"):
    issues = []
    items = read_labelled([str(write_jsonl(tmp_path / name, rows))], issues)
    return items, issues


def items_of(tmp_path, rows):
    items, issues = labelled_of(tmp_path, rows)
    assert not issues
    return items


def trained_positions(example):
    return [t for t, y in enumerate(example.targets) if y != IGNORE]


# ---- reading --------------------------------------------------------------------------------------------

def test_unpaired_rows_keep_label_group_and_source(tmp_path):
    rows = [
        {"prompt": "2+2?", "completion": "4", "label": True},
        {"prompt": [{"role": "system", "content": "terse"}, USER("hi")], "completion": ASSISTANT("go away"),
         "label": False},
        {"prompt": "capital of France?", "completion": "Paris", "label": True},
    ]
    items, issues = labelled_of(tmp_path, rows)
    assert not issues
    assert [(it.answer.role, it.answer.content, it.desirable) for it in items] == [
        ("assistant", "4", True), ("assistant", "go away", False), ("assistant", "Paris", True)]
    assert [it.group for it in items] == [0, 1, 2]
    assert [(it.source.file, it.source.line) for it in items] == [(str(tmp_path / "p.jsonl"), n) for n in (1, 2, 3)]
    assert items[0].prompt == (Message("user", "2+2?"),)
    assert [m.role for m in items[1].prompt] == ["system", "user"]
    assert items[1].prompt[0].content == "terse"


def test_paired_rows_become_one_desirable_and_one_undesirable_answer_per_prompt(tmp_path):
    rows = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"input": {"messages": [USER("capital of France?")]},
         "preferred_output": ASSISTANT("Paris"), "non_preferred_output": ASSISTANT("Lyon")},
        {"prompt": "q", "completion": "solo", "label": False},
    ]
    items = items_of(tmp_path, rows)
    assert [(it.answer.content, it.desirable, it.group, it.source.line) for it in items] == [
        ("4", True, 0, 1), ("5", False, 0, 1), ("Paris", True, 1, 2), ("Lyon", False, 1, 2), ("solo", False, 2, 3)]
    assert items[0].prompt == items[1].prompt == (Message("user", "2+2?"),)
    assert items[2].prompt == items[3].prompt == (Message("user", "capital of France?"),)


def test_ranking_keeps_best_and_worst_and_drops_the_middle(tmp_path):
    items = items_of(tmp_path, [{"prompt": "q", "responses": ["a", "b", "c", "d"], "ranks": [1, 1, 2, 3]}])
    assert sorted((it.answer.content, it.desirable) for it in items) == [("a", True), ("b", True), ("d", False)]
    assert {it.group for it in items} == {0} and {it.source.line for it in items} == {1}
    # unordered ranks: the best is whichever has rank 1, ties at the bottom are all undesirable
    items = items_of(tmp_path, [{"prompt": "q", "responses": ["x", "y", "z"], "ranks": [2, 1, 3]},
                                {"prompt": "r", "responses": ["u", "v", "w"], "ranks": [1, 2, 2]}])
    assert sorted((it.answer.content, it.desirable, it.group) for it in items) == [
        ("u", True, 1), ("v", False, 1), ("w", False, 1), ("y", True, 0), ("z", False, 0)]
    # a strict ranking of two: plain pair
    items = items_of(tmp_path, [{"prompt": "q", "responses": ["first", "second"]}])
    assert [(it.answer.content, it.desirable) for it in items] == [("first", True), ("second", False)]


# ---- bad rows -------------------------------------------------------------------------------------------

BAD_ROWS = [
    ({"prompt": "q", "completion": "a"}, "label", "is missing"),
    ({"prompt": "q", "completion": "a", "label": "yes"}, "label", "true or false"),
    ({"prompt": "q", "completion": "a", "label": 1}, "label", "true or false"),
    ({"prompt": "q", "completion": "a", "label": None}, "label", "true or false"),
    ({"prompt": "q", "label": True}, "completion", "is missing"),
    ({"prompt": "q", "completion": None, "label": True}, "completion", "is missing"),
    ({"prompt": "q", "completion": "", "label": True}, "completion", "is empty"),
    ({"prompt": "q", "completion": "   ", "label": False}, "completion", "is empty"),
    ({"prompt": "q", "completion": [USER("a")], "label": True}, "completion", "one assistant message"),
    ({"completion": "a", "label": True}, "prompt", "is missing"),
    ({"prompt": "", "completion": "a", "label": True}, "prompt", "is empty"),
    ({"prompt": [USER("q"), {"role": "assistant", "content": "a"}], "completion": "b", "label": True},
     "prompt", "must end with a user"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen", "identical"),
    ({"input": {"messages": [USER("q")]}, "preferred_output": ASSISTANT("same"),
      "non_preferred_output": ASSISTANT("same")}, "preferred_output", "identical"),
    ({"prompt": "q", "responses": ["a", "a"]}, "responses", "identical"),
    ({"prompt": "q", "chosen": "a"}, "rejected", "is missing"),
]


@pytest.mark.parametrize("row, field, message", BAD_ROWS)
def test_bad_rows_name_file_line_and_field(tmp_path, row, field, message):
    good = {"prompt": "ok", "completion": "fine", "label": True}
    items, issues = labelled_of(tmp_path, [good, good, row])
    assert [it.source.line for it in items] == [1, 2]
    assert len(issues) == 1
    issue = issues[0]
    assert (issue.file, issue.line, issue.field) == (str(tmp_path / "p.jsonl"), 3, field)
    assert message in issue.message
    assert str(issue).startswith(f"{tmp_path / 'p.jsonl'}:3: field '{field}'")


@pytest.mark.parametrize("row, field, message", BAD_ROWS)
def test_load_raises_data_error_naming_file_line_and_field(tokenizer, tmp_path, row, field, message):
    good = {"prompt": "ok", "completion": "fine", "label": True}
    path = write_jsonl(tmp_path / "p.jsonl", [good, good, row])
    with pytest.raises(DataError) as err:
        load_unpaired_data(PreferenceDataConfig(train=str(path), validation_split=0), tokenizer, seed=0)
    assert err.value.total == 1
    assert f"p.jsonl:3: field '{field}'" in str(err.value) and message in str(err.value)


def test_every_bad_row_is_reported_once_and_good_rows_still_read(tmp_path):
    rows = [{"prompt": "q", "completion": "a", "label": "yes"},
            {"prompt": "q", "completion": "b", "label": False},
            {"prompt": "q", "completion": "c"},
            "not json {"]
    items, issues = labelled_of(tmp_path, rows)
    assert [(it.answer.content, it.group) for it in items] == [("b", 0)]
    assert [(i.line, i.field) for i in issues] == [(1, "label"), (3, "label"), (4, None)]


def test_a_file_without_rows_is_reported(tokenizer, tmp_path):
    items, issues = labelled_of(tmp_path, ["", "  "], name="blank.jsonl")  # only blank lines
    assert items == [] and len(issues) == 1
    assert (issues[0].file, issues[0].line, issues[0].message) == (str(tmp_path / "blank.jsonl"), None, "has no rows")
    with pytest.raises(DataError, match="blank.jsonl: has no rows"):
        load_unpaired_data(PreferenceDataConfig(train=str(tmp_path / "blank.jsonl")), tokenizer, seed=0)
    # a zero-byte file is caught earlier, by the reader
    items, issues = labelled_of(tmp_path, [], name="empty.jsonl")
    assert items == [] and [i.message for i in issues] == ["file is empty"]


# ---- tokenising -----------------------------------------------------------------------------------------

ANSWERS = ["Paris", "Yes, of course.", "The train leaves at seven", "apples and bananas", "No.", "Hello, world"]


def many(tmp_path, n=len(ANSWERS)):
    rows = [{"prompt": f"question {i}?", "completion": ANSWERS[i], "label": i % 2 == 0} for i in range(n)]
    return items_of(tmp_path, rows)


def test_example_trains_only_its_answer_and_end_of_turn(tokenizer, tmp_path):
    items = many(tmp_path, 3)
    stats = {}
    out = tokenize_unpaired(tokenizer, items, max_seq_len=256, seed=0, stats=stats)
    assert len(out) == 3 and stats.get("dropped_too_long", 0) == 0
    for item, ex in zip(items, out):
        prompt = render_prompt(tokenizer, item.prompt)
        ids = list(ex.example.input_ids)
        assert ids[: len(prompt)] == prompt
        trained = trained_positions(ex.example)
        # the position before the answer predicts its first token; the last predicts <|im_end|>
        assert trained == list(range(len(prompt) - 1, trained[-1] + 1))
        assert [ex.example.targets[t] for t in trained] == ids[len(prompt): len(prompt) + len(trained)]
        assert tokenizer.decode([ex.example.targets[t] for t in trained]) == item.answer.content + "<|im_end|>"
        assert ids[len(prompt) + len(trained) - 1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert tokenizer.decode(ids[len(prompt) + len(trained):]) == "\n"  # the template's newline: untrained
        assert (ex.desirable, ex.group, ex.ref) == (item.desirable, item.group, None)


def partner_map(tokenizer, items, seed):
    """Which example's answer each mismatched partner carries, read back from the token ids."""
    out = tokenize_unpaired(tokenizer, items, max_seq_len=None, seed=seed, stats={})
    prompts = [render_prompt(tokenizer, it.prompt) for it in items]
    answers = [list(ex.example.input_ids[len(p):]) for ex, p in zip(out, prompts)]
    assert len({tuple(a) for a in answers}) == len(items)  # distinct, so the partner is identifiable
    mapping = []
    for ex, p in zip(out, prompts):
        kl = list(ex.mismatched.input_ids)
        assert kl[: len(p)] == p  # its own prompt
        mapping.append(answers.index(kl[len(p):]))  # ... then another example's whole answer
    return out, prompts, mapping


def test_mismatched_partner_is_own_prompt_with_another_examples_answer(tokenizer, tmp_path):
    items = many(tmp_path)
    out, prompts, mapping = partner_map(tokenizer, items, seed=0)
    n = len(items)
    assert all(mapping[i] != i for i in range(n))  # never its own answer
    assert sorted(mapping) == list(range(n))  # every answer is used once: a permutation
    seen, i = [], 0  # one cycle through every example
    for _ in range(n):
        seen.append(i)
        i = mapping[i]
    assert i == 0 and sorted(seen) == list(range(n))
    for i, ex in enumerate(out):
        j, p = mapping[i], prompts[i]
        # only the borrowed answer and its end-of-turn are scored, with the partner's own targets
        other_trained = trained_positions(out[j].example)
        shift = len(p) - len(prompts[j])
        assert trained_positions(ex.mismatched) == [t + shift for t in other_trained]
        assert tokenizer.decode([ex.mismatched.targets[t] for t in trained_positions(ex.mismatched)]) == \
            items[j].answer.content + "<|im_end|>"
        assert len(ex.mismatched) == len(p) + len(out[j].example) - len(prompts[j])


def test_partner_pairing_is_fixed_by_the_seed(tokenizer, tmp_path):
    items = many(tmp_path)
    _, _, first = partner_map(tokenizer, items, seed=0)
    _, _, again = partner_map(tokenizer, items, seed=0)
    assert first == again
    others = [partner_map(tokenizer, items, seed=s)[2] for s in (1, 2, 3)]
    assert any(m != first for m in others)
    for m in others:
        assert sorted(m) == list(range(len(items))) and all(m[i] != i for i in range(len(items)))
    # two examples: each takes the other's answer, whatever the seed
    _, _, two = partner_map(tokenizer, items[:2], seed=5)
    assert two == [1, 0]


def test_too_long_example_is_dropped_and_counted(tokenizer, tmp_path):
    long_answer = "The quick brown fox jumps over the lazy dog. " * 6
    items = items_of(tmp_path, [{"prompt": "a?", "completion": "Yes.", "label": True},
                                {"prompt": "b?", "completion": long_answer, "label": True},
                                {"prompt": "c?", "completion": "No.", "label": False}])
    full = tokenize_unpaired(tokenizer, items, max_seq_len=None, seed=0, stats={})
    lens = [len(ex.example) for ex in full]
    assert lens[1] > max(lens[0], lens[2])
    stats = {}
    kept = tokenize_unpaired(tokenizer, items, max_seq_len=lens[1] - 1, seed=0, stats=stats)
    assert stats["dropped_too_long"] == 1
    assert [ex.example for ex in kept] == [full[0].example, full[2].example]
    # the two survivors partner each other; the dropped answer is never borrowed
    n_prompt = [len(render_prompt(tokenizer, it.prompt)) for it in items]
    answer = lambda k: full[k].example.input_ids[n_prompt[k]:]  # noqa: E731
    assert kept[0].mismatched.input_ids[n_prompt[0]:] == answer(2)
    assert kept[1].mismatched.input_ids[n_prompt[2]:] == answer(0)
    stats = {}
    at_limit = tokenize_unpaired(tokenizer, items, max_seq_len=lens[1], seed=0, stats=stats)
    assert len(at_limit) == 3 and stats.get("dropped_too_long", 0) == 0  # exactly at the limit is kept


def test_too_long_partner_is_cut_to_the_limit(tokenizer, tmp_path):
    # long prompt + short answer, short prompt + long answer: each fits, but the long prompt with the
    # long answer (A's partner, as two examples always swap answers) does not
    items = items_of(tmp_path, [
        {"prompt": "Please write the date in ISO format, then explain why the sky is blue in simple words.",
         "completion": "No.", "label": True},
        {"prompt": "b?", "completion": "The quick brown fox jumps over the lazy dog. " * 4, "label": False}])
    uncut = tokenize_unpaired(tokenizer, items, max_seq_len=None, seed=0, stats={})
    limit = max(len(ex.example) for ex in uncut)
    assert len(uncut[0].mismatched) > limit >= len(uncut[1].mismatched)
    stats = {}
    out = tokenize_unpaired(tokenizer, items, max_seq_len=limit, seed=0, stats=stats)
    assert stats.get("dropped_too_long", 0) == 0 and [ex.example for ex in out] == [ex.example for ex in uncut]
    assert len(out[0].mismatched) == limit
    assert out[0].mismatched.input_ids == uncut[0].mismatched.input_ids[:limit]
    assert out[0].mismatched.targets[:-1] == uncut[0].mismatched.targets[:limit - 1]
    assert out[0].mismatched.targets[-1] == IGNORE  # the last kept position predicts nothing
    assert out[1].mismatched == uncut[1].mismatched  # within the limit: untouched


def test_multi_turn_prompt_does_not_train_earlier_assistant_turns(tokenizer, tmp_path):
    prompt = [USER("What is the capital of France?"), {"role": "assistant", "content": "Paris", "weight": 1},
              USER("And of Italy?")]
    items = items_of(tmp_path, [{"prompt": prompt, "completion": "Rome", "label": True},
                                {"prompt": "hello", "completion": "Goodbye.", "label": False}])
    out = tokenize_unpaired(tokenizer, items, max_seq_len=None, seed=0, stats={})
    ex = out[0]
    rendered = render_prompt(tokenizer, items[0].prompt)
    assert list(ex.example.input_ids[: len(rendered)]) == rendered
    trained = trained_positions(ex.example)
    assert trained[0] == len(rendered) - 1  # nothing in the prompt, the earlier "Paris" included
    assert tokenizer.decode([ex.example.targets[t] for t in trained]) == "Rome<|im_end|>"
    # the mismatched partner scores only the other answer
    kl_trained = trained_positions(ex.mismatched)
    assert kl_trained[0] == len(rendered) - 1
    assert tokenizer.decode([ex.mismatched.targets[t] for t in kl_trained]) == "Goodbye.<|im_end|>"


# ---- loading and batching -------------------------------------------------------------------------------

def test_load_splits_by_prompt_and_counts_labels(tokenizer, tmp_path):
    rows = [{"prompt": f"question {i}?", "chosen": f"good answer {i}", "rejected": f"bad {i}"} for i in range(6)] + \
           [{"prompt": "solo?", "completion": "Maybe.", "label": False},
            {"prompt": "solo again?", "completion": "Yes.", "label": True},
            {"prompt": "and again?", "completion": "Thank you!", "label": True}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = PreferenceDataConfig(train=str(path), validation_split=0.5, max_seq_len=256)
    data = load_unpaired_data(cfg, tokenizer, seed=0)
    assert all(len(row) == 1 for row in data.train + data.validation)
    train = [row[0] for row in data.train]
    val = [row[0] for row in data.validation]
    assert len(train) + len(val) == 6 * 2 + 3
    train_groups, val_groups = {e.group for e in train}, {e.group for e in val}
    assert not train_groups & val_groups
    assert (len(train_groups), len(val_groups)) == (5, 4)  # round(0.5 * 9) prompts held out
    for side in (train, val):  # a pair's two answers stay on one side
        for g in {e.group for e in side}:
            labels = sorted(e.desirable for e in side if e.group == g)
            assert labels == ([False, True] if g < 6 else [g != 6])
    n_good = sum(e.desirable for e in train)
    assert data.stats["train_examples"] == len(train)
    assert (data.stats["train_desirable"], data.stats["train_undesirable"]) == (n_good, len(train) - n_good)
    assert data.stats["validation_examples"] == len(val)
    assert data.stats["dropped_too_long"] == 0
    again = load_unpaired_data(cfg, tokenizer, seed=0)
    assert [r[0].group for r in again.validation] == [e.group for e in val]
    # no split: everything trains
    data = load_unpaired_data(PreferenceDataConfig(train=str(path), validation_split=0), tokenizer, seed=0)
    assert len(data.train) == 15 and data.validation == []
    assert (data.stats["train_desirable"], data.stats["train_undesirable"]) == (8, 7)


def test_load_fails_when_every_example_is_too_long(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is the capital of France?",
                                               "completion": "The capital of France is Paris.", "label": True}])
    with pytest.raises(DataError, match="dropped 1 over data.max_seq_len"):
        load_unpaired_data(PreferenceDataConfig(train=str(path), validation_split=0, max_seq_len=4), tokenizer, 0)


def test_collate_puts_answers_then_partners(tokenizer, tmp_path):
    items = many(tmp_path, 3)
    exs = tokenize_unpaired(tokenizer, items, max_seq_len=None, seed=0, stats={})
    rows = [[exs[0]], [exs[1], exs[2]]]
    batch = collate_unpaired(rows, pad_id=2)
    order = [exs[0], exs[1], exs[2]]
    assert batch["input_ids"].shape[0] == 6 and batch["example_ends"].shape == (6, 2)
    for b, seq in enumerate([e.example for e in order] + [e.mismatched for e in order]):
        assert batch["input_ids"][b, : len(seq)].tolist() == list(seq.input_ids)
        assert batch["targets"][b, : len(seq)].tolist() == list(seq.targets)
        assert (batch["targets"][b, len(seq):] == IGNORE).all()
        assert batch["example_ends"][b].tolist() == [b, len(seq) - 1]
    assert batch["desirable"].dtype == torch.bool
    assert batch["desirable"].tolist() == [True, False, True]
    assert batch["n_loss_tokens"] == 3
    assert "ref_logps" not in batch
    with_ref = [[dataclasses.replace(exs[0], ref=(-1.0, -2.0))],
                [dataclasses.replace(exs[1], ref=(-3.0, -4.0)), dataclasses.replace(exs[2], ref=(-5.0, -6.0))]]
    batch = collate_unpaired(with_ref, pad_id=2)
    assert batch["ref_logps"].tolist() == [-1.0, -3.0, -5.0, -2.0, -4.0, -6.0]
    assert str(batch["ref_logps"].dtype) == "torch.float32"
    partial = [with_ref[0], [exs[1], with_ref[1][1]]]  # one item without: no reference log-probs at all
    assert "ref_logps" not in collate_unpaired(partial, pad_id=2)
