"""The rule-based prompt parser (:func:`parse`) and GenEval records -> specs (:func:`from_geneval`)."""
from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from xlard.geneval import validate_record
from xlard.prompts.alignment import align
from xlard.prompts.inflection import _singularize_word, noun_forms, pluralize
from xlard.prompts.spec import Entity, PromptSpec, Relation
from xlard.prompts.vocabulary import KNOWN_NOUNS
from xlard.vocab import COLOR_ALIASES, COLOR_MODIFIER_WORDS, COLORS, COMPOUND_COLORS, normalize_relation

__all__ = ["parse", "from_geneval"]

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
    table = noun_forms(nouns)
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
    singles.update(COLOR_ALIASES)
    for word, canonical in singles.items():
        table[(word,)] = canonical
        for modifier in COLOR_MODIFIER_WORDS:
            table[(modifier, word)] = f"{modifier} {canonical}"
    for compound in COMPOUND_COLORS:
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
    words = [color] + [alias for alias, canonical in COLOR_ALIASES.items() if canonical == color]
    best = None
    for word in words:
        pattern = r"(?<![\w])" + re.escape(word) + r"(?![\w])"
        for m in re.finditer(pattern, prompt, flags=re.IGNORECASE):
            if lo <= m.start() and m.end() <= limit and (best is None or m.start() > best[0]):
                best = (m.start(), m.end())
    return best
