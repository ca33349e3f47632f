"""Fake kernels and autograd of the xlard ops, for every namespace that defines them.

``register_python_side(ns)`` attaches them to ``xlard::`` (the schemas of
``csrc/registration.cpp``, imported by :mod:`xlard.ops`) and to
``xlard_triton::`` (the same schemas, defined by :mod:`xlard._triton_ops`).
Both sides import this module, and it imports neither of them, so there is no
import cycle.

Fake kernels check shapes and dtypes with ``torch._check`` and word their
errors as the C++ host checks do (``csrc/checks.h``), so a bad call fails at
trace time with the message eager mode gives.

Autograd: each differentiable op gets an ``Autograd`` kernel that applies an
:class:`torch.autograd.Function` with ``setup_context`` (so ``torch.func.grad``,
``jacrev`` and ``vmap`` work). Its backward calls the fast ``_<op>_backward``
op; when a graph of the backward itself is wanted (``create_graph=True``,
``gradgradcheck``, functorch transforms), it computes the same gradient as a
composite of differentiable torch ops instead, so second derivatives are exact.
The non-differentiable ops get a kernel that runs below autograd: their float
outputs never claim ``requires_grad`` (like ``torch.argmax``), and
``sample_correction`` refuses inputs that require grad.
"""
from __future__ import annotations

import math

import torch

_SCALAR_NAMES = {
    torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float", torch.float64: "Double",
    torch.bool: "Bool", torch.uint8: "Byte", torch.int32: "Int", torch.int64: "Long",
}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

# Which (namespace, op) pairs already carry these registrations (a Library may hold one of each).
_done: set[str] = set()
_libraries: list[torch.library.Library] = []
# (namespace, op) -> the autograd.Function of a differentiable op (see functorch_entry).
_functions: dict[tuple[str, str], type] = {}


def _sizes(shape) -> str:
    """A shape as c10 prints it in TORCH_CHECK messages: ``[2, 3]``."""
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _name(dtype: torch.dtype) -> str:
    """A dtype as c10 prints it (``Float``, ``Long``)."""
    return _SCALAR_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _check(cond, message) -> None:
    torch._check(cond, lambda: message() if callable(message) else message)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _batch(maps):
    return maps.shape[:-2]


# ----------------------------------------------------------------------------------
# Shape and dtype checks of the fake kernels (the words of csrc/checks.h)


def _check_component_maps(op, maps, threshold, mode, min_area, connectivity):
    _check(maps.dim() >= 2, lambda: f"xlard.{op}: maps must have shape [..., H, W], got {_sizes(maps.shape)}")
    _check(maps.dtype in _FLOATS + (torch.bool, torch.uint8),
           lambda: f"xlard.{op}: maps must be float16, bfloat16, float32, float64, bool or uint8, got "
                   f"{_name(maps.dtype)}")
    if maps.dtype not in (torch.bool, torch.uint8):
        _check(mode in ("absolute", "relative", "otsu"),
               lambda: f"xlard.{op}: mode must be 'absolute', 'relative' or 'otsu', got '{mode}'")
    _check(math.isfinite(threshold), lambda: f"xlard.{op}: threshold must be finite, got {threshold}")
    _check(min_area >= 1, lambda: f"xlard.{op}: min_area must be >= 1, got {min_area}")
    _check(connectivity in (4, 8), lambda: f"xlard.{op}: connectivity must be 4 or 8, got {connectivity}")


def _check_float_maps(op, maps):
    _check(maps.dim() >= 2, lambda: f"xlard.{op}: maps must have shape [..., H, W], got {_sizes(maps.shape)}")
    _check(maps.dtype in _FLOATS,
           lambda: f"xlard.{op}: maps must be float16, bfloat16, float32 or float64, got {_name(maps.dtype)}")


def _check_relations(op, centroids, relations):
    _check(centroids.dim() == 3 and centroids.shape[-1] == 2,
           lambda: f"xlard.{op}: centroids must have shape [B, T, 2], got {_sizes(centroids.shape)}")
    _check(centroids.dtype in _FLOATS,
           lambda: f"xlard.{op}: centroids must be a floating dtype, got {_name(centroids.dtype)}")
    _check(relations.dtype == torch.int64, lambda: f"xlard.{op}: relations must be int64, got {_name(relations.dtype)}")
    _check(relations.dim() in (2, 3) and relations.shape[-1] == 3,
           lambda: f"xlard.{op}: relations must have shape [R, 3] or [B, R, 3], got {_sizes(relations.shape)}")
    if relations.dim() == 3:
        _check(relations.shape[0] == centroids.shape[0],
               lambda: f"xlard.{op}: relations batch size {relations.shape[0]} does not match centroids batch size "
                       f"{centroids.shape[0]}")


def _check_color(features, colors, mask):
    op = "xlard.color_scores"
    _check(features.dim() == 3, lambda: f"{op}: patch_features must have shape [B, N, D], got {_sizes(features.shape)}")
    _check(colors.dim() in (2, 3),
           lambda: f"{op}: color_embeddings must have shape [C, D] or [B, C, D], got {_sizes(colors.shape)}")
    _check(features.dtype in _FLOATS and colors.dtype in _FLOATS,
           lambda: f"{op}: patch_features and color_embeddings must be floating, got {_name(features.dtype)} and "
                   f"{_name(colors.dtype)}")
    b, n, d = features.shape
    _check(colors.shape[-1] == d, lambda: f"{op}: color_embeddings feature size {colors.shape[-1]} does not match "
                                          f"patch_features feature size {d}")
    if colors.dim() == 3:
        _check(colors.shape[0] == b, lambda: f"{op}: color_embeddings batch size {colors.shape[0]} does not match "
                                             f"patch_features batch size {b}")
    if mask is not None:
        c = colors.shape[-2]
        _check(mask.dtype == torch.bool, lambda: f"{op}: patch_mask must be bool, got {_name(mask.dtype)}")
        _check(mask.dim() == 3 and tuple(mask.shape) == (b, c, n),
               lambda: f"{op}: patch_mask must have shape [B, C, N] = [{b}, {c}, {n}], got {_sizes(mask.shape)}")


def _check_latent(op, name, t):
    _check(t.dim() >= 2, lambda: f"xlard.{op}: {name} must have shape [B, C, *spatial], got {_sizes(t.shape)}")
    _check(t.dtype in _FLOATS,
           lambda: f"xlard.{op}: {name} must be float16, bfloat16, float32 or float64, got {_name(t.dtype)}")


def _check_same(op, name, t, ref_name, ref):
    _check(t.shape == ref.shape,
           lambda: f"xlard.{op}: {name} must have the shape of {ref_name} {_sizes(ref.shape)}, got {_sizes(t.shape)}")
    _check(t.dtype == ref.dtype, lambda: f"xlard.{op}: {name} must have the dtype of {ref_name} ({_name(ref.dtype)}), "
                                         f"got {_name(t.dtype)}")


def _check_alpha(op, alpha, ref):
    if alpha is None:
        return
    _check(alpha.dtype in _FLOATS, lambda: f"xlard.{op}: alpha must be floating, got {_name(alpha.dtype)}")
    _check(alpha.dim() == 1 and alpha.shape[0] == ref.shape[0],
           lambda: f"xlard.{op}: alpha must have shape [B] = [{ref.shape[0]}], got {_sizes(alpha.shape)}")


def _check_log_std(op, log_std, x):
    _check(log_std.dtype in _FLOATS, lambda: f"xlard.{op}: log_std must be floating, got {_name(log_std.dtype)}")
    _check(log_std.shape == x.shape[1:] or log_std.shape == x.shape,
           lambda: f"xlard.{op}: log_std must have shape x.shape[1:] = {_sizes(x.shape[1:])} or x.shape = "
                   f"{_sizes(x.shape)} (xlard.ops broadcasts it), got {_sizes(log_std.shape)}")


def _lam_shape(z):
    return (z.shape[0], *z.shape[2:])


def _check_out(op, name, out, shape, dtype, ref):
    _check(tuple(out.shape) == tuple(shape),
           lambda: f"xlard.{op}: out tensor {name} must have shape {_sizes(shape)}, got {_sizes(out.shape)}")
    _check(out.dtype == dtype, lambda: f"xlard.{op}: out tensor {name} must have dtype {_name(dtype)}, got "
                                       f"{_name(out.dtype)}")
    _check(out.device == ref.device, lambda: f"xlard.{op}: out tensor {name} must be on {ref.device}, got {out.device}")


# ----------------------------------------------------------------------------------
# Differentiable composites of the backward ops (used when a graph of the backward is wanted)


def _scaled_weights(maps):
    """(positive-finite mask, weights divided by the map's max weight, that max) in the accumulation dtype.

    Dividing by the max keeps the sums finite for maps near the float range; the
    centroid does not depend on the scale, so the max is a constant for autograd.
    """
    v = maps.to(_acc(maps.dtype))
    pos = torch.isfinite(v) & (v > 0)
    wgt = torch.where(pos, v, torch.zeros_like(v))
    top = wgt.detach().amax((-2, -1), keepdim=True) if wgt.numel() else wgt.detach().sum((-2, -1), keepdim=True)
    scale = torch.where(top > 0, top, torch.ones_like(top))
    return pos, wgt / scale, scale


def centroids_backward_composite(grad, maps):
    """Gradient of attention_centroids with respect to ``maps``, from differentiable torch ops."""
    acc = _acc(maps.dtype)
    h, w = maps.shape[-2:]
    pos, wgt, scale = _scaled_weights(maps)
    xs = (torch.arange(w, dtype=acc, device=maps.device) + 0.5) / w
    ys = ((torch.arange(h, dtype=acc, device=maps.device) + 0.5) / h)[:, None]
    total = wgt.sum((-2, -1), keepdim=True)
    has_mass = total > 0
    safe = torch.where(has_mass, total, torch.ones_like(total))
    cx = (wgt * xs).sum((-2, -1), keepdim=True) / safe
    cy = (wgt * ys).sum((-2, -1), keepdim=True) / safe
    g = grad.to(acc)
    gx, gy = g[..., 0, None, None], g[..., 1, None, None]
    d = gx * (xs - cx) + gy * (ys - cy)
    # d / (scale * sum): by the product where scale < 1 (d / scale alone overflows for a subnormal scale), in two
    # steps where scale >= 1 (the product could overflow); as every provider. The divisors are chosen, not the
    # quotients: a where over both quotients computed the unused one, whose overflow put 0 * inf = NaN into the
    # second derivative.
    small = scale < 1
    d = d / torch.where(small, safe * scale, scale) / torch.where(small, torch.ones_like(safe), safe)
    return torch.where(pos & has_mass, d, torch.zeros_like(d)).to(maps.dtype)


def position_backward_composite(grad, centroids, relations, tau):
    """Gradient of position_scores with respect to ``centroids``, from differentiable torch ops."""
    acc = _acc(centroids.dtype)
    c = centroids.to(acc)
    b = c.shape[0]
    rel = relations if relations.dim() == 3 else relations.unsqueeze(0).expand(b, -1, -1)
    a_idx = rel[..., 0, None].expand(-1, -1, 2)
    b_idx = rel[..., 1, None].expand(-1, -1, 2)
    code = rel[..., 2]
    # (dx, dy) of LEFT_OF, RIGHT_OF, ABOVE, BELOW from the codes on the device (a table made there is a host copy)
    v = torch.stack(((code == 1).to(acc) - (code == 0).to(acc), (code == 3).to(acc) - (code == 2).to(acc)), -1)
    pa, pb = torch.gather(c, 1, a_idx), torch.gather(c, 1, b_idx)
    s = torch.sigmoid(tau * ((pa - pb) * v).sum(-1))
    k = (grad.to(acc) * s * (1 - s) * tau)[..., None] * v
    out = torch.zeros_like(c).scatter_add(1, a_idx, k).scatter_add(1, b_idx, -k)
    return out.to(centroids.dtype)


def gaussian_backward_composite(grad, x, mean, log_std):
    """Gradients of gaussian_log_prob (x, mean, log_std in its own shape), from differentiable torch ops."""
    acc = _acc(x.dtype)
    d = x.to(acc) - mean.to(acc)
    inv_var = torch.exp(-2 * log_std.to(acc))
    g = grad.to(acc).reshape(-1, *([1] * (x.dim() - 1)))
    gx = -g * d * inv_var
    gls = g * (d * d * inv_var - 1)
    if log_std.dim() < x.dim():  # shared over the batch
        gls = gls.sum(0)
    return gx.to(x.dtype), (-gx).to(x.dtype), gls.to(log_std.dtype)


def residual_backward_composite(grad_zc, grad_lam, delta, alpha, alpha_scalar):
    """Gradient of residual_correction with respect to ``delta``, from differentiable torch ops."""
    acc = _acc(delta.dtype)
    a = alpha.to(acc).reshape(-1, *([1] * (delta.dim() - 1))) if alpha is not None else alpha_scalar
    d = delta.to(acc)
    out = a * grad_zc.to(acc) + grad_lam.to(acc).unsqueeze(1) * torch.sign(d)
    return out.to(delta.dtype)


def _wants_graph(*tensors) -> bool:
    """Whether the backward being computed must itself be differentiable."""
    if torch._C._are_functorch_transforms_active():
        return True
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


# ----------------------------------------------------------------------------------
# Registration


def _function(name: str, forward_op, setup_context, backward):
    """An autograd.Function (functorch-ready: setup_context, generated vmap rule) around ``forward_op``."""

    def forward(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return forward_op(*args)

    def jvp(ctx, *tangents):
        raise NotImplementedError(f"xlard.{forward_op._opname}: forward-mode AD (torch.func.jvp, jacfwd, hessian) is "
                                  "not supported; use reverse mode (torch.func.grad, jacrev, vjp, torch.autograd)")

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward),
        "jvp": staticmethod(jvp),
        "generate_vmap_rule": True,
    })


def functorch_entry(packet):
    """What :mod:`xlard.ops` calls for ``packet`` (a ``torch.ops`` op) while a torch.func transform is active.

    Transforms (grad, jacrev, vmap) handle an autograd.Function only when it is
    applied before the dispatcher is entered, so the wrappers apply it directly;
    inside the dispatcher the Autograd kernel refuses with a clear error instead.
    """
    function = _functions.get((packet.default.namespace, packet.default._opname))
    return packet if function is None else function.apply


def _differentiable_kernel(function, op):
    def kernel(*args):
        if torch._C._are_functorch_transforms_active():
            raise RuntimeError(f"{op.name()}: torch.func transforms (grad, jacrev, vmap, ...) are supported "
                               f"through xlard.ops.{op._opname}, not on the torch.ops operator")
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return function.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    return kernel


def _below_autograd_kernel(op):
    def kernel(*args, **kwargs):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args, **kwargs)

    return kernel


def register_python_side(ns: str) -> None:
    """Register fake kernels and autograd for the ops of namespace ``ns`` (once per namespace)."""
    if ns in _done:
        return
    _done.add(ns)
    ops = getattr(torch.ops, ns)
    lib = torch.library.Library(ns, "IMPL")
    _libraries.append(lib)

    def fake(name):
        return torch.library.register_fake(f"{ns}::{name}", lib=lib)

    @fake("label_components")
    def _(maps, threshold, mode, min_area, connectivity):
        _check_component_maps("label_components", maps, threshold, mode, min_area, connectivity)
        return maps.new_empty(maps.shape, dtype=torch.int32), maps.new_empty(_batch(maps), dtype=torch.int32)

    @fake("count_components")
    def _(maps, threshold, mode, min_area, connectivity):
        _check_component_maps("count_components", maps, threshold, mode, min_area, connectivity)
        return maps.new_empty(_batch(maps), dtype=torch.int32)

    @fake("component_stats")
    def _(maps, threshold, mode, min_area, connectivity, max_components):
        _check_component_maps("component_stats", maps, threshold, mode, min_area, connectivity)
        _check(max_components >= 1,
               lambda: f"xlard.component_stats: max_components must be >= 1, got {max_components}")
        b = _batch(maps)
        return (maps.new_empty(b, dtype=torch.int32), maps.new_empty((*b, max_components), dtype=torch.int32),
                maps.new_empty((*b, max_components, 2), dtype=torch.float32))

    @fake("attention_centroids")
    def _(maps):
        _check_float_maps("attention_centroids", maps)
        return maps.new_empty((*_batch(maps), 2), dtype=_acc(maps.dtype))

    @fake("_attention_centroids_backward")
    def _(grad, maps, centroids):
        _check_float_maps("_attention_centroids_backward", maps)
        want = (*_batch(maps), 2)
        _check(tuple(grad.shape) == want and tuple(centroids.shape) == want,
               lambda: "xlard._attention_centroids_backward: grad and centroids must have shape [..., 2] matching "
                       f"maps, got {_sizes(grad.shape)} and {_sizes(centroids.shape)}")
        return torch.empty_like(maps, memory_format=torch.contiguous_format)

    @fake("position_scores")
    def _(centroids, relations, tau):
        _check_relations("position_scores", centroids, relations)
        _check(math.isfinite(tau) and tau > 0,
               lambda: f"xlard.position_scores: tau must be a finite number > 0, got {tau:g}")
        return centroids.new_empty((centroids.shape[0], relations.shape[-2]), dtype=_acc(centroids.dtype))

    @fake("_position_scores_backward")
    def _(grad, centroids, relations, tau):
        _check_relations("_position_scores_backward", centroids, relations)
        b, r = centroids.shape[0], relations.shape[-2]
        _check(grad.dim() == 2 and tuple(grad.shape) == (b, r),
               lambda: f"xlard._position_scores_backward: grad must have shape [B, R] = [{b}, {r}], got "
                       f"{_sizes(grad.shape)}")
        return centroids.new_empty(centroids.shape)

    @fake("color_scores")
    def _(patch_features, color_embeddings, patch_mask):
        _check_color(patch_features, color_embeddings, patch_mask)
        b, c = patch_features.shape[0], color_embeddings.shape[-2]
        dt = torch.float64 if torch.float64 in (patch_features.dtype, color_embeddings.dtype) else torch.float32
        return patch_features.new_empty((b, c), dtype=dt), patch_features.new_empty((b, c), dtype=torch.int64)

    def lam_like(z):
        return z.new_empty(_lam_shape(z), dtype=_acc(z.dtype))

    def check_residual(op, z0, delta, alpha):
        _check_latent(op, "z0", z0)
        _check_same(op, "delta", delta, "z0", z0)
        _check_alpha(op, alpha, z0)

    @fake("residual_correction")
    def _(z0, delta, alpha, alpha_scalar):
        check_residual("residual_correction", z0, delta, alpha)
        return z0.new_empty(z0.shape), lam_like(z0)

    def out_fake(name):
        # The out= overloads exist in xlard:: only (xlard_triton:: serves the functional ops).
        if hasattr(getattr(ops, name.split(".")[0]), "out"):
            return fake(name)
        return lambda fn: fn

    @out_fake("residual_correction.out")
    def _(z0, delta, alpha, alpha_scalar, *, zc, lam):
        op = "residual_correction"
        check_residual(op, z0, delta, alpha)
        _check_out(op, "zc", zc, z0.shape, z0.dtype, z0)
        _check_out(op, "lam", lam, _lam_shape(z0), _acc(z0.dtype), z0)

    @fake("_residual_correction_backward")
    def _(grad_zc, grad_lam, delta, alpha, alpha_scalar):
        op = "_residual_correction_backward"
        _check_latent(op, "delta", delta)
        _check(grad_zc.shape == delta.shape, lambda: f"xlard.{op}: grad_zc must have shape {_sizes(delta.shape)}, "
                                                     f"got {_sizes(grad_zc.shape)}")
        _check(tuple(grad_lam.shape) == _lam_shape(delta),
               lambda: f"xlard.{op}: grad_lam must have shape [B, *spatial], got {_sizes(grad_lam.shape)}")
        return delta.new_empty(delta.shape)

    def check_gaussian(op, x, mean, log_std):
        _check(x.dim() >= 1, lambda: f"xlard.{op}: x must have a batch dimension, got a 0-d tensor")
        _check(x.dtype in _FLOATS, lambda: f"xlard.{op}: x must be floating, got {_name(x.dtype)}")
        _check_same(op, "mean", mean, "x", x)
        _check_log_std(op, log_std, x)

    @fake("gaussian_log_prob")
    def _(x, mean, log_std):
        check_gaussian("gaussian_log_prob", x, mean, log_std)
        return x.new_empty((x.shape[0],), dtype=_acc(x.dtype))

    @fake("_gaussian_log_prob_backward")
    def _(grad, x, mean, log_std):
        op = "_gaussian_log_prob_backward"
        check_gaussian(op, x, mean, log_std)
        _check(grad.dim() == 1 and grad.shape[0] == x.shape[0],
               lambda: f"xlard.{op}: grad must have shape [B] = [{x.shape[0]}], got {_sizes(grad.shape)}")
        return x.new_empty(x.shape), x.new_empty(x.shape), log_std.new_empty(log_std.shape)

    def check_sample(op, z0, mean, log_std, noise, alpha):
        _check_latent(op, "z0", z0)
        _check_same(op, "mean", mean, "z0", z0)
        _check_same(op, "noise", noise, "z0", z0)
        _check_log_std(op, log_std, z0)
        _check_alpha(op, alpha, z0)

    @fake("sample_correction")
    def _(z0, mean, log_std, noise, alpha, alpha_scalar):
        check_sample("sample_correction", z0, mean, log_std, noise, alpha)
        return (z0.new_empty(z0.shape), z0.new_empty(z0.shape), z0.new_empty((z0.shape[0],), dtype=_acc(z0.dtype)),
                lam_like(z0))

    @out_fake("sample_correction.out")
    def _(z0, mean, log_std, noise, alpha, alpha_scalar, *, zc, delta, log_prob, lam):
        op = "sample_correction"
        check_sample(op, z0, mean, log_std, noise, alpha)
        _check_out(op, "zc", zc, z0.shape, z0.dtype, z0)
        _check_out(op, "delta", delta, z0.shape, z0.dtype, z0)
        _check_out(op, "log_prob", log_prob, (z0.shape[0],), _acc(z0.dtype), z0)
        _check_out(op, "lam", lam, _lam_shape(z0), _acc(z0.dtype), z0)

    _register_autograd(ns, ops, lib)
    _register_vmap(ns, ops, lib)


# ----------------------------------------------------------------------------------
# Batching rules (torch.func.vmap)
#
# Every op already takes a batch: the map ops any leading dims, the others a leading B. A vmapped call
# folds vmap's dimension N into that batch (N*B rows), runs the op once and unfolds the outputs; without a
# rule torch ran the op once per vmapped sample and warned about it. An argument the op shares over its
# batch (relations [R, 3], color embeddings [C, D], a log_std of the per-item shape) stays shared when vmap
# does not batch it, and is repeated over B when it does.


def _front(t, d):
    """``t`` with vmap's dim (``d``, None when unbatched) first."""
    return t if d is None else t.movedim(d, 0)


def _fold(t, d, n: int):
    """A per-sample ``[B, ...]`` argument as ``[N*B, ...]``."""
    t = _front(t, d) if d is not None else t.expand(n, *t.shape)
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])  # sizes spelled out: an empty batch has no -1


def _fold_shared(t, d, n: int, b: int, shared_rank: int):
    """An argument that is either shared over the op's batch (per-sample rank ``shared_rank``) or batch-leading
    (one more dim): unchanged when shared and unbatched, else ``[N*B, ...]``."""
    rank = t.dim() - (d is not None)
    if rank != shared_rank:
        return _fold(t, d, n)
    if d is None:
        return t
    t = _front(t, d)
    return t.unsqueeze(1).expand(n, b, *t.shape[1:]).reshape(n * b, *t.shape[1:])


def _unfold(t, n: int, b: int):
    return t.reshape(n, b, *t.shape[1:])


def _register_vmap(ns: str, ops, lib: torch.library.Library) -> None:
    def vmap(name):
        return lambda fn: torch.library.register_vmap(f"{ns}::{name}", fn, lib=lib)

    def leading(op):  # maps [..., H, W]: vmap's dim is one more leading dim
        def rule(info, in_dims, maps, *rest):
            out = op(_front(maps, in_dims[0]), *rest)
            return out, (tuple(0 for _ in out) if isinstance(out, tuple) else 0)

        return rule

    for name in ("label_components", "count_components", "component_stats", "attention_centroids"):
        vmap(name)(leading(getattr(ops, name).default))

    @vmap("position_scores")
    def _(info, in_dims, centroids, relations, tau):
        n, (dc, dr, _) = info.batch_size, in_dims
        b = _front(centroids, dc).shape[1] if dc is not None else centroids.shape[0]
        out = ops.position_scores(_fold(centroids, dc, n), _fold_shared(relations, dr, n, b, 2), tau)
        return _unfold(out, n, b), 0

    @vmap("color_scores")
    def _(info, in_dims, patch_features, color_embeddings, patch_mask):
        n, (dp, de, dm) = info.batch_size, in_dims
        b = _front(patch_features, dp).shape[1] if dp is not None else patch_features.shape[0]
        mask = None if patch_mask is None else _fold(patch_mask, dm, n)
        scores, index = ops.color_scores(_fold(patch_features, dp, n), _fold_shared(color_embeddings, de, n, b, 2),
                                         mask)
        return (_unfold(scores, n, b), _unfold(index, n, b)), (0, 0)

    def latent_batch(z, d):
        return _front(z, d).shape[1] if d is not None else z.shape[0]

    @vmap("residual_correction")
    def _(info, in_dims, z0, delta, alpha, alpha_scalar):
        n, (dz, dd, da, _) = info.batch_size, in_dims
        b = latent_batch(z0, dz) if dz is not None else latent_batch(delta, dd)
        a = None if alpha is None else _fold(alpha, da, n)
        zc, lam = ops.residual_correction(_fold(z0, dz, n), _fold(delta, dd, n), a, alpha_scalar)
        return (_unfold(zc, n, b), _unfold(lam, n, b)), (0, 0)

    @vmap("gaussian_log_prob")
    def _(info, in_dims, x, mean, log_std):
        n, (dx, dm, dl) = info.batch_size, in_dims
        b = latent_batch(x, dx)
        per_item = x.dim() - (dx is not None) - 1
        out = ops.gaussian_log_prob(_fold(x, dx, n), _fold(mean, dm, n), _fold_shared(log_std, dl, n, b, per_item))
        return _unfold(out, n, b), 0

    @vmap("sample_correction")
    def _(info, in_dims, z0, mean, log_std, noise, alpha, alpha_scalar):
        n, (dz, dm, dl, dn, da, _) = info.batch_size, in_dims
        b = latent_batch(z0, dz)
        per_item = z0.dim() - (dz is not None) - 1
        a = None if alpha is None else _fold(alpha, da, n)
        outs = ops.sample_correction(_fold(z0, dz, n), _fold(mean, dm, n),
                                     _fold_shared(log_std, dl, n, b, per_item), _fold(noise, dn, n), a, alpha_scalar)
        return tuple(_unfold(t, n, b) for t in outs), (0, 0, 0, 0)


def _register_autograd(ns: str, ops, lib: torch.library.Library) -> None:
    # attention_centroids
    def centroids_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)

    def centroids_backward(ctx, grad):
        maps, out = ctx.saved_tensors
        if _wants_graph(grad, maps):
            return centroids_backward_composite(grad, maps)
        return ops._attention_centroids_backward(grad, maps, out)

    # position_scores
    def position_setup(ctx, inputs, output):
        centroids, relations, tau = inputs
        ctx.save_for_backward(centroids, relations)
        ctx.tau = tau

    def position_backward(ctx, grad):
        centroids, relations = ctx.saved_tensors
        if _wants_graph(grad, centroids):
            return position_backward_composite(grad, centroids, relations, ctx.tau), None, None
        return ops._position_scores_backward(grad, centroids, relations, ctx.tau), None, None

    # residual_correction
    def residual_setup(ctx, inputs, output):
        z0, delta, alpha, alpha_scalar = inputs
        # Saved only for the gradients that read them (delta's and alpha's read both): with
        # only z0 requiring grad nothing latent-sized is kept alive, and a delta made under inference_mode() is
        # accepted as by torch's z0 + alpha * delta.
        wants_delta, wants_alpha = ctx.needs_input_grad[1], alpha is not None and ctx.needs_input_grad[2]
        ctx.save_for_backward(*((delta, alpha) if wants_delta or wants_alpha else (None, None)))
        ctx.alpha_scalar = alpha_scalar
        ctx.wants_alpha = wants_alpha

    def residual_backward(ctx, grad_zc, grad_lam):
        delta, alpha = ctx.saved_tensors
        grad_delta = None
        if ctx.needs_input_grad[1]:
            if _wants_graph(grad_zc, grad_lam, delta, alpha):
                grad_delta = residual_backward_composite(grad_zc, grad_lam, delta, alpha, ctx.alpha_scalar)
            else:
                grad_delta = ops._residual_correction_backward(grad_zc, grad_lam, delta, alpha, ctx.alpha_scalar)
        grad_alpha = None
        if ctx.wants_alpha:
            a = _acc(delta.dtype)
            grad_alpha = (grad_zc.to(a) * delta.to(a)).flatten(1).sum(1).to(alpha.dtype)
        return grad_zc, grad_delta, grad_alpha, None

    # gaussian_log_prob
    def gaussian_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def gaussian_backward(ctx, grad):
        x, mean, log_std = ctx.saved_tensors
        if _wants_graph(grad, x, mean, log_std):
            return gaussian_backward_composite(grad, x, mean, log_std)
        return ops._gaussian_log_prob_backward(grad, x, mean, log_std)

    formulas = {
        "attention_centroids": (centroids_setup, centroids_backward),
        "position_scores": (position_setup, position_backward),
        "residual_correction": (residual_setup, residual_backward),
        "gaussian_log_prob": (gaussian_setup, gaussian_backward),
    }
    for name, (setup, backward) in formulas.items():
        op = getattr(ops, name).default
        function = _function(f"{ns}_{name}_autograd", op, setup, backward)
        _functions[(ns, name)] = function
        lib.impl(name, _differentiable_kernel(function, op), "Autograd")

    # Not differentiable: outputs never require grad (no silent None gradient later).
    for name in ("label_components", "count_components", "component_stats", "color_scores"):
        lib.impl(name, _below_autograd_kernel(getattr(ops, name).default), "Autograd")

    sample = ops.sample_correction.default

    def sample_kernel(*args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            raise RuntimeError("xlard.sample_correction: a rollout step is not differentiable; call it under "
                               "torch.no_grad() (use residual_correction and gaussian_log_prob for gradients)")
        with torch._C._AutoDispatchBelowAutograd():
            return sample(*args)

    lib.impl("sample_correction", sample_kernel, "Autograd")
