"""The rule-based prompt parser (:func:`parse`) and GenEval records -> specs (:func:`from_geneval`)."""
from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from xlard.geneval import not_unicode, validate_record
from xlard.prompts.alignment import align
from xlard.prompts.inflection import _singularize_word, noun_forms, pluralize
from xlard.prompts.spec import Entity, PromptSpec, Relation, contradicting_relations, quote_prompt
from xlard.prompts.numbers import NUMBER_PATTERN, UNIT_WORDS, read_count
from xlard.prompts.vocabulary import ARRANGEMENT_NOUNS, COLLECTIVE_NOUNS, KNOWN_NOUNS, SCENE_NOUNS
from xlard.vocab import COLOR_ALIASES, COLOR_MODIFIER_WORDS, COLORS, COMPOUND_COLORS, normalize_relation

__all__ = ["parse", "from_geneval", "MAX_PROMPT_CHARS"]

# ---------------------------------------------------------------------------
# The parser's lexicon
# ---------------------------------------------------------------------------

_DEFINITE = frozenset({"the", "this", "that", "these", "those"})
_VAGUE = ("some", "several", "many", "multiple", "few", "various", "numerous", "a few", "a lot of", "lots of")
#: Words that bound or blur the number after them ("more than two dogs", "about five apples", "between three
#: and five"): the count is not that number, so it is not said (read as vague). Only before a number: "a book
#: about cats" keeps its words.
_BOUNDS = frozenset({("more", "than"), ("fewer", "than"), ("less", "than"), ("at", "least"), ("at", "most"),
                     ("up", "to"), ("about",), ("around",), ("approximately",), ("roughly",), ("nearly",),
                     ("almost",), ("between",), ("no", "more", "than"),
                     ("no", "fewer", "than"), ("no", "less", "than"), ("not", "more", "than")})
_MAX_BOUND = max(len(k) for k in _BOUNDS)
#: Nouns that name one pair: "a pair of scissors" is one of them, "a pair of shoes" two shoes.
_PAIR_NOUNS = frozenset({"scissors", "skis", "glasses", "jeans", "pants", "trousers", "shorts", "tongs", "pliers",
                         "binoculars", "goggles", "sunglasses", "eyeglasses", "spectacles", "tweezers", "leggings",
                         "pajamas", "pyjamas"})
#: A second number after these makes a range ("3 or 4 apples", "three to four", "between three and five").
_RANGE_WORDS = frozenset({"or", "to", "and", "-", "\u2012", "\u2013", "\u2014", "\u2015", "~",
                          "\u301c", "\uff5e"})  # "3 or 4", "3–4", "3~4" (a dash or tilde gave the upper number)
# (U+2010 and U+2011 are hyphens, read as "-" before words are split: see _AS_ASCII)

_TEMPLATE_WORDS = frozenset({
    "photo", "photograph", "picture", "image", "painting", "drawing", "rendering",
    "render", "illustration", "sketch", "pic", "snapshot", "shot", "closeup", "close-up",
    "scene", "view", "portrait", "depiction", "artwork", "watercolor", "photorealistic",
})

# What joins a leading "a photo" to its objects ("a photo showing two dogs" had an entity "photo"); "with" after a
# photograph's words only ("a painting with a gold frame" is a painting).
_TEMPLATE_LINKS = frozenset({"of", "showing", "featuring", "containing", "depicting", "shows", "features",
                             "contains", "depicts"})
_PHOTO_WORDS = frozenset({"photo", "photograph", "picture", "image", "pic", "snapshot", "shot", "closeup", "close-up"})
# Numbers a count may precede that describe its object, not count it ("two 20 dollar bills", "two 3 legged stools").
_DESCRIPTOR_UNITS = frozenset({"dollar", "euro", "cent", "star", "legged", "wheeled", "seater", "pack", "piece",
                               "person", "door", "speed", "story", "storey", "inch", "foot", "meter", "liter"})
# Verbs of a request ("show them playing", "draw them"): no object when bare (no article or count before them;
# "a car show", "a draw" keep theirs).
_REQUEST_VERBS = frozenset({"show", "draw", "create", "generate", "make", "give"})

# Words that are never an entity's noun (a piece made only of these is no entity).
_STOPWORDS = frozenset({
    "there", "here", "is", "are", "was", "were", "be", "being", "been", "it", "its",
    "they", "them", "their", "which", "who", "whose", "very", "also", "just", "only",
    "both", "each", "other", "another", "of", "side", "together", "sitting",
    "standing", "lying", "flying", "walking", "running", "playing", "placed",
    "positioned", "located", "shown", "visible", "single", "lone", "exactly", "total",
    "in", "all", "has", "have", "having", "small", "big", "large", "tiny", "huge",
    "up", "down", "out", "away", "off", "while", "where", "as", "that", "than", "into",
    "onto", "from", "through", "across", "over", "toward", "towards", "within", "to",
    "top", "bottom", "edge", "middle", "center", "centre", "front", "corner",
    # adverbs and conjunctions after a noun became the head ("a cat alone" -> "alone", "a dog but no cat" -> "but")
    "alone", "asleep", "awake", "nearby", "not", "but", "instead", "rather", "too", "either", "neither",
    # the one who asks and what they ask for ("show me three cats" had an entity "me", "I want two dogs" "want")
    "i", "me", "we", "us", "you", "please", "want", "wants",
    # what "let's", "what's", "he's" read as (a possessive or contraction reads as its first word)
    "let", "what", "he", "she", "one's",
    # places and ranks, not objects ("a dog on its left", "the first two dogs")
    "left", "right", "first", "second", "third", "last", "next",
})
# Size words, stopwords in noun phrases, may still modify a scene ("on a small stage").
_SIZE_WORDS = frozenset({"small", "big", "large", "tiny", "huge", "lone", "single"})
# Words that end a noun phrase that has content (the next one has no quantifier).
_PIECE_BREAKS = frozenset({"of", "in"})

# Prepositions that can open a scene phrase ("on snow", "at night", "against a
# white wall"); relation words are among them, so "a kite above the beach" is
# a kite in a setting, not a relation without an object.
_SETTING_PREPOSITIONS: frozenset[tuple[str, ...]] = frozenset(
    [(w,) for w in (
        "on", "in", "at", "under", "against", "across", "over", "through", "amid", "amidst",
        "among", "inside", "within", "along", "beneath", "underneath", "below", "above",
        "during", "into", "onto", "upon", "near", "by", "beside", "behind", "around",
        "throughout", "atop", "from", "toward", "towards", "beyond", "outside", "to",
        "facing", "overlooking",
    )] + [
        ("in", "front", "of"), ("on", "top", "of"), ("in", "the", "middle", "of"),
        ("in", "the", "center", "of"), ("in", "the", "centre", "of"), ("at", "the", "edge", "of"),
        ("on", "the", "edge", "of"), ("in", "the", "distance", "of"), ("next", "to"),
        ("surrounded", "by"), ("covered", "in"), ("covered", "with"), ("out", "of"), ("full", "of"),
    ]
)
# Words that open an arrangement phrase ("in a line", "forming a circle").
_ARRANGEMENT_PREPOSITIONS: frozenset[tuple[str, ...]] = frozenset(
    [("in",), ("into",), ("forming",), ("form",), ("forms",), ("formed",), ("making",)]
)
_SETTING_DETERMINERS = frozenset({"a", "an", "the", "this", "that", "its", "their", "his", "her", "one"})
# Phrases that say how objects stand relative to each other; no object is named.
_ARRANGEMENT_IDIOMS: tuple[tuple[str, ...], ...] = (
    ("side", "by", "side"), ("one", "after", "another"), ("one", "after", "the", "other"),
    ("one", "behind", "the", "other"), ("one", "by", "one"), ("back", "to", "back"),
    ("face", "to", "face"), ("next", "to", "each", "other"), ("next", "to", "one", "another"),
    ("in", "single", "file"), ("in", "a", "single", "file"), ("each", "other"), ("one", "another"),
    ("in", "formation"), ("in", "pairs"), ("in", "rows"), ("in", "lines"), ("in", "columns"),
    ("in", "unison"), ("in", "a", "huddle"),
)
_SETTING_PREP_TABLE = dict.fromkeys(_SETTING_PREPOSITIONS, True)
_ARRANGEMENT_PREP_TABLE = dict.fromkeys(_ARRANGEMENT_PREPOSITIONS, True)


@dataclass(frozen=True)
class _Lexicon:
    nouns: Mapping[tuple[str, ...], str]
    max_noun_len: int


def _build_lexicon(nouns: Iterable[str]) -> _Lexicon:
    table = noun_forms(nouns)
    return _Lexicon(table, max(len(k) for k in table))


_DEFAULT_LEXICON: _Lexicon | None = None


def _check_extra_nouns(extra_nouns) -> tuple[str, ...]:
    """A list of nouns; a string was taken letter by letter (each letter a noun) and an int failed in tuple()."""
    if isinstance(extra_nouns, (str, bytes)) or not isinstance(extra_nouns, Iterable):
        hint = f" (one noun? pass [{extra_nouns!r}])" if isinstance(extra_nouns, str) else ""
        raise TypeError(f"parse: extra_nouns must be a list of noun strings, got "
                        f"{type(extra_nouns).__name__}{hint}")
    extra = tuple(extra_nouns)
    bad = [n for n in extra if not isinstance(n, str) or not n.strip()]
    if bad:
        raise TypeError(f"parse: extra_nouns must hold non-empty noun strings, got {bad[0]!r}")
    for noun in extra:  # relation phrases are read first: such a noun was never found, without a word
        if tuple(noun.lower().split()) in _PHRASES:
            raise ValueError(f"parse: extra_nouns {noun!r} is a relation phrase or separator of the grammar; it "
                             "cannot be an object noun")
    return extra


def _check_parse_options(strict, max_length) -> None:
    """``strict='yes'`` counted as True; a max_length of -5 was taken when no tokenizer came to use it."""
    if not isinstance(strict, bool):
        raise TypeError(f"parse: strict must be a bool, got {strict!r}")
    limits = max_length.values() if isinstance(max_length, Mapping) else [] if max_length is None else [max_length]
    for value in limits:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"parse: max_length must be an integer >= 1, a mapping tokenizer name -> such an "
                             f"integer, or None, got {max_length!r}")


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
    # "on the bottom of" is T2I-CompBench's phrasing of "below", as "on the top of" is of "above" (it was a plain
    # separator: no relation)
    for phrase in (("below",), ("under",), ("beneath",), ("underneath",), ("on", "the", "bottom", "of")):
        table[phrase] = ("rel", "below")
    for phrase in (
        ("and",), ("with",), ("plus",), ("&",), (",",), (";",), (".",), ("!",), ("?",),
        (":",), ("next", "to"), ("beside",), ("besides",), ("near",), ("behind",),
        ("in", "front", "of"), ("on",), ("at",), ("by",), ("against",), ("inside",),
        ("outside",), ("between",), ("among",), ("around",), ("as", "well", "as"),
        ("along", "with"), ("together", "with"), ("on", "top"), ("on", "the", "top"),
        ("at", "the", "top"), ("at", "the", "bottom"), ("on", "the", "bottom"),
        ("in", "the", "middle"), ("in", "the", "center"), ("in", "the", "centre"),
        ("full", "of"), ("filled", "with"), ("made", "of"),
    ):
        table[phrase] = ("sep", None)
    return table


def _quantifier_table() -> dict[tuple[str, ...], tuple[str, int | None]]:
    table: dict[tuple[str, ...], tuple[str, int | None]] = {
        ("a",): ("number", 1), ("an",): ("number", 1),
        ("a", "pair", "of"): ("number", 2), ("a", "couple", "of"): ("number", 2),
        ("pair", "of"): ("number", 2), ("couple", "of"): ("number", 2),
        ("pairs", "of"): ("vague", None),  # "two pairs of shoes": an entity "pair" before
        ("a", "dozen"): ("number", 12), ("dozen",): ("number", 12),
    }
    # Other numbers are read by numbers.read_count; "no" is a count here only.
    table[("no",)] = ("number", 0)
    # "a cat without a dog", "a cat, not a dog", "a cat instead of a dog": the second one is asked absent (count 0;
    # "without" was read as the first one's noun)
    for lead in (("without",), ("not",), ("instead", "of"), ("rather", "than")):
        for det in ((), ("a",), ("an",), ("any",)):
            table[lead + det] = ("number", 0)
    for word in _DEFINITE:
        table[(word,)] = ("definite", None)
    for phrase in _VAGUE:
        table[tuple(phrase.split())] = ("vague", None)
    # "a flock of birds", "rows of houses": how many is not said.
    for noun in COLLECTIVE_NOUNS:
        plural = pluralize(noun)
        for head in ((noun,), ("a", noun), ("an", noun), ("one", noun), ("the", noun), (plural,)):
            table[head + ("of",)] = ("vague", None)
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
    # "light-blue", "sky-blue": one word to the tokenizer of prompts; it matched no color and was dropped silently
    for key, canonical in list(table.items()):
        if len(key) > 1:
            table.setdefault(("-".join(key),), canonical)
    return table


_PHRASES = _phrase_table()
_QUANTIFIERS = _quantifier_table()
_COLOR_PHRASES = _color_table()
_MAX_PHRASE = max(len(k) for k in _PHRASES)
_MAX_QUANTIFIER = max(len(k) for k in _QUANTIFIERS)
_MAX_COLOR = max(len(k) for k in _COLOR_PHRASES)

# Combining marks (an accent written as its own character: "pin\u0303ata") and zero-width characters join the letters
# around them (they split words: "pin~ata" read as "ata", "d\u200bogs" as "ogs"); alone they are skipped.
_MARKS = "\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
_ZW = "\u200b-\u200d\u2060\ufeff"
_LETTERS = rf"[^\W\d_](?:[^\W\d_]|[{_MARKS}]|[{_ZW}]+(?=[^\W\d_]))*"  # a zero-width character only inside a word
_WORD_RE = re.compile(NUMBER_PATTERN + rf"|{_LETTERS}(?:['\-]{_LETTERS})*|[^\w\s{_MARKS}{_ZW}]")
_ZERO_WIDTH = re.compile("[\u200b-\u200d\u2060\ufeff]")
_FULLWIDTH = {0xFF01 + i: 0x21 + i for i in range(94)}  # U+FF01..U+FF5E: the fullwidth forms of ASCII ! .. ~
# Read as ASCII before words are split (one character for one, so spans stay on the prompt): fullwidth forms, the
# typographic apostrophes phones and word processors type ("o’clock", "children’s") and the Unicode hyphens
# ("twenty‐one", "light‑blue"; a dash, U+2012-U+2015, stays a range mark: "3–4").
_AS_ASCII = {**_FULLWIDTH, 0x2018: 0x27, 0x2019: 0x27, 0x02BC: 0x27, 0x2010: 0x2D, 0x2011: 0x2D}
_DIGIT_RANGE = re.compile(r"(\d+)-(\d+)")  # "3-4 apples": a range, as "3 - 4" and "3–4" are
#: Longest prompt parsed (characters): T2I prompts are a few hundred; 100,000 took seconds per parse.
MAX_PROMPT_CHARS = 20_000


@dataclass(frozen=True)
class _Word:
    text: str  # lower-cased
    start: int
    end: int
    possessive: bool = False  # written with "'s" (text without it): a noun before its head ("a dog's bowl")


def _scan(prompt: str) -> list[_Word]:
    # Words are split after zero-width characters are dropped ("1\u200b0" is "10", "light-\u200bblue" one word) and
    # the characters of _AS_ASCII are read as ASCII; a word's text is read composed (NFC: "n" + a combining tilde is
    # "ñ") and lower-cased; its span stays on the prompt as written.
    text = prompt.translate(_AS_ASCII)
    where: list[int] | None = None  # index in the prompt of each character of ``text`` (None: the same)
    if _ZERO_WIDTH.search(text):
        where = [i for i, ch in enumerate(text) if not _ZERO_WIDTH.match(ch)]
        where.append(len(prompt))
        text = _ZERO_WIDTH.sub("", text)
    words = []
    matches = list(_WORD_RE.finditer(text))
    for k, m in enumerate(matches):
        start, end = (m.start(), m.end()) if where is None else (where[m.start()], where[m.end() - 1] + 1)
        word = unicodedata.normalize("NFC", m.group()).lower()
        digits = _DIGIT_RANGE.fullmatch(word)
        if digits and k + 1 < len(matches) and matches[k + 1].group().lower() in UNIT_WORDS:
            digits = None  # "a 3-4 year old boy", "a 5-10 minute walk": a measurement, one word as before (before
            # "star", "person": a range, "a 3-4 star hotel")
        if digits:  # "3-4": the two numbers and the hyphen between them, each a word
            hyphen = m.start() + len(digits.group(1))
            cut = hyphen if where is None else where[hyphen]
            after = hyphen + 1 if where is None else where[hyphen + 1]
            words += [_Word(digits.group(1), start, cut), _Word("-", cut, cut + 1), _Word(digits.group(2), after, end)]
            continue
        if len(word) > 2 and word.endswith("'s") and word != "one's":  # "one's own dog": a pronoun, no count
            # a possessive reads as its noun ("a woman's two cats", "a cat left of a dog's": it gave a noun "woman'"),
            # a contraction as its first word ("let's", "here's": stop words); the span keeps the "'s"
            words.append(_Word(word[:-2], start, end, possessive=True))
            continue
        words.append(_Word(word, start, end))
    return words


def _match(
    words: Sequence[_Word], pos: int, table: Mapping[tuple[str, ...], Any], longest: int
) -> tuple[int, Any] | None:
    for length in range(min(longest, len(words) - pos), 0, -1):
        key = tuple(w.text for w in words[pos:pos + length])
        if key in table:
            return length, table[key]
    return None


_MAX_SETTING_PREPOSITION = max(len(p) for p in _SETTING_PREPOSITIONS | _ARRANGEMENT_PREPOSITIONS)
_MAX_SETTING_MODIFIERS = 3
_NUMBER_WORD_RE = re.compile(r"\d+|zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve")


def _is_boundary(words: Sequence[_Word], pos: int, lexicon: _Lexicon) -> bool:
    """Whether a scene/arrangement noun at ``pos - 1`` ends its phrase.

    The next word must end the noun phrase (punctuation, a joiner, a relation,
    a participle, a quantifier...); an unknown plain word may be a noun the
    scene word modifies ("a snow globe"), so the phrase is not a setting.
    """
    if pos >= len(words):
        return True
    text = words[pos].text
    if not text[0].isalpha() or text in _STOPWORDS or text in ("of", "with", "and", "or", "but"):
        return True
    if _match(words, pos, _PHRASES, _MAX_PHRASE) or _match(words, pos, _QUANTIFIERS, _MAX_QUANTIFIER):
        return True
    if _NUMBER_WORD_RE.fullmatch(text) or any(
            tuple(w.text for w in words[pos:pos + len(idiom)]) == idiom for idiom in _ARRANGEMENT_IDIOMS):
        return True
    if _match(words, pos, _SETTING_PREP_TABLE, _MAX_SETTING_PREPOSITION):
        return True
    if (text,) in lexicon.nouns:
        return False
    return _looks_like_participle(text)


def _setting_length(words: Sequence[_Word], pos: int, lexicon: _Lexicon) -> int:
    """Length of a scene or arrangement phrase starting at ``pos`` (0: none).

    Scene phrases: a preposition, an optional determiner, up to three
    modifiers (colors included: "under a clear blue sky") and a scene noun
    (:data:`~xlard.prompts.vocabulary.SCENE_NOUNS`): "on snow", "in a large
    field", "at night". Arrangement phrases: "in"/"into"/"forming", an
    optional determiner, modifiers (numbers included, colors not: "in a blue
    square" names an object) and an arrangement noun: "in a line", "in two
    rows", "forming a circle"; plus fixed idioms ("side by side"). A word
    the lexicon knows as an object noun never counts as a modifier, so
    "on a wooden table" stays an object.
    """
    for idiom in _ARRANGEMENT_IDIOMS:
        if tuple(w.text for w in words[pos:pos + len(idiom)]) == idiom and _is_boundary(
                words, pos + len(idiom), lexicon):
            return len(idiom)
    for prepositions, nouns, arrangement in (
        (_ARRANGEMENT_PREP_TABLE, ARRANGEMENT_NOUNS, True),
        (_SETTING_PREP_TABLE, SCENE_NOUNS, False),
    ):
        hit = _match(words, pos, prepositions, _MAX_SETTING_PREPOSITION)
        if not hit:
            continue
        j = pos + hit[0]
        if j < len(words) and words[j].text in _SETTING_DETERMINERS:
            j += 1
        for _ in range(_MAX_SETTING_MODIFIERS + 1):
            if j >= len(words):
                break
            text = words[j].text
            # An object noun the lexicon knows ("on a blue square") is never scenery.
            if (text in nouns or _singularize_word(text) in nouns) and (arrangement or (text,) not in lexicon.nouns):
                end = j + 1
                # "a city street", "the night sky": a scene noun may modify another.
                while not arrangement and end < len(words) and (
                        words[end].text in nouns or _singularize_word(words[end].text) in nouns):
                    end += 1
                if _is_boundary(words, end, lexicon):
                    return end - pos
                break
            if not (text[0].isalpha() or (arrangement and text.isdigit())):
                break
            if words[j].possessive and not arrangement:  # "in a child's bedroom": an owner modifies the scene noun
                j += 1
                continue
            if ((text in _STOPWORDS and text not in _SIZE_WORDS) or _match(words, j, lexicon.nouns, lexicon.max_noun_len)
                    or _match(words, j, _PHRASES, _MAX_PHRASE)):
                break
            if arrangement and (text,) in _COLOR_PHRASES:
                break
            if not arrangement and (_NUMBER_WORD_RE.fullmatch(text) or (text,) in _QUANTIFIERS):
                break
            j += 1
    return 0


#: A request before the objects ("please draw", "show me", "I want", "generate"): skipped at the start of a prompt
#: only ("a car show", "a make of car" keep their words).
_REQUEST_WORDS = frozenset({"please", "i", "we", "want", "wants", "would", "like", "to", "can", "could", "you",
                            "show", "draw", "create", "generate", "make", "give", "me", "us"})


def _template_end(words: Sequence[_Word], lexicon: _Lexicon) -> int:
    """Index just past a leading request ("please draw") and "a photo of" (or similar), else 0."""
    start = 0
    while start < len(words) and words[start].text in _REQUEST_WORDS:
        start += 1
    if start and (start == len(words) or words[start - 1].text in ("to", "like", "would", "can", "could")):
        start = 0  # not a request before objects ("to the left of ..." as a whole prompt is the parser's to refuse)
    return start + _template_at(words[start:], lexicon)


def _template_at(words: Sequence[_Word], lexicon: _Lexicon) -> int:
    """Index just past a leading "a photo of" (or similar), else 0."""
    for i in range(min(len(words) - 1, 6)):
        if words[i].text in _TEMPLATE_WORDS and (words[i + 1].text in _TEMPLATE_LINKS or (
                words[i + 1].text == "with" and words[i].text in _PHOTO_WORDS)):
            before = words[:i]
            # Only determiners and plain adjectives ("a realistic photo of") may precede.
            if all(
                w.text in ("a", "an", "the") or w.possessive or (  # "a child's painting of": an owner
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
    quantifier_text: str = ""  # the words it was read from ("two", "a few", "without")
    counted: bool = False  # read as a number ("two", "12", "a dozen"), not a determiner ("a") or a phrase
    negated: str = ""  # "'two' after 'without'": refused if the phrase ends in an object with that count
    quantifier_at: int = 0  # len(words) when the quantifier was read: the words after it are "between"
    quantifier_span: tuple[int, int] = (0, 0)  # where the prompt writes it ("No" or "no", and what comes before)
    words: list[_Word] = field(default_factory=list)
    content: int = 0  # words not in _STOPWORDS, counted as they come (a scan per word was quadratic)

    def add(self, word: _Word) -> None:
        self.words.append(word)
        self.content += word.text not in _STOPWORDS

    def has_content(self) -> bool:
        return self.content > 0

    def set_quantifier(self, quantifier, text: str, counted: bool, span: tuple[int, int]) -> None:
        """The phrase's quantifier, with what is read back about it (every path that sets one sets all of it)."""
        self.quantifier, self.quantifier_text, self.counted = quantifier, text, counted
        self.quantifier_at, self.quantifier_span = len(self.words), span

    def lifted(self) -> bool:
        """A "but" after the quantifier ("not two but three cats"): the next count stands."""
        return any(w.text == "but" for w in self.words[self.quantifier_at:])

    def negating(self) -> bool:
        """The quantifier asks the object absent ("no", "without", "not"; "zero" and "0" are a count)."""
        return self.quantifier == ("number", 0) and self.quantifier_text not in ("zero", "0")


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


# Nouns that end like participles.
_ING_ED_NOUNS = frozenset({
    "building", "buildings", "painting", "paintings", "ceiling", "ring", "rings", "king", "wing", "wings",
    "string", "strings", "swing", "swings", "spring", "evening", "morning", "clothing", "wedding",
    "pudding", "stocking", "stockings", "earring", "earrings", "icing", "dumpling", "dumplings",
    "railing", "awning", "sapling", "saplings", "duckling", "ducklings", "seedling", "seedlings",
    "lightning", "bedding", "frosting", "clearing", "landing", "dwelling", "sled", "shed", "bed",
    "beds", "seed", "seeds", "reed", "reeds", "steed", "weed", "weeds", "flowerbed", "seabed",
    "riverbed", "bobsled", "hundred", "deed", "thing", "things", "sibling", "siblings",
})


def _looks_like_participle(word: str) -> bool:
    return len(word) > 3 and word.endswith(("ing", "ed")) and word not in _ING_ED_NOUNS


def _looks_like_verb_or_adverb(word: str) -> bool:
    return _looks_like_participle(word) or (len(word) > 4 and word.endswith("ly"))


def _couple_without_of(words, pos: int, lexicon: _Lexicon) -> tuple[int, tuple[str, int]] | None:
    """ "a couple dogs", "a pair red shoes": 2, when a plural noun follows (its colors skipped); "a couple walking
    a dog" keeps "couple" as the noun. (These read as one dog before.)"""
    if pos + 2 >= len(words) or words[pos].text not in ("a", "one") or words[pos + 1].text not in ("couple", "pair"):
        return None
    k = pos + 2
    color = _match(words, k, _COLOR_PHRASES, 3)
    if color:
        k += color[0]
    if k >= len(words):
        return None
    plural = words[k].text
    known = lexicon.nouns.get((plural,))
    if (known is not None and known != plural) or (known is None and _looks_plural(plural)):
        return 2, ("number", 2)
    return None


def _looks_plural(word: str) -> bool:
    return len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is"))


def _bounded_count(words, pos: int, prompt: str) -> int:
    """Length of a bounded or ranged count at ``pos`` ("more than two", "about five", "3 or 4", "three to four",
    "between three and five"), 0 when there is none."""
    start = pos
    needs_range = False
    for length in range(min(_MAX_BOUND, len(words) - pos), 0, -1):
        bound = tuple(w.text for w in words[pos:pos + length])
        if bound in _BOUNDS:
            counted = read_count(words, pos + length, prompt) if pos + length < len(words) else None
            if counted is None or counted[1] != "number":
                return 0
            needs_range = bound == ("between",)  # "a car between two trucks": a place, not a range
            pos += length + counted[0]
            break
    else:
        counted = read_count(words, pos, prompt)
        if counted is None or counted[1] != "number":
            return 0
        pos += counted[0]
        if pos + 1 < len(words) and words[pos].text == "or" and words[pos + 1].text in ("more", "fewer", "less", "so"):
            return pos + 2 - start  # "two or more dogs"
        needs_range = True  # a plain number is the count unless a second number makes a range ("3 or 4")
    if pos + 1 < len(words) and words[pos].text in _RANGE_WORDS:
        tail = read_count(words, pos + 1, prompt)
        if tail is not None and tail[1] == "number":
            return pos + 1 + tail[0] - start
    return 0 if needs_range else pos - start


_TRAILING_BOUNDS = frozenset({("or", "more"), ("or", "fewer"), ("or", "less"), ("or", "so"), ("at", "least"),
                              ("at", "most")})


def _trailing_bound(words, pos: int, piece: _Piece, prompt: str) -> int:
    """Length of a bound after a counted noun phrase ("three dogs or more", "five apples at least"), 0 when there is
    none (also when a number follows: "... at least two cats" bounds the next phrase)."""
    if piece.quantifier is None or piece.quantifier[0] != "number" or not piece.has_content() \
            or pos + 1 >= len(words) or (words[pos].text, words[pos + 1].text) not in _TRAILING_BOUNDS:
        return 0
    if pos + 2 < len(words) and read_count(words, pos + 2, prompt) is not None:
        return 0
    return 2


def _second_quantifier(piece: _Piece, new: tuple[str, int | None], text: str, counted: bool, prompt: str
                       ) -> tuple[tuple[str, int | None], bool]:
    """The quantifier of a noun phrase given two before its noun (the second used to replace the first: "a cat
    without two dogs" asked for 2 dogs, "several dozen eggs" for 12, "1 000 ants" for 0). Returns (quantifier,
    counted).

    Raises:
        ValueError: a number after a negation ("no three dogs": how many are *not* there), or two numbers in a row
            ("two three dogs", "1 000": digit groups are not read).
    """
    old = piece.quantifier
    if piece.lifted():  # "not one but two cats", "not two but three cats": the second is the count
        piece.negated = ""
        return new, counted
    if piece.negating():
        if piece.quantifier_text == "no" and text == "one":
            return old, piece.counted  # "no one around": no object
        start, end = piece.quantifier_span
        if prompt[start:end] in ("No", "NO") and text.isdigit() and prompt[:start].rstrip()[-1:].isalpha():
            return None, False  # "a Chanel No 5 perfume bottle": a name, no count ("No 3 dogs" opens a sentence)
        if new[0] == "number" and new[1] != 0:  # refused if the phrase ends in an object ("a cat without two dogs")
            piece.negated = f"count {text!r} after {piece.quantifier_text!r}"
            return new, counted
        return old, piece.counted  # "without the dog", "no such": still none
    if old[0] == "vague" and new[0] == "number" and piece.quantifier_text in _VAGUE:  # "several dozen", "a few dozen"
        return old, False  # (after a collective the number is the count: "a stack of five books")
    if old[0] == "number" and piece.counted and new[0] == "number" and counted \
            and len(piece.words) == piece.quantifier_at:  # nothing between: "two three dogs", not "1 in 3 dogs"
        raise ValueError(f"counts {piece.quantifier_text!r} and {text!r} in a row in prompt {quote_prompt(prompt)}: "
                         "write one whole number (digit groups such as '1 000' are not read)")
    return new, counted


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
    # The head noun comes before a verb that follows a noun ("pandas eating
    # bamboo", "two cats eating fish"): words from the verb on are not searched.
    hi = len(words)
    for k in range(1, len(words)):
        before = words[k - 1].text
        if (_looks_like_participle(words[k].text) and not _match(words, k, lexicon.nouns, lexicon.max_noun_len)
                and k - 1 not in covered_by_color
                and ((before,) in lexicon.nouns or _looks_plural(before) or k - 1 in {e - 1 for _, e, _ in noun_hits})):
            hi = k
            break
    noun_hits = [h for h in noun_hits if h[1] <= hi]

    def fallback(lo: int) -> tuple[int, int, str] | None:
        # Participles and adverbs ("penguins huddled", "cats sleeping quietly")
        # are no head noun unless the piece has nothing else after a quantifier.
        for allow_verbs in (False, piece.quantifier is not None):
            for k in range(hi - 1, lo - 1, -1):
                w = words[k].text
                if k in covered_by_color or w in _STOPWORDS or not w[0].isalpha():
                    continue
                if w in _REQUEST_VERBS and piece.quantifier is None:  # "show them playing": a verb, no object
                    continue
                if not allow_verbs and _looks_like_verb_or_adverb(w):
                    continue
                if strict:
                    raise ValueError(
                        f"unknown object noun {words[k].text!r} in prompt {quote_prompt(prompt)}; "
                        "pass extra_nouns=[...] or strict=False"
                    )
                return (k, k + 1, _singularize_word(w))
        return None

    head: tuple[int, int, str] | None = None
    if noun_hits:
        head = noun_hits[-1]
        is_color_word = any(s == head[0] and e == head[1] for s, e, _ in color_hits)
        rest = [k for k in range(head[1], hi) if words[k].text not in _STOPWORDS]
        if words[head[1] - 1].possessive:
            # "two children's bikes", "a dog's red widget": the owner's noun is no head when a word follows it
            head = fallback(head[1]) or head
        elif is_color_word:
            # "an orange submarine": the color-noun is a color when a head follows.
            later = fallback(head[1])
            if later is not None:
                head = later
        elif (len(rest) == 1 and rest[0] == head[1] and words[rest[0]].text[0].isalpha()
              and " ".join(w.text for w in words[head[0]:head[1]]) == head[2]
              and rest[0] not in covered_by_color and not _looks_like_verb_or_adverb(words[rest[0]].text)
              and not (piece.quantifier == ("number", 1) and _looks_plural(words[rest[0]].text))):
            # "a glass aquarium", "football players": a known noun (singular, as
            # modifiers are) before the unknown last word of the phrase; that
            # word is the head. After "a", a plural-looking word is a verb ("a
            # cat watches"); after a plural noun, a word is no head ("children
            # building").
            head = fallback(head[1]) or head
    else:
        head = fallback(0)
    if head is None:
        if color_hits:
            s, e, _ = color_hits[-1]
            raise ValueError(
                f"color {prompt[words[s].start:words[e - 1].end]!r} in prompt {quote_prompt(prompt)} "
                "is not followed by an object noun"
            )
        if piece.counted and piece.quantifier and piece.quantifier[0] == "number" and words \
                and not any(w.text[0].isalpha() for w in words):
            # "three 🐶 and a cat": the count was dropped without a word (a number with no words after it is a
            # label, a time or an age: "wearing number 10", "a clock at 5")
            raise ValueError(f"count {piece.quantifier_text!r} in prompt {quote_prompt(prompt)} is not followed by "
                             "an object noun")
        return None
    if piece.negated:
        raise ValueError(f"{piece.negated} in prompt {quote_prompt(prompt)} is negated: a negated count cannot be "
                         "scored; ask for the number that should be there, or for none ('no dogs')")
    colors = [(s, e, c) for s, e, c in color_hits if e <= head[0]]
    distinct = list(dict.fromkeys(c for _, _, c in colors))
    if len(distinct) > 1:
        raise ValueError(
            f"object {head[2]!r} in prompt {quote_prompt(prompt)} has several colors {distinct}; "
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
    if len(prompt) > MAX_PROMPT_CHARS:  # 100,000 characters took seconds; no text encoder reads that far
        raise ValueError(f"prompt {prompt[:40]!r}... is {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are "
                         "parsed (text encoders read the first few hundred)")
    why = not_unicode(prompt)  # a lone surrogate failed in the tokenizer
    if why is not None:
        shown = repr(prompt) if len(prompt) <= 80 else repr(prompt[:80]) + f"... ({len(prompt)} characters)"
        raise ValueError(f"prompt {shown} {why}")
    return prompt


def parse(
    prompt: str,
    tokenizer: Any = None,
    *,
    extra_nouns: Iterable[str] = (),
    strict: bool = False,
    max_length: int | Mapping[str, int] | None = None,
) -> PromptSpec:
    """Parse a GenEval- or DPG-Bench-style prompt into a :class:`PromptSpec`.

    Grammar, in short: an optional "a photo of" prefix; noun phrases
    ``[quantifier] [modifiers] [color] noun`` joined by "and", ",", "with",
    "of", "in" or a relation phrase. Nouns: :data:`KNOWN_NOUNS` (multi-word
    ones such as "teddy bear" are one entity) plus ``extra_nouns``; otherwise
    the phrase's last content word before a trailing verb ("pandas eating
    bamboo" -> panda). Plurals are singularized. Colors: :data:`COLORS`
    ("grey" -> "gray"), optionally "light"/"dark"/... + color. Relations
    ("subject REL object", between adjacent noun phrases): "left of", "to the
    left of", "on the left (side) of"; the same for right; "above", "over",
    "on top of", "atop"; "below", "under", "beneath", "underneath". "the X"
    after an earlier X refers to that entity. Absolute placements ("on the
    left"), "next to", "near", "behind", "in front of" are not relations.

    Not objects: scene, background, weather and time phrases after a
    preposition ("on snow", "in a large field", "at night", "against a white
    background", "under a blue sky"; nouns in
    :data:`~xlard.prompts.vocabulary.SCENE_NOUNS`), arrangement phrases ("in a
    line", "in two rows", "forming a circle", "side by side", "one after
    another"), and collective nouns, which make the amount vague ("a flock of
    birds", "rows of houses": count None). A relation whose other side is a
    setting ("a kite above the beach") is no relation. A word the lexicon
    knows as an object, or a colored one, stays an object ("on a wooden
    table", "in a blue square").

    Counts (see :mod:`xlard.prompts.numbers`): a whole number from 0 to
    :data:`MAX_COUNT` in digits or words: "a"/"an"/"one" (1), "two" ..
    "ninety-nine" ("twenty-one", "twenty one"), "a hundred", "a dozen", "two
    dozen", "half a dozen", "a pair of", "a couple of" (also without "of"
    before a plural noun: "a couple dogs"); "zero"/"no"/"0" give
    0 (which GenEval records cannot hold). "the"/"some"/"several"/"dozens
    of", a collective noun or a bare plural leave the count None. Ordinals
    ("2nd"), decades ("1990s"), compound adjectives ("5-year-old") and
    measurements ("a 3 meter tall giraffe", "a five story building") are not
    counts. A number the parser cannot represent is an error, never another
    number: negative ("-3 dogs"), not whole ("1.5 cats", "1/2", "half a
    cake", "one and a half apples"), exponents, digit grouping or suffixes
    ("1e3", "3,000", "10k"), or above :data:`MAX_COUNT` ("a million cats").

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
            object; an unknown noun under ``strict``; a count it cannot
            represent (above); alignment errors.

    Example:
        >>> parse("six penguins walking in a line on snow").entities[0].count
        6
        >>> spec = parse("a photo of a dog right of a teddy bear")
        >>> spec.nouns, spec.relation_rows()
        (('dog', 'teddy bear'), ((0, 1, 1),))
    """
    prompt = _check_prompt(prompt)
    extra = _check_extra_nouns(extra_nouns)
    _check_parse_options(strict, max_length if tokenizer is None else None)  # with one, align names the limit
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
        trailing = _trailing_bound(words, pos, piece, prompt)
        if trailing:  # "three dogs or more", "five apples at least": a bound, not the number (it kept the number)
            piece.quantifier, piece.counted = ("vague", None), False
            pos += trailing
            continue
        setting = _setting_length(words, pos, lexicon)
        if setting:
            close()
            items.append(("sep",))
            pos += setting
            continue
        bounded = _bounded_count(words, pos, prompt)
        if bounded:  # "more than two dogs", "3 or 4 apples": how many is not said exactly (before the phrases: "at")
            if piece.has_content():
                close()
            text = " ".join(w.text for w in words[pos:pos + bounded])
            if piece.lifted():
                piece.negated = ""  # "not two but 3 or 4 cats"
            elif piece.negating():  # "a cat without 3 or 4 dogs": negated, as a single number after "without" is
                piece.negated = f"count {text!r} after {piece.quantifier_text!r}"
            piece.set_quantifier(("vague", None), text, False, _span(words[pos:pos + bounded]))
            pos += bounded
            continue
        hit = _match(words, pos, _PHRASES, _MAX_PHRASE)
        if hit:
            length, (kind, relation) = hit
            close()
            after = words[pos + length].text if pos + length < len(words) else None
            if kind == "rel" and after in ("it", "them", "which", "whom"):
                raise ValueError(f"relation {' '.join(w.text for w in words[pos:pos + length])!r} in prompt "
                                 f"{quote_prompt(prompt)} points at {after!r}; name its object instead (it was "
                                 "taken to be the next object named, or the relation was reversed)")
            if kind == "rel" and pos and words[pos - 1].text in ("not", "never"):
                raise ValueError(f"relation {' '.join(w.text for w in words[pos:pos + length])!r} in prompt "
                                 f"{quote_prompt(prompt)} is negated ({words[pos - 1].text!r}); a negated relation "
                                 "cannot be scored: rephrase it as the relation that should hold")
            if kind == "rel":
                items.append(("rel", relation, _span(words[pos:pos + length])))
            else:
                items.append(("sep",))
            pos += length
            continue
        word = words[pos]
        quantifier: tuple[int, tuple[str, int | None]] | None = None
        counted = read_count(words, pos, prompt)
        couple = _couple_without_of(words, pos, lexicon)
        if couple is not None:
            counted = (couple[0], *couple[1])
        if counted is not None and counted[1] == "number" and piece.counted and not piece.has_content() \
                and pos + counted[0] < len(words) and words[pos + counted[0]].text in _DESCRIPTOR_UNITS:
            pos += counted[0] + 1  # "two 20 dollar bills", "one 5 star hotel": after a count, a description
            continue
        if counted is not None:
            length, kind, value = counted
            if kind == "measure":
                # "a 3 meter tall giraffe": a modifier, neither a count nor a noun.
                pos += length
                continue
            quantifier = (length, (kind, value))
        else:
            quantifier = _match(words, pos, _QUANTIFIERS, _MAX_QUANTIFIER)
        if quantifier and quantifier[1] == ("number", 2) and words[pos + quantifier[0] - 1].text == "of" \
                and words[pos + quantifier[0] - 2].text == "pair":
            after = pos + quantifier[0]
            color = _match(words, after, _COLOR_PHRASES, _MAX_COLOR) if after < len(words) else None
            after += color[0] if color else 0  # "a pair of blue jeans" is one pair too
            if after < len(words) and words[after].text in _PAIR_NOUNS:
                quantifier = (quantifier[0], ("number", 1))  # "a pair of scissors" is one pair (skis: GenEval's)
        if quantifier:
            # A quantifier starts a new noun phrase ("a dog wearing a hat").
            text = " ".join(w.text for w in words[pos:pos + quantifier[0]])
            counted_here = counted is not None and text not in ("a", "an")
            if piece.has_content() and piece.words[-1].possessive:
                piece = _Piece()  # "a woman's two cats": the owner determines the phrase after it, no object of its own
            elif piece.has_content():
                close()
            elif piece.quantifier is not None:  # a second quantifier before any noun ("two three dogs")
                chosen, counted_here = _second_quantifier(piece, quantifier[1], text, counted_here, prompt)
                if chosen != quantifier[1]:
                    piece.quantifier, piece.counted = chosen, counted_here
                    pos += quantifier[0]
                    continue
            piece.set_quantifier(quantifier[1], text, counted_here, _span(words[pos:pos + quantifier[0]]))
            pos += quantifier[0]
            continue
        if word.text in _PIECE_BREAKS and piece.has_content():
            # "a bowl of strawberries", "two chefs in white hats": a new noun phrase.
            close()
            pos += 1
            continue
        piece.add(word)
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
            raise ValueError(f"relation {phrase!r} in prompt {quote_prompt(prompt)} has no object noun before it")
        if obj is None:
            raise ValueError(f"relation {phrase!r} in prompt {quote_prompt(prompt)} has no object noun after it")
        if subject == obj:
            raise ValueError(f"relation {phrase!r} in prompt {quote_prompt(prompt)} relates {entities[subject].noun!r} to itself")
        relations.append(Relation(subject, relation, obj, span=span))

    if not entities:
        raise ValueError(f"no object noun found in prompt {quote_prompt(prompt)}")
    clash = contradicting_relations(relations)
    if clash is not None:  # named by the prompt's words, as the other errors (it was PromptSpec's indices)
        first, second = (relations[k] for k in clash)
        said = [f"{entities[r.subject].noun!r} {r.relation.replace('_', ' ')} {entities[r.object].noun!r}"
                for r in (first, second)]
        raise ValueError(f"relations {prompt[first.span[0]:first.span[1]]!r} and "
                         f"{prompt[second.span[0]:second.span[1]]!r} in prompt {quote_prompt(prompt)} contradict "
                         f"each other ({said[0]}, and {said[1]}); ask for one of them")
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


def _record_color(color: Any) -> Any:
    """A record's color as its class is read: lower-cased, spaces collapsed ("Red", " red" were refused by Entity
    while the class "Dog" was lower-cased silently); anything else is left for Entity to name."""
    return " ".join(color.lower().split()) or None if isinstance(color, str) else color


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
        color = _record_color(item.get("color"))
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
        if color_span is None and noun_span is not None and _record_color(item.get("color")):
            color_span = _find_color_before(prompt, _record_color(item["color"]), noun_span[0], taken)
        spans[i] = (noun_span, color_span)

    entities = []
    for i, (cls, item, (noun_span, color_span)) in enumerate(zip(classes, include, spans)):
        try:
            entities.append(Entity(noun=cls, count=item["count"], color=_record_color(item.get("color")),
                                   word_span=noun_span, color_span=color_span))
        except ValueError as exc:  # named by the record's field, not Entity's ("Entity.color must be ...")
            raise ValueError(f"GenEval record include[{i}]: {exc}") from None
    entities = tuple(entities)
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
                f"cannot align GenEval record to tokens: class(es) {missing} not found in prompt {quote_prompt(prompt)}"
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
