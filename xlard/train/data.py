"""Training data: (prompt, seed) items in fixed batches, their order, and the encode cache.

An *item* is one GenEval record with one initial-noise seed. With
``balance="tag"`` every GenEval tag contributes the same number of items
(``items_per_tag``: a tag with few prompts gets more seeds per prompt, one
with many prompts a random subset), because a split dominated by one tag (the
shapes world's training split is 89% ``color_attr``) would otherwise starve the
others of updates. The items are
shuffled once (with the run's seed) and cut into fixed batches of
``prompts_per_step`` items; every epoch visits the batches in a fresh order.
Because a batch's contents never change, the backbone encodes it once (z0 and
e_p, with each item repeated ``group_size`` times so one decode call serves the
whole rollout) and the state is cached. The position in the data is a function
of the step alone, so resuming is exact.
"""
from __future__ import annotations

import json
import numbers
from collections import OrderedDict
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np

from xlard.prompts import PromptSpec, from_geneval

__all__ = ["Item", "PromptData", "balanced_pairs", "leave_out_prompts", "load_records", "refuse_heldout", "EncodeCache",
           "MONITOR_SEED_BASE", "CALIBRATION_SEED_BASE"]

#: Seeds of the monitor batch start here; training seeds are 0 .. seeds_per_prompt - 1.
MONITOR_SEED_BASE = 1_000_003
#: Seeds of the export's step-size calibration batch start here.
CALIBRATION_SEED_BASE = 2_000_003


@dataclass(frozen=True)
class Item:
    """One (record, seed) pair; ``index`` is its position in the record list."""

    record: dict
    seed: int
    index: int

    def spec(self) -> PromptSpec:
        return from_geneval(self.record)


def load_records(source: str) -> tuple[list[dict], bool]:
    """The records of ``data.prompts``: ``"shapes:train"`` or a GenEval JSONL path.

    Returns:
        (records, is_shapes): ``is_shapes`` when they are shapes-world records
        (then the exact evaluator can judge them, as a logged metric).

    Raises:
        ValueError: the held-out split, an empty file, an unknown ``shapes:`` split.
        FileNotFoundError: no such file.
    """
    text = source.strip()
    if text.lower().startswith("shapes:"):
        split = text.split(":", 1)[1]
        if split != "train":
            raise ValueError(f"data.prompts: {source!r}: train only on 'shapes:train'")
        from xlard.shapes import prompts as P

        return P.make_splits(P.PromptConfig(), seed=P.SPLIT_SEED)["train"], True
    from xlard import geneval

    lines: list[int] = []
    records = geneval.read_jsonl(text, line_numbers=lines)
    if not records:
        raise ValueError(f"data.prompts: {source} holds no records")
    from xlard.shapes.world import WorldConfig

    world = WorldConfig()
    classes, colors = set(world.shapes), set(world.colors)
    is_shapes = all(it["class"] in classes and it.get("color") in colors | {None}
                    for r in records for it in r["include"])
    # Every record is checked, whatever the others are: one record of another world beside held-out shapes
    # records turned the check off for the whole file, and the held-out ones were trained on.
    refuse_heldout(records, f"data.prompts: {source}", lines)
    return records, is_shapes


def refuse_heldout(records: Sequence[dict], where: str, line_numbers: Sequence[int] | None = None) -> None:
    """Shapes-world records must not ask what a held-out record asks (its meaning, as the split groups them).

    Every reported number is measured on the held-out split: a run that trained on such a record would be
    measured on what it saw, and one that watched it (the monitor logs the exact evaluator's verdicts) invites
    choices made on it.

    Args:
        records: the records.
        where: what they came from, for the message.
        line_numbers: each record's line in its file (1-based), to name the first one by its line; else it is
            named by its index (0-based).

    Raises:
        ValueError: naming how many records, the first one, and the fix.
    """
    from xlard.shapes import prompts as P

    held = _heldout_asks()
    leaked = [i for i, (split, record) in enumerate(zip(P.split_membership(records), records))
              if split == "heldout" or not held.isdisjoint(_asks(record))]
    if leaked:
        first = records[leaked[0]]["prompt"]
        at = (f"line {line_numbers[leaked[0]]}" if line_numbers is not None and len(line_numbers) == len(records)
              else f"record {leaked[0]}")
        raise ValueError(f"{where}: {len(leaked)} of {len(records)} records ask what held-out records of the shapes "
                         f"world ask ({at}: {first!r}); xlard measures correctors on the held-out "
                         f"split, so a run never sees it: remove them, or write the prompts with "
                         f"`xlard prompts --split train`")


_PHOTO_LEADS = ("a photo of ", "an image of ", "a picture of ")


def _asks(record: Mapping) -> set[str]:
    """Keys of what a record asks, whatever its wording and tag: its prompt text case-folded, its spaces collapsed,
    a final period and a leading "a photo of" dropped, and what its include clauses ask (a relation read left of /
    above; its exclude clauses aside). The split's own key (:func:`xlard.shapes.prompts.meaning_key`) is the exact
    prompt text and the tag for most tags: "A photo of eight squares " or the same record under another tag passed
    it."""
    text = " ".join(str(record.get("prompt", "")).casefold().split()).rstrip(" .")
    for lead in _PHOTO_LEADS:
        if text.startswith(lead):
            text = text[len(lead):]
            break
    keys = {"text:" + text}
    include = record.get("include")
    if isinstance(include, list) and all(isinstance(it, Mapping) for it in include):
        def item(it):
            return (str(it.get("class")).casefold(), str(it.get("color") or "").casefold(), it.get("count"))

        relations = []
        for it in include:
            position = it.get("position")
            if isinstance(position, (list, tuple)) and len(position) == 2 and isinstance(position[1], int) \
                    and 0 <= position[1] < len(include):
                subject, rel, target = item(it), str(position[0]), item(include[position[1]])
                if rel in ("right of", "below"):
                    subject, target, rel = target, subject, {"right of": "left of", "below": "above"}[rel]
                relations.append([subject, rel, target])
        # the include clauses alone: "8 squares" without the held-out "eight squares"' exclude (no 9) asks the same
        # as far as a trainer learns from it (a reworded record that dropped or added an exclude passed)
        keys.add("ask:" + json.dumps([sorted(map(item, include)), sorted(relations)], default=str))
    return keys


_HELDOUT_ASKS: set[str] | None = None


def _heldout_asks() -> set[str]:
    global _HELDOUT_ASKS
    if _HELDOUT_ASKS is None:
        from xlard.shapes import prompts as P

        _HELDOUT_ASKS = set().union(*(_asks(r) for r in P.make_splits(P.PromptConfig(), seed=P.SPLIT_SEED)["heldout"]))
    return _HELDOUT_ASKS


def check_items_per_tag(records: Sequence[dict], items_per_tag: int, section: str) -> None:
    """Refuse more than ``MAX_ITEMS`` pairs from :func:`balanced_pairs`: tags x ``items_per_tag`` (each factor was
    bounded alone, and 969 tags x 10**6 exhausted the memory); ``section`` names the config key's section."""
    from xlard.train.config import MAX_ITEMS

    tags = len({str(record.get("tag", "")) for record in records})
    if tags * items_per_tag > MAX_ITEMS:
        raise ValueError(f"{section}: {tags} tags x {section}.items_per_tag={items_per_tag} = {tags * items_per_tag} "
                         f"items, more than the bound of {MAX_ITEMS} items; lower {section}.items_per_tag")


def balanced_pairs(records: Sequence[dict], items_per_tag: int, seed: int) -> list[tuple[int, int]]:
    """``items_per_tag`` (record index, seed) pairs per GenEval tag, seeds as low as possible.

    A tag with ``m`` records gets seeds ``0 .. ceil(items_per_tag / m) - 1`` of
    each record, of which a random (seeded) ``items_per_tag`` are kept; pairs
    are returned tag by tag in sorted tag order. Records without a tag count as
    the tag ``""``.

    Example:
        >>> recs = [{"tag": "a"}, {"tag": "b"}, {"tag": "b"}, {"tag": "b"}]
        >>> sorted(balanced_pairs(recs, 2, 0)[:2])
        [(0, 0), (0, 1)]
    """
    by_tag: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_tag.setdefault(str(record.get("tag", "")), []).append(i)
    pairs: list[tuple[int, int]] = []
    for k, tag in enumerate(sorted(by_tag)):
        idx = by_tag[tag]
        seeds = -(-items_per_tag // len(idx))
        cand = [(r, s) for s in range(seeds) for r in idx]
        keep = np.random.default_rng([seed, 13, k]).permutation(len(cand))[:items_per_tag]
        pairs.extend(cand[j] for j in sorted(keep.tolist()))
    return pairs


def leave_out_prompts(records: Sequence[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split ``records`` into (kept, left out): ``fraction`` of each GenEval tag's prompts held back.

    A tag with ``m >= 2`` distinct prompts (records that repeat one count once, and go
    to one side together) leaves out ``round(fraction * m)`` of them, at least one and
    at most ``m - 1``; a tag with one prompt keeps it. The pick is
    seeded (``seed``, the tag's place in sorted tag order) and both lists keep
    the records' order. ``fraction == 0`` keeps everything. A run trained on the
    kept prompts can be validated on the left-out ones: prompts it never saw, as
    the held-out split's are, without touching the held-out split.

    Raises:
        ValueError: ``fraction`` outside [0, 1).

    Example:
        >>> recs = [{"tag": "a", "prompt": str(i)} for i in range(4)] + [{"tag": "b", "prompt": "x"}]
        >>> kept, out = leave_out_prompts(recs, 0.25, 0)
        >>> len(kept), len(out), out[0]["tag"]
        (4, 1, 'a')
    """
    if not (isinstance(fraction, (int, float)) and 0.0 <= float(fraction) < 1.0):
        raise ValueError(f"data.leave_out must be a fraction in [0, 1), got {fraction!r}")
    if fraction == 0:
        return list(records), []
    # Distinct prompts, not rows: a file that lists a record twice (xlard prompts -n samples with repeats) put one
    # copy in each list, so a "never seen" prompt had been trained on. Without repeats the pick is as before.
    by_tag: dict[str, list[str]] = {}
    key_of = []
    for record in records:
        key = json.dumps(record, sort_keys=True, default=str)  # the same record listed twice is one prompt
        key_of.append(key)
        keys = by_tag.setdefault(str(record.get("tag", "")), [])
        if key not in keys:
            keys.append(key)
    out: set[str] = set()
    for k, tag in enumerate(sorted(by_tag)):
        keys = by_tag[tag]
        if len(keys) < 2:
            continue
        n = min(max(int(round(float(fraction) * len(keys))), 1), len(keys) - 1)
        pick = np.random.default_rng([seed, 17, k]).permutation(len(keys))[:n]
        out.update(keys[j] for j in pick.tolist())
    return ([r for r, key in zip(records, key_of) if key not in out],
            [r for r, key in zip(records, key_of) if key in out])


class PromptData:
    """Fixed batches of items and the order an epoch visits them.

    Args:
        records: GenEval records.
        seeds_per_prompt: seeds per record (seeds 0 .. n-1).
        items_per_step: items per batch (the global batch).
        seed: the run's seed.
        balance: ``"none"`` (every record x ``seeds_per_prompt`` seeds) or
            ``"tag"`` (:func:`balanced_pairs`; ``seeds_per_prompt`` unused).
        items_per_tag: items per tag with ``balance="tag"``.

    Raises:
        ValueError: fewer items than one batch, an unknown balance.
    """

    def __init__(self, records: Sequence[dict], seeds_per_prompt: int, items_per_step: int, seed: int,
                 balance: str = "none", items_per_tag: int = 0):
        self.records = list(records)
        for name, value in (("seeds_per_prompt", seeds_per_prompt), ("items_per_step", items_per_step)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"PromptData: {name} must be a positive int, got {value!r}")
        if balance not in ("none", "tag"):
            raise ValueError(f"data.balance must be 'none' or 'tag', got {balance!r}")
        if balance == "tag":
            if items_per_tag < 1:
                raise ValueError(f"data.items_per_tag must be >= 1 with balance 'tag', got {items_per_tag!r}")
            check_items_per_tag(self.records, items_per_tag, "data")
            pairs = balanced_pairs(self.records, items_per_tag, seed)
        else:
            from xlard.train.config import MAX_ITEMS

            total = len(self.records) * seeds_per_prompt
            if total > MAX_ITEMS:  # 969 prompts x 10**6 seeds exhausted the memory building the pairs
                raise ValueError(f"data: {len(self.records)} prompts x data.seeds_per_prompt={seeds_per_prompt} = "
                                 f"{total} items, more than the bound of {MAX_ITEMS} items; lower "
                                 f"data.seeds_per_prompt (or data.max_prompts)")
            pairs = [(r, s) for r in range(len(self.records)) for s in range(seeds_per_prompt)]
        n = len(pairs)
        if n < items_per_step:
            what = (f"{len(self.records)} prompts x {seeds_per_prompt} seeds" if balance == "none"
                    else f"{items_per_tag} items per tag")
            raise ValueError(f"data: {what} = {n} items, fewer than ppo.prompts_per_step={items_per_step}")
        self._pairs = pairs
        rng = np.random.default_rng([seed, 7])
        order = rng.permutation(n)
        self.num_batches = n // items_per_step
        self.items_per_step = items_per_step
        self.seed = seed
        # Items left over after the last full batch are not used (at most items_per_step - 1).
        self._batches = [order[b * items_per_step:(b + 1) * items_per_step] for b in range(self.num_batches)]

    def _item(self, flat: int) -> Item:
        r, s = self._pairs[int(flat)]
        return Item(self.records[r], s, r)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, index within the epoch) of ``step``."""
        return divmod(step, self.num_batches)

    def batch(self, step: int) -> tuple[int, list[Item]]:
        """(batch id, its items) for ``step``."""
        epoch, pos = self.position(step)
        order = np.random.default_rng([self.seed, 11, epoch]).permutation(self.num_batches)
        bid = int(order[pos])
        return bid, [self._item(f) for f in self._batches[bid]]


class EncodeCache:
    """LRU cache of encoded batches (``capacity`` 0 = unbounded)."""

    def __init__(self, capacity: int = 0):
        if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) or capacity < 0:
            raise ValueError(f"EncodeCache: capacity must be an int >= 0 (0 = unbounded), got {capacity!r}")
        self.capacity = int(capacity)
        self._data: OrderedDict[Any, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key):
        if key in self._data:
            self._data.move_to_end(key)
            self.hits += 1
            return self._data[key]
        self.misses += 1
        return None

    def put(self, key, value) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        if self.capacity and len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)
