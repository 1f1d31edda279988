import pytest

from tunesmith._core.errors import TunesmithError
from tunesmith.config import config_from_dict, dump_config, load_config, reference_markdown

BASE = {"data": {"train": "x.jsonl"}}


def test_defaults_and_overrides_are_typed():
    cfg = config_from_dict(BASE, ["train.lr=0.001", "method.kind=full", "data.packing=true",
                                  "method.lora.target_modules=[q_proj, v_proj]", "output_dir=runs/elsewhere"])
    assert cfg.train.lr == 0.001 and cfg.method.kind == "full" and cfg.data.packing is True
    assert cfg.method.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.output_dir == "runs/elsewhere"
    assert cfg.train.micro_batch_size == 8  # default from the model, not repeated anywhere else


@pytest.mark.parametrize("bad, expect", [
    ({"trian": {"lr": 1}}, "unknown key 'trian' (did you mean 'train'?)"),
    ({"train": {"learning_rate": 1}}, "unknown key 'train.learning_rate'"),
    ({"train": {"lr_": 1}}, "did you mean 'train.lr'?"),
    ({"method": {"kind": "lora", "lora": {"rank": 8}}}, "unknown key 'method.lora.rank' (did you mean 'method.lora.r'?)"),
])
def test_unknown_keys_name_the_key_and_the_nearest(bad, expect):
    with pytest.raises(TunesmithError) as err:
        config_from_dict({**BASE, **bad})
    assert expect in str(err.value)


def test_wrong_types_and_missing_keys_are_named():
    with pytest.raises(TunesmithError, match="'train.lr'"):
        config_from_dict({**BASE, "train": {"lr": "fast"}})
    with pytest.raises(TunesmithError, match="missing required key 'data'"):
        config_from_dict({})
    with pytest.raises(TunesmithError, match="method.kind"):
        config_from_dict({**BASE, "method": {"kind": "lorra"}})
    with pytest.raises(TunesmithError, match="did you mean 'sft'"):
        config_from_dict({**BASE, "recipe": "sfft"})
    with pytest.raises(TunesmithError, match="not of the form"):
        config_from_dict(BASE, ["train.lr"])


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: a.jsonl\ntrain:\n  lr: 0.01\n")
    cfg = load_config(path, ["seed=3"])
    again = tmp_path / "resolved.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg
    with pytest.raises(TunesmithError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(TunesmithError, match="bad.yaml"):
        load_config(tmp_path / "bad.yaml")


def test_on_and_off_stay_words_in_files_and_overrides_and_booleans_still_read(tmp_path):
    # YAML 1.1 reads on/off/yes/no as booleans: `kernels: off` would reach the config as False and fail
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: a.jsonl\n  packing: yes\ntrain:\n  kernels: off\n  loss_chunking: on\n"
                    "  checkpointing: off\n  offload_activations: true\n")
    cfg = load_config(path, ["train.attention=padded", "train.compile=no", "train.kernels=on"])
    assert (cfg.train.kernels, cfg.train.loss_chunking, cfg.train.checkpointing) == ("on", "on", "off")
    assert cfg.data.packing is True and cfg.train.offload_activations is True and cfg.train.compile is False
    assert load_config(path).train.kernels == "off"


def test_reference_table_lists_every_leaf_key():
    table = reference_markdown()
    for key in ("`train.lr`", "`method.lora.r`", "`data.packing`", "`eval.task_file`", "`model.name`"):
        assert key in table


def test_every_shipped_example_config_is_valid():
    from conftest import ROOT
    from tunesmith.config import load_config

    configs = sorted((ROOT / "examples").glob("*.yaml")) + sorted((ROOT / "examples" / "tiny").glob("*.yaml"))
    assert len(configs) >= 19
    for path in configs:
        assert load_config(path).recipe in ("sft", "reward", "dpo", "ppo", "grpo", "classify", "pipeline"), path


def test_overrides_reach_list_items_and_leave_the_callers_mapping_alone():
    from tunesmith.config import config_from_dict

    raw = {"recipe": "pipeline", "model": {"name": "tiny"},
           "stages": [{"name": "a", "config": {"recipe": "sft", "data": {"train": "x.jsonl"}}}]}
    cfg = config_from_dict(raw, ["stages.0.config.train.lr=0.5", "stages.0.name=b"])
    assert cfg.stages[0].name == "b" and cfg.stage_config(0, "tiny").train.lr == 0.5
    assert raw["stages"][0] == {"name": "a", "config": {"recipe": "sft", "data": {"train": "x.jsonl"}}}
    with pytest.raises(TunesmithError, match="'3' is not an index of that list"):
        config_from_dict(raw, ["stages.3.name=c"])


@pytest.mark.parametrize("settings,named", [
    ({"train": {"fsdp": True, "precision": "fp16"}}, "precision fp16"),
    ({"train": {"fsdp": True, "weight_anchor": 1.0}}, "weight_anchor"),
    ({"train": {"fsdp": True, "compile": True}}, "compile"),
    ({"train": {"fsdp": True, "shard_optimizer": "on"}}, "shard_optimizer=on"),
    ({"train": {"fsdp": True}, "method": {"kind": "qlora"}}, "quantised base"),
    ({"train": {"fsdp": True}, "method": {"lora": {"fp8_base": True}}}, "quantised base"),
])
def test_fsdp_refuses_what_it_does_not_shard(settings, named):
    """`train.fsdp` with a setting it does not go with is an error naming both, before anything loads."""
    assert config_from_dict({**BASE, "train": {"fsdp": True}}).train.fsdp
    with pytest.raises(TunesmithError, match=f"train.fsdp does not go with .*{named}"):
        config_from_dict({**BASE, **settings})


def test_fsdp_is_refused_by_the_rl_recipes():
    """PPO and GRPO run their own loop, whose rollouts generate with the whole model."""
    with pytest.raises(TunesmithError, match="train.fsdp does not go with recipe grpo"):
        load_config("examples/tiny/grpo.yaml", ["train.fsdp=true"])


def test_pissa_and_olora_take_a_reference_that_is_the_starting_model():
    """Under method.lora.init pissa / olora the base without the adapter is the residual W - s B0 A0, not the
    model training started from: `reference: auto` takes DPO's precomputed log-probs (scored before the
    method is applied) and RL's frozen copy instead, `reference: adapter` is refused, and so is the weight
    anchor (which measures the update as s B A)."""
    dpo, grpo = "examples/tiny/dpo-sigmoid.yaml", "examples/tiny/grpo.yaml"
    lora = ["method.kind=lora", "method.lora.init=pissa"]
    assert load_config(dpo, ["method.kind=lora"]).reference_source() == "adapter"
    assert load_config(dpo, lora).reference_source() == "precomputed"
    assert load_config(grpo, ["method.kind=lora"]).reference_source() == "adapter"
    assert load_config(grpo, [*lora, "rl.kl_coef=0.1"]).reference_source() == "copy"
    for path in (dpo, grpo):
        with pytest.raises(TunesmithError, match="residual"):
            load_config(path, [*lora, "reference=adapter"])
    with pytest.raises(TunesmithError, match="starts away from 0"):
        config_from_dict({**BASE, "method": {"kind": "lora", "lora": {"init": "olora"}},
                          "train": {"weight_anchor": 1.0}})
