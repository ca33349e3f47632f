"""Base vs corrected evaluation: corrector folders, paired tables with bootstrap intervals, LAM faithfulness.

- **Corrector folders** (:func:`save_corrector_dir`, :func:`load_corrector_dir`):
  what :meth:`xlard.models.ResidualCorrector.save_pretrained` writes
  (``model.safetensors`` + ``config.json``) plus ``xlard_corrector.json``, a
  :class:`CorrectorMeta` saying what the corrector was trained for (backbone,
  ``correction_step``, ``alpha``, sampler settings). :func:`check_corrector_fits`
  rejects a corrector that does not fit a backbone, naming what differs.
- **Paired evaluation** (:func:`evaluate_pairs`): every (record, seed) is
  encoded once; the same state is decoded from ``z0`` (base) and from
  ``zc = z0 + alpha * Delta`` (corrected) and both images go to the exact
  shapes-world evaluator. Same records, same seeds, same noise: the only
  difference is the correction.
- **Intervals** (:func:`paired_bootstrap`, :func:`paired_table`): percentile
  bootstrap of the paired difference, resampling *records* (a record's seeds
  stay together). They are conditional on the records' prompts: they say how
  the gain varies with the images, not with the choice of prompts (records may
  repeat a prompt; the report counts each tag's distinct prompts). Resampling
  whole prompts instead (``clusters=`` the prompts) answers the other question
  and is what ``scripts/validate_corrector.py`` reports. The overall row is
  GenEval's score, the mean of the tag means, bootstrapped by resampling within
  each tag.
- **LAM faithfulness** (issue 12 section 1): for each batch,
  :func:`xlard.explain.faithfulness` zeroes Delta on the top ``fraction`` of the
  LAM cells and, as the control, on as many random cells; the evaluator judges
  both images. The report gives the share of the gain each mask loses.

The run folder written by :func:`run_evaluation` holds ``run.json`` (what was
asked), ``pairs.jsonl`` (one line per (record, seed), appended per batch, so
an interrupted run resumes where it stopped), ``eval.json`` and ``eval.md``
(the tables), and optionally the images in GenEval's folder layout.

Example:
    >>> corrector, meta = load_corrector_dir("runs/shapes/corrector")            # doctest: +SKIP
    >>> backbone = load_backbone_for(meta)                                       # doctest: +SKIP
    >>> report = run_evaluation(backbone, corrector, meta, records, seeds=[0, 1], out="eval-out")  # doctest: +SKIP
    >>> print(format_markdown(report))                                           # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # for the annotations
    import torch

    from xlard.backbones import DiffusersBackbone
    from xlard.models import ResidualCorrector

from xlard import _io
from xlard.models import corrector_inputs

__all__ = [
    "CORRECTOR_META_NAME",
    "CORRECTOR_FORMAT",
    "CORRECTOR_FORMAT_VERSION",
    "CorrectorMeta",
    "save_corrector_dir",
    "load_corrector_dir",
    "check_corrector_fits",
    "sampler_of",
    "shipped_corrector_path",
    "load_backbone_for",
    "image_seed",
    "PairedDifference",
    "paired_bootstrap",
    "paired_table",
    "PairRow",
    "evaluate_pairs",
    "faithfulness_table",
    "build_report",
    "format_markdown",
    "table_rows",
    "run_evaluation",
    "parse_seeds",
    "run_eval_cli",
    "run_generate_cli",
]

#: The file a corrector folder carries beside ``model.safetensors`` and ``config.json``.
CORRECTOR_META_NAME = "xlard_corrector.json"
CORRECTOR_FORMAT = "xlard-corrector"
CORRECTOR_FORMAT_VERSION = 1

#: Where a shipped corrector for a named backbone lives (package data).
_DATA = Path(__file__).resolve().parent / "data"
_SHIPPED = {"shapes": _DATA / "shapes_corrector"}

#: ``image_seed(seed, index) = seed * SEED_STRIDE + index``: seed 0 reproduces
#: ``xlard eval --backbone ... --seed 0`` (image i seeded i), and distinct
#: (seed, record) pairs never share noise below a million records.
SEED_STRIDE = 1_000_000
#: ``xlard generate --corrector/--correct``: one JSON line per image, what the corrector's rules did.
GENERATE_ACTIONS_NAME = "corrections.jsonl"


def _err(fn: str, message: str) -> str:
    return f"xlard.evaluation.{fn}: {message}"


# ---------------------------------------------------------------------------
# Corrector folders
# ---------------------------------------------------------------------------


def _is_real(value) -> bool:
    from xlard._args import is_finite_real

    return is_finite_real(value)  # 10**400 is not finite as a float (was a bare OverflowError)


@dataclass(frozen=True)
class CorrectorMeta:
    """What a corrector was trained for: the content of ``xlard_corrector.json``.

    Attributes:
        backbone (str): the backbone it was trained on: ``"shapes"`` (the
            shipped shapes-world pipeline), a local diffusers folder or a hub
            model id. The default backbone when loading the corrector.
        correction_step (float): fraction of the denoising in (0, 1] run
            before the correction (the backbone must be built with the same).
        alpha (float): step size of ``zc = z0 + alpha * Delta`` applied at
            inference (finite; the trainer writes the one it trained with).
        num_inference_steps (int): the backbone's denoising steps in training.
        guidance_scale (float): the backbone's classifier-free guidance scale in training.
        training (dict): free-form, JSON-serialisable provenance (run folder,
            config, step, EMA used, git commit); read back as written (NaN and
            infinite numbers come back as None: strict JSON has no NaN), never
            interpreted.
        sampler (dict): how the backbone sampled in training, beyond the fields above
            (written by ``xlard train``; empty in folders written before it):
            ``pipeline`` (the diffusers pipeline class), ``height`` and ``width``
            (pixels), ``max_sequence_length`` (the T5 text length, None for
            CLIP-only pipelines), ``negative_prompt`` and ``revision`` (a hub id's
            branch, tag or commit, when training named one). :func:`load_backbone_for`
            samples with them (and loads that revision) and :func:`check_corrector_fits`
            refuses a backbone that differs (a FLUX corrector trained at 32 x 32 with 32
            text tokens was applied at 256 x 256 with 512).

    Raises:
        ValueError: a field out of its domain, naming it.

    Example:
        >>> CorrectorMeta("shapes", correction_step=0.3, alpha=1.0, num_inference_steps=20,
        ...               guidance_scale=5.0).to_dict()["correction_step"]
        0.3
    """

    backbone: str
    correction_step: float
    alpha: float
    num_inference_steps: int
    guidance_scale: float
    training: dict = field(default_factory=dict)
    sampler: dict = field(default_factory=dict)

    def __post_init__(self):
        from xlard.backbones.base import check_correction_step

        if not isinstance(self.backbone, str) or not self.backbone.strip():
            raise ValueError(f"CorrectorMeta: backbone must be a non-empty string ('shapes', a folder or a hub id), "
                             f"got {self.backbone!r}")
        try:
            check_correction_step(self.correction_step)
        except ValueError as e:
            raise ValueError(f"CorrectorMeta: {e}") from None
        if not _is_real(self.alpha):
            raise ValueError(f"CorrectorMeta: alpha must be a finite number, got {self.alpha!r}")
        if (not isinstance(self.num_inference_steps, numbers.Integral) or isinstance(self.num_inference_steps, bool)
                or self.num_inference_steps < 1):
            raise ValueError(f"CorrectorMeta: num_inference_steps must be an integer >= 1, "
                             f"got {self.num_inference_steps!r}")
        if not _is_real(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"CorrectorMeta: guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}")
        if not isinstance(self.training, dict):
            raise ValueError(f"CorrectorMeta: training must be a dict, got {type(self.training).__name__}")
        try:
            json.dumps(self.training)
        except (TypeError, ValueError) as e:
            raise ValueError(f"CorrectorMeta: training must be JSON-serialisable ({e})") from None
        self._check_sampler()

    _SAMPLER_KEYS = ("pipeline", "height", "width", "max_sequence_length", "negative_prompt", "revision")

    def _check_sampler(self) -> None:
        if not isinstance(self.sampler, dict):
            raise ValueError(f"CorrectorMeta: sampler must be a dict, got {type(self.sampler).__name__}")
        unknown = sorted(set(self.sampler) - set(self._SAMPLER_KEYS))
        if unknown:
            raise ValueError(f"CorrectorMeta: sampler has unknown keys {unknown} (known: {list(self._SAMPLER_KEYS)})")
        for key in ("height", "width", "max_sequence_length"):
            value = self.sampler.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
                raise ValueError(f"CorrectorMeta: sampler.{key} must be a positive integer or null, got {value!r}")
        for key in ("pipeline", "negative_prompt", "revision"):
            value = self.sampler.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"CorrectorMeta: sampler.{key} must be a string or null, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored in ``xlard_corrector.json`` (with the format tag and version)."""
        return {"format": CORRECTOR_FORMAT, "format_version": CORRECTOR_FORMAT_VERSION,
                "backbone": self.backbone, "correction_step": float(self.correction_step),
                "alpha": float(self.alpha), "num_inference_steps": int(self.num_inference_steps),
                "guidance_scale": float(self.guidance_scale), "training": _io.json_safe(self.training),
                # only when known: a folder's metadata, and the paired evaluations that store it, read as before
                **({"sampler": dict(self.sampler)} if self.sampler else {})}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "CorrectorMeta.from_dict") -> CorrectorMeta:
        """Parse :meth:`to_dict`'s object; unknown or missing keys and another format are errors."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != CORRECTOR_FORMAT:
            raise ValueError(f"{source}: 'format' must be {CORRECTOR_FORMAT!r}, got {data.get('format')!r}")
        if type(data.get("format_version")) is not int or data.get("format_version") != CORRECTOR_FORMAT_VERSION:
            raise ValueError(f"{source}: format_version {data.get('format_version')!r}; this xlard reads version "
                             f"{CORRECTOR_FORMAT_VERSION}")
        names = [f.name for f in dataclasses.fields(cls)]
        body = {k: v for k, v in data.items() if k not in ("format", "format_version")}
        unknown = sorted(set(body) - set(names))
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown} (known: {names})")
        missing = [n for n in names if n not in ("training", "sampler") and n not in body]  # sampler: newer
        if missing:
            raise ValueError(f"{source}: missing keys {missing}")
        try:
            return cls(**body)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None


def save_corrector_dir(path: str | os.PathLike, corrector: ResidualCorrector, meta: CorrectorMeta) -> Path:
    """Write a corrector folder: ``save_pretrained`` output plus ``xlard_corrector.json``.

    The three files are written into a temporary folder beside ``path`` first;
    a new ``path`` appears with one atomic rename (all files or none); an
    existing folder is swapped for a new one at the same path holding the new
    files and its other entries (a reader may briefly find no folder, never a
    mixed one).

    Args:
        path: the folder to write (parents are created).
        corrector (xlard.models.ResidualCorrector): the corrector (its EMA
            weights, when the run keeps an EMA and evaluation should use it).
        meta (CorrectorMeta): what it was trained for.

    Returns:
        Path: ``path``.

    Raises:
        TypeError: ``corrector`` is not a ResidualCorrector or ``meta`` not a CorrectorMeta.
        NotADirectoryError: ``path`` exists and is a file.

    Example:
        >>> meta = CorrectorMeta("shapes", 0.3, 1.0, 20, 5.0, training={"run": "runs/a", "step": 4000})
        >>> save_corrector_dir("runs/a/corrector", corrector, meta)               # doctest: +SKIP
    """
    from xlard.models import ResidualCorrector

    if not isinstance(corrector, ResidualCorrector):
        raise TypeError(_err("save_corrector_dir", f"corrector must be an xlard.models.ResidualCorrector, "
                                                   f"got {type(corrector).__name__}"))
    if not isinstance(meta, CorrectorMeta):
        raise TypeError(_err("save_corrector_dir", f"meta must be a CorrectorMeta, got {type(meta).__name__}"))
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(_err("save_corrector_dir", f"{path} exists and is not a folder"))
    # A new (or empty) folder gets all three files at once; an existing one is swapped for a new one whole.
    with _io.atomic_folder(path, owner="save_corrector_dir", existing="merge") as tmp:
        corrector.save_pretrained(tmp)
        _write_json(tmp / CORRECTOR_META_NAME, meta.to_dict())
    return path


def load_corrector_dir(path: str | os.PathLike, *, device: str | torch.device | None = None
                       ) -> tuple[ResidualCorrector, CorrectorMeta]:
    """Load a corrector folder written by :func:`save_corrector_dir`.

    Args:
        path: the folder.
        device (str or torch.device, optional): where to put the corrector (default CPU).

    Returns:
        ``(corrector, meta)``: an :class:`xlard.models.ResidualCorrector` in eval
        mode and its :class:`CorrectorMeta`. Apply it with ``alpha=meta.alpha`` (the
        folder's calibrated step, what ``xlard eval``/``generate`` apply):
        ``corrector.correct`` and ``Backbone.generate`` otherwise take
        ``corrector.config.alpha``, the step it was trained with.

    Raises:
        FileNotFoundError: no such folder, or one of its three files is missing
            (the message lists what a corrector folder holds).
        ValueError: unreadable or inconsistent files, naming the file and field.

    Example:
        >>> corrector, meta = load_corrector_dir("runs/a/corrector")             # doctest: +SKIP
    """
    from xlard.models import CONFIG_NAME, WEIGHTS_NAME, ResidualCorrector

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_corrector_dir: path must be a corrector folder (a str or path), got "
                        f"{type(path).__name__}")
    path = Path(path)
    expected = f"{WEIGHTS_NAME}, {CONFIG_NAME} and {CORRECTOR_META_NAME} (written by save_corrector_dir)"
    if path.is_file():
        raise NotADirectoryError(f"corrector folder {path} is a file; give the folder that holds {expected}")
    if not path.is_dir():
        raise FileNotFoundError(f"corrector folder {path} does not exist (a corrector folder holds {expected})")
    meta_path = path / CORRECTOR_META_NAME
    if not meta_path.is_file():
        inner = path / "corrector" / CORRECTOR_META_NAME
        demo = path / "train" / "corrector" / CORRECTOR_META_NAME
        hint = (f"; {path} looks like a training run folder: its corrector is {path / 'corrector'}"
                if inner.is_file() else
                f"; {path} looks like an xlard demo folder: its corrector is {path / 'train' / 'corrector'}"
                if demo.is_file() else "")
        raise FileNotFoundError(f"corrector folder {path} has no {CORRECTOR_META_NAME} (a corrector folder holds "
                                f"{expected}){hint}")
    data = _io.read_json(meta_path, owner="load_corrector_dir", what="a corrector folder's metadata")
    meta = CorrectorMeta.from_dict(data, source=str(meta_path))
    corrector = ResidualCorrector.from_pretrained(path, device=device)
    return corrector, meta


def sampler_of(backbone) -> dict[str, Any]:
    """How ``backbone`` samples, as :class:`CorrectorMeta`'s ``sampler`` records it: ``pipeline`` (class name),
    ``height``, ``width``, ``max_sequence_length`` and ``negative_prompt``; None where the backbone does not say
    (a duck-typed one)."""
    pipeline = getattr(backbone, "pipeline", None)
    family = getattr(backbone, "family", None)
    size = {k: getattr(backbone, k, None) for k in ("height", "width")}
    return {"pipeline": type(pipeline).__name__ if pipeline is not None else None,
            **{k: int(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in size.items()},
            "max_sequence_length": getattr(family, "max_sequence_length", None),
            "negative_prompt": getattr(backbone, "negative_prompt", None)}


class CorrectorMismatch(ValueError):
    """A corrector that does not fit a backbone (:func:`check_corrector_fits`): the command line names it as the
    ``--corrector``'s error."""


def check_corrector_fits(corrector, meta: CorrectorMeta, backbone) -> None:
    """Raise a ValueError (:class:`CorrectorMismatch`) naming every way ``corrector`` does not fit ``backbone``.

    Checked: latent channels, prompt token width, pooled width (the corrector's
    config vs the backbone's properties); ``correction_step``,
    ``num_inference_steps`` and ``guidance_scale`` (the metadata vs the
    backbone's settings: a corrector sees a latent only where, and as, it was
    trained to); the latent grid divisible by the corrector's patch factor.

    Args:
        corrector (xlard.models.ResidualCorrector): the corrector.
        meta (CorrectorMeta): its metadata.
        backbone (xlard.backbones.Backbone): the backbone to apply it to.

    Raises:
        ValueError: one message listing every mismatch.
    """
    cfg = corrector.config
    problems = []
    for name, want, have in (("latent channels", cfg.latent_channels, backbone.latent_channels),
                             ("prompt token width (text_dim)", cfg.text_dim, backbone.text_dim),
                             ("pooled prompt width (pooled_dim)", cfg.pooled_dim, backbone.pooled_dim)):
        if int(want) != int(have):
            problems.append(f"{name}: corrector {want}, backbone {have}")
    for name, attr, want in (("correction_step", "correction_step", meta.correction_step),
                             ("num_inference_steps", "num_inference_steps", meta.num_inference_steps),
                             ("guidance_scale", "guidance_scale", meta.guidance_scale)):
        have = getattr(backbone, attr, None)
        if have is not None and not math.isclose(float(have), float(want), rel_tol=0, abs_tol=1e-9):
            flag = {"num_inference_steps": " (the CLI's --steps: leave it out to use the corrector's)",
                    "guidance_scale": " (the CLI's --guidance: leave it out to use the corrector's)"}.get(name, "")
            problems.append(f"{name}: corrector trained at {want}, backbone runs {have}{flag}")
    family = getattr(backbone, "family", None)
    scale = getattr(family, "vae_scale_factor", None)
    height, width = getattr(backbone, "height", None), getattr(backbone, "width", None)
    if isinstance(scale, int) and height and width:
        h, w = height // scale, width // scale
        if h % cfg.patch or w % cfg.patch:
            problems.append(f"latent grid {h}x{w} not divisible by the corrector's patch {cfg.patch}")
    sampler = getattr(meta, "sampler", None) or {}
    have_sampler = sampler_of(backbone)
    for key, what in (("pipeline", "pipeline"), ("height", "image height"), ("width", "image width"),
                      ("max_sequence_length", "text length (max_sequence_length)"),
                      ("negative_prompt", "negative prompt")):
        if key not in sampler or (key != "negative_prompt" and have_sampler[key] is None):
            continue  # not recorded (an older folder), or a backbone that does not say
        family = getattr(backbone, "family", None)
        if key == "negative_prompt" and family is not None and not getattr(family, "takes_negative_prompt", True):
            continue  # a FLUX corrector recorded the negative prompt its sampling ignored
        if sampler[key] != have_sampler[key]:
            problems.append(f"{what}: corrector trained with {sampler[key]!r}, backbone runs {have_sampler[key]!r}")
    for name, does in (("count_move", "counts"), ("count_edit", "edits")):
        if not getattr(cfg, name, False) or getattr(corrector, "eyes", None) is not None:
            continue
        from xlard.sources import _is_shapes_backbone

        # The default eyes read with the shapes understanding model (on the VAE's decoding, or distilled into
        # the latent eyes) and edit with the shapes backbone's VAE.
        latent = getattr(cfg, "count_eyes", "decoded") == "latent"
        if not _is_shapes_backbone(backbone):
            problems.append(f"{name} {does} with the shapes backbone's VAE and "
                            f"{'latent eyes' if latent else 'understanding model'}; attach other eyes "
                            f"(ResidualCorrector.attach_eyes) for another backbone")
        if latent:
            from xlard.shapes import latent_eyes

            problem = latent_eyes.installed_problem()  # missing or damaged: failed mid-run, at the first one
            if problem:
                problems.append(f"{name} reads with the shapes latent eyes (count_eyes: latent), and {problem} (or "
                                f"set count_eyes to 'decoded' in the corrector's config.json)")
        if float(getattr(backbone, "correction_step", 1.0)) != 1.0:
            problems.append(f"{name} decodes the corrected latent as a final one: it needs correction_step 1.0")
        if name == "count_edit" and height and width:
            from xlard.shapes.understanding import EDIT_IMAGE_SIZE

            if (int(height), int(width)) != (EDIT_IMAGE_SIZE, EDIT_IMAGE_SIZE):  # the counting rows failed mid-run
                problems.append(f"count_edit redraws the shapes backbone's {EDIT_IMAGE_SIZE}x{EDIT_IMAGE_SIZE} "
                                f"images (its understanding model's size); this backbone makes {height}x{width} "
                                f"images")
    if problems:
        raise CorrectorMismatch(f"the corrector (trained for backbone {meta.backbone!r}) does not fit this backbone: "
                         + "; ".join(problems))


def shipped_corrector_path(backbone: str | os.PathLike = "shapes") -> Path:
    """The folder of the corrector shipped in package data for ``backbone`` (a name such as ``"shapes"``, or the
    shipped backbone's own folder by path).

    Raises:
        ValueError: no corrector is shipped for that backbone.
        FileNotFoundError: the folder is absent (not trained/installed yet).
    """
    if isinstance(backbone, (str, os.PathLike)) and str(backbone) not in _SHIPPED:
        from xlard.sources import default_source_for

        if default_source_for(backbone) == "shapes":  # the shapes backbone given by its folder
            return shipped_corrector_path("shapes")
    if not isinstance(backbone, str) or backbone not in _SHIPPED:
        raise ValueError(f"no corrector ships for backbone {backbone!r} (shipped: {sorted(_SHIPPED)}); pass "
                         "--corrector DIR")
    path = _SHIPPED[backbone]
    if not (path / CORRECTOR_META_NAME).is_file():
        raise FileNotFoundError(f"the shipped {backbone} corrector is not installed at {path}; train one (xlard "
                                "train) and pass its folder with --corrector DIR")
    return path


def load_backbone_for(meta: CorrectorMeta, *, backbone: str | None = None, device: str | torch.device | None = None,
                      corrector: ResidualCorrector | None = None,
                      num_inference_steps: int | None = None, guidance_scale: float | None = None,
                      dtype: torch.dtype | str | None = None) -> DiffusersBackbone:
    """Load the diffusers backbone a corrector was trained for, at its ``correction_step``.

    Args:
        meta: the corrector's metadata (backbone name, correction_step, sampler settings).
        backbone: another backbone to load instead of ``meta.backbone`` ("shapes",
            a folder or a hub id); it must fit the corrector.
        device: where to run (default CPU, in float32).
        corrector: when given, :func:`check_corrector_fits` runs on the loaded backbone.
        num_inference_steps, guidance_scale: overrides (must equal the metadata's
            when ``corrector`` is given).
        dtype: the backbone's dtype (a torch dtype or its name; default float32).

    Returns:
        xlard.backbones.DiffusersBackbone without attention capture.

    Raises:
        FileNotFoundError: the shapes backbone is not installed.
        ValueError: the corrector does not fit.
    """
    import torch

    from xlard.backbones import DiffusersBackbone

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # the CLI's --dtype
    torch_dtype = torch.float32 if dtype is None else dtypes.get(dtype) if isinstance(dtype, str) else dtype
    if torch_dtype not in dtypes.values():
        raise ValueError(f"load_backbone_for: dtype must be float32, bfloat16 or float16 (a torch dtype or its "
                         f"name), got {dtype!r}")
    from xlard._args import model_location
    from xlard.backbones.diffusers_backbone import hub_load_failure

    name = backbone or meta.backbone
    # errors name where the backbone came from (they said "model_id_or_path", or passed on the hub's own text)
    origin = "backbone" if backbone else f"the corrector's backbone (recorded in its {CORRECTOR_META_NAME})"
    relative = "" if backbone or os.path.isabs(str(name)) or name == "shapes" else \
        " (if that names a folder relative to where the corrector was trained, run from there or give the backbone)"
    if name == "shapes":  # the shapes world's own backbone, as the CLI and the trainer read the name
        from xlard.shapes import backbone as shapes_backbone

        folder = shapes_backbone.backbone_path()
        if not shapes_backbone.is_available(folder):
            raise FileNotFoundError(shapes_backbone.not_installed())
        name = str(folder)
    try:
        name = model_location(origin, name, "model_index.json", "a diffusers pipeline folder", ", 'shapes'")
    except (OSError, ValueError) as exc:
        raise type(exc)(f"{exc}{relative}") from None
    sampler = getattr(meta, "sampler", None) or {}
    # the image size and negative prompt any pipeline takes; the T5 length only where the pipeline has one (set
    # on the loaded family, as from_pretrained does: another family is then named by check_corrector_fits)
    # (the negative prompt is set on the loaded family where it takes one: FLUX correctors recorded one it ignored)
    geometry = {k: sampler[k] for k in ("height", "width") if sampler.get(k) is not None}
    # the hub revision it was trained on: for that id only (another id or a folder given as backbone= has its own)
    if sampler.get("revision") is not None and name == meta.backbone and not os.path.isdir(name):
        geometry["revision"] = sampler["revision"]
    try:
        loaded = DiffusersBackbone.from_pretrained(
            name, correction_step=meta.correction_step,
            num_inference_steps=num_inference_steps or meta.num_inference_steps,
            guidance_scale=meta.guidance_scale if guidance_scale is None else guidance_scale,
            capture=False, device=device, torch_dtype=torch_dtype, **geometry)
    except (OSError, ValueError) as exc:  # not a local folder: the hub could not give it (offline, unknown id, gated)
        if guidance_scale is None and str(exc).startswith("guidance_scale:"):
            # the corrector's own sampler setting, not the caller's (it read "guidance_scale: ... got 5.0")
            raise CorrectorMismatch(f"the corrector was sampled with guidance_scale {meta.guidance_scale}, which "
                                    f"this backbone cannot take: {str(exc)[len('guidance_scale: '):]}") from None
        if os.path.isdir(name) or not (isinstance(exc, OSError) or type(exc).__name__ == "HFValidationError"):
            raise  # a local folder's own failure, or a setting's, says what it is
        raise ValueError(f"{origin}: {hub_load_failure(name, exc, revision=geometry.get('revision'))}{relative}") \
            from None
    if sampler.get("max_sequence_length") is not None and loaded.family.max_sequence_length is not None:
        loaded.family.max_sequence_length = int(sampler["max_sequence_length"])
    if sampler.get("negative_prompt") is not None and loaded.family.takes_negative_prompt:
        loaded.negative_prompt = sampler["negative_prompt"]
    if corrector is not None:
        check_corrector_fits(corrector, meta, loaded)
    return loaded


def _write_json(path: Path, obj) -> None:
    _io.atomic_write_json(path, obj, owner="xlard.evaluation", indent=2, sort_keys=True)


# ---------------------------------------------------------------------------
# Paired statistics
# ---------------------------------------------------------------------------


def image_seed(seed: int, index: int) -> int:
    """The generator seed of record ``index`` under evaluation seed ``seed``: ``seed * 1_000_000 + index``."""
    for name, value in (("seed", seed), ("index", index)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
            raise ValueError(_err("image_seed", f"{name} must be a non-negative integer, got {value!r}"))
    if index >= SEED_STRIDE:
        raise ValueError(_err("image_seed", f"index must be < {SEED_STRIDE}, got {index}"))
    top = (2**64 - SEED_STRIDE) // SEED_STRIDE  # every record's generator seed below 2**64
    if seed > top:
        raise ValueError(_err("image_seed", f"seed must be at most {top} (generator seeds are seed * {SEED_STRIDE:_} "
                                            f"+ index, below 2**64), got {seed}"))
    return int(seed) * SEED_STRIDE + int(index)


@dataclass(frozen=True)
class PairedDifference:
    """One row of a paired table (scores are fractions in [0, 1]).

    Attributes:
        base: mean score without the corrector.
        corrected: mean score with it.
        diff: ``corrected - base`` (the point estimate).
        ci_low, ci_high: the bootstrap interval of ``diff`` at ``confidence``.
        records: number of clusters (records) resampled.
        images: number of (record, seed) pairs.
        confidence: the interval's coverage, e.g. 0.95.
    """

    base: float
    corrected: float
    diff: float
    ci_low: float
    ci_high: float
    records: int
    images: int
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies strictly on one side of 0."""
        return self.ci_low > 0 or self.ci_high < 0


_MAX_RESAMPLES = 10**7  # 10**12 asked numpy for 7 TiB


def _check_bootstrap_args(fn: str, num_resamples, confidence, seed) -> None:
    if not isinstance(num_resamples, numbers.Integral) or isinstance(num_resamples, bool) \
            or not 1 <= num_resamples <= _MAX_RESAMPLES:
        raise ValueError(_err(fn, f"num_resamples must be an integer in [1, {_MAX_RESAMPLES}], got {num_resamples!r}"))
    if not _is_real(confidence) or not 0.0 < confidence < 1.0:
        raise ValueError(_err(fn, f"confidence must be a number in (0, 1), got {confidence!r}"))
    need = min_resamples(confidence)
    if num_resamples < need:  # 1 resample gave a single replicate as the "95% interval", labelled "excludes 0"
        raise ValueError(_err(fn, f"num_resamples must be at least {need} for a {percent(confidence)} interval (one "
                                  f"replicate in each tail), got {num_resamples}"))
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ValueError(_err(fn, f"seed must be a non-negative integer, got {seed!r}"))


def _scores(fn: str, name: str, values) -> np.ndarray:
    """Per-item scores as a 1-D float64 array; numpy's own words ("could not convert string to float",
    "inhomogeneous shape") or a silent flattening of a 2-D input before."""
    if values is None or isinstance(values, (str, bytes)):
        raise ValueError(_err(fn, f"{name} must be a sequence of numbers (one score per item), got {values!r}"))
    try:
        array = np.asarray(values)
        if array.dtype.kind not in "biuf":  # complex, strings, objects
            raise TypeError(array.dtype)
        array = array.astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(_err(fn, f"{name} must be a sequence of real numbers (one score per item), got "
                                  f"{repr(values)[:80]}")) from None
    if array.ndim > 1:
        raise ValueError(_err(fn, f"{name} must be one score per item (1-D), got shape {array.shape}"))
    return array.reshape(-1)


def _clusters(fn: str, base, corrected, clusters):
    """Per-cluster sums of base, corrected and the item counts, clusters in order of first appearance."""
    b, c = _scores(fn, "base", base), _scores(fn, "corrected", corrected)
    if b.shape != c.shape:
        raise ValueError(_err(fn, f"base and corrected must have the same length, got {b.size} and {c.size}"))
    if b.size == 0:
        raise ValueError(_err(fn, "base and corrected are empty; nothing to compare"))
    if not (np.isfinite(b).all() and np.isfinite(c).all()):
        raise ValueError(_err(fn, "base and corrected must be finite"))
    if clusters is None:
        keys = np.arange(b.size)
    else:
        keys = list(clusters)
        if len(keys) != b.size:
            raise ValueError(_err(fn, f"clusters must have one key per item ({b.size}), got {len(keys)}"))
    ids: dict[Any, int] = {}
    positions = []
    for i, k in enumerate(keys.tolist() if isinstance(keys, np.ndarray) else keys):
        try:
            positions.append(ids.setdefault(k, len(ids)))
        except TypeError:  # an unhashable key (a list): one cluster key per item, e.g. (record, seed)
            raise TypeError(_err(fn, f"clusters must hold hashable keys (an int, a string, a tuple), got "
                                     f"{type(k).__name__} {k!r} at item {i}")) from None
    index = np.array(positions, dtype=np.int64)
    n = len(ids)
    return (np.bincount(index, weights=b, minlength=n), np.bincount(index, weights=c, minlength=n),
            np.bincount(index, minlength=n).astype(np.float64))


_RESAMPLE_CELLS = 1 << 22  # index draws held at once (32 MiB of int64): memory bound of the bootstrap


def _resampled_means(sum_b, sum_c, count, num_resamples: int, rng: np.random.Generator):
    """Bootstrap replicates of (base mean, corrected mean) resampling clusters with replacement.

    Drawn in blocks of replicates (``_RESAMPLE_CELLS`` indices at a time): all at once, 100000 resamples of
    100000 records needed about 28 GB. The blocks draw the same stream as one draw would, in the same order,
    so the replicates are the same.
    """
    n = count.size
    rows = max(1, _RESAMPLE_CELLS // max(n, 1))
    means_b, means_c = np.empty(num_resamples), np.empty(num_resamples)
    for start in range(0, num_resamples, rows):
        stop = min(num_resamples, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))
        total = count[idx].sum(axis=1)
        means_b[start:stop] = sum_b[idx].sum(axis=1) / total
        means_c[start:stop] = sum_c[idx].sum(axis=1) / total
    return means_b, means_c


def _interval(replicates: np.ndarray, confidence: float, clusters: int = 2,
              scale: float = 1.0) -> tuple[float, float]:
    """The percentile interval; NaN for fewer than two clusters (resampling one cluster draws it every time, so the
    interval was that cluster's own value, a certainty the data cannot give).

    A bound within rounding of 0 (``1e-12 * scale``, ``scale`` the size of the means the replicates are differences
    of) is 0: a replicate that is 0 in exact arithmetic, a mean over tags of differences of fractions, came out as
    -1.8e-17 and labelled an interval [-1.2, -0.0] as excluding 0."""
    if clusters < 2:
        return float("nan"), float("nan")
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    tol = 1e-12 * max(float(scale), 1e-300)
    return (0.0 if abs(low) <= tol else float(low)), (0.0 if abs(high) <= tol else float(high))


def _scale(*means: np.ndarray) -> float:
    """The size of the bootstrap means (what rounding in their differences is relative to)."""
    return max((float(np.abs(m).max()) for m in means if np.size(m)), default=1.0)


def min_resamples(confidence: float) -> int:
    """The fewest bootstrap resamples a percentile interval at ``confidence`` can rest on: one replicate in each
    tail (40 at 0.95); with fewer, a bound is the most extreme replicate interpolated, or a single replicate."""
    from fractions import Fraction

    # exactly, from the number as written: 2 / (1 - 0.9999) in floats is 20000.0000000002, and ceil gave 20001
    return max(2, math.ceil(2 / (1 - Fraction(repr(float(confidence))))))


def paired_bootstrap(base: Sequence[float], corrected: Sequence[float], clusters: Sequence | None = None, *,
                     num_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> PairedDifference:
    """Point estimate and percentile-bootstrap interval of ``mean(corrected) - mean(base)`` on paired items.

    Items are paired (item i of ``base`` and of ``corrected`` come from the same
    record and seed). Resampling draws whole clusters with replacement, so
    items that share a cluster key (the seeds of one record) move together.

    Args:
        base (sequence of float): per-item scores without the corrector (e.g. 0/1 verdicts).
        corrected (sequence of float): per-item scores with it, same length.
        clusters (sequence of hashable, optional): one key per item (default:
            every item its own cluster).
        num_resamples (int): bootstrap replicates.
        confidence (float): interval coverage in (0, 1).
        seed (int): the resampling RNG's seed (same inputs + seed -> same interval).

    Returns:
        PairedDifference; its interval is NaN (no interval) when the items form
        a single cluster.

    Raises:
        ValueError: lengths differ, empty or non-finite inputs, bad settings.

    Example:
        >>> r = paired_bootstrap([0, 0], [0, 1], num_resamples=4000)
        >>> r.diff, r.ci_low, r.ci_high
        (0.5, 0.0, 1.0)
    """
    fn = "paired_bootstrap"
    _check_bootstrap_args(fn, num_resamples, confidence, seed)
    sum_b, sum_c, count = _clusters(fn, base, corrected, clusters)
    rb, rc = _resampled_means(sum_b, sum_c, count, int(num_resamples), np.random.default_rng(int(seed)))
    low, high = _interval(rc - rb, confidence, count.size, _scale(rb, rc))
    mb, mc = sum_b.sum() / count.sum(), sum_c.sum() / count.sum()
    return PairedDifference(float(mb), float(mc), float(mc - mb), low, high, int(count.size), int(count.sum()),
                            float(confidence))


def _tag_rng(seed: int, tag: str) -> np.random.Generator:
    # A stream per tag keyed by its name: a tag's interval does not depend on which other tags are present.
    return np.random.default_rng([int(seed), zlib.crc32(tag.encode("utf-8", "surrogatepass"))])


def paired_table(tags: Sequence[str], base: Sequence[float], corrected: Sequence[float],
                 clusters: Sequence | None = None, *, num_resamples: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> dict[str, PairedDifference]:
    """Per-tag paired differences and the overall row (GenEval's score: the mean of the tag means).

    Each tag is bootstrapped by resampling its own clusters; the overall row's
    replicate ``k`` is the mean over tags of the tags' replicate ``k``
    (stratified resampling: every replicate keeps every tag).

    Args:
        tags (sequence of str): the tag of each item.
        base, corrected, clusters: as :func:`paired_bootstrap` (a cluster must
            not span tags).
        num_resamples, confidence, seed: as :func:`paired_bootstrap`.

    Returns:
        ``{tag: PairedDifference, ..., "overall": PairedDifference}``, tags in
        GenEval's order then any other tags sorted. A tag of a single cluster
        has no interval (NaN); the overall row's interval then takes no spread
        from that tag (it is conditional on it), and is NaN only when every tag
        is a single cluster.

    Raises:
        ValueError: bad lengths or settings, no items, or a cluster in two tags.

    Example:
        >>> t = paired_table(["counting", "counting", "colors"], [0, 0, 1], [1, 0, 1])
        >>> round(t["overall"].diff, 3)
        0.25
    """
    from xlard.shapes.rules import TAGS

    fn = "paired_table"
    _check_bootstrap_args(fn, num_resamples, confidence, seed)
    if isinstance(tags, Iterable) and not isinstance(tags, (str, bytes, Sequence)):
        tags = list(tags)  # a generator: the check below consumed it and the lengths read "got 0, 2 and 2"
    if not isinstance(tags, Iterable) or isinstance(tags, (str, bytes)) or not all(isinstance(x, str) for x in tags):
        # a string was split into one-letter tags, and 1 and "1" merged into one tag
        raise ValueError(_err(fn, f"tags must be a sequence of tag strings (one per item), got {repr(tags)[:80]}"))
    tags = list(tags)
    if "overall" in tags:  # the aggregate row took its place: its own row was lost without a word
        raise ValueError(_err(fn, f"tags: 'overall' names the mean of the tags' scores, not a tag (item "
                                  f"{tags.index('overall')})"))
    b, c = _scores(fn, "base", base), _scores(fn, "corrected", corrected)
    if not (len(tags) == b.size == c.size):
        raise ValueError(_err(fn, f"tags, base and corrected must have one entry per item, got {len(tags)}, "
                                  f"{b.size} and {c.size}"))
    if b.size == 0:
        raise ValueError(_err(fn, "no items"))
    keys = list(range(b.size)) if clusters is None else list(clusters)
    if len(keys) != b.size:
        raise ValueError(_err(fn, f"clusters must have one key per item ({b.size}), got {len(keys)}"))
    owner: dict[Any, str] = {}
    for i, (k, t) in enumerate(zip(keys, tags)):
        try:
            first = owner.setdefault(k, t)
        except TypeError:  # an unhashable key (a list), named as _clusters names it
            raise TypeError(_err(fn, f"clusters must hold hashable keys (an int, a string, a tuple), got "
                                     f"{type(k).__name__} {k!r} at item {i}")) from None
        if first != t:
            raise ValueError(_err(fn, f"cluster {k!r} has items of tags {owner[k]!r} and {t!r}"))
    present = set(tags)
    order = [t for t in TAGS if t in present] + sorted(present - set(TAGS))
    table: dict[str, PairedDifference] = {}
    rep_diff, points_b, points_c = [], [], []
    n_records, widest, scale = 0, 0, 0.0
    for tag in order:
        sel = [i for i, t in enumerate(tags) if t == tag]
        sum_b, sum_c, count = _clusters(fn, b[sel], c[sel], [keys[i] for i in sel])
        rb, rc = _resampled_means(sum_b, sum_c, count, int(num_resamples), _tag_rng(seed, tag))
        size = _scale(rb, rc)
        low, high = _interval(rc - rb, confidence, count.size, size)
        scale = max(scale, size)
        mb, mc = sum_b.sum() / count.sum(), sum_c.sum() / count.sum()
        table[tag] = PairedDifference(float(mb), float(mc), float(mc - mb), low, high, int(count.size),
                                      int(count.sum()), float(confidence))
        rep_diff.append(rc - rb)
        points_b.append(mb)
        points_c.append(mc)
        n_records += int(count.size)
        widest = max(widest, int(count.size))
    overall_b, overall_c = float(np.mean(points_b)), float(np.mean(points_c))
    # a one-cluster tag adds no spread to the replicates (the overall interval is conditional on it; format_markdown
    # says so); with every tag of one cluster there is no spread at all: no interval
    low, high = _interval(np.mean(np.stack(rep_diff), axis=0), confidence, widest, scale)
    table["overall"] = PairedDifference(overall_b, overall_c, overall_c - overall_b, low, high, n_records,
                                        int(b.size), float(confidence))
    return table


# ---------------------------------------------------------------------------
# Running the backbone
# ---------------------------------------------------------------------------


@dataclass
class PairRow:
    """The verdicts on one (record, seed) pair: one line of ``pairs.jsonl``.

    Attributes:
        index: the record's position in the prompt file.
        seed: the evaluation seed (the generator seed is :func:`image_seed`).
        tag, prompt: the record's.
        base_correct, corrected_correct: the exact evaluator's verdicts.
        base_reason, corrected_reason: its reasons (``"ok"`` when correct).
        lam_mass: mean LAM over the latent grid (how much the corrector acted).
        masked_correct, random_correct: verdicts with Delta zeroed on the top
            LAM cells / as many random cells (None when faithfulness is off).
        actions: what the corrector's rules did to the latent, in words
            (:meth:`xlard.models.ResidualCorrector.actions`; empty: only its residual acted).
    """

    index: int
    seed: int
    tag: str
    prompt: str
    base_correct: bool
    corrected_correct: bool
    base_reason: str
    corrected_reason: str
    lam_mass: float
    masked_correct: bool | None = None
    random_correct: bool | None = None
    actions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PairRow:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def _verdicts(images, records, evaluator_config) -> list:
    from xlard.shapes import evaluator as E

    return E.evaluate(images, list(records), evaluator_config)


def _check_run_args(fn: str, batch_size, faithfulness_fraction) -> None:
    if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(_err(fn, f"batch_size must be an integer >= 1, got {batch_size!r}"))
    if faithfulness_fraction is not None and (not _is_real(faithfulness_fraction)
                                              or not 0.0 < faithfulness_fraction < 1.0):
        raise ValueError(_err(fn, f"faithfulness_fraction (--mask-fraction) must be in (0, 1) or None, "
                                  f"got {faithfulness_fraction!r}"))


def evaluate_pairs(backbone, corrector, meta: CorrectorMeta, records: Sequence[Mapping],
                   items: Sequence[tuple[int, int]], *, batch_size: int = 8, faithfulness_fraction: float | None = 0.2,
                   evaluator_config=None, on_images: Callable | None = None,
                   progress: Callable[[Iterable, int], Iterable] | None = None) -> Iterable[list[PairRow]]:
    """Generate and judge base and corrected images for (record, seed) pairs, one batch at a time.

    For each batch: ``state = backbone.encode(prompts, seed=[image_seed(s, i), ...])``;
    ``Delta, actions = corrector.actions(z0, e_p)``; ``zc, lam = residual_correction(z0, Delta, meta.alpha)``;
    base = ``decode(state)``, corrected = ``decode(state, zc)``; the exact
    evaluator judges both. With ``faithfulness_fraction``,
    :func:`xlard.explain.faithfulness` also decodes ``zc`` with Delta zeroed on
    the top LAM cells and on as many random cells (the control; each pair's random
    cells come from its own generator, derived from the pair's generator seed, so a
    pair's result does not depend on its batch).

    Args:
        backbone (xlard.backbones.Backbone): built at ``meta.correction_step``.
        corrector (xlard.models.ResidualCorrector): on the backbone's device.
        meta (CorrectorMeta): supplies ``alpha``.
        records (sequence of GenEval records): the prompt file.
        items (sequence of (index, seed)): which pairs to run, in this order.
        batch_size (int): pairs per backbone call.
        faithfulness_fraction (float or None): share of LAM cells to mask; None skips the check.
        evaluator_config (xlard.shapes.evaluator.EvaluatorConfig, optional).
        on_images (callable, optional): ``on_images(rows, base_images, corrected_images, lam)``
            after each batch (images float [B, 3, H, W] in [0, 1]), e.g. to save them.
        progress (callable, optional): wraps the batch iterator (e.g. tqdm).

    Yields:
        list[PairRow]: one batch of rows, in ``items`` order.

    Raises:
        ValueError: bad items or settings.
    """
    import torch

    from xlard import ops
    from xlard.explain import faithfulness
    from xlard.train.rollout import derived_generator

    fn = "evaluate_pairs"
    _check_run_args(fn, batch_size, faithfulness_fraction)
    items = [(int(i), int(s)) for i, s in items]
    for i, s in items:
        if not 0 <= i < len(records):
            raise ValueError(_err(fn, f"record index {i} out of range for {len(records)} records"))
    starts = list(range(0, len(items), int(batch_size)))
    iterator = progress(starts, len(starts)) if progress is not None else starts
    alpha = float(meta.alpha)
    for start in iterator:
        chunk = items[start:start + int(batch_size)]
        recs = [records[i] for i, _ in chunk]
        seeds = [image_seed(s, i) for i, s in chunk]
        state = backbone.encode([r["prompt"] for r in recs], seed=seeds)
        inputs = corrector_inputs(corrector, state.prompt_embedding, state.specs)
        with torch.no_grad():
            delta, actions = corrector.actions(state.z0, **inputs)
            zc, lam = ops.residual_correction(state.z0, delta, alpha)
            lam, actions = applied_change(lam, actions, alpha)
            base_img = backbone.decode(state).images
            corr_img = backbone.decode(state, zc).images
        base_v = _verdicts(base_img, recs, evaluator_config)
        corr_v = _verdicts(corr_img, recs, evaluator_config)
        masked = random = None
        if faithfulness_fraction is not None:
            known = ((state.z0, torch.tensor([float(v.correct) for v in base_v])),
                     (zc, torch.tensor([float(v.correct) for v in corr_v])))

            def reward_fn(z, _state=state, _recs=recs, _known=known):
                # Base and corrected are already judged; decoding is deterministic, so equal latents reuse them.
                for latent, reward in _known:
                    if torch.equal(z, latent):
                        return reward
                images = backbone.decode(_state, z).images
                return torch.tensor([float(v.correct) for v in _verdicts(images, _recs, evaluator_config)])

            # one stream per pair, derived from its image seed: its random cells do not depend on --batch or on
            # where a resumed run's batches start; not the image seed's own stream, which drew the image's initial
            # noise (the "random" cells were those where channel 0's noise was large)
            gens = [derived_generator(seed, "lam-control") for seed in seeds]
            res = faithfulness(reward_fn, state.z0, delta, alpha, fraction=float(faithfulness_fraction),
                               random_control=True, generator=gens)
            masked, random = res.reward_masked.tolist(), res.reward_random.tolist()
        lam_mass = lam.float().mean(dim=(1, 2)).tolist()
        rows = []
        for k, ((i, s), rec) in enumerate(zip(chunk, recs)):
            rows.append(PairRow(index=i, seed=s, tag=rec["tag"], prompt=rec["prompt"],
                                base_correct=bool(base_v[k].correct), corrected_correct=bool(corr_v[k].correct),
                                base_reason=base_v[k].reason, corrected_reason=corr_v[k].reason,
                                lam_mass=float(lam_mass[k]),
                                masked_correct=None if masked is None else bool(masked[k] > 0.5),
                                random_correct=None if random is None else bool(random[k] > 0.5),
                                actions=list(actions[k])))
        if on_images is not None:
            on_images(rows, base_img, corr_img, lam)
        yield rows


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------


def faithfulness_table(rows: Sequence[PairRow], *, num_resamples: int = 2000, confidence: float = 0.95,
                       seed: int = 0) -> dict[str, Any] | None:
    """How much of the corrector's gain is lost when Delta is zeroed on the top LAM cells, vs random cells.

    Over all pairs (GenEval's overall: mean of the tag means): ``gain =
    corrected - base``; ``lost_top = corrected - masked``; ``lost_random =
    corrected - random``; ``share_lost_top = lost_top / gain`` (NaN when the
    gain's interval includes 0: a share of a gain that may be nothing is
    meaningless, e.g. -13933% for a gain of +0.004). The two losses carry
    paired bootstrap intervals (records resampled). The same per GenEval tag
    under ``tags``: a corrector's overall gain can be nothing while one tag
    gains and another loses, and the LAM is asked about each.

    Returns:
        ``{"gain", "lost_top", "lost_random"}`` as :class:`PairedDifference`
        dicts (``diff`` is the loss, sign flipped so that a loss is positive),
        ``share_lost_top`` and ``share_lost_random`` (floats), and ``tags``:
        ``{tag: the same five keys}``; or None when no row has faithfulness
        verdicts.
    """
    rows = [r for r in rows if r.masked_correct is not None and r.random_correct is not None]
    if not rows:
        return None
    tags = [r.tag for r in rows]
    keys = [r.index for r in rows]
    corr = [float(r.corrected_correct) for r in rows]
    kw = dict(num_resamples=num_resamples, confidence=confidence, seed=seed)
    gains = paired_table(tags, [float(r.base_correct) for r in rows], corr, keys, **kw)
    # "corrected - masked" written as a paired difference (masked as the "after" side, then negated).
    tops = paired_table(tags, corr, [float(r.masked_correct) for r in rows], keys, **kw)
    rnds = paired_table(tags, corr, [float(r.random_correct) for r in rows], keys, **kw)

    def loss(p: PairedDifference) -> dict[str, Any]:
        # 0.0 - x, not -x: a zero loss prints as +0.0, not -0.0.
        return {"corrected": p.base, "masked": p.corrected, "diff": 0.0 - p.diff, "ci_low": 0.0 - p.ci_high,
                "ci_high": 0.0 - p.ci_low, "records": p.records, "images": p.images, "confidence": p.confidence}

    def entry(key: str) -> dict[str, Any]:
        gain = gains[key]

        def share(x: float) -> float:
            return x / gain.diff if gain.diff != 0 and gain.excludes_zero else float("nan")

        lost_top, lost_random = loss(tops[key]), loss(rnds[key])
        return {"gain": gain.to_dict(), "lost_top": lost_top, "lost_random": lost_random,
                "share_lost_top": share(lost_top["diff"]), "share_lost_random": share(lost_random["diff"])}

    return {**entry("overall"), "tags": {t: entry(t) for t in gains if t != "overall"}}


def actions_table(rows: Sequence[PairRow]) -> dict[str, dict[str, dict[str, int]]] | None:
    """What the corrector's rules did, per tag: pairs by the kinds of action taken (the first word of each of
    :attr:`PairRow.actions`, in the order taken, e.g. ``"redrew + added"``; ``"residual only"`` for none), with
    how many of them the correction fixed and broke. None when no pair has an action (a corrector without
    rules, or rows from before actions were recorded).

    Returns:
        ``{tag: {kinds: {"pairs": int, "fixed": int, "broken": int}}}``.
    """
    if not any(r.actions for r in rows):
        return None
    out: dict[str, dict[str, dict[str, int]]] = {}
    for r in rows:
        kinds: list[str] = []
        for action in r.actions:
            word = str(action).split(" ", 1)[0]
            if word not in kinds:
                kinds.append(word)
        cell = out.setdefault(r.tag, {}).setdefault(" + ".join(kinds) or "residual only",
                                                    {"pairs": 0, "fixed": 0, "broken": 0})
        cell["pairs"] += 1
        cell["fixed"] += int(r.corrected_correct and not r.base_correct)
        cell["broken"] += int(r.base_correct and not r.corrected_correct)
    return out


def build_report(rows: Sequence[PairRow], *, settings: Mapping[str, Any] | None = None, num_resamples: int = 2000,
                 confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """The JSON report of a paired run: per-tag and overall rows, faithfulness, settings.

    Args:
        rows: every :class:`PairRow` of the run.
        settings: what was run (corrector, backbone, seeds), copied into the report.
        num_resamples, confidence, seed: bootstrap settings.

    Returns:
        ``{"table": {tag: PairedDifference dict, ..., "overall": ...},
        "faithfulness": ... or None, "actions": :func:`actions_table` or None, "lam_mass": float,
        "pairs": int, "bootstrap": {...}, "settings": {...}}``. Scores are fractions.
    """
    if not rows:
        raise ValueError(_err("build_report", "no rows to report"))
    seen: dict[tuple, int] = {}
    prompt_of: dict[Any, tuple[int, str]] = {}
    for i, r in enumerate(rows):  # as pairs.jsonl is read: a pair judged twice weighed twice in its record's cluster
        first = seen.setdefault((r.index, r.seed), i)
        if first != i:
            raise ValueError(_err("build_report", f"rows {first} and {i} are the same pair (record {r.index}, seed "
                                                  f"{r.seed}): each pair is judged once"))
        j, prompt = prompt_of.setdefault(r.index, (i, r.prompt))
        if prompt != r.prompt:  # two prompt files' rows mixed: one record's cluster held two prompts
            raise ValueError(_err("build_report", f"rows {j} and {i} give record {r.index} two prompts "
                                                  f"({prompt!r:.60} and {r.prompt!r:.60})"))
    table = paired_table([r.tag for r in rows], [float(r.base_correct) for r in rows],
                         [float(r.corrected_correct) for r in rows], [r.index for r in rows],
                         num_resamples=num_resamples, confidence=confidence, seed=seed)
    out_table = {k: v.to_dict() for k, v in table.items()}
    prompts: dict[str, set[str]] = {}
    for r in rows:  # how many distinct prompts each interval rests on (a tag may repeat a few prompts)
        prompts.setdefault(r.tag, set()).add(r.prompt)
    for tag, row in out_table.items():
        row["prompts"] = len(set().union(*prompts.values())) if tag == "overall" else len(prompts.get(tag, ()))
    return {
        "table": out_table,
        "faithfulness": faithfulness_table(rows, num_resamples=num_resamples, confidence=confidence, seed=seed),
        "actions": actions_table(rows),
        "lam_mass": float(np.mean([r.lam_mass for r in rows])),
        "pairs": len(rows),
        "bootstrap": {"num_resamples": num_resamples, "confidence": confidence, "seed": seed,
                      "method": "percentile, records resampled with their seeds (conditional on the records' "
                                "prompts); overall stratified by tag"},
        "settings": dict(settings or {}),
    }


def _pts(x: float) -> str:
    return f"{100.0 * x:.1f}"


def _signed(x: float) -> str:
    return f"{100.0 * x:+.1f}"


#: The share of the gain lost, where there is no gain to lose (or no interval to show one).
_NO_GAIN = "n/a (no gain shown: its interval includes 0 or has too few records)"


def _has_interval(low: Any, high: Any) -> bool:
    """An interval was estimated (a report read back from JSON holds null where it was NaN)."""
    return low is not None and high is not None and math.isfinite(low) and math.isfinite(high)


def interval_text(low: Any, high: Any) -> str:
    """``[+a, +b]`` in points, or ``n/a`` where no interval could be estimated (a single cluster)."""
    return f"[{_signed(low)}, {_signed(high)}]" if _has_interval(low, high) else "n/a"


def table_rows(report: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """The report's table rows in GenEval's tag order, other tags sorted, ``overall`` last.

    The order does not depend on the mapping's (e.g. a JSON file read back with sorted keys).
    """
    from xlard.shapes.rules import TAGS

    table = report["table"]
    tags = [t for t in TAGS if t in table] + sorted(t for t in table if t not in TAGS and t != "overall")
    return [(t, table[t]) for t in tags] + ([("overall", table["overall"])] if "overall" in table else [])


def _cell(text: Any) -> str:
    """Text for one markdown table cell: ``|``, line breaks and markup characters escaped (a tag or an action
    holding ``|`` or a newline broke the table's columns and rows)."""
    text = " ".join(str(text).split())
    return re.sub(r"([\\|`*<>\[\]])", r"\\\1", text)  # not "_": single_object stays as it reads


def percent(fraction: float) -> str:
    """``fraction`` in percent, as exact as it was given: 0.975 is '97.5%' (it read '98%'), 0.004 '0.4%' ('0%')."""
    return f"{round(100.0 * float(fraction), 6):g}%"


def format_markdown(report: Mapping[str, Any]) -> str:
    """The report as markdown: the paired table in points, the faithfulness check, what the rules did."""
    conf = report["bootstrap"]["confidence"]
    lines = [f"| tag | records | prompts | images | base | corrected | gain (points) | {percent(conf)} interval | "
             "excludes 0 |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    rows = table_rows(report)
    for tag, r in rows:
        name = "**overall**" if tag == "overall" else _cell(tag)
        if not _has_interval(r["ci_low"], r["ci_high"]):
            excludes = "n/a"
        else:
            excludes = "yes" if r["ci_low"] > 0 or r["ci_high"] < 0 else "no"
        lines.append(f"| {name} | {r['records']} | {r.get('prompts', '')} | {r['images']} | {_pts(r['base'])} | "
                     f"{_pts(r['corrected'])} | {_signed(r['diff'])} | {interval_text(r['ci_low'], r['ci_high'])} | "
                     f"{excludes} |")
    lines.append("")
    lines.append("overall = mean of the tag scores (GenEval); intervals: paired percentile bootstrap over records "
                 f"({report['bootstrap']['num_resamples']} resamples, seed {report['bootstrap']['seed']}), "
                 "conditional on the records' prompts: they measure how the gain varies with the images, not with "
                 "the choice of prompts (a tag with few distinct prompts repeats them over its records).")
    single = [tag for tag, r in rows if tag != "overall" and not _has_interval(r["ci_low"], r["ci_high"])]
    if single:
        every = len(single) == len(rows) - 1
        lines.append(f"n/a: {', '.join(single)} rest(s) on one record, which resampling draws every time; "
                     + ("so no interval is estimated at all" if every
                        else "the overall interval takes no spread from it (conditional on it)"))
    lines.append(f"mean LAM (|alpha| sum_c |Delta| per latent cell): {report['lam_mass']:.4g}")
    faith = report.get("faithfulness")
    if faith:
        frac = report["settings"].get("faithfulness_fraction")
        what = percent(frac) if isinstance(frac, float) else "a share"
        lines += ["", f"LAM faithfulness: Delta zeroed on the top {what} of LAM cells vs {what} random cells "
                      "(overall, points)", "",
                  "| mask | score | lost vs corrected | interval | share of the gain lost |",
                  "|---|---:|---:|---|---:|"]
        g = faith["gain"]
        lines.append(f"| none (corrected) | {_pts(g['corrected'])} | | | |")
        for name, key, share in (("top LAM", "lost_top", "share_lost_top"),
                                 ("random", "lost_random", "share_lost_random")):
            r = faith[key]
            s = faith[share]
            lines.append(f"| {name} | {_pts(r['masked'])} | {_signed(r['diff'])} | "
                         f"{interval_text(r['ci_low'], r['ci_high'])} | "
                         f"{_NO_GAIN if not _is_real(s) else f'{s:.0%}'} |")
        # the whole gain lost, where there is a gain to lose (it read 100% beside "n/a (no gain ...)")
        base_share = "100%" if _is_real(faith["share_lost_top"]) else _NO_GAIN
        lines.append(f"| base (no correction) | {_pts(g['base'])} | {_signed(g['corrected'] - g['base'])} | | "
                     f"{base_share} |")
        by_tag = faith.get("tags") or {}
        if by_tag:
            lines += ["", "Per tag (points; a share only where the tag's gain excludes 0):", "",
                      "| tag | gain | interval | lost, top LAM | lost, random | share lost, top / random |",
                      "|---|---:|---|---:|---:|---:|"]
            def pct(x: float | None) -> str:  # None: undefined, as eval.json stores NaN
                return f"{x:.0%}" if _is_real(x) else "n/a"

            for tag, t in table_rows({"table": by_tag}):
                lines.append(f"| {_cell(tag)} | {_signed(t['gain']['diff'])} | "
                             f"{interval_text(t['gain']['ci_low'], t['gain']['ci_high'])} | "
                             f"{_signed(t['lost_top']['diff'])} | "
                             f"{_signed(t['lost_random']['diff'])} | {pct(t['share_lost_top'])} / "
                             f"{pct(t['share_lost_random'])} |")
    acted = report.get("actions")
    if acted:
        lines += ["", "What the corrector's rules did (pairs by the kinds of action taken; fixed / broken among them):",
                  "", "| tag | actions | pairs | fixed | broken |", "|---|---|---:|---:|---:|"]
        for tag, kinds in table_rows({"table": acted}):
            for kind, n in sorted(kinds.items(), key=lambda kv: (-kv[1]["pairs"], kv[0])):
                lines.append(f"| {_cell(tag)} | {_cell(kind)} | {n['pairs']} | {n['fixed']} | {n['broken']} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# A whole run: folder, resume, images
# ---------------------------------------------------------------------------


def _records_digest(records: Sequence[Mapping]) -> str:
    text = "\n".join(json.dumps(r, sort_keys=True) for r in records)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _backbone_source(backbone) -> str | None:
    """Where the backbone's weights came from, for ``run.json``: "shapes" for the shapes world's (wherever it is
    installed), a local folder as its real path, else the hub id; None for a backbone without a pipeline. The
    identity above names the pipeline class only: a run resumed on another model of that class mixed the two
    models' pairs in one table, without a word."""
    from xlard.shapes import backbone as shapes_backbone

    source = getattr(getattr(backbone, "pipeline", None), "name_or_path", None)
    if not isinstance(source, str) or not source:
        return None
    if not os.path.isdir(source):
        return source  # a hub id
    real = os.path.realpath(source)  # "shapes" only for the installed one: $XLARD_SHAPES_BACKBONE may name another
    return "shapes" if real == os.path.realpath(shapes_backbone.DEFAULT_PATH) else real


def _backbone_identity(backbone) -> str:
    """What ``run.json`` records of the backbone, the same in every process: its own ``repr`` when its class
    defines one (``DiffusersBackbone``: model and settings), else its class's qualified name (object's default
    ``repr`` holds a memory address, so a run of a user's ``Backbone`` subclass could never resume)."""
    cls = type(backbone)
    if cls.__repr__ is object.__repr__:
        return f"{cls.__module__}.{cls.__qualname__}"
    return repr(backbone)


def _corrector_digest(corrector) -> str:
    """SHA-256 of the corrector's weights and of its config (its rules and ``autocast`` change what the same
    weights do, so a run resumed with them changed is another run)."""
    h = hashlib.sha256()
    config = getattr(corrector, "config", None)
    if callable(getattr(config, "to_dict", None)):
        h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    _hash_state(h, corrector.state_dict())
    # The default latent eyes are part of what a count rule does: a run resumed with other ones (another
    # $XLARD_SHAPES_LATENT_EYES) would mix two sets of edits without a word.
    if getattr(config, "count_eyes", None) == "latent" and getattr(corrector, "eyes", None) is None \
            and (getattr(config, "count_edit", False) or getattr(config, "count_move", False)):
        from xlard.shapes import latent_eyes

        if latent_eyes.is_available():  # (when absent, check_corrector_fits has refused the run already)
            h.update(b"latent eyes")
            _hash_state(h, latent_eyes.load_latent_model().state_dict())
    return h.hexdigest()


def _hash_state(h, state: dict) -> None:
    """Feed a state dict's names and float32 values, in name order, to the hash ``h``."""
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())


def _wrong_row_field(row: PairRow) -> str | None:
    """Which field of a pair row read from ``pairs.jsonl`` has the wrong type (None: all fine); a hand-edited
    ``"lam_mass": "0.1"`` failed only in the report, after every remaining pair had been judged."""
    for name in ("index", "seed"):
        if type(getattr(row, name)) is not int:
            return f"{name} must be an integer"
    for name in ("tag", "prompt", "base_reason", "corrected_reason"):
        if not isinstance(getattr(row, name), str):
            return f"{name} must be a string"
    for name in ("base_correct", "corrected_correct", "masked_correct", "random_correct"):
        value = getattr(row, name)
        if not isinstance(value, bool) and not (value is None and name in ("masked_correct", "random_correct")):
            return f"{name} must be true or false"
    if row.lam_mass is not None and (isinstance(row.lam_mass, bool) or not isinstance(row.lam_mass, (int, float))):
        return "lam_mass must be a number"
    if not isinstance(row.actions, list) or not all(isinstance(a, str) for a in row.actions):
        return "actions must be a list of strings"
    return None


def _read_rows(path: Path, records: Sequence[dict] | None = None, seeds: Sequence[int] | None = None
               ) -> list[PairRow]:
    """The judged pairs of ``pairs.jsonl`` (a last line cut by an interrupted write is left out: its pair is judged
    again). With ``records`` and ``seeds`` (a resumed run's), a row that is not one of this run's pairs, or a pair
    judged twice, is refused: well-formed, it was counted as it stood (a duplicated row weighed its pair twice, a
    foreign seed failed after the whole evaluation)."""
    rows: list[PairRow] = []
    if not path.is_file():
        return rows
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line} is not UTF-8 text (the file was edited or damaged); delete that "
                         "line and rerun with --resume to judge its pair again, or pick another --out") from None
    fix = "(the file was edited or damaged); delete that line and rerun with --resume to judge its pair again, or " \
          "pick another --out"
    seen: dict[tuple[int, int], int] = {}
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            if n >= len(lines) - 2:  # a line cut by an interrupted write: redo that pair
                break
            raise ValueError(f"{path}: line {n + 1} is not a pair row {fix}") from None
        try:
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            row = PairRow.from_dict(data)
            wrong = _wrong_row_field(row)
            if wrong:
                raise TypeError(wrong)
        except (KeyError, TypeError) as exc:  # well-formed JSON, even on the last line: no cut write
            what = f" ({exc})" if isinstance(exc, TypeError) and str(exc) else ""
            raise ValueError(f"{path}: line {n + 1} is not a pair row{what} {fix}") from None
        if row.lam_mass is None:  # a NaN mass is written as null
            row.lam_mass = float("nan")
        if records is not None and seeds is not None:
            why = None
            if not 0 <= row.index < len(records):
                why = f"a pair of record {row.index}, but the prompts hold {len(records)} records"
            elif row.seed not in seeds:
                why = f"a pair of seed {row.seed}, which is not among --seeds {list(seeds)}"
            elif (row.tag, row.prompt) != (records[row.index].get("tag"), records[row.index].get("prompt")):
                why = (f"a pair of prompt {row.prompt!r}, but record {row.index} is "
                       f"{records[row.index].get('prompt')!r}")
            elif (row.index, row.seed) in seen:
                why = f"the pair (record {row.index}, seed {row.seed}) judged again (line {seen[row.index, row.seed]})"
            if why is not None:
                raise ValueError(f"{path}: line {n + 1} is {why} {fix}")
            seen[row.index, row.seed] = n + 1
        rows.append(row)
    return rows


def _mark_image_folders(out: Path, complete: bool) -> None:
    """``images/base`` and ``images/corrected`` of a paired run are GenEval folders that ``xlard eval --folder``
    scores; while the run has not judged every pair they hold part of the records, and their manifest says so
    (an interrupted run's images were scored as if complete)."""
    for kind in ("base", "corrected"):
        _io.atomic_write_json(out / "images" / kind / _io.MANIFEST_NAME,
                              {"command": "eval (with a corrector)", "settings": {"paired_run": str(out)},
                               "complete": complete}, owner="xlard.evaluation", make_parents=True)


def applied_change(lam, actions: list[list[str]], alpha: float):
    """The LAM and the actions of the change ``zc = z0 + alpha * Delta`` applies: ``|alpha| * sum_c |Delta|``, and
    for ``alpha`` 0 no action but "nothing applied (alpha 0)" (a corrector of alpha 0 left every image as it was,
    while its actions said "removed 1 circle(s)" and its LAM was bright)."""
    if alpha == 0:
        return lam * 0.0, [["nothing applied (alpha 0)"] for _ in actions]
    return (lam if alpha == 1 else lam * abs(alpha)), actions


def _save_images(out: Path, records, rows, base, corrected, lam) -> None:
    from xlard.explain import overlay, save_png
    from xlard.shapes import prompts as P

    for k, row in enumerate(rows):
        for kind, image in (("base", base[k]), ("corrected", corrected[k])):
            folder = out / "images" / kind / f"{row.index:05d}"
            meta = folder / "metadata.jsonl"
            if not meta.is_file():
                P.write_jsonl(meta, [records[row.index]])
            save_png(folder / "samples" / f"{row.seed:04d}.png", image.float().clamp(0, 1).cpu())
        save_png(out / "images" / "lam" / f"{row.index:05d}_seed{row.seed}.png",
                 overlay(corrected[k].float().clamp(0, 1).cpu(), lam[k].float().cpu()))


@_io.holds_folder("out", "out")
def run_evaluation(backbone, corrector, meta: CorrectorMeta, records: Sequence[Mapping], seeds: Sequence[int], *,
                   out: str | os.PathLike, batch_size: int = 8, faithfulness_fraction: float | None = 0.2,
                   num_resamples: int = 2000, confidence: float = 0.95, bootstrap_seed: int = 0,
                   save_images: bool = False, quiet: bool = False, corrector_source: str | None = None,
                   log: Callable[[str], None] | None = None, restart_hint: str | None = None) -> dict[str, Any]:
    """Run (or resume) a paired evaluation into ``out`` and return the report.

    ``out/run.json`` records what is asked (records digest, seeds, corrector
    weights digest and metadata, backbone settings, faithfulness fraction);
    rerunning with the same settings continues from ``out/pairs.jsonl``, with
    other settings it stops with an error instead of mixing runs.

    Args:
        backbone, corrector, meta: see :func:`evaluate_pairs` (fit is checked).
        records: GenEval records (e.g. :func:`xlard.shapes.prompts.read_records`).
        seeds (sequence of int): evaluation seeds; every record runs under each.
        out: the run folder.
        batch_size, faithfulness_fraction: see :func:`evaluate_pairs`.
        num_resamples, confidence, bootstrap_seed: see :func:`paired_table`.
        save_images (bool): also write ``out/images/{base,corrected}`` in
            GenEval's folder layout (sample file = seed) and LAM overlays.
        quiet (bool): no progress bar.
        corrector_source (str, optional): where the corrector came from (reported).
        log (callable, optional): where status lines go (default stderr).
        restart_hint (str, optional): what the messages about an ``out`` that holds another or a damaged run
            advise (default: another --out, or ``xlard eval --overwrite``; the demo, whose folder this is a part
            of, says how to redo its evaluation alone).

    Returns:
        The report (:func:`build_report`), also written to ``out/eval.json`` and ``out/eval.md``.

    Raises:
        ValueError: bad arguments, a corrector that does not fit, or an ``out``
            folder holding a different run.
    """
    fn = "run_evaluation"
    log = log or (lambda s: print(s, file=sys.stderr))
    # Every setting is checked before the first image: a typo must not cost a whole run.
    _check_bootstrap_args(fn, num_resamples, confidence, bootstrap_seed)
    _check_run_args(fn, batch_size, faithfulness_fraction)
    check_corrector_fits(corrector, meta, backbone)
    records = list(records)
    if not records:
        raise ValueError(_err(fn, "records is empty"))
    from xlard import geneval

    for i, record in enumerate(records):  # GenEval records (a KeyError or TypeError further in, else)
        try:
            geneval.validate_record(record, index=i)
        except ValueError as e:
            raise ValueError(_err(fn, f"records: {e}")) from None
    if isinstance(seeds, (str, bytes, numbers.Number)) or not isinstance(seeds, Iterable):
        raise ValueError(_err(fn, f"seeds must be a list of evaluation seeds (non-negative ints, e.g. [0, 1]), got "
                                  f"{seeds!r}" + (" (parse_seeds reads '0,1')" if isinstance(seeds, str) else "")))
    seeds = list(seeds)
    if not seeds:
        raise ValueError(_err(fn, "seeds is empty; give at least one evaluation seed"))
    for i, s in enumerate(seeds):  # before run.json is written: a seed the generator refuses made a folder no
        try:  # later run with good seeds could use
            image_seed(s, 0)
        except ValueError as e:
            raise ValueError(_err(fn, f"seeds[{i}]: {str(e).split(': ', 1)[-1]}")) from None
    seeds = [int(s) for s in seeds]  # numpy ints: run.json stores plain ints
    if len(set(seeds)) != len(seeds):
        raise ValueError(_err(fn, f"seeds must be distinct, got {seeds}"))
    if len(records) > SEED_STRIDE:
        raise ValueError(_err(fn, f"at most {SEED_STRIDE} records, got {len(records)}"))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(_err(fn, f"out {out} exists and is not a folder"))
    settings = {
        "corrector": corrector_source, "corrector_meta": meta.to_dict(), "corrector_sha256": _corrector_digest(corrector),
        "backbone": _backbone_identity(backbone), "backbone_source": _backbone_source(backbone),
        "correction_step": meta.correction_step, "alpha": meta.alpha,
        "records": len(records), "records_sha256": _records_digest(records), "seeds": seeds,
        "faithfulness_fraction": faithfulness_fraction, "save_images": bool(save_images),
    }
    check = getattr(backbone, "check_prompts", None)  # a prompt it cannot use fails before the folder is made
    if check is not None:
        check([r["prompt"] for r in records])
    out.mkdir(parents=True, exist_ok=True)
    if (out / "images").is_dir():  # a killed image write's temporaries (.tmp-*.png): never complete, never scored
        for tmp in (out / "images").rglob(".tmp-*"):
            if _io.is_temporary(tmp.name) and (tmp.is_file() or tmp.is_symlink()):
                tmp.unlink(missing_ok=True)
    run_path, pairs_path = out / "run.json", out / "pairs.jsonl"
    if run_path.is_file():
        # damaged (emptied, cut, replaced): named, not "Expecting value: line 1 column 1" or an AttributeError
        try:
            previous = _io.read_json(run_path, owner=_err(fn, "out"), what="the run.json of a paired evaluation")
        except ValueError as exc:
            if restart_hint is None:
                raise
            raise ValueError(f"{exc}; {restart_hint}") from None
        if not isinstance(previous, dict) or not {"records_sha256", "seeds", "corrector_sha256"} <= previous.keys():
            # {} (a damaged or hand-made file) read as "another evaluation (different alpha, backbone, ...)"
            needed = {"records_sha256", "seeds", "corrector_sha256"}
            got = (f"a JSON object without {', '.join(sorted(needed - set(previous)))}"
                   if isinstance(previous, dict) else type(previous).__name__)
            raise ValueError(_err(fn, f"out: {run_path} is not the run.json of a paired evaluation (damaged or "
                                      f"another's: {got}); "
                                      + (restart_hint or "remove the folder's files or choose another out")))
        # The corrector's path is informational: the same weights (digest) under another path may resume.
        current = _io.json_safe(settings)  # as written: NaN is stored as null
        differ = sorted(k for k in set(previous) | set(current)
                        if k != "corrector" and previous.get(k) != current.get(k)
                        and not (k == "backbone_source" and k not in previous))  # a folder from before 2026-12-07
        if differ:
            def shown(value) -> str:
                return _io.short_json(value, 90)

            def difference(key) -> str:
                old, new = previous.get(key), current.get(key)
                if isinstance(old, dict) and isinstance(new, dict):  # the keys inside that differ, not a cut prefix
                    inner = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                    old, new = {k: old.get(k) for k in inner}, {k: new.get(k) for k in inner}
                if isinstance(old, str) and isinstance(new, str) and max(len(shown(old)), len(shown(new))) >= 90:
                    # long strings (the backbone's repr) from a little before where they part: their 87-character
                    # prefixes printed the same
                    at = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
                    start = max(0, at - 20)
                    old, new = (("..." if start else "") + old[start:], ("..." if start else "") + new[start:])
                return f"{key}: the folder's {shown(old)}, now {shown(new)}"

            # the values too: the backbone is recorded as one line (pipeline, size, device, dtype), and a --dtype
            # change read "different backbone" without saying what differed
            what = "; ".join(difference(k) for k in differ)
            raise ValueError(f"--out: {out} holds another evaluation (different {', '.join(differ)}: {what}); "
                             + (restart_hint or "rerun with the folder's settings, pick another --out, or start "
                                                "afresh there (xlard eval --overwrite)"))
    else:
        if pairs_path.exists():
            raise ValueError(f"--out: {out} has pairs.jsonl but no run.json; "
                             + (restart_hint or "pick another --out, or start afresh there (xlard eval --overwrite)"))
        _write_json(run_path, settings)
    done = _read_rows(pairs_path, records, seeds)
    done_keys = {(r.index, r.seed) for r in done}
    todo = [(i, s) for s in seeds for i in range(len(records)) if (i, s) not in done_keys]
    if done:
        log(f"resuming {out}: {len(done)} of {len(records) * len(seeds)} pairs already judged")
    if done or (pairs_path.is_file() and pairs_path.stat().st_size):
        # Drop a line cut by an interruption before appending to the file (atomically: an interruption
        # now keeps every judged pair); also when it was the only line (appending after it made the file
        # unreadable at the next resume).
        _io.atomic_write_text(pairs_path, "".join(_io.dumps(r.to_dict()) + "\n" for r in done),
                              owner="xlard.evaluation")
    progress = None
    if not quiet:
        def progress(it, total):
            try:
                from tqdm import tqdm
            except ImportError:
                return it
            return tqdm(it, total=total, desc="eval base+corrected", unit="batch")
    on_images = (lambda rows, b, c, lam: _save_images(out, records, rows, b, c, lam)) if save_images else None
    if save_images:  # `xlard eval --folder images/base` refuses them until every pair is in
        _mark_image_folders(out, complete=False)
    rows = list(done)

    def append(fd: int, batch: list[PairRow]) -> None:
        # unbuffered: a failed write is reported here, not again when a buffered file is closed
        view = memoryview("".join(_io.dumps(r.to_dict()) + "\n" for r in batch).encode("utf-8"))
        try:
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as exc:  # a full disk or a size limit said "[Errno 28]" naming no file
            if exc.errno not in _io._WRITE_ERRNOS:
                raise
            raise _io._reraise(exc, f"--out: cannot write {pairs_path}",
                               " (the pairs judged before are kept: rerun with --resume once it can be written)"
                               ) from None

    try:
        fd = os.open(pairs_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as exc:
        raise _io._reraise(exc, f"--out: cannot write {pairs_path}") from None
    try:
        for batch in evaluate_pairs(backbone, corrector, meta, records, todo, batch_size=batch_size,
                                    faithfulness_fraction=faithfulness_fraction, on_images=on_images,
                                    progress=progress):
            append(fd, batch)
            rows.extend(batch)
    finally:
        os.close(fd)
    order = {seed: k for k, seed in enumerate(seeds)}  # seeds.index per row: pairs x seeds
    rows.sort(key=lambda r: (order[r.seed], r.index))
    if save_images:
        _mark_image_folders(out, complete=True)
    report = build_report(rows, settings=settings, num_resamples=num_resamples, confidence=confidence,
                          seed=bootstrap_seed)
    _write_json(out / "eval.json", report)
    md = format_markdown(report)
    _io.atomic_write_text(out / "eval.md", md, owner="xlard.evaluation")
    return report


# ---------------------------------------------------------------------------
# Command-line entry points (xlard eval / generate with a corrector)
# ---------------------------------------------------------------------------


def _given(args, name: str, default):
    """``args.name``, or ``default`` when it is absent or None (the CLI leaves unset options None)."""
    value = getattr(args, name, None)
    return default if value is None else value


def _corrector_from_args(args):
    """``--corrector DIR`` or ``--correct`` (the corrector shipped for ``--backbone``, default shapes)."""
    if getattr(args, "corrector", None) and getattr(args, "correct", False):
        raise ValueError("--corrector: give --corrector DIR or --correct (the shipped corrector), not both")
    flag = "--corrector" if getattr(args, "corrector", None) else "--correct"
    try:  # the library's messages, prefixed with the option that named the folder
        if getattr(args, "corrector", None):
            source = str(args.corrector)
        else:
            source = str(shipped_corrector_path(getattr(args, "backbone", None) or "shapes"))
        corrector, meta = load_corrector_dir(source, device=getattr(args, "device", None))
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        raise type(exc)(f"{flag}: {exc}") from None
    return corrector, meta, source


def other_world_note(source) -> str | None:
    """A note when ``source`` (a backbone, or the name or folder it is loaded from) is not the shapes world's
    backbone: the exact evaluator judges shapes-world images only, and a table of zeros on another model's images
    read as a verdict on the corrector. None for the shapes backbone."""
    from xlard.sources import _is_shapes_backbone

    if _is_shapes_backbone(source):
        return None
    return ("note: the exact evaluator judges images of the shapes world (its four shapes and ten colors on a "
            "flat background); on another backbone's images its table says little about the model or the "
            "corrector (docs/evaluation.md)")


def _backbone_from_args(args, corrector, meta):
    try:
        return load_backbone_for(meta, backbone=getattr(args, "backbone", None),
                                 device=getattr(args, "device", None), corrector=corrector,
                                 num_inference_steps=getattr(args, "steps", None) or None,
                                 guidance_scale=getattr(args, "guidance", None), dtype=getattr(args, "dtype", None))
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:  # the flag, not the API's argument name
        text = str(exc)
        if isinstance(exc, CorrectorMismatch):  # one line naming the argument, as every usage error
            raise CorrectorMismatch(f"--corrector: {text}") from None
        if text.startswith("backbone: "):
            raise type(exc)("--backbone: " + text[len("backbone: "):]) from None
        if text.startswith("guidance_scale: ") and getattr(args, "guidance", None) is not None:
            raise type(exc)("--guidance: " + text[len("guidance_scale: "):]) from None  # the flag's own value
        raise


def parse_seeds(text: str | Sequence[int] | None, default: int = 0) -> list[int]:
    """``--seeds``: "0,1,2" or "0 1" (or a list of ints) -> distinct non-negative ints; None -> ``[default]``."""
    if text is None:
        text = [default]  # checked as a given seed: -5 came back as [-5], "x" as int()'s own words
    try:
        parts = text.replace(",", " ").split() if isinstance(text, str) else list(text)
        seeds = []
        for p in parts:
            value = int(p)
            if isinstance(p, bool) or (not isinstance(p, str) and value != p):  # 1.5 and True were read as 1
                raise ValueError
            seeds.append(value)
    except (TypeError, ValueError, ArithmeticError):  # ArithmeticError: int(inf)
        raise ValueError(f"--seeds: must be non-negative integers separated by commas, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: must be distinct non-negative integers, got {text!r}")
    # image_seed(seed, index) must be a generator seed (< 2**64) for every index: checked now, not after loading
    top = (2**64 - SEED_STRIDE) // SEED_STRIDE
    if max(seeds) > top:
        raise ValueError(f"--seeds: must be at most {top} (image seeds are seed * {SEED_STRIDE:_} + record index, "
                         f"below 2**64), got {max(seeds)}")
    return seeds


def check_pair_count(records: int, seeds: int, limit: int) -> None:
    """The paired run's size: ``records x seeds`` pairs (each decodes a base and a corrected image and more) at most
    ``limit`` (the CLI's images per command), checked before anything loads or is cleared."""
    if records * seeds > limit:
        raise ValueError(f"--prompts and --seeds: {records} records x {seeds} seeds make {records * seeds} pairs; "
                         f"at most {limit} per run (use fewer records or seeds)")


def run_eval_cli(args) -> int:
    """``xlard eval --prompts FILE (--corrector DIR | --correct) [--seeds 0,1] [--out DIR]``: the paired run.

    Prints the markdown table; ``--json`` / ``--markdown`` copy the report elsewhere.
    """
    from xlard.shapes import prompts as P

    if not getattr(args, "prompts", None):
        raise ValueError("xlard eval with a corrector needs --prompts FILE (GenEval JSONL records)")
    if getattr(args, "folder", None) or getattr(args, "images", None):
        raise ValueError("--corrector/--correct generates its own images; drop --folder/--images")
    records = P.read_records(args.prompts)  # records and seeds before anything loads
    seeds = parse_seeds(getattr(args, "seeds", None), default=getattr(args, "seed", 0) or 0)
    from xlard.cli import MAX_IMAGES

    check_pair_count(len(records), len(seeds), MAX_IMAGES)
    corrector, meta, source = _corrector_from_args(args)
    backbone = _backbone_from_args(args, corrector, meta)
    backbone.check_prompts([r["prompt"] for r in records], lambda i: f"--prompts: {args.prompts} record {i}")
    note = other_world_note(backbone)
    if note:  # a note, as the training-split one below: shown under --quiet too
        print(note, file=sys.stderr)
    if meta.backbone == "shapes":  # a table on training prompts is no held-out measurement: say so
        seen = P.split_membership(records).count("train")
        if seen:
            print(f"note: {seen} of {len(records)} records of {args.prompts} ask what training-split records ask; "
                  "a corrector trained on the shapes world has seen them, so this is no held-out measurement "
                  "(`xlard prompts --split heldout` writes held-out records)", file=sys.stderr)
    fraction = None if getattr(args, "no_faithfulness", False) else _given(args, "mask_fraction", 0.2)
    out = Path(getattr(args, "out", None) or _io.PAIRED_EVAL_OUT)
    report = run_evaluation(backbone, corrector, meta, records, seeds, out=out, batch_size=args.batch,
                            faithfulness_fraction=fraction, num_resamples=_given(args, "bootstrap", 2000),
                            save_images=bool(getattr(args, "save_images", False)), quiet=args.quiet,
                            corrector_source=source)
    md = format_markdown(report)
    print(md, end="")
    print(f"report in {out / 'eval.json'} and {out / 'eval.md'}; per-pair verdicts in {out / 'pairs.jsonl'}")
    if getattr(args, "json", None):
        _write_json(Path(args.json), report)
    if getattr(args, "markdown", None):
        _io.atomic_write_text(args.markdown, md, owner="xlard eval --markdown")
    return 0


@_io.holds_folder("args.out", "--out")
def run_generate_cli(args, decide=None, start=None, finish=None) -> int:
    """``xlard generate --backbone shapes --correct "..."``: corrected images, the base images and LAM overlays.

    Image ``i`` is seeded ``--seed + i`` (as without a corrector); it writes
    ``<i>_seed<s>.png`` (corrected), ``<i>_seed<s>_base.png`` (same seed, no
    correction), ``<i>_seed<s>_lam.png`` (the LAM over the corrected image) and one line per image
    in ``corrections.jsonl`` (image, prompt, seed, what the corrector's rules did:
    :meth:`xlard.models.ResidualCorrector.actions`), printed unless ``--quiet``.

    The command line passes its output-folder rule: ``decide(settings) -> resuming`` (refuse,
    ``--overwrite`` or ``--resume`` an earlier run with the same settings, the corrector's weights
    included; called once the corrector is loaded, before the backbone), ``start()`` (clear for
    ``--overwrite``, write the run's manifest; after every check) and ``finish()`` (mark it
    complete). Resuming keeps every image whose three files and ``corrections.jsonl`` line exist
    and makes the rest.
    """
    out = Path(args.out)
    _io.check_output_path(out / GENERATE_ACTIONS_NAME, owner="--out")  # before any work: a folder there is refused
    corrector, meta, source = _corrector_from_args(args)
    resuming = bool(decide({"corrector_sha256": _corrector_digest(corrector), "alpha": meta.alpha,
                            "correction_step": meta.correction_step})) if decide is not None else False
    backbone = _backbone_from_args(args, corrector, meta)
    prompts = [p for p in args.prompt for _ in range(args.per_prompt)]
    seeds = [args.seed + i for i in range(len(prompts))]
    stems = [f"{i:04d}_seed{seeds[i]}" for i in range(len(prompts))]
    backbone.check_prompts(args.prompt, lambda i: f"PROMPT: prompt {i + 1} of {len(args.prompt)}")
    if start is not None:
        start()
    out.mkdir(parents=True, exist_ok=True)
    lines: dict[int, str] = {}
    if resuming:  # an image counts as made when its three files and its corrections.jsonl line exist
        by_name = {f"{stem}.png": i for i, stem in enumerate(stems)}
        for row in _read_action_lines(out / GENERATE_ACTIONS_NAME):
            i = by_name.get(row.get("image"))
            if i is not None and all((out / f"{stems[i]}{end}.png").is_file() for end in ("", "_base", "_lam")):
                lines[i] = json.dumps(row)
        print(f"resuming: reusing {len(lines)} of {len(prompts)} images in {out}", file=sys.stderr)
    todo = [i for i in range(len(prompts)) if i not in lines]
    starts = list(range(0, len(todo), args.batch))
    if not args.quiet:
        try:
            from tqdm import tqdm

            starts = tqdm(starts, desc="generate base+corrected", unit="batch")
        except ImportError:
            pass
    written, report = 0, []
    actions_path = out / GENERATE_ACTIONS_NAME
    # The reused lines (a torn or stale one dropped) written once, then each batch's lines appended and synced; an
    # interrupted run keeps the lines of the images it wrote. (Rewritten whole after every batch, the file cost
    # grew with the square of the image count.) Sorted by image once at the end.
    _io.atomic_write_text(actions_path, "".join(lines[i] + "\n" for i in sorted(lines)), owner="xlard generate")
    log = open(actions_path, "a", encoding="utf-8")
    try:
        for begin in starts:
            written += _generate_batch(backbone, corrector, meta, out, todo[begin:begin + args.batch], prompts, seeds,
                                       stems, lines, report, log)
    finally:
        log.close()
    _io.atomic_write_text(actions_path, "".join(lines[i] + "\n" for i in sorted(lines)), owner="xlard generate")
    if finish is not None:
        finish()
    if not args.quiet:
        print("\n".join(report))
    reused = len(prompts) - written
    print(f"wrote {written} corrected images (with _base and _lam companions) to {out}"
          + (f" ({reused} reused)" if resuming else "") + f"; corrector {source} "
          f"(correction_step {meta.correction_step}, alpha {meta.alpha})")
    return 0


def _generate_batch(backbone, corrector, meta, out: Path, rows: list[int], prompts, seeds, stems,
                    lines: dict[int, str], report: list[str], log) -> int:
    """One batch of ``generate --correct``: its images written, its ``corrections.jsonl`` lines appended to
    ``log`` and synced; returns how many images it wrote."""
    import torch

    from xlard import ops
    from xlard.explain import overlay, save_png

    state = backbone.encode([prompts[i] for i in rows], seed=[seeds[i] for i in rows])
    with torch.no_grad():
        delta, actions = corrector.actions(state.z0, **corrector_inputs(corrector, state.prompt_embedding,
                                                                        state.specs))
        zc, lam = ops.residual_correction(state.z0, delta, float(meta.alpha))
        lam, actions = applied_change(lam, actions, float(meta.alpha))
        base = backbone.decode(state).images.float().clamp(0, 1).cpu()
        corrected = backbone.decode(state, zc).images.float().clamp(0, 1).cpu()
    for k, i in enumerate(rows):
        save_png(out / f"{stems[i]}.png", corrected[k])
        save_png(out / f"{stems[i]}_base.png", base[k])
        save_png(out / f"{stems[i]}_lam.png", overlay(corrected[k], lam[k].float().cpu()))
        lines[i] = json.dumps({"image": f"{stems[i]}.png", "prompt": prompts[i], "seed": seeds[i],
                               "actions": actions[k]})
        report.append(f"{stems[i]}.png: {'; '.join(actions[k]) or 'residual only'}")
    log.writelines(lines[i] + "\n" for i in rows)  # after the images: a line means its three files exist
    log.flush()
    os.fsync(log.fileno())
    return len(rows)


def _read_action_lines(path: Path) -> list[dict]:
    """The complete JSON lines of a ``corrections.jsonl`` (a line cut by an interruption, or damaged, is skipped:
    its image is made again; so is a row whose ``image`` is no file name)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("image"), str):
            rows.append(row)
    return rows
