"""End to end on the real default model: the README's main job really improves the held-out score."""
import json
import subprocess
import sys

import pytest

from test_cli import ENV, ROOT


@pytest.mark.slow
def test_quickstart_improves_held_out_exact_match(tmp_path):
    out = tmp_path / "quickstart"
    proc = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", "examples/quickstart.yaml",
                           f"output_dir={out}", "train.progress=false"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = json.loads((out / "eval" / "before.json").read_text())
    after = json.loads((out / "eval" / "after.json").read_text())
    assert before["n"] == after["n"] == 200
    assert before["exact_match"] < 0.3 and after["exact_match"] > 0.8
    assert after["stops_cleanly"] > 0.95  # the end-of-turn token was trained
    assert "held-out exact match" in proc.stdout
    # the saved result scores the same when loaded back through `tunesmith eval`
    ev = subprocess.run([sys.executable, "-m", "tunesmith.cli", "eval", str(out), "examples/data/dates/test.jsonl",
                         "--limit", "40", "--max-new-tokens", "16"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr[-2000:]
    samples = [json.loads(line) for line in (out / "eval" / "after.samples.jsonl").read_text().splitlines()][:40]
    assert json.loads(ev.stdout)["exact_match"] == pytest.approx(sum(s["score"] for s in samples) / 40, abs=0.05)
