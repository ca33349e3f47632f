"""Explanations: the Latent Activation Map, overlays, PNGs, faithfulness and HTML reports (method.md section 7).

- **LAM.** :func:`latent_activation_map` is ``sum_c |Delta|`` over the
  corrector's output (through :func:`xlard.ops.residual_correction`, the same
  number the trainer logs); :func:`normalize_lam` scales it per image to [0, 1].
- **Overlays.** :func:`upsample_lam` maps the latent grid onto the image grid
  (bilinear, ``align_corners=False``: latent cell ``(i, j)`` of an ``h x w``
  grid is centred on the image block ``rows [i H/h, (i+1) H/h)``, ``cols
  [j W/w, (j+1) W/w)``); :func:`apply_colormap` with a colormap defined here
  (``"ember"``: black to purple, red, orange, pale yellow, lightness rising
  monotonically) and :func:`overlay` blends it over the image, the LAM value
  scaling the opacity so that places the corrector left alone keep their pixels.
- **Files.** :func:`save_png` / :func:`read_png` (Pillow) and
  :func:`write_html_report`, one self-contained HTML file for a batch (images
  inline as base64 PNG data URIs, inline CSS, no script, no external asset).
  Files are written atomically (a temporary file in the same folder, then
  ``os.replace``): a reader never sees half a file.
- **Faithfulness** (:func:`faithfulness`): zero Delta at the top LAM cells and
  measure how much of the reward gain is lost; backbone-agnostic (it takes a
  callable from latents to rewards), with a random-mask control of the same size.

The report takes plain data (:class:`ReportItem`: prompt, images, LAM, aspect
scores, explanation sentences), so any reward implementation can feed it;
:func:`report_items` builds items from an :class:`xlard.rewards.RewardResult`.
Explanation objects are rendered through their ``text()`` method, a ``text``
or ``sentence`` attribute, or ``str()``.

Example:
    >>> zc, delta, log_prob, lam = corrector.sample(z0, tokens, pooled)
    >>> save_png("overlay.png", overlay(images_after[0], lam[0]))
    >>> items = report_items(prompts, rewards_after, before=images_before,
    ...                      after=images_after, lam=lam, rewards_before=rewards_before)
    >>> write_html_report("report.html", items, title="xLARD on my prompts")
"""
from __future__ import annotations

import base64
import html
import io
import math
import numbers
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from xlard import ops
from xlard.vocab import ASPECTS

__all__ = [
    "ASPECT_NAMES",
    "COLORMAPS",
    "latent_activation_map",
    "normalize_lam",
    "upsample_lam",
    "apply_colormap",
    "colormap_table",
    "overlay",
    "save_png",
    "read_png",
    "png_bytes",
    "FaithfulnessResult",
    "faithfulness",
    "top_lam_mask",
    "ReportItem",
    "report_items",
    "render_html_report",
    "write_html_report",
]

#: The reward aspects, in :data:`xlard.vocab.ASPECTS` order.
ASPECT_NAMES = ASPECTS

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
_PIXEL_TOLERANCE = 1e-3  # decoded images may overshoot [0, 1] by rounding; clamp within this


def _err(fn: str, message: str) -> str:
    return f"xlard.explain.{fn}: {message}"


def _check_tensor(fn: str, name: str, value, dims: tuple[int, ...], floating: bool = True) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(_err(fn, f"{name} must be a torch.Tensor, got {type(value).__name__}"))
    if value.dim() not in dims:
        want = " or ".join(str(d) for d in dims)
        raise ValueError(_err(fn, f"{name} must have {want} dimensions, got shape {tuple(value.shape)}"))
    if floating and not value.is_floating_point():
        raise TypeError(_err(fn, f"{name} must be a floating-point tensor, got {value.dtype}"))


# ---------------------------------------------------------------------------
# The Latent Activation Map
# ---------------------------------------------------------------------------


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
        >>> lam = latent_activation_map(corrector(z0, tokens, pooled))   # [B, h, w]
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
        >>> shown = normalize_lam(lam, quantile=0.99)
    """
    fn = "normalize_lam"
    _check_tensor(fn, "lam", lam, (2, 3))
    if not isinstance(quantile, numbers.Real) or not 0.0 < float(quantile) <= 1.0:
        raise ValueError(_err(fn, f"quantile must be in (0, 1], got {quantile!r}"))
    x = lam.detach().float()
    finite = torch.isfinite(x)
    if bool((x[finite] < 0).any()):
        raise ValueError(_err(fn, f"lam must be non-negative (sum_c |delta|), got min {x[finite].min().item():.4g}; "
                                  "pass a magnitude such as x.abs()"))
    x = torch.where(finite, x, torch.zeros_like(x))
    if x.numel() == 0:
        return x
    flat = x.reshape(-1, x.shape[-2] * x.shape[-1])
    if float(quantile) == 1.0:
        scale = flat.amax(dim=1, keepdim=True)
    else:
        # Non-finite cells are background: push them below every finite cell with NaN-aware quantiles.
        ranked = torch.where(finite.reshape(flat.shape), flat, torch.full_like(flat, float("nan")))
        scale = torch.nanquantile(ranked, float(quantile), dim=1, keepdim=True).nan_to_num(0.0)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    out = torch.where(scale > 0, (flat / safe).clamp(0.0, 1.0), torch.zeros_like(flat))
    return out.reshape(x.shape)


def upsample_lam(lam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample a LAM from the latent grid to the image grid.

    Bilinear with ``align_corners=False``: latent cell ``(i, j)`` is centred on
    the image block it covers (rows ``[i H/h, (i+1) H/h)``), which is how a VAE
    latent cell relates to its pixels. ``align_corners=True`` would shift
    every cell towards the image's centre.

    Args:
        lam (Tensor[h, w] or Tensor[B, h, w]): floating dtype.
        size ((int, int)): the image's (H, W).

    Returns:
        Tensor[H, W] or Tensor[B, H, W], float32.

    Raises:
        TypeError, ValueError: wrong types, rank, or a non-positive size.

    Example:
        >>> upsample_lam(lam, (512, 512))
    """
    fn = "upsample_lam"
    _check_tensor(fn, "lam", lam, (2, 3))
    if (not isinstance(size, Sequence) or len(size) != 2
            or not all(isinstance(s, numbers.Integral) and s > 0 for s in size)):
        raise ValueError(_err(fn, f"size must be two positive ints (H, W), got {size!r}"))
    if lam.shape[-1] == 0 or lam.shape[-2] == 0:
        raise ValueError(_err(fn, f"lam has an empty spatial grid {tuple(lam.shape)}"))
    x = lam.detach().float()
    x4 = x.reshape(-1, 1, x.shape[-2], x.shape[-1])
    out = F.interpolate(x4, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)
    return out.reshape(*x.shape[:-2], int(size[0]), int(size[1]))


# ---------------------------------------------------------------------------
# Colormaps and overlays
# ---------------------------------------------------------------------------


def colormap_table(colormap: str | torch.Tensor = "ember", size: int = _TABLE_SIZE) -> torch.Tensor:
    """A colormap as a lookup table of ``size`` sRGB colors.

    Args:
        colormap (str or Tensor[N, 3]): a name in :data:`COLORMAPS`, or N >= 2
            evenly spaced sRGB anchors in [0, 1].
        size (int): entries in the table, >= 2.

    Returns:
        Tensor[size, 3], float32, the anchors interpolated linearly.

    Raises:
        ValueError: unknown name, malformed anchors, or ``size`` < 2.

    Example:
        >>> colormap_table("ember")[-1]     # the brightest color
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
    if not isinstance(size, numbers.Integral) or size < 2:
        raise ValueError(_err(fn, f"size must be an int >= 2, got {size!r}"))
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
        >>> apply_colormap(normalize_lam(lam[0]))      # [3, h, w]
    """
    _check_tensor("apply_colormap", "values", values, tuple(range(2, 9)))
    table = colormap_table(colormap).to(values.device)
    v = values.detach().float().nan_to_num(0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)
    pos = v * (table.shape[0] - 1)
    lo = pos.floor().long().clamp(max=table.shape[0] - 2)
    t = (pos - lo.float()).unsqueeze(-1)
    rgb = table[lo] * (1 - t) + table[lo + 1] * t             # [..., H, W, 3]
    return rgb.movedim(-1, -3)


def _as_image(fn: str, name: str, image, batched_ok: bool = True) -> torch.Tensor:
    """An image as float32 CHW (or BCHW) in [0, 1]: float in [0, 1], or uint8 in [0, 255]."""
    if not isinstance(image, torch.Tensor):
        import numpy as np

        if isinstance(image, np.ndarray):
            arr = image
            # numpy images conventionally are HWC; move channels first.
            if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4) and arr.shape[0] not in (1, 3):
                arr = arr.transpose(2, 0, 1)
            elif arr.ndim == 2:
                arr = arr[None]
            image = torch.from_numpy(arr.copy())
        else:
            raise TypeError(_err(fn, f"{name} must be a torch.Tensor [3, H, W] (or a numpy array), "
                                     f"got {type(image).__name__}"))
    dims = (3, 4) if batched_ok else (3,)
    if image.dim() not in dims:
        raise ValueError(_err(fn, f"{name} must be [3, H, W]{' or [B, 3, H, W]' if batched_ok else ''}, "
                                  f"got shape {tuple(image.shape)}"))
    if image.shape[-3] not in (1, 3, 4):
        raise ValueError(_err(fn, f"{name} must have 1, 3 or 4 channels (dim -3), got shape {tuple(image.shape)}"))
    if image.shape[-3] == 4:  # RGBA: drop alpha
        image = image[..., :3, :, :]
    if image.shape[-3] == 1:
        image = image.expand(*image.shape[:-3], 3, *image.shape[-2:])
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    if not image.is_floating_point():
        raise TypeError(_err(fn, f"{name} must be float in [0, 1] or uint8, got {image.dtype}"))
    x = image.detach().float()
    if x.numel():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(_err(fn, f"{name} has non-finite pixels"))
        lo, hi = x.min().item(), x.max().item()
        if lo < -_PIXEL_TOLERANCE or hi > 1 + _PIXEL_TOLERANCE:
            raise ValueError(_err(fn, f"{name} must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                                      "map a [-1, 1] decoder output with (x + 1) / 2 and clamp(0, 1)"))
    return x.clamp(0.0, 1.0)


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
        Tensor shaped like ``image``, float32 in [0, 1].

    Raises:
        TypeError, ValueError: wrong types or shapes, mismatched batch sizes,
        ``alpha`` outside [0, 1], an image outside [0, 1], or (with
        ``normalize=False``) a LAM outside [0, 1].

    Example:
        >>> save_png("overlay.png", overlay(image, lam))
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
    if normalize:
        values = normalize_lam(lam, quantile)
    else:
        values = lam.detach().float()
        if bool(((values < 0) | (values > 1)).any()):
            raise ValueError(_err(fn, "with normalize=False, lam must be in [0, 1]"))
        values = values.nan_to_num(0.0)
    values = upsample_lam(values.to(img.device), (img.shape[-2], img.shape[-1])).clamp(0.0, 1.0)
    color = apply_colormap(values, colormap)                  # [..., 3, H, W]
    weight = (float(alpha) * values).unsqueeze(-3)
    return img * (1 - weight) + color * weight


# ---------------------------------------------------------------------------
# PNG files
# ---------------------------------------------------------------------------


def _pillow(fn: str):
    try:
        from PIL import Image
    except ImportError as exc:  # degrade loudly: name what is missing and the fix
        raise ImportError(_err(fn, "writing and reading PNGs needs Pillow; install it with "
                                   "`pip install pillow`")) from exc
    return Image


def _to_uint8_hwc(fn: str, image) -> Any:
    x = _as_image(fn, "image", image, batched_ok=False)
    return (x * 255.0).round().to(torch.uint8).permute(1, 2, 0).contiguous().cpu().numpy()


def png_bytes(image) -> bytes:
    """Encode an image as PNG bytes.

    Args:
        image (Tensor[3, H, W] or Tensor[1, H, W]): float in [0, 1] (rounded to
            8 bits) or uint8; a numpy HWC array is accepted too.

    Returns:
        bytes: an 8-bit RGB PNG.

    Raises:
        ImportError: Pillow is not installed.
        TypeError, ValueError: not an image in [0, 1] / uint8.

    Example:
        >>> data = png_bytes(overlay(image, lam))
    """
    image_cls = _pillow("png_bytes")
    arr = _to_uint8_hwc("png_bytes", image)
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(_err("png_bytes", f"image is empty, shape {arr.shape[:2]}"))
    buf = io.BytesIO()
    image_cls.fromarray(arr, mode="RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _atomic_write(path: str | os.PathLike, data: bytes) -> None:
    target = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(target), dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_png(path: str | os.PathLike, image) -> None:
    """Write an image to a PNG file, atomically (temporary file, then rename).

    Args:
        path: the file to write; its folder is created if needed.
        image (Tensor[3, H, W]): float in [0, 1] or uint8 (see :func:`png_bytes`).

    Raises:
        ImportError: Pillow is not installed.
        TypeError, ValueError: not an image.

    Example:
        >>> save_png("out/lam_0.png", overlay(images[0], lam[0]))
    """
    _atomic_write(path, png_bytes(image))


def read_png(path: str | os.PathLike) -> torch.Tensor:
    """Read a PNG (or any Pillow-readable image) as Tensor[3, H, W] uint8.

    Example:
        >>> read_png("out/lam_0.png").shape
    """
    image_cls = _pillow("read_png")
    import numpy as np

    with image_cls.open(os.fspath(path)) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------
# Faithfulness
# ---------------------------------------------------------------------------


def top_lam_mask(lam: torch.Tensor, fraction: float) -> torch.Tensor:
    """The top ``fraction`` of each image's LAM cells.

    Args:
        lam (Tensor[B, h, w]): finite LAM values.
        fraction (float): in [0, 1]; ``ceil(fraction * h * w)`` cells per image
            are selected (0 selects none).

    Returns:
        Tensor[B, h, w] bool. Ties are broken by the row-major cell index
        (lowest first), so the mask is deterministic.

    Example:
        >>> mask = top_lam_mask(lam, 0.1)
    """
    fn = "top_lam_mask"
    _check_tensor(fn, "lam", lam, (3,))
    if not isinstance(fraction, numbers.Real) or not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(_err(fn, f"fraction must be in [0, 1], got {fraction!r}"))
    b, h, w = lam.shape
    k = min(h * w, math.ceil(float(fraction) * h * w - 1e-9))
    flat = lam.detach().reshape(b, h * w)
    order = torch.argsort(flat, dim=1, descending=True, stable=True)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask.reshape(b, h, w)


@dataclass
class FaithfulnessResult:
    """What masking the top LAM cells did to the reward (all Tensor[B], float32).

    Attributes:
        reward_before: reward of the uncorrected latent ``z0``.
        reward_after: reward of ``z0 + alpha * delta``.
        reward_masked: reward with ``delta`` zeroed at the top LAM cells.
        reward_random: reward with ``delta`` zeroed at as many random cells
            (the control), or None if not requested.
        gain: ``reward_after - reward_before``.
        gain_lost: fraction of the gain lost by masking,
            ``(reward_after - reward_masked) / gain``; NaN where ``|gain|`` is
            below ``min_gain``.
        gain_lost_random: the same for the random control, or None.
        relative_drop: ``(reward_after - reward_masked) / |reward_after|``, the
            paper's "CLIPScore -6.3%" figure; NaN where ``reward_after`` is 0.
        mask (Tensor[B, h, w] bool): the masked cells.
        fraction: the masked fraction asked for.
    """

    reward_before: torch.Tensor
    reward_after: torch.Tensor
    reward_masked: torch.Tensor
    reward_random: torch.Tensor | None
    gain: torch.Tensor
    gain_lost: torch.Tensor
    gain_lost_random: torch.Tensor | None
    relative_drop: torch.Tensor
    mask: torch.Tensor
    fraction: float

    def summary(self) -> str:
        """One line: mean gain, share of it lost by masking, and the random control."""
        def mean(x):
            x = x[torch.isfinite(x)]
            return float("nan") if x.numel() == 0 else x.mean().item()
        line = (f"top {self.fraction:.0%} LAM cells masked: reward {mean(self.reward_after):.4f} -> "
                f"{mean(self.reward_masked):.4f} ({-mean(self.relative_drop):+.1%}), "
                f"gain {mean(self.gain):+.4f}, {mean(self.gain_lost):.0%} of it lost")
        if self.gain_lost_random is not None:
            line += f" (random cells: {mean(self.gain_lost_random):.0%})"
        return line


def _reward_vector(fn: str, reward_fn, z: torch.Tensor, what: str) -> torch.Tensor:
    r = reward_fn(z)
    if not isinstance(r, torch.Tensor):
        raise TypeError(_err(fn, f"reward_fn must return a Tensor[B], got {type(r).__name__} for the {what} latent"))
    r = r.detach().float().reshape(-1) if r.dim() <= 1 else r
    if r.dim() != 1 or r.shape[0] != z.shape[0]:
        raise ValueError(_err(fn, f"reward_fn must return a Tensor[B] with B = {z.shape[0]}, got shape "
                                  f"{tuple(r.shape)} for the {what} latent"))
    return r


def faithfulness(
    reward_fn: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    delta: torch.Tensor,
    alpha: float | torch.Tensor = 1.0,
    fraction: float = 0.1,
    random_control: bool = True,
    generator: torch.Generator | None = None,
    min_gain: float = 1e-6,
) -> FaithfulnessResult:
    """The LAM masking check (method.md section 7): does the reward gain live where the LAM is high?

    Zeroes ``delta`` at the top ``fraction`` of each image's LAM cells (all
    channels), re-applies the correction and scores it. A faithful LAM loses
    most of the gain; the random control (as many cells, chosen uniformly)
    shows what an uninformative map would lose.

    ``reward_fn`` maps a corrected latent to one reward per item; it holds
    everything backbone-specific (continue sampling from the latent at the
    correction step, decode, score with the CMD or CLIPScore), so this check
    works for any backbone. It is called 3 times (4 with the control), each on
    the whole batch, under ``torch.no_grad()``.

    Args:
        reward_fn (Callable[[Tensor[B, C, h, w]], Tensor[B]]): the reward of a latent.
        z0 (Tensor[B, C, h, w]): the uncorrected latent.
        delta (Tensor[B, C, h, w]): the corrector's output, same dtype, finite.
        alpha (float or Tensor[B]): the correction step size.
        fraction (float): the share of LAM cells to mask, in [0, 1].
        random_control (bool): also mask as many random cells.
        generator (torch.Generator, optional): for the random control.
        min_gain (float): gains smaller than this in magnitude give NaN ratios.

    Returns:
        FaithfulnessResult.

    Raises:
        TypeError, ValueError: malformed latents, non-finite ``delta``, a
        ``fraction`` outside [0, 1], or a ``reward_fn`` that does not return
        a Tensor[B].

    Example:
        >>> res = faithfulness(lambda z: cmd_reward(backbone.finish(z)), z0, delta, fraction=0.1)
        >>> print(res.summary())
    """
    fn = "faithfulness"
    if not callable(reward_fn):
        raise TypeError(_err(fn, f"reward_fn must be callable, got {type(reward_fn).__name__}"))
    _check_tensor(fn, "z0", z0, (4,))
    _check_tensor(fn, "delta", delta, (4,))
    if z0.shape != delta.shape:
        raise ValueError(_err(fn, f"delta {tuple(delta.shape)} must have z0's shape {tuple(z0.shape)}"))
    if not isinstance(fraction, numbers.Real) or not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(_err(fn, f"fraction must be in [0, 1], got {fraction!r}"))
    if not bool(torch.isfinite(delta).all()):
        raise ValueError(_err(fn, "delta has non-finite values; the LAM ranking is undefined"))
    with torch.no_grad():
        zc, lam = ops.residual_correction(z0, delta, alpha)
        mask = top_lam_mask(lam, float(fraction))
        keep = (~mask).unsqueeze(1).to(delta.dtype)
        zm, _ = ops.residual_correction(z0, delta * keep, alpha)
        before = _reward_vector(fn, reward_fn, z0, "uncorrected")
        after = _reward_vector(fn, reward_fn, zc, "corrected")
        masked = _reward_vector(fn, reward_fn, zm, "masked")
        gain = after - before
        ok = gain.abs() >= min_gain
        nan = torch.full_like(gain, float("nan"))
        safe_gain = torch.where(ok, gain, torch.ones_like(gain))
        lost = torch.where(ok, (after - masked) / safe_gain, nan)
        rel_ok = after != 0
        relative = torch.where(rel_ok, (after - masked) / torch.where(rel_ok, after.abs(), torch.ones_like(after)), nan)
        random_reward = random_lost = None
        if random_control:
            b, h, w = lam.shape
            scores = torch.rand((b, h * w), generator=generator, device="cpu").to(lam.device)
            random_mask = top_lam_mask(scores.reshape(b, h, w), float(fraction))
            zr, _ = ops.residual_correction(z0, delta * (~random_mask).unsqueeze(1).to(delta.dtype), alpha)
            random_reward = _reward_vector(fn, reward_fn, zr, "randomly masked")
            random_lost = torch.where(ok, (after - random_reward) / safe_gain, nan)
    return FaithfulnessResult(before, after, masked, random_reward, gain, lost, random_lost, relative,
                              mask, float(fraction))


# ---------------------------------------------------------------------------
# HTML report
# ---------------------------------------------------------------------------


def _sentence(item) -> str:
    """A readable sentence from a string or an explanation object (text(), .text, .sentence, str())."""
    if isinstance(item, str):
        return item
    for attr in ("text", "sentence"):
        value = getattr(item, attr, None)
        if callable(value):
            try:
                value = value()
            except TypeError:
                continue
        if isinstance(value, str):
            return value
    return str(item)


def _score(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(_err("ReportItem", f"a score must be a scalar, got shape {tuple(value.shape)}"))
        value = value.item()
    value = float(value)
    return None if math.isnan(value) else value


@dataclass
class ReportItem:
    """One prompt's row in the HTML report: plain data only.

    Attributes:
        prompt: the prompt text (escaped when rendered).
        before, after (Tensor[3, H, W], optional): decoded images, float in
            [0, 1] or uint8, without / with the correction.
        lam (Tensor[h, w], optional): the LAM on the latent grid; drawn alone
            and over ``after`` (over ``before`` if there is no ``after``).
        scores: aspect -> reward after correction; None or NaN = the aspect is
            absent (not asked by the prompt).
        scores_before: aspect -> reward before correction, optional.
        explanations: aspect -> sentences; or a plain sequence of sentences
            (shown under "notes"). Sentences may be strings or explanation
            objects (rendered with ``text()``, ``.text``, ``.sentence`` or ``str()``).
        joint, joint_before: the joint reward after / before, optional.
        weights: aspect -> lambda of the joint reward, optional.
        label: a short tag shown next to the item number (seed, id, ...).
    """

    prompt: str
    before: Any = None
    after: Any = None
    lam: torch.Tensor | None = None
    scores: Mapping[str, Any] = field(default_factory=dict)
    scores_before: Mapping[str, Any] | None = None
    explanations: Mapping[str, Sequence[Any]] | Sequence[Any] = field(default_factory=dict)
    joint: Any = None
    joint_before: Any = None
    weights: Mapping[str, Any] | None = None
    label: str = ""


def report_items(
    prompts: Sequence[str],
    rewards: Any = None,
    before: Any = None,
    after: Any = None,
    lam: torch.Tensor | None = None,
    rewards_before: Any = None,
    labels: Sequence[str] | None = None,
) -> list[ReportItem]:
    """Build :class:`ReportItem` s from a batch and reward results.

    ``rewards`` is read by duck typing, so any object with these attributes
    works: ``scores`` (Tensor[B, 3], NaN where absent), optional ``present``
    (bool [B, 3]), ``joint`` (Tensor[B]), ``weights`` (Tensor[B, 3]) and
    ``explanations`` (per item an object with ``counts``, ``colors`` and
    ``relations`` sequences of explanation objects), as
    :class:`xlard.rewards.RewardResult` has.

    Args:
        prompts: B prompt strings.
        rewards: reward result after correction, optional.
        before, after (Tensor[B, 3, H, W] or sequences of Tensor[3, H, W]): images.
        lam (Tensor[B, h, w]): LAMs.
        rewards_before: reward result before correction, optional.
        labels: B short tags, optional.

    Returns:
        list[ReportItem], one per prompt.

    Example:
        >>> write_html_report("r.html", report_items(prompts, res, before=x0, after=xc, lam=lam))
    """
    fn = "report_items"
    n = len(prompts)

    def pick(seq, i, name):
        if seq is None:
            return None
        if len(seq) != n:
            raise ValueError(_err(fn, f"{name} has {len(seq)} items, expected {n} (one per prompt)"))
        return seq[i]

    def aspect_scores(result, i):
        if result is None or getattr(result, "scores", None) is None:
            return {}
        scores = result.scores
        present = getattr(result, "present", None)
        out = {}
        for k, aspect in enumerate(ASPECT_NAMES):
            value = float(scores[i, k])
            if present is not None and not bool(present[i, k]):
                value = float("nan")
            out[aspect] = value
        return out

    def sentences(result, i):
        exps = getattr(result, "explanations", None) if result is not None else None
        if exps is None:
            return {}
        e = exps[i]
        parts = {aspect: tuple(getattr(e, attr, ()) or ()) for aspect, attr in
                 (("count", "counts"), ("color", "colors"), ("position", "relations"))}
        if not any(parts.values()) and not any(hasattr(e, a) for a in ("counts", "colors", "relations")):
            return [e]  # an unknown explanation object: one sentence
        return parts

    def joint_of(result, i):
        joint = getattr(result, "joint", None) if result is not None else None
        return None if joint is None else float(joint[i])

    items = []
    for i, prompt in enumerate(prompts):
        weights = getattr(rewards, "weights", None) if rewards is not None else None
        items.append(ReportItem(
            prompt=str(prompt),
            before=pick(before, i, "before"),
            after=pick(after, i, "after"),
            lam=pick(lam, i, "lam"),
            scores=aspect_scores(rewards, i),
            scores_before=aspect_scores(rewards_before, i) if rewards_before is not None else None,
            explanations=sentences(rewards, i),
            joint=joint_of(rewards, i),
            joint_before=joint_of(rewards_before, i),
            weights=None if weights is None else {a: float(weights[i, k]) for k, a in enumerate(ASPECT_NAMES)},
            label=str(pick(labels, i, "labels")) if labels is not None else "",
        ))
    return items


_CSS = """
:root { --ink:#1d2230; --muted:#667085; --line:#e4e7ec; --card:#ffffff; --bg:#f4f5f8;
        --accent:#b8421d; --good:#1f8a5b; --bad:#c4372b; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
       font:15px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "DejaVu Sans", sans-serif; }
main { max-width:1180px; margin:0 auto; padding:28px 24px 48px; }
header.top h1 { font-size:24px; margin:0 0 4px; letter-spacing:-0.01em; }
header.top p { margin:0; color:var(--muted); }
.summary { display:flex; flex-wrap:wrap; gap:10px; margin:18px 0 6px; }
.stat { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:10px 14px; min-width:130px; }
.stat .k { font-size:12px; text-transform:uppercase; letter-spacing:.06em; color:var(--muted); }
.stat .v { font-size:20px; font-weight:600; font-variant-numeric:tabular-nums; }
.legend { display:flex; align-items:center; gap:10px; color:var(--muted); font-size:13px; margin:10px 0 20px; }
.legend .bar { width:220px; height:12px; border-radius:6px; border:1px solid var(--line); }
article.item { background:var(--card); border:1px solid var(--line); border-radius:14px;
               padding:18px 20px 20px; margin:0 0 22px; box-shadow:0 1px 2px rgba(16,24,40,.04); }
.item-head { display:flex; align-items:flex-start; gap:14px; margin-bottom:14px; }
.item-head .num { flex:none; font-weight:600; color:var(--muted); font-variant-numeric:tabular-nums; padding-top:2px; }
.item-head .prompt { flex:1; font-size:18px; font-weight:600; overflow-wrap:anywhere; }
.item-head .tag { display:inline-block; margin-left:8px; font-size:12px; font-weight:500; color:var(--muted);
                  background:var(--bg); border-radius:6px; padding:1px 7px; vertical-align:middle; }
.joint { flex:none; text-align:right; }
.joint .k { font-size:12px; text-transform:uppercase; letter-spacing:.06em; color:var(--muted); }
.joint .v { font-size:24px; font-weight:700; font-variant-numeric:tabular-nums; }
.delta { font-size:13px; font-weight:600; font-variant-numeric:tabular-nums; margin-left:6px; }
.delta.up { color:var(--good); } .delta.down { color:var(--bad); } .delta.flat { color:var(--muted); }
.figs { display:grid; grid-template-columns:repeat(4, minmax(0, 1fr)); gap:14px; margin-bottom:16px; }
@media (max-width: 760px) { .figs { grid-template-columns:repeat(2, minmax(0, 1fr)); } }
figure { margin:0; }
figure img { display:block; width:100%; height:auto; aspect-ratio:auto; border-radius:8px;
             border:1px solid var(--line); background:#fafafa; }
figure img.small { image-rendering:pixelated; }
figcaption { font-size:13px; color:var(--muted); margin-top:6px; }
figcaption b { color:var(--ink); font-weight:600; }
table.aspects { width:100%; border-collapse:collapse; }
table.aspects th { text-align:left; font-size:12px; text-transform:uppercase; letter-spacing:.06em;
                   color:var(--muted); font-weight:600; padding:6px 10px; border-bottom:1px solid var(--line); }
table.aspects td { padding:9px 10px; border-bottom:1px solid var(--line); vertical-align:top; }
table.aspects tr:last-child td { border-bottom:none; }
td.aspect { width:100px; font-weight:600; text-transform:capitalize; }
td.score { width:210px; font-variant-numeric:tabular-nums; white-space:nowrap; }
.meter { display:inline-block; width:90px; height:8px; background:#eef0f4; border-radius:4px;
         overflow:hidden; vertical-align:middle; margin-right:8px; }
.meter span { display:block; height:100%; background:var(--accent); border-radius:4px; }
td.why ul { margin:0; padding-left:18px; } td.why li { margin:1px 0; }
tr.absent td { color:var(--muted); } tr.absent td.aspect { font-weight:500; }
.weight { color:var(--muted); font-size:12px; margin-left:4px; }
.notes { margin:12px 0 0; padding-left:18px; color:var(--ink); }
.none { color:var(--muted); font-style:italic; }
footer { color:var(--muted); font-size:12px; margin-top:26px; }
"""


def _fmt(value: float | None) -> str:
    return "&ndash;" if value is None else f"{value:.3f}"


def _delta_html(after: float | None, before: float | None) -> str:
    if after is None or before is None:
        return ""
    d = after - before
    cls = "up" if d > 5e-4 else "down" if d < -5e-4 else "flat"
    return f'<span class="delta {cls}" title="change from before correction">{d:+.3f}</span>'


def _img_tag(image, alt: str) -> tuple[str, tuple[int, int]]:
    data = base64.b64encode(png_bytes(image)).decode("ascii")
    x = _as_image("write_html_report", alt, image, batched_ok=False)
    h, w = int(x.shape[-2]), int(x.shape[-1])
    small = ' class="small"' if max(h, w) <= 256 else ""
    return (f'<img{small} alt="{html.escape(alt)}" width="{w}" height="{h}" '
            f'src="data:image/png;base64,{data}">'), (h, w)


def _figure(image, caption: str, alt: str, show_size: bool = True) -> str:
    tag, (h, w) = _img_tag(image, alt)
    size = f" <span>{w}&times;{h}</span>" if show_size else ""
    return f"<figure>{tag}<figcaption>{caption}{size}</figcaption></figure>"


def _explanation_parts(explanations) -> tuple[dict[str, list[str]], list[str]]:
    if isinstance(explanations, Mapping):
        by_aspect = {str(k): [_sentence(s) for s in (v if isinstance(v, (list, tuple)) else [v])]
                     for k, v in explanations.items()}
        return by_aspect, []
    if isinstance(explanations, (str, bytes)):
        return {}, [_sentence(explanations)]
    return {}, [_sentence(s) for s in explanations]


def _item_html(index: int, item: ReportItem, colormap) -> str:
    if not isinstance(item, ReportItem):
        raise TypeError(_err("write_html_report", f"items must be ReportItem (or dicts of its fields), "
                                                  f"got {type(item).__name__} at index {index}"))
    esc = html.escape
    parts = ['<article class="item">']
    joint, joint_before = _score(item.joint), _score(item.joint_before)
    tag = f'<span class="tag">{esc(item.label)}</span>' if item.label else ""
    joint_html = ""
    if item.joint is not None or item.scores:
        joint_html = (f'<div class="joint"><div class="k">joint reward</div>'
                      f'<div class="v">{_fmt(joint)}{_delta_html(joint, joint_before)}</div></div>')
    parts.append(f'<div class="item-head"><div class="num">#{index + 1}</div>'
                 f'<div class="prompt">&ldquo;{esc(item.prompt)}&rdquo;{tag}</div>{joint_html}</div>')

    figs = []
    if item.before is not None:
        figs.append(_figure(item.before, "<b>Before</b> correction", "before correction"))
    if item.after is not None:
        figs.append(_figure(item.after, "<b>After</b> correction", "after correction"))
    if item.lam is not None:
        lam = item.lam
        _check_tensor("write_html_report", "lam", lam, (2,))
        base = item.after if item.after is not None else item.before
        finite = lam.detach().float()[torch.isfinite(lam.detach())]
        peak = finite.max().item() if finite.numel() else 0.0
        if base is not None:
            img = _as_image("write_html_report", "image", base, batched_ok=False)
            size = (img.shape[-2], img.shape[-1])
        else:
            scale = max(1, 256 // max(lam.shape))
            size = (lam.shape[0] * scale, lam.shape[1] * scale)
        heat = apply_colormap(upsample_lam(normalize_lam(lam), size), colormap)
        peak_text = f"max {peak:.3g}" if peak > 0 else "all zero: no correction"
        figs.append(_figure(heat, f"<b>LAM</b> {lam.shape[0]}&times;{lam.shape[1]} latent, {peak_text}",
                            "latent activation map", show_size=False))
        if base is not None:
            figs.append(_figure(overlay(base, lam, colormap), "<b>LAM over "
                                + ("after" if item.after is not None else "before") + "</b>", "LAM overlay"))
    if figs:
        parts.append('<div class="figs">' + "".join(figs) + "</div>")

    by_aspect, notes = _explanation_parts(item.explanations)
    aspects = list(ASPECT_NAMES) + [a for a in list(item.scores) + list(by_aspect) if a not in ASPECT_NAMES]
    aspects = list(dict.fromkeys(aspects))
    if item.scores or by_aspect:
        rows = []
        for aspect in aspects:
            if aspect not in item.scores and aspect not in by_aspect:
                continue
            score = _score(item.scores.get(aspect))
            before = _score(item.scores_before.get(aspect)) if item.scores_before else None
            sentences = by_aspect.get(aspect, [])
            weight = _score(item.weights.get(aspect)) if item.weights else None
            weight_html = f'<span class="weight">&lambda; {weight:.2f}</span>' if weight else ""
            if score is None:
                why = ("<ul>" + "".join(f"<li>{esc(s)}</li>" for s in sentences) + "</ul>") if sentences else \
                    '<span class="none">not asked by the prompt</span>'
                rows.append(f'<tr class="absent"><td class="aspect">{esc(aspect)}</td>'
                            f'<td class="score">absent</td><td class="why">{why}</td></tr>')
                continue
            width = max(0.0, min(1.0, score)) * 100
            why = ("<ul>" + "".join(f"<li>{esc(s)}</li>" for s in sentences) + "</ul>") if sentences else \
                '<span class="none">no explanation given</span>'
            rows.append(f'<tr><td class="aspect">{esc(aspect)}</td><td class="score">'
                        f'<span class="meter"><span style="width:{width:.1f}%"></span></span>{score:.3f}'
                        f'{_delta_html(score, before)}{weight_html}</td><td class="why">{why}</td></tr>')
        parts.append('<table class="aspects"><thead><tr><th>Aspect</th><th>Score</th><th>Why</th></tr></thead>'
                     "<tbody>" + "".join(rows) + "</tbody></table>")
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{esc(s)}</li>" for s in notes) + "</ul>")
    parts.append("</article>")
    return "".join(parts)


def _legend(colormap) -> str:
    table = colormap_table(colormap, 9)
    stops = ", ".join(f"rgb({int(round(r * 255))},{int(round(g * 255))},{int(round(b * 255))}) {i * 12.5:.1f}%"
                      for i, (r, g, b) in enumerate(table.tolist()))
    return (f'<div class="legend"><span>LAM = &Sigma;<sub>c</sub>|&Delta;| per latent cell, per image:</span>'
            f'<span>none</span><span class="bar" style="background:linear-gradient(90deg, {stops})"></span>'
            f"<span>most</span></div>")


def _summary(items: Sequence[ReportItem]) -> str:
    stats = [("prompts", str(len(items)))]
    for key in ("joint",) + ASPECT_NAMES:
        values = [_score(it.joint) if key == "joint" else _score(it.scores.get(key)) for it in items]
        values = [v for v in values if v is not None]
        if values:
            stats.append((f"mean {key}", f"{sum(values) / len(values):.3f}"))
    return '<div class="summary">' + "".join(
        f'<div class="stat"><div class="k">{html.escape(k)}</div><div class="v">{v}</div></div>'
        for k, v in stats) + "</div>"


def render_html_report(items: Sequence[ReportItem | Mapping[str, Any]], title: str = "xLARD report",
                       colormap: str | torch.Tensor = "ember") -> str:
    """The HTML text of a report (see :func:`write_html_report`)."""
    fn = "render_html_report"
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise TypeError(_err(fn, f"items must be a sequence of ReportItem, got {type(items).__name__}"))
    normal = []
    for i, it in enumerate(items):
        if isinstance(it, Mapping):
            try:
                it = ReportItem(**it)
            except TypeError as exc:
                raise TypeError(_err(fn, f"item {i}: {exc}")) from exc
        normal.append(it)
    esc_title = html.escape(str(title))
    body = "".join(_item_html(i, it, colormap) for i, it in enumerate(normal))
    if not normal:
        body = '<p class="none">No items.</p>'
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc_title}</title><style>{_CSS}</style></head><body><main>"
            f'<header class="top"><h1>{esc_title}</h1><p>Each prompt: the image before and after the '
            "latent correction, where the corrector acted (the Latent Activation Map), and each reward "
            "aspect with its score and explanation.</p></header>"
            f"{_summary(normal)}{_legend(colormap)}{body}"
            "<footer>Generated by xlard.explain. Scores in [0, 1]; an absent aspect is one the prompt "
            "does not ask for. LAM panels are normalized per image; the caption gives the raw maximum."
            "</footer></main></body></html>\n")


def write_html_report(path: str | os.PathLike, items: Sequence[ReportItem | Mapping[str, Any]],
                      title: str = "xLARD report", colormap: str | torch.Tensor = "ember") -> None:
    """Write a self-contained HTML report for a batch, atomically.

    One card per item: the prompt, the before / after images, the LAM alone
    and over the corrected image, each aspect's score (with the change from
    before, if given) and its explanation sentences, the joint reward. Images
    are inline base64 PNG data URIs and the CSS is inline: the file has no
    external reference and no script, so it can be mailed or archived as is.
    All text is HTML-escaped.

    Args:
        path: the ``.html`` file to write; its folder is created if needed.
        items: :class:`ReportItem` s, or dicts of their fields (see :func:`report_items`).
        title (str): the page title.
        colormap: for the LAM panels.

    Raises:
        ImportError: Pillow is not installed.
        TypeError, ValueError: malformed items (the message names the item).

    Example:
        >>> write_html_report("report.html", [ReportItem("two red apples", before=x0, after=xc,
        ...     lam=lam, scores={"count": 0.9, "color": 0.8}, explanations={"count": ["asked for 2 apples, found 2"]})])
    """
    _atomic_write(path, render_html_report(items, title, colormap).encode("utf-8"))
