"""Token alignment: where each entity's words sit in each text encoder's sequence.

Character offsets make it work for any Hugging Face *fast* tokenizer and for
raw ``tokenizers.Tokenizer`` objects; see :func:`align`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from xlard.prompts.spec import PromptSpec, TokenAlignment

__all__ = ["align"]

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
                        f"{what} {word!r} falls beyond the {limit}-token length limit of tokenizer {name!r} "
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