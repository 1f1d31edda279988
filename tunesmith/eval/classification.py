"""Classifier metrics: accuracy, macro-F1 and each class's precision, recall and F1."""
from __future__ import annotations

from typing import Any, Sequence

from tunesmith._core import dist
from tunesmith._core.batches import in_batches
from tunesmith._core.modes import evaluating
from tunesmith.data.classification import LabelledExample, collate_labelled
from tunesmith.models.reward import sequence_logits


def classification_metrics(predicted: Sequence[int], gold: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """accuracy = mean(pred == gold); per class c: precision TP/(TP+FP), recall TP/(TP+FN),
    F1 = 2TP / (2TP + FP + FN), 0 where a denominator is 0 (a class never predicted has precision 0).
    macro_f1 averages F1 over the classes that occur in `gold` or `predicted` (as scikit-learn does
    without `labels=`); a class absent from both has F1 None and is left out of the average."""
    assert len(predicted) == len(gold) > 0, (len(predicted), len(gold))
    per_class: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(labels):
        tp = sum(p == c and g == c for p, g in zip(predicted, gold))
        fp = sum(p == c and g != c for p, g in zip(predicted, gold))
        fn = sum(p != c and g == c for p, g in zip(predicted, gold))
        seen = tp + fp + fn > 0
        per_class[name] = {"precision": tp / (tp + fp) if tp + fp else 0.0,
                           "recall": tp / (tp + fn) if tp + fn else 0.0,
                           "f1": 2 * tp / (2 * tp + fp + fn) if seen else None, "support": tp + fn}
    f1s = [m["f1"] for m in per_class.values() if m["f1"] is not None]
    return {"accuracy": sum(p == g for p, g in zip(predicted, gold)) / len(gold), "macro_f1": sum(f1s) / len(f1s),
            "n_examples": len(gold), "per_class": per_class}


def predict(model: Any, rows: Sequence[LabelledExample], pad_id: int, batch_size: int = 32,
            shared: bool = False) -> list[int]:
    """The arg-max class of every row, in eval mode without gradients. `shared` (data parallel): each
    process classifies rows r, r + N, ..., and every process gets every class, in row order."""
    import torch

    mine = dist.share(rows) if shared else rows
    with evaluating(model), torch.no_grad():
        parts = in_batches(len(mine), batch_size, lambda start, stop: sequence_logits(
            model, collate_labelled(mine[start:stop], pad_id)).argmax(-1).tolist(), "classification")
    predicted = [label for part in parts for label in part]
    return dist.gather_shares(predicted, len(rows)) if shared else predicted


def classifier_metrics(model: Any, rows: Sequence[LabelledExample], labels: Sequence[str], pad_id: int,
                       batch_size: int = 32, shared: bool = False) -> dict[str, Any]:
    """`classification_metrics` of the model's predictions on `rows` (`shared`: as in `predict`)."""
    return classification_metrics(predict(model, rows, pad_id, batch_size, shared), [r.label for r in rows],
                                  labels)
