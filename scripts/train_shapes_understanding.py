"""Train the shapes world's dense understanding model (xlard.shapes.understanding) from scratch.

Data: scenes rendered on the fly by the world's renderer with its exact ground
truth (object masks, shapes, colors): half random scenes of 1-8 objects (some
smaller and closer together than the world's defaults, as generated images
draw them), half ground-truth renders of *training-split* prompts with 0-2
distractors. Nothing comes from the exact evaluator (neither its code nor its
judgements).

Robustness to generated images: a pool of renders passed through the shapes
backbone's own VAE, their latents perturbed with noise of random strength
before decoding (so the pool shows the smeared edges, color bleed and
wobbly outlines of generated samples), can make up ``--vae-share`` of every
batch (off by default: labelled with the clean render's objects, such images
teach the model to accept smeared, deformed objects as objects, and on the
training-split samples the count agreement was higher without them); every
image is augmented (horizontal flip, Gaussian blur, pixel noise, color
gain/offset). ``--corrupt P`` also draws things that are not
objects of the world (two-tone objects with chance P each, specks) with no shape label;
it is off by default: with 0.15 the count agreement on the training-split samples was
lower than without (the shipped weights use the defaults). ``--morph P`` redraws
circles, squares and diamonds (chance P each) as superellipses between them, labelled
with the world shape whose outline they overlap best (IoU in their own box), or with
no shape when that overlap is below ``--morph-min-iou``: the shape boundaries the
generated images' in-between outlines need (see docs/rewards.md for what it measured).

Seeded; progress on stderr, metrics in ``<work>/metrics.jsonl``, an atomic
checkpoint every ``--checkpoint-minutes`` (model, optimizer, RNG states) from
which a rerun resumes; the exported weights (float16 safetensors +
config.json with the training info) go to ``--out``:

    python scripts/train_shapes_understanding.py --out xlard/data/shapes_understanding
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xlard.shapes import backbone as shapes_backbone
from xlard.shapes.prompts import SPLIT_SEED, PromptConfig, make_splits, render_record
from xlard.shapes.understanding import ShapesUnderstanding, UnderstandingConfig, _erode, scene_targets
from xlard.shapes.world import PALETTE, WorldConfig, random_scene, shape_mask


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on (saved in the checkpoint and the exported config)."""

    out: str = "xlard/data/shapes_understanding"
    work_dir: str = "build/shapes_understanding_run"
    seed: int = 0
    max_steps: int = 3000
    minutes: float = 29.0
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 50
    final_lr_fraction: float = 0.05
    weight_decay: float = 1e-4
    vae_pool: int = 96
    vae_share: float = 0.0
    vae_noise: float = 0.6
    record_share: float = 0.5
    crop: int = 32
    corrupt: float = 0.0
    morph: float = 0.0
    morph_min_iou: float = 0.7
    channels: tuple[int, ...] = (8, 24, 32, 48)
    core_radius: int = 1
    checkpoint_minutes: float = 3.0
    log_every: int = 20
    threads: int = 1
    backbone: str = ""

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.batch_size < 1:
            raise ValueError(f"--max-steps and --batch-size must be >= 1, got {self.max_steps}, {self.batch_size}")
        if not 0 < self.minutes:
            raise ValueError(f"--minutes must be > 0, got {self.minutes}")
        for name in ("vae_share", "record_share", "corrupt", "morph", "morph_min_iou"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")
        if self.crop != 0 and not 16 <= self.crop <= 64:
            raise ValueError(f"--crop must be 0 (whole images) or in [16, 64], got {self.crop}")
        if self.vae_pool < 0 or not self.vae_noise >= 0 or not math.isfinite(self.vae_noise):
            raise ValueError(f"--vae-pool and --vae-noise must be >= 0, got {self.vae_pool}, {self.vae_noise}")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1):
            raise ValueError(f"--lr must be a number in (0, 1], got {self.lr}")
        for name in ("weight_decay", "checkpoint_minutes"):  # checkpoint_minutes 0: at every step
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ValueError(f"--final-lr-fraction must be in [0, 1], got {self.final_lr_fraction}")
        for name, low in (("warmup_steps", 0), ("core_radius", 0), ("log_every", 1), ("threads", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        # bounds: 100000 threads crashed torch's thread pool, a batch of 10^8 images hung without a word
        for name, high in (("threads", 1024), ("batch_size", 4096), ("vae_pool", 100_000), ("max_steps", 10**7),
                           ("warmup_steps", 10**7), ("log_every", 10**7), ("core_radius", 16)):
            if getattr(self, name) > high:
                raise ValueError(f"--{name.replace('_', '-')} must be at most {high}, got {getattr(self, name)}")
        if any(c > 1024 for c in self.channels):
            raise ValueError(f"--channels must be widths of at most 1024, got {list(self.channels)}")
        if not 0 <= self.seed < 2 ** 64:
            raise ValueError(f"--seed must be in [0, 2**64), got {self.seed}")
        if len(self.channels) != 4 or any(c < 1 for c in self.channels):
            raise ValueError(f"--channels must be 4 widths >= 1 (full resolution, 1/2, 1/4, 1/8), "
                             f"got {list(self.channels)}")
        if self.backbone and (self.vae_share == 0 or self.vae_pool == 0):  # a mistyped folder went unnoticed
            raise ValueError(f"--backbone {self.backbone} is read only for the VAE pool, which is off (--vae-share "
                             f"{self.vae_share:g}, --vae-pool {self.vae_pool}): give --vae-share > 0 or drop "
                             "--backbone")
        if self.backbone and not os.path.isdir(self.backbone):
            raise ValueError(f"--backbone: no pipeline folder at {self.backbone}")


# Worlds the random scenes come from: the default one, and one whose objects can be
# smaller and closer (generated samples draw both).
WORLDS = (WorldConfig(), WorldConfig(min_size=0.1, gap=1), WorldConfig(min_size=0.1, max_size=0.3, gap=2))


def sample_scene(rng: np.random.Generator, records: list[dict], record_share: float):
    """One training scene: a render of a training-split prompt or a random scene."""
    if records and rng.random() < record_share:
        record = records[int(rng.integers(len(records)))]
        try:
            return render_record(record, rng, distractors=int(rng.integers(0, 3)))
        except RuntimeError:  # no layout keeps the record's relations (at the default margin render_record raises
            pass              # so only for relations between several objects of one class): a random scene instead
    world = WORLDS[int(rng.integers(len(WORLDS)))]
    return random_scene(rng, world)


def corrupt_scene(image: np.ndarray, shape: np.ndarray, color: np.ndarray, scene, rng, share: float,
                  model_config) -> None:
    """In place: things generated images show that are *not* objects of the world, labelled as none.

    - two-tone objects: an object (chance ``share`` each) gets a second color on one side of a
      random line through its centre; its pixels keep their colors' labels but no shape label
      (the world's objects are one-colored);
    - specks: 0-2 blobs of 1-3 pixels in free space, colored, with no shape label (the
      world's objects are at least 5 pixels).
    """
    colors = model_config.colors
    palette = {name: np.array(PALETTE[name], dtype=np.uint8) for name in colors}
    for obj in scene.objects:
        if rng.random() >= share:
            continue
        x0, y0, x1, y1 = obj.bbox
        mask = obj.mask()
        yy, xx = np.mgrid[y0:y1, x0:x1]
        angle = rng.uniform(0, np.pi)
        side = ((xx - (x0 + x1) / 2) * np.cos(angle) + (yy - (y0 + y1) / 2) * np.sin(angle)) > 0
        other = colors[int(rng.integers(len(colors)))]
        if other == obj.color:
            other = colors[(colors.index(other) + 1) % len(colors)]
        region = mask & side
        image[y0:y1, x0:x1][region] = palette[other]
        color[y0:y1, x0:x1][region] = 1 + colors.index(other)
        shape[y0:y1, x0:x1][mask] = 0
    size = image.shape[0]
    for _ in range(int(rng.integers(0, 3))):
        r = int(rng.integers(1, 4))
        y, x = (int(v) for v in rng.integers(1, size - r - 1, size=2))
        if (color[y - 1:y + r + 1, x - 1:x + r + 1] == 0).all():
            name = colors[int(rng.integers(len(colors)))]
            image[y:y + r, x:x + r] = palette[name]
            color[y:y + r, x:x + r] = 1 + colors.index(name)


MORPHABLE = ("circle", "square", "diamond")


def superellipse_mask(exponent: float, width: int, height: int) -> np.ndarray:
    """``|2u|^p + |2v|^p <= 1`` in the frame's normalized coordinates: p = 1 a diamond, 2 a circle, large a square."""
    u = np.abs((np.arange(width) + 0.5) / width - 0.5) * 2
    v = np.abs((np.arange(height) + 0.5) / height - 0.5) * 2
    uu, vv = np.meshgrid(u, v)
    return uu ** exponent + vv ** exponent <= 1.0 + 1e-9


def morph_scene(image: np.ndarray, shape: np.ndarray, color: np.ndarray, scene, rng, share: float,
                model_config, min_iou: float) -> None:
    """In place: circles, squares and diamonds (chance ``share`` each) redrawn as a shape between them.

    The object becomes a superellipse of random exponent in its own box (rounded squares,
    squarish circles, bulging diamonds: the in-between outlines generated images draw). Its
    shape label is the world shape the new outline overlaps best (intersection over union
    against each shape drawn in the same box), or none when that overlap is below
    ``min_iou``: the geometry of the renderer's own shapes decides, nothing else.
    """
    for obj in scene.objects:
        if obj.shape not in MORPHABLE or rng.random() >= share:
            continue
        x0, y0, x1, y1 = obj.bbox
        w, h = x1 - x0, y1 - y0
        if min(w, h) < 4:
            continue
        old = obj.mask()
        new = superellipse_mask(float(np.exp(rng.uniform(np.log(0.8), np.log(8.0)))), w, h)
        ious = {}
        for name in MORPHABLE:
            ref = shape_mask(name, w, h)
            ious[name] = float((ref & new).sum()) / float((ref | new).sum())
        best = max(ious, key=ious.get)
        region_img, region_shape, region_color = image[y0:y1, x0:x1], shape[y0:y1, x0:x1], color[y0:y1, x0:x1]
        fill_color = region_color[old][0] if old.any() else 0
        region_img[old] = scene.background
        region_color[old] = 0
        region_shape[old] = 0
        region_img[new] = PALETTE[obj.color]
        region_color[new] = fill_color
        if ious[best] >= min_iou and best in model_config.shapes:
            region_shape[_erode(new, model_config.core_radius)] = 1 + model_config.shapes.index(best)


def render_batch(rng, records, n, record_share, model_config, corrupt: float = 0.0, morph: float = 0.0,
                 morph_min_iou: float = 0.7):
    images, shapes, colors = [], [], []
    for _ in range(n):
        scene = sample_scene(rng, records, record_share)
        s, c = scene_targets(scene, model_config)
        image = scene.render()
        if morph > 0:
            morph_scene(image, s, c, scene, rng, morph, model_config, morph_min_iou)
        if corrupt > 0:
            corrupt_scene(image, s, c, scene, rng, corrupt, model_config)
        images.append(image)
        shapes.append(s)
        colors.append(c)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return x, torch.from_numpy(np.stack(shapes)), torch.from_numpy(np.stack(colors))


@torch.no_grad()
def build_vae_pool(cfg: TrainConfig, rng, records, model_config):
    """Renders passed through the backbone's VAE with noisy latents (images, shape and color targets)."""
    if cfg.vae_pool == 0 or cfg.vae_share == 0:
        return None
    from diffusers import AutoencoderKL

    from xlard.backbones.diffusers_backbone import diffusers_load_kwargs

    folder = shapes_backbone.backbone_path(cfg.backbone or None)
    vae = AutoencoderKL.from_pretrained(str(folder / "vae"), **diffusers_load_kwargs(torch.float32)).eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    xs, ss, cs = [], [], []
    for start in range(0, cfg.vae_pool, 64):
        n = min(64, cfg.vae_pool - start)
        x, s, c = render_batch(rng, records, n, cfg.record_share, model_config, cfg.corrupt)
        z = vae.encode(x * 2 - 1).latent_dist.mode()
        # Noise scaled per image to a random share of the latents' own spread: from clean
        # round trips to visibly smeared ones.
        strength = torch.rand(n, 1, 1, 1, generator=gen) * cfg.vae_noise
        z = z + strength * z.std(dim=(1, 2, 3), keepdim=True) * torch.randn(z.shape, generator=gen)
        xs.append((vae.decode(z).sample.clamp(-1, 1) + 1) / 2)
        ss.append(s)
        cs.append(c)
        print(f"vae pool: {start + n}/{cfg.vae_pool}", file=sys.stderr, flush=True)
    return torch.cat(xs), torch.cat(ss), torch.cat(cs)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image with its own sigma (a 5x5 separable Gaussian; sigma 0 leaves it unchanged)."""
    r = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-r[None] ** 2 / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
    k = k / k.sum(1, keepdim=True)  # [B, 5]
    b, c, h, w = x.shape
    y = F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="replicate")
    kx = k.repeat_interleave(c, 0).view(b * c, 1, 1, 5)
    ky = k.repeat_interleave(c, 0).view(b * c, 1, 5, 1)
    y = F.conv2d(F.conv2d(y, kx, groups=b * c), ky, groups=b * c)
    return y.view(b, c, h, w)


def augment(x, s, c, gen: torch.Generator):
    """Flip (horizontal only: triangles point up), blur, noise, color gain and offset."""
    b = x.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    s = torch.where(flip[:, None, None], s.flip(-1), s)
    c = torch.where(flip[:, None, None], c.flip(-1), c)
    sigma = torch.rand(b, generator=gen) * 1.0 * (torch.rand(b, generator=gen) < 0.5)
    x = gaussian_blur(x, sigma)
    x = x + torch.randn(x.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * 0.04
    gain = 1 + (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.16
    offset = (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.08
    return (x * gain + offset).clamp(0, 1), s, c


def random_crop(x, s, c, size: int, gen: torch.Generator):
    """A random ``size`` x ``size`` window of every image (and its targets); the model is fully
    convolutional, so training on crops costs less and changes nothing at full size."""
    if size == 0 or size >= x.shape[-1]:
        return x, s, c
    offsets = torch.randint(0, x.shape[-1] - size + 1, (x.shape[0], 2), generator=gen).tolist()
    xs = torch.stack([x[i, :, a:a + size, b:b + size] for i, (a, b) in enumerate(offsets)])
    ss = torch.stack([s[i, a:a + size, b:b + size] for i, (a, b) in enumerate(offsets)])
    cs = torch.stack([c[i, a:a + size, b:b + size] for i, (a, b) in enumerate(offsets)])
    return xs, ss, cs


def lr_at(step: int, cfg: TrainConfig, elapsed: float = 0.0) -> float:
    """Warmup, then a cosine over the run's progress: the larger of the share of steps and of
    ``--minutes`` done, so a run stopped by its time budget still ends at the low learning rate."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = min(1.0, max((step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps),
                     elapsed / (cfg.minutes * 60)))
    return cfg.lr * (cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * t)))


def save_checkpoint(path: Path, model, opt, step, rng, gen, cfg, elapsed):
    from xlard import _io

    with _io.atomic_path(path, owner="train_shapes_understanding checkpoint", make_parents=True) as tmp:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "numpy_rng": rng.bit_generator.state, "torch_gen": gen.get_state(),
                    "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                    "config": dataclasses.asdict(cfg), "elapsed": elapsed}, tmp)


#: Settings a resumed run may change: where it writes, how it logs and checkpoints, its threads and its budget
#: (the learning rate then follows the new budget); any other change would make a different model.
RESUMABLE = ("out", "work_dir", "threads", "log_every", "checkpoint_minutes", "minutes", "max_steps")


def resume_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """``--flag: saved -> now`` for every setting of ``cfg`` that differs from a checkpoint's and may not."""
    now = dataclasses.asdict(cfg)
    return [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if k not in RESUMABLE and _plain(saved.get(k)) != _plain(now.get(k))]


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def train(cfg: TrainConfig, quiet: bool = False) -> dict:
    """Run (or resume) training and export the weights; returns the training info."""
    from xlard import _io

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"config: {json.dumps(dataclasses.asdict(cfg))}", file=sys.stderr, flush=True)
    model_config = UnderstandingConfig(channels=cfg.channels, core_radius=cfg.core_radius)
    model = ShapesUnderstanding(model_config)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    records = make_splits(PromptConfig(), seed=SPLIT_SEED)["train"]  # training split only
    ckpt_path = work / "checkpoint.pt"
    step, elapsed = 0, 0.0
    ck = None
    if ckpt_path.exists():  # checked before the VAE pool is built (minutes): a refusal comes at once
        try:
            ck = torch.load(ckpt_path, weights_only=False)
        except Exception as exc:  # noqa: BLE001 - torch's zip reader and unpickler raise many kinds
            from xlard._args import short_reason

            raise ValueError(f"--work-dir: {ckpt_path} cannot be read ({short_reason(exc, 160)}): it is damaged; "
                             "delete it to start the run over, or give another --work-dir") from None
        if not isinstance(ck, dict) or not all(k in ck for k in ("config", "model", "opt", "step")):
            raise ValueError(f"--work-dir: {ckpt_path} is not a checkpoint of this script; give another --work-dir")
        differ = resume_differences(ck["config"], cfg)
        if differ:
            raise ValueError(f"--work-dir: {ckpt_path} was written with other settings ({'; '.join(differ)}); "
                             "rerun with those to continue it, or give another --work-dir")
        budget = [k for k in ("max_steps", "minutes") if ck["config"].get(k) != getattr(cfg, k)]
        if budget:
            print(f"note: {', '.join('--' + k.replace('_', '-') for k in budget)} changed: the learning rate "
                  "follows the new budget from here", file=sys.stderr, flush=True)
    t_setup = time.time()
    pool = build_vae_pool(cfg, np.random.default_rng(cfg.seed + 7), records, model_config)
    setup_seconds = time.time() - t_setup
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, elapsed = ck["step"], ck["elapsed"]
        rng.bit_generator.state = ck["numpy_rng"]
        gen.set_state(ck["torch_gen"])
        torch.set_rng_state(ck["torch_rng"])
        random.setstate(ck["python_rng"])
        print(f"resumed at step {step} ({elapsed / 60:.1f} min)", file=sys.stderr, flush=True)
        # the rows logged after this checkpoint are logged again by the replay: the first copies go
        _io.trim_jsonl(work / "metrics.jsonl", lambda row: row.get("step", 0) <= step, owner="--work-dir")
    else:
        elapsed = setup_seconds  # --minutes budgets the whole run, the VAE pool included
    metrics = open(work / "metrics.jsonl", "a")
    t0 = time.time() - elapsed
    last_ckpt = time.time()
    model.train()
    while step < cfg.max_steps and (time.time() - t0) < cfg.minutes * 60:
        n_pool = int(round(cfg.batch_size * cfg.vae_share)) if pool is not None else 0
        x, s, c = render_batch(rng, records, cfg.batch_size - n_pool, cfg.record_share, model_config, cfg.corrupt,
                               cfg.morph, cfg.morph_min_iou)
        if n_pool:
            idx = torch.randint(len(pool[0]), (n_pool,), generator=gen)
            x, s, c = torch.cat((x, pool[0][idx])), torch.cat((s, pool[1][idx])), torch.cat((c, pool[2][idx]))
        x, s, c = random_crop(*augment(x, s, c, gen), cfg.crop, gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg, time.time() - t0)
        shape_logits, color_logits = model(x)
        shape_loss = F.cross_entropy(shape_logits, s)
        color_loss = F.cross_entropy(color_logits, c)
        loss = shape_loss + color_loss
        if not torch.isfinite(loss):  # diverged: nothing after this step is worth exporting (it wrote NaN weights)
            raise ValueError(f"training diverged at step {step + 1} (loss {loss.item()}); lower --lr (now {cfg.lr:g}) "
                             f"and start again with another --work-dir (the last checkpoint there is from before)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            with torch.no_grad():
                fg = s > 0
                core_acc = (shape_logits.argmax(1)[fg] == s[fg]).float().mean().item() if fg.any() else float("nan")
            row = {"step": step, "minutes": (time.time() - t0) / 60, "loss": loss.item(),
                   "shape_loss": shape_loss.item(), "color_loss": color_loss.item(), "core_accuracy": core_acc,
                   "lr": opt.param_groups[0]["lr"]}
            metrics.write(_io.dumps(row) + "\n")
            metrics.flush()
            if not quiet:
                print(f"step {step}/{cfg.max_steps} {row['minutes']:.1f} min loss {row['loss']:.4f} "
                      f"(shape {row['shape_loss']:.4f}, color {row['color_loss']:.4f}) core acc {core_acc:.3f}",
                      file=sys.stderr, flush=True)
        if time.time() - last_ckpt > cfg.checkpoint_minutes * 60:
            save_checkpoint(ckpt_path, model, opt, step, rng, gen, cfg, time.time() - t0)
            last_ckpt = time.time()
    train_minutes = (time.time() - t0) / 60
    save_checkpoint(ckpt_path, model, opt, step, rng, gen, cfg, time.time() - t0)
    metrics.close()
    info = {"config": dataclasses.asdict(cfg), "steps": step, "train_minutes": round(train_minutes, 2),
            "vae_pool_minutes": round(setup_seconds / 60, 2), "torch": torch.__version__, "threads": cfg.threads,
            "parameters": sum(p.numel() for p in model.parameters()), "split_seed": SPLIT_SEED,
            "weights_dtype": "float16"}
    model.save_pretrained(cfg.out, extra={"training": info})
    size = sum(p.stat().st_size for p in Path(cfg.out).iterdir() if p.is_file())
    info["weights_bytes"] = size
    print(f"wrote {cfg.out} ({size / 1e6:.2f} MB) after {step} steps, {train_minutes:.1f} min",
          file=sys.stderr, flush=True)
    return info


#: What each option means (``--help``).
HELP = {
    "out": "where the trained model goes (a folder; required: xlard/data/shapes_understanding installs it as the "
           "shipped model, replacing that folder)",
    "work_dir": "checkpoints and metrics.jsonl; rerunning with the same --work-dir continues the run",
    "seed": "random seed of the scenes, the augmentations and the initial weights",
    "max_steps": "training steps at most",
    "minutes": "wall-clock budget of the whole run (the VAE pool included); training stops when it is spent",
    "batch_size": "rendered scenes per step",
    "lr": "AdamW's peak learning rate, in (0, 1]",
    "warmup_steps": "linear warmup steps",
    "final_lr_fraction": "the cosine's end, as a share of --lr (reached at --max-steps or --minutes, whichever comes "
                         "first)",
    "weight_decay": "AdamW's weight decay",
    "vae_pool": "renders passed through the backbone's VAE once, before training (0: none)",
    "vae_share": "share of each batch drawn from the VAE pool, in [0, 1]",
    "vae_noise": "largest latent noise (a random share of it per image, times the latents' std) before the VAE "
                 "decodes a pool image",
    "record_share": "share of scenes laid out from training-split records (the rest: random scenes)",
    "crop": "random square crops of this size (0: whole 64 x 64 images; else 16..64)",
    "corrupt": "share of scenes with unlabelled two-tone objects and specks, in [0, 1]",
    "morph": "share of objects drawn as in-between outlines, in [0, 1]",
    "morph_min_iou": "an in-between outline keeps the label of the shape it overlaps best only at this IoU or more",
    "channels": "the U-Net's four widths (full resolution, 1/2, 1/4, 1/8)",
    "core_radius": "pixels eroded off each object's mask for its shape target",
    "checkpoint_minutes": "minutes between checkpoints (0: every step)",
    "log_every": "steps between metrics rows",
    "threads": "torch threads (1..1024)",
    "backbone": "the shapes backbone folder for the VAE pool (empty: the installed one)",
}
assert set(HELP) == {f.name for f in dataclasses.fields(TrainConfig)}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.name == "out":  # no default: a plain run from the checkout replaced the shipped weights
            parser.add_argument(flag, required=True, help=HELP[f.name])
        elif isinstance(value, tuple):
            parser.add_argument(flag, type=int, nargs="+", default=list(value),
                                help=f"{HELP[f.name]} (default: {' '.join(map(str, value))})")
        else:
            parser.add_argument(flag, type=type(value), default=value, help=f"{HELP[f.name]} (default: {value!r})")
    args = vars(parser.parse_args(argv))
    args["channels"] = tuple(args["channels"])
    try:
        cfg = TrainConfig(**args)
    except ValueError as err:
        parser.error(str(err))
        raise
    from xlard import _io

    problem = _io.unwritable_output(folders={"--out": cfg.out, "--work-dir": cfg.work_dir})  # before training
    if problem:
        parser.error(problem)
    model, work = ("model.safetensors", "config.json"), ("checkpoint.pt", "metrics.jsonl")
    same = Path(cfg.out).resolve() == Path(cfg.work_dir).resolve()
    try:  # a corrector's or a training run's folder lost its weights, config or metrics to this script's
        _io.claim_folder(cfg.out, "--out", model + (work if same else ()), ("core_radius",))
        _io.claim_folder(cfg.work_dir, "--work-dir", work + (model if same else ()), ("core_radius",))
    except ValueError as err:
        parser.error(str(err))
    return cfg


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    from xlard import _io

    with _io.folder_lock(cfg.work_dir, "--work-dir"):  # one run per work dir (two interleaved their metrics)
        # a checkpoint write killed mid-way (SIGKILL) left its temporary behind for good, one per kill
        _io.remove_temporaries(cfg.work_dir)
        train(cfg)
    return 0


if __name__ == "__main__":
    from xlard._signals import run_script

    raise SystemExit(run_script("train_shapes_understanding.py", main,
                                " (rerun the same command to continue from the last checkpoint)"))
