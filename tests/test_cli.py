"""The CLI end to end on the tiny model: each examples/tiny config trains, checkpoints, saves and scores.

These run `tunesmith` in a subprocess exactly as a user would.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, chat, write_jsonl

TINY = sorted((ROOT / "examples" / "tiny").glob("sft-*.yaml"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def tunesmith(*args, check=True, **kw):
    proc = subprocess.run([sys.executable, "-m", "tunesmith.cli", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"tunesmith {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("config", TINY, ids=[p.stem for p in TINY])
def test_tiny_recipe_trains_and_writes_the_run_directory(config, tmp_path):
    out = tmp_path / "run"
    proc = tunesmith("train", config, f"output_dir={out}", "train.progress=false")
    assert "held-out exact match" in proc.stdout and str(out) in proc.stdout
    assert "trainable" in proc.stdout
    for name in ("config.yaml", "status.json", "metrics.jsonl", "events.jsonl", "final/tunesmith.json",
                 "final/README.md", "eval/before.json", "eval/after.json", "eval/report.md", "eval/loss.png"):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").iterdir())
    assert json.loads((out / "status.json").read_text())["state"] == "succeeded"
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))  # every step logged
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "val_loss" in r] == [6, 12]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-12", "step-8"]  # keep_last 2
    events = [e["event"] for e in read_jsonl(out / "events.jsonl")]
    assert events[0] == "started" and events[-1] == "finished" and "checkpoint" in events


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    args = ["examples/tiny/sft-lora.yaml", "train.max_steps=16", "train.save_every=4", "train.progress=false",
            "train.tensorboard=false", "eval.task_file=null", "data.packing=false", "data.max_seq_len=128"]
    tunesmith("train", *args, f"output_dir={tmp_path / 'whole'}")

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith.cli", "train", *args, f"output_dir={out}"],
                            cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-8").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert json.loads((out / "status.json").read_text())["state"] == "running"

    again = tunesmith("train", *args, f"output_dir={out}", check=False)
    assert again.returncode == 2 and "--resume" in again.stderr  # never silently overwrites a run
    tunesmith("train", *args, f"output_dir={out}", "--resume")
    whole = [(r["step"], r["loss"], r["lr"]) for r in read_jsonl(tmp_path / "whole" / "metrics.jsonl") if "loss" in r]
    resumed = [(r["step"], r["loss"], r["lr"]) for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [s for s, _, _ in resumed] == [s for s, _, _ in whole] == list(range(1, 17))
    assert [x for _, loss, lr in resumed for x in (loss, lr)] == pytest.approx(
        [x for _, loss, lr in whole for x in (loss, lr)], rel=1e-5)
    assert "resumed" in [e["event"] for e in read_jsonl(out / "events.jsonl")]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "lora"
    tunesmith("train", "examples/tiny/sft-lora.yaml", f"output_dir={out}", "train.progress=false",
              "train.max_steps=4", "eval.before=false")
    return out


def test_chat_generate_eval_and_merge_on_a_run(trained_run, tmp_path):
    one_shot = tunesmith("chat", trained_run, "--prompt", "Rewrite 4 March 2021 as ISO.", "--max-new-tokens", "8")
    assert one_shot.stdout.strip() != ""
    interactive = tunesmith("chat", trained_run, "--max-new-tokens", "4", input="hello\n\n")
    assert "model> " in interactive.stdout

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, chat("b", "reference to drop")])
    tunesmith("generate", trained_run, prompts, "-o", tmp_path / "out.jsonl", "--max-new-tokens", "4")
    rows = read_jsonl(tmp_path / "out.jsonl")
    assert len(rows) == 2 and all("completion" in r for r in rows)

    ev = tunesmith("eval", trained_run, "examples/data/dates/test.jsonl", "--limit", "5", "--out", tmp_path / "ev")
    assert json.loads(ev.stdout)["n"] == 5 and (tmp_path / "ev" / "test.json").exists()

    tunesmith("merge", trained_run, tmp_path / "merged")
    merged = tunesmith("eval", tmp_path / "merged", "examples/data/dates/test.jsonl", "--limit", "5")
    assert json.loads(merged.stdout)["exact_match"] == json.loads(ev.stdout)["exact_match"]


def test_validate_lists_every_bad_row_and_trains_nothing(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        chat("fine", "ok"),
        '{"messages": [',
        {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"prompt": "p", "completion": None},
    ])
    proc = tunesmith("validate", "examples/tiny/sft-lora.yaml", f"data.train={bad}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for where in ("bad.jsonl:2:", "bad.jsonl:3: field 'messages[0].role'", "bad.jsonl:4: field 'messages'",
                  "bad.jsonl:5: field 'completion'"):
        assert where in proc.stderr, (where, proc.stderr)
    assert "4 data problems" in proc.stderr
    proc = tunesmith("train", "examples/tiny/sft-lora.yaml", f"data.train={tmp_path / 'missing.jsonl'}",
                     f"output_dir={tmp_path / 'r'}", check=False)
    assert proc.returncode == 2 and "missing.jsonl: file not found" in proc.stderr
    assert json.loads((tmp_path / "r" / "status.json").read_text())["state"] == "failed"
    proc = tunesmith("train", "examples/tiny/sft-lora.yaml", "train.lr_rate=1", check=False)
    assert proc.returncode == 2 and "did you mean 'train.lr'" in proc.stderr


def test_help_does_not_import_torch():
    for module in ("tunesmith.cli", "tunesmith.models"):  # the models package loads torch on first use only
        code = f"import sys, {module}; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
        assert subprocess.run([sys.executable, "-c", code], env=ENV).returncode == 0, module
    assert "train" in tunesmith("--help").stdout


def test_counts_below_one_are_usage_errors_not_tracebacks(tmp_path):
    for args in (("data", "make", "dates", "--out", tmp_path / "d", "--train", "3", "--test", "-1"),
                 ("eval", "tiny", "examples/data/dates/test.jsonl", "--limit", "0")):
        proc = tunesmith(*args, check=False)
        assert proc.returncode == 2 and "greater than or equal to 1" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "d").exists()


def test_a_model_without_a_chat_template_is_one_error_and_takes_one_from_the_command_line(tmp_path):
    """A base model has no template: chat, generate and eval say so once (not once per row), and
    --chat-template gives one; a template that refuses a row names its file and line."""
    from tunesmith.api import export

    base = export("tiny", tmp_path / "base", format="hf-fp32")
    (base / "chat_template.jinja").unlink()
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "2+2?", "answer": "4"}\n{"prompt": "3+3?", "answer": "6"}\n')
    for args in (("chat", base, "-p", "hi"), ("generate", base, rows, "-o", tmp_path / "o.jsonl"),
                 ("eval", base, rows)):
        proc = tunesmith(*args, "--max-new-tokens", "2", check=False)
        assert proc.returncode == 2 and proc.stderr.count("has no chat template") == 1, proc.stderr[-500:]
    assert tunesmith("chat", base, "-p", "hi", "--max-new-tokens", "2", "--chat-template", "chatml").returncode == 0
    loud = tmp_path / "loud.jinja"
    loud.write_text("{% for m in messages %}{% if '3' in m['content'] %}{{ raise_exception('no threes') }}"
                    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    proc = tunesmith("generate", base, rows, "-o", tmp_path / "o.jsonl", "--chat-template", loud, check=False)
    assert proc.returncode == 2 and f"{rows}:2: field 'prompt'" in proc.stderr and "no threes" in proc.stderr
    assert not (tmp_path / "o.jsonl").exists()
