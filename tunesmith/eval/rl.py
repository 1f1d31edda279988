"""Watching an RL run for reward hacking and mode collapse: warnings and a plot from `metrics.jsonl`.

A policy can raise its reward by exploiting the reward source rather than by getting better: its answers
grow long (a reward model that likes length), or all its samples become the same answer (mode collapse).
Both show in the metrics the RL loop logs every step: reward, kl, response_length, diversity (distinct
bigrams across a prompt's samples) and truncated (responses that never ended their turn).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def _window_mean(records: list[dict[str, Any]], key: str, first: bool) -> float | None:
    values = [r[key] for r in records if key in r]
    if not values:
        return None
    k = max(1, len(values) // 4)
    part = values[:k] if first else values[-k:]
    return sum(part) / len(part)


def watch(records: list[dict[str, Any]], max_new_tokens: int | None = None,
          max_rounds: int | None = None) -> list[str]:
    """Warnings comparing the run's first quarter of steps with its last quarter:

    - diversity collapse: reward rose while diversity fell below half its starting value;
    - length runaway: reward rose while the mean response length more than doubled, or most responses
      were cut off by the token budget at the end;
    - KL runaway: the KL to the reference ended above 10 nats per response;
    - idle groups: under half of the last quarter's prompts had samples that scored differently (the others
      give group advantages of 0), and `rollout.filter_groups` was off; or, with it on, the last quarter's
      steps mostly used up their `max_rounds` still short of such prompts.
    """
    reward0, reward1 = _window_mean(records, "reward", True), _window_mean(records, "reward", False)
    if reward0 is None or len(records) < 4:
        return []
    rising = reward1 > reward0
    out = []
    div0, div1 = _window_mean(records, "diversity", True), _window_mean(records, "diversity", False)
    if rising and div0 and div1 is not None and div1 < 0.5 * div0:
        out.append(f"reward rose ({reward0:.3f} -> {reward1:.3f}) while diversity collapsed ({div0:.2f} -> "
                   f"{div1:.2f} distinct bigrams): the samples converge on one answer; mode collapse unless the task "
                   "has one right answer (read samples/)")
    len0, len1 = _window_mean(records, "response_length", True), _window_mean(records, "response_length", False)
    trunc1 = _window_mean(records, "truncated", False)
    if rising and len0 and len1 is not None and len1 > 2 * len0:
        out.append(f"reward rose ({reward0:.3f} -> {reward1:.3f}) while responses grew {len1 / len0:.1f}x "
                   f"longer ({len0:.0f} -> {len1:.0f} tokens): check that length is not what is rewarded")
    if trunc1 is not None and trunc1 > 0.5:
        out.append(f"{trunc1:.0%} of responses run out of tokens without ending their turn"
                   + (f" (max_new_tokens {max_new_tokens})" if max_new_tokens else "")
                   + ": raise reward.missing_eos_penalty or rollout.max_new_tokens")
    varied1 = _window_mean(records, "varied_groups", False)
    if varied1 is not None and varied1 < 0.5 and not any("sampling_rounds" in r for r in records):
        out.append(f"only {varied1:.0%} of the last steps' prompts had samples that scored differently; the "
                   "others (every sample right, or every one wrong) taught nothing: rollout.filter_groups samples "
                   "further prompts in their place")
    if max_rounds is not None:
        last = [r for r in records if "sampling_rounds" in r][-max(1, len(records) // 4):]
        short = [r for r in last if r["sampling_rounds"] >= max_rounds and r.get("varied_groups", 1.0) < 1.0]
        if last and len(short) > len(last) / 2:
            out.append(f"{len(short)} of the last {len(last)} steps used all {max_rounds} rounds of sampling and "
                       "still trained on prompts whose samples all scored the same: most prompts are solved or out "
                       "of reach; raise rollout.max_rounds, or give prompts of the right difficulty")
    kl1 = _window_mean(records, "kl", False)
    if kl1 is not None and kl1 > 10:
        out.append(f"the KL to the reference reached {kl1:.1f} nats per response: the policy has drifted far; "
                   "raise rl.kl_coef or set rl.kl_target")
    return out


_REPORTED = ("reward", "kl", "response_length", "diversity", "truncated", "entropy", "varied_groups")


def report_markdown(records: list[dict[str, Any]], warnings: list[str]) -> str:
    """`eval/rl.md`: the watched metrics averaged over the first, middle and last quarter of the run, then
    the warnings (or that there were none)."""
    rows = [r for r in records if "reward" in r]
    if not rows:
        return "# RL run\n\nNo step was logged.\n"
    k = max(1, len(rows) // 4)
    mid = len(rows) // 2
    parts = {"first quarter": rows[:k], "middle": rows[max(0, mid - k // 2):max(1, mid - k // 2 + k)],
             "last quarter": rows[-k:]}
    lines = ["# RL run", "", f"{len(rows)} steps; each column averages {k} step(s).", "",
             "| metric | " + " | ".join(parts) + " |", "|---|" + "---|" * len(parts)]
    for key in _REPORTED:
        if any(key in r for r in rows):
            means = [sum(r.get(key, 0.0) for r in part) / len(part) for part in parts.values()]
            lines.append(f"| {key} | " + " | ".join(f"{m:.4g}" for m in means) + " |")
    lines += ["", "## Watch", ""] + ([f"- {w}" for w in warnings] or ["No warning: reward did not rise at the cost "
                                                                        "of diversity, length or KL."])
    return "\n".join(lines) + "\n"


def plot_rl(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Four panels over training: reward, KL, response length, diversity; and reward against KL."""
    rows = [r for r in records if "reward" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.6), dpi=100)
    for ax, key, label in zip(axes, ("reward", "kl", "response_length", "diversity"),
                              ("reward (mean)", "KL to reference (nats/response)", "response length (tokens)",
                               "diversity (distinct bigrams)")):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], linewidth=1.2)
        ax.set_xlabel("RL step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[4].scatter([r.get("kl", 0.0) for r in rows], [r["reward"] for r in rows], c=steps, cmap="viridis", s=12)
    axes[4].set_xlabel("KL to reference")
    axes[4].set_ylabel("reward")
    axes[4].set_title("reward against KL (colour: step)", fontsize=10)
    axes[4].grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
