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

from xlard._args import is_finite_real, show

__all__ = [
    "reduce_log_prob", "group_advantages", "whiten", "SurrogateStats", "clipped_surrogate", "value_loss",
    "anchor_penalty", "weighted_reward", "RunningStats", "lr_factor", "minibatch_layout", "pearson",
]


def _positive_int(owner: str, name: str, value) -> int:
    """``value`` as an int >= 1 (any integral number but a bool), or a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return int(value)


def _float_tensor(owner: str, name: str, value) -> None:
    """A ValueError naming ``value`` unless it is a floating tensor (a list failed deep inside torch, an int
    tensor as "mean(): could not infer output dtype")."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        what = (f"{str(value.dtype).replace('torch.', '')} tensor of shape {tuple(value.shape)}"
                if isinstance(value, torch.Tensor) else type(value).__name__)
        raise ValueError(f"{owner}: {name} must be a float tensor, got {what}")


def _finite_number(owner: str, name: str, value, low: float = -math.inf, high: float = math.inf) -> float:
    if not is_finite_real(value) or not low <= float(value) <= high:  # is_finite_real: 10**400 too
        bounds = f" in [{low:g}, {high:g}]" if (low, high) != (-math.inf, math.inf) else ""
        raise ValueError(f"{owner}: {name} must be a finite number{bounds}, got {show(value)}")
    return float(value)


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
    _float_tensor("reduce_log_prob", "log_prob_sum", log_prob_sum)
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
    _float_tensor("group_advantages", "rewards", rewards)
    if not bool(torch.isfinite(rewards).all()):  # one NaN reward made its whole group's advantages NaN
        raise ValueError("group_advantages: rewards hold NaN or infinite values")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"group_advantages: rewards must be [N] with N a multiple of group_size={group_size}, "
                         f"got {tuple(rewards.shape)}")
    # in float64: a float32 mean of G equal rewards is often one ulp off (G = 6, 8), and whitening a batch of
    # tied groups then turned that rounding noise into advantages of unit size
    r = rewards.view(-1, group_size)
    r64 = r.double()
    return (r64 - r64.mean(dim=1, keepdim=True)).to(rewards.dtype).reshape(-1)


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
    if not count > 0 or not math.isfinite(count):  # 0 was a ZeroDivisionError, -1 scaled by 1e8
        raise ValueError(f"whiten: count must be the number of values in the global batch (> 0), got {count!r}")
    mean = float(total) / count
    var = max(float(total_sq) / count - mean * mean, 0.0)
    return (values - mean) / (math.sqrt(var) + eps)


#: The log ratio :func:`clipped_surrogate` holds a row at before ``exp`` (float32's exp overflows near 88.7).
MAX_LOG_RATIO = 20.0


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
    ``r = exp(min(new - old, 20))``, computed in float32 or better. The log
    ratio is held at 20 (a ratio of 4.9e8, far outside any clip range) before
    ``exp``: beyond about 88 it overflowed float32, and the row's infinite
    ratio made the whole minibatch's gradient NaN. A row held there gets no
    gradient; the statistics report the true log ratio.

    Args:
        new_log_prob (Tensor[N]): differentiable, already reduced (:func:`reduce_log_prob`).
        old_log_prob (Tensor[N]): from the rollout, same reduction.
        advantages (Tensor[N]): detached.
        clip (float): epsilon > 0.

    Returns:
        (loss [], ratio [N] detached, :class:`SurrogateStats`).
    """
    for name, value in (("new_log_prob", new_log_prob), ("old_log_prob", old_log_prob), ("advantages", advantages)):
        _float_tensor("clipped_surrogate", name, value)
    if not new_log_prob.shape == old_log_prob.shape == advantages.shape:
        raise ValueError(f"clipped_surrogate: shapes differ: new {tuple(new_log_prob.shape)}, old "
                         f"{tuple(old_log_prob.shape)}, advantages {tuple(advantages.shape)}")
    if isinstance(clip, bool) or not isinstance(clip, numbers.Real) or not (0.0 < float(clip) < math.inf):
        raise ValueError(f"clipped_surrogate: clip must be a finite number > 0, got {clip!r}")
    if not new_log_prob.numel():
        raise ValueError("clipped_surrogate: no rows (new_log_prob, old_log_prob and advantages are empty)")
    dt = torch.promote_types(new_log_prob.dtype, torch.float32)
    log_ratio = new_log_prob.to(dt) - old_log_prob.to(dt).detach()
    ratio = torch.exp(log_ratio.clamp(max=MAX_LOG_RATIO))
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
    _float_tensor("value_loss", "values", values)
    _float_tensor("value_loss", "targets", targets)
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
    _float_tensor("anchor_penalty", "zc", zc)
    _float_tensor("anchor_penalty", "anchor", anchor)
    if zc.shape != anchor.shape:
        raise ValueError(f"anchor_penalty: zc {tuple(zc.shape)} and anchor {tuple(anchor.shape)} differ")
    beta = _finite_number("anchor_penalty", "beta", beta, 0.0)  # a negative beta rewarded drifting away
    return beta * (zc.float() - anchor.float().detach()).square().mean()


def weighted_reward(scores: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_k lambda_k r_k`` over aspects; NaN scores where the weight is 0 count as 0.

    Args:
        scores (Tensor[B, 3]): per-aspect rewards (NaN allowed where absent).
        weights (Tensor[B, 3]): lambda, 0 where absent.

    Returns:
        Tensor[B]; 0 for a prompt without any weighted aspect.
    """
    _float_tensor("weighted_reward", "scores", scores)
    _float_tensor("weighted_reward", "weights", weights)
    if scores.shape != weights.shape:
        raise ValueError(f"weighted_reward: scores {tuple(scores.shape)} and weights {tuple(weights.shape)} differ")
    present = weights != 0  # not scanned for NaN (it runs inside every loss; the trainer stops on non-finite weights)
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
        """Merge a batch given by its count, sum and sum of squares (finite numbers; a NaN poisoned the state
        of every later step)."""
        for name, value in (("count", count), ("total", total), ("total_sq", total_sq)):
            _finite_number("RunningStats.update", name, value, 0.0 if name != "total" else -math.inf)
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
        if not isinstance(state, dict) or any(k not in state for k in ("count", "mean", "m2")):
            raise ValueError(f"RunningStats.load_state_dict: expected {{'count', 'mean', 'm2'}} (state_dict()'s "
                             f"keys), got {sorted(state) if isinstance(state, dict) else type(state).__name__}")
        owner = "RunningStats.load_state_dict"
        self.count = _finite_number(owner, "count", state["count"], 0.0)
        self.mean = _finite_number(owner, "mean", state["mean"])
        self.m2 = _finite_number(owner, "m2", state["m2"], 0.0)


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
    for name, value, low in (("step", step, 0), ("total_steps", total_steps, 0), ("warmup_steps", warmup_steps, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"lr_factor: {name} must be an int >= {low}, got {value!r}")
    min_ratio = _finite_number("lr_factor", "min_ratio", min_ratio, 0.0, 1.0)  # 2.0 made the cosine rise
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
    if not isinstance(global_index, torch.Tensor) or global_index.dtype != torch.int64:
        raise ValueError(f"minibatch_layout: global_index must be an int64 tensor, got "
                         f"{getattr(global_index, 'dtype', type(global_index).__name__)}")
    n = global_index.numel()
    if keys is not None and n and (not isinstance(keys, torch.Tensor) or keys.dim() != 1
                                   or keys.numel() <= int(global_index.max())):
        raise ValueError(f"minibatch_layout: keys must be a 1-D tensor with one key per global row (at least "
                         f"{int(global_index.max()) + 1}), got {getattr(keys, 'shape', type(keys).__name__)}")
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
    for name, value in (("x", x), ("y", y)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"pearson: {name} must be a tensor, got {type(value).__name__}")
    if x.numel() != y.numel():
        raise ValueError(f"pearson: x and y must pair up, got {x.numel()} and {y.numel()} values")
    x, y = x.double().flatten(), y.double().flatten()
    keep = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[keep], y[keep]
    if x.numel() < 3:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    den = (x.square().sum() * y.square().sum()).sqrt()
    return float((x * y).sum() / den) if den > 0 else float("nan")
