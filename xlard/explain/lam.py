"""The Latent Activation Map: ``sum_c |Delta|``, its per-image normalization, upsampling and top cells.

Upsampling is bilinear with ``align_corners=False``: latent cell ``(i, j)`` of
an ``h x w`` grid is centred on the image block ``rows [i H/h, (i+1) H/h)``,
``cols [j W/w, (j+1) W/w)``.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from xlard import ops
from xlard.explain._validate import _check_tensor, _err


def latent_activation_map(delta: torch.Tensor) -> torch.Tensor:
    """The Latent Activation Map ``LAM = sum_c |Delta|``: where the corrector acted.

    Computed by :func:`xlard.ops.residual_correction` (any device it serves),
    so it is bit-for-bit the LAM the corrector's rollout reports.

    Args:
        delta (Tensor[B, C, h, w] or Tensor[C, h, w]): the corrector's output,
            a floating dtype.

    Returns:
        Tensor[B, h, w] (or [h, w] for unbatched input): float32 (float64 for
        float64 input), non-negative; NaN where ``delta`` has a NaN.
        Differentiable in ``delta``.

    Raises:
        TypeError: ``delta`` is not a floating-point tensor.
        ValueError: ``delta`` has neither 3 nor 4 dimensions.

    Example:
        >>> import torch
        >>> from xlard.explain import latent_activation_map
        >>> delta = torch.randn(2, 4, 16, 16)   # the corrector's output: corrector(z0, tokens, pooled)
        >>> lam = latent_activation_map(delta)   # [B, h, w]
        >>> lam.shape, torch.allclose(lam, delta.abs().sum(dim=1))
        (torch.Size([2, 16, 16]), True)
    """
    fn = "latent_activation_map"
    _check_tensor(fn, "delta", delta, (3, 4))
    unbatched = delta.dim() == 3
    d = delta.unsqueeze(0) if unbatched else delta
    # z0 = 0 and alpha = 0: only the op's LAM output is wanted, and it depends on delta alone.
    _, lam = ops.residual_correction(torch.zeros_like(d), d, 0.0)
    return lam[0] if unbatched else lam


def normalize_lam(lam: torch.Tensor, quantile: float = 1.0) -> torch.Tensor:
    """Scale each image's LAM to [0, 1] by its own maximum (or a high quantile).

    A LAM is a magnitude, so 0 stays 0 ("the corrector did nothing here") and
    the scale is the per-image maximum: a uniform map becomes all ones, not
    all zeros. Non-finite cells (NaN, inf) are ignored when finding the scale
    and come out as 0. An all-zero (or all non-finite) image comes out all 0.

    Args:
        lam (Tensor[h, w] or Tensor[B, h, w]): non-negative, floating dtype.
        quantile (float): in (0, 1]; the scale is this quantile of the image's
            finite cells, values above it clip to 1. Below 1 it keeps one
            outlier cell from washing out the rest of the map.

    Returns:
        Tensor of ``lam``'s shape, float32, values in [0, 1]. Not differentiable
        (a display transform).

    Raises:
        TypeError: ``lam`` is not a floating-point tensor.
        ValueError: wrong rank, ``quantile`` outside (0, 1], or a finite
            negative cell (a signed map is not a LAM; pass ``x.abs()``).

    Example:
        >>> import torch
        >>> from xlard.explain import normalize_lam
        >>> normalize_lam(torch.tensor([[0.0, 1.0], [2.0, 4.0]]))
        tensor([[0.0000, 0.2500],
                [0.5000, 1.0000]])
        >>> shown = normalize_lam(torch.rand(2, 16, 16), quantile=0.99)   # the top 1% of cells clip to 1
    """
    fn = "normalize_lam"
    _check_tensor(fn, "lam", lam, (2, 3))
    if isinstance(quantile, bool) or not isinstance(quantile, numbers.Real) or not 0.0 < float(quantile) <= 1.0:
        raise ValueError(_err(fn, f"quantile must be a number in (0, 1], got {quantile!r}"))
    # The scale is found in float64 for a float64 map (1e300 or 1e-160 cells would overflow or vanish in
    # float32); the result, in [0, 1], is float32 either way.
    x = lam.detach().to(torch.float64 if lam.dtype == torch.float64 else torch.float32)
    finite = torch.isfinite(x)
    if bool((x[finite] < 0).any()):
        raise ValueError(_err(fn, f"lam must be non-negative (sum_c |delta|), got min {x[finite].min().item():.4g}; "
                                  "pass a magnitude such as x.abs()"))
    x = torch.where(finite, x, torch.zeros_like(x))
    if x.numel() == 0:
        return x.float()
    flat = x.reshape(-1, x.shape[-2] * x.shape[-1])
    if float(quantile) == 1.0:
        scale = flat.amax(dim=1, keepdim=True)
    else:
        scale = _nan_quantile_rows(torch.where(finite.reshape(flat.shape), flat, torch.full_like(flat, float("nan"))),
                                   float(quantile)).nan_to_num(0.0)
    # A sparse map (fewer active cells than 1 - quantile) has a quantile of 0: its maximum scales it instead (it
    # came out all zero, the corrector's activity erased)
    scale = torch.where(scale > 0, scale, flat.amax(dim=1, keepdim=True))
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    out = torch.where(scale > 0, (flat / safe).clamp(0.0, 1.0), torch.zeros_like(flat))
    return out.reshape(x.shape).float()


def _nan_quantile_rows(rows: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.nanquantile(rows, q, dim=1, keepdim=True)`` (linear interpolation; NaN for an all-NaN row) for any
    row length: the library function refuses inputs of more than 2**24 elements, a 4100 x 4100 map."""
    if rows.numel() <= 2 ** 24:
        return torch.nanquantile(rows, q, dim=1, keepdim=True)
    valid = (~rows.isnan()).sum(1, keepdim=True)                        # finite cells per row
    ordered = rows.nan_to_num(float("inf")).sort(dim=1).values          # NaN last
    pos = q * (valid - 1).clamp(min=0).to(rows.dtype)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=(valid - 1).clamp(min=0))
    below, above = ordered.gather(1, lo), ordered.gather(1, hi)
    out = below + (above - below) * (pos - lo.to(rows.dtype))
    return torch.where(valid > 0, out, torch.full_like(out, float("nan")))


def upsample_lam(lam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample a LAM from the latent grid to the image grid.

    Bilinear with ``align_corners=False``: latent cell ``(i, j)`` is centred on
    the image block it covers (rows ``[i H/h, (i+1) H/h)``), which is how a VAE
    latent cell relates to its pixels. ``align_corners=True`` would shift
    every cell towards the image's centre. Onto fewer pixels than cells (a
    thumbnail), each pixel shows the strongest cell it covers, so that no
    active cell disappears.

    Args:
        lam (Tensor[h, w] or Tensor[B, h, w]): floating dtype, finite (pass a map through
            :func:`normalize_lam` first, which turns NaN and infinite cells into 0).
        size ((int, int)): the image's (H, W).

    Returns:
        Tensor[H, W] or Tensor[B, H, W], float32 (float64 for float64 input).

    Raises:
        TypeError, ValueError: wrong types, rank, a non-positive size, or a NaN or infinite cell (it was
        smeared over its neighbours' pixels without a word).

    Example:
        >>> import torch
        >>> from xlard.explain import upsample_lam
        >>> upsample_lam(torch.rand(2, 64, 64), (512, 512)).shape
        torch.Size([2, 512, 512])
    """
    fn = "upsample_lam"
    _check_tensor(fn, "lam", lam, (2, 3))
    if (not isinstance(size, Sequence) or len(size) != 2
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in size)):
        # (True, 10) gave a one-row image
        raise ValueError(_err(fn, f"size must be two positive ints (H, W), got {size!r}"))
    if lam.shape[-1] == 0 or lam.shape[-2] == 0:
        raise ValueError(_err(fn, f"lam has an empty spatial grid {tuple(lam.shape)}"))
    if not lam.is_meta:
        bad = ~torch.isfinite(lam.detach())
        if bool(bad.any()):
            raise ValueError(_err(fn, f"lam has {int(bad.sum())} NaN or infinite cell(s) of {lam.numel()}; "
                                      "bilinear upsampling would spread them over their neighbours' pixels "
                                      "(normalize_lam(lam) maps them to 0)"))
    x = lam.detach().to(torch.float64 if lam.dtype == torch.float64 else torch.float32)  # 1e300 stays finite
    x4 = x.reshape(-1, 1, x.shape[-2], x.shape[-1])
    # Onto fewer pixels than cells, bilinear sampling read every third cell of a 48 x 48 map on 16 x 16 pixels: a
    # hot cell between the sampled ones vanished. Each pixel shows the strongest cell under it instead (averaged
    # where one side grows and the other shrinks).
    out_h, out_w = int(size[0]), int(size[1])
    if out_h <= x.shape[-2] and out_w <= x.shape[-1] and (out_h, out_w) != tuple(x.shape[-2:]):
        out = F.adaptive_max_pool2d(x4, (out_h, out_w))
    else:
        out = F.interpolate(x4, size=(out_h, out_w), mode="bilinear", align_corners=False,
                            antialias=out_h < x.shape[-2] or out_w < x.shape[-1])
    return out.reshape(*x.shape[:-2], int(size[0]), int(size[1]))


def top_lam_mask(lam: torch.Tensor, fraction: float) -> torch.Tensor:
    """The top ``fraction`` of each image's LAM cells.

    Args:
        lam (Tensor[B, h, w]): finite, non-negative LAM values.
        fraction (float): in [0, 1]; ``ceil(fraction * h * w)`` cells per image
            are selected (0 selects none).

    Returns:
        Tensor[B, h, w] bool. Ties are broken by the row-major cell index
        (lowest first), so the mask is deterministic.

    Raises:
        TypeError: ``lam`` is not a floating-point tensor.
        ValueError: wrong rank, ``fraction`` outside [0, 1], a NaN or infinite
            cell, or a negative cell (a signed map is not a LAM; pass ``x.abs()``).

    Example:
        >>> import torch
        >>> from xlard.explain import top_lam_mask
        >>> top_lam_mask(torch.tensor([[[0.0, 1.0], [2.0, 4.0]]]), 0.5)
        tensor([[[False, False],
                 [ True,  True]]])
        >>> top_lam_mask(torch.rand(2, 16, 16), 0.1).sum(dim=(1, 2))   # ceil(0.1 * 256) cells each
        tensor([26, 26])
    """
    fn = "top_lam_mask"
    _check_tensor(fn, "lam", lam, (3,))
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(_err(fn, f"fraction must be a number in [0, 1], got {fraction!r}"))
    if lam.is_meta or not bool(torch.isfinite(lam.detach()).all()):
        raise ValueError(_err(fn, "lam must be finite (a NaN cell would rank first)"
                              + (", got a meta tensor" if lam.is_meta else "")))
    # a signed map ranked its most negative cells last, where normalize_lam refused it: refused alike
    if lam.numel() and bool((lam.detach() < 0).any()):
        raise ValueError(_err(fn, f"lam must be non-negative (sum_c |delta|), got min {lam.detach().min().item():.4g}; "
                                  "pass a magnitude such as x.abs()"))
    b, h, w = lam.shape
    # ceil(fraction * h * w); the 1e-9 keeps 0.2 * 25 = 5.000000000000001 at 5, and any fraction > 0 selects a cell
    k = min(h * w, max(math.ceil(float(fraction) * h * w - 1e-9), 1 if float(fraction) > 0 else 0))
    flat = lam.detach().reshape(b, h * w)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask.reshape(b, h, w)
