"""Triton residual_correction, gaussian_log_prob and sample_correction (+ backwards), docs/ops.md.

Tensors are viewed as ``[B, C, S]`` (``S`` = product of the spatial dims) or
``[B, F]`` with ``reshape`` (a copy only when the strides do not allow a
view). Element-wise work is computed in float32 (float64 for float64 inputs)
and rounded once to the output dtype. Reductions over the batch's features
are written as per-block partial sums and added by one torch ``sum`` in a
fixed order, so results do not depend on scheduling; the sum over channels
(``lam``) runs inside one program. Scalars that must keep float64 precision
(``alpha``, ``0.5 * log(2 pi)``) travel as tensors, since Triton rounds Python
float arguments to float32.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._limits import check_grid_axis1

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _acc(t: torch.Tensor):
    """Accumulation dtypes (torch, Triton) of the op's leading input, as on the CPU."""
    return (torch.float64, tl.float64) if t.dtype == torch.float64 else (torch.float32, tl.float32)


def _alpha_vector(op: str, alpha, alpha_scalar: float, batch: int, acc: torch.dtype, device) -> torch.Tensor:
    if alpha is None:
        return torch.full((batch,), alpha_scalar, dtype=acc, device=device)
    if alpha.dim() != 1 or alpha.shape[0] != batch:
        raise RuntimeError(f"xlard.{op}: alpha must be [B] = [{batch}], got {tuple(alpha.shape)}")
    return alpha.to(device=device, dtype=acc).contiguous()


def _bcs(op: str, name: str, t: torch.Tensor) -> torch.Tensor:
    if t.dim() < 2:
        raise RuntimeError(f"xlard.{op}: {name} must be [B, C, *spatial], got {tuple(t.shape)}")
    return t.reshape(t.shape[0], t.shape[1], int(torch.Size(t.shape[2:]).numel()))


def _same_shape(op: str, ref_name: str, ref: torch.Tensor, same_dtype: bool = True, **others: torch.Tensor) -> None:
    if not ref.is_floating_point():
        raise RuntimeError(f"xlard.{op}: {ref_name} must be float16, bfloat16, float32 or float64, got {ref.dtype}")
    for name, t in others.items():
        if t.shape != ref.shape:
            raise RuntimeError(f"xlard.{op}: {name} must have the shape of {ref_name} {tuple(ref.shape)}, "
                               f"got {tuple(t.shape)}")
        if same_dtype and t.dtype != ref.dtype:
            raise RuntimeError(f"xlard.{op}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


def _block(n: int, cap: int = 1024) -> int:
    return min(max(triton.next_power_of_2(max(n, 1)), 16), cap)


@triton.jit
def _residual_correction_fwd_kernel(
    z0_ptr, delta_ptr, alpha_ptr, zc_ptr, lam_ptr, C, S,
    sz_b, sz_c, sz_s, sd_b, sd_c, sd_s,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = s < S
    a = tl.load(alpha_ptr + b)
    lam = tl.zeros([BLOCK], ACC)
    # Pointers advance by one channel per step: 64-bit offsets without int32 channel products.
    delta_p = delta_ptr + b * sd_b + s * sd_s
    z0_p = z0_ptr + b * sz_b + s * sz_s
    zc_p = zc_ptr + b * C * S + s
    for _c in range(0, C):
        delta = tl.load(delta_p, mask=inside, other=0).to(ACC)
        z0 = tl.load(z0_p, mask=inside, other=0).to(ACC)
        zc = z0 + a * delta
        tl.store(zc_p, zc.to(zc_ptr.dtype.element_ty), mask=inside)
        lam += tl.abs(delta)
        delta_p += sd_c
        z0_p += sz_c
        zc_p += S
    tl.store(lam_ptr + b * S + s, lam, mask=inside)


def residual_correction_fwd(z0: torch.Tensor, delta: torch.Tensor, alpha, alpha_scalar: float):
    """``zc = z0 + a_b * delta`` and ``lam = sum_c |delta|``.

    Args:
        z0, delta (Tensor[B, C, *spatial]): same shape and floating dtype.
        alpha (Tensor[B], optional): per-item step; else ``alpha_scalar`` for every item.

    Returns:
        (zc in the inputs' dtype [B, C, *spatial], lam float32/float64 [B, *spatial]).
    """
    op = "residual_correction"
    _same_shape(op, "z0", z0, delta=delta)
    z3, d3 = _bcs(op, "z0", z0), _bcs(op, "delta", delta)
    batch, channels, size = z3.shape
    acc, acc_tl = _acc(z0)
    alpha_v = _alpha_vector(op, alpha, alpha_scalar, batch, acc, z0.device)
    zc = torch.empty(z0.shape, dtype=delta.dtype, device=z0.device)
    lam = torch.zeros((batch, *z0.shape[2:]), dtype=acc, device=z0.device)
    if batch == 0 or size == 0:
        return zc, lam
    block = _block(size)
    check_grid_axis1(op, triton.cdiv(size, block), f"a latent of {size} cells per channel")
    _residual_correction_fwd_kernel[(batch, triton.cdiv(size, block))](
        z3, d3, alpha_v, zc, lam, channels, size, *z3.stride(), *d3.stride(), ACC=acc_tl, BLOCK=block,
    )
    return zc, lam


@triton.jit
def _residual_correction_bwd_kernel(
    grad_zc_ptr, grad_lam_ptr, delta_ptr, alpha_ptr, out_ptr, C, S,
    sg_b, sg_c, sg_s, sl_b, sl_s, sd_b, sd_c, sd_s,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = s < S
    a = tl.load(alpha_ptr + b)
    grad_lam = tl.load(grad_lam_ptr + b * sl_b + s * sl_s, mask=inside, other=0).to(ACC)
    delta_p = delta_ptr + b * sd_b + s * sd_s
    grad_p = grad_zc_ptr + b * sg_b + s * sg_s
    out_p = out_ptr + b * C * S + s
    for _c in range(0, C):
        delta = tl.load(delta_p, mask=inside, other=0).to(ACC)
        grad_zc = tl.load(grad_p, mask=inside, other=0).to(ACC)
        sign = tl.where(delta > 0, 1.0, tl.where(delta < 0, -1.0, 0.0)).to(ACC)
        grad = a * grad_zc + grad_lam * sign
        tl.store(out_p, grad.to(out_ptr.dtype.element_ty), mask=inside)
        delta_p += sd_c
        grad_p += sg_c
        out_p += S


def residual_correction_bwd(grad_zc: torch.Tensor, grad_lam: torch.Tensor, delta: torch.Tensor, alpha,
                            alpha_scalar: float) -> torch.Tensor:
    """``grad_delta = a_b * grad_zc + grad_lam * sign(delta)`` in ``delta``'s dtype and shape."""
    op = "_residual_correction_backward"
    _same_shape(op, "delta", delta, same_dtype=False, grad_zc=grad_zc)
    d3 = _bcs(op, "delta", delta)
    batch, channels, size = d3.shape
    if tuple(grad_lam.shape) != (batch, *delta.shape[2:]):
        raise RuntimeError(f"xlard.{op}: grad_lam must be {(batch, *delta.shape[2:])}, got {tuple(grad_lam.shape)}")
    g3 = _bcs(op, "grad_zc", grad_zc)
    gl = grad_lam.reshape(batch, size)
    acc, acc_tl = _acc(delta)
    alpha_v = _alpha_vector(op, alpha, alpha_scalar, batch, acc, delta.device)
    out = torch.empty(delta.shape, dtype=delta.dtype, device=delta.device)
    if batch == 0 or size == 0 or channels == 0:
        return out
    block = _block(size)
    check_grid_axis1("residual_correction backward", triton.cdiv(size, block), f"a latent of {size} cells per channel")
    _residual_correction_bwd_kernel[(batch, triton.cdiv(size, block))](
        g3, gl, d3, alpha_v, out, channels, size, *g3.stride(), *gl.stride(), *d3.stride(),
        ACC=acc_tl, BLOCK=block,
    )
    return out


def _log_std_2d(op: str, log_std: torch.Tensor, x: torch.Tensor):
    """log_std as [B or 1, F] plus its batch stride (0 when shared over the batch)."""
    batch = x.shape[0]
    features = int(torch.Size(x.shape[1:]).numel())
    # Contiguous before the stride is read: a broadcast view (the wrapper expands a [B, 1, ...] log_std) or a
    # strided one reshapes to a view whose batch stride is not that of its contiguous copy, which the kernel reads.
    if log_std.shape == x.shape[1:]:
        return log_std.reshape(1, features).contiguous(), 0, True
    if log_std.shape == x.shape:
        flat = log_std.reshape(batch, features).contiguous()
        return flat, flat.stride(0), False
    raise RuntimeError(f"xlard.{op}: log_std must have shape {tuple(x.shape[1:])} or {tuple(x.shape)}, "
                       f"got {tuple(log_std.shape)}")


@triton.jit
def _gaussian_log_prob_fwd_kernel(
    x_ptr, mean_ptr, log_std_ptr, const_ptr, partial_ptr, F, P,
    sx_b, sm_b, sl_b, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1).to(tl.int64)
    f = block * BLOCK + tl.arange(0, BLOCK)
    inside = f < F
    half_log_2pi = tl.load(const_ptr)
    x = tl.load(x_ptr + b * sx_b + f, mask=inside, other=0).to(ACC)
    mean = tl.load(mean_ptr + b * sm_b + f, mask=inside, other=0).to(ACC)
    log_std = tl.load(log_std_ptr + b * sl_b + f, mask=inside, other=0).to(ACC)
    z = (x - mean) * tl.exp(-log_std)
    term = tl.where(inside, -0.5 * z * z - log_std - half_log_2pi, 0.0)
    tl.store(partial_ptr + b * P + block, tl.sum(term, 0))


def _check_gaussian(op: str, x: torch.Tensor, mean: torch.Tensor):
    if x.dim() < 1 or not x.is_floating_point():
        raise RuntimeError(f"xlard.{op}: x must be a float tensor [B, ...], got {tuple(x.shape)} {x.dtype}")
    _same_shape(op, "x", x, mean=mean)


def gaussian_log_prob_fwd(x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Diagonal Gaussian log-density of ``x`` summed over the non-batch dims.

    Args:
        x, mean (Tensor[B, ...]): same shape.
        log_std (Tensor): shape ``x.shape[1:]`` (shared over the batch) or ``x.shape``.

    Returns:
        Tensor[B], float32 (float64 for float64 inputs).
    """
    op = "gaussian_log_prob"
    _check_gaussian(op, x, mean)
    ls2, sl_b, _shared = _log_std_2d(op, log_std, x)
    batch = x.shape[0]
    features = ls2.shape[1]
    acc, acc_tl = _acc(x)
    if batch == 0 or features == 0:
        return torch.zeros(batch, dtype=acc, device=x.device)
    x2 = x.reshape(batch, features).contiguous()
    m2 = mean.reshape(batch, features).contiguous()
    block = _block(features, 2048)
    parts = triton.cdiv(features, block)
    check_grid_axis1("gaussian_log_prob", parts, f"{features} features per row")
    partial = torch.empty(batch, parts, dtype=acc, device=x.device)
    const = torch.full((1,), _HALF_LOG_2PI, dtype=acc, device=x.device)
    _gaussian_log_prob_fwd_kernel[(batch, parts)](
        x2, m2, ls2, const, partial, features, parts, x2.stride(0), m2.stride(0), sl_b,
        ACC=acc_tl, BLOCK=block,
    )
    return partial.sum(1)


@triton.jit
def _gaussian_log_prob_bwd_kernel(
    grad_ptr, x_ptr, mean_ptr, log_std_ptr, gx_ptr, gm_ptr, gl_ptr, B, F,
    SHARED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = f < F
    shared_log_std = tl.load(log_std_ptr + f, mask=inside, other=0).to(ACC)
    grad_ls_sum = tl.zeros([BLOCK], ACC)
    row = f  # advances by F per batch item: 64-bit offsets without int32 b * F products
    for b in range(0, B):
        g = tl.load(grad_ptr + b).to(ACC)
        x = tl.load(x_ptr + row, mask=inside, other=0).to(ACC)
        mean = tl.load(mean_ptr + row, mask=inside, other=0).to(ACC)
        if SHARED:
            log_std = shared_log_std
        else:
            log_std = tl.load(log_std_ptr + row, mask=inside, other=0).to(ACC)
        diff = x - mean
        inv_var = tl.exp(-2.0 * log_std)
        grad_x = -g * diff * inv_var
        tl.store(gx_ptr + row, grad_x.to(gx_ptr.dtype.element_ty), mask=inside)
        tl.store(gm_ptr + row, (-grad_x).to(gm_ptr.dtype.element_ty), mask=inside)
        grad_ls = g * (diff * diff * inv_var - 1.0)
        if SHARED:
            grad_ls_sum += grad_ls
        else:
            tl.store(gl_ptr + row, grad_ls.to(gl_ptr.dtype.element_ty), mask=inside)
        row += F
    if SHARED:
        tl.store(gl_ptr + f, grad_ls_sum.to(gl_ptr.dtype.element_ty), mask=inside)


def gaussian_log_prob_bwd(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor):
    """Gradients of :func:`gaussian_log_prob_fwd`: (grad_x, grad_mean, grad_log_std), each in its input's
    dtype and shape; ``grad_log_std`` is summed over the batch when ``log_std`` is shared."""
    op = "_gaussian_log_prob_backward"
    _check_gaussian(op, x, mean)
    ls2, _sl_b, shared = _log_std_2d(op, log_std, x)
    batch = x.shape[0]
    grad_x = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    grad_mean = torch.zeros(mean.shape, dtype=mean.dtype, device=x.device)
    grad_log_std = torch.zeros(log_std.shape, dtype=log_std.dtype, device=x.device)
    features = int(torch.Size(x.shape[1:]).numel())
    if batch == 0 or features == 0:
        return grad_x, grad_mean, grad_log_std
    if tuple(grad.shape) != (batch,):
        raise RuntimeError(f"xlard.{op}: grad must be [{batch}], got {tuple(grad.shape)}")
    acc, acc_tl = _acc(x)
    block = _block(features)
    _gaussian_log_prob_bwd_kernel[(triton.cdiv(features, block),)](
        grad.contiguous(), x.contiguous(), mean.contiguous(), ls2,
        grad_x, grad_mean, grad_log_std, batch, features,
        SHARED=shared, ACC=acc_tl, BLOCK=block,
    )
    return grad_x, grad_mean, grad_log_std


@triton.jit
def _sample_correction_fwd_kernel(
    z0_ptr, mean_ptr, log_std_ptr, noise_ptr, alpha_ptr, const_ptr,
    zc_ptr, delta_ptr, partial_ptr, lam_ptr, C, S, P,
    sz_b, sz_c, sz_s, sm_b, sm_c, sm_s, sl_b, sl_c, sl_s, sn_b, sn_c, sn_s,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1).to(tl.int64)
    s = block * BLOCK + tl.arange(0, BLOCK)
    inside = s < S
    a = tl.load(alpha_ptr + b)
    half_log_2pi = tl.load(const_ptr)
    lam = tl.zeros([BLOCK], ACC)
    log_prob = tl.zeros([BLOCK], ACC)
    mean_p = mean_ptr + b * sm_b + s * sm_s
    log_std_p = log_std_ptr + b * sl_b + s * sl_s
    noise_p = noise_ptr + b * sn_b + s * sn_s
    z0_p = z0_ptr + b * sz_b + s * sz_s
    out = b * C * S + s
    for _c in range(0, C):
        mean = tl.load(mean_p, mask=inside, other=0).to(ACC)
        log_std = tl.load(log_std_p, mask=inside, other=0).to(ACC)
        noise = tl.load(noise_p, mask=inside, other=0).to(ACC)
        z0 = tl.load(z0_p, mask=inside, other=0).to(ACC)
        # delta is rounded to the inputs' dtype first; zc and lam use the rounded value (docs/ops.md).
        delta = (mean + tl.exp(log_std) * noise).to(delta_ptr.dtype.element_ty)
        tl.store(delta_ptr + out, delta, mask=inside)
        delta = delta.to(ACC)
        zc = z0 + a * delta
        tl.store(zc_ptr + out, zc.to(zc_ptr.dtype.element_ty), mask=inside)
        lam += tl.abs(delta)
        log_prob += tl.where(inside, -0.5 * noise * noise - log_std - half_log_2pi, 0.0)
        mean_p += sm_c
        log_std_p += sl_c
        noise_p += sn_c
        z0_p += sz_c
        out += S
    tl.store(lam_ptr + b * S + s, lam, mask=inside)
    tl.store(partial_ptr + b * P + block, tl.sum(log_prob, 0))


def sample_correction_fwd(z0: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor, noise: torch.Tensor,
                          alpha, alpha_scalar: float):
    """Fused rollout step: ``delta = mean + exp(log_std) * noise``, ``zc = z0 + a_b * delta``,
    ``log_prob = sum(-0.5 noise^2 - log_std - 0.5 log 2 pi)`` and ``lam = sum_c |delta|``.

    Args:
        z0, mean, noise (Tensor[B, C, *spatial]): same shape and floating dtype.
        log_std (Tensor): shape ``z0.shape[1:]`` (shared) or ``z0.shape``.
        alpha (Tensor[B], optional): per-item step; else ``alpha_scalar``.

    Returns:
        (zc, delta) in the inputs' dtype, log_prob [B] and lam [B, *spatial] in float32 (float64).
    """
    op = "sample_correction"
    _same_shape(op, "z0", z0, mean=mean, noise=noise)
    z3, m3, n3 = _bcs(op, "z0", z0), _bcs(op, "mean", mean), _bcs(op, "noise", noise)
    batch, channels, size = z3.shape
    if log_std.shape == z0.shape[1:]:
        l3 = log_std.reshape(1, channels, size)
        l_strides = (0, l3.stride(1), l3.stride(2))
    elif log_std.shape == z0.shape:
        l3 = _bcs(op, "log_std", log_std)
        l_strides = l3.stride()
    else:
        raise RuntimeError(f"xlard.{op}: log_std must have shape {tuple(z0.shape[1:])} or {tuple(z0.shape)}, "
                           f"got {tuple(log_std.shape)}")
    acc, acc_tl = _acc(z0)
    alpha_v = _alpha_vector(op, alpha, alpha_scalar, batch, acc, z0.device)
    zc = torch.empty(z0.shape, dtype=mean.dtype, device=z0.device)
    delta = torch.empty(z0.shape, dtype=mean.dtype, device=z0.device)
    lam = torch.zeros((batch, *z0.shape[2:]), dtype=acc, device=z0.device)
    if batch == 0 or size == 0 or channels == 0:
        return zc, delta, torch.zeros(batch, dtype=acc, device=z0.device), lam
    block = _block(size)
    parts = triton.cdiv(size, block)
    check_grid_axis1("sample_correction", parts, f"a latent of {size} cells per channel")
    partial = torch.empty(batch, parts, dtype=acc, device=z0.device)
    const = torch.full((1,), _HALF_LOG_2PI, dtype=acc, device=z0.device)
    _sample_correction_fwd_kernel[(batch, parts)](
        z3, m3, l3, n3, alpha_v, const, zc, delta, partial, lam, channels, size, parts,
        *z3.stride(), *m3.stride(), *l_strides, *n3.stride(),
        ACC=acc_tl, BLOCK=block,
    )
    return zc, delta, partial.sum(1), lam
