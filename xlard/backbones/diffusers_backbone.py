"""A :class:`~xlard.backbones.base.Backbone` over a diffusers text-to-image pipeline.

:class:`DiffusersBackbone` loads a pipeline exactly as
``diffusers.DiffusionPipeline.from_pretrained`` does (a hub id or a local
folder; real weights for a user, tiny saved pipelines in tests) and splits its
sampling loop at ``correction_step`` (method.md section 2, [xlard default]):

- :meth:`~DiffusersBackbone.encode` encodes the prompt, draws the initial
  noise and runs the first ``k = ceil(correction_step * n)`` of the ``n``
  denoising steps; the latent after them is z0. The scheduler and the random
  generators are snapshotted there.
- :meth:`~DiffusersBackbone.decode` restores those snapshots, runs the
  remaining ``n - k`` steps from the given latent (zc) and VAE-decodes.
  ``correction_step=1.0`` means z0 is the final clean latent and decode is
  the VAE alone.

The loop calls the pipeline's own pieces (``encode_prompt``,
``prepare_latents``, its module's ``retrieve_timesteps``, the scheduler, the
denoiser, the VAE and the image processor) in the order the pipeline's
``__call__`` does, so that with an unchanged latent (a zero-initialized
corrector) the images equal ``pipe(prompts, generator=...)`` for the same seed.

Families (``pipeline.__class__`` or a parent class):

- Stable Diffusion 1.x/2.x (``StableDiffusionPipeline``): UNet
  cross-attention, CLIP text (77 tokens), classifier-free guidance.
- Stable Diffusion XL (``StableDiffusionXLPipeline``): UNet cross-attention
  over both CLIP encoders joined along the width (77 tokens), the second
  one's projected pooled output and the size "time ids" as added
  conditioning (original size = target size = the image's, no crop: the
  pipeline's defaults), a float16 VAE with ``force_upcast`` decoded in float32,
  the pipeline's invisible watermark when it has one (``invisible-watermark``
  installed). One prompt goes to both encoders (no ``prompt_2``). Defaults
  (50 steps, guidance 5) are the base model's: SDXL-Turbo wants
  ``guidance_scale=0`` and 1-4 steps, LCM-SDXL few steps.
- Stable Diffusion 3 (``StableDiffusion3Pipeline``): joint attention, text
  sequence [CLIP-L|CLIP-G (77) ; T5 (``max_sequence_length``)].
- FLUX (``FluxPipeline``): packed latents (unpacked to [B, C, h, w] for the
  corrector), distilled guidance, T5 text sequence, CLIP pooled vector.
- PixArt-alpha/sigma (``PixArtAlphaPipeline``, ``PixArtSigmaPipeline``): T5
  cross-attention with a padding mask; the pooled vector is the masked mean of
  the T5 tokens (PixArt has no pooled embedding).

Attention capture during decoding is pluggable (``capture=``): by default an
:class:`xlard.attention.AttentionCapture` recording every text token of the
denoiser's sequence, averaged over the steps decode runs (a ``CaptureConfig``
step window counts those steps only). When no step remains
(``correction_step=1.0``), one extra denoiser pass on the final latent at the
schedule's last timestep gives the maps (a "readout" pass, [xlard default]);
it changes no latent.

Not supported (clear errors): second-order schedulers (Heun, KDPM2) with
``correction_step < 1`` (a split would fall inside a step), a PNDM split right
after its first step (PNDM reuses that step's sample in the second: the
correction would be dropped) or inside its Runge-Kutta steps, pipelines other
than those above (a local folder's refused from its ``model_index.json``
before any weight loads; a hub id's once loaded),
a pipeline missing a component it runs on (its VAE, a tokenizer or text
encoder; SD3's T5 is optional), SDXL's refiner and image-to-image pipelines.
Not offered (no option for them): FLUX "true CFG", SD3 skip-layer guidance,
``guidance_rescale``, ``denoising_end``, SDXL's ``prompt_2`` and non-default
size/crop conditioning, IP-adapters, PixArt resolution binning (images are
generated at the requested size). A stochastic flow-matching scheduler
(``stochastic_sampling=True``) gets the seed's generator at every step, so a
seed reproduces its images (diffusers' own pipeline draws that noise from
torch's global generator).
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import json
import math
import numbers
import os
import re
from collections.abc import Sequence
from typing import Any

import torch

from xlard._args import as_device, cached_snapshot, is_finite_real, model_location, short_reason
from xlard._optional import require
from xlard.backbones.base import (Backbone, BackboneState, Decoded, PromptEmbedding, Seed, _as_prompt_list,
                                  check_correction_step, correction_index, generator_states, make_generators,
                                  restore_generators)
from xlard.prompts import PromptSpec, align, parse
from xlard.prompts.spec import quote_prompt

__all__ = ["DiffusersBackbone", "SUPPORTED_PIPELINES"]


@contextlib.contextmanager
def _unexpected_load_kwargs():
    """Collect diffusers' "Keyword arguments {...} are not expected by <Pipeline> and will be ignored" while a
    pipeline loads (the list yielded), whatever the log level; it is not printed, and nothing else changes."""
    import logging

    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    before, found = logger.getEffectiveLevel(), []

    def keep(record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "are not expected by" in text:
            found.append(text.replace(" and will be ignored.", "").replace("Keyword arguments", "keyword arguments"))
            return False
        return record.levelno >= before  # what the old level let through, and nothing more

    level = logger.level
    logger.addFilter(keep)
    logger.setLevel(min(before, logging.WARNING))
    try:
        yield found
    finally:
        logger.setLevel(level)
        logger.removeFilter(keep)


def _require_diffusers():
    require("diffusers", "xlard.backbones.DiffusersBackbone")
    require("transformers", "xlard.backbones.DiffusersBackbone")


def _module_function(pipe, name: str):
    """A helper function (``retrieve_timesteps``, ``calculate_shift``) of the pipeline's own module."""
    for cls in type(pipe).__mro__:
        module = inspect.getmodule(cls)
        if module is not None and hasattr(module, name):
            return getattr(module, name)
    raise RuntimeError(f"{type(pipe).__name__}: cannot find diffusers' {name} next to the pipeline class")


# ---------------------------------------------------------------------------
# Families: what differs between pipelines
# ---------------------------------------------------------------------------


class _Family:
    """One pipeline family: text encoding, latent layout, one denoiser call, VAE decoding.

    A new family subclasses this, names its pipeline classes and implements,
    mirroring its pipeline's ``__call__``:

    - ``encode_text(prompts, negative_prompt, guidance_scale, do_cfg) -> (cond, PromptEmbedding)``:
      ``cond`` holds the denoiser's conditioning tensors (CFG-batched when
      ``do_cfg``), the embedding the conditional half only.
    - ``prepare_latents(batch, height, width, dtype, generator) -> (latents, extra)``
      in the denoiser's layout; ``extra`` holds per-run tensors (FLUX image ids).
    - ``predict(scheduler, latents, t, cond, extra, guidance_scale, do_cfg)``:
      one guided model prediction (what ``scheduler.step`` takes).
    - ``vae_decode(latents, generator, cond) -> images [B, 3, H, W] in [0, 1]``.
    - ``text_dim``, ``pooled_dim``, ``tokenizers()``, ``max_lengths()``,
      ``segment_offsets()``; and ``to_spatial``/``from_spatial`` when the
      denoiser's latent is not ``[B, C, h, w]``.
    """

    name = ""
    pipeline_classes: tuple[str, ...] = ()
    default_steps = 50
    default_guidance = 7.5
    #: Whether the pipeline sets the timesteps before drawing the initial noise.
    timesteps_first = True
    #: Text sequence length for families with a T5-style encoder (None: the tokenizer's own).
    default_max_sequence_length: int | None = None
    #: the most T5 tokens the family's pipeline takes (None: no limit of its own)
    longest_sequence: int | None = None
    #: whether a negative prompt changes the sampling (classifier-free guidance)
    takes_negative_prompt: bool = True
    #: The pipeline's components this family cannot run without (checked when the backbone is made).
    required_components: tuple[str, ...] = ("vae", "transformer", "tokenizer", "text_encoder")

    def __init__(self, pipe):
        self.pipe = pipe
        self.max_sequence_length = self.default_max_sequence_length

    # -- sizes -----------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor

    def default_size(self) -> tuple[int, int]:
        size = int(self.pipe.default_sample_size) * self.vae_scale_factor
        return size, size

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    # -- text ------------------------------------------------------------------
    def tokenizers(self) -> dict[str, Any]:
        raise NotImplementedError

    def max_lengths(self) -> dict[str, int]:
        raise NotImplementedError

    def segment_offsets(self) -> dict[str, int]:
        raise NotImplementedError

    def do_cfg(self, guidance_scale: float) -> bool:
        return guidance_scale > 1.0

    @property
    def uses_guidance(self) -> bool:
        """Whether a guidance scale changes this pipeline's samples (False: FLUX without a guidance embedding)."""
        return True

    def _tokenize(self, name: str, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizers()[name]
        enc = tok(prompts, padding="max_length", max_length=self.max_lengths()[name], truncation=True,
                  return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device).bool()

    # -- sampling --------------------------------------------------------------
    def set_timesteps(self, scheduler, num_steps: int, latents: torch.Tensor) -> torch.Tensor:
        retrieve = _module_function(self.pipe, "retrieve_timesteps")
        timesteps, _ = retrieve(scheduler, num_steps, self.device)
        return timesteps

    def step_kwargs(self, generator) -> dict[str, Any]:
        prepare = getattr(self.pipe, "prepare_extra_step_kwargs", None)
        return prepare(generator, 0.0) if prepare is not None else {}

    def scheduler_step(self, scheduler, noise_pred, t, latents, step_kwargs, num_steps):
        return scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]

    def guide(self, noise_pred: torch.Tensor, guidance_scale: float, do_cfg: bool) -> torch.Tensor:
        if not do_cfg:
            return noise_pred
        uncond, cond = noise_pred.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    def to_spatial(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return latents

    def from_spatial(self, z: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return z

    def postprocess(self, image: torch.Tensor, do_denormalize=None) -> torch.Tensor:
        return self.pipe.image_processor.postprocess(image, output_type="pt", do_denormalize=do_denormalize)


class _StableDiffusion(_Family):
    name = "stable-diffusion"
    pipeline_classes = ("StableDiffusionPipeline",)
    required_components = ("vae", "unet", "tokenizer", "text_encoder")
    default_steps = 50
    default_guidance = 7.5

    @property
    def denoiser(self):
        return self.pipe.unet

    def default_size(self):
        size = int(self.pipe.unet.config.sample_size) * self.vae_scale_factor
        return size, size

    @property
    def text_dim(self) -> int:
        return int(self.pipe.text_encoder.config.hidden_size)

    @property
    def pooled_dim(self) -> int:
        return self.text_dim

    def tokenizers(self):
        return {"tokenizer": self.pipe.tokenizer}

    def max_lengths(self):
        return {"tokenizer": int(self.pipe.tokenizer.model_max_length)}

    def segment_offsets(self):
        return {"tokenizer": 0}

    def do_cfg(self, guidance_scale):
        # Guidance-distilled UNets (LCM) take the scale as an embedding instead.
        return guidance_scale > 1.0 and self.pipe.unet.config.time_cond_proj_dim is None

    def _guidance_embedding(self, guidance_scale, batch, dtype):
        """Guidance-distilled UNets' (LCM) ``timestep_cond``: the scale as an embedding; None for the others."""
        dim = self.pipe.unet.config.time_cond_proj_dim
        if dim is None:
            return None
        scale = torch.tensor(guidance_scale - 1).repeat(batch)
        return self.pipe.get_guidance_scale_embedding(scale, embedding_dim=dim).to(device=self.device, dtype=dtype)

    def encode_text(self, prompts, negative_prompt, guidance_scale, do_cfg):
        pipe, b = self.pipe, len(prompts)
        cond, uncond = pipe.encode_prompt(prompts, self.device, 1, do_cfg,
                                          None if negative_prompt is None else [negative_prompt] * b)
        ids, mask = self._tokenize("tokenizer", prompts)
        # CLIP's pooled output is the final hidden state at the end-of-text token, the last real one.
        last = mask.long().sum(1).clamp(min=1) - 1
        pooled = cond[torch.arange(b, device=cond.device), last]
        timestep_cond = self._guidance_embedding(guidance_scale, b, cond.dtype)
        context = torch.cat([uncond, cond]) if do_cfg else cond
        return ({"encoder_hidden_states": context, "timestep_cond": timestep_cond},
                PromptEmbedding(cond, pooled, mask, ids))

    def prepare_latents(self, batch, height, width, dtype, generator):
        latents = self.pipe.prepare_latents(batch, self.latent_channels, height, width, dtype, self.device,
                                            generator, None)
        return latents, {}

    def predict(self, scheduler, latents, t, cond, extra, guidance_scale, do_cfg):
        model_input = torch.cat([latents] * 2) if do_cfg else latents
        if hasattr(scheduler, "scale_model_input"):
            model_input = scheduler.scale_model_input(model_input, t)
        out = self.pipe.unet(model_input, t, encoder_hidden_states=cond["encoder_hidden_states"],
                             timestep_cond=cond["timestep_cond"], return_dict=False)[0]
        return self.guide(out, guidance_scale, do_cfg)

    def vae_decode(self, latents, generator, cond):
        pipe = self.pipe
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False,
                                generator=generator)[0]
        do_denormalize = None
        if getattr(pipe, "safety_checker", None) is not None:
            # As the pipeline does: flagged images are not denormalized (they come back black).
            image, flagged = pipe.run_safety_checker(image, self.device, cond["encoder_hidden_states"].dtype)
            if flagged is not None:
                do_denormalize = [not f for f in flagged]
        return self.postprocess(image, [True] * image.shape[0] if do_denormalize is None else do_denormalize)


class _StableDiffusionXL(_StableDiffusion):
    """SDXL: two CLIP text encoders joined along the width (one 77-token sequence), the second one's projected
    pooled output and the size/crop "time ids" as added conditioning, a VAE that upcasts from float16."""

    name = "stable-diffusion-xl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    required_components = ("vae", "unet", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
    default_steps = 50
    default_guidance = 5.0

    @property
    def text_dim(self) -> int:
        # the joined width (a UNet config may give cross_attention_dim per block)
        return int(self.pipe.text_encoder.config.hidden_size) + int(self.pipe.text_encoder_2.config.hidden_size)

    @property
    def pooled_dim(self) -> int:
        return int(self.pipe.text_encoder_2.config.projection_dim)

    def tokenizers(self):
        return {"tokenizer": self.pipe.tokenizer, "tokenizer_2": self.pipe.tokenizer_2}

    def max_lengths(self):
        return {"tokenizer": int(self.pipe.tokenizer.model_max_length),
                "tokenizer_2": int(self.pipe.tokenizer_2.model_max_length)}

    def segment_offsets(self):
        # Both CLIPs' hidden states are concatenated along the width: their tokens share the 77 positions.
        return {"tokenizer": 0, "tokenizer_2": 0}

    def encode_text(self, prompts, negative_prompt, guidance_scale, do_cfg):
        pipe, b = self.pipe, len(prompts)
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=None if negative_prompt is None else [negative_prompt] * b)
        ids, mask = self._tokenize("tokenizer", prompts)
        timestep_cond = self._guidance_embedding(guidance_scale, b, cond.dtype)
        context = torch.cat([uncond, cond]) if do_cfg else cond
        pooled_context = torch.cat([uncond_pooled, pooled]) if do_cfg else pooled
        return ({"encoder_hidden_states": context, "timestep_cond": timestep_cond, "text_embeds": pooled_context},
                PromptEmbedding(cond, pooled, mask, ids))

    def prepare_latents(self, batch, height, width, dtype, generator):
        latents, _ = super().prepare_latents(batch, height, width, dtype, generator)
        # What the pipeline passes by default: original size = target size = the image's, no crop.
        time_ids = self.pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=dtype,
                                               text_encoder_projection_dim=self.pooled_dim)
        return latents, {"time_ids": time_ids.to(self.device)}

    def predict(self, scheduler, latents, t, cond, extra, guidance_scale, do_cfg):
        model_input = torch.cat([latents] * 2) if do_cfg else latents
        if hasattr(scheduler, "scale_model_input"):
            model_input = scheduler.scale_model_input(model_input, t)
        added = {"text_embeds": cond["text_embeds"],
                 "time_ids": extra["time_ids"].to(cond["text_embeds"].dtype).repeat(model_input.shape[0], 1)}
        out = self.pipe.unet(model_input, t, encoder_hidden_states=cond["encoder_hidden_states"],
                             timestep_cond=cond["timestep_cond"], added_cond_kwargs=added, return_dict=False)[0]
        return self.guide(out, guidance_scale, do_cfg)

    def vae_decode(self, latents, generator, cond):
        vae = self.pipe.vae
        # As the pipeline does: a float16 VAE that says it overflows there (SDXL's own) decodes in float32.
        dtype = torch.float32 if vae.dtype == torch.float16 and vae.config.force_upcast else vae.dtype
        latents = latents.to(dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, latents.shape[1], 1, 1)
            latents = (latents * torch.tensor(std, dtype=dtype, device=latents.device).view(shape)
                       / vae.config.scaling_factor + torch.tensor(mean, dtype=dtype, device=latents.device).view(shape))
        else:
            latents = latents / vae.config.scaling_factor
        if dtype != vae.dtype:
            # Cast for this decode and back, as the pipeline does (float16 -> 32 -> 16 is exact); float()/half()
            # rather than diffusers' to(dtype), which warns about float32 modules on every call, even when none.
            vae.float()
            try:
                image = vae.decode(latents, return_dict=False)[0]
            finally:
                vae.half()
        else:
            image = vae.decode(latents, return_dict=False)[0]
        watermark = getattr(self.pipe, "watermark", None)
        if watermark is not None:  # with invisible-watermark installed, as the pipeline (images of >= 256 px)
            image = watermark.apply_watermark(image).to(image.device)  # it hands back CPU tensors
        return self.postprocess(image)


class _StableDiffusion3(_Family):
    name = "stable-diffusion-3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    # T5 (text_encoder_3, tokenizer_3) is optional: SD3 runs without it
    required_components = ("vae", "transformer", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
    default_steps = 28
    default_guidance = 7.0
    timesteps_first = False
    default_max_sequence_length = 256
    longest_sequence = 512  # StableDiffusion3Pipeline refuses more

    @property
    def size_multiple(self):
        return self.vae_scale_factor * int(self.pipe.transformer.config.patch_size)

    @property
    def text_dim(self):
        return int(self.pipe.transformer.config.joint_attention_dim)

    @property
    def pooled_dim(self):
        return int(self.pipe.transformer.config.pooled_projection_dim)

    def _clip_length(self) -> int:
        return int(self.pipe.tokenizer_max_length)

    def tokenizers(self):
        names = {"tokenizer": self.pipe.tokenizer, "tokenizer_2": self.pipe.tokenizer_2}
        # SD3 may run without T5 (text_encoder_3=None): that segment is then zeros, aligned to nothing.
        pipe = self.pipe
        if getattr(pipe, "tokenizer_3", None) is not None and getattr(pipe, "text_encoder_3", None) is not None:
            names["tokenizer_3"] = self.pipe.tokenizer_3
        return names

    def max_lengths(self):
        lengths = {"tokenizer": self._clip_length(), "tokenizer_2": self._clip_length()}
        if "tokenizer_3" in self.tokenizers():
            lengths["tokenizer_3"] = self.max_sequence_length
        return lengths

    def segment_offsets(self):
        # [CLIP-L | CLIP-G] share the first 77 positions (joined along the width), T5 follows.
        offsets = {"tokenizer": 0, "tokenizer_2": 0}
        if "tokenizer_3" in self.tokenizers():
            offsets["tokenizer_3"] = self._clip_length()
        return offsets

    def encode_text(self, prompts, negative_prompt, guidance_scale, do_cfg):
        b = len(prompts)
        cond, uncond, pooled, uncond_pooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None,
            negative_prompt=None if negative_prompt is None else [negative_prompt] * b,
            do_classifier_free_guidance=do_cfg, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length)
        _, clip_mask = self._tokenize("tokenizer", prompts)
        if "tokenizer_3" in self.tokenizers():
            _, t5_mask = self._tokenize("tokenizer_3", prompts)
        else:  # no T5: the pipeline feeds zeros there
            t5_mask = torch.zeros(b, cond.shape[1] - clip_mask.shape[1], dtype=torch.bool, device=self.device)
        mask = torch.cat([clip_mask, t5_mask], dim=1)
        context = torch.cat([uncond, cond]) if do_cfg else cond
        pooled_context = torch.cat([uncond_pooled, pooled]) if do_cfg else pooled
        return ({"encoder_hidden_states": context, "pooled_projections": pooled_context},
                PromptEmbedding(cond, pooled, mask, None))

    def prepare_latents(self, batch, height, width, dtype, generator):
        latents = self.pipe.prepare_latents(batch, self.latent_channels, height, width, dtype, self.device,
                                            generator, None)
        return latents, {}

    def set_timesteps(self, scheduler, num_steps, latents):
        kwargs = {}
        config = scheduler.config
        if config.get("use_dynamic_shifting", None):
            patch = self.pipe.transformer.config.patch_size
            seq_len = (latents.shape[-2] // patch) * (latents.shape[-1] // patch)
            shift = _module_function(self.pipe, "calculate_shift")
            kwargs["mu"] = shift(seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.16))
        retrieve = _module_function(self.pipe, "retrieve_timesteps")
        timesteps, _ = retrieve(scheduler, num_steps, self.device, sigmas=None, **kwargs)
        return timesteps

    def step_kwargs(self, generator):
        return _flow_step_kwargs(self.pipe.scheduler, generator)

    def predict(self, scheduler, latents, t, cond, extra, guidance_scale, do_cfg):
        model_input = torch.cat([latents] * 2) if do_cfg else latents
        out = self.pipe.transformer(hidden_states=model_input, timestep=t.expand(model_input.shape[0]),
                                    encoder_hidden_states=cond["encoder_hidden_states"],
                                    pooled_projections=cond["pooled_projections"], return_dict=False)[0]
        return self.guide(out, guidance_scale, do_cfg)

    def vae_decode(self, latents, generator, cond):
        vae = self.pipe.vae
        image = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
        return self.postprocess(image)


class _Flux(_Family):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    required_components = ("vae", "transformer", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
    default_steps = 28
    default_guidance = 3.5
    timesteps_first = False
    default_max_sequence_length = 512
    longest_sequence = 512  # FluxPipeline refuses more
    takes_negative_prompt = False  # guidance is distilled into the transformer: no unconditional pass

    @property
    def size_multiple(self):
        return self.vae_scale_factor * 2  # latents are packed in 2 x 2 patches

    @property
    def latent_channels(self):
        return int(self.pipe.transformer.config.in_channels) // 4

    @property
    def text_dim(self):
        return int(self.pipe.transformer.config.joint_attention_dim)

    @property
    def pooled_dim(self):
        return int(self.pipe.transformer.config.pooled_projection_dim)

    def tokenizers(self):
        # T5 alone: the denoiser's text sequence (what the maps index) is T5's; CLIP gives only the pooled vector,
        # truncated at its 77 tokens, so a word past them is still read (it refused such prompts, FluxPipeline not).
        return {"tokenizer_2": self.pipe.tokenizer_2}

    def max_lengths(self):
        return {"tokenizer_2": self.max_sequence_length}

    def segment_offsets(self):
        return {"tokenizer_2": 0}

    def do_cfg(self, guidance_scale):
        return False  # guidance is distilled into the transformer (an embedding), one call per step

    @property
    def uses_guidance(self):
        # FLUX.1-schnell's kind has no guidance embedding: any scale samples the same images
        return bool(self.pipe.transformer.config.guidance_embeds)

    def encode_text(self, prompts, negative_prompt, guidance_scale, do_cfg):
        cond, pooled, text_ids = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                         num_images_per_prompt=1,
                                                         max_sequence_length=self.max_sequence_length)
        ids, mask = self._tokenize("tokenizer_2", prompts)
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=self.device, dtype=torch.float32).expand(len(prompts))
        return ({"encoder_hidden_states": cond, "pooled_projections": pooled, "txt_ids": text_ids,
                 "guidance": guidance}, PromptEmbedding(cond, pooled, mask, ids))

    def prepare_latents(self, batch, height, width, dtype, generator):
        latents, image_ids = self.pipe.prepare_latents(batch, self.latent_channels, height, width, dtype,
                                                       self.device, generator, None)
        return latents, {"img_ids": image_ids}

    def set_timesteps(self, scheduler, num_steps, latents):
        import numpy as np

        config = scheduler.config
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if getattr(config, "use_flow_sigmas", False):
            sigmas = None
        shift = _module_function(self.pipe, "calculate_shift")
        mu = shift(latents.shape[1], config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                   config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        retrieve = _module_function(self.pipe, "retrieve_timesteps")
        timesteps, _ = retrieve(scheduler, num_steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return timesteps

    def step_kwargs(self, generator):
        return _flow_step_kwargs(self.pipe.scheduler, generator)

    def predict(self, scheduler, latents, t, cond, extra, guidance_scale, do_cfg):
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        return self.pipe.transformer(hidden_states=latents, timestep=timestep / 1000, guidance=cond["guidance"],
                                     pooled_projections=cond["pooled_projections"],
                                     encoder_hidden_states=cond["encoder_hidden_states"], txt_ids=cond["txt_ids"],
                                     img_ids=extra["img_ids"], return_dict=False)[0]

    def to_spatial(self, latents, height, width):
        return self.pipe._unpack_latents(latents, height, width, self.vae_scale_factor)

    def from_spatial(self, z, height, width):
        b, c, h, w = z.shape
        return self.pipe._pack_latents(z, b, c, h, w)

    def vae_decode(self, latents, generator, cond):
        vae = self.pipe.vae
        image = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
        return self.postprocess(image)


class _PixArt(_Family):
    name = "pixart"
    pipeline_classes = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    default_steps = 20
    default_guidance = 4.5

    def __init__(self, pipe):
        super().__init__(pipe)
        sigma = any(c.__name__ == "PixArtSigmaPipeline" for c in type(pipe).__mro__)
        self.max_sequence_length = 300 if sigma else 120

    def default_size(self):
        size = int(self.pipe.transformer.config.sample_size) * self.vae_scale_factor
        return size, size

    @property
    def text_dim(self):
        return int(self.pipe.transformer.config.caption_channels)

    @property
    def pooled_dim(self):
        return self.text_dim

    def tokenizers(self):
        return {"tokenizer": self.pipe.tokenizer}

    def max_lengths(self):
        return {"tokenizer": self.max_sequence_length}

    def segment_offsets(self):
        return {"tokenizer": 0}

    def encode_text(self, prompts, negative_prompt, guidance_scale, do_cfg):
        cond, mask, uncond, uncond_mask = self.pipe.encode_prompt(
            prompts, do_cfg, negative_prompt="" if negative_prompt is None else negative_prompt,
            num_images_per_prompt=1, device=self.device, clean_caption=False,
            max_sequence_length=self.max_sequence_length)
        ids, _ = self._tokenize("tokenizer", prompts)
        real = mask.bool()
        # PixArt has no pooled embedding: the mean of the real T5 tokens stands in for it.
        weights = real.to(cond.dtype).unsqueeze(-1)
        pooled = (cond * weights).sum(1) / weights.sum(1).clamp(min=1)
        context = torch.cat([uncond, cond]) if do_cfg else cond
        context_mask = torch.cat([uncond_mask, mask]) if do_cfg else mask
        b = len(prompts) * (2 if do_cfg else 1)
        added = {"resolution": None, "aspect_ratio": None}
        if self.pipe.transformer.config.sample_size == 128:
            added = "per-size"  # filled in prepare_latents, which knows the size
        return ({"encoder_hidden_states": context, "encoder_attention_mask": context_mask, "added": added,
                 "batch": b}, PromptEmbedding(cond, pooled, real, ids))

    def prepare_latents(self, batch, height, width, dtype, generator):
        latents = self.pipe.prepare_latents(batch, self.latent_channels, height, width, dtype, self.device,
                                            generator, None)
        return latents, {"height": height, "width": width}

    def set_timesteps(self, scheduler, num_steps, latents):
        timesteps = super().set_timesteps(scheduler, num_steps, latents)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        return timesteps

    def _added_cond(self, cond, extra, dtype):
        if cond["added"] != "per-size":
            return cond["added"]
        b, h, w = cond["batch"], extra["height"], extra["width"]
        resolution = torch.tensor([h, w]).repeat(b, 1).to(dtype=dtype, device=self.device)
        aspect = torch.tensor([float(h / w)]).repeat(b, 1).to(dtype=dtype, device=self.device)
        return {"resolution": resolution, "aspect_ratio": aspect}

    def predict(self, scheduler, latents, t, cond, extra, guidance_scale, do_cfg):
        model_input = torch.cat([latents] * 2) if do_cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        timestep = t if torch.is_tensor(t) else torch.tensor([t], device=self.device)
        timestep = (timestep[None] if timestep.ndim == 0 else timestep).to(self.device).expand(model_input.shape[0])
        context = cond["encoder_hidden_states"]
        out = self.pipe.transformer(model_input, encoder_hidden_states=context,
                                    encoder_attention_mask=cond["encoder_attention_mask"], timestep=timestep,
                                    added_cond_kwargs=self._added_cond(cond, extra, context.dtype),
                                    return_dict=False)[0]
        out = self.guide(out, guidance_scale, do_cfg)
        if self.pipe.transformer.config.out_channels // 2 == self.latent_channels:
            out = out.chunk(2, dim=1)[0]  # learned sigma: keep the noise prediction
        return out

    def scheduler_step(self, scheduler, noise_pred, t, latents, step_kwargs, num_steps):
        # The pipeline takes the predicted clean sample when it runs a single step.
        return scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[1 if num_steps == 1 else 0]

    def vae_decode(self, latents, generator, cond):
        vae = self.pipe.vae
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        return self.postprocess(image)


_FAMILIES: tuple[type[_Family], ...] = (_StableDiffusion, _StableDiffusionXL, _StableDiffusion3, _Flux, _PixArt)

#: Pipeline class names DiffusersBackbone supports (or subclasses of them).
SUPPORTED_PIPELINES: tuple[str, ...] = tuple(n for f in _FAMILIES for n in f.pipeline_classes)


def _flow_step_kwargs(scheduler, generator) -> dict[str, Any]:
    """``generator=`` for a flow-matching scheduler's step that takes one (``stochastic_sampling=True`` draws noise
    at every step): without it the noise came from torch's global generator, so a seed did not reproduce its
    images and decoding one state twice gave two images (diffusers' own pipelines pass none either)."""
    import inspect

    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}


_PROBE_PROMPT = "a photo of a red cat and two dogs"


def _check_components(pipeline, family: _Family) -> None:
    """The components the family runs on must be there, and a tokenizer must know its length limit: a folder
    without its VAE (or loaded with ``vae=None``) failed after all the denoising; one whose tokenizer files are
    gone (transformers then builds an empty tokenizer without a length limit) failed inside the tokenizer."""
    missing = [name for name in family.required_components if getattr(pipeline, name, None) is None]
    if missing:
        raise ValueError(f"pipeline: {type(pipeline).__name__} has no {', '.join(missing)}; "
                         f"{family.name} needs {', '.join(family.required_components)} (a folder missing "
                         f"{'that subfolder' if len(missing) == 1 else 'those subfolders'}, or a component "
                         f"passed as None)")
    for name, length in family.max_lengths().items():
        if not 0 < int(length) <= 1_000_000:
            raise ValueError(f"pipeline.{name} has no usable length limit (model_max_length {length}): its files "
                             f"are missing or incomplete (the pipeline folder's {name}/ subfolder)")
    # A tokenizer whose vocabulary files are gone but whose config is there (an interrupted download), or a T5
    # tokenizer folder left empty, loads as a tokenizer of a few special tokens: every prompt became unknown tokens,
    # and images were made, trained and rewarded on no text without a word. Its text encoder says how many tokens
    # it reads (T5 pads its table a little: 32100 tokens, 32128 rows).
    for tok_name, enc_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"),
                               ("tokenizer_3", "text_encoder_3")):
        tokenizer, encoder = getattr(pipeline, tok_name, None), getattr(pipeline, enc_name, None)
        rows = getattr(getattr(encoder, "config", None), "vocab_size", None)
        if tokenizer is None or not isinstance(rows, int) or rows <= 0:
            continue
        try:
            known = len(tokenizer)
        except TypeError:
            continue
        unknown = 0.0
        unk = getattr(tokenizer, "unk_token_id", None)
        if unk is not None:  # T5's tokenizer built without its files still has 104 tokens: a prompt tells
            try:
                ids = tokenizer(_PROBE_PROMPT, add_special_tokens=False)["input_ids"]
                unknown = sum(i == unk for i in ids) / max(len(ids), 1)
            except Exception:  # a tokenizer that cannot read plain English is refused below, by its own error later
                unknown = 0.0
        if known < 0.9 * rows or unknown >= 0.5:
            raise ValueError(f"pipeline.{tok_name} knows {known} tokens (pipeline.{enc_name} reads {rows}) and reads "
                             f"{unknown:.0%} of {_PROBE_PROMPT!r} as unknown tokens: its files are missing or "
                             f"incomplete (the pipeline folder's {tok_name}/ subfolder); every prompt would be read "
                             "as unknown tokens")


def _check_split(scheduler, correction_step: float, num_steps: int) -> None:
    """Schedulers that keep a sample from before the split and step from it drop the corrected latent without a
    word: PNDM (SD 1.x's default) keeps the sample of its first step and uses it in the second (and its Runge-Kutta
    steps, when not skipped, are several model calls per step); UniPC's corrector rebuilds the first step after the
    split from the sample before it (unless ``disable_corrector`` holds that step); DPM-Solver singlestep's second
    sub-step of a group steps from the group's first sample. Measured on a tiny SDXL pipeline: the sample the next
    step starts from held 11.5% (UniPC) and 0% (singlestep) of the correction, and the images answered it about 0.6
    times as much as under DDIM."""
    if correction_step >= 1.0:
        return
    names = {c.__name__ for c in type(scheduler).__mro__}
    kind = next((n for n in ("UniPCMultistepScheduler", "DPMSolverSinglestepScheduler", "PNDMScheduler")
                 if n in names), None)
    if kind is None:
        return
    others = "Use e.g. DDIMScheduler, EulerDiscreteScheduler or DPMSolverMultistepScheduler, or correction_step=1.0"
    if kind == "PNDMScheduler" and not getattr(scheduler.config, "skip_prk_steps", False):
        raise ValueError(f"correction_step={correction_step} < 1 with PNDMScheduler(skip_prk_steps=False): the "
                         f"split would fall inside a Runge-Kutta step. Use e.g. DDIMScheduler or "
                         f"DPMSolverMultistepScheduler, or correction_step=1.0")
    probe = copy.deepcopy(scheduler)  # the steps this sampling runs, without touching the pipeline's scheduler
    probe.set_timesteps(num_steps)
    steps = len(probe.timesteps)
    k = correction_index(correction_step, steps)  # the first step after the split
    if kind == "UniPCMultistepScheduler":
        off = set(getattr(probe.config, "disable_corrector", None) or ())
        if k < steps and k - 1 not in off:  # a step follows the split, with its corrector on
            raise ValueError(f"correction_step={correction_step} < 1 with UniPCMultistepScheduler: its corrector "
                             f"rebuilds the next step from the sample before the split, so most of the correction "
                             f"would be dropped. {others}")
    elif kind == "DPMSolverSinglestepScheduler":
        orders = list(getattr(probe, "order_list", []) or [])
        if k < len(orders) and orders[k] != 1:
            # rounded down: a value rounded up could fall one step later, inside the group again
            fits = [math.floor(j / len(orders) * 1000) / 1000 for j in range(1, len(orders)) if orders[j] == 1]
            raise ValueError(f"correction_step={correction_step} with {num_steps} steps splits "
                             f"DPMSolverSinglestepScheduler inside an order-{orders[k]} step, which steps from the "
                             f"sample before the split: the correction would be dropped. Use a correction_step at "
                             f"the start of one (one of {fits}), or {others[0].lower()}{others[1:]}")
    elif k == 1:
        raise ValueError(f"correction_step={correction_step} with {num_steps} steps splits PNDMScheduler after its "
                         f"first step, whose sample PNDM keeps and uses in the second: the correction would be "
                         f"dropped. Use a larger correction_step, or e.g. DDIMScheduler or "
                         f"DPMSolverMultistepScheduler")


def _family_for(pipe) -> _Family:
    # The nearest class in the MRO decides, so a subclass of a supported pipeline is served as its parent.
    for cls in type(pipe).__mro__:
        for family in _FAMILIES:
            if cls.__name__ in family.pipeline_classes:
                return family(pipe)
    raise ValueError(
        f"pipeline: {type(pipe).__name__} is not supported by DiffusersBackbone; supported pipelines: "
        f"{', '.join(SUPPORTED_PIPELINES)}"
    )


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------


def diffusers_dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The ``from_pretrained`` keyword for a dtype in the installed diffusers: ``dtype`` where it replaced
    ``torch_dtype`` (which then warns that it is deprecated), ``torch_dtype`` in the releases before."""
    try:
        from diffusers.utils import deprecation_utils
    except ImportError:
        return {"torch_dtype": dtype}
    renamed = hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE")  # added with the rename
    return {"dtype" if renamed else "torch_dtype": dtype}


def diffusers_load_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """The ``from_pretrained`` keywords xlard loads diffusers models with: the dtype (:func:`diffusers_dtype_kwargs`)
    and, where accelerate is not installed, ``low_cpu_mem_usage=False``: what diffusers falls back to there
    anyway, after printing a five-line recommendation to install accelerate for every model it loads (twice
    per ``xlard generate --correct``)."""
    kwargs: dict[str, Any] = dict(diffusers_dtype_kwargs(dtype))
    if importlib.util.find_spec("accelerate") is None:
        kwargs["low_cpu_mem_usage"] = False
    return kwargs


def unloadable_hub_model(name: str, exc: BaseException, instead: str = "a pipeline folder or 'shapes'",
                         marker: str = "model_index.json", revision: str | None = None,
                         kind: str = "a diffusers pipeline", cache_dir: Any = None) -> str:
    """Why ``name`` (not a local folder) could not be loaded, and the fix: what the CLI's ``--backbone``, a
    training config's ``backbone.name`` and a CLIP source's model all say (after naming the argument);
    ``instead`` names what else the argument takes. A model whose snapshot is in the local cache (``marker``
    found there) failed for a reason of its own, named as such: a missing or cut file (an ``OSError``) is fixed
    by downloading it again, what the model is (an unsupported class) is not; a snapshot without ``marker`` is
    another kind of model or a partial download; only a model that is not cached is told to download it first."""
    reason = short_reason(exc) or type(exc).__name__
    if type(exc).__name__ == "HFValidationError":
        return f"{name!r} is neither a local folder nor a valid hub id (org/name); give {instead} or a hub id"
    rev = (f" --revision {revision}" if revision else "") + (f" --cache-dir {cache_dir}" if cache_dir else "")
    at = f" at revision {revision}" if revision else ""
    snapshot = cached_snapshot(name, marker, revision, cache_dir)
    if snapshot is not None:
        # a file missing or cut short is fixed by downloading again; a refusal of what the model is (an unsupported
        # pipeline class, a malformed model_index.json) is not
        again = (f" (if its download was cut short, download it again: `hf download {name}{rev}`)"
                 if isinstance(exc, OSError) else "")
        # the model's own reason at more length: it names the snapshot's files (the supported classes were cut)
        return (f"the hub model {name!r}{at}, cached at {snapshot}, could not be loaded: "
                f"{short_reason(exc, 800) or type(exc).__name__}{again}")
    snapshot = cached_snapshot(name, None, revision, cache_dir)
    if snapshot is not None:
        return (f"the hub model {name!r}{at}, cached at {snapshot}, holds no {marker}: it is not {kind}, or only "
                f"part of it was downloaded (`hf download {name}{rev}`) ({reason})")
    offline = _hub_offline()
    what = f"it is not in the local cache{f' at revision {revision}' if revision else ''}"
    fix = (f"{what} and HF_HUB_OFFLINE is set: download it first (`hf download {name}{rev}` with network access; "
           "`huggingface-cli download` before huggingface_hub 1.0)"
           if offline else "check the id, your network and `hf auth login` for gated models")
    return f"{name!r} is not a local folder and not a loadable hub model; {fix}; or give {instead} ({reason})"


def hub_load_failure(name: str, exc: BaseException, instead: str = "a pipeline folder or 'shapes'",
                     revision: str | None = None, cache_dir: Any = None) -> str:
    """Why a name that is no local folder failed to load, for the CLI's ``--backbone`` and a corrector's backbone
    (after they name the argument): :func:`unloadable_hub_model` (a name the hub refuses outright included)."""
    return unloadable_hub_model(name, exc, instead, revision=revision, cache_dir=cache_dir)


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE set, as huggingface_hub reads it (at its import: its constant, else the environment)."""
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _check_model_index(location: str, early_class_check: bool = True, given: Any = ()) -> None:
    """A pipeline folder's ``model_index.json`` must be a JSON object naming its pipeline class (``{}``, a
    list or an unknown class failed deep in diffusers with a KeyError or an AttributeError). A hub id is checked
    in its snapshot of the local cache (``given``'s ``revision`` and ``cache_dir``); one not cached is left to
    diffusers (it downloads it, or says why not)."""
    index = os.path.join(location, "model_index.json")
    if not os.path.isfile(index):
        # offline only: online, diffusers completes a partial download (a cache holding model_index.json alone,
        # as DiffusionPipeline.load_config leaves it) or fetches a newer index, which this check would refuse
        options = given if isinstance(given, dict) else {}
        if not (_hub_offline() or options.get("local_files_only")):
            return
        location = cached_snapshot(location, "model_index.json", options.get("revision"), options.get("cache_dir"))
        if location is None:
            return
        index = os.path.join(location, "model_index.json")
    try:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"model_id_or_path: {index} is not readable JSON ({exc})") from None
    name = data.get("_class_name") if isinstance(data, dict) else None
    if not isinstance(name, str) or not name:
        raise ValueError(f"model_id_or_path: {index} must be a JSON object with a \"_class_name\" naming the "
                         f"pipeline class (as pipeline.save_pretrained writes it), got "
                         f"{type(data).__name__ if not isinstance(data, dict) else 'no _class_name'}")
    import diffusers

    if not hasattr(diffusers, name):
        raise ValueError(f"model_id_or_path: {index} names pipeline class {name!r}, which this diffusers "
                         f"({diffusers.__version__}) does not have")
    # A component the index names whose subfolder is gone failed in diffusers with "no file named config.json
    # found in directory <the pipeline folder>", naming the wrong folder.
    missing = [key for key, value in data.items() if not key.startswith("_") and key not in given
               and isinstance(value, list) and len(value) == 2 and all(v is not None for v in value)
               and not os.path.isdir(os.path.join(location, key))]
    if missing:
        raise FileNotFoundError(f"model_id_or_path: {index} names the component(s) {', '.join(missing)}, but "
                                f"{location} has no {', '.join(m + '/' for m in missing)} subfolder (an incomplete "
                                f"download or copy?); restore it, or pass the component (or None) to from_pretrained")
    cls = getattr(diffusers, name)  # refused before its weights load (an SDXL folder read gigabytes first)
    # (not with custom_pipeline=: that pipeline class is another one, checked once loaded)
    if early_class_check and isinstance(cls, type) and not any(c.__name__ in SUPPORTED_PIPELINES for c in cls.__mro__):
        raise ValueError(f"pipeline: {name} (in {index}) is not supported by DiffusersBackbone; supported "
                         f"pipelines: {', '.join(SUPPORTED_PIPELINES)}")


def _check_text_dtypes(pipeline, dtype: torch.dtype) -> None:
    """The text encoders must run in the denoiser's dtype (their outputs condition it); a mix (a float16 text
    encoder beside a float32 UNet) failed inside the first denoising step ("mat1 and mat2 must have the same
    dtype")."""
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipeline, name, None)
        if isinstance(module, torch.nn.Module):
            found = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
            if found is not None and found != dtype:
                raise ValueError(f"pipeline.{name} is {found} but its denoiser is {dtype}: load the pipeline with "
                                 f"one dtype (DiffusersBackbone.from_pretrained(..., torch_dtype={dtype}) or "
                                 f"pipeline.to(dtype={dtype}))")


#: Upper bounds of the sizes a backbone takes: past them a run allocates terabytes or runs for days before it
#: fails (the CLI's ``--steps`` has the same bound).
MAX_STEPS = 10_000
MAX_SIDE = 16_384
_MAXIMA = {"num_inference_steps": MAX_STEPS, "height": MAX_SIDE, "width": MAX_SIDE}


def _check_positive_int(name: str, value: Any, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    top = _MAXIMA.get(name)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1 \
            or (top is not None and value > top):
        raise ValueError(f"{name} must be an integer >= 1{f' and <= {top}' if top else ''}, got {value!r}")
    return int(value)


#: The largest classifier-free guidance scale accepted (models use about 1 to 30).
MAX_GUIDANCE = 1000.0


def _check_guidance(value: Any) -> float | None:
    if value is None:
        return None
    if not is_finite_real(value) or not 0 <= value <= MAX_GUIDANCE:
        # far above any model's useful range the guided noise overflows: NaN latents, blamed on the decode
        raise ValueError(f"guidance_scale must be a finite number in [0, {MAX_GUIDANCE:g}], got {value!r}")
    return float(value)


def _check_negative_prompt(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"negative_prompt must be a string or None, got {type(value).__name__}")
    if value is not None:
        from xlard.geneval import not_unicode

        why = not_unicode(value)  # a lone surrogate failed in the tokenizer at the first encode
        if why is not None:
            raise ValueError(f"negative_prompt {value[:80]!r} {why}")
    return value


def _default_capture_factory(config):
    from xlard.attention import AttentionCapture

    def factory(denoiser, *, num_steps: int, cfg: bool):
        _refuse_some_tokens(config, cfg)  # 'all' is refused once the run is known to be guided
        if not config.kept_steps(num_steps):  # else "no attention map was recorded", after all the denoising
            what = (f"step_indices={config.step_indices}" if config.step_indices is not None
                    else f"steps={config.steps}")
            raise ValueError(f"capture: CaptureConfig({what}) keeps none of the {num_steps} denoising step(s) this "
                             f"backbone records after the correction (the window counts those steps; after a "
                             f"correction at the last step there is one readout pass, step 0 of 1): widen the "
                             f"window, e.g. steps=(0.0, 1.0), or lower correction_step")
        return AttentionCapture(denoiser, config, num_steps=num_steps, cfg=cfg)

    return factory


def _refuse_some_tokens(config: Any, cfg: bool | None = None) -> None:
    """Maps of some tokens only, read by the rewards at sequence positions: an entity read another token's map; and
    maps of the unconditional half (or, with guidance, ``cfg`` True, both halves), read by the rewards as the
    prompts' own. Without guidance (``cfg`` False) 'all' records the prompts' rows only: allowed."""
    if config.tokens is not None:
        raise ValueError(
            f"capture: CaptureConfig(tokens={config.tokens!r:.80}) keeps only some text tokens, but a backbone's "
            "Decoded.token_maps holds one map per token of the text sequence, indexed by position (the rewards "
            "read an entity's map at its token index: with a subset they read another token's map); leave "
            "tokens=None here (select tokens with xlard.attention.AttentionCapture used directly)")
    # 'uncond': the rewards judged the empty prompt's maps; 'all' under guidance: 2B rows for B prompts
    if config.guidance_half == "uncond" or (config.guidance_half == "all" and cfg):
        what = "the unconditional half" if config.guidance_half == "uncond" else "both halves"
        raise ValueError(
            f"capture: CaptureConfig(guidance_half={config.guidance_half!r}) records {what} of the guided batch, "
            "but a backbone's Decoded.token_maps must be the prompts' own (conditional) maps, one row per prompt "
            "(the rewards read them so); leave guidance_half='cond' here (record the other half with "
            "xlard.attention.AttentionCapture used directly)")


def _capture_factory(capture: Any):
    """``capture=``: None/True (default CaptureConfig), False (off), a CaptureConfig, or a factory callable."""
    from xlard.attention import AttentionCapture, CaptureConfig

    if capture is False:
        return None
    if capture is None or capture is True:
        return _default_capture_factory(CaptureConfig())
    if isinstance(capture, CaptureConfig):
        _refuse_some_tokens(capture)
        return _default_capture_factory(capture)
    if callable(capture):
        def checked(denoiser, *, num_steps: int, cfg: bool):
            made = capture(denoiser, num_steps=num_steps, cfg=cfg)
            if not (hasattr(made, "__enter__") and hasattr(made, "__exit__") and callable(getattr(made, "maps", None))):
                raise TypeError(f"capture: the factory must return a context manager with .maps() (as "
                                f"xlard.attention.AttentionCapture), got {type(made).__name__}")
            if isinstance(made, AttentionCapture):
                _refuse_some_tokens(made.config, cfg)
            return made

        return checked
    raise ValueError(
        "capture must be None (record every text token), False (no maps), an xlard.attention.CaptureConfig, "
        f"or a factory (denoiser, *, num_steps, cfg) -> context manager with .maps(); got {type(capture).__name__}"
    )


# ---------------------------------------------------------------------------
# The backbone
# ---------------------------------------------------------------------------


class DiffusersBackbone(Backbone):
    """A diffusers text-to-image pipeline as an xLARD backbone (see the module docstring).

    Args:
        pipeline: a loaded diffusers pipeline of a supported family
            (:data:`SUPPORTED_PIPELINES`); see :meth:`from_pretrained`.
        correction_step (float): fraction of the denoising in (0, 1] run
            before the correction; 1.0 = the final clean latent.
        num_inference_steps (int, optional): denoising steps; default the
            family's (SD 50, SDXL 50, SD3 28, FLUX 28, PixArt 20).
        guidance_scale (float, optional): classifier-free guidance scale
            (FLUX: the distilled guidance value); default the family's
            (SD 7.5, SDXL 5.0, SD3 7.0, FLUX 3.5, PixArt 4.5). <= 1 turns CFG off.
        height, width (int, optional): image size in pixels, multiples of the
            family's latent stride; default the pipeline's native size.
        negative_prompt (str, optional): for classifier-free guidance.
        max_sequence_length (int, optional): T5 length (SD3, FLUX, PixArt).
        capture: attention capture during decode: None -> every text token
            (:class:`xlard.attention.CaptureConfig` defaults), a
            ``CaptureConfig``, a factory ``(denoiser, *, num_steps, cfg) ->``
            context manager with ``.maps() -> Tensor[B, T, h, w]``, or False.
        capture_encode (bool): also record maps during encode's steps
            (``BackboneState.encode_maps``, the "before" maps).
        color_encoder: an :class:`xlard.color_features.ColorFeatureEncoder`
            applied to decoded images (``Decoded.patch_features``), or None.

    Raises:
        ValueError: an argument out of its domain, naming it; an unsupported
            pipeline; a second-order scheduler with ``correction_step < 1``.

    Example:
        >>> backbone = DiffusersBackbone.from_pretrained("stabilityai/stable-diffusion-2-1-base",  # doctest: +SKIP
        ...     correction_step=0.5, torch_dtype=torch.float16, device="cuda")
        >>> state = backbone.encode(["a photo of two red apples"], seed=0)          # doctest: +SKIP
        >>> zc, lam = corrector.correct(state.z0, **state.prompt_embedding.as_corrector_inputs())  # doctest: +SKIP
        >>> decoded = backbone.decode(state, zc)                                    # doctest: +SKIP
    """

    def __init__(self, pipeline, *, correction_step: float = 1.0, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                 negative_prompt: str | None = None, max_sequence_length: int | None = None,
                 capture: Any = None, capture_encode: bool = False, color_encoder: Any = None):
        _require_diffusers()
        self.correction_step = check_correction_step(correction_step)
        steps = _check_positive_int("num_inference_steps", num_inference_steps)
        guidance = _check_guidance(guidance_scale)
        height = _check_positive_int("height", height)
        width = _check_positive_int("width", width)
        self.negative_prompt = _check_negative_prompt(negative_prompt)
        max_sequence_length = _check_positive_int("max_sequence_length", max_sequence_length)
        if not isinstance(capture_encode, bool):
            raise ValueError(f"capture_encode must be a bool, got {capture_encode!r}")
        if color_encoder is not None:
            from xlard.color_features import ColorFeatureEncoder

            if not isinstance(color_encoder, ColorFeatureEncoder):
                raise ValueError("color_encoder must have encode_images(images) and embed_colors(names), got "
                                 f"{type(color_encoder).__name__}")
        self.family = _family_for(pipeline)
        self.pipeline = pipeline
        _check_components(pipeline, self.family)
        _check_text_dtypes(pipeline, self.family.dtype)
        if max_sequence_length is not None:
            if self.family.max_sequence_length is None:
                raise ValueError(f"max_sequence_length applies to T5-based pipelines (SD3, FLUX, PixArt), not "
                                 f"{type(pipeline).__name__}")
            longest = self.family.longest_sequence
            if longest is not None and max_sequence_length > longest:  # sampled with, where the pipeline refuses it
                raise ValueError(f"max_sequence_length: {type(pipeline).__name__} reads at most {longest} T5 tokens "
                                 f"(its pipeline refuses more), got {max_sequence_length}")
            self.family.max_sequence_length = max_sequence_length
        if self.negative_prompt is not None and not self.family.takes_negative_prompt:
            # it was ignored without a word, and recorded in a trained corrector's sampler settings
            raise ValueError(f"negative_prompt: {type(pipeline).__name__} samples without classifier-free guidance "
                             "(guidance is distilled into its transformer), so a negative prompt changes nothing; "
                             "leave it unset")
        self.num_inference_steps = steps or self.family.default_steps
        if not self.family.uses_guidance:
            if guidance not in (None, 0.0):  # it was taken and changed nothing (and went into run records)
                raise ValueError(f"guidance_scale: this {type(pipeline).__name__} has no guidance embedding (as "
                                 f"FLUX.1-schnell): it samples without guidance; leave guidance unset (or 0), got "
                                 f"{guidance}")
            self.guidance_scale = 0.0
        else:
            self.guidance_scale = self.family.default_guidance if guidance is None else guidance
        default_h, default_w = self.family.default_size()
        self.height, self.width = height or default_h, width or default_w
        multiple = self.family.size_multiple
        for name, value in (("height", self.height), ("width", self.width)):
            if value % multiple:
                raise ValueError(f"{name} must be a multiple of {multiple} for {type(pipeline).__name__} "
                                 f"(latent stride), got {value}")
        order = getattr(pipeline.scheduler, "order", 1)
        _check_split(pipeline.scheduler, self.correction_step, self.num_inference_steps)
        if order != 1 and self.correction_step < 1.0:
            raise ValueError(
                f"correction_step={self.correction_step} < 1 needs a first-order scheduler (the split would fall "
                f"inside a step); {type(pipeline.scheduler).__name__} has order {order}. Use e.g. "
                "EulerDiscreteScheduler/DDIMScheduler/DPMSolverMultistepScheduler, or correction_step=1.0"
            )
        self._capture_factory = _capture_factory(capture)
        from xlard.attention import CaptureConfig

        if isinstance(capture, CaptureConfig) and self.correction_step == 1.0 and not capture.kept_steps(1):
            # known now: at correction_step 1 the maps come from one readout pass, step 0 of 1
            raise ValueError(f"capture: CaptureConfig(steps={capture.steps}, step_indices={capture.step_indices}) "
                             "keeps none of the one readout pass recorded at correction_step=1.0 (step 0 of 1); "
                             "use a window starting at 0, e.g. steps=(0.0, 1.0)")
        self.capture_encode = capture_encode
        if capture_encode and self._capture_factory is None:
            raise ValueError("capture_encode=True needs attention capture (capture is False)")
        self.color_encoder = color_encoder

    @classmethod
    def from_pretrained(cls, model_id_or_path: str | os.PathLike, *, correction_step: float = 1.0,
                        num_inference_steps: int | None = None, guidance_scale: float | None = None,
                        torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                        height: int | None = None, width: int | None = None, negative_prompt: str | None = None,
                        max_sequence_length: int | None = None, capture: Any = None, capture_encode: bool = False,
                        color_encoder: Any = None, **pipeline_kwargs) -> DiffusersBackbone:
        """Load a pipeline with ``DiffusionPipeline.from_pretrained`` and wrap it.

        Args:
            model_id_or_path: a hub model id or a local folder written by
                ``save_pretrained``; ``"shapes"`` is the embedded shapes-world
                backbone (with its default steps and guidance), as in a
                training config.
            torch_dtype: the pipeline's dtype (e.g. ``torch.float16``); default
                ``torch.float32`` for every component (diffusers' own default for
                its models; transformers would otherwise keep a text encoder
                stored in float16 in float16, which the float32 denoiser cannot
                take).
            device: where to move the pipeline (``pipe.to(device)``).
            **pipeline_kwargs: passed to ``DiffusionPipeline.from_pretrained``
                (``variant``, ``revision``, ``scheduler``, ...).
            Others: see :class:`DiffusersBackbone`.

        Returns:
            A :class:`DiffusersBackbone`.

        Raises:
            ValueError: a bad argument (named), checked before any loading;
                an unsupported pipeline.
            FileNotFoundError, NotADirectoryError: ``model_id_or_path`` is a
                path (``/...``, ``./...``, ``~/...``) with no pipeline folder
                there (checked before any loading).
        """
        _require_diffusers()
        if torch_dtype is not None and (not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point):
            raise ValueError(f"torch_dtype must be a floating torch.dtype (e.g. torch.float16) or None, got "
                             f"{torch_dtype!r}")
        device = as_device(device, "DiffusersBackbone.from_pretrained")
        # Fail on bad settings before a possibly long load.
        check_correction_step(correction_step)
        _check_positive_int("num_inference_steps", num_inference_steps)
        _check_guidance(guidance_scale)
        _check_positive_int("height", height)
        _check_positive_int("width", width)
        _check_negative_prompt(negative_prompt)
        _check_positive_int("max_sequence_length", max_sequence_length)
        _capture_factory(capture)
        if model_id_or_path == "shapes" and not os.path.exists("shapes"):  # the name the trainer and CLI take
            from xlard.shapes import backbone as shapes_backbone

            if not shapes_backbone.is_available():
                raise FileNotFoundError(f"model_id_or_path 'shapes': {shapes_backbone.not_installed()}")
            model_id_or_path = str(shapes_backbone.backbone_path())
            num_inference_steps, guidance_scale = shapes_backbone.sampler_defaults(num_inference_steps,
                                                                                   guidance_scale)
        model_id_or_path = model_location("model_id_or_path", model_id_or_path, "model_index.json",
                                          "a diffusers pipeline folder (written by pipeline.save_pretrained)")
        from diffusers import DiffusionPipeline

        dtype = torch.float32 if torch_dtype is None else torch_dtype
        for key, value in diffusers_load_kwargs(dtype).items():
            if key in ("dtype", "torch_dtype"):
                pipeline_kwargs[key] = value
            else:  # the caller's own low_cpu_mem_usage stands
                pipeline_kwargs.setdefault(key, value)
        _check_model_index(model_id_or_path, early_class_check="custom_pipeline" not in pipeline_kwargs,
                           given=pipeline_kwargs)
        with _unexpected_load_kwargs() as unexpected:
            try:
                pipe = DiffusionPipeline.from_pretrained(model_id_or_path, **pipeline_kwargs)
            except (KeyError, AttributeError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as exc:  # malformed
                raise ValueError(f"model_id_or_path: {model_id_or_path} could not be loaded as a diffusers "
                                 f"pipeline ({type(exc).__name__}: {short_reason(exc)})") from exc
        # diffusers ignores them with a warning (hidden at our log level): the caller's are a misspelt option; the
        # folder's own (model_index.json) are components of another pipeline, or a newer diffusers' config keys
        named = set(re.findall(r"'([^']+)':", " ".join(unexpected)))
        mine = sorted(named & set(pipeline_kwargs))
        if mine:
            raise ValueError(f"DiffusersBackbone.from_pretrained: keyword arguments "
                             f"{ {k: pipeline_kwargs[k] for k in mine} } are not expected by "
                             f"{type(pipe).__name__}; check their spelling (this "
                             "backbone's own options: correction_step, num_inference_steps, guidance_scale, "
                             "torch_dtype, device, height, width, negative_prompt, max_sequence_length, capture, "
                             "capture_encode, color_encoder; the rest go to DiffusionPipeline.from_pretrained)")
        if named:
            try:
                index = DiffusionPipeline.load_config(model_id_or_path)
            except Exception:  # read above by the load itself; a failure here leaves the check to the components
                index = {}
            # a component: a top-level [library, class] entry (a newer diffusers' absent optional one is [null,
            # null]) that this pipeline class does not take (a key inside a setting's value is no component)
            takes = set(inspect.signature(type(pipe).__init__).parameters)
            parts = sorted(k for k in named if k not in takes and isinstance(index.get(k), (list, tuple))
                           and len(index[k]) == 2 and all(index[k]))
            if parts:  # an SDXL folder labelled StableDiffusionPipeline: loaded without its second text encoder
                raise ValueError(f"model_id_or_path: {model_id_or_path}: its model_index.json names components "
                                 f"{parts} that {type(pipe).__name__} (its _class_name) does not take: the folder "
                                 "is another pipeline's, or its _class_name is wrong")
            # other keys: a newer diffusers' settings, ignored as diffusers ignores them
        # diffusers 0.42 loads an SD3 transformer in float32 whatever dtype it is given, beside text encoders in
        # that dtype; the denoiser is cast (the text encoders keep what transformers chose, e.g. T5's fp32 layers)
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        if isinstance(denoiser, torch.nn.Module) and any(p.is_floating_point() and p.dtype != dtype
                                                         for p in denoiser.parameters()):
            denoiser.to(dtype)
        if device is not None:
            pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, correction_step=correction_step, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, height=height, width=width, negative_prompt=negative_prompt,
                   max_sequence_length=max_sequence_length, capture=capture, capture_encode=capture_encode,
                   color_encoder=color_encoder)

    def __repr__(self) -> str:
        return (f"DiffusersBackbone({type(self.pipeline).__name__}, correction_step={self.correction_step}, "
                f"num_inference_steps={self.num_inference_steps}, guidance_scale={self.guidance_scale}, "
                f"size={self.height}x{self.width}, device={self.device}, dtype={self.dtype})")

    # -- sizes -------------------------------------------------------------------

    @property
    def latent_channels(self) -> int:
        return self.family.latent_channels

    @property
    def latent_size(self) -> tuple[int, int]:
        """``(h, w)`` of ``z0`` (the spatial latent of :meth:`encode`)."""
        factor = self.family.vae_scale_factor
        return self.height // factor, self.width // factor

    @property
    def text_dim(self) -> int:
        return self.family.text_dim

    @property
    def pooled_dim(self) -> int:
        return self.family.pooled_dim

    @property
    def device(self) -> torch.device:
        return self.family.device

    @property
    def dtype(self) -> torch.dtype:
        return self.family.dtype

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.family.do_cfg(self.guidance_scale)

    # -- prompts -------------------------------------------------------------------

    def parse(self, prompt: str | PromptSpec) -> PromptSpec:
        """A prompt's :class:`PromptSpec` aligned to this backbone's tokenizer(s).

        A spec whose entities all carry word spans is aligned again to this backbone's tokenizers (an
        alignment made by another backbone, whose tokenizers may share these names, is replaced); a spec
        without them is used with the alignments it brings, which must name this backbone's tokenizers.

        Raises:
            ValueError: the prompt cannot be parsed (pass a PromptSpec built
                with ``xlard.prompts`` instead) or aligned.
        """
        tokenizers, lengths = self.family.tokenizers(), self.family.max_lengths()
        if isinstance(prompt, PromptSpec):
            spans = all(e.word_span is not None for e in prompt.entities)
            if not spans and tuple(prompt.encoders) == tuple(tokenizers):
                return prompt
            return align(prompt, tokenizers, max_length=lengths)
        try:
            return parse(prompt, tokenizers, max_length=lengths)
        except ValueError as exc:
            quoted = quote_prompt(prompt)
            where = "" if quoted in str(exc) else f"prompt {quoted}: "  # the parser's own messages name it
            raise ValueError(f"{where}{exc} (pass an xlard.prompts.PromptSpec to give the "
                             "entities explicitly)") from exc

    # -- the split loop ----------------------------------------------------------

    def _denoise(self, scheduler, latents, timesteps, cond, extra, step_kwargs, do_cfg, num_steps, guidance_scale):
        for t in timesteps:
            noise_pred = self.family.predict(scheduler, latents, t, cond, extra, guidance_scale, do_cfg)
            latents = self.family.scheduler_step(scheduler, noise_pred, t, latents, step_kwargs, num_steps)
        return latents

    def _prepare(self, scheduler, batch: int, dtype: torch.dtype, generator):
        """Initial noise and timesteps, in the pipeline's own order, on a private copy of the scheduler.

        The order matters: SD and PixArt set the timesteps first and scale the
        noise by the scheduler's ``init_noise_sigma``, which set_timesteps
        changes (Euler); SD3 and FLUX need the latents to compute the shift.
        ``prepare_latents`` reads ``pipeline.scheduler``, so the copy stands in
        for it meanwhile.
        """
        family, pipe = self.family, self.pipeline
        original = pipe.scheduler
        pipe.scheduler = scheduler
        try:
            if family.timesteps_first:
                timesteps = family.set_timesteps(scheduler, self.num_inference_steps, None)
                latents, extra = family.prepare_latents(batch, self.height, self.width, dtype, generator)
            else:
                latents, extra = family.prepare_latents(batch, self.height, self.width, dtype, generator)
                timesteps = family.set_timesteps(scheduler, self.num_inference_steps, latents)
        finally:
            pipe.scheduler = original
        return latents, extra, timesteps

    def _capturing(self, num_steps: int, do_cfg: bool):
        return self._capture_factory(self.family.denoiser, num_steps=num_steps, cfg=do_cfg)

    @torch.no_grad()
    def encode(self, prompts: str | PromptSpec | Sequence[str | PromptSpec], seed: Seed = 0) -> BackboneState:
        """Encode the prompts and run the first ``ceil(correction_step * n)`` denoising steps.

        Args:
            prompts: prompt text(s) or :class:`PromptSpec` (s) (aligned here).
            seed: an int, one int per prompt, or torch.Generator(s); see
                :func:`xlard.backbones.base.make_generators`. An int seeds one generator for the whole
                batch, as ``pipe(prompts, generator=torch.Generator().manual_seed(seed))`` does: image ``i``
                then depends on the batch. One int per prompt (``[seed + i for i in range(n)]``, what the
                CLI, the evaluation and :func:`xlard.shapes.backbone.generate` use) makes each image depend
                only on its own seed.

        Returns:
            A :class:`BackboneState` with ``z0 [B, C, h, w]`` in the pipeline's dtype.

        Raises:
            ValueError: empty or bad prompts, a prompt that cannot be parsed or
                aligned, a bad seed.
        """
        items = _as_prompt_list(prompts)
        specs = tuple(self.parse(p) for p in items)
        texts = [s.prompt for s in specs]
        b, family = len(texts), self.family
        generator = make_generators(seed, b)
        do_cfg = self.do_classifier_free_guidance
        cond, embedding = family.encode_text(texts, self.negative_prompt, self.guidance_scale, do_cfg)
        scheduler = copy.deepcopy(self.pipeline.scheduler)
        latents, extra, timesteps = self._prepare(scheduler, b, embedding.tokens.dtype, generator)
        num_steps = len(timesteps)
        k = correction_index(self.correction_step, num_steps)
        step_kwargs = family.step_kwargs(generator)
        encode_maps = None
        if self.capture_encode:
            with self._capturing(k, do_cfg) as capture:
                latents = self._denoise(scheduler, latents, timesteps[:k], cond, extra, step_kwargs, do_cfg, num_steps,
                                        self.guidance_scale)
            encode_maps = capture.maps()
        else:
            latents = self._denoise(scheduler, latents, timesteps[:k], cond, extra, step_kwargs, do_cfg, num_steps,
                                    self.guidance_scale)
        z0 = family.to_spatial(latents, self.height, self.width)
        gens = generator if isinstance(generator, list) else [generator]
        resume = {
            "scheduler": copy.deepcopy(scheduler),
            "timesteps": timesteps,
            "cond": cond,
            "extra": extra,
            "do_cfg": do_cfg,
            "generator_states": generator_states(generator),
            "generator_devices": [str(g.device) for g in gens],
            "generator_is_list": isinstance(generator, list),
            "dtype": self.dtype,  # the encoding backbone's: decode refuses a state of another dtype by name
        }
        return BackboneState(
            z0=z0, prompt_embedding=embedding, specs=specs, prompts=tuple(texts),
            segment_offsets=dict(family.segment_offsets()), correction_step=self.correction_step, step_index=k,
            num_steps=num_steps, guidance_scale=self.guidance_scale, height=self.height, width=self.width,
            resume=resume, encode_maps=encode_maps,
        )

    def _check_state(self, state: Any, z: Any) -> torch.Tensor:
        if not isinstance(state, BackboneState):
            raise ValueError(f"state must be a BackboneState from encode(), got {type(state).__name__}")
        if "scheduler" not in state.resume:
            raise ValueError("state was not made by DiffusersBackbone.encode (its resume data is missing)")
        if (state.height, state.width) != (self.height, self.width):
            raise ValueError(f"state was encoded at {state.height}x{state.width}, this backbone decodes "
                             f"{self.height}x{self.width}")
        channels = self.latent_channels
        if state.z0.dim() != 4 or state.z0.shape[1] != channels:
            raise ValueError(f"state was encoded by another backbone: its latents have shape "
                             f"{tuple(state.z0.shape)}, this backbone's have {channels} channels "
                             f"({type(self.pipeline).__name__})")
        encoded_in = state.resume.get("dtype", self.dtype)
        if encoded_in != self.dtype:  # failed inside the denoiser ("Input type (float) and bias type ... the same")
            raise ValueError(f"state was encoded by a {str(encoded_in).replace('torch.', '')} backbone and this "
                             f"backbone runs {str(self.dtype).replace('torch.', '')}: encode with the backbone that "
                             f"decodes (or load both with the same dtype)")
        if z is None:
            return state.z0
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise ValueError(f"z must be a float tensor shaped like state.z0 {tuple(state.z0.shape)}, got "
                             f"{getattr(z, 'shape', type(z).__name__)}")
        if z.shape != state.z0.shape:
            raise ValueError(f"z must have the shape of state.z0 {tuple(state.z0.shape)}, got {tuple(z.shape)}")
        if z.device != state.z0.device:
            raise ValueError(f"z is on {z.device} but state.z0 is on {state.z0.device}")
        z = z.detach().to(state.z0.dtype)  # checked in the dtype decoded: 1e5 is finite in float32, not in float16
        finite = torch.isfinite(z)
        if not bool(finite.all()):  # else the images come out black, judged and saved without a word
            raise ValueError(f"z holds {int((~finite).sum())} NaN or infinite value(s) of {z.numel()} in the "
                             f"backbone's {str(state.z0.dtype).replace('torch.', '')}; a latent to decode must be "
                             "finite there (a diverged correction?)")
        return z

    @torch.no_grad()
    def decode(self, state: BackboneState, z: torch.Tensor | None = None) -> Decoded:
        """Continue sampling from ``z`` for the remaining steps, then VAE-decode.

        Args:
            state: from :meth:`encode` (not modified: decoding it again gives
                the same result).
            z (Tensor[B, C, h, w], optional): the latent to continue from,
                shaped like ``state.z0`` (e.g. the corrected zc); default z0.

        Returns:
            A :class:`Decoded` (images float32 in [0, 1]).

        Raises:
            ValueError: a foreign state, or ``z`` of the wrong shape/device or not finite.
        """
        z = self._check_state(state, z)
        family, r = self.family, state.resume
        generator = restore_generators(r["generator_states"], r["generator_devices"], r["generator_is_list"])
        scheduler = copy.deepcopy(r["scheduler"])
        step_kwargs = family.step_kwargs(generator)
        latents = family.from_spatial(z, self.height, self.width)
        timesteps, k, do_cfg = r["timesteps"], state.step_index, r["do_cfg"]
        remaining = timesteps[k:]
        maps = None
        if self._capture_factory is None:
            latents = self._denoise(scheduler, latents, remaining, r["cond"], r["extra"], step_kwargs, do_cfg,
                                    state.num_steps, state.guidance_scale)
        elif len(remaining):
            with self._capturing(len(remaining), do_cfg) as capture:
                latents = self._denoise(scheduler, latents, remaining, r["cond"], r["extra"], step_kwargs, do_cfg,
                                        state.num_steps, state.guidance_scale)
            maps = capture.maps()
        else:
            maps = self._readout(latents, state)
        final = family.to_spatial(latents, self.height, self.width)
        images = family.vae_decode(final, generator, r["cond"]).float()
        if not bool(torch.isfinite(images).all()):  # a finite z far off the latents' scale overflowed on the way
            bad = ~torch.isfinite(images.flatten(1)).all(1)
            raise ValueError(f"z: decoding gave non-finite images for row(s) {bad.nonzero().flatten().tolist()} "
                             f"(largest |z| {float(z.abs().max()):.3g} against {float(state.z0.abs().max()):.3g} "
                             "in state.z0): a latent far off the backbone's scale, or a VAE that overflows in "
                             f"{str(state.z0.dtype).replace('torch.', '')} (load with torch_dtype=torch.float32)")
        features = self.color_encoder.encode_images(images) if self.color_encoder is not None else None
        return Decoded(images=images, latents=final, token_maps=maps, patch_features=features, specs=state.specs,
                       segment_offsets=dict(state.segment_offsets))

    def _readout(self, latents: torch.Tensor, state: BackboneState) -> torch.Tensor:
        """One denoiser pass on the final latent at the schedule's last timestep, only to record attention."""
        r = state.resume
        scheduler = copy.deepcopy(self.pipeline.scheduler)
        timesteps = self.family.set_timesteps(scheduler, self.num_inference_steps, latents)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(len(timesteps) - 1)
        with self._capturing(1, r["do_cfg"]) as capture:
            self.family.predict(scheduler, latents, timesteps[-1], r["cond"], r["extra"], state.guidance_scale,
                                r["do_cfg"])
        return capture.maps()

    def pipeline_call_kwargs(self, prompts: str | Sequence[str] | None = None) -> dict[str, Any]:
        """Keyword arguments that make ``pipeline(prompts, generator=..., **kwargs)`` sample what this backbone does.

        Useful to check parity (``correction_step`` aside, the images are equal
        without a correction).

        Args:
            prompts: what the pipeline will be called with. A list needs the backbone's negative prompt as a
                list of the same length (Stable Diffusion pipelines refuse a string beside a list); None or one
                string: the negative prompt as a string.
        """
        kwargs: dict[str, Any] = {"num_inference_steps": self.num_inference_steps,
                                  "guidance_scale": self.guidance_scale, "height": self.height,
                                  "width": self.width, "output_type": "pt"}
        if self.negative_prompt is not None and not isinstance(self.family, _Flux):
            many = prompts is not None and not isinstance(prompts, str)
            kwargs["negative_prompt"] = [self.negative_prompt] * len(prompts) if many else self.negative_prompt
        if isinstance(self.family, _PixArt):
            kwargs.update(use_resolution_binning=False, clean_caption=False,
                          max_sequence_length=self.family.max_sequence_length)
        if isinstance(self.family, (_StableDiffusion3, _Flux)):
            kwargs["max_sequence_length"] = self.family.max_sequence_length
        return kwargs

