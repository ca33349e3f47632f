"""Tests of xlard.backbones on a tiny random Stable Diffusion pipeline built offline.

The pipeline (tests/tiny_pipelines.py) is saved with ``save_pretrained`` and
loaded back through ``DiffusersBackbone.from_pretrained``, as a user loads a
real model. Checked: z0 is the pipeline's latent at ``correction_step``; with
a zero-initialized corrector the images equal the plain pipeline's for the
same seed (bit for bit, also for stochastic and multistep schedulers, which
need the generator and scheduler snapshots); z0 -> corrector -> decode ->
explainable rewards end to end; determinism; argument errors.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import tiny_pipelines  # noqa: E402

from xlard.backbones import (Backbone, BackboneState, DiffusersBackbone, correction_index,  # noqa: E402
                             make_generators)
from xlard.backbones.diffusers_backbone import diffusers_dtype_kwargs  # noqa: E402
from xlard.models import ResidualCorrector  # noqa: E402
from xlard.prompts import parse  # noqa: E402

PROMPTS = ["a photo of two red cats", "a blue dog left of a green car"]
STEPS = 2
GUIDANCE = 5.0


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    return tiny_pipelines.tiny_sd_pipeline(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def backbone(sd_path):
    return DiffusersBackbone.from_pretrained(sd_path, correction_step=1.0, num_inference_steps=STEPS,
                                             guidance_scale=GUIDANCE)


def _with(backbone, **changes):
    """Another backbone over the same loaded pipeline (cheap)."""
    settings = dict(correction_step=backbone.correction_step, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    settings.update(changes)
    return DiffusersBackbone(backbone.pipeline, **settings)


def _pipeline_images(pipe, backbone, prompts, seed, **extra):
    kwargs = dict(backbone.pipeline_call_kwargs(prompts), **extra)
    return pipe(prompts, generator=torch.Generator().manual_seed(seed), **kwargs).images


def _nonzero_corrector(backbone, seed=0):
    torch.manual_seed(seed)
    corrector = ResidualCorrector(backbone.corrector_config("tiny")).eval()
    with torch.no_grad():
        torch.nn.init.normal_(corrector.head.weight, std=0.5)
    return corrector


# ---------------------------------------------------------------------------
# Loading and the state
# ---------------------------------------------------------------------------


def test_decode_continues_with_the_guidance_the_state_was_encoded_with(backbone):
    """A state holds its guidance ("used, and to be used"); decoding it with a backbone set to another
    guidance mixed that backbone's scale into the state's conditioning: other images, no error."""
    half = DiffusersBackbone(backbone.pipeline, correction_step=0.5, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    state = half.encode(PROMPTS, seed=3)
    assert state.guidance_scale == GUIDANCE
    other = _with(half, correction_step=0.5, guidance_scale=2.0)
    torch.testing.assert_close(other.decode(state).images, half.decode(state).images, rtol=0, atol=0)
    assert not torch.equal(other.generate(PROMPTS, seed=3).images, half.generate(PROMPTS, seed=3).images)


def test_from_pretrained_sizes(backbone):
    assert isinstance(backbone, Backbone)
    assert type(backbone.pipeline).__name__ == "StableDiffusionPipeline"
    assert (backbone.latent_channels, backbone.text_dim, backbone.pooled_dim) == (4, tiny_pipelines.TEXT_DIM,
                                                                                  tiny_pipelines.TEXT_DIM)
    assert (backbone.height, backbone.width) == (32, 32)
    assert backbone.do_classifier_free_guidance
    config = backbone.corrector_config("tiny")
    assert (config.latent_channels, config.text_dim, config.pooled_dim) == (4, 32, 32)
    assert "StableDiffusionPipeline" in repr(backbone)
    # Family defaults when not given.
    default = DiffusersBackbone(backbone.pipeline)
    assert (default.num_inference_steps, default.guidance_scale, default.correction_step) == (50, 7.5, 1.0)


@pytest.mark.parametrize("correction_step, k", [(1.0, 2), (0.5, 1), (0.01, 1)])
def test_encode_state_is_the_pipeline_latent_at_the_correction_step(backbone, correction_step, k):
    bb = _with(backbone, correction_step=correction_step, capture=False)
    state = bb.encode(PROMPTS[:1], seed=3)
    assert isinstance(state, BackboneState)
    assert (state.step_index, state.num_steps, state.remaining_steps) == (k, STEPS, STEPS - k)
    assert state.z0.shape == (1, 4, 16, 16)
    seen = {}

    def keep(pipe, i, t, kwargs):
        if i == k - 1:
            seen["latents"] = kwargs["latents"].clone()
        return kwargs

    _pipeline_images(bb.pipeline, bb, PROMPTS[:1], 3, callback_on_step_end=keep, output_type="latent")
    torch.testing.assert_close(state.z0, seen["latents"], rtol=0, atol=0)


def test_prompt_embedding_and_specs(backbone):
    state = backbone.encode(PROMPTS, seed=0)
    emb = state.prompt_embedding
    assert emb.tokens.shape == (2, 77, 32) and emb.pooled.shape == (2, 32) and emb.mask.shape == (2, 77)
    assert emb.mask.dtype == torch.bool
    tok = backbone.pipeline.tokenizer
    for i, prompt in enumerate(PROMPTS):
        ids = tok(prompt)["input_ids"]
        assert int(emb.mask[i].sum()) == len(ids)
        assert emb.token_ids[i, : len(ids)].tolist() == ids
        # Pooled = CLIP's pooled output: the final hidden state at the end-of-text token.
        out = backbone.pipeline.text_encoder(emb.token_ids[i : i + 1])
        torch.testing.assert_close(emb.pooled[i], out.pooler_output[0])
        torch.testing.assert_close(emb.tokens[i], out.last_hidden_state[0])
    assert state.segment_offsets == {"tokenizer": 0}
    spec = state.specs[1]
    assert spec.nouns == ("dog", "car") and spec.relation_rows() == ((0, 1, 0),)
    for entity in spec.entities:
        words = tok.decode([int(emb.token_ids[1, j]) for j in entity.token_indices]).replace(" ", "")
        assert words == entity.noun
    assert set(emb.as_corrector_inputs()) == {"text_tokens", "pooled", "text_mask"}


def test_prompt_specs_are_accepted_and_aligned(backbone):
    spec = parse("a photo of three yellow birds")
    assert not spec.alignments
    state = backbone.encode([spec], seed=0)
    assert state.specs[0].encoders == ("tokenizer",) and state.specs[0].entities[0].token_indices
    assert state.prompts == ("a photo of three yellow birds",)


def test_a_spec_aligned_by_another_backbones_tokenizer_is_aligned_again(backbone):
    """A spec aligned by another backbone whose tokenizer has the same name ("tokenizer") kept that tokenizer's
    indices: the rewards read other tokens' maps. Now specs with word spans are aligned to this backbone."""
    import dataclasses

    from xlard.prompts import TokenAlignment

    prompt = "a photo of a diamond left of a yellow triangle"
    want = backbone.parse(prompt)
    other = TokenAlignment("tokenizer", 12, ((5,), (10,)), ((), (9,)))  # another vocabulary's positions
    stale = dataclasses.replace(want, alignments=(other,), entities=tuple(
        dataclasses.replace(e, token_indices=other.noun_tokens[i], color_token_indices=other.color_tokens[i])
        for i, e in enumerate(want.entities)))
    assert stale.entities[0].token_indices != want.entities[0].token_indices
    got = backbone.encode([stale], seed=0).specs[0]
    assert got.alignments == want.alignments
    assert [e.token_indices for e in got.entities] == [e.token_indices for e in want.entities]


# ---------------------------------------------------------------------------
# Correction: parity with the plain pipeline, end to end with rewards
# ---------------------------------------------------------------------------


def test_a_misspelt_loading_option_is_named_not_ignored(sd_path):
    """DiffusionPipeline.from_pretrained ignores keyword arguments it does not know, with a warning that
    the log level hides: `heigth=32` loaded the default height."""
    import logging

    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    level, filters = logger.level, list(logger.filters)
    with pytest.raises(ValueError, match=r"keyword arguments \{'heigth': 32\} are not expected by "
                                         r"StableDiffusionPipeline; check their spelling"):
        DiffusersBackbone.from_pretrained(sd_path, num_inference_steps=STEPS, heigth=32)
    assert logger.level == level and logger.filters == filters  # the logger is left as it was
    assert DiffusersBackbone.from_pretrained(sd_path, num_inference_steps=STEPS, height=32).height == 32

def test_pipeline_call_kwargs_with_a_negative_prompt_and_a_list_of_prompts(backbone):
    """The negative prompt went to the pipeline as a string beside a list of prompts, which Stable Diffusion
    refuses (TypeError); with the prompts given it is a list of their length, and the images are the
    backbone's."""
    bb = _with(backbone, negative_prompt="a photo of a dog")
    reference = _pipeline_images(bb.pipeline, bb, PROMPTS, 5)
    assert reference.shape[0] == len(PROMPTS)
    torch.testing.assert_close(bb.generate(PROMPTS, seed=5).images, reference, rtol=0, atol=0)
    assert bb.pipeline_call_kwargs("a photo of a cat")["negative_prompt"] == "a photo of a dog"
    assert bb.pipeline_call_kwargs()["negative_prompt"] == "a photo of a dog"

@pytest.mark.parametrize("correction_step", [1.0, 0.5])
def test_zero_corrector_equals_pipeline_then_corrected_end_to_end(backbone, correction_step):
    from xlard.color_features import PixelColorEncoder
    from xlard.rewards import ExplainableRewards

    bb = _with(backbone, correction_step=correction_step, color_encoder=PixelColorEncoder())
    reference = _pipeline_images(bb.pipeline, bb, PROMPTS, 7)

    corrector = ResidualCorrector(bb.corrector_config("tiny")).eval()
    plain = bb.generate(PROMPTS, seed=7, corrector=corrector)
    assert torch.equal(plain.zc, plain.state.z0)
    assert torch.count_nonzero(plain.lam) == 0
    torch.testing.assert_close(plain.images, reference, rtol=0, atol=0)

    decoded = plain.decoded
    assert decoded.images.dtype == torch.float32 and decoded.images.shape == (2, 3, 32, 32)
    assert decoded.latents.shape == (2, 4, 16, 16)
    maps = decoded.token_maps
    assert maps.shape[:2] == (2, 77) and maps.shape[-2:] == (16, 16)
    assert torch.isfinite(maps).all() and (maps >= 0).all()
    # Each image query's attention over the 77 tokens sums to one, averaged over layers and steps.
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 16, 16), rtol=1e-4, atol=1e-4)
    assert decoded.patch_features.features.shape[0] == 2

    corrected = bb.generate(PROMPTS, seed=7, corrector=_nonzero_corrector(bb), alpha=0.5)
    assert not torch.equal(corrected.zc, corrected.state.z0)
    assert corrected.lam.shape == (2, 16, 16) and (corrected.lam > 0).any()
    assert not torch.equal(corrected.images, reference)
    assert corrected.images.min() >= 0 and corrected.images.max() <= 1

    result = ExplainableRewards(color_encoder=PixelColorEncoder())(**corrected.decoded.reward_inputs())
    assert result.scores.shape == (2, 3)
    assert result.present.tolist() == [[True, True, False], [True, True, True]]
    present = result.scores[result.present]
    assert torch.isfinite(present).all() and (present >= 0).all() and (present <= 1).all()
    text = result.text()
    for noun in ("cats", "dog", "car"):
        assert noun in text
    assert "left of" in result.explanations[1].text()


@pytest.mark.parametrize("scheduler", ["euler_ancestral", "dpm"])
def test_resume_restores_stochastic_and_multistep_schedulers(backbone, scheduler):
    # Euler ancestral draws noise in every step (generator state) and rescales the initial noise
    # after set_timesteps; DPM-Solver keeps past outputs.
    from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    cls = {"euler_ancestral": EulerAncestralDiscreteScheduler, "dpm": DPMSolverMultistepScheduler}[scheduler]
    components = dict(backbone.pipeline.components, scheduler=cls.from_config(backbone.pipeline.scheduler.config))
    pipe = type(backbone.pipeline)(**components)
    pipe.set_progress_bar_config(disable=True)
    bb = DiffusersBackbone(pipe, correction_step=0.5, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                           capture=False)
    out = bb.generate(PROMPTS[:1], seed=11)
    reference = _pipeline_images(pipe, bb, PROMPTS[:1], 11)
    torch.testing.assert_close(out.images, reference, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Determinism and capture settings
# ---------------------------------------------------------------------------


def test_determinism_and_per_prompt_seeds(backbone):
    bb = _with(backbone, correction_step=0.5, capture=False)
    first, second = bb.encode(PROMPTS, seed=5), bb.encode(PROMPTS, seed=5)
    assert torch.equal(first.z0, second.z0)
    a, b = bb.decode(first), bb.decode(first)  # decoding does not consume the state
    assert torch.equal(a.images, b.images) and a.token_maps is None
    assert torch.equal(a.images, bb.decode(second).images)
    assert not torch.equal(bb.encode(PROMPTS, seed=6).z0, first.z0)
    # One seed per prompt: a prompt's latent does not depend on the rest of the batch (up to the
    # last bits: the arithmetic of a batch of 2 and of 1 may differ).
    batch = bb.encode(PROMPTS, seed=[21, 22])
    alone = bb.encode(PROMPTS[1], seed=[22])
    torch.testing.assert_close(batch.z0[1:], alone.z0, rtol=1e-4, atol=1e-4)
    # A caller's generator is used as given.
    assert torch.equal(bb.encode(PROMPTS, seed=torch.Generator().manual_seed(5)).z0, first.z0)


def test_capture_encode_and_readout(backbone):
    bb = _with(backbone, correction_step=1.0, capture_encode=True)
    state = bb.encode(PROMPTS[:1], seed=0)
    assert state.encode_maps.shape == (1, 77, 16, 16)
    decoded = bb.decode(state)  # no step left: one readout pass gives the maps
    assert decoded.token_maps.shape == (1, 77, 16, 16)
    assert not torch.equal(decoded.token_maps, state.encode_maps)


def test_pluggable_capture_factory(backbone):
    calls = []

    class Recorder:
        def __init__(self, denoiser, *, num_steps, cfg):
            calls.append((type(denoiser).__name__, num_steps, cfg))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def maps(self):
            return torch.zeros(1, 3, 4, 4)

    bb = _with(backbone, correction_step=0.5, capture=Recorder)
    decoded = bb.decode(bb.encode(PROMPTS[:1], seed=0))
    assert calls == [("UNet2DConditionModel", 1, True)]
    assert decoded.token_maps.shape == (1, 3, 4, 4)


def test_correction_index():
    assert [correction_index(s, 4) for s in (1e-6, 0.25, 0.3, 0.5, 0.99, 1.0)] == [1, 1, 2, 2, 4, 4]
    assert correction_index(0.3, 10) == 3
    with pytest.raises(ValueError, match="correction_step"):
        correction_index(0.0, 4)
    with pytest.raises(ValueError, match="num_steps"):
        correction_index(0.5, 0)


# ---------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(correction_step=0.0), "correction_step"),
    (dict(correction_step=1.5), "correction_step"),
    (dict(correction_step=math.nan), "correction_step"),
    (dict(correction_step="0.5"), "correction_step"),
    (dict(correction_step=True), "correction_step"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=2.5), "num_inference_steps"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(guidance_scale=math.inf), "guidance_scale"),
    (dict(guidance_scale=1e308), r"guidance_scale must be a finite number in \[0, 1000\]"),  # was NaN latents
    (dict(height=31), "height"),
    (dict(width=0), "width"),
    (dict(negative_prompt=3), "negative_prompt"),
    (dict(max_sequence_length=64), "max_sequence_length"),
    (dict(capture="yes"), "capture"),
    (dict(capture_encode=1), "capture_encode"),
    (dict(capture=False, capture_encode=True), "capture_encode"),
    (dict(color_encoder=object()), "color_encoder"),
    (dict(guidance_scale=10**400), "guidance_scale"),  # was a raw OverflowError
    (dict(correction_step=10**400), "correction_step"),
    (dict(correction_step=-10**400), "correction_step"),
    (dict(num_inference_steps=10**12), r"num_inference_steps must be an integer >= 1 and <= 10000"),
    (dict(height=2**20), "height"),
    (dict(width=2**20), "width"),
])
def test_bad_constructor_arguments(backbone, kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusersBackbone(backbone.pipeline, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(correction_step=2.0), "correction_step"),
    (dict(torch_dtype="fp16"), "torch_dtype"),
    (dict(device="not-a-device"), "device"),
    (dict(num_inference_steps=-3), "num_inference_steps"),
    (dict(torch_dtype=torch.int64), "torch_dtype must be a floating"),
    (dict(torch_dtype=torch.bool), "torch_dtype must be a floating"),
    (dict(device="xpu"), "device: xpu asked, but xpu is not available"),
    (dict(guidance_scale=10**400), "guidance_scale"),
])
def test_bad_from_pretrained_arguments_fail_before_loading(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiffusersBackbone.from_pretrained(tmp_path / "does-not-exist", **kwargs)
    with pytest.raises(ValueError, match="model_id_or_path"):
        DiffusersBackbone.from_pretrained("")


def test_from_pretrained_dtype_loads_without_a_deprecation_warning(sd_path):
    """torch_dtype= of our API reaches diffusers under the keyword the installed release takes (``dtype``
    since it deprecated ``torch_dtype``), so loading prints no FutureWarning into a user's output."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*torch_dtype.*", category=FutureWarning)
        loaded = DiffusersBackbone.from_pretrained(sd_path, torch_dtype=torch.float16, num_inference_steps=STEPS)
    assert loaded.dtype == torch.float16


def test_a_pipeline_stored_in_float16_loads_in_one_dtype(sd_path, tmp_path):
    """A pipeline saved in float16 (as the shipped shapes backbone is) loaded without torch_dtype: diffusers made
    the UNet float32, transformers kept the text encoder float16, and generate failed in the first step with
    "mat1 and mat2 must have the same dtype". The default is float32 for every component now; a pipeline
    handed over with such a mix is refused by name."""
    from diffusers import DiffusionPipeline

    half = tmp_path / "half"
    DiffusionPipeline.from_pretrained(sd_path, **diffusers_dtype_kwargs(torch.float16)).save_pretrained(half)
    loaded = DiffusersBackbone.from_pretrained(half, num_inference_steps=STEPS)
    assert loaded.dtype == torch.float32 and loaded.pipeline.text_encoder.dtype == torch.float32
    assert loaded.generate(["a photo of a cat"], seed=0).decoded.images.shape[0] == 1
    mixed = DiffusionPipeline.from_pretrained(half, **diffusers_dtype_kwargs(torch.float32))
    mixed.text_encoder.to(torch.float16)
    with pytest.raises(ValueError, match=r"pipeline.text_encoder is torch.float16 but its denoiser is "
                                         r"torch.float32: load the pipeline with one dtype"):
        DiffusersBackbone(mixed, num_inference_steps=STEPS)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux", "pixart"])
def test_every_family_loads_and_generates_in_bfloat16(tmp_path, family):
    """What `--dtype bfloat16` asks for. diffusers 0.42 left an SD3 transformer in float32 beside bfloat16 text
    encoders (the dtype check refused the pipeline); the denoiser is cast now."""
    build, options = tiny_pipelines.FAMILIES[family]
    loaded = DiffusersBackbone.from_pretrained(build(tmp_path / family), num_inference_steps=2,
                                               torch_dtype=torch.bfloat16, **options)
    assert loaded.dtype == torch.bfloat16
    out = loaded.generate(["a photo of two cats"], seed=0)
    assert out.state.z0.dtype == torch.bfloat16 and bool(torch.isfinite(out.decoded.images).all())


def test_from_pretrained_names_a_missing_or_wrong_folder_before_loading(tmp_path):
    """A path that is not a pipeline folder is named as a path (was: huggingface_hub's "repo id must use
    alphanumeric chars" for ./x, or diffusers' "neither a valid local path nor a valid repo id")."""
    for missing in (str(tmp_path / "no" / "pipe"), "./no/such/pipe", "~/no-such-xlard-pipe"):
        with pytest.raises(FileNotFoundError, match="model_id_or_path: no folder at .*check the path"):
            DiffusersBackbone.from_pretrained(missing)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        DiffusersBackbone.from_pretrained(tmp_path / "file")
    with pytest.raises(FileNotFoundError, match="has no model_index.json"):
        DiffusersBackbone.from_pretrained(tmp_path)


def test_unsupported_pipeline_and_second_order_scheduler(backbone):
    with pytest.raises(ValueError, match="not supported.*StableDiffusionPipeline"):
        DiffusersBackbone(object())
    from diffusers import HeunDiscreteScheduler

    pipe = backbone.pipeline
    original = pipe.scheduler
    try:
        pipe.scheduler = HeunDiscreteScheduler.from_config(original.config)
        with pytest.raises(ValueError, match="order 2"):
            DiffusersBackbone(pipe, correction_step=0.5)
        DiffusersBackbone(pipe, correction_step=1.0)  # no split inside a step: fine
    finally:
        pipe.scheduler = original


def test_bad_encode_decode_generate_arguments(backbone):
    bb = _with(backbone, capture=False, num_inference_steps=1)
    for prompts, match in (([], "empty"), ([""], "empty"), ([3], "prompts\\[0\\]"), (None, "prompts")):
        with pytest.raises(ValueError, match=match):
            bb.encode(prompts, seed=0)
    for seed in (-1, [1], "x", 1.5, [1, -2], 2**64, [0, 2**70]):  # 2**64: was torch's "Overflow when unpacking"
        with pytest.raises(ValueError, match="seed(: got 1 seeds| must be an int)"):
            bb.encode(PROMPTS, seed=seed)
    assert len(make_generators([0, 2**64 - 1], 2)) == 2
    with pytest.raises(ValueError, match="prompt 'a red'.*PromptSpec"):
        bb.encode(["a red"], seed=0)  # a color without an object noun cannot be parsed
    state = bb.encode(PROMPTS, seed=0)
    with pytest.raises(ValueError, match="state"):
        bb.decode("state")
    with pytest.raises(ValueError, match="shape of state.z0"):
        bb.decode(state, state.z0[:1])
    with pytest.raises(ValueError, match="float tensor"):
        bb.decode(state, state.z0.long())
    bad = state.z0.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"z holds 1 NaN or infinite value\(s\)"):
        bb.decode(state, bad)  # else a black image, judged and saved without a word
    import dataclasses

    other = dataclasses.replace(state, z0=torch.zeros(2, 8, *state.z0.shape[2:]))  # as another model's state
    with pytest.raises(ValueError, match="state was encoded by another backbone.*4 channels"):
        bb.decode(other)  # was a conv's "expected input to have 4 channels"
    with pytest.raises(ValueError, match="correct"):
        bb.generate(PROMPTS, seed=0, corrector=object())
    with pytest.raises(ValueError, match="alpha"):
        bb.generate(PROMPTS, seed=0, alpha=0.5)
    with pytest.raises(ValueError, match="seed"):
        make_generators([1, 2, 3], 2)


# ---------------------------------------------------------------------------
# The other families: SDXL (two CLIPs, added conditioning), SD3 (joint attention), FLUX (packed latents),
# PixArt (T5 + mask)
# ---------------------------------------------------------------------------

_FAMILIES = {
    # name: (builder, backbone settings, pipeline class, text length T of the maps, map grid)
    "sdxl": (tiny_pipelines.tiny_sdxl_pipeline, dict(negative_prompt="a photo of a dog"), "StableDiffusionXLPipeline",
             77, 8),
    "sd3": (tiny_pipelines.tiny_sd3_pipeline, dict(max_sequence_length=32), "StableDiffusion3Pipeline", 77 + 32, 16),
    "flux": (tiny_pipelines.tiny_flux_pipeline, dict(max_sequence_length=32, height=32, width=32), "FluxPipeline",
             32, 8),
    "pixart": (tiny_pipelines.tiny_pixart_pipeline, {}, "PixArtAlphaPipeline", 120, 8),
}


@pytest.mark.parametrize("family", sorted(_FAMILIES))
def test_other_families_end_to_end(tmp_path, family):
    from xlard.color_features import PixelColorEncoder
    from xlard.rewards import ExplainableRewards

    build, settings, cls, text_len, grid = _FAMILIES[family]
    bb = DiffusersBackbone.from_pretrained(build(tmp_path / family), correction_step=0.5, num_inference_steps=2,
                                           **settings)
    assert type(bb.pipeline).__name__ == cls
    prompt = [PROMPTS[1]]
    reference = _pipeline_images(bb.pipeline, bb, prompt, 4)
    corrector = ResidualCorrector(bb.corrector_config("tiny")).eval()
    out = bb.generate(prompt, seed=4, corrector=corrector)
    assert out.state.z0.shape == (1, 4, 16, 16)  # FLUX's packed tokens come back spatial
    assert out.state.step_index == 1
    emb = out.state.prompt_embedding
    assert emb.tokens.shape == (1, text_len, bb.text_dim) and emb.pooled.shape == (1, bb.pooled_dim)
    torch.testing.assert_close(out.images, reference, rtol=0, atol=0)
    maps = out.decoded.token_maps
    assert maps.shape == (1, text_len, grid, grid) and torch.isfinite(maps).all()
    # The entities' tokens index the denoiser's text sequence through the segment offsets.
    indices = out.state.specs[0].sequence_token_indices(out.state.segment_offsets)
    assert all(0 < i < text_len for group in indices for i in group)

    corrected = bb.decode(out.state, out.state.z0 + 0.5 * torch.randn_like(out.state.z0))
    assert not torch.equal(corrected.images, reference)
    result = ExplainableRewards(color_encoder=PixelColorEncoder())(**corrected.reward_inputs())
    assert result.present.tolist() == [[True, True, True]]
    assert "left of" in result.explanations[0].text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_this_machine_lacks_is_named_before_loading(tmp_path):
    """device='cuda' on a CPU-only torch gave torch's bare AssertionError "Torch not compiled with CUDA enabled"
    from deep inside the pipeline's .to(); now one ValueError before anything loads, as the CLI's --device."""
    from xlard.backbones import DiffusersBackbone
    from xlard.models import CorrectorConfig, ResidualCorrector

    why = r"asked, but (this torch is built without CUDA|no CUDA device is visible)"
    with pytest.raises(ValueError, match=rf"device: cuda {why}; use device='cpu'"):
        DiffusersBackbone.from_pretrained(str(tmp_path / "never-read"), device="cuda")
    corrector = ResidualCorrector(CorrectorConfig.preset("tiny", latent_channels=4, text_dim=8, pooled_dim=8))
    folder = corrector.save_pretrained(tmp_path / "c")
    with pytest.raises(ValueError, match=rf"ResidualCorrector.from_pretrained: device: cuda:1 {why}"):
        ResidualCorrector.from_pretrained(folder, device="cuda:1")
    from xlard.color_features import ClipColorEncoder
    from xlard.shapes.understanding import ShapesUnderstanding
    from xlard.sources import get_source

    for load, owner in [(lambda: ShapesUnderstanding.from_pretrained(device="cuda"), "ShapesUnderstanding"),
                        (lambda: get_source("shapes", device="cuda"), r"get_source\('shapes'\)"),
                        (lambda: get_source("clip", model="org/model", device="cuda"), r"get_source\('clip'\)"),
                        (lambda: ClipColorEncoder.from_pretrained("org/model", device="cuda"), "ClipColorEncoder")]:
        with pytest.raises(ValueError, match=rf"{owner}.*device: cuda {why}"):
            load()


def test_decode_refuses_a_state_encoded_by_a_backbone_of_another_dtype(sd_path, backbone):
    """A float32 state decoded by a bfloat16 backbone of the same model (or the reverse) failed inside the
    denoiser ("Input type (float) and bias type (c10::BFloat16) should be the same"); refused by name now."""
    bf16 = DiffusersBackbone.from_pretrained(sd_path, correction_step=1.0, num_inference_steps=1,
                                             guidance_scale=GUIDANCE, capture=False, torch_dtype=torch.bfloat16)
    f32 = _with(backbone, capture=False, num_inference_steps=1)
    for encoder, decoder, got, runs in ((f32, bf16, "float32", "bfloat16"), (bf16, f32, "bfloat16", "float32")):
        state = encoder.encode(PROMPTS[:1], seed=0)
        with pytest.raises(ValueError, match=f"state was encoded by a {got} backbone and this backbone runs {runs}"):
            decoder.decode(state)
        assert encoder.decode(state).images.shape[0] == 1  # its own backbone decodes it


def test_decode_refuses_a_latent_that_decodes_to_non_finite_images(backbone):
    """A finite z far off the latents' scale overflowed inside the decode: NaN images, clamped and saved."""
    mid = _with(backbone, correction_step=0.5, num_inference_steps=4)
    state = mid.encode(PROMPTS, seed=[1, 2])
    with pytest.raises(ValueError, match=r"z: decoding gave non-finite images for row\(s\) \[0, 1\]"):
        mid.decode(state, state.z0 * 1e20)
    assert bool(torch.isfinite(mid.decode(state, state.z0 * 10).images).all())


def test_a_capture_window_that_keeps_no_step_is_named_before_the_denoising(backbone):
    from xlard.attention import CaptureConfig

    with pytest.raises(ValueError, match=r"capture: .*keeps none of the one readout pass"):
        _with(backbone, correction_step=1.0, capture=CaptureConfig(steps=(0.5, 1.0)))
    late = _with(backbone, correction_step=0.25, num_inference_steps=4, capture=CaptureConfig(steps=(0.7, 1.0)))
    state = late.encode(PROMPTS[:1], seed=0)
    with pytest.raises(ValueError, match=r"capture: CaptureConfig\(steps=\(0.7, 1.0\)\) keeps none of the 3"):
        late.decode(state)
    ok = _with(backbone, correction_step=0.25, num_inference_steps=4, capture=CaptureConfig(steps=(0.5, 1.0)))
    assert ok.decode(ok.encode(PROMPTS[:1], seed=0)).token_maps is not None
    assert CaptureConfig(step_indices=(-1,)).kept_steps(4) == [3] and CaptureConfig(step_indices=(5,)).kept_steps(4) == []


def test_a_capture_of_some_tokens_is_refused_by_the_backbone(backbone):
    """CaptureConfig(tokens=...) gave token_maps of the kept tokens only, which the rewards read at sequence
    positions: an entity read another token's map, with no error."""
    from xlard.attention import CaptureConfig

    with pytest.raises(ValueError, match=r"capture: CaptureConfig\(tokens=\(1, 2\)\) keeps only some text tokens.*"
                                         r"leave tokens=None"):
        _with(backbone, capture=CaptureConfig(tokens=(1, 2)))
    from xlard.attention import AttentionCapture

    factory = _with(backbone, capture=lambda d, **kw: AttentionCapture(d, CaptureConfig(tokens=(2, 3)), **kw))
    with pytest.raises(ValueError, match=r"capture: CaptureConfig\(tokens=\(2, 3\)\) keeps only some text tokens"):
        factory.decode(factory.encode(PROMPTS[:1], seed=0))  # through a factory too (14 maps for 16 tokens)
    full = _with(backbone, capture=CaptureConfig())
    maps = full.decode(full.encode(PROMPTS[:1], seed=0)).token_maps
    assert maps.shape[1] == backbone.pipeline.tokenizer.model_max_length


@pytest.mark.parametrize("half,what", [("uncond", "the unconditional half"), ("all", "both halves")])
def test_a_capture_of_another_guidance_half_is_refused_by_the_backbone(backbone, half, what):
    """CaptureConfig(guidance_half='uncond') gave the empty prompt's maps as token_maps, read by the rewards as the
    prompts' own; 'all' gave 2B rows for B prompts under guidance (without guidance it records the prompts' rows:
    allowed, as before)."""
    from xlard.attention import AttentionCapture, CaptureConfig

    refused = rf"capture: CaptureConfig\(guidance_half='{half}'\) records {what} of the guided batch.*leave " \
              r"guidance_half='cond'"
    if half == "uncond":  # never the prompts' maps: refused when the backbone is built
        with pytest.raises(ValueError, match=refused):
            _with(backbone, capture=CaptureConfig(guidance_half=half))
        backbones = []
    else:  # refused once the run is known to be guided
        backbones = [_with(backbone, capture=CaptureConfig(guidance_half=half))]
    backbones.append(_with(backbone, capture=lambda d, **kw: AttentionCapture(d, CaptureConfig(guidance_half=half),
                                                                             **kw)))
    for b in backbones:
        with pytest.raises(ValueError, match=refused):
            b.decode(b.encode(PROMPTS[:1], seed=0))
    if half == "all":  # unguided: the prompts' own maps, as 'cond' records them
        plain = _with(backbone, guidance_scale=1.0, capture=CaptureConfig(guidance_half="all"))
        cond = _with(backbone, guidance_scale=1.0, capture=CaptureConfig())
        maps = plain.decode(plain.encode(PROMPTS[:2], seed=0)).token_maps
        assert torch.equal(maps, cond.decode(cond.encode(PROMPTS[:2], seed=0)).token_maps)


def test_a_capture_factory_returning_no_context_manager_is_named(backbone):
    odd = _with(backbone, capture=lambda denoiser, **kw: 5)
    with pytest.raises(TypeError, match="capture: the factory must return a context manager"):
        odd.generate(PROMPTS[:1], seed=0)


@pytest.mark.parametrize("index", ["{}", '{"_class_name": "NoSuchPipeline"}', "[1, 2]", "{not json"])
def test_a_malformed_model_index_is_named(tmp_path, index):
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "model_index.json").write_text(index)
    with pytest.raises(ValueError, match="model_id_or_path: .*model_index.json"):
        DiffusersBackbone.from_pretrained(folder)


def test_a_flux_without_guidance_embedding_takes_no_guidance(tmp_path):
    """FLUX.1-schnell's kind: any --guidance sampled the same images without a word (and went into run records
    and corrector metadata, where it then refused a different, equally meaningless value)."""
    folder = tiny_pipelines.tiny_flux_pipeline(tmp_path / "schnell", guidance_embeds=False)
    settings = dict(max_sequence_length=32, height=32, width=32, num_inference_steps=2)
    bb = DiffusersBackbone.from_pretrained(folder, **settings)
    assert bb.guidance_scale == 0.0 and not bb.family.uses_guidance
    assert DiffusersBackbone(bb.pipeline, guidance_scale=0, **settings).guidance_scale == 0.0
    with pytest.raises(ValueError, match="guidance_scale: this FluxPipeline has no guidance embedding .* got 7.0"):
        DiffusersBackbone(bb.pipeline, guidance_scale=7.0, **settings)
    guided = tiny_pipelines.tiny_flux_pipeline(tmp_path / "dev")
    assert DiffusersBackbone.from_pretrained(guided, **settings).guidance_scale == 3.5  # a guided FLUX keeps it


def test_an_unsupported_pipeline_class_is_refused_before_its_weights_load(tmp_path):
    """An SDXL folder (before SDXL was supported) was loaded whole (gigabytes for a real one) before "not
    supported"; a model_index.json naming an unsupported class is refused at once (here a folder with no weights)."""
    folder = tmp_path / "img2img"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionXLImg2ImgPipeline"}')
    with pytest.raises(ValueError, match=r"pipeline: StableDiffusionXLImg2ImgPipeline \(in .*model_index.json\) is "
                                         r"not supported by DiffusersBackbone; supported pipelines: "
                                         r"StableDiffusionPipeline, StableDiffusionXLPipeline, "):
        DiffusersBackbone.from_pretrained(folder)


def test_a_guidance_distilled_sd_unet_takes_the_scale_as_an_embedding(backbone):
    """LCM's UNet (``time_cond_proj_dim``) gets the guidance scale as ``timestep_cond`` and no CFG batch: the
    images equal the pipeline's, and another scale gives other images."""
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    pipe = backbone.pipeline
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**dict(pipe.unet.config), "time_cond_proj_dim": 16}).eval()
    lcm = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet,
                                  scheduler=LCMScheduler(beta_start=0.00085, beta_end=0.012,
                                                         beta_schedule="scaled_linear"),
                                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    lcm.set_progress_bar_config(disable=True)
    fast = DiffusersBackbone(lcm, capture=False, num_inference_steps=2, guidance_scale=8.0, correction_step=0.5)
    out = fast.generate(PROMPTS, seed=[1, 2])
    reference = lcm(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                    **fast.pipeline_call_kwargs(PROMPTS)).images
    torch.testing.assert_close(out.images, reference, rtol=0, atol=0)
    other = DiffusersBackbone(lcm, capture=False, num_inference_steps=2, guidance_scale=2.0, correction_step=0.5)
    assert not torch.equal(other.generate(PROMPTS, seed=[1, 2]).images, out.images)


def test_sdxl_variants_sample_as_the_pipeline(tmp_path):
    """No guidance (1.0), a non-square size, an ancestral scheduler split at 0.5 and corrected there (against
    the pipeline changing its latent by the same amount at the same step), and LCM-SDXL's guidance embedding
    (CFG off at any scale): each gives the pipeline's images to the bit."""
    from diffusers import EulerAncestralDiscreteScheduler, LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    bb = DiffusersBackbone.from_pretrained(tiny_pipelines.tiny_sdxl_pipeline(tmp_path / "sdxl"), capture=False,
                                           num_inference_steps=3, guidance_scale=1.0, height=48, width=32)
    out = bb.generate(PROMPTS, seed=[1, 2])
    assert out.images.shape == (2, 3, 48, 32)
    kwargs = bb.pipeline_call_kwargs(PROMPTS)
    reference = bb.pipeline(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **kwargs).images
    torch.testing.assert_close(out.images, reference, rtol=0, atol=0)

    pipe = bb.pipeline
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    split = DiffusersBackbone(pipe, capture=False, num_inference_steps=4, correction_step=0.5,
                              negative_prompt="a photo of a dog")
    state = split.encode(PROMPTS, seed=[1, 2])
    delta = 0.3 * torch.randn(state.z0.shape, generator=torch.Generator().manual_seed(0))
    corrected = split.decode(state, state.z0 + delta).images

    def add_delta(_pipe, i, _t, tensors):
        return {"latents": tensors["latents"] + delta} if i == state.step_index - 1 else {}

    reference = pipe(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                     callback_on_step_end=add_delta, **split.pipeline_call_kwargs(PROMPTS)).images
    torch.testing.assert_close(corrected, reference, rtol=0, atol=0)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**dict(pipe.unet.config), "time_cond_proj_dim": 16}).eval()
    lcm = StableDiffusionXLPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                    text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2, unet=unet,
                                    scheduler=LCMScheduler(beta_start=0.00085, beta_end=0.012,
                                                           beta_schedule="scaled_linear"), add_watermarker=False)
    lcm.set_progress_bar_config(disable=True)
    fast = DiffusersBackbone(lcm, capture=False, num_inference_steps=2, guidance_scale=8.0, correction_step=0.5)
    out = fast.generate(PROMPTS, seed=[1, 2])
    reference = lcm(PROMPTS, generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                    **fast.pipeline_call_kwargs(PROMPTS)).images
    torch.testing.assert_close(out.images, reference, rtol=0, atol=0)


def test_sdxl_decodes_a_float16_vae_in_float32_with_its_latent_statistics(tmp_path):
    """SDXL's VAE overflows in float16 (``force_upcast``) and newer VAEs store per-channel ``latents_mean`` /
    ``latents_std``: decode does what the pipeline does with both, to the bit, and leaves the VAE in float16."""
    folder = tiny_pipelines.tiny_sdxl_pipeline(tmp_path / "sdxl", latents_stats=True)
    bb = DiffusersBackbone.from_pretrained(folder, num_inference_steps=2, torch_dtype=torch.float16)
    out = bb.generate(PROMPTS[:1], seed=4)
    assert bb.pipeline.vae.dtype == torch.float16
    assert out.state.prompt_embedding.pooled.shape == (1, bb.pooled_dim) == (1, tiny_pipelines.TEXT_DIM)
    reference = _pipeline_images(bb.pipeline, bb, PROMPTS[:1], 4)
    torch.testing.assert_close(out.images, reference.to(out.images.dtype), rtol=0, atol=0)
    # the statistics matter: the same latent decoded by the scaling factor alone gives other images
    vae = bb.pipeline.vae
    with torch.no_grad():
        plain = vae.float().decode(out.state.z0.float() / vae.config.scaling_factor, return_dict=False)[0]
    vae.half()
    plain = bb.family.postprocess(plain)
    assert float((plain.float() - out.images.float()).abs().max()) > 0.01


def test_a_pipeline_missing_a_component_or_a_tokenizer_is_refused_at_load(sd_path):
    """No VAE failed after all the denoising (and the default size became 128), no tokenizer or text encoder
    inside diffusers; a tokenizer whose files are gone (an empty one without a length limit) inside the
    tokenizer. Each is named when the backbone is made now."""
    for component in ("vae", "tokenizer", "text_encoder"):
        with pytest.raises(ValueError, match=rf"pipeline: StableDiffusionPipeline has no {component}; "
                                             rf"stable-diffusion needs vae, unet, tokenizer, text_encoder"):
            DiffusersBackbone.from_pretrained(sd_path, num_inference_steps=STEPS, **{component: None})
    bb = DiffusersBackbone.from_pretrained(sd_path, num_inference_steps=STEPS)
    tokenizer = bb.pipeline.tokenizer
    limit = tokenizer.model_max_length
    try:
        tokenizer.model_max_length = int(1e30)  # what transformers gives a tokenizer without its files
        with pytest.raises(ValueError, match=r"pipeline.tokenizer has no usable length limit \(model_max_length "
                                             r"10+\d*\): its files are missing or incomplete"):
            DiffusersBackbone(bb.pipeline, num_inference_steps=STEPS)
    finally:
        tokenizer.model_max_length = limit


@pytest.mark.parametrize("family, component, keep", [("sd", "tokenizer", True), ("pixart", "tokenizer", False),
                                                      ("pixart", "tokenizer", True)])
def test_a_tokenizer_folder_without_its_vocabulary_is_refused(tmp_path, sd_path, family, component, keep):
    """An interrupted download (tokenizer_config.json kept, the vocabulary gone) or an empty T5 tokenizer folder
    loaded as a tokenizer of a few special tokens, with a length limit from the config or max_sequence_length:
    every prompt became unknown tokens, and images were made and rewarded on no text without a word."""
    import shutil

    source = Path(sd_path) if family == "sd" else tiny_pipelines.tiny_pixart_pipeline(tmp_path / "pipe")
    folder = tmp_path / "broken"
    shutil.copytree(source, folder)
    kept = (folder / component / "tokenizer_config.json").read_bytes()
    shutil.rmtree(folder / component)
    (folder / component).mkdir()
    if keep:
        (folder / component / "tokenizer_config.json").write_bytes(kept)
    with pytest.raises(ValueError, match=rf"pipeline.{component} knows \d+ tokens \(pipeline.text_encoder reads "
                                         r"\d+\) and reads \d+% of .* as unknown tokens: its files are missing or "
                                         rf"incomplete \(the pipeline folder's {component}/ subfolder\)"):
        DiffusersBackbone.from_pretrained(str(folder), num_inference_steps=STEPS)


def test_pndm_split_after_its_first_step_is_refused(sd_path):
    """PNDM keeps the sample of its first step and uses it in the second: a split there (correction_step <=
    1/(n+1)) dropped the corrected latent without a word; refused now, other splits run."""
    from diffusers import PNDMScheduler

    pipe = DiffusersBackbone.from_pretrained(sd_path, num_inference_steps=4).pipeline
    original = pipe.scheduler
    try:
        pipe.scheduler = PNDMScheduler.from_config(original.config, skip_prk_steps=True)
        with pytest.raises(ValueError, match=r"correction_step=0.2 with 4 steps splits PNDMScheduler after its "
                                             r"first step"):
            DiffusersBackbone(pipe, correction_step=0.2, num_inference_steps=4)
        DiffusersBackbone(pipe, correction_step=0.6, num_inference_steps=4)  # k = 3 of 5
        DiffusersBackbone(pipe, correction_step=1.0, num_inference_steps=4)
        pipe.scheduler = PNDMScheduler.from_config(original.config, skip_prk_steps=False)
        with pytest.raises(ValueError, match=r"PNDMScheduler\(skip_prk_steps=False\): the split would fall inside"):
            DiffusersBackbone(pipe, correction_step=0.6, num_inference_steps=4)
    finally:
        pipe.scheduler = original


def test_flux_reads_a_word_past_clips_77_tokens_through_t5(tmp_path):
    """FLUX's denoiser reads the prompt through T5 (what its maps index); CLIP gives only the pooled vector,
    truncated. A noun past CLIP's 77 tokens was refused ("raise max_length", which CLIP cannot), FluxPipeline not."""
    folder = tiny_pipelines.tiny_flux_pipeline(tmp_path / "flux")
    bb = DiffusersBackbone.from_pretrained(folder, num_inference_steps=1, height=32, width=32, max_sequence_length=128)
    prompt = "a photo of " + "the " * 40 + "two cats"
    assert len(bb.pipeline.tokenizer(prompt)["input_ids"]) > 77
    spec = bb.parse(prompt)
    assert tuple(spec.encoders) == ("tokenizer_2",) and spec.entities[0].count == 2
    tokens = bb.pipeline.tokenizer_2.convert_ids_to_tokens(bb.pipeline.tokenizer_2(prompt)["input_ids"])
    assert "cat" in "".join(tokens[i] for i in spec.alignments[0].noun_tokens[0])
    assert bb.generate([prompt], seed=0).images.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_settings_the_pipeline_refuses_or_ignores_are_refused(tmp_path, family):
    """max_sequence_length above 512 was sampled with (SD3's and FLUX's pipelines refuse it), and FLUX ignored a
    negative prompt without a word (and a trained corrector recorded it)."""
    build, settings, _, _, _ = _FAMILIES[family]
    folder = build(tmp_path / family)
    kwargs = {k: v for k, v in settings.items() if k in ("height", "width")}
    with pytest.raises(ValueError, match=r"max_sequence_length: \w+Pipeline reads at most 512 T5 tokens \(its "
                                         r"pipeline refuses more\), got 513"):
        DiffusersBackbone.from_pretrained(folder, num_inference_steps=1, max_sequence_length=513, **kwargs)
    DiffusersBackbone.from_pretrained(folder, num_inference_steps=1, max_sequence_length=512, **kwargs)
    if family == "flux":
        with pytest.raises(ValueError, match=r"negative_prompt: FluxPipeline samples without classifier-free "
                                             r"guidance .* leave it unset"):
            DiffusersBackbone.from_pretrained(folder, num_inference_steps=1, negative_prompt="blurry", **kwargs)
    else:
        DiffusersBackbone.from_pretrained(folder, num_inference_steps=1, negative_prompt="blurry", **kwargs)


def test_a_folders_own_unknown_keys_are_not_taken_for_the_callers(tmp_path):
    """diffusers warns of keys it ignores, the caller's and model_index.json's alike; all were named as misspelt
    keyword arguments the user had never passed. Now: another pipeline's components are named as the folder's,
    a newer diffusers' setting is ignored (as diffusers does), and a caller's misspelt option is still refused."""
    import shutil

    folder = tiny_pipelines.tiny_sdxl_pipeline(tmp_path / "sdxl")
    relabelled = tmp_path / "relabelled"
    shutil.copytree(folder, relabelled)
    index = json.loads((folder / "model_index.json").read_text())
    (relabelled / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match=r"model_id_or_path: .*relabelled: its model_index.json names components "
                                         r"\['text_encoder_2', 'tokenizer_2'\] that StableDiffusionPipeline \(its "
                                         r"_class_name\) does not take"):
        DiffusersBackbone.from_pretrained(str(relabelled), num_inference_steps=1)
    # a newer diffusers' settings: a flag, an absent optional component ([null, null]), a setting whose value names
    # components: ignored as diffusers ignores them
    for extra in ({"add_new_feature": True}, {"image_encoder_2": [None, None]},
                  {"new_offload_setting": {"text_encoder": "cpu"}}):
        (relabelled / "model_index.json").write_text(json.dumps({**index, **extra}))
        loaded = DiffusersBackbone.from_pretrained(str(relabelled), num_inference_steps=1)
        assert type(loaded.pipeline).__name__ == "StableDiffusionXLPipeline"
    with pytest.raises(ValueError, match=r"keyword arguments \{'safty_checker': None\} are not expected by "
                                         r"StableDiffusionXLPipeline; check their spelling"):
        DiffusersBackbone.from_pretrained(str(folder), num_inference_steps=1, safty_checker=None)


def test_splits_a_scheduler_steps_past_are_refused(sd_path):
    """UniPC's corrector rebuilds each step from the sample before it (about a tenth of the correction survived) and
    DPM-Solver singlestep's second sub-step of a group steps from the group's first sample (none survived): both
    report order 1 and were accepted without a word. Where the corrected latent is what sampling goes on from, the
    split runs."""
    from diffusers import DDIMScheduler, DPMSolverSinglestepScheduler, UniPCMultistepScheduler

    pipe = DiffusersBackbone.from_pretrained(sd_path, num_inference_steps=10).pipeline
    original = pipe.scheduler
    try:
        pipe.scheduler = UniPCMultistepScheduler.from_config(original.config)
        with pytest.raises(ValueError, match=r"correction_step=0.5 < 1 with UniPCMultistepScheduler: its corrector "
                                             r"rebuilds the next step from the sample before the split"):
            DiffusersBackbone(pipe, correction_step=0.5, num_inference_steps=10)
        DiffusersBackbone(pipe, correction_step=1.0, num_inference_steps=10)
        pipe.scheduler = DPMSolverSinglestepScheduler.from_config(original.config, lower_order_final=True)
        for step in (0.5, 0.7):  # k = 5, 7: the second sub-step of an order-2 group
            with pytest.raises(ValueError, match=rf"correction_step={step} with 10 steps splits "
                                                 r"DPMSolverSinglestepScheduler inside an order-2 step.*one of "
                                                 r"\[0.2, 0.4, 0.6, 0.8, 0.9\]"):
                DiffusersBackbone(pipe, correction_step=step, num_inference_steps=10)
        for step in (0.6, 0.9, 1.0):
            DiffusersBackbone(pipe, correction_step=step, num_inference_steps=10)
        # the values a refusal suggests are accepted (rounded up, 2/7 became 0.286: one step later, refused again)
        with pytest.raises(ValueError, match=r"one of \[([\d., ]+)\]") as e:
            DiffusersBackbone(pipe, correction_step=0.3, num_inference_steps=7)
        for step in re.search(r"one of \[([\d., ]+)\]", str(e.value)).group(1).split(", "):
            DiffusersBackbone(pipe, correction_step=float(step), num_inference_steps=7)
        pipe.scheduler = UniPCMultistepScheduler.from_config(original.config)
        DiffusersBackbone(pipe, correction_step=0.95, num_inference_steps=10)  # no step after the split
        pipe.scheduler = UniPCMultistepScheduler.from_config(original.config, disable_corrector=[4])
        DiffusersBackbone(pipe, correction_step=0.5, num_inference_steps=10)  # no corrector on the step after it
        pipe.scheduler = DDIMScheduler.from_config(original.config)
        DiffusersBackbone(pipe, correction_step=0.5, num_inference_steps=10)
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_stochastic_flow_matching_scheduler_follows_the_seed(tmp_path, family):
    """FlowMatchEulerDiscreteScheduler(stochastic_sampling=True) drew its noise from torch's global generator: the
    same seed gave another z0 and one state decoded twice gave two images. The seed's generator reaches it now."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    build, settings, _, _, _ = _FAMILIES[family]
    bb = DiffusersBackbone.from_pretrained(build(tmp_path / family), correction_step=0.5, num_inference_steps=4,
                                           **settings)
    bb.pipeline.scheduler = FlowMatchEulerDiscreteScheduler.from_config(bb.pipeline.scheduler.config,
                                                                        stochastic_sampling=True)
    first = bb.encode(PROMPTS[:1], seed=[3])
    torch.manual_seed(123)  # the global generator must not matter
    second = bb.encode(PROMPTS[:1], seed=[3])
    assert torch.equal(first.z0, second.z0)
    torch.manual_seed(7)
    a = bb.decode(first).images
    torch.manual_seed(8)
    b = bb.decode(first).images
    assert torch.equal(a, b)
    assert not torch.equal(a, bb.decode(bb.encode(PROMPTS[:1], seed=[4])).images)


# ---------------------------------------------------------------------------
# Hub ids read from the local Hugging Face cache (offline), as a real user's models are
# ---------------------------------------------------------------------------


def _cache_model(hub: Path, repo: str, folder: Path, commit: str = "a" * 40) -> Path:
    """Copy a saved model folder into the hub cache layout huggingface_hub reads: models--org--name/refs/main
    naming a commit, snapshots/<commit>/ holding the files."""
    import shutil

    root = hub / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    return snapshot


def test_hub_ids_in_the_cache_are_checked_as_folders_are(sd_path, tmp_path):
    """A cached but damaged or unsupported hub model was reported as "not in the local cache ... download it
    first", and the pipeline folder checks (model_index.json, its components' subfolders) never ran for hub ids:
    diffusers failed naming the snapshot's config.json or a KeyError."""
    import os
    import shutil
    import subprocess
    import sys

    from xlard._args import cached_snapshot

    hub = tmp_path / "hf" / "hub"
    good = _cache_model(hub, "org/tiny-sd", sd_path)
    assert cached_snapshot("org/tiny-sd", "model_index.json", cache_dir=hub) == str(good)
    assert cached_snapshot("org/tiny-sd", "config.json", cache_dir=hub) is None  # no such file at its top
    assert cached_snapshot("org/tiny-sd", None, cache_dir=hub) == str(good)
    assert cached_snapshot("org/absent", None, cache_dir=hub) is None and cached_snapshot("bad id!!", None) is None
    empty = _cache_model(hub, "org/empty-index", sd_path)
    (empty / "model_index.json").write_text("{}")
    shutil.rmtree(_cache_model(hub, "org/no-unet", sd_path) / "unet")
    img2img = _cache_model(hub, "org/img2img", sd_path)
    index = json.loads((img2img / "model_index.json").read_text())
    (img2img / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionImg2ImgPipeline"}))

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)

    def generate(repo: str) -> str:
        out = subprocess.run([sys.executable, "-m", "xlard", "generate", "a red circle", "--backbone", repo,
                              "--steps", "2", "--out", str(tmp_path / repo.replace("/", "_")), "--quiet"],
                             capture_output=True, text=True, env=env, timeout=300)
        return f"{out.returncode}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ''}"

    assert generate("org/tiny-sd").startswith("0:")
    got = generate("org/empty-index")
    assert got.startswith("2:") and 'must be a JSON object with a "_class_name"' in got
    assert "not in the local cache" not in got
    got = generate("org/no-unet")
    assert got.startswith("2:") and "names the component(s) unet" in got and str(hub) in got
    got = generate("org/img2img")  # what the model is: no advice to download it again; every class named
    assert got.startswith("2:") and "StableDiffusionImg2ImgPipeline" in got and "is not supported" in got
    assert "download" not in got and "PixArtSigmaPipeline" in got
    got = generate("org/absent")
    assert got.startswith("2:") and "it is not in the local cache and HF_HUB_OFFLINE is set" in got


def test_a_cached_hub_model_that_is_no_clip_model_is_named_as_such(sd_path, tmp_path):
    """The CLIP source's model given a cached hub id of another kind (a diffusers pipeline, no config.json at its
    top) was told it is "not in the local cache ... download it first"."""
    import os
    import subprocess
    import sys

    _cache_model(tmp_path / "hf" / "hub", "org/tiny-sd", sd_path)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    code = ("from xlard.color_features import check_clip_model\n"
            "for name in ('org/tiny-sd', 'org/absent'):\n"
            "    try:\n        check_clip_model('model', name)\n"
            "    except (OSError, ValueError) as e:\n        print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2, out.stderr[-2000:]
    assert "the hub model 'org/tiny-sd', cached at" in lines[0] and "holds no config.json: it is not a CLIP model, " \
        "or only part of it was downloaded (`hf download org/tiny-sd`)" in lines[0]
    assert "'org/absent' is not a local folder and not a loadable hub model; it is not in the local cache" in lines[1]


def test_a_training_run_fingerprints_a_hub_backbone_by_its_cached_snapshot(sd_path, tmp_path):
    """A run on a hub id recorded no fingerprint of its backbone (only local folders were), so a resume on a newer
    download of the same id mixed two models without a word."""
    from types import SimpleNamespace

    from xlard.train.trainer import Trainer, _model_fingerprint

    hub = tmp_path / "hub"
    snapshot = _cache_model(hub, "org/tiny-sd", sd_path)
    run = SimpleNamespace(
        backbone=SimpleNamespace(pipeline=SimpleNamespace(name_or_path="org/tiny-sd")),
        cfg=SimpleNamespace(backbone=SimpleNamespace(options={"cache_dir": str(hub)}),
                            reward=SimpleNamespace(options={})),
        reward_fn=SimpleNamespace(source_name="attention"),
        corrector=SimpleNamespace(config=SimpleNamespace(count_edit=False, count_move=False)))
    folders = Trainer._model_folders(run)
    assert folders == {"backbone": str(snapshot)}
    before = _model_fingerprint(folders["backbone"])
    assert before == f"hub snapshot org/tiny-sd@{'a' * 40}"
    (snapshot / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"x")  # another variant, later
    assert _model_fingerprint(Trainer._model_folders(run)["backbone"]) == before  # the same model: no refusal
    newer = _cache_model(hub, "org/tiny-sd", sd_path, commit="b" * 40)  # a re-download: main moves to a new commit
    assert Trainer._model_folders(run) == {"backbone": str(newer)}
    assert _model_fingerprint(newer) != before
    assert _model_fingerprint(sd_path) is not None and not _model_fingerprint(sd_path).startswith("hub")


def test_a_folder_that_shadows_a_cached_hub_id_says_so(sd_path, tmp_path, monkeypatch):
    """Run from a folder holding org/tiny-sd/ (no model_index.json), --backbone org/tiny-sd read that folder and
    said only that it is no pipeline folder, though the id is cached."""
    import huggingface_hub.constants

    from xlard._args import model_location

    hub = tmp_path / "hub"
    _cache_model(hub, "org/tiny-sd", sd_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    work = tmp_path / "work"
    (work / "org" / "tiny-sd").mkdir(parents=True)
    monkeypatch.chdir(work)
    with pytest.raises(FileNotFoundError, match=r"a local folder is read before the hub id 'org/tiny-sd'"):
        model_location("--backbone", "org/tiny-sd", "model_index.json", "a diffusers pipeline folder")
    (work / "org" / "other").mkdir()
    with pytest.raises(FileNotFoundError, match=r"so it is not a diffusers pipeline folder$"):  # not cached: as before
        model_location("--backbone", "org/other", "model_index.json", "a diffusers pipeline folder")
