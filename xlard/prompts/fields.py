"""The prompt's parsed fields as corrector tokens (``CorrectorConfig.conditioning = "fields"``).

A corrector conditioned on the backbone's text embedding learns each training
prompt's picture: on the shapes world it did not carry a counting edit to (count,
shape) pairs it had not seen, while one given the parsed fields as separate tokens
did (docs/training.md, "Unseen prompts: the corrector does not compose"). This
module builds those tokens from a :class:`~xlard.prompts.PromptSpec`:

- per entity ``j``: one token for its noun, one for its count, one for its color
  when it has one;
- per relation: one token for the relation's name, its slot naming the subject
  and the object.

Entities are numbered in the order their words appear in the prompt.

Each token is the sum of a *value* vector (``("noun", "circle")``, ``("count", 3)``,
...) and a *slot* vector (which entity, which field), so the same noun or count
is the same direction wherever it appears. Every vector is a fixed function of its
key (standard normal entries drawn from a generator seeded by the key's CRC-32),
so any noun works, including ones no table lists, and tokens are identical across
processes, machines and versions.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterable
from functools import lru_cache
from typing import Sequence

import torch

from xlard.prompts.spec import PromptSpec

__all__ = ["field_keys", "field_tokens", "field_vector"]


@lru_cache(maxsize=4096)
def _vector(key: str, dim: int) -> torch.Tensor:
    # "surrogatepass": a str holding a lone surrogate (from a file read with errors="surrogateescape") is a key
    # like any other, not a UnicodeEncodeError; every other string encodes to the same bytes as plain UTF-8
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8", "surrogatepass")))
    return torch.randn(dim, generator=gen)


#: The largest field dimension: a conditioning width (10**12 asked the allocator for 4 TB).
MAX_DIM = 65536


def field_vector(kind: str, value, dim: int) -> torch.Tensor:
    """The fixed ``[dim]`` float32 vector of one field value, e.g. ``("count", 3)``.

    Raises:
        TypeError: ``kind`` is not a string.
        ValueError: ``kind`` is empty, or ``dim`` is not an integer >= 1.
    """
    if not isinstance(kind, str):
        raise TypeError(f"field_vector: kind must be a field kind string (\"noun\", \"count\", \"color\", "
                        f"\"relation\", \"slot\"), got {_short(kind)} ({type(kind).__name__})")
    if not kind:
        raise ValueError("field_vector: kind must be a non-empty field kind string (\"noun\", \"count\", ...), "
                         "got ''")
    if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= MAX_DIM:
        raise ValueError(f"field_vector: dim must be an integer in [1, {MAX_DIM}], got {dim!r}")
    return _vector(f"{kind}:{value}", dim).clone()


def field_keys(spec: PromptSpec) -> list[tuple[tuple[str, object], tuple[str, object]]]:
    """The (value key, slot key) pair of each token of ``spec``, in token order.

    A spec without entities (a prompt the parser found nothing in) gets one
    ``("empty", "")`` token, so attention always has something to read.

    Raises:
        ValueError: ``spec`` is not a :class:`~xlard.prompts.PromptSpec`.
    """
    if not isinstance(spec, PromptSpec):
        raise ValueError(f"field_keys: spec must be a PromptSpec (xlard.prompts.parse), got {type(spec).__name__}")
    # Entities in the order their words appear in the prompt, so a spec parsed from the text and
    # one built from GenEval metadata (which lists them in another order) give the same tokens.
    n = len(spec.entities)
    order = sorted(range(n), key=lambda j: (spec.entities[j].word_span[0] if spec.entities[j].word_span else n, j))
    rank = {j: k for k, j in enumerate(order)}
    keys = []
    for k, j in enumerate(order):
        entity = spec.entities[j]
        keys.append((("noun", entity.noun), ("slot", f"{k}:noun")))
        keys.append((("count", entity.count), ("slot", f"{k}:count")))
        if entity.color:
            keys.append((("color", entity.color), ("slot", f"{k}:color")))
    for relation in spec.relations:  # the slot says which entity is the subject
        keys.append((("relation", relation.relation),
                     ("slot", f"relation:{rank[relation.subject]}->{rank[relation.object]}")))
    return keys or [(("empty", ""), ("slot", "empty"))]


def field_tokens(specs: Sequence[PromptSpec], dim: int, *, device=None,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[B, T, dim]`` and their mask ``[B, T]`` (True for real tokens) for a batch of specs.

    ``T`` is the largest number of tokens of any spec in the batch; shorter rows are
    zero-padded and masked.

    Raises:
        TypeError: ``specs`` is not a list of specs (a single spec or a string is refused), ``dtype`` is
            not a floating torch dtype.
        ValueError: ``dim`` is not a positive integer, ``specs`` is empty, an entry is not a
            :class:`~xlard.prompts.PromptSpec`, or ``device`` is not a device.
    """
    if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= MAX_DIM:
        raise ValueError(f"field_tokens: dim must be an integer in [1, {MAX_DIM}], got {dim!r}")
    if isinstance(specs, (str, bytes, PromptSpec)) or not isinstance(specs, Iterable):
        hint = " (one spec? pass [spec])" if isinstance(specs, PromptSpec) else ""
        raise TypeError(f"field_tokens: specs must be a list of PromptSpec objects (xlard.prompts.parse), got "
                        f"{type(specs).__name__}{hint}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"field_tokens: dtype must be a floating torch dtype, got {_short(dtype)}")
    if device is not None and not isinstance(device, torch.device):
        from xlard._args import as_device

        device = as_device(device, "field_tokens")
    specs = list(specs)
    if not specs:
        raise ValueError("field_tokens: specs is empty (expected at least one PromptSpec)")
    for i, spec in enumerate(specs):
        if not isinstance(spec, PromptSpec):
            raise ValueError(f"field_tokens: specs must be PromptSpec objects (xlard.prompts.parse), got "
                             f"{type(spec).__name__} at specs[{i}]")
    # keyed by the vectors' own key strings: equal values of other types (1, 1.0, True) are other vectors
    rows = [_row(tuple((f"{kind}:{value}", f"{slot_kind}:{slot}") for (kind, value), (slot_kind, slot)
                       in field_keys(spec)), dim) for spec in specs]
    length = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), length, dim)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
        mask[i, :len(row)] = True
    return tokens.to(device=device, dtype=dtype), mask.to(device=device)


@lru_cache(maxsize=4096)
def _row(keys: tuple[tuple[str, str], ...], dim: int) -> torch.Tensor:
    """One spec's tokens ``[T, dim]`` from its :func:`field_keys` as ``(value key, slot key)`` strings (cached: a
    corrector call builds them for every prompt of the batch; callers only read it)."""
    return torch.stack([_vector(value, dim) + _vector(slot, dim) for value, slot in keys])


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
