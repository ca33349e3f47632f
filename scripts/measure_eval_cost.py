"""Measure what a paired evaluation costs on the shapes backbone, per phase, at several correction steps.

For each ``correction_step``: held-out records x seeds in batches; times ``encode`` (text
encoder + the first k denoising steps), ``decode`` (the remaining steps + the VAE), the
corrector's forward, and the exact evaluator, per image. Prints and writes (JSON) the
per-image costs (wall seconds, and CPU seconds of this process summed over its threads:
on a shared machine the wall time measures the load as much as the work) and their
extrapolation to ``--target-records`` x ``--target-seeds``: base only (encode + decode +
evaluate), paired (one more decode and evaluation) and paired with the LAM faithfulness
check (two more).

    nice -n 10 python scripts/measure_eval_cost.py --records 48 --seeds 0,1 --steps 1.0,0.6,0.3 --out cost.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=48, help="held-out records measured (balanced over tags; default 48)")
    parser.add_argument("--seeds", default="0,1", help="evaluation seeds, e.g. 0,1 (default 0,1)")
    parser.add_argument("--steps", default="1.0,0.6,0.3", help="correction steps to measure (default 1.0,0.6,0.3)")
    parser.add_argument("--batch", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--target-records", type=int, default=500,
                        help="records of the evaluation whose cost is extrapolated (default 500)")
    parser.add_argument("--target-seeds", type=int, default=2,
                        help="seeds of the evaluation whose cost is extrapolated (default 2)")
    parser.add_argument("--out", help="write the measurements (JSON) here, atomically: a failed write leaves the "
                                      "file as it was")
    args = parser.parse_args(argv)
    for flag, value, high in (("--records", args.records, 100_000), ("--batch", args.batch, 4096),
                              ("--target-records", args.target_records, 10**6),
                              ("--target-seeds", args.target_seeds, 1000)):
        if not 1 <= value <= high:  # 10**8 records ran silently for minutes before running out of memory
            parser.error(f"{flag} must be in [1, {high}], got {value}")
    try:
        steps = [float(x) for x in args.steps.split(",")]
    except ValueError:
        steps = []
    if not steps or not all(0 < x <= 1 for x in steps):
        parser.error(f"--steps: expected comma-separated correction steps in (0, 1] such as 1.0,0.6,0.3, "
                     f"got {args.steps!r}")
    from xlard import _io

    problem = _io.unwritable_output(files={"--out": args.out})  # now, not after the measurement
    if problem:
        parser.error(problem)

    from xlard import evaluation as ev
    from xlard.models import CorrectorConfig, ResidualCorrector
    from xlard.shapes import backbone as shapes_backbone
    from xlard.shapes import evaluator as E
    from xlard.shapes import prompts as P

    try:
        seeds = ev.parse_seeds(args.seeds)
    except ValueError as e:
        parser.error(str(e))
    pool = P.make_splits(P.PromptConfig(), seed=P.SPLIT_SEED)["heldout"]
    records = P.sample_records(pool, args.records, seed=0)
    items = [(i, s) for s in seeds for i in range(len(records))]
    results = {"records": len(records), "seeds": seeds, "batch": args.batch, "threads": torch.get_num_threads(),
               "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg(), "settings": []}
    for step in steps:
        meta = ev.CorrectorMeta("shapes", step, 1.0, shapes_backbone.DEFAULT_STEPS, shapes_backbone.DEFAULT_GUIDANCE)
        backbone = ev.load_backbone_for(meta)
        torch.manual_seed(0)
        corrector = ResidualCorrector(CorrectorConfig.tiny(latent_channels=backbone.latent_channels,
                                                           text_dim=backbone.text_dim,
                                                           pooled_dim=backbone.pooled_dim)).eval()
        torch.nn.init.normal_(corrector.head.weight, std=0.02)
        spent = {"encode": 0.0, "decode": 0.0, "correct": 0.0, "evaluate": 0.0}
        cpu = dict(spent)
        correct = 0
        start_all = time.perf_counter()
        for b in range(0, len(items), args.batch):
            chunk = items[b:b + args.batch]
            recs = [records[i] for i, _ in chunk]
            c0, t0 = time.process_time(), time.perf_counter()
            state = backbone.encode([r["prompt"] for r in recs], seed=[ev.image_seed(s, i) for i, s in chunk])
            c1, t1 = time.process_time(), time.perf_counter()
            with torch.no_grad():
                zc, _ = corrector.correct(state.z0, **state.prompt_embedding.as_corrector_inputs())
            c2, t2 = time.process_time(), time.perf_counter()
            images = backbone.decode(state).images
            c3, t3 = time.process_time(), time.perf_counter()
            verdicts = E.evaluate(images, recs)
            c4, t4 = time.process_time(), time.perf_counter()
            for key, begin, end in (("encode", c0, c1), ("correct", c1, c2), ("decode", c2, c3), ("evaluate", c3, c4)):
                cpu[key] += end - begin
            spent["encode"] += t1 - t0
            spent["correct"] += t2 - t1
            spent["decode"] += t3 - t2
            spent["evaluate"] += t4 - t3
            correct += sum(v.correct for v in verdicts)
            print(f"correction_step {step}: {b + len(chunk)}/{len(items)} images, "
                  f"{time.perf_counter() - start_all:.0f} s", file=sys.stderr, flush=True)
        n = len(items)
        target = args.target_records * args.target_seeds

        def minutes(per):
            base = per["encode"] + per["decode"] + per["evaluate"]
            paired = base + per["correct"] + per["decode"] + per["evaluate"]
            faithful = paired + 2 * (per["decode"] + per["evaluate"])
            return {"base": base * target / 60, "paired": paired * target / 60,
                    "paired_with_faithfulness": faithful * target / 60}

        per_wall = {k: v / n for k, v in spent.items()}
        per_cpu = {k: v / n for k, v in cpu.items()}
        row = {"correction_step": step, "images": n, "base_accuracy": correct / n,
               "wall_seconds_per_image": per_wall, "cpu_seconds_per_image": per_cpu,
               "wall_seconds": time.perf_counter() - start_all, "load_average": os.getloadavg(),
               "extrapolated_wall_minutes": minutes(per_wall), "extrapolated_cpu_minutes": minutes(per_cpu),
               "target_images": target}
        results["settings"].append(row)
        print(json.dumps(row), flush=True)
    results["load_average_end"] = os.getloadavg()
    if args.out:  # atomically: a failed write (a full disk, a file-size limit) keeps the earlier file whole
        _io.atomic_write_json(args.out, results, owner="measure_eval_cost --out")
    return 0


if __name__ == "__main__":
    from xlard._signals import run_script

    raise SystemExit(run_script("measure_eval_cost.py", main,
                                " (it keeps no partial results: rerun the same command to start over)"))
