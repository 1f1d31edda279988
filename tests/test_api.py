"""The Python API does what the CLI does, one call away."""
import pytest

import tunesmith
from conftest import ROOT
from tunesmith._core.errors import DataError, TunesmithError

TINY = {
    "recipe": "sft", "seed": 0, "model": {"name": "tiny"},
    "method": {"kind": "lora", "lora": {"r": 4, "alpha": 8}},
    "data": {"train": str(ROOT / "examples/data/dates/train.jsonl"), "validation_split": 0.05},
    "train": {"max_steps": 3, "micro_batch_size": 4, "progress": False, "tensorboard": False, "save_every": 3},
    "eval": {"task_file": str(ROOT / "examples/data/dates/test.jsonl"), "limit": 4, "max_new_tokens": 4},
}


def test_train_load_generate_evaluate_merge(tmp_path):
    run = tunesmith.train(TINY, output_dir=str(tmp_path / "run"), train__lr=1e-3)
    assert run.path == tmp_path / "run" and run.steps == 3
    assert set(run.before) >= {"exact_match", "stops_cleanly"} and run.after["n"] == 4
    assert "lr: 0.001" in (run.path / "config.yaml").read_text()

    model, tok = tunesmith.load(run.path)
    texts = tunesmith.generate(model, tok, ["hello", [{"role": "user", "content": "hi"}]], max_new_tokens=3)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    metrics = tunesmith.evaluate((model, tok), ROOT / "examples/data/dates/test.jsonl", limit=4,
                                 max_new_tokens=4, out_dir=tmp_path / "ev")
    assert metrics["n"] == 4 and (tmp_path / "ev" / "test.json").exists()
    merged = tunesmith.merge(run.path, tmp_path / "merged")
    assert (merged / "config.json").exists()

    with pytest.raises(TunesmithError, match="already holds a run"):
        tunesmith.train(TINY, output_dir=str(tmp_path / "run"))


def test_validate_returns_stats_or_lists_problems(tmp_path):
    stats = tunesmith.validate(TINY)
    assert stats["train_examples"] + stats["validation_examples"] == 480
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": ""}\n{"nope": 1}\n')
    with pytest.raises(DataError) as err:
        tunesmith.validate(TINY, data__train=str(bad))
    assert [(i.line, i.field) for i in err.value.issues] == [(1, "text"), (2, None)]


def test_load_config_with_overrides():
    cfg = tunesmith.load_config(ROOT / "examples/quickstart.yaml", ["train.lr=0.0005"])
    assert cfg.train.lr == 0.0005 and cfg.model.name == "default"


def test_api_functions_are_not_shadowed_by_subpackages():
    """`import tunesmith.<subpackage>` rebinds that name on the package: none may share an API name."""
    import importlib

    for sub in ("training", "eval", "data", "models", "recipes", "tasks", "losses"):
        importlib.import_module(f"tunesmith.{sub}")
    assert all(callable(getattr(tunesmith, name)) for name in tunesmith.__all__ if name != "__version__")
