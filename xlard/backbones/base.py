"""The backbone interface: a frozen generator split around the corrector.

method.md section 2 writes generation as ``z0 = E(p)``, ``zc = z0 + alpha *
Delta(z0, e_p)``, ``x = D(zc)``. A :class:`Backbone` provides ``E`` as
:meth:`Backbone.encode` (prompts + seed -> :class:`BackboneState`: the latent
z0, the prompt embedding e_p, the prompt specs and everything needed to resume
sampling) and ``D`` as :meth:`Backbone.decode` (state + a latent ->
:class:`Decoded`: images, attention maps, color features).
:meth:`Backbone.generate` chains the three for inference.

Conventions shared by every backbone:

- ``z0`` is spatial, ``[B, C, h, w]``, whatever layout the denoiser uses
  internally (FLUX's packed tokens are unpacked), so one corrector
  architecture fits every family.
- ``e_p`` is the conditional prompt embedding the denoiser sees: token
  embeddings ``[B, L, D]``, a ``[B, L]`` mask of real tokens and a pooled
  vector ``[B, D_pooled]``.
- Token maps ``[B, T, h, w]`` are indexed like the denoiser's text sequence;
  :attr:`BackboneState.segment_offsets` says where each tokenizer's tokens
  start in it, so ``spec.sequence_token_indices(segment_offsets)`` (or
  ``ExplainableRewards(..., segment_offsets=...)``) picks an entity's maps.
- Gradients never flow into the backbone: encode and decode run under
  ``torch.no_grad()``.
"""
from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from xlard._args import is_finite_real
from xlard.prompts import PromptSpec

__all__ = [
    "Seed",
    "PromptEmbedding",
    "BackboneState",
    "Decoded",
    "Generation",
    "Backbone",
    "correction_index",
    "make_generators",
]

#: What ``seed=`` accepts: an int (one generator for the batch), one int per
#: prompt (one generator each), or torch.Generator object(s) used as given.
Seed = int | Sequence[int] | torch.Generator | Sequence[torch.Generator]


def correction_index(correction_step: float, num_steps: int) -> int:
    """How many denoising steps run before the correction.

    The smallest ``k`` with ``k / num_steps >= correction_step``: at least one
    step for any ``correction_step > 0``, all of them for 1.0.

    Args:
        correction_step: fraction of the denoising in (0, 1].
        num_steps: number of denoising steps (>= 1).

    Returns:
        ``k`` in ``[1, num_steps]``.

    Raises:
        ValueError: an argument out of its domain, naming it.

    Example:
        >>> correction_index(0.5, 4), correction_index(0.3, 4), correction_index(1.0, 4)
        (2, 2, 4)
    """
    check_correction_step(correction_step)
    if not isinstance(num_steps, numbers.Integral) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    # The small tolerance keeps 0.3 * 10 (= 3.0000000000000004) at 3 steps.
    return max(1, min(int(num_steps), math.ceil(correction_step * num_steps - 1e-9)))


def check_correction_step(correction_step: Any) -> float:
    """Validate ``correction_step`` (a real number in (0, 1]) and return it as a float."""
    if not is_finite_real(correction_step) or not 0.0 < correction_step <= 1.0:
        raise ValueError(
            f"correction_step must be a number in (0, 1] (the fraction of denoising steps run before the "
            f"correction; 1.0 = the final clean latent), got {correction_step!r}"
        )
    return float(correction_step)


#: The largest seed a ``torch.Generator`` takes.
MAX_SEED = 2**64 - 1


def make_generators(seed: Seed, batch: int) -> torch.Generator | list[torch.Generator]:
    """Turn ``seed=`` into the generator(s) a diffusers pipeline takes.

    Generators live on the CPU (diffusers draws there and moves the noise), so a
    seed gives the same images on every device up to the device's arithmetic.

    Args:
        seed: an int -> one ``torch.Generator`` seeded with it for the whole
            batch (what ``pipe(prompts, generator=torch.Generator().manual_seed(seed))``
            does); a sequence of ``batch`` ints -> one generator per prompt (a
            prompt's image then does not depend on the rest of the batch); a
            generator or a list of ``batch`` generators -> used as given (their
            state advances).
        batch: number of prompts.

    Returns:
        A generator or a list of ``batch`` generators.

    Raises:
        ValueError: a bad seed, or a sequence whose length is not ``batch``.
    """
    def is_int(v: Any) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if not is_int(batch) or batch < 1:  # 'x' was taken when the seed needed no count
        raise ValueError(f"make_generators: batch must be the number of prompts (an int >= 1), got {batch!r}")
    if isinstance(seed, torch.Generator):
        return seed
    if is_int(seed):
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in 0..{MAX_SEED} (2**64 - 1, what torch.Generator takes), "
                             f"got {seed}")
        return torch.Generator("cpu").manual_seed(int(seed))
    if isinstance(seed, Sequence) and not isinstance(seed, (str, bytes)):
        items = list(seed)
        if len(items) != batch:
            raise ValueError(f"seed: got {len(items)} seeds/generators for {batch} prompts; give one per prompt "
                             "or a single int")
        if all(isinstance(g, torch.Generator) for g in items):
            return items
        if all(is_int(s) and 0 <= s <= MAX_SEED for s in items):
            return [torch.Generator("cpu").manual_seed(int(s)) for s in items]
    raise ValueError(
        f"seed must be an int in 0..{MAX_SEED}, a sequence of one such int per prompt, a torch.Generator "
        f"or a list of them, got {seed!r}"
    )


def generator_states(generator: torch.Generator | list[torch.Generator]) -> list[torch.Tensor]:
    """Snapshot of the generator(s)' states (restored by :func:`restore_generators`)."""
    gens = generator if isinstance(generator, list) else [generator]
    return [g.get_state() for g in gens]


def restore_generators(states: list[torch.Tensor], devices: list[str], as_list: bool):
    """Fresh generators in the saved states, so a state can be decoded many times identically."""
    gens = []
    for state, device in zip(states, devices):
        g = torch.Generator(device)
        g.set_state(state)
        gens.append(g)
    return gens if as_list else gens[0]


@dataclass
class PromptEmbedding:
    """``e_p``: the conditional prompt embedding the backbone is conditioned on.

    Attributes:
        tokens (Tensor[B, L, D]): token embeddings (what the denoiser attends to).
        pooled (Tensor[B, D_pooled]): the pooled embedding (drives the corrector's FiLM).
        mask (bool Tensor[B, L]): True for real tokens (padding False).
        token_ids (int64 Tensor[B, L] or None): ids of the primary tokenizer
            whose positions ``tokens`` follows (None where the sequence joins
            several tokenizers without a single id per position).
    """

    tokens: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor
    token_ids: torch.Tensor | None = None

    def as_corrector_inputs(self) -> dict[str, torch.Tensor]:
        """``{"text_tokens", "pooled", "text_mask"}`` for :class:`xlard.models.ResidualCorrector`."""
        return {"text_tokens": self.tokens, "pooled": self.pooled, "text_mask": self.mask}


@dataclass
class BackboneState:
    """Everything :meth:`Backbone.encode` computed, and what decode needs to resume.

    Attributes:
        z0 (Tensor[B, C, h, w]): the latent at ``correction_step`` (spatial layout).
        prompt_embedding: ``e_p`` (:class:`PromptEmbedding`).
        specs: one :class:`xlard.prompts.PromptSpec` per prompt, aligned to
            the backbone's tokenizer(s).
        prompts: the prompt texts.
        segment_offsets: tokenizer name -> position of its first token in the
            denoiser's text sequence (what token maps index).
        correction_step: the fraction in (0, 1] this state was encoded at.
        step_index: denoising steps already run (``k``); ``num_steps`` in all.
        num_steps: the total number of denoising steps.
        guidance_scale: classifier-free guidance scale used (and to be used).
        height, width: image size in pixels.
        resume: backbone-specific data to continue sampling (scheduler
            snapshot, generator states, conditioning tensors). Treat as opaque.
        encode_maps (Tensor[B, T, h, w] or None): attention maps recorded
            during the steps encode ran (before the correction), when capture
            is enabled and encode ran at least one step.
    """

    z0: torch.Tensor
    prompt_embedding: PromptEmbedding
    specs: tuple[PromptSpec, ...]
    prompts: tuple[str, ...]
    segment_offsets: Mapping[str, int]
    correction_step: float
    step_index: int
    num_steps: int
    guidance_scale: float
    height: int
    width: int
    resume: dict[str, Any] = field(default_factory=dict, repr=False)
    encode_maps: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.z0.shape[0]

    @property
    def remaining_steps(self) -> int:
        """Denoising steps decode still runs after the correction."""
        return self.num_steps - self.step_index


@dataclass
class Decoded:
    """What :meth:`Backbone.decode` returns.

    Attributes:
        images (Tensor[B, 3, H, W], float32 in [0, 1]): the decoded images.
        latents (Tensor[B, C, h, w]): the final clean latent that was VAE-decoded.
        token_maps (Tensor[B, T, h', w'] float32 or None): text-to-image
            attention per token of the denoiser's text sequence (conditional
            half under CFG), None when capture is off.
        patch_features (xlard.color_features.PatchFeatures or None): the
            backbone's color encoder applied to ``images``, when it has one.
        specs: the prompt specs (for the rewards).
        segment_offsets: see :class:`BackboneState`.
    """

    images: torch.Tensor
    latents: torch.Tensor
    token_maps: torch.Tensor | None
    patch_features: Any
    specs: tuple[PromptSpec, ...]
    segment_offsets: Mapping[str, int]

    def reward_inputs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`xlard.rewards.ExplainableRewards`.

        Example:
            >>> cmd = ExplainableRewards(color_encoder=PixelColorEncoder())  # doctest: +SKIP
            >>> result = cmd(**decoded.reward_inputs())                       # doctest: +SKIP
        """
        inputs: dict[str, Any] = {"specs": self.specs, "token_maps": self.token_maps,
                                  "segment_offsets": dict(self.segment_offsets)}
        if self.patch_features is not None:
            inputs["patch_features"] = self.patch_features
        else:
            inputs["images"] = self.images
        return inputs


@dataclass
class Generation:
    """What :meth:`Backbone.generate` returns.

    Attributes:
        decoded: the :class:`Decoded` output of the corrected latent.
        state: the :class:`BackboneState` (z0, e_p, specs).
        zc (Tensor[B, C, h, w]): the corrected latent (``z0`` without a corrector).
        lam (Tensor[B, h, w] float32 or None): the Latent Activation Map
            ``sum_c |Delta|`` (None without a corrector).
    """

    decoded: Decoded
    state: BackboneState
    zc: torch.Tensor
    lam: torch.Tensor | None

    @property
    def images(self) -> torch.Tensor:
        return self.decoded.images


def _as_prompt_list(prompts: Any) -> list[str | PromptSpec]:
    if isinstance(prompts, (str, PromptSpec)):
        return [prompts]
    if isinstance(prompts, Sequence) and not isinstance(prompts, bytes):
        items = list(prompts)
        if not items:
            raise ValueError("prompts must not be empty")
        for i, p in enumerate(items):
            if not isinstance(p, (str, PromptSpec)):
                raise ValueError(f"prompts[{i}] must be a string or a PromptSpec, got {type(p).__name__}")
            if isinstance(p, str) and not p.strip():
                raise ValueError(f"prompts[{i}] is empty")
        return items
    raise ValueError(f"prompts must be a string, a PromptSpec or a sequence of them, got {type(prompts).__name__}")


class Backbone(abc.ABC):
    """A frozen text-to-image generator split at the correction point.

    Subclasses implement :meth:`encode` and :meth:`decode` and the three
    properties giving the corrector's input widths; :meth:`generate` and
    :meth:`corrector_config` come for free.
    """

    @property
    @abc.abstractmethod
    def latent_channels(self) -> int:
        """C of ``z0``."""

    @property
    @abc.abstractmethod
    def text_dim(self) -> int:
        """D of ``e_p.tokens``."""

    @property
    @abc.abstractmethod
    def pooled_dim(self) -> int:
        """D_pooled of ``e_p.pooled``."""

    @abc.abstractmethod
    def encode(self, prompts: str | PromptSpec | Sequence[str | PromptSpec], seed: Seed = 0) -> BackboneState:
        """Run the generator up to the correction point.

        Args:
            prompts: prompt text(s) or :class:`PromptSpec` (s); texts are parsed
                with :func:`xlard.prompts.parse` and aligned to the backbone's
                tokenizer(s), specs are aligned when they are not yet.
            seed: see :data:`Seed`.

        Returns:
            A :class:`BackboneState`.
        """

    @abc.abstractmethod
    def decode(self, state: BackboneState, z: torch.Tensor | None = None) -> Decoded:
        """Finish generation from ``z`` (default ``state.z0``): remaining steps, then the VAE.

        Decoding the same state and latent twice gives the same result.
        """

    def corrector_config(self, preset: str = "tiny", **overrides):
        """A :class:`xlard.models.CorrectorConfig` sized for this backbone's latent and prompt embedding."""
        from xlard.models import CorrectorConfig

        fixed = sorted(set(overrides) & {"latent_channels", "text_dim", "pooled_dim"})
        if fixed:  # was "preset() got multiple values for keyword argument"
            raise ValueError(f"corrector_config: {', '.join(fixed)} come from the backbone (latent_channels="
                             f"{self.latent_channels}, text_dim={self.text_dim}, pooled_dim={self.pooled_dim}); "
                             f"size the other fields, or build CorrectorConfig.preset({preset!r}, ...) yourself")
        return CorrectorConfig.preset(preset, latent_channels=self.latent_channels, text_dim=self.text_dim,
                                      pooled_dim=self.pooled_dim, **overrides)

    def check_prompts(self, prompts: Sequence[str | PromptSpec], label: Any = None) -> None:
        """Parse every distinct prompt as :meth:`encode` will, before any work is done.

        A prompt that cannot be used (one whose object words fall beyond the tokenizer's length
        limit, say) then fails at once, named by its place, instead of after the images before
        it were made. A backbone without a ``parse`` method accepts every prompt here.

        Args:
            prompts: the prompts (strings or :class:`xlard.prompts.PromptSpec`).
            label: ``label(i) -> str`` names prompt ``i`` (0-based) in the message; default
                ``"record i"``.

        Raises:
            ValueError: ``"<label>: <why the prompt cannot be parsed>"`` for the first such prompt.
        """
        if isinstance(prompts, (str, PromptSpec)):  # a string was checked letter by letter ("record 3: ' '")
            prompts = [prompts]
        if not isinstance(prompts, Iterable):
            raise TypeError(f"check_prompts: prompts must be prompts (strings or PromptSpecs) or a list of them, "
                            f"got {type(prompts).__name__}")
        parse = getattr(self, "parse", None)
        if parse is None:
            return
        seen: set = set()
        for i, prompt in enumerate(prompts):
            try:
                if prompt in seen:
                    continue
                seen.add(prompt)
            except TypeError:  # an unhashable spec: checked every time
                pass
            try:
                parse(prompt)
            except ValueError as exc:
                name = label(i) if label is not None else f"record {i}"
                raise ValueError(f"{name}: {exc}") from None

    def generate(self, prompts: str | PromptSpec | Sequence[str | PromptSpec], seed: Seed = 0,
                 corrector: Any = None, alpha: float | torch.Tensor | None = None) -> Generation:
        """encode -> corrector (mean correction) -> decode, in one call.

        Args:
            prompts, seed: as :meth:`encode`.
            corrector: a :class:`xlard.models.ResidualCorrector` (any module
                with ``correct(z0, text_tokens, pooled, text_mask, alpha) -> (zc, lam)``),
                on the backbone's device; None decodes z0 unchanged.
            alpha: step size of ``zc = z0 + alpha * Delta``; default the
                corrector's ``config.alpha`` (its training step: for a folder read
                with :func:`xlard.evaluation.load_corrector_dir` pass ``meta.alpha``,
                the step ``xlard eval`` and ``xlard generate`` apply).

        Returns:
            A :class:`Generation`.

        Raises:
            ValueError: a corrector without ``correct``, or bad prompts/seed.

        Example:
            >>> backbone = DiffusersBackbone.from_pretrained(path, correction_step=0.5)  # doctest: +SKIP
            >>> out = backbone.generate("a photo of two red cats", seed=0, corrector=corrector)  # doctest: +SKIP
            >>> out.images.shape, out.lam.shape                                          # doctest: +SKIP
        """
        if corrector is not None and not callable(getattr(corrector, "correct", None)):
            raise ValueError(f"corrector must have a correct(z0, text_tokens, pooled, text_mask, alpha) method, "
                             f"got {type(corrector).__name__}")
        if alpha is not None and corrector is None:
            raise ValueError("alpha was given without a corrector")
        state = self.encode(prompts, seed)
        if corrector is None:
            zc, lam = state.z0, None
        else:
            from xlard.models import corrector_inputs

            with torch.no_grad():
                zc, lam = corrector.correct(state.z0, alpha=alpha,
                                            **corrector_inputs(corrector, state.prompt_embedding, state.specs))
        return Generation(self.decode(state, zc), state, zc, lam)
