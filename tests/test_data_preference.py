"""Preference data: pairs, OpenAI's DPO format and K-way rankings; every bad row named by file, line, field."""
import pytest

from conftest import write_jsonl
from tunesmith.data.preference import read_preferences, tokenize_pair
from tunesmith.data.render import IGNORE, render_prompt

ASSISTANT = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731


def pairs_of(tmp_path, rows):
    issues = []
    pairs = read_preferences([str(write_jsonl(tmp_path / "p.jsonl", rows))], issues)
    return pairs, issues


def test_pairwise_and_openai_formats(tmp_path):
    rows = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 2},
        {"prompt": [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"}],
         "chosen": ASSISTANT("hello"), "rejected": ASSISTANT("go away")},
        {"input": {"messages": [{"role": "user", "content": "capital of France?"}]},
         "preferred_output": ASSISTANT("Paris"), "non_preferred_output": ASSISTANT("Lyon")},
    ]
    pairs, issues = pairs_of(tmp_path, rows)
    assert not issues
    assert [(p.chosen.content, p.rejected.content, p.margin) for p in pairs] == [
        ("4", "5", 2.0), ("hello", "go away", None), ("Paris", "Lyon", None)]
    assert [m.role for m in pairs[1].prompt] == ["system", "user"]
    assert [p.group for p in pairs] == [0, 1, 2] and pairs[2].source.line == 3


def test_ranking_expands_to_every_ordered_pair_with_ties(tmp_path):
    pairs, issues = pairs_of(tmp_path, [{"prompt": "q", "responses": ["a", "b", "c", "d"], "ranks": [1, 2, 2, 3]}])
    assert not issues
    assert sorted((p.chosen.content, p.rejected.content) for p in pairs) == [
        ("a", "b"), ("a", "c"), ("a", "d"), ("b", "d"), ("c", "d")]  # b and c are tied: no pair
    assert {p.group for p in pairs} == {0}
    strict, _ = pairs_of(tmp_path, [{"prompt": "q", "responses": ["best", "mid", "worst"]}])
    assert len(strict) == 3 and ("best", "worst") in [(p.chosen.content, p.rejected.content) for p in strict]
    reordered, _ = pairs_of(tmp_path, [{"prompt": "q", "responses": ["x", "y"], "ranks": [2, 1]}])
    assert (reordered[0].chosen.content, reordered[0].rejected.content) == ("y", "x")


@pytest.mark.parametrize("row, field, message", [
    ({"prompt": "q", "chosen": "a"}, "rejected", "is missing"),
    ({"prompt": "q", "rejected": "a"}, "chosen", "is missing"),
    ({"chosen": "a", "rejected": "b"}, "prompt", "is missing"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen", "identical"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen", "is empty"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "margin", "finite number"),
    ({"prompt": "q", "responses": []}, "responses", "at least 2"),
    ({"prompt": "q", "responses": ["a"]}, "responses", "at least 2"),
    ({"prompt": "q", "responses": ["a", "b"], "ranks": [1, 1]}, "ranks", "same rank"),
    ({"prompt": "q", "responses": ["a", "b"], "ranks": [1]}, "ranks", "list of 2 integers"),
    ({"prompt": "q", "responses": ["a", "a"]}, "responses", "identical"),
    ({"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": ASSISTANT("a")},
     "non_preferred_output", "is missing"),
    ({"input": {}, "preferred_output": ASSISTANT("a"), "non_preferred_output": ASSISTANT("b")},
     "input.messages", "is missing"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "chosen",
     "one assistant message"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "x",
      "rejected": "y"}, "prompt", "must end with a user"),
    ({"question": "q"}, None, "cannot tell the format"),
])
def test_bad_preference_rows_name_file_line_and_field(tmp_path, row, field, message):
    pairs, issues = pairs_of(tmp_path, [{"prompt": "ok", "chosen": "a", "rejected": "b"}, row])
    assert len(pairs) == 1 and len(issues) == 1
    issue = issues[0]
    assert (issue.line, issue.field) == (2, field) and message in issue.message
    assert str(issue).startswith(str(tmp_path / "p.jsonl") + ":2:")


def test_tokenized_pair_trains_only_the_answer_and_shares_the_inference_prompt(tokenizer, tmp_path):
    pairs, _ = pairs_of(tmp_path, [{"prompt": "Which is bigger, 3 or 7?", "chosen": "7", "rejected": "3, surely"}])
    ex = tokenize_pair(tokenizer, pairs[0], max_seq_len=256)
    prompt = render_prompt(tokenizer, pairs[0].prompt)
    for side, text in ((ex.chosen, "7"), (ex.rejected, "3, surely")):
        assert list(side.input_ids[: len(prompt)]) == prompt
        trained = [t for t in side.targets if t != IGNORE]
        assert tokenizer.decode(trained) == text + "<|im_end|>"
    assert tokenize_pair(tokenizer, pairs[0], max_seq_len=len(prompt) + 1) is None


def test_load_groups_a_prompts_pairs_and_splits_by_prompt(tokenizer, tmp_path):
    from tunesmith.config import PreferenceDataConfig
    from tunesmith.data.preference import collate_pairs, load_preference_data

    rows = [{"prompt": f"q{i}", "responses": ["a", "b", "c"]} for i in range(9)] + \
           [{"prompt": "solo", "chosen": "x", "rejected": "y", "margin": 1.5}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    data = load_preference_data(PreferenceDataConfig(train=str(path), validation_split=0.2), tokenizer, seed=0)
    assert (data.stats["train_prompts"], data.stats["validation_prompts"]) == (8, 2)
    assert data.stats["train_pairs"] + data.stats["validation_pairs"] == 9 * 3 + 1
    assert all(len({p.group for p in g}) == 1 for g in data.train + data.validation)
    batch = collate_pairs(data.train[:2], pad_id=2)
    n = sum(len(g) for g in data.train[:2])
    # each prompt's 3 pairs have 3 distinct answers, one row each; every side maps to its answer's row
    assert batch["n_loss_tokens"] == n == 6 and batch["input_ids"].shape[0] == 2 * 3
    assert batch["example_ends"].shape == (6, 2) and batch["sides"].tolist() == [0, 0, 1, 3, 3, 4] + [1, 2, 2, 4, 5, 5]


def test_multi_turn_prompt_trains_only_the_compared_answer(tokenizer, tmp_path):
    prompt = [{"role": "user", "content": "What is the capital of France?"},
              {"role": "assistant", "content": "Paris", "weight": 1},
              {"role": "user", "content": "And of Italy?"}]
    pairs, issues = pairs_of(tmp_path, [{"prompt": prompt, "chosen": "Rome", "rejected": "Lyon, surely"}])
    assert not issues and [m.role for m in pairs[0].prompt] == ["user", "assistant", "user"]
    ex = tokenize_pair(tokenizer, pairs[0], max_seq_len=None)
    rendered = render_prompt(tokenizer, pairs[0].prompt)
    for side, text in ((ex.chosen, "Rome"), (ex.rejected, "Lyon, surely")):
        assert list(side.input_ids[: len(rendered)]) == rendered
        trained = [t for t, y in enumerate(side.targets) if y != IGNORE]
        assert trained[0] == len(rendered) - 1  # the earlier assistant turn "Paris" is context, not scored
        assert trained == list(range(trained[0], trained[-1] + 1))
        assert tokenizer.decode([side.targets[t] for t in trained]) == text + "<|im_end|>"


def test_a_compared_answer_marked_weight_0_is_still_scored(tokenizer, tmp_path):
    """An answer's `weight` means nothing in a comparison: weight 0 must not make a side's log-prob 0."""
    answer = lambda text: [{"role": "assistant", "content": text, "weight": 0}]  # noqa: E731
    pairs, issues = pairs_of(tmp_path, [{"prompt": "q", "chosen": answer("yes"), "rejected": answer("no")}])
    ex = tokenize_pair(tokenizer, pairs[0], max_seq_len=None)
    assert not issues and ex.chosen.n_loss_tokens > 0 and ex.rejected.n_loss_tokens > 0


def test_rows_the_chat_template_refuses_are_named_for_pairs_answers_and_prompts(tokenizer, tmp_path):
    """A template that refuses a conversation (here: any answer holding "!") is a listed bad row, with its
    file, line and side, for DPO pairs, KTO answers and RL prompts alike; never a traceback."""
    import copy

    from tunesmith._core.errors import DataError
    from tunesmith.config import PreferenceDataConfig, PromptDataConfig
    from tunesmith.data.preference import load_preference_data
    from tunesmith.data.prompts import load_prompts
    from tunesmith.data.unpaired import load_unpaired_data

    template = tokenizer.chat_template
    tokenizer = copy.deepcopy(tokenizer)  # the fixture is shared
    tokenizer.chat_template = ("{% for m in messages %}{% if '!' in m['content'] %}{{ raise_exception('no shouting') }}"
                               "{% endif %}{% endfor %}" + template)
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                             {"prompt": "d", "chosen": "e", "rejected": "f!"},
                                             {"prompt": "g!", "completion": "h", "label": True}])
    path.with_name("pairs.jsonl").write_text("".join(path.read_text().splitlines(True)[:2]))
    with pytest.raises(DataError) as err:
        load_preference_data(PreferenceDataConfig(train=str(path.with_name("pairs.jsonl"))), tokenizer, seed=0)
    [issue] = err.value.issues
    assert (issue.line, issue.field) == (2, "rejected") and "no shouting" in issue.message
    with pytest.raises(DataError) as err:
        load_unpaired_data(PreferenceDataConfig(train=str(path), validation_split=0), tokenizer, seed=0)
    assert [(i.line, i.field) for i in err.value.issues] == [(2, "rejected"), (3, "completion")]
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "fine", "completion": "x"},
                                                 {"prompt": "loud!", "completion": "y"}])
    with pytest.raises(DataError) as err:
        load_prompts(PromptDataConfig(train=str(prompts)), tokenizer)
    assert [(i.line, i.field) for i in err.value.issues] == [(2, "prompt")]


def test_a_table_mixing_preference_formats_reads_each_row_by_its_own_fields(tmp_path):
    import datasets

    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "responses": None, "ranks": None},
            {"prompt": "r", "chosen": None, "rejected": None, "responses": ["x", "y"], "ranks": [2, 1]}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "mixed.parquet"))
    issues = []
    pairs = read_preferences([str(tmp_path / "mixed.parquet")], issues)
    assert not issues, issues
    assert [(p.chosen.content, p.rejected.content) for p in pairs] == [("a", "b"), ("y", "x")]
