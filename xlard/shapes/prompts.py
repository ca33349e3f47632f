"""GenEval-format prompt sets for the shapes world, their splits, and ground-truth renders.

A record is a GenEval metadata line::

    {"tag": "position",
     "include": [{"class": "circle", "count": 1},
                 {"class": "square", "count": 1, "position": ["right of", 0]}],
     "exclude": [],
     "prompt": "a photo of a square right of a circle"}

Phrasing follows GenEval: "a photo of a bench", "a photo of a bench and a
car", "a photo of three dogs" (counting: exactly n, via an exclude clause at
n + 1), "a photo of a red car", "a photo of a dog right of a teddy bear" (the
item with ``position: [relation, j]`` is the subject, include item ``j`` the
target), "a photo of a purple suitcase and an orange pizza" (color_attr).

Splits: every distinct prompt of a tag is enumerated, prompts that say the same
thing ("a circle and a square" / "a square and a circle", "A left of B" / "B
right of A") are grouped, and whole groups go to ``train`` or ``heldout``; the
two splits never share a prompt string, nor a meaning.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numbers

import numpy as np

from .. import geneval
from .rules import OPPOSITE_RELATION, RELATIONS, TAGS, validate_record
from .world import (ObjectGroup, Relation, Scene, WorldConfig, _config_of, _is_int, _type, _world, as_rng,
                    compose_scene)

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                9: "nine", 10: "ten"}


@dataclass(frozen=True)
class PromptConfig:
    """What the prompt generator may ask for.

    Attributes:
        world: the world whose shapes and colors the prompts name (None: ``WorldConfig()``).
        count_range: inclusive range ``(lo, hi)`` of n in counting prompts, within 2..8 (one object is
            single_object's), and ``hi`` at most what the world holds (:meth:`WorldConfig.capacity`).
        counting_colors: also emit colored counting prompts ("three red circles");
            GenEval's own counting prompts have no color, so this is off by default.
        heldout_fraction: share of each tag's prompt groups kept for the held-out split, in (0, 1).

    Raises:
        TypeError: ``world`` is not a :class:`WorldConfig` (or None).
        ValueError: any other field of the wrong kind or out of range (each named).
    """

    world: WorldConfig = WorldConfig()
    count_range: tuple[int, int] = (2, 8)
    counting_colors: bool = False
    heldout_fraction: float = 0.2

    def __post_init__(self) -> None:
        # None raised a bare AttributeError deep inside enumerate_records, {} and an evaluator's config the same
        object.__setattr__(self, "world", _world("PromptConfig", self.world, "world"))
        pair = self.count_range
        if isinstance(pair, (str, bytes, Mapping)) or not isinstance(pair, Sequence) or len(pair) != 2 \
                or not all(_is_int(v) for v in pair):
            # 5 raised "cannot unpack non-iterable int object", (2, 3, 4) "too many values to unpack"
            raise ValueError(f"PromptConfig: count_range must be two integers (lo, hi), got {pair!r:.80}")
        lo, hi = int(pair[0]), int(pair[1])
        # a counting prompt of 1 reads exactly as a single_object (or colors) prompt: the splits, grouped by
        # tag, then shared prompt strings ("a photo of a triangle" in both)
        if not 2 <= lo <= hi <= 8:
            raise ValueError(f"count_range must satisfy 2 <= lo <= hi <= 8 (a count of 1 is a single_object "
                             f"prompt), got {self.count_range}")
        if hi > self.world.capacity():  # its splits held counting records that render_record refused
            raise ValueError(f"PromptConfig: count_range {(lo, hi)} asks for up to {hi} objects but the world holds "
                             f"at most {self.world.capacity()} (WorldConfig.capacity()); pass count_range=(2, "
                             f"{self.world.capacity()}) or a roomier world")
        object.__setattr__(self, "count_range", (lo, hi))
        if not isinstance(self.counting_colors, (bool, np.bool_)):  # "no" was taken as True
            raise ValueError(f"PromptConfig: counting_colors must be True or False, got {self.counting_colors!r:.80}")
        object.__setattr__(self, "counting_colors", bool(self.counting_colors))
        frac = self.heldout_fraction
        if isinstance(frac, (bool, np.bool_)) or not isinstance(frac, numbers.Real) or not 0.0 < frac < 1.0:
            # '0.2' raised "'<' not supported between instances of 'float' and 'str'"
            raise ValueError(f"PromptConfig: heldout_fraction must be a number in (0, 1), got {frac!r:.80}")


def _prompt_config(fn: str, config) -> PromptConfig:
    """``config`` checked to be a :class:`PromptConfig` (None: ``PromptConfig()``); a world's config, a mapping
    or the class itself is refused with a hint (a WorldConfig failed with "has no attribute 'world'", and a falsy
    wrong value such as {} silently became the default)."""
    return _config_of(fn, config, PromptConfig,
                      (lambda c: isinstance(c, WorldConfig), "; a world's config? wrap it: PromptConfig(world=...)"))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def noun_phrase(cls: str, count: int = 1, color: str | None = None) -> str:
    """"a red circle", "an orange square", "three blue triangles"."""
    words = ([color] if color else []) + [cls if count == 1 else _plural(cls)]
    if count == 1:
        return f"{_article(words[0])} {' '.join(words)}"
    return f"{NUMBER_WORDS.get(count, str(count))} {' '.join(words)}"  # digits past the words (11 was a KeyError)


def describe(include: Sequence[Mapping]) -> str:
    """The GenEval-style prompt for a list of include items.

    Items with ``position: [rel, j]`` read "<item> <rel> <item j>"; other items
    are joined with "and", in order.

    Example:
        >>> describe([{"class": "square", "count": 1, "color": "blue"},
        ...           {"class": "circle", "count": 3, "color": "red", "position": ["left of", 0]}])
        'a photo of three red circles left of a blue square'
    """
    phrases = [noun_phrase(it["class"], it["count"], it.get("color")) for it in include]
    used = set()
    clauses = []
    for i, it in enumerate(include):
        if "position" in it:
            rel, j = it["position"]
            clauses.append((j, f"{phrases[i]} {rel} {phrases[j]}"))
            used.update((i, j))
    for i in range(len(include)):
        if i not in used:
            clauses.append((i, phrases[i]))
    clauses.sort(key=lambda c: c[0])
    return "a photo of " + " and ".join(c[1] for c in clauses)


def make_record(tag: str, include: Sequence[Mapping], exclude: Sequence[Mapping] = ()) -> dict:
    """A record with GenEval's key order and a generated prompt."""
    include = [dict(it) for it in include]
    return {"tag": tag, "include": include, "exclude": [dict(e) for e in exclude], "prompt": describe(include)}


def enumerate_records(tag: str, config: PromptConfig | None = None) -> list[dict]:
    """Every distinct record of one tag that the world can pose.

    Args:
        tag: one of :data:`xlard.shapes.rules.TAGS`.
        config: prompt configuration (None: ``PromptConfig()``).

    Returns:
        Records, in a fixed order.

    Raises:
        TypeError: ``config`` is not a :class:`PromptConfig` (or None).
        ValueError: unknown tag.
    """
    config = _prompt_config("enumerate_records", config)
    shapes, colors = config.world.shapes, config.world.colors
    pairs = [(a, b) for a in shapes for b in shapes if a != b]
    one = lambda cls, **kw: {"class": cls, "count": 1, **kw}  # noqa: E731
    if tag == "single_object":
        return [make_record(tag, [one(s)]) for s in shapes]
    if tag == "two_object":
        return [make_record(tag, [one(a), one(b)]) for a, b in pairs]
    if tag == "counting":
        lo, hi = config.count_range
        out = []
        for s in shapes:
            for n in range(lo, hi + 1):
                for c in ((None,) + tuple(colors) if config.counting_colors else (None,)):
                    item = {"class": s, "count": n, **({"color": c} if c else {})}
                    out.append(make_record(tag, [item], [{"class": s, "count": n + 1}]))
        return out
    if tag == "colors":
        return [make_record(tag, [one(s, color=c)]) for s in shapes for c in colors]
    if tag == "position":
        return [make_record(tag, [one(b), one(a, position=[rel, 0])])
                for a, b in pairs for rel in RELATIONS]
    if tag == "color_attr":
        return [make_record(tag, [one(a, color=ca), one(b, color=cb)])
                for a, b in pairs for ca in colors for cb in colors if ca != cb]
    raise ValueError(f"unknown tag {tag!r}; expected one of {TAGS}")


def meaning_key(record: Mapping) -> str:
    """A key equal for records that ask for the same thing in different words."""
    tag = record["tag"]
    inc = record["include"]
    if tag == "position" and len(inc) == 2 and "position" in inc[1]:
        rel, _ = inc[1]["position"]
        subj = (inc[1]["class"], inc[1].get("color"))
        targ = (inc[0]["class"], inc[0].get("color"))
        if rel in ("right of", "below"):
            subj, targ, rel = targ, subj, OPPOSITE_RELATION[rel]
        return json.dumps([tag, subj, rel, targ])
    if tag in ("two_object", "color_attr"):
        items = sorted((it["class"], it.get("color") or "", it["count"]) for it in inc)
        return json.dumps([tag, items])
    return json.dumps([tag, record["prompt"]])


#: The seed of *the* split: the training split every trainer, script and the demo train on and the held-out split
#: every reported number is measured on. Another seed gives another partition, whose "held-out" prompts are
#: mostly this one's training prompts: :func:`make_splits` takes a seed for experiments, the CLI never does.
SPLIT_SEED = 0


def make_splits(config: PromptConfig | None = None, seed: int = SPLIT_SEED,
                tags: Sequence[str] = TAGS) -> dict[str, list[dict]]:
    """Split every tag's prompts into ``train`` and ``heldout``, sharing no prompt.

    Per tag, in :data:`TAGS` order, meaning groups (see :func:`meaning_key`) are
    shuffled by one generator seeded with ``seed``, and ``round(heldout_fraction
    * groups)`` of them (at least one, and never all) go to ``heldout``. Every
    tag is always shuffled, and ``tags`` only chooses which tags are returned,
    so a tag's split is the same whichever ``tags`` are asked for.

    A split is a function of ``(config, seed)``: another config (other
    ``counting_colors``, ``count_range`` or world shapes and colors) enumerates
    other prompts, and since one generator shuffles the tags in turn, even a tag
    whose prompts did not change can split differently. Train and evaluate with
    splits made from one config (the project's: ``PromptConfig()`` and
    :data:`SPLIT_SEED`).

    Args:
        config: prompt configuration (None: ``PromptConfig()``).
        seed: a non-negative integer.
        tags: which tags to return (a list or tuple of distinct names from :data:`TAGS`).

    Returns:
        ``{"train": [...], "heldout": [...]}``, records grouped by tag in
        :data:`TAGS` order.

    Raises:
        TypeError: ``config`` is not a :class:`PromptConfig` (or None).
        ValueError: a ``seed`` that is not a non-negative integer; ``tags`` that is a single string, names a tag
            twice or names an unknown tag.

    Example:
        >>> s = make_splits(seed=0)
        >>> not {r["prompt"] for r in s["train"]} & {r["prompt"] for r in s["heldout"]}
        True
    """
    fn = "make_splits"
    config = _prompt_config(fn, config)
    if not _is_int(seed) or seed < 0:  # 1.5 and "0" failed inside numpy, -1 with "expected non-negative integer"
        raise ValueError(f"{fn}: seed must be a non-negative integer (the project's split is SPLIT_SEED = "
                         f"{SPLIT_SEED}), got {seed!r:.80}")
    wanted = _tag_list(fn, tags)
    unknown = [t for t in wanted if t not in TAGS]
    if unknown:
        raise ValueError(f"{fn}: unknown tag(s) {unknown} in tags; expected names from {TAGS}")
    # One generator shuffles every tag, always in TAGS order: shuffling only the asked tags, in the asked order,
    # gave a tag another split for other `tags` (tags=("position",) put 4 of the 5 held-out meanings of the
    # project's split on the training side), and a tag named twice was split twice, into both halves.
    rng = np.random.default_rng(int(seed))
    train: list[dict] = []
    held: list[dict] = []
    for tag in TAGS:
        records = enumerate_records(tag, config)
        groups: dict[str, list[dict]] = {}
        for r in records:
            groups.setdefault(meaning_key(r), []).append(r)
        keys = sorted(groups)
        rng.shuffle(keys)
        if tag not in wanted:
            continue
        if len(keys) < 2:
            n_held = 0
        else:
            n_held = min(len(keys) - 1, max(1, int(round(config.heldout_fraction * len(keys)))))
        held_keys = set(keys[:n_held])
        for key in sorted(groups):
            (held if key in held_keys else train).extend(groups[key])
    return {"train": train, "heldout": held}


def _tag_list(fn: str, tags) -> list[str]:
    """``tags`` as a list of distinct strings: a list or tuple (any iterable but a string or a mapping)."""
    if isinstance(tags, (str, bytes, Mapping)) or not isinstance(tags, Iterable):
        # "position" was read letter by letter
        wrap = f"; wrap one tag in a list: [{tags!r}]" if isinstance(tags, str) else ""
        raise ValueError(f"{fn}: tags must be a list of tag names, got {_type(tags)} {tags!r:.80}{wrap}")
    out = list(tags)
    bad = [t for t in out if not isinstance(t, str)]
    if bad:
        raise ValueError(f"{fn}: tags must be a list of tag names, got {bad[0]!r:.80} among them")
    twice = sorted({t for t in out if out.count(t) > 1})
    if twice:
        raise ValueError(f"{fn}: tags names {twice} more than once; name each tag once")
    return out


def split_membership(records: Sequence[Mapping], seed: int = SPLIT_SEED) -> list[str | None]:
    """Per record: ``"train"`` or ``"heldout"`` when it asks what a record of that split asks (its
    :func:`meaning_key`), else None (a prompt of its own).

    Example:
        >>> split_membership(make_splits()["heldout"][:1])
        ['heldout']
    """
    splits = make_splits(PromptConfig(), seed=seed)
    where = {meaning_key(r): name for name in ("train", "heldout") for r in splits[name]}
    return [where.get(meaning_key(r)) for r in records]


#: The most records :func:`sample_records` draws (the CLI's bound on a prompt set is 100000).
MAX_SAMPLE = 10_000_000


def sample_records(records: Sequence[Mapping], n: int, seed: int | np.random.Generator | None = 0,
                   tags: Sequence[str] | None = None) -> list[dict]:
    """``n`` records balanced over tags, each tag cycled through a fresh shuffle.

    Within a tag a record repeats only after every record of that tag was
    drawn, so small pools (single_object) repeat and large ones (color_attr) do not.

    Args:
        records: the pool (e.g. a split: ``make_splits(...)["train"]``), a list of GenEval records.
        n: how many to draw.
        seed: int seed or numpy Generator.
        tags: tags to draw from, each once, in the order they take turns (default: those present, in
            :data:`TAGS` order).

    Returns:
        ``n`` records (copies), tags interleaved round-robin.

    Raises:
        TypeError: ``records`` is not a list of records (a whole ``make_splits`` result, a string, None).
        ValueError: ``n`` is negative or not an integer; a record without a ``tag``; ``tags`` that is a single
            string or names a tag twice; a tag has no records.
    """
    fn = "sample_records"
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0 or n > MAX_SAMPLE:
        # (2**63 looped for good, building the list)
        raise ValueError(f"sample_records: n must be a non-negative integer, got {n!r} (at most {MAX_SAMPLE})")
    if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Iterable):
        # a make_splits() result raised "string indices must be integers", None "not iterable"
        hint = "; a make_splits() result? pass its ['train'] or ['heldout']" \
            if isinstance(records, Mapping) and {"train", "heldout"} & set(records) else ""
        raise TypeError(f"{fn}: records must be a list of GenEval records, got {_type(records)}{hint}")
    rng = as_rng(seed)
    by_tag: dict[str, list[Mapping]] = {}
    for i, r in enumerate(records):
        if not isinstance(r, Mapping) or not isinstance(r.get("tag"), str):
            raise ValueError(f"{fn}: records[{i}] must be a GenEval record (a mapping with a 'tag'), got "
                             f"{_type(r)} {r!r:.80}")
        by_tag.setdefault(r["tag"], []).append(r)
    tags = [t for t in TAGS if t in by_tag] if tags is None else _tag_list(fn, tags)
    missing = [t for t in tags if t not in by_tag]
    if missing or not tags:
        raise ValueError(f"no records for tags {missing or tags}")
    queues: dict[str, list[Mapping]] = {t: [] for t in tags}
    out = []
    for i in range(n):
        t = tags[i % len(tags)]
        if not queues[t]:
            perm = rng.permutation(len(by_tag[t]))
            queues[t] = [by_tag[t][j] for j in perm]
        out.append(json.loads(json.dumps(queues[t].pop())))
    return out


def check_satisfiable(record: dict, world: WorldConfig | None = None) -> None:
    """Raise if no scene of ``world`` can satisfy the (valid) ``record``: an include count that meets its own
    exclude clause ("a circle" and "no circle"), or an uncolored include whose every color is excluded.

    Raises:
        TypeError: ``world`` is not a :class:`WorldConfig` (or None).
        ValueError: naming the record's prompt and the clause.
    """
    world = _world("check_satisfiable", world, "world")  # a PromptConfig raised a bare AttributeError
    include = record["include"]
    banned: dict[str, set[str]] = {}
    for e in record.get("exclude", []):
        have = sum(it["count"] for it in include if it["class"] == e["class"]
                   and ("color" not in e or it.get("color") == e["color"]))
        if have >= e["count"]:
            raise ValueError(f"record {record['prompt']!r} cannot be satisfied: it includes {have} "
                             f"{e['class']} but excludes {e['count']} or more")
        if "color" in e:
            banned.setdefault(e["class"], set()).add(e["color"])
    for it in include:
        if it.get("color") is None and it["class"] in banned \
                and not [c for c in world.colors if c not in banned[it["class"]]]:
            raise ValueError(f"record {record['prompt']!r} cannot be satisfied: every color of "
                             f"{it['class']} is excluded")


def render_record(record: Mapping, seed: int | np.random.Generator | None = 0,
                  world: WorldConfig | None = None, distractors: int = 0) -> Scene:
    """A ground-truth scene that satisfies ``record`` under GenEval's rules.

    Each include item becomes a group of ``count`` objects of its class (its
    color, or a random color per object when none is asked); positions become
    placement constraints at the world's ``position_margin``. Distractors are
    extra objects of classes the record does not mention.

    Args:
        record: a GenEval record.
        seed: int seed or numpy Generator.
        world: the world (None: ``WorldConfig()``).
        distractors: extra objects of unmentioned classes (skipped when every
            class is mentioned): at most :meth:`WorldConfig.max_objects` (the
            world's capacity) less the record's own objects, with or without
            relations (a layout with relations that random placement misses
            puts the smallest objects in grid cells that keep the relations).

    Returns:
        A :class:`Scene`.

    Raises:
        TypeError: ``world`` is not a :class:`WorldConfig` (or None).
        ValueError: malformed record, or one no scene can satisfy (an include
            count that meets its own exclude clause, more objects than the
            world holds); ``distractors`` not an integer in that range.
        RuntimeError: no layout keeps the record's relations (at the default
            ``position_margin`` only relations between several objects of a
            class can fail so; a larger margin can make any relation fail).
    """
    world = _world("render_record", world, "world")  # {} silently became the default world, a PromptConfig failed
    validate_record(record, classes=world.shapes, colors=world.colors)
    check_satisfiable(record, world)
    rng = as_rng(seed)
    include = record["include"]
    # An include item without a color must not draw a color that an exclude clause forbids for
    # its class ("a circle" + "no red circle"): such items become one group per object, each of
    # an allowed color, and relations are repeated for every piece (they hold object by object).
    banned: dict[str, set[str]] = {}
    for e in record.get("exclude", []):
        if "color" in e:
            banned.setdefault(e["class"], set()).add(e["color"])
    groups: list[ObjectGroup] = []
    pieces: list[list[int]] = []
    for it in include:
        if it.get("color") is None and it["class"] in banned:
            allowed = [c for c in world.colors if c not in banned[it["class"]]]
            pieces.append(list(range(len(groups), len(groups) + it["count"])))
            groups.extend(ObjectGroup(it["class"], 1, allowed[int(rng.integers(len(allowed)))])
                          for _ in range(it["count"]))
        else:
            pieces.append([len(groups)])
            groups.append(ObjectGroup(it["class"], it["count"], it.get("color")))
    relations = [Relation(s, it["position"][0], t) for i, it in enumerate(include) if "position" in it
                 for s in pieces[i] for t in pieces[it["position"][1]]]
    mentioned = {it["class"] for it in include} | {e["class"] for e in record.get("exclude", [])}
    free = [s for s in world.shapes if s not in mentioned]
    own = sum(it["count"] for it in include)
    if own > world.max_objects():  # it was blamed on distractors ("an integer in [0, 0]") when they were given
        raise ValueError(f"record {record['prompt']!r} asks for {own} objects; a {world.image_size}px image of this "
                         f"world holds at most {world.max_objects()}")
    # what the world fits beside the record's own objects (distractors are skipped when no class is free)
    most = max(0, world.max_objects() - own) if free else world.max_objects()
    if isinstance(distractors, bool) or not isinstance(distractors, (int, np.integer)) \
            or not 0 <= distractors <= most:  # 10**9 hung, -3 was ignored, 2.5 a TypeError
        raise ValueError(f"distractors must be an integer in [0, {most}] (what the world fits beside the record's "
                         f"objects), got {distractors!r}")
    if distractors and free:
        for _ in range(distractors):
            groups.append(ObjectGroup(free[int(rng.integers(len(free)))], 1))
    return compose_scene(groups, relations, rng, world)


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping]) -> Path:
    """Write rows as JSON lines atomically (creating the folder); see :func:`xlard.geneval.write_jsonl`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return geneval.write_jsonl(path, rows, validate=False)


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """Read JSON lines (blank lines skipped); errors name the file and line. See :func:`xlard.geneval.read_jsonl`."""
    return geneval.read_jsonl(path, validate=False)


def read_records(path: str | os.PathLike, world: WorldConfig | None = None,
                 line_numbers: list[int] | None = None) -> list[dict]:
    """Read and validate a GenEval JSONL prompt file (against ``world``'s vocabulary when given); ``line_numbers``,
    when given, receives the file's line of each record."""
    # the file's line of each record, counted by the reader itself (blank lines skipped): errors name it (a
    # second count of its own skipped other lines than the reader: a BOM or a no-break space line shifted it)
    if world is not None:  # {} was taken as no world, without a word
        world = _world("read_records", world, "world")
    lines: list[int] = []
    rows = geneval.read_jsonl(path, validate=False, line_numbers=lines)
    if line_numbers is not None:
        line_numbers.extend(lines)
    for i, r in enumerate(rows):
        try:
            validate_record(r, classes=world.shapes if world else None, colors=world.colors if world else None)
        except ValueError as e:
            raise ValueError(f"{path}:{lines[i] if i < len(lines) else i + 1}: {e}") from None
    return rows


__all__ = [
    "PromptConfig", "SPLIT_SEED", "NUMBER_WORDS", "split_membership", "noun_phrase", "describe", "make_record",
    "enumerate_records", "meaning_key", "make_splits", "sample_records", "check_satisfiable", "render_record",
    "write_jsonl",
    "read_jsonl", "read_records",
]
