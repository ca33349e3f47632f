"""GenEval's vocabulary and rules, shared by the shapes world, its prompts and its evaluator.

Holds the six task tags, the ten colors, the four relations, the record
validator, and the centre-offset position rule (method.md section 9). The world
uses the same rule to place objects, so a rendered "A right of B" is right of B
by the very function the evaluator judges with.

Box convention everywhere in ``xlard.shapes``: ``(x0, y0, x1, y1)`` in pixel-edge
coordinates, ``x1``/``y1`` exclusive (pixel column ``i`` spans ``[i, i + 1)``),
x to the right, y downward. A box's centre is ``((x0 + x1) / 2, (y0 + y1) / 2)``
and its size is ``(x1 - x0, y1 - y0)``, as for a detector's continuous boxes.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
"""GenEval's six tasks, in the order GenEval reports them."""

GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")

RELATIONS = ("left of", "right of", "above", "below")

OPPOSITE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

POSITION_THRESHOLD = 0.1
"""Fraction of the summed box sizes (per axis) removed from the centre offset."""

RELATION_CUTOFF = 0.5
"""A normalized offset component beyond this decides a relation."""

# Per relation: (axis, sign); axis 0 = x (right), 1 = y (down).
RELATION_AXIS = {"left of": (0, -1.0), "right of": (0, 1.0), "above": (1, -1.0), "below": (1, 1.0)}

Box = tuple  # (x0, y0, x1, y1), see the module docstring


def normalized_offset(box_a: Sequence[float], box_b: Sequence[float],
                      threshold: float = POSITION_THRESHOLD) -> tuple[float, float] | None:
    """The direction of A relative to B after GenEval's size-aware shrinking.

    Our reading of method.md section 9 ("offset shrunk by 0.1 x the sum of the
    two box sizes per axis, then |d| > 0.5 decides"), which is also what
    GenEval's reference evaluator computes:

    1. ``offset = centre_a - centre_b`` (x right, y down).
    2. Per axis, ``shrunk = sign(offset) * max(|offset| - threshold * (size_a + size_b), 0)``:
       boxes that overlap a lot along an axis say nothing about that axis.
    3. If both shrunk components are below 1e-3 (pixels), no relation holds.
    4. ``d = shrunk / ||offset||_2``: the shrunk offset divided by the length of
       the *raw* offset. Then ``|d_x| > 0.5`` decides left/right and
       ``|d_y| > 0.5`` decides above/below. Both can hold (a diagonal), and
       neither need hold (a 45-degree neighbour whose shrinking ate enough).

    Args:
        box_a: ``(x0, y0, x1, y1)`` of object A.
        box_b: ``(x0, y0, x1, y1)`` of object B.
        threshold: the shrinking fraction (GenEval: 0.1).

    Returns:
        ``(d_x, d_y)``, or ``None`` when the shrunk offset vanishes.

    Example:
        >>> normalized_offset((20, 0, 30, 10), (0, 0, 10, 10))
        (0.9, 0.0)
    """
    ax0, ay0, ax1, ay1 = (float(v) for v in box_a)
    bx0, by0, bx1, by1 = (float(v) for v in box_b)
    off_x = (ax0 + ax1) / 2.0 - (bx0 + bx1) / 2.0
    off_y = (ay0 + ay1) / 2.0 - (by0 + by1) / 2.0
    shrink_x = threshold * ((ax1 - ax0) + (bx1 - bx0))
    shrink_y = threshold * ((ay1 - ay0) + (by1 - by0))
    rev_x = math.copysign(max(abs(off_x) - shrink_x, 0.0), off_x)
    rev_y = math.copysign(max(abs(off_y) - shrink_y, 0.0), off_y)
    if abs(rev_x) < 1e-3 and abs(rev_y) < 1e-3:
        return None
    norm = math.hypot(off_x, off_y)
    return rev_x / norm, rev_y / norm


def relative_position(box_a: Sequence[float], box_b: Sequence[float],
                      threshold: float = POSITION_THRESHOLD) -> set[str]:
    """The relations A stands in to B under GenEval's centre-offset rule.

    See :func:`normalized_offset` for the rule. ``"right of"`` in the result
    means "A is right of B".

    Args:
        box_a: ``(x0, y0, x1, y1)`` of A.
        box_b: ``(x0, y0, x1, y1)`` of B.
        threshold: the shrinking fraction (GenEval: 0.1).

    Returns:
        A subset of :data:`RELATIONS` (empty when none holds).

    Example:
        >>> sorted(relative_position((20, 20, 30, 30), (0, 0, 10, 10)))
        ['below', 'right of']
    """
    d = normalized_offset(box_a, box_b, threshold)
    if d is None:
        return set()
    dx, dy = d
    out = set()
    if dx < -RELATION_CUTOFF:
        out.add("left of")
    if dx > RELATION_CUTOFF:
        out.add("right of")
    if dy < -RELATION_CUTOFF:
        out.add("above")
    if dy > RELATION_CUTOFF:
        out.add("below")
    return out


def relation_strength(box_a: Sequence[float], box_b: Sequence[float], relation: str,
                      threshold: float = POSITION_THRESHOLD) -> float:
    """How far "A <relation> B" holds: the normalized offset along the relation's direction.

    The relation holds under GenEval's rule iff the strength exceeds 0.5; the
    world places objects at a larger strength so that its scenes are
    unambiguous. Returns 0.0 when the shrunk offset vanishes.
    """
    if relation not in RELATION_AXIS:
        raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
    d = normalized_offset(box_a, box_b, threshold)
    if d is None:
        return 0.0
    axis, sign = RELATION_AXIS[relation]
    return sign * d[axis]


def _where(index: int | None) -> str:
    return "record" if index is None else f"record {index}"


def validate_record(record: Any, *, classes: Iterable[str] | None = None,
                    colors: Iterable[str] | None = None, index: int | None = None) -> dict:
    """Check that ``record`` is a well-formed GenEval record; raise a clear error if not.

    A record is ``{"tag", "include": [...], "exclude": [...]?, "prompt"}``;
    include items are ``{"class", "count", "color"?, "position"?: [relation,
    group_index]}`` where ``group_index`` names an *earlier* include item (the
    target); exclude items are ``{"class", "count", "color"?}`` and fail the
    record when ``count`` or more such objects are found.

    Args:
        record: the parsed JSON object.
        classes: when given, the only class names allowed (the world's shapes).
        colors: when given, the only color names allowed (the world's palette).
        index: the record's position in its file, used in error messages.

    Returns:
        The same record (for chaining).

    Raises:
        ValueError: naming the record, the field and what was wrong.
    """
    where = _where(index)
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("tag", "include", "prompt"):
        if key not in record:
            raise ValueError(f"{where}: missing required key {key!r} (has {sorted(record)})")
    if not isinstance(record["tag"], str) or not record["tag"]:
        raise ValueError(f"{where}: 'tag' must be a non-empty string, got {record['tag']!r}")
    if not isinstance(record["prompt"], str):
        raise ValueError(f"{where}: 'prompt' must be a string, got {type(record['prompt']).__name__}")
    class_set = set(classes) if classes is not None else None
    color_set = set(colors) if colors is not None else None

    def check_item(item: Any, field: str, allow_position: bool, position_limit: int) -> None:
        if not isinstance(item, Mapping):
            raise ValueError(f"{where}: {field} must be an object, got {type(item).__name__}")
        known = {"class", "count", "color"} | ({"position"} if allow_position else set())
        extra = set(item) - known
        if extra:
            raise ValueError(f"{where}: {field} has unknown keys {sorted(extra)}; allowed {sorted(known)}")
        cls = item.get("class")
        if not isinstance(cls, str) or not cls:
            raise ValueError(f"{where}: {field}.class must be a non-empty string, got {cls!r}")
        if class_set is not None and cls not in class_set:
            raise ValueError(f"{where}: {field}.class {cls!r} is not a class of this world "
                             f"(known: {', '.join(sorted(class_set))})")
        count = item.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{where}: {field}.count must be a positive integer, got {count!r}")
        if "color" in item:
            color = item["color"]
            if not isinstance(color, str):
                raise ValueError(f"{where}: {field}.color must be a string, got {color!r}")
            if color_set is not None and color not in color_set:
                raise ValueError(f"{where}: {field}.color {color!r} is not a color of this world "
                                 f"(known: {', '.join(sorted(color_set))})")
        if "position" in item:
            pos = item["position"]
            if (not isinstance(pos, (list, tuple)) or len(pos) != 2):
                raise ValueError(f"{where}: {field}.position must be [relation, group_index], got {pos!r}")
            rel, target = pos
            if rel not in RELATIONS:
                raise ValueError(f"{where}: {field}.position relation {rel!r} is not one of {RELATIONS}")
            if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < position_limit:
                raise ValueError(f"{where}: {field}.position target {target!r} must index an earlier "
                                 f"include item (0..{position_limit - 1})")

    include = record["include"]
    if not isinstance(include, (list, tuple)) or not include:
        raise ValueError(f"{where}: 'include' must be a non-empty list, got {include!r}")
    for i, item in enumerate(include):
        check_item(item, f"include[{i}]", True, i)
    exclude = record.get("exclude", [])
    if not isinstance(exclude, (list, tuple)):
        raise ValueError(f"{where}: 'exclude' must be a list, got {exclude!r}")
    for i, item in enumerate(exclude):
        check_item(item, f"exclude[{i}]", False, 0)
    return record  # type: ignore[return-value]
