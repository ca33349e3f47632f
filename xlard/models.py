"""The trainable models of xLARD: the residual corrector (the policy) and the latent reward projector.

- :class:`ResidualCorrector` (spec section 3): a pre-norm transformer over latent
  tokens with self-attention, cross-attention to the prompt tokens, a FiLM from
  the pooled prompt embedding and 2D sine-cosine positions. Its zero-initialised
  output head makes ``zc == z0`` exactly at initialisation. It is also the PPO
  policy (a diagonal Gaussian around its output with a learnable per-channel
  log std) and carries the value head (the baseline ``b``).
- :class:`LatentRewardProjector` (R_phi, spec section 5): a small transformer
  that predicts the three image-level sub-rewards (count, color, position) from
  a latent, plus the confidence head that turns a prompt into the weights of the
  joint reward, trained by uncertainty weighting (see :meth:`LatentRewardProjector.loss`).
- Both save to and load from a folder holding ``model.safetensors`` and
  ``config.json`` (:meth:`save_pretrained` / :meth:`from_pretrained`).

The latent-side arithmetic (applying the correction, the LAM, the Gaussian
log-density, the fused rollout step) goes through :mod:`xlard.ops`.

Example:
    >>> import torch
    >>> from xlard.models import CorrectorConfig, ResidualCorrector
    >>> cfg = CorrectorConfig.tiny(latent_channels=4, text_dim=32, pooled_dim=32)
    >>> corrector = ResidualCorrector(cfg)
    >>> z0, text_tokens, pooled = torch.randn(2, 4, 16, 16), torch.randn(2, 8, 32), torch.randn(2, 32)
    >>> zc, lam = corrector.correct(z0, text_tokens, pooled)
    >>> torch.equal(zc, z0), lam.shape   # zc == z0 at init
    (True, torch.Size([2, 16, 16]))
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import numbers
import operator
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import xlard
from xlard import _args, _io
from xlard import ops as xops
from xlard._optional import require
from xlard.vocab import ASPECTS  # order of the projector's outputs, confidence weights, [B, 3] aspect masks
from xlard.vocab import RELATIONS

__all__ = [
    "ASPECTS", "CorrectorConfig", "ProjectorConfig", "ResidualCorrector", "LatentRewardProjector",
    "CONDITIONINGS", "GaussianPolicy", "ProjectorOutput", "ProjectorLoss", "aspect_weights", "corrector_inputs",
    "field_inputs", "patchify", "unpatchify", "sincos_position_encoding", "count_parameters", "copy_cells",
    "move_sources", "largest_parts", "LatentReader", "slot_fields", "READER_CHANNELS", "relation_fields",
    "relation_targets", "relation_cells", "reader_move_sources", "READER_MOVE_FACTOR", "count_fields",
    "count_move_sources", "COUNT_MOVE_MIN_AREA", "MAX_FIELD_COUNT",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------
# Configuration


def _check_int(owner: str, name: str, value, minimum: int = 1, maximum: int | None = None) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum \
            or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ValueError(f"{owner}: {name} must be an integer {bounds}, got {shown}")


# Upper bounds on the architecture fields, far above any real model (the paper's corrector is
# width 384, depth 6): a config read from disk cannot make the constructor build a billion blocks.
_FIELD_LIMITS = {"latent_channels": 4096, "text_dim": 1 << 16, "pooled_dim": 1 << 16, "width": 1 << 14,
                 "depth": 256, "heads": 1024, "patch": 64, "cond_dim": 1 << 16, "value_hidden": 1 << 16,
                 "confidence_hidden": 1 << 16}
_MAX_FFN_MULT = 64.0


def _check_real(owner: str, name: str, value, low: float = -math.inf, high: float = math.inf,
                high_open: bool = False, low_open: bool = False) -> None:
    ok = _args.is_finite_real(value)  # 10**400 in a config file is not finite as a float
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        if math.isinf(low) and math.isinf(high):  # "a finite number in [-inf, inf]" contradicted itself
            raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")
        lo = "(" if low_open or math.isinf(low) else "["
        hi = ")" if high_open or math.isinf(high) else "]"
        raise ValueError(f"{owner}: {name} must be a finite number in {lo}{low}, {high}{hi}, got {value!r}")


def _check_bool(owner: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {name} must be a bool, got {value!r}")


class _ConfigBase:
    """Shared by the two configs: dict round trip that rejects unknown fields and missing required ones.

    A field with a default may be missing: it takes the default, which is what versions that predate the field did
    (so a folder saved before a field existed loads as it behaved then); a change that is not compatible this way
    raises the files' ``format_version`` instead."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    def _plain_numbers(self) -> None:
        """numpy (or other) numbers in the int, float and bool fields become Python's own, before the checks: a
        width of ``np.int64(64)`` or an alpha of ``np.float32(0.5)`` passed every check, built the model, and then
        failed ``save_pretrained`` ("not JSON-serializable"). A Python int in a float field is kept as given."""
        np = sys.modules.get("numpy")  # a numpy bool exists only once numpy is loaded
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if type(value) in (int, float, bool):
                continue
            try:
                if field.type == "bool" and np is not None and isinstance(value, np.bool_):
                    value = bool(value)
                elif field.type == "int" and isinstance(value, numbers.Integral) and not isinstance(value, bool):
                    value = int(value)
                elif field.type == "float" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                    value = float(value)
                else:
                    continue
            except (OverflowError, TypeError, ValueError):  # left as given: the field's check names it
                continue
            object.__setattr__(self, field.name, value)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}.from_dict: expected a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}.from_dict: unknown fields {unknown} (known: {sorted(names)})")
        try:
            return cls(**data)
        except TypeError as e:  # a missing required field
            raise ValueError(f"{cls.__name__}.from_dict: {e}") from None

    @classmethod
    def preset(cls, name: str, **kwargs):
        """``"paper"`` or ``"tiny"``, with keyword overrides (a misspelled field is named with the known ones)."""
        if name not in ("paper", "tiny"):
            raise ValueError(f"{cls.__name__}.preset: name must be 'paper' or 'tiny', got {name!r}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}.preset: unknown fields {unknown} (known: {sorted(names)})")
        return getattr(cls, name)(**kwargs)

    def replace(self, **changes):
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _check_transformer_fields(owner: str, cfg) -> None:
    for name in ("latent_channels", "text_dim", "pooled_dim", "width", "depth", "heads", "patch", "cond_dim"):
        _check_int(owner, name, getattr(cfg, name), maximum=_FIELD_LIMITS[name])
    _check_real(owner, "ffn_mult", cfg.ffn_mult, 0.0, _MAX_FFN_MULT, low_open=True)
    _check_real(owner, "dropout", cfg.dropout, 0.0, 1.0, high_open=True)
    if cfg.width % cfg.heads:
        raise ValueError(f"{owner}: width ({cfg.width}) must be divisible by heads ({cfg.heads})")
    if cfg.width % 4:
        raise ValueError(f"{owner}: width must be a multiple of 4 (2D sine-cosine positions), got {cfg.width}")
    if round(cfg.width * cfg.ffn_mult) < 1:
        raise ValueError(f"{owner}: width * ffn_mult must be at least 1, got {cfg.width} * {cfg.ffn_mult}")


CONDITIONINGS = ("text", "fields")
#: The dtypes ``CorrectorConfig.autocast`` may name (inference under ``torch.autocast``).
AUTOCAST_DTYPES = ("bfloat16", "float16")
#: The default eyes ``CorrectorConfig.count_eyes`` may name.
COUNT_EYES = ("decoded", "latent")


def corrector_inputs(corrector, prompt_embedding, specs) -> dict[str, torch.Tensor]:
    """``{"text_tokens", "pooled", "text_mask"}`` for ``corrector``, by its ``config.conditioning``.

    ``"text"`` (and any corrector without a config): the backbone's prompt embedding
    (:meth:`xlard.backbones.PromptEmbedding.as_corrector_inputs`). ``"fields"``: the
    parsed prompts' field tokens (:func:`xlard.prompts.fields.field_tokens`) and a zero
    pooled embedding, on the embedding's device and dtype.

    Raises:
        TypeError: ``prompt_embedding`` is not a backbone's prompt embedding, or a ``"fields"``
            corrector's ``specs`` are not :class:`xlard.prompts.PromptSpec` objects.
        ValueError: a ``"fields"`` corrector got a number of specs other than the
            embedding's batch size.
    """
    if not callable(getattr(prompt_embedding, "as_corrector_inputs", None)) \
            or not isinstance(getattr(prompt_embedding, "tokens", None), torch.Tensor):
        raise TypeError(f"corrector_inputs: prompt_embedding must be a backbone's PromptEmbedding "
                        f"(state.prompt_embedding of backbone.encode), got {type(prompt_embedding).__name__}")
    cfg = getattr(corrector, "config", None)
    if getattr(cfg, "conditioning", "text") != "fields":
        return prompt_embedding.as_corrector_inputs()
    from xlard.prompts import PromptSpec

    if isinstance(specs, (str, PromptSpec)) or not isinstance(specs, (list, tuple)) \
            or not all(isinstance(s, PromptSpec) for s in specs):
        got = type(specs).__name__ if not isinstance(specs, (list, tuple)) else \
            f"a {type(specs).__name__} of {sorted({type(s).__name__ for s in specs})}"
        raise TypeError(f"corrector_inputs: this corrector reads the parsed prompts: specs must be a list of "
                        f"PromptSpec (state.specs of backbone.encode, or backbone.parse(prompt)), got {got}")
    specs = list(specs)
    batch = prompt_embedding.tokens.shape[0]
    if len(specs) != batch:
        raise ValueError(f"corrector_inputs: {len(specs)} prompt specs for a batch of {batch} prompt embeddings")
    ref = prompt_embedding.tokens
    return field_inputs(cfg, specs, device=ref.device, dtype=ref.dtype)


def field_inputs(cfg: "CorrectorConfig", specs, *, device=None, dtype: torch.dtype = torch.float32
                 ) -> dict[str, torch.Tensor]:
    """A ``"fields"`` corrector's ``{"text_tokens", "pooled", "text_mask"}``: the specs' field tokens
    (``cfg.text_dim`` wide, :func:`xlard.prompts.fields.field_tokens`) and a zero pooled embedding."""
    from xlard.prompts.fields import field_tokens

    specs = list(specs)
    tokens, mask = field_tokens(specs, cfg.text_dim, device=device, dtype=dtype)
    pooled = torch.zeros(len(specs), cfg.pooled_dim, device=device, dtype=dtype)
    return {"text_tokens": tokens, "pooled": pooled, "text_mask": mask}


@dataclass(frozen=True)
class CorrectorConfig(_ConfigBase):
    """Architecture and policy defaults of :class:`ResidualCorrector`. Validated on construction.

    Args:
        latent_channels (int): C of the latent ``z0 [B, C, H, W]``.
        text_dim (int): width of the prompt token embeddings ``[B, T, text_dim]``.
        pooled_dim (int): width of the pooled prompt embedding ``[B, pooled_dim]``.
        width (int): transformer width; a multiple of ``heads`` and of 4.
        depth (int): number of transformer blocks.
        heads (int): attention heads.
        ffn_mult (float): feed-forward hidden width = ``round(width * ffn_mult)``.
        patch (int): patchify factor; ``H`` and ``W`` must be divisible by it.
        dropout (float): attention and residual dropout in [0, 1).
        cond_dim (int): width of ``W e_p``, the projected pooled prompt embedding
            that drives the FiLM and feeds the value head. A narrow bottleneck
            keeps a 4096-wide pooled embedding cheap.
        alpha (float): default step size of ``zc = z0 + alpha * Delta``.
        log_std_init (float): initial value of the per-channel policy log std.
        value_hidden (int): hidden width of the value head.
        value_shares_trunk (bool): False (default): the value head reads the
            trunk's features through a stop-gradient, so fitting the baseline does
            not move the policy; True: the value loss also trains the trunk.
        action_block (int): 1 (default): the policy acts on every latent element.
            ``k > 1``: the correction and the exploration noise are constant on
            ``k x k`` blocks of latent positions (the mean is averaged over each
            block, the noise is a block-averaged draw rescaled to unit variance),
            so the policy explores ``C * H * W / k^2`` dimensions: fewer, coarser
            directions that the remaining denoising does not smooth away. ``H`` and
            ``W`` must be divisible by it. The PPO ratio uses the block log-density:
            ``logprob_reduction: sum`` divides the full-resolution sum by ``k^2``
            (each block is counted ``k^2`` times), and ``mean`` is the same at
            either resolution.
        conditioning (str): what the corrector reads of the prompt. ``"text"``
            (default): the backbone's prompt embedding (token embeddings, pooled
            embedding). ``"fields"``: one token per parsed field of the prompt
            (noun, count, color, relation; :func:`xlard.prompts.fields.field_tokens`,
            ``text_dim`` wide) and a zero pooled embedding, so nothing identifies a
            prompt except its fields; see :func:`corrector_inputs`.
        move (bool): False (default): the correction is the residual head's output.
            True: a *move head* as well, for a relation's two objects: every latent
            cell is labelled none / subject / object (none everywhere at
            initialisation) and each of the two gets one whole-cell shift per axis
            (a class in ``[-move_range, move_range]``, read from its own cells'
            features); the objects' cells of ``z0`` are copied to their shifted
            places and each cell they leave copies the nearest unlabelled cell
            (:func:`move_sources`; each label kept on its largest connected part,
            :func:`largest_parts`). The correction becomes ``copy_cells(z0, sources)
            - z0 + residual``. Moving an object across the image is then a copy of
            its own latent cells instead of a residual that has to paint it anew.
            The copy carries no gradient: the head is fitted on the editor's move
            decisions (:mod:`xlard.train.distill`, ``distill.move``); PPO adjusts the
            residual around it.
        move_range (int): the largest shift of the move head, in latent cells (default 16).
        move_nouns (int): 0 (default), or the number of nouns of an auxiliary
            head, fitted alongside the move head, that names the noun under every
            latent cell (none or one of ``move_nouns``): a second task for the trunk,
            for telling the relation's subject from its object. Unused at inference.
        reader (bool): False (default). True: a frozen :class:`LatentReader` inside the
            corrector reads, for every latent cell of z0, the probability of each noun of
            ``reader_nouns`` and of each color of ``reader_colors``; the prompt's first two
            entities' maps (entity k's noun, entity k's color, or any color when the prompt
            names none; :data:`READER_CHANNELS` in all) are extra input channels of the trunk,
            without gradient. Needs ``conditioning: "fields"``: the entities are read from the
            field tokens (:func:`slot_fields`). The reader is fitted before the corrector
            (``xlard.train.distill.fit_reader``, on the understanding model's reading of the
            decoded z0); an unfitted reader's maps carry no information.
        reader_nouns (tuple of str): the nouns the reader knows (those of the shapes world:
            circle, square, triangle, diamond); a prompt's other nouns get a zero map.
        reader_colors (tuple of str): the colors the reader knows; other colors get a zero map.
        reader_width (int): channels of the reader's four 3x3 convolutions (default 64).
        reader_move (bool): False (default). True (needs ``reader``, excludes ``move``): the prompt's
            first relation between its first two entities is carried out by *moving latent cells*, with
            the reader's noun maps as the eyes (:func:`reader_move_sources`): each entity's most confident
            object is found on its noun map, and when the relation does not hold by
            ``reader_move_margin``, both objects' cells of z0 are copied to a quarter and three quarters
            of the relation's axis (the editor's relation rule, :func:`relation_targets`); every cell they
            leave copies the nearest cell of neither object. The correction becomes
            ``copy_cells(z0 + residual, sources) - z0``: the residual, fitted without the move, travels
            with its cells. Nothing of the move is learned besides the reader: the rule is fixed, and the
            choice of sources carries no gradient. A step size ``alpha`` other than 1 blends the moved
            and the unmoved latent instead of moving (the shipped corrector is exported at 1).
        reader_move_margin (float): the share of the relation's axis by which a relation must already
            hold to be left as it is, in ``[0, 1]``; 1.0 (default) moves every relation's objects to their
            quarter places whether or not it held (measured better on training-split items than a
            margin of 6 / 64: docs/training.md, "Relations moved by the reader").

        count_move (bool): False (default). True (needs ``reader``, excludes ``move``): a prompt of one entity asked
            ``n`` times (beside no other, or one asked absent or of a count it cannot read, in either order),
            ``2 <= n <= MAX_FIELD_COUNT`` (16; :func:`count_fields` reads no larger count, so above it no edit),
            is counted on the corrected latent by eyes (default, ``count_eyes``: the shapes
            understanding model on the shapes backbone's VAE decoding, :class:`xlard.shapes.understanding.
            CountEyes`, or the latent eyes distilled from it; any other with :meth:`ResidualCorrector.attach_eyes`), and when the objects of
            its noun do not number ``n``, latent cells are copied (:func:`count_move_sources`): objects of
            another shape kept to make up ``n`` are replaced by a copy of the most confident object of
            the noun, surplus ones are overwritten by the nearest free cells, missing ones are copies of
            it at the free place farthest from every object. ``Delta = copy_cells(z0 + Delta_rest,
            sources) - z0``. Nothing of it is fitted.
        count_move_share (float): the share of a found object's shape probability that its noun must
            hold for it to count as that noun, in ``[0, 1]`` (default 0.7).
        count_edit (bool): False (default). True (needs ``reader``, excludes ``move`` and ``count_move``): a
            prompt of one entity asked ``n`` times, ``2 <= n <= MAX_FIELD_COUNT`` (16; beside another as for
            ``count_move``), is *redrawn*: the eyes (as for ``count_move``; they
            must also have ``edit_counts``, as :class:`xlard.shapes.understanding.CountEyes` has) decode the
            corrected latent, draw every found object of the noun again as a clean shape at its place, size
            and color, paint surplus ones with the background, draw missing ones at the emptiest free
            place, and encode the edited image; on the latent cells the edit touched (grown by one cell) the
            encoding replaces ``z0 + Delta_rest``, elsewhere the correction is the residual's (and the
            relation move's). It acts on every such prompt, whatever the count found. Nothing of it is
            fitted; the encoded cells carry no gradient. A step size ``alpha`` other than 1 blends the
            edited and the unedited cells (the shipped corrector is exported at 1).
        count_eyes (str): which default eyes ``count_move`` and ``count_edit`` use when none are attached
            (:meth:`ResidualCorrector.attach_eyes`): ``"decoded"`` (default): the shapes backbone's VAE decodes
            the latent and the understanding model reads the image (:class:`xlard.shapes.understanding.
            CountEyes`); ``"latent"``: a model distilled from that one reads the latent itself and the edit
            draws on the flat image its maps describe, so only the encode runs the VAE
            (:class:`xlard.shapes.latent_eyes.LatentCountEyes`; the shipped shapes corrector's choice: about
            11 ms less per call on the overhead bench's batch).
        autocast (str or None): None (default): inference runs in the parameters' dtype. ``"bfloat16"`` or
            ``"float16"``: :meth:`ResidualCorrector.correct` and :meth:`ResidualCorrector.actions` (what
            ``xlard generate --correct``, ``xlard eval`` and the demo call) run the trunk, the reader and the count
            rule's eyes under ``torch.autocast`` with that dtype on z0's device; the correction comes back in z0's
            dtype. Training (:meth:`ResidualCorrector.forward`, :meth:`ResidualCorrector.sample`, the PPO
            passes) is unaffected. z0 is cast to the parameters' dtype first, so a float64 z0 given to a float32
            corrector is computed in the autocast dtype like any other and only comes back as float64; a float64
            corrector (``corrector.double()``) is left in float64, as autocast leaves float64 tensors. On a CPU
            without native bfloat16 (AVX512-BF16 or AMX) bfloat16 is emulated and slower: set it to None there
            (``ResidualCorrector.set_autocast(None)``).

    Example:
        >>> from xlard.models import CorrectorConfig
        >>> CorrectorConfig.paper().width
        384
    """

    latent_channels: int
    text_dim: int
    pooled_dim: int
    width: int = 384
    depth: int = 6
    heads: int = 8
    ffn_mult: float = 4.0
    patch: int = 1
    dropout: float = 0.0
    cond_dim: int = 64
    alpha: float = 1.0
    log_std_init: float = -2.0
    value_hidden: int = 128
    value_shares_trunk: bool = False
    action_block: int = 1
    conditioning: str = "text"
    move: bool = False
    move_range: int = 16
    move_nouns: int = 0
    reader: bool = False
    reader_nouns: tuple = ()
    reader_colors: tuple = ()
    reader_width: int = 64
    reader_move: bool = False
    reader_move_margin: float = 1.0
    count_move: bool = False
    count_move_share: float = 0.7
    count_edit: bool = False
    count_eyes: str = "decoded"
    autocast: str | None = None

    def __post_init__(self):
        owner = "CorrectorConfig"
        self._plain_numbers()
        _check_transformer_fields(owner, self)
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"{owner}: autocast must be None or one of {list(AUTOCAST_DTYPES)}, "
                             f"got {self.autocast!r}")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"{owner}: conditioning must be one of {list(CONDITIONINGS)}, got {self.conditioning!r}")
        _check_int(owner, "action_block", self.action_block, maximum=64)
        _check_int(owner, "value_hidden", self.value_hidden, maximum=_FIELD_LIMITS["value_hidden"])
        _check_real(owner, "alpha", self.alpha)
        _check_real(owner, "log_std_init", self.log_std_init, -20.0, 5.0)
        _check_bool(owner, "value_shares_trunk", self.value_shares_trunk)
        _check_bool(owner, "move", self.move)
        _check_int(owner, "move_range", self.move_range, maximum=4096)
        _check_int(owner, "move_nouns", self.move_nouns, minimum=0, maximum=4096)
        _check_bool(owner, "reader", self.reader)
        _check_int(owner, "reader_width", self.reader_width, maximum=4096)
        for name in ("reader_nouns", "reader_colors"):
            words = getattr(self, name)
            if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) and w for w in words):
                raise ValueError(f"{owner}: {name} must be a list of non-empty words, got {words!r}")
            if len(set(words)) != len(words):
                raise ValueError(f"{owner}: {name} lists a word twice: {list(words)}")
            object.__setattr__(self, name, tuple(words))  # a JSON list comes back as the same tuple
        if self.reader:
            if self.conditioning != "fields":
                raise ValueError(f"{owner}: reader needs conditioning 'fields' (the reader finds the prompt's "
                                 f"entities in the field tokens), got conditioning {self.conditioning!r}")
            if not self.reader_nouns:
                raise ValueError(f"{owner}: reader needs reader_nouns (the nouns it reads), got none")
            if self.reader_width % 8:  # the reader's GroupNorm has 8 groups
                raise ValueError(f"{owner}: reader_width must be a multiple of 8, got {self.reader_width}")
        # The fixed rules on the reader's reading: each needs the reader and excludes the move head.
        counted = "the prompt's noun and count are read from its field tokens by the reader's vocabulary"
        for name, setting, needs_reader, with_move in (
                ("reader_move", "reader_move_margin", "the reader's noun maps find the objects to move",
                 "reader_move and move both move a relation's objects; choose one"),
                ("count_move", "count_move_share", counted, "count_move copies cells after the reader's relation "
                 "move, not the move head's; choose count_move or move"),
                ("count_edit", None, counted, "count_edit redraws the counted objects itself; choose count_edit "
                 "or move")):
            on = getattr(self, name)
            _check_bool(owner, name, on)
            if setting is not None:
                _check_real(owner, setting, getattr(self, setting), 0.0, 1.0)
            if on and not self.reader:
                raise ValueError(f"{owner}: {name} needs reader: true ({needs_reader}), got reader false")
            if on and self.move:
                raise ValueError(f"{owner}: {with_move}, got both true")
        if self.count_edit and self.count_move:
            raise ValueError(f"{owner}: count_edit redraws the counted objects itself; choose count_edit or "
                             f"count_move, got both true")
        if self.count_eyes not in COUNT_EYES:
            raise ValueError(f"{owner}: count_eyes must be one of {', '.join(map(repr, COUNT_EYES))}, got "
                             f"{self.count_eyes!r}")

    @classmethod
    def paper(cls, latent_channels: int = 16, text_dim: int = 4096, pooled_dim: int = 4096, **overrides):
        """The paper's scale: 6 blocks, 8 heads, width 384, FFN x4 (about 15M parameters
        for a 16-channel latent and 4096-wide prompt embeddings); latent positions are tokens (patch 1)."""
        return cls(latent_channels=latent_channels, text_dim=text_dim, pooled_dim=pooled_dim, **overrides)

    @classmethod
    def tiny(cls, latent_channels: int = 4, text_dim: int = 32, pooled_dim: int = 32, **overrides):
        """A CPU-friendly corrector for tiny backbones and tests (width 32, 2 blocks, 2 heads)."""
        base = dict(width=32, depth=2, heads=2, ffn_mult=2.0, cond_dim=16, value_hidden=16)
        base.update(overrides)
        return cls(latent_channels=latent_channels, text_dim=text_dim, pooled_dim=pooled_dim, **base)


@dataclass(frozen=True)
class ProjectorConfig(_ConfigBase):
    """Architecture of :class:`LatentRewardProjector` (R_phi). Validated on construction.

    Args:
        latent_channels, text_dim, pooled_dim, width, depth, heads, ffn_mult,
        patch, dropout, cond_dim: as in :class:`CorrectorConfig` (the spec's
            default projector has 2-4 blocks).
        confidence_hidden (int): hidden width of the confidence head.
        log_var_min, log_var_max (float): clamp of the predicted per-aspect
            log-variances; keeps ``exp(-log_var)`` finite when an aspect is fit
            perfectly.

    Example:
        >>> from xlard.models import ProjectorConfig
        >>> ProjectorConfig.paper().depth
        4
    """

    latent_channels: int
    text_dim: int
    pooled_dim: int
    width: int = 384
    depth: int = 4
    heads: int = 8
    ffn_mult: float = 4.0
    patch: int = 2
    dropout: float = 0.0
    cond_dim: int = 64
    confidence_hidden: int = 64
    log_var_min: float = -10.0
    log_var_max: float = 10.0

    def __post_init__(self):
        owner = "ProjectorConfig"
        self._plain_numbers()
        _check_transformer_fields(owner, self)
        _check_int(owner, "confidence_hidden", self.confidence_hidden, maximum=_FIELD_LIMITS["confidence_hidden"])
        _check_real(owner, "log_var_min", self.log_var_min)
        _check_real(owner, "log_var_max", self.log_var_max)
        if not self.log_var_min < self.log_var_max:
            raise ValueError(f"ProjectorConfig: log_var_min ({self.log_var_min}) must be below "
                             f"log_var_max ({self.log_var_max})")

    @classmethod
    def paper(cls, latent_channels: int = 16, text_dim: int = 4096, pooled_dim: int = 4096, **overrides):
        """The default projector at paper scale: 4 blocks, width 384, 8 heads, patch 2."""
        return cls(latent_channels=latent_channels, text_dim=text_dim, pooled_dim=pooled_dim, **overrides)

    @classmethod
    def tiny(cls, latent_channels: int = 4, text_dim: int = 32, pooled_dim: int = 32, **overrides):
        """A CPU-friendly projector (width 32, 2 blocks, 2 heads, patch 1)."""
        base = dict(width=32, depth=2, heads=2, ffn_mult=2.0, patch=1, cond_dim=16, confidence_hidden=16)
        base.update(overrides)
        return cls(latent_channels=latent_channels, text_dim=text_dim, pooled_dim=pooled_dim, **base)


# ----------------------------------------------------------------------------------
# Token layout


def _check_size(owner: str, name: str, value, minimum: int) -> int:
    """``value`` as an int >= ``minimum``: an int (numpy and 0-d torch integers too), not a bool or a float.

    Raises:
        TypeError: not an integer ("xlard.models.<owner>: <name> must be an integer >= <minimum>, got ...").
        ValueError: an integer below ``minimum``.
    """
    if type(value) is int:  # the model's own calls: no other look-up
        n = value
    elif isinstance(value, (bool, float)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        n = None  # True would be patch 1, 8.0 a float in a shape: refused, not read as an integer
    else:
        try:
            n = operator.index(value)
        except TypeError:
            n = None
    if n is None:
        raise TypeError(f"xlard.models.{owner}: {name} must be an integer >= {minimum}, got {_short(value)} "
                        f"({type(value).__name__})")
    if n < minimum:
        raise ValueError(f"xlard.models.{owner}: {name} must be an integer >= {minimum}, got {n}")
    return n


def _check_rank(owner: str, name: str, value, dim: int, layout: str) -> None:
    """``value`` is a tensor of ``dim`` dimensions (``layout`` names them in the message)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"xlard.models.{owner}: {name} must be a torch.Tensor {layout}, got {type(value).__name__}")
    if value.dim() != dim:
        raise ValueError(f"xlard.models.{owner}: {name} must be a tensor {layout} ({dim} dimensions), got shape "
                         f"{tuple(value.shape)}")


def patchify(z: torch.Tensor, patch: int) -> torch.Tensor:
    """Latent ``[B, C, H, W]`` -> tokens ``[B, (H/p)(W/p), C p p]`` in raster order of the patches.

    Raises:
        TypeError: ``z`` is not a tensor, or ``patch`` is not an integer.
        ValueError: ``z`` is not 4-dimensional, ``patch`` < 1, or H or W is not divisible by ``patch``.
    """
    _check_rank("patchify", "z", z, 4, "[B, C, H, W]")
    patch = _check_size("patchify", "patch", patch, 1)
    b, c, h, w = z.shape
    if h % patch or w % patch:
        raise ValueError(f"xlard.models.patchify: latent height and width must be divisible by patch={patch}, "
                         f"got {h} x {w} (pad the latent or choose a patch factor that divides both)")
    gh, gw = h // patch, w // patch
    return z.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * patch * patch)


def unpatchify(tokens: torch.Tensor, channels: int, height: int, width: int, patch: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, N, C p p]`` -> ``[B, C, H, W]``.

    Raises:
        TypeError: ``tokens`` is not a tensor, or a size is not an integer.
        ValueError: ``tokens`` is not ``[B, (H/p)(W/p), C p p]``, a size is negative, ``patch`` < 1, or
            ``height`` or ``width`` is not divisible by ``patch``.
    """
    _check_rank("unpatchify", "tokens", tokens, 3, "[B, N, C*patch*patch]")
    channels = _check_size("unpatchify", "channels", channels, 0)
    height = _check_size("unpatchify", "height", height, 0)
    width = _check_size("unpatchify", "width", width, 0)
    patch = _check_size("unpatchify", "patch", patch, 1)
    if height % patch or width % patch:
        raise ValueError(f"xlard.models.unpatchify: height and width must be divisible by patch={patch}, got "
                         f"{height} x {width}")
    b = tokens.shape[0]
    gh, gw = height // patch, width // patch
    if tokens.shape[1] != gh * gw or tokens.shape[2] != channels * patch * patch:
        raise ValueError(f"xlard.models.unpatchify: tokens must have shape [B, (H/p)(W/p), C*p*p] = "
                         f"[B, {gh * gw}, {channels * patch * patch}] for channels={channels}, height={height}, "
                         f"width={width}, patch={patch}, got {tuple(tokens.shape)}")
    return tokens.reshape(b, gh, gw, channels, patch, patch).permute(0, 3, 1, 4, 2, 5).reshape(
        b, channels, height, width)


def sincos_position_encoding(grid_h: int, grid_w: int, width: int, *, device=None,
                             dtype=torch.float32) -> torch.Tensor:
    """2D sine-cosine positions ``[grid_h * grid_w, width]`` for a raster-ordered token grid.

    The first half of the channels encodes the row, the second half the column,
    each as ``[sin(pos * omega_k), cos(pos * omega_k)]`` with
    ``omega_k = 10000 ** (-k / (width / 4))``. Computed in float64, then cast.

    Raises:
        TypeError: a size is not an integer, or ``dtype`` is not a floating torch dtype.
        ValueError: a size is negative, ``width`` is not a multiple of 4, or ``device`` is not a device.
    """
    grid_h = _check_size("sincos_position_encoding", "grid_h", grid_h, 0)
    grid_w = _check_size("sincos_position_encoding", "grid_w", grid_w, 0)
    width = _check_size("sincos_position_encoding", "width", width, 0)
    if width % 4:
        raise ValueError(f"xlard.models.sincos_position_encoding: width must be a multiple of 4, got {width}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"xlard.models.sincos_position_encoding: dtype must be a floating torch dtype (the "
                        f"encoding holds sines and cosines), got {_short(dtype)}")
    if device is not None and not isinstance(device, torch.device):  # (a torch.device, the model's own call: as is)
        device = _args.as_device(device, "xlard.models.sincos_position_encoding")
    quarter = width // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter))
    rows = torch.arange(grid_h, dtype=torch.float64, device=device).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, dtype=torch.float64, device=device).repeat(grid_h)
    parts = []
    for pos in (rows, cols):
        angle = pos[:, None] * omega[None, :]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).to(dtype)


# ----------------------------------------------------------------------------------
# Building blocks


class _Attention(nn.Module):
    """Multi-head attention through ``F.scaled_dot_product_attention``.

    Self-attention when ``context`` is None; otherwise queries come from ``x``
    and keys/values from ``context``. ``mask`` is bool ``[B, T]``, True = attend.
    """

    def __init__(self, width: int, heads: int, dropout: float, cross: bool):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.cross = cross
        if cross:
            self.q = nn.Linear(width, width)
            self.kv = nn.Linear(width, 2 * width)
        else:
            self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, d = t.shape
        return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x, context=None, mask=None):
        b, n, d = x.shape
        if self.cross:
            q = self.q(x)
            k, v = self.kv(context).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn_mask = None if mask is None else mask[:, None, None, :]
        y = F.scaled_dot_product_attention(self._split(q), self._split(k), self._split(v), attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the prompt, feed-forward."""

    def __init__(self, width: int, heads: int, ffn_mult: float, dropout: float):
        super().__init__()
        hidden = round(width * ffn_mult)
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = _Attention(width, heads, dropout, cross=False)
        self.norm_cross = nn.LayerNorm(width)
        self.cross_attn = _Attention(width, heads, dropout, cross=True)
        self.norm_ffn = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Dropout(dropout),
                                 nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, h, context, mask, has_text):
        h = h + self.drop(self.self_attn(self.norm_self(h)))
        # A prompt with no valid token contributes nothing (its row attends to a
        # placeholder mask and the result is zeroed) instead of a NaN softmax.
        h = h + self.drop(self.cross_attn(self.norm_cross(h), context, mask)) * has_text
        return h + self.drop(self.ffn(self.norm_ffn(h)))


class _LatentTransformer(nn.Module):
    """The trunk shared by the corrector and the projector.

    Patch embedding + 2D sine-cosine positions, FiLM from the pooled prompt
    (``Z' = (1 + gamma(W e_p)) * Z + beta(W e_p)``, the spec's
    ``gamma * Z + beta`` with gamma written as a residual around 1 so that a
    near-zero init starts near identity), then pre-norm blocks and a final norm.
    """

    def __init__(self, cfg, extra_channels: int = 0):
        super().__init__()
        self.patch = cfg.patch
        self.width = cfg.width
        self.patch_embed = nn.Linear((cfg.latent_channels + extra_channels) * cfg.patch * cfg.patch, cfg.width)
        self.cond = nn.Sequential(nn.Linear(cfg.pooled_dim, cfg.cond_dim), nn.SiLU())
        self.film = nn.Linear(cfg.cond_dim, 2 * cfg.width)
        self.text_norm = nn.LayerNorm(cfg.text_dim)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.width)
        self.blocks = nn.ModuleList(_Block(cfg.width, cfg.heads, cfg.ffn_mult, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.apply(_init_linear)
        nn.init.normal_(self.film.weight, std=0.02)

    def forward(self, z, text_tokens, pooled, text_mask):
        """Returns (tokens [B, N, width] after the final norm, cond [B, cond_dim])."""
        h, w = z.shape[-2:]
        tokens = self.patch_embed(patchify(z, self.patch))
        tokens = tokens + sincos_position_encoding(h // self.patch, w // self.patch, self.width,
                                                   device=z.device, dtype=tokens.dtype)
        cond = self.cond(pooled)
        gamma, beta = self.film(cond).chunk(2, dim=-1)
        tokens = (1 + gamma[:, None, :]) * tokens + beta[:, None, :]
        if text_mask is None:
            mask, has_text = None, 1.0
        else:
            # Zero padded tokens before projecting: padding (even NaN/inf) then has no effect at all.
            text_tokens = text_tokens.masked_fill(~text_mask[..., None], 0.0)
            any_valid = text_mask.any(dim=1)
            mask = text_mask | ~any_valid[:, None]
            has_text = any_valid[:, None, None].to(tokens.dtype)
        context = self.text_proj(self.text_norm(text_tokens))
        for block in self.blocks:
            tokens = block(tokens, context, mask, has_text)
        return self.norm(tokens), cond


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------
# Input checks and save/load


def _check_prompt(owner, batch, text_tokens, pooled, text_mask, text_dim, pooled_dim, device):
    _args.check_tensor(owner, "text_tokens", text_tokens, _args.FLOAT_DTYPES, dim=3)
    if text_tokens.shape[0] != batch or text_tokens.shape[2] != text_dim or text_tokens.shape[1] < 1:
        raise ValueError(f"xlard.{owner}: text_tokens must have shape [B, T, text_dim] = [{batch}, T >= 1, "
                         f"{text_dim}], got {tuple(text_tokens.shape)}")
    _args.check_tensor(owner, "pooled", pooled, _args.FLOAT_DTYPES, dim=2)
    if tuple(pooled.shape) != (batch, pooled_dim):
        raise ValueError(f"xlard.{owner}: pooled must have shape [B, pooled_dim] = [{batch}, {pooled_dim}], "
                         f"got {tuple(pooled.shape)}")
    if text_mask is not None:
        _args.check_tensor(owner, "text_mask", text_mask,
                           (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64), dim=2)
        if tuple(text_mask.shape) != tuple(text_tokens.shape[:2]):
            raise ValueError(f"xlard.{owner}: text_mask must have shape [B, T] = {list(text_tokens.shape[:2])} "
                             f"(True or 1 = a real token), got {tuple(text_mask.shape)}")
        text_mask = text_mask if text_mask.dtype == torch.bool else text_mask != 0
    _args.check_same_device(owner, text_tokens=text_tokens, pooled=pooled, text_mask=text_mask)
    if text_tokens.device != device:
        raise ValueError(f"xlard.{owner}: inputs are on {text_tokens.device} but the model is on {device}")
    return text_mask


def _check_latent(owner, name, z, channels, patch, device):
    _args.check_tensor(owner, name, z, _args.FLOAT_DTYPES, dim=4)
    b, c, h, w = z.shape
    if c != channels or b < 1 or h < 1 or w < 1:
        raise ValueError(f"xlard.{owner}: {name} must have shape [B, C, H, W] with C = latent_channels = "
                         f"{channels} and B, H, W >= 1, got {tuple(z.shape)}")
    if h % patch or w % patch:
        raise ValueError(f"xlard.{owner}: {name} height and width must be divisible by patch={patch}, got "
                         f"{h} x {w} (pad the latent or choose a patch factor that divides both)")
    if z.device != device:
        raise ValueError(f"xlard.{owner}: {name} is on {z.device} but the model is on {device}")


def _refuse_non_finite(owner, z0, text_tokens, pooled, text_mask, latent_name: str = "z0") -> None:
    """Inference inputs must be finite: a backbone's NaN or infinite latents or prompt embeddings (a float16
    overflow, say) would otherwise come out as a NaN image with no word said. Only tensors are looked at
    (the shape and type checks that follow name anything else); padded prompt tokens may hold anything."""
    if torch.compiler.is_compiling():  # a data-dependent check would break the graph; eager calls check
        return

    def values(t):  # meta tensors hold no values: the device check that follows names them
        return t if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not t.is_meta else None

    tokens = values(text_tokens)
    if tokens is not None and isinstance(text_mask, torch.Tensor) and not text_mask.is_floating_point() \
            and not text_mask.is_complex() and not text_mask.is_meta \
            and tokens.dim() == 3 and tuple(text_mask.shape) == tuple(tokens.shape[:2]) \
            and text_mask.device == tokens.device:
        tokens = tokens[text_mask != 0]  # a bool mask or 0/1 ints (the ints' padding was checked as real tokens)
    for name, t in ((latent_name, values(z0)), ("text_tokens", tokens), ("pooled", values(pooled))):
        if t is not None and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"xlard.{owner}: {name} holds {bad} NaN or infinite value(s) of {t.numel()}; the "
                             "backbone's outputs are broken (a float16 overflow? try float32 or bfloat16), and "
                             "anything computed from them would be NaN")


def _refuse_non_finite_tensor(owner, name, t, hint: str) -> None:
    """One tensor argument must be finite (``noise``, ``delta``, ``mean``, a tensor ``alpha``): named, with the
    count of bad values. (The ops take values as they come, as torch's own ops do: a NaN step would come out as
    a NaN latent blamed on nothing.) Anything but a float tensor is left to the shape and type checks."""
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not t.is_meta \
            and not torch.compiler.is_compiling() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"xlard.{owner}: {name} holds {int((~torch.isfinite(t)).sum())} NaN or infinite "
                         f"value(s) of {t.numel()}; {hint}")


def _refuse_overflow(owner, z0, out, alpha=None, stepped: bool = True) -> None:
    """Finite inputs whose correction is not finite (latents far beyond any the corrector saw, or a huge step):
    an error naming the input's scale and the step (``stepped``: the output is z0 plus a step), not a NaN image."""
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(out).all()):
        if not stepped:
            raise ValueError(f"xlard.{owner}: the correction of z0 overflowed in {out.dtype} (z0's largest "
                             f"magnitude is {float(z0.abs().max()):.3g}; the corrector's backbone makes latents of "
                             "order 1: is z0 scaled by the VAE's scaling_factor?)")
        if isinstance(alpha, torch.Tensor):
            step = float(alpha.abs().max()) if alpha.numel() else 0.0
        else:
            step = abs(float(1.0 if alpha is None else alpha))
        raise ValueError(f"xlard.{owner}: the correction of z0 overflowed in {out.dtype} (z0's largest magnitude "
                         f"is {float(z0.abs().max()):.3g}, alpha's {step:.3g}; the corrector's backbone makes "
                         "latents of order 1 and alpha is a step of order 1: is z0 scaled by the VAE's "
                         "scaling_factor?)")


def _refuse_bad_weights(owner, pooled, weights) -> None:
    """The confidence head's joint-reward weights must be finite: a prompt embedding far beyond any the head saw
    (or a NaN in it) gave NaN weights, and a NaN joint reward, without a word."""
    if torch.compiler.is_compiling() or bool(torch.isfinite(weights).all()):
        return
    if not bool(torch.isfinite(pooled).all()):
        raise ValueError(f"xlard.{owner}: pooled holds NaN or infinite values (the text encoder's pooled "
                         "embedding overflowed?)")
    raise ValueError(f"xlard.{owner}: the confidence head's weights overflowed (pooled's largest magnitude is "
                     f"{float(pooled.abs().max()):.3g}; a text encoder's pooled embedding is of order 1-100: is "
                     "pooled the prompt's embedding?)")


class _Pretrained:
    """save_pretrained / from_pretrained for a module built from one config dataclass."""

    config_class: ClassVar[type]
    config: Any

    def save_pretrained(self, directory) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory``.

        Both files are written to a temporary folder beside ``directory`` first.
        A new ``directory`` appears with one atomic rename (both files or none);
        an existing one is swapped for a new folder at the same path holding
        the new files and its other entries (a reader may briefly find no
        folder, never a half-written or half-old one; a shell inside it must
        enter it again; :func:`xlard._io.atomic_folder`).

        Args:
            directory (str or PathLike): the target folder; parents are created.

        Returns:
            Path: ``directory``.

        Example:
            >>> import os, tempfile
            >>> from xlard.models import CorrectorConfig, ResidualCorrector
            >>> corrector = ResidualCorrector(CorrectorConfig.tiny())
            >>> folder = corrector.save_pretrained(os.path.join(tempfile.mkdtemp(), "corrector"))
            >>> sorted(path.name for path in folder.iterdir())
            ['config.json', 'model.safetensors']
        """
        _safetensors()  # a clear ImportError before any work
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"{type(self).__name__}.save_pretrained: {directory} exists and is not a folder")
        state = {}
        for name, tensor in self.state_dict().items():  # type: ignore[attr-defined]
            if tensor.is_meta:
                raise ValueError(f"{type(self).__name__}.save_pretrained: {name} is on the meta device (no data)")
            state[name] = tensor.detach().cpu().contiguous()
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in state.values()})
        meta = {"model": type(self).__name__, "format_version": _FORMAT_VERSION, "xlard_version": xlard.__version__,
                "dtypes": dtypes, "config": self.config.to_dict()}
        owner = f"{type(self).__name__}.save_pretrained"
        with _io.atomic_folder(directory, owner=owner, existing="merge") as tmp:
            _io.atomic_save_safetensors(tmp / WEIGHTS_NAME, state,
                                        metadata={"format": "pt", "model": type(self).__name__}, owner=owner)
            _io.atomic_write_json(tmp / CONFIG_NAME, meta, owner=owner, sort_keys=True)
        return directory

    @classmethod
    def from_pretrained(cls, directory, *, device=None, dtype=None):
        """Rebuild a model saved by :meth:`save_pretrained`, bit for bit.

        The module is built on the meta device and the stored tensors are
        assigned to it (no random initialisation, no second copy), then moved to
        ``device``/``dtype`` when given. Returned in eval mode.

        Args:
            directory (str or PathLike): folder with ``model.safetensors`` and ``config.json``.
            device (torch.device or str, optional): where to put the model (default CPU).
            dtype (torch.dtype, optional): cast floating tensors (default: as saved).

        Raises:
            FileNotFoundError: the folder or one of its two files is missing.
            ValueError: an unreadable file, a config of another model or with bad
                fields, or weights that do not match the config.

        Example:
            >>> import os, tempfile, torch
            >>> from xlard.models import CorrectorConfig, ResidualCorrector
            >>> saved = ResidualCorrector(CorrectorConfig.tiny())
            >>> folder = saved.save_pretrained(os.path.join(tempfile.mkdtemp(), "corrector"))
            >>> corrector = ResidualCorrector.from_pretrained(folder)
            >>> corrector.training, all(torch.equal(a, b) for a, b in
            ...                         zip(saved.state_dict().values(), corrector.state_dict().values()))
            (False, True)
            >>> corrector = ResidualCorrector.from_pretrained("runs/corrector", device="cuda")  # doctest: +SKIP
        """
        st = _safetensors()
        owner = f"{cls.__name__}.from_pretrained"
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not directory.is_dir():
            raise FileNotFoundError(f"{owner}: no folder at {directory}")
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{owner}: missing {path} (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"{owner}: dtype must be a floating torch.dtype or None, got {dtype!r}")
        device = _args.as_device(device, owner)
        # Everything below is checked against the two files' small parts (the JSON and the
        # safetensors header) before the model is built for real or a weight is read.
        meta = _read_config_file(owner, config_path)
        if meta.get("model") != cls.__name__:
            raise ValueError(f"{owner}: {config_path} describes a {_short(meta.get('model'))}, not a {cls.__name__}")
        version = meta.get("format_version")
        if type(version) is not int or version != _FORMAT_VERSION:
            raise ValueError(f"{owner}: {config_path} has format_version {_short(version)} "
                             f"({type(version).__name__}); this xlard reads the integer {_FORMAT_VERSION}")
        stray = sorted(set(meta) - _CONFIG_FILE_KEYS)
        if stray:  # e.g. a model field edited in at the top level, where it would be silently ignored
            raise ValueError(f"{owner}: {config_path} has unknown top-level keys {stray[:5]} (it holds "
                             f"{sorted(_CONFIG_FILE_KEYS)}; the model's fields go under 'config')")
        try:
            config = cls.config_class.from_dict(meta["config"])
        except ValueError as e:
            raise ValueError(f"{owner}: bad config in {config_path}: {e}") from None
        stored = _read_safetensors_header(owner, st, weights_path)
        saved_dtypes = meta.get("dtypes")
        if saved_dtypes is not None and (not isinstance(saved_dtypes, list)
                                         or not all(isinstance(d, str) for d in saved_dtypes)):
            raise ValueError(f"{owner}: {config_path} 'dtypes' must be a list of dtype names, got {_short(saved_dtypes)}")
        with torch.device("meta"):
            model = cls(config)  # type: ignore[call-arg]
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        missing = sorted(set(expected) - set(stored))
        unexpected = sorted(set(stored) - set(expected))
        wrong = sorted(f"{k}: stored {stored[k][0]}, config wants {expected[k]}"
                       for k in set(expected) & set(stored) if stored[k][0] != expected[k])
        if missing or unexpected or wrong:
            raise ValueError(f"{owner}: the weights in {weights_path} do not match the config in {config_path}: "
                             f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
                             f"wrong shapes {wrong[:5]}{'...' if len(wrong) > 5 else ''}")
        meta_state = model.state_dict()
        float_counts: dict[torch.dtype, int] = {}
        for k, (_, dt) in stored.items():
            if meta_state[k].is_floating_point() and dt.is_floating_point:
                float_counts[dt] = float_counts.get(dt, 0) + 1
        main = max(float_counts, key=float_counts.get) if float_counts else None
        odd = sorted(k for k, (_, dt) in stored.items()
                     if (dt != main if meta_state[k].is_floating_point() else dt != meta_state[k].dtype))
        float_dtypes = sorted(str(dt).replace("torch.", "") for dt in float_counts)
        if odd:
            all_dtypes = sorted({str(dt).replace("torch.", "") for _, dt in stored.values()})
            raise ValueError(f"{owner}: the weights in {weights_path} mix dtypes ({', '.join(all_dtypes)}; e.g. "
                             f"{', '.join(f'{k}: {stored[k][1]}' for k in odd[:3])}); save_pretrained writes one "
                             "floating dtype for the whole model")
        if saved_dtypes is not None and sorted(saved_dtypes) != sorted({str(dt).replace("torch.", "")
                                                                      for _, dt in stored.values()}):
            raise ValueError(f"{owner}: {config_path} says the weights are {saved_dtypes}, but {weights_path} "
                             f"holds {float_dtypes}; the two files do not belong together")
        try:
            state = st.load_file(str(weights_path), device="cpu")
        except Exception as e:  # safetensors raises its own error type for a corrupt header or truncated data
            raise ValueError(f"{owner}: {weights_path} is not a readable safetensors file ({e})") from None
        bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:  # else NaN scores or latents later, blamed on the inputs
            # the file parsed, so a damaged one (bytes overwritten in a copy) reads the same as a diverged run's
            raise ValueError(f"{owner}: {weights_path} holds non-finite values in {len(bad)} tensor(s) (e.g. "
                             f"{', '.join(repr(k) for k in bad[:3])}): weights of a diverged run, or a damaged file "
                             "(overwritten bytes in a copy or download); use an earlier checkpoint, or copy the "
                             "file again")
        model.load_state_dict(state, strict=True, assign=True)
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model.eval()

    def num_parameters(self, trainable_only: bool = True) -> int:
        """Number of (trainable) parameters."""
        return sum(p.numel() for p in self.parameters()  # type: ignore[attr-defined]
                   if p.requires_grad or not trainable_only)


_MAX_CONFIG_BYTES = 1 << 20  # save_pretrained writes a few hundred bytes


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


#: The top-level keys of a saved model's ``config.json`` (format version 1).
_CONFIG_FILE_KEYS = frozenset({"model", "format_version", "xlard_version", "config", "dtypes"})


def _read_config_file(owner: str, config_path: Path) -> dict:
    """``config.json`` as a dict with a ``config`` entry; hostile files give one ValueError."""
    meta = _io.read_json(config_path, owner=owner, max_bytes=_MAX_CONFIG_BYTES,
                         what="a config written by save_pretrained")
    if not isinstance(meta, dict) or "config" not in meta:
        raise ValueError(f"{owner}: {config_path} has no 'config' entry; not written by save_pretrained")
    return meta


def _read_safetensors_header(owner: str, st, weights_path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{name: (shape, dtype)}`` from the file's header alone (no tensor data is read)."""
    from safetensors import safe_open

    try:  # a permission problem is one, not "not a readable safetensors file (No such file or directory)"
        with open(weights_path, "rb"):
            pass
    except OSError as e:
        raise type(e)(e.errno, f"{owner}: cannot read {weights_path}: {e.strerror}") from None
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            out = {}
            for key in f.keys():
                sl = f.get_slice(key)
                name = sl.get_dtype()
                if name not in _SAFETENSORS_DTYPES:
                    raise ValueError(f"{owner}: {weights_path}: tensor {key!r} has dtype {name}, which xlard "
                                     "models never store")
                out[key] = (tuple(int(d) for d in sl.get_shape()), _SAFETENSORS_DTYPES[name])
            return out
    except ValueError as e:
        if str(e).startswith(owner):
            raise
        raise ValueError(f"{owner}: {weights_path} is not a readable safetensors file ({e})") from None
    except Exception as e:  # safetensors' own error type for a corrupt header
        raise ValueError(f"{owner}: {weights_path} is not a readable safetensors file ({e})") from None


_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                       "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool, "U8": torch.uint8}


def _safetensors():
    return require("safetensors.torch", "xlard.models save_pretrained/from_pretrained")


def count_parameters(config) -> int:
    """Trainable parameters of the model a config describes, built on the meta device (no memory, no init cost).

    Example:
        >>> from xlard.models import CorrectorConfig, count_parameters
        >>> count_parameters(CorrectorConfig.paper())
        16165089
    """
    model_cls = {CorrectorConfig: ResidualCorrector, ProjectorConfig: LatentRewardProjector}.get(type(config))
    if model_cls is None:
        raise TypeError(f"xlard.models.count_parameters: config must be a CorrectorConfig or ProjectorConfig, "
                        f"got {type(config).__name__}")
    with torch.device("meta"):
        return model_cls(config).num_parameters()


# ----------------------------------------------------------------------------------
# The corrector (policy + value)


@dataclass(frozen=True)
class GaussianPolicy:
    """The policy at one state: ``N(mean, exp(log_std)^2)`` per latent element.

    Attributes:
        mean (Tensor[B, C, H, W], float32; float64 for float64 latents): Delta_theta(z0, e_p).
        log_std (Tensor[C]): the learnable per-channel log std (state-independent).
    """

    mean: torch.Tensor
    log_std: torch.Tensor

    def log_prob(self, delta: torch.Tensor) -> torch.Tensor:
        """``log N(delta; mean, std^2)`` summed over C*H*W, ``[B]`` float32, via :func:`xlard.ops.gaussian_log_prob`."""
        _args.check_tensor("GaussianPolicy.log_prob", "delta", delta, _args.FLOAT_DTYPES)  # a list: AttributeError
        # a NaN action came back as a NaN log-probability without a word (ResidualCorrector.log_prob refused it)
        _refuse_non_finite_tensor("GaussianPolicy.log_prob", "delta", delta,
                                  "a log-probability of it would be NaN (a rollout's action?)")
        return xops.gaussian_log_prob(delta.to(self.mean.dtype), self.mean, self.log_std.to(self.mean.dtype))

    def entropy(self) -> torch.Tensor:
        """Differential entropy summed over C*H*W, ``[B]`` (state-independent, so equal across the batch)."""
        per_channel = self.log_std.to(self.mean.dtype) + 0.5 * math.log(2 * math.pi * math.e)
        spatial = self.mean[0, 0].numel()
        return (per_channel.sum() * spatial).expand(self.mean.shape[0])


def _is_int_tensor(t) -> bool:
    """A tensor of an integer dtype (not bool, float or complex): what the cell-move helpers take as indices."""
    return isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def _check_noun_indices(owner: str, nouns: torch.Tensor, num_nouns: int) -> None:
    if nouns.numel() and (int(nouns.min()) < -1 or int(nouns.max()) >= num_nouns):
        raise ValueError(f"{owner}: nouns must be -1 (unknown) or an index into the {num_nouns} noun maps, got "
                         f"values in [{int(nouns.min())}, {int(nouns.max())}]")


def copy_cells(z: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``z`` with every cell replaced by the cell ``source`` names: ``out[b, :, i] = z[b, :, source[b, i]]``.

    Args:
        z (Tensor[B, C, H, W]): latents.
        source (Tensor[B, H*W] integer): flat source index of each cell, in ``[0, H*W)``.

    Returns:
        Tensor[B, C, H, W] like ``z``.

    Raises:
        ValueError: a source map of the wrong shape or with an index out of range.
    """
    if not isinstance(z, torch.Tensor) or z.dim() != 4:
        raise ValueError(f"copy_cells: z must be a latent tensor [B, C, H, W], got "
                         f"{list(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    b, c, h, w = z.shape
    if not _is_int_tensor(source) or tuple(source.shape) != (b, h * w):
        raise ValueError(f"copy_cells: source must be an integer tensor of shape {(b, h * w)}, got "
                         f"{getattr(source, 'shape', type(source).__name__)}")
    if source.numel() and (int(source.min()) < 0 or int(source.max()) >= h * w):
        raise ValueError(f"copy_cells: source indices must lie in [0, {h * w}), got [{int(source.min())}, "
                         f"{int(source.max())}]")
    flat = z.reshape(b, c, h * w)
    return flat.gather(2, source.to(z.device, torch.int64)[:, None, :].expand(b, c, h * w)).reshape(b, c, h, w)


def _shift_cells(t: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``t [H, W]`` moved by ``(dy, dx)`` cells, zero-filled (nothing wraps around)."""
    out = torch.zeros_like(t)
    h, w = t.shape
    if abs(dy) < h and abs(dx) < w:
        out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = t[max(-dy, 0):h - max(dy, 0),
                                                                       max(-dx, 0):w - max(dx, 0)]
    return out


def largest_parts(labels: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``labels [B, H*W]`` with each nonzero label kept only on its largest 8-connected part (the rest: 0).

    A move head labels one object per slot; stray cells of a label elsewhere would
    otherwise be carried along as fragments.

    Raises:
        ValueError: labels not an integer tensor ``[B, h*w]`` of 0 (none), 1 (subject) and 2 (object).
    """
    if not _is_int_tensor(labels) or labels.dim() != 2 or labels.shape[1] != h * w:
        raise ValueError(f"largest_parts: labels must be an integer tensor [B, {h * w}], got "
                         f"{getattr(labels, 'shape', type(labels).__name__)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 2):  # a label 3 was dropped silently
        raise ValueError(f"largest_parts: labels must be 0 (none), 1 (subject) or 2 (object), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    out = torch.zeros_like(labels)
    grid = labels.view(-1, h, w)
    for k in (1, 2):
        mask = grid == k
        if not mask.any():
            continue
        parts, _ = xops.label_components(mask.to(torch.uint8), connectivity=8)
        parts = parts.view(parts.shape[0], -1).long()
        sizes = torch.zeros(parts.shape[0], int(parts.max()) + 1, dtype=torch.long, device=parts.device)
        sizes.scatter_add_(1, parts, torch.ones_like(parts))
        sizes[:, 0] = 0
        best = sizes.argmax(1, keepdim=True)
        keep = (parts == best) & (best > 0)
        out[keep] = k
    return out


def move_sources(labels: torch.Tensor, shifts: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Where every cell's content comes from when a relation's two objects move.

    The cells labelled 1 (the subject) and 2 (the object) are copied to their
    places shifted by ``shifts[:, k - 1]`` cells; every other cell they leave
    copies the nearest cell with label 0 (the editor's rule,
    :func:`xlard.shapes.editor.move_plan`); the object's copy is drawn over the
    subject's where the two overlap.

    Args:
        labels (Tensor[B, H*W] integer): 0 none, 1 subject, 2 object.
        shifts (Tensor[B, 2, 2] integer): per slot (subject, object), the shift in (rows, columns).
        h, w: the latent's height and width.

    Returns:
        Tensor[B, H*W] int64: the flat source index of every cell (see :func:`copy_cells`).

    Raises:
        ValueError: labels or shifts of the wrong shape or type, or labels outside 0..2.
    """
    if not _is_int_tensor(labels) or labels.dim() != 2 or labels.shape[1] != h * w:
        raise ValueError(f"move_sources: labels must be an integer tensor [B, {h * w}], got "
                         f"{getattr(labels, 'shape', type(labels).__name__)}")
    if not _is_int_tensor(shifts) or tuple(shifts.shape) != (labels.shape[0], 2, 2):
        raise ValueError(f"move_sources: shifts must be an integer tensor [{labels.shape[0]}, 2, 2], got "
                         f"{getattr(shifts, 'shape', type(shifts).__name__)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 2):
        raise ValueError(f"move_sources: labels must be 0 (none), 1 (subject) or 2 (object), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    b, n = labels.shape
    index = torch.arange(n, device=labels.device).view(h, w)
    out = index.flatten().repeat(b, 1)
    grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).float().to(labels.device)
    for i in range(b):
        lab = labels[i].view(h, w)
        left = lab > 0
        if not left.any():
            continue
        src = index.clone()
        free = ~left
        if free.any():
            near = torch.cdist(grid[left], grid[free]).argmin(1)
            src[left] = index[free][near]
        for k in (1, 2):
            mask = lab == k
            if not mask.any():
                continue
            dy, dx = int(shifts[i, k - 1, 0]), int(shifts[i, k - 1, 1])
            dest = _shift_cells(mask, dy, dx)
            src[dest] = _shift_cells(index, dy, dx)[dest]
        out[i] = src.flatten()
    return out


#: The trunk's extra input channels from a corrector's reader: entity 0's noun map, its color map,
#: entity 1's noun map, its color map.
READER_CHANNELS = 4


class LatentReader(nn.Module):
    """Per latent cell, which of ``nouns`` and which of ``colors`` the decoded image shows there.

    Four 3x3 convolutions (GroupNorm, SiLU) on the normalised latent and a 1x1 head:
    ``len(nouns)`` independent noun logits (a cell may hold no object) and ``1 + len(colors)``
    color logits (background first). ``shift`` / ``scale`` (buffers) normalise z0 per
    channel; :func:`xlard.train.distill.fit_reader` sets them and fits the weights on the
    understanding model's reading of decoded latents.

    Args:
        channels (int): C of the latent.
        nouns, colors (sequence of str): the vocabulary.
        width (int): convolution channels, a multiple of 8.
    """

    def __init__(self, channels: int, nouns, colors, width: int = 64):
        super().__init__()
        self.nouns, self.colors = tuple(nouns), tuple(colors)

        def block(i: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(i, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU())

        self.body = nn.Sequential(block(channels), block(width), block(width), block(width))
        self.out = nn.Conv2d(width, len(self.nouns) + 1 + len(self.colors), 1)
        self.register_buffer("shift", torch.zeros(1, channels, 1, 1))
        self.register_buffer("scale", torch.ones(1, channels, 1, 1))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noun logits [B, len(nouns), H, W], color logits [B, 1 + len(colors), H, W])``."""
        x = self.out(self.body((z - self.shift) / self.scale))
        return x[:, :len(self.nouns)], x[:, len(self.nouns):]

    def maps(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noun probabilities [B, len(nouns), H, W] (sigmoid), color distribution [B, 1 + len(colors), H, W])``."""
        nouns, colors = self(z)
        return torch.sigmoid(nouns), torch.softmax(colors, dim=1)


@functools.lru_cache(maxsize=64)
def _field_table(keys: tuple[tuple[str, object, str], ...], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(table [K, dim], limit [K])`` for ``keys`` of ``(kind, value, slot)``: each row the field token of that
    value in that slot (:func:`xlard.prompts.fields.field_vector` of the value plus that of ``("slot", slot)``) and
    the distance under which a token is that row (5% of its norm). Cached per key tuple and width: the read-backs
    below run on every corrector call; callers never write to the tensors."""
    from xlard.prompts.fields import field_vector

    table = torch.stack([field_vector(kind, value, dim) + field_vector("slot", slot, dim) for kind, value, slot in keys])
    return table, 0.05 * table.norm(dim=1)


def _field_hits(text_tokens: torch.Tensor, text_mask: torch.Tensor | None, keys, dim: int) -> torch.Tensor:
    """``[B, K]`` bool: whether some real token of each row is (within 5% of its norm) the field token of key k
    (:func:`_field_table`)."""
    table, limit = _field_table(tuple(keys), dim)
    dev = text_tokens.device
    table, limit = table.to(dev), limit.to(dev)
    b = text_tokens.shape[0]
    tokens = text_tokens.float()
    if text_mask is not None:
        tokens = tokens.masked_fill(~text_mask.bool()[..., None], float("nan"))  # padding matches nothing
    dist = torch.cdist(tokens.reshape(-1, dim), table).view(b, -1, table.shape[0])    # [B, T, K]
    return (dist < limit).any(dim=1)                                                 # NaN rows: no hit


def _last_hit(hits: torch.Tensor) -> torch.Tensor:
    """``[B]`` int64: the index of each row's last True column of ``hits [B, n]`` (-1 for none)."""
    if hits.shape[1] == 0:
        return torch.full((hits.shape[0],), -1, dtype=torch.long, device=hits.device)
    index = torch.arange(hits.shape[1], device=hits.device).expand_as(hits)
    return torch.where(hits, index, -1).amax(1)


@torch.no_grad()
def slot_fields(cfg: "CorrectorConfig", text_tokens: torch.Tensor, text_mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first two entities' noun and color, read back from ``"fields"`` tokens.

    Each field token is a fixed vector per (value, slot) (:mod:`xlard.prompts.fields`), so
    the entity in slot k names noun ``v`` exactly when one of its tokens is that vector.

    Returns:
        (nouns [B, 2], colors [B, 2]) int64: the index into ``cfg.reader_nouns`` /
        ``cfg.reader_colors``; -1 for no entity, no color, or a word the reader does not know.
    """
    dim, dev = cfg.text_dim, text_tokens.device
    b = text_tokens.shape[0]
    if not cfg.reader_nouns and not cfg.reader_colors:
        return (torch.full((b, 2), -1, dtype=torch.long, device=dev),
                torch.full((b, 2), -1, dtype=torch.long, device=dev))
    keys = [(kind, word, f"{k}:{kind}") for kind, words in (("noun", cfg.reader_nouns), ("color", cfg.reader_colors))
            for k in range(2) for word in words]
    hit = _field_hits(text_tokens, text_mask, keys, dim)
    # per kind and slot, the last word of the list that hits (as a loop over the keys in order would leave it)
    n, c = len(cfg.reader_nouns), len(cfg.reader_colors)
    nouns = torch.stack([_last_hit(hit[:, k * n:(k + 1) * n]) for k in range(2)], 1)
    colors = torch.stack([_last_hit(hit[:, 2 * n + k * c:2 * n + (k + 1) * c]) for k in range(2)], 1)
    return nouns, colors


@torch.no_grad()
def relation_fields(cfg: "CorrectorConfig", text_tokens: torch.Tensor, text_mask: torch.Tensor | None
                    ) -> torch.Tensor:
    """The relation between the first two entities, read back from ``"fields"`` tokens.

    A relation's token is the vector of its name plus the vector of its slot
    ``relation:{subject}->{object}`` (:mod:`xlard.prompts.fields`).

    Returns:
        Tensor[B, 3] int64: (index into :data:`xlard.vocab.RELATIONS`, subject slot, object slot),
        ``(-1, -1, -1)`` for a prompt with no such relation; the first of :data:`~xlard.vocab.RELATIONS`
        wins if a prompt has several.
    """
    dim, dev = cfg.text_dim, text_tokens.device
    keys = [(r, a, 1 - a) for r in range(len(RELATIONS)) for a in (0, 1)]
    hit = _field_hits(text_tokens, text_mask, [("relation", RELATIONS[r], f"relation:{a}->{o}") for r, a, o in keys],
                      dim)
    # the first key found wins: the last hit of the keys in reverse order
    last = _last_hit(hit.flip(1))
    first = len(keys) - 1 - last
    values = torch.tensor(keys, dtype=torch.long, device=dev)
    return torch.where((last >= 0)[:, None], values[first.clamp(max=len(keys) - 1)], -1)


def _reader_evidence(noun_p: torch.Tensor, color_p: torch.Tensor, nouns: torch.Tensor, colors: torch.Tensor
                     ) -> torch.Tensor:
    """``[B, READER_CHANNELS, H, W]`` from a reader's maps (:meth:`LatentReader.maps`): per entity slot k, the
    map of its noun (0 when unknown or absent) and of its color (any color, 1 - background, when the prompt
    names none; 0 when unknown or no entity)."""
    hw = noun_p.shape[-2:]
    out = []
    for k in range(2):
        n, c = nouns[:, k], colors[:, k]
        noun_map = noun_p.gather(1, n.clamp(min=0)[:, None, None, None].expand(-1, 1, *hw))
        noun_map = noun_map * (n >= 0)[:, None, None, None]
        color_map = color_p.gather(1, (c + 1).clamp(min=0)[:, None, None, None].expand(-1, 1, *hw))
        any_color = 1.0 - color_p[:, :1]
        # c == -1: the prompt names no color for this entity, or a color the reader does not know; an
        # entity is present when its noun token is (n >= 0) -- an unknown noun still gets its color map.
        color_map = torch.where((c >= 0)[:, None, None, None], color_map, any_color)
        present = (n >= 0) | (c >= 0)
        out += [noun_map, color_map * present[:, None, None, None]]
    return torch.cat(out, dim=1)


def relation_targets(relation: str, centre_subject, centre_object, h: int, w: int, margin: float
                     ) -> tuple[int, tuple[float, float]] | None:
    """The editor's relation rule: where a relation's two objects go when it does not hold.

    Returns ``None`` if ``relation`` holds by more than ``margin`` (in the units of the
    ``(y, x)`` centres, e.g. pixels of an ``h x w`` image) between the subject's and the
    object's centre, else ``(axis, (subject's target, object's target))``: the two objects
    go to 0.27 and 0.73 of the relation's axis (0: rows, 1: columns), in the asked order.

    Example:
        >>> from xlard.models import relation_targets
        >>> relation_targets("left_of", (8, 40), (8, 20), 64, 64, 6)
        (1, (17.28, 46.72))
    """
    if relation not in RELATIONS:
        raise ValueError(f"relation_targets: relation must be one of {list(RELATIONS)}, got {relation!r}")
    axis = 1 if relation in ("left_of", "right_of") else 0
    sign = -1 if relation in ("left_of", "above") else 1  # subject's coordinate minus the object's
    if sign * (centre_subject[axis] - centre_object[axis]) > margin:
        return None
    extent = w if axis else h
    return axis, ((0.27 * extent, 0.73 * extent) if sign < 0 else (0.73 * extent, 0.27 * extent))


def _mask_centre(mask: torch.Tensor) -> tuple[float, float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return float(ys.double().mean()), float(xs.double().mean())


def relation_cells(subject: torch.Tensor, object_: torch.Tensor, relation: str, latent_hw, margin: float
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The latent move that puts a relation's two objects in the asked order (:func:`relation_targets`).

    Args:
        subject, object_ (bool Tensor[H, W]): the two objects' masks (non-empty) on a grid ``factor``
            times the latent's in each direction.
        relation: one of :data:`xlard.vocab.RELATIONS`.
        latent_hw: ``(h, w)`` of the latent.
        margin: how far (in points of the masks' grid) the relation must hold to be left alone.

    Returns:
        ``None`` when the relation holds, else ``(labels [h, w] int64, shifts [2, 2] int64)`` for
        :func:`move_sources`: each object's latent cells (those under its mask grown by one cell of
        the mask's grid, then by one latent cell; 1 subject, 2 object; a cell under one object's mask is
        that object's even where the other's ring reaches it, and a cell under both goes to the object) and
        its whole-cell shift in (rows, columns).
    """
    lh, lw = latent_hw
    h, w = subject.shape
    if h % lh or w % lw or h // lh != w // lw or object_.shape != subject.shape:
        raise ValueError(f"relation_cells: masks {tuple(subject.shape)} / {tuple(object_.shape)} must share one "
                         f"size, the same multiple of the latent's {(lh, lw)}")
    if not subject.any() or not object_.any():
        raise ValueError("relation_cells: subject and object_ masks must not be empty")
    factor = h // lh
    cs, co = _mask_centre(subject), _mask_centre(object_)
    move = relation_targets(relation, cs, co, h, w, margin)
    if move is None:
        return None
    axis, targets = move
    labels = torch.zeros(lh, lw, dtype=torch.int64)
    shifts = torch.zeros(2, 2, dtype=torch.int64)
    cores = []
    for k, (mask, centre, target) in enumerate(((subject, cs, targets[0]), (object_, co, targets[1]))):
        t = mask.detach().float().cpu()[None, None]
        core = F.max_pool2d(F.max_pool2d(t, 3, 1, 1), factor)  # the cells under the object (grown by a pixel)
        labels[F.max_pool2d(core, 3, 1, 1)[0, 0] > 0] = k + 1  # and a ring of one cell around them
        cores.append(core[0, 0] > 0)
        shifts[k, axis] = int(round((target - centre[axis]) / factor))
    # Cores over rings: the object's ring took the subject's own cells where the two were close, and a part of the
    # subject moved with the object (a circle 3 px from a square lost 40 of its 100 pixels to the square's side).
    for k, core in enumerate(cores):
        labels[core] = k + 1
    return labels, shifts


#: :func:`reader_move_sources` finds objects on the reader's noun maps upsampled this many times (bilinear),
#: as the understanding model's 64 x 64 maps are 4x the shapes latent: a probability above 0.5, at
#: least half a latent cell (8 points of the finer grid), 8-connected; the most confident part per entity.
READER_MOVE_FACTOR = 4


def _best_parts(prob: torch.Tensor, threshold: float = 0.5, min_area: int = 8) -> torch.Tensor:
    """``prob [B, H, W]`` -> bool ``[B, H, W]``: per map its connected part (``prob > threshold``,
    8-connected, at least ``min_area`` points) of highest mean probability; empty when there is none."""
    labels, _ = xops.label_components(prob[:, None].float().contiguous(), threshold=threshold, mode="absolute",
                                      min_area=min_area, connectivity=8)
    labels = labels[:, 0].reshape(prob.shape[0], -1).long()
    n = int(labels.max()) + 1 if labels.numel() else 1
    flat = prob.reshape(prob.shape[0], -1).float()
    sums = torch.zeros(prob.shape[0], n, device=prob.device).scatter_add_(1, labels, flat)
    sizes = torch.zeros(prob.shape[0], n, device=prob.device).scatter_add_(1, labels, torch.ones_like(flat))
    mean = torch.where(sizes > 0, sums / sizes.clamp(min=1), torch.full_like(sums, -1.0))
    mean[:, 0] = -1.0
    best = mean.argmax(1, keepdim=True)  # ties: the lowest label, as xlard.shapes.editor.find_objects
    return ((labels == best) & (mean.gather(1, best) >= 0)).view(prob.shape)


@torch.no_grad()
def reader_move_sources(noun_probs: torch.Tensor, nouns: torch.Tensor, relations: torch.Tensor,
                        margin: float = 1.0) -> torch.Tensor:
    """Where every latent cell comes from when each prompt's relation is carried out on the reader's maps.

    For each row with a relation between two entities of different known nouns, each entity's
    most confident object is found on its noun map (upsampled :data:`READER_MOVE_FACTOR` times),
    and :func:`relation_cells` decides and plans the move; :func:`move_sources` turns it into
    a source cell for every cell. Rows with nothing to move keep every cell.

    Args:
        noun_probs (Tensor[B, N, h, w]): the reader's noun probabilities of z0.
        nouns (Tensor[B, 2] int): the first two entities' nouns (index into N, -1 unknown; :func:`slot_fields`).
        relations (Tensor[B, 3] int): :func:`relation_fields`.
        margin: the share of the relation's axis by which it must hold to be left alone (1.0: always move).

    Returns:
        Tensor[B, h*w] int64 for :func:`copy_cells`.

    Raises:
        ValueError: inputs of the wrong shape or type, or an index outside its range.
    """
    if not isinstance(noun_probs, torch.Tensor) or noun_probs.dim() != 4:
        raise ValueError(f"reader_move_sources: noun_probs must be a tensor [B, N, h, w], got "
                         f"{getattr(noun_probs, 'shape', type(noun_probs).__name__)}")
    b, num_nouns, lh, lw = noun_probs.shape
    for name, t, shape in (("nouns", nouns, (b, 2)), ("relations", relations, (b, 3))):
        if not _is_int_tensor(t) or tuple(t.shape) != shape:
            raise ValueError(f"reader_move_sources: {name} must be an integer tensor {list(shape)}, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    _check_noun_indices("reader_move_sources", nouns, num_nouns)
    active = relations[:, 0] >= 0
    if bool(active.any()) and (int(relations[active, 0].max()) >= len(RELATIONS)
                               or int(relations[active, 1:].min()) < 0 or int(relations[active, 1:].max()) > 1):
        raise ValueError(f"reader_move_sources: relations rows must be (relation in [0, {len(RELATIONS)}), subject "
                         f"slot 0 or 1, object slot 0 or 1) or start with -1, got {relations[active].tolist()}")
    labels = torch.zeros(b, lh * lw, dtype=torch.int64)
    shifts = torch.zeros(b, 2, 2, dtype=torch.int64)
    rows = [i for i in range(b) if relations[i, 0] >= 0 and int(relations[i, 1]) != int(relations[i, 2])
            and nouns[i, relations[i, 1]] >= 0 and nouns[i, relations[i, 2]] >= 0
            and nouns[i, relations[i, 1]] != nouns[i, relations[i, 2]]]
    if rows:
        r = torch.tensor(rows, device=noun_probs.device)
        rel = relations[r].to(noun_probs.device)
        pick = torch.stack([nouns[r].to(noun_probs.device).gather(1, rel[:, 1:2]),
                            nouns[r].to(noun_probs.device).gather(1, rel[:, 2:3])], 1)[..., 0]  # [R, 2]
        maps = noun_probs[r].gather(1, pick[:, :, None, None].expand(-1, -1, lh, lw)).float()
        f = READER_MOVE_FACTOR
        up = F.interpolate(maps, scale_factor=f, mode="bilinear", align_corners=False)
        parts = _best_parts(up.flatten(0, 1)).view(len(rows), 2, lh * f, lw * f).cpu()
        for j, i in enumerate(rows):
            if not parts[j, 0].any() or not parts[j, 1].any():
                continue
            name = RELATIONS[int(rel[j, 0])]
            extent = (lw if name in ("left_of", "right_of") else lh) * f
            plan = relation_cells(parts[j, 0], parts[j, 1], name, (lh, lw), margin * extent)
            if plan is not None:
                labels[i], shifts[i] = plan[0].flatten(), plan[1]
    return move_sources(labels.to(noun_probs.device), shifts.to(noun_probs.device), lh, lw)


#: :func:`count_fields` recognises counts 0 .. MAX_FIELD_COUNT in the field tokens.
MAX_FIELD_COUNT = 16

#: :func:`count_move_sources`: an object is a connected part of the eyes' foreground (> 0.5, 8-connected)
#: of at least this many pixels (of the eyes' grid: 64 x 64 on the shapes world).
COUNT_MOVE_MIN_AREA = 12


@torch.no_grad()
def count_fields(cfg: "CorrectorConfig", text_tokens: torch.Tensor, text_mask: torch.Tensor | None
                 ) -> torch.Tensor:
    """The first two entities' counts, read back from ``"fields"`` tokens.

    Returns:
        Tensor[B, 2] int64: entity slot k's count (0 .. :data:`MAX_FIELD_COUNT`; 0: asked absent, "no
        squares"), -1 for no entity there or a count it cannot read (above :data:`MAX_FIELD_COUNT`).
    """
    dim = cfg.text_dim
    n_values = MAX_FIELD_COUNT + 1
    keys = [("count", n, f"{k}:count") for k in range(2) for n in range(n_values)]
    hit = _field_hits(text_tokens, text_mask, keys, dim)
    # per slot, the largest count that hits (as a loop over the keys in order would leave it); counts start at 0
    return torch.stack([_last_hit(hit[:, k * n_values:(k + 1) * n_values]) for k in range(2)], 1)


def _object_cells(box: tuple[int, int, int, int], f: int, h: int, w: int, grow: int = 0) -> tuple[int, int, int, int]:
    """The latent cells ``(y0, x0, y1, x1)`` (ends exclusive) under a pixel box ``(x0, y0, x1, y1)``, grown."""
    x0, y0, x1, y1 = box
    return (max(0, y0 // f - grow), max(0, x0 // f - grow), min(h, (y1 - 1) // f + 1 + grow),
            min(w, (x1 - 1) // f + 1 + grow))


def _count_plan(probs: torch.Tensor, labels: torch.Tensor, noun: int, n: int, share: float, f: int, h: int,
                w: int) -> torch.Tensor | None:
    """One row of :func:`count_move_sources`: ``[h, w]`` source indices, or None to leave the row alone."""
    k = int(labels.max())
    if k == 0:
        return None
    flat = labels.reshape(-1).long()
    hi, wi = labels.shape
    area = torch.zeros(k + 1).scatter_add_(0, flat, torch.ones(flat.shape[0]))
    mass = torch.zeros(k + 1, probs.shape[0]).index_add_(0, flat, probs.reshape(probs.shape[0], -1).t())
    ys = torch.arange(hi).repeat_interleave(wi)
    xs = torch.arange(wi).repeat(hi)
    big = hi + wi
    y0 = torch.full((k + 1,), big).scatter_reduce(0, flat, ys, "amin")
    x0 = torch.full((k + 1,), big).scatter_reduce(0, flat, xs, "amin")
    y1 = torch.full((k + 1,), -1).scatter_reduce(0, flat, ys, "amax") + 1
    x1 = torch.full((k + 1,), -1).scatter_reduce(0, flat, xs, "amax") + 1
    objects = []  # (is the noun, confidence, area, box)
    for j in range(1, k + 1):
        a = int(area[j])
        if a < COUNT_MOVE_MIN_AREA:
            continue
        total = mass[j]
        m = float(total.sum())
        is_noun = m > 0 and int(total.argmax()) == noun and float(total[noun]) / max(m, 1e-6) >= share
        objects.append((is_noun, float(total[noun]) / a, a, (int(x0[j]), int(y0[j]), int(x1[j]), int(y1[j]))))
    good = sorted([o for o in objects if o[0]], key=lambda o: -o[1])
    if not good or len(good) == n:
        return None
    other = sorted([o for o in objects if not o[0]], key=lambda o: -o[2])
    keep = (good + other)[:n]
    erase = (good + other)[n:]
    replace = [o for o in keep if not o[0]]
    index = torch.arange(h * w).view(h, w)
    src = index.clone()
    occupied = torch.zeros(h, w, dtype=torch.bool)
    for o in objects:
        cy0, cx0, cy1, cx1 = _object_cells(o[3], f, h, w, 1)
        occupied[cy0:cy1, cx0:cx1] = True
    gone = torch.zeros(h, w, dtype=torch.bool)
    for o in erase + replace:
        cy0, cx0, cy1, cx1 = _object_cells(o[3], f, h, w)
        gone[cy0:cy1, cx0:cx1] = True
    grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).float()
    free = ~occupied
    if gone.any() and free.any():
        src[gone] = index[free][torch.cdist(grid[gone], grid[free]).argmin(1)]
    sy0, sx0, sy1, sx1 = _object_cells(good[0][3], f, h, w)
    sh, sw = sy1 - sy0, sx1 - sx0
    centres = [((o[3][1] + o[3][3]) / 2 / f, (o[3][0] + o[3][2]) / 2 / f) for o in replace]
    # Window corners, row by row (the first of equally far places wins), and their centres.
    corners = torch.stack(torch.meshgrid(torch.arange(h - sh + 1), torch.arange(w - sw + 1), indexing="ij"),
                          -1).reshape(-1, 2)
    window_centres = corners.float() + torch.tensor([sh / 2, sw / 2])
    for _ in range(n - len(keep)):  # missing objects: the free place farthest from every object
        blocked = F.max_pool2d(occupied.float()[None, None], (sh, sw), stride=1)[0, 0].reshape(-1) > 0
        if bool(blocked.all()):
            break
        taken = torch.nonzero(occupied).float() + 0.5
        if len(taken):
            distance = torch.cdist(window_centres, taken).min(1).values
        else:
            distance = torch.zeros(len(corners))
        distance[blocked] = -1.0
        y, x = (int(v) for v in corners[int(distance.argmax())])
        centres.append((y + sh / 2, x + sw / 2))
        occupied[y:y + sh, x:x + sw] = True
    for cy, cx in centres:
        ty0 = min(max(0, int(round(cy - sh / 2))), h - sh)
        tx0 = min(max(0, int(round(cx - sw / 2))), w - sw)
        src[ty0:ty0 + sh, tx0:tx0 + sw] = index[sy0:sy1, sx0:sx1]
    return src


@torch.no_grad()
def count_move_sources(noun_probs: torch.Tensor, foreground: torch.Tensor, nouns: torch.Tensor,
                       counts: torch.Tensor, latent_hw: tuple[int, int], share: float = 0.7) -> torch.Tensor:
    """Where every latent cell comes from when each prompt's count is made right by copying cells.

    For each row with a known noun and ``counts >= 2``: the objects are the connected parts of
    ``foreground > 0.5`` (8-connected, at least :data:`COUNT_MOVE_MIN_AREA` points); an object is of
    the noun when the noun has the largest and at least ``share`` of its summed ``noun_probs``. When
    the objects of the noun do not number the count, the count is made up of them (most confident
    first) and then of the others (largest first): kept objects of another shape are replaced by a
    copy of the most confident object of the noun (its latent cells, centred where the replaced one
    was), objects beyond the count are overwritten by the nearest cells that no object (grown by one
    cell) covers, and missing objects are copies placed, one at a time, where the copy's cells touch
    no object and its centre is farthest from every covered cell. Rows with no object of the noun,
    with the right number of them, without a count or with a count below 2 keep every cell.

    Args:
        noun_probs (Tensor[B, N, H, W]): per-pixel noun probabilities of the decoded latents (the eyes' grid:
            a whole multiple of the latent's).
        foreground (Tensor[B, H, W]): probability that a pixel belongs to some object.
        nouns (Tensor[B] int): each row's noun (index into N; -1: unknown).
        counts (Tensor[B] int): each row's asked count (-1: none).
        latent_hw: the latent's ``(h, w)``.
        share: see above, in ``[0, 1]``.

    Returns:
        Tensor[B, h*w] int64 for :func:`copy_cells`.

    Raises:
        ValueError: inconsistent shapes.
    """
    if not isinstance(noun_probs, torch.Tensor) or not isinstance(foreground, torch.Tensor) \
            or noun_probs.dim() != 4 or foreground.shape != (noun_probs.shape[0], *noun_probs.shape[-2:]):
        raise ValueError(f"count_move_sources: noun_probs must be [B, N, H, W] and foreground [B, H, W] of the same "
                         f"B, H, W, got {getattr(noun_probs, 'shape', type(noun_probs).__name__)} and "
                         f"{getattr(foreground, 'shape', type(foreground).__name__)}")
    b, num_nouns, hi, wi = noun_probs.shape
    try:
        h, w = (int(v) for v in latent_hw)
    except (TypeError, ValueError):
        h = w = 0
    if h < 1 or w < 1:
        raise ValueError(f"count_move_sources: latent_hw must be the latent's (h, w), two ints >= 1, got "
                         f"{latent_hw!r}")
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= float(share) <= 1.0:
        raise ValueError(f"count_move_sources: share must be a number in [0, 1], got {share!r}")
    if hi % h or wi % w or hi // h != wi // w:
        raise ValueError(f"count_move_sources: the eyes' grid {hi} x {wi} must be one whole multiple of the latent "
                         f"{h} x {w}")
    for name, t in (("nouns", nouns), ("counts", counts)):
        if not _is_int_tensor(t) or tuple(t.shape) != (b,):
            raise ValueError(f"count_move_sources: {name} must be an integer tensor [B] = [{b}], got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    _check_noun_indices("count_move_sources", nouns, num_nouns)
    out = torch.arange(h * w).repeat(b, 1)
    rows = [i for i in range(b) if int(nouns[i]) >= 0 and int(counts[i]) >= 2]
    if not rows:
        return out.to(noun_probs.device)
    r = torch.tensor(rows, device=noun_probs.device)
    labels, _ = xops.label_components(foreground[r][:, None].float().contiguous(), threshold=0.5,
                                      mode="absolute", min_area=COUNT_MOVE_MIN_AREA, connectivity=8)
    labels, probs = labels[:, 0].cpu(), noun_probs[r].float().cpu()
    for j, i in enumerate(rows):
        plan = _count_plan(probs[j], labels[j], int(nouns[i]), int(counts[i]), float(share), hi // h, h, w)
        if plan is not None:
            out[i] = plan.flatten()
    return out.to(noun_probs.device)


def _blockwise(x: torch.Tensor, k: int, scale: float) -> torch.Tensor:
    """``x`` averaged over ``k x k`` blocks of its last two dims, times ``scale``, broadcast back."""
    if k == 1:
        return x
    b, c, h, w = x.shape
    pooled = x.reshape(b, c, h // k, k, w // k, k).mean(dim=(3, 5), keepdim=True) * scale
    return pooled.expand(b, c, h // k, k, w // k, k).reshape(b, c, h, w)


class ResidualCorrector(_Pretrained, nn.Module):
    """The URC: ``Delta_theta(z0, e_p)``, the PPO policy around it and the value baseline.

    Args:
        config (CorrectorConfig): architecture and policy defaults.

    Inputs shared by the methods:
        z0 (Tensor[B, C, H, W]): the generator's latent, any float dtype; H and W
            divisible by ``config.patch``. Cast to the model's dtype inside.
        text_tokens (Tensor[B, T, text_dim]): prompt token embeddings.
        pooled (Tensor[B, pooled_dim]): pooled prompt embedding (drives the FiLM).
        text_mask (Tensor[B, T], bool or 0/1 ints, optional): True/1 marks real
            tokens; padded tokens have no effect on any output. A prompt with no
            real token gets no cross-attention update.

    Example:
        >>> import torch
        >>> from xlard.models import CorrectorConfig, ResidualCorrector
        >>> corrector = ResidualCorrector(CorrectorConfig.tiny())   # 4 latent channels, text_dim = pooled_dim = 32
        >>> z0, text_tokens, pooled = torch.randn(2, 4, 16, 16), torch.randn(2, 8, 32), torch.randn(2, 32)
        >>> g = torch.Generator().manual_seed(0)
        >>> with torch.no_grad():
        ...     zc, delta, log_prob, lam = corrector.sample(z0, text_tokens, pooled, generator=g)
        >>> zc.shape, log_prob.shape, lam.shape
        (torch.Size([2, 4, 16, 16]), torch.Size([2]), torch.Size([2, 16, 16]))
    """

    config_class = CorrectorConfig

    def __init__(self, config: CorrectorConfig):
        super().__init__()
        if not isinstance(config, CorrectorConfig):
            raise TypeError(f"ResidualCorrector: config must be a CorrectorConfig, got {type(config).__name__}")
        self.config = config
        c, p = config.latent_channels, config.patch
        self.trunk = _LatentTransformer(config, READER_CHANNELS if config.reader else 0)
        if config.reader:
            # Frozen: fitted on its own before the corrector (xlard.train.distill.fit_reader), never by the
            # corrector's losses; its maps enter the trunk without gradient.
            self.reader = LatentReader(c, config.reader_nouns, config.reader_colors, config.reader_width)
            self.reader.requires_grad_(False)
        self.head = nn.Linear(config.width, c * p * p)
        # Zero weight and bias: Delta is exactly 0 (hence zc == z0) until the first update.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.log_std = nn.Parameter(torch.full((c,), float(config.log_std_init)))
        self.value_head = nn.Sequential(
            nn.LayerNorm(config.width + config.cond_dim),
            nn.Linear(config.width + config.cond_dim, config.value_hidden), nn.SiLU(),
            nn.Linear(config.value_hidden, 1))
        self.value_head.apply(_init_linear)
        if config.move:
            # Cell labels (none / subject / object; "none" until the first update), a pooling score per
            # token and slot, and the two slots' shift classes per axis.
            self.move_label = nn.Linear(config.width, 3 * p * p)
            self.move_pool = nn.Linear(config.width, 2)
            self.move_shift = nn.Linear(config.width, 2 * 2 * (2 * config.move_range + 1))
            for layer in (self.move_pool, self.move_shift):
                layer.apply(_init_linear)
            if config.move_nouns:
                self.move_noun = nn.Linear(config.width, (config.move_nouns + 1) * p * p)
                self.move_noun.apply(_init_linear)
            nn.init.zeros_(self.move_label.weight)
            with torch.no_grad():
                self.move_label.bias.copy_(torch.tensor([4.0, 0.0, 0.0]).repeat_interleave(p * p))  # [C, p, p] order

    @property
    def _param(self) -> torch.Tensor:
        return self.head.weight

    def _move_scores(self, tokens, z0) -> tuple:
        """``(labels [B, N, 3], shifts [B, 2, 2, 2R+1], nouns [B, N, move_nouns + 1] or None)``: each of the
        N = H * W cells' scores for none / subject / object, each slot's (subject, object) shift-class scores
        per axis (rows, columns), and the auxiliary head's noun scores (None without that head)."""
        cfg = self.config
        h, w, r = z0.shape[-2], z0.shape[-1], cfg.move_range
        labels = unpatchify(self.move_label(tokens), 3, h, w, cfg.patch).flatten(2).transpose(1, 2)
        weights = torch.softmax(self.move_pool(tokens), dim=1)                   # [B, T, 2] over the tokens
        pooled = torch.einsum("btk,btd->bkd", weights, tokens)                   # [B, 2, width]
        shifts = self.move_shift(pooled).view(z0.shape[0], 2, 2, 2, 2 * r + 1)   # [B, slot, slot', axis, class]
        shifts = torch.stack([shifts[:, 0, 0], shifts[:, 1, 1]], dim=1)          # each slot reads its own pool
        nouns = None
        if cfg.move_nouns:
            nouns = unpatchify(self.move_noun(tokens), cfg.move_nouns + 1, h, w, cfg.patch).flatten(2).transpose(1, 2)
        return labels, shifts, nouns

    def _choose(self, labels: torch.Tensor, shifts: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return move_sources(largest_parts(labels.argmax(-1), h, w), shifts.argmax(-1) - self.config.move_range, h, w)

    def _residual(self, tokens, z0) -> torch.Tensor:
        cfg = self.config
        delta = unpatchify(self.head(tokens), cfg.latent_channels, z0.shape[-2], z0.shape[-1], cfg.patch)
        # Under ``autocast`` the head computes in the low dtype; the rules after it (moves, count edit) copy and
        # add latents in the parameters' dtype, so that z0's own cells are never rounded (a no-op otherwise).
        return _blockwise(delta, cfg.action_block, 1.0).to(self._param.dtype)

    def distill_outputs(self, z0: torch.Tensor, text_tokens: torch.Tensor, pooled: torch.Tensor,
                        text_mask: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None]:
        """What the warm start fits: ``(residual [B, C, H, W], move)``.

        The residual is the correction without the move (the move head's copy, or ``reader_move``'s, which
        has nothing to fit); ``move`` is
        ``(cell label scores [B, H*W, 3], shift-class scores [B, 2, 2, 2 * move_range + 1],
        noun scores [B, H*W, move_nouns + 1] or None)``, or ``None`` for a corrector without a move head.

        Raises:
            TypeError, ValueError: a bad input, naming it; NaN or infinite values as :meth:`correct` says.
        """
        # NaN latents came back as NaN residuals and reader evidence without a word, where correct() refused them
        _refuse_non_finite("ResidualCorrector.distill_outputs", z0, text_tokens, pooled, text_mask)
        tokens, _, _ = self._features(z0, text_tokens, pooled, text_mask)
        logits = self._move_scores(tokens, z0) if self.config.move else None
        return self._residual(tokens, z0), logits

    def sources(self, z0: torch.Tensor, text_tokens: torch.Tensor, pooled: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The move's choice (the move head's, or ``reader_move``'s then ``count_move``'s): for every latent cell,
        the flat index of the cell of z0 copied there.

        Returns:
            Tensor[B, H*W] int64 (``arange(H*W)`` everywhere for a corrector that moves nothing).

        Raises:
            TypeError, ValueError: a bad input, naming it; NaN or infinite values as :meth:`correct` says.
        """
        # NaN latents gave NaN scores, and "moved" cells chosen from them, without a word
        _refuse_non_finite("ResidualCorrector.sources", z0, text_tokens, pooled, text_mask)
        if self.config.reader_move or self.config.count_move:
            tokens, _, reading = self._features(z0, text_tokens, pooled, text_mask)
            sources = self._move_sources(tokens, z0, reading, text_tokens, text_mask)
            if sources is not None:
                return sources
        if not self.config.move:
            _check_latent("ResidualCorrector", "z0", z0, self.config.latent_channels, self.config.patch,
                          self._param.device)
            n = z0.shape[-2] * z0.shape[-1]
            return torch.arange(n, device=z0.device).expand(z0.shape[0], n).clone()
        tokens, _, _ = self._features(z0, text_tokens, pooled, text_mask)
        return self._choose(*self._move_scores(tokens, z0)[:2], z0.shape[-2], z0.shape[-1])

    def _features(self, z0, text_tokens, pooled, text_mask):
        cfg, ref = self.config, self._param
        _check_latent("ResidualCorrector", "z0", z0, cfg.latent_channels, cfg.patch, ref.device)
        text_mask = _check_prompt("ResidualCorrector", z0.shape[0], text_tokens, pooled, text_mask,
                                  cfg.text_dim, cfg.pooled_dim, ref.device)
        k = cfg.action_block
        if z0.shape[-2] % k or z0.shape[-1] % k:
            raise ValueError(f"xlard.ResidualCorrector: z0 height and width must be divisible by "
                             f"action_block={k}, got {z0.shape[-2]} x {z0.shape[-1]}")
        dt = ref.dtype
        z = z0.to(dt)
        reading = None
        if cfg.reader:
            evidence, reading = self._read(z, text_tokens, text_mask)
            z = torch.cat([z, evidence], dim=1)
        tokens, cond = self.trunk(z, text_tokens.to(dt), pooled.to(dt), text_mask)
        return tokens, cond, reading

    @torch.no_grad()
    def _read(self, z, text_tokens, text_mask) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One pass of the reader over checked inputs: ``(evidence for the trunk in z's dtype, (noun
        probabilities [B, len(reader_nouns), H, W], the first two entities' nouns [B, 2]))``; the second
        part is what ``reader_move`` moves by."""
        nouns, colors = slot_fields(self.config, text_tokens, text_mask)
        noun_p, color_p = self.reader.maps(z.to(self.reader.scale.dtype))
        return _reader_evidence(noun_p, color_p, nouns, colors).to(z.dtype), (noun_p, nouns)

    @torch.no_grad()
    def read(self, z0: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The reader's evidence for the trunk, ``[B, READER_CHANNELS, H, W]`` in z0's dtype (no gradient):
        the prompt's first two entities' noun and color maps over the latent cells (``CorrectorConfig.reader``).

        Raises:
            ValueError: the corrector has no reader.
            TypeError, ValueError: a bad input, naming it; NaN or infinite values in ``z0`` or a real (unmasked)
                token of ``text_tokens``.
        """
        cfg = self.config
        if not cfg.reader:
            raise ValueError("ResidualCorrector.read: this corrector has no reader (CorrectorConfig.reader is False)")
        # NaN latents came back as NaN evidence without a word (read() takes no pooled input: None is skipped)
        _refuse_non_finite("ResidualCorrector.read", z0, text_tokens, None, text_mask)
        _check_latent("ResidualCorrector.read", "z0", z0, cfg.latent_channels, 1, self._param.device)
        if isinstance(text_tokens, torch.Tensor) and text_tokens.dim() == 3:
            pooled = text_tokens.new_zeros(text_tokens.shape[0], cfg.pooled_dim)  # read() takes no pooled input
        else:
            pooled = None  # _check_prompt names text_tokens first
        text_mask = _check_prompt("ResidualCorrector.read", z0.shape[0], text_tokens, pooled, text_mask,
                                  cfg.text_dim, cfg.pooled_dim, self._param.device)
        return self._read(z0, text_tokens, text_mask)[0]

    def _delta(self, tokens, z0, reading, text_tokens, text_mask, log=None) -> torch.Tensor:
        delta = self._residual(tokens, z0)
        if self.config.move:  # the residual is fitted around the head's move: it stays where it is
            sources = self._choose(*self._move_scores(tokens, z0)[:2], z0.shape[-2], z0.shape[-1])
            moved = copy_cells(z0.to(delta.dtype), sources)
            delta = delta + (moved - z0.to(delta.dtype))
        else:  # reader_move / count_move: the residual is fitted without the moves, it moves with its cells
            sources = self._move_sources(tokens, z0, reading, text_tokens, text_mask, residual=delta)
            if sources is not None:
                z = z0.to(delta.dtype)
                delta = copy_cells(z + delta, sources) - z
        if log is not None and sources is not None:  # actions(): how many cells each latent's move copied
            moved = (sources != torch.arange(sources.shape[1], device=sources.device)).sum(1).tolist()
            for i, n in enumerate(moved):
                if n:
                    log[i].append(f"moved {n} latent cell{'s' if n > 1 else ''}")
        if self.config.count_edit:
            delta = self._count_edit(z0, delta, reading, text_tokens, text_mask, log)
        return delta

    def _count_edit(self, z0, delta, reading, text_tokens, text_mask, log=None) -> torch.Tensor:
        """``count_edit``: ``delta`` with the counting rows' touched cells set to the edited encoding minus z0
        (and, given ``log``, one list per row, what the eyes say they did appended to the counting rows')."""
        rows, nouns, counts, second = self._counting_rows(reading, text_tokens, text_mask)
        if not len(rows):
            return delta
        z = z0.to(delta.dtype)
        r = rows.to(z.device)
        eyes = self._count_eyes()
        if not callable(getattr(eyes, "edit_counts", None)):
            raise TypeError(f"ResidualCorrector: count_edit needs eyes with an edit_counts(z, nouns, counts) method "
                            f"(as xlard.shapes.understanding.CountEyes has), got {type(eyes).__name__}")
        words = [self.config.reader_nouns[int(i)] for i in nouns[rows, 0]]
        kwargs = {}
        if "colors" in inspect.signature(eyes.edit_counts).parameters:  # the asked color, for objects drawn anew
            colors = slot_fields(self.config, text_tokens, text_mask)[1]
            colors = torch.where(second.to(colors.device)[:, None], colors.flip(1), colors)  # the counted slot first
            kwargs["colors"] = [self.config.reader_colors[int(k)] if int(k) >= 0 else None for k in colors[rows, 0]]
        with torch.no_grad():
            out = eyes.edit_counts((z + delta)[r].detach(), words, [int(c) for c in counts[rows, 0]], **kwargs)
        # (encoded, touched, actions); a bare tensor or a short tuple leaves the rest None, named below
        encoded, touched, acts = ((*out, None, None) if isinstance(out, (tuple, list)) else (out, None, None))[:3]
        want = (len(rows), *z.shape[1:])
        if not isinstance(encoded, torch.Tensor) or tuple(encoded.shape) != want \
                or not isinstance(touched, torch.Tensor) or tuple(touched.shape) != (want[0], 1, *want[2:]):
            raise ValueError(f"ResidualCorrector: count_edit's eyes.edit_counts must return (encoded {list(want)}, "
                             f"touched {[want[0], 1, *want[2:]]} bool, actions), got "
                             f"{[tuple(getattr(o, 'shape', ())) or type(o).__name__ for o in (encoded, touched)]}")
        edited = torch.where(touched.to(z.device, torch.bool), encoded.to(delta.device, delta.dtype) - z[r], delta[r])
        if log is not None and acts is not None:  # actions(): what was done
            for k, i in enumerate(rows.tolist()[:len(acts)]):
                log[i].extend(str(a) for a in acts[k])
        return delta.index_put((r,), edited)

    @torch.no_grad()
    def _move_sources(self, tokens, z0, reading, text_tokens, text_mask, residual=None) -> torch.Tensor | None:
        """The cells ``reader_move`` and then ``count_move`` copy, as one source map of ``z0 + residual``
        (None when neither is on or neither moves anything): the count is read on the relation-moved latent,
        and two copies in a row are one copy through the composed map."""
        sources = self._reader_sources(reading, text_tokens, text_mask) if self.config.reader_move else None
        if self.config.count_move:
            if residual is None:
                residual = self._residual(tokens, z0)
            z = z0.to(residual.dtype) + residual
            counted = self._count_sources(z if sources is None else copy_cells(z, sources), reading, text_tokens,
                                          text_mask)
            if counted is not None:
                sources = counted if sources is None else sources.gather(1, counted.to(sources.device))
        return sources

    def attach_eyes(self, eyes: Callable[..., Any] | None) -> "ResidualCorrector":
        """Set what ``count_move`` counts with: ``eyes(z) -> (noun_probs [B, len(reader_nouns), H, W], foreground
        [B, H, W])`` for latents ``z [B, C, h, w]`` (the decoded image's maps, on a whole multiple of the latent
        grid); for ``count_edit`` the eyes also need ``eyes.edit_counts(z, nouns, counts) -> (encoded [B, C, h,
        w], touched [B, 1, h, w] bool, actions)`` (see :meth:`xlard.shapes.understanding.CountEyes.edit_counts`).
        ``None`` restores the default that ``config.count_eyes`` names (:class:`xlard.shapes.understanding.
        CountEyes`, the shapes backbone's VAE and understanding model, or :class:`xlard.shapes.latent_eyes.
        LatentCountEyes`, the latent eyes distilled from that model; loaded on first use). Returns the corrector.

        Raises:
            TypeError: ``eyes`` is neither callable nor None.
        """
        if eyes is not None and not callable(eyes):
            raise TypeError(f"ResidualCorrector.attach_eyes: eyes must be callable (z -> (noun_probs, foreground)) "
                            f"or None, got {type(eyes).__name__}")
        object.__setattr__(self, "_eyes", eyes)  # not a submodule: never saved, never moved
        return self

    @property
    def eyes(self):
        """The eyes attached with :meth:`attach_eyes`, or None (``count_move`` and ``count_edit`` then use the
        default)."""
        return getattr(self, "_eyes", None)

    def _count_eyes(self):
        if self.eyes is not None:
            return self.eyes
        default = getattr(self, "_default_eyes", None)
        if default is None:
            if self.config.count_eyes == "latent":
                from xlard.shapes.latent_eyes import LatentCountEyes as CountEyes
            else:
                from xlard.shapes.understanding import CountEyes

            default = CountEyes(self.config.reader_nouns)
            object.__setattr__(self, "_default_eyes", default)  # not a submodule either
        return default

    def _counting_rows(self, reading, text_tokens, text_mask
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, nouns [B, 2], counts [B, 2], second [B])``: the rows whose prompt is one entity of a known
        noun asked ``2 <= n <= MAX_FIELD_COUNT`` times, beside no other, one asked absent or one whose count the
        field tokens do not hold (what ``count_move`` and ``count_edit`` act on: larger counts have no field
        token), in either order, and the field tokens' nouns and counts with that entity's slot first
        (``second``: it is the prompt's second entity, "no squares and three circles"; only "three circles and
        no squares" was edited)."""
        counts = count_fields(self.config, text_tokens, text_mask)
        nouns = reading[1] if reading is not None else slot_fields(self.config, text_tokens, text_mask)[0]
        first = (counts[:, 0] >= 2) & (counts[:, 1] <= 0) & (nouns[:, 0] >= 0)
        second = (counts[:, 1] >= 2) & (counts[:, 0] <= 0) & (nouns[:, 1] >= 0)
        rows = torch.nonzero(first | second).flatten()
        swap = second.to(nouns.device)[:, None]
        return rows, torch.where(swap, nouns.flip(1), nouns), torch.where(second[:, None], counts.flip(1), counts), \
            second

    @torch.no_grad()
    def _count_sources(self, z, reading, text_tokens, text_mask) -> torch.Tensor | None:
        """``count_move``: the source of every cell of the corrected latent ``z`` (None when no row counts)."""
        rows, nouns, counts, _ = self._counting_rows(reading, text_tokens, text_mask)
        if not len(rows):
            return None
        noun_probs, foreground = self._count_eyes()(z[rows])
        picked = count_move_sources(noun_probs, foreground, nouns[rows, 0], counts[rows, 0], tuple(z.shape[-2:]),
                                    self.config.count_move_share)
        n = z.shape[-2] * z.shape[-1]
        sources = torch.arange(n, device=z.device).repeat(z.shape[0], 1)
        sources[rows.to(z.device)] = picked.to(z.device)
        return sources

    @torch.no_grad()
    def _reader_sources(self, reading, text_tokens, text_mask) -> torch.Tensor:
        """``reader_move``: the source of every cell, from the reader's reading (:meth:`_read`) and the
        prompt's relation."""
        noun_probs, nouns = reading
        relations = relation_fields(self.config, text_tokens, text_mask)
        # a relation with an entity asked absent ("a circle left of no squares") has nothing to move (the forbidden
        # square was moved to the right, "moved 76 latent cells")
        counts = count_fields(self.config, text_tokens, text_mask).to(relations.device)
        slots = relations[:, 1:].clamp(0, 1)
        absent = (relations[:, 0] >= 0) & (counts.gather(1, slots) == 0).any(1)
        relations = torch.where(absent[:, None], torch.full_like(relations, -1), relations)
        return reader_move_sources(noun_probs, nouns, relations, self.config.reader_move_margin)

    def action_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """Standard normal noise ``[B, C, H, W]`` made constant on ``action_block`` blocks.

        Each block gets the mean of its ``k^2`` draws times ``k`` (again standard
        normal); identity for ``action_block == 1``. The rollouts pass their noise
        through it so that actions live in the policy's block space.
        """
        owner, k, c = "ResidualCorrector.action_noise", self.config.action_block, self.config.latent_channels
        _args.check_tensor(owner, "noise", noise, _args.FLOAT_DTYPES, dim=4)  # a list came back as 1.0
        if noise.shape[1] != c or noise.shape[2] % k or noise.shape[3] % k:
            raise ValueError(f"xlard.{owner}: noise must be [B, {c}, H, W] with H and W multiples of action_block "
                             f"{k}, got {tuple(noise.shape)}")
        return _blockwise(noise, k, float(k))

    def _value(self, tokens, cond) -> torch.Tensor:
        features = torch.cat([tokens.mean(dim=1), cond], dim=-1)
        if not self.config.value_shares_trunk:
            features = features.detach()
        return self.value_head(features).squeeze(-1).float()

    def forward(self, z0: torch.Tensor, text_tokens: torch.Tensor, pooled: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The correction ``Delta_theta(z0, e_p)`` (the policy mean).

        Returns:
            Tensor[B, C, H, W] in z0's dtype (exactly zero at initialisation).

        Raises:
            TypeError, ValueError: a bad input, naming it.
        """
        _refuse_non_finite("ResidualCorrector", z0, text_tokens, pooled, text_mask)
        delta = self._forward(z0, text_tokens, pooled, text_mask)
        _refuse_overflow("ResidualCorrector", z0, delta, stepped=False)
        return delta

    def _forward(self, z0, text_tokens, pooled, text_mask, log=None) -> torch.Tensor:
        tokens, _, reading = self._features(z0, text_tokens, pooled, text_mask)
        return self._delta(tokens, z0, reading, text_tokens, text_mask, log).to(z0.dtype)

    @torch.no_grad()
    def actions(self, z0: torch.Tensor, text_tokens: torch.Tensor, pooled: torch.Tensor,
                text_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[list[str]]]:
        """The correction (as :meth:`forward`, without gradient) and, per latent, what the corrector's rules
        did, in words: the relation or count move's moved cells ("moved 24 latent cells"), ``count_edit``'s
        edits as its eyes report them ("redrew 4 circle(s)", "added 1 circle(s)"). An empty list: only the
        fitted residual acted on that latent. Under ``config.autocast`` as :meth:`correct` is.

        Returns:
            ``(delta [B, C, H, W] in z0's dtype, actions: list of B lists of str)``.

        Raises:
            TypeError, ValueError: a bad input, naming it.
        """
        _refuse_non_finite("ResidualCorrector.actions", z0, text_tokens, pooled, text_mask)
        log = [[] for _ in range(int(z0.shape[0]))] if isinstance(z0, torch.Tensor) and z0.dim() >= 1 else None
        with self._inference_autocast(z0):
            delta = self._forward(z0, text_tokens, pooled, text_mask, log)
        _refuse_overflow("ResidualCorrector.actions", z0, delta)
        return delta, log

    def _inference_autocast(self, z0):
        """``torch.autocast`` with ``config.autocast`` on z0's device for the inference entry points, or nothing."""
        name = self.config.autocast
        if name is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=z0.device.type, dtype=getattr(torch, name))

    def set_autocast(self, dtype: str | None) -> "ResidualCorrector":
        """Change ``config.autocast`` (None, ``"bfloat16"`` or ``"float16"``) in place; returns self.

        Example:
            >>> from xlard.models import CorrectorConfig, ResidualCorrector
            >>> corrector = ResidualCorrector(CorrectorConfig.tiny(autocast="bfloat16"))
            >>> corrector = corrector.set_autocast(None)   # full precision, e.g. on a CPU without native bfloat16
            >>> corrector.config.autocast is None
            True
        """
        self.config = self.config.replace(autocast=dtype)
        return self

    def correct(self, z0: torch.Tensor, text_tokens: torch.Tensor, pooled: torch.Tensor,
                text_mask: torch.Tensor | None = None, alpha: float | torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference: apply the mean correction, ``zc = z0 + alpha * Delta``, via :func:`xlard.ops.residual_correction`.

        With ``config.autocast`` set, Delta is computed under ``torch.autocast`` with that dtype (see
        :class:`CorrectorConfig`) and comes back in z0's dtype.

        Args:
            alpha (float or Tensor[B], optional): step size; default ``config.alpha``.

        Returns:
            (zc [B, C, H, W] in z0's dtype, lam [B, H, W] float32, float64 for a float64 z0): the corrected
            latent and the Latent Activation Map ``sum_c |Delta|``.

        Raises:
            TypeError, ValueError: a bad input, naming it; NaN or infinite values in ``z0``, ``pooled`` or a
            real (unmasked) token of ``text_tokens`` (they would come out as a NaN image without a word).
            These value checks (non-finite inputs, an overflowing correction) are data-dependent and are skipped
            while ``torch.compile`` traces the call (they would break the graph): a compiled ``correct`` returns
            NaN for NaN inputs instead of raising, so check the inputs (``torch.isfinite(z0).all()``) before a
            compiled call.
        """
        _refuse_non_finite("ResidualCorrector.correct", z0, text_tokens, pooled, text_mask)
        _refuse_non_finite_tensor("ResidualCorrector.correct", "alpha", alpha,
                                  "each row's step size must be a finite number")
        with self._inference_autocast(z0):  # checked above: forward() would check again
            delta = self._forward(z0, text_tokens, pooled, text_mask)
        step = self.config.alpha if alpha is None else alpha
        zc, lam = xops.residual_correction(z0, delta, step)
        _refuse_overflow("ResidualCorrector.correct", z0, zc, step)
        return zc, lam

    def distribution(self, z0: torch.Tensor, text_tokens: torch.Tensor, pooled: torch.Tensor,
                     text_mask: torch.Tensor | None = None) -> GaussianPolicy:
        """The policy ``N(Delta_theta(z0, e_p), exp(log_std)^2)`` with a float32 mean (float64 for float64 z0).

        Raises:
            TypeError, ValueError: a bad input, naming it; NaN or infinite values as :meth:`correct` says.
        """
        _refuse_non_finite("ResidualCorrector.distribution", z0, text_tokens, pooled, text_mask)
        policy = self._distribution(z0, text_tokens, pooled, text_mask)
        _refuse_overflow("ResidualCorrector.distribution", z0, policy.mean, stepped=False)
        return policy

    def _distribution(self, z0, text_tokens, pooled, text_mask) -> GaussianPolicy:
        tokens, _, reading = self._features(z0, text_tokens, pooled, text_mask)
        dt = torch.float64 if z0.dtype == torch.float64 else torch.float32
        return GaussianPolicy(self._delta(tokens, z0, reading, text_tokens, text_mask).to(dt), self.log_std)

    def policy_and_value(self, z0: torch.Tensor, text_tokens: torch.Tensor, pooled: torch.Tensor,
                         text_mask: torch.Tensor | None = None) -> tuple[GaussianPolicy, torch.Tensor]:
        """One trunk pass for the PPO update: ``(distribution, value [B] float32)``.

        Raises:
            TypeError, ValueError: a bad input, naming it; NaN or infinite values as :meth:`correct` says.
        """
        _refuse_non_finite("ResidualCorrector.policy_and_value", z0, text_tokens, pooled, text_mask)
        tokens, cond, reading = self._features(z0, text_tokens, pooled, text_mask)
        dt = torch.float64 if z0.dtype == torch.float64 else torch.float32
        mean = self._delta(tokens, z0, reading, text_tokens, text_mask).to(dt)
        _refuse_overflow("ResidualCorrector.policy_and_value", z0, mean, stepped=False)
        return GaussianPolicy(mean, self.log_std), self._value(tokens, cond)

    def value(self, z0: torch.Tensor, text_tokens: torch.Tensor, pooled: torch.Tensor,
              text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The baseline ``b(z0, e_p)``: trunk tokens mean-pooled, with ``W e_p``, through an MLP. ``[B]`` float32.

        Raises:
            TypeError, ValueError: a bad input, naming it; NaN or infinite values as :meth:`correct` says.
        """
        _refuse_non_finite("ResidualCorrector.value", z0, text_tokens, pooled, text_mask)
        tokens, cond, _ = self._features(z0, text_tokens, pooled, text_mask)
        return self._value(tokens, cond)

    def log_prob(self, delta: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """``log N(delta; mean, exp(log_std)^2)`` summed over C*H*W, computed in float32.

        Args:
            delta (Tensor[B, C, H, W]): an action (e.g. from :meth:`sample`).
            mean (Tensor[B, C, H, W]): the policy mean (e.g. ``distribution(...).mean``).

        Returns:
            Tensor[B], float32 (float64 when both inputs are float64); differentiable
            in ``mean`` and ``log_std``.
        """
        _args.check_tensor("ResidualCorrector.log_prob", "delta", delta, _args.FLOAT_DTYPES, dim=4)
        _args.check_tensor("ResidualCorrector.log_prob", "mean", mean, _args.FLOAT_DTYPES, dim=4)
        _refuse_non_finite_tensor("ResidualCorrector.log_prob", "delta", delta,
                                  "a log-probability of it would be NaN (a rollout's action?)")
        _refuse_non_finite_tensor("ResidualCorrector.log_prob", "mean", mean,
                                  "the policy mean is broken (a diverged corrector, or NaN latents?)")
        dt = torch.float64 if delta.dtype == mean.dtype == torch.float64 else torch.float32
        return xops.gaussian_log_prob(delta.to(dt), mean.to(dt), self.log_std.to(dt))

    @torch.no_grad()
    def sample(self, z0: torch.Tensor, text_tokens: torch.Tensor, pooled: torch.Tensor,
               text_mask: torch.Tensor | None = None, *, alpha: float | torch.Tensor | None = None,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The PPO rollout step: sample ``delta ~ N(mean, std^2)`` and apply it, via :func:`xlard.ops.sample_correction`.

        Runs under ``torch.no_grad()``; call ``eval()`` first for a rollout without dropout.

        Args:
            alpha (float or Tensor[B], optional): step size; default ``config.alpha``.
            generator (torch.Generator, optional): source of the noise (on z0's device).
            noise (Tensor[B, C, H, W], optional): standard normal noise to use instead (not with ``generator``).

        Returns:
            (zc [B, C, H, W] in z0's dtype, delta float32 [B, C, H, W], log_prob
            float32 [B], lam float32 [B, H, W]); float64 throughout for float64 z0. ``log_prob`` is
            :meth:`log_prob` of ``delta`` under the policy mean, the value ``distribution(...).log_prob`` and the
            PPO update compute (the fused op's own float32 sum, in another order, differed from it: by 0.03 at
            16 x 128 x 128, a PPO ratio of 1.03 under ``logprob_reduction: sum``).

        Raises:
            TypeError, ValueError: a bad input, naming it; NaN or infinite values in ``z0``, ``pooled``, a real
            token of ``text_tokens``, ``noise`` or a tensor ``alpha``; a tensor ``alpha`` of a non-float dtype
            (as :meth:`correct` refuses it); both ``noise`` and ``generator``; a correction that overflows.
        """
        _refuse_non_finite("ResidualCorrector.sample", z0, text_tokens, pooled, text_mask)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"xlard.ResidualCorrector.sample: generator must be a torch.Generator or None, got "
                            f"{type(generator).__name__}")
        if generator is not None and noise is not None:  # the generator was silently ignored
            raise ValueError("xlard.ResidualCorrector.sample: pass noise or generator, not both (the generator "
                             "draws the noise; given noise it would be ignored)")
        if isinstance(alpha, torch.Tensor):  # an int tensor was cast to float here, where correct() refused it
            _args.check_tensor("ResidualCorrector.sample", "alpha", alpha, _args.FLOAT_DTYPES)
        _refuse_non_finite_tensor("ResidualCorrector.sample", "alpha", alpha,
                                  "each row's step size must be a finite number")
        dist = self._distribution(z0, text_tokens, pooled, text_mask)
        dt = dist.mean.dtype
        if noise is None:
            noise = torch.randn(z0.shape, generator=generator, device=z0.device, dtype=dt)
        else:
            _args.check_tensor("ResidualCorrector.sample", "noise", noise, _args.FLOAT_DTYPES)
            if noise.shape != z0.shape:
                raise ValueError(f"xlard.ResidualCorrector.sample: noise must have the shape of z0 "
                                 f"{tuple(z0.shape)}, got {tuple(noise.shape)}")
            _refuse_non_finite_tensor("ResidualCorrector.sample", "noise", noise,
                                      "the sampled action would be NaN")
            noise = noise.to(dt)
        noise = self.action_noise(noise)
        if isinstance(alpha, torch.Tensor):
            alpha = alpha.to(dt)
        zc, delta, _, lam = xops.sample_correction(
            z0.to(dt), dist.mean, self.log_std.detach().to(dt), noise, self.config.alpha if alpha is None else alpha)
        zc = zc.to(z0.dtype)
        _refuse_overflow("ResidualCorrector.sample", z0, zc, self.config.alpha if alpha is None else alpha)
        # the policy's own log-density, as xlard.train.rollout records it: the fused op's sum differed (see Returns)
        return zc, delta, self.log_prob(delta, dist.mean), lam


# ----------------------------------------------------------------------------------
# The latent reward projector and its confidence head


#: How far past [-1, 1] a present loss target may lie (float rounding of a product of probabilities or a cosine).
_TARGET_SLACK = 1e-4


class ProjectorOutput(NamedTuple):
    """What :class:`LatentRewardProjector` predicts for a batch.

    Attributes:
        scores (Tensor[B, 3]): predicted sub-rewards in (0, 1), order :data:`ASPECTS`.
        log_var (Tensor[B, 3]): the confidence head's per-aspect log-variance ``s``.
        weights (Tensor[B, 3]): lambda, ``softmax(-s)`` over the present aspects
            (zeros where absent; all-zero rows for prompts with no aspect).
    """

    scores: torch.Tensor
    log_var: torch.Tensor
    weights: torch.Tensor


class ProjectorLoss(NamedTuple):
    """The result of :meth:`LatentRewardProjector.loss`.

    Attributes:
        loss (Tensor[]): the uncertainty-weighted regression loss to minimise.
        mse (Tensor[3]): plain per-aspect MSE over the present entries (detached;
            0 for an aspect absent from the whole batch), for logging.
        weights (Tensor[B, 3]): lambda, detached: the weights of the joint reward.
        log_var (Tensor[B, 3]): the log-variances used (detached).
    """

    loss: torch.Tensor
    mse: torch.Tensor
    weights: torch.Tensor
    log_var: torch.Tensor


def _check_aspect_mask(owner, aspect_mask, batch, device):
    _args.check_tensor(owner, "aspect_mask", aspect_mask, (torch.bool,), dim=2)
    if tuple(aspect_mask.shape) != (batch, len(ASPECTS)):
        raise ValueError(f"xlard.{owner}: aspect_mask must have shape [B, 3] = [{batch}, 3] (order {ASPECTS}), "
                         f"got {tuple(aspect_mask.shape)}")
    if aspect_mask.device != device:
        raise ValueError(f"xlard.{owner}: aspect_mask is on {aspect_mask.device}, expected {device}")


def aspect_weights(log_var: torch.Tensor, aspect_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Lambda from log-variances: ``softmax(-log_var)`` over the present aspects.

    Pass ``log_var = zeros`` for the "without confidence head" ablation (uniform
    weights over the present aspects).

    Args:
        log_var (Tensor[B, 3]): per-aspect log-variances.
        aspect_mask (Tensor[B, 3], bool, optional): which aspects the prompt has
            (default: all).

    Returns:
        Tensor[B, 3] in log_var's dtype: rows sum to 1 over present aspects, 0
        elsewhere; a row with no present aspect is all zero (not NaN).

    Raises:
        TypeError: ``log_var`` is not a floating tensor, or ``aspect_mask`` not a bool tensor.
        ValueError: ``log_var`` is not ``[B, 3]``, or ``aspect_mask`` not ``[B, 3]`` on log_var's device;
            ``log_var`` holds NaN or -inf anywhere, or +inf on every present aspect of a row (an infinite
            variance leaves an aspect no weight, and such a row no weights to sum to 1).
    """
    _args.check_tensor("models.aspect_weights", "log_var", log_var, _args.FLOAT_DTYPES)
    if log_var.dim() != 2 or log_var.shape[1] != len(ASPECTS):
        raise ValueError(f"xlard.models.aspect_weights: log_var must have shape [B, 3] (order {ASPECTS}), got "
                         f"{tuple(log_var.shape)}")
    if torch.isnan(log_var).any() or torch.isneginf(log_var).any():  # gave NaN weights without a word
        raise ValueError("xlard.models.aspect_weights: log_var holds NaN or -inf (a diverged confidence head?)")
    if aspect_mask is not None:
        _check_aspect_mask("models.aspect_weights", aspect_mask, log_var.shape[0], log_var.device)
    present = torch.ones_like(log_var, dtype=torch.bool) if aspect_mask is None else aspect_mask
    # a row whose present aspects are all +inf gave NaN weights, where the docstring promised none (one +inf aspect
    # beside finite ones is well defined: it gets no weight)
    dead = (torch.isposinf(log_var) | ~present).all(dim=1) & present.any(dim=1)
    if dead.any():
        raise ValueError(f"xlard.models.aspect_weights: log_var is +inf on every present aspect of "
                         f"{int(dead.sum())} row(s) (rows {dead.nonzero().flatten().tolist()[:5]}): their weights "
                         "cannot sum to 1 (a diverged confidence head? the projector clamps its log-variances to "
                         "[log_var_min, log_var_max])")
    return _aspect_weights(log_var, aspect_mask)


def _aspect_weights(log_var: torch.Tensor, aspect_mask: torch.Tensor | None) -> torch.Tensor:
    """:func:`aspect_weights` without the finiteness check: the projector names what overflowed itself
    (``_refuse_bad_weights``), and a training loss sees its log-variances as they are."""
    if aspect_mask is None:
        return torch.softmax(-log_var, dim=-1)
    _check_aspect_mask("models.aspect_weights", aspect_mask, log_var.shape[0], log_var.device)
    any_present = aspect_mask.any(dim=-1, keepdim=True)
    logits = (-log_var).masked_fill(~aspect_mask, float("-inf")).masked_fill(~any_present, 0.0)
    return torch.softmax(logits, dim=-1) * aspect_mask


class LatentRewardProjector(_Pretrained, nn.Module):
    """R_phi: predicts the count, color and position sub-rewards from a latent and the prompt.

    A small pre-norm transformer over latent tokens (the corrector's trunk
    design: self-attention, cross-attention to the prompt, FiLM, 2D sine-cosine
    positions), read out by three learned aspect queries that attend over the
    final tokens, each mapped to one sigmoid score.

    The confidence head maps the pooled prompt embedding to three per-aspect
    log-variances ``s(e_p)``. It is trained by uncertainty weighting of the
    projector's regression loss (Kendall, Gal & Cipolla 2018, with the
    input-dependent variance of Kendall & Gal 2017): see :meth:`loss`. The
    head's output bias is the global per-aspect log-variance of the
    multi-task form; its weights let the uncertainty depend on the prompt. The
    joint-reward weights are the normalised precisions of the present aspects,
    ``lambda = softmax(-s)`` (:func:`aspect_weights`). Reward maximisation never
    trains the head, so it cannot collapse onto the easiest aspect; an aspect
    the projector predicts well for such prompts gets more weight.

    Args:
        config (ProjectorConfig): architecture.

    Example:
        >>> import torch
        >>> from xlard.models import LatentRewardProjector, ProjectorConfig
        >>> projector = LatentRewardProjector(ProjectorConfig.tiny())   # 4 latent channels, text_dim = pooled_dim = 32
        >>> zc, text_tokens, pooled = torch.randn(2, 4, 16, 16), torch.randn(2, 8, 32), torch.randn(2, 32)
        >>> mask = torch.tensor([[True, True, False], [True, False, True]])   # aspects (count, color, position)
        >>> true_rewards = torch.tensor([[1.0, 0.8, 0.0], [0.5, 0.0, 0.9]])   # 0 where absent (a NaN stays in r_task)
        >>> out = projector(zc, text_tokens, pooled, aspect_mask=mask)
        >>> out.scores.shape, out.weights.shape
        (torch.Size([2, 3]), torch.Size([2, 3]))
        >>> r_task = (out.weights.detach() * true_rewards).sum(-1)
        >>> projector.loss(out, true_rewards, mask).loss.backward()
    """

    config_class = ProjectorConfig

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        if not isinstance(config, ProjectorConfig):
            raise TypeError(f"LatentRewardProjector: config must be a ProjectorConfig, got {type(config).__name__}")
        self.config = config
        n, w = len(ASPECTS), config.width
        self.trunk = _LatentTransformer(config)
        self.aspect_queries = nn.Parameter(torch.randn(n, w) * 0.02)
        self.readout_attn = _Attention(w, config.heads, config.dropout, cross=True)
        self.readout_norm = nn.LayerNorm(w)
        self.readout_weight = nn.Parameter(torch.randn(n, w) * w ** -0.5)
        self.readout_bias = nn.Parameter(torch.zeros(n))
        self.confidence_head = nn.Sequential(
            nn.LayerNorm(config.pooled_dim),
            nn.Linear(config.pooled_dim, config.confidence_hidden), nn.SiLU(),
            nn.Linear(config.confidence_hidden, n))
        self.readout_attn.apply(_init_linear)
        self.confidence_head.apply(_init_linear)
        # Start from uniform lambda (s ~ 0) while keeping the head's gradients alive.
        nn.init.normal_(self.confidence_head[-1].weight, std=0.02)

    @property
    def _param(self) -> torch.Tensor:
        return self.readout_bias

    def _log_var(self, pooled) -> torch.Tensor:
        cfg = self.config
        return self.confidence_head(pooled).clamp(cfg.log_var_min, cfg.log_var_max)

    def forward(self, zc: torch.Tensor, text_tokens: torch.Tensor, pooled: torch.Tensor,
                text_mask: torch.Tensor | None = None, aspect_mask: torch.Tensor | None = None) -> ProjectorOutput:
        """Predict the sub-rewards of ``zc`` and the prompt's aspect weights.

        Args:
            zc (Tensor[B, C, H, W]): a (corrected) latent; differentiable (the
                "without RL" ablation back-propagates through it).
            text_tokens, pooled, text_mask: as in :class:`ResidualCorrector`.
            aspect_mask (Tensor[B, 3], bool, optional): aspects present in each
                prompt (default: all).

        Returns:
            ProjectorOutput: ``scores``, ``log_var`` and ``weights``, each ``[B, 3]``.

        Raises:
            TypeError, ValueError: a bad input, naming it; NaN or infinite values in ``zc``, ``pooled`` or a real
            token of ``text_tokens``; finite inputs whose scores come out NaN.
        """
        cfg, ref = self.config, self._param
        owner = "LatentRewardProjector"
        _refuse_non_finite(owner, zc, text_tokens, pooled, text_mask, latent_name="zc")
        _check_latent(owner, "zc", zc, cfg.latent_channels, cfg.patch, ref.device)
        text_mask = _check_prompt(owner, zc.shape[0], text_tokens, pooled, text_mask, cfg.text_dim, cfg.pooled_dim,
                                  ref.device)
        if aspect_mask is not None:
            _check_aspect_mask(owner, aspect_mask, zc.shape[0], ref.device)
        dt = ref.dtype
        pooled = pooled.to(dt)
        tokens, _ = self.trunk(zc.to(dt), text_tokens.to(dt), pooled, text_mask)
        queries = self.aspect_queries.expand(zc.shape[0], -1, -1)
        read = self.readout_norm(queries + self.readout_attn(queries, tokens))
        scores = torch.sigmoid((read * self.readout_weight).sum(-1) + self.readout_bias)
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(scores).all()):
            broken = [n for n, p in self.named_parameters() if not bool(torch.isfinite(p).all())]
            if broken:  # a diverged fit, not the input
                raise ValueError(f"xlard.{owner}: the projector's weights hold NaN or infinite values ("
                                 f"{', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}): its training "
                                 "diverged (lower optim.lr, or resume from an earlier checkpoint)")
            raise ValueError(f"xlard.{owner}: the predicted scores are NaN for finite inputs (zc's largest "
                             f"magnitude is {float(zc.abs().max()):.3g}, pooled's {float(pooled.abs().max()):.3g}; "
                             "the projector's backbone makes latents of order 1 and a text encoder's pooled "
                             "embedding is of order 1-100: is zc scaled by the VAE's scaling_factor, and pooled the "
                             "prompt's embedding?)")
        log_var = self._log_var(pooled)
        weights = _aspect_weights(log_var, aspect_mask)
        _refuse_bad_weights(owner, pooled, weights)
        return ProjectorOutput(scores, log_var, weights)

    def confidence(self, pooled: torch.Tensor, aspect_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The joint-reward weights lambda ``[B, 3]`` from the prompt alone (no latent needed).

        Args:
            pooled (Tensor[B, pooled_dim]): pooled prompt embedding.
            aspect_mask (Tensor[B, 3], bool, optional): aspects present (default: all).
        """
        owner = "LatentRewardProjector.confidence"
        ref = self._param
        _args.check_tensor(owner, "pooled", pooled, _args.FLOAT_DTYPES, dim=2)
        if pooled.shape[1] != self.config.pooled_dim:
            raise ValueError(f"xlard.{owner}: pooled must have shape [B, {self.config.pooled_dim}], "
                             f"got {tuple(pooled.shape)}")
        if pooled.device != ref.device:  # was torch's "Tensor on device cpu is not on the expected device"
            raise ValueError(f"xlard.{owner}: pooled is on {pooled.device}, the projector on {ref.device}")
        if aspect_mask is not None:
            _check_aspect_mask(owner, aspect_mask, pooled.shape[0], ref.device)
        weights = _aspect_weights(self._log_var(pooled.to(ref.dtype)), aspect_mask)
        _refuse_bad_weights(owner, pooled, weights)
        return weights

    def loss(self, pred: ProjectorOutput, target: torch.Tensor, aspect_mask: torch.Tensor) -> ProjectorLoss:
        """Uncertainty-weighted regression loss of the projector and its confidence head.

        Per present (prompt b, aspect k), with ``s = pred.log_var``:
        ``0.5 * exp(-s_bk) * (score_bk - target_bk)^2 + 0.5 * s_bk``, averaged over
        the present entries (absent entries, whose target may be NaN, are ignored).
        For a fixed error the optimum is ``s = log(squared error)``: the head
        learns each aspect's expected squared error given the prompt, and the
        projector's gradient on an aspect is scaled by its precision ``exp(-s)``.

        Args:
            pred (ProjectorOutput): from :meth:`forward`.
            target (Tensor[B, 3]): image-level sub-rewards (order :data:`ASPECTS`): count and position in
                [0, 1], color a cosine (in [0, 1] for the shapes source, possibly below 0 for a CLIP-style
                source); anything (NaN too) where the aspect is absent.
            aspect_mask (Tensor[B, 3], bool): which aspects each prompt has.

        Returns:
            ProjectorLoss: ``loss`` (scalar, 0 if nothing is present), per-aspect
            ``mse``, and the resulting ``weights`` (lambda) and ``log_var``.

        Raises:
            TypeError, ValueError: a malformed argument, naming it; a present target that is NaN, infinite or
            outside [-1, 1] (sub-rewards on another scale, 0-255 say).
        """
        owner = "LatentRewardProjector.loss"
        if not isinstance(pred, ProjectorOutput):
            raise TypeError(f"xlard.{owner}: pred must be the ProjectorOutput of forward(), got {type(pred).__name__}")
        scores, log_var = pred.scores, pred.log_var
        _args.check_tensor(owner, "target", target, _args.FLOAT_DTYPES, dim=2)
        if target.shape != scores.shape:
            raise ValueError(f"xlard.{owner}: target must have shape {tuple(scores.shape)} (order {ASPECTS}), "
                             f"got {tuple(target.shape)}")
        _check_aspect_mask(owner, aspect_mask, scores.shape[0], scores.device)
        if target.device != scores.device:
            raise ValueError(f"xlard.{owner}: target must be on the scores' device {scores.device}, got {target.device}")
        if not torch.compiler.is_compiling():
            given = target[aspect_mask]
            bad = ~(torch.isfinite(given) & (given >= -1 - _TARGET_SLACK) & (given <= 1 + _TARGET_SLACK))
            if bool(bad.any()):
                raise ValueError(f"xlard.{owner}: target must hold finite sub-rewards in [-1, 1] (count and "
                                 f"position in [0, 1], a color cosine in [-1, 1]) where aspect_mask is True, got "
                                 f"{int(bad.sum())} of {given.numel()} outside it (e.g. "
                                 f"{float(given[bad][0]):g}; NaN is allowed only where the aspect is absent)")
        target = torch.where(aspect_mask, target.to(scores.dtype), scores.detach())
        sq = (scores - target).square()
        per_entry = 0.5 * torch.exp(-log_var) * sq + 0.5 * log_var
        present = aspect_mask.to(scores.dtype)
        total = (per_entry * present).sum() / present.sum().clamp_min(1.0)
        counts = present.sum(0)
        mse = ((sq * present).sum(0) / counts.clamp_min(1.0)).detach()
        return ProjectorLoss(total, mse, _aspect_weights(log_var, aspect_mask).detach(), log_var.detach())
