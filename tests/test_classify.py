"""`recipe: classify`: config and data errors, metrics by hand, what trains, the tiny recipe end to end
(accuracy rises, the saved classifier reloads with identical logits), exact resume, and LoRA."""
import json

import pytest
import torch

from conftest import ROOT, write_jsonl
from tunesmith._core.errors import DataError, TunesmithError
from tunesmith.config import ClassifyDataConfig, config_from_dict, load_config
from tunesmith.data.classification import collate_labelled, load_classification_data
from tunesmith.eval.classification import classification_metrics
from tunesmith.models.reward import sequence_logits

TINY = ROOT / "examples" / "tiny" / "classify.yaml"
TOPICS = ROOT / "examples" / "data" / "topics"


def tiny_cfg(tmp_path, *overrides):
    return load_config(TINY, [f"output_dir={tmp_path / 'run'}", "train.progress=false", "train.tensorboard=false",
                              *overrides])


def silent(*_):
    pass


# ---------------------------------------------------------------- config


def test_config_defaults_to_a_new_head_on_a_frozen_body():
    cfg = config_from_dict({"recipe": "classify", "data": {"train": "t.jsonl"}})
    assert cfg.method.kind == "freeze" and cfg.data.labels is None
    assert (cfg.method.freeze.train_last_n_layers, cfg.method.freeze.train_norm, cfg.method.freeze.train_lm_head) \
        == (0, False, False)
    # A partial method section keeps classify's defaults for the keys it does not name.
    cfg = config_from_dict({"recipe": "classify", "data": {"train": "t.jsonl", "labels": [0, 1]},
                            "method": {"freeze": {"train_last_n_layers": 1}}})
    assert cfg.method.kind == "freeze" and cfg.method.freeze.train_last_n_layers == 1
    assert not cfg.method.freeze.train_norm and cfg.data.labels == ["0", "1"]
    assert config_from_dict({"recipe": "classify", "data": {"train": "t.jsonl"}}, ["method.kind=lora"]).method.kind \
        == "lora"


@pytest.mark.parametrize("override, message", [
    ("method.kind=qlora", "unquantised body"),
    ("method.kind=prompt", "no virtual tokens"),
    ("method.freeze.train_lm_head=true", "no LM head"),
    ("data.labels=[spam]", "at least 2 classes"),
    ("data.labels=[spam, ham, spam]", "class names repeat: ['spam']"),
    ("data.labels=[spam, ' ']", "class name is empty"),
    ("data.text_column=", "data.text_column"),
    ("data.label_colum=y", "did you mean 'data.label_column'"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(TunesmithError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_from_dict({"recipe": "classify", "data": {"train": "t.jsonl"}}, [override])


# ---------------------------------------------------------------- data


def test_every_bad_row_is_reported_with_file_line_and_field(tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"text": "fine", "label": "a"},
        {"label": "a"},
        {"text": "   ", "label": "b"},
        {"text": "no label"},
        {"text": "float label", "label": 1.5},
        {"text": "bool label", "label": True},
        {"text": 7, "label": "a"},
        '["not", "an", "object"]',
        {"text": "unknown", "label": "c"},
    ])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "zzz"}])
    cfg = ClassifyDataConfig(train=str(train), validation=str(val), labels=["a", "b"])
    with pytest.raises(DataError) as err:
        load_classification_data(cfg, tokenizer, seed=0)
    text = str(err.value)
    assert "9 data problems" in text, text
    for where in ("train.jsonl:2: field 'text' is missing", "train.jsonl:3: field 'text' is empty",
                  "train.jsonl:4: field 'label' is missing", "train.jsonl:5: field 'label' must be a string or an integer",
                  "train.jsonl:6: field 'label' must be a string or an integer", "train.jsonl:7: field 'text' must be a string",
                  "train.jsonl:8: each row must be an object", "train.jsonl:9: field 'label' unknown label 'c'",
                  "val.jsonl:2: field 'label' unknown label 'zzz'; data.labels are ['a', 'b']"):
        assert where in text, (where, text)


def test_labels_default_to_train_sorted_and_may_be_integers_in_other_columns(tokenizer, tmp_path):
    rows = [{"review": f"text {i}", "stars": s} for i, s in enumerate([10, 2, 2, 10, 3, 2])]
    csv = tmp_path / "train.csv"
    csv.write_text("review,stars\n" + "".join(f"{r['review']},{r['stars']}\n" for r in rows))
    cfg = ClassifyDataConfig(train=str(csv), text_column="review", label_column="stars", validation_split=0)
    data = load_classification_data(cfg, tokenizer, seed=0)
    assert data.labels == ["2", "3", "10"]  # integers sort numerically, not as strings
    assert [e.label for e in data.train] == [2, 0, 0, 2, 1, 0]
    assert data.train[0].input_ids == tuple(tokenizer("text 0")["input_ids"])  # the text as it is: no template
    # Without data.labels a validation label missing from train is an error, and so is a single class.
    val = write_jsonl(tmp_path / "val.jsonl", [{"review": "x", "stars": 4}])
    with pytest.raises(DataError, match=r"val.jsonl:1: field 'stars' unknown label '4'; the labels of the training"):
        load_classification_data(cfg.model_copy(update={"validation": str(val)}), tokenizer, seed=0)
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}])
    with pytest.raises(DataError, match="at least 2 classes"):
        load_classification_data(ClassifyDataConfig(train=str(one)), tokenizer, seed=0)


def test_shipped_topics_data_is_what_the_generator_writes(tmp_path):
    from tunesmith.tasks import write_task_files

    train, test = write_task_files("topics", tmp_path, 600, 200, 0)
    assert train.read_text() == (TOPICS / "train.jsonl").read_text()
    assert test.read_text() == (TOPICS / "test.jsonl").read_text()
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    assert {r["label"] for r in rows} == {"animals", "food", "weather"}
    for option in ("preferences", "judge"):
        with pytest.raises(TunesmithError, match="no answers to prefer or judge"):
            write_task_files("topics", tmp_path, 1, 1, 0, **{option: True})


# ---------------------------------------------------------------- metrics


def test_metrics_by_hand_with_a_class_never_predicted():
    gold = [0, 0, 0, 1, 1, 2, 2, 2]
    pred = [0, 0, 1, 1, 0, 0, 1, 1]  # class c (2) is never predicted
    m = classification_metrics(pred, gold, ["a", "b", "c", "d"])  # d: neither in gold nor predicted
    # a: TP 2 FP 2 FN 1 -> P 1/2, R 2/3, F1 4/7; b: TP 1 FP 3 FN 1 -> P 1/4, R 1/2, F1 1/3; c: TP 0 FP 0 FN 3.
    assert m["accuracy"] == pytest.approx(3 / 8)
    a, b, c, d = (m["per_class"][k] for k in "abcd")
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == pytest.approx((1 / 2, 2 / 3, 4 / 7, 3))
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == pytest.approx((1 / 4, 1 / 2, 1 / 3, 2))
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 3)
    assert d["f1"] is None and d["support"] == 0
    assert m["macro_f1"] == pytest.approx((4 / 7 + 1 / 3 + 0) / 3)  # = 19/63; d is left out
    perfect = classification_metrics([1, 0, 1], [1, 0, 1], ["x", "y"])
    assert perfect["accuracy"] == perfect["macro_f1"] == 1.0


# ---------------------------------------------------------------- model


def test_only_the_head_gets_gradients_under_the_default_method(tokenizer, tiny):
    from tunesmith.models import apply_method
    from tunesmith.models.reward import to_sequence_classifier

    cfg = config_from_dict({"recipe": "classify", "data": {"train": "t.jsonl"}})
    with pytest.raises(TunesmithError, match="trains nothing"):  # a language model still needs something to train
        apply_method(tiny, cfg.method)
    clf = apply_method(to_sequence_classifier(tiny, ["a", "b", "c"]), cfg.method)
    assert clf.config.id2label == {0: "a", 1: "b", 2: "c"}
    data = load_classification_data(ClassifyDataConfig(train=str(TOPICS / "test.jsonl"), validation_split=0),
                                    tokenizer, seed=0)
    batch = collate_labelled(data.train[:5], tokenizer.pad_token_id)
    logits = sequence_logits(clf, batch)
    assert logits.shape == (5, 3)
    torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
    assert {n for n, p in clf.named_parameters() if p.grad is not None} == {"score.weight"}
    assert {n for n, p in clf.named_parameters() if p.requires_grad} == {"score.weight"}
    # Padding to a longer neighbour leaves an example's logits alone: the head reads its own last token.
    with torch.no_grad():
        alone = sequence_logits(clf, collate_labelled(data.train[:1], tokenizer.pad_token_id))
    assert torch.allclose(alone[0], logits[0].detach(), atol=1e-5)


# ---------------------------------------------------------------- the recipe end to end


def run_capturing_model(cfg, monkeypatch, **kw):
    """run_classify, also returning the model it saved."""
    import tunesmith.recipes.classify as recipe

    saved = {}
    real = recipe.save_final

    def spy(model, *args, **kwargs):
        saved["model"] = model
        return real(model, *args, **kwargs)

    monkeypatch.setattr(recipe, "save_final", spy)
    result = recipe.run_classify(cfg, say=silent, **kw)
    monkeypatch.setattr(recipe, "save_final", real)
    return result, saved["model"]


def reloaded_logits_equal(run_dir, trained, tokenizer):
    from tunesmith.config import ModelConfig
    from tunesmith.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(ModelConfig(name=str(run_dir)), for_training=False)
    data = load_classification_data(ClassifyDataConfig(train=str(TOPICS / "test.jsonl"), validation_split=0),
                                    tokenizer, seed=0)
    batch = collate_labelled(data.train[:50], tok.pad_token_id)
    trained.eval()
    with torch.no_grad():
        a, b = sequence_logits(trained, batch), sequence_logits(model, batch)
    return model, torch.equal(a, b)


def test_tiny_recipe_learns_the_topics_and_saves_a_classifier_that_reloads(tokenizer, tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path)
    result, trained = run_capturing_model(cfg, monkeypatch)
    out = result.path
    report = json.loads((out / "eval" / "classify.json").read_text())
    assert report["labels"] == ["animals", "food", "weather"]
    before, after = report["before"], report["after"]
    assert before["n_examples"] == after["n_examples"] == 200
    assert after["accuracy"] > before["accuracy"] + 0.25 and after["macro_f1"] > before["macro_f1"] + 0.25
    assert set(after["per_class"]) == set(report["labels"]) and all(v["f1"] > 0.5 for v in after["per_class"].values())
    steps = [r for r in metrics_of(out) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 101)) and "accuracy" in steps[0]
    assert sum(r["loss"] for r in steps[-10:]) < sum(r["loss"] for r in steps[:10])
    assert [r["step"] for r in metrics_of(out) if "val_accuracy" in r] == [50, 100]

    marker = json.loads((out / "final" / "tunesmith.json").read_text())
    assert (marker["kind"], marker["head"], marker["labels"]) == ("full", "classify", report["labels"])
    card = (out / "final" / "README.md").read_text()
    for part in ("tiny", "method: freeze", "0 `animals`, 1 `food`, 2 `weather`", "lr 0.1",
                 f"| accuracy | {before['accuracy']:.3f} | {after['accuracy']:.3f} |", "F1 `food`"):
        assert part in card, (part, card)
    assert json.loads((out / "status.json").read_text())["labels"] == report["labels"]

    model, same = reloaded_logits_equal(out, trained, tokenizer)
    assert same and model.config.id2label == {0: "animals", 1: "food", 2: "weather"}
    import tunesmith.api

    with pytest.raises(TunesmithError, match="not a reward model"):  # a K-way head gives no scalar score
        tunesmith.api.score(out, ROOT / "examples" / "data" / "dates-preferences" / "test.jsonl", tmp_path / "s.jsonl")


def metrics_of(out):
    from tunesmith._core.rundir import RunDir

    return RunDir(out).read_metrics()


class Crash(Exception):
    pass


def crashed_at_6_and_resumed(cfg, monkeypatch):
    """run_classify crashed after step 6, then run again with --resume; returns the resumed run's result."""
    import tunesmith.recipes.classify as recipe

    real_fit = recipe.fit

    def crash(step, record):
        if step == 6:
            raise Crash()

    monkeypatch.setattr(recipe, "fit", lambda *a, **kw: real_fit(*a, on_step=crash, **kw))
    with pytest.raises(Crash):
        recipe.run_classify(cfg, say=silent)
    monkeypatch.setattr(recipe, "fit", real_fit)
    return recipe.run_classify(cfg, resume=True, say=silent)


def test_a_run_interrupted_and_resumed_matches_an_uninterrupted_one(tokenizer, tmp_path, monkeypatch):
    import tunesmith.recipes.classify as recipe

    settings = ["train.max_steps=12", "train.save_every=4", "train.eval_every=null", "train.micro_batch_size=16",
                "train.schedule=cosine", "train.warmup_ratio=0.2"]
    whole = recipe.run_classify(tiny_cfg(tmp_path / "whole", *settings), say=silent)
    resumed = crashed_at_6_and_resumed(tiny_cfg(tmp_path / "part", *settings), monkeypatch)
    events = [json.loads(line) for line in (resumed.path / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "resumed" and "step-4" in e["message"] for e in events)

    ref, got = metrics_of(whole.path), metrics_of(resumed.path)
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for key in ("loss", "lr", "accuracy", "grad_norm"):
        assert [r[key] for r in got if "loss" in r] == pytest.approx([r[key] for r in ref if "loss" in r], rel=1e-6), key
    assert resumed.train_loss == pytest.approx(whole.train_loss, rel=1e-6)
    assert resumed.before == whole.before and resumed.after == whole.after


def test_lora_on_the_body_trains_adapters_and_head_and_saves_them(tokenizer, tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, "method.kind=lora", "method.lora.r=4", "method.lora.alpha=8", "train.max_steps=20",
                   "train.lr=0.01", "train.eval_every=null", "train.save_every=20")
    result, trained = run_capturing_model(cfg, monkeypatch)
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    marker = json.loads((result.path / "final" / "tunesmith.json").read_text())
    assert (marker["kind"], marker["head"], marker["labels"]) == ("adapter", "classify", ["animals", "food", "weather"])
    assert result.after["accuracy"] > result.before["accuracy"]
    model, same = reloaded_logits_equal(result.path, trained, tokenizer)
    assert same and model.config.id2label == {0: "animals", 1: "food", 2: "weather"}


def test_pissa_lora_resumes_exactly_and_saves_a_classifier_for_the_original_base(tokenizer, tmp_path, monkeypatch):
    """method.lora.init=pissa on the classifier's body: a resumed run takes the same residual base again (only
    the adapter is in the checkpoint) and logs what the uninterrupted one logs; final/ holds plain LoRA for
    the original base beside the trained head, and reloads computing the trained model's logits."""
    from tunesmith.config import ModelConfig
    from tunesmith.models import load_model_and_tokenizer

    settings = ["method.kind=lora", "method.lora.init=pissa", "method.lora.r=4", "method.lora.alpha=8",
                "train.max_steps=8", "train.save_every=4", "train.eval_every=null", "train.lr=0.01"]
    whole, trained = run_capturing_model(tiny_cfg(tmp_path / "whole", *settings), monkeypatch)
    resumed = crashed_at_6_and_resumed(tiny_cfg(tmp_path / "part", *settings), monkeypatch)
    ref, got = metrics_of(whole.path), metrics_of(resumed.path)
    assert [r["loss"] for r in got if "loss" in r] == pytest.approx([r["loss"] for r in ref if "loss" in r], rel=1e-6)
    assert resumed.after == whole.after

    config = json.loads((whole.path / "final" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["modules_to_save"]
    model, tok = load_model_and_tokenizer(ModelConfig(name=str(whole.path)), for_training=False)
    data = load_classification_data(ClassifyDataConfig(train=str(TOPICS / "test.jsonl"), validation_split=0),
                                    tokenizer, seed=0)
    batch = collate_labelled(data.train[:50], tok.pad_token_id)
    trained.eval()
    with torch.no_grad():
        torch.testing.assert_close(sequence_logits(model, batch), sequence_logits(trained, batch), rtol=0, atol=1e-4)


def test_validate_lists_bad_rows_through_the_cli(tmp_path):
    from test_cli import tunesmith

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok", "label": "a"}, {"text": "", "label": "b"},
                                              {"text": "ok", "label": "q"}])
    proc = tunesmith("validate", TINY, f"data.train={bad}", "data.labels=[a, b]", check=False)
    assert proc.returncode == 2 and "2 data problems" in proc.stderr
    assert "bad.jsonl:2: field 'text' is empty" in proc.stderr and "bad.jsonl:3: field 'label' unknown label 'q'" in proc.stderr
    ok = tunesmith("validate", TINY)
    assert "train_examples 600" in ok.stdout and "'animals', 'food', 'weather'" in ok.stdout
