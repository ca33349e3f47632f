#!/usr/bin/env python
"""Train xlard's tiny shapes-world text-to-image backbone from scratch on a CPU.

The result is a genuine diffusers ``StableDiffusionPipeline`` (a CLIP
byte-level BPE tokenizer trained on the world's prompts, every world word one
token; a small ``CLIPTextModel``, an ``AutoencoderKL`` with
downsampling x4, a ``UNet2DConditionModel`` with cross-attention and a
DPM-Solver scheduler) saved with ``save_pretrained``, so the backbone adapter
that serves Stable Diffusion serves it too.

Two phases share one wall-clock budget (``--minutes``):

1. the VAE learns to reconstruct world renders (64x64, flat colors) on random
   crops (it is fully convolutional), ends early once its reconstructions of
   training-split renders satisfy the exact evaluator (``--vae-target``; the
   shipped weights chose this on held-out renders, fixed since), is checked
   once more on ground-truth renders of held-out prompts (a report), then frozen; its
   ``scaling_factor`` is set from the latent standard deviation;
2. the UNet and the text encoder learn jointly (v-prediction on a cosine
   schedule, min-SNR weighting, 10% prompt dropout for classifier-free
   guidance, AdamW, EMA) on records of the TRAIN split rendered on the fly
   with fresh seeds, so held-out prompts are never seen.

``--max-steps`` / ``--vae-max-steps`` make a phase step-driven instead: it runs
exactly that many steps (its learning-rate schedule follows the steps; the VAE
phase does not end early at ``--vae-target``) and the minutes budget is not
applied to it.

A loss that stops being finite (a learning rate too large) ends the run with an
error naming the flag, before any checkpoint or export of such weights.

Checkpoints are written atomically every ``--checkpoint-minutes`` into
``--work-dir`` and ``--resume`` continues from the last one (the budget counts
the time already spent; budgets, threads and sampling may change on resume,
any other setting is refused; a damaged checkpoint is named; with no checkpoint yet, the run starts over and
the earlier run's metrics move to ``metrics.before-resume.jsonl``). A resumed run continues from the checkpoint's
weights, optimiser and random state; it is not bit-identical to an
uninterrupted run (with step budgets its losses match the uninterrupted run's
to about 1e-3, as two fresh runs match each other, since threaded reductions
are not ordered; with minute budgets the learning rate follows the elapsed
time, so no two runs, resumed or not, take their steps at the same rates). Metrics go to ``<work-dir>/metrics.jsonl``; sample
grids (held-out prompts) to ``<work-dir>/samples/``.

Example:
    python scripts/train_shapes_backbone.py --minutes 83 --vae-minutes 25 \
        --out xlard/data/shapes_backbone --work-dir runs/shapes_backbone
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore", message=".*torchvision.*")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from xlard import _io  # noqa: E402
from xlard.shapes import (PromptConfig, evaluate, make_splits, render_record, sample_records,  # noqa: E402
                          summarize)
from xlard.shapes.prompts import NUMBER_WORDS, SPLIT_SEED, _plural  # noqa: E402
from xlard.shapes.rules import RELATIONS  # noqa: E402
from xlard.shapes.world import BACKGROUND, PALETTE, SHAPES  # noqa: E402

#: Prompts are short ("a photo of a purple triangle left of an orange diamond" is 12 tokens with BOS/EOS).
MAX_TOKENS = 16


@dataclass
class TrainConfig:
    """Everything a run depends on (printed at start, stored in checkpoints)."""

    out: str = "xlard/data/shapes_backbone"
    work_dir: str = "runs/shapes_backbone"
    seed: int = 0
    minutes: float = 83.0  # the shipped weights' budget (one run, 2-core CPU, idle)
    vae_minutes: float = 25.0  # at most; the VAE phase ends early once vae_target is reached
    vae_max_steps: int = 0
    max_steps: int = 0
    threads: int = 2
    bf16: bool = True
    # VAE
    vae_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 8
    vae_batch_size: int = 16
    vae_crop: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    object_weight: float = 4.0
    vae_target: float = 0.98
    vae_check_minutes: float = 2.5
    # text encoder + UNet
    text_dim: int = 64
    text_layers: int = 2
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_heads: int = 4
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    cfg_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.998
    # bookkeeping
    checkpoint_minutes: float = 5.0
    sample_minutes: float = 10.0
    sample_images: int = 48
    sample_steps: int = 20
    guidance: float = 5.0
    log_every: int = 10
    fp16_weights: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the first option (as its command-line flag) that no run can use."""
        def flag(name: str) -> str:
            return "--" + name.replace("_", "-")

        def number(name: str, low: float, high: float = math.inf, *, low_open: bool = False,
                   high_open: bool = False) -> None:
            value = getattr(self, name)
            ok = math.isfinite(value) and (value > low if low_open else value >= low) \
                and (value < high if high_open else value <= high)
            if not ok:
                lo, hi = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
                raise ValueError(f"{flag(name)} must be in {lo}{low:g}, {high:g}{hi}, got {value}")

        number("minutes", 0, low_open=True)
        number("vae_minutes", 0)
        if not self.vae_max_steps and self.vae_minutes >= self.minutes:  # a step-limited VAE phase has no minutes
            raise ValueError(f"--vae-minutes must be below --minutes (the VAE phase is part of the budget), "
                             f"got {self.vae_minutes} and {self.minutes}")
        for name in ("vae_lr", "lr"):  # AdamW steps of 1e30 gave NaN weights, exported with exit status 0
            number(name, 0, 1, low_open=True)
        number("min_snr_gamma", 0, low_open=True)
        # vae_check_minutes and sample_minutes 0: never; checkpoint_minutes 0: at every step
        for name in ("kl_weight", "object_weight", "guidance", "vae_check_minutes", "checkpoint_minutes",
                     "sample_minutes"):
            number(name, 0)
        number("vae_target", 0, 1, low_open=True)
        number("final_lr_fraction", 0, 1)
        number("cfg_dropout", 0, 1, high_open=True)
        number("ema_decay", 0, 1, high_open=True)
        if not 0 <= self.seed < 2 ** 64:
            raise ValueError(f"--seed must be in [0, 2**64), got {self.seed}")
        for name, note in (("vae_max_steps", " (0: no step limit)"), ("max_steps", " (0: no step limit)"),
                           ("warmup_steps", "")):
            if getattr(self, name) < 0:
                raise ValueError(f"{flag(name)} must be >= 0{note}, got {getattr(self, name)}")
        for name in ("batch_size", "vae_batch_size", "threads", "text_dim", "text_layers", "latent_channels",
                     "unet_heads", "sample_images", "sample_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        # bounds: 100000 threads crashed the tokenizers' thread pool, a batch of 10^8 hung without a word
        for name, high in (("threads", 1024), ("batch_size", 4096), ("vae_batch_size", 4096), ("text_dim", 4096),
                           ("text_layers", 64), ("latent_channels", 64), ("unet_heads", 64), ("sample_images", 10_000),
                           ("sample_steps", 1000), ("log_every", 10**7), ("vae_max_steps", 10**8),
                           ("max_steps", 10**8), ("warmup_steps", 10**8)):
            if getattr(self, name) > high:
                raise ValueError(f"{flag(name)} must be at most {high}, got {getattr(self, name)}")
        for name in ("vae_channels", "unet_channels"):
            if any(c > 2048 for c in getattr(self, name)):
                raise ValueError(f"{flag(name)} must be widths of at most 2048, got {list(getattr(self, name))}")
        if self.text_dim % 4:
            raise ValueError(f"--text-dim must be a multiple of 4 (the text encoder's 4 attention heads), "
                             f"got {self.text_dim}")
        for name in ("vae_channels", "unet_channels"):
            channels = getattr(self, name)
            if len(channels) != 3:
                raise ValueError(f"{flag(name)} must have 3 levels, got {list(channels)}")
            if any(c < 8 or c % 8 for c in channels):
                raise ValueError(f"{flag(name)} must be multiples of 8 (GroupNorm's 8 groups), got {list(channels)}")
        if any(c % self.unet_heads for c in self.unet_channels):
            raise ValueError(f"--unet-channels must be multiples of --unet-heads ({self.unet_heads}), "
                             f"got {list(self.unet_channels)}")
        if self.vae_crop not in (16, 32, 48, 64):
            raise ValueError(f"--vae-crop must be 16, 32, 48 or 64, got {self.vae_crop}")


# ---------------------------------------------------------------------------------------------
# Components


def world_words() -> list[str]:
    """Every word a shapes-world prompt can use."""
    words = ["a", "an", "the", "photo", "of", "and"]
    words += list(SHAPES) + [_plural(s) for s in SHAPES] + list(PALETTE)
    words += list(NUMBER_WORDS.values())
    for rel in RELATIONS:
        words += rel.split()
    return sorted(set(words))


def build_tokenizer(folder: Path):
    """A CLIP byte-level BPE tokenizer in which every world word is one token."""
    import transformers
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    words = world_words()
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    # CLIP's own pre-tokenization, so that CLIPTokenizer reproduces these merges.
    split = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  end_of_word_suffix="</w>", initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([" ".join(words)] * 8, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(folder))
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                           model_max_length=MAX_TOKENS)
    for w in words:
        ids = tokenizer(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"world word {w!r} is split into {len(ids)} tokens by the built tokenizer")
    return tokenizer


def build_text_encoder(cfg: TrainConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=cfg.text_dim, intermediate_size=2 * cfg.text_dim,
                            num_hidden_layers=cfg.text_layers, num_attention_heads=4,
                            max_position_embeddings=MAX_TOKENS, projection_dim=cfg.text_dim,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(config)


def build_vae(cfg: TrainConfig):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=tuple(cfg.vae_channels), layers_per_block=1, norm_num_groups=8,
                         sample_size=64, mid_block_add_attention=False)


def build_unet(cfg: TrainConfig):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels, layers_per_block=1,
        block_out_channels=tuple(cfg.unet_channels), norm_num_groups=8, attention_head_dim=cfg.unet_heads,
        cross_attention_dim=cfg.text_dim,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )


SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


def build_train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULE, clip_sample=False)


def build_sample_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**SCHEDULE, timestep_spacing="trailing", steps_offset=1)


def make_pipeline(vae, text_encoder, tokenizer, unet):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_sample_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


# ---------------------------------------------------------------------------------------------
# Data


class SceneStream:
    """Balanced TRAIN-split records rendered with fresh seeds, as ``[-1, 1]`` tensors."""

    def __init__(self, records: list[dict], rng: np.random.Generator):
        self.records = records
        self.rng = rng

    def batch(self, n: int) -> tuple[torch.Tensor, list[str]]:
        images, prompts = [], []
        while len(images) < n:
            for rec in sample_records(self.records, n - len(images), self.rng):
                try:
                    images.append(render_record(rec, self.rng).render())
                except RuntimeError:  # a rare layout failure: draw another record
                    continue
                prompts.append(rec["prompt"])
        return to_tensor(np.stack(images)), prompts


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def random_crops(images: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    if size >= images.shape[-1]:
        return images
    out = []
    for img in images:
        y, x = (int(v) for v in rng.integers(0, images.shape[-1] - size + 1, size=2))
        out.append(img[:, y:y + size, x:x + size])
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# Bookkeeping


class Log:
    """JSONL metrics plus a one-line console summary."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **row) -> None:
        with open(self.path, "a") as f:
            f.write(_io.dumps(row) + "\n")


def atomic_save(obj, path: Path) -> None:
    with _io.atomic_path(path, owner="train_shapes_backbone", make_parents=True) as tmp:
        torch.save(obj, tmp)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm.detach(), 1.0 - decay)


def save_grid(images: np.ndarray, path: Path, columns: int = 8, scale: int = 2) -> None:
    from PIL import Image

    n, h, w, _ = images.shape
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + 2), columns * (w + 2), 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = img
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


# ---------------------------------------------------------------------------------------------
# Training


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.work = Path(cfg.work_dir)
        self.ckpt_path = self.work / "checkpoint.pt"
        self.log = Log(self.work / "metrics.jsonl")
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        splits = make_splits(PromptConfig(), seed=SPLIT_SEED)
        self.train_records, self.heldout = splits["train"], splits["heldout"]
        self.stream = SceneStream(self.train_records, self.rng)
        self.tokenizer = build_tokenizer(self.work / "tokenizer_src")
        self.text_encoder = build_text_encoder(cfg, self.tokenizer)
        self.vae = build_vae(cfg)
        self.unet = build_unet(cfg)
        self.ema_text = copy.deepcopy(self.text_encoder).requires_grad_(False)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.noise_scheduler = build_train_scheduler()
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
        self.phase = "vae"
        self.vae_step = 0
        self.step = 0
        self.elapsed = 0.0
        self.vae_seconds = 0.0
        self.vae_check: dict | None = None
        self.samples_done = 0
        self.start = time.time()
        self.last_ckpt = self.start
        self.last_sample = self.start

    # -- time and checkpoints ------------------------------------------------------------------
    def now(self) -> float:
        return time.time() - self.start

    def state(self) -> dict:
        return {"config": dataclasses.asdict(self.cfg), "phase": self.phase, "vae_step": self.vae_step,
                "step": self.step, "elapsed": self.now(), "vae_seconds": self.vae_seconds,
                "vae_check": self.vae_check, "samples_done": self.samples_done,
                "vae": self.vae.state_dict(), "unet": self.unet.state_dict(),
                "text_encoder": self.text_encoder.state_dict(), "ema_unet": self.ema_unet.state_dict(),
                "ema_text": self.ema_text.state_dict(), "vae_opt": self.vae_opt.state_dict(),
                "opt": self.opt.state_dict(), "scaling_factor": self.vae.config.scaling_factor,
                "numpy_rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state()}

    def _check_finite(self, loss: torch.Tensor, flag: str, where: str) -> None:
        """A loss that is no longer finite stops the run before the step (its weights would be NaN from here, and
        were checkpointed and exported as if trained, with exit status 0)."""
        if not bool(torch.isfinite(loss)):
            raise ValueError(f"{flag}: the training loss became {float(loss.detach())} at {where}: a learning rate "
                             "too large for these weights (or another setting that diverges); nothing was exported"
                             f"{self._kept()}: rerun with a smaller {flag} in another --work-dir")

    def _kept(self) -> str:
        return (f", and the checkpoint in {self.work} holds the last finite weights" if self.ckpt_path.is_file()
                else ", and no checkpoint was written")

    def checkpoint(self) -> None:
        bad = [name for name in ("vae", "unet", "text_encoder", "ema_unet", "ema_text")
               if not all(bool(torch.isfinite(p).all()) for p in getattr(self, name).parameters())]
        if bad:  # a step made the weights non-finite although its loss was finite: keep the last good checkpoint
            raise ValueError(f"--lr/--vae-lr: the {', '.join(bad)} weights are no longer finite (step {self.step}, "
                             f"VAE step {self.vae_step}); nothing was exported{self._kept()}: rerun with a smaller "
                             "learning rate in another --work-dir")
        atomic_save(self.state(), self.ckpt_path)
        self.last_ckpt = time.time()
        self.log.write(event="checkpoint", phase=self.phase, step=self.step, vae_step=self.vae_step,
                       elapsed=round(self.now(), 1))

    _CHECKPOINT_KEYS = ("config", "phase", "step", "vae_step", "elapsed", "vae_seconds", "vae_check", "samples_done",
                        "vae", "unet", "text_encoder", "ema_unet", "ema_text", "vae_opt", "opt", "scaling_factor",
                        "numpy_rng", "torch_rng")

    def resume(self) -> bool:
        if not self.ckpt_path.is_file():
            note = ""
            if self.log.path.is_file() and self.log.path.stat().st_size:
                # a run stopped before its first checkpoint: its rows went on in the new run's log, two runs mixed
                aside, k = self.log.path.with_name("metrics.before-resume.jsonl"), 1
                while aside.exists():
                    aside, k = self.log.path.with_name(f"metrics.before-resume.{k}.jsonl"), k + 1
                _io.atomic_write_bytes(aside, self.log.path.read_bytes(), owner="--work-dir")
                self.log.path.unlink()
                note = f" (the earlier run wrote no checkpoint; its metrics moved to {aside.name})"
            print(f"[resume] no checkpoint at {self.ckpt_path}; starting fresh{note}", flush=True)
            return False
        try:
            st = torch.load(self.ckpt_path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - torch's zip reader and unpickler raise many kinds
            from xlard._args import short_reason

            raise ValueError(f"--resume: {self.ckpt_path} cannot be read ({short_reason(exc, 160)}): it is damaged; "
                             "delete it to start the run over, or give another --work-dir") from None
        missing = [k for k in self._CHECKPOINT_KEYS if k not in st] if isinstance(st, dict) else None
        if missing is None or missing or not isinstance(st.get("config"), dict):
            what = f"it has no {', '.join(missing)}" if missing else "it holds no settings of this script"
            raise ValueError(f"--resume: {self.ckpt_path} is not a complete checkpoint of this script ({what}); "
                             "delete it to start the run over, or give another --work-dir")
        # Budgets, bookkeeping and the export may change on --resume; anything else would train another model
        # on top of this one (another architecture failed in load_state_dict; another --lr or --seed was taken
        # silently and recorded as if the whole run had used it).
        free = {"out", "work_dir", "minutes", "vae_minutes", "max_steps", "vae_max_steps", "threads",
                "checkpoint_minutes", "sample_minutes", "sample_images", "sample_steps", "log_every", "fp16_weights",
                "guidance", "vae_check_minutes"}
        saved, now = st.get("config", {}), json.loads(json.dumps(dataclasses.asdict(self.cfg)))
        saved = json.loads(json.dumps(saved))
        differ = sorted(k for k in set(saved) | set(now) if k not in free and saved.get(k) != now.get(k))
        if differ:
            flags = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} -> {now.get(k)!r}" for k in differ)
            raise ValueError(f"--resume: the checkpoint in {self.work} was written with other settings ({flags}); "
                             "resume with the same options (budgets, threads and sampling may change), or "
                             "choose another --work-dir")
        for name in ("vae", "unet", "text_encoder", "ema_unet", "ema_text"):
            getattr(self, name).load_state_dict(st[name])
        self.vae_opt.load_state_dict(st["vae_opt"])
        self.opt.load_state_dict(st["opt"])
        self.vae.register_to_config(scaling_factor=st["scaling_factor"])
        self.phase, self.vae_step, self.step = st["phase"], st["vae_step"], st["step"]
        if self.phase != "vae":  # frozen at the end of its phase, which a resumed run does not pass again
            self.vae.eval().requires_grad_(False)
        self.vae_seconds, self.vae_check = st["vae_seconds"], st["vae_check"]
        self.samples_done = st["samples_done"]
        self.rng.bit_generator.state = st["numpy_rng"]
        torch.set_rng_state(st["torch_rng"])
        self.start = time.time() - st["elapsed"]
        self.last_ckpt = self.last_sample = time.time()
        # the rows logged after this checkpoint are logged again by the replay: cut the log after its record
        _io.trim_jsonl(self.log.path, lambda row: row.get("event") == "checkpoint" and row.get("phase") == self.phase
                       and row.get("step") == self.step and row.get("vae_step") == self.vae_step, owner="--work-dir")
        print(f"[resume] phase={self.phase} vae_step={self.vae_step} step={self.step} "
              f"elapsed={st['elapsed'] / 60:.1f} min", flush=True)
        return True

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16)

    # -- phase 1: VAE --------------------------------------------------------------------------
    def train_vae(self) -> None:
        from tqdm import tqdm

        cfg = self.cfg
        budget = cfg.vae_minutes * 60
        self.vae.train()
        bar = tqdm(desc="vae", unit="step", initial=self.vae_step, dynamic_ncols=True)
        phase_start = self.now() - self.vae_seconds
        last_check = time.time()
        while True:
            if cfg.vae_max_steps and self.vae_step >= cfg.vae_max_steps:
                break
            if not cfg.vae_max_steps and self.now() - phase_start >= budget:
                break
            images, _ = self.stream.batch(cfg.vae_batch_size)
            x = random_crops(images, cfg.vae_crop, self.rng)
            # The posterior mean, not a sample: with the KL weight this small the latents are
            # near-deterministic anyway, and sampling early on (log-variance ~ 0) drowns the signal.
            with self.autocast():
                posterior = self.vae.encode(x).latent_dist
                recon = self.vae.decode(posterior.mode()).sample
            recon = recon.float()
            # Objects are a small share of the pixels; weight them up so colors and edges are learned first.
            background = to_tensor(np.array(BACKGROUND, dtype=np.uint8).reshape(1, 1, 1, 3))
            weight = 1.0 + cfg.object_weight * ((x - background).abs().amax(dim=1, keepdim=True) > 0.02).float()
            err = recon - x
            rec_loss = (weight * (err.abs() + err.pow(2))).mean() / weight.mean()
            kl = posterior.kl().mean() / x[0].numel()
            loss = rec_loss + cfg.kl_weight * kl
            self._check_finite(loss, "--vae-lr", f"VAE step {self.vae_step + 1}")
            frac = self.vae_step / cfg.vae_max_steps if cfg.vae_max_steps else self.vae_seconds / max(budget, 1.0)
            for group in self.vae_opt.param_groups:
                # Cosine decay to 10%: a large step size keeps edges and colors from settling.
                group["lr"] = cfg.vae_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0))))
            self.vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
            self.vae_opt.step()
            self.vae_step += 1
            self.vae_seconds = self.now() - phase_start
            bar.update(1)
            if self.vae_step % cfg.log_every == 0:
                bar.set_postfix(rec=f"{rec_loss.item():.4f}")
                self.log.write(phase="vae", step=self.vae_step, rec_loss=rec_loss.item(), kl=kl.item(),
                               elapsed=round(self.now(), 1))
            if time.time() - self.last_ckpt >= cfg.checkpoint_minutes * 60:
                self.checkpoint()
            if cfg.vae_check_minutes > 0 and time.time() - last_check >= cfg.vae_check_minutes * 60:
                self.vae.eval()
                quick = self.check_vae(48, split="train")
                self.vae.train()
                last_check = time.time()
                self.log.write(event="vae_check", step=self.vae_step, elapsed=round(self.now(), 1), **quick)
                print(f"\n[vae] step {self.vae_step}: {quick}", flush=True)
                if quick["recon_accuracy"] >= cfg.vae_target and not cfg.vae_max_steps:  # a step limit runs them all
                    break
        bar.close()
        self.vae.eval().requires_grad_(False)
        self.vae_check = self.check_vae()
        scale = self.latent_scale()
        self.vae.register_to_config(scaling_factor=scale)
        self.log.write(event="vae_done", vae_steps=self.vae_step, minutes=round(self.vae_seconds / 60, 2),
                       scaling_factor=scale, **self.vae_check)
        print(f"[vae] {self.vae_step} steps in {self.vae_seconds / 60:.1f} min; reconstruction keeps "
              f"{self.vae_check['recon_accuracy']:.3f} of ground-truth renders correct "
              f"(mean abs error {self.vae_check['recon_mae']:.2f}/255); scaling_factor={scale:.4f}", flush=True)
        self.phase = "unet"
        self.checkpoint()

    @torch.no_grad()
    def check_vae(self, n: int = 96, split: str = "heldout") -> dict:
        """decode(encode(x)) on ground-truth renders of ``split``'s records, judged by the exact evaluator (the
        in-phase checks that may end the VAE phase read the training split: a choice is never made on held-out
        records; the final check, a report, reads the held-out split)."""
        records = sample_records(self.heldout if split == "heldout" else self.train_records, n, seed=1234)
        images = np.stack([render_record(r, seed=5000 + i).render() for i, r in enumerate(records)])
        recon = []
        for i in range(0, n, 32):
            x = to_tensor(images[i:i + 32])
            recon.append(to_uint8(self.vae.decode(self.vae.encode(x).latent_dist.mode()).sample))
        recon = np.concatenate(recon)
        summary = summarize(evaluate(list(recon), records))
        mae = float(np.abs(recon.astype(np.float32) - images.astype(np.float32)).mean())
        return {"recon_accuracy": summary["correct"] / summary["total"], "recon_mae": mae}

    @torch.no_grad()
    def latent_scale(self, n: int = 256) -> float:
        images, _ = SceneStream(self.train_records, np.random.default_rng(99)).batch(n)
        lat = torch.cat([self.vae.encode(images[i:i + 64]).latent_dist.mode() for i in range(0, n, 64)])
        return float(1.0 / lat.std())

    # -- phase 2: text encoder + UNet ----------------------------------------------------------
    def lr_at(self) -> float:
        cfg = self.cfg
        warm = min(1.0, (self.step + 1) / max(1, cfg.warmup_steps))
        if cfg.max_steps:
            frac = self.step / cfg.max_steps
        else:
            unet_budget = cfg.minutes * 60 - self.vae_seconds
            frac = (self.now() - self.vae_seconds) / max(1.0, unet_budget)
        frac = min(max(frac, 0.0), 1.0)
        decay = cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * frac))
        return cfg.lr * warm * decay

    def encode_prompts(self, prompts: list[str], model) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                             return_tensors="pt").input_ids
        return model(ids)[0]

    def train_unet(self) -> None:
        from tqdm import tqdm

        cfg = self.cfg
        sched = self.noise_scheduler
        alphas = sched.alphas_cumprod
        snr_all = alphas / (1 - alphas)
        self.unet.train()
        self.text_encoder.train()
        bar = tqdm(desc="unet", unit="step", initial=self.step, dynamic_ncols=True)
        while True:
            if cfg.max_steps and self.step >= cfg.max_steps:
                break
            if not cfg.max_steps and self.now() >= cfg.minutes * 60:
                break
            images, prompts = self.stream.batch(cfg.batch_size)
            drop = self.rng.random(len(prompts)) < cfg.cfg_dropout
            prompts = ["" if d else p for p, d in zip(prompts, drop)]
            with torch.no_grad(), self.autocast():
                latents = self.vae.encode(images).latent_dist.mode().float() * self.vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],))
            noisy = sched.add_noise(latents, noise, t)
            target = sched.get_velocity(latents, noise, t)
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at()
            with self.autocast():
                cond = self.encode_prompts(prompts, self.text_encoder)
                pred = self.unet(noisy, t, cond).sample
            per_sample = (pred.float() - target).pow(2).mean(dim=(1, 2, 3))
            snr = snr_all[t]
            weight = torch.clamp(snr, max=cfg.min_snr_gamma) / (snr + 1)  # min-SNR for v-prediction
            loss = (weight * per_sample).mean()
            self._check_finite(loss, "--lr", f"UNet step {self.step + 1}")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            grad = torch.nn.utils.clip_grad_norm_(list(self.unet.parameters()) + list(self.text_encoder.parameters()),
                                                  1.0)
            self.opt.step()
            self.step += 1
            decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
            ema_update(self.ema_unet, self.unet, decay)
            ema_update(self.ema_text, self.text_encoder, decay)
            bar.update(1)
            if self.step % cfg.log_every == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{self.lr_at():.1e}")
                self.log.write(phase="unet", step=self.step, loss=loss.item(), grad_norm=float(grad),
                               lr=self.lr_at(), elapsed=round(self.now(), 1))
            if time.time() - self.last_ckpt >= cfg.checkpoint_minutes * 60:
                self.checkpoint()
            if cfg.sample_minutes > 0 and time.time() - self.last_sample >= cfg.sample_minutes * 60:
                self.sample_and_score()
        bar.close()

    @torch.no_grad()
    def sample_and_score(self, name: str | None = None) -> dict:
        """EMA weights on held-out prompts: a PNG grid and a quick exact-evaluator score."""
        cfg = self.cfg
        t0 = time.time()
        pipe = self.pipeline(ema=True)
        records = sample_records(self.heldout, cfg.sample_images, seed=777)
        images = []
        for i in range(0, len(records), 24):
            chunk = [r["prompt"] for r in records[i:i + 24]]
            gen = torch.Generator().manual_seed(i)
            out = pipe(chunk, num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance, generator=gen,
                       output_type="np").images
            images.append(np.round(out * 255).astype(np.uint8))
        images = np.concatenate(images)
        summary = summarize(evaluate(list(images), records))
        self.samples_done += 1
        tag = name or f"step{self.step:06d}"
        save_grid(images[:24], self.work / "samples" / f"{tag}.png")
        scores = {t: round(v["score"], 3) for t, v in summary["tasks"].items()}
        self.log.write(event="sample", step=self.step, elapsed=round(self.now(), 1), overall=summary["overall"],
                       tasks=scores, seconds=round(time.time() - t0, 1))
        print(f"\n[sample] step {self.step}: quick held-out score {summary['overall']:.3f} {scores} "
              f"({time.time() - t0:.0f}s)", flush=True)
        self.last_sample = time.time()
        self.unet.train()
        self.text_encoder.train()
        return summary

    def pipeline(self, ema: bool = True):
        unet = self.ema_unet if ema else self.unet
        text = self.ema_text if ema else self.text_encoder
        for m in (unet, text, self.vae):
            m.eval()
        return make_pipeline(self.vae, text, self.tokenizer, unet)

    def export(self) -> Path:
        """Save the EMA pipeline with ``save_pretrained`` (fp16 weights unless disabled)."""
        out = Path(self.cfg.out)
        pipe = make_pipeline(copy.deepcopy(self.vae), copy.deepcopy(self.ema_text), self.tokenizer,
                             copy.deepcopy(self.ema_unet))
        if self.cfg.fp16_weights:
            pipe.to(torch.float16)
        info = {"config": dataclasses.asdict(self.cfg), "vae_steps": self.vae_step, "unet_steps": self.step,
                "train_minutes": round(self.now() / 60, 2), "vae_minutes": round(self.vae_seconds / 60, 2),
                "vae_check": self.vae_check, "split_seed": SPLIT_SEED, "torch": torch.__version__,
                "threads": torch.get_num_threads(), "weights_dtype": "float16" if self.cfg.fp16_weights else "float32"}
        with _io.atomic_folder(out, owner="train_shapes_backbone export", existing="replace") as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            _io.atomic_write_json(tmp / "training_info.json", info)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        print(f"[export] {out} ({size / 1e6:.1f} MB)", flush=True)
        self.log.write(event="export", path=str(out), bytes=size, elapsed=round(self.now(), 1))
        return out

    def run(self, resume: bool) -> Path:
        if resume:
            self.resume()
        if self.phase == "vae":
            self.train_vae()
        if self.phase == "unet":
            # The phase stays "unet": a later --resume with a larger budget continues training.
            self.train_unet()
            self.checkpoint()
        if self.cfg.sample_minutes > 0:
            self.sample_and_score(name="final")
        return self.export()


#: What each option means (``--help``).
HELP = {
    "out": "where the trained pipeline goes (a new or empty folder, or a pipeline folder, replaced whole; a folder "
           "of other files is refused; required: xlard/data/shapes_backbone installs it as the shipped backbone)",
    "work_dir": "checkpoints, metrics.jsonl and sample grids (--resume continues the run there)",
    "seed": "random seed of the data, the initial weights and the noise",
    "minutes": "wall-clock budget of the whole run (VAE phase included)",
    "vae_minutes": "the VAE phase's share of --minutes at most (it ends early at --vae-target)",
    "vae_max_steps": "VAE steps at most (0: no step limit)",
    "max_steps": "text-encoder + UNet steps at most (0: no step limit)",
    "threads": "torch threads (1..1024)",
    "bf16": "bfloat16 autocast for the forward passes",
    "vae_channels": "the VAE's three widths (multiples of 8)",
    "latent_channels": "channels of the latent",
    "vae_batch_size": "images per VAE step",
    "vae_crop": "square crops the VAE trains on (16, 32, 48 or 64)",
    "vae_lr": "the VAE's learning rate, in (0, 1]",
    "kl_weight": "weight of the VAE's KL term",
    "object_weight": "extra reconstruction weight on object pixels",
    "vae_target": "a minutes-budgeted VAE phase ends once its quick check reconstructs this share of objects right, "
                  "in (0, 1] (--vae-max-steps runs all its steps)",
    "vae_check_minutes": "minutes between the VAE's quick checks (0: never)",
    "text_dim": "the text encoder's width (a multiple of 4)",
    "text_layers": "the text encoder's layers",
    "unet_channels": "the UNet's three widths (multiples of 8 and of --unet-heads)",
    "unet_heads": "attention heads of the UNet",
    "batch_size": "prompts per text-encoder + UNet step",
    "lr": "the text encoder's and UNet's peak learning rate, in (0, 1]",
    "warmup_steps": "linear warmup steps",
    "final_lr_fraction": "the cosine's end, as a share of --lr",
    "cfg_dropout": "share of prompts dropped to the empty one (classifier-free guidance), in [0, 1)",
    "min_snr_gamma": "min-SNR loss weighting's gamma",
    "ema_decay": "decay of the weights' EMA (what is exported), in [0, 1)",
    "checkpoint_minutes": "minutes between checkpoints (0: every step)",
    "sample_minutes": "minutes between sample grids scored on held-out prompts (0: never)",
    "sample_images": "images per sample grid",
    "sample_steps": "denoising steps of the sample grids",
    "guidance": "guidance scale of the sample grids",
    "log_every": "steps between metrics rows",
    "fp16_weights": "export the weights in float16",
}
assert set(HELP) == {f.name for f in dataclasses.fields(TrainConfig)}


def parse_args(argv=None) -> tuple[TrainConfig, bool]:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.name == "out":  # no default: a plain run from the checkout replaced the shipped weights
            p.add_argument(flag, required=True, default=argparse.SUPPRESS, help=HELP[f.name])
        elif isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=HELP[f.name])
        elif isinstance(value, tuple):
            p.add_argument(flag, type=int, nargs="+", default=list(value), help=HELP[f.name])
        else:
            p.add_argument(flag, type=type(value), default=value, help=HELP[f.name])
    p.add_argument("--resume", action="store_true", help="continue from <work-dir>/checkpoint.pt")
    args = vars(p.parse_args(argv))
    resume = args.pop("resume")
    cfg = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    try:
        cfg.validate()
    except ValueError as e:
        p.error(str(e))
    from xlard import _io

    problem = _io.unwritable_output(folders={"--out": cfg.out, "--work-dir": cfg.work_dir})  # before training
    if problem:
        p.error(problem)
    out, work = Path(os.path.realpath(cfg.out)), Path(os.path.realpath(cfg.work_dir))
    if out == work or out in work.parents or work in out.parents:
        # the export replaces --out as a whole: the checkpoint in --work-dir went with it
        p.error(f"--out ({cfg.out}) and --work-dir ({cfg.work_dir}) must be separate folders, neither inside the "
                "other: the export replaces --out as a whole")
    if out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        # the export replaces --out whole: a folder of the user's (--out ~/project) lost every file in it
        held = sorted(entry.name for entry in out.iterdir())
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        p.error(f"--out: {cfg.out} holds files ({shown}) but no diffusers pipeline (model_index.json), and the "
                "export replaces --out as a whole; give a new or empty folder, or a pipeline folder to replace")
    if not resume and ((work / "checkpoint.pt").exists() or (work / "metrics.jsonl").exists()):
        p.error(f"--work-dir: {cfg.work_dir} holds an earlier run (checkpoint.pt / metrics.jsonl); pass --resume to "
                "continue it, or choose another --work-dir (a new run there overwrote its checkpoint and appended "
                "to its metrics)")
    return cfg, resume


def main(argv=None) -> int:
    cfg, resume = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    print("train_shapes_backbone config:\n" + json.dumps(dataclasses.asdict(cfg), indent=2), flush=True)
    from xlard import _io

    # one run per work dir: a second instance interleaved its metrics and checkpoints with the first's
    with _io.folder_lock(cfg.work_dir, "--work-dir"):
        trainer = Trainer(cfg)
        counts = {n: sum(p.numel() for p in getattr(trainer, n).parameters()) for n in ("vae", "text_encoder", "unet")}
        print(f"parameters: {counts}", flush=True)
        trainer.run(resume)
    return 0


if __name__ == "__main__":
    from xlard._signals import run_script

    raise SystemExit(run_script("train_shapes_backbone.py", main,
                                " (rerun with --resume to continue from the last checkpoint)"))
