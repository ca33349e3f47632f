"""The ``xlard`` command line.

    xlard info                                   versions, build, providers
    xlard prompts --split heldout -n 500 OUT     a shapes-world prompt set (GenEval JSONL)
    xlard render --prompts FILE OUT              ground-truth renders in GenEval's folder layout
    xlard eval --prompts FILE --images DIR       the exact evaluator's table on images
    xlard eval --folder DIR                      ... on a GenEval output folder
    xlard generate --backbone shapes "three red circles left of a blue square"
    xlard eval --backbone shapes --prompts FILE  generate one image per record, then the table
    xlard eval --prompts FILE --corrector DIR --seeds 0,1   base vs corrected, paired, with intervals
    xlard generate --backbone shapes --correct "..."        with the shipped corrector (+ base, LAM)

``--backbone`` takes ``shapes`` (the embedded shapes-world model shipped in
``xlard/data/shapes_backbone``), a local diffusers pipeline folder, or a hub
model id (real weights are loaded the same way as the tiny ones).

Every command works offline on a CPU and shows progress on long work.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _progress(iterable, total: int, desc: str, quiet: bool, unit: str = "img"):
    if quiet:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: progress then goes to stderr as counts
        def plain():
            for i, item in enumerate(iterable, 1):
                if i == total or i % max(1, total // 10) == 0:
                    print(f"{desc}: {i}/{total} {unit}", file=sys.stderr)
                yield item

        return plain()
    return tqdm(iterable, total=total, desc=desc, unit=unit)


def resolve_backbone(name: str) -> str:
    """``shapes`` -> the shapes-world pipeline folder (package data or $XLARD_SHAPES_BACKBONE); else as given."""
    if name == "shapes":
        from xlard.shapes import backbone as shapes_backbone

        folder = shapes_backbone.backbone_path()
        if not (folder / "model_index.json").is_file():
            raise FileNotFoundError(f"the shapes backbone is not installed at {folder}; train it with "
                                    "`python scripts/train_shapes_backbone.py` or reinstall xlard")
        return str(folder)
    return name


def _load_backbone(args):
    import torch

    from xlard.backbones import DiffusersBackbone

    # Weights may ship in float16 (the shapes backbone does, to stay small); CPUs run float32.
    on_cpu = args.device in (None, "cpu")
    kwargs = {"capture": False, "torch_dtype": torch.float32 if on_cpu else None}
    steps, guidance = args.steps, args.guidance
    if args.backbone == "shapes":  # the sampler settings the shipped model was evaluated with
        from xlard.shapes import backbone as shapes_backbone

        steps = steps or shapes_backbone.DEFAULT_STEPS
        guidance = shapes_backbone.DEFAULT_GUIDANCE if guidance is None else guidance
    if steps:
        kwargs["num_inference_steps"] = steps
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    return DiffusersBackbone.from_pretrained(resolve_backbone(args.backbone), device=args.device, **kwargs)


def _to_uint8(images):
    """[B, 3, H, W] float in [0, 1] -> list of uint8 HxWx3 arrays."""
    import torch

    return [(img.clamp(0, 1) * 255).round().to("cpu", dtype=torch.uint8).permute(1, 2, 0).numpy() for img in images]


def _generate_batches(backbone, prompts: list[str], seeds: list[int], batch: int, quiet: bool):
    """Yield (start, uint8 images) for consecutive batches, with progress."""
    starts = list(range(0, len(prompts), batch))
    for start in _progress(starts, len(starts), "generate", quiet, unit="batch"):
        out = backbone.generate(prompts[start:start + batch], seed=seeds[start:start + batch])
        yield start, _to_uint8(out.images)


def _write_png(path: Path, image) -> None:
    """Write a uint8 HxWx3 array as a PNG, atomically (Pillow, through xlard.explain)."""
    import torch

    from xlard.explain import save_png

    save_png(path, torch.from_numpy(image).permute(2, 0, 1))


def _cmd_generate(args) -> int:
    if args.corrector or args.correct:
        from xlard import evaluation

        return evaluation.run_generate_cli(args)

    backbone = _load_backbone(args)
    prompts = [p for p in args.prompt for _ in range(args.per_prompt)]
    seeds = [args.seed + i for i in range(len(prompts))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for start, images in _generate_batches(backbone, prompts, seeds, args.batch, args.quiet):
        for k, image in enumerate(images):
            i = start + k
            path = out / f"{i:04d}_seed{seeds[i]}.png"
            _write_png(path, image)
            written.append(path)
    print(f"wrote {len(written)} images to {out}")
    return 0


def _cmd_info(args) -> int:
    from xlard import info

    return info.main(["--json"] if args.json else [])


def _cmd_prompts(args) -> int:
    from xlard.shapes import prompts as P

    splits = P.make_splits(P.PromptConfig(), seed=args.seed)
    pool = splits[args.split]
    records = P.sample_records(pool, args.n, seed=args.seed) if args.n else list(pool)
    P.write_jsonl(args.out, records)
    print(f"wrote {len(records)} {args.split} records to {args.out}")
    return 0


def _write_geneval_folder(out: Path, index: int, record: dict, images) -> None:
    """One prompt folder of GenEval's layout: <out>/<index>/metadata.jsonl + samples/*.png."""
    from xlard.shapes import prompts as P

    folder = out / f"{index:05d}"
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    P.write_jsonl(folder / "metadata.jsonl", [record])
    for k, image in enumerate(images):
        _write_png(folder / "samples" / f"{k:04d}.png", image)


def _cmd_render(args) -> int:
    from xlard.shapes import prompts as P

    records = P.read_records(args.prompts)
    out = Path(args.out)
    for i, record in enumerate(_progress(records, len(records), "render", args.quiet, unit="prompt")):
        images = [P.render_record(record, seed=args.seed + 1000 * i + k).render() for k in range(args.per_prompt)]
        _write_geneval_folder(out, i, record, images)
    print(f"wrote {len(records)} prompt folders to {out}")
    return 0


def _cmd_eval(args) -> int:
    from xlard.shapes import evaluator as E
    from xlard.shapes import prompts as P

    if args.corrector or args.correct:
        from xlard import evaluation

        return evaluation.run_eval_cli(args)

    if args.folder:
        results = E.evaluate_folder(args.folder)
    elif args.backbone:
        if not args.prompts:
            raise SystemExit("xlard eval: --backbone needs --prompts FILE")
        records = P.read_records(args.prompts)
        out = Path(args.out or "xlard-eval")
        backbone = _load_backbone(args)
        prompts = [r["prompt"] for r in records]
        seeds = [args.seed + i for i in range(len(records))]
        for start, images in _generate_batches(backbone, prompts, seeds, args.batch, args.quiet):
            for k, image in enumerate(images):
                _write_geneval_folder(out, start + k, records[start + k], [image])
        results = E.evaluate_folder(out)
        print(f"images and per-prompt metadata in {out}")
    else:
        if not (args.prompts and args.images):
            raise SystemExit("xlard eval: give --folder DIR, or both --prompts FILE and --images DIR")
        records = P.read_records(args.prompts)
        images = sorted(Path(args.images).glob("*.png"))
        if len(images) != len(records):
            raise SystemExit(f"xlard eval: {args.images} holds {len(images)} PNG files for {len(records)} records "
                             "(one image per record, in sorted file-name order)")
        results = []
        for path, record in _progress(list(zip(images, records)), len(records), "eval", args.quiet):
            results.append(E.evaluate_record(str(path), record))
    summary = E.summarize(results, print_table=True)
    if args.results:
        E.write_results_jsonl(args.results, results)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xlard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, build and providers")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("prompts", help="write a shapes-world prompt set (GenEval JSONL)")
    p.add_argument("out")
    p.add_argument("--split", choices=("train", "heldout"), default="heldout")
    p.add_argument("-n", type=int, default=0, help="sample this many records balanced over tags (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_prompts)

    p = sub.add_parser("render", help="ground-truth renders of a prompt set, in GenEval's folder layout")
    p.add_argument("out")
    p.add_argument("--prompts", required=True)
    p.add_argument("--per-prompt", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_render)

    def backbone_options(p, required: bool):
        p.add_argument("--backbone", required=required,
                       help="'shapes', a diffusers pipeline folder, or a hub model id")
        p.add_argument("--steps", type=int, default=0, help="denoising steps (0: the pipeline's default)")
        p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
        p.add_argument("--batch", type=int, default=8, help="prompts per forward pass")
        p.add_argument("--device", default=None, help="e.g. cuda; default: CPU")
        p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
        p.add_argument("--corrector", help="a corrector folder (see docs/evaluation.md): base vs corrected")
        p.add_argument("--correct", action="store_true", help="use the corrector shipped for --backbone")

    p = sub.add_parser("generate", help="generate images with a backbone (with a corrector: corrected, base, LAM)")
    p.add_argument("prompt", nargs="+")
    p.add_argument("--out", default="xlard-images")
    p.add_argument("--per-prompt", type=int, default=1)
    p.add_argument("--quiet", action="store_true")
    backbone_options(p, required=True)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("eval", help="score images with the exact shapes-world evaluator")
    p.add_argument("--folder", help="a GenEval output folder (<index>/metadata.jsonl + samples/*.png)")
    p.add_argument("--prompts", help="GenEval JSONL records (with --images)")
    p.add_argument("--images", help="a folder of PNGs, one per record in sorted order (with --prompts)")
    p.add_argument("--results", help="write per-image results (JSONL) here")
    p.add_argument("--json", help="write the summary table (JSON) here")
    p.add_argument("--out", help="with --backbone: where generated images go (GenEval layout; default xlard-eval)")
    p.add_argument("--quiet", action="store_true")
    backbone_options(p, required=False)
    p.add_argument("--seeds", help="with a corrector: evaluation seeds, e.g. 0,1 (record i, seed s: generator "
                                   "seed s*1000000+i); default --seed")
    p.add_argument("--mask-fraction", type=float, default=0.2, help="LAM faithfulness: share of cells masked")
    p.add_argument("--no-faithfulness", action="store_true", help="skip the LAM faithfulness check")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the intervals")
    p.add_argument("--save-images", action="store_true", help="with a corrector: keep base/corrected images")
    p.add_argument("--markdown", help="with a corrector: also write the markdown table here")
    p.set_defaults(func=_cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"xlard {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
