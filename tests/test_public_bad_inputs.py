"""Bad input to public functions the earlier probes had not reached (sources, rewards, color features, attention,
the HTML report, colormaps, backbone helpers): each gave a raw error from deep inside torch or diffusers, a hang,
or output that looked right and was not. Each now names the argument, what was expected and what came."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from xlard.backbones.base import Decoded
from xlard.color_features import PatchFeatures, PixelColorEncoder, check_template, patch_positions, srgb_to_lab
from xlard.prompts import parse
from xlard.rewards import MAX_COMPONENT_SLOTS, ExplainableRewards, RewardConfig
from xlard.sources import ShapesSource, default_source_for, resolved_options, score, source_options

sys.path.insert(0, str(Path(__file__).parent))


def _decoded(images, prompts=("a photo of a red circle",)):
    return Decoded(images=images, latents=None, token_maps=None, patch_features=None,
                   specs=tuple(parse(p) for p in prompts), segment_offsets={})


def test_the_shapes_source_names_empty_images():
    source = ShapesSource.__new__(ShapesSource)  # the images are checked before the model runs
    with pytest.raises(ValueError, match=r"decoded.images are empty \(0 x 64 pixels\)"):
        score(_decoded(torch.rand(1, 3, 0, 64)), source, ExplainableRewards())


def test_drop_mixed_objects_checks_its_tensors():
    """A public, documented method that checked nothing: raw "expanded size" / "shape is invalid" errors."""
    source = ShapesSource.__new__(ShapesSource)
    with pytest.raises(ValueError, match=r"drop_mixed_objects: color_probs must be a tensor \[B=1, 1 \+ C, H=8, W=8\]"):
        source.drop_mixed_objects(torch.rand(1, 2, 8, 8), torch.rand(1, 11, 8, 4))
    with pytest.raises(ValueError, match=r"drop_mixed_objects: images must be a float tensor \[B=1, 3, H=8, W=8\]"):
        source.drop_mixed_objects(torch.rand(1, 2, 8, 8), torch.rand(1, 11, 8, 8), images=torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"drop_mixed_objects: maps must be a float tensor \[B, E, H, W\]"):
        source.drop_mixed_objects(None, torch.rand(1, 11, 8, 8))


def test_source_helpers_name_bad_names_and_options():
    with pytest.raises(ValueError, match="unknown source 'nope'"):
        resolved_options("nope", {})
    with pytest.raises(ValueError, match="resolved_options: options must be a mapping .* got NoneType"):
        resolved_options("shapes", None)
    with pytest.raises(ValueError, match="a source name must be a string"):
        source_options(["shapes"])
    with pytest.raises(ValueError, match=r"ShapesSource: path must be a weights folder \(str or path\), got int"):
        ShapesSource(path=123)
    assert default_source_for("a\x00b") == "attention"  # not a folder, so not the shapes backbone


def test_the_shapes_source_takes_numpy_numbers_as_the_reward_config_does():
    from xlard.shapes import understanding as U

    if not U.is_available():
        pytest.skip("no understanding weights")
    source = ShapesSource(threshold=np.float32(0.5), min_area=np.int64(8))
    assert source.threshold == 0.5 and source.min_area == 8 and type(source.min_area) is int


def test_rewards_name_malformed_color_embeddings_offsets_and_configs():
    specs = [parse("a photo of a red circle")]
    maps = torch.zeros(1, 1, 8, 8)
    maps[0, 0, 2:5, 2:5] = 1.0
    features = PatchFeatures(torch.rand(1, 4, 3), (2, 2))
    rewards = ExplainableRewards(RewardConfig(threshold_mode="absolute", min_area=1))
    with pytest.raises(ValueError, match=r"color_embeddings must map each color to a Tensor\[D\], got \{'red': "
                                         r"'NoneType'\}"):
        rewards(specs, entity_maps=maps, patch_features=features, color_embeddings={"red": None})
    with pytest.raises(ValueError, match="color_embeddings must map color names to Tensor"):
        rewards(specs, entity_maps=maps, patch_features=features, color_embeddings=torch.rand(1, 3))
    with pytest.raises(ValueError, match="segment_offsets must map tokenizer names to offsets"):
        rewards(specs, token_maps=torch.rand(1, 8, 8, 8), patch_features=features, segment_offsets="x")
    with pytest.raises(ValueError, match="PatchFeatures.features have no feature dimension"):
        PatchFeatures(torch.zeros(1, 4, 0), (2, 2))
    for falsy in ({}, [], 0):  # were taken as "no config" without a word
        with pytest.raises(ValueError, match="config must be a RewardConfig"):
            ExplainableRewards(falsy)
    with pytest.raises(ValueError, match=rf"max_components must be an integer in \[1, {MAX_COMPONENT_SLOTS}\]"):
        RewardConfig(max_components=2**31 - 1)  # allocated 34 GB for one 8x8 map
    with pytest.raises(ValueError, match="explain must be a bool, got 'no'"):
        rewards(specs, entity_maps=maps, patch_features=features, color_embeddings={"red": torch.rand(3)},
                explain="no")


def test_text_templates_are_checked_where_they_are_given():
    for bad in ("{x} {}", "{}}", "{}{", "{} {}", "no braces", 3):
        with pytest.raises(ValueError, match="must contain exactly one '{}' for the color"):
            check_template("ClipColorEncoder", "template", bad, "color")
    for good in ("a photo of a {} object", "{0} thing", "a {{literal}} {}"):
        check_template("ClipColorEncoder", "template", good, "color")


def test_pixel_color_encoder_checks_its_prototypes_basis_and_features():
    base = {"red": (220, 20, 20), "blue": (20, 20, 220), "gray": (128, 128, 128)}
    with pytest.raises(ValueError, match=r"prototypes\['red'\] must be an sRGB \(r, g, b\) of numbers in \[0, 255\]"):
        PixelColorEncoder(basis=["red", "blue"], prototypes={**base, "red": (float("nan"), 0, 0)})
    with pytest.raises(ValueError, match=r"prototypes\['red'\] must be an sRGB"):
        PixelColorEncoder(basis=["red", "blue"], prototypes={**base, "red": (300, 0, 0)})
    with pytest.raises(ValueError, match=r"prototypes\['red'\] must be an sRGB"):
        PixelColorEncoder(basis=["red", "blue"], prototypes={**base, "red": (1, 2)})
    with pytest.raises(ValueError, match="a 0-1 table\\? multiply by 255"):
        PixelColorEncoder(basis=["red", "blue"], prototypes={"red": (1.0, 0, 0), "blue": (0, 0, 1.0)})
    with pytest.raises(ValueError, match="basis must be a sequence of color names, got 'red'"):
        PixelColorEncoder(basis="red")
    encoder = PixelColorEncoder(grid=(2, 2))
    features = encoder.encode_images(torch.rand(1, 3, 8, 8))
    assert encoder.nearest_colors(features) == encoder.nearest_colors(features.features)  # PatchFeatures taken
    with pytest.raises(ValueError, match=rf"features must be a tensor \[\.\.\., {len(encoder.basis)}\]"):
        encoder.nearest_colors(torch.rand(4, 3))
    with pytest.raises(ValueError, match="features hold NaN"):
        encoder.nearest_colors(torch.full((2, len(encoder.basis)), float("nan")))


def test_color_math_refuses_other_scales_and_shapes():
    with pytest.raises(ValueError, match=r"srgb_to_lab: rgb must be finite sRGB values in \[0, 1\], got values in "
                                         r"\[0, 128\] \(0..255 values\? divide by 255\)"):
        srgb_to_lab(torch.tensor([128.0, 64.0, 0.0]))  # was clamped to [1, 1, 0] without a word
    with pytest.raises(ValueError, match="srgb_to_lab: rgb must be a float tensor"):
        srgb_to_lab(torch.tensor([1, 0, 0]))
    with pytest.raises(ValueError, match=r"srgb_to_lab: rgb must have 3 channels on dim -1, got shape \(4,\)"):
        srgb_to_lab(torch.rand(4))
    with pytest.raises(ValueError, match="srgb_to_lab: rgb must be a float tensor"):
        srgb_to_lab([1.0, 0.0, 0.0])
    assert torch.allclose(srgb_to_lab(torch.tensor([1.0, 0.0, 0.0])), torch.tensor([53.24, 80.09, 67.20]),
                          atol=0.02)
    with pytest.raises(ValueError, match=r"patch_positions: grid must be a pair of integers"):
        patch_positions((-2, 3))
    with pytest.raises(ValueError, match="patch_positions: device"):
        patch_positions((2, 2), device="nope")


def test_text_attention_probs_checks_its_indices():
    from xlard.attention import text_attention_probs

    q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 9, 4)
    with pytest.raises(ValueError, match=r"token_positions must index the 9 keys, got positions in \[50, 50\]"):
        text_attention_probs(q, k, torch.tensor([50]))
    with pytest.raises(ValueError, match=r"heads must be a non-empty int64 Tensor\[H'\] of head indices in \[0, 2\)"):
        text_attention_probs(q, k, torch.tensor([7]), heads=torch.tensor([5]))
    with pytest.raises(ValueError, match=r"query_start must be an int in \[0, 6\), got 100"):
        text_attention_probs(q, k, torch.tensor([7]), query_start=100)  # was an empty block
    with pytest.raises(ValueError, match=r"num_queries must be None or an int in \[1, 6\]"):
        text_attention_probs(q, k, torch.tensor([7]), num_queries=-2)  # ran to the end
    with pytest.raises(ValueError, match=r"per-sample token_positions need one row per kept sample \(1\), got 2"):
        text_attention_probs(q, k, torch.tensor([[7], [8]]))
    with pytest.raises(ValueError, match="token_positions must be an int64 Tensor"):
        text_attention_probs(q, k, [7, 8])
    with pytest.raises(ValueError, match=r"mask \(5, 5\) does not broadcast to the attention's \[B, H, Sq, Sk\] = "
                                         r"\[1, 2, 6, 9\]"):
        text_attention_probs(q, k, torch.tensor([7]), mask=torch.ones(5, 5, dtype=torch.bool))
    ok = text_attention_probs(q, k, torch.tensor([7]), mask=torch.ones(1, 9, dtype=torch.bool))
    assert torch.allclose(ok, text_attention_probs(q, k, torch.tensor([7])))
    assert text_attention_probs(q, k, torch.tensor([7, 8]), num_queries=6).shape == (1, 2, 6)


def test_the_html_report_refuses_impossible_scores_and_colormaps_stay_small(tmp_path):
    from xlard.explain import ReportItem, render_html_report
    from xlard.explain.colormaps import colormap_table, overlay

    for bad in (7.5, float("inf"), -2.0):  # drawn as "7.500" under "Scores in [0, 1]"
        with pytest.raises(ValueError, match=r"a score \(reward\) must lie in \[0, 1\]"):
            render_html_report([ReportItem("a photo of a cat", scores={"count": bad})])
    assert "0.750" in render_html_report([ReportItem("a photo of a cat", scores={"count": 0.75, "color": math.nan},
                                                     joint=1.5, weights={"count": 2.0})])
    with pytest.raises(ValueError, match=r"size must be an int in \[2, 65536\], got 1000000000"):
        colormap_table("ember", 10**9)  # allocated gigabytes (and seemed to hang)
    with pytest.raises(ValueError, match="normalize must be a bool, got 'no'"):
        overlay(torch.rand(3, 8, 8), torch.rand(4, 4), normalize="no")


def test_backbone_helpers_name_a_string_for_prompts_and_fixed_corrector_sizes(tmp_path):
    import tiny_pipelines

    from xlard.backbones import DiffusersBackbone

    bb = DiffusersBackbone.from_pretrained(tiny_pipelines.tiny_sd_pipeline(tmp_path / "sd"), num_inference_steps=1)
    bb.check_prompts("a photo of two cats")  # one prompt, not its letters ("record 3: prompt ' '")
    with pytest.raises(ValueError, match="record 0: "):
        bb.check_prompts("")
    with pytest.raises(ValueError, match=r"corrector_config: latent_channels come from the backbone "
                                         r"\(latent_channels=4, text_dim=32, pooled_dim=32\)"):
        bb.corrector_config("tiny", latent_channels=16)
    assert bb.corrector_config("tiny", width=64).width == 64


def test_a_nul_in_a_path_or_model_name_is_named(tmp_path):
    from xlard.backbones import DiffusersBackbone
    from xlard.explain import save_png, write_html_report

    with pytest.raises(ValueError, match="holds a NUL character"):
        save_png(str(tmp_path / "a\x00b.png"), torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match="holds a NUL character"):
        write_html_report(str(tmp_path / "a\x00b.html"), [])
    with pytest.raises(ValueError, match=r"must be a hub model id or a local folder, got 'a\\x00b' \(a NUL"):
        DiffusersBackbone.from_pretrained("a\x00b")


def test_a_pipeline_folder_missing_a_component_subfolder_is_named(tmp_path):
    import shutil

    import tiny_pipelines

    from xlard.backbones import DiffusersBackbone

    folder = tiny_pipelines.tiny_sd_pipeline(tmp_path / "sd")
    shutil.rmtree(folder / "unet")
    with pytest.raises(FileNotFoundError, match=r"model_index.json names the component\(s\) unet, but .*sd has no "
                                                r"unet/ subfolder \(an incomplete download or copy\?\)"):
        DiffusersBackbone.from_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    shutil.rmtree(folder / "vae")  # a component passed in is not looked for
    with pytest.raises(FileNotFoundError, match=r"names the component\(s\) unet, but"):
        DiffusersBackbone.from_pretrained(folder, vae=None)


# --------------------------------------------------------------------------------------------------------------
# Second round: training configs, GenEval files, evaluation statistics, the shapes world's helpers
# --------------------------------------------------------------------------------------------------------------


def test_a_training_config_names_what_json_cannot_hold(tmp_path):
    """A YAML date, set or binary value was a traceback from json.dumps (exit 1 from `xlard train`), a config
    nested thousands deep a RecursionError, a 5000-digit number a message naming no file."""
    from xlard.train import load_config, parse_overrides
    from xlard.train.config import batch_arithmetic

    cases = {"date.yaml": ("out: 2024-01-01\n", r"out must be a plain value .* got a date \(datetime.date"),
             "set.yaml": ("out: !!set {a, b}\n", r"out must be a plain value .* got a set"),
             "binary.yaml": ("out: !!binary aGVsbG8=\n", r"out must be a plain value .* got a bytes"),
             "deep.json": ("[" * 100000 + "]" * 100000, r"deep.json is not valid JSON: nested too deeply"),
             "deep.yaml": ("a: " + "[" * 5000 + "]" * 5000 + "\n",
                           r"deep.yaml is not valid YAML: nested too deeply"),
             "huge.yaml": (f"steps: {'9' * 5000}\n", r"huge.yaml is not valid YAML: .*4300 digits")}
    for name, (text, match) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError, match="train config: (.*/)?" + match):
            load_config(path)
    ok = tmp_path / "ok.yaml"
    ok.write_text("steps: 3\n")
    with pytest.raises(ValueError, match="overrides must be a mapping of dotted keys"):
        load_config(ok, overrides=["ppo.epochs=2"])
    with pytest.raises(ValueError, match="overrides must be a mapping of dotted keys"):
        load_config(ok, overrides={5: 2})
    assert load_config(ok, overrides={"ppo.epochs": 2}).ppo.epochs == 2
    with pytest.raises(ValueError, match="--set expects key=value strings, got 5"):
        parse_overrides([5])
    assert parse_overrides("ppo.epochs=2") == {"ppo.epochs": 2}  # one item, not its characters
    with pytest.raises(ValueError, match=r"world_size must be an int >= 1 \(processes\), got 0"):
        batch_arithmetic(load_config(ok), 0)


def test_geneval_files_name_folders_strings_and_deep_records(tmp_path):
    from xlard.geneval import read_jsonl, validate_record, write_jsonl

    record = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}
    with pytest.raises(IsADirectoryError, match="read_jsonl: .* is a folder; give the .jsonl file"):
        read_jsonl(tmp_path)
    with pytest.raises(ValueError, match="validate must be a bool, got 'no'"):
        read_jsonl(tmp_path / "x.jsonl", validate="no")
    with pytest.raises(ValueError, match="classes must be None or a collection of names, got 'cat'"):
        validate_record(record, classes="cat")  # was split into the letters c, a, t
    with pytest.raises(ValueError, match="classes must be None or a collection of names, got 5"):
        validate_record(record, classes=5)
    deep: list = []
    node = deep
    for _ in range(100000):
        node.append([])
        node = node[0]
    with pytest.raises(ValueError, match=r"record 0: not JSON-serializable \(nested too deeply\)"):
        write_jsonl(tmp_path / "deep.jsonl", [{**record, "x": deep}])
    assert not (tmp_path / "deep.jsonl").exists()


def test_evaluation_statistics_name_their_inputs():
    from xlard.evaluation import paired_bootstrap, paired_table, parse_seeds, shipped_corrector_path

    for base, match in ((["a"], "base must be a sequence of real numbers"), ([1j], "base must be a sequence of "
                        "real numbers"), (None, "base must be a sequence of numbers"),
                        ([[1, 0], [0, 1]], r"base must be one score per item \(1-D\), got shape \(2, 2\)")):
        with pytest.raises(ValueError, match=match):
            paired_bootstrap(base, [1] if base != [[1, 0], [0, 1]] else [1, 0, 0, 1])
    with pytest.raises(ValueError, match=r"num_resamples must be an integer in \[1, 10000000\]"):
        paired_bootstrap([0], [1], num_resamples=10**12)  # asked numpy for 7 TiB
    with pytest.raises(ValueError, match="tags must be a sequence of tag strings"):
        paired_table("ab", [0, 1], [1, 1])  # was two tags, 'a' and 'b'
    with pytest.raises(ValueError, match="tags must be a sequence of tag strings"):
        paired_table([1, "1"], [0, 1], [1, 1])  # were merged into one tag
    assert "\ud800" in paired_table(["\ud800"], [0], [1])  # a lone surrogate in a tag: no UnicodeEncodeError
    with pytest.raises(ValueError, match="--seeds: must be distinct non-negative integers, got \\[-5\\]"):
        parse_seeds(None, default=-5)
    assert parse_seeds(None, default=3) == [3]
    with pytest.raises(ValueError, match=r"no corrector ships for backbone \[\]"):
        shipped_corrector_path([])


def test_shapes_helpers_refuse_what_is_not_their_input():
    from xlard.shapes import backbone as shapes_backbone
    from xlard.shapes.editor import find_objects
    from xlard.shapes.latent_eyes import load_latent_model
    from xlard.shapes.understanding import load_model

    # were [] ("no objects") or numpy's own words
    for bad in (None, np.zeros(5), np.zeros((2, 4, 4)), [[1, 1], [1, 1]], np.zeros((0, 0))):
        with pytest.raises(ValueError, match=r"find_objects: prob must be a real array \[H, W\]"):
            find_objects(bad)
    p = np.zeros((8, 8), np.float32)
    p[1:4, 1:4] = 0.9
    assert len(find_objects(p, 0.5, 4)) == 1
    for load in (load_latent_model, load_model):
        with pytest.raises(ValueError, match="device must be a torch device or its name, got 'tpu'"):
            load(device="tpu")
    with pytest.raises(ValueError, match="unknown_words: prompt must be a string, got NoneType"):
        shapes_backbone.unknown_words(None)
    for prompts, match in (([5], r"prompts\[0\] must be a non-empty string, got 5"),
                           (["a \ud800"], r"prompts\[0\] is not valid Unicode text"),
                           (None, "prompts must be a prompt or a list of prompts, got NoneType")):
        with pytest.raises(ValueError, match=match):
            shapes_backbone.generate(prompts, pipeline=object())  # refused before any pipeline is used
    with pytest.raises(ValueError, match="pipeline must be a loaded diffusers pipeline"):
        shapes_backbone.generate("a photo of a cat", pipeline=object())


# --------------------------------------------------------------------------------------------------------------
# Third round: the models' helpers and xlard.info
# --------------------------------------------------------------------------------------------------------------


def test_model_helpers_name_bad_weights_noise_actions_and_devices():
    from xlard.models import (CorrectorConfig, LatentRewardProjector, ProjectorConfig, ResidualCorrector,
                              aspect_weights)

    for bad in (float("nan"), float("-inf")):  # NaN weights without a word
        with pytest.raises(ValueError, match="aspect_weights: log_var holds NaN or -inf"):
            aspect_weights(torch.tensor([[bad, 0.0, 0.0]]))
    assert torch.allclose(aspect_weights(torch.zeros(1, 3)), torch.full((1, 3), 1 / 3))
    corrector = ResidualCorrector(CorrectorConfig.tiny(action_block=2)).eval()
    with pytest.raises(TypeError, match="action_noise: noise must be a torch.Tensor, got list"):
        corrector.action_noise([1.0])  # came back as 1.0
    with pytest.raises(ValueError, match=r"action_noise: noise must be \[B, 4, H, W\] with H and W multiples of "
                                         r"action_block 2, got \(2, 3, 8, 8\)"):
        corrector.action_noise(torch.randn(2, 3, 8, 8))
    assert corrector.action_noise(torch.randn(2, 4, 8, 8)).shape == (2, 4, 8, 8)
    policy = corrector.distribution(torch.randn(1, 4, 8, 8), torch.randn(1, 3, 32), torch.randn(1, 32))
    with pytest.raises(TypeError, match="GaussianPolicy.log_prob: delta must be a torch.Tensor, got list"):
        policy.log_prob([1.0])
    with pytest.raises(TypeError, match="GaussianPolicy.log_prob: delta must have dtype"):
        policy.log_prob(torch.zeros(1, 4, 8, 8, dtype=torch.int64))
    projector = LatentRewardProjector(ProjectorConfig.tiny())
    with pytest.raises(ValueError, match="confidence: pooled is on meta, the projector on cpu"):
        projector.confidence(torch.randn(2, 32, device="meta"))


def test_info_report_names_a_dict_it_cannot_read():
    from xlard import info

    for bad in ({}, None):  # KeyError 'xlard', "'NoneType' object is not subscriptable"
        with pytest.raises(ValueError, match=r"format_report: info must be the dict xlard.info.collect\(\) returns"):
            info.format_report(bad)
    assert "xlard" in info.format_report(info.collect())


def test_component_stats_refuses_slots_it_cannot_hold():
    from xlard import ops

    # one 4x4 map with 2**31 - 1 slots asked for ~25 GB: the OOM killer ended the process
    with pytest.raises(ValueError, match=r"component_stats: 1 map\(s\) x max_components 2147483647 = 2147483647 "
                                         r"component slots; at most 134217728 .* holds at most 16 components"):
        ops.component_stats(torch.rand(1, 4, 4), max_components=2**31 - 1)
    assert ops.component_stats(torch.rand(2, 4, 4), max_components=64)[-1].shape[:2] == (2, 64)


def _ref_cases():
    """(op name, args, kwargs) the ops refuse; xlard.reference must refuse them the same way."""
    maps = torch.rand(2, 8, 8)
    cen, rel = torch.rand(1, 3, 2), torch.tensor([[0, 1, 0]])
    z = torch.zeros(2, 3, 4, 4)
    return [
        ("label_components", (maps.long(),), {}),
        ("label_components", (maps,), {"threshold": math.nan}),
        ("count_components", (maps,), {"mode": "otsu ", "threshold": 0.5}),
        ("component_stats", (maps,), {"max_components": 0}),
        ("component_stats", (maps,), {"max_components": None}),
        ("component_stats", (maps,), {"min_area": 0}),
        ("attention_centroids", ([[0.0]],), {}),
        ("attention_centroids", (torch.rand(3).to(torch.complex64),), {}),
        ("position_scores", (cen, rel.int()), {}),
        ("position_scores", (cen, rel), {"tau": 0.0}),
        ("position_scores", (cen, torch.tensor([[0, 3, 0]])), {}),
        ("position_scores", (cen, torch.tensor([[0, 1, 7]])), {}),
        ("position_scores", (cen[..., :1], rel), {}),
        ("color_scores", (torch.rand(1, 4, 8), torch.rand(3, 7)), {}),
        ("color_scores", (torch.rand(1, 4, 8), torch.rand(3, 8), torch.ones(1, 3, 5, dtype=torch.bool)), {}),
        ("residual_correction", (z.to(torch.complex64), z), {}),
        ("residual_correction", (z, z[:1]), {}),
        ("residual_correction", (z, z), {"alpha": math.nan}),
        ("residual_correction", (z, z), {"alpha": torch.ones(3)}),
        ("gaussian_log_prob", (z.long(), z.long(), 0.0), {}),
        ("gaussian_log_prob", (z, z, torch.zeros(5)), {}),
        ("sample_correction", (z, z, "a", z), {}),
        ("sample_correction", (z, z, 0.0, z.double()), {}),
        ("sample_correction", (z, z, 0.0, z), {"alpha": 1e39}),
    ]


@pytest.mark.parametrize("case", range(len(_ref_cases())))
def test_the_reference_refuses_what_the_ops_refuse_with_the_same_message(case):
    """xlard.reference (the plain-PyTorch oracles, public) took int/complex inputs, NaN thresholds, tau <= 0 and
    out-of-range relation codes silently or failed inside torch; it now shares the ops' checks."""
    import xlard.ops
    import xlard.reference

    name, args, kwargs = _ref_cases()[case]
    with pytest.raises((TypeError, ValueError)) as op_err:
        getattr(xlard.ops, name)(*args, **kwargs)
    with pytest.raises((TypeError, ValueError)) as ref_err:
        getattr(xlard.reference, name)(*args, **kwargs)
    assert type(ref_err.value) is type(op_err.value)
    assert str(ref_err.value).startswith(f"xlard.reference.{name}: ")
    assert str(ref_err.value).replace("xlard.reference.", "xlard.", 1) == str(op_err.value)


def test_reference_foreground_checks_threshold_and_mode():
    import xlard.reference

    with pytest.raises(ValueError, match=r"xlard\.reference\.foreground: threshold"):
        xlard.reference.foreground(torch.rand(4, 4), math.nan)
    with pytest.raises(ValueError, match=r"xlard\.reference\.foreground: mode"):
        xlard.reference.foreground(torch.rand(4, 4), 0.5, "relatve")
    with pytest.raises(TypeError, match=r"xlard\.reference\.foreground: maps"):
        xlard.reference.foreground([[1.0]])


def test_ops_refuse_strided_views_too_large_to_copy_before_allocating(monkeypatch):
    """A stride-0 view of a few bytes stands for terabytes once the kernel copies it: the allocator's error named no
    argument, and a size the system admits but cannot back had the OOM killer end the process."""
    import xlard.ops
    from xlard import _args

    huge = torch.zeros(1).expand(64, 64, 4096, 4096)  # 2**36 floats: 256 GiB once copied
    with pytest.raises(MemoryError, match=r"xlard\.residual_correction: would need .*strided view z0 \(shape "
                                          r"\(64, 64, 4096, 4096\), strides \(0, 0, 0, 0\)\).*delta"):
        xlard.ops.residual_correction(huge, huge, 0.5)
    with torch.no_grad(), pytest.raises(MemoryError, match=r"xlard\.sample_correction: .*strided view noise"):
        xlard.ops.sample_correction(huge, huge, 0.0, huge)
    with pytest.raises(MemoryError, match=r"xlard\.gaussian_log_prob: .*strided view x"):
        xlard.ops.gaussian_log_prob(huge, huge, 0.0)
    maps = torch.zeros(1).expand(2**20, 256, 256)
    for op in ("label_components", "count_components", "component_stats", "attention_centroids"):
        with pytest.raises(MemoryError, match=rf"xlard\.{op}: would need .*strided view maps"):
            getattr(xlard.ops, op)(maps)
    # color and position scores too (they reached the allocator: "DefaultCPUAllocator: can't allocate memory")
    with pytest.raises(MemoryError, match=r"xlard\.color_scores: would need .*strided view patch_features"):
        xlard.ops.color_scores(torch.zeros(1, 1, 64).expand(2**18, 2**14, 64), torch.randn(3, 64))
    with pytest.raises(MemoryError, match=r"xlard\.position_scores: would need .*strided view centroids"):
        xlard.ops.position_scores(torch.rand(1, 2, 2).expand(10**11, 2, 2), torch.tensor([[0, 1, 0]]))
    # the outputs count with the copies, against the memory free now (here made 2 GiB; the buffer cache emptied,
    # its bytes count as free)
    monkeypatch.setattr(_args, "available_host_memory", lambda: 2 * 2**30)
    xlard.ops.empty_cpu_buffer_cache()
    z = torch.zeros(1).expand(3, 1, 2**27)  # 1.5 GiB per copy, 1.5 + 1.5 GiB of outputs (zc, lam)
    with pytest.raises(MemoryError, match=r"would need 6\.0 GiB \(3\.0 GiB of outputs and working copies, 1\.5 GiB "
                                          r"to copy .* than the 2\.0 GiB this machine has available"):
        xlard.ops.residual_correction(z, z, 0.5)
    # a per-channel log_std is read per channel, never copied: not counted (it was, as a whole latent's copy)
    monkeypatch.setattr(_args, "HOST_CHECK_BYTES", 0)
    z0 = torch.rand(1, 4, 64, 64)  # outputs: zc, delta 64 KiB each, lam 16 KiB, log_prob 4 bytes
    monkeypatch.setattr(_args, "available_host_memory", lambda: 150 * 1024)
    with torch.no_grad():
        assert xlard.ops.sample_correction(z0, z0, torch.zeros(4), z0, 0.5)[0].shape == z0.shape
    monkeypatch.setattr(_args, "available_host_memory", lambda: 100 * 1024)
    with torch.no_grad(), pytest.raises(MemoryError, match=r"0\.0 GiB of outputs and working copies\), more than"):
        xlard.ops.sample_correction(z0, z0, torch.zeros(4), z0, 0.5)
    # where the free memory is unknown, nothing is refused up front (small inputs are never checked)
    monkeypatch.setattr(_args, "available_host_memory", lambda: None)
    small = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(xlard.ops.residual_correction(small, small, 0.5)[0], small * 1.5)


def test_out_buffers_on_the_meta_device_are_not_taken_for_shared_memory():
    """Every meta tensor reports data_ptr() 0, so out= on meta tensors was refused as "shares memory"."""
    import xlard.ops

    z = torch.zeros(2, 4, 8, 8, device="meta")
    out = (torch.empty(2, 4, 8, 8, device="meta"), torch.empty(2, 8, 8, device="meta"))
    got = xlard.ops.residual_correction(z, z, 0.5, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    out4 = (torch.empty_like(z), torch.empty_like(z), torch.empty(2, device="meta"),
            torch.empty(2, 8, 8, device="meta"))
    with torch.no_grad():
        got = xlard.ops.sample_correction(z, z, 0.0, z, 0.5, out=out4)
    assert all(a is b for a, b in zip(got, out4))


def test_the_buffer_cache_size_names_a_bad_setting(monkeypatch):
    import xlard.ops

    monkeypatch.setenv("XLARD_CPU_BUFFER_CACHE_MB", "-5")
    with pytest.raises(ValueError, match=r"xlard\.cpu_buffer_cache_bytes: XLARD_CPU_BUFFER_CACHE_MB must be a whole "
                                         r"number of MiB >= 0 .*got '-5'"):
        xlard.ops.cpu_buffer_cache_bytes()
    assert xlard.ops.empty_cpu_buffer_cache() >= 0  # releasing works whatever the setting
    monkeypatch.setenv("XLARD_CPU_BUFFER_CACHE_MB", "64")
    assert xlard.ops.cpu_buffer_cache_bytes() >= 0


def test_non_finite_tensor_parameters_propagate_per_item_as_documented():
    """Tensor-valued alpha/log_std are data, not configuration: they are not scanned (a device sync per call on a
    GPU); a NaN/inf there propagates through IEEE arithmetic to the items it touches, exactly as the reference does
    (docs/ops.md). Float parameters stay refused when not finite."""
    import xlard.ops
    import xlard.reference

    z0, delta = torch.rand(3, 2, 4, 4), torch.rand(3, 2, 4, 4)
    alpha = torch.tensor([0.5, math.nan, math.inf])
    zc, lam = xlard.ops.residual_correction(z0, delta, alpha)
    ref = xlard.reference.residual_correction(z0, delta, alpha)
    torch.testing.assert_close(zc, ref[0], equal_nan=True)
    assert torch.isfinite(zc[0]).all() and torch.isnan(zc[1]).all() and torch.isinf(zc[2]).all()
    assert torch.isfinite(lam).all()  # lam reads delta only
    log_std = torch.tensor([0.0, math.nan])  # per channel: every item's density reads both channels
    lp = xlard.ops.gaussian_log_prob(z0, delta, log_std)
    assert torch.isnan(lp).all()
    torch.testing.assert_close(lp, xlard.reference.gaussian_log_prob(z0, delta, log_std), equal_nan=True)
    with pytest.raises(ValueError, match=r"alpha must be a finite float"):
        xlard.ops.residual_correction(z0, delta, math.nan)


@pytest.mark.parametrize("name", ["token_maps", "entity_maps", "patch_features", "weights"])
def test_rewards_name_meta_tensors(name):
    """Meta tensors (shapes, no values) failed inside torch (".item() cannot be called on meta tensors")."""
    specs = [parse("two red circles")]
    real = {"entity_maps": torch.rand(1, 1, 8, 8)}
    meta = {"token_maps": torch.rand(1, 8, 8, 8, device="meta"), "entity_maps": torch.rand(1, 1, 8, 8, device="meta"),
            "patch_features": PatchFeatures(torch.rand(1, 4, 3, device="meta"), (2, 2)),
            "weights": torch.rand(1, 3, device="meta")}
    kwargs = {**real, name: meta[name]}
    if name == "token_maps":
        del kwargs["entity_maps"]
    with pytest.raises(ValueError, match=rf"ExplainableRewards: {name} is on the meta device"):
        ExplainableRewards()(specs, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Fourth probe (2026-12-07, later): the editor, prompts, PPO helpers, checkpoints' neighbours, backbones, _io.


def _understanding():
    from xlard.shapes import understanding as U

    if not U.is_available():
        pytest.skip("no understanding weights")
    return U.load_model()


def test_the_editor_names_mismatched_batches_nan_and_wrong_vocabularies():
    """edit_targets broadcast the edits of 2 images onto 1 and passed NaN encodings into the targets; move_latents
    read NaN latents/maps as "no moves"; a string vocabulary was read letter by letter, an unknown color failed as
    a KeyError, probabilities of 100 were taken; raw errors for None/strings elsewhere."""
    from xlard.prompts import parse as parse_prompt
    from xlard.shapes.editor import (EditedBatch, edit_image, edit_images, edit_targets, find_objects,
                                     move_latents, move_plan, touched_cells)

    model = _understanding()
    images = torch.rand(2, 3, 64, 64)
    specs = [parse_prompt("a photo of two red circles"), parse_prompt("a photo of a blue square")]
    edited = edit_images(model, images, specs)
    encode = lambda x: torch.nn.functional.avg_pool2d(x, 8).repeat(1, 3, 1, 1)[:, :8]  # noqa: E731
    assert edit_targets(encode, images, edited, (8, 8, 8)).shape == (2, 8, 8, 8)
    with pytest.raises(ValueError, match=r"edit_targets: edited holds images of shape \(2, 3, 64, 64\).*\(1, 3, 64"):
        edit_targets(encode, images[:1], edited, (8, 8, 8))
    for shape in ((8, 0, 0), (8, 16), None, "abc"):
        with pytest.raises(ValueError, match=r"edit_targets: latent_shape must be \(C, h, w\), three ints >= 1"):
            edit_targets(encode, images, edited, shape)
    with pytest.raises(ValueError, match=r"edit_targets: encode gave NaN or infinite latents"):
        edit_targets(lambda x: encode(x) * math.nan, images, edited, (8, 8, 8))
    with pytest.raises(TypeError, match=r"edit_targets: encode must be a function"):
        edit_targets(None, images, edited, (8, 8, 8))
    with pytest.raises(TypeError, match=r"edit_targets: edited must be edit_images\(\)'s EditedBatch"):
        edit_targets(encode, images, None, (8, 8, 8))
    with pytest.raises(ValueError, match=r"touched_cells: changed must be a bool tensor .*got float32 Tensor"):
        touched_cells(torch.full((1, 64, 64), math.nan), 8)
    with pytest.raises(TypeError, match=r"edit_images: specs\[0\] must be a PromptSpec, got str \(parse it first"):
        edit_images(model, images, ["a", "b"])
    with pytest.raises(TypeError, match=r"edit_images: model must be a ShapesUnderstanding"):
        edit_images(None, images, specs)
    with pytest.raises(TypeError, match=r"edit_images: config must be an EditConfig or None, got dict"):
        edit_images(model, images, specs, config={"redraw": True})
    with pytest.raises(ValueError, match=r"edit_images: images is an empty batch"):
        edit_images(model, images[:0], [])
    out = model.predict(images[:1])
    sp, cp, img = out.shape_probs[0].numpy(), out.color_probs[0].numpy(), images[0].numpy()
    with pytest.raises(ValueError, match=r"edit_image: colors must name each of the world's colors .* at most once"):
        edit_image(img, sp, cp, specs[0], model.config.shapes, ["x"] * 10)
    with pytest.raises(TypeError, match=r"edit_image: shapes must be a sequence of names .*'circle'"):
        edit_image(img, sp, cp, specs[0], "circle", model.config.colors)
    with pytest.raises(ValueError, match=r"edit_image: shape_probs must be probabilities in \[0, 1\], got values in"):
        edit_image(img, sp * 100, cp, specs[0], model.config.shapes, model.config.colors)
    with pytest.raises(TypeError, match=r"edit_image: spec must be a PromptSpec, got str"):
        edit_image(img, sp, cp, "a red circle", model.config.shapes, model.config.colors)
    with pytest.raises(ValueError, match=r"find_objects: prob holds NaN or infinite values"):
        find_objects(np.full((8, 8), np.nan))
    z0 = torch.rand(2, 8, 8, 8)
    maps = model.predict(images)
    relation = [parse_prompt("a photo of a red circle left of a blue square")] * 2
    with pytest.raises(ValueError, match=r"move_latents: z0 holds NaN or infinite values"):
        move_latents(z0 * math.nan, maps.shape_probs, maps.color_probs, relation, model.config.shapes)
    with pytest.raises(ValueError, match=r"move_latents: shapes must name the 4 maps of shape_probs in order"):
        move_latents(z0, maps.shape_probs, maps.color_probs, relation, model.config.shapes[:1])
    with pytest.raises(TypeError, match=r"move_latents: specs\[0\] must be a PromptSpec, got str"):
        move_latents(z0, maps.shape_probs, maps.color_probs, ["a", "b"], model.config.shapes)
    with pytest.raises(ValueError, match=r"move_latents: shape_probs must be a float tensor .*got NoneType"):
        move_latents(z0, None, maps.color_probs, relation, model.config.shapes)
    with pytest.raises(ValueError, match=r"^move_plan: z0 holds NaN or infinite values"):  # said move_latents
        move_plan(z0 * math.nan, maps.shape_probs, maps.color_probs, relation, model.config.shapes)
    with pytest.raises(TypeError, match=r"^move_plan: specs\[0\] must be a PromptSpec, got str"):
        move_plan(z0, maps.shape_probs, maps.color_probs, ["a", "b"], model.config.shapes)
    assert isinstance(edited, EditedBatch)


def test_prompt_specs_refuse_contradictions_and_malformed_parts():
    from xlard.prompts import PromptSpec
    from xlard.prompts.spec import Relation, TokenAlignment, infer_geneval_tag

    with pytest.raises(ValueError, match=r"relations 'left of' and 'right of' in prompt 'a dog left of right of a "
                                         r"cat' contradict each other \('dog' left of 'cat', and 'dog' right of"):
        parse("a dog left of right of a cat")  # named by the prompt's words (PromptSpec's indices before)
    spec = parse("a photo of a dog left of a cat")
    entity = spec.entities
    # the same relation said twice, or from the other side, is no contradiction; another axis neither
    assert PromptSpec(spec.prompt, entity, (Relation(0, "left_of", 1), Relation(1, "right_of", 0),
                                            Relation(0, "above", 1))).relations
    with pytest.raises(ValueError, match=r"contradict each other: entity 0 left_of entity 1, and entity 1 left_of"):
        PromptSpec(spec.prompt, entity, (Relation(0, "left_of", 1), Relation(1, "left_of", 0)))
    for kwargs, words in (({"strict": "yes"}, r"parse: strict must be a bool, got 'yes'"),
                          ({"strict": None}, r"parse: strict must be a bool, got None"),
                          ({"max_length": -5}, r"parse: max_length must be an integer >= 1"),
                          ({"max_length": {"tokenizer": 0}}, r"parse: max_length must be an integer >= 1")):
        with pytest.raises((TypeError, ValueError), match=words):
            parse("a dog", **kwargs)
    with pytest.raises(ValueError, match=r"extra_nouns 'left of' is a relation phrase or separator"):
        parse("a dog", extra_nouns=["left of"])  # was ignored: relation phrases are read first
    with pytest.raises(ValueError, match=r"PromptSpec.entities must be a sequence, got NoneType"):
        PromptSpec("x", None)
    with pytest.raises(ValueError, match=r"PromptSpec.relations must be a sequence, got NoneType"):
        PromptSpec("x", (), relations=None)
    with pytest.raises(ValueError, match=r"PromptSpec.alignments must be a sequence, got str"):
        PromptSpec("x", (), alignments="abc")
    with pytest.raises(ValueError, match=r"PromptSpec.alignments must hold TokenAlignment, got NoneType"):
        PromptSpec("x", (), alignments=[None])
    with pytest.raises(ValueError, match=r"Relation.relation must be one of"):
        Relation(0, ["left_of"], 1)
    with pytest.raises(ValueError, match=r"TokenAlignment.num_tokens must be an integer >= 0, got True"):
        TokenAlignment("t", True, ((0,),), ((),))
    with pytest.raises(ValueError, match=r"TokenAlignment.noun_tokens must be a tuple of token-index tuples"):
        TokenAlignment("t", 3, None, None)
    with pytest.raises(ValueError, match=r"segment_offsets must map encoder names to token offsets"):
        spec.sequence_token_indices(["x"])
    with pytest.raises(TypeError, match=r"infer_geneval_tag: spec must be a PromptSpec, got NoneType"):
        infer_geneval_tag(None)
    with pytest.raises(ValueError, match=r"to_geneval: tag 'position' needs a relation"):
        parse("a photo of a dog").to_geneval(tag="position")


def test_model_configs_name_unknown_settings_and_latent_models_check_their_input():
    from xlard.shapes.latent_eyes import LatentEyesConfig, LatentUnderstanding
    from xlard.shapes.understanding import CountEyes, UnderstandingConfig

    for cls in (LatentEyesConfig, UnderstandingConfig):
        with pytest.raises(ValueError, match=rf"{cls.__name__}.from_dict: unknown settings \['foo'\]"):
            cls.from_dict({"foo": 1})
        with pytest.raises(TypeError, match=rf"{cls.__name__}.from_dict: expected a mapping of settings, got NoneType"):
            cls.from_dict(None)
    model = LatentUnderstanding(LatentEyesConfig(width=8, low_width=8, up_widths=(8,)))
    for bad, words in ((torch.zeros(1, 8, 4), r"got float32 \[1, 8, 4\]"),
                       (torch.zeros(1, 8, 4, 4, dtype=torch.int64), r"got int64 \[1, 8, 4, 4\]"),
                       (np.zeros((1, 8, 4, 4), np.float32), r"got numpy.ndarray"),
                       (torch.zeros(1, 3, 4, 4), r"got float32 \[1, 3, 4, 4\]")):
        with pytest.raises(ValueError, match=r"LatentUnderstanding.forward: z must be a float latent .*\[B, 8, h, w\], "
                                             + words):
            model(bad)
    with pytest.raises(ValueError, match=r"edit_counts: nouns must be a list with one entry per latent"):
        CountEyes._check_counts("CountEyes.edit_counts", torch.zeros(1, 8, 4, 4), None, [1])
    with pytest.raises(ValueError, match=r"edit_counts: counts must be a list with one entry per latent"):
        CountEyes._check_counts("CountEyes.edit_counts", torch.zeros(1, 8, 4, 4), ["circle"], "3")


def test_ppo_helpers_refuse_what_would_train_on_garbage():
    from xlard.train import ppo

    for args, words in (((5, 10, 0, "cosine", 2.0), r"min_ratio must be a finite number in \[0, 1\], got 2.0"),
                        ((5, 10, 0, "cosine", math.nan), r"min_ratio must be a finite number"),
                        ((5, 10, -1, "cosine", 0.1), r"warmup_steps must be an int >= 0, got -1"),
                        ((5, -1, 0, "cosine", 0.1), r"total_steps must be an int >= 0, got -1")):
        with pytest.raises(ValueError, match=rf"lr_factor: {words}"):
            ppo.lr_factor(*args)
    v = torch.tensor([1.0, 2.0])
    for count in (0, -1, math.nan):
        with pytest.raises(ValueError, match=r"whiten: count must be the number of values in the global batch"):
            ppo.whiten(v, v.sum(), v.square().sum(), count)
    for beta in (math.nan, -1.0, "0.1"):
        with pytest.raises(ValueError, match=r"anchor_penalty: beta must be a finite number in \[0, inf\]"):
            ppo.anchor_penalty(v, v, beta)
    with pytest.raises(ValueError, match=r"group_advantages: rewards hold NaN or infinite values"):
        ppo.group_advantages(torch.tensor([1.0, math.nan]), 2)
    for bad in ([1.0, 2.0], torch.tensor([1, 2])):
        with pytest.raises(ValueError, match=r"group_advantages: rewards must be a float tensor"):
            ppo.group_advantages(bad, 2)
    with pytest.raises(ValueError, match=r"clipped_surrogate: new_log_prob must be a float tensor, got list"):
        ppo.clipped_surrogate([0.0], v[:1], v[:1], 0.2)
    stats = ppo.RunningStats()
    with pytest.raises(ValueError, match=r"RunningStats.update: total must be a finite number, got nan"):
        stats.update(1, math.nan, 1)
    assert stats.count == 0.0  # nothing merged
    with pytest.raises(ValueError, match=r"RunningStats.load_state_dict: expected \{'count', 'mean', 'm2'\}"):
        stats.load_state_dict({})
    with pytest.raises(ValueError, match=r"minibatch_layout: keys must be a 1-D tensor with one key per global row"):
        ppo.minibatch_layout(torch.arange(4), 2, torch.rand(2))
    with pytest.raises(ValueError, match=r"pearson: x and y must pair up, got 3 and 2 values"):
        ppo.pearson(torch.rand(3), torch.rand(2))
    with pytest.raises(ValueError, match=r"reduce_log_prob: log_prob_sum must be a float tensor"):
        ppo.reduce_log_prob([1.0], 4, "sum")


def test_io_and_paths_name_what_they_cannot_use(tmp_path):
    from xlard import _io
    from xlard.prompts.fields import field_tokens, field_vector
    from xlard.shapes import backbone as shapes_backbone
    from xlard.train.checkpoint import list_checkpoints

    target = tmp_path / "kept.txt"
    target.write_text("old")
    with pytest.raises(ValueError, match=r"cannot write .*kept.txt: the text holds '\\udc80' at character 2, which "
                                         r"is not a Unicode character"):
        _io.atomic_write_text(target, "a\udc80")
    assert target.read_text() == "old"
    with pytest.raises(ValueError, match=r"is a folder; expected a file xlard wrote"):
        _io.read_json(tmp_path)
    with pytest.raises(TypeError, match=r"expected the path of a file xlard wrote \(str or path\), got NoneType"):
        _io.read_json(None)
    with pytest.raises(TypeError, match=r"trim_jsonl's upto must be a function"):
        _io.trim_jsonl(target, None)
    with pytest.raises(ValueError, match=r"field_vector: dim must be an integer in \[1, 65536\], got 10{12}"):
        field_vector("count", 1, 10**12)
    with pytest.raises(ValueError, match=r"field_tokens: dim must be an integer in \[1, 65536\]"):
        field_tokens([parse("a dog")], 10**12)
    with pytest.raises(TypeError, match=r"the shapes backbone's path must be a pipeline folder .*got int"):
        shapes_backbone.is_available(3)
    with pytest.raises(TypeError, match=r"list_checkpoints: folder must be a run folder .*got NoneType"):
        list_checkpoints(None)
    with pytest.raises(ValueError, match=r"a folder must be a non-empty path, got ''"):
        _io.make_folder("")
    from xlard.backbones.base import make_generators

    with pytest.raises(ValueError, match=r"make_generators: batch must be the number of prompts .*got 'x'"):
        make_generators(3, "x")


def test_run_demo_names_overrides_given_as_texts(tmp_path):
    from xlard.demo import run_demo

    with pytest.raises(TypeError, match=r"run_demo: overrides must map dotted config keys to values .*got list"):
        run_demo(tmp_path / "demo", overrides=["distill.epochs=1"])
    assert not (tmp_path / "demo").exists()  # refused before the folder was made


def test_shapes_generation_refuses_prompts_it_would_cut_and_backbones_load_by_the_shapes_name():
    from xlard.backbones import DiffusersBackbone
    from xlard.shapes import backbone as shapes_backbone

    if not shapes_backbone.is_available():
        pytest.skip("shapes backbone not installed")
    pipe = shapes_backbone.load_pipeline()
    with pytest.raises(ValueError, match=r"generate: prompts\[1\] is \d+ tokens long .*reads 16, and the rest would "
                                         r"be cut off"):
        shapes_backbone.generate(["a photo of a red circle", "a red circle " * 40], steps=1, pipeline=pipe)
    with pytest.raises(ValueError, match=r"generate: progress must be a bool, got 'no'"):
        shapes_backbone.generate(["a photo of a red circle"], steps=1, pipeline=pipe, progress="no")
    backbone = DiffusersBackbone.from_pretrained("shapes")
    assert backbone.num_inference_steps == shapes_backbone.DEFAULT_STEPS
    assert backbone.guidance_scale == shapes_backbone.DEFAULT_GUIDANCE
    with pytest.raises(ValueError, match=r"negative_prompt 'a\\udc80' holds '\\udc80' at character 2"):
        DiffusersBackbone.from_pretrained("shapes", negative_prompt="a\udc80")


def test_a_long_hub_failure_is_cut_at_a_word_and_marked():
    """The hub's own text was cut at 300 characters mid-word and closed: "...pass 'local_files_on)"."""
    from xlard.backbones.diffusers_backbone import unloadable_hub_model

    text = "We could not connect to the hub " + "and the file was not in the cached files " * 10 + \
        "pass 'local_files_only=False' as input."
    message = unloadable_hub_model("someone/model", OSError(text))
    reason = message[message.rindex("(") + 1:-1]
    assert reason.endswith(" ...") and len(reason) <= 304
    assert text.startswith(reason[:-4]) and text[len(reason) - 4] == " "  # whole words only
    assert unloadable_hub_model("a/b", OSError("short")).endswith("(short)")


def test_reward_helpers_on_empty_and_pixel_less_maps():
    """bound_patch_mask failed inside torch on an empty batch ("cannot reshape tensor of 0 elements"); a map without
    pixels was scored as "found 0" by count_reward (ExplainableRewards refuses such maps) and failed in
    adaptive_avg_pool2d in bound_patch_mask."""
    from xlard import rewards as R

    assert R.bound_patch_mask(torch.rand(0, 3, 8, 8), (4, 4)).shape == (0, 3, 16)
    assert R.bound_patch_mask(torch.rand(2, 0, 8, 8), (2, 4)).shape == (2, 0, 8)
    pixel_less = torch.rand(2, 3, 0, 8)
    for fn, args in ((R.bound_patch_mask, ((2, 2),)), (R.count_reward, (torch.ones(2, 3, dtype=torch.long),)),
                     (R.weakest_component_confidence, ())):
        with pytest.raises(ValueError, match=rf"{fn.__name__}: entity_maps must be .*H, W >= 1.*got \[2, 3, 0, 8\]"):
            fn(pixel_less, *args)


def test_position_reward_takes_shared_relations_with_located():
    """[R, 3] relations are accepted by position_scores and by position_reward, but with located= they failed
    with "Index tensor must have the same number of dimensions as input tensor"."""
    from xlard import rewards as R

    centroids = torch.rand(2, 3, 2)
    rel = torch.tensor([[0, 1, 0], [1, 2, 2]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    located = torch.tensor([[True, True, False], [True, True, True]])
    shared = R.position_reward(centroids, rel, mask, located=located)
    batched = R.position_reward(centroids, rel[None].expand(2, 2, 3), mask, located=located)
    torch.testing.assert_close(shared, batched)
    assert shared[1][0, 1] == 0 and shared[1][1, 1] > 0  # entity 2 is not located in item 0 only


@pytest.mark.parametrize("found, target, match", [
    ([-1], [0], r"found must be >= 0 \(counted objects\), got a negative one \(-1\.0\)"),
    ([float("nan")], [2], r"found must be finite and >= 0"),
    ([1], [float("nan")], r"target must be finite and >= 0"),
    ([1.0], [float("inf")], r"target must be finite and >= 0"),
])
def test_count_scores_refuses_impossible_counts(found, target, match):
    """found -1 scored e (2.72, outside (0, 1]); a NaN target slipped past the "< 0" check and scored 0.37."""
    from xlard import rewards as R

    with pytest.raises(ValueError, match="count_scores: " + match):
        R.count_scores(torch.tensor(found), torch.tensor(target))
    torch.testing.assert_close(R.count_scores(torch.tensor([2.5, 0.0]), torch.tensor([3, 0])),
                               torch.tensor([math.exp(-0.5 / 3), 1.0]))


def test_numpy_infinities_are_not_finite_scalars():
    """numpy compared float32 inf with the largest float in float32 (inf <= inf): np.float32('inf') passed the
    finiteness check and reached the kernel (a RuntimeError, or "must lie within float32's range")."""
    import sys
    from fractions import Fraction

    import numpy as np

    import xlard.ops
    from xlard._args import is_finite_real

    for bad in (np.float32("inf"), np.float16("-inf"), np.float64("nan"), float("inf"), 10**400, True, "1"):
        assert not is_finite_real(bad), bad
    for good in (np.float32(1.5), np.int64(5), Fraction(1, 3), 3, int(sys.float_info.max) + 1, -1e308):
        assert is_finite_real(good), good
    with pytest.raises(ValueError, match=r"xlard\.position_scores: tau must be a finite float > 0"):
        xlard.ops.position_scores(torch.rand(1, 3, 2, dtype=torch.float64), torch.tensor([[[0, 1, 0]]]),
                                  tau=np.float32("inf"))
    with pytest.raises(ValueError, match=r"xlard\.residual_correction: alpha must be a finite float"):
        xlard.ops.residual_correction(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), np.float32("inf"))
