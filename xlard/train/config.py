"""The trainer's configuration: typed dataclasses, loaded from YAML or JSON.

Every section is a frozen dataclass validated on construction. :func:`load_config`
reads a file, rejects unknown keys at every level (naming the section and the
known keys), checks every value's type and domain, and returns a
:class:`TrainConfig`. :func:`describe` renders the resolved config with the batch
arithmetic, printed at the start of a run and saved beside it as ``config.json``.

Example (the repository's ``configs/`` hold full configs: ``load_config("configs/shapes.yaml")``; here a
small JSON file, every field it leaves out at its default):
    >>> import json, os, tempfile
    >>> from xlard.train.config import describe, load_config
    >>> path = os.path.join(tempfile.mkdtemp(), "run.json")
    >>> with open(path, "w") as f:
    ...     json.dump({"steps": 20, "backbone": {"name": "shapes"}, "model": {"corrector": "tiny"}}, f)
    >>> cfg = load_config(path, overrides={"steps": 5, "ppo.epochs": 2})
    >>> cfg.steps, cfg.ppo.epochs, cfg.backbone.name
    (5, 2, 'shapes')
    >>> print(describe(cfg, world_size=1))
    {
      "steps": 5,
    ...
    batch arithmetic:
      8 (prompt, seed) items x 4 samples = 32 rollouts per step; 1 process(es) x 32
    ...
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from xlard import _io
from xlard._optional import missing_message

__all__ = [
    "BackboneSettings", "DataSettings", "RewardSettings", "ModelSettings", "PPOSettings", "OptimSettings",
    "ProjectorSettings", "LogSettings", "ExportSettings", "DistillSettings", "TrainConfig", "load_config", "config_from_dict", "describe",
    "batch_arithmetic", "check_train_config",
]


def _plain_number(value, depth: int = 0):
    """``value`` with every number in it (inside mappings, lists and tuples too) a plain bool, int or float."""
    if value is None or isinstance(value, (str, bool)) or type(value) in (int, float):
        return value
    if getattr(getattr(value, "dtype", None), "kind", None) == "b" and getattr(value, "shape", None) == ():
        return bool(value)  # numpy's bool is no numbers.Integral
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if depth < _MAX_DEPTH and isinstance(value, Mapping):
        return {_plain_number(k, depth + 1): _plain_number(v, depth + 1) for k, v in value.items()}
    if depth < _MAX_DEPTH and isinstance(value, (list, tuple)):
        return type(value)(_plain_number(v, depth + 1) for v in value) if type(value) in (list, tuple) else value
    return value


def _plain_numbers(obj) -> None:
    """Every number of ``obj``'s fields as a plain int or float, in mappings and lists too: a numpy integer passed
    the checks (``numbers.Integral``) and then broke the writing of ``config.json`` after the backbone had loaded
    (as a field, or inside ``backbone.options`` or ``model.corrector_overrides``)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        plain = _plain_number(value)
        if plain is not value:
            object.__setattr__(obj, f.name, plain)


def _fail(owner: str, name: str, expected: str, value: Any) -> None:
    key = f"{owner}.{name}" if owner else name  # top-level keys ("steps", "seed") have no section
    raise ValueError(f"train config: {key} must be {expected}, got {value!r}")


def _int(owner, name, value, minimum=None, optional=False, maximum=None):
    if optional and value is None:
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or (minimum is not None and value < minimum) \
            or (maximum is not None and value > maximum):
        if maximum is not None:
            want = f"an integer in [{minimum}, {maximum}]"
        else:
            want = f"an integer >= {minimum}" if minimum is not None else "an integer"
        _fail(owner, name, want, value)


#: The backbone's own bounds (``xlard.backbones.diffusers_backbone.MAX_STEPS`` and ``MAX_GUIDANCE``, not imported:
#: that module imports diffusers), checked here before the backbone loads.
MAX_INFERENCE_STEPS = 10_000
MAX_GUIDANCE = 1000.0

#: Bounds on the sizes of a run's item lists (past them a list of 10**9 items ran out of memory after the
#: backbone loaded) and on the trainer's threads (libgomp aborted the process allocating 100000000 of them).
MAX_ITEMS = 1_000_000
MAX_THREADS = 1024
MAX_ALPHA_GRID = 64  # export.alpha_grid's length: each multiplier decodes and scores the calibration batch


def _real(owner, name, value, low=-math.inf, high=math.inf, low_open=False, high_open=False):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    try:
        ok = ok and math.isfinite(value)
    except OverflowError:  # an int past float's range (10**400)
        ok = False
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        # an infinite bound is open: "in (0.0, inf]" contradicted "finite"
        lo, hi = "(" if low_open or math.isinf(low) else "[", ")" if high_open or math.isinf(high) else "]"
        _fail(owner, name, f"a finite number in {lo}{low}, {high}{hi}", value)


def _choice(owner, name, value, choices):
    if value not in choices:
        _fail(owner, name, "one of " + ", ".join(repr(c) for c in choices), value)


def _expand_home(obj, name: str) -> None:
    """A path field starting with ``~`` (``~/runs``, ``~user/x``) as the shell would expand it."""
    value = getattr(obj, name)
    if isinstance(value, str) and value.startswith("~"):
        object.__setattr__(obj, name, os.path.expanduser(value))


def _str(owner, name, value, optional=False):
    if optional and value is None:
        return
    if not isinstance(value, str) or not value.strip():
        _fail(owner, name, "a non-empty string", value)


def _bool(owner, name, value):
    if not isinstance(value, bool):
        _fail(owner, name, "true or false", value)


def _mapping(owner, name, value):
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        _fail(owner, name, "a mapping with string keys", value)


@dataclass(frozen=True)
class BackboneSettings:
    """Which frozen generator, and where it is split.

    Attributes:
        name: ``"shapes"`` (the embedded shapes-world model), a local diffusers
            pipeline folder, or a hub model id.
        correction_step: fraction of the denoising run before the correction (0, 1].
        num_inference_steps: denoising steps; None = the backbone's default
            (20 for shapes).
        guidance_scale: classifier-free guidance; None = the backbone's default.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (cuda:LOCAL_RANK when CUDA is
            available, else cpu).
        dtype: the pipeline's dtype, ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        options: more keyword arguments of
            :meth:`xlard.backbones.DiffusersBackbone.from_pretrained`
            (``height``, ``width``, ``max_sequence_length``, ``negative_prompt``, ...).
    """

    name: str = "shapes"
    correction_step: float = 0.6
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    device: str = "auto"
    dtype: str = "float32"
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        _plain_numbers(self)
        o = "backbone"
        _mapping(o, "options", self.options)
        bad = sorted({"correction_step", "num_inference_steps", "guidance_scale", "device", "torch_dtype", "capture"}
                     & set(self.options))
        if bad:
            raise ValueError(f"train config: backbone.options must not set {bad} (they are backbone fields, or fixed "
                             "by the trainer)")
        _str(o, "name", self.name)
        _real(o, "correction_step", self.correction_step, 0.0, 1.0, low_open=True)
        _int(o, "num_inference_steps", self.num_inference_steps, 1, optional=True, maximum=MAX_INFERENCE_STEPS)
        if self.guidance_scale is not None:
            _real(o, "guidance_scale", self.guidance_scale, 0.0, MAX_GUIDANCE)
        _str(o, "device", self.device)
        _choice(o, "dtype", self.dtype, ("float32", "float16", "bfloat16"))


@dataclass(frozen=True)
class DataSettings:
    """The training prompts and the fixed monitoring batch.

    Attributes:
        prompts: a GenEval JSONL file, or ``"shapes:train"`` (the shapes world's
            training split). Never the held-out split: the trainer refuses
            ``"shapes:heldout"``.
        seeds_per_prompt: distinct initial-noise seeds per prompt; one (prompt,
            seed) pair is one data item, encoded once and cached.
        max_prompts: keep only the first N prompts (None: all).
        monitor_prompts: GenEval JSONL for the reward-hacking monitor; None =
            the training prompts with seeds the training never uses.
        monitor_size: items in the fixed monitor batch (with ``balance: tag``
            drawn round-robin over the tags).
        balance: ``none`` (every prompt x ``seeds_per_prompt`` seeds) or ``tag``
            (every GenEval tag gives ``items_per_tag`` items, seeds per prompt as
            needed; see :func:`xlard.train.data.balanced_pairs`).
        items_per_tag: items per tag with ``balance: tag``.
        encode_cache: encoded batches kept in memory (LRU); 0 = all.
        leave_out: fraction of each tag's prompts held back from the whole run
            (training, monitor, calibration, distillation; see
            :func:`xlard.train.data.leave_out_prompts`). The corrector folder
            records them (``training.left_out_records``), and
            ``scripts/validate_corrector.py --prompts left-out`` validates on
            them: how a recipe carries to prompts it never saw, measured on the
            training split. 0 (default) trains on every prompt.
    """

    prompts: str = "shapes:train"
    seeds_per_prompt: int = 4
    max_prompts: int | None = None
    monitor_prompts: str | None = None
    monitor_size: int = 24
    balance: str = "none"
    items_per_tag: int = 256
    encode_cache: int = 0
    leave_out: float = 0.0

    def __post_init__(self):
        _plain_numbers(self)
        o = "data"
        _str(o, "prompts", self.prompts)
        _str(o, "monitor_prompts", self.monitor_prompts, optional=True)
        for name in ("prompts", "monitor_prompts"):  # "~/p.jsonl" was looked for in a folder named "~"
            _expand_home(self, name)
        if self.prompts.strip().lower() == "shapes:heldout":
            raise ValueError("train config: data.prompts must not be the held-out split (train on 'shapes:train'; "
                             "the held-out split is for evaluation only)")
        _int(o, "seeds_per_prompt", self.seeds_per_prompt, 1, maximum=MAX_ITEMS)
        _int(o, "max_prompts", self.max_prompts, 1, optional=True)
        _int(o, "monitor_size", self.monitor_size, 0, maximum=MAX_ITEMS)
        _choice(o, "balance", self.balance, ("none", "tag"))
        _int(o, "items_per_tag", self.items_per_tag, 1, maximum=MAX_ITEMS)
        _int(o, "encode_cache", self.encode_cache, 0)
        _real(o, "leave_out", self.leave_out, 0.0, 1.0, high_open=True)


@dataclass(frozen=True)
class RewardSettings:
    """Where the CMD rewards' evidence comes from.

    Attributes:
        source: ``"auto"`` (the backbone's default), ``"attention"`` (the
            backbone's own cross-attention + the pixel color encoder), or any
            name :func:`xlard.sources.get_source` knows when that module exists.
        options: keyword options for the source.
        bind_color: look for an entity's color only inside its component
            mask; None: the source's own setting (its ``reward_config``).
    """

    source: str = "auto"
    options: dict = field(default_factory=dict)
    bind_color: bool | None = None

    def __post_init__(self):
        _plain_numbers(self)
        _str("reward", "source", self.source)
        _mapping("reward", "options", self.options)
        if self.bind_color is not None:
            _bool("reward", "bind_color", self.bind_color)


@dataclass(frozen=True)
class ModelSettings:
    """Sizes of the corrector and the projector.

    Attributes:
        corrector, projector: a preset, ``"tiny"`` or ``"paper"``.
        corrector_overrides, projector_overrides: fields of
            :class:`xlard.models.CorrectorConfig` / :class:`ProjectorConfig` to change.
    """

    corrector: str = "tiny"
    corrector_overrides: dict = field(default_factory=dict)
    projector: str = "tiny"
    projector_overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        _plain_numbers(self)
        _choice("model", "corrector", self.corrector, ("tiny", "paper"))
        _choice("model", "projector", self.projector, ("tiny", "paper"))
        _mapping("model", "corrector_overrides", self.corrector_overrides)
        _mapping("model", "projector_overrides", self.projector_overrides)
        for name in ("corrector_overrides", "projector_overrides"):
            bad = sorted({"latent_channels", "text_dim", "pooled_dim"} & set(getattr(self, name)))
            if bad:
                raise ValueError(f"train config: model.{name} must not set {bad}: they come from the backbone")
        dropout = self.corrector_overrides.get("dropout", 0)
        if isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and dropout != 0:
            # it ran the warm start and two checkpoints, then stopped with a traceback at the first PPO update
            raise ValueError(f"train config: model.corrector_overrides.dropout must be 0 for training, got {dropout}: "
                             "the policy update compares the corrector's forward pass with the rollout's, and "
                             "dropout makes that pass random")


def _check_model_overrides(model: "ModelSettings") -> None:
    """The override values checked by :class:`xlard.models.CorrectorConfig` / ``ProjectorConfig`` themselves, built
    now with the preset's placeholder dimensions (the backbone's come later): ``width: "16"`` or ``reader: true`` with
    ``conditioning: text`` failed only after the backbone had loaded. Unknown names are left to the trainer's check
    (which lists the known ones); what needs the backbone's latent size (``patch``, ``action_block`` dividing it)
    is checked when the backbone is loaded, before the warm start."""
    if not model.corrector_overrides and not model.projector_overrides:
        return  # (xlard.models imports torch: only when there is something to check)
    import re

    from xlard.models import CorrectorConfig, ProjectorConfig

    for name, cls, preset in (("corrector_overrides", CorrectorConfig, model.corrector),
                              ("projector_overrides", ProjectorConfig, model.projector)):
        given = getattr(model, name)
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in given.items() if k in known}
        if not values:
            continue
        for key, value in values.items():  # a switch given as 1 or "true" (as the trainer's own check words it)
            if isinstance(getattr(cls, key, None), bool) and not isinstance(value, bool):
                raise ValueError(f"train config: model.{name} {key} must be true or false, got {value!r}")
        if values.get("reader") is True and not values.get("reader_nouns"):
            values["reader_nouns"] = ("placeholder",)  # the trainer fills them from the understanding model
        try:
            cls.preset(preset, **values)
        except (TypeError, ValueError) as e:
            text = str(e)
            words = re.findall(r"\w+", text.split(": ", 1)[1] if text.startswith(cls.__name__) else text)
            key = next((w for w in words if w in given), None)  # the field the message is about, when overridden
            where = f" (the key model.{name}.{key})" if key else ""
            # worded as the trainer's own check was, which built the config only after the backbone had loaded
            raise ValueError(f"train config: model.{name}: {text}{where}") from None


@dataclass(frozen=True)
class PPOSettings:
    """The rollout and PPO update.

    Attributes:
        prompts_per_step: (prompt, seed) items per step, global (the same for
            any number of processes; must divide by the world size).
        group_size: corrections sampled per z0 (G).
        epochs: passes over the rollout batch per update.
        minibatches: minibatches per epoch (each holds rollouts/minibatches).
        clip: the surrogate's clip range epsilon: a bound on the per-dimension ratio under
            ``logprob_reduction: mean`` (PPO's usual 0.2 would never clip there; docs/training.md).
        logprob_reduction: ``"sum"`` (the exact log-density ratio of the C*H*W
            Gaussian) or ``"mean"`` (the log ratio divided by C*H*W); see
            docs/training.md for the measurement behind the default.
        advantage: ``"group"`` (reward minus its (prompt, seed) group's mean;
            the value head is still trained and logged) or ``"value"``
            (reward minus the value head's baseline).
        whiten: whiten advantages over the global batch.
        value_coef: weight of the value head's MSE.
        reward_norm: normalise rewards by running statistics before the value
            head and advantages (state kept in the checkpoint).
        log_std_lr_scale: multiplier of the learning rate for the policy log std.
    """

    prompts_per_step: int = 8
    group_size: int = 4
    epochs: int = 4
    minibatches: int = 2
    clip: float = 0.01
    logprob_reduction: str = "mean"
    advantage: str = "group"
    whiten: bool = True
    value_coef: float = 0.5
    reward_norm: bool = False
    log_std_lr_scale: float = 1.0

    def __post_init__(self):
        _plain_numbers(self)
        o = "ppo"
        _int(o, "prompts_per_step", self.prompts_per_step, 1, maximum=MAX_ITEMS)
        _int(o, "group_size", self.group_size, 1, maximum=MAX_ITEMS)
        if self.prompts_per_step * self.group_size > MAX_ITEMS:  # 10**8 died in the allocator after the backbone
            raise ValueError(f"train config: ppo.prompts_per_step * ppo.group_size (the rollouts per step) must be "
                             f"at most {MAX_ITEMS}, got {self.prompts_per_step} * {self.group_size} = "
                             f"{self.prompts_per_step * self.group_size}")
        _int(o, "epochs", self.epochs, 1)
        _int(o, "minibatches", self.minibatches, 1)
        _real(o, "clip", self.clip, 0.0, low_open=True)
        _choice(o, "logprob_reduction", self.logprob_reduction, ("sum", "mean"))
        _choice(o, "advantage", self.advantage, ("group", "value"))
        _bool(o, "whiten", self.whiten)
        _real(o, "value_coef", self.value_coef, 0.0)
        _bool(o, "reward_norm", self.reward_norm)
        _real(o, "log_std_lr_scale", self.log_std_lr_scale, 0.0)
        if self.advantage == "group" and self.group_size < 2:
            raise ValueError("train config: ppo.advantage 'group' needs ppo.group_size >= 2 "
                             f"(a group of one has no baseline), got group_size={self.group_size}")


@dataclass(frozen=True)
class OptimSettings:
    """The corrector's optimiser: AdamW, warmup then cosine (or constant), gradient clipping, EMA.

    Attributes:
        lr, weight_decay, betas: AdamW.
        warmup_steps: linear warmup of the learning rate.
        schedule: ``"cosine"`` (from ``lr`` after the warmup down towards ``min_lr_ratio * lr``, reached
            at step ``steps``, one past the last: the last step's rate is a little above it) or ``"constant"``.
        min_lr_ratio: the cosine's floor.
        max_grad_norm: gradient clipping (0 = off).
        ema: decay of the corrector's EMA (0 = off); evaluation uses the EMA when on.
    """

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    ema: float = 0.0

    def __post_init__(self):
        _plain_numbers(self)
        o = "optim"
        _real(o, "lr", self.lr, 0.0, low_open=True)
        _real(o, "weight_decay", self.weight_decay, 0.0)
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2):
            _fail(o, "betas", "two numbers in [0, 1)", self.betas)
        for b in self.betas:
            _real(o, "betas", b, 0.0, 1.0, high_open=True)
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        _int(o, "warmup_steps", self.warmup_steps, 0)
        _choice(o, "schedule", self.schedule, ("cosine", "constant"))
        _real(o, "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _real(o, "max_grad_norm", self.max_grad_norm, 0.0)
        _real(o, "ema", self.ema, 0.0, 1.0, high_open=True)


@dataclass(frozen=True)
class ProjectorSettings:
    """R_phi's warm start and refresh.

    Attributes:
        lr, weight_decay: its AdamW.
        warmup_batches: batches of randomly perturbed latents around z0 decoded
            and scored before the first PPO step.
        warmup_sigma: the perturbation, ``z0 + sigma * std(z0) * eps``.
        warmup_epochs: fit passes over the buffer after the warm start.
        refresh_every: decode and score the policy's samples every N steps
            (R_phi scores the others without decoding); 1 = every step.
        refresh_epochs: fit passes after each refresh, over the new batch and
            ``refresh_replay`` random older batches of the buffer.
        refresh_replay: older buffer batches replayed per refresh.
        minibatches: minibatches per rollout batch in a fit pass.
        buffer_batches: rollout batches kept (FIFO) for fitting.
    """

    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_batches: int = 4
    warmup_sigma: float = 0.4
    warmup_epochs: int = 10
    refresh_every: int = 1
    refresh_epochs: int = 2
    refresh_replay: int = 1
    minibatches: int = 2
    buffer_batches: int = 16

    def __post_init__(self):
        _plain_numbers(self)
        o = "projector"
        _real(o, "lr", self.lr, 0.0, low_open=True)
        _real(o, "weight_decay", self.weight_decay, 0.0)
        _int(o, "warmup_batches", self.warmup_batches, 0)
        _real(o, "warmup_sigma", self.warmup_sigma, 0.0)
        _int(o, "warmup_epochs", self.warmup_epochs, 0)
        _int(o, "refresh_every", self.refresh_every, 1)
        _int(o, "refresh_epochs", self.refresh_epochs, 0)
        _int(o, "refresh_replay", self.refresh_replay, 0)
        _int(o, "minibatches", self.minibatches, 1)
        _int(o, "buffer_batches", self.buffer_batches, 1)


@dataclass(frozen=True)
class LogSettings:
    """What is written and when.

    Attributes:
        monitor_every: decode the monitor batch with the mean policy and log
            R_phi's correlation with the image rewards every N steps (0 = never).
        evaluate_every: on the shapes world, log the exact evaluator's verdict
            on the monitor images every N steps (0 = never). Logged only, never a reward.
        checkpoint_every: write a checkpoint every N steps (and at the end).
        keep_checkpoints: how many step checkpoints to keep.
        progress: show a progress bar (rank 0).
        tensorboard: ``"auto"`` (when installed), ``"on"`` (fail when not) or ``"off"``.
        curve: write ``curve.png`` at checkpoints and at the end.
    """

    monitor_every: int = 10
    evaluate_every: int = 20
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    progress: bool = True
    tensorboard: str = "auto"
    curve: bool = True

    def __post_init__(self):
        _plain_numbers(self)
        o = "log"
        for name in ("monitor_every", "evaluate_every"):
            _int(o, name, getattr(self, name), 0)
        _int(o, "checkpoint_every", self.checkpoint_every, 1)
        _int(o, "keep_checkpoints", self.keep_checkpoints, 1)
        _bool(o, "progress", self.progress)
        _choice(o, "tensorboard", self.tensorboard, ("auto", "on", "off"))
        _bool(o, "curve", self.curve)


@dataclass(frozen=True)
class ExportSettings:
    """How the trained corrector is exported.

    Attributes:
        alpha_grid: inference step-size multipliers to try; the exported
            corrector folder's ``alpha`` is ``corrector.alpha x`` the multiplier
            whose corrected images get the highest mean joint *training* reward
            on ``calibration_size`` fresh items of the *training* prompts (seeds
            the training never draws). ``[1.0]`` (default) skips the calibration.
            PPO moves the policy mean in small steps while its noise explores at
            a larger scale; the calibration picks how far along the learned
            direction to go at inference, without the held-out split or the
            exact evaluator.
        calibration_size: items of the calibration batch (tags balanced when
            ``data.balance`` is ``tag``).
        min_gain_se: the reference multiplier (1 when the grid has it, else
            the grid's smallest) is kept unless another one beats it, paired on
            the same items, by more than ``min_gain_se`` standard errors of the
            mean paired difference. Several multipliers often score within noise
            of each other (measured: a pick on 144 items was the worst on 192
            others); this keeps the step PPO trained with unless the data say
            otherwise. 0 takes the best mean, as before.
    """

    alpha_grid: tuple = (1.0,)
    calibration_size: int = 48
    min_gain_se: float = 2.0

    def __post_init__(self):
        _plain_numbers(self)
        o = "export"
        grid = self.alpha_grid
        if isinstance(grid, list):  # ExportSettings(alpha_grid=[1.0, 2.0]), as a config file gives it
            grid = tuple(grid)
        if not isinstance(grid, tuple) or not grid:
            _fail(o, "alpha_grid", "a non-empty list of positive numbers", grid)
        if len(grid) > MAX_ALPHA_GRID:
            raise ValueError(f"train config: export.alpha_grid must list at most {MAX_ALPHA_GRID} multipliers (each "
                             f"one decodes and scores the calibration batch), got {len(grid)}")
        for value in grid:  # far past the trained step size the decode gives non-finite images and the export failed
            _real(o, "alpha_grid entry", value, 0.0, 100.0, low_open=True)
        if len(set(grid)) != len(grid):  # each multiplier is scored on the calibration batch: twice is wasted work
            twice = sorted({v for v in grid if grid.count(v) > 1})
            _fail(o, "alpha_grid", f"distinct multipliers ({twice} given more than once)", list(grid))
        object.__setattr__(self, "alpha_grid", grid)
        _int(o, "calibration_size", self.calibration_size, 1, maximum=MAX_ITEMS)
        _real(o, "min_gain_se", self.min_gain_se, 0.0, 100.0)


@dataclass(frozen=True)
class DistillSettings:
    """The corrector's warm start on edit targets (:mod:`xlard.train.distill`), before any PPO step.

    Attributes:
        items_per_tag: training-split (prompt, seed) items per GenEval tag whose
            decoded samples are edited into latent targets; 0 (default) turns
            the warm start off. Needs the shapes backbone (the edits are drawn
            with the shapes world's primitives) and one process. At
            ``correction_step`` 1.0 the targets are corrections of the final
            latent; earlier they are scaled by ``sqrt(abar_t)``
            (:func:`xlard.train.distill.signal_scale`) and the remaining
            denoising carries them.
        epochs, lr, batch_size, weight_decay: the regression's optimiser (AdamW,
            100-step warmup, cosine to 5% of ``lr``).
        val_fraction: share of the items held back to report the explained
            variance on items the fit did not see.
        chunk: items per backbone call and per dataset shard.
        redraw, fix_count, fix_color, fix_position: what the editor changes
            (:class:`xlard.shapes.editor.EditConfig`; the ablations of the warm start).
        placement, remove, draw_size: how the editor fixes a count (``EditConfig``:
            ``"emptiest"`` / ``"grid"``, ``"weakest"`` / ``"last"``, 0 = copy the size).
        relayout: counting prompts are redrawn with exactly the asked number of
            objects at fixed grid cells, position prompts with their two objects at
            fixed places (``EditConfig.relayout``).
        relayout_color: ``"found"`` or a palette color (``EditConfig.relayout_color``).
        margin: pixels by which a relation's centres must differ to be left as it
            is (``EditConfig.margin``); 64 moves the two objects of every relation
            to their quarter places, whether it held or not.
        replace: targets set the touched latent cells to the edited image's encoding
            (``build_dataset(replace=True)``); needs ``correction_step`` 1.0.
        decoder_epochs: epochs of a second, decoder-space fit after the latent one
            (:func:`xlard.train.distill.fit_corrector_decoded`: the corrected latent
            must *decode* to the edited image); 0 (default) skips it; needs
            ``correction_step`` 1.0.
        decoder_lr: its learning rate (same schedule as the latent fit).
        decoder_pixel_weight, decoder_latent_weight: its loss,
            ``pixel_weight * image MSE + latent_weight * latent MSE``.
        move: relations fixed by *moving latent cells* for a corrector with a move
            head (``model.corrector_overrides: {move: true}``): each item's targets
            get the relation's two objects' cells and shifts and the cell each cell
            copies (:func:`xlard.shapes.editor.move_plan`); the head is fitted to the
            cells and shifts by cross-entropy, the residual to the rest.
            Needs ``correction_step`` 1.0 and ``fix_position: false`` (one rule per
            relation).
        move_margin: the move rule's margin (pixels); 64 (default) moves the two
            objects of every relation to their quarter places, whether it held or not.
        move_weight: weight of the move head's cross-entropy beside the residual's MSE.
        reader_epochs: epochs of the fit of a corrector's latent reader
            (``model.corrector_overrides: {reader: true}``;
            :func:`xlard.train.distill.fit_reader`), before the corrector's own fit; the
            shards then also record the understanding model's reading per latent cell.
        reader_batch_size: the reader fit's batch (64); fewer edit targets fit better with a
            smaller one, as the number of its updates falls with the items (the demo: 16 for
            its 1200 items, docs/demo.md).
    """

    items_per_tag: int = 0
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    val_fraction: float = 0.05
    chunk: int = 32
    redraw: bool = True
    fix_count: bool = True
    fix_color: bool = True
    fix_position: bool = True
    placement: str = "emptiest"
    remove: str = "weakest"
    draw_size: int = 0
    relayout: bool = False
    relayout_color: str = "found"
    margin: int = 6
    replace: bool = False
    decoder_epochs: int = 0
    decoder_lr: float = 3e-4
    decoder_pixel_weight: float = 100.0
    decoder_latent_weight: float = 1.0
    move: bool = False
    move_margin: int = 64
    move_weight: float = 0.1
    reader_epochs: int = 30
    reader_batch_size: int = 64

    def __post_init__(self):
        _plain_numbers(self)
        o = "distill"
        _int(o, "reader_epochs", self.reader_epochs, 1)
        _int(o, "reader_batch_size", self.reader_batch_size, 1)
        _int(o, "items_per_tag", self.items_per_tag, 0, maximum=MAX_ITEMS)
        _int(o, "epochs", self.epochs, 1)
        _real(o, "lr", self.lr, 0.0, low_open=True)
        _int(o, "batch_size", self.batch_size, 1)
        _real(o, "weight_decay", self.weight_decay, 0.0)
        _real(o, "val_fraction", self.val_fraction, 0.0, 0.5)
        _int(o, "chunk", self.chunk, 1)
        for name in ("redraw", "fix_count", "fix_color", "fix_position", "relayout", "replace", "move"):
            _bool(o, name, getattr(self, name))
        _int(o, "margin", self.margin, 1)
        from xlard.shapes.world import PALETTE

        _choice(o, "relayout_color", self.relayout_color, ("found",) + tuple(PALETTE))
        _choice(o, "placement", self.placement, ("emptiest", "grid"))
        _choice(o, "remove", self.remove, ("weakest", "last"))
        _int(o, "draw_size", self.draw_size, 0)
        _int(o, "decoder_epochs", self.decoder_epochs, 0)
        _real(o, "decoder_lr", self.decoder_lr, 0.0, low_open=True)
        _real(o, "decoder_pixel_weight", self.decoder_pixel_weight, 0.0, low_open=True)
        _real(o, "decoder_latent_weight", self.decoder_latent_weight, 0.0)
        _int(o, "move_margin", self.move_margin, 1)
        _real(o, "move_weight", self.move_weight, 0.0)
        if self.move and self.fix_position:
            raise ValueError("distill.move: relations are fixed either by moving latent cells (move) or by redrawing "
                             "them (fix_position); set fix_position: false")

    def edit_config(self):
        """The :class:`xlard.shapes.editor.EditConfig` these settings describe."""
        from xlard.shapes.editor import EditConfig

        return EditConfig(redraw=self.redraw, fix_count=self.fix_count, fix_color=self.fix_color,
                          fix_position=self.fix_position, placement=self.placement, remove=self.remove,
                          draw_size=self.draw_size, relayout=self.relayout, margin=self.margin,
                          relayout_color=self.relayout_color)


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Attributes:
        steps: PPO steps (one rollout batch + one update each); 0 only with the
            ``distill`` warm start (the distilled corrector is exported as it is).
        seed: the run's seed; every random draw derives from it and the step.
        out: the run folder (the CLI's ``--out`` overrides it).
        rl: ``"ppo"`` or ``"pathwise"`` (the "without RL" ablation: gradient
            ascent on R_phi through the corrector, no policy gradient).
        reward_model: ``"projector"`` (the policy is scored by R_phi) or
            ``"image"`` (PPO straight on the decoded image rewards, every
            rollout decoded; the reference without R_phi).
        confidence: ``"head"`` (lambda from the confidence head) or
            ``"uniform"`` (uniform over the prompt's aspects; ablation; the
            only choice with ``reward_model: image``, which fits no head).
        anchor: ``"none"``, ``"z0"`` (``beta * mean (zc - z0)^2``) or ``"ref"``
            (pull toward the best verified latent seen for the item: a decoded
            sample whose image joint reward reached ``anchor_ref_min_reward``;
            z0 until one exists).
        anchor_beta: the anchor's weight.
        anchor_ref_min_reward: the joint reward a reference must reach.
        trainer_threads: CPU threads for the trainer's own tensor work (sample,
            score, update, R_phi fit); the backbone keeps torch's setting. 0 =
            leave torch's setting. Default 1: the small models gain nothing from
            more, and on a shared CPU OpenMP's spin-waits made a tiny corrector's
            forward+backward 10-20x slower with 2 threads (docs/training.md).
    """

    steps: int = 100
    seed: int = 0
    out: str = "runs/xlard"
    rl: str = "ppo"
    reward_model: str = "projector"
    confidence: str = "head"
    anchor: str = "z0"
    anchor_beta: float = 0.1
    anchor_ref_min_reward: float = 0.9
    trainer_threads: int = 1
    backbone: BackboneSettings = field(default_factory=BackboneSettings)
    data: DataSettings = field(default_factory=DataSettings)
    reward: RewardSettings = field(default_factory=RewardSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    ppo: PPOSettings = field(default_factory=PPOSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    projector: ProjectorSettings = field(default_factory=ProjectorSettings)
    log: LogSettings = field(default_factory=LogSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)

    def __post_init__(self):
        _plain_numbers(self)
        o = ""  # the top level of the config
        _int(o, "steps", self.steps, 0)
        if self.steps == 0 and self.distill.items_per_tag == 0:
            raise ValueError("train config: steps must be >= 1 (0 only with the distill warm start, "
                             "distill.items_per_tag > 0), got 0")
        if self.distill.items_per_tag == 0 and self.model.corrector_overrides.get("reader") is True:
            # Checked here, at load time, as well as by the trainer: else it fails only after the backbone loads.
            raise ValueError("train config: model.corrector_overrides reader: true needs the edit-target warm start "
                             "(distill.items_per_tag > 0): the reader is fitted there, before the corrector")
        _check_model_overrides(self.model)
        _int(o, "seed", self.seed, 0)
        if self.seed > 2**64 - 1:  # torch.manual_seed's range; above it torch's "Overflow when unpacking long long"
            _fail(o, "seed", "an integer in 0..18446744073709551615 (2**64 - 1)", self.seed)
        _str(o, "out", self.out)
        _expand_home(self, "out")  # "~/runs/x" made a folder named "~" in the working folder
        _choice(o, "rl", self.rl, ("ppo", "pathwise"))
        _choice(o, "reward_model", self.reward_model, ("projector", "image"))
        _choice(o, "confidence", self.confidence, ("head", "uniform"))
        _choice(o, "anchor", self.anchor, ("none", "z0", "ref"))
        _real(o, "anchor_beta", self.anchor_beta, 0.0)
        _real(o, "anchor_ref_min_reward", self.anchor_ref_min_reward, 0.0, 1.0)
        _int(o, "trainer_threads", self.trainer_threads, 0, maximum=MAX_THREADS)
        if self.rl == "pathwise" and self.reward_model == "image":
            raise ValueError("train config: rl='pathwise' needs reward_model='projector' (the pathwise gradient "
                             "flows through R_phi; image rewards are not differentiable)")
        if self.reward_model == "image" and self.confidence == "head":
            # the weights came from R_phi's confidence head, which reward_model='image' never fits: random lambdas
            raise ValueError("train config: reward_model='image' needs confidence='uniform': confidence='head' reads "
                             "the aspect weights from R_phi's confidence head, which is fitted only with "
                             "reward_model='projector' (set confidence: uniform; a run folder trained with both "
                             "cannot be resumed: start a new run)")
        if self.reward_model == "image" and self.projector.refresh_every != 1:
            raise ValueError("train config: reward_model='image' decodes every rollout, so projector.refresh_every "
                             f"must be 1, got {self.projector.refresh_every}")
        # Both updates walk ppo.epochs x ppo.minibatches minibatches (pathwise's failed after the warm start).
        n = self.ppo.prompts_per_step * self.ppo.group_size
        if n % self.ppo.minibatches:
            raise ValueError(f"train config: ppo.minibatches ({self.ppo.minibatches}) must divide the rollouts "
                             f"per step (prompts_per_step * group_size = {n})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def _build(cls, data: Any, where: str):
    if not isinstance(data, Mapping):
        raise ValueError(f"train config: {where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"train config: unknown key(s) {unknown} in {where} (known: {names})")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, name)
        elif hint in (float, float | None) and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            try:
                kwargs[name] = float(value)  # YAML writes 1 for 1.0
            except OverflowError:
                raise ValueError(f"train config: {where if where != 'the top level' else ''}"
                                 f"{'.' if where != 'the top level' else ''}{name} must be a finite number, got "
                                 f"{_short(value)}") from None
        elif hint is tuple and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"train config: override {key!r}: {p} is not a section")
    last = parts[-1]
    if node is data and isinstance(value, Mapping) and isinstance(node.get(last), dict) \
            and dataclasses.is_dataclass(typing.get_type_hints(TrainConfig).get(last)):
        # a section given as a mapping (--set 'ppo={epochs: 3}') changes the keys it names and keeps the others
        # (it reset the file's prompts_per_step and group_size to their defaults); a free-form mapping field
        # (reward.options, backbone.options, model.corrector_overrides) is still replaced as a whole
        node[last] = {**node[last], **value}
    else:
        node[last] = value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_from_dict(data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a (nested) mapping.

    Args:
        data: the parsed file: top-level fields and sections.
        overrides: dotted keys to set after loading (``{"ppo.epochs": 2}``).

    Returns:
        A validated :class:`TrainConfig`.

    Raises:
        ValueError: an unknown key (with the known ones), a bad type or value.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"train config: the top level must be a mapping of fields (e.g. `steps: 100`), got "
                         f"{type(data).__name__} {_short(data)}")
    if overrides is not None and (not isinstance(overrides, Mapping)
                                  or not all(isinstance(k, str) and k for k in overrides)):
        raise ValueError(f"train config: overrides must be a mapping of dotted keys to values "
                         f"({{'ppo.epochs': 2}}), got {_short(overrides)}")
    data = _plain(dict(data), "")  # a deep, plain copy, with a named error for what JSON cannot hold
    for key, value in (overrides or {}).items():
        _set_dotted(data, key, _plain(value, key))
    return _build(TrainConfig, data, "the top level")


_MAX_DEPTH = 64


def _parse_failure(e: BaseException) -> str:
    """Why a config file did not parse, in one line."""
    from xlard._args import short_reason  # (xlard._args imports torch: not at the module's import)

    return "nested too deeply" if isinstance(e, RecursionError) else short_reason(e)


def _plain(value: Any, where: str, depth: int = 0) -> Any:
    """A deep copy of ``value`` made of dicts (str keys), lists, str, int, float, bool and None only. A YAML date,
    set or binary value was a traceback from json.dumps ("Object of type date is not JSON serializable"), a
    nesting thousands deep a RecursionError."""
    name = where or "the top level"
    if depth > _MAX_DEPTH:
        raise ValueError(f"train config: {name} is nested more than {_MAX_DEPTH} levels deep")
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        bad = [k for k in value if not (k is None or isinstance(k, (str, bool, int, float)))]
        if bad:
            raise ValueError(f"train config: {name} has a key that is not text or a number: {_short(bad[0])}")
        out = {}
        for k, v in value.items():  # number keys become text, as JSON writes them
            k = json.dumps(k) if not isinstance(k, str) else k
            out[k] = _plain(v, f"{where}.{k}" if where else k, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    raise ValueError(f"train config: {name} must be a plain value (text, number, true/false, a list or a "
                     f"mapping), got a {type(value).__name__} ({_short(value)}); quote it if it is text")


_FLOAT_1_2 = (r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
              r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")


_INT_1_2 = r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"
_BOOL_1_2 = r"^(?:true|True|TRUE|false|False|FALSE)$"


@functools.lru_cache(maxsize=1)
def _yaml_loader() -> type:
    """A ``yaml.SafeLoader`` whose scalars follow YAML 1.2's core schema (built once): floats such as ``1e-3``;
    booleans are true/false only (``tensorboard: off`` stays the string "off", as documented); integers are
    decimal, 0o octal or 0x hex (YAML 1.1 read ``seed: 010`` as 8 and ``steps: 1:30`` as 90); and a key given
    twice in one mapping is an error (the last one silently won)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: merged below, not a key given twice
                    continue
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
                if isinstance(key, (str, int, float, bool)):
                    seen[key] = key_node.start_mark.line
            # YAML merge keys (`<<: *base`, `<<: [*a, *b]`): the merged mappings' keys first, the mapping's own
            # keys override them (they failed with "could not determine a constructor for the tag ...merge")
            self.flatten_mapping(node)
            return super().construct_mapping(node, deep=deep)

    Loader.yaml_implicit_resolvers = {
        first: [(tag, regex) for tag, regex in resolvers
                if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(_BOOL_1_2), list("tTfF"))
    Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(_INT_1_2), list("-+0123456789"))
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_FLOAT_1_2), list("-+0123456789."))
    Loader.add_constructor("tag:yaml.org,2002:int", _construct_int_1_2)
    return Loader


def _construct_int_1_2(loader, node) -> int:
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text)  # "010" is ten


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` that also reads ``1e-3`` and ``3E+2`` as floats (YAML 1.2; PyYAML reads them as strings).

    Raises:
        yaml.YAMLError: the text does not parse.
    """
    import yaml

    return yaml.load(text, Loader=_yaml_loader())


def load_config(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Load a YAML (``.yaml``/``.yml``) or JSON file into a validated :class:`TrainConfig`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file does not parse, or the config is invalid.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"train config: {path} is a folder; give the config file (.yaml, .yml or .json)")
    if not path.is_file():
        raise FileNotFoundError(f"train config: no such file {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a leading BOM (Windows editors) is fine
    except PermissionError as e:
        raise PermissionError(f"train config: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"train config: {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                         f"{e.start}); give a YAML or JSON file") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:  # the extra by name, as every missing optional dependency is named
            raise ValueError(f"train config: {path} is YAML: {missing_message('yaml', 'reading it', exc)} (or "
                             "write the config as JSON)") from None
        try:
            data = yaml_load(text)
        except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: an int of 5000 digits
            raise ValueError(f"train config: {path} is not valid YAML: {_parse_failure(e)}") from None
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(text, object_pairs_hook=_io.pairs_once)
        except (ValueError, RecursionError) as e:  # JSONDecodeError too
            raise ValueError(f"train config: {path} is not valid JSON: {_parse_failure(e)}") from None
    else:
        raise ValueError(f"train config: {path} must end in .yaml, .yml or .json")
    if data is None:  # an empty file: every field at its default
        data = {}
    if not isinstance(data, Mapping):
        raise ValueError(f"train config: {path} must hold a mapping of fields at the top level (e.g. `steps: 100`), "
                         f"got {type(data).__name__} {_short(data)}")
    return config_from_dict(data, overrides)


def batch_arithmetic(cfg: TrainConfig, world_size: int) -> dict[str, int]:
    """The per-step sizes a run uses with ``world_size`` processes.

    Raises:
        ValueError: the global batch does not split evenly over the processes.
    """
    cfg = check_train_config("batch_arithmetic", cfg)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"batch_arithmetic: world_size must be an int >= 1 (processes), got {world_size!r}")
    p, g, k = cfg.ppo.prompts_per_step, cfg.ppo.group_size, cfg.ppo.minibatches
    if p % world_size:
        raise ValueError(f"train config: ppo.prompts_per_step ({p}) must be divisible by the world size "
                         f"({world_size}) so the global batch does not depend on it")
    n = p * g
    per_rank = n // world_size
    if per_rank % k:  # PPO and the pathwise update both take ppo.epochs x ppo.minibatches steps
        raise ValueError(f"train config: ppo.minibatches ({k}) must divide the rollouts per process "
                         f"({per_rank} = {p} x {g} / {world_size})")
    if per_rank % cfg.projector.minibatches:
        raise ValueError(f"train config: projector.minibatches ({cfg.projector.minibatches}) must divide the "
                         f"rollouts per process ({per_rank})")
    decodes = n if (cfg.reward_model == "image" or cfg.projector.refresh_every == 1) else n / cfg.projector.refresh_every
    return {
        "world_size": world_size, "items_per_step": p, "items_per_rank": p // world_size, "group_size": g,
        "rollouts_per_step": n, "rollouts_per_rank": per_rank,
        "minibatch": n // k, "minibatch_per_rank": per_rank // k, "updates_per_step": cfg.ppo.epochs * k,
        "decodes_per_step": decodes,
    }


def check_train_config(who: str, cfg) -> TrainConfig:
    """``cfg`` itself when it is a :class:`TrainConfig`; else a TypeError naming what to call instead (a path:
    :func:`load_config`; a mapping: :func:`config_from_dict`)."""
    if isinstance(cfg, TrainConfig):
        return cfg
    if isinstance(cfg, (str, os.PathLike)):
        fix = f"load the file first: {who}(load_config({str(cfg)!r}))"
    elif isinstance(cfg, Mapping):
        fix = f"build it from the mapping first: {who}(config_from_dict(...))"
    else:
        fix = "load one with load_config(path) or config_from_dict(mapping)"
    raise TypeError(f"{who}: cfg must be an xlard.train.TrainConfig, got {type(cfg).__name__}; {fix}")


def describe(cfg: TrainConfig, world_size: int = 1) -> str:
    """The resolved config as indented JSON, followed by the batch arithmetic."""
    cfg = check_train_config("describe", cfg)
    a = batch_arithmetic(cfg, world_size)
    rl = "PPO" if cfg.rl == "ppo" else "pathwise"
    lines = [json.dumps(cfg.to_dict(), indent=2, default=list), "batch arithmetic:"]
    if cfg.steps == 0:  # the per-step plan (rollouts, optimiser steps, decodes) was printed for steps never taken
        lines.append(f"  steps: 0: no {rl} step runs")
    else:
        lines += [f"  {a['items_per_step']} (prompt, seed) items x {a['group_size']} samples = "
                  f"{a['rollouts_per_step']} rollouts per step; {world_size} process(es) x {a['rollouts_per_rank']}",
                  f"  {a['updates_per_step']} optimiser steps per {rl} step (minibatch {a['minibatch']} = "
                  f"{a['minibatch_per_rank']} per process)",
                  f"  decodes per step: {a['decodes_per_step']:g} "
                  + ("(reward_model=image: every rollout)" if cfg.reward_model == "image" else
                     f"(R_phi scores the policy; its refresh decodes the batch every {cfg.projector.refresh_every} "
                     f"step(s))")]
    if cfg.reward_model == "image" and cfg.rl == "ppo":  # Trainer.warm_start returns at once: no R_phi to fit
        lines.append("  warm start: none (reward_model=image: no R_phi to fit)")
    else:
        lines.append(f"  warm start: {cfg.projector.warmup_batches} batches x {a['rollouts_per_step']} perturbed "
                     f"latents decoded")
    if cfg.distill.items_per_tag:
        lines.append(f"  distill: {cfg.distill.items_per_tag} items per tag edited into latent targets, "
                     f"{cfg.distill.epochs} epochs of regression"
                     + (f" before the first {rl} step" if cfg.steps else ""))
    return "\n".join(lines)
