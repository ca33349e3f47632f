"""The spec types: :class:`Entity`, :class:`Relation`, :class:`TokenAlignment`, :class:`PromptSpec`.

A spec is what a prompt asks for, in a form the rewards can check; it converts
to and from GenEval metadata records (:meth:`PromptSpec.to_geneval`,
:func:`infer_geneval_tag`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from xlard.geneval import validate_record
from xlard.vocab import ASPECTS, COLOR_ALIASES, GENEVAL_RELATION_NAMES, GENEVAL_TAGS, RELATION_CODES, RELATIONS

__all__ = ["Entity", "Relation", "TokenAlignment", "PromptSpec", "infer_geneval_tag"]


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



def quote_prompt(prompt: str, limit: int = 80) -> str:
    """``repr(prompt)``, cut to about ``limit`` characters for error messages (a 5000-character prompt would
    otherwise fill the one-line error).

    Example:
        >>> quote_prompt("a photo of " + "a cat and " * 20, limit=30)
        "'a photo of a cat and a c...' (211 characters)"
    """
    text = repr(prompt)
    if len(text) <= limit:
        return text
    return f"{text[:limit - 5]}...{text[0]} ({len(prompt)} characters)"

#: The largest count an entity may ask for (counts are int64 tensors in the rewards).
MAX_COUNT = 2**62


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
        for name, value in (("noun", self.noun), ("color", self.color)):
            # as parse() writes them: a "Dog" or " red" matched no map, label or color table later on
            if isinstance(value, str) and value.strip() and value != " ".join(value.lower().split()):
                raise ValueError(f"Entity.{name} must be lower-case words with single spaces, as parse() writes "
                                 f"it ({' '.join(value.lower().split())!r}), got {value!r}")
        if self.count is not None and (
            not isinstance(self.count, int) or isinstance(self.count, bool) or not 0 <= self.count <= MAX_COUNT
        ):  # 10**30 failed later as "Overflow when unpacking long long"
            raise ValueError(f"Entity.count must be None or an integer in [0, {MAX_COUNT}], got {self.count!r}")
        if self.color is not None and (not isinstance(self.color, str) or not self.color.strip()):
            raise ValueError(f"Entity.color must be None or a non-empty string, got {self.color!r}")
        if self.color in COLOR_ALIASES:
            raise ValueError(f"Entity.color must be the canonical name {COLOR_ALIASES[self.color]!r}, got "
                             f"{self.color!r}")
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
        if not isinstance(self.relation, str) or self.relation not in RELATION_CODES:  # a list: "unhashable"
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
        if not isinstance(self.num_tokens, int) or isinstance(self.num_tokens, bool) or self.num_tokens < 0:
            raise ValueError(f"TokenAlignment.num_tokens must be an integer >= 0, got {self.num_tokens!r}")
        for name in ("noun_tokens", "color_tokens"):
            if not isinstance(getattr(self, name), (tuple, list)):
                raise ValueError(f"TokenAlignment.{name} must be a tuple of token-index tuples (one per entity), "
                                 f"got {type(getattr(self, name)).__name__}")
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


def contradicting_relations(relations: Sequence[Relation]) -> tuple[int, int] | None:
    """The first pair ``(j, i)``, ``j < i``, of relations that contradict each other ("a dog left of right of a
    cat": the same two entities, opposite directions), or None."""
    said: dict[tuple[int, int, int], int] = {}
    for i, relation in enumerate(relations):
        a, b, code = relation.subject, relation.object, relation.code
        if a > b:  # "b right of a" says "a left of b": one form per pair (codes pair up as c, c ^ 1)
            a, b, code = b, a, code ^ 1
        j = said.get((a, b, code ^ 1))
        if j is not None:
            return j, i
        said.setdefault((a, b, code), i)
    return None


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
        >>> from xlard.prompts import parse
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
        for name in ("entities", "relations", "alignments"):  # None failed as "'NoneType' object is not iterable"
            value = getattr(self, name)
            if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
                raise ValueError(f"PromptSpec.{name} must be a sequence, got {type(value).__name__}")
        entities = tuple(self.entities)
        relations = tuple(self.relations)
        alignments = tuple(self.alignments)
        for alignment in alignments:
            if not isinstance(alignment, TokenAlignment):
                raise ValueError(f"PromptSpec.alignments must hold TokenAlignment, got {type(alignment).__name__}")
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
        clash = contradicting_relations(relations)
        if clash is not None:
            j, i = clash
            relation = relations[i]
            raise ValueError(f"PromptSpec.relations[{j}] and relations[{i}] contradict each other: entity "
                             f"{relations[j].subject} {relations[j].relation} entity {relations[j].object}, and "
                             f"entity {relation.subject} {relation.relation} entity {relation.object}")
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
        """Whether any entity that must be in the image has a color (an entity asked absent, "no blue squares",
        is judged by its count alone)."""
        return any(e.color is not None and e.count != 0 for e in self.entities)

    @property
    def has_position(self) -> bool:
        """Whether the prompt has at least one spatial relation between entities that must be in the image ("a
        circle left of no squares" places nothing)."""
        return any(self.places(r) for r in self.relations)

    def places(self, relation: Relation) -> bool:
        """Whether ``relation`` (one of :attr:`relations`) is between two entities that must be in the image: none
        asked absent (count 0; "a circle left of no squares" has nothing to place)."""
        return self.entities[relation.subject].count != 0 and self.entities[relation.object].count != 0

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
        if not isinstance(segment_offsets, Mapping):  # a list failed as "'list' object has no attribute 'items'"
            raise ValueError(f"segment_offsets must map encoder names to token offsets (e.g. {{'tokenizer': 0}}), "
                             f"got {type(segment_offsets).__name__}")
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
        gets GenEval's "exactly n" ``exclude`` clause (count + 1). GenEval
        judges include items in order, so a relation's object must come
        before its subject: items keep the entities' order except that an
        object is moved ahead of its subject when needed ("a dog right of a
        teddy bear" gives ``[teddy bear, dog (right of 0)]``, as GenEval's
        own metadata writes it). A record in GenEval's own form read by
        :func:`from_geneval` comes back unchanged: its prompt, tag and include
        items, and for counting the "exactly n" exclude (count + 1). Other
        exclude clauses (an "at least n" counting record without one, an
        exclude of another count or class) and extra keys are not kept: the
        spec holds what the prompt asks, and this writes GenEval's convention.

        Args:
            tag: the record's tag; default: :attr:`tag`, else
                :func:`infer_geneval_tag`.

        Returns:
            A dict that passes :func:`xlard.geneval.validate_record`.

        Raises:
            ValueError: an entity is the subject of two relations (GenEval
                allows one ``position`` per item), the relations form a cycle,
                an entity has count 0 (GenEval counts are >= 1), or no tag fits.
        """
        tag = tag if tag is not None else (self.tag if self.tag is not None else infer_geneval_tag(self))
        if tag == "position" and not self.relations:  # a position record with nothing to judge a position on
            raise ValueError(f"to_geneval: tag 'position' needs a relation, and prompt {quote_prompt(self.prompt)} "
                             "has none")
        target: dict[int, Relation] = {}
        for relation in self.relations:
            if relation.subject in target:
                raise ValueError(
                    f"entity {relation.subject} ({self.entities[relation.subject].noun!r}) is the subject of "
                    "two relations; GenEval records allow one position per include item"
                )
            target[relation.subject] = relation
        for i, entity in enumerate(self.entities):
            if entity.count == 0:
                raise ValueError(
                    f"entity {i} ({entity.noun!r}) has count 0; GenEval records have counts >= 1"
                )
        # Stable topological order: each entity after the object of its relation.
        order: list[int] = []
        placed: set[int] = set()
        while len(order) < len(self.entities):
            ready = [i for i in range(len(self.entities))
                     if i not in placed and (i not in target or target[i].object in placed)]
            if not ready:
                raise ValueError(
                    f"the relations of prompt {quote_prompt(self.prompt)} form a cycle; a GenEval record cannot hold them"
                )
            order.append(ready[0])
            placed.add(ready[0])
        new_index = {old: new for new, old in enumerate(order)}
        include: list[dict[str, Any]] = []
        for i in order:
            entity = self.entities[i]
            item: dict[str, Any] = {"class": entity.noun, "count": 1 if entity.count is None else entity.count}
            if entity.color is not None:
                item["color"] = entity.color
            if i in target:
                relation = target[i]
                item["position"] = [GENEVAL_RELATION_NAMES[relation.relation], new_index[relation.object]]
            include.append(item)
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
    if not isinstance(spec, PromptSpec):
        raise TypeError(f"infer_geneval_tag: spec must be a PromptSpec, got {type(spec).__name__}")
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
