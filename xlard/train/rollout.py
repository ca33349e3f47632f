"""Rollouts: encode a batch of items, sample G corrections per z0, and the policy module PPO differentiates.

- :func:`encode_items` runs the frozen backbone up to the correction point for
  a batch, each item repeated ``group_size`` times (same prompt, same seed, so
  the same z0), so that one decode call serves the whole rollout batch.
- :func:`sample_rollouts` draws the corrections with
  :func:`xlard.ops.sample_correction`, computing the policy's forward passes in
  the minibatches of the first PPO epoch so that the update's first minibatch
  reproduces the rollout's log-probabilities bit for bit.
- :class:`PolicyStep` is the module DistributedDataParallel wraps: one trunk
  pass giving the policy mean, the value and (for an action) its log-density.
"""
from __future__ import annotations

import hashlib
from typing import NamedTuple, Sequence

import torch
from torch import nn

from xlard import ops as xops

__all__ = ["derived_generator", "encode_items", "PromptInputs", "prompt_inputs", "Rollouts", "sample_rollouts",
           "PolicyStep"]


def derived_generator(seed: int, *parts) -> torch.Generator:
    """A CPU generator seeded from the run's seed and a path (step, purpose, ...).

    Every random draw of the trainer comes from one of these, so a draw depends
    on (seed, step, purpose) only: not on the process count, nor on what ran
    before a resume.
    """
    digest = hashlib.sha256(repr((int(seed),) + tuple(parts)).encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def encode_items(backbone, items: Sequence, group_size: int):
    """Encode ``items`` (each repeated ``group_size`` times, adjacent) with their own seeds."""
    specs, seeds = [], []
    for item in items:
        spec = item.spec()
        specs += [spec] * group_size
        seeds += [int(item.seed)] * group_size
    return backbone.encode(specs, seed=seeds)


class PromptInputs(NamedTuple):
    """The corrector's inputs of a state, float32 on the trainer's device, and the prompts' aspect mask."""

    z0: torch.Tensor
    text_tokens: torch.Tensor
    pooled: torch.Tensor
    text_mask: torch.Tensor
    aspect_mask: torch.Tensor


def prompt_inputs(state, device) -> PromptInputs:
    """Float32 corrector inputs from a :class:`xlard.backbones.BackboneState`."""
    emb = state.prompt_embedding
    mask = torch.tensor([spec.aspect_mask() for spec in state.specs], dtype=torch.bool, device=device)
    return PromptInputs(state.z0.to(device, torch.float32), emb.tokens.to(device, torch.float32),
                        emb.pooled.to(device, torch.float32), emb.mask.to(device), mask)


class Rollouts(NamedTuple):
    """One process's rollout batch (rows in item-major, sample-minor order).

    Attributes:
        zc, delta (Tensor[n, C, H, W] float32): corrected latents and actions.
        log_prob (Tensor[n] float32): the action's log-density summed over C*H*W,
            computed by :meth:`ResidualCorrector.log_prob` (the update's function).
        value (Tensor[n] float32): the value head's baseline.
        lam (Tensor[n, H, W] float32): the Latent Activation Maps ``sum_c |delta|``.
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
    was_training = corrector.training
    corrector.eval()
    n = inputs.z0.shape[0]
    zc = torch.empty_like(inputs.z0)
    delta = torch.empty_like(inputs.z0)
    log_prob = torch.empty(n, dtype=torch.float32, device=inputs.z0.device)
    value = torch.empty_like(log_prob)
    lam = torch.empty((n,) + tuple(inputs.z0.shape[2:]), dtype=torch.float32, device=inputs.z0.device)
    log_std = corrector.log_std.detach().float()
    alpha = corrector.config.alpha
    for rows in layout:
        mean, v, _ = policy(inputs.z0[rows], inputs.text_tokens[rows], inputs.pooled[rows], inputs.text_mask[rows])
        z, d, _, l = xops.sample_correction(inputs.z0[rows], mean, log_std, noise[rows].to(mean.device), alpha)
        zc[rows], delta[rows], value[rows], lam[rows] = z, d, v, l
        # The update recomputes log-probs with gaussian_log_prob; the fused op's own sum
        # differs in the last bits, so the rollout stores the update's function's value.
        log_prob[rows] = corrector.log_prob(d, mean)
    corrector.train(was_training)
    return Rollouts(zc, delta, log_prob, value, lam)
