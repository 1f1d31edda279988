"""The `tunesmith` command. Start-up stays fast: torch and transformers load only inside a command."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Post-train causal language models: fine-tune, evaluate, chat, merge, export.")
data_app = typer.Typer(no_args_is_help=True, help="Generate checkable task datasets and on-policy preference pairs.")
app.add_typer(data_app, name="data")


def _quiet_libraries() -> None:
    import logging
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside transformers / peft
    # bitsandbytes on a CPU warns at import that an optional hub kernel package is missing; PEFT imports it
    # for every adapter method, 4-bit or not
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging  # every command that calls this loads it anyway

    hf_logging.disable_progress_bar()  # per-tensor loading bars; tunesmith prints its own progress


@app.command()
def train(config: Path = typer.Argument(..., help="YAML config file."),
          overrides: Optional[List[str]] = typer.Argument(None, help="key.sub=value overrides."),
          resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint.")) -> None:
    """Fine-tune as the config says; prints the held-out metric before and after."""
    _quiet_libraries()
    from tunesmith.config import load_config
    from tunesmith.recipes import run_recipe

    from tunesmith._core.dist import launched_rank

    result = run_recipe(load_config(config, overrides or []), resume=resume)
    if launched_rank():  # data parallel (torchrun): process 0 reports
        return
    typer.echo("")
    if (result.path / "eval" / "forgetting.md").exists():  # a pipeline printed its report already
        typer.echo(f"forgetting report: {result.path / 'eval' / 'forgetting.md'} (and forgetting.png)")
    elif result.before and "exact_match" in result.before and result.after:
        b, a = result.before["exact_match"], result.after["exact_match"]
        typer.echo(f"held-out exact match: {b:.1%} before -> {a:.1%} after "
                   f"(stops cleanly {result.before['stops_cleanly']:.0%} -> {result.after['stops_cleanly']:.0%})")
    elif result.before and "macro_f1" in result.before and result.after:
        typer.echo(f"validation accuracy: {result.before['accuracy']:.1%} before -> {result.after['accuracy']:.1%} "
                   f"after, macro-F1 {result.before['macro_f1']:.3f} -> {result.after['macro_f1']:.3f} "
                   f"({result.after['n_examples']} examples)")
    elif result.before and "accuracy" in result.before and result.after:
        typer.echo(f"validation pairwise accuracy: {result.before['accuracy']:.1%} before -> "
                   f"{result.after['accuracy']:.1%} after ({result.after['n_pairs']} pairs)")
    elif result.after:
        typer.echo(f"held-out exact match after training: {result.after['exact_match']:.1%}")
    if (result.path / "eval" / "pairwise.json").exists():
        use = f"score with it: tunesmith score {result.path}"
    elif (result.path / "eval" / "classify.json").exists():
        use = f"load it with tunesmith.load('{result.path}')"
    else:
        use = f"chat with it: tunesmith chat {result.path}"
    typer.echo(f"run directory: {result.path}  ({use})")


@app.command()
def validate(config: Path = typer.Argument(..., help="YAML config file."),
             overrides: Optional[List[str]] = typer.Argument(None, help="key.sub=value overrides.")) -> None:
    """Check the config and every data row; trains nothing."""
    _quiet_libraries()
    from tunesmith.api import validate as run_validate
    from tunesmith.config import load_config

    stats = run_validate(load_config(config, overrides or []))
    typer.echo("config and data are valid: " + ", ".join(f"{k} {v}" for k, v in stats.items()))


TEMPLATE_HELP = ("`chatml` or a Jinja file in place of the tokenizer's chat template (for a base model without "
                 "one; training sets it with data.chat_template).")


@app.command()
def chat(model: str = typer.Argument(..., help="Run directory, HF folder, .gguf file, `default` or `tiny`."),
         prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Answer one prompt and exit."),
         system: Optional[str] = typer.Option(None, help="System message."),
         max_new_tokens: int = typer.Option(256, min=1, help="Longest reply."),
         temperature: float = typer.Option(0.0, min=0, help="0 is greedy."),
         seed: int = typer.Option(0),
         chat_template: Optional[str] = typer.Option(None, help=TEMPLATE_HELP)) -> None:
    """Talk to a model: interactive, or one shot with --prompt."""
    _quiet_libraries()
    from tunesmith._core.errors import TunesmithError
    from tunesmith.api import generate, load

    mdl, tok = load(model, chat_template=chat_template)
    history: list[dict] = [{"role": "system", "content": system}] if system else []

    def reply(text: str) -> str:
        history.append({"role": "user", "content": text})
        try:
            answer = generate(mdl, tok, [list(history)], max_new_tokens=max_new_tokens,
                              temperature=temperature, seed=seed)[0]
        except ValueError as err:  # the chat template refused the conversation: the turn is taken back
            history.pop()
            raise TunesmithError(str(err)) from None
        history.append({"role": "assistant", "content": answer})
        return answer

    if prompt is not None:
        typer.echo(reply(prompt))
        return
    typer.echo("chatting with " + model + " (empty line or Ctrl-D to quit)")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        try:
            typer.echo("model> " + reply(text))
        except TunesmithError as err:  # one refused turn does not end the session
            typer.secho(f"error: {err}", fg="red", err=True)


@app.command()
def generate(model: str = typer.Argument(..., help="Run directory, HF folder, .gguf file, `default` or `tiny`."),
             input: Path = typer.Argument(..., help="JSONL of {\"prompt\": ...} or {\"messages\": [...]} rows."),
             output: Path = typer.Option(..., "--output", "-o", help="JSONL to write, one completion per row."),
             max_new_tokens: int = typer.Option(256, min=1), temperature: float = typer.Option(0.0, min=0),
             batch_size: int = typer.Option(32, min=1), seed: int = typer.Option(0),
             chat_template: Optional[str] = typer.Option(None, help=TEMPLATE_HELP)) -> None:
    """Generate a completion for every prompt of a JSONL file."""
    _quiet_libraries()
    from tunesmith._core.rundir import write_jsonl_atomic
    from tunesmith.api import load
    from tunesmith.data import end_of_turn_ids
    from tunesmith.data.dataset import read_prompts
    from tunesmith.data.prompts import PromptItem
    from tunesmith.eval.generation import rendered_prompts
    from tunesmith.models.generate import generate as run_generate

    read = read_prompts(str(input))  # every bad row is reported before the model loads
    mdl, tok = load(model, chat_template=chat_template)
    # the prompt ids; rows the chat template refuses are named by file and line
    ids = rendered_prompts(tok, [PromptItem(msgs, None, None, row, source) for row, msgs, source in read])
    outs = run_generate(mdl, tok, ids, stop_ids=end_of_turn_ids(tok), max_new_tokens=max_new_tokens,
                        temperature=temperature, seed=seed, batch_size=batch_size)
    write_jsonl_atomic(output, ({**row, "completion": out.text} for (row, _, _), out in zip(read, outs)))
    typer.echo(f"wrote {len(outs)} completions to {output}")


@app.command("eval")
def eval_(model: str = typer.Argument(..., help="Run directory, HF folder, .gguf file, `default` or `tiny`."),
          task_file: Path = typer.Argument(..., help="JSONL of chats whose last assistant turn is the answer."),
          limit: Optional[int] = typer.Option(None, min=1, help="Score only the first N rows."),
          max_new_tokens: int = typer.Option(64, min=1), batch_size: int = typer.Option(64, min=1),
          out: Optional[Path] = typer.Option(None, help="Folder for the JSON/Markdown report and samples."),
          samples: int = typer.Option(1, help="Completions sampled per prompt; above 1, pass@k is reported."),
          temperature: float = typer.Option(1.0, help="Sampling temperature when --samples is above 1."),
          seed: int = typer.Option(0, help="Seed of the sampled completions."),
          chat_template: Optional[str] = typer.Option(None, help=TEMPLATE_HELP)) -> None:
    """Score a model on a task file by generation (exact match, clean stops; pass@k with --samples)."""
    _quiet_libraries()
    from tunesmith.api import evaluate

    metrics = evaluate(model, task_file, limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       out_dir=out, samples=samples, temperature=temperature, seed=seed,
                       chat_template=chat_template)
    typer.echo(json.dumps(metrics, indent=2))


@app.command()
def merge(source: str = typer.Argument(..., help="Run directory or adapter folder."),
          out: Path = typer.Argument(..., help="Folder for the merged HF model."),
          dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
          overwrite: bool = typer.Option(False, help="Replace OUT if it exists.")) -> None:
    """Merge a LoRA, DoRA, IA3 or QLoRA adapter into its base model and save an HF folder."""
    _quiet_libraries()
    from tunesmith.api import merge as run_merge

    typer.echo(f"merged model saved to {run_merge(source, out, dtype=dtype, overwrite=overwrite)}")


@app.command()
def export(source: str = typer.Argument(..., help="Run directory, HF folder, .gguf file, `default` or `tiny`."),
           out: Path = typer.Argument(..., help="The .gguf file (gguf-*) or the folder (hf-*, peft) to write."),
           fmt: str = typer.Option(..., "--format", help="gguf-f16, gguf-bf16, gguf-q8_0, gguf-f32, hf-fp32, "
                                                             "hf-bf16, hf-fp16 or peft."),
           overwrite: bool = typer.Option(False, help="Replace OUT if it exists.")) -> None:
    """Export a model: GGUF for llama.cpp (adapters merged), a merged HF folder, or a PEFT adapter."""
    _quiet_libraries()
    from tunesmith.api import export as run_export

    typer.echo(f"exported {source} as {fmt} to {run_export(source, out, format=fmt, overwrite=overwrite)}")


@app.command()
def score(model: str = typer.Argument(..., help="A reward run directory (recipe: reward) or its final/ folder."),
          input: Path = typer.Argument(..., help="JSONL of preference rows (pairs, OpenAI DPO, rankings)."),
          output: Path = typer.Option(..., "--output", "-o", help="JSONL with a score per response."),
          batch_size: int = typer.Option(16)) -> None:
    """Score every response of a preference file with a reward model."""
    _quiet_libraries()
    from tunesmith.api import score as run_score

    rows = run_score(model, input, output, batch_size=batch_size)
    typer.echo(f"wrote {rows} scored rows to {output}")


@app.command()
def setup() -> None:
    """Convert the bundled default model (SmolLM2-135M-Instruct) once into the local cache."""
    _quiet_libraries()
    from tunesmith.models import default_model_dir

    typer.echo(f"default model ready at {default_model_dir()}")


@data_app.command("make")
def data_make(task: str = typer.Argument(..., help="Task name, e.g. dates, json_fields, addition, topics (classification)."),
              out: Path = typer.Option(..., "--out", help="Folder for train.jsonl and test.jsonl."),
              train: int = typer.Option(480, min=1), test: int = typer.Option(200, min=1), seed: int = typer.Option(0),
              preferences: bool = typer.Option(False, "--preferences",
                                               help="Preference pairs: right and terse over wrong or rambling."),
              judge: bool = typer.Option(False, "--judge", help="Rows that teach a judge to rate answers (two per "
                                                                 "prompt: the right one 9, a chatty one 5, a wrong "
                                                                 "one 1).")) -> None:
    """Write a task's train and held-out test files."""
    from tunesmith.tasks import write_task_files

    paths = write_task_files(task, out, train, test, seed, preferences=preferences, judge=judge)
    typer.echo("wrote " + " and ".join(str(p) for p in paths))


@data_app.command("pairs")
def data_pairs(model: str = typer.Argument(..., help="Run directory, HF folder, .gguf file, `default` or `tiny`."),
               task_file: Path = typer.Argument(..., help="Task JSONL (rows with an answer, e.g. from data make)."),
               output: Path = typer.Option(..., "--output", "-o", help="JSONL of preference pairs to write."),
               limit: Optional[int] = typer.Option(None, min=1, help="Use only the first N rows."),
               max_new_tokens: int = typer.Option(64), batch_size: int = typer.Option(64)) -> None:
    """On-policy preference pairs: the reference answer over the model's own wrong answer."""
    _quiet_libraries()
    from tunesmith.api import make_pairs

    stats = make_pairs(model, task_file, output, limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size)
    typer.echo(f"wrote {stats['pairs']} pairs to {output} (the model answered {stats['exact_match']:.1%} of "
               f"{stats['prompts']} prompts right; those give no pair)")


@data_app.command("scored-pairs")
def data_scored_pairs(
        model: str = typer.Argument(..., help="Run directory, HF folder, .gguf file, `default` or `tiny`."),
        prompts: Path = typer.Argument(..., help="Prompt JSONL (chat rows; an answer is optional)."),
        output: Path = typer.Option(..., "--output", "-o", help="JSONL of preference pairs to write."),
        reward: str = typer.Option(..., help="KIND:NAME as in reward.sources: judge:MODEL (AI feedback), model:RUN, "
                                             "task:auto, function:file.py:fn."),
        rubric: Optional[str] = typer.Option(None, help="A judge's rubric: text or a .txt file."),
        samples: int = typer.Option(4, help="Answers sampled for each prompt."),
        temperature: float = typer.Option(1.0), seed: int = typer.Option(0),
        min_gap: float = typer.Option(0.0, help="Keep a pair only where the scores differ by more."),
        limit: Optional[int] = typer.Option(None, min=1, help="Use only the first N rows."),
        max_new_tokens: int = typer.Option(64), batch_size: int = typer.Option(64)) -> None:
    """Preference pairs scored by a reward source: each prompt answered several times, the best answer that
    ended its turn chosen over the worst (with --reward judge:MODEL, AI feedback for DPO)."""
    _quiet_libraries()
    from tunesmith.api import make_scored_pairs

    stats = make_scored_pairs(model, prompts, output, reward, rubric=rubric, samples=samples, temperature=temperature,
                              seed=seed, min_gap=min_gap, limit=limit, max_new_tokens=max_new_tokens,
                              batch_size=batch_size)
    typer.echo(f"wrote {stats['pairs']} pairs from {stats['prompts']} prompts to {output} (mean score "
               f"{stats['mean_score']:.3f}, mean gap {stats['mean_gap']:.3f})")


@app.command("config-reference")
def config_reference() -> None:
    """Print the Markdown table of every config key."""
    from tunesmith.config import reference_markdown

    typer.echo(reference_markdown(), nl=False)


def main() -> None:
    """Entry point: user mistakes print one clear message (exit 2), not a traceback."""
    from tunesmith._core.errors import TunesmithError

    try:
        app()
    except TunesmithError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
