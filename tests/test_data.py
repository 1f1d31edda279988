"""Readers, formats and bad-input reporting: every bad row is named by file, line and field."""

import pytest

from conftest import chat, write_jsonl
from tunesmith._core.errors import DataError, DataIssue
from tunesmith.config import DataConfig
from tunesmith.data import load_sft_data, read_conversations


def convs(path, fmt="auto"):
    issues = []
    out = read_conversations([str(path)], fmt, issues)
    return out, issues


@pytest.mark.parametrize("row, roles", [
    (chat("hi", "hello"), ["user", "assistant"]),
    ({"instruction": "Add", "input": "2+2", "output": "4"}, ["user", "assistant"]),
    ({"instruction": "Add", "output": "4", "system": "be terse"}, ["system", "user", "assistant"]),
    ({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                        {"from": "gpt", "value": "a"}]}, ["system", "user", "assistant"]),
    ({"prompt": "q", "completion": "a"}, ["user", "assistant"]),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]},
     ["user", "assistant"]),
])
def test_formats_are_detected_and_normalised(tmp_path, row, roles):
    (conv,), issues = convs(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert not issues
    assert [m.role for m in conv.messages] == roles
    assert conv.source.line == 1


def test_alpaca_joins_instruction_and_input(tmp_path):
    (conv,), _ = convs(write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Add", "input": "2+2", "output": "4"}]))
    assert conv.messages[0].content == "Add\n\n2+2" and conv.messages[1].content == "4"


def test_raw_text_and_weights(tmp_path):
    rows = [{"text": "plain words"},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d", "weight": 1}]}]
    (text, multi), issues = convs(write_jsonl(tmp_path / "d.jsonl", rows))
    assert not issues and text.is_text and text.text == "plain words"
    assert [m.trained for m in multi.messages] == [False, False, False, True]


def test_parquet_csv_and_dataset_folder(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "q1", "completion": "a1"}, {"prompt": "q2", "completion": "a2"}])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "folder"))
    for path in ("d.parquet", "d.csv", "folder"):
        out, issues = convs(tmp_path / path)
        assert not issues, issues
        assert [c.messages[1].content for c in out] == ["a1", "a2"]
    mixed = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "q"},
                                                   {"role": "assistant", "content": "a"}], "text": None},
                                       {"messages": None, "text": "plain words"}])
    mixed.to_parquet(str(tmp_path / "mixed.parquet"))  # each row holds both columns, one of them null
    (chat_row, text_row), issues = convs(tmp_path / "mixed.parquet")
    assert not issues and chat_row.messages[1].content == "a" and text_row.text == "plain words"
    (tmp_path / "bad.csv").write_text("prompt,completion\nq1,a1\nq2\n")
    out, issues = convs(tmp_path / "bad.csv")
    assert issues and issues[0].line == 3 and issues[0].field == "completion"  # file line 3 (after header)


BAD_ROWS = [
    ('{"messages": [{"role": "user", "content": "hi"}', None, "malformed JSON"),
    (chat("hi", "x") | {"messages": [{"role": "user", "content": "hi"}]}, "messages", "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "unknown role 'robot'"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "messages[0].content", "is missing"),
    ({"instruction": "do it"}, None, "cannot tell the format"),
    ({"instruction": "do it", "output": None}, "output", "is missing"),
    ({"conversations": [{"from": ["human"], "value": "q"}, {"from": "gpt", "value": "a"}]},
     "conversations[0].from", "unknown role ['human']"),
    ({"prompt": "q", "completion": 3}, "completion", "must be a string"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]},
     "messages[1].weight", "must be 0 or 1"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]},
     "messages", "nothing would be trained"),
    ("[1, 2]", None, "must be a JSON object"),
]


@pytest.mark.parametrize("row, field, message", BAD_ROWS)
def test_each_bad_row_names_file_line_and_field(tmp_path, row, field, message):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("ok", "fine"), row])
    _, issues = convs(path)
    assert len(issues) == 1
    issue = issues[0]
    assert (issue.file, issue.line, issue.field) == (str(path), 2, field)
    assert message in issue.message
    assert "d.jsonl:2:" in str(issue)


def test_missing_and_empty_files(tmp_path):
    _, issues = convs(tmp_path / "nope.jsonl")
    assert issues == [DataIssue(str(tmp_path / "nope.jsonl"), None, None, "file not found")]
    (tmp_path / "empty.jsonl").write_text("")
    _, issues = convs(tmp_path / "empty.jsonl")
    assert "empty" in issues[0].message
    (tmp_path / "blank.jsonl").write_text("\n\n")
    _, issues = convs(tmp_path / "blank.jsonl")
    assert "no rows" in issues[0].message
    (tmp_path / "x.txt").write_text("hi")
    _, issues = convs(tmp_path / "x.txt")
    assert "unsupported file type" in issues[0].message


def test_load_reports_all_bad_rows_at_once_and_caps_the_list(tokenizer, tmp_path):
    rows = [chat("ok", "fine")] + ['{"broken'] * 60 + [{"messages": [{"role": "user", "content": "q"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_sft_data(DataConfig(train=str(path)), tokenizer, seed=0)
    assert err.value.total == 61 and len(err.value.issues) == 50
    assert "61 data problems" in str(err.value) and "and 11 more" in str(err.value)


def test_validation_split_and_truncation(tokenizer, tmp_path):
    rows = [chat(f"question {i}", "answer " * (1 + i % 5)) for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = load_sft_data(DataConfig(train=str(path), validation_split=0.1), tokenizer, seed=0)
    assert (len(data.train), len(data.validation)) == (36, 4)
    again = load_sft_data(DataConfig(train=str(path), validation_split=0.1), tokenizer, seed=0)
    assert again.validation == data.validation  # the split is a function of the seed
    short = DataConfig(train=str(path), max_seq_len=20, validation_split=0)
    cut = load_sft_data(short, tokenizer, seed=0)
    assert max(len(r[0]) for r in cut.train) <= 20
    with pytest.raises(DataError, match="over data.max_seq_len=20"):
        load_sft_data(short.model_copy(update={"truncation": "error"}), tokenizer, seed=0)
    dropped = load_sft_data(DataConfig(train=str(path), max_seq_len=23, truncation="drop", validation_split=0),
                            tokenizer, seed=0)
    assert 0 < dropped.stats["dropped_too_long"] < 40


def test_read_prompts_for_generation(tmp_path):
    from tunesmith.data.dataset import read_prompts

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": [{"role": "user", "content": "b"}]},
                                              chat("c", "reference answer")])
    assert [[m.content for m in msgs] for _, msgs, _ in read_prompts(str(path))] == [["a"], ["b"], ["c"]]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"content": "x"}]}, {"q": 1},
                                               {"messages": [{"role": "assistant", "content": "only"}]},
                                               {"prompt": "2+2?", "completion": "4"}])  # would lose its "4"
    with pytest.raises(DataError) as err:
        read_prompts(str(bad))
    assert [(i.line, i.field) for i in err.value.issues] == [(1, "messages[0].role"), (2, "prompt"), (3, "messages"),
                                                            (4, "completion")]


def test_upper_case_extension_and_malformed_column(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "q", "completion": "a"}]).to_csv(str(tmp_path / "D.CSV"), index=False)
    out, issues = convs(tmp_path / "D.CSV")
    assert not issues and len(out) == 1
    (tmp_path / "m.jsonl").write_text('{"text": "abc"\n')
    _, issues = convs(tmp_path / "m.jsonl")
    assert "column 15" in issues[0].message
