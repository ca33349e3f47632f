#!/usr/bin/env python
"""Score the shapes backbone on the held-out split with the exact evaluator.

Draws ``--n`` records from the HELD-OUT split (balanced over the six tags,
seeded), generates one image per record with the shipped pipeline (image ``i``
seeded ``--seed + i``), judges them with :func:`xlard.shapes.evaluate` and
prints the per-tag table and the overall score (mean of the tag scores).
With ``--out-dir`` it also writes ``eval_heldout.json`` (summary, settings,
machine, timing), ``eval_heldout.md`` (the table), ``results.jsonl``
(per-image verdicts with reasons) and, with ``--save-images``, the PNGs
(``images/0000.png``, ...), each file atomically. A folder that already holds
these outputs is refused before anything loads unless ``--overwrite``, which
replaces them and removes the images an earlier run recorded in its
``eval_heldout.json`` that this run does not write again; no other file in the
folder is touched.

Example (the record shipped beside the backbone; ``--overwrite`` replaces it):
    python scripts/eval_shapes_backbone.py --n 504 --out-dir xlard/data/shapes_backbone --overwrite
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=".*torchvision.*")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    from xlard.shapes.backbone import DEFAULT_GUIDANCE, DEFAULT_STEPS

    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=504, help="images (records drawn balanced over tags)")
    p.add_argument("--record-seed", type=int, default=2024, help="seed of the record draw")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="denoising steps")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help="classifier-free guidance scale")
    p.add_argument("--batch-size", type=int, default=42, help="images per forward pass")
    p.add_argument("--path", default=argparse.SUPPRESS,
                   help="pipeline folder (default: the installed shapes backbone, package data)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out-dir", default=None, help="where to write the JSON/markdown/JSONL reports")
    p.add_argument("--save-images", action="store_true",
                   help="also write the images as PNGs into --out-dir/images (0000.png, ...)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs an earlier run wrote into --out-dir (refused without it); the images "
                        "its eval_heldout.json records that this run does not write again are removed, nothing "
                        "else there is touched")
    args = p.parse_args(argv)
    args.path = getattr(args, "path", None)  # SUPPRESS above: "(default: None)" read beside the help
    # upper bounds as the command line's: 10**8 steps ran out of memory, 100000 threads crashed, 10**8 images
    # ran silently for minutes before failing
    for flag, value, high in (("--n", args.n, 100_000), ("--steps", args.steps, 10_000),
                              ("--batch-size", args.batch_size, 4096), ("--threads", args.threads, 1024)):
        if not 1 <= value <= high:
            p.error(f"{flag} must be in [1, {high}], got {value}")
    if not (math.isfinite(args.guidance) and 0 <= args.guidance <= 1000):  # 1e308 made black images, scored
        p.error(f"--guidance must be a number in [0, 1000], got {args.guidance}")
    if args.seed < 0 or args.record_seed < 0:
        p.error(f"--seed and --record-seed must be >= 0, got {args.seed}, {args.record_seed}")
    if args.seed + args.n - 1 >= 2 ** 64:  # was refused as "seed" after the pipeline had loaded
        p.error(f"--seed: image i is generated with seed --seed + i, which must be below 2**64: with --n {args.n}, "
                f"--seed must be at most {2 ** 64 - args.n}, got {args.seed}")
    from xlard.shapes import backbone as shapes_backbone

    if args.path is not None and not shapes_backbone.is_available(args.path):
        p.error(f"--path: {shapes_backbone.not_installed(args.path)}")
    if args.save_images and not args.out_dir:
        p.error("--save-images needs --out-dir")
    if args.overwrite and not args.out_dir:
        p.error("--overwrite needs --out-dir")
    from xlard import _io

    problem = _io.unwritable_output(folders={"--out-dir": args.out_dir})  # now, not after generating
    if problem:
        p.error(problem)
    if args.out_dir:  # a user's results.jsonl or images were replaced without a word, after minutes of work
        try:
            earlier = earlier_outputs(Path(args.out_dir), args.n if args.save_images else 0)
        except (OSError, ValueError) as e:  # a folder or a FIFO named like an output
            p.error(str(e))
        if earlier and not args.overwrite:
            shown = ", ".join(str(f.relative_to(args.out_dir)) for f in earlier[:4])
            more = f" and {len(earlier) - 4} more" if len(earlier) > 4 else ""
            p.error(f"--out-dir: {args.out_dir} already holds outputs of an earlier run ({shown}{more}); add "
                    "--overwrite to replace them, or choose another folder")
    return args


REPORTS = ("eval_heldout.json", "eval_heldout.md", "results.jsonl")
IMAGE_NAME = re.compile(r"[0-9]{4,}\.png")


def earlier_outputs(out: Path, images: int) -> list[Path]:
    """The files in ``out`` this script would write again: its reports and, for ``images`` images, ``images/0000.png``
    up to ``images/<images - 1>.png``. An entry of such a name that is no regular file is refused (OSError or
    ValueError, naming --out-dir)."""
    from xlard import _io

    named = [out / name for name in REPORTS]
    img_dir = out / "images"
    if images and os.path.lexists(img_dir):
        if not img_dir.is_dir():
            raise ValueError(f"--out-dir: {img_dir} exists and is not a folder; --save-images writes the images "
                             "there: move it or choose another folder")
        named += [img_dir / name for name in sorted(os.listdir(img_dir))
                  if IMAGE_NAME.fullmatch(name) and int(name[:-4]) < images
                  and name == f"{int(name[:-4]):04d}.png"]  # 00001.png is no name this script writes
    found = []
    for path in named:
        if os.path.lexists(path):
            _io.check_output_path(path, "--out-dir")  # a folder or a FIFO of that name: refused now, not at the end
            found.append(path)
    return found


def recorded_images(out: Path) -> int:
    """How many images (``images/0000.png`` on) the earlier run in ``out`` wrote, as its eval_heldout.json says
    (0 without a readable record: nothing is taken for its output)."""
    from xlard import _io

    try:
        report = _io.read_json(out / "eval_heldout.json", owner="eval_shapes_backbone")
    except (OSError, ValueError):
        return 0
    count = report.get("saved_images") if isinstance(report, dict) else None
    return count if isinstance(count, int) and not isinstance(count, bool) and 0 <= count <= 100_000 else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch

    from xlard import _io
    from xlard.shapes import PromptConfig, evaluate, make_splits, sample_records, summarize, write_results_jsonl
    from xlard.shapes.backbone import backbone_path, generate, load_pipeline
    from xlard.shapes.evaluator import format_table
    from xlard.shapes.prompts import SPLIT_SEED

    torch.set_num_threads(args.threads)
    records = sample_records(make_splits(PromptConfig(), seed=SPLIT_SEED)["heldout"], args.n, seed=args.record_seed)
    pipe = load_pipeline("cpu", args.path)
    t0 = time.time()
    images = generate([r["prompt"] for r in records], seed=args.seed, steps=args.steps, guidance=args.guidance,
                      pipeline=pipe, batch_size=args.batch_size, progress=True)
    gen_seconds = time.time() - t0
    results = evaluate(list(images), records)
    summary = summarize(results)
    table = format_table(summary)
    print(table)
    print(f"{len(records)} held-out images, {args.steps} steps, guidance {args.guidance}, "
          f"generation {gen_seconds:.0f}s on {torch.get_num_threads()} CPU threads")
    if args.out_dir:
        owner = "eval_shapes_backbone --out-dir"
        out = _io.make_folder(args.out_dir, owner)
        info = json.loads((backbone_path(args.path) / "training_info.json").read_text()) \
            if (backbone_path(args.path) / "training_info.json").is_file() else {}
        saved = len(images) if args.save_images else 0
        report = {
            "summary": summary,
            "settings": {k: v for k, v in vars(args).items() if k not in ("out_dir", "save_images", "overwrite")},
            "saved_images": saved,  # images/0000.png on: what a later --overwrite may remove
            "split": "heldout", "split_seed": SPLIT_SEED,
            "generation_seconds": round(gen_seconds, 1),
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "torch": torch.__version__},
            "training": {k: info.get(k) for k in ("train_minutes", "vae_minutes", "unet_steps", "vae_steps",
                                                  "vae_check")},
        }
        md = ["# Shapes backbone on the held-out split (exact evaluator)", "",
              f"{len(records)} images, {args.steps} DPM-Solver steps, guidance {args.guidance}, "
              f"image seeds {args.seed}..{args.seed + len(records) - 1}, record seed {args.record_seed}.", "",
              "| task | correct | total | score |", "|---|---:|---:|---:|"]
        for tag, v in summary["tasks"].items():
            md.append(f"| {tag} | {v['correct']} | {v['total']} | {v['score']:.3f} |")
        md.append(f"| **overall** (mean of tasks) | {summary['correct']} | {summary['total']} | "
                  f"**{summary['overall']:.3f}** |")
        img_dir = out / "images"
        before = recorded_images(out) if args.overwrite else 0
        if args.save_images:
            from PIL import Image

            _io.make_folder(img_dir, owner)
            for i, img in enumerate(images):
                with _io.atomic_path(img_dir / f"{i:04d}.png", owner=owner) as tmp:
                    Image.fromarray(np.asarray(img)).save(tmp, format="PNG")
        for i in range(saved, before):  # --overwrite: the earlier run's images this run did not write again
            stale = img_dir / f"{i:04d}.png"
            if stale.is_file() or stale.is_symlink():
                stale.unlink()
        write_results_jsonl(out / "results.jsonl", results)
        _io.atomic_write_text(out / "eval_heldout.md", "\n".join(md) + "\n", owner=owner)
        _io.atomic_write_json(out / "eval_heldout.json", report, owner=owner)  # last: the record of the rest
        print(f"wrote {out / 'eval_heldout.json'}, {out / 'eval_heldout.md'}, {out / 'results.jsonl'}"
              + (f" and {saved} images in {img_dir}" if saved else ""))
    return 0


if __name__ == "__main__":
    from xlard._signals import run_script

    raise SystemExit(run_script("eval_shapes_backbone.py", main,
                                " (it keeps no partial results: rerun the same command to start over)"))
