"""Evaluation: task metrics from greedy generation, and the reports written under `runs/<name>/eval/`."""
from tunesmith.eval.generation import EvalItem, EvalResult, load_eval_items, score_completion, score_items
from tunesmith.eval.report import before_after_markdown, summary_markdown, write_eval

__all__ = ["EvalItem", "EvalResult", "load_eval_items", "score_completion", "score_items",
           "before_after_markdown", "summary_markdown", "write_eval"]
