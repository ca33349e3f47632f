"""The exact GenEval-style evaluator for the shapes world.

Objects are found by pixel analysis alone: every pixel goes to its nearest
color prototype (background included; pixels farther than ``color_cutoff``
from every prototype are ignored), each color's pixels are split into
8-connected components (:func:`xlard.ops.label_components`, one call for all colors), components under ``min_area`` are
dropped as specks, and each remaining component is classified by comparing its
pixels with every shape of the world drawn in the component's own box (best
IoU wins; below ``min_shape_iou``, or with a box longer than ``max_aspect``
times its width, or a "square" spanning the whole image: a background of a
palette color), the blob has no class and is never counted).
On the world's own renders this recovers every object's class, color and box
exactly.

Records are then scored by GenEval's rules (method.md section 9):

- ``include`` items, in order: at least ``count`` objects of the class; if a
  color is asked, ``count`` of the chosen objects have that color; if a
  position ``[relation, j]`` is asked, every chosen object stands in that
  relation to every chosen object of include item ``j`` (which must itself
  have matched), under the centre-offset rule of
  :func:`xlard.shapes.rules.relative_position`.
- ``exclude`` items: fewer than ``count`` objects of the class (this is how
  counting is "exactly n").
- Score = mean over the six tags of each tag's accuracy.

Which objects are "chosen" when there are more than ``count``: GenEval takes
the detector's most confident ones. Here, objects of the class whose color is
the one asked come first, then larger before smaller, then top-to-bottom and
left-to-right. Asking for color is therefore "there are ``count`` objects of
this class and color" (no detector confidence to break ties arbitrarily).
"""
from __future__ import annotations

import numbers
import os
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, TextIO

import numpy as np

from xlard._images import explicit_alpha, refuse_animated, transparent_pixels, upright
from xlard._optional import require

from .prompts import read_jsonl, write_jsonl
from .rules import GENEVAL_COLORS, POSITION_THRESHOLD, RELATIONS, TAGS, relative_position, validate_record
from .world import BACKGROUND, PALETTE, WorldConfig, _config_of, shape_mask

def _label_colors(color_index: np.ndarray, num_colors: int) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components of every color's pixels in one batched call.

    Returns ``(labels int32 [num_colors, H, W], counts int32 [num_colors])``
    from :func:`xlard.ops.label_components` (raster-order labels, 0 = background).
    """
    import torch

    from xlard import ops

    masks = np.stack([color_index == k for k in range(num_colors)])
    labels, counts = ops.label_components(torch.from_numpy(masks), connectivity=8)
    return labels.numpy(), counts.numpy()


@dataclass(frozen=True)
class EvaluatorConfig:
    """How the evaluator reads images.

    Attributes:
        world: the world whose shapes and colors records may name.
        color_cutoff: largest RGB (Euclidean, 0..255 scale) distance from a pixel
            to its nearest prototype for the pixel to count; the world's
            prototypes are >= 97 apart.
        min_area: smallest component kept, as a fraction of the image area
            (0.004 is 16 px at 64x64; the world's smallest object covers ~60 px).
        min_shape_iou: a component whose best shape IoU is lower has no class.
        max_aspect: a component whose box is more elongated than this (long side
            over short side) has no class: the world's shapes are all drawn in
            square frames, and a shape template stretched to a bar would
            otherwise match it.
        position_threshold: GenEval's box-size shrink fraction.
    """

    world: WorldConfig = WorldConfig()
    color_cutoff: float = 60.0
    min_area: float = 0.004
    min_shape_iou: float = 0.6
    max_aspect: float = 2.0
    position_threshold: float = POSITION_THRESHOLD

    def __post_init__(self) -> None:
        for name in ("color_cutoff", "min_area", "min_shape_iou", "max_aspect"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                # None or "60" raised a bare TypeError from the comparisons below; True passed as 1
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not self.color_cutoff > 0:
            raise ValueError(f"color_cutoff must be > 0, got {self.color_cutoff}")
        if not 0.0 <= self.min_area < 1.0:
            raise ValueError(f"min_area must be in [0, 1), got {self.min_area}")
        if not 0.0 < self.min_shape_iou <= 1.0:
            raise ValueError(f"min_shape_iou must be in (0, 1], got {self.min_shape_iou}")
        if not self.max_aspect >= 1.0:
            raise ValueError(f"max_aspect must be >= 1, got {self.max_aspect}")
        t = self.position_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t < 1.0:
            # NaN failed every relation, 5.0 every relation silently, "0.1" raised a TypeError
            raise ValueError(f"position_threshold must be a number in [0, 1) (a share of the image), got {t!r}")
        if not isinstance(self.world, WorldConfig):
            raise ValueError(f"world must be a WorldConfig, got {type(self.world).__name__}")


@dataclass(frozen=True)
class Detection:
    """One object found in an image.

    Attributes:
        shape: the best-matching shape, or ``None`` for an unclassifiable blob.
        color: the color prototype its pixels were assigned to.
        bbox: tight ``(x0, y0, x1, y1)``, exclusive ends.
        area: pixel count.
        shape_iou: IoU with the best shape drawn in ``bbox``.
    """

    shape: str | None
    color: str
    bbox: tuple[int, int, int, int]
    area: int
    shape_iou: float

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.bbox[0] + self.bbox[2]) / 2.0, (self.bbox[1] + self.bbox[3]) / 2.0)

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "bbox": list(self.bbox), "area": self.area,
                "centre": list(self.centre), "shape_iou": round(self.shape_iou, 4)}


@dataclass(frozen=True)
class RecordResult:
    """The verdict on one image for one record.

    Attributes:
        correct: whether every clause of the record holds.
        reason: ``"ok"`` or the failed clauses, GenEval-style, joined by "; ".
        tag: the record's tag.
        prompt: the record's prompt.
        found: a readable summary of what was detected.
        detections: every detection, classified or not.
        record: the record itself.
        filename: the image path, when the image came from a file.
    """

    correct: bool
    reason: str
    tag: str
    prompt: str
    found: str
    detections: tuple[Detection, ...]
    record: Mapping = field(repr=False)
    filename: str | None = None

    def to_dict(self) -> dict:
        """The JSONL row: GenEval's result fields plus what was found."""
        return {"filename": self.filename, "tag": self.tag, "prompt": self.prompt, "correct": self.correct,
                "reason": self.reason, "found": self.found, "metadata": dict(self.record),
                "details": [d.to_dict() for d in self.detections]}


# ---------------------------------------------------------------------------------------------
# Images in


#: The largest image the evaluator reads (pixels): 4096 x 4096. A larger one is refused before it is decoded
#: (a 12000 x 12000 PNG of 0.4 MB took 24 GB and a minute before this bound).
MAX_IMAGE_PIXELS = 4096 * 4096


def _config(fn: str, config) -> "EvaluatorConfig":
    """``config`` checked to be an :class:`EvaluatorConfig` (None: the default one; see
    :func:`xlard.shapes.world._config_of`)."""
    return _config_of(fn, config, EvaluatorConfig,
                      (lambda c: isinstance(c, WorldConfig), "; a world? pass EvaluatorConfig(world=...)"))


def _check_size(height: int, width: int, what: str) -> None:
    if height * width > MAX_IMAGE_PIXELS:
        raise ValueError(f"{what}: {width}x{height} pixels; the evaluator reads images of at most "
                         f"{MAX_IMAGE_PIXELS:,} pixels (4096x4096): downscale it (the shapes world's images are "
                         f"64x64)")


def _from_numpy(image: np.ndarray, what: str) -> np.ndarray:
    if not isinstance(image, np.ndarray):  # None or a list raised "has no attribute 'ndim'"
        raise TypeError(f"{what}: expected a uint8 HxWx3 numpy array, got {type(image).__name__} (paths, tensors and "
                        f"lists of images: load_images() or evaluate_record())")
    if image.ndim != 3 or image.shape[2] != 3:
        hint = " (channels-first? transpose to HxWx3)" if image.ndim == 3 and image.shape[0] == 3 else ""
        raise ValueError(f"{what}: expected an HxWx3 RGB array, got shape {tuple(image.shape)}{hint}")
    if image.dtype != np.uint8:
        raise ValueError(f"{what}: expected dtype uint8 for numpy images, got {image.dtype} "
                         "(floats in [0, 1]: pass (x * 255).round().astype(np.uint8), or a torch tensor)")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{what}: empty image of shape {tuple(image.shape)}")
    _check_size(image.shape[0], image.shape[1], what)
    return np.ascontiguousarray(image)


def _from_file(path: str | os.PathLike) -> np.ndarray:
    image_module = require("PIL.Image", "xlard.shapes.evaluator (reading image files)")
    path = os.fspath(path)
    if not os.path.isfile(path):
        if os.path.exists(path):  # a folder or a FIFO named like an image: it is there, it is not a file
            kind = "a folder" if os.path.isdir(path) else "a special file (FIFO, socket or device)"
            raise ValueError(f"{path}: {kind} named like an image, not an image file")
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with warnings.catch_warnings():  # Pillow's own bomb warning: the size is checked below, before decoding
            warnings.simplefilter("ignore", image_module.DecompressionBombWarning)
            im = image_module.open(path)
    except image_module.DecompressionBombError:  # over twice Pillow's own limit: refused by Pillow on opening
        raise ValueError(f"{path}: larger than {2 * image_module.MAX_IMAGE_PIXELS:,} pixels; the evaluator reads "
                         f"images of at most {MAX_IMAGE_PIXELS:,} pixels (4096x4096): downscale it") from None
    except (OSError, SyntaxError, ValueError) as exc:  # Pillow's "cannot identify" is an OSError
        raise ValueError(f"{path}: not a readable image file ({exc})") from exc
    with im:
        _check_size(im.height, im.width, path)
        refuse_animated(im, path)  # only its first frame would be judged
        try:
            # EXIF orientation applied, as a viewer shows the picture; palettes expanded, declared transparency
            # (a palette's, a tRNS color key's) made an alpha band
            im = explicit_alpha(upright(im))
            mode = im.mode
            raw = np.asarray(im)
        except (OSError, SyntaxError, ValueError) as exc:  # a cut file fails here, when it is decoded
            raise ValueError(f"{path}: not a readable image file ({exc})") from exc
    if raw.dtype != np.uint8:
        raise ValueError(f"{path}: expected an 8-bit image, got {raw.dtype} (mode {mode})")
    if mode not in ("RGB", "RGBA"):
        raise ValueError(f"{path}: expected a 3- or 4-channel color image (RGB or RGBA), got mode {mode} "
                         f"with shape {raw.shape}")
    if mode == "RGBA" and raw.shape[-1] == 4 and bool((raw[:, :, 3] != 255).any()):
        raise transparent_pixels(path)
    return np.ascontiguousarray(raw[:, :, :3])


def _from_torch(tensor: Any, what: str) -> list[np.ndarray]:
    import torch

    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 4 or tensor.shape[1] != 3:
        raise ValueError(f"{what}: expected a tensor [3, H, W] or [B, 3, H, W], got {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"{what}: expected a floating tensor with values in [0, 1], got {tensor.dtype}")
    if tensor.numel() == 0:
        return []
    if tensor.is_meta:
        raise ValueError(f"{what}: a meta tensor holds no pixels (shapes only); pass the decoded images")
    _check_size(int(tensor.shape[-2]), int(tensor.shape[-1]), what)
    t = tensor.detach().to("cpu", torch.float32)
    if not torch.isfinite(t).all():
        raise ValueError(f"{what}: tensor contains NaN or infinity")
    lo, hi = float(t.min()), float(t.max())
    if lo < -1e-3 or hi > 1.0 + 1e-3:
        raise ValueError(f"{what}: values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}] "
                         "(decoder outputs in [-1, 1]: pass (x + 1) / 2)")
    arr = (t.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [np.ascontiguousarray(a) for a in arr]


def load_images(images: Any) -> tuple[list[np.ndarray], list[str | None]]:
    """Turn any accepted image input into RGB uint8 arrays.

    Args:
        images: a PNG path (``str``/``PathLike``), a numpy ``uint8 [H, W, 3]``
            array or ``[B, H, W, 3]`` batch (what :func:`xlard.shapes.backbone.generate`
            returns), a torch tensor ``[3, H, W]`` or ``[B, 3, H, W]`` with values in
            [0, 1], or a list/tuple of these (flattened in order).

    Returns:
        ``(arrays, filenames)``: ``uint8 [H, W, 3]`` arrays and, per array, its
        path or ``None``.

    Raises:
        ValueError / TypeError / FileNotFoundError: with the offending input named.
    """
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    arrays: list[np.ndarray] = []
    names: list[str | None] = []
    for i, item in enumerate(items):
        what = f"image {i}"
        if isinstance(item, (str, os.PathLike)):
            arrays.append(_from_file(item))
            names.append(os.fspath(item))
        elif isinstance(item, np.ndarray) and item.ndim == 4:  # a batch [B, H, W, 3], as generate() returns
            arrays.extend(_from_numpy(a, f"{what}[{k}]") for k, a in enumerate(item))
            names.extend([None] * len(item))
        elif isinstance(item, np.ndarray):
            arrays.append(_from_numpy(item, what))
            names.append(None)
        elif "torch" in sys.modules and isinstance(item, sys.modules["torch"].Tensor):
            batch = _from_torch(item, what)
            arrays.extend(batch)
            names.extend([None] * len(batch))
        else:
            raise TypeError(f"{what}: expected a path, a uint8 [B,]HxWx3 numpy array or a [B,]3xHxW torch "
                            f"tensor, got {type(item).__name__}")
    return arrays, names


# ---------------------------------------------------------------------------------------------
# Objects out


def _prototypes() -> tuple[list[str | None], np.ndarray]:
    names: list[str | None] = [None] + list(GENEVAL_COLORS)
    rgb = np.array([BACKGROUND] + [PALETTE[c] for c in GENEVAL_COLORS], dtype=np.int32)
    return names, rgb


def segment_colors(image: np.ndarray, config: EvaluatorConfig | None = None) -> np.ndarray:
    """Per-pixel color index: ``int8 [H, W]``, -1 for background or too far from any
    prototype, else the index into :data:`xlard.shapes.rules.GENEVAL_COLORS`.

    All ten GenEval colors are prototypes whatever ``config.world.colors`` holds,
    so a pixel of a color the world does not use is still not mistaken for one it does.
    """
    config = _config("segment_colors", config)
    image = _from_numpy(image, "image")
    _, rgb = _prototypes()
    # One prototype at a time (memory H x W, not H x W x 11 x 3: a 4096 x 4096 image needed 2 GB that way);
    # a strict < keeps the first of equally near prototypes, as argmin does.
    pixels = image.astype(np.int32)
    best = np.full(image.shape[:2], np.iinfo(np.int32).max, dtype=np.int32)
    nearest = np.zeros(image.shape[:2], dtype=np.int64)
    for k, proto in enumerate(rgb):
        diff = pixels - proto
        dist2 = np.einsum("hwc,hwc->hw", diff, diff)
        closer = dist2 < best
        best[closer] = dist2[closer]
        nearest[closer] = k
    out = (nearest - 1).astype(np.int8)
    out[(nearest == 0) | (best > config.color_cutoff ** 2)] = -1
    return out


def detect_objects(image: np.ndarray, config: EvaluatorConfig | None = None) -> list[Detection]:
    """Find the objects in one image by color segmentation, components and shape matching.

    Args:
        image: ``uint8 [H, W, 3]`` RGB.
        config: evaluator configuration.

    Returns:
        Detections sorted by color (GenEval order), then top-to-bottom and
        left-to-right; unclassifiable blobs have ``shape=None``.

    Example:
        >>> from xlard.shapes.world import Scene, SceneObject
        >>> img = Scene(64, (SceneObject("circle", "red", (5, 5, 17, 17)),)).render()
        >>> [(d.shape, d.color, d.bbox) for d in detect_objects(img)]
        [('circle', 'red', (5, 5, 17, 17))]
    """
    config = _config("detect_objects", config)
    color_index = segment_colors(image, config)
    h, w = color_index.shape
    min_px = config.min_area * h * w
    found: list[Detection] = []
    all_labels, all_counts = _label_colors(color_index, len(GENEVAL_COLORS))
    for k, color in enumerate(GENEVAL_COLORS):
        labels, count = all_labels[k], int(all_counts[k])
        if count == 0:
            continue
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        for idx, sl in enumerate(_component_slices(labels, count), start=1):
            if sl is None or areas[idx] < min_px or areas[idx] == 0:
                continue
            comp = labels[sl] == idx
            bh, bw = comp.shape
            best_shape, best_iou = None, 0.0
            for shape in config.world.shapes:
                tmpl = shape_mask(shape, bw, bh)
                iou = float((tmpl & comp).sum()) / float((tmpl | comp).sum())
                if iou > best_iou:
                    best_shape, best_iou = shape, iou
            if best_iou < config.min_shape_iou or max(bw, bh) > config.max_aspect * min(bw, bh):
                best_shape = None
            if (bh, bw) == (h, w) and best_shape == "square":
                # a region filling the whole frame is the picture's background (a blank white image held a square);
                # a circle or diamond spanning the frame leaves its corners out and stays an object
                best_shape = None
            box = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
            found.append(Detection(best_shape, color, box, int(areas[idx]), best_iou))
    found.sort(key=lambda d: (GENEVAL_COLORS.index(d.color), d.bbox[1], d.bbox[0]))
    return found


def _component_slices(labels: np.ndarray, count: int) -> list[tuple[slice, slice] | None]:
    """Bounding box of each label ``1..count`` of a ``[H, W]`` label map as ``(rows, cols)`` slices.

    None for a label without pixels. Labels are visited in order, so the
    result lines up with ``range(1, count + 1)``.
    """
    ys, xs = np.nonzero(labels)
    ids = labels[ys, xs]
    big = max(labels.shape) + 1
    y0 = np.full(count + 1, big, np.int64)
    x0 = np.full(count + 1, big, np.int64)
    y1 = np.full(count + 1, -1, np.int64)
    x1 = np.full(count + 1, -1, np.int64)
    np.minimum.at(y0, ids, ys)
    np.minimum.at(x0, ids, xs)
    np.maximum.at(y1, ids, ys)
    np.maximum.at(x1, ids, xs)
    return [None if y1[k] < 0 else (slice(int(y0[k]), int(y1[k]) + 1), slice(int(x0[k]), int(x1[k]) + 1))
            for k in range(1, count + 1)]


def _summary(detections: Sequence[Detection]) -> str:
    if not detections:
        return "nothing"
    counts = Counter((d.color, d.shape or "blob") for d in detections)
    return ", ".join(f"{n} {c} {s}" for (c, s), n in sorted(counts.items(), key=lambda kv: (kv[0][1], kv[0][0])))


def score_record(detections: Sequence[Detection], record: Mapping,
                 position_threshold: float = POSITION_THRESHOLD) -> tuple[bool, list[str]]:
    """Apply GenEval's rules to detections; returns ``(correct, failed clauses)``.

    See the module docstring for the rules and how objects are chosen.

    Args:
        detections: what :func:`detect_objects` returns.
        record: a GenEval record; only ``include`` and ``exclude`` are read (:func:`evaluate_record` checks the
            whole record against the world).
        position_threshold: GenEval's box-size shrink fraction, in [0, 1).

    Raises:
        TypeError: ``detections`` is not a list of :class:`Detection`.
        ValueError: a malformed ``include``/``exclude`` or ``position_threshold``, named.
    """
    detections = _check_scored(detections, record, position_threshold)
    by_class: dict[str, list[Detection]] = {}
    for d in sorted(detections, key=lambda d: (-d.area, d.bbox[1], d.bbox[0])):
        if d.shape is not None:
            by_class.setdefault(d.shape, []).append(d)
    reasons: list[str] = []
    chosen_groups: list[list[Detection] | None] = []
    include = record["include"]
    for req in include:
        cls, count, color = req["class"], req["count"], req.get("color")
        candidates = by_class.get(cls, [])
        if color is not None:
            candidates = [d for d in candidates if d.color == color] + [d for d in candidates if d.color != color]
        chosen = candidates[:count]
        ok = True
        if len(chosen) < count:
            ok = False
            reasons.append(f"expected {cls}>={count}, found {len(candidates)}")
        else:
            if color is not None:
                n_color = sum(d.color == color for d in chosen)
                if n_color < count:
                    ok = False
                    others = Counter(d.color for d in chosen)
                    reasons.append(f"expected {color} {cls}>={count}, found {n_color} {color}; and "
                                   + ", ".join(f"{others[c]} {c}" for c in GENEVAL_COLORS if others[c]))
            if "position" in req and ok:
                rel, target = req["position"]
                target_cls = include[target]["class"]
                if chosen_groups[target] is None:
                    ok = False
                    reasons.append(f"no target for {cls} to be {rel}: {target_cls} (include[{target}]) "
                                   "did not match")
                else:
                    for obj in chosen:
                        for tgt in chosen_groups[target]:
                            rels = relative_position(obj.bbox, tgt.bbox, position_threshold)
                            if rel not in rels:
                                ok = False
                                seen = " and ".join(r for r in RELATIONS if r in rels) or "no clear relation to"
                                reasons.append(f"expected {cls} {rel} {target_cls}, found {cls} {seen} "
                                               f"{target_cls} (at {obj.centre} vs {tgt.centre})")
                                break
                        if not ok:
                            break
        chosen_groups.append(chosen if ok else None)
    for req in record.get("exclude", []):
        cls, count, color = req["class"], req["count"], req.get("color")
        have = [d for d in by_class.get(cls, []) if color is None or d.color == color]
        if len(have) >= count:
            name = f"{color} {cls}" if color else cls
            reasons.append(f"expected {name}<{count}, found {len(have)}")
    return not reasons, reasons


def _check_scored(detections, record, position_threshold) -> list[Detection]:
    """What :func:`score_record` reads, checked: a bare KeyError, "slice indices must be integers" or
    IndexError came from a malformed record, an AttributeError from a dict in place of a Detection, and an
    empty ``include`` was judged correct."""
    fn = "score_record"
    if isinstance(detections, (str, bytes, Mapping, Detection, np.ndarray)) or not isinstance(detections, Iterable):
        raise TypeError(f"{fn}: detections must be a list of Detection (what detect_objects returns), "
                        f"got {type(detections).__name__}")
    detections = list(detections)  # a generator is read once, here
    for i, d in enumerate(detections):
        if not isinstance(d, Detection):
            raise TypeError(f"{fn}: detections[{i}] must be a Detection (what detect_objects returns), "
                            f"got {type(d).__name__}")
    t = position_threshold
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0.0 <= t < 1.0:
        hint = "; an EvaluatorConfig? pass config.position_threshold" if isinstance(t, EvaluatorConfig) else ""
        raise ValueError(f"{fn}: position_threshold must be a number in [0, 1), got {t!r:.80}{hint}")
    if not isinstance(record, Mapping):
        raise ValueError(f"{fn}: record must be a GenEval record (a mapping), got {type(record).__name__}")
    if "include" not in record:
        raise ValueError(f"{fn}: record is missing the key 'include' (has {sorted(map(str, record))[:20]})")
    include, exclude = record["include"], record.get("exclude", [])
    for key, items in (("include", include), ("exclude", exclude)):
        if not isinstance(items, (list, tuple)) or (key == "include" and not items):
            want = "a non-empty list" if key == "include" else "a list"
            raise ValueError(f"{fn}: record[{key!r}] must be {want} of object items, got {items!r:.80}")
        for i, item in enumerate(items):
            where = f"{fn}: record[{key!r}][{i}]"
            if not isinstance(item, Mapping):
                raise ValueError(f"{where} must be a mapping with 'class' and 'count', got {type(item).__name__}")
            cls, count, color = item.get("class"), item.get("count"), item.get("color")
            if not isinstance(cls, str):
                raise ValueError(f"{where}['class'] must be a string, got {cls!r:.80}")
            if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
                raise ValueError(f"{where}['count'] must be an integer >= 1, got {count!r:.80}")
            if color is not None and not isinstance(color, str):
                raise ValueError(f"{where}['color'] must be a string or absent, got {color!r:.80}")
            if "position" in item:
                position = item["position"] if key == "include" else None
                ok = isinstance(position, (list, tuple)) and len(position) == 2 and position[0] in RELATIONS
                target = position[1] if ok else None
                if not ok or isinstance(target, bool) or not isinstance(target, (int, np.integer)) \
                        or not 0 <= target < i:
                    raise ValueError(f"{where}['position'] must be [relation, index of an earlier include item] "
                                     f"(relations {RELATIONS}; only include items have one), "
                                     f"got {item['position']!r:.80}")
    return detections


def evaluate_record(image: Any, record: Mapping, config: EvaluatorConfig | None = None,
                    filename: str | None = None) -> RecordResult:
    """Judge one image against one GenEval record.

    Args:
        image: one image in any form :func:`load_images` accepts.
        record: a GenEval record naming this world's classes and colors.
        config: evaluator configuration.
        filename: recorded in the result (defaults to the path, for file inputs).

    Returns:
        A :class:`RecordResult`.

    Raises:
        ValueError: bad image or malformed record.
    """
    config = _config("evaluate_record", config)
    if isinstance(filename, os.PathLike):
        filename = os.fspath(filename)
    if filename is not None and not isinstance(filename, str):  # a number was kept and broke the JSONL
        raise TypeError(f"evaluate_record: filename must be a str, a path or None, got {type(filename).__name__}")
    arrays, names = load_images(image)
    if len(arrays) != 1:
        raise ValueError(f"evaluate_record takes exactly one image, got {len(arrays)}")
    validate_record(record, classes=config.world.shapes, colors=config.world.colors)
    detections = detect_objects(arrays[0], config)
    correct, reasons = score_record(detections, record, config.position_threshold)
    return RecordResult(correct=correct, reason="ok" if correct else "; ".join(reasons), tag=record["tag"],
                        prompt=record["prompt"], found=_summary(detections), detections=tuple(detections),
                        record=record, filename=filename or names[0])


def evaluate(images: Any, records: Mapping | Sequence[Mapping],
             config: EvaluatorConfig | None = None) -> list[RecordResult]:
    """Judge images against records, pairwise.

    Args:
        images: anything :func:`load_images` accepts (a batch tensor counts as
            its B images).
        records: one record per image, or a single record for all images.
        config: evaluator configuration.

    Returns:
        One :class:`RecordResult` per image.

    Raises:
        ValueError: the numbers of images and records differ, or an input is bad.

    Example:
        >>> from xlard.shapes.prompts import enumerate_records, render_record
        >>> rec = enumerate_records("counting")[1]
        >>> evaluate(render_record(rec, seed=0).render(), rec)[0].correct
        True
    """
    config = _config("evaluate", config)
    if isinstance(records, (str, bytes)) or not isinstance(records, (Mapping, Iterable)):
        # None or 5 raised "not iterable"; a string was taken for one record per letter
        raise TypeError(f"evaluate: records must be a GenEval record (a mapping) or a list of them, "
                        f"got {type(records).__name__}")
    arrays, names = load_images(images)
    if isinstance(records, Mapping):
        records = [records] * len(arrays)
    records = list(records)
    if len(records) != len(arrays):
        raise ValueError(f"got {len(arrays)} images but {len(records)} records; pass one record per image "
                         "or a single record")
    for i, r in enumerate(records):
        validate_record(r, classes=config.world.shapes, colors=config.world.colors, index=i)
    return [evaluate_record(a, r, config, filename=n) for a, r, n in zip(arrays, records, names)]


def png_files(folder: str | Path) -> list[Path]:
    """The PNG images in ``folder`` (``.png`` in any case: ``0000.PNG`` too), sorted by name; dotfiles are not
    images of a run (a writer's temporaries, ``.tmp-*.png``, left by a killed write, were scored as samples)."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() == ".png" and not p.name.startswith("."))


def prompt_folders(folder: str | os.PathLike) -> list[Path]:
    """The prompt folders of a GenEval output folder: its entries named by digits alone (GenEval's ``00000``,
    ``00001``, ...; other entries are not GenEval's and are left alone), in the order of their numbers.

    Raises:
        FileNotFoundError: no such folder.
        ValueError: a digit-named entry that is not a folder holding ``metadata.jsonl`` (a broken link, a removed
            metadata file: it was skipped without a word, its prompt missing from the score).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no such folder: {folder}")
    units = sorted((p for p in folder.iterdir() if re.fullmatch(r"[0-9]+", p.name)), key=lambda p: (int(p.name), p.name))
    for p in units:
        if not (p / "metadata.jsonl").is_file():
            raise ValueError(f"{p}: a prompt folder without a metadata.jsonl file (a broken link, or a file removed?); "
                             "restore it or remove the folder")
    return units


def evaluate_folder(folder: str | os.PathLike, config: EvaluatorConfig | None = None, progress=None
                    ) -> list[RecordResult]:
    """Judge a folder in GenEval's output layout.

    Layout: ``<folder>/<index>/metadata.jsonl`` (the record, one line) and
    ``<folder>/<index>/samples/*.png``; ``<index>`` folders (digits alone, see :func:`prompt_folders`) are read in
    the order of their numbers. Every record is read and checked before any image is judged. ``progress``, when
    given, wraps the prompt folders as they are judged (``progress(iterable, total)``).

    Raises:
        FileNotFoundError: no such folder, or no prompt folders in it.
        ValueError: a prompt folder has no samples or no metadata (scoring the others would report a score over
            a subset of the prompts as if it were all), or a record no image can satisfy.
    """
    from xlard.shapes.prompts import check_satisfiable

    config = _config("evaluate_folder", config)
    folder = Path(folder)
    subdirs = prompt_folders(folder)
    if not subdirs:
        others = sorted(p.name for p in folder.iterdir() if (p / "metadata.jsonl").is_file())
        if others:  # read before 2026-12-07 (stop 50), when any folder holding a metadata.jsonl was a prompt folder
            raise FileNotFoundError(f"{folder}: its prompt folders are not named by numbers (e.g. {others[0]!r}); "
                                    "GenEval numbers them 00000, 00001, ... (the order of the prompt file): rename "
                                    "them so")
        raise FileNotFoundError(f"{folder}: no <index>/metadata.jsonl folders (GenEval layout)")

    samples = {sub: png_files(sub / "samples") if (sub / "samples").is_dir() else [] for sub in subdirs}
    empty = [sub.name for sub in subdirs if not samples[sub]]
    if empty:
        raise ValueError(f"{folder}: {len(empty)} of {len(subdirs)} prompt folders have no samples/*.png "
                         f"(first: {empty[0]}); generate their images or remove those folders")
    records = []
    for sub in subdirs:  # all of them first: a bad record in the last folder was named after the others were judged
        rows = read_jsonl(sub / "metadata.jsonl")
        if len(rows) != 1:
            raise ValueError(f"{sub / 'metadata.jsonl'}: expected one record, got {len(rows)}")
        try:  # named with its file here: evaluate() would say only "record 0"
            validate_record(rows[0], classes=config.world.shapes, colors=config.world.colors)
            check_satisfiable(rows[0], config.world)  # refused as --prompts refuses it, not scored as a failure
        except ValueError as e:
            raise ValueError(f"{sub / 'metadata.jsonl'}: {e}") from None
        records.append(rows[0])
    results: list[RecordResult] = []
    pairs = list(zip(subdirs, records))
    for sub, record in (progress(pairs, len(pairs)) if progress is not None else pairs):
        results.extend(evaluate([str(p) for p in samples[sub]], record, config))
    return results


# ---------------------------------------------------------------------------------------------
# Reports


def summarize(results: Iterable[RecordResult], *, print_table: bool = False,
              file: TextIO | None = None) -> dict:
    """Per-tag accuracy and GenEval's overall score (mean of the task means).

    Args:
        results: per-image results.
        print_table: also print :func:`format_table` of the summary.
        file: where to print (default stdout).

    Returns:
        ``{"tasks": {tag: {"correct", "total", "score"}}, "overall", "correct",
        "total", "missing_tags"}``; ``overall`` averages the tags present (NaN
        when none), and ``missing_tags`` lists the GenEval tags absent.

    Raises:
        ValueError: a result's tag is not one of GenEval's six.
    """
    tasks: dict[str, dict] = {}
    for r in _results("summarize", results):
        if r.tag not in TAGS:
            raise ValueError(f"summarize: result for {r.prompt!r} has tag {r.tag!r}, not a GenEval task; "
                             f"expected one of {TAGS}")
        t = tasks.setdefault(r.tag, {"correct": 0, "total": 0})
        t["total"] += 1
        t["correct"] += int(r.correct)
    order = [t for t in TAGS if t in tasks]
    tasks = {t: {**tasks[t], "score": tasks[t]["correct"] / tasks[t]["total"]} for t in order}
    scores = [v["score"] for v in tasks.values()]
    summary = {
        "tasks": tasks,
        "overall": float(np.mean(scores)) if scores else float("nan"),
        "correct": sum(v["correct"] for v in tasks.values()),
        "total": sum(v["total"] for v in tasks.values()),
        "missing_tags": [t for t in TAGS if t not in tasks],
    }
    if print_table:
        print(format_table(summary), file=file or sys.stdout)
    return summary


def _results(who: str, results) -> list[RecordResult]:
    """``results`` as a list, each a :class:`RecordResult`; else a TypeError naming the first bad one."""
    if isinstance(results, (str, bytes, Mapping)) or not isinstance(results, Iterable):
        raise TypeError(f"{who}: results must be a list of RecordResult (what evaluate() returns), "
                        f"got {type(results).__name__}")
    results = list(results)
    for i, r in enumerate(results):
        if not isinstance(r, RecordResult):
            hint = "; a GenEval record? score images first: evaluate(images, records)" if isinstance(r, Mapping) else ""
            raise TypeError(f"{who}: results[{i}] must be a RecordResult (what evaluate() returns), "
                            f"got {type(r).__name__}{hint}")
    return results


def format_table(summary: Mapping) -> str:
    """A readable table of :func:`summarize`'s output."""
    if not isinstance(summary, Mapping) or not all(k in summary for k in ("tasks", "correct", "total", "overall")):
        hint = ("; per-image results? pass summarize(results)" if isinstance(summary, (list, tuple)) else "")
        raise TypeError(f"format_table: summary must be what summarize() returns (a mapping with tasks, correct, "
                        f"total, overall), got {type(summary).__name__}{hint}")
    lines = [f"{'task':<16}{'correct':>9}{'total':>8}{'score':>9}", "-" * 42]
    for tag, v in summary["tasks"].items():
        lines.append(f"{tag:<16}{v['correct']:>9}{v['total']:>8}{v['score']:>9.4f}")
    lines.append("-" * 42)
    lines.append(f"{'overall':<16}{summary['correct']:>9}{summary['total']:>8}{summary['overall']:>9.4f}")
    lines.append("overall = mean of the task scores")
    if summary.get("missing_tags"):
        lines.append(f"(missing tags, not averaged: {', '.join(summary['missing_tags'])})")
    return "\n".join(lines)


def write_results_jsonl(path: str | os.PathLike, results: Iterable[RecordResult]) -> Path:
    """Write one JSON line per image (:meth:`RecordResult.to_dict`), atomically."""
    return write_jsonl(path, (r.to_dict() for r in _results("write_results_jsonl", results)))


__all__ = [
    "EvaluatorConfig", "Detection", "RecordResult", "load_images", "segment_colors", "detect_objects",
    "score_record", "evaluate_record", "evaluate", "evaluate_folder", "summarize", "format_table",
    "write_results_jsonl", "png_files",
]
