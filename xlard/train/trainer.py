"""The training loop of xLARD (method.md sections 5-6); the only module of xlard.train that writes to disk.

One PPO step:

1. **encode**: the step's batch of (prompt, seed) items, each repeated G
   times, through the frozen backbone up to ``correction_step`` (cached: a
   batch is encoded once per run).
2. **sample**: G corrections per z0 from the Gaussian policy
   (:func:`xlard.ops.sample_correction`), with the value baseline.
3. **score**: R_phi predicts the three sub-rewards of every sample without
   decoding; lambda comes from the confidence head (or uniform).
4. **decode + reward** (every ``projector.refresh_every`` steps, or every step
   with ``reward_model: image``): the samples are decoded and scored by the
   configured reward source; they refresh R_phi's buffer.
5. **update**: advantages (group or value baseline, whitened over the global
   batch), ``epochs x minibatches`` clipped-surrogate steps with the value loss
   and the latent anchor; the first minibatch's ratio must be exactly 1.
6. **projector**: after a refresh, R_phi and its confidence head are fit on the
   buffer (uncertainty-weighted regression).

Distributed runs use torchrun: every process holds ``1/world`` of the items,
random draws derive from (seed, step) only, advantage statistics are
all-reduced and minibatches are laid out identically for any world size, so
the global batch and the result do not depend on the number of processes.
Rank 0 logs and checkpoints.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from xlard import _io, sources
from xlard._args import short_reason
from xlard.models import LatentRewardProjector, ResidualCorrector, aspect_weights
from xlard.prompts import from_geneval
from xlard.train import checkpoint as ckpt
from xlard.train import ppo
from xlard.train.config import TrainConfig, batch_arithmetic, check_train_config, config_from_dict, describe
from xlard.train.data import (CALIBRATION_SEED_BASE, MONITOR_SEED_BASE, EncodeCache, Item, PromptData,
                              check_items_per_tag, leave_out_prompts, load_records, refuse_heldout)
from xlard.train.metrics import MetricsLog, draw_curves, draw_distill_curves
from xlard.train.projector import ProjectorBuffer, Slot, fit_projector
from xlard.train.rewarding import build_reward_fn, resolve_source_name, source_backbone_options
from xlard.train.rollout import (PolicyStep, decode_groups, derived_generator, encode_items, prompt_inputs,
                                 sample_rollouts)

__all__ = ["train", "Trainer", "load_backbone"]

_PHASES = ("encode", "sample", "score", "decode", "reward", "update", "projector", "monitor", "evaluate")


def check_prompt_files(cfg) -> None:
    """``data.prompts`` and ``data.monitor_prompts`` name files that exist (or ``shapes:`` splits).

    Raises:
        FileNotFoundError: naming the config key.
    """
    for key in ("prompts", "monitor_prompts"):
        value = getattr(cfg.data, key)
        if value and not value.strip().lower().startswith("shapes:") and not Path(value.strip()).is_file():
            what = "a folder" if Path(value.strip()).is_dir() else "no file"
            raise FileNotFoundError(f"train config data.{key}: {what} at {value.strip()} (a GenEval JSONL file "
                                    "or 'shapes:train')")


def _sampler_settings(settings) -> tuple[int | None, float | None]:
    """The config's steps and guidance, with the shapes backbone's defaults filled in for it (other backbones'
    defaults come with the pipeline: None)."""
    steps, guidance = settings.num_inference_steps, settings.guidance_scale
    if settings.name == "shapes":
        from xlard.shapes import backbone as shapes_backbone

        steps, guidance = shapes_backbone.sampler_defaults(steps, guidance)
    return steps, guidance


def load_backbone(settings, device: torch.device, reward=None):
    """The run's :class:`xlard.backbones.DiffusersBackbone`.

    Attention capture stays on unless ``reward`` (RewardSettings) names a
    source that reads the decoded images only.
    """
    import re

    from xlard.backbones import DiffusersBackbone

    if settings.dtype == "float16" and torch.device(device).type == "cpu":  # as generate and eval refuse it
        raise ValueError(f"train config backbone.dtype: float16 runs on a GPU, and this run's device is the CPU "
                         f"(backbone.device {settings.device!r}); on the CPU use float32 or bfloat16 "
                         f"(--set backbone.dtype=float32)")
    dtype = getattr(torch, settings.dtype)
    kwargs: dict[str, Any] = {"correction_step": settings.correction_step, "torch_dtype": dtype, "device": device,
                              **settings.options}
    if reward is not None:
        kwargs.update(source_backbone_options(reward, settings.name))
    steps, guidance = _sampler_settings(settings)
    path = settings.name
    if settings.name == "shapes":
        from xlard.shapes import backbone as shapes_backbone

        path = str(shapes_backbone.backbone_path())
        if not shapes_backbone.is_available(path):
            raise FileNotFoundError(f"backbone.name 'shapes': {shapes_backbone.not_installed()}")
    if steps:
        kwargs["num_inference_steps"] = steps
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    from xlard._args import model_location

    # A path that does not exist is named as one ("no folder at ..."), not as a hub model to download.
    path = model_location("train config backbone.name", path, "model_index.json",
                          "a diffusers pipeline folder", ", 'shapes'")
    # diffusers' loading notices are quiet while loading only: a program calling train() keeps diffusers' verbosity
    # (imported first: its import sets the level from DIFFUSERS_VERBOSITY, which a level saved before would undo)
    from xlard._optional import require

    diffusers_logging = require("diffusers.utils.logging", "xlard.backbones.DiffusersBackbone")
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(max(verbosity, diffusers_logging.ERROR))  # quieter already (the CLI's): kept
    try:
        return DiffusersBackbone.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:  # diffusers/huggingface_hub report a missing hub model as either
        if "are not expected by" in str(exc):  # a misspelt backbone.options key (diffusers ignored it, silently)
            raise ValueError(f"train config backbone.options: {exc}") from None
        if isinstance(exc, ValueError) and _names_backbone_setting(str(exc), settings):
            # a setting's value the backbone refused (guidance_scale above its bound, a bad option): named by its
            # config key, not reported as weights that are not installed (any other error of the shapes backbone
            # is its damaged install, below: the advice to reinstall it)
            raise ValueError(_backbone_config_error(str(exc), settings)) from None
        if settings.name == "shapes":
            named = [k for k in settings.options if re.search(rf"\b{re.escape(k)}\b", str(exc))]
            if named:  # an option diffusers refused in its own words ("variant=fp16")
                raise ValueError(f"train config backbone.options.{named[0]}: {short_reason(exc)}") from None
            # missing or unreadable weights (an OSError): the advice to install them
            from xlard.shapes import backbone as shapes_backbone

            reason = short_reason(exc)
            raise ValueError(f"backbone.name 'shapes': it could not be loaded ({reason}); "
                             f"{shapes_backbone.not_installed()}") from None
        if Path(path).expanduser().is_dir():
            if isinstance(exc, (ValueError, FileNotFoundError)):  # named as the config key (it said "pipeline:")
                kind = FileNotFoundError if isinstance(exc, FileNotFoundError) else ValueError
                raise kind(_backbone_config_error(str(exc), settings)) from None
            raise
        from xlard.backbones.diffusers_backbone import unloadable_hub_model

        why = unloadable_hub_model(settings.name, exc, revision=settings.options.get("revision"),
                                   cache_dir=settings.options.get("cache_dir"))
        raise ValueError(f"train config backbone.name: {why}") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _backbone_setting_keys(settings) -> dict[str, str]:
    """The backbone's argument names -> the train config keys they come from."""
    keys = {"guidance_scale": "backbone.guidance_scale", "num_inference_steps": "backbone.num_inference_steps",
            "correction_step": "backbone.correction_step", "torch_dtype": "backbone.dtype",
            "device": "backbone.device"}
    keys.update({name: f"backbone.options.{name}" for name in settings.options})
    return keys


def _names_backbone_setting(text: str, settings) -> bool:
    """Whether a backbone's error ``text`` is about one of its settings (it starts with the setting's name)."""
    import re

    m = re.match(r"(\w+)", text)
    return bool(m) and m.group(1) in _backbone_setting_keys(settings)


def _backbone_config_error(text: str, settings) -> str:
    """A backbone's own error, named by the train config key it came from: ``guidance_scale`` is
    ``backbone.guidance_scale``, an option ``backbone.options.<name>``, the folder's faults ``backbone.name``."""
    import re

    keys = _backbone_setting_keys(settings)
    m = re.match(r"(\w+)", text)
    word = m.group(1) if m else ""
    key = keys.get(word, "backbone.name")
    named = word in keys or word in ("model_id_or_path", "pipeline")  # the folder's own: backbone.name
    rest = text[len(word) + 1:].strip() if named and text[len(word):].startswith(":") else text
    return f"train config {key}: {rest}"


#: Phases that run the trainer's own (small) models; the others run the backbone and the reward source.
_TRAINER_PHASES = ("sample", "score", "update", "projector")


class _Timer:
    """Accumulates seconds per phase; runs the trainer's phases with ``trainer_threads`` CPU threads."""

    def __init__(self, trainer_threads: int = 0):
        self.seconds = dict.fromkeys(_PHASES, 0.0)
        self.trainer_threads = trainer_threads

    def __call__(self, phase: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.threads = None
                if timer.trainer_threads and phase in _TRAINER_PHASES:
                    self.threads = torch.get_num_threads()
                    torch.set_num_threads(timer.trainer_threads)
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[phase] += time.perf_counter() - self.t
                if self.threads is not None:
                    torch.set_num_threads(self.threads)

        return _Span()


class _EMA:
    """Exponential moving average of the corrector's parameters (evaluation uses it when on)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1.0 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def copy_into(self, model: torch.nn.Module) -> torch.nn.Module:
        clone = copy.deepcopy(model)
        clone.load_state_dict(self.shadow)
        return clone


def _dist_info() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` from torchrun's environment variables (1 process without them).

    Raises:
        ValueError: a variable that is not an integer in its range, naming it and its value (a negative or zero
            WORLD_SIZE started a broken run; a RANK past it waited on a rendezvous no process would join).
    """
    def read(name: str, default: str, low: int, high: int | None, meaning: str) -> int:
        text = os.environ.get(name, default)
        try:
            value = int(text.strip())
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            span = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
            raise ValueError(f"environment variable {name} (the {meaning}, set by torchrun) must be {span}, got "
                             f"{text!r}; unset it for a single-process run")
        return value

    world = read("WORLD_SIZE", "1", 1, None, "number of processes of the run")
    rank = read("RANK", "0", 0, world - 1, f"process's index among WORLD_SIZE={world}")
    local = read("LOCAL_RANK", "0", 0, None, "process's index on its machine")
    return rank, world, local


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"train config: backbone.device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}") from None
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device(f"cuda:{local_rank}")
    from xlard._args import missing_device

    why = missing_device(device)  # "meta" or a missing cuda:N was reported as a backbone not installed
    if why is not None:
        raise ValueError(f"train config: backbone.device: {why}; use 'auto', 'cpu' or 'cuda[:N]'")
    return device


def reference_multiplier(grid: tuple[float, ...]) -> float:
    """The calibration's reference step: 1 when the grid has it, else the grid's smallest."""
    return 1.0 if 1.0 in grid else min(grid)


def choose_multiplier(per_item: dict[float, torch.Tensor], grid: tuple[float, ...],
                      min_gain_se: float) -> tuple[float, dict[str, float], dict[str, float]]:
    """The step-size calibration's rule (see :meth:`Trainer.calibrate_alpha`).

    Args:
        per_item: ``{multiplier: per-item joint reward [N]}`` for every multiplier
            of ``grid`` (and optionally 0, scored for reference only), on the same items.
        grid: the multipliers that may be chosen.
        min_gain_se: how many standard errors of the paired difference a
            multiplier must beat the reference (1, else the grid's smallest) by.

    Returns:
        (multiplier, {multiplier: mean}, {multiplier: s.e. of its paired difference to the reference}).
    """
    scores = {f"{m:g}": float(v.double().mean()) for m, v in per_item.items()}
    ref = reference_multiplier(grid)
    ses: dict[str, float] = {}
    chosen = [ref]
    for m in grid:
        if m == ref:
            continue
        diff = per_item[m].double() - per_item[ref].double()
        se = float(diff.std() / math.sqrt(diff.numel())) if diff.numel() > 1 else math.inf
        ses[f"{m:g}"] = se
        if float(diff.mean()) > min_gain_se * se:
            chosen.append(m)
    best = max(chosen, key=lambda m: (scores[f"{m:g}"], -m))
    return best, scores, ses


def _short_repr(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_given_backbone(backbone, settings) -> None:
    """A backbone handed to the trainer must run as the config says: the config is what the run folder records
    (config.json, checkpoints, the exported corrector), and a resume without the same object rebuilds the
    backbone from it. Settings the config leaves to the backbone (None) are not compared."""
    steps, guidance = _sampler_settings(settings)  # as load_backbone would build it
    wanted = {"correction_step": settings.correction_step, "num_inference_steps": steps, "guidance_scale": guidance}
    differ = []
    for name, want in wanted.items():
        have = getattr(backbone, name, None)
        if want is None or have is None:
            continue
        if not math.isclose(float(have), float(want), rel_tol=1e-9, abs_tol=1e-12):
            differ.append(f"{name} {have!r} (config backbone.{name}: {want!r})")
    if differ:
        raise ValueError(f"Trainer: the given backbone runs with {', '.join(differ)}; the run folder records the "
                         "config's settings: build the backbone with them, or set them in the config")


def _absolute_folder(value):
    """``value`` as an absolute real path when it names an existing local folder (a backbone or a reward model
    loaded from a relative folder), else as it is ("shapes", the shapes world's own backbone whatever ./shapes
    holds; a hub id; a number): an exported corrector recorded "sdxl" and was then loaded from whatever ./sdxl the
    current folder held."""
    if not isinstance(value, str) or not value or value == "shapes":
        return value
    folder = os.path.expanduser(value)
    return os.path.realpath(folder) if os.path.isdir(folder) else value


def _records_sha256(records) -> str:
    """A digest of prompt records (as the trainer read them)."""
    text = "\n".join(json.dumps(r, sort_keys=True, default=str) for r in records)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


#: The files of a model folder its loaders read (weights, configs, tokenizers), what a resume's check hashes: reports,
#: locks, caches and notes beside them (an evaluation script rewriting eval_heldout.json in the shapes backbone's
#: folder, huggingface_hub's .cache/ metadata) change without the model changing.
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".model", ".tiktoken")
_MODEL_FILE_NAMES = ("config.json", "model_index.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                     "merges.txt", "vocab.txt", "special_tokens_map.json", "added_tokens.json",
                     "generation_config.json", "scheduler_config.json", "preprocessor_config.json")


def _digest_model_files(folder: Path, found) -> str:
    """sha256 over the model files among ``found`` (paths relative to ``folder``), in sorted order: names, sizes
    and, for files up to 64 MiB, contents (a real model's gigabytes are named by size alone)."""
    h = hashlib.sha256()
    for rel in sorted(found):
        path, parts = folder / rel, rel.parts
        if any(p.startswith(".") or p == "__pycache__" for p in parts) or not (
                path.name in _MODEL_FILE_NAMES or path.suffix in _MODEL_FILE_SUFFIXES):
            continue
        try:
            if not path.is_file():
                continue
            size = path.stat().st_size
            h.update(f"{'/'.join(parts)}\0{size}\0".encode())
            if size <= 64 << 20:
                h.update(hashlib.sha256(path.read_bytes()).digest())
        except OSError:  # unreadable: named as such (the loader will say why, if it needs the file)
            h.update(f"{'/'.join(parts)}\0unreadable\0".encode())
    return h.hexdigest()


def _legacy_folder_fingerprint(folder) -> str | None:
    """:func:`_folder_fingerprint` as checkpoints before 2026-12-07 (stop 50) stored it: linked folders not
    followed. A resume accepts either, so that a run started before links were followed still resumes."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    return _digest_model_files(folder, [p.relative_to(folder) for p in folder.rglob("*")])


def _model_fingerprint(folder) -> str | None:
    """What a resume compares for a model the run reads: a hub snapshot in the local cache by its commit (files
    added to it later, such as another variant's weights, are the same model), any other folder by
    :func:`_folder_fingerprint`."""
    path = Path(folder)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return f"hub snapshot {path.parent.parent.name[len('models--'):].replace('--', '/')}@{path.name}"
    return _folder_fingerprint(folder)


def _folder_fingerprint(folder) -> str | None:
    """A digest of a model folder's model files (:data:`_MODEL_FILE_NAMES`, :data:`_MODEL_FILE_SUFFIXES`; none under
    a hidden folder or ``__pycache__``; linked folders followed): names, sizes and, for files up to 64 MiB,
    contents (a real model's gigabytes are named by size alone: reading them at every start would take minutes).
    None: no such folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found, seen = [], set()
    # os.walk with followlinks: a component folder linked in (rglob does not follow folder links) is read too, so
    # swapping it is noticed; a link back up the tree is walked once
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        rel = Path(root).relative_to(folder)
        found += [rel / n for n in names if not n.startswith(".")]
    return _digest_model_files(folder, found)


def _aspect_mse_text(fit: dict) -> str:
    """R_phi's per-aspect errors for the console, ``n/a`` for an aspect no prompt of the batch asks (``metrics.jsonl``
    holds null there; the console said "nan", which reads as a diverged run)."""
    return "/".join(f"{fit[f'mse_{k}']:.4f}" if math.isfinite(fit[f"mse_{k}"]) else "n/a"
                    for k in ("count", "color", "position"))


class Trainer:
    """Owns a run: models, optimisers, data, buffer, logging and checkpoints.

    Args:
        cfg: the validated config (``cfg.out`` is the run folder).
        resume: continue from the newest checkpoint in the run folder.
        backbone: an already-built backbone to use (tests); default: built from ``cfg.backbone``.

    Raises:
        TypeError: ``cfg`` not a :class:`TrainConfig`, ``backbone`` not a built backbone.
        ValueError: a config that cannot be honoured, a run folder that holds a
            different run, or one with checkpoints when ``resume`` is False.
    """

    def __init__(self, cfg: TrainConfig, resume: bool = False, backbone=None):
        cfg = check_train_config("Trainer", cfg)
        if backbone is not None:
            missing = [m for m in ("encode", "decode", "corrector_config") if not callable(getattr(backbone, m, None))]
            if missing:
                raise TypeError(f"Trainer: backbone must be a built backbone (an xlard.backbones.DiffusersBackbone) "
                                f"or None, got {type(backbone).__name__} {_short_repr(backbone)} (no "
                                f"{', '.join(missing)}); to name one, set the config's backbone.name instead")
        self.cfg = cfg
        self.rank, self.world, local_rank = _dist_info()
        self.distributed = self.world > 1
        self.device = _resolve_device(cfg.backbone.device, local_rank)
        if self.distributed and not dist.is_initialized():
            if self.rank == 0 and cfg.log.progress:
                print(f"xlard train: process 0 of {self.world} waiting for the others to join (rendezvous at "
                      f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')})",
                      file=sys.stderr, flush=True)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.is_main = self.rank == 0
        self.arith = batch_arithmetic(cfg, self.world)
        self.out = Path(cfg.out)
        # The main process holds the run folder until the run ends: a second run (or --resume) into it fails
        # at once instead of interleaving checkpoints and metrics.
        self._held = contextlib.ExitStack()
        if self.is_main:
            self._held.enter_context(_io.folder_lock(self.out, "--out"))
            # leftovers of a checkpoint or file write killed mid-way (SIGKILL): never complete, each as large as
            # a checkpoint; the lock above says no other writer is in the folder
            _io.remove_temporaries(self.out)
        try:
            self._setup(cfg, resume, backbone)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Drop the run folder's lock (at the end of :func:`train`; the process's end drops it too)."""
        self._held.close()

    def _setup(self, cfg: TrainConfig, resume: bool, backbone) -> None:
        self._check_folder(resume)

        torch.manual_seed(cfg.seed)
        # Everything the config and the prompt files alone decide is checked before the backbone loads (minutes
        # for a real model): the files, the batches the data makes, the monitor's file, the distillation's
        # settings and the corrector overrides' names (xlard train and xlard demo check the files too).
        check_prompt_files(cfg)
        records, self.is_shapes = load_records(cfg.data.prompts)
        if cfg.data.max_prompts:
            records = records[:cfg.data.max_prompts]
        all_records = records
        # Prompts left out of the whole run (training, monitor, calibration, distillation), for a
        # validation on prompts the corrector never saw (scripts/validate_corrector.py --prompts left-out).
        records, self.left_out_records = leave_out_prompts(records, cfg.data.leave_out, cfg.seed)
        self.data = PromptData(records, cfg.data.seeds_per_prompt, cfg.ppo.prompts_per_step, cfg.seed,
                               balance=cfg.data.balance, items_per_tag=cfg.data.items_per_tag)
        check_items_per_tag(records, cfg.distill.items_per_tag, "distill")  # the warm start's pairs, as data's
        monitor_records = self._monitor_records()
        self._check_config_only()
        # what the run reads besides its config (a resume on other prompts or other models went on without a
        # word); the prompts are compared now, before the backbone loads, the models in _load
        self.inputs = {"records_sha256": _records_sha256(all_records),
                       "monitor_records_sha256": _records_sha256(monitor_records or []), "models": {}}
        if self._newest is not None:  # (no model fingerprint yet: the models are compared in _load)
            self._check_inputs(*self._newest)
        self.backbone = backbone if backbone is not None else load_backbone(cfg.backbone, self.device, cfg.reward)
        self.reward_fn = build_reward_fn(cfg.reward, self.backbone)
        self._check_records(all_records, f"data.prompts: {cfg.data.prompts}")
        if monitor_records:
            self._check_records(monitor_records, f"data.monitor_prompts: {cfg.data.monitor_prompts}")
        if self.left_out_records:
            self._say(f"data.leave_out {cfg.data.leave_out:g}: {len(self.left_out_records)} of "
                      f"{len(records) + len(self.left_out_records)} prompts left out of the run (recorded in the "
                      "corrector folder as training.left_out_records)")
        self.cache = EncodeCache(cfg.data.encode_cache)
        self.records = records
        self.monitor_items = self._monitor_items(records, monitor_records)

        # Models: sized from the backbone; the corrector is the policy and holds the value head. Seeded again
        # here: loading the reward source draws from the global generator on its first load only (then it is
        # cached), so a second run in one process started from other weights than the first.
        torch.manual_seed(cfg.seed)
        bb = self.backbone
        overrides = dict(cfg.model.corrector_overrides)
        if overrides.get("reader") is True and not overrides.get("reader_nouns"):
            # The reader learns the understanding model's words (its targets): its vocabulary by default.
            from xlard.shapes.understanding import load_model

            vocab = load_model().config
            overrides.setdefault("reader_colors", list(vocab.colors))
            overrides["reader_nouns"] = list(vocab.shapes)
        from xlard.models import ProjectorConfig
        try:
            ccfg = bb.corrector_config(cfg.model.corrector, **overrides)
        except (TypeError, ValueError) as e:  # a misspelled field or a bad value, named by the config class
            raise ValueError(f"train config: model.corrector_overrides: {e}") from None
        size = getattr(bb, "latent_size", None)
        if size is not None and (size[0] % ccfg.patch or size[1] % ccfg.patch):  # else: inside the first step
            raise ValueError(f"train config: model.corrector_overrides: patch={ccfg.patch} must divide the "
                             f"backbone's latent size {size[0]} x {size[1]}")
        if size is not None and (size[0] % ccfg.action_block or size[1] % ccfg.action_block):
            # it failed at the first PPO step, after the step-0 checkpoint: the folder could not be used again
            raise ValueError(f"train config: model.corrector_overrides.action_block: {ccfg.action_block} must divide "
                             f"the backbone's latent size {size[0]} x {size[1]}")
        try:
            pcfg = ProjectorConfig.preset(cfg.model.projector, latent_channels=bb.latent_channels,
                                          text_dim=bb.text_dim, pooled_dim=bb.pooled_dim,
                                          **cfg.model.projector_overrides)
        except (TypeError, ValueError) as e:
            raise ValueError(f"train config: model.projector_overrides: {e}") from None
        if size is not None and (size[0] % pcfg.patch or size[1] % pcfg.patch):  # it failed after the warm start
            raise ValueError(f"train config: model.projector_overrides: patch={pcfg.patch} must divide the "
                             f"backbone's latent size {size[0]} x {size[1]}")
        self.corrector = ResidualCorrector(ccfg).to(self.device)
        self.projector = LatentRewardProjector(pcfg).to(self.device)
        self.policy = PolicyStep(self.corrector)
        self.policy_model, self.projector_model = self.policy, self.projector
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.policy_model = DDP(self.policy, device_ids=ids, find_unused_parameters=cfg.rl == "pathwise")
            self.projector_model = DDP(self.projector, device_ids=ids)
        o = cfg.optim
        trunk = [p for n, p in self.corrector.named_parameters() if n != "log_std" and p.requires_grad]
        self.policy_opt = torch.optim.AdamW(
            [{"params": trunk, "lr": o.lr},
             {"params": [self.corrector.log_std], "lr": o.lr * cfg.ppo.log_std_lr_scale, "weight_decay": 0.0}],
            lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.policy_opt, lambda s: ppo.lr_factor(s, cfg.steps, o.warmup_steps, o.schedule, o.min_lr_ratio))
        self.projector_opt = torch.optim.AdamW(self.projector.parameters(), lr=cfg.projector.lr,
                                               weight_decay=cfg.projector.weight_decay)
        self.ema = _EMA(self.corrector, o.ema) if o.ema > 0 else None
        self.reward_stats = ppo.RunningStats()
        self.buffer = ProjectorBuffer(cfg.projector.buffer_batches)
        self.refs: dict[tuple[int, int], tuple[torch.Tensor, float]] = {}
        self.step = 0
        self.warm = False
        self.distilled = False
        self.distill_stats: dict = {}
        self.monitor_state = None
        if cfg.distill.items_per_tag:
            self._check_distill()
        elif self.corrector.config.reader:
            raise ValueError("model.corrector_overrides reader: true needs the edit-target warm start "
                             "(distill.items_per_tag > 0): the reader is fitted there, before the corrector")
        for name in ("count_move", "count_edit"):
            if getattr(self.corrector.config, name, False) and float(cfg.backbone.correction_step) != 1.0:
                raise ValueError(f"model.corrector_overrides {name}: true decodes the corrected latent as a final "
                                 f"one to count its objects: it needs backbone.correction_step 1.0, got "
                                 f"{cfg.backbone.correction_step}")
        if backbone is not None:  # after the config's own checks: those hold whatever backbone comes
            _check_given_backbone(backbone, cfg.backbone)

        self.resume_requested = bool(resume)
        self.resume_from = ckpt.latest_checkpoint(self.out) if resume else None
        self._model_dirs = self._model_folders()
        self.inputs["models"] = {k: _model_fingerprint(v) for k, v in self._model_dirs.items()}
        if self.resume_from is not None:
            self._load(self.resume_from)
        self.log = None
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            text = json.dumps(cfg.to_dict(), indent=2, default=list)
            _io.atomic_write_text(self.out / "config.json", text + "\n", owner="xlard train")
            self.log = MetricsLog(self.out, cfg.log.tensorboard,
                                  resume_step=self.step if self.resume_from is not None else None)

    # ------------------------------------------------------------------ setup helpers

    def _check_folder(self, resume: bool) -> None:
        self._newest = None  # (path, state) of the newest checkpoint a resume continues from
        other = _io.other_run(self.out, "train")
        if other is not None:
            raise ValueError(f"--out: {self.out} holds the outputs of `xlard {other}`; a training run there would "
                             "mix its checkpoints with them: choose another --out")
        # a corrector's or a model's folder, or a training script's work folder (whose metrics.jsonl a run with
        # --resume replaced, and whose config.json was read as a run's "differing" config)
        _io.claim_folder(self.out, "--out", ("config.json", "metrics.jsonl", "ckpt-*.pt"))
        saved = self.out / "config.json"
        have = ckpt.list_checkpoints(self.out)
        if have and not resume:
            raise ValueError(f"--out: {self.out} already holds checkpoints of a run; pass --resume to continue it or "
                             "choose another --out")
        if not have and not resume:
            # a new run empties metrics.jsonl and replaces config.json: files of anything else there (another
            # tool's metrics, a run that never reached its first checkpoint) would be lost without a word
            found = [n for n in ("metrics.jsonl", "config.json") if (self.out / n).exists()]
            if found:
                raise ValueError(f"--out: {self.out} already holds {' and '.join(found)}, which a new run would "
                                 "replace; "
                                 "pass --resume to continue the run that wrote them, or choose another --out")
        if not have and resume and (self.out / "metrics.jsonl").exists() and not saved.exists():
            # a run of xlard train writes its config.json before any metrics: these are another tool's
            raise ValueError(f"--out: {self.out} holds a metrics.jsonl but no config.json of a training run: not "
                             "a folder of `xlard train` (its metrics would be replaced); choose another --out")
        # the newest checkpoint's small entries (its tensors memory-mapped, not read), before the backbone loads
        newest = ckpt.load_checkpoint(have[-1][1], mmap=True) if resume and have else None
        self._newest = (have[-1][1], newest) if newest is not None else None  # its inputs: checked in _setup
        if newest is not None:
            self._check_world_size(have[-1][1], newest)
        old = None
        stored = newest.get("config") if newest is not None else None
        if isinstance(stored, dict):
            # the newest checkpoint's own config: the state resumed was trained under it (an edited config.json
            # got a changed config past this check, and an edited optim.lr was then silently not used)
            old = json.loads(json.dumps(stored, default=list))
            saved = have[-1][1]
        elif resume and saved.exists():  # no checkpoint yet (or one without its config): the run's config.json
            old = _io.read_json(saved, owner="--resume", what="the run's config.json")
            if not isinstance(old, dict):
                raise ValueError(f"--resume: {saved} must hold the run's config (a JSON object), got "
                                 f"{type(old).__name__}")
        if old is not None:
            try:  # a config saved before a field existed reads as that field's default
                old = json.loads(json.dumps(config_from_dict(old).to_dict(), default=list))
            except (TypeError, ValueError):
                pass  # compared as saved: the difference is reported below
            new = json.loads(json.dumps(self.cfg.to_dict(), default=list))
            old.pop("out", None), new.pop("out", None)
            # reward.options as the source reads them: a default that changed since the run started (the shapes
            # source's count, 2026-12-06) would otherwise switch the reward it optimises without a word
            trained = newest.get("reward_options") if newest is not None else None
            raw_old = old.get("reward", {}).get("options") if isinstance(old.get("reward"), dict) else None
            source_name = resolve_source_name(self.cfg.reward, self.cfg.backbone.name)
            old_source = old.get("reward", {}).get("source") if isinstance(old.get("reward"), dict) else None
            # both on clip (a run of another source resumed with a clip config differs in reward.source: said below)
            if source_name == "clip" and str(old_source).strip().lower() == "clip" and newest is not None and (
                    trained is None or sources.clip_reading_predates(trained)):
                raise ValueError(
                    f"--resume: the run was trained with the clip source's reading of before 2026-12-07 (each map "
                    f"cut relative to its own peak, colors looked for anywhere in the image; its checkpoint records "
                    f"reward.options {trained}); this version reads the maps with an absolute cut and colors bound "
                    f"to each entity, and no option gives the old reading back: start a new run")
            if isinstance(raw_old, dict):
                old["reward"]["options"] = json.loads(json.dumps(
                    trained if isinstance(trained, dict) else sources.resolved_options(source_name, raw_old),
                    default=list))
                new["reward"]["options"] = json.loads(json.dumps(self._reward_options(), default=list))
                if old["reward"]["options"] != new["reward"]["options"] and raw_old == dict(self.cfg.reward.options):
                    raise ValueError(
                        f"--resume: the run was trained with reward.options {old['reward']['options']}; this version "
                        f"of xlard reads the same config as {new['reward']['options']} (a default changed); write "
                        f"reward.options: {json.dumps(old['reward']['options'])} into the config to continue the "
                        "run with its reward, or start a new run")
            for cfg_dict in (old, new):  # the progress bar (xlard train --quiet) is no part of the run
                if isinstance(cfg_dict.get("log"), dict):
                    cfg_dict["log"].pop("progress", None)
            if old.get("reward_model") == "image" and old.get("confidence", "head") == "head":
                raise ValueError(f"--resume: the run was trained with reward_model 'image' and confidence 'head' "
                                 f"(saved in {saved}), whose aspect weights came from a confidence head that mode "
                                 f"never fits (random weights); this version refuses that pair, so the run cannot "
                                 f"be resumed: start a new run with confidence: uniform")
            if old != new:
                diff = _config_differences(old, new)
                shown = "; ".join(f"{key}: {a} -> {b}" for key, a, b in diff[:5]) + (
                    f"; and {len(diff) - 5} more" if len(diff) > 5 else "")
                raise ValueError(f"--resume: the config differs from the one the run was trained with (saved in "
                                 f"{saved}): {shown}; resume with that config (the run folder's config.json holds "
                                 f"it unless edited since) or start a new run")
        if self.cfg.log.tensorboard == "on" and importlib.util.find_spec("tensorboard") is None:
            # checked before config.json and metrics.jsonl are written (and before the backbone loads): failing
            # later left files that refused the corrected command
            raise ValueError("log.tensorboard='on' but TensorBoard is not installed (pip install tensorboard, or "
                             "set log.tensorboard: auto)")

    def _check_records(self, records, where: str) -> None:
        """A record the backbone cannot use (a word beyond its tokenizer's length limit) fails when the run starts,
        not at the step that draws it."""
        check = getattr(self.backbone, "check_prompts", None)  # a duck-typed backbone may not have it
        if check is not None:
            check([from_geneval(r) for r in records], lambda i: f"{where} record {i}")
        source = getattr(self.reward_fn, "source", None)
        from xlard.sources import ShapesSource

        if isinstance(source, ShapesSource):  # its eyes know the shapes world's words only
            known_colors = set(source.model.config.colors)
            for i, record in enumerate(records):
                for item in record.get("include", ()):
                    noun, color = item.get("class"), item.get("color")
                    unknown = (f"the noun {noun!r}" if source.noun_index(str(noun)) is None else
                               f"the color {color!r}" if color is not None and color not in known_colors else None)
                    if unknown:
                        raise ValueError(
                            f"{where} record {i} ({record.get('prompt')!r}) asks for {unknown}, which the 'shapes' "
                            f"reward source cannot see (its understanding model knows "
                            f"{', '.join(source.model.config.shapes)} in {', '.join(source.model.config.colors)}); "
                            f"for other prompts use reward.source: clip (or attention)")

    def _monitor_records(self) -> list[dict] | None:
        """The records of ``data.monitor_prompts`` (None: the training prompts), read and checked before the
        backbone loads."""
        source = self.cfg.data.monitor_prompts
        if self.cfg.data.monitor_size == 0 or not source:
            return None
        where = f"data.monitor_prompts: {source}"
        if source.strip().lower().startswith("shapes:"):
            if source.strip().lower() != "shapes:train":
                raise ValueError(f"{where}: the monitor reads 'shapes:train' or a GenEval JSONL file (the held-out "
                                 "split is for evaluation only)")
            records, _ = load_records("shapes:train")
            return records
        from xlard import geneval

        lines: list[int] = []
        records = geneval.read_jsonl(source, line_numbers=lines)
        if not records:  # a modulo by zero when the monitor batch was drawn
            raise ValueError(f"{where} holds no records")
        if self.is_shapes:  # the exact evaluator judges the monitor: it knows the shapes world only
            from xlard.shapes.world import WorldConfig

            world = WorldConfig()
            for i, record in enumerate(records):
                try:
                    geneval.validate_record(record, classes=world.shapes, colors=world.colors, index=i)
                except ValueError as e:
                    raise ValueError(f"{where}: {e} (the run trains on shapes-world prompts, and the exact "
                                     "evaluator judges its monitor)") from None
        refuse_heldout(records, where, lines)  # whatever the world
        return records

    def _check_config_only(self) -> None:
        """What the config decides without the backbone: the distillation's settings and the corrector
        overrides' names and switches (each failed after the backbone had loaded)."""
        from xlard.models import CorrectorConfig

        overrides = dict(self.cfg.model.corrector_overrides)
        fields = {f.name: f.default for f in dataclasses.fields(CorrectorConfig)}
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise ValueError(f"train config: model.corrector_overrides: unknown field(s) {unknown} (known: "
                             f"{sorted(fields)})")
        for name, value in overrides.items():
            if isinstance(fields[name], bool) and not isinstance(value, bool):
                raise ValueError(f"train config: model.corrector_overrides {name} must be true or false, got "
                                 f"{value!r}")
        from xlard.models import COUNT_EYES

        eyes = overrides.get("count_eyes", fields["count_eyes"])
        if not isinstance(eyes, str) or eyes not in COUNT_EYES:
            raise ValueError(f"train config: model.corrector_overrides count_eyes must be one of "
                             f"{', '.join(map(repr, COUNT_EYES))}, got {eyes!r}")
        if eyes == "latent" and (overrides.get("count_edit") or overrides.get("count_move")):
            from xlard.shapes import latent_eyes

            problem = latent_eyes.installed_problem()  # found now, not when the export first counts (minutes later)
            if problem:
                raise FileNotFoundError(f"model.corrector_overrides count_eyes: latent reads counts with the "
                                        f"shapes latent eyes, and {problem} (or set count_eyes: decoded)")
        d, step = self.cfg.distill, float(self.cfg.backbone.correction_step)
        if d.items_per_tag:
            if self.cfg.backbone.name != "shapes" or not self.is_shapes:
                raise ValueError("distill: the edit-target warm start draws with the shapes world's primitives; it "
                                 f"needs backbone.name 'shapes' and shapes prompts, got {self.cfg.backbone.name!r} "
                                 f"and {self.cfg.data.prompts!r}")
            alpha = overrides.get("alpha", fields["alpha"])
            if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha != 1:
                # the residual was fitted to the whole edit and then applied alpha times (4x the edits at alpha 4)
                raise ValueError(f"distill: the edit-target warm start fits the corrector's output to the whole edit, "
                                 f"which the corrector applies alpha times; model.corrector_overrides.alpha must be 1 "
                                 f"with it, got {alpha} (export.alpha_grid scales the exported step)")
            for name, on in (("replace", d.replace), ("move", d.move), ("decoder_epochs", d.decoder_epochs > 0)):
                if on and step != 1.0:
                    raise ValueError(f"distill.{name}: needs backbone.correction_step 1.0 (the corrected latent must "
                                     f"be the one the VAE decodes), got {self.cfg.backbone.correction_step}")

    def _monitor_items(self, train_records, monitor_records=None) -> list[Item]:
        n = self.cfg.data.monitor_size
        if n == 0:
            return []
        records = monitor_records if monitor_records else train_records
        # Seeds the training never draws: the monitor sees new noise even for training prompts.
        return self._fresh_items(records, n, "monitor", MONITOR_SEED_BASE, balanced=not monitor_records)

    def _fresh_items(self, records, n: int, purpose: str, seed_base: int, balanced: bool = True) -> list[Item]:
        """``n`` items of ``records`` (a seeded random pick, round-robin over tags with ``data.balance: tag``)."""
        gen = derived_generator(self.cfg.seed, purpose)
        perm = torch.randperm(len(records), generator=gen).tolist()
        if self.cfg.data.balance == "tag" and balanced:
            # Round-robin over the tags (each tag's records in the random order), so the
            # batch sees every tag as the balanced training does.
            by_tag: dict[str, list[int]] = {}
            for i in perm:
                by_tag.setdefault(str(records[i].get("tag", "")), []).append(i)
            queues = [by_tag[t] for t in sorted(by_tag)]
            perm = [q[k % len(q)] for k in range(n) for q in queues]
        return [Item(records[i], seed_base + k, i) for k, i in enumerate(perm[k % len(perm)] for k in range(n))]

    def _say(self, text: str) -> None:
        if self.is_main:
            print(text, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ distributed helpers

    def _all_sum(self, values: torch.Tensor) -> torch.Tensor:
        values = values.detach().to(torch.float64).clone()
        if self.distributed:
            t = values.to(self.device)
            dist.all_reduce(t)
            values = t.cpu()
        return values

    def _local_rows(self):
        n = self.arith["rollouts_per_rank"]
        return torch.arange(n, dtype=torch.int64) + self.rank * n

    def _shard(self, items: list[Item]) -> list[Item]:
        k = self.arith["items_per_rank"]
        return items[self.rank * k:(self.rank + 1) * k]

    # ------------------------------------------------------------------ phases

    def _encode(self, step: int, timer: _Timer):
        bid, items = self.data.batch(step)
        items = self._shard(items)
        with timer("encode"):
            state = self.cache.get(bid)
            if state is None:
                state = encode_items(self.backbone, items)
                self.cache.put(bid, state)
        return items, state

    def _decode_and_score(self, state, z: torch.Tensor, timer: _Timer, group_size: int | None = None):
        g = self.cfg.ppo.group_size if group_size is None else group_size
        return decode_groups(self.backbone, self.reward_fn, state, z, g, timer)

    def _weights(self, pooled, aspect_mask):
        if self.cfg.confidence == "uniform":
            return aspect_weights(torch.zeros(aspect_mask.shape, device=aspect_mask.device), aspect_mask)
        with torch.no_grad():
            return self.projector.confidence(pooled, aspect_mask)

    def _slot(self, inputs, z, result) -> Slot:
        present = result.present.to("cpu")
        target = torch.nan_to_num(result.scores.to("cpu").float(), nan=0.0)
        return Slot(z.detach().float().cpu(), inputs.text_tokens.cpu(), inputs.pooled.cpu(), inputs.text_mask.cpu(),
                    target, present, self._local_rows(), self.arith["rollouts_per_step"])

    def _fit(self, epochs: int, *purpose, slots=None) -> dict:
        gen = derived_generator(self.cfg.seed, "projector-fit", *purpose)
        return fit_projector(self.projector_model, self.projector, self.projector_opt, self.buffer, epochs,
                             slots,
                             self.cfg.projector.minibatches, gen, self.device, self.cfg.optim.max_grad_norm,
                             all_sum=self._all_sum if self.distributed else None, world_size=self.world)

    def _check_distill(self) -> None:
        """What needs the built run (the backbone-free checks are :meth:`_check_config_only`'s)."""
        if self.distributed:
            raise ValueError("distill: the edit-target warm start runs in one process; start the run without "
                             "torchrun (PPO steps after it can resume distributed only from a new run)")
        if self.cfg.distill.move != bool(self.corrector.config.move):
            raise ValueError(f"distill.move is {self.cfg.distill.move} but the corrector's move head is "
                             f"{'on' if self.corrector.config.move else 'off'}; set both "
                             f"(distill.move and model.corrector_overrides move) the same")

    def distill(self) -> dict:
        """Warm-start the corrector on edit targets (:mod:`xlard.train.distill`); returns the fit's statistics."""
        from xlard.shapes.understanding import ShapesUnderstanding, load_model
        from xlard.train import distill as dl
        from xlard.train.data import balanced_pairs

        d = self.cfg.distill
        model = getattr(getattr(self.reward_fn, "source", None), "model", None)
        if not isinstance(model, ShapesUnderstanding):
            model = load_model(device=self.device)
        pairs = balanced_pairs(self.records, d.items_per_tag, self.cfg.seed)
        items = [Item(self.records[r], dl.DISTILL_SEED_BASE + s, r) for r, s in pairs]
        folder = self.out / "distill"
        self._say(f"distill: {len(items)} training-split items ({d.items_per_tag} per tag), edit targets in {folder}")
        t0 = time.perf_counter()
        reader = bool(self.corrector.config.reader)
        if reader and (tuple(self.corrector.config.reader_nouns) != tuple(model.config.shapes)
                       or tuple(self.corrector.config.reader_colors) != tuple(model.config.colors)):
            raise ValueError(f"distill: the corrector's reader reads nouns {list(self.corrector.config.reader_nouns)} "
                             f"and colors {list(self.corrector.config.reader_colors)}; the understanding model that "
                             f"labels its targets knows {list(model.config.shapes)} and {list(model.config.colors)}")
        dl.build_dataset(self.backbone, model, items, folder, chunk=d.chunk, edit_config=d.edit_config(),
                         progress=self.cfg.log.progress, replace=d.replace,
                         move_margin=d.move_margin if d.move else None, cells=reader)
        data = dl.load_dataset(folder, len(items), d.chunk)
        # The shards' own build times (summed across an interrupted build and its resume); this
        # invocation's wall time for shards that predate the record.
        build_seconds = data.pop("build_seconds")
        if build_seconds is None:
            build_seconds = time.perf_counter() - t0
        from xlard.shapes.editor import changed_something

        edited = sum(1 for a in data["actions"] if changed_something(a))  # "unplaced ...: no room left" is no edit
        reader_stats = {}
        if reader:
            self._say(f"distill: fitting the corrector's latent reader ({d.reader_epochs} epochs)")
            reader_stats = dl.fit_reader(self.corrector, data, epochs=d.reader_epochs, batch_size=d.reader_batch_size,
                                         val_fraction=d.val_fraction,
                                         seed=self.cfg.seed, log_path=folder / "reader_metrics.jsonl",
                                         progress=self.cfg.log.progress)
        stats = dl.fit_corrector(self.corrector, data, epochs=d.epochs, lr=d.lr, batch_size=d.batch_size,
                                 weight_decay=d.weight_decay, val_fraction=d.val_fraction, seed=self.cfg.seed,
                                 log_path=folder / "metrics.jsonl", progress=self.cfg.log.progress,
                                 move_weight=d.move_weight)
        if d.decoder_epochs > 0:
            self._say(f"distill: {d.decoder_epochs} decoder-space epochs (the corrected latent must decode to the "
                      f"edited image)")
            stats.update(dl.fit_corrector_decoded(
                self.corrector, data, dl.vae_decoder(self.backbone), epochs=d.decoder_epochs, lr=d.decoder_lr,
                batch_size=d.batch_size, weight_decay=d.weight_decay, val_fraction=d.val_fraction,
                seed=self.cfg.seed, pixel_weight=d.decoder_pixel_weight, latent_weight=d.decoder_latent_weight,
                log_path=folder / "metrics.jsonl", progress=self.cfg.log.progress, move_weight=d.move_weight))
        stats.update({"items": len(items), "items_edited": edited, "build_seconds": build_seconds, **reader_stats})
        _io.atomic_write_json(folder / "summary.json", stats, owner="xlard train")
        if self.cfg.log.curve:
            draw_distill_curves(MetricsLog.read(folder / "metrics.jsonl"), folder / "curve.png")
        if self.ema is not None:  # the EMA starts from the distilled weights
            self.ema = _EMA(self.corrector, self.cfg.optim.ema)
        self.distilled, self.distill_stats = True, stats
        r2 = stats["val_r2"]
        explained = f"{r2:.3f}" if math.isfinite(r2) else "n/a (" + (
            "no items held back: distill.val_fraction 0" if not self.cfg.distill.val_fraction else
            "the fit diverged" if not math.isfinite(stats.get("val_mse", 0.0)) else
            "the held-back items ask for no change: too few items, or none edited") + ")"
        self._say(f"distill: {edited} of {len(items)} samples edited; fit {stats['epochs']} epochs, explained "
                  f"variance on held-back items {explained} ({stats['seconds']:.0f}s fit, "
                  f"{build_seconds:.0f}s targets)")
        return stats

    def warm_start(self) -> dict:
        """Fill R_phi's buffer with perturbed latents around z0 and fit it (before the first PPO step)."""
        p = self.cfg.projector
        timer = _Timer(self.cfg.trainer_threads)
        if self.cfg.reward_model == "image" and self.cfg.rl == "ppo":
            self.warm = True
            return {}
        batches = range(p.warmup_batches)
        if self.is_main and self.cfg.log.progress:
            from tqdm import tqdm
            batches = tqdm(batches, desc="R_phi warm start", unit="batch", file=sys.stderr)
        for wb in batches:
            items, state = self._encode(wb, timer)
            inputs = prompt_inputs(state, self.device, self.cfg.ppo.group_size, corrector=self.corrector)
            gen = derived_generator(self.cfg.seed, "warm", wb)
            eps = torch.randn((self.arith["rollouts_per_step"],) + tuple(inputs.z0.shape[1:]), generator=gen)
            eps = eps[self._local_rows()].to(self.device)
            scale = inputs.z0.flatten(1).std(dim=1).view(-1, 1, 1, 1)
            z = inputs.z0 + p.warmup_sigma * scale * eps
            _, result = self._decode_and_score(state, z, timer)
            self.buffer.add(self._slot(inputs, z, result))
        with timer("projector"):
            fit = self._fit(p.warmup_epochs, "warm")
        self.warm = True
        self._say(f"R_phi warm start: {p.warmup_batches} batches, fit loss {fit['loss']:.4f}, "
                  f"mse count/color/position {_aspect_mse_text(fit)} ({sum(timer.seconds.values()):.1f}s)")
        return fit

    def _advantages(self, rewards: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(advantages, value targets) from rewards, with global statistics."""
        c = self.cfg.ppo
        n_global = self.arith["rollouts_per_step"]
        r64 = rewards.detach().double()  # float64 sums: float32 ones cancel (equal rewards gave a spread)
        sums = self._all_sum(torch.stack([r64.sum(), r64.square().sum()]).cpu())
        if c.reward_norm:
            self.reward_stats.update(float(n_global), float(sums[0]), float(sums[1]))
            targets = (rewards - self.reward_stats.mean) / max(self.reward_stats.std, 1e-6)
        else:
            targets = rewards
        if c.advantage == "group":
            adv = ppo.group_advantages(targets, c.group_size)
        else:
            adv = targets - values
        if c.whiten:
            a64 = adv.detach().double()
            s = self._all_sum(torch.stack([a64.sum(), a64.square().sum()]).cpu())
            adv = ppo.whiten(adv, s[0], s[1], float(n_global))
        return adv, targets

    def _anchor(self, items, inputs) -> torch.Tensor | None:
        if self.cfg.anchor == "none":
            return None
        if self.cfg.anchor == "z0":
            return inputs.z0
        anchor = inputs.z0.clone()
        g = self.cfg.ppo.group_size
        for i, item in enumerate(items):
            ref = self.refs.get((item.index, item.seed))
            if ref is not None:
                anchor[i * g:(i + 1) * g] = ref[0].to(anchor.device)
        return anchor

    def _update_refs(self, items, zc, result) -> None:
        joint = result.joint.detach().cpu()
        g = self.cfg.ppo.group_size
        for i, item in enumerate(items):
            block = joint[i * g:(i + 1) * g]
            finite = torch.nan_to_num(block, nan=-1.0)
            j = int(torch.argmax(finite))
            value = float(finite[j])
            key = (item.index, item.seed)
            if value >= self.cfg.anchor_ref_min_reward and value > self.refs.get(key, (None, -1.0))[1]:
                self.refs[key] = (zc[i * g + j].detach().float().cpu().clone(), value)

    def _ppo_update(self, step, inputs, rollouts, adv, targets, anchor) -> dict:
        c = self.cfg.ppo
        numel = int(inputs.z0[0].numel())
        block = int(self.corrector.config.action_block)
        alpha = self.corrector.config.alpha
        global_rows = self._local_rows()
        minibatch_stats: list[dict[str, float]] = []
        self.corrector.train()
        for epoch in range(c.epochs):
            keys = None if epoch == 0 else torch.rand(self.arith["rollouts_per_step"],
                                                      generator=derived_generator(self.cfg.seed, "mb", step, epoch))
            for k, rows in enumerate(ppo.minibatch_layout(global_rows, c.minibatches, keys)):
                stats_acc: dict[str, float] = {}
                rows = rows.to(self.device)
                mean, value, logp = self.policy_model(inputs.z0[rows], *inputs.for_corrector(rows),
                                                      rollouts.delta[rows])
                if epoch == 0 and k == 0 and not torch.equal(logp.detach(), rollouts.log_prob[rows]):
                    diff = float((logp.detach() - rollouts.log_prob[rows]).abs().max())
                    raise RuntimeError(f"PPO step {step}: the ratio of the first minibatch is not exactly 1 (log-prob "
                                       f"differs by up to {diff:.3g} from the rollout): the policy's forward pass is "
                                       "not reproducible (dropout on? parameters changed before the update?)")
                new = ppo.reduce_log_prob(logp, numel, c.logprob_reduction, block)
                old = ppo.reduce_log_prob(rollouts.log_prob[rows], numel, c.logprob_reduction, block)
                pg, _, st = ppo.clipped_surrogate(new, old, adv[rows], c.clip)
                vl = ppo.value_loss(value, targets[rows])
                loss = pg + c.value_coef * vl
                if anchor is not None:
                    loss = loss + ppo.anchor_penalty(inputs.z0[rows] + alpha * mean, anchor[rows], self.cfg.anchor_beta)
                self.policy_opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = self._clip()
                self.policy_opt.step()
                for name, v in st._asdict().items():
                    stats_acc[name] = stats_acc.get(name, 0.0) + float(v)
                # The same step measured under the other reduction (the data behind the documented choice).
                other = "sum" if c.logprob_reduction == "mean" else "mean"
                with torch.no_grad():
                    alt = (ppo.reduce_log_prob(logp.detach(), numel, other, block)
                           - ppo.reduce_log_prob(rollouts.log_prob[rows], numel, other, block)).double()
                for name, v in (("log_ratio_abs_max", alt.abs().max()),
                                ("approx_kl", (alt.exp() - 1 - alt).mean()),
                                ("clip_fraction", ((alt.exp() - 1).abs() > c.clip).double().mean())):
                    key = f"if_{other}/{name}"
                    stats_acc[key] = stats_acc.get(key, 0.0) + float(v)
                stats_acc["policy_loss"] = stats_acc.get("policy_loss", 0.0) + float(pg.detach())
                stats_acc["value_loss"] = stats_acc.get("value_loss", 0.0) + float(vl.detach())
                stats_acc["grad_norm"] = stats_acc.get("grad_norm", 0.0) + grad_norm
                minibatch_stats.append(stats_acc)
        return {f"ppo/{k}": v for k, v in self._global_minibatch_stats(minibatch_stats).items()}

    def _global_minibatch_stats(self, rows: list[dict[str, float]]) -> dict[str, float]:
        """Each statistic averaged over the minibatches, of the global minibatch (every process's rows): this
        process's values are of its share only, so means are averaged over the processes (the shares are equal)
        and maxima / minima taken over them before the average over minibatches."""
        if not rows:
            return {}
        names = list(rows[0])
        values = torch.tensor([[r[n] for n in names] for r in rows], dtype=torch.float64)   # [minibatches, stats]
        if self.distributed:
            kind = torch.tensor([1.0 if n.endswith("_max") else -1.0 if n.endswith("_min") else 0.0 for n in names],
                                dtype=torch.float64)
            means = self._all_sum(values * (kind == 0)) / self.world
            extremes = values * torch.where(kind == 0, 0.0, kind)  # minima as maxima of their negatives
            t = extremes.to(self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            extremes = t.cpu() * torch.where(kind == 0, 0.0, kind)
            values = torch.where(kind == 0, means, extremes)
        return {n: float(v) for n, v in zip(names, values.mean(0))}

    def _pathwise_update(self, step, inputs, targets_unused, anchor, weights) -> dict:
        c = self.cfg.ppo
        alpha = self.corrector.config.alpha
        global_rows = self._local_rows()
        self.corrector.train()
        self.projector.eval()
        for p in self.projector.parameters():
            p.requires_grad_(False)
        minibatch_stats: list[dict[str, float]] = []
        try:
            for epoch in range(c.epochs):
                keys = None if epoch == 0 else torch.rand(self.arith["rollouts_per_step"],
                                                          generator=derived_generator(self.cfg.seed, "mb", step, epoch))
                for rows in ppo.minibatch_layout(global_rows, c.minibatches, keys):
                    rows = rows.to(self.device)
                    mean, value, _ = self.policy_model(inputs.z0[rows], *inputs.for_corrector(rows))
                    zc = inputs.z0[rows] + alpha * mean
                    out = self.projector(zc, inputs.text_tokens[rows], inputs.pooled[rows], inputs.text_mask[rows],
                                         inputs.aspect_mask[rows])
                    objective = ppo.weighted_reward(out.scores, weights[rows]).mean()
                    loss = -objective + c.value_coef * ppo.value_loss(value, ppo.weighted_reward(
                        out.scores.detach(), weights[rows]))
                    if anchor is not None:
                        loss = loss + ppo.anchor_penalty(zc, anchor[rows], self.cfg.anchor_beta)
                    self.policy_opt.zero_grad(set_to_none=True)
                    loss.backward()
                    grad_norm = self._clip()
                    self.policy_opt.step()
                    minibatch_stats.append({"objective": float(objective.detach()), "grad_norm": grad_norm})
        finally:
            for p in self.projector.parameters():
                p.requires_grad_(True)
        return {f"pathwise/{k}": v for k, v in self._global_minibatch_stats(minibatch_stats).items()}

    def _clip(self) -> float:
        """Clip the policy's gradients and the value head's each to ``optim.max_grad_norm``; returns the policy's
        norm. One shared norm let the value loss rescale every policy step (the value head reads the trunk
        through a stop-gradient so that it never moves the policy; a joint clip moved it anyway)."""
        value = getattr(self.corrector, "value_head", None)
        head = [p for p in value.parameters() if p.grad is not None] if value is not None else []
        value_ids = {id(p) for p in head}
        # only what the optimiser steps: a frozen part's stale gradient (the latent reader's, left by its fit)
        # entered the norm and clipped the real update
        stepped = {id(p) for group in self.policy_opt.param_groups for p in group["params"]}
        policy = [p for p in self.corrector.parameters()
                  if p.grad is not None and id(p) not in value_ids and id(p) in stepped]
        if self.cfg.optim.max_grad_norm:
            if head:
                torch.nn.utils.clip_grad_norm_(head, self.cfg.optim.max_grad_norm)
            return float(torch.nn.utils.clip_grad_norm_(policy, self.cfg.optim.max_grad_norm)) if policy else 0.0
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in policy]))) if policy else 0.0

    def train_step(self) -> dict:
        """One PPO (or pathwise) step; returns its metrics row."""
        cfg, step = self.cfg, self.step
        timer = _Timer(self.cfg.trainer_threads)
        t0 = time.perf_counter()
        items, state = self._encode(step, timer)
        inputs = prompt_inputs(state, self.device, cfg.ppo.group_size, corrector=self.corrector)
        n_global = self.arith["rollouts_per_step"]
        with timer("sample"):
            noise = torch.randn((n_global,) + tuple(inputs.z0.shape[1:]),
                                generator=derived_generator(cfg.seed, "noise", step))[self._local_rows()]
            layout = ppo.minibatch_layout(self._local_rows(), cfg.ppo.minibatches if cfg.rl == "ppo" else 1, None)
            rollouts = sample_rollouts(self.policy, inputs, noise.to(self.device), layout)
        row: dict[str, Any] = {"step": step + 1}
        decode_now = cfg.reward_model == "image" or step % cfg.projector.refresh_every == 0
        result = None
        if decode_now:
            _, result = self._decode_and_score(state, rollouts.zc, timer)
        with timer("score"):
            if cfg.reward_model == "image":
                weights = self._weights(inputs.pooled, result.present.to(self.device))
                rewards = ppo.weighted_reward(result.scores.to(self.device).float(), weights)
            else:
                weights = self._weights(inputs.pooled, inputs.aspect_mask)
                with torch.no_grad():
                    self.projector.eval()
                    pred = self.projector(rollouts.zc, inputs.text_tokens, inputs.pooled, inputs.text_mask,
                                          inputs.aspect_mask)
                rewards = ppo.weighted_reward(pred.scores, weights)
            anchor = self._anchor(items, inputs)
            if cfg.rl == "ppo":
                adv, targets = self._advantages(rewards, rollouts.value)
        lr_used = float(self.scheduler.get_last_lr()[0])  # the step's own rate (the scheduler steps after it)
        with timer("update"):
            if cfg.rl == "ppo":
                row.update(self._ppo_update(step, inputs, rollouts, adv, targets, anchor))
            else:
                row.update(self._pathwise_update(step, inputs, rewards, anchor, weights))
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.corrector)
        if decode_now:
            if cfg.anchor == "ref":
                self._update_refs(items, rollouts.zc, result)
            if cfg.reward_model == "projector":
                with timer("projector"):
                    self.buffer.add(self._slot(inputs, rollouts.zc, result))
                    # The newest slot plus a few random older ones: the fit's cost stays bounded
                    # while the buffer keeps R_phi from forgetting earlier policies.
                    gen = derived_generator(cfg.seed, "replay", step)
                    older = torch.randperm(len(self.buffer) - 1, generator=gen)[:cfg.projector.refresh_replay]
                    fit = self._fit(cfg.projector.refresh_epochs, step,
                                    slots=older.tolist() + [len(self.buffer) - 1])
                row.update({f"projector/{k}": v for k, v in fit.items()})
        self.step += 1
        # Global means of what the batch saw.
        present = result.present.float().cpu() if result is not None else torch.zeros(rewards.shape[0], 3)
        scores = torch.nan_to_num(result.scores.float().cpu(), nan=0.0) if result is not None else torch.zeros_like(present)
        lam = rollouts.lam
        top = lam.flatten(1).sort(dim=1, descending=True).values
        k20 = max(1, int(round(0.2 * top.shape[1])))
        sums = self._all_sum(torch.cat([
            torch.stack([rewards.sum().cpu().double(), torch.tensor(float(rewards.shape[0]), dtype=torch.float64)]),
            (scores * present).sum(0).double(), present.sum(0).double(),
            torch.stack([lam.mean(dim=(1, 2)).sum().cpu().double(),
                         (top[:, :k20].sum(1) / top.sum(1).clamp_min(1e-12)).sum().cpu().double(),
                         rollouts.delta.square().mean(dim=(1, 2, 3)).sqrt().sum().cpu().double()])]))
        n = sums[1]
        row["reward/joint_" + ("image" if cfg.reward_model == "image" else "policy")] = float(sums[0] / n)
        if result is not None:
            for i, aspect in enumerate(("count", "color", "position")):
                row[f"reward/{aspect}"] = float(sums[2 + i] / sums[5 + i]) if sums[5 + i] > 0 else float("nan")
            if cfg.reward_model == "projector":
                img_w = self._weights(inputs.pooled, result.present.to(self.device))
                img = ppo.weighted_reward(result.scores.to(self.device).float(), img_w)
                s = self._all_sum(torch.stack([img.sum().cpu().double()]))
                row["reward/joint_image"] = float(s[0] / n)
        row["lam/mean"] = float(sums[8] / n)
        row["lam/top20_share"] = float(sums[9] / n)
        row["policy/delta_rms"] = float(sums[10] / n)
        row["policy/std"] = float(self.corrector.log_std.detach().exp().mean())
        row["lr"] = lr_used
        row["decodes"] = n_global if decode_now else 0
        mon_every, eval_every = cfg.log.monitor_every, cfg.log.evaluate_every
        if self.is_main and self.monitor_items and (
                (mon_every and self.step % mon_every == 0) or (eval_every and self.step % eval_every == 0)):
            row.update(self._monitor(timer, evaluate=bool(eval_every and self.step % eval_every == 0 and self.is_shapes),
                                     correlate=bool(mon_every and self.step % mon_every == 0)))
        total = time.perf_counter() - t0
        for phase, secs in timer.seconds.items():
            row[f"time/{phase}"] = secs
        row["time/step"] = total
        core = timer.seconds["encode"] + timer.seconds["decode"] + timer.seconds["reward"]
        row["time/overhead_fraction"] = (total - core) / total if total > 0 else float("nan")
        row["time/rollouts_per_s"] = n_global / total if total > 0 else float("nan")
        return row

    # ------------------------------------------------------------------ monitoring

    def eval_corrector(self) -> ResidualCorrector:
        """The corrector evaluation uses: the EMA when on, else the trained weights."""
        return self.ema.copy_into(self.corrector) if self.ema is not None else self.corrector

    def _monitor(self, timer: _Timer, evaluate: bool, correlate: bool) -> dict:
        with timer("monitor"):
            if self.monitor_state is None:
                self.monitor_state = encode_items(self.backbone, self.monitor_items)
            state = self.monitor_state
            inputs = prompt_inputs(state, self.device, corrector=self.corrector)
            corrector = self.eval_corrector()
            corrector.eval()
            with torch.no_grad():
                zc, _ = corrector.correct(inputs.z0, *inputs.for_corrector())
                self.projector.eval()
                pred = self.projector(zc, inputs.text_tokens, inputs.pooled, inputs.text_mask, inputs.aspect_mask)
        decoded, result = self._decode_and_score(state, zc, timer, group_size=1)
        decoded = decoded[0]
        row = {}
        with timer("monitor"):
            present = result.present.cpu()
            scores = result.scores.cpu()
            p = pred.scores.cpu()
            # With reward_model=image R_phi is never trained: there is nothing to monitor for hacking.
            uses_projector = self.cfg.reward_model == "projector"
            for i, aspect in enumerate(("count", "color", "position")):
                m = present[:, i]
                if uses_projector and correlate:
                    row[f"monitor/corr_{aspect}"] = ppo.pearson(p[m, i], scores[m, i])
                row[f"monitor/reward_{aspect}"] = float(scores[m, i].mean()) if m.any() else float("nan")
            w = self._weights(inputs.pooled, result.present.to(self.device)).cpu()
            img = ppo.weighted_reward(scores.float(), w)
            proj = ppo.weighted_reward(p.float(), w)
            if uses_projector and correlate:
                row["monitor/corr_joint"] = ppo.pearson(proj, img)
                row["monitor/projected_joint"] = float(proj.mean())
            row["monitor/reward_joint"] = float(img.mean())
        if evaluate:
            with timer("evaluate"):
                from xlard.shapes import evaluator as E

                verdicts = E.evaluate(decoded.images.cpu(), [it.record for it in self.monitor_items])
                row["monitor/evaluator"] = sum(v.correct for v in verdicts) / len(verdicts)
        return row

    # ------------------------------------------------------------------ checkpoints

    def _rank_state(self) -> dict:
        return {"buffer": self.buffer.state_dict(), "refs": dict(self.refs), "rng": ckpt.rng_state()}

    def replica_difference(self) -> float:
        """Largest difference between this process's corrector and projector weights and rank 0's (0 = identical)."""
        if not self.distributed:
            return 0.0
        flat = torch.cat([p.detach().double().flatten() for m in (self.corrector, self.projector)
                          for p in m.state_dict().values()]).to(self.device)
        reference = flat.clone()
        dist.broadcast(reference, src=0)
        diff = (flat - reference).abs().max().reshape(1)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        return float(diff)

    def _check_finite(self) -> None:
        """Stop the run when this step's update left a NaN or an infinity in the models: nothing after it would be
        worth keeping, and its checkpoints would push the last good ones out (``log.keep_checkpoints``)."""
        parts = (("corrector", self.corrector.parameters()), ("projector", self.projector.parameters()),
                 ("EMA", self.ema.shadow.values() if self.ema is not None else ()))
        for name, tensors in parts:
            if all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point()):
                continue
            found = ckpt.list_checkpoints(self.out)
            last = (f"its newest checkpoint, {found[-1][1].name} (step {found[-1][0]}), is untouched" if found else
                    "it has no checkpoint yet")
            o = self.cfg.optim
            raise ValueError(f"step {self.step}: the {name}'s weights became NaN or infinite in this step's update "
                             f"(the optimisation diverged); the run stopped without checkpointing them, and {last}; "
                             f"train again with a lower optim.lr (now {o.lr:g}) or optim.max_grad_norm (now "
                             f"{o.max_grad_norm:g}; 0 is off), into a new --out")

    def save(self) -> Path | None:
        """Write a checkpoint of everything (rank 0 writes; every rank contributes its buffer and RNGs).

        Raises:
            RuntimeError: the processes' models have drifted apart (DDP replicas must stay identical).
        """
        drift = self.replica_difference()
        if drift != 0.0:
            raise RuntimeError(f"step {self.step}: the replicas' weights differ by up to {drift:.3g}; "
                               "distributed training lost synchronisation")
        local = self._rank_state()
        if self.distributed:
            gathered = [None] * self.world if self.is_main else None
            dist.gather_object(local, gathered, dst=0)
        else:
            gathered = [local]
        if not self.is_main:
            return None
        state = {
            "format": "xlard.train/1", "step": self.step, "warm": self.warm, "world_size": self.world,
            "distilled": self.distilled, "distill_stats": self.distill_stats,
            "config": self.cfg.to_dict(), "corrector": self.corrector.state_dict(),
            "projector": self.projector.state_dict(), "policy_opt": self.policy_opt.state_dict(),
            "projector_opt": self.projector_opt.state_dict(), "scheduler": self.scheduler.state_dict(),
            "ema": None if self.ema is None else self.ema.shadow, "reward_stats": self.reward_stats.state_dict(),
            "data_position": self.data.position(self.step), "rank_state": gathered,
            "reward_options": self._reward_options(), "inputs": self.inputs,
        }
        path = ckpt.save_atomic(state, ckpt.checkpoint_path(self.out, self.step))
        for _, old in ckpt.list_checkpoints(self.out)[:-self.cfg.log.keep_checkpoints]:
            old.unlink()
        return path

    def _reward_options(self) -> dict:
        """The run's ``reward.options`` with the source settings whose defaults have changed written out
        (:func:`xlard.sources.resolved_options`): recorded in checkpoints and the exported corrector."""
        return sources.resolved_options(resolve_source_name(self.cfg.reward, self.cfg.backbone.name),
                                        self.cfg.reward.options)

    def _check_world_size(self, path: Path, state: dict) -> None:
        if state.get("world_size") != self.world:
            raise ValueError(f"--resume: {path} was written by {state.get('world_size')} process(es); resume with the "
                             f"same number (got {self.world}) so every process gets its buffer back")

    def _model_folders(self) -> dict[str, str]:
        """The local folders of the models the run reads: the backbone, the reward source's model (the shapes
        understanding model, a CLIP folder) and the latent eyes of a count rule that reads the latent."""
        from xlard._args import cached_snapshot

        folders: dict[str, str] = {}
        where = getattr(getattr(self.backbone, "pipeline", None), "name_or_path", None)
        if isinstance(where, str) and os.path.isdir(where):
            folders["backbone"] = where
        elif isinstance(where, str):  # a hub id: its snapshot in the local cache (a newer download is noticed)
            options = self.cfg.backbone.options
            snapshot = cached_snapshot(where, "model_index.json", options.get("revision"), options.get("cache_dir"))
            if snapshot is not None:
                folders["backbone"] = snapshot
        options = dict(self.cfg.reward.options)
        name = getattr(self.reward_fn, "source_name", None)
        if name == "shapes" and not isinstance(options.get("model"), torch.nn.Module):
            from xlard.shapes.understanding import model_path

            folders["reward"] = str(model_path(options.get("path")))
        elif isinstance(options.get("model"), str) and os.path.isdir(os.path.expanduser(options["model"])):
            folders["reward"] = os.path.expanduser(options["model"])
        elif isinstance(options.get("model"), str) and (clip := cached_snapshot(options["model"], "config.json")):
            folders["reward"] = clip  # a CLIP model's hub id: its snapshot in the local cache
        config = self.corrector.config
        if (config.count_edit or config.count_move) and getattr(config, "count_eyes", "decoded") == "latent":
            from xlard.shapes.latent_eyes import latent_model_path

            folders["latent_eyes"] = str(latent_model_path())
        return folders

    def _check_inputs(self, path: Path, state: dict) -> None:
        """A resume reads the prompts and the model files (those fingerprinted so far in ``self.inputs``) the run
        started with (a checkpoint written before 2026-12-07 records none: not checked)."""
        stored = state.get("inputs")
        if not isinstance(stored, dict):
            return
        what = {"records_sha256": f"the prompt records of data.prompts ({self.cfg.data.prompts})",
                "monitor_records_sha256": f"the monitor's records (data.monitor_prompts: "
                                          f"{self.cfg.data.monitor_prompts})"}
        changed = [text for key, text in what.items() if stored.get(key) != self.inputs[key]]
        old_models = stored.get("models") if isinstance(stored.get("models"), dict) else {}
        variables = {"backbone": "XLARD_SHAPES_BACKBONE", "reward": "XLARD_SHAPES_UNDERSTANDING",
                     "latent_eyes": "XLARD_SHAPES_LATENT_EYES"}
        models = [key for key, digest in self.inputs["models"].items()
                  if key in old_models and old_models[key] != digest
                  and old_models[key] != _legacy_folder_fingerprint(self._model_dirs[key])]
        changed += [f"the {key.replace('_', ' ')} model's files ({self._model_dirs[key]})" for key in models]
        if changed:
            hint = "; ".join(f"${variables[key]} names another {key.replace('_', ' ')} model" for key in models
                             if variables[key] in os.environ)
            raise ValueError(f"--resume: {path} was trained on other inputs: {'; '.join(changed)} changed since the "
                             "run started (a resumed run on them would mix two runs)" + (f" ({hint})" if hint else "")
                             + "; give the run its files back, or start a new run")

    def _load(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path, map_location="cpu")
        self._check_world_size(path, state)
        self._check_inputs(path, state)
        try:
            self.corrector.load_state_dict(state["corrector"])
            self.projector.load_state_dict(state["projector"])
        except (RuntimeError, KeyError, TypeError) as exc:  # another architecture's (or a foreign) checkpoint
            reason = short_reason(exc)
            raise ValueError(f"--resume: {path} holds models of another shape than this run's config builds "
                             f"(a checkpoint of another run?): {reason}") from None
        self.policy_opt.load_state_dict(state["policy_opt"])
        self.projector_opt.load_state_dict(state["projector_opt"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.shadow = {k: v.to(self.device) for k, v in state["ema"].items()}
        self.reward_stats.load_state_dict(state["reward_stats"])
        mine = state["rank_state"][self.rank]
        self.buffer.load_state_dict(mine["buffer"])
        self.refs = dict(mine["refs"])
        ckpt.set_rng_state(mine["rng"])
        self.step, self.warm = state["step"], state["warm"]
        self.distilled, self.distill_stats = state.get("distilled", False), dict(state.get("distill_stats") or {})

    @torch.no_grad()
    def calibrate_alpha(self, corrector) -> tuple[float, dict[str, float], dict[str, float]]:
        """The exported step size: ``corrector.alpha x`` a multiplier of ``export.alpha_grid``.

        The mean correction of ``corrector`` is applied with every multiplier to
        a fixed batch of fresh training-split items (seeds the training never
        draws), the images are decoded and scored with the run's *training*
        reward. The reference multiplier (1 when the grid has it, else the
        smallest) is kept unless another one's mean joint reward beats it,
        paired on the same items, by more than ``export.min_gain_se`` standard
        errors; among those that do, the highest mean wins (ties: the smaller).
        Returns (alpha, {multiplier: mean joint reward},
        {multiplier: standard error of its paired difference to the reference}).
        """
        grid = tuple(float(m) for m in self.cfg.export.alpha_grid)
        alpha = float(corrector.config.alpha)
        if grid == (1.0,):
            return alpha, {}, {}
        items = self._fresh_items(self.records, self.cfg.export.calibration_size, "calibration", CALIBRATION_SEED_BASE)
        timer = _Timer(self.cfg.trainer_threads)
        state = encode_items(self.backbone, items)
        inputs = prompt_inputs(state, self.device, corrector=corrector)
        corrector.eval()
        delta, _ = corrector.actions(inputs.z0, *inputs.for_corrector())  # the inference path (autocast too)
        per_item: dict[float, torch.Tensor] = {}
        # Multiplier 0 (no correction) is scored for reference only; it is never chosen.
        for m in (0.0,) + grid:
            try:
                _, result = self._decode_and_score(state, inputs.z0 + alpha * m * delta, timer, group_size=1)
            except ValueError as exc:  # a multiplier whose latents cannot be decoded: a failed candidate, not a
                if m in (0.0, reference_multiplier(grid)):  # lost run (the export comes after every step)
                    raise
                self._say(f"step-size calibration: x{m:g} dropped ({' '.join(str(exc).split())[:160]})")
                continue
            w = self._weights(inputs.pooled, result.present.to(self.device)).cpu()
            per_item[m] = ppo.weighted_reward(torch.nan_to_num(result.scores.float().cpu()), w).double()
        grid = tuple(m for m in grid if m in per_item)
        best, scores, ses = choose_multiplier(per_item, grid, self.cfg.export.min_gain_se)
        self._say("step-size calibration (mean joint training reward on fresh training-split items): "
                  + ", ".join(f"x{k} {v:.4f}" for k, v in scores.items())
                  + f"; paired s.e. vs x{reference_multiplier(grid):g}: "
                  + ", ".join(f"x{k} {v:.4f}" for k, v in ses.items())
                  + f" -> x{best:g}")
        return alpha * best, scores, ses

    def export(self) -> dict:
        """Write the trained corrector (EMA when on) as a corrector folder and R_phi; returns their paths.

        The corrector folder (:func:`xlard.evaluation.save_corrector_dir`) records
        the backbone, ``correction_step``, alpha, steps and guidance it was trained
        with, so ``xlard eval --corrector DIR`` rebuilds the same split, and the
        reward source with its options (``reward_source``, ``reward_options``,
        ``reward_bind_color``), so that ``scripts/validate_corrector.py`` scores
        with the reward the run optimised.
        """
        from xlard.evaluation import CorrectorMeta, sampler_of, save_corrector_dir

        corrector = self.eval_corrector()
        bb = self.backbone
        alpha, calibration, calibration_se = self.calibrate_alpha(corrector)
        meta = CorrectorMeta(
            backbone=_absolute_folder(self.cfg.backbone.name), correction_step=float(bb.correction_step),
            alpha=alpha, num_inference_steps=int(bb.num_inference_steps),
            guidance_scale=float(bb.guidance_scale),
            # what the backbone says (None for a T5 length or negative prompt is a setting; not for the rest)
            sampler={**{k: v for k, v in sampler_of(bb).items()
                        if v is not None or k in ("max_sequence_length", "negative_prompt")},
                     # a hub revision: without it the corrector's backbone was loaded from main
                     **({"revision": str(self.cfg.backbone.options["revision"])}
                        if self.cfg.backbone.options.get("revision") is not None
                        and not os.path.isdir(os.path.expanduser(self.cfg.backbone.name)) else {})},
            training={"run": os.path.realpath(self.out), "step": int(self.step), "ema": self.ema is not None,
                      "reward_source": getattr(self.reward_fn, "source_name", None),
                      "reward_options": {k: _absolute_folder(v) if k in ("model", "path", "tokenizer") else v
                                         for k, v in self._reward_options().items()},  # the sources' folders
                      "reward_bind_color": self.cfg.reward.bind_color,
                      "training_alpha": float(corrector.config.alpha),
                      **({"left_out_fraction": float(self.cfg.data.leave_out),
                          "left_out_records": [dict(r) for r in self.left_out_records]}
                         if self.left_out_records else {}),
                      **({"distill": {**dataclasses.asdict(self.cfg.distill), **self.distill_stats}}
                         if self.distilled else {}),
                      **({"alpha_calibration": calibration, "alpha_calibration_se": calibration_se,
                          "alpha_calibration_min_gain_se": float(self.cfg.export.min_gain_se)}
                         if calibration else {})})
        corrector_dir = save_corrector_dir(self.out / "corrector", corrector, meta)
        projector_dir = self.projector.save_pretrained(self.out / "projector")
        return {"corrector": str(corrector_dir), "projector": str(projector_dir)}

    # ------------------------------------------------------------------ the run

    def _finished_summary(self) -> dict | None:
        """The run's summary when it was resumed at its last step and its exports are complete, else None."""
        if self.resume_from is None or self.step < self.cfg.steps or self.distributed:  # (processes might not agree)
            return None
        try:
            summary = json.loads((self.out / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):  # an export cut short: made again
            return None
        complete = isinstance(summary, dict) and summary.get("steps") == self.step and all(
            (self.out / name).is_dir() for name in ("corrector", "projector"))
        return summary if complete else None

    def run(self) -> dict:
        """Warm start (unless resumed past it), then train to ``cfg.steps``; returns a summary."""
        cfg = self.cfg
        self._say(describe(cfg, self.world))
        if self.resume_from is not None:
            note = f" (resuming from {self.resume_from.name}, step {self.step})"
        elif self.resume_requested:  # a typo in --out would otherwise start over without a word
            note = " (--resume: no checkpoint there yet, so a new run starts)"
        else:
            note = ""
        self._say(f"run folder: {self.out}{note}")
        finished = self._finished_summary()
        if finished is not None:  # re-exporting (the step-size calibration decodes for minutes) changed nothing
            self._say(f"the run finished at step {self.step} of {cfg.steps}; its exports are in place (see "
                      f"{self.out / 'summary.json'}): nothing to do")
            self.log.close()
            return finished
        if cfg.distill.items_per_tag and not self.distilled:
            self.distill()
            self.save()
        if not self.warm:
            self.warm_start()
            self.save()
        bar = None
        if self.is_main and cfg.log.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", file=sys.stderr)
        try:  # the bar is closed on Ctrl-C too: the interrupt line is then the last line, not glued to it
            last_checkpoint_seconds = 0.0
            while self.step < cfg.steps:
                row = self.train_step()
                row["time/last_checkpoint"] = last_checkpoint_seconds
                if self.is_main:
                    # The row goes to disk before the checkpoint of its step: a run killed in between
                    # resumes from the previous checkpoint and rewrites the row, so none is ever lost.
                    self.log.write(row)
                self._check_finite()  # before a checkpoint could rotate the last good one out
                if self.step % cfg.log.checkpoint_every == 0 or self.step == cfg.steps:
                    t = time.perf_counter()
                    self.save()
                    if self.is_main and cfg.log.curve:
                        draw_curves(self.log.rows, self.out / "curve.png")
                    last_checkpoint_seconds = time.perf_counter() - t
                if self.is_main:
                    if bar is not None:
                        key = "reward/joint_image" if "reward/joint_image" in row else "reward/joint_policy"
                        # refresh=False: drawn by update() at tqdm's interval, not at every step (a log file
                        # of stderr grew by a redraw per step)
                        bar.set_postfix({"reward": f"{row.get(key, float('nan')):.3f}",
                                         "kl": f"{row.get('ppo/approx_kl', float('nan')):.2e}"}, refresh=False)
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        summary = {"steps": self.step, "out": str(self.out), "world_size": self.world,
                   "replica_max_difference": self.replica_difference()}
        if self.is_main:
            summary.update(self.export())
            if cfg.log.curve and self.log.rows:
                draw_curves(self.log.rows, self.out / "curve.png")
                summary["curve"] = str(self.out / "curve.png")
            self.log.close()
            _io.atomic_write_json(self.out / "summary.json", summary, owner="xlard train")
        if self.distributed:
            dist.barrier()
        return summary


_MISSING = object()


def _config_differences(old, new, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(dotted key, old value, new value)`` for every leaf where two config dicts differ (values shown short)."""
    def short(value) -> str:
        text = json.dumps(value, default=list) if value is not _MISSING else "(absent)"
        return text if len(text) <= 60 else text[:57] + "..."

    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_differences(a, b, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", short(a), short(b)))
    return out


class PeerFailure(OSError):
    """A distributed run's collective failed because another process stopped or its connection broke."""


def _peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective's failure on a lost peer (gloo's or NCCL's), not a bug of this process."""
    errors = tuple(getattr(dist, name) for name in ("DistError",) if hasattr(dist, name))
    if errors and isinstance(exc, errors):
        return True
    text = str(exc)
    return any(mark in text for mark in ("gloo/transport", "Connection closed by peer", "Connection reset by peer",
                                         "NCCL communicator was aborted"))


def train(cfg: TrainConfig, resume: bool = False, backbone=None) -> dict:
    """Run (or resume) a training run; see :class:`Trainer`.

    Example:
        >>> from xlard.train import load_config, train
        >>> # configs/ of the repository's checkout
        >>> cfg = load_config("configs/shapes.yaml", overrides={"steps": 20, "out": "runs/try"})  # doctest: +SKIP
        >>> summary = train(cfg)   # minutes on a CPU; writes the run folder runs/try  # doctest: +SKIP
    """
    cfg = check_train_config("train", cfg)
    ours = not dist.is_initialized()  # the trainer starts the process group of a torchrun launch: it ends it
    trainer = None
    try:
        trainer = Trainer(cfg, resume=resume, backbone=backbone)
        return trainer.run()
    except RuntimeError as exc:
        if trainer is not None and trainer.distributed and _peer_failure(exc):
            # another process died or its connection broke: one line (as the command line prints an OSError),
            # not gloo's 30-line traceback, and what to do
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise PeerFailure(f"process {trainer.rank} of {trainer.world}: another process of the run stopped or "
                              f"its connection broke ({first[:300]}); every checkpoint written is complete: start "
                              f"all {trainer.world} processes again with --resume") from exc
        raise
    finally:
        if trainer is not None:
            trainer.release()
        if ours and dist.is_initialized():
            _destroy_process_group(trainer, sys.exc_info()[1])


def _destroy_process_group(trainer: "Trainer | None", error: BaseException | None = None) -> None:
    """End a distributed run's process group without the exit deadlock of DDP's reducer.

    A DDP wrapper's reducer holds the process group; were it the last holder (the wrappers die with the
    trainer, after ``destroy_process_group`` let go of the group), the group's destructor would run inside
    the reducer's deallocation, holding the GIL, and join gloo's worker threads, one of which may still be
    freeing the last collective's tensors and waiting for that GIL: the process then never exits (seen once
    in fourteen two-process runs on the CPU: ``~ProcessGroupGloo`` in ``thread::join`` under ``~Reducer`` on
    the main thread, a gloo worker in ``gil_scoped_acquire`` under ``~AsyncBarrierWork``). So the wrappers go first,
    while the registry still holds the group, and ``destroy_process_group`` drops the last reference, where
    torch's binding releases the GIL around the destructor.

    ``error``: the exception the run is ending with, if any. Its traceback's finished frames (the trainer's
    constructor, ``fit_projector``, DDP's forward) still hold the wrappers; their local variables are cleared
    (the traceback's text is kept) so that the wrappers can go first on that path too."""
    if trainer is not None and hasattr(trainer, "policy"):
        trainer.policy_model, trainer.projector_model = trainer.policy, trainer.projector
    seen = set()
    while error is not None and id(error) not in seen:  # the exception, its cause and context (PeerFailure's)
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)  # frames still executing (this one's callers) are skipped
        error = error.__cause__ or error.__context__
    gc.collect()  # a wrapper in a reference cycle would otherwise be freed later, by the collector, the same way
    dist.destroy_process_group()
