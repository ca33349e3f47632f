"""Validate a shapes corrector on *training-split* prompts, at several step sizes.

The held-out split is for the final measurement only (``xlard eval``); choices
between runs or recipes are made here, on training-split (prompt, seed) items
with image seeds the trainer never draws (``--seed-base``, default 100; the
trainer's seeds per prompt start at 0, its monitor and calibration seeds at
1,000,003 and 2,000,003). For each multiplier ``m`` of ``--multipliers`` the
corrector's mean correction is applied as ``z0 + m * alpha * Delta`` (``alpha``:
the corrector folder's exported step size; ``m = 0`` is the uncorrected image,
always included), the images are decoded and scored two ways:

- the run's *training* reward (the corrector's reward source with the options
  its metadata records, uniform weights over the prompt's aspects): what the
  trainer optimised;
- the exact evaluator's verdicts, per GenEval tag, as a metric only (fixed and
  broken items against the uncorrected images).

Items: ``--per-tag`` (prompt, seed) items per tag of the training split,
balanced as the trainer's ``data.balance: tag`` does (``balanced_pairs``).
``--prompts`` picks which training-split prompts: ``all`` (default),
``left-out`` (the prompts a run trained with ``data.leave_out`` never saw,
read from the corrector folder: how the recipe carries to new prompts, as
the held-out split's are new) or ``fitted`` (the others).

    python scripts/validate_corrector.py --corrector runs/shapes_shipped/corrector \\
        --per-tag 64 --multipliers 0.5,1,2 --out validation.json

Prints one line per multiplier and writes the same as JSON with ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from xlard import _io

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
PROMPT_SETS = ("all", "left-out", "fitted")


def _multipliers(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.5,1,2, got {text!r}") from None
    if not values or any(not math.isfinite(v) or not 0 <= v <= 100 for v in values):
        # 1e300 was accepted and failed after the work as NaN latents, unnamed
        raise argparse.ArgumentTypeError(f"expected numbers in [0, 100], got {text!r}")
    return sorted(set(values) | {0.0})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--corrector", help="a corrector folder (xlard train's OUT/corrector)")
    which.add_argument("--correct", action="store_true", help="the corrector shipped for the shapes backbone")
    parser.add_argument("--per-tag", type=int, default=64, help="items per GenEval tag (default 64)")
    parser.add_argument("--prompts", choices=PROMPT_SETS, default="all",
                        help="training-split prompts to validate on: all (default), left-out (those a run with "
                             "data.leave_out never saw) or fitted (the others)")
    parser.add_argument("--multipliers", type=_multipliers, default=[0.0, 1.0],
                        help="step-size multipliers of the exported alpha (0 is always added; default 1)")
    parser.add_argument("--seed-base", type=int, default=100,
                        help="image seed of an item = seed-base + its seed index (default 100)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", help="write the results here (JSON)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not 1 <= args.per_tag <= 100_000 or not 1 <= args.batch <= 4096:  # 10**9 per tag ran out of memory
        parser.error(f"--per-tag must be in [1, 100000] and --batch in [1, 4096], got {args.per_tag}, {args.batch}")
    if args.corrector is not None and Path(args.corrector).is_file():
        parser.error(f"--corrector: {args.corrector} is a file; give a corrector folder (xlard train's OUT/corrector)")
    if args.seed_base < 0 or args.seed_base >= 1_000_000:
        parser.error(f"--seed-base must be in 0..999999 (the trainer's monitor seeds start at 1,000,003), "
                     f"got {args.seed_base}")
    from xlard import _io

    problem = _io.unwritable_output(files={"--out": args.out})  # now, not after the validation ran
    if problem:
        parser.error(problem)
    return args


def training_reward_settings(meta) -> dict:
    """The ``reward`` section of the run that trained the corrector, from its metadata.

    Correctors exported since 2026-12-03 record ``reward_options`` and
    ``reward_bind_color``; for older ones the source's current defaults are used
    (``"recorded": False`` says so, and the printout too). The shapes source's
    count reward became the weighed count (``soft_count``) on 2026-12-06:
    options recorded before then that do not say ``soft_count`` get the count
    of that time (``soft_count: false``, ``count_confidence: true`` unless they
    say otherwise); correctors exported since record both. The clip source's reading
    changed on 2026-12-07 in a way no option restores: such a corrector gets a ``note``.
    """
    from xlard.sources import clip_reading_predates

    training = meta.training
    reward = {"source": training.get("reward_source") or "auto"}
    recorded = "reward_options" in training
    if recorded:
        options = training["reward_options"]
        if not isinstance(options, dict):
            raise ValueError(f"--corrector: training.reward_options in the corrector's metadata must be a mapping, "
                             f"got {options!r}")
        reward["options"] = dict(options)
        if reward["source"] in ("shapes", "auto") and "soft_count" not in options:  # exported before the weighed
            reward["options"].update(soft_count=False,                               # count: the reward of then
                                     count_confidence=options.get("count_confidence", True))
        if training.get("reward_bind_color") is not None:
            reward["bind_color"] = training["reward_bind_color"]
        if reward["source"] == "clip" and clip_reading_predates(options):
            reward["note"] = ("recorded before 2026-12-07: the clip source then cut each map relative to its own "
                              "peak and looked for colors anywhere in the image; no option gives that reading back, "
                              "so the training reward below is today's")
    return {**reward, "recorded": recorded}


def _record_key(record: dict) -> tuple:
    return (record.get("tag", ""), record.get("prompt", ""), json.dumps(record.get("include", []), sort_keys=True))


def select_records(records: list[dict], meta, which: str) -> list[dict]:
    """The training-split records to validate on: ``all``, ``left-out`` or ``fitted`` (see ``--prompts``).

    Raises:
        ValueError: ``left-out``/``fitted`` for a corrector trained without
            ``data.leave_out``, an unknown choice, or left-out records that are
            not training-split records.
    """
    if which not in PROMPT_SETS:
        raise ValueError(f"--prompts must be one of {', '.join(PROMPT_SETS)}, got {which!r}")
    if which == "all":
        return list(records)
    left = meta.training.get("left_out_records")
    if not left:
        raise ValueError(f"--prompts {which}: this corrector was trained on every training-split prompt (its "
                         "metadata has no training.left_out_records); train with data.leave_out > 0 to validate "
                         "on prompts it never saw")
    if not isinstance(left, list) or not all(isinstance(r, dict) for r in left):
        raise ValueError(f"--prompts {which}: training.left_out_records in the corrector's metadata must be a list "
                         f"of GenEval records, got {type(left).__name__}")
    keys = {_record_key(r) for r in left}
    known = {_record_key(r) for r in records}
    if not keys <= known:
        raise ValueError(f"--prompts {which}: {len(keys - known)} of the corrector's left-out records are not "
                         "shapes training-split records")
    return [r for r in records if (_record_key(r) in keys) == (which == "left-out")]


def validate(corrector, meta, per_tag: int, multipliers: list[float], seed_base: int = 100, batch: int = 16,
             progress: bool = True, prompts: str = "all") -> dict:
    """The validation table: ``{"items", "delta_rms", "rows": [{multiplier, joint, overall, tags, fixed, broken}]}``."""
    from xlard.evaluation import paired_table
    from xlard.models import aspect_weights
    from xlard.shapes import evaluator as E
    from xlard.train import config_from_dict, ppo
    from xlard.train.data import Item, balanced_pairs, load_records
    from xlard.train.rewarding import build_reward_fn
    from xlard.train.rollout import encode_items, prompt_inputs
    from xlard.train.trainer import load_backbone

    if meta.backbone != "shapes":
        raise ValueError(f"--corrector: validation needs the shapes backbone's exact evaluator; this corrector was "
                         f"trained on {meta.backbone!r}")
    reward = training_reward_settings(meta)
    cfg = config_from_dict({
        "backbone": {"name": "shapes", "correction_step": meta.correction_step,
                     "num_inference_steps": meta.num_inference_steps, "guidance_scale": meta.guidance_scale,
                     "device": "cpu"},
        "reward": {k: v for k, v in reward.items() if k not in ("recorded", "note")}})
    backbone = load_backbone(cfg.backbone, torch.device("cpu"), cfg.reward)
    reward_fn = build_reward_fn(cfg.reward, backbone)
    records, _ = load_records("shapes:train")
    records = select_records(records, meta, prompts)
    pairs = balanced_pairs(records, per_tag, 1)
    items = [Item(records[r], seed_base + s, r) for r, s in pairs]
    tags = [records[r].get("tag", "") for r, _ in pairs]
    joint = {m: [] for m in multipliers}
    correct = {m: [] for m in multipliers}
    rms = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(items), desc="validate", unit="item", file=sys.stderr)
    try:  # the bar is closed on Ctrl-C too: the interrupt line is then the last line
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            state = encode_items(backbone, chunk)
            # The corrector's own inputs: the backbone's text embedding, or the parsed-field tokens of a
            # ``conditioning: fields`` corrector (as the trainer, xlard eval and generate give them).
            inputs = prompt_inputs(state, "cpu", corrector=corrector)
            with torch.no_grad():  # the inference path (actions, as xlard eval; under the corrector's autocast)
                delta, _ = corrector.actions(inputs.z0, *inputs.for_corrector())
            rms.append(float(delta.float().square().mean().sqrt()))
            for m in multipliers:
                decoded = backbone.decode(state, state.z0 + m * meta.alpha * delta)
                result = reward_fn(decoded)
                weights = aspect_weights(torch.zeros(result.present.shape), result.present)
                joint[m].append(ppo.weighted_reward(torch.nan_to_num(result.scores.float()), weights))
                verdicts = E.evaluate(decoded.images, [it.record for it in chunk])
                correct[m].append(torch.tensor([float(v.correct) for v in verdicts]))
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    base = torch.cat(correct[0.0])
    prompts_of = [r for r, _ in pairs]
    rows = []
    for m in multipliers:
        c = torch.cat(correct[m])
        per_tag_score = {t: float(c[torch.tensor([x == t for x in tags])].mean()) for t in TAGS if t in tags}
        # The paired gain over the uncorrected images (mean of the tags), its 95% bootstrap interval
        # resampling whole prompts: how sure the gain is across prompts, not only across seeds.
        table = paired_table(tags, base.tolist(), c.tolist(), clusters=prompts_of)
        rows.append({"multiplier": m, "alpha": m * meta.alpha, "joint": float(torch.cat(joint[m]).mean()),
                     "overall": sum(per_tag_score.values()) / len(per_tag_score), "tags": per_tag_score,
                     "gain": table["overall"].diff, "gain_ci": [table["overall"].ci_low, table["overall"].ci_high],
                     # a tag of one prompt has no interval; the overall one is conditional on it (paired_table)
                     "one_prompt_tags": [t for t, d in table.items() if t != "overall" and d.records < 2],
                     "fixed": int(((c > 0) & (base == 0)).sum()), "broken": int(((c == 0) & (base > 0)).sum())})
    return {"items": len(items), "per_tag": per_tag, "seed_base": seed_base, "prompts": prompts,
            "prompt_count": len(records), "delta_rms": sum(rms) / len(rms),
            "corrector_alpha": meta.alpha, "reward": reward, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    # Scoped, not torch.set_grad_enabled(False): main() called in-process (the tests) must not leave
    # gradients off for its caller.
    with torch.no_grad():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    from xlard.evaluation import interval_text, load_corrector_dir

    if args.correct:
        from xlard.evaluation import shipped_corrector_path
        path = shipped_corrector_path()
    else:
        path = args.corrector
    try:
        corrector, meta = load_corrector_dir(path)
        report = validate(corrector, meta, args.per_tag, args.multipliers, args.seed_base, args.batch,
                          progress=not args.quiet, prompts=args.prompts)
    except (FileNotFoundError, ValueError) as err:
        print(f"validate_corrector: error: {err}", file=sys.stderr)
        return 2
    report["corrector"] = str(path)
    print(f"{report['items']} training-split items ({args.prompts} prompts: {report['prompt_count']}), seeds from "
          f"{args.seed_base}; mean correction RMS "
          f"{report['delta_rms']:.4f}; exported alpha {meta.alpha:g}")
    reward = report["reward"]
    print(f"training reward: source {reward['source']}, options "
          + (json.dumps(reward.get("options", {})) if reward["recorded"]
             else "not recorded in the corrector's metadata (the source's current defaults)")
          + (f" ({reward['note']})" if reward.get("note") else ""))
    for row in report["rows"]:
        print(f"x{row['multiplier']:g}: training reward {row['joint']:.4f}  evaluator (mean of tags) "
              f"{row['overall']:.4f}  gain {100 * row['gain']:+.1f} points {interval_text(*row['gain_ci'])}  "
              f"fixed {row['fixed']} broken {row['broken']} | "
              + " ".join(f"{t} {v:.3f}" for t, v in row["tags"].items())
              + (f" ({', '.join(row['one_prompt_tags'])} rest(s) on one prompt: no interval of its own, and the "
                 "overall one takes no spread from it)" if row["one_prompt_tags"] else ""))
    if args.out:
        _io.atomic_write_text(Path(args.out), _io.dumps(report, indent=2) + "\n", owner="validate_corrector")
    return 0


if __name__ == "__main__":
    from xlard._signals import run_script

    raise SystemExit(run_script("validate_corrector.py", main,
                                " (it keeps no partial results: rerun the same command to start over)"))
