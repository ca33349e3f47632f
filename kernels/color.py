"""Triton color_scores: max over allowed patches of cosine(patch, color) and its first argmax.

One program per (batch item, color); patches in tiles of ``BLOCK_N``, the
feature dimension in chunks of ``BLOCK_D``, float32 accumulation (float64 when
either input is float64). Each vector is divided by its own max-abs before the
dot products and norms (one extra pass over D), so any finite input gives finite
sums: the cosine does not depend on a vector's scale. The running max is replaced only by a strictly larger tile
max, and a tile reports its smallest index reaching its max, so the index is
the smallest ``n`` reaching the overall max (docs/ops.md). Deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._limits import check_grid_axis1


@triton.jit
def _color_scores_fwd_kernel(
    feat_ptr, emb_ptr, mask_ptr, scores_ptr, index_ptr, C, N, D,
    stride_fb, stride_fn, stride_fd, stride_eb, stride_ec, stride_ed, stride_mb, stride_mc, stride_mn,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    emb = emb_ptr + b * stride_eb + c * stride_ec
    emb_top = tl.zeros([BLOCK_D], ACC)
    for d0 in range(0, D, BLOCK_D):
        e = tl.load(emb + (d0 + dims) * stride_ed, mask=d0 + dims < D, other=0).to(ACC)
        emb_top = tl.maximum(emb_top, tl.abs(e))
    emb_scale = tl.max(emb_top, 0)
    emb_scale = tl.where(emb_scale > 0, emb_scale, 1.0)
    emb_sq = tl.zeros([BLOCK_D], ACC)
    for d0 in range(0, D, BLOCK_D):
        e = tl.load(emb + (d0 + dims) * stride_ed, mask=d0 + dims < D, other=0).to(ACC) / emb_scale
        emb_sq += e * e
    emb_norm = tl.sqrt(tl.sum(emb_sq, 0))
    best = tl.full((), float("-inf"), ACC)
    best_index = tl.full((), -1, tl.int64)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        allowed = n < N
        if HAS_MASK:
            allowed = allowed & (tl.load(mask_ptr + b * stride_mb + c * stride_mc + n * stride_mn,
                                         mask=allowed, other=0) != 0)
        feat_top = tl.zeros([BLOCK_N, BLOCK_D], ACC)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + dims
            f = tl.load(feat_ptr + b * stride_fb + n[:, None] * stride_fn + d[None, :] * stride_fd,
                        mask=allowed[:, None] & (d < D)[None, :], other=0).to(ACC)
            feat_top = tl.maximum(feat_top, tl.abs(f))
        feat_scale = tl.max(feat_top, 1)
        feat_scale = tl.where(feat_scale > 0, feat_scale, 1.0)
        dot = tl.zeros([BLOCK_N, BLOCK_D], ACC)
        feat_sq = tl.zeros([BLOCK_N, BLOCK_D], ACC)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + dims
            e = tl.load(emb + d * stride_ed, mask=d < D, other=0).to(ACC) / emb_scale
            f = tl.load(feat_ptr + b * stride_fb + n[:, None] * stride_fn + d[None, :] * stride_fd,
                        mask=allowed[:, None] & (d < D)[None, :], other=0).to(ACC) / feat_scale[:, None]
            dot += f * e[None, :]
            feat_sq += f * f
        norms = tl.sqrt(tl.sum(feat_sq, 1)) * emb_norm
        sim = tl.where(norms > 0, tl.sum(dot, 1) / tl.where(norms > 0, norms, 1.0), 0.0)
        tile_best = tl.max(tl.where(allowed, sim, float("-inf")), 0)
        tile_index = tl.min(tl.where(allowed & (sim == tile_best), n, N), 0)
        better = tile_best > best
        best_index = tl.where(better, tile_index, best_index)
        best = tl.where(better, tile_best, best)
    found = best_index >= 0
    tl.store(scores_ptr + b * C + c, tl.where(found, best, 0.0))
    tl.store(index_ptr + b * C + c, best_index)


def color_scores_fwd(patch_features: torch.Tensor, color_embeddings: torch.Tensor, patch_mask):
    """Best cosine similarity of each color to the allowed patches, and the first patch reaching it.

    Args:
        patch_features (Tensor[B, N, D]): floating point.
        color_embeddings (Tensor[C, D] or Tensor[B, C, D]): floating point.
        patch_mask (Tensor[B, C, N] bool, optional): which patches each color may use.

    Returns:
        (scores [B, C] float32 (float64 when either input is float64), index [B, C] int64); a color
        without an allowed patch scores 0 with index -1.

    Raises:
        RuntimeError: for mismatched shapes or dtypes.
    """
    op = "xlard.color_scores"
    if patch_features.dim() != 3 or not patch_features.is_floating_point():
        raise RuntimeError(f"{op}: patch_features must be a float tensor [B, N, D], got "
                           f"{tuple(patch_features.shape)} {patch_features.dtype}")
    batch, num_patches, dim = patch_features.shape
    if color_embeddings.dim() == 2:
        color_embeddings = color_embeddings.unsqueeze(0).expand(batch, *color_embeddings.shape)
    if (color_embeddings.dim() != 3 or color_embeddings.shape[0] != batch or color_embeddings.shape[2] != dim
            or not color_embeddings.is_floating_point()):
        raise RuntimeError(f"{op}: color_embeddings must be a float tensor [C, {dim}] or [{batch}, C, {dim}], "
                           f"got {tuple(color_embeddings.shape)} {color_embeddings.dtype}")
    num_colors = color_embeddings.shape[1]
    if patch_mask is not None:
        if patch_mask.dtype != torch.bool or tuple(patch_mask.shape) != (batch, num_colors, num_patches):
            raise RuntimeError(f"{op}: patch_mask must be bool [{batch}, {num_colors}, {num_patches}], got "
                               f"{tuple(patch_mask.shape)} {patch_mask.dtype}")
        patch_mask = patch_mask.view(torch.uint8)
    f64 = torch.float64 in (patch_features.dtype, color_embeddings.dtype)
    acc, acc_tl = (torch.float64, tl.float64) if f64 else (torch.float32, tl.float32)
    device = patch_features.device
    scores = torch.zeros(batch, num_colors, dtype=acc, device=device)
    index = torch.full((batch, num_colors), -1, dtype=torch.int64, device=device)
    if batch == 0 or num_colors == 0 or num_patches == 0:
        return scores, index
    mask_arg = patch_mask if patch_mask is not None else index
    mask_strides = patch_mask.stride() if patch_mask is not None else (0, 0, 0)
    block_d = min(max(triton.next_power_of_2(dim), 16), 128)
    block_n = max(16, min(triton.next_power_of_2(num_patches), 4096 // block_d))
    check_grid_axis1("color_scores", num_colors, f"{num_colors} color embeddings")
    _color_scores_fwd_kernel[(batch, num_colors)](
        patch_features, color_embeddings, mask_arg, scores, index, num_colors, num_patches, dim,
        *patch_features.stride(), *color_embeddings.stride(), *mask_strides,
        HAS_MASK=patch_mask is not None, ACC=acc_tl, BLOCK_N=block_n, BLOCK_D=block_d,
    )
    return scores, index
