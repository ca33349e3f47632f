"""Backbones: frozen text-to-image generators split around the xLARD corrector.

- :mod:`xlard.backbones.base`: the :class:`Backbone` interface and its data
  (:class:`BackboneState`, :class:`PromptEmbedding`, :class:`Decoded`,
  :class:`Generation`).
- :mod:`xlard.backbones.diffusers_backbone`: :class:`DiffusersBackbone`, any
  supported diffusers pipeline (Stable Diffusion 1.x/2.x, SDXL, SD3, FLUX, PixArt).

``import xlard.backbones`` does not import diffusers; the diffusers backbone
loads it on first use.
"""
from __future__ import annotations

from xlard.backbones.base import (Backbone, BackboneState, Decoded, Generation, PromptEmbedding, Seed,
                                  correction_index, make_generators)

__all__ = [
    "Backbone",
    "BackboneState",
    "Decoded",
    "Generation",
    "PromptEmbedding",
    "Seed",
    "correction_index",
    "make_generators",
    "DiffusersBackbone",
    "SUPPORTED_PIPELINES",
]


def __getattr__(name: str):
    if name in ("DiffusersBackbone", "SUPPORTED_PIPELINES"):
        from xlard.backbones import diffusers_backbone

        return getattr(diffusers_backbone, name)
    raise AttributeError(f"module 'xlard.backbones' has no attribute {name!r}")
