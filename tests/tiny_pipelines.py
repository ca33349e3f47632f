"""Tiny, randomly initialized diffusers pipelines built offline from configs, for tests.

Each builder makes every component from a config (no download), seeds torch
first so the weights are reproducible, saves the pipeline with
``save_pretrained`` into the given folder and returns that folder, so tests
load it back exactly as a user loads a real model
(``DiffusionPipeline.from_pretrained(folder)``).

Tokenizers are trained here with the ``tokenizers`` library on a small corpus
of GenEval-style words: a CLIP-style byte-level BPE (``</w>`` word ends,
wrapped in ``CLIPTokenizer``) and, for the T5-based families, a
SentencePiece-style Unigram (wrapped in ``T5Tokenizer``).

Shared by tests that need a real pipeline: ``tests/test_backbones.py`` (and
any other test module that imports it).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

#: Words the tiny tokenizers are trained on (GenEval-style prompts).
CORPUS_WORDS = (
    "a an the photo of one two three four five six seven eight nine ten and with "
    "red orange yellow green blue purple pink brown black white gray "
    "cat cats dog dogs circle circles square squares triangle triangles apple apples car cars bird birds "
    "teddy bear bears cube cubes ball balls person people "
    "left right above below on top under to side beneath next near"
).split()

_CLIP_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"

#: Width of the tiny text encoders (the corrector's text_dim for these pipelines).
TEXT_DIM = 32


def _corpus() -> list[str]:
    # Repeated phrases give BPE merges for whole words as well as pieces.
    return [" ".join(CORPUS_WORDS)] * 4 + [f"a photo of two {w}" for w in CORPUS_WORDS]


def clip_tokenizer(folder: str | Path | None = None, vocab_size: int = 400):
    """A CLIP-style BPE ``CLIPTokenizer`` (fast) trained offline; 77-token limit."""
    import transformers
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|startoftext|>", "<|endoftext|>"], end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    folder = Path(folder or tempfile.mkdtemp(prefix="xlard_clip_vocab_"))
    folder.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(folder))
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def t5_tokenizer(vocab_size: int = 160, model_max_length: int = 512):
    """A T5-style Unigram ``T5Tokenizer`` (fast) trained offline."""
    import transformers
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    return transformers.T5Tokenizer(vocab=[tuple(v) for v in vocab], extra_ids=0, model_max_length=model_max_length)


def tiny_clip_text_model(tokenizer, *, hidden_size: int = TEXT_DIM, projection: bool = False):
    """A 2-layer CLIP text encoder matching ``tokenizer`` (``CLIPTextModelWithProjection`` if asked)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden_size,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def tiny_vae(latent_channels: int = 4, **extra):
    """A two-level ``AutoencoderKL`` (downsampling x2)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32, **extra,
    ).eval()


def tiny_sd_pipeline(folder: str | Path, *, scheduler: str = "ddim", seed: int = 0, sample_size: int = 16,
                     safety_checker: bool = False) -> Path:
    """Save a tiny random ``StableDiffusionPipeline`` into ``folder`` and return it.

    UNet with two levels (cross-attention at both), 2-layer CLIP text encoder
    of width :data:`TEXT_DIM`, a two-level VAE: a ``2 * sample_size`` image
    from a ``[4, sample_size, sample_size]`` latent. ``scheduler``: "ddim",
    "euler", "euler_ancestral", "dpm" (DPMSolverMultistep) or "ddpm".
    """
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                           EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)

    torch.manual_seed(seed)
    folder = Path(folder)
    tokenizer = clip_tokenizer(folder / "_vocab")
    text_encoder = tiny_clip_text_model(tokenizer)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=4, cross_attention_dim=TEXT_DIM,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()
    vae = tiny_vae()
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    schedulers = {
        "ddim": lambda: DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1, **common),
        "euler": lambda: EulerDiscreteScheduler(**common),
        "euler_ancestral": lambda: EulerAncestralDiscreteScheduler(**common),
        "dpm": lambda: DPMSolverMultistepScheduler(**common),
        "ddpm": lambda: DDPMScheduler(**common),
    }
    if scheduler not in schedulers:
        raise ValueError(f"scheduler must be one of {sorted(schedulers)}, got {scheduler!r}")
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=schedulers[scheduler](),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def tiny_sdxl_pipeline(folder: str | Path, *, seed: int = 0, sample_size: int = 16, force_upcast: bool = True,
                       latents_stats: bool = False) -> Path:
    """Save a tiny random ``StableDiffusionXLPipeline`` into ``folder`` and return it.

    Two CLIP text encoders of width :data:`TEXT_DIM` (the second with a projection), joined into a
    ``2 * TEXT_DIM`` context; a three-level UNet laid out as SDXL's (cross-attention below the full
    resolution only) with its "text_time" added conditioning; the two-level VAE (``latents_stats``: with per-channel ``latents_mean``/``latents_std``).
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    folder = Path(folder)
    tokenizer, tokenizer_2 = clip_tokenizer(folder / "_vocab"), clip_tokenizer(folder / "_vocab_2")
    time_dim = 8
    # SDXL's layout in small: no attention at the full resolution, more transformer layers further down
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 32), norm_num_groups=8, attention_head_dim=(2, 4, 4),
        cross_attention_dim=2 * TEXT_DIM, transformer_layers_per_block=(1, 1, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + TEXT_DIM,
    ).eval()
    extra = {"force_upcast": force_upcast}
    if latents_stats:
        extra.update(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 1.0, 2.0])
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(**extra), text_encoder=tiny_clip_text_model(tokenizer), tokenizer=tokenizer,
        text_encoder_2=tiny_clip_text_model(tokenizer_2, projection=True), tokenizer_2=tokenizer_2, unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         num_train_timesteps=1000, timestep_spacing="leading", steps_offset=1),
        add_watermarker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def tiny_t5_encoder(tokenizer, *, d_model: int = 2 * TEXT_DIM):
    """A 1-layer T5 encoder matching ``tokenizer``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_ff=2 * d_model, d_kv=d_model // 2,
                      num_layers=1, num_heads=2, relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(config).eval()


def tiny_sd3_pipeline(folder: str | Path, *, seed: int = 0, sample_size: int = 16,
                      max_sequence_length: int = 32) -> Path:
    """Save a tiny random ``StableDiffusion3Pipeline`` (two CLIPs of width 32, T5 of width 64)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    folder = Path(folder)
    clip_l = clip_tokenizer(folder / "_vocab")
    clip_g = clip_tokenizer(folder / "_vocab_2")
    t5 = t5_tokenizer(model_max_length=max_sequence_length)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=2 * TEXT_DIM, caption_projection_dim=32,
        pooled_projection_dim=2 * TEXT_DIM, pos_embed_max_size=sample_size * 2,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(shift_factor=0.1),
        text_encoder=tiny_clip_text_model(clip_l, projection=True), tokenizer=clip_l,
        text_encoder_2=tiny_clip_text_model(clip_g, projection=True), tokenizer_2=clip_g,
        text_encoder_3=tiny_t5_encoder(t5), tokenizer_3=t5,
    )
    pipe.save_pretrained(folder)
    return folder


def tiny_flux_pipeline(folder: str | Path, *, seed: int = 0, max_sequence_length: int = 32,
                       guidance_embeds: bool = True) -> Path:
    """Save a tiny random ``FluxPipeline`` (CLIP width 32 pooled, T5 width 64, 1 + 1 blocks; without
    ``guidance_embeds`` as FLUX.1-schnell)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    folder = Path(folder)
    clip = clip_tokenizer(folder / "_vocab")
    t5 = t5_tokenizer(model_max_length=max_sequence_length)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=2 * TEXT_DIM, pooled_projection_dim=TEXT_DIM,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
    ).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(shift_factor=0.1),
        text_encoder=tiny_clip_text_model(clip), tokenizer=clip, text_encoder_2=tiny_t5_encoder(t5), tokenizer_2=t5,
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder


def tiny_pixart_pipeline(folder: str | Path, *, seed: int = 0, sample_size: int = 16) -> Path:
    """Save a tiny random ``PixArtAlphaPipeline`` (T5 width 32, one transformer block, learned sigma)."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    folder = Path(folder)
    t5 = t5_tokenizer(model_max_length=120)
    transformer = PixArtTransformer2DModel(
        sample_size=sample_size, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=TEXT_DIM, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6,
    ).eval()
    pipe = PixArtAlphaPipeline(tokenizer=t5, text_encoder=tiny_t5_encoder(t5, d_model=TEXT_DIM), vae=tiny_vae(),
                               transformer=transformer, scheduler=DDIMScheduler())
    pipe.save_pretrained(folder)
    return folder


#: Each supported family's tiny pipeline builder and the DiffusersBackbone options its size needs.
FAMILIES = {
    "sd": (tiny_sd_pipeline, {}),
    "sdxl": (tiny_sdxl_pipeline, {}),
    "sd3": (tiny_sd3_pipeline, {"max_sequence_length": 32}),
    "flux": (tiny_flux_pipeline, {"max_sequence_length": 32, "height": 32, "width": 32}),
    "pixart": (tiny_pixart_pipeline, {}),
}
