"""Run logging: JSONL metrics, optional TensorBoard, and a training-curve PNG drawn with Pillow.

Used only by the trainer (rank 0). The JSONL file has one object per step;
on resume, rows after the checkpoint's step are dropped so that a resumed run's
file equals an uninterrupted one's.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from xlard import _io

__all__ = ["MetricsLog", "draw_curves", "draw_distill_curves", "distill_curve_rows", "TIMING_PREFIX", "CURVE_KEYS"]

#: Keys under this prefix are wall-clock timings (they differ between identical runs).
TIMING_PREFIX = "time/"


class MetricsLog:
    """Appends one JSON object per step to ``metrics.jsonl``; mirrors scalars to TensorBoard when asked.

    ``rows`` holds, per row written (and per row kept on resume), only its :data:`CURVE_KEYS` columns: what the
    training curve draws; :meth:`read` gives the whole rows back from the file.

    Args:
        folder: the run folder.
        tensorboard: ``"auto"`` (when installed), ``"on"`` (fail when not), ``"off"``.
        resume_step: keep only rows with ``step <= resume_step`` (None: start a new file).

    Raises:
        ValueError: ``tensorboard="on"`` without TensorBoard installed, or another value than the three.
    """

    def __init__(self, folder: str | os.PathLike, tensorboard: str = "auto", resume_step: int | None = None):
        self.path = Path(folder) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        self.lost_steps: list[int] = []  # steps up to ``resume_step`` whose rows a damaged line lost
        if resume_step is not None and self.path.exists():
            rows = [r for r in self.read(self.path) if r.get("step", -1) <= resume_step]
            # Every step's row is on disk before that step's checkpoint, so a step up to the checkpoint without
            # its row lost it to damage (a cut last line), not to a crash: said, not dropped without a word.
            steps = {r["step"] for r in rows if isinstance(r.get("step"), int)}
            lost = sorted(set(range(min(steps, default=1), resume_step + 1)) - steps)
            if lost:
                shown = ", ".join(map(str, lost[:10])) + (f" and {len(lost) - 10} more" if len(lost) > 10 else "")
                print(f"note: {self.path} lacks the rows of step {shown}, up to the checkpoint resumed from (a "
                      "damaged line); the run goes on without them (metrics.jsonl and the curve skip them)",
                      file=sys.stderr, flush=True)
            self.lost_steps = lost
        _io.atomic_write_text(self.path, "".join(_io.dumps(r) + "\n" for r in rows), owner="xlard train metrics")
        # Only the columns the training curve draws stay in memory (a full row is about 5 KB: 500 MB over a
        # 100,000-step run); metrics.jsonl holds every row whole.
        self.rows = [_curve_row(r) for r in rows]
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard not in ("auto", "on", "off"):
            raise ValueError(f"MetricsLog: tensorboard must be 'auto', 'on' or 'off', got {tensorboard!r}")
        if tensorboard != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter
                # a resumed run drops the event points past its checkpoint, as metrics.jsonl drops the rows
                purge = {} if resume_step is None else {"purge_step": int(resume_step) + 1}
                self._tb = SummaryWriter(str(Path(folder) / "tensorboard"), **purge)
            except ImportError:
                if tensorboard == "on":
                    raise ValueError("log.tensorboard='on' but TensorBoard is not installed "
                                     "(pip install tensorboard, or set log.tensorboard: auto)") from None

    @staticmethod
    def read(path: str | os.PathLike) -> list[dict]:
        """The rows of a metrics file (a torn last line from a crash is skipped).

        Raises:
            ValueError: a damaged line before the last (a resume dropped such rows without a word), naming the
                file and the line.
        """
        rows = []
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().split("\n")
        last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            elif i != last:
                raise ValueError(f"{path} line {i + 1} is not a metrics row ({line[:60]!r}); "
                                 "repair or delete that line, then rerun")
        return rows

    def write(self, row: Mapping[str, Any]) -> None:
        row = _io.json_safe(dict(row))  # NaN as null, in memory as on disk
        self._file.write(_io.dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())  # as durable as the checkpoints (a resume keeps the rows up to its step)
        self.rows.append(_curve_row(row))
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


_PANELS = (
    ("reward (policy batch)", ("reward/joint_image", "reward/joint_policy")),
    ("image reward per aspect", ("reward/count", "reward/color", "reward/position")),
    ("R_phi vs image reward (monitor)", ("monitor/corr_joint", "monitor/reward_joint", "monitor/evaluator")),
    ("PPO: approx-KL x100, clip fraction", ("ppo/approx_kl_x100", "ppo/clip_fraction")),
)
_COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40))
#: The columns :func:`draw_curves` reads from a run's rows by default: the step and every panel's keys (an
#: ``_x100`` key by its base name). :attr:`MetricsLog.rows` keeps these alone.
CURVE_KEYS = ("step",) + tuple(dict.fromkeys(k[:-5] if k.endswith("_x100") else k for _, keys in _PANELS
                                             for k in keys))


def _curve_row(row: Mapping[str, Any]) -> dict:
    return {k: row[k] for k in CURVE_KEYS if k in row}


def _per_pixel_means(pts: list[tuple[float, float]], lo_x: float, hi_x: float, pixels: int
                     ) -> list[tuple[float, float]]:
    """More points than the plot has pixel columns: the mean point of each column (a long run drew every row, a
    solid band, and the drawing's cost grew with the run at every checkpoint)."""
    if len(pts) <= pixels:
        return pts
    sums: dict[int, list[float]] = {}
    for x, y in pts:
        acc = sums.setdefault(min(pixels - 1, int((x - lo_x) / (hi_x - lo_x) * pixels)), [0.0, 0.0, 0])
        acc[0] += x
        acc[1] += y
        acc[2] += 1
    return [(sx / n, sy / n) for _, (sx, sy, n) in sorted(sums.items())]


def draw_curves(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, width: int = 900,
                panels: Sequence[tuple[str, Sequence[str]]] | None = None, x_key: str = "step") -> Path:
    """Draw the run's main curves into a PNG (stacked panels), with Pillow only.

    Args:
        rows: metrics rows (each with ``x_key``; rows without it are skipped).
        path: the PNG to write (atomically).
        width: image width in pixels.
        panels: ``(title, keys)`` per panel (default: the PPO run's four panels);
            a key ending in ``_x100`` plots that metric times 100.
        x_key: the row field on the horizontal axis.

    Returns:
        The path written.
    """
    from PIL import Image, ImageDraw

    panels = _PANELS if panels is None else tuple(panels)
    rows = [r for r in rows if isinstance(r.get(x_key), (int, float)) and math.isfinite(r[x_key])]
    panel_h, margin = 170, 50
    img = Image.new("RGB", (width, len(panels) * (panel_h + 30) + 20), "white")
    draw = ImageDraw.Draw(img)
    steps = [r[x_key] for r in rows]
    lo_x, hi_x = (min(steps), max(steps)) if steps else (0, 1)
    hi_x = hi_x if hi_x > lo_x else lo_x + 1
    for p, (title, keys) in enumerate(panels):
        top = 20 + p * (panel_h + 30)
        series = []
        for key in keys:
            pts = []
            for r in rows:
                v = r.get(key[:-5] if key.endswith("_x100") else key)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    pts.append((r[x_key], v * (100 if key.endswith("_x100") else 1)))
            series.append((key, _per_pixel_means(pts, lo_x, hi_x, width - 20 - margin)))
        values = [v for _, pts in series for _, v in pts]
        lo_y, hi_y = (min(values), max(values)) if values else (0.0, 1.0)
        if hi_y - lo_y < 1e-9:
            lo_y, hi_y = lo_y - 0.5, hi_y + 0.5
        box = (margin, top + 15, width - 20, top + panel_h)
        draw.rectangle(box, outline=(0, 0, 0))
        draw.text((margin, top), title, fill=(0, 0, 0))
        draw.text((5, box[1]), f"{hi_y:.3g}", fill=(0, 0, 0))
        draw.text((5, box[3] - 10), f"{lo_y:.3g}", fill=(0, 0, 0))

        def xy(s, v):
            x = box[0] + (s - lo_x) / (hi_x - lo_x) * (box[2] - box[0])
            y = box[3] - (v - lo_y) / (hi_y - lo_y) * (box[3] - box[1])
            return x, y

        legend_x = margin + max(220, 7 * len(title) + 20)
        for i, (key, pts) in enumerate(series):
            color = _COLORS[i % len(_COLORS)]
            if len(pts) > 1:
                draw.line([xy(s, v) for s, v in pts], fill=color, width=2)
            elif pts:
                x, y = xy(*pts[0])
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
            draw.text((legend_x, top), key, fill=color)
            legend_x += 8 * len(key) + 20
    draw.text((margin, img.height - 15), f"{x_key} {lo_x:g} .. {hi_x:g}", fill=(0, 0, 0))
    path = Path(path)
    with _io.atomic_path(path, owner="xlard train curve") as tmp:
        img.save(tmp, format="PNG")
    return path


#: Panels of the edit-target warm start's curve (``OUT/distill/curve.png``), over its epochs.
_DISTILL_PANELS = (
    ("latent fit: squared error", ("train_mse", "val_mse", "val_zero_mse")),
    ("held-back explained variance", ("val_r2", "decoder_val_r2")),
    ("decoder-space fit: pixel error", ("decoder_train_pixel_mse", "decoder_val_pixel_mse",
                                        "decoder_val_zero_pixel_mse")),
)


def distill_curve_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The warm start's metrics rows (``OUT/distill/metrics.jsonl``) on one epoch axis.

    The latent fit's rows carry ``epoch``, the decoder-space fit's ``decoder_epoch``;
    the decoder-space epochs are numbered after the last latent epoch (field
    ``epoch_all``), so both fits draw as one curve.
    """
    latent = [int(r["epoch"]) for r in rows if isinstance(r.get("epoch"), (int, float))]
    offset = max(latent, default=0)
    out = []
    for r in rows:
        if isinstance(r.get("epoch"), (int, float)):
            out.append({**r, "epoch_all": int(r["epoch"])})
        elif isinstance(r.get("decoder_epoch"), (int, float)):
            out.append({**r, "epoch_all": offset + int(r["decoder_epoch"])})
    return out


def draw_distill_curves(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, width: int = 900) -> Path:
    """Draw the edit-target warm start's fit (latent epochs, then decoder-space epochs) into a PNG."""
    return draw_curves(distill_curve_rows(rows), path, width=width, panels=_DISTILL_PANELS, x_key="epoch_all")
