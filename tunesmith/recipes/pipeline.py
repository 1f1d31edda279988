"""Sequential fine-tuning, top to bottom: measure the base model, run each stage from the previous stage's
result (with replay rows mixed in where configured), measure again after every language-model stage, and
write the forgetting report: every metric after every stage, with its change from the base model.

Layout under the pipeline's run directory:

    stages/NN-name/       each stage's own run directory (any recipe)
    replay/NN-name.jsonl  the rows replayed into stage NN
    eval/suite-*.json     the evaluation suite on the base model and after each stage
    eval/forgetting.{json,md,png}
    final/                the last language-model stage's result, with the pipeline's model card
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tunesmith._core import dist
from tunesmith._core.errors import DataError, TunesmithError
from tunesmith._core.rundir import RunDir, cached_result, record_settings, write_jsonl_atomic
from tunesmith._core.seed import seed_everything
from tunesmith.config import CHAIN_RECIPES, ModelConfig, PipelineConfig, as_paths, dump_config
from tunesmith.data.readers import read_rows
from tunesmith.eval import load_eval_items, score_items
from tunesmith.eval.forgetting import forgetting_markdown, forgetting_table, plot_forgetting
from tunesmith.eval.perplexity import perplexity
from tunesmith.models import load_model_and_tokenizer
from tunesmith.models.methods import is_mergeable
from tunesmith.recipes.result import RunResult


def measure(cfg: PipelineConfig, model_name: str, run: RunDir, key: str, say: Any) -> dict[str, float]:
    """The evaluation suite on `model_name` (the base or a stage's run directory), cached in
    eval/suite-<key>.json so a resumed pipeline does not measure twice, as long as the suite is the same
    (eval/suite-<key>.settings.json; a changed suite is measured again, so every column of the forgetting
    table is measured alike). Data parallel, every process measures its share of each task's prompts and
    of each text's rows, and process 0 writes the file."""
    cached = run.eval / f"suite-{key}.json"
    suite = cfg.eval.model_dump(mode="json", exclude={"batch_size"})
    if (kept := cached_result(cached, suite)) is not None:
        return kept
    say(f"[pipeline] measuring {key} ...")
    with dist.main_first():  # one process converts a GGUF file, the others read the result
        model, tokenizer = load_model_and_tokenizer(ModelConfig(**{**cfg.model.model_dump(), "name": model_name}),
                                                    seed=cfg.seed, for_training=False)
    if is_mergeable(model):
        model = model.merge_and_unload()  # same outputs, faster generation
    metrics: dict[str, float] = {}
    for task in cfg.eval.tasks:
        items = load_eval_items(task.task_file, limit=task.limit)
        result = score_items(model, tokenizer, items, max_new_tokens=task.max_new_tokens,
                             batch_size=cfg.eval.batch_size, shared=True)
        metrics[f"{task.name}/exact_match"] = result.metrics["exact_match"]
    for text in cfg.eval.perplexity:
        ppl = perplexity(model, tokenizer, text.file, limit=text.limit, max_seq_len=text.max_seq_len,
                         batch_size=cfg.eval.batch_size, shared=True)
        metrics[f"{text.name}/perplexity"] = ppl["perplexity"]
    if dist.is_main():
        cached.write_text(json.dumps(metrics, indent=2) + "\n")
        record_settings(cached, suite)
    return metrics


def write_replay(cfg: PipelineConfig, i: int, own: list[str], run: RunDir) -> tuple[Path, int]:
    """replay/NN-name.jsonl: ratio/(1-ratio) rows per own row, drawn (seeded, without replacement while the
    pool lasts) from the training files of the earlier sft stages it names. Returns (file, rows). Data
    parallel, process 0 writes it and every process returns once it is written."""
    replay = cfg.stages[i].replay
    assert replay is not None
    issues: list = []
    n_own = sum(1 for path in own for _ in read_rows(path, issues))
    pool = []
    for j in cfg.replay_sources(i):
        data = cfg.stage_config(j, cfg.model.name).data
        if data.train is None:
            raise TunesmithError(f"stage '{cfg.stages[i].name}': replay draws from data.train files, and stage "
                                 f"'{cfg.stages[j].name}' trains on a mixture")
        pool += [row for path in as_paths(data.train) for _, row in read_rows(path, issues)]
    DataError.raise_if_any(issues)
    n = round(replay.ratio / (1 - replay.ratio) * n_own)
    rng = random.Random(cfg.seed * 1000 + i)
    picked = []
    while len(picked) < n:  # whole shuffled passes over the pool, then part of one
        order = list(range(len(pool)))
        rng.shuffle(order)
        picked += order[:n - len(picked)]
    path = run.root / "replay" / f"{cfg.stage_dir(i).name}.jsonl"
    if dist.is_main():
        write_jsonl_atomic(path, (pool[k] for k in picked))
    dist.barrier()
    return path, n


def run_stage(stage_cfg: Any, stage_dir: Path, resume: bool, say: Any) -> dict[str, Any]:
    """Run one stage's recipe (or, resuming, finish it; a finished one is left as it is); its status."""
    from tunesmith.recipes import run_recipe

    status = RunDir(stage_dir).read_status() if (stage_dir / "status.json").exists() else {}
    if status.get("state") != "succeeded":
        run_recipe(stage_cfg, resume=resume and stage_dir.exists(), say=lambda m: say(f"  {m}"))
        status = RunDir(stage_dir).read_status()
    return status


def copy_final(source: Path, dest: Path, card: str) -> None:
    """Copy a stage's final/ as the pipeline's, with the pipeline's card; atomic like every final/."""
    tmp = Path(tempfile.mkdtemp(prefix="final.tmp-", dir=dest.parent))
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        (tmp / "README.md").write_text(card)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run_pipeline(cfg: PipelineConfig, *, resume: bool = False, say: Any = print) -> RunResult:
    """Run every stage in order with the evaluation suite around them; returns the base and final suites."""
    run = RunDir(Path(cfg.output_dir)).prepare(dump_config(cfg), resume)
    with run.guard(f"pipeline of {len(cfg.stages)} stages from {cfg.model.name}"):
        seed_everything(cfg.seed)
        columns = {"base": measure(cfg, cfg.model.name, run, "00-base", say)}
        run.truncate_metrics(-1)  # a resumed pipeline re-logs every suite
        run.log_metrics({"step": 0, "stage": "base", **columns["base"]})
        chain, chain_dir, steps, ran = cfg.model.name, None, 0, []
        for i, stage in enumerate(cfg.stages):
            stage_cfg = cfg.stage_config(i, chain)
            ran.append(stage_cfg)
            stage_dir = cfg.stage_dir(i)
            if stage.replay is not None:
                own = as_paths(stage_cfg.data.train)
                replay_file, n = write_replay(cfg, i, own, run)
                stage_cfg.data.train = [*own, str(replay_file)]
                say(f"[pipeline] stage {stage.name}: {n} replayed rows ({stage.replay.ratio:.0%}) in {replay_file}")
            say(f"[pipeline] stage {i + 1}/{len(cfg.stages)} '{stage.name}' ({stage_cfg.recipe}) from {chain}")
            status = run_stage(stage_cfg, stage_dir, resume, say)
            dist.barrier()  # data parallel: process 0 has saved the stage's result, which the next one starts from
            steps += status.get("step", 0)
            run.event("stage", f"stage '{stage.name}' finished", stage=stage.name, dir=str(stage_dir))
            if stage_cfg.recipe in CHAIN_RECIPES:
                chain, chain_dir = str(stage_dir), stage_dir
                columns[stage.name] = measure(cfg, chain, run, stage_dir.name, say)
                run.log_metrics({"step": i + 1, "stage": stage.name, **columns[stage.name]})
            run.set_status("running", step=i + 1, total_steps=len(cfg.stages))
        if not dist.is_main():  # data parallel: process 0 writes the report and the result
            return RunResult(run.root, steps, None, None, None, None, {"stages": len(cfg.stages)})

        table = forgetting_table(columns)
        (run.eval / "forgetting.json").write_text(json.dumps(table, indent=2) + "\n")
        report = forgetting_markdown(table)
        (run.eval / "forgetting.md").write_text(report)
        plot_forgetting(table, run.eval / "forgetting.png")
        say(report)
        if chain_dir is not None:
            stages = "\n".join(f"{k + 1}. `{s.name}`: {c.recipe} ({c.method.kind}"
                               f"{', stacked on the adapters before it' if s.adapter == 'stack' else ''}), "
                               f"run in {cfg.stage_dir(k)}" for k, (s, c) in enumerate(zip(cfg.stages, ran)))
            card = (f"# Sequentially fine-tuned from `{cfg.model.name}` with tunesmith\n\n## Stages\n\n{stages}\n\n"
                    f"## Evaluation after every stage\n\n{report}")
            copy_final(chain_dir / "final", run.final, card)
            run.event("saved", f"result saved to {run.final}")
        last = list(columns)[-1]
        run.set_status("succeeded", step=len(cfg.stages), total_steps=len(cfg.stages), before=columns["base"],
                       after=columns[last])
        run.event("finished", "pipeline succeeded")
        return RunResult(run.root, steps, None, None, columns["base"], columns[last], {"stages": len(cfg.stages)})
