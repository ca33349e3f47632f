"""xlard.train.config: loading, validation, batch arithmetic; the reward factory's refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from xlard.train.config import TrainConfig, batch_arithmetic, config_from_dict, describe, load_config

REPO = Path(__file__).resolve().parents[1]


def test_shipped_shapes_config_loads_and_describes():
    cfg = load_config(REPO / "configs" / "shapes.yaml")
    assert cfg.backbone.name == "shapes" and cfg.data.prompts == "shapes:train"
    text = describe(cfg, world_size=1)
    a = batch_arithmetic(cfg, 1)
    assert f"{a['rollouts_per_step']} rollouts per step" in text
    assert a["rollouts_per_step"] == cfg.ppo.prompts_per_step * cfg.ppo.group_size
    assert json.loads(text.split("\nbatch arithmetic:")[0])["ppo"]["clip"] == cfg.ppo.clip


def test_json_and_yaml_give_the_same_config(tmp_path):
    data = {"steps": 3, "ppo": {"epochs": 2, "clip": 0.1}, "optim": {"lr": 1}}
    (tmp_path / "c.json").write_text(json.dumps(data))
    (tmp_path / "c.yaml").write_text("steps: 3\nppo:\n  epochs: 2\n  clip: 0.1\noptim:\n  lr: 1\n")
    a, b = load_config(tmp_path / "c.json"), load_config(tmp_path / "c.yaml")
    assert a == b and a.optim.lr == 1.0 and isinstance(a.optim.lr, float)


@pytest.mark.parametrize("data, match", [
    ({"stpes": 3}, r"unknown key\(s\) \['stpes'\] in the top level"),
    ({"ppo": {"epoch": 2}}, r"unknown key\(s\) \['epoch'\] in ppo"),
    ({"ppo": {"clip": 0}}, r"ppo.clip must be a finite number"),
    ({"ppo": {"epochs": 1.5}}, r"ppo.epochs must be an integer"),
    ({"ppo": {"logprob_reduction": "max"}}, r"ppo.logprob_reduction must be one of"),
    ({"rl": "reinforce"}, r"train.rl must be one of"),
    ({"anchor": "image"}, r"train.anchor must be one of"),
    ({"rl": "pathwise", "reward_model": "image"}, r"pathwise.*needs reward_model='projector'"),
    ({"data": {"prompts": "shapes:heldout"}}, r"held-out split"),
    ({"ppo": {"group_size": 1}}, r"group_size >= 2"),
    ({"ppo": {"prompts_per_step": 3, "group_size": 2, "minibatches": 4}}, r"must divide the rollouts"),
    ({"model": {"corrector_overrides": {"latent_channels": 4}}}, r"come from the backbone"),
    ({"backbone": {"correction_step": 1.5}}, r"backbone.correction_step"),
    ({"log": {"tensorboard": "yes"}}, r"log.tensorboard must be one of"),
    ({"ppo": 3}, r"ppo must be a mapping"),
])
def test_bad_configs_fail_loudly(data, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict(data)


def test_overrides_and_file_errors(tmp_path):
    cfg = config_from_dict({}, overrides={"ppo.epochs": 2, "out": "x"})
    assert cfg.ppo.epochs == 2 and cfg.out == "x"
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "c.toml").write_text("")
    with pytest.raises(ValueError, match=r"\.yaml, \.yml or \.json"):
        load_config(tmp_path / "c.toml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")


def test_batch_arithmetic_over_world_sizes():
    cfg = config_from_dict({"ppo": {"prompts_per_step": 4, "group_size": 2, "minibatches": 2}})
    one, two = batch_arithmetic(cfg, 1), batch_arithmetic(cfg, 2)
    assert one["rollouts_per_step"] == two["rollouts_per_step"] == 8
    assert (one["rollouts_per_rank"], two["rollouts_per_rank"]) == (8, 4)
    assert two["minibatch"] == 4 and two["minibatch_per_rank"] == 2
    with pytest.raises(ValueError, match="divisible by the world size"):
        batch_arithmetic(cfg, 3)


def test_default_config_roundtrip():
    cfg = TrainConfig()
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_reward_factory_refuses_what_it_cannot_honour():
    from xlard.train.config import RewardSettings
    from xlard.train.rewarding import build_reward_fn, resolve_source_name, source_backbone_options

    with pytest.raises(ValueError, match="never a training reward"):
        build_reward_fn(RewardSettings(source="evaluator"), backbone=None)
    with pytest.raises(ValueError, match="unknown source"):
        build_reward_fn(RewardSettings(source="ears"), backbone=None)
    with pytest.raises(ValueError, match="unknown options"):
        build_reward_fn(RewardSettings(source="attention", options={"x": 1}), backbone=None)
    with pytest.raises(ValueError, match="pass model="):
        build_reward_fn(RewardSettings(source="clip"), backbone=None)
    with pytest.raises(ValueError, match="unknown source"):
        source_backbone_options(RewardSettings(source="ears"), "shapes")


def test_reward_source_auto_and_backbone_options():
    from xlard.train.config import RewardSettings
    from xlard.train.rewarding import resolve_source_name, source_backbone_options

    assert resolve_source_name(RewardSettings(), "shapes") == "shapes"
    assert resolve_source_name(RewardSettings(), "some/hub-model") == "attention"
    assert source_backbone_options(RewardSettings(), "shapes") == {"capture": False}
    assert source_backbone_options(RewardSettings(source="attention"), "shapes") == {}
    with pytest.raises(ValueError, match="true or false"):
        RewardSettings(bind_color="yes")
