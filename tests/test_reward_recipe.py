"""`recipe: reward` end to end on the tiny model, through the CLI, and its saved model scored back."""
import json

from conftest import write_jsonl
from test_cli import read_jsonl, tunesmith


def test_tiny_reward_recipe_trains_saves_and_scores(tmp_path):
    out = tmp_path / "rm"
    proc = tunesmith("train", "examples/tiny/reward-lora.yaml", f"output_dir={out}", "train.progress=false")
    assert "validation pairwise accuracy" in proc.stdout and "tunesmith score" in proc.stdout
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert sum(r["loss"] for r in steps[-3:]) < sum(r["loss"] for r in steps[:3])
    assert all(r["loss_tokens"] >= 8 for r in steps)  # micro-batch of 8 prompts, >= 1 pair each
    report = json.loads((out / "eval" / "pairwise.json").read_text())
    assert report["after"]["accuracy"] > max(0.6, report["before"]["accuracy"])
    marker = json.loads((out / "final" / "tunesmith.json").read_text())
    assert marker["head"] == "reward" and marker["kind"] == "adapter"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-12", "step-8"]

    # The saved model, loaded back, ranks the validation pairs exactly as at the end of training.
    scored = tmp_path / "scores.jsonl"
    tunesmith("score", out, "examples/data/dates-preferences/test.jsonl", "-o", scored)
    rows = read_jsonl(scored)
    accuracy = sum(r["chosen_score"] > r["rejected_score"] for r in rows) / len(rows)
    assert len(rows) == 100 and abs(accuracy - report["after"]["accuracy"]) < 1e-6


def test_reward_validate_lists_bad_preference_rows_and_score_refuses_a_language_model(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "a"},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "responses": []},
        {"prompt": "q", "responses": ["a", "b"], "ranks": [1, 1]},
    ])
    proc = tunesmith("validate", "examples/tiny/reward-lora.yaml", f"data.train={bad}", check=False)
    assert proc.returncode == 2 and "4 data problems" in proc.stderr
    for where in ("bad.jsonl:2: field 'rejected'", "bad.jsonl:3: field 'chosen'", "bad.jsonl:4: field 'responses'",
                  "bad.jsonl:5: field 'ranks'"):
        assert where in proc.stderr, (where, proc.stderr)
    proc = tunesmith("score", "tiny", "examples/data/dates-preferences/test.jsonl", "-o", tmp_path / "s.jsonl",
                     check=False)
    assert proc.returncode == 2 and "not a reward model" in proc.stderr
    proc = tunesmith("train", "examples/tiny/reward-lora.yaml", "method.kind=qlora", check=False)
    assert proc.returncode == 2 and "unquantised" in proc.stderr


def test_score_reports_bad_rows_before_loading_any_model(tmp_path):
    import pytest

    import tunesmith.api
    from tunesmith._core.errors import DataError

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError, match="bad.jsonl:1: field 'rejected'"):
        tunesmith.api.score("no-such-model-folder", bad, tmp_path / "out.jsonl")
