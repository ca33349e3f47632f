"""Latent edit targets for the shapes backbone: what the rewards' explanations ask to change, drawn.

The explainable rewards say *what* is wrong with a sample and *where*: which
found object is surplus, which is missing, which has the wrong color, which
relation is reversed. On the shapes world those verdicts can be acted on
directly, because the world is simple: the editor reads a decoded image with
the dense understanding model (:mod:`xlard.shapes.understanding`, the reward
source's eyes) and redraws it the way the prompt asks, with the world's own
renderer primitives (:func:`xlard.shapes.world.shape_mask`, the palette):

- every found object of an entity is **redrawn** as a clean shape of the
  entity's noun at the same place and size (the backbone draws rounded,
  smeared outlines that are neither one shape nor another), in the asked color
  or, with none asked, its own dominant color;
- **surplus** objects (beyond the asked count; those of another color than
  the asked one first, then the least confident ones) are painted over with
  the background; **missing** ones are drawn at the emptiest free place, at
  the size of the entity's other objects;
- a **reversed or too-weak relation** ("left of", "above", ...) moves the two
  objects apart along its axis, to a quarter and three quarters of the image
  (the nearest free place there: never onto another object; with none, nothing
  moves and an ``unplaced ...`` action says so).

Entities of one noun ("a red circle and a blue circle") share its objects: each
object goes to the entity of its color first, then to one still short of its
count. What is erased around an object never reaches into another found object
or a shape this edit drew.

:func:`edit_targets` then turns the edited images into latent corrections:
the VAE encodes both the decoded and the edited image, and the difference is
kept on the latent cells the edit touched (``target = M * (E(edited) -
E(decoded))``), so an untouched region's correction is exactly zero. The
corrector is warm-started by regressing onto these targets
(:mod:`xlard.train.distill`); at inference it is still one forward pass.

Nothing here reads the exact evaluator (its code or its verdicts); a test
checks that this module does not import :mod:`xlard.shapes.evaluator`.

Example:
    >>> from xlard.shapes.understanding import load_model                 # doctest: +SKIP
    >>> edits = edit_images(load_model(), images, specs)                  # doctest: +SKIP
    >>> edits.images.shape, edits.changed.shape, edits.actions[0]         # doctest: +SKIP
    (torch.Size([B, 3, 64, 64]), torch.Size([B, 64, 64]), ['redrew 2 circle(s)', 'added 1 circle(s)'])
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from xlard.models import copy_cells, move_sources, relation_cells, relation_targets

from .world import BACKGROUND, PALETTE, SHAPES, shape_mask

__all__ = ["EditConfig", "EditedBatch", "changed_something", "edit_image", "edit_images", "edit_targets",
           "find_objects", "move_latents", "move_plan", "MovedBatch", "RELAYOUT_ORDER"]


@dataclass(frozen=True)
class EditConfig:
    """What the editor changes and how.

    Attributes:
        threshold: a pixel belongs to a found object when its shape probability is above this.
        min_area: the smallest object (pixels of the model's map) the editor counts.
        redraw: redraw every found object as a clean shape of its noun.
        fix_count: remove surplus objects and draw missing ones.
        fix_color: give objects of an entity with a color that color.
        fix_position: move the two objects of a relation that does not hold by ``margin`` pixels.
        margin: pixels by which a relation's centres must differ to count as holding.
        placement: where a missing object goes: ``"emptiest"`` (the free place
            farthest from every object) or ``"grid"`` (the first free cell, in
            reading order, of a 3 x 3 grid: a rule that changes less with small
            changes of the image).
        remove: which surplus objects go: ``"weakest"`` (the least confident)
            or ``"last"`` (the last in reading order of their centres).
        draw_size: ``0`` (default): a drawn object copies the size of the
            entity's other objects; ``> 0``: always this side (pixels).
        relayout: for a prompt of one counted entity (GenEval's ``counting``):
            erase every object of the image and draw exactly the asked number at
            fixed cells of a 3 x 3 grid (:data:`RELAYOUT_ORDER`); for a prompt of
            two single objects and one relation (``position``): erase every object
            and draw the two at a quarter and three quarters of the relation's axis,
            centred on the other axis. Both at
            ``draw_size`` (or ``default_size``), in the asked color or else
            ``relayout_color``. The target then depends
            on the prompt and on where the sample's objects are, not on which
            objects are surplus or where a missing one fits (decisions a corrector
            can only average), at the price of the sample's own layout. Off by
            default.
        relayout_color: the color of relaid-out objects whose prompt asks none:
            ``"found"`` (default): the dominant color of the entity's found objects
            (a corrector regressed on such targets averages the colors it is unsure
            of into two-tone objects); a palette color name: always that color.
        min_size, max_size, default_size: side of a drawn object (pixels; the
            default when an entity has no found object to copy the size from).
    """

    threshold: float = 0.5
    min_area: int = 8
    redraw: bool = True
    fix_count: bool = True
    fix_color: bool = True
    fix_position: bool = True
    margin: int = 6
    placement: str = "emptiest"
    remove: str = "weakest"
    draw_size: int = 0
    relayout: bool = False
    relayout_color: str = "found"
    min_size: int = 9
    max_size: int = 20
    default_size: int = 14

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not 0.0 < self.threshold < 1.0:
            raise ValueError(f"EditConfig.threshold must be a number in (0, 1), got {self.threshold!r}")
        if self.placement not in ("emptiest", "grid"):
            raise ValueError(f"EditConfig.placement must be 'emptiest' or 'grid', got {self.placement!r}")
        if self.relayout_color != "found" and self.relayout_color not in PALETTE:
            raise ValueError(f"EditConfig.relayout_color must be 'found' or a palette color ({', '.join(PALETTE)}), "
                             f"got {self.relayout_color!r}")
        if self.remove not in ("weakest", "last"):
            raise ValueError(f"EditConfig.remove must be 'weakest' or 'last', got {self.remove!r}")
        if isinstance(self.draw_size, bool) or not isinstance(self.draw_size, int) or self.draw_size < 0:
            raise ValueError(f"EditConfig.draw_size must be an int >= 0, got {self.draw_size!r}")
        for name in ("min_area", "margin", "min_size", "max_size", "default_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EditConfig.{name} must be an int >= 1, got {value!r}")
        if not self.min_size <= self.default_size <= self.max_size:
            raise ValueError(f"EditConfig: need min_size <= default_size <= max_size, got {self.min_size}, "
                             f"{self.default_size}, {self.max_size}")
        for name in ("redraw", "fix_count", "fix_color", "fix_position", "relayout"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EditConfig.{name} must be a bool, got {getattr(self, name)!r}")


@dataclass
class EditedBatch:
    """The editor's output for a batch.

    Attributes:
        images (Tensor[B, 3, H, W] float32 in [0, 1]): the edited images.
        changed (Tensor[B, H, W] bool): pixels the editor painted.
        actions (list[list[str]]): per image, what was changed, in words (and "unplaced N shape(s): no room left" for
            asked objects there was no free place for).
    """

    images: torch.Tensor
    changed: torch.Tensor
    actions: list[list[str]] = field(default_factory=list)


def _described(value: Any) -> str:
    """What came, for a message: a tensor's or array's dtype and shape, else its type."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"{str(value.dtype).replace('torch.', '')} {type(value).__name__} of shape {tuple(value.shape)}"
    return type(value).__name__


def _check_spec(fn: str, spec: Any, where: str = "spec") -> None:
    from xlard.prompts import PromptSpec

    if not isinstance(spec, PromptSpec):
        hint = " (parse it first: xlard.prompts.parse)" if isinstance(spec, str) else ""
        raise TypeError(f"{fn}: {where} must be a PromptSpec, got {type(spec).__name__}{hint}")


def _check_specs(fn: str, specs: Any) -> None:
    """One PromptSpec per image: a string was taken as its letters, strings as specs failed deep inside."""
    if isinstance(specs, (str, bytes)) or not isinstance(specs, Sequence):
        raise TypeError(f"{fn}: specs must be a sequence of PromptSpec, one per image, got {type(specs).__name__}")
    for i, spec in enumerate(specs):
        _check_spec(fn, spec, f"specs[{i}]")


def _check_vocab(fn: str, shapes: Any, colors: Any) -> None:
    """The model's vocabulary: a string was read letter by letter, an unknown color failed as a KeyError."""
    for name, value, known in (("shapes", shapes, SHAPES), ("colors", colors, tuple(PALETTE))):
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) \
                or not all(isinstance(v, str) for v in value):
            raise TypeError(f"{fn}: {name} must be a sequence of names (the model's config.{name}), got "
                            f"{value!r:.80}")
        unknown = [v for v in value if v not in known]
        if unknown or len(set(value)) != len(value):
            raise ValueError(f"{fn}: {name} must name each of the world's {name} ({', '.join(known)}) at most once, "
                             f"got {list(value)!r:.120}")


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` grown by ``radius`` pixels in the 8-neighbourhood (a ``2 radius + 1`` square; the image's edge
    adds nothing): a max filter, rows then columns, by shifted ORs (at inference, ``count_edit`` runs it a
    dozen times per image)."""
    rows = np.array(mask, dtype=bool, copy=True)
    if radius <= 0:
        return rows
    src = rows.copy()
    for s in range(1, radius + 1):
        rows[s:] |= src[:-s]
        rows[:-s] |= src[s:]
    out = rows.copy()
    for s in range(1, radius + 1):
        out[:, s:] |= rows[:, :-s]
        out[:, :-s] |= rows[:, s:]
    return out


def _box(mask: np.ndarray, grow: int) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)``: the bounding box of ``mask``'s pixels grown by ``grow`` and clipped to
    the image (empty for an empty mask)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if not len(rows):
        return 0, 0, 0, 0
    h, w = mask.shape
    return (max(0, int(rows[0]) - grow), min(h, int(rows[-1]) + 1 + grow),
            max(0, int(cols[0]) - grow), min(w, int(cols[-1]) + 1 + grow))


def find_objects(prob: np.ndarray, threshold: float = 0.5, min_area: int = 8) -> list[tuple[float, np.ndarray]]:
    """Connected components (8-neighbourhood) of ``prob > threshold`` with at least ``min_area`` pixels.

    Args:
        prob (float [H, W]): one noun's shape-probability map.

    Returns:
        ``[(mean probability, bool mask [H, W]), ...]``, most confident first.

    Example:
        >>> p = np.zeros((8, 8), np.float32); p[1:4, 1:4] = 0.9; p[5:8, 5:8] = 0.8
        >>> [round(c, 1) for c, _ in find_objects(p, 0.5, 4)]
        [0.9, 0.8]
    """
    from xlard import ops

    array = np.asarray(prob) if isinstance(prob, (np.ndarray, torch.Tensor)) else None
    # None, a 1-D or 3-D array came back as "no objects", a list as numpy's own error
    if array is None or array.ndim != 2 or array.dtype.kind not in "biuf" or 0 in array.shape:
        raise ValueError(f"find_objects: prob must be a real array [H, W] of probabilities (H, W >= 1), got "
                         f"{getattr(prob, 'shape', type(prob).__name__)}")
    if not bool(np.isfinite(array).all()):  # NaN pixels are background to the components: NaN maps found nothing
        raise ValueError("find_objects: prob holds NaN or infinite values")
    prob = array
    labels, count = ops.label_components(torch.from_numpy(np.ascontiguousarray(prob, dtype=np.float32))[None, None],
                                         threshold=threshold, mode="absolute", min_area=min_area, connectivity=8)
    labels = labels[0, 0].numpy()
    out = []
    for k in range(1, int(labels.max()) + 1):
        m = labels == k
        if m.any():
            out.append((float(prob[m].mean()), m))
    out.sort(key=lambda t: -t[0])
    return out


def _emptiest(occupied: np.ndarray, size: int) -> tuple[int, int] | None:
    """Top-left corner of a ``size`` box whose centre is farthest from every occupied pixel (None: no room);
    of equally far centres, the first in reading order."""
    h, w = occupied.shape
    half = size // 2
    occupied = np.asarray(occupied, dtype=bool)
    if size > h or size > w:
        return None
    ys = np.arange(half, h - size + half + 1)  # the centres of the boxes that fit
    xs = np.arange(half, w - size + half + 1)
    if not occupied.any():  # nothing to touch: the box farthest from the borders (any box that fits)
        d = np.minimum(np.minimum(ys - half, h - ys - half)[:, None], np.minimum(xs - half, w - xs - half)[None, :])
    else:
        # Exact squared distance to the nearest occupied pixel, in two passes: the vertical distance within
        # each column, then the nearest column (d2(y, x) = min over x' of (x - x')^2 + g(y, x')^2), at the
        # centres only and over the columns that hold an occupied pixel (an empty column's g is larger than
        # any distance inside the image). Integer arithmetic: exact, and int32 while the values fit.
        big = 4 * (h + w)
        dt = np.int32 if 5 * (h + w) < 40000 else np.int64
        rows = np.arange(h, dtype=dt)[:, None]
        above = np.maximum.accumulate(np.where(occupied, rows, dt(-big)), axis=0)
        below = np.minimum.accumulate(np.where(occupied, rows, dt(big))[::-1], axis=0)[::-1]
        used = occupied.any(0)
        g = np.minimum(rows - above, below - rows)[ys][:, used]                                  # [ny, w']
        dx = xs.astype(dt)[:, None] - np.arange(w, dtype=dt)[used][None, :]                       # [nx, w']
        d = (dx * dx + (g * g)[:, None, :]).min(axis=2)                                          # [ny, nx] squared
        # Only a box that holds no occupied pixel: the distance above is round, a box is not (the corner of a
        # box whose centre was far enough reached into an object, and the drawn shape merged with it).
        d = np.where(_box_sums(occupied, size) == 0, d, -1)  # (boxes at the centres ys, xs: every box that fits)
        if d.max() < 0:  # every box would touch an object
            return None
    i, j = divmod(int(np.argmax(d)), len(xs))
    return int(ys[i]) - half, int(xs[j]) - half


def _grid_spot(occupied: np.ndarray, size: int) -> tuple[int, int] | None:
    """Top-left corner of the first free cell (reading order) of a 3 x 3 grid of ``size`` boxes, or None."""
    h, w = occupied.shape
    for cy in (h // 6, h // 2, h - h // 6):
        for cx in (w // 6, w // 2, w - w // 6):
            top = max(0, min(cy - size // 2, h - size))
            left = max(0, min(cx - size // 2, w - size))
            if not occupied[top:top + size, left:left + size].any():
                return top, left
    return None


#: Cells of the 3 x 3 grid (row-major index) that ``EditConfig.relayout`` fills, in order:
#: corners and centre first, so that every count from 1 to 9 is spread over the image.
RELAYOUT_ORDER = (0, 8, 2, 6, 4, 1, 7, 3, 5)


def _core_labels(shape_probs: np.ndarray, threshold: float, min_area: int) -> np.ndarray:
    """Connected components (8-neighbourhood, at least ``min_area`` pixels) of the pixels where any shape's
    probability is above ``threshold``, as an int label image (0: none): every object's core, cores of two shapes
    that touch as one."""
    from xlard import ops

    cores = torch.from_numpy(np.ascontiguousarray(shape_probs.max(0) if len(shape_probs) else
                                                  np.zeros(shape_probs.shape[1:]), dtype=np.float32))
    labels, _ = ops.label_components(cores[None, None], threshold=threshold, mode="absolute", min_area=min_area,
                                     connectivity=8)
    return labels[0, 0].numpy()


def _nearest_labels(labels: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """For every pixel, a nearest labelled pixel's label (0: none within ``steps``) and its distance in
    8-neighbour steps (``steps + 1``: none within ``steps``); of equally near labels, the largest."""
    h, w = labels.shape
    near = np.asarray(labels, dtype=np.int32)
    dist = np.where(near > 0, 0, steps + 1).astype(np.int32)
    pad = np.zeros((h + 2, w + 2), np.int32)
    for k in range(1, steps + 1):
        pad[1:-1, 1:-1] = near  # a max filter over the 3 x 3 neighbourhood: rows, then columns
        rows = np.maximum(np.maximum(pad[:-2], pad[1:-1]), pad[2:])
        grown = np.maximum(np.maximum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])
        new = (near == 0) & (grown > 0)
        near = np.where(new, grown, near)
        dist[new] = k
    return near, dist


def _clip_box(h: int, w: int, top: int, left: int, size: int) -> tuple[int, int, int]:
    """``(top, left, size)`` of a ``size`` box at ``(top, left)`` moved (and shrunk) into an ``h x w`` image, as
    the editor draws it (a draw size past the image, draw_size 100 on 64 px, failed to broadcast)."""
    size = min(size, h, w)
    return max(0, min(top, h - size)), max(0, min(left, w - size)), size


def _box_sums(mask: np.ndarray, size: int) -> np.ndarray:
    """How many pixels of ``mask`` every ``size`` box that fits holds, ``[H - size + 1, W - size + 1]`` by its
    top-left corner (an integral image)."""
    h, w = mask.shape
    s = np.zeros((h + 1, w + 1), np.int64)
    s[1:, 1:] = np.asarray(mask, bool).cumsum(0).cumsum(1)
    return s[size:, size:] - s[:h - size + 1, size:] - s[size:, :w - size + 1] + s[:h - size + 1, :w - size + 1]


def _placed_box(h: int, w: int, spot: tuple[int, int], size: int) -> np.ndarray:
    """The pixels of a ``size`` box at ``spot`` (top, left), as :func:`edit_image`'s ``draw`` clips it."""
    top, left, size = _clip_box(h, w, spot[0], spot[1], size)
    box = np.zeros((h, w), bool)
    box[top:top + size, left:left + size] = True
    return box


def _free_spot(blocked: np.ndarray, spot: tuple[int, int], size: int, axis: int, along: int
               ) -> tuple[int, int] | None:
    """The place (top, left) nearest ``spot`` for a ``size`` box holding no ``blocked`` pixel: moved across the
    relation's ``axis`` (0: rows, 1: columns) anywhere, along it by at most ``along`` pixels (the relation still
    holds by far); None when there is none. Boxes are clipped into the image as ``draw`` clips them."""
    h, w = blocked.shape
    top, left, size = _clip_box(h, w, spot[0], spot[1], size)
    inside = _box_sums(blocked, size)
    tops = np.arange(h - size + 1)[:, None]
    lefts = np.arange(w - size + 1)[None, :]
    d_rows, d_cols = np.abs(tops - top), np.abs(lefts - left)
    d_along = d_cols if axis else d_rows
    cost = (d_rows + d_cols).astype(np.float64)
    cost = np.where((inside == 0) & (d_along <= along), cost, np.inf)
    if not np.isfinite(cost).any():
        return None
    i, j = np.unravel_index(int(np.argmin(cost)), cost.shape)
    return int(i), int(j)


def _share_objects(entities, found: dict, colors: Sequence[str], dominant) -> list[list]:
    """Each entity's found objects. Entities of one noun ("a red circle and a blue circle") share that noun's
    objects instead of each taking all of them (each removed the other's circle as surplus, then recolored the
    survivor): an object goes to an entity asking for its color first, then to the first entity still short of its
    count, in confidence order; objects beyond every count go to the entity of their color (else to one that asks
    no color), whose surplus removal takes them, and otherwise to no entity: they stay, as the rewards count them
    for none. An entity asked absent with a color ("no blue squares") takes only objects of that color (a red
    square is allowed: it was erased)."""
    shares: list[list] = [[] for _ in entities]
    groups: dict[str, list[int]] = {}
    for k, e in enumerate(entities):
        if e.noun in found:
            groups.setdefault(e.noun, []).append(k)
    for noun, ks in groups.items():
        objs = found[noun]

        def allowed(k: int, color: str) -> bool:
            e = entities[k]
            return not (e.count == 0 and e.color is not None and e.color != color)
        if len(ks) == 1:
            e = entities[ks[0]]
            shares[ks[0]] = [o for o in objs if allowed(ks[0], colors[dominant(o[1])])] \
                if e.count == 0 and e.color is not None else list(objs)  # (colors read only where they matter)
            continue
        need = {k: entities[k].count if entities[k].count is not None else 1 for k in ks}
        rest = []
        for obj in objs:  # most confident first
            color = colors[dominant(obj[1])]
            match = [k for k in ks if entities[k].color == color and len(shares[k]) < need[k]]
            if match:
                shares[match[0]].append(obj)
            else:
                rest.append((obj, color))
        for obj, color in rest:
            short = [k for k in ks if len(shares[k]) < need[k]]
            same = [k for k in ks if entities[k].color == color]
            # beyond every count: to the entity of its color, or one that asks no color, whose removal takes it;
            # an object of another color counts for no entity (as the rewards read it) and stays
            free = [k for k in ks if entities[k].color is None and entities[k].count != 0]
            if short or same or free:
                shares[(short or same or free)[0]].append(obj)
        for k in ks:  # most confident first again (the removal keeps the first)
            shares[k].sort(key=lambda o: -o[0])
    return shares


def _relayout_spots(h: int, w: int, size: int, n: int) -> list[tuple[int, int]]:
    """Top-left corners of the first ``n`` cells of :data:`RELAYOUT_ORDER` for ``size`` boxes."""
    spots = []
    for cell in RELAYOUT_ORDER[:n]:
        cy, cx = (h // 6, h // 2, h - h // 6)[cell // 3], (w // 6, w // 2, w - w // 6)[cell % 3]
        spots.append((max(0, min(cy - size // 2, h - size)), max(0, min(cx - size // 2, w - size))))
    return spots


@functools.lru_cache(maxsize=512)
def _shape(noun: str, size: int) -> np.ndarray:
    """:func:`xlard.shapes.world.shape_mask`, cached and read-only (the editor draws the same few sizes)."""
    mask = shape_mask(noun, size)
    mask.setflags(write=False)
    return mask


def _check_range(owner: str, what: str, lo: float, hi: float) -> None:
    """Refuse images outside [0, 1] (a little slack for a decoder's overshoot), naming the likely scale."""
    if lo < -0.05 or hi > 1.05:
        hint = " (0..255? divide by 255)" if lo >= 0 else " ([-1, 1]? map it with (x + 1) / 2)" if lo >= -1.05 \
            and hi <= 1.05 else ""
        raise ValueError(f"{owner}: {what} must hold values in [0, 1], got [{lo:.3g}, {hi:.3g}]{hint}")


def _rgb(color: str) -> np.ndarray:
    return np.asarray(PALETTE[color], dtype=np.float32) / 255.0


def edit_image(image: np.ndarray, shape_probs: np.ndarray, color_probs: np.ndarray, spec: Any,
               shapes: Sequence[str], colors: Sequence[str], config: EditConfig | None = None
               ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Redraw one decoded image the way its prompt asks (see the module docstring).

    Args:
        image (float32 [3, H, W] in [0, 1]): the decoded image, at the maps' size.
        shape_probs (float32 [S, H, W]): the understanding model's shape-core probabilities.
        color_probs (float32 [1 + C, H, W]): its color distributions (background first).
        spec: the prompt's :class:`xlard.prompts.PromptSpec`.
        shapes, colors: the model's vocabulary (``config.shapes``, ``config.colors``).
        config: what to change (default :class:`EditConfig()`).

    Returns:
        ``(edited image float32 [3, H, W], changed bool [H, W], actions list[str])``.
        Entities whose noun is not a world shape are left as they are.
    """
    if config is not None and not isinstance(config, EditConfig):
        raise TypeError(f"edit_image: config must be an EditConfig or None, got {type(config).__name__}")
    config = config or EditConfig()
    _check_spec("edit_image", spec)
    _check_vocab("edit_image", shapes, colors)
    img = np.array(image, dtype=np.float32, copy=True)
    if img.ndim != 3 or img.shape[0] != 3 or img.shape[1] < 1 or img.shape[2] < 1:
        raise ValueError(f"edit_image: image must be float32 [3, H, W] with H, W >= 1, got shape {img.shape}")
    _, h, w = img.shape
    shape_probs, color_probs = np.asarray(shape_probs), np.asarray(color_probs)
    want = {"shape_probs": (len(shapes), h, w), "color_probs": (1 + len(colors), h, w)}
    for name, maps in (("shape_probs", shape_probs), ("color_probs", color_probs)):
        if maps.shape != want[name]:  # fewer channels picked colors from the wrong ones, or an IndexError later
            raise ValueError(f"edit_image: {name} must be {list(want[name])} (one map per "
                             f"{'shape' if name == 'shape_probs' else 'color, background first'}, at the image's "
                             f"size), got {list(maps.shape)}")
        if not bool(np.isfinite(maps).all()):  # NaN maps read as empty: objects drawn over the ones there
            raise ValueError(f"edit_image: {name} holds NaN or infinite values")
        if maps.size and (float(maps.min()) < 0.0 or float(maps.max()) > 1.0):  # 0-100 read as sure everywhere
            raise ValueError(f"edit_image: {name} must be probabilities in [0, 1], got values in "
                             f"[{float(maps.min()):.4g}, {float(maps.max()):.4g}]")
    if not bool(np.isfinite(img).all()):
        raise ValueError("edit_image: image holds NaN or infinite values")
    if img.size:  # a 0..255 image came back mixing 0..1 drawn colors into 0..255 pixels
        _check_range("edit_image", "image", float(img.min()), float(img.max()))
    background = np.asarray(BACKGROUND, dtype=np.float32) / 255.0
    changed = np.zeros((h, w), bool)
    drawn = np.zeros((h, w), bool)  # the shapes this edit drew: never erased by a later object's rim
    colored = color_probs[0] < 0.5
    found = {noun: find_objects(shape_probs[shapes.index(noun)], config.threshold, config.min_area)
             for noun in dict.fromkeys(e.noun for e in spec.entities) if noun in shapes and noun in SHAPES}
    # every object's core (1 px inside the object), the prompt's nouns or not, labelled once: what a rim leaves alone
    core_labels = _core_labels(shape_probs, config.threshold, config.min_area)
    # (one blob or none: no other object to keep)
    near_label, near_dist = _nearest_labels(core_labels, 3) if core_labels.max() > 1 else (None, None)

    dominant_of: dict[int, int] = {}  # by the object's mask (alive for the whole call): asked up to four times

    def dominant(m: np.ndarray) -> int:
        """The index (in ``colors``) of object ``m``'s most likely color over its pixels."""
        if id(m) not in dominant_of:
            t0, b0, l0, r0 = _box(m, 0)
            dominant_of[id(m)] = int(color_probs[1:, t0:b0, l0:r0][:, m[t0:b0, l0:r0]].sum(1).argmax())
        return dominant_of[id(m)]
    # Per object, the work below runs on the object's box grown by the widest reach used on it (3 pixels),
    # not on the whole image: the same pixels and values, a few times faster (count_edit runs it at inference).

    def own_rim(m: np.ndarray, color: int, with_extent: bool = False, reach: int = 3
                ) -> tuple[int, int, np.ndarray]:
        """The colored pixels of object ``m`` (a core): those of its extent (the core grown by one pixel) and
        those of its own color (each pixel's most likely color) up to ``reach`` pixels out (its blurred rim); a
        neighbour of another color is left alone (the rim once took 2 pixels off it). With ``with_extent``
        the whole extent too. Never a pixel nearer (in 8-neighbour steps) to another object's core than to
        ``m`` (a same-colored neighbour 1 px away lost 6 pixels), nor one of a shape drawn in this edit
        (another entity's redrawn square lost 10). As ``(top, left, mask)`` of a window of the image."""
        top, bottom, left, right = _box(m, 3)
        win = (slice(top, bottom), slice(left, right))
        sub = m[win]
        rings = [sub, _dilate(sub, 1)]  # the core grown by 0, 1, 2, 3 pixels
        rings += [_dilate(rings[1], 1)]
        rings += [_dilate(rings[2], 1)]
        extent = rings[1]
        own = color_probs[(slice(1, None), *win)].argmax(0) == color
        rim = rings[reach] & colored[win] & (extent | own)
        rim = (rim | extent) if with_extent else rim
        keep = drawn[win]
        if near_label is not None:
            # Another object's pixels: strictly nearer to a core of another component of the cores map (cores of
            # two shapes that touch are one blob; m, connected, lies in one) than to m's core.
            label = core_labels[win][sub]
            label = int(label[0]) if label.size else 0
            d_own = np.full(sub.shape, len(rings), np.int32)
            for k in range(len(rings) - 1, -1, -1):
                d_own[rings[k]] = k
            near = near_label[win]
            keep = keep | ((near != 0) & (near != label) & (near_dist[win] < d_own))
        return top, left, rim & ~keep
    actions: list[str] = []
    placed: list[list[list]] = []  # per entity: [top, left, size, color] of the objects it ends with

    def erase(region: np.ndarray, top: int = 0, left: int = 0) -> None:
        """Paint ``region`` (a mask of the window at ``top, left``; the whole image by default) background."""
        window = (slice(top, top + region.shape[0]), slice(left, left + region.shape[1]))
        img[(slice(None), *window)][:, region] = background[:, None]
        changed[window] |= region
        colored[window] &= ~region

    def draw(noun: str, top: int, left: int, size: int, color: str) -> tuple[int, int]:
        top, left, size = _clip_box(h, w, top, left, size)
        shape = _shape(noun, size)
        img[:, top:top + size, left:left + size][:, shape] = _rgb(color)[:, None]
        t0, l0 = max(0, top - 1), max(0, left - 1)  # the changed pixels: the shape grown by one
        window = np.zeros((min(h, top + size + 1) - t0, min(w, left + size + 1) - l0), bool)
        window[top - t0:top - t0 + size, left - l0:left - l0 + size] = shape
        changed[t0:t0 + window.shape[0], l0:l0 + window.shape[1]] |= _dilate(window, 1)
        colored[top:top + size, left:left + size] |= shape
        drawn[top:top + size, left:left + size] |= shape
        return top, left

    counted = [e for e in spec.entities if e.count is not None]
    if config.relayout and config.fix_count and len(spec.entities) == 1 and len(counted) == 1 \
            and counted[0].noun in shapes and counted[0].noun in SHAPES and 1 <= counted[0].count <= 9:
        entity = counted[0]
        objs = find_objects(shape_probs[shapes.index(entity.noun)], config.threshold, config.min_area)
        if config.fix_color and entity.color in colors and entity.color in PALETTE:
            color = entity.color
        elif config.relayout_color != "found" and config.relayout_color in colors:
            color = config.relayout_color
        elif objs:  # the dominant color over the found objects' pixels
            color = colors[int(sum(color_probs[1:, m].sum(1) for _, m in objs).argmax())]
        else:
            color = colors[0]
        size = config.draw_size or config.default_size
        erase(_dilate(colored, 1))
        for top, left in _relayout_spots(h, w, size, entity.count):
            draw(entity.noun, top, left, size, color)
        return img, changed, [f"relaid out {entity.count} {entity.noun}(s)"]
    relations = tuple(getattr(spec, "relations", ()))
    if config.relayout and config.fix_position and len(spec.entities) == 2 and len(relations) == 1 \
            and all(e.noun in shapes and e.noun in SHAPES and e.count in (None, 1) for e in spec.entities):
        rel = relations[0]
        axis = 1 if rel.relation in ("left_of", "right_of") else 0
        sign = -1 if rel.relation in ("left_of", "above") else 1
        size = config.draw_size or config.default_size
        extent, across = (w, h) if axis else (h, w)
        places = (0.27 * extent, 0.73 * extent) if sign < 0 else (0.73 * extent, 0.27 * extent)
        looks = []
        for entity in spec.entities:
            if config.fix_color and entity.color in colors and entity.color in PALETTE:
                looks.append(entity.color)
            elif config.relayout_color != "found" and config.relayout_color in colors:
                looks.append(config.relayout_color)
            else:
                objs = find_objects(shape_probs[shapes.index(entity.noun)], config.threshold, config.min_area)
                looks.append(colors[int(sum(color_probs[1:, m].sum(1) for _, m in objs).argmax())] if objs
                             else colors[0])
        erase(_dilate(colored, 1))
        mid = int(round(across / 2 - size / 2))
        for k, centre in ((rel.subject, places[0]), (rel.object, places[1])):
            start = int(round(centre - size / 2))
            top, left = (mid, start) if axis else (start, mid)
            draw(spec.entities[k].noun, top, left, size, looks[k])
        return img, changed, [f"relaid out {spec.entities[rel.subject].noun} {rel.relation.replace('_', ' ')} "
                              f"{spec.entities[rel.object].noun}"]

    shares = _share_objects(spec.entities, found, colors, dominant)
    for k, entity in enumerate(spec.entities):
        placed.append([])
        noun = entity.noun if entity.noun in shapes else None
        if noun is None or noun not in SHAPES:
            continue
        objs = shares[k]
        asked = entity.count if entity.count is not None else max(1, len(objs))
        want_color = entity.color if (config.fix_color and entity.color in colors and entity.color in PALETTE) \
            else None
        if config.fix_count and len(objs) > asked:
            if config.remove == "last":  # keep the first ``asked`` in reading order of their centres
                def reading(obj):
                    ys, xs = np.nonzero(obj[1])
                    return (round(ys.mean() / 8), xs.mean())
                objs = sorted(objs, key=reading)
            if entity.color in colors:  # objects of the asked color are kept first ("two red circles" on one
                objs = sorted(objs, key=lambda o: colors[dominant(o[1])] != entity.color)  # blue, two red)
            for _, m in objs[asked:]:
                rim_top, rim_left, rim = own_rim(m, dominant(m), with_extent=True)
                erase(rim, rim_top, rim_left)
            actions.append(f"removed {len(objs) - asked} {noun}(s)")
            objs = objs[:asked]
        sizes, recolored = [], 0
        for _, m in objs:
            t0, b0, l0, r0 = _box(m, 1)
            full = _dilate(m[t0:b0, l0:r0], 1)  # the map marks object cores (eroded by one pixel)
            ys, xs = np.nonzero(full)
            ys, xs = ys + t0, xs + l0
            size = int(max(ys.max() - ys.min(), xs.max() - xs.min())) + 1
            size = max(config.min_size, min(size, config.max_size))
            sizes.append(size)
            own_index = dominant(m)
            own = colors[own_index]
            color = want_color or own
            top, left = int(round(ys.mean())) - size // 2, int(round(xs.mean())) - size // 2
            if config.redraw:
                rim_top, rim_left, rim = own_rim(m, own_index)
                erase(rim, rim_top, rim_left)
                top, left = draw(noun, top, left, size, color)
            elif want_color is not None and own != want_color:
                # its own pixels only (the extent and its own color's rim 2 px out): a touching neighbour of
                # another color lost pixels to a 2 px grown mask
                rim_top, rim_left, rim = own_rim(m, own_index, reach=2)  # (colored pixels only, as before)
                window = (slice(rim_top, rim_top + rim.shape[0]), slice(rim_left, rim_left + rim.shape[1]))
                img[(slice(None), *window)][:, rim] = _rgb(want_color)[:, None]
                changed[window] |= rim
                recolored += 1
            placed[-1].append([top, left, size, color])
        if config.redraw and objs:
            actions.append(f"redrew {len(objs)} {noun}(s)")
        if recolored:
            actions.append(f"colored {recolored} {noun}(s) {want_color}")
        if config.fix_count and len(objs) < asked:
            size = config.draw_size or (int(np.median(sizes)) if sizes else config.default_size)
            # nothing found to copy a color from: the asked one, else the vocabulary's first ("ten green diamonds"
            # got seven red ones)
            asked_color = entity.color if entity.color in colors and entity.color in PALETTE else colors[0]
            color = want_color or (placed[-1][0][3] if placed[-1] else asked_color)
            added = 0
            for _ in range(asked - len(objs)):
                free = _dilate(colored, 2)
                spot = _grid_spot(free, size) if config.placement == "grid" else _emptiest(free, size)
                if spot is None:
                    break
                top, left = draw(noun, spot[0], spot[1], size, color)
                placed[-1].append([top, left, size, color])
                added += 1
            if added:
                actions.append(f"added {added} {noun}(s)")
            if added < asked - len(objs):  # the image is full: said, not left to look like a fixed count
                actions.append(f"unplaced {asked - len(objs) - added} {noun}(s): no room left")

    if config.fix_position:
        for rel in getattr(spec, "relations", ()):
            if rel.subject >= len(placed) or rel.object >= len(placed) or not placed[rel.subject] \
                    or not placed[rel.object] or not spec.places(rel):  # (an entity asked absent: as reader_move)
                continue
            a, b = placed[rel.subject][0], placed[rel.object][0]
            move = relation_targets(rel.relation, (a[0] + a[2] / 2, a[1] + a[2] / 2),
                                    (b[0] + b[2] / 2, b[1] + b[2] / 2), h, w, config.margin)
            if move is None:
                continue
            axis, targets = move
            boxes = []
            for obj in (a, b):
                top, left, size, _ = obj
                box = np.zeros((h, w), bool)
                box[max(0, top - 2):top + size + 2, max(0, left - 2):left + size + 2] = True
                boxes.append(box)
            # The two targets keep one pixel from every other object (a green triangle at the circle's target
            # was painted red and merged with it): the nearest free place (fewest pixels away, rows plus columns).
            blocked = _dilate(colored & ~boxes[0] & ~boxes[1], 1)
            spots = []
            # along the axis each may give way only so far that the relation still holds by the margin
            along = max(0, int((abs(targets[0] - targets[1]) - config.margin - 1) // 2))
            for obj, centre in ((a, targets[0]), (b, targets[1])):
                top, left, size, _ = obj
                start = int(round(centre - size / 2))
                spot = _free_spot(blocked, (start, left) if not axis else (top, start), size, axis, along)
                if spot is None:
                    break
                spots.append(spot)
                blocked = blocked | _dilate(_placed_box(h, w, spot, size), 1)
            if len(spots) < 2:
                actions.append(f"unplaced {spec.entities[rel.subject].noun} {rel.relation.replace('_', ' ')} "
                               f"{spec.entities[rel.object].noun}: no free place to move them to")
                continue
            for box in boxes:
                erase(box & colored)
            for obj, spot, k in ((a, spots[0], rel.subject), (b, spots[1], rel.object)):
                obj[0], obj[1] = draw(spec.entities[k].noun, spot[0], spot[1], obj[2], obj[3])
            actions.append(f"moved {spec.entities[rel.subject].noun} {rel.relation.replace('_', ' ')} "
                           f"{spec.entities[rel.object].noun}")
    return img, changed, actions


def edit_images(model: Any, images: torch.Tensor, specs: Sequence[Any], config: EditConfig | None = None
                ) -> EditedBatch:
    """:func:`edit_image` over a batch, reading it with ``model`` (a ``ShapesUnderstanding``).

    Args:
        model: the understanding model whose maps decide the edits.
        images (Tensor[B, 3, H, W] float in [0, 1]): decoded images; H, W must be
            the model's ``image_size``.
        specs: one prompt spec per image.

    Raises:
        ValueError: mismatched batch, or images not at the model's size.
    """
    if not callable(getattr(model, "predict", None)) or not hasattr(model, "config"):
        raise TypeError(f"edit_images: model must be a ShapesUnderstanding (xlard.shapes.understanding.load_model), "
                        f"got {type(model).__name__}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 \
            or not images.is_floating_point():
        raise ValueError(f"edit_images: images must be a float tensor [B, 3, H, W], got {_described(images)}")
    if images.shape[0] == 0:
        raise ValueError("edit_images: images is an empty batch")
    _check_specs("edit_images", specs)
    if len(specs) != images.shape[0]:
        raise ValueError(f"edit_images: {images.shape[0]} images but {len(specs)} specs")
    if config is not None and not isinstance(config, EditConfig):
        raise TypeError(f"edit_images: config must be an EditConfig or None, got {type(config).__name__}")
    size = model.config.image_size
    if tuple(images.shape[-2:]) != (size, size):
        raise ValueError(f"edit_images: images must be {size}x{size} (the understanding model's size), "
                         f"got {tuple(images.shape[-2:])}")
    lo, hi = (float(v) for v in torch.aminmax(images.detach().float()))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("edit_images: images hold NaN or infinite values")
    _check_range("edit_images", "images", lo, hi)
    with torch.no_grad():
        out = model.predict(images.float())
    src = images.detach().float().cpu().numpy()
    shape_probs, color_probs = out.shape_probs.cpu().numpy(), out.color_probs.cpu().numpy()
    edited, changed, actions = [], [], []
    for i, spec in enumerate(specs):
        img, ch, act = edit_image(src[i], shape_probs[i], color_probs[i], spec, model.config.shapes,
                                  model.config.colors, config)
        edited.append(torch.from_numpy(img))
        changed.append(torch.from_numpy(ch))
        actions.append(act)
    return EditedBatch(torch.stack(edited).clamp(0.0, 1.0), torch.stack(changed), actions)


def touched_cells(changed: torch.Tensor, factor: int, grow: int = 1) -> torch.Tensor:
    """The latent cells under any changed pixel, grown by ``grow`` cells: bool ``[B, 1, H / factor, W / factor]``.

    Args:
        changed (Tensor[B, H, W] bool): :attr:`EditedBatch.changed`.
        factor: image pixels per latent cell along each side (dividing H and W).
        grow: cells added around every touched cell (>= 0).

    Raises:
        ValueError: ``changed`` not ``[B, H, W]``, or a factor that does not divide H and W (the pixels of
            the last partial cell were dropped), or a negative ``grow``.
    """
    if not isinstance(changed, torch.Tensor) or changed.dim() != 3 or changed.dtype != torch.bool:
        raise ValueError(f"touched_cells: changed must be a bool tensor [B, H, W] (the pixels painted), got "
                         f"{_described(changed)}")
    h, w = changed.shape[-2:]
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1 or h % factor \
            or w % factor:
        raise ValueError(f"touched_cells: factor must be an int >= 1 dividing the image's {h} x {w} pixels, got "
                         f"{factor!r}")
    if isinstance(grow, bool) or not isinstance(grow, (int, np.integer)) or grow < 0:
        raise ValueError(f"touched_cells: grow must be an int >= 0, got {grow!r}")
    factor, grow = int(factor), int(grow)
    mask = F.max_pool2d(changed.float()[:, None], factor)
    if grow:
        mask = F.max_pool2d(mask, 2 * grow + 1, 1, grow)
    return mask > 0


def edit_targets(encode: Any, images: torch.Tensor, edited: EditedBatch, latent_shape: Sequence[int],
                 grow: int = 1, z0: torch.Tensor | None = None) -> torch.Tensor:
    """Latent corrections that carry the edits: ``M * (encode(edited) - encode(images))``.

    With ``z0`` (the latents the images were decoded from) the touched cells are
    set to the edited image's encoding instead, ``M * (encode(edited) - z0)``: the
    VAE does not give back ``z0`` from its own decoding (``encode(decode(z0)) !=
    z0``), and for large edits (objects erased and redrawn) the difference form
    leaves what the two encodings disagree on in the image as faint ghosts.

    Args:
        encode: ``images [B, 3, H, W] in [0, 1] -> latents [B, C, h, w]`` (the
            backbone's VAE encoder, scaled like its latents).
        images (Tensor[B, 3, H, W]): the decoded images the edits were made on.
        edited: :func:`edit_images`' output for them.
        latent_shape: ``(C, h, w)`` of the latents.
        grow: latent cells around every touched cell that the target also covers.
        z0 (Tensor[B, C, h, w], optional): the decoded latents; given, the target
            replaces the touched cells (above). Only meaningful for final latents.

    Returns:
        Tensor[B, C, h, w] float32: zero on the cells no edit touched.
    """
    if not callable(encode):
        raise TypeError(f"edit_targets: encode must be a function images -> latents (the backbone's VAE "
                        f"encoder), got {type(encode).__name__}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"edit_targets: images must be a float tensor [B, 3, H, W] in [0, 1], got "
                         f"{_described(images)}")
    if not isinstance(edited, EditedBatch):
        raise TypeError(f"edit_targets: edited must be edit_images()'s EditedBatch, got {type(edited).__name__}")
    if tuple(edited.images.shape) != tuple(images.shape) or edited.changed.shape[0] != images.shape[0]:
        raise ValueError(f"edit_targets: edited holds images of shape {tuple(edited.images.shape)} (changed "
                         f"{tuple(edited.changed.shape)}), images are {tuple(images.shape)}: the edits of another "
                         "batch")
    if isinstance(latent_shape, (str, bytes)) or not isinstance(latent_shape, Sequence) or len(latent_shape) != 3 \
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in latent_shape):
        raise ValueError(f"edit_targets: latent_shape must be (C, h, w), three ints >= 1, got {latent_shape!r}")
    c, lh, lw = (int(v) for v in latent_shape)
    h = images.shape[-1]
    if h % lw or images.shape[-2] % lh:
        raise ValueError(f"edit_targets: image size {tuple(images.shape[-2:])} is not a multiple of the latent "
                         f"size {(lh, lw)}")
    mask = touched_cells(edited.changed, h // lw, grow)
    if z0 is not None and (not isinstance(z0, torch.Tensor) or tuple(z0.shape) != (images.shape[0], c, lh, lw)):
        raise ValueError(f"edit_targets: z0 must be a tensor of shape {(images.shape[0], c, lh, lw)}, got "
                         f"{tuple(z0.shape) if isinstance(z0, torch.Tensor) else type(z0).__name__}")
    with torch.no_grad():
        after = encode(edited.images.to(images.device, images.dtype))
        # (the encoder's device, whatever the images' and z0's: the mask is made on the CPU, where the editor works;
        # in float32, as before: a bfloat16 encoder's output minus a float32 z0 rounded to bfloat16 lost 0.02)
        before = encode(images) if z0 is None else z0
        diff = after.float() - before.to(after.device, torch.float32)
    if tuple(diff.shape) != (images.shape[0], c, lh, lw):
        raise ValueError(f"edit_targets: encode gave latents of shape {tuple(diff.shape)}, expected "
                         f"{(images.shape[0], c, lh, lw)}")
    if not bool(torch.isfinite(diff).all()):  # NaN targets would go straight into the corrector's training
        what = "encode gave NaN or infinite latents" + ("" if z0 is None else " (or z0 holds them)")
        raise ValueError(f"edit_targets: {what}; the targets would not be finite")
    return (mask.to(diff.device, diff.dtype) * diff).float()


@dataclass
class MovedBatch:
    """What :func:`move_plan` did: the moved latents, where each cell came from, the actions per latent.

    Attributes:
        latents (Tensor[B, C, h, w]): ``z0`` with the relation fixes carried out.
        sources (Tensor[B, h*w] int64): for every cell, the flat index of the cell of ``z0``
            it copies (its own index where nothing moved), so that
            ``latents == copy_cells(z0, sources)``.
        actions (list[list[str]]): what was moved, per latent.
        labels (Tensor[B, h*w] int64): the cells of the moved relation's subject (1) and
            object (2), 0 elsewhere; what a corrector's move head learns to label.
        shifts (Tensor[B, 2, 2] int64): the subject's and the object's shift in (rows, columns)
            cells; ``sources == xlard.models.move_sources(labels, shifts, h, w)``.
    """

    latents: torch.Tensor
    sources: torch.Tensor
    actions: list[list[str]] = field(default_factory=list)
    labels: torch.Tensor | None = None
    shifts: torch.Tensor | None = None


def changed_something(actions: Sequence[str]) -> bool:
    """Whether one image's editor actions changed it: "unplaced N circle(s): no room left" says what the editor
    could not do, not an edit (the trainer and the edit-ceiling script count edited items with it)."""
    return any(not str(a).startswith("unplaced ") for a in actions)


def move_latents(z0: torch.Tensor, shape_probs: torch.Tensor, color_probs: torch.Tensor, specs: Sequence[Any],
                 shapes: Sequence[str], margin: int = 6) -> tuple[torch.Tensor, list[list[str]]]:
    """Fix reversed or too-weak relations by *moving latent cells*, not by redrawing pixels.

    The relation rule of :func:`edit_image` (the subject's and the object's most
    confident found objects; a relation that does not hold by ``margin`` pixels
    sends them to a quarter and three quarters of its axis), carried out on the
    latent: each object's cells of ``z0`` are copied, shifted by a whole number
    of cells, and each cell they left copies the nearest cell of neither object
    (nothing is invented: every changed cell is a copy; :func:`xlard.models.move_sources`).
    One relation per prompt (the first that needs a move). The objects keep their own look, since the
    decoder sees the sample's own latent, only elsewhere: a measure of what a
    corrector that can move latent content (rather than paint a residual) could
    do for relations (``scripts/measure_edit_ceiling.py --latent-move``), and the
    move head's targets (:func:`move_plan`, ``distill.move``).

    Args:
        z0 (Tensor[B, C, h, w]): the final latents the images were decoded from.
        shape_probs (Tensor[B, S, H, W]), color_probs (Tensor[B, 1 + C', H, W]):
            the understanding model's maps of the decoded images (H a multiple of h;
            the color maps are only checked for their size).
        specs: one prompt spec per latent.
        shapes: the model's shape vocabulary (``config.shapes``).
        margin: pixels by which a relation must hold to be left as it is.

    Returns:
        ``(moved latents Tensor[B, C, h, w], actions per latent)``: latents with no
        relation to fix come back unchanged.

    Raises:
        ValueError: mismatched batch sizes or map sizes.
    """
    plan = _move_plan("move_latents", z0, shape_probs, color_probs, specs, shapes, margin)
    return plan.latents, plan.actions


def move_plan(z0: torch.Tensor, shape_probs: torch.Tensor, color_probs: torch.Tensor, specs: Sequence[Any],
              shapes: Sequence[str], margin: int = 6) -> MovedBatch:
    """:func:`move_latents` with the source of every cell as well (:class:`MovedBatch`); same arguments."""
    return _move_plan("move_plan", z0, shape_probs, color_probs, specs, shapes, margin)


def _move_plan(owner: str, z0, shape_probs, color_probs, specs, shapes, margin) -> MovedBatch:
    """:func:`move_plan`, its errors naming ``owner`` (the public function called)."""
    if not isinstance(z0, torch.Tensor) or z0.dim() != 4:
        raise ValueError(f"{owner}: z0 must be a tensor [B, C, h, w], got "
                         f"{getattr(z0, 'shape', type(z0).__name__)}")
    b, _, lh, lw = z0.shape
    for name, maps in (("shape_probs", shape_probs), ("color_probs", color_probs)):
        if not isinstance(maps, torch.Tensor) or maps.dim() != 4 or not maps.is_floating_point():
            raise ValueError(f"{owner}: {name} must be a float tensor [B, maps, H, W] (the understanding "
                             f"model's), got {_described(maps)}")
    _check_specs(owner, specs)
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, Sequence) or len(shapes) != shape_probs.shape[1] \
            or not all(isinstance(v, str) for v in shapes):
        raise ValueError(f"{owner}: shapes must name the {shape_probs.shape[1]} maps of shape_probs in order "
                         f"(the model's config.shapes), got {shapes!r:.80}")
    for name, t in (("z0", z0), ("shape_probs", shape_probs), ("color_probs", color_probs)):
        # NaN maps found no objects ("nothing to move", without a word); NaN colors read as the first color
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{owner}: {name} holds NaN or infinite values")
    if shape_probs.shape[0] != b or color_probs.shape[0] != b or len(specs) != b:
        raise ValueError(f"{owner}: {b} latents, {shape_probs.shape[0]} shape maps, {color_probs.shape[0]} "
                         f"color maps and {len(specs)} specs must agree")
    h, w = shape_probs.shape[-2:]
    if color_probs.shape[-2:] != (h, w) or h % lh or w % lw or h // lh != w // lw:
        raise ValueError(f"{owner}: maps {tuple(shape_probs.shape[-2:])} / {tuple(color_probs.shape[-2:])} "
                         f"must share one size, a multiple of the latent's {(lh, lw)}")
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 1:
        raise ValueError(f"{owner}: margin must be an int >= 1, got {margin!r}")
    sp = shape_probs.detach().float().cpu().numpy()
    # the world's colors, when the color maps are the understanding model's (background first)
    palette = tuple(PALETTE) if color_probs.shape[1] == 1 + len(PALETTE) else None
    cp = color_probs.detach().float().cpu().numpy() if palette else None
    labels = torch.zeros(b, lh * lw, dtype=torch.int64)
    shifts = torch.zeros(b, 2, 2, dtype=torch.int64)
    actions: list[list[str]] = []
    for i, spec in enumerate(specs):
        acts: list[str] = []
        # Entities of one noun ("a red circle left of a blue circle") take different objects (both took the most
        # confident one: "moved" was said and nothing moved): first every entity with a color the most confident
        # object of its color, then the others the most confident ones left, in the prompt's order.
        found: list[np.ndarray | None] = [None] * len(spec.entities)
        by_noun: dict[str, list] = {}
        for entity in spec.entities:
            if entity.noun in shapes and entity.noun not in by_noun:
                objs = find_objects(sp[i, list(shapes).index(entity.noun)])
                by_noun[entity.noun] = [(m, palette[int(cp[i][1:, m].sum(1).argmax())] if palette else None)
                                        for _, m in objs]
        for first in (True, False):
            for k, entity in enumerate(spec.entities):
                objs = by_noun.get(entity.noun)
                if not objs or found[k] is not None or (first and (palette is None or entity.color not in palette)):
                    continue
                pick = next((j for j, (_, c) in enumerate(objs) if c == entity.color), None) if first else 0
                if pick is not None:
                    found[k] = objs.pop(pick)[0]
        for rel in getattr(spec, "relations", ()):
            if rel.subject >= len(found) or rel.object >= len(found) or not spec.places(rel):
                continue
            a, o = found[rel.subject], found[rel.object]
            if a is None or o is None:
                continue
            plan = relation_cells(torch.from_numpy(a), torch.from_numpy(o), rel.relation, (lh, lw), margin)
            if plan is None:
                continue
            labels[i], shifts[i] = plan[0].flatten(), plan[1]
            acts.append(f"moved {spec.entities[rel.subject].noun} {rel.relation.replace('_', ' ')} "
                        f"{spec.entities[rel.object].noun} in the latent")
            break  # one relation per prompt: the move head has one subject and one object
        actions.append(acts)
    sources = move_sources(labels, shifts, lh, lw)
    out = copy_cells(z0.detach(), sources.to(z0.device))
    return MovedBatch(out, sources, actions, labels, shifts)
