"""The forgetting report: every suite metric on the base model and after every stage, its change from the
base, and how far each one fell from its best value by the end (what later stages made the model forget)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def _higher_is_better(metric: str) -> bool:
    return not metric.endswith("perplexity")


def forgetting_table(columns: dict[str, dict[str, float]]) -> dict[str, Any]:
    """{"columns": [base, stage, ...], "metrics": {metric: [value per column]}, "change": {metric: [value −
    base]}, "forgotten": {metric: loss from its best value to the last, in the metric's bad direction}}."""
    names = list(columns)
    metrics = sorted({m for values in columns.values() for m in values})
    values = {m: [columns[c].get(m) for c in names] for m in metrics}
    change = {m: [None if v is None or vs[0] is None else v - vs[0] for v in vs] for m, vs in values.items()}
    forgotten = {}
    for m, vs in values.items():
        seen = [v for v in vs if v is not None]
        if seen:
            best = max(seen) if _higher_is_better(m) else min(seen)
            forgotten[m] = (best - seen[-1]) if _higher_is_better(m) else (seen[-1] - best)
    return {"columns": names, "metrics": values, "change": change, "forgotten": forgotten}


def _cell(value: float | None, delta: float | None, metric: str) -> str:
    if value is None:
        return ""
    pct = _higher_is_better(metric) and abs(value) <= 1
    text = f"{value:.1%}" if pct else f"{value:.3g}"
    if delta:
        text += f" ({delta * 100:+.1f} pt)" if pct else f" ({delta:+.3g})"
    return text


def forgetting_markdown(table: dict[str, Any]) -> str:
    """A markdown table: one row per metric, one column per measurement, changes from the base in brackets."""
    cols = table["columns"]
    lines = ["| metric | " + " | ".join(cols) + " | forgotten by the end |", "|---" * (len(cols) + 2) + "|"]
    for m, vs in table["metrics"].items():
        cells = [_cell(v, d, m) for v, d in zip(vs, table["change"][m])]
        lost = table["forgotten"].get(m)
        pct = _higher_is_better(m) and all(v is None or abs(v) <= 1 for v in vs)
        lost_text = "" if lost is None else f"{lost * 100:.1f} pt" if pct else f"{lost:.3g}"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {lost_text} |")
    return "\n".join(lines) + "\n"


def plot_forgetting(table: dict[str, Any], path: Path) -> Path | None:
    """Accuracies (left) and perplexities (right) after every stage; None when there is nothing to plot."""
    if not table["metrics"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [[m for m in table["metrics"] if _higher_is_better(m)],
              [m for m in table["metrics"] if not _higher_is_better(m)]]
    groups = [g for g in groups if g]
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), dpi=100, squeeze=False)
    x = list(range(len(table["columns"])))
    for ax, group in zip(axes[0], groups):
        for m in group:
            ax.plot(x, [float("nan") if v is None else v for v in table["metrics"][m]], "o-", label=m)
        ax.set_xticks(x, table["columns"])
        ax.set_xlabel("after stage")
        ax.set_ylabel("perplexity" if not _higher_is_better(group[0]) else "score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
