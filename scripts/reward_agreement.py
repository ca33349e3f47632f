"""How well the CMD rewards agree with the exact evaluator on a backbone's own samples.

The rewards are computed from the backbone's own signals (its cross-attention maps
for count and position, the weight-free pixel color encoder on the decoded image
for color), never from the evaluator. For each aspect the script reports the AUROC
of the aspect's reward for "the evaluator judged this record correct", over the
records whose tag exercises that aspect (counting -> count, colors/color_attr ->
color, position -> position), plus the mean reward of correct and incorrect ones.

    python scripts/reward_agreement.py --backbone shapes -n 300 --out agreement.json
"""
from __future__ import annotations

import argparse
import math
import sys
import time

ASPECT_TAGS = {"count": ("counting",), "color": ("colors", "color_attr"), "position": ("position",)}
ASPECT_INDEX = {"count": 0, "color": 1, "position": 2}


def auroc(scores: list[float], labels: list[bool]) -> float:
    """Area under the ROC curve by the rank-sum formula (ties count half); NaN without both classes."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return math.nan
    wins = 0.0
    for p in pos:
        for n in neg:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (len(pos) * len(neg))


def run(backbone_name: str, n: int, seed: int, batch: int, steps: int, quiet: bool) -> dict:
    import torch

    from xlard.backbones import DiffusersBackbone
    from xlard.cli import resolve_backbone
    from xlard.color_features import PixelColorEncoder
    from xlard.rewards import ExplainableRewards
    from xlard.shapes import evaluator as E
    from xlard.shapes import prompts as P

    records = P.sample_records(P.make_splits(P.PromptConfig(), seed=0)["heldout"], n, seed=seed)
    kwargs = {"num_inference_steps": steps} if steps else {}
    if backbone_name == "shapes":  # the sampler settings the shipped model was evaluated with
        from xlard.shapes import backbone as shapes_backbone

        kwargs.setdefault("num_inference_steps", shapes_backbone.DEFAULT_STEPS)
        kwargs["guidance_scale"] = shapes_backbone.DEFAULT_GUIDANCE
    backbone = DiffusersBackbone.from_pretrained(resolve_backbone(backbone_name), torch_dtype=torch.float32,
                                                 **kwargs)
    cmd = ExplainableRewards(color_encoder=PixelColorEncoder())
    rows = []
    t0 = time.time()
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        out = backbone.generate([r["prompt"] for r in chunk], seed=[seed + start + k for k in range(len(chunk))])
        with torch.no_grad():
            rewards = cmd(**out.decoded.reward_inputs())
        judged = E.evaluate(out.images, chunk)
        for k, (record, result) in enumerate(zip(chunk, judged)):
            rows.append({"tag": record["tag"], "prompt": record["prompt"], "correct": bool(result.correct),
                         "scores": [None if math.isnan(v) else v for v in rewards.scores[k].tolist()],
                         "joint": None if math.isnan(float(rewards.joint[k])) else float(rewards.joint[k])})
        if not quiet:
            print(f"{min(start + batch, len(records))}/{len(records)} records, {time.time() - t0:.0f}s",
                  file=sys.stderr)
    summary = {}
    for aspect, tags in ASPECT_TAGS.items():
        sel = [r for r in rows if r["tag"] in tags and r["scores"][ASPECT_INDEX[aspect]] is not None]
        scores = [r["scores"][ASPECT_INDEX[aspect]] for r in sel]
        labels = [r["correct"] for r in sel]
        correct = [s for s, y in zip(scores, labels) if y]
        wrong = [s for s, y in zip(scores, labels) if not y]
        summary[aspect] = {
            "tags": list(tags), "records": len(sel), "evaluator_correct": sum(labels), "auroc": auroc(scores, labels),
            "mean_reward_correct": sum(correct) / len(correct) if correct else None,
            "mean_reward_wrong": sum(wrong) / len(wrong) if wrong else None,
        }
    joint = [r for r in rows if r["joint"] is not None]
    summary["joint"] = {"records": len(joint), "auroc": auroc([r["joint"] for r in joint],
                                                              [r["correct"] for r in joint])}
    return {"backbone": backbone_name, "n": len(rows), "seed": seed, "seconds": time.time() - t0,
            "summary": summary, "rows": rows}


def to_markdown(report: dict) -> str:
    lines = [f"CMD reward vs exact evaluator on {report['n']} held-out samples of backbone {report['backbone']!r}",
             "", "| aspect | tags | records | evaluator-correct | AUROC | mean reward (correct) | mean reward (wrong) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"  # noqa: E731
    for aspect in ("count", "color", "position"):
        s = report["summary"][aspect]
        lines.append(f"| {aspect} | {', '.join(s['tags'])} | {s['records']} | {s['evaluator_correct']} | "
                     f"{fmt(s['auroc'])} | {fmt(s['mean_reward_correct'])} | {fmt(s['mean_reward_wrong'])} |")
    j = report["summary"]["joint"]
    lines.append(f"| joint | all | {j['records']} | | {fmt(j['auroc'])} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="shapes")
    parser.add_argument("-n", type=int, default=300, help="held-out records (balanced over tags)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--out", help="write the report (JSON, with per-record rows) here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    report = run(args.backbone, args.n, args.seed, args.batch, args.steps, args.quiet)
    print(to_markdown(report))
    if args.out:
        from xlard import _io

        _io.atomic_write_json(args.out, report, owner="reward_agreement --out", indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
