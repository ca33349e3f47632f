"""Prompt specs: what a prompt asks for, in a form the rewards can check.

A :class:`PromptSpec` lists the prompt's entities (noun, count, color, and
where they sit in the text and in each text encoder's token sequence) and the
spatial relations between them. It is built either by :func:`parse`, a small
rule-based parser for GenEval-style prompts ("a photo of three red circles
left of a blue square"), or exactly from GenEval metadata by
:func:`from_geneval`. Both return the same type.

Conventions shared with the rewards and the ops layer:

- Relations read "``subject`` is ``relation`` of ``object``"; their codes are
  :data:`LEFT_OF`, :data:`RIGHT_OF`, :data:`ABOVE`, :data:`BELOW`, and a row
  ``(a, b, code)`` of :meth:`PromptSpec.relation_rows` means "entity a is
  <code> of entity b". Image coordinates have x to the right and y downward,
  so "above" means a smaller y.
- Aspects come in the order :data:`ASPECTS` = ("count", "color", "position"),
  the order of the joint reward and of the confidence head's weights.

Token alignment (``tokenizer=`` of :func:`parse`, :func:`from_geneval`,
:func:`align`) uses character offsets, so it works for any Hugging Face *fast*
tokenizer (CLIP BPE, T5 SentencePiece/Unigram, Llama/Qwen byte-level BPE) and
for raw ``tokenizers.Tokenizer`` objects. A token belongs to a word when their
character ranges overlap; special tokens are skipped. Pass one tokenizer, a
sequence (named ``"tokenizer"``, ``"tokenizer_2"``, ``"tokenizer_3"`` like a
diffusers pipeline's attributes) or a mapping name -> tokenizer (SD3: CLIP-L,
CLIP-G, T5). Each encoder's indices live in a :class:`TokenAlignment` and
index that encoder's own sequence; :meth:`PromptSpec.sequence_token_indices`
shifts them into a concatenated text sequence. ``Entity.token_indices`` is the
first (primary) encoder's. Slow (pure Python) tokenizers have no offsets and
are refused with an error saying how to load the fast one.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from xlard.geneval import GENEVAL_COLORS, GENEVAL_TAGS, validate_record

__all__ = [
    "LEFT_OF",
    "RIGHT_OF",
    "ABOVE",
    "BELOW",
    "RELATIONS",
    "RELATION_CODES",
    "INVERSE_RELATION",
    "ASPECTS",
    "GENEVAL_COLORS",
    "COLORS",
    "COCO_CLASSES",
    "GENEVAL_OBJECT_NAMES",
    "SHAPE_NOUNS",
    "KNOWN_NOUNS",
    "Entity",
    "Relation",
    "TokenAlignment",
    "PromptSpec",
    "parse",
    "from_geneval",
    "align",
    "infer_geneval_tag",
    "normalize_relation",
    "pluralize",
    "singularize",
]

# ---------------------------------------------------------------------------
# Relations and aspects
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

#: Reward aspects, in the order of the joint reward and the confidence head.
ASPECTS: tuple[str, ...] = ("count", "color", "position")

_GENEVAL_RELATION_NAMES: Mapping[str, str] = {
    "left_of": "left of",
    "right_of": "right of",
    "above": "above",
    "below": "below",
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
# Vocabulary
# ---------------------------------------------------------------------------

#: Colors beyond GenEval's ten that the parser recognizes (canonical spellings).
_EXTRA_COLORS: tuple[str, ...] = (
    "gray", "cyan", "magenta", "teal", "navy", "beige", "maroon", "violet",
    "turquoise", "gold", "silver", "lime", "indigo", "crimson", "khaki",
    "lavender", "tan",
)

#: Every single-word color the parser recognizes, GenEval's ten first.
COLORS: tuple[str, ...] = GENEVAL_COLORS + _EXTRA_COLORS

_COLOR_ALIASES: Mapping[str, str] = {"grey": "gray", "golden": "gold"}
_COLOR_MODIFIERS: tuple[str, ...] = ("light", "dark", "bright", "pale", "deep")
_COMPOUND_COLORS: tuple[str, ...] = ("navy blue", "sky blue", "royal blue", "sea green", "hot pink")

#: The 80 COCO detection classes (2017 names), in COCO's order.
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench",
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup",
    "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)

# GenEval's object_names.txt renames three COCO classes (indices 64-66).
_GENEVAL_RENAMES: Mapping[str, str] = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
}

#: The 80 class names GenEval's prompts use (COCO's, with three renamed).
GENEVAL_OBJECT_NAMES: tuple[str, ...] = tuple(_GENEVAL_RENAMES.get(c, c) for c in COCO_CLASSES)

#: Nouns of the shapes world (the embedded default backbone's vocabulary).
SHAPE_NOUNS: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "rectangle", "hexagon", "pentagon",
    "octagon", "diamond", "heart", "cross", "ellipse", "oval", "crescent", "ring",
    "disk", "cube", "sphere", "cylinder", "cone", "pyramid", "shape",
)

# Common objects outside COCO, so generic prompts ("five penguins") parse with
# the right head noun; aliases of COCO names are kept as written, not mapped.
_COMMON_NOUNS: tuple[str, ...] = (
    "penguin", "lion", "tiger", "rabbit", "duck", "chicken", "pig", "monkey",
    "goose", "wolf", "fox", "deer", "fish", "owl", "butterfly", "squirrel",
    "man", "woman", "child", "boy", "girl", "baby", "people",
    "box", "ball", "balloon", "flower", "tree", "house", "lamp", "table", "shoe",
    "hat", "candle", "egg", "glass", "mug", "plate", "pencil", "pen", "key",
    "coin", "cookie", "lemon", "strawberry", "tomato", "potato", "leaf", "shelf",
    "guitar", "piano", "violin", "drum", "bell", "robot", "rocket", "bucket",
    "sofa", "television", "motorbike", "aeroplane", "doughnut", "cellphone",
    "hair dryer", "sports car", "soccer ball", "basketball", "football",
)

#: Every noun the parser knows as one entity (multi-word ones included).
KNOWN_NOUNS: tuple[str, ...] = tuple(
    dict.fromkeys(COCO_CLASSES + GENEVAL_OBJECT_NAMES + SHAPE_NOUNS + _COMMON_NOUNS)
)

# ---------------------------------------------------------------------------
# Inflection
# ---------------------------------------------------------------------------

_UNINFLECTED: frozenset[str] = frozenset({
    "sheep", "deer", "fish", "moose", "bison", "salmon", "trout", "shrimp",
    "aircraft", "series", "species", "skis", "scissors", "broccoli", "people",
})

_IRREGULAR_PLURALS: Mapping[str, str] = {
    "person": "people", "man": "men", "woman": "women", "child": "children",
    "mouse": "mice", "goose": "geese", "foot": "feet", "tooth": "teeth",
    "ox": "oxen", "louse": "lice", "die": "dice",
    "knife": "knives", "wife": "wives", "life": "lives", "leaf": "leaves",
    "wolf": "wolves", "calf": "calves", "half": "halves", "shelf": "shelves",
    "loaf": "loaves", "thief": "thieves", "scarf": "scarves", "elf": "elves",
    "cactus": "cacti", "fungus": "fungi", "potato": "potatoes",
    "tomato": "tomatoes", "hero": "heroes", "mango": "mangoes", "echo": "echoes",
    "quiz": "quizzes",
}
_IRREGULAR_SINGULARS: Mapping[str, str] = {p: s for s, p in _IRREGULAR_PLURALS.items()}
_VOWELS = frozenset("aeiou")


def _pluralize_word(word: str) -> str:
    if word in _UNINFLECTED:
        return word
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if len(word) > 1 and word.endswith("y") and word[-2] not in _VOWELS:
        return word[:-1] + "ies"
    return word + "s"


def _singularize_word(word: str) -> str:
    if word in _UNINFLECTED:
        return word
    if word in _IRREGULAR_SINGULARS:
        return _IRREGULAR_SINGULARS[word]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "zzes", "ches", "shes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def pluralize(noun: str) -> str:
    """English plural of a (possibly multi-word) noun; the last word inflects.

    Args:
        noun: a singular noun, e.g. "teddy bear", "knife", "bus".

    Returns:
        Its plural: "teddy bears", "knives", "buses"; uninflected nouns
        ("sheep", "skis", "scissors") come back unchanged.

    Example:
        >>> pluralize("computer mouse")
        'computer mice'
    """
    words = noun.strip().lower().split()
    if not words:
        raise ValueError("cannot pluralize an empty noun")
    return " ".join(words[:-1] + [_pluralize_word(words[-1])])


def singularize(noun: str) -> str:
    """Singular of a (possibly multi-word) noun; known nouns are exact.

    Known nouns (:data:`KNOWN_NOUNS` and their plurals) map exactly; other
    words follow English rules (irregular table, -ies, -es, -s).

    Args:
        noun: a noun, singular or plural.

    Returns:
        The singular, lower-cased.

    Example:
        >>> singularize("wine glasses"), singularize("people"), singularize("penguins")
        ('wine glass', 'person', 'penguin')
    """
    words = tuple(noun.strip().lower().split())
    if not words:
        raise ValueError("cannot singularize an empty noun")
    known = _default_lexicon().nouns.get(words)
    if known is not None:
        return known
    return " ".join(words[:-1] + (_singularize_word(words[-1]),))


# ---------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------


def _as_index_tuple(value: Any, what: str) -> tuple[int, ...]:
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{what} must be a sequence of token indices, got {value!r}") from None
    for item in items:
        if not isinstance(item, int) or isinstance(item, bool) or item < 0:
            raise ValueError(f"{what} must hold integers >= 0, got {value!r}")
    return items


def _check_span(span: Any, what: str) -> tuple[int, int] | None:
    if span is None:
        return None
    try:
        start, end = span
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a (start, end) pair, got {span!r}") from None
    if (not isinstance(start, int) or not isinstance(end, int) or isinstance(start, bool)
            or isinstance(end, bool) or not 0 <= start < end):
        raise ValueError(f"{what} must satisfy 0 <= start < end, got {span!r}")
    return (start, end)


@dataclass(frozen=True)
class Entity:
    """One object the prompt asks for.

    Attributes:
        noun: the object's noun, singular and lower-case ("teddy bear").
        count: how many are asked for; None when the prompt does not say
            ("dogs", "some dogs", "the dog"). "a"/"an"/"one" give 1.
        color: the canonical color name ("gray" for "grey"), or None.
        token_indices: the noun's token positions in the primary encoder's
            sequence (specials included in the numbering); () without a
            tokenizer. Other encoders: :meth:`PromptSpec.token_indices_for`.
        word_span: (start, end) character range of the noun in the prompt
            (end exclusive; plural as written), or None when unknown.
        color_span: (start, end) of the color word(s), or None.
        color_token_indices: the color word's token positions (primary encoder).
    """

    noun: str
    count: int | None = None
    color: str | None = None
    token_indices: tuple[int, ...] = ()
    word_span: tuple[int, int] | None = None
    color_span: tuple[int, int] | None = None
    color_token_indices: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.noun, str) or not self.noun.strip():
            raise ValueError(f"Entity.noun must be a non-empty string, got {self.noun!r}")
        if self.count is not None and (
            not isinstance(self.count, int) or isinstance(self.count, bool) or self.count < 0
        ):
            raise ValueError(f"Entity.count must be None or an integer >= 0, got {self.count!r}")
        if self.color is not None and (not isinstance(self.color, str) or not self.color.strip()):
            raise ValueError(f"Entity.color must be None or a non-empty string, got {self.color!r}")
        object.__setattr__(self, "token_indices", _as_index_tuple(self.token_indices, "Entity.token_indices"))
        object.__setattr__(
            self, "color_token_indices",
            _as_index_tuple(self.color_token_indices, "Entity.color_token_indices"),
        )
        object.__setattr__(self, "word_span", _check_span(self.word_span, "Entity.word_span"))
        object.__setattr__(self, "color_span", _check_span(self.color_span, "Entity.color_span"))
        if self.color_span is not None and self.color is None:
            raise ValueError("Entity.color_span is set but Entity.color is None")


@dataclass(frozen=True)
class Relation:
    """A spatial relation: entity ``subject`` is ``relation`` of entity ``object``.

    Attributes:
        subject: index into :attr:`PromptSpec.entities`.
        relation: one of :data:`RELATIONS` ("left_of", "right_of", "above", "below").
        object: index into :attr:`PromptSpec.entities`.
        span: (start, end) of the relation phrase in the prompt, or None.
    """

    subject: int
    relation: str
    object: int
    span: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for name in ("subject", "object"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Relation.{name} must be an entity index >= 0, got {value!r}")
        if self.subject == self.object:
            raise ValueError(f"Relation relates entity {self.subject} to itself")
        if self.relation not in RELATION_CODES:
            raise ValueError(
                f"Relation.relation must be one of {list(RELATIONS)}, got {self.relation!r} "
                "(use normalize_relation for other spellings)"
            )
        object.__setattr__(self, "span", _check_span(self.span, "Relation.span"))

    @property
    def code(self) -> int:
        """The relation's integer code (:data:`LEFT_OF` ... :data:`BELOW`)."""
        return RELATION_CODES[self.relation]


@dataclass(frozen=True)
class TokenAlignment:
    """Where each entity's words sit in one text encoder's token sequence.

    Attributes:
        encoder: the tokenizer's name ("tokenizer", "tokenizer_2", ... or a
            mapping key given by the caller).
        num_tokens: length of the encoder's sequence for this prompt,
            special tokens included, after truncation to ``max_length``
            (padding not counted).
        noun_tokens: per entity, the noun's token indices in that sequence.
        color_tokens: per entity, the color word's token indices (() if none).
    """

    encoder: str
    num_tokens: int
    noun_tokens: tuple[tuple[int, ...], ...]
    color_tokens: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.encoder, str) or not self.encoder:
            raise ValueError(f"TokenAlignment.encoder must be a non-empty string, got {self.encoder!r}")
        if not isinstance(self.num_tokens, int) or self.num_tokens < 0:
            raise ValueError(f"TokenAlignment.num_tokens must be an integer >= 0, got {self.num_tokens!r}")
        nouns = tuple(_as_index_tuple(t, "TokenAlignment.noun_tokens[i]") for t in self.noun_tokens)
        colors = tuple(_as_index_tuple(t, "TokenAlignment.color_tokens[i]") for t in self.color_tokens)
        if len(nouns) != len(colors):
            raise ValueError(
                f"TokenAlignment has {len(nouns)} noun_tokens entries but {len(colors)} color_tokens"
            )
        for group in nouns + colors:
            if any(i >= self.num_tokens for i in group):
                raise ValueError(
                    f"TokenAlignment({self.encoder!r}) index out of range for num_tokens={self.num_tokens}"
                )
        object.__setattr__(self, "noun_tokens", nouns)
        object.__setattr__(self, "color_tokens", colors)


@dataclass(frozen=True)
class PromptSpec:
    """Everything a prompt asks for: entities, relations, token alignment.

    Attributes:
        prompt: the prompt text.
        entities: the objects, in text order for :func:`parse`, in GenEval
            ``include`` order for :func:`from_geneval` (so GenEval group
            indices stay valid); :meth:`in_text_order` reorders.
        relations: spatial relations between entities.
        tag: the GenEval tag when known (from_geneval), else None.
        alignments: one :class:`TokenAlignment` per text encoder, primary first.

    Example:
        >>> spec = parse("a photo of three red circles left of a blue square")
        >>> [(e.noun, e.count, e.color) for e in spec.entities]
        [('circle', 3, 'red'), ('square', 1, 'blue')]
        >>> spec.relation_rows(), spec.aspects
        (((0, 1, 0),), ('count', 'color', 'position'))
    """

    prompt: str
    entities: tuple[Entity, ...]
    relations: tuple[Relation, ...] = ()
    tag: str | None = None
    alignments: tuple[TokenAlignment, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ValueError(f"PromptSpec.prompt must be a string, got {type(self.prompt).__name__}")
        entities = tuple(self.entities)
        relations = tuple(self.relations)
        alignments = tuple(self.alignments)
        for i, entity in enumerate(entities):
            if not isinstance(entity, Entity):
                raise ValueError(f"PromptSpec.entities[{i}] must be an Entity, got {type(entity).__name__}")
            for what, span in (("word_span", entity.word_span), ("color_span", entity.color_span)):
                if span is not None and span[1] > len(self.prompt):
                    raise ValueError(
                        f"entities[{i}].{what} {span} lies outside the prompt (length {len(self.prompt)})"
                    )
        for i, relation in enumerate(relations):
            if not isinstance(relation, Relation):
                raise ValueError(f"PromptSpec.relations[{i}] must be a Relation, got {type(relation).__name__}")
            if relation.subject >= len(entities) or relation.object >= len(entities):
                raise ValueError(
                    f"relations[{i}] refers to entity {max(relation.subject, relation.object)} "
                    f"but the spec has {len(entities)} entities"
                )
        if self.tag is not None and self.tag not in GENEVAL_TAGS:
            raise ValueError(f"PromptSpec.tag must be None or one of {list(GENEVAL_TAGS)}, got {self.tag!r}")
        names = [a.encoder for a in alignments]
        if len(set(names)) != len(names):
            raise ValueError(f"PromptSpec.alignments has duplicate encoder names: {names}")
        for alignment in alignments:
            if not isinstance(alignment, TokenAlignment):
                raise ValueError(f"PromptSpec.alignments must hold TokenAlignment, got {type(alignment).__name__}")
            if len(alignment.noun_tokens) != len(entities):
                raise ValueError(
                    f"alignment {alignment.encoder!r} covers {len(alignment.noun_tokens)} entities, "
                    f"the spec has {len(entities)}"
                )
        if alignments:
            primary = alignments[0]
            for i, entity in enumerate(entities):
                if (entity.token_indices != primary.noun_tokens[i]
                        or entity.color_token_indices != primary.color_tokens[i]):
                    raise ValueError(
                        f"entities[{i}] token indices disagree with the primary alignment "
                        f"{primary.encoder!r}; build aligned specs with xlard.prompts.align"
                    )
        object.__setattr__(self, "entities", entities)
        object.__setattr__(self, "relations", relations)
        object.__setattr__(self, "alignments", alignments)

    # -- aspects ------------------------------------------------------------

    @property
    def has_count(self) -> bool:
        """Whether any entity has a target count (this includes "a dog": 1)."""
        return any(e.count is not None for e in self.entities)

    @property
    def has_color(self) -> bool:
        """Whether any entity has a color."""
        return any(e.color is not None for e in self.entities)

    @property
    def has_position(self) -> bool:
        """Whether the prompt has at least one spatial relation."""
        return bool(self.relations)

    @property
    def aspects(self) -> tuple[str, ...]:
        """The aspects present, in :data:`ASPECTS` order."""
        return tuple(a for a, present in zip(ASPECTS, self.aspect_mask()) if present)

    def aspect_mask(self) -> tuple[bool, bool, bool]:
        """(has_count, has_color, has_position): the confidence head's mask."""
        return (self.has_count, self.has_color, self.has_position)

    # -- convenient views ------------------------------------------------------

    @property
    def nouns(self) -> tuple[str, ...]:
        """Each entity's noun."""
        return tuple(e.noun for e in self.entities)

    @property
    def counts(self) -> tuple[int | None, ...]:
        """Each entity's target count (None: unspecified)."""
        return tuple(e.count for e in self.entities)

    @property
    def colors(self) -> tuple[str | None, ...]:
        """Each entity's color (None: no color asked)."""
        return tuple(e.color for e in self.entities)

    def relation_rows(self) -> tuple[tuple[int, int, int], ...]:
        """Relations as (subject, object, code) rows for the ops layer.

        Returns:
            One (a, b, code) per relation: "entity a is <code> of entity b",
            code from :data:`RELATION_CODES`.
        """
        return tuple((r.subject, r.object, r.code) for r in self.relations)

    # -- tokens -----------------------------------------------------------------

    @property
    def encoders(self) -> tuple[str, ...]:
        """Names of the aligned text encoders, primary first."""
        return tuple(a.encoder for a in self.alignments)

    def alignment(self, encoder: str | None = None) -> TokenAlignment:
        """The :class:`TokenAlignment` of one encoder (default: the primary).

        Raises:
            ValueError: the spec has no alignment, or none of that name.
        """
        if not self.alignments:
            raise ValueError(
                "this PromptSpec has no token alignment; pass tokenizer= to parse/from_geneval "
                "or call xlard.prompts.align(spec, tokenizer)"
            )
        if encoder is None:
            return self.alignments[0]
        for alignment in self.alignments:
            if alignment.encoder == encoder:
                return alignment
        raise ValueError(f"no alignment for encoder {encoder!r}; this spec has {list(self.encoders)}")

    def token_indices_for(self, encoder: str | None = None) -> tuple[tuple[int, ...], ...]:
        """Per entity, the noun's token indices in ``encoder``'s own sequence."""
        return self.alignment(encoder).noun_tokens

    def color_token_indices_for(self, encoder: str | None = None) -> tuple[tuple[int, ...], ...]:
        """Per entity, the color word's token indices in ``encoder``'s sequence."""
        return self.alignment(encoder).color_tokens

    def sequence_token_indices(
        self, segment_offsets: Mapping[str, int], *, colors: bool = False
    ) -> tuple[tuple[int, ...], ...]:
        """Per entity, token indices in a concatenated multi-encoder sequence.

        SD3's joint text sequence is [CLIP-L|CLIP-G (77, same positions) ; T5],
        so ``segment_offsets={"tokenizer": 0, "tokenizer_2": 0, "tokenizer_3": 77}``
        gives indices into that sequence. Indices from all listed encoders are
        shifted by their offset, merged and sorted.

        Args:
            segment_offsets: encoder name -> position of its first token in
                the concatenated sequence.
            colors: return the color words' tokens instead of the nouns'.

        Returns:
            One sorted tuple of indices per entity.

        Raises:
            ValueError: an encoder is unknown or an offset is negative.
        """
        merged: list[set[int]] = [set() for _ in self.entities]
        for name, offset in segment_offsets.items():
            if not isinstance(offset, int) or offset < 0:
                raise ValueError(f"segment offset of {name!r} must be an integer >= 0, got {offset!r}")
            alignment = self.alignment(name)
            groups = alignment.color_tokens if colors else alignment.noun_tokens
            for i, group in enumerate(groups):
                merged[i].update(offset + j for j in group)
        return tuple(tuple(sorted(s)) for s in merged)

    # -- reordering and conversion -------------------------------------------

    def in_text_order(self) -> PromptSpec:
        """The same spec with entities sorted by where their noun appears.

        Relations and alignments are re-indexed accordingly; the tag is kept.

        Raises:
            ValueError: some entity has no ``word_span``.
        """
        if any(e.word_span is None for e in self.entities):
            raise ValueError("in_text_order needs every entity's word_span")
        order = sorted(range(len(self.entities)), key=lambda i: self.entities[i].word_span)
        new_index = {old: new for new, old in enumerate(order)}
        return PromptSpec(
            prompt=self.prompt,
            entities=tuple(self.entities[i] for i in order),
            relations=tuple(
                dataclasses.replace(r, subject=new_index[r.subject], object=new_index[r.object])
                for r in self.relations
            ),
            tag=self.tag,
            alignments=tuple(
                dataclasses.replace(
                    a,
                    noun_tokens=tuple(a.noun_tokens[i] for i in order),
                    color_tokens=tuple(a.color_tokens[i] for i in order),
                )
                for a in self.alignments
            ),
        )

    def to_geneval(self, tag: str | None = None) -> dict[str, Any]:
        """This spec as a GenEval metadata record.

        Entities become ``include`` items (count None is written as 1); a
        relation becomes its subject's ``position`` clause; the counting tag
        gets GenEval's "exactly n" ``exclude`` clause (count + 1).

        Args:
            tag: the record's tag; default: :attr:`tag`, else
                :func:`infer_geneval_tag`.

        Returns:
            A dict that passes :func:`xlard.geneval.validate_record`.

        Raises:
            ValueError: an entity is the subject of two relations (GenEval
                allows one ``position`` per item) or no tag fits.
        """
        tag = tag if tag is not None else (self.tag if self.tag is not None else infer_geneval_tag(self))
        include: list[dict[str, Any]] = []
        for entity in self.entities:
            item: dict[str, Any] = {"class": entity.noun, "count": 1 if entity.count is None else entity.count}
            if entity.color is not None:
                item["color"] = entity.color
            include.append(item)
        for relation in self.relations:
            item = include[relation.subject]
            if "position" in item:
                raise ValueError(
                    f"entity {relation.subject} ({item['class']!r}) is the subject of two relations; "
                    "GenEval records allow one position per include item"
                )
            item["position"] = [_GENEVAL_RELATION_NAMES[relation.relation], relation.object]
        record: dict[str, Any] = {"tag": tag, "include": include}
        if tag == "counting":
            record["exclude"] = [{"class": it["class"], "count": it["count"] + 1} for it in include]
        record["prompt"] = self.prompt
        validate_record(record)
        return record


def infer_geneval_tag(spec: PromptSpec) -> str:
    """The GenEval tag whose template ``spec`` follows.

    Relations -> "position"; one entity: colored -> "colors", count > 1 ->
    "counting", else "single_object"; two entities: any color ->
    "color_attr", else "two_object".

    Raises:
        ValueError: no GenEval tag fits (e.g. three or more unrelated entities).
    """
    entities = spec.entities
    if spec.relations:
        return "position"
    if len(entities) == 1:
        entity = entities[0]
        if entity.color is not None:
            return "colors"
        if entity.count is not None and entity.count != 1:
            return "counting"
        return "single_object"
    if len(entities) == 2:
        return "color_attr" if any(e.color is not None for e in entities) else "two_object"
    raise ValueError(f"no GenEval tag fits a spec with {len(entities)} entities and no relation")


# ---------------------------------------------------------------------------
# The parser's lexicon
# ---------------------------------------------------------------------------

_NUMBER_WORDS: Mapping[str, int] = {
    "zero": 0, "no": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
    "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11,
    "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
}
_DEFINITE = frozenset({"the", "this", "that", "these", "those"})
_VAGUE = ("some", "several", "many", "multiple", "few", "various", "numerous", "a few", "a lot of", "lots of")

_TEMPLATE_WORDS = frozenset({
    "photo", "photograph", "picture", "image", "painting", "drawing", "rendering",
    "render", "illustration", "sketch", "pic", "snapshot", "shot", "closeup", "close-up",
})

# Words that are never an entity's noun (a piece made only of these is no entity).
_STOPWORDS = frozenset({
    "there", "here", "is", "are", "was", "were", "be", "being", "been", "it", "its",
    "they", "them", "their", "which", "who", "whose", "very", "also", "just", "only",
    "both", "each", "other", "another", "of", "side", "together", "sitting",
    "standing", "lying", "flying", "walking", "running", "playing", "placed",
    "positioned", "located", "shown", "visible", "single", "lone", "exactly", "total",
    "in", "all", "has", "have", "having", "small", "big", "large", "tiny", "huge",
})


@dataclass(frozen=True)
class _Lexicon:
    nouns: Mapping[tuple[str, ...], str]
    max_noun_len: int


def _build_lexicon(nouns: Iterable[str]) -> _Lexicon:
    table: dict[tuple[str, ...], str] = {}
    for noun in nouns:
        words = tuple(noun.strip().lower().split())
        if not words:
            raise ValueError(f"extra noun {noun!r} is empty")
        canonical = " ".join(words)
        table.setdefault(words, canonical)
        table.setdefault(tuple(pluralize(canonical).split()), canonical)
    # "people" is listed as a noun for generic prompts but means "person".
    table[("people",)] = "person"
    return _Lexicon(table, max(len(k) for k in table))


_DEFAULT_LEXICON: _Lexicon | None = None


@functools.lru_cache(maxsize=64)
def _lexicon_with(extra_nouns: tuple[str, ...]) -> _Lexicon:
    # from_geneval passes each record's classes; the cache makes repeats free.
    return _build_lexicon(KNOWN_NOUNS + extra_nouns)


def _default_lexicon() -> _Lexicon:
    global _DEFAULT_LEXICON
    if _DEFAULT_LEXICON is None:
        _DEFAULT_LEXICON = _build_lexicon(KNOWN_NOUNS)
    return _DEFAULT_LEXICON


def _phrase_table() -> dict[tuple[str, ...], tuple[str, str | None]]:
    table: dict[tuple[str, ...], tuple[str, str | None]] = {}
    for side in ("left", "right"):
        relation = f"{side}_of"
        for phrase in (
            (side, "of"), ("to", "the", side, "of"), ("on", "the", side, "of"),
            ("at", "the", side, "of"), ("to", side, "of"), ("on", side, "of"),
            (side, "side", "of"), ("to", "the", side, "side", "of"),
            ("on", "the", side, "side", "of"), ("on", "the", side, "hand", "side", "of"),
            ("to", "the", side, "hand", "side", "of"),
        ):
            table[phrase] = ("rel", relation)
        # Absolute placements ("a dog on the left") are not relations.
        for phrase in (("on", "the", side), ("to", "the", side), ("on", "the", side, "side"), ("at", "the", side)):
            table[phrase] = ("sep", None)
    for phrase in (("above",), ("over",), ("atop",), ("on", "top", "of"), ("on", "the", "top", "of")):
        table[phrase] = ("rel", "above")
    for phrase in (("below",), ("under",), ("beneath",), ("underneath",)):
        table[phrase] = ("rel", "below")
    for phrase in (
        ("and",), ("with",), ("plus",), ("&",), (",",), (";",), (".",), ("!",), ("?",),
        (":",), ("next", "to"), ("beside",), ("besides",), ("near",), ("behind",),
        ("in", "front", "of"), ("on",), ("at",), ("by",), ("against",), ("inside",),
        ("outside",), ("between",), ("among",), ("around",), ("as", "well", "as"),
        ("along", "with"), ("together", "with"), ("on", "top"), ("on", "the", "top"),
        ("at", "the", "top"), ("at", "the", "bottom"), ("on", "the", "bottom"),
        ("in", "the", "middle"), ("in", "the", "center"), ("in", "the", "centre"),
    ):
        table[phrase] = ("sep", None)
    return table


def _quantifier_table() -> dict[tuple[str, ...], tuple[str, int | None]]:
    table: dict[tuple[str, ...], tuple[str, int | None]] = {
        ("a",): ("number", 1), ("an",): ("number", 1),
        ("a", "pair", "of"): ("number", 2), ("a", "couple", "of"): ("number", 2),
        ("pair", "of"): ("number", 2), ("couple", "of"): ("number", 2),
        ("a", "dozen"): ("number", 12), ("dozen",): ("number", 12),
    }
    for word, value in _NUMBER_WORDS.items():
        table[(word,)] = ("number", value)
    for word in _DEFINITE:
        table[(word,)] = ("definite", None)
    for phrase in _VAGUE:
        table[tuple(phrase.split())] = ("vague", None)
    return table


def _color_table() -> dict[tuple[str, ...], str]:
    table: dict[tuple[str, ...], str] = {}
    singles = {c: c for c in COLORS}
    singles.update(_COLOR_ALIASES)
    for word, canonical in singles.items():
        table[(word,)] = canonical
        for modifier in _COLOR_MODIFIERS:
            table[(modifier, word)] = f"{modifier} {canonical}"
    for compound in _COMPOUND_COLORS:
        table[tuple(compound.split())] = compound
    return table


_PHRASES = _phrase_table()
_QUANTIFIERS = _quantifier_table()
_COLOR_PHRASES = _color_table()
_MAX_PHRASE = max(len(k) for k in _PHRASES)
_MAX_QUANTIFIER = max(len(k) for k in _QUANTIFIERS)
_MAX_COLOR = max(len(k) for k in _COLOR_PHRASES)

_WORD_RE = re.compile(r"\d+|[^\W\d_]+(?:['\-][^\W\d_]+)*|[^\w\s]")


@dataclass(frozen=True)
class _Word:
    text: str  # lower-cased
    start: int
    end: int


def _scan(prompt: str) -> list[_Word]:
    return [_Word(m.group().lower(), m.start(), m.end()) for m in _WORD_RE.finditer(prompt)]


def _match(
    words: Sequence[_Word], pos: int, table: Mapping[tuple[str, ...], Any], longest: int
) -> tuple[int, Any] | None:
    for length in range(min(longest, len(words) - pos), 0, -1):
        key = tuple(w.text for w in words[pos:pos + length])
        if key in table:
            return length, table[key]
    return None


def _template_end(words: Sequence[_Word], lexicon: _Lexicon) -> int:
    """Index just past a leading "a photo of" (or similar), else 0."""
    for i in range(min(len(words) - 1, 6)):
        if words[i].text in _TEMPLATE_WORDS and words[i + 1].text == "of":
            before = words[:i]
            # Only determiners and plain adjectives ("a realistic photo of") may precede.
            if all(
                w.text in ("a", "an", "the") or (
                    (w.text,) not in lexicon.nouns and (w.text,) not in _COLOR_PHRASES
                    and (w.text,) not in _QUANTIFIERS and (w.text,) not in _PHRASES
                )
                for w in before
            ):
                return i + 2
            return 0
    return 0


@dataclass
class _Piece:
    quantifier: tuple[str, int | None] | None = None
    words: list[_Word] = field(default_factory=list)

    def has_content(self) -> bool:
        return any(w.text not in _STOPWORDS for w in self.words)


@dataclass(frozen=True)
class _ParsedNP:
    noun: str
    count: int | None
    color: str | None
    noun_span: tuple[int, int]
    color_span: tuple[int, int] | None
    definite: bool


def _span(words: Sequence[_Word]) -> tuple[int, int]:
    return (words[0].start, words[-1].end)


def _parse_piece(piece: _Piece, lexicon: _Lexicon, strict: bool, prompt: str) -> _ParsedNP | None:
    words = piece.words
    # Color phrases anywhere in the piece (a color word may also be a noun: "orange").
    color_hits: list[tuple[int, int, str]] = []
    j = 0
    while j < len(words):
        hit = _match(words, j, _COLOR_PHRASES, _MAX_COLOR)
        if hit:
            color_hits.append((j, j + hit[0], hit[1]))
            j += hit[0]
        else:
            j += 1
    noun_hits: list[tuple[int, int, str]] = []
    j = 0
    while j < len(words):
        hit = _match(words, j, lexicon.nouns, lexicon.max_noun_len)
        if hit:
            noun_hits.append((j, j + hit[0], hit[1]))
            j += hit[0]
        else:
            j += 1
    covered_by_color = {k for s, e, _ in color_hits for k in range(s, e)}

    def fallback(lo: int) -> tuple[int, int, str] | None:
        for k in range(len(words) - 1, lo - 1, -1):
            w = words[k].text
            if k in covered_by_color or w in _STOPWORDS or not w[0].isalpha():
                continue
            if strict:
                raise ValueError(
                    f"unknown object noun {words[k].text!r} in prompt {prompt!r}; "
                    "pass extra_nouns=[...] or strict=False"
                )
            return (k, k + 1, _singularize_word(w))
        return None

    head: tuple[int, int, str] | None = None
    if noun_hits:
        head = noun_hits[-1]
        is_color_word = any(s == head[0] and e == head[1] for s, e, _ in color_hits)
        if is_color_word:
            # "an orange submarine": the color-noun is a color when a head follows.
            later = fallback(head[1])
            if later is not None:
                head = later
    else:
        head = fallback(0)
    if head is None:
        if color_hits:
            s, e, _ = color_hits[-1]
            raise ValueError(
                f"color {prompt[words[s].start:words[e - 1].end]!r} in prompt {prompt!r} "
                "is not followed by an object noun"
            )
        return None
    colors = [(s, e, c) for s, e, c in color_hits if e <= head[0]]
    distinct = list(dict.fromkeys(c for _, _, c in colors))
    if len(distinct) > 1:
        raise ValueError(
            f"object {head[2]!r} in prompt {prompt!r} has several colors {distinct}; "
            "one color per object is supported"
        )
    color = distinct[0] if distinct else None
    color_span = _span(words[colors[-1][0]:colors[-1][1]]) if colors else None
    kind, value = piece.quantifier if piece.quantifier else (None, None)
    return _ParsedNP(
        noun=head[2],
        count=value if kind == "number" else None,
        color=color,
        noun_span=_span(words[head[0]:head[1]]),
        color_span=color_span,
        definite=kind == "definite",
    )


# ---------------------------------------------------------------------------
# parse / from_geneval
# ---------------------------------------------------------------------------


def _check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("prompt is empty")
    return prompt


def parse(
    prompt: str,
    tokenizer: Any = None,
    *,
    extra_nouns: Iterable[str] = (),
    strict: bool = False,
    max_length: int | Mapping[str, int] | None = None,
) -> PromptSpec:
    """Parse a GenEval-style prompt into a :class:`PromptSpec`.

    Grammar, in short: an optional "a photo of" prefix; noun phrases
    ``[quantifier] [modifiers] [color] noun`` joined by "and", ",", "with" or a
    relation phrase. Quantifiers: "a"/"an", "one".."twenty", digits,
    "a pair of", "a couple of", "a dozen"; "the"/"some"/"several" or a bare
    plural leave the count None. Nouns: :data:`KNOWN_NOUNS` (multi-word ones
    such as "teddy bear" are one entity) plus ``extra_nouns``; otherwise the
    phrase's last content word. Plurals are singularized. Colors: :data:`COLORS`
    ("grey" -> "gray"), optionally "light"/"dark"/... + color. Relations
    ("subject REL object", between adjacent noun phrases): "left of", "to the
    left of", "on the left (side) of"; the same for right; "above", "over",
    "on top of", "atop"; "below", "under", "beneath", "underneath". "the X"
    after an earlier X refers to that entity. Absolute placements ("on the
    left"), "next to", "near", "behind", "in front of" are not relations.

    Args:
        prompt: the prompt text.
        tokenizer: None, a fast tokenizer, a sequence of them or a mapping
            name -> tokenizer; see :func:`align`.
        extra_nouns: more (multi-word) nouns to recognize.
        strict: refuse nouns outside the known vocabulary.
        max_length: truncation length(s) for :func:`align`.

    Returns:
        The spec, entities in text order, ``tag`` None.

    Raises:
        ValueError: empty prompt; no object noun; a color without a noun;
            two colors on one object; a relation without a subject or an
            object; an unknown noun under ``strict``; alignment errors.

    Example:
        >>> spec = parse("a photo of a dog right of a teddy bear")
        >>> spec.nouns, spec.relation_rows()
        (('dog', 'teddy bear'), ((0, 1, 1),))
    """
    prompt = _check_prompt(prompt)
    extra = tuple(extra_nouns)
    lexicon = _lexicon_with(extra) if extra else _default_lexicon()
    words = _scan(prompt)
    pos = _template_end(words, lexicon)

    # items: ("np", _Piece) | ("rel", relation, span) | ("sep",)
    items: list[tuple[Any, ...]] = []
    piece = _Piece()

    def close() -> None:
        nonlocal piece
        if piece.words or piece.quantifier:
            items.append(("np", piece))
        piece = _Piece()

    while pos < len(words):
        hit = _match(words, pos, _PHRASES, _MAX_PHRASE)
        if hit:
            length, (kind, relation) = hit
            close()
            if kind == "rel":
                items.append(("rel", relation, _span(words[pos:pos + length])))
            else:
                items.append(("sep",))
            pos += length
            continue
        word = words[pos]
        quantifier: tuple[int, tuple[str, int | None]] | None = None
        if word.text.isdigit():
            quantifier = (1, ("number", int(word.text)))
        else:
            quantifier = _match(words, pos, _QUANTIFIERS, _MAX_QUANTIFIER)
        if quantifier:
            # A quantifier starts a new noun phrase ("a dog wearing a hat").
            if piece.has_content():
                close()
            piece.quantifier = quantifier[1]
            pos += quantifier[0]
            continue
        piece.words.append(word)
        pos += 1
    close()

    entities: list[Entity] = []
    relations: list[Relation] = []
    item_entity: list[int | None] = []
    for item in items:
        if item[0] != "np":
            item_entity.append(None)
            continue
        np_ = _parse_piece(item[1], lexicon, strict, prompt)
        if np_ is None:
            item_entity.append(None)
            continue
        index = None
        if np_.definite:
            for k in range(len(entities) - 1, -1, -1):
                if entities[k].noun == np_.noun and np_.color in (None, entities[k].color):
                    index = k
                    break
        if index is None:
            entities.append(Entity(
                noun=np_.noun, count=np_.count, color=np_.color,
                word_span=np_.noun_span, color_span=np_.color_span,
            ))
            index = len(entities) - 1
        item_entity.append(index)

    for k, item in enumerate(items):
        if item[0] != "rel":
            continue
        _, relation, span = item
        phrase = prompt[span[0]:span[1]]
        subject = next((item_entity[m] for m in range(k - 1, -1, -1)
                        if item_entity[m] is not None), None)
        obj = next((item_entity[m] for m in range(k + 1, len(items))
                    if item_entity[m] is not None), None)
        if subject is None:
            raise ValueError(f"relation {phrase!r} in prompt {prompt!r} has no object noun before it")
        if obj is None:
            raise ValueError(f"relation {phrase!r} in prompt {prompt!r} has no object noun after it")
        if subject == obj:
            raise ValueError(f"relation {phrase!r} in prompt {prompt!r} relates {entities[subject].noun!r} to itself")
        relations.append(Relation(subject, relation, obj, span=span))

    if not entities:
        raise ValueError(f"no object noun found in prompt {prompt!r}")
    spec = PromptSpec(prompt=prompt, entities=tuple(entities), relations=tuple(relations))
    if tokenizer is not None:
        spec = align(spec, tokenizer, max_length=max_length)
    return spec


def _find_word(prompt: str, phrases: Iterable[str], lo: int, taken: list[tuple[int, int]]) -> tuple[int, int] | None:
    best: tuple[int, int] | None = None
    for phrase in phrases:
        pattern = r"(?<![\w])" + r"\s+".join(re.escape(w) for w in phrase.split()) + r"(?![\w])"
        for m in re.finditer(pattern, prompt, flags=re.IGNORECASE):
            span = (m.start(), m.end())
            if span[0] < lo or any(span[0] < e and span[1] > s for s, e in taken):
                continue
            if best is None or span[0] < best[0]:
                best = span
            break
    return best


def from_geneval(
    record: Mapping[str, Any],
    tokenizer: Any = None,
    *,
    max_length: int | Mapping[str, int] | None = None,
) -> PromptSpec:
    """Build the exact :class:`PromptSpec` of a GenEval metadata record.

    Nouns, counts, colors and relations come from the metadata, never from the
    text: entity ``i`` is ``include[i]`` (so GenEval group indices remain
    valid) and ``{"position": ["right of", j]}`` on item ``i`` becomes
    ``Relation(subject=i, relation="right_of", object=j)`` ("item i is right of
    item j"). The prompt text is used only to locate each entity's words (via
    :func:`parse`, else a whole-word search for the class, singular or plural),
    so that token indices can be filled.

    Args:
        record: a GenEval record (see :mod:`xlard.geneval`).
        tokenizer: optional tokenizer(s), as for :func:`align`.
        max_length: truncation length(s) for :func:`align`.

    Returns:
        The spec, with ``tag`` = the record's tag.

    Raises:
        ValueError: the record is malformed, or a tokenizer is given and some
            class cannot be found in the prompt text.

    Example:
        >>> spec = from_geneval({"tag": "position", "prompt": "a photo of a dog right of a teddy bear",
        ...     "include": [{"class": "teddy bear", "count": 1},
        ...                 {"class": "dog", "count": 1, "position": ["right of", 0]}]})
        >>> spec.nouns, spec.relation_rows()
        (('teddy bear', 'dog'), ((1, 0, 1),))
    """
    validate_record(record)
    prompt: str = record["prompt"]
    include = record["include"]
    classes = [" ".join(item["class"].lower().split()) for item in include]
    try:
        parsed: PromptSpec | None = parse(prompt, extra_nouns=classes)
    except ValueError:
        parsed = None

    spans: list[tuple[tuple[int, int] | None, tuple[int, int] | None]] = []
    matched: list[int | None] = []
    used: set[int] = set()
    for cls, item in zip(classes, include):
        color = item.get("color")
        choice = None
        if parsed is not None:
            candidates = [k for k, e in enumerate(parsed.entities) if k not in used and e.noun == cls]
            same_color = [k for k in candidates if parsed.entities[k].color == color]
            pool = same_color or candidates
            choice = pool[0] if pool else None
        if choice is not None:
            used.add(choice)
            entity = parsed.entities[choice]
            color_span = entity.color_span if color is not None and entity.color == color else None
            spans.append((entity.word_span, color_span))
        else:
            spans.append((None, None))
        matched.append(choice)

    # Text search for whatever parse could not place.
    taken = [s for s, _ in spans if s is not None]
    for i, (cls, item) in enumerate(zip(classes, include)):
        noun_span, color_span = spans[i]
        if noun_span is None:
            noun_span = _find_word(prompt, (cls, pluralize(cls)), 0, taken)
            if noun_span is not None:
                taken.append(noun_span)
        if color_span is None and noun_span is not None and item.get("color"):
            color_span = _find_color_before(prompt, item["color"], noun_span[0], taken)
        spans[i] = (noun_span, color_span)

    entities = tuple(
        Entity(
            noun=cls,
            count=item["count"],
            color=item.get("color") or None,
            word_span=noun_span,
            color_span=color_span,
        )
        for cls, item, (noun_span, color_span) in zip(classes, include, spans)
    )
    relations = []
    for i, item in enumerate(include):
        if item.get("position") is None:
            continue
        name, j = item["position"]
        relation = normalize_relation(name)
        span = None
        if parsed is not None and matched[i] is not None and matched[j] is not None:
            for r in parsed.relations:
                if (r.subject, r.object, r.relation) == (matched[i], matched[j], relation):
                    span = r.span
                    break
        relations.append(Relation(i, relation, j, span=span))
    spec = PromptSpec(prompt=prompt, entities=entities, relations=tuple(relations), tag=record["tag"])
    if tokenizer is not None:
        missing = [cls for cls, e in zip(classes, entities) if e.word_span is None]
        if missing:
            raise ValueError(
                f"cannot align GenEval record to tokens: class(es) {missing} not found in prompt {prompt!r}"
            )
        spec = align(spec, tokenizer, max_length=max_length)
    return spec


def _find_color_before(prompt: str, color: str, limit: int, taken: list[tuple[int, int]]) -> tuple[int, int] | None:
    lo = max((e for s, e in taken if e <= limit), default=0)
    words = [color] + [alias for alias, canonical in _COLOR_ALIASES.items() if canonical == color]
    best = None
    for word in words:
        pattern = r"(?<![\w])" + re.escape(word) + r"(?![\w])"
        for m in re.finditer(pattern, prompt, flags=re.IGNORECASE):
            if lo <= m.start() and m.end() <= limit and (best is None or m.start() > best[0]):
                best = (m.start(), m.end())
    return best


# ---------------------------------------------------------------------------
# Token alignment
# ---------------------------------------------------------------------------

# Hugging Face stores "no limit" as a huge sentinel (int(1e30)).
_NO_LIMIT = 1_000_000


def _named_tokenizers(tokenizer: Any) -> list[tuple[str, Any]]:
    if isinstance(tokenizer, Mapping):
        items = list(tokenizer.items())
        for name, _ in items:
            if not isinstance(name, str) or not name:
                raise ValueError(f"tokenizer names must be non-empty strings, got {name!r}")
    elif isinstance(tokenizer, (list, tuple)):
        items = [("tokenizer" if i == 0 else f"tokenizer_{i + 1}", t) for i, t in enumerate(tokenizer)]
    else:
        items = [("tokenizer", tokenizer)]
    if not items:
        raise ValueError("an empty collection of tokenizers was given")
    for name, tok in items:
        if tok is None:
            raise ValueError(f"tokenizer {name!r} is None")
    return items


def _encode_with_offsets(tokenizer: Any, text: str, name: str) -> tuple[list[tuple[int, int]], list[bool]]:
    """Offsets and special-token flags of ``text`` under ``tokenizer`` (no truncation)."""
    kind = type(tokenizer).__module__.split(".")[0]
    if kind == "tokenizers" and hasattr(tokenizer, "encode"):
        encoding = tokenizer.encode(text)
        return [tuple(o) for o in encoding.offsets], [bool(s) for s in encoding.special_tokens_mask]
    if hasattr(tokenizer, "is_fast") and callable(tokenizer):
        if not tokenizer.is_fast:
            raise ValueError(
                f"tokenizer {name!r} ({type(tokenizer).__name__}) is a slow tokenizer without character "
                "offsets; load the fast one, e.g. AutoTokenizer.from_pretrained(..., use_fast=True)"
            )
        try:
            encoding = tokenizer(
                text,
                add_special_tokens=True,
                truncation=False,
                return_offsets_mapping=True,
                return_special_tokens_mask=True,
                # The length check is ours (align's max_length); skip HF's warning.
                verbose=False,
            )
        except NotImplementedError as exc:
            raise ValueError(
                f"tokenizer {name!r} ({type(tokenizer).__name__}) cannot return offsets: {exc}"
            ) from None
        offsets = [tuple(o) for o in encoding["offset_mapping"]]
        special = [bool(s) for s in encoding["special_tokens_mask"]]
        return offsets, special
    raise ValueError(
        f"tokenizer {name!r} of type {type(tokenizer).__name__} is not supported: pass a Hugging Face "
        "fast tokenizer (transformers) or a tokenizers.Tokenizer"
    )


def _limit_for(tokenizer: Any, name: str, max_length: int | Mapping[str, int] | None) -> int | None:
    if isinstance(max_length, Mapping):
        value = max_length.get(name)
    else:
        value = max_length
    if value is None:
        model_max = getattr(tokenizer, "model_max_length", None)
        if isinstance(model_max, int) and 0 < model_max < _NO_LIMIT:
            return model_max
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"max_length for {name!r} must be an integer >= 1, got {value!r}")
    return value


def align(
    spec: PromptSpec,
    tokenizer: Any,
    *,
    max_length: int | Mapping[str, int] | None = None,
) -> PromptSpec:
    """Fill token indices of every entity for one or several text encoders.

    A token belongs to an entity's noun (or color word) when its character
    offsets overlap the word's ``word_span`` (``color_span``): multi-token
    words get all their tokens, a repeated word gets the tokens of its own
    occurrence, special tokens (BOS/EOS/pad) are never included. Indices count
    every token of the encoder's sequence, specials included, so they index
    the encoder's hidden states directly.

    Truncation mirrors what pipelines do: with a length limit L (``max_length``,
    else the tokenizer's ``model_max_length`` when set), the sequence keeps L
    tokens with its trailing special tokens at the end, so content tokens at
    positions >= L - (number of trailing specials) are dropped.

    Args:
        spec: a spec whose entities have ``word_span``.
        tokenizer: a Hugging Face fast tokenizer or ``tokenizers.Tokenizer``;
            a sequence of them (named "tokenizer", "tokenizer_2", "tokenizer_3",
            as diffusers pipelines name them); or a mapping name -> tokenizer.
            The first is the primary one and fills ``Entity.token_indices``.
        max_length: one limit for all, or a mapping name -> limit (e.g.
            ``{"tokenizer_3": 256}`` for SD3's T5).

    Returns:
        A new spec with ``alignments`` and the entities' primary indices set.

    Raises:
        ValueError: a slow or unsupported tokenizer; an entity without a
            ``word_span``; a word with no token (e.g. cut off by truncation).

    Example:
        >>> from transformers import AutoTokenizer                      # doctest: +SKIP
        >>> clip = AutoTokenizer.from_pretrained("openai/clip-vit-large-patch14")  # doctest: +SKIP
        >>> parse("a photo of two teddy bears", clip).entities[0].token_indices     # doctest: +SKIP
        (5, 6)
    """
    if not isinstance(spec, PromptSpec):
        raise ValueError(f"align expects a PromptSpec, got {type(spec).__name__}")
    for i, entity in enumerate(spec.entities):
        if entity.word_span is None:
            raise ValueError(f"entity {i} ({entity.noun!r}) has no word_span; cannot align it to tokens")
    named = _named_tokenizers(tokenizer)
    if isinstance(max_length, Mapping):
        unknown = set(max_length) - {n for n, _ in named}
        if unknown:
            raise ValueError(f"max_length names unknown tokenizer(s) {sorted(unknown)}")
    alignments = []
    for name, tok in named:
        offsets, special = _encode_with_offsets(tok, spec.prompt, name)
        limit = _limit_for(tok, name, max_length)
        total = len(offsets)
        content_limit = total
        num_tokens = total
        if limit is not None and total > limit:
            trailing = 0
            for flag in reversed(special):
                if not flag:
                    break
                trailing += 1
            content_limit = max(limit - trailing, 0)
            num_tokens = limit

        def tokens_of(span: tuple[int, int], what: str) -> tuple[int, ...]:
            start, end = span
            hits = [j for j, (s, e) in enumerate(offsets) if not special[j] and s < end and e > start]
            kept = tuple(j for j in hits if j < content_limit)
            if not kept:
                word = spec.prompt[start:end]
                if hits:
                    raise ValueError(
                        f"{what} {word!r} falls beyond tokenizer {name!r}'s length limit {limit} "
                        f"(its tokens start at {hits[0]}); shorten the prompt or raise max_length"
                    )
                raise ValueError(f"{what} {word!r} maps to no token of tokenizer {name!r}")
            return kept

        noun_tokens = tuple(tokens_of(e.word_span, "object noun") for e in spec.entities)
        color_tokens = tuple(
            tokens_of(e.color_span, "color word") if e.color_span is not None else ()
            for e in spec.entities
        )
        alignments.append(TokenAlignment(name, num_tokens, noun_tokens, color_tokens))
    primary = alignments[0]
    entities = tuple(
        dataclasses.replace(e, token_indices=primary.noun_tokens[i], color_token_indices=primary.color_tokens[i])
        for i, e in enumerate(spec.entities)
    )
    return dataclasses.replace(spec, entities=entities, alignments=tuple(alignments))
