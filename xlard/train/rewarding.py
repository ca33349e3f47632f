"""The one place the trainer gets its reward function from.

:func:`build_reward_fn` turns ``cfg.reward`` and the backbone into a callable
``Decoded -> RewardResult`` (the CMD rewards with their ``present`` mask) through
the reward-source interface (:mod:`xlard.sources`): ``"auto"`` takes the
backbone's default source (the understanding model on the shapes backbone, the
backbone's cross-attention elsewhere). The rewards are read with the source's
own :meth:`~xlard.sources.RewardSource.reward_config`. The exact evaluator is
never a reward source.
"""
from __future__ import annotations

import os
from typing import Any, Callable

from xlard import sources
from xlard.backbones.base import Decoded
from xlard.rewards import ExplainableRewards, RewardResult

__all__ = ["build_reward_fn", "resolve_source_name", "source_backbone_options"]

_FORBIDDEN = ("evaluator", "exact", "geneval")


def resolve_source_name(settings, backbone: Any) -> str:
    """The source name a run uses: ``settings.source``, with ``"auto"`` resolved for ``backbone``.

    Args:
        settings (RewardSettings): the run's reward settings.
        backbone: a loaded backbone or its name (``"shapes"``, a folder, a hub id).

    Raises:
        ValueError: the name asks for the exact evaluator.
    """
    name = settings.source.strip().lower()
    if any(word in name for word in _FORBIDDEN):
        raise ValueError(f"reward.source {settings.source!r}: the exact evaluator is never a training reward "
                         "(it is logged as a metric only)")
    if name != "auto" and name not in sources.SOURCES:  # named as the config's key, not get_source's argument
        raise ValueError(f"train config reward.source: unknown source {settings.source!r}; expected 'auto' or one "
                         f"of {sources.SOURCES}")
    return sources.default_source_for(backbone) if name == "auto" else name


def source_backbone_options(settings, backbone_name: str) -> dict[str, Any]:
    """``DiffusersBackbone.from_pretrained`` options the run's source wants (capture off when it reads images only)."""
    name = resolve_source_name(settings, backbone_name)
    classes = {"attention": sources.AttentionSource, "shapes": sources.ShapesSource, "clip": sources.ClipSource}
    return {} if classes[name].needs_attention else {"capture": False}


def check_reward_settings(settings, backbone: Any) -> str:
    """The source name a run uses (:func:`resolve_source_name`), once its name and ``reward.options`` are known
    to be usable; cheap (nothing loads), so callers run it before any work.

    Raises:
        ValueError: the exact evaluator, an unknown source, or options the source does not take (named as the
            config's key: options written for another source, e.g. after ``--set reward.source=``); a clip
            source without a model, or whose model's config is not a CLIP model's.
        FileNotFoundError: a clip source's model folder is missing, or its hub id cannot be loaded.
    """
    name = resolve_source_name(settings, backbone)
    unknown = sorted(set(settings.options) - set(sources.source_options(name)))
    if unknown:
        raise ValueError(f"train config reward.options: {unknown} are not options of the {name!r} source; it takes "
                         f"{sorted(sources.source_options(name))}")
    shapes_model = settings.options.get("model") if name == "shapes" else None
    if isinstance(shapes_model, (str, os.PathLike)):  # a clip recipe's model left in after --set reward.source=shapes
        raise ValueError(f"train config reward.options.model: the 'shapes' source takes a loaded model there, got "
                         f"{str(shapes_model)!r}; give a weights folder as reward.options.path (model: is the "
                         "'clip' source's CLIP checkpoint)")
    if name == "clip":
        model = settings.options.get("model")
        if model is None:
            raise ValueError("train config reward.options.model: the 'clip' source reads a CLIP model; give its hub "
                             "id or folder (e.g. reward.options: {model: openai/clip-vit-base-patch16})")
        from xlard.color_features import check_clip_model, clip_dtype

        clip_dtype("train config reward.options.dtype", settings.options.get("dtype"))  # before the backbone loads
        if "threshold" in settings.options:
            sources.check_clip_threshold("train config reward.options", settings.options["threshold"])
        if isinstance(model, (str, os.PathLike)):  # its config only: a missing or uncached model fails now
            check_clip_model("train config reward.options.model", model)
    return name


def build_reward_fn(settings, backbone) -> Callable[..., RewardResult]:
    """The reward function of a run.

    Args:
        settings (RewardSettings): ``source``, ``options``, ``bind_color``.
        backbone: the run's backbone (sources may need its tokenizer or device).

    Returns:
        ``fn(decoded, explain=False) -> RewardResult``, with ``fn.source_name`` and ``fn.source``.

    Raises:
        ValueError: a source name that cannot be honoured (unknown, the exact
            evaluator, options the source does not take).
    """
    name = check_reward_settings(settings, backbone)
    source = sources.get_source(name, backbone=backbone, **dict(settings.options))
    overrides = {} if settings.bind_color is None else {"bind_color": settings.bind_color}
    rewards = ExplainableRewards(source.reward_config(**overrides))

    def via_source(decoded: Decoded, explain: bool = False) -> RewardResult:
        return sources.score(decoded, source, rewards, explain=explain)

    via_source.source_name = name  # type: ignore[attr-defined]
    via_source.source = source  # type: ignore[attr-defined]
    return via_source
