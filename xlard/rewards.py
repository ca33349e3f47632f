"""The CMD: xLARD's explainable count, color and position rewards (method.md section 4).

Everything is batched on top of :mod:`xlard.ops`; a batch of prompts of
different shapes (numbers of entities, relations, colors) is padded into the
ops' ``[B, E, ...]`` layouts once (:func:`batch_specs`, Python over the specs'
metadata only), and the maps are never touched by a per-prompt loop.

- **Entity maps.** One spatial map per entity: the mean of the attention maps
  of its noun tokens (:func:`gather_entity_maps`), or given directly.
- **Count** (:func:`count_reward`). Per entity with a target count ``n``:
  threshold the map (relative 0.5 of its max by default, or Otsu / absolute),
  label 8-connected components, drop those under ``min_area`` (1% of the map
  by default), count ``n_hat``; ``r = exp(-|n_hat - n| / n)``. A target of
  zero (an entity asked absent) gives ``r = 1`` when nothing is found, else
  ``exp(-n_hat)``, on an absolute cut or a source's own counts only (a cut
  relative to a map's own peak finds something in any map with mass: there
  such an entity is not scored). With
  ``count_confidence`` (maps of probabilities), ``r`` is multiplied by the
  mean value of the weakest counted component, so that of two images with the
  same count the one whose objects are all clearly the noun scores higher.
  A source may hand over its own counts instead (``entity_counts``, e.g. a
  *weighed* count where each object counts by how sure the source is of it):
  ``n_hat`` is then that number, the components still place and list the
  objects. Averaged over the counted entities.
- **Color** (:func:`color_reward`). Per entity with a color ``c``:
  ``s = max_i cos(f_i, e_c)`` over image patches ``i`` (optionally only those
  inside the entity's component mask: ``bind_color``); averaged over the
  colored entities. Features and embeddings come from a pluggable encoder
  (:mod:`xlard.color_features`).
- **Position** (:func:`position_reward`). Attention-weighted centroid per
  entity; per relation "a is R of b": ``sigmoid(tau (p_a - p_b) . v_R)``,
  averaged over relations. x grows to the right, y downward.
- **Joint** (:func:`joint_reward`). ``sum_k lambda_k r_k`` over the aspects
  present, lambda from a confidence head (renormalized over the present
  aspects) or uniform.

Edge cases, defined once here and pinned by ``tests/test_rewards.py``:

- An aspect the prompt does not ask for (no count, no color, no relation), or
  whose every entry is unscorable, is *absent*: score NaN, ``present`` False,
  weight 0. It is never scored 0. A prompt with no aspect at all has a NaN
  joint reward.
- An empty entity map (all zero / non-positive) or one without a finite
  value (all NaN) means the object was *not found*: it has 0 components, its
  bound color scores 0, and every relation involving it scores 0. Non-finite
  pixels of an otherwise finite map are ignored (background), as in the ops.
- An entity asked absent (count 0: "no blue squares") is judged by its count
  alone: it has no color slot and its relations are masked (not scored); a
  source that reads colors counts only objects of its color.
- An entity whose noun has no token in the maps (a spec without alignment, or
  token indices beyond the maps' T) raises ``ValueError`` by default
  (``missing_entity="error"``); with ``missing_entity="skip"`` its count,
  bound color and relations are left out of the averages (not scored) and the
  explanation says so.

Example (``token_maps`` are maps of the prompt's tokens, so the specs carry token indices: parse with the
tokenizer that made the maps, ``parse("two red circles", tokenizer=pipe.tokenizer)``; here the spec is
written by hand, "circles" being token 3 of "<bos> two red circles <eos>", with a red image and maps
that show two blobs):
    >>> import torch
    >>> from xlard.prompts import Entity, PromptSpec
    >>> from xlard.rewards import ExplainableRewards
    >>> from xlard.color_features import PixelColorEncoder
    >>> specs = [PromptSpec("two red circles", (Entity("circle", 2, "red", token_indices=(3,)),))]
    >>> token_maps = torch.zeros(1, 8, 32, 32)   # [B, T, H, W]
    >>> token_maps[0, 3, 4:12, 4:12] = token_maps[0, 3, 20:28, 20:28] = 1.0
    >>> images = torch.full((1, 3, 32, 32), 0.5)   # gray, with the two blobs red
    >>> images[0, :, 4:12, 4:12] = images[0, :, 20:28, 20:28] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    >>> cmd = ExplainableRewards(color_encoder=PixelColorEncoder())
    >>> result = cmd(specs, token_maps, images=images)
    >>> result.scores, result.present, result.joint
    (tensor([[1.0000, 0.99..., nan]]), tensor([[ True,  True, False]]), tensor([0.99...]))
    >>> print(result.explanations[0].text())
    "two red circles"
      count 1.00: asked for 2 circles, found 2 (at (0.25, 0.25), (0.75, 0.75))
      color 0.99: red circle: red scores 0.99 at patch ...
      position: absent
      joint 1.00 (weights count 0.50, color 0.50)
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from xlard import _args, ops
from xlard._args import check_relative_threshold
from xlard.color_features import ColorFeatureEncoder, PatchFeatures, patch_positions
from xlard.prompts import PromptSpec, pluralize
from xlard.vocab import ASPECTS, GENEVAL_RELATION_NAMES

__all__ = [
    "ASPECTS",
    "RewardConfig",
    "SpecBatch",
    "batch_specs",
    "gather_entity_maps",
    "entity_status",
    "count_scores",
    "count_reward",
    "weakest_component_confidence",
    "component_means",
    "color_reward",
    "bound_patch_mask",
    "position_reward",
    "joint_reward",
    "CountExplanation",
    "ColorExplanation",
    "RelationExplanation",
    "PromptExplanation",
    "RewardResult",
    "ExplainableRewards",
    "STATUS_OK",
    "STATUS_EMPTY",
    "STATUS_NONFINITE",
    "STATUS_MISSING",
    "STATUS_NO_OBJECT",
]

COUNT, COLOR, POSITION = 0, 1, 2

#: Entity map status codes (``RewardResult.entity_status``). ``STATUS_NO_OBJECT``: the map has mass, but no
#: component passes the count's cut (threshold, ``min_area``): no object is counted; the position reward still
#: reads the map's weighted centroid, and the explanation says that no object was counted there.
STATUS_OK, STATUS_EMPTY, STATUS_NONFINITE, STATUS_MISSING, STATUS_NO_OBJECT = 0, 1, 2, 3, 4
_STATUS_NAMES = ("ok", "empty", "nonfinite", "missing", "no_object")

_RELATION_WORDS = GENEVAL_RELATION_NAMES


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


#: Upper bound of ``RewardConfig.max_components``: slots are allocated for every map, and a 64x64 map holds at
#: most 1024 components of 8-connected pixels.
MAX_COMPONENT_SLOTS = 4096


@dataclass(frozen=True)
class RewardConfig:
    """Settings of the three rewards; validated on construction.

    Attributes:
        threshold: the cut of ``threshold_mode`` (relative: fraction of the
            map's max; absolute: a value; ignored by Otsu).
        threshold_mode: "relative" (default), "absolute" or "otsu".
        min_area_fraction: components smaller than this fraction of the map
            (rounded up, at least 1 pixel) are dropped.
        min_area: an absolute minimum area in pixels; overrides the fraction.
        connectivity: 4 or 8.
        max_components: component slots kept for explanations (the count
            itself always covers every component), at most 4096.
        tau: sharpness of the position sigmoid.
        bind_color: look for an entity's color only inside its component mask.
        bind_min_coverage: a patch is inside the mask when at least this
            fraction of it is covered (the best-covered patch always counts,
            so a small object keeps at least one patch).
        aspects: which aspects to compute; the others are absent.
        missing_entity: "error" or "skip" for entities without a map.
        normalize_weights: renormalize lambda over the present aspects.
        count_confidence: multiply each entity's count reward by the mean map
            value of its weakest counted component (1 when none is found);
            for maps of probabilities in [0, 1], so it needs
            ``threshold_mode="absolute"``.
    """

    threshold: float = 0.5
    threshold_mode: str = "relative"
    min_area_fraction: float = 0.01
    min_area: int | None = None
    connectivity: int = 8
    max_components: int = 16
    tau: float = 10.0
    bind_color: bool = False
    bind_min_coverage: float = 0.5
    aspects: tuple[str, ...] = ASPECTS
    missing_entity: str = "error"
    normalize_weights: bool = True
    count_confidence: bool = False

    def __post_init__(self) -> None:
        def finite(name: str, lo: float | None = None, hi: float | None = None) -> None:
            value = getattr(self, name)
            if not _args.is_finite_real(value):  # any real number (numpy's float32 too), finite
                raise ValueError(f"RewardConfig.{name} must be a finite number, got {_args.show(value)}")
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise ValueError(f"RewardConfig.{name} must lie in [{lo}, {hi}], got {value!r}")

        finite("threshold")
        finite("min_area_fraction", 0.0, 1.0)
        finite("tau")
        if not 0 < self.tau <= torch.finfo(torch.float32).max:
            raise ValueError(f"RewardConfig.tau must be > 0 and within float32's range (the position sigmoid's "
                             f"sharpness; a negative one turns every relation around), got {self.tau!r}")
        finite("bind_min_coverage", 0.0, 1.0)
        if self.threshold_mode not in ("relative", "absolute", "otsu"):
            raise ValueError(f"RewardConfig.threshold_mode must be 'relative', 'absolute' or 'otsu', "
                             f"got {self.threshold_mode!r}")
        if self.threshold_mode == "relative":
            check_relative_threshold("RewardConfig.threshold", self.threshold)
        def integer(name: str, high: int) -> bool:
            value = getattr(self, name)
            return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= high

        if self.min_area is not None and not integer("min_area", 2**63 - 1):
            raise ValueError(f"RewardConfig.min_area must be None or an integer in [1, 2**63 - 1], "
                             f"got {self.min_area!r}")
        if not isinstance(self.connectivity, int) or isinstance(self.connectivity, bool) or \
                self.connectivity not in (4, 8):
            raise ValueError(f"RewardConfig.connectivity must be 4 or 8, got {self.connectivity!r}")
        if not integer("max_components", MAX_COMPONENT_SLOTS):
            # slots are allocated per map: 2**31 - 1 asked for 34 GB for one 8x8 map
            raise ValueError(f"RewardConfig.max_components must be an integer in [1, {MAX_COMPONENT_SLOTS}] "
                             f"(component slots kept for explanations; the count covers every component), "
                             f"got {self.max_components!r}")
        if isinstance(self.aspects, (str, bytes)) or not isinstance(self.aspects, (tuple, list)):
            raise ValueError(f"RewardConfig.aspects must be a tuple of names from {ASPECTS}, got {self.aspects!r}")
        aspects = tuple(self.aspects)
        if not set(aspects) <= set(ASPECTS) or len(set(aspects)) != len(aspects):
            raise ValueError(f"RewardConfig.aspects must be distinct names from {ASPECTS}, got {self.aspects!r}")
        object.__setattr__(self, "aspects", aspects)
        if self.missing_entity not in ("error", "skip"):
            raise ValueError(f"RewardConfig.missing_entity must be 'error' or 'skip', got {self.missing_entity!r}")
        for name in ("count_confidence", "normalize_weights"):  # "no" normalized, a string is truthy
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"RewardConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.bind_color, bool):  # "false" turned binding on
            raise ValueError(f"RewardConfig.bind_color must be a bool, got {self.bind_color!r}")
        if self.count_confidence and self.threshold_mode != "absolute":
            raise ValueError("RewardConfig.count_confidence needs maps of probabilities and "
                             f"threshold_mode='absolute', got threshold_mode={self.threshold_mode!r}")

    def min_area_for(self, height: int, width: int) -> int:
        """The minimum component area in pixels for an ``height x width`` map."""
        if self.min_area is not None:
            return self.min_area
        return max(1, math.ceil(self.min_area_fraction * height * width - 1e-9))

    def component_args(self, height: int, width: int) -> dict[str, Any]:
        """Keyword arguments of ``xlard.ops.component_stats`` / ``label_components``."""
        return dict(threshold=self.threshold, mode=self.threshold_mode, min_area=self.min_area_for(height, width),
                    connectivity=self.connectivity)


# ---------------------------------------------------------------------------
# Batching prompt specs
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecBatch:
    """A batch of prompt specs as padded index tensors (all on one device).

    Attributes:
        specs: the specs.
        token_index (int64 [B, E, L]): each entity's noun token indices (padded with 0).
        token_mask (bool [B, E, L]): which of them are real.
        entity_mask (bool [B, E]): which entity slots are real.
        count_target (int64 [B, E]): target counts, -1 for none (or padding).
        color_vocab: the distinct color names of the batch, sorted.
        color_slot (int64 [B, E]): index into ``color_vocab``, -1 for none.
        relations (int64 [B, R, 3]): rows (subject, object, code), padding (0, 0, 0).
        relation_mask (bool [B, R]): which rows are real and scored (a row with an entity asked absent is not).
        aspect_mask (bool [B, 3]): each spec's :meth:`PromptSpec.aspect_mask`; an entity asked absent
            (count 0: "no red squares") has no color slot and takes part in no scored relation: an absent object
            can have neither a wrong color nor a wrong place (the image holding a blue square scored better on
            "a red circle and no blue squares" than the one without).
    """

    specs: tuple[PromptSpec, ...]
    token_index: torch.Tensor
    token_mask: torch.Tensor
    entity_mask: torch.Tensor
    count_target: torch.Tensor
    color_vocab: tuple[str, ...]
    color_slot: torch.Tensor
    relations: torch.Tensor
    relation_mask: torch.Tensor
    aspect_mask: torch.Tensor

    @property
    def size(self) -> int:
        return len(self.specs)

    @property
    def max_entities(self) -> int:
        return self.entity_mask.shape[1]

    def to(self, device: torch.device | str) -> SpecBatch:
        """The same batch with every tensor on ``device``."""
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return SpecBatch(**moved)


def batch_specs(
    specs: Sequence[PromptSpec],
    *,
    encoder: str | None = None,
    segment_offsets: Mapping[str, int] | None = None,
) -> SpecBatch:
    """Pad a batch of specs into index tensors (on the CPU).

    Entity and relation slots are padded to the batch's maxima (at least one
    of each, so shapes never have a zero-size dimension).

    Args:
        specs: the prompt specs.
        encoder: take noun tokens from this encoder's alignment
            (:meth:`PromptSpec.token_indices_for`); default the primary one
            (``Entity.token_indices``).
        segment_offsets: take them from a concatenated multi-encoder sequence
            instead (:meth:`PromptSpec.sequence_token_indices`, e.g. SD3).

    Returns:
        A :class:`SpecBatch`.

    Raises:
        ValueError: a non-spec item, or both ``encoder`` and ``segment_offsets``.
    """
    specs = tuple(specs)
    for i, spec in enumerate(specs):
        if not isinstance(spec, PromptSpec):
            raise ValueError(f"batch_specs: item {i} must be a PromptSpec, got {type(spec).__name__}")
    if encoder is not None and segment_offsets is not None:
        raise ValueError("batch_specs: pass encoder or segment_offsets, not both")
    if segment_offsets is not None and not isinstance(segment_offsets, Mapping):
        raise ValueError(f"segment_offsets must map tokenizer names to offsets ({{'tokenizer': 0, ...}}: "
                         f"Decoded.segment_offsets), got {type(segment_offsets).__name__}")
    tokens: list[tuple[tuple[int, ...], ...]] = []
    for spec in specs:
        if segment_offsets is not None:
            tokens.append(spec.sequence_token_indices(segment_offsets))
        elif encoder is not None:
            tokens.append(spec.token_indices_for(encoder))
        else:
            tokens.append(tuple(e.token_indices for e in spec.entities))
    b = len(specs)
    e_max = max([len(s.entities) for s in specs] + [1])
    r_max = max([len(s.relations) for s in specs] + [1])
    l_max = max([len(t) for ts in tokens for t in ts] + [1])
    token_index = torch.zeros(b, e_max, l_max, dtype=torch.int64)
    token_mask = torch.zeros(b, e_max, l_max, dtype=torch.bool)
    entity_mask = torch.zeros(b, e_max, dtype=torch.bool)
    count_target = torch.full((b, e_max), -1, dtype=torch.int64)
    color_vocab = tuple(sorted({e.color for s in specs for e in s.entities if e.color is not None and e.count != 0}))
    color_code = {c: k for k, c in enumerate(color_vocab)}
    color_slot = torch.full((b, e_max), -1, dtype=torch.int64)
    relations = torch.zeros(b, r_max, 3, dtype=torch.int64)
    relation_mask = torch.zeros(b, r_max, dtype=torch.bool)
    aspect_mask = torch.zeros(b, 3, dtype=torch.bool)
    for i, spec in enumerate(specs):
        for j, entity in enumerate(spec.entities):
            entity_mask[i, j] = True
            idx = tokens[i][j]
            if idx:
                token_index[i, j, : len(idx)] = torch.tensor(idx, dtype=torch.int64)
                token_mask[i, j, : len(idx)] = True
            if entity.count is not None:
                count_target[i, j] = entity.count
            if entity.color is not None and entity.count != 0:
                color_slot[i, j] = color_code[entity.color]
        rows = spec.relation_rows()
        if rows:  # (every row, so that row r stays the spec's relation r; one with an absent entity is masked)
            relations[i, : len(rows)] = torch.tensor(rows, dtype=torch.int64)
            relation_mask[i, : len(rows)] = torch.tensor([spec.places(r) for r in spec.relations])
        aspect_mask[i] = torch.tensor(spec.aspect_mask())
    return SpecBatch(specs, token_index, token_mask, entity_mask, count_target, color_vocab, color_slot,
                     relations, relation_mask, aspect_mask)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shape_and_dtype(t) -> str:
    """A refused map argument in an error: its shape and dtype (an integer or bool mask of the right shape is
    refused for its dtype, which the message must say), or its type."""
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    hint = " (maps are probabilities or scores: pass mask.float())" if not t.is_floating_point() else ""
    return f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}{hint}"


def gather_entity_maps(
    token_maps: torch.Tensor,
    batch: SpecBatch,
    *,
    missing_entity: str = "error",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average each entity's noun-token maps into one map per entity.

    Args:
        token_maps (Tensor[B, T, H, W]): one spatial attention map per text
            token (the indices of ``batch`` index T), any float dtype/device.
        batch: the specs, from :func:`batch_specs`.
        missing_entity: "error" raises for an entity with no usable token;
            "skip" marks it unavailable.

    Returns:
        (entity_maps float32 [B, E, H, W] (float64 for float64 maps),
        available bool [B, E]): unavailable and padded slots hold zeros. A
        non-finite value in any of an entity's tokens makes that pixel
        non-finite (background for every op).

    Raises:
        ValueError: bad shapes; with ``missing_entity="error"``, an entity with
            no token indices or an index >= T, naming the prompt and the entity.

    Example:
        >>> import torch
        >>> from xlard.prompts import Entity, PromptSpec
        >>> from xlard.rewards import batch_specs, gather_entity_maps
        >>> cat, dog = Entity("cat", 1, token_indices=(2,)), Entity("dog", 1, token_indices=(5,))
        >>> spec = PromptSpec("a cat and a dog", (cat, dog))   # "<bos> a cat and a dog <eos>"
        >>> maps, available = gather_entity_maps(torch.rand(2, 77, 32, 32), batch_specs([spec, spec]))
        >>> maps.shape, available
        (torch.Size([2, 2, 32, 32]), tensor([[True, True], [True, True]]))
    """
    if not isinstance(token_maps, torch.Tensor) or token_maps.dim() != 4 or not token_maps.is_floating_point() \
            or token_maps.shape[-2] < 1 or token_maps.shape[-1] < 1:  # a 0 x 0 map was scored "found 0"
        raise ValueError(f"gather_entity_maps: token_maps must be a float tensor [B, T, H, W] with H, W >= 1, got "
                         f"{_shape_and_dtype(token_maps)}")
    if token_maps.shape[0] != batch.size:
        raise ValueError(f"gather_entity_maps: token_maps has batch {token_maps.shape[0]}, specs {batch.size}")
    if missing_entity not in ("error", "skip"):
        raise ValueError(f"gather_entity_maps: missing_entity must be 'error' or 'skip', got {missing_entity!r}")
    b, t, h, w = token_maps.shape
    index, mask = batch.token_index.cpu(), batch.token_mask.cpu()
    in_range = mask & (index < t)
    available = batch.entity_mask.cpu() & mask.any(-1) & (in_range == mask).all(-1)
    unusable = batch.entity_mask.cpu() & ~available
    if missing_entity == "error" and bool(unusable.any()):
        i, j = (int(v) for v in unusable.nonzero()[0])
        spec = batch.specs[i]
        have = tuple(int(k) for k in index[i, j][mask[i, j]])
        why = (f"token indices {have} reach beyond the maps' {t} tokens" if have else
               "has no token indices (the spec is not aligned to a tokenizer)")
        raise ValueError(
            f"entity {j} ({spec.entities[j].noun!r}) of prompt {spec.prompt!r} {why}; align the specs with "
            "the tokenizer that produced the maps (xlard.prompts.parse/from_geneval(..., tokenizer=) or "
            "xlard.prompts.align), pass entity_maps directly, or use missing_entity='skip'"
        )
    use = (in_range & available.unsqueeze(-1)).to(token_maps.device)
    index = torch.where(use, index.to(token_maps.device), 0)
    rows = torch.arange(b, device=token_maps.device).view(b, 1, 1)
    picked = token_maps[rows, index].to(_acc_dtype(token_maps.dtype))  # [B, E, L, H, W]
    total = torch.where(use[..., None, None], picked, picked.new_zeros(())).sum(2)
    entity_maps = total / use.sum(-1).clamp(min=1)[..., None, None].to(total.dtype)
    return entity_maps, available.to(token_maps.device)


_KINDS = {"float": ("a float", lambda t: t.is_floating_point()),
          "integer": ("an integer", lambda t: not t.is_floating_point() and not t.is_complex()
                      and t.dtype != torch.bool),
          "bool": ("a bool", lambda t: t.dtype == torch.bool),
          "real": ("a real (integer or float)", lambda t: not t.is_complex() and t.dtype != torch.bool)}


def _tensor_arg(owner: str, name: str, t, kind: str, dims: str, shape: tuple | None = None) -> torch.Tensor:
    """``t`` if it is a tensor of ``kind`` with ``len(dims.split(','))`` dimensions (and ``shape`` when given, -1
    for any size), else a ValueError naming ``owner``'s ``name``, what it must be and what came (these helpers
    failed inside torch, or silently used the first rows of a tensor of another shape)."""
    want_rank = len(dims.split(","))
    label, ok = _KINDS[kind]
    wanted = f"{label} tensor [{dims}]"
    if shape is not None:
        wanted += f" of shape {[s if s >= 0 else d.strip() for s, d in zip(shape, dims.split(','))]}"
    if not isinstance(t, torch.Tensor) or not ok(t) or t.dim() != want_rank or (
            shape is not None and any(s >= 0 and s != n for s, n in zip(shape, t.shape))):
        got = (f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}" if isinstance(t, torch.Tensor)
               else type(t).__name__)
        raise ValueError(f"{owner}: {name} must be {wanted}, got {got}")
    return t


def _maps_arg(owner: str, entity_maps) -> torch.Tensor:
    """:func:`_tensor_arg` for entity maps [B, E, H, W] that also refuses H or W = 0: a map without pixels holds
    no object, and its count was scored as "found 0" (``gather_entity_maps`` and ``ExplainableRewards`` refuse
    such maps for that reason)."""
    _tensor_arg(owner, "entity_maps", entity_maps, "float", "B, E, H, W")
    if entity_maps.shape[2] < 1 or entity_maps.shape[3] < 1:
        raise ValueError(f"{owner}: entity_maps must be a float tensor [B, E, H, W] with H, W >= 1 (a map without "
                         f"pixels holds no object), got {_shape_and_dtype(entity_maps)}")
    return entity_maps


def _config_arg(owner: str, config) -> "RewardConfig":
    if config is None:
        return RewardConfig()
    if not isinstance(config, RewardConfig):
        raise TypeError(f"{owner}: config must be a RewardConfig or None, got {type(config).__name__}")
    return config


def entity_status(entity_maps: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """Status code per entity map: ok, empty, nonfinite or missing (``STATUS_*``).

    Args:
        entity_maps (Tensor[B, E, H, W]): the maps.
        available (bool [B, E]): whether each entity has a map.

    Returns:
        int64 [B, E]: ``STATUS_OK`` when the map has positive finite mass;
        ``STATUS_NONFINITE`` when it has none and contains NaN/inf;
        ``STATUS_EMPTY`` when it has none otherwise (all zero or negative);
        ``STATUS_MISSING`` when unavailable.
    """
    _tensor_arg("entity_status", "entity_maps", entity_maps, "float", "B, E, H, W")
    _tensor_arg("entity_status", "available", available, "bool", "B, E", tuple(entity_maps.shape[:2]))
    finite = torch.isfinite(entity_maps)
    mass = torch.where(finite, entity_maps.clamp(min=0), entity_maps.new_zeros(())).sum((-2, -1))
    nonfinite = (~finite).any(-1).any(-1)
    status = torch.where(mass > 0, STATUS_OK, torch.where(nonfinite, STATUS_NONFINITE, STATUS_EMPTY))
    return torch.where(available, status, STATUS_MISSING).to(torch.int64)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` along the last dim; NaN where the mask is empty."""
    count = mask.sum(-1)
    total = torch.where(mask, values, values.new_zeros(())).sum(-1)
    mean = total / count.clamp(min=1).to(values.dtype)
    return torch.where(count > 0, mean, torch.full_like(mean, float("nan")))


# ---------------------------------------------------------------------------
# The three rewards, at the tensor level
# ---------------------------------------------------------------------------


def count_scores(found: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-entity count reward from found and target counts.

    ``exp(-|found - target| / target)`` for ``target > 0``; for a target of
    zero, 1 when nothing is found, else ``exp(-found)``.

    Args:
        found (Tensor[...], integer or float): counted components (finite,
            >= 0; a source's weighed count may be fractional).
        target (Tensor[...], integer, same shape): asked counts (finite, >= 0).

    Returns:
        float32 Tensor[...] in (0, 1].

    Example:
        >>> import torch
        >>> from xlard.rewards import count_scores
        >>> count_scores(torch.tensor([2, 0, 3]), torch.tensor([3, 0, 0]))
        tensor([0.7165, 1.0000, 0.0498])
    """
    for name, t in (("found", found), ("target", target)):
        if not isinstance(t, torch.Tensor) or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"count_scores: {name} must be a real (integer or float) tensor, got "
                             f"{_shape_and_dtype(t)}")
    if tuple(target.shape) != tuple(found.shape):
        raise ValueError(f"count_scores: target must have found's shape {list(found.shape)}, got "
                         f"{list(target.shape)}")
    for name, t, what in (("found", found, "counted objects"), ("target", target, "asked counts")):
        # one host read per tensor (a hot path: every reward call); the reason is looked up only on a failure.
        # "not >= 0" is true for NaN too (a NaN target slipped past "< 0"); inf is caught apart
        if t.numel() and not bool(((t >= 0) & (t < float("inf"))).all()):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"count_scores: {name} must be finite and >= 0 ({what}), got NaN or inf")
            raise ValueError(f"count_scores: {name} must be >= 0 ({what}), got a negative one "  # -1 scored 2.72
                             f"({_args.show(float(t.min()))})")
    found = found.to(torch.float32)
    target = target.to(torch.float32)
    positive = torch.exp(-(found - target).abs() / target.clamp(min=1.0))
    return torch.where(target > 0, positive, torch.exp(-found))


def count_reward(
    entity_maps: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    config: RewardConfig | None = None,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Count reward per batch item from entity maps.

    Args:
        entity_maps (Tensor[B, E, H, W]): one map per entity.
        targets (int64 [B, E]): target counts; negative = no target.
        mask (bool [B, E], optional): which entities may be scored (default all).
        config: thresholds, connectivity, minimum area.
        counts (Tensor[B, E], optional): the numbers of objects to score
            instead of the components counted (finite, >= 0; a source's weighed
            count may be fractional); the components still give ``found``,
            areas and centroids.

    Returns:
        (reward float32 [B] (NaN where no entity is counted), details) with
        details ``found`` int32 [B, E], ``areas`` int32 [B, E, K],
        ``centroids`` float32 [B, E, K, 2] (largest components first),
        ``entity_reward`` float32 [B, E], ``counted`` bool [B, E] and
        ``unjudged`` bool [B, E] (``weighed`` float32 [B, E] too when ``counts``
        are given). An entity asked absent (target 0) is judged only with
        ``threshold_mode="absolute"`` or ``counts``: a relative or Otsu cut finds
        a component in any map with mass, so there it is ``unjudged`` and not
        counted.
    """
    config = _config_arg("count_reward", config)
    _maps_arg("count_reward", entity_maps)
    _tensor_arg("count_reward", "targets", targets, "integer", "B, E", tuple(entity_maps.shape[:2]))
    if mask is not None:
        _tensor_arg("count_reward", "mask", mask, "bool", "B, E", tuple(entity_maps.shape[:2]))
    if counts is not None:
        _check_counts("count_reward", "counts", counts, tuple(entity_maps.shape[:2]))
    h, w = entity_maps.shape[-2:]
    found, areas, centroids = ops.component_stats(
        entity_maps, max_components=config.max_components, **config.component_args(h, w)
    )
    counted = targets >= 0
    if mask is not None:
        counted = counted & mask
    # A map cut relative to its own peak (or by Otsu) always yields a component where it has any mass, and
    # attention maps always have some: "no circles" scored e^-1 on every image, whatever it held. Absence is
    # judged only on an absolute cut (or on a source's own counts); elsewhere such an entity is left unscored.
    unjudged = counted & (targets == 0) if counts is None and config.threshold_mode != "absolute" \
        else torch.zeros_like(counted)
    counted = counted & ~unjudged
    details = dict(found=found, areas=areas, centroids=centroids, counted=counted, unjudged=unjudged)
    if counts is not None:
        weighed = counts.detach().to(device=found.device, dtype=torch.float32)
        entity_reward = count_scores(weighed, targets.clamp(min=0))
        details["weighed"] = weighed
    else:
        entity_reward = count_scores(found, targets.clamp(min=0))
    if config.count_confidence:
        confidence = weakest_component_confidence(entity_maps, config)
        entity_reward = entity_reward * confidence
        details["confidence"] = confidence
    reward = _masked_mean(entity_reward, counted)
    return reward, dict(details, entity_reward=entity_reward)


def _check_counts(owner: str, name: str, counts, shape: tuple) -> None:
    """Counts handed over by a source: a real tensor of ``shape``, finite and >= 0 (NaN or a negative count
    scored silently)."""
    _tensor_arg(owner, name, counts, "real", "B, E", shape)
    if counts.numel():
        lo, hi = (float(v) for v in torch.aminmax(counts.detach().double()))
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0:
            raise ValueError(f"{owner}: {name} must be finite numbers >= 0 (objects counted), got values in "
                             f"[{lo:g}, {hi:g}]")


def weakest_component_confidence(entity_maps: torch.Tensor, config: RewardConfig | None = None) -> torch.Tensor:
    """Mean map value of each map's weakest counted component.

    The components are those :func:`count_reward` counts (``config``'s
    threshold, connectivity and minimum area); a component's confidence is the
    mean of the map over its pixels, clamped to [0, 1].

    Args:
        entity_maps (Tensor[B, E, H, W]): maps of probabilities.
        config: thresholds, connectivity, minimum area.

    Returns:
        float32 Tensor[B, E]: the smallest component mean; 1 where no component
        is found (nothing found is judged by the count alone).

    Example:
        >>> import torch
        >>> from xlard.rewards import RewardConfig, weakest_component_confidence
        >>> maps = torch.zeros(1, 1, 8, 8); maps[0, 0, :2, :2] = 0.9; maps[0, 0, 5:, 5:] = 0.6
        >>> weakest_component_confidence(maps, RewardConfig(threshold_mode="absolute", min_area=1))
        tensor([[0.6000]])
    """
    config = _config_arg("weakest_component_confidence", config)
    _maps_arg("weakest_component_confidence", entity_maps)
    h, w = entity_maps.shape[-2:]
    labels, counts = ops.label_components(entity_maps, **config.component_args(h, w))
    values = torch.nan_to_num(entity_maps.detach().float(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
    mean, size = component_means(values, labels)
    real = size > 0
    real[..., 0] = False  # background
    weakest = torch.where(real, mean, torch.full_like(mean, float("inf"))).min(-1).values
    return torch.where(counts.to(labels.device) > 0, weakest, torch.ones_like(weakest))


def component_means(values: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``values`` over each labelled component, per map.

    Args:
        values (Tensor[B, E, H, W]): what to average.
        labels (integer Tensor[B, E, H, W]): component labels (0 = background),
            e.g. from :func:`xlard.ops.label_components`.

    Returns:
        (mean float32 [B, E, L], size float32 [B, E, L]) with ``L = labels.max() + 1``:
        slot ``k`` holds label ``k`` of that map (slot 0 the background); a label
        a map does not have has size 0 and mean 0.
    """
    _tensor_arg("component_means", "labels", labels, "integer", "B, E, H, W")
    _tensor_arg("component_means", "values", values, "real", "B, E, H, W", tuple(labels.shape))
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= 1 << 31):
        raise ValueError(f"component_means: labels must be component labels in [0, 2**31) (0 = background), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    b, e = labels.shape[:2]
    labels = labels.long()
    n_labels = int(labels.max()) + 1 if labels.numel() else 1
    slot = (torch.arange(b * e, device=labels.device).view(b, e, 1, 1) * n_labels + labels).flatten()
    mass = torch.zeros(b * e * n_labels, device=labels.device).scatter_add_(0, slot, values.float().flatten())
    size = torch.zeros(b * e * n_labels, device=labels.device).scatter_add_(
        0, slot, torch.ones(slot.numel(), device=labels.device))
    return (mass / size.clamp(min=1)).view(b, e, n_labels), size.view(b, e, n_labels)


def bound_patch_mask(
    entity_maps: torch.Tensor,
    grid: tuple[int, int],
    config: RewardConfig | None = None,
) -> torch.Tensor:
    """Patches inside each entity's component mask (binding a color to its object).

    The kept components of each map (same threshold and minimum area as the
    count) are pooled onto the ``(gh, gw)`` patch grid; a patch is inside when
    its covered fraction reaches ``config.bind_min_coverage`` or is the best
    coverage of that entity (so a small object keeps at least one patch).

    Returns:
        bool [B, E, gh * gw] (row-major); all False for an entity with no component.
    """
    config = _config_arg("bound_patch_mask", config)
    _maps_arg("bound_patch_mask", entity_maps)
    if not isinstance(grid, (tuple, list)) or len(grid) != 2 or not all(
            isinstance(g, numbers.Integral) and not isinstance(g, bool) and g >= 1 for g in grid):
        raise ValueError(f"bound_patch_mask: grid must be (gh, gw), two ints >= 1, got {grid!r}")
    h, w = entity_maps.shape[-2:]
    b, e = entity_maps.shape[:2]
    if b * e == 0:  # no maps: nothing to pool (the reshape below cannot size an empty batch)
        return torch.zeros(b, e, grid[0] * grid[1], dtype=torch.bool, device=entity_maps.device)
    labels, _ = ops.label_components(entity_maps, **config.component_args(h, w))
    cover = F.adaptive_avg_pool2d((labels > 0).float().reshape(b * e, 1, h, w), grid).reshape(b, e, -1)
    best = cover.amax(-1, keepdim=True)
    return (cover > 0) & (cover >= torch.clamp(best, max=config.bind_min_coverage))


def color_reward(
    patch_features: torch.Tensor,
    color_embeddings: torch.Tensor,
    mask: torch.Tensor,
    patch_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Color reward: mean over color slots of the best patch's cosine similarity.

    Args:
        patch_features (Tensor[B, N, D]): image patch features.
        color_embeddings (Tensor[B, C, D] or [C, D]): one embedding per color slot.
        mask (bool [B, C]): which slots are real and scored.
        patch_mask (bool [B, C, N], optional): allowed patches per slot.

    Returns:
        (reward float32 [B] (NaN where no slot is scored), slot scores float32
        [B, C] (0 for a slot without an allowed patch), best patch int64 [B, C]
        (-1 for none)).
    """
    scores, index = ops.color_scores(patch_features, color_embeddings, patch_mask)
    scores = scores.to(torch.float32)
    _tensor_arg("color_reward", "mask", mask, "bool", "B, C", tuple(scores.shape))
    return _masked_mean(scores, mask), scores, index


def position_reward(
    centroids: torch.Tensor,
    relations: torch.Tensor,
    mask: torch.Tensor,
    tau: float = 10.0,
    located: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position reward from entity centroids: mean over relations of the sigmoid score.

    Args:
        centroids (Tensor[B, E, 2]): (x, y) per entity, y downward.
        relations (int64 [B, R, 3] or [R, 3]): rows (a, b, code), "entity a is
            <code> of entity b"; ``[R, 3]`` holds for every batch item.
        mask (bool [B, R]): which rows are real and scored.
        tau: sharpness.
        located (bool [B, E], optional): entities actually found; a relation
            with an entity not found scores 0.

    Returns:
        (reward float32 [B] (NaN where no relation is scored), per-relation
        scores float32 [B, R]). Differentiable in ``centroids``.
    """
    scores = ops.position_scores(centroids, relations, tau).to(torch.float32)
    _tensor_arg("position_reward", "mask", mask, "bool", "B, R", tuple(scores.shape))
    if located is not None:
        _tensor_arg("position_reward", "located", located, "bool", "B, E", tuple(centroids.shape[:2]))
        rows = relations if relations.dim() == 3 else relations.expand(centroids.shape[0], *relations.shape)
        both = located.gather(1, rows[..., 0]) & located.gather(1, rows[..., 1])
        scores = torch.where(both, scores, scores.new_zeros(()))
    return _masked_mean(scores, mask), scores


def joint_reward(
    scores: torch.Tensor,
    present: torch.Tensor,
    weights: torch.Tensor | None = None,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint reward ``sum_k lambda_k r_k`` over the present aspects.

    Args:
        scores (Tensor[B, 3]): count, color, position rewards (NaN where absent).
        present (bool [B, 3]): which aspects each prompt has.
        weights (Tensor[B, 3], optional): non-negative lambdas (a confidence
            head's output); default uniform over the present aspects.
        normalize: rescale the present weights to sum to 1 (so the joint
            reward stays in the sub-rewards' range whatever the prompt asks).

    Returns:
        (joint [B] (NaN where no aspect is present), effective weights [B, 3]
        (0 on absent aspects)).

    Raises:
        ValueError: weights of the wrong shape, non-finite or negative, or
            summing to 0 over a prompt's present aspects when normalizing.
    """
    _tensor_arg("joint_reward", "scores", scores, "float", "B, 3", (-1, 3))
    _tensor_arg("joint_reward", "present", present, "bool", "B, 3", tuple(scores.shape))
    if weights is None:
        weights = present.to(scores.dtype)
    else:
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != tuple(scores.shape):
            raise ValueError(f"joint_reward: weights must be a tensor of shape {tuple(scores.shape)}, "
                             f"got {getattr(weights, 'shape', type(weights).__name__)}")
        if not weights.is_floating_point():  # integer or bool weights: exact in float64
            weights = weights.to(torch.float64)
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            # checked in the caller's dtype (1e300 is finite in float64, not in the scores' float32)
            raise ValueError("joint_reward: weights must be finite and non-negative (e.g. a softmax output)")
        if normalize:  # scaled by each row's largest present weight first: 3e38 + 3e38 overflowed to inf, every
            # weight 0 (only present aspects count: a huge absent one would push the present ones to 0)
            weights = torch.where(present.to(weights.device), weights, weights.new_zeros(()))
            peak = weights.amax(-1, keepdim=True)
            weights = weights / torch.where(peak > 0, peak, torch.ones_like(peak))
        weights = weights.to(device=scores.device, dtype=scores.dtype)
        if not bool(torch.isfinite(weights).all()):
            raise ValueError(f"joint_reward: weights beyond the range of the scores' {scores.dtype} (with "
                             "normalize=False they are used as given)")
    weights = torch.where(present, weights, weights.new_zeros(()))
    total = weights.sum(-1, keepdim=True)
    any_present = present.any(-1)
    if normalize:
        if bool((any_present & (total.squeeze(-1) <= 0)).any()):
            raise ValueError("joint_reward: the weights of some prompt's present aspects sum to 0")
        weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    joint = (weights * torch.where(present, scores, scores.new_zeros(()))).sum(-1)
    return torch.where(any_present, joint, torch.full_like(joint, float("nan"))), weights


# ---------------------------------------------------------------------------
# Explanations
# ---------------------------------------------------------------------------

Point = tuple[float, float]


def _pt(p: Point | None) -> str:
    return "(?)" if p is None else f"({p[0]:.2f}, {p[1]:.2f})"


def _noun_form(noun: str, count: int | None) -> str:
    return noun if count == 1 else pluralize(noun)


_STATUS_TEXT = {"empty": "empty map", "nonfinite": "map has no positive finite value and holds NaN or inf",
                "no_object": "no region of the map passes the cut"}
_MAX_LISTED = 6


@dataclass(frozen=True)
class CountExplanation:
    """What the count reward found for one entity.

    Attributes:
        entity: index into the spec's entities.
        noun: the entity's noun.
        asked: the target count.
        found: components counted; None when not scored (no map).
        reward: the entity's count reward; None when not scored.
        centroids: (x, y) of the largest components (up to ``max_components``),
            largest first, x right and y down in [0, 1].
        areas: their areas as fractions of the map.
        status: "ok", "empty", "nonfinite", "missing" (see :func:`entity_status`), "unjudged" (asked absent, on
            maps cut relative to their peak: see :func:`count_reward`) or "no_object" (mass, but no
            component passes the cut).
        confidence: the mean map value of the weakest counted component, when
            the reward weighs the count by it (``RewardConfig.count_confidence``).
        weighed: the number the reward scored when the source handed over its
            own counts (``entity_counts``: each object weighed by how sure the
            source is of it), else None.
        color: for an entity asked absent with a color ("no blue squares"), that
            color (a source that reads colors counts only objects of it), else None.
    """

    entity: int
    noun: str
    asked: int
    found: int | None
    reward: float | None
    centroids: tuple[Point, ...] = ()
    areas: tuple[float, ...] = ()
    status: str = "ok"
    confidence: float | None = None
    weighed: float | None = None
    color: str | None = None

    def text(self) -> str:
        """One sentence: "asked for 3 dogs, found 2 (at (0.21, 0.40), (0.70, 0.38))"."""
        what = _noun_form(self.noun, self.asked)
        if self.color:
            what = f"{self.color} {what}"
        if self.found is None and self.status == "unjudged":
            return (f"asked for no {what}: absence not judged (maps cut relative to their own "
                    "peak always find something; an absolute cut judges it), count not scored")
        if self.found is None:
            return f"{self.noun}: the reward source gives no map for it, count not scored"
        sentence = f"asked for {self.asked} {what}, found {self.found}"
        if self.centroids:
            listed = ", ".join(_pt(p) for p in self.centroids[:_MAX_LISTED])
            more = ", ..." if self.found > min(len(self.centroids), _MAX_LISTED) else ""
            sentence += f" (at {listed}{more})"
        elif self.status == "no_object" and self.weighed:  # the source's per-object checks dropped them
            sentence += " (the objects the map holds fail the source's per-object checks)"
        elif self.status in _STATUS_TEXT:
            sentence += f" ({_STATUS_TEXT[self.status]})"
        if self.weighed is not None:
            sentence += f"; weighed count {self.weighed:.2f}"
        if self.confidence is not None and self.found:
            sentence += f"; weakest object's confidence {self.confidence:.2f}"
        return sentence

    __str__ = text


@dataclass(frozen=True)
class ColorExplanation:
    """What the color reward found for one colored entity.

    Attributes:
        entity, noun, color: the entity and its asked color.
        score: best cosine similarity; None when not scored.
        patch: index of the best patch (row-major), None when none was allowed.
        position: that patch's centre (x, y) in [0, 1], or None.
        bound: whether the search was restricted to the entity's components.
        status: the entity map's status ("ok" when no map was needed).
    """

    entity: int
    noun: str
    color: str
    score: float | None
    patch: int | None
    position: Point | None
    bound: bool = False
    status: str = "ok"

    def text(self) -> str:
        """One sentence: "red dog: red scores 0.93 at patch 17 (0.31, 0.62)"."""
        head = f"{self.color} {self.noun}"
        if self.score is None:
            return f"{head}: no map to bind the color to, not scored"
        if self.patch is None:
            where = f"no {self.noun} region found" if self.bound else "no image patch"
            return f"{head}: {where} to look for {self.color} in, score {self.score:.2f}"
        inside = f" inside the {self.noun}" if self.bound else ""
        return f"{head}: {self.color} scores {self.score:.2f} at patch {self.patch} {_pt(self.position)}{inside}"

    __str__ = text


@dataclass(frozen=True)
class RelationExplanation:
    """What the position reward found for one relation "subject is relation of object".

    Attributes:
        index: the relation's index in the spec.
        subject, object: entity indices; subject_noun, object_noun their nouns.
        relation: "left_of", "right_of", "above" or "below".
        score: the sigmoid score; None when not scored.
        subject_centroid, object_centroid: attention-weighted centroids (x, y).
        subject_status, object_status: the two entity maps' statuses.
    """

    index: int
    subject: int
    object: int
    subject_noun: str
    object_noun: str
    relation: str
    score: float | None
    subject_centroid: Point | None
    object_centroid: Point | None
    subject_status: str = "ok"
    object_status: str = "ok"

    def _names(self) -> tuple[str, str]:
        if self.subject_noun == self.object_noun:
            return f"{self.subject_noun} #{self.subject}", f"{self.object_noun} #{self.object}"
        return self.subject_noun, self.object_noun

    def text(self) -> str:
        """One sentence: "dog left of cat: dog at (0.25, 0.50), cat at (0.75, 0.50), score 0.99"."""
        a, b = self._names()
        head = f"{a} {_RELATION_WORDS[self.relation]} {b}"
        if self.score is None:
            missing = a if self.subject_status == "missing" else b
            return f"{head}: no map for {missing}, not scored"
        lost = [n for n, s in ((a, self.subject_status), (b, self.object_status)) if s not in ("ok", "no_object")]
        if lost:
            return f"{head}: {' and '.join(lost)} not found, score {self.score:.2f}"

        def place(name, status, centroid):  # a map with mass where the count found no object: said, not hidden
            if status == "no_object":
                return f"{name}'s map (no {name} counted) centred at {_pt(centroid)}"
            return f"{name} at {_pt(centroid)}"

        return (f"{head}: {place(a, self.subject_status, self.subject_centroid)}, "
                f"{place(b, self.object_status, self.object_centroid)}, score {self.score:.2f}")

    __str__ = text


@dataclass(frozen=True)
class PromptExplanation:
    """Every reward's explanation for one prompt.

    Attributes:
        prompt: the prompt text.
        counts, colors, relations: per entity with a count / with a color, per relation.
        scores: aspect -> reward, None when the aspect is absent.
        weights: aspect -> effective lambda of the joint reward.
        joint: the joint reward, None when no aspect is present.
        source: the name of the reward source whose evidence was judged
            (:mod:`xlard.sources`), None when the maps were given directly.
    """

    prompt: str
    counts: tuple[CountExplanation, ...]
    colors: tuple[ColorExplanation, ...]
    relations: tuple[RelationExplanation, ...]
    scores: dict[str, float | None] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    joint: float | None = None
    source: str | None = None

    def text(self) -> str:
        """A few readable lines: the prompt (and the source that judged), one line per aspect, the joint reward."""
        from xlard._io import show_controls  # (print(result.text()) sent a prompt's ESC [2J to the terminal)

        lines = [f'"{show_controls(str(self.prompt))}"' + (f" (judged by the {self.source} source)" if self.source else "")]
        parts = {"count": self.counts, "color": self.colors, "position": self.relations}
        for aspect in ASPECTS:
            score = self.scores.get(aspect)
            if score is None:  # what there is to say of it still is said (an entity with no map, ...)
                said = "; ".join(item.text() for item in parts[aspect])
                lines.append(f"  {aspect}: absent" + (f" ({said})" if said else ""))
                continue
            details = "; ".join(item.text() for item in parts[aspect])
            lines.append(f"  {aspect} {score:.2f}: {details}")
        if self.joint is None:
            lines.append("  joint: none (no aspect present)")
        else:
            used = ", ".join(f"{a} {w:.2f}" for a, w in self.weights.items() if w > 0)
            lines.append(f"  joint {self.joint:.2f} (weights {used})")
        return "\n".join(lines)

    __str__ = text

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, every explanation with its sentence under ``"text"``."""
        out = asdict(self)
        for key, items in (("counts", self.counts), ("colors", self.colors), ("relations", self.relations)):
            for entry, item in zip(out[key], items):
                entry["text"] = item.text()
        out["text"] = self.text()
        return out


# ---------------------------------------------------------------------------
# Results and the reward module
# ---------------------------------------------------------------------------


@dataclass
class RewardResult:
    """The CMD's output for a batch (aspects in :data:`ASPECTS` order).

    Attributes:
        scores (float32 [B, 3]): count, color, position rewards; NaN where absent.
        present (bool [B, 3]): which aspects were scored.
        weights (float32 [B, 3]): effective lambdas (0 where absent).
        joint (float32 [B]): the joint reward; NaN where nothing is present.
        entity_status (int64 [B, E]): ``STATUS_*`` per entity slot (padding: missing; ``STATUS_NO_OBJECT``
            where the map has mass but no component passes the count's cut: position still reads its centroid).
        count_target (int64 [B, E]): -1 where no count.
        count_found (int32 [B, E]): components counted.
        entity_centroids (float32 [B, E, 2]): attention-weighted centroids.
        color_scores (float32 [B, E]): per colored entity; NaN elsewhere.
        color_patch (int64 [B, E]): best patch per colored entity; -1 elsewhere.
        relation_scores (float32 [B, R]): per relation; NaN for padding / not scored.
        explanations: one :class:`PromptExplanation` per item, or None.
        source: the name of the reward source that supplied the maps and
            features (:mod:`xlard.sources`), None when given directly.
    """

    scores: torch.Tensor
    present: torch.Tensor
    weights: torch.Tensor
    joint: torch.Tensor
    entity_status: torch.Tensor
    count_target: torch.Tensor
    count_found: torch.Tensor
    entity_centroids: torch.Tensor
    color_scores: torch.Tensor
    color_patch: torch.Tensor
    relation_scores: torch.Tensor
    explanations: tuple[PromptExplanation, ...] | None = None
    source: str | None = None

    @property
    def count(self) -> torch.Tensor:
        return self.scores[:, COUNT]

    @property
    def color(self) -> torch.Tensor:
        return self.scores[:, COLOR]

    @property
    def position(self) -> torch.Tensor:
        return self.scores[:, POSITION]

    def text(self) -> str:
        """All explanations, one block per prompt."""
        if self.explanations is None:
            return "(explanations not computed)"
        return "\n".join(e.text() for e in self.explanations)


ConfidenceHead = Callable[[Sequence[PromptSpec]], torch.Tensor]


class ExplainableRewards:
    """The CMD: count, color and position rewards with explanations, batched.

    Args:
        config: a :class:`RewardConfig` (default settings of method.md).
        color_encoder: a :class:`xlard.color_features.ColorFeatureEncoder`
            (``PixelColorEncoder``, ``ClipColorEncoder``, ...) used for
            ``images=`` and to embed color names.
        confidence_head: a callable ``specs -> Tensor[B, 3]`` of non-negative
            aspect weights (the models' confidence head); None: uniform over
            the present aspects.

    Example (``specs``, ``token_maps`` and ``images`` as in the example of :mod:`xlard.rewards`):
        >>> import torch
        >>> from xlard.color_features import PixelColorEncoder
        >>> from xlard.prompts import Entity, PromptSpec
        >>> from xlard.rewards import ExplainableRewards, RewardConfig
        >>> specs = [PromptSpec("two red circles", (Entity("circle", 2, "red", token_indices=(3,)),))]
        >>> token_maps = torch.zeros(1, 8, 32, 32)
        >>> token_maps[0, 3, 4:12, 4:12] = token_maps[0, 3, 20:28, 20:28] = 1.0
        >>> images = torch.full((1, 3, 32, 32), 0.5)
        >>> images[0, :, 4:12, 4:12] = images[0, :, 20:28, 20:28] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
        >>> cmd = ExplainableRewards(RewardConfig(bind_color=True), color_encoder=PixelColorEncoder())
        >>> result = cmd(specs, token_maps, images=images)
        >>> result.joint, result.explanations[0].counts[0].text()
        (tensor([0.99...]), 'asked for 2 circles, found 2 (at (0.25, 0.25), (0.75, 0.75))')
    """

    def __init__(
        self,
        config: RewardConfig | None = None,
        *,
        color_encoder: ColorFeatureEncoder | None = None,
        confidence_head: ConfidenceHead | None = None,
    ) -> None:
        # `config or RewardConfig()` took {} and [] (any falsy value) for the defaults without a word
        self.config = RewardConfig() if config is None else config
        if not isinstance(self.config, RewardConfig):
            hint = "; pass source.reward_config()" if callable(getattr(self.config, "reward_config", None)) else ""
            raise ValueError(f"ExplainableRewards: config must be a RewardConfig, got "
                             f"{type(self.config).__name__}{hint}")
        if color_encoder is not None and not isinstance(color_encoder, ColorFeatureEncoder):
            raise ValueError(f"color_encoder must have encode_images and embed_colors, got "
                             f"{type(color_encoder).__name__}")
        if confidence_head is not None and not callable(confidence_head):
            raise ValueError("confidence_head must be callable (specs -> Tensor[B, 3])")
        self.color_encoder = color_encoder
        self.confidence_head = confidence_head

    def __repr__(self) -> str:
        return (f"ExplainableRewards(config={self.config}, color_encoder={self.color_encoder!r}, "
                f"confidence_head={'yes' if self.confidence_head else 'uniform'})")

    def __call__(
        self,
        specs: Sequence[PromptSpec],
        token_maps: torch.Tensor | None = None,
        *,
        entity_maps: torch.Tensor | None = None,
        entity_available: torch.Tensor | None = None,
        images: Any = None,
        patch_features: PatchFeatures | torch.Tensor | None = None,
        patch_grid: tuple[int, int] | None = None,
        color_embeddings: Mapping[str, torch.Tensor] | None = None,
        encoder: str | None = None,
        segment_offsets: Mapping[str, int] | None = None,
        weights: torch.Tensor | None = None,
        explain: bool = True,
        source: str | None = None,
        entity_counts: torch.Tensor | None = None,
    ) -> RewardResult:
        """Score a batch of generations against their prompts.

        Args:
            specs: one :class:`PromptSpec` per batch item (aligned to the
                tokenizer of ``token_maps``).
            token_maps (Tensor[B, T, H, W], optional): attention map per text
                token; entity maps are the mean over each noun's tokens.
            entity_maps (Tensor[B, E', H, W], optional): per-entity maps given
                directly instead (slot j = the spec's entity j; E' >= the
                batch's largest entity count).
            entity_available (bool [B, E'], optional): which given entity
                maps exist (default: every real entity).
            images (optional): decoded images for ``color_encoder`` (see
                :func:`xlard.color_features.as_image_batch`).
            patch_features (PatchFeatures or Tensor[B, N, D], optional):
                precomputed patch features instead of ``images``; a tensor
                needs ``patch_grid``.
            patch_grid: (gh, gw) of a tensor ``patch_features``.
            color_embeddings: color name -> Tensor[D], instead of asking
                ``color_encoder`` (needed when there is no encoder).
            encoder, segment_offsets: which token indices index ``token_maps``
                (see :func:`batch_specs`).
            weights (Tensor[B, 3], optional): lambdas overriding the confidence head.
            explain: build the per-prompt explanations (one host transfer).
            source: name of the reward source the inputs came from, recorded
                in the result and its explanations (:func:`xlard.sources.score`
                sets it).
            entity_counts (Tensor[B, E'], optional): the number of objects of
                each entity the source counted (finite, >= 0, may be
                fractional: the shapes source weighs each object by how sure
                it is of it), scored instead of the maps' components; slot j =
                the spec's entity j, as for ``entity_maps``.

        Returns:
            A :class:`RewardResult`.

        Raises:
            ValueError: an aspect is asked for and enabled but its inputs are
                missing (maps for count/position/bound color, images or
                features for color), shapes disagree, or an entity has no
                tokens (``missing_entity="error"``).
        """
        cfg = self.config
        if not isinstance(explain, bool):  # 'no' is truthy: explanations were built when asked not to
            raise ValueError(f"ExplainableRewards: explain must be a bool, got {explain!r}")
        if images is not None and patch_features is not None:  # the images were ignored without a word
            raise ValueError("ExplainableRewards: pass images (read by the color_encoder) or patch_features, not both")
        if patch_grid is not None and not isinstance(patch_features, torch.Tensor):
            # PatchFeatures and a color_encoder's features carry their own grid: another one was ignored
            raise ValueError("ExplainableRewards: patch_grid goes only with a tensor patch_features (PatchFeatures "
                             "and images read by the color_encoder carry their own grid)")
        if isinstance(specs, PromptSpec) or isinstance(specs, (str, bytes)) or not isinstance(specs, Iterable):
            hint = " (one prompt? pass [spec])" if isinstance(specs, PromptSpec) else ""
            raise TypeError(f"ExplainableRewards: specs must be a sequence of PromptSpec, one per image, got "
                            f"{type(specs).__name__}{hint}")
        specs = tuple(specs)
        if not specs:
            raise ValueError("ExplainableRewards: got an empty batch of specs")
        given = {"token_maps": token_maps, "entity_maps": entity_maps, "entity_available": entity_available,
                 "images": images, "weights": weights, "entity_counts": entity_counts,
                 "patch_features": getattr(patch_features, "features", patch_features)}
        for name, value in given.items():  # meta tensors failed deep inside (".item() cannot be called")
            if isinstance(value, torch.Tensor) and value.device.type == "meta":
                raise ValueError(f"ExplainableRewards: {name} is on the meta device (shapes without values); the "
                                 "rewards read values: pass real tensors")
        batch = batch_specs(specs, encoder=encoder, segment_offsets=segment_offsets)
        b, e_max = batch.size, batch.max_entities
        enabled = torch.tensor([a in cfg.aspects for a in ASPECTS])
        wanted = batch.aspect_mask & enabled
        need_count, need_color, need_position = (bool(v) for v in wanted.any(0))
        need_maps = need_count or need_position or (need_color and cfg.bind_color)

        # Entity maps.
        maps, available = self._entity_maps(batch, token_maps, entity_maps, entity_available, need_maps)
        device = maps.device
        batch = batch.to(device)
        status = entity_status(maps, available)
        h, w = maps.shape[-2:]

        # Count.
        counts = None
        if entity_counts is not None:
            if not isinstance(entity_counts, torch.Tensor) or entity_counts.dim() != 2 \
                    or entity_counts.shape[0] != b or entity_counts.shape[1] < e_max:
                got = (f"{list(entity_counts.shape)}" if isinstance(entity_counts, torch.Tensor)
                       else type(entity_counts).__name__)
                raise ValueError(f"ExplainableRewards: entity_counts must be a tensor [B={b}, E>={e_max}], got {got}")
            counts = entity_counts[:, :e_max]
            _check_counts("ExplainableRewards", "entity_counts", counts, (b, e_max))
        count, count_details = count_reward(maps, batch.count_target, available, cfg, counts)
        # Position reads every map with mass (its weighted centroid, as the paper's rule); an entity whose map has
        # mass but no component past the count's cut is marked, so that its explanation does not place an object
        # the count says is absent. Scoring its relations 0 instead was measured and not kept (docs/rewards.md).
        located = status == STATUS_OK
        status = torch.where(located & (count_details["found"] == 0), STATUS_NO_OBJECT, status)
        # Position.
        centroids = ops.attention_centroids(maps).to(torch.float32)
        relation_ok = batch.relation_mask & available.gather(1, batch.relations[..., 0]) \
            & available.gather(1, batch.relations[..., 1])
        position, relation_scores = position_reward(centroids, batch.relations, relation_ok, cfg.tau, located)
        # Color.
        color_mask = batch.color_slot >= 0
        color_scores = torch.full((b, e_max), float("nan"), device=device)
        color_patch = torch.full((b, e_max), -1, dtype=torch.int64, device=device)
        grid = None
        if need_color:
            features, grid = self._patch_features(images, patch_features, patch_grid, b)
            features = features.to(device)
            table = self._color_table(batch.color_vocab, color_embeddings, features)
            slot_embeddings = table[batch.color_slot.clamp(min=0)]  # [B, E, D]
            patch_mask = None
            if cfg.bind_color:
                patch_mask = bound_patch_mask(maps, grid, cfg)
                color_mask = color_mask & available
            color, scores, index = color_reward(features, slot_embeddings, color_mask, patch_mask)
            color_scores = torch.where(color_mask, scores, color_scores)
            color_patch = torch.where(color_mask, index, color_patch)
        else:
            color = torch.full((b,), float("nan"), device=device)
            color_mask = torch.zeros_like(color_mask)

        scores = torch.stack((count.to(torch.float32), color.to(torch.float32), position.to(torch.float32)), -1)
        scored = torch.stack((count_details["counted"].any(-1), color_mask.any(-1), relation_ok.any(-1)), -1)
        present = wanted.to(device) & scored
        scores = torch.where(present, scores, torch.full_like(scores, float("nan")))
        if weights is None and self.confidence_head is not None:
            weights = self.confidence_head(specs)
        joint, lambdas = joint_reward(scores, present, weights, cfg.normalize_weights)

        result = RewardResult(
            scores=scores,
            present=present,
            weights=lambdas,
            joint=joint,
            entity_status=status,
            count_target=batch.count_target,
            count_found=count_details["found"],
            entity_centroids=centroids,
            color_scores=color_scores,
            color_patch=color_patch,
            relation_scores=torch.where(relation_ok, relation_scores, torch.full_like(relation_scores, float("nan"))),
            source=source,
        )
        if explain:
            shown = (cfg.aspects if need_color else tuple(a for a in cfg.aspects if a != "color"))
            result.explanations = _explain(batch, result, count_details, relation_ok, grid, cfg, (h, w), shown,
                                           source)
        return result

    # -- inputs -----------------------------------------------------------------

    def _entity_maps(self, batch, token_maps, entity_maps, entity_available, need_maps):
        cfg = self.config
        b, e_max = batch.size, batch.max_entities
        if token_maps is not None and entity_maps is not None:
            raise ValueError("ExplainableRewards: pass token_maps or entity_maps, not both")
        if token_maps is not None:
            if entity_available is not None:  # it was ignored: every entity scored as if available
                raise ValueError("ExplainableRewards: entity_available goes with entity_maps; with token_maps an "
                                 "entity is available when its words were aligned to tokens")
            return gather_entity_maps(token_maps, batch, missing_entity=cfg.missing_entity)
        if entity_maps is not None:
            if (not isinstance(entity_maps, torch.Tensor) or entity_maps.dim() != 4
                    or not entity_maps.is_floating_point() or entity_maps.shape[0] != b
                    or entity_maps.shape[1] < e_max or entity_maps.shape[2] < 1 or entity_maps.shape[3] < 1):
                raise ValueError(f"ExplainableRewards: entity_maps must be a float tensor [B={b}, E>={e_max}, H, W] "
                                 f"with H, W >= 1, got {_shape_and_dtype(entity_maps)}")
            maps = entity_maps[:, :e_max].to(_acc_dtype(entity_maps.dtype))
            available = batch.entity_mask.to(maps.device)
            if entity_available is not None:
                if not isinstance(entity_available, torch.Tensor) or entity_available.dim() != 2 \
                        or entity_available.dtype != torch.bool \
                        or tuple(entity_available.shape[:1]) != (b,) or entity_available.shape[1] < e_max:
                    raise ValueError(f"ExplainableRewards: entity_available must be a bool tensor [B={b}, "
                                     f"E>={e_max}], got "
                                     f"{getattr(entity_available, 'shape', type(entity_available).__name__)}"
                                     f"{' ' + str(entity_available.dtype) if isinstance(entity_available, torch.Tensor) else ''}")
                available = available & entity_available[:, :e_max].to(device=maps.device, dtype=torch.bool)
                missing = batch.entity_mask.to(maps.device) & ~available
                if cfg.missing_entity == "error" and bool(missing.any()):
                    i, j = (int(v) for v in missing.nonzero()[0])
                    raise ValueError(f"entity {j} ({batch.specs[i].entities[j].noun!r}) of prompt "
                                     f"{batch.specs[i].prompt!r} has no map (entity_available is False); "
                                     "use missing_entity='skip' to leave it out")
            maps = torch.where(available[..., None, None], maps, maps.new_zeros(()))
            return maps, available
        if need_maps:
            raise ValueError("ExplainableRewards: the prompts ask for count, position or a bound color, which "
                             "need attention maps: pass token_maps [B, T, H, W] or entity_maps [B, E, H, W] "
                             "(or disable those aspects in RewardConfig.aspects)")
        # No maps needed: a 1x1 placeholder keeps every shape defined.
        return torch.zeros(b, e_max, 1, 1), torch.zeros(b, e_max, dtype=torch.bool)

    def _patch_features(self, images, patch_features, patch_grid, b):
        if patch_features is None:
            if images is None:
                raise ValueError("ExplainableRewards: the prompts ask for colors: pass images= (with a "
                                 "color_encoder) or patch_features= (or disable 'color' in RewardConfig.aspects)")
            if self.color_encoder is None:
                raise ValueError("ExplainableRewards: images= needs a color_encoder (e.g. "
                                 "xlard.color_features.PixelColorEncoder() or ClipColorEncoder.from_pretrained(...))")
            patch_features = self.color_encoder.encode_images(images)
        if isinstance(patch_features, torch.Tensor):
            if patch_grid is None:
                raise ValueError("ExplainableRewards: a tensor patch_features needs patch_grid=(gh, gw)")
            patch_features = PatchFeatures(patch_features, patch_grid)  # its check names a bad grid
        if not isinstance(patch_features, PatchFeatures):
            raise ValueError(f"patch_features must be PatchFeatures or a tensor, got {type(patch_features).__name__}")
        if patch_features.features.shape[0] != b:
            raise ValueError(f"ExplainableRewards: patch features have batch {patch_features.features.shape[0]}, "
                             f"specs {b}")
        if patch_features.features.is_floating_point() and not bool(torch.isfinite(patch_features.features).all()):
            # they scored 0 with a made-up best patch ("red scores 0.00 at patch 0")
            raise ValueError("ExplainableRewards: patch_features hold NaN or infinite values (a diverged encoder, "
                             "or images that were not finite)")
        return patch_features.features, patch_features.grid

    def _color_table(self, vocab, color_embeddings, features):
        if not vocab:
            return features.new_zeros((1, features.shape[-1]))
        if color_embeddings is not None:
            if not isinstance(color_embeddings, Mapping):  # a tensor's `in` compared values with the names
                raise ValueError(f"ExplainableRewards: color_embeddings must map color names to Tensor[D], got "
                                 f"{type(color_embeddings).__name__}")
            unknown = [c for c in vocab if c not in color_embeddings]
            if unknown:
                raise ValueError(f"ExplainableRewards: color_embeddings lacks {unknown}")
            bad = [c for c in vocab if not isinstance(color_embeddings[c], (torch.Tensor, list, tuple))]
            if bad:
                raise ValueError(f"ExplainableRewards: color_embeddings must map each color to a Tensor[D], got "
                                 f"{ {c: type(color_embeddings[c]).__name__ for c in bad} }")
            rows = [torch.as_tensor(color_embeddings[c]) for c in vocab]
            if len({tuple(r.shape) for r in rows}) != 1 or rows[0].dim() != 1:
                shapes = {c: tuple(r.shape) for c, r in zip(vocab, rows)}
                raise ValueError(f"ExplainableRewards: color_embeddings must map each color to one Tensor[D] of "
                                 f"the same D, got shapes {shapes}")
            table = torch.stack(rows)
        elif self.color_encoder is not None:
            table = self.color_encoder.embed_colors(list(vocab))
        else:
            raise ValueError("ExplainableRewards: colors need a color_encoder or color_embeddings= "
                             "(name -> Tensor[D])")
        if table.dim() != 2 or table.shape[-1] != features.shape[-1]:
            raise ValueError(f"ExplainableRewards: color embeddings have shape {tuple(table.shape)}, patch "
                             f"features dimension {features.shape[-1]}")
        if not table.is_floating_point() or not bool(torch.isfinite(table).all()):
            bad = [c for c, row in zip(vocab, table) if not bool(torch.isfinite(row.float()).all())]
            raise ValueError(f"ExplainableRewards: color embeddings must be finite floats, got "
                             f"{'non-finite values for ' + str(bad) if bad else table.dtype}")
        # Cosine similarity ignores each row's scale: rows scaled to a largest magnitude of 1 before the cast to
        # the features' dtype, so that large embeddings (1e6 in float16 features, 1e300 in float64) do not turn
        # into inf there and score 0 "at patch 0".
        wide = table.to(torch.float64 if table.dtype == torch.float64 else torch.float32)
        wide = wide / wide.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(wide.dtype).tiny)
        return wide.to(device=features.device, dtype=features.dtype)


def _explain(batch: SpecBatch, result: RewardResult, count_details, relation_ok, grid, cfg, map_size, shown,
             source=None):
    """Build per-prompt explanations (of the aspects in ``shown``) with one host transfer."""
    t = {k: v.detach().cpu().tolist() for k, v in dict(
        scores=result.scores, weights=result.weights, joint=result.joint, status=result.entity_status,
        target=result.count_target, found=result.count_found, areas=count_details["areas"],
        comp_centroids=count_details["centroids"], counted=count_details["counted"],
        unjudged=count_details["unjudged"],
        entity_reward=count_details["entity_reward"],
        confidence=count_details.get("confidence", torch.full_like(count_details["entity_reward"], float("nan"))),
        weighed=count_details.get("weighed", torch.full_like(count_details["entity_reward"], float("nan"))),
        centroids=result.entity_centroids, color_scores=result.color_scores, color_patch=result.color_patch,
        relation_scores=result.relation_scores, relation_ok=relation_ok, relations=batch.relations,
        relation_mask=batch.relation_mask, present=result.present,
    ).items()}
    positions = patch_positions(grid).tolist() if grid is not None else None
    pixels = map_size[0] * map_size[1]
    explanations = []
    for i, spec in enumerate(batch.specs):
        status = [_STATUS_NAMES[s] for s in t["status"][i]]
        counts, colors, relations = [], [], []
        for j, entity in enumerate(spec.entities):
            if entity.count is None or "count" not in shown:
                continue
            absent_color = entity.color if entity.count == 0 else None
            if not t["counted"][i][j]:
                counts.append(CountExplanation(j, entity.noun, entity.count, None, None,
                                               status="unjudged" if t["unjudged"][i][j] else status[j],
                                               color=absent_color))
                continue
            kept = [(tuple(c), a / pixels) for c, a in zip(t["comp_centroids"][i][j], t["areas"][i][j]) if a > 0]
            counts.append(CountExplanation(
                j, entity.noun, entity.count, t["found"][i][j], t["entity_reward"][i][j],
                tuple(c for c, _ in kept), tuple(a for _, a in kept), status[j],
                None if math.isnan(t["confidence"][i][j]) else t["confidence"][i][j],
                None if math.isnan(t["weighed"][i][j]) else t["weighed"][i][j], absent_color))
        for j, entity in enumerate(spec.entities):
            if entity.color is None or entity.count == 0 or "color" not in shown:  # (an absent one has no color)
                continue
            score = t["color_scores"][i][j]
            score = None if math.isnan(score) else score
            patch = t["color_patch"][i][j]
            patch = patch if (score is not None and patch >= 0) else None
            position = tuple(positions[patch]) if patch is not None else None
            colors.append(ColorExplanation(j, entity.noun, entity.color, score, patch, position, cfg.bind_color,
                                           status[j] if cfg.bind_color else "ok"))
        for r, rel in enumerate(spec.relations if "position" in shown else ()):
            if not t["relation_mask"][i][r]:  # an entity asked absent: no place to judge
                continue
            ok = t["relation_ok"][i][r]
            a, o = rel.subject, rel.object
            relations.append(RelationExplanation(
                r, a, o, spec.entities[a].noun, spec.entities[o].noun, rel.relation,
                t["relation_scores"][i][r] if ok else None,
                tuple(t["centroids"][i][a]) if status[a] in ("ok", "no_object") else None,
                tuple(t["centroids"][i][o]) if status[o] in ("ok", "no_object") else None,
                status[a], status[o]))
        scores = {aspect: (t["scores"][i][k] if t["present"][i][k] else None) for k, aspect in enumerate(ASPECTS)}
        weights = {aspect: t["weights"][i][k] for k, aspect in enumerate(ASPECTS)}
        joint = t["joint"][i]
        explanations.append(PromptExplanation(
            spec.prompt, tuple(counts), tuple(colors), tuple(relations), scores, weights,
            None if joint != joint else joint, source))
    return tuple(explanations)

