"""Colormaps and overlays: color a normalized LAM and blend it over an image.

``"ember"`` is a colormap defined here (black to purple, red, orange, pale
yellow, lightness rising monotonically); :func:`overlay` lets the LAM value
scale the opacity, so places the corrector left alone keep their pixels.
"""
from __future__ import annotations

import numbers

import torch

from xlard.explain._validate import _as_image, _check_tensor, _err
from xlard.explain.lam import normalize_lam, upsample_lam

# "ember": our own perceptual ramp, sRGB anchors evenly spaced on [0, 1]. The
# relative luminance of the anchors rises monotonically (CIE L* about 0, 8, 20,
# 32, 45, 58, 72, 85, 97: near-even steps), so brighter always means "the
# corrector acted more", in grayscale print too. tests/test_explain.py pins it.
_EMBER_ANCHORS = (
    (0.00, 0.00, 0.02),
    (0.10, 0.04, 0.26),
    (0.30, 0.06, 0.42),
    (0.52, 0.13, 0.42),
    (0.74, 0.23, 0.32),
    (0.90, 0.38, 0.16),
    (0.98, 0.60, 0.05),
    (0.98, 0.82, 0.24),
    (0.99, 0.98, 0.66),
)
_GRAY_ANCHORS = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

#: Named colormaps: name -> sRGB anchors in [0, 1], evenly spaced.
COLORMAPS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "ember": _EMBER_ANCHORS,
    "gray": _GRAY_ANCHORS,
}

_TABLE_SIZE = 256
_MAX_TABLE_SIZE = 1 << 16


def colormap_table(colormap: str | torch.Tensor = "ember", size: int = _TABLE_SIZE) -> torch.Tensor:
    """A colormap as a lookup table of ``size`` sRGB colors.

    Args:
        colormap (str or Tensor[N, 3]): a name in :data:`COLORMAPS`, or N >= 2
            evenly spaced sRGB anchors in [0, 1].
        size (int): entries in the table, >= 2.

    Returns:
        Tensor[size, 3], float32, the anchors interpolated linearly.

    Raises:
        ValueError: unknown name, malformed anchors, or ``size`` outside [2, 65536].

    Example:
        >>> from xlard.explain import colormap_table
        >>> colormap_table("ember").shape
        torch.Size([256, 3])
        >>> colormap_table("ember")[-1]     # the brightest color
        tensor([0.9900, 0.9800, 0.6600])
    """
    fn = "colormap_table"
    if isinstance(colormap, str):
        if colormap not in COLORMAPS:
            raise ValueError(_err(fn, f"unknown colormap {colormap!r}; known: {', '.join(sorted(COLORMAPS))} "
                                      "(or pass a Tensor[N, 3] of sRGB anchors)"))
        anchors = torch.tensor(COLORMAPS[colormap], dtype=torch.float32)
    elif isinstance(colormap, torch.Tensor):
        anchors = colormap.detach().float().cpu()
        if anchors.dim() != 2 or anchors.shape[1] != 3 or anchors.shape[0] < 2:
            raise ValueError(_err(fn, f"a colormap tensor must be [N >= 2, 3], got {tuple(anchors.shape)}"))
        if not bool(torch.isfinite(anchors).all()) or bool((anchors < 0).any()) or bool((anchors > 1).any()):
            raise ValueError(_err(fn, "colormap anchors must be finite sRGB values in [0, 1]"))
    else:
        raise TypeError(_err(fn, f"colormap must be a name or a Tensor[N, 3], got {type(colormap).__name__}"))
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or not 2 <= size <= _MAX_TABLE_SIZE:
        # 10**9 entries allocated gigabytes for a lookup table (and seemed to hang)
        raise ValueError(_err(fn, f"size must be an int in [2, {_MAX_TABLE_SIZE}], got {size!r}"))
    pos = torch.linspace(0.0, anchors.shape[0] - 1, int(size))
    lo = pos.floor().long().clamp(max=anchors.shape[0] - 2)
    t = (pos - lo.float()).unsqueeze(1)
    return anchors[lo] * (1 - t) + anchors[lo + 1] * t


def apply_colormap(values: torch.Tensor, colormap: str | torch.Tensor = "ember") -> torch.Tensor:
    """Color a map of values in [0, 1].

    Args:
        values (Tensor[..., H, W]): floating dtype; clipped to [0, 1], NaN
            treated as 0.
        colormap: as in :func:`colormap_table`.

    Returns:
        Tensor[..., 3, H, W], float32 sRGB in [0, 1], on ``values``' device.

    Example:
        >>> import torch
        >>> from xlard.explain import apply_colormap, normalize_lam
        >>> lam = torch.rand(2, 16, 16)
        >>> apply_colormap(normalize_lam(lam[0])).shape      # [3, h, w]
        torch.Size([3, 16, 16])
    """
    _check_tensor("apply_colormap", "values", values, tuple(range(2, 9)))
    table = colormap_table(colormap).to(values.device)
    v = values.detach().float().nan_to_num(0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
    pos = v * (table.shape[0] - 1)
    lo = pos.floor().long().clamp(max=table.shape[0] - 2)
    t = (pos - lo.float()).unsqueeze(-1)
    rgb = table[lo] * (1 - t) + table[lo + 1] * t             # [..., H, W, 3]
    return rgb.movedim(-1, -3)


def overlay(
    image: torch.Tensor,
    lam: torch.Tensor,
    colormap: str | torch.Tensor = "ember",
    alpha: float = 0.6,
    normalize: bool = True,
    quantile: float = 1.0,
) -> torch.Tensor:
    """Blend a colored LAM over an image.

    The LAM is normalized per image (:func:`normalize_lam`), upsampled to the
    image grid (:func:`upsample_lam`) and colored; each pixel's opacity is
    ``alpha * value``, so where the corrector did nothing the image is
    untouched and where it acted most the color covers it at ``alpha``.

    Args:
        image (Tensor[3, H, W] or Tensor[B, 3, H, W]): float in [0, 1] or
            uint8; 1-channel images are shown as gray.
        lam (Tensor[h, w] or Tensor[B, h, w]): the LAM on the latent grid,
            one per image.
        colormap: a name in :data:`COLORMAPS` or a Tensor[N, 3] of anchors.
        alpha (float): opacity at the strongest cell, in [0, 1].
        normalize (bool): normalize ``lam`` per image; if False it must
            already be in [0, 1].
        quantile (float): passed to :func:`normalize_lam`.

    Returns:
        Tensor float32 in [0, 1], channels first: ``[3, H, W]`` or ``[B, 3, H, W]`` (a numpy HWC image
        comes back CHW, and a gray image with three channels: the colormap adds color).

    Raises:
        TypeError, ValueError: wrong types or shapes, mismatched batch sizes,
        ``alpha`` outside [0, 1], an image outside [0, 1], or (with
        ``normalize=False``) a LAM outside [0, 1].

    Example:
        >>> import os, tempfile, torch
        >>> from xlard.explain import overlay, save_png
        >>> image, lam = torch.rand(3, 128, 128), torch.rand(16, 16)   # an image and its 16x16 latent grid's LAM
        >>> overlay(image, lam).shape
        torch.Size([3, 128, 128])
        >>> save_png(os.path.join(tempfile.mkdtemp(), "overlay.png"), overlay(image, lam))
    """
    fn = "overlay"
    img = _as_image(fn, "image", image)
    _check_tensor(fn, "lam", lam, (2, 3))
    if img.dim() - lam.dim() != 1:
        raise ValueError(_err(fn, f"image {tuple(img.shape)} and lam {tuple(lam.shape)} must both be batched "
                                  "([B, 3, H, W] with [B, h, w]) or both unbatched ([3, H, W] with [h, w])"))
    if img.dim() == 4 and img.shape[0] != lam.shape[0]:
        raise ValueError(_err(fn, f"image batch {img.shape[0]} != lam batch {lam.shape[0]}"))
    if not isinstance(alpha, numbers.Real) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(_err(fn, f"alpha must be in [0, 1], got {alpha!r}"))
    if not isinstance(normalize, bool):  # 'no' is truthy
        raise ValueError(_err(fn, f"normalize must be a bool, got {normalize!r}"))
    (h, w), (height, width) = lam.shape[-2:], img.shape[-2:]
    if h * width != w * height:  # a transposed LAM was stretched over the image: its hot cell drawn elsewhere
        raise ValueError(_err(fn, f"lam {h}x{w} (rows x columns) does not have the image's shape {height}x{width} "
                                  "up to a scale; a transposed LAM? (lam.T)"))
    if not lam.is_meta and lam.numel():
        bad = ~torch.isfinite(lam.detach())
        if bool(bad.any()):  # normalize_lam maps them to 0: drawn as "no change", where the correction diverged
            raise ValueError(_err(fn, f"lam has {int(bad.sum())} NaN or infinite cell(s) of {lam.numel()}: a "
                                      "diverged correction, which would be drawn as no change"))
    if normalize:
        values = normalize_lam(lam, quantile)
    else:
        values = lam.detach().float()
        if bool(((values < 0) | (values > 1)).any()):
            raise ValueError(_err(fn, "with normalize=False, lam must be in [0, 1]"))
    values = upsample_lam(values.to(img.device), (img.shape[-2], img.shape[-1])).clamp(0.0, 1.0)
    color = apply_colormap(values, colormap)                  # [..., 3, H, W]
    weight = (float(alpha) * values).unsqueeze(-3)
    return img * (1 - weight) + color * weight
