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


def test_scored_pairs_choose_the_best_answer_that_stopped_over_the_worst(tmp_path, monkeypatch):
    """Each prompt's sampled answers scored by a reward source (here their length): the best-scored answer
    that ended its turn is chosen over the worst-scored one, never an answer that ran out of tokens (a
    chosen answer that never stops would teach the model not to stop); a prompt whose answers are all
    unfinished, all alike, or closer than min_gap gives no pair. The rows are what DPO reads."""
    import tunesmith.eval.pairs as pairs
    from tunesmith.config import RewardSourceConfig
    from tunesmith.data.conversation import Message
    from tunesmith.eval.generation import EvalItem, EvalResult
    from tunesmith.rl import build_reward

    answers = [[("aaaa", True), ("bb", True), ("cccccccc", False)],  # the longest never stopped
               [("x", False), ("yy", False), ("z", False)],          # nothing stopped
               [("same", True), ("same ", True), ("same", True)],    # one answer (spaced apart) three times
               [("abc", True), ("abcd", True), ("abcde", True)],     # a gap of 2
               [("abc", True), ("abcd", True), ("ab", True)]]        # a gap of 2; min_gap 2 keeps none
    records = [{"completion": text, "finished": done} for group in answers for text, done in group]
    monkeypatch.setattr(pairs, "score_items", lambda *a, **k: EvalResult({}, records))
    items = [EvalItem([Message("user", f"q{i}")], f"a{i}", None, {}, None) for i in range(5)]
    fn = tmp_path / "r.py"
    fn.write_text("def length(prompts, completions, rows):\n    return [len(c) for c in completions]\n")
    reward = build_reward([RewardSourceConfig(kind="function", name=f"{fn}:length")])
    rows, stats = pairs.scored_pairs(None, None, items, reward, samples=3)
    assert [(r["prompt"][0]["content"], r["chosen"], r["rejected"]) for r in rows] == [
        ("q0", "aaaa", "bb"), ("q3", "abcde", "abc"), ("q4", "abcd", "ab")]
    assert [r["chosen_score"] - r["rejected_score"] for r in rows] == [2, 2, 2]
    assert stats["pairs"] == len(rows) and stats["prompts"] == 5
    rows, _ = pairs.scored_pairs(None, None, items, reward, samples=3, min_gap=2.0)
    assert rows == []
    out = write_jsonl(tmp_path / "p.jsonl", pairs.scored_pairs(None, None, items, reward, samples=3)[0])
    issues = []
    assert len(read_preferences([str(out)], issues)) == 3 and not issues


def test_cli_scored_pairs_with_a_task_reward(tmp_path):
    """`tunesmith data scored-pairs MODEL PROMPTS --reward KIND:NAME`: a malformed source is refused before a
    model loads; a run writes its pairs and says how many."""
    proc = tunesmith("data", "scored-pairs", "tiny", "examples/data/dates/test.jsonl", "-o", tmp_path / "p.jsonl",
                     "--reward", "judge", check=False)
    assert proc.returncode == 2 and "KIND:NAME" in proc.stderr
    proc = tunesmith("data", "scored-pairs", "tiny", "examples/data/dates/test.jsonl", "-o", tmp_path / "p.jsonl",
                     "--reward", "function:examples/rewards.py:vowel_fraction", "--limit", "3", "--samples", "2",
                     "--max-new-tokens", "4")
    assert f"wrote {len(read_jsonl(tmp_path / 'p.jsonl'))} pairs from 3 prompts" in proc.stdout
    alone = tmp_path / "alone.jsonl"  # questions alone: a function scores the answers, nothing checks them
    alone.write_text('{"prompt": "Tell a joke."}\n{"messages": [{"role": "user", "content": "Say hi."}]}\n')
    proc = tunesmith("data", "scored-pairs", "tiny", alone, "-o", tmp_path / "q.jsonl", "--reward",
                     "function:examples/rewards.py:vowel_fraction", "--samples", "3", "--max-new-tokens", "4")
    assert "from 2 prompts" in proc.stdout and all("answer" not in r for r in read_jsonl(tmp_path / "q.jsonl"))
