"""Rollouts: encode a batch of items, sample G corrections per z0, and the policy module PPO differentiates.

- :func:`encode_items` runs the frozen backbone up to the correction point for
  a batch of items, once per item; :func:`prompt_inputs` repeats each item's
  z0 and e_p ``group_size`` times (item-major rows), and
  :func:`decode_groups` decodes the G samples of every item with G decode calls
  on the same state, so encoding never repeats work.
- :func:`sample_rollouts` draws the corrections with
  :func:`xlard.ops.sample_correction`, computing the policy's forward passes in
  the minibatches of the first PPO epoch so that the update's first minibatch
  reproduces the rollout's log-probabilities bit for bit.
- :class:`PolicyStep` is the module DistributedDataParallel wraps: one trunk
  pass giving the policy mean, the value and (for an action) its log-density.
"""
from __future__ import annotations

import hashlib
import numbers
from typing import NamedTuple, Sequence

import torch
from torch import nn

from xlard import ops as xops
from xlard.models import corrector_inputs

__all__ = ["derived_generator", "encode_items", "decode_groups", "GroupResult", "PromptInputs", "prompt_inputs",
           "Rollouts", "sample_rollouts", "PolicyStep"]


def derived_generator(seed: int, *parts) -> torch.Generator:
    """A CPU generator seeded from the run's seed and a path (step, purpose, ...).

    Every random draw of the trainer comes from one of these, so a draw depends
    on (seed, step, purpose) only: not on the process count, nor on what ran
    before a resume.
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"derived_generator: seed must be an int, got {seed!r}")
    digest = hashlib.sha256(repr((int(seed),) + tuple(parts)).encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def encode_items(backbone, items: Sequence):
    """Encode ``items`` with their own seeds (one generator per item, so a z0 does not depend on the batch)."""
    return backbone.encode([item.spec() for item in items], seed=[int(item.seed) for item in items])


class GroupResult(NamedTuple):
    """The reward fields the trainer uses, for item-major rollout rows (``scores`` NaN where absent)."""

    scores: torch.Tensor
    present: torch.Tensor
    joint: torch.Tensor


def decode_groups(backbone, reward_fn, state, z: torch.Tensor, group_size: int, timer=None):
    """Decode and score ``z`` (rows item-major: item i's sample g at ``i * G + g``) with G decode calls.

    Args:
        backbone: the backbone that encoded ``state`` (one row per item).
        reward_fn: ``Decoded -> RewardResult``.
        state: the items' :class:`BackboneState`.
        z (Tensor[items * G, C, H, W]): latents to decode.
        group_size: G.
        timer: optional ``timer(phase)`` context factory ("decode", "reward").

    Returns:
        (list of the G :class:`Decoded`, :class:`GroupResult` in row order).
    """
    from contextlib import nullcontext

    span = timer if timer is not None else (lambda phase: nullcontext())
    n = state.z0.shape[0]
    if z.shape[0] != n * group_size:
        raise ValueError(f"decode_groups: z has {z.shape[0]} rows, expected items x G = {n} x {group_size}")
    decoded, parts = [], []
    for g in range(group_size):
        rows = torch.arange(n, device=z.device) * group_size + g
        with span("decode"):
            d = backbone.decode(state, z[rows].to(state.z0.device, state.z0.dtype))
        with span("reward"):
            r = reward_fn(d)
        decoded.append(d)
        parts.append(r)
    order = torch.argsort(torch.cat([torch.arange(n) * group_size + g for g in range(group_size)]))

    def gather(name):
        return torch.cat([getattr(r, name).detach().cpu() for r in parts])[order]

    scores, present = gather("scores").float(), gather("present")
    bad = present.bool() & ~torch.isfinite(scores)
    if bad.any():  # NaN means "absent" in the rewards' contract: a present one would poison every advantage
        from xlard.vocab import ASPECTS

        row, aspect = (int(i) for i in torch.nonzero(bad)[0])
        name = getattr(reward_fn, "source_name", None) or type(reward_fn).__name__
        raise ValueError(f"decode_groups: the reward source {name!r} gave a non-finite {ASPECTS[aspect]} score "
                         f"({float(scores[row, aspect])}) for row {row} where that aspect is present "
                         f"({int(bad.sum())} such score(s) in this batch): the source is broken, not the run")
    return decoded, GroupResult(scores, present, gather("joint").float())


class PromptInputs(NamedTuple):
    """A state's inputs, float32 on the trainer's device: the prompt embedding (what R_phi reads), the
    prompts' aspect mask, and the corrector's own prompt inputs (``corrector_*``: the same tensors for a
    ``"text"`` corrector, the parsed fields' tokens for a ``"fields"`` one; :func:`xlard.models.corrector_inputs`)."""

    z0: torch.Tensor
    text_tokens: torch.Tensor
    pooled: torch.Tensor
    text_mask: torch.Tensor
    aspect_mask: torch.Tensor
    corrector_tokens: torch.Tensor
    corrector_pooled: torch.Tensor
    corrector_mask: torch.Tensor

    def for_corrector(self, rows=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(text_tokens, pooled, text_mask)`` as the corrector takes them, optionally of ``rows`` only."""
        parts = (self.corrector_tokens, self.corrector_pooled, self.corrector_mask)
        return parts if rows is None else tuple(t[rows] for t in parts)


def prompt_inputs(state, device, group_size: int = 1, corrector=None) -> PromptInputs:
    """Float32 inputs from a :class:`xlard.backbones.BackboneState`, each row repeated ``group_size`` times.

    ``corrector`` (optional): whose ``config.conditioning`` picks the ``corrector_*`` fields
    (default: the prompt embedding, as for a ``"text"`` corrector).
    """
    emb = state.prompt_embedding
    mask = torch.tensor([spec.aspect_mask() for spec in state.specs], dtype=torch.bool, device=device)
    own = corrector_inputs(corrector, emb, state.specs)
    parts = (state.z0.to(device, torch.float32), emb.tokens.to(device, torch.float32),
             emb.pooled.to(device, torch.float32), emb.mask.to(device), mask,
             own["text_tokens"].to(device, torch.float32), own["pooled"].to(device, torch.float32),
             own["text_mask"].to(device))
    return PromptInputs(*(t.repeat_interleave(group_size, dim=0) if group_size > 1 else t for t in parts))


class Rollouts(NamedTuple):
    """One process's rollout batch (rows in item-major, sample-minor order).

    Attributes:
        zc, delta (Tensor[n, C, H, W] float32): corrected latents and actions.
        log_prob (Tensor[n] float32): the action's log-density summed over C*H*W,
            computed by :meth:`ResidualCorrector.log_prob` (the update's function).
        value (Tensor[n] float32): the value head's baseline.
        lam (Tensor[n, H, W] float32): the Latent Activation Maps ``sum_c |Delta|`` of the corrector's mean
            (not of the sampled action: its noise is exploration, not where the corrector acts).
    """

    zc: torch.Tensor
    delta: torch.Tensor
    log_prob: torch.Tensor
    value: torch.Tensor
    lam: torch.Tensor


class PolicyStep(nn.Module):
    """``forward(z0, text_tokens, pooled, text_mask, delta=None) -> (mean, value, log_prob_sum or None)``."""

    def __init__(self, corrector):
        super().__init__()
        self.corrector = corrector

    def forward(self, z0, text_tokens, pooled, text_mask, delta=None):
        dist, value = self.corrector.policy_and_value(z0, text_tokens, pooled, text_mask)
        log_prob = None if delta is None else self.corrector.log_prob(delta, dist.mean)
        return dist.mean, value, log_prob


@torch.no_grad()
def sample_rollouts(policy: PolicyStep, inputs: PromptInputs, noise: torch.Tensor,
                    layout: Sequence[torch.Tensor]) -> Rollouts:
    """Sample one correction per row: ``delta ~ N(mean, std^2)``, ``zc = z0 + alpha * delta``.

    Args:
        policy: the (unwrapped) :class:`PolicyStep`.
        inputs: this process's rows.
        noise (Tensor[n, C, H, W]): standard normal draws, one per row.
        layout: the first epoch's minibatches (local row indices); the forward
            passes run over exactly these row sets.

    Returns:
        :class:`Rollouts`.
    """
    corrector = policy.corrector
    n = inputs.z0.shape[0]
    covered = torch.cat([torch.as_tensor(r, dtype=torch.int64).flatten().cpu() for r in layout]) if len(layout) \
        else torch.zeros(0, dtype=torch.int64)
    if covered.numel() != n or not torch.equal(covered.sort().values, torch.arange(n)):
        # rows left out would come back as uninitialised memory
        raise ValueError(f"sample_rollouts: layout must cover each of the {n} rows exactly once, got "
                         f"{covered.numel()} row indices ({len(covered.unique())} distinct)")
    zc = torch.empty_like(inputs.z0)
    delta = torch.empty_like(inputs.z0)
    log_prob = torch.empty(n, dtype=torch.float32, device=inputs.z0.device)
    value = torch.empty_like(log_prob)
    lam = torch.empty((n,) + tuple(inputs.z0.shape[2:]), dtype=torch.float32, device=inputs.z0.device)
    log_std = corrector.log_std.detach().float()
    alpha = corrector.config.alpha
    training = [module for module in corrector.modules() if module.training]
    corrector.eval()
    try:  # each submodule's own mode back afterwards, also when a pass raises
        for rows in layout:
            mean, v, _ = policy(inputs.z0[rows], *inputs.for_corrector(rows))
            eps = corrector.action_noise(noise[rows].to(mean.device))
            z, d, _, _ = xops.sample_correction(inputs.z0[rows], mean, log_std, eps, alpha)
            # the LAM of the corrector's Delta (the mean), the op xlard.explain draws it with: the sampled
            # action's map is mostly exploration noise (a zero corrector's logged lam/mean was 1.3, not 0)
            zc[rows], delta[rows], value[rows] = z, d, v
            lam[rows] = xops.residual_correction(inputs.z0[rows], mean, 0.0)[1]
            # The update recomputes log-probs with gaussian_log_prob; the fused op's own sum
            # differs in the last bits, so the rollout stores the update's function's value.
            log_prob[rows] = corrector.log_prob(d, mean)
    finally:
        for module in training:
            module.training = True
    return Rollouts(zc, delta, log_prob, value, lam)
