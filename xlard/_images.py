"""Images a user brings: the rules every reader of a Pillow image applies, in one place.

A picture is judged as a viewer shows it, or refused with a one-line reason naming it:

- **EXIF orientation is honoured.** A photo saved rotated with an Orientation tag (JPEG, or a PNG's eXIf
  chunk) is turned upright first; judged as stored, "left of" became "below".
- **One still image.** An animated GIF / PNG / WebP is refused: only its first frame would be judged.
- **8 bits per channel.** 16-bit and float modes (``I;16``, ``I``, ``F``) are refused: Pillow's conversion to
  RGB clips them (a 16-bit gray picture came out pure white).
- **Opaque.** Transparent pixels are refused (the RGB under them is whatever the writer left, often black:
  a transparent background read as black objects); a fully opaque alpha channel is dropped.

:func:`xlard.shapes.evaluator` applies them with its own stricter channel rules (color images
only); :func:`rgb_array` is what :func:`xlard.explain.read_png` and
:func:`xlard.color_features.as_image_batch` read with.
"""
from __future__ import annotations

from typing import Any

#: Pillow modes with more than 8 bits per channel, or float pixels.
WIDE_MODES = frozenset({"I", "F", "I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;32", "I;32B", "I;32L"})
#: Pillow modes that carry an alpha channel.
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_ORIENTATION = 0x0112


def refuse_animated(im: Any, what: str) -> None:
    """Refuse an animated image (more than one frame): only its first frame would be judged.

    Raises:
        ValueError: naming ``what`` and the frame count.
    """
    frames = getattr(im, "n_frames", 1)
    # a camera JPEG holding a second picture (MPO: a preview, an HDR gain map) shows its first one: no animation
    if isinstance(frames, int) and frames > 1 and getattr(im, "format", None) != "MPO":
        raise ValueError(f"{what}: an animated image ({frames} frames); only one still image can be judged: "
                         "save the frame you mean as a PNG")


def upright(im: Any) -> Any:
    """``im`` turned by its EXIF orientation (a new image), or ``im`` itself when there is nothing to turn.
    Decodes the pixels when it turns them: Pillow's errors for a cut file come from here then."""
    try:
        orientation = im.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: nothing to turn by (Pillow raises several types)
        return im
    if orientation in (None, 1):
        return im
    from PIL import ImageOps

    return ImageOps.exif_transpose(im)


def explicit_alpha(im: Any) -> Any:
    """``im`` with the transparency its metadata declares (a palette's, or a color key's: a PNG tRNS chunk) made an
    alpha band (RGBA, or LA for gray), and a palette image without one expanded to RGB; other images as they are."""
    if "transparency" in im.info and im.mode not in ALPHA_MODES:
        return im.convert("LA" if im.mode == "L" else "RGBA")  # a gray image stays gray
    return im.convert("RGB") if im.mode == "P" else im


def transparent_pixels(what: str) -> ValueError:
    """The refusal of an image with transparent pixels (the RGB under them is whatever the writer left, often
    black: a transparent background would be read as black objects)."""
    return ValueError(f"{what}: has transparent pixels (alpha below 255); only opaque images are judged: save it as "
                      "RGB (composited over the background it was drawn on)")


def rgb_array(im: Any, what: str):
    """An opaque 8-bit Pillow image as a ``uint8 [H, W, 3]`` numpy array (gray, palette and CMYK images are
    converted), as a viewer shows it (:func:`refuse_animated`, :func:`upright`).

    Raises:
        ValueError: animated, 16-bit or float pixels, or transparent pixels.
    """
    import numpy as np

    refuse_animated(im, what)
    im = upright(im)
    if im.mode in WIDE_MODES:
        raise ValueError(f"{what}: expected an 8-bit image, got mode {im.mode} (16-bit or float pixels, which a "
                         "conversion to RGB would clip): save it as 8-bit RGB")
    im = explicit_alpha(im)
    if im.mode in ALPHA_MODES:
        alpha = np.asarray(im.getchannel(im.getbands()[-1]))  # "A", or "a" for premultiplied modes
        if alpha.size and int(alpha.min()) < 255:
            raise transparent_pixels(what)
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
