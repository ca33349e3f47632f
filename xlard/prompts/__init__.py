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

The package's modules, one concern each (every public name is importable
from ``xlard.prompts``):

- :mod:`xlard.prompts.vocabulary`: the nouns the parser knows (COCO, GenEval,
  shapes, common objects). Colors, relations, aspects and tags live in
  :mod:`xlard.vocab` and are re-exported here.
- :mod:`xlard.prompts.inflection`: plural <-> singular.
- :mod:`xlard.prompts.spec`: the spec types and GenEval record conversion.
- :mod:`xlard.prompts.parser`: :func:`parse` and :func:`from_geneval`.
- :mod:`xlard.prompts.alignment`: :func:`align`, words -> token indices.
- :mod:`xlard.prompts.fields`: a spec's fields (count, color, relation) as
  fixed vectors, the corrector's ``conditioning: fields`` input.

See ``docs/prompts.md`` for the spec format and what the parser extracts.
"""
from __future__ import annotations

from xlard.prompts.alignment import align
from xlard.prompts.fields import field_keys, field_tokens, field_vector
from xlard.prompts.inflection import noun_forms, pluralize, singularize
from xlard.prompts.numbers import MAX_COUNT, UNIT_WORDS
from xlard.prompts.parser import MAX_PROMPT_CHARS, from_geneval, parse
from xlard.prompts.spec import Entity, PromptSpec, Relation, TokenAlignment, infer_geneval_tag
from xlard.prompts.vocabulary import (ARRANGEMENT_NOUNS, COCO_CLASSES, COLLECTIVE_NOUNS, GENEVAL_OBJECT_NAMES,
                                      KNOWN_NOUNS, SCENE_NOUNS, SHAPE_NOUNS)
from xlard.vocab import (
    ABOVE,
    ASPECTS,
    BELOW,
    COLORS,
    GENEVAL_COLORS,
    INVERSE_RELATION,
    LEFT_OF,
    RELATION_CODES,
    RELATIONS,
    RIGHT_OF,
    normalize_relation,
)

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
    "noun_forms",
    "MAX_COUNT",
    "MAX_PROMPT_CHARS",
    "UNIT_WORDS",
    "SCENE_NOUNS",
    "ARRANGEMENT_NOUNS",
    "COLLECTIVE_NOUNS",
    "field_keys",
    "field_tokens",
    "field_vector",
]
