"""xlard.sources: the reward-source interface, each source on tiny inputs, and the shapes
understanding model (loading, prediction on renders, never importing the exact evaluator)."""
from __future__ import annotations

import ast
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from xlard.backbones.base import Decoded
from xlard.color_features import PatchFeatures, PixelColorEncoder
from xlard.prompts import parse
from xlard.rewards import ExplainableRewards, RewardConfig
from xlard.shapes import understanding as U
from xlard.shapes.prompts import PromptConfig, make_splits, render_record
from xlard.shapes.world import Scene, SceneObject, mirror_scene
from xlard.sources import (SOURCES, AttentionSource, ClipSource, RewardSource, ShapesSource, default_source_for,
                           get_source, score)
from xlard.vocab import GENEVAL_COLORS

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = U.is_available()
needs_weights = pytest.mark.skipif(not SHIPPED, reason=f"no understanding weights at {U.model_path()}; "
                                                       f"train them with: {U.TRAIN_COMMAND}")


def decoded_of(scenes, prompts, token_maps=None):
    images = torch.from_numpy(np.stack([s.render() for s in scenes])).permute(0, 3, 1, 2).float() / 255
    return Decoded(images=images, latents=torch.zeros(0), token_maps=token_maps, patch_features=None,
                   specs=tuple(parse(p) for p in prompts), segment_offsets={})


class OracleUnderstanding(U.ShapesUnderstanding):
    """Predicts the renderer's ground truth exactly (one-hot), to test the source's plumbing alone."""

    def __init__(self, scenes):
        super().__init__(U.UnderstandingConfig(channels=(4, 4, 4, 4)))
        self.scenes = scenes

    def predict(self, images):
        targets = [U.scene_targets(s, self.config) for s in self.scenes]
        shape = torch.nn.functional.one_hot(torch.from_numpy(np.stack([t[0] for t in targets])), 5)
        color = torch.nn.functional.one_hot(torch.from_numpy(np.stack([t[1] for t in targets])), 11)
        return U.UnderstandingOutput(shape.permute(0, 3, 1, 2)[:, 1:].float(), color.permute(0, 3, 1, 2).float())


SCENE = Scene(64, (SceneObject("circle", "red", (4, 4, 16, 16)), SceneObject("circle", "red", (30, 6, 40, 16)),
                   SceneObject("square", "blue", (40, 40, 54, 54)), SceneObject("circle", "green", (8, 44, 18, 54))))


# ---------------------------------------------------------------------------
# Interface
# ---------------------------------------------------------------------------


def test_get_source_names_and_errors():
    assert SOURCES == ("attention", "shapes", "clip")
    assert isinstance(get_source("attention"), AttentionSource)
    with pytest.raises(ValueError, match="unknown source 'vision'"):
        get_source("vision")
    with pytest.raises(ValueError, match=r"unknown options \['threshold'\]"):
        get_source("attention", threshold=0.5)
    with pytest.raises(ValueError, match="pass model="):
        get_source("clip")
    with pytest.raises(ValueError, match=r"model must be a CLIP checkpoint id, .* got Linear"):
        get_source("clip", model=torch.nn.Linear(1, 1))


def test_default_source_for():
    assert default_source_for("shapes") == "shapes"
    assert default_source_for("some/hub-model") == "attention"
    from xlard.shapes.backbone import backbone_path

    # a config's backbone.name may be the shapes backbone's folder: the same source as for "shapes"
    assert default_source_for(str(backbone_path())) == "shapes" == default_source_for(backbone_path())
    assert default_source_for(object()) == "attention"

    class FakeBackbone:
        class pipeline:
            name_or_path = str(U.DEFAULT_PATH.parent / "shapes_backbone")

    assert default_source_for(FakeBackbone()) == "shapes"
    FakeBackbone.pipeline.name_or_path = "/elsewhere/model"
    assert default_source_for(FakeBackbone()) == "attention"


def test_sources_say_whether_the_backbone_must_capture_attention():
    assert get_source("attention").needs_attention and get_source("attention").backbone_options() == {}
    shapes = ShapesSource(OracleUnderstanding([SCENE]))
    assert not shapes.needs_attention and shapes.backbone_options() == {"capture": False}


def test_score_names_the_source_and_rejects_non_sources():
    source = ShapesSource(OracleUnderstanding([SCENE]))
    result = score(decoded_of([SCENE], ["a photo of two circles"]), source)
    assert result.source == "shapes" and result.explanations[0].source == "shapes"
    assert result.explanations[0].text().splitlines()[0] == '"a photo of two circles" (judged by the shapes source)'
    assert result.explanations[0].as_dict()["source"] == "shapes"
    with pytest.raises(ValueError, match="RewardSource"):
        score(decoded_of([SCENE], ["a photo of two circles"]), "shapes")
    with pytest.raises(ValueError, match="ExplainableRewards"):
        score(decoded_of([SCENE], ["a photo of two circles"]), source, rewards=object())
    with pytest.raises(TypeError):
        RewardSource()


def test_decoded_is_checked():
    source = ShapesSource(OracleUnderstanding([SCENE]))
    bad = Decoded(images=torch.rand(2, 3, 64, 64), latents=torch.zeros(0), token_maps=None, patch_features=None,
                  specs=(parse("a photo of a circle"),), segment_offsets={})
    with pytest.raises(ValueError, match="one PromptSpec per image"):
        source(bad)
    with pytest.raises(ValueError, match=r"images must be a float tensor \[B, 3, H, W\]"):
        source(Decoded(images=torch.rand(1, 64, 64), latents=torch.zeros(0), token_maps=None, patch_features=None,
                       specs=(parse("a photo of a circle"),), segment_offsets={}))

    def one(images):
        return Decoded(images=images, latents=torch.zeros(0), token_maps=None, patch_features=None,
                       specs=(parse("a photo of a circle"),), segment_offsets={})

    image = decoded_of([SCENE], ["a photo of a circle"]).images
    # Another convention would be clamped into white or black images and judged without a word.
    for images, pattern in ((image * 255, r"0..255 values\? divide by 255"),
                            ((image * 255).to(torch.uint8), r"got torch.uint8.*/ 255"),
                            (image * 2 - 1, r"\[-1, 1\].*images / 2 \+ 0.5"),
                            (image.clone().fill_(float("nan")), "must lie in \\[0, 1\\], got values in \\[nan")):
        with pytest.raises(ValueError, match=pattern):
            source(one(images))
    source(one((image * 1.02 - 0.01)))  # rounding past the range is fine (the model clamps)
    # A Generation or bare images instead of a Decoded ("decoded.specs must hold ... got NoneType of 0" before).
    from xlard.backbones.base import Generation

    generation = Generation(decoded=one(image), state=None, zc=torch.zeros(1), lam=None)
    with pytest.raises(ValueError, match=r"got a Generation; pass its .decoded"):
        score(generation, source)
    with pytest.raises(ValueError, match=r"got a tensor \(1, 3, 64, 64\); pass backbone.decode\(state\)"):
        score(image, source)
    assert score(generation.decoded, source).source == "shapes"
    with pytest.raises(ValueError, match=r"ExplainableRewards: config must be a RewardConfig, got ShapesSource; "
                                         r"pass source.reward_config\(\)"):
        ExplainableRewards(source)


# ---------------------------------------------------------------------------
# Attention source
# ---------------------------------------------------------------------------


def test_attention_source_matches_the_rewards_on_token_maps():
    specs = (parse("a photo of two circles"),)
    from xlard.prompts import PromptSpec, TokenAlignment

    spec = PromptSpec(specs[0].prompt, tuple(e.__class__(**{**e.__dict__, "token_indices": (1,)})
                                             for e in specs[0].entities),
                      alignments=(TokenAlignment("tokenizer", 4, ((1,),), ((),)),))
    maps = torch.zeros(1, 4, 16, 16)
    maps[0, 1, 2:5, 2:5] = 1.0
    maps[0, 1, 10:13, 10:13] = 1.0
    images = torch.rand(1, 3, 64, 64)
    decoded = Decoded(images=images, latents=torch.zeros(0), token_maps=maps, patch_features=None, specs=(spec,),
                      segment_offsets={"tokenizer": 0})
    result = score(decoded, get_source("attention"), ExplainableRewards())
    want = ExplainableRewards(color_encoder=PixelColorEncoder())(**decoded.reward_inputs())
    torch.testing.assert_close(result.scores, want.scores, equal_nan=True)
    assert result.count_found[0, 0].item() == 2 and result.source == "attention"
    no_maps = Decoded(images=images, latents=torch.zeros(0), token_maps=None, patch_features=None, specs=(spec,),
                      segment_offsets={})
    with pytest.raises(ValueError, match="capture=False"):
        get_source("attention")(no_maps)


def test_attention_source_colors_come_from_one_encoder():
    images = torch.full((1, 3, 64, 64), 0.5)
    images[:, 0, 8:40, 8:40], images[:, 1:, 8:40, 8:40] = 0.84, 0.14
    spec = parse("a photo of a red circle")
    decoded = Decoded(images=images, latents=torch.zeros(0), token_maps=torch.zeros(1, 8, 8, 8),
                      patch_features=PatchFeatures(torch.zeros(1, 4, 3), (2, 2)), specs=(spec,), segment_offsets={})
    inputs = AttentionSource()(decoded)
    # Foreign decoded.patch_features are ignored: features and embeddings both come from the source's encoder.
    assert inputs["patch_features"].features.shape[-1] == inputs["color_embeddings"]["red"].shape[-1]
    enc = PixelColorEncoder()
    torch.testing.assert_close(inputs["color_embeddings"]["red"], enc.embed_colors(["red"])[0])


# ---------------------------------------------------------------------------
# Shapes source
# ---------------------------------------------------------------------------


def test_shapes_source_inputs_layout():
    source = ShapesSource(OracleUnderstanding([SCENE, SCENE]))
    inputs = source(decoded_of([SCENE, SCENE], ["a photo of a red circle and a blue square",
                                                "a photo of a dog and a circle"]))
    assert inputs["entity_maps"].shape == (2, 2, 64, 64)
    assert inputs["entity_available"].tolist() == [[True, True], [False, True]]  # "dog" is not a shape
    assert inputs["entity_maps"][1, 0].abs().sum() == 0
    pf = inputs["patch_features"]
    assert pf.grid == (64, 64) and pf.features.shape == (2, 64 * 64, 11)
    torch.testing.assert_close(inputs["color_embeddings"]["blue"], torch.eye(11)[1 + 4])
    with pytest.raises(ValueError, match=r"colors \['gray'\] are not in the shapes world"):
        source(decoded_of([SCENE, SCENE], ["a photo of a gray circle", "a photo of a circle"]))
    with pytest.raises(ValueError, match="ShapesUnderstanding"):
        ShapesSource(torch.nn.Linear(1, 1))


def test_shapes_source_with_a_perfect_model_scores_the_truth():
    """With ground-truth maps the source's rewards are exact: counts, bound colors, relations."""
    prompts = ["a photo of three circles", "a photo of two circles", "a photo of a green circle",
               "a photo of a blue circle", "a photo of a square right of a circle", "a photo of a square left of a circle"]
    source = ShapesSource(OracleUnderstanding([SCENE] * len(prompts)))
    result = score(decoded_of([SCENE] * len(prompts), prompts), source)
    count, color, position = result.scores.T.tolist()
    assert count[0] == 1.0 and count[1] == pytest.approx(math.exp(-1 / 2))
    assert color[2] == 1.0 and color[3] == 0.0  # green is a circle's color, blue only the square's
    assert position[4] > 0.9 and position[5] < 0.1


def test_scene_targets_cores_and_colors():
    s, c = U.scene_targets(SCENE)
    assert s.shape == c.shape == (64, 64)
    assert (c == 1 + U.UnderstandingConfig().colors.index("red")).sum() == sum(
        o.area for o in SCENE.objects if o.color == "red")
    # Cores: inside the objects, one pixel in from their edges, apart from each other.
    assert set(np.unique(s)) == {0, 1, 2}
    assert s[4, 10] == 0 and s[10, 10] == 1 and s[47, 47] == 2
    assert (s > 0).sum() < (c > 0).sum()


def test_model_forward_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = U.ShapesUnderstanding(U.UnderstandingConfig(channels=(4, 8, 8, 8))).eval()
    folder = model.save_pretrained(tmp_path / "m", extra={"training": {"steps": 1}})
    loaded = U.ShapesUnderstanding.from_pretrained(folder)
    images = torch.rand(2, 3, 48, 48)  # resized to 64
    a, b = model.predict(images), loaded.predict(images)
    assert a.shape_probs.shape == (2, 4, 64, 64) and a.color_probs.shape == (2, 11, 64, 64)
    torch.testing.assert_close(a.shape_probs, b.shape_probs, atol=2e-2, rtol=0)  # weights stored in float16
    assert torch.allclose(a.color_probs.sum(1), torch.ones(2, 64, 64))
    with pytest.raises(FileNotFoundError, match="train_shapes_understanding"):
        U.ShapesUnderstanding.from_pretrained(tmp_path / "absent")
    with pytest.raises(ValueError, match="images must be a float tensor"):
        model.predict(torch.zeros(2, 64, 64, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="channels"):
        U.UnderstandingConfig(channels=(4, 4))


def test_model_damaged_or_mismatched_files_are_named(tmp_path, monkeypatch):
    """A cut weights file, a config of another size, a config without its model block and an unset folder
    named by the environment each give one ValueError/FileNotFoundError naming the file (were safetensors'
    own error, torch's multi-line state-dict error and a bare KeyError)."""
    import json
    import shutil

    model = U.ShapesUnderstanding(U.UnderstandingConfig(channels=(4, 8, 8, 8)))
    good = model.save_pretrained(tmp_path / "good")
    cut = shutil.copytree(good, tmp_path / "cut")
    data = (cut / U.WEIGHTS_NAME).read_bytes()
    (cut / U.WEIGHTS_NAME).write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"cut/model.safetensors is not a readable safetensors file"):
        U.ShapesUnderstanding.from_pretrained(cut)
    other = shutil.copytree(good, tmp_path / "other")
    saved = json.loads((other / U.CONFIG_NAME).read_text())
    saved["model"]["channels"] = [8, 8, 8, 8]
    (other / U.CONFIG_NAME).write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"does not fit the model .*config.json describes \(size mismatch"):
        U.ShapesUnderstanding.from_pretrained(other)
    (other / U.CONFIG_NAME).write_text(json.dumps({"training": {}}))
    with pytest.raises(ValueError, match=r"is not a shapes understanding model's config \(KeyError"):
        U.ShapesUnderstanding.from_pretrained(other)
    monkeypatch.setenv("XLARD_SHAPES_UNDERSTANDING", str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match=r"absent \(\$XLARD_SHAPES_UNDERSTANDING\)"):
        U.ShapesUnderstanding.from_pretrained()


@needs_weights
def test_each_shapes_source_holds_its_own_model():
    """Every ShapesSource() got the one cached model: .double() (or training) through one source changed every
    later one in the process; each holds its own copy now, and load_model's cache is left as it was."""
    first, second = ShapesSource(), ShapesSource()
    assert first.model is not second.model and first.model is not U.load_model()
    first.model.double()
    assert next(second.model.parameters()).dtype == torch.float32
    assert next(U.load_model().parameters()).dtype == torch.float32
    assert next(ShapesSource().model.parameters()).dtype == torch.float32


@needs_weights
def test_shipped_model_is_small_and_counts_ground_truth_renders():
    size = sum(p.stat().st_size for p in U.model_path().iterdir() if p.is_file())
    assert size <= 5 * 1024 * 1024, f"understanding weights are {size / 1e6:.2f} MB, over the 5 MB budget"
    source = get_source("shapes")
    records = [r for r in make_splits(PromptConfig(), seed=0)["heldout"] if r["tag"] == "counting"]
    records = [r for r in records if r["include"][0]["count"] <= 4]
    scenes = [render_record(r, seed=s) for r in records for s in range(3)]
    result = score(decoded_of(scenes, [r["prompt"] for r in records for _ in range(3)]), source)
    found, target = result.count_found[:, 0].tolist(), result.count_target[:, 0].tolist()
    assert found == target
    # Position on a render and its mirror: the true relation wins.
    record = next(r for r in make_splits(PromptConfig(), seed=0)["heldout"] if r["tag"] == "position")
    scene = render_record(record, seed=0)
    axis = "x" if any(it.get("position", [""])[0] in ("left of", "right of") for it in record["include"]) else "y"
    both = score(decoded_of([scene, mirror_scene(scene, axis)], [record["prompt"]] * 2), source)
    assert both.position[0] > both.position[1]


# ---------------------------------------------------------------------------
# The training reward never sees the exact evaluator
# ---------------------------------------------------------------------------

REWARD_SIDE = [ROOT / "xlard" / "sources.py", ROOT / "xlard" / "shapes" / "understanding.py",
               ROOT / "scripts" / "train_shapes_understanding.py", ROOT / "xlard" / "rewards.py"]


@pytest.mark.parametrize("path", REWARD_SIDE, ids=lambda p: p.name)
def test_reward_side_has_no_evaluator_import_statically(path):
    from xlard.shapes import _EVALUATOR_NAMES

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            assert not any("evaluator" in a.name for a in node.names), ast.dump(node)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            assert "evaluator" not in module, ast.dump(node)
            assert not any(a.name == "evaluator" or a.name in _EVALUATOR_NAMES for a in node.names), ast.dump(node)


def test_reward_side_never_loads_the_evaluator_at_runtime():
    code = """
import sys, runpy, torch
sys.path.insert(0, 'scripts')
import train_shapes_understanding as T
import numpy as np
from xlard.sources import ShapesSource, score
from xlard.shapes import understanding as U
from xlard.backbones.base import Decoded
from xlard.prompts import parse
from xlard.shapes.world import random_scene
rng = np.random.default_rng(0)
x, s, c = T.render_batch(rng, T.make_splits(T.PromptConfig(), seed=0)['train'], 2, 0.5, U.UnderstandingConfig())
model = U.ShapesUnderstanding(U.UnderstandingConfig(channels=(4, 4, 4, 4)))
d = Decoded(images=x, latents=torch.zeros(0), token_maps=None, patch_features=None,
            specs=(parse('a photo of two circles'), parse('a photo of a red square')), segment_offsets={})
score(d, ShapesSource(model))
assert 'xlard.shapes.evaluator' not in sys.modules, 'the evaluator was imported'
print('ok')
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# ---------------------------------------------------------------------------
# CLIP source
# ---------------------------------------------------------------------------

_WORDS = "a photo of the background object circle circles square dog cat red blue green two left right".split()


@pytest.fixture(scope="module")
def word_tokenizer():
    pytest.importorskip("tokenizers")
    from helpers import word_level_tokenizer

    return word_level_tokenizer([".", *_WORDS])


@pytest.fixture(scope="module")
def tiny_clip(word_tokenizer):
    pytest.importorskip("transformers")
    from helpers import tiny_clip_model

    return tiny_clip_model(len(word_tokenizer))


def _hand_text(model, tokenizer, text):
    with torch.no_grad():
        ids = tokenizer([text], return_tensors="pt")
        return model.text_projection(model.text_model(input_ids=ids["input_ids"],
                                                      attention_mask=ids["attention_mask"]).pooler_output)[0]


def _two_prompts(source, images):
    """``(decoded, source inputs)`` of 'two circles left of a dog' (two entities) and 'a red cat' (one), checked."""
    decoded = Decoded(images=images, latents=torch.zeros(0), token_maps=None, patch_features=None,
                      specs=(parse("a photo of two circles left of a dog"), parse("a photo of a red cat")),
                      segment_offsets={})
    inputs = source(decoded)
    assert inputs["entity_maps"].shape == (2, 2, 4, 4)
    assert inputs["entity_available"].tolist() == [[True, True], [True, False]]
    return decoded, inputs


def test_clip_source_maps_are_noun_softmax_over_dense_patches(tiny_clip, word_tokenizer):
    source = get_source("clip", model=tiny_clip, tokenizer=word_tokenizer)
    assert isinstance(source, ClipSource) and not source.needs_attention
    images = torch.rand(2, 3, 32, 32)
    decoded, inputs = _two_prompts(source, images)
    maps = inputs["entity_maps"]
    # By hand: MaskCLIP patch features, cosine with each text, softmax over background + the prompt's nouns.
    with torch.no_grad():
        pixel = source.encoder._pixel_values(images)
        hidden = tiny_clip.vision_model(pixel_values=pixel, output_hidden_states=True).hidden_states[-2][:, 1:]
        last = tiny_clip.vision_model.encoder.layers[-1]
        v = last.self_attn.out_proj(last.self_attn.v_proj(last.layer_norm1(hidden)))
        feats = tiny_clip.visual_projection(tiny_clip.vision_model.post_layernorm(v))
    texts = [_hand_text(tiny_clip, word_tokenizer, t) for t in
             ("a photo of the background.", "a photo of a circle.", "a photo of a dog.")]
    cos = torch.stack([torch.nn.functional.cosine_similarity(feats[0], t[None], dim=-1) for t in texts], -1)
    probs = (tiny_clip.logit_scale.exp() * cos).softmax(-1)
    torch.testing.assert_close(maps[0, 0].flatten(), probs[:, 1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(maps[0, 1].flatten(), probs[:, 2], atol=1e-5, rtol=1e-4)


def test_clip_source_color_reward_is_the_hand_computed_cosine(tiny_clip, word_tokenizer):
    source = get_source("clip", model=tiny_clip, tokenizer=word_tokenizer)
    images = torch.rand(2, 3, 32, 32)
    decoded = Decoded(images=images, latents=torch.zeros(0), token_maps=None, patch_features=None,
                      specs=(parse("a photo of a red cat"), parse("a photo of a blue dog")), segment_offsets={})
    result = score(decoded, source, ExplainableRewards(RewardConfig(aspects=("color",))))
    feats = source.encoder.encode_images(images).features
    for i, color in enumerate(("red", "blue")):
        e = _hand_text(tiny_clip, word_tokenizer, f"a photo of a {color} object")
        cos = (feats[i] @ e) / (feats[i].norm(dim=-1) * e.norm())
        assert result.color[i].item() == pytest.approx(cos.max().item(), abs=1e-5)
        assert result.color_patch[i, 0].item() == int(cos.argmax())


def test_clip_source_from_a_local_folder(tiny_clip, word_tokenizer, tmp_path):
    tiny_clip.save_pretrained(tmp_path)
    word_tokenizer.save_pretrained(tmp_path)
    source = get_source("clip", model=str(tmp_path))
    direct = ClipSource(tiny_clip, word_tokenizer)
    decoded = Decoded(images=torch.rand(1, 3, 32, 32), latents=torch.zeros(0), token_maps=None, patch_features=None,
                      specs=(parse("a photo of a red cat"),), segment_offsets={})
    torch.testing.assert_close(source(decoded)["entity_maps"], direct(decoded)["entity_maps"])
    with pytest.raises(ValueError, match="noun_template"):
        ClipSource(tiny_clip, word_tokenizer, noun_template="a photo")
    # accepted before; score() failed: 'str' not callable (then a TypeError, where get_source promises ValueError)
    with pytest.raises(ValueError, match=r"get_source\('clip'\): tokenizer must be the loaded model's tokenizer .*"
                                         r"got str"):
        get_source("clip", model=tiny_clip, tokenizer="x")
    # texts longer than the text model's positions failed inside transformers ("Sequence length must be less")
    limit = tiny_clip.config.text_config.max_position_embeddings
    long = ClipSource(tiny_clip, word_tokenizer, noun_template="a photo of a {} " + "cat " * limit)
    with pytest.raises(ValueError, match=rf"ClipSource: the text 'a photo of a cat cat .* tokens, and the text "
                                         rf"model takes at most {limit}; shorten the noun_template or background"):
        long(decoded)
    long_color = ClipSource(tiny_clip, word_tokenizer, color_template="a photo of a {} " + "cat " * limit)
    with pytest.raises(ValueError, match=r"ClipColorEncoder: the text .* shorten the template"):
        long_color.encoder.embed_colors(["red"])


def test_clip_text_embeddings_are_cached_with_a_bound(tiny_clip, word_tokenizer):
    """The caches of text embeddings (ClipSource's nouns, ClipColorEncoder's colors) grew with every new text a
    long-lived process met; they now keep the most recently used ``capacity`` texts, and a call with more texts
    than that still returns them all, equal to an uncached computation."""
    source = ClipSource(tiny_clip, word_tokenizer)
    texts = [f"a photo of a {w}." for w in ("cat", "dog", "circle", "red", "blue")]
    fresh = torch.stack([_hand_text(tiny_clip, word_tokenizer, t) for t in texts])
    source._text_cache.capacity = 3
    torch.testing.assert_close(source.embed_texts(texts), fresh, atol=1e-5, rtol=1e-4)  # 5 texts > capacity 3
    assert len(source._text_cache) == 3
    torch.testing.assert_close(source.embed_texts(texts[:2] * 2), fresh[:2].repeat(2, 1), atol=1e-5, rtol=1e-4)
    assert len(source._text_cache) == 3
    encoder = source.encoder
    encoder._cache.capacity = 2
    colors = encoder.embed_colors(["red", "blue", "red", "green"])
    assert len(encoder._cache) == 2
    torch.testing.assert_close(colors[0], colors[2])
    torch.testing.assert_close(encoder.embed_colors(["green", "red"]), colors[[3, 0]])
    assert len(encoder._cache) == 2


def test_shapes_source_drops_two_tone_and_unclear_objects():
    source = ShapesSource(OracleUnderstanding([SCENE]), purity=0.6, confidence=0.7)
    maps = torch.zeros(1, 1, 16, 16)
    maps[0, 0, 1:5, 1:5] = 1.0      # one color: kept
    maps[0, 0, 1:5, 9:13] = 1.0     # half red, half blue: dropped
    maps[0, 0, 9:13, 1:5] = 0.65    # above the 0.5 cut but unclear (mean 0.65 < 0.7): dropped
    maps[0, 0, 9:13, 9:13] = 0.9    # clear: kept
    color = torch.zeros(1, 11, 16, 16)
    color[0, 0] = 1.0
    color[0, 0, :8], color[0, 1, :8] = 0.0, 1.0
    color[0, 1, 1:5, 11:13], color[0, 5, 1:5, 11:13] = 0.0, 1.0
    out = source.drop_mixed_objects(maps, color)
    assert out[0, 0, 1:5, 1:5].eq(1).all() and out[0, 0, 9:13, 9:13].eq(0.9).all()
    assert out[0, 0, 1:5, 9:13].eq(0).all() and out[0, 0, 9:13, 1:5].eq(0).all()
    lenient = ShapesSource(OracleUnderstanding([SCENE]), purity=0.4, confidence=0.6).drop_mixed_objects(maps, color)
    torch.testing.assert_close(lenient, maps)
    with pytest.raises(ValueError, match="purity must be a number in"):
        ShapesSource(OracleUnderstanding([SCENE]), purity=2)
    with pytest.raises(ValueError, match="confidence must be a number in"):
        get_source("shapes", model=OracleUnderstanding([SCENE]), confidence=-1)


def test_shapes_source_threshold_and_min_area_reach_the_filter_and_the_rewards():
    source = ShapesSource(OracleUnderstanding([SCENE]), purity=0.0, confidence=0.7, threshold=0.6, min_area=12)
    cfg = source.reward_config()
    assert (cfg.threshold, cfg.min_area, cfg.threshold_mode) == (0.6, 12, "absolute")
    assert not cfg.count_confidence and source.reward_config(count_confidence=True).count_confidence
    assert ShapesSource(OracleUnderstanding([SCENE]), count_confidence=True).reward_config().count_confidence
    with pytest.raises(ValueError, match="count_confidence must be a bool"):
        get_source("shapes", model=OracleUnderstanding([SCENE]), count_confidence="yes")
    with pytest.raises(ValueError, match="soft_count must be a bool"):
        get_source("shapes", model=OracleUnderstanding([SCENE]), soft_count=1)
    assert source.reward_config(min_area=3).min_area == 3
    maps = torch.zeros(1, 1, 16, 16)
    maps[0, 0, 1:5, 1:5] = 0.9
    maps[0, 0, 1:5, 5:9] = 0.55     # below the 0.6 cut: not part of the object, so its mean stays 0.9
    color = torch.zeros(1, 11, 16, 16)
    color[0, 0] = 1.0
    out = source.drop_mixed_objects(maps, color)
    torch.testing.assert_close(out, maps)
    # At the default 0.5 cut the two halves are one object of mean 0.725 (kept at 0.7, dropped at 0.75).
    assert ShapesSource(OracleUnderstanding([SCENE]), purity=0.0, confidence=0.75).drop_mixed_objects(
        maps, color).eq(0).all()
    for bad in (dict(threshold=1.5), dict(min_area=0), dict(min_area=2.5),
                dict(threshold=0.0), dict(threshold=1.0)):  # a cut at 0 or 1 found nothing in any image
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must"):
            ShapesSource(OracleUnderstanding([SCENE]), **bad)
    with pytest.raises(ValueError, match="give model or path, not both"):  # the path was dropped without a word
        get_source("shapes", model=OracleUnderstanding([SCENE]), path="/no/such/folder")
    assert get_source("shapes", model=OracleUnderstanding([SCENE]), threshold=0.6, min_area=12).min_area == 12


def test_shapes_source_drops_objects_whose_pixels_are_two_palette_colors():
    from xlard.shapes.world import PALETTE

    maps = torch.zeros(1, 1, 16, 16)
    maps[0, 0, 1:5, 1:5] = 0.9      # painted red: kept
    maps[0, 0, 1:5, 9:13] = 0.9     # half its pixels blue, half red: dropped at 0.7
    color = torch.zeros(1, 11, 16, 16)
    color[0, 0] = 1.0
    color[0, 0, 1:5, 1:13], color[0, 1, 1:5, 1:13] = 0.0, 1.0     # the color head calls both red
    images = torch.full((1, 3, 16, 16), 0.5)
    images[0, :, 1:5, 1:13] = torch.tensor(PALETTE["red"])[:, None, None] / 255.0
    images[0, :, 1:5, 11:13] = torch.tensor(PALETTE["blue"])[:, None, None] / 255.0 + 0.05
    strict = ShapesSource(OracleUnderstanding([SCENE]), purity=0.6, confidence=0.7, paint_purity=0.7)
    out = strict.drop_mixed_objects(maps, color, images)
    assert out[0, 0, 1:5, 1:5].eq(0.9).all() and out[0, 0, 1:5, 9:13].eq(0).all()
    torch.testing.assert_close(strict.drop_mixed_objects(maps, color), maps)        # no images: no paint check
    off = ShapesSource(OracleUnderstanding([SCENE]), purity=0.6, confidence=0.7, paint_purity=0.0)
    torch.testing.assert_close(off.drop_mixed_objects(maps, color, images), maps)
    lenient = ShapesSource(OracleUnderstanding([SCENE]), purity=0.6, confidence=0.7, paint_purity=0.5)
    torch.testing.assert_close(lenient.drop_mixed_objects(maps, color, images), maps)  # half red >= 0.5
    with pytest.raises(ValueError, match="paint_purity must be a number in"):
        get_source("shapes", model=OracleUnderstanding([SCENE]), paint_purity=1.2)


def test_meta_and_nan_images_are_named_everywhere(tmp_path):
    """Meta tensors (shapes only) reached an .item() deep inside ("Tensor.item() cannot be called on meta
    tensors") and NaN pixels scored color 0 without a word in as_image_batch."""
    from xlard import sources as source_module
    from xlard._args import as_device
    from xlard.color_features import as_image_batch
    from xlard.explain import save_png
    from xlard.shapes import evaluator as E
    from xlard.shapes.prompts import enumerate_records

    meta = torch.rand(1, 3, 16, 16, device="meta")
    with pytest.raises(ValueError, match="image is a meta tensor"):
        save_png(tmp_path / "x.png", meta[0])
    with pytest.raises(ValueError, match="as_image_batch: images are meta tensors"):
        as_image_batch(meta)
    nan = torch.rand(1, 3, 16, 16)
    nan[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"as_image_batch: images hold 1 NaN or infinite value\(s\)"):
        as_image_batch(nan)
    with pytest.raises(ValueError, match="image 0: a meta tensor holds no pixels"):
        E.evaluate(meta, enumerate_records("counting")[1])
    decoded = Decoded(images=meta, latents=None, token_maps=None, patch_features=None,
                      specs=[parse("three circles")], segment_offsets={})
    with pytest.raises(ValueError, match="decoded.images are meta tensors"):
        source_module._decoded_parts(decoded, "shapes source")
    with pytest.raises(ValueError, match="device: meta holds shapes only"):
        as_device("meta", "DiffusersBackbone.from_pretrained")
    assert not (tmp_path / "x.png").exists()


@needs_weights
def test_two_entities_of_one_noun_are_told_apart_by_their_colors():
    """'a red circle left of a blue circle': the shapes source gave both entities the circle map, so each
    counted both circles and the relation compared one centroid with itself (0.5 for the scene and its mirror)."""
    left = Scene(64, (SceneObject("circle", "red", (6, 24, 20, 38)), SceneObject("circle", "blue", (42, 24, 56, 38))))
    prompt = "a photo of a red circle left of a blue circle"
    result = score(decoded_of([left, mirror_scene(left, "x")], [prompt] * 2), get_source("shapes"))
    assert result.count_found.tolist() == [[1, 1], [1, 1]]
    assert result.position[0] > 0.99 and result.position[1] < 0.01
    assert "found 1 (at (0.20, 0.48))" in result.explanations[0].text()
    # Entities of different nouns keep their noun's whole map (the colors are the color reward's business).
    plain = score(decoded_of([left], ["a photo of a red circle left of a blue square"]), get_source("shapes"))
    assert plain.count_found[0, 0] == 2


def test_clip_source_weighs_one_noun_by_each_entity_color(tiny_clip, word_tokenizer):
    source = get_source("clip", model=tiny_clip, tokenizer=word_tokenizer)
    images = torch.rand(1, 3, 32, 32)
    spec = parse("a photo of a red dog left of a blue dog")
    maps = source(Decoded(images=images, latents=torch.zeros(0), token_maps=None, patch_features=None,
                          specs=(spec,), segment_offsets={}))["entity_maps"]
    alone = source(Decoded(images=images, latents=torch.zeros(0), token_maps=None, patch_features=None,
                           specs=(parse("a photo of a dog"),), segment_offsets={}))["entity_maps"][0, 0]
    feats = torch.nn.functional.normalize(source.encoder.encode_images(images).features[0], dim=-1)
    names = sorted(GENEVAL_COLORS)  # the prompt's colors and GenEval's ten
    shades = torch.nn.functional.normalize(source.encoder.embed_colors(names), dim=-1)
    gate = (tiny_clip.logit_scale.exp() * feats @ shades.T).softmax(-1)  # per patch, over the colors
    red, blue = names.index("red"), names.index("blue")
    torch.testing.assert_close(maps[0, 0].flatten(), alone.flatten() * gate[:, red], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(maps[0, 1].flatten(), alone.flatten() * gate[:, blue], atol=1e-5, rtol=1e-4)
    # one entity colored: a softmax over the prompt's one color was 1 everywhere, so both dogs read one map and the
    # relation scored 0.5 on any image
    one = source(Decoded(images=images, latents=torch.zeros(0), token_maps=None, patch_features=None,
                         specs=(parse("a photo of a red dog left of a dog"),), segment_offsets={}))["entity_maps"]
    torch.testing.assert_close(one[0, 0].flatten(), alone.flatten() * gate[:, red], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(one[0, 1], alone, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(one[0, 0], one[0, 1])


def test_clip_source_reads_its_maps_with_an_absolute_cut_and_colors_bound_to_each_entity(tiny_clip, word_tokenizer):
    """It inherited the base reward config: a cut relative to each map's own peak (an object found however unlikely
    the noun, so 'found 0' never came) and colors looked for anywhere in the image ('a red cat and a blue dog'
    scored a blue cat beside a red dog exactly as the right image)."""
    source = get_source("clip", model=tiny_clip, tokenizer=word_tokenizer)
    config = source.reward_config()
    assert (config.threshold, config.threshold_mode, config.bind_color) == (0.5, "absolute", True)
    assert source.reward_config(bind_color=False, threshold=0.7).bind_color is False
    assert get_source("clip", model=tiny_clip, tokenizer=word_tokenizer, threshold=0.3).reward_config().threshold == 0.3
    for bad in (0, 1.0, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=r"ClipSource: threshold must be a number in \(0, 1\)"):
            ClipSource(tiny_clip, word_tokenizer, threshold=bad)
    # before anything loads: a run's config check, and from_pretrained before the model is read
    from xlard.train.rewarding import check_reward_settings

    settings = types.SimpleNamespace(source="clip", options={"model": "org/not-cached", "threshold": 2.0},
                                     bind_color=None)
    with pytest.raises(ValueError, match=r"train config reward.options: threshold must be a number in \(0, 1\)"):
        check_reward_settings(settings, "some/backbone")
    with pytest.raises(ValueError, match=r"ClipSource: threshold must be a number in \(0, 1\) .*got 2.0"):
        get_source("clip", model="/no/such/clip/folder", threshold=2.0)
    rewards = ExplainableRewards(config)
    decoded = Decoded(images=torch.rand(1, 3, 32, 32), latents=torch.zeros(0), token_maps=None, patch_features=None,
                      specs=(parse("a photo of a dog"),), segment_offsets={})
    inputs = source(decoded)
    high = torch.zeros_like(inputs["entity_maps"])
    high[0, 0, 1:3, 1:3] = 0.9
    assert rewards(**dict(inputs, entity_maps=high)).count.tolist() == [1.0]
    faint = rewards(**dict(inputs, entity_maps=high * 1e-3), explain=True)  # relative: 1 object, count reward 1.0
    assert faint.count.tolist() == pytest.approx([math.exp(-1.0)])
    assert "found 0" in faint.explanations[0].text()
    # two entities, each's region painted with its own color's text embedding
    right, swapped = parse("a photo of a red cat and a blue dog"), parse("a photo of a blue cat and a red dog")
    inputs = source(Decoded(images=torch.rand(2, 3, 32, 32), latents=torch.zeros(0), token_maps=None,
                            patch_features=None, specs=(right, swapped), segment_offsets={}))
    maps = torch.zeros_like(inputs["entity_maps"])
    maps[:, 0, :, :2] = 0.9  # the cat on the left half, the dog on the right
    maps[:, 1, :, 2:] = 0.9
    red, blue = torch.eye(inputs["patch_features"].features.shape[-1])[:2]  # a tiny CLIP's color texts are ~alike
    grid = maps.shape[-2:]
    left = (torch.arange(grid[0] * grid[1]) % grid[1] < 2)[None, :, None]
    features = torch.where(left, red, blue).expand(2, -1, -1).contiguous()
    inputs = dict(inputs, entity_maps=maps, patch_features=PatchFeatures(features, tuple(grid)),
                  color_embeddings={"red": red, "blue": blue})
    assert rewards(**inputs).color.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    unbound = ExplainableRewards(source.reward_config(bind_color=False))(**inputs).color
    assert unbound.tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


@pytest.fixture(scope="module")
def tiny_siglip(word_tokenizer):
    pytest.importorskip("transformers")
    from helpers import tiny_siglip_model

    return tiny_siglip_model(len(word_tokenizer))


def test_siglip_head_read_at_each_patch_is_the_pooled_head_where_patches_agree(tiny_siglip):
    from xlard.color_features import siglip_head_per_patch

    head = tiny_siglip.vision_model.head
    torch.manual_seed(1)
    same = torch.randn(2, 1, 32).expand(2, 4, 32)
    with torch.no_grad():
        pooled = head(same)  # the image embedding: the probe attends over four equal patches
        each = siglip_head_per_patch(head, same)
        torch.testing.assert_close(each, pooled[:, None].expand(2, 4, 32), atol=1e-5, rtol=1e-5)
        x = torch.randn(1, 4, 32)  # distinct patches: each one's reading is its own, whatever the others
        torch.testing.assert_close(siglip_head_per_patch(head, x)[:, 2:3], siglip_head_per_patch(head, x[:, 2:3]))


def test_siglip_head_per_patch_is_the_head_attending_to_that_patch_alone():
    """Checked against torch's MultiheadAttention with the one patch as key and value, packed projections and
    separate ones (key/value sizes other than the query's: the bias was sliced at the value size and failed)."""
    from xlard.color_features import siglip_head_per_patch

    torch.manual_seed(0)
    for kwargs in ({}, {"kdim": 24, "vdim": 24}):
        d = 24 if kwargs else 32
        head = types.SimpleNamespace(attention=torch.nn.MultiheadAttention(32, 4, batch_first=True, **kwargs),
                                     layernorm=torch.nn.LayerNorm(32), mlp=torch.nn.Linear(32, 32))
        probe, x = torch.randn(2, 1, 32), torch.randn(2, 5, d)
        with torch.no_grad():
            got = siglip_head_per_patch(head, x)
            for i in range(5):
                alone = head.attention(probe, x[:, i:i + 1], x[:, i:i + 1])[0][:, 0]
                torch.testing.assert_close(got[:, i], alone + head.mlp(head.layernorm(alone)))


def test_siglip_patches_where_they_agree_are_the_image_embedding_on_the_tokens_reading(word_tokenizer):
    """The 'tokens' reading applied SigLIP's post_layernorm twice (its last_hidden_state is normalized already):
    invisible with a fresh model's identity norms, 1.17 off the image embedding with trained ones."""
    from helpers import tiny_siglip_model

    from xlard.color_features import ClipColorEncoder

    model = tiny_siglip_model(len(word_tokenizer))  # its norms are not the identity
    # every token the same after the encoder: the head's probe then attends over equal values
    hook = model.vision_model.encoder.register_forward_hook(
        lambda module, args, out: type(out)(last_hidden_state=out.last_hidden_state.mean(1, keepdim=True).expand_as(
            out.last_hidden_state).contiguous(), hidden_states=out.hidden_states))
    try:
        encoder = ClipColorEncoder(model, word_tokenizer, dense="tokens")
        images = torch.rand(2, 3, 32, 32)
        patches = encoder.encode_images(images).features
        with torch.no_grad():
            pooled = model.vision_model(pixel_values=encoder._pixel_values(images)).pooler_output
    finally:
        hook.remove()
    torch.testing.assert_close(patches, pooled[:, None].expand_as(patches), atol=1e-5, rtol=1e-4)


def test_an_over_long_siglip_text_in_a_batch_is_named(tiny_siglip, word_tokenizer):
    """Padded to max_length, one over-long text made the batch uneven: the tokenizer's own 'Unable to create
    tensor' came before the length check."""
    limit = tiny_siglip.config.text_config.max_position_embeddings
    source = ClipSource(tiny_siglip, word_tokenizer, background="a photo of the " + "background " * limit)
    decoded = Decoded(images=torch.rand(1, 3, 32, 32), latents=torch.zeros(0), token_maps=None, patch_features=None,
                      specs=(parse("a photo of a dog"),), segment_offsets={})
    with pytest.raises(ValueError, match=rf"ClipSource: the text 'a photo of the background .* tokens, and the text "
                                         rf"model takes at most {limit}; shorten the noun_template or background"):
        source(decoded)


def _siglip_by_hand(model, tokenizer, images, texts):
    """SigLIP patch features (last layer's value path, post-norm, the head read at each patch) and text embeddings
    (padded to max_position_embeddings, no mask), written out with the modules' own weights."""
    with torch.no_grad():
        vision = model.vision_model
        pixels = ((images - 0.5) / 0.5)
        hidden = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]  # no class token
        last = vision.encoder.layers[-1]
        v = vision.post_layernorm(last.self_attn.out_proj(last.self_attn.v_proj(last.layer_norm1(hidden))))
        attention, d = vision.head.attention, v.shape[-1]
        v = attention.out_proj(v @ attention.in_proj_weight[2 * d:].T + attention.in_proj_bias[2 * d:])
        features = v + vision.head.mlp(vision.head.layernorm(v))
        ids = tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
        text = model.text_model(input_ids=ids).pooler_output
    return features, text


def test_siglip_source_maps_are_noun_softmax_over_the_head_read_at_each_patch(tiny_siglip, word_tokenizer):
    """SigLIP was refused ('has no visual_projection'); it has no class token and pools with an attention head."""
    source = get_source("clip", model=tiny_siglip, tokenizer=word_tokenizer)
    assert source.encoder.kind == "siglip" and source.encoder.image_mean == source.encoder.image_std == (0.5,) * 3
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    decoded, inputs = _two_prompts(source, images)
    maps = inputs["entity_maps"]
    texts = ["a photo of the background.", "a photo of a circle.", "a photo of a dog."]
    feats, text = _siglip_by_hand(tiny_siglip, word_tokenizer, images, texts)
    torch.testing.assert_close(inputs["patch_features"].features, feats, atol=1e-5, rtol=1e-4)
    cos = torch.nn.functional.normalize(feats[0], dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    probs = (tiny_siglip.logit_scale.exp() * cos).softmax(-1)
    torch.testing.assert_close(maps[0, 0].flatten(), probs[:, 1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(maps[0, 1].flatten(), probs[:, 2], atol=1e-5, rtol=1e-4)
    # a text's embedding does not depend on the batch it is embedded in (SigLIP pools the last token)
    alone = source.encoder.embed_texts(["a photo of a dog."])
    beside = source.encoder.embed_texts(["a photo of two dogs left of the red circle object", "a photo of a dog."])
    torch.testing.assert_close(beside[1:], alone)
    torch.testing.assert_close(source.encoder.embed_colors(["red"])[0], _siglip_by_hand(
        tiny_siglip, word_tokenizer, images[:1], ["a photo of a red object"])[1][0], atol=1e-5, rtol=1e-4)
    result = score(decoded, source)
    assert result.count.shape == (2,) and torch.isfinite(result.joint).all()


def test_siglip_from_a_folder_with_its_sentencepiece_tokenizer(tmp_path, monkeypatch):
    """A SigLIP checkpoint as a user has it: SiglipModel, a sentencepiece tokenizer, SigLIP's image processor."""
    spm = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    import io

    from helpers import tiny_siglip_model

    from xlard.color_features import check_clip_model

    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([" ".join(_WORDS)] * 8), model_writer=model_file,
                                   vocab_size=len(_WORDS) + 3, model_type="word", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    (tmp_path / "spiece.model").write_bytes(model_file.getvalue())
    tokenizer = transformers.SiglipTokenizer(vocab_file=str(tmp_path / "spiece.model"))
    folder = tmp_path / "siglip"
    model = tiny_siglip_model(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    transformers.SiglipImageProcessor(image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4]).save_pretrained(folder)
    assert check_clip_model("x", str(folder)) == str(folder)
    source = get_source("clip", model=str(folder))
    assert source.encoder.kind == "siglip" and (source.encoder.image_mean, source.encoder.image_std) == (
        (0.4, 0.5, 0.6), (0.2, 0.3, 0.4))
    decoded = Decoded(images=torch.rand(1, 3, 32, 32), latents=torch.zeros(0), token_maps=None, patch_features=None,
                      specs=(parse("a photo of a red dog"),), segment_offsets={})
    direct = ClipSource(model, tokenizer, image_mean=(0.4, 0.5, 0.6), image_std=(0.2, 0.3, 0.4))
    torch.testing.assert_close(source(decoded)["entity_maps"], direct(decoded)["entity_maps"])
    ids = tokenizer(["a photo of a dog."], padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model.text_model(input_ids=ids).pooler_output
    torch.testing.assert_close(source.embed_texts(["a photo of a dog."]), want)

    def no_sentencepiece(*args, **kwargs):
        raise ImportError("SiglipTokenizer requires the SentencePiece library but it was not found")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_sentencepiece)
    with pytest.raises(ImportError, match=r"its tokenizer could not be loaded \(SiglipTokenizer requires the "
                                          r"SentencePiece .*\); a SigLIP tokenizer needs sentencepiece: "
                                          r"pip install 'xlard\[method\]'$"):
        get_source("clip", model=str(folder))


def test_a_siglip_tower_without_its_pooling_head_is_refused(word_tokenizer):
    from helpers import tiny_siglip_model

    headless = tiny_siglip_model(len(word_tokenizer), vision_use_head=False)
    with pytest.raises(ValueError, match=r"SigLIP model's vision tower has no attention-pooling head"):
        get_source("clip", model=headless, tokenizer=word_tokenizer)


def test_a_damaged_clip_folder_or_bad_clip_settings_are_named(tiny_clip, word_tokenizer, tmp_path):
    """A folder without tokenizer files loaded a 2-token tokenizer (every map flat); one without visual_projection
    loaded a random one; dtype= beside a loaded model was dropped; image_std 0 gave NaN maps; the maps carried an
    autograd graph."""
    from safetensors.torch import load_file, save_file

    no_tok = tmp_path / "no_tok"
    tiny_clip.save_pretrained(no_tok)
    with pytest.raises(ValueError, match="has no usable tokenizer"):
        get_source("clip", model=str(no_tok))
    # named as the run's setting by the config-only check (it came after the backbone had loaded, named as
    # ClipColorEncoder.from_pretrained)
    from xlard.color_features import check_clip_model

    with pytest.raises(ValueError, match=r"^train config reward.options.model: .*no_tok has no usable tokenizer: no "
                                         r"tokenizer.json, or vocab.json \+ merges.txt beside its config.json"):
        check_clip_model("train config reward.options.model", str(no_tok))
    no_proj = tmp_path / "no_proj"
    tiny_clip.save_pretrained(no_proj)
    word_tokenizer.save_pretrained(no_proj)
    weights = load_file(str(no_proj / "model.safetensors"))
    del weights["visual_projection.weight"]
    save_file(weights, str(no_proj / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks weights of the model \\(visual_projection.weight\\)"):
        get_source("clip", model=str(no_proj))
    (no_proj / "model.safetensors").unlink()  # an interrupted copy: transformers' own text named no argument
    with pytest.raises(ValueError, match=r"model_id_or_path .*no_proj: its weights could not be loaded \(.*\); "
                                         r"restore the file$"):
        get_source("clip", model=str(no_proj))
    with pytest.raises(ValueError, match="dtype= goes with a checkpoint id or folder"):
        get_source("clip", model=tiny_clip, tokenizer=word_tokenizer, dtype=torch.float16)
    for kwargs, pattern in (({"image_std": (0, 0, 0)}, "image_std must be 3 finite numbers"),
                            ({"image_mean": (0.5,)}, "image_mean must be 3 finite numbers"),
                            ({"noun_template": "{} {}"}, "noun_template must contain exactly one"),
                            ({"background": 3}, "background must be a non-empty text")):
        with pytest.raises(ValueError, match=pattern):
            ClipSource(tiny_clip, word_tokenizer, **kwargs)
    decoded = Decoded(images=torch.rand(1, 3, 32, 32), latents=torch.zeros(0), token_maps=None, patch_features=None,
                      specs=(parse("a photo of a red cat"),), segment_offsets={})
    assert not ClipSource(tiny_clip, word_tokenizer)(decoded)["entity_maps"].requires_grad


def test_clip_source_settings_users_get_wrong_are_taken_or_named(tiny_clip, word_tokenizer, tmp_path):
    """A CLIPProcessor passed as tokenizer= read the background prompt as an image URL at scoring time; a tokenizer
    with tokens the model lacks was a bare IndexError on the prompt using one; dtype 'fp16' failed inside
    transformers (in a run: after the backbone loaded); a processor config without normalization or with one
    number per statistic was ignored or refused under an argument the user never passed; from_pretrained's
    documented image_mean= was a raw TypeError."""
    from transformers import CLIPImageProcessor

    from xlard.color_features import ClipColorEncoder
    from xlard.train.rewarding import check_reward_settings

    decoded = Decoded(images=torch.rand(1, 3, 32, 32), latents=torch.zeros(0), token_maps=None, patch_features=None,
                      specs=(parse("a photo of a red cat"),), segment_offsets={})

    class Processor:  # what a processor holds: a tokenizer and an image processor
        tokenizer, image_processor = word_tokenizer, CLIPImageProcessor()

        def __call__(self, *args, **kwargs):
            raise AssertionError("the processor itself was called")

    want = ClipSource(tiny_clip, word_tokenizer)(decoded)["entity_maps"]
    assert torch.equal(ClipSource(tiny_clip, Processor())(decoded)["entity_maps"], want)

    class Longer:  # the model's tokenizer with one token added
        def __call__(self, *args, **kwargs):
            return word_tokenizer(*args, **kwargs)

        def __len__(self):
            return len(word_tokenizer) + 1

    with pytest.raises(ValueError, match=r"the tokenizer holds \d+ tokens but the model's text embedding \d+"):
        ClipColorEncoder(tiny_clip, Longer())
    folder = tmp_path / "clip"
    tiny_clip.save_pretrained(folder)
    word_tokenizer.save_pretrained(folder)
    for dtype in ("fp16", torch.int8, "half"):
        with pytest.raises(ValueError, match=r"dtype must be float32, float16, bfloat16 or float64 .*got"):
            get_source("clip", model=str(folder), dtype=dtype)
        settings = types.SimpleNamespace(source="clip", options={"model": str(folder), "dtype": dtype}, bind_color=None)
        with pytest.raises(ValueError, match=r"train config reward.options.dtype: dtype must be"):
            check_reward_settings(settings, "some/backbone")
    assert get_source("clip", model=str(folder), dtype="bfloat16").encoder.dtype == torch.bfloat16
    assert get_source("clip", model=str(folder), dtype=torch.float64).encoder.dtype == torch.float64  # as before
    CLIPImageProcessor(do_normalize=False).save_pretrained(folder)
    plain = get_source("clip", model=str(folder)).encoder
    assert (plain.image_mean, plain.image_std) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    CLIPImageProcessor(image_mean=0.5, image_std=0.25).save_pretrained(folder)
    scalar = get_source("clip", model=str(folder)).encoder
    assert (scalar.image_mean, scalar.image_std) == ((0.5,) * 3, (0.25,) * 3)
    CLIPImageProcessor(image_std=[0.0, 0.0, 0.0]).save_pretrained(folder)
    with pytest.raises(ValueError, match=r"image processor config \(preprocessor_config.json\): .*image_std"):
        get_source("clip", model=str(folder))
    CLIPImageProcessor().save_pretrained(folder)
    given = ClipSource.from_pretrained(folder, image_mean=(0.1, 0.2, 0.3), image_std=(1, 1, 1)).encoder
    assert (given.image_mean, given.image_std) == ((0.1, 0.2, 0.3), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="tokenizer= goes with a loaded CLIPModel"):
        ClipSource.from_pretrained(folder, tokenizer=word_tokenizer)


def test_shapes_source_weighed_count():
    """Each found object counts by min(ramp(mean probability, 0.5, 0.95), ramp(color purity, 0.3, 0.9)); objects
    under min_area do not count; the source hands the sum to the rewards, which score it."""
    source = ShapesSource(OracleUnderstanding([SCENE]))
    maps = torch.zeros(1, 2, 16, 16)
    maps[0, 0, 1:5, 1:5] = 0.95     # clear, one color: 1
    maps[0, 0, 1:5, 9:13] = 0.725   # half as sure: 0.5
    maps[0, 0, 9:13, 1:5] = 0.95    # 75% one color: ramp(0.75, 0.3, 0.9) = 0.75
    maps[0, 0, 9:11, 9:11] = 1.0    # 4 pixels, under min_area 8: not counted
    maps[0, 1, 9:13, 9:13] = 0.6    # ramp(0.6, 0.5, 0.95) = 2/9
    color = torch.zeros(1, 11, 16, 16)
    color[0, 0] = 1.0                                               # background ...
    color[0, 0, :, :8], color[0, 1, :, :8] = 0.0, 1.0               # ... but red on the left
    color[0, 1, 9:13, 1], color[0, 5, 9:13, 1] = 0.0, 1.0           # one column of the third object blue
    got = source.weighed_counts(maps, color)
    torch.testing.assert_close(got, torch.tensor([[1.0 + 0.5 + 0.75, (0.6 - 0.5) / 0.45]]))
    assert source.weighed_counts(torch.zeros(0, 2, 16, 16), torch.zeros(0, 11, 16, 16)).shape == (0, 2)
    assert source.weighed_counts(torch.zeros(1, 0, 16, 16), color).shape == (1, 0)
    with pytest.raises(ValueError, match=r"color_probs must be a tensor \[B=1, 1 \+ C, H=16, W=16\], got .*\[2, 11"):
        source.weighed_counts(maps, torch.zeros(2, 11, 16, 16))
    with pytest.raises(ValueError, match="maps must be a float tensor"):
        source.weighed_counts(maps[0], color)
    # what the source hands over and the rewards score
    images = torch.from_numpy(SCENE.render()).permute(2, 0, 1)[None].float() / 255
    decoded = Decoded(images=images, latents=torch.zeros(0), token_maps=None, patch_features=None,
                      specs=(parse("a photo of three circles"),), segment_offsets={})
    inputs = source(decoded)
    torch.testing.assert_close(inputs["entity_counts"], torch.tensor([[3.0]]))  # the oracle's three clear circles
    assert "entity_counts" not in ShapesSource(OracleUnderstanding([SCENE]), soft_count=False)(decoded)
    result = score(decoded, source)
    assert result.scores[0, 0].item() == pytest.approx(1.0)
    assert "weighed count 3.00" in result.explanations[0].text()
    two = score(Decoded(images=images, latents=torch.zeros(0), token_maps=None, patch_features=None,
                        specs=(parse("a photo of two circles"),), segment_offsets={}), source)
    assert two.scores[0, 0].item() == pytest.approx(math.exp(-1 / 2))


def test_the_shapes_source_counts_only_objects_of_an_absent_entitys_color():
    """"a red circle and no blue squares": a red square (allowed) was penalised exactly as the blue one (the absent
    entity's color was dropped), and before that the blue square's image scored better than the right one."""
    circle = SceneObject("circle", "red", (4, 4, 18, 18))
    scenes = [Scene(64, (circle,)), Scene(64, (circle, SceneObject("square", "red", (40, 40, 54, 54)))),
              Scene(64, (circle, SceneObject("square", "blue", (40, 40, 54, 54))))]
    prompt = "a photo of a red circle and no blue squares"
    result = score(decoded_of(scenes, [prompt] * 3), ShapesSource(OracleUnderstanding(scenes), purity=0.0))
    joint = result.joint.tolist()
    assert joint[0] == pytest.approx(1.0) and joint[1] == pytest.approx(1.0) and joint[2] < 0.9
    assert result.present[:, 1].all()  # the red circle's color is judged; the absent square's is not
    assert "asked for 0 blue squares, found 1" in result.explanations[2].text()


# ---------------------------------------------------------------------------
# Found by the read-only walk of the sources (each failed before its fix)
# ---------------------------------------------------------------------------


def test_attention_source_without_segment_offsets_reads_the_specs_own_alignment():
    """A backbone that recorded no offsets ({} or None) made the source pass {} to the rewards, which looked every
    entity up in that empty table and blamed the spec ("has no token indices") though it was aligned."""
    from helpers import word_level_tokenizer

    spec = parse("a photo of two red circles", tokenizer=word_level_tokenizer([".", *_WORDS]))
    noun = spec.entities[0].token_indices[0]
    maps = torch.zeros(1, 16, 8, 8)
    maps[0, noun, 1:3, 1:3] = maps[0, noun, 5:7, 5:7] = 1.0
    images = torch.rand(1, 3, 64, 64)
    for offsets in ({"tokenizer": 0}, {}, None):
        decoded = Decoded(images=images, latents=torch.zeros(0), token_maps=maps, patch_features=None, specs=(spec,),
                          segment_offsets=offsets)
        assert score(decoded, get_source("attention")).count_found.tolist() == [[2]], offsets


def test_shapes_source_hands_out_copies_of_its_color_embeddings():
    """``.to(device)`` on the same device returned the source's own tensor: a caller smoothing "its" embedding in
    place changed every later color score of the source."""
    source = ShapesSource(OracleUnderstanding([SCENE]))
    decoded = decoded_of([SCENE], ["a photo of a red circle"])
    before = score(decoded, source).color.tolist()
    source(decoded)["color_embeddings"]["red"].mul_(0.5).add_(0.5)
    assert score(decoded, source).color.tolist() == before


def test_drop_mixed_objects_refuses_images_outside_0_1():
    """0..255 images were all nearest to the palette's lightest colors: the paint check passed a two-tone blob."""
    source = ShapesSource(OracleUnderstanding([SCENE]), purity=0.0, confidence=0.0)
    maps = torch.zeros(1, 1, 64, 64)
    maps[0, 0, 10:30, 10:30] = 0.99
    color = torch.zeros(1, 11, 64, 64)
    color[:, 0] = 1.0
    images = torch.full((1, 3, 64, 64), 0.9)
    images[0, :, 10:30, 10:20] = torch.tensor([210.0, 35, 35]).view(3, 1, 1) / 255  # a red half ...
    images[0, :, 10:30, 20:30] = torch.tensor([35.0, 75, 215]).view(3, 1, 1) / 255  # ... and a blue one
    assert source.drop_mixed_objects(maps, color, images).sum() == 0
    with pytest.raises(ValueError, match=r"drop_mixed_objects: images must lie in \[0, 1\], got values in "
                                         r"\[35, 230\] \(0..255 values\? divide by 255\)"):
        source.drop_mixed_objects(maps, color, images * 255)
    with pytest.raises(ValueError, match=r"images must lie in \[0, 1\].*images / 2 \+ 0.5"):
        source.drop_mixed_objects(maps, color, images * 2 - 1)


def test_unknown_nouns_are_named_by_the_shapes_source_and_skip_still_leaves_them_out():
    """An unknown noun fell through to the rewards' "has no map (entity_available is False)"; unknown colors were
    named up front. missing_entity='skip' stays the way to score such prompts."""
    source = ShapesSource(OracleUnderstanding([SCENE]))
    decoded = decoded_of([SCENE], ["a photo of a red dog and a circle"])
    with pytest.raises(ValueError, match=r"shapes source: nouns \['dog'\] are not in the shapes world's shapes "
                                         r"\('circle', 'square', 'triangle', 'diamond'\); .*missing_entity='skip'"):
        score(decoded, source)
    assert source.unknown_nouns(decoded.specs) == ["dog"]
    result = score(decoded, source, ExplainableRewards(source.reward_config(missing_entity="skip")))
    assert result.count_found[0, 1].item() == 3  # the circles are still scored
    assert source(decoded)["entity_available"].tolist() == [[False, True]]


def test_messages_name_the_type_dtype_and_shape_that_came():
    """A shape alone read like a fitting one: a numpy array, a uint8 or int64 tensor of the right shape."""
    source = ShapesSource(OracleUnderstanding([SCENE]))
    image = decoded_of([SCENE], ["a photo of a circle"]).images
    with pytest.raises(ValueError, match=r"decoded.images must be a float tensor .* got a numpy.ndarray \(float32, "
                                         r"shape \[1, 3, 64, 64\]; torch.from_numpy"):
        source(Decoded(images=image.numpy(), latents=torch.zeros(0), token_maps=None, patch_features=None,
                       specs=(parse("a photo of a circle"),), segment_offsets={}))
    maps, color = torch.rand(1, 2, 8, 8), torch.rand(1, 11, 8, 8)
    with pytest.raises(ValueError, match=r"weighed_counts: color_probs must be a tensor .* got a numpy.ndarray "
                                         r"\(float32, shape \[1, 11, 8, 8\]"):
        source.weighed_counts(maps, color.numpy())
    with pytest.raises(ValueError, match=r"weighed_counts: maps must be a float tensor \[B, E, H, W\], got a "
                                         r"torch.Tensor \(int64, shape \[1, 2, 8, 8\]\)"):
        source.weighed_counts((maps > 0.5).long(), color)
    model = U.ShapesUnderstanding(U.UnderstandingConfig(channels=(4, 4, 4, 4))).eval()
    with pytest.raises(ValueError, match=r"predict: images must be a float tensor .* got a torch.Tensor \(uint8, "
                                         r"shape \[1, 3, 64, 64\]\) \(8-bit images: images.float\(\) / 255\)"):
        model.predict((image * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"predict: images must be a float tensor .* got a numpy.ndarray"):
        model.predict(image.numpy())


def test_predict_refuses_empty_images():
    """0 x W images failed in F.interpolate ("Input and output sizes should be greater than 0")."""
    model = U.ShapesUnderstanding(U.UnderstandingConfig(channels=(4, 4, 4, 4))).eval()
    for h, w in ((0, 0), (0, 64), (48, 0)):
        with pytest.raises(ValueError, match=rf"ShapesUnderstanding.predict: images are empty \({h} x {w} pixels\)"):
            model.predict(torch.zeros(1, 3, h, w))


def test_understanding_config_refuses_strings_and_non_integral_widths():
    """shapes="square" made a model of the shapes 's', 'q', 'u', ...; widths 8.9 were cut to 8 and core_radius=True
    read as 1, without a word."""
    for bad, field in ((dict(shapes="square"), "shapes"), (dict(colors="red"), "colors"),
                       (dict(shapes=b"ab"), "shapes"), (dict(shapes=(1, 2)), "shapes"),
                       (dict(colors=("red", "")), "colors"),
                       (dict(channels=(8.9, 24, 32, 48.5)), "channels"), (dict(channels="8888"), "channels"),
                       (dict(channels=(True, 4, 4, 4)), "channels"), (dict(core_radius=True), "core_radius")):
        with pytest.raises(ValueError, match=f"UnderstandingConfig.{field} must"):
            U.UnderstandingConfig(**bad)
    config = U.UnderstandingConfig(shapes=["square"], channels=(np.int64(4), 4, 4, 4))
    assert config.shapes == ("square",) and config.channels == (4, 4, 4, 4) and type(config.channels[0]) is int
    assert U.UnderstandingConfig.from_dict(config.to_dict()) == config


@needs_weights
def test_shipped_understanding_model_still_loads_its_config():
    model = U.ShapesUnderstanding.from_pretrained()
    assert model.config.shapes == ("circle", "square", "triangle", "diamond")
    assert model.config.channels == (8, 24, 32, 48)


class _Gated(torch.nn.Module):
    """Records its BatchNorm's mode in each pass; a pass named in ``gates`` waits there (to interleave threads)."""

    def __init__(self):
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(1)
        self.modes = {}
        self.gates = {}

    def forward(self, x, name):
        before, after = self.gates.get(name, (None, None))
        if before is not None:
            before()
        if after is not None:
            after()
        self.modes[name] = self.bn.training
        return self.bn(x)


def test_eval_pass_is_thread_safe_on_a_model_in_training_mode():
    """Scoring from threads with a model in training mode: a pass that began while another had put the model in
    eval mode found nothing to toggle, ran on, and had training mode set back under it (BatchNorm statistics
    moved by scoring)."""
    import threading

    model = _Gated().train()
    a_inside, release_a, a_done, b_inside = (threading.Event() for _ in range(4))
    model.gates["a"] = (a_inside.set, lambda: release_a.wait(10))
    model.gates["b"] = (b_inside.set, lambda: a_done.wait(10))
    x = torch.randn(4, 1)

    def run_a():
        U._eval_pass(model, x, "a")
        a_done.set()

    first = threading.Thread(target=run_a)
    first.start()
    assert a_inside.wait(10)
    second = threading.Thread(target=U._eval_pass, args=(model, x, "b"))
    second.start()
    b_inside.wait(0.5)  # before the fix "b" ran now, beside "a"; now it waits for "a"
    release_a.set()
    first.join(10)
    second.join(10)
    assert model.modes == {"a": False, "b": False}
    assert model.training and model.bn.training
    assert model.bn.num_batches_tracked.item() == 0 and model.bn.running_mean.abs().sum() == 0


def test_eval_passes_of_a_model_in_eval_mode_still_run_side_by_side():
    import threading

    model = _Gated().eval()
    both = threading.Barrier(2, timeout=10)  # broken (an error) if one pass waited for the other
    model.gates["a"] = model.gates["b"] = (both.wait, None)
    threads = [threading.Thread(target=U._eval_pass, args=(model, torch.randn(4, 1), n)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert model.modes == {"a": False, "b": False} and not both.broken


def test_clip_from_pretrained_checks_its_texts_before_loading_weights(tiny_clip, word_tokenizer, tmp_path,
                                                                      monkeypatch):
    """threshold was checked before the weights loaded, noun_template, color_template and background after."""
    from xlard import color_features

    tiny_clip.save_pretrained(tmp_path)
    word_tokenizer.save_pretrained(tmp_path)

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the settings were checked")

    monkeypatch.setattr(color_features.ClipColorEncoder, "from_pretrained", no_loading)
    for option, words in ((dict(noun_template="a {x}"), "noun_template must contain"),
                          (dict(color_template="no braces"), "ClipSource: color_template must contain"),
                          (dict(background=" "), "background must be a non-empty text")):
        with pytest.raises(ValueError, match=words):
            get_source("clip", model=str(tmp_path), **option)


def test_score_names_a_custom_source_that_returns_the_wrong_thing():
    """A RewardSource returning a list, or setting 'source', failed as a raw TypeError holding the rewards' whole
    repr; a name that is not a str gave a result whose source was None."""
    decoded = decoded_of([SCENE], ["a photo of two circles"])
    maps = torch.zeros(1, 1, 8, 8)

    class Listing(RewardSource):
        name = "mine"

        def __call__(self, decoded):
            return [decoded.specs, maps]

    class SetsSource(RewardSource):
        name = "mine"

        def __call__(self, decoded):
            return {"specs": decoded.specs, "entity_maps": maps, "source": "mine"}

    class Nameless(SetsSource):
        name = None

    with pytest.raises(ValueError, match=r"score: Listing.__call__ must return a mapping of ExplainableRewards "
                                         r"keyword arguments .* got list"):
        score(decoded, Listing())
    with pytest.raises(ValueError, match=r"score: SetsSource.__call__ returned keys \['source'\], not "
                                         r"ExplainableRewards inputs"):
        score(decoded, SetsSource())
    with pytest.raises(ValueError, match=r"score: Nameless.name must be a non-empty str .* got None"):
        score(decoded, Nameless())


def test_get_source_clip_checks_the_model_before_the_tokenizer(tiny_clip):
    with pytest.raises(ValueError, match=r"get_source\('clip'\): model must be a CLIP checkpoint id, a local folder, "
                                         r"or a loaded CLIPModel or SiglipModel, got int"):
        get_source("clip", model=3)
    with pytest.raises(ValueError, match="needs tokenizer="):
        get_source("clip", model=tiny_clip)
    with pytest.raises(ValueError, match=r"tokenizer must be the loaded model's tokenizer .* got str 'openai/clip'; "
                                         r"a checkpoint id goes in model="):
        get_source("clip", model=tiny_clip, tokenizer="openai/clip")


def test_clip_source_embeddings_do_not_depend_on_what_it_embedded_before(tiny_clip, word_tokenizer):
    """Texts embedded in one batch differ at 1e-7 from each embedded alone: a source that had scored other prompts
    gave other maps for the same input than a fresh one."""
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)

    def decoded(prompts):
        return Decoded(images=images, latents=torch.zeros(0), token_maps=None, patch_features=None,
                       specs=tuple(parse(p) for p in prompts), segment_offsets={})

    used = ClipSource(tiny_clip, word_tokenizer)
    score(decoded(["a photo of two red circles", "a photo of a blue square left of a green dog"]), used)
    fresh = ClipSource(tiny_clip, word_tokenizer)
    later = decoded(["a photo of a cat left of a dog", "a photo of two circles"])
    assert torch.equal(used(later)["entity_maps"], fresh(later)["entity_maps"])
    alone = ClipSource(tiny_clip, word_tokenizer).embed_texts(["a photo of a dog."])
    assert torch.equal(used.embed_texts(["a photo of a dog."]), alone)
    colors = ClipSource(tiny_clip, word_tokenizer).encoder
    colors.embed_colors(["red", "blue", "green"])
    assert torch.equal(colors.embed_colors(["green"]), ClipSource(tiny_clip, word_tokenizer).encoder.embed_colors(
        ["green"]))


def test_images_that_require_grad_are_checked_without_a_warning():
    """float(x.amin()) of a tensor in a graph warned ("Converting a tensor with requires_grad=True to a scalar")."""
    import warnings

    from xlard import sources as source_module

    images = decoded_of([SCENE], ["a photo of a circle"]).images.clone().requires_grad_()
    decoded = Decoded(images=images, latents=torch.zeros(0), token_maps=None, patch_features=None,
                      specs=(parse("a photo of a circle"),), segment_offsets={})
    always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch warns once a process: the test must not depend on what ran before it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            source_module._decoded_parts(decoded, "shapes source")
            ShapesSource(OracleUnderstanding([SCENE])).drop_mixed_objects(torch.rand(1, 1, 64, 64),
                                                                          torch.rand(1, 11, 64, 64), images)
    finally:
        torch.set_warn_always(always)


def test_an_eval_pass_inside_a_pass_of_the_same_thread_goes_through():
    """A forward hook predicting again with the model (left in training mode) waited for the lock its own thread
    held: the pass hung for good."""
    import threading

    from xlard.shapes.understanding import ShapesUnderstanding, UnderstandingConfig

    model = ShapesUnderstanding(UnderstandingConfig(channels=(4, 4, 4, 4), image_size=32))
    model.train()
    x = torch.rand(2, 3, 32, 32)
    inner, started = [], []

    def hook(module, inputs, output):
        if not started:
            started.append(True)
            inner.append(model.predict(x))

    model.shape_head.register_forward_hook(hook)
    worker = threading.Thread(target=lambda: model.predict(x), daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive() and len(inner) == 1
    assert all(module.training for module in model.modules())  # every mode back
