"""Report items: the plain data one prompt contributes to a report, built from reward results by duck typing."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from xlard.explain._validate import _err
from xlard.vocab import ASPECTS

#: The reward aspects, in :data:`xlard.vocab.ASPECTS` order.
ASPECT_NAMES = ASPECTS


def _sentence(item) -> str:
    """A readable sentence from a string or an explanation object (text(), .text, .sentence, str())."""
    if isinstance(item, str):
        return item
    for attr in ("text", "sentence"):
        value = getattr(item, attr, None)
        if callable(value):
            try:
                value = value()
            except TypeError:
                continue
        if isinstance(value, str):
            return value
    return str(item)


def _score(value, unit: bool = True) -> float | None:
    """A score as a float (None: absent); ``unit``: a reward, which lies in [0, 1] (a 7.5 or an inf was drawn
    as "7.500" under a footer that says scores are in [0, 1])."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(_err("ReportItem", f"a score must be a scalar, got shape {tuple(value.shape)}"))
        value = value.item()
    value = float(value)
    if math.isnan(value):
        return None
    if unit and not -1e-6 <= value <= 1 + 1e-6:
        raise ValueError(_err("ReportItem", f"a score (reward) must lie in [0, 1] (NaN or None: absent), got {value}"))
    if not unit and not math.isfinite(value):
        raise ValueError(_err("ReportItem", f"a weight must be finite, got {value}"))
    return value


@dataclass
class ReportItem:
    """One prompt's row in the HTML report: plain data only.

    Attributes:
        prompt: the prompt text (escaped when rendered).
        before, after (Tensor[3, H, W], optional): decoded images, float in
            [0, 1] or uint8, without / with the correction.
        lam (Tensor[h, w], optional): the LAM on the latent grid; drawn alone
            and over ``after`` (over ``before`` if there is no ``after``).
        scores: aspect -> reward after correction; None or NaN = the aspect is
            absent (not asked by the prompt).
        scores_before: aspect -> reward before correction, optional.
        explanations: aspect -> sentences; or a plain sequence of sentences
            (shown under "notes"). Sentences may be strings or explanation
            objects (rendered with ``text()``, ``.text``, ``.sentence`` or ``str()``).
        explanations_before: the same, before correction, optional (shown under each aspect's sentences).
        joint, joint_before: the joint reward after / before, optional.
        weights: aspect -> lambda of the joint reward, optional.
        label: a short tag shown next to the item number (seed, id, ...).
    """

    prompt: str
    before: Any = None
    after: Any = None
    lam: torch.Tensor | None = None
    scores: Mapping[str, Any] = field(default_factory=dict)
    scores_before: Mapping[str, Any] | None = None
    explanations: Mapping[str, Sequence[Any]] | Sequence[Any] = field(default_factory=dict)
    explanations_before: Mapping[str, Sequence[Any]] | Sequence[Any] | None = None
    joint: Any = None
    joint_before: Any = None
    weights: Mapping[str, Any] | None = None
    label: str = ""


def report_items(
    prompts: Sequence[str],
    rewards: Any = None,
    before: Any = None,
    after: Any = None,
    lam: torch.Tensor | None = None,
    rewards_before: Any = None,
    labels: Sequence[str] | None = None,
) -> list[ReportItem]:
    """Build :class:`ReportItem` s from a batch and reward results.

    ``rewards`` is read by duck typing, so any object with these attributes
    works: ``scores`` (Tensor[B, 3], NaN where absent), optional ``present``
    (bool [B, 3]), ``joint`` (Tensor[B]), ``weights`` (Tensor[B, 3]) and
    ``explanations`` (per item an object with ``counts``, ``colors`` and
    ``relations`` sequences of explanation objects), as
    :class:`xlard.rewards.RewardResult` has.

    Args:
        prompts: B prompt strings.
        rewards: reward result after correction, optional.
        before, after (Tensor[B, 3, H, W] or sequences of Tensor[3, H, W]): images.
        lam (Tensor[B, h, w]): LAMs.
        rewards_before: reward result before correction, optional.
        labels: B short tags, optional.

    Returns:
        list[ReportItem], one per prompt.

    Example (entity maps given directly to the CMD; a reward source makes them from the images):
        >>> import os, tempfile, torch
        >>> from xlard.explain import report_items, write_html_report
        >>> from xlard.prompts import parse
        >>> from xlard.rewards import ExplainableRewards
        >>> prompts = ["two circles"]
        >>> maps = torch.zeros(1, 1, 32, 32)
        >>> maps[0, 0, 4:12, 4:12] = maps[0, 0, 20:28, 20:28] = 1.0   # two blobs: two circles found
        >>> res = ExplainableRewards()([parse(p) for p in prompts], entity_maps=maps)
        >>> x0, xc, lam = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64), torch.rand(1, 16, 16)
        >>> items = report_items(prompts, res, before=x0, after=xc, lam=lam)
        >>> items[0].scores, items[0].joint
        ({'count': 1.0, 'color': nan, 'position': nan}, 1.0)
        >>> write_html_report(os.path.join(tempfile.mkdtemp(), "r.html"), items)
    """
    fn = "report_items"
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) \
            or not all(isinstance(q, str) for q in prompts):
        raise TypeError(_err(fn, f"prompts must be a sequence of prompt strings (one per image), got "
                                 f"{type(prompts).__name__}"
                                 + (" (one prompt? pass [prompt])" if isinstance(prompts, str) else "")))
    n = len(prompts)

    def check_batch(seq, name, dims, what):
        """``seq`` is None, a Tensor of ``dims`` dimensions, or a (non-string) sequence, with n rows."""
        if seq is None:
            return
        if isinstance(seq, torch.Tensor):
            if seq.dim() != dims:
                raise ValueError(_err(fn, f"{name} must be {what}, got a tensor of shape {tuple(seq.shape)}"))
        elif isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
            raise TypeError(_err(fn, f"{name} must be {what} or a sequence of one entry per prompt, got "
                                     f"{type(seq).__name__}"))
        if len(seq) != n:
            raise ValueError(_err(fn, f"{name} has {len(seq)} items, expected {n} (one per prompt)"))

    check_batch(before, "before", 4, "a Tensor[B, 3, H, W]")
    check_batch(after, "after", 4, "a Tensor[B, 3, H, W]")
    check_batch(lam, "lam", 3, "a Tensor[B, h, w]")
    check_batch(labels, "labels", 1, "a Tensor[B]")

    def pick(seq, i, name):
        if seq is None:
            return None
        if len(seq) != n:
            raise ValueError(_err(fn, f"{name} has {len(seq)} items, expected {n} (one per prompt)"))
        return seq[i]

    def check_result(result, name):
        if result is None:
            return
        fields = {a: getattr(result, a, None) for a in ("scores", "present", "joint", "weights", "explanations")}
        if all(v is None for v in fields.values()):
            raise TypeError(_err(fn, f"{name} must be a reward result (an xlard.rewards.RewardResult, or any object "
                                     f"with scores / joint / explanations), got {type(result).__name__}"))
        for field, value in fields.items():
            if value is None:
                continue
            try:
                rows = len(value)
            except TypeError:
                raise TypeError(_err(fn, f"{name}.{field} must hold one row per prompt, got "
                                         f"{type(value).__name__}")) from None
            if rows != n:
                raise ValueError(_err(fn, f"{name}.{field} has {rows} rows, expected {n} (one per prompt): the "
                                          f"rewards of another batch?"))
            if field == "explanations":
                continue
            want = (n,) if field == "joint" else (n, len(ASPECT_NAMES))
            shape = tuple(getattr(value, "shape", ()))
            if not hasattr(value, "shape") or shape != want:  # indexed [i] / [i, k] below
                raise ValueError(_err(fn, f"{name}.{field} must be a tensor of shape {list(want)} (one row per "
                                          f"prompt{'' if field == 'joint' else ', one column per aspect ' + str(ASPECT_NAMES)}), "
                                          f"got {list(shape) if hasattr(value, 'shape') else type(value).__name__}"))

    check_result(rewards, "rewards")
    check_result(rewards_before, "rewards_before")

    def aspect_scores(result, i):
        if result is None or getattr(result, "scores", None) is None:
            return {}
        scores = result.scores
        present = getattr(result, "present", None)
        out = {}
        for k, aspect in enumerate(ASPECT_NAMES):
            value = float(scores[i, k])
            if present is not None and not bool(present[i, k]):
                value = float("nan")
            out[aspect] = value
        return out

    def sentences(result, i):
        exps = getattr(result, "explanations", None) if result is not None else None
        if exps is None:
            return {}
        e = exps[i]
        parts = {aspect: tuple(getattr(e, attr, ()) or ()) for aspect, attr in
                 (("count", "counts"), ("color", "colors"), ("position", "relations"))}
        if not any(parts.values()) and not any(hasattr(e, a) for a in ("counts", "colors", "relations")):
            return [e]  # an unknown explanation object: one sentence
        return parts

    def joint_of(result, i):
        joint = getattr(result, "joint", None) if result is not None else None
        return None if joint is None else float(joint[i])

    items = []
    for i, prompt in enumerate(prompts):
        weights = getattr(rewards, "weights", None) if rewards is not None else None
        items.append(ReportItem(
            prompt=str(prompt),
            before=pick(before, i, "before"),
            after=pick(after, i, "after"),
            lam=pick(lam, i, "lam"),
            scores=aspect_scores(rewards, i),
            scores_before=aspect_scores(rewards_before, i) if rewards_before is not None else None,
            explanations=sentences(rewards, i),
            explanations_before=sentences(rewards_before, i) if rewards_before is not None else None,
            joint=joint_of(rewards, i),
            joint_before=joint_of(rewards_before, i),
            weights=None if weights is None else {a: float(weights[i, k]) for k, a in enumerate(ASPECT_NAMES)},
            label=str(pick(labels, i, "labels")) if labels is not None else "",
        ))
    return items
