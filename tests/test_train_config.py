"""xlard.train.config: loading, validation, batch arithmetic; the reward factory's refusals."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import torch

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


def test_a_yaml_config_without_pyyaml_names_the_extra(tmp_path, monkeypatch):
    """Every missing optional dependency names its extra; PyYAML's message said "pip install pyyaml" only."""
    (tmp_path / "c.yaml").write_text("steps: 3\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml -> ImportError
    with pytest.raises(ValueError, match=r"c\.yaml is YAML: .*needs pyyaml: pip install 'xlard\[method\]' \(or "
                                         r"write the config as JSON\)"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("data, match", [
    ({"stpes": 3}, r"unknown key\(s\) \['stpes'\] in the top level"),
    ({"ppo": {"epoch": 2}}, r"unknown key\(s\) \['epoch'\] in ppo"),
    ({"ppo": {"clip": 0}}, r"ppo.clip must be a finite number"),
    ({"ppo": {"epochs": 1.5}}, r"ppo.epochs must be an integer"),
    ({"ppo": {"logprob_reduction": "max"}}, r"ppo.logprob_reduction must be one of"),
    ({"rl": "reinforce"}, r"train config: rl must be one of"),
    ({"anchor": "image"}, r"train config: anchor must be one of"),
    ({"steps": 1e9}, r"train config: steps must be an integer >= 0, got 1000000000.0"),
    ({"rl": "pathwise", "reward_model": "image"}, r"pathwise.*needs reward_model='projector'"),
    # the aspect weights came from R_phi's confidence head, which reward_model image never fits: random lambdas
    ({"reward_model": "image"}, r"reward_model='image' needs confidence='uniform'"),
    # the pathwise update walks the same minibatches: it failed after the warm start
    ({"rl": "pathwise", "ppo": {"prompts_per_step": 2, "group_size": 2, "minibatches": 3}},
     r"ppo.minibatches \(3\) must divide the rollouts per step"),
    ({"data": {"prompts": "shapes:heldout"}}, r"held-out split"),
    ({"ppo": {"group_size": 1}}, r"group_size >= 2"),
    ({"ppo": {"prompts_per_step": 3, "group_size": 2, "minibatches": 4}}, r"must divide the rollouts"),
    ({"model": {"corrector_overrides": {"latent_channels": 4}}}, r"come from the backbone"),
    ({"backbone": {"correction_step": 1.5}}, r"backbone.correction_step"),
    ({"log": {"tensorboard": "yes"}}, r"log.tensorboard must be one of"),
    ({"ppo": 3}, r"ppo must be a mapping"),
    ({"data": {"balance": "class"}}, r"data.balance must be one of"),
    ({"data": {"items_per_tag": 0}}, r"data.items_per_tag must be an integer"),
    ({"export": {"alpha_grid": []}}, r"export.alpha_grid must be a non-empty list"),
    ({"export": {"alpha_grid": [1, -2]}}, r"export.alpha_grid entry must be a finite number"),
    ({"export": {"alpha_grid": "1,2"}}, r"export.alpha_grid must be a non-empty list"),
    ({"export": {"calibration_size": 0}}, r"export.calibration_size must be an integer"),
    ({"model": {"corrector_overrides": {"reader": True}}}, r"reader: true needs the edit-target warm start"),
    ({"model": {"corrector_overrides": {"dropout": 0.1}}}, r"model.corrector_overrides.dropout must be 0 for "
                                                            r"training, got 0.1"),
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


def test_exponent_floats_read_as_numbers_in_files_and_overrides(tmp_path):
    # PyYAML (YAML 1.1) reads "3e-3" as a string; a user writes learning rates that way.
    from xlard.train import parse_overrides

    (tmp_path / "c.yaml").write_text("optim:\n  lr: 3e-4\nanchor_beta: 1E-2\nout: 1e-3-run\n")
    cfg = load_config(tmp_path / "c.yaml", overrides=parse_overrides(["ppo.clip=2e-2", "seed=7"]))
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.anchor_beta == pytest.approx(0.01)
    assert cfg.ppo.clip == pytest.approx(0.02) and cfg.seed == 7
    assert cfg.out == "1e-3-run"  # not a number: stays a string
    assert parse_overrides(["a=1e", "b='1e-3'", "c=[1e-3, 2]"]) == {"a": "1e", "b": "1e-3", "c": [0.001, 2]}


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
    with pytest.raises(ValueError, match=r"train config reward.source: unknown source 'ears'; expected 'auto' or"):
        build_reward_fn(RewardSettings(source="ears"), backbone=None)  # named get_source, not the config's key
    with pytest.raises(ValueError, match=r"train config reward.options: \['x'\] are not options of the 'attention' "
                                         r"source; it takes \['color_encoder'\]"):
        build_reward_fn(RewardSettings(source="attention", options={"x": 1}), backbone=None)
    # the shapes recipes' options kept after `--set reward.source=clip`: named as the config's key
    with pytest.raises(ValueError, match=r"reward.options: \['count_confidence'\] are not options of the 'clip'"):
        build_reward_fn(RewardSettings(source="clip", options={"count_confidence": False}), backbone=None)
    with pytest.raises(ValueError, match=r"train config reward.options.model: the 'clip' source reads a CLIP model"):
        build_reward_fn(RewardSettings(source="clip"), backbone=None)
    with pytest.raises(FileNotFoundError, match=r"train config reward.options.model: no folder at"):
        build_reward_fn(RewardSettings(source="clip", options={"model": "./no/such/clip"}), backbone=None)
    # a clip recipe's model kept after `--set reward.source=shapes`: named before the backbone loads (it was
    # "ShapesSource: model must be a ShapesUnderstanding, got str" after the load)
    from xlard.train.rewarding import check_reward_settings

    with pytest.raises(ValueError, match=r"train config reward.options.model: the 'shapes' source takes a loaded "
                                         r"model there, got 'models/clip'; give a weights folder as "
                                         r"reward.options.path"):
        check_reward_settings(RewardSettings(source="shapes", options={"model": "models/clip"}), "shapes")
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


def test_shipped_corrector_config_and_the_demo_share_one_recipe():
    """The demo trains the shipped corrector's recipe, only with fewer edit targets."""
    from xlard.demo import DEMO_ITEMS_PER_TAG, DEMO_READER_BATCH, DEMO_TRAINING, demo_config

    shipped = load_config(REPO / "configs" / "shapes_shipped.yaml").to_dict()
    demo = demo_config(Path("demo"), progress=shipped["log"]["progress"]).to_dict()
    assert demo["distill"]["items_per_tag"] == DEMO_ITEMS_PER_TAG < shipped["distill"]["items_per_tag"]
    # fewer items, a smaller reader batch: about as many reader updates
    assert demo["distill"]["reader_batch_size"] == DEMO_READER_BATCH < shipped["distill"]["reader_batch_size"] == 64
    assert demo["steps"] == shipped["steps"] == 0
    for cfg in (shipped, demo):
        cfg.pop("out")
        cfg["distill"].pop("items_per_tag")
        cfg["distill"].pop("reader_batch_size")
    assert shipped == demo
    assert config_from_dict(DEMO_TRAINING).to_dict()["distill"]["items_per_tag"] == 1000  # the shipped run's count
    assert shipped["data"]["balance"] == "tag" and shipped["data"]["prompts"] == "shapes:train"
    assert shipped["model"]["corrector_overrides"]["conditioning"] == "fields"
    assert shipped["model"]["corrector_overrides"]["reader"] is True
    assert shipped["model"]["corrector_overrides"]["reader_move"] is True  # relations moved on the reader's maps
    assert shipped["model"]["corrector_overrides"]["count_edit"] is True  # counting prompts redrawn by the editor
    assert shipped["distill"]["decoder_epochs"] > 0 and shipped["backbone"]["correction_step"] == 1.0
    # The recipe it replaced stays loadable (docs/training.md measures it).
    ppo = load_config(REPO / "configs" / "shapes_ppo.yaml")
    assert ppo.steps == 400 and ppo.distill.items_per_tag == 0
    # ... with the integer count reward its corrector was trained with, whatever the source's default count
    assert dict(ppo.reward.options) == {"count_confidence": False, "soft_count": False}


def test_balanced_pairs_give_every_tag_the_same_items():
    from collections import Counter

    from xlard.train.data import PromptData, balanced_pairs

    records = [{"tag": "big", "i": i} for i in range(50)] + [{"tag": "small", "i": i} for i in range(3)]
    pairs = balanced_pairs(records, 8, seed=0)
    tags = Counter(records[r]["tag"] for r, _ in pairs)
    assert tags == {"big": 8, "small": 8}
    assert len(set(pairs)) == len(pairs)
    # The small tag repeats its 3 prompts under seeds 0..2; the big one takes 8 distinct prompts at seed 0.
    assert {s for r, s in pairs if records[r]["tag"] == "small"} == {0, 1, 2}
    assert all(s == 0 for r, s in pairs if records[r]["tag"] == "big")
    assert balanced_pairs(records, 8, seed=0) == pairs and balanced_pairs(records, 8, seed=1) != pairs
    data = PromptData(records, 4, 4, seed=0, balance="tag", items_per_tag=8)
    assert data.num_batches == 4
    seen = Counter(it.record["tag"] for b in range(4) for it in data.batch(b)[1])
    assert seen == {"big": 8, "small": 8}
    with pytest.raises(ValueError, match="balance"):
        PromptData(records, 4, 4, seed=0, balance="class")
    with pytest.raises(ValueError, match="fewer than ppo.prompts_per_step"):
        PromptData(records, 4, 40, seed=0, balance="tag", items_per_tag=8)


def test_leave_out_prompts_holds_back_a_share_of_every_tag():
    from collections import Counter

    from xlard.train.data import leave_out_prompts

    records = ([{"tag": "big", "i": i} for i in range(40)] + [{"tag": "small", "i": i} for i in range(3)]
               + [{"tag": "one", "i": 0}])
    kept, left = leave_out_prompts(records, 0.2, seed=0)
    assert Counter(r["tag"] for r in left) == {"big": 8, "small": 1}  # round(0.6) = 1; a lone prompt stays
    assert len(kept) + len(left) == len(records) and not any(r in kept for r in left)
    # both lists keep the records' order; the pick depends on the seed and is reproducible
    assert kept == [r for r in records if r not in left] and left == [r for r in records if r in left]
    assert leave_out_prompts(records, 0.2, seed=0) == (kept, left)
    assert leave_out_prompts(records, 0.2, seed=1)[1] != left
    # at least one left out per tag of two or more prompts, never all of them
    assert Counter(r["tag"] for r in leave_out_prompts(records, 0.01, 0)[1]) == {"big": 1, "small": 1}
    assert Counter(r["tag"] for r in leave_out_prompts(records, 0.99, 0)[0]) == {"big": 1, "small": 1, "one": 1}
    assert leave_out_prompts(records, 0.0, 0) == (records, [])
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="data.leave_out"):
            leave_out_prompts(records, bad, 0)


@pytest.mark.parametrize("bad", [-0.1, 1.0, True, "0.2"])
def test_leave_out_is_validated(bad):
    with pytest.raises(ValueError, match=r"data\.leave_out must be a finite number in \[0.0, 1.0\)"):
        config_from_dict({"data": {"leave_out": bad}})


@pytest.mark.parametrize("name, content, pattern", [
    ("list.json", b"[1, 2]", r"list.json must hold a mapping of fields at the top level .*got list \[1, 2\]"),
    ("str.json", b'"steps"', r"str.json must hold a mapping .*got str 'steps'"),
    ("list.yaml", b"- steps\n", r"list.yaml must hold a mapping .*got list \['steps'\]"),
    ("binary.yaml", b"steps: 1\n\xa8\xff\x00", r"binary.yaml is not UTF-8 text \(byte 0xa8 at offset 9\)"),
])
def test_a_config_file_that_is_not_a_mapping_is_named(tmp_path, name, content, pattern):
    """A JSON list gave a TypeError traceback, a JSON string Python's "dictionary update sequence" text and a
    binary file the codec's error without the file; each is one ValueError naming the file now."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=pattern):
        load_config(path)


def test_config_from_dict_refuses_what_is_not_a_mapping():
    with pytest.raises(ValueError, match=r"the top level must be a mapping of fields .*got list \[1\]"):
        config_from_dict([1])


def test_a_config_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbfsteps: 7\n")
    assert load_config(path).steps == 7


def test_a_seed_beyond_what_torch_takes_is_named():
    """seed: 99999999999999999999999 gave torch's "Overflow when unpacking long long" once the run started."""
    with pytest.raises(ValueError, match=r"train config: seed must be an integer in 0..18446744073709551615"):
        config_from_dict({"seed": 10**23})
    assert config_from_dict({"seed": 2**64 - 1}).seed == 2**64 - 1


def test_train_and_describe_name_a_config_that_is_not_loaded():
    """`train("configs/shapes.yaml")` and `train({...})` gave "'str' object has no attribute 'backbone'"."""
    from xlard.train import describe, train
    from xlard.train.config import batch_arithmetic

    for call, who in ((train, "train"), (describe, "describe"), (lambda c: batch_arithmetic(c, 1), "batch_arithmetic")):
        with pytest.raises(TypeError, match=rf"{who}: cfg must be an xlard.train.TrainConfig, got str; load the "
                                            rf"file first: {who}\(load_config\('configs/shapes.yaml'\)\)"):
            call("configs/shapes.yaml")
        with pytest.raises(TypeError, match=rf"got dict; build it from the mapping first: {who}\(config_from_dict"):
            call({"steps": 3})
        with pytest.raises(TypeError, match="got NoneType; load one with load_config"):
            call(None)


def test_the_ppo_clip_default_is_the_documented_one():
    """docs/training.md: under the default mean ratio reduction the clip range is 0.01; a config leaving
    ppo.clip out got 0.2, which never clips there."""
    cfg = config_from_dict({})
    assert cfg.ppo.logprob_reduction == "mean" and cfg.ppo.clip == 0.01


def test_describe_counts_the_pathwise_updates():
    """The pathwise update takes ppo.epochs x ppo.minibatches optimiser steps; describe() said 1."""
    from xlard.train.config import batch_arithmetic, describe

    cfg = config_from_dict({"rl": "pathwise", "ppo": {"prompts_per_step": 2, "group_size": 2, "epochs": 3,
                                                      "minibatches": 2}})
    assert batch_arithmetic(cfg, 1)["updates_per_step"] == 6 and batch_arithmetic(cfg, 1)["minibatch"] == 2
    assert "6 optimiser steps per pathwise step (minibatch 2 = 2 per process)" in describe(cfg)


def test_describe_plans_only_the_work_that_runs():
    """A run with steps 0 and reward_model image (the shipped recipe, the demo) printed a PPO plan: 8 optimiser
    steps per PPO step, 64 decodes per step and an R_phi warm start of 4 batches, none of which runs."""
    from xlard.train.config import describe

    text = describe(config_from_dict({"steps": 0, "reward_model": "image", "confidence": "uniform", "rl": "ppo",
                                      "distill": {"items_per_tag": 4}})).split("batch arithmetic:")[1]
    assert "steps: 0: no PPO step runs" in text and "warm start: none (reward_model=image" in text
    assert "optimiser steps" not in text and "decodes per step" not in text and "perturbed latents" not in text
    assert text.rstrip().endswith("epochs of regression")
    text = describe(config_from_dict({"steps": 3, "reward_model": "projector"})).split("batch arithmetic:")[1]
    assert "optimiser steps per PPO step" in text and "perturbed latents decoded" in text
    assert "no PPO step runs" not in text


def test_an_unbounded_range_reads_open():
    """"must be a finite number in (0.0, inf]" contradicted itself."""
    with pytest.raises(ValueError, match=r"optim\.lr must be a finite number in \(0\.0, inf\), got 'abc'"):
        config_from_dict({"optim": {"lr": "abc"}})


def test_leave_out_prompts_never_splits_a_repeated_record():
    """`xlard prompts -n` samples with repeats: one copy kept and one left out made a trained prompt 'unseen'."""
    from xlard.train.data import leave_out_prompts

    records = [{"tag": "a", "prompt": p} for p in ("p", "q", "p", "r", "q", "s")]
    for seed in range(20):
        kept, left = leave_out_prompts(records, 0.3, seed)
        assert not {r["prompt"] for r in kept} & {r["prompt"] for r in left}, seed
        assert len(kept) + len(left) == len(records) and left


def test_yaml_scalars_follow_yaml_1_2_and_keys_are_unique(tmp_path):
    (tmp_path / "a.yaml").write_text("seed: 010\nlog:\n  tensorboard: off\n")
    cfg = load_config(tmp_path / "a.yaml")
    assert cfg.seed == 10 and cfg.log.tensorboard == "off"  # YAML 1.1 read 8 and False
    (tmp_path / "b.yaml").write_text("steps: 1:30\n")  # YAML 1.1: 90
    with pytest.raises(ValueError, match="steps"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "d.yaml").write_text("ppo:\n  epochs: 3\nppo:\n  minibatches: 1\n")
    with pytest.raises(ValueError, match=r"not valid YAML: duplicate key 'ppo' \(first at line 1\)"):
        load_config(tmp_path / "d.yaml")
    (tmp_path / "d.json").write_text('{"ppo": {"epochs": 3}, "ppo": {"minibatches": 1}}')
    with pytest.raises(ValueError, match=r"not valid JSON: duplicate key 'ppo'"):
        load_config(tmp_path / "d.json")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        load_config(tmp_path)


def test_overflowing_numbers_and_bad_set_values_are_named():
    from xlard.train import parse_overrides

    for data, key in (({"optim": {"lr": 10**400}}, "optim.lr"), ({"export": {"alpha_grid": [10**400]}}, "alpha_grid"),
                      ({"backbone": {"guidance_scale": 10**400}}, "backbone.guidance_scale")):
        with pytest.raises(ValueError, match=key):
            config_from_dict(data)
    for item in ("ppo.epochs=[1", "ppo.epochs=*a"):
        with pytest.raises(ValueError, match=r"--set .*: not a valid value"):
            parse_overrides([item])
    assert parse_overrides(["log.tensorboard=off", "seed=010"]) == {"log.tensorboard": "off", "seed": 10}


@pytest.mark.parametrize("data, key", [
    ({"data": {"seeds_per_prompt": 10**9}}, "data.seeds_per_prompt"),
    ({"data": {"monitor_size": 10**9}}, "data.monitor_size"),
    ({"trainer_threads": 10**8}, "trainer_threads"),
    ({"export": {"alpha_grid": [1.0, 1e30]}}, "alpha_grid"),
    ({"export": {"calibration_size": 10**9}}, "export.calibration_size"),
])
def test_sizes_are_bounded(data, key):
    with pytest.raises(ValueError, match=key):
        config_from_dict(data)


def test_paths_starting_with_a_tilde_are_the_home_folder(monkeypatch, tmp_path):
    """"out: ~/runs/x" made a folder named "~" in the working folder; "data.prompts: ~/p.jsonl" was not found."""
    import os

    from xlard.train import config_from_dict

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = config_from_dict({"out": "~/runs/x", "data": {"prompts": "~/p.jsonl", "monitor_prompts": "~/m.jsonl"}})
    assert cfg.out == os.path.join(str(tmp_path), "runs/x")
    assert cfg.data.prompts == os.path.join(str(tmp_path), "p.jsonl")
    assert cfg.data.monitor_prompts == os.path.join(str(tmp_path), "m.jsonl")
    assert config_from_dict({}).data.prompts == "shapes:train"


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE .* must be an integer >= 1, got '0'"),
    ({"WORLD_SIZE": "-2"}, "WORLD_SIZE .* must be an integer >= 1, got '-2'"),
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE .* got 'abc'"),
    ({"WORLD_SIZE": "1", "RANK": "3"}, r"RANK .*WORLD_SIZE=1.* must be an integer in 0\.\.0, got '3'"),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, r"RANK .* must be an integer in 0\.\.1, got '-1'"),
    ({"WORLD_SIZE": "2", "RANK": "5"}, r"RANK .* must be an integer in 0\.\.1, got '5'"),
    ({"LOCAL_RANK": "x"}, "LOCAL_RANK .* got 'x'"),
])
def test_torchrun_variables_out_of_range_are_refused_naming_them(monkeypatch, env, message):
    """WORLD_SIZE=-2 started a run that wrote its folder and died in a traceback; WORLD_SIZE=0 divided by zero; a
    RANK past WORLD_SIZE read as "prompts must not be empty", or waited on a rendezvous no process would join."""
    from xlard.train.trainer import _dist_info

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        _dist_info()


def test_torchrun_variables_are_read_when_in_range(monkeypatch):
    from xlard.train.trainer import _dist_info

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert _dist_info() == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _dist_info() == (3, 4, 1)


def test_a_backbones_own_error_is_named_by_its_config_key():
    """xlard train printed DiffusersBackbone's parameter names ("guidance_scale: ...", "pipeline: ...",
    "height must be ...") where the user wrote backbone.guidance_scale, backbone.name, backbone.options.height."""
    from xlard.train.config import BackboneSettings
    from xlard.train.trainer import _backbone_config_error

    settings = BackboneSettings(name="/x", options={"height": 33, "max_sequence_length": 32})
    cases = {
        "guidance_scale: this FluxPipeline has no guidance embedding": "train config backbone.guidance_scale: this "
                                                                         "FluxPipeline has no guidance embedding",
        "pipeline: X is not supported": "train config backbone.name: X is not supported",
        "model_id_or_path: /x has no vae/": "train config backbone.name: /x has no vae/",
        "height must be a multiple of 2": "train config backbone.options.height: height must be a multiple of 2",
        "max_sequence_length applies to T5": "train config backbone.options.max_sequence_length: max_sequence_length "
                                             "applies to T5",
        "correction_step=0.5 < 1 with UniPC": "train config backbone.correction_step: correction_step=0.5 < 1 with "
                                              "UniPC",
    }
    for text, want in cases.items():
        assert _backbone_config_error(text, settings) == want
    # a folder's own error of a type that takes other arguments (a tokenizer file of non-UTF-8 bytes) is still
    # named, not turned into "function takes exactly 5 arguments"
    import tempfile

    import xlard.backbones as backbones
    from xlard.train import trainer as tr

    def undecodable(*args, **kwargs):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "model_index.json").write_text("{}")
        original = backbones.DiffusersBackbone.from_pretrained
        backbones.DiffusersBackbone.from_pretrained = undecodable
        try:
            with pytest.raises(ValueError, match=r"^train config backbone.name: 'utf-8' codec can't decode"):
                tr.load_backbone(BackboneSettings(name=folder, dtype="float32"), torch.device("cpu"))
        finally:
            backbones.DiffusersBackbone.from_pretrained = original


def test_loading_a_backbone_leaves_the_diffusers_verbosity_alone(monkeypatch, tmp_path):
    """load_backbone (train(), the demo) set the 'diffusers' logger to ERROR for good: a program calling train()
    lost diffusers' warnings afterwards. Quiet while loading only, on success and on failure."""
    from diffusers.utils import logging as diffusers_logging

    import xlard.backbones as backbones
    from xlard.shapes import backbone as shapes_backbone
    from xlard.train import trainer as tr
    from xlard.train.config import BackboneSettings

    saved = diffusers_logging.get_verbosity()
    try:
        diffusers_logging.set_verbosity_info()
        if shapes_backbone.is_available():  # a real load (diffusers' own loading code runs)
            tr.load_backbone(BackboneSettings(name="shapes"), torch.device("cpu"))
            assert diffusers_logging.get_verbosity() == diffusers_logging.INFO
        seen = []

        def loading(*args, **kwargs):
            seen.append(diffusers_logging.get_verbosity())
            raise ValueError("no such pipeline")

        (tmp_path / "model_index.json").write_text("{}")
        monkeypatch.setattr(backbones.DiffusersBackbone, "from_pretrained", loading)
        with pytest.raises(ValueError):
            tr.load_backbone(BackboneSettings(name=str(tmp_path), dtype="float32"), torch.device("cpu"))
        assert seen == [diffusers_logging.ERROR] and diffusers_logging.get_verbosity() == diffusers_logging.INFO
    finally:
        diffusers_logging.set_verbosity(saved)
    if not shapes_backbone.is_available():
        return
    # the first load imports diffusers, whose import sets its level (WARNING by default): a level saved before that
    # import and put back after it (NOTSET) handed diffusers' records to the program's root level (INFO here)
    import os
    import subprocess
    import sys

    code = ("import logging, torch; logging.basicConfig(level=logging.INFO)\n"
            "from xlard.train import trainer as tr; from xlard.train.config import BackboneSettings\n"
            "tr.load_backbone(BackboneSettings(name='shapes'), torch.device('cpu'))\n"
            "from diffusers.utils import logging as d; print(d.get_verbosity())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == str(diffusers_logging.WARNING), out.stdout


def test_load_backbone_without_diffusers_names_the_extra(monkeypatch):
    """Quieting diffusers' logging imported it bare before DiffusersBackbone could name the extra: `xlard train`
    and `xlard demo` said only "No module named 'diffusers'"."""
    import sys

    from xlard.train import trainer as tr
    from xlard.train.config import BackboneSettings

    for name in [m for m in sys.modules if m == "diffusers" or m.startswith("diffusers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(ImportError, match=r"needs diffusers: pip install 'xlard\[method\]'"):
        tr.load_backbone(BackboneSettings(name="shapes"), torch.device("cpu"))


def test_warm_start_errors_of_an_aspect_no_prompt_asks_read_n_a():
    """The console printed 'mse count/color/position 0.0185/nan/0.0001' (metrics.jsonl: null), which reads as a run
    that diverged."""
    from xlard.train.trainer import _aspect_mse_text

    assert _aspect_mse_text({"mse_count": 0.0185, "mse_color": float("nan"), "mse_position": 1e-4}) == \
        "0.0185/n/a/0.0001"
    assert _aspect_mse_text({"mse_count": 0.5, "mse_color": 0.25, "mse_position": 0.125}) == "0.5000/0.2500/0.1250"


# ---------------------------------------------------------------- config fixes (override values, bounds, --set, YAML)

@pytest.mark.parametrize("section, overrides, key", [
    ("corrector_overrides", {"width": "16"}, "model.corrector_overrides.width"),
    ("corrector_overrides", {"dropout": "0.1"}, "model.corrector_overrides.dropout"),
    ("corrector_overrides", {"action_block": 0}, "model.corrector_overrides.action_block"),
    ("corrector_overrides", {"width": 30}, "model.corrector_overrides.width"),
    ("projector_overrides", {"depth": "2"}, "model.projector_overrides.depth"),
])
def test_override_values_are_checked_by_their_config_class_at_load(section, overrides, key):
    """A bad override value failed only when the trainer built the corrector, after the backbone had loaded."""
    section_key, field = key.rsplit(".", 1)
    with pytest.raises(ValueError, match=rf"^train config: {section_key}: \w+Config: .*{field}.*\(the key {key}\)$"):
        config_from_dict({"model": {section: overrides}})


def test_reader_with_text_conditioning_is_refused_at_load():
    data = {"distill": {"items_per_tag": 1}, "backbone": {"correction_step": 1.0},
            "model": {"corrector_overrides": {"reader": True, "conditioning": "text"}}}
    with pytest.raises(ValueError, match=r"CorrectorConfig: reader needs conditioning 'fields'.*"
                                         r"\(the key model.corrector_overrides.reader\)"):
        config_from_dict(data)
    data["model"]["corrector_overrides"]["conditioning"] = "fields"  # reader_nouns come from the trainer: fine
    assert config_from_dict(data).model.corrector_overrides["reader"] is True


def test_backbone_sampler_settings_are_bounded_by_the_backbones_own_bounds():
    from xlard.backbones import diffusers_backbone
    from xlard.train import config

    assert (config.MAX_INFERENCE_STEPS, config.MAX_GUIDANCE) == (diffusers_backbone.MAX_STEPS,
                                                                  diffusers_backbone.MAX_GUIDANCE)
    with pytest.raises(ValueError, match=r"backbone.num_inference_steps must be an integer in \[1, 10000\]"):
        config_from_dict({"backbone": {"num_inference_steps": 10001}})
    with pytest.raises(ValueError, match=r"backbone.guidance_scale must be a finite number in \[0.0, 1000.0\]"):
        config_from_dict({"backbone": {"guidance_scale": 1e308}})
    assert config_from_dict({"backbone": {"num_inference_steps": 10000, "guidance_scale": 1000}}).backbone \
        .guidance_scale == 1000.0


def test_set_of_a_section_as_a_mapping_keeps_its_other_keys():
    """--set 'ppo={epochs: 3}' reset the file's prompts_per_step and group_size to their defaults."""
    from xlard.train import parse_overrides

    data = {"ppo": {"prompts_per_step": 4, "group_size": 8, "minibatches": 4}, "reward": {"options": {"a": 1}}}
    ppo = config_from_dict(data, parse_overrides(["ppo={epochs: 3}"])).ppo
    assert (ppo.prompts_per_step, ppo.group_size, ppo.minibatches, ppo.epochs) == (4, 8, 4, 3)
    for items, epochs, whiten in ((["ppo={epochs: 3}", "ppo={whiten: false}"], 3, False),  # the earlier one kept
                                  (["ppo.epochs=2", "ppo={whiten: false}"], 2, False),
                                  (["ppo={epochs: 3}", "ppo.epochs=2", "ppo={whiten: false}"], 2, False),
                                  (["ppo.epochs=2", "ppo={epochs: 5}"], 5, True),
                                  (["ppo={epochs: 5}", "ppo.epochs=2"], 2, True)):
        ppo = config_from_dict(data, parse_overrides(items)).ppo
        assert (ppo.epochs, ppo.whiten, ppo.group_size) == (epochs, whiten, 8), items
    # a free-form mapping field is replaced as a whole, as documented
    assert config_from_dict(data, parse_overrides(["reward={options: {b: 2}}"])).reward.options == {"b": 2}
    assert config_from_dict(data, {"ppo": {"epochs": 3}}).ppo.group_size == 8  # the API's overrides too


def test_seeds_per_prompt_times_prompts_is_bounded_before_the_pairs_are_built():
    from xlard.train.config import MAX_ITEMS
    from xlard.train.data import PromptData

    # (969 prompts x 10**6 seeds exhausted the memory; just over the bound here, so that the old code fails cleanly)
    records = [{"prompt": f"a photo of {i} cats", "tag": "counting"} for i in range(3)]
    with pytest.raises(ValueError, match=rf"3 prompts x data.seeds_per_prompt=400000 = 1200000 items, more "
                                         rf"than the bound of {MAX_ITEMS}"):
        PromptData(records, 400_000, 8, 0)
    assert PromptData(records[:1], MAX_ITEMS, 8, 0).num_batches == MAX_ITEMS // 8
    # balance 'tag': tags x items_per_tag (each factor alone was bounded)
    tagged = [{"prompt": f"a photo of {i} cats", "tag": f"t{i}"} for i in range(3)]
    with pytest.raises(ValueError, match=rf"data: 3 tags x data.items_per_tag=400000 = 1200000 items, more than the "
                                         rf"bound of {MAX_ITEMS} items; lower data.items_per_tag"):
        PromptData(tagged, 1, 8, 0, balance="tag", items_per_tag=400_000)
    assert len(PromptData(tagged, 1, 8, 0, balance="tag", items_per_tag=4)._pairs) == 12


def test_rollouts_per_step_are_bounded():
    """ppo.group_size 10**8 died with a raw allocator error after the backbone loaded."""
    with pytest.raises(ValueError, match=r"ppo.group_size must be an integer in \[1, 1000000\]"):
        config_from_dict({"ppo": {"group_size": 10**8, "minibatches": 1}})
    with pytest.raises(ValueError, match=r"ppo.prompts_per_step \* ppo.group_size \(the rollouts per step\) must be "
                                         r"at most 1000000, got 1000 \* 2000 = 2000000"):
        config_from_dict({"ppo": {"prompts_per_step": 1000, "group_size": 2000, "minibatches": 1}})


@pytest.mark.parametrize("item", ["out=my run #1", "out=&a x", "out=*a", "out=!!str 5", "out=#1",
                                  "data.prompts=p.jsonl # the prompts"])
def test_set_values_that_yaml_would_cut_are_refused_with_the_quoting(item):
    """--set "out=my run #1" gave 'my run', --set "out=&a x" gave 'x'."""
    from xlard.train import parse_overrides

    with pytest.raises(ValueError, match=r"not a valid value \(YAML reads .*; to set the text, quote it: --set ") \
            as e:
        parse_overrides([item])
    # the advice, as a shell reads it, sets the text
    advised = shlex.split(str(e.value).split("quote it: --set ", 1)[1])
    key, text = item.split("=", 1)
    assert len(advised) == 1 and parse_overrides(advised) == {key: text.strip()}


@pytest.mark.parametrize("item", ["out=runs/#1 #2", "reward.options={a: 'x #1'} # note", "out=it's #1",
                                  "out=!!str $HOME \"x\"", 'out="a\\t#1" #note', "out=[&a 'p #q', *a] #lost"])
def test_set_values_losing_a_comment_beside_a_kept_hash_are_refused(item):
    """'out=runs/#1 #2' kept a '#' and lost ' #2' without a word; the advice is safe in an interactive shell."""
    from xlard.train import parse_overrides

    with pytest.raises(ValueError, match=r"not a valid value \(YAML reads ") as e:
        parse_overrides([item])
    advice = str(e.value).split("quote it: --set ", 1)[1]
    assert advice.startswith("'")  # shell single quotes: no history or variable expansion
    key, text = item.split("=", 1)
    assert parse_overrides(shlex.split(advice)) == {key: text.strip()}


def test_set_values_with_a_kept_hash_or_quotes_pass():
    from xlard.train import parse_overrides

    assert parse_overrides(["out=runs/#1", "data.prompts=a#b.jsonl"]) == {"out": "runs/#1",
                                                                         "data.prompts": "a#b.jsonl"}
    assert parse_overrides(["out='my run #1'"]) == {"out": "my run #1"}
    assert parse_overrides(['out="a\\\n#b"']) == {"out": "a#b"}  # an escaped line break before a '#'
    assert parse_overrides(["out='&a x'"]) == {"out": "&a x"}
    assert parse_overrides(['reward.options={a: "x #1"}']) == {"reward.options": {"a": "x #1"}}


def test_yaml_merge_keys_are_read(tmp_path):
    """`<<: *base` failed with "could not determine a constructor for the tag 'tag:yaml.org,2002:merge'"."""
    import yaml

    from xlard.train.config import yaml_load

    path = tmp_path / "c.yaml"

    text = "a: &a {epochs: 3, minibatches: 4}\nppo:\n  <<: *a\n  epochs: 2\n  group_size: 8\n"
    assert yaml_load(text)["ppo"] == {"epochs": 2, "minibatches": 4, "group_size": 8}  # explicit keys win
    assert yaml_load("a: &a {x: 1}\nb: &b {y: 2}\nc:\n  <<: [*a, *b]\n")["c"] == {"x": 1, "y": 2}
    path.write_text("ppo: &p\n  prompts_per_step: 4\n  group_size: 8\n  minibatches: 4\nprojector:\n"
                    "  <<: *p\n", encoding="utf-8")  # a merged key the section lacks is named as unknown
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['group_size', 'prompts_per_step'\] in projector"):
        load_config(path)
    path.write_text("ppo:\n  <<: 5\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"not valid YAML: .*line 2.*expected a mapping or list of mappings"):
        load_config(path)
    with pytest.raises(yaml.YAMLError, match=r"duplicate key 'epochs'"):  # a key given twice is still an error
        yaml_load("a: &a {x: 1}\nppo:\n  <<: *a\n  epochs: 2\n  epochs: 3\n")


def test_numpy_numbers_become_plain_numbers():
    """A numpy int passed the checks and then broke writing config.json after the backbone had loaded."""
    import dataclasses

    import numpy as np

    cfg = config_from_dict({})
    cfg = dataclasses.replace(cfg, steps=np.int64(2), ppo=dataclasses.replace(cfg.ppo, epochs=np.int32(3)),
                              optim=dataclasses.replace(cfg.optim, lr=np.float32(0.5)))
    assert (type(cfg.steps), type(cfg.ppo.epochs), type(cfg.optim.lr)) == (int, int, float)
    assert json.loads(json.dumps(cfg.to_dict()))["steps"] == 2
    assert config_from_dict(cfg.to_dict()) == cfg
    # inside the mapping fields too (they broke config.json after the backbone had loaded)
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, options={"height": np.int64(64)}),
                              model=dataclasses.replace(cfg.model, corrector_overrides={"depth": np.int64(1)}),
                              reward=dataclasses.replace(cfg.reward, options={"t": [np.float32(0.5), np.bool_(True)]}))
    assert type(cfg.backbone.options["height"]) is int and type(cfg.model.corrector_overrides["depth"]) is int
    assert [type(v) for v in cfg.reward.options["t"]] == [float, bool]
    assert json.loads(json.dumps(cfg.to_dict()))["model"]["corrector_overrides"] == {"depth": 1}


def test_alpha_grid_takes_a_list_refuses_duplicates_and_is_bounded():
    from xlard.train.config import ExportSettings

    assert ExportSettings(alpha_grid=[1.0, 2.0]).alpha_grid == (1.0, 2.0)
    with pytest.raises(ValueError, match=r"export.alpha_grid must be distinct multipliers \(\[1.0\] given more than "
                                         r"once\)"):
        config_from_dict({"export": {"alpha_grid": [1.0, 1, 2]}})
    with pytest.raises(ValueError, match=r"export.alpha_grid must list at most 64 multipliers .*got 100000"):
        config_from_dict({"export": {"alpha_grid": [1.0] * 100000}})
    assert len(config_from_dict({"export": {"alpha_grid": [1 + i / 10 for i in range(64)]}}).export.alpha_grid) == 64
