"""Text classification, top to bottom: labelled texts, a new K-way head on the last token, cross-entropy,
validation accuracy and macro-F1 before and after."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunesmith._core import dist
from tunesmith._core.rundir import RunDir
from tunesmith._core.seed import seed_everything
from tunesmith.config import ClassifyConfig, dump_config
from tunesmith.data.classification import ClassificationData, collate_labelled, load_classification_data
from tunesmith.eval.classification import classifier_metrics
from tunesmith.models import apply_method, describe_trainable, load_model_and_tokenizer, save_final
from tunesmith.models.reward import sequence_logits, to_sequence_classifier
from tunesmith.recipes.common import data_line, model_card
from tunesmith.recipes.result import RunResult
from tunesmith.training import fit
from tunesmith.training.plots import plot_loss_curve


def classification_loss(model: Any, batch: dict) -> tuple[Any, int, dict[str, float]]:
    """Cross-entropy summed over the batch's examples, -sum_e log softmax(z_e)[y_e] with logits z (E, K),
    counted per example (fit() divides by the examples of the whole accumulation window); also the
    number right, logged as the mean `accuracy`."""
    import torch.nn.functional as F

    logits = sequence_logits(model, batch)
    labels = batch["labels"].to(logits.device)
    correct = float((logits.argmax(-1) == labels).sum())
    return F.cross_entropy(logits, labels, reduction="sum"), batch["n_loss_tokens"], {"accuracy": correct}


def run_classify(cfg: ClassifyConfig, *, resume: bool = False, say: Any = print) -> RunResult:
    """Train a classifier as configured; `before`/`after` hold validation accuracy, macro-F1 and per-class
    scores."""
    run = RunDir(Path(cfg.output_dir)).prepare(dump_config(cfg), resume)
    with run.guard(f"classify with {cfg.method.kind} on {cfg.model.name}"):
        seed_everything(cfg.seed)
        say(f"loading model '{cfg.model.name}' ...")
        # No chat template: texts are tokenised as they are, so any causal LM can be the body.
        with dist.main_first():  # data parallel: one process converts a GGUF file, the others read the result
            lm, tokenizer = load_model_and_tokenizer(cfg.model, method=cfg.method.kind, seed=cfg.seed)
        data = load_classification_data(cfg.data, tokenizer, cfg.seed)
        say("data: " + ", ".join(f"{k} {v}" for k, v in data.stats.items()) + f"; classes {data.labels}")

        model = apply_method(to_sequence_classifier(lm, data.labels), cfg.method)
        say(describe_trainable(model))
        pad = tokenizer.pad_token_id

        def scores() -> dict[str, Any] | None:
            # data parallel: each process classifies its share of the rows, and every process gets them all
            return (classifier_metrics(model, data.validation, data.labels, pad, shared=True) if data.validation
                    else None)

        before = scores()
        result = fit(model, data.train, data.validation, cfg.train, run, pad_id=pad, seed=cfg.seed, resume=resume,
                     loss_fn=classification_loss, collate_fn=collate_labelled)
        after = scores()
        if not dist.is_main():  # data parallel: process 0 writes the scores and saves the result
            return RunResult(run.root, result.steps, result.train_loss, result.val_loss, before, after, data.stats)
        if before and after:
            (run.eval / "classify.json").write_text(json.dumps({"labels": data.labels, "before": before,
                                                                 "after": after}, indent=2))
            summary = (f"validation accuracy {before['accuracy']:.1%} -> {after['accuracy']:.1%}, macro-F1 "
                       f"{before['macro_f1']:.3f} -> {after['macro_f1']:.3f}")
            run.event("evaluation", summary, accuracy=after["accuracy"], macro_f1=after["macro_f1"])
            say(summary)

        save_final(model, tokenizer, run.final, base_model=cfg.model.name, method=cfg.method.kind,
                   base_seed=cfg.seed, head="classify", labels=data.labels, card=classifier_card(cfg, data, before, after))
        run.event("saved", f"result saved to {run.final}")
        plot_loss_curve(run.read_metrics(), run.eval / "loss.png")
        run.set_status("succeeded", step=result.steps, total_steps=result.steps, labels=data.labels,
                       before=before, after=after)
        run.event("finished", "run succeeded")
        return RunResult(run.root, result.steps, result.train_loss, result.val_loss, before, after, data.stats)


def classifier_card(cfg: ClassifyConfig, data: ClassificationData, before: dict | None, after: dict | None) -> str:
    """`final/README.md`: base, method, data, classes, settings, and the validation scores before and after."""
    card = model_card(cfg, "Text classifier from", f"recipe: classify ({len(data.labels)} classes, a new head on "
                      "the last token; the head always trains)", data_line(cfg.data.train, data.stats), None, None)
    card += f"- classes, in head order: {', '.join(f'{i} `{name}`' for i, name in enumerate(data.labels))}\n"
    if before and after:
        rows = [("accuracy", before["accuracy"], after["accuracy"]), ("macro-F1", before["macro_f1"], after["macro_f1"])]
        rows += [(f"F1 `{name}`", before["per_class"][name]["f1"], after["per_class"][name]["f1"]) for name in data.labels]
        card += (f"\n## Validation ({after['n_examples']} examples)\n\n| | before | after |\n|---|---|---|\n"
                 + "".join(f"| {what} | {_fmt(b)} | {_fmt(a)} |\n" for what, b, a in rows))
    return card


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
