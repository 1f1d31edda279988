"""Evaluation reports: metrics as JSON, every sample as JSONL, and a short Markdown summary to read."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tunesmith._core.rundir import write_jsonl_atomic
from tunesmith.eval.generation import EvalResult

FAILURES_SHOWN = 5


def write_eval(result: EvalResult, out_dir: str | Path, name: str) -> None:
    """Write `name.json` (metrics), `name.samples.jsonl` (one record per item) and `name.md` into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result.metrics, indent=2) + "\n", encoding="utf-8")
    write_jsonl_atomic(out / f"{name}.samples.jsonl", result.records)
    (out / f"{name}.md").write_text(summary_markdown(result, name), encoding="utf-8")


def summary_markdown(result: EvalResult, name: str) -> str:
    """Metrics table plus the first few failing samples, which usually say more than the number."""
    lines = [f"# Evaluation: {name}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in result.metrics.items()]
    failures = [r for r in result.records if r["score"] < 1.0]
    lines += ["", f"{len(failures)} of {len(result.records)} samples scored below 1."]
    for r in failures[:FAILURES_SHOWN]:
        stopped = "stopped" if r["finished"] else "cut off at the token budget"
        lines += ["", f"### {r['file']}:{r['line']} (score {_fmt(r['score'])}, {stopped})", "",
                  "prompt:", _fenced(r.get("prompt", "")), "expected:", _fenced(r["reference"]),
                  "got:", _fenced(r["completion"])]
    return "\n".join(lines) + "\n"


def before_after_markdown(before: dict[str, Any], after: dict[str, Any]) -> str:
    """A Markdown table `metric | before | after | change` over the metrics of either run."""
    keys = list(before) + [k for k in after if k not in before]
    lines = ["| metric | before | after | change |", "|---|---|---|---|"]
    for key in keys:
        b, a = before.get(key), after.get(key)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
        change = _fmt(a - b, signed=True) if numeric else ""
        lines.append(f"| {key} | {_fmt(b)} | {_fmt(a)} | {change} |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any, signed: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:+.4g}" if signed else f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool) and signed:
        return f"{value:+d}"
    return str(value)


def _fenced(text: str) -> str:
    # A fence longer than any backtick run inside, so model output cannot break the Markdown.
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"
