"""``xlard demo``: train a corrector on the shapes backbone, judge it on held-out prompts, show the result.

The whole method on a CPU, offline, in one command:

1. **train** a corrector on the shapes world's training split with the
   trainer (:mod:`xlard.train`), rewards from the shapes understanding model
   (never the exact evaluator), into ``OUT/train`` (checkpointed; ``--resume``
   continues it);
2. **evaluate** base vs corrected on held-out prompts, paired (same records,
   same seeds), with the exact evaluator and bootstrap intervals, into
   ``OUT/eval`` (:func:`xlard.evaluation.run_evaluation`; resumable pair by pair);
3. **report**: the table on stdout and ``OUT/report.html``, a self-contained
   page with the table, the training curves, and before/after images with
   their Latent Activation Maps and each aspect's explanation.

``OUT/demo.json`` records the settings, timings and where everything is.
"""
from __future__ import annotations

import base64
import contextlib
import html
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from xlard import _io

__all__ = ["DEMO_TRAINING", "DEMO_ITEMS_PER_TAG", "DEMO_READER_BATCH", "DEMO_PER_TAG", "DEMO_SEEDS", "demo_config", "demo_records", "run_demo", "DEMO_OUTPUTS"]

#: The demo's training run (a :func:`xlard.train.config_from_dict` mapping): the shipped corrector's recipe
#: (``configs/shapes_shipped.yaml``: the edit-target warm start, no PPO steps) with fewer edit targets;
#: ``steps``, ``out`` and ``distill.items_per_tag`` are set per run.
DEMO_TRAINING: dict[str, Any] = {
    "seed": 0,
    "rl": "ppo",
    "reward_model": "image",
    "confidence": "uniform",
    "anchor": "none",
    "backbone": {"name": "shapes", "correction_step": 1.0, "device": "cpu"},
    "data": {"prompts": "shapes:train", "balance": "tag", "items_per_tag": 256, "monitor_size": 0},
    "reward": {"source": "auto"},
    "distill": {"items_per_tag": 1000, "epochs": 15, "lr": 1.0e-3, "batch_size": 64, "redraw": False,
                "fix_count": False, "fix_position": False, "decoder_epochs": 6},
    "model": {"corrector": "tiny", "corrector_overrides": {"patch": 2, "width": 128, "depth": 4, "heads": 4,
                                                           "cond_dim": 32, "log_std_init": -0.9,
                                                           "conditioning": "fields", "reader": True,
                                                           "reader_move": True, "count_edit": True,
                                                           "count_eyes": "latent"},
              "projector": "tiny", "projector_overrides": {"patch": 2}},
    "ppo": {"prompts_per_step": 8, "group_size": 8, "epochs": 4, "minibatches": 2, "clip": 0.01,
            "logprob_reduction": "mean", "advantage": "group", "whiten": True},
    "optim": {"lr": 1.0e-4, "warmup_steps": 3, "schedule": "constant", "max_grad_norm": 1.0, "ema": 0.0},
    "log": {"monitor_every": 0, "evaluate_every": 0, "checkpoint_every": 25},
    "export": {"alpha_grid": [1]},
}

#: Edit targets per GenEval tag in the demo (the shipped corrector's run uses 1000; 200 fit the 15 minutes).
DEMO_ITEMS_PER_TAG = 200

#: The demo's latent-reader batch: its 1200 items at the shipped run's 64 give a fifth of the updates and a
#: reader that names 83% of the object cells' nouns; at 16, 98% in the same time (docs/demo.md).
DEMO_READER_BATCH = 16

#: Held-out records per tag and evaluation seeds of the demo: 498 records x 2 seeds, about the 1000
#: images the shipped corrector is measured on (docs/evaluation.md), so that the demo's intervals can
#: tell a gain of a few points from none (16 records per tag could not).
DEMO_PER_TAG = 83
DEMO_SEEDS = (0, 1)

#: What the demo writes in its folder (``--overwrite`` deletes exactly these).
DEMO_OUTPUTS = ("train", "eval", "report.html", "demo.json")

#: Cards in the HTML report.
REPORT_CARDS = 12


#: The demo's settings (demo.json) by the options that set them: what a refused --resume names.
_SETTING_OPTIONS = {"steps": "--steps", "items_per_tag": "--items-per-tag", "per_tag": "--per-tag", "seeds": "--seeds",
                    "training": "the training config (--set, or another xlard version's recipe)",
                    "overrides": "--set"}


def demo_config(out: Path, steps: int = 0, items_per_tag: int = DEMO_ITEMS_PER_TAG, progress: bool = True,
                overrides: Mapping[str, Any] | None = None):
    """The demo's :class:`xlard.train.TrainConfig`, writing to ``out``.

    ``steps``: PPO steps after the warm start; ``items_per_tag``: edit targets per
    tag (0: no warm start); ``overrides``: dotted keys, as ``--set``.
    """
    from xlard.train import config_from_dict

    return config_from_dict(DEMO_TRAINING, overrides={**dict(overrides or {}), "steps": int(steps), "out": str(out),
                                                      "distill.items_per_tag": int(items_per_tag),
                                                      "distill.reader_batch_size": DEMO_READER_BATCH,
                                                      "log.progress": bool(progress)})


def _override(overrides: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    """Whether ``--set`` gives the dotted key ``dotted``, and its value: as that key, or inside a mapping given for
    one of its sections (``distill={items_per_tag: 5}``, ``model.corrector_overrides={reader: false}``); the last
    given wins, as config_from_dict applies them."""
    parts = dotted.split(".")
    found: tuple[bool, Any] = (False, None)
    for key, value in overrides.items():  # in the order given
        head = key.split(".")
        if head == parts:
            found = (True, value)
        elif parts[:len(head)] == head:
            node = value
            for part in parts[len(head):]:
                if not isinstance(node, Mapping) or part not in node:
                    break
                node = node[part]
            else:
                found = (True, node)
    return found


def demo_records(per_tag: int, seed: int = 0) -> list[dict]:
    """``per_tag`` held-out records of each of the six GenEval tags (the held-out split, balanced).

    Raises:
        ValueError: ``per_tag`` below 1.
    """
    from xlard.shapes import prompts as P

    if isinstance(per_tag, bool) or not isinstance(per_tag, int) or per_tag < 1:
        raise ValueError(f"demo_records: per_tag must be an integer >= 1, got {per_tag!r}")
    pool = P.make_splits(P.PromptConfig(), seed=P.SPLIT_SEED)["heldout"]
    return P.sample_records(pool, per_tag * len(P.TAGS), seed=seed)


def _owned(out: Path) -> list[Path]:
    """The demo's outputs in ``out``; only a folder its demo.json marks is a demo's (a user's own ``train/`` or
    ``report.html`` in a folder without one was taken for an earlier demo, and --overwrite deleted it)."""
    if not out.is_dir():
        return []
    found = [out / name for name in DEMO_OUTPUTS if (out / name).exists()]
    if found and not (out / "demo.json").is_file():
        raise ValueError(f"--out: {out} holds {', '.join(p.name for p in found)} but no demo.json: not a demo's "
                         "outputs (they are left alone); choose another folder")
    if found:  # any file named demo.json claimed the folder, and --overwrite deleted a user's train/ and report
        try:
            marker = _io.read_json(out / "demo.json", what="demo.json")
        except (OSError, ValueError):
            marker = None
        if not (isinstance(marker, dict) and isinstance(marker.get("settings"), dict)):
            raise ValueError(f"--out: {out / 'demo.json'} holds no demo settings: not a demo's (or damaged), so "
                             f"{', '.join(p.name for p in found)} there are left alone; choose another folder")
    return found


def _check_folder(out: Path, overwrite: bool, resume: bool) -> list[Path]:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} exists and is not a folder; give a folder path")
    other = _io.other_run(out, "demo")
    if other is not None:
        raise ValueError(f"--out: {out} holds the outputs of `xlard {other}`; the demo's would mix with them: "
                         "choose another folder")
    owned = _owned(out)
    if owned and not (overwrite or resume):
        raise ValueError(f"--out: {out} already holds an earlier demo ({', '.join(p.name for p in owned)}); add "
                         "--resume to continue it, --overwrite to replace it, or choose another folder")
    return owned


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _table_html(report: dict) -> str:
    from xlard.evaluation import interval_text, percent, table_rows

    conf = report["bootstrap"]["confidence"]
    rows = ["<table><tr><th>tag</th><th>images</th><th>base</th><th>corrected</th><th>gain (points)</th>"
            f"<th>{percent(conf)} interval</th></tr>"]
    for tag, r in table_rows(report):
        name = f"<b>{html.escape(tag)}</b>" if tag == "overall" else html.escape(tag)
        rows.append(f"<tr><td>{name}</td><td>{r['images']}</td><td>{100 * r['base']:.1f}</td>"
                    f"<td>{100 * r['corrected']:.1f}</td><td>{100 * r['diff']:+.1f}</td>"
                    f"<td>{interval_text(r['ci_low'], r['ci_high'])}</td></tr>")
    rows.append("</table><p>Exact evaluator on held-out prompts; paired (same records, same seeds); overall = mean "
                "of the six tags; intervals: paired bootstrap over records.</p>")
    return "".join(rows)


def _pick_cards(rows: Sequence, k: int) -> list:
    """Up to ``k`` pairs for the report: fixed ones first, then broken, then unchanged; tags interleaved."""
    fixed = [r for r in rows if r.corrected_correct and not r.base_correct]
    broken = [r for r in rows if r.base_correct and not r.corrected_correct]
    same = [r for r in rows if r.base_correct == r.corrected_correct]
    picked: list = []
    for group in (fixed, broken, same):
        by_tag: dict[str, list] = {}
        for r in group:
            by_tag.setdefault(r.tag, []).append(r)
        queues = [by_tag[t] for t in sorted(by_tag)]
        for j in range(max((len(q) for q in queues), default=0)):
            for q in queues:
                if j < len(q) and len(picked) < k:
                    picked.append(q[j])
    return picked


def _report_items(backbone, corrector, meta, reward_fn, records, rows) -> list:
    """Regenerate the chosen pairs (deterministic) and explain base and corrected images."""
    import torch

    from xlard import ops
    from xlard.evaluation import applied_change, image_seed
    from xlard.explain import report_items
    from xlard.models import corrector_inputs

    if not rows:
        return []
    recs = [records[r.index] for r in rows]
    state = backbone.encode([rec["prompt"] for rec in recs], seed=[image_seed(r.seed, r.index) for r in rows])
    with torch.no_grad():
        delta, actions = corrector.actions(state.z0, **corrector_inputs(corrector, state.prompt_embedding,
                                                                         state.specs))
        zc, lam = ops.residual_correction(state.z0, delta, float(meta.alpha))
        lam, actions = applied_change(lam, actions, float(meta.alpha))  # the change applied, as eval reports it
        base = backbone.decode(state)
        corrected = backbone.decode(state, zc)
    before, after = reward_fn(base, explain=True), reward_fn(corrected, explain=True)

    def verdict(ok: bool) -> str:
        return "correct" if ok else "wrong"

    labels = [f"{r.tag}, seed {r.seed}: evaluator {verdict(r.base_correct)} -> {verdict(r.corrected_correct)}; "
              f"corrector: {'; '.join(acts) or 'residual only'}" for r, acts in zip(rows, actions)]
    return report_items([rec["prompt"] for rec in recs], after, before=base.images.float().clamp(0, 1),
                        after=corrected.images.float().clamp(0, 1), lam=lam.float(), rewards_before=before,
                        labels=labels)


@_io.holds_folder("out", "--out")
def run_demo(out: str | Path = "xlard-demo", *, steps: int = 0, items_per_tag: int = DEMO_ITEMS_PER_TAG,
             per_tag: int = DEMO_PER_TAG, seeds: Sequence[int] = DEMO_SEEDS,
             overwrite: bool = False, resume: bool = False, quiet: bool = False,
             overrides: Mapping[str, Any] | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Train, evaluate and report (see the module docstring).

    Args:
        out: the demo folder.
        steps: PPO steps after the warm start (the shipped recipe has none).
        items_per_tag: edit targets per GenEval tag for the warm start (0: none;
            then ``steps`` must be at least 1 and ``overrides`` must turn the reader off).
        per_tag: held-out records per GenEval tag (six tags).
        seeds: evaluation seeds (every record runs under each).
        overwrite: delete an earlier demo's outputs in ``out`` first.
        resume: continue an earlier demo in ``out`` (same settings).
        quiet: no progress bars.
        overrides: training-config fields to change (dotted keys, e.g.
            ``{"distill.epochs": 10}``; the CLI's ``--set``); ``steps``, ``out``
            and ``distill.items_per_tag`` are the demo's own.
        log: where status lines go (default stderr).

    Returns:
        The summary written to ``out/demo.json``.

    Raises:
        ValueError: bad arguments, or ``out`` holding an earlier demo without
            ``overwrite``/``resume`` (checked before any work).
    """
    import torch

    from xlard import evaluation
    from xlard.train import train
    from xlard.train.rewarding import build_reward_fn
    from xlard.train.trainer import check_prompt_files, load_backbone

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if overwrite and resume:
        raise ValueError("--overwrite and --resume exclude each other")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"--steps must be an integer >= 0, got {steps!r}")
    if isinstance(items_per_tag, bool) or not isinstance(items_per_tag, int) or items_per_tag < 0:
        raise ValueError(f"--items-per-tag must be an integer >= 0, got {items_per_tag!r}")
    if steps == 0 and items_per_tag == 0:
        raise ValueError("--steps 0 with --items-per-tag 0 trains nothing; give edit targets (--items-per-tag) "
                         "or PPO steps (--steps)")
    if overrides is not None and not isinstance(overrides, Mapping):  # a list of "key=value" texts failed in dict()
        raise TypeError(f"run_demo: overrides must map dotted config keys to values (e.g. {{'ppo.clip': 0.1}}), "
                        f"got {type(overrides).__name__}")
    records = demo_records(per_tag)
    seeds = evaluation.parse_seeds(list(seeds))
    out = Path(out)
    owned = _check_folder(out, overwrite, resume)
    overrides = dict(overrides or {})
    for key, option in (("steps", "--steps"), ("out", "--out"), ("distill.items_per_tag", "--items-per-tag")):
        if _override(overrides, key)[0]:  # also given inside a section (--set 'distill={items_per_tag: 5}')
            raise ValueError(f"--set {key}: use the demo's own {option}")
    given, reader = _override(overrides, "model.corrector_overrides.reader")
    if not given:
        reader = DEMO_TRAINING["model"]["corrector_overrides"]["reader"]
    if items_per_tag == 0 and reader is True:
        raise ValueError("--items-per-tag 0: the demo's corrector has a latent reader, which is fitted on the edit "
                         "targets; give --items-per-tag >= 1, or turn the reader and its rules off with --set "
                         "model.corrector_overrides.reader=false (and reader_move=false, count_edit=false)")
    cfg = demo_config(out / "train", steps, items_per_tag, progress=not quiet, overrides=overrides)
    from xlard.train.rewarding import check_reward_settings

    check_reward_settings(cfg.reward, "shapes")  # before anything loads or is made
    check_prompt_files(cfg)  # a --set data.prompts=... that does not exist
    # the training config as it runs (the recipe with --steps, --items-per-tag, the reader batch and --set applied;
    # the base recipe showed 1000 targets per tag beside --items-per-tag 2), less the run folder and progress bar
    resolved = json.loads(_io.dumps(cfg.to_dict()))
    resolved.pop("out", None)
    resolved.get("log", {}).pop("progress", None)
    settings = {"steps": steps, "items_per_tag": items_per_tag, "per_tag": per_tag, "seeds": seeds,
                "training": resolved, "overrides": overrides}
    summary_path = out / "demo.json"
    if resume and summary_path.is_file():
        summary = _io.read_json(summary_path, what="demo.json")
        earlier = summary.get("settings") if isinstance(summary, dict) else None
        now = json.loads(_io.dumps(settings))
        if not isinstance(earlier, dict):  # a damaged or foreign demo.json: nothing to compare setting by setting
            raise ValueError(f"--resume: {summary_path} holds no demo settings (damaged, or not a demo's); choose "
                             "another --out")
        if earlier != now:
            keys = [k for k in now if earlier.get(k) != now[k]]
            if len(keys) > 1 and "training" in keys:  # the resolved config follows the options: name those
                keys.remove("training")
            differ = []
            for k in keys:
                if k == "training" and isinstance(earlier.get(k), dict):  # the fields, not two cut-off dumps alike
                    from xlard.train.trainer import _config_differences

                    fields = [f"{key} {a} -> {b}" for key, a, b in _config_differences(earlier[k], now[k])]
                    differ.append(f"{_SETTING_OPTIONS[k]}: {', '.join(fields[:4])}"
                                  + (f" and {len(fields) - 4} more" if len(fields) > 4 else ""))
                else:
                    differ.append(_io.changed_setting(_SETTING_OPTIONS.get(k, k), earlier.get(k), now[k]))
            raise ValueError(f"--resume: {out} holds a demo with other settings ({'; '.join(differ)} "
                             "differ); rerun with the same --steps, --items-per-tag, --per-tag, --seeds and --set, or "
                             "use --overwrite")
    t_all = time.perf_counter()
    device = torch.device("cpu")
    backbone = load_backbone(cfg.backbone, device, cfg.reward)  # before anything is deleted or made: it may fail
    reward_fn = build_reward_fn(cfg.reward, backbone)  # (the understanding model too: a damaged one failed after)
    if owned and overwrite:
        for path in owned:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        log(f"overwrite: removed {len(owned)} outputs of the earlier demo from {out}")
    _io.make_folder(out, "--out")
    earlier_seconds: dict[str, float] = {}
    if resume and summary_path.is_file():  # what the earlier invocations spent, added to this one's
        recorded = _io.read_json(summary_path, what="demo.json").get("seconds")
        if isinstance(recorded, dict):
            earlier_seconds = {k: float(v) for k, v in recorded.items() if isinstance(v, (int, float))}
    summary: dict[str, Any] = {"settings": settings, "complete": False, "seconds": dict(earlier_seconds)}
    earlier_total = earlier_seconds.get("total", 0.0)

    @contextlib.contextmanager
    def phase(name: str):
        """Adds the phase's seconds, and this call's so far to the total, to demo.json, interrupted or not (an
        interrupted demo recorded no seconds, so its resume reported only the part it ran)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = summary["seconds"]
            seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - start, 1)
            seconds["total"] = round(earlier_total + time.perf_counter() - t_all, 1)
            with contextlib.suppress(OSError):  # a full disk must not hide the interrupt or the error
                _io.atomic_write_json(summary_path, summary, owner="xlard demo")

    _io.atomic_write_json(summary_path, summary, owner="xlard demo")

    # 1. Train (or pick up a finished / interrupted run).
    with phase("train"):
        train_dir = out / "train"
        corrector_dir = train_dir / "corrector"
        finished = (train_dir / "summary.json").is_file() and corrector_dir.is_dir()
        if finished and _io.read_json(train_dir / "summary.json", what="train/summary.json").get("steps") != steps:
            finished = False
        if not finished:
            # Whatever the run left (a checkpoint, edit-target shards, or only its config.json after a kill right at
            # its start) is resumed: a run that never checkpointed starts again in place.
            again = resume and train_dir.is_dir() and any(train_dir.iterdir())
            what = " then ".join(([f"an edit-target warm start ({items_per_tag} items per tag)"]
                                  if items_per_tag else []) + ([f"{steps} PPO steps"] if steps else []))
            log(f"[1/3] training a corrector on the shapes training split: {what} -> {train_dir}"
                + (" (resuming)" if again else ""))
            # A warm start interrupted before its first checkpoint left edit-target shards: resuming reuses them.
            train(cfg, resume=again, backbone=backbone)
        else:
            log(f"[1/3] training: reusing the finished run in {train_dir}")

    # 2. Paired evaluation on held-out prompts.
    with phase("eval"):
        corrector, meta = evaluation.load_corrector_dir(corrector_dir, device=device)
        corrector.eval()
        log(f"[2/3] evaluating base vs corrected on {len(records)} held-out records x {len(seeds)} seed(s) -> "
            f"{out / 'eval'}")
        report = evaluation.run_evaluation(backbone, corrector, meta, records, seeds, out=out / "eval",
                                           faithfulness_fraction=0.2, quiet=quiet, corrector_source=str(corrector_dir),
                                           log=log, restart_hint=f"delete {out / 'eval'} and rerun `xlard demo "
                                                                 "--resume` with the same options (the training is "
                                                                 "reused)")

    # 3. Report.
    with phase("report"):
        log("[3/3] writing the report")
        rows = evaluation._read_rows(out / "eval" / "pairs.jsonl")
        cards = _pick_cards(rows, REPORT_CARDS)
        items = _report_items(backbone, corrector, meta, reward_fn, records, cards)
        sections = [("Held-out gains", _table_html(report))]
        distill_curve = train_dir / "distill" / "curve.png"
        if items_per_tag and distill_curve.is_file():
            d = cfg.distill
            edits = [name for name, on in (("counts", d.fix_count), ("colors", d.fix_color),
                                           ("relations", d.fix_position)) if on]
            sections.append(("Training: the edit-target warm start",
                             f"<p>{items_per_tag} training-split samples per tag, read by the shapes understanding "
                             f"model and edited the way their prompts ask ({', '.join(edits) or 'no edits'}); the "
                             "corrector regressed onto the edits in latent space"
                             + (", then through the VAE decoder" if d.decoder_epochs else "") + ".</p>"
                             f'<img alt="warm-start curves" src="{_png_data_uri(distill_curve)}">'))
        curve = train_dir / "curve.png"
        if steps and curve.is_file():
            sections.append(("Training: PPO", f'<p>{steps} PPO steps on the training split; rewards from the shapes '
                                              f'understanding model.</p>'
                                              f'<img alt="training curves" src="{_png_data_uri(curve)}">'))
        from xlard.explain import write_html_report

        write_html_report(out / "report.html", items, title="xlard demo: the shapes backbone, corrected",
                          sections=sections)
    overall = report["table"]["overall"]
    summary.update({"complete": True, "corrector": str(corrector_dir), "eval": str(out / "eval" / "eval.json"),
                    "report": str(out / "report.html"),
                    "overall": {k: overall[k] for k in ("base", "corrected", "diff", "ci_low", "ci_high")}})
    _io.atomic_write_json(summary_path, summary, owner="xlard demo")
    return summary


def main(args) -> int:
    """The ``xlard demo`` command."""
    from xlard.evaluation import format_markdown

    from xlard.train import parse_overrides

    overrides = parse_overrides(getattr(args, "set", None))
    summary = run_demo(args.out, steps=args.steps, items_per_tag=args.items_per_tag, per_tag=args.per_tag,
                       seeds=args.seeds, overwrite=args.overwrite, resume=args.resume, quiet=args.quiet,
                       overrides=overrides)
    report = _io.read_json(Path(summary["eval"]), what="eval.json")
    print(format_markdown(report), end="")
    print(f"report: {summary['report']}  (corrector: {summary['corrector']}; "
          f"{summary['seconds']['total']:.0f} s)")
    return 0
