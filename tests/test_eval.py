"""Evaluation: reading held-out rows, scoring completions, and the three report files."""
from __future__ import annotations

import json

import pytest

from tunesmith._core.errors import DataError
from tunesmith.data.conversation import Message
from tunesmith.data.render import end_of_turn_ids, render_prompt
from tunesmith.eval import before_after_markdown, load_eval_items, score_items, write_eval
from tunesmith.eval import generation as eval_generation
from tunesmith.models.generate import Generation
from tunesmith.models.tiny import tiny_model, tiny_tokenizer
from tunesmith.tasks import get_task


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _chat(*turns):
    return [{"role": role, "content": content} for role, content in turns]


GOOD_ROWS = [
    get_task("dates").make(1, seed=0)[0],
    {"messages": _chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "2+2?"),
                       ("assistant", "4"))},
    {"prompt": "Capital of France?", "completion": "Paris"},
    {"messages": _chat(("user", "Say yes.")), "answer": "yes", "task": "not_a_task"},
]


def test_load_eval_items(tmp_path):
    path = _write_jsonl(tmp_path / "good.jsonl", GOOD_ROWS)
    items = load_eval_items(path)
    assert [i.source.line for i in items] == [1, 2, 3, 4]
    assert all(i.source.file == str(path) for i in items)
    dates = items[0]
    assert dates.task == "dates" and dates.reference == GOOD_ROWS[0]["answer"]
    assert dates.prompt == [Message("user", GOOD_ROWS[0]["messages"][0]["content"])]
    # Everything before the LAST assistant message is the prompt, earlier assistant turns included.
    assert [m.role for m in items[1].prompt] == ["system", "user", "assistant", "user"]
    assert items[1].reference == "4" and items[1].task is None
    assert items[2].prompt == [Message("user", "Capital of France?")] and items[2].reference == "Paris"
    # A question with only an `answer` field: the whole conversation is the prompt.
    assert items[3].prompt == [Message("user", "Say yes.")] and items[3].reference == "yes"
    assert items[3].row == GOOD_ROWS[3]
    assert len(load_eval_items(path, limit=2)) == 2


def test_answer_field_wins_over_the_assistant_message(tmp_path):
    row = {"messages": _chat(("user", "q"), ("assistant", "long explanation... 7")), "answer": "7"}
    [item] = load_eval_items(_write_jsonl(tmp_path / "a.jsonl", [row]))
    assert item.reference == "7"


def test_load_eval_items_reports_every_bad_row(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [
        {"messages": _chat(("user", "fine"), ("assistant", "ok"))},
        {"messages": _chat(("user", "no answer anywhere"))},
        {"messages": _chat(("user", "q"), ("assistant", "a")), "answer": 7},
        "{not json",
        {"text": "raw text has no question"},
        {"messages": _chat(("assistant", "nothing asked"))},
    ])
    with pytest.raises(DataError) as err:
        load_eval_items(path)
    issues = {i.line: i for i in err.value.issues}
    assert sorted(issues) == [2, 3, 4, 5, 6]
    assert issues[2].field == "messages" and "no assistant" in issues[2].message
    assert issues[3].field == "answer"
    assert issues[5].field == "text"
    assert "no prompt" in issues[6].message
    assert f"{path}:2: field 'messages'" in str(err.value)


def test_load_eval_items_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="has no rows"):
        load_eval_items(path)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_score_items_with_known_completions(tmp_path, tok, monkeypatch):
    json_row = get_task("json_fields").make(1, seed=0)[0]
    person = json.loads(json_row["answer"])
    reordered = json.dumps({"city": person["city"], "age": person["age"], "name": person["name"]})
    rows = GOOD_ROWS[:3] + [json_row]
    items = load_eval_items(_write_jsonl(tmp_path / "eval.jsonl", rows))
    canned = [
        Generation([5, 6, 7], f"  {GOOD_ROWS[0]['answer']}\n", True),  # dates: right up to whitespace -> 1
        Generation([5], "5", True),  # wrong -> 0
        Generation([5, 6, 7, 8], "Paris", False),  # right but cut off by the budget -> 1, not finished
        Generation([5, 6], reordered, True),  # json_fields: same object in another order -> 1 by the task
    ]
    seen = {}

    def fake_generate(model, tokenizer, prompts, *, stop_ids, max_new_tokens, batch_size, **kwargs):
        seen.update(prompts=prompts, stop_ids=stop_ids, max_new_tokens=max_new_tokens, kwargs=kwargs)
        return canned

    monkeypatch.setattr(eval_generation, "generate", fake_generate)
    result = score_items(None, tok, items, max_new_tokens=9)
    assert seen["prompts"] == [render_prompt(tok, i.prompt) for i in items]
    assert seen["stop_ids"] == end_of_turn_ids(tok) and seen["max_new_tokens"] == 9
    assert seen["kwargs"] == {}  # greedy: no temperature passed
    assert [r["score"] for r in result.records] == [1.0, 0.0, 1.0, 1.0]
    m = result.metrics
    assert m["exact_match"] == pytest.approx(3 / 4)
    assert m["stops_cleanly"] == pytest.approx(3 / 4)
    assert m["n"] == 4 and m["mean_new_tokens"] == pytest.approx((3 + 1 + 4 + 2) / 4)
    assert m["seconds"] >= 0
    first = result.records[0]
    assert (first["file"], first["line"], first["reference"], first["finished"]) == (
        str(tmp_path / "eval.jsonl"), 1, GOOD_ROWS[0]["answer"], True)


def test_pass_at_k_is_the_chance_that_some_of_k_samples_is_right():
    """Against counting every k-subset of n samples: the share of subsets holding a right one."""
    import itertools
    import math

    from tunesmith.eval.generation import pass_at_k

    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3, 2) / C(4, 2) = 1 - 3 / 6
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations([i < c for i in range(n)], k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets)), (n, c, k)
    assert pass_at_k(200, 3, 100) == pytest.approx(1 - math.comb(197, 100) / math.comb(200, 100), rel=1e-12)
    with pytest.raises(ValueError, match="0 < k <= n"):
        pass_at_k(4, 1, 5)


def test_sampled_evaluation_reports_pass_at_k(tmp_path, tok, monkeypatch):
    """--samples 4: each prompt is asked 4 times at the temperature and seed given; a prompt answered right
    by 1 of its 4 samples has pass@1 1/4, pass@2 1/2 and pass@4 1; one never answered right has 0, one
    always answered right 1. exact_match is the mean over all 12 completions, and each is a record."""
    rows = [{"prompt": f"Say {w}.", "completion": w} for w in ("yes", "no", "maybe")]
    items = load_eval_items(_write_jsonl(tmp_path / "eval.jsonl", rows))
    answers = ["yes", "x", "x", "x", "x", "x", "x", "x", "maybe", "maybe", "maybe", "maybe"]
    seen = {}

    def fake_generate(model, tokenizer, prompts, *, stop_ids, max_new_tokens, batch_size, **kwargs):
        seen.update(prompts=prompts, kwargs=kwargs)
        return [Generation([5], a, True) for a in answers]

    monkeypatch.setattr(eval_generation, "generate", fake_generate)
    result = score_items(None, tok, items, samples=4, temperature=0.7, seed=3)
    assert seen["prompts"] == [render_prompt(tok, i.prompt) for i in items for _ in range(4)]
    assert seen["kwargs"] == {"temperature": 0.7, "seed": 3}
    m = result.metrics
    assert (m["n"], m["samples"], m["temperature"]) == (3, 4, 0.7)
    assert m["exact_match"] == pytest.approx(5 / 12)
    assert (m["pass@1"], m["pass@2"], m["pass@4"]) == pytest.approx(((1 / 4 + 1) / 3, (1 / 2 + 1) / 3, 2 / 3))
    assert [r["sample"] for r in result.records] == [0, 1, 2, 3] * 3 and len(result.records) == 12
    with pytest.raises(ValueError, match="temperature > 0"):
        score_items(None, tok, items, samples=4, temperature=0.0)


def test_score_items_on_the_tiny_model(tmp_path, tok):
    items = load_eval_items(_write_jsonl(tmp_path / "t.jsonl", get_task("addition").make(6, seed=0)))
    result = score_items(tiny_model(tok), tok, items, max_new_tokens=4, batch_size=4)
    assert result.metrics["n"] == 6 and 0 <= result.metrics["exact_match"] <= 1
    assert result.metrics["mean_new_tokens"] <= 4
    assert len(result.records) == 6


def test_write_eval_and_before_after(tmp_path, tok, monkeypatch):
    items = load_eval_items(_write_jsonl(tmp_path / "e.jsonl", GOOD_ROWS[1:3]))
    monkeypatch.setattr(eval_generation, "generate",
                        lambda *a, **k: [Generation([1], "```4", True), Generation([1, 2], "Lyon", False)])
    result = score_items(None, tok, items)
    write_eval(result, tmp_path / "eval", "test")
    assert json.loads((tmp_path / "eval" / "test.json").read_text()) == result.metrics
    samples = [json.loads(x) for x in (tmp_path / "eval" / "test.samples.jsonl").read_text().splitlines()]
    assert samples == result.records
    md = (tmp_path / "eval" / "test.md").read_text()
    assert "| exact_match | 0 |" in md and "Lyon" in md and "````text\n```4\n````" in md

    table = before_after_markdown({"exact_match": 0.01, "n": 200}, {"exact_match": 0.955, "n": 200, "x": "y"})
    assert table.splitlines()[:2] == ["| metric | before | after | change |", "|---|---|---|---|"]
    assert "| exact_match | 0.01 | 0.955 | +0.945 |" in table
    assert "| n | 200 | 200 | +0 |" in table
    assert "| x | - | y |  |" in table


def test_a_recipe_reports_pass_at_k_before_and_after_with_eval_samples(tmp_path):
    """eval.samples 2 on the tiny SFT example: eval/before.json and after.json hold pass@1 and pass@2, and
    each answer of each prompt is a record."""
    from conftest import ROOT
    from tunesmith.api import train

    run = train(ROOT / "examples/tiny/sft-lora.yaml", output_dir=str(tmp_path / "run"),
                **{"train.progress": False, "train.max_steps": 1, "eval.limit": 3, "eval.max_new_tokens": 4,
                   "eval.samples": 2, "eval.temperature": 1.0})
    for name in ("before", "after"):
        metrics = json.loads((run.path / "eval" / f"{name}.json").read_text())
        assert {"pass@1", "pass@2"} <= set(metrics) and (metrics["n"], metrics["samples"]) == (3, 2)
        assert metrics["pass@1"] == pytest.approx(metrics["exact_match"])  # scores of 0 or 1 here
        records = (run.path / "eval" / f"{name}.samples.jsonl").read_text().splitlines()
        assert [json.loads(r)["sample"] for r in records] == [0, 1] * 3


def test_sampled_evaluation_scores_each_answer_with_its_own_prompts_reward(tmp_path, tok):
    """An RL run's held-out reward with eval.samples 2: the reward source gets each answer beside the prompt
    it answered (the prompts repeated, not shifted), and the mean reward is over every answer."""
    from tunesmith._core.rundir import RunDir
    from tunesmith.config import EvalConfig
    from tunesmith.recipes.common import evaluate_task

    task = _write_jsonl(tmp_path / "t.jsonl", get_task("addition").make(3, seed=0))
    asked = []

    def reward(items, completions):
        asked.extend(item.reference for item in items)
        scores = [float(i) for i in range(len(completions))]
        return scores, {"count": scores}

    run = RunDir(tmp_path / "run").create()
    cfg = EvalConfig(task_file=str(task), samples=2, temperature=1.0, max_new_tokens=3)
    metrics = evaluate_task(tiny_model(tok), tok, cfg, run, "before", lambda *a: None, reward)
    answers = [item.reference for item in load_eval_items(task)]
    assert asked == [a for a in answers for _ in range(2)]
    assert metrics["reward"] == pytest.approx(sum(range(6)) / 6) and "pass@2" in metrics


def test_a_resumed_run_measures_before_again_when_the_eval_settings_changed(tmp_path, tok):
    """`before` is kept across a resume only if it was scored as `after` will be: the same file, limit, budget."""
    from tunesmith._core.rundir import RunDir
    from tunesmith.config import EvalConfig
    from tunesmith.recipes.common import evaluate_task

    task = _write_jsonl(tmp_path / "t.jsonl", get_task("addition").make(6, seed=0))
    run = RunDir(tmp_path / "run").create()
    calls = []

    def before(cfg):
        return evaluate_task(tiny_model(tok), tok, cfg, run, "before", calls.append)
    assert before(EvalConfig(task_file=str(task), limit=2, max_new_tokens=3))["n"] == 2
    assert before(EvalConfig(task_file=str(task), limit=2, max_new_tokens=3, batch_size=1))["n"] == 2
    assert len(calls) == 1  # the same settings (batch size aside): the first score, kept
    assert before(EvalConfig(task_file=str(task), limit=4, max_new_tokens=3))["n"] == 4
    assert before(EvalConfig(task_file=str(task), limit=4, max_new_tokens=5))["n"] == 4
    assert len(calls) == 3 and json.loads((run.eval / "before.json").read_text())["n"] == 4


def test_evaluate_refuses_several_greedy_samples_before_loading_the_model(tmp_path, monkeypatch):
    import tunesmith.api
    from tunesmith._core.errors import TunesmithError

    monkeypatch.setattr(tunesmith.api, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(TunesmithError, match="several samples need temperature > 0; got samples=4, temperature=0"):
        tunesmith.api.evaluate("tiny", tmp_path / "t.jsonl", samples=4, temperature=0.0)


def test_prompts_the_chat_template_refuses_are_named_by_file_and_line(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if '!' in m['content'] %}{{ raise_exception('no shouting') }}"
                         "{% endif %}{% endfor %}" + tok.chat_template)
    items = load_eval_items(_write_jsonl(tmp_path / "t.jsonl", [{"prompt": "calm", "completion": "a"},
                                                                {"prompt": "loud!", "completion": "b"}]))
    with pytest.raises(DataError) as err:
        score_items(tiny_model(tok), tok, items, max_new_tokens=2)
    [issue] = err.value.issues
    assert (issue.file, issue.line, issue.field) == (str(tmp_path / "t.jsonl"), 2, "prompt")
    assert "no shouting" in issue.message
