"""Distil the shapes understanding model into latent eyes (xlard.shapes.latent_eyes) that read latents directly.

Teacher: the shipped understanding model (xlard.shapes.understanding) on the shapes backbone's VAE decoding of
a latent, exactly what ``CountEyes`` computes. Student: :class:`xlard.shapes.latent_eyes.LatentUnderstanding`,
fitted to the teacher's per-pixel shape-core and color distributions (soft cross-entropy) from the latent alone.

Data: latents the student will read at inference. The corrector's ``count_edit`` reads ``z0 + Delta`` of a
counting prompt (its residual and relation move applied), so each batch samples six *training-split* counting
prompts and two others (image seeds 0-63, the trainer's own; validation uses 100 and up), runs the corrector
(``--corrector``, default the shipped one) with recording eyes attached, and keeps every latent the count edit
was given plus the two other prompts' z0. Nothing comes from the exact evaluator (its code or its verdicts);
the held-out split is never read.

Seeded. The sampled data (about 300 MB) is written atomically to ``<work>/data.pt`` (``--work``, default
``runs/shapes_latent_eyes_data``) and reused by a rerun with the same settings and the same corrector, teacher
and VAE files (their digests are part of the key), so an interrupted run resumes after the sampling; progress
on stderr. The weights (float32 safetensors, about 0.6 MB) and a config.json with the training info go to
``--out``:

    python scripts/train_shapes_latent_eyes.py --out xlard/data/shapes_latent_eyes

About 3 minutes of sampling and 3 of training on two CPU cores (the shipped weights' numbers are in the
config.json's ``training`` entry). A fit that diverges (a training or held-back loss that is not finite: ``--lr``
too high) ends with an error and writes nothing to ``--out``; the sampled data stays for the rerun.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False,
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for config.json and model.safetensors")
    p.add_argument("--work", default="runs/shapes_latent_eyes_data",
                   help="folder for the sampled data, reused by a rerun (default: runs/shapes_latent_eyes_data)")
    p.add_argument("--corrector", help="corrector folder whose count-edit inputs are sampled (default: shipped)")
    p.add_argument("--batches", type=int, default=300, help="sampling batches of 8 prompts (default 300)")
    p.add_argument("--epochs", type=int, default=25, help="passes over the sampled latents (default 25)")
    p.add_argument("--batch-size", type=int, default=32, help="latents per optimiser step (default 32)")
    p.add_argument("--lr", type=float, default=3e-3,
                   help="peak learning rate of the one-cycle schedule, in (0, 1] (default 3e-3); a fit whose loss "
                        "stops being finite ends with an error and saves nothing")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the prompts, image seeds and the fit, in [0, 2**64) (default 0)")
    args = p.parse_args(argv)
    for name in ("batches", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.seed < 2 ** 64:  # numpy's generator (a negative seed) and torch.manual_seed (2**64: "Overflow
        # when unpacking long long") refused it after the backbone had loaded, naming no flag
        p.error(f"--seed must be in [0, 2**64), got {args.seed}")
    if args.corrector is not None and not (Path(args.corrector) / "config.json").is_file():
        p.error(f"--corrector: {args.corrector} is not a corrector folder (no config.json there)")
    if not (math.isfinite(args.lr) and 0 < args.lr <= 1):  # 1e30 trained to NaN and saved the NaN weights
        p.error(f"--lr must be a number in (0, 1], got {args.lr}")
    from xlard import _io

    for name in ("out", "work"):  # before minutes of sampling and training, not at the save
        try:
            _io.check_writable_folder(getattr(args, name), f"--{name}")
        except (OSError, ValueError) as e:  # ValueError: an empty path
            p.error(str(e))
    same = Path(args.out).resolve() == Path(args.work).resolve()
    try:  # a corrector's or a training run's folder lost its files to this script's
        _io.claim_folder(args.out, "--out", ("model.safetensors", "config.json") + (("data.pt",) if same else ()),
                         ("latent_channels",))
        _io.claim_folder(args.work, "--work", ("data.pt",) + (("model.safetensors", "config.json") if same else ()),
                         ("latent_channels",))
    except ValueError as e:
        p.error(str(e))
    return args


class _Recorder:
    """Eyes that record what ``count_edit`` gives them and let the decoded eyes do the edit."""

    def __init__(self, eyes):
        self.eyes, self.latents = eyes, []

    def __call__(self, z):
        return self.eyes(z)

    def edit_counts(self, z, nouns, counts):
        self.latents.append(z.detach().float().cpu().clone())
        return self.eyes.edit_counts(z, nouns, counts)


def sample_latents(args) -> torch.Tensor:
    from xlard import evaluation
    from xlard.backbones import DiffusersBackbone
    from xlard.models import corrector_inputs
    from xlard.shapes import backbone as shapes_backbone
    from xlard.shapes.understanding import CountEyes
    from xlard.train.data import load_records

    backbone = DiffusersBackbone.from_pretrained(
        str(shapes_backbone.backbone_path()), num_inference_steps=shapes_backbone.DEFAULT_STEPS,
        guidance_scale=shapes_backbone.DEFAULT_GUIDANCE, capture=False, torch_dtype=torch.float32)
    corrector, meta = evaluation.load_corrector_dir(args.corrector or evaluation.shipped_corrector_path("shapes"))
    if not corrector.config.count_edit:
        raise SystemExit(f"train_shapes_latent_eyes: the corrector at {args.corrector} has no count_edit: its "
                         f"count-edit inputs are what the latent eyes learn to read")
    recorder = _Recorder(CountEyes(corrector.config.reader_nouns))
    corrector.attach_eyes(recorder)
    records, _ = load_records("shapes:train")
    counting = [r for r in records if r.get("tag") == "counting"]
    others = [r for r in records if r.get("tag") != "counting"]
    rng = np.random.default_rng(args.seed)
    plain, start = [], time.time()
    for b in range(args.batches):
        recs = [counting[i] for i in rng.choice(len(counting), 6)] + [others[i] for i in rng.choice(len(others), 2)]
        seeds = [int(s) for s in rng.integers(0, 64, len(recs))]
        state = backbone.encode([r["prompt"] for r in recs], seed=seeds)
        with torch.no_grad():
            corrector.correct(state.z0, alpha=float(meta.alpha),
                              **corrector_inputs(corrector, state.prompt_embedding, state.specs))
        plain.append(state.z0[6:].float().cpu().clone())
        if (b + 1) % 25 == 0 or b + 1 == args.batches:
            print(f"sampling: {b + 1}/{args.batches} batches ({time.time() - start:.0f} s)", file=sys.stderr,
                  flush=True)
    return torch.cat(recorder.latents + plain)


def teacher_maps(z: torch.Tensor, nouns) -> tuple[torch.Tensor, torch.Tensor]:
    from xlard.shapes.understanding import CountEyes, load_model

    eyes, model = CountEyes(nouns), load_model()
    shapes, colors = [], []
    with torch.no_grad():
        for i in range(0, len(z), 64):
            out = model.predict(eyes.images(z[i:i + 64]))
            shapes.append(out.shape_probs.half())
            colors.append(out.color_probs.half())
    return torch.cat(shapes), torch.cat(colors)


def main(argv=None) -> int:
    args = parse_args(argv)
    from xlard import _io
    from xlard.shapes.latent_eyes import LatentEyesConfig, LatentUnderstanding
    from xlard.shapes.understanding import load_model

    torch.manual_seed(args.seed)
    out = Path(args.out)
    work = _io.make_folder(args.work, "train_shapes_latent_eyes --work")
    key = _data_key(args)
    data_file = work / "data.pt"
    data = None
    if data_file.is_file():
        try:
            data = torch.load(data_file, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch's zip reader and unpickler raise many kinds
            from xlard._args import short_reason

            print(f"{data_file}: cannot be read ({short_reason(exc, 160)}); sampling again", file=sys.stderr)
    if data is not None and (not isinstance(data, dict) or data.get("key") != repr(key)):
        print(f"{data_file}: sampled with other settings; sampling again", file=sys.stderr)
        data = None
    t0 = time.time()
    if data is None:
        z = sample_latents(args)
        teacher = load_model()
        shape_p, color_p = teacher_maps(z, teacher.config.shapes)
        data = {"key": repr(key), "z": z, "shape": shape_p, "color": color_p}
        _save(data_file, data)
    else:
        print(f"using the sampled data in {data_file}", file=sys.stderr)
    sample_seconds = time.time() - t0
    z, shape_p, color_p = data["z"], data["shape"].float(), data["color"].float()
    shape_t = torch.cat(((1 - shape_p.sum(1, keepdim=True)).clamp(0, 1), shape_p), 1)
    teacher = load_model()
    config = LatentEyesConfig(latent_channels=z.shape[1], shapes=teacher.config.shapes,
                              colors=teacher.config.colors)
    model = LatentUnderstanding(config)
    n = len(z)
    if n < 2:
        raise SystemExit(f"train_shapes_latent_eyes: {n} latent(s) sampled; at least 2 are needed (one held back)")
    perm = torch.randperm(n)
    held = perm[:max(1, n // 10)]
    train = perm[max(1, n // 10):]
    model.shift.copy_(z[train].mean((0, 2, 3), keepdim=True))
    model.scale.copy_(z[train].std((0, 2, 3), keepdim=True).clamp_min(1e-6))
    steps = args.epochs * math.ceil(len(train) / args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps, pct_start=0.1)

    def loss_of(idx):
        s, c = model(z[idx])
        return (-(shape_t[idx] * F.log_softmax(s, 1)).sum(1).mean()
                - (color_p[idx] * F.log_softmax(c, 1)).sum(1).mean())

    t1 = time.time()
    held_loss = float("nan")
    for epoch in range(args.epochs):
        model.train()
        order = train[torch.randperm(len(train))]
        for i in range(0, len(order), args.batch_size):
            loss = loss_of(order[i:i + args.batch_size])
            if not torch.isfinite(loss):  # diverged: every step after it (and the saved weights) would be NaN
                raise ValueError(f"training diverged in epoch {epoch + 1} (training loss {loss.item()}); lower --lr "
                                 f"(now {args.lr:g}) and rerun (the sampled data in {work} is reused); nothing was "
                                 f"written to --out {out}")
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            held_loss = float(loss_of(held))
        print(f"epoch {epoch + 1}/{args.epochs}: held-back loss {held_loss:.4f} ({time.time() - t1:.0f} s)",
              file=sys.stderr, flush=True)
        if not math.isfinite(held_loss):  # the weights are NaN or infinite: not worth saving (a NaN model was)
            raise ValueError(f"training diverged in epoch {epoch + 1} (held-back loss {held_loss}); lower --lr "
                             f"(now {args.lr:g}) and rerun (the sampled data in {work} is reused); nothing was "
                             f"written to --out {out}")
    info = {"training": {"latents": n, "held_back": len(held), "held_back_loss": round(held_loss, 5),
                         "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                         "sampling_batches": args.batches, "corrector": args.corrector or "shipped",
                         "sampling_seconds": round(sample_seconds), "training_seconds": round(time.time() - t1),
                         "command": "python " + " ".join(["scripts/train_shapes_latent_eyes.py", *_without_work(
                             sys.argv[1:] if argv is None else argv)])}}
    folder = model.save_pretrained(out, extra=info)
    print(f"latent eyes: {folder}", file=sys.stderr)
    return 0


def _digest(folder: Path) -> str:
    """sha256 over a folder's files (names and bytes), in name order."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _data_key(args) -> dict:
    """What the sampled data depends on: the settings and the files of the corrector, teacher and backbone."""
    from xlard import evaluation
    from xlard.shapes import backbone as shapes_backbone
    from xlard.shapes.understanding import model_path

    corrector = Path(args.corrector or evaluation.shipped_corrector_path("shapes")).resolve()
    return {"batches": args.batches, "seed": args.seed, "corrector": str(corrector),
            "corrector_files": _digest(corrector), "teacher_files": _digest(model_path().resolve()),
            "backbone_files": _digest(shapes_backbone.backbone_path().resolve())}


def _without_work(args: list[str]) -> list[str]:
    """The command line without ``--work`` (a local cache folder: it does not change the weights)."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--work":
            skip = True
        elif not a.startswith("--work="):
            out.append(a)
    return out


def _save(path: Path, data) -> None:
    """``torch.save`` through a temporary file, synced and renamed (a killed run leaves no half-written data and
    no temporary file)."""
    from xlard import _io

    with _io.atomic_path(path, owner="train_shapes_latent_eyes --work") as tmp:
        torch.save(data, tmp)


if __name__ == "__main__":
    from xlard._signals import run_script

    raise SystemExit(run_script("train_shapes_latent_eyes.py", main,
                                " (rerun the same command: the sampled data, once written, is reused)"))
