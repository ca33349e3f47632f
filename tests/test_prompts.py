"""Tests of xlard.prompts (prompt specs, parsing, token alignment) and xlard.geneval (JSONL I/O).

The prompt bank (tests/data/prompt_bank.jsonl) holds each prompt's expected
entities and relations, written by hand, and for GenEval-template prompts the
GenEval metadata record. Tokenizers are built here, offline, with the
`tokenizers` library: a CLIP-style BPE, a T5-style Unigram (SentencePiece
model) and a Llama/Qwen-style byte-level BPE.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from xlard import geneval
from xlard.prompts import (
    ABOVE,
    MAX_COUNT,
    ASPECTS,
    BELOW,
    COCO_CLASSES,
    COLORS,
    GENEVAL_COLORS,
    GENEVAL_OBJECT_NAMES,
    INVERSE_RELATION,
    LEFT_OF,
    RELATION_CODES,
    RELATIONS,
    RIGHT_OF,
    SHAPE_NOUNS,
    Entity,
    PromptSpec,
    Relation,
    TokenAlignment,
    align,
    from_geneval,
    infer_geneval_tag,
    normalize_relation,
    noun_forms,
    parse,
    pluralize,
    singularize,
)

BANK_PATH = Path(__file__).parent / "data" / "prompt_bank.jsonl"
BANK = [json.loads(line) for line in BANK_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]
RECORDS = [entry["record"] for entry in BANK if "record" in entry]


def _summary(spec: PromptSpec) -> dict:
    return {
        "entities": [{"noun": e.noun, "count": e.count, "color": e.color} for e in spec.entities],
        "relations": [[r.subject, r.relation, r.object] for r in spec.relations],
    }


# ---------------------------------------------------------------------------
# Constants and inflection
# ---------------------------------------------------------------------------


def test_relation_codes_match_the_ops_convention():
    assert (LEFT_OF, RIGHT_OF, ABOVE, BELOW) == (0, 1, 2, 3)
    assert RELATIONS == ("left_of", "right_of", "above", "below")
    assert all(RELATION_CODES[name] == code for code, name in enumerate(RELATIONS))
    assert all(INVERSE_RELATION[INVERSE_RELATION[r]] == r for r in RELATIONS)
    assert ASPECTS == ("count", "color", "position")
    # y grows downward: "a above b" is row (a, b, ABOVE), i.e. a has the smaller y.
    assert parse("a cat above a dog").relation_rows() == ((0, 1, ABOVE),)
    assert parse("a cat below a dog").relation_rows() == ((0, 1, BELOW),)


def test_vocabulary_lists():
    assert len(COCO_CLASSES) == 80 and len(set(COCO_CLASSES)) == 80
    assert len(GENEVAL_OBJECT_NAMES) == 80
    renamed = {a: b for a, b in zip(COCO_CLASSES, GENEVAL_OBJECT_NAMES) if a != b}
    assert renamed == {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
    assert GENEVAL_COLORS == ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
    assert set(GENEVAL_COLORS) <= set(COLORS) and {"gray", "cyan", "magenta"} <= set(COLORS)
    assert {"circle", "square", "triangle", "star"} <= set(SHAPE_NOUNS)


@pytest.mark.parametrize("name, expected", [
    ("left of", "left_of"), ("right of", "right_of"), ("Left_Of", "left_of"), ("above", "above"),
    ("BELOW", "below"), ("right-of", "right_of"),
])
def test_normalize_relation(name, expected):
    assert normalize_relation(name) == expected


def test_normalize_relation_rejects_unknown():
    with pytest.raises(ValueError, match="unknown relation 'next to'"):
        normalize_relation("next to")


@pytest.mark.parametrize("singular, plural", [
    ("dog", "dogs"), ("person", "people"), ("mouse", "mice"), ("goose", "geese"), ("sheep", "sheep"),
    ("knife", "knives"), ("bus", "buses"), ("wine glass", "wine glasses"), ("bench", "benches"),
    ("toothbrush", "toothbrushes"), ("strawberry", "strawberries"), ("skis", "skis"),
    ("scissors", "scissors"), ("teddy bear", "teddy bears"), ("computer mouse", "computer mice"),
    ("box", "boxes"), ("wolf", "wolves"), ("child", "children"), ("tv", "tvs"), ("hair drier", "hair driers"),
    ("potato", "potatoes"), ("leaf", "leaves"), ("day", "days"),
])
def test_pluralize_and_singularize(singular, plural):
    assert pluralize(singular) == plural
    assert singularize(plural) == singular
    assert singularize(singular) == singular


def test_pluralize_leaves_plurals_alone():
    """A plural given to pluralize was pluralized again: 'Dogs' -> 'dogses', 'mice' -> 'mices', 'zebras' ->
    'zebrases'. Only known plurals are left alone: an unknown -s word is a singular ("thermos": its plural is
    what noun_forms learns a user's noun by)."""
    from xlard.prompts import parse
    from xlard.prompts.vocabulary import KNOWN_NOUNS

    for word, plural in (("Dogs", "dogs"), ("mice", "mice"), ("zebras", "zebras"), ("wine glasses", "wine glasses"),
                         ("children", "children"), ("knives", "knives"), ("teddy bears", "teddy bears"),
                         ("thermos", "thermoses"), ("rhinoceros", "rhinoceroses"), ("bias", "biases"),
                         ("bus", "buses"), ("glass", "glasses"), ("gas", "gases"), ("lens", "lenses")):
        assert pluralize(word) == plural, word
    for noun in KNOWN_NOUNS:
        assert pluralize(pluralize(noun)) == pluralize(noun), noun
    assert [e.noun for e in parse("a photo of two thermoses", extra_nouns=["thermos"]).entities] == ["thermos"]


def test_singularize_unknown_words_by_rule():
    assert singularize("penguins") == "penguin"
    assert singularize("zebras") == "zebra"
    assert singularize("puppies") == "puppy"
    assert singularize("dresses") == "dress"
    assert singularize("houses") == "house"


@pytest.mark.parametrize("fn", [pluralize, singularize])
def test_pluralize_and_singularize_name_what_is_not_a_noun(fn):
    """Were an AttributeError ("'NoneType' object has no attribute 'strip'") or a bytes TypeError from inside."""
    name = fn.__name__
    for bad, shown in ((None, "None"), (3, r"3 \(int\)"), (b"x", r"b'x' \(bytes\)"), (["a"], r"\['a'\] \(list\)"),
                       (True, r"True \(bool\)")):
        with pytest.raises(TypeError, match=rf"^{name}: noun must be a non-empty string, got {shown}$"):
            fn(bad)
    for blank in ("", "  "):
        with pytest.raises(ValueError, match=rf"^{name}: cannot {name} an empty noun; noun must be a non-empty "
                                             rf"string, got {blank!r}$"):
            fn(blank)


def test_noun_forms_names_what_is_not_a_list_of_nouns():
    """Were "'NoneType' object is not iterable", "got 120 (int)" for b"x", and a str read letter by letter."""
    for bad, shown in ((None, "None"), (3, r"3 \(int\)"), (b"x", r"b'x' \(bytes\)"), ("", r"'' \(str\)"),
                       ("cat", r"'cat' \(str\) \(one noun\? pass \['cat'\]\)")):
        with pytest.raises(TypeError, match=rf"^noun_forms: nouns must be an iterable of noun strings, got {shown}$"):
            noun_forms(bad)
    with pytest.raises(TypeError, match=r"^noun_forms: nouns must hold noun strings, got nouns\[1\] = None$"):
        noun_forms(["cat", None])
    with pytest.raises(TypeError, match=r"^noun_forms: nouns must hold noun strings, got nouns\[0\] = b'x' \(bytes\)$"):
        noun_forms([b"x"])
    with pytest.raises(ValueError, match=r"^noun_forms: extra noun ' ' is empty \(nouns\[1\] must be a non-empty"):
        noun_forms(["cat", " "])
    table = noun_forms(iter(["Teddy  Bear"]))  # any iterable of strings still works
    assert table[("teddy", "bears")] == "teddy bear" and table[("people",)] == "person"


# ---------------------------------------------------------------------------
# The prompt bank
# ---------------------------------------------------------------------------


def test_bank_size_and_coverage():
    assert len(BANK) >= 150
    tags = {r["tag"] for r in RECORDS}
    assert tags == set(geneval.GENEVAL_TAGS)
    prompts = [e["prompt"] for e in BANK]
    templates = {
        "single_object": r"^a photo of an? [a-z ]+$",
        "two_object": r"^a photo of an? [a-z ]+ and an? [a-z ]+$",
        "counting": r"^a photo of (two|three|four|five|six|seven|eight|nine|ten|eleven|twelve) [a-z ]+$",
        "colors": r"^a photo of an? (%s) [a-z ]+$" % "|".join(GENEVAL_COLORS),
        "position": r"^a photo of an? [a-z ]+ (left of|right of|above|below) an? [a-z ]+$",
        "color_attr": r"^a photo of an? (%s) [a-z ]+ and an? (%s) [a-z ]+$" % (("|".join(GENEVAL_COLORS),) * 2),
    }
    for tag, pattern in templates.items():
        matching = [r["prompt"] for r in RECORDS if r["tag"] == tag]
        assert len(matching) >= 15, tag
        assert all(re.match(pattern, p) for p in matching), tag
    assert {rel for r in RECORDS for item in r["include"] if "position" in item
            for rel in [item["position"][0]]} == {"left of", "right of", "above", "below"}
    assert {c for r in RECORDS for item in r["include"] for c in [item.get("color")] if c} == set(GENEVAL_COLORS)
    assert len(set(prompts)) == len(prompts)


@pytest.mark.parametrize("entry", BANK, ids=[e["prompt"] for e in BANK])
def test_parse_bank(entry):
    spec = parse(entry["prompt"])
    assert _summary(spec) == {"entities": entry["entities"], "relations": entry["relations"]}
    assert spec.tag is None
    # Spans point at the words as written; the noun is their singular.
    starts = []
    for entity in spec.entities:
        surface = entry["prompt"][entity.word_span[0]:entity.word_span[1]].lower()
        assert singularize(" ".join(surface.split())) == entity.noun or entity.noun == "person"
        if entity.color is not None:
            color_words = entry["prompt"][entity.color_span[0]:entity.color_span[1]].lower()
            assert color_words.replace("grey", "gray") == entity.color
            assert entity.color_span[1] <= entity.word_span[0]
        starts.append(entity.word_span[0])
    assert starts == sorted(starts)
    for relation in spec.relations:
        phrase = entry["prompt"][relation.span[0]:relation.span[1]]
        assert phrase and relation.code == RELATION_CODES[relation.relation]


@pytest.mark.parametrize("record", RECORDS, ids=[r["prompt"] for r in RECORDS])
def test_from_geneval_bank(record):
    spec = from_geneval(record)
    assert spec.tag == record["tag"]
    assert [e.noun for e in spec.entities] == [i["class"] for i in record["include"]]
    assert [e.count for e in spec.entities] == [i["count"] for i in record["include"]]
    assert [e.color for e in spec.entities] == [i.get("color") for i in record["include"]]
    expected_relations = [
        (i, normalize_relation(item["position"][0]), item["position"][1])
        for i, item in enumerate(record["include"]) if "position" in item
    ]
    assert [(r.subject, r.relation, r.object) for r in spec.relations] == expected_relations
    # Same object as parse returns, once put in text order.
    parsed = parse(record["prompt"])
    assert dataclasses.replace(spec.in_text_order(), tag=None) == parsed
    # And back to GenEval.
    assert spec.to_geneval() == record
    assert infer_geneval_tag(spec) == record["tag"]


def test_geneval_position_semantics():
    record = {
        "tag": "position", "prompt": "a photo of a dog right of a teddy bear",
        "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
    }
    spec = from_geneval(record)
    assert spec.nouns == ("teddy bear", "dog")
    # include[1] (dog) is right of include[0] (teddy bear).
    assert spec.relations == (Relation(1, "right_of", 0, span=spec.relations[0].span),)
    assert spec.relation_rows() == ((1, 0, RIGHT_OF),)
    assert spec.prompt[slice(*spec.relations[0].span)] == "right of"
    assert spec.prompt[slice(*spec.entities[0].word_span)] == "teddy bear"
    assert parse(record["prompt"]).relation_rows() == ((0, 1, RIGHT_OF),)


def test_from_geneval_without_prompt_words():
    record = {"tag": "two_object", "prompt": "an abstract picture",
              "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
    spec = from_geneval(record)
    assert spec.nouns == ("cat", "dog") and all(e.word_span is None for e in spec.entities)
    with pytest.raises(ValueError, match=r"not found in prompt"):
        from_geneval(record, tokenizer=object())


def test_from_geneval_text_search_fallback():
    # A class the parser reads differently is still located in the text.
    record = {"tag": "colors", "prompt": "a photo of a green thing-a-ma-jig on display",
              "include": [{"class": "thing-a-ma-jig", "count": 1, "color": "green"}]}
    spec = from_geneval(record)
    entity = spec.entities[0]
    assert spec.prompt[slice(*entity.word_span)] == "thing-a-ma-jig"
    assert spec.prompt[slice(*entity.color_span)] == "green"


# ---------------------------------------------------------------------------
# Long DPG-Bench-style prompts: settings and arrangements are no objects
# ---------------------------------------------------------------------------

DPG = [e for e in BANK if e.get("kind") == "dpg"]
_ARRANGEMENT_WORDS = {"line", "row", "circle", "side", "pyramid", "file", "stack", "group", "pair", "herd", "flock"}


def test_dpg_bank_size_and_coverage():
    assert len(DPG) >= 60
    for entry in DPG:
        words = re.findall(r"[a-z']+", entry["prompt"].lower())
        assert len(words) >= 8, entry["prompt"]
        # Each word listed as "not an entity" really is in the prompt (singular or plural).
        for word in entry["not_entities"]:
            assert word in words or pluralize(word) in words, (entry["prompt"], word)
    with_arrangement = [e for e in DPG if _ARRANGEMENT_WORDS & set(e["not_entities"]) or "back to back" in e["prompt"]]
    with_setting = [e for e in DPG if set(e["not_entities"]) - _ARRANGEMENT_WORDS]
    several = [e for e in DPG if len(e["entities"]) >= 2]
    colored = [e for e in DPG if any(x["color"] for x in e["entities"])]
    assert len(with_arrangement) >= 20 and len(with_setting) >= 50 and len(several) >= 35 and len(colored) >= 30


@pytest.mark.parametrize("entry", DPG, ids=[e["prompt"] for e in DPG])
def test_dpg_settings_and_arrangements_are_not_entities(entry):
    nouns = parse(entry["prompt"]).nouns
    for word in entry["not_entities"]:
        assert singularize(word) not in nouns, (word, nouns)


@pytest.mark.parametrize("prompt, expected", [
    ("six penguins walking in a line on snow", [("penguin", 6, None)]),
    ("three dogs sitting in a row in a field at night", [("dog", 3, None)]),
    ("five stones arranged in a circle", [("stone", 5, None)]),
    ("two cats forming a line one after another", [("cat", 2, None)]),
    ("a kite above the beach", [("kite", 1, None)]),
    ("an apple against a white background", [("apple", 1, None)]),
    ("a flock of birds over the ocean", [("bird", None, None)]),
    ("rows of houses under a blue sky", [("house", None, None)]),
    # The same words as objects: a color, a known object noun, or no preposition.
    ("a red circle in a blue square", [("circle", 1, "red"), ("square", 1, "blue")]),
    ("a red line above a blue circle", [("line", 1, "red"), ("circle", 1, "blue")]),
    ("a cat on a wooden table", [("cat", 1, None), ("table", 1, None)]),
    ("a snow globe on a shelf", [("globe", 1, None), ("shelf", 1, None)]),
    ("a bird atop a traffic light", [("bird", 1, None), ("traffic light", 1, None)]),
    ("a dog under a tree", [("dog", 1, None), ("tree", 1, None)]),
])
def test_setting_and_arrangement_phrases(prompt, expected):
    spec = parse(prompt)
    assert [(e.noun, e.count, e.color) for e in spec.entities] == expected


def test_a_relation_into_a_setting_is_no_relation():
    assert parse("a kite above the beach").relations == ()
    assert parse("a dog under a tree").relation_rows() == ((0, 1, BELOW),)
    assert parse("a cat on the grass left of a dog").relation_rows() == ((0, 1, LEFT_OF),)


# ---------------------------------------------------------------------------
# Counts: what the parser reads as a number, and what it refuses
# ---------------------------------------------------------------------------

_TEENS = ["thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]


@pytest.mark.parametrize("word, value", list(zip(_TEENS, range(13, 21))))
def test_number_words_13_to_20(word, value):
    assert parse(f"a photo of {word} dogs").counts == (value,)
    assert parse(f"{word} red apples").entities[0].count == value


@pytest.mark.parametrize("prompt, count", [
    ("a dozen eggs", 12), ("dozen eggs", 12), ("two dozen eggs", 24), ("half a dozen eggs", 6),
    ("twenty-one cats", 21), ("twenty one cats", 21), ("ninety-nine balloons", 99), ("a hundred birds", 100),
    ("13 dogs", 13), (f"{MAX_COUNT} dogs", MAX_COUNT), ("zero cats", 0), ("no dogs", 0), ("0 apples", 0),
    ("eleven apples", 11), ("twelve apples", 12),
])
def test_whole_numbers(prompt, count):
    assert parse(prompt).counts == (count,)


@pytest.mark.parametrize("prompt, message", [
    # negative
    ("-3 dogs", "'-3' .* is negative"), ("-1 cat", "'-1' .* is negative"),
    ("a photo of -12 apples", "'-12' .* is negative"), ("three dogs and -2 cats", "'-2' .* is negative"),
    ("-0 dogs", "'-0' .* is negative"),
    # not whole: decimals and fractions
    ("1.5 cats", "'1.5' .* not a whole number"), ("2.0 dogs", "'2.0' .* not a whole number"),
    ("0.5 apples", "'0.5' .* not a whole number"), ("3.75 birds", "'3.75' .* not a whole number"),
    ("1/2 pizza", "'1/2' .* not a whole number"), ("half a cake", "'half a' .* fraction"),
    ("one and a half apples", "'one and a half' .* fraction"),
    ("two and a half oranges", "'two and a half' .* fraction"),
    # exponents, digit grouping, suffixes
    ("1e3 cats", "'1e3' .* not a whole number"), ("2E2 dogs", "'2e2' .* not a whole number"),
    ("3,000 ants", "'3,000' .* not a whole number"), ("1,000,000 stars", "'1,000,000' .* not a whole number"),
    ("10k birds", "'10k' .* not a whole number"), ("5x cats", "'5x' .* not a whole number"),
    # too large
    ("a million cats", "'a million' .* is 1000000, more than MAX_COUNT"),
    ("a thousand birds", "'a thousand' .* is 1000, more than MAX_COUNT"),
    (f"{MAX_COUNT + 1} dogs", f"is {MAX_COUNT + 1}, more than MAX_COUNT"),
    ("1000 dogs", "is 1000, more than MAX_COUNT"), ("three hundred cats", "'three hundred' .* is 300"),
    ("a hundred thousand stars", "'a hundred thousand' .* is 100000"),
    ("one billion ants", "'one billion' .* is 1000000000"),
])
def test_numbers_the_parser_cannot_represent_are_errors(prompt, message):
    with pytest.raises(ValueError, match=message):
        parse(prompt)


@pytest.mark.parametrize("prompt, expected", [
    # vague amounts: count unknown
    ("dozens of birds", [("bird", None)]), ("hundreds of lanterns", [("lantern", None)]),
    ("thousands of stars", [("star", None)]), ("millions of fish", [("fish", None)]),
    # numbers that are no count: ordinals, decades, compound adjectives, measurements
    ("the 2nd dog", [("dog", None)]), ("a 1990s car", [("car", 1)]), ("a 5-year-old boy", [("boy", 1)]),
    ("a 3 meter tall giraffe", [("giraffe", 1)]), ("a five story building", [("building", 1)]),
    ("a 2.5 liter bottle", [("bottle", 1)]), ("a bottle at -3 degrees", [("bottle", 1)]),
    ("two 10 inch pizzas", [("pizza", 2)]),
])
def test_vague_amounts_and_numbers_that_are_no_counts(prompt, expected):
    assert [(e.noun, e.count) for e in parse(prompt).entities] == expected


def test_count_zero_is_parsed_but_is_no_geneval_count():
    spec = parse("a photo of zero cats")
    assert spec.counts == (0,)
    with pytest.raises(ValueError, match="count 0; GenEval records have counts >= 1"):
        spec.to_geneval()


# ---------------------------------------------------------------------------
# Parser details
# ---------------------------------------------------------------------------


def test_aspects():
    assert parse("a photo of a dog").aspects == ("count",)
    assert parse("dogs and cats").aspects == ()
    assert parse("a red dog").aspect_mask() == (True, True, False)
    spec = parse("three red circles left of a blue square")
    assert spec.aspects == ASPECTS and spec.has_position and spec.has_color and spec.has_count
    assert parse("some red apples").aspects == ("color",)


def test_multiword_nouns_are_one_entity():
    for noun in [c for c in GENEVAL_OBJECT_NAMES if " " in c] + ["teddy bear", "hair drier"]:
        spec = parse(f"a photo of two {pluralize(noun)}")
        assert spec.nouns == (noun,) and spec.counts == (2,)


def test_every_geneval_class_parses_singular_and_plural():
    for noun in GENEVAL_OBJECT_NAMES + SHAPE_NOUNS:
        assert parse(f"a photo of a {noun}").nouns == (noun,)
        assert parse(f"a photo of seven {pluralize(noun)}").entities[0] == Entity(
            noun=noun, count=7, word_span=(17, 17 + len(pluralize(noun)))
        )


def test_coreference_with_the():
    spec = parse("a dog left of a cat and the dog below a bird")
    assert spec.nouns == ("dog", "cat", "bird")
    assert spec.relation_rows() == ((0, 1, LEFT_OF), (0, 2, BELOW))


def test_extra_nouns_and_strict():
    spec = parse("two flux capacitors above a time machine", extra_nouns=["flux capacitor", "time machine"])
    assert spec.nouns == ("flux capacitor", "time machine") and spec.counts == (2, 1)
    assert parse("a photo of a submarine").nouns == ("submarine",)
    with pytest.raises(ValueError, match="unknown object noun 'submarine'"):
        parse("a photo of a submarine", strict=True)
    assert parse("three red circles", strict=True).nouns == ("circle",)


@pytest.mark.parametrize("prompt, message", [
    ("", "prompt is empty"),
    ("   ", "prompt is empty"),
    ("a photo of", "no object noun"),
    ("a photo of a red", "'red' .* is not followed by an object noun"),
    ("left of a cat", "has no object noun before it"),
    ("a cat left of", "has no object noun after it"),
    ("a red blue car", r"several colors \['red', 'blue'\]"),
    ("a cat left of the cat", "relates 'cat' to itself"),
])
def test_parse_bad_input(prompt, message):
    with pytest.raises(ValueError, match=message):
        parse(prompt)


def test_parse_rejects_non_strings():
    with pytest.raises(ValueError, match="prompt must be a string, got int"):
        parse(3)


def test_dataclass_validation():
    with pytest.raises(ValueError, match="Entity.noun"):
        Entity(noun="")
    with pytest.raises(ValueError, match="Entity.count"):
        Entity(noun="dog", count=-1)
    with pytest.raises(ValueError, match="Entity.count"):
        Entity(noun="dog", count=True)
    with pytest.raises(ValueError, match="Entity.word_span"):
        Entity(noun="dog", word_span=(3, 3))
    with pytest.raises(ValueError, match="Entity.token_indices"):
        Entity(noun="dog", token_indices=(1, -2))
    # as parse() writes them (a "Dog" matched no map or label later; "grey" no color table)
    with pytest.raises(ValueError, match=r"Entity.noun must be lower-case .*\('dogs'\), got 'Dogs'"):
        Entity(noun="Dogs")
    with pytest.raises(ValueError, match=r"Entity.noun must be lower-case .*\('teddy bear'\)"):
        Entity(noun="teddy  bear")
    with pytest.raises(ValueError, match="Entity.color must be lower-case"):
        Entity(noun="dog", color=" red")
    with pytest.raises(ValueError, match="Entity.color must be the canonical name 'gray', got 'grey'"):
        Entity(noun="dog", color="grey")
    assert Entity(noun="teddy bear", color="light blue").color == "light blue"
    assert Entity(noun="dog", color="teal").color == "teal"  # open vocabulary: a CLIP source embeds any word
    # extra_nouns: a string was read letter by letter (each a noun), an int failed inside tuple()
    with pytest.raises(TypeError, match=r"extra_nouns must be a list of noun strings, got str \(one noun\? pass"):
        parse("a b", strict=True, extra_nouns="flibbertigibbet")
    with pytest.raises(TypeError, match="extra_nouns must be a list of noun strings, got int"):
        parse("two dogs", extra_nouns=3)
    with pytest.raises(TypeError, match="extra_nouns must hold non-empty noun strings, got 3"):
        parse("two dogs", extra_nouns=["cat", 3])
    with pytest.raises(ValueError, match="Relation.relation"):
        Relation(0, "left of", 1)
    with pytest.raises(ValueError, match="itself"):
        Relation(1, "above", 1)
    dog = Entity(noun="dog", count=1)
    with pytest.raises(ValueError, match="refers to entity 1 but the spec has 1 entities"):
        PromptSpec("a dog", (dog,), (Relation(0, "above", 1),))
    with pytest.raises(ValueError, match="outside the prompt"):
        PromptSpec("a dog", (Entity(noun="dog", word_span=(2, 9)),))
    with pytest.raises(ValueError, match="PromptSpec.tag"):
        PromptSpec("a dog", (dog,), tag="dogs")
    with pytest.raises(ValueError, match="covers 2 entities"):
        PromptSpec("a dog", (dog,), alignments=(TokenAlignment("t", 5, ((1,), (2,)), ((), ())),))
    with pytest.raises(ValueError, match="disagree with the primary alignment"):
        PromptSpec("a dog", (dog,), alignments=(TokenAlignment("t", 5, ((2,),), ((),)),))
    # Lists are accepted and stored as tuples, so specs stay hashable.
    spec = PromptSpec("a dog", [Entity(noun="dog", token_indices=[2])])
    assert spec.entities[0].token_indices == (2,) and hash(spec)


def test_to_geneval_and_infer_tag():
    assert parse("a photo of four dogs").to_geneval() == {
        "tag": "counting", "include": [{"class": "dog", "count": 4}],
        "exclude": [{"class": "dog", "count": 5}], "prompt": "a photo of four dogs",
    }
    assert infer_geneval_tag(parse("a photo of a red dog and a cat")) == "color_attr"
    assert infer_geneval_tag(parse("a photo of a cat")) == "single_object"
    with pytest.raises(ValueError, match="no GenEval tag fits"):
        infer_geneval_tag(parse("a cat, a dog and a bird"))
    with pytest.raises(ValueError, match="subject of two relations"):
        parse("a dog left of a cat and the dog above a bird").to_geneval(tag="position")


def test_to_geneval_puts_each_relation_object_before_its_subject():
    # GenEval judges include items in order: the target group must come first.
    record = parse("a photo of a dog right of a teddy bear").to_geneval()
    assert record["include"] == [{"class": "teddy bear", "count": 1},
                                 {"class": "dog", "count": 1, "position": ["right of", 0]}]
    chain = parse("a cat left of a dog and a bird above the dog").to_geneval(tag="position")
    assert chain["include"] == [{"class": "dog", "count": 1},
                                {"class": "cat", "count": 1, "position": ["left of", 0]},
                                {"class": "bird", "count": 1, "position": ["above", 0]}]
    with pytest.raises(ValueError, match="contradict each other"):  # each left of the other: no image holds it
        PromptSpec("a cat and a dog", (Entity("cat"), Entity("dog")),
                   (Relation(0, "left_of", 1), Relation(1, "left_of", 0)))
    # a cycle that an image can hold (cat left of dog, dog above cow, cow right of cat): no GenEval record can
    cycle = PromptSpec("a cat, a dog and a cow", (Entity("cat"), Entity("dog"), Entity("cow")),
                       (Relation(0, "left_of", 1), Relation(1, "above", 2), Relation(2, "right_of", 0)))
    with pytest.raises(ValueError, match="form a cycle"):
        cycle.to_geneval(tag="position")
    with pytest.raises(ValueError, match=r"entity 0 \('dog'\) has count 0; GenEval records have counts >= 1"):
        PromptSpec("zero dogs", (Entity("dog", count=0),)).to_geneval(tag="counting")


# ---------------------------------------------------------------------------
# GenEval JSONL
# ---------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "prompts.jsonl"
    assert geneval.write_jsonl(path, RECORDS) == path
    assert geneval.read_jsonl(path) == RECORDS
    assert [p.name for p in tmp_path.iterdir()] == ["prompts.jsonl"]


def test_write_jsonl_is_atomic(tmp_path):
    path = tmp_path / "prompts.jsonl"
    geneval.write_jsonl(path, RECORDS[:3])
    before = path.read_bytes()
    bad = [RECORDS[0], {"tag": "counting", "prompt": "x", "include": [{"class": "dog"}]}]
    with pytest.raises(ValueError, match=r"record 1: include\[0\] is missing the key 'count'"):
        geneval.write_jsonl(path, bad)
    with pytest.raises(ValueError, match="record 0: not JSON-serializable"):
        geneval.write_jsonl(path, [dict(RECORDS[0], extra=object())])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        geneval.write_jsonl(tmp_path / "missing" / "p.jsonl", RECORDS[:1])


def test_read_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(RECORDS[0])
    path.write_text(good + "\n\n" + '{"tag": "counting", "prompt": \n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: invalid JSON")):
        geneval.read_jsonl(path)
    path.write_text(good + "\n" + json.dumps({"tag": "colors", "include": []}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: GenEval record is missing the key 'prompt'")):
        geneval.read_jsonl(path)
    assert len(geneval.read_jsonl(path, validate=False)) == 2
    with pytest.raises(FileNotFoundError):
        geneval.read_jsonl(tmp_path / "nope.jsonl")
    # a key given twice was read as its last value ({"count": 1, "count": 3}: three circles), unlike the writer
    path.write_text(good + "\n" + good[:-1] + ', "tag": "colors"}\n')
    for validate in (True, False):
        with pytest.raises(ValueError, match=re.escape(f"{path}:2: invalid JSON (the key 'tag' is given twice")):
            geneval.read_jsonl(path, validate=validate)
    path.write_bytes(good.encode() + b"\n\xff\xfe" + good.encode() + b"\n")  # not UTF-8 on line 2
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not UTF-8 text (byte 0xff at column 1)")):
        geneval.read_jsonl(path)
    path.write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\r\n" + good.encode() + b"\r\n")  # BOM, CRLF
    assert geneval.read_jsonl(path) == [RECORDS[0], RECORDS[0]]


@pytest.mark.parametrize("change, message", [
    ({"tag": "count"}, "'tag' must be one of"),
    ({"prompt": ""}, "'prompt' must be a non-empty string"),
    ({"include": []}, "'include' must be a non-empty list"),
    ({"include": [{"class": "", "count": 1}]}, r"include\[0\]\['class'\]"),
    ({"include": [{"class": "dog", "count": 1.5}]}, r"include\[0\]\['count'\] must be an integer"),
    ({"include": [{"class": "dog", "count": 1, "color": 3}]}, r"include\[0\]\['color'\]"),
    ({"include": [{"class": "dog", "count": 1, "position": ["left of", 0]}]},
     r"include\[0\]\['position'\]\[1\] must index an earlier include item \(none"),
    ({"include": [{"class": "dog", "count": 0}]}, r"include\[0\]\['count'\] must be an integer >= 1, got 0"),
    ({"include": [{"class": "dog", "count": -3}]}, r"include\[0\]\['count'\] must be an integer >= 1, got -3"),
    ({"include": [{"class": "dog", "count": True}]}, r"include\[0\]\['count'\] must be an integer >= 1"),
    ({"exclude": [{"class": "dog", "count": -1}]}, r"exclude\[0\]\['count'\] must be an integer >= 1, got -1"),
    ({"include": [{"class": "dog"}]}, r"include\[0\] is missing the key 'count'"),
    ({"include": [{"class": "dog", "count": 1, "color": None}]}, r"include\[0\]\['color'\] must be a non-empty"),
    ({"include": [{"class": "dog", "count": 1, "colour": "red"}]}, r"include\[0\] has unknown keys \['colour'\]"),
    ({"include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left_of", 0]}]},
     r"include\[1\]\['position'\]\[0\] must be one of \['left of'"),
    ({"include": [{"class": "dog", "count": 1, "position": ["left of", 1]}, {"class": "cat", "count": 1}]},
     r"include\[0\]\['position'\]\[1\] must index an earlier include item"),
    ({"tag": None}, "'tag' must be one of"),
    ({"include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["next to", 0]}]},
     r"include\[1\]\['position'\]\[0\] must be one of"),
    ({"include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["above", 2]}]},
     r"include\[1\]\['position'\]\[1\] must index an earlier include item \(0..0\), got 2"),
    ({"include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": "above"}]},
     r"must be \[relation, group_index\]"),
    ({"exclude": {"class": "dog"}}, "'exclude' must be a list"),
    ({"exclude": [{"class": "dog", "count": 2, "position": ["above", 0]}]}, "may not have a 'position'"),
])
def test_validate_record_errors(change, message):
    record = dict({"tag": "single_object", "prompt": "a photo of a dog",
                   "include": [{"class": "dog", "count": 1}]}, **change)
    with pytest.raises(ValueError, match=message):
        geneval.validate_record(record)
    with pytest.raises(ValueError, match=message):
        from_geneval(record)


def test_validate_record_not_a_dict():
    with pytest.raises(ValueError, match="must be a JSON object, got list"):
        geneval.validate_record([1, 2])


def test_validate_record_options_and_what_it_keeps():
    record = {"tag": "counting", "prompt": "a photo of three dogs", "id": 7,
              "include": [{"class": "dog", "count": 3}], "exclude": [{"class": "dog", "count": 4}]}
    # Extra top-level keys are kept; the record itself comes back.
    assert geneval.validate_record(record) is record
    geneval.validate_record(record, max_count=3)  # "exactly 3" is "fewer than 4": the exclude may name max + 1
    with pytest.raises(ValueError, match=r"^record 12: include\[0\]\['count'\] 3 exceeds the limit of 2"):
        geneval.validate_record(record, max_count=2, index=12)
    over = dict(record, exclude=[{"class": "dog", "count": 5}])
    with pytest.raises(ValueError, match=r"^record 12: exclude\[0\]\['count'\] 5 exceeds the limit of 4"):
        geneval.validate_record(over, max_count=3, index=12)
    with pytest.raises(ValueError, match="max_count must be None or an integer >= 1"):
        geneval.validate_record(record, max_count=0)
    with pytest.raises(ValueError, match="'dog' is not a class of this world"):
        geneval.validate_record(record, classes=("cat",))
    colored = dict(record, include=[{"class": "dog", "count": 3, "color": "teal"}])
    with pytest.raises(ValueError, match="'teal' is not a color of this world"):
        geneval.validate_record(colored, colors=geneval.GENEVAL_COLORS)


# ---------------------------------------------------------------------------
# Token alignment on tiny offline tokenizers
# ---------------------------------------------------------------------------

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

_CORPUS = [e["prompt"] for e in BANK] + [
    "a photo of a café with a naïve cat", "ein Foto von zwei Hunden", "numbers 0 1 2 3 4 5 6 7 8 9",
]
_CLIP_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def _clip_bpe():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # A vocabulary this small keeps most words multi-token.
    trainer = trainers.BpeTrainer(
        vocab_size=330, special_tokens=["<|startoftext|>", "<|endoftext|>"], end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[(t, tok.token_to_id(t)) for t in ("<|startoftext|>", "<|endoftext|>")],
    )
    return tok


def _t5_unigram():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    return tok


def _byte_level_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    tok.decoder = decoders.ByteLevel()
    # Llama-3 style: BOS only, offsets keep the leading space (trim_offsets=False).
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))],
        ),
    ])
    return tok


@pytest.fixture(scope="module")
def raw_tokenizers():
    return {"clip": _clip_bpe(), "t5": _t5_unigram(), "bytelevel": _byte_level_bpe()}


@pytest.fixture(scope="module")
def hf_tokenizers(raw_tokenizers, tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    clip = PreTrainedTokenizerFast(
        tokenizer_object=raw_tokenizers["clip"], bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", model_max_length=77,
    )
    t5 = PreTrainedTokenizerFast(
        tokenizer_object=raw_tokenizers["t5"], eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=512,
    )
    qwen = PreTrainedTokenizerFast(
        tokenizer_object=raw_tokenizers["bytelevel"], bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>", model_max_length=131072,
    )
    found = {"clip": clip, "t5": t5, "bytelevel": qwen}
    # The model-specific classes too, built from the same vocabularies.
    folder = tmp_path_factory.mktemp("clip_vocab")
    raw_tokenizers["clip"].model.save(str(folder))
    clip_class = getattr(transformers, "CLIPTokenizerFast", None) or transformers.CLIPTokenizer
    try:
        found["clip_class"] = clip_class(
            str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77
        )
    except (TypeError, ValueError, OSError):
        pass
    try:
        vocab = json.loads(raw_tokenizers["t5"].to_str())["model"]["vocab"]
        t5_class = transformers.T5Tokenizer(vocab=[tuple(v) for v in vocab], extra_ids=0)
        if t5_class.is_fast:
            found["t5_class"] = t5_class
    except (TypeError, ValueError, OSError):
        pass
    return found


def _decode(tokenizer, prompt: str, positions) -> str:
    """Decode the tokens at ``positions`` of the prompt's encoding."""
    if isinstance(tokenizer, tokenizers.Tokenizer):
        ids = tokenizer.encode(prompt).ids
    else:
        ids = tokenizer(prompt)["input_ids"]
    return tokenizer.decode([ids[j] for j in positions])


def _squash(text: str) -> str:
    return re.sub(r"</w>|\s|▁", "", text).lower()


ALIGN_PROMPTS = [e["prompt"] for e in BANK]


def _check_alignment(tokenizer, spec: PromptSpec, encoder: str):
    alignment = spec.alignment(encoder)
    seen: set[int] = set()
    for entity, nouns, colors in zip(spec.entities, alignment.noun_tokens, alignment.color_tokens):
        assert nouns and list(nouns) == sorted(set(nouns))
        surface = spec.prompt[entity.word_span[0]:entity.word_span[1]]
        assert _squash(_decode(tokenizer, spec.prompt, nouns)) == _squash(surface), (spec.prompt, entity)
        if entity.color is None:
            assert colors == ()
        else:
            color_surface = spec.prompt[entity.color_span[0]:entity.color_span[1]]
            assert _squash(_decode(tokenizer, spec.prompt, colors)) == _squash(color_surface)
            assert max(colors) < min(nouns)
        # Distinct entities (repeated words included) never share tokens.
        assert seen.isdisjoint(nouns)
        seen.update(nouns)
    return alignment


@pytest.mark.parametrize("which", ["clip", "t5", "bytelevel"])
def test_alignment_raw_tokenizers(raw_tokenizers, which):
    tok = raw_tokenizers[which]
    for prompt in ALIGN_PROMPTS:
        spec = parse(prompt, tok)
        alignment = _check_alignment(tok, spec, "tokenizer")
        encoding = tok.encode(prompt)
        assert alignment.num_tokens == len(encoding.ids)
        specials = {j for j, s in enumerate(encoding.special_tokens_mask) if s}
        assert specials and all(specials.isdisjoint(e.token_indices) for e in spec.entities)
        assert spec.entities[0].token_indices == alignment.noun_tokens[0]


@pytest.mark.parametrize("which", ["clip", "t5", "bytelevel", "clip_class", "t5_class"])
def test_alignment_hf_tokenizers(hf_tokenizers, which):
    if which not in hf_tokenizers:
        pytest.skip(f"this transformers version cannot build {which} from an in-memory vocabulary")
    tok = hf_tokenizers[which]
    for prompt in ALIGN_PROMPTS:
        spec = parse(prompt, tok)
        _check_alignment(tok, spec, "tokenizer")
        ids = tok(prompt)["input_ids"]
        special = set(tok.all_special_ids)
        for entity in spec.entities:
            assert not special.intersection(ids[j] for j in entity.token_indices)


def test_multi_token_and_repeated_words(hf_tokenizers):
    clip = hf_tokenizers["clip"]
    spec = parse("a photo of a dog and a dog", clip)
    first, second = spec.entities
    assert min(second.token_indices) > max(first.token_indices)
    assert first.token_indices[0] > 0  # BOS is skipped
    spec = parse("a red dog left of a red cat", clip)
    assert spec.entities[1].color_token_indices[0] > spec.entities[0].token_indices[-1]
    spec = parse("a photo of two teddy bears", clip)
    assert len(spec.entities[0].token_indices) >= 2
    assert _squash(_decode(clip, spec.prompt, spec.entities[0].token_indices)) == "teddybears"


def test_from_geneval_alignment(hf_tokenizers):
    clip = hf_tokenizers["clip"]
    for record in RECORDS:
        spec = from_geneval(record, clip)
        _check_alignment(clip, spec, "tokenizer")
        parsed = parse(record["prompt"], clip)
        assert dataclasses.replace(spec.in_text_order(), tag=None) == parsed


def test_dual_encoders(hf_tokenizers):
    clip, t5 = hf_tokenizers["clip"], hf_tokenizers["t5"]
    prompt = "a photo of a purple hair drier left of two red teddy bears"
    spec = parse(prompt, {"clip_l": clip, "t5": t5}, max_length={"t5": 256})
    assert spec.encoders == ("clip_l", "t5")
    assert spec.token_indices_for() == spec.token_indices_for("clip_l") == tuple(e.token_indices for e in spec.entities)
    _check_alignment(clip, spec, "clip_l")
    _check_alignment(t5, spec, "t5")
    merged = spec.sequence_token_indices({"clip_l": 0, "t5": 77})
    for i in range(2):
        expected = set(spec.token_indices_for("clip_l")[i]) | {77 + j for j in spec.token_indices_for("t5")[i]}
        assert merged[i] == tuple(sorted(expected))
    colors = spec.sequence_token_indices({"t5": 77}, colors=True)
    assert colors == tuple(tuple(77 + j for j in c) for c in spec.color_token_indices_for("t5"))
    # A sequence is named like a diffusers pipeline's tokenizers.
    sd3 = parse(prompt, [clip, clip, t5])
    assert sd3.encoders == ("tokenizer", "tokenizer_2", "tokenizer_3")
    assert sd3.token_indices_for("tokenizer") == sd3.token_indices_for("tokenizer_2")
    # align() on an existing spec gives the same result.
    assert align(parse(prompt), [clip, clip, t5]) == sd3
    with pytest.raises(ValueError, match=r"no alignment for encoder 'vae'"):
        sd3.token_indices_for("vae")
    with pytest.raises(ValueError, match="has no token alignment"):
        parse(prompt).token_indices_for()
    with pytest.raises(ValueError, match=r"unknown tokenizer\(s\) \['t5_xxl'\]"):
        parse(prompt, {"clip": clip}, max_length={"t5_xxl": 10})


def test_truncation(hf_tokenizers):
    clip = hf_tokenizers["clip"]
    prompt = "a photo of a dog and " + "very " * 80 + "and a cat"
    with pytest.raises(ValueError,
                       match=r"object noun 'cat' falls beyond the 77-token length limit of tokenizer 'tokenizer'"):
        parse(prompt, clip)
    spec = parse(prompt, clip, max_length=400)
    assert spec.alignments[0].num_tokens == len(clip(prompt)["input_ids"])
    full = parse("a photo of a dog and a cat", clip)
    limit = max(full.entities[0].token_indices) + 2  # the dog's tokens, then EOS
    short = parse("a photo of a dog", clip, max_length=limit)
    assert short.entities[0].token_indices == full.entities[0].token_indices
    assert short.alignments[0].num_tokens == limit
    with pytest.raises(ValueError, match="object noun 'cat' falls beyond"):
        parse("a photo of a dog and a cat", clip, max_length=limit)
    with pytest.raises(ValueError, match="object noun 'dog' falls beyond"):
        parse("a photo of a dog and a cat", clip, max_length=min(full.entities[0].token_indices) + 1)
    with pytest.raises(ValueError, match="max_length for 'tokenizer' must be an integer >= 1"):
        parse("a dog", clip, max_length=0)


def test_unsupported_tokenizers(hf_tokenizers):
    class SlowTokenizer:
        is_fast = False

        def __call__(self, text, **kwargs):
            raise NotImplementedError

    with pytest.raises(ValueError, match=r"slow tokenizer without character offsets.*use_fast=True"):
        parse("a dog", SlowTokenizer())
    with pytest.raises(ValueError, match="of type str is not supported"):
        parse("a dog", "openai/clip-vit-large-patch14")
    with pytest.raises(ValueError, match="empty collection of tokenizers"):
        parse("a dog", [])
    with pytest.raises(ValueError, match="tokenizer 'tokenizer_2' is None"):
        parse("a dog", [hf_tokenizers["clip"], None])
    with pytest.raises(ValueError, match="has no word_span"):
        align(PromptSpec("a dog", (Entity("dog"),)), hf_tokenizers["clip"])



def test_error_messages_cut_a_long_prompt():
    from xlard.prompts.spec import quote_prompt

    prompt = "a photo of " + "the the " * 600  # no object noun, 4800 characters
    with pytest.raises(ValueError, match=r"no object noun found in prompt 'a photo of the the .*\.\.\.' \(4811 "
                                         r"characters\)") as info:
        parse(prompt)
    assert len(str(info.value)) < 200
    assert quote_prompt("a short one") == "'a short one'"
    assert quote_prompt("x" * 81) == "'" + "x" * 74 + "...' (81 characters)"


def test_parsing_work_grows_linearly_with_a_degenerate_prompt(monkeypatch):
    """'of of of ...' (60 KB) took 11 s: each word rescanned the whole phrase for content words. Counted, not timed:
    the stopword look-ups per word stay bounded however long the prompt."""
    from xlard.prompts import parser

    class Counting(frozenset):
        lookups = 0

        def __contains__(self, item):
            Counting.lookups += 1
            return frozenset.__contains__(self, item)

    monkeypatch.setattr(parser, "_STOPWORDS", Counting(parser._STOPWORDS))
    per_word = []
    for n in (500, 2000):
        Counting.lookups = 0
        with pytest.raises(ValueError):
            parse("of " * n)
        per_word.append(Counting.lookups / n)
    assert per_word[1] <= per_word[0] * 1.2 + 1, per_word  # linear (quadratic: 4x more per word)


def test_every_public_name_of_the_package_modules_is_importable_from_xlard_prompts():
    """docs/prompts.md: "Every public name is importable from xlard.prompts" (SCENE_NOUNS, noun_forms and the
    fields functions were not)."""
    import importlib

    import xlard.prompts as package

    for name in ("alignment", "fields", "inflection", "numbers", "parser", "spec", "vocabulary"):
        module = importlib.import_module(f"xlard.prompts.{name}")
        for public in getattr(module, "__all__", ()):
            assert public in package.__all__ and getattr(package, public) is getattr(module, public), (name, public)


def test_counts_past_hundred_hyphenated_colors_and_s_plurals():
    """From a fresh-eyes probe: 'one hundred and fifty dogs' was read as 50 dogs (the number stopped at 'hundred');
    'a light-blue car' lost its color (one word to the parser); 'lenses' and 'movies' came back 'lense', 'movy'."""
    from xlard.prompts import parse
    from xlard.prompts.inflection import pluralize, singularize

    for prompt, shown in (("one hundred and fifty dogs", "'one hundred and fifty'.*is 150"),
                          ("a hundred and one dogs", "'a hundred and one'.*is 101"),
                          ("a photo of one hundred one cats", "'one hundred one'.*is 101")):
        with pytest.raises(ValueError, match=rf"{shown}, more than MAX_COUNT = 100"):
            parse(prompt)
    assert [(e.noun, e.count) for e in parse("one hundred dogs").entities] == [("dog", 100)]
    assert [(e.noun, e.count) for e in parse("two dozen eggs").entities] == [("egg", 24)]
    spec = parse("two light-blue cars left of a dark-red bus")
    assert [(e.noun, e.count, e.color) for e in spec.entities] == [("car", 2, "light blue"), ("bus", 1, "dark red")]
    assert parse("a sky-blue kite").entities[0].color == "sky blue"
    assert "color" in parse("a light-grey dog").aspects
    for plural, singular in (("lenses", "lens"), ("octopuses", "octopus"), ("gases", "gas"), ("crises", "crisis"),
                             ("movies", "movie"), ("cookies", "cookie"), ("houses", "house"), ("puppies", "puppy")):
        assert singularize(plural) == singular and pluralize(singular) == plural


@pytest.mark.parametrize("prompt, want", [
    ("a couple dogs", [("dog", 2, None)]),
    ("a pair shoes", [("shoe", 2, None)]),
    ("a couple red apples", [("apple", 2, "red")]),
    ("a pair light blue socks", [("sock", 2, "light blue")]),
    ("a photo of a couple dogs and a cat", [("dog", 2, None), ("cat", 1, None)]),
    # "couple" stays the noun when no plural noun follows
    ("a couple walking a dog", [("couple", 1, None), ("dog", 1, None)]),
    ("a couple sitting on a bench", [("couple", 1, None), ("bench", 1, None)]),
    ("a couple", [("couple", 1, None)]),
    ("a couple of dogs", [("dog", 2, None)]),
])
def test_a_couple_or_pair_without_of_counts_two(prompt, want):
    assert [(e.noun, e.count, e.color) for e in parse(prompt).entities] == want


@pytest.mark.parametrize("prompt, noun", [
    ("a photo of more than two dogs", "dog"), ("fewer than five cats", "cat"), ("at least three apples", "apple"),
    ("at most 2 cats", "cat"), ("3 or 4 apples", "apple"), ("three to four apples", "apple"),
    ("between three and five apples", "apple"), ("about five apples", "apple"), ("up to four birds", "bird"),
    ("roughly 10 birds", "bird"),
])
def test_bounded_and_ranged_counts_say_no_exact_count(prompt, noun):
    """"more than two dogs" was two dogs and an entity "more"; "3 or 4 apples" four apples and an entity "or"."""
    spec = parse(prompt)
    assert [(e.noun, e.count) for e in spec.entities] == [(noun, None)]


def test_bounds_need_a_number_and_relations_keep_their_words():
    assert [(e.noun, e.count) for e in parse("a cat under two tables").entities] == [("cat", 1), ("table", 2)]
    assert [r.relation for r in parse("a cat under two tables").relations] == ["below"]
    assert [(e.noun, e.count) for e in parse("two dogs and three cats").entities] == [("dog", 2), ("cat", 3)]


@pytest.mark.parametrize("prompt, noun, count", [("a photo of four broccolis", "broccoli", 4),
                                                 ("a photo of three computer mouses", "computer mouse", 3),
                                                 ("a photo of two sheeps", "sheep", 2)])
def test_naive_plurals_of_known_nouns(prompt, noun, count):
    """GenEval's own "a photo of four broccolis" gave a noun "broccolis" (its record's class "broccoli" was not
    found)."""
    assert [(e.noun, e.count) for e in parse(prompt).entities] == [(noun, count)]


@pytest.mark.parametrize("prompt, want", [
    ("a cat without a dog", [("cat", 1), ("dog", 0)]), ("a dog but no cat", [("dog", 1), ("cat", 0)]),
    ("a cat instead of a dog", [("cat", 1), ("dog", 0)]), ("a cat, not a dog", [("cat", 1), ("dog", 0)]),
    ("a cat rather than a dog", [("cat", 1), ("dog", 0)]), ("a cat alone", [("cat", 1)]),
    ("a bench nearby", [("bench", 1)]), ("a cat asleep", [("cat", 1)]),
])
def test_negations_and_adverbs_keep_the_meaning(prompt, want):
    """"a cat without a dog" read as an entity "without" and a dog; "a dog but no cat" dropped the dog; "a cat
    alone" was an entity "alone"."""
    assert [(e.noun, e.count) for e in parse(prompt).entities] == want


def test_a_negated_relation_is_refused():
    with pytest.raises(ValueError, match="'left of' .* is negated \\('not'\\); a negated relation cannot be scored"):
        parse("a dog not left of a cat")


@pytest.mark.parametrize("prompt, want", [("a pair of scissors", [("scissors", 1)]), ("a pair of skis", [("skis", 1)]),
                                          ("a pair of shoes", [("shoe", 2)]), ("two pairs of shoes", [("shoe", None)])])
def test_a_pair_of_a_noun_that_names_one_pair(prompt, want):
    """"a pair of scissors" was two scissors; "two pairs of shoes" an entity "pair"."""
    assert [(e.noun, e.count) for e in parse(prompt).entities] == want


@pytest.mark.parametrize("prompt", ["a table with a lamp above it and a chair", "a dog, to the left of which is a cat"])
def test_a_relation_to_it_or_which_is_refused(prompt):
    """"... above it and a chair" related the lamp to the chair; "to the left of which is a cat" was reversed."""
    with pytest.raises(ValueError, match="points at '(it|which)'; name its object instead"):
        parse(prompt)


def test_on_the_bottom_of_is_below_and_resolution_tags_are_no_counts():
    """T2I-CompBench's "on the bottom of" gave no relation; "4k" / "8k" / "1080p" style suffixes were refused as
    malformed counts."""
    spec = parse("a cat on the bottom of a table")
    assert [(r.subject, r.relation, r.object) for r in spec.relations] == [(0, "below", 1)]
    for prompt in ("a photo of a cat, 4k, highly detailed", "a photo of a cat, 8k", "a cat, 1080p"):
        assert [(e.noun, e.count) for e in parse(prompt).entities] == [("cat", 1)]
    with pytest.raises(ValueError, match="count '10k'"):  # a suffixed number is still no count
        parse("10k dogs")


def test_text_that_is_not_unicode_and_json_that_is_not_json_are_refused_where_they_come_in(tmp_path):
    """A lone surrogate in a prompt (JSON "\\ud800", a command line's non-UTF-8 byte) reached the tokenizer as a
    traceback, or failed when a record was written, after the work; NaN/Infinity in a record were written back as
    invalid JSON; a JSON error at the end of a line was reported at "column 1"; a 10,000-character value filled
    the error line. Each is named where it comes in now."""
    record = {"tag": "single_object", "prompt": "a photo of a cat", "include": [{"class": "cat", "count": 1}]}
    for bad, field in (({**record, "prompt": "a cat \ud800"}, "'prompt'"),
                       ({**record, "include": [{"class": "c\udcffat", "count": 1}]}, r"include\[0\]\['class'\]")):
        with pytest.raises(ValueError, match=rf"record 3: {field} holds '\\ud[8c][0f]{{2}}' at character \d+, which "
                                             r"is not a Unicode character"):
            geneval.validate_record(bad, index=3)
    with pytest.raises(ValueError, match=r"prompt 'a cat \\ud800' holds '\\ud800' at character 7"):
        parse("a cat \ud800")
    with pytest.raises(ValueError, match=r"got 'xxxx.*\.\.\. \(10000 characters\)$"):
        geneval.validate_record({**record, "tag": "x" * 10000})
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({**record, "prompt": "a cat \ud800"}) + "\n")  # json writes the escape
    with pytest.raises(ValueError, match=r"r.jsonl:1: 'prompt' holds"):
        geneval.read_jsonl(path)
    for constant in ("NaN", "Infinity", "-Infinity"):
        path.write_text(json.dumps(record)[:-1] + f', "note": {constant}}}\n')
        with pytest.raises(ValueError, match=rf"r.jsonl:1: invalid JSON \({constant} is not JSON"):
            geneval.read_jsonl(path)
    line = json.dumps(record)
    path.write_text(line[:-1] + "\n")  # the closing brace cut off
    with pytest.raises(ValueError, match=rf"at column {len(line)}\)"):
        geneval.read_jsonl(path)
    # writing: a lone surrogate in a kept extra key (an image file name of non-UTF-8 bytes) is escaped, the file
    # stays UTF-8 JSON and reads back equal; NaN is refused naming the record instead of written as invalid JSON
    geneval.write_jsonl(path, [{**record, "file": "a\udcff.png"}, {**record, "note": "ünïcode ✓"}])
    text = path.read_text(encoding="utf-8")
    assert "\\udcff" in text and "ünïcode ✓" in text
    assert geneval.read_jsonl(path)[0]["file"] == "a\udcff.png"
    with pytest.raises(ValueError, match=r"record 1: not JSON-serializable \(Out of range float"):
        geneval.write_jsonl(tmp_path / "n.jsonl", [record, {**record, "score": float("nan")}])
    assert not (tmp_path / "n.jsonl").exists()


@pytest.mark.parametrize("prompt, expected", [
    ("3–4 dogs", [("dog", None)]), ("3—4 dogs", [("dog", None)]), ("3 – 4 dogs", [("dog", None)]),
    ("three–four dogs", [("dog", None)]), ("3~4 dogs", [("dog", None)]),  # ranges: the upper number was read
    ("a few dozen eggs", [("egg", None)]), ("several dozen eggs", [("egg", None)]),  # vague: it was 12
    ("a stack of five books", [("book", 5)]),  # after a collective, the number is the count
    ("a photo of a pin\u0303ata", [("piñata", 1)]), ("two jalapen\u0303os", [("jalapeño", 2)]),  # was "ata", "os"
    ("two d\u200bogs", [("dog", 2)]), ("t\u200bwo dogs", [("dog", 2)]), ("a photo of two ＤＯＧＳ", [("dog", 2)]),
    ("a pair of blue jeans", [("jeans", 1)]), ("a pair of black scissors", [("scissors", 1)]),  # was 2 / "jean"
    ("a pair of eyeglasses", [("eyeglasses", 1)]), ("a pair of red shoes", [("shoe", 2)]),
    ("a photo showing two dogs", [("dog", 2)]), ("a picture featuring a cat", [("cat", 1)]),  # no entity "photo"
    ("show me three cats", [("cat", 3)]), ("I want two dogs", [("dog", 2)]), ("the first two dogs", [("dog", 2)]),
    ("a cat with a dog on its left", [("cat", 1), ("dog", 1)]), ("two octopi", [("octopus", 2)]),
])
def test_parses_a_walk_through_real_world_prompts_found_wrong(prompt, expected):
    assert [(e.noun, e.count) for e in parse(prompt).entities] == expected


@pytest.mark.parametrize("prompt, match", [
    ("a photo of 1 000 ants", r"counts '1' and '000' in a row .* write one whole number"),  # it was 0 ants
    ("two three dogs", r"counts 'two' and 'three' in a row"),  # it was 3
    ("a cat without two dogs", r"count 'two' after 'without' .* is negated"),  # it was 2 dogs
    ("no three dogs", r"count 'three' after 'no' .* is negated"),
    ("a photo of a dog, but no 2 cats", r"count '2' after 'no' .* is negated"),  # a "but" before the negation
    ("a bicycle without one wheel", r"count 'one' after 'without' .* is negated"),  # only "no one" is nobody
    ("a cat and no 3 dogs", r"count '3' after 'no' .* is negated"),
    ("draw", r"no object noun found"), ("show me", r"no object noun found"),
    ("No 3 dogs on a table", r"count '3' after 'no' .* is negated"),  # a capital opening a sentence: no name
    ("a cat without 3 or 4 dogs", r"count '3 or 4' after 'without' .* is negated"),  # dogs were wanted
    ("a photo of ½ pizza", r"count '½' .* is a fraction, not a whole count"),  # it was no count at all
    ("a photo of three 🐶 and a cat", r"count 'three' .* is not followed by an object noun"),  # it vanished
    ("a photo of " + "9" * 4301 + " dogs", r"is beyond 1,000,000,000,000,000, more than MAX_COUNT"),  # Python's error
    ("dozen " * 20 + "eggs", r"is beyond 1,000,000,000,000,000"),
    ("two dogs " * 2500, r"is 22500 characters; at most 20000 are parsed"),  # seconds per parse
])
def test_counts_the_parser_cannot_read_are_named(prompt, match):
    with pytest.raises(ValueError, match=match):
        parse(prompt)


def test_singular_forms_of_s_ending_nouns_and_geneval_fields():
    """canvas -> "canva", lens -> "len" in explanations; a record's color "Red" and count 10**30 were refused by
    Entity's field names instead of the record's."""
    from xlard.prompts import from_geneval, singularize

    assert [singularize(w) for w in ("canvas", "lens", "atlas", "bias", "canvases", "busses", "jeans")] == [
        "canvas", "lens", "atlas", "bias", "canvas", "bus", "jeans"]
    spec = from_geneval({"tag": "colors", "prompt": "a photo of a red dog",
                         "include": [{"class": "Dog", "count": 1, "color": "Red "}]})
    assert [(e.noun, e.color) for e in spec.entities] == [("dog", "red")] and spec.entities[0].color_span is not None
    with pytest.raises(ValueError, match=r"GenEval record include\[0\]: Entity.count must be"):
        from_geneval({"tag": "counting", "prompt": "a photo of dogs", "include": [{"class": "dog", "count": 10**30}]})


@pytest.mark.parametrize("prompt, expected", [
    ("an empty street with no one around", [("street", 1)]), ("no one on a bench", [("bench", 1)]),
    ("not one but two cats", [("cat", 2)]), ("not two but three cats", [("cat", 3)]),
    ("a birthday cake with the number 5 on it", [("cake", 1), ("number", None)]),  # labels, times, ages: no count
    ("a clock at 5", [("clock", 1)]), ("a kid aged 7 with a kite", [("kid", 1), ("kite", 1)]),
    ("two 20 dollar bills", [("bill", 2)]), ("one 5 star hotel", [("hotel", 1)]),
    ("two 3 legged stools", [("stool", 2)]), ("1 in 3 dogs", [("dog", 3)]),
    ("a ¼ pound burger on a plate", [("burger", 1), ("plate", 1)]),  # a measurement, as "2.5 liter"
    ("a car show with five cars", [("show", 1), ("car", 5)]),  # "show" a noun there, a request only at the start
    ("please draw two dogs", [("dog", 2)]), ("generate a photo of two dogs", [("dog", 2)]),
    ("a painting with a gold frame", [("painting", 1), ("frame", 1)]),  # "with" is no template link
    ("a Chanel No 5 perfume bottle", [("chanel", 1), ("bottle", None)]),  # a name: "No" as written
    # the second review: these broke in the first round of fixes
    ("a photo with two dogs", [("dog", 2)]), ("a photo with no dogs", [("dog", 0)]),  # "with" after photo words
    ("five dollars", [("dollar", 5)]), ("a girl holding three dollar bills", [("girl", 1), ("bill", 3)]),
    ("two pack mules on a trail", [("mule", 2)]), ("two star fish", [("fish", 2)]),
    ("two dogs in a park, show them playing", [("dog", 2)]), ("a dog and a cat, draw them", [("dog", 1), ("cat", 1)]),
    ("paint and a brush", [("paint", None), ("brush", 1)]), ("not two but 3 or 4 cats", [("cat", None)]),
])
def test_a_review_of_the_walks_fixes_keeps_these_prompts(prompt, expected):
    """What the first round of the walk's fixes broke (each refused or misread at that commit)."""
    assert [(e.noun, e.count) for e in parse(prompt).entities] == expected


def test_a_zero_width_character_after_a_word_stays_out_of_its_span():
    """"a dog\\u200b and a red cat": the dog's span took the zero-width character, and a tokenizer read it as <unk>."""
    prompt = "a dog\u200b and a red cat"
    spec = parse(prompt)
    assert [prompt[slice(*e.word_span)] for e in spec.entities] == ["dog", "cat"]
    assert prompt[slice(*spec.entities[1].color_span)] == "red"
    combining = "a cafe\u0301 table"  # a combining mark at a word's end stays in it
    assert parse(combining).entities[0].word_span == (8, 13)


@pytest.mark.parametrize("prompt, expected", [
    # possessives (it gave nouns "woman'", "chef'", "dog'")
    ("a woman's two cats", [("cat", 2, None)]), ("the boy's three red balloons", [("balloon", 3, "red")]),
    ("a cat left of a dog's", [("cat", 1, None), ("dog", 1, None)]), ("a dog's bowl", [("bowl", 1, None)]),
    ("two children's bikes", [("bike", 2, None)]), ("a dog's red widget", [("widget", 1, "red")]),
    ("let's draw two cats", [("cat", 2, None)]), ("here's a dog", [("dog", 1, None)]),  # no nouns "let'", "here'"
    ("a teddy bear on a bed in a child's bedroom", [("teddy bear", 1, None), ("bed", 1, None)]),  # still a setting
    # typographic apostrophes read as "'" (a time gave 5 clocks; "children’s" the head)
    ("a clock at 5 o\u2019clock", [("clock", 1, None)]), ("two children\u2019s bikes", [("bike", 2, None)]),
    # Unicode and fullwidth hyphens as "-" (a range "twenty to one"; "blue" alone)
    ("twenty\u2010one dogs", [("dog", 21, None)]), ("twenty\u2011one dogs", [("dog", 21, None)]),
    ("a light\u2010blue car", [("car", 1, "light blue")]),
    ("\uff34\uff37\uff25\uff2e\uff34\uff39\uff0d\uff2f\uff2e\uff25 \uff24\uff2f\uff27\uff33", [("dog", 21, None)]),
    # zero-width characters dropped inside numbers and beside hyphens (refused as two counts; 21 read as a range)
    ("1\u200b0 dogs", [("dog", 10, None)]), ("twenty-\u200bone dogs", [("dog", 21, None)]),
    ("twenty\u200b-one dogs", [("dog", 21, None)]), ("a light-\u200bblue car", [("car", 1, "light blue")]),
    # a digit range with an ASCII hyphen (refused as a malformed number), a bound after the noun (kept the number)
    ("3-4 apples", [("apple", None, None)]), ("10-12 eggs", [("egg", None, None)]),
    ("three dogs or more", [("dog", None, None)]), ("three dogs or fewer", [("dog", None, None)]),
    ("three dogs at least", [("dog", None, None)]), ("a photo of five apples or more", [("apple", None, None)]),
    ("three dogs and at least two cats", [("dog", 3, None), ("cat", None, None)]),  # the bound is the next phrase's
    ("a 5-year-old boy", [("boy", 1, None)]),  # a compound adjective stays one word
    # the review of the fixes: a range before a unit measures (it became a count), an owner before a template's
    # words keeps the template ("painting" became an object), "one's" is no count
    ("a 3-4 year old boy", [("boy", 1, None)]), ("two 3-4 year old boys", [("boy", 2, None)]),
    ("10-12 year old boys", [("boy", None, None)]), ("a 5-10 minute walk", [("walk", 1, None)]),
    ("a child's painting of two cats", [("cat", 2, None)]), ("a woman's portrait of a cat", [("cat", 1, None)]),
    ("a child's drawing of a house and a tree", [("house", 1, None), ("tree", 1, None)]),
    ("one's own dog", [("dog", None, None)]),
    ("a 3-4 star hotel", [("hotel", None, None)]), ("a 2-3 person tent", [("tent", None, None)]),  # a range
])
def test_a_fuzz_of_the_parser_reads_these_as_written(prompt, expected):
    """A robustness fuzz of the prompt layer: each of these parsed into a wrong noun, count or color, or was refused."""
    assert [(e.noun, e.count, e.color) for e in parse(prompt).entities] == expected


def test_spans_stay_on_the_prompt_as_written_through_the_character_mapping():
    prompt = "a dog\u2019s two 1\u200b0-1\u200b2 cats and a light\u2010blue car"
    spec = parse(prompt)
    assert [(e.noun, e.count, prompt[slice(*e.word_span)]) for e in spec.entities] == [
        ("cat", None, "cats"), ("car", 1, "car")]
    assert prompt[slice(*spec.entities[1].color_span)] == "light\u2010blue"
    spec = parse("a cat left of a dog\u2019s")
    assert spec.prompt[slice(*spec.entities[1].word_span)] == "dog\u2019s"


def test_contradicting_relations_are_named_by_the_prompts_words():
    """"a dog left of right of a cat" raised PromptSpec's own message (indices, no prompt)."""
    with pytest.raises(ValueError, match=r"^relations 'left of' and 'right of' in prompt 'a dog left of right of a "
                                         r"cat' contradict each other \('dog' left of 'cat', and 'dog' right of "
                                         r"'cat'\); ask for one of them$"):
        parse("a dog left of right of a cat")
    with pytest.raises(ValueError, match=r"'dog' left of 'cat', and 'cat' left of 'dog'"):
        parse("a dog left of a cat and the cat left of the dog")


def test_write_jsonl_refuses_keys_that_json_writes_as_one(tmp_path):
    """{1: "a", "1": "b"} was written with two "1" keys and read back as {"1": "b"}: a value lost without a word."""
    record = {**RECORDS[0], "meta": {"inner": {1: "a", "1": "b"}}}
    path = tmp_path / "p.jsonl"
    with pytest.raises(ValueError, match=r"record 1: not JSON-serializable \(two keys are written as '1'"):
        geneval.write_jsonl(path, [RECORDS[0], record])
    assert not path.exists()
    kept = {**RECORDS[0], "meta": {1: "a", "2": "b"}}  # distinct once written: kept, as strings
    geneval.write_jsonl(path, [kept])
    assert geneval.read_jsonl(path)[0]["meta"] == {"1": "a", "2": "b"}
