"""How far the editor's latent edits take the shapes backbone: the ceiling of the ``distill`` warm start.

For *training-split* (prompt, seed) items (image seeds from ``--seed-base``, as
``scripts/validate_corrector.py`` draws them) the backbone samples z0 (the latent at
``--correction-step``, default 1.0: the final one), the understanding model reads the decoded image,
:mod:`xlard.shapes.editor` redraws it, and three images are judged by the exact
evaluator (as a metric only; the editor never sees it):

- ``base``: the decoded z0;
- ``latent``: ``z0 + target`` decoded, where ``target = s * M * (E(edited) - E(decoded))``
  is exactly what the corrector is regressed onto (``s`` is
  :func:`xlard.train.distill.signal_scale`: 1 at correction_step 1.0, ``sqrt(abar_t)``
  earlier, where the remaining denoising carries the change);
- ``image``: the edited image itself (what the edit would give if the VAE carried it perfectly);
- ``moved`` (with ``--latent-move``): z0 with the relation fixes carried out by moving the objects'
  latent cells (:func:`xlard.shapes.editor.move_latents`) instead of redrawing pixels.

A corrector distilled from these targets can at best reach the ``latent`` row.

    python scripts/measure_edit_ceiling.py --per-tag 16
    python scripts/measure_edit_ceiling.py --per-tag 16 --no-redraw --no-count --out ceiling.json
    python scripts/measure_edit_ceiling.py --per-tag 16 --correction-step 0.3
    python scripts/measure_edit_ceiling.py --per-tag 16 --replace --relayout --relayout-color blue
    python scripts/measure_edit_ceiling.py --per-tag 64 --latent-move
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    p.add_argument("--per-tag", type=int, default=16, help="items per GenEval tag (default 16)")
    p.add_argument("--seed-base", type=int, default=100, help="image seed = seed-base + seed index (default 100)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--correction-step", type=float, default=1.0,
                   help="where the latent is edited, in (0, 1] (default 1.0: the final latent)")
    for name in ("redraw", "count", "color", "position"):
        p.add_argument(f"--no-{name}", action="store_true", help=f"turn the editor's {name} fix off")
    p.add_argument("--relayout", action="store_true",
                   help="counting and position prompts redrawn at fixed places (EditConfig.relayout)")
    p.add_argument("--relayout-color", default="found", help="'found' or a palette color (EditConfig.relayout_color)")
    p.add_argument("--margin", type=int, default=6, help="a relation holding by fewer pixels is moved (default 6)")
    p.add_argument("--replace", action="store_true",
                   help="targets set the touched cells to the edited image's encoding (correction_step 1.0 only)")
    p.add_argument("--latent-move", action="store_true",
                   help="add a 'moved' row: relations fixed by moving latent cells (correction_step 1.0 only)")
    p.add_argument("--out", help="write the table here (JSON)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not 1 <= args.per_tag <= 100_000 or not 1 <= args.batch <= 4096:
        p.error(f"--per-tag must be in [1, 100000] and --batch in [1, 4096], got {args.per_tag}, {args.batch}")
    if not 0 <= args.seed_base < 2**63:  # found after the models loaded, as an unnamed generator-seed error
        p.error(f"--seed-base must be in [0, 2**63), got {args.seed_base}")
    if not 0.0 < args.correction_step <= 1.0:
        p.error(f"--correction-step must be in (0, 1], got {args.correction_step}")
    if args.replace and args.correction_step != 1.0:
        p.error(f"--replace needs --correction-step 1.0 (z0 must be the latent the VAE decodes), got "
                f"{args.correction_step}")
    if args.latent_move and args.correction_step != 1.0:
        p.error(f"--latent-move needs --correction-step 1.0 (it moves the latent the VAE decodes), got "
                f"{args.correction_step}")
    if args.margin < 1:
        p.error(f"--margin must be >= 1, got {args.margin}")
    from xlard import _io

    problem = _io.unwritable_output(files={"--out": args.out})  # now, not after the measurement
    if problem:
        p.error(problem)
    return args


def measure(per_tag: int, edit_config, seed_base: int = 100, batch: int = 32, progress: bool = True,
            correction_step: float = 1.0, replace: bool = False, latent_move: bool = False) -> dict:
    """``{"items", "rows": {"base"|"latent"|"image"[|"moved"]: {"overall", "tags"}}, "edited"}``.

    On training-split items; ``moved`` only with ``latent_move``.
    """
    from xlard.shapes import evaluator as E
    from xlard.shapes.editor import changed_something, edit_images, edit_targets, move_latents
    from xlard.shapes.understanding import load_model
    from xlard.train import config_from_dict
    from xlard.train.data import Item, balanced_pairs, load_records
    from xlard.train.distill import signal_scale, vae_encoder
    from xlard.train.rollout import encode_items
    from xlard.train.trainer import load_backbone

    cfg = config_from_dict({"backbone": {"name": "shapes", "correction_step": correction_step, "device": "cpu"}})
    backbone = load_backbone(cfg.backbone, torch.device("cpu"), cfg.reward)
    model, encode = load_model(), vae_encoder(backbone)
    records, _ = load_records("shapes:train")
    pairs = balanced_pairs(records, per_tag, 1)
    items = [Item(records[r], seed_base + s, r) for r, s in pairs]
    verdicts = {"base": [], "latent": [], "image": []}
    if latent_move:
        verdicts["moved"] = []
    edited_count = 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(items), desc="edit ceiling", unit="item", file=sys.stderr)
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        state = encode_items(backbone, chunk)
        z0 = state.z0.float()
        with torch.no_grad():
            images = backbone.decode(state, z0).images.float()
            edited = edit_images(model, images, state.specs, edit_config)
            target = signal_scale(state) * edit_targets(encode, images, edited, z0.shape[1:],
                                                        z0=z0 if replace else None)
            moved = backbone.decode(state, z0 + target).images
            judged = [("base", images), ("latent", moved), ("image", edited.images)]
            if latent_move:
                maps = model.predict(images)
                shifted, _ = move_latents(z0, maps.shape_probs, maps.color_probs, state.specs,
                                          model.config.shapes, margin=edit_config.margin)
                judged.append(("moved", backbone.decode(state, shifted).images))
        edited_count += sum(1 for a in edited.actions if changed_something(a))  # "unplaced ..." is no edit
        recs = [it.record for it in chunk]
        for key, imgs in judged:
            verdicts[key] += [bool(v.correct) for v in E.evaluate(imgs, recs)]
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    tags = [it.record.get("tag", "") for it in items]
    rows = {}
    for key, v in verdicts.items():
        per = {t: sum(ok for ok, g in zip(v, tags) if g == t) / tags.count(t) for t in sorted(set(tags))}
        rows[key] = {"overall": sum(per.values()) / len(per), "tags": per}
    return {"items": len(items), "edited": edited_count, "correction_step": correction_step, "replace": replace,
            "latent_move": latent_move, "rows": rows}


def main(argv=None) -> int:
    args = parse_args(argv)
    from xlard.shapes.editor import EditConfig

    try:
        config = EditConfig(redraw=not args.no_redraw, fix_count=not args.no_count, fix_color=not args.no_color,
                            fix_position=not args.no_position, relayout=args.relayout,
                            relayout_color=args.relayout_color, margin=args.margin)
    except ValueError as exc:
        print(f"measure_edit_ceiling: {exc}", file=sys.stderr)
        return 2
    result = measure(args.per_tag, config, args.seed_base, args.batch, progress=not args.quiet,
                     correction_step=args.correction_step, replace=args.replace, latent_move=args.latent_move)
    print(f"{result['items']} training-split items, {result['edited']} edited, correction_step "
          f"{args.correction_step:g}; exact evaluator, mean of the tags")
    for key, row in result["rows"].items():
        print(f"{key:>6}: {row['overall']:.4f} | " + " ".join(f"{t} {v:.3f}" for t, v in row["tags"].items()))
    if args.out:
        from xlard import _io

        _io.atomic_write_text(Path(args.out), _io.dumps({"edit_config": vars(config), **result}, indent=2) + "\n",
                              owner="measure_edit_ceiling")
    return 0


if __name__ == "__main__":
    from xlard._signals import run_script

    raise SystemExit(run_script("measure_edit_ceiling.py", main,
                                " (it keeps no partial results: rerun the same command to start over)"))
