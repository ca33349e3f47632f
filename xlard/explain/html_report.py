"""The self-contained HTML report: one card per prompt, images inline as base64 PNGs, inline CSS, no script."""
from __future__ import annotations

import base64
import html
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from xlard.explain._files import _atomic_write
from xlard.explain._validate import _as_image, _check_tensor, _err

#: Control characters HTML calls parse errors (C0 but tab, line feed, form feed, carriage return; DEL; C1): shown
#: as U+FFFD.
_CONTROLS = {c: "\ufffd" for c in [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), *range(0x7F, 0xA0)]}


def _esc(text: str) -> str:
    """Escaped text for the page; a NUL went in raw (invalid in HTML), and other control characters still did."""
    return html.escape(str(text)).translate(_CONTROLS)
from xlard.explain.colormaps import apply_colormap, colormap_table, overlay
from xlard.explain.lam import normalize_lam, upsample_lam
from xlard.explain.png import png_bytes
from xlard.explain.report import ASPECT_NAMES, ReportItem, _score, _sentence


_CSS = """
:root { --ink:#1d2230; --muted:#667085; --line:#e4e7ec; --card:#ffffff; --bg:#f4f5f8;
        --accent:#b8421d; --good:#1f8a5b; --bad:#c4372b; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
       font:15px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "DejaVu Sans", sans-serif; }
main { max-width:1180px; margin:0 auto; padding:28px 24px 48px; }
header.top h1 { font-size:24px; margin:0 0 4px; letter-spacing:-0.01em; }
header.top p { margin:0; color:var(--muted); }
.summary { display:flex; flex-wrap:wrap; gap:10px; margin:18px 0 6px; }
.stat { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:10px 14px; min-width:130px; }
.stat .k { font-size:12px; text-transform:uppercase; letter-spacing:.06em; color:var(--muted); }
.stat .v { font-size:20px; font-weight:600; font-variant-numeric:tabular-nums; }
.summary-note { margin:0 0 10px; font-size:12px; color:var(--muted); }
.legend { display:flex; align-items:center; gap:10px; color:var(--muted); font-size:13px; margin:10px 0 20px; }
.legend .bar { width:220px; height:12px; border-radius:6px; border:1px solid var(--line); }
article.item { background:var(--card); border:1px solid var(--line); border-radius:14px;
               padding:18px 20px 20px; margin:0 0 22px; box-shadow:0 1px 2px rgba(16,24,40,.04); }
.item-head { display:flex; align-items:flex-start; gap:14px; margin-bottom:14px; }
.item-head .num { flex:none; font-weight:600; color:var(--muted); font-variant-numeric:tabular-nums; padding-top:2px; }
.item-head .prompt { flex:1; font-size:18px; font-weight:600; overflow-wrap:anywhere; }
.item-head .tag { display:inline-block; margin-left:8px; font-size:12px; font-weight:500; color:var(--muted);
                  background:var(--bg); border-radius:6px; padding:1px 7px; vertical-align:middle;
                  overflow-wrap:anywhere; }
.joint { flex:none; text-align:right; }
.joint .k { font-size:12px; text-transform:uppercase; letter-spacing:.06em; color:var(--muted); }
.joint .v { font-size:24px; font-weight:700; font-variant-numeric:tabular-nums; }
.delta { font-size:13px; font-weight:600; font-variant-numeric:tabular-nums; margin-left:6px; }
.delta.up { color:var(--good); } .delta.down { color:var(--bad); } .delta.flat { color:var(--muted); }
.figs { display:grid; grid-template-columns:repeat(4, minmax(0, 1fr)); gap:14px; margin-bottom:16px; }
@media (max-width: 760px) { .figs { grid-template-columns:repeat(2, minmax(0, 1fr)); } }
figure { margin:0; }
figure img { display:block; width:100%; height:auto; aspect-ratio:auto; border-radius:8px;
             border:1px solid var(--line); background:#fafafa; }
figure img.small { image-rendering:pixelated; }
figcaption { font-size:13px; color:var(--muted); margin-top:6px; }
figcaption b { color:var(--ink); font-weight:600; }
table.aspects { width:100%; border-collapse:collapse; }
table.aspects th { text-align:left; font-size:12px; text-transform:uppercase; letter-spacing:.06em;
                   color:var(--muted); font-weight:600; padding:6px 10px; border-bottom:1px solid var(--line); }
table.aspects td { padding:9px 10px; border-bottom:1px solid var(--line); vertical-align:top; }
table.aspects tr:last-child td { border-bottom:none; }
td.aspect { width:100px; font-weight:600; text-transform:capitalize; }
td.score { width:210px; font-variant-numeric:tabular-nums; white-space:nowrap; }
.meter { display:inline-block; width:90px; height:8px; background:#eef0f4; border-radius:4px;
         overflow:hidden; vertical-align:middle; margin-right:8px; }
.meter span { display:block; height:100%; background:var(--accent); border-radius:4px; }
td.why { overflow-wrap:anywhere; } td.why ul { margin:0; padding-left:18px; } td.why li { margin:1px 0; }
td.why .was { color:var(--muted); margin-top:3px; } td.why .was ul { margin:0; }
tr.absent td { color:var(--muted); } tr.absent td.aspect { font-weight:500; }
.weight { color:var(--muted); font-size:12px; margin-left:4px; }
.notes { margin:12px 0 0; padding-left:18px; color:var(--ink); }
.none { color:var(--muted); font-style:italic; }
section.extra { background:var(--card); border:1px solid var(--line); border-radius:14px; padding:14px 20px;
                margin:0 0 18px; overflow-x:auto; }
section.extra h2 { font-size:17px; margin:0 0 10px; }
section.extra table { border-collapse:collapse; font-variant-numeric:tabular-nums; }
section.extra th, section.extra td { padding:5px 10px; border-bottom:1px solid var(--line); text-align:right; }
section.extra th:first-child, section.extra td:first-child { text-align:left; }
section.extra img { max-width:100%; height:auto; }
footer { color:var(--muted); font-size:12px; margin-top:26px; }
"""


def _fmt(value: float | None) -> str:
    return "&ndash;" if value is None else f"{value:.3f}"


def _delta_html(after: float | None, before: float | None) -> str:
    if after is None or before is None:
        return ""
    d = after - before
    cls = "up" if d > 5e-4 else "down" if d < -5e-4 else "flat"
    text = f"{d:+.3f}"
    if text in ("-0.000", "+0.000"):  # an unchanged score read "-0.000"
        text = "&plusmn;0.000"
    return f'<span class="delta {cls}" title="change from before correction">{text}</span>'


def _img_tag(image, alt: str) -> tuple[str, tuple[int, int]]:
    data = base64.b64encode(png_bytes(image)).decode("ascii")
    x = _as_image("write_html_report", alt, image, batched_ok=False)
    h, w = int(x.shape[-2]), int(x.shape[-1])
    small = ' class="small"' if max(h, w) <= 256 else ""
    return (f'<img{small} alt="{html.escape(alt)}" width="{w}" height="{h}" '
            f'src="data:image/png;base64,{data}">'), (h, w)


def _figure(image, caption: str, alt: str, show_size: bool = True) -> str:
    tag, (h, w) = _img_tag(image, alt)
    size = f" <span>{w}&times;{h}</span>" if show_size else ""
    return f"<figure>{tag}<figcaption>{caption}{size}</figcaption></figure>"


def _explanation_parts(explanations) -> tuple[dict[str, list[str]], list[str]]:
    if explanations is None:
        return {}, []
    if isinstance(explanations, Mapping):
        by_aspect = {str(k): [_sentence(s) for s in (v if isinstance(v, (list, tuple)) else [v])]
                     for k, v in explanations.items()}
        return by_aspect, []
    if isinstance(explanations, (str, bytes)):
        return {}, [_sentence(explanations)]
    return {}, [_sentence(s) for s in explanations]


def _item_html(index: int, item: ReportItem, colormap) -> str:
    if not isinstance(item, ReportItem):
        raise TypeError(_err("write_html_report", f"items must be ReportItem (or dicts of its fields), "
                                                  f"got {type(item).__name__} at index {index}"))
    esc = _esc

    parts = ['<article class="item">']
    # the joint reward is a weighted sum: in [0, 1] with normalized weights, not always
    joint, joint_before = _score(item.joint, unit=False), _score(item.joint_before, unit=False)
    tag = f'<span class="tag"><bdi>{esc(item.label)}</bdi></span>' if item.label else ""
    joint_html = ""
    if item.joint is not None or item.scores:
        joint_html = (f'<div class="joint"><div class="k">joint reward</div>'
                      f'<div class="v">{_fmt(joint)}{_delta_html(joint, joint_before)}</div></div>')
    parts.append(f'<div class="item-head"><div class="num">#{index + 1}</div>'
                 # <bdi>: a right-to-left override in a prompt no longer reverses the label after it
                 f'<div class="prompt">&ldquo;<bdi>{esc(item.prompt)}</bdi>&rdquo;{tag}</div>{joint_html}</div>')

    figs = []
    if item.before is not None:
        figs.append(_figure(item.before, "<b>Before</b> correction", "before correction"))
    if item.after is not None:
        figs.append(_figure(item.after, "<b>After</b> correction", "after correction"))
    if item.lam is not None:
        lam = item.lam
        _check_tensor("write_html_report", "lam", lam, (2,))
        base = item.after if item.after is not None else item.before
        # (in float64 for a float64 map, as normalize_lam scales it: 1e-50 read "all zero", 1e300 "max inf")
        finite = lam.detach().to(torch.float64 if lam.dtype == torch.float64 else torch.float32)
        finite = finite[torch.isfinite(finite)]
        peak = finite.max().item() if finite.numel() else 0.0
        if base is not None:
            img = _as_image("write_html_report", "image", base, batched_ok=False)
            size = (img.shape[-2], img.shape[-1])
        else:
            scale = max(1, 256 // max(lam.shape))
            size = (lam.shape[0] * scale, lam.shape[1] * scale)
        heat = apply_colormap(upsample_lam(normalize_lam(lam), size), colormap)
        peak_text = f"max {peak:.3g}" if peak > 0 else "all zero: no correction"
        figs.append(_figure(heat, f"<b>LAM</b> {lam.shape[1]}&times;{lam.shape[0]} latent, {peak_text}",  # w x h, as the images
                            "latent activation map", show_size=False))
        if base is not None:
            figs.append(_figure(overlay(base, lam, colormap), "<b>LAM over "
                                + ("after" if item.after is not None else "before") + "</b>", "LAM overlay"))
    if figs:
        parts.append('<div class="figs">' + "".join(figs) + "</div>")

    by_aspect, notes = _explanation_parts(item.explanations)
    was_by_aspect, was_notes = _explanation_parts(item.explanations_before) \
        if item.explanations_before is not None else ({}, [])

    def was(sentences_before, sentences_after) -> str:  # what the rewards said before correction, when it differs
        if not sentences_before or list(sentences_before) == list(sentences_after):
            return ""
        return ('<div class="was">before: <ul>' + "".join(f"<li>{esc(s)}</li>" for s in sentences_before)
                + "</ul></div>")
    aspects = list(ASPECT_NAMES) + [a for a in list(item.scores) + list(by_aspect) if a not in ASPECT_NAMES]
    aspects = list(dict.fromkeys(aspects))
    if item.scores or by_aspect:
        rows = []
        for aspect in aspects:
            if aspect not in item.scores and aspect not in by_aspect:
                continue
            score = _score(item.scores.get(aspect))
            before = _score(item.scores_before.get(aspect)) if item.scores_before else None
            sentences = by_aspect.get(aspect, [])
            weight = _score(item.weights.get(aspect), unit=False) if item.weights else None
            weight_html = f'<span class="weight">&lambda; {weight:.2f}</span>' if weight else ""
            if score is None:
                why = ("<ul>" + "".join(f"<li>{esc(s)}</li>" for s in sentences) + "</ul>") if sentences else \
                    '<span class="none">not scored: the prompt does not ask for it, or the reward was set not ' \
                    'to score it</span>'
                rows.append(f'<tr class="absent"><td class="aspect">{esc(aspect)}</td>'
                            f'<td class="score">absent</td><td class="why">{why}</td></tr>')
                continue
            width = max(0.0, min(1.0, score)) * 100
            why = ("<ul>" + "".join(f"<li>{esc(s)}</li>" for s in sentences) + "</ul>") if sentences else \
                '<span class="none">no explanation given</span>'
            why += was(was_by_aspect.get(aspect, []), sentences)
            rows.append(f'<tr><td class="aspect">{esc(aspect)}</td><td class="score">'
                        f'<span class="meter"><span style="width:{width:.1f}%"></span></span>{score:.3f}'
                        f'{_delta_html(score, before)}{weight_html}</td><td class="why">{why}</td></tr>')
        parts.append('<table class="aspects"><thead><tr><th>Aspect</th><th>Score</th><th>Why</th></tr></thead>'
                     "<tbody>" + "".join(rows) + "</tbody></table>")
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{esc(s)}</li>" for s in notes) + "</ul>"
                     + was(was_notes, notes))
    parts.append("</article>")
    return "".join(parts)


def _legend(colormap) -> str:
    table = colormap_table(colormap, 9)
    stops = ", ".join(f"rgb({int(round(r * 255))},{int(round(g * 255))},{int(round(b * 255))}) {i * 12.5:.1f}%"
                      for i, (r, g, b) in enumerate(table.tolist()))
    return (f'<div class="legend"><span>LAM = &Sigma;<sub>c</sub>|&Delta;| per latent cell, per image:</span>'
            f'<span>none</span><span class="bar" style="background:linear-gradient(90deg, {stops})"></span>'
            f"<span>most</span></div>")


def _summary(items: Sequence[ReportItem]) -> str:
    """Counts and means of the cards shown (not of a whole run: the demo shows a dozen of its pairs, picked fixed
    first, and "prompts 12" beside 996 images read as the run's), as the rewards scored them."""
    stats = [("cards", str(len(items)))]
    for key in ("joint",) + ASPECT_NAMES:
        values = [_score(it.joint, unit=False) if key == "joint" else _score(it.scores.get(key)) for it in items]
        values = [v for v in values if v is not None]
        if values:
            stats.append((f"mean {key}", f"{sum(values) / len(values):.3f}"))
    return ('<div class="summary">' + "".join(
        f'<div class="stat"><div class="k">{html.escape(k)}</div><div class="v">{v}</div></div>'
        for k, v in stats) + "</div>" + '<p class="summary-note">Means over the cards below, as the rewards scored '
            "them (the corrected images), not over a whole run.</p>")


def _sections_html(fn: str, sections) -> str:
    if sections is None:
        return ""
    if isinstance(sections, (str, bytes)) or not isinstance(sections, Sequence):
        raise TypeError(_err(fn, f"sections must be a sequence of (heading, html) pairs, got {type(sections).__name__}"))
    parts = []
    for i, pair in enumerate(sections):
        if not (isinstance(pair, Sequence) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise TypeError(_err(fn, f"sections[{i}] must be a (heading, html) pair of strings, got {pair!r:.80}"))
        heading, body = pair
        parts.append(f'<section class="extra"><h2>{_esc(heading)}</h2>{body}</section>')
    return "".join(parts)


def _check_numbers(fn: str, i: int, item: ReportItem) -> None:
    """Scores, weights and joint rewards are numbers (None or NaN: absent); anything else failed deep in the
    rendering ("could not convert string to float") without naming the item or the field."""
    def number(value) -> bool:
        if value is None:
            return True
        if isinstance(value, torch.Tensor):
            return value.numel() == 1 and not value.dtype.is_complex
        return isinstance(value, numbers.Real) and not isinstance(value, bool)

    for name in ("scores", "scores_before", "weights"):
        table = getattr(item, name)
        if table is None and name != "scores":
            continue
        if not isinstance(table, Mapping):
            raise TypeError(_err(fn, f"item {i}: {name} must map aspect names to numbers, got "
                                     f"{type(table).__name__}"))
        for aspect, value in table.items():
            if not number(value):
                raise TypeError(_err(fn, f"item {i}: {name}[{aspect!r}] must be a number (None or NaN for an "
                                         f"absent aspect), got {value!r}"))
        for aspect in table:
            if not isinstance(aspect, str):
                raise TypeError(_err(fn, f"item {i}: {name} keys must be aspect names (str), got {aspect!r}"))
    for name in ("joint", "joint_before"):
        if not number(getattr(item, name)):
            raise TypeError(_err(fn, f"item {i}: {name} must be a number or None, got {getattr(item, name)!r}"))
    if not isinstance(item.prompt, str):
        raise TypeError(_err(fn, f"item {i}: prompt must be a str, got {type(item.prompt).__name__}"))
    if item.label is not None and not isinstance(item.label, str):
        raise TypeError(_err(fn, f"item {i}: label must be a str or None, got {type(item.label).__name__}"))
    for name in ("explanations", "explanations_before"):
        value = getattr(item, name)
        if value is None:
            continue
        ok = isinstance(value, (str, list, tuple)) or (isinstance(value, Mapping)
                                                        and all(isinstance(k, str) for k in value))
        if not ok:
            raise TypeError(_err(fn, f"item {i}: {name} must be a sentence, a list of sentences, or a mapping "
                                     f"of aspect names (str) to sentences, got {type(value).__name__} "
                                     f"{str(value)[:80]!r}"))
    lam = item.lam
    if lam is not None:
        if not isinstance(lam, torch.Tensor) or lam.dim() != 2 or not lam.is_floating_point():
            raise TypeError(_err(fn, f"item {i}: lam must be a floating-point tensor [h, w], got "
                                     f"{tuple(lam.shape) if isinstance(lam, torch.Tensor) else type(lam).__name__}"
                                     f"{' ' + str(lam.dtype) if isinstance(lam, torch.Tensor) else ''}"))
        if lam.numel() == 0:
            raise ValueError(_err(fn, f"item {i}: lam has an empty grid {tuple(lam.shape)}"))
        if lam.is_meta or not bool(torch.isfinite(lam.detach()).any()):
            raise ValueError(_err(fn, f"item {i}: lam has no finite value (shape {tuple(lam.shape)}): a diverged "
                                      f"correction, not an empty one"))
        bad = int((~torch.isfinite(lam.detach())).sum())
        if bad:  # one inf cell was drawn as "no change" under a caption of the finite cells' maximum
            raise ValueError(_err(fn, f"item {i}: lam has {bad} NaN or infinite cell(s) of {lam.numel()} (shape "
                                      f"{tuple(lam.shape)}): a diverged correction, drawn as no change there"))


def render_html_report(items: Sequence[ReportItem | Mapping[str, Any]], title: str = "xLARD report",
                       colormap: str | torch.Tensor = "ember", sections=None) -> str:
    """The HTML text of a report (see :func:`write_html_report`)."""
    fn = "render_html_report"
    extra = _sections_html(fn, sections)
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise TypeError(_err(fn, f"items must be a sequence of ReportItem, got {type(items).__name__}"))
    normal = []
    for i, it in enumerate(items):
        if isinstance(it, Mapping):
            try:
                it = ReportItem(**it)
            except TypeError as exc:
                raise TypeError(_err(fn, f"item {i}: {exc}")) from exc
        if not isinstance(it, ReportItem):
            raise TypeError(_err(fn, f"item {i} must be a ReportItem or a dict of its fields, got "
                                     f"{type(it).__name__}"))
        _check_numbers(fn, i, it)
        normal.append(it)
    esc_title = _esc(title)
    cards = []
    for i, it in enumerate(normal):
        try:
            cards.append(_item_html(i, it, colormap))
        except (TypeError, ValueError) as exc:  # an image or map of this item: say which
            raise type(exc)(_err(fn, f"item {i}: {exc}")) from exc
    body = "".join(cards)
    if not normal:
        body = '<p class="none">No items.</p>'
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc_title}</title><style>{_CSS}</style></head><body><main>"
            f'<header class="top"><h1>{esc_title}</h1><p>Each prompt: the image before and after the '
            "latent correction, where the corrector acted (the Latent Activation Map), and each reward "
            "aspect with its score and explanation.</p></header>"
            f"{_summary(normal)}{extra}{_legend(colormap)}{body}"
            "<footer>Generated by xlard.explain. Scores in [0, 1]; an absent aspect is one that was not scored "
            "(the prompt does not ask for it, or the reward was set not to score it). LAM panels are normalized per image; the caption gives the raw maximum."
            "</footer></main></body></html>\n")


def write_html_report(path: str | os.PathLike, items: Sequence[ReportItem | Mapping[str, Any]],
                      title: str = "xLARD report", colormap: str | torch.Tensor = "ember", sections=None) -> None:
    """Write a self-contained HTML report for a batch, atomically.

    One card per item: the prompt, the before / after images, the LAM alone
    and over the corrected image, each aspect's score (with the change from
    before, if given) and its explanation sentences, the joint reward. Images
    are inline base64 PNG data URIs and the CSS is inline: the file has no
    external reference and no script, so it can be mailed or archived as is.
    All text is HTML-escaped.

    Args:
        path: the ``.html`` file to write; its folder is created if needed.
        items: :class:`ReportItem` s, or dicts of their fields (see :func:`report_items`).
        title (str): the page title.
        colormap: for the LAM panels.
        sections: optional ``(heading, html)`` pairs shown above the cards (a
            results table, training curves); the heading is escaped, the body is
            the caller's HTML, inserted as given.

    Raises:
        ImportError: Pillow is not installed.
        TypeError, ValueError: malformed items (the message names the item).

    Example:
        >>> import os, tempfile, torch
        >>> from xlard.explain import ReportItem, write_html_report
        >>> x0, xc, lam = torch.rand(3, 64, 64), torch.rand(3, 64, 64), torch.rand(16, 16)   # images, LAM
        >>> path = os.path.join(tempfile.mkdtemp(), "report.html")
        >>> write_html_report(path, [ReportItem("two red apples", before=x0, after=xc,
        ...     lam=lam, scores={"count": 0.9, "color": 0.8}, explanations={"count": ["asked for 2 apples, found 2"]})])
        >>> with open(path) as f:
        ...     f.read(15)
        '<!DOCTYPE html>'
    """
    # errors="replace": a lone surrogate (from a surrogate-escaped file name or argv) becomes "?", not a crash
    _atomic_write(path, render_html_report(items, title, colormap, sections).encode("utf-8", errors="replace"))
