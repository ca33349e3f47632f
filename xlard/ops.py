"""The public xlard ops: connected components, centroids, position and color scores,
and the fused PPO-side latent ops.

Each wrapper validates its arguments (errors name the argument, what was
expected and what came), normalises shapes and calls the ``xlard::`` op through
the dispatcher, so ``torch.compile``, ``opcheck`` and CUDA graphs all work. The
exact semantics are in ``docs/ops.md``; ``xlard.reference`` holds the slow
references. This module also registers the fake kernels and autograd formulas.

Example:
    >>> import torch, xlard.ops
    >>> maps = torch.rand(2, 77, 32, 32)
    >>> counts = xlard.ops.count_components(maps, threshold=0.5, min_area=4)
    >>> counts.shape
    torch.Size([2, 77])
"""
from __future__ import annotations

import torch
from torch import Tensor

from xlard import _args, _backends, _extension, _registration, _triton_ops
from xlard._args import Mode  # noqa: F401  (how a map is cut, for type checkers: xlard.ops.Mode)
from xlard._backends import provider  # noqa: F401  (public: xlard.ops.provider)

__all__ = [
    "LEFT_OF", "RIGHT_OF", "ABOVE", "BELOW", "provider",
    "label_components", "count_components", "component_stats", "attention_centroids",
    "position_scores", "color_scores", "residual_correction", "gaussian_log_prob", "sample_correction",
    "cpu_buffer_cache_bytes", "empty_cpu_buffer_cache", "cpu_isa",
]

# Relation codes of position_scores: "token a is <code> of token b" (y grows downward).
from xlard.vocab import ABOVE, BELOW, LEFT_OF, RIGHT_OF  # noqa: E402  (public: xlard.ops.LEFT_OF ...)


def _op(name: str, device: torch.device):
    if torch.compiler.is_compiling():
        # The same choice as eager mode, made at trace time (and guarded on the provider); under a traced
        # torch.func transform (compile(grad(f))) through the autograd.Function, as in eager mode.
        packet = _backends.compiled_op(name, device)
        if torch._C._are_functorch_transforms_active():
            return _registration.functorch_entry(packet)
        return packet
    _extension.require_ops()
    if device.type == "cpu":
        _extension.sync_cpu_env()
    if device.type == "meta":  # shapes only: the ops' registered fake kernels, whatever the provider
        return getattr(torch.ops.xlard, name)
    packet = _backends.resolve(name, device)
    if torch._C._are_functorch_transforms_active():
        return _registration.functorch_entry(packet)
    return packet


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` unwrapped from torch.func transforms (vmap's batched tensors hold every batch's values): host-side
    value checks read it, since a check on the wrapper is data-dependent control flow vmap refuses. Each vmap
    dimension is moved to the front, so the result reads as ``[*vmap sizes, *t.shape]`` wherever ``in_dims``
    put it (a check reading the last dimension reads ``t``'s last dimension)."""
    if torch._C._are_functorch_transforms_active():
        functorch = torch._C._functorch
        while functorch.is_functorch_wrapped_tensor(t):
            bdim = functorch.maybe_get_bdim(t) if functorch.is_batchedtensor(t) else -1
            t = functorch.get_unwrapped(t)
            if bdim > 0:
                t = t.movedim(bdim, 0)
    return t


def _has_values(t: torch.Tensor) -> bool:
    """False for tensors that carry shapes only (meta; fake tensors of FakeTensorMode, make_fx, torch.export):
    a host-side value check on them raised DataDependentOutputException."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type != "meta" and not is_fake(_plain(t))


def _refuse_grad_transform(op: str, **tensors) -> None:
    """Raise when a torch.func transform (grad, jacrev, vjp) differentiates an input of a
    non-differentiable op: its outputs would silently get a zero gradient there."""
    if not torch._C._are_functorch_transforms_active():
        return
    functorch = torch._C._functorch
    for name, t in tensors.items():
        while isinstance(t, torch.Tensor) and functorch.is_functorch_wrapped_tensor(t):
            if functorch.is_gradtrackingtensor(t) and t.requires_grad:
                raise RuntimeError(f"xlard.{op}: not differentiable, but a torch.func transform differentiates "
                                   f"{name}; call it on {name}.detach() or outside the transform")
            t = functorch.get_unwrapped(t)


# ----------------------------------------------------------------------------------
# Connected components


def label_components(maps: Tensor, threshold: float = 0.5, mode: Mode = "relative", min_area: int = 1,
                     connectivity: int = 8) -> tuple[Tensor, Tensor]:
    """Label the connected components of thresholded maps.

    Args:
        maps (Tensor[..., H, W]): float16/bfloat16/float32/float64 scores, or
            bool/uint8 masks (masks ignore ``threshold`` and ``mode``). Any
            device with a provider; any strides (a strided view is copied once).
        threshold (float): the cut; see ``mode``.
        mode (str): ``"absolute"`` (value > threshold), ``"relative"`` (value >
            threshold * max of that map, threshold in [0, 1); a map whose max is
            <= 0 has no foreground) or ``"otsu"`` (per-map Otsu, 256 bins between min and max).
            Non-finite values are background and ignored for max/min.
        min_area (int): components with fewer pixels are dropped (label 0).
        connectivity (int): 4 or 8.

    Returns:
        (labels int32 [..., H, W], counts int32 [...]): labels 1..n numbered in
        raster order of each component's first pixel (deterministic, identical
        on every provider); 0 is background.

    Raises:
        TypeError, ValueError: for a bad argument, naming it.

    Example:
        >>> import torch, xlard.ops
        >>> labels, counts = xlard.ops.label_components(torch.rand(4, 16, 16), 0.7)
        >>> labels.shape, labels.dtype, counts.shape
        (torch.Size([4, 16, 16]), torch.int32, torch.Size([4]))
    """
    _args.check_components_args("label_components", maps, threshold, mode, min_area, connectivity)
    _args.check_host_memory("label_components", maps.numel() * 4, maps=maps)
    _refuse_grad_transform("label_components", maps=maps)
    return _op("label_components", maps.device)(maps, float(threshold), mode, int(min_area), int(connectivity))


def count_components(maps: Tensor, threshold: float = 0.5, mode: Mode = "relative", min_area: int = 1,
                     connectivity: int = 8) -> Tensor:
    """Count connected components per map without materialising labels.

    Args: as :func:`label_components`.

    Returns:
        counts (Tensor[...], int32): equal to ``label_components(...)[1]``.

    Example:
        >>> import torch, xlard.ops
        >>> xlard.ops.count_components(torch.rand(2, 77, 64, 64), min_area=4).shape
        torch.Size([2, 77])
    """
    _args.check_components_args("count_components", maps, threshold, mode, min_area, connectivity)
    _args.check_host_memory("count_components", 0, maps=maps)
    _refuse_grad_transform("count_components", maps=maps)
    return _op("count_components", maps.device)(maps, float(threshold), mode, int(min_area), int(connectivity))


def component_stats(maps: Tensor, threshold: float = 0.5, mode: Mode = "relative", min_area: int = 1,
                    connectivity: int = 8, max_components: int = 16) -> tuple[Tensor, Tensor, Tensor]:
    """Counts, areas and centroids of the largest connected components per map.

    Args: as :func:`label_components`, plus
        max_components (int): K, the number of component slots returned.

    Returns:
        (counts int32 [...], areas int32 [..., K], centroids float32 [..., K, 2]):
        the K largest components by area (ties: smaller label first); centroid =
        mean pixel centre (x, y) in [0, 1], x right, y down, pixel (i, j) at
        ((j + 0.5) / W, (i + 0.5) / H). Unused slots: area 0, centroid NaN.

    Example:
        >>> import torch, xlard.ops
        >>> maps = torch.rand(2, 77, 32, 32)
        >>> counts, areas, centroids = xlard.ops.component_stats(maps, max_components=8)
        >>> counts.shape, areas.shape, centroids.shape
        (torch.Size([2, 77]), torch.Size([2, 77, 8]), torch.Size([2, 77, 8, 2]))
    """
    _args.require_max_components("component_stats", max_components)  # int(None) raised
    _args.check_components_args("component_stats", maps, threshold, mode, min_area, connectivity, max_components)
    _args.check_host_memory("component_stats", 0, maps=maps)
    _refuse_grad_transform("component_stats", maps=maps)
    return _op("component_stats", maps.device)(
        maps, float(threshold), mode, int(min_area), int(connectivity), int(max_components)
    )


# ----------------------------------------------------------------------------------
# Centroids and position scores


def attention_centroids(maps: Tensor) -> Tensor:
    """Attention-weighted centroid of each map.

    Args:
        maps (Tensor[..., H, W]): float16/bfloat16/float32/float64. Weights are
            ``max(value, 0)``; non-finite values weigh 0.

    Returns:
        Tensor[..., 2]: (x, y) in [0, 1] (x right, y down, pixel centres at
        ``(j + 0.5) / W``); float32 (float64 for float64 maps). An all-zero map
        gives (0.5, 0.5). Weights are divided by the map's largest weight
        before summing, so maps up to the float maximum give finite centroids.
        Differentiable in ``maps`` (to any order; ``torch.func.grad``/``jacrev``
        work, forward mode does not).

    Example:
        >>> import torch, xlard.ops
        >>> xlard.ops.attention_centroids(torch.rand(8, 77, 64, 64)).shape
        torch.Size([8, 77, 2])
    """
    _args.check_tensor("attention_centroids", "maps", maps, _args.FLOAT_DTYPES, min_dim=2)
    _args.check_host_memory("attention_centroids", 0, maps=maps)
    return _op("attention_centroids", maps.device)(maps)


def position_scores(centroids: Tensor, relations: Tensor, tau: float = 10.0) -> Tensor:
    """Soft scores of spatial relations between token centroids.

    Args:
        centroids (Tensor[B, T, 2]): (x, y) per token, y downward.
        relations (Tensor[B, R, 3] or [R, 3], int64): rows ``(a, b, code)``
            meaning "token a is <code> of token b", code in LEFT_OF=0,
            RIGHT_OF=1, ABOVE=2, BELOW=3.
        tau (float): sharpness, > 0.

    Returns:
        Tensor[B, R]: ``sigmoid(tau * (p_a - p_b) . v_code)``, float32 (float64
        for float64 centroids). Differentiable in ``centroids``.

    Raises:
        ValueError: an out-of-range token index or code (checked on the host
            for CPU tensors; on CUDA the check reads the relations once, except
            under CUDA-graph capture, where the CUDA kernel traps with a
            device-side assertion and the Triton kernel scores the row NaN and
            gives it no gradient), or
            ``tau`` not a finite number > 0.

    Example:
        >>> import torch, xlard.ops
        >>> rel = torch.tensor([[0, 1, xlard.ops.LEFT_OF]])
        >>> xlard.ops.position_scores(torch.tensor([[[0.2, 0.5], [0.8, 0.5]]]), rel)
        tensor([[0.9975]])
    """
    op = "position_scores"
    _args.check_position_args(op, centroids, relations, tau)
    out_size = 8 if centroids.dtype == torch.float64 else 4
    _args.check_host_memory(op, centroids.shape[0] * relations.shape[-2] * out_size, centroids=centroids,
                            relations=relations)
    if (not torch.compiler.is_compiling() and relations.numel() and _has_values(relations)
            and not (relations.is_cuda and torch.cuda.is_current_stream_capturing())):
        _args.check_relation_values(op, _plain(relations), centroids.shape[1])
    return _op(op, centroids.device)(centroids, relations, float(tau))


# ----------------------------------------------------------------------------------
# Color scores


def color_scores(patch_features: Tensor, color_embeddings: Tensor,
                 patch_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Best-matching patch per color word: max cosine similarity and its argmax.

    Args:
        patch_features (Tensor[B, N, D]): image patch features.
        color_embeddings (Tensor[C, D] or [B, C, D]): color-word text embeddings.
        patch_mask (Tensor[B, C, N], bool, optional): which patches each color
            may use (binds a color to an object's region).

    Returns:
        (scores float32 [B, C], index int64 [B, C]): a color with no allowed
        patch scores 0 with index -1; zero-norm vectors have similarity 0; ties
        go to the smallest patch index. Not differentiable: the outputs never
        require grad. Each vector is divided by its own max-abs first, so any
        finite input (1e30 in float32 included) scores its true cosine.

    Example:
        >>> import torch, xlard.ops
        >>> s, i = xlard.ops.color_scores(torch.randn(2, 196, 512), torch.randn(10, 512))
        >>> s.shape, s.dtype, i.dtype
        (torch.Size([2, 10]), torch.float32, torch.int64)
    """
    op = "color_scores"
    _args.check_color_args(op, patch_features, color_embeddings, patch_mask)
    _refuse_grad_transform(op, patch_features=patch_features, color_embeddings=color_embeddings)
    # outputs: float32 scores and int64 indices, [B, C]
    _args.check_host_memory(op, patch_features.shape[0] * color_embeddings.shape[-2] * 12,
                            patch_features=patch_features, color_embeddings=color_embeddings, patch_mask=patch_mask)
    return _op(op, patch_features.device)(patch_features, color_embeddings, patch_mask)


# ----------------------------------------------------------------------------------
# PPO-side latent ops


def residual_correction(z0: Tensor, delta: Tensor, alpha: float | Tensor = 1.0, *,
                        out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Apply the residual correction and compute its Latent Activation Map.

    Args:
        z0 (Tensor[B, C, *spatial]): the generator's latent.
        delta (Tensor[B, C, *spatial]): the corrector's output, same dtype.
        alpha (float or Tensor[B]): step size, per batch item if a tensor.

    Returns:
        (zc [B, C, *spatial] in z0's dtype, lam [B, *spatial] float32 (float64
        for float64 input)): ``zc = z0 + alpha * delta``, ``lam = sum_c |delta|``.
        Differentiable in ``z0``, ``delta`` and a tensor ``alpha``.
        out ((zc, lam), optional): caller-owned contiguous buffers of exactly
            those shapes and dtypes, on z0's device, sharing no memory with the
            inputs; they are written and returned. For loops that would
            otherwise allocate two latent-sized tensors per call. Not
            differentiable (refused when an input requires grad under grad mode).

    Example:
        >>> import torch, xlard.ops
        >>> z0, delta = torch.randn(2, 4, 64, 64), torch.randn(2, 4, 64, 64)
        >>> zc, lam = xlard.ops.residual_correction(z0, delta, 0.5)
        >>> zc.shape, lam.shape
        (torch.Size([2, 4, 64, 64]), torch.Size([2, 64, 64]))
        >>> torch.allclose(zc, z0 + 0.5 * delta), torch.allclose(lam, delta.abs().sum(dim=1))
        (True, True)
    """
    op = "residual_correction"
    _args.check_latents(op, z0=z0, delta=delta)
    alpha_t, alpha_s = _args.split_alpha(op, alpha, z0)
    _args.check_host_memory(op, 0 if out is not None else _latent_bytes(z0, "zc", "lam"), z0=z0, delta=delta)
    if out is not None:
        return _run_out(op, out, _latent_outputs(z0, "zc", "lam"), (z0, delta, alpha_t), (z0, delta, alpha_t, alpha_s))
    return _op(op, z0.device)(z0, delta, alpha_t, alpha_s)


def gaussian_log_prob(x: Tensor, mean: Tensor, log_std: float | Tensor) -> Tensor:
    """Diagonal Gaussian log-density, summed over all non-batch dimensions.

    Args:
        x (Tensor[B, ...]): the sample.
        mean (Tensor[B, ...]): same shape and dtype as ``x``.
        log_std (float or Tensor): scalar, ``[C]`` (per channel, dim 1 of x),
            or any shape broadcastable to ``x`` (``[C, 1, 1]``, full, ...).

    Returns:
        Tensor[B]: float32 (float64 for float64 inputs), always accumulated in
        float32 or better. Differentiable in ``x``, ``mean`` and ``log_std``.

    Example:
        >>> import torch, xlard.ops
        >>> x, mu = torch.randn(2, 16, 8, 8), torch.zeros(2, 16, 8, 8)
        >>> lp = xlard.ops.gaussian_log_prob(x, mu, torch.zeros(16))   # log_std per channel
        >>> lp.shape
        torch.Size([2])
    """
    op = "gaussian_log_prob"
    _args.check_latents(op, min_dim=1, x=x, mean=mean)
    log_std = _args.broadcast_log_std(log_std, x, op)
    # the kernel copies log_std (expanded to x's shape past the batch) into the accumulation type: working memory
    ls_bytes = log_std.numel() * (8 if x.dtype == torch.float64 else 4) if not log_std.is_contiguous() else 0
    _args.check_host_memory(op, ls_bytes, x=x, mean=mean)
    return _op(op, x.device)(x, mean, log_std)


def sample_correction(z0: Tensor, mean: Tensor, log_std: float | Tensor, noise: Tensor,
                      alpha: float | Tensor = 1.0, *,
                      out: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused PPO rollout step: sample a correction and apply it.

    ``delta = mean + exp(log_std) * noise``, then ``zc = z0 + alpha * delta``,
    ``log_prob`` = log-density of ``delta`` under N(mean, exp(log_std)^2) and
    ``lam = sum_c |delta|``, in one pass over memory.

    Args:
        z0, mean, noise (Tensor[B, C, *spatial]): same shape and dtype.
        log_std: as in :func:`gaussian_log_prob`.
        alpha (float or Tensor[B]): step size.
        out ((zc, delta, log_prob, lam), optional): caller-owned buffers, as in
            :func:`residual_correction`; written and returned.

    Returns:
        (zc, delta, log_prob float32 [B], lam float32 [B, *spatial]).

    Raises:
        RuntimeError: if called with inputs that require grad (a tensor ``alpha``
            included) under grad mode (a rollout step is not differentiable; wrap
            it in torch.no_grad()).

    Example:
        >>> import torch, xlard.ops
        >>> z0, mu, log_std = torch.randn(2, 4, 64, 64), torch.zeros(2, 4, 64, 64), torch.full((4,), -1.0)
        >>> with torch.no_grad():
        ...     zc, delta, logp, lam = xlard.ops.sample_correction(z0, mu, log_std, torch.randn_like(z0), 0.5)
        >>> delta.shape, logp.shape, lam.shape
        (torch.Size([2, 4, 64, 64]), torch.Size([2]), torch.Size([2, 64, 64]))
    """
    op = "sample_correction"
    _args.check_latents(op, z0=z0, mean=mean, noise=noise)
    log_std = _args.broadcast_log_std(log_std, z0, op)
    alpha_t, alpha_s = _args.split_alpha(op, alpha, z0)
    _args.check_host_memory(op, 0 if out is not None else _latent_bytes(z0, "zc", "delta", "log_prob", "lam"),
                            z0=z0, mean=mean, noise=noise)  # log_std: read per channel or as given, not copied
    if _records_graph() and any(t is not None and t.requires_grad for t in (z0, mean, noise, log_std, alpha_t)):
        raise RuntimeError(f"xlard.{op}: a rollout step is not differentiable; call it under torch.no_grad() "
                           "(use residual_correction and gaussian_log_prob for gradients)")
    if out is not None:
        return _run_out(op, out, _latent_outputs(z0, "zc", "delta", "log_prob", "lam"),
                        (z0, mean, noise, log_std, alpha_t), (z0, mean, log_std, noise, alpha_t, alpha_s))
    return _op(op, z0.device)(z0, mean, log_std, noise, alpha_t, alpha_s)


def cpu_buffer_cache_bytes() -> int:
    """Bytes of freed CPU output buffers xlard holds for reuse.

    ``residual_correction`` and ``sample_correction`` on the CPU take their large
    outputs (>= 1 MiB each) from a small cache, and those buffers return to it when
    the tensors are freed, so a loop that drops each step's outputs does not allocate
    and page-fault tens of MiB per call. The cache holds at most
    ``XLARD_CPU_BUFFER_CACHE_MB`` MiB (default 256; 0 turns it off).

    Example:
        >>> import torch, xlard.ops
        >>> _ = xlard.ops.empty_cpu_buffer_cache()   # start empty (as a fresh process does)
        >>> xlard.ops.cpu_buffer_cache_bytes()
        0
        >>> zc, lam = xlard.ops.residual_correction(torch.zeros(4, 4, 256, 256), torch.ones(4, 4, 256, 256), 0.5)
        >>> del zc, lam   # their buffers (4 MiB and 1 MiB) go back to the cache
        >>> xlard.ops.cpu_buffer_cache_bytes()
        5242880
    """
    _extension.require_ops()
    _extension.sync_cpu_env()
    return int(torch.ops.xlard._cpu_buffer_cache(False))


def empty_cpu_buffer_cache() -> int:
    """Frees every cached CPU output buffer (see :func:`cpu_buffer_cache_bytes`);
    returns how many bytes that released. Tensors still in use are not touched."""
    _extension.require_ops()
    _extension.sync_cpu_env()
    return int(torch.ops.xlard._cpu_buffer_cache(True))


def cpu_isa() -> str:
    """The x86 vector level the CPU latent kernels run at now: ``"baseline"``, ``"avx2"`` or ``"avx512"``
    (the CPU's best, capped by ``XLARD_CPU_ISA``; see docs/ops.md).

    Raises:
        ValueError: ``XLARD_CPU_ISA`` holds something else than a level.

    Example:
        >>> import xlard.ops
        >>> xlard.ops.cpu_isa()   # on a CPU with AVX-512  # doctest: +SKIP
        'avx512'
    """
    _extension.require_ops()
    _extension.sync_cpu_env()
    return str(torch.ops.xlard._cpu_isa())


def _latent_outputs(z0: torch.Tensor, *names: str) -> tuple[tuple[str, tuple, torch.dtype], ...]:
    """(name, shape, dtype) of the named outputs of the latent ops for latents ``z0``."""
    acc_t = torch.float64 if z0.dtype == torch.float64 else torch.float32
    shapes = {"zc": (tuple(z0.shape), z0.dtype), "delta": (tuple(z0.shape), z0.dtype),
              "log_prob": ((z0.shape[0],), acc_t), "lam": ((z0.shape[0], *z0.shape[2:]), acc_t)}
    return tuple((name, *shapes[name]) for name in names)


def _latent_bytes(z0: torch.Tensor, *names: str) -> int:
    """Bytes of the named outputs of the latent ops for latents ``z0``."""
    total = 0
    for _, shape, dtype in _latent_outputs(z0, *names):
        n = 1
        for k in shape:
            n *= k
        total += n * dtype.itemsize
    return total


def _records_graph() -> bool:
    """Whether autograd would record a graph here: grad mode on, and not inside ``torch.inference_mode()``
    (where ``torch.enable_grad()`` turns grad mode on but nothing is recorded)."""
    return torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def _run_out(op: str, out, specs: tuple, inputs: tuple, args: tuple):
    """Run ``op`` into the caller's buffers ``out`` (``specs``: name, shape, dtype each); returns them as a tuple.

    The C++ CPU kernel writes the buffers directly (``xlard::<op>.out``); other
    providers compute the result and copy it in. Buffers are checked here, with the
    same rules on every provider.
    """
    names = tuple(spec[0] for spec in specs)
    if not isinstance(out, (tuple, list)) or len(out) != len(names) or not all(
            isinstance(t, torch.Tensor) for t in out):
        got = type(out).__name__ if not isinstance(out, (tuple, list)) else f"{len(out)} items"
        raise TypeError(f"xlard.{op}: out must be a tuple of {len(names)} tensors ({', '.join(names)}), got {got}")
    if _records_graph() and any(t is not None and t.requires_grad for t in (*inputs, *out)):
        raise RuntimeError(f"xlard.{op}: out= is not differentiable; call it under torch.no_grad() "
                           "or drop out= to get autograd")
    z0 = inputs[0]
    for (name, shape, dtype), buf in zip(specs, out):
        if buf.shape != shape or buf.dtype != dtype or buf.device != z0.device:
            raise ValueError(f"xlard.{op}: out tensor {name} must be {dtype} of shape {list(shape)} on "
                             f"{z0.device}, got {buf.dtype} of shape {list(buf.shape)} on {buf.device}")
        if not buf.is_contiguous():
            raise ValueError(f"xlard.{op}: out tensor {name} must be contiguous, got strides {buf.stride()}")
    if not torch.compiler.is_compiling():
        # Buffer addresses exist only in eager mode. Under torch.compile the out= call is
        # functionalized (results computed, then copied in), so an input sharing memory
        # with a buffer is read before it is written there.
        ins = [span for span in map(_byte_span, (t for t in inputs if t is not None)) if span is not None]
        outs = [_byte_span(buf) for buf in out]
        for i, (name, span) in enumerate(zip(names, outs)):
            if span is not None and any(_overlap(span, other) for other in (*ins, *outs[i + 1:]) if other is not None):
                raise ValueError(f"xlard.{op}: out tensor {name} shares memory with another input or output; "
                                 "pass separate buffers")
    kernel = _op(op, z0.device)
    if z0.device.type == "cpu" and _backends.requested_provider("cpu") == "cpu":
        getattr(torch.ops.xlard, op).out(*args, **dict(zip(names, out)))
        return tuple(out)
    for buf, res in zip(out, kernel(*args)):
        buf.copy_(res)
    return tuple(out)


def _byte_span(t: torch.Tensor):
    """(device, first byte, end byte) of the memory a tensor can touch (conservative for
    strided views); None when it is empty. Live allocations never overlap, so two tensors
    share memory exactly when their spans on one device intersect."""
    from torch._subclasses.fake_tensor import is_fake

    n = t.numel()
    # meta and fake tensors (FakeTensorMode, make_fx, torch.export) hold no memory: every data_ptr() is 0; a
    # functional tensor's is refused
    if n == 0 or t.device.type == "meta" or is_fake(t) or torch._is_functional_tensor(t):
        return None
    lo, size = t.data_ptr(), t.element_size()
    if t.is_contiguous():
        return t.device, lo, lo + n * size
    return t.device, lo, lo + sum((k - 1) * st for k, st in zip(t.shape, t.stride())) * size + size


def _overlap(a, b) -> bool:
    return a[1] < b[2] and b[1] < a[2] and a[0] == b[0]


# ----------------------------------------------------------------------------------
# Fake kernels and autograd live in xlard._registration (shared with xlard_triton::).
# Where _C has no CUDA kernels, the Triton launchers become the xlard:: CUDA kernels.

if _extension.has_ops():
    _registration.register_python_side("xlard")
    _triton_ops.register_as_xlard_cuda_kernels()
