"""The shapes world's tiny text-to-image backbone: load the shipped pipeline and generate.

The weights live in package data (``xlard/data/shapes_backbone/``), written by
``scripts/train_shapes_backbone.py`` with ``save_pretrained``: a genuine
diffusers ``StableDiffusionPipeline`` (a CLIP byte-level BPE tokenizer trained
on the world's prompts, 374 tokens, in which every word of the world is one
token and other words are spelled in pieces; a small ``CLIPTextModel``; an
``AutoencoderKL`` with downsampling x4; a ``UNet2DConditionModel`` with
cross-attention on 16x16x8 latents; a DPM-Solver scheduler) that makes 64x64
images of the world. It loads offline and runs on a CPU; any adapter that
serves Stable Diffusion serves it.

Imports diffusers lazily, so ``import xlard.shapes`` stays light.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from xlard._optional import require

#: Where the shipped weights live (package data).
DEFAULT_PATH = Path(__file__).resolve().parents[1] / "data" / "shapes_backbone"

#: Sampling defaults the shipped weights were evaluated with.
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0

TRAIN_COMMAND = ("python scripts/train_shapes_backbone.py --minutes 83 --vae-minutes 25 "
                 "--out xlard/data/shapes_backbone")


def backbone_path(path: str | os.PathLike | None = None) -> Path:
    """The folder of the pipeline: ``path``, else ``$XLARD_SHAPES_BACKBONE``, else the package data."""
    if path is None:
        path = os.environ.get("XLARD_SHAPES_BACKBONE") or DEFAULT_PATH
    if not isinstance(path, (str, os.PathLike)):  # 3 failed inside pathlib
        raise TypeError(f"the shapes backbone's path must be a pipeline folder (str or path) or None, got "
                        f"{type(path).__name__}")
    return Path(path)


def not_installed(path: str | os.PathLike | None = None) -> str:
    """Why the shapes backbone cannot load from ``path`` (default: :func:`backbone_path`) and how to get it: the
    one message every loader raises (it names ``$XLARD_SHAPES_BACKBONE`` when that chose the folder)."""
    where = " ($XLARD_SHAPES_BACKBONE)" if path is None and os.environ.get("XLARD_SHAPES_BACKBONE") else ""
    return (f"the shapes backbone is not installed at {backbone_path(path)}{where} (or is incomplete: "
            f"model_index.json, unet/, vae/ and text_encoder/ weights and tokenizer/ expected); train it with "
            f"`{TRAIN_COMMAND}` or reinstall xlard")


def is_available(path: str | os.PathLike | None = None) -> bool:
    """True when the pipeline's ``model_index.json``, its UNet, VAE and text encoder weights and its tokenizer are
    present (a folder without its tokenizer loaded and failed mid-run with an OverflowError)."""
    folder = backbone_path(path)
    return ((folder / "model_index.json").is_file()
            and all(any((folder / part).glob("*.safetensors")) for part in ("unet", "vae", "text_encoder"))
            and (folder / "tokenizer").is_dir() and any((folder / "tokenizer").iterdir()))


#: The whole-word tokens of each tokenizer file read, by (path, mtime_ns, size): a file copied in or retrained
#: later is read again, and a folder without a readable one is looked at again on the next call.
_VOCABULARIES: dict[tuple[str, int, int], frozenset[str]] = {}


def unknown_words(prompt: str, path: str | os.PathLike | None = None) -> list[str]:
    """The words of ``prompt`` that the backbone's tokenizer has no whole-word token for: words it never saw
    in training (its prompts use the shapes world's words only), which it can only spell out letter by letter.

    Args:
        prompt: a prompt.
        path: the pipeline folder (default: :func:`backbone_path`).

    Returns:
        The unknown words, lower case, in order, each once ([] when the folder has no readable
        ``tokenizer/tokenizer.json``: nothing to tell). The file's vocabulary is kept by its path, modification
        time and size, so a tokenizer installed or retrained later is read on the next call.

    Example:
        >>> unknown_words("a photo of two red dragons")                      # doctest: +SKIP
        ['dragons']
    """
    if not isinstance(prompt, str):  # was "'NoneType' object has no attribute 'lower'"
        raise ValueError(f"unknown_words: prompt must be a string, got {type(prompt).__name__}")
    known = _vocabulary(backbone_path(path) / "tokenizer" / "tokenizer.json")
    if not known:
        return []
    # words of any script ("café", "一只红色的圆") and runs of non-ASCII symbols (emoji); ASCII punctuation is
    # no word. [a-z0-9]+ cut "café" to "caf" and missed other scripts entirely.
    words = re.findall(r"[^\W_]+|[^\x00-\x7f\s\w]+", prompt.lower())
    return list(dict.fromkeys(w for w in words if w not in known))


def _vocabulary(file: Path) -> frozenset[str]:
    """The whole words (tokens ending in ``</w>``) of a tokenizer.json, cached by the file's path, mtime and size;
    empty when the file is missing or unreadable (then not cached: "no tokenizer" was kept for good, and a
    tokenizer copied in later was never read)."""
    try:
        stat = file.resolve().stat()
    except (OSError, RuntimeError):  # missing, or a symlink loop
        return frozenset()
    key = (str(file.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _VOCABULARIES:
        try:
            vocab = json.loads(file.read_text(encoding="utf-8"))["model"]["vocab"]
            words = frozenset(token[:-4] for token in vocab if token.endswith("</w>"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):  # (AttributeError: a vocab of non-strings)
            return frozenset()
        for old in [k for k in _VOCABULARIES if k[0] == key[0]]:  # an earlier version of this file
            del _VOCABULARIES[old]
        _VOCABULARIES[key] = words
    return _VOCABULARIES[key]


def load_pipeline(device: Any = "cpu", path: str | os.PathLike | None = None, dtype: Any = None):
    """Load the shapes backbone as a ``StableDiffusionPipeline``, offline.

    Args:
        device: where to put it (``"cpu"``, ``"cuda"``, a ``torch.device``).
        path: a folder written by ``save_pretrained`` (default: the package data,
            or ``$XLARD_SHAPES_BACKBONE`` when set).
        dtype: torch dtype to run in (default float32: the weights ship as
            float16 to stay small, and float16 is slow on CPUs).

    Returns:
        The pipeline, with its progress bar disabled; 64x64 images by default.

    Raises:
        FileNotFoundError: the weights are absent (the message names the
            command that trains them).
        ValueError: a ``dtype`` that is not a floating torch dtype, or a ``device`` this machine lacks
            (both checked before loading).

    Example:
        >>> pipe = load_pipeline()                                     # doctest: +SKIP
        >>> pipe("a photo of three red circles", num_inference_steps=20).images[0].size   # doctest: +SKIP
        (64, 64)
    """
    import torch

    StableDiffusionPipeline = require("diffusers", "xlard.shapes.backbone.load_pipeline").StableDiffusionPipeline

    from xlard._args import as_device

    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"load_pipeline: dtype must be a floating torch.dtype (e.g. torch.float16) or None, "
                         f"got {dtype!r}")
    device = as_device(device, "load_pipeline") or torch.device("cpu")  # before the load, not after it
    folder = backbone_path(path)
    if not is_available(folder):
        raise FileNotFoundError(not_installed(path))
    from xlard.backbones.diffusers_backbone import diffusers_load_kwargs

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), **diffusers_load_kwargs(dtype or torch.float32),
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def sampler_defaults(steps: int | None, guidance: float | None) -> tuple[int, float]:
    """``(steps, guidance)`` with this backbone's defaults (:data:`DEFAULT_STEPS`, :data:`DEFAULT_GUIDANCE`, the
    settings the shipped model was evaluated with) where they are None (steps: or 0)."""
    return steps or DEFAULT_STEPS, DEFAULT_GUIDANCE if guidance is None else guidance


def _check_lengths(pipe, prompts: list[str]) -> None:
    """The text encoder reads ``model_max_length`` tokens: the pipeline cut longer prompts, with a log line only."""
    tokenizer = getattr(pipe, "tokenizer", None)
    limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer is None or not isinstance(limit, int) or limit > 100_000:
        return
    for i, prompt in enumerate(prompts):
        n = len(tokenizer(prompt, truncation=False, verbose=False).input_ids)
        if n > limit:
            raise ValueError(f"generate: prompts[{i}] is {n} tokens long (start and end tokens included); the "
                             f"backbone's text encoder reads {limit}, and the rest would be cut off: "
                             f"{prompt[:60]!r}{'...' if len(prompt) > 60 else ''}")


def generate(prompts: str | Sequence[str], seed: int = 0, steps: int = DEFAULT_STEPS,
             guidance: float = DEFAULT_GUIDANCE, *, pipeline=None, batch_size: int = 32,
             progress: bool = False) -> np.ndarray:
    """Generate one 64x64 image per prompt.

    Image ``i`` uses its own ``torch.Generator`` seeded ``seed + i``, so its noise
    depends only on its prompt and that seed, not on the batching (the networks'
    matrix products may round differently per batch size: a pixel now and then one
    uint8 level apart).

    Args:
        prompts: a prompt or a list of prompts.
        seed: base seed (non-negative int).
        steps: denoising steps (>= 1).
        guidance: classifier-free guidance scale (1 disables guidance).
        pipeline: a loaded pipeline (default: :func:`load_pipeline` on the CPU).
        batch_size: prompts per pipeline call.
        progress: show a tqdm bar over batches.

    Returns:
        ``uint8 [N, 64, 64, 3]`` RGB images.

    Raises:
        ValueError: no prompts, a seed out of range (negative, or seed + N - 1 past 2**64 - 1), a step count
            outside [1, 10000], a guidance that is not a finite number in [0, 1000], or a bad batch size.

    Example:
        >>> generate(["a photo of a red circle"], seed=0, steps=20).shape   # doctest: +SKIP
        (1, 64, 64, 3)
    """
    import torch

    if isinstance(prompts, str):
        prompts = [prompts]
    if prompts is None or not isinstance(prompts, Sequence):
        raise ValueError(f"generate: prompts must be a prompt or a list of prompts, got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    for i, prompt in enumerate(prompts):  # else the tokenizer's own words, after the pipeline had loaded
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"generate: prompts[{i}] must be a non-empty string, got {prompt!r}")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"generate: prompts[{i}] is not valid Unicode text (a lone surrogate): "
                             f"{prompt.encode('utf-8', 'backslashreplace').decode()!r}") from None
    from xlard._args import is_finite_real
    from xlard.backbones.diffusers_backbone import MAX_GUIDANCE, MAX_STEPS

    import numbers

    # numbers.Integral: a numpy int too, as encode takes; compared as a Python int (np.uint64 arithmetic wraps)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or int(seed) < 0 \
            or int(seed) + len(prompts) - 1 > 2**64 - 1:
        raise ValueError(f"seed must be a non-negative int with seed + {len(prompts) - 1} (one seed per prompt) "
                         f"at most 2**64 - 1, got {seed!r}")
    seed = int(seed)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be an int in [1, {MAX_STEPS}], got {steps!r}")
    if not is_finite_real(guidance) or not 0 <= guidance <= MAX_GUIDANCE:
        # NaN turned guidance off without a word, inf gave black images
        raise ValueError(f"guidance must be a finite number in [0, {MAX_GUIDANCE:g}], got {guidance!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(progress, bool):  # 'no' is truthy: a bar was shown when asked not to
        raise ValueError(f"generate: progress must be a bool, got {progress!r}")
    if pipeline is not None and not (callable(pipeline) and hasattr(pipeline, "device")):
        raise ValueError(f"generate: pipeline must be a loaded diffusers pipeline (load_pipeline()), got "
                         f"{type(pipeline).__name__}")
    pipe = pipeline if pipeline is not None else load_pipeline()
    _check_lengths(pipe, prompts)
    device = pipe.device
    starts = range(0, len(prompts), batch_size)
    if progress:
        tqdm = require("tqdm", "xlard.shapes.backbone.generate(progress=True)").tqdm
        starts = tqdm(starts, desc="generate", unit="batch")
    out = []
    for start in starts:
        chunk = prompts[start:start + batch_size]
        gens = [torch.Generator(device="cpu").manual_seed(seed + start + j) for j in range(len(chunk))]
        with torch.no_grad():
            images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                          output_type="np").images
        out.append(np.round(np.asarray(images) * 255.0).clip(0, 255).astype(np.uint8))
    del device
    return np.concatenate(out)


__all__ = ["DEFAULT_PATH", "DEFAULT_STEPS", "DEFAULT_GUIDANCE", "backbone_path", "is_available", "load_pipeline",
           "generate", "sampler_defaults"]
