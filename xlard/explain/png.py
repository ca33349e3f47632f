"""PNG encoding, writing and reading through Pillow (which comes with the ``method`` extra)."""
from __future__ import annotations

import io
import os
from typing import Any

import torch

from xlard._images import rgb_array
from xlard._optional import require
from xlard.explain._files import _atomic_write
from xlard.explain._validate import _as_image, _err


def _pillow(fn: str):
    return require("PIL.Image", f"xlard.explain.{fn}")


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
        >>> import torch
        >>> from xlard.explain import overlay, png_bytes
        >>> data = png_bytes(overlay(torch.rand(3, 64, 64), torch.rand(8, 8)))
        >>> data[1:4]   # the PNG signature
        b'PNG'
    """
    image_cls = _pillow("png_bytes")
    arr = _to_uint8_hwc("png_bytes", image)
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(_err("png_bytes", f"image is empty, shape {arr.shape[:2]}"))
    buf = io.BytesIO()
    image_cls.fromarray(arr, mode="RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def save_png(path: str | os.PathLike, image) -> None:
    """Write an image to a PNG file, atomically (temporary file, then rename).

    Args:
        path: the file to write; its folder is created if needed.
        image (Tensor[3, H, W]): float in [0, 1] or uint8 (see :func:`png_bytes`).

    Raises:
        ImportError: Pillow is not installed.
        TypeError, ValueError: not an image.

    Example:
        >>> import os, tempfile, torch
        >>> from xlard.explain import overlay, save_png
        >>> images, lam = torch.rand(2, 3, 64, 64), torch.rand(2, 8, 8)
        >>> out = tempfile.mkdtemp()
        >>> save_png(os.path.join(out, "lam_0.png"), overlay(images[0], lam[0]))
    """
    _atomic_write(path, png_bytes(image))


def read_png(path: str | os.PathLike) -> torch.Tensor:
    """Read a PNG (or any Pillow-readable image) as Tensor[3, H, W] uint8, as a viewer shows it: EXIF
    orientation applied; gray, palette and CMYK images converted to RGB.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a readable image, too large, animated, 16-bit or float pixels, or transparent pixels
            (the RGB under them is whatever the writer left).

    Example:
        >>> import os, tempfile, torch
        >>> from xlard.explain import read_png, save_png
        >>> path = os.path.join(tempfile.mkdtemp(), "lam_0.png")
        >>> save_png(path, torch.rand(3, 48, 64))
        >>> image = read_png(path)
        >>> image.shape, image.dtype
        (torch.Size([3, 48, 64]), torch.uint8)
    """
    image_cls = _pillow("read_png")

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"read_png: no image file at {path}" + (" (a folder)" if os.path.isdir(path) else ""))
    try:
        with image_cls.open(path) as im:
            arr = rgb_array(im, f"read_png: {path}")  # upright, 8-bit, opaque (refusals name the file)
    except image_cls.DecompressionBombError as e:  # Pillow's guard against images too large to decode
        raise ValueError(f"read_png: {path} is too large to read ({e})") from None
    except (OSError, SyntaxError) as e:  # not an image, or a cut one
        raise ValueError(f"read_png: {path} is not a readable image file ({e})") from None
    except ValueError as e:
        if str(e).startswith(f"read_png: {path}: "):  # rgb_array's own refusal: it names the file already
            raise
        raise ValueError(f"read_png: {path} is not a readable image file ({e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
