"""Color feature encoders for the color reward: patch features and color embeddings.

The color reward (:mod:`xlard.rewards`) compares every image patch with every
color word of the prompt by cosine similarity (``xlard.ops.color_scores``).
An encoder supplies both sides in one shared space:

- ``encode_images(images) -> PatchFeatures``: ``features [B, N, D]`` for the
  ``N = gh * gw`` patches of a ``(gh, gw)`` grid, row-major (patch ``n`` sits
  at row ``n // gw``, column ``n % gw``), plus the grid;
- ``embed_colors(names) -> Tensor[C, D]``: one embedding per color name.

Two encoders are provided:

- :class:`PixelColorEncoder`, weight-free: each patch's mean color in CIELAB
  against named-color prototypes. A patch's feature is the soft assignment
  ``softmax(-deltaE / temperature)`` over a basis of prototypes; a color's
  embedding is the feature its own prototype would get, so a patch of exactly
  that color has similarity 1. Works on any decoded image.
- :class:`ClipColorEncoder`, a ``transformers`` CLIP model: the vision
  tower's patch tokens projected into the joint image-text space, and the text
  embeddings of a color prompt ("a photo of a red object"). Random tiny
  configs in tests, real weights through :meth:`ClipColorEncoder.from_pretrained`.

Images are accepted as a float tensor ``[B, 3, H, W]`` in [0, 1] (diffusers'
``output_type="pt"``), a uint8 tensor, a numpy array ``[B, H, W, 3]``
(``output_type="np"``) or a list of PIL images (``output_type="pil"``);
see :func:`as_image_batch`.

Example:
    >>> import torch, xlard.ops
    >>> from xlard.color_features import PixelColorEncoder
    >>> enc = PixelColorEncoder(grid=(8, 8))
    >>> img = torch.full((1, 3, 64, 64), 0.5); img[:, 0, 16:48, 16:48] = 0.85; img[:, 1:, 16:48, 16:48] = 0.1
    >>> pf = enc.encode_images(img)
    >>> scores, index = xlard.ops.color_scores(pf.features, enc.embed_colors(["red", "blue"]))
    >>> round(scores[0, 0].item(), 3), divmod(index[0, 0].item(), 8)   # red: a patch (row, column) in the square
    (1.0, (2, 2))
"""
from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from xlard._args import as_device, is_finite_real, model_location, short_reason
from xlard._images import rgb_array
from xlard._optional import require
from xlard.vocab import COLOR_ALIASES

__all__ = [
    "COLOR_PROTOTYPES",
    "COLOR_MODIFIERS",
    "PatchFeatures",
    "ColorFeatureEncoder",
    "PixelColorEncoder",
    "ClipColorEncoder",
    "as_image_batch",
    "srgb_to_linear",
    "linear_rgb_to_lab",
    "srgb_to_lab",
    "color_prototype_lab",
    "patch_positions",
]

# ---------------------------------------------------------------------------
# Named colors
# ---------------------------------------------------------------------------

#: sRGB (0-255) prototypes of named colors: GenEval's ten first, then the other
#: single-word colors of :data:`xlard.prompts.COLORS` and the parser's compound
#: colors. Chosen as typical renderings of each name (moderately saturated, as
#: objects in photographs are), not as the extreme CSS values.
COLOR_PROTOTYPES: Mapping[str, tuple[int, int, int]] = {
    "red": (210, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 40),
    "green": (45, 160, 60),
    "blue": (35, 75, 215),
    "purple": (130, 50, 180),
    "pink": (245, 155, 200),
    "brown": (120, 70, 30),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "cyan": (30, 200, 220),
    "magenta": (220, 40, 200),
    "teal": (0, 128, 128),
    "navy": (20, 30, 110),
    "beige": (225, 210, 175),
    "maroon": (120, 20, 35),
    "violet": (160, 100, 220),
    "turquoise": (64, 224, 208),
    "gold": (230, 185, 40),
    "silver": (192, 192, 192),
    "lime": (160, 230, 50),
    "indigo": (75, 20, 130),
    "crimson": (190, 20, 60),
    "khaki": (195, 176, 120),
    "lavender": (200, 180, 230),
    "tan": (210, 180, 140),
    "navy blue": (20, 30, 110),
    "sky blue": (135, 200, 235),
    "royal blue": (65, 105, 225),
    "sea green": (46, 139, 87),
    "hot pink": (255, 105, 180),
}

_COLOR_ALIASES: Mapping[str, str] = COLOR_ALIASES

#: Modifiers the prompt parser attaches to colors ("light blue"), as changes
#: in CIELAB: (lightness offset, chroma factor); lightness is clamped to [3, 97].
COLOR_MODIFIERS: Mapping[str, tuple[float, float]] = {
    "light": (+20.0, 0.75),
    "pale": (+15.0, 0.45),
    "bright": (+8.0, 1.25),
    "dark": (-20.0, 0.8),
    "deep": (-10.0, 1.1),
}

#: The default basis of :class:`PixelColorEncoder`: every single-name prototype
#: (compound names duplicate or sit between them).
_DEFAULT_BASIS: tuple[str, ...] = tuple(n for n in COLOR_PROTOTYPES if " " not in n)

# ---------------------------------------------------------------------------
# sRGB -> CIELAB (D65)
# ---------------------------------------------------------------------------

# Linear sRGB -> CIE XYZ (D65), IEC 61966-2-1.
_RGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
_WHITE_D65 = (0.95047, 1.0, 1.08883)
_DELTA = 6.0 / 29.0


def srgb_to_linear(rgb: torch.Tensor) -> torch.Tensor:
    """Undo the sRGB transfer curve.

    Args:
        rgb (Tensor[..., 3, ...]): gamma-encoded sRGB in [0, 1], any float dtype.

    Returns:
        Tensor, same shape: linear-light RGB in [0, 1].
    """
    rgb = rgb.clamp(0.0, 1.0)
    return torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)


def linear_rgb_to_lab(rgb: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Convert linear-light sRGB to CIELAB (D65 white point).

    Args:
        rgb (Tensor): linear RGB in [0, 1] with the 3 channels on ``dim``.
        dim (int): the channel dimension.

    Returns:
        Tensor, same shape: (L in [0, 100], a, b) on ``dim``.
    """
    _check_rgb("linear_rgb_to_lab", rgb, dim)
    rgb = rgb.movedim(dim, -1)
    matrix = torch.tensor(_RGB_TO_XYZ, dtype=rgb.dtype, device=rgb.device)
    white = torch.tensor(_WHITE_D65, dtype=rgb.dtype, device=rgb.device)
    xyz = (rgb @ matrix.T) / white
    # The cube root is replaced by a line near 0 (CIE 1976) so L is finite and smooth at black.
    f = torch.where(xyz > _DELTA**3, xyz.clamp(min=_DELTA**3) ** (1.0 / 3.0), xyz / (3 * _DELTA**2) + 4.0 / 29.0)
    lab = torch.stack(
        (116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])), dim=-1
    )
    return lab.movedim(-1, dim)


def srgb_to_lab(rgb: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Convert gamma-encoded sRGB in [0, 1] to CIELAB (D65).

    Args:
        rgb (Tensor): sRGB in [0, 1] with the 3 channels on ``dim``.
        dim (int): the channel dimension.

    Returns:
        Tensor, same shape: (L, a, b) on ``dim``.

    Example:
        >>> srgb_to_lab(torch.tensor([1.0, 0.0, 0.0])).round(decimals=1)
        tensor([53.2000, 80.1000, 67.2000])
    """
    _check_rgb("srgb_to_lab", rgb, dim)
    if rgb.numel():
        lo, hi = float(rgb.amin()), float(rgb.amax())
        # srgb_to_linear clamps: [128, 64, 0] became white-ish [1, 1, 0] without a word
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"srgb_to_lab: rgb must be finite sRGB values in [0, 1], got values in [{lo:.4g}, "
                             f"{hi:.4g}]" + (" (0..255 values? divide by 255)" if hi > 1 and lo >= 0 else ""))
    return linear_rgb_to_lab(srgb_to_linear(rgb), dim=dim)


def _check_rgb(owner: str, rgb: Any, dim: int) -> None:
    if not isinstance(rgb, torch.Tensor) or not rgb.is_floating_point():
        raise ValueError(f"{owner}: rgb must be a float tensor with 3 channels on dim {dim}, got "
                         f"{rgb.dtype if isinstance(rgb, torch.Tensor) else type(rgb).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -rgb.dim() <= dim < rgb.dim() or rgb.shape[dim] != 3:
        raise ValueError(f"{owner}: rgb must have 3 channels on dim {dim}, got shape {tuple(rgb.shape)}")


def _canonical_color(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a color name must be a non-empty string, got {name!r}")
    words = re.sub(r"[\s_\-]+", " ", name.strip().lower()).split()
    return " ".join(_COLOR_ALIASES.get(w, w) for w in words)


def color_prototype_lab(name: str, prototypes: Mapping[str, tuple[int, int, int]] | None = None) -> torch.Tensor:
    """The CIELAB prototype (float64 [3]) of a color name.

    Accepts the names of :data:`COLOR_PROTOTYPES` (and "grey", "golden"), and
    a modifier of :data:`COLOR_MODIFIERS` before any of them ("light blue",
    "dark red"), which shifts lightness and scales chroma in CIELAB.

    Args:
        name: the color, as the prompt parser writes it.
        prototypes: name -> sRGB 0-255 table (default :data:`COLOR_PROTOTYPES`).

    Raises:
        ValueError: an unknown color, listing the known ones.
    """
    table = COLOR_PROTOTYPES if prototypes is None else prototypes
    key = _canonical_color(name)
    modifier = None
    if key not in table:
        head, _, rest = key.partition(" ")
        if head in COLOR_MODIFIERS and rest in table:
            modifier, key = head, rest
        else:
            raise ValueError(
                f"unknown color {name!r}; known colors: {sorted(table)} "
                f"(optionally after one of {sorted(COLOR_MODIFIERS)})"
            )
    rgb = torch.tensor(table[key], dtype=torch.float64) / 255.0
    lab = srgb_to_lab(rgb)
    if modifier is not None:
        shift, chroma = COLOR_MODIFIERS[modifier]
        lab = torch.stack((lab[0] + shift, lab[1] * chroma, lab[2] * chroma))
        lab[0] = lab[0].clamp(3.0, 97.0)
    return lab


# ---------------------------------------------------------------------------
# Images and patches
# ---------------------------------------------------------------------------


def _described(value: Any) -> str:
    """A refused array argument in an error: its type, dtype and shape (a numpy array's or an integer tensor's
    shape alone read like a fitting float tensor's), or its type."""
    if isinstance(value, torch.Tensor):
        return f"a torch.Tensor ({str(value.dtype).replace('torch.', '')}, shape {list(value.shape)})"
    if type(value).__module__ == "numpy" and hasattr(value, "dtype") and hasattr(value, "shape"):
        return f"a numpy.ndarray ({value.dtype}, shape {list(value.shape)}; torch.from_numpy makes it a tensor)"
    return type(value).__name__


def as_image_batch(images: Any) -> torch.Tensor:
    """Bring a batch of images to a float32 tensor ``[B, 3, H, W]`` in [0, 1].

    Args:
        images: a tensor ``[B, C, H, W]`` or ``[C, H, W]`` (float in [0, 1] or
            uint8 0-255; C = 1, 3 or 4, a fully opaque alpha dropped); a numpy array
            ``[B, H, W, C]`` or ``[H, W, C]`` (float in [0, 1] or uint8); a PIL
            image or a list of same-size PIL images (read as :func:`xlard.explain.read_png`
            reads files: EXIF orientation applied, gray/palette/CMYK converted); a list of
            same-size ``[C, H, W]`` tensors (or ``[H, W, C]`` ones, told apart by where the
            1, 3 or 4 channels are; ``[C, H, W]`` when both could be) or ``[H, W, C]`` arrays.

    Returns:
        Tensor[B, 3, H, W], float32, on the input tensor's device (CPU otherwise).

    Raises:
        ValueError: a wrong rank or channel count, float values outside [0, 1]
            (a VAE's [-1, 1] output must be mapped with ``(x + 1) / 2`` first),
            transparent pixels, PIL images of different sizes, animated or with
            16-bit / float pixels.
    """
    if isinstance(images, (list, tuple)) and images and all(isinstance(im, torch.Tensor) for im in images):
        if len({(tuple(im.shape), im.dtype, im.device) for im in images}) != 1:
            raise ValueError("as_image_batch: a list of tensors must share one shape, dtype and device ([C, H, W] "
                             f"or [H, W, C] each), got {sorted({(tuple(im.shape), str(im.dtype), str(im.device)) for im in images})}")
        shape = tuple(images[0].shape)
        given = f"a list of {len(images)} tensors of shape {shape}"
        if len(shape) != 3:
            raise ValueError(f"as_image_batch: a list of tensors holds [C, H, W] (or [H, W, C]) images, got shape "
                             f"{shape}")
        hwc = shape[0] not in (1, 3, 4) and shape[2] in (1, 3, 4)
        images = torch.stack(list(images))
    else:
        hwc = False
        given = f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else None
    if isinstance(images, torch.Tensor):
        if images.is_meta:
            raise ValueError("as_image_batch: images are meta tensors (shapes only, no pixels); pass the decoded "
                             "images")
        x = images
        channel_dim = -1 if hwc else -3
    else:
        import numpy as np

        if isinstance(images, (list, tuple)) or hasattr(images, "convert"):
            items = list(images) if isinstance(images, (list, tuple)) else [images]
            if not items:
                raise ValueError("as_image_batch: got an empty list of images")
            arrays = [rgb_array(im, f"as_image_batch: image {i}") if hasattr(im, "convert") else np.asarray(im)
                      for i, im in enumerate(items)]  # PIL: upright, 8-bit, opaque, as xlard.explain.read_png
            if len({a.shape for a in arrays}) != 1:
                raise ValueError(f"as_image_batch: images must share one size, got {sorted({a.shape for a in arrays})}")
            images = np.stack(arrays)
            given = f"a list of {len(arrays)} images of shape {arrays[0].shape}"
        if not isinstance(images, np.ndarray):
            raise ValueError(f"as_image_batch: unsupported image type {type(images).__name__}")
        given = given or f"a numpy array of shape {images.shape}"
        x = torch.from_numpy(np.ascontiguousarray(images))
        channel_dim = -1
    batched = x.dim() == 4  # as given (one image is read as a batch of one below)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"as_image_batch: images must be [B, C, H, W] (tensor) or [B, H, W, C] (numpy), "
                         f"got shape {tuple(x.shape)}")
    if channel_dim == -1:
        x = x.permute(0, 3, 1, 2)
    channels = x.shape[1]
    if x.shape[0] and (x.shape[2] == 0 or x.shape[3] == 0):
        raise ValueError(f"as_image_batch: images are empty ({x.shape[2]} x {x.shape[3]} pixels)")
    if channels not in (1, 3, 4):  # the shape as given: the one reshaped here was never passed
        if channel_dim == -1 and x.shape[2] in (1, 3, 4):
            hint = "; numpy arrays are read channels-last [(B,) H, W, C]: move the channels last (np.moveaxis)"
        elif channel_dim == -3 and x.shape[3] in (1, 3, 4):
            # the permute that fits what came: a [B, H, W, C] batch's was given as [H, W, C]'s, which raised
            fix = "images.permute(0, 3, 1, 2) for [B, H, W, C]" if batched else "images.permute(2, 0, 1) for [H, W, C]"
            hint = f"; tensors are read channels-first [(B,) C, H, W]: pass {fix}"
        else:
            hint = ""
        raise ValueError(f"as_image_batch: expected 1, 3 or 4 channels, got {channels} ({given}){hint}")
    if channels == 1:
        x = x.expand(-1, 3, -1, -1)
    elif channels == 4:  # an alpha channel: dropped only when fully opaque (the RGB under a transparent pixel
        alpha = x[:, 3]  # is whatever the writer left, often black: a transparent background read as black)
        opaque = 255 if alpha.dtype == torch.uint8 else 1.0 - 1e-3
        if alpha.numel() and (alpha.is_floating_point() or alpha.dtype == torch.uint8) \
                and bool((alpha < opaque).any()):
            raise ValueError(f"as_image_batch: the 4th channel (alpha) has {int((alpha < opaque).sum())} "
                             f"transparent pixel(s); only opaque images are read: composite them over their "
                             f"background first, or pass the 3 color channels")
        x = x[:, :3]
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise ValueError(f"as_image_batch: images must be float in [0, 1] or uint8, got {x.dtype}")
    x = x.float()
    if x.numel():
        finite = torch.isfinite(x)
        if not bool(finite.all()):  # NaN passed the range check below and scored colors 0 without a word
            raise ValueError(f"as_image_batch: images hold {int((~finite).sum())} NaN or infinite value(s)")
        pixels = x.detach()  # a scalar read off a graph warned
        lo, hi = float(pixels.amin()), float(pixels.amax())
        if lo < -1e-3 or hi > 1.0 + 1e-3:  # the hint for the range the values are in (0..255 got the VAE's)
            hint = ("0..255 values? divide by 255" if lo >= -1e-3 else
                    "map a VAE's [-1, 1] output with (x + 1) / 2" if hi <= 1.0 + 1e-3 else
                    "map them to [0, 1]")
            raise ValueError(f"as_image_batch: float images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                             f"{hint}")
    return x.clamp(0.0, 1.0)


def patch_positions(grid: tuple[int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """Centres ``(x, y)`` in [0, 1] of a row-major ``(gh, gw)`` patch grid: float32 ``[gh * gw, 2]``."""
    gh, gw = grid_pair("patch_positions", "grid", grid)
    device = as_device(device, "patch_positions")
    rows = (torch.arange(gh, device=device, dtype=torch.float32) + 0.5) / gh
    cols = (torch.arange(gw, device=device, dtype=torch.float32) + 0.5) / gw
    return torch.stack((cols.repeat(gh), rows.repeat_interleave(gw)), dim=-1)


#: The smallest PixelColorEncoder temperature (deltaE scale): far below it the softmax is a hard argmax anyway.
MIN_TEMPERATURE = 1e-4


def grid_pair(owner: str, name: str, grid) -> tuple[int, int]:
    """``grid`` as ``(gh, gw)``: two integers >= 1 (a (2.9, 2.9) grid was truncated to (2, 2) without a word)."""
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence) or len(grid) != 2 \
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in grid):
        raise ValueError(f"{owner}: {name} must be a pair of integers (gh, gw) >= 1, got {grid!r}")
    return int(grid[0]), int(grid[1])


@dataclass(frozen=True)
class PatchFeatures:
    """Per-patch image features on a row-major grid.

    Attributes:
        features (Tensor[B, N, D]): one feature vector per patch, N = gh * gw.
        grid: (gh, gw); patch ``n`` is at row ``n // gw``, column ``n % gw``.
    """

    features: torch.Tensor
    grid: tuple[int, int]

    def __post_init__(self) -> None:
        if not isinstance(self.features, torch.Tensor) or self.features.dim() != 3:
            raise ValueError(f"PatchFeatures.features must be a [B, N, D] tensor, got "
                             f"{getattr(self.features, 'shape', type(self.features).__name__)}")
        if self.features.shape[2] == 0:  # an IndexError from amax deep in the color scores
            raise ValueError(f"PatchFeatures.features have no feature dimension: {tuple(self.features.shape)}")
        gh, gw = grid_pair("PatchFeatures", "grid", self.grid)
        if gh * gw != self.features.shape[1]:
            raise ValueError(f"PatchFeatures.grid {self.grid} does not match N = {self.features.shape[1]} patches")
        object.__setattr__(self, "grid", (gh, gw))

    def positions(self) -> torch.Tensor:
        """Patch centres ``(x, y)`` in [0, 1], float32 ``[N, 2]`` (x right, y down)."""
        return patch_positions(self.grid, self.features.device)


class EmbeddingCache:
    """Text embeddings kept per (model's device and dtype, text), least recently used dropped past ``capacity``
    entries.

    A long-lived process (a server, a training run over an open vocabulary) meets new words without end: an
    unbounded dict grew with every one. Keyed by the model's device and dtype too, so that a model moved or cast
    after a call (``.half()``) does not get tensors of its old device or precision back. The text is the one the
    model read (a template applied), so a changed template is a new key. Weights changed in place are not seen:
    ``clear()`` after training the text tower.
    """

    def __init__(self, capacity: int = 4096) -> None:
        from collections import OrderedDict

        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()

    @staticmethod
    def _where(model: torch.nn.Module) -> str:
        p = next(model.parameters(), None)
        return "cpu/none" if p is None else f"{p.device}/{p.dtype}"

    def missing(self, model: torch.nn.Module, texts: Sequence[str]) -> list[str]:
        """The distinct texts of ``texts`` not held for ``model``'s device and dtype, in first-seen order."""
        where = self._where(model)
        return [t for t in dict.fromkeys(texts) if (where, t) not in self._items]

    def stack(self, model: torch.nn.Module, texts: Sequence[str], new: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[len(texts), D]``: the embeddings of ``texts``, from ``new`` (just computed, then kept) or the cache."""
        out, where = [], self._where(model)
        for t in texts:
            key = (where, t)
            if t in new:
                self._items[key] = new[t]
            self._items.move_to_end(key)
            out.append(self._items[key])
        stacked = torch.stack(out)
        while len(self._items) > self.capacity:  # after stacking: a call with more texts than fit still works
            self._items.popitem(last=False)
        return stacked


@runtime_checkable
class ColorFeatureEncoder(Protocol):
    """What the color reward needs from an encoder (see the module docstring)."""

    def encode_images(self, images: Any) -> PatchFeatures: ...

    def embed_colors(self, names: Sequence[str]) -> torch.Tensor: ...


# ---------------------------------------------------------------------------
# Weight-free pixel colors
# ---------------------------------------------------------------------------


class PixelColorEncoder:
    """Weight-free color features: patch mean color in CIELAB vs named prototypes.

    Each patch's mean color (averaged in linear light, then converted to
    CIELAB) is compared with a basis of K named prototypes by CIE76 color
    difference ``deltaE`` (Euclidean in CIELAB); its feature is
    ``softmax(-deltaE / temperature)`` over the basis. A color name's
    embedding is the feature of its own prototype, so the cosine similarity is
    1 for a patch of exactly that color and falls as the patch's soft
    assignment drifts to other prototypes. Names outside the basis (modified
    colors such as "light blue", compound ones) are embedded the same way.

    Args:
        basis: the prototype names spanning the feature space (default: every
            single-word name of :data:`COLOR_PROTOTYPES`, gray, black and white
            included so backgrounds get their own direction).
        grid: (gh, gw) patch grid; each patch averages its pixels
            (``adaptive_avg_pool2d``, so any image size works).
        temperature: deltaE scale of the softmax. Distinct named colors are
            30-100 deltaE apart, so the default 10 gives near one-hot features
            while keeping near-misses (red vs crimson) partly similar.
        prototypes: name -> sRGB 0-255 table (default :data:`COLOR_PROTOTYPES`).

    Example:
        >>> enc = PixelColorEncoder(grid=(16, 16))
        >>> feats = enc.encode_images(torch.rand(2, 3, 64, 64))   # PatchFeatures
        >>> feats.features.shape, feats.grid                      # [B, 256 patches, K]
        (torch.Size([2, 256, 27]), (16, 16))
        >>> enc.embed_colors(["red", "light blue"]).shape         # [2, K]
        torch.Size([2, 27])
    """

    def __init__(
        self,
        basis: Sequence[str] | None = None,
        *,
        grid: tuple[int, int] = (16, 16),
        temperature: float = 10.0,
        prototypes: Mapping[str, tuple[int, int, int]] | None = None,
    ) -> None:
        if prototypes is not None:
            _check_prototypes(prototypes)
        self.prototypes = dict(COLOR_PROTOTYPES if prototypes is None else prototypes)
        if basis is not None and (isinstance(basis, (str, bytes)) or not isinstance(basis, Sequence)):
            raise ValueError(f"PixelColorEncoder: basis must be a sequence of color names, got {basis!r}")
        names = tuple(_canonical_color(n) for n in (basis if basis is not None else _DEFAULT_BASIS))
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"PixelColorEncoder: basis needs at least 2 distinct colors, got {names}")
        if isinstance(temperature, bool) or not is_finite_real(temperature) \
                or not MIN_TEMPERATURE <= temperature <= 1e6:
            # 1e-300 is 0 in float32: every feature NaN, every color "scores 0.00 at patch 0"
            raise ValueError(f"PixelColorEncoder: temperature must be a finite number in [{MIN_TEMPERATURE:g}, 1e6] "
                             f"(a deltaE scale), got {temperature!r}")
        gh, gw = grid_pair("PixelColorEncoder", "grid", grid)
        self.basis = names
        self.grid = (gh, gw)
        self.temperature = float(temperature)
        self.basis_lab = torch.stack([color_prototype_lab(n, self.prototypes) for n in names]).float()

    def __repr__(self) -> str:
        return f"PixelColorEncoder(basis={len(self.basis)} colors, grid={self.grid}, temperature={self.temperature})"

    def _assign(self, lab: torch.Tensor) -> torch.Tensor:
        basis = self.basis_lab.to(device=lab.device, dtype=lab.dtype)
        # Explicit differences rather than cdist, whose matmul path rounds differently with the batch size.
        delta_e = (lab.unsqueeze(-2) - basis).square().sum(-1).sqrt()
        return torch.softmax(-delta_e / self.temperature, dim=-1)

    def patch_lab(self, images: Any) -> torch.Tensor:
        """Mean CIELAB color of each patch: float32 ``[B, N, 3]`` (row-major grid)."""
        x = as_image_batch(images)
        linear = F.adaptive_avg_pool2d(srgb_to_linear(x), self.grid)
        return linear_rgb_to_lab(linear, dim=1).flatten(2).transpose(1, 2)

    def encode_images(self, images: Any) -> PatchFeatures:
        """Patch features ``[B, N, K]`` (soft prototype assignments) of a batch of images.

        Args:
            images: see :func:`as_image_batch`.

        Returns:
            :class:`PatchFeatures` with ``grid = self.grid``.
        """
        return PatchFeatures(self._assign(self.patch_lab(images)), self.grid)

    def embed_colors(self, names: Sequence[str]) -> torch.Tensor:
        """Embeddings ``[C, K]`` of color names: the features of their prototypes.

        Raises:
            ValueError: an unknown color name.
        """
        if isinstance(names, str):
            raise ValueError("embed_colors takes a sequence of names, not one string")
        if not len(names):
            return self.basis_lab.new_zeros((0, len(self.basis)))
        lab = torch.stack([color_prototype_lab(n, self.prototypes) for n in names]).float()
        return self._assign(lab)

    def nearest_colors(self, features: torch.Tensor | PatchFeatures) -> list:
        """The basis name with the largest weight for each feature vector (nested lists, like ``tolist``)."""
        if isinstance(features, PatchFeatures):
            features = features.features
        k = len(self.basis)
        if not isinstance(features, torch.Tensor) or features.dim() < 1 or features.shape[-1] != k:
            got = getattr(features, "shape", type(features).__name__)
            raise ValueError(f"PixelColorEncoder.nearest_colors: features must be a tensor [..., {k}] (one weight "
                             f"per basis color) or PatchFeatures, got {got}")
        if features.is_floating_point() and not bool(torch.isfinite(features).all()):
            raise ValueError("PixelColorEncoder.nearest_colors: features hold NaN or infinite values")
        index = features.argmax(-1)
        return _map_nested(index.tolist(), self.basis)


def _check_prototypes(prototypes: Any) -> None:
    """A prototype table maps names to sRGB triples on the 0-255 scale; NaN gave NaN features, a 0-1 table near-
    uniform ones (every color about equally far), both without a word."""
    if not isinstance(prototypes, Mapping) or len(prototypes) < 2:
        raise ValueError(f"PixelColorEncoder: prototypes must map at least 2 color names to sRGB (r, g, b) on the "
                         f"0-255 scale, got {type(prototypes).__name__}")
    for name, rgb in prototypes.items():
        if isinstance(rgb, (str, bytes)) or not isinstance(rgb, Sequence) or len(rgb) != 3 \
                or not all(is_finite_real(v) and not isinstance(v, bool) and 0 <= v <= 255 for v in rgb):
            raise ValueError(f"PixelColorEncoder: prototypes[{name!r}] must be an sRGB (r, g, b) of numbers in "
                             f"[0, 255], got {rgb!r}")
    if max(max(rgb) for rgb in prototypes.values()) <= 1:
        raise ValueError("PixelColorEncoder: prototypes are sRGB on the 0-255 scale; every value here is <= 1 (a "
                         "0-1 table? multiply by 255)")


def _map_nested(values: Any, names: Sequence[str]) -> Any:
    if isinstance(values, list):
        return [_map_nested(v, names) for v in values]
    return names[values]


# ---------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------

# OpenAI CLIP's image normalization (used when the checkpoint has no image processor config); SigLIP's is 0.5 / 0.5.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_SIGLIP_MEAN = _SIGLIP_STD = (0.5, 0.5, 0.5)

#: The ``model_type`` values :class:`ClipColorEncoder` reads: a CLIP model or a SigLIP model.
CLIP_MODEL_TYPES = ("clip", "siglip")

#: The tokenizer files a checkpoint of each kind is read with, for the messages.
_TOKENIZER_FILES = {"clip": "tokenizer.json, or vocab.json + merges.txt", "siglip": "spiece.model"}


def check_clip_model(who: str, model_id_or_path) -> str:
    """Check that a CLIP or SigLIP checkpoint (hub id or local folder) can be loaded, reading only its config;
    returns what to load. Cheap enough to run before any long work (the CLIP source's scripts do).

    Raises:
        ValueError: not a name or path, or its config is not a CLIP or SigLIP model's.
        FileNotFoundError: a missing folder, a folder without ``config.json``, or a hub id that cannot be
            loaded (not cached while offline, a typo, no network), with the fix.
    """
    return _clip_checkpoint(who, model_id_or_path)[0]


def _clip_checkpoint(who: str, model_id_or_path) -> tuple[str, str]:
    """``(what to load, its model_type)`` of a CLIP or SigLIP checkpoint: :func:`check_clip_model`'s checks."""
    transformers = require("transformers", who)
    where = model_location(who, model_id_or_path, "config.json", "a CLIP model folder (written by "
                                                                  "CLIPModel or SiglipModel.save_pretrained)")
    try:
        config = transformers.AutoConfig.from_pretrained(where)
    except OSError as exc:
        if Path(where).is_dir():
            raise
        from xlard.backbones.diffusers_backbone import unloadable_hub_model

        why = unloadable_hub_model(where, exc, "a CLIP model folder", "config.json", kind="a CLIP model")
        raise FileNotFoundError(f"{who}: {why}") from None
    except ValueError as exc:  # a config.json without (or with an unknown) model_type
        reason = " ".join(str(exc).split())[:200]
        raise ValueError(f"{who}: {model_id_or_path} is not a CLIP model (its config.json: {reason})") from None
    kind = getattr(config, "model_type", None)
    if kind not in CLIP_MODEL_TYPES:
        raise ValueError(f"{who}: {model_id_or_path} is a {kind if kind is not None else 'non-CLIP'!r} model, "
                         f"not a CLIP model (model_type 'clip', or a SigLIP model: 'siglip')")
    folder = Path(where)
    if folder.is_dir():  # named as the caller's setting now, not after a run's backbone has loaded
        has = {name for name in ("tokenizer.json", "vocab.json", "merges.txt", "spiece.model")
               if (folder / name).is_file()}
        ok = "tokenizer.json" in has or ("spiece.model" in has if kind == "siglip"
                                         else {"vocab.json", "merges.txt"} <= has)
        if not ok:
            raise ValueError(f"{who}: {model_id_or_path} has no usable tokenizer: no {_TOKENIZER_FILES[kind]} beside "
                             f"its config.json; save the model's tokenizer there (tokenizer.save_pretrained)")
    return where, kind


def check_template(owner: str, name: str, template: Any, word: str) -> None:
    """A text template must take the word through exactly one ``{}`` and nothing else: ``'{x} {}'`` or
    ``'{}}'`` passed the old count of ``{}`` and failed at first use (KeyError 'x', "Single '}'")."""
    ok = isinstance(template, str)
    if ok:
        try:
            ok = template.format("\x00").count("\x00") == 1
        except (KeyError, IndexError, ValueError):
            ok = False
    if not ok:
        raise ValueError(f"{owner}: {name} must contain exactly one '{{}}' for the {word} and no other braces "
                         f"(write '{{{{' and '}}}}' for literal ones), got {template!r}")


def check_text_length(model: Any, texts: Sequence[str], tokens: Mapping[str, Any], owner: str, template: str) -> None:
    """The CLIP (or SigLIP) text model takes at most ``max_position_embeddings`` tokens; a longer text (a long template
    or noun) failed deep inside transformers ("Sequence length must be less than ...")."""
    limit = getattr(getattr(getattr(model, "config", None), "text_config", None), "max_position_embeddings", None)
    ids = tokens["input_ids"]
    if limit is None or ids.shape[-1] <= int(limit):
        return
    mask = tokens.get("attention_mask")
    lengths = (mask.sum(-1) if mask is not None else torch.full((ids.shape[0],), ids.shape[-1])).tolist()
    longest = max(range(len(texts)), key=lambda i: lengths[i])
    raise ValueError(f"{owner}: the text {texts[longest]!r} is {int(lengths[longest])} tokens, and the text "
                     f"model takes at most {int(limit)}; shorten the {template} (or the word put into it)")


def _normalization(name: str, values, default, *, positive: bool) -> tuple[float, float, float]:
    """Three finite per-channel values (std: > 0): image_std (0, 0, 0) gave NaN maps without a word."""
    values = default if values is None else values
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in out):
        raise ValueError(f"ClipColorEncoder: {name} must be 3 finite numbers (one per RGB channel"
                         f"{', each > 0' if positive else ''}), got {values!r}")
    return out


_CLIP_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}


def clip_dtype(where: str, dtype: Any) -> torch.dtype | None:
    """``dtype`` of a CLIP model to load: None, or float32 / float16 / bfloat16 / float64 as a torch dtype or its name
    ("fp16" from a YAML config failed inside transformers, after a run's backbone had loaded, without a name)."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in _CLIP_DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype.strip() in _CLIP_DTYPES:
        return _CLIP_DTYPES[dtype.strip()]
    raise ValueError(f"{where}: dtype must be float32, float16, bfloat16 or float64 (a torch dtype or its name), "
                     f"got {dtype!r}")


def _processor_normalization(where: str, processor: Any,
                             defaults: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
                             ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(image_mean, image_std) an image processor config asks for: none (0 and 1) with ``do_normalize: false``,
    a single number for all three channels; a value that is no normalization is named as the config's; a value
    the config lacks is ``defaults``' (OpenAI CLIP's by default)."""
    defaults = defaults or (_CLIP_MEAN, _CLIP_STD)
    if getattr(processor, "do_normalize", True) is False:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    values = []
    for name in ("image_mean", "image_std"):
        value = getattr(processor, name, None)
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = (value,) * 3  # transformers takes one number for every channel
        try:
            values.append(_normalization(name, value, defaults[0] if name == "image_mean" else defaults[1],
                                         positive=name == "image_std"))
        except ValueError as exc:
            raise ValueError(f"{where}'s image processor config (preprocessor_config.json): {exc}") from None
    return values[0], values[1]


def siglip_head_per_patch(head: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A SigLIP attention-pooling head read at every patch: ``[B, N, D] -> [B, N, D]``.

    The head pools the patches with one learned probe (``attention(probe, x, x)``),
    then adds an MLP of its normalized output. Here each patch goes through
    the head as if the probe attended to it alone: the attention's value
    projection and ``out_proj`` on that patch, then the residual MLP. When
    every patch is the same token, the attention is uniform over equal
    values, so each patch's output equals the head's pooled output.

    Args:
        head: a ``transformers`` ``SiglipMultiheadAttentionPoolingHead``
            (``attention``: a ``torch.nn.MultiheadAttention``, ``layernorm``, ``mlp``).
        tokens (Tensor[B, N, D]): the vision tower's post-normalized tokens.
    """
    attention = head.attention
    e = attention.embed_dim  # the packed projections are q, k, v rows of embed_dim each
    if attention.in_proj_weight is not None:
        weight = attention.in_proj_weight[2 * e:]
    else:  # key and value sizes differ from the query's: separate projections
        weight = attention.v_proj_weight
    bias = attention.in_proj_bias[2 * e:] if attention.in_proj_bias is not None else None
    values = attention.out_proj(F.linear(tokens, weight, bias))
    return values + head.mlp(head.layernorm(values))


class ClipColorEncoder:
    """Dense CLIP (or SigLIP) color features: projected patch tokens vs color-prompt text embeddings.

    Patch features are the vision tower's last-layer patch tokens (the class
    token dropped) passed through the same ``post_layernorm`` and
    ``visual_projection`` as the pooled image embedding, which puts them in
    the joint image-text space; color embeddings are the projected text
    embeddings of ``template.format(color)``. Images are resized (bilinear,
    antialiased) to the vision config's ``image_size`` square without
    cropping, so patches cover the whole image; the grid is
    ``image_size // patch_size`` on both sides.

    ``dense="values"`` takes the patch features from the last layer's value
    path instead (its input normalized, ``v_proj`` then ``out_proj``, no
    attention mixing, residual or MLP), the MaskCLIP reading, which keeps each
    patch's own content and usually localizes better than the last-layer
    tokens, whose global attention spreads the image's content over all patches.

    A SigLIP model (``transformers.SiglipModel``) has no class token and no
    ``visual_projection``: its image embedding is an attention-pooling head
    (a learned probe attending over the patches, then a residual MLP) on the
    post-normalized tokens. Each patch is read through that head as if the
    probe attended to it alone (the head's value path, ``out_proj``, then its
    residual MLP: :func:`siglip_head_per_patch`, the same MaskCLIP reading of
    the head's attention); texts are padded to the text model's
    ``max_position_embeddings`` without an attention mask, as SigLIP was
    trained, and embedded by its own head.

    Args:
        model: a ``transformers.CLIPModel`` or ``SiglipModel`` (any size; eval mode is set).
        tokenizer: its tokenizer (called as ``tokenizer(texts, padding=True,
            return_tensors="pt")``), or a ``CLIPProcessor`` (its tokenizer is used).
        template: text for a color, with ``{}`` for the color name.
        image_mean, image_std: per-channel normalization (default OpenAI
            CLIP's, 0.5 / 0.5 for SigLIP, or the checkpoint's image processor's
            via from_pretrained).
        dense: "tokens" (default) or "values" (see above).

    Example:
        >>> enc = ClipColorEncoder.from_pretrained("openai/clip-vit-base-patch16")   # doctest: +SKIP
        >>> pf = enc.encode_images(images)            # features [B, 196, 512], grid (14, 14)   # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        template: str = "a photo of a {} object",
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        dense: str = "tokens",
    ) -> None:
        if dense not in ("tokens", "values"):
            raise ValueError(f"ClipColorEncoder: dense must be 'tokens' or 'values', got {dense!r}")
        self.kind = "siglip" if getattr(getattr(model, "config", None), "model_type", None) == "siglip" else "clip"
        needs = ("vision_model", "text_model") + (() if self.kind == "siglip" else ("visual_projection",
                                                                                    "text_projection"))
        for attr in needs:
            if not hasattr(model, attr):
                raise ValueError(f"ClipColorEncoder needs a transformers CLIPModel (or SiglipModel); "
                                 f"{type(model).__name__} has no {attr!r}")
        check_template("ClipColorEncoder", "template", template, "color")
        if self.kind == "siglip":
            head = getattr(model.vision_model, "head", None)
            if head is None or not hasattr(getattr(head, "attention", None), "out_proj"):
                # vision_use_head false (a tower made for a language model): its tokens are not in the text's space
                raise ValueError(f"ClipColorEncoder: this SigLIP model's vision tower has no attention-pooling head "
                                 f"(vision_use_head {getattr(model.config.vision_config, 'vision_use_head', None)}), "
                                 "so its patches have no place in the text's embedding space")
            text_dim = getattr(getattr(model.text_model, "head", None), "out_features", None)
            vision_dim = int(model.config.vision_config.hidden_size)
            names = ("text head", "vision tower")
        else:
            text_dim = getattr(model.text_projection, "out_features", None)
            vision_dim = getattr(model.visual_projection, "out_features", None)
            names = ("text_projection", "visual_projection")
        if text_dim is not None and vision_dim is not None and text_dim != vision_dim:
            raise ValueError(f"ClipColorEncoder: the model's {names[0]} gives {text_dim} dims and its "
                             f"{names[1]} {vision_dim}: they must share the joint space")
        self.joint_dim = int(vision_dim if vision_dim is not None else text_dim)
        if hasattr(tokenizer, "tokenizer") and hasattr(tokenizer, "image_processor"):
            tokenizer = tokenizer.tokenizer  # a CLIPProcessor: its tokenizer (called with texts, it read them as URLs)
        if not callable(tokenizer):
            raise TypeError(f"ClipColorEncoder: tokenizer must be the CLIP model's tokenizer (e.g. "
                            f"transformers.AutoTokenizer.from_pretrained(...)), got {type(tokenizer).__name__}")
        vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else None
        rows = getattr(getattr(model.config, "text_config", None), "vocab_size", None)
        if isinstance(vocab, int) and isinstance(rows, int) and vocab > rows:
            # tokens added to the tokenizer without resizing the model: a prompt using one was a bare IndexError
            raise ValueError(f"ClipColorEncoder: the tokenizer holds {vocab} tokens but the model's text embedding "
                             f"{rows} (tokens added without model.resize_token_embeddings?): use the model's own "
                             "tokenizer")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        self.dense = dense
        siglip = self.kind == "siglip"
        self.image_mean = _normalization("image_mean", image_mean, _SIGLIP_MEAN if siglip else _CLIP_MEAN,
                                         positive=False)
        self.image_std = _normalization("image_std", image_std, _SIGLIP_STD if siglip else _CLIP_STD, positive=True)
        vision = model.config.vision_config
        self.image_size = int(vision.image_size)
        self.grid = (self.image_size // int(vision.patch_size),) * 2
        self._cache = EmbeddingCache()

    @classmethod
    def from_pretrained(cls, model_id_or_path: str, *, template: str = "a photo of a {} object",
                        dense: str = "tokens", device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None, **kwargs: Any) -> ClipColorEncoder:
        """Load a CLIP or SigLIP checkpoint (hub id or local folder) with its tokenizer.

        The image processor config, when the checkpoint has one, supplies the
        normalization; ``kwargs`` go to ``CLIPModel.from_pretrained`` (``SiglipModel``'s
        for a SigLIP checkpoint; its tokenizer needs ``sentencepiece``).
        """
        transformers = require("transformers", "xlard.color_features.ClipColorEncoder.from_pretrained")
        device = as_device(device, "ClipColorEncoder.from_pretrained")
        dtype = clip_dtype("ClipColorEncoder.from_pretrained", dtype)
        # the folder or hub id checked (and a hub id's config read) before the weights load
        model_id_or_path, kind = _clip_checkpoint("ClipColorEncoder.from_pretrained: model_id_or_path",
                                                  model_id_or_path)
        AutoTokenizer = transformers.AutoTokenizer
        model_class = transformers.SiglipModel if kind == "siglip" else transformers.CLIPModel

        owner = f"ClipColorEncoder.from_pretrained: model_id_or_path {model_id_or_path}"
        files = _TOKENIZER_FILES[kind]
        fix = ("restore the file" + ("" if Path(str(model_id_or_path)).is_dir() else
                                     f" (a hub model: download it again, `hf download {model_id_or_path}`)"))
        try:
            model, info = model_class.from_pretrained(model_id_or_path, **({"dtype": dtype} if dtype else {}),
                                                      output_loading_info=True, **kwargs)
        except (OSError, ValueError) as exc:  # a missing or cut weights file: transformers' text named no argument
            if kwargs and not isinstance(exc, OSError):
                raise  # a keyword argument of the caller's that transformers refused: its own words
            raise ValueError(f"{owner}: its weights could not be loaded ({short_reason(exc)}); {fix}") from None
        # weights the checkpoint lacks come back randomly initialised, with only a log line: a folder without its
        # projections gave maps that meant nothing
        missing = sorted(k for k in info.get("missing_keys", ()) if k.startswith(("visual_projection",
                                                                                     "text_projection", "logit_scale",
                                                                                     "logit_bias", "vision_model",
                                                                                     "text_model")))
        if missing:
            raise ValueError(f"ClipColorEncoder.from_pretrained: {model_id_or_path} lacks weights of the model "
                             f"({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}): a damaged or "
                             "partial checkpoint")
        if device is not None:
            model = model.to(device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_id_or_path)
        except ImportError as exc:  # SigLIP's sentencepiece tokenizer without the sentencepiece package
            raise ImportError(f"{owner}: its tokenizer could not be loaded ({short_reason(exc)}); a SigLIP "
                              "tokenizer needs sentencepiece: pip install 'xlard[method]'") from None
        except (OSError, ValueError) as exc:  # no tokenizer files: transformers advised installing sentencepiece
            raise ValueError(f"{owner}: its tokenizer could not be loaded ({short_reason(exc)}); save the tokenizer "
                             f"beside the model ({files}), or " + fix) from None
        vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else None
        want = getattr(getattr(model.config, "text_config", None), "vocab_size", None)
        if vocab is not None and want and vocab < min(want, 1000) // 2:
            # no tokenizer files: transformers builds a 2-token tokenizer, every word becomes <|endoftext|> and
            # every map is flat
            raise ValueError(f"ClipColorEncoder.from_pretrained: {model_id_or_path} has no usable tokenizer (its "
                             f"vocabulary holds {vocab} tokens, the model {want}): save the tokenizer beside the "
                             f"model ({files})")
        mean = std = None
        try:
            from transformers import AutoImageProcessor

            processor = AutoImageProcessor.from_pretrained(model_id_or_path)
        except (OSError, ValueError, ImportError):
            processor = None  # no preprocessor_config.json: OpenAI CLIP's normalization is the documented default
        if processor is not None:
            mean, std = _processor_normalization(str(model_id_or_path), processor,
                                                 (_SIGLIP_MEAN, _SIGLIP_STD) if kind == "siglip" else None)
        return cls(model, tokenizer, template=template, image_mean=mean, image_std=std, dense=dense)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _pixel_values(self, images: Any) -> torch.Tensor:
        x = as_image_batch(images).to(self.device)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                          align_corners=False)
        mean = torch.tensor(self.image_mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=x.device).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.dtype)

    @torch.no_grad()
    def encode_images(self, images: Any) -> PatchFeatures:
        """Projected patch tokens ``[B, N, projection_dim]`` (float32) of a batch of images."""
        vision = self.model.vision_model
        pixels = self._pixel_values(images)
        if pixels.shape[0] == 0:  # an empty batch: empty features, as PixelColorEncoder gives (the tower failed)
            n = self.grid[0] * self.grid[1]
            return PatchFeatures(torch.zeros(0, n, self.joint_dim, device=pixels.device), self.grid)
        out = vision(pixel_values=pixels, output_hidden_states=self.dense == "values")
        siglip = self.kind == "siglip"
        first = 0 if siglip else 1  # CLIP's class token is dropped; SigLIP has none
        if self.dense == "values":
            last = vision.encoder.layers[-1]
            tokens = last.layer_norm1(out.hidden_states[-2][:, first:])
            tokens = vision.post_layernorm(last.self_attn.out_proj(last.self_attn.v_proj(tokens)))
        else:  # SigLIP's last_hidden_state is post_layernorm's output already, CLIP's is not
            tokens = out.last_hidden_state[:, first:]
            tokens = tokens if siglip else vision.post_layernorm(tokens)
        if siglip:
            patches = siglip_head_per_patch(vision.head, tokens)
        else:
            patches = self.model.visual_projection(tokens)
        return PatchFeatures(patches.float(), self.grid)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], owner: str = "ClipColorEncoder",
                    setting: str = "template") -> torch.Tensor:
        """Joint-space text embeddings ``[K, D]`` (float32) of ``texts``, not cached: CLIP's projected pooled
        output (padded to the batch's longest, with the attention mask); SigLIP's text head on texts padded to
        its ``max_position_embeddings`` with no mask, as it was trained (its pooled token is the last one, so
        padding to the batch's longest would make a text's embedding depend on the rest of the batch).
        ``owner`` and ``setting`` name the caller and the setting to shorten in the error for a text longer
        than the text model takes."""
        if not texts:
            return torch.zeros(0, self.joint_dim, device=self.device)
        tokens = self.tokenizer(list(texts), padding=True, return_tensors="pt")
        check_text_length(self.model, texts, tokens, owner, setting)  # before max_length padding: one over-long
        if self.kind == "siglip":                                     # text made the batch uneven (a raw error)
            limit = int(self.model.config.text_config.max_position_embeddings)
            tokens = self.tokenizer(list(texts), padding="max_length", max_length=limit, return_tensors="pt")
            return self.model.text_model(input_ids=tokens["input_ids"].to(self.device)).pooler_output.float()
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return self.model.text_projection(self.model.text_model(**tokens).pooler_output).float()

    @torch.no_grad()
    def embed_colors(self, names: Sequence[str]) -> torch.Tensor:
        """Projected text embeddings ``[C, projection_dim]`` (float32) of the color prompts (``template`` filled
        with each name); cached per prompt text and the model's device and dtype."""
        if isinstance(names, str):
            raise ValueError("embed_colors takes a sequence of names, not one string")
        texts = [self.template.format(_canonical_color(n)) for n in names]
        if not texts:
            return torch.zeros(0, self.joint_dim, device=self.device)
        # one text a pass: a batch is padded to its longest text, which moved CLIP's embeddings at 1e-7, so a
        # cached color (and the scores) depended on the colors embedded before it
        new = {t: self.embed_texts([t])[0] for t in self._cache.missing(self.model, texts)}
        return self._cache.stack(self.model, texts, new)
