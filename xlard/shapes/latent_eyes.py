"""Latent eyes: the understanding model's maps read straight from a shapes-backbone latent, without the VAE decode.

``count_edit`` (:class:`xlard.models.CorrectorConfig`) redraws the counted objects of a latent: by default
(:class:`xlard.shapes.understanding.CountEyes`) it decodes the latent with the backbone's VAE, reads the image
with the understanding model, edits the image and encodes it again. The decode and the reading are two thirds
of that work, and the corrector's whole inference cost is held to 5% of sampling (issue 12). This module
gives the same maps from the latent itself:

- :class:`LatentUnderstanding`: a small convolutional network from a latent ``[B, C, h, w]`` to per-pixel
  shape-core and color distributions at ``factor`` times its size (the shapes backbone: 16 x 16 -> 64 x 64),
  the same outputs as :meth:`xlard.shapes.understanding.ShapesUnderstanding.predict` gives on the decoded
  image. It is distilled from that model (the teacher reads the VAE's decoding of the backbone's own
  latents; ``scripts/train_shapes_latent_eyes.py``), so like the teacher it never sees the exact evaluator's
  code or verdicts (a test checks that this module does not import :mod:`xlard.shapes.evaluator`).
- :func:`flat_canvas`: the image those maps describe, each pixel its most likely palette color or the
  background: what the editor draws on instead of the decoded image.
- :class:`LatentCountEyes`: ``CountEyes``' interface (``eyes(z)`` and ``eyes.edit_counts(z, nouns, counts)``)
  on the latent maps and the flat canvas; only the final encode still runs the VAE. A corrector chooses it
  with ``CorrectorConfig.count_eyes = "latent"`` (the shipped shapes corrector does).

Weights ship as package data (``xlard/data/shapes_latent_eyes/``: ``config.json`` and ``model.safetensors``)
and load offline; ``$XLARD_SHAPES_LATENT_EYES`` names another folder.

Example:
    >>> eyes = LatentCountEyes(("circle", "square", "triangle", "diamond"))      # doctest: +SKIP
    >>> encoded, touched, actions = eyes.edit_counts(z, ["circle"], [3])           # doctest: +SKIP
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .understanding import (CONFIG_NAME, EDIT_IMAGE_SIZE, WEIGHTS_NAME, CountEyes, UnderstandingOutput, _eval_pass,
                            _has_weights, _load_weights, _reader_for, _weights_folder, _config_from_dict, _words)
from .world import BACKGROUND, PALETTE, SHAPES

__all__ = ["LatentEyesConfig", "LatentUnderstanding", "LatentCountEyes", "flat_canvas", "latent_model_path",
           "is_available", "installed_problem", "load_latent_model", "DEFAULT_PATH", "TRAIN_COMMAND"]

#: Where the shipped weights live (package data).
DEFAULT_PATH = Path(__file__).resolve().parents[1] / "data" / "shapes_latent_eyes"
TRAIN_COMMAND = "python scripts/train_shapes_latent_eyes.py --out xlard/data/shapes_latent_eyes"
ENV_VAR = "XLARD_SHAPES_LATENT_EYES"


@dataclass(frozen=True)
class LatentEyesConfig:
    """Architecture and vocabulary of a :class:`LatentUnderstanding`.

    Attributes:
        latent_channels: C of the latent.
        shapes: the nouns of the shape head (class 0 is "none"), as the teacher's.
        colors: the color words of the color head (class 0 is background), as the teacher's.
        width: channels at the latent's resolution.
        low_width: channels at half the latent's resolution (the context level).
        up_widths: channels of each 2x upsampling stage; their number sets the output size
            (``2 ** len(up_widths)`` times the latent's: the VAE's factor).
    """

    latent_channels: int = 8
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = tuple(PALETTE)
    width: int = 48
    low_width: int = 64
    up_widths: tuple[int, ...] = (32, 16)

    def __post_init__(self) -> None:
        # (one string was split into its letters: shapes="square" made the shapes 's', 'q', ...)
        object.__setattr__(self, "shapes", _words("LatentEyesConfig", "shapes", self.shapes))
        object.__setattr__(self, "colors", _words("LatentEyesConfig", "colors", self.colors))
        up = self.up_widths  # bytes read as a tuple of ints
        object.__setattr__(self, "up_widths", (up,) if isinstance(up, (str, bytes)) else tuple(up))
        for name in ("latent_channels", "width", "low_width"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LatentEyesConfig.{name} must be a positive int, got {value!r}")
        if not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in self.up_widths):
            raise ValueError(f"LatentEyesConfig.up_widths must be positive ints, got {self.up_widths!r}")
        for name in ("shapes", "colors"):
            words = getattr(self, name)
            if not words or len(set(words)) != len(words) or not all(isinstance(w, str) and w for w in words):
                raise ValueError(f"LatentEyesConfig.{name} must be distinct non-empty words, got {words!r}")
        unknown = [c for c in self.colors if c not in PALETTE]
        if unknown:  # the flat canvas paints each color class with its palette color
            raise ValueError(f"LatentEyesConfig.colors must be palette colors ({', '.join(PALETTE)}), got "
                             f"{unknown}")

    @property
    def factor(self) -> int:
        """How many image pixels one latent cell spans per side."""
        return 2 ** len(self.up_widths)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatentEyesConfig:
        return _config_from_dict(cls, d)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class LatentUnderstanding(nn.Module):
    """Latent -> the understanding model's per-pixel maps, at ``config.factor`` times the latent's size.

    Two 3x3 convolutions at the latent's resolution, two at half of it (context), one fusing both, then per
    upsampling stage a bilinear 2x and a 3x3 convolution; 1x1 heads. ``shift`` / ``scale`` (buffers)
    normalise the latent per channel (set from the training latents).

    Args:
        config: a :class:`LatentEyesConfig`.

    Example:
        >>> model = LatentUnderstanding(LatentEyesConfig(width=8, low_width=8, up_widths=(8, 8)))
        >>> shape_logits, color_logits = model(torch.zeros(2, 8, 4, 4))
        >>> tuple(shape_logits.shape), tuple(color_logits.shape)
        ((2, 5, 16, 16), (2, 11, 16, 16))
    """

    def __init__(self, config: LatentEyesConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or LatentEyesConfig()
        c, w, lw = config.latent_channels, config.width, config.low_width
        self.register_buffer("shift", torch.zeros(1, c, 1, 1))
        self.register_buffer("scale", torch.ones(1, c, 1, 1))
        self.inp = nn.Sequential(_conv(c, w), _conv(w, w))
        self.low = nn.Sequential(_conv(w, lw, stride=2), _conv(lw, lw))
        self.fuse = _conv(w + lw, w)
        widths = (w, *config.up_widths)
        self.up = nn.ModuleList(_conv(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.shape_head = nn.Conv2d(widths[-1], 1 + len(config.shapes), 1)
        self.color_head = nn.Conv2d(widths[-1], 1 + len(config.colors), 1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(shape [B, 1 + S, f h, f w], color [B, 1 + C, f h, f w])`` of latents ``[B, C, h, w]``
        (not scanned for NaN: a training step's forward; :meth:`predict` refuses them)."""
        self._check_z("LatentUnderstanding.forward", z)
        x = self.inp((z - self.shift) / self.scale)
        low = self.low(x)
        x = self.fuse(torch.cat((F.interpolate(low, size=x.shape[-2:], mode="nearest"), x), 1))
        for stage in self.up:
            x = stage(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return self.shape_head(x), self.color_head(x)

    def _check_z(self, owner: str, z: Any) -> None:
        c = self.config.latent_channels
        if not isinstance(z, torch.Tensor):  # a numpy array's dtype and shape read like a fitting tensor's
            raise ValueError(f"{owner}: z must be a float latent tensor [B, {c}, h, w], got "
                             f"{type(z).__module__}.{type(z).__name__}")
        if z.dim() != 4 or not z.is_floating_point() or z.shape[1] != c or min(z.shape[-2:]) < 1:
            raise ValueError(f"{owner}: z must be a float latent [B, {c}, h, w], got "
                             f"{str(z.dtype).replace('torch.', '')} {list(z.shape)}")

    @torch.no_grad()
    def predict(self, z: torch.Tensor) -> UnderstandingOutput:
        """Per-pixel shape-core and color probabilities, as the teacher's ``predict`` on the decoded image.

        Args:
            z (Tensor[B, C, h, w]): float latents of the shapes backbone (finite).

        Returns:
            An :class:`xlard.shapes.understanding.UnderstandingOutput` at ``factor`` times the latent's size.

        Raises:
            ValueError: ``z`` is not a finite float latent with ``config.latent_channels`` channels.
        """
        self._check_z("LatentUnderstanding.predict", z)
        if z.numel() and not bool(torch.isfinite(z).all()):
            raise ValueError("LatentUnderstanding.predict: z holds NaN or infinite values")
        param = next(self.parameters())
        x = z.to(device=param.device, dtype=param.dtype).contiguous(memory_format=torch.channels_last)
        shape_logits, color_logits = _eval_pass(self, x)
        return UnderstandingOutput(shape_logits.float().softmax(1)[:, 1:].contiguous(),
                                   color_logits.float().softmax(1).contiguous())

    def save_pretrained(self, folder: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (float32) into ``folder``."""
        from xlard import _io

        owner = "LatentUnderstanding.save_pretrained"
        folder = _io.make_folder(folder, owner)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        _io.atomic_save_safetensors(folder / WEIGHTS_NAME, state, owner=owner)
        _io.atomic_write_json(folder / CONFIG_NAME, {"model": self.config.to_dict(), **(extra or {})}, owner=owner,
                              indent=1)
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike | None = None, device: Any = "cpu") -> LatentUnderstanding:
        """Load a folder written by :meth:`save_pretrained` (default: the package data), float32, eval mode.

        Raises:
            FileNotFoundError: the folder lacks the files (the message names the training command).
            ValueError: the files cannot be read or do not belong together (a damaged install or copy).
        """
        from xlard import _io
        from xlard._args import as_device

        device = as_device(device, "LatentUnderstanding.from_pretrained")
        given, folder = folder, latent_model_path(folder)
        if not is_available(folder):
            where = f" (${ENV_VAR})" if given is None and os.environ.get(ENV_VAR) else ""
            raise FileNotFoundError(f"no shapes latent eyes at {folder}{where} ({CONFIG_NAME} and {WEIGHTS_NAME} "
                                    f"expected); train them with: {TRAIN_COMMAND}")
        owner, fix = "LatentUnderstanding.from_pretrained", f"reinstall xlard or retrain them with: {TRAIN_COMMAND}"
        saved = _io.read_json(folder / CONFIG_NAME, owner=owner, what="a model config")
        try:
            with torch.random.fork_rng(devices=[]):  # its random initialisation is overwritten: the caller's RNG
                model = cls(LatentEyesConfig.from_dict(saved["model"]))  # stays as it was
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{owner}: {folder / CONFIG_NAME} is not a latent eyes config "
                             f"({type(e).__name__}: {e}); {fix}") from None
        _load_weights(model, folder / WEIGHTS_NAME, folder / CONFIG_NAME, owner, fix)
        return model.to(device).eval()


def latent_model_path(path: str | os.PathLike | None = None) -> Path:
    """The weights folder: ``path``, else ``$XLARD_SHAPES_LATENT_EYES``, else the package data."""
    return _weights_folder(path, ENV_VAR, DEFAULT_PATH)


def is_available(path: str | os.PathLike | None = None) -> bool:
    """True when the folder holds ``config.json`` and ``model.safetensors``."""
    return _has_weights(latent_model_path(path))


def installed_problem(path: str | os.PathLike | None = None) -> str | None:
    """Why the latent eyes cannot be used, or None: loads them (cached; 0.6 MB), so a damaged or mismatched
    folder is found before a run writes anything, not at its first counting prompt.

    The message names the folder and, when it came from ``$XLARD_SHAPES_LATENT_EYES``, that variable."""
    folder = latent_model_path(path)
    where = f"{folder} (from ${ENV_VAR})" if path is None and os.environ.get(ENV_VAR) else str(folder)
    if not is_available(path):
        fix = (f"point ${ENV_VAR} at a folder with them or unset it" if path is None and os.environ.get(ENV_VAR)
               else "reinstall xlard")
        return f"there are no latent eyes at {where} ({CONFIG_NAME} and {WEIGHTS_NAME} expected): {fix}, or " \
               f"train them with {TRAIN_COMMAND}"
    try:
        load_latent_model(path)
    except (ValueError, OSError) as e:
        return f"the latent eyes at {where} cannot be loaded: {e}"
    return None


_LOADED: dict[tuple[str, str], LatentUnderstanding] = {}


def load_latent_model(path: str | os.PathLike | None = None, device: Any = "cpu") -> LatentUnderstanding:
    """:meth:`LatentUnderstanding.from_pretrained`, cached per (folder, device), in channels_last (a third
    faster on the CPU). Every call returns the same instance: ``copy.deepcopy`` it before changing it."""
    from xlard._args import as_device

    # was torch's "Expected one of cpu, cuda, ..."
    device = as_device(device, "load_latent_model") or torch.device("cpu")
    key = (str(latent_model_path(path).resolve()), str(device))
    if key not in _LOADED:
        _LOADED[key] = LatentUnderstanding.from_pretrained(path, device).to(memory_format=torch.channels_last)
    return _LOADED[key]


def flat_canvas(color_probs: torch.Tensor, colors=tuple(PALETTE)) -> torch.Tensor:
    """The image a color map describes: each pixel the palette color it most likely has, or the background
    where the background is at least as likely as not.

    Args:
        color_probs (Tensor[B, 1 + C, H, W]): color distributions, background first, then ``colors``.
        colors: the palette names of the color classes.

    Returns:
        float32 ``[B, 3, H, W]`` in [0, 1].

    Example:
        >>> p = torch.zeros(1, 1 + len(PALETTE), 1, 2); p[0, 0, 0, 0] = 1; p[0, 1, 0, 1] = 1
        >>> (flat_canvas(p)[0, :, 0] * 255).round().int().T.tolist() == [list(BACKGROUND), list(PALETTE["red"])]
        True
    """
    colors = tuple(colors) if not isinstance(colors, str) else (colors,)
    unknown = [c for c in colors if not isinstance(c, str) or c not in PALETTE]
    if not colors or unknown or len(set(colors)) != len(colors):
        raise ValueError(f"flat_canvas: colors must be distinct palette names ({', '.join(PALETTE)}), got "
                         f"{list(colors)}")
    if not isinstance(color_probs, torch.Tensor):
        raise ValueError(f"flat_canvas: color_probs must be a torch.Tensor [B, {1 + len(colors)}, H, W], got "
                         f"{type(color_probs).__name__}")
    if color_probs.dim() != 4 or color_probs.shape[1] != 1 + len(colors):
        raise ValueError(f"flat_canvas: color_probs must be [B, {1 + len(colors)}, H, W] (background first, then "
                         f"{len(colors)} colors), got {list(color_probs.shape)}")
    if color_probs.numel() and not bool(torch.isfinite(color_probs).all()):  # NaN read as background
        raise ValueError("flat_canvas: color_probs holds NaN or infinite values")
    device = color_probs.device
    palette = torch.tensor([PALETTE[c] for c in colors], dtype=torch.float32, device=device) / 255.0
    background = torch.tensor(BACKGROUND, dtype=torch.float32, device=device)[None, :, None, None] / 255.0
    probs = color_probs.float()
    painted = palette[probs[:, 1:].argmax(1)].permute(0, 3, 1, 2)
    return torch.where(probs[:, :1] < 0.5, painted, background).contiguous()


class LatentCountEyes(CountEyes):
    """:class:`xlard.shapes.understanding.CountEyes` without the VAE decode: the maps come from
    :class:`LatentUnderstanding` on the latent, and :meth:`edit_counts` edits the :func:`flat_canvas` of
    those maps (every object a clean flat color on the background) before the VAE encodes it.

    Args:
        nouns: the noun order of ``eyes(z)``'s maps (a corrector's ``reader_nouns``).
        backbone_folder: another shapes backbone (its VAE encodes the edited canvas).
        model_folder: other latent eyes weights (default: the installed ones).

    Example:
        >>> eyes = LatentCountEyes(("circle", "square", "triangle", "diamond"))   # doctest: +SKIP
        >>> probs, foreground = eyes(z)                                            # doctest: +SKIP
    """

    def _model(self, device: torch.device) -> LatentUnderstanding:
        return load_latent_model(self.model_folder, device)

    def _maps(self, z: torch.Tensor, owner: str) -> UnderstandingOutput:
        return _reader_for(z, owner, self._model, "the latent eyes read").predict(z)

    @torch.no_grad()
    def images(self, z: torch.Tensor) -> torch.Tensor:
        """The flat canvases of the latents' maps, float ``[B, 3, f h, f w]`` in [0, 1] (no VAE decode)."""
        maps = self._maps(z, "LatentCountEyes")
        return flat_canvas(maps.color_probs, self._model(z.device).config.colors)

    @torch.no_grad()
    def edit_counts(self, z: torch.Tensor, nouns, counts, colors=None
                    ) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
        """``count_edit`` as :meth:`CountEyes.edit_counts`, on the latent maps and their flat canvas.

        Returns:
            ``(encoded [B, C, h, w], touched [B, 1, h, w] bool, actions)``.

        Raises:
            ValueError: ``nouns`` or ``counts`` do not give one entry per latent, or a count below 1.
        """
        owner = "LatentCountEyes.edit_counts"
        nouns, counts = self._check_counts(owner, z, nouns, counts)
        colors = self._check_colors(owner, colors, len(nouns))
        config = self._model(z.device).config
        side = [int(n) * config.factor for n in z.shape[-2:]]
        if side != [EDIT_IMAGE_SIZE] * 2:  # the eyes were distilled, and the editor draws, at this size
            raise ValueError(f"{owner}: count_edit redraws {EDIT_IMAGE_SIZE}x{EDIT_IMAGE_SIZE} images (the "
                             f"understanding model's size, which the latent eyes were distilled at), and z "
                             f"{list(z.shape)} is read at {side[0]}x{side[1]}: generate at {EDIT_IMAGE_SIZE}x"
                             f"{EDIT_IMAGE_SIZE}, or use a corrector without count_edit")
        maps = self._maps(z, owner)
        return self._edit_and_encode(owner, z, flat_canvas(maps.color_probs, config.colors), maps, config, nouns,
                                     counts, config.factor, colors)

    def _read(self, z: torch.Tensor) -> tuple[UnderstandingOutput, LatentEyesConfig]:
        """``(maps of z, the latent eyes' config)``: the latent read directly, no VAE decode."""
        return self._maps(z, "LatentCountEyes"), self._model(z.device).config
