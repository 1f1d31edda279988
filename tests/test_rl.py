"""Online RL on the tiny model: rollouts train on exactly what was sampled (end-of-turn included), reward
sources, the KL reference, learning a trivially rewarded behaviour, exact resume, and the watch."""
from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import pytest
import torch

from conftest import ROOT, write_jsonl
from test_speed import OutOfMemoryInBackward
from tunesmith._core.errors import TunesmithError
from tunesmith._core.rundir import RunDir
from tunesmith.config import GRPOConfig, PPOConfig, config_from_dict
from tunesmith.data.prompts import load_prompts
from tunesmith.data.render import end_of_turn_ids, render_prompt
from tunesmith.eval.rl import watch
from tunesmith.models import apply_method
from tunesmith.models.generate import generate
from tunesmith.models.tiny import tiny_model, tiny_tokenizer
from tunesmith.rl import build_reward, function_reward, judge_reward, task_reward
from tunesmith.rl.rollout import build_rollout, distinct_n
from tunesmith.tasks import get_task
from tunesmith.training.online import response_forward, train_online
from tunesmith.training.preference import Reference

DATES = str(ROOT / "examples/data/dates/train.jsonl")


def _cfg(recipe: str = "grpo", **sections) -> GRPOConfig | PPOConfig:
    raw = {"recipe": recipe, "model": {"name": "tiny"}, "method": {"kind": "full"}, "data": {"train": DATES},
           "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 6},
           "reward": {"sources": [{"kind": "function", "name": str(ROOT / "examples/rewards.py") + ":vowel_fraction"}]},
           "train": {"max_steps": 4, "micro_batch_size": 4, "lr": 1e-3, "progress": False, "tensorboard": False,
                     "save_every": 2, "keep_last": 1}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return config_from_dict(raw)


def test_rollout_trains_on_the_sampled_tokens_and_the_end_of_turn(tokenizer):
    """The training forward over the laid-out rollout reproduces the engine's log-probs token for token,
    through left-padded prompts of different lengths, and a stopped response keeps its end-of-turn id."""
    model = tiny_model(tokenizer, seed=0)
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in ("hi", "What is 3 + 4? Say it.")]
    eot = end_of_turn_ids(tokenizer)
    gens = generate(model, tokenizer, prompts, stop_ids=eot, max_new_tokens=5, temperature=1.0, seed=0)
    # A forced stop: pretend the second sample ended on the end-of-turn id after 2 tokens.
    gens[1].token_ids, gens[1].logprobs, gens[1].stop_id, gens[1].finished = gens[1].token_ids[:2], gens[1].logprobs[:2], eot[0], True
    ro = build_rollout(prompts, gens, tokenizer.pad_token_id)
    assert ro.mask.tolist() == [[1.0] * 5, [1.0, 1.0, 1.0, 0.0, 0.0]]
    assert ro.response[1, :3].tolist() == gens[1].token_ids + [eot[0]]
    with torch.no_grad():
        logps = response_forward(model, ro, slice(None), temperature=1.0)["logps"]
    torch.testing.assert_close(logps[0], torch.tensor(gens[0].logprobs), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logps[1, :2], torch.tensor(gens[1].logprobs), atol=1e-4, rtol=1e-4)
    alone = torch.tensor([prompts[1] + gens[1].token_ids + [eot[0]]])
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=alone).logits[0, len(prompts[1]) - 1:-1], -1)
    assert float(logps[1, 2]) == pytest.approx(float(ref[2, eot[0]]), abs=1e-4)


def test_flat_rollout_layout_lays_real_tokens_end_to_end():
    """Hand-laid: prompts [1, 2] and [3]; responses [4, 5, 6] and [7] + stop 9. The flat row holds the real
    tokens only, positions restart per sequence, and `predict` points at the position before each response
    token (row-major, as `response_tokens` lists them)."""
    from tunesmith.models.generate import Generation

    gens = [Generation([4, 5, 6], "", False), Generation([7], "", True, stop_id=9)]
    ro = build_rollout([[1, 2], [3]], gens, pad_id=0)
    assert ro.input_ids.tolist() == [[1, 2, 4, 5, 6], [0, 3, 7, 9, 0]]
    flat = ro.flat(slice(None))
    assert flat["input_ids"].tolist() == [[1, 2, 4, 5, 6, 3, 7, 9]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert flat["cu_seq_lens"].tolist() == [0, 5, 8] and flat["max_length"] == 5
    row, col = ro.response_tokens(slice(None))
    assert (row.tolist(), col.tolist()) == ([0, 0, 0, 1, 1], [0, 1, 2, 0, 1])
    assert flat["predict"].tolist() == [1, 2, 3, 5, 6]
    assert [flat["input_ids"][0, i + 1].item() for i in flat["predict"].tolist()] == [4, 5, 6, 7, 9]
    second = ro.flat(torch.tensor([1]))
    assert second["input_ids"].tolist() == [[3, 7, 9]] and second["predict"].tolist() == [0, 1]


def test_shared_rollout_layout_lays_each_prompt_out_once():
    """Hand-laid: prompt [1, 2] sampled 3 times ([4, 5] + stop 9, [4, 6], and [4, 5] + stop 9 again) and
    prompt [3] once ([7]). The row holds [1, 2, 4] once (the prompt and the token every distinct sample
    begins with), then each distinct sample's own rest; the repeated sample is laid out once. Each later
    rest's keys are the shared prefix and its own tokens, its positions go on from the prefix, and every
    row's response tokens are predicted from the positions its own row would have (shared ones included),
    in `response_tokens` order whatever the order of the rows asked for."""
    from tunesmith.models.generate import Generation

    gens = [Generation([4, 5], "", True, stop_id=9), Generation([4, 6], "", False),
            Generation([4, 5], "", True, stop_id=9), Generation([7], "", False)]
    ro = build_rollout([[1, 2], [1, 2], [1, 2], [3]], gens, pad_id=0)
    flat = ro.flat(slice(None), share=True)
    assert flat["input_ids"].tolist() == [[1, 2, 4, 5, 9, 6, 3, 7]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 0, 1]]
    assert flat["cu_seq_lens"].tolist() == [0, 5, 6, 8] and flat["max_length"] == 5
    assert flat["kv_index"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7]
    assert flat["cu_seq_lens_k"].tolist() == [0, 5, 9, 11] and flat["max_length_k"] == 5
    assert flat["n_tokens"] == 8 and ro.flat(slice(None))["n_tokens"] == 5 + 4 + 5 + 2
    # row 0: 4 5 9 from 1 2 3; row 1: 4 6 from 1 2 (the prefix [1, 2, 4] predicts its 6); row 2 as row 0; row 3
    assert flat["predict"].tolist() == [1, 2, 3, 1, 2, 1, 2, 3, 6]
    shuffled = ro.flat(torch.tensor([3, 1, 0]), share=True)
    assert shuffled["input_ids"].tolist() == [[3, 7, 1, 2, 4, 6, 5, 9]]  # [4, 6] comes first among these rows
    assert shuffled["predict"].tolist() == [0, 3, 4, 3, 4, 6]
    assert ro.flat(slice(None), share=True) is flat  # made once


@pytest.mark.parametrize("plain_head", [True, False], ids=["linear-head", "own-forward"])
def test_flat_and_chunked_response_passes_equal_the_padded_one(tokenizer, plain_head, monkeypatch):
    """The RL log-prob and update forward, in each layout the speed plan can pick (padded or flat rows;
    full or chunked log-probs; the model's own forward where the head is not a plain linear map) gives the
    same log-probs, entropies and values, 0 off the mask, and the same gradients."""
    from tunesmith.models import speed
    from tunesmith.training.online import ValueHead

    model = tiny_model(tokenizer, seed=0)
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in ("hi", "What is 3 + 4?", "7 - 2")]
    prompts = [prompts[i] for i in (0, 1, 2, 1, 0, 1)]  # samples of a prompt, as an RL step draws them
    gens = generate(model, tokenizer, prompts, stop_ids=end_of_turn_ids(tokenizer), max_new_tokens=5,
                    temperature=1.0, seed=0)
    gens[1].token_ids, gens[1].stop_id = gens[1].token_ids[:2], end_of_turn_ids(tokenizer)[0]
    gens[3].token_ids[0] = gens[1].token_ids[0] + (1 if gens[1].token_ids[0] < 100 else -1)  # apart from the first
    gens[5] = gens[3]  # two samples alike token for token
    gens[4].token_ids = gens[0].token_ids[:2] + [t + 1 for t in gens[0].token_ids[2:]]  # alike for two tokens
    ro = build_rollout(prompts, gens, tokenizer.pad_token_id)
    assert 0 < ro.mask.sum() < ro.mask.numel()
    head = ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.linear.weight, generator=torch.Generator().manual_seed(1))
    rows = torch.tensor([2, 5, 0, 1, 4, 3])  # not in order: a minibatch of a shuffled rollout
    weights = torch.randn(2, *ro.mask.shape, generator=torch.Generator().manual_seed(2))
    if not plain_head:
        monkeypatch.setattr(speed, "lm_parts", lambda m: None)

    def run(flat, chunked, share=False):
        model.zero_grad(set_to_none=True)
        with speed.varlen_attention(model) if flat else contextlib.nullcontext():
            out = response_forward(model, ro, rows, 0.7, head, entropy=True, flat=flat, chunked=chunked, share=share)
            ((out["logps"] * weights[0]).sum() + (out["entropy"] * weights[1]).sum()).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    want, want_grads = run(False, False)
    mask = ro.mask[rows]
    assert want["logps"].shape == want["values"].shape == want["entropy"].shape == mask.shape
    for key in ("logps", "values", "entropy"):
        assert torch.all(want[key][mask == 0] == 0) and torch.all(want[key][mask == 1] != 0), key
    for flat, chunked, share in [(False, True, False), (True, False, False), (True, True, False),
                                 (True, False, True), (True, True, True)]:
        got, grads = run(flat, chunked, share)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=f"{flat} {chunked} {key}")
        for name in want_grads:
            torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    # the shared row holds each prompt once, samples 3 and 5 once, and the first two tokens of samples 0 and 4 once
    n = ro.attention_mask.sum(1).tolist()
    saved = len(prompts[0]) + 2 + n[5] + len(prompts[1])
    assert ro.flat(rows, share=True)["n_tokens"] == sum(n) - saved


def test_task_reward_function_reward_and_weighted_sum(tmp_path):
    rows = get_task("arithmetic").make(2, seed=0) + [{"messages": [{"role": "user", "content": "Say yes."},
                                                                   {"role": "assistant", "content": "yes"}]}]
    items, _ = load_prompts(_cfg(data={"train": str(write_jsonl(tmp_path / "p.jsonl", rows))}).data, _Tok())
    right = rows[0]["answer"]
    assert task_reward("auto")(items, [right, f"It is {rows[1]['answer']}.", " yes "]) == [1.0, 1.0, 1.0]
    assert task_reward("auto")(items, ["0", "nothing", "no"]) == [0.0, 0.0, 0.0]
    fn_file = tmp_path / "r.py"
    fn_file.write_text("def length(prompts, completions, rows):\n    return [len(c) for c in completions]\n")
    assert function_reward(f"{fn_file}:length")(items, ["a", "bb", ""]) == [1.0, 2.0, 0.0]
    sources = [{"kind": "task", "name": "auto", "weight": 2.0}, {"kind": "function", "name": f"{fn_file}:length",
                                                                 "weight": -0.5}]
    combined = build_reward(_cfg(reward={"sources": sources}).reward.sources)
    total, parts = combined(items, [right, "xx", "yes"])
    assert total == [2.0 - 0.5 * len(right), -1.0, 2.0 - 1.5]
    assert set(parts) == {"task:auto", f"function:{fn_file}:length"}


def test_reward_function_errors_name_the_problem(tmp_path):
    with pytest.raises(TunesmithError, match="module:function"):
        function_reward("no_colon")
    with pytest.raises(TunesmithError, match="cannot import"):
        function_reward("no_such_module_xyz:fn")
    with pytest.raises(TunesmithError, match="has no function"):
        function_reward(str(ROOT / "examples/rewards.py") + ":missing")
    bad = tmp_path / "bad.py"
    bad.write_text("def f(prompts, completions, rows):\n    return [1.0]\n")
    with pytest.raises(TunesmithError, match="returned 1 scores for 2"):
        _call(function_reward(f"{bad}:f"))
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_xyz\n")
    with pytest.raises(TunesmithError, match="cannot import .*ModuleNotFoundError"):
        function_reward(f"{broken}:f")
    # a file defining a dataclass loads as an imported module does (dataclasses look the module up)
    kept = tmp_path / "kept.py"
    kept.write_text("from __future__ import annotations\nfrom dataclasses import dataclass\n\n\n@dataclass\n"
                    "class Cfg:\n    scale: float = 0.5\n\n\n"
                    "def f(prompts, completions, rows):\n    return [Cfg().scale] * len(completions)\n")
    assert _call(function_reward(f"{kept}:f")) == [0.5, 0.5]


def test_a_score_that_is_not_finite_stops_the_run_naming_the_source_and_row(tmp_path):
    rows = get_task("arithmetic").make(2, seed=0)
    items, _ = load_prompts(_cfg(data={"train": str(write_jsonl(tmp_path / "p.jsonl", rows))}).data, _Tok())
    fn_file = tmp_path / "nan.py"
    fn_file.write_text("def f(prompts, completions, rows):\n    return [0.5, float('nan')]\n")
    combined = build_reward(_cfg(reward={"sources": [{"kind": "function", "name": f"{fn_file}:f"}]}).reward.sources)
    with pytest.raises(TunesmithError, match=r"reward source 'function:.*nan.py:f' scored nan for the answer to "
                                             r".*:2: every score must be a finite number"):
        combined(items, ["a", "b"])


class _Tok:
    """Enough of a tokenizer for load_prompts' length check: one id per character."""

    chat_template = "the contents, joined"  # apply_chat_template below

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(m["content"] for m in messages)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text)))}


def _call(fn):
    class Item:
        prompt, row = [], {}
    return fn([Item(), Item()], ["a", "b"])


def test_grpo_partial_sections_keep_grpo_defaults_and_bad_combinations_are_refused():
    cfg = config_from_dict({"recipe": "grpo", "data": {"train": "p.jsonl"}, "rl": {"kl_coef": 0.0}})
    assert (cfg.rl.advantage, cfg.rl.epochs, cfg.rl.kl_in, cfg.rollout.samples_per_prompt) == ("group", 1, "loss", 8)
    assert cfg.reference_source() is None
    ppo = config_from_dict({"recipe": "ppo", "data": {"train": "p.jsonl"}})
    assert (ppo.rl.advantage, ppo.rl.epochs, ppo.rl.kl_in, ppo.reference_source()) == ("gae", 4, "reward", "adapter")
    for bad, message in [({"rollout": {"samples_per_prompt": 1}}, "samples_per_prompt to 2"),
                         ({"rl": {"minibatches": 3}}, "does not divide"),
                         ({"train": {"grad_accum": 2}}, "grad_accum does not apply"),
                         ({"method": {"kind": "full"}, "reference": "adapter"}, "needs an adapter method"),
                         ({"rollout": {"filter_groups": True}, "rl": {"advantage": "reinforce"}},
                          "filter_groups .*rl.advantage=reinforce"),
                         ({"method": {"kind": "lora", "lora": {"dropout": 0.1}}}, "dropout would draw a new mask"),
                         ({"rl": {"kl_coef": 0.0, "kl_target": 0.01}}, "from 0 it stays 0")]:
        with pytest.raises(TunesmithError, match=message):
            config_from_dict({"recipe": "grpo", "data": {"train": "p.jsonl"}, **bad})


def _train(cfg, root: Path, resume: bool = False, on_step=None, reference_kind: str = "copy",
           critic: list | None = None):
    from tunesmith.models.reward import critic_from_reward_model
    from tunesmith.training.preference import frozen_copy

    tok = tiny_tokenizer()
    torch.manual_seed(cfg.seed)
    model = tiny_model(tok, seed=0)
    reference = Reference("copy", frozen_copy(model)) if reference_kind == "copy" else Reference("adapter")
    model = apply_method(model, cfg.method)
    value_model = None
    if cfg.rl.value_model is not None:
        value_model = critic_from_reward_model(cfg.rl.value_model, cfg.method.lora, tok)
        if critic is not None:
            critic.append(value_model)
    items, _ = load_prompts(cfg.data, tok)
    run = RunDir(root).create() if not resume else RunDir(root)
    result = train_online(model, tok, items[:16], build_reward(cfg.reward.sources), cfg, run,
                          reference=reference, resume=resume, on_step=on_step, value_model=value_model)
    return model, result, [json.loads(x) for x in (root / "metrics.jsonl").read_text().splitlines()]


def _reward_model(tokenizer, root: Path, seed: int = 3) -> str:
    """A saved `recipe: reward` model on the tiny model (its head as initialised); returns its run directory."""
    from tunesmith.models.export import save_final
    from tunesmith.models.reward import to_reward_model

    torch.manual_seed(seed)
    rm = to_reward_model(tiny_model(tokenizer, seed=seed)).eval()
    save_final(rm, tokenizer, root / "final", base_model="tiny", method="full", base_seed=seed, head="reward")
    return str(root)


@pytest.mark.parametrize("recipe", ["grpo", "grpo-filter", "ppo", "ppo-critic"])
def test_resume_after_a_crash_repeats_the_uninterrupted_run(recipe, tmp_path, monkeypatch):
    """Same rollouts (seeded by step), same updates, same KL coefficient (adaptive here), same weights; with
    `rl.value_model` the critic's adapter and head come back too (GAE's advantages read its values), put on
    the normalised reward's scale once, by the first rollout, and not again on resume. With
    `rollout.filter_groups`, where steps take more than one batch of prompts, the resumed run goes on from
    the prompt the crashed one reached, not from one batch a step."""
    from tunesmith.training.online import ValueModel

    rescaled = []
    real_rescale = ValueModel.rescale
    monkeypatch.setattr(ValueModel, "rescale", lambda self, *a: rescaled.append(a) or real_rescale(self, *a))
    value_model = _reward_model(tiny_tokenizer(), tmp_path / "rm") if recipe == "ppo-critic" else None
    filtering = recipe == "grpo-filter"
    recipe = recipe.removesuffix("-critic").removesuffix("-filter")
    sections = {}
    if filtering:  # prompts of an even length score 1 whatever the answer: nothing to learn from them
        reward = tmp_path / "half_flat.py"
        reward.write_text("def half_flat(prompts, completions, rows):\n"
                          "    return [1.0 if len(p[-1]['content']) % 2 == 0 else sum(ch in 'aeiou' for ch in c) / "
                          "max(len(c), 1) for p, c in zip(prompts, completions)]\n")
        sections = {"rollout": {"filter_groups": True, "max_rounds": 3},
                    "reward": {"sources": [{"kind": "function", "name": f"{reward}:half_flat"}]}}
    cfg = _cfg(recipe, method={"kind": "lora", "lora": {"r": 4, "alpha": 8}}, reference="adapter",
               rl={"kl_target": 0.5, "kl_coef": 0.1, "value_model": value_model},
               reward={"normalize": recipe == "ppo", **sections.get("reward", {})},
               **{k: v for k, v in sections.items() if k != "reward"})
    critics: list = []
    full, _, expected = _train(cfg, tmp_path / "full", reference_kind="adapter", critic=critics)
    if filtering:  # some step took more than one batch, and every step found prompts to learn from
        assert max(r["sampling_rounds"] for r in expected) > 1
        assert all(r["varied_groups"] == 1.0 for r in expected if r["sampling_rounds"] < 3)
    if recipe == "ppo":  # scores standardised by the first rollout's own mean and std, kept for the run
        assert expected[0]["reward"] == pytest.approx(0.0, abs=1e-5) and expected[0]["reward_raw"] > 0
    if value_model is not None:  # the critic trained: its adapter moved off its zero start
        assert any(p.abs().sum() > 0 for n, p in critics[0].named_parameters() if "lora_B" in n)
        state = json.loads((tmp_path / "full" / "checkpoints" / "step-4" / "state.json").read_text())
        assert rescaled == [tuple(state["reward_norm"])]

    def crash(step, record):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(cfg, tmp_path / "part", on_step=crash, reference_kind="adapter")
    resumed, result, got = _train(cfg, tmp_path / "part", resume=True, reference_kind="adapter")
    assert result.resumed_from == 2 and len(got) == len(expected) == 4
    assert len(rescaled) == (2 if value_model else 0)  # the full run's and the crashed run's first rollouts
    for a, b in zip(expected, got):
        for key in ("reward", "kl", "kl_coef", "response_length", "pg_loss", *(("reward_raw",) if recipe == "ppo" else ())):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, msg=name)


def test_a_reward_model_critic_values_each_prefix_as_the_reward_model_scores_it(tokenizer, tmp_path):
    """`rl.value_model`: the critic's value before each response token is the reward model's score of the
    prompt and the response so far, read at the last token, as a reward model scores a whole answer; on
    the normalised scale after `rescale`. Only its adapter, head and offset train; it needs the policy's
    tokenizer, and a reward model."""
    import copy

    from tunesmith.config import LoraConfig, ModelConfig
    from tunesmith.models.load import load_model_and_tokenizer
    from tunesmith.models.reward import critic_from_reward_model
    from tunesmith.training.online import ValueModel

    path = _reward_model(tokenizer, tmp_path / "rm")
    rm, _ = load_model_and_tokenizer(ModelConfig(name=path), for_training=False)
    critic = ValueModel(critic_from_reward_model(path, LoraConfig(r=4, alpha=8), tokenizer))
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in ("hi", "What is 3 + 4?")]
    gens = generate(tiny_model(tokenizer, seed=0), tokenizer, prompts, stop_ids=end_of_turn_ids(tokenizer),
                    max_new_tokens=5, temperature=1.0, seed=0)
    ro = build_rollout(prompts, gens, tokenizer.pad_token_id)
    rows = torch.tensor([1, 0])
    values = critic(ro, rows)
    with torch.no_grad():
        for i, r in enumerate(rows.tolist()):
            on = ro.mask[r] == 1
            response = ro.response[r][on].tolist()
            prefixes = [torch.tensor([prompts[r] + response[:t]]) for t in range(len(response))]
            want = [float(rm.score(rm.model(input_ids=ids).last_hidden_state[0, -1])) for ids in prefixes]
            assert len(want) > 1 and len(set(round(w, 5) for w in want)) > 1
            assert values[i][on].tolist() == pytest.approx(want, abs=1e-5)
            assert torch.all(values[i][~on] == 0)
    values.sum().backward()
    trained = {n for n, p in critic.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in critic.named_parameters() if p.requires_grad}
    assert "offset" in trained and any("score" in n for n in trained) and any("lora_A" in n for n in trained)
    assert not any(p.requires_grad for n, p in critic.named_parameters() if "lora" not in n and "score" not in n
                   and n != "offset")
    critic.rescale(2.0, 4.0)
    with torch.no_grad():
        rescaled = critic(ro, rows)
    on = ro.mask[rows] == 1
    torch.testing.assert_close(rescaled[on], (values.detach()[on] - 2.0) / 4.0)

    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<not-in-the-policy's-vocabulary>"])
    with pytest.raises(TunesmithError, match="tokenizer is not the policy's"):
        critic_from_reward_model(path, LoraConfig(r=4, alpha=8), other)
    with pytest.raises(TunesmithError, match="rl.value_model 'tiny' is not a reward model"):
        critic_from_reward_model("tiny", LoraConfig(r=4, alpha=8), tokenizer)
    with pytest.raises(TunesmithError, match="rl.value_model is the critic of rl.advantage=gae"):
        _cfg("grpo", rl={"value_model": path})


def test_the_memory_budget_counts_the_critic(tmp_path, monkeypatch):
    """With `rl.value_model`, the checkpoint budget counts the critic's weights, a gradient and two AdamW
    moments for each trained one, and what its blocks keep for backward per token (never checkpointed),
    besides the policy's."""
    from tunesmith.models import speed
    from tunesmith.training import online

    plans = []
    real = online.plan_speed
    monkeypatch.setattr(online, "plan_speed", lambda *a, **kw: plans.append(real(*a, **kw)) or plans[-1])
    kw = dict(method={"kind": "lora", "lora": {"r": 4, "alpha": 8}}, reference="adapter",
              train={"max_steps": 1, "memory_budget_gib": 4})
    _train(_cfg("ppo", **kw), tmp_path / "head", reference_kind="adapter")
    critics: list = []
    path = _reward_model(tiny_tokenizer(), tmp_path / "rm")
    _train(_cfg("ppo", rl={"value_model": path}, **kw), tmp_path / "critic", reference_kind="adapter", critic=critics)
    head, critic = plans[0].budget, plans[1].budget
    weights = sum(p.numel() for p in critics[0].parameters()) + 1  # and the offset, trained
    trained = sum(p.numel() for p in critics[0].parameters() if p.requires_grad) + 1
    assert critic.fixed - head.fixed == 4 * weights + 3 * 4 * trained  # float32 on a CPU
    config = critics[0].get_base_model().config
    assert critic.loss_per_token - head.loss_per_token == (
        config.num_hidden_layers * speed.activation_bytes_per_token(config, 4)) > 0


def test_kl_is_zero_at_the_first_step_and_the_adapter_reference_is_the_base(tmp_path):
    cfg = _cfg("grpo", method={"kind": "lora", "lora": {"r": 4, "alpha": 8}}, reference="adapter",
               train={"max_steps": 2})
    model, _, records = _train(cfg, tmp_path / "run", reference_kind="adapter")
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as the reference
    assert records[1]["kl"] != pytest.approx(0.0, abs=1e-6)  # and has moved after one update
    tok = tiny_tokenizer()
    base = tiny_model(tok, seed=0)
    ids = torch.tensor([render_prompt(tok, [{"role": "user", "content": "hello"}])])
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits)


@pytest.mark.parametrize("recipe", ["grpo", "ppo"])
def test_update_passes_through_the_speed_plan_match_the_plain_run(recipe, tmp_path, monkeypatch):
    """train.kernels, checkpointing, flat rows in variable-length attention and chunked log-probs apply to
    the log-prob and update passes (PPO's value head reads the hidden states of checkpointed blocks): the
    same rollouts, statistics and adapter as the plain run. Each step's time splits into generation,
    log-prob passes and update."""
    from tunesmith.models import fused
    from tunesmith.training import online
    calls, fused_at_generation = [], []
    real, real_generate = fused._GroupedLoRA.apply, online.generate
    monkeypatch.setattr(fused._GroupedLoRA, "apply", lambda *a: calls.append(1) or real(*a))

    def generate(model, *a, **kw):
        fused_at_generation.append((any("forward" in m.__dict__ for m in fused.lora_layers(model)), kw["kernels"]))
        return real_generate(model, *a, **kw)
    monkeypatch.setattr(online, "generate", generate)
    from tunesmith.rl.rollout import Rollout
    layouts = []  # which flat / chunked paths the passes took
    real_flat, real_chunked = Rollout.flat, online.linear_token_logprobs
    monkeypatch.setattr(Rollout, "flat", lambda self, rows, share=False: layouts.append("shared" if share else "flat")
                        or real_flat(self, rows, share))
    monkeypatch.setattr(online, "linear_token_logprobs",
                        lambda *a, **k: layouts.append("chunked") or real_chunked(*a, **k))

    def run(name, **train):
        cfg = _cfg(recipe, method={"kind": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}, reference="adapter",
                   rl={"kl_coef": 0.1}, train={"max_steps": 3, **train})
        return _train(cfg, tmp_path / name, reference_kind="adapter")
    plain, _, expected = run("plain", attention="padded", loss_chunking="off")
    assert not calls and not layouts
    for r in expected:
        assert 0 < r["gen_seconds"] + r["logprob_seconds"] + r["update_seconds"] <= r["step_seconds"]
    for name, train in [("fast", {"kernels": "on", "checkpointing": 1, "attention": "padded", "loss_chunking": "off"}),
                        ("flat", {"kernels": "on", "checkpointing": 1, "attention": "varlen", "loss_chunking": "on"}),
                        ("auto", {"kernels": "on", "checkpointing": 1})]:
        calls.clear(), layouts.clear()
        fast, _, got = run(name, **train)
        assert calls  # the grouped q/k/v and gate/up layers ran
        # flat rows lay a group's prompt out once: asked for, or on a CPU by `auto` for groups of samples
        assert set(layouts) == {"flat": {"shared", "chunked"}, "auto": {"shared", "chunked"}}.get(name, set())
        plan = [json.loads(x)["message"] for x in (tmp_path / name / "events.jsonl").read_text().splitlines()
                if '"speed"' in x][0]
        assert "fused kernels: on" in plan and "checkpointing: 1 blocks" in plan
        assert ("padding-free varlen" in plan) == (name != "fast") and ("chunked" in plan) == (name != "fast"), plan
        assert ("each prompt laid out once" in plan) == (name == "auto"), plan
        for a, b in zip(expected, got, strict=True):
            for key in ("reward", "kl", "loss", "pg_loss", "grad_norm", "approx_kl", "entropy",
                        *(("value_loss", "explained_variance") if recipe == "ppo" else ())):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (name, a["step"], key)
        for (pname, p), q in zip(plain.named_parameters(), fast.parameters()):
            if p.requires_grad:
                torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=f"{name} {pname}")
    # generation sees the model as it is, and takes the fused layers where the plan does: the same rollouts
    assert fused_at_generation == [(False, False)] * 3 + [(False, True)] * 9


@pytest.mark.parametrize("layout", ["padded", "flat"])
def test_one_update_a_rollout_reads_the_rollout_log_probs_off_its_own_forward(layout, tmp_path, monkeypatch):
    """GRPO's defaults (one optimiser step a rollout, KL in the loss) skip the no-gradient policy pass: the
    update's forwards give the rollout policy's log-probs and entropy, and the run is the one that scores the
    rollout apart (same records, same adapter). Several steps a rollout, a critic, or KL in the reward need
    those log-probs first, and keep the pass."""
    from tunesmith.training import online
    no_grad = []
    real = online.response_forward
    monkeypatch.setattr(online, "response_forward",
                        lambda *a, **k: no_grad.append(not torch.is_grad_enabled()) or real(*a, **k))
    train = {"max_steps": 3} if layout == "padded" else {"max_steps": 3, "attention": "varlen", "loss_chunking": "on"}
    cfg = _cfg("grpo", method={"kind": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}, reference="adapter",
               rl={"kl_coef": 0.1}, train=train)
    on_policy = online._on_policy
    assert on_policy(cfg.rl, kl_on=True)
    skipped, _, got = _train(cfg, tmp_path / "skip", reference_kind="adapter")
    n_skip = (sum(no_grad), len(no_grad))
    monkeypatch.setattr(online, "_on_policy", lambda *a: False)
    no_grad.clear()
    scored, _, expected = _train(cfg, tmp_path / "scored", reference_kind="adapter")
    assert sum(no_grad) == 2 * n_skip[0] > 0  # the reference's passes alone, then the policy's beside them
    assert len(no_grad) - sum(no_grad) == n_skip[1] - n_skip[0]  # the same update passes
    for a, b in zip(expected, got, strict=True):
        for key in ("reward", "kl", "kl_coef", "loss", "pg_loss", "grad_norm", "entropy", "approx_kl",
                    "clip_fraction"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
        assert b["approx_kl"] == b["clip_fraction"] == 0.0
    assert abs(got[-1]["kl"]) > 1e-4 and got[-1]["entropy"] > 0.1  # the reported metrics are not left at zero
    for (name, p), q in zip(scored.named_parameters(), skipped.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)

    for rl, kl_on, want in (({"epochs": 2}, False, False), ({"minibatches": 2}, False, False),
                            ({"kl_in": "reward"}, True, False), ({"kl_in": "reward"}, False, True), ({}, False, True)):
        assert on_policy(_cfg("grpo", rl=rl).rl, kl_on) == want, (rl, kl_on)
    assert not on_policy(_cfg("ppo", rl={"epochs": 1}).rl, kl_on=False)  # its critic's values come first


def test_the_entropy_as_a_metric_is_taken_a_chunk_of_rows_at_a_time_with_no_graph(monkeypatch):
    from tunesmith.losses.rl import entropy_from_logits
    from tunesmith.training import online
    logits = torch.randn(1, 10, 7, generator=torch.Generator().manual_seed(0), requires_grad=True)
    monkeypatch.setattr(online, "chunk_rows", lambda vocab: 3)
    metric = online._entropy(logits, 0.7, grad=False)
    torch.testing.assert_close(metric, entropy_from_logits(logits, 0.7)[0].detach())
    assert not metric.requires_grad and online._entropy(logits, 0.7, grad=True).requires_grad


def test_an_update_that_runs_out_of_memory_runs_its_minibatch_again(tmp_path, monkeypatch):
    """Out of memory in the backward of a minibatch's second micro-batch (the first one's gradients are in):
    the minibatch runs again from dropped gradients, its statistics count once, the run says so, and
    the result is the plain run's. A block's activations are measured for the budget once, not at every step."""
    from tunesmith.models import speed
    from tunesmith.training import online

    measured = []
    real_measure = speed.saved_bytes_per_token
    monkeypatch.setattr(speed, "saved_bytes_per_token", lambda *a, **k: measured.append(1) or real_measure(*a, **k))

    def run(name, fail_at=None):
        calls = []
        real = online.response_forward

        def forward(*a, **kw):
            out = real(*a, **kw)
            if torch.is_grad_enabled():  # the update pass (scoring runs without gradients)
                calls.append(1)
                if len(calls) == fail_at:
                    out["logps"] = OutOfMemoryInBackward.apply(out["logps"])
            return out
        monkeypatch.setattr(online, "response_forward", forward)
        cfg = _cfg("grpo", method={"kind": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
                   train={"max_steps": 2, "micro_batch_size": 2, "checkpointing": "auto", "memory_budget_gib": 1000})
        model, _, records = _train(cfg, tmp_path / name)
        events = [json.loads(x) for x in (tmp_path / name / "events.jsonl").read_text().splitlines()]
        return model, records, [e for e in events if e["event"] == "out_of_memory"], len(calls)

    plain, expected, none, n_plain = run("plain")
    assert not none and n_plain == 4  # 2 steps x 4 rows in micro-batches of 2
    assert len(measured) == 1
    model, got, retries, n = run("oom", fail_at=2)
    assert n == n_plain + 2  # the minibatch's two micro-batches ran again
    assert len(retries) == 1 and retries[0]["message"].startswith("step 1: a micro-batch of ")
    assert "ran out of memory; the step runs again with 0 of 2 blocks checkpointed" in retries[0]["message"]
    for a, b in zip(expected, got, strict=True):
        for key in ("reward", "loss", "pg_loss", "grad_norm", "approx_kl", "clip_fraction", "entropy"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    for (pname, p), q in zip(plain.named_parameters(), model.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q, msg=pname)


def _mean(records, key, part):
    values = [r[key] for r in records]
    k = len(values) // 4
    return sum(values[:k] if part == "first" else values[-k:]) / k


@pytest.mark.parametrize("name", ["grpo", "ppo"])
def test_tiny_configs_learn_the_rewarded_behaviour(name, tmp_path):
    """examples/tiny/{grpo,ppo}.yaml: the vowel-fraction reward climbs well above where it started."""
    from tunesmith.api import train

    result = train(ROOT / f"examples/tiny/{name}.yaml", output_dir=str(tmp_path / name), **{"train.progress": False})
    records = [json.loads(x) for x in (result.path / "metrics.jsonl").read_text().splitlines()]
    key = "reward_raw" if "reward_raw" in records[0] else "reward"  # ppo.yaml normalises its reward
    first, last = _mean(records, key, "first"), _mean(records, key, "last")
    assert last > first + 0.1, (first, last)
    assert (result.path / "final").is_dir() and (result.path / "eval/rl.png").is_file()
    assert "| reward |" in (result.path / "eval/rl.md").read_text()
    assert sorted(p.name for p in (result.path / "samples").iterdir()) == ["step-20.jsonl", "step-40.jsonl"]
    if name == "ppo":
        assert {"value_loss", "explained_variance", "value_clip_fraction"} <= set(records[-1])


def test_mask_truncated_trains_nothing_on_responses_the_token_budget_cut_off(tmp_path, monkeypatch):
    """rl.mask_truncated: the update's token mask is 0 on every response that did not end its turn and the
    rollout's mask on the others, on the device and in the host's copy alike. The tiny policy never ends
    a turn within 6 tokens, so with the setting the weights stay as they started, KL term and all (Adam
    moves nothing on zero gradients), and without it they move. The truncation metric counts every response."""
    from tunesmith.training import online

    masks = []
    real = online._update
    monkeypatch.setattr(online, "_update", lambda passes, rl, targets, mask, host_mask, *a, **k: masks.append(
        (passes.ro, mask.clone(), host_mask.clone())) or real(passes, rl, targets, mask, host_mask, *a, **k))
    start = tiny_model(tiny_tokenizer(), seed=0).state_dict()
    kept, _, records = _train(_cfg("grpo", rl={"mask_truncated": True, "kl_coef": 0.1}, train={"max_steps": 2}),
                              tmp_path / "masked")
    assert [r["truncated"] for r in records] == [1.0, 1.0]
    assert all(torch.equal(p, start[n]) for n, p in kept.state_dict().items())
    assert all(not m.any() and not h.any() for _, m, h in masks)
    moved, _, _ = _train(_cfg("grpo", rl={"kl_coef": 0.1}, train={"max_steps": 2}), tmp_path / "plain")
    assert any(not torch.equal(p, start[n]) for n, p in moved.state_dict().items())
    assert torch.equal(masks[-1][1], masks[-1][0].mask) and torch.equal(masks[-1][2], masks[-1][0].mask)

    # half of the responses finished: theirs stay, the others' go
    masks.clear()
    real_rollout = online.build_rollout

    def half_finished(*args, **kwargs):
        ro = real_rollout(*args, **kwargs)
        ro.finished[::2] = [True] * len(ro.finished[::2])
        return ro

    monkeypatch.setattr(online, "build_rollout", half_finished)
    _train(_cfg("grpo", rl={"mask_truncated": True}, train={"max_steps": 1}), tmp_path / "half")
    ro, mask, host = masks[0]
    finished = torch.tensor(ro.finished)
    assert finished.tolist() == [True, False, True, False]
    assert torch.equal(mask[finished], ro.mask[finished]) and ro.mask[finished].sum() > 0
    assert not mask[~finished].any() and torch.equal(host, mask)


def test_constant_aggregation_divides_by_the_generation_budget(tmp_path, monkeypatch):
    """rl.loss_aggregation constant (Dr. GRPO): each minibatch's loss is divided by its responses times
    rollout.max_new_tokens, not by its token count."""
    from tunesmith.training import online

    weights = []
    real = online.aggregate_weight
    monkeypatch.setattr(online, "aggregate_weight", lambda m, how, width: weights.append(
        (how, width, real(m, how, width))) or real(m, how, width))
    _train(_cfg("grpo", rl={"loss_aggregation": "constant", "minibatches": 2}, train={"max_steps": 1}),
           tmp_path / "run")
    assert weights == [("constant", 6, 2 * 6.0)] * 2  # 2 responses a minibatch, a budget of 6 tokens


def test_filter_groups_samples_on_until_enough_prompts_scored_differently(monkeypatch):
    """rollout.filter_groups (DAPO's dynamic sampling), on a stand-in engine and scorer: prompts 0-9, whose
    samples score alike unless the prompt is odd. Rounds take the order's next batches of 2 prompts until 2
    odd ones are in, the cursor moving a batch a round; a step that reaches max_rounds first tops up with the
    even ones, in the order met; without the setting a step is one batch. Each round draws its own seed."""
    from tunesmith.config import RolloutConfig
    from tunesmith.models.generate import Generation
    from tunesmith.training import online
    from tunesmith.training.loop import micro_batch

    seeds = []

    def fake_generate(model, tokenizer, prompts, seed, **kw):
        seeds.append(seed)
        return [Generation(token_ids=[p[0], k], text=f"{p[0]} {k}", finished=True, logprobs=[0.0, 0.0])
                for k, p in enumerate(prompts)]

    def scorer(items, texts):
        scores = [float(t.split()[1]) if int(t.split()[0]) % 2 else 1.0 for t in texts]
        return scores, {"fake": scores}

    monkeypatch.setattr(online, "generate", fake_generate)
    items, ids = list(range(10)), [[i] for i in range(10)]
    stream = [i for k in range(5) for i in micro_batch(range(10), k, 2, 0)]  # epoch 0's order

    def run(cursor, **settings):
        ro = RolloutConfig(prompts_per_step=2, samples_per_prompt=2, **settings)
        rounds = online._Rounds(None, None, items, ids, ro, [9], scorer, contextlib.nullcontext(), False, 0.0)
        batch, after, n = rounds.step(cursor, 0, 3)
        prompts = [r.item for r in batch[::2]]
        assert [r.item for r in batch] == [p for p in prompts for _ in range(2)]  # whole groups
        assert batch[0].parts == {"fake": batch[0].score}
        return prompts, after, n

    odd = [i for i in stream if i % 2]
    needed = next(k for k in range(1, 6) if sum(i % 2 for i in stream[:2 * k]) >= 2)
    assert needed > 1  # the first batch alone is not enough: the step takes a second
    assert run(0, filter_groups=True, max_rounds=5) == (odd[:2], needed, needed)
    assert len(set(seeds[-needed:])) == needed  # a seed of its own for every round
    first = stream[:2]
    top_up = [i for i in first if i % 2] + [i for i in first if not i % 2]
    assert run(0, filter_groups=True, max_rounds=1) == (top_up, 1, 1)
    assert run(0) == (first, 1, 1) and run(2) == (stream[4:6], 3, 1)


def test_the_kl_term_holds_the_policy_near_the_reference(tmp_path):
    """The tiny GRPO run with a KL term ends far closer to the reference than the same run without it.

    kl_coef 0.3, not the example's light 0.1: at 0.1 whether the policy stays near depends on the sampled
    draws (seeds 0-2 end at 29, 22 and 11 nats against 27, 40 and 24 without the term); at 0.3 all three
    end within about 2 nats, a twelfth or less of the free runs.
    """
    from tunesmith.api import train

    held = train(ROOT / "examples/tiny/grpo.yaml", output_dir=str(tmp_path / "kl"),
                 **{"train.progress": False, "rl.kl_coef": 0.3})
    # kl_coef 0 with an explicit reference: the KL is measured but not penalised
    free = train(ROOT / "examples/tiny/grpo.yaml", output_dir=str(tmp_path / "free"),
                 **{"train.progress": False, "rl.kl_coef": 0.0, "reference": "copy"})
    held_records, free_records = ([json.loads(x) for x in (r.path / "metrics.jsonl").read_text().splitlines()]
                                  for r in (held, free))
    assert free_records[-1]["kl_coef"] == 0.0 and free_records[-1]["kl"] > 0
    assert _mean(held_records, "kl", "last") < 0.25 * _mean(free_records, "kl", "last")


def test_watch_flags_collapse_runaway_length_and_truncation():
    healthy = [{"step": i, "reward": 0.1 * i, "diversity": 0.9, "response_length": 10, "truncated": 0.0, "kl": 1.0}
               for i in range(12)]
    assert watch(healthy) == []
    collapse = [{**r, "diversity": 0.9 if r["step"] < 3 else 0.2} for r in healthy]
    assert any("mode collapse" in w for w in watch(collapse))
    longer = [{**r, "response_length": 10 if r["step"] < 3 else 40, "truncated": 0.0 if r["step"] < 9 else 0.8}
              for r in healthy]
    warnings = watch(longer, max_new_tokens=40)
    assert any("longer" in w for w in warnings) and any("run out of tokens" in w for w in warnings)
    assert distinct_n([[1, 2, 3], [1, 2, 3]]) == pytest.approx(0.5) and distinct_n([[1, 2], [3, 4]]) == 1.0
    idle = [{**r, "varied_groups": 1.0 if r["step"] < 9 else 0.4} for r in healthy]
    assert [w for w in watch(idle) if "filter_groups" in w] == [
        "only 40% of the last steps' prompts had samples that scored differently; the others (every sample "
        "right, or every one wrong) taught nothing: rollout.filter_groups samples further prompts in their place"]
    assert watch([{**r, "varied_groups": 0.6} for r in idle]) == []
    assert watch([{**r, "sampling_rounds": 4} for r in idle]) == []  # filtering already: it ran out of rounds
    # with filtering, the last steps mostly used up their rounds and still kept idle prompts
    spent = [{**r, "sampling_rounds": 4 if r["step"] >= 9 else 1} for r in idle]
    assert [w for w in watch(spent, max_rounds=4) if "rounds" in w] == [
        "3 of the last 3 steps used all 4 rounds of sampling and still trained on prompts whose samples all "
        "scored the same: most prompts are solved or out of reach; raise rollout.max_rounds, or give prompts "
        "of the right difficulty"]
    assert watch(spent, max_rounds=5) == []  # never at the limit
    assert watch([{**r, "varied_groups": 1.0} for r in spent], max_rounds=4) == []  # at it, but it found enough


def test_validate_checks_prompts_and_reward_sources_without_training(tmp_path):
    from tunesmith.api import validate

    stats = validate(ROOT / "examples/tiny/grpo.yaml")
    assert stats["prompts"] == 480 and stats["steps"] == 40
    assert stats["reward_sources"] == ["function:examples/rewards.py:vowel_fraction"]
    with pytest.raises(TunesmithError, match="has no function nope"):
        validate(ROOT / "examples/tiny/grpo.yaml", **{"reward.sources": [{"kind": "function", "name": "examples/rewards.py:nope"}]})
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}, "{not json"])
    with pytest.raises(TunesmithError, match=r"bad.jsonl:2"):
        validate(ROOT / "examples/tiny/grpo.yaml", **{"data.train": str(bad)})
    with pytest.raises(TunesmithError, match="rl.value_model 'tiny' is not a reward model"):
        validate(ROOT / "examples/tiny/ppo.yaml", **{"rl.value_model": "tiny"})
    # questions alone serve a function, a reward model or a judge; a task reward needs each row's answer
    alone = write_jsonl(tmp_path / "alone.jsonl", [{"messages": [{"role": "user", "content": "Say hi."}]},
                                                   {"prompt": "Tell a joke."}])
    assert validate(ROOT / "examples/tiny/grpo.yaml", **{"data.train": str(alone)})["prompts"] == 2
    with pytest.raises(TunesmithError, match=r"alone.jsonl:1: field 'answer' is missing: the task reward"):
        validate(ROOT / "examples/tiny/grpo.yaml", **{"data.train": str(alone),
                                                        "reward.sources": [{"kind": "task", "name": "auto"}]})


def test_model_reward_scores_prompt_and_answer_with_the_reward_models_own_template(tokenizer, tmp_path):
    """A saved reward model scores each (prompt, completion) exactly as scoring the rendered chat by hand."""
    from tunesmith.data.packing import collate, shift_labels
    from tunesmith.data.render import tokenize_conversation
    from tunesmith.data.conversation import Conversation, Message
    from tunesmith.models.export import save_final
    from tunesmith.models.reward import sequence_scores, to_reward_model
    from tunesmith.rl import model_reward

    rm = to_reward_model(tiny_model(tokenizer, seed=0)).eval()
    save_final(rm, tokenizer, tmp_path / "rm" / "final", base_model="tiny", method="full", base_seed=0, head="reward")
    rows = get_task("arithmetic").make(3, seed=1)
    items, _ = load_prompts(_cfg(data={"train": str(write_jsonl(tmp_path / "p.jsonl", rows))}).data, _Tok())
    completions = ["7", "It is 12.", "no"]
    scores = model_reward(str(tmp_path / "rm"), batch_size=2)(items, completions)
    for item, completion, score in zip(items, completions, scores):
        conv = Conversation(tuple(item.prompt) + (Message("assistant", completion),))
        batch = collate([[shift_labels(*tokenize_conversation(tokenizer, conv))]], tokenizer.pad_token_id)
        with torch.no_grad():
            assert score == pytest.approx(float(sequence_scores(rm, batch)[0]), abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) == 3  # different answers, different scores
    with pytest.raises(TunesmithError, match="not a reward model"):
        build_reward(_cfg(reward={"sources": [{"kind": "model", "name": "tiny"}]}).reward.sources)


def test_a_float32_policy_samples_its_rollouts_from_a_16_bit_copy_of_its_current_weights(tmp_path, monkeypatch):
    """Where rollouts come from a 16-bit copy (on CUDA, a policy mostly of float32 weights; forced here on the
    CPU), every rollout's copy holds the policy's weights of that moment, cast: updated by the steps before
    it, after a resume too. The policy trains in float32 as before."""
    from tunesmith.training import online

    assert online.rollout_copy_dtype(tiny_model(tiny_tokenizer(), seed=0), torch.bfloat16, torch.device("cpu")) is None
    seen = []
    real_generate = online.generate

    def generate(model, *a, **kw):
        policy = policies[-1]
        assert model is not policy and {p.dtype for p in model.parameters()} == {torch.bfloat16}
        for c, p in zip(model.parameters(), policy.parameters(), strict=True):
            assert torch.equal(c, p.detach().to(torch.bfloat16))
        seen.append([p.detach().clone() for p in policy.parameters()])
        return real_generate(model, *a, **kw)

    policies = []
    real_train = online._train_online
    monkeypatch.setattr(online, "_train_online",
                        lambda policy, *a, **k: policies.append(policy) or real_train(policy, *a, **k))
    monkeypatch.setattr(online, "generate", generate)
    monkeypatch.setattr(online, "rollout_copy_dtype", lambda policy, autocast, device: torch.bfloat16)
    cfg = _cfg("grpo")

    def crash(step, record):
        if step == 3:
            raise KeyboardInterrupt

    _train(cfg, tmp_path / "full")
    assert len(seen) == 4 and all(not torch.equal(a[0], b[0]) for a, b in zip(seen, seen[1:]))
    full = seen[:]
    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        _train(cfg, tmp_path / "part", on_step=crash)
    _train(cfg, tmp_path / "part", resume=True)
    assert len(seen) == 5  # steps 1-3, then 3-4 again from the checkpoint of step 2
    for a, b in zip(full, seen[:3] + seen[4:], strict=True):  # the resumed step 3 read the checkpoint's weights
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(full[2], seen[3]))
    events = (tmp_path / "full" / "events.jsonl").read_text()
    assert "rollouts generate from a bfloat16 copy of the policy" in events


def test_lora_plus_reaches_the_critic_adapter(tmp_path, monkeypatch):
    """train.lora_plus_ratio with a reward-model critic (`rl.value_model`): the critic's LoRA B matrices learn at
    rl.value_lr times the ratio, its A matrices and head at rl.value_lr, none of them decayed; the policy's
    LoRA at train.lr and train.lr times the ratio, as in fit()."""
    from tunesmith.training import online

    seen = {}
    real = online.build_scheduler
    monkeypatch.setattr(online, "build_scheduler", lambda opt, *a: seen.setdefault("opt", opt) and real(opt, *a))
    cfg = _cfg("ppo", method={"kind": "lora", "lora": {"r": 4, "alpha": 8}}, reference="adapter",
               rl={"value_model": _reward_model(tiny_tokenizer(), tmp_path / "rm"), "value_lr": 1e-2},
               train={"max_steps": 1, "lora_plus_ratio": 4.0, "weight_decay": 0.1})
    critics: list = []
    policy, _, _ = _train(cfg, tmp_path / "run", reference_kind="adapter", critic=critics)
    names = {id(p): n for n, p in critics[0].named_parameters()}
    lrs = {}
    for group in seen["opt"].param_groups:
        for p in group["params"]:
            if id(p) in names:
                assert group["weight_decay"] == 0.0
                lrs[names[id(p)]] = group["initial_lr"]  # the peak: the schedule has moved "lr" since
    assert lrs and all(lr == pytest.approx(4e-2 if ".lora_B." in n else 1e-2) for n, lr in lrs.items())
    assert {".lora_A." in n for n in lrs} == {True, False}  # A matrices and the head at value_lr
    mine = {id(p) for p in policy.parameters()}
    assert {g["initial_lr"] for g in seen["opt"].param_groups if any(id(p) in mine for p in g["params"])} == {
        1e-3, 4e-3}


def test_a_judge_rates_each_response_as_it_would_alone(tmp_path):
    """kind: judge: the judge's expected rating from its next-token probabilities over the ratings 1-9
    after "Rating:", renormalised over them and mapped to 0..1, computed here by hand from the judge's
    full logits over each prompt alone; in batches of prompts of different lengths (padded on the right,
    read at each one's last token) the scores are the same. The rubric's fields are filled in, and a
    judge that sees another response scores another number."""
    from tunesmith.data.prompts import load_prompt_items
    from tunesmith.rl.rewards import JUDGE_ANSWER, judge_prompts, load_rubric, rating_tokens

    tok = tiny_tokenizer()
    judge = tiny_model(tok, seed=0).eval()
    items = load_prompt_items(DATES, limit=4)
    completions = ["2019-02-15", "I do not know, sorry, but here is a long answer anyway.", "x", ""]
    rubric = "Question: {prompt}\nReference: {reference}\nAnswer: {response}\nScore 1-9."
    answer, tokens = rating_tokens(tok, "tiny")
    assert [tok.decode(t).strip() for t in tokens] == [str(r) for r in range(1, 10)]
    assert tok.decode(answer).strip() == JUDGE_ANSWER
    expected = []
    for ids in judge_prompts(tok, load_rubric(rubric), items, completions, answer):
        with torch.no_grad():
            logits = judge(torch.tensor([ids])).logits[0, -1]
        p = torch.softmax(logits[tokens], -1)
        expected.append((sum(r * float(p[r - 1]) for r in range(1, 10)) - 1) / 8)
    for batch_size in (1, 3, 4):
        scores = judge_reward("tiny", rubric, batch_size=batch_size)(items, completions)
        assert scores == pytest.approx(expected, abs=1e-5), batch_size
    assert len({round(s, 6) for s in expected}) == 4 and all(0 <= s <= 1 for s in expected)
    first = judge_prompts(tok, load_rubric(rubric), items[:1], ["OK"], answer)[0]
    assert "Reference: " + items[0].reference in tok.decode(first) and "Answer: OK" in tok.decode(first)


def test_judge_settings_are_checked_before_anything_loads(tmp_path):
    from tunesmith.rl.rewards import check_sources

    judge = {"kind": "judge", "name": "tiny"}
    for rubric, message in [("Rate {answer}.", "'answer'"), ("Rate it.", "never shows the judge the"),
                            (str(tmp_path / "missing.txt"), "not found")]:
        with pytest.raises(TunesmithError, match=message):
            check_sources(_cfg(reward={"sources": [{**judge, "rubric": rubric}]}).reward.sources)
    (tmp_path / "r.txt").write_text("Rate {{this}}: {response}")
    assert check_sources(_cfg(reward={"sources": [{**judge, "rubric": str(tmp_path / "r.txt")}]}).reward.sources) == [
        "judge:tiny"]
    with pytest.raises(TunesmithError, match="rubric applies to kind judge"):
        _cfg(reward={"sources": [{"kind": "task", "name": "auto", "rubric": "{response}"}]})
    with pytest.raises(TunesmithError, match="does not exist"):
        check_sources(_cfg(reward={"sources": [{"kind": "judge", "name": str(tmp_path / "nowhere")}]}).reward.sources)


def test_grpo_learns_from_a_judge(tmp_path):
    """A GRPO run whose reward is a judge's rating (the tiny model judging the tiny policy) logs the
    judge's mean as `reward/judge:tiny` and trains."""
    cfg = _cfg("grpo", reward={"sources": [{"kind": "judge", "name": "tiny"}]}, train={"max_steps": 2})
    _, _, records = _train(cfg, tmp_path / "run")
    assert [r["step"] for r in records if "reward/judge:tiny" in r] == [1, 2]
    assert all(0 < r["reward/judge:tiny"] < 1 for r in records if "reward/judge:tiny" in r)


def _default_tokenizer():
    from transformers import AutoTokenizer

    from tunesmith.models import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


def test_judge_rows_ask_what_the_judge_is_asked(tmp_path):
    """`tunesmith data make TASK --judge` rows (the right answer rated 9, a chatty one 5, a wrong one 1) train a
    judge on the very tokens `kind: judge` later feeds it: the training row's tokens up to its rating are
    the judge's prompt, "Rating:" included, and the rating is the next token, the one it reads; with the
    tiny tokenizer, which splits the space before a digit off, and with the default model's."""
    from tunesmith.data.conversation import Conversation, Message
    from tunesmith.data.prompts import load_prompt_items
    from tunesmith.data.render import tokenize_conversation
    from tunesmith.rl.rewards import judge_prompts, load_rubric, rating_tokens
    from tunesmith.tasks import write_task_files
    from tunesmith.tasks.judge import judge_rows

    train, test = write_task_files("dates", tmp_path, 20, 5, seed=1, judge=True)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert len(rows) == 40 and len(test.read_text().splitlines()) == 10
    assert {r["judged_kind"]: r["answer"] for r in rows} == {"right": "Rating: 9", "chatter": "Rating: 5",
                                                             "wrong": "Rating: 1"}
    item = load_prompt_items(DATES, limit=1)[0]
    for tok in (tiny_tokenizer(), _default_tokenizer()):
        answer, tokens = rating_tokens(tok, "judge")
        ids = judge_prompts(tok, load_rubric(None), [item], ["2019-02-15"], answer)[0]
        row = judge_rows({"messages": [{"role": m.role, "content": m.content} for m in item.prompt]
                          + [{"role": "assistant", "content": "2019-02-15"}], "answer": "2019-02-15",
                          "task": "dates"}, random.Random(0))[0]
        assert row["messages"][1]["content"] == "Rating: 9"
        conv = Conversation(tuple(Message(m["role"], m["content"]) for m in row["messages"]))
        trained, labels = tokenize_conversation(tok, conv)
        assert trained[:len(ids)] == ids  # the judge's prompt is the training row's prefix, "Rating:" included
        assert trained[len(ids)] == tokens[8] and labels[len(ids)] == tokens[8]  # then the rating 9, trained
