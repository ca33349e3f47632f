"""residual_correction and sample_correction vs the eager reference and one
torch.add(z0, delta, out=...) pass (the bandwidth peer). Bytes = tensors read + written.

The paired tests interleave xlard and torch.add in every round and record the median
per-round time ratio (extra_info "paired"), robust to the memory bandwidth of a shared
machine drifting between tests. They run twice: "warm", repeated calls over the same
buffers (as a loop does; torch.add's 48 MiB then partly stays in a 32 MiB L3, xlard's
80 MiB cannot), and "flushed", each call after reading a 256 MiB buffer so both start
from memory (the convention of triton.testing.do_bench for memory-bound kernels). The
report judges the target on both; the warm one is the harder, and the one a busy machine
(less bandwidth for the op that needs more of it) can push over."""
from __future__ import annotations

import statistics
import time

import pytest
import torch

import xlard.ops as ops
import xlard.reference as ref

SHAPE = (16, 16, 128, 128)


def _data():
    g = torch.Generator().manual_seed(0)
    z0, delta, noise = (torch.randn(SHAPE, generator=g) for _ in range(3))
    return z0, delta, noise, torch.randn(SHAPE[1], generator=g) * 0.1


@pytest.mark.parametrize("provider", ["xlard", "xlard_out", "reference", "torch_add", "torch_add_alloc"])
def test_residual_correction(benchmark, provider):
    z0, delta, _, _ = _data()
    out = torch.empty_like(z0)
    bufs = (torch.empty_like(z0), torch.empty(SHAPE[0], *SHAPE[2:]))
    fns = {
        "xlard": lambda: ops.residual_correction(z0, delta, 0.5),
        "xlard_out": lambda: ops.residual_correction(z0, delta, 0.5, out=bufs),  # into preallocated buffers
        "reference": lambda: ref.residual_correction(z0, delta, 0.5),
        "torch_add": lambda: torch.add(z0, delta, out=out),
        "torch_add_alloc": lambda: torch.add(z0, delta),  # the same pass, allocating its output
    }
    if not provider.startswith("torch_add"):
        got, want = tuple(fns[provider]()), ref.residual_correction(z0, delta, 0.5)
        torch.testing.assert_close(got[0], want[0]) and torch.testing.assert_close(got[1], want[1])
    lam_bytes = SHAPE[0] * SHAPE[2] * SHAPE[3] * 4
    benchmark.group = "residual_correction float32 16x16x128x128"
    benchmark.extra_info.update(provider=provider, op="residual_correction",
                                bytes=3 * z0.numel() * 4 + (0 if provider.startswith("torch_add") else lam_bytes))
    benchmark(fns[provider])


@pytest.mark.parametrize("provider", ["xlard", "xlard_out", "reference", "torch_add", "torch_add_alloc"])
def test_sample_correction(benchmark, provider):
    z0, mean, noise, log_std = _data()
    out = torch.empty_like(z0)
    bufs = (torch.empty_like(z0), torch.empty_like(z0), torch.empty(SHAPE[0]), torch.empty(SHAPE[0], *SHAPE[2:]))
    fns = {
        "xlard": lambda: ops.sample_correction(z0, mean, log_std, noise, 0.5),
        "xlard_out": lambda: ops.sample_correction(z0, mean, log_std, noise, 0.5, out=bufs),
        "reference": lambda: ref.sample_correction(z0, mean, log_std, noise, 0.5),
        "torch_add": lambda: torch.add(z0, mean, out=out),
        "torch_add_alloc": lambda: torch.add(z0, mean),
    }
    if provider.startswith("xlard"):
        for a, b in zip(fns[provider](), fns["reference"]()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-2)
    benchmark.group = "sample_correction float32 16x16x128x128"
    lam_bytes = SHAPE[0] * SHAPE[2] * SHAPE[3] * 4  # torch.add peers move 3 tensors, xlard/reference 5 + the LAM
    moved = 3 * z0.numel() * 4 if provider.startswith("torch_add") else 5 * z0.numel() * 4 + lam_bytes
    benchmark.extra_info.update(provider=provider, op="sample_correction", bytes=moved)
    benchmark(fns[provider])


FLUSH_BYTES = 256 << 20  # well over any L3 a CPU benchmark runs on
PAIRED_MAX = 2.0  # the foundation issue's target: within 2x of one torch.add pass


def _timed(fn, flush, calls):
    """Median seconds of `calls` calls (each after `flush()` when given)."""
    times = []
    for _ in range(calls):
        if flush is not None:
            flush()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.mark.parametrize("cache", ["warm", "flushed"])
@pytest.mark.parametrize("op", ["residual_correction", "sample_correction"])
def test_correction_vs_torch_add_paired(benchmark, op, cache):
    z0, other, noise, log_std = _data()
    out = torch.empty_like(z0)
    if op == "residual_correction":
        bufs = (torch.empty_like(z0), torch.empty(SHAPE[0], *SHAPE[2:]))
        mine = {"out": lambda: ops.residual_correction(z0, other, 0.5, out=bufs),
                "alloc": lambda: ops.residual_correction(z0, other, 0.5)}
    else:
        bufs = (torch.empty_like(z0), torch.empty_like(z0), torch.empty(SHAPE[0]), torch.empty(SHAPE[0], *SHAPE[2:]))
        mine = {"out": lambda: ops.sample_correction(z0, other, log_std, noise, 0.5, out=bufs),
                "alloc": lambda: ops.sample_correction(z0, other, log_std, noise, 0.5)}
    peer = {"out": lambda: torch.add(z0, other, out=out), "alloc": lambda: torch.add(z0, other)}
    scratch = torch.ones(FLUSH_BYTES // 4) if cache == "flushed" else None
    flush = (lambda: scratch.sum()) if scratch is not None else None  # reads: the cache is left clean
    rounds = 2 if benchmark.disabled else (25 if flush else 15)
    calls = 1 if flush else 5

    def paired():
        ratios = {"out": [], "alloc": []}
        for form in ratios:  # warm-up
            mine[form](), peer[form]()
        for _ in range(rounds):
            for form in ratios:
                t_peer = _timed(peer[form], flush, calls)
                t_mine = _timed(mine[form], flush, calls)
                ratios[form].append(t_mine / t_peer)
        return {form: statistics.median(r) for form, r in ratios.items()}

    benchmark.group = f"{op} paired vs torch.add, {cache}"
    ratios = benchmark.pedantic(paired, rounds=1, iterations=1)
    benchmark.extra_info.update(
        provider="paired", op=op, cache=cache, rounds=rounds, paired_max=PAIRED_MAX,
        paired={"xlard out= / torch.add(out=)": ratios["out"], "xlard / torch.add (allocating)": ratios["alloc"]})

