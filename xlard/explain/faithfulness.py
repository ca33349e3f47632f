"""The LAM masking check: zero Delta at the top LAM cells and measure how much reward gain is lost.

Backbone-agnostic (it takes a callable from latents to rewards), with a
random-mask control of the same size.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from xlard import ops
from xlard.explain._validate import _check_tensor, _err
from xlard.explain.lam import top_lam_mask


@dataclass
class FaithfulnessResult:
    """What masking the top LAM cells did to the reward (all Tensor[B], float32).

    Attributes:
        reward_before: reward of the uncorrected latent ``z0``.
        reward_after: reward of ``z0 + alpha * delta``.
        reward_masked: reward with ``delta`` zeroed at the top LAM cells.
        reward_random: reward with ``delta`` zeroed at as many random cells
            (the control), or None if not requested.
        gain: ``reward_after - reward_before``.
        gain_lost: fraction of the gain lost by masking,
            ``(reward_after - reward_masked) / gain``; NaN where ``|gain|`` is
            below ``min_gain`` or 0 (a share of no gain is undefined: with
            ``alpha = 0``, or a zero ``delta``, every row is NaN).
        gain_lost_random: the same for the random control, or None.
        relative_drop: ``(reward_after - reward_masked) / |reward_after|``, the
            paper's "CLIPScore -6.3%" figure; NaN where ``reward_after`` is 0.
        mask (Tensor[B, h, w] bool): the masked cells.
        fraction: the masked fraction asked for.
        min_gain: the smallest gain whose share is defined (the per-item ratios' and the summary's).
    """

    reward_before: torch.Tensor
    reward_after: torch.Tensor
    reward_masked: torch.Tensor
    reward_random: torch.Tensor | None
    gain: torch.Tensor
    gain_lost: torch.Tensor
    gain_lost_random: torch.Tensor | None
    relative_drop: torch.Tensor
    mask: torch.Tensor
    fraction: float
    min_gain: float = 1e-6

    def summary(self) -> str:
        """One line over the batch, every figure from the batch means (as :func:`xlard.evaluation.
        faithfulness_table` reports shares): the mean reward after correction and with the top cells masked, its
        relative change, the mean gain and the share of it the masking takes back (n/a when the mean gain is
        below ``min_gain``),
        and the random control's share. (The per-item ratios stay in ``gain_lost`` and ``relative_drop``; their
        means could contradict the means beside them: "-50%" for a mean reward falling from 0.55 to 0.50.)"""
        def mean(x):
            x = x[torch.isfinite(x)]
            return float("nan") if x.numel() == 0 else x.double().mean().item()

        def share(part: float, whole: float) -> str:  # (a mean gain of float32 rounding, -3e-8: "-335544300%")
            return "n/a" if whole != whole or abs(whole) < max(self.min_gain, 1e-12) else f"{part / whole:.0%}"

        after, masked, gain = mean(self.reward_after), mean(self.reward_masked), mean(self.gain)
        change = "n/a" if not after or after != after else f"{(masked - after) / abs(after):+.1%}"
        top = f"{round(100 * self.fraction, 6):g}%"  # 0.125 read '12%', 0.004 '0%'
        line = (f"top {top} LAM cells masked: reward {after:.4f} -> {masked:.4f} ({change}), "
                f"gain {gain:+.4f}, {share(after - masked, gain)} of it lost")
        if self.reward_random is not None:
            line += f" (random cells: {share(after - mean(self.reward_random), gain)})"
        return line


def _reward_vector(fn: str, reward_fn, z: torch.Tensor, what: str) -> torch.Tensor:
    r = reward_fn(z)
    if not isinstance(r, torch.Tensor):
        raise TypeError(_err(fn, f"reward_fn must return a Tensor[B], got {type(r).__name__} for the {what} latent"))
    r = r.detach().float().reshape(-1) if r.dim() <= 1 else r
    if r.dim() != 1 or r.shape[0] != z.shape[0]:
        raise ValueError(_err(fn, f"reward_fn must return a Tensor[B] with B = {z.shape[0]}, got shape "
                                  f"{tuple(r.shape)} for the {what} latent"))
    # A NaN row is a row without a reward (the CMD's joint reward of a prompt with no aspect): it stays NaN and
    # the summary's means skip it, as before. Infinite rewards, or none at all, made every figure inf or NaN.
    if bool(torch.isinf(r).any()):
        raise ValueError(_err(fn, f"reward_fn returned {int(torch.isinf(r).sum())} infinite reward(s) of "
                                  f"{r.shape[0]} for the {what} latent; rewards must be finite or NaN"))
    if r.numel() and bool(torch.isnan(r).all()):
        raise ValueError(_err(fn, f"reward_fn returned NaN for every one of the {r.shape[0]} {what} latent(s): "
                                  f"no row has a reward"))
    return r


def faithfulness(
    reward_fn: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    delta: torch.Tensor,
    alpha: float | torch.Tensor = 1.0,
    fraction: float = 0.2,
    random_control: bool = True,
    generator: torch.Generator | None = None,
    min_gain: float = 1e-6,
) -> FaithfulnessResult:
    """The LAM masking check (method.md section 7): does the reward gain live where the LAM is high?

    Zeroes ``delta`` at the top ``fraction`` of each image's LAM cells (all
    channels), re-applies the correction and scores it. A faithful LAM loses
    most of the gain; the random control (as many cells, chosen uniformly)
    shows what an uninformative map would lose.

    ``reward_fn`` maps a corrected latent to one reward per item; it holds
    everything backbone-specific (continue sampling from the latent at the
    correction step, decode, score with the CMD or CLIPScore), so this check
    works for any backbone. It is called 3 times (4 with the control), each on
    the whole batch, under ``torch.no_grad()``.

    Args:
        reward_fn (Callable[[Tensor[B, C, h, w]], Tensor[B]]): the reward of a latent.
        z0 (Tensor[B, C, h, w]): the uncorrected latent.
        delta (Tensor[B, C, h, w]): the corrector's output, same dtype, finite.
        alpha (float or Tensor[B]): the correction step size. 0 is allowed (an evaluation run of a corrector
            saved with ``alpha = 0`` reaches here): nothing is corrected, so ``reward_masked`` and
            ``reward_random`` equal ``reward_after`` and ``reward_before``, ``gain`` and ``relative_drop`` are 0,
            ``gain_lost`` is NaN and :meth:`FaithfulnessResult.summary` says "n/a".
        fraction (float): the share of LAM cells to mask, in [0, 1] (default 0.2, as ``xlard eval`` and the
            demo use: ``--mask-fraction``).
        random_control (bool): also mask as many random cells.
        generator (torch.Generator or a sequence of B of them, optional): for the random control; one per
            item makes each item's random cells depend on its own generator only (not on the batch it is in).
        min_gain (float): gains smaller than this in magnitude (and gains of exactly 0) give NaN ratios.

    Returns:
        FaithfulnessResult.

    Raises:
        TypeError, ValueError: malformed latents, non-finite ``z0``, ``delta`` or ``alpha``, a
        ``fraction`` outside [0, 1], a ``random_control`` that is not a bool, or a ``reward_fn`` that does not
        return a Tensor[B] of finite rewards (NaN rows, rows without a reward, are kept; all-NaN is refused).

    Example (with a backbone and a reward source, ``reward_fn`` decodes and judges:
    ``lambda z: xlard.sources.score(backbone.decode(state, z), source).joint``; here a toy reward, the mean of
    the latent's top-left 4x4 cells, where ``delta`` acts):
        >>> import torch
        >>> from xlard.explain import faithfulness
        >>> z0, delta = torch.zeros(2, 4, 16, 16), torch.zeros(2, 4, 16, 16)
        >>> delta[:, :, :4, :4] = 1.0
        >>> reward_fn = lambda z: z[:, :, :4, :4].mean(dim=(1, 2, 3))
        >>> res = faithfulness(reward_fn, z0, delta, fraction=0.2, generator=torch.Generator().manual_seed(0))
        >>> print(res.summary())
        top 20% LAM cells masked: reward 1.0000 -> 0.0000 (-100.0%), gain +1.0000, 100% of it lost (random cells: ...)
        >>> res.gain_lost
        tensor([1., 1.])
    """
    fn = "faithfulness"
    if not callable(reward_fn):
        raise TypeError(_err(fn, f"reward_fn must be callable, got {type(reward_fn).__name__}"))
    _check_tensor(fn, "z0", z0, (4,))
    _check_tensor(fn, "delta", delta, (4,))
    if z0.shape != delta.shape:
        raise ValueError(_err(fn, f"delta {tuple(delta.shape)} must have z0's shape {tuple(z0.shape)}"))
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(_err(fn, f"fraction must be a number in [0, 1], got {fraction!r}"))  # True masked all
    if isinstance(random_control, np.bool_):
        random_control = bool(random_control)
    if not isinstance(random_control, bool):  # "no" ran the control
        raise TypeError(_err(fn, f"random_control must be True or False, got {random_control!r}"))
    if not bool(torch.isfinite(delta).all()):
        raise ValueError(_err(fn, "delta has non-finite values; the LAM ranking is undefined"))
    if not bool(torch.isfinite(z0).all()):  # a NaN in z0 made that row's rewards and ratios NaN without a word
        raise ValueError(_err(fn, f"z0 has {int((~torch.isfinite(z0)).sum())} NaN or infinite value(s); the "
                                  "uncorrected latent must be finite"))
    if isinstance(alpha, torch.Tensor) and alpha.is_floating_point() and not bool(torch.isfinite(alpha).all()):
        raise ValueError(_err(fn, f"alpha holds {int((~torch.isfinite(alpha)).sum())} NaN or infinite value(s) "
                                  f"of {alpha.numel()}; each row's step size must be a finite number"))
    if isinstance(min_gain, bool) or not isinstance(min_gain, numbers.Real) or not math.isfinite(min_gain) \
            or min_gain < 0:
        raise ValueError(_err(fn, f"min_gain must be a finite number >= 0, got {min_gain!r}"))
    per_item = isinstance(generator, (list, tuple))
    if per_item:
        if len(generator) != z0.shape[0] or not all(isinstance(g, torch.Generator) for g in generator):
            raise TypeError(_err(fn, f"generator must be a torch.Generator, one per item ({z0.shape[0]}) or None, "
                                     f"got a sequence of {len(generator)}: "
                                     f"{sorted({type(g).__name__ for g in generator})}"))
        if any(g.device.type != "cpu" for g in generator):
            raise ValueError(_err(fn, "per-item generators must be CPU generators (the random cells are drawn on "
                                      "the CPU)"))
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(_err(fn, f"generator must be a torch.Generator or None, got {type(generator).__name__}"))
    with torch.no_grad():
        zc, lam = ops.residual_correction(z0, delta, alpha)
        mask = top_lam_mask(lam, float(fraction))
        keep = (~mask).unsqueeze(1).to(delta.dtype)
        zm, _ = ops.residual_correction(z0, delta * keep, alpha)
        before = _reward_vector(fn, reward_fn, z0, "uncorrected")
        after = _reward_vector(fn, reward_fn, zc, "corrected")
        masked = _reward_vector(fn, reward_fn, zm, "masked")
        gain = after - before
        ok = (gain.abs() >= min_gain) & (gain != 0)  # min_gain=0 divided a zero gain: NaN or +-inf
        nan = torch.full_like(gain, float("nan"))
        safe_gain = torch.where(ok, gain, torch.ones_like(gain))
        lost = torch.where(ok, (after - masked) / safe_gain, nan)
        rel_ok = after != 0
        relative = torch.where(rel_ok, (after - masked) / torch.where(rel_ok, after.abs(), torch.ones_like(after)), nan)
        random_reward = random_lost = None
        if random_control:
            b, h, w = lam.shape
            if per_item:  # each item's cells from its own stream
                scores = torch.stack([torch.rand(h * w, generator=g) for g in generator]).to(lam.device)
            else:
                scores = torch.rand((b, h * w), generator=generator, device="cpu").to(lam.device)
            random_mask = top_lam_mask(scores.reshape(b, h, w), float(fraction))
            zr, _ = ops.residual_correction(z0, delta * (~random_mask).unsqueeze(1).to(delta.dtype), alpha)
            random_reward = _reward_vector(fn, reward_fn, zr, "randomly masked")
            random_lost = torch.where(ok, (after - random_reward) / safe_gain, nan)
    return FaithfulnessResult(before, after, masked, random_reward, gain, lost, random_lost, relative,
                              mask, float(fraction), float(min_gain))
