"""Train the corrector shipped for the shapes backbone and install it into package data.

    python scripts/train_shapes_corrector.py                     # train into runs/shapes_shipped, then install
    python scripts/train_shapes_corrector.py --resume            # continue an interrupted run, then install
    python scripts/train_shapes_corrector.py --no-install        # train only

The run is an ordinary ``xlard train configs/shapes_shipped.yaml`` run (checkpointed,
resumable, seeded); its budget is at most 90 minutes on two CPU cores. Installing
copies the run's ``corrector/`` folder to ``xlard/data/shapes_corrector/`` (the folder
``xlard generate --backbone shapes --correct`` and ``xlard eval --correct`` read) and
writes a model card (``README.md``) there with the run's settings and timings; a run
whose summary.json, config.json or metrics.jsonl is damaged is refused (the error names
the file and what to do) and the package data stays as it was. The
held-out split is never touched here: evaluate the installed corrector with

    xlard eval --prompts heldout.jsonl --correct --seeds 0,1 --out runs/shipped_eval
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "shapes_shipped.yaml"
TARGET = REPO / "xlard" / "data" / "shapes_corrector"
MAX_BYTES = 20 * 1024 * 1024


def install(run: Path, seconds: float | None) -> Path:
    """Copy ``run/corrector`` into package data (atomically) with a model card; returns the target folder."""
    from xlard import _io
    from xlard.evaluation import CORRECTOR_META_NAME, load_corrector_dir

    source = run / "corrector"
    corrector, meta = load_corrector_dir(source)  # refuses a broken folder before anything is replaced
    size = sum(p.stat().st_size for p in source.iterdir() if p.is_file())
    if size > MAX_BYTES:
        raise SystemExit(f"the corrector folder is {size / 2**20:.1f} MiB, above the 20 MiB package-data budget")
    summary, config, rows = read_run(run)
    train_seconds = sum(_seconds(r.get("time/step")) + _seconds(r.get("time/last_checkpoint")) for r in rows)
    distill = (meta.training or {}).get("distill") or {}
    build_seconds = float(distill.get("build_seconds") or 0.0)
    fit_seconds = (float(distill.get("seconds") or 0.0) + float(distill.get("decoder_seconds") or 0.0)
                   + float(distill.get("reader_seconds") or 0.0))  # the latent reader's fit, when there is one
    targets_known = build_seconds >= 1.0  # below: shards built by an interrupted run that kept no time
    total_seconds = build_seconds + fit_seconds + train_seconds
    params = sum(p.numel() for p in corrector.parameters())
    # The run folder as a user would name it (a path inside the checkout, else its name): no
    # machine-specific absolute path goes into package data.
    resolved = run.resolve()
    label = str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else run.name
    config["out"] = label
    card = "\n".join([
        "# The shapes backbone's corrector",
        "",
        "Trained by `scripts/train_shapes_corrector.py` (`configs/shapes_shipped.yaml`) on the shapes world's",
        "training split; rewards from the shapes understanding model (never the exact evaluator).",
        "",
        f"- PPO steps: {summary['steps']}; parameters: {params:,}; folder size: {size / 2**20:.2f} MiB",
        *([f"- edit-target warm start: {distill.get('items')} items ({distill.get('items_edited')} edited), "
           f"{distill.get('epochs')} latent + {distill.get('decoder_epochs', 0)} decoder-space epochs, "
           f"held-back explained variance {float(distill.get('val_r2') if distill.get('val_r2') is not None else 'nan'):.3f}; "
           + (f"{(build_seconds + fit_seconds) / 60:.1f} min (targets {build_seconds / 60:.1f}, "
              f"fits {fit_seconds / 60:.1f})" if targets_known else
              f"fits {fit_seconds / 60:.1f} min (the edit targets were built by an earlier, interrupted "
              "invocation that did not record their time)")] if distill else []),
        f"- correction_step {meta.correction_step}, alpha {meta.alpha}, {meta.num_inference_steps} denoising steps, "
        f"guidance {meta.guidance_scale}",
        f"- training time (warm start + sum of step times): {total_seconds / 60:.1f} min"
        + (" without the edit targets' build" if distill and not targets_known else "")
        + (f"; wall time of this invocation {seconds / 60:.1f} min" if seconds is not None else ""),
        f"- config: `{json.dumps(config, sort_keys=True)}`",
        "",
        "Held-out results: docs/evaluation.md.",
        "",
    ])
    with _io.atomic_folder(TARGET, owner="train_shapes_corrector", existing="replace") as tmp:
        for path in source.iterdir():
            if path.is_file():
                shutil.copyfile(path, tmp / path.name)
        meta_file = tmp / CORRECTOR_META_NAME
        meta_data = json.loads(meta_file.read_text(encoding="utf-8"))
        meta_data["training"]["run"] = label
        meta_file.write_text(_io.dumps(meta_data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return TARGET


def read_run(run: Path, owner: str = "train_shapes_corrector") -> tuple[dict, dict, list[dict]]:
    """The files of a finished run the model card reads: ``summary.json``, ``config.json`` and the rows of
    ``metrics.jsonl`` (``owner`` begins the messages).

    Raises:
        FileNotFoundError: one is missing.
        ValueError: one is damaged (not JSON, cut short, a summary without its step count, a line of the metrics
            that is no JSON object), naming the file and what to do; a KeyError or a JSON error naming no file
            before.
    """
    from xlard import _io

    resume = "rerun with --resume (not --install-only): it writes it again from the run's last checkpoint"
    try:
        summary = _io.read_json(run / "summary.json", owner=owner, what="a run's summary")
    except ValueError as exc:
        raise ValueError(f"{exc}; {resume}") from None
    if not isinstance(summary, dict) or not _is_count(summary.get("steps")):
        raise ValueError(f"{owner}: {run / 'summary.json'} is not the summary of a finished run (no step count "
                         f"\"steps\"); {resume}")
    try:
        config = _io.read_json(run / "config.json", owner=owner, what="a run's config")
    except ValueError as exc:
        raise ValueError(f"{exc}; the run's config is damaged: train the run again") from None
    if not isinstance(config, dict):
        raise ValueError(f"{owner}: {run / 'config.json'} is not a run config (a JSON object); the run's config is "
                         "damaged: train the run again")
    path = run / "metrics.jsonl"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{owner}: {path} is not text (UTF-8); the model card sums the run's step times from it: "
                         "restore it, or train the run again") from None
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            raise ValueError(f"{owner}: {path} line {number} is not a metrics row ({line[:60]!r}: damaged or cut "
                             "short); the model card sums the run's step times from it: repair or delete that line "
                             "and rerun")
        rows.append(row)
    return summary, config, rows


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _seconds(value) -> float:
    """A metrics row's time in seconds; absent or null (a NaN written as null) counts as 0."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def config_differences(run: Path) -> list[str]:
    """The fields (dotted paths) where ``run/config.json`` differs from ``configs/shapes_shipped.yaml``, the run
    folder and the progress bar aside: installing such a run would ship a corrector its model card misdescribes."""
    from xlard.train import config_from_dict, load_config

    def plain(cfg) -> dict:
        data = json.loads(json.dumps(cfg.to_dict(), default=list))
        data.pop("out", None)
        if isinstance(data.get("log"), dict):
            data["log"].pop("progress", None)
        return data

    try:
        have = plain(config_from_dict(json.loads((run / "config.json").read_text(encoding="utf-8"))))
    except (OSError, TypeError, ValueError) as exc:
        return [f"config.json (unreadable: {exc})"]
    want = plain(load_config(CONFIG))

    def diff(a, b, prefix: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [d for k in sorted(set(a) | set(b)) for d in diff(a.get(k), b.get(k), f"{prefix}{k}.")]
        return [] if a == b else [prefix.rstrip(".")]

    return diff(have, want, "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "runs" / "shapes_shipped"), help="the run folder")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--no-install", action="store_true", help="train only; leave package data alone")
    parser.add_argument("--install-only", action="store_true", help="install the finished run in --out")
    args = parser.parse_args(argv)
    if args.install_only and args.no_install:
        parser.error("--install-only and --no-install together would do nothing; give one of them")
    if args.install_only:  # a finished run: its exported corrector and the files the model card reads
        missing = [name for name in ("corrector", "summary.json", "config.json", "metrics.jsonl")
                   if not (Path(args.out) / name).exists()]
        if missing:
            parser.error(f"--install-only: {args.out} holds no finished run (missing {', '.join(missing)}); "
                         "train it first (without --install-only, or with --resume to finish it)")
        differs = config_differences(Path(args.out))
        if differs:
            shown = ", ".join(differs[:8]) + (f" and {len(differs) - 8} more" if len(differs) > 8 else "")
            parser.error(f"--install-only: {args.out} was not trained with {CONFIG.relative_to(REPO)} (its "
                         f"config.json differs in {shown}); only the shipped config's run is installed (its "
                         "model card names that config)")
        try:  # a damaged summary.json or metrics.jsonl: now, naming the file (a KeyError or "Unterminated string")
            read_run(Path(args.out), "--install-only")
        except (OSError, ValueError) as exc:
            parser.error(" ".join(str(exc).split()))
    from xlard import _io

    # The package data's folder is replaced whole, so its parent must take a new folder.
    package_data = None if args.no_install else TARGET.parent
    problem = _io.unwritable_output(folders={"--out": args.out, "package data (--no-install skips it)": package_data})
    if problem:  # before the run, not after it
        parser.error(problem)

    from xlard.train import load_config, train

    run = Path(args.out)
    seconds = None
    if not args.install_only:
        cfg = load_config(CONFIG, overrides={"out": str(run)})
        t = time.perf_counter()
        train(cfg, resume=args.resume)
        seconds = time.perf_counter() - t
    if not args.no_install:
        target = install(run, seconds)
        print(f"installed the corrector of {run} into {target}")
    return 0


if __name__ == "__main__":
    from xlard._signals import run_script

    raise SystemExit(run_script("train_shapes_corrector.py", main,
                                " (rerun with --resume to continue from the last checkpoint)"))
