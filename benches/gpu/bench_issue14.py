"""GPU benchmarks of the issue-14 changes to csrc/cuda, one shape per change, so the first
GPU run measures each (run by scripts/gpu_check.sh as its own step, ``-k issue14``).

Timing, correctness (against the C++ CPU op, outside the timing) and the recorded bytes
follow ``bench_gpu_ops.measure``. Peers: the Triton provider where it has the op, the
eager reference otherwise; the groups name the shape the issue named.

- component_stats top-K on a 1024x1024 pixel checkerboard (4-connected: 2^19
  components), K = 16 (the rewards' default) and K = 1: the radix select replaces K
  full passes;
- count_components on 64 maps of 1024x1024 (the global-memory path in waves): peak
  device memory of the call is recorded (``extra_info.peak_mib``);
- count_components Otsu on near-constant maps (the warp-aggregated histogram) and on
  ordinary maps (what the aggregation costs when the bins differ);
- sample_correction in float16 and bfloat16 (the idle half of each block);
- color_scores at CLIP-like sizes, many colors and few (features read once per group
  of 4 colors, patch norms once, patch splits across blocks);
- the backward of position_scores with few tokens and many relations, and of
  gaussian_log_prob with a large batch and a small inner size (shared log_std).
"""
from __future__ import annotations

import math

import pytest
import torch

import xlard.ops as ops
import xlard.reference as ref
from benches.gpu.bench_gpu_ops import check, cycling, measure, on_device, rotation, xlard_call
from helpers import blobs, checkerboard

PROVIDERS = ("cuda", "triton", "reference")


def _call(provider: str, op: str):
    if provider == "reference":
        return on_device(getattr(ref, op))
    return xlard_call(provider, op)


@pytest.mark.parametrize("k", (16, 1))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_issue14_component_stats_checkerboard(benchmark, provider, k):
    shape = (1, 1024, 1024)
    maps_cpu = torch.from_numpy(checkerboard(1024, 1024)).reshape(shape)
    call = _call(provider, "component_stats")
    args = (0.5, "absolute", 1, 4, k)
    maps = maps_cpu.cuda()
    fn = lambda: call(maps, *args)  # noqa: E731
    check(fn(), torch.ops.xlard.component_stats(maps_cpu, *args), provider)
    measure(benchmark, fn, group=f"issue14 component_stats bool 1x1024x1024 checkerboard K={k}", provider=provider,
            op="component_stats", dtype=torch.bool, shape=shape, bytes_read=maps_cpu.numel(),
            bytes_written=4 + 12 * k, pixels=maps_cpu.numel())


@pytest.mark.parametrize("provider", ("cuda", "triton"))
def test_issue14_count_components_global_waves(benchmark, provider):
    shape = (64, 1024, 1024)
    maps_cpu = blobs(4, 1024, 1024, k=8, seed=14).to(torch.float16).repeat(16, 1, 1)  # blobs of 64 maps: GiBs
    call = _call(provider, "count_components")
    args = (0.5, "relative", 4, 8)
    maps = maps_cpu.cuda()
    fn = lambda: call(maps, *args)  # noqa: E731
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    check(fn(), torch.ops.xlard.count_components(maps_cpu, *args), provider)
    peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    measure(benchmark, fn, group="issue14 count_components float16 64x1024x1024 (global path)", provider=provider,
            op="count_components", dtype=torch.float16, shape=shape, bytes_read=maps_cpu.numel() * 2,
            bytes_written=64 * 4, pixels=maps_cpu.numel(), peak_mib=round(peak_mib, 1))


@pytest.mark.parametrize("kind", ("near-constant", "blobs"))
@pytest.mark.parametrize("provider", ("cuda", "triton"))
def test_issue14_otsu_near_constant(benchmark, provider, kind):
    """The contended case the aggregation is for, and ordinary maps (its cost when bins differ)."""
    shape = (16, 77, 128, 128)
    if kind == "near-constant":
        maps_cpu = torch.full(shape, 0.25, dtype=torch.float16)
        maps_cpu[..., ::16, ::16] = 1.0  # 1 pixel in 256 off the constant: one Otsu bin takes the rest
    else:
        maps_cpu = blobs(16 * 77, 128, 128, k=5, seed=0).view(shape).to(torch.float16)
    call = _call(provider, "count_components")
    args = (0.0, "otsu", 1, 8)
    sets = [(maps_cpu.cuda(), *args) for _ in range(rotation(maps_cpu.numel() * 2))]
    fn = cycling(call, sets)
    check(fn(), torch.ops.xlard.count_components(maps_cpu, *args), provider)
    measure(benchmark, fn, group=f"issue14 count_components otsu float16 16x77x128x128 {kind}",
            provider=provider, op="count_components", dtype=torch.float16, shape=shape,
            bytes_read=maps_cpu.numel() * 2, bytes_written=16 * 77 * 4, pixels=maps_cpu.numel())


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("provider", ("cuda", "triton", "copy"))
def test_issue14_sample_correction_half(benchmark, provider, dtype):
    shape = (16, 16, 128, 128)
    g = torch.Generator().manual_seed(1)
    z0, mean, noise = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    log_std = 0.1 * torch.randn(shape[1], generator=g)
    n, lam_numel = z0.numel(), shape[0] * math.prod(shape[2:])
    es = z0.element_size()
    bytes_read, bytes_written = 3 * n * es + shape[1] * 4, 2 * n * es + lam_numel * 4 + shape[0] * 4
    group = f"issue14 sample_correction {str(dtype)[6:]} {'x'.join(map(str, shape))}"
    if provider == "copy":
        from benches.gpu.bench_gpu_ops import copy_bench

        return copy_bench(benchmark, group, dtype, bytes_read, "sample_correction", shape)
    call = _call(provider, "sample_correction")
    want = ops.sample_correction(z0, mean, log_std, noise, 0.5)
    sets = [(z0.cuda(), mean.cuda(), log_std.cuda(), noise.cuda(), 0.5) for _ in range(rotation(bytes_read))]
    fn = cycling(call, sets)
    with torch.no_grad():
        got, exp = fn(), want
        check(got[:2], exp[:2], provider, atol=1e-2, rtol=1e-2)  # half outputs: one rounding apart
        check(got[2:], exp[2:], provider, atol=1e-1, rtol=1e-4)  # float32 sums of 262144 terms
        measure(benchmark, fn, group=group, provider=provider, op="sample_correction", dtype=dtype, shape=shape,
                bytes_read=bytes_read, bytes_written=bytes_written)


@pytest.mark.parametrize("sizes", ((16, 1024, 768, 8), (1, 256, 768, 3)), ids=("B16xN1024xD768xC8", "B1xN256xD768xC3"))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_issue14_color_scores(benchmark, provider, sizes):
    b, n, d, c = sizes
    g = torch.Generator().manual_seed(3)
    feats_cpu, colors_cpu = torch.randn(b, n, d, generator=g), torch.randn(c, d, generator=g)
    call = _call(provider, "color_scores")
    sets = [(feats_cpu.cuda(), colors_cpu.cuda()) for _ in range(rotation(feats_cpu.numel() * 4))]
    fn = cycling(call, sets)
    got_s, got_i = fn()
    want_s, want_i = torch.ops.xlard.color_scores(feats_cpu, colors_cpu, None)
    check(got_s, want_s, provider, atol=1e-5, rtol=1e-4)
    check(got_i, want_i, provider)  # the best patch's index, exactly
    measure(benchmark, fn, group=f"issue14 color_scores float32 B{b} N{n} D{d} C{c}", provider=provider,
            op="color_scores", dtype=torch.float32, shape=(b, n, d), bytes_read=feats_cpu.numel() * 4 + c * d * 4,
            bytes_written=b * c * 12)


@pytest.mark.parametrize("provider", ("cuda", "triton"))
def test_issue14_position_scores_backward(benchmark, provider):
    b, t, r = 4, 8, 4096
    g = torch.Generator().manual_seed(5)
    cen_cpu = torch.rand(b, t, 2, generator=g)
    rel_cpu = torch.stack([torch.randint(0, t, (b, r), generator=g), torch.randint(0, t, (b, r), generator=g),
                           torch.randint(0, 4, (b, r), generator=g)], dim=-1)
    call = _call(provider, "position_scores")
    cen = cen_cpu.cuda().requires_grad_(True)
    rel = rel_cpu.cuda()

    def fn():
        cen.grad = None
        call(cen, rel, 5.0).sum().backward()
        return cen.grad

    want_c = cen_cpu.clone().requires_grad_(True)
    ops.position_scores(want_c, rel_cpu, 5.0).sum().backward()
    check(fn(), want_c.grad, provider, atol=1e-4, rtol=1e-4)
    measure(benchmark, fn, group=f"issue14 position_scores fwd+bwd float32 B{b} T{t} R{r}", provider=provider,
            op="position_scores", dtype=torch.float32, shape=(b, t, r), bytes_read=rel_cpu.numel() * 8 * 2,
            bytes_written=b * r * 4 + b * t * 8)


@pytest.mark.parametrize("sizes", ((16384, 4), (4096, 64)), ids=("B16384xM4", "B4096xM64"))
@pytest.mark.parametrize("provider", ("cuda", "triton"))
def test_issue14_gaussian_log_prob_backward(benchmark, provider, sizes):
    b, m = sizes
    g = torch.Generator().manual_seed(6)
    x_cpu, mean_cpu = torch.randn(b, m, generator=g), torch.randn(b, m, generator=g)
    ls_cpu = 0.2 * torch.randn(m, generator=g)
    call = _call(provider, "gaussian_log_prob")
    x, mean, ls = x_cpu.cuda(), mean_cpu.cuda().requires_grad_(True), ls_cpu.cuda().requires_grad_(True)

    def fn():
        mean.grad = ls.grad = None
        call(x, mean, ls).sum().backward()
        return mean.grad, ls.grad

    wm, wl = mean_cpu.clone().requires_grad_(True), ls_cpu.clone().requires_grad_(True)
    ops.gaussian_log_prob(x_cpu, wm, wl).sum().backward()
    got_mean, got_ls = fn()
    check(got_mean, wm.grad, provider, atol=1e-5, rtol=1e-4)  # per element, about 1: no sum over the batch
    check(got_ls, wl.grad, provider, atol=1e-3 * math.sqrt(b), rtol=1e-4)  # sums B terms: grows with sqrt(B)
    measure(benchmark, fn, group=f"issue14 gaussian_log_prob fwd+bwd float32 B{b} M{m} shared log_std",
            provider=provider, op="gaussian_log_prob", dtype=torch.float32, shape=(b, m),
            bytes_read=2 * b * m * 4 * 2 + m * 8, bytes_written=b * m * 4 + m * 4 + b * 4)

