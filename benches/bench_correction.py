"""residual_correction and sample_correction vs the eager reference and one
torch.add(z0, delta, out=...) pass (the bandwidth peer). Bytes = tensors read + written. Targets
(benches/report.py): >= 1.5x the reference's speed, and within 2x of one torch.add pass (the paired,
flushed runs below).

The paired tests interleave xlard and torch.add in every round and record the median
per-round time ratio (extra_info "paired"), robust to the memory bandwidth of a shared
machine drifting between tests. They run twice: "warm", repeated calls over the same
buffers (as a loop does; torch.add's 48 MiB then partly stays in a 32 MiB L3, as may
residual_correction's 49 MiB; sample_correction's 80 MiB cannot), and "flushed", each call after reading a 256 MiB buffer so both start
from memory (the convention of triton.testing.do_bench for memory-bound kernels). The
report judges the target ("within 2x of one torch.add pass") on the flushed runs, where
both ops move their bytes through memory, and prints the warm ratios beside them: in a
warm loop torch.add's time depends on how much of it the L3 holds (0.46-1.35 ms measured
on the 2-core dev VM, 1.1-1.7 ms flushed), which no op that must write 32 MiB can follow."""
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
        assert len(got) == len(want) == 2
        torch.testing.assert_close(got[0], want[0])  # (two statements: assert_close returns None, and an `and`
        torch.testing.assert_close(got[1], want[1])  # between them never checked the LAM)
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
        got, want = tuple(fns[provider]()), tuple(fns["reference"]())
        assert len(got) == len(want) == 4
        for name, a, b in zip(("zc", "delta", "log_prob", "lam"), got, want):
            # the log-density sums 2^20 terms of ~0.4 (float32 accumulation order): relative 1e-5; the rest exact
            tol = {"rtol": 1e-5, "atol": 0.0} if name == "log_prob" else {}
            torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"sample_correction {name}: {m}")
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
    # warm: the median of 20 back-to-back calls, after 5 untimed ones, reaches the loop's steady state
    rounds = 2 if benchmark.disabled else (25 if flush else 10)
    calls, settle = (1, 0) if flush else (20, 5)

    def paired():
        ratios, times = {"out": [], "alloc": []}, {}
        for _ in range(rounds):
            for form in ratios:
                for who, fn in (("torch.add", peer[form]), ("xlard", mine[form])):
                    for _ in range(settle):
                        fn()
                    times.setdefault((who, form), []).append(_timed(fn, flush, calls))
                ratios[form].append(times[("xlard", form)][-1] / times[("torch.add", form)][-1])
        medians_ms = {f"{who} {form}": statistics.median(t) * 1e3 for (who, form), t in times.items()}
        return {form: statistics.median(r) for form, r in ratios.items()}, medians_ms

    benchmark.group = f"{op} paired vs torch.add, {cache}"
    ratios, medians_ms = benchmark.pedantic(paired, rounds=1, iterations=1)
    benchmark.extra_info.update(
        provider="paired", op=op, cache=cache, rounds=rounds, paired_max=PAIRED_MAX, median_ms=medians_ms,
        paired={"xlard out= / torch.add(out=)": ratios["out"], "xlard / torch.add (allocating)": ratios["alloc"]})

