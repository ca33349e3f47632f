"""How well the CMD rewards agree with the exact evaluator on a backbone's own samples.

The rewards read their spatial evidence from a *reward source*
(:mod:`xlard.sources`, ``--source``): the backbone's own cross-attention
(``attention``), the shapes world's trained understanding model (``shapes``) or
a dense CLIP model (``clip``); never from the evaluator. The evaluator only
labels each sample correct or not. For each aspect the script reports, over
the records whose tag exercises it (counting -> count, colors/color_attr ->
color, position -> position):

- the pooled AUROC of the aspect's reward for "the evaluator judged this
  sample correct";
- the within-prompt AUROC: only pairs of samples of the *same prompt* (one
  judged correct, one wrong) are compared, which is the signal RL learns from
  (the prompt alone can already separate records pooled over prompts);
- bootstrap 95% intervals of both (prompts resampled with replacement, so the
  interval reflects the prompt-level dependence of the samples);
- the mean reward of correct and incorrect samples.

Generating samples is the slow part; ``--cache DIR`` stores them once (images,
records, attention maps; written in atomic chunks, so an interrupted run
resumes) and every later run with the same ``--cache`` reuses them:

    python scripts/reward_agreement.py --cache build/agreement_heldout --split heldout \\
        --per-tag 81 --seeds-per-prompt 4 --source shapes --out agreement.json

``--evaluator-stability`` (with ``--cache``) adds the agreement table's noise ceiling: the evaluator's verdict
on barely changed images (brightness +-3%, pixel noise, a 0.5 px blur) scored against its verdict on the
images as generated (:func:`evaluator_stability`).

Without ``--cache`` the samples are generated in memory (``-n`` records drawn
balanced over all six tags, as before).
"""
from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import random
import sys
import time
from pathlib import Path

ASPECT_TAGS = {"count": ("counting",), "color": ("colors", "color_attr"), "position": ("position",)}
ASPECT_INDEX = {"count": 0, "color": 1, "position": 2}
AGREEMENT_TAGS = ("counting", "colors", "position", "color_attr")


def _same_length(fn: str, **columns) -> None:
    """zip() cut the longer of scores / labels / groups without a word (an AUROC of 1.0 from half the samples)."""
    sizes = {name: len(v) for name, v in columns.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{fn}: {', '.join(sizes)} must have one entry per sample, got lengths "
                         f"{', '.join(str(n) for n in sizes.values())}")


def auroc(scores: list[float], labels: list[bool]) -> float:
    """Area under the ROC curve by the rank-sum formula (ties count half); NaN without both classes. A NaN score
    (no judgement) leaves its sample out."""
    _same_length("auroc", scores=scores, labels=labels)
    wins, pairs = _pair_wins(scores, labels)
    return wins / pairs if pairs else math.nan


def _pair_wins(scores: list[float], labels: list[bool]) -> tuple[float, int]:
    """(wins, pairs) over every (correct, wrong) pair of one group; ties count half.

    Counted with a sorted list of the wrong samples' scores (each correct one's wins and ties by bisection), so
    O(n log n): the pair loop it replaces took 1.4 s per AUROC at 20,000 samples (25 minutes for the default
    1000 bootstrap resamples, against 6 ms per AUROC now). The sum is of halves and wholes, exact in float, so it
    equals the pair loop's exactly.
    """
    # a NaN score is no judgement: its sample is left out of the pairs (it stayed in them and lost every one: a
    # NaN-scored wrong sample beat every correct one, auroc([0.5, 0.9, nan], [T, T, F]) was 0.0)
    pos = [s for s, y in zip(scores, labels) if y and not math.isnan(s)]
    ordered = sorted(s for s, y in zip(scores, labels) if not y and not math.isnan(s))
    wins = 0.0
    for p in pos:
        below, upto = bisect.bisect_left(ordered, p), bisect.bisect_right(ordered, p)
        wins += below + 0.5 * (upto - below)
    return wins, len(pos) * len(ordered)


def within_group_auroc(scores: list[float], labels: list[bool], groups: list[str]) -> float:
    """AUROC over the (correct, wrong) pairs that share a group (a prompt); NaN when no such pair exists.

    Equals the pooled AUROC when there is one group. Every pair weighs the
    same, so a prompt with many mixed samples weighs more than one with few. A NaN score leaves its sample out.
    """
    _same_length("within_group_auroc", scores=scores, labels=labels, groups=groups)
    by_group: dict[str, tuple[list[float], list[bool]]] = {}
    for s, y, g in zip(scores, labels, groups):
        by_group.setdefault(g, ([], []))
        by_group[g][0].append(s)
        by_group[g][1].append(y)
    wins = pairs = 0.0
    for s, y in by_group.values():
        w, p = _pair_wins(s, y)
        wins, pairs = wins + w, pairs + p
    return wins / pairs if pairs else math.nan


def bootstrap_ci(scores: list[float], labels: list[bool], groups: list[str], statistic, *,
                 resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(scores, labels, groups)``, resampling whole groups.

    Groups (prompts) are drawn with replacement; a group drawn twice enters
    twice under distinct names, so within-group pairs never cross copies.
    Resamples where the statistic is NaN (one class missing) are dropped, as
    long as they are few: the ones kept are those that drew the groups the
    statistic rests on, so with many dropped (one mixed prompt among twenty:
    a third) the interval only says how the statistic varies given those
    groups, and looked certain (``[1.0, 1.0]`` on four pairs of one prompt).

    Returns:
        (low, high); NaN, NaN (no interval) for a single group, or when more
        than 10% of the resamples gave no number.
    """
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    names = sorted(by_group)
    rng = random.Random(seed)
    values = []
    for _ in range(resamples):
        s, y, g = [], [], []
        for copy in range(len(names)):
            name = names[rng.randrange(len(names))]
            for i in by_group[name]:
                s.append(scores[i])
                y.append(labels[i])
                g.append(f"{name}#{copy}")
        v = statistic(s, y, g)
        if not math.isnan(v):
            values.append(v)
    if len(names) < 2 or not values or len(values) < 0.9 * resamples:
        return math.nan, math.nan
    values.sort()
    alpha = (1.0 - level) / 2.0
    lo = values[min(len(values) - 1, max(0, int(math.floor(alpha * len(values)))))]
    hi = values[min(len(values) - 1, max(0, int(math.ceil((1.0 - alpha) * len(values))) - 1))]
    return lo, hi


def _pooled(scores, labels, groups):
    return auroc(scores, labels)


# ---------------------------------------------------------------------------
# Samples: which records, generated once and cached
# ---------------------------------------------------------------------------


def plan_records(split: str, per_tag: int, seeds_per_prompt: int, seed: int = 0,
                 tags: tuple[str, ...] = AGREEMENT_TAGS) -> list[dict]:
    """Records for an agreement run: ``per_tag`` samples per tag, several image seeds per prompt.

    Per tag, ``ceil(per_tag / seeds_per_prompt)`` distinct prompts of the
    split are drawn (all of them when the split has fewer, which then get
    more seeds each) and the tag's samples cycle over them. Each record gets
    ``image_seed`` (``seed`` + its index), so a record list fully determines
    its samples.

    Raises:
        ValueError: an unknown split or tag, or a non-positive count.
    """
    from xlard.shapes import prompts as P

    if split not in ("train", "heldout"):
        raise ValueError(f"--split must be 'train' or 'heldout', got {split!r}")
    if per_tag < 1 or seeds_per_prompt < 1:
        raise ValueError(f"--per-tag and --seeds-per-prompt must be >= 1, got {per_tag}, {seeds_per_prompt}")
    pool = P.make_splits(P.PromptConfig(), seed=P.SPLIT_SEED)[split]
    rng = random.Random(seed)
    out = []
    for tag in tags:
        prompts = [r for r in pool if r["tag"] == tag]
        if not prompts:
            raise ValueError(f"no {tag!r} records in the {split} split")
        rng.shuffle(prompts)
        used = prompts[:max(1, min(len(prompts), math.ceil(per_tag / seeds_per_prompt)))]
        for i in range(per_tag):
            out.append(json.loads(json.dumps(used[i % len(used)])))
    for i, r in enumerate(out):
        r["image_seed"] = seed + i
    return out


def load_backbone(backbone_name: str, steps: int = 0, capture: bool = True):
    """The backbone with the sampler settings its evaluation used (shapes: 20 steps, guidance 5)."""
    import torch

    from xlard.backbones import DiffusersBackbone
    from xlard.cli import resolve_backbone

    kwargs = {"num_inference_steps": steps} if steps else {}
    if backbone_name == "shapes":  # the sampler settings the shipped model was evaluated with
        from xlard.shapes import backbone as shapes_backbone

        kwargs.setdefault("num_inference_steps", shapes_backbone.DEFAULT_STEPS)
        kwargs["guidance_scale"] = shapes_backbone.DEFAULT_GUIDANCE
    return DiffusersBackbone.from_pretrained(resolve_backbone(backbone_name), torch_dtype=torch.float32,
                                             capture=None if capture else False, **kwargs)


# What to do about a damaged file: a chunk or the labels are made again from what the cache holds; the records and
# settings say which samples the chunks are, so without them the chunks cannot be trusted.
_REMAKE = "delete it and rerun with the same options (it is made again)"
_RESTART = "delete the folder (its samples are generated again) or use another --cache"


def _damaged(path: Path, exc: BaseException, fix: str) -> ValueError:
    """A damaged cache file named with the fix (it was a traceback, or "Expecting value" naming no file)."""
    from xlard import _io

    return ValueError(f"--cache: {path} is damaged ({_io.describe_load_error(exc)}); {fix}")


def _read_json(path: Path, kind: type, fix: str):
    try:
        value = json.loads(path.read_text())
        if not isinstance(value, kind):
            raise ValueError(f"a JSON {type(value).__name__}, not a {kind.__name__}")
        return value
    except (ValueError, UnicodeDecodeError, FileNotFoundError) as exc:  # (meta.json gone beside records.jsonl)
        raise _damaged(path, exc, fix) from None


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as exc:
        raise _damaged(path, exc, _RESTART) from None
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError as exc:
                raise _damaged(path, ValueError(f"line {n}: {exc}"), _RESTART) from None
    return out


def _save_atomic(obj, path: Path) -> None:
    import torch

    from xlard import _io

    with _io.atomic_path(path, owner="reward_agreement --cache") as tmp:
        torch.save(obj, tmp)


def generate_cache(folder: str | os.PathLike, backbone_name: str, records: list[dict], *, batch: int = 16,
                   steps: int = 0, quiet: bool = False) -> Path:
    """Generate one sample per record into ``folder`` (resumable), unless it holds them already.

    Writes ``records.jsonl`` and ``meta.json`` first, then one
    ``chunk_<start>.pt`` per batch (images float32 [b, 3, H, W] in [0, 1],
    the backbone's token maps) atomically; a rerun skips finished chunks.

    Raises:
        ValueError: the folder holds a cache of other records or another backbone.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"backbone": backbone_name, "steps": steps, "batch": batch, "n": len(records)}
    rec_path, meta_path = folder / "records.jsonl", folder / "meta.json"
    if rec_path.exists():
        old = _read_jsonl(rec_path)
        old_meta = _read_json(meta_path, dict, _RESTART)
        if old != records or old_meta != meta:
            what = [w for w, differs in (("records (--split, --per-tag, --seeds-per-prompt or --seed)", old != records),
                                         (f"settings ({old_meta} here, {meta} asked)", old_meta != meta)) if differs]
            raise ValueError(f"--cache {folder} holds other samples: other {' and other '.join(what)}; use "
                             "another folder")
    else:
        from xlard import _io

        _io.atomic_write_json(meta_path, meta, owner="reward_agreement --cache")
        _io.atomic_write_text(rec_path, "".join(_io.dumps(r) + "\n" for r in records),
                              owner="reward_agreement --cache")
    todo = [s for s in range(0, len(records), batch) if not (folder / f"chunk_{s:05d}.pt").exists()]
    if not todo:
        return folder
    backbone = load_backbone(backbone_name, steps)
    t0 = time.time()
    for done, start in enumerate(todo, 1):
        chunk = records[start:start + batch]
        out = backbone.generate([r["prompt"] for r in chunk], seed=[r["image_seed"] for r in chunk])
        _save_atomic({"images": out.images.float().cpu(), "token_maps": out.decoded.token_maps.float().cpu(),
                      "segment_offsets": dict(out.decoded.segment_offsets)}, folder / f"chunk_{start:05d}.pt")
        if not quiet:
            print(f"cache {folder.name}: {min(start + batch, len(records))}/{len(records)} samples, "
                  f"{time.time() - t0:.0f}s ({done}/{len(todo)} chunks this run)", file=sys.stderr, flush=True)
    return folder


def load_cache(folder: str | os.PathLike):
    """(records, images float32 [N, 3, H, W], token_maps [N, T, h, w], meta) of a finished cache.

    Raises:
        FileNotFoundError: the cache is missing or incomplete (rerun to finish it).
    """
    import torch

    folder = Path(folder)
    rec_path = folder / "records.jsonl"
    if not rec_path.exists():
        raise FileNotFoundError(f"no cache at {folder} (records.jsonl missing)")
    records = _read_jsonl(rec_path)
    meta = _read_json(folder / "meta.json", dict, _RESTART)
    images, maps, offsets = [], [], None
    for start in range(0, len(records), meta["batch"]):
        path = folder / f"chunk_{start:05d}.pt"
        if not path.exists():
            raise FileNotFoundError(f"cache {folder} is incomplete ({path.name} missing); rerun with the same "
                                    "options to finish it")
        try:
            chunk = torch.load(path)
            if not isinstance(chunk, dict) or not {"images", "token_maps", "segment_offsets"} <= set(chunk):
                raise ValueError(f"holds no samples ({type(chunk).__name__})")
        except (OSError, MemoryError):  # not the file's content: a permission, the disk, the machine
            raise
        except Exception as exc:  # empty, cut short, overwritten: EOFError, PytorchStreamReader, UnpicklingError
            raise _damaged(path, exc, _REMAKE) from None
        images.append(chunk["images"])
        maps.append(chunk["token_maps"])
        offsets = chunk["segment_offsets"]
    meta["segment_offsets"] = offsets
    return records, torch.cat(images), torch.cat(maps), meta


# ---------------------------------------------------------------------------
# Scoring with a source
# ---------------------------------------------------------------------------


def evaluator_labels(folder: str | os.PathLike, records: list[dict], images) -> list[bool]:
    """The exact evaluator's verdict per cached sample (stored beside the cache once computed)."""
    from xlard.shapes import evaluator as E

    path = Path(folder) / "labels.json"
    if path.exists():
        labels = _read_json(path, list, _REMAKE)
        if len(labels) == len(records):
            return labels
    labels = [bool(r.correct) for r in E.evaluate(images, records)]
    from xlard import _io

    _io.atomic_write_json(path, labels, owner="reward_agreement --cache")
    return labels


def make_source(name: str, backbone, source_options: dict | None = None):
    from xlard.sources import get_source

    return get_source(name, backbone, **(source_options or {}))


def score_samples(records: list[dict], images, token_maps, segment_offsets, specs, source, rewards=None,
                  batch: int = 64) -> list[list[float | None]]:
    """Per-sample ``[count, color, position]`` rewards (None where absent) of cached samples under a source."""
    import torch

    from xlard.backbones.base import Decoded
    from xlard.sources import score

    out = []
    for start in range(0, len(records), batch):
        sl = slice(start, start + batch)
        maps = token_maps[sl] if token_maps is not None else None
        decoded = Decoded(images=images[sl], latents=torch.zeros(0), token_maps=maps, patch_features=None,
                          specs=tuple(specs[sl]), segment_offsets=segment_offsets or {})
        result = score(decoded, source, rewards, explain=False)
        for row in result.scores.tolist():
            out.append([None if math.isnan(v) else v for v in row])
    return out


def summarize(rows: list[dict], *, resamples: int = 1000, seed: int = 0) -> dict:
    """Per aspect: pooled and within-prompt AUROC with bootstrap 95% intervals, mean rewards."""
    summary = {}
    for aspect, tags in ASPECT_TAGS.items():
        # a sample without a score (None, or NaN from a caller's rows) is left out of every statistic at once: NaN
        # was out of the AUROCs but in the mean rewards (NaN) and the mixed-prompt count
        sel = [r for r in rows if r["tag"] in tags and r["scores"][ASPECT_INDEX[aspect]] is not None
               and not math.isnan(r["scores"][ASPECT_INDEX[aspect]])]
        scores = [r["scores"][ASPECT_INDEX[aspect]] for r in sel]
        labels = [r["correct"] for r in sel]
        groups = [r["prompt"] for r in sel]
        correct = [s for s, y in zip(scores, labels) if y]
        wrong = [s for s, y in zip(scores, labels) if not y]
        mixed = sum(1 for g in set(groups) if len({y for y, h in zip(labels, groups) if h == g}) == 2)
        pairs = sum(_pair_wins([s for s, h in zip(scores, groups) if h == g],
                               [y for y, h in zip(labels, groups) if h == g])[1] for g in set(groups))
        summary[aspect] = {
            "tags": list(tags), "records": len(sel), "prompts": len(set(groups)), "mixed_prompts": mixed,
            "within_pairs": pairs, "evaluator_correct": sum(labels),
            "auroc": auroc(scores, labels),
            "auroc_ci": bootstrap_ci(scores, labels, groups, _pooled, resamples=resamples, seed=seed),
            "within_auroc": within_group_auroc(scores, labels, groups),
            "within_auroc_ci": bootstrap_ci(scores, labels, groups, within_group_auroc, resamples=resamples,
                                            seed=seed),
            "mean_reward_correct": sum(correct) / len(correct) if correct else None,
            "mean_reward_wrong": sum(wrong) / len(wrong) if wrong else None,
        }
    return summary


# Small changes a viewer would not notice (brightness, sensor-like noise, a slight softening), each a list of
# draws whose verdicts are averaged: (label, [(kind, value), ...]).
PERTURBATIONS = (
    ("brightness x0.97 / x1.03", [("gain", 0.97), ("gain", 1.03)]),
    ("pixel noise sd 2/255 (2 draws)", [("noise", 2 / 255), ("noise", 2 / 255)]),
    ("Gaussian blur sd 0.5 px", [("blur", 0.5)]),
)


def perturb(images, kind: str, value: float, generator=None):
    """``images`` (float ``[N, 3, H, W]`` in [0, 1]) changed a little, clamped to [0, 1].

    ``gain``: every value times ``value``; ``noise``: Gaussian noise of standard deviation ``value`` (drawn from
    ``generator``); ``blur``: a Gaussian blur of ``value`` pixels (separable, radius ``ceil(3 * value)``, edges
    replicated).

    Raises:
        ValueError: an unknown ``kind`` or a ``value`` that is not a finite number > 0.
    """
    import torch
    import torch.nn.functional as F

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"perturb: value must be a finite number > 0, got {value!r}")
    x = images.float()
    if kind == "gain":
        out = x * value
    elif kind == "noise":
        out = x + torch.randn(x.shape, generator=generator) * value
    elif kind == "blur":
        r = max(1, math.ceil(3 * value))
        t = torch.arange(-r, r + 1, dtype=torch.float32)
        k = torch.exp(-t ** 2 / (2 * value * value))
        k = (k / k.sum()).to(x.device)
        c = x.shape[1]
        out = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
        out = F.conv2d(F.pad(out, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
    else:
        raise ValueError(f"perturb: kind must be one of 'gain', 'noise', 'blur', got {kind!r}")
    return out.clamp(0.0, 1.0)


def evaluator_stability(records: list[dict], images, labels: list[bool], *, resamples: int = 1000,
                        seed: int = 0) -> dict:
    """How well the exact evaluator agrees with *itself* when the images change imperceptibly.

    For each change of :data:`PERTURBATIONS` every sample is judged again on the changed image (the verdicts of
    its draws averaged), and that score is measured against the verdicts on the unchanged images exactly as a
    reward is (:func:`summarize`: within-prompt and pooled AUROC, bootstrap intervals). It is a noise ceiling of
    the agreement tables: a reward that reads the image as a viewer does, rather than the evaluator's own pixel
    rules, cannot be expected to predict the verdicts better than the evaluator predicts them after a change
    nobody would see. Also reported: how many verdicts a single draw changed.
    """
    import torch

    from xlard.shapes import evaluator as E

    generator = torch.Generator().manual_seed(seed)
    out = {}
    for label, draws in PERTURBATIONS:
        votes = [0.0] * len(records)
        changed = 0
        for kind, value in draws:
            verdicts = [bool(r.correct) for r in E.evaluate(perturb(images, kind, value, generator), records)]
            changed += sum(v != y for v, y in zip(verdicts, labels))
            votes = [a + float(v) / len(draws) for a, v in zip(votes, verdicts)]
        rows = [{"tag": r["tag"], "prompt": r["prompt"], "correct": y, "scores": [v, v, v]}
                for r, y, v in zip(records, labels, votes)]
        summary = summarize(rows, resamples=resamples, seed=seed)
        for aspect, tags in ASPECT_TAGS.items():
            n = sum(r["tag"] in tags for r in records)
            summary[aspect]["verdicts_changed_per_draw"] = (
                sum(abs(v - y) for r, y, v in zip(records, labels, votes) if r["tag"] in tags) if n else 0.0)
        out[label] = {"draws": [list(d) for d in draws], "verdicts_changed_per_draw": changed / len(draws),
                      "summary": summary}
    return out


def render_checks(source, rewards=None, split: str = "heldout", seeds: int = 5) -> dict:
    """What a source finds on the world's ground-truth renders of a split's prompts (no generation).

    - count: over every entity of every counting prompt (``seeds`` renders
      each), the share whose count found equals the count asked for;
    - position: over every position prompt (``seeds`` renders each), the share
      where the position reward of the render beats that of its mirror image
      (positions flipped along the relation's axis, so the relation reverses).
    """
    import numpy as np
    import torch

    from xlard.backbones.base import Decoded
    from xlard.prompts import parse
    from xlard.shapes import prompts as P
    from xlard.shapes.world import mirror_scene
    from xlard.sources import score

    pool = P.make_splits(P.PromptConfig(), seed=P.SPLIT_SEED)[split]

    def run(scenes, prompts):
        images = torch.from_numpy(np.stack([s.render() for s in scenes])).permute(0, 3, 1, 2).float() / 255
        decoded = Decoded(images=images, latents=torch.zeros(0), token_maps=None, patch_features=None,
                          specs=tuple(parse(p) for p in prompts), segment_offsets={})
        return score(decoded, source, rewards, explain=False)

    counting = [r for r in pool if r["tag"] == "counting"]
    scenes = [P.render_record(r, seed=s) for r in counting for s in range(seeds)]
    result = run(scenes, [r["prompt"] for r in counting for _ in range(seeds)])
    asked = result.count_target >= 0
    count_ok = ((result.count_found.long() == result.count_target) & asked).sum().item()
    positions = [r for r in pool if r["tag"] == "position"]
    true_scenes, mirrored = [], []
    for r in positions:
        relation = next(it["position"][0] for it in r["include"] if "position" in it)
        for s in range(seeds):
            scene = P.render_record(r, seed=s)
            true_scenes.append(scene)
            mirrored.append(mirror_scene(scene, "x" if relation in ("left of", "right of") else "y"))
    prompts = [r["prompt"] for r in positions for _ in range(seeds)]
    true_pos, mirror_pos = run(true_scenes, prompts).position, run(mirrored, prompts).position
    return {"split": split, "seeds": seeds,
            "count_entities": int(asked.sum()), "count_exact": int(count_ok),
            "count_exact_share": count_ok / max(1, int(asked.sum())),
            "position_pairs": len(prompts), "position_true_beats_mirror": int((true_pos > mirror_pos).sum()),
            "position_true_beats_mirror_share": float((true_pos > mirror_pos).float().mean())}


def run_cached(folder: str | os.PathLike, source_name: str, *, source_options: dict | None = None,
               rewards=None, resamples: int = 1000, seed: int = 0, checks: int = 0, split: str = "heldout",
               stability: bool = False) -> dict:
    """Agreement of a source on a finished cache (see :func:`generate_cache`).

    ``checks`` > 0 adds :func:`render_checks` on ``split``'s prompts (image-only sources); ``stability`` adds
    :func:`evaluator_stability` (the evaluator against itself on the same samples).
    """
    records, images, token_maps, meta = load_cache(folder)
    backbone = load_backbone(meta["backbone"], meta["steps"], capture=source_name == "attention")
    specs = [backbone.parse(r["prompt"]) for r in records]
    source = make_source(source_name, backbone, source_options)
    t0 = time.time()
    scores = score_samples(records, images, token_maps, meta["segment_offsets"], specs, source, rewards)
    seconds = time.time() - t0
    labels = evaluator_labels(folder, records, images)
    rows = [{"tag": r["tag"], "prompt": r["prompt"], "image_seed": r["image_seed"], "correct": y, "scores": s}
            for r, y, s in zip(records, labels, scores)]
    report = {"backbone": meta["backbone"], "source": source_name, "cache": str(folder), "n": len(rows),
              "prompts": len({r["prompt"] for r in rows}), "seed": seed, "reward_seconds": seconds,
              "summary": summarize(rows, resamples=resamples, seed=seed), "rows": rows}
    if checks and not source.needs_attention:
        report["render_checks"] = render_checks(source, rewards, split, checks)
    if stability:
        report["evaluator_stability"] = evaluator_stability(records, images, labels, resamples=resamples, seed=seed)
    return report


def run(backbone_name: str, n: int, seed: int, batch: int, steps: int, quiet: bool, source_name: str = "attention",
        source_options: dict | None = None, resamples: int = 1000) -> dict:
    """Generate ``n`` held-out records in memory (balanced over the six tags) and measure agreement."""
    import torch

    from xlard.shapes import evaluator as E
    from xlard.shapes import prompts as P
    from xlard.sources import score

    records = P.sample_records(P.make_splits(P.PromptConfig(), seed=P.SPLIT_SEED)["heldout"], n, seed=seed)
    backbone = load_backbone(backbone_name, steps, capture=source_name == "attention")
    source = make_source(source_name, backbone, source_options)
    rows = []
    t0 = time.time()
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        out = backbone.generate([r["prompt"] for r in chunk], seed=[seed + start + k for k in range(len(chunk))])
        with torch.no_grad():
            rewards = score(out.decoded, source, explain=False)
        judged = E.evaluate(out.images, chunk)
        for k, (record, result) in enumerate(zip(chunk, judged)):
            rows.append({"tag": record["tag"], "prompt": record["prompt"], "correct": bool(result.correct),
                         "scores": [None if math.isnan(v) else v for v in rewards.scores[k].tolist()],
                         "joint": None if math.isnan(float(rewards.joint[k])) else float(rewards.joint[k])})
        if not quiet:
            print(f"{min(start + batch, len(records))}/{len(records)} records, {time.time() - t0:.0f}s",
                  file=sys.stderr)
    summary = summarize(rows, resamples=resamples, seed=seed)
    joint = [r for r in rows if r["joint"] is not None]
    summary["joint"] = {"records": len(joint), "auroc": auroc([r["joint"] for r in joint],
                                                              [r["correct"] for r in joint])}
    return {"backbone": backbone_name, "source": source_name, "n": len(rows), "seed": seed,
            "seconds": time.time() - t0, "summary": summary, "rows": rows}


def to_markdown(report: dict) -> str:
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"  # noqa: E731
    ci = lambda pair: f"[{fmt(pair[0])}, {fmt(pair[1])}]"  # noqa: E731
    lines = [f"CMD reward (source {report.get('source', 'attention')!r}) vs exact evaluator on {report['n']} samples "
             f"of backbone {report['backbone']!r}", "",
             "| aspect | tags | samples | prompts (mixed) | evaluator-correct | within-prompt AUROC [95% CI] "
             "| pooled AUROC [95% CI] | mean reward (correct) | mean reward (wrong) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for aspect in ("count", "color", "position"):
        s = report["summary"][aspect]
        lines.append(f"| {aspect} | {', '.join(s['tags'])} | {s['records']} | {s['prompts']} ({s['mixed_prompts']}) | "
                     f"{s['evaluator_correct']} | {fmt(s['within_auroc'])} {ci(s['within_auroc_ci'])} | "
                     f"{fmt(s['auroc'])} {ci(s['auroc_ci'])} | {fmt(s['mean_reward_correct'])} | "
                     f"{fmt(s['mean_reward_wrong'])} |")
    if "joint" in report["summary"]:
        j = report["summary"]["joint"]
        lines.append(f"| joint | all | {j['records']} | | | | {fmt(j['auroc'])} | | |")
    checks = report.get("render_checks")
    if checks:
        lines += ["", f"Ground-truth renders ({checks['split']} prompts, {checks['seeds']} renders each): count found "
                      f"= count asked for {checks['count_exact']}/{checks['count_entities']} entities "
                      f"({checks['count_exact_share']:.1%}); position reward ranks the true relation over its mirror "
                      f"{checks['position_true_beats_mirror']}/{checks['position_pairs']} "
                      f"({checks['position_true_beats_mirror_share']:.1%})."]
    stability = report.get("evaluator_stability")
    if stability:
        lines += ["", "The evaluator against itself: its verdict on a barely changed image as the score, measured "
                      "against its verdict on the image as generated (a noise ceiling for the table above)", "",
                  "| change | aspect | verdicts changed per draw | within-prompt AUROC [95% CI] "
                  "| pooled AUROC [95% CI] |", "|---|---|---:|---:|---:|"]
        for label, entry in stability.items():
            for aspect in ("count", "color", "position"):
                s = entry["summary"][aspect]
                lines.append(f"| {label} | {aspect} | {s['verdicts_changed_per_draw']:g} of {s['records']} | "
                             f"{fmt(s['within_auroc'])} {ci(s['within_auroc_ci'])} | "
                             f"{fmt(s['auroc'])} {ci(s['auroc_ci'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="shapes")
    parser.add_argument("--source", default=None, choices=("attention", "shapes", "clip"),
                        help="reward source (default: the backbone's default, xlard.sources.default_source_for)")
    parser.add_argument("--clip-model", help="CLIP or SigLIP checkpoint id or folder for --source clip")
    parser.add_argument("--cache", help="generate the samples into this folder once, then reuse them")
    # None: not given (the --cache options are refused without --cache, -n with it); filled in below
    parser.add_argument("--split", default=None, choices=("train", "heldout"),
                        help="prompt split (--cache; default heldout)")
    parser.add_argument("--per-tag", type=int, default=None, help="samples per agreement tag (--cache; default 81)")
    parser.add_argument("--seeds-per-prompt", type=int, default=None,
                        help="image seeds per prompt (--cache; default 4)")
    parser.add_argument("-n", type=int, default=None,
                        help="held-out records without --cache (balanced over the six tags; default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--render-checks", type=int, default=None,
                        help="renders per prompt for the ground-truth checks (--cache; default 5; 0: skip; "
                             "image-only sources)")
    parser.add_argument("--evaluator-stability", action="store_true",
                        help="also judge every sample again on barely changed images (brightness +-3%%, pixel noise, "
                             "a 0.5 px blur) and report how well the evaluator agrees with itself (--cache)")
    parser.add_argument("--out", help="write the report (JSON, with per-sample rows) here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    cache_only = [flag for flag, value in (("--split", args.split), ("--per-tag", args.per_tag),
                                           ("--seeds-per-prompt", args.seeds_per_prompt),
                                           ("--render-checks", args.render_checks),
                                           ("--evaluator-stability", args.evaluator_stability or None))
                  if value is not None]
    if cache_only and not args.cache:  # they were ignored without a word (--split train scored held-out records)
        parser.error(f"{cache_only[0]} goes with --cache DIR (without --cache the run samples -n held-out records)")
    if args.n is not None and args.cache:
        parser.error("-n goes without --cache (with --cache, --per-tag and --seeds-per-prompt size the run)")
    for name, default in (("split", "heldout"), ("per_tag", 81), ("seeds_per_prompt", 4), ("render_checks", 5),
                          ("n", 300)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.per_tag < 1 or args.seeds_per_prompt < 1 or args.n < 1 or args.batch < 1 or args.resamples < 1:
        parser.error("-n, --per-tag, --seeds-per-prompt, --batch and --resamples must be >= 1")
    # checked here, before --cache records them (a cache made with --steps -3 refused the corrected command)
    if not 0 <= args.steps <= 10_000:
        parser.error(f"--steps must be in [0, 10000] (0: the backbone's default), got {args.steps}")
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.render_checks < 0:
        parser.error(f"--render-checks must be >= 0, got {args.render_checks}")
    # --per-tag samples of each agreement tag (--seeds-per-prompt spreads them over prompts; it was the factor here,
    # so --per-tag 100000 made 400000 samples and --per-tag 12501 --seeds-per-prompt 8 was refused at 50004)
    if max(args.n, len(AGREEMENT_TAGS) * args.per_tag) > 100_000:
        parser.error(f"-n and --per-tag x {len(AGREEMENT_TAGS)} tags must be at most 100000 samples, got "
                     f"{max(args.n, len(AGREEMENT_TAGS) * args.per_tag)}")
    from xlard import _io

    # Outputs first: a bad path fails now, not after minutes of sampling.
    problem = _io.unwritable_output(folders={"--cache": args.cache}, files={"--out": args.out})
    if problem:
        parser.error(problem)
    from xlard.sources import default_source_for

    source = args.source or default_source_for(args.backbone)
    options = {}
    if source == "clip":
        if not args.clip_model:
            parser.error("--source clip needs --clip-model (e.g. openai/clip-vit-base-patch16)")
        from xlard.color_features import check_clip_model

        try:  # now, not after the samples are generated
            check_clip_model("--clip-model", args.clip_model)
        except (FileNotFoundError, NotADirectoryError, ValueError, ImportError) as e:
            parser.error(str(e))
        options["model"] = args.clip_model
    elif args.clip_model:
        parser.error("--clip-model goes with --source clip")
    if args.cache:
        records = plan_records(args.split, args.per_tag, args.seeds_per_prompt, seed=args.seed)
        generate_cache(args.cache, args.backbone, records, batch=args.batch, steps=args.steps, quiet=args.quiet)
        report = run_cached(args.cache, source, source_options=options, resamples=args.resamples, seed=args.seed,
                            checks=args.render_checks, split=args.split, stability=args.evaluator_stability)
    else:
        report = run(args.backbone, args.n, args.seed, args.batch, args.steps, args.quiet, source, options,
                     args.resamples)
    print(to_markdown(report))
    if args.out:
        _io.atomic_write_json(args.out, report, owner="reward_agreement --out", indent=1)
    return 0


if __name__ == "__main__":
    from xlard._signals import run_script

    raise SystemExit(run_script("reward_agreement.py", main,
                                " (with --cache, rerun with the same --cache to reuse the samples made)"))
