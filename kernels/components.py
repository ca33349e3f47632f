"""Triton connected components: label_components, count_components, component_stats.

One program per map, whatever its size: the map is walked in tiles of
``BLOCK`` pixels, several times. Thresholding (docs/ops.md: absolute,
relative to the finite max, Otsu) happens in the same program, then a
union-find over a per-map parent array in global memory:

- every foreground pixel starts as its own root (parent = its raster index,
  background = -1); a parent index is never larger than the pixel's own;
- a hooking pass finds the roots of both ends of every foreground edge (left
  and up neighbours, plus the two upper diagonals for 8-connectivity) and,
  when they differ, lowers the larger root's parent to the smaller with an
  atomic min. Passes repeat until one finds no edge with two roots. There is
  no iteration cap: a pass that writes nothing read a constant array, so its
  verdict is exact, and every other pass strictly lowers some parent, so the
  loop ends. Lost or concurrent hooks only cost another pass;
- each tree's root is then its smallest raster index, i.e. the component's
  first pixel; areas are counted with integer atomics, and kept roots are
  numbered by a running prefix sum in raster order, which gives the CPU's
  canonical labels. Results are deterministic (integers only).

Parent loads bypass L1 (``.cg``) so that atomics from other warps are seen.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MODES = {"absolute": 0, "relative": 1, "otsu": 2}
_BINARY = 3  # bool/uint8 maps: foreground = value != 0
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MASK_DTYPES = (torch.bool, torch.uint8)


@triton.jit
def _pixel_offset(p, W, stride_h, stride_w):
    """Element offset of raster pixel ``p`` in 64-bit (a permuted map's strides can exceed int32 products)."""
    row = (p // W).to(tl.int64)
    return row * stride_h + (p - row * W).to(tl.int64) * stride_w


@triton.jit
def _find_root(base, node, active):
    """Roots of ``node`` (indices into the per-map parent array ``base``) where ``active``; 0 elsewhere."""
    node = tl.where(active, node, 0)
    parent = tl.load(base + node, mask=active, other=0, cache_modifier=".cg")
    while tl.sum((parent != node).to(tl.int32), 0) > 0:
        node = parent
        parent = tl.load(base + node, mask=active, other=0, cache_modifier=".cg")
    return node


@triton.jit
def _hook(base, root_p, parent_q, active):
    """Joins the tree of ``root_p`` with the tree of ``parent_q`` where ``active``; returns how many edges had two roots."""
    root_q = _find_root(base, parent_q, active)
    two_roots = active & (root_p != root_q)
    low = tl.minimum(root_p, root_q)
    high = tl.maximum(root_p, root_q)
    tl.atomic_min(base + high, low, mask=two_roots)
    return tl.sum(two_roots.to(tl.int32), 0)


@triton.jit
def _components_fwd_kernel(
    maps_ptr, threshold_ptr, parent_ptr, scratch_ptr, labels_ptr, counts_ptr,
    H, W, stride_m, stride_h, stride_w, min_area,
    MODE: tl.constexpr, CONNECTIVITY: tl.constexpr, WRITE_LABELS: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_pixels = H * W
    map_ptr = maps_ptr + pid * stride_m
    base = parent_ptr + pid * num_pixels
    scratch = scratch_ptr + pid * num_pixels
    lanes = tl.arange(0, BLOCK)

    # Threshold statistics (finite values only), in the accumulation dtype.
    threshold = tl.load(threshold_ptr).to(ACC)
    lo = tl.full((), float("inf"), ACC)
    hi = tl.full((), float("-inf"), ACC)
    if MODE == 1 or MODE == 2:
        for start in range(0, num_pixels, BLOCK):
            p = start + lanes
            inside = p < num_pixels
            x = tl.load(map_ptr + _pixel_offset(p, W, stride_h, stride_w), mask=inside, other=0).to(ACC)
            finite = inside & ((x - x) == 0)
            hi = tl.maximum(hi, tl.max(tl.where(finite, x, float("-inf")), 0))
            lo = tl.minimum(lo, tl.min(tl.where(finite, x, float("inf")), 0))
    # No foreground when the map has no positive finite max: an infinite cut (finite values never exceed it).
    cut = tl.where(hi > 0, threshold * hi, float("inf"))
    # Otsu: 256-bin histogram in float64 bins, then the first best split.
    split = 0
    otsu_ok = hi > lo
    if MODE == 2:
        lo64 = lo.to(tl.float64)
        span64 = tl.where(hi > lo, hi.to(tl.float64) - lo64, 1.0)  # no split is used when hi <= lo
        # hi - lo overflows for a float64 map spanning more than the largest double: halves are taken instead
        halve = (span64 - span64) != 0
        scale_x = tl.where(halve, 0.5, 1.0)
        lo64 = tl.where(halve, lo64 * 0.5, lo64)
        span64 = tl.where(halve, hi.to(tl.float64) * 0.5 - lo64, span64)
        bins = tl.arange(0, 256)
        hist = tl.zeros([256], tl.int32)
        for start in range(0, num_pixels, BLOCK):
            p = start + lanes
            inside = p < num_pixels
            x = tl.load(map_ptr + _pixel_offset(p, W, stride_h, stride_w), mask=inside, other=0).to(ACC)
            finite = inside & ((x - x) == 0)
            b = tl.floor(((x.to(tl.float64) * scale_x - lo64) / span64) * 256.0)
            b = tl.minimum(tl.maximum(b, 0.0), 255.0).to(tl.int32)
            # Non-finite and padding lanes go to bin 0 and are taken out again (no masked histogram on Triton 3.6).
            hist += tl.histogram(tl.where(finite, b, 0), 256)
            hist -= tl.where(bins == 0, tl.sum((~finite).to(tl.int32), 0), 0)
        h = hist.to(tl.int64)
        idx = bins.to(tl.int64)
        w0 = tl.cumsum(h, 0)
        s0 = tl.cumsum(h * idx, 0)
        n = tl.sum(h, 0)
        total = tl.sum(h * idx, 0)
        w1 = n - w0
        s1 = total - s0
        d = s0 * w1 - s1 * w0
        valid = (w0 > 0) & (w1 > 0) & (idx < 255)
        d64 = d.to(tl.float64)
        score = tl.where(valid, d64 * d64 / tl.where(valid, w0 * w1, 1).to(tl.float64), -1.0)
        best = tl.max(score, 0)
        split = tl.min(tl.where(score == best, bins, 256), 0)
        # No valid split, or no spread: a split past the last bin keeps every pixel background.
        split = tl.where(otsu_ok & (best >= 0), split, 256)

    # Foreground: parent = own raster index, background = -1.
    for start in range(0, num_pixels, BLOCK):
        p = start + lanes
        inside = p < num_pixels
        x = tl.load(map_ptr + _pixel_offset(p, W, stride_h, stride_w), mask=inside, other=0)
        if MODE == 3:
            fg = inside & (x != 0)
        else:
            x = x.to(ACC)
            fg = inside & ((x - x) == 0)
            if MODE == 0:
                fg = fg & (x > threshold)
            elif MODE == 1:
                fg = fg & (x > cut)
            else:
                b = tl.floor(((x.to(tl.float64) * scale_x - lo64) / span64) * 256.0)
                b = tl.minimum(tl.maximum(b, 0.0), 255.0).to(tl.int32)
                fg = fg & (b > split)
        tl.store(base + p, tl.where(fg, p, -1), mask=inside)
        tl.store(scratch + p, tl.zeros([BLOCK], tl.int32), mask=inside)
    tl.debug_barrier()

    # Hooking passes to a fixpoint (see the module docstring for why this ends and is exact).
    changed = 1
    while changed > 0:
        changed = 0
        for start in range(0, num_pixels, BLOCK):
            p = start + lanes
            inside = p < num_pixels
            i = p // W
            j = p - i * W
            parent_p = tl.load(base + p, mask=inside, other=-1, cache_modifier=".cg")
            fg = parent_p >= 0
            root_p = _find_root(base, parent_p, fg)
            ok = fg & (j > 0)
            q = tl.load(base + p - 1, mask=ok, other=-1, cache_modifier=".cg")
            changed += _hook(base, root_p, q, ok & (q >= 0))
            ok = fg & (i > 0)
            q = tl.load(base + p - W, mask=ok, other=-1, cache_modifier=".cg")
            changed += _hook(base, root_p, q, ok & (q >= 0))
            if CONNECTIVITY == 8:
                ok = fg & (i > 0) & (j > 0)
                q = tl.load(base + p - W - 1, mask=ok, other=-1, cache_modifier=".cg")
                changed += _hook(base, root_p, q, ok & (q >= 0))
                ok = fg & (i > 0) & (j < W - 1)
                q = tl.load(base + p - W + 1, mask=ok, other=-1, cache_modifier=".cg")
                changed += _hook(base, root_p, q, ok & (q >= 0))
        tl.debug_barrier()

    # Flatten every tree to its root (the component's first pixel) and count areas at the roots.
    for start in range(0, num_pixels, BLOCK):
        p = start + lanes
        inside = p < num_pixels
        parent_p = tl.load(base + p, mask=inside, other=-1, cache_modifier=".cg")
        fg = parent_p >= 0
        root_p = _find_root(base, parent_p, fg)
        tl.store(base + p, root_p, mask=fg)
        tl.atomic_add(scratch + root_p, tl.full([BLOCK], 1, tl.int32), mask=fg)
    tl.debug_barrier()

    # Number kept roots in raster order; the scratch entry of a root becomes its label (0 when dropped).
    count = 0
    for start in range(0, num_pixels, BLOCK):
        p = start + lanes
        inside = p < num_pixels
        root_p = tl.load(base + p, mask=inside, other=-1, cache_modifier=".cg")
        area = tl.load(scratch + p, mask=inside, other=0, cache_modifier=".cg")
        keep = (root_p == p) & (area >= min_area)
        rank = tl.cumsum(keep.to(tl.int32), 0) + count
        tl.store(scratch + p, tl.where(keep, rank, 0), mask=inside)
        count += tl.sum(keep.to(tl.int32), 0)
    tl.store(counts_ptr + pid, count)

    if WRITE_LABELS:
        tl.debug_barrier()
        out = labels_ptr + pid * num_pixels
        for start in range(0, num_pixels, BLOCK):
            p = start + lanes
            inside = p < num_pixels
            root_p = tl.load(base + p, mask=inside, other=-1, cache_modifier=".cg")
            fg = root_p >= 0
            label = tl.load(scratch + root_p, mask=fg, other=0, cache_modifier=".cg")
            tl.store(out + p, label, mask=inside)


def _check(op: str, maps: torch.Tensor, threshold: float, mode: str, min_area: int, connectivity: int) -> None:
    if not isinstance(maps, torch.Tensor) or maps.dim() < 2:
        raise RuntimeError(f"xlard.{op}: maps must be a tensor [..., H, W], got "
                           f"{tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps)}")
    if maps.dtype not in _FLOAT_DTYPES + _MASK_DTYPES:
        raise RuntimeError(f"xlard.{op}: maps must be float16/bfloat16/float32/float64 or bool/uint8, got {maps.dtype}")
    if mode not in MODES:
        raise RuntimeError(f"xlard.{op}: mode must be one of {tuple(MODES)}, got {mode!r}")
    if not math.isfinite(threshold):
        raise RuntimeError(f"xlard.{op}: threshold must be finite, got {threshold}")
    if connectivity not in (4, 8):
        raise RuntimeError(f"xlard.{op}: connectivity must be 4 or 8, got {connectivity}")
    if min_area < 1:
        raise RuntimeError(f"xlard.{op}: min_area must be >= 1, got {min_area}")


def _launch(maps: torch.Tensor, threshold: float, mode: str, min_area: int, connectivity: int, write_labels: bool):
    """Runs the kernel over ``maps [M, H, W]``; returns (labels int32 [M, H*W] or None, counts int32 [M])."""
    num_maps, height, width = maps.shape
    num_pixels = height * width
    device = maps.device
    block = min(max(triton.next_power_of_2(num_pixels), 16), 2048)
    if num_maps and num_pixels > 2**31 - 1 - block:  # int32 labels, and the tile loop counts pixels in int32
        raise RuntimeError(f"xlard: maps of {num_pixels} pixels are more than the Triton components kernel indexes "
                           f"(at most {2**31 - 1 - block}: int32 labels and tiles); use the CPU provider "
                           f"(xlard.ops.provider)")
    if mode == "otsu" and num_maps and num_pixels > 2**27 and maps.dtype not in _MASK_DTYPES:
        # as the CPU and CUDA providers: Otsu's exact int64 class sums (255 * n^2) overflow beyond 2^27 pixels
        raise RuntimeError(f"xlard: mode 'otsu' takes maps of at most 2^27 pixels (its int64 class sums would "
                           f"overflow), got H * W = {num_pixels}")
    counts = torch.zeros(num_maps, dtype=torch.int32, device=device)
    labels = torch.zeros(num_maps, num_pixels, dtype=torch.int32, device=device) if write_labels else None
    if num_maps == 0 or num_pixels == 0:
        return labels, counts
    if maps.dtype in _MASK_DTYPES:
        maps = maps.view(torch.uint8) if maps.dtype == torch.bool else maps
        mode_id, acc = _BINARY, torch.float32
    else:
        mode_id = MODES[mode]
        acc = torch.float64 if maps.dtype == torch.float64 else torch.float32
    # The threshold travels as a tensor: a Python float kernel argument would be rounded to float32 even for float64 maps.
    threshold_t = torch.full((1,), threshold, dtype=acc, device=device)
    parent = torch.empty(num_maps, num_pixels, dtype=torch.int32, device=device)
    scratch = torch.empty(num_maps, num_pixels, dtype=torch.int32, device=device)
    _components_fwd_kernel[(num_maps,)](
        maps, threshold_t, parent, scratch, labels if write_labels else counts, counts,
        height, width, maps.stride(0), maps.stride(1), maps.stride(2), min_area,
        MODE=mode_id, CONNECTIVITY=connectivity, WRITE_LABELS=write_labels,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=block,
        num_warps=4 if block <= 512 else 8,
    )
    return labels, counts


def _flat(maps: torch.Tensor) -> torch.Tensor:
    lead = maps.shape[:-2]
    return maps.reshape(int(torch.Size(lead).numel()), maps.shape[-2], maps.shape[-1])


def label_components_fwd(maps: torch.Tensor, threshold: float, mode: str, min_area: int, connectivity: int):
    """Labels of the connected components of thresholded maps (semantics: docs/ops.md).

    Args:
        maps (Tensor[..., H, W]): float16/bfloat16/float32/float64 or bool/uint8, any strides.
        threshold: absolute threshold, or the fraction of the finite max for ``mode="relative"``.
        mode: ``"absolute"``, ``"relative"`` or ``"otsu"`` (ignored for bool/uint8 maps).
        min_area: components with fewer pixels are dropped (>= 1).
        connectivity: 4 or 8.

    Returns:
        (labels int32 [..., H, W], counts int32 [...]); labels 1..n in raster order of each
        component's first pixel, 0 for background. Deterministic.

    Raises:
        RuntimeError: for a bad shape, dtype, mode, connectivity or min_area.
    """
    _check("label_components", maps, threshold, mode, min_area, connectivity)
    labels, counts = _launch(_flat(maps), threshold, mode, min_area, connectivity, True)
    return labels.view(maps.shape), counts.view(maps.shape[:-2])


def count_components_fwd(maps: torch.Tensor, threshold: float, mode: str, min_area: int, connectivity: int):
    """Number of connected components per map, int32 [...]; see :func:`label_components_fwd`."""
    _check("count_components", maps, threshold, mode, min_area, connectivity)
    _, counts = _launch(_flat(maps), threshold, mode, min_area, connectivity, False)
    return counts.view(maps.shape[:-2])


def component_stats_fwd(maps: torch.Tensor, threshold: float, mode: str, min_area: int, connectivity: int,
                        max_components: int):
    """Counts, areas and centroids of the ``max_components`` largest components per map.

    The labels come from the Triton kernel; areas, coordinate sums and the top-K
    selection are vectorised torch ops on the same device (integer-exact sums in
    int64/float64, a stable sort so ties go to the smaller label).

    Returns:
        (counts int32 [...], areas int32 [..., K], centroids float32 [..., K, 2]) with
        centroid ``(x, y)`` = mean pixel centre, NaN in unused slots (docs/ops.md).
    """
    _check("component_stats", maps, threshold, mode, min_area, connectivity)
    if max_components < 1:
        raise RuntimeError(f"xlard.component_stats: max_components must be >= 1, got {max_components}")
    flat = _flat(maps)
    num_maps, height, width = flat.shape
    k = max_components
    device = maps.device
    labels, counts = _launch(flat, threshold, mode, min_area, connectivity, True)
    lead = maps.shape[:-2]
    areas = torch.zeros(num_maps, k, dtype=torch.int32, device=device)
    centroids = torch.full((num_maps, k, 2), float("nan"), dtype=torch.float32, device=device)
    num_pixels = height * width
    if num_maps > 0 and num_pixels > 0 and k > 0:
        index = labels.long()
        slots = num_pixels + 1
        ones = torch.ones_like(index)
        area = torch.zeros(num_maps, slots, dtype=torch.int64, device=device).scatter_add_(1, index, ones)
        pixel = torch.arange(num_pixels, device=device)
        col = (pixel % width).to(torch.float64).add_(0.5).expand(num_maps, num_pixels)
        row = (pixel // width).to(torch.float64).add_(0.5).expand(num_maps, num_pixels)
        sum_x = torch.zeros(num_maps, slots, dtype=torch.float64, device=device).scatter_add_(1, index, col)
        sum_y = torch.zeros(num_maps, slots, dtype=torch.float64, device=device).scatter_add_(1, index, row)
        area[:, 0] = 0  # background
        # Stable descending sort over labels 1..n: equal areas keep the smaller label first.
        order = torch.sort(area[:, 1:], dim=1, descending=True, stable=True).indices[:, :k] + 1
        taken = order.shape[1]
        top_area = area.gather(1, order)
        used = top_area > 0
        safe = top_area.clamp_min(1).to(torch.float64)
        cx = sum_x.gather(1, order) / safe / width
        cy = sum_y.gather(1, order) / safe / height
        areas[:, :taken] = top_area.to(torch.int32)
        # NaN as a Python scalar: a tensor made from it on the GPU would be a blocking host copy (no CUDA graphs)
        centroids[:, :taken, 0] = torch.where(used, cx, float("nan")).to(torch.float32)
        centroids[:, :taken, 1] = torch.where(used, cy, float("nan")).to(torch.float32)
    return counts.view(lead), areas.view(*lead, k), centroids.view(*lead, k, 2)
