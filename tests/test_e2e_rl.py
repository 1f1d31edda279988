"""End to end on the real default model: examples/grpo.yaml's path (LoRA, verifiable reward, adapter-off
reference, before/after evaluation) runs through the CLI, shortened to a few steps. The full-length
figures are in docs/rl.md."""
import json
import subprocess
import sys

import pytest

from test_cli import ENV, ROOT
from tunesmith.tasks.arithmetic import final_number


@pytest.mark.slow
def test_grpo_on_the_default_model_runs_end_to_end(tmp_path):
    out = tmp_path / "grpo"
    proc = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", "examples/grpo.yaml", f"output_dir={out}",
                           "train.progress=false", "train.max_steps=2", "rollout.prompts_per_step=2",
                           "rollout.samples_per_prompt=4", "eval.limit=16", "sample_every=1"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # LoRA starts as its adapter-off reference
    assert records[1]["kl"] > 0  # one update moved it
    assert all(0.0 <= r["reward/task:auto"] <= 1.0 for r in records)
    samples = [json.loads(x) for x in (out / "samples" / "step-1.jsonl").read_text().splitlines()]
    # the task's own check of the last number, minus reward.missing_eos_penalty (0.1) when cut off
    assert len(samples) == 8
    for s in samples:
        expected = final_number(s["reference"], s["completion"]) - 0.1 * (not s["finished"])
        assert s["reward"] == pytest.approx(expected, abs=1e-6), s
    before = json.loads((out / "eval" / "before.json").read_text())
    after = json.loads((out / "eval" / "after.json").read_text())
    assert before["n"] == after["n"] == 16 and "reward" in before and "reward" in after
    assert (out / "final" / "adapter_model.safetensors").is_file()
