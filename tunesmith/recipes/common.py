"""What every recipe does the same way: load the starting model with its chat template, score a held-out
task by generation before and after training, save the result with its model card."""
from __future__ import annotations

from typing import Any, Callable

from tunesmith._core import dist
from tunesmith._core.rundir import RunDir, cached_result, record_settings
from tunesmith.config import LORA_METHODS, EvalConfig, MethodConfig, ModelConfig, QuantConfig
from tunesmith.data import set_chat_template
from tunesmith.eval import before_after_markdown, load_eval_items, score_items, write_eval
from tunesmith.models import load_model_and_tokenizer, save_final
from tunesmith.models.load import choose_dtype
from tunesmith.models.methods import is_mergeable
from tunesmith.training.plots import plot_loss_curve


def load_start(model_cfg: ModelConfig, method: str, chat_template: str, seed: int, say: Any,
               quant: QuantConfig | None = None, optimizer: str = "adamw",
               shard_optimizer: str = "off") -> tuple[Any, Any]:
    """(model, tokenizer) a recipe starts from, the tokenizer carrying the configured chat template, which
    `save_final` stores, so training, evaluation and every later use render prompts alike. `quant` is
    the quantised base of method qlora; `optimizer` and `shard_optimizer` (`train.*`) what `model.dtype:
    auto` counts."""
    dtype, why = choose_dtype(model_cfg, method, optimizer=optimizer, shard_optimizer=shard_optimizer)
    say(f"loading model '{model_cfg.name}'" + (f" in {dtype} (model.dtype auto: {why})" if why else "") + " ...")
    model_cfg = model_cfg.model_copy(update={"dtype": dtype})
    with dist.main_first():  # data parallel: one process converts a GGUF file, the others read the result
        model, tokenizer = load_model_and_tokenizer(model_cfg, method=method, seed=seed, quant=quant)
    set_chat_template(tokenizer, chat_template)
    return model, tokenizer


def evaluate_task(model: Any, tokenizer: Any, cfg: EvalConfig, run: RunDir, name: str, say: Any,
                  reward: Callable | None = None) -> dict[str, Any] | None:
    """Score `cfg.task_file` by generation (greedy, or `cfg.samples` sampled answers a prompt with pass@k);
    writes eval/<name>.json and .jsonl. A resumed run keeps the `before` score it measured the first
    time, if it was measured with the same eval settings (eval/before.settings.json); changed settings
    measure it again, so before and after are always scored alike. With `reward` ((items, completions) ->
    (scores, parts)), the metrics also hold the mean `reward` of the answers. Data parallel, every process
    calls it: each generates for its share of the prompts, all get the metrics, and process 0 writes them."""
    measured_as = cfg.model_dump(mode="json", exclude={"before", "batch_size"})
    if name == "before" and (kept := cached_result(run.eval / "before.json", measured_as)) is not None:
        return kept
    items = load_eval_items(cfg.task_file, limit=cfg.limit)
    say(f"evaluating {name} training on {len(items)} held-out prompts from {cfg.task_file} ...")
    result = score_items(model, tokenizer, items, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                         samples=cfg.samples, temperature=cfg.temperature, shared=True)
    if reward is not None:
        asked = [items[j // cfg.samples] for j in range(len(result.records))]  # a record per answer
        scores, parts = reward(asked, [r["completion"] for r in result.records])
        for record, score in zip(result.records, scores):
            record["reward"] = score
        result.metrics["reward"] = sum(scores) / len(scores)
        if len(parts) > 1:  # each source's own mean beside the weighted total
            result.metrics.update({f"reward/{k}": sum(v) / len(v) for k, v in parts.items()})
    if dist.is_main():
        write_eval(result, run.eval, name)
        if name == "before":
            record_settings(run.eval / "before.json", measured_as)
    run.event("evaluation", f"{name}: exact match {result.metrics['exact_match']:.1%}", **result.metrics)
    return result.metrics


def for_generation(model: Any) -> Any:
    """The trained model ready to generate: a LoRA/DoRA/IA3 adapter merged into its base (2-3x faster; call
    only after `final/` is saved); a quantised base's adapter and the unmergeable kinds stay as they are."""
    return model.merge_and_unload() if is_mergeable(model) else model


def method_settings(m: MethodConfig) -> str | None:
    """The model card's line of the method's own settings."""
    if m.kind in LORA_METHODS:
        line = f"LoRA r {m.lora.r}, alpha {m.lora.alpha}, dropout {m.lora.dropout}, targets {m.lora.target_modules}"
        if m.lora.rslora:
            line += " (rank-stabilised: scaled by alpha / sqrt(r))"
        q = m.quant
        if m.kind == "qlora":
            line += (f"; base in {q.bits} bits" + (f" ({q.type}, double quantisation {q.double_quant}, compute "
                                                   f"{q.compute_dtype})" if q.bits == 4 else " (LLM.int8)"))
        if m.lora.fp8_base:
            line += "; base weights in FP8 during training (e4m3, a scale per output row)"
        return line
    return {
        "freeze": f"trains the last {m.freeze.train_last_n_layers} blocks, head {m.freeze.train_lm_head}, "
                  f"final norm {m.freeze.train_norm}",
        "ia3": f"IA3 scales on {m.ia3.target_modules} (feed-forward: {m.ia3.feedforward_modules})",
        "prefix": f"prefix of {m.prefix.num_virtual_tokens} virtual tokens per layer"
                  + (f" through an MLP of width {m.prefix.projection_size}" if m.prefix.projection else ""),
        "prompt": f"soft prompt of {m.prompt.num_virtual_tokens} tokens"
                  + (f" initialised from {m.prompt.init_text!r}" if m.prompt.init_text else ""),
        "bottleneck": f"bottleneck adapters of width {m.bottleneck.size} after {', '.join(m.bottleneck.after)}, "
                      f"{m.bottleneck.activation}, scale {m.bottleneck.scale}",
    }.get(m.kind)


def data_line(train: Any, stats: dict) -> str:
    """The model card's data line: the files and their counts."""
    return f"{train} ({', '.join(f'{k} {v}' for k, v in stats.items())})"


def model_card(cfg: Any, title: str, recipe_line: str, data_line: str, before: dict | None,
               after: dict | None) -> str:
    """`final/README.md`: what was trained from what, on which data, with which settings, and the held-out
    scores when both exist. `cfg` is any recipe config with `model`, `method`, `train` and `eval`."""
    t, m = cfg.train, cfg.method
    stacked = " (a new adapter stacked on its adapters, which stay frozen)" if cfg.model.adapter == "stack" else ""
    plus = f" (LoRA's B matrices x {t.lora_plus_ratio}, LoRA+)" if t.lora_plus_ratio else ""
    lines = [f"# {title} `{cfg.model.name}` with tunesmith", "", f"- {recipe_line}, method: {m.kind}{stacked}",
             f"- data: {data_line}",
             f"- lr {t.lr}{plus}, schedule {t.schedule}, micro-batch {t.micro_batch_size} x accumulation "
             f"{t.grad_accum}, epochs {t.epochs}, max_steps {t.max_steps}"]
    if (settings := method_settings(m)):
        lines.append(f"- {settings}")
    if before and after:
        lines += ["", f"## Held-out evaluation ({cfg.eval.task_file})", "", before_after_markdown(before, after)]
    return "\n".join(lines) + "\n"


def save_and_score(model: Any, tokenizer: Any, cfg: Any, run: RunDir, before: dict | None,
                   card: Callable[[dict | None, dict | None], str], say: Any,
                   reward: Callable | None = None) -> dict | None:
    """Save `final/` (with `card(None, None)` as its README), plot the loss, then score the held-out task
    on the trained model; with a `before` score, write eval/report.md and the card with both. Returns the
    `after` metrics, or None without `eval.task_file`. Data parallel, every process calls it: process 0
    saves and writes, and all of them score (`evaluate_task`)."""
    if dist.is_main():
        save_final(model, tokenizer, run.final, base_model=cfg.model.name, method=cfg.method.kind,
                   base_seed=cfg.seed, card=card(None, None), quant=cfg.method.quant)
        run.event("saved", f"result saved to {run.final}")
        plot_loss_curve(run.read_metrics(), run.eval / "loss.png")
    if not cfg.eval.task_file:
        return None
    after = evaluate_task(for_generation(model), tokenizer, cfg.eval, run, "after", say, reward)
    if before and dist.is_main():
        (run.eval / "report.md").write_text(before_after_markdown(before, after))
        (run.final / "README.md").write_text(card(before, after))
    return after
