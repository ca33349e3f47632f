"""Slow, clear pure-PyTorch references of every op in :mod:`xlard.ops`.

These are the executable form of ``docs/ops.md``: tests and benchmarks import
them, and every provider (C++, CUDA, Triton) is judged against them. They are
vectorised over maps (no Python loop over maps or pixels) but favour clarity
over speed. They take the same public arguments as :mod:`xlard.ops`.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from xlard import _args
from xlard._args import Mode
from xlard.vocab import ABOVE, BELOW, LEFT_OF, RIGHT_OF  # noqa: F401  (xlard.reference.LEFT_OF ...)

_DIRECTIONS = ((-1.0, 0.0), (1.0, 0.0), (0.0, -1.0), (0.0, 1.0))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def foreground(maps: torch.Tensor, threshold: float = 0.5, mode: Mode = "relative") -> torch.Tensor:
    """Foreground mask (bool, same shape) of ``maps`` by the rules of docs/ops.md."""
    _args.check_components_args("reference.foreground", maps, threshold, mode, 1, 8)
    if maps.dtype in (torch.bool, torch.uint8):
        return maps != 0
    acc = _acc_dtype(maps.dtype)
    v = maps.to(acc)
    finite = torch.isfinite(v)
    flat = v.flatten(-2)
    fin = finite.flatten(-2)
    if mode == "absolute":
        return (v > torch.tensor(threshold, dtype=acc, device=v.device)) & finite
    if mode == "relative":
        mx = torch.where(fin, flat, torch.full_like(flat, -math.inf)).amax(-1) if flat.shape[-1] else flat.new_full(flat.shape[:-1], -math.inf)
        cut = torch.tensor(threshold, dtype=acc, device=v.device) * mx
        fg = (v > cut[..., None, None]) & finite
        return fg & (mx > 0)[..., None, None]
    if mode == "otsu":
        if flat.shape[-1] == 0:
            return finite
        lo = torch.where(fin, flat, torch.full_like(flat, math.inf)).amin(-1).double()
        hi = torch.where(fin, flat, torch.full_like(flat, -math.inf)).amax(-1).double()
        span = hi - lo
        # hi - lo overflows for a float64 map spanning more than the largest double: then halves are taken
        halved = torch.isinf(span)
        x = torch.where(halved[..., None], flat.double() * 0.5, flat.double())
        lo_x = torch.where(halved, lo * 0.5, lo)
        span = torch.where(halved, hi * 0.5 - lo * 0.5, span)
        scaled = ((x - lo_x[..., None]) / span[..., None]) * 256.0
        bins = torch.nan_to_num(scaled, nan=0.0, posinf=0.0, neginf=0.0).floor().clamp(0, 255).long()
        bins = torch.where(fin, bins, torch.zeros_like(bins))
        hist = torch.zeros(*flat.shape[:-1], 256, dtype=torch.int64, device=v.device)
        hist.scatter_add_(-1, bins, fin.long())
        levels = torch.arange(256, dtype=torch.int64, device=v.device)
        w0 = hist.cumsum(-1)
        s0 = (hist * levels).cumsum(-1)
        n = w0[..., -1:]
        total = s0[..., -1:]
        w1 = n - w0
        s1 = total - s0
        d = s0 * w1 - s1 * w0
        valid = (w0 > 0) & (w1 > 0)
        valid[..., 255] = False
        score = torch.where(valid, d.double() * d.double() / (w0 * w1).clamp_min(1).double(), torch.full_like(d, -1, dtype=torch.float64))
        split = score.argmax(-1)
        ok = valid.any(-1) & (hi > lo)
        fg = (bins > split[..., None]) & fin & ok[..., None]
        return fg.view(maps.shape)
    raise ValueError(f"mode: expected 'absolute', 'relative' or 'otsu', got {mode!r}")


def _neighbour_min(lab: torch.Tensor, connectivity: int, big: int) -> torch.Tensor:
    """Min over the 4- or 8-neighbourhood (and the pixel), padding with ``big``."""
    padded = torch.nn.functional.pad(lab, (1, 1, 1, 1), value=big)
    h, w = lab.shape[-2:]
    out = lab
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if (di, dj) == (0, 0) or (connectivity == 4 and di != 0 and dj != 0):
                continue
            out = torch.minimum(out, padded[..., 1 + di : 1 + di + h, 1 + dj : 1 + dj + w])
    return out


def _components(fg: torch.Tensor, min_area: int, connectivity: int):
    """Raster-order labels, counts and per-root areas of boolean maps [M, H, W]."""
    m, h, w = fg.shape
    n = h * w
    big = n  # larger than every raster index: background and padding
    index = torch.arange(n, dtype=torch.int64, device=fg.device).view(1, h, w).expand(m, h, w)
    lab = torch.where(fg, index, torch.full_like(index, big))
    # Min-label propagation plus pointer jumping, to the fixpoint: each foreground pixel
    # ends with the raster index of its component's first pixel.
    while True:
        new = torch.where(fg, _neighbour_min(lab, connectivity, big), lab)
        flat = new.reshape(m, n)
        jumped = torch.gather(flat, 1, flat.clamp_max(n - 1))
        new = torch.where(fg, torch.minimum(new, jumped.view(m, h, w)), new)
        if torch.equal(new, lab):
            break
        lab = new
    root = torch.where(fg, lab, torch.zeros_like(lab)).reshape(m, n)
    area = torch.zeros(m, n, dtype=torch.int64, device=fg.device)
    area.scatter_add_(1, root, fg.reshape(m, n).long())
    is_root = (lab.reshape(m, n) == torch.arange(n, device=fg.device)) & fg.reshape(m, n)
    kept_root = is_root & (area >= min_area)
    number = kept_root.long().cumsum(1) * kept_root
    labels = torch.where(fg.reshape(m, n), torch.gather(number, 1, root), torch.zeros_like(root))
    return labels.view(m, h, w), kept_root.sum(1), root, area, number


def _check_cc_args(op, maps, threshold, mode, min_area, connectivity, max_components=None):
    _args.check_components_args(f"reference.{op}", maps, threshold, mode, min_area, connectivity, max_components)


def label_components(maps: Tensor, threshold: float = 0.5, mode: Mode = "relative", min_area: int = 1,
                     connectivity: int = 8) -> tuple[Tensor, Tensor]:
    """Reference of :func:`xlard.ops.label_components`."""
    _check_cc_args("label_components", maps, threshold, mode, min_area, connectivity)
    return _label(maps, threshold, mode, min_area, connectivity)


def _label(maps, threshold, mode, min_area, connectivity):
    batch, (h, w) = maps.shape[:-2], maps.shape[-2:]
    fg = foreground(maps, threshold, mode).reshape(math.prod(batch), h, w)
    labels, counts, *_ = _components(fg, min_area, connectivity)
    return labels.to(torch.int32).view(maps.shape), counts.to(torch.int32).view(batch)


def count_components(maps: Tensor, threshold: float = 0.5, mode: Mode = "relative", min_area: int = 1,
                     connectivity: int = 8) -> Tensor:
    """Reference of :func:`xlard.ops.count_components`."""
    _check_cc_args("count_components", maps, threshold, mode, min_area, connectivity)
    return _label(maps, threshold, mode, min_area, connectivity)[1]


def component_stats(maps: Tensor, threshold: float = 0.5, mode: Mode = "relative", min_area: int = 1,
                    connectivity: int = 8, max_components: int = 16) -> tuple[Tensor, Tensor, Tensor]:
    """Reference of :func:`xlard.ops.component_stats`."""
    _args.require_max_components("reference.component_stats", max_components)
    _check_cc_args("component_stats", maps, threshold, mode, min_area, connectivity, max_components)
    batch, (h, w) = maps.shape[:-2], maps.shape[-2:]
    fg = foreground(maps, threshold, mode).reshape(math.prod(batch), h, w)
    labels, counts, *_ = _components(fg, min_area, connectivity)
    m, k = labels.shape[0], max_components
    dev = labels.device
    nlab = h * w + 1
    flat = labels.reshape(m, h * w)
    ii, jj = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=dev), torch.arange(w, dtype=torch.float64, device=dev), indexing="ij")
    area = torch.zeros(m, nlab, dtype=torch.int64, device=dev).scatter_add_(1, flat, torch.ones_like(flat))
    sx = torch.zeros(m, nlab, dtype=torch.float64, device=dev).scatter_add_(1, flat, (jj + 0.5).reshape(1, -1).expand(m, -1))
    sy = torch.zeros(m, nlab, dtype=torch.float64, device=dev).scatter_add_(1, flat, (ii + 0.5).reshape(1, -1).expand(m, -1))
    area[:, 0] = 0  # background
    # Stable descending sort over labels in increasing order: ties keep the smaller label first.
    order = torch.sort(area, dim=1, descending=True, stable=True).indices[:, :k]
    if order.shape[1] < k:
        order = torch.cat([order, torch.zeros(m, k - order.shape[1], dtype=torch.int64, device=dev)], 1)
    top_area = torch.gather(area, 1, order)
    cx = torch.gather(sx, 1, order) / top_area.double() / w
    cy = torch.gather(sy, 1, order) / top_area.double() / h
    used = top_area > 0
    nan = torch.tensor(math.nan, dtype=torch.float64, device=dev)
    cen = torch.stack([torch.where(used, cx, nan), torch.where(used, cy, nan)], -1).float()
    return (
        counts.to(torch.int32).view(batch),
        top_area.to(torch.int32).view(*batch, k),
        cen.view(*batch, k, 2),
    )


def _scale_of(top: torch.Tensor) -> torch.Tensor:
    """A positive max-abs as it is, anything else (0, NaN) as 1: the divisor of :func:`_scaled`."""
    return torch.where(top > 0, top, torch.ones_like(top))


def attention_centroids(maps: Tensor) -> Tensor:
    """Reference of :func:`xlard.ops.attention_centroids`."""
    _args.check_tensor("reference.attention_centroids", "maps", maps, _args.FLOAT_DTYPES, min_dim=2)
    acc = _acc_dtype(maps.dtype)
    v = maps.to(acc)
    wgt = torch.where(torch.isfinite(v) & (v > 0), v, torch.zeros_like(v))
    # Weights divided by the map's largest weight before summing, so maps near the float
    # range give finite sums; the centroid does not depend on that scale. Divided, not
    # multiplied by a reciprocal (a subnormal max has none).
    if wgt.numel():
        wgt = wgt / _scale_of(wgt.amax((-2, -1), keepdim=True))
    h, w = maps.shape[-2:]
    xs = torch.arange(w, dtype=acc, device=maps.device) + 0.5
    ys = torch.arange(h, dtype=acc, device=maps.device) + 0.5
    total = wgt.sum((-2, -1))
    cx = (wgt * xs).sum((-2, -1)) / total / w
    cy = (wgt * ys[:, None]).sum((-2, -1)) / total / h
    empty = total <= 0
    half = torch.tensor(0.5, dtype=acc, device=maps.device)
    return torch.stack([torch.where(empty, half, cx), torch.where(empty, half, cy)], -1)


def position_scores(centroids: Tensor, relations: Tensor, tau: float = 10.0) -> Tensor:
    """Reference of :func:`xlard.ops.position_scores`."""
    _args.check_position_args("reference.position_scores", centroids, relations, tau)
    _args.check_relation_values("reference.position_scores", relations, centroids.shape[1])
    acc = _acc_dtype(centroids.dtype)
    c = centroids.to(acc)
    b = c.shape[0]
    rel = relations if relations.dim() == 3 else relations.unsqueeze(0).expand(b, -1, -1)
    a_idx, b_idx, code = rel[..., 0], rel[..., 1], rel[..., 2]
    pa = torch.gather(c, 1, a_idx[..., None].expand(-1, -1, 2))
    pb = torch.gather(c, 1, b_idx[..., None].expand(-1, -1, 2))
    v = torch.tensor(_DIRECTIONS, dtype=acc, device=c.device)[code]
    return torch.sigmoid(tau * ((pa - pb) * v).sum(-1))


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device``: the references compute in their accumulation type, as the ops do."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def color_scores(patch_features: Tensor, color_embeddings: Tensor,
                 patch_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Reference of :func:`xlard.ops.color_scores`."""
    _args.check_color_args("reference.color_scores", patch_features, color_embeddings, patch_mask)
    acc = torch.float64 if torch.float64 in (patch_features.dtype, color_embeddings.dtype) else torch.float32
    # Each vector divided by its own max-abs: the cosine is scale-free, and entries in
    # [-1, 1] keep squares and dot products finite for any finite input.
    f = patch_features.to(acc)
    e = color_embeddings.to(acc)
    if f.numel():
        f = f / _scale_of(f.abs().amax(-1, keepdim=True))
    if e.numel():
        e = e / _scale_of(e.abs().amax(-1, keepdim=True))
    if e.dim() == 2:
        e = e.unsqueeze(0).expand(f.shape[0], -1, -1)
    with _no_autocast(f.device):  # under torch.autocast a matmul would come back in bfloat16/float16
        dots = e @ f.transpose(1, 2)  # [B, C, N]
    denom = e.norm(dim=-1)[..., None] * f.norm(dim=-1)[:, None, :]
    sim = torch.where(denom > 0, dots / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(dots))
    allowed = torch.ones_like(sim, dtype=torch.bool) if patch_mask is None else patch_mask
    sim = torch.where(allowed & ~torch.isnan(sim), sim, torch.full_like(sim, -math.inf))
    b, c = sim.shape[:2]
    if sim.shape[-1] == 0:
        return torch.zeros(b, c, dtype=acc, device=f.device), torch.full((b, c), -1, dtype=torch.int64, device=f.device)
    # A matmul rounds a row by where it sits in its tiles (two identical patches can score a last bit apart):
    # every patch within `tol` of the best (a bound on both computations' rounding for entries in [-1, 1]) is
    # scored again by one dot product in a fixed order, the same for every patch and as the CPU kernel sums it
    # (feature q into running sum q % 8, in feature order, then the eight sums in order), so identical patches
    # tie exactly and the first wins (max returns the first index of the max). Eight features at a time over all
    # candidates: memory of eight values per candidate, whatever their number.
    top = sim.max(-1, keepdim=True).values
    tol = 8 * (f.shape[-1] + 2) * torch.finfo(acc).eps
    near = (sim >= top - tol) & ~torch.isneginf(top)
    bi, ci, ni = near.nonzero(as_tuple=True)
    d = denom[bi, ci, ni]
    lanes = torch.zeros(bi.shape[0], 8, dtype=acc, device=f.device)
    for q in range(0, f.shape[-1], 8):
        w = min(8, f.shape[-1] - q)
        lanes[:, :w] = lanes[:, :w] + e[bi, ci, q:q + w] * f[bi, ni, q:q + w]
    exact = lanes[:, 0]
    for lane in range(1, 8):
        exact = exact + lanes[:, lane]
    exact = torch.where(d > 0, exact / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(exact))
    sim = torch.full_like(sim, -math.inf).index_put((bi, ci, ni), exact)
    best, index = sim.max(-1)
    none = torch.isneginf(best)
    return torch.where(none, torch.zeros_like(best), best), torch.where(none, torch.full_like(index, -1), index)


def residual_correction(z0: Tensor, delta: Tensor, alpha: float | Tensor = 1.0) -> tuple[Tensor, Tensor]:
    """Reference of :func:`xlard.ops.residual_correction`."""
    _args.check_latents("reference.residual_correction", z0=z0, delta=delta)
    _args.split_alpha("reference.residual_correction", alpha, z0)
    acc = _acc_dtype(z0.dtype)
    a = _args.alpha_view(alpha, z0, acc)
    zc = (z0.to(acc) + a * delta.to(acc)).to(z0.dtype)
    return zc, delta.to(acc).abs().sum(1)


def gaussian_log_prob(x: Tensor, mean: Tensor, log_std: float | Tensor) -> Tensor:
    """Reference of :func:`xlard.ops.gaussian_log_prob`."""
    _args.check_latents("reference.gaussian_log_prob", min_dim=1, x=x, mean=mean)
    acc = _acc_dtype(x.dtype)
    ls = _args.broadcast_log_std(log_std, x, "reference.gaussian_log_prob").to(acc)
    z = (x.to(acc) - mean.to(acc)) * torch.exp(-ls)
    dens = -0.5 * z * z - ls - 0.5 * math.log(2 * math.pi)
    return dens.flatten(1).sum(1) if dens.dim() > 1 else dens


def sample_correction(z0: Tensor, mean: Tensor, log_std: float | Tensor, noise: Tensor,
                      alpha: float | Tensor = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference of :func:`xlard.ops.sample_correction`."""
    op = "reference.sample_correction"
    _args.check_latents(op, z0=z0, mean=mean, noise=noise)
    _args.split_alpha(op, alpha, z0)
    acc = _acc_dtype(z0.dtype)
    ls = _args.broadcast_log_std(log_std, z0, op).to(acc)
    delta = (mean.to(acc) + torch.exp(ls) * noise.to(acc)).to(z0.dtype)
    zc, lam = residual_correction(z0, delta, alpha)
    e = noise.to(acc)
    log_prob = (-0.5 * e * e - ls - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
    return zc, delta, log_prob, lam
