"""English inflection of object nouns: plural <-> singular.

Known nouns (:data:`xlard.prompts.vocabulary.KNOWN_NOUNS` and their plurals)
map exactly through a table; other words follow English rules (an irregular
table, -ies, -es, -s).
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

from xlard.prompts.vocabulary import KNOWN_NOUNS

__all__ = ["pluralize", "singularize", "noun_forms"]


_UNINFLECTED: frozenset[str] = frozenset({
    "sheep", "deer", "fish", "moose", "bison", "salmon", "trout", "shrimp",
    "aircraft", "series", "species", "skis", "scissors", "broccoli", "people",
    # pair nouns, plural in form ("jeans" is no "jean"; "glasses" stays a glass's plural: "two glasses of water")
    "jeans", "pants", "trousers", "shorts", "tongs", "pliers", "binoculars", "goggles", "sunglasses", "eyeglasses",
    "spectacles", "tweezers", "leggings", "pajamas", "pyjamas",
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
    # -s words whose plural is -ses (the rules read "lenses" as "lense"), and -is words whose plural is -es
    "lens": "lenses", "gas": "gases", "octopus": "octopuses", "walrus": "walruses", "platypus": "platypuses",
    "virus": "viruses", "campus": "campuses", "circus": "circuses", "iris": "irises", "canvas": "canvases",
    "atlas": "atlases", "bonus": "bonuses", "chorus": "choruses", "hippopotamus": "hippopotamuses",
    "bias": "biases", "alias": "aliases", "bus": "buses", "plus": "pluses", "cosmos": "cosmoses",
    "crisis": "crises", "oasis": "oases", "thesis": "theses", "analysis": "analyses",
    # -ie words (the -ies rule read "movies" as "movy")
    "movie": "movies", "cookie": "cookies", "brownie": "brownies", "smoothie": "smoothies", "selfie": "selfies",
    "hoodie": "hoodies", "zombie": "zombies", "rookie": "rookies", "goalie": "goalies", "collie": "collies",
    "magpie": "magpies", "birdie": "birdies", "beanie": "beanies", "pixie": "pixies", "calorie": "calories",
}
_IRREGULAR_SINGULARS: Mapping[str, str] = {p: s for s, p in _IRREGULAR_PLURALS.items()}
# Plurals in use besides the ones above ("octopi" read as singular, "busses" as "buss").
_IRREGULAR_SINGULARS = {**_IRREGULAR_SINGULARS, "octopi": "octopus", "busses": "bus", "hippopotami": "hippopotamus",
                        "fungi": "fungus", "cacti": "cactus"}
_VOWELS = frozenset("aeiou")


def _noun_words(owner: str, noun) -> list[str]:
    """The lower-cased words of ``noun``; a non-string or a blank string is refused, naming ``owner``."""
    if not isinstance(noun, str):
        raise TypeError(f"{owner}: noun must be a non-empty string, got {_describe(noun)}")
    words = noun.strip().lower().split()
    if not words:
        raise ValueError(f"{owner}: cannot {owner} an empty noun; noun must be a non-empty string, got {noun!r}")
    return words


def _describe(value) -> str:
    """``value`` for an error message: its repr (shortened) and, unless it is None, its type."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return text if value is None else f"{text} ({type(value).__name__})"


def _pluralize_word(word: str) -> str:
    if word in _UNINFLECTED:
        return word
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if word in _IRREGULAR_SINGULARS or word in _known_plural_words():
        return word  # a known plural ("mice", "zebras", "dogs"): pluralizing it again gave "dogses"; other words
        # ending in -s are read as singular ("thermos", "bus"), as the contract says
    return _rule_plural(word)


def _rule_plural(word: str) -> str:
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if len(word) > 1 and word.endswith("y") and word[-2] not in _VOWELS:
        return word[:-1] + "ies"
    return word + "s"


@functools.lru_cache(maxsize=1)
def _known_plural_words() -> frozenset[str]:
    """The plural last words of the known nouns ("zebras", "pizzas": "-as" words read as singular otherwise)."""
    last = {noun.split()[-1] for noun in KNOWN_NOUNS}
    return frozenset(_IRREGULAR_PLURALS.get(w, _rule_plural(w)) for w in last if w not in _UNINFLECTED) - last


def _singularize_word(word: str) -> str:
    if word in _UNINFLECTED:
        return word
    if word in _IRREGULAR_SINGULARS:
        return _IRREGULAR_SINGULARS[word]
    if word in _IRREGULAR_PLURALS:  # a singular the rules would cut ("canvas" -> "canva", "lens" -> "len")
        return word
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
        ("sheep", "skis", "scissors") and the plurals of known nouns
        ("dogs", "mice", "zebras") come back unchanged.

    Raises:
        TypeError: ``noun`` is not a string.
        ValueError: ``noun`` is empty or blank.

    Example:
        >>> pluralize("computer mouse")
        'computer mice'
    """
    words = _noun_words("pluralize", noun)
    return " ".join(words[:-1] + [_pluralize_word(words[-1])])


def singularize(noun: str) -> str:
    """Singular of a (possibly multi-word) noun; known nouns are exact.

    Known nouns (:data:`KNOWN_NOUNS` and their plurals) map exactly; other
    words follow English rules (irregular table, -ies, -es, -s).

    Args:
        noun: a noun, singular or plural.

    Returns:
        The singular, lower-cased.

    Raises:
        TypeError: ``noun`` is not a string.
        ValueError: ``noun`` is empty or blank.

    Example:
        >>> singularize("wine glasses"), singularize("people"), singularize("penguins")
        ('wine glass', 'person', 'penguin')
    """
    words = tuple(_noun_words("singularize", noun))
    known = _known_forms().get(words)
    if known is not None:
        return known
    return " ".join(words[:-1] + (_singularize_word(words[-1]),))


def noun_forms(nouns: Iterable[str]) -> dict[tuple[str, ...], str]:
    """Table of word tuples -> canonical singular for ``nouns`` and their plurals.

    Args:
        nouns: singular nouns, possibly multi-word ("teddy bear").

    Returns:
        ``{("teddy", "bear"): "teddy bear", ("teddy", "bears"): "teddy bear", ...}``;
        ("people",) maps to "person".

    Raises:
        TypeError: ``nouns`` is not an iterable of strings (a single string is
            refused too: it would be read letter by letter).
        ValueError: a noun is empty.
    """
    if isinstance(nouns, (str, bytes, bytearray)) or not isinstance(nouns, Iterable):
        hint = f" (one noun? pass [{nouns!r}])" if isinstance(nouns, str) and nouns.strip() else ""
        raise TypeError(f"noun_forms: nouns must be an iterable of noun strings, got {_describe(nouns)}{hint}")
    table: dict[tuple[str, ...], str] = {}
    for i, noun in enumerate(nouns):
        if not isinstance(noun, str):
            raise TypeError(f"noun_forms: nouns must hold noun strings, got nouns[{i}] = {_describe(noun)}")
        words = tuple(noun.strip().lower().split())
        if not words:
            raise ValueError(f"noun_forms: extra noun {noun!r} is empty (nouns[{i}] must be a non-empty string)")
        canonical = " ".join(words)
        table.setdefault(words, canonical)
        table.setdefault(tuple(pluralize(canonical).split()), canonical)
        # the naive "+s" plural that prompt sets write ("a photo of four broccolis", GenEval's own; "computer
        # mouses", "taxis"): the rules leave "-is" words alone, so "broccolis" was a noun of its own
        if not words[-1].endswith("s"):
            table.setdefault(words[:-1] + (words[-1] + "s",), canonical)
    # "people" is listed as a noun for generic prompts but means "person".
    table[("people",)] = "person"
    return table


@functools.lru_cache(maxsize=1)
def _known_forms() -> Mapping[tuple[str, ...], str]:
    return noun_forms(KNOWN_NOUNS)
