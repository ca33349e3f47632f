"""GPU benchmarks: the CUDA C++ and Triton providers of xlard.ops against their peers.

Peers per group: the eager reference (``xlard.reference``, run with CUDA as the
default device), ``torch.compile`` of the reference, CuPy's
``cupyx.scipy.ndimage.label`` (looped over maps, and on the batch stacked as one
volume labelled with a 2D structure, both followed by the area filter) and a
device-to-device copy that reads as many bytes as the op (the bandwidth ceiling).
The speed targets (issue 3) are checked by ``python -m benches.gpu.report``.

How a benchmark is timed (``measure``):

- correctness is checked once, outside the timing, against the C++ CPU op;
- the public API is called (``xlard.ops`` under ``xlard.ops.provider(...)``);
- one timed round = ``calls_per_round`` back-to-back calls, then
  ``torch.cuda.synchronize()`` (the device is synchronized inside the timed call);
  the per-call wall time is the round's median / ``calls_per_round``;
- ``device_ms``: the per-call time between CUDA events around the same burst,
  enqueued behind a ``torch.cuda._sleep`` so that host overhead is hidden: the
  device's own time, used for the bandwidth targets; none for a call that waits on
  the GPU (reads a value back, e.g. a host-side check or a CuPy peer's count), whose
  host overhead would land between the events (``device_ms_note`` says so);
- the benches with a bandwidth target rotate their inputs over enough copies to exceed
  the L2 cache three times (at most 8 copies; enough for their shapes), so bandwidth is
  measured from memory, not from L2; the graph, component_stats, position_scores,
  gaussian_log_prob and some issue-14 benches do not rotate: their GB/s may be L2
  numbers;
- ``extra_info`` records ``bytes`` (read + written, compulsory traffic),
  ``bytes_read``, ``bytes_written`` and ``pixels``, so GB/s is derived.

``XLARD_GPU_BENCH_TIME_S`` (default 0.3) bounds the timed seconds per benchmark.
"""
from __future__ import annotations

import itertools
import math
import os
import time
from functools import lru_cache

import pytest
import torch

import xlard.ops as ops
import xlard.reference as ref
from helpers import blobs

THRESHOLD, MODE, MIN_AREA, CONNECTIVITY = 0.5, "relative", 4, 8
CC_SHAPE = (16, 77, 128, 128)
CC_GRAPH_SHAPE = (2, 77, 32, 32)
LATENT_SHAPE = (16, 16, 128, 128)
CENTROIDS_SHAPE = (16, 77, 128, 128)

BENCH_S = float(os.environ.get("XLARD_GPU_BENCH_TIME_S", "0.3"))
ROUND_S = 2e-3          # one timed round lasts about this long (many calls for fast ops)
MAX_CALLS_PER_ROUND = 2000
MIN_ROUNDS, MAX_ROUNDS = 3, 50
SLOW_S = 0.02           # per-call time above which device timing and extra calibration are skipped
SLEEP_CYCLES_PER_S = 2.0e9  # an upper bound of the SM clock: the sleep lasts at least as long as asked

XLARD_PROVIDERS = ("cuda", "triton")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def group_name(op: str, dtype: torch.dtype, shape, suffix: str = "") -> str:
    return f"{op} {dtype_name(dtype)} {'x'.join(map(str, shape))}{suffix}"


# ---------------------------------------------------------------- timing

def _sync() -> None:
    torch.cuda.synchronize()


def _host_time(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - start)
    return best


def _device_time(fn, calls: int, host_s: float) -> float:
    """Seconds per call between CUDA events, with the burst enqueued behind a device sleep."""
    sleep = getattr(torch.cuda, "_sleep", None)
    best = math.inf
    for _ in range(3):
        _sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if sleep is not None:
            sleep(int(min(1.0, 2.0 * host_s * calls + 1e-3) * SLEEP_CYCLES_PER_S))
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / calls)
    return best


def _waits_on_device(fn, host_s: float) -> bool:
    """Whether one call blocks on the GPU (it reads a value back, as a host-side check or a CuPy peer's count
    does): enqueued behind a device sleep, such a call lasts as long as the sleep. CUDA-event time of such calls
    is no device time (the host's overhead lands between the events), so they get none."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is None:
        return False
    pause = min(1.0, 0.05 + 4.0 * host_s)
    _sync()
    sleep(int(pause * SLEEP_CYCLES_PER_S))
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    _sync()
    return elapsed >= 0.5 * pause


def measure(benchmark, fn, *, group: str, provider: str, op: str, dtype: torch.dtype, shape, bytes_read: int,
            bytes_written: int, pixels: int | None = None, **extra) -> None:
    """Times ``fn`` (already checked for correctness) with pytest-benchmark; see the module docstring."""
    benchmark.group = group
    fn()  # warm-up: JIT compilation, allocator, lazy initialisation
    _sync()
    single = _host_time(fn, 1)
    if single < SLOW_S:
        single = min(single, _host_time(fn, 3))
    calls = max(1, min(MAX_CALLS_PER_ROUND, round(ROUND_S / single)))
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(BENCH_S / (calls * single))))
    waits = single < SLOW_S and _waits_on_device(fn, single)
    device_ms = _device_time(fn, calls, single) * 1e3 if single < SLOW_S and not waits else None
    if waits:
        benchmark.extra_info["device_ms_note"] = "the call waits on the GPU (reads a value back): no device time"
    benchmark.extra_info.update(
        provider=provider, op=op, dtype=dtype_name(dtype), shape="x".join(map(str, shape)),
        bytes=bytes_read + bytes_written, bytes_read=bytes_read, bytes_written=bytes_written,
        calls_per_round=calls, device_ms=device_ms, **({"pixels": pixels} if pixels is not None else {}), **extra,
    )

    def one_round():
        for _ in range(calls):
            fn()
        _sync()

    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)


def rotation(bytes_per_set: int) -> int:
    """How many copies of the inputs to cycle through so that they exceed the L2 cache three times."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20) or 50 * 2**20
    return max(1, min(8, math.ceil(3 * l2 / max(bytes_per_set, 1))))


def cycling(call, input_sets):
    """A no-argument function calling ``call(*inputs)`` with the next input set each time."""
    sets = itertools.cycle(input_sets)
    return lambda: call(*next(sets))


# ---------------------------------------------------------------- providers

def xlard_call(provider: str, op: str):
    """The public op under ``xlard.ops.provider(provider)``, or a skip naming why it cannot run."""
    from xlard import _backends, _extension

    if not _extension.has_ops():
        pytest.skip(f"xlard._C is not built ({_extension.load_error()!r})")
    why = _backends.why_not(provider, "cuda", op)
    if why is not None:
        pytest.skip(f"provider {provider!r}: {why}")
    public = getattr(ops, op)

    def call(*args):
        with ops.provider(provider):
            return public(*args)

    return call


def on_device(fn):
    """Runs a reference with the inputs' device as default device (the references build index tensors)."""

    def call(*args):
        with torch.device(args[0].device):
            return fn(*args)

    return call


def compiled(fn):
    return on_device(torch.compile(fn, dynamic=False))


def copy_bench(benchmark, group: str, dtype: torch.dtype, bytes_read: int, op: str, shape) -> None:
    """The bandwidth ceiling: ``dst.copy_(src)`` reading as many bytes as the op reads."""
    numel = bytes_read // torch.empty((), dtype=dtype).element_size()
    sets = [(torch.empty(numel, dtype=dtype, device="cuda").uniform_(), torch.empty(numel, dtype=dtype, device="cuda"))
            for _ in range(rotation(2 * bytes_read))]
    fn = cycling(lambda src, dst: dst.copy_(src), sets)
    fn()
    assert torch.equal(sets[0][0], sets[0][1])
    measure(benchmark, fn, group=group, provider="copy", op=op, dtype=dtype, shape=shape,
            bytes_read=bytes_read, bytes_written=bytes_read)


def check(got, want, what: str, **tol) -> None:
    """Compares (tuples of) results with the CPU ground truth: exact for integers, else ``tol``."""
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    assert len(got) == len(want), what
    for a, b in zip(got, want):
        a = a.cpu()
        if b.dtype.is_floating_point:
            torch.testing.assert_close(a.to(b.dtype), b, equal_nan=True, msg=lambda m: f"{what}: {m}", **tol)
        else:
            assert torch.equal(a.to(b.dtype), b), f"{what}: results differ from the CPU op"


# ---------------------------------------------------------------- CuPy peers

def cupy_modules():
    cp = pytest.importorskip("cupy", reason="CuPy is not installed")
    ndi = pytest.importorskip("cupyx.scipy.ndimage", reason="cupyx.scipy.ndimage is not available")
    return cp, ndi


def plane_structure(xp, connectivity: int):
    if connectivity == 8:
        return xp.ones((3, 3), dtype=bool)
    return xp.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)


def counts_by_loop(fg, xp, ndi, min_area: int, connectivity: int):
    """Counts of kept components of masks fg [M, H, W]: one ``label`` call per map."""
    structure = plane_structure(xp, connectivity)
    counts = xp.zeros(fg.shape[0], dtype=xp.int32)
    for k in range(fg.shape[0]):
        labels, n = ndi.label(fg[k], structure=structure)
        areas = xp.bincount(labels.ravel(), minlength=int(n) + 1)[1:]
        counts[k] = (areas >= min_area).sum()
    return counts


def counts_by_volume(fg, xp, ndi, min_area: int, connectivity: int):
    """The same from one ``label`` call on the stacked volume [M, H, W] with a structure that
    links nothing across maps (its depth planes are zero), then areas and owners by bincount."""
    m = fg.shape[0]
    structure = xp.zeros((3, 3, 3), dtype=bool)
    structure[1] = plane_structure(xp, connectivity)
    labels, n = ndi.label(fg, structure=structure)
    n = int(n)
    areas = xp.bincount(labels.ravel(), minlength=n + 1)
    keep = areas >= min_area
    keep[0] = False  # background
    owner = xp.zeros(n + 1, dtype=xp.int64)
    # Every pixel of a label lies in one map, so concurrent writes of a label's owner agree.
    owner[labels] = xp.broadcast_to(xp.arange(m, dtype=xp.int64)[:, None, None], labels.shape)
    return xp.bincount(owner[keep], minlength=m).astype(xp.int32)


def cupy_peer(kind: str):
    cp, ndi = cupy_modules()
    counter = {"cupy_loop": counts_by_loop, "cupy_volume": counts_by_volume}[kind]

    def call(maps, threshold, mode, min_area, connectivity):
        # The foreground by the exact rule of docs/ops.md (torch, on the device), then CuPy labels it.
        fg = on_device(ref.foreground)(maps, threshold, mode)
        flat = fg.reshape(-1, *maps.shape[-2:]).to(torch.uint8)
        counts = counter(cp.from_dlpack(flat), cp, ndi, min_area, connectivity)
        return torch.from_dlpack(counts).view(maps.shape[:-2])

    return call


# ---------------------------------------------------------------- data

@lru_cache(maxsize=None)
def cc_maps_cpu(shape, dtype: torch.dtype) -> torch.Tensor:
    return blobs(math.prod(shape[:-2]), *shape[-2:], k=5, seed=0).view(shape).to(dtype).contiguous()


@lru_cache(maxsize=None)
def cc_counts_cpu(shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.ops.xlard.count_components(cc_maps_cpu(shape, dtype), THRESHOLD, MODE, MIN_AREA, CONNECTIVITY)


def latents_cpu(count: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(LATENT_SHAPE, generator=g) for _ in range(count)]


# ---------------------------------------------------------------- count_components

CC_PROVIDERS = XLARD_PROVIDERS + ("reference", "compiled_reference", "cupy_loop", "cupy_volume", "copy")


@pytest.mark.parametrize("provider", CC_PROVIDERS)
def test_count_components(benchmark, provider):
    dtype, shape = torch.float16, CC_SHAPE
    group = group_name("count_components", dtype, shape)
    maps_cpu = cc_maps_cpu(shape, dtype)
    bytes_read = maps_cpu.numel() * maps_cpu.element_size()
    if provider == "copy":
        return copy_bench(benchmark, group, dtype, bytes_read, "count_components", shape)
    if provider in XLARD_PROVIDERS:
        call = xlard_call(provider, "count_components")
    elif provider in ("cupy_loop", "cupy_volume"):
        call = cupy_peer(provider)
    else:
        call = (on_device if provider == "reference" else compiled)(ref.count_components)
    sets = [(maps_cpu.cuda(), THRESHOLD, MODE, MIN_AREA, CONNECTIVITY) for _ in range(rotation(bytes_read))]
    fn = cycling(call, sets)
    check(fn(), cc_counts_cpu(shape, dtype), provider)
    measure(benchmark, fn, group=group, provider=provider, op="count_components", dtype=dtype, shape=shape,
            bytes_read=bytes_read, bytes_written=math.prod(shape[:-2]) * 4, pixels=maps_cpu.numel())


def _capture(run):
    """Warm up on a side stream (compilation, allocations), then capture ``run`` in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out


@pytest.mark.parametrize("provider", ("cuda_graph", "triton_graph", "cuda", "triton"))
def test_count_components_graph(benchmark, provider):
    """Small maps, where launch overhead dominates: one call replayed from a CUDA graph."""
    dtype, shape = torch.float16, CC_GRAPH_SHAPE
    maps_cpu = cc_maps_cpu(shape, dtype)
    maps = maps_cpu.cuda()
    call = xlard_call(provider.removesuffix("_graph"), "count_components")
    args = (THRESHOLD, MODE, MIN_AREA, CONNECTIVITY)
    if provider.endswith("_graph"):
        graph, out = _capture(lambda: call(maps, *args))
        graph.replay()
        check(out, cc_counts_cpu(shape, dtype), provider)
        fn = graph.replay
    else:
        fn = lambda: call(maps, *args)  # noqa: E731
        check(fn(), cc_counts_cpu(shape, dtype), provider)
    measure(benchmark, fn, group=group_name("count_components", dtype, shape, " CUDA graph"), provider=provider,
            op="count_components", dtype=dtype, shape=shape, bytes_read=maps.numel() * maps.element_size(),
            bytes_written=math.prod(shape[:-2]) * 4, pixels=maps.numel(), graph=provider.endswith("_graph"))


# ---------------------------------------------------------------- residual_correction / sample_correction

LATENT_PROVIDERS = XLARD_PROVIDERS + ("reference", "compiled_reference", "copy")


@pytest.mark.parametrize("provider", LATENT_PROVIDERS)
def test_residual_correction(benchmark, provider):
    dtype, shape = torch.float32, LATENT_SHAPE
    group = group_name("residual_correction", dtype, shape)
    z0, delta = latents_cpu(2)
    n, lam_numel = z0.numel(), shape[0] * math.prod(shape[2:])
    bytes_read, bytes_written = 2 * n * 4, n * 4 + lam_numel * 4
    if provider == "copy":
        return copy_bench(benchmark, group, dtype, bytes_read, "residual_correction", shape)
    if provider in XLARD_PROVIDERS:
        call = xlard_call(provider, "residual_correction")
    else:
        call = (on_device if provider == "reference" else compiled)(ref.residual_correction)
    want = torch.ops.xlard.residual_correction(z0, delta, None, 0.5)
    sets = [(z0.cuda(), delta.cuda(), 0.5) for _ in range(rotation(bytes_read))]
    fn = cycling(call, sets)
    check(fn(), want, provider, atol=2e-5, rtol=2e-5)
    measure(benchmark, fn, group=group, provider=provider, op="residual_correction", dtype=dtype, shape=shape,
            bytes_read=bytes_read, bytes_written=bytes_written)


@pytest.mark.parametrize("provider", LATENT_PROVIDERS)
def test_sample_correction(benchmark, provider):
    dtype, shape = torch.float32, LATENT_SHAPE
    group = group_name("sample_correction", dtype, shape)
    z0, mean, noise = latents_cpu(3, seed=1)
    log_std = 0.1 * torch.randn(shape[1], generator=torch.Generator().manual_seed(2))
    n, lam_numel = z0.numel(), shape[0] * math.prod(shape[2:])
    bytes_read = 3 * n * 4 + shape[1] * 4
    bytes_written = 2 * n * 4 + lam_numel * 4 + shape[0] * 4
    if provider == "copy":
        return copy_bench(benchmark, group, dtype, bytes_read, "sample_correction", shape)
    if provider in XLARD_PROVIDERS:
        call = xlard_call(provider, "sample_correction")
    else:
        call = (on_device if provider == "reference" else compiled)(ref.sample_correction)
    want = ops.sample_correction(z0, mean, log_std, noise, 0.5)  # CPU op through the public wrapper
    sets = [(z0.cuda(), mean.cuda(), log_std.cuda(), noise.cuda(), 0.5) for _ in range(rotation(bytes_read))]
    fn = cycling(call, sets)
    with torch.no_grad():
        check(fn(), want, provider, atol=1e-2, rtol=1e-4)  # log_prob: a float32 sum of 262144 terms
        measure(benchmark, fn, group=group, provider=provider, op="sample_correction", dtype=dtype, shape=shape,
                bytes_read=bytes_read, bytes_written=bytes_written)


# ---------------------------------------------------------------- attention_centroids

@pytest.mark.parametrize("provider", LATENT_PROVIDERS)
def test_attention_centroids(benchmark, provider):
    dtype, shape = torch.float16, CENTROIDS_SHAPE
    group = group_name("attention_centroids", dtype, shape)
    maps_cpu = cc_maps_cpu(shape, dtype)
    bytes_read = maps_cpu.numel() * maps_cpu.element_size()
    if provider == "copy":
        return copy_bench(benchmark, group, dtype, bytes_read, "attention_centroids", shape)
    if provider in XLARD_PROVIDERS:
        call = xlard_call(provider, "attention_centroids")
    else:
        call = (on_device if provider == "reference" else compiled)(ref.attention_centroids)
    want = torch.ops.xlard.attention_centroids(maps_cpu)
    sets = [(maps_cpu.cuda(),) for _ in range(rotation(bytes_read))]
    fn = cycling(call, sets)
    check(fn(), want, provider, atol=1e-5, rtol=1e-4)
    measure(benchmark, fn, group=group, provider=provider, op="attention_centroids", dtype=dtype, shape=shape,
            bytes_read=bytes_read, bytes_written=math.prod(shape[:-2]) * 2 * 4, pixels=maps_cpu.numel())
