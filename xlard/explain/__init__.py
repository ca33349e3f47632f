"""Explanations: the Latent Activation Map, overlays, PNGs, faithfulness and HTML reports (docs/method.md).

One concern per module; every public name is importable from ``xlard.explain``:

- :mod:`~xlard.explain.lam`: :func:`latent_activation_map` is ``sum_c |Delta|``
  over the corrector's output (through :func:`xlard.ops.residual_correction`,
  the same number the trainer logs); :func:`normalize_lam` scales it per image
  to [0, 1]; :func:`upsample_lam` maps the latent grid onto the image grid;
  :func:`top_lam_mask` picks each image's strongest cells.
- :mod:`~xlard.explain.colormaps`: :data:`COLORMAPS`, :func:`colormap_table`,
  :func:`apply_colormap` and :func:`overlay`, which blends the colored LAM over
  an image with the LAM value scaling the opacity.
- :mod:`~xlard.explain.png`: :func:`png_bytes`, :func:`save_png`,
  :func:`read_png` (Pillow).
- :mod:`~xlard.explain.faithfulness`: :func:`faithfulness` zeroes Delta at the
  top LAM cells and measures how much of the reward gain is lost, with a
  random-mask control of the same size.
- :mod:`~xlard.explain.report`: :class:`ReportItem` (plain data: prompt,
  images, LAM, aspect scores, explanation sentences) and :func:`report_items`,
  which builds items from an :class:`xlard.rewards.RewardResult` by duck typing.
- :mod:`~xlard.explain.html_report`: :func:`render_html_report` and
  :func:`write_html_report`, one self-contained HTML file for a batch (images
  inline as base64 PNG data URIs, inline CSS, no script, no external asset).

Files are written atomically (a temporary file in the same folder, then
``os.replace``): a reader never sees half a file.

Example (a tiny untrained corrector, and random images and entity maps standing in for a backbone's
decoded images and a reward source's maps):
    >>> import os, tempfile, torch
    >>> from xlard.explain import overlay, report_items, save_png, write_html_report
    >>> from xlard.models import CorrectorConfig, ResidualCorrector
    >>> from xlard.prompts import parse
    >>> from xlard.rewards import ExplainableRewards
    >>> corrector = ResidualCorrector(CorrectorConfig.tiny())   # or ResidualCorrector.from_pretrained(folder)
    >>> z0, tokens, pooled = torch.randn(2, 4, 16, 16), torch.randn(2, 8, 32), torch.randn(2, 32)
    >>> zc, delta, log_prob, lam = corrector.sample(z0, tokens, pooled)
    >>> images_before, images_after = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)   # z0, zc decoded
    >>> prompts = ["two circles", "a square above a circle"]
    >>> specs, cmd = [parse(p) for p in prompts], ExplainableRewards()
    >>> rewards_before = cmd(specs, entity_maps=torch.rand(2, 2, 64, 64))
    >>> rewards_after = cmd(specs, entity_maps=torch.rand(2, 2, 64, 64))
    >>> out = tempfile.mkdtemp()
    >>> save_png(os.path.join(out, "overlay.png"), overlay(images_after[0], lam[0]))
    >>> items = report_items(prompts, rewards_after, before=images_before,
    ...                      after=images_after, lam=lam, rewards_before=rewards_before)
    >>> write_html_report(os.path.join(out, "report.html"), items, title="xLARD on my prompts")
    >>> sorted(os.listdir(out))
    ['overlay.png', 'report.html']
"""
from __future__ import annotations

from xlard.explain.colormaps import COLORMAPS, apply_colormap, colormap_table, overlay
from xlard.explain.faithfulness import FaithfulnessResult, faithfulness
from xlard.explain.html_report import render_html_report, write_html_report
from xlard.explain.lam import latent_activation_map, normalize_lam, top_lam_mask, upsample_lam
from xlard.explain.png import png_bytes, read_png, save_png
from xlard.explain.report import ASPECT_NAMES, ReportItem, report_items

__all__ = [
    "ASPECT_NAMES",
    "COLORMAPS",
    "latent_activation_map",
    "normalize_lam",
    "upsample_lam",
    "apply_colormap",
    "colormap_table",
    "overlay",
    "save_png",
    "read_png",
    "png_bytes",
    "FaithfulnessResult",
    "faithfulness",
    "top_lam_mask",
    "ReportItem",
    "report_items",
    "render_html_report",
    "write_html_report",
]
