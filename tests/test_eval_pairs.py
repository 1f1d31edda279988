"""On-policy preference pairs: the reference answer chosen over what the model itself answers."""

from conftest import write_jsonl
from test_cli import read_jsonl, tunesmith
from tunesmith.data import read_preferences


def test_pairs_reject_exactly_the_models_own_wrong_answers(tokenizer, tiny, tmp_path):
    import tunesmith.api as api

    questions = [f"Rewrite the date {d} in ISO format." for d in ("4 March 2021", "July 8, 2035", "the 7th of May, 1999")]
    said = api.generate(tiny, tokenizer, questions, max_new_tokens=12, batch_size=3)
    assert all(s.strip() for s in said), said  # the random model says something for each prompt
    rows = [{"messages": [{"role": "user", "content": q}], "answer": a, "task": None}
            for q, a in zip(questions, ["2021-03-04", said[1], "1999-05-07"])]  # row 2: the model is right
    task = write_jsonl(tmp_path / "task.jsonl", rows)
    out = tmp_path / "pairs.jsonl"
    stats = api.make_pairs((tiny, tokenizer), task, out, max_new_tokens=12, batch_size=3)
    assert stats["pairs"] == 2 and stats["prompts"] == 3 and abs(stats["exact_match"] - 1 / 3) < 1e-9
    got = read_jsonl(out)
    assert [(r["chosen"], r["rejected"]) for r in got] == [("2021-03-04", said[0]), ("1999-05-07", said[2])]
    assert got[0]["prompt"] == [{"role": "user", "content": questions[0]}] and got[0]["rejected_kind"] == "model"
    issues = []
    assert len(read_preferences([str(out)], issues)) == 2 and not issues  # what DPO and reward models read


def test_cli_data_pairs_reports_bad_task_rows_before_loading_a_model(tmp_path):
    bad = write_jsonl(tmp_path / "task.jsonl", [{"messages": [{"role": "user", "content": "q"}], "answer": 3}])
    proc = tunesmith("data", "pairs", "no-such-model", bad, "-o", tmp_path / "p.jsonl", check=False)
    assert proc.returncode == 2 and "task.jsonl:1: field 'answer'" in proc.stderr, proc.stderr
    assert not (tmp_path / "p.jsonl").exists()
    proc = tunesmith("data", "pairs", "tiny", "examples/data/dates/test.jsonl", "-o", tmp_path / "p.jsonl",
                     "--limit", "4", "--max-new-tokens", "6")
    rows = read_jsonl(tmp_path / "p.jsonl")
    assert f"wrote {len(rows)} pairs" in proc.stdout
    assert rows and all(r["chosen"] != r["rejected"].strip() for r in rows)
