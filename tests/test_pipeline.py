"""Sequential fine-tuning: stages chain, replay and the weight anchor reach the stage that asks for them,
the suite runs on the base and after each stage, a crash resumes without redoing finished stages, and the
forgetting report's numbers are the suites' numbers."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import ROOT
from tunesmith._core.errors import TunesmithError
from tunesmith.config import config_from_dict
from tunesmith.eval.forgetting import forgetting_markdown, forgetting_table

EXAMPLE = ROOT / "examples" / "tiny" / "pipeline.yaml"


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    """examples/tiny/pipeline.yaml, crashed as its second stage starts, then resumed."""
    import tunesmith.recipes.pipeline as pipeline
    from tunesmith import train

    out = tmp_path_factory.mktemp("pipeline") / "run"
    real = pipeline.run_stage

    def crash_second(stage_cfg, stage_dir, resume, say):
        if stage_dir.name.startswith("02"):
            raise Crash()
        return real(stage_cfg, stage_dir, resume, say)

    pipeline.run_stage = crash_second
    try:
        with pytest.raises(Crash):
            train(EXAMPLE, output_dir=str(out))
    finally:
        pipeline.run_stage = real
    first_events = (out / "stages" / "01-dates" / "events.jsonl").read_text()
    result = train(EXAMPLE, resume=True, output_dir=str(out))
    return out, result, first_events


def test_stages_chain_and_each_has_its_run_directory(pipeline_run):
    out, result, _ = pipeline_run
    import yaml

    second = yaml.safe_load((out / "stages" / "02-dates_us" / "config.yaml").read_text())
    assert second["model"]["name"] == str(out / "stages" / "01-dates")  # stage 2 starts from stage 1
    for stage in ("01-dates", "02-dates_us"):
        status = json.loads((out / "stages" / stage / "status.json").read_text())
        assert status["state"] == "succeeded" and (out / "stages" / stage / "final" / "tunesmith.json").exists()
    assert json.loads((out / "status.json").read_text())["state"] == "succeeded"
    assert (out / "final" / "adapter_model.safetensors").exists()
    card = (out / "final" / "README.md").read_text()
    assert "`dates`: sft (lora)" in card and "forgotten by the end" in card


def test_a_resumed_pipeline_does_not_redo_a_finished_stage(pipeline_run):
    out, _, first_events = pipeline_run
    assert (out / "stages" / "01-dates" / "events.jsonl").read_text() == first_events
    events = [json.loads(line)["event"] for line in (out / "events.jsonl").read_text().splitlines()]
    resumed = events[len(events) - 1 - events[::-1].index("started"):]  # from the last start on
    assert events.count("failure") == 1 and resumed.count("stage") == 2 and resumed[-1] == "finished"


def test_replay_and_anchor_reach_the_second_stage(pipeline_run):
    out, _, _ = pipeline_run
    replayed = [json.loads(line) for line in (out / "replay" / "02-dates_us.jsonl").read_text().splitlines()]
    assert len(replayed) == round(0.25 / 0.75 * 320)  # ratio 0.25 of the stage's rows, 320 of its own
    dates_rows = {line for line in (ROOT / "examples/data/dates/train.jsonl").read_text().splitlines()}
    assert all(json.dumps(r) in dates_rows for r in replayed) and len({json.dumps(r) for r in replayed}) == 107
    import yaml

    second = yaml.safe_load((out / "stages" / "02-dates_us" / "config.yaml").read_text())
    assert second["data"]["train"][-1] == str(out / "replay" / "02-dates_us.jsonl")
    metrics = [json.loads(line) for line in (out / "stages" / "02-dates_us" / "metrics.jsonl").read_text().splitlines()]
    assert all("anchor_penalty" in r for r in metrics if "loss" in r)


def test_the_report_holds_every_suite(pipeline_run):
    out, result, _ = pipeline_run
    suites = [json.loads((out / "eval" / f"suite-{k}.json").read_text())
              for k in ("00-base", "01-dates", "02-dates_us")]
    table = json.loads((out / "eval" / "forgetting.json").read_text())
    assert table["columns"] == ["base", "dates", "dates_us"]
    for metric, values in table["metrics"].items():
        assert values == [s[metric] for s in suites]
    assert set(table["metrics"]) == {"dates/exact_match", "dates_us/exact_match", "prose/perplexity"}
    assert suites[1]["prose/perplexity"] != suites[0]["prose/perplexity"]  # training changed the model
    assert (out / "eval" / "forgetting.png").stat().st_size > 1000
    assert result.before == suites[0] and result.after == suites[2]
    assert [r["stage"] for r in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())] == \
        ["base", "dates", "dates_us"]


def test_forgetting_table_by_hand():
    table = forgetting_table({"base": {"a/exact_match": 0.1, "t/perplexity": 10.0},
                              "s1": {"a/exact_match": 0.9, "t/perplexity": 12.0},
                              "s2": {"a/exact_match": 0.6, "t/perplexity": 11.0}})
    assert table["change"]["a/exact_match"] == pytest.approx([0.0, 0.8, 0.5])
    assert table["forgotten"] == pytest.approx({"a/exact_match": 0.3, "t/perplexity": 1.0})
    md = forgetting_markdown(table)
    assert "| a/exact_match | 10.0% | 90.0% (+80.0 pt) | 60.0% (+50.0 pt) | 30.0 pt |" in md
    assert "| t/perplexity | 10 | 12 (+2) | 11 (+1) | 1 |" in md


def test_perplexity_is_exp_of_the_mean_token_nll(tokenizer, tiny, tmp_path):
    from tunesmith.eval.perplexity import perplexity

    texts = ["the cat sat on the mat", "a much longer sentence about towns and rivers and markets"]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    nll, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]  # text rows end with eos
            logp = torch.log_softmax(tiny(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
            nll -= logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()
            n += len(ids) - 1
    got = perplexity(tiny, tokenizer, str(path), batch_size=2)
    assert got["tokens"] == n
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def _pipeline(**stages):
    return {"recipe": "pipeline", "model": {"name": "tiny"}, "stages": list(stages.values())}


SFT = {"recipe": "sft", "data": {"train": "examples/data/dates/train.jsonl"}}


@pytest.mark.parametrize("stages, message", [
    ({"a": {"name": "a", "config": SFT}, "b": {"name": "a", "config": SFT}}, "stage names must be unique"),
    ({"a": {"name": "a", "config": {**SFT, "model": {"name": "tiny"}}}}, "`model` is set by the pipeline"),
    ({"a": {"name": "a", "config": SFT, "replay": {"ratio": 0.2}}}, "needs an earlier sft stage"),
    ({"a": {"name": "a", "config": SFT},
      "b": {"name": "b", "config": {"recipe": "dpo", "data": {"train": "x.jsonl"}}, "replay": {"ratio": 0.2}}},
     "replay mixes rows into sft stages, not dpo"),
    ({"a": {"name": "a", "config": {**SFT, "train": {"lr_rate": 1}}}}, "stage 'a': unknown key 'train.lr_rate'"),
    ({"a": {"name": "a", "config": {**SFT, "method": {"kind": "prefix"}}}, "b": {"name": "b", "config": SFT}},
     "stage 'b' starts from stage 'a' merged into its base, but a prefix adapter is no weight update"),
    ({"a": {"name": "a", "config": {**SFT, "method": {"kind": "bottleneck"}}},
      "b": {"name": "b", "config": SFT, "adapter": "stack"},
      "c": {"name": "c", "config": {"recipe": "reward", "data": {"train": "x.jsonl"}}}},
     "stage 'c' starts from stage 'b' merged into its base, but a bottleneck adapter"),  # b stacks on it
    ({"a": {"name": "a", "config": SFT, "adapter": "stack"}}, "needs an earlier language-model stage"),
    ({"a": {"name": "a", "config": {**SFT, "method": {"kind": "full"}}},
      "b": {"name": "b", "config": SFT, "adapter": "stack"}}, "leaves no adapter to stack on"),
    ({"a": {"name": "a", "config": {**SFT, "method": {"kind": "qlora"}}},
      "b": {"name": "b", "config": SFT, "adapter": "stack"}}, "quantised.*use method.kind=qlora"),
    ({"a": {"name": "a", "config": SFT}, "b": {"name": "b", "config": {**SFT, "method": {"kind": "dora"}},
                                               "adapter": "stack"}}, "needs a method that stacks"),
    ({"a": {"name": "a", "config": SFT}, "b": {"name": "b", "adapter": "stack",
                                               "config": {"recipe": "reward", "data": {"train": "x.jsonl"}}}},
     "stack applies to language-model recipes"),
    ({"a": {"name": "a", "config": {**SFT, "method": {"kind": "prompt"}}},
      "b": {"name": "b", "config": {**SFT, "data": {**SFT["data"], "packing": True}}, "adapter": "stack"}},
     "virtual tokens before each example"),
    ({"a": {"name": "a", "config": {**SFT, "method": {"kind": "prompt"}}},
      "b": {"name": "b", "config": {"recipe": "dpo", "data": {"train": "x.jsonl"}, "train": {"attention": "varlen"}},
            "adapter": "stack"}},
     "stage 'b': the stack below has virtual tokens before each example: it needs train.attention auto or padded$"),
    ({"a": {"name": "a", "config": {**SFT, "eval": {"task_file": "${stages.b}"}}}}, r"\$\{stages.b\} names no"),
    ({"a": {"name": "a", "config": {**SFT, "method": {"kind": "ia3"}, "train": {"weight_anchor": 1.0}}}},
     "weight_anchor applies to methods full, freeze, lora and qlora"),
])
def test_pipeline_config_errors_name_the_stage(stages, message):
    with pytest.raises(TunesmithError, match=message):
        config_from_dict(_pipeline(**stages))


def test_the_pipeline_model_does_not_stack():
    with pytest.raises(TunesmithError, match=r"set stages\[i\].adapter"):
        config_from_dict({**_pipeline(a={"name": "a", "config": SFT}), "model": {"name": "tiny", "adapter": "stack"}})


def test_stacked_stages_keep_every_adapter_below_frozen_and_the_dpo_reference_is_the_stage_start(tmp_path):
    """examples/tiny/pipeline-stacked.yaml: bottleneck, then LoRA stacked, then DPO with a third adapter."""
    from safetensors.torch import load_file

    from tunesmith import train
    from tunesmith.config import ModelConfig
    from tunesmith.models import load_model_and_tokenizer
    from tunesmith.models.stack import StackedModel

    out = tmp_path / "run"
    train(ROOT / "examples" / "tiny" / "pipeline-stacked.yaml", output_dir=str(out))
    stages = out / "stages"
    markers = {d: json.loads((stages / d / "final" / "tunesmith.json").read_text())
               for d in ("01-dates", "02-dates_us", "03-prefer")}
    assert "stacked" not in markers["01-dates"] and markers["01-dates"]["base_model"] == "tiny"
    assert markers["02-dates_us"]["stacked"] and markers["02-dates_us"]["base_model"] == str(stages / "01-dates")
    assert markers["03-prefer"]["stacked"] and markers["03-prefer"]["base_model"] == str(stages / "02-dates_us")
    assert json.loads((out / "final" / "tunesmith.json").read_text()) == markers["03-prefer"]

    model, _ = load_model_and_tokenizer(ModelConfig(name=str(out)), for_training=False)
    assert isinstance(model, StackedModel) and model.depth == 2
    params = {n: p.detach() for n, p in model.get_base_model().named_parameters()}
    saved = {**load_file(str(stages / "01-dates" / "final" / "bottleneck_model.safetensors")),
             **load_file(str(stages / "02-dates_us" / "final" / "stacked_adapter.safetensors"))}
    for name, tensor in saved.items():  # what stages 1 and 2 trained is in the result, untouched since
        assert torch.equal(params[name], tensor), name
    assert any(".adapter." in n for n in saved) and any("lora_B.stack1" in n for n in saved)
    assert any(("lora_B.stack2" in n and v.abs().sum() > 0) for n, v in params.items())  # the DPO level trained
    first = json.loads((stages / "03-prefer" / "metrics.jsonl").read_text().splitlines()[0])
    # before its first update the policy is the stack below, which is the reference: no margin, loss ln 2
    assert first["rewards/margin"] == 0.0 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert "stacked on the adapters before it" in (out / "final" / "README.md").read_text()


def test_stage_references_become_run_directories():
    cfg = config_from_dict(_pipeline(
        a={"name": "rm", "config": {"recipe": "reward", "data": {"train": "examples/data/dates-preferences/train.jsonl"}}},
        b={"name": "rl", "config": {"recipe": "grpo", "data": {"train": "examples/data/dates/train.jsonl"},
                                    "reward": {"sources": [{"kind": "model", "name": "${stages.rm}"}]}}}))
    assert cfg.stage_config(1, "tiny").reward.sources[0].name == str(cfg.stage_dir(0))


def test_a_reward_stage_feeds_a_later_rl_stage_and_leaves_the_chain_alone(tmp_path):
    """sft -> reward (a side model) -> grpo scored by that reward model, started from the sft result."""
    import yaml

    from tunesmith import train

    cfg = _pipeline(
        a={"name": "sft", "config": "examples/tiny/sft-lora.yaml",
           "overrides": ["train.max_steps=2", "eval.task_file=null", "train.eval_every=null"]},
        b={"name": "rm", "config": "examples/tiny/reward-lora.yaml", "overrides": ["train.max_steps=2"]},
        c={"name": "rl", "config": "examples/tiny/grpo.yaml",
           "overrides": ["train.max_steps=2", "reward.sources=[{kind: model, name: '${stages.rm}'}]"]})
    cfg["output_dir"] = str(tmp_path / "p")
    result = train(cfg)
    stages = tmp_path / "p" / "stages"
    for name in ("02-rm", "03-rl"):
        started_from = yaml.safe_load((stages / name / "config.yaml").read_text())["model"]["name"]
        assert started_from == str(stages / "01-sft")  # the reward stage did not move the chain
    rl = yaml.safe_load((stages / "03-rl" / "config.yaml").read_text())
    assert rl["reward"]["sources"][0]["name"] == str(stages / "02-rm")
    table = json.loads((tmp_path / "p" / "eval" / "forgetting.json").read_text())
    assert table["columns"] == ["base", "sft", "rl"] and result.steps == 6


def test_validate_accepts_a_reward_model_that_an_earlier_stage_will_train():
    from tunesmith import validate

    def rl_on(source):
        return _pipeline(
            a={"name": "sft", "config": "examples/tiny/sft-lora.yaml"},
            b={"name": "rm", "config": "examples/tiny/reward-lora.yaml"},
            c={"name": "rl", "config": "examples/tiny/grpo.yaml",
               "overrides": [f"reward.sources=[{{kind: model, name: '${{stages.{source}}}'}}]"]})

    stats = validate(rl_on("rm"))
    assert stats["rl"]["reward_sources"][0].endswith("stages/02-rm")  # not run yet, and not needed to be
    with pytest.raises(TunesmithError, match="is the run of a recipe: sft stage, not a reward model"):
        validate(rl_on("sft"))


def test_a_resumed_pipeline_measures_a_changed_suite_again(tmp_path, monkeypatch):
    """The forgetting table compares columns measured alike: a suite cached with other settings is redone."""
    import yaml

    import tunesmith.recipes.pipeline as pipeline
    from tunesmith._core.rundir import RunDir

    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["eval"] = {"tasks": [{"name": "dates", "task_file": "examples/data/dates/test.jsonl", "limit": 2,
                              "max_new_tokens": 2}]}
    monkeypatch.chdir(ROOT)
    run, said = RunDir(tmp_path / "run").create(), []
    first = pipeline.measure(config_from_dict(raw), "tiny", run, "00-base", said.append)
    again = pipeline.measure(config_from_dict(raw, ["eval.batch_size=1"]), "tiny", run, "00-base", said.append)
    assert again == first and len(said) == 1  # the same suite (batch size aside): read from the cache
    raw["eval"]["tasks"][0]["limit"] = 3
    pipeline.measure(config_from_dict(raw), "tiny", run, "00-base", said.append)
    assert len(said) == 2  # measured again
