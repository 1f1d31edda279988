"""Weighted task mixtures: slot counts, seeded draws, templates, streaming, config errors and exact resume."""
import re
from collections import Counter

import pytest
import torch
from pydantic import ValidationError

from conftest import write_jsonl
from test_loop import Crash, lora_model, quiet
from tunesmith._core.errors import DataError, TunesmithError
from tunesmith._core.rundir import RunDir
from tunesmith.config import DataConfig
from tunesmith.data import Conversation, Message, load_sft_data, shift_labels, tokenize_conversation
from tunesmith.data import mixture
from tunesmith.data.mixture import MixtureRows, largest_remainder
from tunesmith.data.packing import Example
from tunesmith.training import fit

TEMPLATES = [{"user": "Q: {question}", "assistant": "{answer}"},
             {"system": "Be brief.", "user": "{question}?", "assistant": "A: {answer}"}]


def qa_file(path, n, prefix="q"):
    return str(write_jsonl(path, [{"question": f"{prefix} {i}", "answer": f"a{i}"} for i in range(n)]))


def two_tasks(tmp_path, **data):
    """A small templated task (weight 3) and a larger chat task (weight 1), as a DataConfig."""
    chats = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i}"}]}
             for i in range(12)]
    small = qa_file(tmp_path / "small.jsonl", 5)
    big = str(write_jsonl(tmp_path / "big.jsonl", chats))
    return DataConfig(mixture=[{"name": "small", "train": small, "weight": 3, "templates": TEMPLATES},
                               {"name": "big", "train": big}], **{"validation_split": 0, **data})


def fake_task(n, tag):
    return [Example((tag, i), (0, 0)) for i in range(n)]


@pytest.mark.parametrize("weights, total, slots", [
    ([2, 1, 1], 10, [5, 3, 2]),          # quotas 5, 2.5, 2.5: the tie goes to the earlier task
    ([0.5, 0.3, 0.2], 7, [4, 2, 1]),     # quotas 3.5, 2.1, 1.4: one slot left, to the largest remainder .5
    ([1, 1, 1], 100, [34, 33, 33]),
])
def test_slots_are_the_largest_remainder_split_of_the_weights(weights, total, slots):
    assert largest_remainder(weights, total) == slots
    rows = MixtureRows([(f"t{t}", w, fake_task(3, t)) for t, w in enumerate(weights)], total, seed=0)
    assert len(rows) == total
    assert Counter(rows.locate(i)[0] for i in range(total)) == dict(enumerate(slots))


def test_stats_report_each_task_and_a_starved_task_is_an_error(tokenizer, tmp_path):
    data = load_sft_data(two_tasks(tmp_path, examples_per_epoch=20), tokenizer, seed=0)
    assert data.stats["tasks"] == {"small": {"rows": 5, "weight": 3.0, "slots": 15, "passes": 3.0, "validation": 0},
                                   "big": {"rows": 12, "weight": 1.0, "slots": 5, "passes": 0.417, "validation": 0}}
    assert data.stats["train_examples"] == len(data.train) == 20
    assert data.stats["train_loss_tokens"] == sum(row[0].n_loss_tokens for row in data.train)
    default = load_sft_data(two_tasks(tmp_path), tokenizer, seed=0)
    assert len(default.train) == 5 + 12  # an epoch defaults to the tasks' rows summed
    with pytest.raises(TunesmithError, match=r"tasks \['big'\] get 0 of the 1 examples"):
        load_sft_data(two_tasks(tmp_path, examples_per_epoch=1), tokenizer, seed=0)


def test_draws_are_a_function_of_the_seed():
    tasks = [("a", 1.0, fake_task(7, 0)), ("b", 2.0, fake_task(50, 1))]
    one, again, other = (MixtureRows(tasks, 40, seed=s) for s in (0, 0, 1))
    assert [one[i] for i in range(40)] == [again[i] for i in range(40)]
    assert [one[i] for i in range(40)] != [other[i] for i in range(40)]
    assert one[-1] == one[39] and one[2:5] == [one[2], one[3], one[4]]
    with pytest.raises(IndexError):
        one[40]


def test_an_oversampled_task_shows_every_row_before_any_repeats():
    rows = MixtureRows([("small", 3.0, fake_task(4, 0)), ("big", 1.0, fake_task(100, 1))], 40, seed=0)
    drawn = [rows.locate(i)[1] for i in range(40) if rows.locate(i)[0] == 0]  # 30 slots: 7.5 passes over 4 rows
    assert len(drawn) == 30
    for p in range(7):
        assert sorted(drawn[4 * p:4 * p + 4]) == [0, 1, 2, 3], p
    assert len(set(drawn[28:])) == 2 and drawn[:4] != drawn[4:8]  # the last pass is partial; passes differ
    big = [rows.locate(i)[1] for i in range(40) if rows.locate(i)[0] == 1]
    assert len(set(big)) == 10  # an undersampled task draws distinct rows


def test_templates_render_the_rows_fields(tokenizer, tmp_path):
    data = load_sft_data(two_tasks(tmp_path), tokenizer, seed=0)
    small = data.train.sources[0]  # the small task's examples, in file order
    used = set()
    for i, ex in enumerate(small):
        convs = [Conversation((Message("user", f"Q: q {i}"), Message("assistant", f"a{i}"))),
                 Conversation((Message("system", "Be brief."), Message("user", f"q {i}?"),
                               Message("assistant", f"A: a{i}")))]
        expected = [shift_labels(*tokenize_conversation(tokenizer, c)) for c in convs]
        assert ex in expected, i
        used.add(expected.index(ex))
    assert used == {0, 1}  # with seed 0 both templates are picked among these five rows


@pytest.mark.parametrize("streaming", [False, True])
def test_a_template_naming_a_missing_field_names_file_line_and_field(tokenizer, tmp_path, streaming):
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "answer": "a"}, "", {"answer": "b"}])
    cfg = DataConfig(mixture=[{"name": "t", "train": str(path), "templates": TEMPLATES}], streaming=streaming)
    with pytest.raises(DataError) as err:
        load_sft_data(cfg, tokenizer, seed=0)
    (issue,) = err.value.issues
    assert (issue.file, issue.line, issue.field) == (str(path), 3, "question")  # line 3: the blank line counts
    assert "is missing (the template's user message uses it)" in issue.message


def test_a_template_refuses_null_and_non_text_values_but_indexes_into_them(tokenizer, tmp_path):
    """A null (a missing Parquet cell) would train the word "None", a list its Python repr."""
    templates = [{"user": "{question}", "assistant": "{answer}"}]
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "q1", "answer": None}, {"question": ["q2"], "answer": "a"},
                                             {"question": "q3", "answer": {"x": 1}}, {"question": "q4", "answer": 7}])
    cfg = DataConfig(mixture=[{"name": "t", "train": str(path), "templates": templates}])
    with pytest.raises(DataError) as err:
        load_sft_data(cfg, tokenizer, seed=0)
    assert [(i.line, i.field) for i in err.value.issues] == [(1, "answer"), (2, "question"), (3, "answer")]
    assert "is null (the template's assistant message uses it)" in err.value.issues[0].message
    assert "must be text or a number, got list" in err.value.issues[1].message
    indexed = [{"user": "{question[0]}", "assistant": "{answer[x]}"}]
    path = write_jsonl(tmp_path / "u.jsonl", [{"question": ["q"], "answer": {"x": "a"}}] * 2)
    data = load_sft_data(DataConfig(mixture=[{"name": "u", "train": str(path), "templates": indexed}],
                                    validation_split=0), tokenizer, seed=0)
    conv = Conversation((Message("user", "q"), Message("assistant", "a")))
    assert data.train[0] == [shift_labels(*tokenize_conversation(tokenizer, conv))]


def test_streaming_rows_equal_loaded_rows_index_for_index(tokenizer, tmp_path):
    kw = dict(examples_per_epoch=30, validation_split=0.2)
    loaded = load_sft_data(two_tasks(tmp_path, **kw), tokenizer, seed=0)
    streamed = load_sft_data(two_tasks(tmp_path, streaming=True, **kw), tokenizer, seed=0)
    assert isinstance(streamed.train.sources[1].source, mixture.StreamedExamples)
    assert len(streamed.train) == len(loaded.train) == 30
    assert [streamed.train[i] for i in range(30)] == [loaded.train[i] for i in range(30)]
    assert len(loaded.validation) == 1 + 2  # a seeded 20% of each task: 5 rows -> 1, 12 rows -> 2
    assert streamed.validation[:] == loaded.validation[:]
    assert streamed.stats["train_loss_tokens"] is None and streamed.stats["tasks"] == loaded.stats["tasks"]


def test_streaming_reads_rows_from_disk_only_when_asked(tokenizer, tmp_path, monkeypatch):
    reads = Counter()
    read_line = mixture._read_line

    def counting(path, offset):
        reads[offset] += 1
        return read_line(path, offset)

    monkeypatch.setattr(mixture, "_read_line", counting)
    monkeypatch.setattr(mixture, "STREAM_CHECK_ROWS", 3)
    path = qa_file(tmp_path / "big.jsonl", 200)
    cfg = DataConfig(mixture=[{"name": "t", "train": path, "templates": TEMPLATES}], streaming=True,
                     validation_split=0, examples_per_epoch=50)
    data = load_sft_data(cfg, tokenizer, seed=0)
    assert sum(reads.values()) == 3 and data.stats["checked"] == "first 3 rows of each file (3 rows)"
    source = data.train.sources[0]
    assert [o.nbytes for o in source.offsets] == [8 * 200]  # the index: one int64 per row, no parsed rows
    reads.clear()
    rows = [data.train[i] for i in range(50)]
    fresh = {data.train.locate(i)[1] for i in range(50)} - {0, 1, 2}  # rows 0-2 are cached since the check
    assert sum(reads.values()) == len(fresh) and max(reads.values()) == 1  # one read per drawn row, no others
    assert rows == [data.train[i] for i in range(50)] and sum(reads.values()) == len(fresh)  # the LRU cache


@pytest.mark.parametrize("data, message", [
    ({"train": "a.jsonl", "mixture": [{"name": "a", "train": "a.jsonl"}]}, "not both"),
    ({}, "data needs train (one dataset) or mixture"),
    ({"mixture": [{"name": "a", "train": "a.jsonl"}, {"name": "a", "train": "b.jsonl"}]}, "must be unique"),
    ({"mixture": [{"name": "a", "train": "a.jsonl"}], "streaming": True, "packing": True}, "cannot pack"),
    ({"mixture": [{"name": "a", "train": "a.jsonl"}], "streaming": True, "truncation": "drop"}, "cannot drop"),
    ({"mixture": [{"name": "a", "train": "a.parquet"}], "streaming": True}, "a.parquet (task a) is not a .jsonl"),
    ({"train": "a.jsonl", "streaming": True}, "apply to data.mixture"),
    ({"mixture": [{"name": "a", "train": "a.jsonl"}], "validation": "v.jsonl"}, "validation files per task"),
    ({"mixture": [{"name": "a", "train": "a.jsonl", "templates": [{"user": "{q}"}]}]}, "needs user and assistant"),
    ({"mixture": [{"name": "a", "train": "a.jsonl", "templates": [{"user": "{}", "assistant": "x"}]}]},
     "name a row field"),
    ({"mixture": [{"name": "a", "train": "a.jsonl", "weight": 0}]}, "greater than 0"),
])
def test_config_mistakes_are_refused(data, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        DataConfig(**data)


def test_a_packed_mixture_packs_the_epochs_examples(tokenizer, tmp_path):
    data = load_sft_data(two_tasks(tmp_path, examples_per_epoch=20, packing=True), tokenizer, seed=0)
    assert sum(len(row) for row in data.train) == 20 and data.stats["train_rows"] == len(data.train) < 20


def test_resume_after_a_crash_on_a_streamed_mixture_matches_an_uninterrupted_run(tokenizer, tmp_path):
    def streamed():  # a resumed run is a new process: it rebuilds the rows from the files
        return load_sft_data(two_tasks(tmp_path, streaming=True, examples_per_epoch=8), tokenizer, seed=0).train

    cfg = quiet(micro_batch_size=2, max_steps=6, save_every=2, schedule="cosine", warmup_ratio=0.2,
                max_grad_norm=1.0)  # 4 micro-batches an epoch: the run crosses into a reshuffled second epoch
    full = RunDir(tmp_path / "full").create()
    ref_model = lora_model(tokenizer)
    fit(ref_model, streamed(), [], cfg, full, pad_id=0, seed=0)

    part = RunDir(tmp_path / "part").create()

    def crash(step, record):
        if step == 5:
            raise Crash()

    with pytest.raises(Crash):
        fit(lora_model(tokenizer), streamed(), [], cfg, part, pad_id=0, seed=0, on_step=crash)
    model = lora_model(tokenizer)
    assert fit(model, streamed(), [], cfg, part, pad_id=0, seed=0, resume=True).resumed_from == 4

    ref, got = full.read_metrics(), part.read_metrics()
    assert [r["step"] for r in got] == list(range(1, 7))
    for key in ("loss", "lr", "grad_norm", "tokens"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in ref], rel=1e-6), key
    for (n, a), (_, b) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n
