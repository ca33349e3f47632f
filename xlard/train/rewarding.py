"""The one place the trainer gets its reward function from.

:func:`build_reward_fn` turns ``cfg.reward`` and the backbone into a callable
``Decoded -> RewardResult`` (the CMD rewards with their ``present`` mask).
When :mod:`xlard.sources` exists (the reward-source interface), every source
name goes through ``get_source`` / ``score``; without it the trainer supports
the ``"attention"`` source: the backbone's own cross-attention for count and
position and the weight-free pixel color encoder for color. The exact
evaluator is never a reward source.
"""
from __future__ import annotations

import importlib
from typing import Callable

from xlard.backbones.base import Decoded
from xlard.rewards import ExplainableRewards, RewardConfig, RewardResult

__all__ = ["build_reward_fn", "have_sources"]

_FORBIDDEN = ("evaluator", "exact", "geneval")


def have_sources():
    """The :mod:`xlard.sources` module, or None when this install does not have it."""
    try:
        return importlib.import_module("xlard.sources")
    except ModuleNotFoundError as e:
        if e.name not in ("xlard.sources",):
            raise
        return None


def build_reward_fn(settings, backbone) -> Callable[[Decoded], RewardResult]:
    """The reward function of a run.

    Args:
        settings (RewardSettings): ``source``, ``options``, ``bind_color``.
        backbone: the run's backbone (sources may need its tokenizer or device).

    Returns:
        ``fn(decoded, explain=False) -> RewardResult``.

    Raises:
        ValueError: a source name that cannot be honoured here (unknown, the
            exact evaluator, or options without a source module that takes them).
    """
    name = settings.source.strip().lower()
    if any(word in name for word in _FORBIDDEN):
        raise ValueError(f"reward.source {settings.source!r}: the exact evaluator is never a training reward "
                         "(it is logged as a metric only)")
    rewards = ExplainableRewards(RewardConfig(bind_color=settings.bind_color))
    sources = have_sources()
    if sources is not None:
        if name == "auto":
            default = getattr(sources, "default_source_name", None)
            name = default(backbone) if callable(default) else "attention"
        source = sources.get_source(name, backbone=backbone, **dict(settings.options))

        def via_source(decoded: Decoded, explain: bool = False) -> RewardResult:
            return sources.score(decoded, source, rewards, explain=explain)

        via_source.source_name = name  # type: ignore[attr-defined]
        return via_source
    if name not in ("auto", "attention"):
        raise ValueError(f"reward.source {settings.source!r} needs xlard.sources, which this install does not have; "
                         "available here: 'auto' or 'attention'")
    if settings.options:
        raise ValueError(f"reward.options {dict(settings.options)} cannot be honoured: the 'attention' source "
                         "takes no options without xlard.sources")
    if getattr(backbone, "_capture_factory", True) is None:
        raise ValueError("reward.source 'attention' needs the backbone's attention capture (it is off)")
    from xlard.color_features import PixelColorEncoder

    if getattr(backbone, "color_encoder", None) is None:
        rewards = ExplainableRewards(RewardConfig(bind_color=settings.bind_color), color_encoder=PixelColorEncoder())

    def via_attention(decoded: Decoded, explain: bool = False) -> RewardResult:
        return rewards(**decoded.reward_inputs(), explain=explain)

    via_attention.source_name = "attention"  # type: ignore[attr-defined]
    return via_attention
