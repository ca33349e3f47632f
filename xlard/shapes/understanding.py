"""The shapes world's dense understanding model: the CMD's eyes on ``--backbone shapes``.

A small fully convolutional U-Net reads a decoded image (64x64 by default)
and, at every pixel, predicts two distributions over the world's vocabulary:

- **shape** over ``("none",) + shapes``: a pixel is labelled with an object's
  shape only in the object's *core* (its mask eroded by ``core_radius``
  pixels), so that objects two pixels apart stay apart once the map is
  thresholded and the cores' centroids are the objects' centroids;
- **color** over ``("background",) + colors``: every pixel of an object gets
  the object's color.

:class:`xlard.sources.ShapesSource` turns them into the reward's inputs: the
map of a noun is its shape probability (counted by ``xlard.ops`` components,
centroids weighted by it) and each pixel's color distribution is a patch
feature whose cosine with a color's one-hot embedding is the color score.

It is trained from scratch on rendered scenes and the renderer's ground truth
(masks, shapes, colors) by ``scripts/train_shapes_understanding.py``; never
on the exact evaluator's code or outputs (this module does not import
:mod:`xlard.shapes.evaluator`, and a test checks it). Weights ship as package
data (``xlard/data/shapes_understanding/``: ``config.json`` and
``model.safetensors``) and load offline.

Example:
    >>> import torch
    >>> from xlard.shapes.understanding import load_model
    >>> model = load_model()                                   # the shipped weights
    >>> images = torch.rand(2, 3, 64, 64)                      # images [B, 3, H, W] in [0, 1]
    >>> out = model.predict(images)
    >>> out.shape_probs.shape, out.color_probs.shape           # [B, 4 shapes, 64, 64], [B, 1 + 10 colors, 64, 64]
    (torch.Size([2, 4, 64, 64]), torch.Size([2, 11, 64, 64]))
"""
from __future__ import annotations

import math
import numbers
import os
import threading
import weakref
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .world import PALETTE, SHAPES, Scene

__all__ = ["UnderstandingConfig", "UnderstandingOutput", "ShapesUnderstanding", "scene_targets", "DEFAULT_PATH",
           "TRAIN_COMMAND", "model_path", "is_available", "load_model", "CountEyes"]

#: Where the shipped weights live (package data).
DEFAULT_PATH = Path(__file__).resolve().parents[1] / "data" / "shapes_understanding"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TRAIN_COMMAND = "python scripts/train_shapes_understanding.py --out xlard/data/shapes_understanding"


@dataclass(frozen=True)
class UnderstandingConfig:
    """Architecture and vocabulary of a :class:`ShapesUnderstanding`.

    Attributes:
        shapes: the nouns the shape head knows (class 0 is "none").
        colors: the color words the color head knows (class 0 is background).
        channels: widths of the four levels (full-resolution stem, 1/2, 1/4, 1/8).
        image_size: images are resized to this square before the forward pass;
            the maps come out at this size.
        core_radius: the shape targets are the object masks eroded this many
            pixels (8-neighbourhood), so that near objects stay apart.
    """

    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(PALETTE)
    channels: tuple[int, ...] = (8, 24, 32, 48)
    image_size: int = 64
    core_radius: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes", _words("UnderstandingConfig", "shapes", self.shapes))
        object.__setattr__(self, "colors", _words("UnderstandingConfig", "colors", self.colors))
        channels = self.channels
        # integral widths only: int() made (8.9, ...) a model of width 8 without a word
        if isinstance(channels, (str, bytes)) or not isinstance(channels, Iterable) or not all(
                isinstance(c, numbers.Integral) and not isinstance(c, (bool, np.bool_)) for c in channels):
            raise ValueError(f"UnderstandingConfig.channels must be 4 positive integer widths, got {channels!r}")
        object.__setattr__(self, "channels", tuple(int(c) for c in channels))
        if len(self.channels) != 4 or min(self.channels) < 1:
            raise ValueError(f"UnderstandingConfig.channels must be 4 positive widths, got {self.channels!r}")
        if not isinstance(self.image_size, int) or self.image_size < 32 or self.image_size % 8:
            raise ValueError(f"UnderstandingConfig.image_size must be a multiple of 8 >= 32, got {self.image_size!r}")
        if isinstance(self.core_radius, bool) or not isinstance(self.core_radius, int) or self.core_radius < 0:
            raise ValueError(f"UnderstandingConfig.core_radius must be an int >= 0, got {self.core_radius!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UnderstandingConfig:
        return _config_from_dict(cls, d)


def _words(owner: str, name: str, words: Any) -> tuple[str, ...]:
    """``words`` as a tuple of distinct non-empty strings (a model config's vocabulary): one string was split into
    its letters (shapes="square" made a model of the shapes 's', 'q', ...)."""
    if isinstance(words, (str, bytes)) or not isinstance(words, Iterable):
        raise ValueError(f"{owner}.{name} must be a list of distinct non-empty words, got {type(words).__name__} "
                         f"{words!r:.60}")
    words = tuple(words)
    if not words or len(set(words)) != len(words) or not all(isinstance(w, str) and w for w in words):
        raise ValueError(f"{owner}.{name} must be distinct non-empty words, got {words!r}")
    return words


def _config_from_dict(cls, d: Any):
    """``cls(**d)`` for a model config dataclass read from a ``config.json``: every key must be one of its fields
    (a misspelt key was dropped without a word)."""
    names = [f.name for f in fields(cls)]
    if not isinstance(d, Mapping):
        raise TypeError(f"{cls.__name__}.from_dict: expected a mapping of settings, got {type(d).__name__}")
    unknown = sorted(set(d) - set(names), key=str)
    if unknown:
        raise ValueError(f"{cls.__name__}.from_dict: unknown settings {unknown}; known: {', '.join(names)}")
    return cls(**dict(d))


@dataclass
class UnderstandingOutput:
    """Per-pixel predictions of a batch.

    Attributes:
        shape_probs (float32 [B, S, H, W]): probability that a pixel is the core
            of an object of ``config.shapes[s]`` (the "none" class dropped).
        color_probs (float32 [B, 1 + C, H, W]): color distribution per pixel,
            background first, then ``config.colors``.
    """

    shape_probs: torch.Tensor
    color_probs: torch.Tensor


def _conv(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ShapesUnderstanding(nn.Module):
    """A small U-Net: most work at 1/2 to 1/8 resolution, both heads at full resolution.

    A 3x3 stem keeps full-resolution detail (edges, colors) for a 1x1 fusion
    with the upsampled decoder, so the expensive convolutions never run on the
    full grid (the model has to train in minutes on two CPU cores).

    Args:
        config: an :class:`UnderstandingConfig`.

    Example:
        >>> import torch
        >>> from xlard.shapes.understanding import ShapesUnderstanding, UnderstandingConfig
        >>> model = ShapesUnderstanding(UnderstandingConfig(channels=(4, 4, 4, 4)))
        >>> shape_logits, color_logits = model(torch.rand(2, 3, 64, 64))
        >>> tuple(shape_logits.shape), tuple(color_logits.shape)
        ((2, 5, 64, 64), (2, 11, 64, 64))
    """

    def __init__(self, config: UnderstandingConfig | None = None) -> None:
        super().__init__()
        self.config = config or UnderstandingConfig()
        c0, c1, c2, c3 = self.config.channels
        self.stem = _conv(3, c0)
        self.enc1 = nn.Sequential(_conv(c0, c1, stride=2), _conv(c1, c1))
        self.enc2 = nn.Sequential(_conv(c1, c2, stride=2), _conv(c2, c2))
        self.enc3 = nn.Sequential(_conv(c2, c3, stride=2), _conv(c3, c3))
        self.dec2 = _conv(c3 + c2, c2)
        self.dec1 = _conv(c2 + c1, c1)
        self.fuse = _conv(c1 + c0, 2 * c0, kernel=1)
        self.shape_head = nn.Conv2d(2 * c0, 1 + len(self.config.shapes), 1)
        self.color_head = nn.Conv2d(2 * c0, 1 + len(self.config.colors), 1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(shape [B, 1 + S, H, W], color [B, 1 + C, H, W])`` of images in [0, 1] at ``image_size``."""
        e0 = self.stem(images * 2.0 - 1.0)
        e1 = self.enc1(e0)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        up = lambda t, ref: F.interpolate(t, size=ref.shape[-2:], mode="nearest")  # noqa: E731
        d2 = self.dec2(torch.cat((up(e3, e2), e2), 1))
        d1 = self.dec1(torch.cat((up(d2, e1), e1), 1))
        d0 = F.interpolate(d1, size=e0.shape[-2:], mode="bilinear", align_corners=False)
        d0 = self.fuse(torch.cat((d0, e0), 1))
        return self.shape_head(d0), self.color_head(d0)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> UnderstandingOutput:
        """Per-pixel shape-core and color probabilities of a batch.

        Args:
            images (Tensor[B, 3, H, W]): float in [0, 1], any size (resized,
                bilinear and antialiased, to ``config.image_size``).

        Returns:
            An :class:`UnderstandingOutput` at ``config.image_size``.

        Raises:
            ValueError: images not a float ``[B, 3, H, W]`` tensor.
        """
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 \
                or not images.is_floating_point():
            from xlard.color_features import _described

            eight_bit = isinstance(images, torch.Tensor) and images.dtype == torch.uint8
            hint = " (8-bit images: images.float() / 255)" if eight_bit else ""
            raise ValueError(f"ShapesUnderstanding.predict: images must be a float tensor [B, 3, H, W] in [0, 1], "
                             f"got {_described(images)}{hint}")
        if images.shape[2] == 0 or images.shape[3] == 0:  # was F.interpolate's "sizes should be greater than 0"
            raise ValueError(f"ShapesUnderstanding.predict: images are empty ({images.shape[2]} x "
                             f"{images.shape[3]} pixels)")
        if images.numel():
            lo, hi = (float(v) for v in torch.aminmax(images))
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -0.05 or hi > 1.05:
                # NaN gave NaN maps; 0..255 values were clamped to white and read without a word
                raise ValueError(f"ShapesUnderstanding.predict: images must be finite values in [0, 1], got "
                                 f"[{lo:.3g}, {hi:.3g}]" + (" (0..255? divide by 255)" if hi > 1.05 and lo >= 0
                                                           else ""))
        x = images.to(device=self.device, dtype=next(self.parameters()).dtype)
        size = self.config.image_size
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        shape_logits, color_logits = _eval_pass(self, x.clamp(0.0, 1.0))
        return UnderstandingOutput(shape_logits.float().softmax(1)[:, 1:], color_logits.float().softmax(1))

    def save_pretrained(self, folder: str | os.PathLike, *, dtype: torch.dtype = torch.float16,
                        extra: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (``dtype``, default float16 to stay small)."""
        from xlard import _io

        owner = "ShapesUnderstanding.save_pretrained"
        folder = _io.make_folder(folder, owner)
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()}
        _io.atomic_save_safetensors(folder / WEIGHTS_NAME, state, owner=owner)
        config = {"model": self.config.to_dict(), **(extra or {})}
        _io.atomic_write_json(folder / CONFIG_NAME, config, owner=owner, indent=1)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike | None = None, device: Any = "cpu") -> ShapesUnderstanding:
        """Load a folder written by :meth:`save_pretrained` (default: the package data), in float32, eval mode.

        Raises:
            FileNotFoundError: the folder lacks the files (the message names the training command).
            ValueError: the files cannot be read, or do not belong together (a damaged install or copy).
        """
        from xlard import _io
        from xlard._args import as_device

        device = as_device(device, "ShapesUnderstanding.from_pretrained")
        given = folder
        folder = model_path(folder)
        if not is_available(folder):
            where = " ($XLARD_SHAPES_UNDERSTANDING)" if given is None and os.environ.get(
                "XLARD_SHAPES_UNDERSTANDING") else ""
            raise FileNotFoundError(f"no shapes understanding model at {folder}{where} ({CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME} expected); train it with: {TRAIN_COMMAND}")
        owner, fix = "ShapesUnderstanding.from_pretrained", f"reinstall xlard or retrain it with: {TRAIN_COMMAND}"
        saved = _io.read_json(folder / CONFIG_NAME, owner=owner, what="a model config")
        try:
            config = UnderstandingConfig.from_dict(saved["model"])
            with torch.random.fork_rng(devices=[]):  # its random initialisation is overwritten: the caller's RNG
                model = cls(config)                  # stays as it was
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{owner}: {folder / CONFIG_NAME} is not a shapes understanding model's config "
                             f"({type(e).__name__}: {e}); {fix}") from None
        _load_weights(model, folder / WEIGHTS_NAME, folder / CONFIG_NAME, owner, fix)
        return model.to(device).eval()


def _load_weights(model: nn.Module, weights: Path, config: Path, owner: str, fix: str) -> None:
    """Load a safetensors file into ``model`` (as float32), naming the file and ``fix`` when it is unreadable or
    does not fit the model ``config`` describes (shared by the shapes world's shipped models).

    Raises:
        ValueError: the file cannot be read, or its tensors do not fit ``model``.
    """
    from safetensors.torch import load_file

    try:
        state = {k: v.float() for k, v in load_file(str(weights)).items()}
    except Exception as e:  # safetensors' own error type for a corrupt header or cut data
        raise ValueError(f"{owner}: {weights} is not a readable safetensors file ({e}); {fix}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        first = lines[min(1, len(lines) - 1)][:200]  # the line after torch's "Error(s) in loading ..." header
        raise ValueError(f"{owner}: {weights} does not fit the model {config} describes ({first}); {fix}") from None


class _ModeLock:
    """One model's eval passes: passes of a model in eval mode share it (they run side by side); a pass that
    puts the model's training submodules in eval mode holds it alone, so no other thread runs a pass while the
    modes are toggled, nor reads the toggled modes as the model's own."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._sharing = 0
        self._alone = False
        self.holder: int | None = None  # the thread holding it alone (its own nested passes go straight through)

    def share(self) -> None:
        with self._changed:
            while self._alone:
                self._changed.wait()
            self._sharing += 1

    def unshare(self) -> None:
        with self._changed:
            self._sharing -= 1
            self._changed.notify_all()

    def hold(self) -> None:
        with self._changed:
            while self._alone or self._sharing:
                self._changed.wait()
            self._alone = True
            self.holder = threading.get_ident()

    def release(self) -> None:
        with self._changed:
            self._alone = False
            self.holder = None
            self._changed.notify_all()


_MODE_LOCKS: weakref.WeakKeyDictionary[nn.Module, _ModeLock] = weakref.WeakKeyDictionary()
_MODE_LOCKS_GUARD = threading.Lock()


def _mode_lock(model: nn.Module) -> _ModeLock:
    with _MODE_LOCKS_GUARD:
        lock = _MODE_LOCKS.get(model)
        if lock is None:
            lock = _MODE_LOCKS[model] = _ModeLock()
        return lock


def _eval_pass(model: nn.Module, *inputs):
    """``model(*inputs)`` with every submodule in eval mode, then each back to its own mode, also when the pass
    raises (a model put back with train(was_training) lost a submodule's own mode, and an interrupt left it in
    eval); nothing is toggled when no submodule is in training mode.

    Thread-safe: passes from several threads on one model in training mode (a source scoring from threads) ran
    while another pass had set the modes back, in training mode, and moved the BatchNorm running statistics.
    A model in eval mode runs its passes side by side; one with a submodule in training mode one at a time."""
    lock = _mode_lock(model)
    if lock.holder == threading.get_ident():  # a pass inside this thread's own pass (a forward hook predicting
        return model(*inputs)                 # again): the modes are set already; waiting on itself hung for good
    lock.share()
    try:  # while shared, no pass toggles the modes: eval mode seen here is the model's own
        if not any(module.training for module in model.modules()):
            return model(*inputs)
    finally:
        lock.unshare()
    lock.hold()
    try:
        training = [module for module in model.modules() if module.training]
        for module in training:
            module.training = False
        try:
            return model(*inputs)
        finally:
            for module in training:
                module.training = True
    finally:
        lock.release()


def _weights_folder(path: str | os.PathLike | None, env_var: str, default: Path) -> Path:
    """``path``, else the folder ``$env_var`` names, else ``default`` (the package data)."""
    if path is not None and not isinstance(path, (str, os.PathLike)):  # 3 failed inside pathlib
        raise TypeError(f"a weights folder must be a str or path (or None for the shipped one), got "
                        f"{type(path).__name__}")
    return Path(path if path is not None else (os.environ.get(env_var) or default))


def _has_weights(folder: Path) -> bool:
    """True when ``folder`` holds ``config.json`` and ``model.safetensors``."""
    return (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


def model_path(path: str | os.PathLike | None = None) -> Path:
    """The weights folder: ``path``, else ``$XLARD_SHAPES_UNDERSTANDING``, else the package data."""
    return _weights_folder(path, "XLARD_SHAPES_UNDERSTANDING", DEFAULT_PATH)


def is_available(path: str | os.PathLike | None = None) -> bool:
    """True when the folder holds ``config.json`` and ``model.safetensors``."""
    return _has_weights(model_path(path))


_LOADED: dict[tuple[str, str], ShapesUnderstanding] = {}


def load_model(path: str | os.PathLike | None = None, device: Any = "cpu") -> ShapesUnderstanding:
    """:meth:`ShapesUnderstanding.from_pretrained`, cached per (folder, device) (the weights are read once).

    Every call returns the same instance: ``copy.deepcopy`` it before changing it (its dtype, its weights);
    :class:`xlard.sources.ShapesSource` and :class:`CountEyes` hold their own copies.
    """
    from xlard._args import as_device

    device = as_device(device, "load_model") or torch.device("cpu")  # was torch's "Expected one of cpu, cuda, ..."
    key = (str(model_path(path).resolve()), str(device))
    if key not in _LOADED:
        _LOADED[key] = ShapesUnderstanding.from_pretrained(path, device)
    return _LOADED[key]


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by ``radius`` pixels in the 8-neighbourhood (outside the image counts as empty)."""
    out = mask.copy()
    for _ in range(radius):
        padded = np.pad(out, 1)
        h, w = out.shape
        nxt = np.ones_like(out)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                nxt &= padded[dy:dy + h, dx:dx + w]
        out = nxt
    return out


def scene_targets(scene: Scene, config: UnderstandingConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The training targets of a rendered scene, from the renderer's ground truth alone.

    Args:
        scene: a :class:`xlard.shapes.world.Scene`.
        config: the vocabulary and ``core_radius`` (default :class:`UnderstandingConfig()`).

    Returns:
        ``(shape int64 [H, W], color int64 [H, W])``: shape class (0 none,
        ``1 + shapes.index(shape)`` on each object's core), color class (0
        background, ``1 + colors.index(color)`` on each object's pixels).

    Example:
        >>> from xlard.shapes.understanding import scene_targets
        >>> from xlard.shapes.world import Scene, SceneObject
        >>> s, c = scene_targets(Scene(16, (SceneObject("square", "red", (2, 2, 8, 8)),)))
        >>> int(s[5, 5]), int(s[2, 2]), int(c[2, 2])
        (2, 0, 1)
    """
    config = config or UnderstandingConfig()
    size = scene.image_size
    shape = np.zeros((size, size), dtype=np.int64)
    color = np.zeros((size, size), dtype=np.int64)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        mask = obj.mask()
        if obj.color in config.colors:
            color[y0:y1, x0:x1][mask] = 1 + config.colors.index(obj.color)
        if obj.shape in config.shapes:
            shape[y0:y1, x0:x1][_erode(mask, config.core_radius)] = 1 + config.shapes.index(obj.shape)
    return shape, color


_VAES: dict[tuple[str, str], Any] = {}
_EYES_MODELS: dict[tuple[str, str], ShapesUnderstanding] = {}


def _latent_scale(vae) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` of a diffusers VAE: ``latent = (vae_latent - shift) * scale``."""
    return float(vae.config.scaling_factor), float(getattr(vae.config, "shift_factor", None) or 0.0)


#: The image size :meth:`CountEyes.edit_counts` redraws at: the shipped understanding model's (the shapes
#: backbone's 64 x 64 images, 16 x 16 latents).
EDIT_IMAGE_SIZE = 64


def _reader_for(z, owner: str, load, reader: str):
    """What reads the latent ``z`` (``load(z.device)``, which has ``config.latent_channels``), once ``z`` is known
    to be a float ``[B, C, h, w]`` tensor with that many channels; else a ValueError naming ``owner`` and
    ``reader``. The count eyes' shared check (decoded and latent)."""
    if not isinstance(z, torch.Tensor) or z.dim() != 4 or not z.is_floating_point():
        from xlard.color_features import _described

        raise ValueError(f"{owner}: z must be a float latent [B, C, h, w], got {_described(z)}")
    loaded = load(z.device)
    if z.shape[1] != loaded.config.latent_channels:
        raise ValueError(f"{owner}: z has {z.shape[1]} channels, {reader} {loaded.config.latent_channels}")
    return loaded


class CountEyes:
    """What a corrector's ``count_move`` counts (and ``count_edit`` edits) with on the shapes world: a latent
    of the shapes backbone, decoded by the backbone's own VAE (as
    :meth:`xlard.backbones.DiffusersBackbone.decode` does at ``correction_step`` 1.0), read by the
    understanding model.

    ``eyes(z) -> (noun_probs [B, len(nouns), 64, 64], foreground [B, 64, 64])``: per-pixel probability of
    each noun's shape core (a noun the model does not know gets zeros) and ``1 - P(background)``.
    :meth:`edit_counts` is what ``count_edit`` edits with: the same decoding and reading, then the
    editor's redraw and count fix, encoded back by the same VAE. The VAE and the model load on first
    use (offline, from the package data or the folders the environment names, as
    :func:`xlard.shapes.backbone.backbone_path` and :func:`model_path` say) and stay cached.

    Args:
        nouns: the noun order of the maps (a corrector's ``reader_nouns``).
        backbone_folder, model_folder: other weights (default: the installed ones).

    Example (the call loads the backbone's VAE through diffusers, a few seconds):
        >>> from xlard.shapes.understanding import CountEyes
        >>> eyes = CountEyes(("circle", "square", "triangle", "diamond"))   # loads nothing yet
        >>> probs, foreground = eyes(z)   # z [B, 8, 16, 16] -> [B, 4, 64, 64], [B, 64, 64]  # doctest: +SKIP
    """

    def __init__(self, nouns, backbone_folder: str | os.PathLike | None = None,
                 model_folder: str | os.PathLike | None = None):
        if not isinstance(nouns, (list, tuple)) or not all(isinstance(n, str) and n for n in nouns):
            raise ValueError(f"CountEyes: nouns must be a list of non-empty words, got {nouns!r}")
        self.nouns = tuple(nouns)
        self.backbone_folder, self.model_folder = backbone_folder, model_folder

    def _vae(self, device: torch.device):
        from xlard._optional import require
        from xlard.backbones.diffusers_backbone import diffusers_load_kwargs
        from xlard.shapes import backbone as shapes_backbone

        folder = shapes_backbone.backbone_path(self.backbone_folder)
        key = (str(folder.resolve()), str(device))
        if key not in _VAES:
            if not shapes_backbone.is_available(folder):
                raise FileNotFoundError(f"CountEyes (its VAE decodes what is counted): "
                                        f"{shapes_backbone.not_installed(self.backbone_folder)}")
            autoencoder = require("diffusers", "xlard.shapes.understanding.CountEyes").AutoencoderKL
            # channels_last: a third faster on the CPU, the same images to float rounding
            _VAES[key] = autoencoder.from_pretrained(str(folder / "vae"), **diffusers_load_kwargs(torch.float32),
                                                     local_files_only=True).to(device).eval().to(
                                                         memory_format=torch.channels_last)
        return _VAES[key]

    def _model(self, device: torch.device) -> ShapesUnderstanding:
        key = (str(model_path(self.model_folder).resolve()), str(device))
        if key not in _EYES_MODELS:  # its own channels_last copy: the cached model stays as the reward uses it
            import copy

            _EYES_MODELS[key] = copy.deepcopy(load_model(self.model_folder, device)).to(
                memory_format=torch.channels_last)
        return _EYES_MODELS[key]

    @torch.no_grad()
    def images(self, z: torch.Tensor) -> torch.Tensor:
        """The decoded images, float ``[B, 3, H, W]`` in [0, 1]."""
        vae = _reader_for(z, "CountEyes", self._vae, "the shapes backbone's VAE")
        if z.numel() and not bool(torch.isfinite(z).all()):  # decoded to NaN images, and "images" were blamed
            raise ValueError("CountEyes: z holds NaN or infinite values")
        scale, shift = _latent_scale(vae)
        latents = (z.float() / scale + shift).contiguous(memory_format=torch.channels_last)
        out = vae.decode(latents, return_dict=False)[0].float()  # float32 under a corrector's autocast too
        return (out / 2 + 0.5).clamp(0.0, 1.0).contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def edit_counts(self, z: torch.Tensor, nouns, counts, colors=None
                    ) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
        """``count_edit``: redraw each latent's image so that it holds ``counts[i]`` clean ``nouns[i]`` shapes.

        The latent is decoded and read by the understanding model; :func:`xlard.shapes.editor.edit_image`
        (``fix_count`` and ``redraw``, nothing else) draws every found object of the noun again as a clean
        shape of it at its place, size and dominant color, paints surplus ones (the least confident) with
        the background and draws missing ones at the emptiest free place; the VAE encodes the edited image.

        Args:
            z (Tensor[B, C, h, w]): final latents of the shapes backbone.
            nouns: one noun per latent (a world shape; any other word leaves its latent alone).
            counts: one asked count per latent (ints >= 1; a list, or an integer tensor).
            colors: optional, one asked color (or None) per latent: the color of objects drawn where none of the
                noun is found to copy one from (they were drawn in the vocabulary's first color, red).

        Returns:
            ``(encoded [B, C, h, w], touched [B, 1, h, w] bool, actions)``: the edited images' encodings, the
            latent cells under every changed pixel grown by one cell (only there does ``encoded`` replace
            ``z``), and what was done per latent.

        Raises:
            ValueError: ``nouns`` or ``counts`` do not give one entry per latent, or a count below 1.
        """
        owner = f"{type(self).__name__}.edit_counts"
        nouns, counts = self._check_counts(owner, z, nouns, counts)
        colors = self._check_colors(owner, colors, len(nouns))
        images = self.images(z)
        model = self._model(z.device)
        size = model.config.image_size
        if tuple(images.shape[-2:]) != (size, size):  # the editor draws at the model's size: refused, naming z
            raise ValueError(f"CountEyes.edit_counts: count_edit redraws {size}x{size} images (the understanding "
                             f"model's size), and z {list(z.shape)} decodes to {images.shape[-2]}x{images.shape[-1]}: "
                             f"generate at {size}x{size}, or use a corrector without count_edit")
        return self._edit_and_encode(owner, z, images, model.predict(images), model.config, nouns, counts,
                                     images.shape[-1] // z.shape[-1], colors)

    @staticmethod
    def _check_colors(owner: str, colors, n: int, known: Sequence[str] = tuple(PALETTE)) -> list:
        """``colors`` as a list of one color word of ``known`` or None per latent (None: no color asked for any);
        a word outside ``known`` ("gren") was dropped without a word."""
        if colors is None:
            return [None] * n
        if isinstance(colors, (str, bytes)) or not isinstance(colors, Iterable):
            raise ValueError(f"{owner}: colors must be None or a list with one color (or None) per latent ({n}), "
                             f"got {type(colors).__name__} {colors!r:.40}")
        colors = list(colors)
        if len(colors) != n or not all(c is None or isinstance(c, str) for c in colors):
            raise ValueError(f"{owner}: colors must give one color word (or None) per latent ({n}), got {colors!r:.80}")
        unknown = sorted({c for c in colors if c is not None and c not in known})
        if unknown:
            raise ValueError(f"{owner}: colors holds {', '.join(map(repr, unknown))}, not a color of the world "
                             f"({', '.join(known)}); give one of those or None")
        return colors

    @staticmethod
    def _check_counts(owner: str, z, nouns, counts) -> tuple[list, list[int]]:
        """``(nouns, counts)`` as lists, one of each per latent of ``z``, the counts whole numbers >= 1 (a count
        "x" raised a bare int() error, 1.7 was read as 1)."""
        if not isinstance(z, torch.Tensor) or z.dim() != 4 or not z.is_floating_point():
            # (a 3-D z was reported as wrong nouns and counts "per latent of z (-1)")
            got = f"{z.dtype} of shape {list(z.shape)}" if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"{owner}: z must be a float latent tensor [B, C, h, w], got {got}")
        b = int(z.shape[0])
        for name, value in (("nouns", nouns), ("counts", counts)):  # None failed as "not iterable", a string
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):  # was read letter by letter
                raise ValueError(f"{owner}: {name} must be a list with one entry per latent of z ({b}), got "
                                 f"{type(value).__name__} {value!r:.40}")
        # 0-d tensors as numbers: list(torch.tensor([2, 1])) holds tensors, which were "not whole numbers"
        nouns = list(nouns)
        counts = [c.item() if isinstance(c, torch.Tensor) and c.dim() == 0 else c for c in counts]
        whole = all(isinstance(c, (int, np.integer)) and not isinstance(c, (bool, np.bool_)) or
                    (isinstance(c, (float, np.floating)) and float(c).is_integer()) for c in counts)
        if len(nouns) != b or len(counts) != b or not whole or any(c < 1 for c in counts):
            raise ValueError(f"{owner}: need one noun and one count >= 1 per latent of z ({b}), counts whole "
                             f"numbers; got nouns {nouns!r} and counts {counts!r}")
        return nouns, [int(c) for c in counts]

    def _edit_and_encode(self, owner: str, z: torch.Tensor, images: torch.Tensor, maps: UnderstandingOutput,
                         vocab, nouns: list, counts: list[int], factor: int, colors: list | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
        """The count edit on ``images`` read as ``maps`` (vocabulary ``vocab.shapes`` / ``vocab.colors``):
        :func:`xlard.shapes.editor.edit_image` per latent (``redraw`` and ``fix_count`` only), the edited
        images encoded by the VAE, and the latent cells under every changed pixel (``factor`` pixels a cell)
        grown by one."""
        from xlard.prompts.spec import Entity, PromptSpec
        from xlard.shapes.editor import EditConfig, edit_image, touched_cells

        if not len(nouns):  # nothing to edit (torch.stack refused the empty lists)
            return z.detach().clone(), torch.zeros(0, 1, *z.shape[-2:], dtype=torch.bool, device=z.device), []
        src = images.detach().float().cpu().numpy()
        shape_probs, color_probs = maps.shape_probs.cpu().numpy(), maps.color_probs.cpu().numpy()
        config = EditConfig(redraw=True, fix_count=True, fix_color=False, fix_position=False)
        edited, changed, actions = [], [], []
        for i, (noun, count) in enumerate(zip(nouns, counts)):
            color = colors[i] if colors is not None and colors[i] in vocab.colors else None
            spec = PromptSpec(prompt=f"{count} {noun}", entities=(Entity(noun, count=count, color=color),))
            image, mask, acts = edit_image(src[i], shape_probs[i], color_probs[i], spec, vocab.shapes, vocab.colors,
                                           config)
            edited.append(torch.from_numpy(image))
            changed.append(torch.from_numpy(mask))
            actions.append(acts)
        vae = self._vae(z.device)
        scale, shift = _latent_scale(vae)
        x = (torch.stack(edited).clamp(0.0, 1.0).to(z.device) * 2 - 1).contiguous(memory_format=torch.channels_last)
        encoded = (vae.encode(x).latent_dist.mode() - shift) * scale
        if encoded.shape != z.shape:  # eyes of another factor than the VAE's: the cells would not line up
            raise ValueError(f"{owner}: the eyes draw at {factor}x the latent and the VAE encodes that to "
                             f"{list(encoded.shape)}, not z's {list(z.shape)}: these eyes do not belong to this "
                             f"backbone")
        touched = touched_cells(torch.stack(changed), factor).to(z.device)
        return encoded.to(z.dtype).contiguous(), touched, actions

    def _read(self, z: torch.Tensor) -> tuple[UnderstandingOutput, Any]:
        """``(maps of z, the model's config)``: here the understanding model on the VAE's decoding."""
        model = self._model(z.device)
        return model.predict(self.images(z)), model.config

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps, vocab = self._read(z)
        known = list(vocab.shapes)
        probs = torch.zeros(maps.shape_probs.shape[0], len(self.nouns), *maps.shape_probs.shape[-2:],
                            device=maps.shape_probs.device)
        for i, noun in enumerate(self.nouns):
            if noun in known:
                probs[:, i] = maps.shape_probs[:, known.index(noun)]
        return probs, 1.0 - maps.color_probs[:, 0]
