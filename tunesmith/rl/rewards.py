"""Reward sources behind one signature: `(items, completions) -> list[float]`, one score per completion.

`items` are `tunesmith.data.prompts.PromptItem`s (the chat so far, the reference answer, the task and the
raw row); `completions` are the response texts. Sources:

- `task`: a checkable task's `reward` (exact match, or the task's partial credit), by name or `auto`
  (each row's own `task`; a row without a known task scores exact match on its answer);
- `function`: any Python function `fn(prompts, completions, rows) -> list[float]` named `module:function`
  or `path/to/file.py:function`, where prompts are lists of {role, content} dicts and rows the raw rows;
- `model`: a reward model trained by `recipe: reward`, scoring prompt + response rendered with its own
  chat template and read at the end-of-turn token;
- `judge`: a chat model asked to rate the response on a rubric (AI feedback, as RLAIF and G-Eval use an
  LLM judge): the score is its expected rating, from its next-token probabilities over the ratings 1-9
  after "Rating:", mapped to 0..1, with no sampling.

`CombinedReward` sums several with weights and keeps each source's scores for the metrics.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from tunesmith._core.errors import DataError, DataIssue, TunesmithError
from tunesmith.tasks import TASKS, exact_match, get_task
from tunesmith.tasks.judge import DEFAULT_RUBRIC, JUDGE_ANSWER, RATINGS, judge_question

RewardFn = Callable[[Sequence[Any], Sequence[str]], list[float]]


def task_reward(name: str = "auto") -> RewardFn:
    """Scores from a checkable task: `auto` uses each row's `task`, else the named task for every row."""
    forced = None if name == "auto" else get_task(name)

    def reward(items: Sequence[Any], completions: Sequence[str]) -> list[float]:
        out = []
        _require_answers(items)
        for item, completion in zip(items, completions):
            task = forced or (TASKS.get(item.task) if item.task else None)
            if task is None:
                out.append(exact_match(item.reference, completion))
            else:  # tasks read `answer`; the reference may have come from the assistant message
                out.append(float(task.reward({**item.row, "answer": item.reference}, completion)))
        return out

    return reward


def check_answers(sources: Sequence[Any], items: Sequence[Any]) -> None:
    """A task source checks each answer against the row's reference: rows that give none (a question
    alone, which other sources take) are one DataError naming them, before anything runs."""
    if any(s.kind == "task" for s in sources):
        _require_answers(items)


def _require_answers(items: Sequence[Any]) -> None:
    DataError.raise_if_any([DataIssue(it.source.file, it.source.line, "answer", "is missing: the task reward "
                                      "checks the model's answer against it") for it in items if it.reference is None])


def load_function(spec: str) -> Callable[..., Any]:
    """The function named `module:function` or `path/to/file.py:function`."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise TunesmithError(f"reward function '{spec}' must be written module:function or file.py:function")
    try:
        if module_name.endswith(".py") or "/" in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise TunesmithError(f"reward function '{spec}': file {path} not found")
            loaded = importlib.util.spec_from_file_location(f"tunesmith_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(loaded)
            sys.modules[loaded.name] = module  # as an import does: dataclasses and pickling look it up there
            try:
                loaded.loader.exec_module(module)
            except BaseException:
                del sys.modules[loaded.name]
                raise
        else:
            module = importlib.import_module(module_name)
    except TunesmithError:
        raise
    except Exception as err:  # the file's own error, raised while it ran (an import, a syntax error, ...)
        raise TunesmithError(f"reward function '{spec}': cannot import {module_name}: "
                             f"{type(err).__name__}: {err}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise TunesmithError(f"reward function '{spec}': {module_name} has no function {attr}")
    return fn


def function_reward(spec: str) -> RewardFn:
    """A user function `fn(prompts, completions, rows) -> list[float]`, checked for one float per completion."""
    from tunesmith.data.conversation import as_chat

    fn = load_function(spec)

    def reward(items: Sequence[Any], completions: Sequence[str]) -> list[float]:
        prompts = [as_chat(item.prompt) for item in items]
        scores = fn(prompts=prompts, completions=list(completions), rows=[item.row for item in items])
        try:
            scores = [float(s) for s in scores]
        except (TypeError, ValueError):
            raise TunesmithError(f"reward function '{spec}' must return a list of numbers") from None
        if len(scores) != len(completions):
            raise TunesmithError(f"reward function '{spec}' returned {len(scores)} scores for "
                                 f"{len(completions)} completions")
        return scores

    return reward


def model_reward(path: str, batch_size: int = 16) -> RewardFn:
    """A `recipe: reward` model's scores; the model loads once, in eval mode, on the training device."""
    import torch

    from tunesmith.config import ModelConfig
    from tunesmith.data.conversation import Conversation, Message
    from tunesmith.data.packing import collate, shift_labels
    from tunesmith.data.render import tokenize_conversation
    from tunesmith.models.load import load_model_and_tokenizer
    from tunesmith.models.methods import is_sequence_classifier
    from tunesmith.models.reward import sequence_scores

    model, tokenizer = load_model_and_tokenizer(ModelConfig(name=path), for_training=False)
    if not is_sequence_classifier(model):
        raise TunesmithError(f"reward model '{path}' is not a reward model (train one with recipe: reward)")
    for p in model.parameters():
        p.requires_grad_(False)

    @torch.no_grad()
    def reward(items: Sequence[Any], completions: Sequence[str]) -> list[float]:
        examples = []
        for item, completion in zip(items, completions):
            conv = Conversation(tuple(item.prompt) + (Message("assistant", completion),))
            examples.append(shift_labels(*tokenize_conversation(tokenizer, conv)))
        out: list[float] = []
        for i in range(0, len(examples), batch_size):
            batch = collate([[e] for e in examples[i:i + batch_size]], tokenizer.pad_token_id)
            out += sequence_scores(model, batch).tolist()
        return out

    return reward




def load_rubric(rubric: str | None) -> str:
    """The judge's rubric: `DEFAULT_RUBRIC`, the text itself, or the contents of a .txt file it names; checked
    for its fields ({prompt}, {response}, {reference})."""
    text = DEFAULT_RUBRIC if rubric is None else rubric
    if rubric is not None and rubric.endswith(".txt"):
        path = Path(rubric)
        if not path.is_file():
            raise TunesmithError(f"judge rubric file {path} not found")
        text = path.read_text()
    try:
        text.format(prompt="", response="", reference="")
    except (KeyError, IndexError, ValueError) as err:
        raise TunesmithError(f"judge rubric: {err!r} is not a field it can fill ({{prompt}}, {{response}}, "
                             "{reference}; write a literal brace twice)") from None
    if "{response}" not in text:
        raise TunesmithError("judge rubric: it never shows the judge the {response}")
    return text


def rating_tokens(tokenizer: Any, name: str) -> tuple[list[int], list[int]]:
    """(the judge's answer up to its rating, one token per rating 1-9), as the tokenizer spells "Rating: N"
    (the answer a judge row trains, `tasks.judge`): "Rating:" and whatever it keeps apart before the digit
    (a space, for a tokenizer that splits it off), then the rating's own token (" 9", or "9")."""
    spelled = [tokenizer.encode(f"{JUDGE_ANSWER} {rating}", add_special_tokens=False) for rating in RATINGS]
    prefix = spelled[0][:-1]
    if any(s[:-1] != prefix for s in spelled) or len({s[-1] for s in spelled}) != len(spelled):
        raise TunesmithError(f"judge '{name}': its tokenizer does not spell each rating 1-9 as one token after "
                             f"'{JUDGE_ANSWER}'")
    return prefix, [s[-1] for s in spelled]


def judge_prompts(tokenizer: Any, rubric: str, items: Sequence[Any], completions: Sequence[str],
                  answer: list[int]) -> list[list[int]]:
    """The token ids that ask the judge to rate each completion: the question through its chat template,
    then `answer` (the start of its turn, `rating_tokens`), so that the next token is the rating."""
    from tunesmith.data.conversation import Message
    from tunesmith.data.render import render_prompt

    out = []
    for item, completion in zip(items, completions):
        question = judge_question(rubric, ((m.role, m.content) for m in item.prompt), completion,
                                  item.reference or "")
        out.append(render_prompt(tokenizer, [Message("user", question)]) + answer)
    return out


def expected_ratings(logits: "torch.Tensor", tokens: list[int]) -> "torch.Tensor":
    """(n,) expected ratings from (n, vocab) next-token logits: the probabilities of the rating tokens,
    renormalised over them (mass on any other token does not count)."""
    import torch

    probs = torch.softmax(logits.float()[:, tokens], dim=-1)
    return probs @ torch.tensor([float(r) for r in RATINGS], device=probs.device)


def judge_reward(name: str, rubric: str | None = None, batch_size: int = 16) -> RewardFn:
    """A chat model's expected rating of each response on `rubric` (`load_rubric`), mapped from 1..9 to 0..1;
    the judge loads once, in eval mode, on the training device. Prompts are padded on the right, and each
    one's rating is read at its own last token, so a batch scores what each prompt alone would."""
    import torch

    from tunesmith.config import ModelConfig
    from tunesmith.models.load import load_model_and_tokenizer
    from tunesmith.models.methods import is_sequence_classifier
    from tunesmith.models.speed import lm_parts

    text = load_rubric(rubric)
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name=name), for_training=False)
    if is_sequence_classifier(model):
        raise TunesmithError(f"judge '{name}' is a reward model, not a chat model: use kind: model")
    model.eval().requires_grad_(False)
    answer, tokens = rating_tokens(tokenizer, name)
    device = next(model.parameters()).device
    parts = lm_parts(model)

    @torch.no_grad()
    def reward(items: Sequence[Any], completions: Sequence[str]) -> list[float]:
        prompts = judge_prompts(tokenizer, text, items, completions, answer)
        out: list[float] = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([p + [tokenizer.pad_token_id] * (width - len(p)) for p in chunk], device=device)
            last = torch.tensor([len(p) - 1 for p in chunk], device=device)
            rows = torch.arange(len(chunk), device=device)
            if parts is not None:  # the output layer at each prompt's last token only
                decoder, head = parts
                logits = head(decoder(input_ids=ids, use_cache=False).last_hidden_state[rows, last])
            else:
                logits = model(input_ids=ids, use_cache=False).logits[rows, last]
            out += ((expected_ratings(logits, tokens) - 1) / (len(RATINGS) - 1)).tolist()
        return out

    return reward


class CombinedReward:
    """The weighted sum of named sources; `__call__` returns (total, {source name: scores})."""

    def __init__(self, sources: list[tuple[str, float, RewardFn]]):
        if not sources:
            raise TunesmithError("no reward source configured (reward.sources is empty)")
        self.sources = sources

    def __call__(self, items: Sequence[Any], completions: Sequence[str]) -> tuple[list[float], dict[str, list[float]]]:
        parts = {name: fn(items, completions) for name, _, fn in self.sources}
        for name, scores in parts.items():  # one nan would make every weight nan at the next step
            bad = next((i for i, s in enumerate(scores) if not math.isfinite(s)), None)
            if bad is not None:
                where = getattr(items[bad], "source", None)
                at = f" for the answer to {where.file}:{where.line}" if where is not None else ""
                raise TunesmithError(f"reward source '{name}' scored {scores[bad]}{at}: every score must be a "
                                     "finite number")
        total = [sum(w * parts[name][i] for name, w, _ in self.sources) for i in range(len(completions))]
        return total, parts


def check_sources(sources: Sequence[Any], pending: dict[str, str] | None = None) -> list[str]:
    """Check every source without loading a model: tasks exist, functions import, reward models are
    finished `recipe: reward` runs, or among the `pending` run directories (path -> recipe) a pipeline
    writes before it gets there. Returns their metric names; raises TunesmithError naming the source."""
    names = []
    for src in sources:
        if src.kind == "task" and src.name != "auto":
            get_task(src.name)
        elif src.kind == "function":
            load_function(src.name)
        elif src.kind == "model":
            check_reward_model(src.name, pending)
        elif src.kind == "judge":
            load_rubric(src.rubric)
            if not (pending and src.name in pending):
                from tunesmith.models.load import resolve_source

                resolve_source(src.name)  # the judge exists (not loaded here)
        names.append(f"{src.kind}:{src.name}")
    return names


def check_reward_model(name: str, pending: dict[str, str] | None = None, what: str = "reward model") -> None:
    """Raise TunesmithError unless `name` is a finished `recipe: reward` run, or a `recipe: reward` stage
    among the `pending` run directories; `what` names the setting in the message."""
    from tunesmith.models.load import resolve_source

    if pending and name in pending:
        if pending[name] != "reward":
            raise TunesmithError(f"{what} '{name}' is the run of a recipe: {pending[name]} stage, "
                                 "not a reward model (train one with recipe: reward)")
        return
    if not (resolve_source(name).marker or {}).get("head") == "reward":
        raise TunesmithError(f"{what} '{name}' is not a reward model (train one with recipe: reward)")


def build_reward(sources: Sequence[Any], batch_size: int = 16) -> CombinedReward:
    """A CombinedReward from `RewardSourceConfig`s; each source is named `<kind>:<name>` in the metrics."""
    check_sources(sources)
    built = []
    for src in sources:
        if src.kind == "task":
            fn = task_reward(src.name)
        elif src.kind == "function":
            fn = function_reward(src.name)
        elif src.kind == "judge":
            fn = judge_reward(src.name, src.rubric, batch_size)
        else:
            fn = model_reward(src.name, batch_size)
        built.append((f"{src.kind}:{src.name}", src.weight, fn))
    return CombinedReward(built)
