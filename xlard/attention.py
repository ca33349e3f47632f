"""Attention capture: text-to-image attention maps recorded during a diffusers call.

:class:`AttentionCapture` is a context manager around a diffusers pipeline (or
its denoiser). On entry it swaps the attention processors of the selected
layers for xlard's own, which compute the layer's output exactly as the
standard diffusers processor does (same operations, same order: the pipeline's
output is bit-for-bit unchanged) and, on the side, the attention probabilities
of every image query over the *selected* text keys only. Those are averaged
over heads and added to a running mean per latent-grid resolution, so the
memory held is ``B x T_selected x h x w`` per resolution, whatever the number
of steps. On exit (also on an exception) the original processors come back.

Families (the standard processor each one must be using, else a clear error):

- UNet cross-attention (SD 1.x/2.x, SDXL: ``UNet2DConditionModel`` ``attn2``)
  and PixArt cross-attention (``PixArtTransformer2DModel`` ``attn2``, with the
  text padding mask): ``AttnProcessor2_0``.
- SD3 joint attention (``SD3Transformer2DModel``): ``JointAttnProcessor2_0``;
  the joint sequence is [image tokens ; text tokens].
- FLUX (``FluxTransformer2DModel``): ``FluxAttnProcessor``; the joint sequence
  is [text tokens ; image tokens], in double- and single-stream blocks.

For joint attention the probability of image query i on text key t is
``exp(s_it - logsumexp_j s_ij)`` over *all* keys j (image and text), computed
in chunks of image queries: the full attention matrix never exists at once.

Token indices index the denoiser's text sequence: CLIP's 77 tokens for SD and
SDXL; SD3's joined [CLIP (77) ; T5] sequence, see
:meth:`xlard.prompts.PromptSpec.sequence_token_indices`; T5's tokens for FLUX
and PixArt.

Step and guidance bookkeeping happens in a forward pre-hook on the denoiser:

- A denoiser call whose timestep differs from the previous call's starts a new
  denoising step; a larger timestep than the previous call's starts a new run
  (samplers go from high noise to low), and so does, with a pipeline given, a
  new pipeline call (its scheduler's timesteps set anew: one-step runs repeat
  the same timestep). Several calls with the same timestep
  (FLUX "true CFG", SD3 skip-layer guidance, Heun's correction) are one step;
  by default only the first of them is recorded.
- Classifier-free guidance batched the diffusers way puts the unconditional
  half first. Whether a run batches CFG is decided at its first call: from
  ``cfg=`` if given, else from the pipeline's ``do_classifier_free_guidance``
  (FLUX pipelines never batch it), else detected: an even batch whose two halves
  of the latent input are identical (every diffusers pipeline duplicates the
  latents for CFG). A detected guess is checked at every later call of the run:
  halves that differ later mean two prompts began from the same noise, and the
  run stops with an error asking for ``cfg=`` (a one-step run of two prompts on
  the same noise cannot be told from guidance: pass ``cfg=`` there). A call of
  another batch size in a guided run (SD3's skip-layer guidance: the conditional
  latents alone) is not split: all its rows are the prompts'.
- The hook reads the timestep as a Python number: one host synchronization
  per denoiser call (not per layer).

Several pipeline calls inside one ``with`` block add to the same running
means; :meth:`AttentionCapture.reset` starts afresh.
"""
from __future__ import annotations

import fnmatch
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from xlard._optional import require

__all__ = [
    "CaptureConfig",
    "AttentionCapture",
    "capturable_layers",
    "text_attention_probs",
]

_GUIDANCE_HALVES = ("cond", "uncond", "all")
_NORMALIZATIONS = ("none", "sum", "max")
_RESIZE_MODES = ("bilinear", "bicubic", "nearest", "area")
_REPEAT_CALLS = ("first", "all")
_DTYPES: Mapping[Any, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, torch.float32: torch.float32,
    "float16": torch.float16, "fp16": torch.float16, torch.float16: torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, torch.bfloat16: torch.bfloat16,
}

# Layer kinds and the diffusers processor each one must be running when capture starts.
_CROSS, _JOINT_IMAGE_FIRST, _FLUX_DOUBLE, _FLUX_SINGLE = "cross", "joint", "flux_double", "flux_single"
_EXPECTED_PROCESSOR = {
    _CROSS: "AttnProcessor2_0",
    _JOINT_IMAGE_FIRST: "JointAttnProcessor2_0",
    _FLUX_DOUBLE: "FluxAttnProcessor",
    _FLUX_SINGLE: "FluxAttnProcessor",
}


def _require_diffusers():
    require("diffusers", "xlard.attention")


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_tuple(value: Any, what: str, *, minimum: int | None = 0, allow_empty: bool = False) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) and not isinstance(value, torch.Tensor):
        raise ValueError(f"CaptureConfig.{what} must be a sequence of integers, got {value!r}")
    items = tuple(int(v) if isinstance(v, torch.Tensor) and v.ndim == 0 else v for v in value)
    if not items and not allow_empty:
        raise ValueError(f"CaptureConfig.{what} must not be empty")
    for item in items:
        if not _is_int(item) or (minimum is not None and item < minimum):
            bound = "" if minimum is None else f" >= {minimum}"
            raise ValueError(f"CaptureConfig.{what} must hold integers{bound}, got {value!r}")
    return items


def _size_pair(value: Any, what: str) -> tuple[int, int]:
    if _is_int(value):
        pair = (value, value)
    else:
        try:
            pair = tuple(value)
        except TypeError:
            raise ValueError(f"{what} must be an integer or an (h, w) pair, got {value!r}") from None
    if len(pair) != 2 or not all(_is_int(v) and v > 0 for v in pair):
        raise ValueError(f"{what} must be a positive integer or an (h, w) pair of them, got {value!r}")
    return (int(pair[0]), int(pair[1]))


def _resolve_step_indices(indices, total: int | None) -> set[int]:
    """``CaptureConfig.step_indices`` as step numbers of a run of ``total`` steps: a negative index counts from
    the end (-1: the last step); an index outside the run selects nothing (one did not wrap around modulo n
    only because a negative index stood beside it)."""
    out = set()
    for i in indices:
        j = i + total if (i < 0 and total is not None) else i
        if j >= 0 and (total is None or j < total):
            out.add(j)
    return out


@dataclass(frozen=True)
class CaptureConfig:
    """What :class:`AttentionCapture` records and how it aggregates it.

    Validated once on construction; sequences are normalized to tuples.

    Attributes:
        tokens: text-token indices to keep (only these are computed and
            stored), indexing the denoiser's text sequence. Either one tuple
            shared by the whole batch, or one tuple per sample (all of the
            same length T; the batch is the kept CFG half). None keeps every
            text token (memory grows with the text length).
        layers: which capturable layers: ``fnmatch`` patterns on module names
            relative to the denoiser ("up_blocks.*attn2",
            "single_transformer_blocks.*") and/or integer positions in
            :func:`capturable_layers` order (negative from the end). None:
            all of them. Each pattern or index must select something.
        resolutions: latent-grid sizes to keep: an integer r keeps grids whose
            shorter side is r, an (h, w) pair keeps exactly that grid. None:
            every resolution.
        steps: (start, end) window of the denoising, as fractions in [0, 1]:
            step i of n is kept when start <= i / n < end (end 1.0 keeps the
            last step). Anything but (0, 1) needs the number of steps (from
            the pipeline or ``AttentionCapture(num_steps=...)``).
        step_indices: alternatively, explicit step indices (negative from the
            end, which needs the number of steps; an index outside the run
            selects nothing). Exclusive with ``steps``. A window or indices need
            steps that can be counted: a second-order scheduler that evaluates
            between its timesteps (KDPM2) is refused with a message.
        heads: head indices averaged over; None: all heads.
        guidance_half: under batched classifier-free guidance, which half to
            keep: "cond" (the second half, diffusers' order), "uncond" or
            "all" (both; the batch is then 2B). A call of another batch size in
            a guided run (SD3's skip-layer guidance, the prompts' rows alone)
            counts as the prompts' rows under "cond" and is left out under
            "uncond" and "all".
        normalize: applied to each token's final map: "none", "sum" (sums to
            one over the grid) or "max" (maximum one).
        output_size: the grid :meth:`AttentionCapture.maps` resizes every
            resolution to before averaging; an integer or (h, w). None: the
            largest captured grid.
        resize_mode: ``torch.nn.functional.interpolate`` mode for that resize.
        accumulate_dtype: dtype of the running means ("float32" or
            "float16"/"bfloat16"); probabilities are computed in float32.
            A low-precision mean holds only its first records (16 per
            resolution or layer in bfloat16, 128 in float16: beyond them its
            updates round away), then goes on in float32: a memory saving for
            short captures only.
        per_layer: also keep one running mean per layer (native resolution),
            returned by :meth:`AttentionCapture.layer_maps`.
        chunk_elements: at most this many attention logits (kept batch x heads
            x query chunk x keys) exist at once while computing probabilities;
            the peak temporary memory is about 3 x 4 bytes x this.
        repeat_calls: of several denoiser calls within one step (same
            timestep), record only the "first" or "all".

    Raises:
        ValueError: any field out of its domain, with the field named.

    Example:
        >>> CaptureConfig(tokens=(5, 6), resolutions=(16,), steps=(0.0, 0.5)).guidance_half
        'cond'
    """

    tokens: tuple[int, ...] | tuple[tuple[int, ...], ...] | None = None
    layers: tuple[str | int, ...] | None = None
    resolutions: tuple[int | tuple[int, int], ...] | None = None
    steps: tuple[float, float] = (0.0, 1.0)
    step_indices: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    guidance_half: str = "cond"
    normalize: str = "none"
    output_size: int | tuple[int, int] | None = None
    resize_mode: str = "bilinear"
    accumulate_dtype: str | torch.dtype = "float32"
    per_layer: bool = False
    chunk_elements: int = 1 << 24
    repeat_calls: str = "first"

    def __post_init__(self) -> None:
        def set_(name: str, value: Any) -> None:  # the dataclass is frozen
            object.__setattr__(self, name, value)

        if self.tokens is not None:
            tokens = self.tokens
            if isinstance(tokens, torch.Tensor):
                tokens = tokens.tolist()
            if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence) or len(tokens) == 0:
                raise ValueError(f"CaptureConfig.tokens must be a non-empty sequence of token indices, got {tokens!r}")
            if all(_is_int(t) for t in tokens):
                set_("tokens", _int_tuple(tokens, "tokens"))
            else:
                rows = tuple(_int_tuple(row, "tokens (per-sample rows)") for row in tokens)
                if len({len(row) for row in rows}) != 1:
                    raise ValueError(
                        "CaptureConfig.tokens per-sample rows must all have the same length, got lengths "
                        f"{[len(r) for r in rows]}"
                    )
                set_("tokens", rows)
        if self.layers is not None:
            layers = (self.layers,) if isinstance(self.layers, (str, int)) else tuple(self.layers)
            if not layers:
                raise ValueError("CaptureConfig.layers must not be empty (use None for every layer)")
            for item in layers:
                if not (isinstance(item, str) and item) and not _is_int(item):
                    raise ValueError(f"CaptureConfig.layers holds name patterns or integer indices, got {item!r}")
            set_("layers", layers)
        if self.resolutions is not None:
            items = (self.resolutions,) if _is_int(self.resolutions) else tuple(self.resolutions)
            if not items:
                raise ValueError("CaptureConfig.resolutions must not be empty (use None for every resolution)")
            for r in items:
                _size_pair(r, "CaptureConfig.resolutions item")
            set_("resolutions", tuple(r if _is_int(r) else _size_pair(r, "") for r in items))
        try:
            start, end = (float(v) for v in self.steps)
        except (TypeError, ValueError):
            raise ValueError(
                f"CaptureConfig.steps must be a (start, end) pair of fractions, got {self.steps!r}"
            ) from None
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"CaptureConfig.steps must satisfy 0 <= start < end <= 1, got {self.steps!r}")
        set_("steps", (start, end))
        if self.step_indices is not None:
            if (start, end) != (0.0, 1.0):
                raise ValueError("give either CaptureConfig.steps (fractions) or step_indices, not both")
            set_("step_indices", _int_tuple(self.step_indices, "step_indices", minimum=None))
        if self.heads is not None:
            heads = _int_tuple(self.heads, "heads")
            if len(set(heads)) != len(heads):
                raise ValueError(f"CaptureConfig.heads must not repeat a head, got {heads!r}")
            set_("heads", heads)
        for name, allowed in (("guidance_half", _GUIDANCE_HALVES), ("normalize", _NORMALIZATIONS),
                              ("resize_mode", _RESIZE_MODES), ("repeat_calls", _REPEAT_CALLS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"CaptureConfig.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.output_size is not None:
            set_("output_size", _size_pair(self.output_size, "CaptureConfig.output_size"))
        dtype = _DTYPES.get(self.accumulate_dtype)
        if dtype is None:
            raise ValueError(
                "CaptureConfig.accumulate_dtype must be float32 or float16/bfloat16 (a name or torch dtype), "
                f"got {self.accumulate_dtype!r}"
            )
        set_("accumulate_dtype", str(dtype).removeprefix("torch."))
        if not isinstance(self.per_layer, bool):
            raise ValueError(f"CaptureConfig.per_layer must be a bool, got {self.per_layer!r}")
        if not _is_int(self.chunk_elements) or self.chunk_elements < 1:
            raise ValueError(f"CaptureConfig.chunk_elements must be an integer >= 1, got {self.chunk_elements!r}")

    @property
    def dtype(self) -> torch.dtype:
        """The accumulation dtype as a torch dtype."""
        return _DTYPES[self.accumulate_dtype]

    @property
    def num_tokens(self) -> int | None:
        """T, the number of kept tokens per sample (None: every text token)."""
        if self.tokens is None:
            return None
        return len(self.tokens[0]) if isinstance(self.tokens[0], tuple) else len(self.tokens)


# ---------------------------------------------------------------------------
# The probability computation
# ---------------------------------------------------------------------------

    def kept_steps(self, num_steps: int) -> list[int]:
        """The step indices of a run of ``num_steps`` denoising steps that this config records (``steps`` window
        or ``step_indices``), e.g. to check before a run that it records anything."""
        if self.step_indices is not None:  # as AttentionCapture selects them
            return sorted(_resolve_step_indices(self.step_indices, num_steps))
        start, end = self.steps
        return [i for i in range(num_steps) if start <= i / num_steps and (i / num_steps < end or end == 1.0)]


def _additive_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """An SDPA-style mask (bool: True attends; float: added) as a float32 4D bias, right-aligned."""
    if mask is None:
        return None
    if mask.ndim > 4:
        raise ValueError(f"attention mask must have at most 4 dims, got shape {tuple(mask.shape)}")
    mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, -math.inf)
    if not mask.is_floating_point():  # a 0/1 keep-mask added as a bias of 0 or 1 masked nothing (SDPA refuses it)
        raise ValueError(f"mask must be bool (True attends) or a float bias added to the logits, as "
                         f"scaled_dot_product_attention takes it, got {str(mask.dtype).removeprefix('torch.')}: "
                         "for a 0/1 keep-mask pass mask.bool()")
    return mask.float()


def text_attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    token_positions: torch.Tensor,
    *,
    query_start: int = 0,
    num_queries: int | None = None,
    mask: torch.Tensor | None = None,
    rows: slice | None = None,
    heads: torch.Tensor | None = None,
    chunk_elements: int = 1 << 24,
    _trusted: bool = False,
) -> torch.Tensor:
    """Softmax attention probabilities of a block of queries on selected keys, head-averaged.

    The softmax runs over *all* keys (``logsumexp`` over the full key axis),
    but only the selected keys' probabilities are kept, and queries are
    processed in chunks so that at most ``chunk_elements`` logits exist at
    once. Computed in float32 with SDPA's default scale ``head_dim ** -0.5``.

    Args:
        query (Tensor[B, H, Sq, D]): queries (after norms / rotary embedding).
        key (Tensor[B, H, Sk, D]): every key of the attention.
        token_positions (Tensor[T] or Tensor[B', T], int64): key positions to
            keep, shared or per kept sample.
        query_start: first query of the block (the image tokens).
        num_queries: block length; None: to the end.
        mask: the attention's SDPA mask (bool or additive), broadcastable to
            [B, H, Sq, Sk].
        rows: the batch rows to keep (e.g. the conditional CFG half).
        heads (Tensor[H'], int64): heads to average; None: all.
        chunk_elements: logits budget per chunk.

    Returns:
        Tensor[B', T, N] float32: probabilities, image queries last.

    Example:
        >>> q, k = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 9, 4)
        >>> text_attention_probs(q, k, torch.tensor([7, 8]), num_queries=6).shape
        torch.Size([1, 2, 6])
    """
    if query.ndim != 4 or key.ndim != 4 or query.shape[0] != key.shape[0] or query.shape[1] != key.shape[1] \
            or query.shape[3] != key.shape[3]:
        raise ValueError(
            "text_attention_probs: query and key must be [B, H, S, D] with equal B, H and D, got "
            f"{tuple(query.shape)} and {tuple(key.shape)}"
        )
    if not isinstance(token_positions, torch.Tensor) or token_positions.dtype != torch.int64 \
            or token_positions.ndim not in (1, 2):
        raise ValueError(
            "text_attention_probs: token_positions must be an int64 Tensor[T] or Tensor[B, T], got "
            f"{getattr(token_positions, 'dtype', type(token_positions).__name__)} of shape "
            f"{tuple(getattr(token_positions, 'shape', ()))}"
        )
    sq, sk, h = query.shape[2], key.shape[2], query.shape[1]
    # (_trusted: the capture's own call, whose indices are right by construction: no device sync per layer)
    if not _trusted and token_positions.numel() \
            and not (0 <= int(token_positions.min()) and int(token_positions.max()) < sk):
        raise ValueError(f"text_attention_probs: token_positions must index the {sk} keys, got positions in "
                         f"[{int(token_positions.min())}, {int(token_positions.max())}]")
    # a start past the queries gave an empty block, a negative length ran to the end, both without a word
    if isinstance(query_start, bool) or not isinstance(query_start, int) or not 0 <= query_start < max(sq, 1):
        raise ValueError(f"text_attention_probs: query_start must be an int in [0, {sq}), got {query_start!r}")
    if num_queries is not None and (isinstance(num_queries, bool) or not isinstance(num_queries, int)
                                    or not 1 <= num_queries <= sq - query_start):
        raise ValueError(f"text_attention_probs: num_queries must be None or an int in [1, {sq - query_start}] "
                         f"(queries from {query_start} of {sq}), got {num_queries!r}")
    if heads is not None and not _trusted and (
            not isinstance(heads, torch.Tensor) or heads.dtype != torch.int64 or heads.dim() != 1
            or heads.numel() == 0 or int(heads.min()) < 0 or int(heads.max()) >= h):
        raise ValueError(f"text_attention_probs: heads must be a non-empty int64 Tensor[H'] of head indices in "
                         f"[0, {h}), got {heads if isinstance(heads, torch.Tensor) else type(heads).__name__}")
    rows = rows if rows is not None else slice(None)
    end = query.shape[2] if num_queries is None else query_start + num_queries
    q = query[rows, :, query_start:end]
    k = key[rows]
    bias = _additive_mask(mask)
    if bias is not None:
        full = (query.shape[0], h, sq, sk)
        if any(m not in (1, f) for m, f in zip(bias.shape, full)):  # was a raw broadcast error mid-chunk
            raise ValueError(f"text_attention_probs: mask {tuple(mask.shape)} does not broadcast to the attention's "
                             f"[B, H, Sq, Sk] = {list(full)}")
        if bias.shape[0] != 1:
            bias = bias[rows]
        if bias.shape[2] != 1:
            bias = bias[:, :, query_start:end]
    if heads is not None:
        q = q.index_select(1, heads)
        k = k.index_select(1, heads)
        if bias is not None and bias.shape[1] != 1:
            bias = bias.index_select(1, heads)
    batch, num_heads, n, head_dim = q.shape
    keys = k.shape[2]
    num_tokens = token_positions.shape[-1]
    # Folding the scale into the keys costs one small multiply instead of one per chunk.
    keys_t = (k.float() * (head_dim ** -0.5)).transpose(-1, -2)
    chunk = max(1, chunk_elements // max(1, batch * num_heads * keys))
    per_sample = token_positions.ndim == 2
    if per_sample and token_positions.shape[0] != batch:
        raise ValueError(f"text_attention_probs: per-sample token_positions need one row per kept sample ({batch}), "
                         f"got {token_positions.shape[0]}")

    def block(start: int, stop: int) -> torch.Tensor:
        logits = torch.matmul(q[:, :, start:stop].float(), keys_t)
        if bias is not None:
            logits = logits + (bias if bias.shape[2] == 1 else bias[:, :, start:stop])
        # The softmax runs over every key; only the kept columns survive the chunk.
        probs = torch.softmax(logits, dim=-1)
        if per_sample:
            index = token_positions[:, None, None, :].expand(batch, num_heads, probs.shape[2], num_tokens)
            return probs.gather(-1, index).mean(dim=1)
        return probs.index_select(-1, token_positions).mean(dim=1)

    if n <= chunk:
        return block(0, n).transpose(1, 2)
    out = torch.empty(batch, n, num_tokens, dtype=torch.float32, device=q.device)
    for start in range(0, n, chunk):
        out[:, start:start + chunk] = block(start, start + chunk)
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------
# Layer discovery
# ---------------------------------------------------------------------------


def _capturable_modules(denoiser: torch.nn.Module) -> list[tuple[str, str, torch.nn.Module]]:
    """(name, kind, module) of every capturable attention layer, in module order."""
    from diffusers.models.attention_processor import Attention

    try:
        from diffusers.models.transformers.transformer_flux import FluxAttention
    except ImportError:  # pragma: no cover - older diffusers
        FluxAttention = None
    found = []
    for name, module in denoiser.named_modules():
        kind = None
        if FluxAttention is not None and isinstance(module, FluxAttention):
            kind = _FLUX_DOUBLE if module.added_kv_proj_dim is not None else _FLUX_SINGLE
        elif isinstance(module, Attention):
            if module.is_cross_attention:
                kind = _CROSS
            elif getattr(module, "add_k_proj", None) is not None:
                kind = _JOINT_IMAGE_FIRST
        if kind is not None:
            found.append((name, kind, module))
    return found


def _resolve_target(target: Any) -> tuple[torch.nn.Module, Any]:
    for attr in ("unet", "transformer"):
        denoiser = getattr(target, attr, None)
        if isinstance(denoiser, torch.nn.Module):
            return denoiser, target
    if isinstance(target, torch.nn.Module):
        return target, None
    raise ValueError(
        f"expected a diffusers pipeline (with .unet or .transformer) or a denoiser module, got {type(target).__name__}"
    )


def capturable_layers(target: Any) -> list[tuple[str, str]]:
    """The attention layers :class:`AttentionCapture` can record, in module order.

    Args:
        target: a diffusers pipeline (its ``unet`` or ``transformer``) or a
            denoiser module.

    Returns:
        (name, kind) pairs; names are relative to the denoiser, kinds are
        "cross" (UNet / PixArt), "joint" (SD3), "flux_double", "flux_single".

    Example:
        >>> capturable_layers(pipe)[:1]                          # doctest: +SKIP
        [('down_blocks.0.attentions.0.transformer_blocks.0.attn2', 'cross')]
    """
    _require_diffusers()
    denoiser, _ = _resolve_target(target)
    return [(name, kind) for name, kind, _ in _capturable_modules(denoiser)]


def _select_layers(available: list[tuple[str, str]], selection: tuple[str | int, ...] | None) -> list[int]:
    if selection is None:
        return list(range(len(available)))
    chosen: set[int] = set()
    names = [name for name, _ in available]
    for item in selection:
        if _is_int(item):
            if not -len(names) <= item < len(names):
                raise ValueError(f"layer index {item} is out of range: {len(names)} capturable layers")
            chosen.add(item % len(names))
        else:
            hits = [i for i, name in enumerate(names) if fnmatch.fnmatchcase(name, item)]
            if not hits:
                raise ValueError(f"layer pattern {item!r} matches no capturable layer; they are: {names}")
            chosen.update(hits)
    return sorted(chosen)


# ---------------------------------------------------------------------------
# Runtime state shared by the processors of one capture
# ---------------------------------------------------------------------------


@dataclass
class _Call:
    """What the denoiser pre-hook learned about the current denoiser call."""

    step: int
    recording: bool
    rows: slice
    base_hw: tuple[int, int] | None
    exact_grid: tuple[int, int] | None
    text_len: int | None


class _RunningMean:
    """A running mean in ``mean``'s dtype. A float16/bfloat16 mean stops moving once a step ``(value - mean) /
    count`` falls below half a unit of its last place (a bfloat16 mean of values rising from 0.02 to 0.2 stayed at
    0.03 over 1600 records, the truth 0.11), so a low-precision mean is kept only while ``count`` stays small enough
    for its steps to register, then carried on in float32."""

    __slots__ = ("mean", "count", "_limit")

    def __init__(self, mean: torch.Tensor):
        # a normal tensor even when the first call runs under torch.inference_mode(): an inference tensor refused
        # the in-place update of a later call made outside it ("Inplace update to inference tensor ...")
        with torch.inference_mode(False):
            self.mean = mean.clone() if mean.is_inference() else mean
        self.count = 0
        self._limit = None if mean.dtype == torch.float32 else max(1, round(0.125 / torch.finfo(mean.dtype).eps))

    def add(self, value: torch.Tensor) -> None:
        if value.shape != self.mean.shape:
            raise RuntimeError(
                f"captured map shape changed from {tuple(self.mean.shape)} to {tuple(value.shape)} "
                "(batch or token count differs between calls); call AttentionCapture.reset() between them"
            )
        if self._limit is not None and self.count >= self._limit:
            with torch.inference_mode(False):
                self.mean = self.mean.float()
            self._limit = None
        self.count += 1
        self.mean.lerp_(value.to(self.mean.dtype), 1.0 / self.count)


class _CaptureState:
    def __init__(self, config: CaptureConfig):
        self.config = config
        self.call: _Call | None = None
        self.by_resolution: dict[tuple[int, int], _RunningMean] = {}
        self.by_layer: dict[str, _RunningMean] = {}
        self.layer_grid: dict[str, tuple[int, int]] = {}
        self.recorded_steps: set[int] = set()
        self._grid_cache: dict[tuple[Any, int], tuple[int, int] | None] = {}
        self._index_cache: dict[tuple[Any, ...], torch.Tensor] = {}

    def grid_for(self, num_image_tokens: int) -> tuple[int, int]:
        call = self.call
        if call.exact_grid is not None:
            h, w = call.exact_grid
            if h * w == num_image_tokens:
                return (h, w)
            raise RuntimeError(f"{num_image_tokens} image tokens do not form the {h}x{w} grid of the image ids")
        key = (call.base_hw, num_image_tokens)
        if key not in self._grid_cache:
            grid = None
            if call.base_hw is not None:
                height, width = call.base_hw
                # Down-sampling by s with padding gives ceil(H / s) rows (UNet levels, patchify).
                for s in range(1, max(height, width) + 1):
                    h, w = -(-height // s), -(-width // s)
                    if h * w == num_image_tokens:
                        grid = (h, w)
                        break
                    if h * w < num_image_tokens:
                        break
            if grid is None:
                side = math.isqrt(num_image_tokens)
                if side * side != num_image_tokens:
                    raise RuntimeError(
                        f"cannot infer the latent grid of {num_image_tokens} image tokens "
                        f"(denoiser input {call.base_hw})"
                    )
                grid = (side, side)
            self._grid_cache[key] = grid
        return self._grid_cache[key]

    def heads_index(self, device: torch.device) -> torch.Tensor:
        key = ("heads", device)
        if key not in self._index_cache:
            self._index_cache[key] = torch.tensor(self.config.heads, dtype=torch.int64, device=device)
        return self._index_cache[key]

    def keeps_resolution(self, grid: tuple[int, int]) -> bool:
        wanted = self.config.resolutions
        if wanted is None:
            return True
        return any(grid == r if isinstance(r, tuple) else min(grid) == r for r in wanted)

    def token_positions(self, text_len: int, text_start: int, batch: int, device: torch.device) -> torch.Tensor:
        key = (text_len, text_start, batch, device)
        cached = self._index_cache.get(key)
        if cached is not None:
            return cached
        tokens = self.config.tokens
        if tokens is None:
            index = torch.arange(text_len)
        else:
            index = torch.tensor(tokens, dtype=torch.int64)
            if int(index.max()) >= text_len:
                raise ValueError(
                    f"token index {int(index.max())} is out of range: the text sequence has {text_len} tokens"
                )
            if index.ndim == 2 and index.shape[0] != batch:
                raise ValueError(
                    f"CaptureConfig.tokens has {index.shape[0]} per-sample rows but the kept batch has {batch} "
                    "samples (prompts x images per prompt, one CFG half)"
                )
        index = (index + text_start).to(device)
        self._index_cache[key] = index
        return index

    def add(self, layer: str, probs: torch.Tensor, grid: tuple[int, int]) -> None:
        value = probs.reshape(probs.shape[0], probs.shape[1], *grid)
        slot = self.by_resolution.get(grid)
        if slot is None:
            slot = self.by_resolution[grid] = _RunningMean(torch.zeros_like(value, dtype=self.config.dtype))
        slot.add(value)
        if self.config.per_layer:
            slot = self.by_layer.get(layer)
            if slot is None:
                slot = self.by_layer[layer] = _RunningMean(torch.zeros_like(value, dtype=self.config.dtype))
                self.layer_grid[layer] = grid
            slot.add(value)
        self.recorded_steps.add(self.call.step)


# ---------------------------------------------------------------------------
# Processors: the standard computation, plus the capture on the side
# ---------------------------------------------------------------------------


class _CaptureProcessor:
    """Base: holds the capture state, the layer name and the processor it replaced."""

    def __init__(self, state: _CaptureState, name: str, original: Any):
        self.state = state
        self.name = name
        self.original = original

    def _capture(self, query, key, *, query_start, num_queries, text_start, text_len, mask=None) -> None:
        state = self.state
        call = state.call
        if call is None or not call.recording:
            return
        grid = state.grid_for(num_queries)
        if not state.keeps_resolution(grid):
            return
        config = state.config
        rows = call.rows
        batch = len(range(*rows.indices(query.shape[0])))
        heads = None
        if config.heads is not None:
            if max(config.heads) >= query.shape[1]:
                raise ValueError(
                    f"CaptureConfig.heads {config.heads} out of range: layer {self.name!r} has {query.shape[1]} heads"
                )
            heads = state.heads_index(query.device)
        positions = state.token_positions(text_len, text_start, batch, query.device)
        with torch.no_grad():
            probs = text_attention_probs(
                query, key, positions, query_start=query_start, num_queries=num_queries, mask=mask,
                rows=rows, heads=heads, chunk_elements=config.chunk_elements, _trusted=True,
            )
            state.add(self.name, probs, grid)


class _CrossAttentionProcessor(_CaptureProcessor):
    """UNet / PixArt cross-attention; the same computation as diffusers' ``AttnProcessor2_0``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial_shape = None
        if hidden_states.ndim == 4:
            spatial_shape = hidden_states.shape
            b, c, h, w = spatial_shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, source_len = source.shape[0], source.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, source_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states
        key = attn.to_k(context)
        value = attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            self._capture(query, key, query_start=0, num_queries=query.shape[2], text_start=0,
                          text_len=key.shape[2], mask=attention_mask)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if spatial_shape is not None:
            out = out.transpose(-1, -2).reshape(spatial_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class _JointImageFirstProcessor(_CaptureProcessor):
    """SD3 joint attention, [image ; text]; the same computation as ``JointAttnProcessor2_0``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, num_image = hidden_states.shape[0], hidden_states.shape[1]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads

        def heads_first(x):
            return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads_first(query), heads_first(key), heads_first(value)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            text_query = heads_first(attn.add_q_proj(encoder_hidden_states))
            text_key = heads_first(attn.add_k_proj(encoder_hidden_states))
            text_value = heads_first(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([query, text_query], dim=2)
            key = torch.cat([key, text_key], dim=2)
            value = torch.cat([value, text_value], dim=2)
            self._capture(query, key, query_start=0, num_queries=num_image, text_start=num_image,
                          text_len=key.shape[2] - num_image)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is None:
            out = attn.to_out[0](out)
            return attn.to_out[1](out)
        out, text_out = out[:, :num_image], out[:, num_image:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return out, text_out


class _FluxProcessor(_CaptureProcessor):
    """FLUX attention, [text ; image]; the same computation as ``FluxAttnProcessor``."""

    def __init__(self, state, name, original):
        super().__init__(state, name, original)
        # A backend chosen with set_attention_backend lives on the processor instance; keep it.
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        joint = attn.added_kv_proj_dim is not None
        text_query = text_key = text_value = None
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            if encoder_hidden_states is not None and hasattr(attn, "to_added_qkv"):
                text_query, text_key, text_value = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
            if encoder_hidden_states is not None and joint:
                text_query = attn.add_q_proj(encoder_hidden_states)
                text_key = attn.add_k_proj(encoder_hidden_states)
                text_value = attn.add_v_proj(encoder_hidden_states)
        split = (-1, attn.head_dim)
        query, key, value = query.unflatten(-1, split), key.unflatten(-1, split), value.unflatten(-1, split)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if joint:
            text_query = attn.norm_added_q(text_query.unflatten(-1, split))
            text_key = attn.norm_added_k(text_key.unflatten(-1, split))
            text_value = text_value.unflatten(-1, split)
            query = torch.cat([text_query, query], dim=1)
            key = torch.cat([text_key, key], dim=1)
            value = torch.cat([text_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        call = self.state.call
        if call is not None and call.recording:
            text_len = encoder_hidden_states.shape[1] if joint else call.text_len
            if text_len is None:
                raise RuntimeError(
                    f"FLUX single-stream layer {self.name!r}: the text length is unknown "
                    "(the denoiser was called without encoder_hidden_states)"
                )
            mask = attention_mask
            if mask is not None and mask.ndim == 2 and mask.shape == (query.shape[0], key.shape[1]):
                # diffusers' dispatch reads a 2D mask as [batch, keys], not SDPA's [queries, keys].
                mask = mask[:, None, None, :]
            self._capture(query.transpose(1, 2), key.transpose(1, 2), query_start=text_len,
                          num_queries=query.shape[1] - text_len, text_start=0, text_len=text_len, mask=mask)
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        num_text = encoder_hidden_states.shape[1]
        text_out, out = out.split_with_sizes([num_text, out.shape[1] - num_text], dim=1)
        out = attn.to_out[0](out.contiguous())
        out = attn.to_out[1](out)
        text_out = attn.to_add_out(text_out.contiguous())
        return out, text_out


_PROCESSOR_HOME = {  # where a user imports the processor a capture expects
    "AttnProcessor2_0": "diffusers.models.attention_processor",
    "JointAttnProcessor2_0": "diffusers.models.attention_processor",
    "FluxAttnProcessor": "diffusers.models.transformers.transformer_flux",
}

_PROCESSOR_FOR_KIND = {
    _CROSS: _CrossAttentionProcessor,
    _JOINT_IMAGE_FIRST: _JointImageFirstProcessor,
    _FLUX_DOUBLE: _FluxProcessor,
    _FLUX_SINGLE: _FluxProcessor,
}


# ---------------------------------------------------------------------------
# The context manager
# ---------------------------------------------------------------------------


def _scalar(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.reshape(-1)[0]) if value.numel() else None
    return float(value)


class AttentionCapture:
    """Record text-to-image attention maps during a diffusers pipeline call.

    Args:
        target: a diffusers pipeline (``StableDiffusionPipeline``,
            ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``,
            ``FluxPipeline``, ``PixArtAlphaPipeline``, ...) or its denoiser
            (``UNet2DConditionModel``, ``SD3Transformer2DModel``,
            ``FluxTransformer2DModel``, ``PixArtTransformer2DModel``).
        config: what to record (:class:`CaptureConfig`); default: every
            capturable layer, every token, the conditional half.
        num_steps: denoising steps per run, for fractional step windows and
            negative step indices; default: the pipeline's own count.
        cfg: whether calls batch classifier-free guidance (unconditional half
            first); None: the pipeline's ``do_classifier_free_guidance``, else
            detected from identical latent halves.

    Entering the capture again adds to the maps recorded so far (``reset()``
    forgets them) and continues the run: a lower timestep is the next step,
    the same one another call of the step (one block per denoiser call
    counts steps as one block around the loop does). In a one-step run
    (``num_steps=1``, or a pipeline's one step) a block's first call at the
    same timestep starts a new run instead (a one-step readout in each of
    two blocks counts twice).

    Raises:
        ValueError: a bad target or config; a selected layer whose processor
            is not the standard one of its family (named in the message).

    Example:
        >>> config = CaptureConfig(tokens=spec.sequence_token_indices({"tokenizer": 0})[0])  # doctest: +SKIP
        >>> with AttentionCapture(pipe, config) as capture:                               # doctest: +SKIP
        ...     image = pipe("a photo of two dogs", num_inference_steps=20).images[0]
        >>> capture.maps().shape                                                            # doctest: +SKIP
        torch.Size([1, 1, 64, 64])
    """

    def __init__(self, target: Any, config: CaptureConfig | None = None, *, num_steps: int | None = None,
                 cfg: bool | None = None):
        _require_diffusers()
        if config is None:
            config = CaptureConfig()
        if not isinstance(config, CaptureConfig):
            raise ValueError(f"config must be a CaptureConfig, got {type(config).__name__}")
        if num_steps is not None and (not _is_int(num_steps) or num_steps < 1):
            raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        if cfg is not None and not isinstance(cfg, bool):
            raise ValueError(f"cfg must be None, True or False, got {cfg!r}")
        self.denoiser, self.pipeline = _resolve_target(target)
        self.config = config
        self.num_steps = num_steps
        self.cfg = cfg
        available = _capturable_modules(self.denoiser)
        if not available:
            raise ValueError(
                f"{type(self.denoiser).__name__} has no text-to-image attention layer that xlard can capture"
            )
        self._available = available
        self._selected = [available[i] for i in _select_layers([(n, k) for n, k, _ in available], config.layers)]
        self._state = _CaptureState(config)
        self._originals: dict[str, Any] = {}
        self._hook = None
        self._block_processors: dict[str, Any] = {}
        self._put_back_all = False
        self._active = False
        params = list(inspect.signature(self.denoiser.forward).parameters)
        wanted = ("sample", "hidden_states", "timestep", "encoder_hidden_states", "img_ids")
        self._positions = {name: params.index(name) for name in wanted if name in params}
        self._run: dict[str, Any] = {"last_t": None, "step": -1, "call_in_step": 0, "num_steps": None, "cfg": None,
                                     "timesteps": None}

    # -- install / restore --------------------------------------------------

    @property
    def layers(self) -> tuple[str, ...]:
        """Names of the layers this capture records (relative to the denoiser)."""
        return tuple(name for name, _, _ in self._selected)

    def __enter__(self) -> AttentionCapture:
        if self._active:
            raise RuntimeError("this AttentionCapture is already active")
        self._block_processors = self._processors()  # what a refused PAG call's processors go back to
        self._put_back_all = False
        try:
            for name, kind, module in self._selected:
                original = module.processor
                expected = _EXPECTED_PROCESSOR[kind]
                if type(original).__name__ != expected:
                    raise ValueError(
                        f"layer {name!r} uses {type(original).__name__}; xlard captures {kind} layers only with "
                        f"diffusers' {expected}: install it (denoiser.set_attn_processor({expected}()), from "
                        f"{_PROCESSOR_HOME[expected]}; set_default_attn_processor() installs the classic "
                        "AttnProcessor, and attention slicing or xformers replace it too: "
                        "pipe.disable_attention_slicing(), pipe.disable_xformers_memory_efficient_attention()), "
                        "or leave the layer out through CaptureConfig.layers"
                    )
                self._originals[name] = (module, original)
                module.set_processor(_PROCESSOR_FOR_KIND[kind](self._state, name, original))
            self._hook = self.denoiser.register_forward_pre_hook(self._on_denoiser_call, with_kwargs=True)
        except BaseException:
            self._restore()
            raise
        self._active = True
        self._run["new_block"] = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._restore()
        return False

    def _restore(self) -> None:
        for module, original in self._originals.values():
            module.set_processor(original)
        self._originals.clear()
        if self._put_back_all and self._block_processors:
            self.denoiser.set_attn_processor(self._block_processors)
            self._put_back_all = False
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._state.call = None
        self._active = False

    # -- per denoiser call ----------------------------------------------------

    def _argument(self, name: str, args: tuple, kwargs: dict) -> Any:
        if name in kwargs:
            return kwargs[name]
        position = self._positions.get(name)
        if position is not None and position < len(args):
            return args[position]
        return None

    def _total_steps(self) -> int | None:
        if self.num_steps is not None:
            return self.num_steps
        pipe = self.pipeline
        if pipe is None:
            return None
        count = getattr(pipe, "_num_timesteps", None)
        scheduler = getattr(pipe, "scheduler", None)
        if not _is_int(count) and scheduler is not None and getattr(scheduler, "timesteps", None) is not None:
            count = len(scheduler.timesteps)
        if not _is_int(count) or count < 1:
            return None
        order = getattr(scheduler, "order", 1) if scheduler is not None else 1
        # Second-order samplers (Heun) evaluate twice per timestep; the steps counted here are timesteps.
        return -(-count // order) if _is_int(order) and order > 1 else count

    def _step_selected(self, step: int) -> bool:
        config = self.config
        total = self._run["num_steps"]
        if config.step_indices is not None:
            if any(i < 0 for i in config.step_indices) and total is None:
                raise ValueError(
                    "negative CaptureConfig.step_indices need the number of steps: pass a pipeline "
                    "or AttentionCapture(num_steps=...)"
                )
            self._check_step_count(step, total)
            return step in _resolve_step_indices(config.step_indices, total)
        start, end = config.steps
        if (start, end) == (0.0, 1.0):
            return True
        if total is None:
            raise ValueError(
                f"the step window {config.steps} needs the number of steps: pass a pipeline "
                "or AttentionCapture(num_steps=...), or use CaptureConfig.step_indices"
            )
        self._check_step_count(step, total)
        fraction = step / total
        return start <= fraction and (fraction < end or end == 1.0)

    def _check_step_count(self, step: int, total: int | None) -> None:
        """A step past the run's count: the steps were miscounted (a second-order scheduler whose second evaluation
        runs at another timestep, KDPM2: every evaluation looked like a new step), so a window or index would
        select the wrong evaluations without a word."""
        if total is not None and step >= total:
            scheduler = getattr(self.pipeline, "scheduler", None)
            raise ValueError(
                f"AttentionCapture counted step {step} in a run of {total} steps"
                + (f" ({type(scheduler).__name__} evaluates the denoiser at timesteps between its steps)"
                   if scheduler is not None else "")
                + ": a step window or step_indices cannot be honoured here; capture every step "
                "(CaptureConfig(steps=(0.0, 1.0))) or use a first-order scheduler")

    def _batched_cfg(self, sample: torch.Tensor) -> tuple[bool, bool]:
        """``(batched, detected)``: whether this run batches classifier-free guidance, and whether that was only
        detected from the latents (no ``cfg=``, no pipeline flag)."""
        if self.cfg is not None:
            return self.cfg, False
        pipe = self.pipeline
        if pipe is not None:
            try:
                flag = pipe.do_classifier_free_guidance
            except AttributeError:  # the property reads state that __call__ sets
                flag = None
            if isinstance(flag, bool):
                return flag, False
            if type(pipe).__name__.startswith("Flux"):  # FLUX never batches it ("true CFG" is a second call)
                return False, False
        batch = sample.shape[0]
        return batch % 2 == 0 and torch.equal(sample[: batch // 2], sample[batch // 2:]), True

    def _refuse_perturbed_guidance(self) -> None:
        """Perturbed-attention guidance (diffusers' *PAG* pipelines) batches a third, perturbed copy of the
        prompts' rows ([uncond; cond; perturbed]): the "conditional half" of that batch mixed a prompt's
        conditional row with the perturbed rows of others (3 maps for 2 prompts). Seen from the pipeline's flag or,
        for a denoiser target, from the PAG processors the pipeline installs for the call. The pipeline leaves
        those in after an error (its next call, PAG off, failed inside diffusers), so the processors of the whole
        denoiser are put back as they were when the block began."""
        pipe = self.pipeline
        try:
            pag = pipe is not None and getattr(pipe, "do_perturbed_attention_guidance", False) is True
        except AttributeError:  # the property reads state that __call__ sets
            pag = False
        installed = sorted({type(p).__name__ for p in self._processors().values()
                            if type(p).__name__.startswith("PAG")})
        if pag or installed:
            self._put_back_all = True
            who = type(pipe).__name__ if pipe is not None else f"the denoiser ({', '.join(installed)})"
            raise ValueError(f"AttentionCapture: {who} runs perturbed-attention guidance (pag_scale > 0), which "
                             "batches a perturbed copy of the prompts' rows beside the guidance halves; xlard "
                             "cannot tell those rows apart: pass pag_scale=0.0, or capture with the pipeline's "
                             "non-PAG counterpart")

    def _processors(self) -> dict[str, Any]:
        try:
            return dict(self.denoiser.attn_processors)
        except (AttributeError, RuntimeError):  # a denoiser without diffusers' processor registry
            return {}

    def _new_pipeline_call(self) -> bool:
        """A pipeline given: its scheduler's timesteps are set anew by every pipeline call, so a new tensor there
        starts a new run even when the timestep does not grow (a one-step run repeats the same timestep, and its
        second call was taken for a repeat within the first and dropped)."""
        scheduler = getattr(self.pipeline, "scheduler", None) if self.pipeline is not None else None
        timesteps = getattr(scheduler, "timesteps", None)
        if not isinstance(timesteps, torch.Tensor):
            return False
        new = self._run.get("timesteps") is not None and timesteps is not self._run["timesteps"]
        self._run["timesteps"] = timesteps
        return new

    def _on_denoiser_call(self, module, args, kwargs):
        run = self._run
        timestep = _scalar(self._argument("timestep", args, kwargs))
        last = run["last_t"]
        new_call = self._new_pipeline_call()
        # in a one-step run, the block's first call at the timestep the last block ended on is a new run, not a
        # repeat within the step (a one-step readout in a second block was dropped as the first's repeat); in longer
        # runs a repeated timestep in a new block is the step's next call (Heun, true CFG in one block per call)
        new_block = run.pop("new_block", False) and timestep is not None and timestep == last \
            and run.get("num_steps") == 1
        if last is None or new_call or new_block or (timestep is not None and timestep > last):
            run.update(step=0, call_in_step=0, num_steps=self._total_steps(), cfg=None)
        elif timestep == last:
            run["call_in_step"] += 1
        else:
            run["step"] += 1
            run["call_in_step"] = 0
        run["last_t"] = timestep
        step = run["step"]

        sample = self._argument("sample", args, kwargs)
        if sample is None:
            sample = self._argument("hidden_states", args, kwargs)
        if not isinstance(sample, torch.Tensor):
            raise RuntimeError(f"AttentionCapture cannot find the latent input of {type(module).__name__}")
        recording = self._step_selected(step) and (run["call_in_step"] == 0 or self.config.repeat_calls == "all")
        batch = sample.shape[0]
        rows = slice(0, batch)
        if run.get("cfg") is None:  # decided once per run, at its first call (it flipped mid-run, then crashed)
            self._refuse_perturbed_guidance()
            run["cfg"], run["cfg_detected"] = self._batched_cfg(sample)
            run["cfg_batch"] = batch
            if run["cfg"] and not run["cfg_detected"] and (
                    batch % 2 or not torch.equal(sample[: batch // 2], sample[batch // 2:])):
                # batched guidance repeats the latents: [x; x]. Rows of another layout were split in two "halves"
                # all the same (3 rows: rows 1-2; InstructPix2Pix's [cond; uncond; uncond]: unconditional rows)
                if self.cfg is None:
                    raise ValueError(
                        f"AttentionCapture: {type(self.pipeline).__name__}.do_classifier_free_guidance says this "
                        f"run batches guidance, but its first denoiser call's {batch} rows are not two equal halves "
                        "of latents (a pipeline that batches other rows, as InstructPix2Pix's [cond; uncond; "
                        "uncond]); xlard cannot tell its rows apart: run it without guidance (guidance_scale 1)")
                raise ValueError(
                    f"AttentionCapture: cfg=True (batched classifier-free guidance: the latents twice, unconditional "
                    f"rows first) but the first denoiser call's {batch} rows are not two equal halves of latents; "
                    "pass cfg=False if this run does not batch guidance")
        # A call of another batch size in a guided run (SD3's skip-layer guidance: the conditional half alone)
        # is not batched guidance: all its rows are the prompts'.
        batched = run["cfg"] and batch == run["cfg_batch"]
        if batched and run["cfg_detected"] and batch % 2 == 0 \
                and not torch.equal(sample[: batch // 2], sample[batch // 2:]):
            raise ValueError(
                "AttentionCapture took this run for batched classifier-free guidance (the two halves of its first "
                "latent batch were identical) but their latents now differ: two prompts began from the same "
                "noise; pass cfg=False (or cfg=True) to AttentionCapture")
        if recording:
            half = self.config.guidance_half
            if batched:
                if half == "cond":
                    rows = slice(batch // 2, batch)
                elif half == "uncond":
                    rows = slice(0, batch // 2)
            elif run["cfg"] and half in ("uncond", "all"):
                # a call of another batch size inside a guided run (SD3's skip-layer guidance: the prompts' rows
                # alone) holds no unconditional rows and not the guided batch's: it is left out of these maps
                recording = False
            elif half == "uncond":
                raise ValueError(
                    "CaptureConfig.guidance_half='uncond' but this denoiser call does not batch "
                    "classifier-free guidance (pass cfg=True if it does)"
                )
        base_hw = tuple(sample.shape[-2:]) if sample.ndim == 4 else None
        exact_grid = None
        img_ids = self._argument("img_ids", args, kwargs)
        if sample.ndim == 3 and isinstance(img_ids, torch.Tensor):
            ids = img_ids[0] if img_ids.ndim == 3 else img_ids
            exact_grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
        context = self._argument("encoder_hidden_states", args, kwargs)
        text_len = context.shape[1] if isinstance(context, torch.Tensor) and context.ndim == 3 else None
        self._state.call = _Call(step, recording, rows, base_hw, exact_grid, text_len)

    # -- results --------------------------------------------------------------

    def reset(self) -> None:
        """Forget every recorded map and the step counter (the layers stay installed)."""
        self._state = state = _CaptureState(self.config)
        for module, _ in self._originals.values():
            module.processor.state = state
        self._run.update(last_t=None, step=-1, call_in_step=0, num_steps=None, cfg=None, timesteps=None)

    @property
    def num_records(self) -> int:
        """How many (layer, denoiser call) maps went into the running means."""
        return sum(slot.count for slot in self._state.by_resolution.values())

    @property
    def recorded_steps(self) -> tuple[int, ...]:
        """The denoising step indices that contributed, sorted."""
        return tuple(sorted(self._state.recorded_steps))

    @property
    def resolutions(self) -> tuple[tuple[int, int], ...]:
        """The latent grids (h, w) that contributed, sorted."""
        return tuple(sorted(self._state.by_resolution))

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored running means (independent of the number of steps in float32; a float16 or
        bfloat16 mean doubles once it goes on in float32)."""
        slots = list(self._state.by_resolution.values()) + list(self._state.by_layer.values())
        return sum(slot.mean.numel() * slot.mean.element_size() for slot in slots)

    def _normalize(self, maps: torch.Tensor) -> torch.Tensor:
        mode = self.config.normalize
        if mode == "sum":
            return maps / maps.sum(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)
        if mode == "max":
            return maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)
        return maps

    def _check_recorded(self) -> None:
        if not self._state.by_resolution:
            raise RuntimeError(
                "no attention map was recorded: run the pipeline inside the `with` block, and check "
                f"CaptureConfig.layers / resolutions / steps (layers captured: {list(self.layers)})"
            )

    def maps(self) -> torch.Tensor:
        """The aggregated attention maps.

        Every resolution's running mean is resized to the output grid and the
        results are averaged, weighted by how many (layer, call) maps each
        holds, i.e. the mean over every recorded map; then ``normalize``.

        Returns:
            Tensor[B, T, H, W] float32 on the denoiser's device: B the kept
            batch (one CFG half), T the selected tokens in config order.

        Raises:
            RuntimeError: nothing was recorded.
        """
        self._check_recorded()
        slots = self._state.by_resolution
        size = self.config.output_size or max(slots, key=lambda hw: (hw[0] * hw[1], hw))
        total = sum(slot.count for slot in slots.values())
        out = None
        for slot in slots.values():
            part = self._resize(slot.mean.float(), size) * (slot.count / total)
            out = part if out is None else out + part
        return self._normalize(out)

    def layer_maps(self) -> dict[str, torch.Tensor]:
        """Per-layer running means at each layer's own grid (needs ``per_layer=True``).

        Returns:
            layer name -> Tensor[B, T, h, w] float32, normalized like :meth:`maps`.
        """
        if not self.config.per_layer:
            raise RuntimeError("per-layer maps were not kept: use CaptureConfig(per_layer=True)")
        self._check_recorded()
        return {name: self._normalize(slot.mean.float()) for name, slot in self._state.by_layer.items()}

    def _resize(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(maps.shape[-2:]) == tuple(size):
            return maps
        mode = self.config.resize_mode
        corners = False if mode in ("bilinear", "bicubic") else None
        return F.interpolate(maps, size=size, mode=mode, align_corners=corners)

    def __repr__(self) -> str:
        return f"AttentionCapture({type(self.denoiser).__name__}, {len(self._selected)} layers, {self.config})"
