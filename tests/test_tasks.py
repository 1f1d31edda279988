"""Tasks: seeded and reproducible, answers right by an independent check, held-out split disjoint."""
from __future__ import annotations

import datetime
import json
import re

import pytest

from tunesmith._core.errors import TunesmithError
from tunesmith.tasks import TASKS, Task, get_task, make_row, write_task_files
from tunesmith.tasks.dates import MONTHS, WEEKDAYS


def _prompt(row: dict) -> str:
    return row["messages"][0]["content"]


def _parse_date(text: str) -> datetime.date:
    """Read a prompt's date with strptime, independently of how the generator wrote it."""
    written = text.split("Date: ", 1)[1]
    if written.endswith("(day/month/year)"):
        return datetime.datetime.strptime(written.split()[0], "%d/%m/%Y").date()
    if written.endswith("(month/day/year)"):
        return datetime.datetime.strptime(written.split()[0], "%m/%d/%Y").date()
    m = re.fullmatch(r"the (\d+)(st|nd|rd|th) of (\w+), (\d{4})", written)
    if m:
        day = int(m[1])
        assert m[2] == {1: "st", 2: "nd", 3: "rd", 21: "st", 22: "nd", 23: "rd", 31: "st"}.get(day, "th")
        return datetime.date(int(m[4]), MONTHS.index(m[3]) + 1, day)
    m = re.fullmatch(r"(\w{3}), (\d+) (\w{3}) (\d{4})", written)
    if m:
        date = datetime.date(int(m[4]), [x[:3] for x in MONTHS].index(m[3]) + 1, int(m[2]))
        assert WEEKDAYS[date.weekday()][:3] == m[1], written  # the weekday must be the real one
        return date
    for fmt in ("%B %d, %Y", "%d %B %Y"):
        try:
            return datetime.datetime.strptime(written, fmt).date()
        except ValueError:
            pass
    raise AssertionError(f"unexpected date writing: {written!r}")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_rows_are_seeded_and_well_formed(name):
    task = get_task(name)
    rows = task.make(200, seed=3)
    assert rows == task.make(200, seed=3)
    assert rows != task.make(200, seed=4)
    assert task.make(50, seed=3) == rows[:50]  # a prefix does not depend on n
    assert len({_prompt(r) for r in rows}) == 200
    for row in rows:
        assert row["task"] == name
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert row["messages"][1]["content"] == row["answer"]


def test_dates_answers_are_right():
    rows = get_task("dates").make(600, seed=0)
    for row in rows:
        assert row["answer"] == _parse_date(_prompt(row)).isoformat()
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["answer"])
    assert "YYYY-MM-DD" in _prompt(rows[0])


def test_dates_use_all_six_writings():
    kinds = set()
    for row in get_task("dates").make(300, seed=1):
        written = _prompt(row).split("Date: ")[1]
        kinds.add("dmy" if "day/month" in written else "mdy" if "month/day" in written else
                  "ordinal" if written.startswith("the ") else "weekday" if "," in written.split()[0] else
                  "month-first" if written[0].isalpha() else "day-first")
    assert kinds == {"dmy", "mdy", "ordinal", "weekday", "month-first", "day-first"}


def test_json_fields_answers_are_right():
    for row in get_task("json_fields").make(300, seed=0):
        sentence = _prompt(row).split("Sentence: ", 1)[1]
        answer = json.loads(row["answer"])
        assert list(answer) == ["name", "age", "city"]
        assert isinstance(answer["age"], int)
        for value in answer.values():
            assert re.search(rf"\b{value}\b", sentence), (value, sentence)
        assert row["answer"] == json.dumps(answer, separators=(",", ":"))  # compact


def test_addition_answers_are_right():
    for row in get_task("addition").make(300, seed=0):
        m = re.fullmatch(r"What is (\d{3}) \+ (\d{3})\? Answer with the number only\.", _prompt(row))
        assert m
        assert row["answer"] == str(eval(f"{m[1]} + {m[2]}"))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_evaluate_and_reward(name):
    task = get_task(name)
    row = task.make(1, seed=0)[0]
    for right in (row["answer"], f"  {row['answer']}\n"):
        assert task.evaluate(row, right) == 1.0
        assert task.reward(row, right) == 1.0
    for wrong in ("", "nonsense", row["answer"] + "0"):
        assert task.evaluate(row, wrong) == 0.0


def test_json_fields_scores_by_parsing_and_gives_partial_reward():
    task = get_task("json_fields")
    row = {"answer": '{"name":"Maria","age":34,"city":"Lyon"}'}
    assert task.evaluate(row, '{"city": "Lyon", "name": "Maria", "age": 34}') == 1.0
    assert task.evaluate(row, '{"name":"Maria","age":"34","city":"Lyon"}') == 0.0
    assert task.evaluate(row, '{"name":"Maria",') == 0.0
    assert task.evaluate(row, '["Maria", 34, "Lyon"]') == 0.0
    assert task.reward(row, '{"name":"Maria","age":35,"city":"Lyon"}') == pytest.approx(2 / 3)
    assert task.reward(row, '{"name":"Maria","age":34,"city":"Lyon","x":1}') == pytest.approx(3 / 4)
    assert task.reward(row, "not json") == 0.0


def test_write_task_files(tmp_path):
    train, test = write_task_files("dates", tmp_path / "a", n_train=300, n_test=100, seed=7)
    assert (train.name, test.name) == ("train.jsonl", "test.jsonl")
    train_rows = [json.loads(line) for line in train.read_text().splitlines()]
    test_rows = [json.loads(line) for line in test.read_text().splitlines()]
    assert (len(train_rows), len(test_rows)) == (300, 100)
    assert not {_prompt(r) for r in train_rows} & {_prompt(r) for r in test_rows}
    again = write_task_files("dates", tmp_path / "b", n_train=300, n_test=100, seed=7)
    assert again[0].read_bytes() == train.read_bytes() and again[1].read_bytes() == test.read_bytes()
    # The test split does not move when only the training size changes.
    other = write_task_files("dates", tmp_path / "c", n_train=50, n_test=100, seed=7)
    assert other[1].read_bytes() == test.read_bytes()


def test_make_refuses_more_rows_than_distinct_prompts():
    task = Task("tiny", "three prompts", sample=lambda rng: (str(rng.randrange(3)), "x"))
    assert len(task.make(3, seed=0)) == 3
    with pytest.raises(TunesmithError, match="only produce 3 distinct"):
        task.make(4, seed=0)


def test_unknown_task_lists_known_names():
    with pytest.raises(TunesmithError, match="addition, arithmetic, dates, dates_us, json_fields"):
        get_task("date")


def test_tasks_import_no_torch():
    import subprocess
    import sys

    code = "import sys, tunesmith.tasks; assert 'torch' not in sys.modules, 'tasks imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shipped_example_data_is_exactly_what_the_generator_writes(tmp_path):
    from conftest import ROOT
    from tunesmith.tasks import write_task_files

    for task, n_train, n_test, prefs in (("dates", 480, 200, False), ("json_fields", 240, 100, False),
                                         ("dates", 400, 100, True), ("dates_us", 320, 100, False),
                                         ("prose", 100, 100, False)):
        folder = task + ("-preferences" if prefs else "")
        train, test = write_task_files(task, tmp_path / folder, n_train, n_test, 0, preferences=prefs)
        shipped = ROOT / "examples" / "data" / folder
        assert train.read_text() == (shipped / "train.jsonl").read_text(), task
        assert test.read_text() == (shipped / "test.jsonl").read_text(), task


def test_preference_pairs_prefer_the_right_terse_answer():
    import random

    from tunesmith.tasks import get_task
    from tunesmith.tasks.preferences import preference_row

    task = get_task("dates")
    rng = random.Random(0)
    kinds = set()
    for row in task.make(50, seed=3):
        pair = preference_row(row, rng)
        kinds.add(pair["rejected_kind"])
        assert task.evaluate(row, pair["chosen"]) == 1.0 and task.evaluate(row, pair["rejected"]) == 0.0
        assert pair["prompt"] == row["messages"][:-1]
    assert kinds == {"wrong", "chatter"}


def test_arithmetic_answers_are_right_and_the_last_number_is_checked():
    task = get_task("arithmetic")
    for row in task.make(300, seed=0):
        q = row["messages"][0]["content"]
        a, op, b = q.removeprefix("What is ").split("?")[0].split(" ", 2)
        value = {"+": int(a) + int(b.strip()), "-": int(a) - int(b.strip())}.get(op)
        if op == "times":
            value = int(a) * int(b.split()[-1])
        assert row["answer"] == str(value) and value >= 0
    row = make_row("arithmetic", "What is 3 + 4? Answer with the number only.", "7")
    for right in (" 7 ", "3 + 4 = 7", "The answer is 7."):
        assert task.evaluate(row, right) == 1.0 and task.reward(row, right) == 1.0
    for wrong in ("7 is not it, 8 is", "no idea", "17", "-7"):
        assert task.evaluate(row, wrong) == 0.0
