"""xlard's shared vocabulary: relation codes, aspect names, GenEval tags, colors.

Every module that speaks of relations, aspects, task tags or color names
imports them from here, so the ops layer, the prompt parser, the rewards, the
models, the explanations and the shapes world cannot drift apart.

- Relations read "``a`` is ``relation`` of ``b``". The ops layer encodes them
  as integers (:data:`LEFT_OF` ... :data:`BELOW`); the method layer names them
  canonically (:data:`RELATIONS`, "left_of"); GenEval records spell them with
  a space (:data:`GENEVAL_RELATIONS`, "left of"). Image coordinates have x to
  the right and y downward, so "above" means a smaller y.
- Aspects come in the order :data:`ASPECTS` = ("count", "color", "position"),
  the order of the joint reward, the confidence head's weights and every
  per-aspect tensor.
- Colors: GenEval's ten (:data:`GENEVAL_COLORS`) first, then the other
  single-word colors the prompt parser knows (:data:`COLORS`), their aliases
  ("grey" -> "gray"), the modifier words ("light blue") and compound names.

Pure Python, no dependencies.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = [
    "LEFT_OF",
    "RIGHT_OF",
    "ABOVE",
    "BELOW",
    "RELATIONS",
    "RELATION_CODES",
    "INVERSE_RELATION",
    "GENEVAL_RELATIONS",
    "GENEVAL_RELATION_NAMES",
    "GENEVAL_INVERSE_RELATION",
    "normalize_relation",
    "ASPECTS",
    "GENEVAL_TAGS",
    "GENEVAL_COLORS",
    "EXTRA_COLORS",
    "COLORS",
    "COLOR_ALIASES",
    "COLOR_MODIFIER_WORDS",
    "COMPOUND_COLORS",
]

# ---------------------------------------------------------------------------
# Relations
# ---------------------------------------------------------------------------

#: Relation codes; a row (a, b, code) means "entity a is <code> of entity b".
LEFT_OF: int = 0
RIGHT_OF: int = 1
ABOVE: int = 2
BELOW: int = 3

#: Canonical relation names, indexed by code.
RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below")

#: Canonical relation name -> code (the ops layer's integer encoding).
RELATION_CODES: Mapping[str, int] = {
    "left_of": LEFT_OF,
    "right_of": RIGHT_OF,
    "above": ABOVE,
    "below": BELOW,
}

#: "a is R of b" <=> "b is INVERSE_RELATION[R] of a".
INVERSE_RELATION: Mapping[str, str] = {
    "left_of": "right_of",
    "right_of": "left_of",
    "above": "below",
    "below": "above",
}

#: Canonical relation name -> GenEval's spelling in ``position`` clauses.
GENEVAL_RELATION_NAMES: Mapping[str, str] = {name: name.replace("_", " ") for name in RELATIONS}

#: Relation strings as GenEval writes them, indexed by code.
GENEVAL_RELATIONS: tuple[str, ...] = tuple(GENEVAL_RELATION_NAMES[name] for name in RELATIONS)

#: :data:`INVERSE_RELATION` in GenEval's spelling ("left of" <-> "right of").
GENEVAL_INVERSE_RELATION: Mapping[str, str] = {
    GENEVAL_RELATION_NAMES[a]: GENEVAL_RELATION_NAMES[b] for a, b in INVERSE_RELATION.items()
}


def normalize_relation(name: str) -> str:
    """Map a relation name to its canonical form (one of :data:`RELATIONS`).

    Accepts the canonical names, GenEval's spellings ("left of", "right of")
    and case or separator variants ("Left-Of", "left_of").

    Args:
        name: the relation name.

    Returns:
        "left_of", "right_of", "above" or "below".

    Raises:
        ValueError: the name is not one of the four relations.

    Example:
        >>> normalize_relation("right of")
        'right_of'
    """
    if not isinstance(name, str):
        raise ValueError(f"relation must be a string, got {type(name).__name__}")
    key = re.sub(r"[\s_\-]+", "_", name.strip().lower())
    if key not in RELATION_CODES:
        raise ValueError(
            f"unknown relation {name!r}; expected one of {list(RELATIONS)} "
            "(GenEval spellings 'left of'/'right of' are accepted too)"
        )
    return key


# ---------------------------------------------------------------------------
# Aspects and tags
# ---------------------------------------------------------------------------

#: Reward aspects, in the order of the joint reward and the confidence head.
ASPECTS: tuple[str, ...] = ("count", "color", "position")

#: The six GenEval task tags, in the order GenEval reports them.
GENEVAL_TAGS: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)

# ---------------------------------------------------------------------------
# Colors
# ---------------------------------------------------------------------------

#: The ten colors GenEval's color and color-attribution tasks use.
GENEVAL_COLORS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue",
    "purple", "pink", "brown", "black", "white",
)

#: Colors beyond GenEval's ten that the parser recognizes (canonical spellings).
EXTRA_COLORS: tuple[str, ...] = (
    "gray", "cyan", "magenta", "teal", "navy", "beige", "maroon", "violet",
    "turquoise", "gold", "silver", "lime", "indigo", "crimson", "khaki",
    "lavender", "tan",
)

#: Every single-word color the parser recognizes, GenEval's ten first.
COLORS: tuple[str, ...] = GENEVAL_COLORS + EXTRA_COLORS

#: Other spellings of single-word colors -> the canonical name.
COLOR_ALIASES: Mapping[str, str] = {"grey": "gray", "golden": "gold"}

#: Words the parser accepts before a color ("light blue" stays one color).
COLOR_MODIFIER_WORDS: tuple[str, ...] = ("light", "dark", "bright", "pale", "deep")

#: Two-word color names the parser keeps whole.
COMPOUND_COLORS: tuple[str, ...] = ("navy blue", "sky blue", "royal blue", "sea green", "hot pink")
