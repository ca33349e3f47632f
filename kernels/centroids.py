"""Triton attention_centroids and position_scores, forward and backward (semantics: docs/ops.md).

attention_centroids: one program per map, tiles of ``BLOCK`` pixels, weights
``max(value, 0)`` with non-finite values as 0, sums in float32 (float64 for
float64 maps). position_scores: one program per (batch item, block of
relations). Its backward gathers, per (batch item, block of tokens), the
contributions of every relation in a fixed order, so no float atomics are used
and the result does not depend on scheduling.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._limits import check_grid_axis1


def _acc_dtype(dtype: torch.dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


@triton.jit
def _weight_scale(map_ptr, H, W, stride_h, stride_w, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """The largest weight of one map, or 1 when it has none: every weight is divided by it
    before summing, so maps near the float range sum to finite totals."""
    lanes = tl.arange(0, BLOCK)
    num_pixels = H * W
    top = tl.zeros([BLOCK], ACC)
    for start in range(0, num_pixels, BLOCK):
        p = start + lanes
        inside = p < num_pixels
        i = p // W
        j = p - i * W
        v = tl.load(map_ptr + i.to(tl.int64) * stride_h + j.to(tl.int64) * stride_w, mask=inside, other=0).to(ACC)
        top = tl.maximum(top, tl.where(((v - v) == 0) & (v > 0), v, 0.0))
    best = tl.max(top, 0)
    return tl.where(best > 0, best, 1.0)


@triton.jit
def _weight_sums(map_ptr, H, W, stride_h, stride_w, scale, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """(sum w, sum w * x_centre, sum w * y_centre) of one map, weights divided by ``scale``
    (divided, not multiplied by the reciprocal, which a subnormal scale does not have)."""
    lanes = tl.arange(0, BLOCK)
    num_pixels = H * W
    sum_w = tl.zeros([BLOCK], ACC)
    sum_x = tl.zeros([BLOCK], ACC)
    sum_y = tl.zeros([BLOCK], ACC)
    for start in range(0, num_pixels, BLOCK):
        p = start + lanes
        inside = p < num_pixels
        i = p // W
        j = p - i * W
        v = tl.load(map_ptr + i.to(tl.int64) * stride_h + j.to(tl.int64) * stride_w, mask=inside, other=0).to(ACC)
        w = tl.where(((v - v) == 0) & (v > 0), v / scale, 0.0)
        sum_w += w
        sum_x += w * ((j.to(ACC) + 0.5) / W)
        sum_y += w * ((i.to(ACC) + 0.5) / H)
    return tl.sum(sum_w, 0), tl.sum(sum_x, 0), tl.sum(sum_y, 0)


@triton.jit
def _attention_centroids_fwd_kernel(
    maps_ptr, out_ptr, H, W, stride_m, stride_h, stride_w,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    map_ptr = maps_ptr + pid * stride_m
    scale = _weight_scale(map_ptr, H, W, stride_h, stride_w, ACC, BLOCK)
    sum_w, sum_x, sum_y = _weight_sums(map_ptr, H, W, stride_h, stride_w, scale, ACC, BLOCK)
    has_mass = sum_w > 0
    x = tl.where(has_mass, sum_x / tl.where(has_mass, sum_w, 1.0), 0.5)
    y = tl.where(has_mass, sum_y / tl.where(has_mass, sum_w, 1.0), 0.5)
    tl.store(out_ptr + pid * 2, x)
    tl.store(out_ptr + pid * 2 + 1, y)


@triton.jit
def _attention_centroids_bwd_kernel(
    grad_ptr, maps_ptr, centroids_ptr, out_ptr, H, W, stride_m, stride_h, stride_w,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    map_ptr = maps_ptr + pid * stride_m
    scale = _weight_scale(map_ptr, H, W, stride_h, stride_w, ACC, BLOCK)
    sum_w, _sx, _sy = _weight_sums(map_ptr, H, W, stride_h, stride_w, scale, ACC, BLOCK)
    has_mass = sum_w > 0
    safe_sum = tl.where(has_mass, sum_w, 1.0)
    gx = tl.load(grad_ptr + pid * 2).to(ACC)
    gy = tl.load(grad_ptr + pid * 2 + 1).to(ACC)
    cx = tl.load(centroids_ptr + pid * 2).to(ACC)
    cy = tl.load(centroids_ptr + pid * 2 + 1).to(ACC)
    lanes = tl.arange(0, BLOCK)
    num_pixels = H * W
    out = out_ptr + pid * num_pixels
    for start in range(0, num_pixels, BLOCK):
        p = start + lanes
        inside = p < num_pixels
        i = p // W
        j = p - i * W
        v = tl.load(map_ptr + i.to(tl.int64) * stride_h + j.to(tl.int64) * stride_w, mask=inside, other=0).to(ACC)
        active = ((v - v) == 0) & (v > 0)
        g = gx * ((j.to(ACC) + 0.5) / W - cx) + gy * ((i.to(ACC) + 0.5) / H - cy)
        # d / (scale * sum_w) (sum_w >= 1 where a pixel is active: the largest weight divided by the scale is 1):
        # one division by the product where scale < 1 (no overflow; d / scale alone overflowed for a subnormal
        # scale, d / sum alone lost a tiny d), two where scale >= 1 (the product could overflow). As every provider.
        g = tl.where(active, tl.where(scale < 1.0, g / (safe_sum * scale), g / scale / safe_sum), 0.0)
        tl.store(out + p, g.to(out_ptr.dtype.element_ty), mask=inside)


def _check_maps(op: str, maps: torch.Tensor) -> None:
    if maps.dim() < 2:
        raise RuntimeError(f"xlard.{op}: maps must be [..., H, W], got {tuple(maps.shape)}")
    if not maps.is_floating_point():
        raise RuntimeError(f"xlard.{op}: maps must be a floating-point tensor, got {maps.dtype}")


def _flat(maps: torch.Tensor) -> torch.Tensor:
    return maps.reshape(int(torch.Size(maps.shape[:-2]).numel()), maps.shape[-2], maps.shape[-1])


def _block(op: str, num_pixels: int) -> int:
    block = min(max(triton.next_power_of_2(num_pixels), 16), 4096)
    if num_pixels > 2**31 - 1 - block:  # the kernels' tile loop counts pixels in int32: past this it wraps
        raise RuntimeError(f"xlard.{op}: maps of {num_pixels} pixels are more than the Triton kernel indexes "
                           f"(at most {2**31 - 1 - block}); use the CUDA or CPU provider (xlard.ops.provider)")
    return block


def attention_centroids_fwd(maps: torch.Tensor) -> torch.Tensor:
    """Weighted centroid ``(x, y)`` of ``max(maps, 0)`` per map.

    Args:
        maps (Tensor[..., H, W]): floating point, any strides.

    Returns:
        Tensor[..., 2], float32 (float64 for float64 maps); ``(0.5, 0.5)`` for a map without mass.
    """
    _check_maps("attention_centroids", maps)
    acc, acc_tl = _acc_dtype(maps.dtype)
    flat = _flat(maps)
    num_maps, height, width = flat.shape
    out = torch.full((num_maps, 2), 0.5, dtype=acc, device=maps.device)
    if num_maps > 0 and height * width > 0:
        block = _block("attention_centroids", height * width)
        _attention_centroids_fwd_kernel[(num_maps,)](
            flat, out, height, width, flat.stride(0), flat.stride(1), flat.stride(2),
            ACC=acc_tl, BLOCK=block, num_warps=4 if block <= 1024 else 8,
        )
    return out.view(*maps.shape[:-2], 2)


def attention_centroids_bwd(grad: torch.Tensor, maps: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`attention_centroids_fwd` with respect to ``maps`` (``maps``' dtype and shape)."""
    _check_maps("_attention_centroids_backward", maps)
    acc, acc_tl = _acc_dtype(maps.dtype)
    flat = _flat(maps)
    num_maps, height, width = flat.shape
    if num_maps > 0 and height * width > 0:
        block = _block("_attention_centroids_backward", height * width)  # before the gradient's allocation
    out = torch.zeros(maps.shape, dtype=maps.dtype, device=maps.device)
    if num_maps > 0 and height * width > 0:
        grad = grad.reshape(num_maps, 2).contiguous()
        centroids = centroids.reshape(num_maps, 2).contiguous()
        _attention_centroids_bwd_kernel[(num_maps,)](
            grad, flat, centroids, out, height, width, flat.stride(0), flat.stride(1), flat.stride(2),
            ACC=acc_tl, BLOCK=block, num_warps=4 if block <= 1024 else 8,
        )
    return out


@triton.jit
def _relation_terms(centroids_ptr, relations_ptr, b, r, active, T, stride_cb, stride_ct, stride_cc,
                    stride_rb, stride_rr, stride_rc, tau, ACC: tl.constexpr):
    """Per relation row: (token a, token b, direction dx, dy, score, whether the row is active and valid)."""
    rel = relations_ptr + b * stride_rb + r * stride_rr
    a = tl.load(rel, mask=active, other=0)
    t = tl.load(rel + stride_rc, mask=active, other=0)
    code = tl.load(rel + 2 * stride_rc, mask=active, other=0)
    # The host checks the ranges, except under CUDA-graph capture (no host read there): a bad row reads no
    # centroid, scores NaN (never a plausible number) and adds nothing to any token's gradient.
    ok = active & (a >= 0) & (a < T) & (t >= 0) & (t < T) & (code >= 0) & (code <= 3)
    dx = tl.where(code == 0, -1.0, tl.where(code == 1, 1.0, 0.0)).to(ACC)
    dy = tl.where(code == 2, -1.0, tl.where(code == 3, 1.0, 0.0)).to(ACC)
    cen = centroids_ptr + b * stride_cb
    xa = tl.load(cen + a * stride_ct, mask=ok, other=0).to(ACC)
    ya = tl.load(cen + a * stride_ct + stride_cc, mask=ok, other=0).to(ACC)
    xb = tl.load(cen + t * stride_ct, mask=ok, other=0).to(ACC)
    yb = tl.load(cen + t * stride_ct + stride_cc, mask=ok, other=0).to(ACC)
    z = tau * ((xa - xb) * dx + (ya - yb) * dy)
    score = tl.where(ok | ~active, 1.0 / (1.0 + tl.exp(-z)), float("nan"))
    return a, t, dx, dy, score, ok


@triton.jit
def _position_scores_fwd_kernel(
    centroids_ptr, relations_ptr, tau_ptr, out_ptr, T, R,
    stride_cb, stride_ct, stride_cc, stride_rb, stride_rr, stride_rc,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    active = r < R
    tau = tl.load(tau_ptr)
    _a, _t, _dx, _dy, score, _ok = _relation_terms(
        centroids_ptr, relations_ptr, b, r, active, T, stride_cb, stride_ct, stride_cc,
        stride_rb, stride_rr, stride_rc, tau, ACC)
    tl.store(out_ptr + b * R + r, score, mask=active)


@triton.jit
def _position_scores_bwd_kernel(
    grad_ptr, centroids_ptr, relations_ptr, tau_ptr, out_ptr, T, R,
    stride_cb, stride_ct, stride_cc, stride_rb, stride_rr, stride_rc,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    tokens = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tau = tl.load(tau_ptr)
    gx = tl.zeros([BLOCK_T], ACC)
    gy = tl.zeros([BLOCK_T], ACC)
    for start in range(0, R, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        active = r < R
        a, t, dx, dy, score, ok = _relation_terms(
            centroids_ptr, relations_ptr, b, r, active, T, stride_cb, stride_ct, stride_cc,
            stride_rb, stride_rr, stride_rc, tau, ACC)
        g = tl.load(grad_ptr + b * R + r, mask=ok, other=0).to(ACC)
        coef = tl.where(ok, g * score * (1.0 - score) * tau, 0.0)
        # d score / d p_a = coef * v and d score / d p_b = -coef * v, summed per token. A row adds nothing to
        # the tokens it does not name (a where, not 0 * term: an infinite or NaN term of one row would make
        # 0 * inf = NaN in every token of the item, where the other providers leave them untouched); a row
        # naming one token twice adds its term and takes it away, as the other providers do.
        is_a = a[:, None] == tokens[None, :]
        is_t = t[:, None] == tokens[None, :]
        sign = is_a.to(ACC) - is_t.to(ACC)
        named = is_a | is_t
        gx += tl.sum(tl.where(named, sign * (coef * dx)[:, None], 0.0), 0)
        gy += tl.sum(tl.where(named, sign * (coef * dy)[:, None], 0.0), 0)
    inside = tokens < T
    out = out_ptr + b * T * 2 + tokens * 2
    tl.store(out, gx.to(out_ptr.dtype.element_ty), mask=inside)
    tl.store(out + 1, gy.to(out_ptr.dtype.element_ty), mask=inside)


def _capturing(t: torch.Tensor) -> bool:
    """Whether ``t``'s stream is being captured into a CUDA graph (no host read of its values is allowed)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_position(op: str, centroids: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
    if centroids.dim() != 3 or centroids.shape[2] != 2:
        raise RuntimeError(f"xlard.{op}: centroids must be [B, T, 2], got {tuple(centroids.shape)}")
    if not centroids.is_floating_point():
        raise RuntimeError(f"xlard.{op}: centroids must be floating point, got {centroids.dtype}")
    if relations.dtype != torch.int64:
        raise RuntimeError(f"xlard.{op}: relations must be int64, got {relations.dtype}")
    if relations.dim() == 2:
        relations = relations.unsqueeze(0).expand(centroids.shape[0], *relations.shape)
    if relations.dim() != 3 or relations.shape[2] != 3 or relations.shape[0] != centroids.shape[0]:
        raise RuntimeError(f"xlard.{op}: relations must be [B, R, 3] or [R, 3] with B = {centroids.shape[0]}, "
                           f"got {tuple(relations.shape)}")
    if relations.numel() > 0 and not _capturing(relations):
        tokens = relations[..., :2]
        codes = relations[..., 2]
        num_tokens = centroids.shape[1]
        # One host synchronisation: bad indices are an error (docs/ops.md), not a silent clamp.
        if bool(((tokens < 0) | (tokens >= num_tokens)).any() | ((codes < 0) | (codes > 3)).any()):
            raise RuntimeError(f"xlard.{op}: relations hold a token index outside [0, {num_tokens}) "
                               "or a code outside 0..3")
    return relations


def position_scores_fwd(centroids: torch.Tensor, relations: torch.Tensor, tau: float) -> torch.Tensor:
    """``sigmoid(tau * (p_a - p_b) . v_code)`` per relation row.

    Args:
        centroids (Tensor[B, T, 2]): floating point.
        relations (Tensor[B, R, 3] or Tensor[R, 3]): int64 rows ``(a, b, code)``.
        tau: temperature.

    Returns:
        Tensor[B, R], float32 (float64 for float64 centroids).

    Raises:
        RuntimeError: for bad shapes, an index outside ``[0, T)`` or a code outside 0..3.
    """
    relations = _check_position("position_scores", centroids, relations)
    if not (math.isfinite(tau) and tau > 0):  # as the C++ providers and the fake kernel: a negative tau reversed
        raise RuntimeError(f"xlard.position_scores: tau must be a finite number > 0, got {tau:g}")
    acc, acc_tl = _acc_dtype(centroids.dtype)
    batch, num_tokens, _ = centroids.shape
    num_rel = relations.shape[1]
    out = torch.empty(batch, num_rel, dtype=acc, device=centroids.device)
    if out.numel() == 0:
        return out
    tau_t = torch.full((1,), tau, dtype=acc, device=centroids.device)
    block_r = min(max(triton.next_power_of_2(num_rel), 16), 1024)
    grid = (batch, triton.cdiv(num_rel, block_r))
    check_grid_axis1("position_scores", grid[1], f"{num_rel} relations")
    _position_scores_fwd_kernel[grid](
        centroids, relations, tau_t, out, num_tokens, num_rel,
        centroids.stride(0), centroids.stride(1), centroids.stride(2),
        relations.stride(0), relations.stride(1), relations.stride(2),
        ACC=acc_tl, BLOCK_R=block_r,
    )
    return out


def position_scores_bwd(grad: torch.Tensor, centroids: torch.Tensor, relations: torch.Tensor, tau: float):
    """Gradient of :func:`position_scores_fwd` with respect to ``centroids`` ([B, T, 2], centroids' dtype)."""
    relations = _check_position("_position_scores_backward", centroids, relations)
    acc, acc_tl = _acc_dtype(centroids.dtype)
    batch, num_tokens, _ = centroids.shape
    num_rel = relations.shape[1]
    out = torch.zeros(batch, num_tokens, 2, dtype=centroids.dtype, device=centroids.device)
    if out.numel() == 0 or num_rel == 0:
        return out
    grad = grad.reshape(batch, num_rel).contiguous()
    tau_t = torch.full((1,), tau, dtype=acc, device=centroids.device)
    block_t = min(max(triton.next_power_of_2(num_tokens), 16), 128)
    block_r = 64
    grid = (batch, triton.cdiv(num_tokens, block_t))
    check_grid_axis1("position_scores backward", grid[1], f"{num_tokens} tokens")
    _position_scores_bwd_kernel[grid](
        grad, centroids, relations, tau_t, out, num_tokens, num_rel,
        centroids.stride(0), centroids.stride(1), centroids.stride(2),
        relations.stride(0), relations.stride(1), relations.stride(2),
        ACC=acc_tl, BLOCK_R=block_r, BLOCK_T=block_t,
    )
    return out
