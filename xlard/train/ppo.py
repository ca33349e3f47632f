"""The PPO arithmetic: pure tensor functions, no I/O, no globals.

Everything the update computes from rollout tensors lives here so that it can
be tested against values computed by hand (tests/test_train_ppo.py):
advantages (per-prompt groups or a value baseline), whitening from global
statistics, the log-probability reduction, the clipped surrogate with its
statistics, the value loss, the latent anchor, the joint reward, running
reward statistics, the learning-rate schedule, and the world-size-independent
assignment of rollouts to minibatches.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

__all__ = [
    "reduce_log_prob", "group_advantages", "whiten", "SurrogateStats", "clipped_surrogate", "value_loss",
    "anchor_penalty", "weighted_reward", "RunningStats", "lr_factor", "minibatch_layout", "pearson",
]


def _positive_int(owner: str, name: str, value) -> int:
    """``value`` as an int >= 1 (any integral number but a bool), or a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return int(value)


def reduce_log_prob(log_prob_sum: torch.Tensor, numel: int, reduction: str, action_block: int = 1) -> torch.Tensor:
    """The log-probability the PPO ratio uses.

    ``"sum"`` keeps the exact log-density of the policy's action (the ratio is
    then the true likelihood ratio, and a small change of the mean in every
    dimension adds up to a large log ratio); ``"mean"`` divides it by ``numel``
    = C*H*W, which is the per-dimension geometric mean of the ratio (what
    diffusion RL trainers that average over dimensions use).

    With ``action_block`` k > 1 the action is constant on k x k blocks: it has
    C*H*W / k^2 free dimensions, and the sum over C*H*W counts each block k^2
    times, so ``"sum"`` divides by k^2 (it was k^2 times the true log ratio);
    ``"mean"`` is the same either way.

    Args:
        log_prob_sum (Tensor[B]): log-densities summed over C*H*W.
        numel (int): C*H*W.
        reduction (str): ``"sum"`` or ``"mean"``.
        action_block (int): the corrector's ``action_block`` (default 1).

    Returns:
        Tensor[B] in the input's dtype.

    Raises:
        ValueError: an unknown reduction or a non-positive numel.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduce_log_prob: reduction must be 'sum' or 'mean', got {reduction!r}")
    numel = _positive_int("reduce_log_prob", "numel", numel)
    action_block = _positive_int("reduce_log_prob", "action_block", action_block)
    if reduction == "mean":
        return log_prob_sum / numel
    return log_prob_sum if action_block == 1 else log_prob_sum / action_block ** 2


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Reward minus the mean of its group (rows ``[g*G, (g+1)*G)`` share a z0).

    Args:
        rewards (Tensor[N]): N a multiple of ``group_size``.
        group_size (int): G >= 1.

    Returns:
        Tensor[N]: ``r_i - mean(r of i's group)`` (all zero for G = 1).

    Example:
        >>> group_advantages(torch.tensor([1., 3., 0., 4.]), 2)
        tensor([-1.,  1., -2.,  2.])
    """
    group_size = _positive_int("group_advantages", "group_size", group_size)
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"group_advantages: rewards must be [N] with N a multiple of group_size={group_size}, "
                         f"got {tuple(rewards.shape)}")
    r = rewards.view(-1, group_size)
    return (r - r.mean(dim=1, keepdim=True)).reshape(-1)


def whiten(values: torch.Tensor, total: torch.Tensor, total_sq: torch.Tensor, count: torch.Tensor | float,
           eps: float = 1e-8) -> torch.Tensor:
    """``(v - mean) / (std + eps)`` with mean and (population) std from given sums.

    The sums come from the whole global batch (all-reduced across processes), so
    the result does not depend on how the batch is split.

    Args:
        values (Tensor[N]): this process's values.
        total, total_sq (Tensor[]): sum and sum of squares over the global batch.
        count: number of values in the global batch.

    Returns:
        Tensor[N] in ``values``' dtype. The statistics are taken in float64: give the sums in float64
        (of the float64 values) so that equal values whiten to exactly 0 and a spread far below the mean
        keeps its scale (float32 sums lose it to cancellation).
    """
    # the statistics as Python floats (float64, on no device: MPS has no float64); equal values give a mean
    # equal to each of them, so the centred values are exactly 0
    count = float(count)
    mean = float(total) / count
    var = max(float(total_sq) / count - mean * mean, 0.0)
    return (values - mean) / (math.sqrt(var) + eps)


class SurrogateStats(NamedTuple):
    """Diagnostics of one clipped-surrogate evaluation (all detached scalars).

    Attributes:
        ratio_mean, ratio_max, ratio_min: of ``exp(new - old)``.
        log_ratio_mean, log_ratio_abs_max: of ``new - old``.
        approx_kl: ``mean((r - 1) - log r)`` (the non-negative k3 estimator of KL(old || new)).
        clip_fraction: share of rows where ``|r - 1| > clip``.
    """

    ratio_mean: torch.Tensor
    ratio_max: torch.Tensor
    ratio_min: torch.Tensor
    log_ratio_mean: torch.Tensor
    log_ratio_abs_max: torch.Tensor
    approx_kl: torch.Tensor
    clip_fraction: torch.Tensor


def clipped_surrogate(new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                      clip: float) -> tuple[torch.Tensor, torch.Tensor, SurrogateStats]:
    """PPO's clipped policy loss.

    ``loss = mean(max(-A r, -A clip(r, 1 - eps, 1 + eps)))`` with
    ``r = exp(new - old)``, computed in float32 or better.

    Args:
        new_log_prob (Tensor[N]): differentiable, already reduced (:func:`reduce_log_prob`).
        old_log_prob (Tensor[N]): from the rollout, same reduction.
        advantages (Tensor[N]): detached.
        clip (float): epsilon > 0.

    Returns:
        (loss [], ratio [N] detached, :class:`SurrogateStats`).
    """
    if not new_log_prob.shape == old_log_prob.shape == advantages.shape:
        raise ValueError(f"clipped_surrogate: shapes differ: new {tuple(new_log_prob.shape)}, old "
                         f"{tuple(old_log_prob.shape)}, advantages {tuple(advantages.shape)}")
    if isinstance(clip, bool) or not isinstance(clip, numbers.Real) or not (0.0 < float(clip) < math.inf):
        raise ValueError(f"clipped_surrogate: clip must be a finite number > 0, got {clip!r}")
    if not new_log_prob.numel():
        raise ValueError("clipped_surrogate: no rows (new_log_prob, old_log_prob and advantages are empty)")
    dt = torch.promote_types(new_log_prob.dtype, torch.float32)
    log_ratio = new_log_prob.to(dt) - old_log_prob.to(dt).detach()
    ratio = torch.exp(log_ratio)
    adv = advantages.to(dt).detach()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        lr = log_ratio.detach()
        r = ratio.detach()
        stats = SurrogateStats(
            ratio_mean=r.mean(), ratio_max=r.max(), ratio_min=r.min(), log_ratio_mean=lr.mean(),
            log_ratio_abs_max=lr.abs().max(), approx_kl=((r - 1.0) - lr).mean(),
            clip_fraction=((r - 1.0).abs() > clip).to(dt).mean())
    return loss, ratio.detach(), stats


def value_loss(values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``0.5 * mean((V - target)^2)``, the baseline's regression loss."""
    if values.shape != targets.shape:
        raise ValueError(f"value_loss: values {tuple(values.shape)} and targets {tuple(targets.shape)} differ")
    return 0.5 * (values.float() - targets.float().detach()).square().mean()


def anchor_penalty(zc: torch.Tensor, anchor: torch.Tensor, beta: float) -> torch.Tensor:
    """The latent anchor ``beta * mean over batch and C*H*W of (zc - anchor)^2``.

    Args:
        zc (Tensor[B, C, H, W]): the (differentiable) corrected latent.
        anchor (Tensor[B, C, H, W]): z0 or a verified reference latent (detached).
        beta (float): weight.
    """
    if zc.shape != anchor.shape:
        raise ValueError(f"anchor_penalty: zc {tuple(zc.shape)} and anchor {tuple(anchor.shape)} differ")
    return beta * (zc.float() - anchor.float().detach()).square().mean()


def weighted_reward(scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_k lambda_k r_k`` over aspects; NaN scores where the weight is 0 count as 0.

    Args:
        scores (Tensor[B, 3]): per-aspect rewards (NaN allowed where absent).
        weights (Tensor[B, 3]): lambda, 0 where absent.

    Returns:
        Tensor[B]; 0 for a prompt without any weighted aspect.
    """
    if scores.shape != weights.shape:
        raise ValueError(f"weighted_reward: scores {tuple(scores.shape)} and weights {tuple(weights.shape)} differ")
    present = weights != 0
    return (weights * torch.where(present, scores, torch.zeros_like(scores))).sum(-1)


class RunningStats:
    """Running mean and variance of a stream of scalars (Chan et al.'s parallel merge).

    Its state is three floats (count, mean, M2), saved in checkpoints. Batches
    from several processes are merged as one batch (the caller all-reduces the
    batch's count, sum and sum of squares first).
    """

    def __init__(self):
        self.count = 0.0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, count: float, total: float, total_sq: float) -> None:
        """Merge a batch given by its count, sum and sum of squares."""
        if count <= 0:
            return
        b_mean = total / count
        b_m2 = max(total_sq - count * b_mean * b_mean, 0.0)
        n = self.count + count
        delta = b_mean - self.mean
        self.mean += delta * count / n
        self.m2 += b_m2 + delta * delta * self.count * count / n
        self.count = n

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 0 else 1.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float) -> float:
    """The learning-rate multiplier at optimiser step ``step`` (0-based).

    Linear warmup over ``warmup_steps`` (from 1/warmup to 1), then ``"constant"``
    (1) or ``"cosine"`` from 1 down to ``min_ratio`` at step ``total_steps``: one past the last
    step of a run of ``total_steps`` steps, whose last step runs a little above the floor.

    Raises:
        ValueError: an unknown schedule.
    """
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"lr_factor: schedule must be 'cosine' or 'constant', got {schedule!r}")
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def minibatch_layout(global_index: torch.Tensor, minibatches: int, keys: torch.Tensor | None) -> list[torch.Tensor]:
    """Split this process's rows into minibatches, the same way for any world size.

    Global rows are cut into blocks of ``minibatches`` consecutive indices; each
    block gives exactly one row to each minibatch. With ``keys`` None row ``i``
    goes to minibatch ``i mod minibatches`` (the fixed layout of the first
    epoch, which the rollout's forward passes follow so that the first
    minibatch's ratio is exactly 1); otherwise the rows of a block go to
    minibatches in the order of their keys (a random permutation per block).
    Because a process holds whole blocks, the global minibatch ``k`` is the
    same set of rows whatever the number of processes.

    Args:
        global_index (int64 Tensor[n]): global row index of each local row,
            covering whole blocks.
        minibatches (int): K.
        keys (Tensor[>= max index + 1] or None): one random key per global row.

    Returns:
        K int64 tensors of local row positions (each of length n / K), sorted.
    """
    minibatches = _positive_int("minibatch_layout", "minibatches", minibatches)
    n = global_index.numel()
    if n % minibatches:
        raise ValueError(f"minibatch_layout: {n} local rows do not split into {minibatches} minibatches")
    block = global_index // minibatches
    if keys is None:
        slot = global_index % minibatches
    else:
        order = torch.argsort(block.double() * 4.0 + keys[global_index].double(), stable=True)
        slot = torch.empty_like(global_index)
        slot[order] = torch.arange(n, dtype=global_index.dtype) % minibatches
    return [torch.nonzero(slot == k).flatten() for k in range(minibatches)]


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two 1-D tensors; NaN with fewer than 3 pairs or zero variance."""
    x, y = x.double().flatten(), y.double().flatten()
    keep = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[keep], y[keep]
    if x.numel() < 3:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    den = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / den) if den > 0 else float("nan")
