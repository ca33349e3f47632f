"""GenEval's vocabulary and rules, shared by the shapes world, its prompts and its evaluator.

Re-exports the six task tags, the ten colors and the four relations (GenEval
spellings) from :mod:`xlard.vocab` and the record validator from
:mod:`xlard.geneval` (the world calls it with its own classes and colors), and
holds the centre-offset position rule (method.md section 9). The world
uses the same rule to place objects, so a rendered "A right of B" is right of B
by the very function the evaluator judges with.

Box convention everywhere in ``xlard.shapes``: ``(x0, y0, x1, y1)`` in pixel-edge
coordinates, ``x1``/``y1`` exclusive (pixel column ``i`` spans ``[i, i + 1)``),
x to the right, y downward. A box's centre is ``((x0 + x1) / 2, (y0 + y1) / 2)``
and its size is ``(x1 - x0, y1 - y0)``, as for a detector's continuous boxes.
"""
from __future__ import annotations

import math
import numbers
from typing import Mapping, Sequence

import numpy as np

from xlard.geneval import validate_record
from xlard.vocab import GENEVAL_COLORS, GENEVAL_INVERSE_RELATION, GENEVAL_RELATIONS, GENEVAL_TAGS

__all__ = [
    "TAGS", "GENEVAL_COLORS", "RELATIONS", "OPPOSITE_RELATION", "POSITION_THRESHOLD", "RELATION_CUTOFF",
    "RELATION_AXIS", "normalized_offset", "relative_position", "relation_strength", "validate_record",
]

#: GenEval's six tasks, in the order GenEval reports them (:data:`xlard.vocab.GENEVAL_TAGS`).
TAGS = GENEVAL_TAGS

#: The four relations as GenEval spells them (:data:`xlard.vocab.GENEVAL_RELATIONS`).
RELATIONS = GENEVAL_RELATIONS

#: "A R B" <=> "B OPPOSITE_RELATION[R] A".
OPPOSITE_RELATION = GENEVAL_INVERSE_RELATION

POSITION_THRESHOLD = 0.1
"""Fraction of the summed box sizes (per axis) removed from the centre offset."""

RELATION_CUTOFF = 0.5
"""A normalized offset component beyond this decides a relation."""

# Per relation: (axis, sign); axis 0 = x (right), 1 = y (down).
RELATION_AXIS = {"left of": (0, -1.0), "right of": (0, 1.0), "above": (1, -1.0), "below": (1, 1.0)}

Box = tuple  # (x0, y0, x1, y1), see the module docstring


def _box(name: str, box) -> tuple[float, float, float, float]:
    """``box`` as four floats ``(x0, y0, x1, y1)`` with ``x1 >= x0`` and ``y1 >= y0``, else a ValueError naming it.

    None raised "not iterable", three numbers a bare unpacking error; NaN or infinite corners gave no relation
    without a word, strings ("0") and bools were read as numbers, and an inverted box (x1 < x0) was judged.
    """
    if type(box) is tuple and len(box) == 4 and all(type(v) is int for v in box) \
            and box[2] >= box[0] and box[3] >= box[1]:  # the world's and the evaluator's own boxes: no more to check
        return float(box[0]), float(box[1]), float(box[2]), float(box[3])
    if isinstance(box, (str, bytes, Mapping)) or not hasattr(box, "__iter__"):
        raise ValueError(f"{name} must be four numbers (x0, y0, x1, y1), got {type(box).__name__} {box!r:.80}")
    try:
        values = list(box)
    except TypeError:  # a 0-d array
        values = []
    if len(values) != 4 or any(isinstance(v, (str, bytes, bool, np.bool_)) for v in values):
        raise ValueError(f"{name} must be four numbers (x0, y0, x1, y1), got {box!r:.80}")
    try:
        x0, y0, x1, y1 = (float(v) for v in values)
    except (TypeError, ValueError, OverflowError):  # a nested list, an array of numbers, an object, 10**400
        raise ValueError(f"{name} must be four numbers (x0, y0, x1, y1), got {box!r:.80}") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"{name} must be four finite numbers (x0, y0, x1, y1), got {box!r:.80}")
    # a detector's float corners rounded past each other (x1 = x0 - 1e-12) are a zero-size box, not an error
    x1 = x0 if x0 - 1e-9 * max(1.0, abs(x0)) <= x1 < x0 else x1
    y1 = y0 if y0 - 1e-9 * max(1.0, abs(y0)) <= y1 < y0 else y1
    if x1 < x0 or y1 < y0:
        raise ValueError(f"{name} must be (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0 (corners, not a width and "
                         f"height), got {box!r:.80}")
    return x0, y0, x1, y1


def _threshold(threshold) -> float:
    if type(threshold) is float and 0.0 <= threshold < 1.0:  # the default and every internal call
        return threshold
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 <= threshold < 1.0:
        # None or "0.1" raised a bare TypeError; NaN and 5 judged every pair "no relation", -1 shrank nothing
        raise ValueError(f"threshold must be a number in [0, 1) (GenEval's box-size shrink fraction: "
                         f"{POSITION_THRESHOLD}), got {threshold!r:.80}")
    return threshold


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

    Raises:
        ValueError: a box that is not four finite numbers with ``x1 >= x0`` and ``y1 >= y0``, or a
            ``threshold`` outside [0, 1) (the same for :func:`relative_position` and :func:`relation_strength`).

    Example:
        >>> normalized_offset((20, 0, 30, 10), (0, 0, 10, 10))
        (0.9, 0.0)
    """
    ax0, ay0, ax1, ay1 = _box("box_a", box_a)
    bx0, by0, bx1, by1 = _box("box_b", box_b)
    threshold = _threshold(threshold)
    d = _offset(ax0, ay0, ax1, ay1, bx0, by0, bx1, by1, threshold, 1e-3)
    if d is _OVERFLOW:
        # Corners near the float limit (1e308) overflowed the centres and gave (nan, nan). The rule is scale-free
        # but for its 1e-3 px cutoff, so it is worked out on the boxes scaled by 1/8 (exact: a power of two), the
        # cutoff scaled alike; then nothing overflows.
        d = _offset(ax0 / 8, ay0 / 8, ax1 / 8, ay1 / 8, bx0 / 8, by0 / 8, bx1 / 8, by1 / 8, threshold, 1e-3 / 8)
    return d


_OVERFLOW = object()


def _offset(ax0: float, ay0: float, ax1: float, ay1: float, bx0: float, by0: float, bx1: float, by1: float,
            threshold: float, cutoff: float):
    """:func:`normalized_offset` of two checked boxes with a shrunk offset below ``cutoff`` (both axes) counting
    as none; :data:`_OVERFLOW` when a step overflowed the float range."""
    off_x = (ax0 + ax1) / 2.0 - (bx0 + bx1) / 2.0
    off_y = (ay0 + ay1) / 2.0 - (by0 + by1) / 2.0
    shrink_x = threshold * ((ax1 - ax0) + (bx1 - bx0))
    shrink_y = threshold * ((ay1 - ay0) + (by1 - by0))
    if not math.isfinite(off_x + off_y + shrink_x + shrink_y):  # (a sum of finite ones may overflow too: no harm)
        return _OVERFLOW
    rev_x = math.copysign(max(abs(off_x) - shrink_x, 0.0), off_x)
    rev_y = math.copysign(max(abs(off_y) - shrink_y, 0.0), off_y)
    if abs(rev_x) < cutoff and abs(rev_y) < cutoff:
        return None
    norm = math.hypot(off_x, off_y)
    if norm == math.inf:
        return _OVERFLOW
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
    if not isinstance(relation, str) or relation not in RELATION_AXIS:  # a list raised "unhashable type"
        raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")
    d = normalized_offset(box_a, box_b, threshold)
    if d is None:
        return 0.0
    axis, sign = RELATION_AXIS[relation]
    return sign * d[axis]
