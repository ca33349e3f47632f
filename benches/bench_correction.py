"""residual_correction and sample_correction vs the eager reference and one
torch.add(z0, delta, out=...) pass (the bandwidth peer). Bytes = tensors read + written."""
from __future__ import annotations

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
