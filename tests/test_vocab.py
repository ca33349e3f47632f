"""xlard.vocab is the one definition of relation codes, aspect names, tags and colors.

Each consumer must hold the very same objects, and no module of the package
may spell one of these vocabularies out again.
"""
from __future__ import annotations

import ast
from pathlib import Path

from xlard import vocab

PACKAGE = Path(__file__).resolve().parents[1] / "xlard"


def test_consumers_import_the_shared_objects():
    from xlard import color_features, explain, geneval, models, ops, prompts, rewards
    from xlard.shapes import rules

    assert (ops.LEFT_OF, ops.RIGHT_OF, ops.ABOVE, ops.BELOW) == (0, 1, 2, 3)
    assert (prompts.LEFT_OF, prompts.RIGHT_OF, prompts.ABOVE, prompts.BELOW) == (ops.LEFT_OF, ops.RIGHT_OF,
                                                                                ops.ABOVE, ops.BELOW)
    for aspects in (prompts.ASPECTS, rewards.ASPECTS, models.ASPECTS, explain.ASPECT_NAMES):
        assert aspects is vocab.ASPECTS
    assert prompts.RELATIONS is vocab.RELATIONS and prompts.RELATION_CODES is vocab.RELATION_CODES
    assert geneval.GENEVAL_TAGS is vocab.GENEVAL_TAGS and rules.TAGS is vocab.GENEVAL_TAGS
    assert geneval.GENEVAL_COLORS is vocab.GENEVAL_COLORS and rules.GENEVAL_COLORS is vocab.GENEVAL_COLORS
    assert prompts.GENEVAL_COLORS is vocab.GENEVAL_COLORS and prompts.COLORS is vocab.COLORS
    assert geneval.GENEVAL_RELATIONS is vocab.GENEVAL_RELATIONS and rules.RELATIONS is vocab.GENEVAL_RELATIONS
    assert color_features._COLOR_ALIASES is vocab.COLOR_ALIASES
    assert rules.validate_record is geneval.validate_record


def test_the_vocabularies_agree_with_each_other():
    assert vocab.RELATIONS == ("left_of", "right_of", "above", "below")
    assert all(vocab.RELATION_CODES[name] == code for code, name in enumerate(vocab.RELATIONS))
    assert vocab.GENEVAL_RELATIONS == ("left of", "right of", "above", "below")
    for name in vocab.RELATIONS:
        spelled = vocab.GENEVAL_RELATION_NAMES[name]
        assert vocab.normalize_relation(spelled) == name
        assert vocab.GENEVAL_INVERSE_RELATION[spelled] == vocab.GENEVAL_RELATION_NAMES[vocab.INVERSE_RELATION[name]]
    assert vocab.COLORS[:10] == vocab.GENEVAL_COLORS and len(set(vocab.COLORS)) == len(vocab.COLORS)
    assert set(vocab.COLOR_ALIASES.values()) <= set(vocab.COLORS)
    assert all(c.split()[-1] in vocab.COLORS for c in vocab.COMPOUND_COLORS)


def _assigned_values(tree: ast.AST):
    """(target names, literal value) of every assignment whose value is a literal."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        try:
            literal = ast.literal_eval(value)
        except ValueError:
            continue
        names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        yield names, literal


def _second_definition(names: list[str], literal) -> str | None:
    shared = {
        "aspect names": vocab.ASPECTS, "GenEval tags": vocab.GENEVAL_TAGS,
        "GenEval colors": vocab.GENEVAL_COLORS, "parser colors": vocab.COLORS,
        "relation names": vocab.RELATIONS, "GenEval relation names": vocab.GENEVAL_RELATIONS,
        "color aliases": dict(vocab.COLOR_ALIASES), "inverse relations": dict(vocab.INVERSE_RELATION),
        "GenEval inverse relations": dict(vocab.GENEVAL_INVERSE_RELATION),
        "relation codes": dict(vocab.RELATION_CODES),
    }
    for what, value in shared.items():
        if (isinstance(literal, (tuple, list, set)) and isinstance(value, tuple)
                and all(isinstance(x, str) for x in literal) and set(literal) == set(value)):
            return what
        if isinstance(literal, dict) and isinstance(value, dict) and literal == value:
            return what
    if {"LEFT_OF", "RIGHT_OF", "ABOVE", "BELOW"} & set(names):
        return "relation codes"
    return None


def test_no_module_defines_a_vocabulary_again():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "vocab.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for names, literal in _assigned_values(tree):
            what = _second_definition(names, literal)
            if what is not None:
                offenders.append(f"{path.relative_to(PACKAGE)}: {what} ({', '.join(names)})")
    assert offenders == [], f"shared vocabularies defined again (import them from xlard.vocab): {offenders}"


def test_the_duplicate_finder_finds_duplicates():
    tree = ast.parse("A = ('count', 'color', 'position')\nLEFT_OF, RIGHT_OF, ABOVE, BELOW = 0, 1, 2, 3\n"
                     "T: tuple = ('single_object', 'two_object', 'counting', 'colors', 'position', 'color_attr')\n"
                     "X = {'grey': 'gray', 'golden': 'gold'}\nOK = ('count', 'color')\n")
    found = [_second_definition(names, literal) for names, literal in _assigned_values(tree)]
    assert found == ["aspect names", "relation codes", "GenEval tags", "color aliases", None]
