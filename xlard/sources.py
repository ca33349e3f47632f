"""Reward sources: where the CMD's spatial evidence comes from.

The rewards (:class:`xlard.rewards.ExplainableRewards`) count components,
take centroids and score colors on maps; a *source* turns a backbone's
:class:`~xlard.backbones.base.Decoded` output (images in [0, 1], prompt
specs, optionally the denoiser's attention) into those maps, in one batched
forward pass:

- ``"attention"``: the backbone's own text-to-image cross-attention (token
  maps, averaged per noun) and the backbone's color encoder (or the
  weight-free :class:`~xlard.color_features.PixelColorEncoder` on the
  images). What xlard did before sources existed.
- ``"shapes"``: the shapes world's trained dense understanding model
  (:mod:`xlard.shapes.understanding`) on the decoded images: per-pixel
  shape-core probabilities as entity maps (64x64), per-pixel color
  distributions as patch features with one-hot color embeddings. The default
  on the shapes backbone.
- ``"clip"``: a dense CLIP from ``transformers`` (any CLIP checkpoint id or
  local folder, e.g. ``openai/clip-vit-base-patch16``): the vision tower's
  last-layer value path projected into the joint space for every patch (the
  MaskCLIP reading), compared with the text embeddings of each noun (softmax
  over the prompt's nouns and a background prompt) and each color word.

The interface (stable; the trainer codes against it):

- ``RewardSource``: ``name: str``; ``needs_attention: bool`` (False: build
  the backbone with ``capture=False``, see :meth:`RewardSource.backbone_options`);
  ``__call__(decoded) -> dict`` of keyword arguments for
  ``ExplainableRewards.__call__`` (``specs`` plus ``token_maps`` or
  ``entity_maps``/``entity_available``, and ``patch_features``/
  ``color_embeddings`` for the color reward; optionally ``entity_counts``, the
  number of objects per entity the count reward scores instead of the maps'
  components: the shapes source's weighed count); ``reward_config() ->
  RewardConfig`` the thresholds this source's maps are meant to be read with.
- ``get_source(name, backbone=None, **options) -> RewardSource``.
- ``default_source_for(backbone) -> str``: ``"shapes"`` for the shapes
  backbone (or the name ``"shapes"``), else ``"attention"``.
- ``score(decoded, source, rewards=None, explain=True) -> RewardResult``:
  the source's forward pass, then the rewards (``rewards=None``: an
  ``ExplainableRewards(source.reward_config())``); the result and every
  explanation name the source (``result.source``).

Example:
    >>> from xlard.sources import get_source, default_source_for, score
    >>> source = get_source(default_source_for(backbone), backbone)        # doctest: +SKIP
    >>> rewards = ExplainableRewards(source.reward_config())               # doctest: +SKIP
    >>> result = score(backbone.generate(prompts, seed=0).decoded, source, rewards)   # doctest: +SKIP
    >>> print(result.explanations[0].text())    # '"a photo of ..." (judged by the shapes source)' ...  # doctest: +SKIP
"""
from __future__ import annotations

import abc
import inspect
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from xlard._args import as_device
from xlard.color_features import (ClipColorEncoder, ColorFeatureEncoder, EmbeddingCache, PatchFeatures,
                                   PixelColorEncoder, _described, check_template)
from xlard.prompts import PromptSpec, singularize
from xlard.rewards import ExplainableRewards, RewardConfig, RewardResult, component_means
from xlard.vocab import GENEVAL_COLORS

__all__ = ["RewardSource", "AttentionSource", "ShapesSource", "ClipSource", "SOURCES", "get_source",
           "default_source_for", "source_options", "score"]

#: The names :func:`get_source` knows.
SOURCES = ("attention", "shapes", "clip")


def _decoded_parts(decoded: Any, who: str) -> tuple[torch.Tensor, tuple[PromptSpec, ...]]:
    if hasattr(decoded, "decoded") and hasattr(decoded, "state"):  # a Generation
        raise ValueError(f"{who}: decoded must be an xlard.backbones.Decoded, got a {type(decoded).__name__}; "
                         f"pass its .decoded (backbone.generate(...).decoded)")
    if isinstance(decoded, torch.Tensor):
        raise ValueError(f"{who}: decoded must be an xlard.backbones.Decoded (images with their prompt specs), got "
                         f"a tensor {tuple(decoded.shape)}; pass backbone.decode(state) or "
                         f"backbone.generate(...).decoded")
    images = getattr(decoded, "images", None)
    specs = getattr(decoded, "specs", None)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        # (a numpy array's shape alone read like a fitting tensor's)
        raise ValueError(f"{who}: decoded.images must be a float tensor [B, 3, H, W] in [0, 1] (a "
                         f"xlard.backbones.Decoded), got {_described(images)}")
    if specs is None or len(specs) != images.shape[0] or not all(isinstance(s, PromptSpec) for s in specs):
        raise ValueError(f"{who}: decoded.specs must hold one PromptSpec per image ({images.shape[0]}), got "
                         f"{type(specs).__name__} of {len(specs) if specs is not None else 0}")
    if not images.is_floating_point():
        raise ValueError(f"{who}: decoded.images must be float in [0, 1], got {images.dtype} (for 8-bit images: "
                         "images.float() / 255)")
    if images.is_meta:
        raise ValueError(f"{who}: decoded.images are meta tensors (shapes only, no pixels)")
    if images.shape[0] == 0:
        raise ValueError(f"{who}: decoded holds no images (an empty batch): nothing to score")
    if images.shape[2] == 0 or images.shape[3] == 0:  # was F.interpolate's "sizes should be greater than 0"
        raise ValueError(f"{who}: decoded.images are empty ({images.shape[2]} x {images.shape[3]} pixels)")
    _check_unit_range(who, "decoded.images", images)
    return images.float(), tuple(specs)


def _check_unit_range(who: str, name: str, images: torch.Tensor) -> None:
    """Float images must lie in [0, 1]: a little past it is rounding (the model clamps); far past it is another
    convention, which clamping would turn into white or black images judged without a word."""
    if not images.numel():
        return
    pixels = images.detach()  # a scalar read off a graph warned
    lo, hi = float(pixels.amin()), float(pixels.amax())
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -0.05 or hi > 1.05:
        hint = (" (a VAE's raw output in [-1, 1]? use images / 2 + 0.5)" if lo < -0.05 and hi <= 1.05 else
                " (0..255 values? divide by 255)" if hi > 1.05 and lo >= -0.05 else "")
        raise ValueError(f"{who}: {name} must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]{hint}")


def _batch_colors(specs: Sequence[PromptSpec]) -> list[str]:
    return sorted({e.color for s in specs for e in s.entities if e.color is not None})


def _told_apart_by_color(spec: PromptSpec) -> list[str | None]:
    """Per entity: its color when another entity of the prompt has the same noun ("a red circle left of a blue
    circle"), or when it is asked absent ("no blue squares": a red square is allowed), else None. A per-noun map
    cannot tell such entities apart (each counted both objects, and the relation compared one centroid with
    itself: 0.5 whatever the image), and an absent entity's color is judged by its count alone, so the sources
    weigh these maps by the entity's color."""
    nouns = [e.noun for e in spec.entities]
    return [e.color if e.color is not None and (nouns.count(e.noun) > 1 or e.count == 0) else None
            for e in spec.entities]


class RewardSource(abc.ABC):
    """Decoded images (and prompt specs) -> the inputs of the rewards.

    Attributes:
        name: the source's name (recorded in rewards and explanations).
        needs_attention: whether it reads ``decoded.token_maps`` (False: the
            backbone may skip attention capture).
    """

    name: str = "source"
    needs_attention: bool = False

    @abc.abstractmethod
    def __call__(self, decoded: Any) -> dict[str, Any]:
        """Keyword arguments for :meth:`xlard.rewards.ExplainableRewards.__call__`.

        Args:
            decoded: a :class:`xlard.backbones.base.Decoded` (``images``,
                ``specs``; ``token_maps`` and ``segment_offsets`` for the
                attention source).

        Returns:
            A dict with ``specs`` and the maps/features of this source.
        """

    def reward_config(self, **overrides: Any) -> RewardConfig:
        """The :class:`RewardConfig` this source's maps are meant to be read with (overrides applied)."""
        return RewardConfig(**overrides)

    def backbone_options(self) -> dict[str, Any]:
        """Keyword arguments for ``DiffusersBackbone.from_pretrained`` that suit this source.

        ``{"capture": False}`` when the source never reads attention (decoding
        then skips the attention hooks), else ``{}``.
        """
        return {} if self.needs_attention else {"capture": False}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class AttentionSource(RewardSource):
    """The backbone's cross-attention maps and color encoder (xlard's original reward inputs).

    Args:
        color_encoder: encodes ``decoded.images`` for the color reward when the
            backbone attached no ``patch_features``; default the backbone's own
            ``color_encoder``, else a :class:`PixelColorEncoder`.
        backbone: optional; its ``color_encoder`` is used when set.
    """

    name = "attention"
    needs_attention = True

    def __init__(self, color_encoder: ColorFeatureEncoder | None = None, backbone: Any = None) -> None:
        backbone_encoder = getattr(backbone, "color_encoder", None)
        if color_encoder is None:
            color_encoder = backbone_encoder
        # decoded.patch_features come from the backbone's encoder: reuse them only when
        # the color embeddings come from that same encoder.
        self._reuse_features = color_encoder is not None and color_encoder is backbone_encoder
        if color_encoder is not None and not isinstance(color_encoder, ColorFeatureEncoder):
            raise ValueError(f"AttentionSource: color_encoder must have encode_images and embed_colors, got "
                             f"{type(color_encoder).__name__}")
        self.color_encoder = color_encoder if color_encoder is not None else PixelColorEncoder()

    def __call__(self, decoded: Any) -> dict[str, Any]:
        images, specs = _decoded_parts(decoded, "attention source")
        maps = getattr(decoded, "token_maps", None)
        if maps is None:
            raise ValueError("attention source: decoded.token_maps is None (the backbone was built with "
                             "capture=False); build it with attention capture, or use the 'shapes'/'clip' source")
        # None when the backbone recorded no offsets: the rewards then read the specs' own alignment
        # (Entity.token_indices); {} made them look every entity up in an empty table and blame the specs
        offsets = getattr(decoded, "segment_offsets", None)
        inputs: dict[str, Any] = {"specs": specs, "token_maps": maps,
                                  "segment_offsets": dict(offsets) if offsets else None}
        features = getattr(decoded, "patch_features", None) if self._reuse_features else None
        inputs["patch_features"] = features if features is not None else self.color_encoder.encode_images(images)
        colors = _batch_colors(specs)
        if colors:
            inputs["color_embeddings"] = dict(zip(colors, self.color_encoder.embed_colors(colors)))
        return inputs


THRESHOLD = 0.5
MIN_AREA = 8
PAINT_PURITY = 0.7
#: The weighed count (``ShapesSource(soft_count=True)``): a found object counts
#: ``min(ramp(mean probability, *SOFT_CONFIDENCE), ramp(color purity, *SOFT_PURITY))``,
#: ``ramp(x, a, b)`` rising from 0 at ``a`` to 1 at ``b`` (set on training-split samples,
#: docs/rewards.md).
SOFT_CONFIDENCE = (0.5, 0.95)
SOFT_PURITY = (0.3, 0.9)


class ShapesSource(RewardSource):
    """The shapes world's dense understanding model as the rewards' eyes.

    Entity maps are the per-pixel probabilities that a pixel is the core of
    an object of the entity's noun ([B, E, 64, 64]); patch features are the
    per-pixel color distributions (background first) on the same grid, and a
    color's embedding is its one-hot vector, so a pixel's color score is
    ``p(color) / ||p||``. Read with :meth:`reward_config`: an absolute 0.5
    threshold (probabilities, not relative attention), a small minimum area
    (cores of small objects) and colors bound to the entity's region.

    Objects of the world are flat and one-colored. A found object (a
    connected component of a noun's map above 0.5) whose pixels the color
    head splits between colors (its most frequent color covering less than
    ``purity`` of its pixels: two-tone blobs, two objects fused into one) is
    not counted as an object of the world: its pixels are zeroed in the map.
    Nor is one whose mean probability is below ``confidence`` (a blob that is
    not clearly that shape). Nor is one whose image pixels are not mostly
    painted in one color of the world's palette (the share of its pixels
    nearest to its most frequent palette color below ``paint_purity``): the
    color head is trained on one-colored objects and tends to call a two-tone
    blob one color, the pixels do not. The cut-offs were set on
    training-split samples. Those checks decide which objects the
    explanations list and where the entity is (position, bound colors).

    The count reward reads a *weighed* count (``soft_count``, the default):
    every found object of at least ``min_area`` pixels counts by how clearly
    it is one object of the noun, ``min(ramp(its mean probability, 0.5, 0.95),
    ramp(its color purity, 0.3, 0.9))`` (``ramp(x, a, b)``: 0 at ``a`` rising
    to 1 at ``b``), and the reward is ``exp(-|sum - n| / n)``: a doubtful
    object is neither counted whole nor dropped whole. Chosen on
    training-split samples over the hard checks (docs/rewards.md).

    Args:
        model: a :class:`xlard.shapes.understanding.ShapesUnderstanding`
            (default: the shipped weights, read from disk once per process; each
            source gets its own copy). A model given here is used as it is (and
            moved in place by ``device``).
        path: a weights folder instead of the shipped one.
        device: where to run (default: the model's device, or the CPU).
        purity: the share of a found object's pixels its main color must
            cover for it to count (0 disables the check).
        confidence: the mean shape probability a found object needs to count
            (0 disables the check).
        paint_purity: the share of a found object's pixels that must be
            nearest (in RGB) to one and the same palette color
            (:data:`xlard.shapes.world.PALETTE`) for it to count (0 disables
            the check).
        threshold: the absolute cut of the maps (objects are the connected
            components above it), for the checks and :meth:`reward_config`.
        min_area: the smallest object (pixels of the 64x64 map) the rewards count.
        count_confidence: weigh the count reward by the weakest counted
            object's mean probability (:meth:`reward_config`; the default
            before the weighed count).
        soft_count: score the weighed count (above) instead of the number
            of objects that pass the checks. ``soft_count=False,
            count_confidence=True`` is the count reward of 2026-12-03 to
            2026-12-06; both False the plain integer count of earlier runs.

    Raises:
        FileNotFoundError: no weights (the message names the training command).
        ValueError: a bad ``model`` or ``purity``.
    """

    name = "shapes"
    needs_attention = False

    def __init__(self, model: Any = None, *, path: str | os.PathLike | None = None, device: Any = None,
                 purity: float = 0.6, confidence: float = 0.7, paint_purity: float = PAINT_PURITY,
                 threshold: float = THRESHOLD, min_area: int = MIN_AREA, count_confidence: bool = False,
                 soft_count: bool = True) -> None:
        from xlard.shapes import understanding

        for label, value in (("purity", purity), ("confidence", confidence), ("paint_purity", paint_purity),
                             ("threshold", threshold)):
            # numbers.Real: a numpy scalar too, as RewardConfig takes
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
                raise ValueError(f"ShapesSource: {label} must be a number in [0, 1], got {value!r}")
        if not 0.0 < threshold < 1.0:  # a cut at 0 or 1 found nothing in any image: one count reward for all
            raise ValueError(f"ShapesSource: threshold must lie strictly between 0 and 1 (a cut on the maps' "
                             f"probabilities), got {threshold!r}")
        if isinstance(min_area, bool) or not isinstance(min_area, numbers.Integral) or min_area < 1:
            raise ValueError(f"ShapesSource: min_area must be an int >= 1, got {min_area!r}")
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"ShapesSource: path must be a weights folder (str or path), got {type(path).__name__}")
        if path is not None and model is not None:  # the path was dropped without a word
            raise ValueError("ShapesSource: give model or path, not both (path loads a model)")
        for label, value in (("count_confidence", count_confidence), ("soft_count", soft_count)):
            if not isinstance(value, bool):
                raise ValueError(f"ShapesSource: {label} must be a bool, got {value!r}")
        self.count_confidence = count_confidence
        self.soft_count = soft_count
        self.purity = float(purity)
        self.confidence = float(confidence)
        self.paint_purity = float(paint_purity)
        self.threshold = float(threshold)
        self.min_area = int(min_area)

        if model is None:  # its own copy of the cached weights: changing one source's model (.double(), training
            import copy  # it) changed every other source of the process

            model = copy.deepcopy(understanding.load_model(path, device or "cpu"))
        elif not isinstance(model, understanding.ShapesUnderstanding):
            raise ValueError(f"ShapesSource: model must be a ShapesUnderstanding, got {type(model).__name__}")
        elif device is not None:
            model = model.to(device)
        self.model = model
        cfg = model.config
        self._noun_index = {noun: k for k, noun in enumerate(cfg.shapes)}
        self._color_embeddings = {c: F.one_hot(torch.tensor(k + 1), 1 + len(cfg.colors)).float()
                                  for k, c in enumerate(cfg.colors)}
        from xlard.shapes.world import PALETTE

        self._palette = torch.tensor([PALETTE[c] for c in cfg.colors], dtype=torch.float32) / 255.0

    def reward_config(self, **overrides: Any) -> RewardConfig:
        """Absolute ``threshold``, components of at least ``min_area`` pixels (of 64x64), colors bound to the entity.

        With ``count_confidence`` the count reward is weighed by the weakest
        counted object's mean probability (with ``soft_count``, the default,
        the source hands the rewards its weighed count instead; docs/rewards.md).
        The weighed count is made with the source's own ``threshold`` and
        ``min_area``: overriding them here changes the components the
        explanations list and place, not the count score (set them on the
        source to change both).
        """
        settings = dict(threshold=self.threshold, threshold_mode="absolute", min_area=self.min_area, bind_color=True,
                        bind_min_coverage=0.5, count_confidence=self.count_confidence)
        settings.update(overrides)
        return RewardConfig(**settings)

    def noun_index(self, noun: str) -> int | None:
        """Index of ``noun`` (singular or plural) in the model's shapes, None when unknown."""
        for form in (noun, singularize(noun)):
            if form in self._noun_index:
                return self._noun_index[form]
        return None

    def drop_mixed_objects(self, maps: torch.Tensor, color_probs: torch.Tensor,
                           images: torch.Tensor | None = None, _components=None) -> torch.Tensor:
        """Zero the found objects whose pixels are not mostly one color (see the class docstring).

        Args:
            maps (Tensor[B, E, H, W]): entity maps (probabilities).
            color_probs (Tensor[B, 1 + C, H, W]): the color head's distributions.
            images (Tensor[B, 3, H, W], optional): the images in [0, 1] at the
                maps' size, for the ``paint_purity`` check (skipped without them).

        Returns:
            The maps with every component (8-connected, > ``threshold``) whose main
            color covers less than ``purity`` of its colored pixels zeroed.

        Raises:
            ValueError: tensors of other shapes, or images outside [0, 1] (0..255 values).
        """
        b, e, h, w = _check_maps_and_colors("ShapesSource.drop_mixed_objects", maps, color_probs)
        if images is not None and (not isinstance(images, torch.Tensor) or not images.is_floating_point()
                                   or tuple(images.shape) != (b, 3, h, w)):
            raise ValueError(f"ShapesSource.drop_mixed_objects: images must be a float tensor [B={b}, 3, H={h}, "
                             f"W={w}] in [0, 1] (the maps' size) or None, got {_described(images)}")
        if images is not None:  # 0..255 pixels were all nearest to white: the paint check passed every object
            _check_unit_range("ShapesSource.drop_mixed_objects", "images", images)
        if maps.numel() == 0:
            return maps
        labels, slot, top, total = _components or self._components(maps, color_probs)
        n_labels = int(labels.max()) + 1
        pure = ((top >= self.purity * total) | (total == 0)).flatten()
        if self.confidence > 0:  # components whose mean probability is low: not clearly this shape
            mean, _ = component_means(maps, labels)
            pure = pure & (mean.flatten() >= self.confidence)
        if self.paint_purity > 0 and images is not None:  # pixels split between palette colors: not one object
            palette = self._palette.to(images.device, images.dtype)
            nearest = torch.cdist(images.flatten(2).transpose(1, 2), palette[None].expand(b, -1, -1)).argmin(-1)
            nearest = nearest.view(b, 1, h, w).expand(b, e, h, w)
            inside = labels > 0
            key = (slot * len(palette) + nearest).masked_select(inside)
            paint = torch.zeros(b * e * n_labels * len(palette), device=maps.device).scatter_add_(
                0, key, torch.ones_like(key, dtype=torch.float32)).view(b * e * n_labels, len(palette))
            pure = pure & (paint.max(-1).values >= self.paint_purity * paint.sum(-1))
        keep = pure[slot.flatten()].view(b, e, h, w) | (labels == 0)
        return torch.where(keep, maps, maps.new_zeros(()))

    def _components(self, maps: torch.Tensor, color_probs: torch.Tensor):
        """``(labels [B, E, H, W] int64, slot [B, E, H, W], top [B, E, L], total [B, E, L])`` of the maps'
        components (8-connected, > ``threshold``, any size; one labelling for the checks and the weighed count):
        ``slot`` numbers each map's labels apart (``(b * E + e) * L + label``); ``total`` counts a component's
        colored pixels (the color head's background below 0.5), ``top`` those of its most frequent color."""
        from xlard import ops

        b, e, h, w = maps.shape
        labels, _ = ops.label_components(maps.float(), threshold=self.threshold, mode="absolute", min_area=1,
                                         connectivity=8)
        labels = labels.long()
        n_labels = int(labels.max()) + 1
        n_colors = color_probs.shape[1] - 1
        color = color_probs[:, 1:].argmax(1)  # [B, H, W]
        colored = (color_probs[:, 0] < 0.5)[:, None].expand(b, e, h, w)
        slot = torch.arange(b * e, device=maps.device).view(b, e, 1, 1) * n_labels + labels
        key = (slot * n_colors + color[:, None]).masked_select(colored & (labels > 0))
        hist = torch.zeros(b * e * n_labels * n_colors, device=maps.device).scatter_add_(
            0, key, torch.ones_like(key, dtype=torch.float32)).view(b * e * n_labels, n_colors)
        return labels, slot, hist.max(-1).values.view(b, e, n_labels), hist.sum(-1).view(b, e, n_labels)

    def weighed_counts(self, maps: torch.Tensor, color_probs: torch.Tensor, _components=None) -> torch.Tensor:
        """The weighed count of each entity map (see the class docstring).

        Args:
            maps (Tensor[B, E, H, W]): entity maps (probabilities), before the checks.
            color_probs (Tensor[B, 1 + C, H, W]): the color head's distributions.

        Returns:
            float32 Tensor[B, E]: the sum over the map's components of at least
            ``min_area`` pixels of ``min(ramp(mean probability), ramp(color purity))``.

        Example:
            >>> source = ShapesSource()                                  # doctest: +SKIP
            >>> out = source.model.predict(images)                       # doctest: +SKIP
            >>> source.weighed_counts(out.shape_probs, out.color_probs)  # doctest: +SKIP
        """
        b, e, h, w = _check_maps_and_colors("ShapesSource.weighed_counts", maps, color_probs)
        if maps.numel() == 0:
            return torch.zeros(b, e, device=maps.device)
        labels, _, top, total = _components or self._components(maps, color_probs)
        share = torch.where(total > 0, top / total.clamp(min=1), torch.ones_like(total))  # none colored: pure
        values = torch.nan_to_num(maps.detach().float(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
        mean, size = component_means(values, labels)

        def ramp(x, bounds):
            lo, hi = bounds
            return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)

        weight = torch.minimum(ramp(mean, SOFT_CONFIDENCE), ramp(share, SOFT_PURITY))
        real = size >= self.min_area  # specks under min_area do not count, as for the rewards' components
        real[..., 0] = False  # background
        return torch.where(real, weight, torch.zeros_like(weight)).sum(-1)

    def unknown_nouns(self, specs: Sequence[PromptSpec]) -> list[str]:
        """The nouns of ``specs`` (sorted, distinct) that are none of the model's shapes: their entities get no
        map (``entity_available`` False)."""
        return sorted({e.noun for s in specs for e in s.entities if self.noun_index(e.noun) is None})

    def __call__(self, decoded: Any) -> dict[str, Any]:
        images, specs = _decoded_parts(decoded, "shapes source")
        unknown = [c for c in _batch_colors(specs) if c not in self._color_embeddings]
        if unknown:
            raise ValueError(f"shapes source: colors {unknown} are not in the shapes world's colors "
                             f"{tuple(self._color_embeddings)}")
        out = self.model.predict(images)
        b, _, h, w = out.shape_probs.shape
        e_max = max([len(s.entities) for s in specs] + [1])
        index = torch.zeros(b, e_max, dtype=torch.int64)
        available = torch.zeros(b, e_max, dtype=torch.bool)
        for i, spec in enumerate(specs):
            for j, entity in enumerate(spec.entities):
                k = self.noun_index(entity.noun)
                if k is not None:
                    index[i, j], available[i, j] = k, True
        index, available = index.to(out.shape_probs.device), available.to(out.shape_probs.device)
        maps = out.shape_probs.gather(1, index[:, :, None, None].expand(b, e_max, h, w))
        maps = torch.where(available[:, :, None, None], maps, maps.new_zeros(()))
        colors_of = list(self.model.config.colors)
        for i, spec in enumerate(specs):  # entities of one noun: each its own color's part of the noun's map
            for j, color in enumerate(_told_apart_by_color(spec)):
                if color is not None and bool(available[i, j]):
                    maps[i, j] = maps[i, j] * out.color_probs[i, 1 + colors_of.index(color)].to(maps.dtype)
        checks = self.purity > 0 or self.confidence > 0 or self.paint_purity > 0
        components = self._components(maps, out.color_probs) if self.soft_count or checks else None
        counts = self.weighed_counts(maps, out.color_probs, components) if self.soft_count else None
        if checks:
            pixels = images.to(maps.device, torch.float32).clamp(0.0, 1.0)
            if tuple(pixels.shape[-2:]) != (h, w):
                pixels = F.interpolate(pixels, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
            maps = self.drop_mixed_objects(maps, out.color_probs, pixels, components)
        features = out.color_probs.flatten(2).transpose(1, 2)  # [B, H*W, 1 + C], row-major pixels
        colors = _batch_colors(specs)
        inputs = {"specs": specs, "entity_maps": maps, "entity_available": available,
                  "patch_features": PatchFeatures(features, (h, w)),
                  # copies: .to() of the same device returned the source's own tensor, and a caller's in-place
                  # edit of it changed every later color score
                  "color_embeddings": {c: self._color_embeddings[c].to(features.device, copy=True)
                                       for c in colors}}
        if counts is not None:
            inputs["entity_counts"] = counts
        return inputs


class ClipSource(RewardSource):
    """Dense CLIP (or SigLIP) maps (MaskCLIP reading) for real backbones.

    Patch features: each patch token's last-layer value path (``v_proj`` then
    ``out_proj`` on the normalized input, no attention mixing), through
    ``post_layernorm`` and ``visual_projection`` into the joint space
    (:class:`xlard.color_features.ClipColorEncoder` with ``dense="values"``;
    a SigLIP model's attention-pooling head, read at each patch, in place of
    ``visual_projection``).
    An entity's map is, per patch, the softmax over the batch prompt's nouns
    and a background prompt of ``logit_scale * cos(patch, text)``; colors
    are scored by the rewards as cosines between patch features and the
    color prompts' text embeddings.

    Args:
        model: a ``transformers.CLIPModel`` or ``SiglipModel``.
        tokenizer: its tokenizer.
        noun_template: text for a noun, with ``{}``.
        color_template: text for a color, with ``{}``.
        background: the text of the background class.
        image_mean, image_std: normalization (default OpenAI CLIP's; SigLIP's
            0.5 / 0.5 for a SigLIP model).
        threshold: the cut on an entity's map (a probability) that makes
            a patch part of an object; read with :meth:`reward_config`.

    Example:
        >>> source = ClipSource.from_pretrained("openai/clip-vit-base-patch16")   # doctest: +SKIP
    """

    name = "clip"
    needs_attention = False

    def __init__(self, model: Any, tokenizer: Any, *, noun_template: str = "a photo of a {}.",
                 color_template: str = "a photo of a {} object", background: str = "a photo of the background.",
                 image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None,
                 threshold: float = 0.5) -> None:
        _check_clip_texts(noun_template, color_template, background)
        self.threshold = check_clip_threshold("ClipSource", threshold)
        self.encoder = ClipColorEncoder(model, tokenizer, template=color_template, image_mean=image_mean,
                                        image_std=image_std, dense="values")
        self.model, self.tokenizer = self.encoder.model, self.encoder.tokenizer  # a CLIPProcessor's tokenizer
        self.noun_template, self.background = noun_template, background
        self._text_cache = EmbeddingCache()

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, *, device: Any = None, dtype: torch.dtype | None = None,
                        **kwargs: Any) -> ClipSource:
        """Load a CLIP or SigLIP checkpoint (hub id or local folder) and its tokenizer; ``kwargs`` go to
        :class:`ClipSource` (``image_mean``/``image_std`` given there replace the checkpoint's image processor
        config)."""
        if "tokenizer" in kwargs:  # was a raw "got multiple values for keyword argument"
            raise ValueError("ClipSource.from_pretrained: the checkpoint's own tokenizer is loaded; tokenizer= goes "
                             "with a loaded CLIPModel or SiglipModel (ClipSource(model, tokenizer))")
        if "threshold" in kwargs:  # before the model loads
            check_clip_threshold("ClipSource", kwargs["threshold"])
        # the texts too: a bad template was found only once the weights (hundreds of MB) had loaded
        defaults = inspect.signature(ClipSource.__init__).parameters
        _check_clip_texts(*(kwargs.get(k, defaults[k].default) for k in ("noun_template", "color_template",
                                                                           "background")))
        encoder = ClipColorEncoder.from_pretrained(str(model), dense="values", device=device, dtype=dtype)
        kwargs.setdefault("image_mean", encoder.image_mean)
        kwargs.setdefault("image_std", encoder.image_std)
        return cls(encoder.model, encoder.tokenizer, **kwargs)

    def reward_config(self, **overrides: Any) -> RewardConfig:
        """An absolute cut at ``threshold`` and colors bound to the entity's own region.

        The maps are probabilities (this noun against the prompt's other nouns
        and the background), so a patch is part of an object when its
        probability passes the cut, whatever the rest of the map holds: a map
        with no such patch counts 0 objects. (The base setting, a cut relative
        to the map's own peak, always found an object, however unlikely.) Each
        entity's color is looked for inside its objects only, so "a red cat
        and a blue dog" does not score a blue cat beside a red dog as right.
        """
        settings = dict(threshold=self.threshold, threshold_mode="absolute", bind_color=True, bind_min_coverage=0.5)
        settings.update(overrides)
        return RewardConfig(**settings)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Projected text embeddings ``[K, D]`` (float32), cached per text and the model's device and dtype."""
        # one text a pass: a batch is padded to its longest text, which moved CLIP's embeddings at 1e-7, so a
        # cached text (and the maps) depended on what the source had embedded before
        new = {t: self.encoder.embed_texts([t], "ClipSource", "noun_template or background")[0]
               for t in self._text_cache.missing(self.model, texts)}
        return self._text_cache.stack(self.model, texts, new)

    @torch.no_grad()  # maps, not a graph: logit_scale is a parameter that requires grad
    def __call__(self, decoded: Any) -> dict[str, Any]:
        images, specs = _decoded_parts(decoded, "clip source")
        patches = self.encoder.encode_images(images)
        features = patches.features  # [B, N, D]
        gh, gw = patches.grid
        b = features.shape[0]
        nouns = sorted({e.noun for s in specs for e in s.entities})
        e_max = max([len(s.entities) for s in specs] + [1])
        maps = features.new_zeros(b, e_max, gh, gw)
        available = torch.zeros(b, e_max, dtype=torch.bool, device=features.device)
        if nouns:
            texts = [self.background] + [self.noun_template.format(n) for n in nouns]
            text = F.normalize(self.embed_texts(texts).to(features.device), dim=-1)
            scale = self.model.logit_scale.exp().float()
            logits = scale * F.normalize(features, dim=-1) @ text.T  # [B, N, 1 + nouns]
            column = {n: 1 + k for k, n in enumerate(nouns)}
            for i, spec in enumerate(specs):
                if not spec.entities:
                    continue
                cols = [0] + sorted({column[e.noun] for e in spec.entities})
                probs = logits[i][:, cols].softmax(-1)  # this prompt's nouns vs background
                apart = _told_apart_by_color(spec)
                gate = None
                if any(c is not None for c in apart):  # entities of one noun: weighed by their colors
                    # over GenEval's ten colors too: a softmax over the prompt's one color ("a red cat left of a
                    # cat") was 1 everywhere, so both cats read one map and the relation scored 0.5 on any image
                    shades = sorted({e.color for e in spec.entities if e.color is not None} | set(GENEVAL_COLORS))
                    shade_text = F.normalize(self.encoder.embed_colors(shades).to(features.device).float(), dim=-1)
                    gate = (scale * F.normalize(features[i].float(), dim=-1) @ shade_text.T).softmax(-1)  # [N, C]
                for j, entity in enumerate(spec.entities):
                    maps[i, j] = probs[:, cols.index(column[entity.noun])].view(gh, gw)
                    if apart[j] is not None:
                        maps[i, j] = maps[i, j] * gate[:, shades.index(apart[j])].view(gh, gw).to(maps.dtype)
                    available[i, j] = True
        colors = _batch_colors(specs)
        inputs: dict[str, Any] = {"specs": specs, "entity_maps": maps, "entity_available": available,
                                  "patch_features": patches}
        if colors:
            inputs["color_embeddings"] = dict(zip(colors, self.encoder.embed_colors(colors)))
        return inputs


def _check_clip_texts(noun_template: Any, color_template: Any, background: Any) -> None:
    """The clip source's texts: templates with one ``{}`` each, a non-empty background."""
    check_template("ClipSource", "noun_template", noun_template, "noun")
    check_template("ClipSource", "color_template", color_template, "color")
    if not isinstance(background, str) or not background.strip():
        raise ValueError(f"ClipSource: background must be a non-empty text, got {background!r}")


def _check_maps_and_colors(who: str, maps: Any, color_probs: Any) -> tuple[int, int, int, int]:
    """``(B, E, H, W)`` of entity maps and the color head's ``[B, 1 + C, H, W]`` distributions that fit them."""
    # the type and dtype in the messages: an integer mask's or a numpy array's shape alone read like a fitting one
    if not isinstance(maps, torch.Tensor) or maps.dim() != 4 or not maps.is_floating_point():
        raise ValueError(f"{who}: maps must be a float tensor [B, E, H, W], got {_described(maps)}")
    b, e, h, w = maps.shape
    if not isinstance(color_probs, torch.Tensor) or color_probs.dim() != 4 or color_probs.shape[1] < 2 \
            or (color_probs.shape[0], *color_probs.shape[2:]) != (b, h, w):
        raise ValueError(f"{who}: color_probs must be a tensor [B={b}, 1 + C, H={h}, W={w}], "
                         f"got {_described(color_probs)}")
    return b, e, h, w


def _is_shapes_backbone(backbone: Any) -> bool:
    """The shapes backbone: the name "shapes", its folder (by path), or a backbone loaded from that folder."""
    if isinstance(backbone, (str, os.PathLike)):
        if str(backbone) == "shapes":
            return True
        where = str(backbone)  # a config's backbone.name may be the folder itself
    else:
        pipeline = getattr(backbone, "pipeline", None)
        where = getattr(pipeline, "name_or_path", None) or getattr(getattr(pipeline, "config", None),
                                                                    "_name_or_path", None)
    if not where:
        return False
    from xlard.shapes import backbone as shapes_backbone

    try:
        return Path(where).resolve() == shapes_backbone.backbone_path().resolve()
    except (OSError, ValueError):  # ValueError: a NUL in the name; not a folder, so not the shapes backbone
        return False


def default_source_for(backbone: Any) -> str:
    """``"shapes"`` for the shapes-world backbone (a loaded one, or the name ``"shapes"``), else ``"attention"``.

    Example:
        >>> default_source_for("shapes"), default_source_for("runwayml/stable-diffusion-v1-5")
        ('shapes', 'attention')
    """
    return "shapes" if _is_shapes_backbone(backbone) else "attention"


#: :class:`ShapesSource`'s settings that :func:`get_source` (and a run's ``reward.options``) pass through.
_SHAPES_SETTINGS = ("purity", "confidence", "paint_purity", "threshold", "min_area", "count_confidence", "soft_count")


#: Settings whose defaults have changed between releases, per source: a run's record writes them out.
_CHANGED_DEFAULTS = {"shapes": ("soft_count", "count_confidence"), "clip": ("threshold",)}


def clip_reading_predates(options: Any) -> bool:
    """Whether ``reward.options`` a run or corrector recorded for the ``clip`` source predate its absolute reading
    (2026-12-07: the maps cut at ``threshold``, colors bound to each entity; before, a cut relative to each map's
    peak and colors from anywhere in the image). Recorded options name ``threshold`` since then; the reading of
    before cannot be rebuilt by any option."""
    return isinstance(options, Mapping) and "threshold" not in options


def check_clip_threshold(who: str, threshold: Any) -> float:
    """The clip source's ``threshold``: a number in (0, 1), a cut on its maps' probabilities."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 < threshold < 1.0:
        raise ValueError(f"{who}: threshold must be a number in (0, 1) (a cut on the maps' probabilities), "
                         f"got {threshold!r}")
    return float(threshold)


def resolved_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with the settings whose defaults have changed between releases written out (the shapes source's
    ``soft_count`` and ``count_confidence``, the clip source's ``threshold``): what a run records, so that the reward
    it optimised can be rebuilt, and a resumed run notices, after those defaults change.

    Example:
        >>> resolved_options("shapes", {"count_confidence": True})
        {'count_confidence': True, 'soft_count': True}
        >>> resolved_options("clip", {"model": "openai/clip-vit-base-patch16"})
        {'model': 'openai/clip-vit-base-patch16', 'threshold': 0.5}
        >>> resolved_options("attention", {})
        {}
    """
    source_options(name)  # a known source name, or a clear error
    if not isinstance(options, Mapping):
        raise ValueError(f"resolved_options: options must be a mapping of {name!r} source options, got "
                         f"{type(options).__name__}")
    out = dict(options)
    parameters = inspect.signature({"shapes": ShapesSource, "clip": ClipSource}.get(name, RewardSource).__init__
                                   ).parameters
    for key in _CHANGED_DEFAULTS.get(name, ()):
        out.setdefault(key, parameters[key].default)
    return out


def get_source(name: str, backbone: Any = None, **options: Any) -> RewardSource:
    """Build a reward source by name.

    Args:
        name: ``"attention"``, ``"shapes"`` or ``"clip"`` (see the module docstring).
        backbone: the backbone the source serves (optional): the attention
            source takes its ``color_encoder``; the others their device.
        **options: per source. attention: ``color_encoder``. shapes:
            ``path`` (a weights folder), ``model``, ``device``, and
            :class:`ShapesSource`'s ``purity``, ``confidence``, ``paint_purity``,
            ``threshold``, ``min_area``, ``count_confidence``, ``soft_count``. clip:
            ``model`` (hub id, local folder, or a loaded ``CLIPModel`` with
            ``tokenizer=``), ``device``, ``dtype``, ``noun_template``,
            ``color_template``, ``background``, ``threshold``.

    Returns:
        A :class:`RewardSource`.

    Raises:
        ValueError: an unknown name or option, or a missing required option.

    Example:
        >>> get_source("attention").name
        'attention'
    """
    if not isinstance(name, str) or name not in SOURCES:
        raise ValueError(f"get_source: unknown source {name!r}; expected one of {SOURCES}")
    unknown = sorted(set(options) - source_options(name))
    if unknown:
        raise ValueError(f"get_source({name!r}): unknown options {unknown}; it takes {sorted(source_options(name))}")
    device = as_device(options.pop("device", None), f"get_source({name!r})") or getattr(backbone, "device", None)
    if name == "attention":
        return AttentionSource(options.get("color_encoder"), backbone=backbone)
    if name == "shapes":
        return ShapesSource(options.get("model"), path=options.get("path"), device=device,
                            **{k: options[k] for k in _SHAPES_SETTINGS if k in options})
    model = options.pop("model", None)
    if model is None:
        raise ValueError("get_source('clip'): pass model= (a CLIP checkpoint id such as "
                         "'openai/clip-vit-base-patch16', a local folder, or a CLIPModel with tokenizer=)")
    tokenizer = options.pop("tokenizer", None)
    if isinstance(model, (str, os.PathLike)):
        if tokenizer is not None:
            raise ValueError("get_source('clip'): tokenizer= goes with a loaded CLIPModel or SiglipModel, not a "
                             "checkpoint id")
        return ClipSource.from_pretrained(model, device=device, dtype=options.pop("dtype", None), **options)
    if not hasattr(model, "vision_model"):  # model=3 was told it "needs tokenizer="
        raise ValueError(f"get_source('clip'): model must be a CLIP checkpoint id, a local folder, or a loaded "
                         f"CLIPModel or SiglipModel, got {type(model).__name__}")
    if tokenizer is None:
        raise ValueError("get_source('clip'): a loaded CLIPModel or SiglipModel needs tokenizer=")
    if isinstance(tokenizer, (str, os.PathLike)) or not callable(tokenizer):  # was a TypeError (ValueError promised)
        raise ValueError(f"get_source('clip'): tokenizer must be the loaded model's tokenizer (e.g. "
                         f"transformers.AutoTokenizer.from_pretrained(...)), got {type(tokenizer).__name__} "
                         f"{tokenizer!r:.60}; a checkpoint id goes in model= (its own tokenizer loads with it)")
    dtype = options.pop("dtype", None)
    if dtype is not None:  # it was dropped without a word
        raise ValueError("get_source('clip'): dtype= goes with a checkpoint id or folder; convert a loaded model "
                         "yourself (model.to(dtype))")
    if device is not None:
        model = model.to(device)
    return ClipSource(model, tokenizer, **options)


def source_options(name: str) -> frozenset[str]:
    """The keyword options :func:`get_source` takes for the source ``name``.

    Raises:
        ValueError: an unknown source name.
    """
    if not isinstance(name, str):
        raise ValueError(f"get_source: a source name must be a string, one of {SOURCES}, got {type(name).__name__}")
    allowed = {"attention": {"color_encoder"},
               "shapes": {"path", "model", "device", *_SHAPES_SETTINGS},
               "clip": {"model", "tokenizer", "device", "dtype", "noun_template", "color_template", "background",
                        "threshold"}}
    if name not in allowed:
        raise ValueError(f"get_source: unknown source {name!r}; expected one of {SOURCES}")
    return frozenset(allowed[name])


def score(decoded: Any, source: RewardSource, rewards: ExplainableRewards | None = None,
          explain: bool = True) -> RewardResult:
    """Judge a decoded batch with a source and the rewards; the result names the source.

    Args:
        decoded: a :class:`xlard.backbones.base.Decoded`.
        source: a :class:`RewardSource` (see :func:`get_source`).
        rewards: the :class:`ExplainableRewards` to apply; default one built
            with ``source.reward_config()``.
        explain: build the per-prompt explanations.

    Returns:
        A :class:`xlard.rewards.RewardResult` with ``source`` set (and each
        explanation's ``source``).

    Raises:
        ValueError: a non-source, a source whose ``name`` is not a str or whose output is not a mapping of the
            rewards' inputs, a shapes source's prompt noun that is none of its model's shapes (unless the
            rewards' ``missing_entity`` is ``"skip"``), or what the source or the rewards raise.
    """
    if not isinstance(source, RewardSource):
        raise ValueError(f"score: source must be a RewardSource (xlard.sources.get_source), got "
                         f"{type(source).__name__}")
    if not isinstance(explain, bool):
        raise ValueError(f"score: explain must be a bool, got {explain!r}")
    who = type(source).__name__
    if not isinstance(source.name, str) or not source.name:  # the result's source was None without a word
        raise ValueError(f"score: {who}.name must be a non-empty str (it names the source in the result), got "
                         f"{source.name!r:.60}")
    if rewards is None:
        rewards = ExplainableRewards(source.reward_config())
    elif not isinstance(rewards, ExplainableRewards):
        raise ValueError(f"score: rewards must be an ExplainableRewards, got {type(rewards).__name__}")
    with torch.no_grad():
        inputs = source(decoded)
        _check_source_inputs(who, inputs, rewards)
        if isinstance(source, ShapesSource) and rewards.config.missing_entity == "error":
            unknown = source.unknown_nouns(inputs.get("specs", ()))
            if unknown:  # named here as unknown colors are (the rewards named only entity_available)
                raise ValueError(f"shapes source: nouns {unknown} are not in the shapes world's shapes "
                                 f"{tuple(source.model.config.shapes)}; to score the prompts without them, pass "
                                 f"rewards=ExplainableRewards(source.reward_config(missing_entity='skip'))")
        return rewards(**inputs, explain=explain, source=source.name)


def _check_source_inputs(who: str, inputs: Any, rewards: ExplainableRewards) -> None:
    """A source's output must be keyword arguments of the rewards that ``score`` does not set itself (a list, or a
    'source' key, failed as a raw TypeError holding the rewards' whole repr)."""
    if not isinstance(inputs, Mapping):
        raise ValueError(f"score: {who}.__call__ must return a mapping of ExplainableRewards keyword arguments "
                         f"(specs, entity_maps or token_maps, ...), got {type(inputs).__name__}")
    parameters = inspect.signature(rewards.__call__).parameters  # a subclass's own, **kwargs taking any key
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    allowed = set(parameters) - {"explain", "source"}
    bad = sorted((k for k in inputs if k in ("explain", "source") or not (takes_any or k in allowed)), key=repr)
    if bad:
        raise ValueError(f"score: {who}.__call__ returned keys {bad}, not ExplainableRewards inputs it may set "
                         f"(score sets explain and source itself); expected some of {sorted(allowed)}")

