"""The shapes world: seeded scenes of flat, upright shapes on a plain background.

Everything here is plain numpy. A :class:`Scene` is pure ground truth (image
size plus a tuple of :class:`SceneObject`: shape, color, box); its pixels come
from :meth:`Scene.render`, which is a deterministic function of the scene, so a
scene can be stored as JSON and re-rendered bit-exactly. Shapes are drawn
without anti-aliasing in square frames, and every shape touches all four sides
of its frame, so an object's ground-truth box is exactly the tight box of its
pixels (the evaluator relies on this to be exact).

Layout: objects never overlap; boxes keep ``gap`` empty pixels between them
(so 8-connected components never merge) and ``border`` pixels from the image
edge. Relations ("A left of B") are placed with GenEval's own rule
(:func:`xlard.shapes.rules.relative_position`) at a safety margin, and with
no perpendicular relation holding (a "left of" scene is never also "above").
Objects are placed at random; a scene that random placement does not find
puts the smallest objects in cells of the grid that
:meth:`WorldConfig.capacity` counts (related ones in cells that keep their
relations). :func:`compose_scene` (and so :func:`random_scene` and
:func:`xlard.shapes.prompts.render_record`) lays out at most :data:`MAX_OBJECTS`
objects; :func:`add_object` refuses to add to a scene that holds that many.

Box convention: ``(x0, y0, x1, y1)``, pixel edges, ``x1``/``y1`` exclusive; x
right, y down (see :mod:`xlard.shapes.rules`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from .rules import GENEVAL_COLORS, RELATIONS, relation_strength, relative_position

SHAPES = ("circle", "square", "triangle", "diamond")
"""Shape classes. Triangles point up; diamonds are squares standing on a corner."""

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (250, 130, 15),
    "yellow": (240, 230, 50),
    "green": (40, 165, 60),
    "blue": (40, 80, 225),
    "purple": (140, 55, 195),
    "pink": (250, 150, 205),
    "brown": (125, 70, 25),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
}
"""RGB prototypes of GenEval's ten colors. Every pair, and every color against
the background, is at least 97 apart in RGB (Euclidean), so nearest-prototype
segmentation has a wide berth."""

BACKGROUND = (128, 128, 128)
"""Mid gray: far from both black and white, so all ten GenEval colors fit."""

assert tuple(PALETTE) == GENEVAL_COLORS

Rng = np.random.Generator

MAX_OBJECTS = 128
"""Most objects :func:`compose_scene` (and so :func:`random_scene` and
:func:`xlard.shapes.prompts.render_record`) lays out in one scene, whatever
:meth:`WorldConfig.capacity` says: a tiny ``min_size`` in a 4096 px world holds
342,225 objects, and a random layout of that many took hours (the worst case up
to this bound, a world just too small for random placement of 128 objects,
takes 1 to 2 s on one CPU core)."""


def as_rng(seed: int | Rng | None) -> Rng:
    """A numpy Generator from a seed (int), an existing Generator, or None (seed 0)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        seed = 0
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int or a numpy Generator, got {seed!r}")
    return np.random.default_rng(int(seed))


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _type(value) -> str:
    return "the class itself" if isinstance(value, type) else type(value).__name__


def _config_of(fn: str, config, cls: type, other=None, arg: str = "config"):
    """``config`` checked to be a ``cls`` instance (None: ``cls()``), else a TypeError with a hint: a mapping to
    build it from, the class itself to call, or ``other``: ``(is_other(config), hint)`` for a config of the other
    kind and what to pass instead. ``arg`` is the argument's name in the message.

    A dict, the other config or the class itself failed later with a bare AttributeError, and a falsy wrong
    value (``{}``, ``0``) silently became the default config."""
    if config is None:
        return cls()
    if not isinstance(config, cls):
        name = cls.__name__
        hint = ""
        if isinstance(config, Mapping):
            hint = f"; build it first: {name}(**mapping)"
        elif other is not None and other[0](config):
            hint = other[1]
        elif config is cls:
            hint = f"; call it: {name}()"
        article = "an" if name[0] in "AEIOU" else "a"
        raise TypeError(f"{fn}: {arg} must be {article} {name} or None, got {_type(config)}{hint}")
    return config


def _world(fn: str, config, arg: str = "config") -> "WorldConfig":
    """``config`` checked to be a :class:`WorldConfig` (None: ``WorldConfig()``); a config that holds one in its
    ``.world`` (an evaluator's, the prompts') is named in the hint."""
    # told by its .world (this module must not import the evaluator or the prompts)
    kind = type(config).__name__
    hint = ("; an evaluator's config? pass its .world" if kind == "EvaluatorConfig"
            else f"; a {kind} holds its world in .world: pass that")
    return _config_of(fn, config, WorldConfig,
                      (lambda c: isinstance(getattr(c, "world", None), WorldConfig), hint), arg)


def _scene(fn: str, scene) -> "Scene":
    if not isinstance(scene, Scene):
        hint = "; load it first: Scene.from_dict(mapping)" if isinstance(scene, Mapping) else ""
        raise TypeError(f"{fn}: scene must be a Scene, got {_type(scene)}{hint}")
    return scene


def _sequence_of(fn: str, name: str, value, kind: type, hint: str = "") -> list:
    """``value`` as a list of ``kind``: a list or tuple (any sequence but a string) of them, else a TypeError."""
    a_kind = ("an " if kind.__name__[0] in "AEIOU" else "a ") + kind.__name__
    if isinstance(value, kind):
        raise TypeError(f"{fn}: {name} must be a list of {kind.__name__}, got a single {kind.__name__}; wrap it: "
                        f"[{name[:-1] if name.endswith('s') else name}]")
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise TypeError(f"{fn}: {name} must be a list of {kind.__name__}, got {_type(value)}{hint}")
    for i, item in enumerate(value):
        if not isinstance(item, kind):
            raise TypeError(f"{fn}: {name}[{i}] must be {a_kind}, got {_type(item)} {item!r:.80}")
    return list(value)


def _index(fn: str, scene: "Scene", index) -> int:
    if not _is_int(index):  # None or '1' raised a bare TypeError, 1.5 a slicing error; True removed object 1
        raise TypeError(f"{fn}: index must be an integer in [0, {len(scene.objects)}), got {index!r}")
    if not 0 <= index < len(scene.objects):
        raise IndexError(f"object index {index} out of range for {len(scene.objects)} objects")
    return int(index)


def shape_mask(shape: str, width: int, height: int | None = None) -> np.ndarray:
    """Rasterize one shape filling a ``width`` x ``height`` frame (no anti-aliasing).

    Pixels are sampled at their centres in normalized frame coordinates. In a
    square frame (the only frame the world draws in) every shape touches all
    four sides of the frame, so the tight box of the mask is the whole frame.
    Non-square frames stretch the shape (the evaluator uses this to compare a
    found blob with each shape in the blob's own box); there the outline can
    pass between two pixel centres, and a frame whose even side is the shorter
    one leaves a triangle's apex row or a diamond's extreme rows or columns
    empty (a 6 wide, 7 high triangle or diamond has an empty top row). These
    templates are kept as they are: the evaluator's reported scores were
    measured with them.

    Args:
        shape: one of :data:`SHAPES`.
        width: frame width in pixels (>= 1).
        height: frame height in pixels (default: ``width``).

    Returns:
        ``bool`` array ``[height, width]``.

    Raises:
        ValueError: unknown shape or non-positive size.

    Example:
        >>> bool(shape_mask("square", 3).all())
        True
    """
    height = width if height is None else height
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if not _is_int(width) or not _is_int(height) or width < 1 or height < 1:  # 3.5 gave a 4x4 mask with empty edges
        raise ValueError(f"shape frame must be integers of at least 1x1, got {width!r}x{height!r}")
    u = (np.arange(width) + 0.5) / width - 0.5  # in (-0.5, 0.5), x right
    v = (np.arange(height) + 0.5) / height - 0.5  # y down
    uu, vv = np.meshgrid(u, v)
    eps = 1e-9  # the extreme pixel centres sit exactly on the outline
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    if shape == "circle":
        return uu * uu + vv * vv <= 0.25 + eps
    if shape == "triangle":
        # Apex at the top centre, base along the bottom; a row is filled up to
        # the outline's width at the row's lower edge so that the apex row is
        # never empty.
        row_bottom = vv + 0.5 + 0.5 / height
        return np.abs(uu) <= 0.5 * row_bottom + eps
    # diamond
    return np.abs(uu) + np.abs(vv) <= 0.5 + eps


@dataclass(frozen=True)
class SceneObject:
    """One object's exact ground truth.

    Attributes:
        shape: one of :data:`SHAPES`.
        color: one of :data:`PALETTE`.
        bbox: ``(x0, y0, x1, y1)``, pixel edges, exclusive ends, square
            (``x1 - x0 == y1 - y0``; other boxes are refused); also the tight
            box of the object's pixels.
    """

    shape: str
    color: str
    bbox: tuple[int, int, int, int]

    def __post_init__(self) -> None:
        if not isinstance(self.shape, str) or self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if not isinstance(self.color, str) or self.color not in PALETTE:  # a set raised "unhashable type"
            raise ValueError(f"unknown color {self.color!r}; expected one of {tuple(PALETTE)}")
        if not isinstance(self.bbox, (tuple, list)) or not all(_is_int(v) for v in self.bbox):
            # (0.5, 0, 3.7, 3) was truncated to (0, 0, 3, 3) without a word
            raise ValueError(f"bbox must be four integers (x0, y0, x1, y1), got {self.bbox!r}")
        box = tuple(int(v) for v in self.bbox)
        if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f"bbox must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {self.bbox!r}")
        if box[2] - box[0] != box[3] - box[1]:
            # a 6 wide, 7 high triangle left its top row empty: its box was not the tight box of its pixels
            raise ValueError(f"bbox must be square (the world draws every shape in a square frame, which it fills), "
                             f"got {box[2] - box[0]}x{box[3] - box[1]} {self.bbox!r}")
        object.__setattr__(self, "bbox", box)

    @property
    def width(self) -> int:
        return self.bbox[2] - self.bbox[0]

    @property
    def height(self) -> int:
        return self.bbox[3] - self.bbox[1]

    @property
    def centre(self) -> tuple[float, float]:
        """Box centre ``(x, y)`` in pixels (what GenEval's position rule compares)."""
        return ((self.bbox[0] + self.bbox[2]) / 2.0, (self.bbox[1] + self.bbox[3]) / 2.0)

    def mask(self) -> np.ndarray:
        """``bool [height, width]`` mask of the object inside its box."""
        return shape_mask(self.shape, self.width, self.height)

    @property
    def area(self) -> int:
        """Number of pixels the object covers."""
        return int(self.mask().sum())

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "bbox": list(self.bbox),
                "centre": list(self.centre), "area": self.area}

    @classmethod
    def from_dict(cls, d: Mapping) -> "SceneObject":
        _check_keys("SceneObject.from_dict", d, ("shape", "color", "bbox"))
        bbox = d["bbox"]
        if isinstance(bbox, np.ndarray):  # stored by numpy-based tools: its ints, as a list's
            bbox = bbox.tolist()
        if isinstance(bbox, (list, tuple)):
            bbox = tuple(_whole(v) for v in bbox)
        return cls(shape=d["shape"], color=d["color"], bbox=bbox)


def _whole(value):
    """A whole float (64.0 from JSON or another tool, np.float64(64)) as its int; anything else unchanged, for
    the constructors to check (8.7 and "8" are refused there, not rounded)."""
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return value


def _check_keys(fn: str, d, keys: Sequence[str]) -> None:
    """``d`` is a mapping holding ``keys`` (None gave "not subscriptable", {} a bare KeyError)."""
    if not isinstance(d, Mapping):
        raise TypeError(f"{fn}: expected a mapping (what to_dict() returns), got {_type(d)}")
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"{fn}: the mapping is missing the key(s) {missing} (has {sorted(map(str, d))[:20]})")


def _boxes_clear(a: Sequence[int], b: Sequence[int], gap: int) -> bool:
    """True when boxes a and b are at least ``gap`` empty pixels apart on some axis."""
    return (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _first_overlap(boxes: Sequence[Sequence[int]]) -> tuple[int, int] | None:
    """The first pair ``(i, j)``, ``j < i``, of boxes that share a pixel (smallest ``i``, then smallest ``j``), or
    None. Small lists are checked pair by pair; longer ones with numpy, a block of rows at a time (a Python double
    loop took seconds for a thousand objects)."""
    n = len(boxes)
    if n <= 32:
        for i in range(n):
            for j in range(i):
                if not _boxes_clear(boxes[i], boxes[j], 0):
                    return i, j
        return None
    arr = np.asarray(boxes, dtype=np.int64)
    for start in range(0, n, 256):
        stop = min(n, start + 256)
        a, b = arr[start:stop, None, :], arr[None, :stop, :]
        hit = (a[..., 0] < b[..., 2]) & (b[..., 0] < a[..., 2]) & (a[..., 1] < b[..., 3]) & (b[..., 1] < a[..., 3])
        hit &= np.arange(start, stop)[:, None] > np.arange(stop)[None, :]
        if hit.any():
            i, j = np.argwhere(hit)[0]  # row-major: the smallest i, then its smallest j
            return start + int(i), int(j)
    return None


@dataclass(frozen=True)
class Scene:
    """A scene: image size, background and objects, all exact.

    Attributes:
        image_size: the image is ``image_size x image_size`` pixels.
        objects: the objects, in drawing order (they never overlap).
        background: background RGB.
    """

    image_size: int
    objects: tuple[SceneObject, ...] = ()
    background: tuple[int, int, int] = BACKGROUND

    def __post_init__(self) -> None:
        if isinstance(self.objects, SceneObject) or isinstance(self.objects, (str, bytes, Mapping)) \
                or not isinstance(self.objects, Iterable):
            # None or 5 raised "not iterable"; a lone SceneObject the same
            hint = "; wrap one object in a tuple: (obj,)" if isinstance(self.objects, SceneObject) else ""
            raise TypeError(f"Scene.objects must be a tuple of SceneObject, got {_type(self.objects)}{hint}")
        object.__setattr__(self, "objects", tuple(self.objects))
        if not _is_int(self.image_size) or self.image_size < 1:
            raise ValueError(f"Scene.image_size must be an integer >= 1, got {self.image_size!r}")
        object.__setattr__(self, "image_size", int(self.image_size))  # np.int64 made to_dict() unfit for JSON
        bg = tuple(self.background) if isinstance(self.background, (tuple, list)) else None
        if bg is None or len(bg) != 3 or not all(_is_int(c) and 0 <= c <= 255 for c in bg):
            raise ValueError(f"Scene.background must be three integers in [0, 255] (RGB), got {self.background!r}")
        object.__setattr__(self, "background", tuple(int(c) for c in bg))
        size = self.image_size
        for i, obj in enumerate(self.objects):
            if not isinstance(obj, SceneObject):
                raise TypeError(f"objects[{i}] must be a SceneObject, got {type(obj).__name__}")
            x0, y0, x1, y1 = obj.bbox
            if x0 < 0 or y0 < 0 or x1 > size or y1 > size:
                raise ValueError(f"objects[{i}] box {obj.bbox} leaves the {size}x{size} image")
        pair = _first_overlap([o.bbox for o in self.objects])
        if pair is not None:
            i, j = pair
            raise ValueError(f"objects[{i}] {self.objects[i].bbox} overlaps objects[{j}] {self.objects[j].bbox}")

    def render(self) -> np.ndarray:
        """The image: ``uint8 [image_size, image_size, 3]`` RGB.

        Example:
            >>> Scene(8, (SceneObject("square", "red", (0, 0, 2, 2)),)).render()[0, 0].tolist()
            [215, 35, 35]
        """
        img = np.empty((self.image_size, self.image_size, 3), dtype=np.uint8)
        img[:] = self.background
        for obj in self.objects:
            x0, y0, x1, y1 = obj.bbox
            img[y0:y1, x0:x1][obj.mask()] = PALETTE[obj.color]
        return img

    def label_map(self) -> np.ndarray:
        """``int32 [H, W]``: 0 for background, ``i + 1`` where object ``i`` is drawn."""
        out = np.zeros((self.image_size, self.image_size), dtype=np.int32)
        for i, obj in enumerate(self.objects):
            x0, y0, x1, y1 = obj.bbox
            out[y0:y1, x0:x1][obj.mask()] = i + 1
        return out

    def count(self, shape: str | None = None, color: str | None = None) -> int:
        """How many objects match the given shape and/or color.

        A name the world never draws (a GenEval class such as "dog") counts 0.

        Raises:
            TypeError: ``shape`` or ``color`` is neither None nor a string.
        """
        for name, value in (("shape", shape), ("color", color)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"Scene.count: {name} must be None or a name, got {value!r:.80}")
        return sum((shape is None or o.shape == shape) and (color is None or o.color == color)
                   for o in self.objects)

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "background": list(self.background),
                "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Scene":
        _check_keys("Scene.from_dict", d, ("image_size", "objects"))
        objects = d["objects"]
        if isinstance(objects, (str, bytes, Mapping)) or not isinstance(objects, (list, tuple)):
            raise TypeError(f"Scene.from_dict: 'objects' must be a list of object mappings, got {_type(objects)}")
        # image_size and background go to the constructor as they are, to be checked there: int() turned
        # 8.7 into 8 and "8" into 8 without a word, and None raised a bare TypeError
        return cls(image_size=_whole(d["image_size"]),
                   objects=tuple(SceneObject.from_dict(o) for o in objects),
                   background=d.get("background", BACKGROUND))


@dataclass(frozen=True)
class WorldConfig:
    """What the world may draw and how objects are laid out.

    Attributes:
        image_size: square image side in pixels (>= 32).
        shapes: shape classes in use (a subset of :data:`SHAPES`).
        colors: color names in use (a subset of :data:`PALETTE`).
        min_size: smallest object side as a fraction of ``image_size``.
        max_size: largest object side as a fraction of ``image_size``.
        fill: objects' total frame area (with gaps) aimed at, as a fraction of
            the image; caps the object size when there are many objects.
        gap: empty pixels kept between any two object boxes (>= 1 keeps
            8-connected components apart).
        border: empty pixels kept between objects and the image edge.
        position_margin: normalized offset (GenEval's ``d``) at least this large
            along a relation's axis in placed relations; must exceed 0.5, the
            rule's own cutoff, so that rendered relations are unambiguous.
        max_attempts: layout restarts before giving up.

    Integer fields are stored as Python ints (a numpy int is accepted and
    converted, so scenes stay JSON-ready). A world must have room for at least
    two objects (:meth:`capacity`), else a ValueError names ``border``, ``gap``
    and ``min_size``.
    """

    image_size: int = 64
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = GENEVAL_COLORS
    min_size: float = 0.14
    max_size: float = 0.25
    fill: float = 0.35
    gap: int = 2
    border: int = 1
    position_margin: float = 0.7
    max_attempts: int = 400

    def __post_init__(self) -> None:
        for name, known in (("shapes", SHAPES), ("colors", tuple(PALETTE))):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                # None or 5 raised "not iterable"; "circle" was split into its letters (a mapping such as
                # PALETTE gives its keys, as before)
                raise ValueError(f"{name} must be a list of >= 2 distinct names from {known}, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not _is_int(self.image_size) or not 32 <= self.image_size <= 4096:
            # (the exact evaluator reads images up to 4096 x 4096)
            raise ValueError(f"image_size must be an int in [32, 4096], got {self.image_size!r}")
        object.__setattr__(self, "image_size", int(self.image_size))  # np.int64 went on into every Scene
        bad = [s for s in self.shapes if not isinstance(s, str) or s not in SHAPES]
        if bad or len(set(self.shapes)) < 2 or len(set(self.shapes)) != len(self.shapes):
            raise ValueError(f"shapes must be >= 2 distinct names from {SHAPES}, got {self.shapes!r}")
        bad = [c for c in self.colors if not isinstance(c, str) or c not in PALETTE]  # a list was unhashable
        if bad or len(set(self.colors)) < 2 or len(set(self.colors)) != len(self.colors):
            raise ValueError(f"colors must be >= 2 distinct names from {tuple(PALETTE)}, got {self.colors!r}")
        for name in ("min_size", "max_size", "position_margin", "fill"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name, low in (("gap", 1), ("border", 0), ("max_attempts", 1)):
            if not _is_int(getattr(self, name)) or getattr(self, name) < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {getattr(self, name)!r}")
            object.__setattr__(self, name, int(getattr(self, name)))
        if not 0.0 < self.min_size <= self.max_size <= 0.5:
            raise ValueError(f"need 0 < min_size <= max_size <= 0.5, got {self.min_size}, {self.max_size}")
        if self.min_px < 5:
            raise ValueError(f"min_size {self.min_size} gives objects of {self.min_px} px at "
                             f"{self.image_size} px; shapes need >= 5 px to stay recognizable")
        if self.gap < 1 or self.border < 0:
            raise ValueError(f"need gap >= 1 and border >= 0, got gap={self.gap}, border={self.border}")
        if not 0.5 < self.position_margin < 1.0:
            raise ValueError(f"position_margin must be in (0.5, 1), got {self.position_margin}")
        if not 0.0 < self.fill <= 1.0:
            raise ValueError(f"fill must be in (0, 1], got {self.fill}")
        if self.capacity() < 2:
            # border=40 left no room at all, and min_size=0.5 room for one object: every scene of two failed later,
            # with errors that never named border, gap or min_size
            raise ValueError(f"this world holds {self.capacity()} object(s): a {self.image_size}px image with "
                             f"border={self.border}, gap={self.gap} and objects of min_size={self.min_size} "
                             f"({self.min_px}px); it must hold at least 2 (lower border, gap or min_size)")

    @property
    def min_px(self) -> int:
        return int(round(self.min_size * self.image_size))

    @property
    def max_px(self) -> int:
        return max(self.min_px, int(round(self.max_size * self.image_size)))

    def capacity(self) -> int:
        """Most objects one image can hold: smallest objects, ``gap`` apart, on a grid inside the border.

        A layout of more objects cannot exist, so :func:`compose_scene` refuses
        it at once instead of searching (or building a list of a billion objects).
        A square number, at least 4 (a world with room for fewer than 2 objects is
        refused when it is made). A scene is further limited to :data:`MAX_OBJECTS`
        objects (:meth:`max_objects`).
        """
        per_axis = (self.image_size - 2 * self.border + self.gap) // (self.min_px + self.gap)
        return max(per_axis, 0) ** 2

    def max_objects(self) -> int:
        """Most objects :func:`compose_scene` lays out in one scene: :meth:`capacity`, at most :data:`MAX_OBJECTS`."""
        return min(self.capacity(), MAX_OBJECTS)

    def size_cap(self, n_objects: int) -> int:
        """Largest object side when ``n_objects`` share the image."""
        per = math.sqrt(self.fill * self.image_size ** 2 / max(n_objects, 1)) - self.gap
        return int(min(self.max_px, max(self.min_px, math.floor(per))))


@dataclass(frozen=True)
class ObjectGroup:
    """``count`` objects of one shape; ``color=None`` draws each object's color at random."""

    shape: str
    count: int = 1
    color: str | None = None


@dataclass(frozen=True)
class Relation:
    """Every object of group ``subject`` is ``relation`` of every object of group ``target``."""

    subject: int
    relation: str
    target: int


def _relation_clear(subject_box, target_box, relation: str, margin: float) -> bool:
    """The relation holds at ``margin`` and neither perpendicular relation holds at all."""
    if relation_strength(subject_box, target_box, relation) < margin:
        return False
    across = ("above", "below") if relation in ("left of", "right of") else ("left of", "right of")
    return not relative_position(subject_box, target_box) & set(across)


def _relations_ok(box, group: int, placed: list[tuple[int, tuple]], relations: Sequence[Relation],
                  margin: float) -> bool:
    if not any(rel.subject == group or rel.target == group for rel in relations):
        return True  # (the same answer as the loops below, without visiting every placed object)
    for rel in relations:
        for other_group, other_box in placed:
            if rel.subject == group and rel.target == other_group:
                if not _relation_clear(box, other_box, rel.relation, margin):
                    return False
            elif rel.target == group and rel.subject == other_group:
                if not _relation_clear(other_box, box, rel.relation, margin):
                    return False
    return True


#: From this many placed objects on, :func:`_try_place` checks its tries with numpy (the same draws, the same
#: answer; below it a Python loop is faster).
_BATCH_FROM = 24


def _try_place(size: int, group: int, placed: list[tuple[int, tuple]], relations: Sequence[Relation],
               config: WorldConfig, rng: Rng, tries: int,
               boxes: np.ndarray | None = None) -> tuple[int, int, int, int] | None:
    """A random ``size`` box clear of ``placed`` (``boxes``: their boxes as an ``int64 [len(placed), 4]`` array,
    when the caller keeps one) and keeping ``relations``, from up to ``tries`` random corners; None if none."""
    lo = config.border
    hi = config.image_size - config.border - size
    if hi < lo:
        return None
    if boxes is not None and len(placed) >= _BATCH_FROM:
        return _try_place_batch(size, group, placed, relations, config, rng, tries, boxes, lo, hi)
    for _ in range(tries):
        x0 = int(rng.integers(lo, hi + 1))
        y0 = int(rng.integers(lo, hi + 1))
        box = (x0, y0, x0 + size, y0 + size)
        if all(_boxes_clear(box, b, config.gap) for _, b in placed) and \
                _relations_ok(box, group, placed, relations, config.position_margin):
            return box
    return None


def _try_place_batch(size: int, group: int, placed: list[tuple[int, tuple]], relations: Sequence[Relation],
                     config: WorldConfig, rng: Rng, tries: int, boxes: np.ndarray, lo: int,
                     hi: int) -> tuple[int, int, int, int] | None:
    """:func:`_try_place`'s loop, all tries at once: the corners are drawn as one array (numpy gives the same
    numbers as one draw at a time), checked against every placed box with numpy, and the generator is then set
    back and moved on by exactly the draws the loop would have made, so the result and the generator's state are
    the loop's."""
    bitgen = rng.bit_generator
    state = bitgen.state
    corners = rng.integers(lo, hi + 1, size=2 * tries).reshape(tries, 2)  # x0, y0 per try, in the loop's order
    b = boxes[:len(placed)].T
    # a try is clear of a box when it lies gap or more from it on some axis
    left, right, top, bottom = b[0] - (size + config.gap), b[2] + config.gap, b[1] - (size + config.gap), \
        b[3] + config.gap
    for first, stop in ((0, min(4, tries)), (min(4, tries), tries)):  # most objects find room within 4 tries
        x0, y0 = corners[first:stop, :1], corners[first:stop, 1:]
        clear = ((x0 <= left) | (x0 >= right) | (y0 <= top) | (y0 >= bottom)).all(axis=1)
        for t in (first + np.flatnonzero(clear)).tolist():
            box = (int(corners[t, 0]), int(corners[t, 1]), int(corners[t, 0]) + size, int(corners[t, 1]) + size)
            if _relations_ok(box, group, placed, relations, config.position_margin):
                bitgen.state = state
                rng.integers(lo, hi + 1, size=2 * (t + 1))  # the draws of tries 0..t, no more
                return box
    return None


def _grid_cells(config: WorldConfig) -> tuple[int, Callable[[int], tuple[int, int, int, int]]]:
    """The cells of :meth:`WorldConfig.capacity`'s grid: their number and each cell's box (the smallest objects,
    ``gap`` apart inside the border), cells counted row by row."""
    step, per_axis = config.min_px + config.gap, math.isqrt(config.capacity())

    def cell_box(cell: int) -> tuple[int, int, int, int]:
        x0, y0 = config.border + (cell % per_axis) * step, config.border + (cell // per_axis) * step
        return (x0, y0, x0 + config.min_px, y0 + config.min_px)

    return per_axis * per_axis, cell_box


def _grid_with_relations(groups: Sequence[ObjectGroup], order: list[int], colors: list[str],
                         relations: Sequence[Relation], config: WorldConfig, rng: Rng) -> Scene | None:
    """The smallest objects in cells of :meth:`WorldConfig.capacity`'s grid, the objects of related groups in
    cells that keep the relations (at ``position_margin``, none perpendicular), found by random draws; None when
    ``max_attempts`` draws find none. Two cells of one row (column) always keep a left/right (above/below) relation
    at the default margin, so a relation between single objects is found at once whatever the other objects."""
    n_cells, cell_box = _grid_cells(config)
    related = {g for r in relations for g in (r.subject, r.target)}
    bound = [i for i, gi in enumerate(order) if gi in related]
    for _ in range(config.max_attempts):
        cells = rng.choice(n_cells, size=len(bound), replace=False).tolist()
        placed: list[tuple[int, tuple]] = []
        for i, cell in zip(bound, cells):
            box = cell_box(cell)
            if not _relations_ok(box, order[i], placed, relations, config.position_margin):
                break
            placed.append((order[i], box))
        else:
            used = set(cells)
            rest = [c for c in rng.permutation(n_cells).tolist() if c not in used][:len(order) - len(bound)]
            where = dict(zip(bound, cells))
            free = iter(rest)
            objects = tuple(SceneObject(groups[gi].shape, c, cell_box(where[i] if i in where else next(free)))
                            for i, (gi, c) in enumerate(zip(order, colors)))
            return Scene(config.image_size, objects)
    return None


def compose_scene(groups: Sequence[ObjectGroup], relations: Sequence[Relation] = (),
                  seed: int | Rng | None = 0, config: WorldConfig | None = None) -> Scene:
    """Lay out the given groups of objects at random, respecting the relations.

    Args:
        groups: what to draw; a group's ``color=None`` picks a random color from
            ``config.colors`` per object.
        relations: constraints between groups (indices into ``groups``), judged
            with GenEval's rule at ``config.position_margin``; no perpendicular
            relation may hold between the same objects.
        seed: int seed or numpy Generator; the same seed gives the same scene.
        config: the world (default :class:`WorldConfig()`).

    Returns:
        A :class:`Scene`; its objects are listed group by group.

    Raises:
        TypeError: ``groups``/``relations`` are not lists of :class:`ObjectGroup`/:class:`Relation`, or
            ``config`` is not a :class:`WorldConfig` (or None).
        ValueError: a group names an unknown shape/color or a bad relation, or
            more objects are asked than the image can hold (:meth:`WorldConfig.capacity`) or than a
            scene may hold (:data:`MAX_OBJECTS`).
        RuntimeError: no layout found for groups with relations. Random placement comes first; when it
            fails, the smallest objects go to random cells of the capacity grid, so relation-free groups
            up to :meth:`WorldConfig.max_objects` objects always get a layout, and so do relations between
            single objects (two cells of a row or column keep them at the default margin), whatever the
            other objects; relations between groups of several objects can fail, and so can any relation
            at a ``position_margin`` larger than the default.

    Example:
        >>> s = compose_scene([ObjectGroup("square", 1, "blue"), ObjectGroup("circle", 3, "red")],
        ...                   [Relation(1, "left of", 0)], seed=3)
        >>> s.count("circle", "red")
        3
    """
    fn = "compose_scene"
    config = _world(fn, config)
    groups = _sequence_of(fn, "groups", groups, ObjectGroup)  # a dict or a tuple raised a bare AttributeError
    relations = _sequence_of(fn, "relations", relations, Relation, "; pass () for none")
    rng = as_rng(seed)
    for i, g in enumerate(groups):
        if g.shape not in config.shapes:
            raise ValueError(f"group {i}: shape {g.shape!r} is not in this world's shapes {config.shapes}")
        if g.color is not None and g.color not in config.colors:
            raise ValueError(f"group {i}: color {g.color!r} is not in this world's colors {config.colors}")
        if isinstance(g.count, bool) or not isinstance(g.count, int) or g.count < 1:
            raise ValueError(f"group {i}: count must be a positive int, got {g.count!r}")
    for r in relations:
        if not _is_int(r.subject) or not _is_int(r.target):
            # None or "0" raised a bare TypeError; 0.0 and True were taken as group 0 and 1
            raise ValueError(f"bad relation {r}; subject and target must be integer group indices "
                             f"0..{len(groups) - 1}")
        if not isinstance(r.relation, str) or r.relation not in RELATIONS or not (0 <= r.subject < len(groups)) or \
                not (0 <= r.target < len(groups)) or r.subject == r.target:
            raise ValueError(f"bad relation {r}; groups 0..{len(groups) - 1}, relations {RELATIONS}")
    n = sum(g.count for g in groups)
    if n > config.capacity():
        raise ValueError(f"{n} objects asked ({[dataclasses.astuple(g) for g in groups]!s:.300}); a "
                         f"{config.image_size}px image of this world holds at most {config.capacity()}")
    if n > MAX_OBJECTS:  # a random layout of 342,225 objects (min_size 0.0013 at 4096 px) took hours
        raise ValueError(f"{n} objects asked ({[dataclasses.astuple(g) for g in groups]!s:.300}); a scene holds at "
                         f"most MAX_OBJECTS = {MAX_OBJECTS} objects (this world's capacity is {config.capacity()})")
    order = [gi for gi, g in enumerate(groups) for _ in range(g.count)]
    colors = [groups[gi].color or config.colors[int(rng.integers(len(config.colors)))] for gi in order]
    cap = config.size_cap(n)
    boxes = np.empty((n, 4), dtype=np.int64)  # the placed boxes, for _try_place's numpy check of many objects
    for attempt in range(config.max_attempts):
        # Shrink the objects as restarts pile up: dense scenes still converge.
        cap_now = max(config.min_px, cap - attempt // 40)
        sizes = rng.integers(config.min_px, cap_now + 1, size=n)
        placed: list[tuple[int, tuple]] = []
        for gi, size in zip(order, sizes):
            box = _try_place(int(size), gi, placed, relations, config, rng, tries=60, boxes=boxes)
            if box is None:
                break
            boxes[len(placed)] = box
            placed.append((gi, box))
        else:
            objects = tuple(SceneObject(groups[gi].shape, c, box) for (gi, box), c in zip(placed, colors))
            return Scene(config.image_size, objects)
    if not relations:
        # A dense scene random placement did not find (25 objects fit a 64px image, as capacity() counts, but
        # are rarely hit at random): the smallest objects in random cells of capacity()'s grid.
        n_cells, cell_box = _grid_cells(config)
        cells = rng.permutation(n_cells)[:n]
        return Scene(config.image_size, tuple(SceneObject(groups[gi].shape, c, cell_box(cell))
                                              for gi, c, cell in zip(order, colors, cells.tolist())))
    # Random placement found no layout with these relations (20 objects with a relation in a 64px image failed
    # for some seeds): the smallest objects in cells of the same grid, related ones in cells that keep the relations.
    scene = _grid_with_relations(groups, order, colors, relations, config, rng)
    if scene is not None:
        return scene
    raise RuntimeError(f"could not lay out {n} objects ({[dataclasses.astuple(g) for g in groups]!s:.300}) with "
                       f"relations {list(relations)!s:.300} in a {config.image_size}px image after "
                       f"{config.max_attempts} attempts, nor in cells of its grid; use fewer or smaller objects")


def random_scene(seed: int | Rng | None = 0, config: WorldConfig | None = None,
                 n_objects: int | None = None) -> Scene:
    """A scene of 1 to 8 objects (at most what the world holds) with random shapes and colors.

    Args:
        seed: int seed or numpy Generator.
        config: the world.
        n_objects: how many objects (default: uniform in 1..8, or in 1..``config.max_objects()`` for a
            world that holds fewer); at most :meth:`WorldConfig.max_objects` (the
            world's capacity, at most :data:`MAX_OBJECTS`).

    Returns:
        A :class:`Scene`.

    Raises:
        ValueError: ``n_objects`` is not an integer in ``[1, config.max_objects()]``.
    """
    config = _world("random_scene", config)
    most = config.max_objects()
    if n_objects is not None and (not _is_int(n_objects) or not 1 <= n_objects <= most):
        # 10**9 built a billion groups before the capacity check (a hang); 1.7 drew one object; 342,225 (the
        # capacity of a 4096px world of 5px objects) was laid out for hours
        limit = "what the world fits" if most == config.capacity() else \
            f"MAX_OBJECTS; the world's capacity is {config.capacity()}"
        raise ValueError(f"n_objects must be an integer in [1, {most}] ({limit}), got {n_objects!r}")
    rng = as_rng(seed)
    # (a world holding 4 objects was asked for up to 8 and failed for most seeds; worlds holding 8 or more draw
    # exactly as before)
    n = int(rng.integers(1, min(8, most) + 1)) if n_objects is None else int(n_objects)
    groups = [ObjectGroup(config.shapes[int(rng.integers(len(config.shapes)))], 1) for _ in range(n)]
    return compose_scene(groups, (), rng, config)


def add_object(scene: Scene, shape: str, color: str, seed: int | Rng | None = 0,
               config: WorldConfig | None = None) -> Scene:
    """The scene plus one more object, placed in free space (keeps ``gap``/``border``).

    Tries random sizes and places first, then takes the first free position at
    the smallest size (top to bottom, left to right), so it fails only when the
    image is genuinely full; a full image is told at once, from a map of the
    positions the scene's objects block, before any random try.

    Args:
        scene: the scene.
        shape: one of ``config.shapes``.
        color: one of ``config.colors``.
        seed: int seed or numpy Generator.
        config: the world (default: :class:`WorldConfig` of the scene's image size).

    Raises:
        TypeError: ``scene`` is not a :class:`Scene` or ``config`` not a :class:`WorldConfig` (or None).
        ValueError: a shape or color this world does not draw, a config of another image size, or a scene
            that holds :data:`MAX_OBJECTS` objects already.
        RuntimeError: no free place for even the smallest object (told before
            any random draw, so a Generator passed as ``seed`` is left as it was).
    """
    fn = "add_object"
    scene = _scene(fn, scene)
    if config is None:
        try:
            config = WorldConfig(image_size=scene.image_size)
        except ValueError as e:  # "image_size must be ..., got 16" named an argument that was not given
            raise ValueError(f"{fn}: no default world for this {scene.image_size}px scene ({e}); pass "
                             "config=") from None
    config = _world(fn, config)
    SceneObject(shape, color, (0, 0, 1, 1))  # names checked before the search, not after it
    # as compose_scene does: a name of the palette that this world does not draw was added without a word
    if shape not in config.shapes:
        raise ValueError(f"{fn}: shape {shape!r} is not in this world's shapes {config.shapes}")
    if color not in config.colors:
        raise ValueError(f"{fn}: color {color!r} is not in this world's colors {config.colors}")
    if config.image_size != scene.image_size:
        raise ValueError(f"add_object: config.image_size {config.image_size} is not the scene's {scene.image_size}")
    if len(scene.objects) >= MAX_OBJECTS:  # it grew a scene of 128 objects to 129, past what compose_scene lays out
        raise ValueError(f"{fn}: the scene holds {len(scene.objects)} objects; a scene holds at most MAX_OBJECTS = "
                         f"{MAX_OBJECTS}")
    size = config.min_px
    free = _first_free_corner(scene, config, size)
    if free is None:  # (the random tries and a Python scan of every position took 28 s to tell a full 4096px image)
        raise RuntimeError(f"no room for another {size}px object in this {scene.image_size}px scene "
                           f"of {len(scene.objects)} objects")
    rng = as_rng(seed)
    placed = [(-1, o.bbox) for o in scene.objects]
    boxes = np.asarray([b for _, b in placed], dtype=np.int64).reshape(len(placed), 4)
    cap = config.size_cap(len(scene.objects) + 1)
    for size in range(cap, config.min_px - 1, -1):
        box = _try_place(size, -2, placed, (), config, rng, tries=200, boxes=boxes)
        if box is not None:
            return Scene(scene.image_size, scene.objects + (SceneObject(shape, color, box),), scene.background)
    x0, y0 = free
    box = (x0, y0, x0 + config.min_px, y0 + config.min_px)
    return Scene(scene.image_size, scene.objects + (SceneObject(shape, color, box),), scene.background)


def _first_free_corner(scene: Scene, config: WorldConfig, size: int) -> tuple[int, int] | None:
    """The first corner ``(x0, y0)`` (rows top to bottom, each left to right) inside the border where a ``size``
    box keeps ``gap`` from every object of ``scene``; None when there is none.

    A map of the corners each object blocks (its box grown by ``size + gap - 1`` up and left and ``gap - 1`` down
    and right) replaces a Python scan of every corner against every object."""
    lo, hi = config.border, config.image_size - config.border - size
    if hi < lo:
        return None
    gap, span = config.gap, hi - lo + 1
    blocked = np.zeros((span, span), dtype=bool)  # [y0 - lo, x0 - lo]
    for o in scene.objects:
        bx0, by0, bx1, by1 = o.bbox
        # a corner x0 is blocked iff bx0 - size - gap < x0 < bx1 + gap (and the same for y0)
        xa, xb = max(bx0 - size - gap + 1, lo) - lo, min(bx1 + gap - 1, hi) - lo + 1
        ya, yb = max(by0 - size - gap + 1, lo) - lo, min(by1 + gap - 1, hi) - lo + 1
        if xa < xb and ya < yb:
            blocked[ya:yb, xa:xb] = True
    first = int(blocked.argmin())  # the first False in row order (0 when every corner is blocked)
    if blocked.flat[first]:
        return None
    return lo + first % span, lo + first // span


def remove_object(scene: Scene, index: int) -> Scene:
    """The scene without object ``index`` (an int; else a TypeError, and an IndexError out of range)."""
    index = _index("remove_object", _scene("remove_object", scene), index)
    return dataclasses.replace(scene, objects=scene.objects[:index] + scene.objects[index + 1:])


def replace_object(scene: Scene, index: int, *, shape: str | None = None, color: str | None = None) -> Scene:
    """The scene with object ``index`` redrawn as another shape and/or color (same box)."""
    index = _index("replace_object", _scene("replace_object", scene), index)
    old = scene.objects[index]
    # `shape or old.shape` kept the old shape for shape="" without a word
    new = SceneObject(old.shape if shape is None else shape, old.color if color is None else color, old.bbox)
    return dataclasses.replace(scene, objects=scene.objects[:index] + (new,) + scene.objects[index + 1:])


def mirror_scene(scene: Scene, axis: str) -> Scene:
    """Mirror object *positions*: ``axis="x"`` flips left/right, ``"y"`` flips up/down.

    Shapes stay upright (a triangle still points up); only boxes move.
    """
    _scene("mirror_scene", scene)
    if axis not in ("x", "y"):
        raise ValueError(f"axis must be 'x' or 'y', got {axis!r}")
    s = scene.image_size
    objs = []
    for o in scene.objects:
        x0, y0, x1, y1 = o.bbox
        box = (s - x1, y0, s - x0, y1) if axis == "x" else (x0, s - y1, x1, s - y0)
        objs.append(SceneObject(o.shape, o.color, box))
    return dataclasses.replace(scene, objects=tuple(objs))


__all__ = [
    "SHAPES", "PALETTE", "BACKGROUND", "SceneObject", "Scene", "WorldConfig", "ObjectGroup", "Relation",
    "shape_mask", "compose_scene", "random_scene", "add_object", "remove_object", "replace_object",
    "mirror_scene", "as_rng", "MAX_OBJECTS",
]
