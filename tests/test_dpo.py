"""`recipe: dpo`: the preference objectives through the one loop, the reference model and its sources,
per-pair accumulation, exact resume, the flat and chunked layouts, and each examples/tiny config end to end."""
import contextlib
import copy
import json
import math

import pytest
import torch

from conftest import ROOT
from test_cli import read_jsonl, tunesmith
from tunesmith._core.errors import TunesmithError
from tunesmith._core.rundir import RunDir
from tunesmith.config import MethodConfig, PreferenceDataConfig, PreferenceLossConfig, TrainConfig, load_config
from tunesmith.data import collate_pairs, load_preference_data
from tunesmith.data.render import IGNORE
from tunesmith.data.unpaired import collate_unpaired, load_unpaired_data
from tunesmith.models import apply_method
from tunesmith.models.tiny import tiny_model
from tunesmith.training import fit, list_checkpoints
from tunesmith.training.loop import accumulate_gradients
from tunesmith.training.preference import (Reference, batch_logps, frozen_copy, pair_objective,
                                           precompute_reference, unpaired_objective)

PREFS = ROOT / "examples" / "data" / "dates-preferences"
LORA = MethodConfig(kind="lora", lora={"r": 4, "alpha": 8})
TINY_DPO = sorted((ROOT / "examples" / "tiny").glob("dpo-*.yaml"))


@pytest.fixture(scope="module")
def prefs(tokenizer):
    cfg = PreferenceDataConfig(train=str(PREFS / "train.jsonl"), validation=str(PREFS / "test.jsonl"), max_seq_len=256)
    return load_preference_data(cfg, tokenizer, seed=0)


def quiet(**kw):
    base = dict(progress=False, tensorboard=False, warmup_ratio=0.0, schedule="constant", lr=3e-3,
                max_grad_norm=None, save_every=None)
    return TrainConfig(**{**base, **kw})


def test_lora_dpo_at_step_zero_is_ln2_with_zero_rewards(tokenizer, prefs):
    """LoRA's B starts at zero, so policy == reference: h = 0, every loss is ln 2, every reward 0."""
    model = apply_method(tiny_model(tokenizer, seed=0), LORA)
    batch = collate_pairs(prefs.train[:8], tokenizer.pad_token_id)
    loss, n, metrics = pair_objective(PreferenceLossConfig(beta=0.1), Reference("adapter"))(model, batch)
    assert n == 8
    assert float(loss.detach()) / n == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin"):
        assert float(metrics[key]) == 0.0, key
    assert float(metrics["rewards/accuracy"]) == 4.0  # ties count half
    loss.backward()  # d loss / d pc = -beta/2 per pair: the gradient is real, not zero
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_adapter_reference_is_the_untouched_base_after_training(tokenizer, prefs, tmp_path):
    pad = tokenizer.pad_token_id
    model = apply_method(tiny_model(tokenizer, seed=0), LORA)
    batch = collate_pairs(prefs.validation[:8], pad)
    before_policy = batch_logps(model, batch)[0].detach()
    fit(model, prefs.train, [], quiet(max_steps=4), RunDir(tmp_path / "r").create(), pad_id=pad, seed=0,
        loss_fn=pair_objective(PreferenceLossConfig(), Reference("adapter")), collate_fn=collate_pairs)
    pristine = tiny_model(tokenizer, seed=0).eval()
    with torch.no_grad():
        expected = batch_logps(pristine, batch)[0]
    assert torch.allclose(Reference("adapter").logps(model, batch), expected, atol=1e-5)
    assert not torch.allclose(batch_logps(model, batch)[0].detach(), before_policy, atol=1e-3)  # the policy moved
    assert model.training  # the reference pass put the policy back into training mode


def test_copy_reference_shares_no_weight_with_the_policy_and_never_moves(tokenizer, prefs, tmp_path):
    pad = tokenizer.pad_token_id
    model = tiny_model(tokenizer, seed=0)
    ref_model = frozen_copy(model)
    model = apply_method(model, MethodConfig(kind="full"))
    policy_storage = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not policy_storage & {p.untyped_storage().data_ptr() for p in ref_model.parameters()}
    assert not any(p.requires_grad for p in ref_model.parameters()) and not ref_model.training

    batch = collate_pairs(prefs.validation[:8], pad)
    reference = Reference("copy", ref_model)
    ref_before = reference.logps(model, batch).clone()
    fit(model, prefs.train, [], quiet(max_steps=3, lr=1e-3), RunDir(tmp_path / "r").create(), pad_id=pad, seed=0,
        loss_fn=pair_objective(PreferenceLossConfig(), reference), collate_fn=collate_pairs)
    assert torch.equal(reference.logps(model, batch), ref_before)
    assert not torch.allclose(batch_logps(model, batch)[0].detach(), ref_before, atol=1e-3)


@pytest.mark.parametrize("tied", [True, False])
def test_a_copy_reference_for_bf16_training_stores_its_linear_weights_in_bf16_and_computes_the_same(
        tokenizer, prefs, tied):
    """A float32 model's copy for a run that autocasts to bf16 keeps its linear layers' weights in bf16:
    autocast rounds them so at every call, so its log-probs (from full logits, and from hidden states a
    chunk at a time) are bit for bit the float32 copy's under the same autocast. The embedding, the norms
    and an output layer tied to the embedding stay float32 (they are not cast: narrowing them would change
    what the copy computes); an untied output layer is narrowed."""
    model = tiny_model(tokenizer, seed=0)
    if tied:  # as SmolLM2 and Llama-3.2-1B are
        model.lm_head.weight = model.model.embed_tokens.weight
    wide, narrow = frozen_copy(model), frozen_copy(model, torch.bfloat16)
    assert (narrow.lm_head.weight is narrow.model.embed_tokens.weight) == tied
    linears = {n for n, m in narrow.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, p in narrow.named_parameters():  # a tied weight is named once, as the embedding's
        assert p.dtype == (torch.bfloat16 if name.rsplit(".", 1)[0] in linears else torch.float32), name
    assert narrow.lm_head.weight.dtype == (torch.float32 if tied else torch.bfloat16)
    assert sum(p.numel() * p.element_size() for p in narrow.parameters()) < 0.8 * sum(
        p.numel() * p.element_size() for p in wide.parameters())
    batch = collate_pairs(prefs.validation[:8], tokenizer.pad_token_id)
    with torch.autocast("cpu", torch.bfloat16):
        for chunked in (False, True):
            got = Reference("copy", narrow).logps(model, batch, chunked=chunked)
            assert torch.equal(got, Reference("copy", wide).logps(model, batch, chunked=chunked)), chunked
    assert frozen_copy(model.to(torch.bfloat16), torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("recipe", ["dpo", "rl"])
def test_the_recipes_copy_their_reference_for_the_autocast_training_picks(tmp_path, monkeypatch, recipe):
    """Full DPO and RL with a copy reference, where `auto` picks bf16 for float32 weights (as on a GPU):
    the copy is made for bf16, and DPO's first step still scores exactly ln 2 with a zero margin."""
    import tunesmith.recipes.dpo as dpo_recipe
    import tunesmith.recipes.rl as rl_recipe
    from tunesmith.training import precision, preference

    monkeypatch.setattr(precision, "_choose", lambda dtypes, device: ("bf16", "as on a GPU"))
    made = []
    monkeypatch.setattr(preference, "frozen_copy", lambda model, autocast=None: made.append(autocast) or frozen_copy(
        model, autocast))
    example = "dpo-sigmoid.yaml" if recipe == "dpo" else "grpo.yaml"
    cfg = load_config(str(ROOT / "examples" / "tiny" / example),
                      ["method.kind=full", "reference=copy", "train.max_steps=1", "train.progress=false",
                       "train.tensorboard=false", "train.eval_every=null", "train.save_every=null",
                       f"output_dir={tmp_path / 'run'}"])
    (dpo_recipe.run_dpo if recipe == "dpo" else rl_recipe.run_online)(cfg, say=lambda *_: None)
    assert made == [torch.bfloat16]
    if recipe == "dpo":
        first = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
        assert first["rewards/margin"] == 0 and first["loss"] == pytest.approx(math.log(2), abs=1e-7)


def test_precomputed_reference_equals_the_live_one_and_is_cached_by_fingerprint(tokenizer, prefs, tmp_path):
    pad = tokenizer.pad_token_id
    model = tiny_model(tokenizer, seed=0)
    cache = tmp_path / "ref.json"
    splits = {"train": prefs.train[:12], "validation": prefs.validation[:5]}
    out, reused = precompute_reference(model, splits, collate_pairs, pad, cache, "tiny", batch_size=5)
    assert not reused and cache.is_file()
    assert all(p.ref is not None for g in out["train"] + out["validation"] for p in g)

    batch = collate_pairs(out["train"][:8], pad)
    live = Reference("adapter").logps(apply_method(tiny_model(tokenizer, seed=0), LORA), batch)
    assert torch.allclose(Reference("precomputed").logps(model, batch), live, atol=1e-4)

    again, reused = precompute_reference(model, splits, collate_pairs, pad, cache, "tiny", batch_size=3)
    assert reused and again == out
    other, reused = precompute_reference(model, {"train": prefs.train[1:13], "validation": splits["validation"]},
                                         collate_pairs, pad, cache, "tiny")
    assert not reused  # different data: recomputed, never silently reused
    assert other["train"][0][0].ref == pytest.approx(out["train"][1][0].ref, abs=1e-4)


def test_accumulation_normalises_per_pair_over_the_window(tokenizer, prefs):
    """8 pairs in one micro-batch give the gradient of micro-batches of 1 and 7 pairs accumulated: a
    per-micro-batch mean would weigh the lone pair seven times as much as each of the others."""
    pad = tokenizer.pad_token_id
    loss_fn = pair_objective(PreferenceLossConfig(name="ipo", beta=0.5), Reference("precomputed"))
    model_a = apply_method(tiny_model(tokenizer, seed=0), LORA)
    with torch.no_grad():  # move off the zero-B start so the gradient depends on every weight
        for n, p in model_a.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    model_b = copy.deepcopy(model_a)
    rows = [[_with_ref(p) for p in g] for g in prefs.train[:8]]
    one = [collate_pairs(rows, pad)]
    split = [collate_pairs(rows[:1], pad), collate_pairs(rows[1:], pad)]
    accumulate_gradients(model_a, one, loss_fn)
    accumulate_gradients(model_b, split, loss_fn)
    ga = torch.cat([p.grad.flatten() for p in model_a.parameters() if p.grad is not None])
    gb = torch.cat([p.grad.flatten() for p in model_b.parameters() if p.grad is not None])
    assert (ga - gb).abs().max() <= 1e-5 * ga.abs().max()


def _with_ref(pair):
    from dataclasses import replace

    return replace(pair, ref=(-30.0, -45.0))


class Crash(Exception):
    pass


def test_dpo_resume_after_a_crash_matches_an_uninterrupted_run(tokenizer, prefs, tmp_path):
    pad = tokenizer.pad_token_id
    cfg = quiet(micro_batch_size=4, grad_accum=2, max_steps=6, save_every=2, schedule="cosine", warmup_ratio=0.2,
                max_grad_norm=1.0)
    lora = MethodConfig(kind="lora", lora={"r": 4, "alpha": 8, "dropout": 0.1})  # dropout: the RNG must resume too
    loss_fn = pair_objective(PreferenceLossConfig(), Reference("adapter"))
    data = prefs.train[:40]

    def run(root, on_step=None, resume=False):
        torch.manual_seed(0)  # the same LoRA A init in every run
        model = apply_method(tiny_model(tokenizer, seed=0), lora)
        return model, fit(model, data, prefs.validation[:4], cfg, RunDir(root).create() if not resume else RunDir(root),
                          pad_id=pad, seed=0, resume=resume, loss_fn=loss_fn, collate_fn=collate_pairs, on_step=on_step)

    full_model, _ = run(tmp_path / "full")

    def crash(step, record):
        if step == 5:
            raise Crash()

    with pytest.raises(Crash):
        run(tmp_path / "part", on_step=crash)
    assert [p.name for p in list_checkpoints(tmp_path / "part" / "checkpoints")][-1] == "step-4"
    model, result = run(tmp_path / "part", resume=True)
    assert result.resumed_from == 4
    ref, got = RunDir(tmp_path / "full").read_metrics(), RunDir(tmp_path / "part").read_metrics()
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for key in ("loss", "lr", "rewards/margin", "rewards/accuracy", "logps/chosen"):
        assert [r[key] for r in got if "loss" in r] == pytest.approx([r[key] for r in ref if "loss" in r], rel=1e-5), key
    for (n, a), (_, b) in zip(full_model.named_parameters(), model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_kto_starts_at_half_with_zero_kl_and_learns(tokenizer, tmp_path):
    pad = tokenizer.pad_token_id
    cfg = PreferenceDataConfig(train=str(PREFS / "train.jsonl"), validation=str(PREFS / "test.jsonl"), max_seq_len=256)
    data = load_unpaired_data(cfg, tokenizer, seed=0)
    model = apply_method(tiny_model(tokenizer, seed=0), LORA)
    loss_fn = unpaired_objective(PreferenceLossConfig(name="kto"), Reference("adapter"))
    loss, n, metrics = loss_fn(model, collate_unpaired(data.train[:8], pad))
    assert float(loss.detach()) / n == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0) for both kinds, weights 1
    assert float(metrics["kl"]) == 0.0
    run = RunDir(tmp_path / "k").create()
    fit(model, data.train, data.validation[:32], quiet(max_steps=20, micro_batch_size=8, eval_every=20), run,
        pad_id=pad, seed=0, loss_fn=loss_fn, collate_fn=collate_unpaired)
    last = [r for r in run.read_metrics() if "val_loss" in r][-1]
    assert last["val_loss"] < 0.5
    assert last["val_rewards/desirable"] > last["val_rewards/undesirable"]


def test_objectives_refuse_a_mismatched_reference():
    with pytest.raises(ValueError, match="needs"):
        pair_objective(PreferenceLossConfig(name="sigmoid"), None)
    with pytest.raises(ValueError, match="takes no"):
        pair_objective(PreferenceLossConfig(name="simpo"), Reference("adapter"))
    with pytest.raises(ValueError, match="unpaired"):
        pair_objective(PreferenceLossConfig(name="kto"), Reference("adapter"))


def test_config_resolves_the_reference_and_refuses_an_adapter_reference_without_an_adapter(tmp_path):
    base = str(ROOT / "examples" / "tiny" / "dpo-sigmoid.yaml")
    assert load_config(base).reference_source() == "adapter"
    assert load_config(base, ["method.kind=full"]).reference_source() == "precomputed"
    assert load_config(base, ["method.kind=full", "reference=copy"]).reference_source() == "copy"
    assert load_config(base, ["loss.name=simpo"]).reference_source() is None
    with pytest.raises(TunesmithError, match="reference=adapter needs an adapter method"):
        load_config(base, ["method.kind=full", "reference=adapter"])


@pytest.mark.parametrize(("overrides", "message"), [
    (["loss.name=orpo", "loss.beta=5.0"], r"loss.beta does not apply to loss.name=orpo.*orpo_lambda"),
    (["loss.name=ipo", "loss.label_smoothing=0.3"], "loss.label_smoothing does not apply to loss.name=ipo"),
    (["loss.simpo_gamma=1.0"], "loss.simpo_gamma does not apply to loss.name=sigmoid: only to simpo"),
    (["loss.orpo_lambda=0.5"], "loss.orpo_lambda does not apply"),
    (["loss.kto_desirable_weight=2.0"], "loss.kto_desirable_weight does not apply")])
def test_a_loss_setting_the_chosen_loss_never_reads_is_refused(overrides, message):
    """Accepted, it would leave the run exactly as without it while the config says otherwise."""
    base = str(ROOT / "examples" / "tiny" / "dpo-sigmoid.yaml")
    with pytest.raises(TunesmithError, match=message):
        load_config(base, overrides)
    assert load_config(base, ["loss.name=orpo", "loss.beta=0.1", "loss.orpo_lambda=0.5"]).loss.orpo_lambda == 0.5


@pytest.mark.parametrize("config", TINY_DPO, ids=lambda p: p.stem)
def test_tiny_dpo_configs_train_and_prefer_the_chosen_answers(config, tmp_path):
    out = tmp_path / "run"
    proc = tunesmith("train", config, f"output_dir={out}", "train.progress=false")
    steps = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert len(steps) == load_config(config).train.max_steps
    assert sum(r["loss"] for r in steps[-3:]) < sum(r["loss"] for r in steps[:3]), proc.stdout
    val = [r for r in read_jsonl(out / "metrics.jsonl") if "val_loss" in r][-1]
    if "val_rewards/accuracy" in val:  # pairwise losses: the policy now ranks held-out pairs better than chance
        assert val["val_rewards/accuracy"] > 0.6, val
    else:  # kto
        assert val["val_rewards/desirable"] > val["val_rewards/undesirable"], val
    marker = json.loads((out / "final" / "tunesmith.json").read_text())
    assert marker["method"] == load_config(config).method.kind and marker.get("head", "lm") == "lm"
    assert json.loads((out / "status.json").read_text())["state"] == "succeeded"


def test_sft_weight_adds_the_chosen_answers_mean_token_nll(tokenizer, prefs):
    model = apply_method(tiny_model(tokenizer, seed=0), LORA)
    batch = collate_pairs(prefs.train[:4], tokenizer.pad_token_id)
    loss, n, _ = pair_objective(PreferenceLossConfig(sft_weight=0.5), Reference("adapter"))(model, batch)
    with torch.no_grad():
        logps, n_tok = batch_logps(model, batch)
    nll = -(logps[:4] / n_tok[:4]).sum()  # per pair: mean over the chosen answer's tokens
    assert float(loss.detach()) == pytest.approx(4 * math.log(2) + 0.5 * float(nll), rel=1e-5)


def test_validate_names_file_line_and_field_of_bad_kto_rows(tmp_path):
    from conftest import write_jsonl

    bad = write_jsonl(tmp_path / "kto.jsonl", [
        {"prompt": "q", "completion": "a", "label": True},
        {"prompt": "q", "completion": "a", "label": "yes"},
        {"prompt": "q", "completion": "", "label": False},
        {"completion": "a", "label": False},
    ])
    proc = tunesmith("validate", "examples/tiny/dpo-kto.yaml", f"data.train={bad}", check=False)
    assert proc.returncode == 2 and "3 data problems" in proc.stderr, proc.stderr
    for where in ("kto.jsonl:2: field 'label'", "kto.jsonl:3: field 'completion'", "kto.jsonl:4: field 'prompt'"):
        assert where in proc.stderr, (where, proc.stderr)


LAYOUTS = [dict(flat=False, chunked=True), dict(flat=True, chunked=False), dict(flat=True, chunked=True),
           dict(flat=True, chunked=False, shared=True), dict(flat=True, chunked=True, shared=True)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["padded-chunked", "flat", "flat-chunked", "shared", "shared-chunked"])
@pytest.mark.parametrize("reference", ["adapter", "copy"])
def test_flat_and_chunked_pair_batches_give_the_padded_loss_and_gradients(tokenizer, prefs, layout, reference):
    """One padding-free row through variable-length attention, and log-probs without full logits: the same
    DPO loss, metrics and LoRA gradients as padded rows with full logits (examples of different lengths,
    so padding and cross-example attention would show)."""
    from tunesmith.models import speed

    def run(flat: bool, chunked: bool, shared: bool = False):
        torch.manual_seed(0)
        base = tiny_model(tokenizer, seed=0)
        ref = Reference("copy", frozen_copy(base)) if reference == "copy" else Reference("adapter")
        model = apply_method(base, LORA)
        with torch.no_grad():  # B = 0 would make policy == reference: move the adapter first
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        batch = collate_pairs(prefs.train[:6], tokenizer.pad_token_id, flat=flat, shared=shared)
        assert ("kv_index" in batch) == shared
        with speed.varlen_attention(model) if flat else contextlib.nullcontext():
            loss, n, metrics = pair_objective(PreferenceLossConfig(beta=0.5), ref, chunked)(model, batch)
            loss.backward()
        grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), metrics, grads

    want_loss, want_metrics, want_grads = run(False, False)
    loss, metrics, grads = run(**layout)
    assert "cu_seq_lens" in collate_pairs(prefs.train[:6], 0, flat=True)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for key in ("logps/chosen", "logps/rejected"):  # sums of ~100 token log-probs: float32 rounding only
        torch.testing.assert_close(metrics[key], want_metrics[key], rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(metrics["rewards/margin"], want_metrics["rewards/margin"], rtol=0, atol=1e-4)
    for key, g in want_grads.items():  # float32 rounding of a different summation order: relative to the norm
        assert (grads[key] - g).norm() <= 1e-4 * g.norm(), key


def _pair(prompt, chosen, rejected):
    from tunesmith.data.packing import shift_labels
    from tunesmith.data.preference import PairExample

    def side(answer):
        ids = prompt + answer
        return shift_labels(ids, [IGNORE] * len(prompt) + answer)
    return PairExample(side(chosen), side(rejected), None, 0)


def test_shared_prefix_layout_by_hand():
    """[prefix, chosen rest, rejected rest]: queries and keys per side, the rejected rest's positions going
    on from the prefix, and the position that predicts each answer token (the prefix's last predicts the
    first token of both sides). Answers that start alike share those tokens too; a side that is all
    prefix of the other keeps its last token."""
    from tunesmith.data.packing import collate_shared

    sets = [[p.chosen, p.rejected] for p in (_pair([5, 6, 7], [8, 9], [10]), _pair([5, 6], [8, 9, 4], [8, 9]))]
    b = collate_shared(sets)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 5, 6, 8, 9, 4, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 3, 4, 3]]
    assert b["cu_seq_lens"].tolist() == [0, 5, 6, 11, 12] and b["max_length"] == 5
    # pair 0: keys 0-4, then the prefix 0-2 and the rejected rest 5; pair 1 shares 5, 6, 8 (its rejected
    # side is a prefix of the chosen one, so it keeps its own last token)
    assert b["kv_index"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 8, 9, 10, 6, 7, 8, 11]
    assert b["cu_seq_lens_k"].tolist() == [0, 5, 9, 14, 18] and b["max_length_k"] == 5
    scored = sorted(zip(b["sequence"].tolist(), b["predict"].tolist(), b["target_ids"].tolist()))
    assert scored == [(0, 2, 8), (0, 3, 9), (1, 2, 10), (2, 7, 8), (2, 8, 9), (2, 9, 4),
                      (3, 7, 8), (3, 8, 9)]
    assert b["n_sequences"] == 4 and b["n_tokens"] == 12


def _ranking(prompt, answers, group=0):
    """The pairs of a ranking, best answer first: every (better, worse), as `read_preferences` makes them."""
    from dataclasses import replace
    from itertools import combinations
    return [replace(_pair(prompt, answers[i], answers[j]), group=group)
            for i, j in combinations(range(len(answers)), 2)]


def _one_row_per_side(groups):
    """The layout before distinct sequences: every side of every pair a padded row of its own."""
    from tunesmith.data.packing import collate
    pairs = [p for g in groups for p in g]
    batch = collate([[p.chosen] for p in pairs] + [[p.rejected] for p in pairs], 0)
    return {**batch, "n_loss_tokens": len(pairs), "margin": torch.zeros(len(pairs))}


def test_a_rankings_pairs_lay_out_its_prompt_and_each_answer_once_by_hand():
    """A ranking a > b > c gives the pairs (a, b), (a, c), (b, c): three distinct sequences, not six, and
    in the shared row one prompt (and the answer tokens all three start alike, here none past the prompt
    as c differs at once). The next group's sequences are numbered after them."""
    from tunesmith.data.packing import collate_shared
    from tunesmith.data.preference import by_side, distinct_sides

    groups = [_ranking([5, 6], [[7, 8], [7, 9], [10]]), _ranking([11], [[12], [13]], group=1)]
    sets, sides = distinct_sides(groups)
    assert [[ex.input_ids for ex in seqs] for seqs in sets] == [[(5, 6, 7, 8), (5, 6, 7, 9), (5, 6, 10)],
                                                                [(11, 12), (11, 13)]]
    assert sides == [0, 0, 1, 3] + [1, 2, 2, 4]  # chosen sides of the 4 pairs, then rejected sides
    assert by_side(torch.arange(5) * 10, {"sides": torch.tensor(sides)}).tolist() == [0, 0, 10, 30, 10, 20, 20, 40]

    b = collate_shared(sets)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 7, 9, 10, 11, 12, 13]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 2, 0, 1, 1]]
    assert b["cu_seq_lens"].tolist() == [0, 4, 6, 7, 9, 10]
    assert b["kv_index"].tolist() == [0, 1, 2, 3, 0, 1, 4, 5, 0, 1, 6, 7, 8, 7, 9]
    assert b["cu_seq_lens_k"].tolist() == [0, 4, 8, 11, 13, 15] and b["max_length_k"] == 4
    scored = sorted(zip(b["sequence"].tolist(), b["predict"].tolist(), b["target_ids"].tolist()))
    assert scored == [(0, 1, 7), (0, 2, 8), (1, 1, 7), (1, 4, 9), (2, 1, 10), (3, 7, 12), (4, 7, 13)]
    assert b["n_sequences"] == 5

    for flat in (False, True):  # the other layouts hold each distinct sequence once too
        assert collate_pairs(groups, 0, flat=flat)["input_ids"].numel() == (5 * 4 if not flat else 4 + 4 + 3 + 2 + 2)


@pytest.mark.parametrize("layout", [dict(flat=False), dict(flat=True), dict(flat=True, shared=True)],
                         ids=["padded", "flat", "shared"])
def test_rankings_give_the_loss_and_gradients_of_one_row_per_side(tokenizer, layout):
    """Scoring each distinct answer once and handing its log-prob to every pair it is in: the DPO loss,
    metrics and LoRA gradients of every side scored in a row of its own (a 4-way ranking with a tie, a
    3-way one, and a pair whose sides start alike)."""
    from dataclasses import replace

    from tunesmith.models import speed

    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(5, 1000, (n,), generator=g).tolist()
    common = ids(2)
    tie = ids(3)
    four = [p for p in _ranking(ids(6), [ids(4), common + ids(3), tie, tie, common + ids(1)])
            if p.chosen != p.rejected]  # the two equal answers: a tie, never a pair
    groups = [four, _ranking(ids(3), [ids(5), ids(2), ids(4)], group=1),
              [replace(_pair(ids(4), common + ids(2), common + ids(5)), group=2)]]

    def run(batch, flat, chunked):
        torch.manual_seed(0)
        model = apply_method(tiny_model(tokenizer, seed=0), LORA)
        with torch.no_grad():  # B = 0 would make policy == reference: move the adapter first
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        with speed.varlen_attention(model) if flat else contextlib.nullcontext():
            objective = pair_objective(PreferenceLossConfig(beta=0.5), Reference("adapter"), chunked)
            loss, n, metrics = objective(model, batch)
            loss.backward()
        return loss.detach(), n, metrics, {k: p.grad for k, p in model.named_parameters() if p.requires_grad}

    want_loss, want_n, want_metrics, want_grads = run(_one_row_per_side(groups), False, False)
    batch = collate_pairs(groups, 0, **layout)
    assert len(set(batch["sides"].tolist())) == 4 + 3 + 2 < 2 * want_n
    for chunked in (False, True):
        loss, n, metrics, grads = run(batch, layout["flat"], chunked)
        assert n == want_n == 9 + 3 + 1
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        for key in ("logps/chosen", "logps/rejected", "rewards/margin"):
            torch.testing.assert_close(metrics[key], want_metrics[key], rtol=1e-5, atol=1e-4)
        for key, grad in want_grads.items():
            assert (grads[key] - grad).norm() <= 1e-4 * grad.norm(), key


def test_shared_prefixes_score_as_separate_rows_do(tokenizer):
    """Sides sharing the prompt and some answer tokens, one side a prefix of the other: the shared row's
    per-sequence log-probs and token counts equal padded rows', with and without chunked log-probs."""
    from tunesmith.models import speed

    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(5, 1000, (n,), generator=g).tolist()
    common = ids(3)
    pairs = [_pair(ids(7), ids(4), ids(6)), _pair(ids(3), common + ids(2), common + ids(5)),
             _pair(ids(5), common + ids(2), common)]
    batch = collate_pairs([[p] for p in pairs], 0, flat=True, shared=True)
    model = tiny_model(tokenizer, seed=0).eval()
    with torch.no_grad():
        want = batch_logps(model, collate_pairs([[p] for p in pairs], 0))
        with speed.varlen_attention(model):
            for chunked in (False, True):
                got = batch_logps(model, batch, chunked=chunked)
                torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
                assert torch.equal(got[1], want[1])
    assert batch["n_tokens"] < collate_pairs([[p] for p in pairs], 0, flat=True)["n_tokens"] - 3 * 3


def test_a_flat_batch_scores_any_run_of_its_sequences_as_the_padded_rows_do(tokenizer):
    """KTO scores the answers and their partners separately: slices of a flat batch equal padded rows."""
    from tunesmith.models import speed

    cfg = PreferenceDataConfig(train=str(PREFS / "train.jsonl"), validation=str(PREFS / "test.jsonl"), max_seq_len=256)
    rows = load_unpaired_data(cfg, tokenizer, seed=0).train[:5]
    model = tiny_model(tokenizer, seed=0).eval()
    padded, flat = collate_unpaired(rows, 0), collate_unpaired(rows, 0, flat=True)
    n = padded["n_loss_tokens"]
    with torch.no_grad():
        for part in (slice(0, n), slice(n, 2 * n), slice(1, 3)):
            want = batch_logps(model, padded, part)
            with speed.varlen_attention(model):
                got = batch_logps(model, flat, part)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
            assert torch.equal(got[1], want[1])


def test_dpo_trains_on_the_flat_chunked_path_with_the_padded_first_step(tokenizer, prefs, tmp_path):
    """fit() picks the flat layout for DPO when the speed plan says varlen (here forced on the CPU), and
    says so; its first step's loss is the padded run's."""
    import functools

    pad = tokenizer.pad_token_id

    def first_steps(shared=False, **speed_cfg):
        torch.manual_seed(0)
        model = apply_method(tiny_model(tokenizer, seed=0), LORA)
        run = RunDir(tmp_path / f"{len(speed_cfg)}{shared}").create()
        chunked = speed_cfg.get("loss_chunking") == "on"
        fit(model, prefs.train, [], quiet(max_steps=3, micro_batch_size=4, grad_accum=2, **speed_cfg), run,
            pad_id=pad, seed=0, loss_fn=pair_objective(PreferenceLossConfig(), Reference("adapter"), chunked),
            collate_fn=collate_pairs, flat_collate_fn=functools.partial(collate_pairs, flat=True, shared=shared))
        events = [json.loads(line) for line in run.events.read_text().splitlines()]
        return run.read_metrics(), next(e["message"] for e in events if e["event"] == "speed")

    padded, padded_plan = first_steps()
    assert "padded rows" in padded_plan
    for shared in (False, True):  # each pair's sides in a row of their own, or sharing their prompt
        flat, flat_plan = first_steps(shared, attention="varlen", loss_chunking="on")
        assert "varlen" in flat_plan and "chunked" in flat_plan
        assert flat[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) == padded[0]["loss"]
        for a, b in zip(flat, padded):  # the same updates: the curves agree step for step
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
            assert a["rewards/margin"] == pytest.approx(b["rewards/margin"], abs=1e-5)
        if shared:  # the prompt is in the row once: fewer tokens for the same pairs
            assert flat[-1]["tokens"] < padded[-1]["tokens"]


def test_the_precomputed_reference_cache_is_keyed_by_the_weights_not_the_name(tokenizer, tmp_path):
    """A start model retrained in place (same path, other weights) or `tiny` with another seed must not
    reuse cached reference log-probs: the fingerprint follows the weights (and an adapter's base)."""
    from tunesmith.config import ModelConfig
    from tunesmith.models import save_final
    from tunesmith.models.load import model_fingerprint

    assert model_fingerprint(ModelConfig(name="tiny"), seed=0) != model_fingerprint(ModelConfig(name="tiny"), seed=1)
    assert model_fingerprint(ModelConfig(name="tiny")) != model_fingerprint(ModelConfig(name="tiny", dtype="bfloat16"))

    def saved(seed):
        torch.manual_seed(0)  # LoRA's A is drawn from the global generator
        model = apply_method(tiny_model(tokenizer, seed=0), LORA)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
        save_final(model, tokenizer, tmp_path / "run" / "final", base_model="tiny", method="lora")
        return model_fingerprint(ModelConfig(name=str(tmp_path / "run")))

    first, again, other = saved(1), saved(1), saved(2)
    assert first == again and first != other


@pytest.mark.parametrize("reference", ["copy", "precomputed"])
def test_freeze_on_a_bfloat16_body_starts_at_its_reference(tmp_path, reference):
    """`freeze` on a bfloat16 model (what `model.dtype: auto` loads on a GPU) trains its last block as
    float32 master weights beside the bfloat16 body, while the reference (a bfloat16 copy, or log-probs
    precomputed before training) keeps the loaded weights. Under bf16 autocast the widened block computes
    what the bfloat16 one did, so the first step's pairs still score exactly ln 2 with a zero margin."""
    from tunesmith.recipes.dpo import run_dpo

    cfg = load_config(str(ROOT / "examples" / "tiny" / "dpo-sigmoid.yaml"),
                      ["method.kind=freeze", "method.freeze.train_last_n_layers=1", "model.dtype=bfloat16",
                       f"reference={reference}", "train.max_steps=2", "train.progress=false",
                       "train.tensorboard=false", "train.eval_every=null", "train.save_every=null",
                       f"output_dir={tmp_path / 'run'}"])
    run_dpo(cfg, say=lambda *_: None)
    first, second = read_jsonl(tmp_path / "run" / "metrics.jsonl")[:2]  # then the run's summary record
    assert first["rewards/margin"] == 0 and first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert second["rewards/margin"] != 0  # the block trained
    said = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "precision" and "bfloat16 trainable tensors train in float32" in e["message"]
               for e in said)


def test_the_precomputed_reference_is_scored_under_the_precision_training_picks(tmp_path, monkeypatch):
    """Under `precision: auto`, the precomputed reference log-probs are taken under the autocast training
    then runs under: at the first step the policy is the reference, so every pair's loss is exactly ln 2
    and its reward margin 0. Here `auto` is made to pick bf16 for float32 weights (as on a GPU), where
    float32 reference log-probs would differ from the policy's bf16 ones."""
    from tunesmith.recipes.dpo import run_dpo
    from tunesmith.training import precision

    monkeypatch.setattr(precision, "_choose", lambda dtypes, device: ("bf16", "as on a GPU"))
    cfg = load_config(str(ROOT / "examples" / "tiny" / "dpo-sigmoid.yaml"),
                      ["method.kind=full", "train.max_steps=1", "train.progress=false", "train.tensorboard=false",
                       "train.eval_every=null", "train.save_every=null", f"output_dir={tmp_path / 'run'}"])
    assert cfg.reference_source() == "precomputed" and cfg.train.precision == "auto"
    run_dpo(cfg, say=lambda *_: None)
    first = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["rewards/margin"] == 0
    said = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "precision" and e["message"] == "auto: bf16 (as on a GPU)" for e in said)
    # a resume on a machine where `auto` picks otherwise scores the reference again
    assert json.loads((tmp_path / "run" / "reference_logps.json").read_text())["model"].endswith(":bf16")


def test_auto_runs_dpo_pairs_flat_with_their_prompt_once_on_a_cpu(tmp_path):
    """The DPO recipe under `train.attention: auto` on a CPU lays each prompt out once for both its answers
    (flat rows, `collate_shared`), and trains as padded rows do: the same losses, rewards and validation."""
    import tunesmith
    from tunesmith.training import loop

    layouts = []
    real = loop.plan_speed

    def plan_speed(*a, **k):
        plan = real(*a, **k)
        layouts.append((k.get("shared_prefixes"), plan.varlen))
        return plan
    records = {}
    for attention in ("padded", "auto"):
        out = tmp_path / attention
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(loop, "plan_speed", plan_speed)
            tunesmith.train(str(ROOT / "examples/tiny/dpo-sigmoid.yaml"), output_dir=str(out), train__max_steps=4,
                            train__eval_every=2, train__save_every=100, train__progress=False,
                            train__tensorboard=False, train__attention=attention)
        records[attention] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        plan = [json.loads(x)["message"] for x in (out / "events.jsonl").read_text().splitlines() if '"speed"' in x][0]
        assert ("padding-free varlen" in plan and "each prompt laid out once" in plan) == (attention == "auto"), plan
    assert layouts == [(True, False), (True, True)]
    assert len(records["auto"]) == len(records["padded"]) > 4  # training steps and validations
    for a, b in zip(records["padded"], records["auto"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key.startswith(("loss", "val_", "rewards", "logps", "grad_norm")):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
