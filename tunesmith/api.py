"""The Python API: everything the CLI does, one call away. Heavy imports happen inside each call."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tunesmith._core.rundir import write_jsonl_atomic
from tunesmith.config import AnyConfig, config_from_dict, load_config


def _overrides(overrides: dict[str, Any]) -> list[str]:
    """`train__lr=1e-3` (keyword-friendly) or {"train.lr": 1e-3} become the CLI's `train.lr=0.001`."""
    import json

    return [f"{k.replace('__', '.')}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]


def resolve_config(config: str | Path | dict | AnyConfig, **overrides: Any) -> AnyConfig:
    """A config from a YAML path, a dict or a config object, with keyword overrides applied."""
    extra = _overrides(overrides)
    if isinstance(config, (str, Path)):
        return load_config(config, extra)
    if isinstance(config, dict):
        return config_from_dict(config, extra)
    return config_from_dict(config.model_dump(mode="json"), extra) if extra else config


def train(config: str | Path | dict | AnyConfig, *, resume: bool = False, **overrides: Any) -> Any:
    """Run a recipe. `tunesmith.train("examples/quickstart.yaml", output_dir="runs/x", train__lr=1e-3)`.

    Returns a RunResult with the run directory, step count, losses and before/after metrics.
    """
    from tunesmith.recipes import run_recipe

    return run_recipe(resolve_config(config, **overrides), resume=resume)


def validate(config: str | Path | dict | AnyConfig, **overrides: Any) -> dict[str, Any]:
    """Check the config and every data row without training; raises DataError listing all bad rows."""
    cfg = resolve_config(config, **overrides)
    if cfg.recipe == "pipeline":  # every stage's data, with the base model's tokenizer (the chain keeps it)
        stages = [cfg.stage_config(i, cfg.model.name) for i in range(len(cfg.stages))]
        # `${stages.NAME}` in a stage is a run directory that exists only once the pipeline has run that far
        pending = {str(cfg.stage_dir(i)): c.recipe for i, c in enumerate(stages)}
        return {s.name: _validate(c, pending) for s, c in zip(cfg.stages, stages)}
    return _validate(cfg, {})


def _validate(cfg: AnyConfig, pending: dict[str, str]) -> dict[str, Any]:
    from tunesmith.data import load_preference_data, set_chat_template, validate_data
    from tunesmith.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    if cfg.recipe == "classify":  # texts are tokenised as they are: no chat template to check
        from tunesmith.data.classification import load_classification_data

        data = load_classification_data(cfg.data, tokenizer, cfg.seed)
        return {**data.stats, "labels": data.labels}
    set_chat_template(tokenizer, cfg.data.chat_template)
    if cfg.recipe == "dpo" and cfg.loss.name == "kto":
        from tunesmith.data.unpaired import load_unpaired_data

        return load_unpaired_data(cfg.data, tokenizer, cfg.seed).stats
    if cfg.recipe in ("reward", "dpo"):
        return load_preference_data(cfg.data, tokenizer, cfg.seed).stats
    if cfg.recipe in ("ppo", "grpo"):
        from tunesmith.data.prompts import load_prompts
        from tunesmith.rl.rewards import check_answers, check_reward_model, check_sources

        items, stats = load_prompts(cfg.data, tokenizer)
        check_answers(cfg.reward.sources, items)
        if cfg.rl.value_model is not None:
            check_reward_model(cfg.rl.value_model, pending, "rl.value_model")
        return {**stats, "reward_sources": check_sources(cfg.reward.sources, pending),
                "steps": cfg.total_steps(stats["prompts"])}
    return validate_data(cfg.data, tokenizer, cfg.seed)


def load(model: str, *, dtype: str = "auto", chat_template: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from `default`, `tiny`, an HF folder, a .gguf file or a run directory, in `dtype`
    (auto: bfloat16 on a GPU with bfloat16 arithmetic, else float32). `chat_template` (`chatml` or a Jinja
    file) replaces the tokenizer's, as `data.chat_template` does in training: for a base model without one."""
    from tunesmith._core.errors import TunesmithError
    from tunesmith.config import ModelConfig
    from tunesmith.data import set_chat_template
    from tunesmith.models import load_model_and_tokenizer
    from tunesmith.models.methods import is_mergeable

    if chat_template not in (None, "tokenizer", "chatml") and not Path(chat_template).is_file():
        raise TunesmithError(f"chat template '{chat_template}' is not 'chatml' or an existing Jinja file")
    mdl, tok = load_model_and_tokenizer(ModelConfig(name=str(model), dtype=dtype), for_training=False)
    if chat_template is not None:
        set_chat_template(tok, chat_template)
    if is_mergeable(mdl):
        mdl = mdl.merge_and_unload()  # an adapter folded into its base generates 2-3x faster
    return mdl, tok


def generate(model: Any, tokenizer: Any, prompts: list[str | list[dict]], *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
             batch_size: int = 32) -> list[str]:
    """Chat completions for user prompts (strings) or message lists, rendered with the chat template."""
    from tunesmith.data import end_of_turn_ids, render_prompt
    from tunesmith.models.generate import generate as _generate

    chats = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    ids = [render_prompt(tokenizer, c) for c in chats]
    outs = _generate(model, tokenizer, ids, stop_ids=end_of_turn_ids(tokenizer), max_new_tokens=max_new_tokens,
                     temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, batch_size=batch_size)
    return [o.text for o in outs]


def evaluate(model: str | tuple[Any, Any], task_file: str | Path, *, limit: int | None = None,
             max_new_tokens: int = 64, batch_size: int = 64, out_dir: str | Path | None = None,
             samples: int = 1, temperature: float = 1.0, seed: int = 0,
             chat_template: str | None = None) -> dict[str, Any]:
    """Score a model (a name/path, or a loaded (model, tokenizer) pair) on a task file by generation: greedy,
    or `samples` completions per prompt at `temperature`, with pass@k (`eval.generation.score_items`).
    `chat_template`: as in `load`."""
    from tunesmith._core.errors import TunesmithError
    from tunesmith.eval import load_eval_items, score_items, write_eval
    from tunesmith.eval.generation import sampling_problem

    if (problem := sampling_problem(samples, temperature)) is not None:  # before the model loads
        raise TunesmithError(problem)
    items = load_eval_items(str(task_file), limit=limit)  # every bad row is reported before the model loads
    mdl, tok = load(model, chat_template=chat_template) if isinstance(model, (str, Path)) else model
    result = score_items(mdl, tok, items, max_new_tokens=max_new_tokens, batch_size=batch_size, samples=samples,
                         temperature=temperature, seed=seed)
    if out_dir is not None:
        write_eval(result, Path(out_dir), Path(task_file).stem)
    return result.metrics


def make_pairs(model: str | tuple[Any, Any], task_file: str | Path, output: str | Path, *,
               limit: int | None = None, max_new_tokens: int = 64, batch_size: int = 64) -> dict[str, Any]:
    """Write on-policy preference pairs: for every task row the model answers wrongly, the reference answer
    is chosen over the model's own answer. Returns {"pairs", "prompts", and the model's task metrics}."""
    from tunesmith.eval import load_eval_items
    from tunesmith.eval.pairs import on_policy_pairs

    items = load_eval_items(str(task_file), limit=limit)  # every bad row is reported before the model loads
    mdl, tok = load(model) if isinstance(model, (str, Path)) else model
    rows, metrics = on_policy_pairs(mdl, tok, items, max_new_tokens=max_new_tokens, batch_size=batch_size)
    write_jsonl_atomic(Path(output), rows)
    return {"pairs": len(rows), "prompts": len(items), **metrics}


def make_scored_pairs(model: str | tuple[Any, Any], prompts_file: str | Path, output: str | Path, reward: str, *,
                      rubric: str | None = None, samples: int = 4, temperature: float = 1.0, seed: int = 0,
                      min_gap: float = 0.0, limit: int | None = None, max_new_tokens: int = 64,
                      batch_size: int = 64) -> dict[str, Any]:
    """Write preference pairs scored by a reward source: each prompt answered `samples` times, the best
    answer that ended its turn over the worst (`eval.pairs.scored_pairs`). `reward` is `KIND:NAME` as in
    `reward.sources` (`judge:MODEL` for AI feedback, `model:RUN`, `task:auto`, `function:file.py:fn`);
    `rubric` is a judge's. Returns the stats."""
    from tunesmith._core.errors import TunesmithError
    from tunesmith.config import RewardSourceConfig
    from tunesmith.eval import load_eval_items
    from tunesmith.eval.pairs import scored_pairs
    from tunesmith.rl.rewards import build_reward, check_answers, check_sources

    if samples < 2:
        raise TunesmithError(f"samples {samples}: a pair needs at least 2 answers to each prompt")
    kind, sep, name = reward.partition(":")
    if not sep or not name:
        raise TunesmithError(f"reward '{reward}' must be written KIND:NAME (judge:MODEL, model:RUN, task:auto, "
                             "function:file.py:fn)")
    try:
        source = RewardSourceConfig(kind=kind, name=name, rubric=rubric)
    except ValueError as err:
        raise TunesmithError(f"reward '{reward}': {err}") from None
    items = load_eval_items(str(prompts_file), limit=limit, answers=False)  # bad rows before a model loads
    check_answers([source], items)
    check_sources([source])
    mdl, tok = load(model) if isinstance(model, (str, Path)) else model
    rows, stats = scored_pairs(mdl, tok, items, build_reward([source], batch_size), samples=samples,
                               temperature=temperature, seed=seed, min_gap=min_gap, max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
    write_jsonl_atomic(Path(output), rows)
    return stats


def merge(source: str | Path, out_dir: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Merge a LoRA, DoRA, IA3 or QLoRA run (or adapter folder) into its base and save a plain HF model folder. An
    existing `out_dir` is refused unless `overwrite`; the source, or a folder holding it, always."""
    from tunesmith.models import merge_adapter

    return merge_adapter(source, Path(out_dir), dtype=dtype, overwrite=overwrite)


def export(source: str | Path, out: str | Path, *, format: str, overwrite: bool = False) -> Path:
    """Export a run, HF folder, .gguf, `default` or `tiny` as `gguf-f16` / `gguf-q8_0` (one .gguf file,
    adapters merged), `hf-fp32` / `hf-bf16` (a merged HF folder) or `peft` (an adapter run's adapter alone).
    An existing `out` is refused unless `overwrite`; the source, or a folder holding it, always."""
    from tunesmith.models.export import export_model

    return export_model(source, out, format=format, overwrite=overwrite)


def score(model: str | Path, input: str | Path, output: str | Path, *, batch_size: int = 16) -> int:
    """Write every pair of a preference file to `output` with `chosen_score` and `rejected_score` from a
    reward model; returns the number of pairs. Bad rows are reported before the model loads."""
    from tunesmith._core.errors import DataError, TunesmithError
    from tunesmith.data import read_preferences, tokenize_pair
    from tunesmith.data.formats import RowError, to_issue
    from tunesmith.eval.preference import score_pairs
    from tunesmith.models.methods import is_sequence_classifier

    issues: list = []
    pairs = read_preferences([str(input)], issues)
    DataError.raise_if_any(issues)
    mdl, tok = load(model)
    if not is_sequence_classifier(mdl) or mdl.config.num_labels != 1:  # a classifier's head has K outputs
        raise TunesmithError(f"{model} is not a reward model (train one with recipe: reward)")
    examples = []
    for pair in pairs:
        try:
            examples.append(tokenize_pair(tok, pair, max_seq_len=None))  # scored whole, never cut
        except RowError as err:
            issues.append(to_issue(err, pair.source))
    DataError.raise_if_any(issues)
    chosen, rejected = score_pairs(mdl, [[e] for e in examples], tok.pad_token_id, batch_size)
    write_jsonl_atomic(Path(output), ({"file": p.source.file, "line": p.source.line, "chosen": p.chosen.content,
                                       "rejected": p.rejected.content, "chosen_score": sc, "rejected_score": sr}
                                      for p, sc, sr in zip(pairs, chosen.tolist(), rejected.tolist())))
    return len(pairs)
